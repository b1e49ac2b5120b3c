"""ops/carveout.py: LORASERVE_LAYER_CARVEOUT=1 makes the layer kernels between the decode GEMMs
prefer the SM's largest shared-memory carveout as Triton loads them. On the CPU: the hook
installs with the setting and asks for the carveout of those kernels only. On the device: a
fresh process's RMSNorm kernel, once launched, prefers 100 % shared memory with the setting,
and something else (the driver's default) without it."""

from __future__ import annotations

import pytest
import torch

from ops import carveout


def test_hook_installs_with_the_setting_and_takes_the_layer_kernels(monkeypatch):
    import triton

    hooks = triton.knobs.runtime.kernel_load_end_hook
    seen = []
    monkeypatch.setattr(carveout, "set_carveout", lambda function: seen.append(function))
    try:
        monkeypatch.setenv("LORASERVE_LAYER_CARVEOUT", "1")
        assert carveout.install() and carveout._on_load in hooks.calls
        hooks(None, 11, "_decode_attention_kernel", None, "h")
        hooks(None, 12, "_decode_gemm_kernel", None, "h")  # the GEMM asks for itself
        hooks(None, 13, "_rmsnorm_kernel", None, "h")
        hooks(None, 0, "_silu_mul_kernel", None, "h")  # not loaded (the start hook's shape)
        assert seen == [11, 13]
        monkeypatch.setenv("LORASERVE_LAYER_CARVEOUT", "0")
        assert not carveout.install() and carveout._on_load not in hooks.calls
        monkeypatch.setenv("LORASERVE_LAYER_CARVEOUT", "yes")
        with pytest.raises(ValueError, match="LORASERVE_LAYER_CARVEOUT"):
            carveout.install()
    finally:
        hooks.remove(carveout._on_load)


def test_every_named_kernel_exists():
    """LAYER_KERNELS names kernels the layer modules define (a rename would drop one)."""
    from ops import (
        triton_decode_attention,
        triton_rmsnorm,
        triton_rope_store_kv,
        triton_silu_mul,
    )

    defined = {name for m in (triton_rmsnorm, triton_rope_store_kv, triton_decode_attention,
                              triton_silu_mul) for name in vars(m)}
    assert carveout.LAYER_KERNELS <= defined, carveout.LAYER_KERNELS - defined


PROBE = r"""
import json, torch, triton
from ops import carveout
from ops.triton_rmsnorm import rmsnorm_triton
loaded = {}
triton.knobs.runtime.kernel_load_end_hook.add(
    lambda module, function, name, group, h: loaded.setdefault(name, function))
x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
rmsnorm_triton(x, torch.ones(4096, device="cuda", dtype=torch.bfloat16), 1e-5)
torch.cuda.synchronize()
print(json.dumps({name: carveout.carveout_of(f) for name, f in loaded.items()}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("on", ["0", "1"])
def test_a_fresh_process_loads_the_norm_with_it(on):
    from tests.test_sm90_compile import run_without_interpreter

    got = run_without_interpreter(PROBE, None, LORASERVE_LAYER_CARVEOUT=on)
    assert "_rmsnorm_kernel" in got, got
    assert (got["_rmsnorm_kernel"] == 100) is (on == "1"), got
