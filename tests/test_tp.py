"""Tensor parallelism on CPU: two processes over gloo give the same greedy tokens as tp_size 1,
for base requests and a mixed batch of adapters, and each rank holds only its shard of the base
weights and of the sharded LoRA factors. An upload that is slow on a worker keeps its adapter
UPLOADING on rank 0 without blocking the event loop; a failed one fails everywhere."""

from __future__ import annotations

import asyncio
import errno
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from runtime.adapters.manager import Residency
from runtime.config import LoraPathSpec, ServerConfig
from runtime.engine import Engine
from runtime.model.parallel import local_vocab
from tests.engine_utils import collect, greedy, run
from tests.models import TP_TARGETS, make_adapter, prompts, read_vocab, tp_model_with_adapters

TP = 2
NEW_TOKENS = 8
KV_TOKENS = 1000  # the tensor-parallel run's max_total_tokens: 125 blocks of 8
RANK = 4
NUM_SLOTS = 3
TARGETS = TP_TARGETS
HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 64, 4, 2, 128, 2
TIMEOUT = timedelta(seconds=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tp")
    folder, adapters = tp_model_with_adapters(root, HIDDEN, INTER, (4, 2, 3))
    return {"folder": folder, "adapters": adapters,
            "prompts": prompts(8, read_vocab(folder), seed=5, lo=3, hi=20)}


@pytest.fixture(scope="module")
def want(setup: dict[str, Any]) -> dict[str, list[list[int]]]:
    """The tp_size 1 tokens every tensor-parallel run must reproduce."""
    out = run(serve(Engine.from_config(config(setup)), setup))
    assert out["base"] != out["mixed"]  # the adapters change the output
    return out


def config(setup: dict[str, Any], **kw: Any) -> ServerConfig:
    cfg: dict[str, Any] = {
        "model_path": str(setup["folder"]), "device": "cpu", "dtype": "float32",
        "page_size": 8, "kv_cache_cpu_bytes": 1 << 22, "max_lora_rank": RANK,
        "lora_target_modules": TARGETS, "max_loras_per_batch": NUM_SLOTS, "enable_lora": True,
        "lora_paths": tuple(LoraPathSpec(n, str(p)) for n, p in setup["adapters"].items()),
    }
    return ServerConfig(**(cfg | kw))


def mixed(setup: dict[str, Any]) -> list[str | None]:
    names = [None, *setup["adapters"]]
    return [names[i % len(names)] for i in range(len(setup["prompts"]))]


async def serve(engine: Engine, setup: dict[str, Any]) -> dict[str, list[list[int]]]:
    """A base-only batch, then a batch mixing base rows and every adapter."""
    await engine.start()
    try:
        out = {}
        for label, loras in (("base", [None] * len(setup["prompts"])), ("mixed", mixed(setup))):
            reqs = [await engine.submit(p, greedy(NEW_TOKENS), lo)
                    for p, lo in zip(setup["prompts"], loras)]
            out[label] = list(await asyncio.gather(*(collect(engine, r) for r in reqs)))
        return out
    finally:
        await engine.stop()


def shard_report(model: torch.nn.Module, pool: Any, kv: Any) -> dict[str, Any]:
    """Shapes of layer 0's weights, LoRA slot buffers and KV heads; bytes of all base weights."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters() if ".1." not in n}
    shapes["kv.heads"] = list(kv.k[0].shape[2:])  # [kv heads, head dim] of every block
    shapes["kv.blocks"] = [kv.k[0].shape[0]]
    for g, bufs in pool.layers[0].items():
        shapes[f"lora.{g}.A"], shapes[f"lora.{g}.B"] = list(bufs.A.shape), list(bufs.B.shape)
    shapes["lora.lm_head.B"] = list(pool.lm_head.B.shape)
    nbytes = sum(p.nbytes for p in model.parameters())
    return {"shapes": shapes, "nbytes": nbytes}


def expected_report(vocab: int) -> dict[str, Any]:
    d = HIDDEN // HEADS
    q, kv, i, v = HEADS * d // TP, KV_HEADS * d // TP, INTER // TP, local_vocab(vocab, TP)
    layer = {
        "self_attn.qkv_proj.weight": [q + 2 * kv, HIDDEN],  # column parallel by heads
        "self_attn.o_proj.weight": [HIDDEN, q],  # row parallel
        "mlp.gate_up_proj.weight": [2 * i, HIDDEN],
        "mlp.down_proj.weight": [HIDDEN, i],
        "input_layernorm.weight": [HIDDEN],
        "post_attention_layernorm.weight": [HIDDEN],
    }
    shapes = {f"layers.0.{k}": s for k, s in layer.items()}
    shapes["kv.heads"] = [KV_HEADS // TP, d]
    shapes["kv.blocks"] = [KV_TOKENS // 8]  # max_total_tokens' whole pages on every rank
    shapes |= {"embed_tokens.weight": [v, HIDDEN], "norm.weight": [HIDDEN],
               "lm_head.weight": [v, HIDDEN]}
    shapes |= {  # column parallel: A whole, B sharded; row parallel: A sharded, B whole
        "lora.qkv.A": [NUM_SLOTS, 3 * RANK, HIDDEN], "lora.qkv.B": [NUM_SLOTS, q + 2 * kv, RANK],
        "lora.o.A": [NUM_SLOTS, RANK, q], "lora.o.B": [NUM_SLOTS, HIDDEN, RANK],
        "lora.gate_up.A": [NUM_SLOTS, 2 * RANK, HIDDEN],
        "lora.gate_up.B": [NUM_SLOTS, 2 * i, RANK],
        "lora.down.A": [NUM_SLOTS, RANK, i], "lora.down.B": [NUM_SLOTS, HIDDEN, RANK],
        "lora.lm_head.B": [NUM_SLOTS, v, RANK],
    }
    per_layer = (q + 2 * kv) * HIDDEN + HIDDEN * q + 3 * i * HIDDEN + 2 * HIDDEN
    nbytes = 4 * (LAYERS * per_layer + 2 * v * HIDDEN + HIDDEN)
    return {"shapes": shapes, "nbytes": nbytes}


def worker_main(
    rank: int, init_method: str, cfg: ServerConfig, report: str, read_delay_s: float = 0.0,
    eio_flag: str = "",
) -> None:
    from runtime.tp import build_worker, end_worker_process, init_tp, worker_loop

    tp = init_tp(rank, TP, init_method, torch.device("cpu"), TIMEOUT)
    try:
        worker = build_worker(cfg, tp)
        shards = shard_report(worker.rank_model.model, worker.pool, worker.kv)
        Path(report).write_text(json.dumps(shards))
        if read_delay_s:
            worker.read_hook = lambda path, slot: time.sleep(read_delay_s)
        if eio_flag:  # the machine's read error on every read while the flag file exists
            worker.read_hook = lambda path, slot: _eio_while(eio_flag, path)
        worker_loop(worker)
    finally:
        dist.destroy_process_group()
    end_worker_process()  # as run_worker does


def _eio_while(flag: str, path: str) -> None:
    from runtime.adapters.peft_format import read_error

    if os.path.exists(flag):
        raise read_error(f"could not read {path}", OSError(errno.EIO, "Input/output error"))


def with_worker(cfg: ServerConfig, report: Path, body: Any, read_delay_s: float = 0.0,
                eio_flag: str = "") -> Any:
    """Run rank 1 in a spawned process and `body(engine)` as rank 0; body's result."""
    from runtime.tp import TPEngine, free_init_method, init_tp

    init_method = free_init_method()
    worker = mp.get_context("spawn").Process(
        target=worker_main, args=(1, init_method, cfg, str(report), read_delay_s, eio_flag)
    )
    worker.start()
    try:
        tp = init_tp(0, TP, init_method, torch.device("cpu"), TIMEOUT)
        try:
            out = body(TPEngine.from_group(cfg, tp))
        finally:
            dist.destroy_process_group()
        worker.join(timeout=60)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
    return out


def test_tp2_matches_tp1_and_holds_shards(
    setup: dict[str, Any], want: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    report = tmp_path / "rank1.json"

    def body(engine: Engine) -> tuple[dict[str, Any], Any]:
        assert engine.adapters is not None
        rank0 = shard_report(engine.model, engine.adapters.pool, engine.kv_cache)
        return rank0, run(serve(engine, setup))

    rank0, got = with_worker(config(setup, tp_size=TP, max_total_tokens=KV_TOKENS), report, body)
    assert got == want
    expected = expected_report(read_vocab(setup["folder"]))
    assert rank0 == expected
    assert json.loads(report.read_text()) == expected


def test_indivisible_heads_are_refused() -> None:
    from runtime.model.llama import ModelArgs
    from runtime.model.parallel import local_args

    args = ModelArgs(vocab_size=10, hidden_size=48, intermediate_size=64, num_layers=1,
                     num_heads=3, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-6,
                     max_position=64, tie_word_embeddings=False, qkv_bias=False, qk_norm=False)
    with pytest.raises(ValueError, match="tp_size: 2 does not divide"):
        local_args(args, 2)


def test_slow_worker_upload_does_not_block_the_loop(
    setup: dict[str, Any], want: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    """Rank 1 takes READ_DELAY_S to read every adapter. Meanwhile rank 0's loop keeps ticking
    and serving base requests while the adapter stays UPLOADING; its request is admitted only
    once rank 1 has reported the upload done, and then matches tp_size 1."""
    delay = 2.0
    prompt = setup["prompts"][2]  # "attn" in the mixed batch
    assert mixed(setup)[2] == "attn"

    async def go(engine: Engine) -> dict[str, Any]:
        assert engine.adapters is not None
        await engine.start()
        gaps: list[float] = []

        async def tick() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        try:
            t0 = time.monotonic()
            lora_req = await engine.submit(prompt, greedy(NEW_TOKENS), "attn")
            lora_out = asyncio.create_task(collect(engine, lora_req))
            state_at_submit = engine.adapters.state("attn")
            base = [await engine.submit(p, greedy(NEW_TOKENS)) for p in setup["prompts"][:4]]
            base_out = list(await asyncio.gather(*(collect(engine, r) for r in base)))
            base_s = time.monotonic() - t0
            state_after_base = engine.adapters.state("attn")
            lora_tokens = await lora_out
            lora_s = time.monotonic() - t0
            state_at_end = engine.adapters.state("attn")
        finally:
            ticker.cancel()
            await engine.stop()
        return {"base": base_out, "lora": lora_tokens, "base_s": base_s, "lora_s": lora_s,
                "states": [state_at_submit, state_after_base, state_at_end],
                "max_gap_s": max(gaps), "admitted": lora_req.admitted_time - t0}

    got = with_worker(config(setup, tp_size=TP), tmp_path / "rank1.json",
                      lambda engine: run(go(engine)), read_delay_s=delay)
    assert got["states"] == [Residency.UPLOADING, Residency.UPLOADING, Residency.RESIDENT]
    assert got["base"] == want["base"][:4]
    assert got["base_s"] < delay  # served while the upload was in flight
    assert got["admitted"] >= delay  # only after rank 1 reported its copy done
    assert got["lora"] == want["mixed"][2]
    assert got["max_gap_s"] < 0.5, got["max_gap_s"]  # the loop never waited on the upload


def test_worker_read_error_answers_retryable(
    setup: dict[str, Any], want: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    """Rank 1's read of an adapter meets the machine's read error (EIO) while rank 0's read
    went through. Before, the upload failed as any other ("upload failed on 1 rank") and its
    request answered 500; the same error on rank 0's own read answers 503 with Retry-After.
    Now the worker reports it as a read error: the request ends saying so, marked retryable
    (a 503), and once the machine reads again the adapter serves tp_size 1's tokens."""
    flag = tmp_path / "eio"
    flag.touch()
    prompt = setup["prompts"][2]  # "attn" in the mixed batch

    async def go(engine: Engine) -> tuple[Any, bool, list[int]]:
        await engine.start()
        try:
            req = await engine.submit(prompt, greedy(NEW_TOKENS), "attn")
            last = None
            async for out in engine.stream(req):
                last = out
            flag.unlink()
            tokens = await collect(engine, await engine.submit(prompt, greedy(NEW_TOKENS),
                                                               "attn"))
            return last, req.error_retryable, tokens
        finally:
            await engine.stop()

    last, retryable, tokens = with_worker(config(setup, tp_size=TP), tmp_path / "rank1.json",
                                          lambda engine: run(go(engine)), eio_flag=str(flag))
    assert last is not None and last.finished and not last.output_token_ids
    assert "upload failed on 1 tensor-parallel rank" in (last.error or "")
    assert "could not read the adapter's files" in (last.error or ""), last.error
    assert retryable
    assert tokens == want["mixed"][2]


def test_launch_and_failed_upload_on_a_worker(
    setup: dict[str, Any], want: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    """Engine.from_config spawns rank 1 itself. An adapter whose weights file vanishes after
    rank 0 read it fails to upload on rank 1, which fails the request everywhere; once the very
    file is back (moved back: the same stat signature) the adapter serves the same tokens as at
    tp_size 1."""
    import shutil

    attn = want["mixed"][2]  # "attn", prompt 2
    late = tmp_path / "late"
    shutil.copytree(setup["adapters"]["attn"], late)
    weights = late / "adapter_model.safetensors"
    engine = Engine.from_config(config(setup, tp_size=TP, lora_paths=()))

    async def go() -> tuple[Any, list[int]]:
        await engine.start()
        try:
            await engine.load_adapter("late", str(late))
            away = tmp_path / "away.safetensors"
            os.rename(weights, away)
            req = await engine.submit(setup["prompts"][2], greedy(NEW_TOKENS), "late")
            last = None
            async for out in engine.stream(req):
                last = out
            os.rename(away, weights)
            req = await engine.submit(setup["prompts"][2], greedy(NEW_TOKENS), "late")
            return last, await collect(engine, req)
        finally:
            await engine.stop()

    failed, tokens = run(go())
    assert failed is not None and failed.finished
    assert "upload failed on 1 tensor-parallel rank" in (failed.error or "")
    assert tokens == attn


def test_load_in_place_shards_each_version(
    setup: dict[str, Any], want: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    """A load in place at tp_size 2 while a request runs on the old version: every rank
    reads the new version into its own slot, the running request finishes with the old
    adapter's tp_size 1 tokens and a request submitted after with the new one's."""
    first, second = list(setup["adapters"])[:2]
    at = {name: mixed(setup).index(name) for name in (first, second)}
    engine = Engine.from_config(config(setup, tp_size=TP, lora_paths=()))

    async def go() -> tuple[list[int], list[int]]:
        await engine.start()
        try:
            await engine.load_adapter("live", str(setup["adapters"][first]))
            old = await engine.submit(setup["prompts"][at[first]], greedy(NEW_TOKENS), "live")
            stream = engine.stream(old)
            await anext(stream)
            await engine.load_adapter("live", str(setup["adapters"][second]), inplace=True)
            new = await engine.submit(setup["prompts"][at[second]], greedy(NEW_TOKENS), "live")
            last = [o async for o in stream][-1]
            return last.output_token_ids, await collect(engine, new)
        finally:
            await engine.stop()

    old_tokens, new_tokens = run(go())
    assert old_tokens == want["mixed"][at[first]]
    assert new_tokens == want["mixed"][at[second]]


def test_worker_reads_repeat_the_path_checks(
    setup: dict[str, Any], want: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    """Every upload has each worker read the adapter from disk, long after rank 0 checked its
    folder at the first load. Once its slot is taken, a run-time adapter under lora_roots whose
    weights were swapped for a link out of the roots, whose folder was swapped for a link, or
    whose files now hold another rank and targets, was read by rank 1 as it was (only rank 0's
    reads repeated the checks), and so were weights rewritten in place with the same rank and
    targets (rank 1 then sharded other weights than rank 0 kept). Now rank 1 refuses the read:
    the request ends with the reason, the other adapters keep serving, and the adapter whose
    very files are put back serves again."""
    import shutil

    attn = want["mixed"][2]  # "attn", prompt 2
    prompt = setup["prompts"][2]
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    outside.mkdir()
    names = ("linked", "moved", "rerank", "rewritten")
    for name in names:
        shutil.copytree(setup["adapters"]["attn"], roots / name)
    weights = "adapter_model.safetensors"
    engine = Engine.from_config(config(setup, tp_size=TP, lora_roots=(str(roots),)))

    def link_weights_out() -> None:
        os.rename(roots / "linked" / weights, outside / weights)
        os.symlink(outside / weights, roots / "linked" / weights)

    def link_folder_out() -> None:
        shutil.move(roots / "moved", outside / "moved")
        os.symlink(outside / "moved", roots / "moved")

    def other_rank() -> None:
        for file in ("adapter_config.json", weights):
            shutil.copyfile(setup["adapters"]["mlp"] / file, roots / "rerank" / file)

    reseeded = make_adapter(setup["folder"], tmp_path / "reseeded", rank=2, seed=9,
                            targets=["q_proj", "v_proj", "o_proj"])  # attn's rank and targets

    def rewrite() -> None:
        shutil.copyfile(reseeded / weights, roots / "rewritten" / weights)

    async def serve_each(loras: list[str]) -> list[Any]:
        reqs = [await engine.submit(prompt, greedy(NEW_TOKENS), lo) for lo in loras]
        outs = []
        for req in reqs:
            last = None
            async for out in engine.stream(req):
                last = out
            outs.append(last)
        return outs

    async def go() -> dict[str, Any]:
        assert engine.adapters is not None
        await engine.start()
        try:
            for name in names:
                await engine.load_adapter(name, name)  # relative to the root
            first = [o.output_token_ids for o in await serve_each(list(names))]
            # the startup adapters take every slot (NUM_SLOTS): the next use uploads again
            await serve_each(list(setup["adapters"]))
            states = [engine.adapters.state(n) for n in names]
            link_weights_out()
            link_folder_out()
            other_rank()
            rewrite()
            refused, still = {}, []
            for name in names:
                [out] = await serve_each([name])
                refused[name] = (out.finished, out.error or "", out.output_token_ids)
                [out] = await serve_each(["attn"])
                still.append(out.output_token_ids)
            (roots / "linked" / weights).unlink()  # the same file back: same stat signature
            os.rename(outside / weights, roots / "linked" / weights)
            [restored] = await serve_each(["linked"])
            return {"first": first, "states": states, "refused": refused, "still": still,
                    "restored": restored.output_token_ids}
        finally:
            await engine.stop()

    got = run(go())
    assert got["first"] == [attn] * len(names)
    assert got["states"] == [Residency.IN_HOST] * len(names)
    for name, (finished, error, tokens) in got["refused"].items():
        assert finished and not tokens, (name, error, tokens)
        assert "could not be loaded" in error and "upload failed on 1 tensor-parallel rank" \
            in error and "refused" in error, (name, error)
    assert got["still"] == [attn] * len(names)
    assert got["restored"] == attn


def test_upload_messages_carry_what_a_worker_checks() -> None:
    """A sync's uploads reach the worker with the folder, the lora_roots it was checked
    against, the rank, the target modules and the files' signature digest of the first load,
    byte for byte."""
    from runtime.adapters.paths import AdapterFolder
    from runtime.tp import AdapterOnDisk, pack_uploads, unpack_uploads

    odd = os.fsdecode(b"/srv/lora/caf\xe9")  # not UTF-8: as os.listdir would give it
    sent = [
        (2, 7, AdapterOnDisk("caf\u00e9", AdapterFolder(odd, ("/srv/lora", "rel/x")), 8,
                             frozenset({"q_proj", "v_proj"}), (1 << 56) - 1)),
        (0, 8, AdapterOnDisk("s", AdapterFolder("/opt/a", ()), 4, frozenset(), 0)),
    ]
    assert unpack_uploads(pack_uploads(sent), len(sent)) == sent


def test_tp_bench_quick(tmp_path: Path) -> None:
    """The tensor-parallel step benchmark's smoke run: tiny model, CPU, gloo, both tp sizes."""
    from benchmarks.tp_bench import main

    out = tmp_path / "tp.json"
    result = main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["cuda_graphs_at_tp_gt_1"] is False  # no CUDA here: both tp sizes eager
    cases = {(1, 0), (4, 0), (1, 1), (4, 4)}  # (batch, distinct adapters)
    got = {(r["tp"], r["batch"], r["adapters"]) for r in result["rows"]}
    assert got == {(tp, *c) for tp in (1, 2) for c in cases}
    assert all(r["median_ms"] > 0 and not r["cuda_graphs"] for r in result["rows"])
    assert {(s["batch"], s["adapters"]) for s in result["summary"]} == cases
    assert all(s["tp2_eager_ms"] and s["speedup_mode"] == "eager" and s["speedup_tp2_vs_tp1"]
               and s["tp1_graphs_ms"] is None for s in result["summary"])


def test_end_worker_process_flushes_and_exits_zero() -> None:
    """A worker that shut down cleanly leaves at once with status 0 and its output flushed
    (stdout to a pipe is block-buffered: a bare os._exit would lose it)."""
    code = ("import logging, sys; from runtime.tp import end_worker_process; "
            "logging.basicConfig(stream=sys.stderr); print('done', end=''); "
            "logging.getLogger('w').warning('logged'); end_worker_process(); print('never')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[1], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "done"
    assert "logged" in out.stderr


class FakeWorker:
    """A worker process as WorkerWatch sees it: its exit status, None while it runs."""

    def __init__(self) -> None:
        self.exitcode: int | None = None


def test_worker_watch_reports_the_first_worker_to_exit_once() -> None:
    """Rank 0's watch names the first worker it sees exited (rank and status), once; after
    `disarm` (a shutdown) an exit is no news."""
    from runtime.tp import WorkerWatch

    procs = [FakeWorker(), FakeWorker()]
    seen: list[tuple[int, int]] = []
    watch = WorkerWatch(procs, on_death=lambda r, c: seen.append((r, c)), interval_s=0.01)
    watch.start()
    time.sleep(0.1)
    assert seen == []
    procs[1].exitcode = -9  # rank 2, killed
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    procs[0].exitcode = 1
    time.sleep(0.1)
    assert seen == [(2, -9)]

    procs = [FakeWorker()]
    seen.clear()
    watch = WorkerWatch(procs, on_death=lambda r, c: seen.append((r, c)), interval_s=0.01)
    watch.start()
    watch.disarm()
    procs[0].exitcode = 0
    time.sleep(0.1)
    assert seen == []


def test_dead_worker_ends_rank_0_with_a_message() -> None:
    """The watch's default answer: rank 0 logs which worker exited and how, then exits with
    status 1 at once (its next collective would wait on the missing rank until NCCL's
    timeout)."""
    code = ("import time; from runtime.tp import WorkerWatch\n"
            "class P:\n    exitcode = 5\n"
            "WorkerWatch([P()], interval_s=0.01).start(); time.sleep(30); print('never')")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "never" not in out.stdout
    assert "worker rank 1 exited with status 5" in out.stderr, out.stderr


def test_failed_unissued_upload_frees_a_gathered_slot() -> None:
    """Under tensor parallelism a slot's ready flag is rank 0's event wrapped with the workers'
    reports: a failure issuing rank 0's copies (a batch issued at a poll) is matched
    through the wrapper, so the slot is freed as on one GPU, not left uploading forever."""
    from runtime.adapters.manager import AdapterManager
    from runtime.streams import IssuedEvent
    from runtime.tp import GatheredReady, TPAdapterManager

    own = IssuedEvent()
    gathered = GatheredReady(own, driver=None, slot=0, generation=1)  # type: ignore[arg-type]
    assert TPAdapterManager._own_ready(gathered) is own
    assert TPAdapterManager._own_ready(own) is own and TPAdapterManager._own_ready(None) is None
    assert AdapterManager._own_ready(gathered) is gathered  # one GPU: nothing wraps it


def test_decode_step_unpacks_with_real_counts_and_takes_the_workers_graphs() -> None:
    """A decode plan of 3 rows over 2 adapters and the base, packed by rank 0 and unpacked on a
    worker: its LoRA table carries the real entry counts a decode graph's replay copies into its
    padded tables, and the worker replays its graphs exactly where they hold the step (rank 0's
    runner makes the same choice: `DecodeGraphs.can_run`)."""
    from ops.lora import build_lora_batch_info
    from runtime.model.batch import ForwardBatch
    from runtime.tp import _worker_step, pack_step, unpack_step

    ranks = torch.tensor([4, 4, 4], dtype=torch.int32)
    info = build_lora_batch_info([-1, 0, 2], ranks, "csgmv", 16, "cpu")
    fb = ForwardBatch(
        input_ids=torch.tensor([5, 6, 7]), positions=torch.tensor([3, 9, 4]),
        slot_mapping=torch.tensor([3, 25, 36]),
        block_tables=torch.tensor([[0, 0], [1, 3], [4, 0]], dtype=torch.int32),
        kv_lens=torch.tensor([4, 10, 5], dtype=torch.int32),
        cu_q_lens=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
        logits_indices=torch.tensor([0, 1, 2]), max_q_len=1, is_decode=True,
        lora=info, lora_logits=info,
    )
    header, payload = pack_step(fb)
    got = unpack_step(header + [0] * (16 - len(header)), payload, ranks, "csgmv")
    assert got.lora is not None and got.lora.counts is not None
    assert got.lora.counts.tolist() == info.counts.tolist() == [3, 3]
    assert torch.equal(got.block_tables, fb.block_tables) and got.is_decode

    class Graphs:  # what the worker asks of its DecodeGraphs
        def __init__(self, holds: bool) -> None:
            self.holds, self.replayed = holds, []

        def can_run(self, step: ForwardBatch) -> bool:
            return self.holds

        def replay(self, step: ForwardBatch) -> None:
            self.replayed.append(step.batch_size)

    class Model:
        def __init__(self) -> None:
            self.ran = 0

        def __call__(self, step: ForwardBatch, k: Any, v: Any) -> None:
            self.ran += 1

    class Fake:  # the Worker fields _worker_step reads
        def __init__(self, holds: bool) -> None:
            self.pool = type("Pool", (), {"slot_ranks": ranks})()
            self.config = ServerConfig(model_path="unused", lora_backend="csgmv")
            self.graphs, self.rank_model = Graphs(holds), type("RM", (), {"model": Model()})()
            self.kv = type("KV", (), {"k": [], "v": []})()
            self.streams = type("S", (), {"event": staticmethod(lambda: _NoEvent())})()
            self.last_step = None

    for holds in (True, False):
        w = Fake(holds)
        _worker_step(w, header + [0] * (16 - len(header)), payload)
        assert (w.graphs.replayed, w.rank_model.model.ran) == (([3], 0) if holds else ([], 1))


class _NoEvent:
    def record(self) -> None:
        pass


def test_all_targets_leave_embed_tokens_out_at_tp() -> None:
    """SGLang's lora_target_modules "all" starts a tensor-parallel server: embed_tokens (which
    tensor parallelism does not adapt) is left out; named explicitly it stays, to be refused."""
    from runtime.adapters.manager import resolve_pool_spec
    from runtime.adapters.pool import ALL_MODULES, EMBED
    from runtime.tp import tp_targets

    base = {"model_path": "unused", "tp_size": 2, "enable_lora": True, "max_lora_rank": 8}
    every = ServerConfig(**base, lora_target_modules=("all",))
    _, targets = resolve_pool_spec(every, 2)
    assert targets == ALL_MODULES and tp_targets(every, targets) == ALL_MODULES - {EMBED}
    named = ServerConfig(**base, lora_target_modules=("q_proj", EMBED))
    assert tp_targets(named, frozenset({"q_proj", EMBED})) == {"q_proj", EMBED}


def test_tp2_prefix_cache_matches_tp1(setup: dict[str, Any], tmp_path: Path) -> None:
    """With the prefix cache at tp 2, rank 0 plans prefills that start after a cached prefix
    and every rank reads its own shard of those blocks: the tokens equal tp 1's without the
    cache, and the second request of each adapter takes the prefix."""
    vocab = read_vocab(setup["folder"])
    prefix = [3 + (7 * i) % (vocab - 6) for i in range(20)]  # two full blocks of 8, and 4
    name = next(iter(setup["adapters"]))
    asks = [(prefix + [5, 6], None), (prefix + [7, 8, 9], None), (prefix + [5], name),
            (prefix + [6, 6], name)]

    async def go(engine: Engine) -> list[tuple[list[int], int]]:
        await engine.start()
        try:
            out = []
            for p, lora in asks:
                req = await engine.submit(p, greedy(NEW_TOKENS), lora)
                out.append((await collect(engine, req), req.cached_tokens))
            return out
        finally:
            await engine.stop()

    want = run(go(Engine.from_config(config(setup))))
    got = with_worker(config(setup, tp_size=TP, enable_prefix_caching=True),
                      tmp_path / "rank1.json", lambda engine: run(go(engine)))
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [c for _, c in got] == [0, 16, 0, 16]
