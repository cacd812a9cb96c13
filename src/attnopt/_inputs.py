"""AttentionInputs and validate(): the one place user input is checked.

After validate() returns, backends trust their inputs. Every error names the argument, the value
received and what is allowed, prints the q/k/v shapes, and ends with a HINT line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from . import masks as M
from . import mods as Mods

SIMILARITIES = ("dot", "cosine", "euclidean")
FLOAT_DTYPES = M.FLOAT_DTYPES  # the dtypes q, k, v, sinks, biases and slopes may have


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """Validated inputs of one attention call. Shapes: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: M.Mask | None
    mods: tuple[Mods.ScoreMod, ...]
    similarity: str
    scale: float
    sinks: Tensor | None
    dropout_p: float
    return_lse: bool
    # Key chunks for split-KV decode (FlashAttention's num_splits): None = automatic, 1 = never split,
    # n >= 2 = n chunks. Only backends that split the keys (splits_keys) accept n >= 2.
    num_splits: int | None = None

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def Hq(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def Sq(self) -> int:
        return self.q.shape[2]

    @property
    def Sk(self) -> int:
        return self.k.shape[2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

    @property
    def Dv(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @functools.cached_property
    def ctx(self) -> M.MaskContext:
        return M.MaskContext(self.B, self.Hq, self.Sq, self.Sk, self.device)

    @functools.cached_property  # read once per call (every backend asks; this is on the decode hot path)
    def requires_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in (self.q, self.k, self.v, *self.mod_tensors))

    @property
    def mod_tensors(self) -> list[Tensor]:
        """Tensors besides q, k, v that gradients can reach: sinks, then the modifiers' (mods.grad_tensors)."""
        sinks = [self.sinks] if isinstance(self.sinks, Tensor) else []
        return [*sinks, *Mods.grad_tensors(self.mods)]

    @property
    def empty(self) -> bool:
        """No output element or no key: attention() answers without a backend (zeros, lse -inf)."""
        return self.B * self.Hq * self.Sq == 0 or self.Sk == 0

    @functools.cached_property
    def may_mask(self) -> bool:
        """Some score may be excluded: a mask, or a modifier that can return -inf (a bias, a custom one)."""
        return self.mask is not None or any(isinstance(m, (Mods.bias, Mods.custom)) for m in self.mods)

    @functools.cached_property
    def _scan(self) -> tuple[bool, float, float]:
        """One read of q, k and v (a host sync): (any NaN/inf, max row norm of q, of k).

        Row norms of q and k turn NaN/inf into NaN/inf (so does the sum of v, and an overflow, which
        only costs speed); the norms bound the scores. Non-finite entries count as 0 in the norms:
        masked out they never score, kept they make their row NaN whatever the bound says.
        """
        acc = scan_dtype(self.dtype)

        def max_norm(t: Tensor) -> Tensor:
            return torch.linalg.vector_norm(t.detach(), dim=-1, dtype=acc).amax().double()

        stats = torch.stack([max_norm(self.q), max_norm(self.k), self.v.detach().sum(dtype=acc).double()])
        qn, kn, vs = stats.tolist()
        bad = not all(math.isfinite(x) for x in (qn, kn, vs))
        if bad:
            qn, kn = (float(max_norm(t.detach().nan_to_num(0, 0, 0))) for t in (self.q, self.k))
        return bad, qn, kn

    @property
    def nonfinite(self) -> bool:
        """q, k or v hold NaN or inf somewhere (or v's float32 sum overflows)."""
        return False if self.empty else self._scan[0]

    @functools.cached_property
    def score_bound(self) -> float:
        """A bound on |row max| of the scores, the size of the LSE (norms of q and k, bias row maxima).

        Used by the fused kernels, whose float32 LSE cannot carry a backward at huge scores (see
        backends._base.FUSED_SCORE_LIMIT).
        """
        if self.empty:
            return 0.0
        _, qn, kn = self._scan
        if self.similarity == "cosine":
            bound = self.scale
        else:
            bound = self.scale * (qn * kn if self.similarity == "dot" else (qn + kn) ** 2)
        for mod in self.mods:
            if isinstance(mod, Mods.bias) and mod.bias.numel():
                # The row max moves by at most the largest bias up, and down by at most the lowest of
                # the rows' largest finite bias (an additive padding mask with finfo.min entries keeps
                # 0 somewhere in each row: no move; a row that is finfo.min throughout: a huge one).
                b = mod.bias.detach().to(torch.float64)
                b = torch.where(torch.isfinite(b), b, -math.inf)
                row_max = b.amax(-1)
                row_max = row_max[row_max > -math.inf]
                if row_max.numel():
                    bound += max(float(row_max.amax()), -float(row_max.amin()), 0.0)
            elif isinstance(mod, Mods.alibi):
                # ALiBi only lowers scores, by slope * distance. Query positions run over [p0, p0 + Sq)
                # and keys over [0, Sk): the farthest a row's nearest key can be is below (masks that
                # hide it are not accounted for). p0 = Sk - Sq (bottom-right) or 0, plus the shift.
                p0 = self.ctx.offset(mod.align) + mod.shift
                far = max(0, p0 + self.Sq - self.Sk, -p0)
                bound += float(mod.slopes.detach().abs().amax()) * far
            elif isinstance(mod, Mods.softcap):
                bound = min(bound, mod.cap)
            else:
                bound = math.inf
        return bound if not math.isnan(bound) else math.inf

    def kernel_layout(self) -> tuple[AttentionInputs, tuple[str, ...]]:
        """These inputs with q/k/v copied where torch's fused kernels would misread their strides.

        Returns (inputs, notes); the common layouts (contiguous, (B, S, H, D) storage, sliced, expanded
        along batch/heads/sequence) are never copied. Copies are differentiable views of the originals.
        """
        copies, notes = {}, []
        for name in ("q", "k", "v"):
            t = getattr(self, name)
            why = kernel_layout_problem(t)
            if why is not None:
                copies[name] = t.contiguous()
                notes.append(f"{name} copied to a contiguous layout ({why})")
        if not copies:
            return self, ()
        return dataclasses.replace(self, **copies), tuple(notes)

    def describe(self) -> str:
        parts = [f"q {_desc(self.q)}", f"k {_desc(self.k)}", f"v {_desc(self.v)}"]
        if self.mask is not None:
            parts.append(f"mask={self.mask!r}")
        if self.mods:
            parts.append(f"score_mod={list(self.mods)!r}")
        if self.similarity != "dot":
            parts.append(f"similarity={self.similarity!r}")
        if self.sinks is not None:
            parts.append(f"sinks=({self.sinks.numel()},)")
        if self.dropout_p:
            parts.append(f"dropout_p={self.dropout_p}")
        if self.return_lse:
            parts.append("return_lse=True")
        if self.num_splits is not None:
            parts.append(f"num_splits={self.num_splits}")
        return ", ".join(parts)


NUM_SPLITS_HINT = "None splits the keys automatically, 1 never splits them, n >= 2 uses n key chunks"


def num_splits_problem(num_splits: object) -> tuple[type[Exception], str] | None:
    """(exception type, message) if num_splits is not None or an int >= 1 (bool is not an int here)."""
    if num_splits is None:
        return None
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        return TypeError, f"num_splits must be an int or None, got {type(num_splits).__name__} {num_splits!r}"
    if num_splits < 1:
        return ValueError, f"num_splits={num_splits} must be >= 1 (or None)"
    return None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores, softmax, LSE and biases are computed in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scan_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype data checks reduce in: the input's own (bf16 has float32's range, and reducing it
    natively is 2-6x faster than converting), float32 for float16 (whose sums overflow at 65504)."""
    return torch.float32 if dtype == torch.float16 else dtype


def kernel_layout_problem(t: Tensor) -> str | None:
    """Why torch's fused CPU kernels would misread `t` (B, H, S, D), or None if they read it right.

    Measured on torch 2.13 (forward and backward of _scaled_dot_product_flash_attention_for_cpu, 400
    random stride patterns, vs the same values contiguous): exact when the last dim has stride 1 and
    every other dim of size > 1 has stride 0 (broadcast) or >= D. A transposed last dim, channels-last
    strides or a stride below D (self-overlapping rows) gave garbage or NaN; F.scaled_dot_product_attention
    was wrong too for such a q (off by 4.5 on a batch stride of 1).
    """
    if t.is_contiguous():  # the common case, answered in C
        return None
    D = t.shape[-1]
    if D > 1 and t.stride(-1) != 1:
        return f"last-dim stride {t.stride(-1)} != 1"
    for dim, (size, stride) in enumerate(zip(t.shape[:-1], t.stride()[:-1])):
        if size > 1 and 0 < stride < D:
            return f"dim {dim} has stride {stride} < head dim {D}: its rows overlap"
    return None


def _desc(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {t.device}"
    return type(t).__name__


def _fail(kind: type[Exception], msg: str, q: object, k: object, v: object, hint: str) -> Exception:
    return kind(f"{msg}\n  q {_desc(q)}, k {_desc(k)}, v {_desc(v)}\nHINT: {hint}")


def validate(
    q: object,
    k: object,
    v: object,
    *,
    mask: object = None,
    score_mod: object = None,
    similarity: object = "dot",
    scale: object = None,
    sinks: object = None,
    dropout_p: object = 0.0,
    return_lse: object = False,
    backend: object = "auto",
    backends: Collection[str] = (),
    num_splits: object = None,
) -> AttentionInputs:
    """Check every argument of attention(); raise TypeError/ValueError before any compute."""

    def fail(kind: type[Exception], msg: str, hint: str) -> Exception:
        return _fail(kind, msg, q, k, v, hint)

    layout = "q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise fail(
                TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}", f"pass tensors {layout}"
            )
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise fail(
                ValueError,
                f"{name}.ndim={t.ndim}; expected 4",
                f"use the layout {layout}; for (B, S, H, D) tensors call .transpose(1, 2)",
            )
        if not t.dtype.is_floating_point:
            raise fail(
                TypeError,
                f"{name}.dtype={t.dtype}; expected a floating dtype",
                "use float16, bfloat16, float32 or float64",
            )
        if t.dtype not in FLOAT_DTYPES:
            raise fail(
                TypeError,
                f"{name}.dtype={t.dtype} is not supported; allowed: float16, bfloat16, float32, float64",
                "cast q, k and v to one of these (float8 / complex inputs have no attention kernels here)",
            )
        if t.shape[3] == 0:
            raise fail(
                ValueError,
                f"{name} has head dim 0, shape {tuple(t.shape)}",
                "the head dim (last dimension) must be >= 1; empty batch, head and sequence dims are fine",
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise fail(
            TypeError, f"mixed dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}", "cast q, k and v to one dtype"
        )
    if not (q.device == k.device == v.device):
        raise fail(
            ValueError,
            f"mixed devices q={q.device}, k={k.device}, v={v.device}",
            "move q, k and v to one device",
        )
    B, Hq, Sq, D = q.shape
    if not (k.shape[0] == v.shape[0] == B):
        raise fail(
            ValueError,
            f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}",
            "q, k and v need the same batch size B",
        )
    if k.shape[1] != v.shape[1]:
        raise fail(
            ValueError, f"k has {k.shape[1]} heads but v has {v.shape[1]}", "k and v need the same Hkv"
        )
    Hkv = k.shape[1]
    if Hkv == 0 and Hq:
        raise fail(
            ValueError,
            f"k and v have no heads (Hkv=0) but q has Hq={Hq}",
            "every query head needs a kv head (query head h uses kv head h // (Hq // Hkv))",
        )
    if Hkv and Hq % Hkv:
        raise fail(
            ValueError,
            f"Hq={Hq} is not a multiple of Hkv={Hkv}",
            "grouped-query attention needs Hq % Hkv == 0 (query head h uses kv head h // (Hq // Hkv))",
        )
    if k.shape[2] != v.shape[2]:
        raise fail(
            ValueError,
            f"k has Sk={k.shape[2]} keys but v has {v.shape[2]} values",
            "k and v need the same sequence length",
        )
    if k.shape[3] != D:
        raise fail(
            ValueError,
            f"head dims differ: q D={D}, k D={k.shape[3]}",
            "q and k need the same head dim (v may differ)",
        )
    Sk = k.shape[2]

    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise fail(
            TypeError,
            f"dropout_p must be a float, got {type(dropout_p).__name__} {dropout_p!r}",
            "use 0.0 <= dropout_p < 1",
        )
    if not (0.0 <= dropout_p < 1.0):
        raise fail(
            ValueError, f"dropout_p={dropout_p} is outside [0, 1)", "use 0.0 (inference) up to e.g. 0.1"
        )
    if not isinstance(backend, str) or (backend != "auto" and backend not in backends):
        raise fail(
            ValueError,
            f"backend={backend!r} is unknown; allowed: 'auto', " + ", ".join(map(repr, backends)),
            "use backend='auto' unless you need a specific one",
        )
    if not isinstance(similarity, str) or similarity not in SIMILARITIES:
        raise fail(
            ValueError,
            f"similarity={similarity!r} is unknown; allowed: {SIMILARITIES}",
            "'dot' is the usual scaled dot product",
        )
    if not isinstance(return_lse, bool):
        raise fail(
            TypeError, f"return_lse must be a bool, got {type(return_lse).__name__}", "pass True or False"
        )

    problem = num_splits_problem(num_splits)
    if problem is not None:
        raise fail(*problem, NUM_SPLITS_HINT)

    if scale is None:
        scale_f = 1.0 / math.sqrt(D)  # the HEAD dim, not the hidden size (see docs/theory.md)
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise fail(
                TypeError,
                f"scale must be a number or None, got {type(scale).__name__} {scale!r}",
                "pass a Python float (None = 1/sqrt(D))",
            )
        try:
            scale_f = float(scale)
        except OverflowError:  # an int too large for a float
            scale_f = math.inf
        if not (math.isfinite(scale_f) and scale_f > 0):
            raise fail(ValueError, f"scale={scale} must be finite and > 0", "None uses 1/sqrt(D)")

    mask_d = _as_mask(mask, fail)
    mods = _as_mods(score_mod, fail)
    ctx = M.MaskContext(B, Hq, Sq, Sk, q.device) if mask_d is not None or mods else None
    if mask_d is not None:
        problems = mask_d.check(ctx)
        if problems:
            raise fail(ValueError, "mask: " + "; ".join(problems), "see the attnopt.masks docstrings")

    for mod in mods:
        problems = mod.check(ctx)
        if problems:
            raise fail(ValueError, "score_mod: " + "; ".join(problems), "see the attnopt.mods docstrings")

    if sinks is not None:
        if not isinstance(sinks, Tensor) or sinks.dtype not in FLOAT_DTYPES:
            got = sinks.dtype if isinstance(sinks, Tensor) else type(sinks).__name__
            raise fail(
                TypeError,
                f"sinks must be a floating tensor of shape (Hq,), got {got}",
                "sinks are per-head learnable logits, e.g. torch.zeros(Hq, requires_grad=True)",
            )
        if tuple(sinks.shape) != (Hq,):
            raise fail(
                ValueError,
                f"sinks shape {tuple(sinks.shape)}; expected (Hq,)=({Hq},)",
                "one sink logit per query head",
            )
        if sinks.device != q.device:
            raise fail(
                ValueError, f"sinks are on {sinks.device} but q is on {q.device}", "move sinks to q's device"
            )
        if sinks.device.type != "meta":
            bad = torch.isnan(sinks.detach()) | (sinks.detach() == math.inf)
            if bool(bad.any()):
                raise fail(
                    ValueError,
                    f"sinks hold NaN or +inf at heads {bad.nonzero().flatten().tolist()}",
                    "a sink is a finite logit per head (-inf means no sink); +inf would take all the mass",
                )

    return AttentionInputs(
        q, k, v, mask_d, mods, similarity, scale_f, sinks, float(dropout_p), return_lse, num_splits
    )


def _as_mask(mask: object, fail: Callable[..., Exception]) -> M.Mask | None:
    if mask is None or isinstance(mask, M.Mask):
        return mask
    if isinstance(mask, Tensor):
        if mask.dtype == torch.bool:
            return M.dense(mask)  # SDPA users pass bool attn_mask tensors: same meaning (True = keep)
        raise fail(
            TypeError,
            f"mask is a {mask.dtype} tensor; a tensor mask must be torch.bool (True = keep)",
            "for additive float scores use score_mod=attnopt.mods.bias(tensor)",
        )
    if isinstance(mask, type) and issubclass(mask, M.Mask):
        raise fail(
            TypeError,
            f"mask={mask.__name__} is the class, not a mask",
            f"call it: mask=attnopt.masks.{mask.__name__}(...)",
        )
    if isinstance(mask, Mods.ScoreMod):
        raise fail(
            TypeError, f"mask={mask!r} is a score modifier, not a mask", f"pass it as score_mod={mask!r}"
        )
    if callable(mask):
        return M.custom(mask)  # a FlexAttention-style mask_mod(b, h, i, j)
    raise fail(
        TypeError,
        f"mask must be an attnopt.masks descriptor, got {type(mask).__name__}",
        "e.g. mask=attnopt.masks.causal() or attnopt.masks.sliding_window(255)",
    )


def _as_mods(score_mod: object, fail: Callable[..., Exception]) -> tuple[Mods.ScoreMod, ...]:
    if score_mod is None:
        return ()
    items = list(score_mod) if isinstance(score_mod, (list, tuple)) else [score_mod]
    out = []
    for m in items:
        if isinstance(m, (type, M.Mask)):
            raise fail(
                TypeError,
                f"score_mod entry {m!r} is not a score modifier instance",
                "masks go to mask=; modifiers are instances such as attnopt.mods.softcap(30.0)",
            )
        if isinstance(m, Mods.ScoreMod):
            out.append(m)
        elif callable(m):
            out.append(Mods.custom(m))  # a FlexAttention-style score_mod(score, b, h, i, j)
        else:
            raise fail(
                TypeError,
                f"score_mod entries must be attnopt.mods modifiers, got {type(m).__name__}",
                "e.g. score_mod=attnopt.mods.softcap(30.0) or a list of modifiers",
            )
    return tuple(out)
