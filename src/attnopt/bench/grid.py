"""`attnopt bench` without --goals: presets × N × dtype × mode, every peer, one table, one JSON line."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch

from . import report
from .presets import ALL_PRESETS, EXTRA_PRESETS, PRESETS, make_case
from .runner import measure_case

QUICK_N = 1024
FLEX_QUICK = (
    "skipped by --quick: compiling FlexAttention takes ~3–30 s per shape on 2 cores (pass --peer flex)"
)
DEFAULT_PEERS = {
    "cpu": ["sdpa", "flex", "eager"],
    # CUDA: SDPA (flash for plain causal), Flex + create_block_mask, attnopt pinned to its flex backend
    "cuda": ["sdpa", "flex", "attnopt-flex"],
}
COMPILING = ("flex", "attnopt-flex")


def list_presets(console: Any) -> int:
    for p in PRESETS.values():
        console.print(f"  [bold]{p.name:<12}[/bold] {p.comment}")
    for p in EXTRA_PRESETS.values():
        console.print(f"  [bold]{p.name:<12}[/bold] {p.comment} (only when named with --preset)")
    return 0


def device(args: argparse.Namespace) -> str:
    """--device (cpu by default); a clear exit when CUDA is asked for and missing."""
    dev = getattr(args, "device", None) or "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "attnopt bench --device cuda: no CUDA device here (torch.cuda.is_available() is False)"
        )
    return dev


def selection(args: argparse.Namespace) -> tuple[list[str], list[int], list[str], list[str], int]:
    """Presets, Ns, dtypes, modes and repeats from the options (--quick fills what is not given)."""
    presets = args.preset or list(PRESETS)
    unknown = [p for p in presets if p not in ALL_PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}; choose from {list(ALL_PRESETS)}")
    ns = args.n or ([QUICK_N] if args.quick else [4096])
    if any(n < 4 for n in ns):
        raise SystemExit(f"--n must be >= 4 (the documents preset packs 4 documents), got {ns}")
    repeats = args.repeats or (3 if args.quick else 5)
    return presets, ns, args.dtype or ["fp32"], args.mode or ["fwd"], max(1, repeats)


def run_grid(args: argparse.Namespace) -> int:
    console = report.console()
    if args.list:
        return list_presets(console)
    dev = device(args)
    torch.set_num_threads(args.threads)
    presets, ns, dtypes, modes, repeats = selection(args)
    peers = ["attnopt", *(args.peer or DEFAULT_PEERS[dev])]
    peers = list(dict.fromkeys(peers))
    skipped = {p: FLEX_QUICK for p in COMPILING if p in peers} if args.quick and not args.peer else {}
    budget = int(args.mem_budget_gib * (1 << 30))
    load_before = report.load_average()
    grid = list(itertools.product(presets, ns, dtypes, modes))
    rows: list[dict] = []
    with report.progress(len(grid) * (len(peers) + repeats)) as bar:
        for preset, n, dtype, mode in grid:
            bar.case = f"{preset} N={n} {dtype} {mode}"
            case = make_case(preset, n, dtype, mode, B=args.batch, Hq=args.heads, D=args.head_dim, device=dev)
            rows += measure_case(case, peers, repeats=repeats, budget=budget, skipped=skipped, tick=bar.tick)
            del case
    env = report.environment(load_before)
    where = f"{env['threads']} threads"
    if dev != "cpu":
        env["device"] = dev
        env["device_name"] = torch.cuda.get_device_name()
        where = f"{env['device_name']} (host timers, synchronized)"
    title = (
        f"attnopt bench: B={args.batch} Hq={args.heads} D={args.head_dim} (decode_gqa: Hkv=2, Sq=1), "
        f"{where}, torch {env['torch']}, median of {repeats}"
    )
    report.print_results(console, rows, title, env)
    report.emit_json({"kind": "bench", "env": env, "repeats": repeats, "results": rows}, args.json)
    return 0
