"""attention(), explain(), available_backends(): validate -> dispatch -> run."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _dispatch, _op
from ._inputs import AttentionInputs, acc_dtype, validate
from .masks import Mask
from .mods import ScoreMod

# The decode hot path: calls with no mask, modifier or sinks (one per layer per generated token) skip
# validate() + select() when an identical call signature (shapes, dtypes, devices and every scalar
# argument) was validated before; never with gradients, where the data decides (huge scores). Both
# depend on nothing else for such calls (and on the thread count, which splitkv's automatic split
# reads), so the answer is the same; this cuts ~20 us of the ~45 us Python cost per call (measured on
# the 2-core CPU machine).
_PLAIN: dict[tuple, tuple[Any, float]] = {}
_PLAIN_MAX = 256

# Observers of every attention call (attnopt.maps.record): each gets the validated inputs and the LSE
# after the call ran. Empty in normal use, so the hot path pays one list test.
_OBSERVERS: list[Callable[[AttentionInputs, Tensor], None]] = []
_observing = [False]


def _plain_key(
    q, k, v, mask, score_mod, sinks, similarity, scale, dropout_p, return_lse, backend, num_splits
) -> tuple | None:
    if mask is not None or score_mod is not None or sinks is not None:
        return None
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad:  # with gradients the choice depends on the data (huge scores): decide each call
        return None
    try:
        key = (
            q.shape,
            k.shape,
            v.shape,
            q.dtype,
            k.dtype,
            v.dtype,
            q.device,
            k.device,
            v.device,
            grad,
            similarity,
            type(scale),
            scale,
            type(dropout_p),
            dropout_p,
            return_lse,
            backend,
            type(num_splits),
            num_splits,
            torch.get_num_threads(),
        )
        hash(key)
    except TypeError:  # an unhashable argument: let validate() say what is wrong with it
        return None
    return key


def _validate(
    q, k, v, mask, score_mod, similarity, scale, sinks, dropout_p, return_lse, backend, num_splits
) -> AttentionInputs:
    return validate(
        q,
        k,
        v,
        mask=mask,
        score_mod=score_mod,
        similarity=similarity,
        scale=scale,
        sinks=sinks,
        dropout_p=dropout_p,
        return_lse=return_lse,
        backend=backend,
        backends=_dispatch.BACKENDS,
        num_splits=num_splits,
    )


MaskArg = Mask | Tensor | Callable[..., Tensor] | None
ModArg = ScoreMod | Callable[..., Tensor] | Sequence[ScoreMod | Callable[..., Tensor]] | None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = None,
    score_mod: ModArg = None,
    similarity: str = "dot",
    scale: float | None = None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
    num_splits: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention ``softmax(scale · sim(q, k) + mods, masked) @ v``.

    Args:
        q: (B, Hq, Sq, D) queries; k: (B, Hkv, Sk, D) keys; v: (B, Hkv, Sk, Dv) values. Any strides
            (transposed, expanded, self-overlapping: a tensor is copied only where a fused kernel would
            misread it); one dtype (float16, bfloat16, float32, float64) and one device for all three;
            Hq % Hkv == 0 (grouped-query attention: query head h uses kv head h // (Hq // Hkv)).
            B, H, Sq and Sk may be 0 (empty or zero outputs, as SDPA); head dims must be >= 1.
        mask: an ``attnopt.masks`` descriptor (compose with ``&`` / ``|``); a bool tensor broadcastable
            to (B, Hq, Sq, Sk) (True = keep, as SDPA) or a FlexAttention-style ``mask_mod(b, h, i, j)``
            are accepted too. Positional masks align the last query with the last key (bottom-right,
            query i at position i + Sk - Sq) unless built with ``align="top_left"``.
        score_mod: one ``attnopt.mods`` modifier, a FlexAttention-style ``score_mod(score, b, h, i, j)``,
            or a list of them applied in order to the scaled scores.
        similarity: "dot" (default), "cosine" (q·k / |q||k|) or "euclidean" (-|q - k|²).
        scale: multiplies the similarity; default 1/sqrt(D) with D the head dim.
        sinks: optional (Hq,) learnable sink logits: the softmax runs over [scores, sink[h]] and the sink
            column is dropped. Differentiable.
        dropout_p: dropout on the attention weights in [0, 1); reproducible under torch.manual_seed.
        return_lse: also return the natural-log log-sum-exp of each row's softmax normalizer
            (sink included), shape (B, Hq, Sq), float32 (float64 for float64 inputs).
        backend: "auto" (the fastest backend that supports the inputs; see explain()) or a name from
            available_backends(); a pinned backend never falls back silently.
        num_splits: split-KV decode (flash-decoding), as FlashAttention's / torch varlen's num_splits.
            None (default): automatic; decode-shaped calls (G·Sq <= 16 query rows per kv head, no mask or
            a key-only one, inference) may cut the keys into chunks computed in parallel and merged
            exactly by their log-sum-exp, where that is measured faster; the choice depends only on
            shapes, dtype and torch.get_num_threads(), never on data. 1: never split the keys. n >= 2:
            n chunks of Sk // n keys (the last takes the remainder; at most Sk chunks). With 1 or n, a
            decode call runs on 'splitkv' and is batch-invariant: each row gives the same bits whatever
            else is in the batch. Only 'splitkv' splits: inputs it cannot run with n >= 2 (prefill,
            other masks, gradients, score modifiers) raise NotImplementedError listing the reasons.

    Returns:
        out (B, Hq, Sq, Dv) in the input dtype, or (out, lse) with return_lse=True. Scores and softmax
        are computed in float32 (float64 for float64 inputs); additive biases are added in that
        precision too. A row whose keys are all masked gives out = 0 exactly, lse = -inf and zero
        gradients, never NaN. Masked-out entries contribute exactly nothing, even when q, k or v hold
        NaN/inf there (an uninitialized KV cache); a row that keeps a NaN/inf entry comes out NaN.
        Under torch.autocast, q, k and v are cast to the autocast dtype first (as SDPA does), whatever
        the backend. Under torch.compile the call is one custom operator (``attnopt::attention``).

    Raises:
        TypeError / ValueError: invalid input, before any compute, naming the argument and the value.
        NotImplementedError: a pinned backend cannot run these inputs, or num_splits >= 2 was asked of
            a call no key-splitting backend runs (the message lists why).
    """
    kwargs = {
        "mask": mask,
        "score_mod": score_mod,
        "similarity": similarity,
        "scale": scale,
        "sinks": sinks,
        "dropout_p": dropout_p,
        "return_lse": return_lse,
        "backend": backend,
        "num_splits": num_splits,
    }
    if _OBSERVERS and not _observing[0] and not torch.compiler.is_compiling():
        return _observed(q, k, v, kwargs)
    amp = _autocast_dtype(q, k, v)
    if amp is not None:  # like F.scaled_dot_product_attention: run in the autocast dtype, whatever backend
        with torch.autocast(q.device.type, enabled=False):
            return attention(q.to(amp), k.to(amp), v.to(amp), **kwargs)
    if torch.compiler.is_compiling():  # one opaque operator in the graph; this dispatch runs inside it
        return _op.compiled_attention(q, k, v, **kwargs)
    key = _plain_key(
        q, k, v, mask, score_mod, sinks, similarity, scale, dropout_p, return_lse, backend, num_splits
    )
    hit = _PLAIN.get(key) if key is not None else None
    if hit is not None:  # seen before: same metadata, so validation and selection give the same answer
        chosen, scale_f = hit
        inputs = AttentionInputs(
            q, k, v, None, (), similarity, scale_f, None, float(dropout_p), return_lse, num_splits
        )
    else:
        inputs = _validate(
            q, k, v, mask, score_mod, similarity, scale, sinks, dropout_p, return_lse, backend, num_splits
        )
        if inputs.empty:  # no backend runs; a pinned one still says if it could not have run the call
            if backend != "auto":
                _dispatch.select(inputs, backend)
            out, lse = _empty_result(inputs)
            return (out, lse) if return_lse else out
        chosen = _dispatch.select(inputs, backend)
        if key is not None:
            if len(_PLAIN) >= _PLAIN_MAX:
                _PLAIN.clear()
            _PLAIN[key] = (chosen, inputs.scale)
    if chosen.dense_rows:  # the fused kernels misread some strides: copy just those tensors
        inputs, _ = inputs.kernel_layout()
    if inputs.requires_grad and not chosen.native_backward(inputs):
        out, lse = _RerunGrad.apply(chosen, inputs, inputs.q, inputs.k, inputs.v, *inputs.mod_tensors)
    else:
        out, lse = chosen.forward(inputs)
    if return_lse:
        assert lse is not None, "a backend that declares supports_lse returned no lse"
        return out, lse
    return out


class _RerunGrad(torch.autograd.Function):
    """Forward on a backend without an autograd graph (flex on CPU); backward reruns the same call on the
    best other backend under autograd and takes its gradients (one extra forward: a recompute)."""

    @staticmethod
    def forward(fctx, chosen, inputs, *tensors):
        q, k, v = (t.detach() for t in tensors[:3])
        with torch.no_grad():
            out, lse = chosen.forward(dataclasses.replace(inputs, q=q, k=k, v=v))
        fctx.inputs, fctx.excluded = inputs, chosen.name
        fctx.save_for_backward(*tensors[:3])
        if lse is not None:
            fctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(fctx, dout, _dlse):
        saved = fctx.saved_tensors
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in saved]
        extra = fctx.inputs.mod_tensors  # sinks, bias, slopes, custom closures' tensors
        with torch.enable_grad():
            inputs = dataclasses.replace(fctx.inputs, q=leaves[0], k=leaves[1], v=leaves[2])
            other = _dispatch.select(inputs, "auto", exclude=frozenset({fctx.excluded}))
            run = inputs.kernel_layout()[0] if other.dense_rows else inputs
            out, _ = other.forward(run)
            wrt = [t for t in (*leaves, *extra) if t.requires_grad]
            got = iter(torch.autograd.grad(out, wrt, dout, allow_unused=True))
        grads = [next(got) if t.requires_grad else None for t in (*leaves, *extra)]
        return (None, None, *grads)


def compile_for(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = None,
    score_mod: ModArg = None,
    similarity: str = "dot",
    scale: float | None = None,
    sinks: Tensor | None = None,
    return_lse: bool = False,
) -> dict[str, Any]:
    """Compile the 'flex' kernel for calls shaped like this one, so backend="auto" may use it.

    Runs the call once on 'flex' (compiling its kernel for this structure: device, dtype, head dims,
    heads, the mask's and modifiers' kinds, similarity, scale; with gradients too when q, k or v
    require grad), then auto uses that kernel wherever it ranks fastest, for any sequence length or batch
    of the same structure (dynamic shapes; a recompile is counted and warned about). Returns the
    kernel's counters: compiles, recompiles, calls, compile_seconds. Raises NoBackendError (with the
    reasons) when 'flex' cannot run such calls.
    """
    from .backends.flex import _KERNELS, _structure

    amp = _autocast_dtype(q, k, v)
    if amp is not None:  # attention() runs in the autocast dtype: compile that kernel
        q, k, v = q.to(amp), k.to(amp), v.to(amp)
    inputs = _validate(q, k, v, mask, score_mod, similarity, scale, sinks, 0.0, return_lse, "flex", None)
    if inputs.empty:
        raise ValueError(f"compile_for: an empty problem ({inputs.describe()}) has no kernel to compile")
    _dispatch.select(inputs, "flex")  # raises with the reasons when flex cannot run it
    with torch.autocast(q.device.type, enabled=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "attnopt flex: recompiled")  # compiling is what was asked for
        out = attention(
            q,
            k,
            v,
            mask=mask,
            score_mod=score_mod,
            similarity=similarity,
            scale=scale,
            sinks=sinks,
            return_lse=return_lse,
            backend="flex",
        )
    if inputs.requires_grad and inputs.device.type != "cpu":  # compile the backward kernel too
        o = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(o.float().sum(), [t for t in (q, k, v) if t.requires_grad])
    st = _KERNELS[_structure(inputs)]
    return {
        "compiles": st.compiles,
        "recompiles": st.recompiles,
        "calls": st.calls,
        "compile_seconds": round(st.compile_seconds, 3),
    }


@contextlib.contextmanager
def unobserved() -> Iterator[None]:
    """Attention calls inside are not shown to observers (a helper computation, not one of the model's
    layers: e.g. the dense weights of output_attentions)."""
    before = _observing[0]
    _observing[0] = True
    try:
        yield
    finally:
        _observing[0] = before


def _observed(q: Tensor, k: Tensor, v: Tensor, kwargs: dict[str, Any]) -> Tensor | tuple[Tensor, Tensor]:
    """Run the call with its LSE, then show the validated inputs and the LSE to every observer.

    With ``backend="auto"`` the call itself returns its LSE, so dispatch may pick an LSE-capable backend
    (the output can then differ from an unobserved call in the last bits). A pinned backend runs as asked,
    and the LSE comes from a second, automatic call. Under autocast the observers see q, k, v cast as
    the call ran them, and run with autocast off.
    """
    _observing[0] = True
    try:
        if kwargs["backend"] == "auto" or kwargs["return_lse"]:
            out, lse = attention(q, k, v, **(kwargs | {"return_lse": True}))
        else:
            out = attention(q, k, v, **kwargs)
            _, lse = attention(
                q, k, v, **(kwargs | {"return_lse": True, "backend": "auto", "num_splits": None})
            )
        amp = _autocast_dtype(q, k, v)
        if amp is not None:
            q, k, v = q.to(amp), k.to(amp), v.to(amp)
        named = ("mask", "score_mod", "similarity", "scale", "sinks", "dropout_p")
        inputs = _validate(q, k, v, *(kwargs[n] for n in named), True, "auto", None)
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            for observe in list(_OBSERVERS):
                observe(inputs, lse.detach())
    finally:
        _observing[0] = False
    return (out, lse) if kwargs["return_lse"] else out


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = None,
    score_mod: ModArg = None,
    similarity: str = "dot",
    scale: float | None = None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
    num_splits: int | None = None,
) -> str:
    """Say which backend attention() with the same arguments runs, how, and why each other one does not.

    Validates exactly like attention() (same errors) but computes nothing.
    """
    amp = _autocast_dtype(q, k, v)
    if amp is not None:
        kwargs = {"mask": mask, "score_mod": score_mod, "similarity": similarity, "scale": scale}
        kwargs |= {"sinks": sinks, "dropout_p": dropout_p, "return_lse": return_lse, "backend": backend}
        kwargs |= {"num_splits": num_splits}
        with torch.autocast(q.device.type, enabled=False):
            text = explain(q.to(amp), k.to(amp), v.to(amp), **kwargs)
        return f"under torch.autocast: q, k, v are cast to {amp} (as F.scaled_dot_product_attention)\n{text}"
    inputs = _validate(
        q, k, v, mask, score_mod, similarity, scale, sinks, dropout_p, return_lse, backend, num_splits
    )
    lines = [f"attnopt.attention({inputs.describe()})"]
    if inputs.empty:
        lines.append(
            "-> no backend runs: an empty problem (B, Hq, Sq or Sk is 0) returns zeros, lse -inf (the sink "
            "logit with sinks)"
        )
        return "\n".join(lines)
    reasons = _dispatch.reasons_by_backend(inputs)
    try:
        chosen = _dispatch.select(inputs, str(backend)).name
        lines.append(f"-> runs on '{chosen}'" + (" (pinned)" if backend != "auto" else ""))
    except _dispatch.NoBackendError:
        chosen = None
        if backend != "auto":
            lines.append(
                f"-> backend={backend!r} is pinned and cannot run these inputs (attention() would raise)"
            )
        else:
            lines.append("-> no backend can run these inputs (attention() would raise NotImplementedError)")
    width = max(len(n) for n in reasons)
    for b in _dispatch.PRIORITY:
        r = reasons[b.name]
        if b.name == chosen:
            run_inputs, notes = inputs.kernel_layout() if b.dense_rows else (inputs, ())
            status = "; ".join([f"chosen: {b.plan(run_inputs)}", *notes])
        elif not r:
            status = f"could run, {'not pinned' if backend != 'auto' else 'lower priority'}: {b.plan(inputs)}"
        else:
            status = "cannot run: " + "; ".join(r)
        lines.append(f"  {b.name:<{width}}  {status}")
    return "\n".join(lines)


def _autocast_dtype(q: object, k: object, v: object) -> torch.dtype | None:
    """The dtype torch.autocast runs this call in, or None (autocast off, float64 or invalid inputs).

    Autocast casts floating inputs other than float64 to its dtype for F.scaled_dot_product_attention;
    attention() does the same in one place, so out's dtype never depends on the backend.
    """
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return None
    assert isinstance(q, Tensor)
    device = q.device.type
    try:
        if not torch.is_autocast_enabled(device):
            return None
        dtype = torch.get_autocast_dtype(device)
    except (RuntimeError, ValueError):  # a device type autocast does not know (meta, ...)
        return None
    dtypes = {t.dtype for t in (q, k, v)}  # type: ignore[union-attr]
    if dtypes == {dtype} or any(d == torch.float64 or not d.is_floating_point for d in dtypes):
        return None  # nothing to cast; autocast leaves float64 alone; validate() reports the rest
    return dtype


def _empty_result(inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
    """Attention with no output element or no key (Sk = 0: out 0, lse -inf, or the sink with sinks).

    Built from sums over empty slices, which are exact zeros that stay in the autograd graph: backward
    gives zero gradients (never an error, never NaN), as F.scaled_dot_product_attention does.
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    G = inputs.Hq // inputs.Hkv if inputs.Hkv else 0
    qz = q[..., :0].sum(-1, keepdim=True)  # (B, Hq, Sq, 1)
    vz = v[:, :, :0].sum(2, keepdim=True) + k[:, :, :0].sum((2, 3))[..., None, None]  # (B, Hkv, 1, Dv)
    out = qz + vz.repeat_interleave(G, dim=1)  # (B, Hq, Sq, Dv) zeros
    acc = acc_dtype(inputs.dtype)
    lse = torch.full((inputs.B, inputs.Hq, inputs.Sq), float("-inf"), dtype=acc, device=inputs.device)
    if inputs.sinks is not None:  # the softmax runs over the sink alone: lse = sink[h]
        lse = inputs.sinks.to(acc).view(1, -1, 1).expand_as(lse)
    return out, lse


def attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None = None,
    *,
    mask: MaskArg = None,
    score_mod: ModArg = None,
    similarity: str = "dot",
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the keys k, v as one part of a larger attention (a ring-attention backward step).

    The rows of q attend to these keys and possibly others; `out` (B, Hq, Sq, Dv) and `lse` (B, Hq, Sq)
    are the rows' output and log-sum-exp over *all* their keys (e.g. merged from partial results with
    attnopt.merge), `dout` and `dlse` (optional) the upstream gradients of out and lse. Returns
    (dq, dk, dv): dq is this part's share of q's gradient (the parts' shares add up to it), dk and dv
    are these keys' gradients; in q's / k's / v's dtype. Mask and modifiers are those of this part, as
    for attention(). Runs a backend's backward from (out, lse) where one can (span: no forward rerun),
    else reruns this part's forward through autograd; both exact.
    """
    inputs = _validate(q, k, v, mask, score_mod, similarity, scale, None, 0.0, True, "auto", None)
    acc = acc_dtype(inputs.dtype)
    B, Hq, Sq, Dv = inputs.B, inputs.Hq, inputs.Sq, inputs.Dv
    for name, t, shape in (
        ("out", out, (B, Hq, Sq, Dv)),
        ("dout", dout, (B, Hq, Sq, Dv)),
        ("lse", lse, (B, Hq, Sq)),
        ("dlse", dlse, (B, Hq, Sq)),
    ):
        if t is None and name == "dlse":
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or not t.dtype.is_floating_point:
            raise ValueError(
                f"attention_backward: {name} must be a floating tensor of shape {shape}, got "
                f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}"
            )
        if t.device != inputs.device:
            raise ValueError(f"attention_backward: {name} is on {t.device} but q is on {inputs.device}")
    out, dout = out.detach().to(inputs.dtype), dout.detach().to(inputs.dtype)
    lse, dlse = lse.detach().to(acc), None if dlse is None else dlse.detach().to(acc)
    if inputs.empty:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b in _dispatch.PRIORITY:
        if b.grads_from_output and not b.grad_from_output_reasons(inputs):
            run = inputs.kernel_layout()[0] if b.dense_rows else inputs
            return b.grad_from_output(run, out, lse, dout, dlse)
    return _grad_by_rerun(inputs, out, lse, dout, dlse)


def _grad_by_rerun(
    inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The part's (o, l) rerun with autograd: d o = w·dO and d l = w·(dO·(o - out) + dlse), with the part's
    weight w = exp(l - lse) in its rows (0 where it has no key)."""
    leaves = [t.detach().requires_grad_(True) for t in (inputs.q, inputs.k, inputs.v)]
    with torch.enable_grad():
        o, part_lse = attention(
            *leaves,
            mask=inputs.mask,
            score_mod=list(inputs.mods) or None,
            similarity=inputs.similarity,
            scale=inputs.scale,
            return_lse=True,
        )
    with torch.no_grad():
        live = torch.isfinite(part_lse)
        w = torch.where(live, torch.exp(part_lse - torch.where(live, lse, 0.0)), 0.0)
        g_o = (w.unsqueeze(-1) * dout.to(w.dtype)).to(o.dtype)
        gap = (dout.to(w.dtype) * (o.detach().to(w.dtype) - out.to(w.dtype))).sum(-1)
        g_l = torch.where(live, w * (gap + (0.0 if dlse is None else dlse)), 0.0)
    grads = torch.autograd.grad((o, part_lse), leaves, (g_o, g_l), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves))  # type: ignore[return-value]


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, in priority order."""
    return [b.name for b in _dispatch.PRIORITY if b.is_available()]
