"""CPU figures for issue #13 (compiled block-sparse kernels), ratios measured in one run, medians.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_flex_cpu.py [--quick]

1. bf16 sliding window 256 at N=8192: attnopt (auto, after compile_for) and attnopt pinned to 'flex'
   vs FlexAttention compiled with its own create_block_mask (goal: attnopt >= 1.2x faster).
2. Metadata at N=128K: attnopt.blockmask.lower (+ BlockMask) vs create_block_mask(_compile=True), and
   the eager create_block_mask's memory need (it evaluates the mask over all N² positions at once).
3. fp32 documents / prefix-LM / ALiBi (and softcap, where blockwise is today's only fused-free path;
   window and causal) at N=4096: every backend that runs it, warm, and what auto picks (goal: auto no
   slower than the best). `--only variants_bf16`: the same in bf16 (not in the default run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attnopt as ao
from attnopt import masks as M
from attnopt import mods as am
from attnopt.blockmask import lower


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def window_goal(repeats: int) -> dict:
    B, H, N, D, W = 1, 8, 8192, 64, 256
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(torch.bfloat16) for _ in range(3))
    mask = M.sliding_window(W - 1)

    def mm(b, h, i, j):
        return (j <= i) & (i - j < W)

    t = time.perf_counter()
    bm = create_block_mask(mm, None, None, N, N, device="cpu")
    cbm_ms = (time.perf_counter() - t) * 1e3
    flex = torch.compile(flex_attention, dynamic=False)
    flex(q, k, v, block_mask=bm)
    info = ao.compile_for(q, k, v, mask=mask)
    chosen = ao.explain(q, k, v, mask=mask).splitlines()[1]
    res = {}
    for _ in range(2):  # interleaved rounds: the machine is shared and noisy
        for name, fn in (
            ("flex_create_block_mask", lambda: flex(q, k, v, block_mask=bm)),
            ("attnopt_auto", lambda: ao.attention(q, k, v, mask=mask)),
            ("attnopt_flex", lambda: ao.attention(q, k, v, mask=mask, backend="flex")),
            ("attnopt_span", lambda: ao.attention(q, k, v, mask=mask, backend="span")),
        ):
            res.setdefault(name, []).append(median_ms(fn, repeats))
    ms = {n: min(v) for n, v in res.items()}
    peer = ms["flex_create_block_mask"]
    return {
        "shape": f"B={B} H={H} N={N} D={D} bf16 window {W}",
        "ms": {n: round(x, 2) for n, x in ms.items()},
        "speedup_vs_flex_cbm": {
            n: round(peer / x, 3) for n, x in ms.items() if n != "flex_create_block_mask"
        },
        "auto": chosen,
        "create_block_mask_ms": round(cbm_ms, 1),
        "compile_for": info,
    }


def metadata_goal(repeats: int) -> dict:
    N = 128 * 1024
    out = {"N": N}
    for name, mask in (("window_256", M.sliding_window(255)), ("causal", M.causal())):
        ctx = M.MaskContext(1, 8, N, N)
        out[f"attnopt_lower_ms_{name}"] = round(
            median_ms(lambda m=mask, c=ctx: lower(m, c).block_mask(), repeats * 3, warmup=2), 3
        )
    w = 256

    def mm(b, h, i, j):
        return (j <= i) & (i - j < w)

    t = time.perf_counter()
    create_block_mask(mm, None, None, N, N, device="cpu", _compile=True)
    out["create_block_mask_compile_first_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    out["create_block_mask_compile_ms"] = round(
        median_ms(lambda: create_block_mask(mm, None, None, N, N, device="cpu", _compile=True), 3, warmup=0),
        1,
    )
    out["create_block_mask_eager_needs_GiB"] = round(N * N * 8 / 2**30, 1)  # int64 index grids of N²
    return out


def variants_goal(repeats: int, dtype: torch.dtype = torch.float32) -> dict:
    B, H, N, D = 1, 8, 4096, 64
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    variants = {
        "documents": {"mask": M.document([0, N // 4, N // 2, 3 * N // 4, N]) & M.causal()},
        "prefix_lm": {"mask": M.prefix_lm(N // 4)},
        "alibi": {"mask": M.causal(), "score_mod": am.alibi(am.alibi_slopes(H))},
        "softcap": {"mask": M.causal(), "score_mod": am.softcap(30.0)},
        "window_256": {"mask": M.sliding_window(255)},
        "causal": {"mask": M.causal()},
    }
    out = {}
    for name, kw in variants.items():
        ao.compile_for(q, k, v, **kw)
        row = {}
        for b in ("span", "flex", "blockwise", "sdpa"):
            try:
                row[b] = round(
                    median_ms(lambda b=b, kw=kw: ao.attention(q, k, v, backend=b, **kw), repeats), 1
                )
            except NotImplementedError:
                continue
        row["auto"] = round(median_ms(lambda kw=kw: ao.attention(q, k, v, **kw), repeats), 1)
        best = min((x for n, x in row.items() if n != "auto"))
        out[name] = {
            "ms": row,
            "auto_runs": ao.explain(q, k, v, **kw).splitlines()[1],
            "auto_vs_best": round(best / row["auto"], 3),
        }
    return out


def ranks_timing() -> dict:
    """The timings behind flex's CPU ranks: span / flex / sdpa, best of 3 interleaved calls, N=4096."""
    N, B, H, D = 4096, 1, 8, 64
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
        variants = {
            "alibi": {"mask": M.causal(), "score_mod": am.alibi(am.alibi_slopes(H))},
            "bias_causal": {"score_mod": am.bias(torch.randn(1, H, N, N)), "mask": M.causal()},
            "documents": {"mask": M.document([0, N // 4, N // 2, 3 * N // 4, N]) & M.causal()},
        }
        for name, kw in variants.items():
            ao.compile_for(q, k, v, **kw)
            best: dict[str, float] = {}
            for _ in range(3):
                for b in ("span", "flex", "sdpa"):
                    try:
                        t = time.perf_counter()
                        ao.attention(q, k, v, backend=b, **kw)
                        best[b] = min(best.get(b, float("inf")), time.perf_counter() - t)
                    except NotImplementedError:
                        continue
            out[f"{str(dtype)[6:]}_{name}"] = {b: round(x * 1e3, 1) for b, x in best.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument(
        "--only", choices=["window", "metadata", "variants", "variants_bf16", "ranks"], action="append"
    )
    a = p.parse_args()
    repeats = 3 if a.quick else 7
    only = a.only or ["window", "metadata", "variants"]
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if "window" in only:
        res["window_bf16_8192"] = window_goal(repeats)
        print(json.dumps(res["window_bf16_8192"], indent=1), flush=True)
    if "metadata" in only:
        res["metadata_128k"] = metadata_goal(repeats)
        print(json.dumps(res["metadata_128k"], indent=1), flush=True)
    if "variants" in only:
        res["variants_fp32_4096"] = variants_goal(repeats)
        print(json.dumps(res["variants_fp32_4096"], indent=1), flush=True)
    if "variants_bf16" in only:
        res["variants_bf16_4096"] = variants_goal(repeats, torch.bfloat16)
        print(json.dumps(res["variants_bf16_4096"], indent=1), flush=True)
    if "ranks" in only:
        res["ranks_4096"] = ranks_timing()
        print(json.dumps(res["ranks_4096"], indent=1), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
