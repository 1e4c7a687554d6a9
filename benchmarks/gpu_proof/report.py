"""The GPU proof's derived figures: ratios to the bf16 step of the same run, the issue's goals,
and the Markdown table written beside the JSON."""

from __future__ import annotations

# Goals of issue 16, as ratios measured in one run on one GPU.
W8A8_MAX = 0.55  # W8A8 step / bf16 step
W4A16_MAX = 1.15  # int4 weight-only step / bf16 step
STREAM_MAX = 1.15  # streamed step / resident step
QUANTO_MIN = 2.0  # diffusers + optimum-quanto step / krea2_lite step, same precision
STREAM_GOALS = (("int8", 12.0), ("int4", 8.0))


def _find(rows, **match):
    return next((r for r in rows if r.get("ms") is not None and all(r.get(k) == v for k, v in match.items())), None)


def add_ratios(timings: list[dict]) -> None:
    """ratio_to_bf16: each step / stream row over krea2_lite's bf16 `auto` step (uncapped) at the same batch, each
    layer row over cuBLAS bf16 at the same token count; the quanto peer rows
    also get `krea2_lite_speedup` (peer ms / krea2_lite `auto` ms, same weight type and batch) and
    `krea2_lite_best_speedup` (over krea2_lite's fastest row with those weights: W8A8 included, any backend)."""
    for row in timings:
        if row.get("ms") is None:
            continue
        if row.get("kind") in ("step", "stream"):
            base = _find(timings, kind="step", system="krea2_lite", quant="bf16", backend="auto", batch=row["batch"])
            row["ratio_to_bf16"] = round(row["ms"] / base["ms"], 3) if base else None
            if row["system"] == "diffusers+quanto":
                ours = _find(timings, kind="step", system="krea2_lite", quant=row["quant"], backend="auto",
                             batch=row["batch"])
                row["krea2_lite_speedup"] = round(row["ms"] / ours["ms"], 3) if ours else None
                family = [r["ms"] for r in timings if r.get("kind") == "step" and r["system"] == "krea2_lite"
                          and r.get("ms") and r["batch"] == row["batch"]
                          and (r["quant"] == row["quant"] or r["quant"].startswith(row["quant"] + "-"))]
                row["krea2_lite_best_speedup"] = round(row["ms"] / min(family), 3) if family else None
        elif row.get("kind") == "layer":
            base = _find(timings, kind="layer", quant="bf16", tokens=row["tokens"])
            row["ratio_to_bf16"] = round(row["ms"] / base["ms"], 3) if base else None


def _goal(name, value, target, better) -> dict:
    met = None if value is None else (value <= target if better == "lower" else value >= target)
    return {"goal": name, "value": value, "target": target, "met": met}


def goals(timings: list[dict]) -> list[dict]:
    """The issue's goals, each from the rows of this run (value None when a row is missing)."""
    out = []
    steps = [r for r in timings if r.get("kind") == "step" and r.get("system") == "krea2_lite"]
    for batch in (1, 2):
        for quant, target in (("int8-w8a8", W8A8_MAX), ("fp8-w8a8", W8A8_MAX), ("int4", W4A16_MAX)):
            best = [r["ratio_to_bf16"] for r in steps if r["quant"] == quant and r["batch"] == batch
                    and r.get("ratio_to_bf16") is not None]
            out.append(_goal(f"{quant} step / bf16 step, batch {batch} (best backend)", min(best) if best else None,
                             target, "lower"))
    for quant, cap in STREAM_GOALS:
        row = _find(timings, kind="stream", quant=quant, cap_gib=cap)
        out.append(_goal(f"{quant} streamed / resident under a simulated {cap:g} GB card",
                         row.get("ratio_to_resident") if row else None, STREAM_MAX, "lower"))
    for quant in ("int8", "fp8", "int4"):
        for batch in (1, 2):
            row = _find(timings, kind="step", system="diffusers+quanto", quant=quant, batch=batch)
            out.append(_goal(f"diffusers+quanto {quant} / krea2_lite's fastest {quant}-weight step, batch {batch}",
                             row.get("krea2_lite_best_speedup") if row else None, QUANTO_MIN, "higher"))
    return out


def _fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def markdown(data: dict) -> str:
    """The result as Markdown: header, goals, checks, timings."""
    lines = [f"# GPU proof: {data.get('device')}", "",
             f"torch {data.get('torch')} · triton {data.get('triton')} · preset {data.get('preset')} · "
             f"budget {data.get('budget_s')} s · elapsed {_fmt(data.get('elapsed_s'), 0)} s · "
             f"{'complete' if data.get('complete') else 'INCOMPLETE (still running or killed)'}", ""]
    checks = data.get("checks", [])
    passed = sum(c["ok"] for c in checks)
    skipped = sum(bool(c.get("skipped")) for c in checks)
    if data.get("goals"):
        lines += ["## Goals", "", "| goal | value | target | met |", "|---|---:|---:|---|"]
        lines += [f"| {g['goal']} | {_fmt(g['value'], 3)} | {g['target']} | {_fmt(g['met'])} |" for g in data["goals"]]
        lines.append("")
    lines += [f"## Checks ({passed}/{len(checks)} passed, {skipped} skipped)", "", "| check | ok | detail |",
              "|---|---|---|"]
    lines += [f"| {c['name']} | {'ok' if c['ok'] else ('skipped' if c.get('skipped') else '**FAIL**')} | "
              f"{_cell(c['detail'])} |" for c in checks]
    lines += ["", "## Timings", "",
              "| kind | case | system | quant | backend | batch | ms | min ms | × bf16 | other | detail |",
              "|---|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in data.get("timings", []):
        other = []
        for key in ("ratio_to_resident", "krea2_lite_speedup", "krea2_lite_best_speedup", "peak_gb", "streamed_blocks",
                    "tokens"):
            if r.get(key) is not None:
                other.append(f"{key}={_fmt(r[key])}")
        lines.append(f"| {r.get('kind', '')} | {r['case']} | {r['system']} | {r['quant']} | {r.get('backend', '')} | "
                     f"{_fmt(r.get('batch'))} | {_fmt(r['ms'])} | {_fmt(r.get('min_ms'))} | "
                     f"{_fmt(r.get('ratio_to_bf16'), 3)} | {' '.join(other)} | {_cell(r.get('detail', ''))} |")
    if data.get("sections"):
        lines += ["", "## Sections", "", "| section | allotted s | spent s | note |", "|---|---:|---:|---|"]
        lines += [f"| {s['name']} | {_fmt(s.get('allotted_s'), 0)} | {_fmt(s.get('spent_s'), 0)} | {s.get('note', '')} |"
                  for s in data["sections"]]
    return "\n".join(lines)
