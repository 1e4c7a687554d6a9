"""Issue 29, class 1: output folders never eat a user's files (quantize --out, generate --output)."""

import os
import threading

import pytest

from krea2_lite.cli import quantize_output
from krea2_lite.cli.generate_outputs import plan_outputs
from krea2_lite.cli.subcommands import build_parser
from krea2_lite.files import no_replace
from krea2_lite.files.leftovers import partial_name, remove_dead_leftovers
from krea2_lite.files.no_replace import rename_noreplace
from reliability_fixtures import copy_of, pipeline_folder, snapshot
from r3_helpers import (FAST, built_pipeline, dead_pid, generate_refused, no_load, one_error_line, quantize,  # noqa: F401
                        quantize_refused, source_transformer)

_BUILT = {}


@pytest.fixture(scope="module")
def earlier_output(tmp_path_factory):
    """One quantize output of ours (built once), copied per test."""
    root = tmp_path_factory.mktemp("earlier")
    src = copy_of(pipeline_folder() / "transformer", root / "src")
    assert quantize("--model", src, "--dtype", "int8", "--out", root / "out") == 0
    return root / "out"


@pytest.fixture
def ours(tmp_path, earlier_output):
    src = source_transformer(tmp_path)
    out = copy_of(earlier_output, tmp_path / "out")
    return src, out


# ---- the atomic final rename -----------------------------------------------------------------
@pytest.mark.parametrize("mechanism", ["renameat2", "claim"])
def test_rename_noreplace_refuses_an_existing_folder(tmp_path, monkeypatch, mechanism):
    if mechanism == "claim":
        monkeypatch.setattr(no_replace, "_RENAMEAT2", None)
    src, dst = tmp_path / "new", tmp_path / "dst"
    src.mkdir(); (src / "a").write_text("new")
    dst.mkdir(); (dst / "mine").write_text("user")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert (dst / "mine").read_text() == "user" and (src / "a").exists() and not (dst / "a").exists()


@pytest.mark.parametrize("mechanism", ["renameat2", "claim"])
def test_rename_noreplace_moves_onto_a_free_name(tmp_path, monkeypatch, mechanism):
    if mechanism == "claim":
        monkeypatch.setattr(no_replace, "_RENAMEAT2", None)
    src = tmp_path / "new"
    src.mkdir(); (src / "a").write_text("x")
    used = rename_noreplace(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "a").read_text() == "x" and not src.exists()
    assert used in ("renameat2", "claim")


def test_out_appearing_meanwhile_is_not_replaced_without_force(tmp_path, capsys, monkeypatch):
    src = source_transformer(tmp_path)
    out = tmp_path / "out"
    real = quantize_output.install

    def racing(tmp, target, force=False):
        target.mkdir()  # another run finished first
        (target / "theirs.txt").write_text("other run")
        return real(tmp, target, force)

    monkeypatch.setattr(quantize_output, "install", racing)
    assert quantize("--model", src, "--dtype", "int8", "--out", out) == 2
    one_error_line(capsys, "appeared while this run worked")
    assert sorted(os.listdir(out)) == ["theirs.txt"]
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_two_concurrent_installs_only_one_wins(tmp_path):
    out = tmp_path / "out"
    folders = []
    for i in range(2):
        folder = tmp_path / partial_name("out", pid=100000 + i)
        folder.mkdir(); (folder / "run").write_text(str(i))
        folders.append(folder)
    results = []

    def go(folder):
        try:
            quantize_output.install(folder, out, force=False)
            results.append("ok")
        except FileExistsError:
            results.append("refused")

    threads = [threading.Thread(target=go, args=(f,)) for f in folders]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == ["ok", "refused"]


# ---- --force replaces only what the manifest says we wrote ---------------------------------
@pytest.mark.parametrize("extra, named", [("MY_NOTES.txt", "MY_NOTES.txt"), ("my_loras/", "my_loras/"),
                                         ("my_loras/style.safetensors", "my_loras/"),
                                         ("transformer/extra.safetensors", "transformer/extra.safetensors")])
def test_force_stops_at_a_user_file(ours, capsys, extra, named):
    src, out = ours
    target = out / extra.rstrip("/")
    if extra.endswith("/"):
        target.mkdir()
    else:
        target.parent.mkdir(exist_ok=True)
        target.write_text("the user's")
    err = quantize_refused(capsys, out.parent, "--model", src, "--dtype", "fp8", "--out", out, "--force",
                           match="never deletes a file of yours")
    assert named in err
    assert not [n for n in os.listdir(out.parent) if ".partial-" in n or ".old-" in n]


def test_force_replaces_an_unchanged_output_of_ours(ours):
    src, out = ours
    assert quantize("--model", src, "--dtype", "fp8", "--out", out, "--force") == 0
    assert '"fp8"' in (out / "krea2_lite.json").read_text()
    assert not [n for n in os.listdir(out.parent) if ".partial-" in n or ".old-" in n]


def test_force_refuses_a_manifest_with_a_forged_written_list(ours, capsys):
    src, out = ours
    manifest = (out / "krea2_lite.json").read_text().replace('"written": [', '"written": "everything", "x": [')
    (out / "krea2_lite.json").write_text(manifest)
    quantize_refused(capsys, out.parent, "--model", src, "--dtype", "fp8", "--out", out, "--force",
                     match="unreadable or hand-edited")


# ---- leftovers: exact names, dead processes only --------------------------------------------
@pytest.mark.parametrize("name", ["q?", "[a]", "q*"])
def test_stale_cleanup_never_globs_the_users_name(tmp_path, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "krea2_lite.json").write_text("{}")
    other = tmp_path / f".qa.old-{dead_pid()}"  # another output's backup: must survive
    other.mkdir(); (other / "krea2_lite.json").write_text("{}")
    before = snapshot(other)
    quantize_output.remove_stale(tmp_path / name)
    assert snapshot(other) == before


def test_any_quantize_run_removes_dead_runs_leftovers(tmp_path):
    src = source_transformer(tmp_path)
    dead = tmp_path / partial_name("other", pid=dead_pid())
    dead.mkdir(); (dead / "big.bin").write_bytes(b"x" * 1000)
    alive = tmp_path / partial_name("busy", pid=1)  # pid 1 is alive: its work is kept
    alive.mkdir()
    notes = tmp_path / ".notes.partial-draft"  # not a pid: not ours, kept
    notes.write_text("mine")
    assert quantize("--model", src, "--dtype", "int8", "--out", tmp_path / "new") == 0
    assert not dead.exists() and alive.exists() and notes.read_text() == "mine"


def test_generate_removes_dead_leftovers_before_loading(tmp_path, capsys, no_load):
    dead = tmp_path / partial_name("img.png", pid=dead_pid(), middle=".abcd1234")
    dead.write_bytes(b"half a png")
    mine = tmp_path / "img_old.png"
    mine.write_bytes(b"user image")
    from krea2_lite.cli.subcommands import main

    assert main(["generate", "x", *FAST, "--output", str(tmp_path / "img.png")]) == 1  # the stub refused to load
    capsys.readouterr()
    assert len(no_load) == 1  # the leftover was gone before the load was even tried
    assert not dead.exists() and mine.read_bytes() == b"user image"


def test_remove_dead_leftovers_keeps_live_and_foreign_names(tmp_path):
    (tmp_path / ".a.partial-1").mkdir()
    (tmp_path / "a.partial-99999999").write_text("no dot: not ours")
    pid = dead_pid()
    (tmp_path / f".b.partial-{pid}").write_text("dead")
    removed = remove_dead_leftovers(tmp_path)
    assert [p.name for p in removed] == [f".b.partial-{pid}"]
    assert sorted(os.listdir(tmp_path)) == [".a.partial-1", "a.partial-99999999"]


# ---- generate --output: checked like a typed path, before the load --------------------------
@pytest.mark.parametrize("template", ["{index:/>4}.png", "{seed:/^12}.png", "sub/{index:/<3}x.png"])
def test_format_specs_cannot_add_separators(tmp_path, capsys, no_load, template):
    generate_refused(capsys, tmp_path, ["x", *FAST, "--output", str(tmp_path / template)],
                     match="may not add path separators")
    assert not no_load


@pytest.mark.parametrize("output", ["", "   "])
def test_empty_output_is_an_error(tmp_path, capsys, no_load, output):
    generate_refused(capsys, tmp_path, ["x", *FAST, "--output", output], match="--output is empty")


def test_template_on_an_existing_folder_name(tmp_path, capsys, no_load):
    (tmp_path / "out{index}").mkdir()
    generate_refused(capsys, tmp_path, ["x", *FAST, "--output", str(tmp_path / "out{index}")],
                     match="both a template and an existing folder")


def test_formatted_name_of_an_existing_folder(tmp_path, capsys, no_load):
    (tmp_path / "img0.png").mkdir()
    generate_refused(capsys, tmp_path, ["x", *FAST, "--output", str(tmp_path / "img{index}.png")],
                     match="existing folder")


def test_file_name_too_long(tmp_path, capsys, no_load):
    generate_refused(capsys, tmp_path, ["x", *FAST, "--output", str(tmp_path / ("n" * 240 + ".png"))],
                     match="too long")


def test_parent_is_a_file(tmp_path, capsys, no_load):
    (tmp_path / "notes.txt").write_text("mine")
    generate_refused(capsys, tmp_path, ["x", *FAST, "--output", str(tmp_path / "notes.txt" / "a.png")],
                     match="is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path, capsys, no_load):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        generate_refused(capsys, tmp_path, ["x", *FAST, "--output", str(folder / "a.png")], match="cannot write")
    finally:
        folder.chmod(0o700)


def test_bad_format_spec_is_one_line(tmp_path, capsys, no_load):
    generate_refused(capsys, tmp_path, ["x", *FAST, "--output", str(tmp_path / "{index:q}.png")],
                     match="--output")


def _planned(tmp_path, output, images=1):
    args = build_parser().parse_args(["generate", "x", "--output", str(tmp_path / output)])
    return plan_outputs(args, [{"seed": 0, "num_images": images}])


@pytest.mark.parametrize("output, expected", [("a{{b}}.png", "a{b}.png"), ("a{{b}}_{index}.png", "a{b}_0.png")])
def test_doubled_braces_always_mean_one_brace(tmp_path, output, expected):
    assert _planned(tmp_path, output)[0][0].name == expected


def test_template_stays_in_its_literal_folder(tmp_path):
    paths = _planned(tmp_path, "sub/{stem}_{index:03d}.png", images=3)[0]
    assert {p.parent for p in paths} == {tmp_path / "sub"}
    assert [p.name for p in paths] == ["sample_000.png", "sample_001.png", "sample_002.png"]
