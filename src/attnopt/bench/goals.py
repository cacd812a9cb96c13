"""`attnopt bench --goals`: exactly the issue's goal measurements, each printed as met / missed."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from . import report
from .presets import PRESETS, make_case
from .probe import run_probe
from .runner import measure_case


@dataclass(frozen=True)
class Goal:
    text: str
    case: tuple[str, int, str, str]  # preset, N, dtype, mode
    peer: str
    kind: str  # "speedup": peer / attnopt >= target; "at_most": attnopt / peer <= target
    target: float


CAUSAL = ("causal", 4096, "fp32", "fwd")
WIN32 = ("window_256", 8192, "fp32", "fwd")
WIN16 = ("window_256", 8192, "bf16", "fwd")
WIN_BWD = ("window_256", 4096, "fp32", "fwdbwd")
SOFTCAP = ("softcap_30", 4096, "fp32", "fwd")
DECODE = ("decode_gqa", 16384, "fp32", "fwd")
TIME_GOALS = [
    Goal("plain causal fp32 N=4096 fwd: attnopt ≤ 1.1× SDPA is_causal", CAUSAL, "sdpa", "at_most", 1.1),
    Goal("window 256 fp32 N=8192 fwd: ≥ 8× faster than SDPA dense mask", WIN32, "sdpa", "speedup", 8.0),
    Goal("window 256 fp32 N=8192 fwd: no slower than compiled Flex", WIN32, "flex", "at_most", 1.0),
    Goal("window 256 bf16 N=8192 fwd: ≥ 8× faster than SDPA dense mask", WIN16, "sdpa", "speedup", 8.0),
    Goal("window 256 bf16 N=8192 fwd: no slower than compiled Flex", WIN16, "flex", "at_most", 1.0),
    Goal("window 256 fp32 N=4096 fwd+bwd: ≥ 5× faster than SDPA dense mask", WIN_BWD, "sdpa", "speedup", 5.0),
    Goal("softcap 30 + causal fp32 N=4096 fwd: ≥ 3× faster than eager", SOFTCAP, "eager", "speedup", 3.0),
    Goal("decode Hq=8/Hkv=2 KV=16384 fp32: ≥ 1.5× faster than SDPA enable_gqa", DECODE, "sdpa", "speedup", 1.5),
]  # fmt: skip
MEMORY_GOALS = [("causal", 16384), ("window_256", 16384)]  # 2 heads, fp32 fwd: peak RSS growth < 256 MiB
MEMORY_LIMIT_MIB = 256  # the "256 MB", read as MiB
FIRST_CALLS = [
    *((p, 4096, "fp32") for p in PRESETS),
    ("window_256", 8192, "bf16"),
    ("decode_gqa", 16384, "fp32"),
]
FIRST_CALL_LIMIT_S = 0.5


def _time_goal(goal: Goal, rows: list[dict]) -> dict:
    by_peer = {r["peer"]: r for r in rows if (r["preset"], r["N"], r["dtype"], r["mode"]) == goal.case}
    a, p = by_peer["attnopt"], by_peer[goal.peer]
    out = {
        "goal": goal.text,
        "target": f"{'≥' if goal.kind == 'speedup' else '≤'} {goal.target:g}",
        "unit": "×",
    }
    if a["median_ms"] is None or p["median_ms"] is None:
        missing = a if a["median_ms"] is None else p
        return {
            **out,
            "measured": None,
            "met": None,
            "detail": f"{missing['peer']} n/a ({missing['reason']})",
        }
    if goal.kind == "speedup":
        value, what = p["median_ms"] / a["median_ms"], f"{goal.peer} / attnopt"
    else:
        value, what = a["median_ms"] / p["median_ms"], f"attnopt / {goal.peer}"
    met = value >= goal.target if goal.kind == "speedup" else value <= goal.target
    detail = (
        f"{what}: {goal.peer} {p['median_ms']:.2f} ms, attnopt {a['median_ms']:.2f} ms "
        f"(backend {a.get('backend')})"
    )
    return {**out, "metric": f"{what} time", "measured": round(value, 3), "met": met, "detail": detail}


def _probe_goal(text: str, res: dict, key: str, limit: float, unit: str) -> dict:
    out = {"goal": text, "target": f"< {limit:g}", "unit": unit}
    if "error" in res:
        return {**out, "measured": None, "met": None, "detail": res["error"]}
    value = res[key]
    detail = f"second call {res['second_s']:.3f} s" if "second_s" in res else "fresh process, after inputs"
    return {**out, "metric": key, "measured": round(value, 3), "met": value < limit, "detail": detail}


def run_goals(args: argparse.Namespace) -> int:
    console = report.console()
    torch.set_num_threads(args.threads)
    repeats = max(1, args.repeats or 5)
    budget = int(args.mem_budget_gib * (1 << 30))
    load_before = report.load_average()
    cases: dict[tuple, list[str]] = {}
    for g in TIME_GOALS:
        cases.setdefault(g.case, ["attnopt"])
        cases[g.case] = list(dict.fromkeys([*cases[g.case], g.peer]))
    steps = sum(len(p) + repeats for p in cases.values()) + len(MEMORY_GOALS) + len(FIRST_CALLS)
    rows: list[dict] = []
    probes: list[dict] = []
    with report.progress(steps) as bar:
        for (preset, n, dtype, mode), peers in cases.items():
            bar.case = f"{preset} N={n} {dtype} {mode}"
            case = make_case(preset, n, dtype, mode)
            rows += measure_case(case, peers, repeats=repeats, budget=budget, skipped={}, tick=bar.tick)
            del case
        bar.case = "fresh-process probes"
        common = {"threads": args.threads, "budget": budget, "dtype": "fp32"}
        for preset, n in MEMORY_GOALS:
            bar.tick(f"memory {preset} N={n}")
            spec = {**common, "kind": "memory", "preset": preset, "N": n, "Hq": 2, "Hkv": 2}
            res = run_probe(spec)
            text = f"memory: {preset} fp32 N={n} 2 heads fwd, peak RSS growth"
            probes.append(
                {"goal": _probe_goal(text, res, "peak_mib", MEMORY_LIMIT_MIB, "MiB"), **spec, **res}
            )
        for preset, n, dtype in FIRST_CALLS:
            bar.tick(f"first call {preset} N={n} {dtype}")
            spec = {**common, "kind": "first_call", "preset": preset, "N": n, "dtype": dtype}
            res = run_probe(spec)
            text = f"first call: {preset} {dtype} N={n} fwd (fresh process)"
            probes.append({"goal": _probe_goal(text, res, "first_s", FIRST_CALL_LIMIT_S, "s"), **spec, **res})
    goals = [_time_goal(g, rows) for g in TIME_GOALS] + [p.pop("goal") for p in probes]
    env = report.environment(load_before)
    title = f"goal measurements: B=1 Hq=8 D=64, {env['threads']} threads, median of {repeats}"
    report.print_results(console, rows, title, env)
    console.print(goals_table(goals))
    report.emit_json(
        {"kind": "goals", "env": env, "repeats": repeats, "results": rows, "probes": probes, "goals": goals},
        args.json,
    )
    return 0


def goals_table(goals: list[dict]):
    from rich.table import Table

    met = sum(g["met"] is True for g in goals)
    table = Table(title=f"goals: {met} of {len(goals)} met")
    for col in ("goal", "measured", "target", "result", "detail"):
        table.add_column(col, justify="right" if col in ("measured", "target") else "left")
    for g in goals:
        result = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "n/a"}[g["met"]]
        measured = "n/a" if g["measured"] is None else f"{g['measured']:.3g}"
        unit = g["unit"] if g["unit"] == "×" else f" {g['unit']}"
        table.add_row(
            g["goal"], measured + unit * (g["measured"] is not None), g["target"] + unit, result, g["detail"]
        )
    return table
