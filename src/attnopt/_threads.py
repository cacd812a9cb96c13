"""One thread for the fused CPU kernel inside a block: the batch-invariant paths.

torch's fused CPU attention kernel runs its own parallel loop over (batch, head) items and calls BLAS
for the products inside. Whether and how BLAS threads a product depends on the whole call, so one row's
bits can depend on the rest of the batch. This was seen on an AMD EPYC machine with torch 2.13 (MKL
2024.2): 3e-8 differences between a batch of 5 and the same row alone. MKL_NUM_THREADS=1 or one torch
thread removes it; a thread-local MKL setting on the calling thread does not. So fixed-split calls
(splitkv with num_splits set, paged attention with split_size) run on one thread: bitwise invariance
costs the second core there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch (OpenMP and MKL) runs on one thread inside the block; the thread count is restored after."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
