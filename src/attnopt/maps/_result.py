"""What a recording holds: bins, pooled maps per layer (stored tile-sparse), received attention, entropy,
exact rows and rollout, with dense accessors for one layer at a time and save/load."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

STATS = ("mean", "max")


@dataclass(frozen=True)
class Bins:
    """How positions 0..n-1 of one axis are pooled: ``edges`` (nbins + 1,) int64, bin t = [edges[t], edges[t+1]).

    The first ``sinks`` positions get one bin each (attention sinks stay visible after pooling); the rest
    are split into bins of ``size`` positions, the last one possibly shorter.
    """

    n: int
    sinks: int
    size: int
    edges: Tensor

    @classmethod
    def make(cls, n: int, resolution: int, sinks: int = 4) -> Bins:
        """At most ``resolution`` bins over n positions, the first ``sinks`` positions alone."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n={n!r}; allowed: an int >= 0")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution={resolution!r}; allowed: an int >= 1 (bins per axis)")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or not 0 <= sinks < resolution:
            raise ValueError(
                f"sink_tokens={sinks!r}; allowed: an int with 0 <= sink_tokens < resolution={resolution}"
            )
        s = min(sinks, n)
        rest = n - s
        size = 1 if rest <= resolution - s else math.ceil(rest / (resolution - s))
        edges = list(range(s + 1)) + list(range(s + size, n, size))
        if edges[-1] != n:
            edges.append(n)
        return cls(n, s, size, torch.tensor(edges, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.edges) - 1

    def groups(self) -> list[tuple[int, int, int]]:
        """Runs of equal-size bins: (first bin, number of bins, bin size)."""
        out: list[tuple[int, int, int]] = []
        e = self.edges.tolist()
        for t in range(len(e) - 1):
            w = e[t + 1] - e[t]
            if out and out[-1][2] == w:
                out[-1] = (out[-1][0], out[-1][1] + 1, w)
            else:
                out.append((t, 1, w))
        return out

    def bin_of(self, pos: int) -> int:
        """The bin holding position pos."""
        return int(torch.searchsorted(self.edges, torch.tensor(pos), right=True)) - 1

    def labels(self, tokens: Sequence[str] | None = None, width: int = 24) -> list[str]:
        """One label per bin: its position span and, with tokens, their text (shortened to ``width``)."""
        e = self.edges.tolist()
        out = []
        for a, b in itertools.pairwise(e):
            span = f"{a}" if b - a == 1 else f"{a}-{b - 1}"
            if tokens is not None:
                text = "".join(tokens[a:b])
                text = text if len(text) <= width else text[: width - 1] + "…"
                out.append(f"{span} {text}")
            else:
                out.append(span)
        return out


@dataclass
class LayerMaps:
    """One attention call's views. Pooled maps are kept as tiles (r0, r1, c0, c1, {stat: (B, H, r1-r0, c1-c0)})
    in bin units; bins outside every tile are exactly 0 (nothing attended there)."""

    tiles: list[tuple[int, int, int, int, dict[str, Tensor]]]
    received: (
        Tensor  # (B, H, Sk): sum over queries of the weights each key gets (float32; float64 inputs: float64)
    )
    entropy: Tensor  # (B, H, Sq): entropy (nats) of each query's softmax (a sink logit counts as an outcome)
    rows: Tensor | None = None  # (B, H, n, Sk): exact weights of the chosen query rows
    name: str = ""


@dataclass
class AttentionMaps:
    """Exact attention views of one recorded forward pass; see ``attnopt.maps.record``.

    Layer-level accessors give dense tensors of one layer: ``pooled(layer)`` is (H, R, C) for one batch
    element; ``received`` / ``entropy`` stack all layers. Masked-out weights count as 0, so the mean of a
    bin is the mean of eager attention's dense weights over that bin.
    """

    q_bins: Bins
    k_bins: Bins
    layers: list[LayerMaps]
    stats: tuple[str, ...] = STATS
    tokens: list[str] | None = None  # text of each position (batch element 0)
    query_rows: list[int] = field(default_factory=list)
    rollout_rows: list[int] = field(default_factory=list)
    rollout: Tensor | None = None  # (B, n, Sk) attention rollout of rollout_rows through all layers
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------- shape
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return int(self.layers[0].received.shape[1]) if self.layers else 0

    @property
    def batch(self) -> int:
        return int(self.layers[0].received.shape[0]) if self.layers else 0

    @property
    def Sq(self) -> int:
        return self.q_bins.n

    @property
    def Sk(self) -> int:
        return self.k_bins.n

    def _layer(self, layer: int) -> LayerMaps:
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not -self.num_layers <= layer < self.num_layers
        ):
            raise IndexError(
                f"layer={layer!r}; allowed: an int in [0, {self.num_layers}) (negative counts back)"
            )
        return self.layers[layer]

    # ---------------------------------------------------------------------------------- accessors
    def pooled(self, layer: int, stat: str = "mean", batch: int = 0) -> Tensor:
        """(H, R, C) pooled map of one layer: ``stat`` ('mean' or 'max') of the weights in each bin pair."""
        if stat not in self.stats:
            raise ValueError(f"stat={stat!r}; allowed: one of {self.stats} (the stats this recording kept)")
        if not 0 <= batch < self.batch:
            raise IndexError(f"batch={batch!r}; allowed: an int in [0, {self.batch})")
        lm = self._layer(layer)
        out = torch.zeros(self.num_heads, len(self.q_bins), len(self.k_bins), dtype=lm.received.dtype)
        for r0, r1, c0, c1, t in lm.tiles:
            out[:, r0:r1, c0:c1] = t[stat][batch]
        return out

    @property
    def received(self) -> Tensor:
        """(L, B, H, Sk): per layer and head, the total weight each key receives (sink plots)."""
        return torch.stack([lm.received for lm in self.layers])

    @property
    def entropy(self) -> Tensor:
        """(L, B, H, Sq): entropy in nats of each query's attention distribution."""
        return torch.stack([lm.entropy for lm in self.layers])

    @property
    def rows(self) -> Tensor | None:
        """(L, B, H, n, Sk): the exact weights of ``query_rows`` in every layer, or None."""
        if not self.query_rows:
            return None
        return torch.stack([lm.rows for lm in self.layers])  # type: ignore[misc]

    @property
    def query_tokens(self) -> list[str] | None:
        """The text of each query: ``tokens`` are per key, and query i sits at key position i + Sk - Sq
        (bottom-right alignment, as a KV cache has it)."""
        if self.tokens is None or len(self.tokens) != self.Sk or self.Sq > self.Sk:
            return None
        return self.tokens[self.Sk - self.Sq :]

    def labels(self, axis: str = "k") -> list[str]:
        """Bin labels of the query ('q') or key ('k') axis: position span plus token text."""
        if axis not in ("q", "k"):
            raise ValueError(f"axis={axis!r}; allowed: 'q' or 'k'")
        return self.q_bins.labels(self.query_tokens) if axis == "q" else self.k_bins.labels(self.tokens)

    def to_bertviz(self, stat: str = "mean", batch: int = 0) -> tuple[list[Tensor], list[str]]:
        """``(attention, tokens)`` for bertviz's head_view / model_view: one (1, H, R, C) tensor per layer and
        one label per bin (self-attention, so query and key bins must match)."""
        if not torch.equal(self.q_bins.edges, self.k_bins.edges):
            raise ValueError(
                "to_bertviz: query and key bins differ (Sq != Sk); bertviz draws self-attention only"
            )
        return [self.pooled(li, stat, batch).unsqueeze(0) for li in range(self.num_layers)], self.labels("k")

    def nbytes(self) -> int:
        """Bytes held by the tensors of this recording."""
        total = 0
        for lm in self.layers:
            for *_, t in lm.tiles:
                total += sum(x.numel() * x.element_size() for x in t.values())
            for x in (lm.received, lm.entropy, lm.rows):
                total += 0 if x is None else x.numel() * x.element_size()
        if self.rollout is not None:
            total += self.rollout.numel() * self.rollout.element_size()
        return total

    # ------------------------------------------------------------------------------------ storage
    def save(self, path: str) -> None:
        """Write to ``path`` (torch.save of plain tensors, lists and dicts; load with ``AttentionMaps.load``)."""
        torch.save(_to_plain(self), path)

    @classmethod
    def load(cls, path: str) -> AttentionMaps:
        d = torch.load(path, weights_only=True)
        layers = [
            LayerMaps(
                tiles=[(a, b, c, e, t) for a, b, c, e, t in lm["tiles"]],
                received=lm["received"],
                entropy=lm["entropy"],
                rows=lm["rows"],
                name=lm["name"],
            )
            for lm in d["layers"]
        ]
        qb, kb = (Bins(b["n"], b["sinks"], b["size"], b["edges"]) for b in (d["q_bins"], d["k_bins"]))
        return cls(
            qb,
            kb,
            layers,
            tuple(d["stats"]),
            d["tokens"],
            d["query_rows"],
            d["rollout_rows"],
            d["rollout"],
            d["meta"],
        )


def _to_plain(m: AttentionMaps) -> dict[str, Any]:
    def bins(b: Bins) -> dict[str, Any]:
        return {"n": b.n, "sinks": b.sinks, "size": b.size, "edges": b.edges}

    return {
        "q_bins": bins(m.q_bins),
        "k_bins": bins(m.k_bins),
        "layers": [
            {
                "tiles": [list(t) for t in lm.tiles],
                "received": lm.received,
                "entropy": lm.entropy,
                "rows": lm.rows,
                "name": lm.name,
            }
            for lm in m.layers
        ],
        "stats": list(m.stats),
        "tokens": m.tokens,
        "query_rows": m.query_rows,
        "rollout_rows": m.rollout_rows,
        "rollout": m.rollout,
        "meta": m.meta,
    }


def from_dense(
    weights: Sequence[Tensor],
    *,
    resolution: int = 512,
    sink_tokens: int = 4,
    query_rows: Sequence[int] = (),
    rollout_rows: Sequence[int] = (),
    tokens: list[str] | None = None,
) -> AttentionMaps:
    """The same views computed the obvious way from dense (B, H, Sq, Sk) weights per layer (eager's
    ``output_attentions``), in float64, stored in float32 (float64 for float64 weights): the oracle the
    tile-wise recorder is tested against."""
    if not weights:
        raise ValueError("weights: an empty sequence; expected one (B, H, Sq, Sk) tensor per layer")
    Sq, Sk = weights[0].shape[-2:]
    qb, kb = Bins.make(Sq, resolution, sink_tokens), Bins.make(Sk, resolution, sink_tokens)
    layers = []
    for w in weights:
        dt = w.dtype if w.dtype == torch.float64 else torch.float32
        w = w.double()
        mean = _pool(w, qb, kb, "mean")
        mx = _pool(w, qb, kb, "max")
        ent = -torch.special.xlogy(w, w).sum(-1)
        rows = w[:, :, list(query_rows)].to(dt) if query_rows else None
        layers.append(
            LayerMaps(
                tiles=[(0, len(qb), 0, len(kb), {"mean": mean.to(dt), "max": mx.to(dt)})],
                received=w.sum(-2).to(dt),
                entropy=ent.to(dt),
                rows=rows,
            )
        )
    rollout = None
    if rollout_rows:
        rollout = dense_rollout(weights)[:, list(rollout_rows)].to(layers[0].received.dtype)
    return AttentionMaps(qb, kb, layers, STATS, tokens, list(query_rows), list(rollout_rows), rollout)


def dense_rollout(weights: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """(B, S, S) attention rollout (Abnar & Zuidema 2020): product over layers, last layer leftmost, of
    residual·I + (1 - residual)·mean over heads of A, in float64."""
    R = None
    for w in weights:
        a = w.double().mean(1)
        a = (1 - residual) * a + residual * torch.eye(a.shape[-1], dtype=a.dtype)
        R = a if R is None else a @ R
    assert R is not None
    return R


def _pool(w: Tensor, qb: Bins, kb: Bins, stat: str) -> Tensor:
    """Mean or max of w (B, H, Sq, Sk) over each (query bin x key bin), by scatter along both axes."""
    qid = torch.repeat_interleave(torch.arange(len(qb)), qb.edges.diff())
    kid = torch.repeat_interleave(torch.arange(len(kb)), kb.edges.diff())
    B, H = w.shape[:2]
    reduce = "sum" if stat == "mean" else "amax"
    t = torch.zeros(B, H, len(qb), w.shape[-1], dtype=w.dtype)
    t = t.scatter_reduce(2, qid.view(1, 1, -1, 1).expand_as(w), w, reduce, include_self=False)
    out = torch.zeros(B, H, len(qb), len(kb), dtype=w.dtype)
    out = out.scatter_reduce(3, kid.view(1, 1, 1, -1).expand_as(t), t, reduce, include_self=False)
    if stat == "mean":
        out /= qb.edges.diff().view(-1, 1).to(w.dtype) * kb.edges.diff().view(1, -1).to(w.dtype)
    return out
