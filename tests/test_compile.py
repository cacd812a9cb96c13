"""torch.compile(fullgraph=True): attention is one custom operator, forward and backward equal eager.

While tracing, attention() emits ``torch.ops.attnopt.attention`` (masks and modifiers cross as a
structure string plus tensors); the eager dispatch runs inside it at run time and the backward
recomputes through the backends' exact backward. Compiles here use the aot_eager backend (the graph
capture and autograd that inductor also uses) except one inductor check; a CompileCounter proves a
single graph with no breaks.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import attnopt as ao
from attnopt import mods as am

B, HQ, HKV, S, D = 2, 4, 2, 20, 16


def _leaves(seed=0, S=S, grad=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, HQ, S, D), (B, HKV, S, D), (B, HKV, S, D)]
    return [torch.randn(*s, generator=g).requires_grad_(grad) for s in shapes]


def _compile(fn, backend="aot_eager", dynamic=None):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic), counter


def _run(fn, args, weights):
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    out = fn(*args)
    (out * weights).sum().backward()
    return out.detach(), [a.grad for a in args if a.requires_grad]


def _same(fn, args, backend="aot_eager"):
    cf, counter = _compile(fn, backend)
    w = torch.randn(fn(*args).shape, generator=torch.Generator().manual_seed(9))
    got, got_g = _run(cf, args, w)
    want, want_g = _run(fn, args, w)
    assert counter.frame_count == 1, "one graph, no breaks"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(got_g) == len(want_g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


LENGTHS = torch.tensor([20, 13])
CASES = {
    "none": lambda q, k, v, **kw: ao.attention(q, k, v, **kw),
    "causal": lambda q, k, v, **kw: ao.attention(q, k, v, **kw, mask=ao.causal()),
    "window_padding": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, mask=ao.sliding_window(5) & ao.padding(LENGTHS)
    ),
    "left_padding_causal": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, mask=ao.left_padding(S - LENGTHS) & ao.causal()
    ),
    "document_alibi": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, mask=ao.document([0, 7, 20]), score_mod=am.alibi(am.alibi_slopes(HQ))
    ),
    "cache_causal_window": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, mask=ao.cache_causal(LENGTHS, left=6)
    ),
    "document_causal": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, mask=ao.document_causal([0, 7, 20], [0, 10, 20])
    ),
    "prefix_lm_or_window": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, mask=ao.prefix_lm(4) | ao.sliding_window(2)
    ),
    "softcap_causal": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, mask=ao.causal(), score_mod=am.softcap(3.0)
    ),
    "dense_bool": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, mask=torch.ones(S, S, dtype=torch.bool).tril()
    ),
    "custom_mask": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, mask=lambda b, h, i, j: (i - j) % 3 == 0
    ),
    "custom_mod": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, score_mod=lambda s, b, h, i, j: s - 0.1 * (i - j).abs()
    ),
    "cosine": lambda q, k, v, **kw: ao.attention(
        q, k, v, **kw, similarity="cosine", scale=5.0, mask=ao.causal()
    ),
    "euclidean": lambda q, k, v, **kw: ao.attention(q, k, v, **kw, similarity="euclidean", mask=ao.causal()),
}


@pytest.mark.parametrize("backend", ["auto", "blockwise", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_matches_eager(case, backend):
    fn = CASES[case]
    _same(lambda q, k, v: fn(q, k, v, backend=backend), _leaves())


def test_masks_built_from_graph_tensors():
    """Descriptors built inside the compiled function from its tensor inputs: values read at run time."""

    def fn(q, k, v, lengths, cu):
        m = (ao.padding(lengths) & ao.causal()) | ao.document(cu)
        return ao.attention(q, k, v, mask=m)

    q, k, v = _leaves()
    cf, counter = _compile(fn)
    for lengths, cu in [
        (torch.tensor([20, 13]), torch.tensor([0, 7, 20])),
        (torch.tensor([5, 20]), torch.tensor([0, 19, 20])),
    ]:
        want = fn(q, k, v, lengths, cu)
        torch.testing.assert_close(cf(q, k, v, lengths, cu), want, rtol=0, atol=0)
    assert counter.frame_count == 1, "new lengths are data, not a recompile"


def test_gradients_of_bias_slopes_and_sinks():
    def fn(q, k, v, bias, slopes, sinks):
        return ao.attention(
            q, k, v, mask=ao.causal(), score_mod=[am.bias(bias), am.alibi(slopes)], sinks=sinks
        )

    g = torch.Generator().manual_seed(3)
    extra = [torch.randn(1, HQ, S, S, generator=g), am.alibi_slopes(HQ), torch.randn(HQ, generator=g)]
    _same(fn, [*_leaves(), *(t.requires_grad_(True) for t in extra)])


def test_lse_and_its_gradient():
    def fn(q, k, v):
        out, lse = ao.attention(q, k, v, mask=ao.sliding_window(6), return_lse=True, backend="blockwise")
        return out.sum(-1) + lse

    _same(fn, _leaves())


def test_new_sequence_lengths_do_not_recompile_after_the_first():
    fn = CASES["window_padding"]
    cf, counter = _compile(lambda q, k, v: fn(q, k, v))
    for n in (20, 28, 24, 33):
        q, k, v = _leaves(S=n)
        torch.testing.assert_close(cf(q, k, v), fn(q, k, v), rtol=0, atol=0)
    assert counter.frame_count <= 2  # the second length makes the graph dynamic; then no more compiles


def test_autocast_inside_compile_matches_eager():
    def fn(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ao.attention(q, k, v, mask=ao.causal()).float()

    _same(fn, _leaves())


def test_dropout_gradient_uses_the_forward_pattern():
    """One seed per call: the recomputing backward drops exactly the weights the forward dropped.

    out is linear in v for a fixed dropout pattern, so <dO, f(v + e) - f(v)> = <dv, e> under one seed."""
    cf, _ = _compile(
        lambda q, k, v: ao.attention(q, k, v, mask=ao.causal(), dropout_p=0.3, backend="blockwise")
    )
    q, k, v = (t.detach() for t in _leaves())
    e = torch.randn(v.shape, generator=torch.Generator().manual_seed(4))
    do = torch.randn(B, HQ, S, D, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    v_leaf = v.clone().requires_grad_(True)
    out = cf(q, k, v_leaf)
    (out * do).sum().backward()
    torch.manual_seed(11)
    out_e = cf(q, k, v + e)
    torch.manual_seed(12)
    assert not torch.equal(cf(q, k, v), out), "another seed, another pattern"
    torch.testing.assert_close((do * (out_e - out)).sum(), (v_leaf.grad * e).sum(), rtol=1e-4, atol=1e-4)


def test_invalid_input_raises_the_eager_error_when_the_op_runs():
    cf, _ = _compile(lambda q, k, v: ao.attention(q, k, v, mask=ao.padding(torch.tensor([3, 4, 5]))))
    q, k, v = _leaves(grad=False)
    with pytest.raises(ValueError, match=r"padding kv_lengths has 3 entries; expected one per batch element"):
        cf(q, k, v)


def test_opcheck_on_transposed_inputs():
    """torch.library's own checks (schema, fake tensor, autograd registration) with the (B, S, H, D)
    strides transformers passes."""
    from attnopt import _op

    q, k, v = (
        t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for t in _leaves()
    )
    spec, tensors, ints, floats = _op.encode(ao.sliding_window(3) & ao.padding(LENGTHS), am.softcap(4.0))
    args = (q, k, v, tensors, spec, ints, floats, None, None, None, "dot", 0.0, True, True, "auto")
    torch.library.opcheck(torch.ops.attnopt.attention.default, args)


# ---------------------------------------------------------------------------------------------- nn


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_multihead_attention_fullgraph(backend):
    torch.manual_seed(0)
    layer = ao.MultiHeadAttention(64, 4, num_kv_heads=2, rotary=ao.RotaryEmbedding(16))
    x = torch.randn(2, 12, 64)
    lengths = torch.tensor([12, 7])

    def fn(x, lengths):
        return layer(x, mask=ao.causal() & ao.padding(lengths))

    cf, counter = _compile(fn, backend)
    out = cf(x, lengths)
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    want = fn(x, lengths)
    want.square().sum().backward()
    assert counter.frame_count == 1
    tol = {"rtol": 0, "atol": 0} if backend == "aot_eager" else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out, want, **tol)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(got[n], p.grad, **tol)


# -------------------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip(
        "transformers", reason="the Hugging Face integration needs transformers >= 5"
    )
    import attnopt.integrations.transformers as ao_hf

    ao_hf.register()
    return transformers


def _hf_same(model, inputs):
    cf, counter = _compile(model)

    def run(m):
        out = m(**inputs)
        y = out.logits if hasattr(out, "logits") else out.last_hidden_state
        y.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return y.detach(), grads

    got, got_g = run(cf)
    want, want_g = run(model)
    assert counter.frame_count == 1, "one graph through transformers' mask creation and attnopt"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got_g.keys() == want_g.keys()
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=0, atol=0)


@pytest.mark.parametrize("inputs", ["plain", "left_padded", "no_cache"])
def test_transformers_llama_fullgraph(hf, inputs):
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = hf.LlamaForCausalLM(cfg)
    model.set_attn_implementation("attnopt")
    ids = torch.randint(0, 128, (2, 12))
    kw: dict = {"input_ids": ids}
    if inputs == "left_padded":
        am_ = torch.ones(2, 12, dtype=torch.long)
        am_[1, :3] = 0
        kw["attention_mask"] = am_
    elif inputs == "no_cache":  # training-style: transformers builds its packed-sequence rule while tracing
        kw["use_cache"] = False
    _hf_same(model, kw)


@pytest.mark.parametrize("padded", [False, True])
def test_transformers_bert_fullgraph(hf, padded):
    torch.manual_seed(0)
    cfg = hf.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = hf.BertModel(cfg, add_pooling_layer=False)
    model.set_attn_implementation("attnopt")
    ids = torch.randint(0, 128, (2, 12))
    kw: dict = {"input_ids": ids}
    if padded:
        am_ = torch.ones(2, 12, dtype=torch.long)
        am_[1, 8:] = 0
        kw["attention_mask"] = am_
    _hf_same(model, kw)
