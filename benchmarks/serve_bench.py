"""Online serving benchmark: an async HTTP client that replays a workload against a live
server and reports throughput, TTFT / TPOT / ITL / end-to-end latency and goodput.

Against a running server, or one this script starts (`--launch`) and stops at the end:

    python -m benchmarks.serve_bench --base-url http://127.0.0.1:30000 --backend native \
        --num-loras 8 --popularity skewed --request-rate 4 8 inf --num-prompts 500 \
        --out serve.json --plot-dir plots
    python -m benchmarks.serve_bench --launch --server-args "--model-path /tmp/llama8b \
        --load-format dummy" --lora-dir /tmp/adapters --num-loras 8 --request-rate inf

TTFT is measured to the first chunk that carries a token, ITL between token-carrying chunks,
TPOT = (E2E - TTFT) / (output tokens - 1). Outputs run to their asked length (ignore_eos).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks import workloads as wl

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("native", "openai")
DATASETS = ("random", "mtbench")
PROMPT_FORMATS = ("ids", "text")
QUICK = {"num_prompts": 8, "input_len": 16, "output_len": 8}
DEFAULTS = {"num_prompts": 200, "input_len": 128, "output_len": 64}
REQUEST_TIMEOUT_S = 6 * 3600
LAUNCH_STOP_TIMEOUT_S = 60.0
WARMUP_OUTPUT_LEN = 4
MAX_ERRORS_KEPT = 10
CHUNKY_STREAM = 1.5  # tokens per chunk above which the timings are per chunk, not token
LATENCIES = (("ttft", "Time to First Token", "TTFT"),
             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl", "Inter-token Latency", "ITL"),
             ("e2el", "End-to-end Latency", "E2EL"))


@dataclass(frozen=True)
class RequestSpec:
    """One request of the workload: token ids or text, its output length and adapter."""

    prompt: list[int] | str
    output_len: int
    lora: str | None


@dataclass
class RequestResult:
    """What one request measured; times in seconds from its send."""

    lora: str | None
    success: bool = False
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache
    output_tokens: int = 0
    num_chunks: int = 0  # chunks that carried tokens
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


# ---------------------------------------------------------------- the workload

def build_requests(args: argparse.Namespace, vocab_size: int | None) -> list[RequestSpec]:
    """The workload's requests in send order (deterministic in --seed)."""
    rng = np.random.default_rng(args.seed)
    n = args.num_prompts
    names = wl.adapter_names(args.num_loras, args.lora_names)
    loras = wl.sample_adapters(names, n, args.popularity, rng, zipf_alpha=args.zipf_alpha,
                               alpha=args.alpha, base_fraction=args.base_fraction)
    out_lens = wl.sample_lengths(
        wl.LengthSpec(args.output_len, args.len_dist, args.len_range_ratio, args.len_sigma), n, rng)
    prompts: list[list[int]] | list[str]
    if args.dataset == "mtbench":
        prompts = wl.mtbench_prompts(n, rng)
    else:
        in_lens = wl.sample_lengths(
            wl.LengthSpec(args.input_len, args.len_dist, args.len_range_ratio, args.len_sigma),
            n, rng)
        if args.prompt_format == "text":
            prompts = wl.random_text_prompts(in_lens, rng)
        else:
            if vocab_size is None:
                raise SystemExit("error: token-id prompts need the vocabulary size: the server "
                                 "has no /get_model_info; pass --vocab-size")
            prompts = wl.random_token_prompts(in_lens, vocab_size, rng)
    if args.prefix_len:  # drawn after the rest: the same seed gives the same prompts after it
        prompts = wl.with_shared_prefixes(prompts, args.prefix_len, args.num_prefixes,
                                          vocab_size, rng)
    return [RequestSpec(p, o, lo) for p, o, lo in zip(prompts, out_lens, loras, strict=True)]


# ---------------------------------------------------------------- the client

async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


class Backend:
    """Sends one request to one endpoint and records when its tokens arrive."""

    path = ""

    def __init__(self, base_url: str, base_model: str | None) -> None:
        self.url = base_url.rstrip("/") + self.path
        self.base_model = base_model

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        raise NotImplementedError

    def new_tokens(self, chunk: dict[str, Any], result: RequestResult) -> int:
        """Tokens this chunk adds (also fills the result's counts); raises on an error chunk."""
        raise NotImplementedError

    async def send(self, session: aiohttp.ClientSession, spec: RequestSpec) -> RequestResult:
        result = RequestResult(spec.lora)
        start = last = time.perf_counter()
        try:
            async with session.post(self.url, json=self.body(spec)) as resp:
                if resp.status != 200:
                    result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return result
                async for chunk in sse_events(resp):
                    if "error" in chunk:
                        raise RuntimeError(f"in-band error: {chunk['error']}")
                    if self.new_tokens(chunk, result) == 0:
                        continue
                    now = time.perf_counter()
                    result.num_chunks += 1
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
            result.e2el = time.perf_counter() - start
            result.success = result.ttft > 0.0
            if not result.success:
                result.error = "the stream ended without a token"
        except Exception as e:  # noqa: BLE001 - every failure is counted, never fatal
            result.error = f"{type(e).__name__}: {e}"
        return result


class NativeBackend(Backend):
    """POST /generate with stream true; every chunk carries the output ids so far."""

    path = "/generate"

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "sampling_params": {"max_new_tokens": spec.output_len, "temperature": 0.0,
                                "ignore_eos": True},
            "stream": True,
        }
        body["input_ids" if isinstance(spec.prompt, list) else "text"] = spec.prompt
        if spec.lora is not None:
            body["lora_path"] = spec.lora
        return body

    def new_tokens(self, chunk: dict[str, Any], result: RequestResult) -> int:
        meta = chunk.get("meta_info", {})
        total = meta.get("completion_tokens", len(chunk.get("output_ids", [])))
        added, result.output_tokens = total - result.output_tokens, total
        result.prompt_tokens = meta.get("prompt_tokens", result.prompt_tokens)
        result.cached_tokens = meta.get("cached_tokens", result.cached_tokens)
        return added


class OpenAIBackend(Backend):
    """POST /v1/completions with stream true and usage in the last chunk. A chunk is counted
    as one token arrival when it carries text; the usage chunk gives the exact counts."""

    path = "/v1/completions"

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        return {
            "model": spec.lora if spec.lora is not None else self.base_model,
            "prompt": spec.prompt, "max_tokens": spec.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        }

    def new_tokens(self, chunk: dict[str, Any], result: RequestResult) -> int:
        usage = chunk.get("usage")
        if usage:
            result.prompt_tokens = usage.get("prompt_tokens", 0)
            details = usage.get("prompt_tokens_details") or {}
            result.cached_tokens = details.get("cached_tokens", 0)
            result.output_tokens = usage.get("completion_tokens", result.output_tokens)
        choices = chunk.get("choices") or []
        if choices and choices[0].get("text"):
            if not usage:
                result.output_tokens += 1  # until the usage chunk says exactly
            return 1
        return 0


async def run_benchmark(
    backend: Backend,
    specs: list[RequestSpec],
    arrivals: list[float],
    max_concurrency: int | None,
    show_progress: bool,
) -> tuple[list[RequestResult], float]:
    """Send each request at its arrival offset (at most `max_concurrency` in flight); return
    the results in spec order and the wall time from the first send to the last answer."""
    from tqdm.auto import tqdm

    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    bar = tqdm(total=len(specs), disable=not show_progress, desc="requests", unit="req")

    async def one(spec: RequestSpec, session: aiohttp.ClientSession) -> RequestResult:
        if limit is None:
            result = await backend.send(session, spec)
        else:
            async with limit:
                result = await backend.send(session, spec)
        bar.update()
        return result

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tasks = []
        for spec, offset in zip(specs, arrivals, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec, session)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    bar.close()
    return results, duration


# ---------------------------------------------------------------- metrics

def latency_stats(values_s: list[float], name: str, percentiles: list[float]) -> dict[str, float]:
    """mean / median / std / pNN of `values_s` (seconds), in milliseconds."""
    ms = np.asarray(values_s, dtype=np.float64) * 1e3 if values_s else np.zeros(1)
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def compute_metrics(
    results: list[RequestResult],
    duration: float,
    percentiles: list[float],
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, Any]:
    """Aggregate figures of one run, named as serving benchmarks usually name them."""
    ok = [r for r in results if r.success]
    inputs = sum(r.prompt_tokens for r in ok)
    outputs = sum(r.output_tokens for r in ok)
    metrics: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": inputs, "total_output_tokens": outputs,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / duration,
        "input_throughput": inputs / duration, "output_throughput": outputs / duration,
        "total_token_throughput": (inputs + outputs) / duration,
        "tokens_per_chunk": outputs / max(sum(r.num_chunks for r in ok), 1),
    }
    tpots = [t for r in ok if (t := r.tpot) is not None]
    series = {"ttft": [r.ttft for r in ok], "tpot": tpots,
              "itl": [x for r in ok for x in r.itl], "e2el": [r.e2el for r in ok]}
    for name, values in series.items():
        metrics.update(latency_stats(values, name, percentiles))
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = [r for r in ok
                if (slo_ttft_ms is None or r.ttft * 1e3 <= slo_ttft_ms)
                and (slo_tpot_ms is None or (r.tpot or 0.0) * 1e3 <= slo_tpot_ms)]
        metrics["good_requests"] = len(good)
        metrics["request_goodput"] = len(good) / duration
    counts: dict[str, int] = {}
    for r in results:
        key = r.lora or "__base__"
        counts[key] = counts.get(key, 0) + 1
    metrics["requests_per_adapter"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    metrics["errors"] = [r.error for r in results if not r.success][:MAX_ERRORS_KEPT]
    return metrics


def format_summary(m: dict[str, Any], title: str, percentiles: list[float]) -> str:
    """The familiar fixed-width result table."""
    width = 50
    lines = [f"{' ' + title + ' ':=^{width}}"]

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40}{text:<10}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Benchmark duration (s):", m["duration_s"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    if m.get("total_cached_tokens"):
        row("Prompt tokens from the prefix cache:", m["total_cached_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    if "request_goodput" in m:
        row("Request goodput (req/s):", m["request_goodput"])
    row("Input token throughput (tok/s):", m["input_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    for key, heading, short in LATENCIES:
        lines.append(f"{heading:-^{width}}")
        row(f"Mean {short} (ms):", m[f"mean_{key}_ms"])
        row(f"Median {short} (ms):", m[f"median_{key}_ms"])
        for p in percentiles:
            row(f"P{p:g} {short} (ms):", m[f"p{p:g}_{key}_ms"])
    lines.append("=" * width)
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def write_plots(runs: list[dict[str, Any]], details: list[list[RequestResult]],
                folder: Path) -> list[Path]:
    """Latency CDFs (TTFT, TPOT, E2E; one line per request rate) and, for several rates,
    throughput and TTFT against the offered rate. Empty when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run, results in zip(runs, details, strict=True):
        ok = [r for r in results if r.success]
        series = {"TTFT": [r.ttft for r in ok], "TPOT": [t for r in ok if (t := r.tpot)],
                  "E2E latency": [r.e2el for r in ok]}
        for ax, (name, values) in zip(axes, series.items(), strict=True):
            if values:
                ms = np.sort(np.asarray(values) * 1e3)
                ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms),
                        label=f"rate {run['request_rate']}")
            ax.set_xlabel(f"{name} (ms)")
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"{name} CDF")
            ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    written.append(folder / "latency_cdf.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    if len(runs) > 1:
        labels = [str(r["request_rate"]) for r in runs]
        x = np.arange(len(runs))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.plot(x, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
        a1b = a1.twinx()
        a1b.plot(x, [r["request_throughput"] for r in runs], "s--", color="tab:orange",
                 label="req/s")
        a1.set_ylabel("output tokens/s")
        a1b.set_ylabel("requests/s")
        a1.set_title("throughput vs offered rate")
        a2.plot(x, [r["mean_ttft_ms"] for r in runs], "o-", label="mean")
        a2.plot(x, [r["median_ttft_ms"] for r in runs], "o-", label="median")
        tail = [k for k in runs[0] if k.endswith("_ttft_ms") and k.startswith("p")]
        for k in tail:
            a2.plot(x, [r[k] for r in runs], "o-", label=k.split("_")[0])
        a2.set_ylabel("TTFT (ms)")
        a2.set_title("TTFT vs offered rate")
        a2.legend()
        for ax in (a1, a2):
            ax.set_xticks(x, labels)
            ax.set_xlabel("request rate (req/s)")
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        written.append(folder / "rate_sweep.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# ---------------------------------------------------------------- launching a server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(server_args: str, lora_dir: Path | None, names: list[str],
                   port: int | None) -> tuple[list[str], str]:
    """`python -m runtime` argv and the base URL it will listen on."""
    argv = shlex.split(server_args)

    def value(flag: str) -> str | None:
        for spelling in (flag, flag.replace("-", "_").replace("__", "--", 1)):
            if spelling in argv:
                i = argv.index(spelling)
                return argv[i + 1] if i + 1 < len(argv) else None
        return None

    host = value("--host") or "127.0.0.1"
    if value("--host") is None:
        argv += ["--host", host]
    given_port = value("--port")
    if given_port is None:
        given_port = str(port or _free_port())
        argv += ["--port", given_port]
    if lora_dir is not None and names:
        if value("--lora-paths") is not None:
            raise SystemExit("error: give adapters either by --lora-dir or in --server-args")
        argv += ["--lora-paths", *(f"{n}={lora_dir / n}" for n in names)]
        if value("--max-loras-per-batch") is None:
            argv += ["--max-loras-per-batch", str(len(names))]
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return [sys.executable, "-m", "runtime", *argv], f"http://{url_host}:{given_port}"


async def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"error: the server exited with {proc.returncode}:\n"
                                 + log.read_text(errors="replace")[-4000:])
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url + "/health",
                                       timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise SystemExit("error: the server did not become healthy in time:\n"
                     + log.read_text(errors="replace")[-4000:])


def stop_process(proc: subprocess.Popen, timeout: float = LAUNCH_STOP_TIMEOUT_S) -> None:
    """SIGTERM (the server drains), then SIGKILL if it lingers past `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- main

async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
            if r.status == 200:
                return await r.json()
    return None


async def server_facts(base_url: str) -> tuple[int | None, str | None]:
    """(vocabulary size, base model name) as the server reports them, None where it doesn't."""
    async with aiohttp.ClientSession() as session:
        info = await _get_json(session, base_url.rstrip("/") + "/get_model_info")
        models = await _get_json(session, base_url.rstrip("/") + "/v1/models")
    vocab = info.get("vocab_size") if info else None
    name = models["data"][0]["id"] if models and models.get("data") else None
    return vocab, name


async def bench(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    vocab, base_model = await server_facts(base_url)
    vocab = args.vocab_size or vocab
    base_model = args.model or base_model
    backend_cls = NativeBackend if args.backend == "native" else OpenAIBackend
    backend = backend_cls(base_url, base_model)
    specs = build_requests(args, vocab)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as s:
        for spec in specs[: args.warmup_requests]:
            warm = await backend.send(s, RequestSpec(spec.prompt, WARMUP_OUTPUT_LEN, spec.lora))
            if not warm.success:
                raise SystemExit(f"error: the warm-up request failed: {warm.error}")
    runs, details = [], []
    for rate in args.request_rate:
        rng = np.random.default_rng(args.seed + 1)
        arrivals = wl.arrival_times(len(specs), rate, args.burstiness, rng)
        results, duration = await run_benchmark(backend, specs, arrivals, args.max_concurrency,
                                                not args.disable_tqdm)
        m = compute_metrics(results, duration, args.percentiles, args.slo_ttft_ms,
                            args.slo_tpot_ms)
        run = {"request_rate": rate if math.isfinite(rate) else "inf",
               "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, **m}
        if args.save_detailed:
            run["requests"] = [asdict(r) for r in results]
        print(format_summary(m, f"Serving Benchmark Result (rate {run['request_rate']})",
                             args.percentiles))
        if m["tokens_per_chunk"] > CHUNKY_STREAM:
            print(f"warning: {m['tokens_per_chunk']:.1f} tokens per streamed chunk: TTFT and ITL "
                  "are per chunk (the openai route sends no chunk for tokens without text, e.g. "
                  "dummy weights with a small tokenizer; use --backend native there)")
        runs.append(run)
        details.append(results)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["request_rate"] = [r if math.isfinite(r) else "inf" for r in args.request_rate]
    out = {"backend": args.backend, "base_url": base_url, "base_model": base_model,
           "config": config, "runs": runs}
    if args.plot_dir:
        out["plots"] = [str(p) for p in write_plots(runs, details, args.plot_dir)]
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("server")
    g.add_argument("--backend", choices=BACKENDS, default="native",
                   help="native: /generate streaming; openai: /v1/completions streaming")
    g.add_argument("--base-url", default="http://127.0.0.1:30000")
    g.add_argument("--model", help="base model name for the openai backend (default: the "
                   "first of /v1/models)")
    g.add_argument("--launch", action="store_true",
                   help="start `python -m runtime` with --server-args, stop it at the end")
    g.add_argument("--server-args", default="", help="flags for the launched server, quoted")
    g.add_argument("--lora-dir", type=Path,
                   help="with --launch: serve each adapter name from LORA_DIR/<name>")
    g.add_argument("--port", type=int, help="with --launch: port (default: a free one)")
    g.add_argument("--launch-timeout", type=float, default=900.0, help="seconds to /health")
    g.add_argument("--server-log", type=Path, help="with --launch: where the server logs go")
    g = ap.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default="random")
    g.add_argument("--num-prompts", type=int)
    g.add_argument("--input-len", type=int)
    g.add_argument("--output-len", type=int)
    g.add_argument("--len-dist", choices=wl.LENGTH_DISTS, default="fixed")
    g.add_argument("--len-range-ratio", type=float, default=0.5,
                   help="uniform lengths lie in len*(1 +- ratio)")
    g.add_argument("--len-sigma", type=float, default=0.5, help="lognormal sigma (log space)")
    g.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="ids",
                   help="random prompts as token ids (input_ids / prompt ids) or words")
    g.add_argument("--vocab-size", type=int, help="default: /get_model_info")
    g.add_argument("--prefix-len", type=int, default=0,
                   help="random dataset: a shared prefix of this many tokens (words for text "
                        "prompts) before every prompt, for the server's prefix cache")
    g.add_argument("--num-prefixes", type=int, default=1,
                   help="with --prefix-len: distinct prefixes, one drawn for each request")
    g.add_argument("--lora-names", nargs="+", help="adapter names the server knows")
    g.add_argument("--num-loras", type=int, help="adapters lora0 .. lora{N-1}")
    g.add_argument("--popularity", choices=wl.POPULARITY, default="uniform")
    g.add_argument("--zipf-alpha", type=float, default=1.5, help="skewed: Zipf exponent")
    g.add_argument("--alpha", type=float, default=1.0, help="powerlaw: exponent")
    g.add_argument("--base-fraction", type=float, default=0.0,
                   help="fraction of requests to the base model")
    g = ap.add_argument_group("arrivals")
    g.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="requests/s (inf: all at once); several values sweep")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the gaps: 1 = Poisson")
    g.add_argument("--max-concurrency", type=int, help="most requests in flight")
    g.add_argument("--warmup-requests", type=int, default=1)
    g = ap.add_argument_group("report")
    g.add_argument("--slo-ttft-ms", type=float)
    g.add_argument("--slo-tpot-ms", type=float)
    g.add_argument("--percentiles", type=float, nargs="+", default=[99.0])
    g.add_argument("--out", type=Path, help="JSON results")
    g.add_argument("--plot-dir", type=Path, help="PNG plots (needs matplotlib)")
    g.add_argument("--plot-from", type=Path,
                   help="only draw --plot-dir's plots from an --out file saved with "
                        "--save-detailed (e.g. a run on a machine without matplotlib)")
    g.add_argument("--save-detailed", action="store_true", help="per-request records in --out")
    g.add_argument("--disable-tqdm", action="store_true")
    g.add_argument("--quick", action="store_true", help="few short requests, for smoke runs")
    g.add_argument("--seed", type=int, default=0)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    wl.fill_defaults(args, QUICK if args.quick else DEFAULTS)
    if args.num_loras is not None and args.lora_names:
        raise SystemExit("error: give --lora-names or --num-loras, not both")
    return args


def plot_saved(saved: Path, folder: Path) -> list[Path]:
    """write_plots for the runs of a saved --out file that kept per-request records."""
    runs = json.loads(saved.read_text())["runs"]
    if any("requests" not in r for r in runs):
        raise SystemExit(f"error: {saved} has no per-request records (run with --save-detailed)")
    details = [[RequestResult(**q) for q in r["requests"]] for r in runs]
    return write_plots(runs, details, folder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.plot_from is not None:
        if args.plot_dir is None:
            raise SystemExit("error: --plot-from needs --plot-dir")
        return {"plots": [str(p) for p in plot_saved(args.plot_from, args.plot_dir)]}
    proc = None
    base_url = args.base_url
    if args.launch:
        names = wl.adapter_names(args.num_loras, args.lora_names)
        cmd, base_url = server_command(args.server_args, args.lora_dir, names, args.port)
        log = args.server_log or Path(tempfile.mkdtemp(prefix="serve_bench_")) / "server.log"
        print(f"launching: {shlex.join(cmd)}\n  log: {log}")
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        if proc is not None:
            asyncio.run(wait_healthy(base_url, proc, args.launch_timeout, log))
        result = asyncio.run(bench(args, base_url))
    finally:
        if proc is not None:
            stop_process(proc)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
