"""attnopt: exact, fast, memory-efficient attention for large language models."""

from . import blockmask, masks, mods
from ._dispatch import NoBackendError
from .api import attention, attention_backward, available_backends, compile_for, explain
from .masks import (
    cache_causal,
    causal,
    custom,
    dense,
    document,
    document_causal,
    left_padding,
    padding,
    prefix_lm,
    sliding_window,
)
from .nn import MultiHeadAttention, RotaryEmbedding

__version__ = "0.1.0"

__all__ = [
    "blockmask",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "NoBackendError",
    "__version__",
    "attention",
    "attention_backward",
    "available_backends",
    "cache_causal",
    "causal",
    "custom",
    "dense",
    "document",
    "document_causal",
    "compile_for",
    "explain",
    "left_padding",
    "masks",
    "mods",
    "padding",
    "prefix_lm",
    "sliding_window",
]
