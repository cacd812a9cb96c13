"""`attnopt bench` without --goals: presets × N × dtype × mode, every peer, one table, one JSON line."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch

from . import report
from .presets import PRESETS, make_case
from .runner import measure_case

QUICK_N = 1024
FLEX_QUICK = (
    "skipped by --quick: compiling FlexAttention takes ~3–30 s per shape on 2 cores (pass --peer flex)"
)


def list_presets(console: Any) -> int:
    for p in PRESETS.values():
        console.print(f"  [bold]{p.name:<12}[/bold] {p.comment}")
    return 0


def selection(args: argparse.Namespace) -> tuple[list[str], list[int], list[str], list[str], int]:
    """Presets, Ns, dtypes, modes and repeats from the options (--quick fills what is not given)."""
    presets = args.preset or list(PRESETS)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")
    ns = args.n or ([QUICK_N] if args.quick else [4096])
    if any(n < 4 for n in ns):
        raise SystemExit(f"--n must be >= 4 (the documents preset packs 4 documents), got {ns}")
    repeats = args.repeats or (3 if args.quick else 5)
    return presets, ns, args.dtype or ["fp32"], args.mode or ["fwd"], max(1, repeats)


def run_grid(args: argparse.Namespace) -> int:
    console = report.console()
    if args.list:
        return list_presets(console)
    torch.set_num_threads(args.threads)
    presets, ns, dtypes, modes, repeats = selection(args)
    peers = ["attnopt", *(args.peer or ["sdpa", "flex", "eager"])]
    peers = list(dict.fromkeys(peers))
    skipped = {"flex": FLEX_QUICK} if args.quick and not args.peer else {}
    budget = int(args.mem_budget_gib * (1 << 30))
    load_before = report.load_average()
    grid = list(itertools.product(presets, ns, dtypes, modes))
    rows: list[dict] = []
    with report.progress(len(grid) * (len(peers) + repeats)) as bar:
        for preset, n, dtype, mode in grid:
            bar.case = f"{preset} N={n} {dtype} {mode}"
            case = make_case(preset, n, dtype, mode, B=args.batch, Hq=args.heads, D=args.head_dim)
            rows += measure_case(case, peers, repeats=repeats, budget=budget, skipped=skipped, tick=bar.tick)
            del case
    env = report.environment(load_before)
    title = (
        f"attnopt bench: B={args.batch} Hq={args.heads} D={args.head_dim} (decode_gqa: Hkv=2, Sq=1), "
        f"{env['threads']} threads, torch {env['torch']}, median of {repeats}"
    )
    report.print_results(console, rows, title, env)
    report.emit_json({"kind": "bench", "env": env, "repeats": repeats, "results": rows}, args.json)
    return 0
