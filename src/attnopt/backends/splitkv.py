"""Split-KV decode (flash-decoding) on torch's fused CPU kernel: key chunks as extra kernel heads.

A decode step has a handful of query rows per kv head (G·Sq, GQA folded) and a long key cache. torch's
fused CPU kernel parallelizes over (batch, head, query block) only, so B·Hkv = 3 work items on 2 threads
leave one thread idle a third of the time. Here the Sk keys are cut into n chunks and every
(batch, kv head, chunk) becomes one work item of ONE kernel call: K and V are viewed (zero copy) as
(B·Hkv, n, c, D), the chunks in the kernel's heads dimension, and q as (B·Hkv, 1, G·Sq, D) expanded
(stride 0) over the n chunks. The n partial (out, lse) are merged exactly by their log-sum-exp over the
chunk dimension in a few vectorized ops (merge.py's formula). When n does not divide Sk, chunk i is
read as keys [i·c, i·c + c + r) (r = Sk mod n, still one strided view) and the r keys it shares with
chunk i+1 are masked in chunk i, so every key is counted exactly once.

Masks: none, bottom-right causal with Sq == 1 (no mask), and key-only masks (padding, left_padding and
their combinations), given to the kernel as a (B·Hkv or 1, n, 1, c) additive 0 / -inf mask; masked-out
NaN/inf keys are zeroed first (0·NaN = NaN), so they contribute exactly nothing. Chunks a row sees no
key of get lse = -inf (the kernel reports 0) and weigh nothing.

num_splits: None splits only where that was measured faster (auto_splits: mask-free fp32/bf16 decode
with more keys than ~8K·64/D and too few kv heads to keep the threads busy), choosing n from shapes,
dtype and the thread count, never from data. An explicit n fixes the chunking of the keys [0, Sk)
whatever the batch holds, and no key range is sliced off, so each row's result is bitwise independent
of the other rows (batch invariance).

Huge scores: merge weights exp(lse_i - lse) carry the float32 rounding of the kernel's chunk LSE, which
at logits beyond FUSED_SCORE_LIMIT (~2048) is more than any fp32 computation's error. Rather than read
q and k before every call to bound the scores, the kernel's own chunk LSEs are checked afterwards (one
small reduction); rows beyond the limit, judged each by its own chunks (so batch invariance holds), are
recomputed in float64 (_exact_rows). The same covers the merge with sinks.

Inference only (no backward): with gradients the other backends take over.
"""

from __future__ import annotations

import contextlib
import functools
from typing import ClassVar

import torch
from torch import Tensor

from .._inputs import AttentionInputs, acc_dtype, scan_dtype
from .._threads import one_thread
from ..masks import causal
from ..merge import add_sinks
from ._base import FUSED_SCORE_LIMIT, Backend, fused_data_reasons, unit_qk

NEG_INF = float("-inf")
_INF = float("inf")

# Decode-shaped calls only: at most this many query rows per kv head (G·Sq). The kernel's query block
# is 32 rows, so up to 16 rows every (batch, kv head, chunk) is one work item with one query block.
MAX_ROWS = 16

_fused = torch._scaled_dot_product_flash_attention_for_cpu  # the C binding: ~5 us less than torch.ops.aten


@functools.cache
def _op_works() -> bool:
    """Probe the private fused op once: signature, LSE semantics and stride-0 chunk views as used here."""
    try:
        q = torch.zeros(1, 1, 2, 4).expand(1, 2, 2, 4)
        k = torch.zeros(1, 4, 4)
        kc = k.as_strided((1, 2, 2, 4), (16, 8, 4, 1))
        mask = torch.zeros(1, 2, 1, 2)
        out, lse = _fused(q, kc, kc, 0.0, False, attn_mask=mask, scale=1.0)[:2]
        return tuple(out.shape) == (1, 2, 2, 4) and abs(float(lse[0, 0, 0]) - 0.6931) < 1e-3
    except Exception:  # any change of the private API: decline, the other backends take over
        return False


def _kv_rows(inputs: AttentionInputs) -> int:
    return (inputs.Hq // inputs.Hkv) * inputs.Sq if inputs.Hkv else 0


def _mergeable(t: Tensor) -> bool:
    """(B, H, S, D) whose B and H dims merge into one strided dim (a zero-copy (B·H, n, c, D) view)."""
    B, H = t.shape[0], t.shape[1]
    return B == 1 or H == 1 or t.stride(0) == H * t.stride(1)


def _mask_kind(inputs: AttentionInputs) -> str:
    """none | key_only | other."""
    m = inputs.mask
    if m is None or (isinstance(m, causal) and m.align == "bottom_right" and inputs.Sq == 1):
        return "none"  # bottom-right causal with one query keeps every key
    return "key_only" if m.key_only else "other"


# When num_splits=None splits (auto_splits), measured with scripts/bench_splitkv.py on the 2-core CPU
# machine (torch 2.13, 2 threads, medians of 300 interleaved calls; "streaming" = --layers 30, keys read
# from memory as in a decode step through a model's layers; "hot" = the same K/V every call):
#   B=1 Hq=9 Hkv=3 D=64 fp32 (3 items on 2 threads): Sk=8192 1.10-1.20x (n=4), 4096 0.92-1.08x,
#     2048 ~1.0x, 1024 0.8-1.0x; Sk=8191 (overlap mask) 1.07-1.13x; Sq=2 at 8192 1.06-1.08x
#   B=1 Hq=8 Hkv=1 fp32 (1 item): 8192 1.15-1.38x, 4096 0.91-0.95x, 1024 0.7-0.8x
#   bf16: 8192 0.98-1.06x, 16384 1.03-1.16x; fp16: 8192 1.05-1.11x, 16384 1.03x (its kernel is
#     compute-bound; not split automatically)
#   balanced item counts (B=1 Hkv=8; B=2 Hkv=3; B=5 Hkv=3): 0.9-0.98x, never split
#   key-only masks (fixed chunks read every key; auto would split the sliced range): 0.95-1.06x
# A split costs ~30 us of merge ops (each op after the kernel runs with cold caches), so it pays only
# when the busiest thread's share of the keys drops by >= 1.25x and the keys are many: Sk·D >= 6144·64
# (fp32), 12288·64 (bf16), between the last measured loss or tie and the first measured gain.
MIN_CHUNK = 512  # the kernel's key block (kvSplitSize): smaller chunks only add per-item overhead
MIN_GAIN = 1.25
MIN_KEY_WORK = {torch.float32: 6144 * 64, torch.bfloat16: 12288 * 64}  # Sk·D; other dtypes: never
SPLIT_ORDER = (4, 2, 8, 6, 3, 5, 7)  # among equally balanced n, 4 measured best (X=1 and X=3)


@functools.lru_cache(maxsize=1024)
def auto_splits(B: int, Hkv: int, Sk: int, D: int, threads: int, dtype: torch.dtype = torch.float32) -> int:
    """Key chunks for num_splits=None: from shapes, dtype and the thread count only (never from data).

    The kernel gives each of its T threads a contiguous range of the B·Hkv·n items, so the busiest
    thread handles ceil(B·Hkv·n / T) chunks of Sk / n keys. Picks the n that minimizes that, if it beats
    the unsplit call by MIN_GAIN on enough keys (see the measurements above); else 1.
    """
    X = B * Hkv
    min_work = MIN_KEY_WORK.get(dtype)
    if threads <= 1 or X == 0 or min_work is None or Sk * D < min_work:
        return 1
    unsplit = -(-X // threads) * Sk  # keys of the busiest thread
    best, best_cost = 1, unsplit
    for n in SPLIT_ORDER:
        if Sk // n >= MIN_CHUNK:
            cost = -(-X * n // threads) * -(-Sk // n)
            if cost < best_cost:
                best, best_cost = n, cost
    return best if unsplit >= MIN_GAIN * best_cost else 1


def _splits(inputs: AttentionInputs) -> int:
    n = inputs.num_splits
    if n is None:
        if _mask_kind(inputs) != "none":  # measured not faster (see above)
            return 1
        n = auto_splits(inputs.B, inputs.Hkv, inputs.Sk, inputs.D, torch.get_num_threads(), inputs.dtype)
    return max(1, min(n, inputs.Sk))


def _chunked(t: Tensor, X: int, n: int, c: int, cc: int) -> Tensor:
    """(B, H, S, Dt) -> (B·H, n, cc, Dt) view: chunk i = keys [i·c, i·c + cc) (cc - c keys overlap)."""
    H, Dt = t.shape[1], t.shape[3]
    sB, sH, sS, sD = t.stride()
    sX = sB if H == 1 else sH
    return t.as_strided((X, n, cc, Dt), (sX, c * sS, sS, sD), t.storage_offset())


def _overlap_keep(n: int, c: int, cc: int, device: torch.device) -> Tensor:
    """(n, cc) bool: False on the cc - c keys chunk i shares with chunk i+1 (counted in i+1 only)."""
    keep = torch.ones(n, cc, dtype=torch.bool, device=device)
    keep[:-1, c:] = False
    return keep


@functools.lru_cache(maxsize=64)
def _overlap_mask(n: int, c: int, cc: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1, n, 1, cc) additive mask of _overlap_keep (0 / -inf; exact in every dtype). Read-only."""
    keep = _overlap_keep(n, c, cc, device)
    return torch.zeros(n, cc, dtype=dtype, device=device).masked_fill_(~keep, NEG_INF).view(1, n, 1, cc)


def _clean_key_only(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, mixed: list[tuple[int, int]]):
    """Zero masked-out keys/values (and the queries of batch elements with no key) if any is NaN/inf.

    keep: (B, S) bool. A key-only mask hides a key from every query of its batch element, so zeroing it
    changes nothing else (kept rows keep their bits). Only q and the key columns some batch element
    masks (`mixed`) are read, with one host sync; copies are made only when something there is not
    finite.
    """
    acc = scan_dtype(q.dtype)
    total = q.detach().sum(dtype=acc)
    for c0, c1 in mixed:
        total = total + k.detach()[:, :, c0:c1].sum(dtype=acc) + v.detach()[:, :, c0:c1].sum(dtype=acc)
    if bool(total.isfinite()):
        return q, k, v
    gone = ~keep[:, None, :, None]  # (B, 1, S, 1)
    no_key = ~keep.any(-1)[:, None, None, None]  # (B, 1, 1, 1)
    return q.masked_fill(no_key, 0.0), k.masked_fill(gone, 0.0), v.masked_fill(gone, 0.0)


def _exact_rows(q, k, v, keep, rows, scale, sinks, out, lse):
    """Recompute `rows` (X, R) in float64: rows whose chunk LSE exceeds FUSED_SCORE_LIMIT in magnitude.

    Merge weights exp(lse_i - lse) (and the sink's) carry the float32 rounding of the kernel's lse_i,
    |lse_i|·2**-24: at scores in the thousands that is off by more than any fp32 computation. Those rows
    (rare: logits beyond ~2048) get scores, softmax, sink and weighted sum in float64 from the same
    (cleaned) q, k, v. Each row is judged by its own chunks, so no row depends on the rest of the batch.
    """
    Hkv, S, D = k.shape[1], k.shape[2], k.shape[3]
    X, R = rows.shape
    G = R // q.shape[2]
    xs = rows.any(1).nonzero().flatten()  # kv items with a flagged row
    f64 = torch.float64
    qx = q.reshape(X, R, D)[xs].to(f64)
    kx, vx = k.reshape(X, S, D)[xs].to(f64), v.reshape(X, S, v.shape[-1])[xs].to(f64)
    s = torch.matmul(qx, kx.transpose(1, 2)) * scale  # (u, R, S)
    if keep is not None:
        s = s.masked_fill(~keep[xs // Hkv].unsqueeze(1), NEG_INF)
    cols = [s]
    if sinks is not None:  # row r of item x is query head (x mod Hkv)·G + r // Sq
        sink = sinks.to(f64).view(Hkv, G)[xs % Hkv].repeat_interleave(q.shape[2], dim=1)  # (u, R)
        cols.append(sink.unsqueeze(-1))
    total = torch.logsumexp(torch.cat(cols, -1), -1)  # (u, R); -inf for a row with no key and no sink
    p = torch.exp(s - total.nan_to_num(nan=0.0, neginf=0.0).unsqueeze(-1))
    o = torch.matmul(p, vx)  # (u, R, Dv)
    pick = rows[xs]  # (u, R)
    sub_out = torch.where(pick.unsqueeze(-1), o.to(out.dtype), out[xs])
    out = out.index_copy(0, xs, sub_out)
    if lse is not None:
        lse = lse.index_copy(0, xs, torch.where(pick, total.to(lse.dtype), lse[xs]))
    return out, lse


class SplitKVBackend(Backend):
    """Flash-decoding on CPU: the keys in n chunks, every (batch, kv head, chunk) one item of one fused call."""

    name: ClassVar[str] = "splitkv"
    description: ClassVar[str] = (
        "split-KV decode: key chunks as heads of one fused CPU kernel call, merged by LSE"
    )
    device_types: ClassVar[frozenset[str] | None] = frozenset({"cpu"})
    supports_backward: ClassVar[bool] = False
    supports_dropout: ClassVar[bool] = False
    similarities: ClassVar[frozenset[str]] = frozenset({"dot", "cosine"})
    dense_rows: ClassVar[bool] = True
    splits_keys: ClassVar[bool] = True  # accepts num_splits >= 2 (Backend refuses it for the others)

    @classmethod
    def is_available(cls) -> bool:
        return _op_works()

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        r = super().not_supported_reasons(inputs)
        rows = _kv_rows(inputs)
        if rows > MAX_ROWS:
            r.append(
                f"G·Sq = {inputs.Hq // max(inputs.Hkv, 1)}·{inputs.Sq} = {rows} query rows per kv head > {MAX_ROWS}: "
                f"split-KV is for decode-shaped calls (prefill has enough query blocks to keep every thread busy)"
            )
        if inputs.Dv != inputs.D:
            r.append(f"Dv={inputs.Dv} != D={inputs.D}: the fused CPU kernel needs one head dim")
        if inputs.mods:
            r.append(f"score_mod={list(inputs.mods)!r}: split-KV takes no score modifiers")
        kind = _mask_kind(inputs)
        if kind == "other":
            r.append(
                f"mask={inputs.mask!r}: split-KV takes no mask, key-only masks (padding, left_padding) and "
                f"bottom-right causal with Sq == 1"
            )
        if not r and not inputs.empty:  # data checks: only when nothing else refuses (reads nothing here
            # for key-only masks, which this backend cleans itself; sinks merge by the LSE: score bound)
            # merges=False: rows whose LSE is too large to merge (chunks, sinks) are found afterwards,
            # from the kernel's own LSE, and recomputed exactly (_exact_rows), without reading the data first
            r += fused_data_reasons(inputs, masks=kind != "none", merges=False, cleans_key_only=True)
        return r

    def rank(self, inputs: AttentionInputs) -> float:
        # An explicit num_splits asks for this backend (it alone splits; with 1 it is the batch-invariant
        # unsplit pass). Automatic: where auto_splits() splits, i.e. where splitting was measured faster
        # than sdpa's unsplit call (numbers above auto_splits; the goal shape B=1 Hq=9 Hkv=3 Sk=8192 D=64
        # fp32 on 2 threads: 1.10-1.20x). Otherwise it is one fused call like span's single call, and
        # ranks between sdpa (which declines sinks and the LSE) and span: decode with sinks / return_lse,
        # 30-layer streaming medians, B=1 Hq=9 Hkv=3 fp32, 2 threads: Sk=2048 sinks 0.65 vs span 1.06 ms
        # (span reads q, k, v for its score bound first), LSE 0.46 vs 0.59 ms; Sk=256 sinks 0.20 vs
        # 0.36 ms, LSE 0.095 vs 0.164 ms; B=4 Hq=8 Hkv=2 Sk=1024 sinks 0.65 vs 1.10 ms.
        if inputs.num_splits is not None or _splits(inputs) > 1:
            return 0.0
        return 5.0

    def plan(self, inputs: AttentionInputs) -> str:
        n = _splits(inputs)
        S = inputs.Sk
        how = "fixed by num_splits" if inputs.num_splits is not None else "automatic"
        kind = _mask_kind(inputs)
        if n == 1:
            text = f"{self.description}; 1 chunk ({how}): one unsplit pass over the {S} keys"
        else:
            c, r = divmod(S, n)
            sizes = f"{c} keys" if not r else f"{c} keys (+{r} in the last; {r} shared keys masked)"
            text = (
                f"{self.description}; {n} chunks of {sizes} ({how}), {inputs.B * inputs.Hkv * n} kernel items"
            )
        if kind == "key_only":
            text += f"; {inputs.mask!r} as an additive (.., n, 1, c) mask"
            if inputs.num_splits is None:
                text += ", keys no row keeps sliced off"
        if not all(_mergeable(t) for t in (inputs.k, inputs.v)):
            text += "; k/v copied: their batch and head dims do not merge into one strided dim"
        return text

    def forward(self, inputs: AttentionInputs) -> tuple[Tensor, Tensor | None]:
        q, k, v = inputs.q, inputs.k, inputs.v
        B, Hq, Sq, D = q.shape
        Hkv = inputs.Hkv
        X, R = B * Hkv, (Hq // Hkv) * Sq
        acc = acc_dtype(q.dtype)
        keep = None  # (B, S) bool for key-only masks
        if _mask_kind(inputs) == "key_only":
            m, ctx = inputs.mask, inputs.ctx
            assert m is not None
            lo, hi = 0, inputs.Sk
            if inputs.num_splits is None:  # automatic: keys no row keeps are never read
                lo, hi = m.key_range(0, Sq, ctx)
                if not lo < hi:  # no key is kept anywhere: every row is empty
                    return self._empty(inputs)
                k, v = k[:, :, lo:hi], v[:, :, lo:hi]
            keep = m.tile(0, 1, lo, hi, ctx).expand(B, 1, 1, hi - lo).reshape(B, hi - lo).contiguous()
            a, b = m.full_key_range(ctx)  # keys every batch element keeps
            a, b = min(max(a, lo), hi) - lo, max(min(b, hi), lo) - lo
            mixed = [(0, a), (b, hi - lo)] if a < b else [(0, hi - lo)]
            q, k, v = _clean_key_only(q, k, v, keep, [(c0, c1) for c0, c1 in mixed if c0 < c1])
        if inputs.similarity == "cosine":  # after cleaning: normalizing a NaN key would spread nothing, but
            q, k = unit_qk(q, k)  # the cleaned one stays 0
        if not (_mergeable(k) and _mergeable(v)):
            k, v = k.contiguous(), v.contiguous()
        S = k.shape[2]
        n = max(1, min(_splits(inputs), S))
        c, rem = divmod(S, n)
        cc = c + rem  # chunk length in the view; chunks 0..n-2 mask their last `rem` keys
        qx = q.reshape(X, 1, R, D).expand(X, n, R, D)
        kx, vx = _chunked(k, X, n, c, cc), _chunked(v, X, n, c, cc)
        attn_mask = None
        empty = None  # (B, 1, n, 1) bool: chunks in which a batch element keeps no key
        if keep is not None:
            kc = keep.as_strided((B, n, cc), (S, c, 1), keep.storage_offset())
            if rem:
                kc = kc & _overlap_keep(n, c, cc, q.device)
            attn_mask = torch.zeros((B, 1, n, 1, cc), dtype=q.dtype, device=q.device)
            attn_mask.masked_fill_(~kc.view(B, 1, n, 1, cc), NEG_INF)
            if B == 1:  # one mask row for every item: the kernel broadcasts a size-1 batch dim
                attn_mask = attn_mask.view(1, n, 1, cc)
            else:
                attn_mask = attn_mask.expand(B, Hkv, n, 1, cc).reshape(X, n, 1, cc)
            empty = (~kc.any(-1)).view(B, 1, n, 1).expand(B, Hkv, n, 1).reshape(X, n, 1)
        elif rem:
            attn_mask = _overlap_mask(n, c, cc, q.dtype, q.device)
        # A fixed num_splits promises bits that do not depend on the batch: one thread (see attnopt._threads)
        blas = one_thread() if inputs.num_splits is not None else contextlib.nullcontext()
        with blas:
            out, lse = _fused(qx, kx, vx, 0.0, False, attn_mask=attn_mask, scale=inputs.scale)[:2]
        # out (X, n, R, D) in q's dtype; lse (X, n, R) float32 (the kernel reports 0 for empty chunks)
        sinks = inputs.sinks
        want_lse = inputs.return_lse or sinks is not None
        raw = lse
        if n == 1:
            out, lse = out.reshape(X, R, D), lse.reshape(X, R)
            if empty is not None and want_lse:
                lse = torch.where(empty.view(X, 1), NEG_INF, lse)
        else:
            if empty is not None:
                lse = torch.where(empty, NEG_INF, lse)
            out, lse = self._merge(out, lse, empty is not None, want_lse)
        if sinks is not None:
            assert lse is not None
            o4, l4 = add_sinks(out.view(B, Hq, Sq, D), lse.view(B, Hq, Sq), sinks)
            out, lse = o4.view(X, R, D), l4.view(X, R)
        if n > 1 or sinks is not None:  # merged by the LSE: rows with huge scores are recomputed exactly
            top = float(torch.linalg.vector_norm(raw, _INF))  # max |lse|; NaN if a row is NaN: look closer
            if not top <= FUSED_SCORE_LIMIT:
                rows = (raw.abs() > FUSED_SCORE_LIMIT).any(1)  # (X, R): each row by its own chunks
                if bool(rows.any()):
                    out, lse = _exact_rows(q, k, v, keep, rows, inputs.scale, sinks, out, lse)
        out = out.view(B, Hq, Sq, D)
        if not inputs.return_lse:
            return out, None
        assert lse is not None
        return out, lse.view(B, Hq, Sq).to(acc)

    @staticmethod
    def _merge(out: Tensor, lse: Tensor, may_be_empty: bool, want_lse: bool) -> tuple[Tensor, Tensor | None]:
        """Exact merge over the chunk dim: out (X, n, R, D), lse (X, n, R) -> (X, R, D), (X, R) or None."""
        if may_be_empty:  # rows empty in every chunk: weights 0 (softmax would give NaN), lse -inf
            total = torch.logsumexp(lse, 1, keepdim=True)
            w = torch.exp(lse - total.nan_to_num(nan=0.0, neginf=0.0))
            total = total.squeeze(1)
        else:
            w = torch.softmax(lse, 1)
            total = torch.logsumexp(lse, 1) if want_lse else None
        if out.dtype == w.dtype:  # one call instead of mul + sum (each op after the kernel costs ~10 us)
            return torch.linalg.vecdot(w.unsqueeze(-1), out, dim=1), total
        merged = (w.unsqueeze(-1) * out).sum(1)  # float32: w promotes bf16/fp16 partial outputs
        return merged.to(out.dtype), total

    @staticmethod
    def _empty(inputs: AttentionInputs) -> tuple[Tensor, Tensor | None]:
        """No key kept anywhere: out 0, lse -inf (the sink logit with sinks)."""
        acc = acc_dtype(inputs.dtype)
        out = inputs.q.new_zeros(inputs.B, inputs.Hq, inputs.Sq, inputs.Dv)
        lse = torch.full((inputs.B, inputs.Hq, inputs.Sq), NEG_INF, dtype=acc, device=inputs.device)
        if inputs.sinks is not None:
            lse = inputs.sinks.to(acc).view(1, -1, 1).expand_as(lse).contiguous()
        return out, lse if inputs.return_lse else None
