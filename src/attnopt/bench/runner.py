"""Measure one Case with every peer: setup + warm-up, round-robin timed samples, one memory probe each."""

from __future__ import annotations

import contextlib
import gc
import statistics
from collections.abc import Callable

import torch

from . import measure
from .peers import PEERS, NotApplicable, Prepared, _first_line
from .presets import Case

MiB = 1 << 20
TOLERANCE = {"fp32": 1e-3, "bf16": 6e-2}  # max |out - attnopt's out| before a row is flagged


def _failure(e: BaseException, budget: int) -> str:
    if isinstance(e, NotApplicable):
        return str(e)
    if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
        return f"memory: tried to allocate past the {budget / (1 << 30):.0f} GiB budget (+2 GiB slack)"
    return f"raised {_first_line(e)}"


def _row(case: Case, peer: str) -> dict:
    return {
        "preset": case.preset,
        "N": case.N,
        "dtype": case.dtype_name,
        "mode": case.mode,
        "B": case.B,
        "Hq": case.Hq,
        "Hkv": case.Hkv,
        "Sq": case.Sq,
        "Sk": case.Sk,
        "D": case.D,
        "threads": torch.get_num_threads(),
        "peer": peer,
        "status": "n/a",
        "reason": None,
        "median_ms": None,
        "ratio": None,
        "peak_mib": None,
    }


def measure_case(
    case: Case,
    peers: list[str],
    *,
    repeats: int,
    budget: int,
    skipped: dict[str, str],
    tick: Callable[[str], None] = lambda what: None,
) -> list[dict]:
    """Rows, one per peer. ``ratio`` = peer median / attnopt median (> 1: attnopt is faster)."""
    rows = {p: _row(case, p) for p in peers}
    ready: dict[str, tuple[Prepared, int]] = {}
    reference = None  # attnopt's output: every peer must compute the same thing
    for name in peers:
        tick(f"{name}: setup + warm-up" + (" (compiling)" if name == "flex" else ""))
        if name in skipped:
            rows[name]["reason"] = skipped[name]
            continue
        try:
            # flex compiles in setup; inductor may start worker processes, which must not inherit the cap.
            cap = contextlib.nullcontext() if name == "flex" else measure.memory_guard(budget)
            with cap:
                prep = PEERS[name](case, budget)
            with measure.memory_guard(budget):
                prep.call()  # warm-up
                inner = measure.calibrate(prep.call)
                out = prep.fwd().detach().float()
            if name == "attnopt":
                reference = out
            elif reference is not None:
                err = (out - reference).abs().max().item()
                rows[name]["max_abs_diff_vs_attnopt"] = err
                if not err <= TOLERANCE[case.dtype_name]:  # NaN fails too
                    rows[name]["mismatch"] = f"output differs from attnopt's: max |Δ| = {err:.2g}"
            del out
            ready[name] = (prep, inner)
        except (NotApplicable, RuntimeError, MemoryError, NotImplementedError, TypeError, ValueError) as e:
            rows[name]["reason"] = _failure(e, budget)
    samples: dict[str, list[float]] = {name: [] for name in ready}
    for r in range(repeats):
        tick(f"sample {r + 1}/{repeats}")
        for name, (prep, inner) in list(ready.items()):  # round-robin: noise and drift hit every peer alike
            try:
                with measure.memory_guard(budget):
                    samples[name].append(measure.sample_ms(prep.call, inner))
            except (RuntimeError, MemoryError) as e:
                rows[name]["reason"] = _failure(e, budget)
                del ready[name]
    gc.collect()  # once here: each peak_growth() then only trims malloc
    for name, (prep, inner) in ready.items():
        with measure.memory_guard(budget):
            growth = measure.peak_growth(prep.call, collect=False)
        med = statistics.median(samples[name])
        notes = dict(prep.notes)
        if "first_call_s" in notes:  # compile time = first call minus one steady-state call
            notes["compile_s"] = round(max(0.0, notes.pop("first_call_s") - med / 1e3), 3)
        rows[name].update(
            status="ok",
            median_ms=round(med, 4),
            samples_ms=[round(s, 4) for s in samples[name]],
            calls_per_sample=inner,
            peak_mib=None if growth is None else round((growth + prep.aux_bytes) / MiB, 1),
            aux_mib=round(prep.aux_bytes / MiB, 1),
            **notes,
        )
    base = rows.get("attnopt", {}).get("median_ms")
    for row in rows.values():
        if base and row["median_ms"] is not None:
            row["ratio"] = round(row["median_ms"] / base, 4)
    ready.clear()
    gc.collect()
    return list(rows.values())
