"""Attention masks as small structured descriptors (never N×N tensors unless the user hands one in).

A mask answers "may query i attend to key j?" for batch b and query head h. Indices are raw:
``i`` in ``[0, Sq)``, ``j`` in ``[0, Sk)``. Positional masks use the *aligned* query position
``p = i + Sk - Sq`` (bottom-right, FlashAttention >= 2.1; what KV-cache decoding needs) unless built
with ``align="top_left"`` (``p = i``).

Every descriptor can
  * ``keep(b, h, i, j, ctx)``: evaluate on broadcastable int64 index tensors -> bool tensor,
  * ``classify(q0, q1, k0, k1, ctx)``: say whether the tile ``[q0, q1) x [k0, k1)`` is EMPTY, FULL or
    PARTIAL for every batch element and head, without materializing anything,
  * ``tile(q0, q1, k0, k1, ctx)``: the boolean tile, shape broadcastable to (B, Hq, q1-q0, k1-k0).
Masks compose with ``&`` and ``|``.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ._elementwise import elementwise_call, probe_elementwise

Align = Literal["bottom_right", "top_left"]
# Floating dtypes attention computes in; float8 and complex tensors are rejected with a clear error.
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_ALIGNS = ("bottom_right", "top_left")

__all__ = [
    "And",
    "Mask",
    "MaskContext",
    "Or",
    "Tile",
    "cache_causal",
    "causal",
    "custom",
    "dense",
    "document",
    "document_causal",
    "left_padding",
    "padding",
    "prefix_lm",
    "sliding_window",
    "tile_indices",
]


class Tile(enum.Enum):
    """How much of a (queries x keys) tile a mask keeps."""

    EMPTY = "empty"  # nothing: skip the tile
    FULL = "full"  # everything: no mask evaluation needed
    PARTIAL = "partial"  # some: evaluate the boolean tile


@dataclass(frozen=True)
class MaskContext:
    """The problem size a mask or score modifier is evaluated in."""

    B: int
    Hq: int
    Sq: int
    Sk: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def offset(self, align: str) -> int:
        """Aligned position of query i is ``i + offset``."""
        return self.Sk - self.Sq if align == "bottom_right" else 0


def tile_indices(ctx: MaskContext, q0: int, q1: int, k0: int, k1: int) -> tuple[Tensor, ...]:
    """Broadcastable int64 indices b (B,1,1,1), h (1,Hq,1,1), i (1,1,q,1), j (1,1,1,k) of a tile."""
    kw = {"device": ctx.device, "dtype": torch.long}
    b = torch.arange(ctx.B, **kw).view(-1, 1, 1, 1)
    h = torch.arange(ctx.Hq, **kw).view(1, -1, 1, 1)
    i = torch.arange(q0, q1, **kw).view(1, 1, -1, 1)
    j = torch.arange(k0, k1, **kw).view(1, 1, 1, -1)
    return b, h, i, j


def as_4d(t: Tensor) -> Tensor:
    """View a tensor broadcastable to (B, Hq, Sq, Sk) with exactly 4 dims (leading 1s)."""
    return t.reshape((1,) * (4 - t.ndim) + tuple(t.shape))


def gather_tile(t: Tensor, ctx: MaskContext, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Entries [b, h, i, j] of t broadcast to (B, Hq, Sq, Sk) (a view plus one gather, no full copy)."""
    return as_4d(t).expand(ctx.B, ctx.Hq, ctx.Sq, ctx.Sk)[b, h, i, j]


def broadcast_problems(what: str, t: Tensor, ctx: MaskContext) -> list[str]:
    """Why a user tensor cannot stand for a (B, Hq, Sq, Sk) one (device, shape); empty if it can."""
    if t.device != ctx.device:
        return [f"{what} is on {t.device} but q is on {ctx.device}"]
    target = (ctx.B, ctx.Hq, ctx.Sq, ctx.Sk)
    if t.ndim > 4 or any(s not in (1, n) for s, n in zip(reversed(t.shape), reversed(target))):
        return [f"{what} shape {tuple(t.shape)} does not broadcast to (B, Hq, Sq, Sk)={target}"]
    return []


def _clip(lo: int, hi: int, ctx: MaskContext) -> tuple[int, int]:
    lo, hi = max(lo, 0), min(hi, ctx.Sk)
    return (lo, hi) if lo < hi else (0, 0)


def _short_repr(obj: object, *names: str) -> str:
    """``name(a=1, b=2)``, leaving out an ``align`` that is the default."""
    parts = [f"{n}={getattr(obj, n)!r}" for n in names]
    if getattr(obj, "align", "bottom_right") != "bottom_right":
        parts.append(f"align={obj.align!r}")  # type: ignore[attr-defined]
    return f"{type(obj).__name__}({', '.join(parts)})"


def _check_align(align: str) -> None:
    if align not in _ALIGNS:
        raise ValueError(f"align={align!r} is not allowed; use one of {_ALIGNS}")


def _nonneg_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name}={value} is negative; allowed: an int >= 0")
    if value >= 2**62:
        raise ValueError(f"{name}={value} is too large; allowed: an int below 2**62 (positions are int64)")
    return value


def _int_tensor(name: str, value: Tensor | Sequence[int]) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(list(value))
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(torch.long)


def _cu_tensor(label: str, value: object) -> Tensor:
    """A cu_seqlens argument (tensor or list of ints) as a 1-D int64 tensor."""
    if not isinstance(value, (Tensor, list, tuple)):
        raise TypeError(
            f"{label} must be a 1-D int tensor or a list of ints, got {type(value).__name__} {value!r}"
        )
    return _int_tensor(label, value)


def _cu_lists(mask: str, named: Sequence[tuple[str, Tensor]]) -> list[list[int]]:
    """cu_seqlens tensors as checked Python lists: each starts at 0 and never decreases, and all
    describe the same number of documents (one host read each)."""
    out = []
    for name, t in named:
        if t.device.type == "meta":
            raise ValueError(
                f"{mask} {name} is on meta: it holds no values (pass it on q's device or the CPU)"
            )
        lst = t.tolist()
        if not lst or lst[0] != 0:
            raise ValueError(f"{mask} {name}={lst} must start at 0")
        if any(b < a for a, b in itertools.pairwise(lst)):
            raise ValueError(f"{mask} {name}={lst} must be non-decreasing")
        out.append(lst)
    (n0, l0), (n1, l1) = (named[0][0], out[0]), (named[-1][0], out[-1])
    if len(l1) != len(l0):
        raise ValueError(
            f"{mask} {n0} ({len(l0) - 1} documents) and {n1} ({len(l1) - 1} documents) must describe the "
            f"same number of documents"
        )
    return out


class Mask:
    """Base of all mask descriptors."""

    translation_invariant: bool = False  # keep() depends on (i - j) alone (given Sq, Sk): tiles repeat
    key_only: bool = False  # keep() ignores h and i: one (B, 1, 1, Sk) row stands for the whole mask
    # A mask stands for a (B, Hq, Sq, Sk) bool tensor. transformers' mask preprocessing reads ``.ndim`` of
    # a mask that generate() built ahead of time and hands back (compileable caches); 4 lets it through.
    ndim: int = 4

    def keep(self, b: Tensor, h: Tensor, i: Tensor, j: Tensor, ctx: MaskContext) -> Tensor:
        raise NotImplementedError

    def classify(self, q0: int, q1: int, k0: int, k1: int, ctx: MaskContext) -> Tile:
        """Generic fallback: evaluate the tile (used by dense and custom masks)."""
        t = self.tile(q0, q1, k0, k1, ctx)
        if bool(t.all()):
            return Tile.FULL
        return Tile.PARTIAL if bool(t.any()) else Tile.EMPTY

    def tile(self, q0: int, q1: int, k0: int, k1: int, ctx: MaskContext) -> Tensor:
        return self.keep(*tile_indices(ctx, q0, q1, k0, k1), ctx)

    def key_range(self, q0: int, q1: int, ctx: MaskContext) -> tuple[int, int]:
        """Keys [lo, hi) outside which queries [q0, q1) keep nothing (a bound; may be loose)."""
        return 0, ctx.Sk

    def full_key_range(self, ctx: MaskContext) -> tuple[int, int]:
        """Keys [a, b) that every query of every batch element keeps (a bound; may be empty)."""
        return 0, 0

    def check(self, ctx: MaskContext) -> list[str]:
        """Shape-dependent problems for this problem size (empty list = fine)."""
        return []

    def leaves(self) -> list[Mask]:
        return [self]

    def __and__(self, other: Mask) -> Mask:
        return And(self, _as_mask(other, "&"))

    def __or__(self, other: Mask) -> Mask:
        return Or(self, _as_mask(other, "|"))


def _as_mask(other: object, op: str) -> Mask:
    if not isinstance(other, Mask):
        raise TypeError(
            f"cannot combine a mask with {type(other).__name__} using {op}; both sides must be masks"
        )
    return other


@dataclass(frozen=True, eq=False)
class And(Mask):
    """Keep (i, j) where both masks keep it."""

    a: Mask
    b: Mask

    @property
    def translation_invariant(self) -> bool:  # type: ignore[override]
        return self.a.translation_invariant and self.b.translation_invariant

    @property
    def key_only(self) -> bool:  # type: ignore[override]
        return self.a.key_only and self.b.key_only

    def keep(self, b, h, i, j, ctx):
        return self.a.keep(b, h, i, j, ctx) & self.b.keep(b, h, i, j, ctx)

    def classify(self, q0, q1, k0, k1, ctx):
        ca = self.a.classify(q0, q1, k0, k1, ctx)
        if ca is Tile.EMPTY:
            return Tile.EMPTY
        cb = self.b.classify(q0, q1, k0, k1, ctx)
        if cb is Tile.EMPTY:
            return Tile.EMPTY
        return Tile.FULL if ca is cb is Tile.FULL else Tile.PARTIAL

    def key_range(self, q0, q1, ctx):
        (a0, a1), (b0, b1) = self.a.key_range(q0, q1, ctx), self.b.key_range(q0, q1, ctx)
        lo, hi = max(a0, b0), min(a1, b1)
        return (lo, hi) if lo < hi else (0, 0)

    def full_key_range(self, ctx):
        (a0, a1), (b0, b1) = self.a.full_key_range(ctx), self.b.full_key_range(ctx)
        lo, hi = max(a0, b0), min(a1, b1)
        return (lo, hi) if lo < hi else (0, 0)

    def check(self, ctx):
        return self.a.check(ctx) + self.b.check(ctx)

    def leaves(self):
        return self.a.leaves() + self.b.leaves()

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


@dataclass(frozen=True, eq=False)
class Or(Mask):
    """Keep (i, j) where either mask keeps it."""

    a: Mask
    b: Mask

    @property
    def translation_invariant(self) -> bool:  # type: ignore[override]
        return self.a.translation_invariant and self.b.translation_invariant

    @property
    def key_only(self) -> bool:  # type: ignore[override]
        return self.a.key_only and self.b.key_only

    def keep(self, b, h, i, j, ctx):
        return self.a.keep(b, h, i, j, ctx) | self.b.keep(b, h, i, j, ctx)

    def classify(self, q0, q1, k0, k1, ctx):
        ca = self.a.classify(q0, q1, k0, k1, ctx)
        if ca is Tile.FULL:
            return Tile.FULL
        cb = self.b.classify(q0, q1, k0, k1, ctx)
        if cb is Tile.FULL:
            return Tile.FULL
        return Tile.EMPTY if ca is cb is Tile.EMPTY else Tile.PARTIAL

    def key_range(self, q0, q1, ctx):
        ranges = [r for r in (self.a.key_range(q0, q1, ctx), self.b.key_range(q0, q1, ctx)) if r[0] < r[1]]
        return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0, 0)

    def full_key_range(self, ctx):
        (a0, a1), (b0, b1) = self.a.full_key_range(ctx), self.b.full_key_range(ctx)
        if a0 < a1 and b0 < b1 and max(a0, b0) <= min(a1, b1):  # overlapping or touching: their union
            return min(a0, b0), max(a1, b1)
        return max((a0, a1), (b0, b1), key=lambda r: r[1] - r[0])

    def check(self, ctx):
        return self.a.check(ctx) + self.b.check(ctx)

    def leaves(self):
        return self.a.leaves() + self.b.leaves()

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"


@dataclass(frozen=True)
class causal(Mask):
    """Causal mask (Vaswani et al. 2017): keep j <= p, p the aligned query position."""

    translation_invariant = True

    align: Align = "bottom_right"

    def __post_init__(self):
        _check_align(self.align)

    def keep(self, b, h, i, j, ctx):
        return j <= i + ctx.offset(self.align)

    def classify(self, q0, q1, k0, k1, ctx):
        off = ctx.offset(self.align)
        if k1 - 1 <= q0 + off:
            return Tile.FULL
        return Tile.EMPTY if k0 > q1 - 1 + off else Tile.PARTIAL

    def key_range(self, q0, q1, ctx):
        return _clip(0, q1 + ctx.offset(self.align), ctx)

    def __repr__(self) -> str:
        return _short_repr(self)


@dataclass(frozen=True)
class sliding_window(Mask):
    """Local attention (Beltagy et al. 2020, Mistral): keep p - left <= j <= p + right."""

    translation_invariant = True

    left: int
    right: int = 0
    align: Align = "bottom_right"

    def __post_init__(self):
        _nonneg_int("sliding_window left", self.left)
        _nonneg_int("sliding_window right", self.right)
        _check_align(self.align)

    def keep(self, b, h, i, j, ctx):
        p = i + ctx.offset(self.align)
        return (j >= p - self.left) & (j <= p + self.right)

    def classify(self, q0, q1, k0, k1, ctx):
        off = ctx.offset(self.align)
        lo_first, hi_first = q0 + off - self.left, q0 + off + self.right  # band of the first query
        lo_last, hi_last = q1 - 1 + off - self.left, q1 - 1 + off + self.right  # band of the last query
        if k0 >= lo_last and k1 - 1 <= hi_first:
            return Tile.FULL
        if k1 - 1 < lo_first or k0 > hi_last:
            return Tile.EMPTY
        return Tile.PARTIAL

    def key_range(self, q0, q1, ctx):
        off = ctx.offset(self.align)
        return _clip(q0 + off - self.left, q1 + off + self.right, ctx)

    def __repr__(self) -> str:
        return _short_repr(self, "left", "right")


@dataclass(frozen=True)
class prefix_lm(Mask):
    """Prefix-LM (Raffel et al. 2020, T5): keep j < prefix_len (bidirectional prefix) or j <= p."""

    prefix_len: int
    align: Align = "bottom_right"

    def __post_init__(self):
        _nonneg_int("prefix_lm prefix_len", self.prefix_len)
        _check_align(self.align)

    def keep(self, b, h, i, j, ctx):
        return (j < self.prefix_len) | (j <= i + ctx.offset(self.align))

    def classify(self, q0, q1, k0, k1, ctx):
        off = ctx.offset(self.align)
        if k1 - 1 < self.prefix_len or k1 - 1 <= q0 + off:
            return Tile.FULL
        if k0 >= self.prefix_len and k0 > q1 - 1 + off:
            return Tile.EMPTY
        return Tile.PARTIAL

    def key_range(self, q0, q1, ctx):
        return _clip(0, max(self.prefix_len, q1 + ctx.offset(self.align)), ctx)

    def __repr__(self) -> str:
        return _short_repr(self, "prefix_len")


def _set_lengths(mask: Mask, attr: str, label: str) -> None:
    """Store a (B,) int tensor field; its min/max (Python ints) are read once, when first needed."""
    object.__setattr__(mask, attr, _int_tensor(label, getattr(mask, attr)))


class _Lengths(Mask):
    """Per-batch lengths: the tensor's min and max as Python ints, read once (one host sync) when a
    classification first needs them, not at construction (so masks can be built inside torch.compile)."""

    _lengths_field: str

    def _bounds(self) -> tuple[int, int]:
        cached = self.__dict__.get("_bounds_cache")
        if cached is None:
            t = getattr(self, self._lengths_field)
            known = t.numel() > 0 and t.device.type != "meta"
            cached = (int(t.min()), int(t.max())) if known else (0, 2**62 if t.numel() else 0)
            object.__setattr__(self, "_bounds_cache", cached)
        return cached

    @property
    def _min(self) -> int:
        return self._bounds()[0]

    @property
    def _max(self) -> int:
        return self._bounds()[1]


def _length_problems(mask: Mask, attr: str, label: str, ctx: MaskContext) -> list[str]:
    t = getattr(mask, attr)
    if t.device.type == "meta" and ctx.device.type != "meta":
        return [f"{label} are on meta: they hold no values (pass them on q's device {ctx.device} or the CPU)"]
    if t.numel() != ctx.B:
        return [f"{label} has {t.numel()} entries; expected one per batch element (B={ctx.B})"]
    lo, hi = mask._min, mask._max  # type: ignore[attr-defined]
    if t.device.type != "meta" and (lo < 0 or hi > ctx.Sk):
        return [f"{label}={t.tolist()} must lie in [0, Sk={ctx.Sk}] (min {lo}, max {hi})"]
    return []


@dataclass(frozen=True, eq=False)
class padding(_Lengths):
    """Key padding: keep j < kv_lengths[b] (kv_lengths: (B,) ints, 0 <= length <= Sk)."""

    kv_lengths: Tensor
    key_only = True
    _lengths_field = "kv_lengths"

    def __post_init__(self):
        _set_lengths(self, "kv_lengths", "padding kv_lengths")

    def keep(self, b, h, i, j, ctx):
        return j < self.kv_lengths.to(j.device)[b]

    def classify(self, q0, q1, k0, k1, ctx):
        if k1 - 1 < self._min:
            return Tile.FULL
        return Tile.EMPTY if k0 >= self._max else Tile.PARTIAL

    def key_range(self, q0, q1, ctx):
        return _clip(0, self._max, ctx)

    def full_key_range(self, ctx):
        return _clip(0, self._min, ctx)

    def check(self, ctx):
        return _length_problems(self, "kv_lengths", "padding kv_lengths", ctx)

    def __repr__(self) -> str:
        return f"padding(kv_lengths={self.kv_lengths.tolist()})"


@dataclass(frozen=True, eq=False)
class left_padding(_Lengths):
    """Left padding (batched generation): keep j >= pad_lengths[b] (pad_lengths: (B,) ints in [0, Sk])."""

    pad_lengths: Tensor
    key_only = True
    _lengths_field = "pad_lengths"

    def __post_init__(self):
        _set_lengths(self, "pad_lengths", "left_padding pad_lengths")

    def keep(self, b, h, i, j, ctx):
        return j >= self.pad_lengths.to(j.device)[b]

    def classify(self, q0, q1, k0, k1, ctx):
        if k0 >= self._max:
            return Tile.FULL
        return Tile.EMPTY if k1 <= self._min else Tile.PARTIAL

    def key_range(self, q0, q1, ctx):
        return _clip(self._min, ctx.Sk, ctx)

    def full_key_range(self, ctx):
        return _clip(self._max, ctx.Sk, ctx)

    def check(self, ctx):
        return _length_problems(self, "pad_lengths", "left_padding pad_lengths", ctx)

    def __repr__(self) -> str:
        return f"left_padding(pad_lengths={self.pad_lengths.tolist()})"


@dataclass(frozen=True, eq=False)
class cache_causal(_Lengths):
    """Causal attention over a right-padded KV cache, aligned to each sequence's own length.

    FlashAttention ``flash_attn_with_kvcache(cache_seqlens=kv_lengths)``: query i of batch element b sits
    at position ``p = kv_lengths[b] - Sq + i`` and keeps keys ``j <= p`` (so never ``j >= kv_lengths[b]``);
    with ``left`` (an int >= 0) also ``j >= p - left`` (FlashAttention ``window_size=(left, 0)``). Rows
    with ``p < 0`` (a sequence shorter than the query chunk) keep nothing: their output is 0.

    Not the same as ``causal() & padding(kv_lengths)``: that aligns every query to the *padded* length
    Sk (``p = Sk - Sq + i``), so with Sq > 1 a shorter sequence's new tokens see the wrong keys (for
    Sq = 1 the two agree). kv_lengths: (B,) ints in [0, Sk], tensor or list (read once, lazily).
    """

    kv_lengths: Tensor
    left: int | None = None
    _lengths_field = "kv_lengths"

    def __post_init__(self):
        if not isinstance(self.kv_lengths, (Tensor, list, tuple)):
            raise TypeError(
                f"cache_causal kv_lengths must be a (B,) int tensor or a list of ints, "
                f"got {type(self.kv_lengths).__name__} {self.kv_lengths!r}"
            )
        _set_lengths(self, "kv_lengths", "cache_causal kv_lengths")
        if self.left is not None:
            _nonneg_int("cache_causal left", self.left)

    def _sorted(self) -> list[int] | None:
        """The lengths sorted, as Python ints (one host sync, on first use); None on meta (no values)."""
        cached = self.__dict__.get("_sorted_cache", False)
        if cached is False:
            t = self.kv_lengths
            cached = None if t.device.type == "meta" else sorted(t.tolist())
            object.__setattr__(self, "_sorted_cache", cached)
        return cached

    def _bounds(self) -> tuple[int, int]:  # min/max from the one sorted read
        s = self._sorted()
        if s is None:
            return 0, 2**62 if self.kv_lengths.numel() else 0
        return (s[0], s[-1]) if s else (0, 0)

    def keep(self, b, h, i, j, ctx):
        p = self.kv_lengths.to(j.device)[b] - ctx.Sq + i  # each sequence's own aligned position
        out = j <= p
        return out if self.left is None else out & (j >= p - self.left)

    def classify(self, q0, q1, k0, k1, ctx):
        s = self._sorted()
        if s is None:
            return Tile.PARTIAL
        if not s:
            return Tile.EMPTY
        # Batch element b (offset o = L_b - Sq) keeps the whole tile iff k1-1 <= q0 + o (and, with a
        # window, k0 >= q1-1 + o - left): the shortest and the longest sequence decide.
        sq, lo, hi = ctx.Sq, s[0], s[-1]
        if k1 - 1 <= q0 + lo - sq and (self.left is None or k0 >= q1 - 1 + hi - sq - self.left):
            return Tile.FULL
        # Its rows keep [q0 + o - left, q1 - 1 + o] together: some key of the tile iff o lies in
        # [k0 - q1 + 1, k1 - 1 - q0 + left]. EMPTY iff no length falls in that range.
        need = k0 - q1 + 1 + sq
        at = bisect.bisect_left(s, need)
        if at == len(s):
            return Tile.EMPTY
        if self.left is not None and s[at] > k1 - 1 - q0 + self.left + sq:
            return Tile.EMPTY
        return Tile.PARTIAL

    def key_range(self, q0, q1, ctx):
        s = self._sorted()
        if s is None:
            return 0, ctx.Sk
        # Sequences that keep anything in these rows: L >= Sq + 1 - q1 (the last row has p >= 0).
        at = bisect.bisect_left(s, ctx.Sq + 1 - q1)
        if at == len(s):
            return 0, 0
        lo = 0 if self.left is None else q0 + s[at] - ctx.Sq - self.left
        return _clip(lo, q1 + s[-1] - ctx.Sq, ctx)

    def full_key_range(self, ctx):
        s = self._sorted()
        if not s:
            return 0, 0
        # Every row of every sequence: j <= min_L - Sq (row 0), j >= max_L - 1 - left (the last row).
        lo = 0 if self.left is None else s[-1] - 1 - self.left
        return _clip(lo, s[0] - ctx.Sq + 1, ctx)

    def check(self, ctx):
        return _length_problems(self, "kv_lengths", "cache_causal kv_lengths", ctx)

    def __repr__(self) -> str:
        extra = "" if self.left is None else f", left={self.left}"
        return f"cache_causal(kv_lengths={self.kv_lengths.tolist()}{extra})"


@dataclass(frozen=True, eq=False)
class document(Mask):
    """Packed documents (FlashAttention varlen): keep i, j in the same document.

    ``cu_seqlens`` = [0, len_0, len_0+len_1, ..., S] (shared by every batch element) applies to queries
    and keys; pass ``cu_seqlens_k`` for a different key packing (then document d of the queries attends
    to document d of the keys).
    """

    cu_seqlens: Tensor
    cu_seqlens_k: Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "cu_seqlens", _cu_tensor("document cu_seqlens", self.cu_seqlens))
        if self.cu_seqlens_k is not None:
            object.__setattr__(self, "cu_seqlens_k", _cu_tensor("document cu_seqlens_k", self.cu_seqlens_k))
        if not torch.compiler.is_compiling():  # while tracing, the values are checked when the op runs
            self._lists()

    def _lists(self) -> tuple[list[int], list[int]]:
        """cu_seqlens and cu_seqlens_k as Python lists (read once, checked), for tile classification."""
        cached = self.__dict__.get("_lists_cache")
        if cached is None:
            named = [("cu_seqlens", self.cu_seqlens)]
            if self.cu_seqlens_k is not None:
                named.append(("cu_seqlens_k", self.cu_seqlens_k))
            lists = _cu_lists("document", named)
            cached = (lists[0], lists[-1])
            object.__setattr__(self, "_lists_cache", cached)
        return cached

    @property
    def _cu_seqlens(self) -> list[int]:
        return self._lists()[0]

    @property
    def _cu_k(self) -> list[int]:
        return self._lists()[1]

    def keep(self, b, h, i, j, ctx):
        # Document of position x: the d with cu[d] <= x < cu[d + 1] (empty documents are never chosen).
        cu_k = self.cu_seqlens if self.cu_seqlens_k is None else self.cu_seqlens_k
        dq = torch.searchsorted(self.cu_seqlens.to(i.device), i, right=True)
        dk = torch.searchsorted(cu_k.to(j.device), j, right=True)
        return dq == dk

    def classify(self, q0, q1, k0, k1, ctx):
        cq, ck = self._cu_seqlens, self._cu_k
        dq0, dq1 = bisect.bisect_right(cq, q0) - 1, bisect.bisect_right(cq, q1 - 1) - 1
        dk0, dk1 = bisect.bisect_right(ck, k0) - 1, bisect.bisect_right(ck, k1 - 1) - 1
        if dq0 == dq1 == dk0 == dk1:
            return Tile.FULL
        # A shared document must have rows inside the tile on both sides (documents can be empty).
        for d in range(max(dq0, dk0), min(dq1, dk1) + 1):
            if max(cq[d], q0) < min(cq[d + 1], q1) and max(ck[d], k0) < min(ck[d + 1], k1):
                return Tile.PARTIAL
        return Tile.EMPTY

    def key_range(self, q0, q1, ctx):
        cq, ck = self._cu_seqlens, self._cu_k
        d0, d1 = bisect.bisect_right(cq, q0) - 1, bisect.bisect_right(cq, q1 - 1) - 1
        return _clip(ck[max(d0, 0)], ck[min(d1 + 1, len(ck) - 1)], ctx)

    def check(self, ctx):
        problems = []
        if self.cu_seqlens_k is None:
            if not (self._cu_seqlens[-1] == ctx.Sq == ctx.Sk):
                problems.append(
                    f"document cu_seqlens ends at {self._cu_seqlens[-1]}; it must end at the sequence "
                    f"length (Sq={ctx.Sq}, Sk={ctx.Sk}; pass cu_seqlens_k when they differ)"
                )
        else:
            if self._cu_seqlens[-1] != ctx.Sq:
                problems.append(
                    f"document cu_seqlens ends at {self._cu_seqlens[-1]}; it must end at Sq={ctx.Sq}"
                )
            if self._cu_k[-1] != ctx.Sk:
                problems.append(f"document cu_seqlens_k ends at {self._cu_k[-1]}; it must end at Sk={ctx.Sk}")
        return problems

    def __repr__(self) -> str:
        extra = "" if self.cu_seqlens_k is None else f", cu_seqlens_k={self._cu_k}"
        return f"document(cu_seqlens={self._cu_seqlens}{extra})"


@dataclass(frozen=True, eq=False)
class document_causal(Mask):
    """Packed chunks (chunked prefill): causal bottom-right *within* each document.

    FlashAttention varlen with ``causal=True`` / xformers ``BlockDiagonalCausalFromBottomRight``.
    Document d holds queries ``[cu_seqlens_q[d], cu_seqlens_q[d+1])`` and keys ``[cu_seqlens_k[d],
    cu_seqlens_k[d+1])``; its query i sits at local position ``(i - cu_q[d]) + (len_k[d] - len_q[d])``
    and keeps key j iff j is in document d and ``j - cu_k[d] <=`` that position. Queries of a document
    with more queries than keys that sit at a negative position keep nothing (output 0).

    Not the same as ``document(cu_q, cu_k) & causal()``: that aligns on the whole packed row
    (``j <= i + Sk - Sq``), not on each document's own lengths. Both lists: [0, ..., Sq] and
    [0, ..., Sk], non-decreasing, one entry more than there are documents (tensors or lists).
    """

    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor

    def __post_init__(self):
        for name in ("cu_seqlens_q", "cu_seqlens_k"):
            object.__setattr__(self, name, _cu_tensor(f"document_causal {name}", getattr(self, name)))
        if not torch.compiler.is_compiling():  # while tracing, the values are checked when the op runs
            self._lists()

    def _lists(self) -> tuple[list[int], list[int], list[int]]:
        """cu_seqlens_q, cu_seqlens_k as Python lists (read once, checked) and the documents with both
        queries and keys (sorted), for O(log documents) tile classification."""
        cached = self.__dict__.get("_lists_cache")
        if cached is None:
            named = [("cu_seqlens_q", self.cu_seqlens_q), ("cu_seqlens_k", self.cu_seqlens_k)]
            cq, ck = _cu_lists("document_causal", named)
            live = [d for d in range(len(cq) - 1) if cq[d + 1] > cq[d] and ck[d + 1] > ck[d]]
            cached = (cq, ck, live)
            object.__setattr__(self, "_lists_cache", cached)
        return cached

    def _span(self, d: int, q0: int, q1: int) -> tuple[int, int] | None:
        """First and last key that the rows [q0, q1) of document d keep together (None if none)."""
        cq, ck, _ = self._lists()
        a, b = max(q0, cq[d]), min(q1, cq[d + 1])
        if a >= b:
            return None
        last = b - 1 + ck[d + 1] - cq[d + 1]  # row i keeps [cu_k[d], i + end_k - end_q]
        return (ck[d], last) if ck[d] <= last else None

    def _live_between(self, a: int, b: int, reverse: bool = False) -> int | None:
        """The first (last, if reverse) document in [a, b) with both queries and keys, or None."""
        live = self._lists()[2]
        if reverse:
            at = bisect.bisect_left(live, b) - 1
            return live[at] if at >= 0 and live[at] >= a else None
        at = bisect.bisect_left(live, a)
        return live[at] if at < len(live) and live[at] < b else None

    def keep(self, b, h, i, j, ctx):
        cq, ck = self.cu_seqlens_q.to(i.device), self.cu_seqlens_k.to(j.device)
        # Document of query i: the last d with cu_q[d] <= i (so never an empty one).
        d = (torch.searchsorted(cq, i, right=True) - 1).clamp(0, cq.numel() - 2)
        return (j >= ck[d]) & (j <= i + ck[d + 1] - cq[d + 1])

    def classify(self, q0, q1, k0, k1, ctx):
        cq, ck, _ = self._lists()
        d0, d1 = bisect.bisect_right(cq, q0) - 1, bisect.bisect_right(cq, q1 - 1) - 1
        # FULL needs one document (key ranges of documents are disjoint) and every row keeping every key.
        if d0 == d1 and k0 >= ck[d0] and k1 - 1 <= q0 + ck[d0 + 1] - cq[d0 + 1]:
            return Tile.FULL
        e0, e1 = bisect.bisect_right(ck, k0) - 1, bisect.bisect_right(ck, k1 - 1) - 1
        lo, hi = max(d0, e0), min(d1, e1)  # documents with rows and keys in the tile
        for d in {lo, hi} if lo <= hi else ():  # the two edge documents: part of them may be outside
            span = self._span(d, q0, q1)
            if span is not None and max(span[0], k0) <= min(span[1], k1 - 1):
                return Tile.PARTIAL
        # Documents strictly between lie wholly inside the tile: they keep something iff non-empty.
        return Tile.PARTIAL if self._live_between(lo + 1, hi) is not None else Tile.EMPTY

    def key_range(self, q0, q1, ctx):
        cq = self._lists()[0]
        d0, d1 = bisect.bisect_right(cq, q0) - 1, bisect.bisect_right(cq, q1 - 1) - 1
        first = self._span(d0, q0, q1)
        if first is None:
            d = self._live_between(d0 + 1, d1)
            first = self._span(d, q0, q1) if d is not None else self._span(d1, q0, q1)
        if first is None:
            return 0, 0
        last = self._span(d1, q0, q1)
        if last is None:
            d = self._live_between(d0 + 1, d1, reverse=True)
            last = self._span(d if d is not None else d0, q0, q1)
        assert last is not None
        return _clip(first[0], last[1] + 1, ctx)

    def full_key_range(self, ctx):
        cq, ck, _ = self._lists()
        if ctx.Sq == 0 or cq[-1] != ctx.Sq:
            return 0, 0
        d = bisect.bisect_right(cq, 0) - 1
        if cq[d + 1] != ctx.Sq:  # several documents of queries: their keys are disjoint
            return 0, 0
        return _clip(ck[d], ck[d + 1] - ctx.Sq + 1, ctx)  # row 0 keeps [cu_k[d], end_k - Sq]

    def check(self, ctx):
        cq, ck, _ = self._lists()
        problems = []
        if cq[-1] != ctx.Sq:
            problems.append(f"document_causal cu_seqlens_q ends at {cq[-1]}; it must end at Sq={ctx.Sq}")
        if ck[-1] != ctx.Sk:
            problems.append(f"document_causal cu_seqlens_k ends at {ck[-1]}; it must end at Sk={ctx.Sk}")
        return problems

    def __repr__(self) -> str:
        cq, ck, _ = self._lists()
        return f"document_causal(cu_seqlens_q={cq}, cu_seqlens_k={ck})"


@dataclass(frozen=True, eq=False)
class dense(Mask):
    """A user-supplied bool tensor broadcastable to (B, Hq, Sq, Sk); True = keep (SDPA convention)."""

    mask: Tensor

    def __post_init__(self):
        m = self.mask
        if not isinstance(m, Tensor):
            raise TypeError(f"dense mask must be a torch.Tensor, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise TypeError(
                f"dense mask dtype={m.dtype}; it must be torch.bool (True = keep; for additive float scores "
                f"use attnopt.mods.bias)"
            )

    def keep(self, b, h, i, j, ctx):
        return gather_tile(self.mask, ctx, b, h, i, j)

    def classify(self, q0, q1, k0, k1, ctx):
        """From the tensor as given: broadcast dims repeat values, which changes neither all() nor any()."""
        t = as_4d(self.mask)
        t = t[:, :, q0:q1] if t.shape[2] != 1 else t
        t = t[:, :, :, k0:k1] if t.shape[3] != 1 else t
        if t.numel() == 0 or q1 <= q0 or k1 <= k0:
            return super().classify(q0, q1, k0, k1, ctx)
        if bool(t.all()):
            return Tile.FULL
        return Tile.PARTIAL if bool(t.any()) else Tile.EMPTY

    def check(self, ctx):
        return broadcast_problems("dense mask", self.mask, ctx)

    def __repr__(self) -> str:
        return f"dense(shape={tuple(self.mask.shape)})"


@dataclass(frozen=True, eq=False)
class custom(Mask):
    """Any rule ``fn(b, h, i, j) -> bool tensor`` (FlexAttention ``mask_mod`` signature, raw indices).

    Evaluated on whole tiles of broadcast index tensors when it is elementwise, through torch.vmap (one
    element at a time, as FlexAttention does) when it is not; validation probes which one holds.
    """

    fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"custom mask needs a callable fn(b, h, i, j), got {type(self.fn).__name__}")
        object.__setattr__(self, "_probed", {})  # MaskContext -> (problem, vmapped)

    def keep(self, b, h, i, j, ctx):
        out = elementwise_call(self.fn, (b, h, i, j), self._vmapped)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            got = out.dtype if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"custom mask fn {self.fn!r} must return a bool tensor, got {got}")
        return out

    @property
    def _vmapped(self) -> bool:
        return any(v for _, v in self._probed.values())

    def check(self, ctx):
        if ctx.B * ctx.Hq * ctx.Sq * ctx.Sk == 0:
            return []  # nothing is evaluated for an empty problem
        if ctx not in self._probed:
            self._probed[ctx] = probe_elementwise(self.fn, f"custom mask fn {self.fn!r}", ctx, score=False)
        problem = self._probed[ctx][0]
        return [problem] if problem else []

    def __repr__(self) -> str:
        return f"custom({getattr(self.fn, '__name__', repr(self.fn))})"
