"""Recordings for the attnopt.maps tests, built from synthetic weights (no model is run).

``small_maps()``: exact views (``from_dense``) of a few layers whose heads attend in clearly different ways,
with hostile token text. ``smollm2_16k_shaped()``: an ``AttentionMaps`` shaped like a 16K-token SmolLM2
recording (30 layers x 9 heads x 501 x 501 bins) with sink-heavy, causal, noisy content, built directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnopt.maps import AttentionMaps, Bins, LayerMaps, from_dense

# Token text a report must escape: markup, entities, quotes, a script end tag, line breaks, JS separators.
HOSTILE = [
    "<s>",
    "</script>",
    "a&amp;b",
    '"q"',
    "'",
    "\n",
    "<img src=x onerror=alert(1)>",
    "\u2028",
    " x",
    "é",
]


def causal_softmax(logits: Tensor) -> Tensor:
    """Softmax over keys of (..., S, S) logits with the causal mask."""
    S = logits.shape[-1]
    keep = torch.ones(S, S, dtype=torch.bool).tril()
    return logits.masked_fill(~keep, float("-inf")).softmax(-1)


def _patterns(S: int, gen: torch.Generator) -> list[Tensor]:
    """Logits (S, S) of four kinds of head: local, sink, noisy and striped."""
    i = torch.arange(S).view(-1, 1).float()
    j = torch.arange(S).view(1, -1).float()
    local = -0.6 * (i - j).abs()
    sink = torch.where(j == 0, 6.0, 0.0) + 0.3 * torch.randn(S, S, generator=gen)
    noisy = 1.5 * torch.randn(S, S, generator=gen)
    stripes = torch.where(j % 8 == 3, 4.0, 0.0) - 0.05 * (i - j).abs()
    return [local, sink, noisy, stripes]


def small_weights(layers: int = 3, heads: int = 2, S: int = 64, seed: int = 0) -> list[Tensor]:
    """One (1, heads, S, S) causal softmax per layer; head h of layer l has pattern (l * heads + h) % 4."""
    gen = torch.Generator().manual_seed(seed)
    pats = _patterns(S, gen)
    return [
        causal_softmax(torch.stack([pats[(li * heads + h) % 4] for h in range(heads)]))[None]
        for li in range(layers)
    ]


def small_maps(layers: int = 3, heads: int = 2, S: int = 64, resolution: int = 32) -> AttentionMaps:
    """Exact views of ``small_weights`` with hostile tokens, two query rows, one rollout row and meta."""
    tokens = [HOSTILE[p % len(HOSTILE)] for p in range(S)]
    m = from_dense(
        small_weights(layers, heads, S),
        resolution=resolution,
        sink_tokens=2,
        query_rows=[S // 2, S - 1],
        rollout_rows=[S - 1],
        tokens=tokens,
    )
    m.meta = {"model": "synthetic </script><b>model</b>", "N": S, "timings": {"record_s": 0.12}}
    return m


def _causal_rows(heads: int, n: int, positions: list[int], gen: torch.Generator) -> Tensor:
    """(1, heads, len(positions), n) softmax rows over keys 0..p with a strong first-key sink, noisy logits."""
    logits = 1.5 * torch.randn(heads, len(positions), n, generator=gen)
    logits[..., 0] += 8.0
    keys = torch.arange(n)
    for r, p in enumerate(positions):
        logits[:, r, keys > p] = float("-inf")
    return logits.softmax(-1)[None]


def smollm2_16k_shaped(n: int = 16384, layers: int = 30, heads: int = 9, distinct: int = 4) -> AttentionMaps:
    """A recording shaped like 16K-token SmolLM2 (512-bin resolution -> 501 x 501 bins, 4 sinks).

    Content per head: a causal mean map ~ 1/(query+1), times a sink column, a local band that varies by head,
    a few hot key columns and log-normal noise; the max map is the mean times a noisy factor >= 1. Only
    ``distinct`` layers are generated (the others reuse them) to keep memory and time small; each layer is
    still encoded on its own, so the report's size is what distinct layers would give.
    """
    gen = torch.Generator().manual_seed(16)
    qb = kb = Bins.make(n, 512, 4)
    R = len(qb)
    mid = (qb.edges[:-1] + qb.edges[1:]).float() / 2
    qpos, kpos = mid.view(-1, 1), mid.view(1, -1)
    causal = kpos <= qpos + 0.5
    made = []
    for _ in range(distinct):
        mean = torch.empty(heads, R, R)
        for h in range(heads):
            band = torch.exp(-(qpos - kpos).clamp_min(0) / (50.0 * (h + 1) ** 2))
            hot = torch.zeros(1, R)
            hot[0, torch.randint(4, R, (6,), generator=gen)] = 5.0
            sink = torch.zeros(1, R)
            sink[0, :4] = torch.tensor([300.0, 30.0, 10.0, 5.0]) * (h % 3 + 1)
            noise = torch.exp(0.8 * torch.randn(R, R, generator=gen))
            mean[h] = (1 + 20 * band + hot + sink) * noise / (qpos + 1)
        mean = torch.where(causal, mean, 0.0)
        mean = mean / mean.sum(-1, keepdim=True).clamp_min(1e-30) * 0.02
        mx = (mean * (1 + 30 * torch.rand(heads, R, R, generator=gen))).clamp_max(1.0)
        made.append((mean[None], mx[None]))
    out = []
    for li in range(layers):
        mean, mx = made[li % distinct]
        received = torch.rand(1, heads, n, generator=gen) * 3 + 0.5
        received[..., 0] = n * 0.4
        entropy = torch.log1p(torch.arange(n).float()).expand(1, heads, n) * (
            0.5 + 0.5 * torch.rand(1, heads, 1)
        )
        rows = _causal_rows(heads, n, [n // 2, n - 1], gen)
        out.append(
            LayerMaps([(0, R, 0, R, {"mean": mean, "max": mx})], received, entropy, rows, f"layers.{li}")
        )
    rollout = _causal_rows(1, n, [n - 1], gen)[0]
    tokens = [f" tok{p % 997}" for p in range(n)]
    meta = {"model": "SmolLM2-135M-Instruct (synthetic shape)", "N": n, "timings": {"record_s": 1.5}}
    return AttentionMaps(
        qb,
        kb,
        out,
        tokens=tokens,
        query_rows=[n // 2, n - 1],
        rollout_rows=[n - 1],
        rollout=rollout,
        meta=meta,
    )
