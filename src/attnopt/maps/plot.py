"""Static pictures of an ``AttentionMaps`` recording (PNG, SVG or PDF, by the file's extension), for papers
and READMEs: a layer's heads, an overview of all layers, the attention each key receives, and the exact
rows / rollout of chosen queries.

Needs matplotlib (``pip install 'attnopt[maps]'``), imported on first use. Figures are drawn on their own
``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot: nothing is shown, nothing is
registered in pyplot's figure list, the caller's backend is left alone, and each figure is cleared after
it is written.

Pooled maps are drawn in bin coordinates, one column per key bin and one row per query bin, so the axes
are not linear in tokens: the first ``sinks`` bins hold one token each (attention sinks stay visible at
any context length) and, next to hundreds of bins, are drawn a few units wide (the subtitle says so);
tick labels give token positions, and token text where the recording has tokens. Long curves are
thinned to their per-pixel min/max envelope, which draws the same and keeps SVG/PDF files small.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._result import AttentionMaps, Bins

__all__ = ["plot_heads", "plot_layers", "plot_received", "plot_rows"]

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
PNG_DPI = 140
CMAP = "viridis"
_PANEL = 2.3  # inches per map panel
# Leader lines of labels: straight, unclipped (clipping them to the text box costs most of a figure's time).
_LEADER = {"shrinkA": 0, "shrinkB": 0, "patchA": None}
_LOG_RANGE = 1e-6  # the log colour scale spans at most this factor below its maximum


# ------------------------------------------------------------------------------------------ public
def plot_heads(
    maps: AttentionMaps,
    path: str | os.PathLike[str],
    *,
    layer: int,
    stat: str = "mean",
    batch: int = 0,
    cols: int | None = None,
    log: bool = True,
    cmap: str = CMAP,
) -> str:
    """A grid of one layer's query heads, each its pooled (query bin x key bin) map, with one shared colour
    scale (logarithmic by default: attention is heavy tailed). Bins with no attention at all (masked, e.g.
    above the causal diagonal) are left white. Returns ``path`` as a string."""
    fmt = _format(path)
    _check_maps(maps)
    li = _layer(maps, layer)
    _check_stat(maps, stat)
    _check_batch(maps, batch)
    H = maps.num_heads
    nrows, ncols = _grid(H, cols)
    mpl = _mpl()
    data = maps.pooled(li, stat, batch).float().numpy()  # (H, R, C)
    titles = [f"L{li} H{h}" for h in range(H)]
    heading = f"Layer {li}: {stat} attention per bin, all {H} heads" + (
        f", batch {batch}" if maps.batch > 1 else ""
    )
    fig = _map_grid(mpl, maps, data, titles, nrows, ncols, heading, stat, log, cmap)
    return _save(fig, path, fmt)


def _grid(n: int, cols: int | None) -> tuple[int, int]:
    """(rows, columns) of n panels: `cols` per row (checked), or a near 3:2 grid when it is None."""
    if cols is not None and (isinstance(cols, bool) or not isinstance(cols, int) or cols < 1):
        raise ValueError(f"cols={cols!r}; allowed: None (automatic) or an int >= 1 (panels per row)")
    ncols = min(n, cols if cols is not None else math.ceil(math.sqrt(1.5 * n)))
    return math.ceil(n / ncols), ncols


def plot_layers(
    maps: AttentionMaps,
    path: str | os.PathLike[str],
    *,
    stat: str = "mean",
    head: int | str = "mean",
    batch: int = 0,
    cols: int | None = None,
    log: bool = True,
    cmap: str = CMAP,
) -> str:
    """An overview: one pooled map per layer, averaged over heads (``head="mean"``), their maximum
    (``"max"``) or one head (an int), on one shared colour scale. Returns ``path`` as a string."""
    fmt = _format(path)
    _check_maps(maps)
    _check_stat(maps, stat)
    _check_batch(maps, batch)
    _check_head(maps, head, "head")
    L = maps.num_layers
    nrows, ncols = _grid(L, cols)
    mpl = _mpl()
    data = np.stack([_pooled_heads(maps, li, stat, batch, head) for li in range(L)])
    titles = [f"L{li}" + (f" H{head}" if isinstance(head, int) else "") for li in range(L)]
    heading = f"{stat} attention per bin, {L} layers, {_heads_text(maps, head)}" + (
        f", batch {batch}" if maps.batch > 1 else ""
    )
    fig = _map_grid(mpl, maps, data, titles, nrows, ncols, heading, stat, log, cmap)
    return _save(fig, path, fmt)


def plot_received(
    maps: AttentionMaps,
    path: str | os.PathLike[str],
    *,
    layers: Sequence[int] | None = None,
    heads: int | str = "mean",
    batch: int = 0,
    log: bool = True,
    kind: str = "curves",
    sinks: int | None = None,
) -> str:
    """The attention each key receives (the sum over queries of its weights, ``maps.received``), per layer.

    ``kind="curves"``: one curve per layer over key positions (log y), coloured by depth, the first
    ``sinks`` keys (default: the recording's sink tokens, else 4) marked and labelled with their text.
    ``kind="heatmap"``: layers x key bins, the mean per key of each bin (sink bins are single keys).
    ``heads``: "mean", "max" over heads, or one head index. Returns ``path`` as a string."""
    fmt = _format(path)
    _check_maps(maps)
    _check_batch(maps, batch)
    _check_head(maps, heads, "heads")
    if kind not in ("curves", "heatmap"):
        raise ValueError(
            f"kind={kind!r}; allowed: 'curves' (one curve per layer) or 'heatmap' (layers x keys)"
        )
    lis = _layers(maps, layers)
    Sk = maps.Sk
    if sinks is None:
        sinks = maps.k_bins.sinks or 4
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks={sinks!r}; allowed: None (the recording's sink tokens) or an int >= 0")
    sinks = min(sinks, Sk)
    mpl = _mpl()
    rec = maps.received[lis, batch]  # (L', H, Sk)
    data = _reduce_heads(rec, heads, 1)  # (L', Sk)
    what = _heads_text(maps, heads)
    fig = mpl.figure(figsize=(9.0, 4.2 if kind == "curves" else 1.4 + 0.12 * max(len(lis), 8)))
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot()
    depth = mpl.colormaps["viridis"]
    if kind == "curves":
        for j, li in enumerate(lis):
            color = depth(j / max(len(lis) - 1, 1))
            x, y = _envelope(data[j])
            ax.plot(x, y, color=color, lw=0.9, alpha=0.85, label=f"L{li}")
        if log:
            ax.set_yscale("log")
        ax.set_xlim(-0.5 - 0.012 * Sk, Sk - 0.5 + 0.005 * Sk)  # key 0 clear of the spine
        ax.set_xlabel("key position")
        ax.set_ylabel("attention received\n(sum over queries)")
        ax.grid(True, which="major", alpha=0.25, lw=0.6)
        if len(lis) <= 8:
            ax.legend(fontsize=8, ncols=min(len(lis), 4), loc="upper right", frameon=False)
        else:
            sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(lis[0], lis[-1]), cmap=depth)
            fig.colorbar(sm, ax=ax, label="layer", pad=0.01, fraction=0.04)
        _label_sinks(ax, maps, data, sinks, log)
    else:
        e = maps.k_bins.edges.numpy()
        per_bin = np.add.reduceat(data, e[:-1], axis=1) / np.diff(e)[None, :]
        norm = _norm(mpl, per_bin, log)
        xs = _Scale.make(maps.k_bins, 7.5 * PNG_DPI)
        d = per_bin[:, xs.index]
        im = ax.imshow(
            np.ma.masked_less_equal(d, 0) if log else d,
            norm=norm,
            cmap=_cmap(mpl, CMAP),
            aspect="auto",
            interpolation="auto",
            extent=(0, xs.size, len(lis), 0),
        )
        xs.ticks(mpl, maps.tokens, True, with_tokens=True, nticks=6).apply(ax.xaxis)
        ax.set_yticks(np.arange(len(lis)) + 0.5, [f"L{li}" for li in lis], fontsize=7)
        if len(lis) > 16:
            ax.yaxis.set_major_locator(mpl.ticker.FixedLocator(np.arange(0, len(lis), 4) + 0.5))
            ax.yaxis.set_major_formatter(
                mpl.ticker.FixedFormatter([f"L{lis[i]}" for i in range(0, len(lis), 4)])
            )
        ax.set_xlabel("key position")
        ax.set_ylabel("layer")
        fig.colorbar(
            im,
            ax=ax,
            label="received per key\n(sum over queries)",
            pad=0.01,
            fraction=0.04,
            extend=_extend(log),
        )
    ax.set_title(
        f"Attention received by each key, {what}" + (f", batch {batch}" if maps.batch > 1 else ""),
        fontsize=11,
    )
    return _save(fig, path, fmt)


def plot_rows(
    maps: AttentionMaps,
    path: str | os.PathLike[str],
    *,
    layer: int = -1,
    head: int | str = "mean",
    batch: int = 0,
    which: str = "auto",
    top_k: int = 5,
    log: bool = False,
) -> str:
    """The exact attention rows of the recorded queries (``maps.rows`` at ``layer``; ``head`` "mean", "max"
    or an index) and / or their rollout through all layers (``maps.rollout``): one panel per query, weights
    over key positions, the ``top_k`` keys marked and labelled with position, token text and weight.

    ``which``: "auto" (whatever was recorded), "rows", "rollout" or "both". Returns ``path`` as a string."""
    fmt = _format(path)
    _check_maps(maps)
    li = _layer(maps, layer)
    _check_batch(maps, batch)
    _check_head(maps, head, "head")
    if which not in ("auto", "rows", "rollout", "both"):
        raise ValueError(f"which={which!r}; allowed: 'auto', 'rows', 'rollout' or 'both'")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}; allowed: an int >= 0 (keys to label per panel)")
    has_rows, has_roll = bool(maps.query_rows), maps.rollout is not None and bool(maps.rollout_rows)
    want_rows = which in ("rows", "both") or (which == "auto" and has_rows)
    want_roll = which in ("rollout", "both") or (which == "auto" and has_roll)
    if want_rows and not has_rows:
        raise ValueError(f"which={which!r}: the recording has no exact rows; record with query_rows=[...]")
    if want_roll and not has_roll:
        raise ValueError(f"which={which!r}: the recording has no rollout; record with rollout_rows=[...]")
    if not (want_rows or want_roll):
        raise ValueError(
            "maps: no exact rows or rollout recorded; record with query_rows=[...] or rollout_rows=[...]"
        )
    panels: list[tuple[np.ndarray, int, str]] = []
    if want_rows:
        rows = maps.layers[li].rows
        assert rows is not None
        w = _reduce_heads(rows[batch], head, 0)  # (n, Sk)
        for i, q in enumerate(maps.query_rows):
            panels.append((w[i], q, f"layer {li}, {_heads_text(maps, head)}"))
    if want_roll:
        assert maps.rollout is not None
        roll = maps.rollout[batch].float().numpy()
        for i, q in enumerate(maps.rollout_rows):
            panels.append((roll[i], q, f"rollout through all {maps.num_layers} layers"))
    mpl = _mpl()
    Sk = maps.Sk
    fig = mpl.figure(figsize=(9.0, 0.6 + (2.0 if len(panels) <= 4 else 1.5) * len(panels)))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (w, q, what) in zip(axes, panels):
        x, y = _envelope(w)
        ax.fill_between(x, y, step="mid", color="#3b6ea8", alpha=0.35, lw=0)
        ax.step(x, y, where="mid", color="#1f4e87", lw=0.8)
        if 0 <= q < Sk:
            ax.axvline(q, color="#c03a2b", lw=0.8, ls="--", alpha=0.8)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, max(float(w.max()), 1e-12) * 1.05)
        ax.set_xlim(-0.5 - 0.012 * Sk, Sk - 0.5 + 0.012 * Sk)  # keys 0 and Sk-1 clear of the spines
        ax.set_ylabel("weight")
        ax.grid(True, alpha=0.25, lw=0.6)
        qt = maps.query_tokens
        tok = f" {_tok(qt[q])}" if qt is not None and 0 <= q < len(qt) else ""
        ax.set_title(f"query {q}{tok} (dashed line): {what}", fontsize=10, loc="left")
        _label_top(ax, maps, w, top_k, log)
    axes[-1].set_xlabel("key position")
    return _save(fig, path, fmt)


# ------------------------------------------------------------------------------------- validation
def _format(path: Any) -> str:
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError(
            f"path={path!r}; allowed: a str or os.PathLike ending in .png, .svg or .pdf"
        ) from None
    ext = os.path.splitext(p)[1].lower()
    if ext not in FORMATS:
        raise ValueError(
            f"path={p!r}: extension {ext or '(none)'!r} not supported; allowed: .png, .svg, .pdf"
        )
    return FORMATS[ext]


def _check_maps(maps: Any) -> None:
    if not isinstance(maps, AttentionMaps):
        raise TypeError(f"maps: expected an attnopt.maps.AttentionMaps, got {type(maps).__name__}")
    if maps.num_layers == 0 or maps.num_heads == 0 or maps.batch == 0 or maps.Sq == 0 or maps.Sk == 0:
        raise ValueError(
            f"maps: empty recording (layers={maps.num_layers}, heads={maps.num_heads}, batch={maps.batch}, "
            f"Sq={maps.Sq}, Sk={maps.Sk}); nothing to plot"
        )


def _layer(maps: AttentionMaps, layer: Any) -> int:
    L = maps.num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -L <= layer < L:
        raise IndexError(f"layer={layer!r}; allowed: an int in [0, {L}) (negative counts back from the last)")
    return layer % L


def _layers(maps: AttentionMaps, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(maps.num_layers))
    if isinstance(layers, int) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"layers={layers!r}; allowed: None (all) or a non-empty sequence of layer indices")
    out = []
    for li in layers:
        if isinstance(li, bool) or not isinstance(li, int) or not -maps.num_layers <= li < maps.num_layers:
            raise IndexError(
                f"layers: {li!r} out of range; allowed: ints in [0, {maps.num_layers}) (negative counts back)"
            )
        out.append(li % maps.num_layers)
    return out


def _check_stat(maps: AttentionMaps, stat: Any) -> None:
    if stat not in maps.stats:
        raise ValueError(f"stat={stat!r}; allowed: one of {maps.stats} (the stats this recording kept)")


def _check_batch(maps: AttentionMaps, batch: Any) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < maps.batch:
        raise IndexError(f"batch={batch!r}; allowed: an int in [0, {maps.batch})")


def _check_head(maps: AttentionMaps, head: Any, name: str) -> None:
    H = maps.num_heads
    if isinstance(head, str):
        if head not in ("mean", "max"):
            raise ValueError(f"{name}={head!r}; allowed: 'mean', 'max' (over heads) or an int in [0, {H})")
    elif isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < H:
        raise IndexError(f"{name}={head!r}; allowed: 'mean', 'max' (over heads) or an int in [0, {H})")


def _reduce_heads(t: torch.Tensor, head: int | str, dim: int) -> np.ndarray:
    """Mean / max over the head dimension, or one head, as float32 numpy (numpy: torch's reduction over a
    leading dimension is several times slower on CPU)."""
    a = t.detach().float().cpu().numpy()
    if head == "mean":
        return a.mean(dim, dtype=np.float32)
    if head == "max":
        return a.max(dim)
    return np.take(a, int(head), axis=dim)


def _pooled_heads(maps: AttentionMaps, li: int, stat: str, batch: int, head: int | str) -> np.ndarray:
    """(R, C) pooled map of one layer reduced over heads, tile by tile (no (H, R, C) intermediate)."""
    out = np.zeros((len(maps.q_bins), len(maps.k_bins)), dtype=np.float32)
    for r0, r1, c0, c1, t in maps.layers[li].tiles:
        out[r0:r1, c0:c1] = _reduce_heads(t[stat][batch], head, 0)
    return out


def _heads_text(maps: AttentionMaps, head: int | str) -> str:
    if head == "mean":
        return f"mean over {maps.num_heads} heads"
    if head == "max":
        return f"max over {maps.num_heads} heads"
    return f"head {head}"


# ---------------------------------------------------------------------------------------- drawing
class _Mpl:
    """The matplotlib modules used here, imported on first use."""

    def __init__(self) -> None:
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError(
                "attnopt.maps.plot needs matplotlib, which is not installed: pip install 'attnopt[maps]'"
            ) from e
        import matplotlib.cm
        import matplotlib.colors
        import matplotlib.figure
        import matplotlib.ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self._Figure, self._Canvas = matplotlib.figure.Figure, FigureCanvasAgg
        self.colors = matplotlib.colors
        self.cm = matplotlib.cm
        self.ticker = matplotlib.ticker
        self.colormaps = matplotlib.colormaps

    def figure(self, **kw: Any) -> Any:
        """A Figure on an Agg canvas, outside pyplot (never shown, never in pyplot's figure list)."""
        fig = self._Figure(**kw)
        self._Canvas(fig)
        return fig


_MPL: _Mpl | None = None


def _mpl() -> _Mpl:
    global _MPL
    if _MPL is None:
        _MPL = _Mpl()
    return _MPL


def _save(fig: Any, path: Any, fmt: str) -> str:
    p = os.fspath(path)
    # Dates off, so that pictures committed to a repository only change when their content does.
    meta = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from")
            fig.savefig(p, format=fmt, dpi=PNG_DPI, metadata=meta, facecolor="white")
    finally:
        fig.clear()
    return p


def _cmap(mpl: _Mpl, name: str) -> Any:
    if not isinstance(name, str) or name not in mpl.colormaps:
        raise ValueError(f"cmap={name!r}; allowed: a matplotlib colormap name, e.g. 'viridis', 'magma'")
    # White: no attention at all (masked keys, above the causal diagonal).
    return mpl.colormaps[name].with_extremes(bad="white")


def _norm(mpl: _Mpl, data: np.ndarray, log: bool) -> Any:
    vmax = float(data.max()) if data.size else 0.0
    if not log:
        return mpl.colors.Normalize(0.0, vmax if vmax > 0 else 1.0)
    pos = data[data > 0]
    if pos.size == 0:
        return mpl.colors.LogNorm(_LOG_RANGE, 1.0)
    if pos.size > 1_000_000:
        pos = pos[:: pos.size // 1_000_000 + 1]
    # The floor: the 0.5th percentile of the attended bins, but at most 6 decades under the maximum.
    vmin = max(float(np.percentile(pos, 0.5)), vmax * _LOG_RANGE)
    if vmin >= vmax:
        vmin = vmax / 10
    return mpl.colors.LogNorm(vmin, vmax)


def _extend(log: bool) -> str:
    return "min" if log else "neither"


def _envelope(y: np.ndarray, points: int = 2400) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a curve over positions 0..n-1, thinned to about ``points`` points for long n: in each run of
    positions, its minimum and maximum, in order. A figure is ~1300 pixels wide, so the drawn envelope is
    the same; SVG and PDF files stay small (16K keys x 32 layers would be megabytes)."""
    n = len(y)
    if n <= points:
        return np.arange(n), y
    k = math.ceil(n / (points // 2))
    m = n // k * k
    blocks = y[:m].reshape(-1, k)
    base = np.arange(0, m, k)
    lo = base + blocks.argmin(1)
    hi = base + blocks.argmax(1)
    idx = np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi), np.arange(m, n)])
    idx = np.unique(idx)  # sorted
    return idx, y[idx]


def _tok(s: str, width: int = 12) -> str:
    """Token text for a label: quoted, control characters escaped, ``$`` kept out of mathtext."""
    s = s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if len(s) > width:
        s = s[: width - 1] + "…"
    return "‘" + s.replace("$", r"\$") + "’"


@dataclass
class _Ticks:
    coords: list[float]
    labels: list[str]
    every: bool

    @property
    def size(self) -> int:
        return 6 if self.every else 7

    def apply(self, axis: Any) -> None:
        axis.set_ticks(self.coords, self.labels)
        axis.set_tick_params(labelsize=self.size, length=2, pad=1.5)
        if self.every and axis.axis_name == "x":
            axis.set_tick_params(labelrotation=90)

    def extent(self, is_x: bool) -> float:
        """Inches the labels take away from the panel (height under it for x, width beside it for y)."""
        ch = self.size / 72 * 0.62  # a character's width
        line = self.size / 72 * 1.3
        if not self.labels:
            return 0.1
        if is_x:
            if self.every:
                return max(map(len, self.labels)) * ch + 0.12
            return max(lab.count("\n") + 1 for lab in self.labels) * line + 0.08
        return max(map(len, self.labels)) * ch + 0.1


@dataclass
class _Scale:
    """How one binned axis is drawn: bin t spans display units [edges[t], edges[t+1]); each sink bin is
    ``sink_w`` units wide (>= 1) so that single tokens stay about 4 pixels wide next to hundreds of bins."""

    bins: Bins
    sink_w: int
    edges: np.ndarray  # (nbins + 1,) display units
    index: np.ndarray  # (edges[-1],) the bin drawn in each display unit

    @classmethod
    def make(cls, bins: Bins, pixels: float) -> _Scale:
        nb, s = len(bins), bins.sinks
        sink_w = max(1, math.ceil(4 * nb / max(pixels, 1))) if 0 < s < nb else 1
        widths = np.ones(nb, dtype=np.int64)
        widths[:s] = sink_w
        edges = np.concatenate([[0], np.cumsum(widths)])
        return cls(bins, sink_w, edges, np.repeat(np.arange(nb), widths))

    @property
    def size(self) -> int:
        return int(self.edges[-1])

    def ticks(
        self, mpl: _Mpl, tokens: list[str] | None, is_x: bool, with_tokens: bool, nticks: int = 4
    ) -> _Ticks:
        """A few round token positions (with their text when ``with_tokens``), or, with tokens and at most
        40 positions of one bin each, every position labelled with its text."""
        bins = self.bins
        n = bins.n
        if n == 0:
            return _Ticks([], [], False)
        tokens = tokens if with_tokens else None
        every = tokens is not None and bins.size == 1 and n <= 40
        if every:
            locs = list(range(n))
        else:
            locs = [int(v) for v in mpl.ticker.MaxNLocator(nbins=nticks, integer=True).tick_values(0, n - 1)]
            locs = sorted({v for v in locs if 0 <= v < n})
        e = bins.edges.numpy().astype(np.float64)
        coords = np.interp(np.asarray(locs, dtype=np.float64) + 0.5, e, self.edges.astype(np.float64))
        labels = []
        for p in locs:
            if tokens is not None and p < len(tokens):
                t = _tok(tokens[p], 10 if every else 8)
                labels.append(t if every else (f"{p}\n{t}" if is_x else f"{t} {p}"))
            else:
                labels.append(str(p))
        return _Ticks(coords.tolist(), labels, every)

    def describe(self) -> str:
        b = self.bins
        if b.size == 1:
            return f"{b.n} tokens, 1 per bin"
        wide = f", drawn {self.sink_w}x wide" if self.sink_w > 1 else ""
        return f"{b.n} tokens in {len(b)} bins: the first {b.sinks} alone{wide}, then {b.size} per bin"


_NO_TICKS = _Ticks([], [], False)


def _bins_text(q: _Scale, k: _Scale) -> str:
    if torch.equal(q.bins.edges, k.bins.edges) and q.sink_w == k.sink_w:
        return k.describe()
    return f"queries: {q.describe()}; keys: {k.describe()}"


def _map_grid(
    mpl: _Mpl,
    maps: AttentionMaps,
    data: np.ndarray,
    titles: list[str],
    nrows: int,
    ncols: int,
    heading: str,
    stat: str,
    log: bool,
    cmap: str,
) -> Any:
    """Panels of (R, C) maps in a grid, one colour scale and colorbar, position ticks labelled on the outer
    panels. The layout is computed here in inches (constrained layout costs seconds with 32+ panels)."""
    R, C = data.shape[1:]
    pw = _PANEL
    ph = _PANEL * min(1.0, max(0.3, R / max(C, 1)))
    xs, ys = _Scale.make(maps.k_bins, pw * PNG_DPI), _Scale.make(maps.q_bins, ph * PNG_DPI)
    # Token text on the x axis only where every position is labelled (round positions' text would collide
    # with the next panel's); the y axis has the room.
    xt = xs.ticks(mpl, maps.tokens, True, with_tokens=ncols == 1 or maps.k_bins.n <= 40)
    yt = ys.ticks(mpl, maps.query_tokens, False, with_tokens=True)
    title_h, gap_w = 0.26, 0.12
    left = 0.3 + yt.extent(False)
    bottom = 0.3 + xt.extent(True)
    top = 0.5 + title_h
    cb_gap, cb_w, cb_labels = 0.15, 0.14, 0.95
    right = cb_gap + cb_w + cb_labels
    grid_w = ncols * pw + (ncols - 1) * gap_w
    grid_h = nrows * ph + (nrows - 1) * title_h
    W, Hh = left + grid_w + right, bottom + grid_h + top
    fig = mpl.figure(figsize=(W, Hh))
    gs = fig.add_gridspec(
        nrows,
        ncols,
        left=left / W,
        right=(left + grid_w) / W,
        bottom=bottom / Hh,
        top=(bottom + grid_h) / Hh,
        wspace=gap_w / pw,
        hspace=title_h / ph,
    )
    norm = _norm(mpl, data, log)
    cm = _cmap(mpl, cmap)
    im = None
    n = len(data)
    for i in range(n):
        r, c = divmod(i, ncols)
        ax = fig.add_subplot(gs[r, c])
        d = data[i][np.ix_(ys.index, xs.index)] if xs.sink_w > 1 or ys.sink_w > 1 else data[i]
        d = np.ma.masked_less_equal(d, 0) if log else d
        im = ax.imshow(
            d, norm=norm, cmap=cm, aspect="auto", interpolation="auto", extent=(0, xs.size, ys.size, 0)
        )
        ax.set_title(titles[i], fontsize=9, pad=3)
        # Ticks on the outer panels only (labels where no panel is below / on the left); the panels share
        # coordinates, and tick objects are most of the drawing time of a 32-panel grid.
        (xt if i + ncols >= n else _NO_TICKS).apply(ax.xaxis)
        (yt if c == 0 else _NO_TICKS).apply(ax.yaxis)
    fig.text((left + grid_w / 2) / W, 0.06 / Hh, "key position", ha="center", va="bottom", fontsize=10)
    fig.text(
        0.06 / W,
        (bottom + grid_h / 2) / Hh,
        "query position",
        ha="left",
        va="center",
        rotation=90,
        fontsize=10,
    )
    fig.text(
        (left + grid_w / 2) / W,
        1 - 0.06 / Hh,
        f"{heading}\n{_bins_text(ys, xs)}",
        ha="center",
        va="top",
        fontsize=11,
    )
    assert im is not None
    cb_h = min(grid_h, max(1.5, 0.6 * grid_h))
    cax = fig.add_axes(
        ((left + grid_w + cb_gap) / W, (bottom + (grid_h - cb_h) / 2) / Hh, cb_w / W, cb_h / Hh)
    )
    cb = fig.colorbar(im, cax=cax, extend=_extend(log))
    cb.set_label(f"{stat} attention weight" + (" (log)" if log else ""), fontsize=9)
    cb.ax.tick_params(labelsize=8)
    return fig


def _label_sinks(ax: Any, maps: AttentionMaps, data: np.ndarray, sinks: int, log: bool) -> None:
    """Mark the first ``sinks`` keys at their highest curve and label them, stacked at the top left."""
    if sinks == 0:
        return
    top = data[:, :sinks].max(0)
    ax.plot(np.arange(sinks), top, "o", ms=4, mfc="none", mec="#c03a2b", mew=1.0, zorder=5)
    if log:
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * (hi / lo) ** 0.35)  # room for the labels above the curves
    else:
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.35 * (hi - lo))
    for p in range(sinks):
        text = f"key {p}" + (
            f" {_tok(maps.tokens[p])}" if maps.tokens is not None and p < len(maps.tokens) else ""
        )
        ann = ax.annotate(
            f"{text}: {top[p]:.3g}",
            xy=(p, top[p]),
            xytext=(0.06 + 0.2 * (p // 4), 0.95 - 0.075 * (p % 4)),
            textcoords="axes fraction",
            fontsize=8,
            ha="left",
            va="top",
            color="#8a2a1f",
            arrowprops={
                "arrowstyle": "-",
                "color": "#c03a2b",
                "lw": 0.6,
                "alpha": 0.7,
                "relpos": (0, 0.5),
                **_LEADER,
            },
        )
        ann.set_in_layout(False)  # inside the axes; keeps the layout fast


def _label_top(ax: Any, maps: AttentionMaps, w: np.ndarray, k: int, log: bool) -> None:
    """Mark the k largest weights and label them (position, token text, weight) in a band at the top of the
    panel, each label above its point with a leader line, stacked down a level where it would overlap a
    label to its left."""
    k = min(k, int((w > 0).sum()))
    if k == 0:
        return
    idx = np.sort(np.argsort(-w, kind="stable")[:k])
    ax.plot(idx, w[idx], "o", ms=3.5, color="#c03a2b", zorder=5)
    Sk = len(w)
    ends: list[float] = []  # per level, where its last label ends (axes fraction)
    placed = []
    for p in idx:
        tok = f" {_tok(maps.tokens[p])}" if maps.tokens is not None and p < len(maps.tokens) else ""
        text = f"{p}{tok} {w[p]:.2g}"
        x = (p + 0.5) / Sk
        width = 0.0068 * len(text) + 0.012
        left = x if x + width < 1.0 else x - width
        level = next((i for i, e in enumerate(ends) if e < left), len(ends))
        if level == len(ends):
            ends.append(0.0)
        ends[level] = left + width
        placed.append((p, text, level, left == x))
    # Headroom: the data fill the part of the panel under the label band.
    band = 0.1 + 0.11 * len(ends)
    lo = ax.get_ylim()[0]
    if log:
        top = float(w.max())
        ax.set_ylim(lo, lo * (top / lo) ** (1 / (1 - band)))
    else:
        ax.set_ylim(0, float(w.max()) / (1 - band))
    trans = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for p, text, level, right in placed:
        ann = ax.annotate(
            text,
            xy=(p, w[p]),
            xytext=(p, 0.97 - 0.11 * level),
            textcoords=trans,
            ha="left" if right else "right",
            va="top",
            fontsize=7,
            color="#8a2a1f",
            arrowprops={
                "arrowstyle": "-",
                "color": "#c03a2b",
                "lw": 0.5,
                "alpha": 0.6,
                "relpos": (0, 0) if right else (1, 0),
                **_LEADER,
            },
        )
        ann.set_in_layout(False)  # inside the axes; keeps the layout fast
