"""Measure the serving peers on SmolLM2-135M fp32, CPU (issue #10): transformers continuous batching (CB)
with sdpa, and sequential ``model.generate``.

Parts (``--part``, repeatable; default: check defaults a-small a b):

* ``check``: CB (``generate_batch`` and the per-request-budget manager path) vs sequential ``generate``
  greedy tokens on a few short prompts, EOS ignored and honoured.
* ``defaults``: what CB would allocate here with a default ``ContinuousBatchingConfig`` (its own sizing
  arithmetic, ``PagedAttentionMemoryHandler``; nothing is allocated) for the 16 × 4096 workload.
* ``a-small``: decode step of CB+sdpa with 16 × 1024-token contexts (prefix-warmed, see
  ``peer_decode_step``); ``--cold`` also runs it cold through ``generate_batch`` (minutes: cross-request
  prefill) to check the warm measurement.
* ``a``: the same with 16 × 4096-token contexts (prefix-warmed only; cold would take hours here).
* ``b`` (= ``b-cb`` then ``b-seq``): 64-request mixed workload (``mixed_workload(seed=0)``): tokens/s of
  CB+sdpa (per-request budgets) and of sequential generate (which stops starting requests after
  ``--seq-budget-s``: its tokens/s is then over the requests it completed). With ``--out``, the second of
  the two compares its greedy tokens with the first's.

``TRANSFORMERS_SDPA_FORCE_GQA=1`` in the environment makes transformers' sdpa wrapper pass
``enable_gqa=True`` with a mask instead of ``repeat_kv`` (its CPU default when a mask is given).

Every part prints the load average before and after, its duration, and a JSON line; ``--out DIR`` also
writes ``DIR/<part>.json``. Example::

    .venv/bin/python scripts/probe_peer_serving.py --part a-small --part a --out /tmp/peer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def _cpu() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    t = os.times()
    return t.user + t.system


def _wait_for_load(limit: float, max_wait_s: float) -> None:
    t = time.time()
    while os.getloadavg()[0] >= limit and time.time() - t < max_wait_s:
        print(f"  load {_load()} >= {limit}: waiting ...", flush=True)
        time.sleep(30)


def _strip(summary: dict) -> dict:
    """The summary without the long per-step probe list (kept in the JSON file)."""
    s = json.loads(json.dumps(summary))
    probe = s.get("info", {}).get("probe")
    if probe:
        probe.pop("per_step", None)
    s.get("info", {}).pop("own_ttft_s", None)
    return s


def default_sizing(model, max_prompt: int, new: int, n: int) -> dict:
    """CB's own sizing for a default ContinuousBatchingConfig on this machine, without allocating."""
    from math import lcm

    import torch
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cache import (
        ATTN_TYPE_TO_ALLOCATOR,
        PagedAttentionMemoryHandler,
        group_layers_by_attn_type,
    )
    from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator
    from transformers.generation.continuous_batching.initialization import resolve_continuous_batching_config
    from transformers.generation.continuous_batching.utils import (
        WorkloadHints,
        find_head_dim,
        find_num_key_value_heads,
    )

    cfg = model.config.get_text_config()
    hints = WorkloadHints(max_prompt_length=max_prompt, max_generated_length=new, num_requests=n)
    cb = resolve_continuous_batching_config(
        cfg, ContinuousBatchingConfig(auto_switch_to_flash=False), hints, False, torch.device("cpu")
    )
    hkv, d, dt = find_num_key_value_heads(cfg), find_head_dim(cfg), model.dtype
    allocs = [
        ATTN_TYPE_TO_ALLOCATOR[t](
            index=i,
            layer_indices=layers,
            num_key_value_heads=hkv,
            config=cfg,
            cache_dtype=dt,
            page_size=cb.page_size,
            allow_block_sharing=True,
        )
        for i, (t, layers) in enumerate(group_layers_by_attn_type(cfg).items())
    ]
    bps = lcm(*(a.bytes_per_block for a in allocs), 128)
    tps = max((bps // a.bytes_per_block) * a.tokens_per_page for a in allocs)
    bpb = cfg.num_hidden_layers * FullAttentionCacheAllocator.get_bytes_per_page(hkv, d, dt, cb.page_size)
    h = PagedAttentionMemoryHandler(
        config=cfg,
        cb_config=cb,
        dtype=dt,
        bytes_per_sector=bps,
        tokens_per_sector=tps,
        bytes_per_block=bpb,
        attn_types=[a.layer_type for a in allocs],
        model_supports_logits_to_keep=bool(
            callable(sup := getattr(model, "_supports_logits_to_keep", None)) and sup()
        ),
        kv_tp_size=1,
    )
    m, sectors = h.infer_max_batch_tokens_and_num_sectors()
    tokens = sectors * tps
    return {
        "max_memory_percent": cb.max_memory_percent,
        "available_gib": round(h.available_memory / 2**30, 2),
        "max_batch_tokens": m,
        "cache_tokens": tokens,
        "cache_gib": round(sectors * bps / 2**30, 2),
        "mask_shape": [1, 1, m, tokens + m],
        "mask_gib": round(h.attention_mask_bytes(m, sectors) / 2**30, 2),
        "footprint_gib": round(h.compute_memory_footprint(m, sectors) / 2**30, 2),
        "max_blocks_per_request": cb.max_blocks_per_request,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--part", action="append", choices=("check", "defaults", "a-small", "a", "b", "b-cb", "b-seq")
    )
    p.add_argument("--requests", type=int, default=16, help="a / a-small: R (default 16)")
    p.add_argument("--small-len", type=int, default=1024)
    p.add_argument("--len", type=int, default=4096, help="a: context tokens (default 4096)")
    p.add_argument("--new", type=int, default=8, help="a / a-small: new tokens per request (default 8)")
    p.add_argument("--cold", action="store_true", help="a-small: also the cold generate_batch run")
    p.add_argument("--cold-new", type=int, default=32, help="cold run budget (must outlast the prefills)")
    p.add_argument("--mixed-n", type=int, default=64)
    p.add_argument("--seq-budget-s", type=float, default=600.0)
    p.add_argument("--max-load", type=float, default=2.5, help="wait (up to --max-wait-s) for load below")
    p.add_argument("--max-wait-s", type=float, default=900.0)
    p.add_argument("--out", metavar="DIR")
    args = p.parse_args()
    parts = args.part or ["check", "defaults", "a-small", "a", "b"]
    parts = [q for part in parts for q in (("b-cb", "b-seq") if part == "b" else (part,))]

    import torch

    torch.set_num_threads(2)
    from attnopt.bench.serving_peers import (
        compare_tokens,
        peer_decode_step,
        peer_generate_batch,
        peer_sequential_generate,
    )
    from attnopt.bench.workload import long_contexts, mixed_workload, workload_stats
    from attnopt.demo import load_smollm2

    t = time.perf_counter()
    model, tok = load_smollm2(attn_implementation="sdpa")
    print(
        f"model loaded in {time.perf_counter() - t:.1f} s; torch {torch.__version__}, threads 2", flush=True
    )
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    def record(part: str, result: dict) -> None:
        print(
            json.dumps(
                {"part": part, **{k: _strip(v) if isinstance(v, dict) else v for k, v in result.items()}}
            )
        )
        if args.out:
            with open(os.path.join(args.out, f"{part}.json"), "w") as f:
                json.dump(result, f, indent=1)
        sys.stdout.flush()

    for part in parts:
        if part not in ("check", "defaults"):
            _wait_for_load(args.max_load, args.max_wait_s)
        load0, t0, cpu0 = _load(), time.perf_counter(), _cpu()
        print(f"== {part}: load before {load0}", flush=True)
        result: dict = {"load_before": load0}

        if part == "check":
            w = mixed_workload(tok, n=6, seed=1, prompt_tokens=(8, 96), new_tokens=(4, 16))
            prompts, budgets = [x.prompt_ids for x in w], [x.max_new_tokens for x in w]
            chat = tok.apply_chat_template(
                [{"role": "user", "content": "Say hi."}], add_generation_prompt=True
            )
            chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
            for ignore_eos in (True, False):
                seq = peer_sequential_generate(model, [*prompts, chat], [*budgets, 64], ignore_eos=ignore_eos)
                man = peer_generate_batch(model, [*prompts, chat], [*budgets, 64], ignore_eos=ignore_eos)
                seq_eq = peer_sequential_generate(model, prompts, 12, ignore_eos=ignore_eos)
                gb = peer_generate_batch(model, prompts, 12, api="generate_batch", ignore_eos=ignore_eos)
                result[f"ignore_eos={ignore_eos}"] = {
                    "manager_vs_generate": compare_tokens(man.tokens, seq.tokens),
                    "generate_batch_vs_generate": compare_tokens(gb.tokens, seq_eq.tokens),
                    "new_tokens_seq_vs_cb": [seq.new_tokens, man.new_tokens],
                    "chat_reply": tok.decode(seq.tokens[-1]),
                    "chat_reply_has_eos": model.generation_config.eos_token_id in seq.tokens[-1],
                }

        elif part == "defaults":
            result["defaults_16x4096"] = default_sizing(
                model, max_prompt=args.len, new=args.new, n=args.requests
            )

        elif part in ("a-small", "a"):
            n = args.small_len if part == "a-small" else args.len
            ctx = [x.prompt_ids for x in long_contexts(tok, args.requests, n)]
            result["workload"] = f"{args.requests} x {n} tokens, {args.new} new each"
            run = peer_decode_step(model, ctx, new_tokens=args.new)
            result["sdpa_force_gqa_env"] = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0")
            result["decode_step"] = run.summary()
            result["tokens"] = run.tokens
            result["decode_step"]["step_times_s"] = [round(x, 3) for x in run.step_times_s]
            if part == "a-small" and args.cold:
                t1 = time.perf_counter()
                cold = peer_generate_batch(model, ctx, args.cold_new, api="generate_batch")
                result["cold_generate_batch"] = cold.summary()
                result["cold_generate_batch"]["step_times_s"] = [round(x, 3) for x in cold.step_times_s]
                result["cold_elapsed_s"] = round(time.perf_counter() - t1, 1)
                k = min(args.new, args.cold_new)
                result["warm_vs_cold_tokens"] = compare_tokens(run.tokens, [x[:k] for x in cold.tokens])

        elif part in ("b-cb", "b-seq"):
            w = mixed_workload(tok, n=args.mixed_n, seed=0)
            prompts, budgets = [x.prompt_ids for x in w], [x.max_new_tokens for x in w]
            result["workload"] = workload_stats(w)
            if part == "b-cb":
                run = peer_generate_batch(model, prompts, budgets, instrument=True)
            else:
                run = peer_sequential_generate(model, prompts, budgets, time_budget_s=args.seq_budget_s)
            result["run"] = run.summary()
            result["tokens"] = run.tokens
            other = os.path.join(args.out or "", "b-seq.json" if part == "b-cb" else "b-cb.json")
            if args.out and os.path.exists(other):
                with open(other) as f:
                    theirs = json.load(f)["tokens"]
                done = min(len(theirs), len(run.tokens))
                result["cb_vs_sequential_tokens"] = compare_tokens(theirs[:done], run.tokens[:done])

        result["load_after"] = _load()
        result["elapsed_s"] = round(time.perf_counter() - t0, 1)
        # 2.0 = this process had both cores for the whole part; well below = it shared them
        result["cpu_per_wall"] = round((_cpu() - cpu0) / max(result["elapsed_s"], 1e-9), 2)
        print(f"== {part}: {result['elapsed_s']} s, load after {result['load_after']}", flush=True)
        record(part, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
