"""Pieces of the batch job and the service that need no Ray: request checks, LoRA names, the manifest."""

import json
import os

import pytest

from krea2_lite.batch.jobs import jobs_from_file, plan_images
from krea2_lite.batch.manifest import read_manifest, still_valid, write_manifest
from krea2_lite.batch.storage import Storage, sha256
from krea2_lite.errors import PromptFileError
from krea2_lite.serve.requests import RequestError, parse_body


def parse(body, lora_dir=None, **extra):
    return parse_body(json.dumps(body).encode(), model_id="demo", lora_dir=lora_dir, max_images=4, **extra)


def test_a_request_takes_openai_names_and_rounds_sizes_as_the_pipeline_does():
    req = parse({"prompt": "a fox", "n": 2, "size": "70x64", "seed": 5, "model": "demo"})
    assert (req.num_images, req.width, req.height, req.seed) == (2, 80, 64, 5)
    assert parse({"prompt": "a", "steps": 3}).batch_key() == parse({"prompt": "b", "steps": 3, "seed": 9}).batch_key()
    assert parse({"prompt": "a", "steps": 3}).batch_key() != parse({"prompt": "a", "steps": 4}).batch_key()


@pytest.mark.parametrize("body, message", [
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({"prompt": "x", "num_images": 5}, "num_images must be in 1..4, got 5"),
    ({"prompt": "x", "guidance": -1}, "guidance must be a finite number in [0.0, 100.0], got -1.0"),
    ({"prompt": "x", "seed": -1}, "seed must be in 0.."),
    ({"prompt": "x", "steps": "8"}, "steps must be an int in 1..1000, got '8'"),
    ({"prompt": "x", "model": "other"}, "model 'other' is not served here"),
    ({"prompt": "x", "response_format": "url"}, "response_format must be 'b64_json'"),
    ({"prompt": "x", "size": "big"}, "size must be a 'WIDTHxHEIGHT' string"),
    ([1, 2], "the body must be a JSON object"),
])
def test_bad_fields_are_400_with_the_library_message(body, message):
    with pytest.raises(RequestError) as info:
        parse(body)
    assert info.value.status == 400 and str(info.value).startswith(message) and "\n" not in str(info.value)


def test_lora_names_cannot_leave_the_configured_folder(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "outside.safetensors", folder / "link.safetensors")
    req = parse({"prompt": "x", "loras": [{"name": "style", "scale": 0.5}]}, lora_dir=folder.resolve())
    assert req.loras == (("style", str(folder.resolve() / "style.safetensors"), 0.5),)
    for name in ("../outside", "/etc/passwd", "a/b", ".hidden", "link", "..", "style\\..\\x", 7):
        with pytest.raises(RequestError, match="LoRA"):
            parse({"prompt": "x", "loras": [{"name": name}]}, lora_dir=folder.resolve())
    with pytest.raises(RequestError, match="no LoRA folder"):
        parse({"prompt": "x", "loras": [{"name": "style"}]})


def test_manifest_keeps_only_entries_whose_file_and_request_match(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n\na cat\n")
    jobs = jobs_from_file(str(prompts), {"steps": 2})
    assert [(j["line"], j["seed"]) for j in jobs] == [(1, 0), (3, 0)]
    planned = plan_images(jobs, {"model": "demo", "dtype": "fp32"}, "p", True)
    images = [im for p in planned for im in p["images"]]
    assert [im["file"] for im in images] == ["p_0000.png", "p_0001.png"]
    storage = Storage(tmp_path / "out")
    storage.makedirs()
    storage.write("p_0000.png", b"png bytes")
    entry = dict(index=0, file="p_0000.png", sha256=sha256(b"png bytes"), request=images[0]["request"])
    write_manifest(storage, {0: entry})
    assert read_manifest(storage) == {0: entry} and still_valid(storage, entry, images[0])
    assert not still_valid(storage, entry, images[1])  # another request
    storage.write("p_0000.png", b"png bytez")
    assert not still_valid(storage, entry, images[0])  # damaged
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_a_bad_prompt_line_is_named_before_anything_loads(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": 5000}\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: steps must be in 1\.\.1000"):
        jobs_from_file(str(prompts), {})


def test_a_job_never_overwrites_its_prompt_file(tmp_path):
    from krea2_lite.batch import generate
    from krea2_lite.errors import UnsafeOutputError

    prompts = tmp_path / "manifest.jsonl"
    prompts.write_text('{"prompt": "a fox"}\n')
    with pytest.raises(UnsafeOutputError, match="would overwrite its input"):
        generate(prompts, tmp_path, model="demo", progress=False)
    assert prompts.read_text() == '{"prompt": "a fox"}\n'


def serve_args(*argv):
    import argparse

    from krea2_lite.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(["--model", "demo", *argv])


def test_serve_warns_loudly_on_a_public_address_without_a_token_and_hashes_the_token(tmp_path, capsys):
    from krea2_lite.cli.serve import config_from_args
    from krea2_lite.serve.config import token_hash

    assert config_from_args(serve_args()).host == "127.0.0.1" and "WARNING" not in capsys.readouterr().err
    config_from_args(serve_args("--host", "0.0.0.0"))
    assert "WITHOUT A TOKEN" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    config = config_from_args(serve_args("--host", "0.0.0.0", "--token-file", str(token)))
    assert config.token_sha256 == token_hash("s3cret-token-0123456789") and "WARNING" not in capsys.readouterr().err
    token.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16 characters"):
        config_from_args(serve_args("--token-file", str(token)))
    with pytest.raises(FileNotFoundError, match="--lora-dir"):
        config_from_args(serve_args("--lora-dir", str(tmp_path / "none")))


def test_a_pyarrow_uri_is_written_whole_and_read_back(tmp_path):
    import pickle

    storage = pickle.loads(pickle.dumps(Storage(f"file://{tmp_path}/remote/run1")))  # as a worker gets it
    assert storage.remote
    storage.makedirs()
    assert storage.read("a.png") is None
    storage.write("a.png", b"first")
    storage.write("a.png", b"second")
    assert storage.read("a.png") == b"second" and (tmp_path / "remote/run1/a.png").read_bytes() == b"second"
    write_manifest(storage, {1: {"index": 1, "file": "a.png"}})
    assert read_manifest(storage) == {1: {"index": 1, "file": "a.png"}}
    assert storage.display("a.png") == f"file://{tmp_path}/remote/run1/a.png"
