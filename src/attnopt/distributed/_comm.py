"""How key/value rows travel between ranks: point-to-point ring steps or one all-gather.

Both transports hand the compute loop the same buffer for the same (destination, source) pair, the
rows the plan names and nothing else, so ring and allgather run bitwise the same arithmetic. Gradients
of those rows go back to their owner the same way they came (ring: point-to-point, allgather: one
all-to-all), in float32 (float64 for float64 inputs), and the owner adds them up in a fixed order.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ._plan import Plan, Transfer


def global_rank(group, r: int) -> int:
    return r if group is None or group is dist.GroupMember.WORLD else dist.get_global_rank(group, r)


def fingerprint(text: str) -> int:
    return zlib.crc32(text.encode())


class RankError(ValueError):
    """Another rank rejected its inputs (every rank stops, none waits forever)."""


def agree(
    group, device: torch.device, meta: Sequence[int], error: BaseException | None, what: str
) -> list[list[int]]:
    """All-gather each rank's metadata and error flag; if any rank failed, raise on every rank."""
    P = dist.get_world_size(group)
    mine = torch.tensor([1 if error is not None else 0, *meta], dtype=torch.long, device=device)
    rows = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(rows, mine, group=group)
    table = [r.tolist() for r in rows]
    if any(row[0] for row in table):
        msgs: list[str | None] = [None] * P
        dist.all_gather_object(
            msgs, None if error is None else f"{type(error).__name__}: {error}", group=group
        )
        if error is not None:
            raise error
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        raise RankError(
            f"{what}: rank {bad[0][0]} rejected its inputs, so every rank stops here: {bad[0][1]}"
        )
    return [row[1:] for row in table]


def unpack(flat: Tensor, B: int, H: int, rows: int, D: int, Dv: int) -> tuple[Tensor, Tensor]:
    nk = B * H * rows * D
    return flat[:nk].view(B, H, rows, D), flat[nk:].view(B, H, rows, Dv)


def pack_runs(k: Tensor, v: Tensor, runs: Sequence[tuple[int, int]]) -> Tensor:
    """The rows [a, b) of k (B, H, S, D) and v (B, H, S, Dv) for each run, as one flat buffer: the k rows
    of every run first, then the v rows (keys stay in row order)."""
    kk = torch.cat([k[:, :, a:b] for a, b in runs], dim=2)
    vv = torch.cat([v[:, :, a:b] for a, b in runs], dim=2)
    return torch.cat([kk.reshape(-1), vv.reshape(-1)])


class Traffic:
    """Bytes this rank sends (forward and backward), for the traffic goals; optional user dict."""

    def __init__(self, sink: dict | None):
        self.sink = sink

    def add(self, key: str, n: int) -> None:
        if self.sink is not None:
            self.sink[key] = self.sink.get(key, 0) + n


class Transport:
    """Moves the plan's rows. fetch(t) -> (k, v) rows from rank (r - t) % P for this rank."""

    def __init__(self, plan: Plan, rank: int, group, k: Tensor, v: Tensor, traffic: Traffic, tag: int):
        self.plan, self.rank, self.group = plan, rank, group
        self.P = plan.layout.world_size
        self.k, self.v = k, v
        self.B, self.H, _, self.D = k.shape
        self.Dv = v.shape[-1]
        self.traffic = traffic
        self.tag = tag

    def src(self, t: int) -> int:
        return (self.rank - t) % self.P

    def dst(self, t: int) -> int:
        return (self.rank + t) % self.P

    def incoming(self, t: int) -> Transfer | None:
        return self.plan.get(self.rank, self.src(t))

    def outgoing(self, t: int) -> Transfer | None:
        return self.plan.get(self.dst(t), self.rank)

    def kv_numel(self, rows: int) -> int:
        return self.B * self.H * rows * (self.D + self.Dv)

    def rows_of(self, k: Tensor, v: Tensor, tr: Transfer | None) -> tuple[Tensor, Tensor] | None:
        """The (k, v) rows transfer `tr` names, as the buffer a receiver sees (None: no transfer)."""
        if tr is None:
            return None
        return unpack(pack_runs(k, v, tr.runs), self.B, self.H, tr.rows, self.D, self.Dv)

    def local(self) -> tuple[Tensor, Tensor] | None:
        return self.rows_of(self.k, self.v, self.plan.get(self.rank, self.rank))


class Ring(Transport):
    """Step t: rank r sends rank r + t the rows it needs and receives from rank r - t, point to point.
    The next step's messages are posted before this step computes (communication overlaps compute).
    Each step's sends and receives go out as one batch (dist.batch_isend_irecv): on NCCL, separate
    send/recv calls between two ranks that both send first can deadlock (P = 2: r + 1 == r - 1)."""

    def _post(self, ops: list, tag: int) -> list:
        """ops: (send?, tensor, group rank); returns the works (empty if nothing to do)."""
        if not ops:
            return []
        p2p = [
            dist.P2POp(dist.isend if send else dist.irecv, t, global_rank(self.group, peer), self.group, tag)
            for send, t, peer in ops
        ]
        return dist.batch_isend_irecv(p2p)

    def start(self, t: int, phase: str):
        ops, buf, payload = [], None, None
        out, inc = self.outgoing(t), self.incoming(t)
        if inc is not None:
            buf = torch.empty(self.kv_numel(inc.rows), dtype=self.k.dtype, device=self.k.device)
            ops.append((False, buf, self.src(t)))
        if out is not None:
            payload = pack_runs(self.k, self.v, out.runs)
            ops.append((True, payload, self.dst(t)))
            self.traffic.add(f"sent_bytes_{phase}", payload.numel() * payload.element_size())
        return self._post(ops, self.tag + t), buf, inc, payload  # payload: alive until the send completed

    def finish(self, handle) -> tuple[Tensor, Tensor] | None:
        works, buf, inc, _ = handle
        for w in works:
            w.wait()
        if buf is None:
            return None
        return unpack(buf, self.B, self.H, inc.rows, self.D, self.Dv)

    def exchange_grad(self, t: int, grad: Tensor | None):
        """Post step t's gradient messages: `grad` (flat rows of rank r - t, float32 / float64) back to
        its owner, and a receive for the gradient rank r + t computed for this rank's rows."""
        ops, got = [], None
        out = self.outgoing(t)
        if out is not None:
            acc = torch.float64 if self.k.dtype == torch.float64 else torch.float32
            got = torch.empty(self.kv_numel(out.rows), dtype=acc, device=self.k.device)
            ops.append((False, got, self.dst(t)))
        if grad is not None:
            ops.append((True, grad, self.src(t)))
            self.traffic.add("sent_bytes_backward", grad.numel() * grad.element_size())
        return t, self._post(ops, self.tag + self.P + t), got, grad

    @staticmethod
    def finish_grad(handle) -> tuple[int, Tensor | None]:
        t, works, got, _ = handle  # the sent gradient stays referenced until its send completed
        for w in works:
            w.wait()
        return t, got


class Gather(Transport):
    """One all-gather of every rank's whole K/V shard (padded to the longest); fetch(t) then slices
    the rows the plan names from rank r - t's shard, exactly the buffer the ring would receive."""

    def gather(self, phase: str) -> None:
        lengths = [self.plan.layout.local_length(r) for r in range(self.P)]
        width = max(lengths)
        mine = pack_runs(self.k, self.v, [(0, lengths[self.rank])])
        flat = torch.zeros(self.kv_numel(width), dtype=self.k.dtype, device=self.k.device)
        flat[: mine.numel()] = mine
        bufs = [torch.empty_like(flat) for _ in range(self.P)]
        dist.all_gather(bufs, flat, group=self.group)
        self.traffic.add(f"sent_bytes_{phase}", (self.P - 1) * mine.numel() * mine.element_size())
        self.shards = [
            unpack(b[: self.kv_numel(n)], self.B, self.H, n, self.D, self.Dv) for b, n in zip(bufs, lengths)
        ]

    def fetch(self, t: int) -> tuple[Tensor, Tensor] | None:
        return self.rows_of(*self.shards[self.src(t)], self.incoming(t))

    def return_grads(self, grads: dict[int, Tensor]) -> dict[int, Tensor]:
        """One all-to-all: grads[t] goes to rank r - t; returns {t: gradient from rank r + t}."""
        acc = torch.float64 if self.k.dtype == torch.float64 else torch.float32
        send, send_sizes, recv_sizes = [], [], []
        for peer in range(self.P):
            t_out = (self.rank - peer) % self.P  # peer = r - t_out
            g = grads.get(t_out) if peer != self.rank else None
            send.append(g if g is not None else torch.zeros(0, dtype=acc, device=self.k.device))
            send_sizes.append(send[-1].numel())
            t_in = (peer - self.rank) % self.P  # peer = r + t_in
            out = self.outgoing(t_in) if peer != self.rank else None
            recv_sizes.append(0 if out is None else self.kv_numel(out.rows))
        flat_in = torch.cat(send)
        flat_out = torch.empty(sum(recv_sizes), dtype=acc, device=self.k.device)
        dist.all_to_all_single(flat_out, flat_in, recv_sizes, send_sizes, group=self.group)
        self.traffic.add("sent_bytes_backward", flat_in.numel() * flat_in.element_size())
        got, at = {}, 0
        for peer, n in enumerate(recv_sizes):
            if n:
                got[(peer - self.rank) % self.P] = flat_out[at : at + n]
            at += n
        return got


class AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with split sizes on a flat tensor; its gradient travels the other way.
    Bytes sent to other ranks are counted in `traffic` (forward and backward)."""

    @staticmethod
    def forward(
        ctx, x: Tensor, out_sizes: list[int], in_sizes: list[int], group, traffic: Traffic, rank: int
    ):
        ctx.sizes, ctx.group, ctx.traffic, ctx.rank = (out_sizes, in_sizes), group, traffic, rank
        out = x.new_empty(sum(out_sizes))
        dist.all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)
        traffic.add("sent_bytes_forward", (sum(in_sizes) - in_sizes[rank]) * x.element_size())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_sizes, in_sizes = ctx.sizes
        back = grad.new_empty(sum(in_sizes))
        dist.all_to_all_single(back, grad.contiguous(), in_sizes, out_sizes, group=ctx.group)
        ctx.traffic.add("sent_bytes_backward", (sum(out_sizes) - out_sizes[ctx.rank]) * grad.element_size())
        return back, None, None, None, None, None


class AllGather(torch.autograd.Function):
    """dist.all_gather of equal-shaped tensors -> (P, *shape); the gradient of this rank's tensor is
    the sum, in rank order, of every rank's gradient for it (one all-to-all)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        P = dist.get_world_size(group)
        out = [torch.empty_like(x) for _ in range(P)]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        P = grad.shape[0]
        flat = grad.contiguous().reshape(-1)
        back = torch.empty_like(flat)
        n = flat.numel() // P
        dist.all_to_all_single(back, flat, [n] * P, [n] * P, group=ctx.group)
        parts = back.view(P, *grad.shape[1:])
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total, None
