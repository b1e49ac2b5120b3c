"""Which implementation an op runs: the Triton kernels for CUDA tensors, the torch references
for CPU ones.

`TRITON_ON_CPU` sends CPU tensors to the Triton kernels as well, which only works under
`TRITON_INTERPRET=1`: tests set it to drive a served step's kernels through the interpreter and
read which kernel variants the step launches (tests/kernel_keys.py). Nothing else sets it.
"""

from torch import Tensor

TRITON_ON_CPU = False


def use_triton(t: Tensor) -> bool:
    """Whether an op on `t` runs its Triton kernel."""
    return t.is_cuda or TRITON_ON_CPU
