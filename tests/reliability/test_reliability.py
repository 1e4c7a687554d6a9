"""Failure cases not covered beside their features: each gives one documented exception whose
message names the cause, and leaves nothing half-written.

The rest of the battery lives with the feature it guards:
  loading        tests/files/test_checkpoint.py (missing path, empty folder, .ckpt/.pt/.pth/.bin refused
                 unopened, zero-byte, truncated, corrupt header, FLUX, missing/unexpected tensors,
                 explicit-config shape), tests/model/test_text_encoder.py (another text-encoder family,
                 .bin), tests/model/test_vae.py (VAE config and key mismatches)
  quantized dirs tests/quantize/test_quantize.py (newer format version, manifest vs tensors, existing --out,
                 SIGKILL mid-write, no disk space up front)
  generation     tests/pipeline/test_pipeline.py (sizes, steps, guidance, num_images, negative prompts,
                 latents shape and NaN, empty prompt, determinism), tests/pipeline/test_sampling.py (NaN step)
  memory         tests/offload/test_offload.py (a CUDA OOM re-plans once and gives the same image; a second OOM
                 is a DeviceMemoryError; no plan fits / not enough host RAM → MemoryPlanError)

Round two (issue 20), one file per class of fault:
  JSON           tests/reliability/test_reliability_json.py (krea2_lite/files/jsonfile.py: not JSON, wrong JSON type,
                 missing keys, not UTF-8 in model_index.json, scheduler, transformer / text encoder /
                 VAE config.json, tokenizer files, shard index, manifest, PEFT adapter_config.json)
  safetensors    tests/reliability/test_reliability_safetensors.py (krea2_lite/files/: a tensor in two
                 unindexed files, weight_map obeyed, index naming a tensor its shard lacks, byte length vs
                 shape × dtype on the float and the quantizing path, int / bool tensors where floats
                 belong in transformer, text encoder and VAE, ComfyUI double names, dtype= arguments)
  arguments      tests/test_checks.py (krea2_lite/checks.py: steps, seeds, mu,
                 max_sequence_length, guidance, num_images, latents type / device, vram_gb, device,
                 a folder's own defaults, scheduler shift settings)
  finite         tests/reliability/test_reliability_finite.py (krea2_lite/finite_checks.py: NaN/inf VAE statistics and
                 weights, a degenerate schedule, decoder overflow, the transformer's NaN step)
  paths          tests/cli/test_quantize_output.py (krea2_lite/cli/quantize_output.py: --out equal to,
                 containing, inside the source, through symlinks, `.`, `~`, "", `/`; --force on foreign
                 folders and files; SIGINT / SIGTERM cleanup; --include of biased linears; quantized
                 folders keep the source's defaults)
  CLI / order    tests/cli/test_error_contract.py (krea2_lite/cli/error_contract.py: one `error:` line and exit 2;
                 exit 1 for internal errors; KREA2_LITE_DEBUG; the named model checked before defaults)
"""

import errno
import pathlib

import pytest
import torch

from krea2_lite.errors import DeviceMemoryError
from krea2_lite.pipeline import Krea2Pipeline
from krea2_lite.cli import quantize as quantize_cli
from factories import CAPTIONS, tiny_diffusers_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability") / "pipe"
    tiny_diffusers_pipeline().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def pipe(folder):
    return Krea2Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, progress=False)


def test_disk_full_while_writing_leaves_no_folder(folder, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantize_cli, "write_transformer", full)
    out = tmp_path / "q"
    assert quantize_cli.main(["--model", str(folder / "transformer"), "--dtype", "int8", "--out", str(out),
                              "--quiet"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither DIR nor the temporary folder


def test_read_only_output_location(folder, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):  # root ignores chmod, so deny the way a read-only disk would
        if locked in self.parents or self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert quantize_cli.main(["--model", str(folder / "transformer"), "--dtype", "int8",
                              "--out", str(locked / "q"), "--quiet"]) == 2
    assert "Permission denied" in capsys.readouterr().err
    assert not locked.exists()


def test_nan_in_sampling_names_the_step(pipe, monkeypatch):
    calls = []
    real = pipe.transformer.forward

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(pipe.transformer, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="step 3 of 4"):
        pipe("a cat", width=32, height=32, steps=4, guidance=0.0, progress=False, max_sequence_length=16)


def test_out_of_memory_gets_a_clear_message(pipe, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # This pipeline's memory is mostly activations, so offloading cannot shrink it: after the OOM the
    # re-plan finds nothing smaller and says so (tests/offload/test_offload.py covers the successful re-plan).
    monkeypatch.setattr(pipe.transformer, "forward", oom)
    with pytest.raises(DeviceMemoryError, match=r"generating 2 image\(s\) at 32×48 with CFG: CUDA out of memory"
                                                r".*no smaller memory plan.*quant='int4'"):
        pipe("a cat", width=32, height=48, steps=2, guidance=2.0, num_images=2, progress=False,
             max_sequence_length=16)  # short prompts: the battery stays fast


def test_over_long_prompt_warns_and_generates(pipe):
    with pytest.warns(UserWarning, match="tokens dropped"):
        out = pipe(" ".join(CAPTIONS * 40), width=32, height=32, steps=1, guidance=0.0, max_sequence_length=16,
                   progress=False)
    assert out.images[0].size == (32, 32)


def test_vae_of_another_latent_width_is_refused(folder, tmp_path):
    from factories import tiny_vae

    tiny_vae(z_dim=8).save_pretrained(tmp_path / "vae8")
    with pytest.raises(ValueError, match="16 latent channels but the VAE .* has z_dim=8"):
        Krea2Pipeline.from_pretrained(folder, vae=tmp_path / "vae8", device="cpu", progress=False)
