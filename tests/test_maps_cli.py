"""`attnopt maps` on the real offline models, and the demo's QA picture: files written, contents sane."""

from __future__ import annotations

import io
import os

import matplotlib.image as mpimg
import pytest
import torch

from attnopt.maps import AttentionMaps


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def test_maps_cli_on_minilm_writes_report_pngs_and_maps(minilm, tmp_path):
    from attnopt.maps import cli

    console = _console()
    rc = cli.run(
        console,
        model="minilm",
        prompt="The cat sat on the mat because it was warm.",
        out=str(tmp_path),
        resolution=64,
        rows=[0, -1],
        rollout=True,
        compare=True,
    )
    assert rc == 0, console.file.getvalue()
    names = sorted(os.listdir(tmp_path))
    assert {"report.html", "maps.pt", "received.png", "rows.png"} <= set(names)
    assert any(n.startswith("heads_layer") for n in names)
    m = AttentionMaps.load(str(tmp_path / "maps.pt"))
    assert (m.num_layers, m.num_heads) == (6, 12) and m.tokens[0] == "[CLS]"
    assert m.rollout is not None and m.rollout.shape[:2] == (1, 2)
    torch.testing.assert_close(m.rows.sum(-1), torch.ones_like(m.rows.sum(-1)))  # bidirectional, no sinks
    img = mpimg.imread(str(tmp_path / "received.png"))
    assert img.std() > 0.01  # not blank
    text = console.file.getvalue()
    assert "plain forward" in text and "with maps" in text
    html = (tmp_path / "report.html").read_text()
    assert "http://" not in html and "https://" not in html


def test_maps_cli_needs_exactly_one_prompt_source(tmp_path):
    from attnopt.maps import cli

    console = _console()
    assert cli.run(console, prompt=None, file=None, out=str(tmp_path)) == 2
    assert "--prompt" in console.file.getvalue()
    assert cli.run(console, prompt="a", file="b", out=str(tmp_path)) == 2


def test_maps_cli_refuses_unknown_model():
    from attnopt.maps import cli

    with pytest.raises(ValueError, match="model='gpt5'"):
        cli.load("gpt5")


def test_demo_qa_picture(smollm2, tmp_path):
    """The demo's picture: a QA prompt plus its answer, the answer's exact rows over the prompt."""
    from attnopt import demo

    model, tok = smollm2
    batch = demo.chat_batch(tok, [demo.APPLICATIONS[0][1], demo.APPLICATIONS[1][1]])  # the QA one left-padded
    try:
        answer = demo.generate(model, batch, "attnopt", 6)[0]
        path = demo.qa_picture(model, tok, batch, answer, str(tmp_path))
    finally:
        model.set_attn_implementation("sdpa")
    img = mpimg.imread(path)
    assert path.endswith("qa_attention.png") and img.shape[0] > 100 and img.std() > 0.01


def test_readme_maps_snippet_runs_as_written(smollm2, tmp_path, monkeypatch):
    """The README's "See attention" code block, on SmolLM2 with a short prompt, in an empty folder."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "attnopt.maps import" in b
    )
    model, tok = smollm2
    monkeypatch.chdir(tmp_path)
    model.set_attn_implementation("attnopt")
    try:
        scope = {
            "model": model,
            "input_ids": tok("Where do attention sinks come from?", return_tensors="pt").input_ids,
        }
        exec(compile(block, "README.md", "exec"), scope)
    finally:
        model.set_attn_implementation("sdpa")
    maps = scope["maps"]
    assert maps.num_layers == 30 and maps.rollout is not None
    assert (tmp_path / "report.html").stat().st_size > 1000 and (tmp_path / "heads.png").stat().st_size > 1000
    assert len(scope["attention"]) == 30 and len(scope["labels"]) == maps.Sk
