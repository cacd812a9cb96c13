"""Deterministic serving workloads: lists of requests (prompt token ids + a new-token budget).

Every prompt is a window of real English text: the token stream of Python's own documentation
(``attnopt.bench.generation.docs_ids``, ~113K tokens with SmolLM2's tokenizer, repeated when a workload
needs more). Windows are consecutive and do not overlap, so prompts differ and share no prefix unless a
workload asks for one (``shared_prefix_workload``). That matters for peers with prefix caching: a
workload that shared prefixes by accident would hand them free prefill.

* ``mixed_workload``: varied prompt and output lengths, both log-uniform (many short, a few long).
* ``shared_prefix_workload``: one common prefix plus distinct per-request tokens.
* ``long_contexts``: n distinct prompts of exactly ``tokens`` tokens.
* ``write_prompts`` / ``read_prompts``: a JSON-lines prompts file, one request per line,
  ``{"prompt_ids": [...], "max_new_tokens": N}`` or ``{"prompt": "text", "max_new_tokens": N}``.

Only ``docs_ids`` needs the tokenizer; the rest is the standard library (no torch import here).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "WorkItem",
    "long_contexts",
    "mixed_workload",
    "read_prompts",
    "shared_prefix_workload",
    "text_stream",
    "workload_stats",
    "write_prompts",
]


@dataclass(frozen=True)
class WorkItem:
    """One request: its prompt token ids and how many tokens to generate after it."""

    prompt_ids: list[int]
    max_new_tokens: int

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")


def text_stream(tok: Any, n: int) -> list[int]:
    """The first n token ids of the documentation text (repeated when n exceeds it), as a list."""
    from .generation import docs_ids

    return docs_ids(tok, n).tolist()


def _windows(tok: Any, lengths: Sequence[int], skip: int = 0) -> list[list[int]]:
    """Consecutive, non-overlapping windows of the text stream with the given lengths, after `skip` tokens."""
    stream = text_stream(tok, skip + sum(lengths))
    out, at = [], skip
    for n in lengths:
        out.append(stream[at : at + n])
        at += n
    return out


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    """An int in [lo, hi], log-uniform (each doubling of length is about equally likely)."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
    return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))


def mixed_workload(
    tok: Any,
    n: int = 64,
    seed: int = 0,
    prompt_tokens: tuple[int, int] = (32, 1024),
    new_tokens: tuple[int, int] = (8, 128),
) -> list[WorkItem]:
    """n requests with log-uniform prompt lengths in ``prompt_tokens`` and budgets in ``new_tokens``.

    Deterministic in (tokenizer, n, seed, ranges). With the defaults the means are ~290 prompt tokens and
    ~43 new tokens per request (log-uniform means: (hi - lo) / ln(hi / lo)).
    """
    rng = random.Random(seed)
    plens = [_log_uniform(rng, *prompt_tokens) for _ in range(n)]
    budgets = [_log_uniform(rng, *new_tokens) for _ in range(n)]
    return [WorkItem(p, m) for p, m in zip(_windows(tok, plens), budgets)]


def shared_prefix_workload(
    tok: Any, n: int, prefix_tokens: int, own_tokens: int, max_new_tokens: int = 32
) -> list[WorkItem]:
    """n requests = one common prefix of ``prefix_tokens`` + ``own_tokens`` distinct tokens each."""
    if prefix_tokens < 0 or own_tokens < 1:
        raise ValueError("need prefix_tokens >= 0 and own_tokens >= 1 (prompts must differ)")
    prefix, *own = _windows(tok, [prefix_tokens] + [own_tokens] * n)
    return [WorkItem(prefix + o, max_new_tokens) for o in own]


def long_contexts(tok: Any, n: int, tokens: int, max_new_tokens: int = 8) -> list[WorkItem]:
    """n distinct prompts of exactly ``tokens`` tokens (consecutive windows of the text)."""
    if tokens < 1:
        raise ValueError("tokens must be >= 1")
    return [WorkItem(w, max_new_tokens) for w in _windows(tok, [tokens] * n)]


def workload_stats(items: Sequence[WorkItem]) -> dict[str, Any]:
    """Sizes of a workload: request count, prompt / new-token totals, min / median / max."""
    p = [len(w.prompt_ids) for w in items]
    m = [w.max_new_tokens for w in items]
    if not items:
        return {"requests": 0}
    return {
        "requests": len(items),
        "prompt_tokens": sum(p),
        "prompt_min_median_max": [min(p), statistics.median(p), max(p)],
        "max_new_tokens_total": sum(m),
        "max_new_min_median_max": [min(m), statistics.median(m), max(m)],
        "distinct_prompts": len({tuple(x.prompt_ids) for x in items}),
    }


def write_prompts(path: str | os.PathLike, items: Iterable[WorkItem], tok: Any = None) -> None:
    """Write a JSON-lines prompts file: ``prompt_ids`` lines, or ``prompt`` text lines when ``tok`` is given.

    Text lines are for people to read and edit; decoding then re-encoding is not guaranteed to give the
    same ids back, so files meant to reproduce a measurement should keep ids (``tok=None``).
    """
    with open(path, "w", encoding="utf-8") as f:
        for w in items:
            if tok is None:
                rec: dict[str, Any] = {"prompt_ids": list(w.prompt_ids), "max_new_tokens": w.max_new_tokens}
            else:
                rec = {"prompt": tok.decode(w.prompt_ids), "max_new_tokens": w.max_new_tokens}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_prompts(
    path: str | os.PathLike, tok: Any = None, default_max_new_tokens: int | None = None
) -> list[WorkItem]:
    """Read a JSON-lines prompts file (blank lines skipped).

    Each line is an object with exactly one of ``prompt_ids`` (list of ints) or ``prompt`` (text, encoded
    with ``tok`` without added special tokens; ``tok`` is then required), and ``max_new_tokens`` (int >= 1;
    may be left out when ``default_max_new_tokens`` is given). Errors name the file and line.
    """
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object")
            unknown = set(rec) - {"prompt", "prompt_ids", "max_new_tokens"}
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
            if ("prompt" in rec) == ("prompt_ids" in rec):
                raise ValueError(f"{where}: give exactly one of 'prompt' or 'prompt_ids'")
            if "prompt_ids" in rec:
                ids = rec["prompt_ids"]
                if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
                    raise ValueError(f"{where}: 'prompt_ids' must be a list of non-negative ints")
            else:
                if not isinstance(rec["prompt"], str):
                    raise ValueError(f"{where}: 'prompt' must be a string")
                if tok is None:
                    raise ValueError(f"{where}: a text 'prompt' needs a tokenizer")
                ids = list(tok(rec["prompt"], add_special_tokens=False)["input_ids"])
            m = rec.get("max_new_tokens", default_max_new_tokens)
            if type(m) is not int or m < 1:
                raise ValueError(f"{where}: 'max_new_tokens' must be an int >= 1, got {m!r}")
            if not ids:
                raise ValueError(f"{where}: empty prompt")
            items.append(WorkItem(ids, m))
    return items
