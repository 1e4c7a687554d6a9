"""The README's card × RAM table is what the planner says today (benchmarks/plan_table.py)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _plan_table():
    from factories import load_benchmark

    return load_benchmark("plan_table")


def test_readme_table_matches_the_planner():
    plan_table = _plan_table()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(plan_table.START) == 1 and readme.count(plan_table.END) == 1
    written = readme.split(plan_table.START, 1)[1].split(plan_table.END, 1)[0].strip()
    assert written == plan_table.render(), (
        "README.md's card × RAM table is stale: run `python benchmarks/plan_table.py --write README.md`")


def test_table_covers_every_machine_and_names_refusals():
    table = _plan_table().render().splitlines()
    assert len(table) == 2 + 4 * 2  # header, rule, 4 cards × 2 RAM sizes
    cells = [c.strip() for row in table[2:] for c in row.strip("|").split("|")[2:]]
    assert len(cells) == 8 * 4
    for cell in cells:  # a plan with its peaks, or a refusal naming the limit
        assert cell.endswith("GiB") or cell.startswith(("no: card", "no: RAM"))
    row = next(r for r in table if r.startswith("| 12 GiB | 16 GiB"))
    assert "no:" not in row.split("|")[5]  # int8 on a 12 GiB card with 16 GiB RAM: the machine
