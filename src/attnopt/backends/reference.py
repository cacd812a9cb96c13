"""The oracle: attention written to be read, in the seed's four steps, any variant, float64-capable.

It builds the full (B, Hq, Sq, Sk) score matrix, so its memory is O(Sq·Sk): use it to check other
backends and for variants nothing faster supports yet, not for long sequences.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._inputs import AttentionInputs, acc_dtype
from ..masks import Mask, MaskContext, tile_indices
from ..mods import ScoreMod
from ._base import Backend, split_nonfinite

NEG_INF = float("-inf")


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | None = None,
    mods: tuple[ScoreMod, ...] = (),
    similarity: str = "dot",
    scale: float | None = None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense attention. Returns out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) and weights (B, Hq, Sq, Sk).

    Computes in float32 (float64 for float64 inputs) unless `compute_dtype` says otherwise — the tests
    pass the input dtype to get the "plain same-dtype PyTorch" baseline of the tolerance rule.
    lse and weights are in the compute dtype. A fully masked row gives out 0, lse -inf, weights 0.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    cd = compute_dtype or acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ctx = MaskContext(B, Hq, Sq, Sk, q.device)

    # Step 1 — encode. q, k, v arrive already projected and split into heads. Grouped-query attention:
    # query head h reads kv head h // G, so repeat each kv head G times (fine for an oracle).
    # A masked-out key must contribute exactly nothing even if it holds NaN/inf (a KV cache from
    # torch.empty), but 0 · NaN = NaN: compute on the finite parts and remember which rows were bad.
    G = Hq // Hkv
    qc, q_bad = split_nonfinite(q.to(cd))  # (B, Hq, Sq, D), (B, Hq, Sq)
    kc, k_bad = (t.repeat_interleave(G, dim=1) for t in split_nonfinite(k.to(cd)))  # (B, Hq, Sk, D)
    vc, v_bad = (t.repeat_interleave(G, dim=1) for t in split_nonfinite(v.to(cd)))  # (B, Hq, Sk, Dv)

    # Step 2 — score every query against every key.
    if similarity == "dot":
        sim = qc @ kc.transpose(-1, -2)  # (B, Hq, Sq, Sk)
    elif similarity == "cosine":
        sim = F.normalize(qc, dim=-1) @ F.normalize(kc, dim=-1).transpose(-1, -2)
    elif similarity == "euclidean":  # -|q - k|^2 = -(|q|^2 - 2 q.k + |k|^2), without a (Sq, Sk, D) tensor
        q2 = (qc * qc).sum(-1, keepdim=True)  # (B, Hq, Sq, 1); x * x: its backward never forms 2x
        k2 = (kc * kc).sum(-1).unsqueeze(-2)  # (B, Hq, 1, Sk)
        sim = -(q2 - 2 * (qc @ kc.transpose(-1, -2)) + k2)
    else:
        raise AssertionError(f"unvalidated similarity {similarity!r}")
    s = scale * sim

    # Score modifiers in the order given, then the mask (-inf, never a large negative number).
    b, h, i, j = tile_indices(ctx, 0, Sq, 0, Sk)
    for mod in mods:
        s = mod(s, b, h, i, j, ctx).to(cd)  # a modifier may promote (python floats, int indices): stay in cd
    if mask is not None:
        s = torch.where(mask.keep(b, h, i, j, ctx), s, NEG_INF)  # where(): no gradient reaches masked scores
    kept = s > NEG_INF  # (B, Hq, Sq, Sk): a -inf score (mask or bias) is masked out
    s = torch.where(kept & (q_bad[..., None] | k_bad[..., None, :]), float("nan"), s)  # kept bad: NaN

    # Step 3 — softmax, safe for fully masked rows. With sinks, the softmax runs over [s, sink[h]] and the
    # sink column is dropped (its probability mass goes nowhere).
    m = s.amax(dim=-1, keepdim=True)  # (B, Hq, Sq, 1)
    sink = None if sinks is None else sinks.to(cd).view(1, Hq, 1, 1)
    if sink is not None:
        m = torch.maximum(m, sink)
    m = torch.where(m == NEG_INF, 0.0, m).detach()  # a constant shift; -inf row max -> 0 keeps exp() NaN-free
    e = torch.where(kept, torch.exp(s - m), 0.0)  # masked scores weigh exactly 0, even in a NaN row
    denom = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - m)
    empty = denom == 0  # every key masked (and no sink)
    safe = torch.where(empty, 1.0, denom)
    p = torch.where(kept, e / safe, 0.0)  # (B, Hq, Sq, Sk); 0, not 0 / NaN, where a NaN row masks a key
    lse = torch.where(empty, NEG_INF, m + torch.log(safe)).squeeze(-1)  # (B, Hq, Sq), log of the normalizer

    # Step 4 — the weighted sum of values.
    p_used = F.dropout(p, dropout_p) if dropout_p > 0 else p
    out = p_used @ vc  # (B, Hq, Sq, Dv)
    out = out.masked_fill((kept & v_bad[..., None, :]).any(-1, keepdim=True), float("nan"))  # kept bad v
    return out.to(q.dtype), lse, p


class ReferenceBackend(Backend):
    """Dense oracle: supports every variant, every dtype, autograd."""

    name: ClassVar[str] = "reference"
    description: ClassVar[str] = "dense oracle: explicit (Sq, Sk) scores, mask, softmax, weighted sum"
    device_types: ClassVar[frozenset[str] | None] = None  # plain torch ops: any device (meta too)

    def rank(self, inputs: AttentionInputs) -> float:
        return 100.0  # the oracle: O(Sq·Sk) memory, last resort

    def plan(self, inputs: AttentionInputs) -> str:
        nbytes = 8 if inputs.dtype == torch.float64 else 4
        gib = inputs.B * inputs.Hq * inputs.Sq * inputs.Sk * nbytes / 2**30
        return f"{self.description}; materializes {gib:.3g} GiB of scores"

    def forward(self, inputs: AttentionInputs) -> tuple[Tensor, Tensor | None]:
        out, lse, _ = reference_attention(
            inputs.q,
            inputs.k,
            inputs.v,
            mask=inputs.mask,
            mods=inputs.mods,
            similarity=inputs.similarity,
            scale=inputs.scale,
            sinks=inputs.sinks,
            dropout_p=inputs.dropout_p,
        )
        return out, lse if inputs.return_lse else None
