"""The layer kernels between the decode GEMMs asking for the SM's largest shared-memory carveout
(opt-in: LORASERVE_LAYER_CARVEOUT=1, read once a process).

An SM divides its on-chip memory between L1 and shared memory; the driver sets the division from
the preferences of the kernels it places there, and a program fits beside others only if the
division in force leaves it the shared memory it needs. Triton asks for the shared-memory side
(CU_FUNC_CACHE_PREFER_SHARED) only for kernels of more than 48 KB of it, so decode attention (39
KB a program), the rotary kernel, the norms and SiLU*up launch with the driver's default, and an
SM set up for one of them may have no room for a decode GEMM's program (144-192 KB) launched
with PDL beside it: that program then waits for the SM to empty before it can copy W
(ops/gluon_decode_gemm.py issues W's first tiles before its wait for this overlap). With this
setting each of those kernels, as it is loaded, prefers the largest carveout
(CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 100 %). The driver takes it as a hint;
on the H200 it gained nothing (forty-third session: with it and 3-stage GEMMs batch 32's loop
step took 4.672-4.674 ms against 4.583-4.584 with 4 stages without it, and batch 1 took
0.08 ms longer), so it stays opt-in.
"""

from __future__ import annotations

import ctypes
import functools

from ops.settings import env_flag

# the kernels that run between a decode layer's GEMMs (their Triton names)
LAYER_KERNELS = frozenset({
    "_rmsnorm_kernel", "_add_rmsnorm_fold_kernel", "_rope_store_kv_kernel",
    "_decode_attention_kernel", "_silu_mul_kernel", "_silu_mul_fold_kernel",
})
_PREFERRED_SHARED_MEMORY_CARVEOUT = 9  # CUfunction_attribute
_MAX_SHARED = 100  # CU_SHAREDMEM_CARVEOUT_MAX_SHARED: percent of the SM's memory


@functools.lru_cache(maxsize=1)
def _libcuda():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cuFuncSetAttribute.restype = ctypes.c_int
    lib.cuFuncGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int,
                                       ctypes.c_void_p]
    lib.cuFuncGetAttribute.restype = ctypes.c_int
    return lib


def set_carveout(function: int, percent: int = _MAX_SHARED) -> None:
    """Set a loaded kernel's (a CUfunction handle's) preferred shared-memory carveout."""
    err = _libcuda().cuFuncSetAttribute(function, _PREFERRED_SHARED_MEMORY_CARVEOUT, percent)
    if err:
        raise RuntimeError(f"cuFuncSetAttribute(preferred carveout {percent}) failed: {err}")


def carveout_of(function: int) -> int:
    """A loaded kernel's preferred shared-memory carveout (-1: the driver's default)."""
    value = ctypes.c_int()
    err = _libcuda().cuFuncGetAttribute(ctypes.byref(value), _PREFERRED_SHARED_MEMORY_CARVEOUT,
                                        function)
    if err:
        raise RuntimeError(f"cuFuncGetAttribute(preferred carveout) failed: {err}")
    return value.value


def _on_load(module, function, name, metadata_group, hash) -> None:
    """Triton's kernel-load hook: a layer kernel prefers the largest shared-memory carveout."""
    if function and name in LAYER_KERNELS:
        set_carveout(function)


def layer_carveout_on() -> bool:
    """LORASERVE_LAYER_CARVEOUT=1 (default 0)."""
    return env_flag("LORASERVE_LAYER_CARVEOUT", False)


def install(on: bool | None = None) -> bool:
    """Add the load hook to Triton's when `on` (default: the setting); returns whether it is
    installed. Kernels loaded before stay as they are: the layer kernels' modules call this at
    import, before any of them loads."""
    import triton

    if on is None:
        on = layer_carveout_on()
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)  # (Triton 3.4 on)
    if not on:
        if runtime is not None:
            runtime.kernel_load_end_hook.remove(_on_load)
        return False
    if runtime is None:
        raise RuntimeError(f"LORASERVE_LAYER_CARVEOUT=1 needs Triton's kernel-load hook (Triton "
                           f"3.4 or later; this one: {triton.__version__})")
    runtime.kernel_load_end_hook.add(_on_load)
    return True
