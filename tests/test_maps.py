"""attnopt.maps: every view against dense weights (float64 oracle, and eager's own weights on the real
models), the sweep's corner cases (wide bins, recomputed tiles, empty rows, GQA, Sq != Sk, sinks,
modifiers, every mask), the recorder's contract, and the O(N) memory bound."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import attnopt as ao
from attnopt import api, mods
from attnopt.backends.reference import reference_attention
from attnopt.maps import AttentionMaps, Bins, _sweep, attention_maps, dense_rollout, from_dense, record

# ----------------------------------------------------------------------------------------------- bins


@pytest.mark.parametrize(
    "n,res,sinks",
    [(0, 8, 2), (1, 8, 2), (7, 8, 2), (8, 8, 2), (100, 8, 2), (2048, 512, 4), (16384, 512, 4), (1000, 16, 0)],
)
def test_bins_cover_every_position_once_with_sinks_alone(n, res, sinks):
    b = Bins.make(n, res, sinks)
    e = b.edges.tolist()
    assert e[0] == 0 and e[-1] == n and all(x < y for x, y in itertools.pairwise(e))
    assert len(b) <= res
    widths = b.edges.diff().tolist()
    assert widths[: min(sinks, n)] == [1] * min(sinks, n)  # each sink token in a bin of its own
    assert all(w <= b.size for w in widths)
    if n <= res:
        assert widths == [1] * n  # fits: no pooling at all
    assert sum(c * w for _, c, w in b.groups()) == n


@pytest.mark.parametrize(
    "kw",
    [{"resolution": 0}, {"resolution": 1.5}, {"resolution": True}, {"sink_tokens": -1}, {"sink_tokens": 8}],
)
def test_bins_and_record_reject_bad_arguments(kw):
    with pytest.raises(ValueError, match=next(iter(kw)).split("_")[0]):
        record(**({"resolution": 8} | kw))
    args = {"resolution": 8, "sinks": 2} | {("sinks" if k == "sink_tokens" else k): v for k, v in kw.items()}
    with pytest.raises(ValueError):
        Bins.make(10, **args)


def test_labels_show_spans_and_token_text():
    b = Bins.make(10, 4, 1)
    tokens = ["<s>", " a", " b", " c", " d", " e", " f", " g", " h", " i"]
    assert b.labels(tokens)[0] == "0 <s>"
    assert b.labels(tokens)[1] == "1-3  a b c"
    assert b.labels()[-1] == "7-9"


# ---------------------------------------------------------------------------- exactness, float64 oracle


def _oracle(
    q, k, *, mask=None, score_mods=(), sinks=None, similarity="dot", resolution, sink_tokens, rows=()
):
    """from_dense on the float64 reference weights; entropy with the sink as one more outcome."""
    _, lse, w = reference_attention(
        q.double(),
        k.double(),
        k.double(),
        mask=mask,
        mods=tuple(score_mods),
        similarity=similarity,
        sinks=None if sinks is None else sinks.double(),
    )
    o = from_dense([w], resolution=resolution, sink_tokens=sink_tokens, query_rows=list(rows))
    if sinks is not None:
        ps = torch.exp(sinks.double().view(1, -1, 1) - lse)
        o.layers[0].entropy = o.layers[0].entropy.double() - torch.special.xlogy(ps, ps)
    return o, w


def _compare(m: AttentionMaps, o: AttentionMaps, tol: float) -> None:
    assert torch.equal(m.q_bins.edges, o.q_bins.edges) and torch.equal(m.k_bins.edges, o.k_bins.edges)
    for b in range(m.batch):
        for stat in ("mean", "max"):
            torch.testing.assert_close(
                m.pooled(0, stat, b).double(), o.pooled(0, stat, b).double(), rtol=0, atol=tol
            )
    torch.testing.assert_close(m.received.double(), o.received.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(m.entropy.double(), o.entropy.double(), rtol=tol, atol=tol)
    if o.rows is not None:
        torch.testing.assert_close(m.rows.double(), o.rows.double(), rtol=0, atol=tol)


B, HQ, HKV, S, D = 2, 6, 2, 203, 16

CASES = {
    "no mask": {},
    "causal": {"mask": ao.causal()},
    "sliding window": {"mask": ao.sliding_window(37)},
    "window both sides": {"mask": ao.sliding_window(20, 9)},
    "packed documents": {"mask": ao.document([0, 50, 51, 140, S]) & ao.causal()},
    "prefix-LM": {"mask": ao.prefix_lm(60)},
    "padding (one row empty of keys)": {"mask": ao.padding([S, 0])},
    "padding & causal": {"mask": ao.padding([150, 77]) & ao.causal()},
    "custom mask_mod": {"mask": ao.masks.custom(lambda b, h, i, j: (i + j) % 3 != 0)},
    "dense bool": {"mask": ao.masks.dense(torch.rand(1, 1, S, S) > 0.3)},
    "softcap": {"mask": ao.causal(), "score_mods": [mods.softcap(4.0)]},
    "alibi": {"mask": ao.causal(), "score_mods": [mods.alibi(mods.alibi_slopes(HQ))]},
    "bias with -inf": {"score_mods": [mods.bias(torch.where(torch.rand(S, S) > 0.5, 0.0, float("-inf")))]},
    "sinks": {"mask": ao.causal(), "sinks": torch.randn(HQ)},
    "cosine": {"similarity": "cosine"},
    "euclidean": {"mask": ao.causal(), "similarity": "euclidean"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_views_equal_dense_float64_weights(case):
    """float64 inputs run the sweep in float64: every view equals the dense computation to ~1e-12."""
    torch.manual_seed(0)
    kw = CASES[case]
    q, k = torch.randn(B, HQ, S, D, dtype=torch.float64), torch.randn(B, HKV, S, D, dtype=torch.float64)
    rows = [0, 1, 100, S - 1]
    m = attention_maps(
        q,
        k,
        mask=kw.get("mask"),
        score_mod=kw.get("score_mods"),
        sinks=kw.get("sinks"),
        similarity=kw.get("similarity", "dot"),
        resolution=29,
        sink_tokens=3,
        query_rows=rows,
    )
    sinks = kw.get("sinks")
    o, _ = _oracle(
        q,
        k,
        mask=kw.get("mask"),
        score_mods=kw.get("score_mods", ()),
        sinks=sinks,
        similarity=kw.get("similarity", "dot"),
        resolution=29,
        sink_tokens=3,
        rows=rows,
    )
    _compare(m, o, 1e-9)


@pytest.mark.parametrize("case", ["causal", "sinks", "softcap", "padding & causal"])
def test_views_fp32_within_1e6_of_float64(case):
    torch.manual_seed(1)
    kw = CASES[case]
    q, k = torch.randn(B, HQ, S, D), torch.randn(B, HKV, S, D)
    m = attention_maps(
        q,
        k,
        mask=kw.get("mask"),
        score_mod=kw.get("score_mods"),
        sinks=kw.get("sinks"),
        resolution=40,
        sink_tokens=2,
        query_rows=[-1],
    )
    o, _ = _oracle(
        q,
        k,
        mask=kw.get("mask"),
        score_mods=kw.get("score_mods", ()),
        sinks=kw.get("sinks"),
        resolution=40,
        sink_tokens=2,
        rows=[S - 1],
    )
    _compare(m, o, 1e-6)


def test_queries_shorter_than_keys_align_bottom_right():
    """A chunk of 37 queries over 203 keys (the tail of a KV cache): query and key axes get their own bins."""
    torch.manual_seed(2)
    q, k = torch.randn(1, HQ, 37, D, dtype=torch.float64), torch.randn(1, HKV, S, D, dtype=torch.float64)
    m = attention_maps(q, k, mask=ao.causal(), resolution=16, sink_tokens=2, query_rows=[0, 36])
    o, _ = _oracle(q, k, mask=ao.causal(), resolution=16, sink_tokens=2, rows=[0, 36])
    assert (m.Sq, m.Sk) == (37, S)
    _compare(m, o, 1e-9)


@pytest.mark.parametrize(
    "setting", ["wide bins split over row blocks", "tiles recomputed for received", "one-column chunks"]
)
def test_sweep_corner_paths_give_the_same_views(monkeypatch, setting):
    torch.manual_seed(3)
    if setting == "wide bins split over row blocks":
        monkeypatch.setattr(_sweep, "ROWS", 8)  # bins of 14 rows are split into blocks of 8
    elif setting == "tiles recomputed for received":
        monkeypatch.setattr(_sweep, "KEEP_BYTES", 0)
    else:
        monkeypatch.setattr(_sweep, "COLS_ELEMENTS", 1)
    q, k = torch.randn(B, HQ, S, D, dtype=torch.float64), torch.randn(B, HKV, S, D, dtype=torch.float64)
    mask = ao.padding([180, 203]) & ao.causal()
    m = attention_maps(q, k, mask=mask, resolution=17, sink_tokens=3, query_rows=[5])
    o, _ = _oracle(q, k, mask=mask, resolution=17, sink_tokens=3, rows=[5])
    _compare(m, o, 1e-9)


def test_received_entropy_and_rows_mean_what_they_say():
    """Row sums of the exact rows are 1 (no sink), received attention sums to Sq per head, a uniform
    softmax has entropy log(number of keys)."""
    torch.manual_seed(4)
    q, k = torch.randn(1, 4, 64, 8, dtype=torch.float64), torch.randn(1, 4, 64, 8, dtype=torch.float64)
    m = attention_maps(q, k, mask=ao.causal(), resolution=64, sink_tokens=0, query_rows=[10, 63])
    assert m.rows.dtype == torch.float64  # float64 inputs: float64 views
    torch.testing.assert_close(m.rows.sum(-1), torch.ones(1, 1, 4, 2, dtype=torch.float64))
    torch.testing.assert_close(m.received.sum(-1), torch.full((1, 1, 4), 64.0, dtype=torch.float64))
    flat = attention_maps(torch.zeros(1, 2, 16, 8), torch.randn(1, 2, 16, 8), mask=ao.causal(), resolution=16)
    torch.testing.assert_close(flat.entropy[0, 0, 0], torch.log(torch.arange(1, 17, dtype=torch.float32)))


# -------------------------------------------------------------------------------------------- rollout


def test_rollout_equals_dense_rollout():
    """Three self-attention layers through one recording: rollout rows = rows of the dense product."""
    torch.manual_seed(5)
    N = 150
    qs = [torch.randn(2, 4, N, 8, dtype=torch.float64) for _ in range(3)]
    ks = [torch.randn(2, 2, N, 8, dtype=torch.float64) for _ in range(3)]
    masks = [ao.causal(), ao.sliding_window(40), None]
    with record(resolution=32, rollout_rows=[0, 77, -1], residual=0.5) as rec:
        for q, k, mk in zip(qs, ks, masks):
            ao.attention(q, k, k, mask=mk)
    m = rec.maps
    W = [reference_attention(q, k, k, mask=mk)[2] for q, k, mk in zip(qs, ks, masks)]
    dense = dense_rollout(W)[:, [0, 77, N - 1]]
    torch.testing.assert_close(m.rollout, dense, rtol=0, atol=1e-9)
    torch.testing.assert_close(m.rollout.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert m.rollout_rows == [0, 77, N - 1]


# ----------------------------------------------------------------------------------- recorder contract


def test_record_hooks_only_inside_the_block_and_leaves_results_untouched():
    torch.manual_seed(6)
    q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8)
    plain = ao.attention(q, k, k, mask=ao.causal())
    with record(resolution=8) as rec:
        inside, lse = ao.attention(q, k, k, mask=ao.causal(), return_lse=True)
        out2 = ao.attention(q, k, k, mask=ao.causal())
    assert torch.equal(plain, inside) and torch.equal(plain, out2) and lse.shape == (1, 4, 32)
    assert rec.maps.num_layers == 2 and not api._OBSERVERS
    ao.attention(q, k, k)
    assert rec.maps.num_layers == 2  # nothing recorded after the block


def test_record_unhooks_on_error_and_refuses_misuse():
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="query_rows: position 99"), record(query_rows=[99]):
        ao.attention(q, k, k)
    assert not api._OBSERVERS
    rec = record()
    with rec, pytest.raises(RuntimeError, match="after the `with` block"):
        rec.maps  # noqa: B018
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        rec.maps  # noqa: B018
    with pytest.raises(ValueError, match="Sq=8"), record():
        ao.attention(q, k, k)
        ao.attention(q[:, :, :8], k, k)
    with pytest.raises(NotImplementedError, match="dropout"), record():
        ao.attention(q, k, k, dropout_p=0.5)
    with pytest.raises(TypeError, match="query_rows"):
        record(query_rows=["last"])
    with pytest.raises(TypeError, match="query_rows"):
        record(query_rows=[True])
    assert record(query_rows=torch.tensor([1, -2])).query_rows == [1, -2]  # integer tensors and numpy ints
    with pytest.raises(ValueError, match="stats"):
        record(stats=("median",))
    with pytest.raises(ValueError, match="attn_implementation='attnopt'"):
        record(model=SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa")))
    with pytest.raises(ValueError, match="resolution"):
        attention_maps(torch.randn(1, 1, 20000, 4), torch.randn(1, 1, 20000, 4), resolution=2, sink_tokens=0)


def test_save_load_roundtrip_and_bertviz_adapter(tmp_path):
    torch.manual_seed(7)
    q, k = torch.randn(1, 3, 40, 8), torch.randn(1, 3, 40, 8)
    m = attention_maps(
        q,
        k,
        mask=ao.causal(),
        resolution=12,
        sink_tokens=2,
        query_rows=[39],
        tokens=[f"t{i}" for i in range(40)],
    )
    m.save(str(tmp_path / "m.pt"))
    m2 = AttentionMaps.load(str(tmp_path / "m.pt"))
    for stat in ("mean", "max"):
        assert torch.equal(m.pooled(0, stat), m2.pooled(0, stat))
    assert torch.equal(m.received, m2.received) and torch.equal(m.rows, m2.rows) and m2.tokens == m.tokens
    att, labels = m.to_bertviz()
    assert len(att) == 1 and att[0].shape == (1, 3, 12, 12) and len(labels) == 12
    assert labels[:2] == ["0 t0", "1 t1"]
    # a pooled mean row weighted by the key bins' widths sums to 1 (the softmax rows do)
    widths = m.k_bins.edges.diff().float()
    torch.testing.assert_close((att[0][0] * widths).sum(-1), torch.ones(3, 12))


# ------------------------------------------------------------------------------------------- memory


def test_memory_stays_linear_in_n():
    """N = 12288, 4 heads: dense weights would be 2.3 GiB; the recording's peak RSS growth stays far below."""
    code = textwrap.dedent(
        """
        import torch, attnopt as ao
        from attnopt.maps import attention_maps
        from attnopt.bench.measure import can_reset_peak, peak_rss_bytes, rss_bytes
        torch.manual_seed(0)
        N = 12288
        q, k = torch.randn(1, 4, N, 64), torch.randn(1, 2, N, 64)
        ao.attention(q, k, k, mask=ao.causal())  # warm the kernels' own buffers
        base = rss_bytes()
        assert can_reset_peak()
        m = attention_maps(q, k, mask=ao.causal(), resolution=256, query_rows=[-1])
        print((peak_rss_bytes() - base) / 2**20, m.nbytes() / 2**20)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "2"},
    )
    assert r.returncode == 0, r.stderr
    growth, held = map(float, r.stdout.split())
    dense = 4 * 12288**2 * 4 / 2**20
    assert held < 10
    assert growth < 100, f"peak RSS grew {growth:.0f} MiB (dense weights: {dense:.0f} MiB)"


# -------------------------------------------------------------------------------------- real models


def _capture():
    """An observer keeping each call's q, k, mask and scale (the inputs eager would have seen)."""
    seen = []

    def observe(inputs, lse):
        seen.append((inputs.q.clone(), inputs.k.clone(), inputs.mask, inputs.scale))

    return seen, observe


def _eager_weights(fn, q, k, mask, scale, groups, padding=None, exact=True):
    """transformers' own eager_attention_forward on the same q, k: its dense fp32 weights; and the float64
    softmax of the very fp32 scores eager computed (what eager's weights would be with exact arithmetic)."""
    N, Sk = q.shape[2], k.shape[2]
    add = torch.zeros(q.shape[0], 1, N, Sk)
    if isinstance(mask, ao.causal):
        add = add.masked_fill(torch.ones(N, Sk, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    if padding is not None:
        add = add.masked_fill(~padding.bool()[:, None, None, :], torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=groups, training=False)
    w = fn(module, q, k, k, add, scaling=scale)[1]
    if not exact:
        return w, None
    s = torch.matmul(q, k.repeat_interleave(groups, 1).transpose(2, 3)) * scale  # eager's scores, bit for bit
    exact = torch.softmax(s.double() + add.double(), -1)
    return w, exact


def _check_layers(m, seen, fn, groups, layers, padding=None, rows=()):
    """Every view within 1e-6 of the exact softmax of eager's own fp32 scores, and within 1e-6 of eager's
    fp32 weights wherever eager's fp32 softmax is itself within 1e-7 of exact (its single-pass sum over
    ~2K keys can be off by ~1e-6 on sink-heavy rows: there attnopt is the closer one)."""
    for li in layers:
        q, k, mask, scale = seen[li]
        w, exact = _eager_weights(fn, q, k, mask, scale, groups, padding)
        o = from_dense([w], resolution=512, sink_tokens=4, query_rows=list(rows))
        t = from_dense([exact], resolution=512, sink_tokens=4, query_rows=list(rows))
        views = [
            (f"{stat} batch {b}", m.pooled(li, stat, b), o.pooled(0, stat, b), t.pooled(0, stat, b))
            for b in range(m.batch)
            for stat in ("mean", "max")
        ]
        if rows:
            views.append(("exact rows", m.rows[li], o.rows[0], t.rows[0]))
        for name, ours, eager, truth in views:
            ours, eager, truth = ours.double(), eager.double(), truth
            to_exact = (ours - truth).abs().max().item()
            assert to_exact <= 1e-6, f"layer {li} {name}: {to_exact:.2e} from exact > 1e-6"
            accurate = (eager - truth).abs() <= 1e-7
            to_eager = (ours - eager).abs()[accurate].max().item()
            assert to_eager <= 1e-6, f"layer {li} {name}: {to_eager:.2e} from eager > 1e-6"
        torch.testing.assert_close(m.received[li], o.received[0], rtol=1e-5, atol=1e-5)


def _layers(L):
    return range(L) if os.environ.get("ATTNOPT_MAPS_ALL_LAYERS") else sorted({0, L // 2, L - 1})


def test_smollm2_2048_tokens_pooled_maps_and_rows_equal_eager(smollm2):
    """Goal: pooled maps = pooling of eager's dense weights <= 1e-6 (fp32) at N = 2048 on SmolLM2, exact
    rows = eager's. Eager runs on the q, k attnopt saw (transformers' own eager_attention_forward)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from attnopt import demo

    model, tok = smollm2
    model.set_attn_implementation("attnopt")
    ids = demo.prompt_ids(tok, 2048)
    seen, observe = _capture()
    api._OBSERVERS.append(observe)
    try:
        with (
            record(resolution=512, query_rows=[2047, 1000], rollout_rows=[2047, 1000], model=model) as rec,
            torch.no_grad(),
        ):
            model(input_ids=ids, logits_to_keep=1)
    finally:
        api._OBSERVERS.remove(observe)
        model.set_attn_implementation("sdpa")
    m = rec.maps
    assert (m.num_layers, m.num_heads, m.Sq) == (30, 9, 2048)
    _check_layers(m, seen, eager_attention_forward, 3, _layers(30), rows=[2047, 1000])
    # Goal: rollout = a dense rollout <= 1e-5, the dense one from eager's weights, one layer at a time
    v = torch.zeros(1, 2, 2048, dtype=torch.float64)
    v[0, 0, 2047] = v[0, 1, 1000] = 1.0
    for q, k, mask, scale in reversed(seen):
        w = _eager_weights(eager_attention_forward, q, k, mask, scale, 3, exact=False)[0].mean(1).double()
        v = 0.5 * v + 0.5 * v @ w
    err = (m.rollout - v).abs().max().item()
    assert err <= 1e-5, f"rollout: {err:.2e} from the dense rollout of eager's weights"


def test_minilm_bidirectional_padded_batch_equals_eager(minilm):
    """MiniLM (BERT, bidirectional) at its longest input, 512 tokens, in a padded batch of two."""
    from transformers.models.bert.modeling_bert import eager_attention_forward

    model, tok = minilm
    text = "Attention weighs every token of the input against every other token. " * 60
    batch = tok([text, text[:700]], return_tensors="pt", padding=True, truncation=True, max_length=512)
    assert batch["input_ids"].shape[1] == 512
    model.set_attn_implementation("attnopt")
    seen, observe = _capture()
    api._OBSERVERS.append(observe)
    try:
        with record(resolution=512, query_rows=[0], model=model) as rec, torch.no_grad():
            model(**batch)
    finally:
        api._OBSERVERS.remove(observe)
        model.set_attn_implementation("eager")
    m = rec.maps
    assert (m.num_layers, m.num_heads, m.batch) == (6, 12, 2)
    _check_layers(m, seen, eager_attention_forward, 1, range(6), padding=batch["attention_mask"], rows=[0])
    # the padded keys of the short text receive nothing, in every layer
    pad = ~batch["attention_mask"][1].bool()
    assert m.received[:, 1, :, pad].abs().max() == 0


def test_masked_out_nan_keys_weigh_nothing_and_empty_problems_work():
    """A KV buffer holding NaN past the filled length, masked by padding: every view stays finite and equals
    the views of the filled part alone. Sk = 0 and Sq = 0 give empty or zero views."""
    torch.manual_seed(8)
    q, k = torch.randn(1, 4, 40, 8, dtype=torch.float64), torch.randn(1, 2, 40, 8, dtype=torch.float64)
    k[:, :, 30:] = float("nan")
    m = attention_maps(q, k, mask=ao.padding([30]), resolution=40, sink_tokens=1, query_rows=[3])
    clean = attention_maps(q, k[:, :, :30], resolution=40, sink_tokens=1, query_rows=[3])
    torch.testing.assert_close(m.pooled(0)[..., :30], clean.pooled(0))
    assert m.pooled(0)[..., 30:].abs().max() == 0 and m.received[..., 30:].abs().max() == 0
    torch.testing.assert_close(m.entropy, clean.entropy)
    torch.testing.assert_close(m.rows[..., :30], clean.rows)
    empty_k = attention_maps(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 0, 8), resolution=4, sink_tokens=1)
    assert empty_k.received.shape == (1, 1, 2, 0) and empty_k.entropy.abs().max() == 0
    empty_q = attention_maps(torch.randn(1, 2, 0, 8), torch.randn(1, 2, 6, 8), resolution=4, sink_tokens=1)
    assert empty_q.received.abs().max() == 0 and empty_q.pooled(0).shape == (2, 0, 4)


def test_output_attentions_inside_a_recording_is_not_a_layer_and_tokens_must_match(minilm):
    """output_attentions=True computes dense weights through attnopt too: that call is not recorded as a
    layer of its own, and the recorded maps equal the weights the model returned."""
    model, tok = minilm
    batch = tok(["A short sentence about attention maps."], return_tensors="pt")
    model.set_attn_implementation("attnopt")
    try:
        with record(resolution=64, sink_tokens=1) as rec, torch.no_grad():
            out = model(**batch, output_attentions=True)
        with (
            pytest.raises(ValueError, match="tokens: 3 texts"),
            record(tokens=["a", "b", "c"]),
            torch.no_grad(),
        ):
            model(**batch)
    finally:
        model.set_attn_implementation("eager")
    m = rec.maps
    assert m.num_layers == 6 and not api._OBSERVERS
    o = from_dense(list(out.attentions), resolution=64, sink_tokens=1)
    for li in range(6):
        torch.testing.assert_close(m.pooled(li), o.pooled(li), rtol=0, atol=1e-6)


def test_output_attentions_too_big_for_memory_is_refused_before_compute(monkeypatch):
    """Dense weights the device cannot hold: a clear error naming attnopt.maps, before the attention runs."""
    from attnopt.integrations import transformers as ao_hf

    monkeypatch.setattr(ao_hf, "available_memory", lambda device: 10_000)
    calls = []
    monkeypatch.setattr(ao, "attention", lambda *a, **k: calls.append(1))
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
    module = SimpleNamespace(is_causal=True)
    with pytest.raises(ValueError, match=r"need .* GiB .*attnopt\.maps\.record"):
        ao_hf.attention_forward(module, q, k, k, None, output_attentions=True)
    assert not calls


def test_review_findings_autocast_pinned_backend_empty_batch_and_query_labels():
    """Under autocast the maps are those of the bf16 call that ran; a pinned backend without an LSE still
    runs, with the same output; B = 0 and H = 0 record empty views; query labels are aligned bottom-right."""
    torch.manual_seed(9)
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    with record(resolution=40, query_rows=[-1]) as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        ao.attention(q, k, k, mask=ao.causal())
    m = rec.maps
    ran = reference_attention(*(t.bfloat16().double() for t in (q, k, k)), mask=ao.causal())[2]
    assert (m.pooled(0).double() - ran[0]).abs().max() < 1e-6
    torch.testing.assert_close(m.rows.sum(-1), torch.ones(1, 1, 2, 1))

    q, k = torch.randn(1, 8, 300, 64), torch.randn(1, 2, 300, 64)
    plain = ao.attention(q, k, k, mask=ao.causal(), backend="sdpa")
    with record(resolution=8) as rec:
        inside = ao.attention(q, k, k, mask=ao.causal(), backend="sdpa")
    assert torch.equal(plain, inside) and rec.maps.num_layers == 1

    empty_b = attention_maps(torch.randn(0, 2, 5, 8), torch.randn(0, 2, 5, 8), resolution=4, sink_tokens=1)
    assert empty_b.batch == 0 and empty_b.received.shape == (1, 0, 2, 5)
    empty_h = attention_maps(torch.randn(1, 0, 5, 8), torch.randn(1, 0, 5, 8), resolution=8, query_rows=[0])
    assert empty_h.pooled(0).shape == (0, 5, 5) and empty_h.rows.shape == (1, 1, 0, 1, 5)

    tokens = [f"t{i}" for i in range(12)]
    m = attention_maps(
        torch.randn(1, 1, 3, 8),
        torch.randn(1, 1, 12, 8),
        mask=ao.causal(),
        resolution=64,
        sink_tokens=0,
        tokens=tokens,
    )
    assert m.labels("q") == ["0 t9", "1 t10", "2 t11"] and m.labels("k")[0] == "0 t0"
