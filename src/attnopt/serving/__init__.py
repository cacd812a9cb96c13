"""Batched serving on attnopt: continuous batching over a paged KV pool, with shared prefixes.

``generate_batch(model, requests, max_new_tokens=...)`` runs many requests at once on any transformers
causal LM loaded with ``attn_implementation="attnopt"``; ``stream`` yields tokens as they come; ``Engine``
is the step-by-step interface (submit, step, stats).
"""

from .engine import Engine, Request, TokenEvent, generate_batch, parse_bytes, stream

__all__ = ["Engine", "Request", "TokenEvent", "generate_batch", "parse_bytes", "stream"]
