"""KV cache layers for generation: no per-step copy of old keys and values.

Each layer plugs into transformers' ``Cache(layers=[...])`` and so into ``model.generate(cache=...)``;
``attnopt.integrations.transformers.make_cache(model, kind)`` builds a whole cache for a model:

* ``GrowingLayer`` ("growing"): amortized doubling; returns views of the filled prefix.
* ``PreallocatedLayer`` ("static"): one buffer of ``max_length`` tokens, written in place; returns views of
  the filled prefix, so unused slots are never read.
* ``RingLayer`` ("streaming"; and the sliding-window layers of hybrid models): ``sinks`` first tokens and
  a ring of the ``window`` most recent ones (StreamingLLM). Positions are assigned inside the cache:
  the sink keys are re-rotated (RoPE) each step so every key sits at its in-cache distance from the
  query; memory and time per token stay constant however long generation runs.

transformers is imported when a layer class is first used (``attnopt.cache.GrowingLayer``), not here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GrowingLayer", "PreallocatedLayer", "RingLayer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import layers

        return getattr(layers, name)
    raise AttributeError(f"module 'attnopt.cache' has no attribute {name!r}")
