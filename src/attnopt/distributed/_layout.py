"""Which global sequence positions each rank holds: contiguous blocks or the zigzag (head-tail) layout.

A layout is a list of segments per rank, ``(global_start, length)`` in the order the rank stores them.
``contiguous``: rank r holds one block (the blocks may differ in length). ``zigzag``: the sequence is cut
into 2P chunks and rank r holds chunks r and 2P-1-r, which balances causal work (every rank gets one
early and one late chunk), as ring-flash-attn's zigzag and torch's head-tail load balancer do.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")

Segment = tuple[int, int]  # (global start, length)


def _bounds(n: int, parts: int) -> list[int]:
    """Cut points of n positions into `parts` near-equal chunks (the first n % parts get one more)."""
    q, r = divmod(n, parts)
    return [c * q + min(c, r) for c in range(parts + 1)]


@dataclass(frozen=True)
class Layout:
    """segments[r]: the (global start, length) runs rank r holds, in its local order."""

    segments: tuple[tuple[Segment, ...], ...]
    name: str = "custom"

    def __post_init__(self):
        for r, segs in enumerate(self.segments):
            for seg in segs:
                ok = isinstance(seg, tuple) and len(seg) == 2 and all(type(x) is int for x in seg)
                if not ok or seg[0] < 0 or seg[1] < 0:
                    raise ValueError(
                        f"layout segment {seg!r} of rank {r} must be a (start >= 0, length >= 0) pair of ints"
                    )
        covered = sorted((a, n) for segs in self.segments for a, n in segs if n > 0)
        pos = 0
        for a, n in covered:
            if a != pos:
                raise ValueError(
                    f"layout segments must tile [0, N) exactly once; position {pos} is "
                    f"{'missing' if a > pos else 'held twice'} ({self.segments})"
                )
            pos = a + n

    @classmethod
    def contiguous(cls, lengths: Sequence[int]) -> Layout:
        """Rank r holds the block of lengths[r] positions that follows rank r-1's."""
        starts = [0, *itertools.accumulate(lengths)]
        return cls(tuple(((starts[r], n),) for r, n in enumerate(lengths)), "contiguous")

    @classmethod
    def zigzag(cls, n: int, world_size: int) -> Layout:
        """2P near-equal chunks; rank r holds chunks r and 2P-1-r (in that order)."""
        b = _bounds(n, 2 * world_size)
        segs = tuple(
            (
                (b[r], b[r + 1] - b[r]),
                (b[2 * world_size - 1 - r], b[2 * world_size - r] - b[2 * world_size - 1 - r]),
            )
            for r in range(world_size)
        )
        return cls(segs, "zigzag")

    @classmethod
    def zigzag_documents(cls, cu_seqlens: Sequence[int], world_size: int) -> Layout:
        """Zigzag inside every packed document: each document is cut into 2P chunks and rank r holds
        chunks r and 2P-1-r of each (torch's per-document head-tail balancer). With causal attention
        inside documents every rank then gets the same work whatever the document lengths, where a
        global zigzag leaves the ranks holding long documents' tails with more."""
        cu = [int(x) for x in cu_seqlens]
        if not cu or cu[0] != 0 or any(b < a for a, b in itertools.pairwise(cu)):
            raise ValueError(f"cu_seqlens={cu} must start at 0 and never decrease")
        P = world_size
        segs: list[list[Segment]] = [[] for _ in range(P)]
        for a, b in itertools.pairwise(cu):
            bounds = [a + x for x in _bounds(b - a, 2 * P)]
            for r in range(P):
                for c in (r, 2 * P - 1 - r):
                    if bounds[c + 1] > bounds[c]:
                        segs[r].append((bounds[c], bounds[c + 1] - bounds[c]))
        return cls(tuple(tuple(x) for x in segs), "zigzag_documents")

    @classmethod
    def make(cls, layout: str | Layout, n: int, world_size: int) -> Layout:
        """A named layout of n positions over world_size ranks (contiguous: near-equal blocks)."""
        if isinstance(layout, Layout):
            if layout.world_size != world_size or layout.total != n:
                raise ValueError(
                    f"layout holds {layout.total} positions on {layout.world_size} ranks; expected {n} on {world_size}"
                )
            return layout
        if layout == "zigzag":
            return cls.zigzag(n, world_size)
        if layout == "contiguous":
            b = _bounds(n, world_size)
            return cls.contiguous([b[r + 1] - b[r] for r in range(world_size)])
        raise ValueError(f"layout={layout!r} is unknown; allowed: {LAYOUTS} or an attnopt.distributed.Layout")

    @property
    def world_size(self) -> int:
        return len(self.segments)

    @property
    def total(self) -> int:
        return sum(n for segs in self.segments for _, n in segs)

    def local_length(self, rank: int) -> int:
        return sum(n for _, n in self.segments[rank])

    def positions(self, rank: int, device: torch.device | str | None = None) -> Tensor:
        """Global positions of rank's rows, in its local order (int64): RoPE position_ids of a shard."""
        parts = [torch.arange(a, a + n, device=device) for a, n in self.segments[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def local_runs(self, rank: int) -> list[tuple[int, int, int]]:
        """(local start, global start, length) of each segment of rank."""
        out, at = [], 0
        for a, n in self.segments[rank]:
            out.append((at, a, n))
            at += n
        return out

    def order(self, device: torch.device | str | None = None) -> Tensor:
        """Global position of each row of all ranks' shards concatenated in rank order."""
        return torch.cat([self.positions(r, device) for r in range(self.world_size)])


def _rank_and_size(rank: int | None, world_size: int | None, group) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            "pass rank= and world_size=, or initialize torch.distributed first (e.g. launch with torchrun)"
        )
    return (dist.get_rank(group) if rank is None else rank), (
        dist.get_world_size(group) if world_size is None else world_size
    )


def shard(
    x: Tensor,
    *,
    dim: int = 2,
    layout: str | Layout = "zigzag",
    rank: int | None = None,
    world_size: int | None = None,
    group=None,
) -> Tensor:
    """This rank's part of a full-sequence tensor along `dim`, in the layout's local order (a copy).

    rank / world_size default to the process group's. q, k, v (B, H, S, D) shard along dim=2,
    input_ids / position_ids (B, S) along dim=1.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"shard: x must be a torch.Tensor, got {type(x).__name__}")
    dim = dim % x.ndim if x.ndim else dim
    r, p = _rank_and_size(rank, world_size, group)
    lay = Layout.make(layout, x.shape[dim], p)
    if not 0 <= r < p:
        raise ValueError(f"shard: rank={r} is outside [0, world_size={p})")
    parts = [x.narrow(dim, a, n) for a, n in lay.segments[r]]
    return torch.cat(parts, dim=dim) if parts else x.narrow(dim, 0, 0).clone()


def unshard(x: Tensor, *, dim: int = 2, layout: str | Layout = "zigzag", group=None) -> Tensor:
    """The full-sequence tensor from every rank's shard (all-gather; shards may differ in length).

    Differentiable: the gradient of the full tensor flows back to this rank's shard.
    """
    import torch.distributed as dist

    from ._comm import AllGather

    if not isinstance(x, Tensor):
        raise TypeError(f"unshard: x must be a torch.Tensor, got {type(x).__name__}")
    dim = dim % x.ndim
    if dist.get_rank(group) < 0:
        raise ValueError(f"unshard: this process is not a member of group={group!r}")
    p = dist.get_world_size(group)
    n_local = torch.tensor([x.shape[dim]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n_local) for _ in range(p)]
    dist.all_gather(sizes, n_local, group=group)
    lengths = [int(s) for s in sizes]
    lay = Layout.contiguous(lengths) if layout == "contiguous" else Layout.make(layout, sum(lengths), p)
    if [lay.local_length(r) for r in range(p)] != lengths:
        raise ValueError(
            f"unshard: the ranks hold {lengths} positions; layout {lay.name} expects "
            f"{[lay.local_length(r) for r in range(p)]}"
        )
    width = max(lengths)
    pad = list(x.shape)
    pad[dim] = width - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim) if pad[dim] else x
    gathered = AllGather.apply(padded, group)
    runs = sorted(
        ((g, gathered[r].narrow(dim, at, n)) for r in range(p) for at, g, n in lay.local_runs(r) if n),
        key=lambda run: run[0],
    )
    if not runs:
        return x.narrow(dim, 0, 0)
    return torch.cat([t for _, t in runs], dim=dim)
