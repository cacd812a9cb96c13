"""Mask descriptors against brute force written here in plain Python (no attention backend involved).

Every descriptor's boolean tile must equal an independent elementwise rule (design.md §2), and its tile
classification must be SOUND (EMPTY => nothing kept, FULL => everything kept, for every b and h) and, for
primitives, EXACT (PARTIAL only when the tile really is mixed). A composition must be exact whenever both
of its children answer EMPTY or FULL.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from attnopt import masks
from attnopt.masks import Mask, MaskContext, Tile

B, HQ = 2, 3  # batch and query heads of the fixed grid; the random sweep draws its own


# ---------------------------------------------------------------------------------------------------------
# Brute-force rules: plain Python on ints, written from the table in design.md §2, never the library.


@dataclass(frozen=True)
class Rule:
    """keep(b, h, i, j) -> bool on Python ints; ``by_bh`` says whether it looks at b or h at all."""

    fn: Callable[[int, int, int, int], bool]
    by_bh: bool = False

    def __and__(self, other: Rule) -> Rule:
        return Rule(
            lambda b, h, i, j: self.fn(b, h, i, j) and other.fn(b, h, i, j), self.by_bh or other.by_bh
        )

    def __or__(self, other: Rule) -> Rule:
        return Rule(lambda b, h, i, j: self.fn(b, h, i, j) or other.fn(b, h, i, j), self.by_bh or other.by_bh)


def _pos(i: int, ctx: MaskContext, align: str) -> int:
    """Aligned query position: bottom-right p = i + Sk - Sq, top-left p = i."""
    return i + ctx.Sk - ctx.Sq if align == "bottom_right" else i


def causal_rule(ctx: MaskContext, align: str) -> Rule:
    return Rule(lambda b, h, i, j: j <= _pos(i, ctx, align))


def window_rule(ctx: MaskContext, left: int, right: int, align: str) -> Rule:
    return Rule(lambda b, h, i, j: _pos(i, ctx, align) - left <= j <= _pos(i, ctx, align) + right)


def prefix_rule(ctx: MaskContext, prefix_len: int, align: str) -> Rule:
    return Rule(lambda b, h, i, j: j < prefix_len or j <= _pos(i, ctx, align))


def padding_rule(lengths: list[int]) -> Rule:
    return Rule(lambda b, h, i, j: j < lengths[b], by_bh=True)


def left_padding_rule(pads: list[int]) -> Rule:
    return Rule(lambda b, h, i, j: j >= pads[b], by_bh=True)


def _doc_of(x: int, cu: list[int]) -> int:
    for d in range(len(cu) - 1):
        if cu[d] <= x < cu[d + 1]:
            return d
    raise AssertionError(f"position {x} lies in no document of {cu}")


def document_rule(cu_q: list[int], cu_k: list[int] | None) -> Rule:
    ck = cu_q if cu_k is None else cu_k
    return Rule(lambda b, h, i, j: _doc_of(i, cu_q) == _doc_of(j, ck))


def dense_rule(t: Tensor) -> Rule:
    """Broadcasting done by hand: a size-1 dim is read at index 0."""
    shape = (1,) * (4 - t.ndim) + tuple(t.shape)
    data = t.reshape(shape).tolist()

    def fn(b: int, h: int, i: int, j: int) -> bool:
        idx = [x if n > 1 else 0 for x, n in zip((b, h, i, j), shape)]
        return bool(data[idx[0]][idx[1]][idx[2]][idx[3]])

    return Rule(fn, by_bh=True)


def brute(rule: Rule, ctx: MaskContext) -> Tensor:
    """The rule evaluated at every (b, h, i, j): bool (B, Hq, Sq, Sk)."""
    if not rule.by_bh:
        plane = [[rule.fn(0, 0, i, j) for j in range(ctx.Sk)] for i in range(ctx.Sq)]
        return (
            torch.tensor(plane, dtype=torch.bool).reshape(1, 1, ctx.Sq, ctx.Sk).expand(ctx.B, ctx.Hq, -1, -1)
        )
    vals = [
        [[[rule.fn(b, h, i, j) for j in range(ctx.Sk)] for i in range(ctx.Sq)] for h in range(ctx.Hq)]
        for b in range(ctx.B)
    ]
    return torch.tensor(vals, dtype=torch.bool).reshape(ctx.B, ctx.Hq, ctx.Sq, ctx.Sk)


# ---------------------------------------------------------------------------------------------------------
# Tilings and the checks shared by the fixed grid and the random sweep.


def tilings(Sq: int, Sk: int, tq: int, tk: int) -> list[tuple[int, int, int, int]]:
    return [
        (q0, min(q0 + tq, Sq), k0, min(k0 + tk, Sk))
        for q0, k0 in itertools.product(range(0, Sq, tq), range(0, Sk, tk))
    ]


def truth_per_tile(full: Tensor, tq: int, tk: int) -> dict[tuple[int, int, int, int], Tile]:
    """The true class of every tile of a (tq x tk) tiling, from the brute-force plane (vectorised)."""
    Bn, Hn, Sq, Sk = full.shape
    nq, nk = math.ceil(Sq / tq), math.ceil(Sk / tk)
    for_all = torch.ones(Bn, Hn, nq * tq, nk * tk, dtype=torch.bool)  # padding never breaks "all"
    for_any = torch.zeros(Bn, Hn, nq * tq, nk * tk, dtype=torch.bool)  # ... nor "any"
    for_all[..., :Sq, :Sk] = full
    for_any[..., :Sq, :Sk] = full
    all_ = for_all.view(Bn, Hn, nq, tq, nk, tk).all(5).all(3).all(1).all(0).tolist()  # (nq, nk)
    any_ = for_any.view(Bn, Hn, nq, tq, nk, tk).any(5).any(3).any(1).any(0).tolist()
    out = {}
    for a, c in itertools.product(range(nq), range(nk)):
        key = (a * tq, min((a + 1) * tq, Sq), c * tk, min((c + 1) * tk, Sk))
        out[key] = Tile.FULL if all_[a][c] else (Tile.PARTIAL if any_[a][c] else Tile.EMPTY)
    return out


def classification_problems(
    mask: Mask, truth: dict[tuple[int, int, int, int], Tile], ctx: MaskContext, exact: bool
) -> list[str]:
    """Soundness always; exactness when ``exact`` (or, for a composition, when both children are decided)."""
    children = (mask.a, mask.b) if isinstance(mask, (masks.And, masks.Or)) else None
    problems = []
    for (q0, q1, k0, k1), want in truth.items():
        got = mask.classify(q0, q1, k0, k1, ctx)
        where = f"{mask!r} tile q[{q0}:{q1}] k[{k0}:{k1}] in {ctx}: classify={got.name}, truth={want.name}"
        if got is Tile.EMPTY and want is not Tile.EMPTY:
            problems.append(f"UNSOUND {where} (keeps something)")
        elif got is Tile.FULL and want is not Tile.FULL:
            problems.append(f"UNSOUND {where} (drops something)")
        elif got is not want:
            decided = exact or (
                children is not None
                and all(c.classify(q0, q1, k0, k1, ctx) is not Tile.PARTIAL for c in children)
            )
            if decided:
                problems.append(f"INEXACT {where}")
    return problems


def _report(problems: list[str]) -> str:
    return f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:8])


# ---------------------------------------------------------------------------------------------------------
# The fixed grid: named cases x sizes x alignments x tilings.


def _cuts(S: int) -> list[int]:
    """Six documents over S positions with empty ones at the start, in the middle and at the end."""
    a, b = S // 3, (2 * S) // 3
    return [0, 0, a, a, b, S, S]  # docs: [], [0,a), [], [a,b), [b,S), []


def _cuts_k(S: int) -> list[int]:
    """A different key packing with the same number of documents (6)."""
    a = (S + 1) // 2
    return [0, a, a, S, S, S, S]  # docs: [0,a), [], [a,S), [], [], []


def _gen(ctx: MaskContext, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * ctx.Sq + 10 * ctx.Sk + salt)


def _blocky(ctx: MaskContext) -> Tensor:
    """A (B, 1, Sq, Sk) mask made of 4x4 blocks, so aligned tiles can be FULL or EMPTY."""
    nq, nk = math.ceil(ctx.Sq / 4), math.ceil(ctx.Sk / 4)
    blocks = torch.rand(ctx.B, 1, nq, nk, generator=_gen(ctx, 1)) > 0.5
    return blocks.repeat_interleave(4, 2).repeat_interleave(4, 3)[..., : ctx.Sq, : ctx.Sk].contiguous()


def _custom_ij(b, h, i, j):
    return 2 * j <= i + 1  # broadcasts to (1, 1, q, k) only


def _custom_mod(b, h, i, j):
    return (i + 2 * j + b) % (h + 2) != 0


def _custom_heads(b, h, i, j):
    # whole (b, h) slices are masked out, so tiles can be EMPTY for some heads and FULL for none
    return (j <= i + 2) & ((b + h) % 3 != 2)


# name -> (positional: depends on align, builder(ctx, align) -> (mask, rule) or None when it does not apply)
Builder = Callable[[MaskContext, str], "tuple[Mask, Rule] | None"]
PRIMITIVES: dict[str, tuple[bool, Builder]] = {
    "causal": (True, lambda c, a: (masks.causal(a), causal_rule(c, a))),
    "window_5_3": (True, lambda c, a: (masks.sliding_window(5, 3, align=a), window_rule(c, 5, 3, a))),
    "window_0_0": (True, lambda c, a: (masks.sliding_window(0, align=a), window_rule(c, 0, 0, a))),
    "window_8": (True, lambda c, a: (masks.sliding_window(8, align=a), window_rule(c, 8, 0, a))),
    "window_0_2": (True, lambda c, a: (masks.sliding_window(0, 2, align=a), window_rule(c, 0, 2, a))),
    "prefix_lm_3": (True, lambda c, a: (masks.prefix_lm(3, align=a), prefix_rule(c, 3, a))),
    "prefix_lm_0": (True, lambda c, a: (masks.prefix_lm(0, align=a), prefix_rule(c, 0, a))),
    "padding_0_Sk": (False, lambda c, a: (masks.padding(torch.tensor([c.Sk, 0])), padding_rule([c.Sk, 0]))),
    "padding_mid": (
        False,
        lambda c, a: (
            masks.padding(torch.tensor([(c.Sk + 1) // 2, max(c.Sk - 2, 0)], dtype=torch.int32)),
            padding_rule([(c.Sk + 1) // 2, max(c.Sk - 2, 0)]),
        ),
    ),
    "left_padding_0_Sk": (
        False,
        lambda c, a: (masks.left_padding(torch.tensor([0, c.Sk])), left_padding_rule([0, c.Sk])),
    ),
    "left_padding_mid": (
        False,
        lambda c, a: (
            masks.left_padding(torch.tensor([c.Sk // 2, min(2, c.Sk)], dtype=torch.int32)),
            left_padding_rule([c.Sk // 2, min(2, c.Sk)]),
        ),
    ),
    "document": (
        False,
        lambda c, a: (
            (masks.document(_cuts(c.Sq)), document_rule(_cuts(c.Sq), None)) if c.Sq == c.Sk else None
        ),
    ),
    "document_qk": (
        False,
        lambda c, a: (
            # int32, like FlashAttention's varlen cu_seqlens
            masks.document(torch.tensor(_cuts(c.Sq), dtype=torch.int32), torch.tensor(_cuts_k(c.Sk))),
            document_rule(_cuts(c.Sq), _cuts_k(c.Sk)),
        ),
    ),
    "dense_SqSk": (
        False,
        lambda c, a: (lambda t: (masks.dense(t), dense_rule(t)))(
            torch.rand(c.Sq, c.Sk, generator=_gen(c, 2)) > 0.4
        ),
    ),
    "dense_B1SqSk": (False, lambda c, a: (lambda t: (masks.dense(t), dense_rule(t)))(_blocky(c))),
    "dense_1H1Sk": (
        False,
        lambda c, a: (lambda t: (masks.dense(t), dense_rule(t)))(
            torch.rand(1, c.Hq, 1, c.Sk, generator=_gen(c, 3)) > 0.5
        ),
    ),
    "dense_HSqSk": (
        False,
        lambda c, a: (lambda t: (masks.dense(t), dense_rule(t)))(
            torch.rand(c.Hq, c.Sq, c.Sk, generator=_gen(c, 4)) > 0.3
        ),
    ),
    "custom_ij": (False, lambda c, a: (masks.custom(_custom_ij), Rule(lambda b, h, i, j: 2 * j <= i + 1))),
    "custom_mod": (
        False,
        lambda c, a: (
            masks.custom(_custom_mod),
            Rule(lambda b, h, i, j: (i + 2 * j + b) % (h + 2) != 0, True),
        ),
    ),
    "custom_heads": (
        False,
        lambda c, a: (
            masks.custom(_custom_heads),
            Rule(lambda b, h, i, j: j <= i + 2 and (b + h) % 3 != 2, True),
        ),
    ),
}


def _prim(name: str, ctx: MaskContext, align: str) -> tuple[Mask, Rule]:
    built = PRIMITIVES[name][1](ctx, align)
    assert built is not None, name
    return built


def _doc_any(ctx: MaskContext, align: str) -> tuple[Mask, Rule]:
    return _prim("document" if ctx.Sq == ctx.Sk else "document_qk", ctx, align)


def _compose(op: str, x: tuple[Mask, Rule], y: tuple[Mask, Rule]) -> tuple[Mask, Rule]:
    return (x[0] & y[0], x[1] & y[1]) if op == "&" else (x[0] | y[0], x[1] | y[1])


COMPOSITIONS: dict[str, Builder] = {
    "causal_and_window_8": lambda c, a: _compose("&", _prim("causal", c, a), _prim("window_8", c, a)),
    "document_and_causal": lambda c, a: _compose("&", _doc_any(c, a), _prim("causal", c, a)),
    "padding_and_causal": lambda c, a: _compose("&", _prim("padding_mid", c, a), _prim("causal", c, a)),
    "left_padding_and_causal": lambda c, a: _compose(
        "&", _prim("left_padding_mid", c, a), _prim("causal", c, a)
    ),
    "left_and_right_padding": lambda c, a: _compose(
        "&", _prim("left_padding_mid", c, a), _prim("padding_mid", c, a)
    ),
    "window_4_or_prefix_lm_3": lambda c, a: _compose(
        "|",
        (masks.sliding_window(4, align=a), window_rule(c, 4, 0, a)),
        _prim("prefix_lm_3", c, a),
    ),
    "causal_and_padding__or_dense": lambda c, a: _compose(
        "|",
        _compose("&", _prim("causal", c, a), _prim("padding_0_Sk", c, a)),
        _prim("dense_B1SqSk", c, a),
    ),
    "window_2_1_or_document__and_padding": lambda c, a: _compose(
        "&",
        _compose("|", (masks.sliding_window(2, 1, align=a), window_rule(c, 2, 1, a)), _doc_any(c, a)),
        _prim("padding_mid", c, a),
    ),
    "causal_and_window_5_3__or_prefix_lm_0__and_custom": lambda c, a: _compose(
        "&",
        _compose(
            "|", _compose("&", _prim("causal", c, a), _prim("window_5_3", c, a)), _prim("prefix_lm_0", c, a)
        ),
        _prim("custom_heads", c, a),
    ),
}

SIZES = [(7, 7), (7, 13), (13, 7), (1, 9), (16, 16), (5, 1)]
TILES = [(1, 1), (2, 3), (4, 4), (3, 5), (8, 8), None]  # None: one tile covering everything
ALIGN_IDS = {"bottom_right": "bottomright", "top_left": "topleft"}


def _tile_id(t: tuple[int, int] | None) -> str:
    return "tileall" if t is None else f"tile{t[0]}x{t[1]}"


def _grid(names_positional: dict[str, bool], with_tiles: bool) -> list:
    """pytest params (name, align, Sq, Sk[, tile]) with ids like ``window_5_3-topleft-Sq7_Sk13-tile2x3``."""
    params = []
    for name, positional in names_positional.items():
        aligns = ["bottom_right", "top_left"] if positional else ["bottom_right"]
        for align, (Sq, Sk) in itertools.product(aligns, SIZES):
            if name == "document" and Sq != Sk:
                continue  # one shared cu_seqlens needs Sq == Sk
            base = [name, *([ALIGN_IDS[align]] if positional else []), f"Sq{Sq}_Sk{Sk}"]
            if not with_tiles:
                params.append(pytest.param(name, align, Sq, Sk, id="-".join(base)))
                continue
            for t in TILES:
                params.append(pytest.param(name, align, Sq, Sk, t, id="-".join([*base, _tile_id(t)])))
    return params


PRIM_POSITIONAL = {name: positional for name, (positional, _) in PRIMITIVES.items()}
COMP_POSITIONAL = dict.fromkeys(COMPOSITIONS, True)
_BRUTE_CACHE: dict[tuple[str, str, int, int], tuple[Mask, Tensor, MaskContext]] = {}


def _case(name: str, align: str, Sq: int, Sk: int) -> tuple[Mask, Tensor, MaskContext]:
    """(mask, brute-force plane (B, Hq, Sq, Sk), ctx), computed once per case."""
    key = (name, align, Sq, Sk)
    if key not in _BRUTE_CACHE:
        ctx = MaskContext(B, HQ, Sq, Sk)
        builder = PRIMITIVES[name][1] if name in PRIMITIVES else COMPOSITIONS[name]
        built = builder(ctx, align)
        assert built is not None
        mask, rule = built
        assert mask.check(ctx) == [], mask.check(ctx)  # the case itself is a valid problem
        _BRUTE_CACHE[key] = (mask, brute(rule, ctx), ctx)
    return _BRUTE_CACHE[key]


def _as_full(t: Tensor, ctx: MaskContext, q: int, k: int) -> Tensor:
    return torch.broadcast_to(t, (ctx.B, ctx.Hq, q, k))


# ---------------------------------------------------------------------------------------------------------
# 1. The elementwise rule.


@pytest.mark.parametrize(("name", "align", "Sq", "Sk"), _grid({**PRIM_POSITIONAL, **COMP_POSITIONAL}, False))
def test_tile_matches_brute_force(name, align, Sq, Sk):
    mask, full, ctx = _case(name, align, Sq, Sk)
    got = mask.tile(0, Sq, 0, Sk, ctx)
    assert got.dtype == torch.bool
    diff = (_as_full(got, ctx, Sq, Sk) != full).nonzero().tolist()
    assert not diff, f"{mask!r} in {ctx}: tile differs from the rule at (b, h, i, j) {diff[:8]}"
    # keep() on raw offset indices: sub-tiles (a corner, a ragged middle, the last element) read the same
    subtiles = {(0, (Sq + 1) // 2, 0, (Sk + 2) // 3), (Sq // 3, Sq, Sk // 4, Sk), (Sq - 1, Sq, Sk - 1, Sk)}
    for q0, q1, k0, k1 in sorted(subtiles):
        sub = mask.keep(*masks.tile_indices(ctx, q0, q1, k0, k1), ctx)
        assert torch.equal(_as_full(sub, ctx, q1 - q0, k1 - k0), full[:, :, q0:q1, k0:k1]), (
            f"{mask!r} in {ctx}: keep() on tile q[{q0}:{q1}] k[{k0}:{k1}] differs from the rule"
        )
    if isinstance(mask, (masks.And, masks.Or)):  # the composed tile is the and/or of the children's tiles
        combine = torch.logical_and if isinstance(mask, masks.And) else torch.logical_or
        want = combine(mask.a.tile(0, Sq, 0, Sk, ctx), mask.b.tile(0, Sq, 0, Sk, ctx))
        assert torch.equal(_as_full(got, ctx, Sq, Sk), _as_full(want, ctx, Sq, Sk)), (
            f"{mask!r} in {ctx}: tile() is not the elementwise combination of its children's tiles"
        )


def test_tile_indices_shapes():
    ctx = MaskContext(2, 3, 5, 7)
    b, h, i, j = masks.tile_indices(ctx, 1, 4, 2, 7)
    assert [tuple(t.shape) for t in (b, h, i, j)] == [(2, 1, 1, 1), (1, 3, 1, 1), (1, 1, 3, 1), (1, 1, 1, 5)]
    assert all(t.dtype == torch.long for t in (b, h, i, j))
    assert i.flatten().tolist() == [1, 2, 3] and j.flatten().tolist() == [2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------------
# 2. Tile classification: sound for everything, exact for primitives.


@pytest.mark.parametrize(("name", "align", "Sq", "Sk", "tile"), _grid(PRIM_POSITIONAL, True))
def test_classify_primitive_sound_and_exact(name, align, Sq, Sk, tile):
    mask, full, ctx = _case(name, align, Sq, Sk)
    tq, tk = tile or (Sq, Sk)
    problems = classification_problems(mask, truth_per_tile(full, tq, tk), ctx, exact=True)
    assert not problems, _report(problems)


@pytest.mark.parametrize(("name", "align", "Sq", "Sk", "tile"), _grid(COMP_POSITIONAL, True))
def test_classify_composition_sound(name, align, Sq, Sk, tile):
    mask, full, ctx = _case(name, align, Sq, Sk)
    tq, tk = tile or (Sq, Sk)
    problems = classification_problems(mask, truth_per_tile(full, tq, tk), ctx, exact=False)
    assert not problems, _report(problems)


# ---------------------------------------------------------------------------------------------------------
# 3. Randomized sweep.


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _rand_cuts(S: int, n_docs: int, g: torch.Generator) -> list[int]:
    inner = sorted(torch.randint(0, S + 1, (n_docs - 1,), generator=g).tolist())  # repeats = empty docs
    return [0, *inner, S]


def _random_primitives(ctx: MaskContext, align: str, g: torch.Generator) -> dict[str, tuple[Mask, Rule]]:
    Sq, Sk = ctx.Sq, ctx.Sk
    left, right, plen = _randint(g, 0, Sk + 2), _randint(g, 0, 6), _randint(g, 0, Sk + 1)
    lengths = torch.randint(0, Sk + 1, (ctx.B,), generator=g)
    if ctx.B > 1 and _randint(g, 0, 1):
        lengths[0], lengths[-1] = 0, Sk  # the extremes
    n_docs = _randint(g, 1, 6)
    cq = _rand_cuts(Sq, n_docs, g)
    ck = None if Sq == Sk and _randint(g, 0, 1) else _rand_cuts(Sk, n_docs, g)
    out = {
        "causal": (masks.causal(align), causal_rule(ctx, align)),
        "window": (masks.sliding_window(left, right, align=align), window_rule(ctx, left, right, align)),
        "prefix_lm": (masks.prefix_lm(plen, align=align), prefix_rule(ctx, plen, align)),
        "padding": (masks.padding(lengths), padding_rule(lengths.tolist())),
        # no extra draw (the sweep's configs stay as they were): the lengths of another row, as pads
        "left_padding": (masks.left_padding(lengths.flip(0)), left_padding_rule(lengths.flip(0).tolist())),
        "document": (masks.document(cq, ck), document_rule(cq, ck)),
    }
    if _randint(g, 0, 3) == 0:  # generic fallback masks cost a tensor evaluation per tile: sometimes only
        t = torch.rand(ctx.B, 1, Sq, Sk, generator=g) < torch.rand(1, generator=g)
        out["dense"] = (masks.dense(t), dense_rule(t))
        m = _randint(g, 2, 5)
        out["custom"] = (
            masks.custom(lambda b, h, i, j: (i * j + h + b) % m != 0),
            Rule(lambda b, h, i, j: (i * j + h + b) % m != 0, True),
        )
    return out


@pytest.mark.parametrize("chunk", range(4), ids=lambda c: f"configs{50 * c}-{50 * c + 49}")
def test_random_sweep(chunk):
    g = torch.Generator().manual_seed(1234 + chunk)
    problems = []
    for _ in range(50):
        ctx = MaskContext(_randint(g, 1, 3), _randint(g, 1, 2), _randint(g, 1, 40), _randint(g, 1, 40))
        align = ("bottom_right", "top_left")[_randint(g, 0, 1)]
        tq, tk = (ctx.Sq, ctx.Sk) if _randint(g, 0, 9) == 0 else (_randint(g, 1, 12), _randint(g, 1, 12))
        # (mask, brute-force plane); a composition's plane is the and/or of its children's planes
        cases = [(m, brute(r, ctx)) for m, r in _random_primitives(ctx, align, g).values()]
        for m, full in cases:  # primitives: the elementwise rule, then exact classification
            if not torch.equal(_as_full(m.tile(0, ctx.Sq, 0, ctx.Sk, ctx), ctx, ctx.Sq, ctx.Sk), full):
                problems.append(f"WRONG TILE {m!r} in {ctx}")
            problems += classification_problems(m, truth_per_tile(full, tq, tk), ctx, exact=True)
        x, y, z = (cases[_randint(g, 0, len(cases) - 1)] for _ in range(3))
        op1, op2 = ("&" if _randint(g, 0, 1) else "|" for _ in range(2))
        xy = (x[0] & y[0], x[1] & y[1]) if op1 == "&" else (x[0] | y[0], x[1] | y[1])
        xyz = (xy[0] & z[0], xy[1] & z[1]) if op2 == "&" else (xy[0] | z[0], xy[1] | z[1])
        for m, full in (xy, xyz):  # compositions: sound, and exact where both children are decided
            problems += classification_problems(m, truth_per_tile(full, tq, tk), ctx, exact=False)
    assert not problems, _report(problems)


# ---------------------------------------------------------------------------------------------------------
# 4. repr.


def _named_rule(b, h, i, j):
    return j <= i


@pytest.mark.parametrize(
    ("mask", "want"),
    [
        pytest.param(masks.causal(), "causal()", id="causal"),
        pytest.param(masks.causal("top_left"), "causal(align='top_left')", id="causal_topleft"),
        pytest.param(masks.sliding_window(255), "sliding_window(left=255, right=0)", id="window_255"),
        pytest.param(
            masks.sliding_window(4, 2, align="top_left"),
            "sliding_window(left=4, right=2, align='top_left')",
            id="window_4_2_topleft",
        ),
        pytest.param(masks.prefix_lm(3), "prefix_lm(prefix_len=3)", id="prefix_lm_3"),
        pytest.param(masks.padding(torch.tensor([3, 0])), "padding(kv_lengths=[3, 0])", id="padding"),
        pytest.param(
            masks.left_padding(torch.tensor([0, 2])), "left_padding(pad_lengths=[0, 2])", id="left_padding"
        ),
        pytest.param(masks.document([0, 2, 5]), "document(cu_seqlens=[0, 2, 5])", id="document"),
        pytest.param(
            masks.document([0, 2, 5], [0, 1, 4]),
            "document(cu_seqlens=[0, 2, 5], cu_seqlens_k=[0, 1, 4])",
            id="document_qk",
        ),
        pytest.param(masks.dense(torch.ones(4, 5, dtype=torch.bool)), "dense(shape=(4, 5))", id="dense"),
        pytest.param(masks.custom(_named_rule), "custom(_named_rule)", id="custom"),
        pytest.param(
            masks.causal() & masks.sliding_window(8),
            "(causal() & sliding_window(left=8, right=0))",
            id="and",
        ),
        pytest.param(
            masks.sliding_window(4) | masks.prefix_lm(3),
            "(sliding_window(left=4, right=0) | prefix_lm(prefix_len=3))",
            id="or",
        ),
        pytest.param(
            (masks.causal() & masks.padding([2, 1])) | masks.causal("top_left"),
            "((causal() & padding(kv_lengths=[2, 1])) | causal(align='top_left'))",
            id="nested",
        ),
    ],
)
def test_repr(mask, want):
    assert repr(mask) == want


# ---------------------------------------------------------------------------------------------------------
# 5. Composition operators reject non-masks.


@pytest.mark.parametrize(
    "other",
    [1, True, None, "causal", torch.ones(3, 3, dtype=torch.bool), lambda b, h, i, j: j <= i],
    ids=["int", "bool", "None", "str", "bool_tensor", "function"],
)
@pytest.mark.parametrize("op", ["and", "or"])
def test_composition_rejects_non_masks(op, other):
    m = masks.causal()
    with pytest.raises(TypeError, match=r"cannot combine a mask with .*both sides must be masks"):
        _ = (m & other) if op == "and" else (m | other)
    with pytest.raises(TypeError):  # the reflected order never builds a mask either
        _ = (other & m) if op == "and" else (other | m)


# --------------------------------------------------------------------------------------------------
# key_range(q0, q1): a bound on the keys a block of queries can see (span/blockwise skip the rest)


@pytest.mark.parametrize("seed", range(4))
def test_key_range_bounds_every_visible_key(seed):
    g = torch.Generator().manual_seed(100 + seed)

    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for _ in range(10):
        B, Sq, Sk = 2, rint(1, 24), rint(1, 24)
        ctx = masks.MaskContext(B, 2, Sq, Sk)
        align = "top_left" if rint(0, 1) else "bottom_right"

        def cuts(S):
            return [0, *sorted(rint(0, S) for _ in range(2)), S]

        prims = [
            masks.causal(align),
            masks.sliding_window(rint(0, 5), rint(0, 5), align=align),
            masks.prefix_lm(rint(0, 10), align=align),
            masks.padding(torch.tensor([rint(0, Sk), rint(0, Sk)])),
            masks.document(cuts(Sq), cuts(Sk)),
        ]
        g_left = torch.Generator().manual_seed(1000 * seed + 31 * Sq + Sk)  # g's draws stay as they were
        prims.append(masks.left_padding(torch.randint(0, Sk + 1, (B,), generator=g_left)))
        all_masks = prims + [a & b for a in prims for b in prims] + [a | b for a in prims for b in prims]
        for m in all_masks:
            full = m.tile(0, Sq, 0, Sk, ctx).expand(B, 2, Sq, Sk)
            for q0 in range(Sq):
                for q1 in range(q0 + 1, Sq + 1):
                    lo, hi = m.key_range(q0, q1, ctx)
                    outside = full[:, :, q0:q1].clone()
                    outside[..., lo:hi] = False
                    assert not outside.any(), (
                        f"{m!r} Sq={Sq} Sk={Sk} rows [{q0},{q1}) see keys outside [{lo},{hi})"
                    )


# --------------------------------------------------------------------------------------------------
# key_only: a promise that keep() ignores h and i (sdpa then passes one (B, 1, 1, Sk) row)


KEY_ONLY = {"padding_0_Sk", "padding_mid", "left_padding_0_Sk", "left_padding_mid"}


@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_key_only_is_declared_exactly_for_key_masks(name):
    assert PRIMITIVES[name][1](MaskContext(B, HQ, 7, 7), "bottom_right")[0].key_only == (name in KEY_ONLY)


@pytest.mark.parametrize(("name", "Sq", "Sk"), [(n, Sq, Sk) for n in sorted(KEY_ONLY) for Sq, Sk in SIZES])
def test_key_only_masks_ignore_heads_and_queries(name, Sq, Sk):
    mask, full, _ = _case(name, "bottom_right", Sq, Sk)
    row = full[:, :1, :1, :]  # (B, 1, 1, Sk): what a key-only mask stands for
    assert torch.equal(full, row.expand_as(full)), f"{mask!r} is key_only but depends on h or i"


def test_key_only_composition():
    pad, left, causal = masks.padding([3, 1]), masks.left_padding([0, 2]), masks.causal()
    assert (pad & left).key_only and (pad | left).key_only and ((pad & left) | left).key_only
    assert not (pad & causal).key_only and not (causal | left).key_only
    assert not masks.dense(torch.ones(2, 1, 1, 4, dtype=torch.bool)).key_only  # by type, not by shape


# --------------------------------------------------------------------------------------------------
# check() and constructor errors of the key-padding masks


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (
            masks.left_padding(torch.tensor([-1, 3])),
            r"left_padding pad_lengths=\[-1, 3\] must lie in \[0, Sk=7\]",
        ),
        (
            masks.left_padding(torch.tensor([3, 8])),
            r"left_padding pad_lengths=\[3, 8\] must lie in \[0, Sk=7\]",
        ),
        (
            masks.left_padding(torch.tensor([3, 3, 3])),
            r"left_padding pad_lengths has 3 entries; expected one per batch element \(B=2\)",
        ),
        (masks.causal() & masks.left_padding([1, 2, 3]), r"left_padding pad_lengths has 3 entries"),
        (masks.padding(torch.tensor([3, 8])), r"padding kv_lengths=\[3, 8\] must lie in \[0, Sk=7\]"),
    ],
    ids=["left-negative", "left-over_Sk", "left-wrong_batch", "left-in_composition", "right-over_Sk"],
)
def test_padding_check_problems(mask, message):
    problems = mask.check(MaskContext(2, 3, 5, 7))
    assert len(problems) == 1 and re.search(message, problems[0]), problems


@pytest.mark.parametrize("pads", [[0, 7], [7, 0], [3, 5], torch.tensor([0, 0], dtype=torch.int32)])
def test_left_padding_check_accepts_the_full_range(pads):
    assert masks.left_padding(pads).check(MaskContext(2, 3, 5, 7)) == []


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: masks.left_padding(torch.tensor([3.0, 7.0])), TypeError, r"must hold integers, got dtype"),
        (lambda: masks.left_padding(torch.tensor([True, False])), TypeError, r"must hold integers"),
        (lambda: masks.left_padding(torch.tensor([[3, 7]])), ValueError, r"must be 1-D, got shape \(1, 2\)"),
    ],
    ids=["float", "bool", "2d"],
)
def test_left_padding_constructor_errors(make, error, message):
    with pytest.raises(error, match=r"left_padding pad_lengths " + message):
        make()
