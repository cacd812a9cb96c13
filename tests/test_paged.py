"""Paged attention (attnopt.paged) and the paged KV pool (attnopt.cache.paged): exact, batch-invariant,
validated; the pool's accounting, copy-on-write and prefix cache.

Exactness: paged_attention against the float64 oracle (reference_attention, one sequence at a time) with
the one tolerance rule (tests/_oracle.py), over ragged batches of awkward lengths, decode / chunked
prefill / non-causal, GQA ratios 1, 2, 3, 8, odd head dims and page sizes, fragmented page layouts, and
free pages (and the unused tail of every last page) full of NaN. Cascade (shared leading pages read once)
must agree with the oracle too, and with a fixed split (``split_size``) be bitwise equal to no cascade,
to the sequence run alone, and to any other physical layout of the same data.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

import attnopt.paged as paged_mod
from attnopt import masks as M
from attnopt.backends.reference import reference_attention
from attnopt.cache.paged import PagePool, PoolFull, PrefixCache
from attnopt.paged import PagedPlan, paged_attention
from tests._oracle import DTYPE_NAMES, assert_close

NAN = float("nan")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many small calls on a shared 2-core machine: threads only add overhead
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------- batch builder

LENS = (1, 17, 113, 255, 256, 257, 0, 40)  # keys per sequence; 0: a sequence with no pages at all
Q_LENS = {  # queries per sequence for each mode (its last q tokens); 0 = no queries, mixed in on purpose
    "decode": (1, 1, 1, 1, 0, 1, 0, 1),
    "prefill": (1, 17, 40, 0, 256, 9, 0, 3),  # causal chunks: whole prompts (17, 256) and chunks after a past
    "full": (1, 17, 40, 0, 256, 9, 0, 3),  # the same rows, causal=False: every key of the sequence
}
LAYOUTS = ("contiguous", "interleaved", "shuffled", "pool")


@dataclass
class Batch:
    """Sequences stored in one layer of a NaN-filled pool, their float64-exact contents, and queries."""

    pool: PagePool
    pages: list[list[int]]
    keys: list[Tensor]  # (Hkv, L, D) per sequence, in the pool's dtype
    values: list[Tensor]
    q: Tensor  # (T, Hq, D)
    q_lens: list[int]

    @property
    def P(self) -> int:
        return self.pool.page_size

    @property
    def kv_lens(self) -> list[int]:
        return [k.shape[1] for k in self.keys]

    def csr(self, rows: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(kv_indptr, kv_indices, kv_last_page_len, qo_indptr), int32, of the sequences `rows`."""
        rows = list(range(len(self.pages))) if rows is None else rows
        indptr, indices, last, qo = [0], [], [], [0]
        for r in rows:
            indices += self.pages[r]
            indptr.append(len(indices))
            L = self.kv_lens[r]
            last.append(L - self.P * (len(self.pages[r]) - 1) if self.pages[r] else 0)
            qo.append(qo[-1] + self.q_lens[r])
        return tuple(torch.tensor(x, dtype=torch.int32) for x in (indptr, indices, last, qo))

    def q_rows(self, r: int) -> Tensor:
        start = sum(self.q_lens[:r])
        return self.q[start : start + self.q_lens[r]]

    def run(self, rows: list[int] | None = None, **kw) -> tuple[Tensor, Tensor]:
        rows = list(range(len(self.pages))) if rows is None else rows
        q = torch.cat([self.q_rows(r) for r in rows])
        return paged_attention(q, self.pool.k[0], self.pool.v[0], *self.csr(rows), return_lse=True, **kw)


def _slots(pages: list[int], L: int, P: int) -> Tensor:
    t = torch.arange(L)
    return torch.tensor(pages, dtype=torch.int64)[t // P] * P + t % P


def _place(layout: str, n_pages: list[int], rng: random.Random) -> tuple[int, list[list[int]]]:
    """(num_pages, page lists) of sequences needing n_pages pages each, laid out as `layout` says."""
    total = sum(n_pages)
    if layout == "contiguous":  # one run per sequence, a free (NaN) page between sequences
        out, p = [], 1
        for n in n_pages:
            out.append(list(range(p, p + n)))
            p += n + 1
        return p, out
    if layout == "interleaved":  # page i of every sequence in turn, as concurrent decodes allocate
        out, p = [[] for _ in n_pages], 0
        for i in range(max(n_pages, default=0)):
            for r, n in enumerate(n_pages):
                if i < n:
                    out[r].append(p)
                    p += 1
        return p, out
    if layout == "shuffled":  # every page anywhere, in any order, among free pages
        num = total + 7
        perm = list(range(num))
        rng.shuffle(perm)
        out, p = [], 0
        for n in n_pages:
            out.append(perm[p : p + n])
            p += n
        return num, out
    raise ValueError(layout)


def make_batch(lens, q_lens, *, Hq, Hkv, D, P, dtype, layout, Dv=None, seed=0, fill=NAN) -> Batch:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    keys = [torch.randn(Hkv, L, D, generator=g, dtype=torch.float64).to(dtype) for L in lens]
    values = [torch.randn(Hkv, L, Dv, generator=g, dtype=torch.float64).to(dtype) for L in lens]
    q = torch.randn(sum(q_lens), Hq, D, generator=g, dtype=torch.float64).to(dtype)
    n_pages = [-(-L // P) for L in lens]
    if layout == "pool":  # the allocator's own layout: sequences grow in random interleaved chunks
        pool = PagePool(1, Hkv, D, sum(n_pages) + 3, page_size=P, value_dim=Dv, dtype=dtype, fill=fill)
        seqs = [pool.new_sequence() for _ in lens]
        done = [0] * len(lens)
        while any(d < L for d, L in zip(done, lens)):
            r = rng.choice([i for i, L in enumerate(lens) if done[i] < L])
            n = min(lens[r] - done[r], rng.choice([1, 3, P, 2 * P + 1, 50]))
            slots = pool.append(seqs[r], n)
            pool.write(0, slots, keys[r][:, done[r] : done[r] + n], values[r][:, done[r] : done[r] + n])
            done[r] += n
        pages = [pool.pages(s) for s in seqs]
    else:
        num, pages = _place(layout, n_pages, rng)
        pool = PagePool(1, Hkv, D, num, page_size=P, value_dim=Dv, dtype=dtype, fill=fill)
        for pg, K, V in zip(pages, keys, values):
            slots = _slots(pg, K.shape[1], P)
            pool.flat_k(0)[:, slots] = K
            pool.flat_v(0)[:, slots] = V
    return Batch(pool, pages, keys, values, q, list(q_lens))


def oracle(
    b: Batch, causal: bool, compute_dtype: torch.dtype | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sequence reference attention, concatenated: (T, Hq, Dv), (T, Hq).

    compute_dtype=None: the float64 oracle (inputs upcast exactly); else the plain computation in that dtype.
    """
    outs, lses = [], []
    for r, (K, V) in enumerate(zip(b.keys, b.values)):
        m = b.q_lens[r]
        if m == 0:
            continue
        q = b.q_rows(r).transpose(0, 1).unsqueeze(0)  # (1, Hq, m, D)
        k, v = K.unsqueeze(0), V.unsqueeze(0)  # (1, Hkv, L, D)
        if compute_dtype is None:
            q, k, v = q.double(), k.double(), v.double()
        mask = M.causal() if causal else None  # bottom-right: the queries are the last m tokens
        o, s, _ = reference_attention(q, k, v, mask=mask, scale=scale, compute_dtype=compute_dtype)
        outs.append(o[0].transpose(0, 1))
        lses.append(s[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def check_exact(
    name: str, b: Batch, out: Tensor, lse: Tensor, causal: bool, scale: float | None = None
) -> None:
    dtype = b.q.dtype
    assert out.dtype == dtype, out.dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), lse.dtype
    assert bool(torch.isfinite(out).all()), f"{name}: non-finite output (NaN from free pages leaked?)"
    ref = oracle(b, causal, scale=scale)
    plain = oracle(b, causal, compute_dtype=dtype, scale=scale)
    g = b.q.shape[1] // b.keys[0].shape[0]
    n_sum = b.keys[0].shape[2] + max(b.kv_lens) * g
    mag = max(float(v.abs().max()) for v in b.values if v.numel())
    assert_close(f"{name} out", out, plain[0], ref[0], 2, magnitude=mag, n_sum=n_sum)
    assert_close(f"{name} lse", lse, plain[1], ref[1], 2, n_sum=n_sum)


# ----------------------------------------------------------------------------------- oracle grid

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
HEADS = ((4, 4), (4, 2), (6, 2), (8, 1))  # Hq/Hkv = 1, 2, 3, 8
DIMS = (32, 40, 64, 80, 17)
PAGE_SIZES = (1, 5, 16, 64)
MODES = ("decode", "prefill", "full")


def _case(dtype, heads, D, P, layout, mode, exhaustive=False):
    Hq, Hkv = heads
    marks = [pytest.mark.exhaustive] if exhaustive else []
    cid = f"{DTYPE_NAMES[dtype]}-{mode}-{layout}-P{P}-H{Hq}_{Hkv}-D{D}"
    return pytest.param(dtype, Hq, Hkv, D, P, layout, mode, id=cid, marks=marks)


def _fast_grid():
    """Every (page size, layout, mode); dtype, heads and head dim cycle so each value appears often."""
    for i, (P, layout, mode) in enumerate(itertools.product(PAGE_SIZES, LAYOUTS, MODES)):
        yield _case(DTYPES[i % 3], HEADS[i % 4], DIMS[i % 5], P, layout, mode)


def _full_grid():
    fast = {p.id for p in _fast_grid()}
    for combo in itertools.product(DTYPES, HEADS, DIMS, PAGE_SIZES, LAYOUTS, MODES):
        p = _case(*combo, exhaustive=True)
        if p.id not in fast:
            yield p


@pytest.mark.parametrize(("dtype", "Hq", "Hkv", "D", "P", "layout", "mode"), [*_fast_grid(), *_full_grid()])
def test_matches_oracle(dtype, Hq, Hkv, D, P, layout, mode):
    b = make_batch(LENS, Q_LENS[mode], Hq=Hq, Hkv=Hkv, D=D, P=P, dtype=dtype, layout=layout)
    causal = mode != "full"
    out, lse = b.run(causal=causal)
    check_exact("paged", b, out, lse, causal)


@pytest.mark.parametrize("split", [None, 2, 3], ids=["nosplit", "split2p", "split3p"])
def test_value_dim_other_than_head_dim(split):
    """Dv != D (PagePool's value_dim; paged_attention's docstring promises (..., Dv)). Bug: torch's fused
    CPU flash kernel refuses different head sizes ('Q/K/V should have the same head size')."""
    P = 5
    b = make_batch(
        LENS, Q_LENS["prefill"], Hq=6, Hkv=3, D=24, Dv=40, P=P, dtype=torch.float32, layout="shuffled"
    )
    out, lse = b.run(scale=0.3, split_size=None if split is None else split * P)
    assert out.shape == (sum(b.q_lens), 6, 40)
    check_exact("Dv=40 scale=0.3", b, out, lse, True, scale=0.3)


@pytest.mark.parametrize("split", [None, 2], ids=["nosplit", "split2p"])
def test_scale(split):
    P = 5
    b = make_batch(LENS, Q_LENS["prefill"], Hq=6, Hkv=3, D=24, P=P, dtype=torch.float32, layout="shuffled")
    out, lse = b.run(scale=0.3, split_size=None if split is None else split * P)
    check_exact("scale=0.3", b, out, lse, True, scale=0.3)


def test_empty_batch_and_only_empty_sequences():
    b = make_batch([0, 0], [0, 0], Hq=2, Hkv=1, D=8, P=4, dtype=torch.float32, layout="contiguous")
    out, lse = b.run()
    assert out.shape == (0, 2, 8) and lse.shape == (0, 2)
    pool = PagePool(1, 1, 8, 2)
    q = torch.empty(0, 2, 8)
    z = torch.zeros(1, dtype=torch.int32)
    out = paged_attention(q, pool.k[0], pool.v[0], z, z[:0], z[:0])  # R = 0 sequences
    assert out.shape == (0, 2, 8)


@pytest.mark.parametrize(
    "value", [float("inf"), -float("inf"), 1e30, NAN], ids=["inf", "-inf", "huge", "nan"]
)
def test_garbage_in_free_pages_and_page_tails_never_leaks(value):
    """Everything outside the sequences' tokens (free pages, the tail of each last page) holds garbage."""
    b = make_batch(
        LENS, Q_LENS["prefill"], Hq=4, Hkv=2, D=16, P=16, dtype=torch.float32, layout="shuffled", fill=value
    )
    for split in (None, 32):
        out, lse = b.run(split_size=split)
        check_exact(f"fill={value} split={split}", b, out, lse, True)


def test_return_lse_false_and_default_decode():
    b = make_batch([5, 33], [1, 1], Hq=4, Hkv=2, D=8, P=4, dtype=torch.float64, layout="interleaved")
    kv_indptr, kv_indices, last, _ = b.csr()
    out = paged_attention(b.q, b.pool.k[0], b.pool.v[0], kv_indptr, kv_indices, last)  # qo_indptr: 1 each
    assert isinstance(out, Tensor)
    ref, _ = oracle(b, True)
    assert_close("out", out, None, ref, 2, magnitude=4.0, n_sum=8 + 33 * 2)


# ------------------------------------------------------------------------------------------ cascade


@dataclass
class Shared:
    pool: PagePool
    seqs: list[int]
    contents: dict[int, tuple[Tensor, Tensor]]  # seq -> (K (Hkv, L, D), V), float64 values


def _grow(pool: PagePool, contents, seq: int, n: int, g: torch.Generator) -> None:
    """Append n random tokens to seq (copy-on-write happens here when its last page is shared)."""
    Hkv, D = pool.num_kv_heads, pool.head_dim
    k = torch.randn(Hkv, n, D, generator=g, dtype=torch.float64).to(pool.k.dtype)
    v = torch.randn(Hkv, n, D, generator=g, dtype=torch.float64).to(pool.k.dtype)
    pool.write(0, pool.append(seq, n), k, v)
    K, V = contents.get(seq, (k[:, :0], v[:, :0]))
    contents[seq] = (torch.cat([K, k], 1), torch.cat([V, v], 1))


def make_shared(P: int, dtype=torch.float32, Hkv=2, D=16, prefix=100, short_sharer=False, seed=0) -> Shared:
    """A root of `prefix` tokens; two forks and one prefix-cache hit extend it; one unrelated sequence;
    one fork with no queries (q_len 0 must not join the cascade group); optionally one fork truncated to
    P + 2 tokens and regrown (it shares only its first full pages, so the group's prefix shrinks to them)."""
    g = torch.Generator().manual_seed(seed)
    pool = PagePool(1, Hkv, D, 400, page_size=P, dtype=dtype, fill=NAN)
    cache = PrefixCache(pool)
    contents: dict[int, tuple[Tensor, Tensor]] = {}
    root = pool.new_sequence()
    _grow(pool, contents, root, prefix, g)
    tokens = list(range(prefix))
    cache.insert(tokens, pool.pages(root))
    seqs = [root]
    for own in (1, 30):
        child = pool.fork(root)
        contents[child] = contents[root]
        _grow(pool, contents, child, own, g)
        seqs.append(child)
    hit = pool.new_sequence()
    cached = cache.match(tokens + [999] * 5)
    assert len(cached) == prefix // P
    pool.attach(hit, cached, len(cached) * P)
    K, V = contents[root]
    contents[hit] = (K[:, : len(cached) * P], V[:, : len(cached) * P])
    _grow(pool, contents, hit, 77, g)
    seqs.append(hit)
    other = pool.new_sequence()
    _grow(pool, contents, other, 50, g)
    seqs.append(other)
    idle = pool.fork(root)
    contents[idle] = contents[root]
    seqs.append(idle)
    if short_sharer:
        s = pool.fork(root)
        pool.truncate(s, P + 2)
        K, V = contents[root]
        contents[s] = (K[:, : P + 2], V[:, : P + 2])
        _grow(pool, contents, s, 20, g)
        seqs.append(s)
    pool.check()
    return Shared(pool, seqs, contents)


def shared_batch(s: Shared, mode: str, seed: int = 1) -> Batch:
    """The shared sequences as a Batch (pages as the pool holds them); q_len per mode, 0 for the idle fork."""
    g = torch.Generator().manual_seed(seed)
    q_lens = []
    for i, seq in enumerate(s.seqs):
        m = 0 if i == 5 else 1 if mode == "decode" else min(5, s.pool.length(seq))
        q_lens.append(m)
    Hq = 2 * s.pool.num_kv_heads
    q = torch.randn(sum(q_lens), Hq, s.pool.head_dim, generator=g, dtype=torch.float64).to(s.pool.k.dtype)
    return Batch(
        s.pool,
        [s.pool.pages(x) for x in s.seqs],
        [s.contents[x][0] for x in s.seqs],
        [s.contents[x][1] for x in s.seqs],
        q,
        q_lens,
    )


def _plan_run(
    b: Batch, causal: bool, cascade: bool, split: int | None = None
) -> tuple[PagedPlan, Tensor, Tensor]:
    plan = PagedPlan(
        b.P, b.pages, b.kv_lens, b.q_lens, causal=causal, cascade=cascade, split_size=split, min_shared=1
    )
    out, lse = plan.run(b.q, b.pool.k[0], b.pool.v[0], pages=b.pages)
    return plan, out, lse


@pytest.mark.parametrize("short_sharer", [False, True], ids=["long_prefix", "one_shared_page"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("P", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cascade_matches_oracle(dtype, P, mode, short_sharer):
    s = make_shared(P, dtype, short_sharer=short_sharer)
    b = shared_batch(s, mode)
    causal = mode != "full"
    plan, out, lse = _plan_run(b, causal, cascade=True)
    assert plan.groups, "no cascade group: the shared leading pages were not detected"
    members = set(plan.groups[0].members)
    assert 5 not in members, "a sequence with no queries joined the cascade group"
    assert {0, 1, 2, 3} <= members and 4 not in members, members
    expect = (P + 2) // P * P if short_sharer else (100 // P) * P
    if mode == "prefill":  # each causal chunk's own keys are not in the prefix: bounded by the chunk start
        expect = min(expect, min(b.kv_lens[r] - b.q_lens[r] for r in members) // P * P)
    assert plan.groups[0].tokens == expect, (plan.groups[0].tokens, expect)
    check_exact("cascade", b, out, lse, causal)
    plan0, out0, lse0 = _plan_run(b, causal, cascade=False)
    assert not plan0.groups
    check_exact("no cascade", b, out0, lse0, causal)


def test_cascade_through_paged_attention(monkeypatch):
    """The public entry point cascades by itself once the shared prefix is long enough (>= 64 tokens)."""
    plans: list[PagedPlan] = []

    class Spy(PagedPlan):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            plans.append(self)

    monkeypatch.setattr(paged_mod, "PagedPlan", Spy)
    b = shared_batch(make_shared(16, prefix=100), "decode")
    out, lse = b.run()
    assert plans[-1].groups and plans[-1].groups[0].tokens == 96
    check_exact("cascade", b, out, lse, True)
    out0, lse0 = b.run(cascade=False)
    assert not plans[-1].groups
    check_exact("no cascade", b, out0, lse0, True)


def _relayout(b: Batch, seed: int) -> Batch:
    """The same sequence contents in a fresh pool: private pages (nothing shared), shuffled."""
    rng = random.Random(seed)
    num, pages = _place("shuffled", [len(p) for p in b.pages], rng)
    pool = PagePool(
        1, b.pool.num_kv_heads, b.pool.head_dim, num, page_size=b.P, dtype=b.pool.k.dtype, fill=NAN
    )
    for pg, K, V in zip(pages, b.keys, b.values):
        slots = _slots(pg, K.shape[1], b.P)
        pool.flat_k(0)[:, slots] = K
        pool.flat_v(0)[:, slots] = V
    return Batch(pool, pages, b.keys, b.values, b.q, b.q_lens)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("P", "split"), [(16, 32), (16, 64), (5, 15), (1, 8)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fixed_split_is_bitwise_batch_invariant(dtype, P, split, mode):
    b = shared_batch(make_shared(P, dtype, prefix=100), mode)
    causal = mode != "full"
    plan, out, lse = _plan_run(b, causal, cascade=True, split=split)
    # a cascade call's products have another shape than a request's own, which BLAS may round otherwise
    # (seen on AMD EPYC with MKL 2024.2): fixed-split plans never cascade
    assert not plan.groups, "a fixed-split plan cascaded"
    check_exact("fixed split", b, out, lse, causal)
    _, out0, lse0 = _plan_run(b, causal, cascade=False, split=split)
    assert torch.equal(out, out0) and torch.equal(lse, lse0), "cascade changed the bits"
    # the public entry point gives the same bits (its own plan, min_shared 64)
    out1, lse1 = b.run(causal=causal, split_size=split)
    assert torch.equal(out1, out0) and torch.equal(lse1, lse0)
    # each sequence alone gives the bits it has in the batch
    row = 0
    for r, m in enumerate(b.q_lens):
        if m:
            alone, lse_a = b.run([r], causal=causal, split_size=split)
            assert torch.equal(alone, out[row : row + m]), f"sequence {r}: alone != in batch"
            assert torch.equal(lse_a, lse[row : row + m])
        row += m
    # another physical layout of the same data (private, shuffled pages: no cascade) gives the same bits
    moved = _relayout(b, seed=3)
    _, out2, lse2 = _plan_run(moved, causal, cascade=True, split=split)
    assert torch.equal(out2, out) and torch.equal(lse2, lse), "the page layout changed the bits"


def test_fixed_split_bitwise_across_layouts_of_awkward_lengths():
    P, split = 5, 20
    b = make_batch(LENS, Q_LENS["prefill"], Hq=6, Hkv=2, D=40, P=P, dtype=torch.float32, layout="contiguous")
    out, lse = b.run(split_size=split)
    for layout in ("interleaved", "shuffled", "pool"):
        other = make_batch(
            LENS, Q_LENS["prefill"], Hq=6, Hkv=2, D=40, P=P, dtype=torch.float32, layout=layout
        )
        assert torch.equal(other.q, b.q)
        out2, lse2 = other.run(split_size=split)
        assert torch.equal(out2, out) and torch.equal(lse2, lse), layout


# --------------------------------------------------------------------------------------- validation


def _good():
    b = make_batch(
        [5, 12], [2, 3], Hq=4, Hkv=2, D=8, P=4, dtype=torch.float32, layout="interleaved", fill=0.0
    )
    indptr, indices, last, qo = b.csr()
    return dict(
        q=b.q,
        k_cache=b.pool.k[0],
        v_cache=b.pool.v[0],
        kv_indptr=indptr,
        kv_indices=indices,
        kv_last_page_len=last,
        qo_indptr=qo,
    )


def _i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


BAD = {  # name -> (change to the good inputs, exception, message pattern naming the argument)
    "q_rank": (lambda a: a.update(q=a["q"][None]), ValueError, r"q must be \(total_q, Hq, D\)"),
    "k_rank": (lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, r"k_cache/v_cache"),
    "v_shape": (lambda a: a.update(v_cache=a["v_cache"][:1].contiguous()), ValueError, r"v_cache"),
    "head_dim": (lambda a: a.update(q=a["q"][..., :6].contiguous()), ValueError, r"q head_dim 6"),
    "dtype": (
        lambda a: a.update(q=a["q"].double()),
        TypeError,
        r"q, k_cache, v_cache must share one floating dtype",
    ),
    "int_dtype": (
        lambda a: a.update(q=a["q"].int(), k_cache=a["k_cache"].int(), v_cache=a["v_cache"].int()),
        TypeError,
        r"floating dtype",
    ),
    "q_meta": (lambda a: a.update(q=a["q"].to("meta")), ValueError, r"devices"),
    "cache_meta": (
        lambda a: a.update(k_cache=a["k_cache"].to("meta"), v_cache=a["v_cache"].to("meta")),
        ValueError,
        r"devices",
    ),
    "gqa_ratio": (lambda a: a.update(q=torch.randn(5, 3, 8)), ValueError, r"q heads 3 must be a multiple"),
    "not_tensor": (lambda a: a.update(q=a["q"].tolist()), TypeError, r"q must be a torch.Tensor"),
    "indices_high": (lambda a: a["kv_indices"].__setitem__(0, 99), ValueError, r"kv_indices \[99\]"),
    "indices_negative": (lambda a: a["kv_indices"].__setitem__(1, -1), ValueError, r"kv_indices \[-1\]"),
    "indices_float": (lambda a: a.update(kv_indices=a["kv_indices"].float()), TypeError, r"kv_indices"),
    "indices_2d": (lambda a: a.update(kv_indices=a["kv_indices"][None]), TypeError, r"kv_indices"),
    "last_zero": (lambda a: a["kv_last_page_len"].__setitem__(0, 0), ValueError, r"kv_last_page_len\[0\]=0"),
    "last_too_big": (
        lambda a: a["kv_last_page_len"].__setitem__(1, 5),
        ValueError,
        r"kv_last_page_len\[1\]=5",
    ),
    "last_count": (lambda a: a.update(kv_last_page_len=_i32(1)), ValueError, r"kv_last_page_len has 1"),
    "indptr_decreasing": (lambda a: a.update(kv_indptr=_i32(0, 3, 2)), ValueError, r"kv_indptr"),
    "indptr_start": (lambda a: a.update(kv_indptr=_i32(1, 2, 5)), ValueError, r"kv_indptr"),
    "indptr_end": (lambda a: a.update(kv_indptr=_i32(0, 2, 4)), ValueError, r"kv_indptr"),
    "qo_decreasing": (lambda a: a.update(qo_indptr=_i32(0, 4, 3)), ValueError, r"qo_indptr"),
    "qo_length": (lambda a: a.update(qo_indptr=_i32(0, 5)), ValueError, r"qo_indptr"),
    "q_rows": (
        lambda a: a.update(q=a["q"][:4]),
        ValueError,
        r"q has 4 rows but the query lengths add up to 5",
    ),
    "more_queries_than_keys": (
        lambda a: a.update(q=torch.randn(7, 4, 8), qo_indptr=_i32(0, 6, 7)),
        ValueError,
        r"qo_indptr gives sequence 0 6 queries but the page table gives it only 5 keys",
    ),
    "split_not_multiple": (lambda a: a.update(split_size=6), ValueError, r"split_size=6"),
    "split_bool": (lambda a: a.update(split_size=True), ValueError, r"split_size=True"),
    "split_zero": (lambda a: a.update(split_size=0), ValueError, r"split_size=0"),
    "split_negative": (lambda a: a.update(split_size=-4), ValueError, r"split_size=-4"),
    "split_float": (lambda a: a.update(split_size=8.0), ValueError, r"split_size=8.0"),
    "causal_not_bool": (lambda a: a.update(causal=1), TypeError, r"causal"),
    "cascade_not_bool": (lambda a: a.update(cascade="yes"), TypeError, r"cascade"),
    "k_not_contiguous": (
        lambda a: a.update(k_cache=a["k_cache"].transpose(1, 2).contiguous().transpose(1, 2)),
        ValueError,
        r"k_cache and v_cache must be contiguous",
    ),
    "v_sliced": (
        lambda a: a.update(v_cache=torch.zeros(2, 5, 4, 16)[..., ::2]),
        ValueError,
        r"must be contiguous",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_before_compute(case, monkeypatch):
    change, exc, pattern = BAD[case]
    args = _good()
    paged_attention(**args)  # the good inputs run

    def never(*a, **kw):
        raise AssertionError("paged_attention planned or computed before rejecting its inputs")

    monkeypatch.setattr(paged_mod, "PagedPlan", never)
    monkeypatch.setattr(paged_mod, "_part", never)
    change(args)
    with pytest.raises(exc, match=pattern):
        paged_attention(**args)


def test_index_tensors_on_meta_raise_a_clear_error():
    """A page table that cannot be read (meta device) is a bad input, not a NotImplementedError from .tolist()."""
    args = _good()
    args["kv_indices"] = args["kv_indices"].to("meta")
    with pytest.raises((ValueError, TypeError), match="kv_indices"):
        paged_attention(**args)


def test_fixed_split_plan_without_pages_says_so():
    b = make_batch([40], [1], Hq=2, Hkv=1, D=8, P=4, dtype=torch.float32, layout="shuffled")
    plan = PagedPlan(4, b.pages, b.kv_lens, b.q_lens, split_size=8)
    with pytest.raises(ValueError, match="page lists"):
        plan.run(b.q, b.pool.k[0], b.pool.v[0])


# ------------------------------------------------------------------------------------------ PagePool


def _pool(**kw) -> PagePool:
    defaults = dict(num_layers=2, num_kv_heads=2, head_dim=3, num_pages=12, page_size=4, fill=0.0)
    return PagePool(**{**defaults, **kw})


def _kv(pool: PagePool, n: int, base: float) -> tuple[Tensor, Tensor]:
    """Keys/values whose entries identify (token, head, dim): base + token + head/10 + dim/100."""
    Hkv, D = pool.num_kv_heads, pool.head_dim
    t = torch.arange(n, dtype=torch.float32)[None, :, None]
    h = torch.arange(Hkv, dtype=torch.float32)[:, None, None] / 10
    d = torch.arange(D, dtype=torch.float32)[None, None, :] / 100
    k = base + t + h + d
    return k, -k


def _read(pool: PagePool, seq: int, layer: int = 0) -> tuple[Tensor, Tensor]:
    slots = pool.slots(seq, 0, pool.length(seq))
    return pool.flat_k(layer)[:, slots], pool.flat_v(layer)[:, slots]


def _state(pool: PagePool):
    cache = pool.prefix_cache
    return (
        {s: (pool.pages(s), pool.length(s), pool.reserved(s)) for s in pool.sequences()},
        [pool.refcount(p) for p in range(pool.num_pages)],
        pool.free_pages,
        pool.pages_copied,
        None if cache is None else sorted(cache.pages()),
        pool.k.view(torch.int32).clone(),  # bits: NaN-safe
        pool.v.view(torch.int32).clone(),
    )


def _same_state(a, b) -> None:
    for x, y in zip(a[:5], b[:5]):
        assert x == y, (x, y)
    assert torch.equal(a[5], b[5]) and torch.equal(a[6], b[6]), "pool storage changed"


def test_pool_append_write_slots_round_trip():
    pool = _pool()
    a, b = pool.new_sequence(), pool.new_sequence()
    written = {a: [], b: []}
    for seq, n, base in ((a, 3, 100.0), (b, 6, 200.0), (a, 5, 300.0), (b, 1, 400.0), (a, 0, 0.0)):
        start = pool.length(seq)
        slots = pool.append(seq, n)
        assert slots.dtype == torch.int64 and slots.shape == (n,)
        assert torch.equal(slots, pool.slots(seq, start, start + n))
        for layer in range(2):
            k, v = _kv(pool, n, base + layer * 1000)
            pool.write(layer, slots, k, v)
        written[seq].append(n)
    assert pool.length(a) == 8 and pool.length(b) == 7
    assert len(pool.pages(a)) == pool.pages_for(8) == 2 and len(pool.pages(b)) == 2
    assert (
        pool.pages_for(0) == 0
        and pool.pages_for(1) == 1
        and pool.pages_for(4) == 1
        and pool.pages_for(5) == 2
    )
    assert not set(pool.pages(a)) & set(pool.pages(b))
    k, v = _read(pool, a, layer=1)
    want_k = torch.cat([_kv(pool, 3, 1100.0)[0], _kv(pool, 5, 1300.0)[0]], dim=1)
    assert torch.equal(k, want_k) and torch.equal(v, -want_k)
    k, _ = _read(pool, b, layer=0)
    assert torch.equal(k, torch.cat([_kv(pool, 6, 200.0)[0], _kv(pool, 1, 400.0)[0]], dim=1))
    # a slot is page * page_size + offset
    pg = pool.pages(b)
    assert pool.slots(b, 0, 7).tolist() == [pg[t // 4] * 4 + t % 4 for t in range(7)]
    assert pool.free_pages == 12 - 4 and pool.used_pages == 4
    pool.check()
    with pytest.raises(ValueError, match="outside sequence"):
        pool.slots(a, 0, 9)


def test_pool_extends_runs_in_place():
    """A sequence growing alone stays one run of consecutive pages (read in place by attention)."""
    pool = _pool(num_pages=20)
    s = pool.new_sequence()
    for _ in range(13):
        pool.append(s, 3)
    pg = pool.pages(s)
    assert pg == list(range(pg[0], pg[0] + len(pg))), pg


def test_pool_csr_and_block_table():
    pool = _pool(num_pages=20, page_size=4)
    seqs = [pool.new_sequence() for _ in range(4)]
    for seq, n in zip(seqs, (9, 0, 4, 13)):
        for chunk in (n // 2, n - n // 2):  # interleave allocation
            pool.append(seq, chunk)
    pool.append(seqs[0], 2)
    indptr, indices, last = pool.csr(seqs)
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    lens = [11, 0, 4, 13]
    assert indptr.tolist() == [0, 3, 3, 4, 8]
    assert indices.tolist() == [p for s in seqs for p in pool.pages(s)]
    assert last.tolist() == [3, 0, 4, 1]
    for r, L in enumerate(lens):
        n = int(indptr[r + 1] - indptr[r])
        assert (4 * (n - 1) + int(last[r]) if n else 0) == L
    table, seq_lens = pool.block_table(seqs)
    assert table.dtype == seq_lens.dtype == torch.int32
    assert table.shape == (4, 4) and seq_lens.tolist() == lens
    for r, s in enumerate(seqs):
        pg = pool.pages(s)
        assert table[r].tolist() == pg + [0] * (4 - len(pg))
    empty_table, empty_lens = pool.block_table([])
    assert empty_table.shape == (0, 0) and empty_lens.shape == (0,)


def test_block_table_view_is_the_same_memory():
    pool = _pool(num_layers=2, num_kv_heads=3, head_dim=5, num_pages=6, page_size=4)
    s = pool.new_sequence()
    pool.append(s, 10)
    kb, vb = pool.block_table_view(1)
    assert kb.shape == (6, 4, 3, 5) and vb.shape == (6, 4, 3, 5)
    assert kb.data_ptr() == pool.k[1].data_ptr() and vb.data_ptr() == pool.v[1].data_ptr()
    table, lens = pool.block_table([s])
    x = torch.arange(3 * 5, dtype=torch.float32).view(3, 5) + 7
    for t in range(int(lens[0])):  # write token t through the block-table layout ...
        page, off = int(table[0, t // 4]), t % 4
        kb[page, off] = x + t
        vb[page, off] = -(x + t)
    k, v = _read(pool, s, layer=1)  # ... and read it back through the flat (Hkv, slots, D) layout
    want = torch.stack([x + t for t in range(10)], dim=1)
    assert torch.equal(k, want) and torch.equal(v, -want)
    assert not bool(pool.k[0].any()), "layer 0 was written"


def test_fork_and_copy_on_write():
    pool = _pool(page_size=4)
    a = pool.new_sequence()
    pool.write(0, pool.append(a, 6), *_kv(pool, 6, 0.0))  # pages: one full, one with 2 of 4 tokens
    full, partial = pool.pages(a)
    b = pool.fork(a)
    assert pool.pages(b) == [full, partial] and pool.length(b) == 6
    assert pool.refcount(full) == pool.refcount(partial) == 2
    assert pool.pages_copied == 0
    pool.write(0, pool.append(b, 1), *_kv(pool, 1, 50.0))  # writes into the shared partial page: copy first
    assert pool.pages_copied == 1
    b_full, b_last = pool.pages(b)
    assert b_full == full and b_last != partial
    assert pool.refcount(full) == 2 and pool.refcount(partial) == 1 and pool.refcount(b_last) == 1
    k_a, _ = _read(pool, a)
    assert torch.equal(k_a, _kv(pool, 6, 0.0)[0]), "the fork's write reached the original"
    k_b, v_b = _read(pool, b)
    want = torch.cat([_kv(pool, 6, 0.0)[0], _kv(pool, 1, 50.0)[0]], dim=1)
    assert torch.equal(k_b, want) and torch.equal(v_b, -want)
    # the copy carries every layer of the page
    k_a1 = pool.flat_k(1)[:, pool.slots(a, 0, 6)]
    assert torch.equal(pool.flat_k(1)[:, pool.slots(b, 0, 6)], k_a1)
    # the original now owns its page alone: it writes in place (no copy)
    pool.write(0, pool.append(a, 2), *_kv(pool, 2, 70.0))
    assert pool.pages_copied == 1 and pool.pages(a) == [full, partial]
    assert torch.equal(_read(pool, b)[0], want)
    # a fork whose shared last page is full takes a fresh page: nothing to copy
    c = pool.fork(a)
    pool.append(c, 3)
    assert pool.pages_copied == 1 and pool.pages(c)[:2] == [full, partial]
    # the original writing into a page its fork still shares copies too
    d = pool.fork(b)
    pool.write(0, pool.append(b, 1), *_kv(pool, 1, 90.0))
    assert pool.pages_copied == 2
    assert torch.equal(_read(pool, d)[0], want), "the original's write reached its fork"
    pool.check()
    for s in (a, b, c, d):
        pool.free(s)
    assert pool.free_pages == pool.num_pages
    pool.check()


def test_relocate_gives_one_private_run():
    pool = _pool(num_pages=16, page_size=4)
    a = pool.new_sequence()
    pool.write(0, pool.append(a, 10), *_kv(pool, 10, 0.0))
    b = pool.fork(a)
    pool.reserve(b, 2)
    assert pool.relocate(b) == 3
    pa, pb = pool.pages(a), pool.pages(b)
    assert not set(pa) & set(pb)
    assert pb == list(range(pb[0], pb[0] + 3)), pb
    assert pool.reserved(b) == 2
    assert torch.equal(_read(pool, b)[0], _read(pool, a)[0])
    assert torch.equal(pool.flat_k(1)[:, pool.slots(b, 0, 10)], pool.flat_k(1)[:, pool.slots(a, 0, 10)])
    assert all(pool.refcount(p) == 1 for p in pa + pb)
    pool.check()
    pool.write(0, pool.append(b, 6), *_kv(pool, 6, 50.0))  # continues into its reservation: still one run
    pb = pool.pages(b)
    assert pb == list(range(pb[0], pb[0] + 4)) and pool.reserved(b) == 1
    assert torch.equal(_read(pool, a)[0], _kv(pool, 10, 0.0)[0])
    pool.free(a)
    pool.free(b)
    assert pool.free_pages == pool.num_pages
    pool.check()


def test_reserve_sets_pages_aside():
    pool = _pool(num_pages=10, page_size=4)
    a, b = pool.new_sequence(), pool.new_sequence()
    pool.reserve(a, 3)
    assert pool.reserved(a) == 3 and pool.free_pages == 7 and pool.used_pages == 3
    assert pool.length(a) == 0 and pool.pages(a) == []
    pool.check()
    pool.append(b, 4 * 7)  # every other page: the reservation is not touched
    with pytest.raises(PoolFull):
        pool.append(b, 1)
    before = _state(pool)
    with pytest.raises(PoolFull):
        pool.reserve(b, 1)
    _same_state(before, _state(pool))
    pool.write(0, pool.append(a, 9), *_kv(pool, 9, 0.0))  # the reserved pages, in order, one run
    pa = pool.pages(a)
    assert len(pa) == 3 and pa == list(range(pa[0], pa[0] + 3)) and pool.reserved(a) == 0
    assert not set(pa) & set(pool.pages(b))
    assert torch.equal(_read(pool, a)[0], _kv(pool, 9, 0.0)[0])
    pool.free(b)
    pool.reserve(a, 2)
    pool.free(a)  # unused reserved pages go back too
    assert pool.free_pages == pool.num_pages
    pool.check()
    with pytest.raises(ValueError, match="n_pages=-1"):
        pool.reserve(pool.new_sequence(), -1)


def test_truncate_and_free():
    pool = _pool(page_size=4)
    a = pool.new_sequence()
    pool.write(0, pool.append(a, 11), *_kv(pool, 11, 0.0))
    pages = pool.pages(a)
    pool.truncate(a, 5)
    assert pool.length(a) == 5 and pool.pages(a) == pages[:2]
    assert pool.refcount(pages[2]) == 0 and pool.free_pages == 12 - 2
    pool.write(0, pool.append(a, 2), *_kv(pool, 2, 50.0))  # rewrites the tail of page 2 in place
    assert pool.pages(a) == pages[:2]
    want = torch.cat([_kv(pool, 5, 0.0)[0], _kv(pool, 2, 50.0)[0]], dim=1)
    assert torch.equal(_read(pool, a)[0], want)
    pool.truncate(a, 0)
    assert pool.pages(a) == [] and pool.free_pages == 12
    with pytest.raises(ValueError, match="truncate"):
        pool.truncate(a, 1)
    pool.free(a)
    with pytest.raises(KeyError, match="freed twice"):
        pool.free(a)
    with pytest.raises(KeyError, match="not in the pool"):
        pool.append(a, 1)
    with pytest.raises(KeyError):
        pool.free(12345)
    pool.check()


def test_pool_full_changes_nothing():
    pool = _pool(num_pages=5, page_size=4)
    a = pool.new_sequence()
    pool.write(0, pool.append(a, 10), *_kv(pool, 10, 0.0))  # 3 pages, the last half full
    b = pool.fork(a)
    before = _state(pool)
    with pytest.raises(PoolFull, match=r"needs 4 free pages .* has 2"):
        pool.append(a, 11)  # 2 fit in the shared last page (after copying it: 1 page), 9 need 3 more
    pool.check()
    _same_state(before, _state(pool))
    with pytest.raises(PoolFull, match="HINT"):
        pool.append(b, 20)
    _same_state(before, _state(pool))
    with pytest.raises(PoolFull):
        pool.relocate(b)  # 3 pages to copy, 2 free
    _same_state(before, _state(pool))
    with pytest.raises(PoolFull):
        pool.reserve(b, 3)
    _same_state(before, _state(pool))
    pool.append(b, 2)  # fits: copy-on-write of the shared last page (1 page)
    pool.check()
    assert pool.free_pages == 1 and pool.pages_copied == 1


def test_pool_full_with_prefix_cache_evicts_nothing_when_it_still_fails():
    """PoolFull must leave everything as it was, the prefix cache included: evicting cached pages and
    then failing anyway throws the cache away for nothing (append's docstring: 'before changing anything')."""
    pool = _pool(num_pages=6, page_size=4)
    cache = PrefixCache(pool)
    a = pool.new_sequence()
    pool.append(a, 8)
    cache.insert(list(range(8)), pool.pages(a))
    pool.free(a)  # 2 cached pages nobody uses: evictable
    b = pool.new_sequence()
    pool.append(b, 4)
    before = _state(pool)
    assert pool.available_pages() == 5
    with pytest.raises(PoolFull):
        pool.append(b, 4 * 6)  # needs 6 pages: even evicting both cached pages leaves 5
    pool.check()
    _same_state(before, _state(pool))


def test_pool_argument_validation():
    with pytest.raises(TypeError, match="num_pages"):
        PagePool(1, 1, 8, 4.0)
    with pytest.raises(ValueError, match="page_size=0"):
        PagePool(1, 1, 8, 4, page_size=0)
    with pytest.raises(TypeError, match="num_layers"):
        PagePool(True, 1, 8, 4)
    with pytest.raises(TypeError, match="dtype"):
        PagePool(1, 1, 8, 4, dtype=torch.int32)
    pool = _pool()
    s = pool.new_sequence()
    with pytest.raises(ValueError, match="n=-1"):
        pool.append(s, -1)
    with pytest.raises(TypeError, match="n must be an int"):
        pool.append(s, 1.0)
    assert pool.length(s) == 0 and pool.free_pages == 12


def test_page_bytes():
    pool = PagePool(3, 2, 8, 4, page_size=16, value_dim=4, dtype=torch.bfloat16)
    assert pool.page_bytes == 3 * 2 * 16 * (8 + 4) * 2
    assert pool.page_bytes * 4 == pool.k.nbytes + pool.v.nbytes


# ---------------------------------------------------------------------------------------- PrefixCache


def _cached_seq(pool: PagePool, cache: PrefixCache, tokens: list[int]) -> int:
    s = pool.new_sequence()
    pool.append(s, len(tokens))
    cache.insert(tokens, pool.pages(s))
    return s


def test_prefix_match_whole_pages_of_the_exact_chain():
    pool = _pool(num_pages=20, page_size=4)
    cache = PrefixCache(pool)
    tokens = list(range(10))  # two full pages cached, the partial third is not
    a = _cached_seq(pool, cache, tokens)
    pa = pool.pages(a)
    assert len(cache) == 2 and sorted(cache.pages()) == sorted(pa[:2])
    assert pool.refcount(pa[0]) == 2 and pool.refcount(pa[2]) == 1
    assert cache.match(tokens) == pa[:2]
    assert cache.match([*tokens, 55, 56]) == pa[:2]
    assert cache.match(tokens[:7]) == pa[:1]  # whole pages only
    assert cache.match(tokens[:3]) == []
    assert cache.match(tokens, limit=7) == pa[:1]
    assert cache.match(tokens, limit=8) == pa[:2]
    assert cache.match(tokens, limit=0) == []
    assert cache.match([0, 1, 2, 99, *tokens[4:]]) == []  # the first page differs
    assert cache.match([0, 1, 2, 3, 4, 5, 6, 99]) == pa[:1]
    # the second page's tokens after a different first page: not a match (keys depend on the whole past)
    assert cache.match([9, 9, 9, 9, *tokens[4:8]]) == []
    b = _cached_seq(pool, cache, [9, 9, 9, 9, *tokens[4:8]])
    pb = pool.pages(b)
    assert cache.match([9, 9, 9, 9, *tokens[4:8]]) == pb
    assert cache.match(tokens) == pa[:2]  # both chains coexist
    assert len(cache) == 4
    # inserting the same chain again adds nothing
    assert cache.insert(tokens, pa) == 0 and len(cache) == 4
    pool.check()


def test_prefix_cache_eviction_lru_leaves_first_unreferenced_only():
    pool = _pool(num_pages=10, page_size=2)
    cache = PrefixCache(pool)
    old = _cached_seq(pool, cache, [1, 1, 2, 2, 3, 3])  # chain of 3 pages
    new = _cached_seq(pool, cache, [7, 7, 8, 8])  # chain of 2 pages
    held = _cached_seq(pool, cache, [5, 5])  # stays referenced by its sequence
    p_old, p_new, p_held = pool.pages(old), pool.pages(new), pool.pages(held)
    pool.free(old)
    pool.free(new)
    cache.match([1, 1, 2, 2, 3, 3])  # old is now the most recently used chain
    cache.match([7, 7])  # ... but this touches new's first page only
    assert cache.evictable() == 5 and pool.available_pages() == pool.free_pages + 5
    assert pool.free_pages == 10 - 6
    assert cache.evict(1) == 1
    assert p_new[1] not in cache.pages(), "the least recently used leaf goes first"
    assert cache.evict(1) == 1
    assert p_old[2] not in cache.pages(), "then the least recently used remaining leaf"
    assert cache.match([7, 7, 8, 8]) == p_new[:1] and cache.match([1, 1, 2, 2, 3, 3]) == p_old[:2]
    assert cache.evict(100) == 3  # everything unreferenced; the held page stays
    assert cache.pages() == p_held and pool.refcount(p_held[0]) == 2
    assert cache.match([5, 5]) == p_held
    assert pool.free_pages == 10 - 1
    pool.check()


def test_evicted_pages_are_reused_on_demand():
    pool = _pool(num_pages=4, page_size=2)
    cache = PrefixCache(pool)
    a = _cached_seq(pool, cache, [1, 2, 3, 4, 5, 6])
    pages_a = pool.pages(a)
    pool.free(a)
    assert pool.free_pages == 1 and pool.available_pages() == 4
    b = pool.new_sequence()
    pool.append(b, 8)  # needs all 4 pages: the cache gives its 3 up
    assert sorted(pool.pages(b)) == [0, 1, 2, 3] and set(pages_a) <= set(pool.pages(b))
    assert len(cache) == 0 and cache.match([1, 2, 3, 4]) == []
    pool.check()


def test_evictable_counts_only_what_evict_can_free():
    """A cached page whose child page is still referenced cannot be evicted (leaves first), so it must not
    be counted as available: the engine's admission trusts available_pages(), and PoolFull then comes in
    the middle of a step. Happens when two requests with the same first page are prefilled together and
    the longer one's later pages get cached under the other's first page."""
    pool = _pool(num_pages=10, page_size=2)
    cache = PrefixCache(pool)
    a = _cached_seq(pool, cache, [1, 1])  # cached chain: [1, 1] -> a's page
    b = _cached_seq(pool, cache, [1, 1, 2, 2])  # its second page is cached under a's first page
    pool.free(a)  # a's page: cached only, but its child (b's second page) is still held by b
    pool.check()
    counted = cache.evictable()
    freed = cache.evict(100)
    assert counted == freed, f"evictable() said {counted} pages, evict() freed {freed}"
    pool.check()
    assert pool.length(b) == 4


def test_relocate_pool_full_keeps_the_reservation():
    """relocate gives its reservation back before checking the pool can hold the copies; when the check
    trusts an overcounted evictable page, PoolFull comes after that and the reservation is lost."""
    pool = _pool(num_pages=6, page_size=2)
    cache = PrefixCache(pool)
    a = _cached_seq(pool, cache, [1, 1])
    b = _cached_seq(pool, cache, [1, 1, 2, 2])  # a cached page under a's page, held by b
    pool.free(a)  # a's page: counted as evictable, but it has a referenced child
    s = pool.new_sequence()
    pool.append(s, 2)
    pool.reserve(s, 1)
    pool.append(pool.new_sequence(), 2)  # the last free page
    assert pool.free_pages == 0 and pool.length(b) == 4
    before = _state(pool)
    with pytest.raises(PoolFull):
        pool.relocate(s)
    pool.check()
    _same_state(before, _state(pool))


# ----------------------------------------------------------------------------------------- fuzzing


def _value(chain: tuple[int, ...]) -> float:
    """A page slot's content is a function of every token up to it (as real keys are)."""
    return float(hash(chain) % 1_000_003)


def test_random_operations_keep_the_pool_consistent():
    """1,000 seeded random operations (new with prefix reuse, append, reserve, fork, truncate, free,
    relocate, prefix insert/match/evict); after each, check() and every sequence's contents; PoolFull
    leaves every sequence as it was; nothing leaks at the end."""
    rng = random.Random(1234)
    P = 3
    pool = PagePool(1, 1, 1, 40, page_size=P, dtype=torch.float64, fill=NAN)
    cache = PrefixCache(pool)
    toks: dict[int, list[int]] = {}  # seq -> its tokens (slot values are _value(tokens[: i + 1]))
    counts = dict.fromkeys(
        (
            "new",
            "append",
            "reserve",
            "fork",
            "truncate",
            "free",
            "relocate",
            "insert",
            "match",
            "evict",
            "full",
        ),
        0,
    )

    def full(fn, *args) -> Any:
        """fn(*args), or None when the pool is full; then every sequence is as it was (the prefix cache
        may have been evicted: see test_pool_full_with_prefix_cache_evicts_nothing_when_it_still_fails)."""
        before = _state(pool)
        try:
            return fn(*args)
        except PoolFull:
            counts["full"] += 1
            assert _state(pool)[0] == before[0], "PoolFull changed a sequence"
            return None

    def put(seq: int, new: list[int]) -> None:
        slots = full(pool.append, seq, len(new))
        if slots is None:
            return
        t = toks[seq]
        vals = []
        for x in new:
            t.append(x)
            vals.append(_value(tuple(t)))
        val = torch.tensor(vals, dtype=torch.float64).view(1, -1, 1)
        pool.write(0, slots, val, -val)

    for _ in range(1000):
        op = rng.choices(list(counts)[:-1], weights=[3, 6, 2, 2, 2, 3, 1, 2, 2, 1])[0]
        live = list(toks)
        if op == "new" or not live:
            s = pool.new_sequence()
            prompt = [rng.randrange(2) for _ in range(rng.randrange(1, 14))]
            cached = cache.match(prompt, limit=len(prompt) - 1)
            if cached:
                pool.attach(s, cached, len(cached) * P)
            toks[s] = prompt[: len(cached) * P]
            put(s, prompt[len(cached) * P :])
            counts["new"] += 1
            continue
        s = rng.choice(live)
        counts[op] += 1
        if op == "append":
            put(s, [rng.randrange(2) for _ in range(rng.randrange(0, 8))])
        elif op == "fork":
            toks[pool.fork(s)] = list(toks[s])
        elif op == "truncate":
            n = rng.randrange(0, len(toks[s]) + 1)
            pool.truncate(s, n)
            del toks[s][n:]
        elif op == "free":
            pool.free(s)
            del toks[s]
        elif op == "reserve":
            full(pool.reserve, s, rng.randrange(0, 4))
        elif op == "relocate":
            full(pool.relocate, s)
        elif op == "insert":
            cache.insert(toks[s], pool.pages(s))
        elif op == "match":
            probe = [*toks[s][: rng.randrange(0, len(toks[s]) + 1)], rng.randrange(2)]
            found = cache.match(probe)
            if found:  # a cached page holds exactly the keys of its token chain
                slots = torch.tensor([p * P + i for p in found for i in range(P)])
                got = pool.flat_k(0)[0, slots, 0].tolist()
                assert got == [_value(tuple(probe[: i + 1])) for i in range(len(found) * P)]
        elif op == "evict":
            cache.evict(rng.randrange(1, 5))
        pool.check()
        for seq, t in toks.items():  # no sequence ever sees another's writes
            assert pool.length(seq) == len(t)
            k = pool.flat_k(0)[0, pool.slots(seq, 0, len(t)), 0].tolist()
            assert k == [_value(tuple(t[: i + 1])) for i in range(len(t))], f"sequence {seq} corrupted"
    assert all(counts[op] > 10 for op in counts), counts  # the fuzz reached every operation (and PoolFull)
    for seq in list(toks):
        pool.free(seq)
    pool.check()
    assert pool.used_pages == len(cache)
    cache.clear()
    pool.check()
    assert pool.free_pages == pool.num_pages and len(cache) == 0
