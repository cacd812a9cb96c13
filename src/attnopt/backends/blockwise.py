"""FlashAttention-2 in PyTorch: tiles of queries x keys, online softmax, LSE, recompute backward.

Memory is O(N): one (B, Hq, bq, bk) score tile lives at a time, plus q, k, v, out and lse. EMPTY tiles
(by the mask's classification) are skipped; FULL tiles never evaluate the mask. GQA folds the G query
heads of a group onto their kv head, (B, Hkv, G*bq, D), so K/V are never repeated. Every variant:
any mask, score modifiers (their tensors get gradients), sinks, all similarities, dropout, grads
through the returned LSE. Scores, softmax and LSE run in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._inputs import AttentionInputs, acc_dtype
from ..masks import Mask, MaskContext, Tile, tile_indices
from ..merge import sinks_grad
from ..mods import ScoreMod, grad_tensors
from ._base import Backend, split_nonfinite

NEG_INF = float("-inf")

# Tile sizes, measured on 2 cores (fp32, H=8, D=64, causal + softcap 30, N=4096; eager 2.69 s):
# 256x256 0.236 s, 128x256 0.232 s, 256x512 0.270 s, 128x512 0.285 s, 512x512 0.376 s, 256x1024 0.351 s.
# 256x256 keeps the Python loop small while causal skipping still drops ~47% of the tiles.
BLOCK_Q = 256
BLOCK_K = 256


@dataclass(frozen=True, eq=False)
class _Plan:
    """Everything static about one call (shapes, variant, tiling)."""

    mask: Mask | None
    mods: tuple[ScoreMod, ...]
    similarity: str
    scale: float
    dropout_p: float
    seed: int
    ctx: MaskContext
    Hkv: int
    G: int
    D: int
    Dv: int
    cd: torch.dtype
    bq: int
    bk: int
    # q, k or v hold NaN/inf and some score may be masked: run on their finite parts and mark bad rows,
    # so masked-out garbage contributes exactly nothing (0 · NaN would be NaN), forward and backward.
    split: bool = False

    def rows(self):
        """(qi, q0, q1, [(ki, k0, k1, kind), ...]) per query block, EMPTY tiles left out."""
        Sq, Sk = self.ctx.Sq, self.ctx.Sk
        for qi, q0 in enumerate(range(0, Sq, self.bq)):
            q1 = min(q0 + self.bq, Sq)
            row = []
            for ki, k0 in enumerate(range(0, Sk, self.bk)):
                k1 = min(k0 + self.bk, Sk)
                kind = Tile.FULL if self.mask is None else self.mask.classify(q0, q1, k0, k1, self.ctx)
                if kind is not Tile.EMPTY:
                    row.append((ki, k0, k1, kind))
            yield qi, q0, q1, row

    def scores(
        self, qf: Tensor, kf: Tensor, q0: int, q1: int, k0: int, k1: int, kind: Tile, bad: _Bad | None
    ) -> Tensor:
        """Modified, masked scores of one tile, (B, Hq, bq, bk) in the compute dtype."""
        B, Hq = self.ctx.B, self.ctx.Hq
        bq, bk = q1 - q0, k1 - k0
        qb = qf[:, :, :, q0:q1].reshape(B, self.Hkv, self.G * bq, self.D)  # (B, Hkv, G*bq, D)
        kb = kf[:, :, k0:k1]  # (B, Hkv, bk, D)
        if self.similarity == "cosine":
            qb, kb = F.normalize(qb, dim=-1), F.normalize(kb, dim=-1)
        s = qb @ kb.transpose(-1, -2)  # (B, Hkv, G*bq, bk)
        if self.similarity == "euclidean":  # -|q - k|^2 = 2 q.k - |q|^2 - |k|^2
            # x * x, not x.square(): its backward is grad * x, so a masked-out huge key gives 0 * x = 0
            # instead of 0 * (2x overflowed to inf) = NaN
            s = 2 * s - (qb * qb).sum(-1, keepdim=True) - (kb * kb).sum(-1).unsqueeze(-2)
        s = (s * self.scale).view(B, Hq, bq, bk)
        if self.mods or kind is Tile.PARTIAL:
            b, h, i, j = tile_indices(self.ctx, q0, q1, k0, k1)
            for mod in self.mods:
                s = mod(s, b, h, i, j, self.ctx).to(self.cd)
            if kind is Tile.PARTIAL:
                assert self.mask is not None
                s = torch.where(self.mask.keep(b, h, i, j, self.ctx), s, NEG_INF)
        if bad is not None:  # a kept score of a bad q row or k row is NaN; masked ones stay -inf
            marked = bad.q[:, :, q0:q1, None] | bad.k[:, :, None, k0:k1]  # (B, Hq, bq, bk)
            s = torch.where(marked & (s > NEG_INF), float("nan"), s)
        return s

    def dropout_keep(self, qi: int, ki: int, shape: torch.Size, device: torch.device) -> Tensor:
        """The tile's dropout keep-mask, regenerated identically in the backward from (seed, tile)."""
        gen = torch.Generator(device=device).manual_seed(self.seed + 1_000_003 * qi + ki)
        return torch.rand(shape, generator=gen, device=device) >= self.dropout_p


@dataclass(frozen=True)
class _Bad:
    """Rows holding NaN/inf: q (B, Hq, Sq), k and v (B, Hq, Sk) (kv rows repeated over each group)."""

    q: Tensor
    k: Tensor
    v: Tensor


def _pv(p: Tensor, vb: Tensor, B: int, Hkv: int) -> Tensor:
    """(B, Hq, bq, bk) probabilities @ (B, Hkv, bk, Dv) values -> (B, Hq, bq, Dv), GQA folded."""
    Hq, bq, bk = p.shape[1], p.shape[2], p.shape[3]
    out = p.reshape(B, Hkv, (Hq // Hkv) * bq, bk) @ vb  # (B, Hkv, G*bq, Dv)
    return out.view(B, Hq, bq, vb.shape[-1])


def _forward(
    plan: _Plan, qf: Tensor, kf: Tensor, vf: Tensor, bad: _Bad | None
) -> tuple[Tensor, Tensor, Tensor]:
    """out (B, Hq, Sq, Dv), row max m and normalizer norm = sum exp(s - m), both (B, Hq, Sq) in the compute dtype.

    m and norm are kept apart rather than as one LSE: next to a huge row max (a float32-min bias row) the
    LSE cannot hold log(norm), and the backward's P = exp(s - m) / norm would be off by up to a factor Sk.
    """
    B, Hq, Sq = plan.ctx.B, plan.ctx.Hq, plan.ctx.Sq
    out = qf.new_zeros(B, Hq, Sq, plan.Dv)  # rows with no visible key stay 0 ...
    m_all = qf.new_full((B, Hq, Sq), NEG_INF)  # ... with m = -inf and norm = 0
    l_all = qf.new_zeros(B, Hq, Sq)
    for qi, q0, q1, row in plan.rows():
        m = qf.new_full((B, Hq, q1 - q0), NEG_INF)  # running max
        denom = qf.new_zeros(B, Hq, q1 - q0)  # running sum of exp(s - m)
        acc = qf.new_zeros(B, Hq, q1 - q0, plan.Dv)  # running sum of exp(s - m) v
        nan_rows = None
        for ki, k0, k1, kind in row:
            s = plan.scores(qf, kf, q0, q1, k0, k1, kind, bad)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(m_new == NEG_INF, 0.0, m_new)  # all keys so far masked: exp() -> 0, not NaN
            alpha = torch.exp(m - m_safe)
            p = torch.exp(s - m_safe.unsqueeze(-1))
            denom = denom * alpha + p.sum(-1)
            if plan.dropout_p:
                p = p * plan.dropout_keep(qi, ki, p.shape, p.device) / (1 - plan.dropout_p)
            acc = acc * alpha.unsqueeze(-1) + _pv(p, vf[:, :, k0:k1], B, plan.Hkv)
            m = m_new
            if bad is not None:  # rows that keep a bad value row are NaN
                hit = ((s > NEG_INF) & bad.v[:, :, None, k0:k1]).any(-1)  # (B, Hq, bq)
                nan_rows = hit if nan_rows is None else nan_rows | hit
        empty = denom == 0
        o = acc / torch.where(empty, 1.0, denom).unsqueeze(-1)
        out[:, :, q0:q1] = o if nan_rows is None else o.masked_fill(nan_rows.unsqueeze(-1), float("nan"))
        m_all[:, :, q0:q1] = m
        l_all[:, :, q0:q1] = denom
    return out, m_all, l_all


def _add_sinks(out: Tensor, m: Tensor, norm: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fold per-head sink logits (Hq,) into (out, m, norm) as one more softmax column with no value."""
    sink = sinks.to(m.dtype).view(1, -1, 1)
    m2 = torch.maximum(m, sink)  # finite: the sink is
    scaled = norm * torch.exp(m - m2)  # exp(-inf) = 0 for rows with no key
    l2 = scaled + torch.exp(sink - m2)
    return out * (scaled / l2).unsqueeze(-1).to(out.dtype), m2, l2


def _backward(
    plan: _Plan,
    tensors: list[Tensor],
    out: Tensor,
    m: Tensor,
    norm: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    sinks: Tensor | None,
    bad: _Bad | None,
) -> list[Tensor | None]:
    qf, kf, vf, *mod_tensors = tensors
    B = plan.ctx.B
    delta = (dout * out).sum(-1)  # (B, Hq, Sq): rowsum(dO ∘ O) = rowsum(P ∘ dP)
    if dlse is not None:
        delta = delta - dlse  # d lse / d s = P: folds into the same softmax-backward formula
    # P = exp(s - m) / norm: the same rounding as a plain softmax, however large the row max is.
    m_safe = torch.where(m == NEG_INF, 0.0, m)  # rows with no key: s = -inf, exp() = 0
    inv = torch.where(norm == 0, 0.0, 1.0 / torch.where(norm == 0, 1.0, norm))
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    dmods = [torch.zeros_like(t, dtype=plan.cd) for t in mod_tensors]
    tiles = [(qi, q0, q1, *t) for qi, q0, q1, row in plan.rows() for t in row]
    for qi, q0, q1, ki, k0, k1, kind in tiles:
        with torch.enable_grad():  # local autograd through similarity, modifiers and mask of one tile
            qt = qf.detach().requires_grad_(True)
            kt = kf.detach().requires_grad_(True)
            s = plan.scores(qt, kt, q0, q1, k0, k1, kind, bad)
            p = torch.exp(s.detach() - m_safe[:, :, q0:q1, None]) * inv[:, :, q0:q1, None]  # (B, Hq, bq, bk)
            live = s.detach() > NEG_INF if bad is not None else None
            if live is not None:  # a bad row's NaN must not reach the scores it masks
                p = p.masked_fill(~live, 0.0)
            do = dout[:, :, q0:q1]  # (B, Hq, bq, Dv)
            vb = vf[:, :, k0:k1]
            p_used = p
            dp = (do.reshape(B, plan.Hkv, plan.G * (q1 - q0), plan.Dv) @ vb.transpose(-1, -2)).view_as(p)
            if plan.dropout_p:
                keep = plan.dropout_keep(qi, ki, p.shape, p.device) / (1 - plan.dropout_p)
                p_used, dp = p * keep, dp * keep
            # dv += P_usedᵀ dO, folded over the G heads of each kv head
            dv[:, :, k0:k1] += p_used.reshape(B, plan.Hkv, -1, k1 - k0).transpose(-1, -2) @ do.reshape(
                B, plan.Hkv, -1, plan.Dv
            )
            ds = p * (dp - delta[:, :, q0:q1].unsqueeze(-1))
            if live is not None:
                ds = ds.masked_fill(~live, 0.0)
            wrt = [qt, kt, *(t for t in mod_tensors if t.requires_grad)]
            grads = iter(torch.autograd.grad(s, wrt, ds, allow_unused=True))
        for acc, t in zip([dq, dk, *dmods], [qt, kt, *mod_tensors]):
            g = next(grads) if t.requires_grad else None
            if g is not None:
                acc += g
    dsinks = None
    if sinks is not None:  # the sink's own softmax weight, from the kept (m, norm)
        p_sink = torch.exp(sinks.to(m.dtype).view(1, -1, 1) - m_safe) * inv
        dsinks = sinks_grad(p_sink, delta)
    return [dq, dk, dv, dsinks, *dmods]


class _BlockwiseFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, plan: _Plan, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, *mod_tensors: Tensor
    ):
        B, _, Sq, D = q.shape
        qf = q.to(plan.cd).view(B, plan.Hkv, plan.G, Sq, D)  # (B, Hkv, G, Sq, D): GQA folded, no copy
        kf, vf = k.to(plan.cd), v.to(plan.cd)
        bad = None
        if plan.split:
            (qf, qbad), (kf, kbad), (vf, vbad) = (split_nonfinite(t) for t in (qf, kf, vf))
            rep = functools.partial(
                torch.repeat_interleave, repeats=plan.G, dim=1
            )  # (B, Hkv, S) -> (B, Hq, S)
            bad = _Bad(qbad.view(B, -1, Sq), rep(kbad), rep(vbad))
        out, m, norm = _forward(plan, qf, kf, vf, bad)
        if sinks is not None:
            out, m, norm = _add_sinks(out, m, norm, sinks)
        lse = torch.where(norm == 0, NEG_INF, m.double() + torch.log(norm.double())).to(plan.cd)
        ctx.plan, ctx.in_dtypes, ctx.bad = plan, (q.dtype, k.dtype, v.dtype), bad
        ctx.has_sinks = sinks is not None
        ctx.save_for_backward(qf, kf, vf, out, m, norm, sinks if sinks is not None else out.new_empty(0))
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        qf, kf, vf, out, m, norm, sinks = ctx.saved_tensors
        plan: _Plan = ctx.plan
        mod_tensors = grad_tensors(plan.mods)  # the modifiers' own tensors: the local graph reaches them
        if dout is None:
            dout = torch.zeros_like(out)
        with torch.autocast(out.device.type, enabled=False):  # a backward called under autocast
            dq, dk, dv, dsinks, *dmods = _backward(
                plan,
                [qf, kf, vf, *mod_tensors],
                out,
                m,
                norm,
                dout.to(plan.cd),
                None if dlse is None else dlse.to(plan.cd),
                sinks if ctx.has_sinks else None,
                ctx.bad,
            )
        qd, kd, vd = ctx.in_dtypes
        B, _, _, Sq, D = qf.shape
        dq = dq.view(B, -1, Sq, D).to(qd)
        dmods = [g.to(t.dtype) if t.requires_grad else None for g, t in zip(dmods, mod_tensors)]
        return (None, dq, dk.to(kd), dv.to(vd), None if dsinks is None else dsinks.to(sinks.dtype), *dmods)


class BlockwiseBackend(Backend):
    """FlashAttention-2 in PyTorch: O(N) memory, tile skipping, every variant, recompute backward."""

    name: ClassVar[str] = "blockwise"
    description: ClassVar[str] = (
        "FlashAttention-2 in PyTorch (online softmax, O(N) memory, recompute backward)"
    )
    device_types: ClassVar[frozenset[str] | None] = None  # plain torch ops

    def rank(self, inputs: AttentionInputs) -> float:
        return 20.0  # behind torch's fused kernel where that runs natively; ahead of materialized masks

    def plan(self, inputs: AttentionInputs) -> str:
        p = _make_plan(inputs)
        n_tiles = math.ceil(inputs.Sq / p.bq) * math.ceil(inputs.Sk / p.bk)
        kept = sum(len(row) for *_, row in p.rows())
        return f"{self.description}; {p.bq}x{p.bk} tiles, {kept}/{n_tiles} computed (the rest are masked out)"

    def forward(self, inputs: AttentionInputs) -> tuple[Tensor, Tensor | None]:
        # The dropout seed is drawn here, not in _make_plan: explain() plans too and must not move the RNG.
        seed = (
            int(torch.randint(0, 2**62, (1,)).item()) if inputs.dropout_p else 0
        )  # follows torch.manual_seed
        plan = _make_plan(inputs, seed)
        out, lse = _BlockwiseFn.apply(
            plan, inputs.q, inputs.k, inputs.v, inputs.sinks, *grad_tensors(inputs.mods)
        )
        return out, lse if inputs.return_lse else None


def _make_plan(inputs: AttentionInputs, seed: int = 0) -> _Plan:
    cd = acc_dtype(inputs.dtype)
    G = inputs.Hq // inputs.Hkv
    bq = min(max(32, BLOCK_Q // G), inputs.Sq)  # a tile holds G*bq folded query rows
    return _Plan(
        inputs.mask,
        inputs.mods,
        inputs.similarity,
        inputs.scale,
        inputs.dropout_p,
        seed,
        inputs.ctx,
        inputs.Hkv,
        G,
        inputs.D,
        inputs.Dv,
        cd,
        bq,
        min(BLOCK_K, inputs.Sk),
        inputs.may_mask and inputs.nonfinite,
    )
