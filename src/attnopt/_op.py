"""attention() as a torch custom operator, for torch.compile (fullgraph) and export-style tracing.

Under ``torch.compile`` the Python dispatch of attention() (validation, data checks, backend choice,
span plans) cannot be traced: it branches on data and on Python objects. So while compiling, attention()
calls one opaque operator, ``torch.ops.attnopt.attention``, whose implementation runs the eager
attention() at run time, on real tensors. Masks and score modifiers are Python objects; they cross the
operator boundary as a structure string plus lists of tensors, ints and floats, and are rebuilt inside
(``num_splits`` rides in the structure string too: '<mask> ; <score mods> ; <num_splits>').

Autograd: the forward operator returns (out, lse); its registered backward calls a second operator,
``attnopt::attention_backward``, that recomputes the forward with autograd on and differentiates it
(the backends' own exact backward runs inside). Custom Python functions (custom masks / score_mods)
are kept in a registry and named in the structure string by key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import masks as M
from . import mods as Mods
from ._inputs import NUM_SPLITS_HINT, acc_dtype, num_splits_problem

# --------------------------------------------------------------------------- structure <-> objects

_FUNCTIONS: dict[str, Callable[..., Tensor]] = {}


@torch.compiler.assume_constant_result
def _register(fn: Callable[..., Tensor]) -> str:
    """Keep a custom function alive under a key the structure string can name.

    assume_constant_result: while tracing, dynamo runs this once and bakes the key into the graph (a
    registry write inside the compiled region would only happen after the graph ran).
    """
    key = f"f{id(fn):x}"
    _FUNCTIONS[key] = fn
    return key


class _Encoder:
    """Collects the tensors, ints and floats a structure string refers to by position."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.ints: list[int] = []
        self.floats: list[float] = []

    def tensor(self, t: Tensor) -> str:
        self.tensors.append(t)
        return f"t{len(self.tensors) - 1}"

    def int(self, n: int) -> str:
        self.ints.append(n)
        return f"i{len(self.ints) - 1}"

    def float(self, x: float) -> str:
        self.floats.append(x)
        return f"f{len(self.floats) - 1}"

    def mask(self, m: M.Mask) -> str:
        """Prefix notation, space separated: '& causal:bottom_right padding:t0'."""
        if isinstance(m, M.And):
            return f"& {self.mask(m.a)} {self.mask(m.b)}"
        if isinstance(m, M.Or):
            return f"| {self.mask(m.a)} {self.mask(m.b)}"
        if isinstance(m, M.causal):
            return f"causal:{m.align}"
        if isinstance(m, M.sliding_window):
            return f"window:{self.int(m.left)}:{self.int(m.right)}:{m.align}"
        if isinstance(m, M.prefix_lm):
            return f"prefix_lm:{self.int(m.prefix_len)}:{m.align}"
        if isinstance(m, M.padding):
            return f"padding:{self.tensor(m.kv_lengths)}"
        if isinstance(m, M.left_padding):
            return f"left_padding:{self.tensor(m.pad_lengths)}"
        if isinstance(m, M.document):
            ck = "-" if m.cu_seqlens_k is None else self.tensor(m.cu_seqlens_k)
            return f"document:{self.tensor(m.cu_seqlens)}:{ck}"
        if isinstance(m, M.cache_causal):
            left = "-" if m.left is None else self.int(m.left)
            return f"cache_causal:{self.tensor(m.kv_lengths)}:{left}"
        if isinstance(m, M.document_causal):
            return f"document_causal:{self.tensor(m.cu_seqlens_q)}:{self.tensor(m.cu_seqlens_k)}"
        if isinstance(m, M.dense):
            return f"dense:{self.tensor(m.mask)}"
        if isinstance(m, M.custom):
            return f"custom:{_register(m.fn)}"
        raise TypeError(f"attnopt cannot pass a {type(m).__name__} mask through torch.compile")

    def mod(self, m: Mods.ScoreMod) -> str:
        if isinstance(m, Mods.alibi):
            return f"alibi:{self.tensor(m.slopes)}:{m.align}:{m.shift}"
        if isinstance(m, Mods.softcap):
            return f"softcap:{self.float(m.cap)}"
        if isinstance(m, Mods.bias):
            return f"bias:{self.tensor(m.bias)}"
        if isinstance(m, Mods.custom):
            return f"custom:{_register(m.fn)}"
        raise TypeError(f"attnopt cannot pass a {type(m).__name__} score modifier through torch.compile")


def _decode(spec: str, tensors: list[Tensor], ints: list[int], floats: list[float]) -> tuple[Any, Any, Any]:
    """The (mask, score_mod list, num_splits) a structure string describes."""
    mask_part, mods_part, splits_part = [*spec.split(";"), "", ""][:3]
    tokens: Iterator[str] = iter(mask_part.split())

    def ref(token: str) -> Any:
        kind, n = token[0], int(token[1:])
        return {"t": tensors, "i": ints, "f": floats}[kind][n]

    def mask() -> M.Mask:
        tok = next(tokens)
        if tok == "&":
            return mask() & mask()
        if tok == "|":
            return mask() | mask()
        name, *args = tok.split(":")
        if name == "causal":
            return M.causal(args[0])
        if name == "window":
            return M.sliding_window(ref(args[0]), ref(args[1]), align=args[2])
        if name == "prefix_lm":
            return M.prefix_lm(ref(args[0]), align=args[1])
        if name == "padding":
            return M.padding(ref(args[0]))
        if name == "left_padding":
            return M.left_padding(ref(args[0]))
        if name == "document":
            return M.document(ref(args[0]), None if args[1] == "-" else ref(args[1]))
        if name == "cache_causal":
            return M.cache_causal(ref(args[0]), left=None if args[1] == "-" else ref(args[1]))
        if name == "document_causal":
            return M.document_causal(ref(args[0]), ref(args[1]))
        if name == "dense":
            return M.dense(ref(args[0]))
        if name == "custom":
            return M.custom(_FUNCTIONS[args[0]])
        raise AssertionError(f"unknown mask token {tok!r}")

    def mod(tok: str) -> Mods.ScoreMod:
        name, *args = tok.split(":")
        if name == "alibi":
            return Mods.alibi(ref(args[0]), align=args[1], shift=int(args[2]))
        if name == "softcap":
            return Mods.softcap(ref(args[0]))
        if name == "bias":
            return Mods.bias(ref(args[0]))
        if name == "custom":
            return Mods.custom(_FUNCTIONS[args[0]])
        raise AssertionError(f"unknown score_mod token {tok!r}")

    m = mask() if mask_part.strip() else None
    num_splits = int(splits_part) if splits_part.strip() else None
    return m, [mod(t) for t in mods_part.split()] or None, num_splits


def encode(
    mask: object, score_mod: object, num_splits: object = None
) -> tuple[str, list[Tensor], list[int], list[float]]:
    """(structure string, tensors, ints, floats) for attention()'s mask, score_mod and num_splits.

    Accepts what attention() accepts (descriptors, bool tensors, FlexAttention-style functions); what
    is wrong with them is reported when the operator runs, by the same validate() as in eager mode.
    """
    enc = _Encoder()
    if isinstance(mask, Tensor):
        mask = M.dense(mask) if mask.dtype == torch.bool else mask
    elif mask is not None and not isinstance(mask, M.Mask) and callable(mask):
        mask = M.custom(mask)
    if mask is not None and not isinstance(mask, M.Mask):
        raise TypeError(f"mask must be an attnopt.masks descriptor, got {type(mask).__name__}")
    items = (
        list(score_mod) if isinstance(score_mod, (list, tuple)) else [] if score_mod is None else [score_mod]
    )
    mods = [m if isinstance(m, Mods.ScoreMod) else Mods.custom(m) for m in items]
    spec = (enc.mask(mask) if mask is not None else "") + " ; " + " ".join(enc.mod(m) for m in mods)
    problem = num_splits_problem(num_splits)
    if problem is not None:  # the message validate() gives, raised while tracing
        kind, msg = problem
        raise kind(f"{msg}\nHINT: {NUM_SPLITS_HINT}")
    if num_splits is not None:
        spec += f" ; {int(num_splits)}"  # type: ignore[call-overload]
    return spec, enc.tensors, enc.ints, enc.floats


# ----------------------------------------------------------------------------------------- operators


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    """Record autograd inside a custom operator's implementation.

    torch runs custom-op implementations with the autograd dispatch keys excluded (below autograd), so
    torch.enable_grad() alone records nothing there. The recomputing backward needs a graph: drop the
    autograd keys from the thread-local exclude set for its duration (private torch API, torch >= 2.4).
    """
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for name in (
        "AutogradCPU",
        "AutogradCUDA",
        "AutogradXPU",
        "AutogradMPS",
        "AutogradOther",
        "AutogradMeta",
    ):
        key = getattr(C.DispatchKey, name, None)
        if key is not None:
            exclude = exclude.remove(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensors: list[Tensor],
    spec: str,
    ints: list[int],
    floats: list[float],
    sinks: Tensor | None,
    seed: Tensor | None,
    scale: float | None,
    similarity: str,
    dropout_p: float,
    return_lse: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """The eager attention() on rebuilt arguments; the same RNG stream for the forward and its recompute."""
    from .api import attention

    mask, mods, num_splits = _decode(spec, tensors, ints, floats)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(int(seed))
        res = attention(
            q,
            k,
            v,
            mask=mask,
            score_mod=mods,
            similarity=similarity,
            scale=scale,
            sinks=sinks,
            dropout_p=dropout_p,
            return_lse=return_lse,
            backend=backend,
            num_splits=num_splits,
        )
    return res if return_lse else (res, q.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("attnopt::attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensors: list[Tensor],
    spec: str,
    ints: list[int],
    floats: list[float],
    sinks: Tensor | None,
    seed: Tensor | None,
    scale: float | None,
    similarity: str,
    dropout_p: float,
    return_lse: bool,
    grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    # With grad=True the forward runs as its recompute will (backend choice depends on requires_grad).
    ctx = _autograd_on() if grad else contextlib.nullcontext()
    with ctx:
        if grad:
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        out, lse = _run(
            q,
            k,
            v,
            tensors,
            spec,
            ints,
            floats,
            sinks,
            seed,
            scale,
            similarity,
            dropout_p,
            return_lse,
            backend,
        )
    return out.detach().contiguous(), lse.detach().contiguous()


@_attention_op.register_fake
def _(
    q, k, v, tensors, spec, ints, floats, sinks, seed, scale, similarity, dropout_p, return_lse, grad, backend
):
    B, Hq, Sq = q.shape[0], q.shape[1], q.shape[2]
    lse_dtype = acc_dtype(q.dtype)
    lse = q.new_empty((B, Hq, Sq), dtype=lse_dtype) if return_lse else q.new_empty(0, dtype=torch.float32)
    return q.new_empty((B, Hq, Sq, v.shape[-1])), lse  # contiguous, as the real outputs


@torch.library.custom_op("attnopt::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tensors: list[Tensor],
    spec: str,
    ints: list[int],
    floats: list[float],
    sinks: Tensor | None,
    seed: Tensor | None,
    scale: float | None,
    similarity: str,
    dropout_p: float,
    return_lse: bool,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
    """Gradients for q, k, v, the tensors flagged in `needs` (biases, slopes) and sinks (empty if none)."""
    with _autograd_on():
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        ts = [t.detach().requires_grad_(True) if need else t for t, need in zip(tensors, needs)]
        s_ = None if sinks is None else sinks.detach().requires_grad_(True)
        out, lse = _run(
            q_, k_, v_, ts, spec, ints, floats, s_, seed, scale, similarity, dropout_p, return_lse, backend
        )
        wrt = [q_, k_, v_, *(t for t, need in zip(ts, needs) if need), *([s_] if s_ is not None else [])]
        outs, grads_in = [out], [dout]
        if dlse is not None and return_lse:
            outs.append(lse)
            grads_in.append(dlse)
        grads = torch.autograd.grad(outs, wrt, grads_in, allow_unused=True)
    grads = [(torch.zeros_like(w) if g is None else g).contiguous() for g, w in zip(grads, wrt)]
    n = sum(needs)
    dsinks = grads[3 + n] if sinks is not None else q.new_empty(0)
    return grads[0], grads[1], grads[2], grads[3 : 3 + n], dsinks


@_attention_backward_op.register_fake
def _(
    dout,
    dlse,
    q,
    k,
    v,
    tensors,
    spec,
    ints,
    floats,
    sinks,
    seed,
    scale,
    similarity,
    dropout_p,
    return_lse,
    backend,
    needs,
):
    def like(t: Tensor) -> Tensor:
        return t.new_empty(t.shape)

    dts = [like(t) for t, need in zip(tensors, needs) if need]
    return like(q), like(k), like(v), dts, like(sinks) if sinks is not None else q.new_empty(0)


def _setup_context(ctx, inputs, output) -> None:
    (
        q,
        k,
        v,
        tensors,
        spec,
        ints,
        floats,
        sinks,
        seed,
        scale,
        similarity,
        dropout_p,
        return_lse,
        _,
        backend,
    ) = inputs
    ctx.args = (spec, ints, floats, scale, similarity, dropout_p, return_lse, backend)
    ctx.needs = [t.dtype.is_floating_point and t.requires_grad for t in tensors]
    ctx.n_tensors, ctx.has_sinks, ctx.has_seed = len(tensors), sinks is not None, seed is not None
    ctx.save_for_backward(
        q, k, v, *tensors, *([sinks] if sinks is not None else []), *([seed] if seed is not None else [])
    )


def _backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, *rest = ctx.saved_tensors
    tensors = rest[: ctx.n_tensors]
    rest = rest[ctx.n_tensors :]
    sinks = rest.pop(0) if ctx.has_sinks else None
    seed = rest.pop(0) if ctx.has_seed else None
    spec, ints, floats, scale, similarity, dropout_p, return_lse, backend = ctx.args
    dq, dk, dv, dts, dsinks = _attention_backward_op(
        dout,
        dlse,
        q,
        k,
        v,
        tensors,
        spec,
        ints,
        floats,
        sinks,
        seed,
        scale,
        similarity,
        dropout_p,
        return_lse,
        backend,
        ctx.needs,
    )
    it = iter(dts)
    dtensors = [next(it) if need else None for need in ctx.needs]
    # inputs: q, k, v, tensors, spec, ints, floats, sinks, seed, scale, similarity, dropout_p, return_lse, grad, backend
    # The returned structure mirrors the inputs': autograd sees an empty list as a list and a non-empty
    # int / float list as one leaf.
    no_ints, no_floats = (None if ctx.args[n] else [] for n in (1, 2))
    return dq, dk, dv, dtensors, None, no_ints, no_floats, dsinks if ctx.has_sinks else None, *([None] * 7)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- wrapper


def compiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: object,
    score_mod: object,
    similarity: str,
    scale: float | None,
    sinks: Tensor | None,
    dropout_p: float,
    return_lse: bool,
    backend: str,
    num_splits: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """attention() while torch.compile traces: one operator node; the eager dispatch runs inside it."""
    spec, tensors, ints, floats = encode(mask, score_mod, num_splits)
    grad = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, sinks, *tensors)
    )
    # Dropout: one seed per call, drawn from torch's RNG, so the recomputing backward drops the same weights.
    seed = torch.randint(0, 2**62, (1,), device="cpu") if dropout_p else None
    out, lse = _attention_op(
        q,
        k,
        v,
        tensors,
        spec,
        ints,
        floats,
        sinks,
        seed,
        None if scale is None else float(scale),
        similarity,
        float(dropout_p),
        return_lse,
        grad,
        backend,
    )
    return (out, lse) if return_lse else out
