"""Test helpers: the one tolerance rule (style.md §7), input builders, readable ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import attnopt as ao
from attnopt.backends.reference import reference_attention

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class Shape:
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    Dv: int | None = None

    @property
    def dv(self) -> int:
        return self.Dv or self.D

    def __str__(self) -> str:
        dv = f"_Dv{self.Dv}" if self.Dv else ""
        return f"B{self.B}_H{self.Hq}_{self.Hkv}_Sq{self.Sq}_Sk{self.Sk}_D{self.D}{dv}"


LAYOUTS = (
    "contiguous",
    "transposed",
    "expanded",
    "transposed_last",
    "channels_last",
    "overlapping",
    "sliced",
)


def _storage_size(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    return 1 + sum((n - 1) * st for n, st in zip(size, stride))


def _overlap_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    """(B, H, S, D) strides whose memory overlaps itself: batch stride 1, heads D apart, rows H*D apart."""
    _, H, _, D = size
    return (1, D, H * D, 1)


def make_leaves(shape: Shape, dtype: torch.dtype, layout: str = "contiguous", seed: int = 0) -> list[Tensor]:
    """Leaf tensors q, k, v (requires_grad) whose views() have the requested layout (see views())."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Sq, Sk, D, Dv = shape.B, shape.Hq, shape.Hkv, shape.Sq, shape.Sk, shape.D, shape.dv
    full = [(B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv)]
    if layout == "expanded":  # one batch element and one kv head, broadcast by stride 0
        sizes = [(1, Hq, Sq, D), (1, 1, Sk, D), (1, 1, Sk, Dv)]
    elif layout == "transposed_last":  # (B, H, D, S) storage: the head dim has stride S
        sizes = [(b, h, d, s) for b, h, s, d in full]
    elif layout == "overlapping":  # one flat storage per tensor, read through self-overlapping strides
        sizes = [(_storage_size(f, _overlap_strides(f)),) for f in full]
    elif layout == "sliced":  # the middle third of a wider head dim, every other row of a longer sequence
        sizes = [(b, h, 2 * s, 3 * d) for b, h, s, d in full]
    else:
        sizes = full
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True) for s in sizes]


def views(leaves: list[Tensor], shape: Shape, layout: str) -> list[Tensor]:
    """q, k, v (B, H, S, D) views of the leaves in a layout (gradients flow back to the leaves):

    contiguous; transposed ((B, S, H, D) storage, how projections arrive); expanded (stride 0 over batch
    and kv heads); transposed_last (last-dim stride != 1); channels_last (torch.channels_last strides);
    overlapping (self-overlapping memory: batch stride 1); sliced (a slice of a wider head dim and a
    strided slice of a longer sequence).
    """
    if layout == "contiguous":
        return list(leaves)
    if layout == "transposed":
        return [x.transpose(1, 2).contiguous().transpose(1, 2) for x in leaves]
    if layout == "expanded":
        q, k, v = leaves
        return [
            q.expand(shape.B, -1, -1, -1),
            k.expand(shape.B, shape.Hkv, -1, -1),
            v.expand(shape.B, shape.Hkv, -1, -1),
        ]
    if layout == "transposed_last":
        return [x.transpose(-1, -2) for x in leaves]
    if layout == "channels_last":
        return [x.contiguous(memory_format=torch.channels_last) for x in leaves]
    if layout == "overlapping":
        fulls = [
            (shape.B, shape.Hq, shape.Sq, shape.D),
            (shape.B, shape.Hkv, shape.Sk, shape.D),
            (shape.B, shape.Hkv, shape.Sk, shape.dv),
        ]
        return [x.as_strided(f, _overlap_strides(f)) for x, f in zip(leaves, fulls)]
    if layout == "sliced":
        return [x[:, :, ::2, x.shape[-1] // 3 : 2 * x.shape[-1] // 3] for x in leaves]
    raise ValueError(layout)


def upcast(leaves: list[Tensor]) -> list[Tensor]:
    """float64 leaves holding exactly the same values (for the oracle)."""
    return [x.detach().double().requires_grad_(True) for x in leaves]


def rounding_floor(magnitude: float, dtype: torch.dtype) -> float:
    """Two units of rounding of `dtype` at `magnitude` (flash-attention's floor, without its sampling luck)."""
    return 2 * torch.finfo(dtype).eps * magnitude


def assert_close(
    name: str,
    got: Tensor | None,
    plain: Tensor | None,
    ref: Tensor | None,
    factor: float,
    magnitude: float = 0.0,
    n_sum: int = 1,
    slack: float = 1.0,
    zero_magnitude: float = 0.0,
) -> None:
    """got's error vs the float64 ref must be <= factor x plain's error + a rounding floor (style.md §7).

    The floor is the rounding error of got's dtype at the operands' magnitude: max(|ref|, `magnitude`),
    where callers pass max|v| for outputs and the largest gradient of the same backward pass for
    gradients (a gradient that is exactly 0 in float64 is still a sum of rounded O(magnitude) terms).
    For float64 the plain computation *is* the oracle, so its error is 0 and says nothing; there the
    floor is the classic worst-case rounding bound of a length-`n_sum` sum, n_sum * eps * magnitude.
    When the float64 gradient is identically 0 (every row sees one key, so P = 1 exactly), the plain
    computation is exactly 0 too and says nothing; a recomputing backward still sums rounded terms of
    size `zero_magnitude` (scale·|q|·|dO|·|v|), so that is the floor's magnitude there.
    `slack` > 1 is only for classifying a known, documented deviation (see test_attention.py), never
    for making a check pass.
    """
    if ref is None:
        assert got is None or not bool(got.abs().max() > 0), f"{name}: expected no/zero gradient"
        return
    assert got is not None, f"{name}: missing (expected a tensor like {tuple(ref.shape)})"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != expected {tuple(ref.shape)}"
    ref64 = ref.detach().double()
    finite = torch.isfinite(ref64)
    # Infinite reference entries (lse = -inf of empty rows) must match exactly.
    bad_inf = (~finite) & (got.detach().double() != ref64)
    assert not bool(bad_inf.any()), f"{name}: non-finite entries differ at {bad_inf.nonzero()[:5].tolist()}"
    g = torch.where(finite, got.detach().double(), 0.0)
    p = torch.where(finite, plain.detach().double(), 0.0) if plain is not None else g
    r = torch.where(finite, ref64, 0.0)
    assert not bool(torch.isnan(g).any()), f"{name}: NaN at {torch.isnan(g).nonzero()[:5].tolist()}"
    err = (g - r).abs()
    err_plain = float((p - r).abs().max())
    if zero_magnitude and not bool(r.any()):
        magnitude = max(magnitude, zero_magnitude)
    floor = rounding_floor(max(float(r.abs().max()), magnitude), got.dtype)
    if got.dtype == torch.float64:
        floor *= max(n_sum / 2, 1)
    bound = slack * (factor * err_plain + floor)
    worst = float(err.max())
    if worst > bound:
        idx = tuple(int(x) for x in torch.nonzero(err == err.max())[0])
        raise AssertionError(
            f"{name}: max error {worst:.3e} > {factor} x plain {err_plain:.3e} + floor {floor:.1e} = {bound:.3e}; "
            f"worst at {idx}: got {float(g[idx]):.6g}, ref {float(r[idx]):.6g}, plain {float(p[idx]):.6g}"
        )


def run_and_grads(fn, leaves, sinks, do, dl=None):
    """Forward through fn(), backward with upstream gradients do (and dl for the LSE, when fn returns
    one and dl is given; rows with an infinite LSE take none); returns (out, lse, grads)."""
    for t in [*leaves, sinks]:
        if t is not None:
            t.grad = None
    res = fn()
    out, lse = res if isinstance(res, tuple) else (res, None)
    loss = (out * do.to(out.dtype)).sum()
    if lse is not None and dl is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse * dl.to(lse.dtype), 0.0).sum()
    loss.backward()
    grads = [None if t is None or t.grad is None else t.grad.clone() for t in [*leaves, sinks]]
    return out.detach(), None if lse is None else lse.detach(), grads


def oracle(views_: list[Tensor], kwargs: dict, compute_dtype: torch.dtype | None = None):
    """reference_attention on the views with attention()-style kwargs; returns (out, lse)."""
    q, k, v = views_
    inputs = ao.api.validate(q, k, v, **kwargs, backends=["reference"])
    out, lse, _ = reference_attention(
        q,
        k,
        v,
        mask=inputs.mask,
        mods=inputs.mods,
        similarity=inputs.similarity,
        scale=inputs.scale,
        sinks=inputs.sinks,
        compute_dtype=compute_dtype,
    )
    return out, lse
