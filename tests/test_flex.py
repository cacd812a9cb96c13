"""The 'flex' backend: compiled FlexAttention on attnopt's lowered masks.

Compiles are counted per structure: a new sequence length or batch size reuses the kernel, a recompile
is counted and warned about, auto never compiles on the call path, explain() says whether the kernel is
warm, and what Flex cannot do on this device is refused with the reason (numerics: test_attention's grid).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import attnopt as ao
from attnopt import _dispatch
from attnopt import mods as am
from attnopt.backends import flex as F

pytestmark = pytest.mark.skipif(not F.FlexBackend.is_available(), reason="flex needs a C++ compiler")


def _qkv(B, Sq, Sk, Hq=4, Hkv=2, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, Sq, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Sk, D, generator=g).to(dtype),
        torch.randn(B, Hkv, Sk, D, generator=g).to(dtype),
    )


def _stats(q, k, v, **kw) -> F.KernelStats:
    inputs = ao.api.validate(q, k, v, **kw, backends=list(_dispatch.BACKENDS))
    return F.stats()[F._structure(inputs)]


def _oracle(q, k, v, **kw):
    return ao.attention(q.double(), k.double(), v.double(), backend="reference", **kw)


@pytest.mark.parametrize(
    "make_mask",
    [
        lambda Sq, Sk, B: ao.causal(),
        lambda Sq, Sk, B: ao.document([0, Sq // 3, Sq // 3, Sq], [0, Sk // 2, Sk // 2, Sk]) & ao.causal(),
        lambda Sq, Sk, B: ao.padding(torch.tensor([Sk, Sk // 2])[:B]) & ao.sliding_window(37),
    ],
    ids=["causal", "documents_causal", "padding_window"],
)
def test_no_recompile_across_sequence_lengths(make_mask):
    """Five sequence lengths (and Sq != Sk): one compile, counted; every result exact."""
    seen = []
    for n, S in enumerate([200, 333, 128, 517, 260]):
        Sk = S + (n % 2) * 40
        q, k, v = _qkv(2, S, Sk, seed=n)
        kw = {"mask": make_mask(S, Sk, 2), "score_mod": am.softcap(30.0)}
        out = ao.attention(q, k, v, backend="flex", **kw)
        torch.testing.assert_close(out.double(), _oracle(q, k, v, **kw), atol=2e-5, rtol=0)
        seen.append(_stats(q, k, v, **kw))
    st = seen[-1]
    assert all(s is st for s in seen), "one structure for every length"
    assert st.compiles == 1 and st.recompiles == 0 and st.calls >= 5


def test_recompile_is_counted_and_warned():
    """torch.compile specializes sizes 0 and 1: batch 1 after batch 2 recompiles, and says so."""
    kw = {"mask": ao.sliding_window(5, 5)}
    ao.attention(*_qkv(2, 150, 150, Hq=3, Hkv=3), backend="flex", **kw)
    q, k, v = _qkv(1, 150, 150, Hq=3, Hkv=3)
    with pytest.warns(UserWarning, match="recompiled the kernel"):
        out = ao.attention(q, k, v, backend="flex", **kw)
    torch.testing.assert_close(out.double(), _oracle(q, k, v, **kw), atol=2e-5, rtol=0)
    st = _stats(q, k, v, **kw)
    assert st.compiles == 2 and st.recompiles == 1
    assert "1 recompile," in ao.explain(q, k, v, backend="flex", **kw)


def test_auto_uses_flex_only_when_warm():
    """A cold structure is never compiled by auto; compile_for warms it and auto then takes it where it
    ranks first (softcap: flex instead of the PyTorch-tiled blockwise)."""
    q, k, v = _qkv(1, 300, 300, Hq=2, Hkv=1, D=24)
    kw = {"mask": ao.causal(), "score_mod": am.softcap(20.0)}
    text = ao.explain(q, k, v, **kw)
    assert "-> runs on 'blockwise'" in text and "kernel cold" in text
    before = {key: s.compiles for key, s in F.stats().items()}
    ao.attention(q, k, v, **kw)
    assert {key: s.compiles for key, s in F.stats().items()} == before, "auto compiled on the call path"
    info = ao.compile_for(q, k, v, **kw)
    assert info["compiles"] == 1 and info["compile_seconds"] > 0
    q2, k2, v2 = _qkv(1, 411, 411, Hq=2, Hkv=1, D=24, seed=3)  # another length: the same kernel
    text = ao.explain(q2, k2, v2, **kw)
    assert "-> runs on 'flex'" in text and "kernel warm (1 compile, 0 recompiles" in text
    out = ao.attention(q2, k2, v2, **kw)
    torch.testing.assert_close(out.double(), _oracle(q2, k2, v2, **kw), atol=2e-5, rtol=0)
    assert _stats(q2, k2, v2, **kw).compiles == 1
    # batch 2 after batch 1: torch.compile specialized the batch of 1, so auto leaves this call alone
    q3, k3, v3 = _qkv(2, 100, 100, Hq=2, Hkv=1, D=24, seed=4)
    text = ao.explain(q3, k3, v3, **kw)
    assert "-> runs on 'blockwise'" in text and "not for this call's sizes of 1" in text
    ao.attention(q3, k3, v3, **kw)
    assert _stats(q3, k3, v3, **kw).compiles == 1


def test_cpu_gradients_come_from_an_exact_rerun():
    """Flex has no CPU backward: forward on flex, gradients from the same call on another backend."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 130, 150, Hq=2, Hkv=2, D=16))
    bias = torch.randn(1, 2, 130, 150, requires_grad=True)
    kw = {"mask": ao.causal(), "score_mod": am.bias(bias)}
    out = ao.attention(q, k, v, backend="flex", **kw)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), g)
    want = torch.autograd.grad(ao.attention(q, k, v, backend="blockwise", **kw), (q, k, v, bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"return_lse": True}, "return_lse=True on CPU"),
        ({"sinks": torch.zeros(4)}, "sinks on CPU"),
        ({"dropout_p": 0.1}, "dropout_p=0.1 is not supported"),
        ({"mask": ao.causal() & ao.dense(torch.ones(1, 1, 64, 64, dtype=torch.bool))}, "not a mix"),
    ],
)
def test_refusals_name_the_reason(kwargs, reason):
    q, k, v = _qkv(1, 64, 64)
    with pytest.raises(NotImplementedError, match=reason):
        ao.attention(q, k, v, backend="flex", **kwargs)
    assert reason in ao.explain(q, k, v, **kwargs)
    with pytest.raises(NotImplementedError, match="float64"):
        ao.attention(*(t.double() for t in (q, k, v)), backend="flex")


def test_structure_near_the_recompile_limit_is_refused():
    """Past torch's recompile limit Dynamo would run Flex eagerly over all Sq·Sk scores: refused first."""
    q, k, v = _qkv(1, 100, 100, Hq=1, Hkv=1, D=8)
    kw = {"mask": ao.prefix_lm(20)}
    ao.attention(q, k, v, backend="flex", **kw)
    st = _stats(q, k, v, **kw)
    saved = st.compiles
    try:
        st.compiles = F._recompile_limit() - 1
        with pytest.raises(NotImplementedError, match="recompile limit"):
            ao.attention(q, k, v, backend="flex", **kw)
        assert ao.explain(q, k, v, **kw).count("recompile limit") == 1
        assert (
            _dispatch.select(ao.api.validate(q, k, v, **kw, backends=list(_dispatch.BACKENDS))).name != "flex"
        )
    finally:
        st.compiles = saved


def test_fully_masked_rows_and_empty_documents():
    """Rows with no key (padding 0, a document with no keys) give 0, as on every backend."""
    q, k, v = _qkv(2, 140, 140)
    kw = {"mask": ao.padding(torch.tensor([0, 140])) & ao.causal()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no recompile
        out = ao.attention(q, k, v, backend="flex", **kw)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out.double(), _oracle(q, k, v, **kw), atol=2e-5, rtol=0)
    kw = {"mask": ao.document_causal([0, 70, 70, 140], [0, 100, 100, 140])}
    out = ao.attention(q, k, v, backend="flex", **kw)
    torch.testing.assert_close(out.double(), _oracle(q, k, v, **kw), atol=2e-5, rtol=0)


def test_unhashable_custom_functions_run_on_auto_and_flex():
    """A user's callable object may be unhashable (a dataclass with eq): the structure key compares
    functions by identity."""

    @dataclasses.dataclass
    class KeepBelow:
        n: int

        def __call__(self, b, h, i, j):
            return j <= i + self.n

    q, k, v = _qkv(1, 64, 64, Hq=2, Hkv=2, D=16)
    want = _oracle(q, k, v, mask=ao.causal())
    for backend in ("auto", "flex"):
        out = ao.attention(q, k, v, mask=KeepBelow(0), backend=backend)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)
    assert "flex" in ao.explain(q, k, v, mask=KeepBelow(0))


def test_gradients_reach_tensors_a_custom_score_mod_closes_over():
    """The CPU rerun differentiates what blockwise differentiates, closures included."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 64, 64, Hq=2, Hkv=2, D=16))
    rel = torch.randn(2, requires_grad=True)

    def make(rel):
        return lambda s, b, h, i, j: s + rel[h] * (i - j).float() * 0.01

    kw = {"mask": ao.causal(), "score_mod": make(rel)}
    got = torch.autograd.grad(ao.attention(q, k, v, backend="flex", **kw).sum(), (rel, q))
    want = torch.autograd.grad(ao.attention(q, k, v, backend="blockwise", **kw).sum(), (rel, q))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    only_rel = ao.attention(*(t.detach() for t in (q, k, v)), backend="flex", **kw)
    assert only_rel.requires_grad, "a closure tensor alone requires grad: the output must too"


def test_bias_dtype_and_strides_reuse_the_kernel():
    """bf16, expanded and transposed biases read the same compiled kernel as the float32 one."""
    q, k, v = _qkv(2, 200, 200, Hq=2, Hkv=2, D=16)
    b0 = torch.randn(2, 2, 200, 200)
    variants = [b0, b0.bfloat16(), b0.transpose(-1, -2), torch.randn(1, 2, 1, 200).expand(2, 2, 200, 200)]
    for n, bias in enumerate(variants):
        kw = {"mask": ao.causal(), "score_mod": [am.bias(bias), am.softcap(20.0)]}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if n < 3:  # the same size-1 pattern: no recompile
                out = ao.attention(q, k, v, backend="flex", **kw)
            else:  # an expanded dim is a dim of size 1 to the kernel: one more compile, counted
                warnings.simplefilter("ignore")
                out = ao.attention(q, k, v, backend="flex", **kw)
        torch.testing.assert_close(out.double(), _oracle(q, k, v, **kw), atol=3e-5, rtol=0)
    assert _stats(q, k, v, **kw).compiles <= 2


def test_compile_for_under_autocast_compiles_the_autocast_kernel():
    q, k, v = _qkv(1, 130, 130, Hq=2, Hkv=1, D=16)
    kw = {"mask": ao.prefix_lm(9), "score_mod": am.softcap(25.0)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        info = ao.compile_for(q, k, v, **kw)
        assert info["compiles"] == 1
        assert "runs on 'flex'" in ao.explain(q, k, v, **kw)


def test_mask_subclasses_are_not_mistaken_for_their_base():
    class NoFirstKey(ao.masks.cache_causal):
        def keep(self, b, h, i, j, ctx):
            return super().keep(b, h, i, j, ctx) & (j > 0)

        classify = ao.masks.Mask.classify
        key_range = ao.masks.Mask.key_range
        full_key_range = ao.masks.Mask.full_key_range

    q, k, v = _qkv(1, 300, 300, Hq=1, Hkv=1, D=16)
    m = NoFirstKey(torch.tensor([300]))
    with pytest.raises(NotImplementedError, match="flex lowers"):
        ao.attention(q, k, v, mask=m, backend="flex")


def test_explain_counts_the_block_grid():
    q, k, v = _qkv(1, 300, 300, Hq=1, Hkv=1, D=16)
    text = ao.explain(q, k, v, mask=ao.causal(), backend="flex")
    assert "(6/9 kept, 1 without mask_mod)" in text  # 3 x 3 blocks; the tail row of blocks is never FULL


def test_auto_ranks_a_warm_kernel_where_it_was_measured_faster():
    """Warm: a bias with a mask goes to flex (SDPA would materialize it); a bf16 window stays on span;
    with gradients flex is the last resort (its forward would be followed by a rerun)."""
    q, k, v = _qkv(1, 600, 600, Hq=2, Hkv=2, D=16)
    bias_kw = {"mask": ao.causal(), "score_mod": am.bias(torch.randn(1, 2, 600, 600))}
    ao.compile_for(q, k, v, **bias_kw)
    assert "-> runs on 'flex'" in ao.explain(q, k, v, **bias_kw)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ao.compile_for(qb, kb, vb, mask=ao.sliding_window(64))
    assert "-> runs on 'span'" in ao.explain(qb, kb, vb, mask=ao.sliding_window(64))
    qg = q.clone().requires_grad_(True)
    assert "-> runs on 'flex'" not in ao.explain(qg, k, v, **bias_kw)
