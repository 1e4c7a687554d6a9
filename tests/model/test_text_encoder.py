"""Krea 2 text encoder: parity with diffusers' Krea2Pipeline.get_text_hidden_states, lazy loading, errors.

Everything is built locally: a byte-level BPE tokenizer trained here on the template + a few captions
(the Qwen pre-tokenizer regex and enough merges that every template word is one token, so the prefix
and suffix come to exactly 34 and 5 tokens, as with the real Qwen tokenizer, and the reference
constants are exercised unchanged), and a tiny random Qwen3-VL (36 text layers, hidden 32).
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open as real_safe_open
from safetensors.torch import save_file

import krea2_lite.files.safetensors_headers as files_mod  # where every safetensors file is opened
import krea2_lite.model.text_encoder as te
from factories import CAPTIONS, NUM_LAYERS, VOCAB, tiny_qwen3vl_config, train_tokenizer
from krea2_lite.errors import (CheckpointKeysError, CheckpointNotFoundError, NotKrea2CheckpointError,
                               ShapeMismatchError, UnsafeCheckpointFormatError)
from krea2_lite.loading.text_encoder import load_text_encoder
from krea2_lite.model.text_encoder import (DEFAULT_SELECT_LAYERS, PROMPT_TEMPLATE_PREFIX, PROMPT_TEMPLATE_SUFFIX,
                                           Krea2TextEncoder)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

LONG_PROMPT = " ".join(CAPTIONS * 3)
PROMPTS = ["a red fox sitting in the snow", "", "a cat", LONG_PROMPT]
MAX_LEN = 16  # short sequences keep the 36-layer reference fast


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    from diffusers import Krea2Pipeline
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration, Qwen3VLModel

    root = tmp_path_factory.mktemp("krea2_te")
    pipe_dir, hub_dir = root / "pipe", root / "hub"
    train_tokenizer().save_pretrained(pipe_dir / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(pipe_dir / "tokenizer")

    torch.manual_seed(0)
    model = Qwen3VLModel(tiny_qwen3vl_config()).eval()
    model.save_pretrained(pipe_dir / "text_encoder")

    # Hub layout: same language model inside a Qwen3VLForConditionalGeneration, untied lm_head, sharded.
    full = Qwen3VLForConditionalGeneration(tiny_qwen3vl_config(tie_word_embeddings=False)).eval()
    full.model.load_state_dict(model.state_dict())
    full.save_pretrained(hub_dir, max_shard_size="40KB")
    tokenizer.save_pretrained(hub_dir)
    assert (hub_dir / "model.safetensors.index.json").is_file()

    pipe = Krea2Pipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer, transformer=None)
    return {"root": root, "pipe_dir": pipe_dir, "hub_dir": hub_dir, "tokenizer": tokenizer,
            "model": model, "pipe": pipe}


@pytest.fixture(scope="session")
def encoder_fp32(env):
    return load_text_encoder(env["pipe_dir"] / "text_encoder", dtype=torch.float32)


def _reference(pipe, prompts, max_len):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.get_text_hidden_states(prompts, max_sequence_length=max_len, device=torch.device("cpu"))


def _encode(encoder, prompts, max_len):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encoder.encode(prompts, max_sequence_length=max_len)


# ---------------------------------------------------------------------- template constants
def test_tiny_tokenizer_reproduces_reference_template_constants(env, encoder_fp32):
    tok, pipe = env["tokenizer"], env["pipe"]
    assert pipe.prompt_template_encode_prefix == PROMPT_TEMPLATE_PREFIX
    assert pipe.prompt_template_encode_suffix == PROMPT_TEMPLATE_SUFFIX
    assert len(tok(PROMPT_TEMPLATE_PREFIX).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert len(tok(PROMPT_TEMPLATE_SUFFIX).input_ids) == pipe.prompt_template_encode_num_suffix_tokens == 5
    assert (encoder_fp32.prefix_tokens, encoder_fp32.suffix_tokens) == (34, 5)
    derived = load_text_encoder(env["pipe_dir"], dtype=torch.float32, prefix_tokens=None, suffix_tokens=None)
    assert (derived.prefix_tokens, derived.suffix_tokens) == (34, 5)


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("max_len", [MAX_LEN, 512])
def test_parity_with_diffusers_fp32(env, encoder_fp32, max_len):
    prompts = PROMPTS if max_len == MAX_LEN else PROMPTS[:2]  # default length: 2 prompts keep it fast
    ref_h, ref_m = _reference(env["pipe"], prompts, max_len)
    hidden, mask = _encode(encoder_fp32, prompts, max_len)
    assert hidden.shape == (len(prompts), max_len, len(DEFAULT_SELECT_LAYERS), 32) == ref_h.shape
    assert hidden.dtype == torch.float32 and mask.dtype == torch.bool
    assert torch.equal(mask, ref_m)
    assert (hidden - ref_h).abs().max().item() <= 1e-5
    # The batch really has padding in the middle and a truncated row.
    assert not mask[1].all() and mask[1, -5:].all()
    if len(prompts) == 4:
        assert mask[3].all()


def test_parity_is_sensitive_to_positions(env, encoder_fp32):
    """Naive 0..L-1 positions (what Qwen3VLModel would use by default) give different suffix states:
    the parity test above does check the mid-template padding handling."""
    batch = encoder_fp32.tokenize(PROMPTS[:3], MAX_LEN)
    naive = torch.arange(batch["input_ids"].shape[1]).expand(3, 3, -1)
    with torch.no_grad():
        good = encoder_fp32(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        bad = encoder_fp32(batch["input_ids"], batch["attention_mask"], naive)
    assert (good[:, -5:] - bad[:, -5:]).abs().max() > 1e-3
    assert batch["position_ids"].shape == (3, 3, MAX_LEN + 34)


def test_final_norm_tap_matches_reference(env):
    """transformers returns the *normed* state at hidden_states[num_hidden_layers]; a tap there gets it too."""
    select = (0, 1, NUM_LAYERS)
    encoder = load_text_encoder(env["pipe_dir"], dtype=torch.float32, select_layers=select)
    assert encoder.uses_final_norm and len(encoder.text_model.layers) == NUM_LAYERS
    from diffusers import Krea2Pipeline

    pipe = Krea2Pipeline(scheduler=None, vae=None, text_encoder=env["model"], tokenizer=env["tokenizer"],
                         transformer=None, text_encoder_select_layers=select)
    ref_h, ref_m = _reference(pipe, PROMPTS[:2], MAX_LEN)
    hidden, mask = _encode(encoder, PROMPTS[:2], MAX_LEN)
    assert torch.equal(mask, ref_m)
    assert (hidden - ref_h).abs().max().item() <= 1e-5


def test_default_taps_build_35_layers_and_no_norm(encoder_fp32):
    assert len(encoder_fp32.text_model.layers) == max(DEFAULT_SELECT_LAYERS) == 35
    assert encoder_fp32.text_model.norm is None and not encoder_fp32.uses_final_norm
    assert not any(p.is_meta for p in encoder_fp32.parameters())


def test_hub_layout_loads_to_identical_outputs(env, encoder_fp32):
    hub = load_text_encoder(env["hub_dir"], dtype=torch.float32)
    a = _encode(hub, PROMPTS, MAX_LEN)
    b = _encode(encoder_fp32, PROMPTS, MAX_LEN)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_pipeline_root_and_bf16_default(env):
    encoder = load_text_encoder(env["pipe_dir"])  # pipeline root, default dtype bfloat16
    assert encoder.dtype == torch.bfloat16
    assert encoder.text_model.rotary_emb.inv_freq.dtype == torch.float32
    hidden, mask = _encode(encoder, PROMPTS[:2], MAX_LEN)
    ref_h, ref_m = _reference(env["pipe"], PROMPTS[:2], MAX_LEN)
    assert hidden.dtype == torch.bfloat16 and torch.equal(mask, ref_m)
    err = (hidden.float() - ref_h).abs().max() / ref_h.abs().max()
    assert err < 5e-2


# ---------------------------------------------------------------------- lazy loading
class _SpyHandle:
    def __init__(self, handle, log):
        self._handle, self._log = handle, log

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_tensor(self, key):
        self._log.append(key)
        return self._handle.get_tensor(key)

    def get_slice(self, key):
        handle, log = self._handle, self._log

        class _Slice:  # the shape comes from the header; indexing would read data
            def get_shape(self):
                return handle.get_slice(key).get_shape()

            def __getitem__(self, item):
                log.append(key)
                return handle.get_slice(key)[item]

        return _Slice()


@pytest.mark.parametrize("layout, prefix", [("pipe", "language_model."), ("hub", "model.language_model.")])
def test_reads_only_the_tapped_layers(env, monkeypatch, layout, prefix):
    read: list[str] = []
    monkeypatch.setattr(files_mod, "safe_open", lambda *a, **k: _SpyHandle(real_safe_open(*a, **k), read))
    path = env["pipe_dir"] / "text_encoder" if layout == "pipe" else env["hub_dir"]
    load_text_encoder(path, dtype=torch.float32)

    assert len(read) == len(set(read))
    expected = {f"{prefix}embed_tokens.weight"}
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
                 "self_attn.k_norm.weight"]
    expected |= {f"{prefix}layers.{i}.{name}" for i in range(35) for name in per_layer}
    assert set(read) == expected
    assert not any("visual" in k or "lm_head" in k or k == f"{prefix}norm.weight" or ".layers.35." in k
                   for k in read)
    # ... while the checkpoint does hold them.
    if layout == "hub":
        weight_map = json.loads((env["hub_dir"] / "model.safetensors.index.json").read_text())["weight_map"]
        assert "lm_head.weight" in weight_map and f"{prefix}layers.35.mlp.up_proj.weight" in weight_map
        assert any(k.startswith("model.visual.") for k in weight_map) and f"{prefix}norm.weight" in weight_map


# ---------------------------------------------------------------------- warnings and errors
def test_overlong_prompt_warns_with_dropped_count(env, encoder_fp32):
    n_full = len(env["tokenizer"](PROMPT_TEMPLATE_PREFIX + LONG_PROMPT).input_ids)
    dropped = n_full - (MAX_LEN + 34 - 5)
    assert dropped > 0
    with pytest.warns(UserWarning, match=rf"prompt 1: {dropped} tokens dropped"):
        encoder_fp32.encode(["a cat", LONG_PROMPT], max_sequence_length=MAX_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder_fp32.encode(["a cat"], max_sequence_length=MAX_LEN)  # no warning when it fits


def _copy_config(env, dst, **changes):
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((env["pipe_dir"] / "text_encoder" / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(env["pipe_dir"] / "tokenizer", dst, dirs_exist_ok=True)
    return dst


def test_other_model_family_is_rejected(env, tmp_path):
    folder = _copy_config(env, tmp_path / "t5", model_type="t5", architectures=["T5EncoderModel"])
    save_file({"shared.weight": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    with pytest.raises(NotKrea2CheckpointError, match="t5"):
        load_text_encoder(folder)
    qwen25 = _copy_config(env, tmp_path / "q25", model_type="qwen2_5_vl")
    with pytest.raises(NotKrea2CheckpointError, match="qwen2_5_vl"):
        load_text_encoder(qwen25)


def test_pickle_weights_are_refused(env, tmp_path):
    folder = _copy_config(env, tmp_path / "bin")
    # Would run code if it were ever unpickled.
    (folder / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'exit 1'\ntR.")
    with pytest.raises(UnsafeCheckpointFormatError, match="pytorch_model.bin"):
        load_text_encoder(folder)
    with pytest.raises(UnsafeCheckpointFormatError):
        load_text_encoder(folder / "pytorch_model.bin")


def test_missing_path_and_missing_keys_and_bad_shapes(env, tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        load_text_encoder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):  # CheckpointNotFoundError is a FileNotFoundError
        load_text_encoder(tmp_path)

    state = {}
    with real_safe_open(str(env["pipe_dir"] / "text_encoder" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)

    missing = _copy_config(env, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if ".layers.7." not in k}, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointKeysError, match="layers.7"):
        load_text_encoder(missing)

    # Unneeded tensors may be absent: a checkpoint without the vision tower, norm or last layer loads.
    pruned = _copy_config(env, tmp_path / "pruned")
    save_file({k: v for k, v in state.items() if not (k.startswith("visual.") or ".layers.35." in k
                                                      or k == "language_model.norm.weight")},
              str(pruned / "model.safetensors"))
    load_text_encoder(pruned, dtype=torch.float32)

    bad = _copy_config(env, tmp_path / "bad")
    state = dict(state)
    state["language_model.layers.3.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ShapeMismatchError, match="layers.3.mlp.up_proj"):
        load_text_encoder(bad)


def test_invalid_arguments(env, encoder_fp32):
    with pytest.raises(ValueError, match="select_layers"):
        load_text_encoder(env["pipe_dir"], select_layers=(2, 37))
    with pytest.raises(ValueError, match="max_sequence_length"):
        encoder_fp32.encode(["a cat"], max_sequence_length=0)
    with pytest.raises(ValueError, match="prompts"):
        encoder_fp32.encode([], max_sequence_length=8)
    bare = Krea2TextEncoder(encoder_fp32.config.__class__(**{**encoder_fp32.config.to_dict(),
                                                            "num_hidden_layers": NUM_LAYERS}))
    with pytest.raises(ValueError, match="tokenizer"):
        bare.encode(["a cat"])
