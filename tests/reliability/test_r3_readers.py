"""Issue 29, class 2: untrusted text goes through one guarded reader per kind, with limits
(JSON, PNG text chunks, prompt files, LoRA patterns, the kernel tuning table)."""

import json
import os
import re
import struct
import threading
import time
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from krea2_lite import read_png_metadata, save_png
from krea2_lite.cli.prompt_files import MAX_PROMPT_FILE_BYTES, read_prompt_file
from krea2_lite.errors import JsonFileError, LoraError, MetadataError, PromptFileError
from krea2_lite.files.jsonfile import MAX_INT_DIGITS, MAX_JSON_DEPTH, read_json
from krea2_lite.files.patterns import PatternError, compile_pattern, matches, matches_module
from krea2_lite.files.png_text import MAX_TEXT_BYTES, MAX_TEXT_CHUNKS
from krea2_lite.kernels.tuning import TuningTableError, read_table
from krea2_lite.lora.formats import AlphaSource
from r3_helpers import FAST, built_pipeline, generate_refused, no_load  # noqa: F401


# ---- JSON: depth, digits, size -------------------------------------------------------------
@pytest.mark.parametrize("text, match", [("[" * 100000, "not valid JSON"),
                                         ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "deeper than"),
                                         ('{"a": ' + "9" * 5000 + "}", "digits"),
                                         ('{"a": ' + "9" * (MAX_INT_DIGITS + 1) + "}", "digits")])
def test_hostile_json_is_a_typed_error_naming_the_file(tmp_path, text, match):
    path = tmp_path / "model_index.json"
    path.write_text(text)
    with pytest.raises(JsonFileError, match=re.escape(str(path)) + ".*" + match):
        read_json(path, expect=None)


def test_json_at_the_limits_reads(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text('{"a": ' + "[" * (MAX_JSON_DEPTH - 1) + "9" * MAX_INT_DIGITS + "]" * (MAX_JSON_DEPTH - 1) + "}")
    assert read_json(path)["a"]


def test_tuning_table_goes_through_the_json_reader(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text('{"gpus": ' + "[" * 200 + "]" * 200 + "}")
    with pytest.raises(TuningTableError, match=re.escape(str(path))):
        read_table(path)


# ---- PNG text chunks ---------------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(chunks: list[bytes], width=1, height=1) -> bytes:
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"\0\0\0\0" * height))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + idat + _chunk(b"IEND", b"")


META = json.dumps({"prompt": "a fox", "seed": 1, "steps": 2, "guidance": 0, "width": 64, "height": 64,
                   "model": "demo"}).encode()


def test_huge_header_is_read_without_decoding_pixels(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png([_chunk(b"tEXt", b"krea2_lite\0" + META)], width=20000, height=10000))
    assert read_png_metadata(path)["prompt"] == "a fox"  # PIL: DecompressionBombError


@pytest.mark.parametrize("chunk, match", [
    (_chunk(b"zTXt", b"krea2_lite\0\x05" + zlib.compress(META)), "compression method"),
    (_chunk(b"iTXt", b"krea2_lite\0\x01\x00\0\0" + zlib.compress(b"{" * (MAX_TEXT_BYTES + 10))), "decompresses to more"),
    (_chunk(b"iTXt", b"krea2_lite\0\x01\x07\0\0" + zlib.compress(META)), "compression method"),
    (_chunk(b"zTXt", b"krea2_lite\0\x00" + b"not zlib"), "damaged compressed text"),
    (_chunk(b"tEXt", b"\0" + META), "no valid keyword"),
])
def test_hostile_text_chunks_are_metadata_errors(tmp_path, chunk, match):
    path = tmp_path / "bad.png"
    path.write_bytes(_png([chunk]))
    with pytest.raises(MetadataError, match=re.escape(str(path)) + ".*" + match):
        read_png_metadata(path)


def test_too_many_text_chunks(tmp_path):
    path = tmp_path / "many.png"
    path.write_bytes(_png([_chunk(b"tEXt", b"k%d\0v" % i) for i in range(MAX_TEXT_CHUNKS + 1)]))
    with pytest.raises(MetadataError, match="more than"):
        read_png_metadata(path)


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(_png([_chunk(b"tEXt", b"krea2_lite\0" + META)])[:-20])
    with pytest.raises(MetadataError, match="truncated"):
        read_png_metadata(path)


def test_from_png_with_a_hostile_chunk_is_one_line_before_loading(tmp_path, capsys, no_load):
    path = tmp_path / "bad.png"
    path.write_bytes(_png([_chunk(b"zTXt", b"krea2_lite\0\x05" + zlib.compress(META))]))
    generate_refused(capsys, tmp_path, ["--from-png", str(path), "--device", "cpu", "--quiet"],
                     match="compression method")


def test_save_png_never_writes_what_it_cannot_read_back(tmp_path):
    with pytest.raises(MetadataError, match="nothing written"):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "big.png", {"prompt": "x" * (MAX_TEXT_BYTES + 1), "seed": 1,
                                                                  "steps": 2, "guidance": 0.0, "width": 4, "height": 4})
    assert os.listdir(tmp_path) == []


def test_save_png_round_trips_a_large_prompt(tmp_path):
    meta = {"prompt": "word " * 50000, "seed": 1, "steps": 2, "guidance": 0.0, "width": 4, "height": 4}
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "ok.png", meta)
    assert read_png_metadata(path)["prompt"] == meta["prompt"]


def test_pil_written_ztxt_reads(tmp_path):
    info = PngInfo()
    info.add_text("krea2_lite", META.decode(), zip=True)
    Image.new("RGB", (2, 2)).save(tmp_path / "z.png", pnginfo=info)
    assert read_png_metadata(tmp_path / "z.png")["seed"] == 1


# ---- prompt files ------------------------------------------------------------------------------
def test_dev_zero_stops_at_the_size_limit():
    start = time.time()
    with pytest.raises(PromptFileError, match="larger than"):
        read_prompt_file("/dev/zero")
    assert time.time() - start < 10


def test_a_file_over_the_limit(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"a\n" * (MAX_PROMPT_FILE_BYTES // 2 + 1))
    with pytest.raises(PromptFileError, match=re.escape(str(path)) + ".*larger than"):
        read_prompt_file(path)


@pytest.mark.parametrize("separator", ["\u2028", "\x0c", "\x1e", "\x85", "\u2029"])
def test_only_newline_splits_a_text_line(tmp_path, separator):
    path = tmp_path / "p.txt"
    path.write_text(f"a fox{separator}in snow\nsecond\r\n", encoding="utf-8")
    jobs = read_prompt_file(path)
    assert [j["prompt"] for j in jobs] == [f"a fox{separator}in snow", "second"]


def test_raw_u2028_inside_a_jsonl_string(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a\u2028b"}\n', encoding="utf-8")
    assert read_prompt_file(path)[0]["prompt"] == "a\u2028b"


@pytest.mark.parametrize("name", ["p.ndjson", "p.NDJSON", "prompts"])
def test_jsonl_by_suffix_or_content(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"prompt": "a", "seed": 3}\n\n{"prompt": "b"}\n')
    assert [(j["prompt"], j.get("seed")) for j in read_prompt_file(path)] == [("a", 3), ("b", None)]


def test_explicit_format_wins(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n')
    assert read_prompt_file(path, "txt")[0]["prompt"] == '{"prompt": "a"}'


def test_process_substitution_fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "w") as fh:
            fh.write('{"prompt": "from a pipe", "steps": 3}\n')

    thread = threading.Thread(target=writer)
    thread.start()
    jobs = read_prompt_file(fifo)
    thread.join(5)
    assert jobs[0]["prompt"] == "from a pipe" and jobs[0]["steps"] == 3


def test_nul_bytes_are_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a\0b\n")
    with pytest.raises(PromptFileError, match="NUL byte"):
        read_prompt_file(path)


def test_deep_jsonl_line_names_file_and_line(tmp_path, capsys, no_load):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "seed": ' + "9" * 5000 + "}\n")
    generate_refused(capsys, tmp_path, ["--prompts", str(path), *FAST], match="p.jsonl:2")


# ---- LoRA patterns -----------------------------------------------------------------------------
def _alpha(tmp_path, config):
    return AlphaSource(tmp_path / "lora.safetensors", {"lora_adapter_metadata": json.dumps(config)})


@pytest.mark.parametrize("pattern", ["([a-z_.0-9]+)+!", "(", "(a|b)*c", "a{1,100}", r"(\w+)\1", "(?=x)y", "[abc"])
def test_unsupported_patterns_are_lora_errors_naming_file_and_key(tmp_path, pattern):
    with pytest.raises(LoraError, match=r"lora\.safetensors: alpha_pattern"):
        _alpha(tmp_path, {"lora_alpha": 8, "alpha_pattern": {pattern: 4}})


def test_rank_pattern_is_checked_too(tmp_path):
    with pytest.raises(LoraError, match="rank_pattern"):
        _alpha(tmp_path, {"lora_alpha": 8, "rank_pattern": {"(x+)+": 4}})


def test_supported_patterns_agree_with_re():
    patterns = [r"blocks\.\d+\.attn\.(wq|wk)", r".*\.w[qkv]", r"[^.]+\.mlp\..*", "a?b+c*", r"(?:x|y)z", "^ab$"]
    names = ["blocks.3.attn.wq", "blocks.12.attn.wv", "b.mlp.up", "x.y.mlp.z", "bbc", "abbcc", "xz", "yz", "ab"]
    for pattern in patterns:
        compiled = compile_pattern(pattern)
        for name in names:
            assert matches(compiled, name) == bool(re.fullmatch(pattern, name)), (pattern, name)


def test_matching_is_linear_time():
    compiled = compile_pattern("[a-z_.0-9]+[a-z_.0-9]*[a-z.]*[a-z]*!")
    start = time.time()
    assert not matches_module(compiled, "a" * 3000)
    assert time.time() - start < 5


def test_alpha_pattern_applies(tmp_path):
    source = _alpha(tmp_path, {"lora_alpha": 8, "alpha_pattern": {r"blocks\.1\..*": 2}})
    assert source.for_module("blocks.1.attn.wq", 4) == 2 and source.for_module("blocks.2.attn.wq", 4) == 8


def test_pattern_length_limit():
    with pytest.raises(PatternError, match="longer than"):
        compile_pattern("a" * 10000)
