"""Masks and score modifiers written in global positions, restated for one local piece of the problem.

A piece is queries [qa, qa + Sq), keys [ka, ka + Sk) and query heads [h0, h0 + Hq) of the global
problem ``g`` (B, Hq_g, N, N). Local index i stands for global qa + i (j for ka + j, h for h0 + h).
Where a native descriptor says exactly the same thing locally (a causal diagonal block, a window's
neighbour block, documents with clipped boundaries, clamped padding lengths, a sliced tensor, ALiBi
with a shift), that descriptor is used, so the local call keeps its fast path; anything else is
wrapped (``Shifted``), which evaluates the global rule on shifted indices and delegates tile
classification, so it is still exact and still skips what the global mask skips.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import masks as M
from .. import mods as Mods


@dataclass(frozen=True)
class Piece:
    """Where a local problem sits in the global one."""

    qa: int
    ka: int
    h0: int
    g: M.MaskContext  # the global problem


@dataclass(frozen=True, eq=False)
class Shifted(M.Mask):
    """The global mask `inner`, seen from a piece: keep(b, h, i, j) = inner.keep(b, h + h0, i + qa, j + ka)."""

    inner: M.Mask
    at: Piece
    Sk: int

    @property
    def translation_invariant(self) -> bool:  # type: ignore[override]
        return self.inner.translation_invariant  # a shift keeps "depends on i - j alone"

    @property
    def key_only(self) -> bool:  # type: ignore[override]
        return self.inner.key_only

    def keep(self, b, h, i, j, ctx):
        a = self.at
        return self.inner.keep(b, h + a.h0, i + a.qa, j + a.ka, a.g)

    def classify(self, q0, q1, k0, k1, ctx):
        a = self.at
        return self.inner.classify(q0 + a.qa, q1 + a.qa, k0 + a.ka, k1 + a.ka, a.g)

    def _back(self, lo: int, hi: int) -> tuple[int, int]:
        lo, hi = max(lo - self.at.ka, 0), min(hi - self.at.ka, self.Sk)
        return (lo, hi) if lo < hi else (0, 0)

    def key_range(self, q0, q1, ctx):
        return self._back(*self.inner.key_range(q0 + self.at.qa, q1 + self.at.qa, self.at.g))

    def full_key_range(self, ctx):
        return self._back(*self.inner.full_key_range(self.at.g))  # kept by every query: by ours too

    def __repr__(self) -> str:
        return f"{self.inner!r}@(q+{self.at.qa}, k+{self.at.ka}, h+{self.at.h0})"


def _offset_of(mask: M.Mask, at: Piece) -> int:
    """c such that the global aligned position of local query i, seen from local keys, is i + c."""
    return at.qa + at.g.offset(mask.align) - at.ka  # type: ignore[attr-defined]


def _slice4(t: Tensor, at: Piece, Sq: int, Sk: int, Hq: int) -> Tensor:
    """A tensor broadcastable to the global (B, Hq, N, N), cut to the piece (broadcast dims stay)."""
    t4 = M.as_4d(t)
    spans = [(None, None), (at.h0, Hq), (at.qa, Sq), (at.ka, Sk)]
    for dim, (start, n) in enumerate(spans):
        if start is not None and t4.shape[dim] != 1:
            t4 = t4.narrow(dim, start, n)
    return t4


def local_mask(mask: M.Mask | None, at: Piece, Sq: int, Sk: int, Hq: int) -> M.Mask | None:
    """`mask` (global positions) for the piece of Sq queries, Sk keys and Hq heads at `at`."""
    if mask is None:
        return None
    if isinstance(mask, (M.And, M.Or)):
        a, b = local_mask(mask.a, at, Sq, Sk, Hq), local_mask(mask.b, at, Sq, Sk, Hq)
        assert a is not None and b is not None
        return type(mask)(a, b)
    if isinstance(mask, M.causal):
        c = _offset_of(mask, at)  # keep j <= i + c
        if c == Sk - Sq:
            return M.causal()
        if c == 0:
            return M.causal(align="top_left")
        if c > 0:  # a band with no left edge inside the piece
            return M.sliding_window(Sq + Sk, c, align="top_left")
        return Shifted(mask, at, Sk)
    if isinstance(mask, M.sliding_window):
        c = _offset_of(mask, at)  # keep i + c - left <= j <= i + c + right
        if c == Sk - Sq:
            return M.sliding_window(mask.left, mask.right)
        if mask.left - c >= 0 and mask.right + c >= 0:
            return M.sliding_window(mask.left - c, mask.right + c, align="top_left")
        return Shifted(mask, at, Sk)
    if isinstance(mask, M.prefix_lm):
        c, prefix = _offset_of(mask, at), mask.prefix_len - at.ka  # keep j < prefix or j <= i + c
        if prefix <= 0:
            return local_mask(M.causal(mask.align), at, Sq, Sk, Hq)
        if c == Sk - Sq:
            return M.prefix_lm(prefix)
        if c == 0:
            return M.prefix_lm(prefix, align="top_left")
        return Shifted(mask, at, Sk)
    if isinstance(mask, M.padding):
        return M.padding((mask.kv_lengths - at.ka).clamp(0, Sk))
    if isinstance(mask, M.left_padding):
        return M.left_padding((mask.pad_lengths - at.ka).clamp(0, Sk))
    if isinstance(mask, M.document):
        cq = [min(max(x - at.qa, 0), Sq) for x in mask._cu_seqlens]
        ck = [min(max(x - at.ka, 0), Sk) for x in mask._cu_k]
        return M.document(cq, cu_seqlens_k=ck)
    if isinstance(mask, M.dense):
        return M.dense(_slice4(mask.mask, at, Sq, Sk, Hq))
    return Shifted(mask, at, Sk)  # custom, document_causal, cache_causal, user subclasses


@dataclass(frozen=True, eq=False)
class ShiftedMod(Mods.custom):
    """A global score modifier seen from a piece (its `fn` is only for display)."""

    inner: Mods.ScoreMod = None  # type: ignore[assignment]
    at: Piece = None  # type: ignore[assignment]

    def __call__(self, score, b, h, i, j, ctx):
        a = self.at
        return self.inner(score, b, h + a.h0, i + a.qa, j + a.ka, a.g)

    def check(self, ctx):
        return []  # checked once, on the global problem

    def __repr__(self) -> str:
        return f"{self.inner!r}@(q+{self.at.qa}, k+{self.at.ka}, h+{self.at.h0})"


def local_mods(mods: tuple[Mods.ScoreMod, ...], at: Piece, Sq: int, Sk: int, Hq: int) -> list[Mods.ScoreMod]:
    out: list[Mods.ScoreMod] = []
    for m in mods:
        if isinstance(m, Mods.softcap):
            out.append(m)
        elif isinstance(m, Mods.alibi):
            slopes = m.slopes.narrow(0, at.h0, Hq)
            out.append(Mods.alibi(slopes, align="top_left", shift=_offset_of(m, at) + m.shift))
        elif isinstance(m, Mods.bias):
            out.append(Mods.bias(_slice4(m.bias, at, Sq, Sk, Hq)))
        else:
            out.append(ShiftedMod(fn=getattr(m, "fn", m), inner=m, at=at))
    return out


def head_slice(t: Tensor | None, h0: int, n: int) -> Tensor | None:
    return None if t is None else t.narrow(0, h0, n)
