"""Forward and backward of every backend against the float64 oracle, over the awkward grid."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

import attnopt as ao
from attnopt import _dispatch
from attnopt import mods as am
from tests._oracle import DTYPE_NAMES, Shape, assert_close, make_leaves, oracle, run_and_grads, upcast, views

ALL = ("sdpa", "span", "blockwise", "reference")  # variants torch's fused kernel can run
SPAN = ("span", "blockwise", "reference")  # additive modifiers / sinks: span merges them, SDPA cannot
BW = ("blockwise", "reference")  # non-additive modifiers, euclidean


def _cuts(S: int, g: torch.Generator, n: int = 3) -> list[int]:
    """cu_seqlens of n documents (some possibly empty) packed into S positions."""
    inner = sorted(torch.randint(0, S + 1, (n - 1,), generator=g).tolist())
    return [0, *inner, S]


def _docs(s: Shape, g: torch.Generator):
    cq = _cuts(s.Sq, g)
    return ao.document(cq) if s.Sq == s.Sk else ao.document(cq, _cuts(s.Sk, g))


def _lengths(s: Shape, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(0, s.Sk + 1, (s.B,), generator=g)
    lengths[0] = s.Sk  # one full row of keys ...
    if s.B > 1:
        lengths[-1] = 0  # ... and one batch element with no keys at all (fully masked rows)
    return lengths


def _dense(s: Shape, g: torch.Generator) -> torch.Tensor:
    m = torch.rand(s.B, 1, s.Sq, s.Sk, generator=g) > 0.3
    m[:, :, 0] = False  # a fully masked row
    return m


def _bias(s: Shape, g: torch.Generator) -> torch.Tensor:
    t = torch.randn(1, s.Hq, s.Sq, s.Sk, generator=g)
    t[torch.rand(t.shape, generator=g) < 0.2] = float("-inf")  # -inf entries are hard masks
    return t


# name -> (kwargs builder, backends that must run it)
Builder = Callable[[Shape, torch.Generator], dict]
VARIANTS: dict[str, tuple[Builder, tuple[str, ...]]] = {
    "none": (lambda s, g: {}, ALL),
    "causal": (lambda s, g: {"mask": ao.causal()}, ALL),
    "causal_topleft": (lambda s, g: {"mask": ao.causal("top_left")}, ALL),
    "window_16": (lambda s, g: {"mask": ao.sliding_window(16)}, ALL),
    "window_5_3_topleft": (lambda s, g: {"mask": ao.sliding_window(5, 3, align="top_left")}, ALL),
    "causal_and_window": (lambda s, g: {"mask": ao.causal() & ao.sliding_window(16)}, ALL),
    "document": (lambda s, g: {"mask": _docs(s, g)}, ALL),
    "document_and_causal": (lambda s, g: {"mask": _docs(s, g) & ao.causal()}, ALL),
    "prefix_lm_7": (lambda s, g: {"mask": ao.prefix_lm(7)}, ALL),
    "padding": (lambda s, g: {"mask": ao.padding(_lengths(s, g))}, ALL),
    "padding_and_causal": (lambda s, g: {"mask": ao.padding(_lengths(s, g)) & ao.causal()}, ALL),
    "dense": (lambda s, g: {"mask": _dense(s, g)}, ALL),
    "custom_mask": (lambda s, g: {"mask": ao.custom(lambda b, h, i, j: (i + j + h) % 3 != 0)}, ALL),
    "window_or_prefix": (lambda s, g: {"mask": ao.sliding_window(4) | ao.prefix_lm(3)}, ALL),
    "bias": (lambda s, g: {"score_mod": am.bias(_bias(s, g))}, ALL),
    "bias_and_causal": (lambda s, g: {"score_mod": am.bias(_bias(s, g)), "mask": ao.causal()}, ALL),
    "alibi_causal": (lambda s, g: {"mask": ao.causal(), "score_mod": am.alibi(am.alibi_slopes(s.Hq))}, SPAN),
    "softcap_causal": (lambda s, g: {"mask": ao.causal(), "score_mod": am.softcap(2.0)}, BW),
    "custom_mod": (lambda s, g: {"score_mod": lambda sc, b, h, i, j: sc * 0.5 + 0.1 * (h - j % 3)}, BW),
    "alibi_then_softcap": (
        lambda s, g: {"score_mod": [am.alibi(am.alibi_slopes(s.Hq)), am.softcap(3.0)]},
        BW,
    ),
    "sinks": (lambda s, g: {"sinks": torch.randn(s.Hq, generator=g)}, SPAN),
    "sinks_window": (
        lambda s, g: {"sinks": torch.randn(s.Hq, generator=g), "mask": ao.sliding_window(8)},
        SPAN,
    ),
    "sinks_causal": (lambda s, g: {"sinks": torch.randn(s.Hq, generator=g), "mask": ao.causal()}, SPAN),
    "cosine": (lambda s, g: {"similarity": "cosine", "scale": 4.0}, ALL),
    "euclidean": (lambda s, g: {"similarity": "euclidean"}, BW),
    "scale_0.3": (lambda s, g: {"scale": 0.3}, ALL),
}

FAST_SHAPES = [
    Shape(2, 6, 2, 113, 203, 40),  # GQA 3:1, Sq < Sk
    Shape(1, 4, 4, 17, 17, 64),  # square
    Shape(2, 8, 1, 1, 257, 32),  # decode, MQA
    Shape(1, 3, 3, 255, 128, 37, Dv=24),  # Sq > Sk, odd head dim, Dv != D
]
SEQS = [1, 17, 113, 255, 256, 257, 1023]
HEAD_DIMS = [32, 40, 64, 80, 128, 37]
RATIOS = [(8, 8), (8, 4), (6, 2), (8, 1)]


def _exhaustive_shapes() -> list[Shape]:
    out = []
    for n, (sq, sk) in enumerate(itertools.product(SEQS, SEQS)):
        hq, hkv = RATIOS[n % len(RATIOS)]
        d = HEAD_DIMS[n % len(HEAD_DIMS)]
        out.append(Shape(1 + n % 2, hq, hkv, sq, sk, d, Dv=None if n % 3 else 48))
    return out


def _cases(shapes, dtypes, layouts, marks=()):
    for shape, dtype, layout, (vname, (_, backends)) in itertools.product(
        shapes, dtypes, layouts, VARIANTS.items()
    ):
        for backend in backends:
            if backend == "span" and shape.dv != shape.D:
                continue  # the fused CPU kernel needs Dv == D (span declines; tested in capabilities)
            case_id = f"{backend}-{DTYPE_NAMES[dtype]}-{vname}-{shape}" + (
                "" if layout == "contiguous" else f"-{layout}"
            )
            yield pytest.param(backend, vname, shape, dtype, layout, id=case_id, marks=marks)


# The compiled 'flex' backend: one compile per structure (dtype, head dims, heads, mask and modifier
# kinds: ~3-5 s apiece with a cold Inductor cache), so one shape. By default the masks and modifiers
# with a predicate or score_mod of their own (compositions cover their leaves; test_flex.py runs causal,
# windows, prefix-LM, softcap) in fp32 and one in bf16; the exhaustive run adds every variant flex runs
# on CPU (no sinks: they need the LSE Flex's CPU kernel does not return) in fp32 and bf16.
FLEX_VARIANTS = [n for n in VARIANTS if not n.startswith("sinks")]
FLEX_DEFAULT = {
    torch.float32: [
        "document_and_causal", "padding_and_causal", "dense", "custom_mask", "window_or_prefix",
        "bias_and_causal", "alibi_causal", "custom_mod", "euclidean",
    ],
    torch.bfloat16: ["softcap_causal"],
}  # fmt: skip


def _flex_cases():
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for vname in FLEX_VARIANTS:
            marks = () if vname in FLEX_DEFAULT[dtype] else pytest.mark.exhaustive
            yield pytest.param(
                "flex", vname, FAST_SHAPES[0], dtype, "contiguous", id=f"flex-{name}-{vname}", marks=marks
            )


FAST = [
    *_flex_cases(),
    *_cases(FAST_SHAPES, [torch.float32], ["contiguous"]),
    *_cases(FAST_SHAPES, [torch.bfloat16, torch.float16], ["contiguous"]),
    *_cases(FAST_SHAPES[1:2], [torch.float64], ["contiguous"]),
    *_cases(FAST_SHAPES[:1], [torch.float32, torch.bfloat16], ["transposed", "expanded"]),
]
EXHAUSTIVE = list(
    _cases(
        _exhaustive_shapes(), [torch.float32, torch.bfloat16], ["contiguous"], marks=pytest.mark.exhaustive
    )
)


def check_against_oracle(backend: str, vname: str, shape: Shape, dtype: torch.dtype, layout: str) -> None:
    """Forward (out, lse) and backward (dq, dk, dv, dsinks) vs float64, by the one tolerance rule."""
    builder, _ = VARIANTS[vname]
    kwargs = builder(shape, torch.Generator().manual_seed(1))
    sinks = kwargs.pop("sinks", None)
    leaves = make_leaves(shape, dtype, layout)
    leaves64 = upcast(leaves)
    sinks_l = None if sinks is None else sinks.to(dtype).requires_grad_(True)
    sinks64 = None if sinks_l is None else sinks_l.detach().double().requires_grad_(True)
    want_lse = _dispatch.BACKENDS[backend].supports_lse and backend != "flex"  # flex on CPU: no LSE
    do = torch.randn(shape.B, shape.Hq, shape.Sq, shape.dv, generator=torch.Generator().manual_seed(2))
    # Every backend that returns the LSE also differentiates it (ring attention merges partial results
    # by their LSE and backpropagates through it): the loss takes both outputs when there is an LSE.
    dl = (
        torch.randn(shape.B, shape.Hq, shape.Sq, generator=torch.Generator().manual_seed(3))
        if want_lse
        else None
    )

    def got_fn(return_lse):
        return ao.attention(
            *views(leaves, shape, layout), **kwargs, sinks=sinks_l, return_lse=return_lse, backend=backend
        )

    got = run_and_grads(lambda: got_fn(want_lse), leaves, sinks_l, do, dl)
    plain = run_and_grads(
        lambda: oracle(views(leaves, shape, layout), {**kwargs, "sinks": sinks_l}, compute_dtype=dtype),
        leaves,
        sinks_l,
        do,
        dl,
    )
    ref = run_and_grads(
        lambda: oracle(views(leaves64, shape, layout), {**kwargs, "sinks": sinks64}),
        leaves64,
        sinks64,
        do,
        dl,
    )

    assert got[0].dtype == dtype and got[0].shape == (shape.B, shape.Hq, shape.Sq, shape.dv)
    n_sum = shape.D + max(shape.Sq, shape.Sk) * (shape.Hq // shape.Hkv)  # longest sum behind any output
    assert_close(
        "out", got[0], plain[0], ref[0], 2, magnitude=float(leaves64[2].detach().abs().max()), n_sum=n_sum
    )
    if want_lse:
        assert got[1] is not None and got[1].dtype == (
            torch.float64 if dtype == torch.float64 else torch.float32
        )
        assert_close("lse", got[1], plain[1], ref[1], 2, n_sum=n_sum)
    grad_scale = max(float(r.abs().max()) for r in ref[2] if r is not None)
    q64, k64, v64 = (t.detach() for t in leaves64)
    scale = kwargs.get("scale", shape.D**-0.5)
    # Size of the rounded terms behind a gradient that is exactly 0 in float64: ds ~ |dO||v|, times
    # d score / d q (or k): scale·|k| (or |q|) for dot, 2·scale·|q - k| <= 4·scale·max(|q|, |k|) for euclidean.
    qk = max(float(q64.norm(dim=-1).max()), float(k64.norm(dim=-1).max()))
    terms = scale * qk * float(do.norm(dim=-1).max() * v64.norm(dim=-1).max())
    if kwargs.get("similarity") == "euclidean":
        terms *= 4
    known = []
    for name, g, p, r in zip(["dq", "dk", "dv", "dsinks"], got[2], plain[2], ref[2]):
        try:
            assert_close(name, g, p, r, 3, magnitude=grad_scale, n_sum=n_sum, zero_magnitude=terms)
        except AssertionError as e:
            if not (backend in ("sdpa", "span") and dtype == torch.float32):  # both run that kernel
                raise
            # torch's fused CPU kernel evaluates exp with a 2-ULP approximation (exp_u20, pytorch PR
            # #115151) and recomputes P = exp(s - lse) in its backward, so at logits >~ 10 its fp32
            # gradients reach ~4x the plain fp32 error. Within 2x the rule's bound that is this known
            # kernel property (reported as xfail, visible in the summary); beyond it, a real bug.
            assert_close(name, g, p, r, 3, magnitude=grad_scale, n_sum=n_sum, zero_magnitude=terms, slack=2.0)
            known.append(str(e))
    if known:
        pytest.xfail("torch CPU flash kernel exp_u20 (pytorch#115151): " + " | ".join(known))


@pytest.mark.parametrize(("backend", "variant", "shape", "dtype", "layout"), FAST + EXHAUSTIVE)
def test_matches_oracle(backend, variant, shape, dtype, layout):
    check_against_oracle(backend, variant, shape, dtype, layout)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_capabilities_and_auto_choice(variant):
    """sdpa runs exactly the variants it declares; auto never routes to the reference what another runs."""
    shape = FAST_SHAPES[0]
    builder, backends = VARIANTS[variant]
    q, k, v = views(make_leaves(shape, torch.float32), shape, "contiguous")
    kwargs = builder(shape, torch.Generator().manual_seed(1))
    inputs = ao.api.validate(q, k, v, **kwargs, backends=list(_dispatch.BACKENDS))
    for name in ("sdpa", "span"):
        refusals = _dispatch.BACKENDS[name].not_supported_reasons(inputs)
        assert (not refusals) == (name in backends), (name, refusals)
    reasons = _dispatch.BACKENDS["sdpa"].not_supported_reasons(inputs)
    chosen = _dispatch.select(inputs).name
    assert chosen != "reference", "auto must not route to the O(Sq·Sk) oracle what a faster backend runs"
    if _dispatch.BACKENDS["sdpa"].rank(inputs) == 0 and not reasons:
        assert chosen == "sdpa", "natively supported variants run on torch's fused kernel"
    if reasons:
        with pytest.raises(NotImplementedError, match="backend='sdpa' cannot run"):
            ao.attention(q, k, v, **kwargs, backend="sdpa")


@pytest.mark.parametrize("backend", ["span", "blockwise", "reference"])
@pytest.mark.parametrize(("align", "shift"), [("top_left", 64), ("bottom_right", -40), ("top_left", -200)])
def test_alibi_shift_is_a_moved_query_position(backend, align, shift):
    """alibi(shift=s) adds -slope·|p + s - j|: the same scores as the explicit bias, on every backend."""
    g = torch.Generator().manual_seed(4)
    H, Sq, Sk = 4, 48, 80
    q, k, v = (torch.randn(1, H, n, 16, generator=g) for n in (Sq, Sk, Sk))
    slopes = am.alibi_slopes(H)
    p = torch.arange(Sq).view(-1, 1) + (0 if align == "top_left" else Sk - Sq) + shift
    bias = -(slopes.view(1, H, 1, 1) * (p - torch.arange(Sk).view(1, -1)).abs())
    got = ao.attention(q, k, v, score_mod=am.alibi(slopes, align=align, shift=shift), backend=backend)
    want = ao.attention(
        q.double(), k.double(), v.double(), score_mod=am.bias(bias.double()), backend="reference"
    )
    assert (got.double() - want).abs().max() < 2e-6
    with pytest.raises(TypeError, match="alibi shift must be an int"):
        am.alibi(slopes, shift=1.5)
