"""`attnopt serve`: a prompts file through the continuous batching engine, in-process, on SmolLM2.

The session's SmolLM2 fixture stands in for the CLI's own model load (which takes tens of seconds), switched
to attnopt for the test. Usage errors (missing or malformed file, bad memory budget, a request larger
than the pool) exit with code 2 and one clear line, never an exception.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from attnopt import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts.jsonl"


@pytest.fixture
def served(smollm2, monkeypatch):
    """`attnopt serve` loads the session's SmolLM2 (on attnopt) instead of loading it again."""
    from attnopt import demo

    model, tok = smollm2
    model.set_attn_implementation("attnopt")
    monkeypatch.setattr(demo, "load_smollm2", lambda attn_implementation="attnopt": (model, tok))
    threads = torch.get_num_threads()
    yield model, tok
    model.set_attn_implementation("sdpa")
    torch.set_num_threads(threads)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_serve_examples_to_out_file(served, tmp_path, capsys):
    out = tmp_path / "completions.jsonl"
    rc = cli.main(
        ["serve", str(EXAMPLES), "--max-new-tokens", "4", "--memory-budget", "64MiB", "--threads", "2",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    prompts = _lines(EXAMPLES)
    n = len(prompts)
    assert "attnopt serve: summary" in text
    assert re.search(rf"requests done\s*│\s*{n} of {n}\b", text), text
    assert f"{n}/{n} done · 0 running · 0 waiting" in text  # the live display's last frame
    assert "time to first token median / p90" in text and "KV pool peak" in text
    results = _lines(out)
    assert [r["id"] for r in results] == [p["id"] for p in prompts]
    for p, r in zip(prompts, results):
        budget = p.get("max_new_tokens", 4)
        assert 1 <= len(r["tokens"]) <= budget
        assert r["finish_reason"] == ("length" if len(r["tokens"]) == budget else "stop")
        assert r["prompt"] == p["prompt"] and isinstance(r["completion"], str)
        assert r["ttft_s"] > 0 and r["prompt_tokens"] > 0


def test_serve_plain_text_prints_completions(served, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("The capital of France is\n\nOne, two, three,\n")
    rc = cli.main(["serve", str(path), "--max-new-tokens", "2", "--threads", "2", "--no-cascade"])
    assert rc == 0
    text = capsys.readouterr().out
    assert re.search(r"requests done\s*│\s*2 of 2\b", text), text
    assert "first 2 of 2 completions" in text and "The capital of France is" in text
    assert "cascade off, prefix cache on" in text


def _fails(argv: list[str], capsys, *needles: str) -> None:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in captured.out + captured.err
    err = " ".join(captured.err.split())  # rich wraps long lines
    assert "attnopt serve: error:" in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    "content, needles",
    [
        ('{"prompt": "hi"}\n{"prompt": "oops",\n', (":2: not a JSON object",)),
        ('{"prompt": "hi", "max_tokens": 3}\n', (":1: unknown field(s) ['max_tokens']", "max_new_tokens")),
        ('{"max_new_tokens": 3}\n', ("give exactly one of 'prompt'",)),
        ('{"prompt": "hi", "max_new_tokens": 0}\n', ("'max_new_tokens' must be an int >= 1",)),
        ('{"prompt_ids": [1, -2]}\n', ("non-negative ints",)),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', (":2: duplicate id 1",)),
        ("\n  \n", ("has no prompts",)),
    ],
)
def test_serve_bad_prompts_file(tmp_path, capsys, content, needles):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    _fails(["serve", str(path)], capsys, *needles)


def test_serve_missing_file_and_bad_options(tmp_path, capsys):
    _fails(["serve", str(tmp_path / "nope.jsonl")], capsys, "prompts file not found", "nope.jsonl")
    _fails(["serve", str(tmp_path)], capsys, "is a directory")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00bad")
    _fails(["serve", str(tmp_path / "bin.jsonl")], capsys, "is not UTF-8 text")
    for budget in ("lots", "2XB", "0", "-1GiB"):
        _fails(["serve", str(EXAMPLES), f"--memory-budget={budget}"], capsys, "--memory-budget", budget)
    _fails(["serve", str(EXAMPLES), "--out", str(tmp_path / "no" / "such" / "dir.jsonl")], capsys, "--out")
    with pytest.raises(SystemExit) as exc:  # argparse's own checks
        cli.main(["serve", str(EXAMPLES), "--max-new-tokens", "0"])
    assert exc.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_serve_pool_too_small_is_a_clear_error(served, tmp_path, capsys):
    # One page holds 16 tokens of SmolLM2 (720 KiB in fp32): a 1 MiB pool cannot hold the long prompts.
    _fails(
        ["serve", str(EXAMPLES), "--memory-budget", "1MiB"], capsys, "prompts.jsonl:1:", "raise memory_budget"
    )
    _fails(["serve", str(EXAMPLES), "--memory-budget", "1KiB"], capsys, "holds no page")


def test_serve_local_model_folder(smollm2, tmp_path, capsys):
    """--model PATH: a tiny random LLaMA saved next to SmolLM2's tokenizer, prompts given as token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "ids.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3, 4, 5]}\n{"prompt_ids": [9, 8, 7], "id": "b"}\n')
    out = tmp_path / "out.jsonl"
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["serve", str(prompts), "--model", str(model_dir), "--max-new-tokens", "3",
                       "--memory-budget", "16MiB", "--out", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, capsys.readouterr()
    assert "on tiny (torch.float32)" in capsys.readouterr().out
    results = _lines(out)
    assert [r["id"] for r in results] == [0, "b"]
    assert all(r["prompt"] is None and 1 <= len(r["tokens"]) <= 3 for r in results)
    _fails(["serve", str(prompts), "--model", str(tmp_path / "missing")], capsys, "not a directory")
