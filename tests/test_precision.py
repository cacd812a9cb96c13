"""Additive biases keep their precision; huge scores keep exact gradients.

* Biases (mods.bias, ALiBi) are added in float32 (float64 for float64 inputs) on every backend; torch's
  fused kernels take a float32 mask with bf16/fp16 inputs, so nothing is rounded to the input dtype.
* Only -inf is a hard mask: a float32-min bias row on fp16/bf16 inputs is a large finite number, so the
  row averages v.
* When scores are huge (a float32-min bias row, q = k = 133120, scale = 1e3), a float32 LSE cannot hold
  log(Sk) next to the row max: blockwise keeps the row max and the normalizer apart, the fused
  backends refuse (and say why), and every answer is checked against the float64 oracle.

The "plain" baseline of the tolerance rule here is the oracle computed in float32 on the same inputs:
that is what every backend computes in, and it is stricter than a bf16 computation.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import attnopt as ao
from attnopt import mods as am
from tests._oracle import DTYPE_NAMES, assert_close, oracle, run_and_grads

BACKENDS = ("auto", "sdpa", "span", "blockwise", "reference")
HALF = (torch.bfloat16, torch.float16)


def _check(backend: str, leaves: list[Tensor], kwargs: dict, grads: bool = True, refusal: str | None = None):
    """out (and dq, dk, dv) of `backend` vs the float64 oracle; plain = the oracle in float32 (float64)."""
    dtype = leaves[0].dtype
    leaves = [t.detach().requires_grad_(grads) for t in leaves]
    g = torch.Generator().manual_seed(7)
    do = torch.randn(leaves[0].shape[:-1] + leaves[2].shape[-1:], generator=g, dtype=torch.float64)
    if refusal is not None and backend in ("sdpa", "span"):
        with pytest.raises(NotImplementedError, match=refusal):
            ao.attention(*leaves, **kwargs, backend=backend)
        return
    leaves64 = [t.detach().double().requires_grad_(grads) for t in leaves]
    plain_leaves = [
        t.detach().to(torch.promote_types(dtype, torch.float32)).requires_grad_(grads) for t in leaves
    ]

    def run(fn, ls):
        if grads:
            return run_and_grads(fn, ls, None, do)
        with torch.no_grad():
            return fn(), None, [None, None, None]

    got = run(lambda: ao.attention(*leaves, **kwargs, backend=backend), leaves)
    plain = run(lambda: oracle(plain_leaves, kwargs)[0], plain_leaves)
    ref = run(lambda: oracle(leaves64, kwargs)[0], leaves64)
    magnitude = float(leaves64[2].detach().abs().max())
    assert_close("out", got[0], plain[0].to(dtype), ref[0], 2, magnitude=magnitude, n_sum=leaves[1].shape[2])
    if grads:
        scale = max(float(r.abs().max()) for r in ref[2][:3])
        for name, a, p, r in zip(("dq", "dk", "dv"), got[2], plain[2], ref[2]):
            assert_close(name, a, p.to(dtype), r, 3, magnitude=scale, n_sum=leaves[1].shape[2])


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64).to(dtype),
    ]


# ------------------------------------------------------------------------------------- bias precision


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("Sq", [1, 130])
def test_bloom_style_bias_is_added_in_float32(backend, dtype, Sq):
    """A BLOOM-style ALiBi tensor (slope[h] * j, up to ~700 here) rounded to bf16 moves scores by up to 4:
    auto was off by 3.9 (bf16, 2048 keys) where blockwise was off by 0.019."""
    H, Sk = 8, 1024
    q, k, v = _qkv(1, H, H, Sq, Sk, 32, dtype)
    bias = am.alibi_slopes(H).view(1, H, 1, 1) * torch.arange(Sk).view(1, 1, 1, Sk)  # float32
    _check(backend, [q, k, v], {"mask": ao.causal(), "score_mod": am.bias(bias)}, grads=False)


@pytest.mark.parametrize("backend", ["auto", "span", "blockwise", "reference"])
@pytest.mark.parametrize("dtype", [*HALF, torch.float64], ids=lambda d: DTYPE_NAMES[d])
def test_alibi_at_long_distances(backend, dtype):
    """ALiBi with bidirectional distances up to 1500 (slopes up to 0.7): built in float32 / float64.

    In float64, span built its edge masks in float32 (7e-10 off; the float64 floor is ~1e-13)."""
    H = 4
    q, k, v = _qkv(1, H, 2, 96, 1500, 16, dtype)
    kwargs = {"score_mod": am.alibi(am.alibi_slopes(H)), "mask": ao.sliding_window(700, 700)}
    _check(backend, [q, k, v], kwargs, grads=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [*HALF, torch.float32], ids=lambda d: DTYPE_NAMES[d])
def test_float32_min_bias_row_averages_v(backend, dtype):
    """transformers' additive-mask convention: float32-min is a large finite number, not -inf."""
    q, k, v = _qkv(2, 4, 2, 6, 9, 16, dtype)
    bias = torch.zeros(2, 1, 6, 9)
    bias[:, :, 2] = torch.finfo(torch.float32).min  # every key of query row 2 gets the same huge penalty
    bias[1, :, 4, 3] = float("-inf")  # one hard-masked entry elsewhere
    if backend == "span":  # merging its pieces by a float32 LSE would be off: it refuses the forward too
        with pytest.raises(NotImplementedError, match=r"scores reach 3\.4e\+38"):
            ao.attention(q, k, v, score_mod=am.bias(bias), backend=backend)
        return
    out = ao.attention(q, k, v, score_mod=am.bias(bias), backend=backend)
    mean_v = v.double().mean(2).repeat_interleave(2, dim=1)  # (B, Hq, Dv)
    torch.testing.assert_close(out[:, :, 2].double(), mean_v, rtol=0, atol=4 * torch.finfo(dtype).eps)
    _check(backend, [q, k, v], {"score_mod": am.bias(bias)}, refusal="scores reach")


# ------------------------------------------------------------------------------ huge scores, gradients


def _huge_cases():
    # name, dtype, q/k/v builder, kwargs
    def equal(value, dtype):
        def build():
            q, k, v = _qkv(1, 2, 2, 40, 40, 16, dtype)
            return [torch.full_like(q, value), torch.full_like(k, value), v]

        return build

    def min_row(dtype):
        def build():
            return _qkv(1, 4, 2, 40, 56, 16, dtype, seed=3)

        return build

    bias = torch.zeros(1, 1, 40, 56)
    bias[:, :, 7] = torch.finfo(torch.float32).min
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        yield f"fp32_min_row-{DTYPE_NAMES[dtype]}", min_row(dtype), {"score_mod": am.bias(bias)}
        yield (
            f"fp32_min_row_causal-{DTYPE_NAMES[dtype]}",
            min_row(dtype),
            {
                "score_mod": am.bias(bias),
                "mask": ao.causal(),
            },
        )
    yield "q_eq_k_133120-bf16", equal(133120.0, torch.bfloat16), {"mask": ao.causal()}
    yield "q_eq_k_133120-fp32", equal(133120.0, torch.float32), {}
    yield "scale_1e3-fp32", equal(1.0, torch.float32), {"scale": 1e3, "mask": ao.sliding_window(9)}
    yield "scale_1e3-bf16", equal(1.0, torch.bfloat16), {"scale": 1e3}


HUGE = list(_huge_cases())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("build", "kwargs"), [pytest.param(b, kw, id=n) for n, b, kw in HUGE])
def test_huge_scores_keep_exact_gradients(backend, build, kwargs):
    """The gradients were off by a factor of up to Sk (here 40-56) on every backend."""
    _check(backend, build(), kwargs, refusal="scores reach")


def test_huge_scores_explain_says_why_fused_refuse():
    q = torch.full((1, 2, 40, 16), 133120.0, requires_grad=True)
    text = ao.explain(q, q, q, mask=ao.causal())
    assert "-> runs on 'blockwise'" in text
    assert (
        "scores reach 7.09e+10 > 2048" in text
        and "blockwise keeps the row max and the normalizer apart" in text
    )


def test_common_additive_masks_keep_the_fused_kernels():
    """The score bound follows the row maxima, not the largest |bias|: an additive padding mask with
    finfo.min entries (each row keeps some 0 entry) and ALiBi with a causal mask stay on span."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 4, 4, 700, 700, 16, torch.float32))
    pad = torch.zeros(2, 1, 1, 700)
    pad[1, ..., 500:] = torch.finfo(torch.float32).min
    text = ao.explain(q, k, v, mask=ao.sliding_window(64), score_mod=am.bias(pad))
    assert "-> runs on 'span'" in text, text
    text = ao.explain(q, k, v, mask=ao.causal(), score_mod=am.alibi(am.alibi_slopes(4)))
    assert "-> runs on 'span'" in text, text


def test_the_decode_signature_cache_never_skips_the_data_check():
    """Same shapes, gradients on: a second call with huge scores must not reuse the first call's sdpa."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 2, 2, 40, 40, 16, torch.float32))
    ao.attention(q, k, v).sum().backward()
    huge = [torch.full_like(t, 133120.0).requires_grad_(True) for t in (q, k)] + [v]
    _check("auto", huge, {})
