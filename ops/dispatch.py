"""Which implementation an op runs: the Triton kernels for CUDA tensors, the torch references
for CPU ones.

`TRITON_ON_CPU` sends CPU tensors to the Triton kernels as well, which only works under
`TRITON_INTERPRET=1`: tests set it to drive a served step's kernels through the interpreter and
read which kernel variants the step launches (tests/kernel_keys.py). Nothing else sets it.
"""

import functools

import torch
from torch import Tensor

TRITON_ON_CPU = False


def use_triton(t: Tensor) -> bool:
    """Whether an op on `t` runs its Triton kernel."""
    return t.is_cuda or TRITON_ON_CPU


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    """The device's multiprocessors, which kernel wrappers size their grids by (132, an
    H200's, for CPU tensors: interpreter runs)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count
