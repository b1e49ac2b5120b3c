"""Integer helpers for kernel wrappers, in plain Python: `triton.cdiv` and
`triton.next_power_of_2` are jit functions whose host-side call costs microseconds, paid on
every eager launch."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
