"""select(): among the backends with no reasons to refuse, the one with the lowest rank(inputs).

The list order is the tie-break; each backend's rank() holds its measured heuristics with the numbers.
"""

from __future__ import annotations

from ._inputs import AttentionInputs
from .backends._base import Backend
from .backends.blockwise import BlockwiseBackend
from .backends.flex import FlexBackend
from .backends.reference import ReferenceBackend
from .backends.sdpa import SdpaBackend
from .backends.span import SpanBackend
from .backends.splitkv import SplitKVBackend

# Tie-break order. The reference supports every valid input, so backend="auto" never fails (except for
# an explicit num_splits >= 2, which only a key-splitting backend runs: NoBackendError lists why).
# splitkv comes first: its rank is 0 only where it is measured faster (or num_splits asks for it),
# and a backend after a rank-0 one is never asked.
PRIORITY: list[Backend] = [
    SplitKVBackend(),
    SdpaBackend(),
    SpanBackend(),
    FlexBackend(),
    BlockwiseBackend(),
    ReferenceBackend(),
]
BACKENDS: dict[str, Backend] = {b.name: b for b in PRIORITY}


class NoBackendError(NotImplementedError):
    """No backend (pinned, or any under "auto") can run the inputs; the message lists the reasons."""


def reasons_by_backend(inputs: AttentionInputs) -> dict[str, list[str]]:
    return {b.name: b.not_supported_reasons(inputs) for b in PRIORITY}


def select(inputs: AttentionInputs, backend: str = "auto", exclude: frozenset[str] = frozenset()) -> Backend:
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
        if b.name in exclude:
            continue
        r = b.rank(inputs)  # cheap, metadata only; reasons may read the data (span's score bound)
        if r >= best_rank:  # ties keep the first
            continue
        if b.not_supported_reasons(inputs):
            continue
        best, best_rank = b, r
        if best_rank <= 0:  # ranks are >= 0: nothing later can win
            break
    if best is not None:
        return best
    table = "\n".join(f"  - {n}: {'; '.join(r)}" for n, r in reasons_by_backend(inputs).items())
    hint = (
        "use num_splits=None or 1 (only decode-shaped calls split the keys; see attnopt.explain(...))"
        if inputs.num_splits is not None and inputs.num_splits >= 2
        else "see attnopt.explain(...)"
    )
    raise NoBackendError(f"no backend can run these inputs ({inputs.describe()}):\n{table}\nHINT: {hint}")
