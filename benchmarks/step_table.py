"""The step targets from `step_bench` JSON files: one row a process, then each target's range
over them, as benchmarks/RESULTS.md tabulates them (markdown).

    python -m benchmarks.step_table results/step_24b_1.json results/step_24b_3.json
    python -m benchmarks.step_table default=results/a.json "SPLITK 2=results/b.json"

Columns (ms, and ratios; "-" where the run lacks the case):
- base decode at batch 1 and 32 in the serving loop (token gap, overlap on), with its ratio to
  the step's floor (bytes read over the run's copy bandwidth), and the graph forward alone;
- one adapter at batch 1, and eight at batch 32, against base at the same batch: graph forward
  and loop;
- 32 adapters' graph forward against base's plus their bytes' time at the run's bandwidth;
- prefill of 8 x 512 tokens over 8 adapters against base prefill.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [  # (key, header, format)
    ("loop_b1", "loop b1", "{:.3f}"), ("floor_b1", "÷ floor", "{:.3f}"),
    ("loop_b32", "loop b32", "{:.3f}"), ("floor_b32", "÷ floor", "{:.3f}"),
    ("graph_b1", "graph b1", "{:.3f}"), ("graph_b32", "graph b32", "{:.3f}"),
    ("one_graph", "1 adapter graph", "{:.3f}"), ("one_loop", "1 adapter loop", "{:.3f}"),
    ("eight_graph", "8 adapters graph", "{:.3f}"), ("eight_loop", "8 adapters loop", "{:.3f}"),
    ("many_bytes", "32 adapters ÷ (base + bytes)", "{:.3f}"),
    ("prefill", "prefill 8 adapters", "{:.3f}"),
]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def target_row(run: dict) -> dict[str, float | None]:
    """The COLUMNS of one step_bench result (its JSON, loaded)."""
    decode = {r["batch"]: r for r in run.get("decode", [])}
    graph = {(r["batch"], 0): r.get("graph_forward_ms") for r in run.get("decode", [])}
    lora = {(r["batch"], r["adapters"]): r for r in run.get("decode_lora", [])}
    graph.update({k: r.get("graph_forward_ms") for k, r in lora.items()})
    loop = {(r["batch"], r["adapters"]): r["median_ms"] for r in run.get("decode_loop", [])
            if r.get("overlap", True)}
    row: dict[str, float | None] = {}
    for b in (1, 32):
        row[f"loop_b{b}"] = loop.get((b, 0))
        row[f"floor_b{b}"] = _ratio(loop.get((b, 0)), decode.get(b, {}).get("floor_ms"))
        row[f"graph_b{b}"] = graph.get((b, 0))
    for name, b, n in (("one", 1, 1), ("eight", 32, 8)):
        row[f"{name}_graph"] = _ratio(graph.get((b, n)), graph.get((b, 0)))
        row[f"{name}_loop"] = _ratio(loop.get((b, n)), loop.get((b, 0)))
    many, bw = lora.get((32, 32)), run.get("hbm_bytes_per_s")
    row["many_bytes"] = None
    if many and bw and graph.get((32, 0)) and many.get("graph_forward_ms"):
        row["many_bytes"] = many["graph_forward_ms"] / (
            graph[(32, 0)] + many["adapter_bytes"] / bw * 1e3)
    pre, pre_lora = run.get("prefill_8x512"), run.get("prefill_8x512_8_adapters")
    row["prefill"] = _ratio(pre_lora and pre_lora["median_ms"], pre and pre["median_ms"])
    return row


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def table(rows: list[tuple[str, dict]]) -> str:
    """Markdown: a row a process, then each column's range over the processes."""
    keys = [k for k, _, _ in COLUMNS if any(r[k] is not None for _, r in rows)]
    head = {k: h for k, h, _ in COLUMNS}
    fmt = {k: f for k, _, f in COLUMNS}
    lines = ["| process | " + " | ".join(head[k] for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(r[k], fmt[k]) for k in keys) + " |")
    spans = []
    for k in keys:
        seen = [r[k] for _, r in rows if r[k] is not None]
        lo, hi = _cell(min(seen), fmt[k]), _cell(max(seen), fmt[k])
        spans.append(lo if lo == hi else f"{lo}-{hi}")
    lines.append("| range | " + " | ".join(spans) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", metavar="[NAME=]FILE",
                    help="step_bench --out files, each row named NAME or the file's stem")
    rows = []
    for item in ap.parse_args(argv).files:
        name, _, path = item.rpartition("=")
        rows.append((name or Path(path).stem, target_row(json.loads(Path(path).read_text()))))
    print(table(rows))


if __name__ == "__main__":
    main()
