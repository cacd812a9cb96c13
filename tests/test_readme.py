"""The README's quickstart runs as written, and its error example shows the real message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python quickstart"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["out"].shape == (2, 8, 512, 64) and scope["lse"].shape == (2, 8, 512)
    assert scope["step"].shape == (2, 8, 1, 64)
    assert "-> runs on" in capsys.readouterr().out


def test_error_example_is_the_real_message():
    text = README.read_text()
    example = re.search(r">>> (ao\.attention\(.*?\))\n(ValueError): (.*?)\n```", text, flags=re.S)
    assert example, "README error example not found"
    call, _, message = example.groups()
    scope: dict = {}
    exec(compile(re.findall(r"```python\n(.*?)```", text, flags=re.S)[0], "README.md", "exec"), scope)
    with pytest.raises(ValueError) as info:
        eval(call, scope)
    assert str(info.value) == message


def test_huggingface_and_layer_snippet_runs_as_written():
    pytest.importorskip("transformers")
    from attnopt.demo import ModelsMissing, minilm_dir

    try:
        minilm_dir()
    except ModelsMissing as e:
        pytest.skip(str(e))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its Hugging Face / layer snippet"
    scope: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), scope)
    assert scope["hidden"].shape[:2] == scope["batch"]["input_ids"].shape
    assert scope["hidden"].shape[-1] == 384 and bool(scope["hidden"].isfinite().all())
    assert scope["y"].shape == (2, 16, 384)
    assert scope["mha"].num_heads == 12 and scope["mha"].head_dim == 32


def test_explain_examples_say_what_the_readme_shows():
    import torch

    import attnopt as ao

    text = README.read_text()
    assert "q copied to a contiguous layout\n             (last-dim stride 4096 != 1)" in text
    q, k, v = (torch.randn(1, 8, 64, 4096).transpose(-1, -2) for _ in range(3))
    first = ao.explain(q, k, v, mask=ao.sliding_window(255))
    assert (
        "-> runs on 'span'" in first
        and "q copied to a contiguous layout (last-dim stride 4096 != 1)" in first
    )
    assert "32 kernel calls (32 with an edge mask), 9.1% of the (Sq, Sk) scores computed" in first
    k[:, :, :8] = float("nan")
    second = ao.explain(q, k, v, mask=ao.sliding_window(16))
    assert "-> runs on 'blockwise'" in second
    assert "sdpa       cannot run: q, k or v hold NaN/inf and the mask hides some scores" in second


def test_flex_snippet_runs_as_written(capsys):
    """The compiled-kernel example: one compile, then a new length runs on the warm kernel under auto."""
    from attnopt.backends.flex import FlexBackend

    if not FlexBackend.is_available():
        pytest.skip("flex needs a C++ compiler")
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "compile_for" in b
    )
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["info"]["compiles"] >= 1 and scope["out"].shape == (1, 8, 2048, 64)
    assert tuple(scope["bm"].kv_num_blocks.shape) == (1, 1, 1024)
    shown = capsys.readouterr().out
    assert "-> runs on 'flex'" in shown and "kernel warm (" in shown and "0 recompiles" in shown
