"""Host cost of one LoRA application's kernel wrappers (apply_lora_triton), with the two kernel
launches stubbed out: the Python an eager step pays before Triton's own launch path, 128 times a
step for an 8B model with LoRA on every projection. Runs anywhere (CPU tensors); a host-side
figure, not a device one.

    python -m benchmarks.host_overhead --iters 2000 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from ops.lora import apply_lora_triton, build_lora_batch_info


class _NoLaunch:
    """Stands in for a jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def wrapper_us(iters: int, rounds: int = 7, tokens: int = 4096, hidden: int = 4096) -> float:
    """Microseconds an application, the best of `rounds` rounds of `iters` (a shared machine's
    noise only adds time): a qkv group of an 8B layer, 8 adapters of rank 16, csgmv."""
    import ops.triton_lora_expand as expand
    import ops.triton_lora_shrink as shrink

    widths = (hidden, hidden // 4, hidden // 4)
    offsets = (0, widths[0], widths[0] + widths[1], sum(widths))
    slots = [i * 8 // tokens for i in range(tokens)]
    ranks = torch.full((32,), 16, dtype=torch.int32)
    info = build_lora_batch_info(slots, ranks, "csgmv", 32, "cpu")
    x = torch.zeros(tokens, hidden, dtype=torch.float16)
    A = torch.zeros(32, 48, hidden, dtype=torch.float16)
    B = torch.zeros(32, offsets[-1], 16, dtype=torch.float16)
    y = torch.zeros(tokens, offsets[-1], dtype=torch.float16)
    scalings = torch.ones(32, 3)
    with mock.patch.object(shrink, "_lora_shrink_kernel", _NoLaunch()), \
            mock.patch.object(expand, "_lora_expand_kernel", _NoLaunch()):
        for _ in range(50):
            apply_lora_triton(x, A, B, y, offsets, scalings, info)
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iters):
                apply_lora_triton(x, A, B, y, offsets, scalings, info)
            best = min(best, time.perf_counter() - t0)
        return 1e6 * best / iters


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    result = {"apply_lora_triton_wrapper_us": wrapper_us(a.iters, a.rounds), "iters": a.iters,
              "rounds": a.rounds}
    print(f"apply_lora_triton, kernels stubbed: {result['apply_lora_triton_wrapper_us']:.1f} us "
          f"an application (best of {a.rounds} rounds)")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
