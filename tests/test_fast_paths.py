"""The O(N) backends at their tile boundaries, their memory bound, and the merge they share."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch

import attnopt as ao
from attnopt.backends import blockwise, span
from attnopt.merge import add_sinks, merge
from tests._oracle import Shape, assert_close
from tests.test_attention import check_against_oracle

# Sequence lengths at tile size - 1, tile size, tile size + 1 of each backend's tiling.
BW_Q, BW_K = blockwise.BLOCK_Q, blockwise.BLOCK_K
SP_Q, SP_K = span.BLOCK_Q, span.TILE_K
BOUNDARY = {
    "blockwise": [(sq, sk) for sq, sk in itertools.product((BW_Q - 1, BW_Q + 1), (BW_K - 1, BW_K, BW_K + 1))],
    "span": [(sq, sk) for sq, sk in itertools.product((SP_Q - 1, SP_Q, SP_Q + 1), (SP_K + 1, 3 * SP_K - 1))],
}
VARIANTS = {
    "blockwise": [
        "causal",
        "causal_and_window",
        "document_and_causal",
        "padding_and_causal",
        "softcap_causal",
        "sinks_window",
    ],
    "span": [
        "causal",
        "causal_and_window",
        "document_and_causal",
        "padding_and_causal",
        "alibi_causal",
        "sinks_window",
    ],
}


@pytest.mark.parametrize(
    ("backend", "variant", "sq", "sk"),
    [
        pytest.param(b, v, sq, sk, id=f"{b}-{v}-Sq{sq}_Sk{sk}")
        for b in ("blockwise", "span")
        for v in VARIANTS[b]
        for sq, sk in BOUNDARY[b]
    ],
)
def test_tile_boundaries(backend, variant, sq, sk):
    check_against_oracle(backend, variant, Shape(2, 4, 2, sq, sk, 16), torch.float32, "contiguous")


def _parts(g: torch.Generator, n_parts: int, empty: int | None):
    """Random partial results over disjoint key sets of one (B, H, Sq) problem, and the exact whole."""
    B, H, Sq, Sk, D = 2, 3, 5, 4 * n_parts, 8
    q = torch.randn(B, H, Sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Sk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Sk, D, generator=g, dtype=torch.float64)
    outs, lses = [], []
    for p in range(n_parts):
        sl = slice(4 * p, 4 * p + 4)
        if p == empty:  # a part whose keys are all masked: out 0, lse -inf
            o, lse = (
                torch.zeros(B, H, Sq, D, dtype=torch.float64),
                torch.full((B, H, Sq), float("-inf"), dtype=torch.float64),
            )
        else:
            o, lse = ao.attention(q, k[:, :, sl], v[:, :, sl], return_lse=True, backend="reference")
        outs.append(o)
        lses.append(lse)
    keep = torch.ones(Sk, dtype=torch.bool)
    if empty is not None:
        keep[4 * empty : 4 * empty + 4] = False
    whole = ao.attention(q, k, v, mask=keep, return_lse=True, backend="reference")
    return outs, lses, whole


@pytest.mark.parametrize("n_parts", [2, 3, 5])
@pytest.mark.parametrize("empty", [None, 0, 1])
def test_merge_is_exact_and_order_invariant(n_parts, empty):
    g = torch.Generator().manual_seed(n_parts * 10 + (empty or 0))
    outs, lses, (want_out, want_lse) = _parts(g, n_parts, empty)
    for perm in itertools.islice(itertools.permutations(range(n_parts)), 6):
        out, lse = merge([outs[i] for i in perm], [lses[i] for i in perm])
        torch.testing.assert_close(out, want_out, rtol=0, atol=1e-13)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-13)


def test_merge_of_only_empty_parts_is_an_empty_row_not_nan():
    z = torch.zeros(1, 1, 3, 4)
    ninf = torch.full((1, 1, 3), float("-inf"))
    out, lse = merge([z, z], [ninf, ninf])
    assert torch.equal(out, z) and torch.equal(lse, ninf)
    out, lse = add_sinks(z, ninf, torch.tensor([0.5]))
    assert torch.equal(out, z) and torch.equal(lse, torch.full_like(ninf, 0.5))


def test_merge_gradients_match_the_whole():
    g = torch.Generator().manual_seed(7)
    outs, lses, (want_out, _) = _parts(g, 3, None)
    outs = [o.detach().requires_grad_(True) for o in outs]
    lses = [x.detach().requires_grad_(True) for x in lses]
    out, _ = merge(outs, lses)
    assert torch.autograd.gradcheck(lambda *t: merge(list(t[:3]), list(t[3:]))[0], (*outs, *lses))
    assert_close("merged out", out, want_out, want_out, 2)


MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch, attnopt as ao
    from attnopt import mods
    torch.manual_seed(0)
    N, H, D = 16384, 2, 64
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    kw = {"causal": {"mask": ao.causal()}, "window": {"mask": ao.sliding_window(255)},
          "blockwise": {"mask": ao.causal(), "score_mod": mods.softcap(30.0), "backend": "blockwise"}}[sys.argv[1]]
    ao.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], **kw)  # libraries loaded, allocator warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ao.attention(q, k, v, **kw)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(grown_mb, torch.isfinite(out).all().item())
    """
)


@pytest.mark.parametrize("variant", ["causal", "window", "blockwise"])
def test_forward_at_16k_grows_peak_rss_by_less_than_256_mb(variant):
    """N=16384, 2 heads: scores would be 2 GiB in fp32; the O(N) paths must stay under 256 MB."""
    res = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, variant], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr
    grown_mb, finite = res.stdout.split()
    assert finite == "True"
    assert float(grown_mb) < 256, f"{variant}: peak RSS grew by {float(grown_mb):.0f} MB"


def test_plain_call_cache_gives_the_same_answers_and_errors():
    """api._PLAIN skips validate()+select() for repeated no-mask calls; it must never change an outcome."""
    from attnopt import api

    api._PLAIN.clear()
    q, k, v = torch.randn(1, 6, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    first = ao.attention(q, k, v)
    assert len(api._PLAIN) == 1
    torch.testing.assert_close(ao.attention(q, k, v), first, rtol=0, atol=0)
    # Same shapes, different scalar arguments or dtypes: validated afresh, errors intact.
    with pytest.raises(ValueError, match=r"dropout_p=1\.5"):
        ao.attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="scale must be a number"):
        ao.attention(q, k, v, scale=True)
    with pytest.raises(TypeError, match="mixed dtypes"):
        ao.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        ao.attention(q, k, v, backend="nope")
    # Grad state is part of the signature: a call needing a backward picks a backend that has one.
    qg = q.clone().requires_grad_()
    ao.attention(qg, k, v).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    ref = ao.attention(q.double(), k.double(), v.double(), backend="reference")
    torch.testing.assert_close(first.double(), ref, rtol=1e-5, atol=1e-6)
