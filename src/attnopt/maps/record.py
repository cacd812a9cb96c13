"""Record exact attention views while a model runs on attnopt, never building an N×N tensor.

    with attnopt.maps.record(resolution=512, query_rows=[-1], rollout_rows=[-1]) as rec:
        model(input_ids)                      # loaded with attn_implementation="attnopt"
    maps = rec.maps                           # AttentionMaps: pooled maps, received, entropy, rows, rollout

Every ``attnopt.attention`` call inside the block (one per layer for a transformers model) is one layer
of the recording. Each call also returns its LSE, so automatic dispatch may pick an LSE-capable backend
(outputs equal within the tolerance rule, not always bit for bit); a pinned backend runs as asked, with
the LSE from a second call. The views are then computed from q, k and the LSE tile by tile (``_sweep``),
in O(N) memory. Calls inside torch.compile'd code are not observed.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import api
from .._inputs import AttentionInputs
from ._result import STATS, AttentionMaps, Bins, LayerMaps
from ._sweep import Tiles, layer_maps, rollout_step


def _int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r}; allowed: an int >= {lo}")
    return value


def _positions(name: str, value: object) -> list[int]:
    """Query positions as a list of ints: an int, or a sequence / 1-D tensor of integers (not bools)."""
    if isinstance(value, Tensor):
        if value.ndim > 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(
                f"{name}: a {value.dtype} tensor of shape {tuple(value.shape)}; allowed: 1-D integers"
            )
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(
            f"{name}={value!r}; allowed: a sequence of ints (query positions; negative counts back)"
        )
    out = []
    for v in value:
        try:
            if isinstance(v, bool) or (isinstance(v, Tensor) and v.dtype == torch.bool):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(
                f"{name}: {v!r} is not an int; allowed: query positions (negative counts back)"
            ) from None
    return out


def _resolve(name: str, rows: list[int], Sq: int) -> list[int]:
    out = []
    for r in rows:
        if not -Sq <= r < Sq:
            raise ValueError(
                f"{name}: position {r} is outside the {Sq} queries of this call; allowed: [-{Sq}, {Sq})"
            )
        out.append(r % Sq)
    return out


class record:
    """Context manager: record exact attention views of every attnopt attention call made inside it.

    Args:
        resolution: bins per axis of the pooled maps (at most; the bin width is ceil((N - sinks) /
            (resolution - sinks)), 1 when N fits).
        sink_tokens: the first positions, each kept in a bin of its own on both axes (attention sinks).
        stats: which pooled maps to keep, of ('mean', 'max').
        query_rows: query positions whose exact rows of weights are kept for every layer.
        rollout_rows: query positions of the last layer whose attention rollout (Abnar & Zuidema 2020:
            residual·I + (1 - residual)·mean over heads, multiplied through the layers) is computed.
            This keeps each layer's q and k until the end: O(N·layers·heads·D) memory, not N².
        residual: the identity's share in each rollout step (0.5 in the paper).
        tokens: the text of each position (labels in the pictures).
        model: optional; if given, it must run on attnopt (checked before anything runs).
    """

    def __init__(
        self,
        *,
        resolution: int = 512,
        sink_tokens: int = 4,
        stats: Sequence[str] = STATS,
        query_rows: Sequence[int] | int = (),
        rollout_rows: Sequence[int] | int = (),
        residual: float = 0.5,
        tokens: list[str] | None = None,
        model: Any = None,
    ) -> None:
        self.resolution = _int("resolution", resolution, 1)
        self.sink_tokens = _int("sink_tokens", sink_tokens, 0)
        if self.sink_tokens >= self.resolution:
            raise ValueError(f"sink_tokens={sink_tokens}; allowed: fewer than resolution={resolution}")
        if isinstance(stats, str) or not stats or any(s not in STATS for s in stats):
            raise ValueError(f"stats={stats!r}; allowed: a non-empty sequence of {STATS}")
        self.stats = tuple(s for s in STATS if s in stats)
        self.query_rows = _positions("query_rows", query_rows)
        self.rollout_rows = _positions("rollout_rows", rollout_rows)
        if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0 <= residual <= 1:
            raise ValueError(f"residual={residual!r}; allowed: a number in [0, 1]")
        self.residual = float(residual)
        if tokens is not None and (
            not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens)
        ):
            raise TypeError("tokens: expected a list of str (the text of each position) or None")
        self.tokens = tokens
        if model is not None:
            impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if impl != "attnopt":
                raise ValueError(
                    f"model: its attention implementation is {impl!r}; attnopt.maps records only what runs "
                    f"through attnopt. Load it with attn_implementation='attnopt' (after "
                    f"attnopt.integrations.transformers.register())."
                )
        self._layers: list[LayerMaps] = []
        self._kept: list[tuple[Tiles, Tensor, Bins, Bins]] = []  # for the rollout
        self._bins: tuple[Bins, Bins] | None = None
        self._maps: AttentionMaps | None = None
        self.seconds = 0.0

    # ---------------------------------------------------------------------------------- recording
    def __enter__(self) -> record:
        if self._observe in api._OBSERVERS:
            raise RuntimeError("this record() is already active; use a new one per recording")
        self._layers, self._kept, self._maps = [], [], None
        api._OBSERVERS.append(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        api._OBSERVERS.remove(self._observe)

    def _observe(self, inputs: AttentionInputs, lse: Tensor) -> None:
        t0 = time.perf_counter()
        x = inputs
        if x.dropout_p > 0:
            raise NotImplementedError(
                "attnopt.maps: a call with dropout_p > 0 has random weights; record in eval mode (model.eval())"
            )
        bins = (
            Bins.make(x.Sq, self.resolution, self.sink_tokens),
            Bins.make(x.Sk, self.resolution, self.sink_tokens),
        )
        if self._bins is None:
            if self.tokens is not None and len(self.tokens) != x.Sk:
                raise ValueError(
                    f"tokens: {len(self.tokens)} texts for a call with Sk={x.Sk} keys; give one text per position"
                )
            self._bins = bins
        elif (self._bins[0].n, self._bins[1].n) != (x.Sq, x.Sk):
            raise ValueError(
                f"attnopt.maps.record: call {len(self._layers)} has Sq={x.Sq}, Sk={x.Sk} but the first call had "
                f"Sq={self._bins[0].n}, Sk={self._bins[1].n}; record one forward pass (not generate) per recording"
            )
        rows = _resolve("query_rows", self.query_rows, x.Sq)
        if x.B == 0 or x.Hq == 0:  # nothing attends: empty views (attention() accepts these shapes too)
            if self.rollout_rows:
                raise ValueError(
                    "rollout_rows: a call with no batch elements or heads has nothing to roll out"
                )
            rows_t = torch.zeros(x.B, x.Hq, len(rows), x.Sk) if rows else None
            received, entropy = torch.zeros(x.B, x.Hq, x.Sk), torch.zeros(x.B, x.Hq, x.Sq)
            self._layers.append(LayerMaps([], received, entropy, rows_t, f"call {len(self._layers)}"))
            return
        tiles = Tiles.make(x, lse)
        lm, inv_z = layer_maps(tiles, *bins, self.stats, rows)
        lm.name = f"call {len(self._layers)}"
        self._layers.append(lm)
        if self.rollout_rows:
            if x.Sq != x.Sk:
                raise ValueError(
                    f"rollout_rows: rollout needs self-attention (Sq == Sk), got Sq={x.Sq}, Sk={x.Sk}"
                )
            self._kept.append((tiles, inv_z, *bins))
        self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------ results
    @property
    def maps(self) -> AttentionMaps:
        """The recording (the rollout is computed on first access, after the forward pass)."""
        if self._observe in api._OBSERVERS:
            raise RuntimeError("record.maps: read the maps after the `with` block has ended")
        if not self._layers or self._bins is None:
            raise RuntimeError(
                "record.maps: nothing was recorded (no attnopt attention call ran inside the block; calls "
                "inside torch.compile'd code are not observed: record an uncompiled forward pass)"
            )
        if self._maps is None:
            t0 = time.perf_counter()
            rollout, rrows = None, []
            if self.rollout_rows:
                rrows = _resolve("rollout_rows", self.rollout_rows, self._bins[0].n)
                rollout = rollout_rows_through(self._kept, rrows, self.residual)
                self._kept = []  # q and k are no longer needed
            self.seconds += time.perf_counter() - t0
            self._maps = AttentionMaps(
                q_bins=self._bins[0],
                k_bins=self._bins[1],
                layers=self._layers,
                stats=self.stats,
                tokens=self.tokens,
                query_rows=_resolve("query_rows", self.query_rows, self._bins[0].n),
                rollout_rows=rrows,
                rollout=rollout,
                meta={
                    "resolution": self.resolution,
                    "sink_tokens": self.sink_tokens,
                    "seconds": self.seconds,
                },
            )
        return self._maps


def rollout_rows_through(
    kept: list[tuple[Tiles, Tensor, Bins, Bins]], rows: list[int], residual: float
) -> Tensor:
    """(B, n, S) rollout of the given last-layer query rows, applying the layers from the last down."""
    last = kept[-1][0].inputs
    v = torch.zeros(last.B, len(rows), last.Sq, dtype=torch.float64, device=last.q.device)
    v[:, torch.arange(len(rows)), torch.tensor(rows)] = 1.0
    for t, inv_z, qb, kb in reversed(kept):
        v = rollout_step(t, inv_z, qb, kb, v, residual)
    return v.to(kept[-1][1].dtype).cpu()


def attention_maps(
    q: Tensor,
    k: Tensor,
    *,
    mask: Any = None,
    score_mod: Any = None,
    similarity: str = "dot",
    scale: float | None = None,
    sinks: Tensor | None = None,
    lse: Tensor | None = None,
    resolution: int = 512,
    sink_tokens: int = 4,
    stats: Sequence[str] = STATS,
    query_rows: Sequence[int] | int = (),
    tokens: list[str] | None = None,
) -> AttentionMaps:
    """The views of one attention call ``attnopt.attention(q, k, ·, **same)`` without running a model.

    ``lse`` (B, Hq, Sq) may be passed if known (``return_lse=True``); otherwise it is computed first.
    """
    v = k  # any values give the LSE; k has the shape the fast kernels take
    rec = record(
        resolution=resolution, sink_tokens=sink_tokens, stats=stats, query_rows=query_rows, tokens=tokens
    )
    kwargs = {"mask": mask, "score_mod": score_mod, "similarity": similarity, "scale": scale, "sinks": sinks}
    if lse is None:
        with rec:
            api.attention(q, k, v, **kwargs)
    else:
        inputs = api._validate(q, k, v, mask, score_mod, similarity, scale, sinks, 0.0, True, "auto", None)
        if lse.shape != (inputs.B, inputs.Hq, inputs.Sq):
            raise ValueError(
                f"lse: shape {tuple(lse.shape)}; expected (B, Hq, Sq) = {(inputs.B, inputs.Hq, inputs.Sq)}"
            )
        with rec:
            rec._observe(inputs, lse)
    return rec.maps
