"""Context parallelism: one sequence sharded across processes (torch.distributed: gloo on CPU, NCCL on GPU).

    import attnopt.distributed as cp
    q, k, v = (cp.shard(t, layout="zigzag") for t in (q_full, k_full, v_full))  # this rank's rows
    out = cp.attention(q, k, v, mask=attnopt.causal(), mode="ring", layout="zigzag")
    full = cp.unshard(out, layout="zigzag")

See attention() for the modes (ring, allgather, alltoall) and what is exact about them.
"""

from ._attention import MODES, attention
from ._hf import context_parallel, shard_inputs
from ._layout import LAYOUTS, Layout, shard, unshard
from ._plan import Plan, make_plan

__all__ = [
    "LAYOUTS",
    "MODES",
    "Layout",
    "Plan",
    "attention",
    "context_parallel",
    "make_plan",
    "shard",
    "shard_inputs",
    "unshard",
]
