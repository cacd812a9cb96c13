"""attnopt.cache layers on their own: contents, no per-step copies, and streaming == recompute."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the cache layers plug into transformers >= 5")

from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import attnopt as ao
from attnopt import masks as M
from attnopt.cache import GrowingLayer, PreallocatedLayer, RingLayer

B, H, D = 2, 3, 16


def _chunks(sizes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(B, H, s, D, generator=g, dtype=dtype),
            torch.randn(B, H, s, D + 2, generator=g, dtype=dtype),
        )
        for s in sizes
    ]


@pytest.mark.parametrize("layer_cls", [GrowingLayer, PreallocatedLayer])
def test_growing_and_preallocated_return_everything_in_order(layer_cls):
    layer = GrowingLayer(initial=8) if layer_cls is GrowingLayer else PreallocatedLayer(max_length=200)
    sizes = [5, 1, 1, 7, 1, 30, 1, 1, 64, 1]
    ks, vs = [], []
    for k, v in _chunks(sizes):
        ks.append(k)
        vs.append(v)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, torch.cat(ks, 2)) and torch.equal(got_v, torch.cat(vs, 2))
        assert layer.get_seq_length() == sum(x.shape[2] for x in ks)
        assert got_k.stride(-1) == 1 and got_k.stride(2) == D  # fused kernels read it in place
    assert layer.get_mask_sizes(1) == (sum(sizes) + 1, 0)


def test_growing_layer_copies_old_tokens_only_when_it_grows():
    layer = GrowingLayer(initial=64)
    k, v = _chunks([10])[0]
    layer.update(k, v)
    grows, ptr = 0, layer.keys.data_ptr()
    for k, v in _chunks([1] * 2000, seed=1):
        layer.update(k, v)
        if layer.keys.data_ptr() != ptr:
            grows, ptr = grows + 1, layer.keys.data_ptr()
    assert layer.get_seq_length() == 2010
    assert grows == 5, grows  # 64 -> 128 -> 256 -> 512 -> 1024 -> 2048: amortized O(1) copies per token
    assert layer.capacity == 2048


def test_growing_layer_after_crop_and_reorder():
    layer = GrowingLayer(initial=8)
    chunks = _chunks([6, 1, 1, 1])
    for k, v in chunks:
        layer.update(k, v)
    layer.crop(-2)
    want = torch.cat([c[0] for c in chunks], 2)[:, :, :7]
    assert torch.equal(layer.keys, want)
    k, v = _chunks([1], seed=5)[0]
    got, _ = layer.update(k, v)
    assert torch.equal(got, torch.cat([want, k], 2))
    layer.reorder_cache(torch.tensor([1, 0]))
    k2, v2 = _chunks([1], seed=6)[0]
    got, _ = layer.update(k2, v2)
    assert torch.equal(got, torch.cat([torch.cat([want, k], 2).flip(0), k2], 2))


def test_preallocated_layer_refuses_overflow_and_mismatched_states():
    layer = PreallocatedLayer(max_length=8)
    k, v = _chunks([6])[0]
    layer.update(k, v)
    k2, v2 = _chunks([3])[0]
    with pytest.raises(ValueError, match="static cache is full: 9 tokens needed, max_length=8"):
        layer.update(k2, v2)
    assert layer.get_seq_length() == 6  # nothing lost
    with pytest.raises(ValueError, match="do not match the cache"):
        layer.update(torch.randn(3, H, 1, D), torch.randn(3, H, 1, D + 2))
    with pytest.raises(ValueError, match="max_length"):
        PreallocatedLayer(max_length=0)
    with pytest.raises(TypeError, match="max_length"):
        PreallocatedLayer(max_length=2.5)


def test_ring_layer_arguments():
    with pytest.raises(ValueError, match="rotary"):
        RingLayer(window=8, sinks=4)
    with pytest.raises(ValueError, match="window"):
        RingLayer(window=0)
    with pytest.raises(TypeError, match="sinks"):
        RingLayer(window=4, sinks=1.0, rotary=lambda x, p: (x, x))
    with pytest.raises(TypeError, match="rotary"):
        RingLayer(window=4, sinks=1, rotary="rope")


def _rotary():
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H, head_dim=D)
    return LlamaRotaryEmbedding(cfg)


def _rot(rotary, x, pos):
    cos, sin = rotary(x, pos.view(1, -1))
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


@pytest.mark.parametrize(
    ("sinks", "window", "sizes"),
    [
        (4, 8, [3] + [1] * 40),  # prompt inside the window, then decode far past it
        (2, 6, [20] + [1] * 15),  # prompt longer than sinks + window
        (4, 8, [1] * 10 + [5, 1, 1, 9] + [1] * 12),  # chunks after eviction
        (1, 5, [2, 1, 1, 1, 1, 1, 7, 1]),
    ],
)
def test_streaming_equals_recompute_over_sinks_and_window(sinks, window, sizes):
    """Each step's output equals dense float64 attention over the sink and window tokens placed at
    in-cache positions 0..n-1 (query i of a chunk at its own in-cache position), with the model-style
    input: queries and keys rotated at their absolute positions before the cache sees them."""
    rotary = _rotary()
    layer = RingLayer(window=window, sinks=sinks, rotary=rotary)
    g = torch.Generator().manual_seed(sum(sizes) + sinks)
    pre_k, pre_v = [], []  # un-rotated history (the reference re-places them)
    t = 0
    for s in sizes:
        q = torch.randn(B, H, s, D, generator=g)
        k = torch.randn(B, H, s, D, generator=g)
        v = torch.randn(B, H, s, D, generator=g)
        pos = torch.arange(t, t + s)
        kv_len, kv_off = layer.get_mask_sizes(s)
        K, V = layer.update(_rot(rotary, k, pos), v, kwargs={"position_ids": pos.view(1, -1).expand(B, -1)})
        assert K.shape[2] == kv_len and kv_off == t + s - kv_len
        assert layer.get_seq_length() == t + s
        out = ao.attention(_rot(rotary, q, pos), K, V, mask=M.causal() if s > 1 else None)
        pre_k.append(k)
        pre_v.append(v)
        all_k, all_v = torch.cat(pre_k, 2), torch.cat(pre_v, 2)
        for i in range(s):
            # Query i (absolute position p) sees the sinks the cache held before this call, the window it
            # held (the newest `fill` tokens before t), and the chunk up to itself.
            p, held_sinks = t + i, min(t, sinks)
            fill = kv_len - s - held_sinks
            idx = list(range(held_sinks)) + list(range(t - fill, p + 1))
            assert len(idx) <= sinks + window + s
            kk, vv = all_k[:, :, idx].double(), all_v[:, :, idx].double()
            n = len(idx)
            cpos = torch.arange(n)
            kk = _rot(rotary.double(), kk, cpos)
            qq = _rot(rotary.double(), q[:, :, i : i + 1].double(), cpos[-1:])
            w = torch.softmax(qq @ kk.transpose(-1, -2) / D**0.5, -1)
            want = w @ vv
            err = (out[:, :, i : i + 1].double() - want).abs().max().item()
            assert err <= 1e-5, (s, t, i, err)
        t += s
    assert layer._k.shape[2] == sinks + window  # constant memory


def test_sliding_ring_layer_matches_transformers_sliding_layer():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    W = 6
    ours, theirs = RingLayer(window=W, sliding=True), DynamicSlidingWindowLayer(sliding_window=W)
    g = torch.Generator().manual_seed(3)
    t = 0
    for s in [4, 1, 1, 1, 1, 5, 1, 1, 1, 1, 1, 8, 1]:
        q = torch.randn(B, H, s, D, generator=g)
        k = torch.randn(B, H, s, D, generator=g)
        v = torch.randn(B, H, s, D, generator=g)
        (la, oa), (lb, _) = ours.get_mask_sizes(s), theirs.get_mask_sizes(s)
        assert oa == t + s - la  # the query block is bottom-right aligned with the keys
        Ka, Va = ours.update(k, v)
        Kb, Vb = theirs.update(k, v)
        assert Ka.shape[2] == la and Kb.shape[2] == lb
        m = M.sliding_window(W - 1) if s > 1 else None  # transformers keeps j > p - W
        got = ao.attention(q, Ka, Va, mask=m)
        want = ao.attention(q, Kb, Vb, mask=m)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
        t += s
    assert ours._k.shape[2] == W
