"""How fast the front end answers while the engine is busy: `/health` latency while a batch of
streaming generations decodes, against the same server idle.

    python -m benchmarks.responsiveness --model-path bundled:smollm2-135m-instruct --batch 32
    python -m benchmarks.responsiveness --quick          # tiny random model, for smoke runs

It launches `python -m runtime` (extra flags via --server-args), measures `/health` idle, then
starts `--batch` streaming /generate requests and measures `/health` while they run, and prints
p50 / p90 / p99 / max of each, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.serve_bench import stop_process, wait_healthy
from tests.live import free_port


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]
    return {"n": len(s), "p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99),
            "max_ms": s[-1], "mean_ms": statistics.fmean(s)}


async def probe(session: aiohttp.ClientSession, url: str, count: int, gap_s: float) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        async with session.get(url + "/health") as r:
            await r.read()
        times.append(1e3 * (time.perf_counter() - t0))
        await asyncio.sleep(gap_s)
    return times


async def generate(session: aiohttp.ClientSession, url: str, tokens: int, seed: int) -> int:
    body = {"input_ids": [(seed * 7 + i) % 200 + 10 for i in range(64)], "stream": True,
            "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}}
    chunks = 0
    async with session.post(url + "/generate", json=body) as r:
        async for _ in r.content:
            chunks += 1
    return chunks


async def measure(url: str, batch: int, tokens: int, probes: int) -> dict:
    async with aiohttp.ClientSession() as session:
        idle = await probe(session, url, probes, 0.005)
        gens = [asyncio.create_task(generate(session, url, tokens, i)) for i in range(batch)]
        await asyncio.sleep(1.0)  # let prefill finish: measure during decode
        busy = await probe(session, url, probes, 0.005)
        still_running = sum(not g.done() for g in gens)
        await asyncio.gather(*gens)
    return {"idle": percentiles(idle), "busy": percentiles(busy),
            "generations_running_at_end_of_probe": still_running}


def median_run(runs: list[dict]) -> dict:
    """Each figure of idle and busy as the median over the runs (the run itself when one)."""
    out: dict = {"repeats": len(runs)}
    for k in ("idle", "busy"):
        out[k] = {f: statistics.median(r[k][f] for r in runs) for f in runs[0][k]}
    out["generations_running_at_end_of_probe"] = min(
        r["generations_running_at_end_of_probe"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-path", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--server-args", default="", help="extra flags for python -m runtime")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--probes", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure this many times against the same server; report the median")
    ap.add_argument("--quick", action="store_true", help="tiny random model, few probes")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    model = a.model_path
    if a.quick:
        from tests.models import make_model

        model = str(make_model(Path(tempfile.mkdtemp()) / "tiny"))
        a.batch, a.new_tokens, a.probes = 4, 64, 30
    port = free_port()
    cmd = [sys.executable, "-m", "runtime", "--model-path", model, "--port", str(port),
           "--log-level", "warning", *shlex.split(a.server_args)]
    log = Path(tempfile.mkdtemp()) / "server.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_healthy(url, proc, 900, log))
        runs = [asyncio.run(measure(url, a.batch, a.new_tokens, a.probes))
                for _ in range(a.repeat)]
    finally:
        stop_process(proc)
    result = median_run(runs)
    result.update(model=a.model_path if not a.quick else "tiny", batch=a.batch,
                  server_args=a.server_args, runs=runs)
    print(json.dumps(result, indent=2))
    for k in ("idle", "busy"):
        r = result[k]
        print(f"/health {k}: p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f}, "
              f"p99 {r['p99_ms']:.2f}, max {r['max_ms']:.2f} (n={r['n']:.0f}; median of "
              f"{result['repeats']} runs)")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
