"""Named benchmark presets: the attention variants LLMs run, each with its FlexAttention twin.

A preset builds a ``Case``: the q/k/v tensors of one measurement plus the variant spelled for every
peer (attnopt descriptors, FlexAttention ``mask_mod``/``score_mod``, SDPA's ``is_causal``), on the
device asked for (``make_case(..., device="cuda")``; the tables a variant reads live there too).
``PRESETS`` is the default set; ``EXTRA_PRESETS`` run only when named (``--preset window_4096``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import attnopt as ao
from attnopt import mods

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class Variant:
    """One attention variant, spelled for attnopt and for FlexAttention (raw i, j with Sq == Sk)."""

    mask: ao.masks.Mask | None = None
    mods: tuple[mods.ScoreMod, ...] = ()
    sinks: Tensor | None = None
    is_causal: bool = False  # exactly plain causal: SDPA's is_causal=True expresses it
    keeps_all: bool = False  # the mask keeps every key (peers may run unmasked)
    mask_mod: Callable[..., Tensor] | None = None
    score_mod: Callable[..., Tensor] | None = None
    Sq: int | None = None  # None: Sq = N
    Hkv: int | None = None  # None: Hkv = Hq


@dataclass(frozen=True)
class Preset:
    name: str
    comment: str
    build: Callable[[int, int, torch.device], Variant]  # (N, Hq, device) -> Variant


def _causal_mm(b, h, i, j):
    return j <= i


def _window_mm(b, h, i, j):
    return (j <= i) & (i - j <= 255)


def _window_4096_mm(b, h, i, j):
    return (j <= i) & (i - j <= 4095)


def _causal(N: int, H: int, device: torch.device) -> Variant:
    return Variant(mask=ao.causal(), is_causal=True, mask_mod=_causal_mm)


def _window(N: int, H: int, device: torch.device) -> Variant:
    return Variant(mask=ao.sliding_window(255, 0), mask_mod=_window_mm)


def _window_4096(N: int, H: int, device: torch.device) -> Variant:
    return Variant(mask=ao.sliding_window(4095, 0), mask_mod=_window_4096_mm)


def _documents(N: int, H: int, device: torch.device) -> Variant:
    cu = [0, N // 4, N // 2, 3 * N // 4, N]
    doc = torch.searchsorted(torch.tensor(cu), torch.arange(N), right=True).to(device)  # (N,) document id

    def mask_mod(b, h, i, j):
        return (doc[i] == doc[j]) & (j <= i)

    return Variant(mask=ao.document(cu) & ao.causal(), mask_mod=mask_mod)


def _prefix_lm(N: int, H: int, device: torch.device) -> Variant:
    P = N // 4

    def mask_mod(b, h, i, j):
        return (j < P) | (j <= i)

    return Variant(mask=ao.prefix_lm(P), mask_mod=mask_mod)  # prefix_lm already includes causal


def _alibi(N: int, H: int, device: torch.device) -> Variant:
    slopes = mods.alibi_slopes(H).to(device)

    def score_mod(score, b, h, i, j):
        return score - slopes[h] * (i - j).abs()

    return Variant(
        mask=ao.causal(), mods=(mods.alibi(slopes),), is_causal=True, mask_mod=_causal_mm, score_mod=score_mod
    )


def _softcap(N: int, H: int, device: torch.device) -> Variant:
    def score_mod(score, b, h, i, j):
        return 30.0 * torch.tanh(score / 30.0)

    return Variant(
        mask=ao.causal(), mods=(mods.softcap(30.0),), is_causal=True, mask_mod=_causal_mm, score_mod=score_mod
    )


def _sinks(N: int, H: int, device: torch.device) -> Variant:
    return Variant(mask=ao.sliding_window(255, 0), sinks=torch.zeros(H, device=device), mask_mod=_window_mm)


def _decode(N: int, H: int, device: torch.device) -> Variant:
    # Bottom-right causal with one query keeps all N keys: what KV-cache decoding passes.
    return Variant(mask=ao.causal(), keeps_all=True, Sq=1, Hkv=2)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # Prefill of a decoder-only LM: plain causal, the case torch's fused kernel is built for.
        Preset("causal", "prefill, causal", _causal),
        # Mistral / Gemma local layers: 256 keys per query (the query and 255 before it).
        Preset("window_256", "sliding window 256 (sliding_window(255, 0))", _window),
        # Sequence packing: 4 equal documents, causal inside each (FlashAttention varlen).
        Preset("documents", "4 packed documents, causal (document(cu) & causal())", _documents),
        # T5 / PaLI prefix-LM: the first N/4 keys are bidirectional, the rest causal.
        Preset("prefix_lm", "prefix-LM, prefix N/4 (prefix_lm includes causal)", _prefix_lm),
        # BLOOM / MPT: ALiBi linear position bias on top of causal.
        Preset("alibi", "ALiBi slopes + causal", _alibi),
        # Gemma 2: logits soft-capped at 30, causal.
        Preset("softcap_30", "softcap 30 + causal", _softcap),
        # gpt-oss: one learnable sink logit per head (zeros here) with a 256 sliding window.
        Preset("sinks", "attention sinks (zeros) + sliding window 256", _sinks),
        # Token-by-token generation: one query, KV cache of length N, GQA 8 query / 2 kv heads.
        Preset("decode_gqa", "decode: 1 query, KV length N, GQA Hq=8/Hkv=2, bottom-right causal", _decode),
    ]
}

# Run only when named with --preset (the default set, and the goals, stay PRESETS).
EXTRA_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # Mistral 7B / long-context GPU runs: 4096 keys per query (sliding_window(4095, 0)).
        Preset(
            "window_4096", "sliding window 4096 (sliding_window(4095, 0)); long N, e.g. on CUDA", _window_4096
        ),
    ]
}
ALL_PRESETS: dict[str, Preset] = {**PRESETS, **EXTRA_PRESETS}


@dataclass(eq=False)
class Case:
    """The tensors and variant of one (preset, N, dtype, mode) measurement. Shapes (B, H, S, D)."""

    preset: str
    N: int
    dtype_name: str
    mode: str
    variant: Variant
    q: Tensor
    k: Tensor
    v: Tensor
    sinks: Tensor | None
    grad_out: Tensor | None  # fwdbwd: the gradient fed to out.backward()
    scale: float = field(init=False)

    def __post_init__(self):
        self.scale = self.D**-0.5

    B = property(lambda self: self.q.shape[0])
    Hq = property(lambda self: self.q.shape[1])
    Hkv = property(lambda self: self.k.shape[1])
    Sq = property(lambda self: self.q.shape[2])
    Sk = property(lambda self: self.k.shape[2])
    D = property(lambda self: self.q.shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def attnopt_kwargs(self) -> dict:
        kw: dict = {"mask": self.variant.mask}
        if self.variant.mods:
            kw["score_mod"] = list(self.variant.mods)
        if self.sinks is not None:
            kw["sinks"] = self.sinks
        return kw

    def leaves(self) -> list[Tensor]:
        """Tensors whose gradients a fwdbwd measurement computes."""
        return [t for t in (self.q, self.k, self.v, self.sinks) if t is not None and t.requires_grad]

    def shape_str(self) -> str:
        return f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} Sq={self.Sq} Sk={self.Sk} D={self.D}"


def make_case(
    preset: str,
    N: int,
    dtype: str,
    mode: str,
    *,
    B: int = 1,
    Hq: int = 8,
    Hkv: int | None = None,
    D: int = 64,
    device: str | torch.device = "cpu",
) -> Case:
    """Random inputs for one measurement (seeded on the CPU: every peer, on any device, sees the same
    values)."""
    dev = torch.device(device)
    var = ALL_PRESETS[preset].build(N, Hq, dev)
    Sq = var.Sq if var.Sq is not None else N
    Hkv = Hkv if Hkv is not None else (var.Hkv if var.Hkv is not None else Hq)
    g = torch.Generator().manual_seed(0)
    dt, grad = DTYPES[dtype], mode == "fwdbwd"
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dev, dt).requires_grad_(grad)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dev, dt).requires_grad_(grad)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dev, dt).requires_grad_(grad)
    sinks = None if var.sinks is None else var.sinks.clone().requires_grad_(grad)
    gout = torch.randn(B, Hq, Sq, D, generator=g).to(dev, dt) if grad else None
    return Case(preset, N, dtype, mode, var, q, k, v, sinks, gout)
