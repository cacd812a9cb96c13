"""Attention over a paged KV pool: decode and chunked prefill of many sequences, with shared prefixes
(cascade) read once.

Layout (``attnopt.cache.PagePool``): one layer's keys are (Hkv, num_pages, page_size, D). A run of
consecutive pages is a strided (Hkv, n*page_size, D) view, so each sequence is read in place, run by run;
partial results over different key sets are merged exactly by their log-sum-exp (``attnopt.merge``).
Nothing is gathered except a prefill chunk's own keys (bounded by the chunk) and, in fixed-split mode,
a fixed-size chunk that straddles two runs.

Semantics (FlashInfer's batch prefill/decode with a paged KV cache): sequence r has kv_len[r] keys and
q_len[r] <= kv_len[r] queries, which are its *last* q_len[r] tokens; with ``causal`` query i sees keys
0 .. kv_len - q_len + i (bottom-right alignment, as ``cache_causal``). Query head h reads KV head
h // (Hq // Hkv) (grouped-query attention).

Cascade: sequences whose page tables start with the same physical pages share that prefix. All their
queries meet the prefix's keys in one call (one GEMM instead of one GEMV per sequence; the prefix is
read once), then each sequence's own keys separately; the parts merge by LSE. Sharing is read off the
page table itself, so it needs no hint: the prefix cache and ``fork`` produce it.

Fixed split (``split_size``): keys are cut at fixed absolute positions (multiples of ``split_size``), and
parts are merged left to right, so a sequence's output is bitwise the same whatever else is in the batch
and however its pages lie. Fixed-split plans do not cascade (a cascade call's products have another shape,
which BLAS may round differently), and run on one thread (see attnopt._threads).
This is the batch-invariant mode (torch ``varlen_attn(num_splits=1)``, FlashInfer ``disable_split_kv``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from ._threads import one_thread
from .cache.paged import page_slots

__all__ = ["PagedPlan", "paged_attention"]


def _flash_cpu(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    # torch's fused CPU flash kernel reads strided K/V in place and returns the LSE. It crashes (SIGFPE)
    # on zero keys, so callers never pass an empty key range.
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale, is_causal=causal)


_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _part(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """(1, H, M, D) x (1, H, L, D) -> out (1, H, M, Dv), lse (1, H, M); L >= 1; causal only when M == L."""
    if (
        q.device.type == "cpu"
        and q.dtype in _FLASH_DTYPES
        and v.shape[-1] == q.shape[-1]  # the fused kernel needs Dv == D
    ):
        return _flash_cpu(q, k, v, scale, causal)
    from . import api, masks  # elsewhere: attnopt's own dispatch (CUDA: fused kernels)

    out, lse = api.attention(q, k, v, mask=masks.causal() if causal else None, scale=scale, return_lse=True)
    return out, lse


@dataclass(frozen=True)
class _Work:
    """One sequence: its query rows [row, row + m) and key ranges (flat pool spans)."""

    seq: int
    row: int
    m: int
    past: tuple[tuple[int, int, bool], ...]  # (flat start, length, contiguous) seen by every row
    own: Tensor | None  # flat slots of the causal square (prefill chunk's own keys), or None
    prefix: int  # index into PagedPlan.groups, or -1


@dataclass(frozen=True)
class _Group:
    rows: Tensor  # query rows of every member (int64)
    spans: tuple[tuple[int, int, bool], ...]  # the shared prefix's spans
    tokens: int
    members: tuple[int, ...]
    offsets: dict[int, int]  # member -> its first row within ``rows``


class PagedPlan:
    """Where every query row reads from, computed once per batch (from Python lists) and run per layer.

    Args:
        page_size: tokens per page.
        pages: each sequence's page list (physical page ids).
        kv_lens: each sequence's key count (its pages hold at least that many tokens).
        q_lens: each sequence's query count (its last q_len tokens); rows are laid out sequence after
            sequence (``qo_indptr`` = cumulative q_lens).
        causal: bottom-right causal per sequence (False: every query sees every key of its sequence).
        cascade: read prefixes shared by several sequences once (read off equal leading page ids).
        split_size: fixed-split (batch-invariant) mode: cut keys at multiples of this many tokens (a
            multiple of ``page_size``); ``None`` cuts only where pages stop being contiguous.
        min_shared: fewest shared tokens worth a cascade level.
    """

    def __init__(
        self,
        page_size: int,
        pages: list[list[int]],
        kv_lens: list[int],
        q_lens: list[int],
        *,
        causal: bool = True,
        cascade: bool = True,
        split_size: int | None = None,
        min_shared: int = 64,
    ):
        P = page_size
        self.page_size = P
        self.split_size = split_size
        self.total_q = sum(q_lens)
        self.kv_lens = list(kv_lens)
        self.q_lens = list(q_lens)
        rows = [0]
        for m in q_lens:
            rows.append(rows[-1] + m)
        # Keys every query of a sequence sees: all of them (non-causal, or one query: it is the last
        # token), or those before the chunk (causal prefill: the chunk's own keys are a causal square).
        past_len = [L if (not causal or m <= 1) else L - m for L, m in zip(kv_lens, q_lens)]
        # Fixed split promises bits independent of the batch, and a cascade call's products have another
        # shape (all sharers' rows at once) than a request's own: BLAS may round them differently (seen:
        # AMD EPYC, MKL 2024.2). So fixed-split plans never cascade.
        cascade = cascade and split_size is None
        shared = self._shared_prefixes(pages, past_len, cascade, min_shared) if cascade else {}
        self.groups: list[_Group] = []
        group_of: dict[int, int] = {}
        for members, n_pages in shared:
            gi = len(self.groups)
            idx = torch.cat([torch.arange(rows[r], rows[r] + q_lens[r]) for r in members])
            tokens = n_pages * P
            offsets, acc = {}, 0
            for r in members:
                offsets[r] = acc
                acc += q_lens[r]
            spans = tuple(self._spans(pages[members[0]], 0, tokens))
            self.groups.append(_Group(idx, spans, tokens, tuple(members), offsets))
            for r in members:
                group_of[r] = gi
        self.work: list[_Work] = []
        for r, (pg, L, m) in enumerate(zip(pages, kv_lens, q_lens)):
            if m == 0:
                continue
            gi = group_of.get(r, -1)
            start = self.groups[gi].tokens if gi >= 0 else 0
            own = None
            if past_len[r] < L:  # causal prefill chunk: its own keys as a causal square (bounded gather)
                own = page_slots(pg, past_len[r], L, P)
            spans = tuple(self._spans(pg, start, past_len[r]))
            self.work.append(_Work(r, rows[r], m, spans, own, gi))
        # Decode rows that read one contiguous run and nothing else: run in one tight loop, written at once.
        simple = [
            w
            for w in self.work
            if w.m == 1 and w.prefix < 0 and w.own is None and len(w.past) == 1 and w.past[0][2]
        ]
        self._simple = [(w.row, w.past[0][0], w.past[0][1]) for w in simple]
        self._simple_rows = torch.tensor([w.row for w in simple], dtype=torch.int64)
        self._all_simple = len(simple) == len(self.work) and [w.row for w in simple] == list(
            range(self.total_q)
        )
        ids = {id(w) for w in simple}
        self._rest = [w for w in self.work if id(w) not in ids]
        self._simple_done = False
        self._simple_out: tuple[Tensor, Tensor] | None = None
        prefix_parts = [len(self.groups[w.prefix].spans) if w.prefix >= 0 else 0 for w in self.work]
        self.max_parts = max(
            (n + len(w.past) + (w.own is not None) for n, w in zip(prefix_parts, self.work)), default=1
        )

    def _shared_prefixes(
        self, pages: list[list[int]], past_len: list[int], cascade: bool, min_shared: int
    ) -> list[tuple[list[int], int]]:
        """Groups of >= 2 sequences with the same leading full pages (seen by all their queries)."""
        P, S = self.page_size, self.split_size
        by_first: dict[int, list[int]] = {}
        for r, pg in enumerate(pages):
            if past_len[r] >= P and self.q_lens[r] > 0:
                by_first.setdefault(pg[0], []).append(r)
        out = []
        for members in by_first.values():
            if len(members) < 2:
                continue
            n = min(past_len[r] for r in members) // P
            first = pages[members[0]]
            for r in members[1:]:
                pg = pages[r]
                i = 0
                while i < n and pg[i] == first[i]:
                    i += 1
                n = i
            if S is not None:  # fixed split: the prefix ends on a split boundary, so parts line up
                n = (n * P) // S * S // P
            if n * P >= max(min_shared, 1):
                out.append((members, n))
        return out

    def _spans(self, pg: list[int], start: int, end: int) -> list[tuple[int, int, bool]]:
        """Flat (start, length, contiguous) spans covering tokens [start, end) of a sequence.

        Default: one span per run of consecutive pages. Fixed split: one span per [i*S, (i+1)*S) slice;
        a slice over two runs is marked non-contiguous (its slots are gathered, at most S tokens).
        """
        P, S = self.page_size, self.split_size
        if end <= start:
            return []
        if S is None:
            spans = []
            t = start
            while t < end:
                i = t // P
                j = i
                last = (end - 1) // P
                while j < last and pg[j + 1] == pg[j] + 1:
                    j += 1
                stop = min(end, (j + 1) * P)
                spans.append((pg[i] * P + t % P, stop - t, True))
                t = stop
            return spans
        spans = []
        t = start
        while t < end:
            stop = min(end, (t // S + 1) * S)
            i, last = t // P, (stop - 1) // P
            contiguous = all(pg[j + 1] == pg[j] + 1 for j in range(i, last))
            spans.append((pg[i] * P + t % P if contiguous else t, stop - t, contiguous))
            t = stop
        return spans

    # ------------------------------------------------------------------------------------------- run

    def run(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pages: list[list[int]] | None = None,
        scale: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """q (total_q, Hq, D); k/v one layer of the pool, (Hkv, num_pages, page_size, D|Dv).

        Returns out (total_q, Hq, Dv) in q's dtype and lse (total_q, Hq) (float32; float64 for float64).
        ``pages`` is needed only in fixed-split mode, to gather slices that straddle runs.
        """
        if self.split_size is not None:  # batch-invariant bits: one thread (see attnopt._threads)
            with one_thread():
                return self._run(q, k, v, pages, scale)
        return self._run(q, k, v, pages, scale)

    def _run(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pages: list[list[int]] | None,
        scale: float | None,
    ) -> tuple[Tensor, Tensor]:
        T, Hq, D = q.shape
        Hkv, N, P, Dv = v.shape
        g = Hq // Hkv
        kf = k.reshape(Hkv, N * P, D)  # views: the pool is contiguous
        vf = v.reshape(Hkv, N * P, Dv)
        scale = D**-0.5 if scale is None else float(scale)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = q.contiguous()
        K = self.max_parts
        if K == 1:  # every row has one part (one run, no cascade): write it in place, no merge
            out = q.new_empty(T, Hq, Dv)
            lse = torch.empty(T, Hq, dtype=lse_dtype, device=q.device)
        else:  # part j of every row goes to slab j; one merge over the slabs for the whole batch
            out = torch.zeros(K, T, Hq, Dv, dtype=lse_dtype, device=q.device)
            lse = torch.full((K, T, Hq), float("-inf"), dtype=lse_dtype, device=q.device)
        for gr in self.groups:  # all members' queries against their shared prefix: parts 0 .. n-1
            rows_g = gr.rows.to(q.device)  # plans are built on the CPU; a no-op there
            M = rows_g.numel()
            qg = q.index_select(0, rows_g).view(M, Hkv, g, D).transpose(0, 1).reshape(1, Hkv, M * g, D)
            for j, (start, n, contiguous) in enumerate(gr.spans):
                ks, vs = self._span(kf, vf, start, n, contiguous, gr.members[0], pages)
                o, s = _unfold(*_part(qg, ks, vs, scale, False), M, Hkv, g)
                out[j].index_copy_(0, rows_g, o.to(lse_dtype))
                lse[j].index_copy_(0, rows_g, s.to(lse_dtype))
        if self._simple:
            self._run_simple(q, kf, vf, scale, out if K == 1 else out[0], lse if K == 1 else lse[0])
            if K == 1 and self._all_simple:
                return self._simple_out
        for w in self._rest if self._simple_done else self.work:
            rows = slice(w.row, w.row + w.m)
            j = len(self.groups[w.prefix].spans) if w.prefix >= 0 else 0
            qr = q[rows]  # (m, Hq, D)
            if w.past:
                qf = qr.view(w.m, Hkv, g, D).transpose(0, 1).reshape(1, Hkv, w.m * g, D)  # (1, Hkv, m*g, D)
                for start, n, contiguous in w.past:
                    ks, vs = self._span(kf, vf, start, n, contiguous, w.seq, pages)
                    o, s = _unfold(*_part(qf, ks, vs, scale, False), w.m, Hkv, g)
                    if K == 1:
                        out[rows], lse[rows] = o, s
                    else:
                        out[j, rows], lse[j, rows] = o, s
                    j += 1
            if w.own is not None:
                own = w.own.to(kf.device)
                ko = kf.index_select(1, own).repeat_interleave(g, dim=0).unsqueeze(0)  # (1, Hq, m, D)
                vo = vf.index_select(1, own).repeat_interleave(g, dim=0).unsqueeze(0)
                o, s = _part(qr.transpose(0, 1).unsqueeze(0), ko, vo, scale, True)
                o, s = o[0].transpose(0, 1), s[0].transpose(0, 1)  # (m, Hq, Dv), (m, Hq)
                if K == 1:
                    out[rows], lse[rows] = o, s
                else:
                    out[j, rows], lse[j, rows] = o, s
        if K == 1:
            return out, lse
        out, lse = _merge_slabs(out, lse)
        return out.to(q.dtype), lse

    def _run_simple(self, q: Tensor, kf: Tensor, vf: Tensor, scale: float, out: Tensor, lse: Tensor) -> None:
        """Single-run decode rows: one fused call each (heads folded into rows), outputs written at once."""
        self._simple_done = False
        self._simple_out = None
        T, Hq, D = q.shape
        Hkv, Dv = vf.shape[0], vf.shape[-1]
        g = Hq // Hkv
        if not (q.device.type == "cpu" and Dv == D and q.dtype in _FLASH_DTYPES):
            return  # the general loop runs these rows too
        q5 = q.view(T, 1, Hkv, g, D)  # q5[row]: (1, Hkv, g, D)
        k4, v4 = kf.unsqueeze(0), vf.unsqueeze(0)
        outs, lses = [], []
        for row, start, n in self._simple:
            o, s = _flash_cpu(q5[row], k4.narrow(2, start, n), v4.narrow(2, start, n), scale, False)
            outs.append(o)
            lses.append(s)
        o = torch.cat(outs).view(len(outs), Hq, Dv)  # (S, Hq, Dv)
        s = torch.cat(lses).reshape(len(lses), Hq)
        self._simple_done = True
        if self._all_simple:
            self._simple_out = (o, s.to(lse.dtype))
            return
        rows = self._simple_rows.to(q.device)
        out.index_copy_(0, rows, o.to(out.dtype))
        lse.index_copy_(0, rows, s.to(lse.dtype))

    def _span(self, kf, vf, start, n, contiguous, seq, pages):
        if contiguous:
            return kf[:, start : start + n].unsqueeze(0), vf[:, start : start + n].unsqueeze(0)
        if pages is None:
            raise ValueError(
                "PagedPlan.run: fixed-split mode needs the page lists to gather a straddling slice"
            )
        slots = page_slots(pages[seq], start, start + n, self.page_size).to(kf.device)
        return kf.index_select(1, slots).unsqueeze(0), vf.index_select(1, slots).unsqueeze(0)


def _merge_slabs(out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge parts stacked on dim 0 (out (K, T, Hq, Dv), lse (K, T, Hq); unused slots: lse -inf, out 0).

    Sums run over the parts in order, one at a time, so unused trailing slots add exact zeros: a row's
    result does not depend on how many slots other rows needed (the fixed-split invariance rests on it).
    """
    m = lse.max(dim=0).values
    m = torch.where(torch.isinf(m), 0.0, m)  # a row with no part at all (cannot happen) stays 0, not NaN
    total = None
    acc = None
    for j in range(lse.shape[0]):
        w = torch.exp(lse[j] - m)  # (T, Hq); exactly 0 for unused slots
        term = out[j] * w.unsqueeze(-1)
        total = w if total is None else total + w
        acc = term if acc is None else acc + term
    return acc / total.unsqueeze(-1), m + torch.log(total)


def _unfold(o: Tensor, s: Tensor, m: int, Hkv: int, g: int) -> tuple[Tensor, Tensor]:
    """(1, Hkv, m*g, Dv), (1, Hkv, m*g) -> (m, Hq, Dv), (m, Hq)."""
    Dv = o.shape[-1]
    if m == 1:
        return o.reshape(1, Hkv * g, Dv), s.reshape(1, Hkv * g)
    o = o.view(Hkv, m, g, Dv).transpose(0, 1).reshape(m, Hkv * g, Dv)
    s = s.view(Hkv, m, g).transpose(0, 1).reshape(m, Hkv * g)
    return o, s


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    kv_last_page_len: Tensor,
    qo_indptr: Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    cascade: bool = True,
    split_size: int | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of ragged queries over sequences stored in a paged KV pool.

    Args:
        q: (total_q, Hq, D) queries, sequence after sequence (``qo_indptr``).
        k_cache, v_cache: one layer of the pool, (Hkv, num_pages, page_size, D) and (..., Dv), contiguous
            (``PagePool.k[layer]``). Hq must be a multiple of Hkv.
        kv_indptr, kv_indices, kv_last_page_len: FlashInfer CSR page table, int32 or int64: sequence r
            owns pages kv_indices[kv_indptr[r]:kv_indptr[r+1]] and
            ``page_size*(n_pages-1) + kv_last_page_len[r]`` keys (1 <= last <= page_size).
        qo_indptr: [R+1] query offsets; default one query per sequence (decode).
        scale: score scale, default 1/sqrt(D).
        causal: each sequence's queries are its last q_len tokens (bottom-right alignment).
        cascade: read prefixes shared by several sequences (equal leading page ids) once.
        split_size: fixed-split, batch-invariant mode (a multiple of page_size).
        return_lse: also return the LSE (total_q, Hq), float32 (float64 for float64).

    Returns:
        out (total_q, Hq, Dv) in q's dtype (and lse).

    Raises ValueError/TypeError for inconsistent shapes, dtypes, devices or page tables, before compute.
    """
    pages, kv_lens, q_lens = _validate(
        q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, qo_indptr
    )
    P = k_cache.shape[2]
    if split_size is not None and (
        isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < P or split_size % P
    ):
        raise ValueError(f"split_size={split_size!r}: allowed None or a positive multiple of page_size={P}")
    if not isinstance(causal, bool) or not isinstance(cascade, bool):
        raise TypeError(f"causal and cascade must be bools, got {causal!r} and {cascade!r}")
    plan = PagedPlan(P, pages, kv_lens, q_lens, causal=causal, cascade=cascade, split_size=split_size)
    out, lse = plan.run(q, k_cache, v_cache, pages=pages, scale=scale)
    return (out, lse) if return_lse else out


def _validate(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, qo_indptr):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 3 or k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(
            f"paged_attention: q must be (total_q, Hq, D) and k_cache/v_cache (Hkv, num_pages, page_size, D); "
            f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    Hkv, N, P, D = k_cache.shape
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} disagree")
    if q.shape[2] != D:
        raise ValueError(f"q head_dim {q.shape[2]} != k_cache head_dim {D}")
    if Hkv == 0 or q.shape[1] % Hkv:
        raise ValueError(f"q heads {q.shape[1]} must be a multiple of the cache's kv heads {Hkv}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or not q.dtype.is_floating_point:
        raise TypeError(
            f"q, k_cache, v_cache must share one floating dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(
            f"q, k_cache, v_cache on different devices: {q.device}, {k_cache.device}, {v_cache.device}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(
            "k_cache and v_cache must be contiguous (a PagePool layer: pool.k[layer], pool.v[layer])"
        )
    meta = {}
    for name, t in (
        ("kv_indptr", kv_indptr),
        ("kv_indices", kv_indices),
        ("kv_last_page_len", kv_last_page_len),
        ("qo_indptr", qo_indptr),
    ):
        if t is None:
            continue
        if isinstance(t, Tensor) and t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device; page tables need their values (cpu or cuda)")
        if not isinstance(t, Tensor) or t.ndim != 1 or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"{name} must be a 1-D int32/int64 tensor, got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
        meta[name] = t.tolist()
    indptr, indices, last = meta["kv_indptr"], meta["kv_indices"], meta["kv_last_page_len"]
    R = len(indptr) - 1
    if (
        R < 0
        or indptr[0] != 0
        or any(b < a for a, b in itertools.pairwise(indptr))
        or indptr[-1] != len(indices)
    ):
        raise ValueError(
            f"kv_indptr must start at 0, not decrease and end at len(kv_indices)={len(indices)}; got {indptr}"
        )
    if len(last) != R:
        raise ValueError(f"kv_last_page_len has {len(last)} entries for {R} sequences")
    bad = [p for p in indices if not 0 <= p < N]
    if bad:
        raise ValueError(f"kv_indices {bad[:5]} outside the pool's {N} pages")
    pages, kv_lens = [], []
    for r in range(R):
        pg = indices[indptr[r] : indptr[r + 1]]
        if pg and not 1 <= last[r] <= P:
            raise ValueError(
                f"kv_last_page_len[{r}]={last[r]}: allowed 1..page_size={P} for a sequence with pages"
            )
        if not pg and last[r] != 0:
            raise ValueError(f"kv_last_page_len[{r}]={last[r]} for a sequence with no pages (allowed: 0)")
        pages.append(pg)
        kv_lens.append(P * (len(pg) - 1) + last[r] if pg else 0)
    if qo_indptr is None:
        q_lens = [1] * R
    else:
        qi = meta["qo_indptr"]
        if len(qi) != R + 1 or qi[0] != 0 or any(b < a for a, b in itertools.pairwise(qi)):
            raise ValueError(f"qo_indptr must have R+1={R + 1} non-decreasing entries from 0, got {qi}")
        q_lens = [b - a for a, b in itertools.pairwise(qi)]
    if sum(q_lens) != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but the query lengths add up to {sum(q_lens)}")
    for r, (m, L) in enumerate(zip(q_lens, kv_lens)):
        if m > L:
            raise ValueError(
                f"qo_indptr gives sequence {r} {m} queries but the page table gives it only {L} keys; "
                f"a sequence's queries are its last tokens, so q_len <= kv_len"
            )
    return pages, kv_lens, q_lens
