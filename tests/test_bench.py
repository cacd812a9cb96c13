"""Smoke test of `attnopt bench` on tiny shapes (benchmarks themselves are never tests)."""

from __future__ import annotations

import json

import pytest
import torch

import attnopt as ao
from attnopt.bench import goals, measure
from attnopt.bench.probe import run_probe
from attnopt.cli import main


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quick_runs_every_preset_and_ends_with_json(capsys, tmp_path, keep_threads):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--n", "64", "--repeats", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out.strip().splitlines()[-1])  # the last stdout line is the JSON
    assert data == json.loads(path.read_text())
    rows = {(r["preset"], r["peer"]): r for r in data["results"]}
    assert {p for p, _ in rows} == set(goals.PRESETS)
    for preset in goals.PRESETS:
        attnopt_row = rows[preset, "attnopt"]
        assert attnopt_row["status"] == "ok", attnopt_row
        assert attnopt_row["backend"] and attnopt_row["median_ms"] > 0 and attnopt_row["ratio"] == 1.0
        assert rows[preset, "eager"]["status"] == "ok" and rows[preset, "eager"]["ratio"] > 0
        assert rows[preset, "flex"]["status"] == "n/a" and "--quick" in rows[preset, "flex"]["reason"]
    assert "sink" in rows["sinks", "sdpa"]["reason"] and "softcap" in rows["softcap_30", "sdpa"]["reason"]
    assert rows["decode_gqa", "sdpa"]["how"] == "no mask" and rows["decode_gqa", "attnopt"]["Hkv"] == 2
    assert "n/a [" in out and "vs attnopt" in out


def test_memory_budget_makes_dense_peers_na(capsys, keep_threads):
    args = ["bench", "--preset", "window_256", "--n", "512", "--repeats", "1", "--peer", "sdpa"]
    assert main([*args, "--peer", "eager", "--mem-budget-gib", "0.001"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_peer = {r["peer"]: r for r in data["results"]}
    assert by_peer["eager"]["status"] == "n/a" and by_peer["eager"]["reason"].startswith("memory:")
    assert by_peer["sdpa"]["status"] == "n/a" and "budget" in by_peer["sdpa"]["reason"]


def test_peak_growth_sees_a_freed_allocation():
    if not measure.can_reset_peak():
        pytest.skip("no /proc/self/clear_refs on this kernel")
    grew = measure.peak_growth(lambda: torch.ones(16 << 20))  # 64 MiB, freed before we look
    assert 60 << 20 <= grew < 200 << 20


def test_goal_ratio_and_verdict():
    g = goals.TIME_GOALS[0]  # attnopt <= 1.1x SDPA
    rows = [
        {"preset": "causal", "N": 4096, "dtype": "fp32", "mode": "fwd", "peer": "attnopt", "median_ms": 10.5},
        {"preset": "causal", "N": 4096, "dtype": "fp32", "mode": "fwd", "peer": "sdpa", "median_ms": 10.0},
    ]
    res = goals._time_goal(g, rows)
    assert res["measured"] == 1.05 and res["met"] is True


def test_first_call_probe_runs_in_a_fresh_process():
    res = run_probe(
        {"kind": "first_call", "preset": "causal", "N": 64, "dtype": "fp32", "threads": 1, "budget": 1 << 30}
    )
    assert res["first_s"] > 0 and res["second_s"] > 0, res


def test_attnopt_flex_peer_and_extra_preset_on_cpu(capsys, keep_threads):
    """The GPU plumbing at a tiny CPU size: attnopt pinned to flex (compiled in setup), --device, and a
    preset outside the default set (window_4096) that runs only when named."""
    if "flex" not in ao.available_backends():
        pytest.skip("attnopt's flex backend is not available here (no C++ compiler for Flex's CPU kernels)")
    args = ["bench", "--preset", "window_4096", "--n", "256", "--repeats", "1", "--device", "cpu"]
    assert main([*args, "--peer", "attnopt-flex", "--peer", "sdpa"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_peer = {r["peer"]: r for r in data["results"]}
    assert set(by_peer) == {"attnopt", "attnopt-flex", "sdpa"}
    flex = by_peer["attnopt-flex"]
    assert flex["status"] == "ok", flex
    assert flex["backend"] == "flex" and flex["compile_s"] >= 0 and flex["block_mask_s"] >= 0
    assert flex["max_abs_diff_vs_attnopt"] <= 1e-4 and "mismatch" not in flex
    assert by_peer["sdpa"]["how"] == "dense bool mask" and "device" not in data["env"]
    assert "window_4096" not in goals.PRESETS  # the default set and the goals are unchanged


def test_device_cuda_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["bench", "--preset", "causal", "--n", "64", "--device", "cuda"])
