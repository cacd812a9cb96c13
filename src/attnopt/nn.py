"""Modules: MultiHeadAttention (the textbook BERT self-attention layer, done right) and RotaryEmbedding.

The classic write-up of BERT self-attention projects the input to queries, keys and values, splits the
heads, scores ``QKᵀ / √d``, fills masked scores with -1e9, softmaxes and merges the heads. Its usual
bugs, fixed here: the scale uses the **head** dimension (not the hidden size); masks are structured
``attnopt.masks`` descriptors (no -1e9 fills, no N×N tensor unless the user hands one in; a fully
masked row gives 0, not a uniform average); the output projection is applied; grouped-query /
multi-query attention and cross-attention are supported; the attention itself is ``attnopt.attention``
(exact, O(N) memory, the fastest backend for the inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .api import MaskArg, ModArg, attention

__all__ = ["MultiHeadAttention", "RotaryEmbedding"]


def _pos_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an int >= 1")
    return value


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) in the half-split layout used by LLaMA and transformers.

    ``rotary(x, positions)`` rotates x (B, H, S, D) by angle ``positions[s] / base^(2k/D)`` on the pairs
    (x[k], x[k + D/2]). positions: (S,) or (B, S) ints; default ``arange(S)``.
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        head_dim = _pos_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim}: rotary embedding needs an even head dimension")
        if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 1:
            raise ValueError(f"base={base!r}: expected a number > 1")
        self.head_dim, self.base = head_dim, float(base)
        inv = 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"RotaryEmbedding(head_dim={self.head_dim}) expects x of shape (B, H, S, {self.head_dim}), "
                f"got {tuple(x.shape)}"
            )
        S = x.shape[2]
        if positions is None:
            positions = torch.arange(S, device=x.device)
        if positions.shape[-1] != S or positions.ndim not in (1, 2):
            raise ValueError(f"positions shape {tuple(positions.shape)}: expected (S,) or (B, S) with S={S}")
        angles = positions.to(device=x.device, dtype=torch.float32)[..., None] * self.inv_freq.to(x.device)
        if angles.ndim == 3:  # (B, S, D/2) -> (B, 1, S, D/2)
            angles = angles[:, None]
        cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
        x1, x2 = x[..., : self.head_dim // 2], x[..., self.head_dim // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"


class MultiHeadAttention(nn.Module):
    """Multi-head attention: ``out_proj(merge_heads(attention(q_proj(x), k_proj(ctx), v_proj(ctx))))``.

    Args:
        embed_dim: model width E (input and output features).
        num_heads: query heads; the head dim is E / num_heads.
        num_kv_heads: key/value heads (grouped-query attention; 1 = multi-query). Default num_heads.
        bias: add biases in the four projections.
        dropout: dropout on the attention weights while training.
        kdim / vdim: feature sizes of the key / value inputs for cross-attention (default E).
        rotary: an optional RotaryEmbedding applied to queries and keys (self-attention positions).

    forward(x (B, S, E), context=None, *, mask=None, score_mod=None, ...) -> (B, S, E).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        kdim: int | None = None,
        vdim: int | None = None,
        rotary: RotaryEmbedding | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        embed_dim = _pos_int("embed_dim", embed_dim)
        num_heads = _pos_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _pos_int("num_kv_heads", num_kv_heads)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; the head dim must be whole"
            )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads} "
                f"(grouped-query attention shares each kv head among num_heads / num_kv_heads query heads)"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: expected a float in [0, 1)")
        kdim = embed_dim if kdim is None else _pos_int("kdim", kdim)
        vdim = embed_dim if vdim is None else _pos_int("vdim", vdim)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim, self.dropout = kdim, vdim, float(dropout)
        if rotary is not None:
            if not isinstance(rotary, RotaryEmbedding):
                raise TypeError(
                    f"rotary must be an attnopt.nn.RotaryEmbedding or None, got {type(rotary).__name__}"
                )
            if rotary.head_dim != self.head_dim:
                raise ValueError(f"rotary.head_dim={rotary.head_dim} != the layer's head dim {self.head_dim}")
        self.rotary = rotary
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(kdim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(vdim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, **kw)

    def forward(
        self,
        x: Tensor,
        context: Tensor | Sequence[Tensor] | None = None,
        *,
        mask: MaskArg = None,
        score_mod: ModArg = None,
        positions: Tensor | None = None,
        context_positions: Tensor | None = None,
        sinks: Tensor | None = None,
        scale: float | None = None,
        backend: str = "auto",
    ) -> Tensor:
        """Attend from x (B, S, E) to itself or to ``context``; return (B, S, E).

        context: None (self-attention), a (B, Sk, kdim) tensor (keys and values from it), or a pair
            (key_input (B, Sk, kdim), value_input (B, Sk, vdim)).
        mask / score_mod / sinks / scale / backend: as attnopt.attention (masks are descriptors such as
            ``attnopt.padding(lengths)`` or ``attnopt.causal()``; no -1e9 fills).
        positions / context_positions: rotary positions of queries / keys, (S,) or (B, S); default
            arange. Only used with ``rotary``; context_positions defaults to positions for self-attention.
        """
        kin, vin = self._inputs(x, context)
        B, S = x.shape[0], x.shape[1]
        Sk = kin.shape[1]
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kin).view(B, Sk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(vin).view(B, Sk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            if context is None and context_positions is None:
                context_positions = positions
            q, k = self.rotary(q, positions), self.rotary(k, context_positions)
        out = attention(
            q,
            k,
            v,
            mask=mask,
            score_mod=score_mod,
            scale=scale,
            sinks=sinks,
            dropout_p=self.dropout if self.training else 0.0,
            backend=backend,
        )
        assert isinstance(out, Tensor)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))

    def _inputs(self, x: Tensor, context: Tensor | Sequence[Tensor] | None) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.embed_dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a (B, S, embed_dim={self.embed_dim}) tensor, got {got}")
        if context is None:
            if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
                raise ValueError(
                    f"self-attention needs kdim == vdim == embed_dim; this layer has kdim={self.kdim}, "
                    f"vdim={self.vdim}, embed_dim={self.embed_dim}: pass context=(key_input, value_input)"
                )
            return x, x
        if isinstance(context, Tensor):
            kin = vin = context
        elif isinstance(context, (tuple, list)) and len(context) == 2:
            kin, vin = context
        else:
            raise TypeError(
                f"context: expected None, a (B, Sk, kdim) tensor or a (key_input, value_input) pair, "
                f"got {type(context).__name__}"
            )
        for name, t, dim in (("key input", kin, self.kdim), ("value input", vin, self.vdim)):
            if not isinstance(t, Tensor) or t.ndim != 3 or t.shape[-1] != dim:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"context {name}: expected a (B, Sk, {dim}) tensor, got {got}")
            if t.shape[0] != x.shape[0]:
                raise ValueError(f"context {name} has batch {t.shape[0]}, x has batch {x.shape[0]}")
        if kin.shape[1] != vin.shape[1]:
            raise ValueError(
                f"key input has {kin.shape[1]} positions, value input {vin.shape[1]}; they must match"
            )
        return kin, vin

    @classmethod
    def from_bert(cls, block: nn.Module) -> MultiHeadAttention:
        """The same attention as a transformers ``BertAttention`` block (weights copied).

        It computes ``block.output.dense(block.self(x))``: queries/keys/values, heads, softmax and the
        output projection. The block's residual and LayerNorm are not attention and stay with the block:
        ``block.output.LayerNorm(mha(x, mask=attnopt.padding(lengths)) + x)`` equals ``block(x, mask)[0]``
        in eval mode. A ``BertSelfAttention`` alone has no output projection and is refused.
        """
        sa, so = getattr(block, "self", None), getattr(block, "output", None)
        need = ("query", "key", "value")
        if sa is None or so is None or not all(hasattr(sa, n) for n in need) or not hasattr(so, "dense"):
            raise TypeError(
                f"from_bert expects a transformers BertAttention block (with .self.query/.key/.value and "
                f".output.dense), got {type(block).__name__}"
            )
        if getattr(sa, "is_causal", False):
            raise ValueError(
                "from_bert: this block is causal (a BERT decoder); pass mask=attnopt.causal() "
                "yourself and build the layer by hand"
            )
        E, H = sa.query.in_features, int(sa.num_attention_heads)
        if sa.query.out_features != E or E % H or int(sa.attention_head_size) != E // H:
            raise ValueError(
                f"from_bert: head size {sa.attention_head_size} x {H} heads != hidden size {E}; not supported"
            )
        scaling = getattr(sa, "scaling", None)
        if scaling is not None and not math.isclose(scaling, (E // H) ** -0.5, rel_tol=1e-9):
            raise ValueError(f"from_bert: the block scales by {scaling}, not 1/sqrt(head_dim); not supported")
        bias = sa.query.bias is not None
        p = sa.query.weight
        layer = cls(E, H, bias=bias, dropout=float(sa.dropout.p), device=p.device, dtype=p.dtype)
        with torch.no_grad():
            for mine, theirs in (
                (layer.q_proj, sa.query),
                (layer.k_proj, sa.key),
                (layer.v_proj, sa.value),
                (layer.out_proj, so.dense),
            ):
                mine.weight.copy_(theirs.weight)
                if bias:
                    mine.bias.copy_(theirs.bias)
        return layer.train(block.training)

    def extra_repr(self) -> str:
        gqa = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{gqa}, head_dim={self.head_dim}, dropout={self.dropout}"
