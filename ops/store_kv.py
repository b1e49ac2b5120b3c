"""Write this step's keys and values into the paged KV cache."""

from torch import Tensor


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter one step's K/V rows into their cache slots, in place.

    k, v: [T, KVH, D], T tokens of the step in any order.
    k_cache, v_cache: [num_blocks, block_size, KVH, D], contiguous.
    slot_mapping: [T] int64, slot = block_id * block_size + offset within the block.

    A plain index write: one kernel per cache on CUDA, no host sync, capturable in a CUDA graph.
    """
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be [T, KVH, D], got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, KVH, D], "
            f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k rows {tuple(k.shape[1:])} do not match cache rows {tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    # Flattening the two leading dims makes the slot number a plain row index.
    k_cache.view(num_slots, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(num_slots, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)
