"""Context-parallel attention on N processes: `torchrun --nproc-per-node 2 examples/cp_attention.py`.

Every rank builds the same full problem (seeded), keeps its zigzag shard, runs causal attention over
the whole sequence with the ring (forward and backward), and rank 0 checks the reassembled output and
gradients against one process running attnopt.attention on the full tensors.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import attnopt as ao
import attnopt.distributed as cp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--mode", default="ring", choices=cp.MODES)
    args = ap.parse_args()
    dist.init_process_group("gloo")  # NCCL on GPUs; torchrun sets rank, world size and address
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, N = 1, 8, 2 * world, 64, args.tokens
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hkv, Hkv))
    mask = ao.document([0, N // 3, N]) & ao.causal()  # two packed documents, causal inside each

    shards = [cp.shard(t, layout="zigzag").requires_grad_(True) for t in (q, k, v)]
    t0 = time.perf_counter()
    out = cp.attention(*shards, mask=mask, mode=args.mode, layout="zigzag")
    out.sum().backward()
    seconds = time.perf_counter() - t0
    full = cp.unshard(out.detach(), layout="zigzag")
    grads = [cp.unshard(t.grad, layout="zigzag") for t in shards]

    if rank == 0:
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        t0 = time.perf_counter()
        ref = ao.attention(*leaves, mask=mask)
        ref.sum().backward()
        single = time.perf_counter() - t0
        diffs = [
            (a - b).abs().max() / b.abs().max()
            for a, b in zip([full, *grads], [ref, *(t.grad for t in leaves)])
        ]
        print(
            f"{world} ranks, mode={args.mode}, N={N}: max relative difference vs one process "
            f"out {diffs[0]:.1e}, dq {diffs[1]:.1e}, dk {diffs[2]:.1e}, dv {diffs[3]:.1e}; "
            f"fwd+bwd {seconds * 1e3:.0f} ms per rank vs {single * 1e3:.0f} ms in one process"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
