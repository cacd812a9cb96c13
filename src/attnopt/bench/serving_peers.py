"""Serving peers on a Hugging Face model: transformers' continuous batching (CB) and sequential ``generate``.

* ``peer_generate_batch``: transformers' continuous batching on CPU with ``sdpa`` (5.24: every request is
  packed into one batch row; keys and values of every cached token of every scheduled request are gathered
  with ``index_select`` per layer per step; a float block-diagonal mask of (Σq, Σk) selects each request's
  own keys). Uses ``model.generate_batch`` when every request has the same budget, and otherwise the
  manager that ``generate_batch`` wraps (``continuous_batching_context_manager`` + ``add_request``), because
  ``generate_batch`` takes one global ``max_new_tokens`` (transformers 5.24,
  ``generation/continuous_batching/continuous_api.py``: ``generate_batch`` l.1413-1415 pops one value and
  passes it to ``add_requests`` l.1454; ``ContinuousBatchingManager.add_request`` takes one per request).
* ``peer_decode_step``: the time of one CB decode step with R requests of L cached tokens each, after a
  prefix-cache warm-up that avoids CB's cross-request prefill cost (see its docstring).
* ``peer_sequential_generate``: plain ``model.generate``, one request at a time (greedy, DynamicCache).

Both peers are greedy and, by default, ignore EOS (every request generates exactly its budget), so a
serving engine compared with them does the same work; their greedy tokens were checked equal to
per-request ``generate`` (``scripts/probe_peer_serving.py --part check`` and ``--part b``). ``PeerRun``
holds what one run measured.

Measured here (SmolLM2-135M fp32, 2 threads; ``scripts/probe_peer_serving.py``): one CB+sdpa decode step
with 16 requests × 4096 cached tokens takes ~7.3 s (2.7 s with ``sdpa_gqa=True``), where 16 sequential
batch-1 decode steps at 4K take ~1.6 s; on the 64-request mixed workload CB+sdpa gives 11.4 tokens/s
(14.5 with ``sdpa_gqa=True``) and sequential ``generate`` 15.8.

Times are ``time.perf_counter`` seconds. Benchmarks are never tests: on a shared machine compare runs
made back to back, and note the load.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import measure

__all__ = [
    "PeerRun",
    "cb_config",
    "compare_tokens",
    "peer_decode_step",
    "peer_generate_batch",
    "peer_sequential_generate",
]

CB_SAFETY_MARGIN = 0.15  # FIFOScheduler default (scheduler.py): below 15% free cache, no new prefills


@dataclass
class PeerRun:
    """What one peer run measured. Times in seconds from ``t0``, the moment every request was submitted."""

    name: str
    tokens: list[list[int]]  # generated ids per request, in input order
    prompt_tokens: int
    wall_s: float  # t0 -> last request finished (setup excluded)
    setup_s: float  # before t0: CB manager, cache and mask allocation (0 for sequential generate)
    ttft_s: list[float]  # per request: t0 -> its first generated token
    token_times_s: list[list[float]]  # per request: time of each generated token, from t0
    step_times_s: list[float]  # distinct times at which a forward step produced tokens, from t0
    decode_step_s: float | None = None  # median step gap while every request is decoding (None if none)
    decode_steps: int = 0  # gaps behind decode_step_s
    peak_rss_growth_mib: float | None = None  # peak RSS over the RSS before the run (measure.peak_growth)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time (t0 -> last finish)."""
        return self.new_tokens / self.wall_s if self.wall_s > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-able headline numbers (no per-token lists)."""
        med = statistics.median
        return {
            "name": self.name,
            "requests": len(self.tokens),
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "wall_s": round(self.wall_s, 3),
            "setup_s": round(self.setup_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_median_s": round(med(self.ttft_s), 3) if self.ttft_s else None,
            "ttft_max_s": round(max(self.ttft_s), 3) if self.ttft_s else None,
            "steps": len(self.step_times_s),
            "decode_step_ms": None if self.decode_step_s is None else round(self.decode_step_s * 1e3, 1),
            "decode_steps": self.decode_steps,
            "peak_rss_growth_mib": None
            if self.peak_rss_growth_mib is None
            else round(self.peak_rss_growth_mib, 1),
            "info": self.info,
        }


def compare_tokens(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Per-request equality of two token lists: {"equal", "requests", "mismatches": [(i, first diff)]}."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} requests")
    bad = []
    for i, (x, y) in enumerate(zip(a, b)):
        if list(x) != list(y):
            j = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            bad.append((i, j))
    return {"equal": not bad, "requests": len(a), "mismatches": bad}


def _budgets(prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int]) -> list[int]:
    if isinstance(max_new_tokens, int):
        out = [max_new_tokens] * len(prompts)
    else:
        out = [int(m) for m in max_new_tokens]
        if len(out) != len(prompts):
            raise ValueError(f"{len(out)} budgets for {len(prompts)} prompts")
    if any(m < 1 for m in out):
        raise ValueError("every max_new_tokens must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, and no empty prompt")
    return out


def _eos(model: Any, ignore_eos: bool) -> int | list[int]:
    """-1 disables EOS in both CB (RequestState drops negative ids) and generate (never matches a token)."""
    eos = model.generation_config.eos_token_id
    return -1 if ignore_eos or eos is None else eos


def _gen_config(model: Any, max_new_tokens: int, ignore_eos: bool) -> Any:
    from transformers import GenerationConfig

    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    return GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=_eos(model, ignore_eos), pad_token_id=pad
    )


def cb_config(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    *,
    page_size: int = 256,
    max_batch_tokens: int = 1024,
    headroom: float = 1.1,
    max_memory_percent: float = 0.95,
    allow_block_sharing: bool = True,
    scheduler_type: str = "fifo",
) -> Any:
    """A ``ContinuousBatchingConfig`` sized for this workload on CPU.

    Left to itself CB sizes the cache from free memory (60% of free RAM on CPU) with ``max_batch_tokens``
    8192, and preallocates a float mask of (max_batch_tokens, cache tokens + max_batch_tokens) that it fills
    at every reset: gigabytes on this box. Here ``num_blocks`` holds every request at once (prompt + budget,
    rounded up to pages, plus one page each), divided by (1 - the FIFO scheduler's 15% safety margin, under
    which it stops admitting prefills) and times ``headroom``. ``max_memory_percent`` is then only a guard:
    CB raises ``MemoryError`` if the footprint (cache + per-token read buffers + mask) exceeds that share of
    (total - RSS). Its CPU default is 0.6, and CB takes "total" from the NUMA node's MemTotal when the process
    has a NUMA memory list (``utils.py`` ``get_device_and_memory_breakdown``): 8.8 GiB on this VM, whose
    /proc/meminfo says 23 GiB; hence 0.95 here.
    ``auto_switch_to_flash`` is off so ``sdpa`` stays ``sdpa``.
    """
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    budgets = _budgets(prompts, max_new_tokens)
    need = sum(math.ceil((len(p) + m) / page_size) + 1 for p, m in zip(prompts, budgets))
    num_blocks = math.ceil(need * headroom / (1.0 - CB_SAFETY_MARGIN))
    return ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_memory_percent=max_memory_percent,
        allow_block_sharing=allow_block_sharing,
        scheduler_type=scheduler_type,
        auto_switch_to_flash=False,
    )


def _geometry(manager: Any) -> dict[str, Any]:
    """Sizes CB actually allocated: cache tensor, preallocated mask, resolved config."""
    cfg = manager.continuous_batching_config
    bp = manager.batch_processor
    info: dict[str, Any] = {
        "attn_implementation": manager.model.config._attn_implementation,
        "page_size": cfg.page_size,
        "max_requests_per_batch": cfg.max_requests_per_batch,
        "max_blocks_per_request": cfg.max_blocks_per_request,  # 0: no decode fast path (flash only)
        "use_async_batching": cfg.use_async_batching,
        "use_cuda_graph": list(cfg.use_cuda_graph) if cfg.use_cuda_graph is not None else None,
        "scheduler_type": cfg.scheduler_type,
        "allow_block_sharing": cfg.allow_block_sharing,
    }
    if bp is not None:
        cache, io = bp.cache, bp.inputs_and_outputs
        info.update(
            num_blocks=cache.num_blocks,
            max_batch_tokens=cache.max_batch_tokens,
            cache_tokens=cache.max_tokens_read,
            cache_mib=round(cache.cache_tensor.nbytes / 2**20, 1),
            prefix_sharing=cache.use_prefix_sharing,
        )
        masks = getattr(io, "attention_mask", None)
        if isinstance(masks, dict):
            info["mask_shapes"] = {k: list(v.shape) for k, v in masks.items()}
            info["mask_mib"] = round(sum(v.nbytes for v in masks.values()) / 2**20, 1)
    return info


class _Probe:
    """Per-step times of CB's KV gather (``PagedAttentionCache.update``: index_copy + index_select) and of the
    attention call (``sdpa_attention_forward``: repeat_kv + SDPA with the float mask), plus Σq / Σk / mask
    shape seen by layer 0. Installed on one cache object and on the global ``ALL_ATTENTION_FUNCTIONS["sdpa"]``
    entry, both restored on exit."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def installed(self, cache: Any) -> Iterator[None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        real_update = cache.update
        real_attn = ALL_ATTENTION_FUNCTIONS["sdpa"]
        had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
        steps = self.steps

        def update(key_states: Any, value_states: Any, layer_idx: int, kwargs: Any) -> Any:
            t = time.perf_counter()
            out = real_update(key_states, value_states, layer_idx, kwargs)
            dt = time.perf_counter() - t
            if layer_idx == 0:
                steps.append(
                    {"q": int(key_states.shape[-2]), "k": int(out[0].shape[-2]), "kv_s": 0.0, "attn_s": 0.0}
                )
            if steps:
                steps[-1]["kv_s"] += dt
            return out

        def attn(
            module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *a: Any, **kw: Any
        ) -> Any:
            t = time.perf_counter()
            out = real_attn(module, query, key, value, attention_mask, *a, **kw)
            dt = time.perf_counter() - t
            if steps:
                steps[-1]["attn_s"] += dt
                if getattr(module, "layer_idx", None) == 0 and attention_mask is not None:
                    steps[-1]["mask"] = list(attention_mask.shape)
                    steps[-1]["mask_contiguous"] = bool(attention_mask.is_contiguous())
            return out

        cache.update = update
        ALL_ATTENTION_FUNCTIONS["sdpa"] = attn
        try:
            yield
        finally:
            del cache.update
            if had_local:
                ALL_ATTENTION_FUNCTIONS["sdpa"] = real_attn
            else:
                del ALL_ATTENTION_FUNCTIONS["sdpa"]


def _step_times(token_times: Sequence[Sequence[float]], tol: float = 1e-3) -> list[float]:
    """Distinct step times: token times of one step are microseconds apart, steps are >= ms apart."""
    flat = sorted(t for ts in token_times for t in ts)
    out: list[float] = []
    for t in flat:
        if not out or t - out[-1] > tol:
            out.append(t)
    return out


def _decode_window(
    token_times: Sequence[Sequence[float]], steps: Sequence[float]
) -> tuple[float | None, int]:
    """Median gap between consecutive steps while every request is decoding: after the last request's first
    token and up to the first request's last token. (None, 0) when that window holds no gap."""
    if not token_times or any(not ts for ts in token_times):
        return None, 0
    lo = max(ts[0] for ts in token_times)
    hi = min(ts[-1] for ts in token_times)
    inside = [t for t in steps if lo - 1e-3 <= t <= hi + 1e-3]
    gaps = [b - a for a, b in itertools.pairwise(inside)]
    return (statistics.median(gaps), len(gaps)) if gaps else (None, 0)


def _collect(manager: Any, ids: set[str], timeout_s: float | None) -> dict[str, Any]:
    """Wait for every request id to finish; raise if one fails or the generation thread dies."""
    results: dict[str, Any] = {}
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    while len(results) < len(ids):
        r = manager.get_result(timeout=1)
        if r is None:
            if not manager.is_running():
                err = manager.background_thread_status.fatal_error
                raise RuntimeError(
                    f"CB generation thread stopped with {len(ids) - len(results)} requests left: {err}"
                )
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError(f"CB: {len(ids) - len(results)} requests unfinished after {timeout_s} s")
            continue
        if r.request_id in ids and r.is_finished():
            if r.error is not None:
                raise RuntimeError(f"CB request {r.request_id} failed: {r.error}")
            results[r.request_id] = r
    return results


@contextlib.contextmanager
def _hard_stop_on_error(manager: Any) -> Iterator[None]:
    try:
        yield
    except BaseException:
        manager.stop(block=True, timeout=60, hard_stop=True)
        raise


def _cb_run(
    model: Any,
    prompts: list[list[int]],
    budgets: list[int],
    config: Any,
    ignore_eos: bool,
    warm_prompts: list[list[int]] | None,
    instrument: bool,
    timeout_s: float | None,
) -> tuple[list[Any], float, float, dict[str, Any], list[dict[str, Any]]]:
    """Run through the manager generate_batch wraps. Returns (outputs in input order, t_setup_start, t0,
    geometry, probe steps)."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gc_ = _gen_config(model, max(budgets), ignore_eos)
    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in prompts),
        max_generated_length=max(budgets),
        num_requests=len(prompts),
    )
    probe = _Probe()
    t_setup = time.perf_counter()
    with model.continuous_batching_context_manager(
        generation_config=gc_,
        continuous_batching_config=config,
        block=True,
        timeout=None,
        warmup=True,  # on CPU only creates the batch processor (cache + static tensors); no graphs
        workload_hints=hints,
    ) as manager:
        geometry = _geometry(manager)
        cm = probe.installed(manager.batch_processor.cache) if instrument else contextlib.nullcontext()
        # on error / timeout / Ctrl-C: hard stop, else the context manager's stop() flushes every pending request
        with cm, _hard_stop_on_error(manager):
            for i, w in enumerate(warm_prompts or []):
                rid = f"warm_{i}"
                # budget 2, not 1: a request that finishes in its prefill step never registers its pages
                # (update_batch sets FINISHED before mark_complete_blocks, which then returns early)
                manager.add_request(w, request_id=rid, max_new_tokens=2)
                _collect(manager, {rid}, timeout_s)
            warm_steps = len(probe.steps)
            t0 = time.perf_counter()
            # generate_batch submits in this order when prefix sharing is on (add_requests sorts the inputs to
            # maximize cache hits, continuous_api.py ContinuousBatchingManager.add_requests); ids keep input order
            order = list(range(len(prompts)))
            if getattr(manager, "_use_prefix_sharing", False):
                order.sort(key=lambda i: prompts[i], reverse=True)
            for i in order:
                manager.add_request(
                    prompts[i], request_id=f"req_{i}", max_new_tokens=budgets[i], record_timestamps=True
                )
            res = _collect(manager, {f"req_{i}" for i in range(len(prompts))}, timeout_s)
    outs = [res[f"req_{i}"] for i in range(len(prompts))]
    return outs, t_setup, t0, geometry, probe.steps[warm_steps:]


def _cb_peer_run(
    name: str, prompts: list[list[int]], outs: list[Any], t_setup: float, t0: float, info: dict[str, Any]
) -> PeerRun:
    token_times = [[t - t0 for t in (o.timestamps or [])] for o in outs]
    if any(len(tt) != len(o.generated_tokens) for tt, o in zip(token_times, outs)):
        raise RuntimeError("CB returned fewer timestamps than tokens")
    steps = _step_times(token_times)
    dstep, nsteps = _decode_window(token_times, steps)
    end = max(o.lifespan[1] for o in outs)
    return PeerRun(
        name=name,
        tokens=[list(o.generated_tokens) for o in outs],
        prompt_tokens=sum(len(p) for p in prompts),
        wall_s=end - t0,
        setup_s=t0 - t_setup,
        ttft_s=[o.timestamps[0] - o.created_time for o in outs],
        token_times_s=token_times,
        step_times_s=steps,
        decode_step_s=dstep,
        decode_steps=nsteps,
        info=info,
    )


@contextlib.contextmanager
def _sdpa_gqa(force: bool | None) -> Iterator[None]:
    """Set ``TRANSFORMERS_SDPA_FORCE_GQA`` for the run (None: leave the environment alone).

    transformers' sdpa wrapper passes ``enable_gqa=True`` only without a mask (``sdpa_attention.py``
    ``use_gqa_in_sdpa``; XPU / MPS aside) and otherwise, with more than one query, copies K and V to every
    query head with ``repeat_kv``. CB always passes a mask, so on CPU every layer of every step repeats all
    gathered keys and values 3× for SmolLM2 (Hq 9, Hkv 3). The variable (read at every call) switches to
    ``enable_gqa=True`` with the mask: same tokens, 2.7-2.8× faster CB decode steps here.
    """
    if force is None:
        yield
        return
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    old = os.environ.get(key)
    os.environ[key] = "1" if force else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def _gqa_forced() -> bool:
    return os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1"


def _with_peak(call: Any) -> tuple[Any, float | None]:
    box: list[Any] = []
    growth = measure.peak_growth(lambda: box.append(call()))
    return box[0], None if growth is None else growth / 2**20


def peer_generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    *,
    config: Any = None,
    api: str = "auto",
    ignore_eos: bool = True,
    instrument: bool = False,
    timeout_s: float | None = None,
    sdpa_gqa: bool | None = None,
) -> PeerRun:
    """transformers continuous batching (model as loaded, e.g. ``sdpa``), every request submitted at t0.

    ``max_new_tokens``: one int, or one per request. ``api``: ``"generate_batch"`` calls
    ``model.generate_batch`` (needs one shared budget), ``"manager"`` drives the manager it wraps with a
    budget per request, ``"auto"`` picks ``generate_batch`` when all budgets are equal. ``config``: a
    ``ContinuousBatchingConfig`` (default ``cb_config(prompts, max_new_tokens)``). ``instrument`` (manager
    only) adds ``info["probe"]``: per-step KV-gather and attention seconds and the Σq / Σk / mask shapes.

    Returns a ``PeerRun``: tokens per request (input order), wall time (t0 -> last finish) and tokens/s,
    setup time (manager + cache + mask allocation), TTFT per request (t0 -> first token; CB stamps a token
    when the step that produced it is processed, ``requests.py`` ``update_and_check_completion``), the step
    times, the median decode step while every request decodes, peak RSS growth, and the CB geometry.
    ``sdpa_gqa``: True / False sets ``TRANSFORMERS_SDPA_FORCE_GQA`` for the run (see ``_sdpa_gqa``; the run
    name gets ``+enable_gqa`` when it is on), None leaves the environment alone.
    Raises if any request fails (``generate_batch`` itself only logs failures and returns partial results).
    """
    prompts = [list(map(int, p)) for p in prompts]
    budgets = _budgets(prompts, max_new_tokens)
    config = config if config is not None else cb_config(prompts, budgets)
    if api == "auto":
        api = "generate_batch" if len(set(budgets)) == 1 and not instrument else "manager"
    if api not in ("generate_batch", "manager"):
        raise ValueError(f"api must be 'auto', 'generate_batch' or 'manager', got {api!r}")
    if api == "generate_batch" and len(set(budgets)) != 1:
        raise ValueError("generate_batch takes one max_new_tokens for all requests (transformers 5.24)")
    if api == "generate_batch" and instrument:
        raise ValueError("instrument needs api='manager'")
    impl = model.config._attn_implementation

    if api == "generate_batch":

        def call() -> tuple[list[Any], float, float]:
            t_setup = time.perf_counter()
            got = model.generate_batch(
                prompts,
                generation_config=_gen_config(model, budgets[0], ignore_eos),
                continuous_batching_config=config,
                record_timestamps=True,
                progress_bar=False,
            )
            if len(got) != len(prompts) or any(
                o.error is not None or not o.is_finished() for o in got.values()
            ):
                errs = {k: o.error for k, o in got.items() if o.error is not None}
                raise RuntimeError(f"generate_batch: {len(got)}/{len(prompts)} results, errors {errs}")
            outs = list(got.values())  # generate_batch returns them in input order
            return outs, t_setup, min(o.created_time for o in outs)

        with _sdpa_gqa(sdpa_gqa):
            gqa = _gqa_forced()
            (outs, t_setup, t0), peak = _with_peak(call)
        info = {"api": "generate_batch", "attn_implementation": impl, **_config_info(config)}
    else:

        def call2() -> Any:
            return _cb_run(model, prompts, budgets, config, ignore_eos, None, instrument, timeout_s)

        with _sdpa_gqa(sdpa_gqa):
            gqa = _gqa_forced()
            (outs, t_setup, t0, info, probe_steps), peak = _with_peak(call2)
        info = {"api": "manager", **info}
        if instrument:
            info["probe"] = _probe_summary(probe_steps)
    info["sdpa_force_gqa"] = gqa
    name = f"generate_batch+{impl}" + ("+enable_gqa" if gqa else "")
    run = _cb_peer_run(name, prompts, outs, t_setup, t0, info)
    run.peak_rss_growth_mib = peak
    return run


def _config_info(config: Any) -> dict[str, Any]:
    """The sizes implied by an explicit config (used where the manager is not reachable: generate_batch)."""
    out = {
        "page_size": config.page_size,
        "num_blocks": config.num_blocks,
        "max_batch_tokens": config.max_batch_tokens,
    }
    if config.num_blocks and config.max_batch_tokens:
        tokens = config.num_blocks * config.page_size
        m = config.max_batch_tokens
        out["cache_tokens"] = tokens
        out["mask_shape"] = [1, 1, m, tokens + m]
        out["mask_mib_fp32"] = round(m * (tokens + m) * 4 / 2**20, 1)
    return out


def _probe_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    if not steps:
        return {"steps": 0}
    decode = [s for s in steps if s["q"] == steps[-1]["q"]] or steps
    med = statistics.median
    return {
        "steps": len(steps),
        "first_step": steps[0],
        "last_step": steps[-1],
        "max_q": max(s["q"] for s in steps),
        "max_k": max(s["k"] for s in steps),
        "kv_gather_ms_median_last_q": round(med(s["kv_s"] for s in decode) * 1e3, 1),
        "attention_ms_median_last_q": round(med(s["attn_s"] for s in decode) * 1e3, 1),
        "per_step": [
            {
                "q": s["q"],
                "k": s["k"],
                "kv_ms": round(s["kv_s"] * 1e3, 1),
                "attn_ms": round(s["attn_s"] * 1e3, 1),
            }
            for s in steps
        ],
    }


def peer_decode_step(
    model: Any,
    contexts: Sequence[Sequence[int]],
    new_tokens: int = 8,
    *,
    page_size: int = 32,
    max_batch_tokens: int = 512,
    instrument: bool = True,
    timeout_s: float | None = None,
    sdpa_gqa: bool | None = None,
) -> PeerRun:
    """One CB decode step with R = len(contexts) requests of len(context) cached tokens each.

    Why not just ``generate_batch`` cold: with sdpa, CB packs every scheduled request into one row and masks
    a dense (Σq, Σk) score matrix, so a prefill chunk scheduled next to R running requests also scores
    against all their keys: cold prefill costs ~Σ prompt × Σ keys / 2 scores instead of R × L² / 2. Cold
    16 × 1024 took 250 s here; 16 × 4096 would be ~16× that (about an hour on 2 cores).

    So, in one manager: (1) each context's first ``k·page_size`` tokens (k = (L-1) // page_size, what CB's
    prefix matcher can reuse, ``cache_allocator.py`` ``match_prefix_blocks``) is submitted alone with a
    budget of 2 and run to completion; its complete pages stay in CB's prefix cache. (2) All R full contexts
    are submitted at t0 with ``new_tokens`` each: each reuses its cached pages and prefills only its tail
    (1..page_size tokens), then all R decode together. The decode step time (median gap between steps once
    every request has its first token) does not depend on how the keys reached the cache. ``info["probe"]``
    shows the Σq of phase 2's first step (R × tail when the prefix cache hit) and per-step KV-gather /
    attention times; ``info["prefix_cache_hit"]`` checks it. ``setup_s`` includes phase 1, and TTFT is not a
    cold TTFT (prefill was done in phase 1). ``sdpa_gqa``: as in ``peer_generate_batch``.
    """
    prompts = [list(map(int, c)) for c in contexts]
    if new_tokens < 2:
        raise ValueError("need new_tokens >= 2 to see a decode step after the first token")
    warm = [p[: ((len(p) - 1) // page_size) * page_size] for p in prompts]
    warm = [w for w in warm if w]
    # headroom: phase 1 leaves its pages cached (not free); under 15% free the scheduler would evict them
    config = cb_config(
        prompts, new_tokens, page_size=page_size, max_batch_tokens=max_batch_tokens, headroom=1.3
    )

    def call() -> Any:
        return _cb_run(model, prompts, [new_tokens] * len(prompts), config, True, warm, instrument, timeout_s)

    with _sdpa_gqa(sdpa_gqa):
        gqa = _gqa_forced()
        (outs, t_setup, t0, info, probe_steps), peak = _with_peak(call)
    impl = info.get("attn_implementation", model.config._attn_implementation)
    info["sdpa_force_gqa"] = gqa
    tails = sum(len(p) for p in prompts) - sum(len(w) for w in warm)
    info = {"api": "manager, prefix-warmed", "warm_prefill_tokens": sum(len(w) for w in warm), **info}
    info["tail_prefill_tokens"] = tails
    if instrument:
        info["probe"] = _probe_summary(probe_steps)
        # the prefix cache hit iff phase 2 prefilled only the tails (in batches of at most max_batch_tokens)
        first_qs = [s["q"] for s in probe_steps[: math.ceil(tails / max_batch_tokens)]]
        info["prefix_cache_hit"] = sum(first_qs) == tails
    name = f"generate_batch+{impl}" + ("+enable_gqa" if gqa else "") + " decode step"
    run = _cb_peer_run(name, prompts, outs, t_setup, t0, info)
    run.peak_rss_growth_mib = peak
    return run


class _Clock:
    """A generate streamer that only records when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def peer_sequential_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    *,
    ignore_eos: bool = True,
    time_budget_s: float | None = None,
) -> PeerRun:
    """Plain ``model.generate``, one request after another (greedy, batch 1, DynamicCache, the model's
    attention implementation, e.g. sdpa). All requests count as submitted at t0, so request i's TTFT includes
    waiting for requests 0..i-1 (``info["own_ttft_s"]`` is from its own start).

    ``attention_mask`` is passed as ones: otherwise generate infers padding from ``pad_token_id`` whenever
    pad != eos and masks any prompt token equal to it (SmolLM2: pad = eos = 2 = <|im_end|>; with EOS ignored
    (-1) chat prompts would lose their <|im_end|> tokens). ``time_budget_s``: stop starting new requests
    after this many seconds; ``info["completed"]`` says how many ran (tokens/s is then over those).
    """
    from transformers.generation.streamers import BaseStreamer

    class Clock(_Clock, BaseStreamer):
        pass

    prompts = [list(map(int, p)) for p in prompts]
    budgets = _budgets(prompts, max_new_tokens)
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    impl = model.config._attn_implementation

    def call() -> Any:
        tokens, times, own, cache_cls = [], [], [], None
        t0 = time.perf_counter()
        for p, m in zip(prompts, budgets):
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                break
            clock = Clock()
            ids = torch.tensor([p])
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=_gen_config(model, m, ignore_eos),
                    streamer=clock,
                    return_dict_in_generate=True,
                )
            cache_cls = cache_cls or type(getattr(out, "past_key_values", None)).__name__
            tokens.append(out.sequences[0, len(p) :].tolist())
            times.append([t - t0 for t in clock.times])
            own.append(clock.times[0] - start if clock.times else math.nan)
            del out
        end = time.perf_counter()
        return tokens, times, own, cache_cls, t0, end

    (tokens, times, own, cache_cls, t0, end), peak = _with_peak(call)
    gc.collect()
    steps = _step_times(times)
    gaps = [b - a for ts in times for a, b in itertools.pairwise(ts)]
    return PeerRun(
        name=f"sequential generate+{impl}",
        tokens=tokens,
        prompt_tokens=sum(len(p) for p in prompts[: len(tokens)]),
        wall_s=end - t0,
        setup_s=0.0,
        ttft_s=[ts[0] for ts in times if ts],
        token_times_s=times,
        step_times_s=steps,
        decode_step_s=statistics.median(gaps) if gaps else None,  # batch 1: median ms/token
        decode_steps=len(gaps),
        peak_rss_growth_mib=peak,
        info={
            "completed": len(tokens),
            "submitted": len(prompts),
            "cache": cache_cls,
            "own_ttft_s": own,
            "attn_implementation": impl,
        },
    )
