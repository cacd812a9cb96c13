"""Masked-out data contributes exactly nothing, even NaN, inf or overflowing garbage, forward and backward.

A KV cache allocated with torch.empty and read with padding lengths holds arbitrary bits where the mask
says "not this key". Each case below puts garbage only where the mask excludes it (keys no query keeps,
keys some rows keep and others mask, query rows that see no key) and runs every backend twice: with
the garbage and with zeros in the same places. Rows that never keep a bad entry must come out bitwise
equal, and so must the gradients that do not depend on such rows; rows that do keep one must not be
silently finite. A fused backend that cannot do this refuses, and `auto` never picks it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import attnopt as ao
from attnopt import mods as am
from attnopt.masks import tile_indices
from tests._oracle import DTYPE_NAMES, assert_close, oracle

BACKENDS = ("auto", "sdpa", "span", "blockwise", "reference")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GARBAGE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": None}


class Case:
    """A mask setup and where to put the garbage: bad[b, hkv, j] keys (k and v), bad_q[b, h, i] queries."""

    def __init__(
        self,
        B: int,
        Hq: int,
        Hkv: int,
        Sq: int,
        Sk: int,
        kwargs: Callable[[], dict],
        bad_keys: Callable[[Tensor], None],
        bad_q: Callable[[Tensor], None] | None = None,
    ):
        self.shape = (B, Hq, Hkv, Sq, Sk)
        self.kwargs, self.bad_keys, self.bad_q = kwargs, bad_keys, bad_q


def _pad_lengths():
    return torch.tensor([40, 13])


CASES = {
    # keys no query keeps
    "padding": Case(
        2, 4, 2, 7, 40, lambda: {"mask": ao.padding(_pad_lengths())}, lambda m: m[1, :, 13:].fill_(True)
    ),
    "padding_decode_gqa": Case(
        2, 8, 2, 1, 40, lambda: {"mask": ao.padding(_pad_lengths())}, lambda m: m[1, :, 13:].fill_(True)
    ),
    "left_padding_and_causal": Case(
        2,
        4,
        2,
        9,
        40,
        lambda: {"mask": ao.left_padding(torch.tensor([0, 21])) & ao.causal()},
        lambda m: m[1, :, :21].fill_(True),
    ),
    "padding_len0_bad_queries": Case(
        2,
        4,
        2,
        9,
        30,
        lambda: {"mask": ao.padding(torch.tensor([30, 0]))},
        lambda m: m[1].fill_(True),
        lambda m: m[1].fill_(True),  # batch element 1 sees no key: its queries may be garbage too
    ),
    "window_far_keys": Case(  # keys behind every query's window: whole EMPTY tiles
        1, 4, 4, 40, 600, lambda: {"mask": ao.sliding_window(16)}, lambda m: m[:, :, 3:500].fill_(True)
    ),
    "bias_neg_inf_column": Case(
        1,
        4,
        2,
        11,
        20,
        lambda: {
            "score_mod": am.bias(torch.zeros(1, 1, 1, 20).index_fill_(-1, torch.tensor([4, 17]), -torch.inf))
        },
        lambda m: m[:, :, [4, 17]].fill_(True),
    ),
    # keys some rows keep and others mask: the rows that mask them must be exact
    "window_edge_key": Case(
        1, 4, 2, 40, 40, lambda: {"mask": ao.sliding_window(8)}, lambda m: m[:, :, 11].fill_(True)
    ),
    "causal_future_key": Case(
        1, 4, 2, 40, 40, lambda: {"mask": ao.causal()}, lambda m: m[:, :, 25].fill_(True)
    ),
    "document_other_doc": Case(
        1, 4, 2, 40, 40, lambda: {"mask": ao.document([0, 13, 29, 40])}, lambda m: m[:, :, 15:20].fill_(True)
    ),
    "dense_mask": Case(
        2,
        4,
        2,
        12,
        30,
        lambda: {"mask": torch.rand(2, 1, 12, 30, generator=torch.Generator().manual_seed(3)) > 0.4},
        lambda m: m[:, :, 7].fill_(True),
    ),
    "bias_neg_inf_row_bad_query": Case(  # a query row the bias hides entirely, its q garbage
        1,
        4,
        2,
        6,
        9,
        lambda: {"score_mod": am.bias(torch.zeros(1, 1, 6, 1).index_fill_(2, torch.tensor([2]), -torch.inf))},
        lambda m: None,
        lambda m: m[:, :, 2].fill_(True),
    ),
    "euclidean_padding": Case(
        2,
        4,
        2,
        7,
        40,
        lambda: {"mask": ao.padding(_pad_lengths()), "similarity": "euclidean"},
        lambda m: m[1, :, 13:].fill_(True),
    ),
    "cosine_padding": Case(
        2,
        4,
        2,
        7,
        40,
        lambda: {"mask": ao.padding(_pad_lengths()), "similarity": "cosine"},
        lambda m: m[1, :, 13:].fill_(True),
    ),
    "custom_mask": Case(
        1,
        4,
        2,
        20,
        20,
        lambda: {"mask": ao.custom(lambda b, h, i, j: (i - j) % 3 == 0)},
        lambda m: m[:, :, 5].fill_(True),
    ),
}


def _keep(q: Tensor, k: Tensor, kwargs: dict) -> Tensor:
    """(B, Hq, Sq, Sk) bool: which scores the call keeps (mask, and -inf bias entries as hard masks)."""
    inputs = ao.api.validate(q, k, k, **kwargs, backends=["reference"])
    b, h, i, j = tile_indices(inputs.ctx, 0, inputs.Sq, 0, inputs.Sk)
    keep = torch.ones(inputs.B, inputs.Hq, inputs.Sq, inputs.Sk, dtype=torch.bool)
    if inputs.mask is not None:
        keep = keep & inputs.mask.keep(b, h, i, j, inputs.ctx)
    for mod in inputs.mods:
        keep = keep & (mod.bias > -torch.inf)
    return keep


def _run(backend: str, q: Tensor, k: Tensor, v: Tensor, kwargs: dict, do: Tensor):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = ao.attention(*leaves, **kwargs, backend=backend)
    out.backward(do)
    return out.detach(), [t.grad for t in leaves]


def _cases():
    for name, dtype, garbage, backend in itertools.product(CASES, DTYPES, GARBAGE, BACKENDS):
        yield pytest.param(
            name, dtype, garbage, backend, id=f"{backend}-{DTYPE_NAMES[dtype]}-{name}-{garbage}"
        )


@pytest.mark.parametrize(("case", "dtype", "garbage", "backend"), list(_cases()))
def test_masked_out_garbage_changes_nothing(case, dtype, garbage, backend):
    c = CASES[case]
    B, Hq, Hkv, Sq, Sk = c.shape
    G, D = Hq // Hkv, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g).to(dtype) for _ in range(2))
    do = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    kwargs = c.kwargs()
    bad_k = torch.zeros(B, Hkv, Sk, dtype=torch.bool)
    c.bad_keys(bad_k)
    bad_q = torch.zeros(B, Hq, Sq, dtype=torch.bool)
    if c.bad_q is not None:
        c.bad_q(bad_q)
    # Garbage in the bad places, zeros in the same places for the clean run; v's garbage has the other
    # sign, so +inf and -inf rows would cancel to NaN if they were ever summed.
    val = GARBAGE[garbage] if garbage != "huge" else torch.finfo(dtype).max  # finite, overflows any score
    dirty = [
        q.masked_fill(bad_q[..., None], val),
        k.masked_fill(bad_k[..., None], val),
        v.masked_fill(bad_k[..., None], -val),
    ]
    clean = [
        q.masked_fill(bad_q[..., None], 0),
        k.masked_fill(bad_k[..., None], 0),
        v.masked_fill(bad_k[..., None], 0),
    ]

    keep = _keep(q, k, kwargs)  # (B, Hq, Sq, Sk)
    bad_k_h = bad_k.repeat_interleave(G, dim=1)  # (B, Hq, Sk)
    hit = (keep & bad_k_h[:, :, None, :]).any(-1) | (bad_q & keep.any(-1))  # rows that keep garbage
    keys_of_hit = (keep & hit[..., None]).any(2)  # (B, Hq, Sk): keys those rows keep
    keys_hit = keys_of_hit.view(B, Hkv, G, Sk).any(2) | bad_k  # (B, Hkv, Sk): their dk/dv may differ

    if backend != "auto":
        try:
            got_out, got_grads = _run(backend, *dirty, kwargs, do)
        except NotImplementedError as e:
            assert backend in ("sdpa", "span"), f"{backend} must run every input: {e}"
            assert "NaN/inf" in str(e) or "scores reach" in str(e) or "cannot run" in str(e)
            return
        ran = backend
    else:
        text = ao.explain(*(t.detach().requires_grad_(True) for t in dirty), **kwargs)
        ran = text.split("-> runs on '")[1].split("'")[0]
        got_out, got_grads = _run("auto", *dirty, kwargs, do)
    want_out, want_grads = _run(ran, *clean, kwargs, do)

    assert torch.equal(got_out[~hit], want_out[~hit]), f"{ran}: rows that never keep garbage changed"
    if garbage != "huge":  # a kept huge-but-finite value may well give a finite row
        assert not torch.isfinite(got_out[hit]).all(-1).any(), (
            f"{ran}: a row that keeps NaN/inf came out finite"
        )
    (dq, dk, dv), (wq, wk, wv) = got_grads, want_grads
    assert torch.equal(dq[~hit], wq[~hit]), f"{ran}: dq of rows that never keep garbage changed"
    assert torch.equal(dk[~keys_hit], wk[~keys_hit]), f"{ran}: dk of keys untouched by garbage changed"
    assert torch.equal(dv[~keys_hit], wv[~keys_hit]), f"{ran}: dv of keys untouched by garbage changed"
    masked_for_all = bad_k & ~keys_of_hit.view(B, Hkv, G, Sk).any(2)  # garbage keys no row keeps
    masked_for_all &= ~(keep.view(B, Hkv, G, Sq, Sk).any((2, 3)))
    assert (dk[masked_for_all] == 0).all() and (dv[masked_for_all] == 0).all()
    # and the rows that never keep garbage are right: the float64 oracle on clean data, the tolerance rule
    ref, _ = oracle([t.double() for t in clean], kwargs)
    plain, _ = oracle(clean, kwargs, compute_dtype=dtype)
    magnitude = float(v.double().abs().max())
    assert_close("out", got_out[~hit], plain[~hit], ref[~hit], 2, magnitude=magnitude, n_sum=D + Sk * G)


@pytest.mark.parametrize("case", ["window_edge_key", "document_other_doc", "causal_future_key", "dense_mask"])
def test_auto_never_picks_a_backend_that_spreads_garbage(case):
    c = CASES[case]
    B, Hq, Hkv, Sq, Sk = c.shape
    q, k, v = torch.randn(B, Hq, Sq, 16), torch.randn(B, Hkv, Sk, 16), torch.randn(B, Hkv, Sk, 16)
    bad = torch.zeros(B, Hkv, Sk, dtype=torch.bool)
    c.bad_keys(bad)
    v = v.masked_fill(bad[..., None], float("nan"))
    text = ao.explain(q, k, v, **c.kwargs())
    assert "-> runs on 'blockwise'" in text, text
    assert "q, k or v hold NaN/inf and the mask hides some scores" in text


def test_issue_reproducer_padding_with_nan_keys():
    """Issue reproducer: NaN keys/values beyond a padding length made the whole batch element NaN."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 2, 1, 16, generator=g),
        torch.randn(2, 2, 8, 16, generator=g),
        torch.randn(2, 2, 8, 16, generator=g),
    )
    k[1, :, 5:] = float("nan")
    v[1, :, 5:] = float("nan")
    with pytest.raises(NotImplementedError, match="NaN/inf"):  # span would merge the garbage: it refuses
        ao.attention(q, k, v, mask=ao.padding(torch.tensor([8, 5])), backend="span")
    for backend in ("auto", "sdpa", "blockwise", "reference"):
        out = ao.attention(q, k, v, mask=ao.padding(torch.tensor([8, 5])), backend=backend)
        want = ao.attention(q[1:], k[1:, :, :5], v[1:, :, :5], backend="reference")
        torch.testing.assert_close(out[1:], want, rtol=1e-5, atol=1e-6)


def test_uninitialized_kv_cache():
    """The case users hit: a KV cache from torch.empty, filled up to each sequence's length."""
    B, Hq, Hkv, S, D = 3, 6, 2, 64, 16
    g = torch.Generator().manual_seed(1)
    cache_k = torch.empty(B, Hkv, S, D).fill_(float("nan"))
    cache_v = torch.empty(B, Hkv, S, D)
    cache_v.view(torch.int32).fill_(0x7F800001)  # a NaN bit pattern, as garbage memory may hold
    lengths = torch.tensor([64, 17, 40])
    for b, n in enumerate(lengths.tolist()):
        cache_k[b, :, :n] = torch.randn(Hkv, n, D, generator=g)
        cache_v[b, :, :n] = torch.randn(Hkv, n, D, generator=g)
    q = torch.randn(B, Hq, 1, D, generator=g)
    out = ao.attention(q, cache_k, cache_v, mask=ao.padding(lengths))
    for b, n in enumerate(lengths.tolist()):
        want = ao.attention(
            q[b : b + 1], cache_k[b : b + 1, :, :n], cache_v[b : b + 1, :, :n], backend="reference"
        )
        torch.testing.assert_close(out[b : b + 1], want, rtol=1e-5, atol=1e-6)
