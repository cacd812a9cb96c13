"""attnopt.api.attention_backward: the gradients of one part of a larger softmax, from (out, lse)."""

from __future__ import annotations

import pytest
import torch

import attnopt as ao
from attnopt import mods as am
from attnopt.api import attention_backward
from attnopt.merge import merge

CASES = {
    "none": ({}, "span"),
    "causal": ({"mask": ao.causal()}, "span"),
    "window": ({"mask": ao.sliding_window(9)}, "span"),
    "alibi": ({"score_mod": am.alibi(am.alibi_slopes(4))}, "span"),
    "softcap": ({"score_mod": am.softcap(3.0)}, "rerun"),
    "cosine": ({"similarity": "cosine", "scale": 2.0}, "rerun"),
}


def _part_kwargs(kw: dict, k0: int, n: int, Sq: int, N: int) -> dict:
    """The global mask/modifier restated for keys [k0, k0 + n) (via the distributed restatement)."""
    from attnopt.distributed._local import Piece, local_mask, local_mods

    at = Piece(0, k0, 0, ao.masks.MaskContext(2, 4, Sq, N))
    out = {x: y for x, y in kw.items() if x in ("similarity", "scale")}
    if "mask" in kw:
        out["mask"] = local_mask(kw["mask"], at, Sq, n, 4)
    if "score_mod" in kw:
        out["score_mod"] = local_mods((kw["score_mod"],), at, Sq, n, 4)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_parts_add_up_to_the_whole(case, dtype):
    kw, path = CASES[case]
    g = torch.Generator().manual_seed(0)
    Sq, N, cut = 40, 40, 17
    q, k, v = (torch.randn(2, h, n, 16, generator=g, dtype=dtype) for h, n in ((4, Sq), (2, N), (2, N)))
    do, dl = (
        torch.randn(2, 4, Sq, 16, generator=g, dtype=dtype),
        torch.randn(2, 4, Sq, generator=g, dtype=dtype),
    )
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = ao.attention(*leaves, **kw, return_lse=True)
    fin = torch.isfinite(lse)
    ((out * do).sum() + torch.where(fin, lse * dl, 0.0).sum()).backward()
    parts = [(0, cut), (cut, N - cut)]
    outs, lses, grads = [], [], []
    for k0, n in parts:
        pk = _part_kwargs(kw, k0, n, Sq, N)
        o, part_lse = ao.attention(q, k[:, :, k0 : k0 + n], v[:, :, k0 : k0 + n], **pk, return_lse=True)
        outs.append(o)
        lses.append(part_lse)
    m_out, m_lse = merge(outs, lses)
    for k0, n in parts:
        pk = _part_kwargs(kw, k0, n, Sq, N)
        grads.append(
            attention_backward(
                q, k[:, :, k0 : k0 + n], v[:, :, k0 : k0 + n], m_out, m_lse, do, torch.where(fin, dl, 0), **pk
            )
        )
    dq = grads[0][0] + grads[1][0]
    dk = torch.cat([grads[0][1], grads[1][1]], dim=2)
    dv = torch.cat([grads[0][2], grads[1][2]], dim=2)
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    for name, a, b in (("dq", dq, leaves[0].grad), ("dk", dk, leaves[1].grad), ("dv", dv, leaves[2].grad)):
        assert (a - b).abs().max() <= tol * b.abs().max(), (name, float((a - b).abs().max()))
    # which path ran: span for what it supports, the autograd rerun otherwise
    from attnopt import _dispatch
    from attnopt.api import _validate

    pk = _part_kwargs(kw, 0, cut, Sq, N)
    inputs = _validate(
        q,
        k[:, :, :cut],
        v[:, :, :cut],
        pk.get("mask"),
        pk.get("score_mod"),
        pk.get("similarity", "dot"),
        pk.get("scale"),
        None,
        0.0,
        True,
        "auto",
        None,
    )
    span_ok = not _dispatch.BACKENDS["span"].grad_from_output_reasons(inputs)
    if dtype == torch.float32:  # span takes what it supports; the others rerun the part's forward
        assert span_ok == (path == "span"), (
            case,
            _dispatch.BACKENDS["span"].grad_from_output_reasons(inputs),
        )


def test_bad_shapes_are_clear_errors():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"out must be a floating tensor of shape \(1, 2, 5, 8\)"):
        attention_backward(q, q, q, q[:, :, :4], torch.zeros(1, 2, 5), q)
    with pytest.raises(ValueError, match="dlse must be"):
        attention_backward(q, q, q, q, torch.zeros(1, 2, 5), q, torch.zeros(3))
    with pytest.raises(ValueError, match="lse is on meta but q is on cpu"):
        attention_backward(q, q, q, q, torch.zeros(1, 2, 5, device="meta"), q)
    assert ao.attention_backward is attention_backward
