"""Hugging Face transformers integration (attnopt.integrations.transformers, design.md §5).

Three layers, cheapest first:
  * the mask function, with no model: every translated mask, evaluated densely, must equal the mask
    transformers itself builds (``sdpa_mask``) for the same rule, padding and cache offsets, entry by entry;
    recognised rules must stay structured (no N² tensor);
  * the attention function on small random problems against a plain eager computation;
  * the two real models of design.md §5 (loaded once per session in conftest.py): attnopt against
    transformers' own eager/SDPA implementations on padded, left-padded and packed batches, and greedy
    generation token for token. A spy on both registered functions proves attnopt really ran and which
    mask descriptors it was handed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers >= 5")

import transformers.masking_utils as mu
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import attnopt.integrations.transformers as ao_hf
from attnopt import masks as M
from tests.test_masks import classification_problems, truth_per_tile

B = 3  # batch of the mask-translation grid


@pytest.fixture(autouse=True)
def one_thread():
    """Run this module's tests on one intra-op thread, then restore the setting.

    On a small shared machine torch's thread pool stalls whenever another process holds a core: greedy
    decoding of SmolLM2 (24 tokens, many tiny ops) took 46 s with 2 threads under load and 1.7 s with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def hf_dense(
    Sq: int, Sk: int, q_offset: int, kv_offset: int, fn: Callable, attention_mask: Tensor | None
) -> Tensor:
    """transformers' own (B, 1, Sq, Sk) bool mask for the rule and padding (True = keep).

    transformers turns the 2-D mask into bool before calling a mask function (_preprocess_mask_arguments).
    """
    out = mu.sdpa_mask(
        batch_size=B,
        q_length=Sq,
        kv_length=Sk,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=fn,
        attention_mask=None if attention_mask is None else attention_mask.bool(),
        allow_is_causal_skip=False,
    )
    assert out is not None and out.dtype == torch.bool
    return out.expand(B, 1, Sq, Sk)


def ours_dense(mask: Any, Sq: int, Sk: int) -> Tensor:
    """An attnopt translation (descriptor or FULL) evaluated at every (b, 0, i, j)."""
    if mask is ao_hf.FULL:
        return torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    assert isinstance(mask, M.Mask), f"the mask function returned {type(mask).__name__}: {mask!r}"
    ctx = M.MaskContext(B, 1, Sq, Sk)
    assert mask.check(ctx) == [], f"{mask!r} is not a valid mask for {ctx}: {mask.check(ctx)}"
    tile = mask.tile(0, Sq, 0, Sk, ctx)
    assert tile.dtype == torch.bool
    return torch.broadcast_to(tile, (B, 1, Sq, Sk))


def tiling_problems(mask: Any, full: Tensor) -> list[str]:
    """Tile classification must be sound and key_range a true bound: attnopt skips tiles by them."""
    if mask is ao_hf.FULL:
        return []
    Sq, Sk = full.shape[-2:]
    ctx = M.MaskContext(B, 1, Sq, Sk)
    problems: list[str] = []
    for tq, tk in ((2, 3), (4, 4)):
        problems += classification_problems(mask, truth_per_tile(full, tq, tk), ctx, exact=False)
    for q0 in range(Sq):
        lo, hi = mask.key_range(q0, q0 + 1, ctx)
        outside = full[:, :, q0].clone()
        outside[..., lo:hi] = False
        if bool(outside.any()):
            problems.append(f"{mask!r}: query {q0} keeps keys outside key_range [{lo}, {hi})")
    return problems


def leaf_types(mask: Any) -> set[type]:
    return set() if mask is ao_hf.FULL else {type(leaf) for leaf in mask.leaves()}


def leaves_of(mask: Any, kind: type) -> list[M.Mask]:
    return [] if mask is ao_hf.FULL else [leaf for leaf in mask.leaves() if isinstance(leaf, kind)]


def describe_diff(got: Tensor, want: Tensor) -> str:
    where = (got != want).nonzero().tolist()
    return f"{len(where)} entries differ, first (b, h, i, j): {where[:6]}"


# ---------------------------------------------------------------------------------------------------------
# 1. Mask translation against transformers' own masks, no model.


@dataclass(frozen=True)
class Offsets:
    """A (q_length, kv_length, q_offset, kv_offset) transformers hands the mask function, and its padding."""

    Sq: int
    Sk: int
    q_offset: int = 0
    kv_offset: int = 0
    mask_len: int | None = None  # length of the 2-D padding mask; default kv_offset + Sk

    @property
    def aligned(self) -> bool:  # query i sits at key i + Sk - Sq: what dynamic and sliding caches produce
        return self.q_offset - self.kv_offset == self.Sk - self.Sq

    @property
    def T(self) -> int:
        return self.mask_len if self.mask_len is not None else self.kv_offset + self.Sk


OFFSETS = {
    "prefill": Offsets(7, 7),
    "prefill_long": Offsets(12, 12),
    "cached_chunk": Offsets(3, 9, 6, 0),
    "decode": Offsets(1, 9, 8, 0),
    "sliding_cache_decode": Offsets(1, 4, 10, 7),  # DynamicSlidingWindowLayer, window 4, 10 tokens seen
    "sliding_cache_chunk": Offsets(3, 6, 10, 7),
    "more_queries_than_keys": Offsets(5, 3, 0, 2),  # aligned; the first queries see no key at all
    "static_cache": Offsets(2, 12, 5, 0, mask_len=7),  # StaticLayer: Sk = max_cache_len, mask padded by HF
    "unaligned": Offsets(4, 6, 1, 0),
}


def _rows(T: int, spans: list[tuple[int, int]], holes: dict[int, list[int]] | None = None) -> Tensor:
    """(B, T) bool mask: row b is True on [start, end) of spans[b], then False at holes[b]."""
    am = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate(spans):
        am[b, max(s, 0) : max(min(e, T), 0)] = True
    for b, cols in (holes or {}).items():
        am[b, [c for c in cols if c < T]] = False
    return am


def padding_2d(kind: str, off: Offsets) -> Tensor | None:
    """The 2-D padding masks of the grid (True = real token), over all T = kv_offset + Sk tokens.

    Bool, as transformers hands them to a mask function (it converts the user's int mask first).
    """
    T, ko = off.T, off.kv_offset
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "right":
        return _rows(T, [(0, T), (0, T - 1), (0, ko + 1)])
    if kind == "left":
        return _rows(T, [(0, T), (ko + 1, T), (T - 1, T)])
    if kind == "left_int":  # an int 0/1 mask (transformers itself turns it into bool first)
        return _rows(T, [(0, T), (min(ko, 2), T), (1, T)]).long()
    if kind == "left_before_window":  # left padding that lies entirely before the kv window (if any)
        return _rows(T, [(0, T), (min(ko, 2), T), (1, T)])
    if kind == "both":
        return _rows(T, [(1, T - 1), (0, T), (ko + 2, T - 1)])
    if kind == "holes":
        return _rows(T, [(0, T), (0, T), (1, T)], holes={1: [ko + 1, ko + 3], 2: [T - 2]})
    if kind == "empty_row":
        return _rows(T, [(ko + 1, T), (0, 0), (0, T)])
    raise ValueError(kind)


PADDINGS = ["none", "ones", "right", "left", "left_before_window", "both", "holes", "empty_row"]


def _user_rule(b, h, q, kv):
    return (q + 2 * kv) % 3 != 1


# name -> (builder, recognised: must translate to structured descriptors when aligned)
RULES: dict[str, tuple[Callable[[], Callable], bool]] = {
    "causal": (lambda: mu.causal_mask_function, True),
    "bidirectional": (lambda: mu.bidirectional_mask_function, True),
    **{
        f"sliding_causal_{w}": ((lambda w=w: mu.sliding_window_causal_mask_function(w)), True)
        for w in (1, 2, 3, 5, 100)
    },
    "sliding_causal_0": (lambda: mu.sliding_window_causal_mask_function(0), False),  # keeps nothing
    "sliding_overlay_3_alone": (lambda: mu.and_masks(mu.sliding_window_overlay(3)), True),  # no causal part
    # gemma3's bidirectional mask: create_bidirectional_mask(and_mask_function=sliding_window_overlay(w))
    "bidirectional_and_overlay_3": (
        lambda: mu.and_masks(mu.bidirectional_mask_function, mu.sliding_window_overlay(3)),
        True,
    ),
    **{
        f"sliding_bidirectional_{w}": ((lambda w=w: mu.sliding_window_bidirectional_mask_function(w)), True)
        for w in (0, 1, 3)
    },
    "chunked_causal_3": (lambda: mu.chunked_causal_mask_function(3, torch.tensor([0, 2, 1])), False),
    "causal_and_user": (lambda: mu.and_masks(mu.causal_mask_function, _user_rule), False),
    "causal_or_user": (lambda: mu.or_masks(mu.causal_mask_function, _user_rule), False),
    "user_lambda": (lambda: lambda b, h, q, kv: kv <= q + 1, False),
}


def _grid_params() -> list:
    return [
        pytest.param(rule, off, id=f"{rule}-{off}")
        for rule in RULES
        for off in OFFSETS
        if not (rule == "sliding_causal_0" and off != "prefill")
    ]


@pytest.mark.parametrize(("rule", "off_name"), _grid_params())
def test_mask_translation_equals_transformers(rule, off_name):
    off = OFFSETS[off_name]
    build, recognised = RULES[rule]
    problems = []
    for use_vmap in (False, True):
        for pad in PADDINGS:
            fn = build()
            am = padding_2d(pad, off)
            where = f"{rule} {off} padding={pad} use_vmap={use_vmap}"
            got = ao_hf.mask_interface(
                batch_size=B,
                q_length=off.Sq,
                kv_length=off.Sk,
                q_offset=off.q_offset,
                kv_offset=off.kv_offset,
                mask_function=fn,
                attention_mask=am,
                use_vmap=use_vmap,
                allow_is_causal_skip=True,  # the extra keyword arguments transformers passes are ignored
                dtype=torch.float32,
                config=None,
                device="cpu",
            )
            want = hf_dense(off.Sq, off.Sk, off.q_offset, off.kv_offset, fn, am)
            dense = ours_dense(got, off.Sq, off.Sk)
            if not torch.equal(dense, want):
                problems.append(f"WRONG {where}: got {got!r}; {describe_diff(dense, want)}")
                continue
            problems += [f"{where}: {p}" for p in tiling_problems(got, want.expand(B, 1, off.Sq, off.Sk))]
            kinds = leaf_types(got)
            if recognised and off.aligned:  # structured: no rule evaluation, no N² tensor
                if M.custom in kinds:
                    problems.append(f"FALLBACK {where}: a recognised rule became {got!r}")
                for leaf in leaves_of(got, M.dense):
                    if pad != "holes" or tuple(leaf.mask.shape) != (B, 1, 1, off.Sk):
                        problems.append(f"DENSE {where}: {got!r} holds a {tuple(leaf.mask.shape)} tensor")
            if M.dense in kinds and not (use_vmap or pad == "holes"):
                problems.append(f"DENSE {where}: only use_vmap rules or holes may give a tensor, got {got!r}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:8])


def _packed_rule(position_ids: Tensor, base: Callable = mu.causal_mask_function) -> Callable:
    """The rule create_causal_mask builds when it detects packed sequences (no cache, no 2-D mask)."""
    psm = mu.find_packed_sequence_indices(position_ids)
    assert psm is not None, f"position_ids {position_ids.tolist()} are not packed"
    return mu.and_masks(
        mu.remap_positions_for_packed_sequence(base, position_ids), mu.packed_sequence_mask_function(psm)
    )


def _positions(*docs: tuple[int, int]) -> Tensor:
    """One row of position ids: documents given as (first position, length)."""
    return torch.cat([torch.arange(s, s + n) for s, n in docs])


SAME_ROWS = _positions((0, 3), (0, 4), (0, 1), (0, 4)).expand(B, -1)  # 12 tokens, 4 documents
PACKED = {
    "same_rows": (SAME_ROWS, mu.causal_mask_function, [0, 3, 7, 8, 12]),
    "same_rows_window_2": (SAME_ROWS, mu.sliding_window_causal_mask_function(2), [0, 3, 7, 8, 12]),
    "positions_not_from_0": (
        _positions((5, 3), (0, 4), (2, 2), (7, 3)).expand(B, -1),
        mu.causal_mask_function,
        [0, 3, 7, 9, 12],
    ),
    "rows_differ": (  # each row packed differently: no shared cu_seqlens, the exact fallback
        torch.stack(
            [
                _positions((0, 6), (0, 6)),
                _positions((0, 2), (0, 9), (0, 1)),
                _positions((0, 12)),
            ]
        ),
        mu.causal_mask_function,
        None,
    ),
}


@pytest.mark.parametrize("case", list(PACKED))
@pytest.mark.parametrize("pad", ["none", "right", "left", "holes"])
def test_packed_sequences_translation(case, pad):
    position_ids, base, cu = PACKED[case]
    S = position_ids.shape[1]
    fn = _packed_rule(position_ids, base)
    am = padding_2d(pad, Offsets(S, S))
    got = ao_hf.mask_interface(B, S, S, 0, 0, mask_function=fn, attention_mask=am)
    want = hf_dense(S, S, 0, 0, fn, am)
    dense = ours_dense(got, S, S)
    assert torch.equal(dense, want), f"{case} padding={pad}: {got!r}; {describe_diff(dense, want)}"
    assert not tiling_problems(got, want), tiling_problems(got, want)[:5]
    docs = leaves_of(got, M.document)
    if cu is None:
        assert not docs and leaves_of(got, M.custom), (
            f"rows packed differently must be evaluated exactly: {got!r}"
        )
        return
    assert len(docs) == 1 and docs[0]._cu_seqlens == cu and docs[0].cu_seqlens_k is None, repr(got)
    assert M.custom not in leaf_types(got), f"a shared packing must stay structured: {got!r}"
    # and no query sees a key of another document (the point of packing)
    doc = torch.searchsorted(torch.tensor(cu), torch.arange(S), right=True)
    assert not bool((dense & (doc[:, None] != doc[None, :])).any())


def _translate(rule: Callable, off: Offsets, pad: str = "none", use_vmap: bool = False) -> Any:
    am = padding_2d(pad, off)
    return ao_hf.hf_mask_to_attnopt(B, off.Sq, off.Sk, off.q_offset, off.kv_offset, rule, am, use_vmap)


def test_translation_structure():
    """The descriptors themselves: what a recognised rule + padding must become (no N² tensor)."""
    causal, pre, dec = mu.causal_mask_function, OFFSETS["prefill"], OFFSETS["decode"]

    m = _translate(causal, pre, "left")
    assert leaf_types(m) == {M.causal, M.left_padding}, repr(m)
    assert leaves_of(m, M.left_padding)[0].pad_lengths.tolist() == [0, 1, 6]
    m = _translate(causal, pre, "right")
    assert leaf_types(m) == {M.causal, M.padding}, repr(m)
    assert leaves_of(m, M.padding)[0].kv_lengths.tolist() == [7, 6, 1]
    m = _translate(causal, pre, "both")
    assert leaf_types(m) == {M.causal, M.left_padding, M.padding}, repr(m)
    m = _translate(causal, pre, "empty_row")  # a fully padded row is still left padding, not a tensor
    assert leaf_types(m) == {M.causal, M.left_padding}, repr(m)
    assert leaves_of(m, M.left_padding)[0].pad_lengths.tolist() == [1, 7, 0]
    m = _translate(causal, pre, "holes")  # holes: one (B, 1, 1, Sk) keep-row, never (Sq, Sk)
    (row,) = leaves_of(m, M.dense)
    assert tuple(row.mask.shape) == (B, 1, 1, pre.Sk) and leaf_types(m) == {M.causal, M.dense}, repr(m)
    for pad in ("none", "ones"):
        assert repr(_translate(causal, pre, pad)) == "causal()"
        assert _translate(mu.bidirectional_mask_function, pre, pad) is ao_hf.FULL
        assert _translate(causal, dec, pad) is ao_hf.FULL  # one bottom-right query sees every key

    # decoding a left-padded batch: the mask is the key padding alone, which SDPA takes as a (B,1,1,Sk) row
    m = _translate(causal, dec, "left")
    assert leaf_types(m) == {M.left_padding} and m.key_only, repr(m)
    assert _translate(mu.bidirectional_mask_function, pre, "both").key_only

    m = _translate(mu.sliding_window_causal_mask_function(4), pre)
    assert repr(m) == "sliding_window(left=3, right=0)"  # transformers keeps kv > q - 4: 3 keys back
    m = _translate(mu.sliding_window_bidirectional_mask_function(2), pre)
    assert repr(m) == "sliding_window(left=2, right=2)"
    m = _translate(mu.sliding_window_causal_mask_function(4), OFFSETS["sliding_cache_decode"], "left")
    assert leaf_types(m) == {M.sliding_window, M.left_padding}, repr(m)

    # an int 0/1 padding mask reads as bool; StaticLayer hands q_offset over as a tensor
    assert repr(_translate(causal, pre, "left_int")) == repr(_translate(causal, pre, "left_before_window"))
    st = OFFSETS["static_cache"]
    am = padding_2d("left", st)
    m = ao_hf.mask_interface(
        B, st.Sq, st.Sk, q_offset=torch.tensor(st.q_offset), mask_function=causal, attention_mask=am
    )
    assert torch.equal(ours_dense(m, st.Sq, st.Sk), hf_dense(st.Sq, st.Sk, st.q_offset, 0, causal, am))

    # a static cache's buffer (keys past the newest query not written yet): causal to the filled length
    assert leaf_types(_translate(causal, OFFSETS["static_cache"])) == {M.cache_causal}

    # what must be evaluated from the rule: unknown rules, use_vmap rules
    chunked = mu.chunked_causal_mask_function(3, torch.tensor([0, 2, 1]))
    assert leaf_types(_translate(chunked, pre)) == {M.custom}
    m = _translate(chunked, pre, use_vmap=True)
    assert leaf_types(m) == {M.dense} and tuple(m.mask.shape) == (B, 1, pre.Sq, pre.Sk), repr(m)
    assert repr(_translate(causal, pre, use_vmap=True)) == "causal()"  # recognised: no tensor even then


def test_mask_function_rejects_non_2d_padding():
    with pytest.raises(TypeError, match=r"attention_mask: expected a 2-D \(batch, keys\) padding mask"):
        ao_hf.mask_interface(B, 4, 4, attention_mask=torch.ones(B, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"expected a 2-D"):
        ao_hf.mask_interface(B, 4, 4, attention_mask=[[1, 1, 1, 1]] * B)


def test_unrecognised_vmap_rule_with_int_padding_mask():
    # Direct callers may pass the 2-D mask as 0/1 ints (transformers converts to bool first).
    am = padding_2d("left", Offsets(5, 5)).long()
    rule = mu.chunked_causal_mask_function(2, torch.zeros(B, dtype=torch.long))
    got = ao_hf.hf_mask_to_attnopt(B, 5, 5, 0, 0, rule, am, use_vmap=True)
    assert torch.equal(ours_dense(got, 5, 5), hf_dense(5, 5, 0, 0, rule, am.bool()))


def test_mask_function_defaults_to_causal():
    got = ao_hf.mask_interface(B, 5, 5, mask_function=None, attention_mask=padding_2d("left", Offsets(5, 5)))
    want = hf_dense(5, 5, 0, 0, mu.causal_mask_function, padding_2d("left", Offsets(5, 5)))
    assert torch.equal(ours_dense(got, 5, 5), want)


# ---------------------------------------------------------------------------------------------------------
# 2. register()


def test_register_is_idempotent_and_returns_the_name():
    assert ao_hf.register() == "attnopt"
    assert ao_hf.register("attnopt") == "attnopt"
    assert AttentionInterface._global_mapping["attnopt"] is ao_hf.attention_forward
    assert AttentionMaskInterface._global_mapping["attnopt"] is ao_hf.mask_interface
    name = "attnopt_test_alias"
    try:
        assert ao_hf.register(name) == name
        assert ao_hf.register(name) == name
        assert AttentionInterface._global_mapping[name] is ao_hf.attention_forward
        assert AttentionMaskInterface._global_mapping[name] is ao_hf.mask_interface
    finally:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


@pytest.mark.parametrize("name", ["sdpa", "eager", "flash_attention_2"])
def test_register_refuses_transformers_own_names(name):
    before = (AttentionInterface._global_mapping.get(name), AttentionMaskInterface._global_mapping.get(name))
    with pytest.raises(ValueError, match=rf"name='{name}' is already registered with transformers'"):
        ao_hf.register(name)
    assert (
        AttentionInterface._global_mapping.get(name),
        AttentionMaskInterface._global_mapping.get(name),
    ) == before


@pytest.mark.parametrize("name", ["", " attnopt", "attnopt ", None, 3])
def test_register_rejects_bad_names(name):
    with pytest.raises(ValueError, match=r"expected a non-empty string without surrounding spaces"):
        ao_hf.register(name)


def test_import_registers_nothing():
    code = textwrap.dedent(
        """
        import attnopt.integrations.transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        assert "attnopt" not in AttentionInterface._global_mapping, "import registered an attention function"
        assert "attnopt" not in AttentionMaskInterface._global_mapping, "import registered a mask function"
        attnopt.integrations.transformers.register()
        assert "attnopt" in AttentionInterface._global_mapping  # the check above can fail
        print("ok")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# 3. The attention function on small random problems.

Bq, HQ, HKV, SQ, SK, D = 2, 4, 2, 5, 7, 8


def _qkv(seed: int = 0, Sq: int = SQ, Sk: int = SK) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Bq, HQ, Sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(Bq, HKV, Sk, D, generator=g, dtype=torch.float64)
    v = torch.randn(Bq, HKV, Sk, D, generator=g, dtype=torch.float64)
    return q, k, v


def eager(q, k, v, keep=None, add=None, scale=None, softcap=None, sinks=None) -> tuple[Tensor, Tensor]:
    """transformers' eager attention in float64: (out (B, Sq, Hq, D), weights (B, Hq, Sq, Sk)).

    Order as in the modeling files: scale, softcap, + additive mask, (sinks column), softmax.
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if add is not None:
        s = s + add
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        col = sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1).to(s.dtype)
        p = torch.cat([s, col], -1).softmax(-1)[..., :-1]
    else:
        p = s.softmax(-1)
    return (p @ v).transpose(1, 2), p


def _module(is_causal: bool) -> Any:
    return types.SimpleNamespace(is_causal=is_causal)


def _check(got: tuple[Tensor, Tensor | None], want: tuple[Tensor, Tensor], weights: bool = False) -> None:
    out, w = got
    assert out.shape == (Bq, want[0].shape[1], HQ, D) and out.is_contiguous()
    torch.testing.assert_close(out, want[0], atol=1e-12, rtol=1e-10)
    if weights:
        assert w is not None and w.shape == want[1].shape
        torch.testing.assert_close(w, want[1], atol=1e-12, rtol=1e-10)
    else:
        assert w is None


@pytest.mark.parametrize(
    "bad",
    [torch.ones(Bq, SK, dtype=torch.bool), torch.ones(Bq, SQ, SK), "causal", 1, [[True] * SK] * Bq],
    ids=["2d_tensor", "3d_tensor", "str", "int", "list"],
)
def test_attention_forward_rejects_unknown_masks(bad):
    q, k, v = _qkv()
    with pytest.raises(
        TypeError, match=r"attention_mask: attnopt got .*expected an attnopt mask .*register\(\)"
    ):
        ao_hf.attention_forward(_module(True), q, k, v, bad)


def test_attention_forward_user_4d_bool_mask():
    q, k, v = _qkv(1)
    keep = torch.rand(Bq, 1, SQ, SK, generator=torch.Generator().manual_seed(2)) > 0.4
    keep[..., 0] = True  # every row keeps a key
    for module in (_module(True), _module(False)):  # a handed-in mask wins over module.is_causal
        _check(ao_hf.attention_forward(module, q, k, v, keep), eager(q, k, v, keep=keep))
    # per-head mask, longer than the keys (transformers slices static-cache masks to the keys)
    keep_h = torch.rand(Bq, HQ, SQ, SK + 3, generator=torch.Generator().manual_seed(3)) > 0.3
    keep_h[..., 0] = True
    got = ao_hf.attention_forward(_module(True), q, k, v, keep_h, scaling=0.3, output_attentions=True)
    _check(got, eager(q, k, v, keep=keep_h[..., :SK], scale=0.3), weights=True)
    # and the same as torch's SDPA with that bool mask
    rep = HQ // HKV
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=keep, scale=None
    )
    torch.testing.assert_close(
        ao_hf.attention_forward(_module(False), q, k, v, keep)[0], sdpa.transpose(1, 2)
    )


def test_attention_forward_user_4d_float_mask():
    q, k, v = _qkv(4)
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(Bq, 1, SQ, SK, generator=g) > 0.4
    keep[..., -1] = True
    # transformers' eager convention: 0 where kept, finfo.min where masked, plus any additive bias
    add = torch.randn(Bq, 1, SQ, SK, generator=g, dtype=torch.float64)
    add = add.masked_fill(~keep, torch.finfo(torch.float64).min)
    got = ao_hf.attention_forward(_module(True), q, k, v, add, output_attentions=True)
    _check(got, eager(q, k, v, add=add), weights=True)
    rep = HQ // HKV
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=add
    )
    torch.testing.assert_close(got[0], sdpa.transpose(1, 2))


def test_attention_forward_float_mask_with_softcap():
    q, k, v = _qkv(6)
    keep = torch.rand(Bq, 1, SQ, SK, generator=torch.Generator().manual_seed(7)) > 0.4
    keep[..., 0] = True
    add = torch.zeros(Bq, 1, SQ, SK, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
    got = ao_hf.attention_forward(_module(True), q, k, v, add, softcap=2.0)
    _check(got, eager(q, k, v, add=add, softcap=2.0))


@pytest.mark.parametrize(
    ("is_causal_module", "is_causal_kwarg", "Sq", "want_causal"),
    [
        (True, None, SQ, True),
        (False, None, SQ, False),
        (True, False, SQ, False),  # transformers' is_causal keyword overrides the module
        (False, True, SQ, True),
        (True, None, 1, False),  # one bottom-right query: no mask needed, same result
    ],
)
def test_attention_forward_none_mask_reads_is_causal(is_causal_module, is_causal_kwarg, Sq, want_causal):
    q, k, v = _qkv(8, Sq=Sq)
    keep = torch.ones(SQ, SK, dtype=torch.bool).tril(SK - SQ)[-Sq:] if want_causal else None
    got = ao_hf.attention_forward(_module(is_causal_module), q, k, v, None, is_causal=is_causal_kwarg)
    _check(got, eager(q, k, v, keep=keep))
    if Sq == 1:  # and the single query really sees every key
        _check(ao_hf.attention_forward(_module(True), q, k, v, None), eager(q, k, v))


def test_attention_forward_descriptors_softcap_and_sinks():
    q, k, v = _qkv(9)
    mask = M.causal() & M.left_padding(torch.tensor([0, 2]))  # every query keeps a key
    keep = ours_dense_b(mask, SQ, SK)
    _check(ao_hf.attention_forward(_module(False), q, k, v, mask), eager(q, k, v, keep=keep))
    _check(ao_hf.attention_forward(_module(True), q, k, v, ao_hf.FULL), eager(q, k, v))  # FULL: no causal
    s_aux = torch.tensor([0.5, -1.0, 2.0, 0.0])  # gpt-oss: one sink logit per query head
    got = ao_hf.attention_forward(
        _module(True), q, k, v, mask, scaling=0.4, softcap=3.0, s_aux=s_aux, output_attentions=True
    )
    _check(got, eager(q, k, v, keep=keep, scale=0.4, softcap=3.0, sinks=s_aux), weights=True)


def ours_dense_b(mask: M.Mask, Sq: int, Sk: int) -> Tensor:
    ctx = M.MaskContext(Bq, 1, Sq, Sk)
    return torch.broadcast_to(mask.tile(0, Sq, 0, Sk, ctx), (Bq, 1, Sq, Sk))


# ---------------------------------------------------------------------------------------------------------
# 4. Real models (design.md §5). `spy` records every call transformers makes to the two attnopt functions.


@dataclass
class Calls:
    masks: list[dict] = field(default_factory=list)
    attention: list[dict] = field(default_factory=list)

    def clear(self) -> None:
        self.masks.clear()
        self.attention.clear()


@pytest.fixture
def spy(monkeypatch) -> Calls:
    ao_hf.register()
    calls = Calls()
    attention_fn = AttentionInterface._global_mapping["attnopt"]
    mask_fn = AttentionMaskInterface._global_mapping["attnopt"]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        calls.attention.append(
            {"mask": attention_mask, "Sq": query.shape[2], "Sk": key.shape[2], "Hq": query.shape[1]}
        )
        return attention_fn(module, query, key, value, attention_mask, *args, **kwargs)

    def mask(*args, **kwargs):
        out = mask_fn(*args, **kwargs)
        calls.masks.append({"out": out, **kwargs})
        return out

    monkeypatch.setitem(AttentionInterface._global_mapping, "attnopt", attention)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "attnopt", mask)
    return calls


SENTENCES = [
    "A cat.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Exact attention needs no approximation.",
    "Padding tokens must never change the embeddings of real tokens, whatever the batch.",
]


def test_minilm_padded_batch_matches_eager(minilm, spy):
    model, tok = minilm
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool()
    lengths = real.sum(1).tolist()
    assert len(set(lengths)) == len(SENTENCES) and not bool(real.all()), lengths  # really right-padded
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(**enc, output_attentions=True)
        model.set_attn_implementation("attnopt")
        got = model(**enc, output_attentions=True)
        plain = model(**enc)
    n_layers, n_heads, S = model.config.num_hidden_layers, model.config.num_attention_heads, real.shape[1]
    # attnopt really ran, with right padding as a descriptor (no tensor, no rule evaluation)
    assert len(spy.attention) == 2 * n_layers and len(spy.masks) == 2, (len(spy.attention), len(spy.masks))
    for call in spy.attention:
        assert leaf_types(call["mask"]) == {M.padding}, repr(call["mask"])
        assert leaves_of(call["mask"], M.padding)[0].kv_lengths.tolist() == lengths

    err = (got.last_hidden_state - ref.last_hidden_state)[real].abs().max().item()
    assert err <= 1e-4, f"last_hidden_state on real tokens differs from eager by {err:.2e}"
    assert torch.equal(plain.last_hidden_state, got.last_hidden_state)  # weights do not change the output

    assert got.attentions is not None and len(got.attentions) == n_layers
    for layer, (w, w_ref) in enumerate(zip(got.attentions, ref.attentions)):
        assert w is not None and w.shape == (len(SENTENCES), n_heads, S, S), (
            layer,
            None if w is None else w.shape,
        )
        rows = real[:, None, :, None].expand_as(w)  # real query rows
        werr = (w - w_ref)[rows].abs().max().item()
        assert werr <= 1e-5, f"layer {layer}: attention weights differ from eager by {werr:.2e}"
        assert (w.sum(-1) - 1).abs().max().item() <= 1e-5, f"layer {layer}: rows do not sum to 1"
        assert not bool(w.masked_select(~real[:, None, None, :]).any()), f"layer {layer}: weight on padding"


def _generate(model, impl: str, enc, n: int) -> Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(
            **enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, top_p=None, top_k=None
        )


def test_smollm2_greedy_generation_matches_sdpa(smollm2, spy):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n, S = 24, enc["input_ids"].shape[1]
    ref = _generate(model, "sdpa", enc, n)
    assert not spy.attention
    got = _generate(model, "attnopt", enc, n)
    assert got.shape == (1, S + n), got.shape
    assert torch.equal(got, ref), f"attnopt: {tok.decode(got[0, S:])!r}\nsdpa:    {tok.decode(ref[0, S:])!r}"
    # attnopt ran every layer of the prefill (causal) and of each decode step (one query: no mask at all)
    n_layers = model.config.num_hidden_layers
    assert len(spy.attention) == n_layers * n, len(spy.attention)
    prefill, decode = spy.attention[:n_layers], spy.attention[n_layers:]
    assert all(c["Sq"] == S and repr(c["mask"]) == "causal()" for c in prefill)
    assert all(c["Sq"] == 1 and c["mask"] is ao_hf.FULL for c in decode)
    assert [c["Sk"] for c in decode[::n_layers]] == list(range(S + 1, S + n))


def _left_padded(tok) -> Any:
    prompts = ["Hi", "Write a haiku about the sea and the wind, please, in English.", "Name three colors."]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(prompts), lengths
    assert bool((enc["attention_mask"][:, -1] == 1).all()) and not bool(enc["attention_mask"][:, 0].all())
    return enc


def test_smollm2_left_padded_logits_match_sdpa(smollm2, spy):
    model, tok = smollm2
    enc = _left_padded(tok)
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(**enc).logits
        model.set_attn_implementation("attnopt")
        got = model(**enc).logits
    err = (got - ref)[real].abs().max().item()
    assert err <= 1e-4, (
        f"logits on real tokens differ from sdpa by {err:.2e} (max |logit| {ref.abs().max():.1f})"
    )
    pads = (~real).sum(1).tolist()
    assert len(spy.attention) == model.config.num_hidden_layers
    for call in spy.attention:  # causal & left padding, as descriptors
        assert leaf_types(call["mask"]) == {M.causal, M.left_padding}, repr(call["mask"])
        assert leaves_of(call["mask"], M.left_padding)[0].pad_lengths.tolist() == pads


def test_smollm2_left_padded_batched_generation_matches_sdpa(smollm2, spy):
    model, tok = smollm2
    enc = _left_padded(tok)
    n, S = 12, enc["input_ids"].shape[1]
    ref = _generate(model, "sdpa", enc, n)
    got = _generate(model, "attnopt", enc, n)
    assert torch.equal(got, ref), "\n".join(
        f"attnopt: {tok.decode(a[S:])!r}\nsdpa:    {tok.decode(r[S:])!r}" for a, r in zip(got, ref)
    )
    decode = [c for c in spy.attention if c["Sq"] == 1]
    assert len(decode) == model.config.num_hidden_layers * (n - 1)
    pads = (enc["attention_mask"] == 0).sum(1).tolist()
    for call in decode:  # decoding a left-padded batch: the key padding alone, key-only
        assert leaf_types(call["mask"]) == {M.left_padding} and call["mask"].key_only, repr(call["mask"])
        assert call["mask"].pad_lengths.tolist() == pads


def test_smollm2_packed_batch_equals_separate_runs(smollm2, spy):
    model, tok = smollm2
    texts = ["The cat sat on the mat.", "Paris is the capital of France, and Berlin is", "One two three four"]
    seqs = [tok(t, return_tensors="pt")["input_ids"][0] for t in texts]
    lens = [len(s) for s in seqs]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
    model.set_attn_implementation("attnopt")
    body = model.model  # LlamaModel: hidden states; model.lm_head turns them into logits
    with torch.no_grad():
        packed = body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
        calls = list(spy.attention)
        alone = torch.cat([body(input_ids=s[None], use_cache=False).last_hidden_state[0] for s in seqs])
        # control: with a 2-D mask transformers does not detect packing, so documents see each other
        leaky = body(
            input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False
        ).last_hidden_state[0]
        logits_err = (model.lm_head(packed) - model.lm_head(alone)).abs().max().item()
    # fp32, |h| up to ~34, different matmul shapes: 4.3e-5 seen (sdpa: the same; eager: 3.9e-5)
    err = (packed - alone).abs().max().item()
    assert err <= 1e-4, f"packed hidden states differ from separate runs by {err:.2e}"
    # logits (|logit| ~32): 8.6e-5 seen, and eager's own packed-vs-separate difference is 1.1e-4
    assert logits_err <= 2e-4, f"packed logits differ from separate runs by {logits_err:.2e}"
    assert (leaky - alone)[lens[0] :].abs().max().item() > 1.0  # the comparison can fail
    # the mask function produced a document mask: no query attends across documents
    assert len(calls) == model.config.num_hidden_layers
    for call in calls:
        m = call["mask"]
        assert leaf_types(m) == {M.causal, M.document}, repr(m)
        assert leaves_of(m, M.document)[0]._cu_seqlens == cu, (repr(m), cu)
    S = cu[-1]
    keep = ours_dense(calls[0]["mask"], S, S)[0, 0]
    doc = torch.searchsorted(torch.tensor(cu), torch.arange(S), right=True)
    assert torch.equal(keep, (doc[:, None] == doc[None, :]) & torch.ones(S, S, dtype=torch.bool).tril())
