"""Timing and peak-memory probes (Linux /proc; standard library only).

Time: a sample runs the call ``inner`` times back to back (enough for ~20 ms, so millisecond calls are
not dominated by timer noise) and reports the mean; results are medians over samples.

Peak memory: the peak resident set size (RSS) growth of *one* call. Before the call we run the
garbage collector and ``malloc_trim(0)`` (glibc hands freed heap pages back to the kernel, so memory
left over from earlier measurements is not silently reused), read ``VmRSS`` as the baseline, and reset
the kernel's high-water mark by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0). After the
call, ``VmHWM - baseline`` is the peak that call added on top of its inputs: every temporary, the output,
and for fwdbwd the autograd graph and gradients. ``ru_maxrss`` cannot do this in one process (it never
goes down); the kernel's resettable high-water mark can.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import resource
import time
from collections.abc import Callable, Iterator

MEMORY_METHOD = (
    "peak RSS growth of one call: gc + malloc_trim(0), baseline VmRSS, reset VmHWM via "
    "/proc/self/clear_refs, call, VmHWM - baseline; plus the bytes of tensors the peer precomputes per shape"
)

_libc = None


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (VmHWM) since start or the last reset (can_reset_peak)."""
    return _status_kib("VmHWM") * 1024


def _trim(collect: bool) -> None:
    global _libc
    if collect:  # ~0.1 s with torch loaded: callers measuring many calls collect once themselves
        gc.collect()
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def can_reset_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS; False where the kernel offers no reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_growth(call: Callable[[], object], collect: bool = True) -> int | None:
    """Peak RSS the call adds over the RSS before it, in bytes; None where the kernel offers no reset."""
    _trim(collect)
    base = rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    call()
    return max(0, _status_kib("VmHWM") * 1024 - base)


def calibrate(call: Callable[[], object], min_sample_s: float = 0.02) -> int:
    """Calls per sample so one sample lasts about min_sample_s (the call is run once to time it)."""
    t0 = time.perf_counter()
    call()
    dt = time.perf_counter() - t0
    return max(1, min(1000, math.ceil(min_sample_s / max(dt, 1e-7))))


def sample_ms(call: Callable[[], object], inner: int) -> float:
    """Mean milliseconds per call over `inner` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(inner):
        call()
    return (time.perf_counter() - t0) / inner * 1e3


@contextlib.contextmanager
def memory_guard(budget_bytes: int, slack_bytes: int = 2 << 30) -> Iterator[None]:
    """Cap the address space at its current size + budget + slack while inside.

    A backstop, not the measurement: a peer that tries to allocate past it gets torch's "can't allocate
    memory" RuntimeError (reported as n/a) instead of the whole machine going into the OOM killer.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _status_kib("VmSize") * 1024 + budget_bytes + slack_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
