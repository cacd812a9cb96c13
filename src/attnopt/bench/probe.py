"""Measurements that need a fresh process: ``python -m attnopt.bench.probe '<json spec>'``.

kind="memory": peak RSS growth of one forward over the RSS after the inputs are allocated (a small
warm-up call of the same variant runs first, so one-time library set-up is not counted).
kind="first_call": wall time of the very first attnopt.attention call of the process (after imports
and input creation), and of the second one for comparison.
Prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def _probe(spec: dict) -> dict:
    import torch

    import attnopt

    from . import measure
    from .presets import make_case

    torch.set_num_threads(spec["threads"])
    shape = {"Hq": spec.get("Hq", 8), "Hkv": spec.get("Hkv")}

    def call(case):
        return lambda: attnopt.attention(case.q, case.k, case.v, **case.attnopt_kwargs())

    if spec["kind"] == "memory":
        call(make_case(spec["preset"], 256, spec["dtype"], "fwd", **shape))()
        case = make_case(spec["preset"], spec["N"], spec["dtype"], "fwd", **shape)
        with measure.memory_guard(int(spec["budget"])):
            growth = measure.peak_growth(call(case))
        if growth is None:
            return {"error": "the kernel offers no peak-RSS reset (/proc/self/clear_refs)"}
        return {"peak_mib": growth / 2**20}
    case = make_case(spec["preset"], spec["N"], spec["dtype"], "fwd", **shape)
    fn = call(case)
    with measure.memory_guard(int(spec["budget"])):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        second = time.perf_counter() - t0
    return {"first_s": first, "second_s": second}


def run_probe(spec: dict, timeout_s: float = 600) -> dict:
    """Run one probe in a fresh interpreter; {"error": ...} if it fails."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "attnopt.bench.probe", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"probe timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        return {"error": f"probe exited {proc.returncode}: {err[-1] if err else 'no output'}"[:300]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    try:
        result = _probe(json.loads(sys.argv[1]))
    except (RuntimeError, MemoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        result = {"error": f"{type(e).__name__}: {msg}"[:300]}
    print(json.dumps(result), flush=True)
