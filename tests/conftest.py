"""Session fixtures: the two real models of design.md §5, loaded once per test session, offline.

Both are opt-in: only tests that ask for ``minilm`` or ``smollm2`` pay for transformers and a model load,
and a missing package skips those tests with the install command instead of failing them.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

# Nothing may be downloaded while testing (design.md §5); huggingface_hub reads this at import time.
os.environ["HF_HUB_OFFLINE"] = "1"


def _load(name: str, attn_implementation: str) -> tuple[Any, Any]:
    """attnopt.demo's loader (which registers attnopt too); a missing package skips with its install hint."""
    pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers >= 5")
    from attnopt import demo

    try:
        return getattr(demo, f"load_{name}")(attn_implementation)
    except demo.ModelsMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm() -> tuple[Any, Any]:
    """(BertModel all-MiniLM-L6-v2 in eval mode, loaded with eager attention; its tokenizer)."""
    return _load("minilm", "eager")


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """(LlamaForCausalLM SmolLM2-135M-Instruct from its Q4_1 GGUF, fp32, eval mode, loaded with sdpa; its
    tokenizer, padding on the left as batched generation needs)."""
    return _load("smollm2", "sdpa")
