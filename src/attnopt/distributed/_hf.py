"""Context parallelism for Hugging Face transformers models loaded with ``attn_implementation="attnopt"``.

    import attnopt.distributed as cp
    batch = cp.shard_inputs(ids, labels=ids, layout="zigzag")      # this rank's tokens, global positions
    with cp.context_parallel(layout="zigzag", mode="ring"):
        logits = model(**batch, use_cache=False).logits             # (B, L_rank, V)
    full = cp.unshard(logits, dim=1, layout="zigzag")              # (B, N, V), every rank

Inside ``context_parallel()`` both functions that ``attnopt.integrations.transformers.register()``
installs hand their calls to a route of this module. The mask function no longer builds a mask for the
local shard (which would be wrong: the shard's rows are not one contiguous sequence); it records what it
saw (the mask rule, padding, cache offsets). The first attention layer of each forward then agrees with
the other ranks (one all-gather of a few integers: shard lengths, a fingerprint of the position ids,
errors), builds the mask in *global* positions from the rule, exactly as the single-process integration
translates it, and every layer calls ``attnopt.distributed.attention`` with it.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from .. import masks as M
from ..integrations import transformers as ao_hf
from ._attention import MODES, attention
from ._comm import agree
from ._layout import LAYOUTS, Layout, shard

_WHAT = "attnopt.distributed.context_parallel"
_IGNORE = -100  # transformers' (and torch's cross_entropy's) ignore_index
_LOCAL_PARTS = ("packed", "remapped")  # rule parts transformers derives from the shard's position ids


# ----------------------------------------------------------------------------------------- inputs


def global_positions(n: int, cu_seqlens: Tensor | list[int] | None = None) -> Tensor:
    """Position ids (n,) of the full sequence: 0..n-1, or restarting at 0 at each document start."""
    pos = torch.arange(n)
    if cu_seqlens is None:
        return pos
    cu = _cu_list("global_positions", cu_seqlens, n)
    starts = torch.tensor(cu[:-1], dtype=torch.long)
    lengths = torch.tensor([b - a for a, b in itertools.pairwise(cu)], dtype=torch.long)
    return pos - torch.repeat_interleave(starts, lengths)  # (n,)


def shift_labels(labels: Tensor) -> Tensor:
    """labels (B, N) -> targets (B, N): out[:, i] = labels[:, i + 1], out[:, -1] = -100 (ignored).

    out[:, i] is the target of the logits at position i, as transformers' causal-LM loss shifts them.
    """
    out = torch.full_like(labels, _IGNORE)
    out[:, :-1] = labels[:, 1:]
    return out


def shard_inputs(
    input_ids: Tensor,
    *,
    labels: Tensor | None = None,
    layout: str | Layout = "zigzag",
    cu_seqlens: Tensor | list[int] | None = None,
    group: dist.ProcessGroup | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Tensor]:
    """This rank's part of a full batch, ready for ``model(**batch)`` inside ``context_parallel()``.

    Args:
        input_ids: (B, N) token ids of the full sequences (the same on every rank).
        labels: optional (B, N) labels, as for ``model(input_ids, labels=labels)``: they are shifted on the
            full sequence first (target of position i = labels[i + 1], the last position -100), then
            sharded, so the ranks' loss terms are together exactly those of the full sequence. Nothing is
            masked at document boundaries (as with transformers on packed rows): to drop those terms set
            labels[:, cu_seqlens[d]] = -100 first, as DataCollatorWithFlattening does.
        layout: "zigzag" (default), "contiguous" or a Layout: pass the same to context_parallel().
        cu_seqlens: packed documents [0, ..., N] (global): position ids restart at 0 at each document
            start, as transformers' packed training expects. Pass the same to context_parallel().
        group, rank, world_size: whose part; default this process's rank in `group` (default the world).

    Returns:
        {"input_ids": (B, L), "position_ids": (B, L) global positions (RoPE must see those, not 0..L-1),
        and with labels "labels" and "shift_labels": (B, L), both the shifted targets of this rank's
        positions (already aligned with its logits: do not shift again; transformers' causal-LM loss reads
        ``shift_labels`` and skips its own shift)}. Its default loss is the mean over this rank's targets;
        pass ``num_items_in_batch=`` the full batch's count of targets != -100 for shares of the global mean.
    """
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        raise TypeError(
            f"shard_inputs: input_ids must be a (batch, tokens) tensor, got {type(input_ids).__name__} "
            f"{tuple(getattr(input_ids, 'shape', ()))}"
        )
    B, N = input_ids.shape
    if labels is not None and (not isinstance(labels, Tensor) or tuple(labels.shape) != (B, N)):
        raise ValueError(
            f"shard_inputs: labels must be a tensor of input_ids' shape {(B, N)}, got "
            f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))}"
        )
    cu = None if cu_seqlens is None else _cu_list("shard_inputs", cu_seqlens, N)
    where = dict(dim=1, layout=layout, group=group, rank=rank, world_size=world_size)
    pos = global_positions(N, cu).to(input_ids.device).expand(B, N)  # (B, N)
    out = {"input_ids": shard(input_ids, **where), "position_ids": shard(pos, **where)}
    if labels is not None:
        targets = shard(shift_labels(labels), **where)
        out["labels"] = out["shift_labels"] = targets
    return out


def _cu_list(what: str, cu_seqlens: Tensor | list[int], n: int | None = None) -> list[int]:
    """cu_seqlens checked (1-D ints from 0, non-decreasing; ending at n when given) as a list."""
    try:
        cu = M.document(cu_seqlens)._cu_seqlens  # its checks, its messages
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None
    if n is not None and cu[-1] != n:
        raise ValueError(
            f"{what}: cu_seqlens={cu} ends at {cu[-1]}, but the sequence holds N={n} tokens; the last "
            f"boundary must be N"
        )
    return cu


# ------------------------------------------------------------------------------------------ route


@dataclass(eq=False)
class _ShardMask:
    """The mask function's answer inside context_parallel(), once per forward and mask kind: what it saw
    of this rank's shard. The first layer that receives it resolves it (agreeing with the other ranks)
    into the global mask and keeps that here for the other layers."""

    parts: list[tuple] | None  # the rule's parts (attnopt.integrations.transformers._rule_parts)
    error: BaseException | None  # why this shard cannot run sharded, raised on every rank by the first layer
    resolved: bool = False
    mask: M.Mask | None = None
    ndim: ClassVar[int] = 4  # passes transformers' mask preprocessing, like attnopt's mask descriptors

    def __repr__(self) -> str:
        state = repr(self.mask) if self.resolved else f"parts={self.parts}"
        return f"attnopt.distributed.ShardMask({state})"


@dataclass(eq=False)
class _Route:
    """What context_parallel() runs in place of the registered mask and attention functions."""

    group: dist.ProcessGroup | None
    mode: str
    layout: str | Layout
    cu: list[int] | None
    calls: int = field(default=0)

    def mask(
        self,
        batch_size: int,
        q_length: int,
        kv_length: int,
        q_offset: int | Tensor,
        kv_offset: int,
        mask_function: Callable | None,
        attention_mask: Tensor | None,
    ) -> _ShardMask:
        """Record the rule and what rules this shard out; build nothing (the mask is global)."""
        error: BaseException | None = None
        parts = None
        if isinstance(attention_mask, Tensor) and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            zeros = int((~attention_mask.bool()).sum())
            error = ValueError(
                f"{_WHAT}: attention_mask has {zeros} zero(s) (padding) in shape {tuple(attention_mask.shape)}; "
                f"padding is not supported across ranks. Pass no attention_mask (or all ones): pack the "
                f"sequences without padding and pass their boundaries as cu_seqlens instead"
            )
        elif kv_length != q_length or int(q_offset) != 0 or kv_offset != 0:
            error = _cache_error(q_length, kv_length)
        else:
            parts = _global_parts(mask_function)
            if parts is None:
                name = getattr(mask_function, "__qualname__", repr(mask_function))
                error = NotImplementedError(
                    f"{_WHAT}: the model's mask rule {name} has no global form attnopt knows (it handles "
                    f"causal, sliding-window, bidirectional and packed-sequence rules); run it unsharded"
                )
        return _ShardMask(parts, error)

    def attention(
        self,
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        *,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        softcap: float | None = None,
        s_aux: Tensor | None = None,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """transformers' attention-function signature, on this rank's shard: (B, L, Hq, Dv), None."""
        self.calls += 1
        shard_mask = attention_mask if isinstance(attention_mask, _ShardMask) else None
        if shard_mask is not None and shard_mask.resolved:
            mask = shard_mask.mask
        else:
            mask = self._resolve(module, query, key, attention_mask, is_causal, output_attentions, kwargs)
            if shard_mask is not None:
                shard_mask.resolved, shard_mask.mask = True, mask
        mods, sinks = ao_hf._softcap_and_sinks(softcap, s_aux, query.dtype)  # as the single-process path
        out = attention(
            query,
            key,
            value,
            mask=mask,
            score_mod=mods or None,
            scale=scaling,
            sinks=sinks,
            dropout_p=float(dropout),
            group=self.group,
            mode=self.mode,
            layout=self.layout,
        )
        return out.transpose(1, 2).contiguous(), None

    def _resolve(
        self,
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        attention_mask: Any,
        is_causal: bool | None,
        output_attentions: bool,
        kwargs: dict[str, Any],
    ) -> M.Mask | None:
        """The global mask of this forward, after every rank agreed it can run (collective; raises on
        every rank at once when any rank cannot)."""
        error = _local_error(attention_mask, query, key, output_attentions)
        try:
            crc = _fingerprint(kwargs.get("position_ids"))
        except ValueError as e:
            crc, error = -1, error or e
        table = agree(self.group, query.device, [query.shape[2], crc], error, _WHAT)
        lay = _global_layout(self.layout, [row[0] for row in table])
        N = lay.total
        if self.cu is not None:
            _cu_list(_WHAT, self.cu, N)
        _check_positions(lay, self.cu, [row[1] for row in table])
        if isinstance(attention_mask, _ShardMask):
            parts = attention_mask.parts
        else:  # no mask function ran: causality and window from the module, as the single-process path
            parts = _module_parts(module, is_causal, kwargs.get("sliding_window"))
        rule = ao_hf._structured(parts or [], N, N)
        if rule is None:
            raise NotImplementedError(f"{_WHAT}: the mask rule {parts} has no global form attnopt knows")
        mask = None if isinstance(rule, ao_hf._Full) else rule
        if self.cu is not None:
            doc = M.document(self.cu)
            mask = doc if mask is None else doc & mask
        return mask


def _cache_error(q_length: int, kv_length: int) -> NotImplementedError:
    return NotImplementedError(
        f"{_WHAT}: the keys hold {kv_length} positions for {q_length} queries: a KV cache with past tokens "
        f"(or a preallocated one) is not supported across ranks; call the model with use_cache=False (or a "
        f"fresh cache) and run generate() outside context_parallel()"
    )


def _global_parts(mask_function: Callable | None) -> list[tuple] | None:
    """The rule's parts without those transformers derived from the shard's own position ids (a zigzag
    shard's positions jump, which it reads as packed sequences); None for a rule attnopt cannot read."""
    if mask_function is None:
        return [("causal",)]
    parts = ao_hf._rule_parts(mask_function)
    return None if parts is None else [p for p in parts if p[0] not in _LOCAL_PARTS]


def _module_parts(module: torch.nn.Module, is_causal: bool | None, window: Any) -> list[tuple]:
    """Rule parts from the layer itself (no mask function ran): is_causal and sliding_window."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = window if window is not None else getattr(module, "sliding_window", None)
    parts: list[tuple] = [("causal",)] if causal else []
    if isinstance(window, int) and not isinstance(window, bool):
        parts.append(("window", window))
    return parts


def _local_error(
    attention_mask: Any, query: Tensor, key: Tensor, output_attentions: bool
) -> BaseException | None:
    """Why this rank's layer call cannot run sharded (before any communication), or None."""
    if isinstance(attention_mask, _ShardMask):
        if attention_mask.error is not None:
            return attention_mask.error
    elif attention_mask is not None:
        return TypeError(
            f"{_WHAT}: the layer got a prepared attention mask ({type(attention_mask).__name__} "
            f"{tuple(getattr(attention_mask, 'shape', ()))}); a mask built for the local shard has no global "
            f"meaning. Pass no attention_mask (cu_seqlens= for packed documents), and register attnopt before "
            f"loading the model so its mask function runs"
        )
    if key.shape[2] != query.shape[2]:
        return _cache_error(query.shape[2], key.shape[2])
    if output_attentions:
        return NotImplementedError(
            f"{_WHAT}: output_attentions=True is not supported across ranks (each rank holds a block of rows "
            f"of the weights); use attnopt.maps.record on an unsharded run"
        )
    return None


def _fingerprint(position_ids: Any) -> int:
    """crc32 of this rank's position ids (one row: every row must be equal), or -1 when not available."""
    if not isinstance(position_ids, Tensor) or position_ids.ndim != 2:
        return -1  # the model passes none to its attention layers (or not as (B, L)): not checked
    row = position_ids[0]
    if not bool((position_ids == row).all()):
        raise ValueError(
            f"{_WHAT}: position_ids differ between batch rows {position_ids.tolist()}; every row of a sharded "
            f"batch has the same positions (one layout, one cu_seqlens)"
        )
    return _crc(row)


def _crc(row: Tensor) -> int:
    return zlib.crc32(row.to(torch.int64).cpu().numpy().tobytes())


def _global_layout(layout: str | Layout, lengths: list[int]) -> Layout:
    """The layout of the ranks' shards (their lengths from the agreement); the same on every rank."""
    if layout == "contiguous":
        return Layout.contiguous(lengths)
    lay = Layout.make(layout, sum(lengths), len(lengths))
    expect = [lay.local_length(r) for r in range(len(lengths))]
    if expect != lengths:
        raise ValueError(
            f"{_WHAT}: layout {lay.name!r} of N={sum(lengths)} tokens puts {expect} tokens on the ranks, but "
            f"their inputs hold {lengths}; shard them with attnopt.distributed.shard_inputs(layout={lay.name!r})"
        )
    return lay


def _check_positions(lay: Layout, cu: list[int] | None, crcs: list[int]) -> None:
    """Every rank's position ids are the global positions of its shard (from the gathered fingerprints,
    so every rank reaches the same verdict without another round). Without them RoPE sees 0..L-1."""
    N = lay.total
    plain = global_positions(N)
    allowed = [plain] if cu is None else [global_positions(N, cu), plain]
    for r, crc in enumerate(crcs):
        if crc < 0:
            continue
        mine = lay.positions(r)
        if crc not in {_crc(p[mine]) for p in allowed}:
            kind = "restarting at each document of cu_seqlens" if cu is not None else "0..N-1"
            raise ValueError(
                f"{_WHAT}: rank {r}'s position_ids are not the global positions of its shard (layout "
                f"{lay.name!r}, N={N}, positions {kind}). Pass the position_ids of "
                f"attnopt.distributed.shard_inputs(..., layout=, cu_seqlens=) with the same layout and "
                f"cu_seqlens as context_parallel(); without them the model numbers each shard from 0"
            )


# ------------------------------------------------------------------------------------ the context


@contextlib.contextmanager
def context_parallel(
    *,
    group: dist.ProcessGroup | None = None,
    mode: str = "ring",
    layout: str | Layout = "zigzag",
    cu_seqlens: Tensor | list[int] | None = None,
) -> Iterator[None]:
    """Run every attnopt attention layer of a transformers model on a sequence sharded across `group`.

    Inside, a model loaded with ``attn_implementation="attnopt"`` (after
    ``attnopt.integrations.transformers.register()``) calls ``attnopt.distributed.attention`` with the
    mask in global positions: causal (or what the model's mask rule says: sliding windows become
    ``sliding_window(W - 1, 0)`` as in the single-process integration), and with ``cu_seqlens``
    ``document(cu_seqlens) & causal()``. Scaling, softcap, sinks and grouped-query K/V pass as in the
    single-process integration. Feed each rank ``shard_inputs(...)`` of the same layout and cu_seqlens.

    Args:
        group: the process group (default the world); torch.distributed must be initialized.
        mode: "ring" (default), "allgather" or "alltoall" (needs Hkv % world size == 0).
        layout: "zigzag" (default), "contiguous" or an attnopt.distributed.Layout.
        cu_seqlens: packed documents [0, ..., N] in global positions, or None (one sequence per row).

    Raises (on every rank at once, from the first attention layer): ValueError for an attention_mask
    with zeros (padding is not supported across ranks) or position ids that are not the shard's global
    positions; NotImplementedError for a KV cache with past tokens (generate runs outside the context),
    output_attentions, dropout, or a mask rule with no global form. Not thread-safe: one context per
    process at a time (an inner one replaces the outer one until it exits).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{_WHAT}: torch.distributed is not initialized; call torch.distributed.init_process_group "
            f"(e.g. launch with torchrun) first"
        )
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{_WHAT}: mode={mode!r} is unknown; allowed: {MODES}")
    if isinstance(layout, Layout):
        if layout.world_size != dist.get_world_size(group):
            raise ValueError(
                f"{_WHAT}: layout holds {layout.world_size} ranks but the group has {dist.get_world_size(group)}"
            )
    elif not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{_WHAT}: layout={layout!r} is unknown; allowed: {LAYOUTS} or a Layout")
    cu = None if cu_seqlens is None else _cu_list(_WHAT, cu_seqlens)
    route = _Route(group, mode, layout, cu)
    outer = ao_hf._route
    ao_hf._route = route
    try:
        yield
    finally:
        ao_hf._route = outer
    if route.calls == 0:
        warnings.warn(
            f"{_WHAT}: no attention layer ran through attnopt inside the context; was the model loaded with "
            f"attn_implementation='attnopt' after attnopt.integrations.transformers.register()? Other "
            f"implementations attend within each shard only",
            RuntimeWarning,
            stacklevel=3,
        )


__all__ = ["context_parallel", "global_positions", "shard_inputs", "shift_labels"]
