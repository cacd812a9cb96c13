"""The context-parallel scaling model (attnopt.distributed.scaling) against the plan attnopt really runs.

The row counts the model charges (rows received, the largest transfer of a ring step, the gradient
return) and the work of a ring step are checked against make_plan's zigzag causal plan; the time model
is checked for the properties its table relies on.
"""

from __future__ import annotations

import pytest

import attnopt as ao
from attnopt import masks as M
from attnopt.distributed import Layout, make_plan
from attnopt.distributed import scaling as S

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


def _overlap(layer: S.Layer, m: S.Machine, P: int, pair_recompute: float = S.PAIR_RECOMPUTE) -> float:
    """N/P from which both the ring's forward and backward steps hide their messages."""
    gbs = S.p2p_gbs(P, m)
    return max(S.ring_overlap_tokens(layer, m, gbs, b, pair_recompute) for b in (False, True))


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


def test_without_the_pair_rerun_ring_beats_allgather_once_its_messages_hide():
    m, layer = S.Machine(), S.Layer()
    for P in (8, 16, 64):
        N = P * int(1.01 * _overlap(layer, m, P, pair_recompute=0))
        ring = S.estimate("ring", N, P, layer, m, pair_recompute=0)
        gather = S.estimate("allgather", N, P, layer, m)
        assert ring.compute_s == gather.compute_s
        assert ring.total_s < gather.total_s


def test_the_pair_rerun_costs_the_ring_one_forward_of_compute():
    m, layer = S.Machine(), S.Layer()
    fwd = S.causal_flops(2**18, layer) / (8 * m.tflops * 1e12)
    ring, bare = (S.estimate("ring", 2**18, 8, layer, m, pair_recompute=r) for r in (1, 0))
    assert ring.compute_s - bare.compute_s == pytest.approx(fwd, rel=1e-12)
    assert S.estimate("allgather", 2**18, 8, layer, m).compute_s == pytest.approx(bare.compute_s, rel=1e-12)


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
    m, layer = S.Machine(), S.Layer()
    fwd = 2 * 2**36 * 32 * 128 / (8 * 560e12)  # N = 2**18 on 8 devices
    passes = {"ring": 4.5, "allgather": 3.5, "alltoall": 3.5}  # the ring reruns each pair's forward
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
