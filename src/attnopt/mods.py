"""Score modifiers: pure functions of (score, b, h, i, j) applied to the scaled scores, in order.

``score`` is float32 (float64 for float64 inputs); ``b, h, i, j`` are broadcastable int64 index tensors
(raw query index ``i`` in [0, Sq), key index ``j`` in [0, Sk)), exactly as FlexAttention's
``score_mod(score, b, h, q_idx, kv_idx)``. Positional modifiers use the aligned query position
``p = i + Sk - Sq`` (bottom-right) unless built with ``align="top_left"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._elementwise import elementwise_call, probe_elementwise
from .masks import FLOAT_DTYPES, Align, MaskContext, _check_align, broadcast_problems, gather_tile

__all__ = ["ScoreMod", "alibi", "alibi_slopes", "bias", "custom", "grad_tensors", "softcap"]


class ScoreMod:
    """Base of all score modifiers."""

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor, ctx: MaskContext) -> Tensor:
        raise NotImplementedError

    def check(self, ctx: MaskContext) -> list[str]:
        """Shape-dependent problems for this problem size (empty list = fine)."""
        return []


def alibi_slopes(num_heads: int) -> Tensor:
    """The geometric ALiBi slopes of Press et al. 2022 (2^(-8/n), ...), with their non-power-of-2 rule."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (k + 1) for k in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads={num_heads}; allowed: an int >= 1")
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_2(n)
    if n < num_heads:  # interleave the slopes of the next power of two, as the paper does
        slopes += power_of_2(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class alibi(ScoreMod):
    """ALiBi (Press et al. 2022): add -slopes[h] * |p + shift - j|; slopes is a (Hq,) float tensor.

    ``shift`` (an int, default 0) moves every query position: a query shard that starts ``shift``
    positions later than its keys' alignment says (context parallelism) keeps its global distances.
    """

    slopes: Tensor
    align: Align = "bottom_right"
    shift: int = 0

    def __post_init__(self):
        _check_align(self.align)
        if isinstance(self.shift, bool) or not isinstance(self.shift, int):
            raise TypeError(f"alibi shift must be an int, got {type(self.shift).__name__} {self.shift!r}")
        if not isinstance(self.slopes, Tensor) or self.slopes.dtype not in FLOAT_DTYPES:
            got = self.slopes.dtype if isinstance(self.slopes, Tensor) else type(self.slopes).__name__
            raise TypeError(
                f"alibi slopes must be a floating-point tensor of shape (Hq,), got {got} (allowed dtypes: "
                f"float16, bfloat16, float32, float64)"
            )

    def __call__(self, score, b, h, i, j, ctx):
        dist = (i + (ctx.offset(self.align) + self.shift) - j).abs().to(score.dtype)
        return score - self.slopes.to(score.device, score.dtype)[h] * dist

    def check(self, ctx):
        if self.slopes.device != ctx.device:
            return [
                f"alibi slopes are on {self.slopes.device} but q is on {ctx.device} (move them to q's device)"
            ]
        if tuple(self.slopes.shape) != (ctx.Hq,):
            return [
                f"alibi slopes shape {tuple(self.slopes.shape)}; expected (Hq,)=({ctx.Hq},), one per query head"
            ]
        return []

    def __repr__(self) -> str:
        extra = "" if self.align == "bottom_right" else f", align={self.align!r}"
        extra += f", shift={self.shift}" if self.shift else ""
        return f"alibi(slopes=({self.slopes.numel()},){extra})"


@dataclass(frozen=True)
class softcap(ScoreMod):
    """Logit soft-capping (Gemma 2, Team Gemma 2024): s -> cap * tanh(s / cap), cap > 0."""

    cap: float

    def __post_init__(self):
        if isinstance(self.cap, bool) or not isinstance(self.cap, (int, float)):
            raise TypeError(f"softcap cap must be a positive number, got {type(self.cap).__name__}")
        if not (math.isfinite(self.cap) and self.cap > 0):
            raise ValueError(f"softcap cap={self.cap}; allowed: a finite number > 0 (Gemma 2 uses 50.0)")

    def __call__(self, score, b, h, i, j, ctx):
        return self.cap * torch.tanh(score / self.cap)


@dataclass(frozen=True, eq=False)
class bias(ScoreMod):
    """Add a float tensor broadcastable to (B, Hq, Sq, Sk) (T5 / Swin relative bias); -inf = hard mask."""

    bias: Tensor

    def __post_init__(self):
        if not isinstance(self.bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor, got {type(self.bias).__name__}")
        if self.bias.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"bias dtype={self.bias.dtype}; it must be floating point: float16, bfloat16, float32 or "
                f"float64 (for a bool keep-mask use attnopt.masks.dense)"
            )

    def __call__(self, score, b, h, i, j, ctx):
        add = gather_tile(self.bias, ctx, b, h, i, j).to(score.dtype)
        # -inf is a hard mask even where the score overflowed to +inf (garbage in a masked-out key):
        # +inf + -inf would be NaN, and the where() also keeps gradients away from masked scores.
        return torch.where(add == float("-inf"), add, score + add)

    def check(self, ctx):
        return broadcast_problems("bias", self.bias, ctx)

    def __repr__(self) -> str:
        return f"bias(shape={tuple(self.bias.shape)})"


@dataclass(frozen=True, eq=False)
class custom(ScoreMod):
    """Any ``fn(score, b, h, i, j) -> score`` (FlexAttention ``score_mod`` signature, raw indices).

    Evaluated on whole tiles when it is elementwise, through torch.vmap when it is not (validation probes).
    """

    fn: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(
                f"custom score_mod needs a callable fn(score, b, h, i, j), got {type(self.fn).__name__}"
            )
        object.__setattr__(self, "_probed", {})  # MaskContext -> (problem, vmapped)

    def __call__(self, score, b, h, i, j, ctx):
        vmapped = any(v for _, v in self._probed.values())
        return elementwise_call(self.fn, (score, b, h, i, j), vmapped)

    def check(self, ctx):
        if ctx.B * ctx.Hq * ctx.Sq * ctx.Sk == 0:
            return []
        if ctx not in self._probed:
            self._probed[ctx] = probe_elementwise(
                self.fn, f"custom score_mod fn {self.fn!r}", ctx, score=True
            )
        problem = self._probed[ctx][0]
        return [problem] if problem else []

    def __repr__(self) -> str:
        return f"custom({getattr(self.fn, '__name__', repr(self.fn))})"


def grad_tensors(mods: tuple[ScoreMod, ...] | list[ScoreMod]) -> list[Tensor]:
    """Tensors of the modifiers that gradients can reach: each bias, each alibi's slopes, and the tensors
    a custom fn closes over that require grad (the one place that knows where modifiers keep them)."""
    found: list[Tensor] = []
    for mod in mods:
        if isinstance(mod, bias):
            found.append(mod.bias)
        elif isinstance(mod, alibi):
            found.append(mod.slopes)
        elif isinstance(mod, custom):
            cells = [c.cell_contents for c in (getattr(mod.fn, "__closure__", None) or ())]
            found += [t for t in cells if isinstance(t, Tensor) and t.requires_grad]
    return found
