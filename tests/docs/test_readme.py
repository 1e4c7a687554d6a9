"""The README stays a front door (under 15,000 characters, depth in docs/), and every relative link in it
and in docs/*.md points at a file that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT = 15_000
# [text](target) — the target up to a space or ")" ; images too. Angle-bracket targets are not used here.
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_short():
    size = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert size <= README_LIMIT, f"README.md is {size} characters; move depth into docs/ (limit {README_LIMIT})"


def test_readme_opens_with_the_two_commands():
    """.ci/run runs the README's test command; the first code block holds the demo and the test commands."""
    block = (ROOT / "README.md").read_text(encoding="utf-8").split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert commands[0].endswith("--model demo --output circle.png") and "python -m krea2_lite generate" in commands[0]
    assert commands[1] == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    broken = [t for t in relative_links(path) if not (path.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


def test_the_link_checker_sees_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('see [a](docs/a.md#x), [b](https://example.com), [c](#top), ![d](img.png "t")\n'
                    "```\n[e](not/a/link.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["docs/a.md#x", "img.png"]
