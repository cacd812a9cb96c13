"""select(): among the backends with no reasons to refuse, the one with the lowest rank(inputs).

The list order is the tie-break; each backend's rank() holds its measured heuristics with the numbers.
"""

from __future__ import annotations

from ._inputs import AttentionInputs
from .backends._base import Backend
from .backends.blockwise import BlockwiseBackend
from .backends.reference import ReferenceBackend
from .backends.sdpa import SdpaBackend
from .backends.span import SpanBackend

# Tie-break order. The reference supports every valid input, so backend="auto" never fails.
PRIORITY: list[Backend] = [SdpaBackend(), SpanBackend(), BlockwiseBackend(), ReferenceBackend()]
BACKENDS: dict[str, Backend] = {b.name: b for b in PRIORITY}


class NoBackendError(NotImplementedError):
    """A pinned backend cannot run the inputs; the message lists its reasons."""


def reasons_by_backend(inputs: AttentionInputs) -> dict[str, list[str]]:
    return {b.name: b.not_supported_reasons(inputs) for b in PRIORITY}


def select(inputs: AttentionInputs, backend: str = "auto") -> Backend:
    if backend != "auto":
        chosen = BACKENDS[backend]
        reasons = chosen.not_supported_reasons(inputs)
        if reasons:
            lines = "\n".join(f"  - {r}" for r in reasons)
            raise NoBackendError(
                f"backend={backend!r} cannot run these inputs ({inputs.describe()}):\n{lines}\n"
                f"HINT: use backend='auto' (it picks a backend that can), or see attnopt.explain(...)"
            )
        return chosen
    best, best_rank = None, float("inf")
    for b in PRIORITY:  # in tie-break order; ask a backend's reasons only while it could still win
        if b.not_supported_reasons(inputs):
            continue
        r = b.rank(inputs)
        if r < best_rank:
            best, best_rank = b, r
        if best_rank <= 0:  # ranks are >= 0 and ties keep the first: nothing later can win
            break
    if best is not None:
        return best
    table = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in reasons_by_backend(inputs).items())
    raise AssertionError(f"no backend accepted valid inputs ({inputs.describe()}):\n{table}")
