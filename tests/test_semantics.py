"""The contract of design.md §1, checked independently of the library's own code paths.

* A textbook oracle written with Python floats and loops checks the float64 reference itself.
* Edge semantics: fully masked rows, huge logits, the GQA head mapping, sinks and their LSE, dropout.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnopt as ao
from attnopt import mods as am
from tests._oracle import Shape, assert_close, make_leaves, oracle, upcast

BACKENDS = ["sdpa", "span", "blockwise", "reference"]


def textbook(q, k, v, *, keep, scale, mods=(), sinks=None, sim="dot"):
    """out[b][h][i][:] and lse[b][h][i] with Python floats: scores, mask, softmax (+sink), weighted sum."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    out = [[[[0.0] * Dv for _ in range(Sq)] for _ in range(Hq)] for _ in range(B)]
    lse = [[[-math.inf] * Sq for _ in range(Hq)] for _ in range(B)]
    for b in range(B):
        for h in range(Hq):
            g = h // G  # the GQA mapping of design.md §1
            for i in range(Sq):
                scores = {}
                for j in range(Sk):
                    qi, kj = q[b, h, i].tolist(), k[b, g, j].tolist()
                    if sim == "dot":
                        s = sum(a * c for a, c in zip(qi, kj))
                    elif sim == "cosine":
                        nq, nk = math.sqrt(sum(a * a for a in qi)), math.sqrt(sum(c * c for c in kj))
                        s = sum(a * c for a, c in zip(qi, kj)) / (nq * nk)
                    else:
                        s = -sum((a - c) ** 2 for a, c in zip(qi, kj))
                    s *= scale
                    for mod in mods:
                        s = mod(s, b, h, i, j)
                    if keep(b, h, i, j):
                        scores[j] = s
                terms = {j: math.exp(s) for j, s in scores.items()}
                z = sum(terms.values()) + (math.exp(sinks[h]) if sinks is not None else 0.0)
                if z == 0.0:
                    continue  # a fully masked row: out 0, lse -inf
                lse[b][h][i] = math.log(z)
                for j, t in terms.items():
                    for d in range(Dv):
                        out[b][h][i][d] += t / z * float(v[b, g, j, d])
    return torch.tensor(out, dtype=torch.float64), torch.tensor(lse, dtype=torch.float64)


def _qkv(B=2, Hq=4, Hkv=2, Sq=3, Sk=5, D=3, Dv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64),
        torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64),
        torch.randn(B, Hkv, Sk, Dv, generator=g, dtype=torch.float64),
    )


TEXTBOOK_CASES = {
    # name: (Sq, Sk, attnopt kwargs, keep(b, h, i, j) with p = i + Sk - Sq, textbook mods, sinks, sim)
    "causal_bottomright_Sq<Sk": (3, 5, {"mask": ao.causal()}, lambda b, h, i, j: j <= i + 2, (), None, "dot"),
    "causal_bottomright_Sq>Sk": (5, 3, {"mask": ao.causal()}, lambda b, h, i, j: j <= i - 2, (), None, "dot"),
    "causal_topleft_Sq<Sk": (3, 5, {"mask": ao.causal("top_left")}, lambda b, h, i, j: j <= i, (), None, "dot"),
    "window_1_1": (4, 4, {"mask": ao.sliding_window(1, 1)}, lambda b, h, i, j: abs(i - j) <= 1, (), None, "dot"),
    "prefix_2": (4, 6, {"mask": ao.prefix_lm(2)}, lambda b, h, i, j: j < 2 or j <= i + 2, (), None, "dot"),
    "padding": (3, 4, {"mask": ao.padding([4, 1])}, lambda b, h, i, j: j < [4, 1][b], (), None, "dot"),
    "document": (5, 5, {"mask": ao.document([0, 2, 2, 5])}, lambda b, h, i, j: (i < 2) == (j < 2), (), None, "dot"),
    "alibi": (
        3, 5, {"score_mod": am.alibi(torch.tensor([0.5, 0.25, 0.125, 1.0]))},
        lambda b, h, i, j: True, (lambda s, b, h, i, j: s - [0.5, 0.25, 0.125, 1.0][h] * abs(i + 2 - j),), None, "dot",
    ),
    "softcap_causal": (
        4, 4, {"mask": ao.causal(), "score_mod": am.softcap(0.7)},
        lambda b, h, i, j: j <= i, (lambda s, b, h, i, j: 0.7 * math.tanh(s / 0.7),), None, "dot",
    ),
    "sinks_window": (
        4, 4, {"mask": ao.sliding_window(1), "sinks": torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64)},
        lambda b, h, i, j: i - 1 <= j <= i, (), [0.3, -1.0, 2.0, 0.0], "dot",
    ),
    "sinks_fully_masked_row": (
        3, 3, {"mask": ao.padding([3, 0]), "sinks": torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64)},
        lambda b, h, i, j: b == 0, (), [0.3, -1.0, 2.0, 0.0], "dot",
    ),
    "cosine": (3, 5, {"similarity": "cosine", "scale": 3.0}, lambda b, h, i, j: True, (), None, "cosine"),
    "euclidean": (3, 5, {"similarity": "euclidean"}, lambda b, h, i, j: True, (), None, "euclidean"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TEXTBOOK_CASES))
def test_reference_matches_textbook_loops(case):
    Sq, Sk, kwargs, keep, mods, sinks, sim = TEXTBOOK_CASES[case]
    q, k, v = _qkv(Sq=Sq, Sk=Sk)
    scale = kwargs.get("scale", 1 / math.sqrt(q.shape[-1]))
    want_out, want_lse = textbook(q, k, v, keep=keep, scale=scale, mods=mods, sinks=sinks, sim=sim)
    out, lse = ao.attention(q, k, v, **kwargs, return_lse=True, backend="reference")
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
    if (
        "sdpa" in ao.available_backends()
        and not ({"sinks", "score_mod"} & kwargs.keys())
        and sim != "euclidean"
    ):
        torch.testing.assert_close(
            ao.attention(q, k, v, **kwargs, backend="sdpa"), want_out, rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("how", ["padding_len0", "dense_row", "causal_Sq_gt_Sk", "bias_all_neg_inf"])
def test_fully_masked_rows_are_zero_with_zero_grads(backend, dtype, how):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 6, 4, 8
    q, k, v = (t.to(dtype).requires_grad_(True) for t in _qkv(B, Hq, Hkv, Sq, Sk, D, D))
    empty = torch.zeros(B, Hq, Sq, dtype=torch.bool)  # (b, h, i) rows that see no key
    kwargs: dict = {}
    if how == "padding_len0":
        kwargs["mask"] = ao.padding([Sk, 0])
        empty[1] = True
    elif how == "dense_row":
        m = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
        m[0, 0, 2] = False
        kwargs["mask"] = m
        empty[0, :, 2] = True
    elif how == "causal_Sq_gt_Sk":
        kwargs["mask"] = ao.causal()  # bottom-right: query i sees j <= i - 2, rows 0 and 1 see nothing
        empty[:, :, :2] = True
    else:
        bias = torch.zeros(1, Hq, Sq, Sk)
        bias[0, 1, 3] = float("-inf")
        kwargs["score_mod"] = am.bias(bias)
        empty[:, 1, 3] = True
    want_lse = backend == "reference"
    res = ao.attention(q, k, v, **kwargs, backend=backend, return_lse=want_lse)
    out, lse = res if want_lse else (res, None)
    assert torch.isfinite(out).all()
    assert (out[empty] == 0).all(), "a fully masked row must give exactly 0"
    assert (out[~empty].abs().sum(-1) > 0).all()
    if lse is not None:
        assert (lse[empty] == float("-inf")).all() and torch.isfinite(lse[~empty]).all()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all(), "no NaN/inf gradients"
    assert (q.grad[empty] == 0).all(), "empty rows get zero dq"
    if how == "padding_len0":  # batch element 1 sees no key at all: its k and v get no gradient either
        assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "amp"), [(torch.float32, 300.0), (torch.bfloat16, 100.0), (torch.float16, 30.0)]
)
def test_huge_logits_stay_finite_and_exact(backend, dtype, amp):
    shape = Shape(1, 2, 2, 33, 33, 16)
    leaves = [t.detach() * (amp if n < 2 else 1) for n, t in enumerate(make_leaves(shape, dtype))]
    kwargs = {"mask": ao.causal()}
    got = ao.attention(*leaves, **kwargs, backend=backend)
    assert torch.isfinite(got).all()
    plain, _ = oracle(leaves, kwargs, compute_dtype=dtype)
    ref, _ = oracle(upcast(leaves), kwargs)
    assert_close("out", got, plain, ref, 2, magnitude=float(leaves[2].abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("Hq", "Hkv"), [(6, 2), (8, 1), (6, 3), (4, 4)])
def test_gqa_head_h_uses_kv_head_h_div_group(backend, Hq, Hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, Hq, 7, 16, generator=g)
    k, v = torch.randn(2, Hkv, 9, 16, generator=g), torch.randn(2, Hkv, 9, 16, generator=g)
    out = ao.attention(q, k, v, mask=ao.causal(), backend=backend)
    G = Hq // Hkv
    for h in range(Hq):
        kv = slice(h // G, h // G + 1)
        one = ao.attention(q[:, h : h + 1], k[:, kv], v[:, kv], mask=ao.causal(), backend=backend)
        torch.testing.assert_close(out[:, h : h + 1], one, rtol=0, atol=1e-6)


def test_sinks_gradcheck_and_lse_includes_sink():
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 2, 1, 3, 4, 3, 2))
    sinks = torch.tensor([0.5, -0.5], dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, sinks):
        return ao.attention(
            q,
            k,
            v,
            mask=ao.sliding_window(1),
            sinks=sinks,
            score_mod=am.softcap(1.5),
            return_lse=True,
            backend="reference",
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks))
    _, lse = fn(q, k, v, sinks)
    _, lse_no_sink = ao.attention(
        q, k, v, mask=ao.sliding_window(1), score_mod=am.softcap(1.5), return_lse=True
    )
    torch.testing.assert_close(lse, torch.logaddexp(lse_no_sink, sinks.view(1, 2, 1)))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "span"])  # span declines dropout
def test_dropout_is_reproducible_and_unbiased(backend):
    q, k, v = (t.float() for t in _qkv(1, 2, 2, 4, 6, 8, 3))
    exact = ao.attention(q, k, v, backend=backend)
    torch.manual_seed(123)
    a = ao.attention(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(123)
    b = ao.attention(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(124)
    c = ao.attention(q, k, v, dropout_p=0.3, backend=backend)
    assert torch.equal(a, b), "same seed -> same dropout pattern"
    assert not torch.equal(a, c) and not torch.equal(a, exact)
    torch.testing.assert_close(ao.attention(q, k, v, dropout_p=0.0, backend=backend), exact, rtol=0, atol=0)
    # Inverted dropout is unbiased: E[out] = exact. With weights p and keep-prob 1-r, one sample has
    # variance sum_j p_j^2 v_j^2 r / (1 - r); the mean of N samples is within 5 standard errors.
    torch.manual_seed(0)
    N, r = 400, 0.3
    mean = torch.stack([ao.attention(q, k, v, dropout_p=r, backend=backend) for _ in range(N)]).mean(0)
    _, _, p = ao.backends.reference.reference_attention(q, k, v)  # (B, H, Sq, Sk); GQA 1:1 here
    var = torch.einsum("bhij,bhjd->bhid", p.square(), v.square()) * r / (1 - r)
    assert ((mean - exact).abs() <= 5 * (var / N).sqrt() + 1e-6).all()


def test_explain_and_available_backends():
    q, k, v = (t.float() for t in _qkv())
    assert ao.available_backends() == ["splitkv", "sdpa", "span", "flex", "blockwise", "reference"]
    text = ao.explain(q, k, v, mask=ao.causal("top_left"))
    assert "-> runs on 'sdpa'" in text and "reference" in text
    text = ao.explain(q, k, v, score_mod=am.softcap(5.0))
    assert "-> runs on 'blockwise'" in text and "SDPA takes at most one additive bias tensor" in text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_shape", [(1, 4, 6, 9), (4, 1, 9)], ids=["full", "per_head_key"])
def test_bias_is_differentiable(backend, bias_shape):
    q, k, v = (t.float() for t in _qkv(1, 4, 2, 6, 9, 8, 8))
    g = torch.Generator().manual_seed(3)
    b32 = torch.randn(*bias_shape, generator=g).requires_grad_(True)
    if backend == "span":  # it folds the bias into its edge masks without a gradient: it must refuse
        with pytest.raises(NotImplementedError, match="bias / alibi tensor requires grad"):
            ao.attention(q, k, v, score_mod=am.bias(b32), mask=ao.causal(), backend=backend)
        assert "-> runs on 'span'" not in ao.explain(q, k, v, score_mod=am.bias(b32), mask=ao.causal())
        return
    b64 = b32.detach().double().requires_grad_(True)
    plain32 = b32.detach().clone().requires_grad_(True)
    kwargs = {"mask": ao.causal()}
    ao.attention(q, k, v, score_mod=am.bias(b32), **kwargs, backend=backend).square().sum().backward()
    oracle([q, k, v], {**kwargs, "score_mod": am.bias(plain32)}, compute_dtype=torch.float32)[
        0
    ].square().sum().backward()
    q64, k64, v64 = (t.double() for t in (q, k, v))
    oracle([q64, k64, v64], {**kwargs, "score_mod": am.bias(b64)})[0].square().sum().backward()
    assert_close("dbias", b32.grad, plain32.grad, b64.grad, 3, magnitude=float(b64.grad.abs().max()))


def test_explain_with_dropout_leaves_the_rng_alone():
    """explain() computes nothing: planning a dropout call must not draw from torch's RNG."""
    q = torch.randn(1, 2, 8, 4)
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    for backend in ("auto", "blockwise", "reference"):
        ao.explain(q, q, q, dropout_p=0.1, score_mod=am.softcap(2.0), backend=backend)
    assert torch.equal(torch.rand(3), want)
