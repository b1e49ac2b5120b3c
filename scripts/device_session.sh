#!/usr/bin/env bash
# One device session in phases, each one device call on a 2-GPU machine (nvidia-h200-x2):
#   scripts/device_session.sh s56a   (one GPU) the prefix cache on CUDA: the engine tests on the
#                                    GPU, then the soak with the prefix cache
#   scripts/device_session.sh s56b   (one GPU) the prefix cache's serving gain: a shared-prefix
#                                    workload without the cache, then with it
#   scripts/device_session.sh s55a   (one GPU) rotary and sampler tests on CUDA, every step
#                                    target at the default, HF parity while time remains
#   scripts/device_session.sh tp     tensor-parallel GPU tests and tp_bench on both GPUs
#   scripts/device_session.sh s32tp  tp 2 with CUDA graphs: the tensor-parallel GPU tests, tp_bench
#   scripts/device_session.sh s32g   (one GPU) tp decode graphs over a one-rank group, graph tests
#   scripts/device_session.sh gpu1   the >= 10-minute soak started in the background on GPU 1;
#                                    the TP parity tests again; GPU tests and step benchmarks
#                                    on GPU 0
#   scripts/device_session.sh final  (one GPU) GPU tests in separate processes, responsiveness,
#                                    step benchmark
#   scripts/device_session.sh check  (one GPU) every GPU test file in its own process, then
#                                    the upload benchmark
#   scripts/device_session.sh diag   (one GPU) graph tests, kernel-category profile of the
#                                    decode/prefill cases, the LoRA kernel microbenchmark with
#                                    its sweep, the serving benchmark against a live server
#   scripts/device_session.sh verify (one GPU) GPU tests of the kernels and graphs, step
#                                    benchmark with adapters, LoRA kernel microbenchmark
#   scripts/device_session.sh serving (one GPU) HF PEFT baseline side by side, many adapters
#   scripts/device_session.sh qwen   (one GPU) step benchmark with adapters on Qwen2.5-7B shapes,
#                                    the serving benchmark again
#   scripts/device_session.sh repeat (one GPU) graphs vs eager and /health latency, 3 runs each
#   scripts/device_session.sh many   (one GPU) the 1000-adapter benchmark
#   scripts/device_session.sh mixed  (one GPU) prefill-graph tests, HF baseline, serving benchmark
#   scripts/device_session.sh profile (one GPU) loop_profile, many_adapters --profile
#   scripts/device_session.sh steps  (one GPU) engine/pipeline GPU tests, step_bench --lora with
#                                    PDL off and on
#   scripts/device_session.sh staged (one GPU) staging/graph/engine GPU tests, loop_profile
#   scripts/device_session.sh loads  (one GPU) many_adapters --profile, the HF baseline
#   scripts/device_session.sh warm   (one GPU) warm-up GPU test, engine tests, serving benchmark
#   scripts/device_session.sh warm2  (one GPU) every GPU test file the warm-up fixes touch
#   scripts/device_session.sh kwin   (one GPU) kernel categories inside the saturated
#                                    many-adapter runs, caps 256 and 32
#   scripts/device_session.sh rows   (one GPU) recycled host rows: upload and pipeline GPU
#                                    tests, saturated 256-cap many-adapter runs
#   scripts/device_session.sh pdl1   (one GPU) step targets with PDL on, then on Qwen2.5-7B
#                                    shapes
#   scripts/device_session.sh many2  (one GPU) many_adapters unsampled, the HF baseline
#   scripts/device_session.sh manycap (one GPU) many_adapters with max_loras_per_batch 256
#   scripts/device_session.sh rowsx  (one GPU) the row-block LoRA expand: GPU tests of the LoRA
#                                    ops, the LoRA kernel benchmark (both expands)
#   scripts/device_session.sh rowsy  (one GPU) warm-up, engine and LoRA graph-replay GPU tests,
#                                    the step targets, the saturated 256-cap many-adapter run
#   scripts/device_session.sh reader (one GPU) adapter reads in reader processes: upload,
#                                    engine, pipeline and warm-up GPU tests, pin_stall, the
#                                    saturated 256-cap many-adapter run with process and thread
#                                    reads, the 32-cap run
#   scripts/device_session.sh overlap (one GPU) the LoRA shrink on a side stream in graphs: its
#                                    GPU tests, the graph, engine, pipeline and warm-up tests,
#                                    the step targets
#   scripts/device_session.sh foldt  (one GPU) LoRA expands folded into the next kernels: the
#                                    fold tests on CUDA, decode graphs against eager, warm-up
#                                    and engine GPU tests
#   scripts/device_session.sh fold   (one GPU) step targets with no fold, and with every group
#                                    folded
#   scripts/device_session.sh foldl  (one GPU) the default folds (qkv, gate_up): fold tests on
#                                    CUDA, decode graphs against eager, step targets, the
#                                    saturated 256-cap many-adapter run
#   scripts/device_session.sh s13f   (one GPU) the attention kernels over their shared tile step:
#                                    attention GPU tests, attn_bench, step targets
#   scripts/device_session.sh s13d   (one GPU) HF PEFT baseline side by side, adapter upload
#                                    bandwidth, step targets again
#   scripts/device_session.sh fold2  (one GPU) add+RMSNorm's fold over several programs a row:
#                                    fold tests on CUDA, decode graphs against eager with every
#                                    group folded, step targets folding qkv and gate_up against
#                                    all four, a kernel profile of the graph replays
#   scripts/device_session.sh foldv  (one GPU) the landed folds: fold tests on CUDA, decode
#                                    graphs against eager
#   scripts/device_session.sh f12a   (one GPU) SiLU*up fold variants alone (fold_bench), ncu
#                                    on them, the projections' GEMMs alone (gemm_bench)
#   scripts/device_session.sh f12f   (one GPU) the landed folds (partials summed beside the
#                                    projection, SiLU*up's fold over row groups): fold tests on
#                                    CUDA, decode graphs against eager, warm-up and engine GPU
#                                    tests, step targets, the saturated 256-cap many-adapter run
#   scripts/device_session.sh s13c   (one GPU) the landed code: decode attention, fold, decode
#                                    graph, warm-up and engine GPU tests; step targets; the
#                                    saturated 256-cap many-adapter run
#   scripts/device_session.sh s14e   (one GPU) cuBLASLt against torch's default BLAS route: the
#                                    projections alone (gemm_bench), step targets with each
#   scripts/device_session.sh s14f   (one GPU) base decode steps alone, cuBLASLt and torch's
#                                    default BLAS route alternating, two processes each
#   scripts/device_session.sh s15a   (one GPU, prepared for the next session) base decode graphs
#                                    captured with cuBLASLt from batch 16: the decode graph GPU
#                                    tests (the cuBLASLt one among them), step targets with
#                                    LORASERVE_DECODE_CUBLASLT_MIN_BS=16 and unset, alternating
#   scripts/device_session.sh s16b   (one GPU) layer PDL by default in decode graphs, folds
#                                    loading B before the wait, greedy's Triton argmax: their
#                                    GPU tests, the fold tests on CUDA, argmax_bench, step
#                                    targets by default and with LORASERVE_LAYER_PDL=0,
#                                    alternating
#   scripts/device_session.sh s16c   (one GPU) decode graph replays in bf16: with layer PDL
#                                    against without, bit for bit; against eager, with PDL and
#                                    without
#   scripts/device_session.sh s16d   (one GPU) the landed code: a kernel profile of the decode
#                                    graph replays, the HF PEFT baseline side by side, the step
#                                    targets
#   scripts/device_session.sh s17a   (one GPU) under layer PDL: step targets by default, with
#                                    the LoRA kernels launched with PDL (LORASERVE_ENABLE_PDL=1),
#                                    with the fold's partials left split
#                                    (LORASERVE_FOLD_PRESUM=0), and by default again
#   scripts/device_session.sh s18a   (one GPU) decode attention's launch configurations and
#                                    slice counts (attn_bench --configs), then s17a
#   scripts/device_session.sh s18d   (one GPU) kernel timelines of the decode graph replays
#                                    (step_bench --profile --profile-graphs --timeline)
#   scripts/device_session.sh s18f   (one GPU) step targets with the decode shrink's slices
#                                    folded into one tile (LORASERVE_SHRINK_FOLD_DECODE=1), twice
#   scripts/device_session.sh s18g   (one GPU) the decode shrink
#                                    alone over its knobs (shrink_bench), then step targets by
#                                    default, with its A loads waiting on the slot alone
#                                    (LORASERVE_SHRINK_EAGER=1, twice) and with its K tile at 512
#                                    columns (LORASERVE_SHRINK_DECODE_BLOCK_K=512), about 8 min
#   scripts/device_session.sh s19b   (one GPU) the decode shrink beside its projection against
#                                    the stacked GEMM ([W; A] in one cuBLAS call), about 2 min
#   scripts/device_session.sh s19d   (one GPU) the stacked graphs chosen per step: GPU tests,
#                                    step targets without stacks and by default twice, 6 min
#   scripts/device_session.sh s41a   (one GPU) gate_up and SiLU*up in one decode GEMM launch
#                                    (LORASERVE_DECODE_GATE_UP): its CUDA tests, gate_up alone
#                                    over tilings, base steps at batch 32 with it and without,
#                                    alternating; about 9 min
#   scripts/device_session.sh s41b   (one GPU) base steps by default and with the one-launch
#                                    gate_up at three tilings, alternating, three rounds
#   scripts/device_session.sh s41c   (one GPU) the one-launch gate_up by default: GPU tests of
#                                    the decode GEMM paths; the 8-slot pool's targets by default
#                                    and with gate_up's LoRA stacks on the GEMM, alternating
#   scripts/device_session.sh s53a   (one GPU, prepared for the next session) the rotary
#                                    kernel's work inside decode attention: GPU tests, base
#                                    steps with it and by default, three rounds, the loop
#                                    profiled with it and by default; ~7 min
#   scripts/device_session.sh s53b   (one GPU, prepared) the decode graphs' copies replayed in
#                                    turn: graph_gap's copies, graph tests, base steps with
#                                    them and by default, three rounds, the loop profiled; ~6 min
#   scripts/device_session.sh s54b   (one GPU, prepared) the rotary kernels without FMA
#                                    contraction: their tests on CUDA, parity with HF by
#                                    default and with LORASERVE_DECODE_ATTN_ROPE=1, base steps
#                                    with it, with gate_up's SiLU·up on Triton's GEMM and by
#                                    default, alternating; ~9 min
#   scripts/device_session.sh s54a   (one GPU, prepared) every step target at the defaults:
#                                    the 32-slot and 8-slot pools' targets by default and
#                                    without the Gluon GEMM, alternating; base steps; ~9 min
#   scripts/device_session.sh s54c   (one GPU, prepared) the soak on CUDA at today's
#                                    default (480 s of 6 clients with churn; first since the
#                                    second device session); ~9 min
#   scripts/device_session.sh s53d   (one GPU) the Gluon decode GEMM by default: its wrapper
#                                    tests on CUDA, base steps with it and without, two
#                                    rounds; the 8-adapter target; gate_up on the Triton
#                                    kernel once; ~5 min
#   AB_SET="A=1 B=2" scripts/device_session.sh ab   (one GPU) base steps by default and with
#                                    the settings, alternating, AB_ROUNDS rounds (3); the loop
#                                    profiled with them and by default; ~7 min
#   scripts/device_session.sh s53c   (one GPU, prepared) the decode GEMM with W's first tiles
#                                    before the PDL wait (Gluon), two stage budgets: GPU tests,
#                                    the projections alone, base steps with each and by
#                                    default, two rounds, the loop profiled; ~8 min
#   scripts/device_session.sh s52d   (one GPU, prepared) the loop profiled three times, once with the
#                                    host's calls: each idle gap's median and largest; ~3 min
#   scripts/device_session.sh s52c   (one GPU) the rotary test again, when the host launches
#                                    each decode graph (--profile-host), base steps against
#                                    .ab/prev, three rounds; ~5 min
#   scripts/device_session.sh s52b   (one GPU) the kernel readback by default, the rotary
#                                    tables read at each position, no final gathers at decode:
#                                    GPU tests, base steps against the tree before (.ab/prev)
#                                    and with copies, alternating; the loop profiled; ~7 min
#   scripts/device_session.sh s52a   (one GPU) results written
#                                    to pinned host memory by a kernel: its tests on CUDA, the
#                                    graph start alone (graph_gap), base steps with it and by
#                                    default, the loop profiled; ~9 min
#   scripts/device_session.sh s51d   (one GPU) the readback test, more graph and parity tests at
#                                    the new defaults, the loop profiled, base steps; ~6 min
#   scripts/device_session.sh s51c   (one GPU) zero-copy decode steps and the readback stream by
#                                    default: their GPU tests, base steps with both and
#                                    without, alternating; ~6 min
#   scripts/device_session.sh s51b   (one GPU) results read back on their own stream, the
#                                    input kernel's loads first: GPU tests of the loop, graphs,
#                                    pipeline; base steps with it, with zero-copy, without; ~9 min
#   scripts/device_session.sh s51a   (one GPU) zero-copy decode
#                                    steps: the input kernel's and the graph tests with it,
#                                    base steps with it and without, the loop profiled; ~8 min
#   scripts/device_session.sh s50d   (one GPU) idle attention slices' early exit and 256-token
#                                    slices by default: their GPU tests, base steps by default
#                                    and with the old settings, alternating; ~8 min
#   scripts/device_session.sh s50c   (one GPU) the decode graphs without padding fills for rows
#                                    no graph reads: graph GPU tests, base steps with the
#                                    loop's host time by phase, against the fills; ~7 min
#   scripts/device_session.sh s50b   (one GPU) the decode graph tests with idle attention slices
#                                    leaving before the PDL wait, the bf16 replays by default,
#                                    the serving loop's batch 32 profiled with them and without
#                                    (device busy and idle, what moves the step's end); ~8 min
#   scripts/device_session.sh s50a   (one GPU) idle attention
#                                    slices leaving before the PDL wait over 256-token slices:
#                                    attention, parity and decode graph GPU tests with them,
#                                    base steps with them and by default, four rounds; ~9 min
#   scripts/device_session.sh s49f   (one GPU) idle attention slices leaving before the PDL
#                                    wait with 256-token slices: decode attention GPU tests,
#                                    base steps with them and by default, alternating; ~3 min
#   scripts/device_session.sh s49e   (one GPU) decode attention's 256-token slices at least
#                                    where a batch's programs fill the SMs: attention GPU
#                                    tests, attention alone over contexts, base steps with it
#                                    and with 64, alternating; ~6 min
#   scripts/device_session.sh s49d   (one GPU) base steps by default, with one decode attention
#                                    slice a sequence at batch 32, and with that and the lean
#                                    KV tile load, alternating, three rounds; ~7 min
#   scripts/device_session.sh s49c   (one GPU) qkv over 4 slices of K at three programs an SM:
#                                    qkv alone behind add+RMSNorm over tilings and slices, its
#                                    GPU tests, base steps with it and without alternating
#   scripts/device_session.sh s49b   (one GPU) the KV tile load's lean forms at batch 1: the
#                                    attention GPU tests with masked loads, the decode graphs
#                                    by kernel with clamped positions and signed arithmetic,
#                                    base steps over the three forms alternating; ~8 min
#   scripts/device_session.sh s49a   (one GPU) the KV tile load's lean index arithmetic: the
#                                    attention, parity and graph GPU tests, decode attention
#                                    alone with it and without, base steps alternating; ~8 min
#   scripts/device_session.sh s48c   (one GPU) the sampler's greedy path through penalize: the
#                                    sampler's and engine parity's GPU tests, graph replays
#   scripts/device_session.sh s48d   (one GPU, ran at a5b066b's test file, since reverted) the
#                                    decode graph tests over a decode state built one blocking
#                                    step at a time; more than 8 min
#   scripts/device_session.sh s48b   (one GPU) decode attention alone over launch configurations
#                                    of one and two warps and slice counts; about 4 min
#   scripts/device_session.sh s48a   (one GPU) decode attention under Nsight Compute at batch
#                                    32 and 1 over 143 tokens (default and one slice); ~3 min
#   scripts/device_session.sh s46d   (one GPU) logits in the model's dtype: GPU parity and
#                                    graph tests, batch 32's base graph by kernel; about 4 min
#   scripts/device_session.sh s46c   (one GPU) adapter uploads, the HF PEFT baseline, the
#                                    issue's many-adapter setting, at this code; about 9 min
#   scripts/device_session.sh s45a   (one GPU, prepared) the 32-slot targets with the split
#                                    plan and with at most 2 slices, alternating, 4 processes;
#                                    the 8-slot targets at the defaults; about 9 min
#   scripts/device_session.sh s44b   (one GPU) o's and down's stacks split as lora_split_plan
#                                    picks: GPU tests, the 32-slot targets with it and with at
#                                    most 2 slices; the fold epilogue's test and 8-slot step
#   scripts/device_session.sh s44a   (one GPU) gate_up's LoRA in its one launch, the fold
#                                    epilogue's tiles as vectors, pipelined: GPU tests, the
#                                    8-slot and 32-slot targets with it and without; ~9 min
#   scripts/device_session.sh s43c   (one GPU, prepared) batch 32's base graph by kernel at the
#                                    current defaults; about 2 min
#   scripts/device_session.sh s43b   (one GPU, prepared) o's and down's split stacks at
#                                    64:128:0:4:4 (the 32-slot pool's split as one wave): GPU
#                                    tests, 32-slot and 8-slot targets with and without; ~9 min
#   scripts/device_session.sh s42f   (one GPU) the 8-slot targets with the split stacks by
#                                    default and without; about 4 min
#   scripts/device_session.sh s42e   (one GPU) o's and down's stacked LoRA GEMMs over 2 slices
#                                    of K: GPU graph tests, 32-slot and 8-slot targets with and
#                                    without; about 9 min
#   scripts/device_session.sh s42d   (one GPU) the 32-slot targets, the 32-adapter graph's
#                                    kernel timeline, base steps with qkv/o/down at
#                                    64:128:0:4:4 and without, the 32-slot targets again
#   scripts/device_session.sh s42a   (one GPU) gate_up's LoRA added in its one launch
#                                    (LORASERVE_DECODE_GATE_UP_FOLD): its GPU tests, the 8-slot
#                                    pool's targets with it and without, alternating; ~9 min
#   scripts/device_session.sh s42b   (one GPU, prepared) the 32-slot targets with it and
#                                    without, alternating; about 8 min
#   scripts/device_session.sh s42c   (one GPU, prepared) base steps with qkv, o and down at the
#                                    gate_up's tiling (64:128:0:4:4) and by default, 3 rounds
#   scripts/device_session.sh s41d   (one GPU) gate_up's LoRA stacks on the decode GEMM by
#                                    default: the graph tests s41c's time left, the 32-slot
#                                    step targets
#   scripts/device_session.sh s40a   (one GPU) uploads, the HF PEFT baseline, the 8-slot pool's
#                                    step targets, the 32-slot ones once more; about 9 min
#   scripts/device_session.sh s40b   (one GPU) the issue's many-adapter setting at 64 new
#                                    tokens, the 32-slot step targets once more; about 8 min
#   scripts/device_session.sh s39b   (one GPU) batch 32's base graph by kernel with the GEMM on,
#                                    and which kernels move the step's end; about 2 min
#   scripts/device_session.sh s39a   (one GPU, prepared) qkv over 2 slices summed by the rotary
#                                    kernel: its CUDA tests, attention slices at batch 32, the
#                                    step targets with it, with one attention slice a sequence
#                                    at batch 32, with both and with neither; ~9 min
#   scripts/device_session.sh s20a   (one GPU, prepared for the next session) the targets the
#                                    pool's stacks may move, by default: adapter uploads, the HF
#                                    baseline, many adapters; about 8 min
#   scripts/device_session.sh s20b   (one GPU, prepared) step targets in the pools they name:
#                                    32 slots and 8 slots, twice each; about 7 min
#   scripts/device_session.sh s21a   (one GPU) the engine built with its pool before the
#                                    weights: engine GPU tests, uploads, 1000 adapters at cap 256
#   scripts/device_session.sh s21c   (one GPU) the other GPU test files, a process each
#   scripts/device_session.sh s22a   (one GPU, prepared) step targets with base-only decode
#                                    graphs from 16 rows captured with cuBLASLt, against the
#                                    default, two processes each; about 4 min
#   scripts/device_session.sh s22b   (one GPU, prepared) cuBLASLt's heuristic algorithms for
#                                    each decode projection against F.linear (gemm_bench
#                                    --lt-algos), then, where one wins, the step targets with
#                                    the decode graphs taking it (step_bench --lt-plan) against
#                                    without, two processes each; about 7 min
#   scripts/device_session.sh s23a   (one GPU) where the device idles in the serving loop's
#                                    decode steps (step_bench --profile-loop), by default and
#                                    with s22b's cuBLASLt plan; about 4 min
#   scripts/device_session.sh s23b   (one GPU) 1000 adapters against 8 at cap 256: every kernel
#                                    of a window into each saturated run (GPU busy share, ms a
#                                    step by kernel category), then the run unprofiled; 5 min
#   scripts/device_session.sh s23c   (one GPU) decode graphs from 16 rows captured with cuBLASLt,
#                                    base-only and LoRA graphs too, against the default: the
#                                    cuBLASLt graph tests, then the step targets, two processes a
#                                    setting, alternating; about 7 min
#   scripts/device_session.sh s23d   (one GPU) the 8-slot pool's step targets (max_loras_per_batch
#                                    8) with decode graphs from 16 rows captured with cuBLASLt
#                                    (LoRA graphs too) against the default, two processes each
#   scripts/device_session.sh s24b   (one GPU, prepared) o, down and qkv as one batched GEMM over
#                                    2-4 slices of K with fp32 partials (gemm_bench --split-k)
#                                    against F.linear with cuBLAS's split-K reduce; then, the
#                                    split-K decode graphs' GPU tests and the step targets with
#                                    LORASERVE_DECODE_SPLITK=2 against the default, two
#                                    processes each; about 7 min
#   scripts/device_session.sh s25a   (one GPU) the decode graphs' kernels by name, by default
#                                    and with LORASERVE_DECODE_SPLITK=2 (s24b: the batched GEMM
#                                    wins alone, not in the graph); about 2 min
#   scripts/device_session.sh s25d   (one GPU, prepared) split-K partials (LORASERVE_DECODE_SPLITK=2,
#                                    now below the cuBLASLt threshold only) at batches 1-8,
#                                    base-only, against the default, two processes each; 3 min
#   scripts/device_session.sh s26a   (one GPU) the layer kernels' GPU tests without the L2
#                                    prefetch (PDL chain, folds at Llama shapes, graphs with
#                                    and without PDL), then s25d; about 6 min
#   scripts/device_session.sh s26b   (one GPU) the end-to-end targets at this code: adapter
#                                    uploads, the HF PEFT baseline, 1000 adapters at cap 256;
#                                    about 8 min
#   scripts/device_session.sh s26c   (one GPU) 1000 adapters at cap 256, two more runs (s26b's
#                                    kept 87 %, the nineteenth session's 91 %); about 6 min
#   scripts/device_session.sh s26d   (one GPU) 1000 adapters at cap 256 with the loop's and
#                                    runner's stacks sampled (where the many-adapter step's
#                                    launch time goes); about 4 min
#   scripts/device_session.sh s31d   (one GPU, prepared) the second wave of the 1000- and
#                                    8-adapter runs traced (steps 120-199), two processes; 3 min
#   scripts/device_session.sh s31c   (one GPU, prepared) the grid's GPU test and the warm-up's,
#                                    then the first 2 s of the 1000-adapter run's kernels with
#                                    and without the grid; about 6 min
#   scripts/device_session.sh s31b   (one GPU) s31a's failed GPU tests again (one test's two
#                                    engines at once), then 1000 adapters with and without the
#                                    grid, two processes each, the first 40 steps traced; 7 min
#   scripts/device_session.sh s31a   (one GPU) eager prefill on a token grid the warm-up's GEMMs
#                                    cover: its GPU tests, then 1000 adapters at cap 256 with
#                                    and without the grid, long launches shown; about 9 min
#   scripts/device_session.sh s30d   (one GPU) does F.linear's first call at a token count wait
#                                    for the device? lazy and eager module loading; 3 min
#   scripts/device_session.sh s30c   (one GPU) the runner's stacks in every launch of 50 ms or
#                                    more, 1000 adapters at cap 256, two processes; 4 min
#   scripts/device_session.sh s30a   (one GPU) the engine's GPU tests, then the
#                                    1000-adapter run's first 60 steps twice (launch CPU time,
#                                    after the config cache); about 8 min
#   scripts/device_session.sh s30b   (one GPU, prepared) the GIL switch interval 0.05 ms against
#                                    0.5 in the 1000-adapter run, two processes each; 5 min
#   scripts/device_session.sh s29c   (one GPU) the first 60 steps of the 1000- and 8-adapter
#                                    runs at cap 256, as admitted; about 2 min
#   scripts/device_session.sh s29b   (one GPU) uploads batched by default and issued by a
#                                    request's admission: GPU tests, upload bandwidth, 1000
#                                    adapters against LORASERVE_UPLOAD_BATCH=0; about 8 min
#   scripts/device_session.sh s29a   (one GPU) 1000 adapters at cap 256: default, batched
#                                    uploads, four readers, both; two processes each; 5 min
#   scripts/device_session.sh s28b   (one GPU) the GPU tests of the upload modes then present;
#                                    about 3 min (ran 2dd71a2; the upload thread and one foreach
#                                    call an upload are since removed)
#   (s28c, 1000 adapters one call a copy against batched at each poll and one foreach call an
#    upload, ran at 2dd71a2 and is removed with the foreach mode; s28a, two readers against
#    four, never ran: s29a covers it)
#   scripts/device_session.sh s27d   (one GPU) 1000 adapters at cap 256, on-demand metadata on its
#                                    own thread, up to three processes; about 5 min
#   scripts/device_session.sh s27c   (one GPU) 1000 adapters at cap 256, each run's timeline by
#                                    half second, two processes; about 4 min
#   scripts/device_session.sh s27b   (one GPU) the GEMM kernels F.linear picks by prefill token
#                                    count against the warm-up's; 1000 adapters at cap 256 with
#                                    CUDA_MODULE_LOADING=EAGER and the stall dumps; about 6 min
#   scripts/device_session.sh s27a   (one GPU) 1000 adapters at cap 256 with every thread's stack
#                                    dumped in the loop's stalls of 100 ms or more, two
#                                    processes; about 4 min
#   scripts/device_session.sh s26e   (one GPU; ran at 62e977b: the upload thread it A/Bs is
#                                    since removed, and LORASERVE_UPLOAD_THREAD is an error now)
#                                    the upload thread's GPU tests; 1000
#                                    adapters at cap 256 with the upload enqueue time by part
#                                    and the collector's pauses: by default (startup objects
#                                    frozen), LORASERVE_GC_FREEZE=0, LORASERVE_UPLOAD_THREAD=1,
#                                    two processes each; about 9 min
#   scripts/device_session.sh gpu2   churn / doc-example, HF baseline, responsiveness on GPU 0;
#                                    then waits for the soak and returns its log
# Phases that A/B-tested knobs since removed (fold3, f12b-f12e, s13a, s13b, s13e, s13g,
# s14a-s14d, s18b, s18c, s18e, s24a: the early KV tile, whose A/B s25a also ran; s25b, s25c:
# L2 prefetch from the layer kernels; s39c and s39b's second half: SiLU*up inside down's
# GEMM, at f010a54 and 35ece63; s40c and s40e: the decode GEMM's stream-K form, at
# 4eb2bc5 and 21cd2dd; s46a: decode attention's L2 prefetch of its K/V rows and the rotary
# kernel's early release, at ce1e21f; s46b: the decode GEMM's L2 prefetch of its W rows before
# its wait, at 5c9d56a; s47a: base decode with the norms folded into the GEMMs' epilogues,
# branch norm-fold at 4c71d7d, not merged; s48e: decode attention's softmax over chunks of a
# KV tile, at 75c236e), or that s16b repeats (s16a), are in the commits
# benchmarks/RESULTS.md names for their runs. (s19a measured a GEMV form of the shrink whose
# code was not kept, RESULTS.md describes it; s19c stacked every LoRA decode graph, at commit
# 14c2b30.)
# Every part has its own time limit so the call always reports; results land under $OUT.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
SOAK_LOG=/tmp/soak/soak.log

gpu_tests() {  # gpu_tests NAME TIMEOUT FILES...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/$name.xml" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "== $name: rc $?"; tail -6 "$OUT/$name.log"
}

fold_tests() {  # fold_tests TIMEOUT: the LoRA fold tests on CUDA (all of them, not only -m gpu)
  timeout "$1" python3 -m pytest -q -p no:cacheprovider tests/test_lora_fold.py \
    -k "not interpreter" > "$OUT/fold_tests.log" 2>&1
  echo "== fold tests: rc $?"; tail -n 3 "$OUT/fold_tests.log"
}

step_lora() {  # step_lora TIMEOUT NAME [VAR=VALUE...]: the step targets with adapters
  local limit=$1 name=$2; shift 2
  env "$@" timeout "$limit" python3 -m benchmarks.step_bench --lora --steps 10 \
    --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "== step_bench --lora $*: rc $?"
  grep -E "^(engine built|HBM|decode|prefill|  graph|serving loop)" "$OUT/$name.log" | grep -v "overlap off"
}

step_each() {  # step_each GUARD_S SETTINGS...: the step targets, one process per argument
  # (each a space-separated VAR=VALUE list; NONE=n: the defaults), skipped once the call is
  # GUARD_S seconds in; a failed process's last lines are printed; then their table
  local guard=$1 i=0 knob name; shift
  for knob in "$@"; do
    i=$((i + 1))
    if [ "$SECONDS" -gt "$guard" ]; then echo "== process $i: skipped, out of time"; break; fi
    name="step_${i}_$(echo "$knob" | cut -d' ' -f1,3 | tr '=: ' '___')"
    # shellcheck disable=SC2086  # the settings are separate words
    step_lora $((i == 1 ? 110 : 90)) "$name" $knob
    tail -4 "$OUT/$name.log" | grep -iE "error|Traceback" && tail -25 "$OUT/$name.log"
    rm -f "$OUT/$name.log"
  done
  step_table "$OUT"/step_[0-9]_*.json
}

step8() {  # step8 NAME LIMIT [VAR=VALUE...]: the step targets in the 8-slot pool the
  # 8-adapter target names (1 adapter at batch 1, 8 at batch 32), one process
  local name=$1 limit=$2; shift 2
  env "$@" timeout "$limit" python3 -m benchmarks.step_bench --lora --steps 10 \
    --max-loras-per-batch 8 --lora-cases 1x1 32x8 --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "== step_bench 8 slots $*: rc $?"
  grep -E "^(engine built|HBM|decode|prefill|  graph|serving loop)" "$OUT/$name.log" | grep -v "overlap off"
  tail -3 "$OUT/$name.log" | grep -iE "error|Traceback" && tail -25 "$OUT/$name.log"
}

each_process() {  # each_process RUNNER PREFIX GUARD_S FIRST_S LATER_S SETTINGS...: RUNNER
  # (called as RUNNER NAME LIMIT SETTING...), one process per argument (each a space-separated
  # VAR=VALUE list; NONE=n: the defaults), skipped once the call is GUARD_S seconds in; the
  # first process gets FIRST_S (it compiles), the rest LATER_S; results PREFIX_i_SETTING, named
  # without '=' or ':' (which $OUT does not take back)
  local runner=$1 prefix=$2 guard=$3 first=$4 later=$5 i=0 knob name; shift 5
  for knob in "$@"; do
    i=$((i + 1))
    if [ "$SECONDS" -gt "$guard" ]; then echo "== process $i: skipped, out of time"; break; fi
    name="${prefix}_${i}_$(echo "$knob" | cut -d' ' -f1 | tr '=:/' '___' | sed 's/LORASERVE_//g')"
    # shellcheck disable=SC2086  # the settings are separate words
    "$runner" "$name" $((i == 1 ? first : later)) $knob
    rm -f "$OUT/$name.log"
  done
}

step8_each() {  # step8_each GUARD_S SETTINGS...: step8, one process per argument; their table
  each_process step8 step8 "$1" 120 100 "${@:2}"
  step_table "$OUT"/step8_*.json
}

step_ab() {  # step_ab VAR=VALUE...: the step targets by default and with the settings,
  # alternating, two processes each (the first process gets more time: it compiles)
  local i=0 knob name
  for knob in NONE=1 "$*" NONE=2 "$*"; do
    i=$((i + 1)); name="step_${i}_$(echo "$knob" | tr '= ' '__')"
    # shellcheck disable=SC2086  # the settings are separate words
    step_lora $((i == 1 ? 110 : 85)) "$name" $knob
    rm -f "$OUT/$name.log"
  done
  step_table "$OUT"/step_[0-9]_*.json
}

many_ab() {  # many_ab NAME GUARD_S VAR=VALUE...: 1000 adapters at cap 256, saturated, one
  # process per setting in the order given (NONE=n: the defaults), each skipped once the call
  # is GUARD_S seconds in; $MANY_ARGS adds arguments. The first process gets more time (it
  # builds the engine on a cold machine). Results: $OUT/many_NAME_i.json (logs in /tmp)
  local name=$1 guard=$2 i=0 knob; shift 2
  for knob in "$@"; do
    i=$((i + 1))
    if [ "$SECONDS" -gt "$guard" ]; then echo "== many_ab $knob: skipped, out of time"; continue; fi
    # shellcheck disable=SC2086  # MANY_ARGS and a setting (VAR=VALUE...) hold separate words
    env $knob timeout $((i == 1 ? 200 : 110)) python3 -m benchmarks.many_adapters \
      --saturated-only --max-loras-per-batch 256 --max-loaded-loras 512 ${MANY_ARGS:-} \
      --out "$OUT/many_${name}_$i.json" > "/tmp/many_${name}_$i.log" 2>&1
    echo "== many_adapters cap 256 $knob${MANY_ARGS:+ $MANY_ARGS}: rc $?"
    # the summary only: the rest is in the JSON, and the call returns a few files at most
    grep -E "keeps|^  many: upload" "/tmp/many_${name}_$i.log" | tail -4
  done
}

step_table() {  # step_table FILES...: the step targets of step_bench runs, a row a process
  python3 -m benchmarks.step_table "$@" 2>&1 || echo "== step_table: failed"
}

many_cap() {  # many_cap TIMEOUT: 1000 adapters against 8, saturated, max_loras_per_batch 256
  timeout "$1" python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
    --max-loaded-loras 512 --out "$OUT/many_cap.json" > "$OUT/many_cap.log" 2>&1
  echo "== many_adapters cap 256: rc $?"; grep -E "saturated|keeps" "$OUT/many_cap.log"
}

attn_bench() {  # attn_bench TIMEOUT ARGS...: decode attention alone
  local limit=$1; shift
  timeout "$limit" python3 -m benchmarks.attn_bench "$@" --out "$OUT/attn_bench.json" \
    > "$OUT/attn_bench.log" 2>&1
  echo "== attn_bench: rc $?"; grep " us " "$OUT/attn_bench.log"
}

serve_bench() {  # serve_bench TIMEOUT: the serving benchmark's device run (RESULTS.md)
  python3 -m benchmarks.dummy_model llama-3.1-8b /tmp/llama8b > /dev/null
  python3 -m benchmarks.random_adapters llama-3.1-8b /tmp/adapters --count 8 --rank 16 > /dev/null
  timeout "$1" python3 -m benchmarks.serve_bench --launch --server-args "--model-path \
    /tmp/llama8b --load-format dummy --dtype bfloat16 --max-loras-per-batch 8" \
    --lora-dir /tmp/adapters --num-loras 8 --popularity skewed --num-prompts 256 \
    --input-len 256 --output-len 128 --request-rate 8 16 32 inf --slo-ttft-ms 500 \
    --slo-tpot-ms 50 --save-detailed --disable-tqdm --out "$OUT/serve.json" \
    > "$OUT/serve.log" 2>&1
  echo "== serve_bench: rc $?"
  grep -E "^(Request throughput|Output token|Median TTFT|P99 TTFT|Median TPOT|Median ITL|Request goodput)" \
    "$OUT/serve.log" | head -40
}

hf_baseline() {  # hf_baseline TIMEOUT NAME: HF PEFT and our engine side by side (RESULTS.md)
  timeout "$1" python3 -m benchmarks.hf_baseline --dummy-shape llama-3.1-8b --num-adapters 8 \
    --rank 16 --batch 32 --prompt-len 128 --new-tokens 64 --reps 1 --variants mixed \
    --compare-engine --out "$OUT/$2.json" > "$OUT/$2.log" 2>&1
  echo "== hf_baseline: rc $?"; tail -8 "$OUT/$2.log"
}

start_soak() {  # in its own session so it outlives this call; pytest and its plugins apart
  mkdir -p /tmp/soak
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/soak/site .whl_soak/*.whl
  (cd "$PWD" && CUDA_VISIBLE_DEVICES=1 LORASERVE_TEST_DEVICE=cuda LORASERVE_SOAK_SECONDS=600 \
    PYTHONPATH="/tmp/soak/site:$PYTHONPATH" setsid nohup python3 -m pytest -q -s \
    -p no:cacheprovider tests/test_soak.py::test_soak > "$SOAK_LOG" 2>&1 < /dev/null &)
  sleep 20; echo "== soak started:"; tail -3 "$SOAK_LOG"
}

step_base() {  # step_base NAME LIMIT [SRC=DIR] [VAR=VALUE...]: base decode at batches 1 and 32
  # alone; SRC=DIR runs the step bench of the tree in DIR (another commit's, as ab_tree writes)
  local name=$1 limit=$2 src=.; shift 2
  case "${1:-}" in SRC=*) src=${1#SRC=}; shift ;; esac
  (cd "$src" && env "$@" timeout "$limit" python3 -m benchmarks.step_bench --steps 10 \
    --out "$OUT/$name.json") > "$OUT/$name.log" 2>&1
  echo "== step_bench base $*: rc $?"
  grep -E "^(HBM|decode|  graph|serving loop|  loop host)" "$OUT/$name.log" | grep -v "overlap off"
  tail -3 "$OUT/$name.log" | grep -iE "error|Traceback" && tail -25 "$OUT/$name.log"
}

loop_profiles() {  # loop_profiles TAG CASE...: batch 32's serving loop profiled, one process a
  # CASE (NAME:VAR=VALUE..., or NAME for the defaults), into $OUT/loop_prof_NAME_TAG.json
  local tag=$1 case name; shift
  for case in "$@"; do
    name=${case%%:*}
    local settings=""; [ "$case" != "$name" ] && settings=${case#*:}
    # shellcheck disable=SC2086  # the settings are separate words
    env $settings timeout 100 python3 -m benchmarks.step_bench --profile-loop --batch 32 \
      --steps 50 --out "$OUT/loop_prof_${name}_$tag.json" > /tmp/loop_prof.log 2>&1
    echo "== step_bench --profile-loop $settings: rc $?"
    sed -n "/^serving loop, device time/,\$p" /tmp/loop_prof.log | head -16
    grep -m1 "GEMMs by the kernel before" /tmp/loop_prof.log
  done
}

rope_sampler_tests() {  # rope_sampler_tests TAG: the rotary kernels' tests on CUDA (the rotary
  # kernel bit for bit torch's rotation, decode attention's ROPE variant the two launches'),
  # then the CUDA sampler test (no host sync), into $OUT/rope_tests_TAG.log
  local log="$OUT/rope_tests_$1.log"
  timeout 90 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_rope_attention.py \
    tests/test_fused_ops.py -k rope > "$log" 2>&1
  echo "== rotary tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$log" | tail -12
  timeout 60 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_sampler.py \
    -k cuda >> "$log" 2>&1
  echo "== CUDA sampler test: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$log" | tail -3
}

base_each() {  # base_each GUARD_S TAG SETTINGS...: step_base, one process per argument;
  # their table, and their JSON in one archive $OUT/base_TAG.tgz ($OUT takes few files back;
  # TAG -: left as they are, each there as soon as its process ends)
  each_process step_base base "$1" 100 70 "${@:3}"
  step_table "$OUT"/base_*.json
  if [ "$2" != - ]; then
    (cd "$OUT" && tar czf "base_$2.tgz" base_*.json && rm -f base_*.json)
  fi
}

case "${1:-}" in
  ab)  # one GPU: base steps by default and with $AB_SET (one case: settings separated by
    # spaces), alternating, $AB_ROUNDS rounds (default 3); the loop profiled with them and by
    # default; for settings that won apart, measured together before they become defaults
    : "${AB_SET:?ab: set AB_SET to the settings, e.g. AB_SET=\"A=1 B=2\"}"
    cases=()
    for r in $(seq 1 "${AB_ROUNDS:-3}"); do cases+=("NONE=$r" "$AB_SET"); done
    base_each 420 ab "${cases[@]}"
    loop_profiles ab "set:$AB_SET" default
    ;;
  s53a)  # one GPU (prepared for the next session): the rotary kernel's work inside decode
    # attention (LORASERVE_DECODE_ATTN_ROPE=1, one launch a layer fewer; its SASS is 336
    # instructions longer outside the KV loop, 2296 against 1960): its GPU tests (the kernel
    # against the two launches in bf16 at Llama-3.1-8B's heads with PDL and without, fp32
    # tokens against HF for the four architectures and graphs against eager with it on); base
    # steps by default and with it, alternating, three rounds; the loop profiled with it, and by
    # default with the gap groups' medians (s52d's question)
    ar="LORASERVE_DECODE_ATTN_ROPE=1"
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_rope_attention.py \
      > "$OUT/rope_attention_tests.log" 2>&1
    echo "== rope attention tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/rope_attention_tests.log" | tail -6
    env $ar timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_engine_gpu.py \
      tests/test_graphs_gpu.py -k "(hf_on_cuda and fp32) or (graphs_match_eager_fp32 and csgmv)" \
      > "$OUT/rope_attention_model_tests.log" 2>&1
    echo "== $ar model tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/rope_attention_model_tests.log" | tail -6
    base_each 420 53a NONE=1 "$ar" NONE=2 "$ar" NONE=3 "$ar"
    loop_profiles 53a "ar:$ar" default
    ;;
  s53b)  # one GPU (prepared for the next session): the decode graphs captured twice and
    # replayed in turn (LORASERVE_DECODE_GRAPH_COPIES=2), so no executable launches twice in a
    # row: graph_gap's PDL graphs started 100 us or more late in a tenth of the rounds (s52b),
    # and the loop's gap before the decode graph averaged 16-18 us against a 2.9 us median
    # (s52c). graph_gap with one executable and two in turn; the graph tests with the copies;
    # base steps by default and with them, alternating, three rounds; the loop profiled with them
    cp2="LORASERVE_DECODE_GRAPH_COPIES=2"
    timeout 90 python3 -m benchmarks.graph_gap --nodes 300 --cases none --pdl both --copies 1 2 \
      --reps 200 --out "$OUT/graph_gap_53b.json" 2>&1 | tail -5
    env $cp2 timeout 150 python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
      tests/test_graphs_gpu.py tests/test_graph_inputs.py \
      -k "(graphs_match_eager_fp32 and csgmv) or zero_copy_steps_keep_greedy_tokens_on_cuda" \
      > "$OUT/graph_copies_tests.log" 2>&1
    echo "== $cp2 tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/graph_copies_tests.log" | tail -6
    base_each 420 53b NONE=1 "$cp2" NONE=2 "$cp2" NONE=3 "$cp2"
    loop_profiles 53b "cp2:$cp2"
    ;;
  s54b)  # one GPU (prepared for the next session): both rotary kernels compile without FMA
    # contraction since the forty-fourth session (with it each contracted the rotation's
    # products into its sums its own way: the caches of s53a's bit-for-bit tests differed). Their
    # tests on CUDA (the rotary kernel now bit for bit torch's rotation, decode attention's
    # ROPE variant the two launches'); HF parity on CUDA by default (the rotary kernel is on
    # the default path) and with the ROPE variant, with the decode graphs against eager;
    # base steps with the variant, with gate_up's setting and by default, alternating, while
    # time remains
    ar="LORASERVE_DECODE_ATTN_ROPE=1"
    rope_sampler_tests 54b  # the sampler's allow-list and bad-word rows (forty-fifth session)
    # by default bf16 logits too (8 HF tests, 3 graph tests); the variant as s53a ran it (7
    # tests, 130 s there)
    for case in "NONE=1:180:hf_on_cuda" "$ar:150:hf_on_cuda and fp32"; do
      IFS=: read -r knob limit sel <<< "$case"
      # shellcheck disable=SC2086  # the setting is one word
      env $knob timeout "$limit" python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
        tests/test_engine_gpu.py tests/test_graphs_gpu.py \
        -k "($sel) or (graphs_match_eager_fp32 and csgmv)" >> "$OUT/parity_54b.log" 2>&1
      echo "== parity $knob: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/parity_54b.log" | tail -4
    done
    # and gate_up's SiLU·up on the Triton kernel (s53c: 62.1 us alone against the Gluon
    # launch's 65.2; not yet measured in the loop)
    gu="LORASERVE_DECODE_GEMM_TMA_GATE_UP=0"
    base_each 510 54b NONE=1 "$ar" "$gu" NONE=2 "$ar" "$gu"
    ;;
  s56a)  # one GPU: the prefix cache on CUDA (off by default until this runs): the engine
    # tests on the GPU (LORASERVE_TEST_DEVICE=cuda, fp32, HF on the CPU as reference): every
    # test of tests/test_prefix_cache.py that builds an engine (shared prefixes and a second
    # turn, adapters and salts, a reloaded adapter, prompt logprobs, preemption) and
    # tests/test_engine.py (five of its tests failed on the GPU in the forty-seventh session
    # on their own block counts, which now allow the runner's reserved block); then the soak
    # on CUDA with the prefix cache and a shared prefix, while time remains
    LORASERVE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider -rf \
      --tb=short tests/test_prefix_cache.py tests/test_engine.py -k "not http and not flush" \
      > "$OUT/engine_cuda_56a.log" 2>&1
    echo "== engine and prefix cache tests on CUDA: rc $?"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/engine_cuda_56a.log" | tail -12
    left=$((580 - SECONDS))
    if [ "$left" -gt 120 ]; then
      LORASERVE_TEST_DEVICE=cuda LORASERVE_SOAK_PREFIX_CACHE=1 \
        LORASERVE_SOAK_SECONDS=$((left - 90)) timeout "$left" python3 -m pytest -q -s \
        -p no:cacheprovider -rf --tb=short tests/test_soak.py::test_soak > "$OUT/soak_56a.log" 2>&1
      echo "== soak on CUDA with the prefix cache: rc $?"
      grep -E "^soak:|^prefix cache:|passed|failed|^(FAILED|ERROR)" "$OUT/soak_56a.log" | tail -6
    else
      echo "== soak with the prefix cache: skipped, out of time"
    fi
    ;;
  s56b)  # one GPU: the prefix cache's serving gain, side by side: a shared-prefix workload
    # (8 prefixes of 1024 tokens, each prompt 128 more, 64 new tokens, 8 adapters skewed,
    # 256 requests at once) against a server without the cache, then one with it
    python3 -m benchmarks.dummy_model llama-3.1-8b /tmp/llama8b > /dev/null
    python3 -m benchmarks.random_adapters llama-3.1-8b /tmp/adapters --count 8 --rank 16 \
      > /dev/null
    for cache in off on; do
      extra=""; [ "$cache" = on ] && extra=" --enable-prefix-caching"
      timeout 260 python3 -m benchmarks.serve_bench --launch --server-args "--model-path \
        /tmp/llama8b --load-format dummy --dtype bfloat16 --max-loras-per-batch 8$extra" \
        --lora-dir /tmp/adapters --num-loras 8 --popularity skewed --num-prompts 256 \
        --input-len 128 --output-len 64 --prefix-len 1024 --num-prefixes 8 \
        --disable-tqdm --out "$OUT/serve_prefix_$cache.json" > "$OUT/serve_prefix_$cache.log" 2>&1
      echo "== serve_bench, prefix cache $cache: rc $?"
      grep -E "^(Prompt tokens from|Request throughput|Output token|Median TTFT|P99 TTFT|Median TPOT)" \
        "$OUT/serve_prefix_$cache.log" | head -8
    done
    ;;
  s55r)  # one GPU, for the last minutes of a session's device time: s55a's tests alone (the
    # rotary kernels' tests and the CUDA sampler test on CUDA, about 150 s at most)
    rope_sampler_tests 55r
    ;;
  s55a)  # one GPU: s54b's and s54a's essentials in one call, for a session whose device time
    # buys one or two calls: the rotary kernels' tests on CUDA (both without FMA contraction
    # since the forty-fourth session, the rotary kernel on every default step) and the CUDA
    # sampler test; every step target at the default (the 32-slot pool's, the 8-slot pool's,
    # base decode against its floor); then HF parity on CUDA by default with the decode
    # graphs against eager, while time remains
    rope_sampler_tests 55a
    # S55A_LIMIT: the seconds the call may take (default 585), for a session with less device
    # time left; the guards shrink with it
    lim=${S55A_LIMIT:-585}
    step_each $((lim * 200 / 585)) NONE=1
    step8_each $((lim * 320 / 585)) NONE=1
    base_each $((lim * 420 / 585)) 55a NONE=1
    left=$((lim - SECONDS))
    if [ "$left" -gt 60 ]; then
      timeout "$left" python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
        tests/test_engine_gpu.py tests/test_graphs_gpu.py \
        -k "hf_on_cuda or (graphs_match_eager_fp32 and csgmv)" > "$OUT/parity_55a.log" 2>&1
      echo "== parity by default: rc $? (limit ${left} s)"
      grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/parity_55a.log" | tail -4
    else
      echo "== parity by default: skipped, out of time"
    fi
    ;;
  s54c)  # one GPU (prepared for the next session): the soak on CUDA at today's default decode
    # step (the Gluon GEMM, folded LoRA steps, the rotary kernel without contraction, CUDA
    # graphs, the copy stream, the overlapped loop); it last ran on a GPU in the second device
    # session. 6 clients for 480 s, churn included (unloads and reloads, and loads in place of
    # adapters in use, new in the forty-fifth session), every answer checked against its
    # adapter's tokens alone, then the RSS bound and the leak check
    LORASERVE_TEST_DEVICE=cuda LORASERVE_SOAK_SECONDS=480 timeout 580 python3 -m pytest -q -s \
      -p no:cacheprovider -rf --tb=short tests/test_soak.py::test_soak > "$OUT/soak_54c.log" 2>&1
    echo "== soak on CUDA: rc $?"; grep -E "^soak:|passed|failed|^(FAILED|ERROR)" "$OUT/soak_54c.log" | tail -6
    ;;
  s54a)  # one GPU (prepared for the next session): every step target at the defaults since
    # s53d (the Gluon decode GEMM, in base steps and in LoRA steps' stacked GEMMs; the
    # adapter targets are measured against the faster base): the 32-slot pool's
    # (1 adapter, 32 adapters against base + their bytes, prefill over 8) and the 8-slot
    # pool's (8 adapters), by default and with LORASERVE_DECODE_GEMM_TMA=0, alternating; base
    # steps by default while time remains
    off="LORASERVE_DECODE_GEMM_TMA=0"
    step_each 300 NONE=1 "$off" NONE=2
    step8_each 480 NONE=1 "$off" NONE=2
    base_each 540 54a NONE=1 NONE=2
    ;;
  s53d)  # one GPU: the Gluon decode GEMM by default (s53c: batch 32's loop 4.583-4.584 ms
    # with it against 4.655-4.693 without; its bit-for-bit tests passed there): the wrapper
    # test s53c failed (it ran CPU tensors through the Triton kernel on CUDA) with CUDA
    # operands; base steps by default and with LORASERVE_DECODE_GEMM_TMA=0, alternating, two
    # rounds; the 8-adapter target in the 8-slot pool by default (its folded steps keep the
    # Triton kernel, the base step it is measured against moves) while time remains
    off="LORASERVE_DECODE_GEMM_TMA=0"
    # gate_up's SiLU·up on the Triton kernel, the rest on Gluon's (s53c alone behind the
    # norm: 65.2 us with Gluon's against 62.1, where qkv, o and down gained)
    gu="LORASERVE_DECODE_GEMM_TMA_GATE_UP=0"
    timeout 50 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_gluon_decode_gemm.py \
      -k "wrappers or gate_up_setting" > "$OUT/tma_default_tests.log" 2>&1
    echo "== tma gemm wrapper test: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tma_default_tests.log" | tail -6
    base_each 170 - NONE=1 "$off" NONE=2 "$off"
    if [ "$SECONDS" -lt 200 ]; then step8 step8_53d 90; else echo "== step8: skipped, out of time"; fi
    if [ "$SECONDS" -lt 250 ]; then step_base base_5_gu_53d 40 "$gu"; fi
    (cd "$OUT" && tar czf base_53d.tgz base_*.json && rm -f base_*.json)
    ;;
  s53c)  # one GPU (prepared for the next session): the decode GEMM with W's first tiles in
    # flight before the PDL wait (LORASERVE_DECODE_GEMM_TMA=1, ops/gluon_decode_gemm.py), at
    # its default stages, and with the layer kernels preferring the largest shared-memory
    # carveout (LORASERVE_LAYER_CARVEOUT=1) at 150 KB (o's programs then fit beside two of
    # attention's) and at 100 KB: its GPU tests (bit for bit the Triton kernel at
    # Llama-3.1-8B's projections and gate_up, the PDL chain in a graph, a small Llama's decode
    # graphs) and the carveout's; base steps by default and with each, alternating, two
    # rounds; the loop profiled with two; the projections alone behind a PDL add+RMSNorm
    # while time remains
    tma="LORASERVE_DECODE_GEMM_TMA=1"
    t150="LORASERVE_DECODE_GEMM_TMA_SMEM=150 LORASERVE_DECODE_GEMM_TMA=1"  # (named by its first)
    # with the layer kernels preferring the largest shared-memory carveout (ops/carveout.py), at
    # 150 KB and at 100 KB (2 stages of 64 x 256: down's programs fit beside one of gate_up's,
    # o's beside three of attention's)
    t150c="LORASERVE_LAYER_CARVEOUT=1 LORASERVE_DECODE_GEMM_TMA_SMEM=150 LORASERVE_DECODE_GEMM_TMA=1"
    t100c="LORASERVE_DECODE_GEMM_TMA_SMEM=100 LORASERVE_LAYER_CARVEOUT=1 LORASERVE_DECODE_GEMM_TMA=1"
    # a smoke case first: a kernel that hangs on its barriers or faults would cost every
    # step process below its whole limit, so they run only if it passes
    timeout 90 python3 -m pytest -v -p no:cacheprovider -rf --tb=short tests/test_gluon_decode_gemm.py \
      -k "masked_rows_and_columns" > "$OUT/tma_gemm_smoke.log" 2>&1
    smoke=$?
    echo "== tma gemm smoke: rc $smoke"; tail -15 "$OUT/tma_gemm_smoke.log"
    if [ "$smoke" -ne 0 ]; then  # the carveout's own test, and nothing that runs the kernel
      timeout 60 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_carveout.py \
        2>&1 | tail -4
      echo "== the smoke case failed: no further tests, no step processes"; exit 0
    fi
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_gluon_decode_gemm.py \
      tests/test_carveout.py > "$OUT/tma_gemm_tests.log" 2>&1
    echo "== tma gemm tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tma_gemm_tests.log" | tail -8
    base_each 430 53c NONE=1 "$tma" "$t150c" "$t100c" NONE=2 "$tma" "$t150c" "$t100c"
    loop_profiles 53c "tma:$tma" "t150c:$t150c"
    g=0
    for s in NONE=1 "$tma" "$t150" "$t100c"; do
      g=$((g + 1))
      if [ "$SECONDS" -gt 520 ]; then echo "== gemm_bench $s: skipped, out of time"; break; fi
      # shellcheck disable=SC2086  # the settings are separate words
      env $s timeout 60 python3 -m benchmarks.gemm_bench --batch 32 --proj qkv o down gate_up \
        --layers 8 --reps 10 --gemm 64:256:0:4:4 --gemm-split 2 --gate-up 64:128:0:4:4 \
        --out "$OUT/gemm_${g}_53c.json" > /tmp/gemm_bench.log 2>&1
      echo "== gemm_bench $s: rc $?"; grep -vE "^\s*$" /tmp/gemm_bench.log | head -14
    done
    (cd "$OUT" && ls gemm_*_53c.json >/dev/null 2>&1 && tar czf gemm_53c.tgz gemm_*_53c.json \
      && rm -f gemm_*_53c.json)
    ;;
  s52d)  # one GPU: the loop profiled by default, with the host's calls, and by default again,
    # each idle gap group with its median and largest gap (s52c: with the host's calls the gap
    # before the decode graph averaged 8.8 us a step but its start's median was 2.9; without
    # them it averaged 16-18: steady, or a few long stalls?)
    for k in 1 host 2; do
      flag=""; [ "$k" = host ] && flag="--profile-host"
      # shellcheck disable=SC2086  # flag: one word or none
      timeout 100 python3 -m benchmarks.step_bench --profile-loop $flag --batch 32 --steps 50 \
        --out "$OUT/loop_prof_${k}_52d.json" > /tmp/loop_prof.log 2>&1
      echo "== step_bench --profile-loop $flag: rc $?"
      sed -n "/^serving loop, device time/,\$p" /tmp/loop_prof.log | head -8
    done
    ;;
  s52c)  # one GPU: the rotary test s52b failed (its caches were on the CPU) on CUDA; when the
    # host launches each decode graph against the device (--profile-host: the graph's start
    # is 16-18 us after its input kernel, a graph_gap graph's 1.9-5.7, so is the host late?);
    # base steps by default and from .ab/prev (as s52b), alternating, three rounds
    timeout 120 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_fused_ops.py \
      -k "rope" > "$OUT/tests_52c.log" 2>&1
    echo "== tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_52c.log" | tail -6
    timeout 120 python3 -m benchmarks.step_bench --profile-loop --profile-host --batch 32 \
      --steps 50 --out "$OUT/loop_prof_host_52c.json" > /tmp/loop_prof.log 2>&1
    echo "== step_bench --profile-loop --profile-host: rc $?"
    sed -n "/^serving loop, device time/,\$p" /tmp/loop_prof.log | head -24
    base_each 330 52c NONE=1 SRC=.ab/prev NONE=2 SRC=.ab/prev NONE=3 SRC=.ab/prev
    ;;
  s52b)  # one GPU: the kernel readback by default, the rotary kernel reading the tables at each
    # position and the decode graph's final norm without gathers (no switch: the tree before
    # that change, .ab/prev, runs beside it; make it with
    # `mkdir -p .ab/prev && git archive 5f634c0 runtime ops benchmarks ':!benchmarks/results'
    # | tar -x -C .ab/prev` and carry .ab): their GPU tests (the rotary kernel on CUDA, the
    # kernel readback by default, HF parity, graphs against eager); a graph's start after a
    # kernel with its kernels launched with PDL and without (the decode graph's start is 16 us
    # after its input kernel, graph_gap's graphs 5.7); base steps by default, from .ab/prev
    # and with copies on the readback stream, alternating; the loop profiled
    timeout 300 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_fused_ops.py \
      tests/test_host_write.py tests/test_overlap.py tests/test_engine_gpu.py tests/test_graphs_gpu.py \
      -k "rope or test_host_write or readback_stream or hf_on_cuda \
          or (graphs_match_eager_fp32 and csgmv) or graphs_with_qkv_split_match" \
      > "$OUT/tests_52b.log" 2>&1
    echo "== tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_52b.log" | tail -10
    timeout 60 python3 -m benchmarks.graph_gap --nodes 300 --cases none host_write --pdl both \
      --out "$OUT/graph_gap_52b.json" 2>&1 | tail -5
    rb="LORASERVE_READBACK_KERNEL=0"
    base_each 420 52b NONE=1 SRC=.ab/prev "$rb" NONE=2 SRC=.ab/prev "$rb" NONE=3 SRC=.ab/prev "$rb"
    timeout 100 python3 -m benchmarks.step_bench --profile-loop --batch 32 --steps 50 \
      --out "$OUT/loop_prof_52b.json" > /tmp/loop_prof.log 2>&1
    echo "== step_bench --profile-loop: rc $?"
    sed -n "/^serving loop, device time/,\$p" /tmp/loop_prof.log | head -24
    ;;
  s52a)  # one GPU (prepared for the next session): results written into pinned host memory
    # by a kernel on the compute stream (LORASERVE_READBACK_KERNEL=1), no copy engine and no
    # second stream in the step (s51b/s51d: with the readback stream the graph's start came
    # 21-45 us after the input kernel in about half the steps, 12 us with the copy on the
    # compute stream): its tests on CUDA (pinned buffers, the loop's tokens and log-probs
    # against copies); a graph's start after the kernel ahead of it alone, by graph size and
    # what runs beside it (benchmarks/graph_gap.py); base steps with it and by default
    # alternating, the loop profiled with it
    rk="LORASERVE_READBACK_KERNEL=1"
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_host_write.py \
      tests/test_overlap.py -k "test_host_write or readback_stream" > "$OUT/readback_kernel_tests.log" 2>&1
    echo "== readback kernel tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/readback_kernel_tests.log" | tail -8
    timeout 90 python3 -m benchmarks.graph_gap --out "$OUT/graph_gap_52a.json" 2>&1 | tail -14
    base_each 480 52a NONE=1 "$rk" NONE=2 "$rk" NONE=3 "$rk"
    env $rk timeout 100 python3 -m benchmarks.step_bench --profile-loop --batch 32 --steps 50 \
      --out "$OUT/loop_prof_rk_52a.json" > /tmp/loop_prof.log 2>&1
    echo "== step_bench --profile-loop $rk: rc $?"
    sed -n "/^serving loop, device time/,\$p" /tmp/loop_prof.log | head -24
    ;;
  s51d)  # one GPU: the readback test with the first engine's memory released (s51c: the second
    # engine found no room for its KV cache), more graph-against-eager and parity tests at the
    # new defaults; batch 32's loop profiled at them; base steps by default and with both off
    old="LORASERVE_DECODE_ZERO_COPY=0 LORASERVE_READBACK_STREAM=0"
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
      tests/test_overlap.py tests/test_engine_gpu.py tests/test_graphs_gpu.py \
      -k "readback_stream or (hf_on_cuda and (mistral or qwen2) and fp32) \
          or graphs_with_decode_gemv_match or graphs_with_qkv_split_match \
          or graphs_without_layer_pdl_match or graphs_with_gate_up_gemm_match" \
      > "$OUT/defaults_tests2.log" 2>&1
    echo "== default tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/defaults_tests2.log" | tail -8
    grep -q "^FAILED\|^ERROR" "$OUT/defaults_tests2.log" && sed -n "/= FAILURES =/,/short test summary/p" "$OUT/defaults_tests2.log" | tail -40
    timeout 100 python3 -m benchmarks.step_bench --profile-loop --batch 32 --steps 50 \
      --out "$OUT/loop_prof_51d.json" > /tmp/loop_prof.log 2>&1
    echo "== step_bench --profile-loop: rc $?"
    sed -n "/^serving loop, device time/,\$p" /tmp/loop_prof.log | head -24
    base_each 500 51d NONE=1 "$old" NONE=2 "$old"
    ;;
  s51c)  # one GPU: zero-copy decode steps and the readback stream by default (s51b: batch 32's
    # loop 4.572-4.605 with them against 4.599-4.621 without): the readback test (failed in
    # s51b, its log lost to the phase's time limit) first, then the input kernel's, parity's,
    # the pipeline's and the graphs' GPU tests at the new defaults; base steps by default and
    # with both off, alternating
    old="LORASERVE_DECODE_ZERO_COPY=0 LORASERVE_READBACK_STREAM=0"
    timeout 300 python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
      tests/test_overlap.py tests/test_graph_inputs.py tests/test_engine_gpu.py \
      tests/test_pipeline_gpu.py tests/test_sampler.py tests/test_graphs_gpu.py \
      -k "readback_stream or test_graph_inputs or (hf_on_cuda and (llama or qwen3) and fp32) \
          or (overlap_loading and None-loop) or cuda_mixed_batch \
          or (graphs_match_eager_fp32 and csgmv-0) or base_graphs_with_splitk_partials_match \
          or graph_with_decode_gemm_logits_bf16 or (replay_logits_bf16 and csgmv-0)" \
      > "$OUT/defaults_tests.log" 2>&1
    echo "== default tests: rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/defaults_tests.log" | tail -8
    grep -q "^FAILED\|^ERROR" "$OUT/defaults_tests.log" && sed -n "/= FAILURES =/,/short test summary/p" "$OUT/defaults_tests.log" | tail -60
    base_each 560 51c NONE=1 "$old" NONE=2 "$old"
    ;;
  s51b)  # one GPU: each step's results copied to the host on a readback stream (the compute
    # stream's next kernel no longer waits behind the copy: s51a's loop profile has about 10 us
    # of batch 32's step idle around that copy) and the input kernel's loads ahead of its
    # stores (9.2 us a step in s51a, host-memory reads one after another): the GPU tests of
    # the loop, the graphs, the pipeline and the input kernel; base steps with the readback
    # stream (the new default), with it and zero-copy steps, and without it, alternating; the
    # loop profiled with both
    zc="LORASERVE_DECODE_ZERO_COPY=1" old="LORASERVE_READBACK_STREAM=0"
    gpu_tests readback 260 tests/test_overlap.py tests/test_graph_inputs.py \
      tests/test_engine_gpu.py tests/test_pipeline_gpu.py tests/test_sampler.py \
      tests/test_graphs_gpu.py -k "not (graphs_match_eager and sgmv and not csgmv)"
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_graph_inputs.py \
      > "$OUT/input_kernel.log" 2>&1
    echo "== input kernel tests (pinned rows): rc $?"; tail -2 "$OUT/input_kernel.log"
    base_each 560 51b NONE=1 "$zc" "$old" NONE=2 "$zc" "$old"
    env $zc timeout 100 python3 -m benchmarks.step_bench --profile-loop --batch 32 --steps 50 \
      --out "$OUT/loop_prof_rb_zc_51b.json" > /tmp/loop_prof_zc.log 2>&1
    echo "== step_bench --profile-loop $zc: rc $?"
    sed -n "/^serving loop, device time/,\$p" /tmp/loop_prof_zc.log | head -24
    ;;
  s51a)  # one GPU (prepared for the next session): zero-copy decode steps
    # (LORASERVE_DECODE_ZERO_COPY=1: the graph's input kernel reads the step's rows from pinned
    # host memory, in place of about eight launches and the copy engine's hand-offs, about 50
    # us of batch 32's step in s50b's loop profile): the input kernel's tests on CUDA (pinned
    # rows), the loop's tokens against eager, the graph and parity tests with it; base steps
    # with it and without, alternating; the loop profiled with it
    zc="LORASERVE_DECODE_ZERO_COPY=1"
    env $zc timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_graph_inputs.py \
      tests/test_graphs_gpu.py tests/test_engine_gpu.py \
      -k "test_graph_inputs or (graphs_match_eager_fp32 and csgmv) or hf_on_cuda" \
      > "$OUT/zero_copy_tests.log" 2>&1
    echo "== zero-copy tests: rc $?"; tail -5 "$OUT/zero_copy_tests.log"
    base_each 420 51a NONE=1 "$zc" NONE=2 "$zc"
    env $zc timeout 110 python3 -m benchmarks.step_bench --profile-loop --batch 32 --steps 50 \
      --out "$OUT/loop_prof_zc_51a.json" > /tmp/loop_prof_zc.log 2>&1
    echo "== step_bench --profile-loop $zc: rc $?"
    sed -n "/^serving loop, device time/,\$p" /tmp/loop_prof_zc.log | head -24
    ;;
  s50d)  # one GPU: idle attention slices leaving before the PDL wait and 256-token slices
    # where a batch's programs fill the SMs, now the defaults (s50b: attention moved batch
    # 32's loop step end 375 us against 393): their GPU tests, then base steps by default and
    # with the old settings, alternating
    old="LORASERVE_DECODE_ATTN_IDLE_EXIT=0 LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT=64"
    gpu_tests defaults 230 tests/test_attention.py tests/test_engine_gpu.py tests/test_graphs_gpu.py \
      -k "test_gpu_decode or hf_on_cuda or (test_graphs_match_eager and csgmv) or (replay_logits_bf16 and csgmv) or layer_pdl_is_bitwise"
    base_each 500 50d NONE=1 "$old" NONE=2 "$old" NONE=3
    ;;
  s50c)  # one GPU: s50b's loop profile at batch 32 has the device idle about 33 us a step at
    # the step's edges, and around 30 us of small launches there; five of them (the decode
    # graph's padding fills) fill rows no graph reads. The graph GPU tests without them, then
    # base steps with the loop's host time by phase (is batch 32's loop bound by the host?),
    # against the padding fills put back (runtime/graphs.py patched between processes)
    gpu_tests graphs_pad 240 tests/test_graphs_gpu.py \
      -k "graphs_match_eager_fp32 or replay_logits_bf16 or layer_pdl_is_bitwise"
    cp runtime/graphs.py /tmp/graphs_new.py
    sed 's/^        if bs < bucket:$/        if True:  # s50c: the fills of every row/; s/self._pad_rows(bs, bucket)/self._pad_rows(bs)/' \
      /tmp/graphs_new.py > /tmp/graphs_old.py
    grep -c "if True:  # s50c" /tmp/graphs_old.py
    for round in 1 2; do
      cp /tmp/graphs_new.py runtime/graphs.py; base_each 540 - "NONE=new$round"
      cp /tmp/graphs_old.py runtime/graphs.py; base_each 540 - "NONE=fills$round"
    done
    cp /tmp/graphs_new.py runtime/graphs.py
    (cd "$OUT" && tar czf base_50c.tgz base_*.json && rm -f base_*.json)
    ;;
  s50b)  # one GPU: s50a's four rounds of idle attention slices leaving before the PDL wait
    # were level in the loop at batch 32 (4.597-4.633 ms against 4.597-4.634) while the graph
    # forward alone was 0.09 ms shorter in each: what the loop's device time does with it. And
    # the decode graph tests with it (s50a's stopped at the bf16 replay's bound, now 0.12)
    ie="LORASERVE_DECODE_ATTN_IDLE_EXIT=1 LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT=256"
    # shellcheck disable=SC2086  # the settings are separate words
    env $ie timeout 200 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_graphs_gpu.py \
      -k "replay_logits_bf16 or layer_pdl_is_bitwise or (graphs_match_eager_fp32 and csgmv)" \
      > "$OUT/idle_graph_tests.log" 2>&1
    echo "== idle exit graph tests: rc $?"; grep -E "against eager|passed|failed" "$OUT/idle_graph_tests.log" | tail -12
    timeout 150 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_graphs_gpu.py \
      -k "replay_logits_bf16" > "$OUT/bf16_tests.log" 2>&1
    echo "== bf16 replay tests by default: rc $?"; grep -E "against eager|passed|failed" "$OUT/bf16_tests.log" | tail -8
    i=0
    for knob in NONE=1 "$ie" NONE=2 "$ie"; do
      i=$((i + 1)); name="loop_prof_${i}_$(echo "$knob" | cut -d' ' -f1 | tr '=' '_' | sed 's/LORASERVE_//')"
      if [ "$SECONDS" -gt 520 ]; then echo "== $name: skipped, out of time"; break; fi
      # shellcheck disable=SC2086  # the settings are separate words
      env $knob timeout 120 python3 -m benchmarks.step_bench --profile-loop --batch 32 --steps 50 \
        --out "$OUT/$name.json" > "/tmp/$name.log" 2>&1
      echo "== step_bench --profile-loop $knob: rc $?"
      sed -n "/^serving loop, device time/,\$p" "/tmp/$name.log" | head -26; tail -2 "/tmp/$name.log" | grep -iE "error|Traceback"
    done
    (cd "$OUT" && tar czf loop_prof_50b.tgz loop_prof_*.json && rm -f loop_prof_*.json)
    ;;
  s50a)  # one GPU: s49f's two rounds of LORASERVE_DECODE_ATTN_IDLE_EXIT=1 with
    # LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT=256 gave batch 32's loop 1.232 and 1.250 of its
    # floor against 1.270 and 1.256: its GPU tests where PDL runs (decode graphs against eager,
    # greedy tokens against HF), then four rounds against the default
    ie="LORASERVE_DECODE_ATTN_IDLE_EXIT=1 LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT=256"
    # shellcheck disable=SC2086  # the settings are separate words
    env $ie timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py \
      tests/test_engine_gpu.py tests/test_graphs_gpu.py \
      -k "test_gpu_decode or hf_on_cuda or (test_graphs_match_eager and csgmv) or (replay_logits_bf16 and csgmv)" \
      > "$OUT/idle_tests.log" 2>&1
    echo "== idle exit GPU tests: rc $?"; tail -4 "$OUT/idle_tests.log"
    base_each 520 50a NONE=1 "$ie" NONE=2 "$ie" NONE=3 "$ie" NONE=4 "$ie"
    ;;
  s49f)  # one GPU: one slice a sequence gained in the loop at batch 32 (s49d) where 256-token
    # slices, the same work with the second slice's programs idle, were level (s49e): idle
    # programs that leave before the PDL wait (LORASERVE_DECODE_ATTN_IDLE_EXIT=1) leave at
    # their launch, behind the rotary kernel. Short of device time: results land one by one
    ie="LORASERVE_DECODE_ATTN_IDLE_EXIT=1 LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT=256"
    # shellcheck disable=SC2086  # the settings are separate words
    env $ie timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py \
      -k "gpu_decode_matches_reference and None" > "$OUT/idle_tests.log" 2>&1
    echo "== idle exit attention tests: rc $?"; tail -2 "$OUT/idle_tests.log"
    base_each 600 - "$ie" NONE=1 "$ie" NONE=2
    ;;
  s49e)  # one GPU: s49d's one slice a sequence gained 0.02-0.10 ms at batch 32 over 143
    # tokens, but one slice loses over long contexts (the thirty-first session: 40.6 against
    # 38.3 us over 1024 tokens). Slices of 256 tokens at least where the batch's programs fill
    # the SMs keep short sequences whole and split long ones as before
    LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT=256 gpu_tests attn_tests 120 tests/test_attention.py
    rm -f "$OUT"/*.xml
    timeout 90 python3 -m benchmarks.attn_bench --batch 32 --ctx 143 256 512 1024 \
      --min-split 64 256 --one-slice --reps 20 --out "$OUT/attn_49e.json" > /tmp/attn.log 2>&1
    echo "== attn_bench: rc $?"; grep " us " /tmp/attn.log
    w=LORASERVE_DECODE_ATTN_WIDE_MIN_SPLIT  # 256 was the default when it ran (NONE_n), 64 since
    base_each 320 49e $w=256 $w=64 $w=256 $w=64 $w=256 $w=64
    ;;
  s49d)  # one GPU: decode attention alone at batch 32 over 143 tokens took 11.16 us a layer in
    # one slice a sequence with the lean KV tile load (LORASERVE_ATTN_LEAN=2) against 12.74 by
    # default (s49a), 0.05 ms a step; the thirty-first session's one process each of one slice
    # (old arithmetic) was level. Base steps over the three, alternating, three rounds
    one=LORASERVE_DECODE_ATTN_PROGRAMS_PER_SM=1
    base_each 480 49d NONE=1 "$one" "$one LORASERVE_ATTN_LEAN=2" NONE=2 "$one" \
      "$one LORASERVE_ATTN_LEAN=2" NONE=3 "$one" "$one LORASERVE_ATTN_LEAN=2"
    ;;
  s49c)  # one GPU: qkv's 96 programs of 64 rows leave 36 of 132 SMs idle and each busy one
    # streams 64 x 4096 weights; over 4 slices of K at 64:128:0:4:3 (72 KB of pipeline: three
    # programs an SM) its 384 programs are one wave and the busiest SM streams 3 x 64 x 1024,
    # 0.75 of that (the thirty-first session's 2 slices at 128 rows kept it level)
    timeout 100 python3 -m benchmarks.gemm_bench --batch 32 --proj qkv \
      --gemm 64:256:0:4:4 64:128:0:4:3 64:128:0:4:4 128:128:256:8:3 --gemm-split 2 4 \
      --out "$OUT/gemm_qkv.json" > /tmp/gemm_qkv.log 2>&1
    echo "== gemm_bench qkv: rc $?"; grep -E " us |copy|rror" /tmp/gemm_qkv.log | head -40
    qs="LORASERVE_DECODE_GEMM_QKV_SPLIT=4 LORASERVE_DECODE_GEMM_QKV_TILE=64:128:0:4:3"
    # (its GPU tests, called here through env, did not run: gpu_tests is a shell function)
    base_each 500 49c NONE=1 "$qs" NONE=2 "$qs" NONE=3 "$qs"   # (the lean load on in all)
    ;;
  s49b)  # one GPU: s49a's loop at batch 1 ran 0.05 ms slower with the lean KV tile load (and
    # level at batch 32), while attention alone ran faster at both. Its masked form's GPU
    # tests, the decode graphs by kernel (LORASERVE_ATTN_LEAN 2 and 0), then base steps over
    # the forms (2: clamped, the default; 1: lean, masked loads; 0: signed), alternating
    LORASERVE_ATTN_LEAN=1 gpu_tests attn_masked_tests 100 tests/test_attention.py
    rm -f "$OUT"/*.xml
    for lean in 2 0; do
      LORASERVE_ATTN_LEAN=$lean timeout 130 python3 -m benchmarks.step_bench --profile \
        --profile-graphs --out /tmp/prof_$lean.json > "$OUT/prof_lean$lean.log" 2>&1
      echo "== step_bench --profile --profile-graphs LORASERVE_ATTN_LEAN=$lean: rc $?"
      grep -E "decode batch (1|32), 0 adapters, graphs|_decode_attention|_decode_gemv|_rope|_rmsnorm|span" \
        "$OUT/prof_lean$lean.log" | head -24
    done
    base_each 520 49b LORASERVE_ATTN_LEAN=1 LORASERVE_ATTN_LEAN=2 LORASERVE_ATTN_LEAN=0 \
      LORASERVE_ATTN_LEAN=1 LORASERVE_ATTN_LEAN=2 LORASERVE_ATTN_LEAN=0   # (NONE_n: 2 then)
    ;;
  s49a)  # one GPU: the KV tile load's positions as unsigned shifts and masks, clamped to the
    # sequence instead of masked loads, offsets in 32 bits (LORASERVE_ATTN_LEAN=2; the default
    # when it ran at 6619701, opt-in since):
    # its GPU tests (attention against the reference over a NaN-poisoned cache, greedy tokens
    # against HF, decode graphs against eager), decode attention alone with it and without,
    # then base steps by default and with LORASERVE_ATTN_LEAN=0, alternating, three rounds
    LORASERVE_ATTN_LEAN=2 gpu_tests attn_tests 220 tests/test_attention.py tests/test_engine_gpu.py \
      tests/test_graphs_gpu.py -k "test_gpu_ or hf_on_cuda or (test_graphs_match_eager and csgmv)"
    rm -f "$OUT"/*.xml
    for lean in 1 0; do
      LORASERVE_ATTN_LEAN=$lean timeout 120 python3 -m benchmarks.attn_bench --batch 32 1 \
        --ctx 143 1024 --min-split 64 --one-slice --reps 20 --out "$OUT/attn_lean$lean.json" \
        > /tmp/attn_lean$lean.log 2>&1
      echo "== attn_bench LORASERVE_ATTN_LEAN=$lean: rc $?"; grep " us " /tmp/attn_lean$lean.log
    done
    base_each 520 49a LORASERVE_ATTN_LEAN=2 LORASERVE_ATTN_LEAN=0 LORASERVE_ATTN_LEAN=2 \
      LORASERVE_ATTN_LEAN=0 LORASERVE_ATTN_LEAN=2 LORASERVE_ATTN_LEAN=0   # (NONE_n: 2 then)
    ;;
  s41a)  # one GPU: gate_up's projection and SiLU*up as one decode GEMM launch
    # (LORASERVE_DECODE_GATE_UP=1, opt-in): its CUDA tests, gate_up alone behind add+RMSNorm
    # over tilings, then base decode steps with it at two tilings and without, alternating
    gpu_tests gate_up_tests 150 tests/test_gate_up_gemm.py tests/test_graphs_gpu.py -k "gate_up"
    rm -f "$OUT"/*.xml
    timeout 120 python3 -m benchmarks.gemm_bench --batch 32 --proj gate_up \
      --gate-up 64:256:0:4:4 64:128:0:4:4 64:128:0:4:6 128:128:0:8:3 128:64:0:8:6 32:256:0:4:4 \
      --out "$OUT/gemm_gate_up.json" > "$OUT/gemm_gate_up.log" 2>&1
    echo "== gemm_bench --gate-up: rc $?"; grep -E " us |copy|rror" "$OUT/gemm_gate_up.log"
    gu=LORASERVE_DECODE_GATE_UP=1
    i=0
    for knob in NONE=1 "$gu" "$gu LORASERVE_DECODE_GATE_UP_TILE=128:128:0:8:3" NONE=2 "$gu" \
        "$gu LORASERVE_DECODE_GATE_UP_TILE=128:128:0:8:3" NONE=3 "$gu"; do
      i=$((i + 1))
      if [ "$SECONDS" -gt 500 ]; then echo "== process $i: skipped, out of time"; break; fi
      # shellcheck disable=SC2086  # the settings are separate words
      name="base_${i}_$(echo "$knob" | cut -d' ' -f1,2 | tr '=: ' '___')"  # no ':' ($OUT)
      step_base "$name" $((i == 1 ? 100 : 75)) $knob
      rm -f "$OUT/$name.log"  # (and few files: $OUT takes a few)
    done
    step_table "$OUT"/base_[0-9]_*.json
    ;;
  s48c)  # one GPU: greedy steps take greedy_argmax(penalize(logits)) (bf16 where no row has
    # anything to process): the sampler's GPU test (no host sync over every path), greedy tokens
    # against HF for the four architectures, decode graphs against eager
    gpu_tests sampler_tests 300 tests/test_sampler.py tests/test_engine_gpu.py \
      tests/test_graphs_gpu.py \
      -k "cuda_mixed_batch or hf_on_cuda or (test_graphs_match_eager and csgmv) or (replay_logits_bf16 and csgmv)"
    ;;
  s48d)  # one GPU: every decode graph test (at a5b066b, mixed_decode_step's state built one
    # blocking step at a time; reverted: the split LoRA stacks' bf16 replay measured 0.099 there)
    timeout 480 python3 -m pytest -q -m gpu -p no:cacheprovider -s tests/test_graphs_gpu.py \
      > "$OUT/graph_tests.log" 2>&1
    echo "== graph tests: rc $?"; grep -E "against eager|passed|failed" "$OUT/graph_tests.log"
    grep -E "^(FAILED|ERROR)" "$OUT/graph_tests.log" | head
    ;;
  s48b)  # one GPU: decode attention alone at configurations s48a's profile points to (a warp a
    # program: no barriers between warps), over slice counts
    attn_bench 400 --batch 32 1 --ctx 143 1024 --min-split 64 --reps 20 --config-min-split 16 \
      --configs 64x4x3 64x4x2 64x8x3 64x2x3 32x2x3 32x1x3 32x1x2 16x1x3 16x1x2 \
      --splits 0 4 8 16
    ;;
  s48a)  # one GPU: where decode attention's time goes at batch 32 over a short context
    # (about 3x its KV bytes' time): Nsight Compute's sections, one launch a variant
    for b in 32 1; do
      timeout 200 ncu --clock-control none --kernel-name regex:_decode_attention --section \
        SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \
        python3 -m benchmarks.attn_bench --ncu --batch "$b" --ctx 143 --min-split 64 \
        --one-slice > "$OUT/ncu_attn_b$b.txt" 2>&1
      echo "== ncu attention batch $b: rc $?"
      grep -E "attn_bench|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Block Limit|Theoretical Occ|Grid Size|==PROF==|Error" \
        "$OUT/ncu_attn_b$b.txt" | head -60
    done
    # the decode GEMM at batch 32 as the base graph runs it: qkv unsplit, o and down over 2
    # slices (one launch each after a warm-up), gate_up with SiLU*up
    timeout 150 ncu --clock-control none --kernel-name regex:_decode_gemm --launch-skip 3 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      --section MemoryWorkloadAnalysis python3 -c "
import torch
from ops.triton_decode_gemm import decode_gemm, decode_gemm_silu_mul
x = {k: torch.randn(32, k, device='cuda', dtype=torch.bfloat16) for k in (4096, 14336)}
for n, k, split in ((6144, 4096, 1), (4096, 4096, 2), (4096, 14336, 2)):
    w = torch.randn(n, k, device='cuda', dtype=torch.bfloat16)
    decode_gemm(x[k], w, split=split)
for n, k, split in ((6144, 4096, 1), (4096, 4096, 2), (4096, 14336, 2)):
    w = torch.randn(n, k, device='cuda', dtype=torch.bfloat16)
    decode_gemm(x[k], w, split=split)
w = torch.randn(28672, 4096, device='cuda', dtype=torch.bfloat16)
decode_gemm_silu_mul(x[4096], w)
torch.cuda.synchronize()
" > "$OUT/ncu_gemm_b32.txt" 2>&1
    echo "== ncu decode GEMM batch 32: rc $?"
    grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Grid Size|Error" \
      "$OUT/ncu_gemm_b32.txt" | head -40
    ;;
  s46d)  # one GPU: logits in the model's dtype, greedy steps' argmax on them (no fp32 copy of
    # the batch's logits): GPU parity and graph tests, then batch 32's base graph by kernel
    gpu_tests logits_tests 110 tests/test_engine_gpu.py tests/test_graphs_gpu.py \
      -k "hf_on_cuda or (test_graphs_match_eager and csgmv) or (replay_logits_bf16 and csgmv)"
    rm -f "$OUT"/*.xml
    timeout 130 python3 -m benchmarks.step_bench --profile --profile-graphs --timeline \
      --out /tmp/prof_base.json > "$OUT/prof_base.log" 2>&1
    echo "== step_bench --profile --profile-graphs: rc $?"
    sed -n "/decode batch 32, 0 adapters, graphs/,/decode batch 1, 1 adapters/p" "$OUT/prof_base.log"
    ;;
  s46c)  # one GPU: the end-to-end targets last measured in the thirty-second session, at this
    # code: adapter uploads, the HF PEFT baseline side by side, the issue's many-adapter
    # setting (1000 rank-8 q/v adapters against 8 at max_loras_per_batch 32); about 9 min
    timeout 100 python3 -m benchmarks.upload_bench --out "$OUT/upload.json" > "$OUT/upload.log" 2>&1
    echo "== upload_bench: rc $?"; grep -E "^(rank|pinned)" "$OUT/upload.log"
    hf_baseline 150 hf_baseline
    timeout 300 python3 -m benchmarks.many_adapters --saturated-only --num-requests 8192 \
      --output-len 64 --progress-s 10 --out "$OUT/many_cap32_8192_64.json" > /tmp/cap32.log 2>&1
    echo "== many_adapters cap 32, 8192 requests of 256/64: rc $?"
    grep -E "saturated:|keeps|Error|engine built|wrote" /tmp/cap32.log | cut -c1-600
    tail -2 /tmp/cap32.log | cut -c1-300
    ;;
  s45a)  # one GPU: the 32-slot targets with `lora_split_plan` (3 slices of 128 rows for o's
    # and down's stacks) and with at most 2 slices (unsplit there), alternating; then the
    # 8-slot targets at the defaults (their split unchanged, through the uneven-K kernel)
    step_each 420 NONE=1 LORASERVE_DECODE_GEMM_LORA_SPLIT=2 NONE=2 LORASERVE_DECODE_GEMM_LORA_SPLIT=2
    [ "$SECONDS" -lt 500 ] && { step8 step8_1_none 95 NONE=1; rm -f "$OUT/step8_1_none.log"; }
    ;;
  s44b)  # one GPU: o's and down's stacks split as `lora_split_plan` picks (a 32-slot pool's:
    # 3 uneven slices of 128 rows, 108 programs): the GPU tests, the 32-slot targets with it
    # and with at most 2 slices (unsplit there, as before); then gate_up's fold epilogue
    # within its shared memory: its kernel test and the 8-slot targets with it
    gpu_tests split_tests 200 tests/test_decode_gemm.py tests/test_graphs_gpu.py \
      -k "3_slices or split_lora"
    rm -f "$OUT"/*.xml
    [ "$SECONDS" -lt 230 ] && { step_lora 100 step_1_plan NONE=1; rm -f "$OUT/step_1_plan.log"; }
    [ "$SECONDS" -lt 330 ] && { step_lora 95 step_2_most2 LORASERVE_DECODE_GEMM_LORA_SPLIT=2
      rm -f "$OUT/step_2_most2.log"; }
    step_table "$OUT"/step_*.json
    [ "$SECONDS" -lt 380 ] && gpu_tests fold_tests 60 tests/test_gate_up_gemm.py -k fold_bf16
    rm -f "$OUT"/*.xml
    [ "$SECONDS" -lt 420 ] && { step8 step8_1_fold 95 LORASERVE_DECODE_GATE_UP_FOLD=8
      rm -f "$OUT/step8_1_fold.log"; }
    ;;
  s44a)  # one GPU: gate_up's LoRA in its one launch, the epilogue's B and t tiles loaded as
    # vectors and pipelined (LORASERVE_DECODE_GATE_UP_FOLD=8, opt-in): its GPU tests, then the
    # 8-slot and the 32-slot pools' targets with it and without
    gpu_tests fold_tests 170 tests/test_gate_up_gemm.py tests/test_graphs_gpu.py -k "fold"
    rm -f "$OUT"/*.xml
    fo=LORASERVE_DECODE_GATE_UP_FOLD=8
    [ "$SECONDS" -lt 260 ] && { step8 step8_1_fold 110 "$fo"; rm -f "$OUT/step8_1_fold.log"; }
    [ "$SECONDS" -lt 350 ] && { step8 step8_2_none 95 NONE=1; rm -f "$OUT/step8_2_none.log"; }
    step_table "$OUT"/step8_*.json
    [ "$SECONDS" -lt 430 ] && { step_lora 100 step_1_fold "$fo"; rm -f "$OUT/step_1_fold.log"; }
    [ "$SECONDS" -lt 500 ] && { step_lora 95 step_2_none NONE=1; rm -f "$OUT/step_2_none.log"; }
    step_table "$OUT"/step_*.json
    ;;
  s43c)  # one GPU: where batch 32's base graph spends its step at the current defaults (the
    # one-launch gate_up; kernel time by name, and which kernels move the step's end)
    timeout 140 python3 -m benchmarks.step_bench --profile --profile-graphs --timeline \
      --out /tmp/prof_base.json > "$OUT/prof_base.log" 2>&1
    echo "== step_bench --profile --profile-graphs: rc $?"
    sed -n "/decode batch 32, 0 adapters, graphs/,/decode batch 1, 1 adapters/p" "$OUT/prof_base.log"
    ;;
  s43b)  # one GPU: o's and down's stacks split at 64:128:0:4:4
    # (LORASERVE_DECODE_GEMM_LORA_TILE, opt-in; two programs a multiprocessor, so the
    # 32-slot pool's 144 split programs are one wave): the GPU tests, then the 32-slot and the
    # 8-slot targets with it and without
    gpu_tests split_tests 150 tests/test_graphs_gpu.py -k "split_lora"
    rm -f "$OUT"/*.xml
    lt=LORASERVE_DECODE_GEMM_LORA_TILE=64:128:0:4:4
    step_each 330 "$lt" NONE=1 "$lt"
    [ "$SECONDS" -lt 420 ] && { step8 step8_1_tile 95 "$lt"; rm -f "$OUT/step8_1_tile.log"; }
    [ "$SECONDS" -lt 490 ] && { step8 step8_2_none 95 NONE=1; rm -f "$OUT/step8_2_none.log"; }
    step_table "$OUT"/step8_*.json
    ;;
  s42f)  # one GPU: the 8-slot pool's targets with o's and down's stacks split by default
    # (where the grid is one wave) and without (LORASERVE_DECODE_GEMM_LORA_SPLIT=0)
    step8_each 230 NONE=1 LORASERVE_DECODE_GEMM_LORA_SPLIT=0
    ;;
  s42e)  # one GPU: o's and down's stacked LoRA GEMMs over 2 slices of K
    # (LORASERVE_DECODE_GEMM_LORA_SPLIT=2, opt-in): its GPU graph tests, then the 32-slot and
    # the 8-slot pools' targets with it and without
    gpu_tests split_tests 160 tests/test_graphs_gpu.py -k "split_lora"
    rm -f "$OUT"/*.xml
    sp=LORASERVE_DECODE_GEMM_LORA_SPLIT=2
    step_lora 110 step_1_split "$sp"; rm -f "$OUT/step_1_split.log"
    [ "$SECONDS" -lt 380 ] && { step_lora 90 step_2_none NONE=1; rm -f "$OUT/step_2_none.log"; }
    step_table "$OUT"/step_*.json
    [ "$SECONDS" -lt 420 ] && { step8 step8_1_split 95 "$sp"; rm -f "$OUT/step8_1_split.log"; }
    [ "$SECONDS" -lt 490 ] && { step8 step8_2_none 95 NONE=1; rm -f "$OUT/step8_2_none.log"; }
    step_table "$OUT"/step8_*.json
    ;;
  s42d)  # one GPU: the 32-slot targets at the defaults, where the 32-adapter graph spends its
    # step (kernel time by name, what moves the step's end), base steps with every decode
    # GEMM projection at 64:128:0:4:4 and by default, the 32-slot targets again
    step_lora 110 step_1_none NONE=1
    rm -f "$OUT/step_1_none.log"
    timeout 170 python3 -m benchmarks.step_bench --lora --profile --profile-graphs --timeline \
      --out /tmp/prof_lora.json > "$OUT/prof_lora.log" 2>&1
    echo "== step_bench --lora --profile --profile-graphs: rc $?"
    grep -E "total|what moves" "$OUT/prof_lora.log"
    i=0
    for knob in LORASERVE_DECODE_GEMM_TILE=64:128:0:4:4 NONE=1 LORASERVE_DECODE_GEMM_TILE=64:128:0:4:4 NONE=2; do
      i=$((i + 1))
      if [ "$SECONDS" -gt 470 ]; then echo "== process $i: skipped, out of time"; break; fi
      name="base_${i}_$(echo "$knob" | cut -d= -f1 | tr 'A-Z' 'a-z')"
      # shellcheck disable=SC2086  # the settings are separate words
      step_base "$name" 70 $knob
      rm -f "$OUT/$name.log"
    done
    step_table "$OUT"/base_*.json
    if [ "$SECONDS" -lt 480 ]; then step_lora 95 step_2_none NONE=2; rm -f "$OUT/step_2_none.log"; fi
    step_table "$OUT"/step_*.json
    ;;
  s42a)  # one GPU: every slot's gate_up shrink as the decode GEMM over the stack's A rows in
    # 8 slices of K, then gate_up + LoRA + SiLU*up in one launch (LORASERVE_DECODE_GATE_UP_FOLD,
    # opt-in): its GPU tests, then the 8-slot pool's targets by default and with it
    gpu_tests fold_tests 170 tests/test_gate_up_gemm.py tests/test_graphs_gpu.py -k "fold"
    rm -f "$OUT"/*.xml
    step8_each 470 NONE=1 LORASERVE_DECODE_GATE_UP_FOLD=8 NONE=2 LORASERVE_DECODE_GATE_UP_FOLD=8
    ;;
  s42b)  # one GPU: the 32-slot step targets by default and with gate_up's LoRA in its one
    # launch (LORASERVE_DECODE_GATE_UP_FOLD=8), alternating
    step_each 440 NONE=1 LORASERVE_DECODE_GATE_UP_FOLD=8 NONE=2 LORASERVE_DECODE_GATE_UP_FOLD=8
    ;;
  s42c)  # one GPU: base decode steps by default and with every decode GEMM projection at
    # 64:128:0:4:4 (the tiling gate_up's one launch won at; the twenty-ninth session's sweep of
    # qkv, o and down did not include it), alternating, three rounds
    i=0
    for round in 1 2 3; do
      for knob in NONE=$round LORASERVE_DECODE_GEMM_TILE=64:128:0:4:4; do
        i=$((i + 1))
        if [ "$SECONDS" -gt 520 ]; then echo "== process $i: skipped, out of time"; break 2; fi
        name="base_${i}_$(echo "$knob" | cut -d= -f1 | tr 'A-Z' 'a-z')"
        # shellcheck disable=SC2086  # the settings are separate words
        step_base "$name" $((i == 1 ? 100 : 70)) $knob
        rm -f "$OUT/$name.log"
      done
    done
    step_table "$OUT"/base_*.json
    ;;
  s41d)  # one GPU: gate_up's LoRA stacks on the decode GEMM by default (64:128:0:4:4): the
    # graph tests s41c's call did not reach, then the 32-slot step targets
    gpu_tests graph_tests 190 tests/test_graphs_gpu.py -k "gate_up or large"
    rm -f "$OUT"/*.xml
    step_each 330 NONE=1
    ;;
  s41c)  # one GPU: gate_up and SiLU*up in one launch by default (64:128:0:4:4): the decode
    # GEMM's GPU tests, then the 8-slot pool's targets by default and with the LoRA stacks
    # above MAX_WEIGHT_ELEMS (gate_up's) on the decode GEMM (LORASERVE_DECODE_GEMM_LARGE)
    gpu_tests gemm_tests 170 tests/test_gate_up_gemm.py tests/test_decode_gemm.py \
      tests/test_graphs_gpu.py -k "gate_up or large or gemm"
    rm -f "$OUT"/*.xml
    large=LORASERVE_DECODE_GEMM_LARGE=64:128:0:4:4
    step8_each 470 NONE=1 "$large" NONE=2 "$large"
    ;;
  s41b)  # one GPU: base decode steps by default and with gate_up's one launch at the three
    # tilings that led alone in s41a (64:128:0:4:4, 128:64:0:8:6) and in the step
    # (128:128:0:8:3), alternating, up to three rounds (names without ':': $OUT takes them)
    gu=LORASERVE_DECODE_GATE_UP=1
    i=0
    for round in 1 2 3; do
      for knob in NONE=$round "$gu LORASERVE_DECODE_GATE_UP_TILE=128:128:0:8:3" \
          "$gu LORASERVE_DECODE_GATE_UP_TILE=64:128:0:4:4" \
          "$gu LORASERVE_DECODE_GATE_UP_TILE=128:64:0:8:6"; do
        i=$((i + 1))
        if [ "$SECONDS" -gt 530 ]; then echo "== process $i: skipped, out of time"; break 2; fi
        tile=$(echo "$knob" | sed -n 's/.*TILE=\([0-9]*\):\([0-9]*\):.*/t\1x\2/p')
        # shellcheck disable=SC2086  # the settings are separate words
        step_base "base_${i}_${tile:-default}" $((i == 1 ? 100 : 70)) $knob
        rm -f "$OUT/base_${i}_${tile:-default}.log"
      done
    done
    step_table "$OUT"/base_*.json
    ;;
  tp)
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    gpu_tests tp_gpu 200 tests/test_tp_gpu.py
    timeout 300 python3 -m benchmarks.tp_bench --out "$OUT/tp_bench.json" > "$OUT/tp_bench.log" 2>&1
    echo "== tp_bench: rc $?"; tail -12 "$OUT/tp_bench.log"
    ;;
  gpu1)
    start_soak
    gpu_tests tp_gpu 200 -s tests/test_tp_gpu.py  # parity only: it shares GPU 1 with the soak
    export CUDA_VISIBLE_DEVICES=0
    gpu_tests gpu_tests 220 tests/test_lora_ops.py tests/test_fused_ops.py \
      tests/test_engine_gpu.py tests/test_graphs_gpu.py tests/test_pipeline_gpu.py
    timeout 220 python3 -m benchmarks.step_bench --lora --steps 20 --out "$OUT/step_lora.json" \
      > "$OUT/step_lora.log" 2>&1
    echo "== step_bench --lora: rc $?"; tail -22 "$OUT/step_lora.log"
    echo "== soak so far:"; tail -2 "$SOAK_LOG"
    ;;
  gpu2)
    export CUDA_VISIBLE_DEVICES=0
    timeout 270 python3 -m benchmarks.churn_bench --out "$OUT/churn.json" > "$OUT/churn.log" 2>&1
    echo "== churn_bench: rc $?"; tail -25 "$OUT/churn.log"
    python3 -m benchmarks.dummy_model llama-3.1-8b /tmp/llama8b > /dev/null
    timeout 110 python3 -m benchmarks.responsiveness --model-path /tmp/llama8b \
      --server-args "--load-format dummy --dtype bfloat16" --batch 32 --new-tokens 1024 \
      --out "$OUT/responsiveness.json" > "$OUT/responsiveness.log" 2>&1
    echo "== responsiveness: rc $?"; tail -3 "$OUT/responsiveness.log"
    timeout 80 python3 -m benchmarks.upload_bench --out "$OUT/upload.json" > "$OUT/upload.log" 2>&1
    echo "== upload_bench: rc $?"; tail -3 "$OUT/upload.log"
    for _ in $(seq 60); do pgrep -f "tests/test_soak.py" > /dev/null || break; sleep 5; done
    echo "== soak:"; tail -8 "$SOAK_LOG"; cp "$SOAK_LOG" "$OUT/soak.log"
    hf_baseline 150 hf_baseline
    ;;
  final)  # one GPU: the GPU tests again, each file in its own process, then the benchmarks
    gpu_tests pipeline_gpu 100 -s tests/test_pipeline_gpu.py
    gpu_tests engine_gpu 100 -s tests/test_engine_gpu.py
    gpu_tests fused_gpu 70 -s tests/test_fused_ops.py -k fused_model_matches_unfused
    python3 -m benchmarks.dummy_model llama-3.1-8b /tmp/llama8b > /dev/null
    timeout 80 python3 -m benchmarks.responsiveness --model-path /tmp/llama8b \
      --server-args "--load-format dummy --dtype bfloat16" --batch 32 --new-tokens 1024 \
      --out "$OUT/responsiveness.json" > "$OUT/responsiveness.log" 2>&1
    echo "== responsiveness: rc $?"; tail -3 "$OUT/responsiveness.log"
    timeout 170 python3 -m benchmarks.step_bench --lora --steps 20 --out "$OUT/step_lora.json" \
      > "$OUT/step_lora.log" 2>&1
    echo "== step_bench --lora: rc $?"; tail -22 "$OUT/step_lora.log"
    ;;
  check)  # one GPU: every GPU test file in its own process (a failure cannot cascade), uploads
    gpu_tests lora_ops_gpu 200 tests/test_lora_ops.py
    gpu_tests engine_gpu 100 tests/test_engine_gpu.py
    gpu_tests graphs_gpu 200 tests/test_graphs_gpu.py
    gpu_tests pipeline_gpu 100 tests/test_pipeline_gpu.py
    gpu_tests fused_gpu 100 tests/test_fused_ops.py
    timeout 60 python3 -m benchmarks.upload_bench --uploads 4 --out "$OUT/upload.json" \
      > "$OUT/upload.log" 2>&1
    echo "== upload_bench: rc $?"; tail -4 "$OUT/upload.log"
    ;;
  diag)  # one GPU: where the time goes, kernels, the serving benchmark
    gpu_tests graphs_gpu 80 tests/test_graphs_gpu.py
    timeout 120 python3 -m benchmarks.step_bench --lora --profile --disable-cuda-graph \
      --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1
    echo "== profile: rc $?"; grep -A12 "^GPU ms" "$OUT/profile.log"
    timeout 200 python3 -m benchmarks.lora_kernel_bench --sweep --out "$OUT/lora_kernels.json" \
      > "$OUT/lora_kernels.log" 2>&1
    echo "== lora_kernel_bench: rc $?"; grep -A60 "^LoRA ms per step" "$OUT/lora_kernels.log"
    serve_bench 180
    rm -f "$OUT"/*.xml
    ;;
  verify)  # one GPU: what the kernel and graph changes touch, then their figures
    gpu_tests lora_ops_gpu 200 tests/test_lora_ops.py
    gpu_tests graphs_gpu 200 tests/test_graphs_gpu.py
    gpu_tests engine_gpu 80 tests/test_engine_gpu.py
    timeout 170 python3 -m benchmarks.step_bench --lora --steps 20 --out "$OUT/step_lora.json" \
      > "$OUT/step_lora.log" 2>&1
    echo "== step_bench --lora: rc $?"; tail -16 "$OUT/step_lora.log"
    timeout 100 python3 -m benchmarks.lora_kernel_bench --out "$OUT/lora_kernels.json" \
      > "$OUT/lora_kernels.log" 2>&1
    echo "== lora_kernel_bench: rc $?"; grep -A30 "^LoRA ms per step" "$OUT/lora_kernels.log"
    rm -f "$OUT"/*.xml
    ;;
  serving)  # one GPU: the end-to-end figures
    gpu_tests lora_graph_gpu 60 tests/test_lora_ops.py -k "graph_replay or two_launches"
    hf_baseline 130 hf_baseline
    timeout 200 python3 -m benchmarks.many_adapters --out "$OUT/many.json" > "$OUT/many.log" 2>&1
    echo "== many_adapters: rc $?"; tail -3 "$OUT/many.log"
    rm -f "$OUT"/*.xml
    ;;
  qwen)  # one GPU: the second model shape, and the serving benchmark on the current code
    timeout 200 python3 -m benchmarks.step_bench --shape qwen2.5-7b --lora --steps 20 \
      --out "$OUT/step_qwen.json" > "$OUT/step_qwen.log" 2>&1
    echo "== step_bench qwen2.5-7b: rc $?"; tail -16 "$OUT/step_qwen.log"
    serve_bench 200
    ;;
  repeat)  # one GPU: graphs vs eager and /health latency, each measured 3 times (median)
    timeout 150 python3 -m benchmarks.step_bench --steps 20 --repeat 3 \
      --out "$OUT/step_graphs_r3.json" > "$OUT/step_graphs_r3.log" 2>&1
    echo "== graphs: rc $?"; grep -E "^decode" "$OUT/step_graphs_r3.log"
    timeout 150 python3 -m benchmarks.step_bench --steps 10 --repeat 3 --disable-cuda-graph \
      --out "$OUT/step_eager_r3.json" > "$OUT/step_eager_r3.log" 2>&1
    echo "== eager: rc $?"; grep -E "^decode" "$OUT/step_eager_r3.log"
    python3 -m benchmarks.dummy_model llama-3.1-8b /tmp/llama8b > /dev/null
    timeout 150 python3 -m benchmarks.responsiveness --model-path /tmp/llama8b --repeat 3 \
      --server-args "--load-format dummy --dtype bfloat16" --batch 32 --new-tokens 1024 \
      --out "$OUT/responsiveness_r3.json" > "$OUT/responsiveness_r3.log" 2>&1
    echo "== responsiveness: rc $?"; tail -2 "$OUT/responsiveness_r3.log"
    ;;
  many)  # one GPU: S-LoRA's 1000-adapter setting against 8 adapters
    timeout 400 python3 -m benchmarks.many_adapters --out "$OUT/many.json" > "$OUT/many.log" 2>&1
    echo "== many_adapters: rc $?"; tail -4 "$OUT/many.log"
    ;;
  mixed)  # one GPU: prefill graphs' tests, then the end-to-end figures they change
    gpu_tests graphs_gpu 300 -x tests/test_graphs_gpu.py
    gpu_tests attention_tile_gpu 60 tests/test_attention.py -k tile
    gpu_tests engine_gpu 100 tests/test_engine_gpu.py
    hf_baseline 200 hf_baseline
    serve_bench 170
    rm -f "$OUT"/*.xml
    ;;
  mixed2)  # one GPU: prefill graphs' tests again, the HF baseline, many adapters
    gpu_tests graphs_gpu 300 -x tests/test_graphs_gpu.py
    gpu_tests attention_tile_gpu 60 tests/test_attention.py -k tile
    hf_baseline 170 hf_baseline_ef
    timeout 150 python3 -m benchmarks.many_adapters --out "$OUT/many.json" > "$OUT/many.log" 2>&1
    echo "== many_adapters: rc $?"; tail -5 "$OUT/many.log"
    rm -f "$OUT"/*.xml
    ;;
  profile)  # one GPU: where the serving loop's host time goes (8 adapters at batch 32; the
            # 1000-adapter Poisson runs), then the HF baseline
    timeout 150 python3 -m benchmarks.loop_profile --out "$OUT/loop.json" > "$OUT/loop.log" 2>&1
    echo "== loop_profile: rc $?"; grep -v -i "warn\|loading" "$OUT/loop.log" | tail -45
    timeout 200 python3 -m benchmarks.many_adapters --profile --out "$OUT/many.json" \
      > "$OUT/many.log" 2>&1
    echo "== many_adapters --profile: rc $?"; grep -A10 "thread:" "$OUT/many.log" | tail -70
    tail -3 "$OUT/many.log"
    ;;
  steps)  # one GPU: the GPU tests of the loop's host path, then the step targets with PDL off
          # and on (LORASERVE_ENABLE_PDL is read once a process)
    gpu_tests engine_gpu 100 tests/test_engine_gpu.py
    gpu_tests pipeline_gpu 100 tests/test_pipeline_gpu.py
    timeout 170 python3 -m benchmarks.step_bench --lora --steps 20 --out "$OUT/step_lora.json" \
      > "$OUT/step_lora.log" 2>&1
    echo "== step_bench --lora: rc $?"; tail -16 "$OUT/step_lora.log"
    LORASERVE_ENABLE_PDL=1 timeout 170 python3 -m benchmarks.step_bench --lora --steps 20 \
      --out "$OUT/step_lora_pdl.json" > "$OUT/step_lora_pdl.log" 2>&1
    echo "== step_bench --lora, PDL on: rc $?"; tail -16 "$OUT/step_lora_pdl.log"
    rm -f "$OUT"/*.xml
    ;;
  staged)  # one GPU: GPU tests of the one-copy step inputs and the kernels' specialization
           # keys, then where the loop's host time goes with them
    gpu_tests staging_gpu 60 tests/test_staging.py tests/test_lora_ops.py
    gpu_tests graphs_gpu 300 -x tests/test_graphs_gpu.py
    gpu_tests engine_gpu 100 tests/test_engine_gpu.py tests/test_pipeline_gpu.py
    timeout 120 python3 -m benchmarks.loop_profile --out "$OUT/loop.json" > "$OUT/loop.log" 2>&1
    echo "== loop_profile: rc $?"; grep -v -i "warn\|loading" "$OUT/loop.log" | tail -30
    rm -f "$OUT"/*.xml
    ;;
  loads)  # one GPU: the 1000-adapter benchmark with its profile, then the HF baseline
    hf_baseline 200 hf_baseline
    timeout 330 python3 -m benchmarks.many_adapters --profile --out "$OUT/many.json" \
      > "$OUT/many.log" 2>&1
    echo "== many_adapters --profile: rc $?"; grep -A6 "thread:" "$OUT/many.log" | tail -90
    grep -E "saturated|Poisson|keeps" "$OUT/many.log" | tail -8
    ;;
  warm2)  # one GPU: every GPU test the warm-up fixes touch (the warm-up runs in every CUDA
          # engine; decode attention's slice count is a run-time value; the LoRA partials'
          # split stride is one whatever the token count), each file group in its own process
    gpu_tests warmup_gpu 150 tests/test_warmup.py tests/test_staging.py
    gpu_tests engine_gpu 120 tests/test_engine_gpu.py tests/test_pipeline_gpu.py
    gpu_tests attention_gpu 200 tests/test_attention.py tests/test_fused_ops.py \
      tests/test_sampler.py tests/test_adapters.py
    gpu_tests lora_ops_gpu 150 tests/test_lora_ops.py
    gpu_tests graphs_gpu 150 -x tests/test_graphs_gpu.py
    rm -f "$OUT"/*.xml
    ;;
  pdl1)  # one GPU: the step targets with PDL on everywhere, then on Qwen2.5-7B shapes
    LORASERVE_ENABLE_PDL=1 timeout 170 python3 -m benchmarks.step_bench --lora --steps 10 \
      --out "$OUT/step_lora_pdl.json" > "$OUT/step_lora_pdl.log" 2>&1
    echo "== step_bench --lora, PDL on: rc $?"; grep -E "^(HBM|decode|prefill)" "$OUT/step_lora_pdl.log"
    timeout 200 python3 -m benchmarks.step_bench --shape qwen2.5-7b --lora --steps 10 \
      --out "$OUT/step_qwen.json" > "$OUT/step_qwen.log" 2>&1
    echo "== step_bench qwen2.5-7b: rc $?"; tail -22 "$OUT/step_qwen.log"
    ;;
  kwin)  # one GPU: GPU time a step by kernel category inside the saturated many-adapter runs,
         # at a 256-adapter cap and at S-LoRA's 32 (is the 1000-adapter loop GPU- or host-bound?)
    timeout 200 python3 -m benchmarks.many_adapters --saturated-only --kernel-window 1.5 3 \
      --max-loras-per-batch 256 --max-loaded-loras 512 --out "$OUT/many_cap_kw.json" \
      > "$OUT/many_cap_kw.log" 2>&1
    echo "== many_adapters cap 256, kernel window: rc $?"; grep -E "saturated" "$OUT/many_cap_kw.log"
    timeout 150 python3 -m benchmarks.many_adapters --saturated-only --kernel-window 1.5 3 \
      --out "$OUT/many_kw.json" > "$OUT/many_kw.log" 2>&1
    echo "== many_adapters cap 32, kernel window: rc $?"; grep -E "saturated" "$OUT/many_kw.log"
    ;;
  overlap)  # one GPU: the LoRA shrink on a side stream beside the base projection inside CUDA
            # graphs: its GPU tests, graphs against eager, engine tests, the step targets
    gpu_tests lora_overlap_gpu 90 tests/test_lora_ops.py -k "overlap or two_launches"
    gpu_tests graphs_gpu 220 tests/test_graphs_gpu.py
    gpu_tests engine_gpu 140 tests/test_engine_gpu.py tests/test_pipeline_gpu.py \
      tests/test_warmup.py
    timeout 110 python3 -m benchmarks.step_bench --lora --steps 10 --out "$OUT/step_lora.json" \
      > "$OUT/step_lora.log" 2>&1
    echo "== step_bench --lora: rc $?"; grep -E "^(HBM|decode|prefill|  graph|serving)" "$OUT/step_lora.log"
    rm -f "$OUT"/*.xml
    ;;
  foldt)  # one GPU: the fold kernels on CUDA (fp32/fp16 at small shapes, bf16 at 8B shapes),
          # decode graphs (which fold) against eager steps (which expand), warm-up and engine
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_lora_fold.py \
      -k "not interpreter" > "$OUT/fold_tests.log" 2>&1
    echo "== fold tests: rc $?"; tail -6 "$OUT/fold_tests.log"
    gpu_tests graphs_decode_gpu 200 tests/test_graphs_gpu.py -k "not prefill"
    gpu_tests warm_engine_gpu 150 tests/test_warmup.py tests/test_engine_gpu.py
    rm -f "$OUT"/*.xml
    ;;
  fold)  # one GPU: the step targets with no fold and with every group folded, one process each
    for mode in 0 qkv,o,gate_up,down; do
      LORASERVE_LORA_FOLD=$mode timeout 200 python3 -m benchmarks.step_bench --lora --steps 10 \
        --out "$OUT/step_fold_${mode//,/_}.json" > "$OUT/step_fold_${mode//,/_}.log" 2>&1
      echo "== step_bench --lora, LORASERVE_LORA_FOLD=$mode: rc $?"
      grep -E "^(HBM|decode|prefill|  graph|serving)" "$OUT/step_fold_${mode//,/_}.log"
    done
    ;;
  foldl)  # one GPU: the default folds (qkv, gate_up): their tests, decode graphs against eager,
          # the step targets, the saturated 256-cap many-adapter run
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_lora_fold.py \
      -k "not interpreter" > "$OUT/fold_tests.log" 2>&1
    echo "== fold tests: rc $?"; tail -3 "$OUT/fold_tests.log"
    gpu_tests graphs_decode_gpu 200 tests/test_graphs_gpu.py -k "not prefill"
    timeout 100 python3 -m benchmarks.step_bench --lora --steps 10 --out "$OUT/step_lora.json" \
      > "$OUT/step_lora.log" 2>&1
    echo "== step_bench --lora: rc $?"; grep -E "^(HBM|decode|prefill|  graph)" "$OUT/step_lora.log"
    timeout 170 python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
      --max-loaded-loras 512 --out "$OUT/many_cap.json" > "$OUT/many_cap.log" 2>&1
    echo "== many_adapters cap 256: rc $?"; grep -E "saturated" "$OUT/many_cap.log"
    rm -f "$OUT"/*.xml
    ;;
  fold2)  # one GPU: add+RMSNorm's fold over several programs a row (o and down folded too)
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_lora_fold.py \
      -k "not interpreter" > "$OUT/fold_tests.log" 2>&1
    echo "== fold tests: rc $?"; tail -3 "$OUT/fold_tests.log"
    LORASERVE_LORA_FOLD=qkv,o,gate_up,down gpu_tests graphs_decode_gpu 200 \
      tests/test_graphs_gpu.py -k "not prefill"
    for mode in qkv,gate_up qkv,o,gate_up,down; do
      LORASERVE_LORA_FOLD=$mode timeout 100 python3 -m benchmarks.step_bench --lora --steps 10 \
        --out "$OUT/step_fold_${mode//,/_}.json" > "$OUT/step_fold_${mode//,/_}.log" 2>&1
      echo "== step_bench --lora, LORASERVE_LORA_FOLD=$mode: rc $?"
      grep -E "^(decode|prefill|  graph)" "$OUT/step_fold_${mode//,/_}.log"
    done
    LORASERVE_LORA_FOLD=qkv,o,gate_up,down timeout 100 python3 -m benchmarks.step_bench --lora \
      --profile --profile-graphs --out "$OUT/profile_graphs.json" > "$OUT/profile_graphs.log" 2>&1
    echo "== step_bench --profile --profile-graphs: rc $?"; cat "$OUT/profile_graphs.log" | tail -60
    rm -f "$OUT"/*.xml
    ;;
  foldv)  # one GPU: the landed folds (SiLU*up's a row a program): their tests, decode graphs
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_lora_fold.py \
      -k "not interpreter" > "$OUT/fold_tests.log" 2>&1
    echo "== fold tests: rc $?"; tail -3 "$OUT/fold_tests.log"
    gpu_tests graphs_decode_gpu 170 tests/test_graphs_gpu.py -k "not prefill"
    rm -f "$OUT"/*.xml
    ;;
  f12a)  # one GPU: SiLU*up fold variants alone, ncu on them, the projections' GEMMs alone
    timeout 150 python3 -m benchmarks.fold_bench --out "$OUT/fold_bench.json" \
      > "$OUT/fold_bench.log" 2>&1
    echo "== fold_bench: rc $?"; cat "$OUT/fold_bench.log" | grep " us "
    if command -v ncu >/dev/null; then
      timeout 150 ncu --clock-control none --kernel-name regex:silu_mul --launch-count 12 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 -m benchmarks.fold_bench --ncu --cases 32x8 > "$OUT/ncu_fold.txt" 2>&1
      echo "== ncu: rc $?"; grep -E "silu_mul|Duration|Memory Throughput|L2 Cache Throughput|\
Achieved Occupancy|Registers Per|Stall Long|Stall L1TEX|Warp Cycles Per Issued" \
        "$OUT/ncu_fold.txt" | head -120
    fi
    timeout 120 python3 -m benchmarks.gemm_bench --out "$OUT/gemm_bench.json" \
      > "$OUT/gemm_bench.log" 2>&1
    echo "== gemm_bench: rc $?"; cat "$OUT/gemm_bench.log"
    ;;
  f12f)  # one GPU: the landed folds: their tests, step targets, many adapters
    fold_tests 100
    gpu_tests graphs_decode_gpu 170 tests/test_graphs_gpu.py -k "not prefill"
    gpu_tests warm_engine_gpu 100 tests/test_warmup.py tests/test_engine_gpu.py
    step_lora 100 step_lora
    many_cap 150
    rm -f "$OUT"/*.xml
    ;;
  s13c)  # one GPU: the landed code: GPU tests, step targets, many adapters
    gpu_tests attn_gpu 100 tests/test_attention.py -k decode
    fold_tests 100
    gpu_tests graphs_decode_gpu 170 tests/test_graphs_gpu.py -k "not prefill"
    gpu_tests warm_engine_gpu 100 tests/test_warmup.py tests/test_engine_gpu.py
    step_lora 110 step_lora
    many_cap 150
    rm -f "$OUT"/*.xml
    ;;
  s13d)  # one GPU: the end-to-end baseline, upload bandwidth, step targets again
    hf_baseline 190 hf_baseline
    timeout 80 python3 -m benchmarks.upload_bench --out "$OUT/upload.json" > "$OUT/upload.log" 2>&1
    echo "== upload_bench: rc $?"; tail -n 3 "$OUT/upload.log"
    step_lora 110 step_lora
    ;;
  s13f)  # one GPU: the attention kernels over their shared tile step (ops/triton_attention_tiles)
    gpu_tests attn_gpu 120 tests/test_attention.py
    attn_bench 80 --min-split 64
    step_lora 110 step_lora
    rm -f "$OUT"/*.xml
    ;;
  s14e)  # one GPU: torch's preferred BLAS library, default against cuBLASLt
    for blas in default cublaslt; do
      timeout 60 python3 -m benchmarks.gemm_bench $([ "$blas" = default ] || echo "--blas $blas") --out "$OUT/gemm_$blas.json" \
        > "$OUT/gemm_$blas.log" 2>&1
      echo "== gemm_bench $blas: rc $?"; grep linear "$OUT/gemm_$blas.log"
    done
    for blas in cublaslt default; do
      timeout 100 python3 -m benchmarks.step_bench --lora --steps 10 $([ "$blas" = default ] || echo "--blas $blas") \
        --out "$OUT/step_$blas.json" > "$OUT/step_$blas.log" 2>&1
      echo "== step_bench --lora $blas: rc $?"
      grep -E "^(HBM|decode|prefill|  graph|serving loop)" "$OUT/step_$blas.log"
    done
    ;;
  s14f)  # one GPU: base decode only, cuBLASLt against the default, alternating
    i=0
    for blas in cublaslt default cublaslt default; do
      i=$((i + 1))
      timeout 60 python3 -m benchmarks.step_bench --steps 10 \
        $([ "$blas" = default ] || echo "--blas $blas") --out "$OUT/base_${i}_$blas.json" \
        > "$OUT/base_${i}_$blas.log" 2>&1
      echo "== step_bench $blas: rc $?"
      grep -E "^(decode|  graph|serving loop)" "$OUT/base_${i}_$blas.log" | grep -v "overlap off"
      rm -f "$OUT/base_${i}_$blas.log"
    done
    ;;
  s15a)  # one GPU: cuBLASLt for base-only decode graphs of batch 16 and more
    gpu_tests graphs_decode_gpu 200 tests/test_graphs_gpu.py -k "not prefill"
    i=0
    for min_bs in 16 0 16 0; do
      i=$((i + 1)); step_lora $((i == 1 ? 100 : 70)) "step_${i}_lt$min_bs" \
        LORASERVE_DECODE_CUBLASLT_MIN_BS=$min_bs
      rm -f "$OUT/step_${i}_lt$min_bs.log"  # a call returns eight files at most
    done
    rm -f "$OUT"/*.xml
    ;;
  s16b)  # one GPU: layer PDL by default, B loads before the wait, the Triton argmax
    gpu_tests s16b_gpu 330 tests/test_pdl.py tests/test_argmax.py tests/test_fused_ops.py \
      tests/test_graphs_gpu.py -k "not prefill"
    fold_tests 150
    timeout 60 python3 -m benchmarks.argmax_bench --block 2048 4096 8192 \
      --out "$OUT/argmax.json" > "$OUT/argmax.log" 2>&1
    echo "== argmax_bench: rc $?"; tail -16 "$OUT/argmax.log"
    i=0
    for pdl in 1 0 1 0; do
      i=$((i + 1)); step_lora $((i == 1 ? 100 : 75)) "step_${i}_pdl$pdl" LORASERVE_LAYER_PDL=$pdl
      rm -f "$OUT/step_${i}_pdl$pdl.log"  # a call returns eight files at most
    done
    rm -f "$OUT"/*.xml "$OUT/argmax.log"
    ;;
  s16c)  # one GPU: bf16 decode graph replays with layer PDL against without, and eager
    timeout 240 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_graphs_gpu.py \
      -k "replay" > "$OUT/replay_pdl.log" 2>&1
    echo "== replay tests, layer PDL on: rc $?"
    grep -E "bf16 graph against eager|passed|failed|max \|diff\|" "$OUT/replay_pdl.log" | head -20
    LORASERVE_LAYER_PDL=0 timeout 150 python3 -m pytest -q -s -m gpu -p no:cacheprovider \
      tests/test_graphs_gpu.py -k "replay_logits" > "$OUT/replay_nopdl.log" 2>&1
    echo "== replay logits tests, layer PDL off: rc $?"
    grep -E "bf16 graph against eager|passed|failed" "$OUT/replay_nopdl.log" | head -20
    ;;
  s16d)  # one GPU: graph-replay profile, end-to-end baseline, step targets at HEAD
    timeout 200 python3 -m benchmarks.step_bench --lora --profile --profile-graphs \
      --out "$OUT/profile_graphs.json" > "$OUT/profile_graphs.log" 2>&1
    echo "== profile (graphs): rc $?"; grep -E "^  decode" "$OUT/profile_graphs.log"
    hf_baseline 190 hf_baseline
    step_lora 110 step_lora
    rm -f "$OUT/profile_graphs.log"
    ;;
  s20a)  # one GPU (prepared): the targets measured before the pool's stacks became the default
    timeout 150 python3 -m benchmarks.upload_bench --out "$OUT/upload.json" > "$OUT/upload.log" 2>&1
    echo "== upload_bench: rc $?"; tail -3 "$OUT/upload.log"
    hf_baseline 150 hf_baseline
    timeout 200 python3 -m benchmarks.many_adapters --out "$OUT/many.json" > "$OUT/many.log" 2>&1
    echo "== many_adapters: rc $?"; tail -3 "$OUT/many.log"
    rm -f "$OUT"/*.xml
    ;;
  s21a)  # one GPU: the engine built with the pool before the weights (loaded into the stacks
    # in place), its GPU tests; adapter uploads; 1000 adapters at a 256-adapter cap
    gpu_tests engine_gpu 150 tests/test_engine_gpu.py
    timeout 150 python3 -m benchmarks.upload_bench --out "$OUT/upload.json" > "$OUT/upload.log" 2>&1
    echo "== upload_bench: rc $?"; grep -E "^(rank|pinned)" "$OUT/upload.log"
    many_cap 240
    rm -f "$OUT"/*.xml
    ;;
  s21c)  # one GPU: the GPU test files s21a left out, each in its own process
    gpu_tests lora_ops_gpu 200 tests/test_lora_ops.py
    gpu_tests graphs_gpu 200 tests/test_graphs_gpu.py
    gpu_tests pipeline_gpu 100 tests/test_pipeline_gpu.py
    gpu_tests fused_gpu 100 tests/test_fused_ops.py
    rm -f "$OUT"/*.xml
    if [ "$SECONDS" -lt 320 ]; then many_cap 240; fi  # a second run, where time is left
    ;;
  s23a)  # one GPU: the serving loop's decode steps profiled (busy and idle device time a
    # step, the largest idle gaps and the kernels either side), by default and with the
    # cuBLASLt plan s22b measured (faster graph forward at batch 1, the loop's step level)
    for plan in none benchmarks/results/lt_plan_22b.json; do
      extra=(); name=loop_prof_default
      if [ "$plan" != none ]; then extra=(--lt-plan "$plan"); name=loop_prof_lt; fi
      timeout 150 python3 -m benchmarks.step_bench --lora --profile-loop --steps 50 \
        "${extra[@]}" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
      echo "== step_bench --profile-loop ${extra[*]}: rc $?"
      sed -n "/^serving loop, device time/,\$p" "$OUT/$name.log" | head -40; tail -2 "$OUT/$name.log"
    done
    ;;
  s23b)  # one GPU: where a 1000-adapter step at cap 256 spends its time against an
    # 8-adapter one (the profiler slows both runs: its throughputs are not the target's)
    timeout 200 python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
      --max-loaded-loras 512 --kernel-window 2 3 --out "$OUT/many_kw.json" > "$OUT/many_kw.log" 2>&1
    echo "== many_adapters --kernel-window: rc $?"; grep -E "saturated|keeps" "$OUT/many_kw.log"
    many_cap 170
    ;;
  s26a)  # one GPU: the layer kernels back to their form before the L2 prefetch (its
    # arguments gone), their GPU tests; then split-K over the batches it applies to (s25d)
    gpu_tests layer_kernel_tests 200 tests/test_pdl.py tests/test_lora_fold.py \
      tests/test_graphs_gpu.py -k "pdl or chain or fold"
    "$0" s25d
    ;;
  s26b)  # one GPU: the targets s20a and many_cap measure, at the code without the prefetch
    timeout 150 python3 -m benchmarks.upload_bench --out "$OUT/upload.json" > "$OUT/upload.log" 2>&1
    echo "== upload_bench: rc $?"; grep -E "^(rank|pinned)" "$OUT/upload.log"
    hf_baseline 150 hf_baseline
    many_cap 200
    rm -f "$OUT"/*.xml
    ;;
  s26c)  # one GPU: the many-adapter target's spread, two runs
    for run in 1 2; do
      if [ "$SECONDS" -gt 330 ]; then echo "== many_cap run $run: skipped, out of time"; break; fi
      many_cap 200
      mv "$OUT/many_cap.json" "$OUT/many_cap_$run.json"; mv "$OUT/many_cap.log" "$OUT/many_cap_$run.log"
    done
    ;;
  s26d)  # one GPU: s26b/s26c's many-adapter step launches 11.5-12.9 ms against 6.1-7.0 over
    # 8 adapters: the host stacks of both runs
    timeout 300 python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
      --max-loaded-loras 512 --profile --out "$OUT/many_prof.json" > "$OUT/many_prof.log" 2>&1
    echo "== many_adapters --profile cap 256: rc $?"; grep -E "saturated|keeps" "$OUT/many_prof.log"
    ;;
  s28b)  # one GPU: the GPU tests of every upload mode: copy-stream uploads at real shapes,
    # serving through 2 slots against the synchronous path
    gpu_tests upload_modes_tests 400 tests/test_adapters.py tests/test_pipeline_gpu.py \
      -k "cuda_uploads or overlap_loading"
    rm -f "$OUT"/*.xml
    ;;
  s33a)  # one GPU: s32c again after the scheduler change (a waiting request whose adapter
    # cannot join is passed over for a set lookup, not an adapter-manager call each: s32c's
    # 8192-request run asked the manager about every queued request every step, and its
    # 1000-adapter half did not finish in 230 s)
    timeout 500 python3 -m benchmarks.many_adapters --saturated-only --num-requests 8192 \
      --out "$OUT/many_cap32_8192.json" > /tmp/cap32.log 2>&1
    echo "== many_adapters cap 32, 8192 requests: rc $?"
    grep -E "saturated:|keeps|Error|engine built" /tmp/cap32.log | cut -c1-600; tail -2 /tmp/cap32.log | cut -c1-400
    ;;
  s33b)  # one GPU: s33a ran out of time in its 1000-adapter half and said nothing of it: 64
    # new tokens a request (the 8-adapter half took 100 s at 128), the counters every 10 s.
    # First the pipeline's GPU tests (admission over real copy-stream events)
    gpu_tests pipeline 120 tests/test_pipeline_gpu.py
    timeout 420 python3 -m benchmarks.many_adapters --saturated-only --num-requests 8192 \
      --output-len 64 --progress-s 10 --out "$OUT/many_cap32_8192_64.json" > /tmp/cap32.log 2>&1
    echo "== many_adapters cap 32, 8192 requests of 256/64: rc $?"
    grep -E "saturated:|keeps|Error|engine built|^  at |wrote" /tmp/cap32.log | cut -c1-600
    tail -2 /tmp/cap32.log | cut -c1-300
    ;;
  s35a)  # one GPU: s33b's keep (96 % at 64 new tokens) at the issue's 128 new tokens, the
    # counters every 10 s
    timeout 420 python3 -m benchmarks.many_adapters --saturated-only --num-requests 8192 \
      --progress-s 10 --out "$OUT/many_cap32_8192_128.json" > /tmp/cap32.log 2>&1
    echo "== many_adapters cap 32, 8192 requests of 256/128: rc $?"
    grep -E "saturated:|keeps|Error|engine built|^  at |wrote" /tmp/cap32.log | cut -c1-600
    tail -2 /tmp/cap32.log | cut -c1-300
    ;;
  s35b)  # one GPU: the pipeline's GPU tests with each case's time (s33b's 120 s limit struck
    # after 5 of its 6 cases)
    gpu_tests pipeline 400 --durations=0 tests/test_pipeline_gpu.py
    grep -E "s call|passed|failed" "$OUT/pipeline.log" | head -20
    rm -f "$OUT"/*.xml
    ;;
  s35c)  # one GPU, at baf1e27 (the code was reverted after this run): the rotary + K/V store
    # inside decode attention (one launch fewer a layer, the default there): its GPU tests (bit for bit against the two kernels at Llama-3.1-8B's
    # heads; decode graphs and PDL chains with it), then the step targets by default and with
    # LORASERVE_DECODE_ROPE_ATTENTION=0 (the two kernels), alternating
    # the small-shape cases too (not GPU-marked: on CUDA their programs run concurrently)
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_lora_fold.py -k decode_rope \
      > "$OUT/rope_attention_small.log" 2>&1
    echo "== decode_rope small shapes on CUDA: rc $?"; tail -2 "$OUT/rope_attention_small.log"
    gpu_tests rope_attention_tests 200 tests/test_lora_fold.py tests/test_graphs_gpu.py \
      tests/test_pdl.py tests/test_attention.py
    rm -f "$OUT"/*.xml
    i=0
    for knob in NONE=1 LORASERVE_DECODE_ROPE_ATTENTION=0 NONE=2 LORASERVE_DECODE_ROPE_ATTENTION=0; do
      i=$((i + 1))
      if [ "$SECONDS" -gt 490 ]; then echo "== process $i: skipped, out of time"; break; fi
      name="step_${i}_$(echo "$knob" | tr '= ' '__')"
      step_lora $((i == 1 ? 110 : 85)) "$name" "$knob"
      rm -f "$OUT/$name.log"
    done
    step_table "$OUT"/step_[0-9]_*.json
    ;;
  s37b)  # one GPU: ops/triton_decode_gemm.py for qkv, o and down only (gate_up stays on
    # cuBLAS), its stages kept within shared memory: its GPU tests and decode graph tests, the
    # three projections alone at batch 32 over seven tilings (o/down in 2 and 4 slices), then
    # the step targets by default and with it up to 32 rows at the tiling that won
    gpu_tests gemm_tests 200 tests/test_decode_gemm.py tests/test_graphs_gpu.py -k "gemm"
    rm -f "$OUT"/*.xml
    timeout 170 python3 -m benchmarks.gemm_bench --batch 32 --proj qkv o down \
      --gemm 64:256:0:4:4 32:256:0:4:4 64:256:0:4:2 32:256:0:4:2 32:128:0:4:4 64:256:256:4:3 \
      16:256:0:4:4 --gemm-split 2 4 --out "$OUT/gemm_gemm.json" > "$OUT/gemm_gemm.log" 2>&1
    echo "== gemm_bench --gemm: rc $?"; grep -E " us |copy bandwidth" "$OUT/gemm_gemm.log"
    tile=$(python3 - "$OUT/gemm_gemm.json" <<'PY'
import json, sys, collections
rows = json.load(open(sys.argv[1]))["rows"]
want = {("qkv", "norm+gemm {}"), ("o", "gemm {} split2 pdl"), ("down", "gemm {} split2 pdl")}
tot, seen = collections.defaultdict(float), collections.Counter()
for r in rows:
    parts = r["layout"].split()
    if len(parts) < 2 or not parts[0].endswith("gemm"):
        continue
    t = parts[1]
    if (r["proj"], r["layout"].replace(t, "{}")) in want:
        tot[t] += r["us"]; seen[t] += 1
ok = {t: v for t, v in tot.items() if seen[t] == 3}
print(min(ok, key=ok.get) if ok else "64:256:0:4:4")
PY
)
    echo "== step tiling: $tile"
    step_each 480 NONE=1 \
      "LORASERVE_DECODE_GEMM=32 LORASERVE_DECODE_GEMM_TILE=$tile LORASERVE_DECODE_GEMM_SPLIT=2" \
      "LORASERVE_DECODE_GEMM=32 LORASERVE_DECODE_GEMM_TILE=$tile"
    ;;
  s37c)  # one GPU: the GPU tests of decode graphs (batch-1 GEMV by default, the opt-in GEMM),
    # the engine, the warm-up, adapter uploads (re-reads checked again), the pipeline and the
    # LoRA folds
    gpu_tests final_tests 460 --durations=15 tests/test_graphs_gpu.py tests/test_engine_gpu.py \
      tests/test_warmup.py tests/test_lora_fold.py tests/test_adapters.py tests/test_pipeline_gpu.py
    grep -E "s call|passed|failed|Error" "$OUT/final_tests.log" | head -30
    rm -f "$OUT"/*.xml
    ;;
  s40a)  # one GPU: the end-to-end targets not re-measured since the decode GEMM went on by
    # default (adapter uploads, the HF PEFT baseline), the 8-slot pool's targets, then the
    # 32-slot step targets once more (the 32-adapter case's spread); about 9 min
    timeout 150 python3 -m benchmarks.upload_bench --out "$OUT/upload.json" > "$OUT/upload.log" 2>&1
    echo "== upload_bench: rc $?"; grep -E "^(rank|pinned)" "$OUT/upload.log"
    hf_baseline 150 hf_baseline
    step8 step8_1_NONE_1 120 NONE=1
    [ "$SECONDS" -lt 470 ] && step_each 470 NONE=1
    step_table "$OUT"/step8_1_NONE_1.json
    ;;
  s40b)  # one GPU: the issue's many-adapter setting (1000 rank-8 q/v adapters against 8,
    # max_loras_per_batch 32, max_loaded_loras 128, 8192 requests of 256/64), then the 32-slot
    # step targets once more; about 8 min
    timeout 330 python3 -m benchmarks.many_adapters --saturated-only --num-requests 8192 \
      --output-len 64 --progress-s 10 --out "$OUT/many_cap32_8192_64.json" > /tmp/cap32.log 2>&1
    echo "== many_adapters cap 32, 8192 requests of 256/64: rc $?"
    grep -E "saturated:|keeps|Error|engine built|wrote" /tmp/cap32.log | cut -c1-600
    tail -2 /tmp/cap32.log | cut -c1-300
    [ "$SECONDS" -lt 460 ] && step_each 460 NONE=2
    ;;
  s39b)  # one GPU: where batch 32's base graph spends its step with the decode GEMM on by
    # default (kernel time by name, and which kernels move the step's end, from the timeline)
    timeout 140 python3 -m benchmarks.step_bench --profile --profile-graphs --timeline \
      --out "$OUT/prof_default.json" > "$OUT/prof_default.log" 2>&1
    echo "== step_bench --profile --profile-graphs: rc $?"
    sed -n "/^GPU ms a step/,\$p" "$OUT/prof_default.log" | head -60
    ;;
  s39a)  # one GPU: qkv's GEMM over 2 slices of K summed by the rotary kernel
    # (LORASERVE_DECODE_GEMM_QKV_SPLIT, opt-in): its tests on CUDA, decode attention at batch
    # 32 in one slice a sequence against the default count, then the step targets by default,
    # with the split at the tiling that won alone (128:128:256:8:3), with decode attention
    # aiming at one program an SM (one slice a sequence at batch 32), and with both
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fused_ops.py \
      tests/test_graphs_gpu.py -k "partials or qkv_split" > "$OUT/qkv_tests.log" 2>&1
    echo "== qkv split tests: rc $?"; tail -3 "$OUT/qkv_tests.log"
    timeout 60 python3 -m benchmarks.attn_bench --batch 32 --ctx 143 1024 4096 --min-split 64 \
      --one-slice --out "$OUT/attn_bench.json" > "$OUT/attn_bench.log" 2>&1
    echo "== attn_bench: rc $?"; grep -E "us|slice" "$OUT/attn_bench.log" | head -12
    qkv="LORASERVE_DECODE_GEMM_QKV_SPLIT=2 LORASERVE_DECODE_GEMM_QKV_TILE=128:128:256:8:3"
    attn=LORASERVE_DECODE_ATTN_PROGRAMS_PER_SM=1
    step_each 470 NONE=1 "$qkv" "$attn" "$qkv $attn"
    ;;
  s38c)  # one GPU: the 8-slot pool's step targets by default (the decode GEMM on) once more
    step8 step8_4_NONE_1 120 NONE=1; step_table "$OUT"/step8_4_NONE_1.json
    ;;
  s38b)  # one GPU: the decode GEMM on by default (2-32 rows, o and down of base graphs in 2
    # slices): the step targets in the 32-slot pool by default and with it off, the 8-slot pool
    # by default again, then its GPU tests (what the call's time leaves)
    step_each 330 NONE=1 LORASERVE_DECODE_GEMM=0
    if [ "$SECONDS" -lt 360 ]; then
      step8 step8_3_NONE_1 115 NONE=1; step_table "$OUT"/step8_3_NONE_1.json
    fi
    if [ "$SECONDS" -lt 470 ]; then
      gpu_tests gemm_tests $((575 - SECONDS)) tests/test_decode_gemm.py tests/test_graphs_gpu.py \
        -k "gemm"
      rm -f "$OUT"/*.xml
    fi
    ;;
  s38a)  # one GPU: the pipeline GPU tests s37c's 460 s left (41 of 44 passed there), the
    # decode GEMM in LoRA graphs in the 8-slot pool (s37d), qkv's GEMM over wider row tiles and
    # slices of K alone
    timeout 150 python3 -m pytest -v -m gpu -p no:cacheprovider --durations=8 \
      tests/test_pipeline_gpu.py > "$OUT/pipeline_tests.log" 2>&1
    echo "== pipeline tests: rc $?"; grep -E "PASSED|FAILED|ERROR|passed|failed|s call" \
      "$OUT/pipeline_tests.log" | cut -c1-150 | tail -22
    step8 step8_1_NONE_1 130 NONE=1
    [ "$SECONDS" -lt 420 ] && step8 step8_2_LORASERVE_DECODE_GEMM_32 110 LORASERVE_DECODE_GEMM=32 \
      LORASERVE_DECODE_GEMM_SPLIT=2
    step_table "$OUT"/step8_[0-9]_*.json
    if [ "$SECONDS" -lt 470 ]; then
      timeout $((560 - SECONDS)) python3 -m benchmarks.gemm_bench --batch 32 --proj qkv \
        --gemm 64:256:0:4:4 128:128:256:8:3 128:128:0:8:4 128:128:0:8:3 128:64:0:8:6 \
        64:128:0:4:6 --gemm-split 2 4 --out "$OUT/gemm_qkv.json" > "$OUT/gemm_qkv.log" 2>&1
      echo "== gemm_bench qkv: rc $?"; grep -E " us |copy bandwidth" "$OUT/gemm_qkv.log"
    fi
    ;;
  s37d)  # one GPU: the decode GEMM in base and LoRA graphs (LoRA stacks through it) against
    # the default, in the 8-slot pool the 8-adapter target names, one process each
    step8 step8_1_NONE_1 130 NONE=1
    [ "$SECONDS" -lt 250 ] && step8 step8_2_LORASERVE_DECODE_GEMM_32 100 LORASERVE_DECODE_GEMM=32 \
      LORASERVE_DECODE_GEMM_SPLIT=2
    step_table "$OUT"/step8_[0-9]_*.json
    ;;
  s37a)  # one GPU: ops/triton_decode_gemm.py, the tensor-core decode projection that loads its
    # first W tile before its PDL wait (LORASERVE_DECODE_GEMM): its GPU tests, the projections
    # alone at batch 32 over five tilings (and o/down split in 2), then the step targets by
    # default and with it up to 64 rows at the tiling that won behind add+RMSNorm
    gpu_tests gemm_tests 150 tests/test_decode_gemm.py tests/test_pdl.py -k "gemm or chain"
    rm -f "$OUT"/*.xml
    timeout 170 python3 -m benchmarks.gemm_bench --batch 32 --proj qkv o gate_up down \
      --gemm 64:128:256:4:4 64:128:512:8:4 32:128:256:4:4 128:128:256:8:3 64:256:0:4:4 \
      --gemm-split 2 --out "$OUT/gemm_gemm.json" > "$OUT/gemm_gemm.log" 2>&1
    echo "== gemm_bench --gemm: rc $?"; grep -E " us |copy bandwidth" "$OUT/gemm_gemm.log"
    tile=$(python3 - "$OUT/gemm_gemm.json" <<'PY'
import json, sys, collections
rows = json.load(open(sys.argv[1]))["rows"]
tot = collections.defaultdict(float)
for r in rows:
    if r["layout"].startswith("norm+gemm "):
        tot[r["layout"].split()[1]] += r["us"]
print(min(tot, key=tot.get) if tot else "64:128:256:4:4")
PY
)
    echo "== step tiling: $tile"
    step_each 470 NONE=1 "LORASERVE_DECODE_GEMM=64 LORASERVE_DECODE_GEMM_TILE=$tile" \
      "LORASERVE_DECODE_GEMM=64 LORASERVE_DECODE_GEMM_TILE=$tile LORASERVE_DECODE_GEMM_SPLIT=2"
    ;;
  s36a)  # one GPU: the decode GEMV that loads its weight before its PDL wait
    # (ops/triton_decode_gemv.py, LORASERVE_DECODE_GEMV): its GPU tests (Llama shapes against
    # F.linear, the PDL layer chain bit for bit, decode graphs against eager), the projections
    # alone at batch 1 over four tilings, then the step targets by default and with it at one row
    gpu_tests gemv_tests 170 tests/test_decode_gemv.py tests/test_pdl.py \
      tests/test_graphs_gpu.py -k "gemv or chain"
    rm -f "$OUT"/*.xml
    timeout 100 python3 -m benchmarks.gemm_bench --batch 1 --proj qkv o gate_up down \
      --gemv 16384:8 8192:4 32768:8 16384:4 --out "$OUT/gemm_gemv.json" > "$OUT/gemm_gemv.log" 2>&1
    echo "== gemm_bench --gemv: rc $?"; grep -E " us |copy bandwidth" "$OUT/gemm_gemv.log"
    step_each 600 NONE=1 LORASERVE_DECODE_GEMV=1
    ;;
  s36b)  # one GPU: the decode GEMV with the LoRA shrink in the same launch (folded groups):
    # its GPU tests, the step targets by default and with LORASERVE_DECODE_GEMV=1, then base
    # decode at batches 1-8 by default and with it up to 8 rows
    gpu_tests gemv_tests 170 tests/test_decode_gemv.py tests/test_pdl.py \
      tests/test_graphs_gpu.py -k "gemv or chain"
    rm -f "$OUT"/*.xml
    step_each 600 NONE=1 LORASERVE_DECODE_GEMV=1
    for knob in NONE=1 LORASERVE_DECODE_GEMV=8; do
      name="base_$(echo "$knob" | tr '= ' '__')"
      env "$knob" timeout 80 python3 -m benchmarks.step_bench --steps 10 --batch 1 2 4 8 \
        --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
      echo "== base steps $knob: rc $?"
      grep -E "^(decode|  graph|serving loop)" "$OUT/$name.log"
    done
    ;;
  s36c)  # one GPU: the batch-1 decode GEMV by default (LORASERVE_DECODE_GEMV=1): the GPU
    # tests of decode graphs, the engine, the warm-up, PDL, the folds and the GEMV, then the
    # step targets by default and with LORASERVE_DECODE_GEMV=0 (cuBLAS), one process each
    gpu_tests default_tests 330 --durations=8 tests/test_decode_gemv.py tests/test_pdl.py \
      tests/test_graphs_gpu.py tests/test_engine_gpu.py tests/test_warmup.py tests/test_lora_fold.py
    grep -E "passed|failed|Error" "$OUT/default_tests.log" | head -12
    rm -f "$OUT"/*.xml
    i=0
    for knob in NONE=1 LORASERVE_DECODE_GEMV=0; do
      i=$((i + 1))
      if [ "$SECONDS" -gt 450 ]; then echo "== process $i: skipped, out of time"; break; fi
      name="step_${i}_$(echo "$knob" | tr '= ' '__')"
      step_lora 95 "$name" "$knob"
      rm -f "$OUT/$name.log"
    done
    step_table "$OUT"/step_[0-9]_*.json
    ;;
  s36d)  # one GPU: the step targets with the batch-1 decode GEMV (default) and without
    # (LORASERVE_DECODE_GEMV=0), alternating, two processes each
    step_ab LORASERVE_DECODE_GEMV=0
    ;;
  s35d)  # one GPU: the session's host-side changes on the device's serving path (adapter
    # reads checked against the pool's dtype, prompt logprobs scored from logprob_start): the
    # GPU tests of adapters, the engine, the pipeline and the warm-up, each case's time
    gpu_tests serving_tests 400 --durations=15 tests/test_adapters.py tests/test_engine_gpu.py \
      tests/test_pipeline_gpu.py tests/test_warmup.py
    grep -E "s call|passed|failed|Error" "$OUT/serving_tests.log" | head -24
    rm -f "$OUT"/*.xml
    ;;
  s32tp)  # two GPUs (nvidia-h200-x2): tp 2 decode steps replay CUDA graphs captured on both
    # ranks, their all-reduces inside: the tensor-parallel GPU tests (the graphs' fp32 tokens
    # against tp 1 among them), then tp_bench with graphs at both sizes
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    gpu_tests tp_gpu 300 tests/test_tp_gpu.py
    rm -f "$OUT"/*.xml
    timeout 270 python3 -m benchmarks.tp_bench --out "$OUT/tp_bench.json" > "$OUT/tp_bench.log" 2>&1
    echo "== tp_bench: rc $?"; tail -8 "$OUT/tp_bench.log"
    ;;
  s32g)  # one GPU: the tensor-parallel decode graphs over a one-rank NCCL group (capture and
    # replay with the collectives inside; fp32 tokens against the single-GPU engine), and the
    # decode graph tests (DecodeGraphs now counts its replays)
    gpu_tests tp_graphs 300 tests/test_tp_graphs_gpu.py tests/test_graphs_gpu.py
    rm -f "$OUT"/*.xml
    ;;
  s32h)  # one GPU: s32g's tensor-parallel graph test again, graphs now opt-in at tp_size > 1
    # (LORASERVE_TP_CUDA_GRAPHS, which the test sets)
    gpu_tests tp_graphs 200 tests/test_tp_graphs_gpu.py
    rm -f "$OUT"/*.xml
    ;;
  s32e)  # one GPU: the session's GPU-path changes on the device: the sampler (logit_bias in its
    # no-host-sync test; temperatures under 1e-6 greedy), the engine (max_new_tokens 0 only
    # prefills), and the tensor-parallel decode graphs over a one-rank group, at the final code
    gpu_tests final_gpu 420 tests/test_sampler.py tests/test_engine_gpu.py tests/test_tp_graphs_gpu.py
    rm -f "$OUT"/*.xml
    ;;
  s32c)  # one GPU: S-LoRA's cap as the issue states it (max_loras_per_batch 32, max_loaded_loras
    # 128) over a queue 16 times deeper (8192 requests, about 8 a adapter): with 512 (half a
    # request an adapter) 32 adapters hold about 40 rows, and the cap bounds the batch
    timeout 380 python3 -m benchmarks.many_adapters --saturated-only --num-requests 8192 \
      --out "$OUT/many_cap32_8192.json" > /tmp/cap32.log 2>&1
    echo "== many_adapters cap 32, 8192 requests: rc $?"
    grep -E "saturated|keeps|Error" /tmp/cap32.log | cut -c1-600; tail -3 /tmp/cap32.log
    ;;
  s31d)  # one GPU (prepared): by the timelines of s30a-s31b the 1000-adapter run now loses more
    # in its second wave (first requests finishing, 143 uploads into freed slots) than in its
    # first: decode resumed about 0.28 s later than over 8 adapters. Steps 120-199 traced
    MANY_ARGS="--trace-from 120 --trace-steps 80" many_ab wave2 300 NONE=1 NONE=2
    grep -hE "saturated, steps" /tmp/many_wave2_1.log | cut -c1-3000
    ;;
  s31c)  # one GPU (prepared): the grid's GPU test (it now sets the grid, opt-in since s31b) and
    # the warm-up's; then where the grid's first wave lost 120-150 ms in s31b: the GPU time by
    # kernel category and the device's busy share over the first 2 s, with and without it
    gpu_tests grid_tests 300 tests/test_token_grid.py tests/test_warmup.py
    rm -f "$OUT"/*.xml
    MANY_ARGS="--kernel-window 0 2" many_ab window 420 LORASERVE_EAGER_TOKEN_GRID=64 NONE=1 \
      LORASERVE_EAGER_TOKEN_GRID=64 NONE=2
    ;;
  s31b)  # one GPU: s31a's GPU tests failed on the grid test's second engine (two engines'
    # KV caches at once; the next files' engines then had no room either). Again, then the
    # 1000-adapter A/B (s31a: the grid's runs kept 89 and 91 %, without 94 and 93 %)
    gpu_tests grid_tests 300 tests/test_token_grid.py tests/test_warmup.py tests/test_engine_gpu.py
    rm -f "$OUT"/*.xml
    MANY_ARGS="--long-launch-ms 100 --trace-steps 40" many_ab grid 400 NONE=1 \
      LORASERVE_EAGER_TOKEN_GRID=0 NONE=2 LORASERVE_EAGER_TOKEN_GRID=0
    grep -HE "launches took" /tmp/many_grid_*.log
    ;;
  s31a)  # one GPU: s30d found that cuBLAS waits for the device at a kernel's first call. Eager
    # prefill steps now pad to a 64-token grid whose GEMMs the warm-up runs: the GPU tests
    # (grid, warm-up, engine), then 1000 adapters at cap 256 by default against
    # LORASERVE_EAGER_TOKEN_GRID=0, each with the runner's launches of 50 ms or more
    gpu_tests grid_tests 400 tests/test_token_grid.py tests/test_warmup.py tests/test_engine_gpu.py
    rm -f "$OUT"/*.xml
    MANY_ARGS="--long-launch-ms 50" many_ab grid 470 NONE=1 LORASERVE_EAGER_TOKEN_GRID=0 NONE=2 \
      LORASERVE_EAGER_TOKEN_GRID=0
    grep -HE "engine built|launches took" /tmp/many_grid_*.log
    ;;
  s30d)  # one GPU: s30c's long launches wait inside one cuBLAS call (the lm_head's, or a
    # projection's) for about the device work queued. Does a first call at a token count wait
    # for the device, with CUDA's lazy module loading and with eager?
    for mode in LAZY EAGER; do
      CUDA_MODULE_LOADING=$mode timeout 240 python3 -m benchmarks.gemm_kernels --first-use \
        --max-tokens 8192 --out "$OUT/first_use_$mode.json" > "/tmp/first_use_$mode.log" 2>&1
      echo "== gemm_kernels --first-use, CUDA_MODULE_LOADING=$mode: rc $?"
      cut -c1-600 "/tmp/first_use_$mode.log" | tail -8
    done
    ;;
  s30c)  # one GPU: s30a's long prefill launches (190-400 ms) are the runner's CPU time, not a
    # wait for the GIL; CUDA's default schedule spins in a synchronising call, so that CPU time
    # may be a wait for the GPU all the same. The runner's stacks inside each launch of 50 ms or
    # more say which, two processes
    for i in 1 2; do
      timeout 200 python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
        --max-loaded-loras 512 --long-launch-ms 50 --out "$OUT/many_long_$i.json" \
        > "/tmp/long_$i.log" 2>&1
      echo "== many_adapters --long-launch-ms 50 ($i): rc $?"
      grep -E -A3 "keeps|launches took|^  launch" "/tmp/long_$i.log" | grep -v "^--" | cut -c1-400
    done
    ;;
  s30a)  # one GPU: the engine's GPU tests (the launch now counts the runner's CPU
    # time), then the 1000-adapter run's first 60 steps twice, after the config cache and the
    # host tally (c23af31): does the first prefill launch still take 344 ms, and how much of
    # each launch is the runner's own CPU time?
    gpu_tests engine_tests 300 tests/test_engine_gpu.py tests/test_pipeline_gpu.py
    rm -f "$OUT"/*.xml
    for i in 1 2; do
      timeout 200 python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
        --max-loaded-loras 512 --trace-steps 60 --out "$OUT/many_trace_$i.json" \
        > "/tmp/trace_$i.log" 2>&1
      echo "== many_adapters --trace-steps 60 ($i): rc $?"
      grep -E "saturated, steps|keeps" "/tmp/trace_$i.log" | cut -c1-2500
    done
    ;;
  s30b)  # one GPU (prepared): the GIL's switch interval at 0.05 ms against the engine's 0.5:
    # a launch that gives the GIL up waits at most an interval to get it back while another
    # thread runs Python. 1000 adapters at cap 256, first 30 steps traced, alternating, two
    # processes each
    for i in 1 2 3 4; do
      if [ "$SECONDS" -gt 420 ]; then echo "== run $i: skipped, out of time"; continue; fi
      args=""; [ $((i % 2)) -eq 0 ] && args="--switch-interval-ms 0.05"
      # shellcheck disable=SC2086  # args holds separate words
      timeout 150 python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
        --max-loaded-loras 512 --trace-steps 30 $args --out "$OUT/many_si_$i.json" \
        > "/tmp/si_$i.log" 2>&1
      echo "== many_adapters ${args:-at the engine interval} ($i): rc $?"
      grep -E "keeps|GIL switch" "/tmp/si_$i.log"
    done
    ;;
  s29c)  # one GPU: the first 60 steps of the 1000-adapter run and of the 8-adapter run, as
    # admitted (rows, tokens, adapters, queue, loads, host ms by phase): where the first wave's
    # 0.3-0.5 s goes
    timeout 220 python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
      --max-loaded-loras 512 --trace-steps 60 --out "$OUT/many_trace.json" > /tmp/trace.log 2>&1
    echo "== many_adapters --trace-steps 60: rc $?"; grep -E "saturated, steps|keeps" /tmp/trace.log
    ;;
  s29b)  # one GPU: uploads batched by default, now also issued by a request's admission:
    # their GPU tests (both modes), the upload bandwidth, then 1000 adapters at cap 256 by
    # default against LORASERVE_UPLOAD_BATCH=0 (one call a copy as each starts), alternating
    gpu_tests upload_tests 300 tests/test_adapters.py tests/test_pipeline_gpu.py \
      -k "cuda_uploads or overlap_loading"
    rm -f "$OUT"/*.xml
    timeout 120 python3 -m benchmarks.upload_bench --out "$OUT/upload.json" > /tmp/upload.log 2>&1
    echo "== upload_bench: rc $?"; tail -3 /tmp/upload.log
    many_ab admit 560 NONE=1 LORASERVE_UPLOAD_BATCH=0 NONE=2 LORASERVE_UPLOAD_BATCH=0
    ;;
  s29a)  # one GPU: 1000 adapters at cap 256 by default, with uploads issued together at each
    # poll, with four readers, and with both, alternating, two processes each
    many_ab batch 470 NONE=1 LORASERVE_UPLOAD_BATCH=1 LORASERVE_LOADER_WORKERS=4 \
      "LORASERVE_UPLOAD_BATCH=1 LORASERVE_LOADER_WORKERS=4" NONE=2 LORASERVE_UPLOAD_BATCH=1 \
      LORASERVE_LOADER_WORKERS=4 "LORASERVE_UPLOAD_BATCH=1 LORASERVE_LOADER_WORKERS=4"
    ;;
  s27d)  # one GPU: 1000 adapters at cap 256 after on-demand resolves moved off the read
    # threads (one metadata job a name), with the timeline, up to three processes
    many_ab meta 130 NONE=1 NONE=2 NONE=3
    ;;
  s27c)  # one GPU: when the 1000-adapter run loses its time: 1000 adapters at cap 256 with
    # each saturated run's timeline by half second (disk loads, uploads, steps, rows a step,
    # prefill steps, first tokens, completions), two processes
    many_ab timeline 600 NONE=1 NONE=2
    ;;
  s27b)  # one GPU: are the loop's stalls CUDA loading kernels lazily mid-serving? The GEMM
    # kernels F.linear picks at every 8th prefill token count against those the warm-up's
    # powers of two run; then 1000 adapters at cap 256 with every kernel loaded at start
    # (CUDA_MODULE_LOADING=EAGER) and the stall dumps, two processes
    timeout 120 python3 -m benchmarks.gemm_kernels --out "$OUT/gemm_kernels.json" \
      > "$OUT/gemm_kernels.log" 2>&1
    echo "== gemm_kernels: rc $?"; cut -c1-170 "$OUT/gemm_kernels.log" | head -150
    MANY_ARGS="--stall-dumps-ms 100" many_ab eager 600 CUDA_MODULE_LOADING=EAGER \
      CUDA_MODULE_LOADING=EAGER
    ;;
  s27a)  # one GPU: what the other threads do while an upload holds the loop 300 ms: 1000
    # adapters at cap 256, every thread's stack dumped whenever the loop stays away 100 ms,
    # and the caching allocator's device allocations, frees and retries a run; two processes
    MANY_ARGS="--stall-dumps-ms 100" many_ab stalls 600 NONE=1 NONE=2
    ;;
  s26e)  # one GPU (prepared): where a many-adapter upload's 2 ms (up to 350) of loop time
    # goes: the upload thread's GPU test, then 1000 adapters at cap 256 by default (startup
    # objects frozen), without the freeze, and with uploads issued on the upload thread
    gpu_tests upload_thread_tests 150 tests/test_pipeline_gpu.py -k overlap_loading
    many_ab cap 480 NONE=1 LORASERVE_GC_FREEZE=0 NONE=2 LORASERVE_GC_FREEZE=0
    rm -f "$OUT"/*.xml
    ;;
  s25d)  # one GPU (prepared): split-K partials over the batches they now apply to
    i=0
    for knob in NONE=1 LORASERVE_DECODE_SPLITK=2 NONE=2 LORASERVE_DECODE_SPLITK=2; do
      i=$((i + 1)); name="base_${i}_$(echo "$knob" | tr '= ' '__')"
      env "$knob" timeout $((i == 1 ? 100 : 70)) python3 -m benchmarks.step_bench --steps 10 \
        --batch 1 2 4 8 --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
      echo "== step_bench --batch 1 2 4 8 $knob: rc $?"
      grep -E "^(decode|  graph|serving loop)" "$OUT/$name.log" | grep -v "overlap off"
      rm -f "$OUT/$name.log"
    done
    ;;
  s24b)  # one GPU (prepared): split-K as one batched GEMM with fp32 partials, the reduce
    # left to the next kernel (o's and down's consumer is add+RMSNorm): is the GEMM part as
    # fast as cuBLAS's split-K kernel without its reduce launch?
    timeout 150 python3 -m benchmarks.gemm_bench --split-k 2 3 4 --proj o down qkv \
      --out "$OUT/gemm_splitk.json" > "$OUT/gemm_splitk.log" 2>&1
    echo "== gemm_bench --split-k: rc $?"; grep -E " (linear|bmm_k[0-9]+(\+sum)?) |failed" \
      "$OUT/gemm_splitk.log"
    # base-only decode graphs whose o and down leave the partials to the next norm
    gpu_tests splitk_tests 120 tests/test_graphs_gpu.py -k splitk
    step_ab LORASERVE_DECODE_SPLITK=2
    ;;
  s25a)  # one GPU: where split-K partials lose their GEMM-alone gain in the graph (kernel
    # time by name, base decode graphs)
    gpu_tests pdl_tests 150 tests/test_pdl.py
    for knob in NONE=1 LORASERVE_DECODE_SPLITK=2; do
      name="prof_$(echo "$knob" | tr '= ' '__')"
      env "$knob" timeout 120 python3 -m benchmarks.step_bench --profile --profile-graphs --timeline \
        --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
      echo "== step_bench --profile --profile-graphs $knob: rc $?"
      sed -n "/^GPU ms a step/,\$p" "$OUT/$name.log" | head -34
    done
    ;;
  s23c)  # one GPU: cuBLASLt for decode graphs from 16 rows, base-only (s22a: 0.06-0.08 ms
    # off the loop's b32 base step, the 8-adapter step level) and LoRA graphs too
    # (LORASERVE_DECODE_CUBLASLT_LORA=1), against the default; first their GPU tests
    gpu_tests cublaslt_tests 120 tests/test_graphs_gpu.py -k cublaslt
    i=0
    for knob in NONE=1 LORASERVE_DECODE_CUBLASLT_MIN_BS=16 \
        "LORASERVE_DECODE_CUBLASLT_MIN_BS=16 LORASERVE_DECODE_CUBLASLT_LORA=1" NONE=2 \
        LORASERVE_DECODE_CUBLASLT_MIN_BS=16 \
        "LORASERVE_DECODE_CUBLASLT_MIN_BS=16 LORASERVE_DECODE_CUBLASLT_LORA=1"; do
      i=$((i + 1)); name="step_${i}_$(echo "$knob" | tr '= ' '__')"
      # shellcheck disable=SC2086  # a knob may be two settings
      step_lora $((i == 1 ? 110 : 85)) "$name" $knob
      rm -f "$OUT/$name.log"
    done
    ;;
  s23d)  # one GPU: s23c's setting in the 8-slot pool the 8-adapter target names
    i=0
    for knob in NONE=1 "LORASERVE_DECODE_CUBLASLT_MIN_BS=16 LORASERVE_DECODE_CUBLASLT_LORA=1" \
        NONE=2 "LORASERVE_DECODE_CUBLASLT_MIN_BS=16 LORASERVE_DECODE_CUBLASLT_LORA=1"; do
      i=$((i + 1)); name="step8_${i}_$(echo "$knob" | tr '= ' '__')"
      # shellcheck disable=SC2086  # a knob may be two settings
      env $knob timeout $((i == 1 ? 110 : 70)) python3 -m benchmarks.step_bench --lora --steps 10 \
        --max-loras-per-batch 8 --lora-cases 1x1 32x8 --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
      echo "== step_bench --lora --max-loras-per-batch 8 $knob: rc $?"
      grep -E "^(decode|  graph|serving loop)" "$OUT/$name.log" | grep -v "overlap off"
      rm -f "$OUT/$name.log"
    done
    ;;
  s22a)  # one GPU (prepared): base-only decode graphs of 16 rows and more captured with
    # cuBLASLt (LORASERVE_DECODE_CUBLASLT_MIN_BS=16; faster o and down at batch 32 in the
    # fourteenth session) against the default, two processes each, alternating; about 4 min
    step_ab LORASERVE_DECODE_CUBLASLT_MIN_BS=16
    ;;
  s22b)  # one GPU (prepared): cuBLASLt's heuristic algorithms for each decode projection at
    # batches 1 and 32 against F.linear (which algorithm, split-K or not, is fastest alone);
    # first the binding's GPU test (its results against F.linear, eager and in a graph)
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_benchmarks.py -k blaslt \
      > "$OUT/blaslt_test.log" 2>&1
    echo "== blaslt tests: rc $?"; tail -5 "$OUT/blaslt_test.log"
    timeout 240 python3 -m benchmarks.gemm_bench --lt-algos 24 --proj qkv o gate_up down \
      --plan-out "$OUT/lt_plan.json" --out "$OUT/gemm_lt.json" > "$OUT/gemm_lt.log" 2>&1
    echo "== gemm_bench --lt-algos: rc $?"; grep -E " (linear|lt:0) |^plan:" "$OUT/gemm_lt.log"
    # then the step targets with the plan's algorithms in the decode graphs, against without
    if [ -s "$OUT/lt_plan.json" ] && grep -q '"algo"' "$OUT/lt_plan.json"; then
      i=0
      for plan in none "$OUT/lt_plan.json" none "$OUT/lt_plan.json"; do
        i=$((i + 1)); extra=(); name="step_${i}_lt_off"
        if [ "$plan" != none ]; then extra=(--lt-plan "$plan"); name="step_${i}_lt_on"; fi
        timeout $((i == 1 ? 110 : 85)) python3 -m benchmarks.step_bench --lora --steps 10 \
          "${extra[@]}" --out "$OUT/$name.json" > "$OUT/step_$i.log" 2>&1
        echo "== step_bench --lora ${extra[*]}: rc $?"
        grep -E "^(cuBLASLt plan|engine built|decode|  graph|serving loop)" "$OUT/step_$i.log" \
          | grep -v "overlap off"
        rm -f "$OUT/step_$i.log"
      done
    fi
    ;;
  s20b)  # one GPU (prepared): the step targets in the pools they name, twice each, alternating:
    # 32 slots (the 32-adapter target), 8 slots (max_loras_per_batch 8: the 8-adapter target,
    # which then takes the stacked graphs, and one adapter at batch 1)
    for i in 1 2; do
      step_lora $((i == 1 ? 110 : 85)) "step_${i}_32slots" NONE=1
      timeout 85 python3 -m benchmarks.step_bench --lora --steps 10 --max-loras-per-batch 8 \
        --lora-cases 1x1 32x8 --out "$OUT/step_${i}_8slots.json" > "$OUT/step_${i}_8slots.log" 2>&1
      echo "== step_bench --lora --max-loras-per-batch 8: rc $?"
      grep -E "^(decode|  graph|serving loop)" "$OUT/step_${i}_8slots.log" | grep -v "overlap off"
      rm -f "$OUT"/step_*.log
    done
    ;;
  s19d)  # one GPU: the stacked graphs chosen per step (stack_wins; the default since this
    # phase ran with LORASERVE_LORA_STACK=1): their GPU tests, then the step targets without
    # stacks (LORASERVE_LORA_STACK=0) and with them twice
    gpu_tests graphs_gpu 200 "tests/test_graphs_gpu.py::test_graphs_match_eager_fp32[csgmv-1]" \
      "tests/test_graphs_gpu.py::test_graphs_match_eager_fp32[triton-1]" \
      "tests/test_graphs_gpu.py::test_graph_replay_logits_bf16[csgmv-1]"
    i=0
    for knob in LORASERVE_LORA_STACK=0 NONE=1 NONE=2; do
      i=$((i + 1)); name="step_${i}_$(echo "$knob" | tr '=' '_')"
      step_lora $((i == 1 ? 100 : 80)) "$name" "$knob"
      rm -f "$OUT/$name.log"
    done
    ;;
  s19b)  # one GPU: the decode shrink beside its projection against the stacked GEMM (the
    # adapter pool's A rows under the projection's weight, one cuBLAS GEMM for both)
    timeout 240 python3 -m benchmarks.shrink_bench --beside --layers 16 --variants default gemm \
      --cases 1x1 32x8 32x32 --out "$OUT/stacked.json" > "$OUT/stacked.log" 2>&1
    echo "== shrink_bench --beside: rc $?"; grep -E " us" "$OUT/stacked.log"
    grep -E "^(qkv|o|gate_up|down) gemm" "$OUT/stacked.log" | cut -c1-200
    ;;
  s18g)  # one GPU (prepared): the decode shrink alone over its knobs, then the step A/B
    timeout 150 python3 -m benchmarks.shrink_bench --out "$OUT/shrink_bench.json" \
      > "$OUT/shrink_bench.log" 2>&1
    echo "== shrink_bench: rc $?"; grep " us " "$OUT/shrink_bench.log"
    i=0
    # the step A/B: the landed code, then the variants shrink_bench should favour (edit to suit)
    for knob in NONE=1 LORASERVE_SHRINK_EAGER=1 LORASERVE_SHRINK_DECODE_BLOCK_K=512 \
        LORASERVE_SHRINK_EAGER=1; do
      i=$((i + 1)); name="step_${i}_$(echo "$knob" | tr '=' '_')"
      step_lora $((i == 1 ? 100 : 75)) "$name" "$knob"
      rm -f "$OUT/$name.log"
    done
    ;;
  s18f)  # one GPU: the decode shrink with its slices folded into one tile, twice (this
    # session's other processes give the landed code's spread)
    step_lora 100 step_1_fold LORASERVE_SHRINK_FOLD_DECODE=1
    step_lora 85 step_2_fold LORASERVE_SHRINK_FOLD_DECODE=1
    rm -f "$OUT"/*.log
    ;;
  s18d)  # one GPU: kernel timelines of the decode graphs (streams, starts, durations)
    timeout 200 python3 -m benchmarks.step_bench --lora --profile --profile-graphs --timeline \
      --out "$OUT/timeline.json" > "$OUT/timeline.log" 2>&1
    echo "== timeline: rc $?"; grep -E "total" "$OUT/timeline.log"
    gzip -9 "$OUT/timeline.json"; ls -la "$OUT"
    ;;
  s18a)  # one GPU: decode attention's launch configurations and slice counts; then s17a
    attn_bench 180 --batch 1 8 32 --ctx 143 1024 --min-split 64 --reps 20 --configs 64x4x3 \
      64x4x1 64x4x2 64x8x1 32x4x1 32x2x1 16x2x1 128x8x1 128x4x1 --splits 0 1 4 8
    "$0" s17a
    ;;
  s17a)  # one GPU: LoRA-kernel PDL and the fold's presum, A/B under layer PDL
    i=0
    for knob in NONE=1 LORASERVE_ENABLE_PDL=1 LORASERVE_FOLD_PRESUM=0 NONE=2; do
      i=$((i + 1)); name="step_${i}_$(echo "$knob" | tr '=' '_')"
      step_lora $((i == 1 ? 100 : 75)) "$name" "$knob"
      rm -f "$OUT/$name.log"  # a call returns eight files at most
    done
    ;;
  s10b)  # one GPU: the LoRA kernels' GPU tests; the prefill expand sweep with row prefetch
    gpu_tests lora_gpu 150 tests/test_lora_ops.py
    timeout 300 python3 -m benchmarks.expand_sweep --top 40 --out "$OUT/expand_sweep.json" \
      > "$OUT/expand_sweep.log" 2>&1
    echo "== expand_sweep: rc $?"; head -45 "$OUT/expand_sweep.log"
    rm -f "$OUT"/*.xml
    ;;
  s10c)  # one GPU: the expand with several chunks a program; the LoRA kernels' GPU tests
    pts=""
    for t in c32b32m1 c32b32m1e4 c32b32m1e8 c32b32m1e16 c64b64m1e2 c64b64m1e4; do
      pts="$pts $t-n128-w4-s2 $t-n256-w4-s2"
    done
    timeout 200 python3 -m benchmarks.expand_sweep --top 40 --points $pts c64b32m2e4-n128-w4-s2 \
      c256b32m2-n128-w4-s2 s32x2-n128-w4-s2 c256b64m1-n256-w4-s2 --out "$OUT/expand_sweep.json" \
      > "$OUT/expand_sweep.log" 2>&1
    echo "== expand_sweep: rc $?"; head -45 "$OUT/expand_sweep.log"
    gpu_tests lora_gpu 270 tests/test_lora_ops.py
    rm -f "$OUT"/*.xml
    ;;
  s10d)  # one GPU: prefill chunks of several tiles: step targets, LoRA kernel, warm-up,
          # engine and prefill-graph GPU tests
    timeout 190 python3 -m benchmarks.step_bench --lora --steps 10 --out "$OUT/step_lora.json" \
      > "$OUT/step_lora.log" 2>&1
    echo "== step_bench --lora: rc $?"; grep -E "^(HBM|decode|prefill|  graph|serving)" "$OUT/step_lora.log"
    gpu_tests lora_gpu 70 tests/test_lora_ops.py -k "n2-long or overlap or prefill_chunks"
    gpu_tests warm_engine_gpu 110 tests/test_warmup.py tests/test_engine_gpu.py
    gpu_tests graphs_prefill_gpu 120 tests/test_graphs_gpu.py -k prefill
    rm -f "$OUT"/*.xml
    ;;
  s10e)  # one GPU: the saturated 256-cap many-adapter run; the prefill target again (batch 1)
    timeout 150 python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
      --max-loaded-loras 512 --out "$OUT/many_cap.json" > "$OUT/many_cap.log" 2>&1
    echo "== many_adapters cap 256: rc $?"; grep -E "saturated" "$OUT/many_cap.log"
    timeout 150 python3 -m benchmarks.step_bench --lora --batch 1 --lora-cases 1x1 --steps 10 \
      --out "$OUT/step_prefill.json" > "$OUT/step_prefill.log" 2>&1
    echo "== step_bench: rc $?"; grep -E "^(decode|prefill)" "$OUT/step_prefill.log"
    ;;
  s10f)  # one GPU: the saturated 256-cap many-adapter run with the loop's sampling profile
    timeout 170 python3 -m benchmarks.many_adapters --saturated-only --profile \
      --max-loras-per-batch 256 --max-loaded-loras 512 --out "$OUT/many_cap_prof.json" \
      > "$OUT/many_cap_prof.log" 2>&1
    echo "== many_adapters cap 256 --profile: rc $?"; grep -E "saturated" "$OUT/many_cap_prof.log"
    ;;
  s10g)  # one GPU: the saturated 256-cap many-adapter run at a 0.1 ms GIL switch interval
    timeout 150 python3 -m benchmarks.many_adapters --saturated-only --switch-interval-ms 0.1 \
      --max-loras-per-batch 256 --max-loaded-loras 512 --out "$OUT/many_cap_si.json" \
      > "$OUT/many_cap_si.log" 2>&1
    echo "== many_adapters cap 256, switch interval 0.1 ms: rc $?"
    grep -E "saturated|switch" "$OUT/many_cap_si.log"
    ;;
  reader)  # one GPU: adapter reads in reader processes (memfd host rows registered with CUDA)
    gpu_tests reader_gpu 200 tests/test_adapters.py tests/test_engine_gpu.py \
      tests/test_pipeline_gpu.py tests/test_warmup.py
    timeout 60 python3 -m benchmarks.pin_stall --out "$OUT/pin_stall.json" > "$OUT/pin_stall.log" 2>&1
    echo "== pin_stall: rc $?"; cat "$OUT/pin_stall.log"
    for loader in process thread; do
      timeout 120 python3 -m benchmarks.many_adapters --saturated-only --profile --lora-loader \
        "$loader" --max-loras-per-batch 256 --max-loaded-loras 512 \
        --out "$OUT/many_cap_$loader.json" > "$OUT/many_cap_$loader.log" 2>&1
      echo "== many_adapters cap 256, $loader reads: rc $?"; grep -E "saturated" "$OUT/many_cap_$loader.log"
    done
    timeout 120 python3 -m benchmarks.many_adapters --saturated-only --out "$OUT/many32.json" \
      > "$OUT/many32.log" 2>&1
    echo "== many_adapters cap 32: rc $?"; grep -E "saturated" "$OUT/many32.log"
    rm -f "$OUT"/*.xml
    ;;
  rows)  # one GPU: recycled pinned host rows: the upload and pipeline GPU tests, then the
         # saturated 256-cap many-adapter runs (whose loads pinned memory one copy at a time)
    gpu_tests rows_gpu 100 tests/test_adapters.py tests/test_pipeline_gpu.py
    timeout 110 python3 -m benchmarks.many_adapters --saturated-only --max-loras-per-batch 256 \
      --max-loaded-loras 512 --out "$OUT/many_cap_rows.json" > "$OUT/many_cap_rows.log" 2>&1
    echo "== many_adapters cap 256: rc $?"; grep -E "saturated" "$OUT/many_cap_rows.log"
    rm -f "$OUT"/*.xml
    ;;
  rowsx)  # one GPU: the row-block LoRA expand: its GPU tests (both expands), the LoRA kernel
          # benchmark (decode tables padded as a graph's, each expand)
    gpu_tests lora_ops_gpu 200 tests/test_lora_ops.py
    timeout 180 python3 -m benchmarks.lora_kernel_bench --out "$OUT/lora_kernels.json" \
      > "$OUT/lora_kernels.log" 2>&1
    echo "== lora_kernel_bench: rc $?"; grep -E "MISMATCH|pad-|csgmv-16 " "$OUT/lora_kernels.log" | head -40
    sed -n '/LoRA ms per step/,$p' "$OUT/lora_kernels.log"
    rm -f "$OUT"/*.xml
    ;;
  rowsy)  # one GPU: with the row-block expand: the warm-up and engine GPU tests, the LoRA
          # graph-replay tests, the step targets, the saturated 256-cap many-adapter run with
          # a late kernel window
    gpu_tests warmup_gpu 110 tests/test_warmup.py
    gpu_tests engine_gpu 90 tests/test_engine_gpu.py tests/test_pipeline_gpu.py
    gpu_tests lora_graph_gpu 60 tests/test_lora_ops.py -k "rows and graph_replay"
    timeout 160 python3 -m benchmarks.step_bench --lora --steps 10 --out "$OUT/step_lora.json" \
      > "$OUT/step_lora.log" 2>&1
    echo "== step_bench --lora: rc $?"; grep -E "^(HBM|decode|prefill)" "$OUT/step_lora.log"
    timeout 140 python3 -m benchmarks.many_adapters --saturated-only --kernel-window 8 3 \
      --max-loras-per-batch 256 --max-loaded-loras 512 --out "$OUT/many_cap.json" \
      > "$OUT/many_cap.log" 2>&1
    echo "== many_adapters cap 256: rc $?"; grep -E "saturated" "$OUT/many_cap.log"
    rm -f "$OUT"/*.xml
    ;;
  warm)  # one GPU: the warm-up's GPU test (serving after it compiles nothing), the engine
         # tests with it on, then the serving benchmark (its first requests' TTFT)
    gpu_tests warmup_gpu 200 tests/test_warmup.py tests/test_staging.py
    gpu_tests engine_gpu 150 tests/test_engine_gpu.py tests/test_pipeline_gpu.py
    serve_bench 220
    rm -f "$OUT"/*.xml
    ;;
  many2)  # one GPU: the 1000-adapter benchmark unsampled (it reports compiles), HF baseline
    timeout 380 python3 -m benchmarks.many_adapters --out "$OUT/many.json" > "$OUT/many.log" 2>&1
    echo "== many_adapters: rc $?"; grep -E "saturated|Poisson|keeps" "$OUT/many.log" | tail -8
    hf_baseline 190 hf_baseline
    ;;
  manycap)  # one GPU: the 1000-adapter benchmark with a batch cap as large as the 8-adapter
            # batch gets (S-LoRA's own setting has no cap)
    timeout 500 python3 -m benchmarks.many_adapters --max-loras-per-batch 256 \
      --max-loaded-loras 512 --out "$OUT/many_cap.json" > "$OUT/many_cap.log" 2>&1
    echo "== many_adapters, cap 256: rc $?"; grep -E "saturated|Poisson|keeps" "$OUT/many_cap.log" | tail -8
    ;;
  *) echo "usage: $0 PHASE [SETTING]: the phases and what each runs are listed at the top of $0"
     exit 2 ;;
esac
