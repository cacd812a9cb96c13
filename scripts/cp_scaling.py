"""Context-parallel scaling (issue #12): ring vs allgather vs alltoall, measured here and modelled at scale.

    .venv/bin/python scripts/cp_scaling.py                  # Part A (2 and 4 gloo processes) + Part B
    .venv/bin/python scripts/cp_scaling.py --quick          # Part B + a tiny Part A (2 processes, N=2048)
    .venv/bin/python scripts/cp_scaling.py --json out.json

Part A, measured on this machine (CPU, gloo over localhost, one thread per process, spawned here):
gloo point-to-point latency and bandwidth (ping-pong), all_gather and all_to_all_single throughput, and
attnopt.distributed.attention forward and forward+backward per mode on a causal zigzag-sharded problem,
against single-process attnopt.attention on the full problem (1 thread, same run), and the cost of the
LSE gradient in attnopt.api.attention_backward (the ring's and allgather's per-pair backward: with dlse
over without), at Part A's shape and at D=128 in fp32 and bf16. Medians over repeats, modes interleaved
within each repeat. It then feeds the measured rates into the model (attnopt.distributed.scaling) and
prints predicted vs measured, as a check of the model's structure.

Part B, the model: one Llama-3-8B-like layer (Hq=32, Hkv=8, D=128, bf16, causal, fwd+bwd) for N = 128K to
1M tokens on P = 8 to 64 H100/H200-class devices, 8 per node on NVLink, nodes on NDR InfiniBand; the
assumptions and their sources are printed with the table. Benchmarks are not tests: this machine is
shared and noisy; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnopt as ao
import attnopt.distributed as cp
from attnopt import api
from attnopt.distributed import scaling as S

SOURCES = {
    "tflops": "560 TFLOP/s: FlashAttention-3 on H100 SXM5, head dim 128, 16K tokens: backward 561, forward "
    "616-648 TFLOP/s (FA3 paper figures, arXiv 2407.08608; up to 740 TFLOP/s fp16 in its abstract); the "
    "lower, backward figure is used for both directions, and no loss for the smaller per-step blocks",
    "bwd_factor": "2.5: backward FLOPs = 2.5 x forward, fwd+bwd = 3.5 x (Dao-AILab/flash-attention "
    "benchmarks/benchmark_flash_attention.py, flops())",
    "intra_gbs": "450 GB/s per direction per GPU: NVLink 4, 18 links, 900 GB/s bidirectional (MLCommons "
    "inference v4.1 H200-SXM-141GBx8 system description: '18x 4th Gen NVLink, 900GB/s')",
    "inter_gbs": "50 GB/s per GPU: one 400 Gb/s NDR InfiniBand port (ConnectX-7) per GPU; a ring all-gather "
    "across nodes gets 8 x 50 = 400 GB/s per GPU (cf. multi-node NCCL all_reduce bus bandwidth of 400-450 "
    "GB/s expected for H100 SXM + NDR, saturncloud.io/blog/crusoe-nccl-cluster-validation)",
    "latency_s": "10 us per message or collective step: an assumption, not measured or cited",
    "lse_grad_factor": "the ring's and allgather's pair backward (attnopt.api.attention_backward from the "
    "global out and LSE, with the LSE gradient in padded head-dim columns: two in bf16) over a plain "
    "backward: measured on the CPU span backend, bf16, D=128, N=2048 (~1.07 at commit d4e7f51; "
    "1.04-1.14 when this model was updated; this run's figure is in Part A); attnopt runs each pair in "
    "float32 today, where it costs more (Part A's fp32 figures); alltoall pays none",
}
LSE_SHAPE = {"B": 1, "Hq": 8, "Hkv": 2, "N": 2048, "D": 128}  # the LSE-gradient cost at Part B's D and GQA
WARMUP_N = 512  # one untimed round at this N first: first-call costs (allocator, code paths, gloo pairs)
N_GRID = (2**17, 2**18, 2**19, 2**20)
P_GRID = (8, 16, 32, 64)


# ---------------------------------------------------------------- Part A: processes and timing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, P: int, port: int, plan: dict, results) -> None:
    """One rank: join the gloo group, run the measurements; rank 0 puts its numbers on `results`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P)
    try:
        out = {"comm": _measure_comm(rank, P, plan), "attention": _measure_attention(rank, P, plan)}
        if rank == 0:
            results.put(out)
    finally:
        dist.destroy_process_group()


def _spawn(P: int, plan: dict) -> dict:
    """Run _worker on P fresh processes; returns rank 0's measurements."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.start_processes(_worker, args=(P, _free_port(), plan, results), nprocs=P, start_method="spawn")
    return results.get()  # read after join: the medians are far below a pipe's buffer


def _median_ms(fn, repeats: int, inner: int = 1) -> float:
    """Median over `repeats` of the mean ms of `inner` back-to-back calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(times)


def _synced(fn):
    """fn between two barriers, so rank 0's clock spans the slowest rank."""

    def call():
        dist.barrier()
        fn()
        dist.barrier()

    return call


def _measure_comm(rank: int, P: int, plan: dict) -> dict:
    """Ping-pong between ranks 0 and 1 (one-way time = half a round trip), all_gather, all_to_all_single."""
    out: dict = {"p2p": {}, "all_gather": {}, "all_to_all": {}}
    for nbytes in plan["p2p_bytes"]:
        buf = torch.zeros(nbytes // 4)

        def ping(buf=buf):
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)

        ping()
        inner = 20 if nbytes < 2**20 else 3
        one_way = _median_ms(ping, plan["comm_repeats"], inner) / 2
        out["p2p"][nbytes] = {"one_way_ms": one_way, "gbs": nbytes / one_way / 1e6}
        dist.barrier()
    for nbytes in plan["coll_bytes"]:
        mine = torch.zeros(nbytes // 4)
        gathered = [torch.empty_like(mine) for _ in range(P)]
        recv = torch.empty_like(mine)
        gather = _synced(lambda mine=mine, gathered=gathered: dist.all_gather(gathered, mine))
        a2a = _synced(lambda mine=mine, recv=recv: dist.all_to_all_single(recv, mine))
        gather()
        a2a()
        ms = _median_ms(gather, plan["comm_repeats"])
        out["all_gather"][nbytes] = {"ms": ms, "gbs": (P - 1) * nbytes / ms / 1e6}  # received per rank
        ms = _median_ms(a2a, plan["comm_repeats"])
        out["all_to_all"][nbytes] = {"ms": ms, "gbs": (P - 1) / P * nbytes / ms / 1e6}  # sent per rank
    return out


def _problem(N: int, Hkv: int, plan: dict) -> tuple[torch.Tensor, ...]:
    """The full causal problem (q, k, v, dout): (B, Hq|Hkv, N, D), seeded, the same in every process."""
    g = torch.Generator().manual_seed(N + Hkv)
    return tuple(
        torch.randn(plan["B"], h, N, plan["D"], generator=g) for h in (plan["Hq"], Hkv, Hkv, plan["Hq"])
    )


def _calls(rank: int, P: int, N: int, plan: dict) -> dict:
    """{(mode, "fwd" | "fwd_bwd"): a synced call} on this rank's zigzag shard. Hkv = P: the fewest kv
    heads alltoall can split (Hkv % P == 0)."""
    q, k, v, do = (cp.shard(t, layout="zigzag", rank=rank, world_size=P) for t in _problem(N, P, plan))

    def fwd(mode):
        return lambda: cp.attention(q, k, v, mask=ao.causal(), mode=mode, layout="zigzag")

    def fwd_bwd(mode):
        def run():
            qs, ks, vs = (t.detach().requires_grad_(True) for t in (q, k, v))
            cp.attention(qs, ks, vs, mask=ao.causal(), mode=mode, layout="zigzag").backward(do)

        return run

    return {
        (m, kind): _synced(make(m)) for m in cp.MODES for kind, make in (("fwd", fwd), ("fwd_bwd", fwd_bwd))
    }


def _interleaved(calls: dict, repeats: int) -> dict:
    """Run the calls in turn `repeats` times (load changes hit all of them alike); {key: [ms, ...]}."""
    times: dict = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            times[key].append(_median_ms(call, 1))
    return times


def _measure_attention(rank: int, P: int, plan: dict) -> dict:
    """{N: {(mode, kind): [ms, ...]}} of attnopt.distributed.attention on the causal problem, after one
    untimed round at WARMUP_N."""
    _interleaved(_calls(rank, P, WARMUP_N, plan), 1)
    return {N: _interleaved(_calls(rank, P, N, plan), plan["repeats"]) for N in plan["N"]}


def _backward_calls(q, k, v, do) -> dict:
    """{"bwd" | "bwd_lse": call}: attnopt.api.attention_backward from the rows' (out, lse), without and
    with an LSE gradient (zeros, as the ring's and allgather's _PairsFn pass when the LSE is unused)."""
    out, lse = ao.attention(q, k, v, mask=ao.causal(), return_lse=True)
    dlse = torch.zeros_like(lse)
    return {
        "bwd": lambda: api.attention_backward(q, k, v, out, lse, do, None, mask=ao.causal()),
        "bwd_lse": lambda: api.attention_backward(q, k, v, out, lse, do, dlse, mask=ao.causal()),
    }


def _single_calls(N: int, Hkv: int, plan: dict) -> dict:
    """{"fwd" | "fwd_bwd" | "bwd" | "bwd_lse": call} of attnopt on the whole problem."""
    q, k, v, do = _problem(N, Hkv, plan)

    def fwd_bwd():
        qs, ks, vs = (t.detach().requires_grad_(True) for t in (q, k, v))
        ao.attention(qs, ks, vs, mask=ao.causal()).backward(do)

    calls = {"fwd": lambda: ao.attention(q, k, v, mask=ao.causal()), "fwd_bwd": fwd_bwd}
    return calls | _backward_calls(q, k, v, do)


def lse_ratio(samples: dict) -> list[float]:
    """Per repeat (interleaved): backward with the LSE gradient / without."""
    return [b / a for a, b in zip(samples["bwd"], samples["bwd_lse"], strict=True)]


def _lse_grad_costs(plan: dict) -> dict:
    """{dtype name: {"bwd" | "bwd_lse": [ms, ...]}} at LSE_SHAPE, causal, this process (1 thread)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(1)
        sh = LSE_SHAPE
        q, k, v, do = (
            torch.randn(sh["B"], h, sh["N"], sh["D"], generator=g).to(dtype)
            for h in (sh["Hq"], sh["Hkv"], sh["Hkv"], sh["Hq"])
        )
        calls = _backward_calls(q, k, v, do)
        _interleaved(calls, 1)  # untimed: first-call costs
        out[name] = _interleaved(calls, plan["repeats"])
    return out


def _single_process(Hkv: int, plan: dict) -> dict:
    """{N: {kind: [ms, ...]}} of attnopt.attention in this process (1 thread), after a WARMUP_N round."""
    _interleaved(_single_calls(WARMUP_N, Hkv, plan), 1)
    return {N: _interleaved(_single_calls(N, Hkv, plan), plan["repeats"]) for N in plan["N"]}


# ---------------------------------------------------------------- Part A: the model on this machine


def _here_layer(P: int, plan: dict) -> S.Layer:
    return S.Layer(Hq=plan["Hq"], Hkv=P, D=plan["D"], bytes=4, grad_bytes=4)


def _here_machine(P: int, N: int, comm: dict, single: dict, lse_factor: float, plan: dict) -> S.Machine:
    """The model's machine with this box's measured numbers: the single process's FLOP rate (shared by
    P processes on the cores there are), its backward/forward ratio, the LSE gradient's cost in the
    pairs' backward (fp32, this shape), gloo's ping-pong bandwidth at the largest size and its one-way
    latency at the smallest, all P processes on one "node"."""
    cores = len(os.sched_getaffinity(0))
    rate = S.causal_flops(N, _here_layer(P, plan)) / (single["fwd"] / 1e3) * min(P, cores) / P
    sizes = sorted(comm["p2p"])
    return S.Machine(
        tflops=rate / 1e12,
        bwd_factor=(single["fwd_bwd"] - single["fwd"]) / single["fwd"],
        lse_grad_factor=lse_factor,
        intra_gbs=comm["p2p"][sizes[-1]]["gbs"],
        inter_gbs=comm["p2p"][sizes[-1]]["gbs"],
        gpus_per_node=P,
        latency_s=comm["p2p"][sizes[0]]["one_way_ms"] / 1e3,
    )


def part_a(plan: dict) -> dict:
    """Measure comm and attention on P = plan["P"] processes and the single-process baseline; add the
    model's predictions from the measured rates."""
    torch.set_num_threads(1)
    out: dict = {}  # {P: ...}
    for P in plan["P"]:
        measured = _spawn(P, plan)
        singles = _single_process(P, plan)
        rows = []
        for N in plan["N"]:
            single = {kind: statistics.median(ts) for kind, ts in singles[N].items()}
            lse_factor = statistics.median(lse_ratio(singles[N]))
            machine = _here_machine(P, N, measured["comm"], single, lse_factor, plan)
            for mode in cp.MODES:
                e = S.estimate(mode, N, P, _here_layer(P, plan), machine)
                fwd, fwd_bwd = (measured["attention"][N][(mode, kind)] for kind in ("fwd", "fwd_bwd"))
                rows.append(
                    {
                        "N": N,
                        "mode": mode,
                        "fwd_ms": statistics.median(fwd),
                        "fwd_bwd_ms": statistics.median(fwd_bwd),
                        "samples_ms": {"fwd": fwd, "fwd_bwd": fwd_bwd},
                        "single_fwd_ms": single["fwd"],
                        "single_fwd_bwd_ms": single["fwd_bwd"],
                        "single_samples_ms": singles[N],
                        "model_fwd_ms": e.fwd_s * 1e3,
                        "model_fwd_bwd_ms": e.total_s * 1e3,
                        "single_lse_grad_factor": lse_factor,
                        "model_machine": asdict(machine),
                    }
                )
        out[P] = {"comm": measured["comm"], "attention": rows}
    return {"by_P": out, "lse_grad": _lse_grad_costs(plan)}


# ---------------------------------------------------------------- Part B: the model at scale


def part_b(layer: S.Layer, machine: S.Machine) -> list[dict]:
    """One row per (N, P): each mode's estimate (None where it cannot run) and the winner."""
    rows = []
    for N in N_GRID:
        for P in P_GRID:
            est = {mode: S.estimate(mode, N, P, layer, machine) for mode in S.MODES}
            rows.append({"N": N, "P": P, "estimates": est, "winner": S.winner(est)})
    return rows


# ---------------------------------------------------------------- printing


def _tokens(N: int) -> str:
    return f"{N >> 20}M" if N >= 2**20 else f"{N >> 10}K"


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 2**20 else f"{nbytes >> 10} KiB"


def _spread(samples: list[float]) -> str:
    """max / min of the repeats: how much the machine's load moved them."""
    return f"{max(samples) / min(samples):.2f}"


def print_part_a(part: dict, plan: dict) -> None:
    a = part["by_P"]
    cores = len(os.sched_getaffinity(0))
    print(f"### Part A: measured here (CPU, gloo on localhost, 1 thread per process, {cores} cores)\n")
    print(
        "| P | message | p2p one-way ms | p2p GB/s | all_gather GB/s recv/rank | all_to_all GB/s sent/rank |"
    )
    print("|---|---|---|---|---|---|")
    for P, res in a.items():
        c = res["comm"]
        for nbytes in sorted(set(c["p2p"]) | set(c["all_gather"])):
            p2p = c["p2p"].get(nbytes)
            ag, aa = c["all_gather"].get(nbytes), c["all_to_all"].get(nbytes)
            cells = [f"{p2p['one_way_ms']:.3f}", f"{p2p['gbs']:.2f}"] if p2p else ["", ""]
            cells += [f"{ag['gbs']:.2f}", f"{aa['gbs']:.2f}"] if ag else ["", ""]
            print(f"| {P} | {_size(nbytes)} | " + " | ".join(cells) + " |")
    print(
        f"\nattnopt.distributed.attention, causal, zigzag, B={plan['B']} Hq={plan['Hq']} Hkv=P D={plan['D']} "
        f"fp32; median ms of {plan['repeats']} (modes interleaved; max/min of them in brackets); 'x 1 proc' = time / single-process "
        f"attnopt.attention (1 thread) on the whole problem, ideal {1 / min(2, cores):.2f} with {cores} cores; "
        "model = attnopt.distributed.scaling with this box's measured rates (its lse_grad_factor: the LSE-"
        "gradient cost below, same P and N)\n"
    )
    print(
        "| P | N | mode | fwd ms (max/min) | fwd+bwd ms (max/min) | fwd+bwd x 1 proc | model fwd ms | "
        "model fwd+bwd ms | model / measured fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for P, res in a.items():
        for r in res["attention"]:
            fwd, fwd_bwd = (_spread(r["samples_ms"][kind]) for kind in ("fwd", "fwd_bwd"))
            print(
                f"| {P} | {r['N']} | {r['mode']} | {r['fwd_ms']:.0f} ({fwd}) | {r['fwd_bwd_ms']:.0f} ({fwd_bwd}) | "
                f"{r['fwd_bwd_ms'] / r['single_fwd_bwd_ms']:.2f} | {r['model_fwd_ms']:.0f} | "
                f"{r['model_fwd_bwd_ms']:.0f} | {r['model_fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f} |"
            )
    print(
        "\nsingle process (1 thread), whole problem, median ms (max/min); bwd = attnopt.api.attention_backward "
        "from (out, lse) without / with an LSE gradient (zeros), and their ratio per repeat (median, range):"
    )
    for P, res in a.items():
        for r in res["attention"]:
            if r["mode"] == cp.MODES[0]:
                sm = r["single_samples_ms"]
                spread = {kind: _spread(sm[kind]) for kind in sm}
                med = {kind: statistics.median(sm[kind]) for kind in sm}
                print(
                    f"  Hkv={P} N={r['N']}: fwd {med['fwd']:.0f} ({spread['fwd']}), "
                    f"fwd+bwd {med['fwd_bwd']:.0f} ({spread['fwd_bwd']}), bwd {med['bwd']:.0f} ({spread['bwd']}) / "
                    f"{med['bwd_lse']:.0f} ({spread['bwd_lse']}): x{r['single_lse_grad_factor']:.2f} "
                    f"({_span(lse_ratio(sm))})"
                )
    sh = LSE_SHAPE
    print(
        f"\nLSE-gradient cost at B={sh['B']} Hq={sh['Hq']} Hkv={sh['Hkv']} D={sh['D']} N={sh['N']} causal (1 thread): "
        "attention_backward from (out, lse), median ms (max/min) without / with dlse, ratio per repeat:"
    )
    for name, sm in part["lse_grad"].items():
        ratios = lse_ratio(sm)
        print(
            f"  {name}: {statistics.median(sm['bwd']):.0f} ({_spread(sm['bwd'])}) / "
            f"{statistics.median(sm['bwd_lse']):.0f} ({_spread(sm['bwd_lse'])}): "
            f"x{statistics.median(ratios):.2f} ({_span(ratios)})"
        )
    print("\nfwd+bwd ratios between modes, measured vs model:")
    for P, res in a.items():
        by = {(r["N"], r["mode"]): r for r in res["attention"]}
        for N in plan["N"]:
            cells = []
            for other in ("allgather", "alltoall"):
                ring, o = by[(N, "ring")], by[(N, other)]
                cells.append(
                    f"ring / {other} measured {ring['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}, "
                    f"model {ring['model_fwd_bwd_ms'] / o['model_fwd_bwd_ms']:.2f}"
                )
            print(f"  P={P} N={N}: " + "; ".join(cells))


def _cell(e: S.Estimate | None) -> str:
    return "n/a (Hkv % P != 0)" if e is None else f"{e.total_s * 1e3:.1f} ({e.comm_fraction:.0%})"


def _margin(est: dict) -> float:
    """Next best total time / best, among the modes that run."""
    times = sorted(e.total_s for e in est.values() if e is not None)
    return times[1] / times[0]


def _span(xs: list[float]) -> str:
    lo, hi = f"{min(xs):.2f}", f"{max(xs):.2f}"
    return lo if lo == hi else f"{lo}-{hi}"


def print_part_b(rows: list[dict], layer: S.Layer, machine: S.Machine, alternatives: dict) -> None:
    print(
        f"\n### Part B: model, one layer fwd+bwd, Hq={layer.Hq} Hkv={layer.Hkv} D={layer.D} bf16 causal, "
        f"zigzag, {machine.gpus_per_node} GPUs per node\n"
    )
    print(
        "Predicted ms per layer (share of it waiting on communication). compute: ring and allgather (each "
        "pair's backward from the global out and LSE, no forward rerun, with the LSE gradient at "
        f"lse_grad_factor {machine.lse_grad_factor:g}: {1 + S.pair_bwd_passes(machine):g} forward passes) / "
        f"a plain forward and backward, as alltoall runs ({1 + machine.bwd_factor:g}); grad return: the "
        "float32 dK/dV exchange left after the last compute (ring: its last step; allgather: one "
        "all-to-all); winner (next best / winner).\n"
    )
    print("| N | P | links | compute ms | grad return ms | ring | allgather | alltoall | winner |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        est = r["estimates"]
        links = "NVLink" if machine.gpus_per_node >= r["P"] else "NVLink + IB"
        ring, gather = est["ring"], est["allgather"]
        plain = ring.compute_s * (1 + machine.bwd_factor) / (1 + S.pair_bwd_passes(machine))
        print(
            f"| {_tokens(r['N'])} | {r['P']} | {links} | {ring.compute_s * 1e3:.1f} / {plain * 1e3:.1f} | "
            f"{ring.grad_return_s * 1e3:.1f} / {gather.grad_return_s * 1e3:.1f} | "
            + " | ".join(_cell(est[m]) for m in S.MODES)
            + f" | **{r['winner']}** ({_margin(est):.2f}x) |"
        )
    print("\nAssumptions (sources):")
    for key, text in SOURCES.items():
        print(f"* {key} = {getattr(machine, key)}: {text}")
    print("\n" + where_each_wins(rows, layer, machine, alternatives))


def where_each_wins(rows: list[dict], layer: S.Layer, machine: S.Machine, alternatives: dict) -> str:
    """A short paragraph from the table: the cells each mode wins and by how much, how close ring and
    allgather are, the ring's overlap lengths, allgather's gradient all-to-all and memory, and the
    winners under other LSE-gradient costs (alternatives: {label: lse_grad_factor})."""
    parts = []
    for m in S.MODES:
        mine = [r for r in rows if r["winner"] == m]
        if mine:
            cells = ", ".join(f"{_tokens(r['N'])}/P={r['P']}" for r in mine)
            margins = [_margin(r["estimates"]) for r in mine]
            parts.append(f"{m} wins {len(mine)} of {len(rows)} cells ({cells}) by {_span(margins)}x")
    gaps = [abs(r["estimates"]["ring"].total_s / r["estimates"]["allgather"].total_s - 1) for r in rows]
    over = {
        (link, backward): S.ring_overlap_tokens(layer, machine, gbs, backward)
        for link, gbs in (("nv", machine.intra_gbs), ("ib", machine.inter_gbs))
        for backward in (False, True)
    }
    worst = max(
        rows, key=lambda r: r["estimates"]["allgather"].grad_return_s / r["estimates"]["allgather"].total_s
    )
    gather = worst["estimates"]["allgather"]
    biggest = max(r["N"] for r in rows)
    other = []
    for label, factor in alternatives.items():
        alt = replace(machine, lse_grad_factor=factor)
        wins = {m: 0 for m in S.MODES}
        for r in rows:
            wins[S.winner({m: S.estimate(m, r["N"], r["P"], layer, alt) for m in S.MODES})] += 1
        other.append(f"{label}: " + ", ".join(f"{m} {n}" for m, n in wins.items()))
    return (
        "Where each wins (this model): "
        + "; ".join(parts)
        + f". ring and allgather are within 5% of each other in {sum(g < 0.05 for g in gaps)} of {len(rows)} "
        + "cells. A ring step hides its messages from N/P = "
        + f"{over[('nv', False)]:.0f} tokens per GPU forward and {over[('nv', True)]:.0f} backward (K/V plus "
        + f"float32 dK/dV) on NVLink, {over[('ib', False)]:.0f} / {over[('ib', True)]:.0f} across nodes, where "
        + "every step waits on one InfiniBand port while an all-gather crosses nodes on all "
        + f"{machine.gpus_per_node} ports of a node at once. alltoall runs only for P <= Hkv = {layer.Hkv}. "
        + f"allgather's gradient all-to-all is up to {gather.grad_return_s / gather.total_s:.0%} of its time "
        + f"({_tokens(worst['N'])}, P={worst['P']}), and it keeps the gathered K/V of every shard in the input "
        + f"dtype from forward to backward: {S.allgather_kept_bytes(biggest, layer) / 2**30:.1f} GiB per layer "
        + f"and GPU at N={_tokens(biggest)}, which the time model does not charge. Neither ring nor allgather "
        + "reruns a pair's forward in backward; both pay the LSE gradient's padding "
        + f"(lse_grad_factor {machine.lse_grad_factor:g}), alltoall does not. With other LSE-gradient costs "
        + "the winners would be: "
        + "; ".join(other)
        + "."
    )


def _jsonable(x):
    if isinstance(x, S.Estimate):
        return {**asdict(x), "total_s": x.total_s, "comm_fraction": x.comm_fraction}
    if isinstance(x, dict):
        return {("/".join(k) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Part B and a tiny Part A (2 processes, N=2048)")
    ap.add_argument("--json", metavar="PATH", help="write everything measured and modelled to PATH")
    args = ap.parse_args(argv)
    plan = {"B": 1, "Hq": 8, "D": 64, "repeats": 5, "comm_repeats": 5}
    if args.quick:
        plan |= {"P": (2,), "N": (2048,), "repeats": 3, "p2p_bytes": (4096, 2**20), "coll_bytes": (2**20,)}
    else:
        plan |= {
            "P": (2, 4),
            "N": (4096, 8192),
            "p2p_bytes": (4096, 2**20, 2**24),
            "coll_bytes": (2**20, 2**24),
        }
    start = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()[0]
    print(
        f"cp_scaling {' '.join(sys.argv[1:])} — {start:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, load {load:.2f}\n"
    )
    a = part_a(plan)
    print_part_a(a, plan)
    layer, machine = S.Layer(), S.Machine()
    b = part_b(layer, machine)
    fp32 = statistics.median(lse_ratio(a["lse_grad"]["fp32"]))
    alternatives = {"1.0 (no padding)": 1.0, f"{fp32:.2f} (float32 pairs, measured here)": fp32}
    print_part_b(b, layer, machine, alternatives)
    took = (datetime.datetime.now(datetime.timezone.utc) - start).total_seconds()
    print(f"\n{took:.0f} s; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    if args.json:
        doc = {"start_utc": start.isoformat(), "seconds": took, "plan": plan, "part_a": a}
        doc |= {"part_b": {"layer": asdict(layer), "machine": asdict(machine), "sources": SOURCES, "rows": b}}
        with open(args.json, "w") as f:
            json.dump(_jsonable(doc), f, indent=1)


if __name__ == "__main__":
    main()
