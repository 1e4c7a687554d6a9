"""docs/memory-and-offload.md's card × RAM table is what the planner says today (krea2_lite.offload.plan_table)."""

from pathlib import Path

from krea2_lite.offload import plan_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "memory-and-offload.md"


def test_doc_table_matches_the_planner():
    text = DOC.read_text(encoding="utf-8")
    assert text.count(plan_table.START) == 1 and text.count(plan_table.END) == 1
    written = text.split(plan_table.START, 1)[1].split(plan_table.END, 1)[0].strip()
    assert written == plan_table.render(), (
        "docs/memory-and-offload.md's card × RAM table is stale: run "
        "`python -m krea2_lite.offload.plan_table --write docs/memory-and-offload.md`")


def test_table_covers_every_machine_and_names_refusals():
    table = plan_table.render().splitlines()
    assert len(table) == 2 + 4 * 2  # header, rule, 4 cards × 2 RAM sizes
    cells = [c.strip() for row in table[2:] for c in row.strip("|").split("|")[2:]]
    assert len(cells) == 8 * 4
    for cell in cells:  # a plan with its peaks, or a refusal naming the limit
        assert cell.endswith("GiB") or cell.startswith(("no: card", "no: RAM"))
    row = next(r for r in table if r.startswith("| 12 GiB | 16 GiB"))
    assert "no:" not in row.split("|")[5]  # int8 on a 12 GiB card with 16 GiB RAM: the machine
