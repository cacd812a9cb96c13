"""Charts of `attnopt bench` results, drawn from the JSON payload the bench prints (and writes with --json).

``plot_results(payload, outdir)`` writes, per kind of payload:

* kernel grid (``attnopt bench``, ``"kind": "bench"``): ``bench_time_vs_n`` — median ms per call against
  N, log-log, one panel per preset × dtype × mode, one line per peer; ``bench_speedup`` — peer time /
  attnopt time per case and peer (ratio of medians, log scale, a line at 1×: right of it attnopt is faster).
* goals (``--goals``, ``"kind": "goals"``): ``goals_speedup``, the same bars for the goal cases.
* generation (``--generation``): ``generation_decode``, ms/token of each cache × attention.
* serving (``--serving``): ``serving_goals``, each measured ratio against its goal.

PNG by default (``formats=("png", "svg")`` adds SVG). matplotlib is imported only here, and only through
``matplotlib.figure.Figure`` (the Agg canvas, no pyplot, no global backend switch); without it the
functions raise ImportError naming ``pip install 'attnopt[maps]'``.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["INSTALL_HINT", "load_payload", "payload_kind", "plot_results", "require_matplotlib"]

INSTALL_HINT = "pip install 'attnopt[maps]'"
PEER_STYLE = {  # color, marker
    "attnopt": ("#d62728", "o"),
    "sdpa": ("#1f77b4", "s"),
    "flex": ("#2ca02c", "^"),
    "eager": ("#7f7f7f", "D"),
}
_OTHER_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def require_matplotlib() -> None:
    """Raise ImportError with the install hint when matplotlib is missing (call before a long run)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as e:
        raise ImportError(f"bench charts need matplotlib: {INSTALL_HINT}") from e


def _figure(w: float, h: float) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _log_ticks(axis: Any, unit: str = "") -> None:
    """Log-scale ticks at 1, 2, 5 × 10^k labeled as plain numbers (not 10^k)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))


def _style(peer: str, i: int) -> tuple[str, str]:
    return PEER_STYLE.get(peer, (_OTHER_COLORS[i % len(_OTHER_COLORS)], "v"))


def load_payload(path: str | Path) -> dict:
    """A bench JSON file, or a saved stdout of the bench (its last line that is a JSON object)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
        for line in reversed(text.splitlines()):
            if line.lstrip().startswith("{"):
                try:
                    data = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
    if not isinstance(data, dict):
        raise ValueError(f"{path}: no bench JSON object found (write one with `attnopt bench --json PATH`)")
    return data


def payload_kind(payload: dict) -> str:
    """'bench', 'goals', 'generation' or 'serving' (ValueError for anything else)."""
    kind = payload.get("kind")
    if kind in ("bench", "goals") and isinstance(payload.get("results"), list):
        return kind
    if isinstance(payload.get("decode"), list) and "context" in payload:
        return "generation"
    if any(k in payload for k in ("cascade", "end_to_end")) or isinstance(payload.get("decode"), dict):
        return "serving"
    raise ValueError(
        "not an `attnopt bench` payload (expected kind bench/goals, or a --generation/--serving one)"
    )


def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("median_ms") is not None


def _unique(xs: Iterable) -> list:
    return list(dict.fromkeys(xs))


def _subtitle(payload: dict) -> str:
    env = payload.get("env") or {}
    rows = payload.get("results") or []
    parts = []
    if rows:
        r = rows[0]
        parts.append(f"B={r.get('B')} Hq={r.get('Hq')} D={r.get('D')}")
    if env.get("threads") is not None:
        parts.append(f"{env['threads']} thread" + "s" * (env["threads"] != 1))
    if env.get("torch"):
        parts.append(f"torch {env['torch']}")
    if env.get("cpu_capability"):
        parts.append(str(env["cpu_capability"]))
    if payload.get("repeats"):
        parts.append(f"median of {payload['repeats']}")
    load = env.get("load_avg_before")
    if load is not None:  # how busy the (shared) machine was: times are noisier when it is high
        parts.append(f"load avg {load} → {env.get('load_avg_after')} on {env.get('cpus')} CPUs")
    return ", ".join(parts)


def _save(fig: Any, outdir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    """PNGs are quantized to a 256-color palette (3-4x smaller, same look: flat colors and text)."""
    written = []
    for fmt in formats:
        path = outdir / f"{stem}.{fmt}"
        if fmt == "png":
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            try:
                from PIL import Image  # a matplotlib dependency
            except ImportError:
                path.write_bytes(buf.getvalue())
            else:
                buf.seek(0)
                Image.open(buf).convert("RGB").quantize(colors=256).save(path, optimize=True)
        else:
            fig.savefig(path, format=fmt, dpi=100)
        written.append(path)
    return written


def time_vs_n_figure(payload: dict) -> Any:
    """Median ms per call against N (log-log), one panel per preset × dtype × mode, one line per peer."""
    require_matplotlib()
    from matplotlib.ticker import NullLocator

    rows = payload["results"]
    groups = _unique((r["preset"], r["dtype"], r["mode"]) for r in rows)
    peers = _unique(r["peer"] for r in rows)
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = _figure(max(6.0, 3.4 * ncols + 0.4), 2.7 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (preset, dtype, mode) in zip(axes.flat, groups, strict=False):
        mine = [r for r in rows if (r["preset"], r["dtype"], r["mode"]) == (preset, dtype, mode)]
        ns = sorted({r["N"] for r in mine})
        missing = []
        for i, peer in enumerate(peers):
            pts = sorted((r["N"], r["median_ms"]) for r in mine if r["peer"] == peer and _ok(r))
            if not pts:
                if any(r["peer"] == peer for r in mine):
                    missing.append(peer)
                continue
            color, marker = _style(peer, i)
            (line,) = ax.plot(
                [n for n, _ in pts],
                [ms for _, ms in pts],
                marker=marker,
                color=color,
                label=peer,
                linewidth=2.2 if peer == "attnopt" else 1.4,
                markersize=5,
                zorder=3 if peer == "attnopt" else 2,
            )
            handles.setdefault(peer, line)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _log_ticks(ax.yaxis)
        ax.set_xticks(ns, [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}" for n in ns])
        ax.xaxis.set_minor_locator(NullLocator())
        if len(ns) == 1:
            ax.set_xlim(ns[0] / 1.5, ns[0] * 1.5)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(f"{preset} · {dtype} {mode}", fontsize=10)
        if missing:
            ax.text(
                0.98, 0.03, "n/a: " + ", ".join(missing), transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7, color="#555555",
            )  # fmt: skip
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("ms per call (median)", fontsize=9)
    for ax in axes[-1, :]:
        ax.set_xlabel("N (decode: KV length)", fontsize=9)
    order = [p for p in peers if p in handles]
    fig.legend(
        [handles[p] for p in order],
        order,
        loc="outside lower center",
        ncols=len(order),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(
        f"attnopt bench: time vs N\n{textwrap.fill(_subtitle(payload), 40 * ncols)}",
        fontsize=10,
        x=0.02,
        ha="left",
    )
    return fig


def speedup_rows(rows: list[dict]) -> tuple[list[tuple], list[str], dict[tuple, dict[str, float | None]]]:
    """Cases (preset, N, dtype, mode) with an attnopt time, the other peers, and peer / attnopt per case."""
    base = {
        (r["preset"], r["N"], r["dtype"], r["mode"]): r["median_ms"]
        for r in rows
        if r["peer"] == "attnopt" and _ok(r)
    }
    cases = [c for c in _unique((r["preset"], r["N"], r["dtype"], r["mode"]) for r in rows) if c in base]
    peers = [p for p in _unique(r["peer"] for r in rows) if p != "attnopt"]
    ratios: dict[tuple, dict[str, float | None]] = {c: {} for c in cases}
    for r in rows:
        c = (r["preset"], r["N"], r["dtype"], r["mode"])
        if c in ratios and r["peer"] != "attnopt":
            ratios[c][r["peer"]] = r["median_ms"] / base[c] if _ok(r) else None
    return cases, peers, ratios


def speedup_figure(payload: dict, title: str = "attnopt bench: speedup") -> Any:
    """Horizontal bars: peer median / attnopt median per case and peer, log scale, a line at 1×."""
    cases, peers, ratios = speedup_rows(payload["results"])
    if not cases or not peers:
        raise ValueError("no case has both an attnopt time and another peer: nothing to compare")
    one_setting = len({(c[2], c[3]) for c in cases}) == 1
    labels = [f"{p} N={n:,}" + ("" if one_setting else f" {d} {m}") for p, n, d, m in cases]
    k = len(peers)
    fig = _figure(8.5, max(2.6, 1.3 + len(cases) * (0.17 * k + 0.12)))
    ax = fig.subplots()
    height = 0.8 / k
    values = [v for c in cases for v in ratios[c].values() if v]
    lo = min([1.0, *values]) / 2.2
    hi = max([1.0, *values]) * 2.2
    for j, peer in enumerate(peers):
        color, _ = _style(peer, j)
        ys = [i - 0.4 + height * (j + 0.5) for i in range(len(cases))]
        vals = [ratios[c].get(peer) for c in cases]
        kept = [(y, v) for y, v in zip(ys, vals, strict=True) if v]
        # bars grow from the 1x line: right of it attnopt is faster, left of it the peer is
        ax.barh(
            [y for y, _ in kept],
            [v - 1 for _, v in kept],
            left=1,
            height=height * 0.9,
            color=color,
            label=peer,
        )
        for y, v, c in zip(ys, vals, cases, strict=True):
            if v:
                right = v >= 1
                ax.text(v * (1.04 if right else 1 / 1.04), y, f"{v:.2f}×", va="center",
                        ha="left" if right else "right", fontsize=7)  # fmt: skip
            elif peer in ratios[c]:
                ax.text(1.06, y, f"{peer} n/a", va="center", fontsize=6.5, color="#777777")
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    _log_ticks(ax.xaxis, "×")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(cases)), labels, fontsize=8)
    ax.set_xlabel("peer time / attnopt time (ratio of medians; > 1: attnopt is faster)", fontsize=9)
    ax.grid(True, axis="x", which="major", alpha=0.3)
    ax.set_ylim(len(cases) - 0.5, -0.5)  # top to bottom in run order, no empty margins
    fig.legend(loc="outside lower center", ncols=k, fontsize=8, frameon=False)
    sub = _subtitle(payload)
    if one_setting:
        sub = f"{cases[0][2]} {cases[0][3]}, " + sub
    fig.suptitle(f"{title}\n{textwrap.fill(sub, 105)}", fontsize=10, x=0.01, ha="left")
    return fig


def generation_figure(payload: dict) -> Any:
    rows = payload["decode"]
    fig = _figure(8.0, 1.2 + 0.42 * len(rows))
    ax = fig.subplots()
    labels = [f"{r['cache']} + {r['attention']}" for r in rows]
    colors = [_style(r["attention"], i)[0] for i, r in enumerate(rows)]
    ms = [r["ms_per_token"] for r in rows]
    ax.barh(range(len(rows)), ms, color=colors)
    for i, r in enumerate(rows):
        note = f"{r['ms_per_token']:.1f} ms"
        if r.get("speedup_vs_sdpa_peer") is not None:
            note += f"  ({r['speedup_vs_sdpa_peer']:.2f}× vs sdpa)"
        ax.text(r["ms_per_token"] * 1.01, i, note, va="center", fontsize=8)
    ax.set_xlim(0, max(ms) * 1.45)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per generated token (median)", fontsize=9)
    ax.set_title(
        f"attnopt bench --generation: decode at a {payload.get('context')}-token context, "
        f"{payload.get('threads')} threads",
        fontsize=10,
        loc="left",
    )
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def serving_figure(payload: dict) -> Any:
    goals = payload.get("goals") or []
    if not goals:
        raise ValueError("serving payload has no goals to draw")
    fig = _figure(8.5, 1.3 + 0.45 * len(goals))
    ax = fig.subplots()
    vals = [g["value"] for g in goals]
    colors = ["#2ca02c" if g["met"] else "#d62728" for g in goals]
    ax.barh(range(len(goals)), vals, color=colors, height=0.6)
    for i, g in enumerate(goals):
        ax.plot([g["need"]] * 2, [i - 0.38, i + 0.38], color="black", linewidth=2)
        ax.text(g["value"] * 1.04, i, f"{g['value']:.2f}× (goal ≥ {g['need']:g})", va="center", fontsize=8)
    ax.set_xscale("log")
    _log_ticks(ax.xaxis, "×")
    ax.set_xlim(0.5, max([*vals, *(g["need"] for g in goals)]) * 3)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_yticks(range(len(goals)), [g["goal"] for g in goals], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("measured ratio (green: goal met, red: missed; black tick: the goal)", fontsize=9)
    ax.set_title(f"attnopt bench --serving, {payload.get('threads')} threads", fontsize=10, loc="left")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def plot_results(
    payload: dict, outdir: str | Path, *, formats: Sequence[str] = ("png",), prefix: str | None = None
) -> list[Path]:
    """Draw the charts of one bench payload into ``outdir`` (created); return the written files.

    ``prefix`` replaces the file-name prefix (default: the payload's kind, e.g. ``bench_``).
    """
    kind = payload_kind(payload)
    require_matplotlib()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    pre = f"{kind}_" if prefix is None else prefix
    figs: list[tuple[str, Any]] = []
    if kind == "bench":
        rows = payload["results"]
        if not any(_ok(r) for r in rows):
            raise ValueError("no measured rows (every peer n/a): nothing to draw")
        figs.append(("time_vs_n", time_vs_n_figure(payload)))
        if any(r["peer"] != "attnopt" and _ok(r) for r in rows) and any(
            r["peer"] == "attnopt" and _ok(r) for r in rows
        ):
            figs.append(("speedup", speedup_figure(payload)))
    elif kind == "goals":
        figs.append(("speedup", speedup_figure(payload, "attnopt bench --goals: speedup on the goal cases")))
    elif kind == "generation":
        figs.append(("decode", generation_figure(payload)))
    else:
        figs.append(("goals", serving_figure(payload)))
    written: list[Path] = []
    for name, fig in figs:
        written += _save(fig, out, pre + name, formats)
    return written
