"""The peers: attnopt, torch SDPA, compiled FlexAttention and eager PyTorch, each set up for one Case.

``PEERS[name](case, budget_bytes)`` returns a ``Prepared`` (a zero-argument call that runs one forward,
or forward + backward, plus notes) or raises ``NotApplicable(reason)``. Precomputed per-shape tensors
(dense masks, biases, block masks) are built in setup, outside the timed call; their bytes are reported
with the call's peak memory.

``attnopt-flex`` is attnopt pinned to its compiled FlexAttention backend (``backend="flex"``), warmed by
``attnopt.compile_for`` in setup. On CUDA every peer's call ends with ``torch.cuda.synchronize()`` (the
timers are host clocks), the ``attnopt`` peer warms the flex kernel with ``compile_for`` first (so
``backend="auto"`` may pick it), and ``cuda_peak_mib`` notes the device memory one call adds.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import attnopt
from attnopt import mods
from attnopt.masks import MaskContext, tile_indices

from .presets import Case

GiB = 1 << 30
MiB = 1 << 20


class NotApplicable(Exception):
    """This peer cannot run this case; str(exc) says why."""


@dataclass
class Prepared:
    call: Callable[[], None]  # what is timed: one forward, or forward + backward
    fwd: Callable[[], Tensor]  # one forward, returning the output (to check it against attnopt's)
    aux_bytes: int = 0  # tensors precomputed once per shape (dense mask, bias, block mask)
    notes: dict = field(default_factory=dict)  # e.g. {"backend": "sdpa"}, {"compile_s": 4.1}


def _prepared(case: Case, fwd: Callable[[], Tensor], **kw) -> Prepared:
    """Time one forward, or forward + backward (grads cleared first so they never accumulate)."""
    if case.mode == "fwd":

        def call() -> None:
            fwd()

        return Prepared(call, fwd, **kw)
    leaves, gout = case.leaves(), case.grad_out

    def call_bwd() -> None:
        for t in leaves:
            t.grad = None
        fwd().backward(gout)

    return Prepared(call_bwd, fwd, **kw)


def _ctx(case: Case) -> MaskContext:
    return MaskContext(case.B, case.Hq, case.Sq, case.Sk, case.q.device)


def _sync(case: Case) -> None:
    if case.q.device.type == "cuda":
        torch.cuda.synchronize(case.q.device)


def _dense_mask(case: Case) -> Tensor | None:
    """The variant's mask as a bool tensor broadcastable to (B, Hq, Sq, Sk) (True = keep), or None."""
    var = case.variant
    if var.mask is None or var.keeps_all:
        return None
    return var.mask.tile(0, case.Sq, 0, case.Sk, _ctx(case))


def _additive_mods(case: Case, what: str) -> list[mods.ScoreMod]:
    extra = [m for m in case.variant.mods if not isinstance(m, (mods.alibi, mods.bias))]
    if extra:
        raise NotApplicable(
            f"{what} adds at most a float bias; {extra[0]!r} is a nonlinear function of the scores"
        )
    return list(case.variant.mods)


def _bias(case: Case, additive: list[mods.ScoreMod], keep: Tensor | None) -> Tensor:
    """The additive modifiers as one float (1|B, Hq, Sq, Sk) tensor in q's dtype, -inf where masked."""
    ctx = _ctx(case)
    b, h, i, j = tile_indices(ctx, 0, case.Sq, 0, case.Sk)
    bias = torch.zeros((), dtype=torch.float32)
    for m in additive:
        bias = m(bias, b, h, i, j, ctx)
    if keep is not None:
        bias = bias.masked_fill(~keep, float("-inf"))
    return bias.to(case.dtype)


def _nbytes(*ts: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _check_budget(what: str, need: int, budget: int) -> None:
    if need > budget:
        raise NotApplicable(
            f"memory: {what} needs ~{need / GiB:.1f} GiB of N×N tensors > budget {budget / GiB:.0f} GiB"
        )


@contextlib.contextmanager
def _uncapped() -> Iterator[None]:
    """Lift the runner's address-space cap (measure.memory_guard) while compiling: inductor's compile
    workers are new processes that must not inherit it. The cap is put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _chosen(case: Case, kw: dict) -> str:
    try:
        inputs = attnopt.api.validate(case.q, case.k, case.v, **kw, backends=list(attnopt._dispatch.BACKENDS))
        return attnopt._dispatch.select(inputs).name
    except Exception as e:  # a private helper changed shape: still time the public call
        return f"? ({type(e).__name__})"


def _compile_flex(case: Case, kw: dict) -> dict:
    """attnopt.compile_for on this case (with gradients when the case runs backward), timed; also times
    attnopt's analytic block metadata for the mask (attnopt.blockmask.lower), which every call builds."""
    from attnopt.blockmask import lower

    t0 = time.perf_counter()
    if case.variant.mask is not None:
        lower(case.variant.mask, _ctx(case), for_kernel=True)
        _sync(case)
    block_mask_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with _uncapped():
        attnopt.compile_for(case.q, case.k, case.v, **kw)
    _sync(case)
    return {"first_call_s": time.perf_counter() - t0, "block_mask_s": round(block_mask_s, 4)}


def attnopt_peer(case: Case, budget: int) -> Prepared:
    """attnopt.attention(backend="auto"); notes the backend auto picks. On CUDA, attnopt.compile_for
    warms the flex kernel first (auto never compiles on the call path)."""
    q, k, v, kw = case.q, case.k, case.v, case.attnopt_kwargs()
    notes: dict = {}
    if q.device.type == "cuda":
        try:
            notes = _compile_flex(case, kw)
        except Exception as e:  # flex cannot run these inputs: auto runs without it
            notes = {"flex": f"not warmed: {_first_line(e)}"}
    notes["backend"] = _chosen(case, kw)
    return _prepared(case, lambda: attnopt.attention(q, k, v, **kw, backend="auto"), notes=notes)


def attnopt_flex_peer(case: Case, budget: int) -> Prepared:
    """attnopt.attention(backend="flex"): compiled FlexAttention on attnopt's analytic block metadata,
    compiled in setup by attnopt.compile_for (compile and metadata time noted apart)."""
    q, k, v, kw = case.q, case.k, case.v, case.attnopt_kwargs()
    try:
        inputs = attnopt.api.validate(q, k, v, **kw, backends=list(attnopt._dispatch.BACKENDS))
        why = attnopt._dispatch.BACKENDS["flex"].not_supported_reasons(inputs)
    except Exception as e:
        why = [_first_line(e)]
    if why:
        raise NotApplicable("attnopt's flex backend declines: " + "; ".join(why))
    try:
        notes = _compile_flex(case, kw)
    except Exception as e:  # compile or lowering failed on this machine
        raise NotApplicable(_first_line(e)) from e
    if q.device.type == "cpu" and case.mode == "fwdbwd":
        notes["how"] = "CPU: Flex kernel forward, gradients by attnopt's exact rerun"
    notes["backend"] = "flex"
    return _prepared(case, lambda: attnopt.attention(q, k, v, **kw, backend="flex"), notes=notes)


def sdpa_peer(case: Case, budget: int) -> Prepared:
    """F.scaled_dot_product_attention: is_causal / enable_gqa where they fit, else a dense mask or bias."""
    if case.sinks is not None:
        raise NotApplicable("SDPA has no sink logits and returns no LSE to fold them in")
    additive = _additive_mods(case, "SDPA")
    q, k, v, var = case.q, case.k, case.v, case.variant
    kw: dict = {"scale": case.scale}
    if case.Hq != case.Hkv:
        kw["enable_gqa"] = True
    attn_mask, how = None, "no mask" if var.mask is None or var.keeps_all else ""
    if var.is_causal and not additive:
        kw["is_causal"], how = True, "is_causal=True"
    elif additive:
        n = case.B * case.Hq * case.Sq * case.Sk  # (B, Hq, Sq, Sk) float bias + its float32 build
        _check_budget("SDPA's float bias", n * (case.q.element_size() + 8), budget)
        attn_mask, how = _bias(case, additive, _dense_mask(case)), "dense float bias"
    elif not how:
        n = case.Sq * case.Sk  # bool mask + the float copy SDPA's CPU kernel converts it to
        _check_budget("SDPA's dense mask", n * (1 + 2 * case.q.element_size()), budget)
        attn_mask, how = _dense_mask(case), "dense bool mask"

    def fwd() -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)

    return _prepared(case, fwd, aux_bytes=_nbytes(attn_mask), notes={"how": how})


def eager_peer(case: Case, budget: int) -> Prepared:
    """Plain softmax(q @ kᵀ · scale + mods, masked) @ v in the input dtype, K/V repeated for GQA."""
    var, q, k, v = case.variant, case.q, case.k, case.v
    caps = [m.cap for m in var.mods if isinstance(m, mods.softcap)]
    additive = [m for m in var.mods if not isinstance(m, mods.softcap)]
    order = [isinstance(m, mods.softcap) for m in var.mods]
    if order != sorted(order):
        raise NotApplicable(f"the eager peer applies additive mods first, then softcaps; got {var.mods!r}")
    for m in additive:
        if not isinstance(m, (mods.alibi, mods.bias)):
            raise NotApplicable(f"the eager peer has no rule for {m!r}")
    n = case.B * case.Hq * case.Sq * case.Sk
    live = (3 + len(var.mods)) * (2 if case.mode == "fwdbwd" else 1)  # scores, masked, softmax, mods
    _check_budget("eager", n * case.q.element_size() * live + n * (4 if additive else 0), budget)
    keep = _dense_mask(case)
    bias = _bias(case, additive, None) if additive else None
    drop = None if keep is None else ~keep
    G = case.Hq // case.Hkv

    def fwd() -> Tensor:
        kk = k if G == 1 else k.repeat_interleave(G, dim=1)  # (B, Hq, Sk, D)
        vv = v if G == 1 else v.repeat_interleave(G, dim=1)
        s = (q @ kk.transpose(-2, -1)) * case.scale  # (B, Hq, Sq, Sk)
        if bias is not None:
            s = s + bias
        for cap in caps:
            s = cap * torch.tanh(s / cap)
        if drop is not None:
            s = s.masked_fill(drop, float("-inf"))
        if case.sinks is not None:  # softmax over [scores, sink], sink column dropped
            sink = case.sinks.to(s.dtype).view(1, -1, 1, 1).expand(case.B, case.Hq, case.Sq, 1)
            return torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1] @ vv
        return torch.softmax(s, dim=-1) @ vv

    return _prepared(case, fwd, aux_bytes=_nbytes(bias, drop))


def _first_line(e: BaseException) -> str:
    msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {msg}"[:200]


def flex_peer(case: Case, budget: int) -> Prepared:
    """torch.compile(flex_attention) with create_block_mask; compile and block-mask time noted apart."""
    if case.mode == "fwdbwd" and case.q.device.type == "cpu":
        raise NotApplicable("FlexAttention has no backward on CPU (torch raises NotImplementedError)")
    var, q, k, v = case.variant, case.q, case.k, case.v
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise NotApplicable(_first_line(e)) from e

    # A code object of its own per case (not torch._dynamo.reset(), which would also drop attnopt's warm
    # flex kernels): the compile time is honest, and the recompile limit (after which dynamo silently
    # runs flex's unfused O(N²) path) is never reached.
    def flex_fn(*args, **kwargs):
        return flex_attention(*args, **kwargs)

    flex_fn.__code__ = flex_fn.__code__.replace()
    try:
        t0 = time.perf_counter()
        bm = None
        if var.mask_mod is not None and not var.keeps_all:
            bm = create_block_mask(var.mask_mod, None, None, case.Sq, case.Sk, device=q.device)
            _sync(case)
        block_mask_s = time.perf_counter() - t0
        compiled = torch.compile(flex_fn, dynamic=False)
        kw = {
            "block_mask": bm,
            "score_mod": var.score_mod,
            "scale": case.scale,
            "enable_gqa": case.Hq != case.Hkv,
        }
        sinks = case.sinks

        def fwd() -> Tensor:
            if sinks is None:
                return compiled(q, k, v, **kw)
            out, lse = compiled(q, k, v, return_lse=True, **kw)  # sinks: out · sigmoid(lse - sink)
            return out * torch.sigmoid(lse - sinks.view(1, -1, 1)).unsqueeze(-1).to(out.dtype)

        t0 = time.perf_counter()
        fwd()  # compiles
        _sync(case)
        first_call_s = time.perf_counter() - t0
    except Exception as e:  # compile or lowering failed on this machine
        why = "sinks need flex's LSE (out · sigmoid(lse - sink)): " if case.sinks is not None else ""
        raise NotApplicable(why + _first_line(e)) from e
    aux = 0 if bm is None else _nbytes(*(t for t in vars(bm).values() if isinstance(t, Tensor)))
    notes = {"first_call_s": first_call_s, "block_mask_s": round(block_mask_s, 3)}
    return _prepared(case, fwd, aux_bytes=aux, notes=notes)


def _on_device(peer: Callable[[Case, int], Prepared]) -> Callable[[Case, int], Prepared]:
    """On CUDA: the timed call waits for the device (host timers), and one call's device memory is noted.
    On the CPU the peer is returned as it is."""

    def setup(case: Case, budget: int) -> Prepared:
        prep = peer(case, budget)
        if case.q.device.type != "cuda":
            return prep
        run, dev = prep.call, case.q.device

        def call() -> None:
            run()
            torch.cuda.synchronize(dev)

        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        call()
        prep.notes["cuda_peak_mib"] = round((torch.cuda.max_memory_allocated(dev) - base) / MiB, 1)
        prep.call = call
        return prep

    setup.__doc__ = peer.__doc__
    return setup


PEERS: dict[str, Callable[[Case, int], Prepared]] = {
    name: _on_device(fn)
    for name, fn in {
        "attnopt": attnopt_peer,
        "sdpa": sdpa_peer,
        "flex": flex_peer,
        "eager": eager_peer,
        "attnopt-flex": attnopt_flex_peer,
    }.items()
}
