"""Any strides, exactly: every backend on transposed-last-dim, channels-last, self-overlapping and sliced
views (and the common layouts), forward and backward, against the float64 oracle.

torch's fused CPU kernels misread some of these layouts (garbage or NaN: tests below reproduce the
reported cases); attention() copies exactly those tensors before such a kernel and nothing else.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import attnopt as ao
from attnopt._inputs import kernel_layout_problem
from tests._oracle import DTYPE_NAMES, LAYOUTS, Shape, make_leaves, views
from tests.test_attention import VARIANTS, check_against_oracle

ODD = ("transposed_last", "channels_last", "overlapping", "sliced")
COMMON = ("contiguous", "transposed", "expanded", "sliced")
SHAPE = Shape(2, 4, 2, 45, 61, 16)  # GQA 2:1, Sq < Sk
DECODE = Shape(2, 8, 2, 1, 77, 16)
STRIDE_VARIANTS = (
    "none",
    "causal",
    "window_16",
    "padding_and_causal",
    "document",
    "bias",
    "alibi_causal",
    "softcap_causal",
    "sinks_window",
)


def _cases(shape, dtypes, layouts, variants, marks=()):
    for dtype, layout, vname in itertools.product(dtypes, layouts, variants):
        for backend in VARIANTS[vname][1]:
            case_id = f"{backend}-{DTYPE_NAMES[dtype]}-{vname}-{shape}-{layout}"
            yield pytest.param(backend, vname, shape, dtype, layout, id=case_id, marks=marks)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FAST = [
    *_cases(SHAPE, DTYPES, ODD, STRIDE_VARIANTS),
    *_cases(DECODE, [torch.float32, torch.bfloat16], ODD, ("none", "padding", "causal")),
]
EXHAUSTIVE = list(_cases(SHAPE, DTYPES, ODD, tuple(VARIANTS), marks=pytest.mark.exhaustive))


@pytest.mark.parametrize(("backend", "variant", "shape", "dtype", "layout"), FAST + EXHAUSTIVE)
def test_any_strides_match_oracle(backend, variant, shape, dtype, layout):
    check_against_oracle(backend, variant, shape, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_misread_layouts_are_copied(layout):
    """Common layouts reach the fused kernels as they are; the others are copied, and explain() says so."""
    q, k, v = views(make_leaves(SHAPE, torch.float32, layout), SHAPE, layout)
    problems = [kernel_layout_problem(t) for t in (q, k, v)]
    text = ao.explain(q, k, v, mask=ao.sliding_window(8))
    if layout in COMMON:
        assert problems == [None, None, None]
        assert "copied" not in text
    else:
        assert all(problems)
        assert "-> runs on 'sdpa'" in text  # a fused kernel: the copies show on its line
        assert "q copied to a contiguous layout" in text and "v copied" in text, text


@pytest.mark.parametrize("backend", ["auto", "sdpa", "span", "blockwise", "reference"])
def test_transposed_last_dim_is_exact_regression(backend):
    """Issue reproducer: last-dim stride != 1 gave 3372 NaN (max error 2.5e38) on auto -> span."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 64, 1024, generator=g).transpose(-1, -2) for _ in range(3))
    kw = {"mask": ao.sliding_window(128), "backend": backend}
    got = ao.attention(q, k, v, **kw)
    want = ao.attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    assert torch.equal(got, want)  # the same kernel on the same values: bitwise


@pytest.mark.parametrize("backend", ["auto", "sdpa", "span", "blockwise", "reference"])
def test_self_overlapping_query_is_exact_regression(backend):
    """Issue reproducer: a batch stride of 1 (memory overlapping itself) was off by 4.5 on auto/sdpa/span."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9000, generator=g).as_strided((2, 3, 45, 16), (1, 16, 192, 1), 97)
    k, v = torch.randn(2, 3, 45, 16, generator=g), torch.randn(2, 3, 45, 16, generator=g)
    got = ao.attention(q, k, v, mask=ao.causal(), backend=backend)
    want = ao.attention(q.contiguous(), k, v, mask=ao.causal(), backend=backend)
    assert torch.equal(got, want)


def test_head_dim_broadcast_by_stride_zero():
    """A last dim of stride 0 (one value broadcast over the head dim) is misread by the kernel too."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 33, 1, generator=g).expand(1, 2, 33, 16)
    k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    assert kernel_layout_problem(q) == "last-dim stride 0 != 1"
    for backend in ("sdpa", "span", "blockwise"):
        got = ao.attention(q, k, v, mask=ao.sliding_window(4), backend=backend)
        want = ao.attention(q.contiguous(), k, v, mask=ao.sliding_window(4), backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
