"""The LoRA kernel microbenchmark on CPU: its --quick run end to end (Triton under the
interpreter), the bytes formula, and its torch baselines against the reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import lora_kernel_bench as bench
from ops.lora import apply_lora_torch, build_lora_batch_info

# the interpreter trips a numpy deprecation on every scalar index
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    result = bench.main(["--quick", "--iters", "1", "--replays", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"] == result["settings"] and saved["mismatches"] == []
    assert saved["ceiling_bytes_per_s"] > 0 and saved["device"] == "cpu"
    with_triton = os.environ.get("TRITON_INTERPRET") == "1"
    assert saved["settings"]["with_triton"] == with_triton
    groups = ["qkv", "o", "gate_up", "down"]
    assert [g["name"] for g in saved["groups"]] == groups
    for workload in bench.QUICK_WORKLOADS:
        kernels = ["triton", "csgmv-16"]
        if workload.startswith("prefill"):
            kernels += ["csgmv-32", "csgmv-64", "csgmv-128"]
        else:  # decode tables padded as a CUDA graph's, with each expand kernel
            kernels += ["pad-rows", "pad-entries"]
        impls = (kernels if with_triton else []) + ["gather-bmm", "loop"]
        rows = [r for r in saved["rows"] if r["workload"] == workload]
        assert sorted((r["group"], r["impl"]) for r in rows) == sorted(
            (g, i) for g in groups for i in impls
        )
        for r in rows:
            assert r["ok"] and r["max_rel_err"] <= saved["settings"]["tolerance"]
            assert r["us"] > 0 and r["base_us"] > 0 and r["gb_s"] > 0 and r["pct_ceiling"] > 0
        steps = {s["impl"]: s for s in saved["per_step"] if s["workload"] == workload}
        assert sorted(steps) == sorted(impls)
        loop = [r["us"] for r in rows if r["impl"] == "loop"]
        assert steps["loop"]["lora_ms_per_step"] == pytest.approx(2 * sum(loop) / 1e3)


POINTS = ["c32b32m1-n64-w4-s2", "c64b16m2-n64-w4-s2", "c64b16m2e2-n64-w4-s2", "s16x2-n64-w4-s2"]


def test_expand_sweep_quick_run(tmp_path: Path) -> None:
    """The prefill expand sweep times every point it names beside the torch ceiling, each
    checked against the reference first."""
    from benchmarks import expand_sweep

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the quick sweep runs the kernels in the interpreter")
    out = tmp_path / "sweep.json"
    expand_sweep.main(["--quick", "--points", *POINTS, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert {r["impl"] for r in saved["per_step"]} == {*POINTS, "torch-rmw"}
    assert all(r["ok"] for r in saved["per_step"])
    assert all(expand_sweep.Point.parse(p).name == p for p in POINTS)
    assert {r["group"] for r in saved["rows"]} == {"qkv", "o", "gate_up", "down"}


def test_expand_sweep_flags_a_wrong_expand(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import expand_sweep

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the quick sweep runs the kernels in the interpreter")
    monkeypatch.setattr(expand_sweep, "triton_lora_expand", lambda *args, **kwargs: None)
    result = expand_sweep.main(["--quick", "--points", POINTS[0]])
    assert [r["ok"] for r in result["per_step"] if r["impl"] == POINTS[0]] == [False]


def test_min_bytes_by_hand() -> None:
    # 2 tokens, in 8, three slices of 4 (out 12), rank 4, 2 adapters, bf16:
    # x 2*8 + weights 2*4*(3*8 + 12) + t 2*2*3*4 + y 2*2*12 = 16 + 288 + 48 + 48 = 400 values
    assert bench.min_bytes(2, 8, 12, 3, 4, 2, 2) == 800
    assert bench.min_bytes(1, 8, 12, 1, 4, 1, 4) == 4 * (8 + 4 * 20 + 8 + 24)


@pytest.mark.parametrize(
    "group", [bench.Group("qkv", 24, (16, 8, 8)), bench.Group("down", 40, (24,))]
)
def test_baselines_match_reference(group: bench.Group) -> None:
    # base rows around two adapters of ranks below the pool's R = 8; slot 2 is unused
    token_slots = [-1, -1, 1, 1, 1, -1, 0, 0, -1]
    case = bench.make_case(group, [3, 5, 8], 8, token_slots, torch.float32, "cpu", seed=7)
    info = build_lora_batch_info(token_slots, case.slot_ranks, "triton", 16, "cpu")
    expected = case.y.clone()
    apply_lora_torch(case.x, case.A, case.B, expected, case.slice_offsets, case.scalings, info)
    y0 = case.y.clone()
    base = torch.tensor(token_slots) < 0
    for make in (bench.gather_bmm_impl, bench.loop_impl):
        case.y.copy_(y0)
        make(case)()
        torch.testing.assert_close(case.y, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(case.y[base], y0[base])
        assert not torch.equal(case.y[~base], y0[~base])
        case.y.copy_(y0)
        assert bench.relative_error(make(case), case, expected) < 1e-5
        assert torch.equal(case.y, y0)  # relative_error restores y
    # the check has teeth: the reference leaves y alone, and a doubled delta is an error of 1
    assert torch.equal(bench.reference(case), expected) and torch.equal(case.y, y0)
    twice = bench.loop_impl(case)
    assert bench.relative_error(lambda: (twice(), twice()), case, expected) > 0.99


def test_checks_start_from_the_initial_y(tmp_path: Path) -> None:
    """Timing accumulates applications into y; every implementation's check still starts from
    the initial y (else every row after the first would be flagged)."""
    group = bench.Group("o", 16, (16,))
    settings = {"dtype": "float32", "device": "cpu", "iters": 2, "replays": 2,
                "tolerance": 1e-4, "with_triton": False, "l2_bytes": 0}
    rows = bench.bench_group("decode", [2, 1], group, 4, settings, bench.time_cpu, 1e9)
    assert [r["impl"] for r in rows] == ["gather-bmm", "loop"]
    assert all(r["ok"] and r["max_rel_err"] < 1e-5 for r in rows)


def test_gather_bmm_skipped_over_the_memory_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    case = bench.make_case(bench.Group("o", 16, (16,)), [4] * 2, 4, [0, 1], torch.float32, "cpu")
    assert bench.gather_bytes(case) == 2 * (4 * 16 + 16 * 4) * 4
    monkeypatch.setattr(bench, "GATHER_LIMIT_BYTES", 100)
    impls = bench.implementations(case, is_prefill=False, with_triton=False)
    assert isinstance(impls["gather-bmm"], str) and impls["gather-bmm"].startswith("skipped")
    assert callable(impls["loop"])


def test_segments_and_groups() -> None:
    assert bench.segments([-1, 0, 0, -1, 2, 2, 2]) == [(1, 3, 0), (4, 7, 2)]
    groups = bench.layer_groups(bench.SHAPES["llama-3.1-8b"])
    assert [(g.name, g.in_dim, g.widths) for g in groups] == [
        ("qkv", 4096, (4096, 1024, 1024)),
        ("o", 4096, (4096,)),
        ("gate_up", 4096, (14336, 14336)),
        ("down", 14336, (4096,)),
    ]
    assert groups[0].slice_offsets == (0, 4096, 5120, 6144)


def test_host_overhead_runs() -> None:
    """The wrapper host-cost benchmark: kernels stubbed, a positive time, nothing launched."""
    from benchmarks import host_overhead

    result = host_overhead.main(["--iters", "5", "--rounds", "2", "--batches", "8"])
    assert 0 < result["apply_lora_triton_wrapper_us"] < 1e5
    step = result["decode_step"][8]
    assert 0 < step["schedule_ms"] < 1e3 and 0 < step["prepare_ms"] < 1e3
