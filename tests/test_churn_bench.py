"""CPU smoke test of the churn benchmark: --quick (tiny model, 16 adapters over 8 slots) yields
every configuration with finite figures, and the premises hold: the all-resident server never
uploads during its measured runs, the churn servers do."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import churn_bench

CHURN_FIGURES = ("median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms", "request_throughput",
                 "output_throughput", "num_completed")
DOC_FIGURES = ("last_ttft_ms", "mean_ttft_ms", "num_steps")


def test_quick_run_has_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "churn.json"
    churn_bench.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    reps = result["settings"]["reps"]
    num_adapters = result["settings"]["num_adapters"]

    churn = result["churn"]
    assert set(churn) == {churn_bench.ALL_RESIDENT, *churn_bench.OVERLAP}
    resident = churn[churn_bench.ALL_RESIDENT]
    assert resident["capacity"]["request_throughput"] > 0
    assert resident["resident_after_warmup"] == num_adapters
    for label, config in churn.items():
        assert len(config["runs"]) == reps, label
        assert config["rate"] == resident["rate"]  # one arrival rate for every configuration
        for key in CHURN_FIGURES:
            value = config["median"][key]
            assert math.isfinite(value) and value > 0, (label, key, value)
        uploads = [r["adapter_uploads"] for r in config["runs"]]
        if label == churn_bench.ALL_RESIDENT:
            assert uploads == [0] * reps
        else:
            assert all(u > 0 for u in uploads), (label, uploads)  # each run starts in host memory

    doc = result["doc_example"]
    assert set(doc) == set(churn_bench.OVERLAP)
    for label, config in doc.items():
        assert len(config["runs"]) == reps, label
        for key in DOC_FIGURES:
            value = config["median"][key]
            assert math.isfinite(value) and value > 0, (label, key, value)

    goals = result["goals"]
    for name in ("churn_median_ttft_vs_all_resident", "churn_default_vs_best",
                 "doc_default_vs_best"):
        assert isinstance(goals[name]["met"], bool), name
    ratios = goals["churn_median_ttft_vs_all_resident"]["ratio"]
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
