"""`attnopt demo | generate | serve | maps | variants | info | bench`: the command-line face of the library."""

from __future__ import annotations

import argparse
import sys
import time


def _console():
    try:
        from rich.console import Console
    except ImportError:  # rich lives in the [cli]/[dev] extras, not in the core library
        sys.exit("attnopt's CLI needs 'rich': pip install 'attnopt[cli]'")
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the demo's tables (rich's default is 80)
        console.width = 120
    return console


def demo(args: argparse.Namespace) -> int:
    """Real models, offline: the applications on attnopt, then eager / sdpa / attnopt side by side."""
    from attnopt.demo import run

    return run(
        _console(),
        prefill_tokens=args.prefill_tokens,
        memory_tokens=args.memory_tokens or args.prefill_tokens,
        decode_steps_n=args.decode_steps,
        repeats=args.repeats,
        max_new_tokens=args.max_new_tokens,
    )


def generate(args: argparse.Namespace) -> int:
    """SmolLM2 continues a long prompt past its context with the streaming cache, progress as it goes."""
    from attnopt.longgen import run

    return run(
        _console(),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        sinks=args.sinks,
        window=args.window,
        compare=args.compare,
        temperature=args.temperature,
        threads=args.threads,
    )


def serve(args: argparse.Namespace) -> int:
    """A file of prompts through the continuous batching engine, live tokens/s and KV pool use."""
    from attnopt.serving.cli import run

    return run(
        _console(),
        args.prompts_file,
        max_new_tokens=args.max_new_tokens,
        memory_budget=args.memory_budget,
        page_size=args.page_size,
        max_batch_tokens=args.max_batch_tokens,
        cascade=args.cascade,
        prefix_caching=args.prefix_cache,
        out=args.out,
        temperature=args.temperature,
        seed=args.seed,
        threads=args.threads,
        model=args.model,
        chat=args.chat,
    )


def maps(args: argparse.Namespace) -> int:
    """Exact attention maps of a real offline model on a prompt: offline HTML report and PNGs."""
    from attnopt.maps.cli import run

    return run(
        _console(),
        model=args.model,
        prompt=args.prompt,
        file=args.file,
        tokens=args.tokens,
        chat=args.chat,
        resolution=args.resolution,
        sinks=args.sinks,
        rows=args.rows,
        rollout=args.rollout,
        out=args.out,
        compare=args.compare,
        threads=args.threads,
    )


def variants(args: argparse.Namespace) -> int:
    """Run the variants modern LLMs use on random tensors; compare each with the float64 oracle."""
    import torch
    from rich.table import Table

    import attnopt as ao
    from attnopt import mods

    console = _console()
    torch.manual_seed(0)
    B, Hq, Hkv, S, D = 1, 8, 2, args.seq, 64
    q = torch.randn(B, Hq, S, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    lengths = torch.tensor([S * 3 // 4])
    cases = [
        ("no mask (encoder)", q, {}),
        ("causal prefill", q, {"mask": ao.causal()}),
        ("decode: 1 query, GQA 8:2", q[:, :, -1:], {"mask": ao.causal()}),
        ("sliding window 128 (Mistral)", q, {"mask": ao.sliding_window(127)}),
        ("padding & causal (batched prompts)", q, {"mask": ao.padding(lengths) & ao.causal()}),
        ("packed documents", q, {"mask": ao.document([0, S // 4, S // 2, S]) & ao.causal()}),
        ("ALiBi (BLOOM)", q, {"mask": ao.causal(), "score_mod": mods.alibi(mods.alibi_slopes(Hq))}),
        ("softcap 30 (Gemma 2)", q, {"mask": ao.causal(), "score_mod": mods.softcap(30.0)}),
        ("attention sinks (gpt-oss)", q, {"mask": ao.sliding_window(127), "sinks": torch.zeros(Hq)}),
    ]
    table = Table(
        title=f"attnopt.attention on random fp32 tensors: q (1, {Hq}, {S}, {D}), k/v (1, {Hkv}, {S}, {D})"
    )
    for col in ("variant", "backend", "max |err| vs float64", "time (ms)"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for name, qq, kw in cases:
        inputs = ao.api.validate(qq, k, v, **kw, backends=ao.available_backends())
        backend = ao._dispatch.select(inputs).name
        ao.attention(qq, k, v, **kw)  # warm-up: first-call allocations are not the steady state
        t0 = time.perf_counter()
        out = ao.attention(qq, k, v, **kw)
        ms = (time.perf_counter() - t0) * 1e3
        kw64 = {**kw, "sinks": kw["sinks"].double()} if "sinks" in kw else kw
        ref = ao.attention(qq.double(), k.double(), v.double(), **kw64, backend="reference")
        err = (out.double() - ref).abs().max().item()
        table.add_row(name, backend, f"{err:.1e}", f"{ms:.1f}")
    console.print(table)
    console.print("\n[bold]explain()[/bold] for the padded causal batch:")
    text = ao.explain(q, k, v, mask=ao.padding(lengths) & ao.causal())
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    return 0


def info(args: argparse.Namespace) -> int:
    """Versions, threads and the backends usable on this machine."""
    import torch

    import attnopt as ao

    console = _console()
    console.print(
        f"attnopt {ao.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, CUDA {torch.cuda.is_available()}"
    )
    console.print(f"available backends (priority order): {', '.join(ao.available_backends())}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Time attnopt against SDPA, compiled FlexAttention and eager PyTorch (see attnopt.bench)."""
    _console()  # a clear exit when rich is missing
    if args.serving:
        try:
            from attnopt.bench.serving import run_serving
        except ModuleNotFoundError as e:
            if e.name != "attnopt.bench.serving":
                raise
            sys.exit("attnopt bench --serving: attnopt.bench.serving is not in this installation yet")
        from attnopt.bench import plotted

        return plotted(args, run_serving)  # --plot / --from
    from attnopt.bench import run

    return run(args)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 = greedy), got {text}")
    return value


def _serving_bench_arguments(p: argparse.ArgumentParser) -> None:
    """`attnopt bench --serving` and its options (attnopt.bench.serving.run_serving reads them)."""
    p.add_argument(
        "--serving",
        action="store_true",
        help="batched serving on SmolLM2: decode step, shared prefix (cascade), end to end, vs transformers",
    )
    p.add_argument(
        "--serving-requests",
        type=_positive,
        default=16,
        help="--serving: requests of the decode-step measurement (default 16)",
    )
    p.add_argument(
        "--serving-context",
        type=_positive,
        default=4096,
        help="--serving: tokens of each request's context in the decode-step measurement (default 4096)",
    )
    p.add_argument(
        "--serving-steps", type=_positive, default=8, help="--serving: timed decode steps (default 8)"
    )
    p.add_argument(
        "--cascade-requests",
        type=_positive,
        default=32,
        help="--serving: requests sharing the prefix (default 32)",
    )
    p.add_argument(
        "--cascade-prefix",
        type=_positive,
        default=8192,
        help="--serving: shared prefix tokens (default 8192)",
    )
    p.add_argument(
        "--cascade-own",
        type=_positive,
        default=256,
        help="--serving: each request's own tokens after the prefix (default 256)",
    )
    p.add_argument(
        "--serving-e2e",
        type=int,
        default=64,
        help="--serving: requests of the mixed end-to-end workload (default 64; 0 = skip)",
    )
    p.add_argument(
        "--serving-parts",
        default="decode,cascade,e2e",
        help="--serving: which measurements to run, comma-separated (default decode,cascade,e2e)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo", help="real models offline: applications on attnopt, then eager / sdpa / attnopt side by side"
    )
    p.add_argument("--prefill-tokens", type=_positive, default=2048, help="prefill prompt length (2048)")
    p.add_argument(
        "--memory-tokens",
        type=_positive,
        default=None,
        help="prompt length of the peak-memory run (= prefill)",
    )
    p.add_argument(
        "--decode-steps",
        type=_positive,
        default=32,
        help="decode steps after the prompt, per implementation (32)",
    )
    p.add_argument(
        "--repeats", type=_positive, default=4, help="prefill runs per implementation (4; eager at most 2)"
    )
    p.add_argument("--max-new-tokens", type=_positive, default=40, help="answer length (40)")
    p.set_defaults(fn=demo)
    p = sub.add_parser(
        "generate",
        help="SmolLM2 streams past its 8K context (sinks + window cache), next to DynamicCache + sdpa",
    )
    p.add_argument("--prompt-tokens", type=_positive, default=1024, help="prompt length (1024)")
    p.add_argument("--new-tokens", type=_positive, default=9000, help="tokens to generate (9000)")
    p.add_argument("--sinks", type=int, default=4, help="attention sinks (4)")
    p.add_argument("--window", type=_positive, default=1024, help="recent tokens kept (1024)")
    p.add_argument(
        "--compare",
        type=int,
        default=4096,
        help="tokens DynamicCache + sdpa generates for the table (4096; 0: none)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (0.8)")
    p.add_argument("--threads", type=_positive, default=2, help="torch threads (2)")
    p.set_defaults(fn=generate)
    p = sub.add_parser(
        "serve",
        help="run a file of prompts through the continuous batching engine (live tokens/s, KV pool use)",
        description="Serve every prompt of PROMPTS_FILE at once with attnopt.serving's continuous batching "
        "engine (paged KV pool, prefix cache, cascade attention) on SmolLM2-135M-Instruct fp32 (or --model), "
        "with a live display of tokens/s, requests and KV pool use, then a summary.",
    )
    p.add_argument(
        "prompts_file",
        metavar="PROMPTS_FILE",
        help='JSON lines, one request a line: {"prompt": "text"} or {"prompt_ids": [...]}, optional '
        '"max_new_tokens" and "id"; or plain text, one prompt a line',
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive,
        default=64,
        metavar="N",
        help="tokens to generate for lines without their own max_new_tokens (64)",
    )
    p.add_argument(
        "--memory-budget",
        metavar="BYTES",
        default=None,
        help="KV pool size, e.g. 2GiB or 512MiB (default: a quarter of the available memory)",
    )
    p.add_argument("--page-size", type=_positive, default=16, metavar="N", help="tokens per KV page (16)")
    p.add_argument(
        "--max-batch-tokens",
        type=_positive,
        default=512,
        metavar="N",
        help="tokens per engine step: decode tokens first, then prompt chunks (512)",
    )
    p.add_argument(
        "--no-cascade",
        dest="cascade",
        action="store_false",
        help="no cascade: each request reads the pages it shares with others by itself",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="do not reuse the KV pages of earlier prompts' shared prefixes",
    )
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=0.0,
        metavar="T",
        help="sampling temperature, 0 = greedy (0)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="request i samples with seed S + i (0)")
    p.add_argument("--chat", action="store_true", help="wrap text prompts in the tokenizer's chat template")
    p.add_argument(
        "--model", metavar="PATH", default=None, help="a local Hugging Face model folder (default: SmolLM2)"
    )
    p.add_argument("--threads", type=_positive, default=2, metavar="N", help="torch threads (2)")
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="write the completions as JSON lines (default: print a few)",
    )
    p.set_defaults(fn=serve)
    p = sub.add_parser("maps", help="exact attention maps of a real model on a prompt: offline HTML and PNGs")
    p.add_argument(
        "--model", choices=("smollm2", "minilm"), default="smollm2", help="which offline model (smollm2)"
    )
    p.add_argument("--prompt", metavar="TEXT", default=None, help="the prompt text")
    p.add_argument("--file", metavar="PATH", default=None, help="read the prompt from a text file")
    p.add_argument(
        "--tokens",
        type=_positive,
        default=None,
        metavar="N",
        help="repeat or cut the text to exactly N tokens",
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--resolution", type=_positive, default=512, help="bins per axis of the pooled maps (512)")
    p.add_argument("--sinks", type=int, default=4, help="first tokens kept in bins of their own (4)")
    p.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=None,
        metavar="POS",
        help="query positions whose exact rows are kept (default: the last, -1)",
    )
    p.add_argument(
        "--rollout", action="store_true", help="also the attention rollout of --rows through the layers"
    )
    p.add_argument("--out", metavar="DIR", default="attnopt-maps", help="output folder (attnopt-maps)")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also time a plain forward pass and report time and memory ratios",
    )
    p.add_argument(
        "--threads", type=_positive, default=None, metavar="N", help="torch threads (default: torch's)"
    )
    p.set_defaults(fn=maps)
    p = sub.add_parser("variants", help="the attention variants on random tensors against the float64 oracle")
    p.add_argument("--seq", type=_positive, default=1024, help="sequence length (default 1024)")
    p.set_defaults(fn=variants)
    sub.add_parser("info", help="versions and available backends").set_defaults(fn=info)
    from attnopt.bench import add_arguments as bench_arguments

    p = sub.add_parser("bench", help="time attnopt against SDPA, FlexAttention and eager PyTorch")
    bench_arguments(p)
    _serving_bench_arguments(p)
    p.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
