"""Sharded quantized folders: written block by block under --max-shard-size, read back exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from factories import diffusers_transformer, official_state_dict, random_inputs
from krea2_lite import Krea2Config, load_transformer
from krea2_lite.cli import quantize as cli
from krea2_lite.files.quantized_folder import read_manifest
from krea2_lite.files.shard_writer import ShardedWriter, parse_size, plan_shards

pytest.importorskip("optimum.quanto")

# Wide enough that an int8 folder (≈3 MB) splits into several 1MB shards.
CFG = Krea2Config.tiny(features=256, heads=8, kvheads=2, txtdim=128, txtheads=4, txtkvheads=4, layers=4)


def run_cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "krea2_lite.quantize", *map(str, args), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def tensors(folder):
    out = {}
    for file in sorted((folder / "transformer").glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} in two shards"
                out[key] = f.get_tensor(key)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("shard_src") / "krea2.safetensors"
    save_file(official_state_dict(diffusers_transformer(CFG, seed=3)), path)
    return path


@pytest.fixture(scope="module")
def folders(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_out")
    run_cli("--model", source, "--dtype", "int8", "--out", root / "single")
    run_cli("--model", source, "--dtype", "int8", "--out", root / "sharded", "--max-shard-size", "1MB")
    return root / "single", root / "sharded"


def test_sharded_output_has_the_same_tensors_as_one_file(folders):
    single, sharded = folders
    assert sorted(p.name for p in (single / "transformer").iterdir()) == ["model.safetensors",
                                                                          "quantization_map.json"]
    shards = sorted((sharded / "transformer").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((sharded / "transformer" / "model.safetensors.index.json").read_text())
    one, many = tensors(single), tensors(sharded)
    assert sorted(one) == sorted(many) == sorted(index["weight_map"])
    for key in one:
        assert one[key].dtype == many[key].dtype and torch.equal(one[key], many[key]), key
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in many.values())
    for shard in shards:  # each shard holds what the index says, within the limit
        with safe_open(str(shard), "pt") as f:
            assert all(index["weight_map"][k] == shard.name for k in f.keys())
        assert shard.stat().st_size <= 1_000_000 + 16_384  # + its header
    assert read_manifest(single)["format_version"] == 1  # unchanged for one file: older readers read it
    assert read_manifest(sharded)["format_version"] == 3  # an older reader would call the shards incomplete
    assert read_manifest(sharded)["components"]["transformer"]["shards"] == len(shards)


def test_sharded_folder_loads_to_the_same_model(folders, source):
    single, sharded = folders
    inputs = random_inputs(CFG, batch=1, txt_len=5, rows=4, cols=4)
    # bf16, as the folders were written (their scales are bf16 numbers)
    a, b = load_transformer(single, dtype=torch.bfloat16), load_transformer(sharded, dtype=torch.bfloat16)
    on_the_fly = load_transformer(source, dtype=torch.bfloat16, quant="int8")
    with torch.no_grad():
        expected = on_the_fly(*inputs)
        assert torch.equal(a(*inputs), expected) and torch.equal(b(*inputs), expected)


def test_an_old_single_file_folder_still_loads(folders, tmp_path):
    """A folder as krea2_lite wrote it before shards: the whole state through safetensors' save_file."""
    import shutil

    single, _ = folders
    old = tmp_path / "old"
    shutil.copytree(single, old)
    state = tensors(single)
    (old / "transformer" / "model.safetensors").unlink()
    save_file(state, str(old / "transformer" / "model.safetensors"), metadata={"format": "pt"})
    reloaded, current = load_transformer(old, dtype=torch.float32), load_transformer(single, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(reloaded.state_dict().values(), current.state_dict().values()))


def test_a_failed_write_leaves_nothing(source, tmp_path, monkeypatch, capsys):
    real_write, calls = ShardedWriter.write, []

    def failing(self, key, tensor):
        calls.append(key)
        if len(calls) == 40:  # mid-way: some shards are already complete
            raise OSError(28, "No space left on device")
        real_write(self, key, tensor)

    monkeypatch.setattr(ShardedWriter, "write", failing)
    out = tmp_path / "q"
    assert cli.main(["--model", str(source), "--dtype", "int8", "--out", str(out), "--quiet",
                     "--max-shard-size", "1MB"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert len(calls) == 40 and list(tmp_path.iterdir()) == []  # neither DIR nor the temporary folder


@pytest.mark.parametrize("text, size", [("500MB", 500_000_000), ("2GB", 2_000_000_000), ("1.5GiB", 1.5 * 2**30),
                                        ("2gb", 2_000_000_000), ("1048576", 1 << 20), (" 64 MB ", 64_000_000)])
def test_max_shard_size_parsing(text, size):
    assert parse_size(text) == int(size)


@pytest.mark.parametrize("text", ["", "abc", "-1GB", "2XB", "GB", "0", "100KB", "1e9"])
def test_bad_max_shard_size_is_one_clear_error(text):
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size(text)


def test_the_cli_rejects_a_bad_max_shard_size(source, tmp_path):
    proc = run_cli("--model", source, "--dtype", "int8", "--out", tmp_path / "o", "--max-shard-size", "100KB",
                   check=False)
    assert proc.returncode == 2 and "argument --max-shard-size: must be at least 1MB" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_plan_shards_keeps_order_and_puts_a_large_tensor_alone():
    layout = [("a", torch.int8, (600,)), ("b", torch.int8, (600,)), ("c", torch.int8, (5000,)), ("d", torch.int8, (1,))]
    assert [[k for k, *_ in shard] for shard in plan_shards(layout, 1000)] == [["a"], ["b"], ["c"], ["d"]]
    assert [[k for k, *_ in shard] for shard in plan_shards(layout, 10_000)] == [["a", "b", "c", "d"]]


def test_writer_refuses_a_tensor_out_of_plan(tmp_path):
    writer = ShardedWriter(tmp_path, "model", [("a", torch.float32, (2,))], 1 << 20)
    with pytest.raises(RuntimeError, match="expected 'a'"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="never came"):
        writer.close()


def test_blocks_go_where_the_placement_says():
    """device_blocks: the listed blocks on the device, the other blocks in host memory, the rest on the device."""
    from krea2_lite.loading.fill import placement

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    place = placement(cuda, {1, 2})
    assert [place(f"blocks.{i}") for i in range(4)] == [cpu, cuda, cuda, cpu]
    assert place("first") == place("txtfusion") == cuda
    assert placement(cuda, None)("blocks.3") == cuda


@pytest.fixture(scope="module")
def qwen_source(tmp_path_factory):
    from factories import qwen3vl_hub_folder

    return qwen3vl_hub_folder(tmp_path_factory.mktemp("qwen_hub"))


@pytest.mark.parametrize("quant", ["int8", None])
def test_text_encoder_written_layer_by_layer_equals_the_saved_one(qwen_source, tmp_path, quant):
    """The CLI's streaming text-encoder writer gives the tensors `save_text_encoder` writes, in shards."""
    from krea2_lite.loading import load_text_encoder
    from krea2_lite.loading.text_encoder_folder import save_text_encoder
    from krea2_lite.loading.quantized_writer import write_text_encoder

    whole = load_text_encoder(qwen_source, dtype=torch.bfloat16, quant=quant)
    save_text_encoder(whole, tmp_path / "saved")
    write_text_encoder(qwen_source, tmp_path / "streamed", quant, max_shard_bytes=20_000)
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()

    def read(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    saved, streamed = read(tmp_path / "saved"), read(tmp_path / "streamed")
    assert sorted(saved) == sorted(streamed)
    assert all(saved[k].dtype == streamed[k].dtype and torch.equal(saved[k], streamed[k]) for k in saved)
    reloaded = load_text_encoder(tmp_path / "streamed", dtype=torch.bfloat16)
    assert reloaded.quant_spec == whole.quant_spec
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), whole.state_dict().values()))
