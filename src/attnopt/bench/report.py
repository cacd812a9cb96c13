"""Human output (rich table, progress bar) and the machine-readable JSON line."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

import attnopt

from . import measure


def load_average() -> float | None:
    """1-minute load average (how busy the shared machine was), None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment(load_before: float | None) -> dict[str, Any]:
    return {
        "attnopt": attnopt.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_method": measure.MEMORY_METHOD if measure.can_reset_peak() else "unavailable",
        "cpus": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": load_average(),
    }


def load_note(env: dict[str, Any]) -> str:
    return (
        f"1-min load average {env['load_avg_before']} before, {env['load_avg_after']} after, on {env['cpus']} "
        "CPUs: other work on the machine makes times noisy; compare ratios within this run"
    )


class Ticker:
    """Advances the progress bar; the description shows the current case and step."""

    def __init__(self, bar: Any, task: Any):
        self.bar, self.task, self.case = bar, task, ""

    def tick(self, what: str) -> None:
        self.bar.update(self.task, advance=1, description=f"{self.case} · {what}")


@contextmanager
def progress(total: int) -> Iterator[Ticker]:
    """A rich progress bar on stderr (stdout stays table + JSON)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with bar:
        yield Ticker(bar, bar.add_task("starting", total=total))


def _ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if x < 1 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _notes(row: dict, footnotes: dict[str, int]) -> str:
    if row["status"] != "ok":
        n = footnotes.setdefault(str(row["reason"]), len(footnotes) + 1)
        return f"n/a [{n}]"
    parts = [f"⚠ {row['mismatch']}"] if "mismatch" in row else []
    if "backend" in row:
        parts.append(f"backend {row['backend']}")
    if "how" in row:
        parts.append(row["how"])
    if "compile_s" in row:
        parts.append(f"compile {row['compile_s']:.1f} s, block mask {row['block_mask_s']:.1f} s")
    return "; ".join(parts)


def _key(row: dict) -> tuple:
    return row["preset"], row["N"], row["dtype"], row["mode"]


def results_table(rows: list[dict], title: str) -> tuple[Any, list[str]]:
    """The rich table, and the footnotes (n/a reasons, numbered) to print under it."""
    from rich.table import Table

    table = Table(
        title=title,
        caption="ms: median per call · vs attnopt: peer time / attnopt time (> 1: attnopt is faster) · "
        "peak: RSS growth of one call + tensors the peer precomputes per shape · compile times excluded",
    )
    for col in ("preset", "N", "dtype", "mode", "peer", "ms", "vs attnopt", "peak MiB", "notes"):
        table.add_column(col, justify="right" if col in ("N", "ms", "vs attnopt", "peak MiB") else "left")
    footnotes: dict[str, int] = {}
    for i, row in enumerate(rows):
        first = i == 0 or _key(rows[i - 1]) != _key(row)
        last = i + 1 == len(rows) or _key(rows[i + 1]) != _key(row)
        ratio = "" if row["peer"] == "attnopt" or row["ratio"] is None else f"{row['ratio']:.2f}×"
        peak = "" if row["peak_mib"] is None else f"{row['peak_mib']:,.1f}"
        table.add_row(
            *(str(x) if first else "" for x in _key(row)),
            row["peer"],
            _ms(row["median_ms"]),
            ratio,
            peak,
            _notes(row, footnotes),
            end_section=last,
        )
    return table, [f"[{n}] {reason}" for reason, n in footnotes.items()]


def console() -> Any:
    """stdout console; not squeezed to 80 columns when piped to a file."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def print_results(con: Any, rows: list[dict], title: str, env: dict[str, Any]) -> None:
    table, notes = results_table(rows, title)
    con.print(table)
    for line in [*notes, load_note(env)]:
        con.print(line, markup=False, highlight=False)


def emit_json(payload: dict, path: str | None) -> None:
    """The final line on stdout: everything, machine-readable; also written to `path` if given."""
    text = json.dumps(payload, separators=(",", ":"), default=str)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
