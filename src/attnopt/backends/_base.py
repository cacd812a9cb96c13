"""Backend: capabilities as class data, "why not" as a return value."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .._inputs import AttentionInputs


class Backend:
    """One way to compute attention. Subclasses declare capabilities and extend not_supported_reasons()."""

    name: ClassVar[str]
    description: ClassVar[str]
    device_types: ClassVar[frozenset[str] | None] = frozenset({"cpu", "cuda"})  # None = any device
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset(
        {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    )
    max_head_dim: ClassVar[int | None] = None
    supports_backward: ClassVar[bool] = True
    supports_dropout: ClassVar[bool] = True
    supports_lse: ClassVar[bool] = True
    supports_sinks: ClassVar[bool] = True
    similarities: ClassVar[frozenset[str]] = frozenset({"dot", "cosine", "euclidean"})
    # torch's fused kernels misread some strides (see _inputs.kernel_layout_problem): attention() copies
    # the inputs such a backend would misread, and explain() says so.
    dense_rows: ClassVar[bool] = False
    # Splits the keys into chunks (split-KV decode): only such a backend accepts num_splits >= 2.
    splits_keys: ClassVar[bool] = False

    @classmethod
    def is_available(cls) -> bool:
        return True

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        """Every reason this backend cannot run `inputs` (empty = it can). Sentences with value, limit, fix."""
        r: list[str] = []
        if not self.is_available():
            r.append(f"{self.name} is not available on this machine")
        if self.device_types is not None and inputs.device.type not in self.device_types:
            r.append(f"device={inputs.device.type} is not one of {sorted(self.device_types)}")
        if inputs.dtype not in self.dtypes:
            r.append(f"dtype={inputs.dtype} is not one of {sorted(str(d) for d in self.dtypes)}")
        if self.max_head_dim is not None and max(inputs.D, inputs.Dv) > self.max_head_dim:
            r.append(
                f"head_dim={max(inputs.D, inputs.Dv)} > {self.max_head_dim} (split heads or use backend='reference')"
            )
        if inputs.requires_grad and not self.supports_backward:
            r.append("inputs require grad but this backend has no backward (run under torch.no_grad())")
        if inputs.dropout_p and not self.supports_dropout:
            r.append(f"dropout_p={inputs.dropout_p} is not supported (use dropout_p=0.0)")
        if inputs.return_lse and not self.supports_lse:
            r.append("return_lse=True is not supported (this backend cannot return the log-sum-exp)")
        if inputs.sinks is not None and not self.supports_sinks:
            r.append("sinks are not supported")
        if inputs.similarity not in self.similarities:
            r.append(f"similarity={inputs.similarity!r} is not one of {sorted(self.similarities)}")
        n = inputs.num_splits
        if n is not None and n >= 2 and not self.splits_keys:
            r.append(
                f"num_splits={n}: this backend does not split the keys into chunks (it runs num_splits=None "
                f"or 1; split-KV decode runs on 'splitkv')"
            )
        return r

    def native_backward(self, inputs: AttentionInputs) -> bool:
        """False: forward() returns no autograd graph for these inputs; attention() then reruns the call
        on the other backends in backward (a recompute, as FlashAttention's backward recomputes P)."""
        return True

    def rank(self, inputs: AttentionInputs) -> float:
        """Expected cost class for `inputs` (lower runs first); backends override with measured heuristics."""
        raise NotImplementedError

    def plan(self, inputs: AttentionInputs) -> str:
        """One line saying how this backend would run `inputs` (for explain())."""
        return self.description

    def forward(self, inputs: AttentionInputs) -> tuple[Tensor, Tensor | None]:
        """Return out (B, Hq, Sq, Dv) in the input dtype and, if inputs.return_lse, lse (B, Hq, Sq)."""
        raise NotImplementedError

    # Backends that can compute the gradients of one part of a larger softmax straight from the rows'
    # (out, lse) — FlashAttention's backward given O and LSE — declare it; attnopt.api.attention_backward
    # runs them, and recomputes the part's forward through autograd where none can.
    grads_from_output: ClassVar[bool] = False

    def grad_from_output_reasons(self, inputs: AttentionInputs) -> list[str]:
        """Why grad_from_output() cannot run these inputs (empty = it can)."""
        return [] if self.grads_from_output else [f"{self.name} has no backward from a given (out, lse)"]

    def grad_from_output(
        self, inputs: AttentionInputs, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(dq share, dk, dv) of inputs' keys in a softmax whose rows have output `out`, LSE `lse`."""
        raise NotImplementedError


def unit_qk(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine similarity as a dot product: q and k scaled to unit length (in float32 at least)."""
    cd = torch.promote_types(q.dtype, torch.float32)
    return F.normalize(q.to(cd), dim=-1).to(q.dtype), F.normalize(k.to(cd), dim=-1).to(k.dtype)


def split_nonfinite(t: Tensor) -> tuple[Tensor, Tensor]:
    """(t with its NaN/inf entries zeroed, bool (..., S): the rows that held one).

    Exact handling of masked-out garbage: a product with a zero weight must contribute exactly nothing,
    but 0 · NaN = NaN. With the finite part in the matmuls and the bad rows marked separately, a masked
    row or key contributes 0 · 0, while a kept bad one still makes its rows NaN.
    """
    ok = torch.isfinite(t)
    rows_ok = ok.all(-1)
    if bool(rows_ok.all()):  # nothing to clean: the same tensor, so the same arithmetic as clean inputs
        return t, ~rows_ok
    return t.masked_fill(~ok, 0), ~rows_ok


# The fused kernels keep one float32 log-sum-exp per row; their backward rebuilds P = exp(s - lse), and
# merging span pieces weights them by exp(lse_piece - lse). The LSE's rounding (|lse| * 2**-24) moves
# every P of the row by that much, relatively; once log(Sk) falls below that step, P and the merge weights
# are off by up to a factor Sk (a float32-min bias row on bf16 inputs; q = k = 133120; scale = 1e3).
# Scores bounded by 2**11 keep that rounding under 1.2e-4 relative. Rows of equal scores are where it
# shows most: at 16000 (q = k = 1, scale 1e3, D = 16) fp32 dk was off by 2e-4 relative, 60x the tolerance
# rule; random data stayed within the rule up to logits ~7e3 (at ~8e4 no fp32 computation is).
FUSED_SCORE_LIMIT = 2.0**11


def fused_data_reasons(
    inputs: AttentionInputs,
    *,
    masks: bool,
    merges: bool,
    cleans_key_only: bool = False,
    own_backward: bool = True,
) -> list[str]:
    """Data a fused kernel would get wrong (reads the data: one sum / norm pass, only when it matters).

    masks: the kernel call hides some scores (a mask or a bias). merges: the backend merges partial
    results by their LSE (then huge scores matter without gradients too). cleans_key_only: the backend
    zeroes masked-out keys itself when the mask is a key-only one. own_backward: the kernel's LSE carries
    the gradients (False: they come from a rerun on another backend, which checks for itself).
    """
    r = []
    key_only = inputs.mask is not None and inputs.mask.key_only and not inputs.mods
    if masks and not (cleans_key_only and key_only) and inputs.nonfinite:
        r.append(
            "q, k or v hold NaN/inf and the mask hides some scores: a fused kernel weighs masked-out values "
            "by 0 and 0·NaN = NaN (blockwise skips them exactly)"
        )
    if (merges or (inputs.requires_grad and own_backward)) and inputs.score_bound > FUSED_SCORE_LIMIT:
        r.append(
            f"scores reach {inputs.score_bound:.3g} > {FUSED_SCORE_LIMIT:g}: the fused kernel's float32 LSE "
            f"cannot hold log(Sk) next to such a row max, so its "
            f"{'merges and ' if merges else ''}gradients would be off by up to a factor Sk "
            f"(blockwise keeps the row max and the normalizer apart)"
        )
    return r
