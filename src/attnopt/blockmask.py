"""attnopt masks lowered analytically to FlexAttention block metadata (no mask evaluation over N²).

Every structured descriptor keeps, for each query row, the keys of at most a few intervals: causal
``[0, p]``, a window ``[p - left, p + right]``, a document ``[start, end)``, padding ``[0, len_b)``...
``row_intervals`` states them as (Bm, m, Sq) ``lo``/``hi`` tensors (Bm = 1, or B for per-batch masks;
``&`` intersects, ``|`` unions), O(Sq·m) memory. From them:

* the **block classes** (EMPTY / PARTIAL / FULL, the tile classification of masks.py at Flex's block
  granularity) come out exactly: a band of monotone rows (every descriptor but packed documents with a
  gap, and rows that keep nothing) in O(blocks kept) with a few searchsorted calls; anything else in
  O(Sq·m + nQ·nK) with difference arrays over the block grid;
* the in-tile predicate is one generic ``mask_mod``: ``lo[b, i, c] <= j < hi[b, i, c]`` for some c, so
  one compiled kernel serves every interval mask at every length.

``dense`` and ``custom`` masks (and descriptors this module does not know) are the fallback: their blocks
are classified by evaluating the mask, as ``create_block_mask`` does, and the mask itself is the
``mask_mod``. A FULL block is one whose every (row, key) is kept over the whole Flex block: as with
``create_block_mask``, a block cut short by the end of the sequence is at most PARTIAL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import masks as M
from ._torch_fixes import fix_flex_cpu_template_renaming

__all__ = ["Lowered", "block_mask", "interval_columns", "interval_mask_mod", "lower", "row_intervals"]

BLOCK = 128  # FlexAttention's default sparse block (_DEFAULT_SPARSE_BLOCK_SIZE)


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# Row intervals: (lo, hi) int64 (Bm, m, Sq); row i of batch b keeps the keys of [lo, hi) of some column c
# (rows along the last dim: the elementwise passes over them stay contiguous).


def _positions(ctx: M.MaskContext, align: str) -> Tensor:
    return torch.arange(ctx.Sq, device=ctx.device) + ctx.offset(align)


def _rows(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Shape (Bm, 1, Sq | 1) from (Sq,) or (Bm, Sq) / (Bm, 1) tensors, broadcast against each other."""
    lo, hi = torch.broadcast_tensors(lo, hi)
    while lo.ndim < 2:
        lo, hi = lo[None], hi[None]
    return lo[:, None], hi[:, None]


def _lengths(t: Tensor, ctx: M.MaskContext) -> Tensor:
    return t.to(device=ctx.device, dtype=torch.long).view(-1, 1)


def _cu(t: Tensor, ctx: M.MaskContext) -> Tensor:
    return t.to(device=ctx.device, dtype=torch.long)


def _causal(m: M.causal, ctx):
    p = _positions(ctx, m.align)
    return _rows(torch.zeros_like(p), p + 1)


def _window(m: M.sliding_window, ctx):
    p = _positions(ctx, m.align)
    return _rows(p - m.left, p + m.right + 1)


def _prefix(m: M.prefix_lm, ctx):
    p = _positions(ctx, m.align)
    return _rows(torch.zeros_like(p), torch.clamp(p + 1, min=m.prefix_len))


def _padding(m: M.padding, ctx):
    n = _lengths(m.kv_lengths, ctx)
    return _rows(torch.zeros_like(n), n)


def _left_padding(m: M.left_padding, ctx):
    n = _lengths(m.pad_lengths, ctx)
    return _rows(n, torch.full_like(n, ctx.Sk))


def _cache_causal(m: M.cache_causal, ctx):
    p = _lengths(m.kv_lengths, ctx) - ctx.Sq + torch.arange(ctx.Sq, device=ctx.device)  # (B, Sq)
    lo = torch.zeros_like(p) if m.left is None else p - m.left
    return _rows(lo, p + 1)


def _document(m: M.document, ctx):
    cq = _cu(m.cu_seqlens, ctx)
    ck = cq if m.cu_seqlens_k is None else _cu(m.cu_seqlens_k, ctx)
    # keep() gives query i the document d = #(cu_q <= i) and key j the same count over cu_k: equal iff
    # cu_k[d - 1] <= j < cu_k[d] (cu_k[d] past its end: no upper bound)
    d = torch.searchsorted(cq, torch.arange(ctx.Sq, device=ctx.device), right=True)
    ck_ext = torch.cat([ck, ck.new_tensor([max(ctx.Sk, int(ck[-1]) if ck.numel() else 0) + 1])])
    return _rows(ck_ext[d - 1], ck_ext[d])


def _document_causal(m: M.document_causal, ctx):
    cq, ck = _cu(m.cu_seqlens_q, ctx), _cu(m.cu_seqlens_k, ctx)
    i = torch.arange(ctx.Sq, device=ctx.device)
    d = (torch.searchsorted(cq, i, right=True) - 1).clamp(0, cq.numel() - 2)
    return _rows(ck[d], i + ck[d + 1] - cq[d + 1] + 1)


def _and(m: M.And, ctx):
    a, b = row_intervals(m.a, ctx), row_intervals(m.b, ctx)
    if a is None or b is None:
        return None
    (la, ha), (lb, hb) = a, b
    lo = torch.maximum(la[:, :, None], lb[:, None])  # every pair of columns
    hi = torch.minimum(ha[:, :, None], hb[:, None])
    return _normalize(lo.flatten(1, 2), hi.flatten(1, 2))


def _or(m: M.Or, ctx):
    a, b = row_intervals(m.a, ctx), row_intervals(m.b, ctx)
    if a is None or b is None:
        return None
    (la, ha), (lb, hb) = torch.broadcast_tensors(*a), torch.broadcast_tensors(*b)
    B, S = max(la.shape[0], lb.shape[0]), max(la.shape[2], lb.shape[2])
    la, ha = la.expand(B, la.shape[1], S), ha.expand(B, ha.shape[1], S)
    lb, hb = lb.expand(B, lb.shape[1], S), hb.expand(B, hb.shape[1], S)
    return _normalize(torch.cat([la, lb], 1), torch.cat([ha, hb], 1))


_INTERVALS: dict[type, Callable] = {
    M.causal: _causal,
    M.sliding_window: _window,
    M.prefix_lm: _prefix,
    M.padding: _padding,
    M.left_padding: _left_padding,
    M.cache_causal: _cache_causal,
    M.document: _document,
    M.document_causal: _document_causal,
    M.And: _and,
    M.Or: _or,
}


def _normalize(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Merge each row's overlapping or touching columns; empty ones become [0, 0).

    After this, a row's non-empty intervals are disjoint and not adjacent, so a key block is covered by
    the row iff one interval covers it.
    """
    if lo.shape[1] == 1:
        return lo, hi
    lo, hi = lo.transpose(1, 2), hi.transpose(1, 2)  # columns last, for the sort and the scans
    big = torch.iinfo(torch.long).max
    empty = lo >= hi
    lo, hi = torch.where(empty, big, lo), torch.where(empty, big, hi)  # empties sort last
    lo, order = torch.sort(lo, dim=-1, stable=True)
    hi = hi.gather(-1, order)
    run_end = torch.cummax(hi, dim=-1).values  # the end of the run a sorted column belongs to, so far
    live = lo != big
    start = live.clone()
    start[..., 1:] &= lo[..., 1:] > run_end[..., :-1]  # a column that begins after the run: a new run
    last = live.clone()
    last[..., :-1] &= start[..., 1:] | ~live[..., 1:]  # the last column of its run holds the merged run
    run_lo = torch.cummax(torch.where(start, lo, -1), dim=-1).values  # lo is sorted: the run's first lo
    return torch.where(last, run_lo, 0).transpose(1, 2), torch.where(last, run_end, 0).transpose(1, 2)


def row_intervals(mask: M.Mask, ctx: M.MaskContext) -> tuple[Tensor, Tensor] | None:
    """(lo, hi) int64 (Bm, m, Sq) with keys [lo, hi) kept by each row, clipped to [0, Sk] (a row that
    keeps nothing has hi == lo); None when the
    mask is not made of interval descriptors (dense, custom, or a Mask subclass unknown here)."""
    fn = _INTERVALS.get(type(mask))
    if fn is None:
        return None
    out = fn(mask, ctx)
    if out is None:
        return None
    lo, hi = torch.broadcast_tensors(*out)
    shape = (lo.shape[0], lo.shape[1], ctx.Sq)
    lo = lo.expand(shape).clamp(0, ctx.Sk)
    return lo, torch.maximum(hi.expand(shape).clamp(max=ctx.Sk), lo)  # an empty row: hi == lo


# ---------------------------------------------------------------------------------------------------
# Block metadata: FlexAttention's BCSR rows over blocks (kv_*: per query block, q_*: per key block).


@dataclass(frozen=True)
class Lowered:
    """A mask at Flex's block granularity: every tensor of a ``BlockMask``, and the in-tile predicate.

    ``kv_num_blocks`` (Bm, Hm, nQ) int32 counts the PARTIAL key blocks of each query block, listed first
    in ``kv_indices`` (Bm, Hm, nQ, nK) in increasing order (entries past the count are any valid index);
    ``full_kv_*`` the same for FULL blocks; ``q_*`` / ``full_q_*`` the transpose (backward). ``lo``/``hi``
    are the row intervals the generic ``mask_mod`` reads (None for a fallback mask: ``keep`` is used).
    """

    Sq: int
    Sk: int
    block: tuple[int, int]
    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    q_num_blocks: Tensor
    q_indices: Tensor
    full_q_num_blocks: Tensor
    full_q_indices: Tensor
    lo: Tensor | None
    hi: Tensor | None
    mask: M.Mask | None
    ctx: M.MaskContext
    path: str  # "band", "intervals" or "evaluated": how the blocks were classified

    def mask_mod(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of this mask."""
        if self.lo is not None:
            return interval_mask_mod(*interval_columns(self.lo, self.hi), row_stride(self.lo))
        assert self.mask is not None
        mask, ctx = self.mask, self.ctx
        if isinstance(mask, M.dense):
            t = M.as_4d(mask.mask).expand(ctx.B, ctx.Hq, ctx.Sq, ctx.Sk)
            return lambda b, h, q_idx, kv_idx: t[b, h, q_idx, kv_idx]
        if isinstance(mask, M.custom):
            return mask.fn
        return lambda b, h, q_idx, kv_idx: mask.keep(b, h, q_idx, kv_idx, ctx)

    def block_mask(self):
        """A ``torch.nn.attention.flex_attention.BlockMask`` (its kernels and helpers accept it)."""
        from torch.nn.attention.flex_attention import BlockMask

        return BlockMask(
            seq_lengths=(self.Sq, self.Sk),
            kv_num_blocks=self.kv_num_blocks,
            kv_indices=self.kv_indices,
            full_kv_num_blocks=self.full_kv_num_blocks,
            full_kv_indices=self.full_kv_indices,
            q_num_blocks=self.q_num_blocks,
            q_indices=self.q_indices,
            full_q_num_blocks=self.full_q_num_blocks,
            full_q_indices=self.full_q_indices,
            BLOCK_SIZE=self.block,
            mask_mod=self.mask_mod(),
        )

    def classes(self) -> Tensor:
        """(Bm, Hm, nQ, nK) int8: 0 EMPTY, 1 PARTIAL, 2 FULL (dense; for tests and pictures)."""
        nK = self.kv_indices.shape[-1]
        out = torch.zeros(
            (*self.kv_indices.shape[:-1], nK + 1), dtype=torch.int8, device=self.kv_indices.device
        )
        for nums, idx, val in (
            (self.kv_num_blocks, self.kv_indices, 1),
            (self.full_kv_num_blocks, self.full_kv_indices, 2),
        ):
            valid = torch.arange(nK, device=idx.device) < nums[..., None]
            out.scatter_(-1, torch.where(valid, idx.long(), nK), val)
        return out[..., :nK]


def interval_columns(lo: Tensor, hi: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """lo/hi (Bm, m, Sq) as m contiguous 1-D tables each, of Bm·Sq entries (row b·Sq + i): what the
    generic mask_mod indexes with scalars."""
    los = tuple(lo[:, c].reshape(-1).contiguous() for c in range(lo.shape[1]))
    his = tuple(hi[:, c].reshape(-1).contiguous() for c in range(hi.shape[1]))
    return los, his


def row_stride(lo: Tensor) -> Tensor:
    """The ``stride`` interval_mask_mod needs for row tables lo (Bm, m, Sq): 0 when Bm = 1 (every batch
    element reads row i), Sq otherwise; a 0-d tensor, so a compiled kernel does not specialize on it."""
    return torch.tensor(0 if lo.shape[0] == 1 else lo.shape[2], device=lo.device)


def interval_mask_mod(
    los: tuple[Tensor, ...], his: tuple[Tensor, ...], stride: Tensor
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """``mask_mod`` keeping kv_idx in [lo, hi) of some column of row (b, q_idx) (see interval_columns).

    ``stride``: a 0-d int64 tensor: batch element b's rows start at b·stride (0: shared rows).
    """
    fix_flex_cpu_template_renaming()  # a table read in a mask_mod trips torch 2.13's CPU template

    def mask_mod(b, h, q_idx, kv_idx):
        row = b * stride + q_idx
        keep = None
        for lc, hc in zip(los, his):
            one = (kv_idx >= lc[row]) & (kv_idx < hc[row])
            keep = one if keep is None else keep | one
        return keep

    return mask_mod


def _ordered(x: Tensor) -> tuple[Tensor, Tensor]:
    """Bool (..., rows, cols) -> (count (..., rows) int32, column indices of the True entries first, in
    increasing order; the rest 0) (..., rows, cols) int32. O(rows·cols), no sort."""
    cols = x.shape[-1]
    num = x.sum(-1, dtype=torch.int32)
    pos = torch.where(x, x.cumsum(-1, dtype=torch.int32) - 1, cols)  # a spare column takes the rest
    idx = torch.zeros((*x.shape[:-1], cols + 1), dtype=torch.int32, device=x.device)
    src = torch.arange(cols, dtype=torch.int32, device=x.device).expand(x.shape)
    idx.scatter_(-1, pos.long(), src)
    return num, idx[..., :cols].contiguous()


def _classes_by_intervals(lo, hi, Sq, Sk, bq, bk) -> tuple[Tensor, Tensor]:
    """(partial, full) bool (Bm, nQ, nK) from row intervals: per block, how many rows touch / cover it
    (difference arrays along the key blocks, one scatter-add per interval end)."""
    Bm, m, _ = lo.shape
    nQ, nK = _cdiv(Sq, bq), _cdiv(Sk, bk)
    dev = lo.device
    row_block = (torch.arange(Sq, device=dev) // bq).view(1, 1, Sq)
    base = (torch.arange(Bm, device=dev).view(Bm, 1, 1) * nQ + row_block) * (nK + 1)

    def count(start: Tensor, end: Tensor) -> Tensor:
        ok = start < end
        diff = torch.zeros(Bm * nQ * (nK + 1), dtype=torch.int32, device=dev)
        one = ok.to(torch.int32).expand(Bm, m, Sq).reshape(-1)
        diff.index_add_(0, (base + torch.where(ok, start, 0)).expand(Bm, m, Sq).reshape(-1), one)
        diff.index_add_(0, (base + torch.where(ok, end, 0)).expand(Bm, m, Sq).reshape(-1), -one)
        return diff.view(Bm, nQ, nK + 1).cumsum(-1, dtype=torch.int32)[..., :nK]

    live = lo < hi
    touch = count(torch.where(live, lo // bk, 0), torch.where(live, (hi - 1) // bk + 1, 0))
    cover = count(_cdiv(lo, bk), hi // bk)  # blocks whose every key lies in [lo, hi)
    full = cover == bq  # a block of fewer rows (the tail) is never FULL, as with create_block_mask
    return (touch > 0) & ~full, full


# Leaves whose rows are a band by construction (both ends non-decreasing, consecutive rows touching, the
# width shrinking only where the clipping to [0, Sk) cuts a run of rows at either end): a row keeps
# nothing only at the first or the last row, so checking those two is enough.
_BAND_LEAVES = (M.causal, M.sliding_window, M.prefix_lm, M.padding, M.left_padding)


def _band(
    lo: Tensor,
    hi: Tensor,
    Sq: int,
    Sk: int,
    bq: int,
    bk: int,
    by_construction: bool = False,
    for_kernel: bool = False,
) -> tuple[Tensor, ...] | None:
    """The 8 metadata tensors straight from a band (every row keeps one non-empty interval, both ends
    non-decreasing down the rows, consecutive rows' intervals overlapping or touching); None otherwise.
    Cost O(blocks kept), plus O(Sq) for the checks (see _band_tables)."""
    if lo.shape[1] != 1:
        return None
    lo, hi = lo[:, 0], hi[:, 0]  # (Bm, Sq)
    if by_construction:
        if not bool((lo[:, [0, -1]] < hi[:, [0, -1]]).all()):
            return None
    elif not bool(
        (lo < hi).all()
        & (lo[:, 1:] >= lo[:, :-1]).all()
        & (hi[:, 1:] >= hi[:, :-1]).all()
        & (hi[:, :-1] >= lo[:, 1:]).all()
    ):
        return None

    def rows_at(idx: Tensor) -> tuple[Tensor, Tensor]:
        return lo[:, idx], hi[:, idx]

    def counts(k0: Tensor, k1: Tensor) -> tuple[Tensor, ...]:
        k0, k1 = k0.expand(lo.shape[0], -1).contiguous(), k1.expand(lo.shape[0], -1).contiguous()
        return (
            torch.searchsorted(hi, k0, right=True),  # rows with hi <= k0
            torch.searchsorted(lo, k1 - 1, right=True),  # rows with lo < k1
            torch.searchsorted(hi, k1 - 1, right=True),  # rows with hi < k1
            torch.searchsorted(lo, k0, right=True),  # rows with lo <= k0
        )

    return _band_tables(rows_at, counts, Sq, Sk, bq, bk, lo.device, for_kernel)


def _affine_band(mask: M.Mask, ctx: M.MaskContext, bq: int, bk: int, for_kernel: bool) -> tuple | None:
    """A causal mask or a sliding window alone: row i keeps [max(i + a, 0), min(i + b, Sk)), so the
    rows at block edges and the row counts per key block are formulas: O(nQ + nK), no row table."""
    Sq, Sk = ctx.Sq, ctx.Sk
    if type(mask) is M.causal:  # exact types: a subclass may keep() differently
        off = ctx.offset(mask.align)
        a, b = -(Sq + Sk + 1), off + 1  # lo = 0
    elif type(mask) is M.sliding_window:
        off = ctx.offset(mask.align)
        a, b = off - mask.left, off + mask.right + 1
    else:
        return None
    if not (b > 0 and Sq - 1 + a < Sk):  # a row keeps nothing (only possible at either end): tables
        return None

    def rows_at(idx: Tensor) -> tuple[Tensor, Tensor]:
        return (idx + a).clamp(min=0)[None], (idx + b).clamp(max=Sk)[None]

    def counts(k0: Tensor, k1: Tensor) -> tuple[Tensor, ...]:
        # hi <= k0 <=> i + b <= k0 (k0 < Sk); lo < k1 <=> i + a < k1 (k1 > 0); likewise the others
        return tuple(t.clamp(0, Sq)[None] for t in (k0 - b + 1, k1 - a, k1 - b, k0 - a + 1))

    return _band_tables(rows_at, counts, Sq, Sk, bq, bk, ctx.device, for_kernel)


def _band_tables(rows_at, counts, Sq, Sk, bq, bk, dev, for_kernel) -> tuple[Tensor, ...]:
    """A query block keeps the key blocks of [lo(first row), hi(last row)) and covers those of
    [lo(last row), hi(first row)); a key block is kept by rows [#(hi <= k0), #(lo < k1)) and covered by
    rows [#(hi < k1), #(lo <= k0)). rows_at(idx) gives (lo, hi) (Bm, len(idx)) at those rows,
    counts(k0, k1) those four row counts (Bm, nK)."""
    nQ, nK = _cdiv(Sq, bq), _cdiv(Sk, bk)
    first = torch.arange(nQ, device=dev) * bq
    last = torch.clamp(first + bq, max=Sq) - 1
    whole_q = (first + bq <= Sq).view(1, -1)
    (lo_f, hi_f), (lo_l, hi_l) = rows_at(first), rows_at(last)
    a, b = lo_f // bk, _cdiv(hi_l, bk)
    fa, fb = _cdiv(lo_l, bk), hi_f // bk
    has_full = whole_q & (fb > fa)
    kv = _two_runs(a, b, fa, fb, has_full, nK, for_kernel)

    k0 = torch.arange(nK, device=dev) * bk
    k1 = torch.clamp(k0 + bk, max=Sk)
    whole_k = (k0 + bk <= Sk).view(1, -1)
    r0, r1, c0, c1 = counts(k0, k1)
    qa, qb = r0 // bq, torch.where(r1 > r0, _cdiv(r1, bq), r0 // bq)
    qfa, qfb = _cdiv(c0, bq), c1 // bq
    q_has_full = whole_k & (qfb > qfa) & (c1 > c0)
    q = _two_runs(qa, qb, qfa, qfb, q_has_full, nQ, for_kernel)
    return (*kv, *q)


def _two_runs(a, b, fa, fb, has_full, cols, for_kernel) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows keeping blocks [a, b), of which [fa, fb) FULL where has_full: (num, idx, full_num, full_idx),
    each (Bm, 1, rows[, cols]) in the layout of _compact_rows (only max(num) + 1 columns stored)."""
    fa, fb = torch.where(has_full, fa, b), torch.where(has_full, fb, b)
    n1, n2 = (fa - a).clamp(min=0), (b - fb).clamp(min=0)
    num, fnum = n1 + n2, (fb - fa).clamp(min=0)
    most = int(torch.maximum(num.max(), fnum.max())) if num.numel() else 0
    width = max(2 if for_kernel else 1, min(cols, most + 1))
    stored_cols = max(cols, width + 1) if for_kernel else cols
    c = torch.arange(width, device=a.device)
    part = torch.where(c < n1[..., None], a[..., None] + c, fb[..., None] + c - n1[..., None])
    full = fa[..., None] + c
    out = []
    for n, idx in ((num, part), (fnum, full)):
        t = _compact(n.shape[0], n.shape[1], width, stored_cols, a.device)
        t[..., :width] = torch.where(c < n[..., None], idx, 0).clamp(max=cols - 1)[:, None]
        out += [n.to(torch.int32)[:, None], t]
    return tuple(out)  # type: ignore[return-value]


def _compact(Bm: int, rows: int, width: int, cols: int, device, Hm: int = 1) -> Tensor:
    """A (Bm, Hm, rows, cols) int32 index tensor that stores only ``width`` columns per row.

    Flex reads a row's first ``num`` entries only (the rest are "undefined" in the BlockMask format), so
    the rows overlap: row r's entries past ``width`` are row r + 1's first ones, which are valid block
    indices as well. Memory O(rows · width), not O(rows · cols): a 4K window at N = 1M keeps 8192 × 33
    entries instead of 8192² (256 MiB per tensor); and no page of a fresh N²/block² buffer is touched.
    """
    storage = torch.zeros(Bm * Hm * rows * width + cols, dtype=torch.int32, device=device)
    return storage.as_strided((Bm, Hm, rows, cols), (Hm * rows * width, rows * width, width, 1))


def _classes_by_evaluation(mask: M.Mask, ctx: M.MaskContext, bq: int, bk: int) -> tuple[Tensor, Tensor]:
    """(partial, full) bool (Bm, Hm, nQ, nK) by evaluating the mask, one query block at a time."""
    nQ, nK = _cdiv(ctx.Sq, bq), _cdiv(ctx.Sk, bk)
    pad_k = nK * bk - ctx.Sk
    anys, alls = [], []
    for r in range(nQ):
        q0, q1 = r * bq, min((r + 1) * bq, ctx.Sq)
        t = M.as_4d(mask.tile(q0, q1, 0, ctx.Sk, ctx))  # (B|1, H|1, rows, Sk)
        t = t.expand(*t.shape[:2], q1 - q0, ctx.Sk)
        t = torch.nn.functional.pad(t, (0, pad_k)).view(*t.shape[:2], q1 - q0, nK, bk)
        anys.append(t.any(-1).any(-2))
        alls.append(t.all(-1).all(-2) & (q1 - q0 == bq))
    shape = torch.broadcast_shapes(*(a.shape for a in anys))
    any_ = torch.stack([a.expand(shape) for a in anys], -2)
    all_ = torch.stack([a.expand(shape) for a in alls], -2)
    return any_ & ~all_, all_


def _compact_rows(nums: Tensor, idx: Tensor, min_rows: int, for_kernel: bool) -> tuple[Tensor, Tensor]:
    """(nums, idx) in the compact layout of _compact, with at least min_rows rows (extra rows keep no
    block).

    for_kernel: one layout for every mask and length, so a compiled kernel sees one stride pattern: the
    stored width is >= 2 and below the column count (a spare column, never read, where needed):
    torch.compile specializes strides of 1 and guards on contiguity, so a contiguous table after a
    compact one would recompile. Otherwise the table keeps the block grid's exact shape.
    """
    Bm, Hm, R, C = idx.shape
    width = min(C, int(nums.max()) + 1 if nums.numel() else 1)
    if for_kernel:
        width = max(2, width)
    R2, C2 = max(R, min_rows), max(C, width + 1) if for_kernel else C
    out = _compact(Bm, R2, width, C2, idx.device, Hm)
    w = min(width, C)
    out[:, :, :R, :w] = idx[..., :w]
    if R2 == R:
        return nums, out
    padded = torch.zeros((Bm, Hm, R2), dtype=nums.dtype, device=nums.device)
    padded[..., :R] = nums
    return padded, out


def lower(
    mask: M.Mask | None, ctx: M.MaskContext, block: int | tuple[int, int] = BLOCK, for_kernel: bool = False
) -> Lowered:
    """Lower ``mask`` (None = keep everything) for a problem of size ``ctx`` to Flex block metadata.

    ``for_kernel``: the layout attnopt's compiled kernels take (the same for every length, so nothing
    recompiles): at least 2 query and key blocks (the extras keep nothing; torch.compile specializes
    tables of one row) and a stored width below the column count (see _compact_rows). Otherwise the
    tables have the block grid's exact shape, as ``create_block_mask`` makes them.
    """
    bq, bk = (block, block) if isinstance(block, int) else block
    if bq < 1 or bk < 1:
        raise ValueError(f"block={block!r}; allowed: positive ints (FlexAttention uses 128)")
    Sq, Sk = ctx.Sq, ctx.Sk
    affine = None if mask is None else _affine_band(mask, ctx, bq, bk, for_kernel)
    if affine is not None:
        if for_kernel and min(_cdiv(Sq, bq), _cdiv(Sk, bk)) < 2:
            affine = _pad_all(affine, for_kernel)
        return Lowered(Sq, Sk, (bq, bk), *affine, None, None, mask, ctx, "band")
    if mask is None:
        i = torch.arange(Sq, device=ctx.device)
        rows = _rows(torch.zeros_like(i), torch.full_like(i, Sk))
    else:
        rows = row_intervals(mask, ctx)
    if rows is not None:
        lo, hi = rows
        band = _band(lo, hi, Sq, Sk, bq, bk, mask is None or type(mask) in _BAND_LEAVES, for_kernel)
        if band is not None:
            if for_kernel and min(_cdiv(Sq, bq), _cdiv(Sk, bk)) < 2:
                band = _pad_all(band, for_kernel)
            return Lowered(Sq, Sk, (bq, bk), *band, lo, hi, mask, ctx, "band")
        partial, full = (t[:, None] for t in _classes_by_intervals(lo, hi, Sq, Sk, bq, bk))
        path = "intervals"
    else:
        partial, full = _classes_by_evaluation(mask, ctx, bq, bk)  # type: ignore[arg-type]
        lo = hi = None
        path = "evaluated"
    meta = (
        *_ordered(partial),
        *_ordered(full),
        *_ordered(partial.transpose(-1, -2)),
        *_ordered(full.transpose(-1, -2)),
    )
    return Lowered(Sq, Sk, (bq, bk), *_pad_all(meta, for_kernel), lo, hi, mask, ctx, path)


def _pad_all(meta: tuple, for_kernel: bool) -> tuple:
    """The 8 tables in the compact layout (see _compact_rows)."""
    kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi = meta
    rows = 2 if for_kernel else 1
    return (
        *_compact_rows(kvn, kvi, rows, for_kernel),
        *_compact_rows(fkvn, fkvi, rows, for_kernel),
        *_compact_rows(qn, qi, rows, for_kernel),
        *_compact_rows(fqn, fqi, rows, for_kernel),
    )


def block_mask(
    mask: M.Mask | Callable | None,
    B: int,
    H: int,
    Q_LEN: int,
    KV_LEN: int,
    device: str | torch.device = "cpu",
    BLOCK_SIZE: int | tuple[int, int] = BLOCK,
):
    """``create_block_mask`` for attnopt masks, without evaluating the mask over Q_LEN × KV_LEN.

    ``mask``: an ``attnopt.masks`` descriptor (or a ``mask_mod(b, h, q_idx, kv_idx)``, evaluated as
    ``create_block_mask`` would). Returns a ``torch.nn.attention.flex_attention.BlockMask`` for
    ``flex_attention``; positional masks align bottom-right unless built with ``align="top_left"``.
    """
    if callable(mask) and not isinstance(mask, M.Mask):
        mask = M.custom(mask)
    for name, v in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}; allowed: an int >= 1")
    ctx = M.MaskContext(B, H, Q_LEN, KV_LEN, torch.device(device))
    if mask is not None:
        problems = mask.check(ctx)
        if problems:
            raise ValueError(
                f"mask {mask!r} does not fit (B={B}, H={H}, Q_LEN={Q_LEN}, KV_LEN={KV_LEN}): {'; '.join(problems)}"
            )
    return lower(mask, ctx, BLOCK_SIZE).block_mask()
