"""The CLI with community files: `generate --transformer FILE` (recorded in the PNG, re-read by
--from-png) on the demo model, and `inspect FILE_OR_FOLDER`."""

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_files import scaled_fp8
from gguf_files import model_gguf
from krea2_lite import load_transformer, read_png_metadata, save_png
from krea2_lite.__main__ import main
from krea2_lite.demo import demo_path

PROMPT = "a small red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("community")
    state = {k: v.detach().float().contiguous()
             for k, v in load_transformer(demo_path() / "transformer", dtype=torch.float32).state_dict().items()}
    gguf, _ = model_gguf(folder / "demo-Q8_0.gguf", state, "Q8_0")
    scaled_fp8(folder / "demo-fp8.safetensors", state)
    return gguf, folder / "demo-fp8.safetensors"


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_generate_with_transformer_files(files, tmp_path, single_thread):
    base = ["generate", PROMPT, "--model", "demo", "--dtype", "fp32", "--quiet", "--seed", "5"]
    assert main([*base, "--output", str(tmp_path / "fp32.png")]) == 0
    reference = Image.open(tmp_path / "fp32.png")
    for name, path in zip(("q8", "fp8"), files):
        out = tmp_path / f"{name}.png"
        assert main([*base, "--transformer", str(path), "--output", str(out)]) == 0
        meta = read_png_metadata(out)
        assert meta["transformer"] == str(path.resolve()) and meta["model"] == "demo"
        assert meta["transformer_bytes"] == path.stat().st_size  # found again by absolute path and size
        assert psnr(Image.open(out), reference) > 25  # Q8_0 ≈ 50 dB, scaled fp8 ≈ 30+ dB on the demo
    again = tmp_path / "again.png"  # --from-png reloads the same transformer file
    assert main(["generate", "--from-png", str(tmp_path / "q8.png"), "--output", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(tmp_path / "q8.png")))
    replaced = files[0].with_name("replaced.gguf")  # the PNG's transformer file changed: refused in one line
    replaced.write_bytes(files[0].read_bytes() + b"\0" * 64)
    moved = tmp_path / "moved.png"
    meta = read_png_metadata(tmp_path / "q8.png")
    save_png(Image.open(tmp_path / "q8.png"), moved, dict(meta, transformer=str(replaced)))
    assert main(["generate", "--from-png", str(moved), "--output", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert not (tmp_path / "x.png").exists()
    # --transformer given: the user's choice replaces the PNG's file, which is then not checked
    assert main(["generate", "--from-png", str(moved), "--transformer", str(files[0]), "--output",
                 str(tmp_path / "y.png"), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "y.png")), np.asarray(Image.open(tmp_path / "q8.png")))


def test_inspect(files, capsys):
    gguf, fp8 = files
    assert main(["inspect", str(gguf)]) == 0
    out = capsys.readouterr().out
    assert "GGUF" in out and "Q8_0" in out and "4 blocks, width 128" in out
    assert out.count(" GB: ") == 3  # a plan line for 8, 12 and 16 GB
    assert main(["inspect", str(fp8)]) == 0
    assert "float8_e4m3fn" in capsys.readouterr().out


def test_inspect_bad_file_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 8)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "bad.gguf" in err[0]


def test_quantize_cli_converts_community_files(files, tmp_path, single_thread):
    import json

    from factories import random_inputs
    from krea2_lite.quantize.__main__ import main as quantize_main

    for path, fmt in zip(files, ("gguf", "comfy-quantized")):
        out = tmp_path / f"{fmt}-int8"
        assert quantize_main(["--model", str(path), "--dtype", "int8", "--out", str(out), "--quiet"]) == 0
        assert json.loads((out / "krea2_lite.json").read_text())["source"]["format"] == fmt
        converted = load_transformer(out, dtype=torch.float32)
        stored = load_transformer(path, dtype=torch.float32)  # the community file as stored
        assert converted.blocks[0].attn.wq.dtype == "int8"
        inputs = random_inputs(stored.config, 1, 3, 2, 2)
        with torch.no_grad():
            a, b = converted(*inputs), stored(*inputs)
        assert (a - b).norm() / b.norm() < 0.02  # int8 of the dequantized weights, not of noise
