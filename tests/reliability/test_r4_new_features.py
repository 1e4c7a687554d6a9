"""Round four: a hostile pass over the features of issues 24-27 (images in, community files, LoRA
training, step caching). Each test is a case that went wrong before its fix: a traceback, an internal
error, a silent no-op, a user's file overwritten or a half-written file left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from krea2_lite import images_in
from krea2_lite.cache import parse_cache
from krea2_lite.cli import generate_images
from krea2_lite.cli.train import main as train_main
from krea2_lite.demo import demo_path
from krea2_lite.errors import (ArgumentError, ImageInputError, Krea2LiteError, NonFiniteError,
                               UnsafeOutputError)
from krea2_lite.files.leftovers import partial_name
from krea2_lite.files.no_replace import exchange
from krea2_lite.train import loss_log, train_lora
from krea2_lite.train.data import scan_folder
from krea2_lite.train.settings import TrainSettings, check_settings
from r3_helpers import dead_pid
from reliability_fixtures import snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_train_demo import OPTIONS, write_scene_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A small PNG that declares width × height (its pixel data is a few bytes: a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    return path


# ---- images in ----------------------------------------------------------------------------------
def test_a_huge_declared_image_is_refused_from_its_header(tmp_path):
    # 9000 × 8000 = 72 Mi pixels: under PIL's bomb limit, so it used to be decoded (GBs) before the size check
    bomb = png_header_only(tmp_path / "bomb.png", 9000, 8000)
    for read in (images_in.read_image, images_in.read_mask):
        with pytest.raises(ImageInputError, match=r"bomb.png: the image is 9000×8000 .*Mi pixels"):
            read(str(bomb))


def test_a_huge_training_image_is_skipped_from_its_header(tmp_path):
    data = write_scene_folder(tmp_path / "d", 1)
    png_header_only(data / "bomb.png", 9000, 8000)
    (data / "bomb.txt").write_text("a zorblat")
    items, skips = scan_folder(data, 64)
    assert [i.image.name for i in items] == ["img0.png"]
    assert any("bomb.png" in s and "9000×8000" in s for s in skips), skips


def test_mask_blur_without_a_mask_is_refused_not_ignored(tmp_path):
    image = Image.new("RGB", (64, 64), "red")
    with pytest.raises(ImageInputError, match="mask_blur=3 softens a mask's edge"):
        images_in.prepare(image, mask_blur=3)
    images_in.prepare(image, mask_blur=3, outpaint=(16, 0, 0, 0))  # with outpaint it blurs the new area's edge
    image.save(tmp_path / "in.png")
    with pytest.raises(ImageInputError, match="mask_blur"):
        generate_images.check_job({"image": str(tmp_path / "in.png"), "mask_blur": 3.0})


def test_an_empty_image_path_says_so():
    with pytest.raises(ImageInputError, match="image: the path is empty"):
        images_in.read_image("")


# ---- step cache ---------------------------------------------------------------------------------
def test_a_cache_key_given_twice_is_refused():
    with pytest.raises(ArgumentError, match="threshold is given twice"):
        parse_cache("fbcache:0.1,threshold=0.5")
    with pytest.raises(ArgumentError, match="warmup is given twice"):
        parse_cache("taylor:1,warmup=2,warmup=3")


def test_a_cache_that_can_skip_nothing_warns(demo_pipe):
    with pytest.warns(UserWarning, match="skips no step: warmup=4 \\+ tail=2 cover all 3 steps"):
        demo_pipe("a red circle", steps=3, cache="fbcache:0.1", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        demo_pipe("a red circle", steps=8, cache="fbcache:0.1", progress=False)


@pytest.fixture(scope="module")
def demo_pipe():
    from krea2_lite.pipeline import Krea2Pipeline

    return Krea2Pipeline.from_pretrained(demo_path(), device="cpu", dtype=torch.float32, progress=False)


# ---- training: paths and arguments, checked before anything loads --------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_scene_folder(tmp_path_factory.mktemp("r4") / "data", 2)


def _settings(data, output, **options):
    return TrainSettings(model=str(demo_path()), data=str(data), output=str(output), resolution=64, rank=2,
                         **options)


def test_training_outputs_never_land_in_inputs_or_checkpoints(data, tmp_path):
    checkpoint = tmp_path / "run.safetensors.checkpoint"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text("{}")
    (checkpoint / "lora.safetensors").write_bytes(b"theirs")
    model_copy = tmp_path / "model"
    shutil.copytree(demo_path(), model_copy)
    cases = {
        "inside the training checkpoint": dict(output=checkpoint / "lora.safetensors"),
        "--cache-dir .* over the input --data": dict(output=tmp_path / "a.safetensors", cache_dir=str(data)),
        "--cache-dir .* inside the input --model": dict(output=tmp_path / "b.safetensors",
                                                         cache_dir=str(model_copy / "transformer"), model=model_copy),
        "--cache-dir .* inside the training checkpoint": dict(output=tmp_path / "c.safetensors",
                                                               cache_dir=str(checkpoint)),
    }
    before = snapshot(tmp_path)
    for message, case in cases.items():
        options = dict(case)
        output, model = options.pop("output"), options.pop("model", demo_path())
        settings = _settings(data, output, **options)
        settings.model = str(model)
        with pytest.raises(UnsafeOutputError, match=message):
            check_settings(settings)
    assert snapshot(tmp_path) == before


def test_a_users_folder_at_the_checkpoint_name_is_never_replaced(data, tmp_path):
    mine = tmp_path / "style.safetensors.checkpoint"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError, match="not a training checkpoint"):
        check_settings(_settings(data, tmp_path / "style.safetensors"))
    inner = tmp_path / "lora.safetensors.checkpoint" / "data"  # a save would replace the folder around --data
    shutil.copytree(data, inner)
    with pytest.raises(UnsafeOutputError, match="around the input --data"):
        check_settings(_settings(inner, tmp_path / "lora.safetensors"))


@pytest.mark.parametrize("flags, message", [
    (["--steps", "99999999999999999999"], "steps must be an integer in 1..10000000"),
    (["--save-every", "99999999999999999999"], "save_every must be an integer in 0..10000000"),
    (["--resolution", "999999984"], "resolution must be"),
    (["--device", "banana"], "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "device 'cuda"),
])
def test_absurd_training_arguments_are_one_line(flags, message, data, tmp_path, capsys):
    code = train_main(["--model", str(demo_path()), "--data", str(data), "--output", str(tmp_path / "l.safetensors"),
                       "--quiet", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_hostile_metadata_jsonl_is_skipped_line_by_line(tmp_path):
    folder = write_scene_folder(tmp_path / "d", 2)
    (folder / "metadata.jsonl").write_text("[" * 100_000 + "\n"  # RecursionError in json.loads before
                                           + json.dumps({"file_name": "img0.png", "text": "from metadata"}) + "\n"
                                           + '{"file_name": "img1.png", "text": 1' + "0" * 5000 + "}\n")
    items, skips = scan_folder(folder, 64)
    assert {i.image.name: i.caption for i in items} == {"img0.png": "from metadata", "img1.png": "a zorblat"}
    assert sum("metadata.jsonl:" in s for s in skips) == 2, skips


def test_a_huge_caption_file_is_skipped_unread(tmp_path):
    folder = write_scene_folder(tmp_path / "d", 2)
    with open(folder / "img1.txt", "wb") as fh:
        fh.truncate((1 << 20) + 1)  # sparse: 1 MiB of NULs that were read whole before
    items, skips = scan_folder(folder, 64)
    assert [i.image.name for i in items] == ["img0.png"]
    assert any("img1.txt" in s and "not a caption" in s for s in skips), skips


def test_save_every_without_effect_is_said(data, tmp_path):
    with pytest.warns(UserWarning, match="save_every=5 ≥ steps=5: only the final save happens"):
        check_settings(_settings(data, tmp_path / "l.safetensors", steps=5, save_every=5))


# ---- training: checkpoints, logs, signals --------------------------------------------------------
@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("r4run") / "lora.safetensors"
    train_lora(str(demo_path()), data=data, output=out, steps=1, **{**OPTIONS, "rank": 2})  # the final save
    return out


def _resume_from(trained, data, tmp_path, edit) -> Path:
    checkpoint = tmp_path / "ck"
    shutil.copytree(str(trained) + ".checkpoint", checkpoint)
    edit(checkpoint)
    return checkpoint


def _edit_state(key, value):
    def edit(folder):
        state = json.loads((folder / "state.json").read_text())
        state[key] = value
        (folder / "state.json").write_text(json.dumps(state))
    return edit


def _edit_tensors(name, change):
    def edit(folder):
        tensors = load_file(folder / name)
        save_file(change(tensors), folder / name)
    return edit


@pytest.mark.parametrize("case, edit, error, message", [
    ("state is a list", lambda f: (f / "state.json").write_text("[]"), Krea2LiteError, "state.json"),
    ("step a string", _edit_state("step", "x"), Krea2LiteError, "'step' must be an integer"),
    ("identity null", _edit_state("identity", None), ArgumentError, "it was trained with"),
    ("optimizer without step", _edit_tensors("optimizer.safetensors",
                                             lambda t: {k: v for k, v in t.items() if not k.endswith("step")}),
     ArgumentError, "optimizer.safetensors lacks a valid step"),
    ("NaN LoRA", _edit_tensors("lora.safetensors", lambda t: {k: v * float("nan") for k, v in t.items()}),
     NonFiniteError, "holds NaN/inf in"),
    ("rng without state", _edit_tensors("rng.safetensors", lambda t: {"other": t["state"]}),
     ArgumentError, "no valid generator"),
])
def test_a_damaged_checkpoint_is_one_typed_error(case, edit, error, message, trained, data, tmp_path):
    checkpoint = _resume_from(trained, data, tmp_path, edit)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(error, match=message):
        train_lora(str(demo_path()), data=data, output=out, steps=3, resume=str(checkpoint),
                   **{**OPTIONS, "rank": 2})
    assert not out.exists()


def test_a_half_written_loss_log_line_does_not_stop_a_resume(tmp_path):
    log = tmp_path / "l.loss.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": "x"}\n[]\n{"step": 3, "lo')
    loss_log.truncate(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    loss_log.draw(log, tmp_path / "l.loss.png")
    assert (tmp_path / "l.loss.png").read_bytes()[:4] == b"\x89PNG"


def test_dead_runs_leftovers_are_removed_and_ours_never_left(trained, data, tmp_path):
    out = tmp_path / "lora.safetensors"
    stale = tmp_path / partial_name("lora.safetensors.checkpoint", dead_pid())
    stale.mkdir()
    (tmp_path / partial_name("lora.loss.png", dead_pid())).write_bytes(b"half")
    alive = tmp_path / partial_name("other", os.getpid())  # a live process's: kept
    alive.write_bytes(b"")
    train_lora(str(demo_path()), data=data, output=out, steps=2, save_every=1, **{**OPTIONS, "rank": 2})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([alive.name, ".krea2_lite_train_cache", "lora.loss.jsonl", "lora.loss.png",
                            "lora.safetensors", "lora.safetensors.checkpoint"]), names


def test_checkpoint_folders_are_swapped_atomically(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("old")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("new")
    if not exchange(tmp_path / "b", tmp_path / "a"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here (the fallback renames twice)")
    assert (tmp_path / "a" / "x").read_text() == "new" and (tmp_path / "b" / "x").read_text() == "old"


def test_sigterm_saves_the_last_step_and_leaves_nothing_half_written(data, tmp_path):
    out = tmp_path / "lora.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "krea2_lite.train", "--model", str(demo_path()), "--data", str(data),
                             "--output", str(out), "--resolution", "64", "--rank", "2", "--targets", "attn",
                             "--steps", "1000000", "--save-every", "1", "--quiet"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out.with_suffix(".safetensors.checkpoint") / "state.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    assert load_file(out) and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    state = json.loads((tmp_path / "lora.safetensors.checkpoint" / "state.json").read_text())
    assert state["step"] >= 1
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600


# ---- --from-png of images made from an input ----------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"outpaint": 5}, "outpaint must be (left, top, right, bottom)"),
    ({"outpaint": "abcd"}, "outpaint must be"),
    ({"outpaint": [16.5, 0, 0, 0]}, "outpaint left must be an int"),
    ({"strength": "x"}, "strength must be a number"),
    ({"mask_blur": [1]}, "mask_blur must be a number"),
    ({"strength": None}, "records image, outpaint but no strength"),  # was silently text-to-image
])
def test_recorded_inputs_are_checked_naming_the_png(changes, message):
    from krea2_lite.errors import MetadataError

    meta = {"strength": 1.0, "mask_blur": 0.0, "outpaint": [16, 0, 0, 0], "image": {"path": "in.png", "sha256": "0"},
            "mask": None, **changes}
    with pytest.raises(MetadataError, match=r"^made\.png: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        generate_images.from_png(meta, "made.png")


# ---- community files ----------------------------------------------------------------------------
def test_a_nan_block_scale_in_a_gguf_is_named_at_load(tmp_path):
    import numpy as np

    from gguf_files import model_gguf
    from krea2_lite.files.gguf_container import read_gguf
    from krea2_lite.loading.transformer import load_transformer

    model = load_transformer(demo_path() / "transformer", device="cpu", dtype=torch.float32, progress=False)
    path, _ = model_gguf(tmp_path / "q8.gguf", {k: v.float().contiguous() for k, v in model.state_dict().items()},
                         "Q8_0")
    entry = read_gguf(path).tensors["blocks.1.attn.wq.weight"]
    data = bytearray(path.read_bytes())
    data[entry.start + 3 * 34:entry.start + 3 * 34 + 2] = np.array([np.nan], dtype=np.float16).tobytes()  # block 3's d
    path.write_bytes(bytes(data))
    with pytest.raises(NonFiniteError, match=r"q8.gguf: tensor 'blocks.1.attn.wq.weight': block 3 of .* NaN/inf scale"):
        load_transformer(path, device="cpu", dtype=torch.float32, progress=False)


def test_api_arguments_of_the_wrong_kind_are_typed_errors(data, tmp_path):
    from krea2_lite import load_vae_encoder
    from krea2_lite.errors import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match="path must be a path"):
        load_vae_encoder(None)
    with pytest.raises(ArgumentError, match="device must be 'cpu'"):
        load_vae_encoder(demo_path() / "vae", device="banana")
    with pytest.raises(ArgumentTypeError, match="unknown option.* ranks"):
        train_lora(str(demo_path()), data=data, output=tmp_path / "x.safetensors", ranks=4)
    with pytest.raises(ArgumentError, match="--trigger must be a non-empty word"):
        train_lora(str(demo_path()), data=data, output=tmp_path / "x.safetensors", trigger=5)
    assert list(tmp_path.iterdir()) == []


def test_hostile_comfyui_layer_descriptions_are_named(tmp_path):
    from types import SimpleNamespace

    from krea2_lite.errors import CorruptCheckpointError
    from krea2_lite.files.comfy_layouts import comfy_layers

    deep = {"_quantization_metadata": "[" * 100_000}  # a RecursionError (internal error) before
    with pytest.raises(CorruptCheckpointError, match="f.safetensors: unreadable _quantization_metadata"):
        comfy_layers({}, deep, "f.safetensors", read=None)
    huge = {"a.comfy_quant": (None, None, SimpleNamespace(shape=(1 << 24,), dtype="U8"))}
    with pytest.raises(CorruptCheckpointError, match="'a.comfy_quant' holds 16777216 bytes"):
        comfy_layers(huge, None, "f.safetensors", read=lambda name: pytest.fail("read a huge entry"))
    nested = {"a.comfy_quant": (None, None, SimpleNamespace(shape=(300,), dtype="U8"))}
    with pytest.raises(CorruptCheckpointError, match="'a.comfy_quant' is not a JSON layer description"):
        comfy_layers(nested, None, "f.safetensors", read=lambda name: torch.tensor(list(b"[" * 300), dtype=torch.uint8))
