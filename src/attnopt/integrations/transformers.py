"""Hugging Face Transformers drop-in: ``attn_implementation="attnopt"``.

    import attnopt.integrations.transformers as ao_hf
    ao_hf.register()                       # once; idempotent; importing this module registers nothing
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnopt")

register() installs two functions (transformers >= 5 calls both, see design.md §5):

* the **mask function** (``AttentionMaskInterface``): transformers calls it once per forward with a
  mask *rule* (causal, sliding window, packed sequences, ...) and the 2-D padding mask. We translate
  the rule into ``attnopt.masks`` descriptors — ``causal() & left_padding(pads)`` instead of a
  (B, 1, Sq, Sk) tensor — so a long prompt pays no N² memory. A rule we do not recognise becomes an
  exact ``custom`` mask that evaluates transformers' own rule tile by tile (O(tile) memory, slower),
  or, for rules flagged as not index-based (``use_vmap``), transformers' own dense mask.
* the **attention function** (``AttentionInterface``): calls ``attnopt.attention`` with the mask,
  ``scaling``, dropout, ``softcap`` and ``s_aux`` sinks; K/V stay un-repeated for grouped-query
  attention. With ``output_attentions=True`` it also returns the attention weights, computed on
  request through the same exact kernel (an O(Sq·Sk) tensor per layer, which the user asked for).

Only the public attnopt API is used. transformers is imported lazily, inside these functions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import attnopt as ao
from attnopt import masks as M
from attnopt import mods as Mods
from attnopt._memory import available_memory

__all__ = [
    "CACHE_KINDS",
    "attention_forward",
    "hf_mask_to_attnopt",
    "make_cache",
    "mask_interface",
    "register",
]


class _Full:
    """The mask function's answer 'every query sees every key' (not None: None means 'use is_causal').

    ``ndim = 4`` lets it pass transformers' mask preprocessing when ``generate`` hands a mask built ahead
    of time (compileable caches) back to the model, as attnopt's mask descriptors do.
    """

    ndim = 4

    def __repr__(self) -> str:
        return "attnopt.integrations.transformers.FULL"


FULL = _Full()

# While attnopt.distributed.context_parallel() is active, both registered functions hand their calls to
# this object (its .mask() and .attention()), which runs the sequence sharded across processes.
_route: Any = None


def register(name: str = "attnopt") -> str:
    """Register attnopt under ``name`` with transformers (attention + mask function); return the name.

    Idempotent. Refuses to replace one of transformers' own implementations ("sdpa", "eager", ...).
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"name={name!r}: expected a non-empty string without surrounding spaces")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "attnopt.integrations.transformers.register() needs transformers >= 5 (pip install 'attnopt[hf]')"
        ) from e
    for iface, fn in ((AttentionInterface, attention_forward), (AttentionMaskInterface, mask_interface)):
        current = iface._global_mapping.get(name)
        if current is not None and current is not fn:
            raise ValueError(
                f"name={name!r} is already registered with transformers' {iface.__name__} as {current!r}; "
                f"pick another name (e.g. register('attnopt'))"
            )
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_interface)
    return name


# ----------------------------------------------------------------------------------------- masks


def mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> M.Mask | _Full:
    """transformers' mask-interface signature -> an attnopt mask descriptor (or FULL).

    Idempotent: given one of its own results as ``attention_mask`` (``generate`` builds masks ahead of
    time for compileable caches and the model passes them back through mask creation), returns it.
    """
    if _route is not None:
        return _route.mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask
        )
    if isinstance(attention_mask, (M.Mask, _Full)):
        return attention_mask
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function

        mask_function = causal_mask_function
    if torch.compiler.is_compiling():
        return _traced_mask(
            batch_size,
            q_length,
            kv_length,
            q_offset,
            kv_offset,
            mask_function,
            attention_mask,
            use_vmap,
            kwargs,
        )
    return hf_mask_to_attnopt(
        batch_size,
        q_length,
        kv_length,
        int(q_offset),
        int(kv_offset),
        mask_function,
        attention_mask,
        use_vmap,
    )


def hf_mask_to_attnopt(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    mask_function: Callable,
    attention_mask: Tensor | None,
    use_vmap: bool = False,
) -> M.Mask | _Full:
    """Translate a transformers mask rule + 2-D padding mask into attnopt descriptors (exact)."""
    parts = _rule_parts(mask_function)
    # Structured positions hold when query i sits at key i + Sk - Sq (bottom-right), which is what
    # transformers' caches produce; anything else is evaluated from the rule itself.
    aligned = q_offset - kv_offset == kv_length - q_length
    rule: M.Mask | _Full | None = (
        _structured(parts, q_length, kv_length) if aligned and parts is not None else None
    )
    if rule is None and parts is not None and 0 <= q_offset - kv_offset < kv_length - q_length:
        # A preallocated buffer (StaticCache): keys past the newest query are slots not written yet.
        # Causal rules never keep them: causal aligned to the filled length, never read past it.
        rule = _prefix_rule(parts, batch_size, q_offset - kv_offset + q_length)
    if rule is None:
        if use_vmap:  # a rule transformers itself only evaluates element by element: use its dense mask
            return M.dense(
                _hf_dense(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)
            )
        rule = M.custom(_offset_rule(mask_function, q_offset, kv_offset))
    pad = _padding_part(attention_mask, kv_length, kv_offset)
    if pad is None:
        return rule
    return pad if isinstance(rule, _Full) else rule & pad


def _traced_mask(
    B: int,
    Sq: int,
    Sk: int,
    q_offset: Any,
    kv_offset: Any,
    fn: Callable,
    attention_mask: Tensor | None,
    use_vmap: bool,
    kwargs: dict[str, Any],
) -> M.Mask | _Full | Tensor:
    """The mask function while torch.compile traces a model: nothing may read data or closures.

    Rules built inside the traced region cannot be inspected (dynamo cannot read a closure's cells),
    and the padding mask's values are unknown while tracing. So the plain causal / bidirectional rules
    become descriptors, the padding a (B, 1, 1, Sk) keep-row, and any other rule transformers' own
    traceable dense mask (O(Sq·Sk), as with sdpa).
    """
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function or fn is mu.bidirectional_mask_function:
        causal = fn is mu.causal_mask_function
        if (
            causal
            and isinstance(q_offset, (int, torch.SymInt))
            and isinstance(kv_offset, (int, torch.SymInt))
        ):
            causal = Sq > 1 and q_offset - kv_offset == Sk - Sq  # a bottom-right aligned query block
        elif causal:
            causal = None  # offsets only known at run time: transformers' dense mask below
        if causal is not None:
            rule: M.Mask | None = M.causal() if causal else None
            if attention_mask is None:
                return FULL if rule is None else rule
            pm = attention_mask.to(torch.bool)
            need = kv_offset + Sk
            if pm.shape[1] < need:
                pm = torch.nn.functional.pad(pm, (0, need - pm.shape[1]))
            row = M.dense(pm[:, None, None, kv_offset:need])  # (B, 1, 1, Sk): O(B·Sk)
            return row if rule is None else rule & row
    dense = _hf_dense(B, Sq, Sk, q_offset, kv_offset, fn, attention_mask, use_vmap, kwargs.get("device"))
    return FULL if dense is None else dense


def _closure(fn: Callable) -> dict[str, Any]:
    try:
        return dict(inspect.getclosurevars(fn).nonlocals)
    except (TypeError, ValueError):
        return {}


def _rule_parts(fn: Callable) -> list[tuple] | None:
    """Decompose a transformers mask rule into known parts, or None if any piece is unknown."""
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        return [("causal",)]
    if fn is mu.bidirectional_mask_function:
        return []
    qual = getattr(fn, "__qualname__", "")
    env = _closure(fn)
    if qual == "and_masks.<locals>.and_mask" and "mask_functions" in env:
        out: list[tuple] = []
        for child in env["mask_functions"]:
            sub = _rule_parts(child)
            if sub is None:
                return None
            out += sub
        return out
    if qual == "sliding_window_overlay.<locals>.inner_mask" and isinstance(env.get("sliding_window"), int):
        return [("window", env["sliding_window"])]
    if qual == "sliding_window_bidirectional_overlay.<locals>.inner_mask" and isinstance(
        env.get("sliding_window"), int
    ):
        return [("band", env["sliding_window"])]
    if qual == "remap_positions_for_packed_sequence.<locals>.inner_mask" and "mask_function" in env:
        # Within one packed sequence positions step by exactly 1, so a positional rule on the remapped
        # positions equals the rule on raw indices once queries and keys are kept in one document.
        sub = _rule_parts(env["mask_function"])
        return None if sub is None else [*sub, ("remapped",)]
    if qual == "packed_sequence_mask_function.<locals>.inner_mask" and isinstance(
        env.get("packed_sequence_mask"), Tensor
    ):
        return [("packed", env["packed_sequence_mask"])]
    return None


def _structured(parts: list[tuple], Sq: int, Sk: int) -> M.Mask | _Full | None:
    kinds = [p[0] for p in parts]
    if "remapped" in kinds and "packed" not in kinds:
        return None
    out: M.Mask | None = None

    def add(m: M.Mask) -> None:
        nonlocal out
        out = m if out is None else out & m

    windows = [p[1] for p in parts if p[0] == "window"]
    causal = "causal" in kinds
    for w in windows:
        if w < 1:
            return None
        # transformers keeps kv > q - w: w - 1 keys to the left of the query (FlashAttention window_size).
        add(M.sliding_window(w - 1, 0 if causal else Sq + Sk))  # no causal part: no right bound
    if causal and not windows and Sq > 1:  # one bottom-right query sees every key: no causal mask needed
        add(M.causal())
    for p in parts:
        if p[0] == "band":
            add(M.sliding_window(p[1], p[1]))
        elif p[0] == "packed":
            psm = p[1]
            if not (psm.shape[-1] == Sq == Sk) or not bool((psm == psm[:1]).all()):
                return None  # rows packed differently: evaluate the rule exactly instead
            ids = psm[0].tolist()
            cuts = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
            add(M.document([0, *cuts, len(ids)]))
    return FULL if out is None else out


def _prefix_rule(parts: list[tuple], B: int, used: int) -> M.Mask | None:
    """Causal (or causal sliding-window) attention over the first ``used`` keys of a longer buffer:
    ``cache_causal`` with every length ``used``, which keeps nothing at or past ``used``."""
    kinds = [p[0] for p in parts]
    windows = [p[1] for p in parts if p[0] == "window"]
    if "causal" not in kinds or set(kinds) - {"causal", "window"} or any(w < 1 for w in windows):
        return None  # only causal rules bound the keys by the query position
    left = min(windows) - 1 if windows else None
    return M.cache_causal(torch.full((B,), used, dtype=torch.long), left=left)


def _filled_prefix(mask: M.Mask | None, Sq: int, Sk: int) -> tuple[int, M.Mask | None]:
    """(keys to read, the mask over them) for a ``cache_causal`` of one common length L < Sk, alone or
    ``&`` key-only padding (what ``_prefix_rule`` builds): the keys past L are never read, and over the
    first L keys the mask is plain bottom-right causal (a fast path on every backend)."""
    cc, rest = mask, None
    if isinstance(mask, M.And) and isinstance(mask.a, M.cache_causal) and mask.b.key_only:
        cc, rest = mask.a, mask.b
    if not isinstance(cc, M.cache_causal) or cc._min != cc._max or not 0 < cc._max < Sk:
        return Sk, mask
    L = cc._max
    if cc.left is not None:
        base: M.Mask | None = M.sliding_window(cc.left, 0)
    else:
        base = M.causal() if Sq > 1 else None  # one bottom-right query sees every filled key
    if rest is not None:
        ok, rest = _first_keys(rest, L)
        if not ok:
            return Sk, mask
    if rest is None:
        return L, base
    return L, rest if base is None else base & rest


def _first_keys(m: M.Mask, L: int) -> tuple[bool, M.Mask | None]:
    """A key-only padding mask restricted to keys [0, L): (understood, the mask or None if it keeps all)."""
    if isinstance(m, M.And):
        (ok_a, a), (ok_b, b) = _first_keys(m.a, L), _first_keys(m.b, L)
        if not (ok_a and ok_b):
            return False, None
        return True, (b if a is None else a if b is None else a & b)
    if isinstance(m, M.padding):
        return True, None if m._min >= L else M.padding(m.kv_lengths.clamp(max=L))
    if isinstance(m, M.left_padding):
        return True, None if m._max == 0 else M.left_padding(m.pad_lengths.clamp(max=L))
    if isinstance(m, M.dense) and m.mask.ndim == 4 and m.mask.shape[1:3] == (1, 1):
        return True, M.dense(m.mask[..., :L])
    return False, None


def _padding_part(attention_mask: Tensor | None, kv_length: int, kv_offset: int) -> M.Mask | None:
    """The 2-D padding mask (True = real token) as left/right padding descriptors, or a (B,1,1,Sk) row."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.ndim != 2:
        raise TypeError(
            f"attention_mask: expected a 2-D (batch, keys) padding mask, got "
            f"{type(attention_mask).__name__} {getattr(attention_mask, 'shape', '')}"
        )
    pm = attention_mask.to(torch.bool)
    need = kv_offset + kv_length
    if pm.shape[1] < need:  # transformers pads it with False (keys not written yet, e.g. a static cache)
        pm = torch.nn.functional.pad(pm, (0, need - pm.shape[1]))
    pm = pm[:, kv_offset:need]
    if bool(pm.all()):
        return None
    idx = torch.arange(kv_length, device=pm.device)
    count = pm.sum(1)
    first = torch.where(pm, idx, kv_length).amin(1)
    end = torch.where(pm, idx + 1, 0).amax(1)
    if not bool(((end - first == count) | (count == 0)).all()):
        return M.dense(pm[:, None, None, :])  # holes inside a row: O(B·Sk) keep-row, still no N² tensor
    first = torch.where(count == 0, kv_length, first).cpu()
    end = torch.where(count == 0, kv_length, end).cpu()
    out: M.Mask | None = None
    if bool((first > 0).any()):
        out = M.left_padding(first)
    if bool((end < kv_length).any()):
        right = M.padding(end)
        out = right if out is None else out & right
    return out


def _offset_rule(fn: Callable, q_offset: int, kv_offset: int) -> Callable:
    def rule(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return torch.as_tensor(fn(b, h, i + q_offset, j + kv_offset), dtype=torch.bool)

    rule.__name__ = f"transformers:{getattr(fn, '__qualname__', fn)}"
    return rule


def _hf_dense(B, Sq, Sk, q_offset, kv_offset, fn, attention_mask, use_vmap=True, device=None) -> Tensor:
    """transformers' own (B, 1, Sq, Sk) bool mask for a rule (traceable by torch.compile)."""
    from transformers.masking_utils import sdpa_mask

    device = (
        device if device is not None else (attention_mask.device if attention_mask is not None else "cpu")
    )
    return sdpa_mask(
        batch_size=B,
        q_length=Sq,
        kv_length=Sk,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=fn,
        attention_mask=None if attention_mask is None else attention_mask.to(torch.bool),
        allow_is_causal_skip=False,
        use_vmap=use_vmap,
        device=device,
    )


# ------------------------------------------------------------------------------------- attention


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: M.Mask | _Full | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    s_aux: Tensor | None = None,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function signature on attnopt: (B, Sq, Hq, Dv) contiguous, weights|None."""
    if _route is not None:
        return _route.attention(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            softcap=softcap,
            s_aux=s_aux,
            output_attentions=output_attentions,
            **kwargs,
        )
    paged = kwargs.get("attnopt_paged")
    if paged is not None:  # a step of attnopt.serving: keys and values live in its paged pool
        if softcap or s_aux is not None or output_attentions or kwargs.get("sliding_window"):
            raise NotImplementedError(
                "attnopt.serving's paged attention does not run softcap, sinks (s_aux), sliding windows "
                "or output_attentions yet"
            )
        return paged.attend(module, query, key, value, scaling), None
    if output_attentions:
        _check_dense_weights(query, key)
    Sq, Sk = query.shape[2], key.shape[2]
    mask: M.Mask | None
    mods: list[Mods.ScoreMod] = []
    if isinstance(attention_mask, _Full):
        mask = None
    elif isinstance(attention_mask, M.Mask):
        mask = attention_mask
        used, mask = _filled_prefix(mask, Sq, Sk)
        if used < Sk:  # a preallocated buffer: never read the slots past the filled length
            key, value = key[:, :, :used], value[:, :, :used]
    elif attention_mask is None:
        # No mask function ran (a model that builds no mask): causality comes from the module.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        mask = M.causal() if causal and Sq > 1 else None
    elif isinstance(attention_mask, Tensor) and attention_mask.ndim == 4:
        # A prepared 4-D mask handed in by the user: keep it (bool = keep, float = added to the scores).
        am = attention_mask[..., : key.shape[2]]
        if am.dtype == torch.bool:
            mask = M.dense(am)
        else:
            mask, mods = None, [Mods.bias(am)]
    else:
        raise TypeError(
            f"attention_mask: attnopt got {type(attention_mask).__name__} "
            f"{tuple(getattr(attention_mask, 'shape', ()))}; expected an attnopt mask (from the 'attnopt' mask "
            f"function), None, or a 4-D bool/float tensor. Load the model with attn_implementation='attnopt' "
            f"after attnopt.integrations.transformers.register() so both functions are used."
        )
    cap, sinks = _softcap_and_sinks(softcap, s_aux, query.dtype)
    mods = cap + mods  # transformers caps the raw scores, then adds the mask (gemma2): cap first
    out = ao.attention(
        query,
        key,
        value,
        mask=mask,
        score_mod=mods or None,
        scale=scaling,
        sinks=sinks,
        dropout_p=float(dropout),
    )
    weights = None
    if output_attentions:
        weights = attention_weights(query, key, mask=mask, score_mod=mods or None, scale=scaling, sinks=sinks)
        if weights.shape[-1] < Sk:  # unfilled slots of a preallocated buffer get weight 0, as with eager
            weights = torch.nn.functional.pad(weights, (0, Sk - weights.shape[-1]))
    return out.transpose(1, 2).contiguous(), weights


def _softcap_and_sinks(
    softcap: float | None, s_aux: Tensor | None, dtype: torch.dtype
) -> tuple[list[Mods.ScoreMod], Tensor | None]:
    """transformers' ``softcap`` and ``s_aux`` as attnopt arguments: ([softcap] or [], sinks (Hq,) or None).

    ``s_aux`` holds gpt-oss style learnable sinks, one logit per query head.
    """
    cap: list[Mods.ScoreMod] = [Mods.softcap(float(softcap))] if softcap else []
    return cap, None if s_aux is None else s_aux.reshape(-1).to(dtype)


def _check_dense_weights(q: Tensor, k: Tensor) -> None:
    """output_attentions=True materializes (B, Hq, Sq, Sk) weights (plus an (Sk, Sk) identity): refuse
    before any compute when the device cannot hold them, and say what gives the same views in O(N)."""
    B, Hq, Sq, Sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    need = (B * Hq * Sq * Sk + Sk * Sk) * q.element_size()
    free = available_memory(q.device)
    if need > free:
        raise ValueError(
            f"output_attentions=True: the dense weights of this layer, (B={B}, Hq={Hq}, Sq={Sq}, Sk={Sk}) in "
            f"{q.dtype}, need {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free. attnopt.maps.record "
            f"gives pooled maps, received attention, entropy and exact rows of every layer in O(N) memory."
        )


def attention_weights(q: Tensor, k: Tensor, **kwargs: Any) -> Tensor:
    """The (B, Hq, Sq, Sk) softmax weights of attnopt.attention(q, k, ·, **kwargs), exactly.

    Attention with the identity as values returns the weights themselves: out = P @ I = P. This
    materializes O(Sq·Sk) per head, which is what the caller asked for.
    """
    B, Hkv, Sk = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(Sk, dtype=q.dtype, device=q.device).expand(B, Hkv, Sk, Sk)
    with ao.api.unobserved():  # not a layer of its own for attnopt.maps.record
        return ao.attention(q, k, eye, **kwargs)


# ----------------------------------------------------------------------------------------- caches

# kind -> its options with their defaults
CACHE_KINDS: dict[str, dict[str, Any]] = {
    "growing": {"initial": 256, "growth": 2.0},
    "static": {"max_length": None},  # None: the model's max_position_embeddings
    "streaming": {"sinks": 4, "window": 1024},
}


def make_cache(model: Any, kind: str = "growing", **options: Any) -> Any:
    """A transformers ``Cache`` of attnopt layers for ``model``: pass it as ``generate(..., cache=...)``.

    kind: "growing" (options ``initial=256``, ``growth=2.0``), "static" (``max_length``, default the
    model's ``max_position_embeddings``) or "streaming" (``sinks=4``, ``window=1024``; positions are
    re-assigned inside the cache through the model's rotary embedding, so generation runs past the
    model's context at constant memory and time per token). Sliding-window layers of hybrid models get
    a ring of their window in every kind (no roll and copy per step). Works with any attention
    implementation; with ``attn_implementation="attnopt"`` the kernels read the views in place.
    """
    from transformers.cache_utils import Cache, get_layer_types_and_kwargs

    from attnopt.cache.layers import GrowingLayer, PreallocatedLayer, RingLayer, SinkRotation

    if kind not in CACHE_KINDS:
        raise ValueError(f"kind={kind!r} is not a cache kind; use one of {sorted(CACHE_KINDS)}")
    defaults = CACHE_KINDS[kind]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"make_cache(kind={kind!r}) got unknown option(s) {unknown}; its options are {sorted(defaults)}"
        )
    opts = {**defaults, **options}
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise TypeError(f"model must be a transformers model with a config, got {type(model).__name__}")
    config = config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    rotary = None
    if kind == "static" and opts["max_length"] is None:
        opts["max_length"] = getattr(config, "max_position_embeddings", None)
        if not isinstance(opts["max_length"], int):
            raise ValueError(
                "make_cache(kind='static'): the model has no max_position_embeddings; pass max_length"
            )
    if kind == "streaming":
        rotary = SinkRotation(_find_rotary(model))  # one table of sink positions per step for all layers

    layers = []
    for i, (lt, kw) in enumerate(zip(layer_types, layer_kwargs)):
        if lt == "sliding_attention":
            layers.append(RingLayer(window=kw["sliding_window"], sliding=True))
        elif lt != "full_attention":
            raise NotImplementedError(
                f"make_cache: layer {i} has type {lt!r}; attnopt caches support 'full_attention' and "
                f"'sliding_attention' layers (use transformers' DynamicCache for this model)"
            )
        elif kind == "growing":
            layers.append(GrowingLayer(initial=opts["initial"], growth=opts["growth"]))
        elif kind == "static":
            layers.append(PreallocatedLayer(max_length=opts["max_length"]))
        else:
            layers.append(RingLayer(window=opts["window"], sinks=opts["sinks"], rotary=rotary))
    return Cache(layers=layers)


def _find_rotary(model: Any) -> Callable:
    """The model's rotary embedding module (``model.model.rotary_emb`` in LLaMA-style models)."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not callable(rotary):
        raise ValueError(
            f"make_cache(kind='streaming') needs the model's rotary embedding to re-assign positions inside "
            f"the cache; {type(model).__name__} has no `.model.rotary_emb` (a LLaMA-style RoPE model is needed)"
        )
    return rotary
