"""torch's fused kernels (F.scaled_dot_product_attention) for the variants that map onto them.

Native: no mask; causal (top-left, or bottom-right with Sq == Sk, Sq == 1 or Sq > Sk); a user's bool
tensor; key padding, left or right (a (B, 1, 1, Sk) mask, O(B·Sk)); one user bias tensor; GQA (enable_gqa); dot and
cosine similarity; dropout. Any other mask is materialized as a bool tensor (O(Sq·Sk) memory; still far
cheaper than the dense reference, and explain() says so). Declines other score modifiers, sinks, the
LSE and euclidean similarity.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._inputs import AttentionInputs, acc_dtype, scan_dtype
from ..masks import as_4d, causal, dense
from ..mods import bias
from ._base import Backend, fused_data_reasons, unit_qk


class SdpaBackend(Backend):
    """torch.nn.functional.scaled_dot_product_attention: fused CPU/GPU kernels with their own backward."""

    name: ClassVar[str] = "sdpa"
    description: ClassVar[str] = "torch fused scaled_dot_product_attention"
    supports_lse: ClassVar[bool] = False  # the public SDPA API does not return the log-sum-exp
    supports_sinks: ClassVar[bool] = False
    dense_rows: ClassVar[bool] = True
    similarities: ClassVar[frozenset[str]] = frozenset({"dot", "cosine"})

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        r = super().not_supported_reasons(inputs)
        if any(not isinstance(mod, bias) for mod in inputs.mods) or len(inputs.mods) > 1:
            r.append(f"score_mod={list(inputs.mods)!r}: SDPA takes at most one additive bias tensor")
        if not r and not inputs.empty:  # the data checks read q, k and v: only when nothing else refuses
            masks = _mask_plan(inputs)[0] != "none" or bool(inputs.mods)
            r += fused_data_reasons(inputs, masks=masks, merges=False, cleans_key_only=True)
        return r

    def rank(self, inputs: AttentionInputs) -> float:
        # Native forms are torch's fastest kernel (design.md §4: fp32 N=8192 H=8 causal 294 ms, ~60% of
        # the sgemm peak). A materialized mask skips nothing and costs O(Sq·Sk) memory: window 256 at
        # N=8192 took 1557 ms vs span's 87 ms. Below Sq·Sk = 512², the mask is small and one fused call
        # beats span's per-block calls (padding & causal, B=2, N=512: 9.6 vs 10.5 ms; N=128: 1.0 vs 1.9).
        if _mask_plan(inputs)[0] != "materialize":
            return 0.0
        return 5.0 if inputs.Sq * inputs.Sk <= 512 * 512 else 40.0

    def plan(self, inputs: AttentionInputs) -> str:
        how = _mask_plan(inputs)[1]
        if inputs.mods:
            how += "; the caller's bias as a float attn_mask"
        if _fold_gqa(inputs, _mask_plan(inputs)[0]):
            how += (
                f"; GQA folded: the {inputs.Hq // inputs.Hkv} query heads of a group as rows of one kv head"
            )
        elif inputs.Hq != inputs.Hkv:
            how += f"; enable_gqa (Hq={inputs.Hq}, Hkv={inputs.Hkv})"
        return f"{self.description}; {how}"

    def forward(self, inputs: AttentionInputs) -> tuple[Tensor, Tensor | None]:
        q, k, v, m = inputs.q, inputs.k, inputs.v, inputs.mask
        kind = _mask_plan(inputs)[0]
        attn_mask: Tensor | None = None
        is_causal, zero_rows = kind in ("is_causal", "tail"), 0
        if kind == "tail":
            # Bottom-right causal with Sq > Sk: the first Sq - Sk queries see no key (out 0); the rest are
            # a square top-left causal problem.
            zero_rows = inputs.Sq - inputs.Sk
            q = q[:, :, zero_rows:]
        elif kind == "padding":
            assert m is not None and m.key_only
            lo, hi = m.key_range(0, inputs.Sq, inputs.ctx)
            if not lo < hi:  # no key is kept anywhere: the kernel still runs, on every key, all masked
                lo, hi = 0, inputs.Sk
            k, v = k[:, :, lo:hi], v[:, :, lo:hi]  # keys no row keeps are never read
            attn_mask = m.tile(0, 1, lo, hi, inputs.ctx)  # (B, 1, 1, Sk'): the same for every query
            if not inputs.mods:
                a, b = m.full_key_range(inputs.ctx)  # keys every batch element keeps
                a, b = min(max(a, lo), hi), max(min(b, hi), lo)
                mixed = [(0, a - lo), (b - lo, hi - lo)] if a < b else [(0, hi - lo)]
                mixed = [(c0, c1) for c0, c1 in mixed if c0 < c1]  # in the sliced key coordinates
                q, k, v = _clean_key_only(q, k, v, attn_mask, mixed, inputs.dtype)
        elif kind == "dense":
            assert isinstance(m, dense)
            attn_mask = as_4d(m.mask)
        elif kind == "materialize":
            assert m is not None
            attn_mask = m.tile(0, inputs.Sq, 0, inputs.Sk, inputs.ctx)  # broadcastable to (B, Hq, Sq, Sk)
        if inputs.similarity == "cosine":  # cosine = dot product of unit vectors (after any cleaning)
            q, k = unit_qk(q, k)
        # Rows whose keys are all masked: the contract says out = 0. torch's CPU kernels give 0, but its
        # CUDA kernels return arbitrary values there in bf16/fp16 (seen on an H200 with torch 2.11: 0.45
        # instead of 0 under left padding & causal), so such rows are zeroed explicitly (no host sync).
        empty = None if attn_mask is None else ~attn_mask.any(-1, keepdim=True)
        if inputs.mods:
            t = as_4d(inputs.mods[0].bias)
            if kind == "padding" and t.shape[-1] > 1:
                t = t[..., lo:hi]
            live = t > float("-inf") if attn_mask is None else (t > float("-inf")) & attn_mask
            empty = ~live.any(-1, keepdim=True)  # -inf bias entries are hard masks too
            # SDPA adds a float attn_mask to the scores; fold the bool keep-mask in as -inf.
            attn_mask = t if attn_mask is None else t.masked_fill(~attn_mask, float("-inf"))
            # The bias is added in float32 (float64 for float64 inputs): SDPA takes a float32 mask with
            # bf16/fp16 inputs, and rounding it to bf16 moved a BLOOM-style ALiBi bias by up to 4.
            cd = acc_dtype(q.dtype)
            if attn_mask.dtype not in (q.dtype, cd):
                attn_mask = attn_mask.to(cd)
        fold = _fold_gqa(inputs, kind)
        if fold:  # (B, Hq, Sq, D) -> (B, Hkv, G*Sq, D): each kv head serves its G query heads in one call
            q = q.reshape(inputs.B, inputs.Hkv, -1, inputs.D)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=inputs.dropout_p,
            is_causal=is_causal,
            scale=inputs.scale,
            enable_gqa=inputs.Hq != inputs.Hkv and not fold,
        )
        if empty is not None:  # broadcastable to out: (B|1, Hq|1, Sq|1, 1); key-only masks when folded
            out = out.masked_fill(empty, 0.0)
        if fold:
            out = out.reshape(inputs.B, inputs.Hq, inputs.Sq, inputs.Dv)
        if zero_rows:
            out = torch.cat([out.new_zeros(*out.shape[:2], zero_rows, out.shape[3]), out], dim=2)
        return out, None


def _clean_key_only(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor, mixed: list[tuple[int, int]], dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """Zero masked-out keys/values (and the queries of batch elements with no key) if any of them is
    NaN/inf: the kernel weighs masked-out values by 0, and 0·NaN = NaN. keep: (B, 1, 1, Sk) bool.

    A key-only mask masks a key for every query of its batch element, so zeroing it changes nothing
    else. Only q and the key columns some batch element masks (`mixed`, from the mask's own bounds:
    for left-padded decoding, the padding) are read for the check, with one host sync; the copies
    are made only when something there is not finite.
    """
    acc = scan_dtype(dtype)
    total = q.detach().sum(dtype=acc)  # NaN or inf anywhere makes the total NaN or inf
    for c0, c1 in mixed:
        total = total + k.detach()[:, :, c0:c1].sum(dtype=acc) + v.detach()[:, :, c0:c1].sum(dtype=acc)
    if bool(total.isfinite()):
        return q, k, v
    gone = ~keep.transpose(-1, -2)  # (B, 1, Sk, 1)
    no_key = ~keep.any(-1, keepdim=True)  # (B, 1, 1, 1): batch elements that see no key at all
    return q.masked_fill(no_key, 0.0), k.masked_fill(gone, 0.0), v.masked_fill(gone, 0.0)


def _fold_gqa(inputs: AttentionInputs, kind: str) -> bool:
    """Decode-sized GQA with a mask that ignores the query index and head: fold heads into rows.

    Measured by `attnopt bench --goals` (2 threads, torch 2.13, Hq=8, Hkv=2, Sq=1, Sk=16384, D=64, fp32):
    enable_gqa 5.32 ms, folded 1.29 ms. For prefill (Sq=2048, no mask) folding was ~5% slower, hence
    the Sq bound.
    """
    return inputs.Hq != inputs.Hkv and kind in ("none", "padding") and not inputs.mods and inputs.Sq <= 16


def _mask_plan(inputs: AttentionInputs) -> tuple[str, str]:
    """How SDPA takes the mask: (kind, explanation); kind in none|is_causal|tail|padding|dense|materialize."""
    m, Sq, Sk = inputs.mask, inputs.Sq, inputs.Sk
    if m is None:
        return "none", "no mask"
    if isinstance(m, causal) and not inputs.mods:  # with a bias SDPA cannot also take is_causal
        if m.align == "top_left" or Sq == Sk:
            return (
                "is_causal",
                "is_causal=True (SDPA's causal is top-left; the same as bottom-right when Sq == Sk)",
            )
        if Sq == 1:
            return "none", "bottom-right causal with one query sees every key: no mask"
        if Sq > Sk:
            return (
                "tail",
                f"bottom-right causal, Sq > Sk: the first {Sq - Sk} rows are empty (0), is_causal on the rest",
            )
    if m.key_only:  # padding, left_padding and their combinations
        return "padding", f"{m!r} as a (B, 1, 1, Sk) bool mask (O(B·Sk))"
    if isinstance(m, dense):
        return "dense", "the caller's bool mask"
    return "materialize", (
        f"{m!r} materialized as a ({Sq}, {Sk}) bool mask: O(Sq·Sk) memory and no skipped work "
        f"(SDPA has no structured masks; its is_causal is top-left only)"
    )
