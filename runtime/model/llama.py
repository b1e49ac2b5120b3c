"""One decoder definition for the Llama family: Llama 2/3/3.1, Mistral, Qwen2 (qkv bias) and
Qwen3 (q/k RMSNorm). Reads top to bottom like the maths. Projections are fused (qkv, gate_up) so
the base model and LoRA each take one launch per fused module.

On CUDA the elementwise work between the projections runs in fused Triton kernels, so a layer
launches 8 kernels besides attention's and LoRA's: add+RMSNorm, qkv, rotary+K/V store, o_proj,
add+RMSNorm, gate_up, SiLU*up, down. The residual adds are deferred into the next norm
(`DecoderLayer.forward_deferred`). Inside a captured decode forward the LoRA expands are folded
into the next of these kernels (`FoldPlan`, ops/triton_lora_fold.py). Elsewhere, or with the
environment variable LORASERVE_DISABLE_FUSED=1 (read when each module is built; for A/B runs),
the plain torch ops run; they are also the reference the kernels are tested against.

Shapes: T tokens in the step, B sequences, H query heads, KVH kv heads, D head dim.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ops.attention import paged_decode_attention, paged_prefill_attention, store_kv
from ops.dispatch import use_triton
from ops.lora import (
    LoraBatchInfo,
    apply_fold,
    folds_lora,
    lora_embed_shrink,
    lora_expand,
    lora_row_slots,
    stacks_lora,
)
from ops.lora import apply_lora as lora_apply
from ops.lora import linear_lora as lora_linear
from ops.lora import linear_lora_fold as lora_linear_fold
from ops.pdl import resolve as pdl_resolve
from ops.settings import env_flag
from ops.splitk import scope_splits, splitk_linear, splits_for, sum_partials
from ops.triton_decode_attention import decode_rope_attention_triton
from ops.triton_decode_gemm import (
    MAX_WEIGHT_ELEMS,
    GateUpFold,
    decode_gemm,
    decode_gemm_silu_mul,
    gate_up_fold_splits,
    gate_up_gemm,
    gate_up_tiling,
    gemm_fits,
    gemm_tiling,
    in_gemm_rows,
    large_gemm_tiling,
    lora_split_plan,
    qkv_gemm_splits,
    qkv_gemm_tiling,
)
from ops.triton_decode_gemv import MAX_K, decode_gemv, decode_gemv_lora, decode_gemv_rows
from ops.triton_lora_fold import LoraFold
from ops.triton_rmsnorm import (
    add_rmsnorm_partials_triton,
    add_rmsnorm_triton,
    rmsnorm_triton,
)
from ops.triton_rope_store_kv import rope_store_kv_triton
from ops.triton_silu_mul import silu_mul_triton
from runtime.adapters.pool import LoraGroupBuffers, LoraPool
from runtime.model.batch import ForwardBatch
from runtime.model.loader import ModelLoadError, inv_freq, rope_params


@dataclass(frozen=True)
class ModelArgs:
    """What the decoder needs from an HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, cfg) -> ModelArgs:  # cfg: transformers.PretrainedConfig
        arch = (cfg.architectures or ["LlamaForCausalLM"])[0]
        for flag in ("mlp_bias", "attention_bias"):
            if getattr(cfg, flag, False) and arch != "Qwen2ForCausalLM":
                raise ModelLoadError(f"{flag}: biases on {arch} projections are not supported")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def fused_kernels_enabled() -> bool:
    """Whether modules built now run the fused Triton kernels on CUDA tensors: yes unless the
    environment sets LORASERVE_DISABLE_FUSED=1."""
    return os.environ.get("LORASERVE_DISABLE_FUSED", "0") != "1"


def runs_fused(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` (one with a `use_fused` flag) takes its Triton path for input x."""
    return module.use_fused and use_triton(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_fused = fused_kernels_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return rmsnorm_triton(x, self.weight, self.eps)
        # Normalise in fp32, scale in the input dtype (the checkpoints were trained that way).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, fold: LoraFold | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s), s) for s = x + residual (s = x when residual is None). x, residual: [T, dim].
        fold: x's LoRA delta, not yet added to it. x may also be a projection's split-K
        partials, fp32 [S, T, dim] (ops/splitk.py; with a residual).

        On CUDA the add and the norm are one kernel, which also adds the fold's delta or sums
        the partials."""
        if x.dim() == 3:
            assert residual is not None, "split-K partials: with a residual"
            if runs_fused(self, residual) and residual.dtype == self.weight.dtype:
                return add_rmsnorm_partials_triton(x, residual, self.weight, self.eps, fold=fold)
            s = apply_fold(sum_partials(x, residual.dtype), fold) + residual
            return self(s), s
        if residual is None:
            x = apply_fold(x, fold)
            return self(x), x
        if self._fused(x):
            return add_rmsnorm_triton(x, residual, self.weight, self.eps, fold=fold)
        s = apply_fold(x, fold) + residual
        return self(s), s

    def _fused(self, x: torch.Tensor) -> bool:
        return runs_fused(self, x) and x.dim() == 2 and x.dtype == self.weight.dtype


def apply_lora(
    x: torch.Tensor, y: torch.Tensor, group: LoraGroupBuffers | None, info: LoraBatchInfo | None
) -> None:
    """y += LoRA(x) for every adapter row of the step: one shrink and one expand launch."""
    if group is None or info is None:
        return
    lora_apply(x, group.A, group.B, y, group.slice_offsets, group.scalings, info)


def project(
    linear: nn.Module, x: torch.Tensor, group: LoraGroupBuffers | None,
    info: LoraBatchInfo | None, partials: bool = False,
) -> torch.Tensor:
    """linear(x) + LoRA(x) for every adapter row of the step. On CUDA the shrink may run on a
    side stream beside the projection (ops.lora.linear_lora). partials: a caller whose output
    goes to a norm's add_forward takes split-K partials, fp32 [S, T, out], where a base-only
    decode graph's capture asks for them (ops/splitk.py)."""
    if group is None or info is None:
        splits = splits_for(linear, x) if partials else 0
        if splits and takes_gemm(linear, x, splits):
            return decode_gemm(x, linear.weight, pdl=True, split=splits)
        if splits and not in_gemm_rows(x.shape[0]):
            return splitk_linear(x, linear.weight, splits)
        # the GEMM's split where the GEMM does not take this projection (its K does not tile,
        # its weight is too large, no PDL): one unsplit projection, as without the split
        return base_linear(linear, x)
    return lora_linear(x, linear, group.A, group.B, group.slice_offsets, group.scalings, info)


def takes_gemv(linear: nn.Module, x: torch.Tensor) -> bool:
    """Whether linear(x) runs as ops/triton_decode_gemv.py's kernel: in a decode graph's
    forward (its layer kernels launching with PDL, ops/pdl.py) of at most LORASERVE_DECODE_GEMV
    rows (default 1), for an nn.Linear with a contiguous weight."""
    return (type(linear) is nn.Linear and x.dim() == 2 and 1 <= x.shape[0] <= decode_gemv_rows()
            and x.shape[1] <= MAX_K and x.stride(1) == 1 and linear.weight.is_contiguous()
            and x.dtype == linear.weight.dtype and pdl_resolve(None, x))


def takes_gemm(linear: nn.Module, x: torch.Tensor, splits: int = 1,
               tiling: str | None = None) -> bool:
    """Whether linear(x) (over `splits` slices of K, at `tiling` or the default) runs as
    ops/triton_decode_gemm.py's kernel: an nn.Linear whose weight `gemm_takes_weight`."""
    return type(linear) is nn.Linear and gemm_takes_weight(linear.weight, x, splits, tiling)


def qkv_parts(linear: nn.Module, x: torch.Tensor) -> int:
    """The slices of K qkv's projection leaves for the rotary kernel to sum: in a base-only
    decode graph whose o and down split (ops/splitk.py `scope_splits`), as
    LORASERVE_DECODE_GEMM_QKV_SPLIT asks (default: 0, unsplit), where the GEMM takes it at
    LORASERVE_DECODE_GEMM_QKV_TILE's tiling and it has no bias; else 0."""
    if scope_splits() < 2 or getattr(linear, "bias", None) is not None:
        return 0  # (the scope first: this runs in every forward, prefill's too)
    splits = qkv_gemm_splits()
    if splits < 2:
        return 0
    return splits if takes_gemm(linear, x, splits, qkv_gemm_tiling()) else 0


def gemm_takes_weight(weight: torch.Tensor, x: torch.Tensor, splits: int = 1,
                      tiling: str | None = None) -> bool:
    """Whether x @ weight^T runs as ops/triton_decode_gemm.py's kernel: as `takes_gemv`, for
    the rows above the GEMV's up to LORASERVE_DECODE_GEMM (default 32) where its tiling
    divides K, for weights (or LoRA stacks) of at most MAX_WEIGHT_ELEMS, and larger ones at
    LORASERVE_DECODE_GEMM_LARGE's tiling where that is set (`weight_tiling`)."""
    # PDL first: outside a decode graph's capture it ends the check before the settings' reads
    if x.dim() != 2 or not pdl_resolve(None, x):
        return False
    if weight.numel() > MAX_WEIGHT_ELEMS:
        if tiling is not None:
            return False
        tiling = large_gemm_tiling()
        if tiling is None:
            return False
    return gemm_shapes_fit(weight, x, splits, tiling)


def gemm_shapes_fit(weight: torch.Tensor, x: torch.Tensor, splits: int,
                    tiling: str | None) -> bool:
    """Whether the decode GEMM takes x's rows (above the GEMV's, up to LORASERVE_DECODE_GEMM)
    and x @ weight^T's layout over `splits` slices of K at `tiling` (None: the default)."""
    return (in_gemm_rows(x.shape[0])
            and gemm_fits(x.shape[0], x.shape[1], splits, gemm_tiling(tiling))
            and x.stride(1) == 1 and weight.is_contiguous() and x.dtype == weight.dtype)


def weight_tiling(weight: torch.Tensor) -> str | None:
    """The tiling `decode_gemm` takes `weight` at where `gemm_takes_weight`: above
    MAX_WEIGHT_ELEMS LORASERVE_DECODE_GEMM_LARGE's, else the default (None)."""
    return large_gemm_tiling() if weight.numel() > MAX_WEIGHT_ELEMS else None


def takes_gate_up_gemm(linear: nn.Module, x: torch.Tensor) -> bool:
    """Whether gate_up's projection of x and SiLU*up after it run as one
    `decode_gemm_silu_mul` launch: LORASERVE_DECODE_GATE_UP=1, a bias-free nn.Linear, in a
    decode graph's rows the GEMM takes (`gemm_takes_weight` but for MAX_WEIGHT_ELEMS) at
    LORASERVE_DECODE_GATE_UP_TILE's tiling."""
    if type(linear) is not nn.Linear or linear.bias is not None or x.dim() != 2:
        return False
    # PDL first: outside a decode graph's capture it ends the check before the settings' reads
    return (pdl_resolve(None, x) and gate_up_gemm()
            and gemm_shapes_fit(linear.weight, x, 1, gate_up_tiling()))


def base_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x), as ops/triton_decode_gemv.py's kernel where `takes_gemv`, or
    ops/triton_decode_gemm.py's where `takes_gemm`."""
    if takes_gemv(linear, x):
        return decode_gemv(x, linear.weight, linear.bias, pdl=True)
    if takes_gemm(linear, x):
        return decode_gemm(x, linear.weight, linear.bias, pdl=True,
                           tiling=weight_tiling(linear.weight))
    return linear(x)


@dataclass(frozen=True)
class FoldPlan:
    """A captured decode forward's LoRA folds: the groups whose expand the next kernel folds
    in (ops.lora.folds_lora), and each row's adapter slot for those kernels."""

    groups: frozenset[str]
    row_slots: torch.Tensor  # [T] int32, -1 = base row


def project_fold(
    linear: nn.Module, x: torch.Tensor, group: LoraGroupBuffers | None,
    info: LoraBatchInfo | None, name: str, plan: FoldPlan | None, partials: bool = False,
) -> tuple[torch.Tensor, LoraFold | None]:
    """(linear(x), its LoRA delta left for the next kernel) when `plan` folds group `name`;
    else (project(...), None). A group the pool stacks (its A under the base weight's rows in
    one buffer) takes one GEMM for both. partials: the caller's output goes to a norm's
    add_forward, which takes split-K partials [S, T, out] (and a fold over their t): a stacked
    GEMM on the decode GEMM splits as `lora_split_plan` picks (LORASERVE_DECODE_GEMM_LORA_SPLIT
    the most slices)."""
    if group is None or info is None or plan is None or name not in plan.groups:
        return project(linear, x, group, info, partials=partials), None
    stack = group.stack if stacks_lora() else None
    if stack is None and takes_gemv(linear, x) and group.A.stride(2) == 1:
        # the projection and the shrink in one launch, both reading their weights before
        # the PDL wait (a shrink beside it on a side stream would wait for its programs)
        y, t = decode_gemv_lora(x, linear.weight, linear.bias, group.A, plan.row_slots,
                                pdl=True)
        return y, LoraFold(t, group.B, group.scalings, plan.row_slots,
                           tuple(group.slice_offsets), info)
    stack_mm = None
    if stack is not None and gemm_takes_weight(stack, x):
        # the stacked GEMM (base rows, then every slot's A) as the decode GEMM, with PDL
        tiling = weight_tiling(stack)
        splits = 0
        if partials and linear.bias is None:
            split_tiling, splits = lora_split_plan(*stack.shape, x, tiling)
            if splits and gemm_takes_weight(stack, x, splits, split_tiling):
                tiling = split_tiling
            else:
                splits = 0
        stack_mm = partial(decode_gemm, pdl=True, tiling=tiling, split=max(splits, 1))
    return lora_linear_fold(
        x, linear, group.A, group.B, group.slice_offsets, group.scalings, info, plan.row_slots,
        stack=stack, stack_mm=stack_mm,
    )


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split layout. x: [T, heads, D]; cos/sin: [T, 1, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RotaryRows:
    """A step's rotary embedding: the model's cos and sin tables [P, D] and the tokens'
    positions [T]. The fused rotary kernel reads the tables at each position itself, so a step
    whose layers all run it launches no gathers (two a decode step before: about 3.5 µs of
    batch 32's graph on the H200); the torch path takes `rows()`, gathered once a step."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> None:
        self.cos_table, self.sin_table, self.positions = cos, sin, positions
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at each token's position, [T, 1, D] each (gathered on first use)."""
        if self._rows is None:
            self._rows = (self.cos_table[self.positions].unsqueeze(1),
                          self.sin_table[self.positions].unsqueeze(1))
        return self._rows


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.qkv_proj = nn.Linear(args.hidden_size, args.q_size + 2 * args.kv_size, args.qkv_bias)
        self.o_proj = nn.Linear(args.q_size, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.scale = args.head_dim**-0.5
        self.use_fused = fused_kernels_enabled()
        # Opt-in: at decode the rotary kernel's work runs inside decode attention's launch
        # (ops/triton_decode_attention.py decode_rope_attention_triton), one launch a layer fewer
        self.rope_in_attention = env_flag("LORASERVE_DECODE_ATTN_ROPE", False)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        rope: RotaryRows,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        fb: ForwardBatch,
        lora: dict[str, LoraGroupBuffers] | None,
    ) -> torch.Tensor:
        o = self.attend(x, rope, k_cache, v_cache, fb, lora)  # [T, H * D]
        return self.project_out(o, fb, lora)

    def forward_fold(
        self, x, rope: RotaryRows, k_cache, v_cache, fb: ForwardBatch, lora, plan: FoldPlan
    ) -> tuple[torch.Tensor, LoraFold | None]:
        """forward with `plan`'s folds: (o_proj's output, its LoRA delta left for the next
        norm, or None)."""
        o = self.attend(x, rope, k_cache, v_cache, fb, lora, plan)
        return project_fold(self.o_proj, o, lora.get("o") if lora else None, fb.lora, "o", plan,
                            partials=True)

    def attend(
        self, x, rope: RotaryRows, k_cache, v_cache, fb: ForwardBatch, lora,
        plan: FoldPlan | None = None,
    ) -> torch.Tensor:
        """qkv projection (+ LoRA), rotary embedding, K/V store, paged attention: [T, H * D].
        With `plan` folding qkv, the rotary kernel adds the LoRA delta."""
        a = self.args
        parts = 0 if lora else qkv_parts(self.qkv_proj, x)
        if parts:  # fp32 partials [S, T, N] that the rotary kernel sums
            qkv = decode_gemm(x, self.qkv_proj.weight, pdl=True, split=parts,
                              tiling=qkv_gemm_tiling())
            fold = None
        else:
            qkv, fold = project_fold(
                self.qkv_proj, x, lora.get("qkv") if lora else None, fb.lora, "qkv", plan
            )
        fused = runs_fused(self, qkv) and k_cache.dtype == x.dtype
        if qkv.dim() == 3 and not fused:
            qkv = sum_partials(qkv, x.dtype)
        if not fused:
            apply_fold(qkv, fold)
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        lead = qkv.shape[:-1]  # [T], or [S, T] for partials
        q = q.view(*lead, a.num_heads, a.head_dim)
        k = k.view(*lead, a.num_kv_heads, a.head_dim)
        v = v.view(*lead, a.num_kv_heads, a.head_dim)
        if fused and fb.is_decode and fold is None and self.rope_in_attention:
            norms = (self.q_norm.weight, self.k_norm.weight) if a.qk_norm else (None, None)
            o = decode_rope_attention_triton(
                q, k, v, rope.cos_table, rope.sin_table, rope.positions, k_cache, v_cache,
                fb.slot_mapping, fb.block_tables, fb.kv_lens, self.scale, *norms,
                eps=a.rms_norm_eps,
            )
            return o.reshape(-1, a.q_size)
        if fused:
            q = self._rope_store_fused(q, k, v, rope, k_cache, v_cache, fb, fold)
        else:
            if a.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            cos, sin = rope.rows()
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            store_kv(k, v, k_cache, v_cache, fb.slot_mapping)
        if fb.is_decode:
            o = paged_decode_attention(q, k_cache, v_cache, fb.block_tables, fb.kv_lens, self.scale)
        else:
            o = paged_prefill_attention(
                q, k_cache, v_cache, fb.block_tables, fb.cu_q_lens, fb.kv_lens, self.scale,
                fb.max_q_len, tile_table=fb.attn_tiles,
            )
        return o.reshape(-1, a.q_size)

    def _rope_store_fused(self, q, k, v, rope: RotaryRows, k_cache, v_cache, fb,
                          fold) -> torch.Tensor:
        """q/k norms (Qwen3), rotary embedding (the kernel reading the tables at each
        position) and the K/V store in one kernel (adding qkv's LoRA delta when `fold` is
        given): rotated q."""
        norms = (self.q_norm.weight, self.k_norm.weight) if self.args.qk_norm else (None, None)
        return rope_store_kv_triton(
            q, k, v, rope.cos_table, rope.sin_table, k_cache, v_cache, fb.slot_mapping,
            *norms, eps=self.args.rms_norm_eps, fold=fold, positions=rope.positions,
        )

    def project_out(self, o: torch.Tensor, fb: ForwardBatch, lora) -> torch.Tensor:
        """o_proj (+ LoRA): [T, H * D] -> [T, hidden] (or its split-K partials: project)."""
        return project(self.o_proj, o, lora.get("o") if lora else None, fb.lora, partials=True)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.inter = args.intermediate_size
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.use_fused = fused_kernels_enabled()

    def forward(
        self, x: torch.Tensor, fb: ForwardBatch, lora: dict[str, LoraGroupBuffers] | None
    ) -> torch.Tensor:
        h = self.activation(x, fb, lora)  # [T, inter]
        # [T, hidden], or its split-K partials for the next norm (project)
        return project(self.down_proj, h, lora.get("down") if lora else None, fb.lora,
                       partials=True)

    def activation(
        self, x: torch.Tensor, fb: ForwardBatch, lora: dict[str, LoraGroupBuffers] | None
    ) -> torch.Tensor:
        """SiLU(gate) * up of x's gate_up projection (+ its LoRA): [T, inter]. One launch
        where gate_up has no LoRA and `takes_gate_up_gemm`, else the projection and then
        `silu_mul`."""
        group = lora.get("gate_up") if lora else None
        if (group is None or fb.lora is None) and self.use_fused \
                and takes_gate_up_gemm(self.gate_up_proj, x):
            return decode_gemm_silu_mul(x, self.gate_up_proj.weight, pdl=True)
        return self.silu_mul(project(self.gate_up_proj, x, group, fb.lora))

    def forward_fold(
        self, x: torch.Tensor, fb: ForwardBatch, lora: dict[str, LoraGroupBuffers] | None,
        plan: FoldPlan,
    ) -> tuple[torch.Tensor, LoraFold | None]:
        """forward with `plan`'s folds: (down's output, its LoRA delta left for the next norm,
        or None); SiLU*up adds gate_up's delta when the plan folds it."""
        group = lora.get("gate_up") if lora else None
        if group is None or fb.lora is None or "gate_up" not in plan.groups:
            h = self.activation(x, fb, lora)
        elif (h := self.activation_folded(x, group, plan)) is not None:
            pass
        else:
            gate_up, fold = project_fold(self.gate_up_proj, x, group, fb.lora, "gate_up", plan)
            h = self.silu_mul(gate_up, fold)
        return project_fold(
            self.down_proj, h, lora.get("down") if lora else None, fb.lora, "down", plan,
            partials=True,
        )

    def activation_folded(
        self, x: torch.Tensor, group: LoraGroupBuffers, plan: FoldPlan
    ) -> torch.Tensor | None:
        """SiLU(gate) * up with gate_up's LoRA, as two launches where
        LORASERVE_DECODE_GATE_UP_FOLD asks and the decode GEMM takes them: every slot's shrink
        over the pool's stacked A rows, then `decode_gemm_silu_mul` adding each row's delta
        before SiLU. None where it does not apply."""
        splits = gate_up_fold_splits()
        stack = group.stack if stacks_lora() else None
        if (not splits or stack is None or not self.use_fused or group.num_slices != 2
                or not takes_gate_up_gemm(self.gate_up_proj, x)):
            return None
        n_out = group.slice_offsets[-1]
        a_rows = stack[n_out:]
        if not gemm_takes_weight(a_rows, x, splits):
            return None
        t = decode_gemm(x, a_rows, pdl=True, split=splits)
        fold = GateUpFold(t if splits > 1 else t.unsqueeze(0), group.B, group.scalings,
                          plan.row_slots)
        return decode_gemm_silu_mul(x, stack[:n_out], pdl=True, fold=fold)

    def silu_mul(self, gate_up: torch.Tensor, fold: LoraFold | None = None) -> torch.Tensor:
        """SiLU(gate) * up: [T, 2 * inter] -> [T, inter]; one kernel on CUDA, which also adds
        gate_up's LoRA delta when `fold` is given."""
        if runs_fused(self, gate_up):
            return silu_mul_triton(gate_up, fold=fold)
        apply_fold(gate_up, fold)
        gate, up = gate_up.split(self.inter, dim=-1)
        return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, h, rope: RotaryRows, k_cache, v_cache, fb, lora):
        x, residual, _ = self.forward_deferred(h, None, rope, k_cache, v_cache, fb, lora)
        if x.dim() == 3:  # down's split-K partials (ops/splitk.py)
            x = sum_partials(x, residual.dtype)
        return x + residual

    def forward_deferred(
        self,
        x: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,  # [T, hidden]
        rope: RotaryRows,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        fb: ForwardBatch,
        lora: dict[str, LoraGroupBuffers] | None,
        fold: LoraFold | None = None,
        plan: FoldPlan | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, LoraFold | None]:
        """The layer with its residual adds left to the next norm: the input stream is
        x + residual (x alone when residual is None) plus fold's delta of x when given; returns
        (x', residual', fold') whose sum is the output stream. Each norm adds the pending branch
        output as it normalises. With `plan`, LoRA expands are folded into the next kernels;
        fold' is down's delta, left for the next layer's norm (else None)."""
        x, residual = self.input_layernorm.add_forward(x, residual, fold)
        if plan is None:
            x = self.self_attn(x, rope, k_cache, v_cache, fb, lora)
            x, residual = self.post_attention_layernorm.add_forward(x, residual)
            return self.mlp(x, fb, lora), residual, None
        x, fold = self.self_attn.forward_fold(x, rope, k_cache, v_cache, fb, lora, plan)
        x, residual = self.post_attention_layernorm.add_forward(x, residual, fold)
        x, fold = self.mlp.forward_fold(x, fb, lora, plan)
        return x, residual, fold


class CausalLM(nn.Module):
    """Embeddings → decoder layers over the paged KV cache → final norm → logits of last tokens."""

    def __init__(self, args: ModelArgs, hf_config) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        rope = rope_params(hf_config)
        self._inv_freq = inv_freq(rope, args.head_dim)  # [D/2] fp32, host
        self._attention_scaling = getattr(rope, "attention_scaling", 1.0)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        self.lora_pool: LoraPool | None = None

    def lora_linears(self) -> list[dict[str, nn.Linear]]:
        """Per layer, the projection of each LoRA layer group (qkv, o, gate_up, down): what a
        pool stacks its A under (LoraPool.adopt_base_weights)."""
        return [{"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,
                 "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}
                for layer in self.layers]

    def build_rope_cache(self, max_position: int) -> None:
        """cos/sin for every position, computed in fp32 then cast, as the checkpoints expect."""
        p = next(self.parameters())
        pos = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(pos, self._inv_freq.float().cpu())  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.rope_cos = (emb.cos() * self._attention_scaling).to(p.dtype).to(p.device)
        self.rope_sin = (emb.sin() * self._attention_scaling).to(p.dtype).to(p.device)

    def forward(self, fb: ForwardBatch, kv_k: list[torch.Tensor], kv_v: list[torch.Tensor]):
        """Returns logits [B, vocab] in the model's dtype for each sequence's last token of the
        step."""
        return self.logits(self.hidden(fb, kv_k, kv_v), fb)

    def hidden(
        self, fb: ForwardBatch, kv_k: list[torch.Tensor], kv_v: list[torch.Tensor]
    ) -> torch.Tensor:
        """The final-norm hidden states [len(logits_indices), hidden] of the rows whose logits
        the step computes (what `logits` projects)."""
        pool = self.lora_pool if fb.lora is not None else None
        h = self.embed_tokens(fb.input_ids)  # [T, hidden]
        if pool is not None and pool.embed is not None:
            t = lora_embed_shrink(fb.input_ids, pool.embed.A, fb.lora)  # [T, R]
            lora_expand(t, pool.embed.B, h, pool.embed.slice_offsets, pool.embed.scalings, fb.lora)
        rope = RotaryRows(self.rope_cos, self.rope_sin, fb.positions)
        residual = None  # the stream is h + residual (+ fold's delta of h)
        fold, plan = None, self._fold_plan(fb, h) if pool is not None else None
        for i, layer in enumerate(self.layers):
            h, residual, fold = layer.forward_deferred(
                h, residual, rope, kv_k[i], kv_v[i], fb, pool.layers[i] if pool else None,
                fold, plan,
            )
        if fold is not None and h.dim() == 3:  # down's split-K partials and their delta
            h = sum_partials(h, residual.dtype)
        apply_fold(h, fold)  # the last down's delta: the final norm takes a gather of rows
        rows = fb.logits_indices
        # A decode step's rows are its tokens, 0..T-1, in order (one a sequence, no scored
        # prompt rows): no gathers (a gather and an index a decode graph before, about 5.5 µs
        # of batch 32's step on the H200)
        if not (fb.is_decode and rows.shape[0] == h.shape[-2]):
            h = h[:, rows] if h.dim() == 3 else h[rows]  # down's split-K partials: [S, T, hidden]
            residual = None if residual is None else residual[rows]
        h, _ = self.norm.add_forward(h, residual)
        return h

    @staticmethod
    def _fold_plan(fb: ForwardBatch, h: torch.Tensor) -> FoldPlan | None:
        """The forward's folds (inside a decode graph capture), or None."""
        groups = folds_lora(h)
        if not groups:
            return None
        return FoldPlan(groups, lora_row_slots(fb.lora, h.shape[0]))

    def logits(self, h: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """lm_head (+ its LoRA for fb.lora_logits' rows): [rows, hidden] -> [rows, vocab] in
        the model's dtype. The sampler upcasts rows that need fp32; a greedy step's argmax
        reads them as they are (an fp32 copy of batch 32's logits took 14 us a step on the
        H200, and the argmax reading fp32 twice the bytes)."""
        pool = self.lora_pool if fb.lora is not None else None
        logits = self.lm_head(h)  # [B, vocab]
        if pool is not None and pool.lm_head is not None:
            apply_lora(h, logits, pool.lm_head, fb.lora_logits)
        return logits

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters; every parameter must be filled."""
        a = self.args
        params = dict(self.named_parameters())
        shards = {
            "q_proj": ("qkv_proj", 0, a.q_size),
            "k_proj": ("qkv_proj", a.q_size, a.kv_size),
            "v_proj": ("qkv_proj", a.q_size + a.kv_size, a.kv_size),
            "gate_proj": ("gate_up_proj", 0, a.intermediate_size),
            "up_proj": ("gate_up_proj", a.intermediate_size, a.intermediate_size),
        }
        filled: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and a.tie_word_embeddings:
                continue
            parts = name.split(".")
            target, offset, size = name, None, None
            if len(parts) >= 2 and parts[-2] in shards:
                fused, offset, size = shards[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
            if target not in params:
                raise KeyError(f"unexpected weight {name!r} in checkpoint")
            dst = params[target]
            if offset is not None:
                dst = dst.narrow(0, offset, size)
                filled.add(f"{target}#{offset}")
            else:
                filled.add(target)
            if dst.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(dst.shape)}")
            dst.copy_(tensor)
        expected = set()
        for pname in params:
            if pname.endswith(("qkv_proj.weight", "qkv_proj.bias")):
                expected |= {f"{pname}#{o}" for o in (0, a.q_size, a.q_size + a.kv_size)}
            elif pname.endswith("gate_up_proj.weight"):
                expected |= {f"{pname}#{o}" for o in (0, a.intermediate_size)}
            else:
                expected.add(pname)
        missing = expected - filled
        if missing:
            raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")

    @torch.no_grad()
    def init_dummy(self, seed: int) -> None:
        """Random weights drawn on the device (load_format = dummy)."""
        g = torch.Generator(device=next(self.parameters()).device).manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
