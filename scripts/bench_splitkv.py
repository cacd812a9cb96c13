"""Split-KV decode vs today's unsplit call: median ms per attention() call, variants interleaved.

    .venv/bin/python scripts/bench_splitkv.py                 # the default grid, 2 threads
    .venv/bin/python scripts/bench_splitkv.py --threads 2 --reps 300 --shapes 1,9,3,1,8192,64
    .venv/bin/python scripts/bench_splitkv.py --dtype bfloat16 --mask padding

Each row: `unsplit` = attention(backend="sdpa") (the GQA-folded fused call attention() ran before
splitkv existed), `n=k` = attention(num_splits=k) (backend splitkv), `auto` = attention() as shipped
(the split auto_splits() picks, or sdpa). Every variant is warmed up, then the variants run in turn
(alternating, so load changes hit all of them alike) and the median of --reps calls is reported.
--layers L cycles every variant through L distinct (q, k, v) sets, as a decode step walks through a
model's layers: with L * (size of K and V) beyond the caches, the keys stream from memory as in a
real generation loop instead of staying cache-resident (the default L=1 measures the hot case).
Benchmarks are never tests: timings on shared machines are noisy; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Iterator

import torch

import attnopt as ao
from attnopt.backends.splitkv import auto_splits

DEFAULT_SHAPES = [
    (1, 9, 3, 1, 8192, 64),  # the goal: SmolLM2-135M decode at 8K keys
    (1, 9, 3, 1, 2048, 64),
    (1, 9, 3, 1, 4096, 64),
    (1, 9, 3, 1, 8191, 64),  # Sk not divisible by n: the overlap mask
    (1, 9, 3, 1, 16384, 64),
    (1, 9, 3, 2, 8192, 64),
    (1, 8, 1, 1, 8192, 64),  # MQA: one kv head
    (1, 32, 8, 1, 8192, 64),  # 8 kv heads: already balanced on 2 threads
    (5, 9, 3, 1, 2048, 64),  # 15 items
]


def bench(fns: dict, reps: int, warmup: int = 20) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _caller(layers: list, mask: object, step: Iterator[int], **kw):
    """attention(**kw) on the next (q, k, v) of `layers` each call (a decode step walking the layers).

    `step` is shared by all variants: consecutive calls, whatever their variant, read different layers,
    so no variant finds the keys another one just pulled into the caches.
    """

    def call():
        q, k, v = layers[next(step) % len(layers)]
        return ao.attention(q, k, v, mask=mask, **kw)

    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mask", choices=["none", "padding", "left_padding"], default="none")
    ap.add_argument("--splits", default="2,3,4,8")
    ap.add_argument("--shapes", nargs="*", help="B,Hq,Hkv,Sq,Sk,D ...")
    ap.add_argument("--layers", type=int, default=1, help="distinct (q, k, v) sets cycled through")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    splits = [int(x) for x in args.splits.split(",")]
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, mask={args.mask}, "
        f"reps={args.reps}, layers={args.layers}"
    )
    print(
        f"{'B,Hq,Hkv,Sq,Sk,D':>22} {'unsplit':>8} "
        + " ".join(f"{'n=' + str(n):>13}" for n in splits)
        + f" {'auto':>16}"
    )
    g = torch.Generator().manual_seed(0)
    for B, Hq, Hkv, Sq, Sk, D in shapes:
        layers = []
        for _ in range(args.layers):
            q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
            k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
            v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
            layers.append((q, k, v))
        mask = None
        if args.mask == "padding":
            mask = ao.padding(torch.linspace(Sk // 2, Sk, B).long())
        elif args.mask == "left_padding":
            mask = ao.left_padding(torch.linspace(0, Sk // 2, B).long())
        step = itertools.count()
        fns = {"unsplit": _caller(layers, mask, step, backend="sdpa")}
        for n in splits:
            fns[f"n={n}"] = _caller(layers, mask, step, num_splits=n)
        fns["auto"] = _caller(layers, mask, step)
        with torch.no_grad():
            r = bench(fns, args.reps)
        base = r["unsplit"]
        n_auto = auto_splits(B, Hkv, Sk, D, torch.get_num_threads(), dtype) if mask is None else 1
        cells = " ".join(f"{r[f'n={n}']:6.3f} {base / r[f'n={n}']:5.2f}x" for n in splits)
        shape = ",".join(map(str, (B, Hq, Hkv, Sq, Sk, D)))
        print(
            f"{shape:>22} {base:8.3f} {cells} {r['auto']:6.3f} {base / r['auto']:4.2f}x n={n_auto}",
            flush=True,
        )


if __name__ == "__main__":
    main()
