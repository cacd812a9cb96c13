"""attention(), explain(), available_backends(): validate -> dispatch -> run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _dispatch
from ._inputs import AttentionInputs, validate
from .masks import Mask
from .mods import ScoreMod

# The decode hot path: calls with no mask, modifier or sinks (one per layer per generated token) skip
# validate() + select() when an identical call signature (shapes, dtypes, devices, grad state and every
# scalar argument) was validated before. Both depend on nothing else for such calls, so the answer is
# the same; this cuts ~20 us of the ~45 us Python cost per call (measured on the 2-core CPU machine).
_PLAIN: dict[tuple, tuple[Any, float]] = {}
_PLAIN_MAX = 256


def _plain_key(
    q, k, v, mask, score_mod, sinks, similarity, scale, dropout_p, return_lse, backend
) -> tuple | None:
    if mask is not None or score_mod is not None or sinks is not None:
        return None
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
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
        )
        hash(key)
    except TypeError:  # an unhashable argument: let validate() say what is wrong with it
        return None
    return key


def _validate(
    q, k, v, mask, score_mod, similarity, scale, sinks, dropout_p, return_lse, backend
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention ``softmax(scale · sim(q, k) + mods, masked) @ v``.

    Args:
        q: (B, Hq, Sq, D) queries; k: (B, Hkv, Sk, D) keys; v: (B, Hkv, Sk, Dv) values. Any strides
            (non-contiguous and expanded tensors are fine); one floating dtype and one device for all
            three; Hq % Hkv == 0 (grouped-query attention: query head h uses kv head h // (Hq // Hkv)).
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

    Returns:
        out (B, Hq, Sq, Dv) in the input dtype, or (out, lse) with return_lse=True. Scores and softmax
        are computed in float32 (float64 for float64 inputs). A row whose keys are all masked gives
        out = 0 exactly, lse = -inf and zero gradients, never NaN.

    Raises:
        TypeError / ValueError: invalid input, before any compute, naming the argument and the value.
        NotImplementedError: a pinned backend cannot run these inputs (the message lists why).
    """
    key = _plain_key(q, k, v, mask, score_mod, sinks, similarity, scale, dropout_p, return_lse, backend)
    hit = _PLAIN.get(key) if key is not None else None
    if hit is not None:  # seen before: same metadata, so validation and selection give the same answer
        chosen, scale_f = hit
        inputs = AttentionInputs(q, k, v, None, (), similarity, scale_f, None, float(dropout_p), return_lse)
    else:
        inputs = _validate(q, k, v, mask, score_mod, similarity, scale, sinks, dropout_p, return_lse, backend)
        chosen = _dispatch.select(inputs, backend)
        if key is not None:
            if len(_PLAIN) >= _PLAIN_MAX:
                _PLAIN.clear()
            _PLAIN[key] = (chosen, inputs.scale)
    out, lse = chosen.forward(inputs)
    if return_lse:
        assert lse is not None, "a backend that declares supports_lse returned no lse"
        return out, lse
    return out


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
) -> str:
    """Say which backend attention() with the same arguments runs, how, and why each other one does not.

    Validates exactly like attention() (same errors) but computes nothing.
    """
    inputs = _validate(q, k, v, mask, score_mod, similarity, scale, sinks, dropout_p, return_lse, backend)
    reasons = _dispatch.reasons_by_backend(inputs)
    lines = [f"attnopt.attention({inputs.describe()})"]
    try:
        chosen = _dispatch.select(inputs, str(backend)).name
        lines.append(f"-> runs on '{chosen}'" + (" (pinned)" if backend != "auto" else ""))
    except _dispatch.NoBackendError:
        chosen = None
        lines.append(
            f"-> backend={backend!r} is pinned and cannot run these inputs (attention() would raise)"
        )
    width = max(len(n) for n in reasons)
    for b in _dispatch.PRIORITY:
        r = reasons[b.name]
        if b.name == chosen:
            status = f"chosen: {b.plan(inputs)}"
        elif not r:
            status = f"could run, {'not pinned' if backend != 'auto' else 'lower priority'}: {b.plan(inputs)}"
        else:
            status = "cannot run: " + "; ".join(r)
        lines.append(f"  {b.name:<{width}}  {status}")
    return "\n".join(lines)


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, in priority order."""
    return [b.name for b in _dispatch.PRIORITY if b.is_available()]
