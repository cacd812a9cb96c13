"""`attnopt bench --plot`: charts from the bench's JSON payload (synthetic payloads + one tiny real run)."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("matplotlib")
from PIL import Image

from attnopt.bench import plots
from attnopt.cli import main


def _row(preset, n, peer, ms, *, dtype="fp32", mode="fwd", reason=None):
    return {
        "preset": preset, "N": n, "dtype": dtype, "mode": mode, "B": 1, "Hq": 8, "D": 64, "peer": peer,
        "status": "n/a" if ms is None else "ok", "reason": reason, "median_ms": ms, "ratio": None,
    }  # fmt: skip


def bench_payload() -> dict:
    rows = []
    for n in (512, 1024, 2048):
        s = (n / 512) ** 2
        rows += [_row("causal", n, "attnopt", 4.0 * s), _row("causal", n, "sdpa", 3.8 * s)]
        rows += [_row("causal", n, "eager", 12.0 * s)]
        rows += [_row("softcap_30", n, "attnopt", 6.0 * s), _row("softcap_30", n, "sdpa", None, reason="no")]
        rows += [_row("softcap_30", n, "eager", 15.0 * s if n < 2048 else None, reason="memory")]
    rows += [_row("window_256", 1024, "attnopt", 5.0, dtype="bf16"), _row("window_256", 1024, "sdpa", 20.0, dtype="bf16")]  # fmt: skip
    return {"kind": "bench", "env": {"threads": 2, "torch": "x"}, "repeats": 3, "results": rows}


def assert_real_png(path):
    assert path.exists() and path.stat().st_size > 5_000
    with Image.open(path) as img:
        img.load()
        assert img.width >= 400 and img.height >= 200
        rgb = img.convert("RGB")
        lo, hi = rgb.convert("L").getextrema()
        assert hi - lo > 150  # not blank: dark text on a light background
        assert len(rgb.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 8  # lines, bars, text colors


def test_bench_payload_draws_time_vs_n_and_speedup(tmp_path):
    files = plots.plot_results(bench_payload(), tmp_path / "out", formats=("png", "svg"))
    names = sorted(f.name for f in files)
    assert names == ["bench_speedup.png", "bench_speedup.svg", "bench_time_vs_n.png", "bench_time_vs_n.svg"]
    for f in files:
        if f.suffix == ".png":
            assert_real_png(f)
        else:
            assert f.read_text().lstrip().startswith("<?xml")


def test_speedup_is_the_ratio_of_medians():
    cases, peers, ratios = plots.speedup_rows(bench_payload()["results"])
    assert peers == ["sdpa", "eager"] and ("causal", 512, "fp32", "fwd") in cases
    assert ratios["causal", 1024, "fp32", "fwd"]["eager"] == pytest.approx(3.0)
    assert ratios["softcap_30", 2048, "fp32", "fwd"] == {"sdpa": None, "eager": None}  # n/a stays n/a


@pytest.mark.parametrize(
    ("payload", "name"),
    [
        ({**bench_payload(), "kind": "goals", "goals": []}, "goals_speedup.png"),
        (
            {"threads": 2, "context": 8192, "decode": [
                {"cache": "DynamicCache", "attention": "sdpa", "ms_per_token": 146.3, "speedup_vs_sdpa_peer": 1.0},
                {"cache": "attnopt growing", "attention": "attnopt", "ms_per_token": 95.1, "speedup_vs_sdpa_peer": 1.54},
            ]},
            "generation_decode.png",
        ),
        (
            {"threads": 2, "decode": {"ratio": 15.2}, "goals": [
                {"goal": "decode step", "value": 15.2, "need": 5.0, "met": True},
                {"goal": "cascade", "value": 2.33, "need": 4.0, "met": False},
            ]},
            "serving_goals.png",
        ),
    ],
)  # fmt: skip
def test_other_kinds(tmp_path, payload, name):
    files = plots.plot_results(payload, tmp_path, prefix=None)
    assert [f.name for f in files] == [name]
    assert_real_png(files[0])


def test_not_a_payload(tmp_path):
    with pytest.raises(ValueError, match="not an `attnopt bench` payload"):
        plots.plot_results({"hello": 1}, tmp_path)
    (tmp_path / "x.txt").write_text("no json here\n")
    with pytest.raises(ValueError, match="no bench JSON"):
        plots.load_payload(tmp_path / "x.txt")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'attnopt\[maps\]'"):
        plots.plot_results(bench_payload(), tmp_path)
    src = tmp_path / "r.json"
    src.write_text(json.dumps(bench_payload()))
    with pytest.raises(SystemExit, match=r"attnopt\[maps\]"):
        main(["bench", "--plot", str(tmp_path / "o"), "--from", str(src)])


def test_cli_from_saved_json_and_saved_stdout(tmp_path, capsys):
    saved = tmp_path / "stdout.txt"  # a table, then the JSON line, as `attnopt bench > stdout.txt` leaves it
    saved.write_text("some table\n" + json.dumps(bench_payload()) + "\n")
    assert main(["bench", "--plot", str(tmp_path / "a"), "--from", str(saved), "--plot-prefix", "x_"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x_speedup.png", "x_time_vs_n.png"]
    assert "charts:" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs --plot"):
        main(["bench", "--from", str(saved)])


@pytest.fixture
def keep_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cli_tiny_run_plots_after_measuring(tmp_path, capsys, keep_threads):
    out = tmp_path / "charts"
    args = ["bench", "--preset", "window_256", "--n", "64", "--n", "128", "--peer", "sdpa", "--repeats", "1"]
    assert main([*args, "--threads", "1", "--plot", str(out)]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # stdout still ends with the JSON
    assert data == json.loads((out / "bench_results.json").read_text())
    assert_real_png(out / "bench_time_vs_n.png")
    assert_real_png(out / "bench_speedup.png")
