"""Generation on attnopt: every transformers cache and every attnopt cache kind gives sdpa's greedy tokens.

Tiny LLaMA-family models built from a config (random weights, float64 so that no argmax tie can flip)
cover sliding-window and hybrid layer layouts; SmolLM2-135M (the real model, fp32) covers the rest.
A spy on the attention function checks that no transformers rule reaches attnopt as a ``custom`` mask.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers >= 5")

from transformers import (
    AttentionInterface,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    StaticCache,
)
from transformers.cache_utils import StaticLayer

import attnopt.integrations.transformers as ao_hf
from attnopt import masks as M
from attnopt.cache import PreallocatedLayer, RingLayer


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: threads only add overhead (see test_transformers.py)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch) -> list[dict]:
    """Every call of attnopt's attention function: its mask and key count."""
    ao_hf.register()
    calls: list[dict] = []
    fn = AttentionInterface._global_mapping["attnopt"]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append({"mask": attention_mask, "Sq": query.shape[2], "Sk": key.shape[2]})
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    real = ao_hf.ao.attention

    def attnopt_attention(q, k, v, **kwargs):
        calls[-1]["read"] = k.shape[2]  # the keys attnopt.attention really gets
        return real(q, k, v, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "attnopt", attention)
    monkeypatch.setattr(ao_hf.ao, "attention", attnopt_attention)
    return calls


def _leaves(mask: Any) -> set[type]:
    return {type(leaf) for leaf in mask.leaves()} if isinstance(mask, M.Mask) else set()


def _no_custom(calls: list[dict]) -> None:
    assert calls, "attnopt never ran"
    bad = [c["mask"] for c in calls if _leaves(c["mask"]) & {M.custom, M.dense}]
    assert not bad, f"{len(bad)} calls got an evaluated rule or a dense mask, e.g. {bad[0]!r}"


def _greedy(model, impl: str, n: int, **kw) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            **kw, do_sample=False, max_new_tokens=n, min_new_tokens=n, top_p=None, top_k=None, pad_token_id=0
        )


# --------------------------------------------------------------------------- tiny sliding / hybrid


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "sliding":  # Mistral: every layer has a 5-token sliding window
        model = MistralForCausalLM(MistralConfig(sliding_window=5, **common))
    else:  # hybrid: one sliding-window layer, one full-attention layer
        cfg = Qwen2Config(
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            **common,
        )
        model = Qwen2ForCausalLM(cfg)
    return model.double().eval()


def _tiny_inputs(padded: bool) -> dict:
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    if padded:
        am[0, :3] = 0
    return {"input_ids": ids, "attention_mask": am}


TINY_CACHES = {
    "dynamic": lambda m: {},
    "static": lambda m: {"cache_implementation": "static"},
    "sliding_window": lambda m: {"cache_implementation": "sliding_window"},
    "hybrid": lambda m: {"cache_implementation": "hybrid"},
    "StaticCache": lambda m: {"cache": StaticCache(config=m.config, max_cache_len=40)},
    "growing": lambda m: {"cache": ao_hf.make_cache(m, "growing", initial=4)},
    "attnopt-static": lambda m: {"cache": ao_hf.make_cache(m, "static", max_length=40)},
    "streaming": lambda m: {"cache": ao_hf.make_cache(m, "streaming", sinks=2, window=64)},
}


@pytest.mark.parametrize("padded", [False, True], ids=["single", "left-padded"])
@pytest.mark.parametrize("model_kind", ["sliding", "hybrid"])
@pytest.mark.parametrize("cache", list(TINY_CACHES))
def test_tiny_models_every_cache_matches_sdpa(model_kind, cache, padded, spy):
    model = _tiny(model_kind)
    inputs = _tiny_inputs(padded)
    if cache == "streaming" and padded and model_kind == "hybrid":
        with pytest.raises(ValueError, match="same positions"):
            _greedy(model, "attnopt", 12, **inputs, **TINY_CACHES[cache](model))
        return
    want = _greedy(model, "sdpa", 12, **inputs)  # transformers' default cache
    got = _greedy(model, "attnopt", 12, **inputs, **TINY_CACHES[cache](model))
    assert torch.equal(got, want), (got, want)
    _no_custom(spy)
    if model_kind == "sliding":  # the window bounds what a decode step reads
        assert max(c["read"] for c in spy if c["Sq"] == 1) <= 6


def test_offloaded_caches_need_cuda_in_transformers():
    ao_hf.register()
    model = _tiny("sliding")
    if torch.cuda.is_available():  # pragma: no cover - CPU machine
        pytest.skip("checked on CPU only")
    for impl in ("sdpa", "attnopt"):  # the same refusal with either implementation: a transformers limit
        with pytest.raises(AssertionError, match="CUDA"):
            _greedy(model, impl, 2, **_tiny_inputs(False), cache_implementation="offloaded")


# ------------------------------------------------------------------------------------- SmolLM2


def _chat(tok) -> dict:
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def _batch(tok) -> dict:
    prompts = ["Hi", "Write a haiku about the sea and the wind, please, in English.", "Name three colors."]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return dict(tok(texts, padding=True, padding_side="left", return_tensors="pt"))


SMOL_CACHES = {
    "dynamic": lambda m: {},
    "static": lambda m: {"cache_implementation": "static"},
    "StaticCache": lambda m: {"cache": StaticCache(config=m.config, max_cache_len=96)},
    "growing": lambda m: {"cache": ao_hf.make_cache(m, "growing")},
    "attnopt-static": lambda m: {"cache": ao_hf.make_cache(m, "static", max_length=96)},
    "streaming": lambda m: {"cache": ao_hf.make_cache(m, "streaming", sinks=4, window=512)},
}


@pytest.mark.parametrize("batch", ["single", "left-padded"])
@pytest.mark.parametrize("cache", list(SMOL_CACHES))
def test_smollm2_every_cache_matches_sdpa(smollm2, cache, batch, spy):
    model, tok = smollm2
    enc = _chat(tok) if batch == "single" else _batch(tok)
    if cache == "streaming" and batch == "left-padded":  # its sinks would be padding: a clear refusal
        with pytest.raises(ValueError, match="same positions"):
            _greedy(model, "attnopt", 2, **enc, **SMOL_CACHES[cache](model))
        return
    n = 10
    want = _greedy(model, "sdpa", n, **enc)
    got = _greedy(model, "attnopt", n, **enc, **SMOL_CACHES[cache](model))
    assert torch.equal(got, want), f"attnopt: {tok.batch_decode(got)}\nsdpa: {tok.batch_decode(want)}"
    _no_custom(spy)
    S, L = enc["input_ids"].shape[1], model.config.num_hidden_layers
    # keys read: exactly the filled length, never a preallocated buffer's unused slots
    assert [c["read"] for c in spy[::L]] == list(range(S, S + n)), [c["read"] for c in spy[::L]]


def test_static_buffers_full_of_nan_past_the_filled_length(smollm2, spy, monkeypatch):
    """Unused slots of preallocated buffers are never read: NaN there changes nothing."""
    model, tok = smollm2
    enc = _batch(tok)
    want = _greedy(model, "sdpa", 8, **enc)

    real_init = StaticLayer.lazy_initialization

    def nan_init(self, key_states, value_states):
        real_init(self, key_states, value_states)
        self.keys.fill_(float("nan"))
        self.values.fill_(float("nan"))

    monkeypatch.setattr(StaticLayer, "lazy_initialization", nan_init)
    got = _greedy(model, "attnopt", 8, **enc, cache=StaticCache(config=model.config, max_cache_len=64))
    assert torch.equal(got, want)
    got = _greedy(model, "attnopt", 8, **enc, cache_implementation="static")
    assert torch.equal(got, want)

    real_alloc = PreallocatedLayer._allocate

    def nan_alloc(self, k, v, n, need):
        real_alloc(self, k, v, n, need)
        self._k[:, :, n:].fill_(float("nan"))
        self._v[:, :, n:].fill_(float("nan"))

    monkeypatch.setattr(PreallocatedLayer, "_allocate", nan_alloc)
    got = _greedy(model, "attnopt", 8, **enc, cache=ao_hf.make_cache(model, "static", max_length=64))
    assert torch.equal(got, want)
    _no_custom(spy)


def test_streaming_runs_past_its_window_at_constant_memory(smollm2):
    model, tok = smollm2
    cache = ao_hf.make_cache(model, "streaming", sinks=4, window=24)
    enc = _chat(tok)
    out = _greedy(model, "attnopt", 40, **enc, cache=cache)
    assert out.shape[1] == enc["input_ids"].shape[1] + 40
    layer = cache.layers[0]
    assert (
        isinstance(layer, RingLayer) and layer._k.shape[2] == 28
    )  # 4 sinks + 24 window, whatever the length
    assert cache.get_seq_length() == out.shape[1] - 1


# ------------------------------------------------------------------------------- mask function


def test_mask_function_returns_its_own_masks_unchanged():
    own = M.causal() & M.left_padding([1, 0])
    assert ao_hf.mask_interface(2, 3, 5, attention_mask=own) is own
    assert ao_hf.mask_interface(2, 3, 5, attention_mask=ao_hf.FULL) is ao_hf.FULL
    assert own.ndim == 4 and ao_hf.FULL.ndim == 4  # what transformers' preprocessing reads


def test_static_buffer_rule_is_structured_and_trimmed():
    from transformers import masking_utils as mu

    # query block of 3 at positions 4..6 over a 16-slot buffer (the first 7 filled), left padding 1 / 0
    am = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    got = ao_hf.hf_mask_to_attnopt(2, 3, 16, 4, 0, mu.causal_mask_function, am)
    assert _leaves(got) == {M.cache_causal, M.left_padding, M.padding}, got  # unwritten slots: padding
    dense = torch.zeros(2, 1, 3, 16, dtype=torch.bool)
    for i in range(3):
        dense[:, 0, i, : 4 + i + 1] = True
    dense[0, :, :, 0] = False
    ctx = M.MaskContext(2, 1, 3, 16)
    assert torch.equal(got.tile(0, 3, 0, 16, ctx).expand(2, 1, 3, 16), dense)
    used, trimmed = ao_hf._filled_prefix(got, 3, 16)
    assert used == 7 and _leaves(trimmed) == {M.causal, M.left_padding}


# ------------------------------------------------------------------------------------ make_cache


def test_make_cache_errors(smollm2):
    model, _ = smollm2
    with pytest.raises(ValueError, match="not a cache kind"):
        ao_hf.make_cache(model, "paged")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['windw'\]"):
        ao_hf.make_cache(model, "streaming", windw=8)
    with pytest.raises(ValueError, match="window"):
        ao_hf.make_cache(model, "streaming", window=0)
    with pytest.raises(ValueError, match="rotary"):
        ao_hf.make_cache(_NoRope(model.config), "streaming")
    cache = ao_hf.make_cache(model, "static")
    assert cache.layers[0].get_max_length() == model.config.max_position_embeddings


class _NoRope(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


# ------------------------------------------------------------------------------------------- CLI


def test_generate_command_streams_and_compares(smollm2, capsys):
    from attnopt import cli

    rc = cli.main(
        ["generate", "--prompt-tokens", "32", "--new-tokens", "40", "--window", "16", "--compare", "20",
         "--temperature", "0", "--threads", "1"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "attnopt streaming" in out and "DynamicCache + sdpa" in out and "4 sinks + window 16" in out
    assert "last 120 generated tokens" in out


def test_readme_generation_snippet_runs(smollm2):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "make_cache" in b)
    model, tok = smollm2
    model.set_attn_implementation("attnopt")
    scope = {"model": model, "batch": {**_chat(tok), "max_new_tokens": 4, "do_sample": False}}
    with torch.no_grad():
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["out"].shape[1] == scope["batch"]["input_ids"].shape[1] + 4
