"""Split-KV decode (backend 'splitkv', attention(num_splits=...)): exact, batch-invariant, validated.

Exactness is checked against the float64 oracle with the one tolerance rule (tests/_oracle.py), for
every dtype, GQA and MHA, Sq in {1, 2}, Sk not divisible by n (the overlap-masked chunk view), key-only
masks with garbage in the masked keys, sinks and the LSE. Batch invariance: with num_splits fixed, a
row's bits do not depend on what else is in the batch.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch import Tensor

import attnopt as ao
from attnopt import _dispatch, _op
from attnopt.backends import splitkv
from tests._oracle import DTYPE_NAMES, assert_close, oracle

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALL_DTYPES = (*DTYPES, torch.float64)
SHAPES = {  # (B, Hq, Hkv, Sq, Sk, D)
    "gqa_decode": (2, 9, 3, 1, 203, 64),
    "mha_decode": (3, 4, 4, 1, 100, 32),
    "gqa_sq2": (2, 8, 2, 2, 301, 16),
}
MASKS = {
    "none": lambda B, Sk: None,
    "causal_sq1": lambda B, Sk: ao.causal(),  # bottom-right with one query: every key
    "padding": lambda B, Sk: ao.padding(torch.tensor([Sk, Sk // 3, 1, Sk - 7][:B])),
    "left_padding": lambda B, Sk: ao.left_padding(torch.tensor([0, Sk // 2, Sk - 1, 5][:B])),
}


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _one_thread():
    """Correctness does not depend on the thread count (each kernel item is computed alone); one thread
    keeps this file fast on a shared machine. Tests about threads (auto choice, batch invariance across
    thread schedules) set their own with threads()."""
    with threads(1):
        yield


def _qkv(shape, dtype, seed=0) -> list[Tensor]:
    B, Hq, Hkv, Sq, Sk, D = shape
    g = torch.Generator().manual_seed(seed)
    sizes = [(B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in sizes]


def _check_exact(shape, dtype, kwargs, n):
    q, k, v = _qkv(shape, dtype)
    with torch.no_grad():
        out, lse = ao.attention(q, k, v, **kwargs, num_splits=n, return_lse=True, backend="splitkv")
    plain = oracle([q, k, v], kwargs, compute_dtype=dtype)
    ref = oracle([t.double() for t in (q, k, v)], {**kwargs, "sinks": _f64(kwargs.get("sinks"))})
    _, Hq, Hkv, Sq, Sk, D = shape
    n_sum = D + max(Sq, Sk) * (Hq // Hkv)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("out", out, plain[0], ref[0], 2, magnitude=float(v.abs().max()), n_sum=n_sum)
    assert_close("lse", lse, plain[1], ref[1], 2, n_sum=n_sum)


def _f64(t):
    return None if t is None else t.double()


def _oracle_cases():
    for dtype, shape, mask, n in itertools.product(ALL_DTYPES, SHAPES, MASKS, [None, 1, 2, 3, 8]):
        if mask == "causal_sq1" and SHAPES[shape][3] != 1:
            continue  # bottom-right causal keeps every key only with one query
        if dtype == torch.float64 and shape != "gqa_decode":
            continue
        yield pytest.param(dtype, shape, mask, n, id=f"{DTYPE_NAMES[dtype]}-{shape}-{mask}-n{n}")


@pytest.mark.parametrize(("dtype", "shape", "mask", "n"), list(_oracle_cases()))
def test_matches_oracle(dtype, shape, mask, n):
    s = SHAPES[shape]
    _check_exact(s, dtype, {"mask": MASKS[mask](s[0], s[4])}, n)


@pytest.mark.parametrize("n", [None, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
def test_sinks_and_cosine(dtype, n):
    s = SHAPES["gqa_decode"]
    sinks = torch.linspace(-2, 3, s[1]).to(dtype)
    _check_exact(s, dtype, {"sinks": sinks, "mask": ao.padding(torch.tensor([150, 20]))}, n)
    _check_exact(s, dtype, {"similarity": "cosine", "mask": ao.left_padding(torch.tensor([3, 0]))}, n)


def test_empty_rows_and_more_splits_than_keys():
    q, k, v = _qkv((3, 4, 2, 1, 5, 16), torch.float32)
    mask = ao.padding(torch.tensor([5, 0, 2]))  # batch element 1 sees no key
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    for n in (None, 1, 2, 3, 8):  # 8 > Sk: at most Sk chunks; some chunks of element 2 are empty
        out, lse = ao.attention(q, k, v, mask=mask, num_splits=n, return_lse=True, backend="splitkv")
        assert torch.equal(out[1], torch.zeros_like(out[1])) and bool((lse[1] == -torch.inf).all())
        ref = oracle([q, k, v], {"mask": mask})
        assert torch.allclose(out, ref[0].float(), atol=1e-6) and torch.equal(lse.isinf(), ref[1].isinf())
        out, lse = ao.attention(q, k, v, mask=mask, sinks=sinks, num_splits=n, return_lse=True)
        assert torch.equal(lse[1], sinks[:, None]) and torch.equal(out[1], torch.zeros_like(out[1]))
    # no key kept anywhere: zeros without running the kernel
    none = ao.padding(torch.tensor([0, 0, 0]))
    out, lse = ao.attention(q, k, v, mask=none, return_lse=True, backend="splitkv")
    assert not out.any() and bool((lse == -torch.inf).all())


GARBAGE = {"nan": float("nan"), "inf": float("inf"), "huge": None}


@pytest.mark.parametrize("n", [None, 1, 4])
@pytest.mark.parametrize("garbage", list(GARBAGE))
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
def test_masked_out_garbage_contributes_nothing(dtype, garbage, n):
    """NaN/inf/overflowing values in keys the mask hides (and in the queries of an element with no key)
    give bitwise the same output as zeros there; a row that keeps NaN comes out NaN."""
    B, Hq, Hkv, Sk, D = 3, 8, 2, 257, 16
    q, k, v = _qkv((B, Hq, Hkv, 1, Sk, D), dtype)
    lengths = torch.tensor([257, 100, 0])
    bad = torch.arange(Sk)[None, :] >= lengths[:, None]  # (B, Sk): masked-out keys
    val = GARBAGE[garbage] if garbage != "huge" else torch.finfo(dtype).max
    dirty = [q.clone(), k.masked_fill(bad[:, None, :, None], val), v.masked_fill(bad[:, None, :, None], -val)]
    dirty[0][2] = val  # element 2 sees no key: its queries may be garbage too
    clean = [q.clone(), k.masked_fill(bad[:, None, :, None], 0), v.masked_fill(bad[:, None, :, None], 0)]
    clean[0][2] = 0
    mask = ao.padding(lengths)
    run = {"num_splits": n, "backend": "splitkv"}  # None: splitkv's automatic path (slices keys)
    got = ao.attention(*dirty, mask=mask, **run)
    want = ao.attention(*clean, mask=mask, **run)
    assert torch.equal(got, want)
    # left padding: the garbage sits in front
    lp = ao.left_padding(Sk - lengths)
    flip = [t.flip(2) for t in dirty[1:]]
    assert torch.equal(
        ao.attention(dirty[0], *flip, mask=lp, **run),
        ao.attention(clean[0], *(t.flip(2) for t in clean[1:]), mask=lp, **run),
    )
    if garbage == "nan":  # a kept NaN key: that row is NaN, the others unaffected
        k2 = k.clone()
        k2[0, 1, 7] = float("nan")
        out = ao.attention(q, k2, v, **run)
        assert out[0, 4:8].isnan().all() and not out[0, :4].isnan().any() and not out[1].isnan().any()


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("mask", ["none", "padding", "left_padding"])
@pytest.mark.parametrize("Sk", [1000, 1024])  # 1000 % 4 != 0: the overlap-masked view
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_invariant(dtype, Sk, mask, n):
    """With num_splits fixed, each row of a B=5 batch equals, bit for bit, the row computed alone and in
    other batch compositions."""
    B, Hq, Hkv, D = 5, 9, 3, 64
    q, k, v = _qkv((B, Hq, Hkv, 1, Sk, D), dtype, seed=3)
    lengths = torch.tensor([Sk, 17, Sk // 2, 1, Sk - 300])

    def mask_of(idx):
        if mask == "padding":
            return ao.padding(lengths[idx])
        if mask == "left_padding":
            return ao.left_padding(Sk - lengths[idx])
        return None

    def run(idx):
        idx = torch.tensor(idx)
        return ao.attention(q[idx], k[idx], v[idx], mask=mask_of(idx), num_splits=n, return_lse=True)

    with threads(2):
        out, lse = run(range(B))
    for i in range(B):
        o1, l1 = run([i])
        assert torch.equal(o1[0], out[i]) and torch.equal(l1[0], lse[i]), f"row {i} alone differs"
    for idx in ([4, 0, 2], [1, 3], [2, 2, 0, 4, 1, 3]):
        o, lo = run(idx)
        assert torch.equal(o, out[idx]) and torch.equal(lo, lse[idx]), f"composition {idx} differs"


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("kind", ["random", "equal_scores"])
def test_huge_scores_merge_exactly_per_row(kind, n):
    """Rows whose scores reach thousands (the float32 LSE then cannot weigh chunks or sinks right) are
    recomputed exactly; the decision is per row, so the other rows keep their bits. Equal scores are
    where LSE rounding shows most (the plain computation is exact there)."""
    B, Hq, Hkv, Sk, D = 3, 4, 2, 600, 16
    q, k, v = _qkv((B, Hq, Hkv, 1, Sk, D), torch.float32, seed=5)
    if kind == "random":
        q[1] *= 2000.0  # scores ~ 2000 * |q||k| / 4: far beyond FUSED_SCORE_LIMIT
    else:
        q[1], k[1] = 133120.0 / 4, 133120.0 / 4  # every score of element 1 is the same huge number
    sinks = torch.tensor([0.0, 1.0, -2.0, 1e5])
    mask = ao.padding(torch.tensor([600, 333, 100]))
    for kwargs in ({}, {"sinks": sinks}, {"mask": mask, "sinks": sinks}):
        out, lse = ao.attention(q, k, v, **kwargs, num_splits=n, return_lse=True, backend="splitkv")
        ref = oracle([t.double() for t in (q, k, v)], {**kwargs, "sinks": _f64(kwargs.get("sinks"))})
        plain = oracle([q, k, v], kwargs, compute_dtype=torch.float32)
        assert_close("out", out, plain[0], ref[0], 2, magnitude=float(v.abs().max()), n_sum=D + 2 * Sk)
        assert_close("lse", lse, plain[1], ref[1], 2, n_sum=D + 2 * Sk)
        for i in (0, 2):
            one = {**kwargs, "mask": ao.padding(mask.kv_lengths[i : i + 1])} if "mask" in kwargs else kwargs
            o1, l1 = ao.attention(
                q[i : i + 1], k[i : i + 1], v[i : i + 1], **one, num_splits=n, return_lse=True
            )
            assert torch.equal(o1[0], out[i]) and torch.equal(l1[0], lse[i])


def test_layouts_that_do_not_merge_are_copied():
    """(B, S, H, D) storage with B > 1: batch and head dims do not merge into one strided dim."""
    q, k, v = _qkv((2, 6, 3, 1, 300, 32), torch.float32)
    kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    assert "copied" in ao.explain(q, kt, vt, num_splits=3)
    assert torch.equal(ao.attention(q, kt, vt, num_splits=3), ao.attention(q, k, v, num_splits=3))


# ------------------------------------------------------------------------------------ API, dispatch


@pytest.mark.parametrize(
    ("value", "kind", "pattern"),
    [
        (True, TypeError, "num_splits must be an int or None, got bool True"),
        (2.0, TypeError, "num_splits must be an int or None, got float 2.0"),
        ("4", TypeError, "num_splits must be an int or None, got str '4'"),
        (0, ValueError, "num_splits=0 must be >= 1"),
        (-3, ValueError, "num_splits=-3 must be >= 1"),
    ],
)
def test_num_splits_validation(value, kind, pattern, monkeypatch):
    def boom(inputs):
        raise AssertionError("a backend's forward() ran; validation should have failed first")

    for b in _dispatch.PRIORITY:
        monkeypatch.setattr(b, "forward", boom)
    q, k, v = _qkv((1, 2, 1, 1, 8, 4), torch.float32)
    for fn in (ao.attention, ao.explain):
        with pytest.raises(kind, match=pattern) as info:
            fn(q, k, v, num_splits=value)
        assert "HINT" in str(info.value) and "q (1, 2, 1, 4)" in str(info.value)


def test_signature_cache_tells_true_from_1():
    q, k, v = _qkv((1, 2, 1, 1, 8, 4), torch.float32)
    ao.attention(q, k, v, num_splits=1)
    with pytest.raises(TypeError, match="got bool True"):  # True == 1 as a dict key; the type is keyed too
        ao.attention(q, k, v, num_splits=True)


def test_other_backends_refuse_splits_and_prefill_fails_clearly(monkeypatch):
    q, k, v = _qkv((1, 9, 3, 1, 64, 16), torch.float32)
    text = ao.explain(q, k, v, num_splits=4)
    assert "-> runs on 'splitkv'" in text and "4 chunks of 16 keys (fixed by num_splits)" in text
    for name in ("sdpa", "span", "blockwise", "reference"):
        line = next(x for x in text.split("\n") if x.strip().startswith(name))
        assert "cannot run: num_splits=4: this backend does not split the keys" in line
    with pytest.raises(NotImplementedError, match=r"(?s)backend='sdpa' cannot run.*num_splits=4"):
        ao.attention(q, k, v, num_splits=4, backend="sdpa")
    assert "-> runs on 'sdpa'" in ao.explain(q, k, v, num_splits=1, backend="sdpa")
    # prefill: nothing splits it; a clear error before any compute, listing every backend's reasons
    qp = torch.randn(1, 9, 40, 16)
    assert "-> no backend can run these inputs" in ao.explain(qp, k, v, num_splits=4)
    for b in _dispatch.PRIORITY:
        monkeypatch.setattr(b, "forward", lambda inputs: pytest.fail("compute started"))
    with pytest.raises(
        NotImplementedError, match=r"(?s)no backend can run.*splitkv: G·Sq = 3·40 = 120.*HINT"
    ):
        ao.attention(qp, k, v, num_splits=4)


def test_refuses_what_it_cannot_run():
    q, k, v = _qkv((1, 4, 2, 1, 64, 16), torch.float32)
    inputs = ao.api.validate(q, k, v, mask=ao.sliding_window(8), backends=list(_dispatch.BACKENDS))
    assert any("key-only masks" in r for r in _dispatch.BACKENDS["splitkv"].not_supported_reasons(inputs))
    qg = q.clone().requires_grad_(True)
    assert ao.attention(qg, k, v, num_splits=1, backend="sdpa").requires_grad  # others take gradients
    assert "inputs require grad" in ao.explain(qg, k, v)
    with pytest.raises(NotImplementedError, match="inputs require grad"):
        ao.attention(qg, k, v, num_splits=2)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        ao.attention(q, k, v, num_splits=2, dropout_p=0.1)


def test_auto_picks_splitkv_where_its_rank_says():
    """The goal shape (SmolLM2 decode at 8K keys, fp32, 2 threads) splits; with one thread, enough kv
    heads to keep the threads busy, short caches, fp16 or a mask, nothing splits and sdpa runs as before."""
    cases = [  # (B, Hq, Hkv, Sk, threads, dtype, mask, splits)
        (1, 9, 3, 8192, 2, torch.float32, None, True),
        (1, 8, 1, 8192, 2, torch.float32, None, True),
        (1, 9, 3, 16384, 2, torch.bfloat16, None, True),
        (1, 9, 3, 8192, 2, torch.bfloat16, None, False),
        (1, 9, 3, 16384, 2, torch.float16, None, False),
        (1, 9, 3, 8192, 1, torch.float32, None, False),
        (1, 9, 3, 4096, 2, torch.float32, None, False),
        (1, 9, 3, 8191, 2, torch.float32, None, True),
        (1, 32, 8, 8192, 2, torch.float32, None, False),
        (2, 9, 3, 8192, 2, torch.float32, None, False),
        (1, 9, 3, 8192, 2, torch.float32, ao.padding(torch.tensor([8000])), False),
        (1, 9, 3, 8192, 2, torch.float32, ao.causal(), True),  # Sq = 1: every key
    ]
    for B, Hq, Hkv, Sk, t, dtype, mask, splits in cases:
        q, k, v = (torch.zeros(B, h, s, 64, dtype=dtype) for h, s in ((Hq, 1), (Hkv, Sk), (Hkv, Sk)))
        with threads(t):
            n = splitkv.auto_splits(B, Hkv, Sk, 64, t, dtype)
            inputs = ao.api.validate(q, k, v, mask=mask, backends=list(_dispatch.BACKENDS))
            chosen = _dispatch.select(inputs).name
            rank = _dispatch.BACKENDS["splitkv"].rank(inputs)
            assert (chosen == "splitkv") == splits == (rank == 0), (B, Hq, Hkv, Sk, t, dtype, n, chosen)
            assert chosen in ("splitkv", "sdpa")
            if splits:
                assert f"{n} chunks" in ao.explain(q, k, v, mask=mask) and n == 4


def test_decode_signature_cache_keys_on_threads_and_splits():
    q, k, v = _qkv((1, 9, 3, 1, 4096, 16), torch.float32)
    with threads(1):
        a = ao.attention(q, k, v)
        assert "-> runs on 'sdpa'" in ao.explain(q, k, v)
    with threads(2):
        b = ao.attention(q, k, v)
        c = ao.attention(q, k, v, num_splits=3)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(b, c, atol=1e-6)


def test_compile_structure_string_carries_num_splits():
    spec, tensors, ints, floats = _op.encode(ao.padding(torch.tensor([3, 5])), None, 4)
    mask, mods, n = _op._decode(spec, tensors, ints, floats)
    assert n == 4 and mods is None and isinstance(mask, ao.masks.padding)
    assert _op._decode(*_op.encode(None, None))[2] is None
    with pytest.raises(TypeError, match="num_splits must be an int"):
        _op.encode(None, None, 2.5)
    q, k, v = _qkv((2, 4, 2, 1, 50, 16), torch.float32)
    mask = ao.padding(torch.tensor([50, 20]))
    want = ao.attention(q, k, v, mask=mask, num_splits=3)
    fn = torch.compile(lambda q, k, v: ao.attention(q, k, v, mask=mask, num_splits=3), backend="eager")
    assert torch.equal(fn(q, k, v), want)


def test_unsplit_is_the_plain_fused_call():
    """num_splits=1 is one pass over all keys: it agrees with sdpa's unsplit call to rounding."""
    for dtype, (B, Hq, Hkv) in itertools.product(DTYPES, [(1, 9, 3), (2, 4, 4)]):
        q, k, v = _qkv((B, Hq, Hkv, 1, 700, 64), dtype)
        a = ao.attention(q, k, v, num_splits=1)
        b = ao.attention(q, k, v, backend="sdpa")
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(a.float(), b.float(), atol=tol), DTYPE_NAMES[dtype]
