"""Every checkpoint layout loads to identical outputs; every bad input gets one clear error."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from krea2_lite import Krea2Config, load_transformer
from krea2_lite.files.checkpoint import open_checkpoint
from krea2_lite.errors import (CheckpointKeysError, CheckpointNotFoundError, CorruptCheckpointError,
                               NotKrea2CheckpointError, ShapeMismatchError, UnsafeCheckpointFormatError)
from factories import diffusers_transformer, official_state_dict, random_inputs

CFG = Krea2Config.tiny(features=96, heads=6, kvheads=2, layers=3)


@pytest.fixture(scope="module")
def reference():
    return diffusers_transformer(CFG, seed=11)


@pytest.fixture(scope="module")
def official(reference):
    return official_state_dict(reference)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, reference, official):
    root = tmp_path_factory.mktemp("layouts")
    paths = {}
    paths["official"] = root / "krea2.safetensors"
    save_file(official, paths["official"])
    paths["comfyui"] = root / "krea2_comfy.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in official.items()}, paths["comfyui"])
    paths["diffusers"] = root / "diffusers_transformer"
    reference.save_pretrained(paths["diffusers"])
    paths["diffusers_sharded"] = root / "sharded"
    reference.save_pretrained(paths["diffusers_sharded"], max_shard_size="60KB")
    pipeline = root / "pipeline"
    reference.save_pretrained(pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "Krea2Pipeline"}))
    paths["diffusers_pipeline"] = pipeline
    return paths


def _sha(path):
    digest = hashlib.sha256()
    for file in sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_key_mapping_round_trips_through_diffusers_converter(reference, official):
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    converted = convert_krea2_transformer_checkpoint_to_diffusers(dict(official))
    expected = reference.state_dict()
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


def test_all_layouts_load_to_identical_outputs(layouts, reference):
    img, context, t, pos = random_inputs(CFG, batch=2, txt_len=5, rows=3, cols=4)
    mask = torch.ones(2, 5 + 12, dtype=torch.bool)
    mask[0, 3:5] = False
    with torch.no_grad():
        expected = reference(img, context, t, pos, encoder_attention_mask=mask[:, :5], return_dict=False)[0]
        outputs = {}
        for name, path in layouts.items():
            before = _sha(path)
            model = load_transformer(path, dtype=torch.float32)
            assert model.config == CFG, name  # inferred from tensor shapes
            assert open_checkpoint(path).layout == name.split("_")[0]
            outputs[name] = model(img, context, t, pos, mask)
            assert _sha(path) == before, f"{name}: loading changed the source"
    first = outputs["official"]
    assert ((first - expected).abs().max() / expected.abs().max()) <= 1e-5
    for name, out in outputs.items():
        assert torch.equal(out, first), name


def test_dtype_policy_keeps_norms_and_tables_fp32(layouts):
    model = load_transformer(layouts["official"], dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["blocks.0.prenorm.scale"] == torch.float32
    assert dtypes["blocks.0.attn.qknorm.qnorm.scale"] == torch.float32
    assert dtypes["blocks.2.mod.lin"] == torch.float32
    assert dtypes["last.modulation.lin"] == torch.float32
    assert dtypes["blocks.1.attn.wq.weight"] == torch.bfloat16
    assert dtypes["first.bias"] == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    img, context, t, pos = random_inputs(CFG, batch=1, txt_len=3, rows=2, cols=2)
    with torch.no_grad():
        out = model(img, context, t, pos)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_in_place_changes_never_reach_the_file(layouts):
    path = layouts["official"]
    before = _sha(path)
    model = load_transformer(path, dtype=torch.float32)  # same dtype: memory-mapped, copy-on-write
    with torch.no_grad():
        model.blocks[0].attn.wq.weight.add_(1.0)
    del model
    assert _sha(path) == before


def test_explicit_config_must_match(layouts):
    model = load_transformer(layouts["official"], config=CFG, dtype=torch.float32)
    assert model.config == CFG
    with pytest.raises(ShapeMismatchError, match=r"blocks\.0\.attn\.wk\.weight.*given config"):
        load_transformer(layouts["official"], config=CFG.replace(kvheads=3))
    with pytest.raises(CheckpointKeysError, match="missing"):
        load_transformer(layouts["official"], config=CFG.replace(layers=4))


# ---- errors --------------------------------------------------------------------------------

class _Boom:
    """Unpickling this would create a marker file: proves pickle files are never loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_files_are_refused_unopened(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(UnsafeCheckpointFormatError, match="never opened"):
        load_transformer(path)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / f"diffusion_pytorch_model{suffix}").write_bytes(path.read_bytes())
    with pytest.raises(UnsafeCheckpointFormatError, match=suffix):
        load_transformer(folder)
    assert not marker.exists()


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        load_transformer(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="no model found"):
        load_transformer(tmp_path)


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="Hugging Face hub"):
        load_transformer("krea-test/does-not-exist")


def test_corrupt_files(tmp_path, layouts):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        load_transformer(empty)
    data = layouts["official"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_transformer(truncated)
    header = tmp_path / "header.safetensors"
    header.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64)
    with pytest.raises(CorruptCheckpointError, match="header"):
        load_transformer(header)
    text = tmp_path / "readme.safetensors"
    text.write_bytes(b"this is plainly a text file, not tensors\n" * 4)
    with pytest.raises(CorruptCheckpointError, match=str(text.name)):
        load_transformer(text)


def test_other_models_are_named(tmp_path):
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4),
               "single_blocks.0.linear1.weight": torch.zeros(4, 4)}, flux)
    with pytest.raises(NotKrea2CheckpointError, match="FLUX"):
        load_transformer(flux)


def test_missing_and_unexpected_tensors(tmp_path, official):
    broken = dict(official)
    del broken["blocks.1.attn.wq.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(broken, path)
    with pytest.raises(CheckpointKeysError, match=r"missing .*blocks\.1\.attn\.wq\.weight"):
        load_transformer(path)
    extra = dict(official)
    extra["blocks.0.attn.extra.weight"] = torch.zeros(2)
    path = tmp_path / "extra.safetensors"
    save_file(extra, path)
    with pytest.raises(CheckpointKeysError, match=r"unexpected .*attn\.extra"):
        load_transformer(path)


# ---- host memory ---------------------------------------------------------------------------

def test_loading_grows_rss_by_at_most_1_3x_the_file(tmp_path):
    """≥ 200 MB fp32 checkpoint, loaded in a fresh process: resident growth ≤ 1.3× the file."""
    path = tmp_path / "big.safetensors"
    script = textwrap.dedent(f"""
        import resource, sys, torch
        from krea2_lite import Krea2Config, Krea2Transformer, load_transformer
        from safetensors.torch import save_file
        cfg = Krea2Config(features=1024, tdim=256, txtdim=256, heads=8, kvheads=2, layers=4,
                          txtheads=4, txtkvheads=4, txtlayers=4, channels=16)
        if sys.argv[1] == "write":
            torch.manual_seed(0)
            save_file({{k: v.contiguous() for k, v in Krea2Transformer(cfg).state_dict().items()}}, {str(path)!r})
            tiny = Krea2Transformer(Krea2Config.tiny()).state_dict()
            save_file({{k: v.contiguous() for k, v in tiny.items()}}, {str(path.with_name("tiny.safetensors"))!r})
            sys.exit(0)
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        # A tiny load first: the modules the loader imports on first use are not the checkpoint's cost.
        load_transformer({str(path.with_name("tiny.safetensors"))!r}, dtype=torch.float32)
        base, base_peak = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = load_transformer({str(path)!r}, dtype=torch.float32)
        total = sum(float(p.double().sum()) for p in model.parameters())  # touch every page
        print(rss() - base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_peak)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", script, "write"], check=True, env=env)
    size = path.stat().st_size
    assert size >= 200e6
    out = subprocess.run([sys.executable, "-c", script, "load"], check=True, env=env,
                         capture_output=True, text=True).stdout.split()
    growth, peak_growth = int(out[0]), int(out[1])
    assert growth <= 1.3 * size, f"RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    assert peak_growth <= 1.3 * size, f"peak RSS grew {peak_growth / 1e6:.0f} MB for {size / 1e6:.0f} MB"
