"""Continuous batching over a paged KV pool, for any transformers causal LM loaded with
``attn_implementation="attnopt"``.

Each step packs every running request into one sequence of batch 1 (as transformers' continuous
batching and vLLM do): decoding requests bring one token, prefilling requests a chunk of their prompt,
up to ``max_batch_tokens``. The model runs once; each attention layer writes the step's keys and values
into the pool (only the new tokens) and reads every request's keys from its pages in place
(``attnopt.paged.PagedPlan``): R requests of length L cost R·L scores, not (R·L)·R as a block-diagonal
dense mask would. Requests whose prompts start with the same full pages share those pages (the prefix
cache skips their prefill) and their decode reads them once (cascade).

Memory: the pool has a fixed budget. A request is admitted only when pages for its whole prompt and
``max_new_tokens`` can be reserved, so a running request never runs out of room and never disturbs
another; the rest wait in FIFO order. A request that cannot fit even in an empty pool is refused when
submitted, with the numbers.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._memory import available_memory
from ..cache.paged import PagePool, PoolFull, PrefixCache
from ..paged import PagedPlan

__all__ = ["Engine", "Request", "TokenEvent", "generate_batch", "parse_bytes", "stream"]


@dataclass
class Request:
    """One generation request.

    Args:
        prompt: token ids (a list of ints or a 1-D integer tensor), at least one.
        max_new_tokens: tokens to generate at most (0: none).
        do_sample: sample instead of greedy (argmax).
        temperature, top_k, top_p: sampling controls (as ``model.generate``).
        seed: the request's own random generator seed: its samples do not depend on the batch.
        stop_token_ids: generation stops after any of these (default: the model's eos tokens).
        id: returned in events; defaults to the request's index in submission order.
    """

    prompt: list[int] | Tensor
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: Iterable[int] | None = None
    id: Any = None


@dataclass(frozen=True)
class TokenEvent:
    """A token of request ``id`` (its ``index``-th new token); ``finished`` with ``reason`` ("stop": a stop
    token, "length": max_new_tokens) on the last one. A request with max_new_tokens=0 yields one event
    with token None."""

    id: Any
    index: int
    token: int | None
    finished: bool
    reason: str | None = None


@dataclass
class _Live:
    req: Request
    id: Any
    prompt: list[int]
    stop: frozenset[int]
    gen: torch.Generator | None
    seq: int = -1
    done: int = 0  # prompt tokens whose keys are in the pool
    out: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens served by the prefix cache
    submitted: float = 0.0
    first_token: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.done < len(self.prompt)


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 1e12})


def parse_bytes(value: int | float | str) -> int:
    """``2147483648``, ``"2GiB"``, ``"512 MiB"``, ``"1.5GB"`` -> bytes."""
    if isinstance(value, bool):
        raise TypeError(f"memory_budget must be bytes (int) or a string like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    elif isinstance(value, str):
        s = value.strip().lower().replace(" ", "")
        num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = s[len(num) :]
        if unit not in _UNITS or not num:
            raise ValueError(
                f"memory_budget={value!r}: allowed a byte count or a number with B, KiB, MiB, GiB, KB, MB, GB"
            )
        try:
            n = float(num) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"memory_budget={value!r} is not a number with a unit") from None
    else:
        raise TypeError(
            f"memory_budget must be bytes (int) or a string like '2GiB', got {type(value).__name__}"
        )
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"memory_budget={value!r} must be positive")
    return int(n)


class _Batch:
    """What one step hands every attention layer (through the model's kwargs)."""

    def __init__(self, pool: PagePool, plan: PagedPlan, slots: Tensor, pages: list[list[int]]):
        self.pool, self.plan, self.slots, self.pages = pool, plan, slots, pages

    def attend(self, module: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        """q (1, Hq, T, D), k/v (1, Hkv, T, D) of this step's tokens -> (1, T, Hq, Dv)."""
        layer = module.layer_idx
        self.pool.write(layer, self.slots, k[0], v[0])  # only the new tokens are written
        out, _ = self.plan.run(
            q[0].transpose(0, 1), self.pool.k[layer], self.pool.v[layer], self.pages, scale
        )
        return out.unsqueeze(0)


class Engine:
    """Continuous batching for one model.

    Args:
        model: a transformers causal LM loaded with ``attn_implementation="attnopt"`` (after
            ``attnopt.integrations.transformers.register()``).
        memory_budget: bytes for the KV pool (int, or a string such as "2GiB"); default a quarter of the
            available memory. ``num_pages`` sets the page count instead.
        page_size: tokens per page.
        max_batch_tokens: tokens per step (decode tokens first, then prompt chunks).
        prefix_caching: reuse the pages of earlier prompts' full pages (skips their prefill).
        cascade: read pages shared by several running requests once per step.
        batch_invariant: fixed-split attention (cut at multiples of ``split_size`` tokens): a request's
            attention output is bitwise independent of the rest of the batch and of its page layout.
            (The model's own matmuls over the packed batch are not covered.)
        pool_fill: value written into the pool at creation (tests use NaN).
    """

    def __init__(
        self,
        model: Any,
        *,
        memory_budget: int | str | None = None,
        num_pages: int | None = None,
        page_size: int = 16,
        max_batch_tokens: int = 512,
        prefix_caching: bool = True,
        cascade: bool = True,
        batch_invariant: bool = False,
        split_size: int = 256,
        pool_fill: float | None = None,
    ):
        config = getattr(model, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if impl != "attnopt":
            raise ValueError(
                f"attnopt.serving needs a model loaded with attn_implementation='attnopt' (this one uses "
                f"{impl!r}). HINT: attnopt.integrations.transformers.register(), then from_pretrained(..., "
                f"attn_implementation='attnopt') or model.set_attn_implementation('attnopt')"
            )
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layer_types = getattr(text, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or (
            getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
        ):
            raise NotImplementedError(
                f"attnopt.serving runs full-attention layers; this model has {sorted(set(layer_types)) or 'sliding-window'} "
                f"layers (sliding windows and linear attention in the paged pool are not implemented yet)"
            )
        if getattr(text, "attn_logit_softcapping", None):
            raise NotImplementedError(
                f"attnopt.serving's paged attention does not soft-cap scores yet (attn_logit_softcapping="
                f"{text.attn_logit_softcapping}); run this model through generate() on attnopt instead"
            )
        for name, value in (
            ("max_batch_tokens", max_batch_tokens),
            ("page_size", page_size),
            ("split_size", split_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: allowed an int >= 1")
        if batch_invariant and split_size % page_size:
            raise ValueError(f"split_size={split_size} must be a multiple of page_size={page_size}")
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        n_layers = text.num_hidden_layers
        n_kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        per_page = PagePool.bytes_per_page(n_layers, n_kv, head_dim, page_size, self.dtype)
        if num_pages is None:
            budget = (
                parse_bytes(memory_budget)
                if memory_budget is not None
                else available_memory(self.device) // 4
            )
            num_pages = budget // per_page
            if num_pages < 1:
                raise ValueError(
                    f"memory_budget={memory_budget!r} ({budget} bytes) holds no page: one page of {page_size} "
                    f"tokens takes {per_page} bytes for this model"
                )
        elif memory_budget is not None:
            raise ValueError("give memory_budget or num_pages, not both")
        self.pool = PagePool(
            n_layers,
            n_kv,
            head_dim,
            num_pages,
            page_size=page_size,
            dtype=self.dtype,
            device=self.device,
            fill=pool_fill,
        )
        self.prefix = PrefixCache(self.pool) if prefix_caching else None
        self.max_batch_tokens = max_batch_tokens
        self.cascade = cascade
        self.split_size = split_size if batch_invariant else None
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(text, "eos_token_id", None)
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.vocab = text.vocab_size
        self.finished: dict[Any, dict[str, Any]] = {}  # id -> prompt/cached/generated tokens, reason, times
        self.waiting: deque[_Live] = deque()
        self.running: list[_Live] = []
        self._count = 0
        self.steps = 0
        self.tokens_in_steps = 0
        self.prefill_tokens = 0
        self.cached_tokens = 0

    # --------------------------------------------------------------------------------------- submit

    def submit(self, request: Request | list[int] | Tensor) -> Any:
        """Queue a request (validated now); returns its id."""
        req = request if isinstance(request, Request) else Request(prompt=request)
        prompt = _token_list(req.prompt, self.vocab)
        for name in ("max_new_tokens",):
            val = getattr(req, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"Request.{name}={val!r}: allowed an int >= 0")
        if req.do_sample:
            if not (
                isinstance(req.temperature, (int, float))
                and req.temperature > 0
                and math.isfinite(req.temperature)
            ):
                raise ValueError(
                    f"Request.temperature={req.temperature!r}: allowed a finite number > 0 when sampling"
                )
            if req.top_k is not None and (
                isinstance(req.top_k, bool) or not isinstance(req.top_k, int) or req.top_k < 1
            ):
                raise ValueError(f"Request.top_k={req.top_k!r}: allowed None or an int >= 1")
            if req.top_p is not None and not (isinstance(req.top_p, (int, float)) and 0 < req.top_p <= 1):
                raise ValueError(f"Request.top_p={req.top_p!r}: allowed None or a number in (0, 1]")
        if req.seed is not None and (isinstance(req.seed, bool) or not isinstance(req.seed, int)):
            raise ValueError(f"Request.seed={req.seed!r}: allowed None or an int")
        stop = (
            self.eos
            if req.stop_token_ids is None
            else frozenset(_token_list(list(req.stop_token_ids), self.vocab, empty_ok=True))
        )
        need = self.pool.pages_for(len(prompt) + req.max_new_tokens)
        if need > self.pool.num_pages:
            raise ValueError(
                f"request of {len(prompt)} prompt + {req.max_new_tokens} new tokens needs {need} pages of "
                f"{self.pool.page_size} tokens; the pool has {self.pool.num_pages} in all "
                f"({self.pool.num_pages * self.pool.page_bytes / 2**20:.0f} MiB). HINT: raise memory_budget"
            )
        rid = req.id if req.id is not None else self._count
        try:
            hash(rid)
        except TypeError:
            raise ValueError(f"Request.id={rid!r} must be hashable") from None
        if rid in self.finished or any(x.id == rid for x in (*self.waiting, *self.running)):
            raise ValueError(f"Request.id={rid!r} is already in use by this engine")
        gen = None
        if req.do_sample:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(req.seed if req.seed is not None else torch.seed())
        self._count += 1
        self.waiting.append(_Live(req, rid, prompt, stop, gen, submitted=time.perf_counter()))
        return rid

    # ----------------------------------------------------------------------------------- scheduling

    def _admit(self) -> list[TokenEvent]:
        """Start waiting requests, in order, while the pool can reserve every page each will need.

        A request whose prompt shares full pages, past what the prefix cache holds, with a request still
        prefilling them waits (in place) for those pages instead of computing them a second time.
        """
        events: list[TokenEvent] = []
        deferred: list[_Live] = []
        while self.waiting:
            r = self.waiting[0]
            if r.req.max_new_tokens == 0:  # nothing to generate: no compute, no pages
                self.waiting.popleft()
                events.append(TokenEvent(r.id, 0, None, True, "length"))
                self.finished[r.id] = {"prompt_tokens": len(r.prompt), "cached_tokens": 0, "tokens": 0,
                                       "reason": "length", "ttft_s": None, "latency_s": time.perf_counter() - r.submitted}  # fmt: skip
                continue
            total = len(r.prompt) + r.req.max_new_tokens
            cached = self.prefix.match(r.prompt, limit=len(r.prompt) - 1) if self.prefix is not None else []
            if self._shares_pending(r, len(cached) * self.pool.page_size):
                deferred.append(self.waiting.popleft())  # its prefix is being prefilled: wait for the pages
                continue
            seq = self.pool.new_sequence()
            if cached:  # referenced first, so the reservation below cannot evict them
                self.pool.attach(seq, cached, len(cached) * self.pool.page_size)
            try:
                self.pool.reserve(seq, self.pool.pages_for(total) - len(cached))
            except PoolFull:
                self.pool.free(seq)
                if not self.running:  # cannot happen after submit()'s check unless the pool is shared
                    raise
                break  # queue: it starts when running requests give pages back
            self.waiting.popleft()
            r.seq = seq
            r.done = r.cached = len(cached) * self.pool.page_size
            self.cached_tokens += r.cached
            self.running.append(r)
        self.waiting.extendleft(reversed(deferred))
        return events

    def _shares_pending(self, r: _Live, cached_tokens: int) -> bool:
        """Whether a running request is prefilling full pages that ``r``'s prompt starts with."""
        if self.prefix is None:
            return False
        P = self.pool.page_size
        usable = (len(r.prompt) - 1) // P * P  # the last prompt token is always computed
        if usable <= cached_tokens:
            return False
        nxt = r.prompt[cached_tokens : cached_tokens + P]
        return any(
            a.prefilling
            and a.done < cached_tokens + P <= len(a.prompt)
            and a.prompt[cached_tokens : cached_tokens + P] == nxt
            and a.prompt[:cached_tokens] == r.prompt[:cached_tokens]
            for a in self.running
        )

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[TokenEvent]:
        """Admit what fits, run the model once over decode tokens and prompt chunks; returns new tokens."""
        events = self._admit()
        if not self.running:
            if self.waiting:
                raise RuntimeError("no request fits the pool and none is running")  # guarded by submit()
            return events
        budget = self.max_batch_tokens
        sched: list[tuple[_Live, int]] = []
        for r in self.running:  # decoding requests first: one token each
            if not r.prefilling and budget > 0:
                sched.append((r, 1))
                budget -= 1
        for r in self.running:
            if r.prefilling and budget > 0:
                n = min(len(r.prompt) - r.done, budget)
                sched.append((r, n))
                budget -= n
        ids, pos, slots, keep, owners = [], [], [], [], []
        pages, kv_lens, q_lens = [], [], []
        for r, n in sched:
            start = self.pool.length(r.seq)
            if r.prefilling:
                ids.extend(r.prompt[r.done : r.done + n])
            else:
                ids.append(r.out[-1])
            pos.extend(range(start, start + n))
            slots.append(self.pool.append(r.seq, n))
            if not r.prefilling or r.done + n == len(r.prompt):  # this row's logits give a new token
                keep.append(len(ids) - 1)
                owners.append(r)
            pages.append(self.pool.pages(r.seq))
            kv_lens.append(start + n)
            q_lens.append(n)
        plan = PagedPlan(
            self.pool.page_size, pages, kv_lens, q_lens, cascade=self.cascade, split_size=self.split_size
        )
        batch = _Batch(self.pool, plan, torch.cat(slots).to(self.device), pages)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                position_ids=torch.tensor([pos], device=self.device),
                use_cache=False,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
                attnopt_paged=batch,
            )
        logits = out.logits[0].float()  # (len(keep), V)
        self.steps += 1
        self.tokens_in_steps += len(ids)
        for r, n in sched:
            if r.prefilling:
                r.done += n
                self.prefill_tokens += n
                if self.prefix is not None:  # the prompt's full pages written so far join the cache
                    self.prefix.insert(r.prompt[: r.done], self.pool.pages(r.seq))
        now = time.perf_counter()
        for row, r in enumerate(owners):
            tok = self._sample(logits[row], r)
            r.out.append(tok)
            if r.first_token is None:
                r.first_token = now
            reason = "stop" if tok in r.stop else "length" if len(r.out) >= r.req.max_new_tokens else None
            events.append(TokenEvent(r.id, len(r.out) - 1, tok, reason is not None, reason))
            if reason is not None:
                self.finished[r.id] = {
                    "prompt_tokens": len(r.prompt),
                    "cached_tokens": r.cached,
                    "tokens": len(r.out),
                    "reason": reason,
                    "ttft_s": r.first_token - r.submitted,
                    "latency_s": now - r.submitted,
                }
                self.pool.free(r.seq)
                self.running.remove(r)
        return events

    @staticmethod
    def _sample(logits: Tensor, r: _Live) -> int:
        if not r.req.do_sample:
            return int(torch.argmax(logits))
        x = logits / float(r.req.temperature)
        if r.req.top_k is not None and r.req.top_k < x.numel():
            kth = torch.topk(x, r.req.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if r.req.top_p is not None and r.req.top_p < 1:
            sx, order = torch.sort(x, descending=True)
            cum = sx.softmax(-1).cumsum(-1)
            drop = cum - sx.softmax(-1) >= r.req.top_p  # keep the smallest set whose mass reaches top_p
            x = x.scatter(0, order, sx.masked_fill(drop, float("-inf")))
        probs = x.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=r.gen))

    # ------------------------------------------------------------------------------------- drivers

    def stream(self, requests: Iterable[Request | list[int] | Tensor] = ()) -> Iterator[TokenEvent]:
        """Submit ``requests`` (validated first, all of them), then yield tokens as they come until idle."""
        for req in list(requests):
            self.submit(req)
        while self.has_work():
            yield from self.step()

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "pages_used": self.pool.used_pages,
            "pages_peak": self.pool.peak_used_pages,
            "pages_total": self.pool.num_pages,
            "pages_cached": len(self.prefix) if self.prefix is not None else 0,
            "steps": self.steps,
            "prefill_tokens": self.prefill_tokens,
            "cached_tokens": self.cached_tokens,
        }


def _token_list(x: Any, vocab: int, empty_ok: bool = False) -> list[int]:
    if isinstance(x, Tensor):
        if x.ndim != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"prompt tensor must be 1-D integer token ids, got {x.dtype} {tuple(x.shape)}")
        x = x.tolist()
    if isinstance(x, str) or not hasattr(x, "__iter__"):
        raise TypeError(
            f"prompt must be token ids (list of ints or 1-D tensor), got {type(x).__name__}; tokenize text first"
        )
    out = list(x)
    if not out and not empty_ok:
        raise ValueError("prompt is empty; a request needs at least one token")
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ValueError(f"token id {t!r} is not an int in [0, vocab_size={vocab})")
    return out


def _requests(requests: Iterable[Any], max_new_tokens: int | None, options: dict[str, Any]) -> list[Request]:
    out = []
    for r in requests:
        if isinstance(r, Request):
            out.append(r)
            continue
        kw = dict(options)
        if max_new_tokens is not None:
            kw["max_new_tokens"] = max_new_tokens
        out.append(Request(prompt=r, **kw))
    return out


_REQUEST_FIELDS = {"do_sample", "temperature", "top_k", "top_p", "seed", "stop_token_ids"}


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    req = {k: v for k, v in kwargs.items() if k in _REQUEST_FIELDS}
    eng = {k: v for k, v in kwargs.items() if k not in _REQUEST_FIELDS}
    return req, eng


def generate_batch(
    model: Any,
    requests: Iterable[Request | list[int] | Tensor],
    *,
    max_new_tokens: int | None = None,
    **kwargs: Any,
) -> list[list[int]]:
    """Generate for every request with continuous batching; returns each request's new tokens, in order.

    ``requests`` are ``Request`` objects or token-id lists (then ``max_new_tokens`` and the sampling
    options in ``kwargs`` — do_sample, temperature, top_k, top_p, seed, stop_token_ids — apply to each).
    Other ``kwargs`` go to ``Engine`` (memory_budget, page_size, max_batch_tokens, cascade, ...).
    """
    req_opts, eng_opts = _split(kwargs)
    reqs = _requests(requests, max_new_tokens, req_opts)
    engine = Engine(model, **eng_opts)
    ids = [engine.submit(r) for r in reqs]
    outs: dict[Any, list[int]] = {i: [] for i in ids}
    if len(outs) != len(ids):
        raise ValueError("request ids must be unique")
    while engine.has_work():
        for ev in engine.step():
            if ev.token is not None:
                outs[ev.id].append(ev.token)
    return [outs[i] for i in ids]


def stream(
    model: Any,
    requests: Iterable[Request | list[int] | Tensor],
    *,
    max_new_tokens: int | None = None,
    **kwargs: Any,
) -> Iterator[TokenEvent]:
    """Like ``generate_batch``, but yields each token as soon as it is sampled."""
    req_opts, eng_opts = _split(kwargs)
    engine = Engine(model, **eng_opts)
    yield from engine.stream(_requests(requests, max_new_tokens, req_opts))
