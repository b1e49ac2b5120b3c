"""Programmatic dependent launch (PDL, CUDA sm_90+) for the decoder layer's own kernels.

A kernel launched with PDL may be scheduled before the kernel ahead of it on the stream has
finished: its programs become resident and wait (`gdc_wait`) for that kernel's completion and
memory flush before they read anything it wrote, so the launch and the programs' start overlap
the kernel before. Each of the layer's kernels (add+RMSNorm, rotary + K/V store, decode
attention, SiLU*up) waits first, then lets the next kernel launch (`gdc_launch_dependents`):
every kernel on the stream has waited for its own predecessor before its successor may start,
so each one still sees every earlier kernel's writes. A kernel that was not launched with PDL
passes `gdc_wait` at once; cuBLAS's GEMMs, launched without it, keep ordinary stream order.

The layer kernels launch with it inside decode graph captures (`decode_scope`, entered by
runtime/graphs.py) on CUDA sm_90+, unless LORASERVE_LAYER_PDL=0 (read once a process). On the
H200 it took 0.09-0.11 ms off the serving loop's base decode step and 0.13-0.19 ms off one
adapter's at batch 1, while prefill with it ran 2 % slower (benchmarks/RESULTS.md, fifteenth
session): prefill and eager forwards launch without it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ops.carveout import install as _install_carveout
from ops.scoped import ThreadSetting
from ops.settings import env_flag

# LORASERVE_LAYER_CARVEOUT (ops/carveout.py): before any layer kernel (each imports this) loads
_install_carveout()

_in_decode = ThreadSetting(False)


def decode_scope(on: bool = True):
    """Inside (with on): the layer kernels launch with PDL where `layer_pdl` allows (decode
    graph captures and the warm-up forwards before them)."""
    return _in_decode.set(on)


@functools.lru_cache(maxsize=16)
def layer_pdl(device: torch.device) -> bool:
    """Whether the layer kernels on `device` may launch with PDL: CUDA sm_90+ unless
    LORASERVE_LAYER_PDL=0."""
    if not env_flag("LORASERVE_LAYER_PDL", True) or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def resolve(pdl: bool | None, t: torch.Tensor) -> bool:
    """A wrapper's `pdl` argument: None launches with PDL inside `decode_scope` where
    `layer_pdl` allows; True needs a CUDA sm_90+ tensor."""
    if pdl is None:
        return _in_decode.get() and layer_pdl(t.device)
    if pdl and not (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9):
        raise ValueError("programmatic dependent launch needs a CUDA device of sm_90 or later")
    return pdl


@triton.jit
def wait_then_release(USE_PDL: tl.constexpr):
    """With USE_PDL: wait for the kernel before (its writes visible), then let the next kernel
    launch. Everything a kernel reads that an earlier kernel may write comes after this."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
