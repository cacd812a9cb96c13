"""`attnopt generate`: SmolLM2 continues a long prompt past its 8K-token context with the streaming cache.

The streaming cache (4 attention sinks + a ring of the most recent tokens, positions assigned inside
the cache) keeps memory and time per token constant however long generation runs. A progress bar shows
tokens/s, ms/token, the cache's size and the process RSS as it goes; then the same prompt runs with
transformers' DynamicCache + sdpa for ``--compare`` tokens, and a table shows both at the same points.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .bench.generation import docs_ids, rss_mib

__all__ = ["run"]


def _step(model: Any, token: int, pos: int, cache: Any, gen: torch.Generator, temperature: float) -> int:
    logits = model(
        input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]), cache=cache, use_cache=True
    ).logits[0, -1]
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=gen))


def _stream(
    console: Any,
    model: Any,
    ids: torch.Tensor,
    cache: Any,
    n: int,
    label: str,
    temperature: float,
    marks: list[int],
    context: int,
) -> tuple[list[int], dict[int, dict[str, float]]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    gen = torch.Generator().manual_seed(0)
    out: list[int] = []
    at: dict[int, dict[str, float]] = {}
    times: list[float] = []
    with (
        torch.no_grad(),
        Progress(
            TextColumn(f"[bold]{label}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress,
    ):
        task = progress.add_task(label, total=n, info="prefill")
        logits = model(input_ids=ids[None], cache=cache, use_cache=True).logits[0, -1]
        token = int(logits.argmax())
        for i in range(n):
            pos = ids.numel() + i
            t = time.perf_counter()
            token = _step(model, token, pos, cache, gen, temperature)
            times.append((time.perf_counter() - t) * 1e3)
            out.append(token)
            if i + 1 in marks:
                at[i + 1] = {"ms_per_token": statistics.median(times[-128:]), "rss_mib": rss_mib()}
            if i % 16 == 0 or i + 1 == n:
                ms = statistics.median(times[-64:])
                past = " [green]past the model's context[/]" if pos >= context else ""
                progress.update(
                    task,
                    completed=i + 1,
                    info=f"{1e3 / ms:6.1f} tok/s  {ms:6.1f} ms/token  position {pos}  "
                    f"cache {cache.get_seq_length() if hasattr(cache, 'get_seq_length') else '?'} seen  "
                    f"RSS {rss_mib():.0f} MiB{past}",
                )
    return out, at


def run(
    console: Any,
    *,
    prompt_tokens: int,
    new_tokens: int,
    sinks: int,
    window: int,
    compare: int,
    temperature: float,
    threads: int,
) -> int:
    from rich.table import Table

    from . import demo
    from .integrations.transformers import make_cache

    torch.set_num_threads(threads)
    console.print("[bold]attnopt generate[/]: SmolLM2-135M-Instruct (fp32) streaming past its context")
    model, tok = demo.load_smollm2("attnopt")
    context = int(model.config.max_position_embeddings)
    ids = docs_ids(tok, prompt_tokens)
    console.print(
        f"prompt: {prompt_tokens} tokens of Python's documentation; {new_tokens} new tokens "
        f"(context {context}); streaming cache: {sinks} sinks + window {window}; "
        f"{'greedy' if temperature <= 0 else f'sampling T={temperature}, seed 0'}; {threads} threads"
    )
    marks = sorted(
        {m for m in (256, 1024, 2048, 4096, 8192, 16384, 32768, new_tokens, compare) if 0 < m <= new_tokens}
    )
    ours, at_ours = _stream(
        console,
        model,
        ids,
        make_cache(model, "streaming", sinks=sinks, window=window),
        new_tokens,
        "attnopt streaming",
        temperature,
        marks,
        context,
    )
    at_ref: dict[int, dict[str, float]] = {}
    if compare:
        from transformers import DynamicCache

        model.set_attn_implementation("sdpa")
        _, at_ref = _stream(
            console,
            model,
            ids,
            DynamicCache(config=model.config),
            min(compare, new_tokens),
            "DynamicCache + sdpa",
            temperature,
            marks,
            context,
        )
        model.set_attn_implementation("attnopt")
    table = Table(title="ms/token and process RSS at the same points (median of the last 128 steps)")
    for col in (
        "new tokens",
        "streaming ms/token",
        "streaming RSS MiB",
        "DynamicCache+sdpa ms/token",
        "DynamicCache+sdpa RSS MiB",
    ):
        table.add_column(col, justify="right")
    for m in marks:
        a, b = at_ours.get(m), at_ref.get(m)
        table.add_row(
            str(m),
            f"{a['ms_per_token']:.1f}" if a else "",
            f"{a['rss_mib']:.0f}" if a else "",
            f"{b['ms_per_token']:.1f}" if b else "—",
            f"{b['rss_mib']:.0f}" if b else "—",
        )
    console.print(table)
    tail = tok.decode(ours[-120:])
    console.print(f"[bold]last 120 generated tokens[/] (position {prompt_tokens + new_tokens}):\n{tail}")
    return 0
