"""A first-order time model of context-parallel attention: ring vs allgather vs alltoall (issue #12).

One attention layer, forward + backward, causal, zigzag layout, on P devices, following the schedules
attnopt.distributed runs (as of commit d4e7f51):

* ``ring``: step 0 computes the local pairs while step 1's key rows travel, and every later step costs
  max(compute, transfer). Backward fetches the rows again the same way and runs each pair's fused
  backward straight from the rows' global (out, LSE) (attnopt.api.attention_backward: no forward rerun),
  at lse_grad_factor times a plain backward's cost (see Machine); step t's float32 dK/dV go back to their
  owner while step t + 1 computes, sharing the port with step t + 1's K/V; the last step's arrive after
  the loop.
* ``allgather``: one all-gather of every shard's K/V in the input dtype, kept from the forward for the
  backward, which does not gather again; the same per-pair compute as the ring (forward, then the fused
  backward from (out, LSE) at lse_grad_factor); then the float32 dK/dV of every step go back in one
  all-to-all that nothing overlaps. (It holds the gathered K/V, allgather_kept_bytes: memory, not time.)
* ``alltoall`` (DeepSpeed-Ulysses): q, k, v in and out back (4 all-to-alls; backward 4 more) around a
  full-sequence computation on Hq/P query heads (one plain forward and backward: no LSE gradient, so no
  padding). Needs Hkv % P == 0, so None beyond.

Compute is causal attention FLOPs over P devices at one sustained rate; zigzag gives every rank the
same work at every ring step (step_pairs). Links: a point-to-point transfer between nodes is limited
by one device's network port, an all-gather ring crosses each node boundary once per byte and so uses
all ports of a node (min(intra, gpus_per_node * inter) per device), and an all-to-all sends distinct
bytes to every peer (on-node over the intra link, off-node over the device's own port).
The row counts below are closed forms of make_plan's zigzag causal plan; tests check them against it.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("ring", "allgather", "alltoall")
# A pair's backward from the global (out, LSE) with the LSE's gradient, over a plain backward. attnopt's
# span backend carries dlse in extra head-dim columns (_with_lse_grad: one in fp32/fp64, two in bf16/fp16)
# and _PairsFn always passes one (zeros when the LSE is unused). Measured on the CPU span backend at
# D=128, N=2048, causal, 1 thread: ~1.07 bf16 and ~1.17 fp32 (at commit d4e7f51); 1.04-1.14 bf16 and
# 1.15-1.23 fp32 in three short runs while updating this model (B=1, Hq=8, Hkv 8 or 2; medians of 3-7,
# loaded 2-core machine); scripts/cp_scaling.py measures it again each run. 1.1: a round bf16 figure,
# for the bf16 layer below (attnopt's _PairsFn runs each pair in float32 today: the fp32 figure).
LSE_GRAD_FACTOR = 1.1


@dataclass(frozen=True)
class Layer:
    """Attention shape and element sizes (default: a Llama-3-8B layer in bf16)."""

    Hq: int = 32
    Hkv: int = 8
    D: int = 128
    bytes: int = 2  # q, k, v, out and their gradients as they travel
    grad_bytes: int = 4  # attnopt returns K/V gradients in float32


@dataclass(frozen=True)
class Machine:
    """Per-device compute rate and links (default: H100/H200 SXM nodes of 8 on NDR InfiniBand)."""

    tflops: float = 560.0  # sustained attention TFLOP/s per device, forward and backward alike
    bwd_factor: float = 2.5  # backward FLOPs / forward FLOPs (FlashAttention's convention)
    lse_grad_factor: float = LSE_GRAD_FACTOR  # ring / allgather pair backward cost over a plain one
    intra_gbs: float = 450.0  # GB/s per direction per device inside a node (NVLink 4)
    inter_gbs: float = 50.0  # GB/s per device across nodes (NDR 400 Gb/s, one port per device)
    gpus_per_node: int = 8
    latency_s: float = 10e-6  # per message or per collective step


@dataclass(frozen=True)
class Estimate:
    """Seconds of one layer: forward, backward, the part of both that is pure compute, and the K/V
    gradient exchange left after the last compute (ring: its last step's; allgather: its all-to-all)."""

    mode: str
    fwd_s: float
    bwd_s: float
    compute_s: float
    grad_return_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s

    @property
    def comm_fraction(self) -> float:
        """Share of the time spent waiting for communication (not hidden behind compute)."""
        return (self.total_s - self.compute_s) / self.total_s


def pair_bwd_passes(m: Machine) -> float:
    """Forward passes' worth of compute the ring's and allgather's backward costs: the fused backward
    from (out, LSE) with the LSE gradient, bwd_factor · lse_grad_factor (no forward rerun)."""
    return m.bwd_factor * m.lse_grad_factor


def causal_flops(N: int, layer: Layer) -> float:
    """Forward FLOPs of causal attention over N tokens: 4·N²·Hq·D / 2 (two matmuls, half the scores)."""
    return 2.0 * N * N * layer.Hq * layer.D


def kv_bytes(rows: float, layer: Layer, elem: int | None = None) -> float:
    """Bytes of K and V for `rows` positions (all Hkv heads); elem defaults to layer.bytes."""
    return rows * layer.Hkv * 2 * layer.D * (layer.bytes if elem is None else elem)


def zigzag_rows_received(N: int, P: int, rank: int) -> float:
    """Key rows `rank` needs from the others under a causal mask (zigzag: P - 1 early chunks of N/2P,
    plus the late chunk of every rank after it)."""
    return (2 * P - 2 - rank) * N / (2 * P)


def allgather_kept_bytes(N: int, layer: Layer) -> float:
    """Bytes of K/V allgather holds from its forward to its backward on every device: all N rows as
    gathered, in the input dtype (layer.bytes), not float32."""
    return kv_bytes(N, layer)


def ring_step_rows(N: int, P: int) -> float:
    """The most rows any rank receives at one ring step t >= 1: a whole shard (some rank r < t gets both
    chunks of rank r - t + P), so every step waits for one shard's K/V."""
    return N / P


def grad_return_rows(N: int, P: int) -> float:
    """The most rows whose gradients one rank sends or receives in the gradient return (rank 0 sends
    back everything it received; rank P - 1 gets back everything it sent)."""
    return (P - 1) * N / P


def step_pairs(N: int, P: int) -> float:
    """Unmasked (query, key) pairs each rank computes at each ring step: N²/2 spread over P·P steps."""
    return N * N / (2 * P * P)


def p2p_gbs(P: int, m: Machine) -> float:
    """Bandwidth of the slowest point-to-point link a step uses (one device's port once P spans nodes)."""
    return m.intra_gbs if m.gpus_per_node >= P else m.inter_gbs


def collective_gbs(P: int, m: Machine) -> float:
    """Per-device bandwidth of a ring all-gather: across nodes each byte enters a node once, through
    all gpus_per_node ports, then travels on the intra-node links."""
    return m.intra_gbs if m.gpus_per_node >= P else min(m.intra_gbs, m.gpus_per_node * m.inter_gbs)


def p2p_s(nbytes: float, P: int, m: Machine) -> float:
    return nbytes / (p2p_gbs(P, m) * 1e9) + m.latency_s


def allgather_s(total_bytes: float, P: int, m: Machine) -> float:
    """Ring all-gather of total_bytes (every shard together): (P-1)/P of it reaches each device."""
    return (P - 1) / P * total_bytes / (collective_gbs(P, m) * 1e9) + (P - 1) * m.latency_s


def alltoall_s(sent_bytes: float, P: int, m: Machine) -> float:
    """All-to-all in which each device sends sent_bytes, spread evenly over its P - 1 peers."""
    on_node = min(P, m.gpus_per_node) - 1
    off_node = P - 1 - on_node
    per_peer = sent_bytes / (P - 1)
    return (
        max(per_peer * on_node / (m.intra_gbs * 1e9), per_peer * off_node / (m.inter_gbs * 1e9)) + m.latency_s
    )


def estimate(mode: str, N: int, P: int, layer: Layer, m: Machine) -> Estimate | None:
    """Forward and backward seconds of one layer in `mode`; None where the mode cannot run (alltoall
    with Hkv % P != 0)."""
    fwd_compute = causal_flops(N, layer) / (P * m.tflops * 1e12)
    if mode in ("ring", "allgather"):
        bwd_compute = pair_bwd_passes(m) * fwd_compute  # from the global (out, LSE): no forward rerun
    else:
        bwd_compute = m.bwd_factor * fwd_compute
    if mode == "ring":
        kv = p2p_s(kv_bytes(ring_step_rows(N, P), layer), P, m)
        grad = p2p_s(kv_bytes(ring_step_rows(N, P), layer, layer.grad_bytes), P, m)
        c_f, c_b = fwd_compute / P, bwd_compute / P  # per step (zigzag: the same on every rank)
        fwd = c_f + (P - 1) * max(c_f, kv)
        bwd = c_b + (P - 1) * max(c_b, kv + grad) + grad
        return Estimate(mode, fwd, bwd, fwd_compute + bwd_compute, grad)
    if mode == "allgather":
        gather = allgather_s(kv_bytes(N, layer), P, m)  # once: the backward uses the kept shards
        grads = alltoall_s(kv_bytes(grad_return_rows(N, P), layer, layer.grad_bytes), P, m)
        return Estimate(mode, gather + fwd_compute, bwd_compute + grads, fwd_compute + bwd_compute, grads)
    if mode == "alltoall":
        if layer.Hkv % P:
            return None
        per_head = (P - 1) / P * (N / P) * layer.D * layer.bytes  # bytes per head one device sends
        moves = 2 * alltoall_s(per_head * layer.Hq, P, m) + 2 * alltoall_s(per_head * layer.Hkv, P, m)
        return Estimate(mode, moves + fwd_compute, moves + bwd_compute, fwd_compute + bwd_compute)
    raise ValueError(f"mode={mode!r} is unknown; allowed: {MODES}")


def ring_overlap_tokens(layer: Layer, m: Machine, gbs: float, backward: bool = False) -> float:
    """Tokens per device (N/P) from which a ring step's compute covers its messages at `gbs` GB/s
    (latency left out): work·step_pairs·4·Hq·D / R >= (N/P)·Hkv·2D·moved / B, with work and moved 1
    forward pass and the K/V bytes forward, pair_bwd_passes and K/V + dK/dV bytes backward."""
    work = pair_bwd_passes(m) if backward else 1.0
    moved = layer.bytes + (layer.grad_bytes if backward else 0)
    return layer.Hkv * moved * m.tflops * 1e12 / (work * layer.Hq * gbs * 1e9)


def winner(estimates: dict[str, Estimate | None]) -> str:
    """The mode with the least total time among those that can run."""
    runnable = {k: e.total_s for k, e in estimates.items() if e is not None}
    return min(runnable, key=runnable.__getitem__)


__all__ = [
    "LSE_GRAD_FACTOR",
    "MODES",
    "Estimate",
    "Layer",
    "Machine",
    "allgather_kept_bytes",
    "allgather_s",
    "alltoall_s",
    "causal_flops",
    "collective_gbs",
    "estimate",
    "grad_return_rows",
    "kv_bytes",
    "p2p_gbs",
    "p2p_s",
    "pair_bwd_passes",
    "ring_overlap_tokens",
    "ring_step_rows",
    "step_pairs",
    "winner",
    "zigzag_rows_received",
]
