"""Mask-aware schedule of context-parallel attention: which key rows each rank needs from each other.

For every (query segment of rank d, key segment of rank s) the global mask's key_range() trims the keys
and its tile classification decides: EMPTY (skip the pair, send nothing), FULL (no mask at all) or
PARTIAL (a local mask). A sliding window then needs only the last W keys of the rank before it, and
packed documents skip shards that share no document. Every rank computes the same plan from the same
global description, so no rank has to be told what to send or to expect.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from .. import masks as M
from ._layout import Layout


@dataclass(frozen=True)
class Pair:
    """Queries [qa, qa+lq) (local rows [q_loc, q_loc+lq) of the destination) against global keys
    [k0, k1), which sit at rows [buf0, buf0 + k1 - k0) of the buffer the source sends."""

    qa: int
    lq: int
    q_loc: int
    k0: int
    k1: int
    buf0: int
    full: bool


@dataclass(frozen=True)
class Transfer:
    """What rank `src` sends rank `dst`: its local key rows [a, b) for each (a, b) in runs, concatenated."""

    src: int
    dst: int
    runs: tuple[tuple[int, int], ...]
    pairs: tuple[Pair, ...]

    @property
    def rows(self) -> int:
        return sum(b - a for a, b in self.runs)


@dataclass
class Plan:
    layout: Layout
    transfers: dict[tuple[int, int], Transfer] = field(default_factory=dict)  # (dst, src) -> Transfer

    def get(self, dst: int, src: int) -> Transfer | None:
        return self.transfers.get((dst, src))

    def rows_sent(self, rank: int) -> int:
        """Key rows rank sends to other ranks (each row: K and V, Hkv heads)."""
        return sum(t.rows for (d, s), t in self.transfers.items() if s == rank and d != rank)

    def rows_received(self, rank: int) -> int:
        return sum(t.rows for (d, s), t in self.transfers.items() if d == rank and s != rank)

    def peers(self, rank: int) -> list[int]:
        """Ranks whose keys `rank` needs (itself included)."""
        return sorted({s for (d, s) in self.transfers if d == rank})

    def crc(self, dst: int, src: int) -> int:
        """A checksum of the rows src sends dst (-1: none), for checking that both ends agree."""
        tr = self.get(dst, src)
        return -1 if tr is None else zlib.crc32(repr(tr.runs).encode())

    def describe(self, rank: int) -> str:
        """What `rank` computes and receives: one line per source rank."""
        lines = [
            f"rank {rank} of {self.layout.world_size} ({self.layout.name} layout, {self.layout.total} positions)"
        ]
        for s in range(self.layout.world_size):
            tr = self.get(rank, s)
            if tr is None:
                continue
            full = sum(p.full for p in tr.pairs)
            what = "its own rows" if s == rank else f"{tr.rows} key rows received from rank {s}"
            lines.append(f"  {what}: {len(tr.pairs)} pairs ({full} unmasked, {len(tr.pairs) - full} masked)")
        skipped = [s for s in range(self.layout.world_size) if self.get(rank, s) is None]
        if skipped:
            lines.append(f"  ranks {skipped}: nothing (the mask keeps none of their keys for these queries)")
        return "\n".join(lines)

    def steps(self) -> list[int]:
        """Ring steps t (rank r receives from r - t) with a transfer in this plan (a plan made for one rank:
        the steps on which it sends or receives)."""
        P = self.layout.world_size
        return sorted({(d - s) % P for (d, s) in self.transfers})


# Descriptors whose repr says everything about them (no function, no tensor that repr abbreviates):
# their plans are cached, so a model's layers do not each rebuild the same plan.
_VALUE_MASKS = (
    M.causal,
    M.sliding_window,
    M.prefix_lm,
    M.document,
    M.document_causal,
    M.padding,
    M.left_padding,
)
_CACHE: dict[tuple, Plan] = {}
_CACHE_MAX = 64


def _cache_key(layout: Layout, mask: M.Mask | None, ctx: M.MaskContext, rank: int | None) -> tuple | None:
    if mask is not None and not all(isinstance(m, _VALUE_MASKS) for m in mask.leaves()):
        return None
    return (layout.segments, repr(mask), ctx.B, ctx.Hq, ctx.Sq, ctx.Sk, rank)


def make_plan(layout: Layout, mask: M.Mask | None, ctx: M.MaskContext, rank: int | None = None) -> Plan:
    """The plan of a global problem ctx (Sq = Sk = layout.total) under `mask` (global positions).

    With `rank`, only the transfers that rank sends or receives (2P - 1 of the P² pairs): all it needs.
    """
    key = _cache_key(layout, mask, ctx, rank)
    if key is not None and key in _CACHE:
        return _CACHE[key]
    plan = _make_plan(layout, mask, ctx, rank)
    if key is not None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = plan
    return plan


def _make_plan(layout: Layout, mask: M.Mask | None, ctx: M.MaskContext, rank: int | None) -> Plan:
    plan = Plan(layout)
    P = layout.world_size
    for d in range(P):
        q_runs = layout.local_runs(d)
        for s in range(P):
            if rank is not None and rank not in (d, s):
                continue
            runs: list[tuple[int, int]] = []
            pairs: list[Pair] = []
            for k_loc, ka, lk in layout.local_runs(s):
                wanted = []
                for q_loc, qa, lq in q_runs:
                    if lq == 0 or lk == 0:
                        continue
                    lo, hi = (ka, ka + lk) if mask is None else mask.key_range(qa, qa + lq, ctx)
                    lo, hi = max(lo, ka), min(hi, ka + lk)
                    if lo >= hi:
                        continue
                    kind = M.Tile.FULL if mask is None else mask.classify(qa, qa + lq, lo, hi, ctx)
                    if kind is M.Tile.EMPTY:
                        continue
                    wanted.append((qa, lq, q_loc, lo, hi, kind is M.Tile.FULL))
                if not wanted:
                    continue
                a, b = min(w[3] for w in wanted), max(w[4] for w in wanted)  # hull of this segment's rows
                base = sum(y - x for x, y in runs)
                runs.append((k_loc + a - ka, k_loc + b - ka))
                pairs += [
                    Pair(qa, lq, q_loc, lo, hi, base + lo - a, full) for qa, lq, q_loc, lo, hi, full in wanted
                ]
            if pairs:
                pairs.sort(key=lambda p: (p.q_loc, p.k0))
                plan.transfers[(d, s)] = Transfer(s, d, tuple(runs), tuple(pairs))
    return plan
