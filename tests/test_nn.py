"""attnopt.nn: MultiHeadAttention against a float64 textbook implementation, RotaryEmbedding, from_bert."""

from __future__ import annotations

import math

import pytest
import torch

import attnopt as ao
from attnopt.nn import MultiHeadAttention, RotaryEmbedding


def textbook(layer: MultiHeadAttention, x, context=None, keep=None, positions=None, context_positions=None):
    """The layer recomputed in float64 the slow, obvious way (repeat kv heads, dense softmax)."""
    d = torch.float64
    kin, vin = (x, x) if context is None else (context if isinstance(context, tuple) else (context, context))
    lin = lambda m, t: t.to(d) @ m.weight.to(d).T + (0 if m.bias is None else m.bias.to(d))  # noqa: E731
    B, S, _ = x.shape
    H, Hkv, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = lin(layer.q_proj, x).view(B, S, H, hd).transpose(1, 2)
    k = lin(layer.k_proj, kin).view(B, -1, Hkv, hd).transpose(1, 2)
    v = lin(layer.v_proj, vin).view(B, -1, Hkv, hd).transpose(1, 2)
    if layer.rotary is not None:
        q = layer.rotary(q, positions)
        k = layer.rotary(k, context_positions if context_positions is not None else positions)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a fully masked row attends to nothing: 0
    o = (p @ v).transpose(1, 2).reshape(B, S, H * hd)
    return lin(layer.out_proj, o)


def close(got, want, tol=1e-5):
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"max |err| {err:.3g} > {tol}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_self_attention_with_padding_matches_textbook():
    layer = MultiHeadAttention(48, 6)
    x = torch.randn(3, 11, 48)
    lengths = torch.tensor([11, 7, 1])
    keep = (torch.arange(11)[None, :] < lengths[:, None])[:, None, None, :]
    out = layer(x, mask=ao.padding(lengths))
    assert out.shape == (3, 11, 48)
    close(out, textbook(layer, x, keep=keep))


def test_causal_gqa_and_mqa_match_textbook():
    for kv in (2, 1):
        layer = MultiHeadAttention(64, 8, num_kv_heads=kv, bias=False)
        assert layer.k_proj.out_features == kv * 8
        x = torch.randn(2, 9, 64)
        keep = torch.ones(9, 9, dtype=torch.bool).tril()
        close(layer(x, mask=ao.causal()), textbook(layer, x, keep=keep))


def test_cross_attention_tensor_and_pair():
    layer = MultiHeadAttention(32, 4, kdim=20, vdim=12)
    x, kin, vin = torch.randn(2, 5, 32), torch.randn(2, 7, 20), torch.randn(2, 7, 12)
    close(layer(x, (kin, vin)), textbook(layer, x, context=(kin, vin)))
    same = MultiHeadAttention(32, 4, kdim=20, vdim=20)
    close(same(x, kin), textbook(same, x, context=kin))
    with pytest.raises(ValueError, match="kdim == vdim == embed_dim"):
        layer(x)


def test_scale_is_head_dim_not_hidden_size():
    layer = MultiHeadAttention(64, 16)  # head dim 4: 1/sqrt(4) vs the seed article's 1/sqrt(64)
    x = torch.randn(1, 6, 64)
    close(layer(x), textbook(layer, x))


def test_fully_masked_row_gives_bias_only_not_nan():
    layer = MultiHeadAttention(16, 2)
    x = torch.randn(2, 4, 16)
    out = layer(x, mask=ao.padding(torch.tensor([4, 0])))
    assert torch.isfinite(out).all()
    # No key: the attention output is 0, so the layer returns out_proj's bias.
    torch.testing.assert_close(out[1], layer.out_proj.bias.expand(4, 16), rtol=0, atol=0)


def test_gradients_match_textbook():
    layer = MultiHeadAttention(24, 3, num_kv_heads=1).double()
    x = torch.randn(2, 6, 24, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    layer(x, mask=ao.causal()).square().sum().backward()
    got = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    x.grad = None
    layer.zero_grad()
    textbook(layer, x, keep=keep).square().sum().backward()
    want = [x.grad, *(p.grad for p in layer.parameters())]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_dropout_only_while_training():
    layer = MultiHeadAttention(32, 4, dropout=0.5)
    x = torch.randn(1, 8, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # reproducible under the seed
    assert not torch.allclose(a, layer.eval()(x))


def test_rotary_matches_llama_convention_and_is_relative():
    rot = RotaryEmbedding(16, base=10000.0)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    pos = torch.arange(5) + 3
    # transformers' LLaMA: cos/sin of pos * inv_freq, duplicated halves, x*cos + rotate_half(x)*sin
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    ang = pos[:, None].double() * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rotate_half = torch.cat([-x[..., 8:], x[..., :8]], -1)
    torch.testing.assert_close(rot(x, pos), x * cos + rotate_half * sin, rtol=1e-6, atol=1e-6)
    # q·k depends only on the position difference.
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    a = (rot(q, torch.tensor([7])) * rot(k, torch.tensor([2]))).sum()
    b = (rot(q, torch.tensor([105])) * rot(k, torch.tensor([100]))).sum()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_layer_with_rotary_matches_textbook():
    layer = MultiHeadAttention(32, 4, num_kv_heads=2, rotary=RotaryEmbedding(8))
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7) + 10
    keep = torch.ones(7, 7, dtype=torch.bool).tril()
    close(layer(x, mask=ao.causal(), positions=pos), textbook(layer, x, keep=keep, positions=pos))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_dim": 30, "num_heads": 4}, "not divisible by num_heads=4"),
        ({"embed_dim": 32, "num_heads": 4, "num_kv_heads": 3}, "not a multiple of num_kv_heads=3"),
        ({"embed_dim": 32, "num_heads": 0}, "num_heads=0"),
        ({"embed_dim": 32, "num_heads": 4, "dropout": 1.0}, r"dropout=1.0: expected a float in \[0, 1\)"),
        ({"embed_dim": 32, "num_heads": 4, "rotary": RotaryEmbedding(16)}, "rotary.head_dim=16"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MultiHeadAttention(**kwargs)


def test_forward_errors_name_the_argument():
    layer = MultiHeadAttention(32, 4)
    with pytest.raises(ValueError, match=r"x: expected a \(B, S, embed_dim=32\) tensor, got \(2, 5, 31\)"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="context key input has batch 3, x has batch 2"):
        layer(torch.randn(2, 5, 32), torch.randn(3, 4, 32))
    with pytest.raises(TypeError, match="context: expected None"):
        layer(torch.randn(2, 5, 32), "keys")
    with pytest.raises(ValueError, match="needs an even head dimension"):
        RotaryEmbedding(7)
    with pytest.raises(TypeError, match="BertAttention block"):
        MultiHeadAttention.from_bert(torch.nn.Linear(4, 4))


def test_from_bert_reproduces_minilm_attention_blocks():
    demo = pytest.importorskip("attnopt.demo")
    try:
        model, _ = demo.load_minilm("eager")
    except demo.ModelsMissing as e:
        pytest.skip(str(e))
    x = torch.randn(2, 9, model.config.hidden_size)
    lengths = torch.tensor([9, 5])
    keep = torch.arange(9)[None, :] < lengths[:, None]
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    for layer in model.encoder.layer:
        block = layer.attention
        mha = MultiHeadAttention.from_bert(block)
        assert (mha.num_heads, mha.head_dim) == (12, 32)
        with torch.no_grad():
            want = block(x, attention_mask=additive)[0]
            got = block.output.LayerNorm(mha(x, mask=ao.padding(lengths)) + x)
            pre_ln = mha(x, mask=ao.padding(lengths))
            want_pre = block.output.dense(block.self(x, attention_mask=additive)[0])
        assert (got - want)[keep].abs().max().item() <= 1e-5
        assert (pre_ln - want_pre)[keep].abs().max().item() <= 1e-5
