"""flex: compiled FlexAttention (C++ on CPU, Triton on CUDA) over attnopt's analytic block metadata.

The mask is lowered by ``attnopt.blockmask`` (no evaluation over Sq × Sk for structured masks, no compile
for the metadata); the modifiers become one ``score_mod``. Each *structure* (device, dtype, head dims,
heads, the mask's kind, the modifiers' kinds, similarity, scale, LSE / sinks, grad) gets its own compiled
function with dynamic shapes: a new sequence length or batch reuses the kernel. Every compile is counted
per structure; a second compile of a warm structure (a recompile) is counted and warned about; a
structure that would reach torch's recompile limit (where Dynamo falls back to an O(N²) eager path) is
refused instead, with the reason. ``backend="auto"`` uses this backend only for warm structures (see
``attnopt.compile_for``): it never compiles on the call path.

On CPU, torch 2.13's Flex kernel is forward-only and returns no LSE: gradients come from a rerun of the
call on the exact backends (attnopt.api), and ``return_lse`` / ``sinks`` are refused with that reason.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import masks as M
from .. import mods as Mods
from .._inputs import AttentionInputs
from .._torch_fixes import fix_flex_cpu_template_renaming
from ..blockmask import BLOCK, Lowered, lower, row_intervals
from ._base import Backend, fused_data_reasons, unit_qk

_LOCK = threading.Lock()


@dataclass
class KernelStats:
    """What one structure's compiled kernel has done: compiles (the first one, then recompiles), calls,
    seconds spent compiling, and the error that made it unusable (if any)."""

    compiles: int = 0
    calls: int = 0
    compile_seconds: float = 0.0
    failed: str | None = None
    fn: Callable[..., Any] | None = field(default=None, repr=False)
    # the size-1 patterns that ran (see _signature): auto takes a call only if its pattern is among them
    signatures: set = field(default_factory=set, repr=False)

    @property
    def recompiles(self) -> int:
        return max(self.compiles - 1, 0)

    @property
    def warm(self) -> bool:
        return self.compiles > 0 and self.failed is None


_KERNELS: dict[tuple, KernelStats] = {}
MAX_STRUCTURES = 64  # compiled kernels kept per process (each holds its user functions alive)


def stats() -> dict[tuple, KernelStats]:
    """Every structure compiled in this process and its counters (a copy of the table)."""
    with _LOCK:
        return dict(_KERNELS)


def _recompile_limit() -> int:
    return int(getattr(torch._dynamo.config, "recompile_limit", 8))


# ---------------------------------------------------------------------------------------------------
# Structure: what a compiled kernel depends on (everything else is a tensor argument with dynamic shape).


def _mask_kind(mask: M.Mask | None) -> tuple | None:
    """Static description of the mask's in-tile predicate (a tree of leaf kinds), or None if flex has
    no predicate for it. Values (offsets, windows, lengths, document tables) are tensor arguments."""
    if mask is None:
        return ("none",)
    kind = type(mask)  # exact types: a subclass may keep() differently from the arithmetic below
    if kind in (M.And, M.Or):
        a, b = _mask_kind(mask.a), _mask_kind(mask.b)  # type: ignore[attr-defined]
        if a is None or b is None or "dense" in (a[0], b[0]):
            return None
        return ("and" if kind is M.And else "or", a, b)
    if kind is M.cache_causal:
        return ("cache_causal", mask.left is not None)  # type: ignore[attr-defined]
    if kind in _LEAVES:
        return (kind.__name__,)
    if kind is M.dense:
        return ("dense",)
    if kind is M.custom:
        return ("custom", _Same(mask.fn))  # type: ignore[attr-defined]
    return None


class _Same:
    """A user function in a structure key, compared by identity (it may be unhashable or compare equal
    to another one that computes something else; the key keeps it alive, so its id is never reused)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __eq__(self, other):
        return isinstance(other, _Same) and other.fn is self.fn

    def __hash__(self):
        return id(self.fn)


_LEAVES = (M.causal, M.sliding_window, M.prefix_lm, M.padding, M.left_padding, M.document, M.document_causal)


def _mask_params(mask: M.Mask, ctx: M.MaskContext) -> tuple:
    """The tensors the predicate of _mask_kind(mask) reads, in tree order (0-d int64 scalars; (B,)
    lengths; (Sq,) row tables for documents). No table has a length of its own: torch 2.13's CPU Flex
    template renames size symbols in a mask_mod's code textually, which breaks on fresh ones."""
    dev = ctx.device

    def scalar(x: int) -> Tensor:
        return torch.tensor(int(x), device=dev)

    if isinstance(mask, (M.And, M.Or)):
        return (*_mask_params(mask.a, ctx), *_mask_params(mask.b, ctx))
    if isinstance(mask, M.causal):
        return (scalar(ctx.offset(mask.align)),)
    if isinstance(mask, M.sliding_window):
        return (scalar(ctx.offset(mask.align) - mask.left), scalar(ctx.offset(mask.align) + mask.right))
    if isinstance(mask, M.prefix_lm):
        return (scalar(mask.prefix_len), scalar(ctx.offset(mask.align)))
    if isinstance(mask, M.padding):
        return (_canon(mask.kv_lengths.to(dev, torch.long)),)
    if isinstance(mask, M.left_padding):
        return (_canon(mask.pad_lengths.to(dev, torch.long)),)
    if isinstance(mask, M.cache_causal):
        shift = _canon(mask.kv_lengths.to(dev, torch.long) - ctx.Sq)  # (B,): query i sits at shift[b] + i
        return (shift,) if mask.left is None else (shift, scalar(mask.left))
    if isinstance(mask, (M.document, M.document_causal)):
        lo, hi = row_intervals(mask, ctx)  # type: ignore[misc]
        return (lo[0, 0].contiguous(), hi[0, 0].contiguous())
    if isinstance(mask, M.dense):
        return (_canon(mask.mask),)
    return ()


_N_LEAF_PARAMS = {
    "none": 0,
    "custom": 0,
    "dense": 1,
    "causal": 1,
    "sliding_window": 2,
    "prefix_lm": 2,
    "padding": 1,
    "left_padding": 1,
    "document": 2,
    "document_causal": 2,
}
_N_MOD_PARAMS = {"alibi": 2, "softcap": 1, "bias": 1, "custom": 0}


def _n_mask_params(kind: tuple) -> int:
    if kind[0] in ("and", "or"):
        return _n_mask_params(kind[1]) + _n_mask_params(kind[2])
    if kind[0] == "cache_causal":
        return 2 if kind[1] else 1
    return _N_LEAF_PARAMS[kind[0]]


def _mask_mod(kind: tuple, params: list[Tensor], B, Hq, Sq, Sk) -> Callable | None:
    """Build the predicate of ``kind``, taking its tensors from the front of ``params``."""
    name = kind[0]
    if name == "none":
        return None
    if name in ("and", "or"):
        fa = _mask_mod(kind[1], params, B, Hq, Sq, Sk)
        fb = _mask_mod(kind[2], params, B, Hq, Sq, Sk)
        if name == "and":
            return lambda b, h, q, kv: fa(b, h, q, kv) & fb(b, h, q, kv)
        return lambda b, h, q, kv: fa(b, h, q, kv) | fb(b, h, q, kv)
    if name == "custom":
        return kind[1].fn
    if name == "dense":
        t = M.as_4d(params.pop(0)).expand(B, Hq, Sq, Sk)
        return lambda b, h, q, kv: t[b, h, q, kv]
    if name == "causal":
        off = params.pop(0)
        return lambda b, h, q, kv: kv <= q + off
    if name == "sliding_window":
        lo, hi = params.pop(0), params.pop(0)
        return lambda b, h, q, kv: (kv >= q + lo) & (kv <= q + hi)
    if name == "prefix_lm":
        prefix, off = params.pop(0), params.pop(0)
        return lambda b, h, q, kv: (kv < prefix) | (kv <= q + off)
    if name == "padding":
        n = params.pop(0)
        return lambda b, h, q, kv: kv < n[b]
    if name == "left_padding":
        n = params.pop(0)
        return lambda b, h, q, kv: kv >= n[b]
    if name == "cache_causal":
        shift = params.pop(0)
        if not kind[1]:
            return lambda b, h, q, kv: kv <= shift[b] + q
        left = params.pop(0)
        return lambda b, h, q, kv: (kv <= shift[b] + q) & (kv >= shift[b] + q - left)
    lo, hi = params.pop(0), params.pop(0)  # documents: each row's key interval
    return lambda b, h, q, kv: (kv >= lo[q]) & (kv < hi[q])


def _mod_kind(mod: Mods.ScoreMod) -> tuple | None:
    kind = type(mod)  # exact types, as for masks
    if kind is Mods.alibi:
        return ("alibi",)
    if kind is Mods.softcap:
        return ("softcap",)
    if kind is Mods.bias:
        return ("bias",)
    if kind is Mods.custom:
        return ("custom", _Same(mod.fn))  # type: ignore[attr-defined]
    return None


def _structure(inputs: AttentionInputs) -> tuple:
    mods = tuple(_mod_kind(m) for m in inputs.mods)
    return (
        inputs.device.type,
        inputs.device.index,
        inputs.dtype,
        inputs.D,
        inputs.Dv,
        inputs.Hq,
        inputs.Hkv,
        _mask_kind(inputs.mask),
        mods,
        inputs.similarity,
        inputs.scale,
        inputs.sinks is not None,
        bool(inputs.return_lse or inputs.sinks is not None),
        inputs.requires_grad and inputs.device.type != "cpu",  # CPU: inference kernel, grads by rerun
    )


# ---------------------------------------------------------------------------------------------------
# The traced function: builds the BlockMask, mask_mod and score_mod from tensors inside the graph.


def _make_runner(struct: tuple, block: tuple[int, int]) -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    _, _, _, _, _, Hq, Hkv, mask_kind, mod_kinds, similarity, scale, _, want_lse, _ = struct
    G = Hq // Hkv
    euclid = similarity == "euclidean"
    kernel_scale = 2.0 * scale if euclid else scale

    n_meta = 0 if mask_kind[0] == "none" else 8
    n_mods = [_N_MOD_PARAMS[kind[0]] for kind in mod_kinds]

    def run(q, k, v, *flat):  # flat tensors only: Dynamo keeps nested ones' sizes static
        rest = list(flat)
        meta = [rest.pop(0) for _ in range(n_meta)]
        mask_args = [rest.pop(0) for _ in range(_n_mask_params(mask_kind))]
        mod_args = [[rest.pop(0) for _ in range(n)] for n in n_mods]
        norms = rest
        B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
        mask_mod = _mask_mod(mask_kind, mask_args, B, Hq, Sq, Sk)
        fns = []
        for kind, args in zip(mod_kinds, mod_args):
            fns.append(_score_fn(kind, args, B, Hq, Sq, Sk))
        if euclid:  # scale·(2 q·k − |q|² − |k|²): the kernel computes 2·scale·q·k, norms come scaled
            # as broadcast (B, Hq, Sq, Sk) views, indexed like a bias
            qn = norms[0].expand(B, Hq, Sq, Sk)
            kn = norms[1].expand(B, Hq, Sq, Sk)

            def norm_fn(s, b, h, q_idx, kv_idx):
                return s - (qn[b, h, q_idx, kv_idx] + kn[b, h, q_idx, kv_idx])

            fns.insert(0, norm_fn)
        score_mod = None
        if fns:

            def score_mod(s, b, h, q_idx, kv_idx):
                for f in fns:
                    s = f(s, b, h, q_idx, kv_idx)
                return s

        if mask_mod is None:
            block_mask = None
        else:
            kvn, kvi, fkvn, fkvi, qn_, qi, fqn, fqi = meta
            block_mask = BlockMask(
                seq_lengths=(Sq, Sk),
                kv_num_blocks=kvn,
                kv_indices=kvi,
                full_kv_num_blocks=fkvn,
                full_kv_indices=fkvi,
                q_num_blocks=qn_,
                q_indices=qi,
                full_q_num_blocks=fqn,
                full_q_indices=fqi,
                BLOCK_SIZE=block,
                mask_mod=mask_mod,
            )
        return flex_attention(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=kernel_scale,
            enable_gqa=G > 1,
            return_lse=want_lse,
        )

    # A code object of its own per structure: Dynamo's cache and recompile limit are per code object,
    # so structures never evict each other's kernels or share one limit.
    run.__code__ = run.__code__.replace()
    return run


def _score_fn(kind: tuple, args: tuple, B, Hq, Sq, Sk) -> Callable:
    if kind[0] == "alibi":
        slopes, offset = args  # offset: 0-d int64, Sk - Sq (bottom-right) + shift

        def alibi_fn(s, b, h, q_idx, kv_idx):
            return s - slopes[h] * (q_idx + offset - kv_idx).abs().to(s.dtype)

        return alibi_fn
    if kind[0] == "softcap":
        (cap,) = args

        def softcap_fn(s, b, h, q_idx, kv_idx):
            return cap * torch.tanh(s / cap)

        return softcap_fn
    if kind[0] == "bias":
        t = M.as_4d(args[0]).expand(B, Hq, Sq, Sk)

        def bias_fn(s, b, h, q_idx, kv_idx):
            add = t[b, h, q_idx, kv_idx].to(s.dtype)
            return torch.where(add == float("-inf"), add, s + add)

        return bias_fn
    fn = kind[1].fn
    return lambda s, b, h, q_idx, kv_idx: fn(s, b, h, q_idx, kv_idx)


def _counting_backend(stats: KernelStats) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    seen: set = set()

    def backend(gm, example_inputs):
        # one count per Dynamo frame compilation ("0/1"): a compilation that restarts its analysis
        # calls the backend again under the same id (attempt "0/0_1")
        cid = torch._guards.CompileContext.current_compile_id()
        key = (cid.frame_id, cid.frame_compile_id) if cid is not None else object()
        if key not in seen:
            seen.add(key)
            stats.compiles += 1
        return compile_fx(gm, example_inputs)

    return backend


# ---------------------------------------------------------------------------------------------------
# Tensor arguments of one call.


def _signature(inputs: AttentionInputs) -> tuple:
    """What torch.compile specializes on within one structure, past what _args canonicalizes (dtypes,
    strides): which sizes are 1 (batch, lengths, a bias's or dense mask's broadcast dims); on CUDA also
    whether Sq < 128 (Flex's decoding kernel)."""
    shapes = [inputs.q.shape, inputs.k.shape]
    shapes += [_canon_shape(m.bias) for m in inputs.mods if isinstance(m, Mods.bias)]
    shapes += [_canon_shape(leaf.mask) for leaf in _leaves(inputs.mask) if isinstance(leaf, M.dense)]
    sig = tuple((len(s), *(n == 1 for n in s)) for s in shapes)
    return (*sig, inputs.Sq < 128) if inputs.device.type == "cuda" else sig


def _canon_shape(t: Tensor) -> tuple[int, ...]:
    return tuple(1 if st == 0 else n for n, st in zip(t.shape, t.stride()))


def _canon(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """One dtype and one memory layout for a table the kernel reads: a broadcast (stride-0) dim becomes
    a dim of size 1 (never materialized), the rest contiguous. torch.compile guards on dtypes and
    strides, so a bias given as a bf16 tensor, an expanded view or a transpose would recompile."""
    for d in range(t.ndim):
        if t.stride(d) == 0 and t.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return (t if dtype is None else t.to(dtype)).contiguous()


def _leaves(mask: M.Mask | None) -> list[M.Mask]:
    return [] if mask is None else mask.leaves()


def _args(inputs: AttentionInputs, low: Lowered | None):
    # one memory layout whatever the caller's strides (a transposed view, HF's (B, S, H, D) layout):
    # a new stride pattern would recompile the kernel
    q, k, v = (t.contiguous() for t in (inputs.q, inputs.k, inputs.v))
    if inputs.similarity == "cosine":
        q, k = unit_qk(q, k)
    norms: tuple = ()
    if inputs.similarity == "euclidean":
        G = inputs.Hq // inputs.Hkv
        qn, kn = ((t.float() * t.float()).sum(-1) for t in (q, k))
        kn = kn.repeat_interleave(G, dim=1) if G > 1 else kn  # indexed by the query head
        # scale·|q|² (B, Hq, Sq, 1) and scale·|k|² (B, Hq, 1, Sk), in float32; scale multiplies outside the
        # graph (a Python float inside a score_mod becomes a symbolic .item() that Flex cannot lower)
        norms = (
            (qn * inputs.scale).unsqueeze(-1).contiguous(),
            (kn * inputs.scale).unsqueeze(-2).contiguous(),
        )
    meta: tuple = ()
    mask_args: tuple = ()
    if low is not None:
        meta = (
            low.kv_num_blocks,
            low.kv_indices,
            low.full_kv_num_blocks,
            low.full_kv_indices,
            low.q_num_blocks,
            low.q_indices,
            low.full_q_num_blocks,
            low.full_q_indices,
        )
        mask_args = _mask_params(inputs.mask, inputs.ctx)  # type: ignore[arg-type]
    mod_args = []
    for m in inputs.mods:
        if isinstance(m, Mods.alibi):
            off = inputs.ctx.offset(m.align) + m.shift
            mod_args.append((_canon(m.slopes, torch.float32), torch.tensor(off, device=inputs.device)))
        elif isinstance(m, Mods.softcap):
            mod_args.append((torch.tensor(float(m.cap), device=inputs.device),))
        elif isinstance(m, Mods.bias):
            mod_args.append((_canon(m.bias, torch.float32),))  # added in float32 in any case
        else:
            mod_args.append(())
    flat = [*meta, *mask_args, *(t for a in mod_args for t in a), *norms]
    return (q, k, v, *flat)


class FlexBackend(Backend):
    name: ClassVar[str] = "flex"
    description: ClassVar[str] = (
        "compiled FlexAttention (C++ on CPU, Triton on CUDA) on attnopt's analytic block metadata"
    )
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float16, torch.bfloat16, torch.float32})
    supports_dropout: ClassVar[bool] = False
    dense_rows: ClassVar[bool] = False
    block: ClassVar[tuple[int, int]] = (BLOCK, BLOCK)

    @classmethod
    def is_available(cls) -> bool:
        return _availability() is None

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        r = super().not_supported_reasons(inputs)
        why = _availability(inputs.device.type)
        if why is not None and not any("not available" in x for x in r):
            r.append(why)
        cpu = inputs.device.type == "cpu"
        if cpu and inputs.return_lse:
            r.append(
                "return_lse=True on CPU: torch 2.13's Flex CPU kernel returns no log-sum-exp (it raises "
                "'torch.compile on CPU only supports inference and `return_lse` is not supported yet')"
            )
        if cpu and inputs.sinks is not None:
            r.append("sinks on CPU: they are merged through the LSE, which Flex's CPU kernel does not return")
        if inputs.mask is not None and _mask_kind(inputs.mask) is None:
            r.append(
                f"mask={inputs.mask!r}: flex lowers interval descriptors (causal, windows, documents, "
                f"prefix-LM, padding and their &/|), one dense tensor or one custom mask_mod, not a mix"
            )
        bad = [m for m in inputs.mods if _mod_kind(m) is None]
        if bad:
            r.append(f"score_mod {bad[0]!r} has no FlexAttention form")
        if inputs.device.type == "cuda" and max(inputs.D, inputs.Dv) > 256:
            r.append(f"head_dim={max(inputs.D, inputs.Dv)} > 256: beyond Flex's Triton kernels' tiles")
        if inputs.device.type == "cuda" and min(inputs.D, inputs.Dv) < 16:
            r.append(f"head_dim={min(inputs.D, inputs.Dv)} < 16: Flex's Triton kernels need at least 16")
        st = _KERNELS.get(_structure(inputs))
        if st is None and len(_KERNELS) >= MAX_STRUCTURES:
            r.append(
                f"{len(_KERNELS)} kernel structures are compiled in this process (limit {MAX_STRUCTURES}): "
                f"a custom mask_mod / score_mod created anew for every call makes a new structure each time"
            )
        if st is not None and st.failed is not None:
            r.append(f"the compiled kernel for this structure failed: {st.failed}")
        elif st is not None and st.compiles >= _recompile_limit() - 1:
            r.append(
                f"this structure was compiled {st.compiles} times: one more would reach torch's recompile "
                f"limit ({_recompile_limit()}), past which Dynamo runs Flex eagerly over all Sq·Sk scores"
            )
        if not r:
            r += fused_data_reasons(
                inputs, masks=inputs.may_mask, merges=inputs.sinks is not None, own_backward=not cpu
            )
        return r

    def native_backward(self, inputs: AttentionInputs) -> bool:
        return inputs.device.type != "cpu"

    def warm(self, inputs: AttentionInputs) -> bool:
        """A compiled kernel exists for this structure *and* this call's size-1 pattern ran on it (a
        new pattern would recompile: torch.compile specializes sizes of 1)."""
        st = _KERNELS.get(_structure(inputs))
        return st is not None and st.warm and _signature(inputs) in st.signatures

    def rank(self, inputs: AttentionInputs) -> float:
        if not self.warm(inputs):
            return math.inf  # auto never compiles on the call path (attnopt.compile_for warms)
        if inputs.device.type == "cuda":
            return 8.0  # ahead of blockwise (PyTorch tiles) and of SDPA with a materialized mask
        return _cpu_rank(inputs)

    def plan(self, inputs: AttentionInputs) -> str:
        low = self._lower(inputs)
        st = _KERNELS.get(_structure(inputs))
        cold = "compiles on the first pinned call or attnopt.compile_for(...); auto does not wait for it"
        if st is not None and st.failed:
            kernel = f"kernel failed: {st.failed}"
        elif st is None or not st.warm:
            kernel = f"kernel cold: {cold}"
        else:
            counts = (
                f"{st.compiles} compile{'s' if st.compiles != 1 else ''}, {st.recompiles} "
                f"recompile{'s' if st.recompiles != 1 else ''}, {st.calls} calls"
            )
            if self.warm(inputs):
                kernel = f"kernel warm ({counts})"
            else:
                kernel = (
                    f"kernel compiled ({counts}) but not for this call's sizes of 1 (batch, lengths or "
                    f"broadcast dims), which torch.compile specializes: it {cold}"
                )
        how = "no mask"
        if low is not None:
            kept = int(low.kv_num_blocks.sum()) + int(low.full_kv_num_blocks.sum())
            full = int(low.full_kv_num_blocks.sum())
            nQ, nK = -(-inputs.Sq // low.block[0]), -(-inputs.Sk // low.block[1])
            total = nQ * nK * low.kv_num_blocks[..., 0].numel()
            how = (
                f"{low.block[0]}x{low.block[1]} blocks from the mask's {low.path} "
                f"({kept}/{total} kept, {full} without mask_mod)"
            )
        return f"{self.description}; {how}; {kernel}"

    def _lower(self, inputs: AttentionInputs) -> Lowered | None:
        # >= 2 blocks each way: a compiled kernel specializes tables of one row (a recompile otherwise)
        return None if inputs.mask is None else lower(inputs.mask, inputs.ctx, self.block, for_kernel=True)

    def forward(self, inputs: AttentionInputs) -> tuple[Tensor, Tensor | None]:
        key = _structure(inputs)
        with _LOCK:
            st = _KERNELS.setdefault(key, KernelStats())
            if st.fn is None:
                st.fn = torch.compile(
                    _make_runner(key, self.block), dynamic=True, fullgraph=True, backend=_counting_backend(st)
                )
        if st.failed is not None:
            raise RuntimeError(
                f"attnopt flex: the compiled kernel for this structure failed before: {st.failed}"
            )
        low = self._lower(inputs)
        args = _args(inputs, low)
        before, t0 = st.compiles, time.perf_counter()
        cfg = _compile_config()
        try:
            with cfg:
                if inputs.device.type == "cpu":  # inference only: api reruns the exact path for gradients
                    with torch.no_grad():
                        res = st.fn(*(a.detach() for a in args))
                else:
                    res = st.fn(*args)
        except Exception as e:  # a compile error: remembered, so auto stops offering this structure
            st.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            raise
        if st.compiles > before:
            st.compile_seconds += time.perf_counter() - t0
            if before > 0:
                warnings.warn(
                    f"attnopt flex: recompiled the kernel for this structure ({st.compiles} compiles; "
                    f"{inputs.describe()}); torch.compile specialized on something that changed "
                    f"(a size of 0 or 1, a head count, a custom function)",
                    stacklevel=3,
                )
        st.calls += 1
        st.signatures.add(_signature(inputs))
        out, lse = res if isinstance(res, tuple) else (res, None)
        if inputs.sinks is not None:
            assert lse is not None
            sink = inputs.sinks.float().view(1, -1, 1)
            total = torch.logaddexp(lse, sink)
            out = (out.float() * torch.exp(lse - total).unsqueeze(-1)).to(inputs.dtype)
            lse = total
        return out, (lse if inputs.return_lse else None)


def _compile_config():
    """Settings for our compiles only (read while Dynamo and Inductor compile, in this thread).

    No duck sizing: sizes that happen to be equal (Sq == Sk, as many query as key blocks, a batch of 2
    and 2 blocks) get symbols of their own, so a later call where they differ reuses the kernel.
    """
    import torch.fx.experimental._config as fx_config

    fix_flex_cpu_template_renaming()
    return fx_config.patch(use_duck_shape=False)


def _cpu_rank(inputs: AttentionInputs) -> float:
    """Where a warm kernel beats the other backends on this 2-core CPU (B=1, H=8, D=64, N=4096, warm,
    same runs, 2026-12-01 15:20-15:25; scripts/bench_flex_cpu.py): ms flex vs the best other.

    * a bias with a mask (SDPA materializes both, span slices the bias per block): fp32 221 vs SDPA 620
      (span 1686); bf16 350 vs 637 -> ahead of both;
    * ALiBi + causal: fp32 180 vs span 212, but bf16 280 vs 192 -> ahead of span in fp32 only;
    * softcap / custom score_mod / euclidean (blockwise otherwise): softcap + causal fp32 227 vs 336;
    * masks alone: documents fp32 49 vs span 50 but bf16 83 vs 54; window 256 bf16 N=8192 106 vs 64;
      prefix-LM fp32 180 vs 155; causal 170 vs SDPA 127 -> behind span and SDPA.
    With gradients the kernel's forward is followed by a rerun on another backend: last resort.
    """
    if inputs.requires_grad:
        return 30.0
    if inputs.similarity == "euclidean" or any(
        isinstance(m, (Mods.softcap, Mods.custom)) for m in inputs.mods
    ):
        return 15.0  # ahead of blockwise (20)
    if inputs.mask is not None and any(isinstance(m, Mods.bias) for m in inputs.mods):
        return 8.0  # ahead of span (10) and materializing SDPA (40 on long, 5 below 512² where it wins)
    if inputs.dtype == torch.float32 and any(isinstance(m, Mods.alibi) for m in inputs.mods):
        return 9.0
    return 12.0  # behind span (10)


_AVAIL: dict[str, str | None] = {}


def _availability(device: str | None = None) -> str | None:
    """None if flex can run (on `device`, or anywhere), else why not."""
    if device is None:
        return None if _availability("cpu") is None or _availability("cuda") is None else _availability("cpu")
    if device in _AVAIL:
        return _AVAIL[device]
    why = None
    try:
        import torch.nn.attention.flex_attention
    except ImportError as e:  # pragma: no cover - torch 2.13 has it
        why = f"torch.nn.attention.flex_attention is missing ({e})"
    if why is None and device == "cpu":
        from torch._inductor import config as ic

        cxx = ic.cpp.cxx[-1] if isinstance(ic.cpp.cxx, tuple) else ic.cpp.cxx
        found = cxx is not None and shutil.which(str(cxx)) is not None
        if not found and shutil.which("g++") is None and shutil.which("clang++") is None:
            why = "no C++ compiler found (Flex's CPU kernels are compiled C++: install g++)"
    if why is None and device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            why = "triton is not installed (Flex's CUDA kernels are Triton)"
        if why is None and not torch.cuda.is_available():
            why = "no CUDA device"
    if device not in ("cpu", "cuda"):
        why = f"device={device}: flex runs on cpu and cuda"
    _AVAIL[device] = why
    return why
