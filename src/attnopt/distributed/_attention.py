"""attnopt.distributed.attention: one sequence sharded across processes, exact, forward and backward.

Every rank passes its shard of q, k and v (the same positions for all three) and the mask, modifiers
and sinks written for the *global* sequence. Three modes:

* ``ring``: P - 1 point-to-point steps; at step t rank r receives, from rank r - t, only the key rows
  its queries can see (the plan), while the previous step computes. Backward fetches them again and
  sends their float32 gradients back to the owner.
* ``allgather``: one all-gather of every shard, then the same pairs as the ring, bitwise the same
  arithmetic (gradients return with one all-to-all).
* ``alltoall`` (DeepSpeed-Ulysses): heads <-> sequence; each rank runs the whole sequence for Hq/P
  query heads (Hkv/P kv heads: GQA sends kv heads, not query heads); needs Hkv % P == 0.

ring / allgather compute each (query segment, key block) pair with attnopt.attention in float32 (float64
for float64 inputs; bf16/fp16 inputs are upcast after they travel) and merge the (out, LSE) partials
in a fixed order — ring step 0, 1, ..., P - 1, i.e. source ranks r, r - 1, ... — never in arrival
order, so results are bitwise reproducible, and rounding happens once, at the end, in the input dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import api
from .. import masks as M
from .. import mods as Mods
from .._inputs import AttentionInputs, acc_dtype, validate
from ..merge import add_sinks, merge
from . import _comm
from ._comm import Gather, Ring, Traffic, agree, fingerprint
from ._layout import LAYOUTS, Layout
from ._local import Piece, head_slice, local_mask, local_mods
from ._plan import Pair, Plan, make_plan

MODES = ("ring", "allgather", "alltoall")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WHAT = "attnopt.distributed.attention"
_TAG = 7100  # point-to-point tags of this module: _TAG + step (K/V), _TAG + P + step (gradients)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: api.MaskArg = None,
    score_mod: api.ModArg = None,
    similarity: str = "dot",
    scale: float | None = None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    group: dist.ProcessGroup | None = None,
    mode: str = "ring",
    layout: str | Layout = "contiguous",
    traffic: dict | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over a sequence sharded across the ranks of `group` (default: the world).

    Args:
        q, k, v: this rank's shard, (B, Hq, L, D), (B, Hkv, L, D), (B, Hkv, L, Dv): the same L positions
            for all three. L may differ between ranks (contiguous layout).
        mask, score_mod, similarity, scale, sinks, return_lse: as attnopt.attention, with positions in
            the *global* sequence (N = sum of L over ranks; positional masks and ALiBi align globally,
            document cu_seqlens are global). Every rank passes the same ones.
        dropout_p: must be 0 (dropout is not supported across ranks yet).
        group: the process group (gloo on CPU, NCCL on GPU).
        mode: "ring" (default), "allgather" or "alltoall" (see the module docstring).
        layout: which positions each rank holds: "contiguous" (rank order, any lengths), "zigzag"
            (2P chunks, rank r holds chunks r and 2P-1-r: balances causal work; attnopt.distributed.shard
            cuts it) or a Layout.
        traffic: a dict to which this rank adds the bytes it sends ("sent_bytes_forward",
            "sent_bytes_backward").

    Returns:
        out (B, Hq, L, Dv) in q's dtype for this rank's queries, or (out, lse (B, Hq, L)).

    Raises, on every rank at once (never a hang): TypeError / ValueError for invalid or inconsistent
    inputs (naming the rank), NotImplementedError for what is not supported.
    """
    amp = api._autocast_dtype(q, k, v)
    if amp is not None:
        kw = dict(mask=mask, score_mod=score_mod, similarity=similarity, scale=scale, sinks=sinks)
        kw |= dict(dropout_p=dropout_p, return_lse=return_lse, group=group, mode=mode, layout=layout)
        with torch.autocast(q.device.type, enabled=False):
            return attention(q.to(amp), k.to(amp), v.to(amp), **kw, traffic=traffic)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{_WHAT}: torch.distributed is not initialized; call torch.distributed.init_process_group "
            f"(e.g. launch with torchrun) first, or use attnopt.attention in a single process"
        )
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:  # not a member: no collective can include this process, so say so right here
        raise ValueError(
            f"{_WHAT}: this process (global rank {dist.get_rank()}) is not a member of group={group!r}; "
            f"only the group's members may call it with that group"
        )
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    # Agreement 1: each rank's own checks and a description of its arguments, before any other traffic.
    error: BaseException | None = None
    meta, desc = [0] * len(_META), ""
    try:
        local = _check_local(
            q, k, v, similarity, scale, sinks, dropout_p, return_lse, mode, layout, score_mod, traffic
        )
        desc = (
            f"mask={_describe(mask)} score_mod={_describe(score_mod)} similarity={similarity} "
            f"scale={local.scale!r} sinks={_describe(sinks)} return_lse={return_lse} layout={_describe(layout)}"
        )
        grad = torch.is_grad_enabled() and any(
            isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, sinks)
        )
        B, Hq, L, D = q.shape
        fields = (B, Hq, k.shape[1], L, D, v.shape[3], _DTYPES.index(q.dtype), MODES.index(mode))
        meta = [*fields, fingerprint(desc), int(grad), int(q.device.type == "cuda")]
    except (TypeError, ValueError, NotImplementedError) as e:
        error = e
    table = agree(group, device, meta, error, _WHAT)
    _check_same(group, table, desc)
    lengths = [row[_META.index("L")] for row in table]
    # Agreement 2: what needs the global picture (layout, global validation, the plan) can fail on one
    # rank only (a mask tensor on another device); every rank learns it, and that their plans match.
    error, row, lay, g, plan = None, [-1] * (2 * P), None, None, None
    try:
        lay = _layout(layout, lengths, P)
        g = _global_inputs(q, k, v, lay.total, mask, score_mod, similarity, scale, sinks, return_lse)
        if mode == "alltoall" and not g.empty and k.shape[1] % P:
            raise NotImplementedError(
                f"{_WHAT}: mode='alltoall' splits heads over the ranks and needs Hkv % P == 0, got "
                f"Hkv={k.shape[1]}, P={P} (Hq={q.shape[1]}); use mode='ring' or 'allgather'"
            )
        if mode != "alltoall" and not g.empty:
            plan = make_plan(lay, g.mask, g.ctx, rank=rank)
            row = [plan.crc(rank, s) for s in range(P)] + [plan.crc(d, rank) for d in range(P)]
    except (TypeError, ValueError, NotImplementedError) as e:
        error = e
    _check_transfers(agree(group, device, row, error, _WHAT))
    assert lay is not None and g is not None
    if g.empty:  # nothing anywhere: this rank's (empty or zero) shard, as attnopt.attention answers it
        out, lse = api._empty_result(local)
        return (out, lse) if return_lse else out
    tr = Traffic(traffic)
    if mode == "alltoall":
        out, lse = _alltoall(q, k, v, g, lay, rank, group, tr)
    else:
        assert plan is not None
        out, lse = _PairsFn.apply(_Runner(plan, rank, group, g, mode, tr), q, k, v)
        if sinks is not None:
            out, lse = add_sinks(out, lse, sinks)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# What agreement 1 exchanges (None: may differ between ranks).
_META = ("B", "Hq", "Hkv", "L", "D", "Dv", "dtype", "mode", "arguments", "requires_grad", "device")


def _check_same(group, table: list[list[int]], desc: str) -> None:
    """Raise on every rank if the ranks disagree on anything but their shard length."""
    for i, name in enumerate(_META):
        values = [row[i] for row in table]
        if name == "L" or len(set(values)) == 1:
            continue
        if name == "arguments":  # say what differs, not two checksums (rare path: one more exchange)
            descs: list = [None] * len(table)
            dist.all_gather_object(descs, desc, group=group)
            values = [f"rank {r}: {d}" for r, d in enumerate(descs)]
        elif name == "dtype":
            values = [str(_DTYPES[x]) for x in values]
        elif name == "mode":
            values = [MODES[x] for x in values]
        raise ValueError(
            f"{_WHAT}: the ranks disagree on {name} (per rank: {values}); every rank must pass shards of one "
            f"problem with the same arguments"
        )


def _check_transfers(table: list[list[int]]) -> None:
    """Every (receiver, sender) transfer must look the same from both ends (else a rank would wait)."""
    P = len(table)
    for d in range(P):
        for s in range(P):
            if table[d][s] != table[s][P + d]:
                raise ValueError(
                    f"{_WHAT}: rank {d} and rank {s} computed different plans for the keys rank {s} sends rank "
                    f"{d}: their masks differ (e.g. a dense mask or bias with other values on one rank); every "
                    f"rank must pass the same mask"
                )


def _describe(x: object) -> str:
    """A rank-independent description of a mask / modifier argument (callables by name, not address)."""
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_describe(y) for y in x) + "]"
    if isinstance(x, Tensor):
        return f"tensor{tuple(x.shape)}:{_checksum(x)}"
    if isinstance(x, M.dense):
        return f"dense{tuple(x.mask.shape)}:{_checksum(x.mask)}"
    if isinstance(x, Mods.bias):
        return f"bias{tuple(x.bias.shape)}:{_checksum(x.bias)}"
    if isinstance(x, (M.And, M.Or)):
        return f"({_describe(x.a)} {'&' if isinstance(x, M.And) else '|'} {_describe(x.b)})"
    if isinstance(x, Layout):
        return f"Layout{x.segments}"
    if x is None or isinstance(x, (M.Mask, Mods.ScoreMod, str, int, float)):
        try:
            return repr(x)
        except Exception:  # e.g. lengths on meta: validation says what is wrong with them
            return f"{type(x).__name__}(?)"
    return getattr(x, "__qualname__", type(x).__name__)


def _checksum(t: Tensor) -> str:
    """A value summary that differs when the values differ in practice (sum and a position-weighted sum)."""
    if t.device.type == "meta" or t.numel() == 0:
        return "-"
    x = t.detach().reshape(-1).to(torch.float64)
    w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device)
    return f"{float(x.sum())!r}/{float((x * w).sum())!r}"


def _check_local(
    q, k, v, similarity, scale, sinks, dropout_p, return_lse, mode, layout, score_mod, traffic
) -> AttentionInputs:
    """This rank's own checks (shapes, dtypes, arguments), before any communication."""
    if traffic is not None and not isinstance(traffic, dict):
        raise TypeError(
            f"{_WHAT}: traffic must be a dict (bytes are added to it) or None, got {type(traffic).__name__}"
        )
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{_WHAT}: mode={mode!r} is unknown; allowed: {MODES}")
    if not (isinstance(layout, Layout) or (isinstance(layout, str) and layout in LAYOUTS)):
        raise ValueError(
            f"{_WHAT}: layout={layout!r} is unknown; allowed: {LAYOUTS} or an attnopt.distributed.Layout"
        )
    inputs = validate(
        q, k, v, similarity=similarity, scale=scale, sinks=sinks, dropout_p=dropout_p, return_lse=return_lse
    )
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"{_WHAT}: q holds {q.shape[2]} positions but k/v hold {k.shape[2]}; each rank passes q, k and v "
            f"for the same positions of one sequence (self-attention shards)"
        )
    if dropout_p:
        raise NotImplementedError(
            f"{_WHAT}: dropout_p={dropout_p} is not supported across ranks (its keep-mask would depend on the "
            f"layout); use dropout_p=0.0"
        )
    mods = score_mod if isinstance(score_mod, (list, tuple)) else [score_mod]
    if torch.is_grad_enabled() and any(
        isinstance(getattr(m, n, None), Tensor) and getattr(m, n).requires_grad
        for m in mods
        for n in ("bias", "slopes")
    ):
        raise NotImplementedError(
            f"{_WHAT}: a bias / alibi tensor that requires grad is not supported across ranks; detach it"
        )
    return inputs


def _layout(layout: str | Layout, lengths: list[int], P: int) -> Layout:
    if layout == "contiguous":
        return Layout.contiguous(lengths)
    lay = Layout.make(layout, sum(lengths), P)
    expect = [lay.local_length(r) for r in range(P)]
    if expect != lengths:
        raise ValueError(
            f"{_WHAT}: layout {lay.name!r} of N={sum(lengths)} positions puts {expect} positions on the ranks, "
            f"but they hold {lengths} (shard with attnopt.distributed.shard(x, layout={lay.name!r}))"
        )
    return lay


def _global_inputs(q, k, v, N, mask, score_mod, similarity, scale, sinks, return_lse) -> AttentionInputs:
    """Validate mask / modifiers / sinks against the global problem (views of no memory stand for it)."""
    B, Hq, _, D = q.shape

    def stand_in(t: Tensor, H: int, d: int) -> Tensor:
        return torch.zeros((), dtype=t.dtype, device=t.device).expand(B, H, N, d)

    return validate(
        stand_in(q, Hq, D),
        stand_in(k, k.shape[1], D),
        stand_in(v, v.shape[1], v.shape[3]),
        mask=mask,
        score_mod=score_mod,
        similarity=similarity,
        scale=scale,
        sinks=sinks,
        return_lse=return_lse,
    )


class _Runner:
    """One call's plan, transport choice and local descriptors (built once, reused by the backward)."""

    def __init__(self, plan: Plan, rank: int, group, g: AttentionInputs, mode: str, traffic: Traffic):
        self.plan, self.rank, self.group, self.g, self.mode, self.traffic = (
            plan,
            rank,
            group,
            g,
            mode,
            traffic,
        )
        self.P = plan.layout.world_size
        self._local: dict[Pair, tuple] = {}

    def steps(self) -> list[int]:
        return self.plan.steps()

    def transport(self, k: Tensor, v: Tensor):
        cls = Ring if self.mode == "ring" else Gather
        return cls(self.plan, self.rank, self.group, k, v, self.traffic, _TAG)

    def _described(self, p: Pair) -> tuple:
        """The global mask and modifiers restated for pair p (built once per call, reused by backward)."""
        if p not in self._local:
            g, n = self.g, p.k1 - p.k0
            at = Piece(p.qa, p.k0, 0, g.ctx)
            m = None if p.full else local_mask(g.mask, at, p.lq, n, g.Hq)
            self._local[p] = {
                "mask": m,
                "score_mod": local_mods(g.mods, at, p.lq, n, g.Hq) or None,
                "similarity": g.similarity,
                "scale": g.scale,
            }
        return self._local[p]

    def call(self, p: Pair, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Partial (out, lse) of queries p against its keys, with the global mask / mods restated."""
        with api.unobserved():
            return api.attention(q, k, v, **self._described(p), return_lse=True)

    def grads(self, p: Pair, q, k, v, out, lse, dout, dlse) -> tuple[Tensor, Tensor, Tensor]:
        """Pair p's share of dq and its keys' dk, dv, from the rows' global (out, lse) and their gradients."""
        return api.attention_backward(q, k, v, out, lse, dout, dlse, **self._described(p))


def _rows(t: Tensor, a: int, n: int) -> Tensor:
    return t[:, :, a : a + n]


def _add_runs(dk: Tensor, dv: Tensor, flat: Tensor, runs, B: int, H: int, D: int, Dv: int) -> None:
    """Add a flat (K rows, V rows) gradient buffer into this rank's dk, dv at the runs' rows."""
    rows = sum(b - a for a, b in runs)
    gk, gv = _comm.unpack(flat, B, H, rows, D, Dv)
    at = 0
    for a, b in runs:
        dk[:, :, a:b] += gk[:, :, at : at + b - a]
        dv[:, :, a:b] += gv[:, :, at : at + b - a]
        at += b - a


def _blocks(run: _Runner, k: Tensor, v: Tensor, phase: str, shards: list | None = None):
    """(transport, yields (t, (k rows, v rows) or None, Transfer or None)) for ring steps t in order.

    The ring posts step t + 1's messages before step t is handed out (communication overlaps compute);
    allgather gathers every shard first (unless given the forward's `shards`) and slices the same rows
    the ring would receive.
    """
    tp = run.transport(k, v)
    steps = run.steps()

    def gen():
        if isinstance(tp, Gather):
            if shards is None:
                tp.gather(phase)
            else:
                tp.shards = shards
            for t in steps:
                yield t, tp.local() if t == 0 else tp.fetch(t), tp.incoming(t)
            return
        pending = tp.start(steps[0], phase) if steps and steps[0] else None
        for i, t in enumerate(steps):
            handle = pending
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            pending = tp.start(nxt, phase) if nxt else None
            yield t, tp.local() if t == 0 else tp.finish(handle), tp.incoming(t)

    return tp, gen()


class _PairsFn(torch.autograd.Function):
    """ring / allgather: forward merges the pairs' partials (out, lse); backward hands each pair the
    global (out, lse) and their gradients (attnopt.api.attention_backward: exact, no forward rerun where
    the backend can start from them) and returns dK/dV to the keys' owners."""

    @staticmethod
    def forward(ctx, run: _Runner, q: Tensor, k: Tensor, v: Tensor):
        acc = acc_dtype(q.dtype)
        B, Hq, L, _ = q.shape
        out = q.new_zeros((B, Hq, L, v.shape[3]), dtype=acc)
        lse = q.new_full((B, Hq, L), float("-inf"), dtype=acc)
        qc = q.detach().to(acc)
        tp, blocks = _blocks(run, k.detach(), v.detach(), "forward")
        with torch.no_grad():
            for _, kv, inc in blocks:
                if kv is None or inc is None:
                    continue
                kb, vb = kv[0].to(acc), kv[1].to(acc)
                for p in inc.pairs:
                    o, part_lse = run.call(p, *_operands(p, qc, kb, vb))
                    sl = slice(p.q_loc, p.q_loc + p.lq)
                    out[:, :, sl], lse[:, :, sl] = merge([out[:, :, sl], o], [lse[:, :, sl], part_lse])
        # allgather holds every shard anyway: keep them, so its backward does not gather again
        ctx.shards = tp.shards if isinstance(tp, Gather) and any(ctx.needs_input_grad[1:4]) else None
        ctx.run = run
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable  # the gradient itself is not differentiable (a second derivative raises)
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        run: _Runner = ctx.run
        q, k, v, out, lse = ctx.saved_tensors
        acc = out.dtype
        B, _, L, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        dout = torch.zeros_like(out) if dout is None else dout.to(acc)
        dlse = None if dlse is None else dlse.to(acc)  # None: no LSE gradient to carry (cheaper)
        qc = q.detach().to(acc)
        dq = torch.zeros_like(qc)
        dk = torch.zeros((B, Hkv, L, D), dtype=acc, device=q.device)
        dv = torch.zeros((B, Hkv, L, Dv), dtype=acc, device=q.device)
        tp, blocks = _blocks(run, k.detach(), v.detach(), "backward", ctx.shards)
        ctx.shards = None
        held: dict[int, Tensor] = {}  # allgather: every step's gradients, returned in one all-to-all
        in_flight = None  # ring: the previous step's gradient messages

        def owned(t: int, flat: Tensor | None) -> None:  # gradients of this rank's rows, step order
            tr = tp.outgoing(t) if t else tp.incoming(0)
            if flat is not None and tr is not None:
                _add_runs(dk, dv, flat, tr.runs, B, Hkv, D, Dv)

        for t, kv, inc in blocks:
            flat = None
            if kv is not None and inc is not None:
                kb, vb = kv[0].to(acc), kv[1].to(acc)
                gk, gv = torch.zeros_like(kb), torch.zeros_like(vb)
                for p in inc.pairs:
                    n, sl = p.k1 - p.k0, slice(p.q_loc, p.q_loc + p.lq)
                    a, b, c = run.grads(
                        p,
                        *_operands(p, qc, kb, vb),
                        out[:, :, sl],
                        lse[:, :, sl],
                        dout[:, :, sl],
                        None if dlse is None else dlse[:, :, sl],
                    )
                    dq[:, :, sl] += a
                    gk[:, :, p.buf0 : p.buf0 + n] += b
                    gv[:, :, p.buf0 : p.buf0 + n] += c
                flat = torch.cat([gk.reshape(-1), gv.reshape(-1)])
            if t == 0:
                owned(0, flat)
            elif isinstance(tp, Ring):  # send this step's gradients now; add the previous step's
                current = tp.exchange_grad(t, flat)
                if in_flight is not None:
                    owned(*tp.finish_grad(in_flight))
                in_flight = current
            elif flat is not None:
                held[t] = flat
        if in_flight is not None:
            owned(*tp.finish_grad(in_flight))
        if isinstance(tp, Gather):
            back = tp.return_grads(held)
            for t in sorted(back):  # from ranks r + 1, r + 2, ...: the ring's order
                owned(t, back[t])
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _operands(p: Pair, qc: Tensor, kb: Tensor, vb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = p.k1 - p.k0
    return _rows(qc, p.q_loc, p.lq), _rows(kb, p.buf0, n), _rows(vb, p.buf0, n)


def _alltoall(
    q, k, v, g: AttentionInputs, lay: Layout, rank: int, group, tr: Traffic
) -> tuple[Tensor, Tensor | None]:
    """DeepSpeed-Ulysses: heads <-> sequence, one local attention over the whole sequence, and back."""
    P = lay.world_size
    B, Hq, L, _ = q.shape
    hq, hk = Hq // P, k.shape[1] // P  # Hkv % P == 0 was agreed before
    lengths = [lay.local_length(r) for r in range(P)]
    order = lay.order(q.device)  # global position of each row in rank order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=q.device)

    def to_heads(x: Tensor, h: int) -> Tensor:
        """(B, h*P, L_r, d) shards -> (B, h, N, d) in global order for this rank's head chunk."""
        d = x.shape[-1]
        send = torch.cat([x[:, c * h : (c + 1) * h].reshape(-1) for c in range(P)])
        sizes_out = [B * h * n * d for n in lengths]
        recv = _comm.AllToAll.apply(send, sizes_out, [send.numel() // P] * P, group, tr, rank)
        pieces = [c.view(B, h, n, d) for c, n in zip(recv.split(sizes_out), lengths)]
        return torch.cat(pieces, dim=2).index_select(2, inverse)

    def to_sequence(y: Tensor) -> Tensor:
        """(B, hq, N, ...) for this rank's heads -> (B, Hq, L_r, ...) for this rank's rows."""
        tail = y.shape[3:]
        per = int(torch.Size(tail).numel())
        y = y.index_select(2, order)
        send = torch.cat([c.reshape(-1) for c in y.split(lengths, dim=2)])
        sizes_in = [B * hq * n * per for n in lengths]
        recv = _comm.AllToAll.apply(send, [B * hq * L * per] * P, sizes_in, group, tr, rank)
        # P chunks of (B, hq, L, ...) from head chunks 0..P-1 (a view: right for L = 0 too)
        return recv.view(P, B, hq, L, *tail).transpose(0, 1).reshape(B, P * hq, L, *tail)

    qh, kh, vh = to_heads(q, hq), to_heads(k, hk), to_heads(v, hk)
    at = Piece(0, 0, rank * hq, g.ctx)
    N = lay.total
    with api.unobserved():
        o, lse = api.attention(
            qh,
            kh,
            vh,
            mask=local_mask(g.mask, at, N, N, hq),
            score_mod=local_mods(g.mods, at, N, N, hq) or None,
            similarity=g.similarity,
            scale=g.scale,
            sinks=head_slice(g.sinks, rank * hq, hq),
            return_lse=True,
        )
    out = to_sequence(o)
    lse_out = to_sequence(lse.unsqueeze(-1)).squeeze(-1) if g.return_lse else None
    return out, lse_out


__all__ = ["MODES", "attention"]
