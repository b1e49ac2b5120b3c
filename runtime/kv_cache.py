"""The paged KV cache: a block manager on the host and the K/V tensors on the device.

A sequence's token at position p lives in block `req.block_ids[p // block_size]` at offset
`p % block_size`. Blocks are handed out from a free list; nothing is ever copied to compact.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from runtime.request import Request


class BlockManager:
    """Hands out KV blocks. Speaks in can_allocate / allocate / free pairs."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache has no blocks: give it more memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Blocks `req` must gain so that its first `num_tokens` tokens have a place."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(req.block_ids))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow `req.block_ids` to cover `num_tokens` tokens."""
        need = self.blocks_needed(req, num_tokens)
        if need > len(self._free):
            raise RuntimeError("allocate() without can_allocate(): out of KV blocks")
        req.block_ids.extend(self._free.popleft() for _ in range(need))

    def free(self, req: Request) -> None:
        self._free.extend(req.block_ids)
        req.block_ids = []


@dataclass
class KVCache:
    """Per-layer K and V: each [num_blocks, block_size, num_kv_heads, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem
