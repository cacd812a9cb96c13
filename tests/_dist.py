"""Run a function on P gloo processes on localhost (spawned here; no torchrun) and collect results.

Each child sets one thread, joins a gloo group over a fresh localhost port, runs fn(rank, P, *args) and
sends back its return value or its traceback. The parent waits at most `timeout` seconds, kills what is
left, and raises with every failing rank's traceback, so a hang or a crash is a test failure.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, P: int, port: int, args: tuple, out) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=P,
            timeout=datetime.timedelta(seconds=120),
        )
        try:
            out.put((rank, True, fn(rank, P, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def run_ranks(fn, P: int, *args, timeout: float = 240.0) -> list:
    """fn(rank, P, *args) on P processes; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=_child, args=(fn, r, P, port, args, out), daemon=True) for r in range(P)]
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    results: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < P and time.monotonic() < deadline:
            try:
                rank, ok, value = out.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and out.empty():
                    break  # every child exited without a word (crashed at start-up)
                continue
            results[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    missing = [r for r in range(P) if r not in results]
    failed = {r: v for r, (ok, v) in results.items() if not ok}
    if missing or failed:
        msg = [f"ranks {missing} gave no result within {timeout:.0f} s"] if missing else []
        msg += [f"--- rank {r} failed:\n{tb}" for r, tb in sorted(failed.items())]
        raise AssertionError("\n".join(msg))
    return [results[r][1] for r in range(P)]
