"""One self-contained, offline HTML file that shows an ``AttentionMaps`` recording.

``write_html(maps, "report.html")`` writes a page with inline CSS and JavaScript only (no network, no
external fonts; it opens from ``file://``): a layer / head / statistic selector, the pooled map on a log
colour scale with a legend and a hover read-out of the query and key bins (token spans and text), the
attention each key receives (max over each span, log scale: sinks stand out), the entropy of each query,
the exact query rows and the rollout rows when the recording has them, and ``maps.meta`` as a table.

The URL hash selects the view (``report.html#layer=3&head=2&stat=max``; ``layer=mean`` / ``head=mean``
pick the averages; ``&cell=row,col`` outlines one bin of the map and shows its read-out) and the selectors
update it. Once a view is drawn the page sets
``document.body.dataset.rendered = "layer=3 head=2 stat=max"`` and ``dataset.heatmapRect = "x,y,w,h"`` (the
map's place in page pixels), so a headless browser can check and screenshot any view without clicking.

Size: every map is quantized to uint8 on a log scale (code 0 = exactly 0; codes 1..255 span
``[lo, hi]`` in log10, one scale per image: ``lo`` is about the 1% quantile of its positive values,
smaller ones get code 1), zlib-compressed (rows stored minus the row above when that is smaller) and
embedded as base64; the page unpacks it with ``DecompressionStream``. Head maps are pooled further (the
token-weighted mean of the means, or the max of the maxima; sink bins stay alone) by merging 1, 2, 3, ...
recorded bins per axis: the page takes the finest of these, from at most 512 down to 16 bins per axis,
that keeps the file within ``max_bytes`` (bisection on a size estimate made from a few sample layers, then
the page is built and measured). What the head maps leave then goes to the curves (up to 2048 points;
received and exact rows: max over each span, entropy: mean) and to the mean-of-heads / mean-of-layers maps
(at least 1.5 times the head bins, up to 512 per axis).
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import html
import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._result import AttentionMaps, Bins

__all__ = ["render_html", "write_html"]

MAX_HEAD_BINS = 512  # bins per axis of each head's map, at most
MIN_HEAD_BINS = 16  # ... and at least, else the page does not fit and write_html raises
MAX_OVERVIEW = 512  # bins per axis of the mean-of-heads / mean-of-layers maps, at most
MAX_CURVE_POINTS = 2048  # points of each received / entropy / row curve, at most
MAX_ROWS = 8  # exact query rows / rollout rows drawn, at most (the first ones)
_SAMPLE_LAYERS = 4  # layers encoded to estimate the size of all head maps at one resolution
_ZLIB_LEVEL = 6
_CHUNK_BYTES = 64 << 20  # float32 bytes of the layers processed together
_QUANTILE_SAMPLE = 8192  # entries per image the colour scale's low end is estimated from


@dataclasses.dataclass(frozen=True)
class _Level:
    """One size level: bins per axis of each head's map, of the overview maps, and points per curve."""

    heads: int
    overview: int
    curve: int


_OVERVIEW_STEPS = (512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16)
_CURVE_STEPS = (2048, 1024, 512, 256, 128)


def _level(r: int) -> _Level:
    """The level whose head maps have at most r bins per axis: the mean-of-heads maps get about 1.5 r (on a
    fixed ladder, so that levels share them), the curves 8 r points rounded down to a power of 2."""
    overview = max(r, next(o for o in _OVERVIEW_STEPS if o <= max(16, 3 * r // 2)))
    curve = next(c for c in _CURVE_STEPS if c <= max(_CURVE_STEPS[-1], min(MAX_CURVE_POINTS, 8 * r)))
    return _Level(r, min(overview, MAX_OVERVIEW), curve)


# ------------------------------------------------------------------------------------------------- API
def render_html(maps: AttentionMaps, *, title: str | None = None, max_bytes: int = 5_000_000) -> str:
    """The report page of ``maps`` as a string of at most ``max_bytes`` UTF-8 bytes (see the module doc)."""
    return _render(maps, title, max_bytes)[0]


def write_html(
    maps: AttentionMaps, path: str | Path, *, title: str | None = None, max_bytes: int = 5_000_000
) -> dict[str, Any]:
    """Write the report page of ``maps`` to ``path``; return what was written.

    The dict holds ``path``, ``bytes`` (file size), ``head_resolution`` (bins per axis of each head's map,
    the larger axis), ``head_bins`` / ``overview_bins`` ((query, key) bins of the head maps and of the
    mean-of-heads maps), ``curve_points`` (of the received curve), ``layers``, ``heads``, ``rows_shown``
    and ``rollout_rows_shown`` (exact / rollout rows drawn: at most ``MAX_ROWS``, the first ones).
    """
    page, info = _render(maps, title, max_bytes)
    data = page.encode("utf-8")
    Path(path).write_bytes(data)
    return {"path": str(path), **info}


# ------------------------------------------------------------------------------------------ arguments
def _check(maps: Any, title: Any, max_bytes: Any) -> None:
    """Clear errors for arguments the report cannot use."""
    if not isinstance(maps, AttentionMaps):
        raise TypeError(f"maps: got {type(maps).__name__}; expected an attnopt.maps.AttentionMaps")
    if maps.num_layers == 0 or maps.num_heads == 0 or maps.batch == 0:
        raise ValueError(
            f"maps: {maps.num_layers} layers, {maps.num_heads} heads, batch {maps.batch}; nothing to show"
        )
    if maps.Sq == 0 or maps.Sk == 0:
        raise ValueError(f"maps: Sq={maps.Sq}, Sk={maps.Sk}; nothing to show")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title={title!r}; allowed: a str or None")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes!r}; allowed: an int > 0 (bytes of the written file)")


# ------------------------------------------------------------------------------------------- encoding
def _blob(codes: Tensor) -> str:
    """uint8 tensor -> base64 of its zlib-compressed bytes (C order)."""
    codes = codes.to(torch.uint8).contiguous()
    raw = ctypes.string_at(codes.data_ptr(), codes.numel()) if codes.numel() else b""
    return base64.b64encode(zlib.compress(raw, _ZLIB_LEVEL)).decode("ascii")


def _image_blob(codes: Tensor) -> dict[str, Any]:
    """Images (N, R, C) uint8 -> {z: blob} or, when smaller, {z: blob of the rows minus the row above
    (mod 256, over all N*R rows), f: 1} (PNG's 'Up' filter: smooth maps and key stripes compress better)."""
    plain = _blob(codes)
    flat = codes.reshape(-1, codes.shape[-1])
    up = flat.clone()
    up[1:] -= flat[:-1]  # uint8 arithmetic wraps mod 256
    filtered = _blob(up)
    return {"z": filtered, "f": 1} if len(filtered) < len(plain) else {"z": plain}


def _round(xs: Tensor) -> list[float]:
    return [round(float(v), 5) for v in xs.flatten().tolist()]


def _log_quantize(x: Tensor) -> tuple[Tensor, list[float], list[float]]:
    """x (N, M) >= 0 -> (codes (N, M) uint8, lo (N), hi (N)): per row, code 0 for 0 (and non-finite),
    codes 1..255 for log10 values from lo (about the row's 1% quantile of positive values, taken on at
    most ``_QUANTILE_SAMPLE`` evenly spaced entries; less clamps to 1) to hi (its max)."""
    lg = x.float().log10()  # 0 -> -inf, nan stays nan
    ok = (lg > -torch.inf) & (lg < torch.inf)
    hi = torch.where(ok, lg, -torch.inf).amax(1)
    step = max(1, math.ceil(lg.shape[1] / _QUANTILE_SAMPLE))
    lo = torch.nanquantile(torch.where(ok, lg, torch.nan)[:, ::step], 0.01, dim=1)
    hi = torch.where(torch.isfinite(hi), hi, 0.0)
    lo = torch.where(torch.isfinite(lo), lo, hi - 1)
    lo = torch.where(hi - lo < 1e-3, hi - 1, lo)
    t = ((lg - lo[:, None]) * (254 / (hi - lo))[:, None]).clamp_(0, 254).round_().add_(1)
    codes = torch.where(ok, t, 0).to(torch.uint8)
    return codes, _round(lo), _round(hi)


def _lin_quantize(x: Tensor) -> tuple[Tensor, list[float]]:
    """x (N, M) >= 0 -> (codes (N, M) uint8 = round(255 x / hi), hi (N) = the row's max)."""
    x = x.float().nan_to_num(0, 0, 0).clamp_min(0)
    hi = x.amax(1)
    codes = torch.round(x / hi.clamp_min(1e-30)[:, None] * 255).to(torch.uint8)
    return codes, _round(hi)


def _packed_log(x: Tensor, per: int | None = None) -> Any:
    """Curves (N, P) or images (N, R, C) -> {z: blob of their log codes, lo: [N], hi: [N]} (images maybe
    filtered, see ``_image_blob``); with ``per``, a list of such dicts, one per ``per`` consecutive items."""
    codes, lo, hi = _log_quantize(x.reshape(x.shape[0], -1))
    codes = codes.view(x.shape)
    pack = _image_blob if x.dim() == 3 else lambda c: {"z": _blob(c)}
    if per is None:
        return {**pack(codes), "lo": lo, "hi": hi}
    return [
        {**pack(codes[i : i + per]), "lo": lo[i : i + per], "hi": hi[i : i + per]}
        for i in range(0, len(codes), per)
    ]


# -------------------------------------------------------------------------------------------- pooling
def _coarsen(b: Bins, res: int) -> tuple[Bins, int, int]:
    """At most ``res`` bins made of whole bins of ``b``: (the new bins, s, g) where the first s bins stay
    alone (b's sink bins, when they fit) and the rest are merged g at a time."""
    nb = len(b)
    if nb <= res:
        return b, 0, 1
    s = b.sinks if b.sinks <= res // 4 else 0
    g = math.ceil((nb - s) / (res - s))
    keep = [*range(s + 1), *range(s + g, nb, g)]
    if keep[-1] != nb:
        keep.append(nb)
    return Bins(b.n, s, b.size * g, b.edges[keep]), s, g


def _group(x: Tensor, dim: int, s: int, g: int, how: str) -> Tensor:
    """Along ``dim``: the first s entries alone, the rest in groups of g (the last one padded with zeros,
    so x must be >= 0 for 'max'), each group reduced by 'max' or 'sum'."""
    if g == 1:
        return x
    dim %= x.dim()
    n = x.shape[dim]
    rest = x.narrow(dim, s, n - s)
    pad = -(n - s) % g
    if pad:
        rest = torch.cat([rest, rest.new_zeros(*rest.shape[:dim], pad, *rest.shape[dim + 1 :])], dim)
    rest = rest.reshape(*rest.shape[:dim], rest.shape[dim] // g, g, *rest.shape[dim + 1 :])
    rest = rest.amax(dim + 1) if how == "max" else rest.sum(dim + 1)
    return torch.cat([x.narrow(dim, 0, s), rest], dim)


def _pool_map(x: Tensor, qb: Bins, kb: Bins, res: int, stat: str) -> tuple[Tensor, Bins, Bins]:
    """Pooled maps x (..., R, C) on bins qb x kb -> at most res x res bins: the max of the maxima, or the
    token-weighted mean of the means (the mean of the weights over the merged bins)."""
    nq, qs, qg = _coarsen(qb, res)
    nk, ks, kg = _coarsen(kb, res)
    if qg == 1 and kg == 1:
        return x, nq, nk
    if stat == "max":
        return _group(_group(x, -2, qs, qg, "max"), -1, ks, kg, "max"), nq, nk
    qw, kw = qb.edges.diff().to(x.dtype), kb.edges.diff().to(x.dtype)
    x = _group(_group(x * qw[:, None] * kw[None, :], -2, qs, qg, "sum"), -1, ks, kg, "sum")
    area = nq.edges.diff()[:, None] * nk.edges.diff()[None, :]
    return x / area.to(x.dtype), nq, nk


def _curve_bins(n: int, points: int, sinks: int) -> Bins:
    """At most ``points`` spans over positions 0..n-1: the first ``sinks`` alone, then equal spans."""
    points = max(2, points)
    return Bins.make(n, points, min(sinks, points // 4))


def _pool_curve(x: Tensor, b: Bins, how: str) -> Tensor:
    """Curves x (..., n) over positions -> (..., len(b)): 'max' or 'mean' over each span of ``b``."""
    y = _group(x, -1, b.sinks, b.size, "max" if how == "max" else "sum")
    return y if how == "max" or b.size == 1 else y / b.edges.diff().to(x.dtype)


def _chunked(items: list[int], item_bytes: int) -> list[list[int]]:
    """``items`` in consecutive runs of about ``_CHUNK_BYTES`` (fewer, larger tensor ops; bounded memory)."""
    k = max(1, _CHUNK_BYTES // max(1, item_bytes))
    return [items[i : i + k] for i in range(0, len(items), k)]


def _with_means(get: Callable[[int], Tensor], layers: int, pool: Callable[[Tensor], Tensor]) -> Tensor:
    """(L+1, H+1, ...): ``pool`` of each layer's (H, ...) tensor with its mean over heads appended, and of
    the mean over layers appended last."""
    out, total = [], None
    for chunk in _chunked(list(range(layers)), get(0).numel() * 4):
        x = torch.stack([get(li) for li in chunk]).float()
        x = torch.cat([x, x.mean(1, keepdim=True)], 1)
        total = x.sum(0) if total is None else total.add_(x.sum(0))
        out.append(pool(x))
    assert total is not None
    out.append(pool(total[None] / layers))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------- the parts
def _axis(b: Bins, tokens: list[str] | None) -> dict[str, Any]:
    return {"edges": b.edges.tolist(), "labels": b.labels(tokens)}


def _position_label(p: int, tokens: list[str] | None, width: int = 24) -> str:
    """'position text' for one query row (text shortened as ``Bins.labels`` does)."""
    if not tokens or p >= len(tokens):
        return str(p)
    text = tokens[p]
    return f"{p} {text if len(text) <= width else text[: width - 1] + '…'}"


def _curves(m: AttentionMaps, points: int) -> dict[str, Any]:
    """Received attention (max per span), entropy (mean per span), exact rows and rollout (max per span),
    each with a mean over heads and over layers appended, quantized."""
    L, H = m.num_layers, m.num_heads
    kb = _curve_bins(m.Sk, points, m.k_bins.sinks)
    qb = _curve_bins(m.Sq, points, m.q_bins.sinks)
    rec = _with_means(lambda li: m.layers[li].received[0], L, lambda x: _pool_curve(x, kb, "max"))
    ent = _with_means(lambda li: m.layers[li].entropy[0], L, lambda x: _pool_curve(x, qb, "mean"))
    ent_codes, ent_hi = _lin_quantize(ent.reshape((L + 1) * (H + 1), -1))
    part: dict[str, Any] = {
        "axes": {"ck": _axis(kb, m.tokens), "cq": _axis(qb, m.query_tokens)},
        "received": {"axis": "ck", **_packed_log(rec.reshape((L + 1) * (H + 1), -1))},
        "entropy": {"axis": "cq", "z": _blob(ent_codes), "hi": ent_hi},
        "rows": None,
        "rollout": None,
    }
    n = min(len(m.query_rows), MAX_ROWS)
    if n and all(lm.rows is not None for lm in m.layers):
        rows = _with_means(
            lambda li: m.layers[li].rows[0, :, :n],  # type: ignore[index]
            L,
            lambda x: _pool_curve(x, kb, "max"),
        )
        part["rows"] = {
            "axis": "ck",
            "positions": m.query_rows[:n],
            "labels": [_position_label(p, m.query_tokens) for p in m.query_rows[:n]],
            **_packed_log(rows.reshape((L + 1) * (H + 1) * n, -1)),
        }
    n = min(len(m.rollout_rows), MAX_ROWS)
    if n and m.rollout is not None:
        roll = _pool_curve(m.rollout[0, :n].float(), kb, "max")
        part["rollout"] = {
            "axis": "ck",
            "positions": m.rollout_rows[:n],
            "labels": [_position_label(p, m.query_tokens) for p in m.rollout_rows[:n]],
            **_packed_log(roll),
        }
    return part


def _plain(x: Any) -> Any:
    """JSON-safe copy of meta values: finite numbers, strings, lists and dicts; anything else as str."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Tensor) and x.numel() <= 64:
        return _plain(x.tolist())
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    return str(x)


# ----------------------------------------------------------------------------------------- assembling
def _render(maps: AttentionMaps, title: str | None, max_bytes: int) -> tuple[str, dict[str, Any]]:
    """The page at the largest size level that fits ``max_bytes``, and its info dict.

    The level is found by bisection on an estimate (all layers' head maps extrapolated from a few sample
    layers); the page is then built and measured, a level lower at a time while it does not fit. What the
    head maps leave of the budget then goes to finer curves and finer mean-of-heads maps."""
    _check(maps, title, max_bytes)
    title = title if title is not None else str(maps.meta.get("model") or "Attention maps")
    report = _Report(maps, title)
    levels = report.levels()
    lo, hi = 0, len(levels)
    while lo < hi:  # the first (largest) level whose estimate fits
        mid = (lo + hi) // 2
        if report.estimate(levels[mid]) <= max_bytes:
            hi = mid
        else:
            lo = mid + 1
    for level in levels[lo:]:
        heads = report.head_blobs(level[0].heads, list(range(maps.num_layers)))
        page = report.assemble(level, heads)
        if len(page.encode("utf-8")) <= max_bytes:
            return report.finer_extras(level, heads, page, max_bytes)
    last = levels[-1]
    raise ValueError(
        f"max_bytes={max_bytes}: too small; even with {len(last[1])}x{len(last[2])} bins per head "
        f"({maps.num_layers} layers x {maps.num_heads} heads) the page takes about {report.estimate(last)} bytes"
    )


class _Report:
    """The parts of one recording's page at each size level, computed once each.

    On creation it reads every layer's pooled maps once, keeping the full-resolution mean (or max) over
    heads per layer and over layers, and the head maps of a few sample layers (for size estimates)."""

    def __init__(self, maps: AttentionMaps, title: str):
        self.maps, self.title = maps, title
        self.stats = [s for s in ("mean", "max") if s in maps.stats]
        L = maps.num_layers
        k = min(_SAMPLE_LAYERS, L)
        self.sample = sorted({round(i * (L - 1) / max(1, k - 1)) for i in range(k)})
        self.layer_maps: dict[str, Tensor] = {}
        self.all_maps: dict[str, Tensor] = {}
        self.sample_maps: dict[tuple[str, int], Tensor] = {}
        for s in self.stats:
            per = []
            for li in range(L):
                x = maps.pooled(li, s).float()
                per.append(x.mean(0) if s == "mean" else x.amax(0))
                if li in self.sample:
                    self.sample_maps[s, li] = x
            self.layer_maps[s] = torch.stack(per)
            self.all_maps[s] = self.layer_maps[s].mean(0) if s == "mean" else self.layer_maps[s].amax(0)
        self._overviews: dict[int, Any] = {}
        self._curves: dict[int, Any] = {}
        self._estimates: dict[_Level, int] = {}

    def levels(self) -> list[tuple[_Level, Bins, Bins]]:
        """The size levels, largest first, each with its head bins: one per distinct number of head bins
        from MAX_HEAD_BINS down to MIN_HEAD_BINS per axis (merging 1, 2, 3, ... recorded bins at a time)."""
        m, out, seen = self.maps, [], set()
        for r in range(MAX_HEAD_BINS, MIN_HEAD_BINS - 1, -1):
            qb, kb = _coarsen(m.q_bins, r)[0], _coarsen(m.k_bins, r)[0]
            if (len(qb), len(kb)) not in seen:
                seen.add((len(qb), len(kb)))
                out.append((_level(r), qb, kb))
        return out

    def _heads(self, stat: str, layer: int) -> Tensor:
        x = self.sample_maps.get((stat, layer))
        return x if x is not None else self.maps.pooled(layer, stat).float()

    def head_blobs(self, res: int, layers: list[int]) -> dict[str, dict[int, Any]]:
        """Per stat and layer, the packed (H, r, c) head maps at ``res`` bins per axis."""
        m, H = self.maps, self.maps.num_heads
        out: dict[str, dict[int, Any]] = {s: {} for s in self.stats}
        for s in self.stats:
            for chunk in _chunked(layers, H * len(m.q_bins) * len(m.k_bins) * 4):
                x = torch.cat([self._heads(s, li) for li in chunk])
                out[s].update(zip(chunk, _packed_log(_pool_map(x, m.q_bins, m.k_bins, res, s)[0], per=H)))
        return out

    def overview(self, res: int) -> tuple[dict[str, Any], dict[str, Any], Bins, Bins]:
        """The mean-of-heads map of every layer and the mean-of-layers map per stat, at ``res`` bins per axis."""
        if res not in self._overviews:
            m = self.maps
            layers, everything = {}, {}
            qb, kb = m.q_bins, m.k_bins
            for s in self.stats:
                x, qb, kb = _pool_map(self.layer_maps[s], m.q_bins, m.k_bins, res, s)
                layers[s] = _packed_log(x, per=1)
                everything[s] = _packed_log(_pool_map(self.all_maps[s], m.q_bins, m.k_bins, res, s)[0][None])
            self._overviews[res] = (layers, everything, qb, kb)
        return self._overviews[res]

    def curves(self, points: int) -> dict[str, Any]:
        if points not in self._curves:
            self._curves[points] = _curves(self.maps, points)
        return self._curves[points]

    def assemble(self, level: tuple[_Level, Bins, Bins], heads: dict[str, dict[int, Any]]) -> str:
        lv, qb, kb = level
        return _page(
            self.maps, self.title, lv, heads, qb, kb, self.overview(lv.overview), self.curves(lv.curve)
        )

    def estimate(self, level: tuple[_Level, Bins, Bins]) -> int:
        """Bytes of the page at ``level``: exact when the sample is every layer, else extrapolated."""
        lv = level[0]
        if lv not in self._estimates:
            heads = self.head_blobs(lv.heads, self.sample)
            size = len(self.assemble(level, heads).encode("utf-8"))
            rest = self.maps.num_layers / len(self.sample) - 1
            self._estimates[lv] = int(size + 1.05 * rest * _blob_chars(heads))
        return self._estimates[lv]

    def finer_extras(
        self, level: tuple[_Level, Bins, Bins], heads: dict[str, dict[int, Any]], page: str, max_bytes: int
    ) -> tuple[str, dict[str, Any]]:
        """With the head maps fixed, step the curves, then the mean-of-heads maps, up while the page still fits
        ``max_bytes``; the final page and what ``write_html`` reports about it."""
        lv, qb, kb = level
        m = self.maps
        for field, steps, cap in (
            ("curve", _CURVE_STEPS, MAX_CURVE_POINTS),
            ("overview", _OVERVIEW_STEPS, MAX_OVERVIEW),
        ):
            for v in sorted(x for x in steps if getattr(lv, field) < x <= cap):
                finer = dataclasses.replace(lv, **{field: v})
                if self._stored(finer) == self._stored(lv):
                    continue
                candidate = self.assemble((finer, qb, kb), heads)
                if len(candidate.encode("utf-8")) > max_bytes:
                    break
                lv, page = finer, candidate
        size = len(page.encode("utf-8"))
        return page, _info(m, lv, size, qb, kb, self.overview(lv.overview), self.curves(lv.curve))

    def _stored(self, lv: _Level) -> tuple[int, ...]:
        """Bins of the mean-of-heads maps and curve points a level stores."""
        m = self.maps
        ob = _coarsen(m.q_bins, lv.overview)[0], _coarsen(m.k_bins, lv.overview)[0]
        return (
            len(ob[0]),
            len(ob[1]),
            len(_curve_bins(m.Sq, lv.curve, m.q_bins.sinks)),
            len(_curve_bins(m.Sk, lv.curve, m.k_bins.sinks)),
        )


def _blob_chars(heads: dict[str, dict[int, Any]]) -> int:
    """Characters the packed head maps take (blob text plus their scales)."""
    return sum(len(p["z"]) + 16 * len(p["lo"]) for per in heads.values() for p in per.values())


def _page(
    m: AttentionMaps,
    title: str,
    level: _Level,
    heads: dict[str, dict[int, Any]],
    qb: Bins,
    kb: Bins,
    overview: tuple[dict[str, Any], dict[str, Any], Bins, Bins],
    curves: dict[str, Any],
) -> str:
    """The HTML text: template, CSS, JS and the data as JSON (``<``, ``>``, ``&`` escaped)."""
    layer_blobs, all_blobs, oq, ok = overview
    data = {
        "title": title,
        "L": m.num_layers,
        "H": m.num_heads,
        "B": m.batch,
        "Sq": m.Sq,
        "Sk": m.Sk,
        "stats": list(heads),
        "layerNames": [lm.name for lm in m.layers],
        "axes": {"hq": _axis(qb, m.query_tokens), "hk": _axis(kb, m.tokens), "oq": _axis(oq, m.query_tokens)}
        | {"ok": _axis(ok, m.tokens)}
        | curves["axes"],
        "heat": {
            "heads": {
                "q": "hq",
                "k": "hk",
                "blobs": {s: [per[li] for li in sorted(per)] for s, per in heads.items()},
            },
            "layers": {"q": "oq", "k": "ok", "blobs": layer_blobs},
            "all": {"q": "oq", "k": "ok", "blobs": all_blobs},
        },
        "received": curves["received"],
        "entropy": curves["entropy"],
        "rows": curves["rows"],
        "rollout": curves["rollout"],
        "recorded": [len(m.q_bins), len(m.k_bins)],
        "sinks": m.k_bins.sinks,
        "level": {"heads": level.heads, "overview": level.overview, "curve": level.curve},
        "meta": _plain(m.meta),
    }
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    t = html.escape(title)
    return (
        _TEMPLATE.replace("__CSS__", _CSS)
        .replace("__JS__", _JS)
        .replace("__TITLE__", t)
        .replace("__DATA__", text)  # last: the data may contain the other markers
    )


def _info(
    m: AttentionMaps, level: _Level, size: int, qb: Bins, kb: Bins, overview: tuple[Any, ...], curves: dict
) -> dict[str, Any]:
    """What ``write_html`` reports."""
    oq, ok = overview[2], overview[3]
    return {
        "bytes": size,
        "head_resolution": max(len(qb), len(kb)),
        "head_bins": (len(qb), len(kb)),
        "overview_bins": (len(oq), len(ok)),
        "curve_points": len(curves["axes"]["ck"]["labels"]),
        "layers": m.num_layers,
        "heads": m.num_heads,
        "rows_shown": len(curves["rows"]["positions"]) if curves["rows"] else 0,
        "rollout_rows_shown": len(curves["rollout"]["positions"]) if curves["rollout"] else 0,
    }


# -------------------------------------------------------------------------------------------- the page
_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="attnopt.maps.html">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header><h1>__TITLE__</h1><div id="subtitle"></div></header>
<div id="controls">
<label>Layer <select id="layer"></select></label>
<label>Head <select id="head"></select></label>
<label id="statbox">Statistic <select id="stat"></select></label>
<span id="viewdesc"></span>
</div>
<div id="error" hidden></div>
<section id="top">
<canvas id="heat" width="680" height="660" aria-label="pooled attention map"></canvas>
<canvas id="legend" width="96" height="660" aria-label="colour scale"></canvas>
<div id="side">
<h3>Under the mouse</h3>
<div id="hover" class="readout">Move the mouse over the map.</div>
<h3>Recording</h3>
<table id="meta"></table>
</div>
</section>
<section>
<h2>Received attention per key</h2>
<p class="note">Sum over queries of the weight each key gets; max over each span of keys; log scale.</p>
<canvas id="received" width="1130" height="190"></canvas>
<div id="received-hover" class="readout line">Move the mouse over the curve.</div>
</section>
<section>
<h2>Entropy per query</h2>
<p class="note">Entropy (nats) of each query's attention; mean over each span of queries.</p>
<canvas id="entropy" width="1130" height="170"></canvas>
<div id="entropy-hover" class="readout line">Move the mouse over the curve.</div>
</section>
<section id="rows-section" hidden>
<h2>Exact query rows</h2>
<p class="note">Exact weights of the recorded query rows over the keys (max over each span), this layer and head.</p>
<canvas id="rows" width="1130" height="200"></canvas>
<div id="rows-key" class="key"></div>
<div id="rows-hover" class="readout line">Move the mouse over the curves.</div>
</section>
<section id="rollout-section" hidden>
<h2>Attention rollout</h2>
<p class="note">Rollout of the recorded rows through all layers (mean over heads), over the keys (max over each span).</p>
<canvas id="rollout" width="1130" height="200"></canvas>
<div id="rollout-key" class="key"></div>
<div id="rollout-hover" class="readout line">Move the mouse over the curves.</div>
</section>
<footer>Written by attnopt.maps.html &mdash; exact attention, pooled without materializing N&times;N.</footer>
<script type="application/json" id="attnopt-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = """
body { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 12px 18px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 2px 0; }
h2 { font-size: 15px; margin: 14px 0 2px 0; }
h3 { font-size: 13px; margin: 8px 0 4px 0; }
#subtitle, .note, footer { color: #666; }
.note { margin: 0 0 4px 0; }
#controls { margin: 8px 0; display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
select { font: inherit; padding: 2px 4px; }
#viewdesc { color: #444; }
#error { color: #b00; font-weight: bold; white-space: pre-wrap; }
#top { display: flex; gap: 6px; align-items: flex-start; }
#side { width: 330px; }
.readout { white-space: pre-wrap; font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 12px; background: #f6f6f6; padding: 4px 6px; min-height: 3.6em; overflow-wrap: anywhere; }
.readout.line { min-height: 1.4em; width: 1118px; }
table { border-collapse: collapse; font-size: 12px; }
td { border-bottom: 1px solid #eee; padding: 1px 6px 1px 0; vertical-align: top; overflow-wrap: anywhere; }
td:first-child { color: #555; white-space: nowrap; }
.key span { display: inline-block; margin-right: 14px; font-size: 12px; }
.key i { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 4px; }
canvas { display: block; }
footer { margin-top: 16px; font-size: 11px; }
"""

_JS = r"""
(function () {
"use strict";
const D = JSON.parse(document.getElementById("attnopt-data").textContent);
const $ = (id) => document.getElementById(id);
const L = D.L, H = D.H;
const VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884", "#44bf70",
  "#7ad151", "#bddf26", "#fde725"];
const ZERO = [246, 246, 246];
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf"];
const HM = { left: 70, top: 44, w: 600, h: 600 };
const LUT = buildLut();
let current = null;
let renderCount = 0;

function hexRgb(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }
function buildLut() {
  const stops = VIRIDIS.map(hexRgb), lut = new Uint8ClampedArray(256 * 3);
  lut.set(ZERO, 0);
  for (let c = 1; c < 256; c++) {
    const t = (c - 1) / 254 * (stops.length - 1), i = Math.min(Math.floor(t), stops.length - 2), f = t - i;
    for (let j = 0; j < 3; j++) lut[3 * c + j] = Math.round(stops[i][j] * (1 - f) + stops[i + 1][j] * f);
  }
  return lut;
}
function rgb(c) { return "rgb(" + LUT[3 * c] + "," + LUT[3 * c + 1] + "," + LUT[3 * c + 2] + ")"; }
function fmt(v) {
  if (v === 0) return "0";
  if (!isFinite(v)) return String(v);
  const a = Math.abs(v);
  return a >= 0.01 && a < 1e4 ? String(Number(v.toPrecision(3))) : v.toExponential(2);
}
function shown(label) {  // line breaks and tabs in token text, made visible (the read-outs wrap on them)
  return label.replace(/\r\n|[\n\r\u2028\u2029]/g, "\u21b5").replace(/\t/g, "\u21e5");
}
function decodeLog(code, lo, hi) { return code === 0 ? 0 : Math.pow(10, lo + (code - 1) / 254 * (hi - lo)); }

// ------------------------------------------------------------------------------------ unpacking
const inflated = new Map();
function bytesOf(b64) {
  const s = atob(b64), out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}
function unfilter(a, cols) {  // undo the 'Up' filter: each row was stored minus the row above, mod 256
  for (let i = cols; i < a.length; i++) a[i] += a[i - cols];
  return a;
}
function inflate(key, blob, cols) {
  if (!inflated.has(key)) {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("This browser lacks DecompressionStream, needed to unpack the data: " +
        "open the file in a current Chromium, Chrome, Edge, Firefox (113+) or Safari (16.4+).");
    }
    const stream = new Blob([bytesOf(blob.z)]).stream().pipeThrough(new DecompressionStream("deflate"));
    inflated.set(key, new Response(stream).arrayBuffer().then((b) => {
      const a = new Uint8Array(b);
      return blob.f ? unfilter(a, cols) : a;
    }));
  }
  return inflated.get(key);
}

// ----------------------------------------------------------------------------------------- view
function clampIndex(s, n, dflt) {
  if (s === null || !/^-?\d+$/.test(s)) return dflt;
  let i = parseInt(s, 10);
  if (i < 0) i += n;
  return i >= 0 && i < n ? i : dflt;
}
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  const layer = p.get("layer") === "mean" ? "mean" : clampIndex(p.get("layer"), L, 0);
  let head = p.get("head") === "mean" ? "mean" : clampIndex(p.get("head"), H, "mean");
  if (layer === "mean") head = "mean";
  const stat = D.stats.includes(p.get("stat")) ? p.get("stat") : D.stats[0];
  return { layer, head, stat, cell: p.get("cell") };
}
function hashOf(v) { return "layer=" + v.layer + "&head=" + v.head + "&stat=" + v.stat; }
function option(sel, value, text) {
  const o = document.createElement("option");
  o.value = String(value);
  o.textContent = text;
  sel.appendChild(o);
}
function setupControls() {
  for (let i = 0; i < L; i++) option($("layer"), i, "layer " + i + (D.layerNames[i] ? " (" + D.layerNames[i] + ")" : ""));
  option($("layer"), "mean", "mean of layers");
  for (let h = 0; h < H; h++) option($("head"), h, "head " + h);
  option($("head"), "mean", "mean of heads");
  for (const s of D.stats) option($("stat"), s, s === "mean" ? "mean (of the weights in each bin)" : "max (in each bin)");
  if (D.stats.length < 2) $("statbox").hidden = true;
  for (const id of ["layer", "head", "stat"]) {
    $(id).addEventListener("change", () => {
      const v = { layer: $("layer").value, head: $("head").value, stat: $("stat").value };
      if (v.layer === "mean") v.head = "mean";
      location.hash = hashOf(v);
    });
  }
  window.addEventListener("hashchange", render);
}
function syncControls(v) {
  const word = v.stat === "max" ? "max" : "mean";
  $("layer").options[L].textContent = word + " of layers";
  $("head").options[H].textContent = word + " of heads";
  $("layer").value = String(v.layer);
  $("head").value = String(v.head);
  $("stat").value = v.stat;
  $("head").disabled = v.layer === "mean";
}
function describe(v, img) {
  const word = v.stat === "max" ? "max" : "mean";
  const where = v.layer === "mean" ? word + " over layers and heads"
    : "layer " + v.layer + ", " + (v.head === "mean" ? word + " over heads" : "head " + v.head);
  return where + " \u00b7 " + word + " weight in each bin \u00b7 " + img.R + "\u00d7" + img.C + " bins";
}

// ----------------------------------------------------------------------------------- heatmap
async function heatImage(v) {
  let part, blob, key, k = 0;
  if (v.layer === "mean") {
    part = D.heat.all; blob = part.blobs[v.stat]; key = "all/" + v.stat;
  } else if (v.head === "mean") {
    part = D.heat.layers; blob = part.blobs[v.stat][v.layer]; key = "layers/" + v.stat + "/" + v.layer;
  } else {
    part = D.heat.heads; blob = part.blobs[v.stat][v.layer]; key = "heads/" + v.stat + "/" + v.layer; k = v.head;
  }
  const q = D.axes[part.q], kx = D.axes[part.k], R = q.labels.length, C = kx.labels.length;
  const codes = (await inflate(key, blob, C)).subarray(k * R * C, (k + 1) * R * C);
  return { codes, R, C, lo: blob.lo[k], hi: blob.hi[k], q, k: kx, stat: v.stat };
}
function niceStep(span, count) {
  const raw = span / Math.max(1, count), p = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1))));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return Math.max(1, m * p);
  return Math.max(1, 10 * p);
}
function niceFloat(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw * (1 - 1e-9)) return m * p;
  return 10 * p;
}
function binOf(edges, pos) {
  let a = 0, b = edges.length - 2;
  while (a < b) { const m = (a + b + 1) >> 1; if (edges[m] <= pos) a = m; else b = m - 1; }
  return a;
}
function fracOf(edges, pos) {
  const n = edges.length - 1, t = binOf(edges, pos);
  return (t + (pos - edges[t]) / Math.max(1, edges[t + 1] - edges[t])) / n;
}
function drawHeat(img) {
  const cv = $("heat"), ctx = cv.getContext("2d");
  ctx.clearRect(0, 0, cv.width, cv.height);
  const off = document.createElement("canvas");
  off.width = img.C; off.height = img.R;
  const octx = off.getContext("2d"), id = octx.createImageData(img.C, img.R), px = id.data;
  for (let i = 0; i < img.codes.length; i++) {
    const c = 3 * img.codes[i];
    px[4 * i] = LUT[c]; px[4 * i + 1] = LUT[c + 1]; px[4 * i + 2] = LUT[c + 2]; px[4 * i + 3] = 255;
  }
  octx.putImageData(id, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, HM.left, HM.top, HM.w, HM.h);
  ctx.strokeStyle = "#999";
  ctx.strokeRect(HM.left - 0.5, HM.top - 0.5, HM.w + 1, HM.h + 1);
  ctx.fillStyle = "#333"; ctx.font = "11px system-ui, sans-serif";
  const ke = img.k.edges, qe = img.q.edges, nk = ke[ke.length - 1], nq = qe[qe.length - 1];
  ctx.textAlign = "center"; ctx.textBaseline = "bottom";
  for (let p = 0, s = niceStep(nk, 6); p < nk; p += s) {
    const x = HM.left + fracOf(ke, p) * HM.w;
    ctx.fillRect(x, HM.top - 4, 1, 4); ctx.fillText(String(p), x, HM.top - 5);
  }
  ctx.fillText("key position \u2192", HM.left + HM.w / 2, 16);
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let p = 0, s = niceStep(nq, 6); p < nq; p += s) {
    const y = HM.top + fracOf(qe, p) * HM.h;
    ctx.fillRect(HM.left - 4, y, 4, 1); ctx.fillText(String(p), HM.left - 6, y);
  }
  ctx.save(); ctx.translate(14, HM.top + HM.h / 2); ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center"; ctx.fillText("query position \u2192", 0, 0); ctx.restore();
}
function drawLegend(img) {
  const cv = $("legend"), ctx = cv.getContext("2d"), x0 = 8, w = 22;
  ctx.clearRect(0, 0, cv.width, cv.height);
  for (let y = 0; y < HM.h; y++) {
    ctx.fillStyle = rgb(255 - Math.round(y / (HM.h - 1) * 254));
    ctx.fillRect(x0, HM.top + y, w, 1);
  }
  ctx.strokeStyle = "#999"; ctx.strokeRect(x0 - 0.5, HM.top - 0.5, w + 1, HM.h + 1);
  ctx.fillStyle = "#333"; ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "left"; ctx.textBaseline = "middle";
  const Y = (lg) => HM.top + HM.h * (1 - (lg - img.lo) / (img.hi - img.lo));
  let ticks = [];
  for (let e = Math.ceil(img.lo - 1e-9); e <= img.hi + 1e-9; e++) ticks.push(e);
  if (ticks.length > 12) ticks = ticks.filter((e, i) => i % Math.ceil(ticks.length / 12) === 0);
  for (const e of ticks) { const y = Y(e); ctx.fillRect(x0 + w, y, 4, 1); ctx.fillText("1e" + e, x0 + w + 6, y); }
  if (ticks.length < 2) {
    ctx.fillText(fmt(Math.pow(10, img.hi)), x0 + w + 6, HM.top + 6);
    ctx.fillText(fmt(Math.pow(10, img.lo)), x0 + w + 6, HM.top + HM.h - 6);
  }
  ctx.textBaseline = "bottom"; ctx.fillText(img.stat + " weight", 2, HM.top - 8);
  ctx.fillStyle = rgb(0); ctx.fillRect(x0, HM.top + HM.h + 8, w, 10);
  ctx.strokeRect(x0 - 0.5, HM.top + HM.h + 7.5, w + 1, 11);
  ctx.fillStyle = "#333"; ctx.textBaseline = "middle"; ctx.fillText("0", x0 + w + 6, HM.top + HM.h + 13);
}
function showCell(row, col) {
  const img = current, code = img.codes[row * img.C + col];
  const value = code === 0 ? "0 (nothing attended)"
    : (code === 1 ? "\u2264 " : "\u2248 ") + fmt(decodeLog(code, img.lo, img.hi));
  $("hover").textContent = "query " + shown(img.q.labels[row]) + "\nkey   " + shown(img.k.labels[col]) + "\n" +
    img.stat + " weight " + value;
}
function heatHover(e) {
  if (!current) return;
  const r = $("heat").getBoundingClientRect(), x = e.clientX - r.left - HM.left, y = e.clientY - r.top - HM.top;
  if (x < 0 || y < 0 || x >= HM.w || y >= HM.h) return;
  showCell(Math.min(current.R - 1, Math.floor(y / HM.h * current.R)), Math.min(current.C - 1, Math.floor(x / HM.w * current.C)));
}
function markCell(cell) {  // a deep-linked cell (#...&cell=row,col in bins): outline it and show its read-out
  const m = /^(\d+),(\d+)$/.exec(cell || ""), img = current;
  if (!m || +m[1] >= img.R || +m[2] >= img.C) return;
  const row = +m[1], col = +m[2], ctx = $("heat").getContext("2d"), w = HM.w / img.C, h = HM.h / img.R;
  ctx.strokeStyle = "#e00"; ctx.lineWidth = 2;
  ctx.strokeRect(HM.left + col * w - 1, HM.top + row * h - 1, w + 2, h + 2);
  ctx.lineWidth = 1;
  showCell(row, col);
}

// ------------------------------------------------------------------------------------- curves
function plot(id, axis, series, log, ylabel) {
  const cv = $(id), ctx = cv.getContext("2d"), m = { l: 70, r: 14, t: 12, b: 26 };
  const pw = cv.width - m.l - m.r, ph = cv.height - m.t - m.b, e = axis.edges, n = e[e.length - 1];
  ctx.clearRect(0, 0, cv.width, cv.height);
  let max = 0, minpos = Infinity;
  for (const s of series) for (const v of s.y) { if (v > max) max = v; if (v > 0 && v < minpos) minpos = v; }
  let Y, yt = [];
  if (log) {
    const hi = Math.ceil(Math.log10(max > 0 ? max : 1) + 1e-9);
    let lo = Math.floor(Math.log10(isFinite(minpos) ? minpos : 0.1));
    lo = Math.max(lo, hi - 10); if (lo >= hi) lo = hi - 1;
    Y = (v) => m.t + ph * (1 - (Math.log10(Math.max(v, Math.pow(10, lo))) - lo) / (hi - lo));
    const step = Math.ceil((hi - lo) / 6);
    for (let k = lo; k <= hi; k += step) yt.push([Math.pow(10, k), "1e" + k]);
  } else {
    const step = niceFloat((max > 0 ? max : 1) / 4), top = step * Math.ceil((max > 0 ? max : 1) / step - 1e-9);
    Y = (v) => m.t + ph * (1 - v / top);
    for (let v = 0; v <= top + step / 2; v += step) yt.push([v, fmt(v)]);
  }
  const X = (i) => m.l + pw * (e[i] + e[i + 1]) / 2 / n;
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#333"; ctx.strokeStyle = "#eee";
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (const [v, t] of yt) {
    const y = Math.round(Y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(m.l, y); ctx.lineTo(m.l + pw, y); ctx.stroke(); ctx.fillText(t, m.l - 5, y);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let p = 0, s = niceStep(n, 10); p < n; p += s) ctx.fillText(String(p), m.l + pw * p / n, m.t + ph + 4);
  ctx.save(); ctx.translate(12, m.t + ph / 2); ctx.rotate(-Math.PI / 2); ctx.textBaseline = "middle";
  ctx.fillText(ylabel, 0, 0); ctx.restore();
  ctx.strokeStyle = "#999"; ctx.strokeRect(m.l - 0.5, m.t - 0.5, pw + 1, ph + 1);
  ctx.lineWidth = 1.2;
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.beginPath();
    let pen = false;
    for (let i = 0; i < s.y.length; i++) {
      if (log && !(s.y[i] > 0)) { pen = false; continue; }
      const x = X(i), y = Y(s.y[i]);
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      pen = true;
    }
    ctx.stroke();
  }
  ctx.lineWidth = 1;
  cv._plot = { axis, series, m, pw, n };
}
function plotHover(id, e) {
  const cv = $(id), p = cv._plot;
  if (!p) return;
  const r = cv.getBoundingClientRect(), x = e.clientX - r.left - p.m.l;
  if (x < 0 || x >= p.pw) return;
  const i = binOf(p.axis.edges, Math.floor(x / p.pw * p.n));
  $(id + "-hover").textContent = shown(p.axis.labels[i]) + "   " + p.series.map((s) => s.label + " " + fmt(s.y[i])).join("   ");
}
function logCurve(codes, part, idx, P) {
  const y = new Float64Array(P), lo = part.lo[idx], hi = part.hi[idx];
  for (let i = 0; i < P; i++) y[i] = decodeLog(codes[idx * P + i], lo, hi);
  return y;
}
function keyOf(id, part) {
  const box = $(id);
  box.textContent = "";
  part.labels.forEach((t, r) => {
    const s = document.createElement("span"), i = document.createElement("i");
    i.style.background = PALETTE[r % PALETTE.length];
    s.appendChild(i); s.appendChild(document.createTextNode("query " + shown(t)));
    box.appendChild(s);
  });
}
async function drawCurves(v) {
  const li = v.layer === "mean" ? L : v.layer, hi = v.head === "mean" ? H : v.head, idx = li * (H + 1) + hi;
  const which = v.layer === "mean" ? "mean over layers and heads" : (v.head === "mean" ? "mean over heads" : "head " + v.head);
  const rc = D.received, ra = D.axes[rc.axis], P = ra.labels.length;
  plot("received", ra, [{ y: logCurve(await inflate("received", rc), rc, idx, P), color: PALETTE[0], label: which }],
    true, "received");
  const en = D.entropy, ea = D.axes[en.axis], Q = ea.labels.length, codes = await inflate("entropy", en);
  const y = new Float64Array(Q);
  for (let i = 0; i < Q; i++) y[i] = codes[idx * Q + i] / 255 * en.hi[idx];
  plot("entropy", ea, [{ y, color: PALETTE[2], label: which }], false, "nats");
  if (D.rows) {
    const part = D.rows, ax = D.axes[part.axis], n = part.positions.length, Pk = ax.labels.length;
    const rcodes = await inflate("rows", part), series = [];
    for (let r = 0; r < n; r++) {
      series.push({ y: logCurve(rcodes, part, idx * n + r, Pk), color: PALETTE[r % PALETTE.length], label: "q" + part.positions[r] });
    }
    plot("rows", ax, series, true, "weight");
  }
}
async function drawRollout() {
  const part = D.rollout, ax = D.axes[part.axis], n = part.positions.length, P = ax.labels.length;
  const codes = await inflate("rollout", part), series = [];
  for (let r = 0; r < n; r++) series.push({ y: logCurve(codes, part, r, P), color: PALETTE[r % PALETTE.length], label: "q" + part.positions[r] });
  plot("rollout", ax, series, true, "rollout");
}

// -------------------------------------------------------------------------------------- tables
function metaTable() {
  const rows = [
    ["layers \u00d7 heads", L + " \u00d7 " + H],
    ["queries \u00d7 keys", D.Sq + " \u00d7 " + D.Sk + (D.B > 1 ? " (batch element 0 of " + D.B + ")" : "")],
    ["bins recorded", D.recorded[0] + " \u00d7 " + D.recorded[1] + (D.sinks ? " (" + D.sinks + " sink tokens alone)" : "")],
    ["bins per head here", D.axes.hq.labels.length + " \u00d7 " + D.axes.hk.labels.length],
    ["bins of the means", D.axes.oq.labels.length + " \u00d7 " + D.axes.ok.labels.length],
    ["curve points", String(D.axes.ck.labels.length)],
  ];
  for (const [k, v] of Object.entries(D.meta)) rows.push([k, typeof v === "string" ? v : JSON.stringify(v)]);
  const t = $("meta");
  for (const [k, v] of rows) {
    const tr = document.createElement("tr"), a = document.createElement("td"), b = document.createElement("td");
    a.textContent = k; b.textContent = v; tr.appendChild(a); tr.appendChild(b); t.appendChild(tr);
  }
}

// -------------------------------------------------------------------------------------- render
async function render() {
  const v = readHash(), mine = ++renderCount;
  syncControls(v);
  try {
    const img = await heatImage(v);
    if (mine !== renderCount) return;
    current = img;
    drawHeat(img);
    drawLegend(img);
    $("viewdesc").textContent = describe(v, img);
    $("hover").textContent = "Move the mouse over the map.";
    markCell(v.cell);
    await drawCurves(v);
    if (mine !== renderCount) return;
    const r = $("heat").getBoundingClientRect();
    document.body.dataset.heatmapRect = [r.left + window.scrollX + HM.left, r.top + window.scrollY + HM.top,
      HM.w, HM.h].map(Math.round).join(",");
    document.body.dataset.rendered = "layer=" + v.layer + " head=" + v.head + " stat=" + v.stat;
  } catch (err) {
    $("error").hidden = false;
    $("error").textContent = String(err && err.message ? err.message : err);
    document.body.dataset.error = $("error").textContent;
  }
}
function main() {
  document.title = D.title;
  $("subtitle").textContent = L + " layers \u00d7 " + H + " heads \u00b7 " + D.Sq + " queries \u00d7 " + D.Sk +
    " keys \u00b7 pooled maps on a log colour scale, one scale per view";
  setupControls();
  metaTable();
  $("heat").addEventListener("mousemove", heatHover);
  for (const id of ["received", "entropy", "rows", "rollout"]) $(id).addEventListener("mousemove", (e) => plotHover(id, e));
  if (D.rows) { $("rows-section").hidden = false; keyOf("rows-key", D.rows); }
  if (D.rollout) {
    $("rollout-section").hidden = false; keyOf("rollout-key", D.rollout);
    drawRollout().catch((err) => { $("error").hidden = false; $("error").textContent = String(err); });
  }
  render();
}
main();
})();
"""
