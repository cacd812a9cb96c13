"""Merge partial attention results computed over disjoint key sets, exactly, by their log-sum-exp.

If (out_a, lse_a) is attention of some queries over keys K_a and (out_b, lse_b) over disjoint keys K_b,
then attention over K_a ∪ K_b is

    lse = logaddexp(lse_a, lse_b)
    out = out_a · exp(lse_a - lse) + out_b · exp(lse_b - lse)

An empty part (lse = -inf, out = 0) contributes nothing; if every part is empty the row stays empty
(out 0, lse -inf) — never NaN. Used by the span and blockwise backends, split-KV decode and (later)
ring attention. Pure tensor ops: differentiable by autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NEG_INF = float("-inf")


def merge(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge parts: outs[i] (..., Sq, Dv), lses[i] (..., Sq). Returns (out in outs[0]'s dtype, lse).

    The result does not depend on the order of the parts (up to rounding).
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(
            f"merge needs as many outs as lses and at least one part, got {len(outs)} and {len(lses)}"
        )
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_all = torch.stack([x.float() if x.dtype != torch.float64 else x for x in lses])  # (P, ..., Sq)
    lse = torch.logsumexp(lse_all, dim=0)  # -inf where every part is empty (torch handles all -inf rows)
    # Guard exp(-inf - (-inf)) = NaN for rows that are empty everywhere: their weights are 0.
    safe = torch.where(torch.isinf(lse) & (lse < 0), 0.0, lse)
    weights = torch.exp(lse_all - safe)  # (P, ..., Sq), 0 for empty parts
    out = sum(w.unsqueeze(-1) * o.to(w.dtype) for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), lse


def add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Fold per-head sink logits (Hq,) into (out (B, Hq, Sq, Dv), lse (B, Hq, Sq)) as an empty-valued part.

    A sink is one more softmax column with no value: merging with a part whose out is 0 and lse is
    sink[h] gives out · sigmoid(lse - sink) and lse = logaddexp(lse, sink).
    """
    sink = sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
    new_lse = torch.logaddexp(lse, sink)
    scale = torch.exp(lse - new_lse)  # exp(-inf) = 0 for empty rows; new_lse is finite (= sink) there
    return (out.to(scale.dtype) * scale.unsqueeze(-1)).to(out.dtype), new_lse


def sinks_grad(p_sink: Tensor, delta: Tensor) -> Tensor:
    """d loss / d sinks (Hq,) given each row's sink weight p_sink (B, Hq, Sq) and delta = rowsum(dO ∘ O) - dlse.

    The sink is a softmax column with no value: d sink[h] = -sum over (b, i) of p_sink[b, h, i] * delta.
    Callers form p_sink from what they keep: exp(sink - lse), or exp(sink - max) / normalizer where the
    LSE cannot hold the normalizer next to a huge row max.
    """
    return -(p_sink * delta.to(p_sink.dtype)).sum(dim=(0, 2))
