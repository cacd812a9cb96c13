"""The context-parallel scaling model (attnopt.distributed.scaling) against the plan attnopt really runs.

The row counts the model charges (rows received, the largest transfer of a ring step, the gradient
return) and the work of a ring step are checked against make_plan's zigzag causal plan; what the model
assumes of the ring's and allgather's backward (no forward rerun per pair, allgather gathers once and
keeps the K/V in the input dtype, float32 gradients back) is checked on 2 gloo processes; the time model
is checked for the properties its table relies on.
"""

from __future__ import annotations

import pytest
import torch

import attnopt as ao
import attnopt.distributed as cp
from attnopt import masks as M
from attnopt.distributed import Layout, make_plan
from attnopt.distributed import scaling as S
from tests._dist import run_ranks

SMALL = [(2, 40), (4, 48), (8, 96)]  # (P, N): N divisible by 2P, as in the model's layouts


def _plan(P: int, N: int):
    return make_plan(Layout.zigzag(N, P), ao.causal(), M.MaskContext(B=1, Hq=1, Sq=N, Sk=N))


def _causal_pairs(qa: int, lq: int, k0: int, k1: int) -> int:
    """(query, key) pairs with key <= query among queries [qa, qa+lq) and keys [k0, k1)."""
    return sum(min(max(i + 1 - k0, 0), k1 - k0) for i in range(qa, qa + lq))


@pytest.mark.parametrize("P,N", SMALL)
def test_rows_received_match_the_plan(P, N):
    plan = _plan(P, N)
    assert [plan.rows_received(r) for r in range(P)] == [S.zigzag_rows_received(N, P, r) for r in range(P)]


@pytest.mark.parametrize("P,N", SMALL)
def test_every_ring_step_waits_for_one_whole_shard(P, N):
    plan = _plan(P, N)
    for t in range(1, P):
        largest = max(plan.get(d, (d - t) % P).rows for d in range(P) if plan.get(d, (d - t) % P))
        assert largest == S.ring_step_rows(N, P), f"step {t}"


@pytest.mark.parametrize("P,N", SMALL)
def test_gradient_return_rows_match_the_plan(P, N):
    plan = _plan(P, N)
    most = max(max(plan.rows_received(r), plan.rows_sent(r)) for r in range(P))
    assert most == S.grad_return_rows(N, P)


@pytest.mark.parametrize("P,N", SMALL)
def test_zigzag_gives_every_rank_the_same_work_at_every_step(P, N):
    plan = _plan(P, N)
    diagonal = N / (2 * P)  # step 0 holds the two diagonal chunks; the model counts half their squares
    for d in range(P):
        for t in range(P):
            tr = plan.get(d, (d - t) % P)
            work = sum(_causal_pairs(p.qa, p.lq, p.k0, p.k1) for p in tr.pairs)
            assert work == S.step_pairs(N, P) + (diagonal if t == 0 else 0), f"rank {d} step {t}"


# What the model assumes of attnopt's code, on real processes: B=1, Hq=4, Hkv=2, D=16, bf16, causal, zigzag.
CODE = {"P": 2, "N": 64, "Hq": 4, "Hkv": 2, "D": 16}


def _counted_fwd_bwd(rank: int, P: int, N: int, Hq: int, Hkv: int, D: int) -> dict:
    """Per mode (ring, allgather): calls of attnopt.api.attention (a forward: the pairs' own, or a rerun
    by attention_backward's fallback), of attention_backward and of Gather.gather, in the forward and in
    the backward; the dtype of the gathered K/V; the bytes this rank sent (traffic)."""
    from attnopt import api
    from attnopt.distributed import _comm

    counts = {"attention": 0, "attention_backward": 0, "gather": 0}
    gathered: list = []

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return call

    def gather(self, phase):
        counts["gather"] += 1
        _gather(self, phase)
        gathered.append(self.shards[0][0].dtype)

    _gather = _comm.Gather.gather
    # _Runner.call (the pairs' forward) and _grad_by_rerun (attention_backward's fallback) look it up here
    api.attention = counted("attention", api.attention)
    api.attention_backward = counted("attention_backward", api.attention_backward)
    _comm.Gather.gather = gather
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, h, N, D, generator=g) for h in (Hq, Hkv, Hkv, Hq))
    q, k, v = (cp.shard(t.bfloat16(), layout="zigzag") for t in (q, k, v))
    do = cp.shard(do, layout="zigzag")
    result = {}
    for mode in ("ring", "allgather"):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        traffic: dict = {}
        before = dict(counts)
        out = cp.attention(*leaves, mask=ao.causal(), mode=mode, layout="zigzag", traffic=traffic)
        fwd = {key: counts[key] - before[key] for key in counts}
        before = dict(counts)
        (out.float() * do).sum().backward()
        bwd = {key: counts[key] - before[key] for key in counts}
        assert all(t.grad is not None for t in leaves)
        result[mode] = {"fwd": fwd, "bwd": bwd, "traffic": traffic, "gathered": [str(d) for d in gathered]}
        gathered.clear()
    return result


@pytest.fixture(scope="module")
def counted():
    c = CODE
    return run_ranks(_counted_fwd_bwd, c["P"], c["N"], c["Hq"], c["Hkv"], c["D"])


def test_ring_and_allgather_backward_rerun_no_forward(counted):
    """The model charges their backward pair_bwd_passes (no forward rerun): one attention_backward per
    pair of the forward, and no forward call at all in the backward (neither _Runner.call nor the rerun
    attention_backward falls back to)."""
    for rank, modes in enumerate(counted):
        for mode, c in modes.items():
            pairs = c["fwd"]["attention"]
            assert pairs > 0, (rank, mode)
            assert c["bwd"]["attention"] == 0, f"rank {rank} {mode}: the backward reran a forward"
            assert c["bwd"]["attention_backward"] == pairs, (rank, mode)


def test_allgather_gathers_once_keeps_the_input_dtype_and_returns_fp32_gradients(counted):
    c = CODE
    layer = S.Layer(Hq=c["Hq"], Hkv=c["Hkv"], D=c["D"], bytes=2, grad_bytes=4)
    for rank, modes in enumerate(counted):
        ag, ring = modes["allgather"], modes["ring"]
        assert (ag["fwd"]["gather"], ag["bwd"]["gather"]) == (1, 0)
        assert ag["gathered"] == ["torch.bfloat16"]
        # every rank's whole shard goes to the P - 1 others: (P-1)/P of what each then keeps
        kept = S.allgather_kept_bytes(c["N"], layer)
        assert ag["traffic"]["sent_bytes_forward"] == (c["P"] - 1) / c["P"] * kept
        grads = S.kv_bytes(S.zigzag_rows_received(c["N"], c["P"], rank), layer, layer.grad_bytes)
        assert ag["traffic"]["sent_bytes_backward"] == grads  # the fp32 all-to-all only: no second gather
        # the ring fetches its K/V again (input dtype) and sends fp32 dK/dV for the rows it received
        assert ring["traffic"]["sent_bytes_backward"] == ring["traffic"]["sent_bytes_forward"] + grads


def _overlap(layer: S.Layer, m: S.Machine, P: int) -> float:
    """N/P from which both the ring's forward and backward steps hide their messages."""
    gbs = S.p2p_gbs(P, m)
    return max(S.ring_overlap_tokens(layer, m, gbs, b) for b in (False, True))


def test_ring_hides_its_messages_above_the_overlap_length():
    m, layer = S.Machine(latency_s=0.0), S.Layer()  # the overlap lengths leave latency out
    for P in (8, 16, 64):
        N = P * int(1.01 * _overlap(layer, m, P))
        ring = S.estimate("ring", N, P, layer, m)
        grad = S.p2p_s(S.kv_bytes(N / P, layer, layer.grad_bytes), P, m)  # the last step's dK/dV
        assert ring.total_s == pytest.approx(ring.compute_s + grad, rel=1e-12)
        N = P * int(0.9 * S.ring_overlap_tokens(layer, m, S.p2p_gbs(P, m), backward=True))
        ring = S.estimate("ring", N, P, layer, m)
        assert ring.total_s > ring.compute_s + grad * 1.5


def test_ring_beats_allgather_once_its_messages_hide():
    m, layer = S.Machine(latency_s=0.0), S.Layer()  # the overlap lengths leave latency out
    for P in (8, 16, 64):
        N = P * int(1.01 * _overlap(layer, m, P))
        ring = S.estimate("ring", N, P, layer, m)
        gather = S.estimate("allgather", N, P, layer, m)
        assert ring.compute_s == gather.compute_s
        assert ring.total_s < gather.total_s


def test_ring_and_allgather_backward_is_the_lse_grad_backward_without_a_rerun():
    """Both start each pair's backward from the global (out, LSE): bwd_factor · lse_grad_factor forward
    passes, no extra forward; with lse_grad_factor 1 they compute exactly what alltoall does."""
    layer = S.Layer()
    for factor in (1.0, 1.1, 1.25):
        m = S.Machine(lse_grad_factor=factor)
        fwd = S.causal_flops(2**18, layer) / (8 * m.tflops * 1e12)
        for mode in ("ring", "allgather"):
            e = S.estimate(mode, 2**18, 8, layer, m)
            assert e.compute_s == pytest.approx((1 + 2.5 * factor) * fwd, rel=1e-12), (mode, factor)
            assert e.bwd_s >= 2.5 * factor * fwd
        plain = S.estimate("alltoall", 2**18, 8, layer, m).compute_s
        assert plain == pytest.approx(3.5 * fwd, rel=1e-12)
    assert S.Machine().lse_grad_factor == S.LSE_GRAD_FACTOR


def test_allgather_beats_ring_when_steps_wait_on_infiniband():
    m, layer = S.Machine(), S.Layer()
    P = 16
    N = P * int(S.ring_overlap_tokens(layer, m, m.inter_gbs, backward=True) / 4)
    ring, gather = S.estimate("ring", N, P, layer, m), S.estimate("allgather", N, P, layer, m)
    step = S.p2p_s(S.kv_bytes(N / P, layer), P, m)  # one shard over one InfiniBand port
    assert ring.fwd_s == pytest.approx(S.causal_flops(N, layer) / (P * P * m.tflops * 1e12) + (P - 1) * step)
    assert gather.total_s < ring.total_s
    assert S.winner({"ring": ring, "allgather": gather}) == "allgather"


def test_alltoall_is_not_available_when_P_does_not_divide_Hkv():
    m = S.Machine()
    assert S.estimate("alltoall", 2**17, 16, S.Layer(), m) is None
    assert S.estimate("alltoall", 2**17, 8, S.Layer(), m) is not None
    assert S.estimate("alltoall", 2**17, 8, S.Layer(Hkv=4), m) is None
    assert S.winner({"ring": S.estimate("ring", 2**17, 16, S.Layer(), m), "alltoall": None}) == "ring"


def test_compute_is_causal_flops_times_the_passes_each_mode_runs_over_P():
    m, layer = S.Machine(lse_grad_factor=1.2), S.Layer()
    fwd = 2 * 2**36 * 32 * 128 / (8 * 560e12)  # N = 2**18 on 8 devices
    passes = {"ring": 4.0, "allgather": 4.0, "alltoall": 3.5}  # 1 + 2.5 · 1.2: the LSE gradient's padding
    for mode in S.MODES:
        e = S.estimate(mode, 2**18, 8, layer, m)
        assert e.compute_s == pytest.approx(passes[mode] * fwd, rel=1e-12)
        assert 0 < e.comm_fraction < 1


def test_all_to_all_crosses_nodes_on_each_device_port_but_all_gather_on_all_ports():
    m = S.Machine(latency_s=0.0)
    assert S.alltoall_s(7e9, 8, m) == pytest.approx(7e9 / 450e9)
    assert S.alltoall_s(15e9, 16, m) == pytest.approx(8e9 / 50e9)  # 8 of 15 peers are off the node
    assert S.allgather_s(16e9, 16, m) == pytest.approx(15e9 / 400e9)


def test_allgather_gathers_once_and_returns_gradients_in_one_all_to_all():
    m, layer = S.Machine(), S.Layer()
    for P in (8, 16, 64):
        e = S.estimate("allgather", 2**18, P, layer, m)
        grads = S.alltoall_s(S.kv_bytes(S.grad_return_rows(2**18, P), layer, 4), P, m)
        assert e.grad_return_s == grads
        assert e.total_s == pytest.approx(e.compute_s + S.allgather_s(S.kv_bytes(2**18, layer), P, m) + grads)
