"""`attnopt bench --generation`: decode time per token on SmolLM2 with each cache, same run.

* decode: one prompt of ``--context`` tokens is prefilled once; its keys and values are copied into each
  cache (transformers' DynamicCache and StaticCache, attnopt's "growing" and "static"), then ``--steps``
  greedy decode steps are timed one by one (model forward of one token, cache update included).
  Reports the median ms/token, the ratio to the sdpa peer on the same kind of cache, the share of a step
  spent in the cache layers' ``update`` (bookkeeping), and whether the greedy tokens agree.
* streaming: ``make_cache(model, "streaming")`` generates ``--stream-tokens`` tokens one by one from a
  short prompt; ms/token and RSS are reported at 4K and at the end (flat = constant memory and time).
* perplexity: a long text that ships with Python (``pydoc_data.topics``) scored token by token with a
  ring window, with and without attention sinks, next to its in-window perplexity (StreamingLLM, Fig. 3).

Benchmarks are never tests: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .measure import rss_bytes

__all__ = ["docs_ids", "rss_mib", "run_generation"]


def rss_mib() -> float:
    """Current resident set size in MiB."""
    return rss_bytes() / 2**20


def docs_ids(tok: Any, n: int) -> torch.Tensor:
    """n token ids of real English text (Python's own documentation, shipped with the interpreter)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() < n:
        ids = ids.repeat(n // ids.numel() + 1)
    return ids[:n]


def _timed_updates(cache: Any) -> list[float]:
    """Wrap every layer's update to accumulate its time into the returned one-element list."""
    acc = [0.0]
    for layer in cache.layers:
        real = layer.update

        def update(*a: Any, _real: Callable = real, **kw: Any) -> Any:
            t = time.perf_counter()
            out = _real(*a, **kw)
            acc[0] += time.perf_counter() - t
            return out

        layer.update = update
    return acc


def _decode(
    model: Any, cache: Any, first: int, start: int, steps: int
) -> tuple[list[float], list[int], float]:
    """Greedy decode `steps` tokens after `start` cached ones: (ms per step, tokens, update share)."""
    acc = _timed_updates(cache)
    tok = torch.tensor([[first]])
    times, tokens, upd = [], [], []
    with torch.no_grad():
        for i in range(steps):
            pos = torch.tensor([[start + i]])
            acc[0] = 0.0
            t = time.perf_counter()
            logits = model(input_ids=tok, position_ids=pos, cache=cache, use_cache=True).logits
            nxt = int(logits[0, -1].argmax())
            dt = time.perf_counter() - t
            times.append(dt * 1e3)
            upd.append(acc[0] / dt)
            tokens.append(nxt)
            tok = torch.tensor([[nxt]])
    return times, tokens, statistics.median(upd)


def _fill(cache: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def bench_decode(model: Any, tok: Any, context: int, steps: int, log: Callable[[str], None]) -> list[dict]:
    from transformers import DynamicCache, StaticCache

    from attnopt.integrations.transformers import make_cache

    ids = docs_ids(tok, context)[None]
    log(f"prefill {context} tokens once (attnopt, growing cache) ...")
    model.set_attn_implementation("attnopt")
    pre = make_cache(model, "growing")
    with torch.no_grad():
        first = int(model(input_ids=ids, cache=pre, use_cache=True).logits[0, -1].argmax())
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in pre.layers]
    del pre
    cap = context + steps + 8
    configs = [
        ("DynamicCache", "sdpa", lambda: DynamicCache(config=model.config)),
        ("attnopt growing", "attnopt", lambda: make_cache(model, "growing")),
        ("StaticCache", "sdpa", lambda: StaticCache(config=model.config, max_cache_len=cap)),
        ("StaticCache", "attnopt", lambda: StaticCache(config=model.config, max_cache_len=cap)),
        ("attnopt static", "attnopt", lambda: make_cache(model, "static", max_length=cap)),
    ]
    rows = []
    for name, impl, build in configs:
        model.set_attn_implementation(impl)
        cache = _fill(build(), kv)
        times, tokens, share = _decode(model, cache, first, context, steps)
        warm = times[2:]  # the first steps page in fresh buffers
        rows.append(
            {
                "cache": name,
                "attention": impl,
                "ms_per_token": statistics.median(warm),
                "update_share": share,
                "tokens": tokens,
            }
        )
        log(f"  {name:16s} + {impl:8s} {rows[-1]['ms_per_token']:8.2f} ms/token  update {share:6.1%}")
        del cache
    return rows


def bench_streaming(model: Any, tok: Any, n_tokens: int, sinks: int, window: int, log: Callable) -> dict:
    from attnopt.integrations.transformers import make_cache

    model.set_attn_implementation("attnopt")
    cache = make_cache(model, "streaming", sinks=sinks, window=window)
    ids = docs_ids(tok, 64)[None]
    marks = sorted({m for m in (4096, 8192, 16384, n_tokens) if m <= n_tokens})
    out: dict[str, Any] = {"sinks": sinks, "window": window, "tokens": n_tokens, "at": {}}
    with torch.no_grad():
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
        times: list[float] = []
        for i in range(n_tokens):
            pos = torch.tensor([[ids.shape[1] + i]])
            t = time.perf_counter()
            logits = model(
                input_ids=torch.tensor([[nxt]]), position_ids=pos, cache=cache, use_cache=True
            ).logits
            nxt = int(logits[0, -1].argmax())
            times.append((time.perf_counter() - t) * 1e3)
            if i + 1 in marks:
                recent = times[-256:]
                out["at"][i + 1] = {"ms_per_token": statistics.median(recent), "rss_mib": rss_mib()}
                log(
                    f"  streamed {i + 1:6d} tokens: {out['at'][i + 1]['ms_per_token']:.2f} ms/token, RSS {rss_mib():.0f} MiB"
                )
        # The same cache stepped at position 4096 and at the end, alternating: a sequential run's marks
        # are minutes apart on a shared machine, this pair is not (the cache's size is the same either way).
        ab: dict[int, list[float]] = {4096: [], ids.shape[1] + n_tokens: []}
        for i in range(200):
            for base in ab:
                t = time.perf_counter()
                model(input_ids=torch.tensor([[nxt]]), position_ids=torch.tensor([[base + i]]), cache=cache,
                      use_cache=True)  # fmt: skip
                ab[base].append((time.perf_counter() - t) * 1e3)
        out["interleaved"] = {str(k): statistics.median(v) for k, v in ab.items()}
        log(f"  interleaved steps at position 4096 vs {ids.shape[1] + n_tokens}: "
            + " vs ".join(f"{v:.2f}" for v in out["interleaved"].values()) + " ms/token")  # fmt: skip
    return out


def bench_perplexity(model: Any, tok: Any, n_tokens: int, window: int, sinks: int, log: Callable) -> dict:
    """Token-by-token NLL over a long text: full context (in-window), ring with sinks, ring without."""
    from transformers import DynamicCache

    from attnopt.integrations.transformers import make_cache

    model.set_attn_implementation("attnopt")
    ids = docs_ids(tok, n_tokens)

    def ppl(cache: Any) -> float:
        nll = 0.0
        with torch.no_grad():
            for i in range(n_tokens - 1):
                logits = model(
                    input_ids=ids[i : i + 1][None],
                    position_ids=torch.tensor([[i]]),
                    cache=cache,
                    use_cache=True,
                ).logits[0, -1]
                nll -= float(torch.log_softmax(logits.float(), -1)[ids[i + 1]])
        return math.exp(nll / (n_tokens - 1))

    res = {"tokens": n_tokens, "window": window, "sinks": sinks}
    res["full_context"] = ppl(DynamicCache(config=model.config))
    log(f"  perplexity, full context ({n_tokens} tokens): {res['full_context']:.2f}")
    res["window_with_sinks"] = ppl(make_cache(model, "streaming", sinks=sinks, window=window))
    log(f"  perplexity, {sinks} sinks + window {window}: {res['window_with_sinks']:.2f}")
    res["window_only"] = ppl(_window_only(model, window))
    log(f"  perplexity, window {window} without sinks: {res['window_only']:.2f}")
    return res


def _window_only(model: Any, window: int) -> Any:
    """A ring of the last `window` tokens without sinks, keys at their own positions (window attention)."""
    from transformers.cache_utils import Cache

    from attnopt.cache import RingLayer

    n = model.config.num_hidden_layers
    return Cache(layers=[RingLayer(window=window) for _ in range(n)])


def bench_split_kv(log: Callable, reps: int = 300, layers: int = 30) -> dict:
    """Split-KV decode on SmolLM2's shape (B=1, Hq=9, Hkv=3, D=64, 8192 keys, fp32): attention() as
    shipped (auto: splitkv) against the unsplit GQA-folded fused call (backend="sdpa"), alternating, the
    keys of `layers` distinct layers cycled so they stream from memory as in a real decode step."""
    import attnopt as ao

    g = torch.Generator().manual_seed(0)
    sets = [
        (torch.randn(1, 9, 1, 64, generator=g), torch.randn(1, 3, 8192, 64, generator=g),
         torch.randn(1, 3, 8192, 64, generator=g))
        for _ in range(layers)
    ]  # fmt: skip
    times: dict[str, list[float]] = {"unsplit": [], "split": []}
    kw = {"unsplit": {"backend": "sdpa"}, "split": {}}
    with torch.no_grad():
        for i in range(reps + 20):
            for name in times:
                q, k, v = sets[(2 * i + (name == "split")) % layers]
                t = time.perf_counter()
                ao.attention(q, k, v, **kw[name])
                if i >= 20:
                    times[name].append((time.perf_counter() - t) * 1e3)
        q, k, v = sets[0]
        plan = next(x.strip() for x in ao.explain(q, k, v).splitlines() if "chosen:" in x)
    res = {name: statistics.median(t) for name, t in times.items()}
    res["ratio"] = res["unsplit"] / res["split"]
    res["plan"] = plan
    log(
        f"  split-KV decode 1x9/3x8192x64 fp32: unsplit {res['unsplit']:.3f} ms, auto {res['split']:.3f} ms "
        f"({res['ratio']:.2f}x); {plan}"
    )
    return res


def run_generation(args: argparse.Namespace) -> int:
    from attnopt import demo

    torch.set_num_threads(args.threads)
    log = print
    model, tok = demo.load_smollm2("attnopt")
    results: dict[str, Any] = {"threads": args.threads, "context": args.context}
    log(
        f"SmolLM2-135M fp32, {args.threads} threads, decode at a {args.context}-token context, {args.steps} steps"
    )
    rows = bench_decode(model, tok, args.context, args.steps, log)
    ref = {r["cache"]: r for r in rows if r["attention"] == "sdpa"}
    dyn, st = ref["DynamicCache"], ref["StaticCache"]
    for r in rows:
        peer = dyn if r["cache"] in ("DynamicCache", "attnopt growing") else st
        r["speedup_vs_sdpa_peer"] = peer["ms_per_token"] / r["ms_per_token"]
        r["same_tokens"] = r["tokens"] == dyn["tokens"]
    results["decode"] = rows
    grow = next(r for r in rows if r["cache"] == "attnopt growing")
    stat = next(r for r in rows if r["cache"] == "attnopt static")
    goals = [
        ("growing + attnopt >= 1.5x DynamicCache + sdpa", grow["speedup_vs_sdpa_peer"], 1.5),
        ("static + attnopt >= 1.0x StaticCache + sdpa", stat["speedup_vs_sdpa_peer"], 1.0),
    ]
    log("split-KV decode (flash-decoding), keys streamed from memory through 30 layers")
    results["split_kv"] = sk = bench_split_kv(log)
    goals.append(("split-KV decode >= 1.3x the unsplit call", sk["ratio"], 1.3))
    worst = max(grow["update_share"], stat["update_share"])
    goals.append(("cache bookkeeping <= 5% of a decode step (growing, static)", 0.05 - worst + 1, 1.0))
    if args.stream_tokens:
        log(f"streaming: {args.stream_tokens} tokens, 4 sinks + window 1024")
        s = bench_streaming(model, tok, args.stream_tokens, 4, 1024, log)
        results["streaming"] = s
        at = s["at"]
        if 4096 in at and args.stream_tokens > 4096:
            end = at[args.stream_tokens]
            drift_t = end["ms_per_token"] / at[4096]["ms_per_token"] - 1
            drift_m = end["rss_mib"] / at[4096]["rss_mib"] - 1
            a, b = s["interleaved"].values()
            s["drift_ms"], s["drift_rss"], s["drift_ms_interleaved"] = drift_t, drift_m, b / a - 1
            goals.append((f"streaming ms/token drift 4K -> {args.stream_tokens} within 10% (sequential marks)",
                          1 - abs(drift_t), 0.9))  # fmt: skip
            goals.append((f"streaming ms/token at position 4K vs {args.stream_tokens}, interleaved, within 10%",
                          1 - abs(b / a - 1), 0.9))  # fmt: skip
            goals.append(
                (f"streaming RSS drift 4K -> {args.stream_tokens} within 10%", 1 - abs(drift_m), 0.9)
            )
    if args.ppl_tokens:
        log(f"perplexity over {args.ppl_tokens} tokens of Python's documentation (window 256, 4 sinks)")
        results["perplexity"] = bench_perplexity(model, tok, args.ppl_tokens, 256, 4, log)
    log("")
    log(f"{'cache':16s} {'attention':9s} {'ms/token':>9s} {'vs sdpa':>8s} {'update':>7s}  same tokens")
    for r in rows:
        log(
            f"{r['cache']:16s} {r['attention']:9s} {r['ms_per_token']:9.2f} {r['speedup_vs_sdpa_peer']:7.2f}x "
            f"{r['update_share']:6.1%}  {r['same_tokens']}"
        )
    log(
        f"bookkeeping (cache update share of a step): growing {grow['update_share']:.1%}, static {stat['update_share']:.1%}"
    )
    for name, value, need in goals:
        log(f"  {'met   ' if value >= need else 'MISSED'} {name}: {value:.2f} (need {need})")
    for r in rows:
        r.pop("tokens")
    line = json.dumps(results, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0
