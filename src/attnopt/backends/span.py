"""Span decomposition over torch's fused CPU kernel: structured masks without an N×N anything.

For each block of queries, the mask's key_range() and tile classification give the keys it can see.
Long runs of FULL tiles go to the fused kernel with no mask; the rest of the span goes in one call with
a small additive edge mask (bq x span). No mask and plain causal are one call for all queries. The pieces are merged exactly by their log-sum-exp (merge.py); sinks are one
more, value-less piece. The backward calls the fused kernel's own backward per piece with the *final*
(out, lse) — P = exp(s - lse) and Δ = rowsum(dO ∘ O) are then the global ones — so gradients are exact.

Uses torch.ops.aten._scaled_dot_product_flash_attention_for_cpu (private: returns the LSE); guarded by
is_available(), which probes it once, so a torch that changes it makes this backend decline cleanly.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .._inputs import AttentionInputs, acc_dtype
from ..masks import Mask, MaskContext, Tile, causal, tile_indices
from ..merge import add_sinks, merge, sinks_grad
from ..mods import ScoreMod, alibi, bias
from ._base import Backend, fused_data_reasons, unit_qk

NEG_INF = float("-inf")

# Query rows per block and the key granularity of the classification. Measured on 2 cores (H=8, D=64,
# N=8192, window 256, ms for (BLOCK_Q, TILE_K)): fp32 (64, 64) 77, (128, 64) 62, (256, 64) 76,
# (128, 128) 79; bf16 (64, 64) 59, (128, 64) 47, (256, 64) 60. Wider blocks compute more masked-out
# scores (a block's span is BLOCK_Q + window keys), narrower ones pay per-call overhead.
BLOCK_Q = 128
TILE_K = 64
SPLIT_KEYS = 1024
BIAS_CHUNK = 512


def _fwd_op(q, k, v, mask, scale, is_causal=False):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
    )


def _bwd_op(do, q, k, v, out, lse, mask, scale, is_causal=False):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale
    )


@functools.cache
def _op_works() -> bool:
    """Probe the private fused op once: signature and LSE semantics as this backend expects."""
    try:
        q = torch.zeros(1, 1, 2, 4)
        out, lse = _fwd_op(q, q, q, None, 1.0)
        grads = _bwd_op(torch.ones_like(out), q, q, q, out, lse, None, 1.0)
        return tuple(lse.shape) == (1, 1, 2) and abs(float(lse[0, 0, 0]) - 0.6931) < 1e-3 and len(grads) == 3
    except Exception:  # any change of the private API: decline, the other backends take over
        return False


@dataclass(frozen=True, eq=False)
class _Piece:
    """Keys [k0, k1) of query block [q0, q1); masked=True if it needs an edge mask / additive bias."""

    q0: int
    q1: int
    k0: int
    k1: int
    masked: bool
    causal: bool = False  # the kernel's own top-left is_causal over this (square or top-left) piece


@dataclass(frozen=True, eq=False)
class _Plan:
    mask: Mask | None
    mods: tuple[ScoreMod, ...]
    scale: float
    ctx: MaskContext
    Hkv: int
    G: int
    blocks: tuple[tuple[int, int, tuple[_Piece, ...]], ...]  # (q0, q1, kernel calls) per query block
    # Masks and modifiers that depend on (i - j) alone give every interior block the same edge mask:
    # build it once per call (for a 256-wide window at N=8192 that is 1 build instead of 64).
    invariant: bool
    cache: dict = field(default_factory=dict)

    def additive_mask(self, p: _Piece, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        """(Bt, Hkv or 1, G*bq, span) float mask 0 / -inf (+ bias) in the kernel's dtype, rows folded,
        and the rows it leaves with no key at all (None if there are none)."""
        if not p.masked:
            return None, None
        key = (p.q0 - p.k0, p.q1 - p.q0, p.k1 - p.k0, dtype) if self.invariant else None
        if key in self.cache:
            return self.cache[key]
        b, h, i, j = tile_indices(self.ctx, p.q0, p.q1, p.k0, p.k1)
        # Biases are built and added in float32 (float64 for float64 inputs): the kernel takes a float32
        # mask with bf16/fp16 inputs, and rounding ALiBi at distance 2000 to bf16 moved scores by ~4.
        cd = acc_dtype(dtype)
        add = torch.zeros((), dtype=cd)
        for mod in self.mods:  # alibi / bias: additive, independent of the score
            add = mod(add, b, h, i, j, self.ctx)
        if self.mask is not None:
            add = torch.where(self.mask.keep(b, h, i, j, self.ctx), add, NEG_INF)
        add = add.expand(add.shape[0], add.shape[1], p.q1 - p.q0, p.k1 - p.k0)  # (Bt, Hq or 1, bq, span)
        add = _fold_rows(add, self.Hkv, self.G).to(cd if self.mods else dtype)  # 0 / -inf: exact in any dtype
        empty = torch.isinf(add).all(-1)  # the kernel reports lse 0 for such rows; we need -inf
        result = (add, empty if bool(empty.any()) else None)
        if key is not None:
            self.cache[key] = result
        return result


def _fold_rows(t: Tensor, Hkv: int, G: int) -> Tensor:
    """(Bt, Hq or 1, bq, X) -> (Bt, Hkv or 1, G*bq, X): row layout of GQA-folded queries."""
    Bt, Ht, bq, X = t.shape
    if Ht == 1:
        return t.unsqueeze(2).expand(Bt, 1, G, bq, X).reshape(Bt, 1, G * bq, X)
    return t.reshape(Bt, Hkv, G * bq, X)


def _glue(q0: int, q1: int, runs: list[list], has_mods: bool) -> tuple[_Piece, ...]:
    """Turn [kind, k0, k1] runs into kernel calls: long FULL runs alone, long gaps skipped, rest glued."""
    pieces: list[_Piece] = []
    glued: list[list] = []
    for run in [*runs, None]:  # None flushes the last glued group
        long = run is not None and run[2] - run[1] >= SPLIT_KEYS
        alone = run is not None and run[0] is Tile.FULL and long and not has_mods
        if run is None or alone or (run[0] is Tile.EMPTY and (long or not glued)):
            while glued and glued[-1][0] is Tile.EMPTY:  # a group never ends in a gap
                glued.pop()
            if glued:
                masked = has_mods or any(r[0] is not Tile.FULL for r in glued)
                pieces.append(_Piece(q0, q1, glued[0][1], glued[-1][2], masked))
            glued = []
            if alone:
                pieces.append(_Piece(q0, q1, run[1], run[2], False))
        else:
            glued.append(run)
    return tuple(pieces)


def _chunks(p: _Piece) -> list[_Piece]:
    """Cut a piece at keys q0 - m*BIAS_CHUNK: every block then shares the same (q0 - k0) offsets, so
    the additive ALiBi mask of each chunk is built once per call instead of once per block."""
    cuts = sorted(
        {p.k0, p.k1}
        | {c for c in range(p.q0, p.k0, -BIAS_CHUNK) if p.k0 < c < p.k1}
        | {c for c in range(p.q0, p.k1, BIAS_CHUNK) if p.k0 < c < p.k1}
    )
    return [_Piece(p.q0, p.q1, a, b, p.masked) for a, b in itertools.pairwise(cuts)]


def _single_call(mask: Mask | None, mods: tuple[ScoreMod, ...], ctx: MaskContext, G: int) -> bool:
    """No mask, or causal where the kernel's top-left is_causal is exact (top-left, or Sq == Sk), with
    GQA folded only when there is no mask (a folded causal row would see the wrong keys)."""
    square = isinstance(mask, causal) and (mask.align == "top_left" or ctx.Sq == ctx.Sk) and G == 1
    return not mods and (mask is None or square)


def _pieces(
    mask: Mask | None, mods: tuple[ScoreMod, ...], ctx: MaskContext, G: int, invariant: bool
) -> tuple[tuple[int, int, tuple[_Piece, ...]], ...]:
    """Per query block, the kernel calls: long FULL runs of keys alone (no mask), the rest glued.

    One masked call over a whole window span costs ~8% more kernel time than an unmasked one, while
    every extra call costs a merge and ~0.1 ms of overhead; so FULL runs shorter than SPLIT_KEYS and
    EMPTY gaps shorter than SPLIT_KEYS are glued into their neighbours' masked piece.
    """
    # Whole-problem forms the kernel runs in one call (then only sinks needed span): no mask, and
    # causal where the kernel's top-left is_causal is exact (top-left, or Sq == Sk), with GQA folded
    # only when there is no mask (a folded causal row would see the wrong keys).
    if _single_call(mask, mods, ctx, G):
        return ((0, ctx.Sq, (_Piece(0, ctx.Sq, 0, ctx.Sk, False, causal=mask is not None),)),)
    rows = []
    for q0 in range(0, ctx.Sq, BLOCK_Q):
        q1 = min(q0 + BLOCK_Q, ctx.Sq)
        lo, hi = (0, ctx.Sk) if mask is None else mask.key_range(q0, q1, ctx)
        runs: list[list] = []  # [kind, k0, k1] of equal-kind neighbouring tiles
        for k0 in range(lo, hi, TILE_K):
            k1 = min(k0 + TILE_K, hi)
            kind = Tile.FULL if mask is None else mask.classify(q0, q1, k0, k1, ctx)
            if runs and runs[-1][0] is kind:
                runs[-1][2] = k1
            else:
                runs.append([kind, k0, k1])
        pieces = _glue(q0, q1, runs, bool(mods))
        if mods and invariant:
            pieces = tuple(c for p in pieces for c in _chunks(p))
        rows.append((q0, q1, pieces))
    return tuple(rows)


class _SpanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None):
        B, Hq, Sq, D = q.shape
        out = q.new_empty(B, Hq, Sq, D)  # every block writes its rows: blocks with no key write 0 / -inf
        lse = q.new_empty((B, Hq, Sq), dtype=acc_dtype(q.dtype))
        for q0, q1, row in plan.blocks:
            if not row:
                out[:, :, q0:q1] = 0
                lse[:, :, q0:q1] = NEG_INF
                continue
            qb = q[:, :, q0:q1].reshape(B, plan.Hkv, plan.G * (q1 - q0), D)  # (B, Hkv, G*bq, D)
            outs, lses = [], []
            for p in row:
                add, empty = plan.additive_mask(p, q.dtype)
                o, part_lse = _fwd_op(
                    qb, k[:, :, p.k0 : p.k1], v[:, :, p.k0 : p.k1], add, plan.scale, p.causal
                )
                if empty is not None:
                    part_lse = torch.where(empty, NEG_INF, part_lse)
                outs.append(o)
                lses.append(part_lse.to(lse.dtype))
            o, row_lse = merge(outs, lses)  # (B, Hkv, G*bq, D), (B, Hkv, G*bq)
            out[:, :, q0:q1] = o.reshape(B, Hq, q1 - q0, D)
            lse[:, :, q0:q1] = row_lse.reshape(B, Hq, q1 - q0)
        if sinks is not None:
            out, lse = add_sinks(out, lse, sinks)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, sinks if sinks is not None else lse.new_empty(0))
        ctx.has_sinks = sinks is not None
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = _backward(
            ctx.plan, q, k, v, out, lse, sinks if ctx.has_sinks else None, dout, dlse
        )
        return None, dq, dk, dv, dsinks


def _backward(
    plan: _Plan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    sinks: Tensor | None,
    dout: Tensor | None,
    dlse: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dsinks) from the rows' (out, lse) — the call's own, or those of a larger softmax
    these keys are one part of (then dq is this part's share and dk, dv are these keys' gradients)."""
    B, Hq, _, D = q.shape
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    lse_safe = torch.where(torch.isinf(lse), 0.0, lse)  # empty rows: every s is -inf, P = 0
    acc = lse.dtype  # float32 accumulators (float64 for float64 inputs), cast at the end
    if dlse is not None:  # d lse / d s = P: the kernel's Δ = rowsum(dO ∘ O) becomes Δ - dlse
        q, k, v, out, dout = _with_lse_grad(q, k, v, out, dout, dlse.to(acc))
    D0, D = D, q.shape[-1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    for q0, q1, row in plan.blocks:
        if not row:
            continue
        fold = (B, plan.Hkv, plan.G * (q1 - q0))
        qb = q[:, :, q0:q1].reshape(*fold, D)
        ob = out[:, :, q0:q1].reshape(*fold, D)
        dob = dout[:, :, q0:q1].reshape(*fold, D)
        lb = lse_safe[:, :, q0:q1].reshape(fold)
        dqb = torch.zeros(*fold, D, dtype=dk.dtype)
        for p in row:
            add, _ = plan.additive_mask(p, q.dtype)
            gq, gk, gv = _bwd_op(
                dob, qb, k[:, :, p.k0 : p.k1], v[:, :, p.k0 : p.k1], ob, lb, add, plan.scale, p.causal
            )
            dqb += gq
            dk[:, :, p.k0 : p.k1] += gk
            dv[:, :, p.k0 : p.k1] += gv
        dq[:, :, q0:q1] = dqb.reshape(B, Hq, q1 - q0, D).to(q.dtype)
    dsinks = None
    if sinks is not None:  # delta = rowsum(dO ∘ O) - dlse: the padded columns carry the -dlse part
        p_sink = torch.exp(sinks.to(lse.dtype).view(1, -1, 1) - lse)
        dsinks = sinks_grad(p_sink, (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)).to(sinks.dtype)
    if dlse is not None:  # drop the padded columns
        dq, dk, dv = dq[..., :D0], dk[..., :D0], dv[..., :D0]
    return dq, dk.to(k.dtype), dv.to(v.dtype), dsinks


def _with_lse_grad(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, dlse: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pad the head dim so that the fused backward also carries the LSE's gradient.

    The kernel forms Δ = rowsum(dO ∘ O) and dS = P ∘ (dO Vᵀ - Δ); an LSE gradient adds P ∘ dlse, i.e.
    Δ -> Δ - dlse. Extra columns with O = 1, dO = -dlse, and q, k, v = 0 do exactly that and leave
    every score and dO Vᵀ unchanged. In bf16/fp16 -dlse is split into two columns (the rounded value
    and its remainder), so it reaches the kernel's float32 Δ with ~2^-16 relative error, not 2^-8.
    """
    dt = q.dtype
    cols = [-dlse] if dt in (torch.float32, torch.float64) else None
    if cols is None:
        hi = (-dlse).to(dt)
        cols = [hi, (-dlse - hi.to(dlse.dtype))]
    n = len(cols)

    def pad(t: Tensor, value: float) -> Tensor:
        return torch.cat([t, t.new_full((*t.shape[:-1], n), value)], dim=-1)

    extra = torch.stack([c.to(dt) for c in cols], dim=-1)
    return pad(q, 0.0), pad(k, 0.0), pad(v, 0.0), pad(out, 1.0), torch.cat([dout, extra], dim=-1)


class SpanBackend(Backend):
    """torch's fused CPU kernel on the key spans a structured mask allows, merged exactly by LSE."""

    name: ClassVar[str] = "span"
    description: ClassVar[str] = "fused CPU kernel on the key spans the mask allows, merged by LSE"
    device_types: ClassVar[frozenset[str] | None] = frozenset({"cpu"})
    supports_dropout: ClassVar[bool] = False
    dense_rows: ClassVar[bool] = True
    similarities: ClassVar[frozenset[str]] = frozenset({"dot", "cosine"})

    @classmethod
    def is_available(cls) -> bool:
        return _op_works()

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        r = super().not_supported_reasons(inputs)
        if inputs.Dv != inputs.D:
            r.append(
                f"Dv={inputs.Dv} != D={inputs.D}: the fused CPU kernel needs one head dim (use backend='blockwise')"
            )
        bad = [m for m in inputs.mods if not isinstance(m, (alibi, bias))]
        if bad:
            r.append(
                f"score_mod={bad!r}: only additive modifiers (alibi, bias) become a span bias (use backend='blockwise')"
            )
        if torch.is_grad_enabled() and any(
            t.requires_grad
            for m in inputs.mods
            for t in [getattr(m, "bias", None), getattr(m, "slopes", None)]
            if t is not None
        ):
            r.append(
                "a bias / alibi tensor requires grad: its gradient is not computed here (use backend='blockwise')"
            )
        if not r and not inputs.empty:  # the data checks read q, k and v: only when nothing else refuses
            G = inputs.Hq // inputs.Hkv
            merges = inputs.sinks is not None or not _single_call(inputs.mask, inputs.mods, inputs.ctx, G)
            r += fused_data_reasons(inputs, masks=inputs.may_mask, merges=merges)
        return r

    def rank(self, inputs: AttentionInputs) -> float:
        # Window 256, N=8192, fp32, H=8, 2 threads: span 87 ms, blockwise 248 ms, SDPA with the
        # materialized mask 1557 ms. Padding & causal, B=2: N=2048 span 130 ms vs SDPA 155 ms, but at
        # N=512 10.5 vs 9.6 ms and N=128 1.9 vs 1.0 ms; sdpa.rank() takes those small problems.
        return 10.0

    def plan(self, inputs: AttentionInputs) -> str:
        plan = _make_plan(inputs)
        pieces = [p for _, _, row in plan.blocks for p in row]
        kept = sum((p.q1 - p.q0) * (p.k1 - p.k0) for p in pieces)
        frac = kept / (inputs.Sq * inputs.Sk)
        n_masked = sum(p.masked for p in pieces)
        return (
            f"{self.description}; {len(pieces)} kernel calls ({n_masked} with an edge mask), "
            f"{frac:.1%} of the (Sq, Sk) scores computed"
        )

    grads_from_output: ClassVar[bool] = True

    def grad_from_output_reasons(self, inputs: AttentionInputs) -> list[str]:
        r = self.not_supported_reasons(inputs)
        if inputs.similarity != "dot":
            r.append(
                f"similarity={inputs.similarity!r}: only 'dot' (cosine's normalization has its own chain)"
            )
        if inputs.sinks is not None:
            r.append("sinks: a part of a larger softmax has none (fold them in where the parts merge)")
        if not r:  # the kernel rebuilds P = exp(s - lse) from the given float32 LSE: bounded scores only
            r += fused_data_reasons(inputs, masks=inputs.may_mask, merges=True)
        return r

    def grad_from_output(self, inputs, out, lse, dout, dlse):
        dq, dk, dv, _ = _backward(
            _make_plan(inputs), inputs.q, inputs.k, inputs.v, out, lse, None, dout, dlse
        )
        return dq, dk, dv

    def forward(self, inputs: AttentionInputs) -> tuple[Tensor, Tensor | None]:
        q, k = inputs.q, inputs.k
        if inputs.similarity == "cosine":
            q, k = unit_qk(q, k)
        out, lse = _SpanFn.apply(_make_plan(inputs), q, k, inputs.v, inputs.sinks)
        return out, lse if inputs.return_lse else None


def _make_plan(inputs: AttentionInputs) -> _Plan:
    m, mods, G = inputs.mask, inputs.mods, inputs.Hq // inputs.Hkv
    invariant = (m is None or m.translation_invariant) and all(isinstance(x, alibi) for x in mods)
    blocks = _pieces(m, mods, inputs.ctx, G, invariant)
    return _Plan(m, mods, inputs.scale, inputs.ctx, inputs.Hkv, G, blocks, invariant)
