"""Exact softmax weights tile by tile from q, k and the LSE, never an (Sq, Sk) tensor.

A sweep visits blocks of query rows and, for each, chunks of keys aligned to the key bins, skipping tiles
the mask leaves EMPTY. Each tile gets ``e = exp(s - c)`` with the call's LSE as the shift c: s - c is
exact where it matters (Sterbenz), so e is as accurate as eager's exp(s - max). The row normalizer
Z = sum_j e (plus the sink's share) is summed over the block's own tiles, and every view is linear in
e per row, so the weights p = e / Z come out as accurate as eager softmax's, instead of inheriting the
fused kernel's LSE rounding (about 1e-5 relative). So each row block takes two passes: the first sums Z
(and the entropy's sum of e (s - c)), the second scales the tiles by 1/Z and pools them, across rows
first. Between the passes the block's tiles stay in one buffer when they fit ``KEEP_BYTES``; otherwise
the second pass recomputes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._inputs import AttentionInputs, acc_dtype
from ..masks import Tile, tile_indices
from ._result import Bins, LayerMaps

ROWS = 128  # query rows per block at most (whole bins when they are narrower; wider bins are split)
MIN_ROWS = 32  # fewer rows per block than this make thin, slow score products: recompute instead
COLS_ELEMENTS = 1 << 20  # weights per tile: 4 MiB in float32, cache-sized
KEEP_BYTES = 64 << 20  # a block's tiles are kept for the received pass when they fit in this
MIN_MM = 16  # rows and columns of the smallest score product (see Tiles.shifted)
MAX_BIN = 8192  # widest bin; beyond it a single column chunk would not be cache-sized


class Workspace:
    """Reused buffers for the per-tile temporaries: a sweep allocates them once, not once per tile (freed
    tiles of a few MiB each would otherwise stay in the allocator's heap and raise the process's RSS)."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


@dataclass(frozen=True)
class Tiles:
    """One call's inputs in the compute dtype, GQA-folded, and the shift c (its LSE)."""

    inputs: AttentionInputs
    q: Tensor  # (B, Hkv, G, Sq, D) (cosine: normalized)
    k: Tensor  # (B, Hkv, Sk, D)
    c: Tensor  # (B, Hq, Sq): the LSE; 0 where it is -inf (every key masked)

    @classmethod
    def make(cls, inputs: AttentionInputs, lse: Tensor) -> Tiles:
        cd = acc_dtype(inputs.dtype)
        B, Hq, Hkv, Sq, D = inputs.B, inputs.Hq, inputs.Hkv, inputs.Sq, inputs.D
        q, k = inputs.q.detach().to(cd), inputs.k.detach().to(cd)
        if inputs.similarity == "cosine":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        c = lse.detach().to(cd)
        c = torch.where(torch.isfinite(c), c, 0.0)
        return cls(inputs, q.reshape(B, Hkv, Hq // Hkv, Sq, D), k, c)

    def shifted(
        self, rows: Tensor | slice, k0: int, k1: int, kind: Tile, ws: Workspace | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """s - c (B, Hq, r, k1-k0) for query rows ``rows`` (a slice or positions), and the keep mask of a
        PARTIAL tile (its masked entries of s - c are finite garbage: zero their weights with it). With a
        workspace, the scores are written into its buffer (no allocation per tile)."""
        x = self.inputs
        B, Hq, G = x.B, x.Hq, x.Hq // x.Hkv
        # Products of at least MIN_MM rows and columns: BLAS takes another kernel for thinner ones (another
        # summation order), and the scores would then differ from eager's q @ k^T in the last bit.
        idx = torch.arange(x.Sq)[rows] if isinstance(rows, slice) else rows
        r = idx.numel()
        if G * r < MIN_MM:  # pad the rows (each product is computed on its own; the extra ones are dropped)
            idx = torch.cat([idx, idx[:1].expand(-(-MIN_MM // G) - r)])
        a0 = max(0, min(k0, x.Sk - MIN_MM))
        a1 = max(k1, min(a0 + MIN_MM, x.Sk))
        q = self.q[:, :, :, rows] if idx.numel() == r else self.q[:, :, :, idx]  # (B, Hkv, G, r', D)
        kb = self.k[:, :, a0:a1]
        qf = q.reshape(B, x.Hkv, -1, x.D)
        if ws is None:
            s = qf @ kb.transpose(-1, -2)  # (B, Hkv, G*r', a1-a0)
        else:
            out = ws.get("s", (B, x.Hkv, qf.shape[2], a1 - a0), qf.dtype, qf.device)
            s = torch.matmul(qf, kb.transpose(-1, -2), out=out)
        if x.similarity == "euclidean":  # -|q - k|^2 = 2 q.k - |q|^2 - |k|^2
            qq = (q * q).sum(-1).reshape(B, x.Hkv, -1, 1)
            s = 2 * s - qq - (kb * kb).sum(-1).unsqueeze(-2)
        s = s.view(B, Hq, -1, a1 - a0)[:, :, :r, k0 - a0 : k1 - a0].mul_(x.scale)
        keep = None
        if x.mods or kind is Tile.PARTIAL:
            b, h, _, j = tile_indices(x.ctx, 0, 1, k0, k1)
            i = torch.arange(x.Sq, device=s.device)[rows].view(1, 1, -1, 1)
            for mod in x.mods:
                s = mod(s, b, h, i, j, x.ctx).to(s.dtype)
            if kind is Tile.PARTIAL:
                assert x.mask is not None
                keep = x.mask.keep(b, h, i, j, x.ctx)
        s -= self.c[:, :, rows].unsqueeze(-1)
        return s, keep

    def exps(
        self,
        rows: Tensor | slice,
        k0: int,
        k1: int,
        kind: Tile,
        ws: Workspace | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(e, s - c): e = exp(s - c), exactly 0 where masked (written into ``out`` if given). Where a
        modifier made a score -inf, s - c is clamped to the lowest finite value so e * (s - c) is 0."""
        sc, keep = self.shifted(rows, k0, k1, kind, ws)
        e = torch.exp(sc, out=out) if out is not None else torch.exp(sc)
        if keep is not None:  # masked entries weigh exactly 0, even where q or k hold NaN/inf
            dropped = ~keep
            e.masked_fill_(dropped, 0.0)
            sc.masked_fill_(dropped, 0.0)
        if self.inputs.mods:
            sc.clamp_(min=torch.finfo(sc.dtype).min)
        return e, sc

    def sink_shift(self) -> Tensor | None:
        """sink - c (B, Hq, Sq), or None without sinks."""
        if self.inputs.sinks is None:
            return None
        return self.inputs.sinks.detach().to(self.c.dtype).view(1, -1, 1) - self.c


@dataclass(frozen=True)
class Block:
    """Query rows [q0, q1), inside row bins [r0, r1) of width rw (one bin split over blocks: r1 = r0 + 1)."""

    q0: int
    q1: int
    r0: int
    r1: int
    rw: int
    c_lo: int  # the key bins the row bins may attend to: [c_lo, c_hi)
    c_hi: int


def blocks(t: Tiles, qb: Bins, kb: Bins, rows: int | None = None) -> Iterator[Block]:
    """Row blocks over every query (those that keep no key at all included: their views are 0)."""
    rows = rows or ROWS
    x = t.inputs
    widest = int(torch.cat([qb.edges.diff(), kb.edges.diff()]).max()) if x.Sq and x.Sk else 0
    if widest > MAX_BIN:
        raise ValueError(
            f"resolution: bins of {widest} positions are too wide (at most {MAX_BIN}); ask for at least "
            f"{-(-max(x.Sq, x.Sk) // MAX_BIN) + qb.sinks} bins per axis"
        )
    e = qb.edges.tolist()
    for first, count, w in qb.groups():
        step = max(1, rows // w)
        for r0 in range(first, first + count, step):
            r1 = min(r0 + step, first + count)
            lo, hi = (0, x.Sk) if x.mask is None else x.mask.key_range(e[r0], e[r1], x.ctx)
            c_lo, c_hi = (kb.bin_of(lo), kb.bin_of(hi - 1) + 1) if lo < hi else (0, 0)
            if w <= rows:
                yield Block(e[r0], e[r1], r0, r1, w, c_lo, c_hi)
            else:  # one wide bin, in blocks of `rows` rows that add into the same pooled row
                for q0 in range(e[r0], e[r1], rows):
                    yield Block(q0, min(q0 + rows, e[r1]), r0, r1, w, c_lo, c_hi)


def chunks(t: Tiles, kb: Bins, blk: Block) -> Iterator[tuple[int, int, int, int, int, Tile]]:
    """(k0, k1, c0, c1, width, kind) key chunks of whole equal-width bins, EMPTY ones left out."""
    x = t.inputs
    e = kb.edges.tolist()
    cols = max(1, COLS_ELEMENTS // max(1, x.B * x.Hq * (blk.q1 - blk.q0)))
    for first, count, w in kb.groups():
        lo, hi = max(first, blk.c_lo), min(first + count, blk.c_hi)
        step = max(1, cols // w)
        for c0 in range(lo, hi, step):
            c1 = min(c0 + step, hi)
            kind = Tile.FULL if x.mask is None else x.mask.classify(blk.q0, blk.q1, e[c0], e[c1], x.ctx)
            if kind is not Tile.EMPTY:
                yield e[c0], e[c1], c0, c1, w, kind


def layer_maps(
    t: Tiles, qb: Bins, kb: Bins, stats: tuple[str, ...], query_rows: list[int]
) -> tuple[LayerMaps, Tensor]:
    """Pooled maps, received attention, entropy and exact rows of one call; and 1/Z (B, Hq, Sq)."""
    x = t.inputs
    B, Hq, cd = x.B, x.Hq, t.q.dtype
    dev = t.q.device
    received = torch.zeros(B, Hq, x.Sk, dtype=cd, device=dev)
    entropy = torch.zeros(B, Hq, x.Sq, dtype=cd, device=dev)
    inv_z = torch.zeros(B, Hq, x.Sq, dtype=cd, device=dev)
    sink = t.sink_shift()
    ws = Workspace()
    # Blocks of as many rows (up to ROWS) as let a whole block's weights stay in ebuf for pass 2; when
    # fewer than MIN_ROWS would fit (very long keys), pass 2 recomputes them instead.
    fit = KEEP_BYTES // max(1, B * Hq * x.Sk * cd.itemsize)
    per_block = min(ROWS, fit) if fit >= MIN_ROWS else ROWS
    most_rows = max((b.q1 - b.q0 for b in blocks(t, qb, kb, per_block)), default=0)
    fits = B * Hq * most_rows * x.Sk * cd.itemsize <= KEEP_BYTES
    ebuf = (
        torch.empty(B, Hq, most_rows, x.Sk, dtype=cd, device=dev) if fits else None
    )  # a block's weights, kept
    tiles: list[tuple[int, int, int, int, dict[str, Tensor]]] = []
    store: dict[str, Tensor] = {}
    for blk in blocks(t, qb, kb, per_block):
        rows, nr = blk.q1 - blk.q0, blk.r1 - blk.r0
        span = blk.c_hi - blk.c_lo
        if not tiles or tiles[-1][:2] != (blk.r0, blk.r1):
            store = {s: torch.zeros(B, Hq, nr, span, dtype=cd, device=dev) for s in stats}
            tiles.append((blk.r0, blk.r1, blk.c_lo, blk.c_hi, store))
        sl = slice(blk.q0, blk.q1)
        # Pass 1: the normalizer Z and sum_j e (s - c) of every row of the block.
        z = torch.zeros(B, Hq, rows, dtype=cd, device=dev)
        esc = torch.zeros(B, Hq, rows, dtype=cd, device=dev)
        done = list(chunks(t, kb, blk))
        for k0, k1, _, _, _, kind in done:
            out = (
                ebuf[:, :, :rows, k0:k1] if ebuf is not None else ws.get("e", (B, Hq, rows, k1 - k0), cd, dev)
            )
            e, sc = t.exps(sl, k0, k1, kind, ws, out)
            z += e.sum(-1)
            esc += sc.mul_(e).sum(-1)  # in the scores' buffer
        if sink is not None:  # the sink is one more outcome of the softmax
            ss = sink[:, :, sl]
            es = torch.exp(ss)
            z += es
            esc += es * ss
        iz = torch.where(z > 0, 1.0 / z, 0.0)
        inv_z[:, :, sl] = iz
        # H = -sum p log p with p = e / Z, log p = (s - c) - log Z
        entropy[:, :, sl] = torch.where(z > 0, torch.log(z) - esc * iz, 0.0)
        # Pass 2: weights p = e / Z (kept in ebuf, else recomputed), pooled over the rows of each bin first
        # (an elementwise sum / max across rows), then over each key bin's columns on the small result.
        izc = iz.unsqueeze(-1)
        for k0, k1, c0, c1, cw, kind in done:
            if ebuf is not None:
                p = ebuf[:, :, :rows, k0:k1]
            else:
                p, _ = t.exps(sl, k0, k1, kind, ws, ws.get("e", (B, Hq, rows, k1 - k0), cd, dev))
            pv = p.mul_(izc).view(B, Hq, nr, rows // nr, k1 - k0)
            by_rows = pv.sum(3)  # (B, Hq, nr, bk)
            received[:, :, k0:k1] += by_rows.sum(2)
            cols = slice(c0 - blk.c_lo, c1 - blk.c_lo)
            if "mean" in stats:
                store["mean"][..., cols] += by_rows.unflatten(-1, (c1 - c0, cw)).sum(-1).div_(blk.rw * cw)
            if "max" in stats:
                m = pv.amax(3).unflatten(-1, (c1 - c0, cw)).amax(-1)
                torch.maximum(store["max"][..., cols], m, out=store["max"][..., cols])
    rows_t = exact_rows(t, inv_z, query_rows) if query_rows else None
    # the views live on the CPU (pictures, save); the normalizer stays with q and k for the rollout
    cpu = [(r0, r1, c0, c1, {n: v.cpu() for n, v in st.items()}) for r0, r1, c0, c1, st in tiles]
    rows_cpu = None if rows_t is None else rows_t.cpu()
    lm = LayerMaps(tiles=cpu, received=received.cpu(), entropy=entropy.cpu(), rows=rows_cpu)
    return lm, inv_z


def exact_rows(t: Tiles, inv_z: Tensor, query_rows: list[int]) -> Tensor:
    """(B, Hq, n, Sk) exact weights of the given query positions."""
    x = t.inputs
    idx = torch.tensor(query_rows, dtype=torch.long)
    out = torch.zeros(x.B, x.Hq, len(query_rows), x.Sk, dtype=t.q.dtype, device=t.q.device)
    step = max(1, COLS_ELEMENTS // max(1, x.B * x.Hq * len(query_rows)))
    kind = Tile.FULL if x.mask is None else Tile.PARTIAL
    for k0 in range(0, x.Sk, step):
        k1 = min(k0 + step, x.Sk)
        e, _ = t.exps(idx, k0, k1, kind)
        out[..., k0:k1] = e * inv_z[:, :, idx].unsqueeze(-1)
    return out


def rollout_step(t: Tiles, inv_z: Tensor, qb: Bins, kb: Bins, v: Tensor, residual: float) -> Tensor:
    """v (B, n, Sq) -> v · (residual·I + (1 - residual)·mean_h A_h), (B, n, Sk): weighted column sums."""
    x = t.inputs
    B, Hq = x.B, x.Hq
    u = torch.zeros(B, v.shape[1], x.Sk, dtype=v.dtype, device=v.device)
    for blk in blocks(t, qb, kb):
        r = blk.q1 - blk.q0
        # (B, n, Hq*r): row weights times each head's 1/Z; the head sum folds into the matmul
        vb = (v[:, :, None, blk.q0 : blk.q1] * inv_z[:, None, :, blk.q0 : blk.q1].to(v.dtype)).reshape(
            B, -1, Hq * r
        )
        for k0, k1, _, _, _, kind in chunks(t, kb, blk):
            e, _ = t.exps(slice(blk.q0, blk.q1), k0, k1, kind)
            u[:, :, k0:k1] += vb @ e.to(v.dtype).reshape(B, Hq * r, k1 - k0)
    return residual * v + (1 - residual) / Hq * u
