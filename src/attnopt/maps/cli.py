"""`attnopt maps`: record exact attention views of a real offline model on a prompt, write HTML and PNGs."""

from __future__ import annotations

import os
import time
from typing import Any

from attnopt.bench.measure import can_reset_peak, peak_rss_bytes

MODELS = ("smollm2", "minilm")


def load(name: str) -> tuple[Any, Any]:
    from attnopt import demo

    if name not in MODELS:
        raise ValueError(f"model={name!r}; allowed: one of {MODELS}")
    return demo.load_smollm2("attnopt") if name == "smollm2" else demo.load_minilm("attnopt")


def prompt_tokens(tok: Any, text: str, n: int | None, chat: bool = False) -> Any:
    """(1, N) input ids of ``text`` (in the chat template with ``chat``); with ``n``, the text repeated or cut
    to exactly n tokens."""
    from attnopt.demo import text_ids

    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text_ids(tok, text, n)


def token_texts(tok: Any, ids: Any) -> list[str]:
    """The text of each token (one decode per id: the labels of the pictures)."""
    return [tok.decode([i]) for i in ids[0].tolist()]


def forward(model: Any, ids: Any) -> None:
    """One forward pass, the way a prompt is prefilled (causal LMs: logits of the last token only)."""
    import torch

    kwargs = {"logits_to_keep": 1} if hasattr(model, "lm_head") else {}
    with torch.no_grad():
        model(input_ids=ids, **kwargs)


def record_model(model: Any, tok: Any, ids: Any, **options: Any) -> Any:
    """AttentionMaps of one forward pass of ``model`` on ``ids`` (options as for attnopt.maps.record)."""
    from attnopt.maps import record

    with record(model=model, tokens=token_texts(tok, ids), **options) as rec:
        forward(model, ids)
    maps = rec.maps
    maps.meta.update(
        {
            "model": type(model).__name__,
            "tokens": int(ids.shape[1]),
            "layers": maps.num_layers,
            "heads": maps.num_heads,
        }
    )
    return maps


def write_pictures(maps: Any, out: str, *, title: str, layers: list[int] | None = None) -> list[str]:
    """report.html plus PNGs (a head grid for the first, middle and last layer, received attention, rows)."""
    from attnopt.maps import html, plot

    os.makedirs(out, exist_ok=True)
    paths = []
    info = html.write_html(maps, os.path.join(out, "report.html"), title=title)
    paths.append(os.path.join(out, "report.html"))
    maps.meta["html"] = info
    L = maps.num_layers
    for li in layers if layers is not None else sorted({0, L // 2, L - 1}):
        paths.append(plot.plot_heads(maps, os.path.join(out, f"heads_layer{li}.png"), layer=li))
    paths.append(plot.plot_received(maps, os.path.join(out, "received.png")))
    if maps.query_rows or maps.rollout is not None:
        paths.append(plot.plot_rows(maps, os.path.join(out, "rows.png")))
    return [str(p) for p in paths]


def run(
    console: Any,
    *,
    model: str = "smollm2",
    prompt: str | None = None,
    file: str | None = None,
    tokens: int | None = None,
    chat: bool = False,
    resolution: int = 512,
    sinks: int = 4,
    rows: list[int] | None = None,
    rollout: bool = False,
    out: str = "attnopt-maps",
    compare: bool = False,
    threads: int | None = None,
) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if (prompt is None) == (file is None):
        console.print(
            "[red]attnopt maps: give a prompt (--prompt TEXT) or a text file (--file PATH), not both[/red]"
        )
        return 2
    if prompt is not None:
        text = prompt
    else:
        with open(file, encoding="utf-8") as f:  # type: ignore[arg-type]
            text = f.read()
    t0 = time.perf_counter()
    m, tok = load(model)
    console.print(f"Loaded {model} in {time.perf_counter() - t0:.1f} s")
    ids = prompt_tokens(tok, text, tokens, chat)
    N = ids.shape[1]
    rows = [-1] if rows is None else rows
    plain_s = plain_peak = None
    if compare:  # the plain forward pass first: time and peak memory to compare against
        reset = can_reset_peak()
        t0 = time.perf_counter()
        forward(m, ids)
        plain_s = time.perf_counter() - t0
        plain_peak = peak_rss_bytes() if reset else None
    resets = can_reset_peak()
    t0 = time.perf_counter()
    maps = record_model(
        m,
        tok,
        ids,
        resolution=resolution,
        sink_tokens=sinks,
        query_rows=rows,
        rollout_rows=rows if rollout else (),
    )
    rec_s = time.perf_counter() - t0
    rec_peak = peak_rss_bytes() if resets else None
    maps.meta.update({"forward+maps s": round(rec_s, 2), "maps MiB": round(maps.nbytes() / 2**20, 1)})
    console.print(
        f"{model}: {N} tokens, {maps.num_layers} layers × {maps.num_heads} heads, "
        f"{len(maps.q_bins)}×{len(maps.k_bins)} bins (width {maps.k_bins.size}, {maps.k_bins.sinks} sink bins): "
        f"forward + maps {rec_s:.1f} s, maps hold {maps.nbytes() / 2**20:.0f} MiB"
    )
    if compare and plain_s is not None:
        maps.meta["plain forward s"] = round(plain_s, 2)
        line = f"plain forward {plain_s:.1f} s → with maps {rec_s / plain_s:.2f}× the time"
        if plain_peak is not None and rec_peak is not None:
            extra = (rec_peak - plain_peak) / 2**20
            maps.meta["peak extra MiB"] = round(extra, 1)
            line += (
                f"; peak RSS {plain_peak / 2**20:.0f} MiB (plain) vs {rec_peak / 2**20:.0f} MiB (with maps): "
                f"{extra:+.0f} MiB extra"
            )
        console.print(line)
    os.makedirs(out, exist_ok=True)
    maps.save(os.path.join(out, "maps.pt"))
    title = f"{model} · {N} tokens · exact attention maps (attnopt)"
    for p in write_pictures(maps, out, title=title):
        size = os.path.getsize(p)
        console.print(f"  wrote {p}  ({size / 2**10:.0f} KiB)")
    console.print(f"  wrote {os.path.join(out, 'maps.pt')}  (AttentionMaps.load)")
    return 0
