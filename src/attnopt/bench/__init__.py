"""`attnopt bench`: attnopt against torch SDPA, compiled FlexAttention and eager PyTorch, same run.

Named presets (``attnopt bench --list``) × sequence lengths × dtypes × forward / forward+backward.
Each measurement reports the median time over repeats (after a warm-up), the ratio of each peer to
attnopt (peer time / attnopt time: > 1 means attnopt is faster), the peak memory of one call (see
``attnopt.bench.measure``), a rich table, and a final JSON line on stdout. A peer that cannot run says
``n/a (reason)``. ``--goals`` runs the project's goal measurements and says met / missed for each.
``--plot DIR`` draws the results as charts after the run (``attnopt.bench.plots``); with ``--from JSON``
it draws a saved run instead of measuring. ``--device cuda`` runs the preset grid on the GPU (peers
sdpa, flex and attnopt-flex by default; see ``attnopt.bench.peers``).

Benchmarks are never tests: timings on shared machines are noisy, so compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

__all__ = ["add_arguments", "plotted", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `attnopt bench` options (no heavy imports here: the CLI builds its parser eagerly)."""
    p.add_argument("--preset", action="append", metavar="NAME", help="preset (repeatable; default: all)")
    p.add_argument(
        "--n", action="append", type=int, metavar="N", help="sequence / KV length (repeatable; default 4096)"
    )
    p.add_argument("--dtype", action="append", choices=("fp32", "bf16"), help="repeatable; default fp32")
    p.add_argument("--mode", action="append", choices=("fwd", "fwdbwd"), help="repeatable; default fwd")
    p.add_argument(
        "--peer",
        action="append",
        choices=("sdpa", "flex", "eager", "attnopt-flex"),
        help="peers besides attnopt (repeatable; default on cpu: sdpa, flex, eager; on cuda: sdpa, flex, "
        "attnopt-flex = attnopt pinned to its compiled flex backend; --quick leaves out the compiled ones)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the preset grid runs (default cpu; cuda: synchronized timings, attnopt warms its flex "
        "kernel with compile_for first; not for --goals / --generation)",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed samples per measurement (default 5; --quick 3)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--batch", type=int, default=1, help="B (default 1)")
    p.add_argument("--heads", type=int, default=8, help="Hq (default 8; Hkv = Hq except decode_gqa: 2)")
    p.add_argument("--head-dim", type=int, default=64, help="D (default 64)")
    p.add_argument(
        "--mem-budget-gib",
        type=float,
        default=6.0,
        help="peers whose N×N tensors would exceed this are n/a (default 6)",
    )
    p.add_argument(
        "--quick", action="store_true", help="every preset, N=1024, fp32 fwd, 3 repeats, no flex (< 1 min)"
    )
    p.add_argument(
        "--goals",
        action="store_true",
        help="run exactly the goal measurements, print met / missed (ignores --preset/--n/--dtype/--mode/--peer)",
    )
    p.add_argument(
        "--generation",
        action="store_true",
        help="SmolLM2 decode ms/token with each KV cache (attnopt vs sdpa), streaming, perplexity",
    )
    p.add_argument("--context", type=int, default=8192, help="--generation: cached tokens (default 8192)")
    p.add_argument("--steps", type=int, default=32, help="--generation: timed decode steps (default 32)")
    p.add_argument(
        "--stream-tokens",
        type=int,
        default=0,
        help="--generation: tokens to stream (goal: 32768; default 0 = skip)",
    )
    p.add_argument(
        "--ppl-tokens",
        type=int,
        default=0,
        help="--generation: perplexity tokens (e.g. 2048; default 0 = skip)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the JSON results to PATH")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="after the run, draw the results as PNG charts into DIR (needs pip install 'attnopt[maps]'); "
        "the JSON also goes to DIR/<kind>_results.json unless --json is given",
    )
    p.add_argument(
        "--from",
        dest="plot_from",
        metavar="JSON",
        help="with --plot: draw a saved run (a --json file, or the bench's saved stdout) instead of measuring",
    )
    p.add_argument(
        "--plot-prefix",
        metavar="NAME",
        help="--plot: file-name prefix of the charts (default: the kind of run, e.g. bench_)",
    )


def _kind(args: argparse.Namespace) -> str:
    for kind in ("serving", "generation", "goals"):
        if getattr(args, kind, False):
            return kind
    return "bench"


def _draw(payload: dict, args: argparse.Namespace) -> int:
    from .plots import plot_results

    try:
        files = plot_results(payload, args.plot, prefix=args.plot_prefix)
    except ValueError as e:
        print(f"attnopt bench --plot: {e}", file=sys.stderr)
        return 1
    print("charts: " + ", ".join(str(f) for f in files), file=sys.stderr)  # stdout ends with the JSON
    return 0


def plotted(args: argparse.Namespace, bench: Callable[[argparse.Namespace], int]) -> int:
    """Run ``bench(args)`` and, with --plot DIR, draw its JSON payload; with --from, only draw."""
    plot_dir, source = getattr(args, "plot", None), getattr(args, "plot_from", None)
    if source and not plot_dir:
        sys.exit("attnopt bench: --from JSON draws charts and needs --plot DIR")
    if not plot_dir or getattr(args, "list", False):
        return bench(args)
    from .plots import load_payload, require_matplotlib

    try:
        require_matplotlib()  # before a run that may take minutes
    except ImportError as e:
        sys.exit(f"attnopt bench --plot: {e}")
    if source:
        try:
            payload = load_payload(source)
        except (OSError, ValueError) as e:
            sys.exit(f"attnopt bench --from: {e}")
        return _draw(payload, args)
    if not args.json:
        os.makedirs(plot_dir, exist_ok=True)
        args.json = os.path.join(plot_dir, f"{_kind(args)}_results.json")
    rc = bench(args)
    if rc != 0:
        return rc
    return _draw(load_payload(args.json), args)


def run(args: argparse.Namespace) -> int:
    """Entry point of `attnopt bench` (imports torch lazily); --plot / --from through ``plotted``."""
    return plotted(args, _run)


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "device", "cpu") != "cpu" and (args.generation or args.goals):
        sys.exit("attnopt bench: --device cuda applies to the preset grid, not to --goals / --generation")
    if args.generation:
        from .generation import run_generation

        return run_generation(args)
    if args.goals:
        from .goals import run_goals

        return run_goals(args)
    from .grid import run_grid

    return run_grid(args)
