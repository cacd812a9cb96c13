"""Edges: empty problems, argument checks for the tensors riding along (slopes, biases, sinks), custom
functions that are not elementwise, and torch.autocast.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import attnopt as ao
from attnopt import _dispatch
from attnopt import mods as am

BACKENDS = ("auto", "sdpa", "span", "blockwise", "reference")


# ----------------------------------------------------------------------------------- empty problems

EMPTY = {
    "B0": ((0, 4, 5, 8), (0, 2, 7, 8)),
    "H0": ((2, 0, 5, 8), (2, 0, 7, 8)),
    "Hq0": ((2, 0, 5, 8), (2, 2, 7, 8)),
    "Sq0": ((2, 4, 0, 8), (2, 2, 7, 8)),
    "Sk0": ((2, 4, 5, 8), (2, 2, 0, 8)),
    "Sk0_MHA": ((2, 2, 5, 8), (2, 2, 0, 8)),
    "all0": ((0, 0, 0, 8), (0, 0, 0, 8)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EMPTY))
@pytest.mark.parametrize("mask", [None, "causal", "padding"])
def test_empty_dims_return_empty_or_zero_outputs(name, backend, mask):
    (B, Hq, Sq, D), (_, Hkv, Sk, _) = EMPTY[name]
    q = torch.randn(B, Hq, Sq, D, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, D, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, D, requires_grad=True)
    kw = {"mask": {None: None, "causal": ao.causal(), "padding": ao.padding(torch.full((B,), Sk))}[mask]}
    want_lse = backend not in ("sdpa", "span")  # sdpa returns no LSE, span no gradient through it
    res = ao.attention(q, k, v, **kw, backend=backend, return_lse=want_lse)
    out, lse = res if want_lse else (res, None)
    assert out.shape == (B, Hq, Sq, D) and out.dtype == q.dtype
    assert (out == 0).all()
    if lse is not None:
        assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32 and (lse == float("-inf")).all()
    out.sum().backward()  # differentiable: zero gradients, as F.scaled_dot_product_attention gives
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()
    if Hq == Hkv:
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, k, v)
        assert ref.shape == out.shape and torch.equal(ref, out.detach())


def test_no_keys_with_sinks_gives_the_sink_as_lse():
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    out, lse = ao.attention(q, k, v, sinks=sinks, return_lse=True)
    assert (out == 0).all()
    assert torch.equal(lse, sinks.detach().view(1, 4, 1).expand(1, 4, 3))
    lse.sum().backward()
    assert torch.equal(sinks.grad, torch.full((4,), 3.0))


def test_empty_problem_still_checks_a_pinned_backend():
    q, k = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="sinks are not supported"):
        ao.attention(q, k, k, sinks=torch.zeros(2), backend="sdpa")
    assert "no backend runs: an empty problem" in ao.explain(q, k, k)


@pytest.mark.parametrize(
    ("q", "k", "v", "pattern"),
    [
        ((2, 4, 5, 0), (2, 2, 7, 0), (2, 2, 7, 8), r"q has head dim 0, shape \(2, 4, 5, 0\)"),
        ((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 0), r"v has head dim 0"),
        ((0, 4, 5, 0), (0, 2, 7, 0), (0, 2, 7, 8), r"q has head dim 0"),
    ],
)
def test_head_dim_zero_is_an_error_that_says_head_dim(q, k, v, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        ao.attention(torch.randn(q), torch.randn(k), torch.randn(v))
    assert "head dim" in str(info.value).split("HINT")[1]


# --------------------------------------------------------------- tensors riding along: device, dtype


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(inputs: object) -> None:
        raise AssertionError("a backend's forward() ran; validation should have failed first")

    for backend in _dispatch.PRIORITY:
        monkeypatch.setattr(backend, "forward", boom)


def _meta(*shape):
    return torch.zeros(*shape, device="meta")


RIDERS = [
    pytest.param(
        {"score_mod": am.alibi(_meta(4))},
        ValueError,
        r"alibi slopes are on meta but q is on cpu",
        id="slopes-meta",
    ),
    pytest.param(
        {"score_mod": am.bias(_meta(1, 4, 5, 7))},
        ValueError,
        r"bias is on meta but q is on cpu",
        id="bias-meta",
    ),
    pytest.param({"sinks": _meta(4)}, ValueError, r"sinks are on meta but q is on cpu", id="sinks-meta"),
    pytest.param(
        {"sinks": torch.zeros(4).to(torch.float8_e4m3fn)},
        TypeError,
        r"sinks must be a floating tensor",
        id="sinks-fp8",
    ),
    pytest.param(
        {"sinks": torch.zeros(4, dtype=torch.complex64)},
        TypeError,
        r"got torch\.complex64",
        id="sinks-complex",
    ),
    pytest.param(
        {"mask": ao.padding(torch.tensor([7, 3], device="meta"))},
        ValueError,
        r"padding kv_lengths are on meta: they hold no values",
        id="lengths-meta",
    ),
]


@pytest.mark.parametrize(("kwargs", "exc", "pattern"), RIDERS)
def test_riders_on_another_device_or_dtype_fail_before_compute(no_compute, kwargs, exc, pattern):
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    for fn in (ao.attention, ao.explain):
        with pytest.raises(exc, match=pattern) as info:
            fn(q, k, v, **kwargs)
        assert "HINT" in str(info.value)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: am.alibi(torch.ones(4).to(torch.float8_e5m2)),
            r"alibi slopes must be a floating-point tensor.*float8_e5m2",
        ),
        (
            lambda: am.bias(torch.ones(1, 4, 5, 7, dtype=torch.complex64)),
            r"bias dtype=torch\.complex64; it must be floating",
        ),
        (lambda: am.bias(torch.ones(3).to(torch.float8_e4m3fn)), r"bias dtype=torch\.float8_e4m3fn"),
    ],
)
def test_riders_with_unsupported_dtypes_fail_at_construction(make, pattern):
    with pytest.raises(TypeError, match=pattern):
        make()


# --------------------------------------------------------------------- functions not elementwise

TABLE = torch.randn(24, 24, generator=torch.Generator().manual_seed(5))


def _row_count_mask(b, h, i, j):
    """FlexAttention-style: keep j <= (number of positive entries in row i of a table), via .sum()."""
    return j <= (TABLE[i] > 0).sum()


def _row_sum_mod(score, b, h, i, j):
    return score + 0.1 * TABLE[i].sum() - 0.05 * TABLE[:, j].amax()


def _slice_mod(score, b, h, i, j):
    return score + TABLE[i, : j + 1].sum()  # slicing with an index tensor: no vmap either


def _item_mask(b, h, i, j):
    return j <= int(i)


def _truth(fn, score, B, H, Sq, Sk):
    """fn evaluated one scalar element at a time (FlexAttention's semantics), as a dense tensor."""
    vals = torch.empty(B, H, Sq, Sk, dtype=torch.bool if not score else torch.float32)
    for b, h, i, j in itertools.product(range(B), range(H), range(Sq), range(Sk)):
        idx = [torch.tensor(x) for x in (b, h, i, j)]
        vals[b, h, i, j] = fn(torch.tensor(0.0), *idx) if score else fn(*idx)
    return vals


@pytest.mark.parametrize("backend", ["auto", "blockwise", "reference", "sdpa", "span"])
def test_reducing_mask_mod_is_evaluated_per_element(backend):
    q, k, v = torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8)
    want = ao.attention(q, k, v, mask=_truth(_row_count_mask, False, 1, 2, 24, 24), backend="reference")
    got = ao.attention(q, k, v, mask=_row_count_mask, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "blockwise", "reference"])
def test_reducing_score_mod_is_evaluated_per_element_with_gradients(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g, requires_grad=True) for _ in range(3))
    add = _truth(_row_sum_mod, True, 1, 2, 24, 24)
    got = ao.attention(q, k, v, score_mod=_row_sum_mod, backend=backend)
    want = ao.attention(q, k, v, score_mod=am.bias(add), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    gg = torch.autograd.grad(got.square().sum(), (q, k, v))
    gw = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"score_mod": _slice_mod}, r"custom score_mod fn .*_slice_mod.* is not elementwise: .*torch\.vmap"),
        ({"mask": _item_mask}, r"custom mask fn .*_item_mask.* is not elementwise"),
    ],
)
def test_functions_neither_elementwise_nor_vmappable_are_rejected_clearly(no_compute, kwargs, pattern):
    q = torch.randn(1, 2, 24, 8)
    with pytest.raises(ValueError, match=pattern) as info:
        ao.attention(q, q, q, **kwargs)
    assert "HINT" in str(info.value)


def test_issue_reproducer_gathered_row_sum_was_silently_wrong():
    """A mask_mod summing over a gathered row was 0.48 off on whole tiles; it is now evaluated per element."""
    docs = torch.tensor([0] * 10 + [1] * 14)

    def same_doc_prefix(b, h, i, j):
        return (docs[i] == docs[j]) & (j < (docs <= docs[i]).sum() - 4)  # .sum() over a whole row

    q = torch.randn(1, 2, 24, 8, generator=torch.Generator().manual_seed(1))
    want = ao.attention(q, q, q, mask=_truth(same_doc_prefix, False, 1, 2, 24, 24), backend="reference")
    torch.testing.assert_close(ao.attention(q, q, q, mask=same_doc_prefix), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ autocast


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"mask": ao.causal()}, {"mask": ao.sliding_window(3)}], ids=["none", "causal", "window"]
)
def test_autocast_output_dtype_does_not_depend_on_the_backend(amp_dtype, kwargs):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=amp_dtype):
        want_dtype = F.scaled_dot_product_attention(q, k, v).dtype
        outs = {b: ao.attention(q, k, v, **kwargs, backend=b) for b in BACKENDS}
        assert f"cast to {amp_dtype}" in ao.explain(q, k, v, **kwargs)
    for b, out in outs.items():
        assert out.dtype == want_dtype == amp_dtype, b
        # the same as calling with inputs already in the autocast dtype, bitwise
        direct = ao.attention(*(t.detach().to(amp_dtype) for t in (q, k, v)), **kwargs, backend=b)
        assert torch.equal(out.detach(), direct), b
        out.float().sum().backward()
        assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
        q.grad = k.grad = v.grad = None


def test_autocast_leaves_float64_alone():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ao.attention(q, q, q, mask=ao.causal(), backend="blockwise").dtype == torch.float64


def test_backward_under_autocast_keeps_float32_math():
    """blockwise recomputes tiles in its backward: autocast must not turn those matmuls into bf16."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 33, 16, generator=g, dtype=torch.float32, requires_grad=True) for _ in range(3)
    )
    out = ao.attention(q, k, v, score_mod=am.softcap(5.0), backend="blockwise")
    want = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "fn",
    [lambda s, b, h, i, j: s.cummax(-1).values, lambda s, b, h, i, j: s.sort(-1).values],
    ids=["cummax", "sort"],
)
def test_row_reductions_that_are_the_identity_on_sorted_rows_are_caught(fn):
    """For one scalar score (FlexAttention's semantics) these are the identity; on a whole tile they
    reorder the row. The probe's scores are in no order, so they are caught and run through vmap."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 4, generator=g, dtype=torch.float64) for n in (3, 5, 5))
    want = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v
    torch.testing.assert_close(ao.attention(q, k, v, score_mod=fn), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: ao.sliding_window(2**64),
            r"sliding_window left=\d+ is too large; allowed: an int below 2\*\*62",
        ),
        (lambda: ao.prefix_lm(2**64), r"prefix_lm prefix_len=\d+ is too large"),
    ],
)
def test_huge_python_ints_are_value_errors(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_unrepresentable_scale_and_infinite_sinks_are_value_errors(no_compute):
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"must be finite and > 0"):
        ao.attention(q, q, q, scale=10**400)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"sinks hold NaN or \+inf at heads \[0\]"):
            ao.attention(q, q, q, sinks=torch.tensor([bad, 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_minus_inf_sink_is_no_sink(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    got = ao.attention(
        q, k, v, sinks=torch.full((2,), float("-inf")), backend="auto" if backend == "sdpa" else backend
    )
    torch.testing.assert_close(got, ao.attention(q, k, v, backend="reference"), rtol=1e-5, atol=1e-6)
