"""Cache layers (transformers ``CacheLayerMixin``) that never copy old keys and values per step.

transformers' ``DynamicLayer`` concatenates the whole cache with each new token (62–158 ms per layer per
step at a 16K context on the 2-core CPU box, against 0.05 ms for a write into preallocated memory), and
its ``StaticSlidingWindowLayer`` rolls and copies the whole window each step. These layers write the new
tokens into preallocated buffers and return views.

Buffers are (B, Hkv, capacity, D) and contiguous, so the returned views have head-dim stride 1 and
strides >= D elsewhere: torch's fused kernels read them in place (no copy in ``attnopt.attention``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingLayer", "PreallocatedLayer", "RingLayer", "SinkRotation"]

# Rotary embedding callable as transformers' ``model.model.rotary_emb``: (x, position_ids (1, L)) ->
# (cos, sin), each (1, L, D), rotate-half convention (LLaMA, Mistral, Qwen, Gemma, ...).
Rotary = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} is too small; allowed: an int >= {minimum}")
    return value


def _check_states(layer: object, k: Tensor, v: Tensor, buf_k: Tensor | None, buf_v: Tensor | None) -> None:
    """New states must be (B, Hkv, s, D) tensors matching the buffers they are written into."""
    name = type(layer).__name__
    if not isinstance(k, Tensor) or not isinstance(v, Tensor) or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{name}.update: key/value states must be 4-D (batch, kv_heads, tokens, head_dim) tensors, got "
            f"{tuple(getattr(k, 'shape', ()))} and {tuple(getattr(v, 'shape', ()))}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{name}.update: keys {tuple(k.shape)} and values {tuple(v.shape)} disagree")
    if buf_k is None or buf_v is None:
        return
    for what, new, buf in (("keys", k, buf_k), ("values", v, buf_v)):
        if (new.shape[0], new.shape[1], new.shape[3]) != (buf.shape[0], buf.shape[1], buf.shape[3]) or (
            new.dtype,
            new.device,
        ) != (buf.dtype, buf.device):
            raise ValueError(
                f"{name}.update: new {what} {tuple(new.shape)} {new.dtype} on {new.device} do not match the "
                f"cache's (batch={buf.shape[0]}, kv_heads={buf.shape[1]}, head_dim={buf.shape[3]}, "
                f"{buf.dtype}, {buf.device}); start a new cache (or call reset()) for a different batch"
            )


class GrowingLayer(DynamicLayer):
    """A dynamic cache layer that grows by doubling and returns views (no per-step copy of old tokens).

    Appending s tokens writes them into the buffer; when it is full, a buffer ``growth`` times larger
    (rounded up to 64 tokens) is allocated and the filled prefix copied once, so each token is copied
    O(1) times on average. Up to ``growth``x the filled size is reserved. ``crop``, beam reordering and
    batch selection work as on ``DynamicLayer``; after one of them, the next update copies once into a
    fresh buffer.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, initial: int = 256, growth: float = 2.0, **kwargs):
        super().__init__()
        self.initial = _positive_int("initial", initial)
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth > 1.0:
            raise ValueError(f"growth={growth!r}: expected a number > 1 (2.0 doubles the buffer when full)")
        self.growth = float(growth)
        self._k: Tensor | None = None
        self._v: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._k = self._v = None
        self.keys = self.values = None
        self.is_initialized = True

    def _filled(self) -> int:
        """Tokens held; if ``self.keys`` is no longer a prefix view of the buffer (crop, reorder, batch
        selection replaced it), re-adopt it into a new buffer first."""
        k, v, bk = self.keys, self.values, self._k
        if k is None:
            return 0
        is_prefix = (
            bk is not None
            and k.data_ptr() == bk.data_ptr()
            and k.stride() == bk.stride()
            and self.values.data_ptr() == self._v.data_ptr()  # type: ignore[union-attr]
            and self.values.stride() == self._v.stride()  # type: ignore[union-attr]
            and k.shape[:2] == bk.shape[:2]
        )
        if not is_prefix:
            n = k.shape[2]
            self._k = self._v = None
            self._allocate(k, v, n, max(n, 1))
            return n
        return k.shape[2]

    def _capacity_for(self, need: int) -> int:
        cap = self.initial if self._k is None else self._k.shape[2]
        while cap < need:
            cap = math.ceil(cap * self.growth)
        return -(-cap // 64) * 64

    def _allocate(self, k: Tensor, v: Tensor, n: int, need: int) -> None:
        """A new buffer with room for ``need`` tokens; the first n tokens of k/v copied into it."""
        cap = self._capacity_for(need)
        B, H = k.shape[:2]
        new_k = torch.empty(B, H, cap, k.shape[3], dtype=k.dtype, device=k.device)
        new_v = torch.empty(B, H, cap, v.shape[3], dtype=v.dtype, device=v.device)
        if n:
            new_k[:, :, :n].copy_(k[:, :, :n])
            new_v[:, :, :n].copy_(v[:, :, :n])
        self._k, self._v = new_k, new_v
        self.keys, self.values = new_k[:, :, :n], new_v[:, :, :n]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self._filled()
        _check_states(self, key_states, value_states, self._k, self._v)
        s = key_states.shape[2]
        if self._k is None or self._v is None:  # the first update: key_states give the buffer's shape
            self._allocate(key_states, value_states, 0, s)
        elif n + s > self._k.shape[2]:  # full: a larger buffer, the filled prefix copied once
            self._allocate(self._k, self._v, n, n + s)
        assert self._k is not None and self._v is not None
        self._k[:, :, n : n + s].copy_(key_states)
        self._v[:, :, n : n + s].copy_(value_states)
        self.keys, self.values = self._k[:, :, : n + s], self._v[:, :, : n + s]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()

    @property
    def capacity(self) -> int:
        """Tokens the current buffer holds before it grows (0 before the first update)."""
        return 0 if self._k is None else self._k.shape[2]


class PreallocatedLayer(GrowingLayer):
    """A static cache layer: one buffer of ``max_length`` tokens, written in place, never reallocated.

    Unlike transformers' ``StaticLayer`` it returns views of the filled prefix, so attention never reads
    (or masks) the unused slots, which may hold anything. Exceeding ``max_length`` is a ValueError.
    """

    def __init__(self, max_length: int, **kwargs):
        super().__init__(initial=_positive_int("max_length", max_length))
        self.max_length = max_length

    def _capacity_for(self, need: int) -> int:
        if need > self.max_length:
            raise ValueError(
                f"the static cache is full: {need} tokens needed, max_length={self.max_length}; build it with "
                f"a larger max_length (make_cache(model, 'static', max_length=...)) or use kind='growing'"
            )
        return self.max_length

    def get_max_length(self) -> int:
        return self.max_length


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class SinkRotation:
    """The model's rotary embedding with its last (cos, sin) remembered: every layer of a cache asks for
    the same positions in a decode step, so one table per step serves them all (make_cache shares one)."""

    def __init__(self, rotary: Rotary):
        if not callable(rotary):
            raise TypeError(
                f"rotary must be callable (x, position_ids) -> (cos, sin), got {type(rotary).__name__}"
            )
        self.rotary = rotary
        self._last: tuple | None = None
        self._table: tuple[Tensor, Tensor] | None = None

    def cos_sin(self, first: int, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (1, 1, n, D) in like's dtype, for positions first, ..., first + n - 1."""
        key = (first, n, like.dtype, like.device)
        if key != self._last or self._table is None:
            pos = torch.arange(first, first + n, device=like.device).view(1, -1)
            cos, sin = self.rotary(like, pos)
            self._table = (cos.to(like.dtype).unsqueeze(1), sin.to(like.dtype).unsqueeze(1))
            self._last = key
        return self._table


class RingLayer(DynamicLayer):
    """``sinks`` first tokens kept forever plus a ring of the ``window`` most recent ones (StreamingLLM).

    Memory and per-token time are constant: the buffer holds ``sinks + window`` tokens and a decode step
    writes one slot. Positions are assigned inside the cache (Xiao et al. 2023, "Efficient Streaming
    Language Models with Attention Sinks"): with a ``rotary`` embedding, the query and the window keys keep
    the model's rotation (their distances equal the in-cache ones, the window being contiguous), and the
    sink keys, stored un-rotated, are rotated each step to sit at in-cache position j, i.e. at distance
    ``c_q - j`` from a query at in-cache position ``c_q``. The result equals attention over the sink and
    window tokens placed at positions 0, 1, ..., n-1.

    With ``sinks=0`` and no rotary this is a sliding-window layer (``window`` = the model's sliding window:
    the last ``window`` keys, the new one included), without transformers' roll-and-copy per step.

    A decode step returns the buffer in slot order (one query sees every cached key, so order does not
    matter); a multi-token update returns [sinks, window in order, new tokens] (one copy of the window for
    that call), and transformers' causal mask over it is exact. Batches must not be padded (every row
    at the same positions): sinks are cache slots, not per-row tokens.
    """

    is_croppable = False

    def __init__(
        self, window: int, sinks: int = 0, rotary: Rotary | None = None, sliding: bool = False, **kwargs
    ):
        super().__init__()
        self.window = _positive_int("window", window)
        self.sinks = _positive_int("sinks", sinks, minimum=0)
        if sinks and rotary is None:
            raise ValueError(
                "sinks > 0 need the model's rotary embedding (rotary=model.model.rotary_emb) to re-assign the "
                "sinks' positions inside the cache; without it they would sit at their original, ever farther "
                "positions (the bug of transformers' old SinkCache)"
            )
        self.rotary = rotary if rotary is None or isinstance(rotary, SinkRotation) else SinkRotation(rotary)
        self.is_sliding = bool(sliding)
        self._clear()

    def _clear(self) -> None:
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._sink_pre: Tensor | None = None  # un-rotated sink keys (B, Hkv, sinks, D), float32 at least
        self._sink_half: Tensor | None = None  # their rotate-half
        self._seen = 0  # tokens ever appended (the absolute position of the next one)
        self._n_sinks = 0  # sink slots filled
        self._fill = 0  # window slots filled
        self._head = 0  # window slot of the oldest token once the ring has wrapped
        self._sink_shift: int | None = None  # position shift the sink slots are rotated for
        self._ordered = False  # a padded batch: return keys in order (padding masks index positions)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        B, H = key_states.shape[:2]
        cap = self.sinks + self.window
        self._k = torch.empty(B, H, cap, key_states.shape[3], dtype=key_states.dtype, device=self.device)
        self._v = torch.empty(B, H, cap, value_states.shape[3], dtype=value_states.dtype, device=self.device)
        self.keys = self.values = None
        self.is_initialized = True

    # transformers' bookkeeping -------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self._seen

    def get_max_length(self) -> int:
        return -1 if not self.is_sliding else self.window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the keys the next update returns, offset so that the query block is
        bottom-right aligned with them (transformers then builds a structured causal/window mask)."""
        kv_length = self._returned_length(query_length)
        return kv_length, self._seen + query_length - kv_length

    def _returned_length(self, s: int) -> int:
        if self._ring_decode(s):
            return self.sinks + self.window  # one slot overwritten, the whole buffer returned
        return self._n_sinks + self._fill + s

    def _in_place(self, s: int) -> bool:
        """The new tokens fit in order after the filled prefix: nothing evicted yet, nor by them."""
        return self._seen == self._n_sinks + self._fill and self._seen + s <= self.sinks + self.window

    def _ring_decode(self, s: int) -> bool:
        """A steady decode step: one token into the full ring, the buffer returned in slot order."""
        return s == 1 and not self._ordered and not self._in_place(1)

    def reset(self) -> None:
        self._clear()
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._k is None:
            return
        idx = beam_idx.to(self._k.device)
        self._k, self._v = self._k.index_select(0, idx), self._v.index_select(0, idx)  # type: ignore[union-attr]
        if self._sink_pre is not None:
            self._sink_pre = self._sink_pre.index_select(0, idx)
            self._sink_half = self._sink_half.index_select(0, idx)  # type: ignore[union-attr]

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is None:
            return
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)  # type: ignore[union-attr]
        if self._sink_pre is not None:
            self._sink_pre = self._sink_pre.repeat_interleave(repeats, dim=0)
            self._sink_half = self._sink_half.repeat_interleave(repeats, dim=0)  # type: ignore[union-attr]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "RingLayer cannot be cropped: evicted tokens are gone (assisted decoding needs a growing cache)"
        )

    # positions --------------------------------------------------------------------------------------

    def _first_position(self, s: int, kwargs: dict) -> int:
        """Absolute position of the first new token: the model's position_ids when given (rows must agree)."""
        pos = kwargs.get("position_ids") if isinstance(kwargs, dict) else None
        if not isinstance(pos, Tensor) or pos.numel() == 0:
            return self._seen
        pos = pos.reshape(-1, pos.shape[-1])
        if pos.shape[0] > 1 and not bool((pos == pos[:1]).all()):
            if not self.sinks:
                # A padded batch on a sliding window: transformers' padding mask indexes keys by position,
                # so keys are returned in order from now on (one copy of the window per step, as
                # transformers' own sliding layer does); the counter gives the cache positions.
                self._ordered = True
                return self._seen
            raise ValueError(
                "RingLayer with sinks (the streaming cache) needs every batch row at the same positions; got "
                "position_ids that differ between rows (a padded batch), whose sinks would be padding. "
                "Generate the rows separately or without padding."
            )
        return int(pos[0, 0])

    def _unrotate(self, x: Tensor, first: int) -> Tensor:
        """Undo the model's rotation of x (B, H, L, D) at positions first, ..., first + L - 1:
        R(-θ)·x / scaling² (cos² + sin² = scaling²)."""
        assert self.rotary is not None
        cos, sin = self.rotary.cos_sin(first, x.shape[2], x)
        return (x * cos - _rotate_half(x) * sin) / (cos * cos + sin * sin)

    def _place_sinks(self, shift: int) -> None:
        """Sink j rotated to absolute position j + shift: distance c_q - j from a query at c_q + shift."""
        if not self.sinks or self.rotary is None or self._sink_pre is None or shift == self._sink_shift:
            return
        n = self._n_sinks
        pre, pre_half = self._sink_pre[:, :, :n], self._sink_half[:, :, :n]  # type: ignore[index]
        cos, sin = self.rotary.cos_sin(shift, n, pre)
        assert self._k is not None
        self._k[:, :, :n].copy_(torch.addcmul(pre * cos, pre_half, sin))
        self._sink_shift = shift

    def _store_sinks(self, k: Tensor, first_pos: int, j0: int) -> None:
        """Keep the un-rotated keys of new sink tokens (sink slots j0 ... j0 + len - 1), and their
        rotate-half, so that placing them at new positions each step is two multiply-adds."""
        if self.rotary is None:
            return
        work = torch.promote_types(k.dtype, torch.float32)
        if self._sink_pre is None:
            B, H, _, D = k.shape
            self._sink_pre = torch.zeros(B, H, self.sinks, D, dtype=work, device=k.device)
            self._sink_half = torch.zeros_like(self._sink_pre)
        pre = self._unrotate(k.to(work), first_pos)
        self._sink_pre[:, :, j0 : j0 + k.shape[2]] = pre
        self._sink_half[:, :, j0 : j0 + k.shape[2]] = _rotate_half(pre)  # type: ignore[index]
        # the new slots hold the model's own rotation, at shift first_pos - j0; if older sinks were placed
        # at another shift, all are re-placed on the next step
        shift = first_pos - j0
        self._sink_shift = shift if self._sink_shift in (None, shift) or j0 == 0 else None

    # update -----------------------------------------------------------------------------------------

    def _window_in_order(self) -> tuple[Tensor, Tensor]:
        assert self._k is not None and self._v is not None
        S, f, h = self.sinks, self._fill, self._head
        if h == 0:
            return self._k[:, :, S : S + f], self._v[:, :, S : S + f]
        ring_k, ring_v = self._k[:, :, S : S + f], self._v[:, :, S : S + f]
        return (
            torch.cat((ring_k[:, :, h:], ring_k[:, :, :h]), dim=2),
            torch.cat((ring_v[:, :, h:], ring_v[:, :, :h]), dim=2),
        )

    def _append(self, k: Tensor, v: Tensor, first_pos: int) -> None:
        """Write new tokens into the state: sink slots first, then the ring (only the last `window`)."""
        assert self._k is not None and self._v is not None
        S, W = self.sinks, self.window
        take = min(S - self._n_sinks, k.shape[2])
        if take:
            j0 = self._n_sinks
            self._k[:, :, j0 : j0 + take].copy_(k[:, :, :take])
            self._v[:, :, j0 : j0 + take].copy_(v[:, :, :take])
            self._store_sinks(k[:, :, :take], first_pos, j0)
            self._n_sinks += take
            k, v = k[:, :, take:], v[:, :, take:]
        s = k.shape[2]
        if not s:
            return
        if s >= W:  # the new tokens replace the whole window, in order from slot 0
            self._k[:, :, S:].copy_(k[:, :, -W:])
            self._v[:, :, S:].copy_(v[:, :, -W:])
            self._fill, self._head = W, 0
            return
        # slots of the next s tokens: after the newest one, wrapping around the ring
        start = (self._head + self._fill) % W if self._fill == W else self._fill
        if start + s <= W:  # no wrap: one slice write (every decode step)
            self._k[:, :, S + start : S + start + s].copy_(k)
            self._v[:, :, S + start : S + start + s].copy_(v)
        else:
            slots = (torch.arange(s) + start) % W + S
            self._k.index_copy_(2, slots.to(self._k.device), k)
            self._v.index_copy_(2, slots.to(self._v.device), v)
        overflow = max(0, self._fill + s - W)
        self._fill = min(W, self._fill + s)
        self._head = (self._head + overflow) % W

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            _check_states(self, key_states, value_states, None, None)
            self.lazy_initialization(key_states, value_states)
        _check_states(self, key_states, value_states, self._k, self._v)
        assert self._k is not None and self._v is not None
        s = key_states.shape[2]
        t0 = self._first_position(s, kwargs.get("kwargs", kwargs))
        S = self.sinks
        if self._ring_decode(s):
            # decode: one slot written in place (the oldest window token), the buffer returned in slot order
            self._append(key_states, value_states, t0)
            self._seen += 1
            self._place_sinks(t0 - (S + self.window - 1))  # the query sits at in-cache position S + W - 1
            self.keys, self.values = self._k, self._v
            return self._k, self._v
        if self._in_place(s):
            # nothing evicted yet: in-cache positions are the model's own; write in order, return a view
            shift = t0 - self._seen
            self._append(key_states, value_states, t0)
            self._seen += s
            self._place_sinks(shift)
            n = self._n_sinks + self._fill
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
            return self.keys, self.values
        # several tokens past the window: [sinks, window in order, new] (one copy of the window, this call)
        n_old = self._n_sinks + self._fill
        self._place_sinks(t0 - n_old)  # the chunk's first query sits at in-cache position n_old
        wk, wv = self._window_in_order()
        keys = torch.cat((self._k[:, :, : self._n_sinks], wk, key_states), dim=2)
        values = torch.cat((self._v[:, :, : self._n_sinks], wv, value_states), dim=2)
        self._append(key_states, value_states, t0)
        self._seen += s
        n = self._n_sinks + self._fill
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
        return keys, values
