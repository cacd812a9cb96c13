"""Input validation: every bad input fails early, clearly, and with the right exception type.

The contract (design.md §2, style.md §4): a bad argument raises TypeError (wrong type or dtype) or
ValueError (wrong value or shape) *before any compute*; the message names the argument and the value
received, then prints the q/k/v shapes/dtypes/devices and a HINT line. A backend pinned with
``backend="name"`` that cannot run the inputs raises NotImplementedError listing its reasons;
``backend="auto"`` never raises for a valid input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import attnopt as ao
from attnopt import _dispatch
from attnopt import masks as M
from attnopt import mods as Mods

B, HQ, HKV, SQ, SK, D = 2, 4, 2, 5, 7, 8


def qkv(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Tiny valid inputs: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, D)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, SQ, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, SK, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, SK, D, generator=g, dtype=dtype)
    return q, k, v


def desc(t: object) -> str:
    """How validate() prints one of q/k/v: '(2, 4, 5, 8) float32 cpu', or the type name."""
    if isinstance(t, Tensor):
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {t.device}"
    return type(t).__name__


class ComputeStarted(Exception):
    """Raised by the patched backends: a test reached compute when it should have failed earlier."""


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every backend's forward() raise, so an error raised "late" cannot pass for an early one."""

    def boom(inputs: object) -> None:
        raise ComputeStarted("a backend's forward() ran; validation should have failed first")

    for backend in _dispatch.PRIORITY:
        monkeypatch.setattr(backend, "forward", boom)


def assert_reports_inputs(exc: BaseException, q: object, k: object, v: object) -> None:
    """validate() appends the q/k/v description and a HINT line to every message."""
    msg = str(exc)
    shapes = f"\n  q {desc(q)}, k {desc(k)}, v {desc(v)}\nHINT: "
    assert shapes in msg, f"message lacks the q/k/v line {shapes!r}:\n{msg}"
    assert msg.rstrip().split("HINT: ", 1)[1].strip(), f"empty HINT:\n{msg}"


# --------------------------------------------------------------------------------------------------
# Errors raised by attention()/explain(), i.e. by validate(): one table, two entry points.
# Each case builds the call's arguments (q, k, v, kwargs) from the valid tiny inputs.

Args = tuple[object, object, object, dict[str, Any]]


def case(**kw: Any) -> Callable[[], Args]:
    """The valid tiny inputs with some of q/k/v/kwargs replaced (a callable: q/k/v are rebuilt per test)."""

    def build() -> Args:
        q, k, v = qkv()
        args = {"q": q, "k": k, "v": v}
        kwargs = {}
        for name, value in kw.items():
            value = value(q, k, v) if callable(value) and name in ("q", "k", "v") else value
            (args if name in args else kwargs)[name] = value
        return args["q"], args["k"], args["v"], kwargs

    return build


def meta(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _probe_fails(b, h, i, j):
    raise RuntimeError("user bug")


def _float_mask(b, h, i, j):
    return (j <= i).float()


def _int_score(score, b, h, i, j):
    return b


def _score_fails(score, b, h, i, j):
    raise KeyError("user bug")


VALIDATE_ERRORS = [
    # ---- q, k, v themselves
    pytest.param(
        case(q=lambda q, k, v: q.tolist()), TypeError, r"q must be a torch\.Tensor, got list", id="q-list"
    ),
    pytest.param(case(k=None), TypeError, r"k must be a torch\.Tensor, got NoneType", id="k-None"),
    pytest.param(case(q=lambda q, k, v: q[0]), ValueError, r"q\.ndim=3; expected 4", id="q-3d"),
    pytest.param(case(v=lambda q, k, v: v[None]), ValueError, r"v\.ndim=5; expected 4", id="v-5d"),
    pytest.param(
        case(q=lambda q, k, v: q.long()),
        TypeError,
        r"q\.dtype=torch\.int64; expected a floating dtype",
        id="q-int64",
    ),
    pytest.param(
        case(k=lambda q, k, v: k.bool()), TypeError, r"k\.dtype=torch\.bool; expected a floating", id="k-bool"
    ),
    pytest.param(
        case(k=lambda q, k, v: k.double()),
        TypeError,
        r"mixed dtypes q=torch\.float32, k=torch\.float64, v=torch\.float32",
        id="mixed-dtypes-q_fp32-k_fp64",
    ),
    pytest.param(
        case(k=lambda q, k, v: meta(k.shape)),
        ValueError,
        r"mixed devices q=cpu, k=meta, v=cpu",
        id="mixed-devices-k_meta",
    ),
    pytest.param(
        case(k=lambda q, k, v: torch.randn(3, HKV, SK, D), v=lambda q, k, v: torch.randn(3, HKV, SK, D)),
        ValueError,
        r"batch sizes differ: q 2, k 3, v 3",
        id="batch-mismatch",
    ),
    pytest.param(
        case(v=lambda q, k, v: torch.randn(B, 1, SK, D)),
        ValueError,
        r"k has 2 heads but v has 1",
        id="kv-heads-mismatch",
    ),
    pytest.param(
        case(
            q=lambda q, k, v: torch.randn(B, 6, SQ, D),
            k=lambda q, k, v: torch.randn(B, 4, SK, D),
            v=lambda q, k, v: torch.randn(B, 4, SK, D),
        ),
        ValueError,
        r"Hq=6 is not a multiple of Hkv=4",
        id="gqa-Hq6-Hkv4",
    ),
    pytest.param(
        case(v=lambda q, k, v: v[:, :, :-1]),
        ValueError,
        r"k has Sk=7 keys but v has 6 values",
        id="kv-length-mismatch",
    ),
    pytest.param(
        case(k=lambda q, k, v: k[..., :4]),
        ValueError,
        r"head dims differ: q D=8, k D=4",
        id="qk-headdim-mismatch",
    ),
    # Empty batch / head / sequence dims are valid (tests/test_edges.py); a head dim of 0 is not.
    pytest.param(
        case(q=lambda q, k, v: q[..., :0], k=lambda q, k, v: k[..., :0]),
        ValueError,
        r"q has head dim 0, shape \(2, 4, 5, 0\)",
        id="q-headdim-0",
    ),
    pytest.param(
        case(v=lambda q, k, v: v[..., :0]),
        ValueError,
        r"v has head dim 0, shape \(2, 2, 7, 0\)",
        id="v-headdim-0",
    ),
    pytest.param(
        case(k=lambda q, k, v: k[:, :0], v=lambda q, k, v: v[:, :0]),
        ValueError,
        r"k and v have no heads \(Hkv=0\) but q has Hq=4",
        id="k-no-heads",
    ),
    pytest.param(
        case(q=lambda q, k, v: q.to(torch.float8_e4m3fn)),
        TypeError,
        r"q\.dtype=torch\.float8_e4m3fn is not supported; allowed: float16, bfloat16, float32, float64",
        id="q-float8",
    ),
    # ---- scalar options
    pytest.param(case(dropout_p=1.0), ValueError, r"dropout_p=1\.0 is outside \[0, 1\)", id="dropout-1.0"),
    pytest.param(case(dropout_p=-0.1), ValueError, r"dropout_p=-0\.1 is outside \[0, 1\)", id="dropout-neg"),
    pytest.param(case(dropout_p=math.nan), ValueError, r"dropout_p=nan is outside", id="dropout-nan"),
    pytest.param(case(dropout_p=True), TypeError, r"dropout_p must be a float, got bool", id="dropout-bool"),
    pytest.param(case(dropout_p="0.1"), TypeError, r"dropout_p must be a float, got str", id="dropout-str"),
    pytest.param(
        case(backend="flash9"),
        ValueError,
        r"backend='flash9' is unknown; allowed: 'auto', .*'reference'",
        id="backend-flash9",
    ),
    pytest.param(case(backend=None), ValueError, r"backend=None is unknown", id="backend-None"),
    pytest.param(
        case(similarity="manhattan"),
        ValueError,
        r"similarity='manhattan' is unknown; allowed: \('dot', 'cosine', 'euclidean'\)",
        id="similarity-unknown",
    ),
    pytest.param(case(return_lse=1), TypeError, r"return_lse must be a bool, got int", id="return_lse-int"),
    pytest.param(case(scale=0), ValueError, r"scale=0 must be finite and > 0", id="scale-0"),
    pytest.param(case(scale=-1), ValueError, r"scale=-1 must be finite and > 0", id="scale-neg"),
    pytest.param(case(scale=math.inf), ValueError, r"scale=inf must be finite", id="scale-inf"),
    pytest.param(case(scale=math.nan), ValueError, r"scale=nan must be finite", id="scale-nan"),
    pytest.param(case(scale="0.5"), TypeError, r"scale must be a number or None, got str", id="scale-str"),
    pytest.param(case(scale=True), TypeError, r"scale must be a number or None, got bool", id="scale-bool"),
    pytest.param(
        case(scale=torch.tensor(0.5)),
        TypeError,
        r"scale must be a number or None, got Tensor",
        id="scale-tensor",
    ),
    # ---- masks
    pytest.param(
        case(mask=torch.ones(SQ, SK + 1, dtype=torch.bool)),
        ValueError,
        r"mask: dense mask shape \(5, 8\) does not broadcast to \(B, Hq, Sq, Sk\)=\(2, 4, 5, 7\)",
        id="mask-bool_tensor-wrong_shape",
    ),
    pytest.param(
        case(mask=M.dense(torch.ones(1, B, HQ, SQ, SK, dtype=torch.bool))),
        ValueError,
        r"dense mask shape \(1, 2, 4, 5, 7\) does not broadcast",
        id="mask-dense-5d",
    ),
    pytest.param(
        case(mask=torch.zeros(SQ, SK)),
        TypeError,
        r"(?s)mask is a torch\.float32 tensor; a tensor mask must be torch\.bool.*mods\.bias",
        id="mask-float_tensor-points_to_bias",
    ),
    pytest.param(
        case(mask=M.dense(meta((SQ, SK), torch.bool))),
        ValueError,
        r"dense mask is on meta but q is on cpu",
        id="mask-dense-meta_device",
    ),
    pytest.param(
        case(mask=3), TypeError, r"mask must be an attnopt\.masks descriptor, got int", id="mask-int"
    ),
    pytest.param(
        case(mask="causal"), TypeError, r"mask must be an attnopt\.masks descriptor, got str", id="mask-str"
    ),
    pytest.param(
        case(mask=[M.causal()]),
        TypeError,
        r"mask must be an attnopt\.masks descriptor, got list",
        id="mask-list",
    ),
    pytest.param(
        case(mask=M.padding(torch.tensor([-1, 3]))),
        ValueError,
        r"padding kv_lengths=\[-1, 3\] must lie in \[0, Sk=7\]",
        id="padding-negative",
    ),
    pytest.param(
        case(mask=M.padding(torch.tensor([3, 8]))),
        ValueError,
        r"padding kv_lengths=\[3, 8\] must lie in \[0, Sk=7\]",
        id="padding-over_Sk",
    ),
    pytest.param(
        case(mask=M.padding(torch.tensor([3, 3, 3]))),
        ValueError,
        r"padding kv_lengths has 3 entries; expected one per batch element \(B=2\)",
        id="padding-wrong_batch",
    ),
    pytest.param(
        case(mask=M.document(torch.tensor([0, 2, 5]))),
        ValueError,
        r"document cu_seqlens ends at 5; it must end at the sequence length \(Sq=5, Sk=7",
        id="document-Sq_ne_Sk_without_cu_seqlens_k",
    ),
    pytest.param(
        case(mask=M.document(torch.tensor([0, 2, 4]), torch.tensor([0, 3, 7]))),
        ValueError,
        r"document cu_seqlens ends at 4; it must end at Sq=5",
        id="document-not_ending_at_Sq",
    ),
    pytest.param(
        case(mask=M.document(torch.tensor([0, 2, 5]), torch.tensor([0, 3, 6]))),
        ValueError,
        r"document cu_seqlens_k ends at 6; it must end at Sk=7",
        id="document-not_ending_at_Sk",
    ),
    pytest.param(
        case(mask=M.causal() & M.padding(torch.tensor([1, 2, 3]))),
        ValueError,
        r"padding kv_lengths has 3 entries",
        id="mask-composed-bad_leaf",
    ),
    pytest.param(
        case(mask=_float_mask),
        ValueError,
        r"custom mask fn .*_float_mask.* must return a bool tensor, got torch\.float32",
        id="mask-custom-returns_float",
    ),
    pytest.param(
        case(mask=M.custom(_probe_fails)),
        ValueError,
        r"custom mask fn .*_probe_fails.* failed on a probe element: RuntimeError: user bug",
        id="mask-custom-raises",
    ),
    # ---- score modifiers
    pytest.param(
        case(score_mod=Mods.bias(torch.zeros(SQ, 3))),
        ValueError,
        r"score_mod: bias shape \(5, 3\) does not broadcast to \(B, Hq, Sq, Sk\)=\(2, 4, 5, 7\)",
        id="bias-no_broadcast",
    ),
    pytest.param(
        case(score_mod=Mods.bias(meta((SQ, SK)))),
        ValueError,
        r"bias is on meta but q is on cpu",
        id="bias-meta_device",
    ),
    pytest.param(
        case(score_mod=Mods.alibi(Mods.alibi_slopes(HKV))),
        ValueError,
        r"alibi slopes shape \(2,\); expected \(Hq,\)=\(4,\)",
        id="alibi-slopes_len_Hkv",
    ),
    pytest.param(
        case(score_mod=[Mods.softcap(5.0), 3]),
        TypeError,
        r"score_mod entries must be attnopt\.mods modifiers, got int",
        id="score_mod-list_with_int",
    ),
    pytest.param(
        case(score_mod="softcap"),
        TypeError,
        r"score_mod entries must be attnopt\.mods modifiers, got str",
        id="score_mod-str",
    ),
    pytest.param(
        case(score_mod=M.causal()),
        TypeError,
        r"score_mod entry causal\(\) is not a score modifier instance",
        id="score_mod-is_a_mask",
    ),
    pytest.param(
        case(score_mod=_int_score),
        ValueError,
        r"custom score_mod fn .*_int_score.* must return a floating-point tensor, got torch\.int64",
        id="score_mod-custom-returns_int",
    ),
    pytest.param(
        case(score_mod=[Mods.softcap(5.0), _score_fails]),
        ValueError,
        r"custom score_mod fn .*_score_fails.* failed on a probe element: KeyError: 'user bug'",
        id="score_mod-custom-raises",
    ),
    # ---- sinks
    pytest.param(
        case(sinks=torch.zeros(HKV)),
        ValueError,
        r"sinks shape \(2,\); expected \(Hq,\)=\(4,\)",
        id="sinks-shape_Hkv",
    ),
    pytest.param(
        case(sinks=torch.zeros(1, HQ)),
        ValueError,
        r"sinks shape \(1, 4\); expected \(Hq,\)=\(4,\)",
        id="sinks-shape_2d",
    ),
    pytest.param(
        case(sinks=torch.zeros(HQ, dtype=torch.long)),
        TypeError,
        r"sinks must be a floating tensor of shape \(Hq,\), got torch\.int64",
        id="sinks-int64",
    ),
    pytest.param(
        case(sinks=[0.0] * HQ),
        TypeError,
        r"sinks must be a floating tensor of shape \(Hq,\), got list",
        id="sinks-list",
    ),
    pytest.param(case(sinks=meta((HQ,))), ValueError, r"sinks are on meta but q is on cpu", id="sinks-meta"),
    # ---- common slips get a pointed message
    pytest.param(
        case(mask=M.causal),
        TypeError,
        r"mask=causal is the class, not a mask(.|\n)*HINT: call it: mask=attnopt\.masks\.causal\(",
        id="mask-causal_class_not_instance",
    ),
    pytest.param(
        case(mask=Mods.softcap(5.0)),
        TypeError,
        r"score_mod",
        id="mask-is_a_score_mod",
    ),
]


@pytest.mark.parametrize("entry", [ao.attention, ao.explain], ids=["attention", "explain"])
@pytest.mark.parametrize(("build", "exc", "pattern"), VALIDATE_ERRORS)
def test_bad_input_is_rejected_with_a_clear_message(no_compute, entry, build, exc, pattern):
    q, k, v, kwargs = build()
    with pytest.raises(exc, match=pattern) as info:
        entry(q, k, v, **kwargs)
    assert type(info.value) is exc  # not a subclass standing in for the other kind
    assert_reports_inputs(info.value, q, k, v)


# --------------------------------------------------------------------------------------------------
# Descriptor constructors check their own arguments (no q/k/v exists yet).

CONSTRUCTION_ERRORS = [
    pytest.param(
        lambda: M.sliding_window(-1), ValueError, r"sliding_window left=-1 is negative", id="window-left_neg"
    ),
    pytest.param(
        lambda: M.sliding_window(4, -2),
        ValueError,
        r"sliding_window right=-2 is negative",
        id="window-right_neg",
    ),
    pytest.param(
        lambda: M.sliding_window(2.5),
        TypeError,
        r"sliding_window left must be an int >= 0, got float 2\.5",
        id="window-left_float",
    ),
    pytest.param(
        lambda: M.sliding_window(4, 1.0),
        TypeError,
        r"sliding_window right must be an int >= 0, got float 1\.0",
        id="window-right_float",
    ),
    pytest.param(
        lambda: M.sliding_window("4"),
        TypeError,
        r"sliding_window left must be an int .*got str '4'",
        id="window-str",
    ),
    pytest.param(
        lambda: M.sliding_window(True), TypeError, r"sliding_window left .*got bool True", id="window-bool"
    ),
    pytest.param(
        lambda: M.prefix_lm(-1), ValueError, r"prefix_lm prefix_len=-1 is negative", id="prefix_lm-neg"
    ),
    pytest.param(
        lambda: M.causal(align="bottom"), ValueError, r"align='bottom' is not allowed", id="causal-bad_align"
    ),
    pytest.param(
        lambda: M.padding(torch.tensor([3.0, 7.0])),
        TypeError,
        r"padding kv_lengths must hold integers, got dtype torch\.float32",
        id="padding-float",
    ),
    pytest.param(
        lambda: M.padding(torch.tensor([[3, 7]])),
        ValueError,
        r"padding kv_lengths must be 1-D, got shape \(1, 2\)",
        id="padding-2d",
    ),
    pytest.param(
        lambda: M.document(torch.tensor([1, 3, 5])),
        ValueError,
        r"document cu_seqlens=\[1, 3, 5\] must start at 0",
        id="document-not_starting_at_0",
    ),
    pytest.param(
        lambda: M.document(torch.tensor([0, 3, 2, 5])),
        ValueError,
        r"document cu_seqlens=\[0, 3, 2, 5\] must be non-decreasing",
        id="document-decreasing",
    ),
    pytest.param(
        lambda: M.document(torch.tensor([0, 2, 5]), torch.tensor([0, 7])),
        ValueError,
        r"cu_seqlens \(2 documents\) and cu_seqlens_k \(1 documents\) must describe the same number",
        id="document-cu_seqlens_k_other_count",
    ),
    pytest.param(
        lambda: M.document(torch.tensor([0, 2, 5]), torch.tensor([2, 7])),
        ValueError,
        r"document cu_seqlens_k=\[2, 7\] must start at 0",
        id="document-cu_seqlens_k_not_starting_at_0",
    ),
    pytest.param(
        lambda: M.document(torch.tensor([0.0, 5.0])),
        TypeError,
        r"document cu_seqlens must hold integers, got dtype torch\.float32",
        id="document-float",
    ),
    pytest.param(
        lambda: M.dense(torch.zeros(SQ, SK)),
        TypeError,
        r"dense mask dtype=torch\.float32; it must be torch\.bool",
        id="dense-float",
    ),
    pytest.param(
        lambda: Mods.bias(torch.zeros(SQ, SK, dtype=torch.long)),
        TypeError,
        r"bias dtype=torch\.int64; it must be floating point",
        id="bias-int64",
    ),
    pytest.param(
        lambda: M.document(None),
        TypeError,
        r"cu_seqlens",
        id="document-None",
    ),
    pytest.param(
        lambda: M.custom(3),
        TypeError,
        r"custom mask needs a callable fn\(b, h, i, j\), got int",
        id="mask-custom-int",
    ),
    pytest.param(
        lambda: M.causal() & 3, TypeError, r"cannot combine a mask with int using &", id="mask-and-int"
    ),
    pytest.param(
        lambda: M.causal() | "window", TypeError, r"cannot combine a mask with str using \|", id="mask-or-str"
    ),
    pytest.param(
        lambda: M.causal() & Mods.softcap(5.0),
        TypeError,
        r"cannot combine a mask with softcap using &",
        id="mask-and-score_mod",
    ),
    pytest.param(
        lambda: Mods.softcap(0), ValueError, r"softcap cap=0; allowed: a finite number > 0", id="softcap-0"
    ),
    pytest.param(lambda: Mods.softcap(-1.0), ValueError, r"softcap cap=-1\.0; allowed", id="softcap-neg"),
    pytest.param(lambda: Mods.softcap(math.inf), ValueError, r"softcap cap=inf; allowed", id="softcap-inf"),
    pytest.param(lambda: Mods.softcap(math.nan), ValueError, r"softcap cap=nan; allowed", id="softcap-nan"),
    pytest.param(
        lambda: Mods.softcap("30"),
        TypeError,
        r"softcap cap must be a positive number, got str",
        id="softcap-str",
    ),
    pytest.param(
        lambda: Mods.alibi(torch.ones(HQ, dtype=torch.long)),
        TypeError,
        r"alibi slopes must be a floating-point tensor of shape \(Hq,\), got torch\.int64",
        id="alibi-int64",
    ),
    pytest.param(
        lambda: Mods.alibi([0.5] * HQ),
        TypeError,
        r"alibi slopes must be a floating-point .*got list",
        id="alibi-list",
    ),
    pytest.param(
        lambda: Mods.alibi_slopes(0), ValueError, r"num_heads=0; allowed: an int >= 1", id="alibi_slopes-0"
    ),
    pytest.param(
        lambda: Mods.bias([0.0]), TypeError, r"bias must be a torch\.Tensor, got list", id="bias-list"
    ),
    pytest.param(
        lambda: Mods.custom(3),
        TypeError,
        r"custom score_mod needs a callable fn\(score, b, h, i, j\), got int",
        id="score_mod-custom-int",
    ),
]


@pytest.mark.parametrize(("make", "exc", "pattern"), CONSTRUCTION_ERRORS)
def test_bad_descriptor_is_rejected_at_construction(make, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        make()
    assert type(info.value) is exc


# --------------------------------------------------------------------------------------------------
# "Before any compute": errors found late in validate() still fire before the full-size work.


# Validation probes a custom function on a grid of at most 2 x 2 x 3 x 3 elements (first/middle/last
# positions, to catch functions that are not elementwise); compute evaluates whole tiles (here 2x4x5x7).
PROBE_MAX = 36


class Spy:
    """A custom score_mod / mask_mod that counts calls on more than one (i, j) element.

    validate() probes custom functions on a single (i, j) element; anything bigger is real compute.
    """

    def __init__(self) -> None:
        self.big_calls = 0

    def score_mod(self, score: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        self.big_calls += score.numel() > PROBE_MAX
        return score

    def mask_mod(self, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        self.big_calls += b.numel() * h.numel() * i.numel() * j.numel() > PROBE_MAX
        return j >= 0


LATE_ERRORS = [
    pytest.param({"sinks": torch.zeros(HQ + 1)}, ValueError, r"sinks shape \(5,\)", id="sinks-shape"),
    pytest.param(
        {"sinks": torch.zeros(HQ, dtype=torch.int32)}, TypeError, r"sinks must be a floating", id="sinks-int"
    ),
    pytest.param(
        {"mask_and": M.padding(torch.tensor([3, 9]))},
        ValueError,
        r"kv_lengths=\[3, 9\]",
        id="padding-over_Sk",
    ),
    pytest.param(
        {"mod_then": Mods.bias(torch.zeros(SQ, 2))}, ValueError, r"bias shape \(5, 2\)", id="bias-shape"
    ),
    pytest.param(
        {"mod_then": Mods.alibi(torch.ones(HQ - 1))}, ValueError, r"alibi slopes shape \(3,\)", id="alibi-len"
    ),
]


@pytest.mark.parametrize(("bad", "exc", "pattern"), LATE_ERRORS)
def test_late_errors_raise_before_any_compute(bad, exc, pattern):
    q, k, v = qkv()
    bad = dict(bad)  # the parametrized dict is shared; do not pop from it
    spy = Spy()
    mask: M.Mask = M.custom(spy.mask_mod)
    if "mask_and" in bad:
        mask = mask & bad.pop("mask_and")
    mods: list[object] = [spy.score_mod]
    if "mod_then" in bad:
        mods.append(bad.pop("mod_then"))
    with pytest.raises(exc, match=pattern):
        ao.attention(q, k, v, mask=mask, score_mod=mods, **bad)
    assert spy.big_calls == 0


def test_spy_does_see_compute_when_the_inputs_are_valid():
    # The counterpart of the test above: the spies do count real compute.
    q, k, v = qkv()
    spy = Spy()
    ao.attention(q, k, v, mask=M.custom(spy.mask_mod), score_mod=spy.score_mod, sinks=torch.zeros(HQ))
    assert spy.big_calls > 0


# Known bugs: a custom function's output *shape* is never checked, so the error surfaces mid-compute as a
# RuntimeError from deep inside torch (here: the patched forward() is reached).


def _mask_wrong_shape(b, h, i, j):
    return torch.ones(3, 3, dtype=torch.bool)


def _score_wrong_shape(score, b, h, i, j):
    return torch.zeros(3)


def test_custom_mask_of_wrong_shape_is_rejected_before_compute(no_compute):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask"):
        ao.attention(q, k, v, mask=_mask_wrong_shape)


def test_custom_score_mod_of_wrong_shape_is_rejected_before_compute(no_compute):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"score_mod"):
        ao.attention(q, k, v, score_mod=_score_wrong_shape)


def test_unsupported_device_is_an_input_error_not_an_assertion():
    q, k, v = (t.to("meta") for t in qkv())
    try:
        out = ao.attention(q, k, v)
    except ValueError as e:
        assert "meta" in str(e)
    else:
        assert out.shape == (B, HQ, SQ, D)


# --------------------------------------------------------------------------------------------------
# Pinned backends refuse with NotImplementedError and their reasons; "auto" always runs.

SDPA_REFUSALS = [
    pytest.param({"sinks": torch.zeros(HQ)}, r"sinks are not supported", id="sinks"),
    pytest.param({"return_lse": True}, r"return_lse=True is not supported", id="return_lse"),
    pytest.param(
        {"similarity": "euclidean"},
        r"similarity='euclidean' is not one of \['cosine', 'dot'\]",
        id="euclidean",
    ),
    pytest.param(
        {"score_mod": Mods.softcap(30.0)},
        r"score_mod=\[softcap\(cap=30\.0\)\]: SDPA takes at most one additive bias tensor",
        id="softcap",
    ),
    pytest.param(
        {"score_mod": [Mods.bias(torch.zeros(SK)), Mods.bias(torch.zeros(SK))]},
        r"SDPA takes at most one additive bias tensor",
        id="two_biases",
    ),
]


@pytest.mark.parametrize(("kwargs", "reason"), SDPA_REFUSALS)
def test_pinned_sdpa_refuses_with_its_reason(no_compute, kwargs, reason):
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match=reason) as info:
        ao.attention(q, k, v, backend="sdpa", mask=M.causal(), **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, ao.NoBackendError)
    assert "backend='sdpa' cannot run these inputs" in msg
    assert f"q {desc(q)}, k {desc(k)}, v {desc(v)}" in msg
    assert "HINT: use backend='auto'" in msg


def test_pinned_sdpa_lists_every_reason_at_once(no_compute):
    q, k, v = qkv()
    with pytest.raises(NotImplementedError) as info:
        ao.attention(
            q,
            k,
            v,
            backend="sdpa",
            sinks=torch.zeros(HQ),
            return_lse=True,
            similarity="euclidean",
            score_mod=Mods.softcap(30.0),
        )
    reasons = re.findall(r"^  - (.+)$", str(info.value), flags=re.MULTILINE)
    assert len(reasons) == 4, str(info.value)
    for text in ("sinks", "return_lse", "euclidean", "softcap"):
        assert any(text in r for r in reasons), (text, reasons)


def _custom_score(score, b, h, i, j):
    return score + 0.1 * (h - 1)


def _custom_mask(b, h, i, j):
    return (i + j) % 3 != 0


_G = torch.Generator().manual_seed(1)
EVERYTHING = {
    "mask": M.causal() & M.padding(torch.tensor([6, 7])) & M.custom(_custom_mask),
    "score_mod": [
        Mods.alibi(Mods.alibi_slopes(HQ)),
        Mods.bias(torch.randn(SQ, SK, generator=_G)),
        _custom_score,
        Mods.softcap(5.0),
    ],
    "similarity": "euclidean",
    "scale": 0.3,
    "sinks": torch.zeros(HQ),
    "dropout_p": 0.1,
    "return_lse": True,
}
VALID_VARIANTS = [
    pytest.param({"mask": M.causal()}, id="causal"),
    pytest.param({"sinks": torch.zeros(HQ)}, id="sinks"),
    pytest.param({"return_lse": True}, id="return_lse"),
    pytest.param({"similarity": "euclidean"}, id="euclidean"),
    pytest.param({"similarity": "cosine", "mask": M.sliding_window(2, 1)}, id="cosine-window"),
    pytest.param({"score_mod": Mods.softcap(30.0)}, id="softcap"),
    pytest.param({"score_mod": _custom_score, "mask": _custom_mask}, id="custom_fns"),
    pytest.param({"mask": M.document(torch.tensor([0, 2, 5]), torch.tensor([0, 3, 7]))}, id="document"),
    pytest.param({"mask": torch.rand(B, 1, SQ, SK, generator=_G) > 0.3}, id="bool_tensor"),
    pytest.param(EVERYTHING, id="everything"),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kwargs", VALID_VARIANTS)
def test_valid_input_always_runs(backend, kwargs):
    q, k, v = qkv()
    res = ao.attention(q, k, v, backend=backend, **kwargs)
    out, lse = res if kwargs.get("return_lse") else (res, None)
    assert out.shape == (B, HQ, SQ, D) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    if lse is not None:
        assert lse.shape == (B, HQ, SQ) and lse.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# explain()


def test_explain_plain_causal_runs_on_sdpa():
    q, k, v = qkv()
    text = ao.explain(q, k, v, mask=M.causal("top_left"))  # SDPA's own is_causal alignment
    assert isinstance(text, str)
    assert "-> runs on 'sdpa'" in text
    assert re.search(r"^  sdpa\s+chosen: ", text, flags=re.MULTILINE), text
    assert re.search(r"^  reference\s+could run, lower priority", text, flags=re.MULTILINE), text


def test_explain_with_sinks_runs_span_and_says_why_not_sdpa():
    q, k, v = qkv()
    text = ao.explain(q, k, v, mask=M.causal(), sinks=torch.zeros(HQ))
    assert "-> runs on 'span'" in text
    assert re.search(r"^  sdpa\s+cannot run: sinks are not supported", text, flags=re.MULTILINE), text


def test_explain_a_refusing_pinned_backend_reports_instead_of_raising():
    q, k, v = qkv()
    text = ao.explain(q, k, v, backend="sdpa", return_lse=True, similarity="euclidean")
    assert "-> backend='sdpa' is pinned and cannot run these inputs" in text
    assert "return_lse=True is not supported" in text
    assert "similarity='euclidean' is not one of" in text
    assert re.search(r"^  reference\s+could run, not pinned", text, flags=re.MULTILINE), text


def test_explain_unknown_keyword_is_a_type_error_naming_it():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"explain\(\) got an unexpected keyword argument 'maskk'"):
        ao.explain(q, k, v, maskk=M.causal())
