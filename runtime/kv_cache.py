"""The paged KV cache: a block manager on the host and the K/V tensors on the device.

A sequence's token at position p lives in block `req.block_ids[p // block_size]` at offset
`p % block_size`. Blocks are handed out from a free list; nothing is ever copied to compact.

With the prefix cache (`enable_prefix_caching`), every full block a request has computed is
registered under a digest of its tokens chained to the digests of the blocks before it, and
rooted in what else decides its K/V: the adapter version (a load in place or a reload under the
same name roots a new chain) and the request's `cache_salt`. A new request takes the blocks of
its longest registered prefix instead of computing them; blocks are shared by reference count,
never written once full, and a freed registered block stays registered, evicted least recently
freed first only when a block is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from runtime.request import Request


def root_digest(adapter_uid: int, salt: str | None) -> bytes:
    """The digest a chain of blocks starts from: the adapter version's id (0: the base model)
    and the request's cache_salt."""
    return hashlib.sha256(f"{adapter_uid}\x00{salt}".encode()).digest()


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """A full block's digest: its tokens', chained to the digest of the blocks before it."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    """Hands out KV blocks. Speaks in can_allocate / allocate / free pairs; with the prefix
    cache also lookup / take_prefix / register."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache has no blocks: give it more memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.prefix_cache = prefix_cache
        self._refs = [0] * num_blocks
        self._cached: dict[bytes, int] = {}  # digest -> the block holding those tokens' K/V
        self._digest_of: dict[int, bytes] = {}
        # registered blocks no request holds, least recently freed first: evicted in that order
        self._idle: OrderedDict[int, None] = OrderedDict()
        self.num_hit_tokens = 0  # prompt tokens taken from the cache instead of computed
        self.num_looked_up_tokens = 0  # tokens of the prompts the cache was asked about
        self.num_evicted_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Blocks `req` must gain so that its first `num_tokens` tokens have a place."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(req.block_ids))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow `req.block_ids` to cover `num_tokens` tokens."""
        need = self.blocks_needed(req, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError("allocate() without can_allocate(): out of KV blocks")
        for _ in range(need):
            if self._free:
                b = self._free.popleft()
            else:  # the least recently freed registered block leaves the cache
                b, _ = self._idle.popitem(last=False)
                del self._cached[self._digest_of.pop(b)]
                self.num_evicted_blocks += 1
            self._refs[b] = 1
            req.block_ids.append(b)

    def free(self, req: Request) -> None:
        # the last blocks first: a chain's tail is the least likely to be asked for again, so
        # it is evicted before the blocks its head shares with other prompts
        for b in reversed(req.block_ids):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._digest_of:
                    self._idle[b] = None
                else:
                    self._free.append(b)
        req.block_ids = []
        req.num_registered_blocks = 0  # its digests stay: its tokens are the same

    def flush(self) -> int:
        """Forget every registered block (SGLang's /flush_cache): the idle ones become free,
        those requests hold stay theirs and free as usual. Returns how many were registered."""
        n = len(self._cached)
        self._free.extend(self._idle)
        self._idle.clear()
        self._cached.clear()
        self._digest_of.clear()
        return n

    def lookup(self, req: Request, root: bytes, most: int) -> list[int]:
        """The registered blocks of `req`'s longest cached prefix of at most `most` tokens
        (taking nothing). Fills `req.block_digests` with the digests of its full blocks as far
        as they are known."""
        bs = self.block_size
        if req.digest_root != root:
            req.block_digests, req.digest_root = [], root
        digests = req.block_digests  # those of an earlier round that admitted nothing stay
        known = req.num_prompt_tokens + req.num_resolved_outputs
        if len(digests) < known // bs:
            tokens = req.token_slice(len(digests) * bs, (known // bs - len(digests)) * bs)
            parent = digests[-1] if digests else root
            for i in range(len(tokens) // bs):
                parent = block_digest(parent, tokens[i * bs : (i + 1) * bs])
                digests.append(parent)
        hit: list[int] = []
        for d in digests[: most // bs]:
            b = self._cached.get(d)
            if b is None:
                break
            hit.append(b)
        return hit

    def idle_among(self, blocks: list[int]) -> int:
        """How many of `blocks` no request holds (taking them leaves that many fewer free)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def take_prefix(self, req: Request, blocks: list[int]) -> None:
        """Give `req` (holding no blocks) the cached `blocks` as its first ones: their tokens
        count as computed."""
        assert not req.block_ids and req.num_computed_tokens == 0
        for b in blocks:
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1
        req.block_ids = list(blocks)
        req.num_registered_blocks = len(blocks)
        req.num_computed_tokens = len(blocks) * self.block_size
        self.num_hit_tokens += req.num_computed_tokens
        self.num_looked_up_tokens += req.num_tokens

    def register(self, req: Request) -> None:
        """Register `req`'s full blocks whose K/V a launched step has written (a later step
        runs after it on the compute stream, so a request that takes them reads them
        written); a digest another block already holds keeps that block."""
        if req.digest_root is None:
            return
        bs = self.block_size
        full = min(req.num_computed_tokens, req.num_prompt_tokens + req.num_resolved_outputs)
        full = min(full // bs, len(req.block_ids))
        digests = req.block_digests
        if len(digests) < full:  # digests of the blocks its outputs filled since
            tokens = req.token_slice(len(digests) * bs, (full - len(digests)) * bs)
            parent = digests[-1] if digests else req.digest_root
            for i in range(full - len(digests)):
                parent = block_digest(parent, tokens[i * bs : (i + 1) * bs])
                digests.append(parent)
        for i in range(req.num_registered_blocks, full):
            b, d = req.block_ids[i], digests[i]
            if d not in self._cached and b not in self._digest_of:
                self._cached[d] = b
                self._digest_of[b] = d
        req.num_registered_blocks = max(req.num_registered_blocks, full)


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
