"""Custom mask_mod / score_mod functions: evaluated on whole tiles when elementwise, else through vmap.

attnopt evaluates a FlexAttention-style function on whole tiles of broadcast int64 index tensors
(b (B,1,1,1), h (1,Hq,1,1), i (1,1,q,1), j (1,1,1,k)). Functions written for scalars (FlexAttention
runs them under vmap) may reduce over an index tensor or slice with one: on whole tiles they are
silently wrong or crash. Validation probes a small grid to tell which evaluation gives the
element-by-element values, and reports a function that neither reproduces.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .masks import MaskContext


def elementwise_call(fn: Callable[..., Tensor], args: Sequence[Tensor], vmapped: bool) -> Tensor:
    """fn(*args) on broadcastable tensors; with vmapped=True one element at a time through torch.vmap
    (FlexAttention's semantics: the function sees scalar tensors), for functions that are not elementwise."""
    if not vmapped:
        return fn(*args)
    shape = torch.broadcast_shapes(*(a.shape for a in args))
    flat = [a.expand(shape).reshape(-1) for a in args]
    return torch.vmap(fn)(*flat).reshape(shape)


def _probe_points(ctx: MaskContext) -> tuple[Tensor, ...]:
    """Index tensors b (nb,1,1,1), h, i, j of a small probe grid: first, middle and last positions."""

    def pick(n: int, many: bool) -> list[int]:
        return sorted({0, n // 2, n - 1} if many else {0, n - 1})

    kw = {"device": ctx.device, "dtype": torch.long}
    dims = [pick(ctx.B, False), pick(ctx.Hq, False), pick(ctx.Sq, True), pick(ctx.Sk, True)]
    return tuple(
        torch.tensor(vals, **kw).view([-1 if d == n else 1 for d in range(4)]) for n, vals in enumerate(dims)
    )


def probe_elementwise(
    fn: Callable[..., Tensor], what: str, ctx: MaskContext, score: bool
) -> tuple[str, bool]:
    """Check a user's mask_mod / score_mod on a probe grid: evaluated on whole broadcast index tensors it
    must equal its element-by-element values. Returns ("", vmapped) or (problem, False).

    Functions written for scalars (FlexAttention runs them under vmap) may reduce over an index tensor
    (``.sum()``, ``.max()``) or slice with one: on whole tiles they are silently wrong or crash. Such a
    function is evaluated through torch.vmap instead, if that reproduces its element-by-element values.
    """
    idx = _probe_points(ctx)
    shape = torch.broadcast_shapes(*(t.shape for t in idx))
    args: list[Tensor] = list(idx)
    if score:  # distinct scores, so a function that mixes elements shows
        n = shape.numel()
        # distinct and in no order along any dim (a cummax / sort over a row must show)
        vals = torch.sin(torch.arange(n, dtype=torch.float64) * 2.39996) * 3.0
        args.insert(0, vals.to(torch.float32).to(ctx.device).view(shape))
    try:  # element by element: each call sees (1, 1, 1, 1) tensors, as FlexAttention's scalars
        singles = []
        for pos in itertools.product(*(range(n) for n in shape)):
            one = [a.expand(shape)[pos].view(1, 1, 1, 1) for a in args]
            out = fn(*one)
            if not isinstance(out, Tensor) or out.numel() != 1:
                return (
                    f"{what} returned {_kind(out)} for one (b, h, i, j) element; it must return one value",
                    False,
                )
            singles.append(out.reshape(()))
        want = torch.stack(singles).view(shape)
    except Exception as e:  # the user's function failed: report it as a validation problem
        return f"{what} failed on a probe element: {type(e).__name__}: {e}", False
    if not score and want.dtype != torch.bool:
        return f"{what} must return a bool tensor, got {want.dtype}", False
    if score and not want.dtype.is_floating_point:
        return f"{what} must return a floating-point tensor, got {want.dtype}", False
    failure = ""
    for vmapped in (False, True):
        try:
            got = elementwise_call(fn, args, vmapped)
            if not isinstance(got, Tensor):
                failure = f"it returned {_kind(got)}"
            elif got.ndim > 4 or any(g not in (1, w) for g, w in zip(reversed(got.shape), reversed(shape))):
                failure = (
                    f"for index tensors broadcasting to {tuple(shape)} it returned shape {tuple(got.shape)}"
                )
            elif not bool(
                (
                    close := torch.isclose(
                        got.expand(shape).to(want.dtype), want, rtol=1e-5, atol=1e-6, equal_nan=True
                    )
                ).all()
            ):
                bad = (~close).nonzero()[0]
                at = tuple(int(a.expand(shape)[tuple(bad)]) for a in idx)
                failure = (
                    f"at (b, h, i, j)={at} it gave {got.expand(shape)[tuple(bad)].item()} on the whole tile but "
                    f"{want[tuple(bad)].item()} alone"
                )
            else:
                return "", vmapped
        except Exception as e:
            said = str(e).split(". ")[0]  # torch's vmap errors run on for paragraphs
            failure = failure or f"on a whole tile it raised {type(e).__name__}: {said}"
            if vmapped:
                failure += f"; under torch.vmap it raised {type(e).__name__}: {said}"
    return (
        f"{what} is not elementwise: {failure}. attnopt evaluates it on whole tiles of broadcast int64 index "
        f"tensors b (B,1,1,1), h (1,Hq,1,1), i (1,1,Sq,1), j (1,1,1,Sk) and falls back to torch.vmap, which "
        f"could not evaluate it either; write it with elementwise ops (no .sum()/.max() over an index, no "
        f"slicing or Python `if` on one)",
        False,
    )


def _kind(out: object) -> str:
    return f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
