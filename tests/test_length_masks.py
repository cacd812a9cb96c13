"""cache_causal and document_causal: per-sequence lengths in generation, checked against their definitions.

* keep() against dense planes built here with plain loops from the definitions (never the library).
* classify() sound and exact, key_range() / full_key_range() exactly the tightest bounds.
* attention() on every backend against the float64 oracle (forward and backward, fp32 and bf16, GQA),
  and against separate per-sequence / per-document calls with plain causal().
* Validation: wrong count, out-of-range values, float dtypes and bad ``left`` fail before compute.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import Tensor

import attnopt as ao
from attnopt import _dispatch, masks
from attnopt.masks import MaskContext, Tile
from tests._oracle import DTYPE_NAMES, Shape, assert_close, make_leaves, oracle, run_and_grads, upcast
from tests.test_masks import classification_problems, truth_per_tile

HQ = 2
TILE_SIZES = (1, 3, 16, 64)
BACKENDS = ("reference", "blockwise", "span", "sdpa", "auto")


# --------------------------------------------------------------------------------------------------
# The definitions, as plain loops: bool planes (B, Sq, Sk).


def cache_plane(lengths: list[int], Sq: int, Sk: int, left: int | None) -> Tensor:
    """Query i of sequence b sits at p = lengths[b] - Sq + i; keeps j <= p (and j >= p - left)."""
    planes = []
    for L in lengths:
        rows = []
        for i in range(Sq):
            p = L - Sq + i
            rows.append([j <= p and (left is None or j >= p - left) for j in range(Sk)])
        planes.append(rows)
    return torch.tensor(planes, dtype=torch.bool).reshape(len(lengths), Sq, Sk)


def doc_plane(cu_q: list[int], cu_k: list[int], Sq: int, Sk: int) -> Tensor:
    """Query i of document d sits at local (i - cu_q[d]) + (len_k - len_q); keeps its document's
    keys j with j - cu_k[d] <= that position."""
    rows = [[False] * Sk for _ in range(Sq)]
    for d in range(len(cu_q) - 1):
        len_q, len_k = cu_q[d + 1] - cu_q[d], cu_k[d + 1] - cu_k[d]
        for i in range(cu_q[d], cu_q[d + 1]):
            pos = (i - cu_q[d]) + (len_k - len_q)
            for j in range(cu_k[d], cu_k[d + 1]):
                rows[i][j] = j - cu_k[d] <= pos
    return torch.tensor(rows, dtype=torch.bool).reshape(1, Sq, Sk)


# --------------------------------------------------------------------------------------------------
# Cases: (id, mask, ctx, full plane (B, Hq, Sq, Sk)).


def _cache_cases() -> list:
    g = torch.Generator().manual_seed(7)
    cases = []
    for Sk in (1, 7, 16, 70):
        for Sq in sorted({1, 3, Sk}):
            rand = torch.randint(0, Sk + 1, (2,), generator=g).tolist()
            for lengths in ([0, Sk, *rand, min(Sq - 1, Sk)], [Sk // 2] * 3):  # extremes; all equal
                for left in (None, 0, 2, 5):
                    cases.append((Sq, Sk, lengths, left))
    return cases


def _doc_cuts() -> list[tuple[list[int], list[int]]]:
    fixed = [
        ([0, 3, 3, 8, 10], [0, 5, 7, 7, 12]),  # len_q < len_k, len_q = 0, len_k = 0, len_q < len_k
        ([0, 4, 6], [0, 2, 6]),  # len_q > len_k (rows at negative positions), then len_q < len_k
        ([0, 5], [0, 5]),  # one document: plain causal
        ([0, 0, 0, 4, 4], [0, 3, 3, 7, 9]),  # empty documents at the start and the end
        ([0, 2, 4, 6], [0, 2, 4, 6]),  # len_q = len_k
        ([0, 1, 2, 3], [0, 0, 0, 2]),  # documents without keys
        ([0, 30, 30, 40, 70], [0, 10, 40, 70, 70]),  # long documents for the 16 / 64 tilings
    ]
    g = torch.Generator().manual_seed(11)
    rand = []
    for _ in range(6):
        n = int(torch.randint(1, 7, (1,), generator=g))
        Sq, Sk = (int(x) for x in torch.randint(1, 71, (2,), generator=g))
        cuts = [[0, *sorted(torch.randint(0, S + 1, (n - 1,), generator=g).tolist()), S] for S in (Sq, Sk)]
        rand.append((cuts[0], cuts[1]))
    return fixed + rand


def _case_list() -> list:
    out = []
    for Sq, Sk, lengths, left in _cache_cases():
        ctx = MaskContext(len(lengths), HQ, Sq, Sk)
        plane = cache_plane(lengths, Sq, Sk, left)[:, None].expand(-1, HQ, -1, -1)
        lt = torch.tensor(lengths, dtype=torch.int32) if left == 2 else lengths  # tensors and lists
        cid = f"cache-Sq{Sq}_Sk{Sk}-L{'_'.join(map(str, lengths))}-left{left}"
        out.append(pytest.param(masks.cache_causal(lt, left), ctx, plane, id=cid))
    for cq, ck in _doc_cuts():
        Sq, Sk = cq[-1], ck[-1]
        ctx = MaskContext(2, HQ, Sq, Sk)
        plane = doc_plane(cq, ck, Sq, Sk)[:, None].expand(2, HQ, -1, -1)
        cid = f"doc-q{'_'.join(map(str, cq))}-k{'_'.join(map(str, ck))}"
        out.append(pytest.param(masks.document_causal(cq, torch.tensor(ck)), ctx, plane, id=cid))
    return out


CASES = _case_list()


# --------------------------------------------------------------------------------------------------
# 1. keep() is the definition.


@pytest.mark.parametrize(("mask", "ctx", "plane"), CASES)
def test_keep_matches_definition(mask, ctx, plane):
    Sq, Sk = ctx.Sq, ctx.Sk
    got = torch.broadcast_to(mask.tile(0, Sq, 0, Sk, ctx), plane.shape)
    diff = (got != plane).nonzero().tolist()
    assert not diff, f"{mask!r} in {ctx}: differs from the definition at (b, h, i, j) {diff[:8]}"
    for q0, q1, k0, k1 in {(Sq // 3, Sq, Sk // 4, Sk), (Sq - 1, Sq, 0, Sk), (0, (Sq + 1) // 2, Sk // 2, Sk)}:
        sub = torch.broadcast_to(mask.tile(q0, q1, k0, k1, ctx), (ctx.B, HQ, q1 - q0, k1 - k0))
        assert torch.equal(sub, plane[:, :, q0:q1, k0:k1]), f"{mask!r}: keep() on q[{q0}:{q1}] k[{k0}:{k1}]"


def test_cache_causal_differs_from_causal_and_padding():
    """Each sequence's own length vs the padded length: equal for decode (Sq = 1), not for Sq > 1."""
    lengths = [9, 4]
    for Sq in (1, 3):
        ctx = MaskContext(2, 1, Sq, 9)
        own = masks.cache_causal(lengths).tile(0, Sq, 0, 9, ctx)
        padded = (masks.causal() & masks.padding(lengths)).tile(0, Sq, 0, 9, ctx)
        assert torch.equal(own, padded) == (Sq == 1)
    # Sq = 3, the 4-long sequence: its queries sit at 1, 2, 3 (not at 6, 7, 8 clipped to the padding)
    own = masks.cache_causal(lengths).tile(0, 3, 0, 9, MaskContext(2, 1, 3, 9))
    assert own[1, 0].int().tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1] * 4 + [0] * 5,
    ]


def test_document_causal_differs_from_document_and_causal():
    cq, ck = [0, 2, 5], [0, 4, 8]
    ctx = MaskContext(1, 1, 5, 8)
    own = masks.document_causal(cq, ck).tile(0, 5, 0, 8, ctx)
    whole_row = (masks.document(cq, ck) & masks.causal()).tile(0, 5, 0, 8, ctx)
    assert not torch.equal(own, whole_row)
    # document 0 (2 queries, 4 keys): bottom-right within the document, queries at local 2 and 3
    assert own[0, 0, :2, :4].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # one document covering everything is plain bottom-right causal
    one = masks.document_causal([0, 5], [0, 8]).tile(0, 5, 0, 8, ctx)
    assert torch.equal(one, masks.causal().tile(0, 5, 0, 8, ctx).expand_as(one))


# --------------------------------------------------------------------------------------------------
# 2. classify(): sound and exact for every tiling; compositions sound.


@pytest.mark.parametrize(("mask", "ctx", "plane"), CASES)
def test_classify_sound_and_exact(mask, ctx, plane):
    problems = []
    for t in TILE_SIZES:
        problems += classification_problems(mask, truth_per_tile(plane, t, t), ctx, exact=True)
    problems += classification_problems(mask, truth_per_tile(plane, 3, 16), ctx, exact=True)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:8])


def test_classify_compositions_sound():
    ctx = MaskContext(4, HQ, 20, 40)
    lengths = [40, 25, 7, 0]
    cache = masks.cache_causal(lengths, left=6)
    doc = masks.document_causal([0, 5, 5, 20], [0, 12, 20, 40])
    others = [masks.causal(), masks.sliding_window(4), masks.padding([30, 40, 3, 10]), masks.prefix_lm(5)]
    problems = []
    for m, o in itertools.product([cache, doc, masks.cache_causal(lengths)], others):
        for comp in (m & o, m | o, o & m, (m | o) & cache):
            plane = torch.broadcast_to(comp.tile(0, 20, 0, 40, ctx), (4, HQ, 20, 40))
            for t in (1, 3, 16):
                problems += classification_problems(comp, truth_per_tile(plane, t, t), ctx, exact=False)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:8])


def test_classify_tightness_by_hand():
    ctx = MaskContext(3, 1, 4, 100)
    m = masks.cache_causal([100, 60, 50])  # queries of the shortest sit at 46..49
    assert m.classify(0, 4, 0, 47, ctx) is Tile.FULL  # below every sequence's diagonal
    assert m.classify(0, 4, 47, 48, ctx) is Tile.PARTIAL  # the shortest's first query misses key 47
    assert m.classify(0, 4, 60, 100, ctx) is Tile.PARTIAL  # only the longest sees them
    assert m.classify(0, 2, 99, 100, ctx) is Tile.EMPTY  # the longest's first two queries sit at 96, 97
    w = masks.cache_causal([100, 60, 50], left=3)  # the windows: [43..46]..[46..49], ..., [93..96]..[96..99]
    assert w.classify(0, 4, 70, 90, ctx) is Tile.EMPTY  # between the windows of 60 and 100
    assert w.classify(0, 4, 60, 61, ctx) is Tile.EMPTY
    assert w.classify(0, 1, 56, 57, ctx) is Tile.PARTIAL
    d = masks.document_causal([0, 2, 4], [0, 10, 12])
    c = MaskContext(1, 1, 4, 12)
    assert d.classify(0, 2, 0, 9, c) is Tile.FULL  # document 0's queries sit at 8, 9
    assert d.classify(0, 4, 10, 11, c) is Tile.PARTIAL
    assert d.classify(2, 4, 0, 10, c) is Tile.EMPTY  # document 1 never sees document 0's keys


# --------------------------------------------------------------------------------------------------
# 3. key_range() and full_key_range(): exactly the tightest bounds.


@pytest.mark.parametrize(("mask", "ctx", "plane"), CASES)
def test_key_ranges_are_tight_bounds(mask, ctx, plane):
    Sq = ctx.Sq
    blocks = [(a, b) for a in range(Sq) for b in range(a + 1, Sq + 1)] if Sq <= 16 else []
    blocks += [(0, Sq), (Sq // 2, Sq), (Sq - 1, Sq), (0, 1), (5, 21), (0, 64)] if Sq > 16 else []
    for q0, q1 in [(a, min(b, Sq)) for a, b in blocks if a < Sq]:
        cols = plane[:, :, q0:q1].any(2).any(1).any(0).nonzero().flatten().tolist()
        want = (cols[0], cols[-1] + 1) if cols else (0, 0)
        assert mask.key_range(q0, q1, ctx) == want, f"{mask!r} rows [{q0}, {q1}) in {ctx}"
    everywhere = plane.all(2).all(1).all(0).nonzero().flatten().tolist()
    want = (everywhere[0], everywhere[-1] + 1) if everywhere else (0, 0)
    if everywhere:
        assert everywhere == list(range(*want))  # the keys every row keeps are contiguous
    assert mask.full_key_range(ctx) == want, f"{mask!r} in {ctx}"


# --------------------------------------------------------------------------------------------------
# 4. attention() on every backend: the float64 oracle, and separate per-sequence calls.

SHAPES = {
    # name: (shape, mask builder)
    "cache_Sq5": (Shape(4, 4, 2, 5, 150, 16), lambda: masks.cache_causal([150, 37, 3, 0])),
    "cache_Sq5_left20": (
        Shape(4, 4, 2, 5, 150, 16),
        lambda: masks.cache_causal(torch.tensor([150, 37, 3, 0]), 20),
    ),
    "cache_decode": (Shape(4, 4, 2, 1, 150, 16), lambda: masks.cache_causal([70, 150, 1, 0], left=8)),
    "cache_Sq130": (Shape(3, 4, 2, 130, 300, 16), lambda: masks.cache_causal([300, 200, 129])),
    "doc": (
        Shape(2, 4, 2, 140, 300, 16),
        lambda: masks.document_causal([0, 30, 30, 100, 140], [0, 20, 80, 150, 300]),
    ),
    "doc_and_padding": (
        Shape(2, 4, 2, 140, 300, 16),
        lambda: (
            masks.document_causal([0, 30, 30, 100, 140], [0, 20, 80, 150, 300]) & masks.padding([300, 120])
        ),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_attention_matches_oracle(name, backend, dtype):
    shape, build = SHAPES[name]
    kwargs = {"mask": build()}
    leaves = make_leaves(shape, dtype)
    leaves64 = upcast(leaves)
    chosen = (
        backend if backend != "auto" else ao.explain(*leaves, **kwargs).split("runs on '")[1].split("'")[0]
    )
    want_lse = _dispatch.BACKENDS[chosen].supports_lse and chosen != "span"  # span: no grad through its LSE
    do = torch.randn(shape.B, shape.Hq, shape.Sq, shape.dv, generator=torch.Generator().manual_seed(2))
    got = run_and_grads(
        lambda: ao.attention(*leaves, **kwargs, return_lse=want_lse, backend=backend), leaves, None, do
    )
    plain = run_and_grads(lambda: oracle(leaves, kwargs, compute_dtype=dtype), leaves, None, do)
    ref = run_and_grads(lambda: oracle(leaves64, kwargs), leaves64, None, do)
    n_sum = shape.D + max(shape.Sq, shape.Sk) * (shape.Hq // shape.Hkv)
    assert got[0].dtype == dtype
    assert_close(
        "out", got[0], plain[0], ref[0], 2, magnitude=float(leaves64[2].detach().abs().max()), n_sum=n_sum
    )
    if want_lse:
        assert_close("lse", got[1], plain[1], ref[1], 2, n_sum=n_sum)
    grad_scale = max(float(r.abs().max()) for r in ref[2] if r is not None)
    q64, k64, v64 = (t.detach() for t in leaves64)
    qk = max(float(q64.norm(dim=-1).max()), float(k64.norm(dim=-1).max()))
    terms = shape.D**-0.5 * qk * float(do.norm(dim=-1).max() * v64.norm(dim=-1).max())
    for gname, g, p, r in zip(["dq", "dk", "dv"], got[2], plain[2], ref[2]):
        assert_close(gname, g, p, r, 3, magnitude=grad_scale, n_sum=n_sum, zero_magnitude=terms)


def _qkv64(B: int, Sq: int, Sk: int, seed: int = 3) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, s, 8, generator=g, dtype=torch.float64) for h, s in ((4, Sq), (2, Sk), (2, Sk))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("Sq", "left"), [(1, None), (5, None), (5, 20), (130, None)])
def test_cache_causal_rows_equal_separate_calls(backend, Sq, left):
    Sk, lengths = 200, [200, 37, 3, 0, 131]
    q, k, v = _qkv64(len(lengths), Sq, Sk)
    if backend in ("reference", "blockwise", "auto"):  # the fused kernels decline NaN behind a mask
        pad = (torch.arange(Sk).view(1, -1) >= torch.tensor(lengths).view(-1, 1)).view(-1, 1, Sk, 1)
        k.masked_fill_(pad, float("nan"))  # the cache beyond each length holds garbage: never read
        v.masked_fill_(pad, float("nan"))
    out = ao.attention(q, k, v, mask=masks.cache_causal(lengths, left), backend=backend)
    one = ao.causal() if left is None else ao.causal() & ao.sliding_window(left)
    for b, L in enumerate(lengths):
        alone = ao.attention(q[b : b + 1], k[b : b + 1, :, :L], v[b : b + 1, :, :L], mask=one, backend="auto")
        torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-12, atol=1e-12, msg=f"sequence {b} (L={L})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_document_causal_documents_equal_separate_calls(backend):
    cq, ck = [0, 30, 30, 100, 101, 140], [0, 20, 80, 150, 150, 300]  # len_q > len_k, 0 queries, 0 keys
    q, k, v = _qkv64(2, 140, 300)
    out = ao.attention(q, k, v, mask=masks.document_causal(cq, ck), backend=backend)
    for d in range(len(cq) - 1):
        (a, b), (c, e) = (cq[d], cq[d + 1]), (ck[d], ck[d + 1])
        if a == b:
            continue
        alone = ao.attention(q[:, :, a:b], k[:, :, c:e], v[:, :, c:e], mask=ao.causal(), backend="auto")
        torch.testing.assert_close(out[:, :, a:b], alone, rtol=1e-12, atol=1e-12, msg=f"document {d}")


# --------------------------------------------------------------------------------------------------
# 5. Validation: before any compute, naming the argument, the value and what is allowed.


class ComputeStarted(Exception):
    pass


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(inputs: object) -> None:
        raise ComputeStarted("a backend ran; validation should have failed first")

    for b in _dispatch.PRIORITY:
        monkeypatch.setattr(b, "forward", boom)


def _small(B: int = 2, Sq: int = 3, Sk: int = 6) -> list[Tensor]:
    return [torch.randn(B, 2, Sq, 4), torch.randn(B, 2, Sk, 4), torch.randn(B, 2, Sk, 4)]


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (
            lambda: masks.cache_causal([1, 2, 3]),
            r"cache_causal kv_lengths has 3 entries; expected one per batch element \(B=2\)",
        ),
        (lambda: masks.cache_causal([-1, 3]), r"cache_causal kv_lengths=\[-1, 3\] must lie in \[0, Sk=6\]"),
        (
            lambda: masks.cache_causal(torch.tensor([3, 7]), left=2),
            r"cache_causal kv_lengths=\[3, 7\] must lie in \[0, Sk=6\]",
        ),
        (lambda: masks.causal() & masks.cache_causal([7, 0]), r"cache_causal kv_lengths=\[7, 0\]"),
        (
            lambda: masks.document_causal([0, 2, 4], [0, 3, 6]),
            r"document_causal cu_seqlens_q ends at 4; it must end at Sq=3",
        ),
        (
            lambda: masks.document_causal([0, 3], [0, 5]),
            r"document_causal cu_seqlens_k ends at 5; it must end at Sk=6",
        ),
    ],
    ids=["cache-count", "cache-negative", "cache-over_Sk", "cache-in_composition", "doc-end_q", "doc-end_k"],
)
@pytest.mark.usefixtures("no_compute")
def test_shape_problems_raise_before_compute(mask, message):
    with pytest.raises(ValueError, match=message) as e:
        ao.attention(*_small(), mask=mask())
    assert "q (2, 2, 3, 4)" in str(e.value)  # validate() reports the shapes


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: masks.cache_causal(torch.tensor([3.0, 1.0])), TypeError, r"cache_causal kv_lengths must hold integers, got dtype torch.float32"),
        (lambda: masks.cache_causal([True, False]), TypeError, r"cache_causal kv_lengths must hold integers"),
        (lambda: masks.cache_causal(torch.tensor([[3, 1]])), ValueError, r"cache_causal kv_lengths must be 1-D, got shape \(1, 2\)"),
        (lambda: masks.cache_causal(5), TypeError, r"cache_causal kv_lengths must be a \(B,\) int tensor or a list of ints, got int 5"),
        (lambda: masks.cache_causal([3, 1], left=-1), ValueError, r"cache_causal left=-1 is negative; allowed: an int >= 0"),
        (lambda: masks.cache_causal([3, 1], left=2.5), TypeError, r"cache_causal left must be an int >= 0, got float 2.5"),
        (lambda: masks.cache_causal([3, 1], left=True), TypeError, r"cache_causal left must be an int >= 0, got bool"),
        (lambda: masks.document_causal([0, 2.5], [0, 3]), TypeError, r"document_causal cu_seqlens_q must hold integers"),
        (lambda: masks.document_causal([0, 3], None), TypeError, r"document_causal cu_seqlens_k must be a 1-D int tensor or a list of ints, got NoneType"),
        (lambda: masks.document_causal([1, 3], [0, 3]), ValueError, r"document_causal cu_seqlens_q=\[1, 3\] must start at 0"),
        (lambda: masks.document_causal([0, 3], [0, 4, 2]), ValueError, r"document_causal cu_seqlens_k=\[0, 4, 2\] must be non-decreasing"),
        (lambda: masks.document_causal([0, 3], [0, 1, 3]), ValueError, r"cu_seqlens_q \(1 documents\) and cu_seqlens_k \(2 documents\) must describe the same number"),
    ],
    ids=[
        "cache-float", "cache-bool", "cache-2d", "cache-int", "left-negative", "left-float", "left-bool",
        "doc-float", "doc-none", "doc-start", "doc-decreasing", "doc-count",
    ],
)  # fmt: skip
def test_constructor_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_construction_reads_no_lengths():
    """Lengths are read (one host sync) when a classification first needs them, not when built."""
    m = masks.cache_causal(torch.tensor([5, 2]), left=1)
    assert "_sorted_cache" not in m.__dict__
    assert m.check(MaskContext(2, 1, 2, 5)) == [] and m.__dict__["_sorted_cache"] == [2, 5]
    assert (m._min, m._max) == (2, 5)


def test_flags_and_repr():
    c, d = masks.cache_causal([4, 2], left=3), masks.document_causal([0, 2], [0, 5])
    for m in (c, d, masks.cache_causal([1])):
        assert not m.translation_invariant and not m.key_only
    assert not (c & masks.padding([4, 2])).key_only
    assert repr(c) == "cache_causal(kv_lengths=[4, 2], left=3)"
    assert repr(masks.cache_causal(torch.tensor([4, 2]))) == "cache_causal(kv_lengths=[4, 2])"
    assert repr(d) == "document_causal(cu_seqlens_q=[0, 2], cu_seqlens_k=[0, 5])"
    assert repr(c & d) == f"({c!r} & {d!r})"
    assert {"cache_causal", "document_causal"} <= set(masks.__all__)
    assert re.search(r"sdpa .*materialized", ao.explain(*_small(), mask=c, backend="sdpa"))


@pytest.mark.parametrize("seed", range(3))
def test_classify_and_key_range_on_random_tiles(seed):
    """Arbitrary tile boundaries (not a grid) over many documents, most of them empty on one side."""
    g = torch.Generator().manual_seed(seed)

    def rint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    problems = []
    for _ in range(20):
        n, Sq, Sk = rint(1, 12), rint(1, 40), rint(1, 40)
        cq, ck = ([0, *sorted(rint(0, S) for _ in range(n - 1)), S] for S in (Sq, Sk))
        lengths = [rint(0, Sk) for _ in range(3)]
        left = None if rint(0, 1) else rint(0, 6)
        cases = [
            (masks.document_causal(cq, ck), doc_plane(cq, ck, Sq, Sk), MaskContext(1, 1, Sq, Sk)),
            (
                masks.cache_causal(lengths, left),
                cache_plane(lengths, Sq, Sk, left),
                MaskContext(3, 1, Sq, Sk),
            ),
        ]
        for m, plane, ctx in cases:
            for _ in range(60):
                q0, k0 = rint(0, Sq - 1), rint(0, Sk - 1)
                q1, k1 = rint(q0 + 1, Sq), rint(k0 + 1, Sk)
                t = plane[:, q0:q1, k0:k1]
                want = Tile.FULL if bool(t.all()) else Tile.PARTIAL if bool(t.any()) else Tile.EMPTY
                got = m.classify(q0, q1, k0, k1, ctx)
                if got is not want:
                    problems.append(
                        f"{m!r} q[{q0}:{q1}] k[{k0}:{k1}]: classify={got.name}, truth={want.name}"
                    )
                cols = plane[:, q0:q1].any(1).any(0).nonzero().flatten().tolist()
                kr = (cols[0], cols[-1] + 1) if cols else (0, 0)
                if m.key_range(q0, q1, ctx) != kr:
                    problems.append(
                        f"{m!r} rows [{q0}, {q1}): key_range={m.key_range(q0, q1, ctx)}, truth={kr}"
                    )
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:8])
