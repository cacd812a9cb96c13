"""`attnopt serve`: a file of prompts through the continuous batching engine, with a live display.

The prompts file is JSON lines, one request per line::

    {"prompt": "text", "max_new_tokens": 32, "id": "q1"}   # max_new_tokens and id optional
    {"prompt_ids": [1, 2, 3]}                              # token ids, used as they are

or, when its first non-blank line does not start with ``{``, plain text with one prompt per line. Text
prompts are tokenized with the model's tokenizer (through its chat template with ``--chat``).

Every request is submitted at once; then ``Engine.step`` runs until all are done, and a live display shows
after each step the generated and prompt tokens per second, the requests done / running / waiting and the
KV pool's use. A summary table follows (throughput, time to first token, pool peak); completions go to
``--out`` as JSON lines, or the first few are printed.

Everything that can be checked before the model loads (the file, the memory budget, the output path) is,
so a mistake costs no model load. Errors print one line on stderr and return 2.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PromptSpec", "PromptsError", "read_prompts_file", "run"]

_FIELDS = ("prompt", "prompt_ids", "max_new_tokens", "id")
SHOW = 4  # completions printed when there is no --out


class PromptsError(ValueError):
    """The prompts file cannot be used; the message names the file and line."""


@dataclass
class PromptSpec:
    """One line of the prompts file: text or token ids, an optional budget and id."""

    where: str  # "file:line", for error messages
    id: Any
    text: str | None = None
    ids: list[int] | None = None
    max_new_tokens: int | None = None


@dataclass
class _Result:
    spec: PromptSpec
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    ttft: float | None = None
    latency: float | None = None


# ------------------------------------------------------------------------------------ prompts file


def read_prompts_file(path: str | os.PathLike) -> list[PromptSpec]:
    """Parse a prompts file (JSON lines, or plain text with one prompt per line); nothing is tokenized.

    JSON lines mode is chosen when the first non-blank line starts with ``{``; then every non-blank line
    must be an object with exactly one of ``prompt`` (non-empty text) or ``prompt_ids`` (non-empty list of
    non-negative ints), and optionally ``max_new_tokens`` (int >= 1) and ``id`` (string or int, unique;
    default: the prompt's 0-based index). Raises ``PromptsError`` naming the file and line.
    """
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise PromptsError(f"prompts file not found: {name}") from None
    except IsADirectoryError:
        raise PromptsError(f"{name} is a directory, not a prompts file") from None
    except UnicodeDecodeError as e:
        raise PromptsError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PromptsError(f"cannot read {name}: {e.strerror or e}") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise PromptsError(f"{name} has no prompts (empty file)")
    json_lines = numbered[0][1].lstrip().startswith("{")
    specs: list[PromptSpec] = []
    for n, line in numbered:
        where = f"{name}:{n}"
        specs.append(
            _json_spec(line, where, len(specs)) if json_lines else PromptSpec(where, len(specs), line)
        )
    seen: dict[Any, str] = {}
    for s in specs:
        key = (type(s.id).__name__, s.id)
        if key in seen:
            raise PromptsError(f"{s.where}: duplicate id {s.id!r} (first at {seen[key]})")
        seen[key] = s.where
    return specs


def _json_spec(line: str, where: str, index: int) -> PromptSpec:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptsError(
            f"{where}: not a JSON object ({e.msg} at column {e.colno}); a JSON-lines prompts file has one "
            f'object per line, e.g. {{"prompt": "...", "max_new_tokens": 32}}'
        ) from None
    if not isinstance(rec, dict):
        raise PromptsError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - set(_FIELDS))
    if unknown:
        raise PromptsError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(_FIELDS)}")
    if ("prompt" in rec) == ("prompt_ids" in rec):
        raise PromptsError(f"{where}: give exactly one of 'prompt' (text) or 'prompt_ids' (token ids)")
    spec = PromptSpec(where, index)
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise PromptsError(f"{where}: 'prompt' must be non-empty text, got {rec['prompt']!r}")
        spec.text = rec["prompt"]
    else:
        ids = rec["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(type(i) is int and i >= 0 for i in ids):
            raise PromptsError(f"{where}: 'prompt_ids' must be a non-empty list of non-negative ints")
        spec.ids = ids
    if "max_new_tokens" in rec:
        m = rec["max_new_tokens"]
        if type(m) is not int or m < 1:
            raise PromptsError(f"{where}: 'max_new_tokens' must be an int >= 1, got {m!r}")
        spec.max_new_tokens = m
    if "id" in rec:
        if type(rec["id"]) not in (str, int):
            raise PromptsError(f"{where}: 'id' must be a string or an int, got {rec['id']!r}")
        spec.id = rec["id"]
    return spec


def _tokenize(specs: list[PromptSpec], tok: Any, chat: bool) -> list[list[int]]:
    out = []
    for s in specs:
        if s.ids is not None:
            out.append(list(s.ids))
        elif chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": s.text}], tokenize=False, add_generation_prompt=True
            )
            out.append(list(tok(text, add_special_tokens=False)["input_ids"]))
        else:
            out.append(list(tok(s.text)["input_ids"]))
        if not out[-1]:
            raise PromptsError(f"{s.where}: the prompt tokenizes to no tokens")
    return out


# ------------------------------------------------------------------------------------------- model


def _load(model_path: str | None) -> tuple[Any, Any, str]:
    """(model on attnopt, tokenizer, description). Raises PromptsError-like ValueErrors with the cause."""
    from attnopt import demo

    if model_path is None:
        model, tok = demo.load_smollm2("attnopt")
        return model, tok, "SmolLM2-135M-Instruct (fp32)"
    if not os.path.isdir(model_path):
        raise ValueError(f"--model {model_path}: not a directory (a local Hugging Face model folder)")
    demo._quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnopt.integrations.transformers import register

    register()
    try:
        tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, attn_implementation="attnopt", local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {model_path}: cannot load it ({type(e).__name__}: {e})") from None
    return model.eval(), tok, f"{os.path.basename(os.path.normpath(model_path))} ({model.dtype})"


# ------------------------------------------------------------------------------------------ display


class _Meter:
    """Counters the live display and the summary read; updated once per engine step."""

    def __init__(self, engine: Any, n_requests: int, t0: float):
        self.engine, self.n, self.t0 = engine, n_requests, t0
        self.generated = 0
        self.done = 0
        self.peak_pages = 0
        self.recent: deque[tuple[float, int, int]] = deque([(t0, 0, 0)])
        self.now = t0

    def after_step(self, now: float, new_tokens: int, finished: int) -> None:
        self.now = now
        self.generated += new_tokens
        self.done += finished
        self.peak_pages = max(self.peak_pages, self.engine.pool.used_pages)
        self.recent.append((now, self.generated, self.engine.prefill_tokens))
        while len(self.recent) > 2 and now - self.recent[1][0] >= 2.0:  # a window of ~2 s
            self.recent.popleft()

    def rates(self) -> tuple[float, float]:
        """(generated, prompt) tokens per second over the last ~2 s."""
        (t_a, g_a, p_a), (t_b, g_b, p_b) = self.recent[0], self.recent[-1]
        dt = t_b - t_a
        return ((g_b - g_a) / dt, (p_b - p_a) / dt) if dt > 0 else (0.0, 0.0)

    def render(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        e, pool = self.engine, self.engine.pool
        mib = pool.page_bytes / 2**20
        gen_rate, prompt_rate = self.rates()
        elapsed = self.now - self.t0
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", justify="right")
        grid.add_column()
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=self.n, completed=self.done, width=30),
            f"{self.done}/{self.n} done · {len(e.running)} running · {len(e.waiting)} waiting",
        )
        grid.add_row("requests", bar)
        grid.add_row(
            "generated",
            f"{self.generated} tokens · {gen_rate:7.1f} tokens/s "
            f"(mean {self.generated / elapsed if elapsed > 0 else 0:.1f})",
        )
        grid.add_row(
            "prompt",
            f"{e.prefill_tokens} tokens prefilled · {prompt_rate:7.1f} tokens/s "
            f"(mean {e.prefill_tokens / elapsed if elapsed > 0 else 0:.1f}) · "
            f"{e.cached_tokens} from the prefix cache",
        )
        cached = len(e.prefix) if e.prefix is not None else 0
        # Pages set aside at admission for a request's coming tokens count as used (pools that reserve).
        reserved = sum(pool.reserved(r.seq) for r in e.running) if hasattr(pool, "reserved") else 0
        grid.add_row(
            "KV pool",
            f"{pool.used_pages}/{pool.num_pages} pages used"
            + (f" ({reserved} reserved)" if reserved else "")
            + f" · {pool.used_pages * mib:.1f}/{pool.num_pages * mib:.1f} MiB · {cached} cached pages",
        )
        grid.add_row("step", f"{e.steps} · {elapsed:.1f} s")
        return grid


def _quantile(xs: list[float], q: float) -> float:
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


# --------------------------------------------------------------------------------------------- run


def run(
    console: Any,
    prompts_file: str,
    *,
    max_new_tokens: int = 64,
    memory_budget: str | None = None,
    page_size: int = 16,
    max_batch_tokens: int = 512,
    cascade: bool = True,
    prefix_caching: bool = True,
    out: str | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    threads: int = 2,
    model: str | None = None,
    chat: bool = False,
) -> int:
    """Serve every prompt of ``prompts_file``; 0 when all finished, 2 on a usage error, 130 on Ctrl-C.

    ``max_new_tokens`` is the budget of lines that give none. ``temperature`` 0 is greedy; otherwise
    request i samples with seed ``seed + i``.
    """
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False)

    def fail(msg: str) -> int:
        err.print(f"[bold red]attnopt serve: error:[/] {escape(msg)}", soft_wrap=True)
        return 2

    from .engine import Engine, Request, parse_bytes

    # Everything that needs no model first.
    try:
        specs = read_prompts_file(prompts_file)
    except PromptsError as e:
        return fail(str(e))
    if memory_budget is not None:
        try:
            parse_bytes(memory_budget)
        except (TypeError, ValueError) as e:
            return fail(f"--memory-budget: {e}")
    if out is not None:
        parent = os.path.dirname(os.path.abspath(out))
        if os.path.isdir(out):
            return fail(f"--out {out} is a directory")
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            return fail(f"--out {out}: cannot write in {parent}")

    import torch

    torch.set_num_threads(threads)
    from attnopt.demo import ModelsMissing

    t_load = time.perf_counter()
    with console.status("[bold]loading the model[/]", spinner="dots"):
        try:
            llm, tok, desc = _load(model)
        except ModelsMissing as e:
            return fail(f"attnopt serve needs SmolLM2 (or --model PATH): {e}")
        except ValueError as e:
            return fail(str(e))
    load_s = time.perf_counter() - t_load
    if chat and not getattr(tok, "chat_template", None):
        err.print(
            "[yellow]attnopt serve: --chat: this tokenizer has no chat template; prompts used as they are"
        )
        chat = False
    try:
        prompts = _tokenize(specs, tok, chat)
        engine = Engine(
            llm,
            memory_budget=memory_budget,
            page_size=page_size,
            max_batch_tokens=max_batch_tokens,
            prefix_caching=prefix_caching,
            cascade=cascade,
        )
    except (ValueError, NotImplementedError) as e:
        return fail(str(e))
    pool = engine.pool
    mib = pool.page_bytes / 2**20
    console.print(
        f"[bold]attnopt serve[/]: {len(specs)} requests from {escape(prompts_file)} on {escape(desc)}, "
        f"loaded in {load_s:.1f} s; "
        f"{'greedy' if temperature <= 0 else f'sampling T={temperature}, seeds {seed}..'}; "
        f"{'chat template; ' if chat else ''}{threads} threads",
        soft_wrap=True,
    )
    console.print(
        f"KV pool: {pool.num_pages} pages of {pool.page_size} tokens ({pool.num_pages * mib:.0f} MiB); "
        f"≤ {max_batch_tokens} tokens per step; cascade {'on' if cascade else 'off'}, "
        f"prefix cache {'on' if prefix_caching else 'off'}",
        soft_wrap=True,
    )

    results: dict[Any, _Result] = {}
    t0 = time.perf_counter()
    for i, (spec, ids) in enumerate(zip(specs, prompts)):
        req = Request(
            ids,
            max_new_tokens=spec.max_new_tokens or max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            seed=seed + i,
            id=spec.id,
        )
        try:
            engine.submit(req)
        except ValueError as e:
            return fail(f"{spec.where}: {e}")
        results[spec.id] = _Result(spec, ids)

    from rich.live import Live

    meter = _Meter(engine, len(specs), t0)
    interrupted = False
    with Live(console=console, get_renderable=meter.render, auto_refresh=False, transient=False) as live:
        live.refresh()  # shown while the first step (prefill) runs
        try:
            while engine.has_work():
                events = engine.step()
                now = time.perf_counter()
                finished = 0
                for ev in events:
                    r = results[ev.id]
                    if ev.token is not None:
                        r.tokens.append(ev.token)
                        if r.ttft is None:
                            r.ttft = now - t0
                    if ev.finished:
                        r.reason, r.latency = ev.reason, now - t0
                        finished += 1
                meter.after_step(now, sum(ev.token is not None for ev in events), finished)
                live.refresh()
        except KeyboardInterrupt:
            interrupted = True
    if not console.is_terminal:  # Live leaves its last frame without a line end outside a terminal
        console.line()
    wall = time.perf_counter() - t0

    _summary(console, engine, meter, list(results.values()), wall)
    done = [r for r in results.values() if r.reason is not None]
    if out is not None:
        with open(out, "w", encoding="utf-8") as f:
            for r in done:
                f.write(json.dumps(_record(r, tok), ensure_ascii=False) + "\n")
        console.print(f"wrote {len(done)} completions to {escape(out)}")
    else:
        _show(console, done[:SHOW], tok, len(done))
    if interrupted:
        err.print(f"[yellow]attnopt serve: interrupted; {len(done)} of {len(specs)} requests finished")
        return 130
    return 0


def _record(r: _Result, tok: Any) -> dict[str, Any]:
    return {
        "id": r.spec.id,
        "prompt": r.spec.text,
        "completion": tok.decode(r.tokens, skip_special_tokens=True),
        "tokens": r.tokens,
        "prompt_tokens": len(r.prompt_ids),
        "finish_reason": r.reason,
        "ttft_s": None if r.ttft is None else round(r.ttft, 4),
        "latency_s": None if r.latency is None else round(r.latency, 4),
    }


def _summary(console: Any, engine: Any, meter: _Meter, results: list[_Result], wall: float) -> None:
    from rich.table import Table

    pool = engine.pool
    mib = pool.page_bytes / 2**20
    done = [r for r in results if r.reason is not None]
    reasons: dict[str, int] = {}
    for r in done:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    prompt_tokens = sum(len(r.prompt_ids) for r in results)
    ttfts = [r.ttft for r in results if r.ttft is not None]
    table = Table(title="attnopt serve: summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    table.add_row("requests done", f"{len(done)} of {len(results)}" + (f" ({why})" if why else ""))
    table.add_row(
        "prompt tokens",
        f"{prompt_tokens} ({engine.prefill_tokens} prefilled, {engine.cached_tokens} from the prefix cache)",
    )
    table.add_row("generated tokens", str(meter.generated))
    table.add_row("wall time", f"{wall:.2f} s ({engine.steps} steps)")
    table.add_row("generated tokens/s", f"{meter.generated / wall:.1f}" if wall > 0 else "—")
    table.add_row("prompt tokens/s (prefilled)", f"{engine.prefill_tokens / wall:.1f}" if wall > 0 else "—")
    table.add_row(
        "time to first token median / p90",
        f"{statistics.median(ttfts):.3f} s / {_quantile(ttfts, 0.9):.3f} s" if ttfts else "—",
    )
    table.add_row(
        "KV pool peak (pages used, between steps)",
        f"{meter.peak_pages} of {pool.num_pages} pages ({meter.peak_pages * mib:.1f} of "
        f"{pool.num_pages * mib:.0f} MiB)",
    )
    console.print(table)


def _show(console: Any, rows: list[_Result], tok: Any, n_done: int) -> None:
    from rich.table import Table
    from rich.text import Text

    if not rows:
        return
    title = f"first {len(rows)} of {n_done} completions (--out FILE keeps them all)"
    table = Table(title=title)
    table.add_column("id")
    table.add_column("prompt", overflow="fold", max_width=40)
    table.add_column("completion", overflow="fold")
    table.add_column("finish", justify="right")
    for r in rows:
        if r.spec.text is None:
            prompt = f"<{len(r.prompt_ids)} token ids>"
        else:
            prompt = " ".join(r.spec.text.split())
            if len(prompt) > 120:
                prompt = prompt[:40] + " … " + prompt[-77:]
        completion = tok.decode(r.tokens, skip_special_tokens=True).strip()
        table.add_row(Text(str(r.spec.id)), Text(prompt), Text(completion), r.reason or "")
    console.print(table)
