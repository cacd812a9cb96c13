"""Context parallelism through transformers (attnopt.distributed.context_parallel / shard_inputs).

One spawn of 2 gloo processes runs every check on a tiny randomly initialised LlamaForCausalLM loaded
with attn_implementation="attnopt" and returns numbers (relative errors) and error messages; the tests
below assert on them, so a failure shows the real values. Each process also runs the single-process
model on the full sequence, the reference.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers >= 5")

import attnopt.distributed as cp
from attnopt.distributed._hf import global_positions, shift_labels
from tests._dist import run_ranks

P = 2
B, N, VOCAB = 2, 67, 128  # N odd: zigzag chunks of 17, 17, 17, 16 tokens
CU = [0, 11, 11, 40, 41, 67]  # an empty and a one-token document; boundaries inside both ranks' shards
MODES = ("ring", "allgather", "alltoall")  # alltoall: Hkv = 2 heads over 2 ranks
LAYOUTS = ("zigzag", "contiguous")
DOCS = ("causal", "documents")
HYBRID = [("gemma2", "ring", "zigzag"), ("gpt_oss", "ring", "zigzag"), ("gpt_oss", "alltoall", "contiguous")]
LOGITS_TOL = 1e-5  # max|diff| <= LOGITS_TOL * max|ref|
GRAD_TOL, GRAD_FLOOR = 1e-5, 1e-7  # per parameter: max|diff| <= GRAD_TOL * max|ref| + GRAD_FLOOR


# ---------------------------------------------------------------------------------------------------------
# What each process runs


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    import attnopt.integrations.transformers as ao_hf

    ao_hf.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("attnopt")
    return model.eval()


def _tiny_hybrid(kind: str):
    """Sliding-window and full layers (sliding_window=8, shorter than a shard): gemma2 adds softcap and a
    non-default scaling, gpt_oss learnable sinks (s_aux)."""
    import transformers as hf

    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=256,
    )
    if kind == "gemma2":
        # initializer_range 0.1: scores large enough that the cap changes the logits by ~3% (at 0.02: 2e-6)
        cfg = hf.Gemma2Config(
            **common, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, initializer_range=0.1
        )
        model = hf.Gemma2ForCausalLM(cfg)
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        cfg = hf.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2, rope_parameters=rope)
        model = hf.GptOssForCausalLM(cfg)
    assert cfg.layer_types == ["sliding_attention", "full_attention"], cfg.layer_types
    model.set_attn_implementation("attnopt")
    return model.eval()


def _positions(docs: str) -> torch.Tensor:
    """(B, N) position ids of the full rows, written out here (not with the library's helper)."""
    if docs == "causal":
        row = torch.arange(N)
    else:
        row = torch.cat([torch.arange(b - a) for a, b in itertools.pairwise(CU)])
    return row.expand(B, N)


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB).float(), targets.reshape(-1), reduction="sum", ignore_index=-100
    )


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, ids: torch.Tensor, docs: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Single process, full rows: logits and the gradients of the summed next-token loss.

    use_cache=False lets transformers read packed documents from the restarting position ids."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=_positions(docs), use_cache=False).logits
    _summed_loss(logits[:, :-1], ids[:, 1:]).backward()
    return logits.detach(), _grads(model)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / float(want.abs().max())


def _grad_ratio(got: dict, want: dict) -> tuple[float, str]:
    """Worst over parameters of max|diff| / (GRAD_TOL * max|ref| + GRAD_FLOOR) (<= 1 passes), and where."""
    if got.keys() != want.keys():
        return float("inf"), f"parameters with gradients differ: {sorted(got.keys() ^ want.keys())}"
    worst, where = 0.0, ""
    for name, w in want.items():
        r = float((got[name] - w).abs().max()) / (GRAD_TOL * float(w.abs().max()) + GRAD_FLOOR)
        if not r <= worst:  # NaN counts as worst
            worst, where = r, name
    return worst, where


def _sharded(model, ids: torch.Tensor, docs: str, mode: str, layout: str) -> tuple[torch.Tensor, dict]:
    """Context-parallel forward on this rank's shard, unsharded logits, all-reduced gradients of the
    summed loss over this rank's shifted labels (backward runs after the context has exited)."""
    import torch.distributed as dist

    cu = CU if docs == "documents" else None
    batch = cp.shard_inputs(ids, labels=ids, layout=layout, cu_seqlens=cu)
    model.zero_grad(set_to_none=True)
    # causal: transformers' default cache path (an empty DynamicCache); documents: no cache, where it
    # reads the zigzag shard's jumping positions as packed sequences (context_parallel must ignore that)
    extra = {} if docs == "causal" else {"use_cache": False}
    with cp.context_parallel(mode=mode, layout=layout, cu_seqlens=cu):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **extra).logits
    _summed_loss(logits, batch["labels"]).backward()
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g)
    return cp.unshard(logits.detach(), dim=1, layout=layout), grads


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _error_checks(rank: int, model, ids: torch.Tensor) -> dict[str, str]:
    """Bad uses: each must raise on every rank (the group stays usable for the checks that follow)."""
    from transformers import DynamicCache

    batch = cp.shard_inputs(ids, layout="zigzag")
    out: dict[str, str] = {}

    def padded():
        am = torch.ones_like(batch["input_ids"])
        if rank == 0:
            am[1, 0] = 0  # only rank 0 has padding: rank 1 must stop too, not wait
        with cp.context_parallel():
            model(**batch, attention_mask=am)

    def no_positions():
        with cp.context_parallel():
            model(input_ids=batch["input_ids"])

    def past_tokens():
        cache = DynamicCache(config=model.config)
        model(input_ids=batch["input_ids"][:, :3], cache=cache)  # outside: fills 3 past tokens
        with cp.context_parallel():
            model(**batch, cache=cache)

    def wrong_cu():
        with cp.context_parallel(cu_seqlens=[0, 5, N - 1]):
            model(**batch)

    with torch.no_grad():
        for name, fn in [
            ("padding", padded),
            ("no_positions", no_positions),
            ("past_tokens", past_tokens),
            ("wrong_cu", wrong_cu),
        ]:
            out[f"error/{name}"] = _error(fn)
        model.set_attn_implementation("sdpa")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with cp.context_parallel():
                model(**batch)
        model.set_attn_implementation("attnopt")
        out["warning/not_attnopt"] = "; ".join(str(w.message) for w in seen) or "no warning"
    return out


def _hf_loss(model, ids: torch.Tensor) -> float:
    """model(**shard_inputs(...), num_items_in_batch=...).loss summed over ranks vs the full row's loss."""
    import torch.distributed as dist

    with torch.no_grad():
        want = model(input_ids=ids, labels=ids, use_cache=False).loss
        batch = cp.shard_inputs(ids, labels=ids)
        count = (shift_labels(ids) != -100).sum()
        with cp.context_parallel():
            got = model(**batch, num_items_in_batch=count, use_cache=False).loss
        dist.all_reduce(got)
    return abs(float(got - want)) / abs(float(want))


def _checks(rank: int, world: int) -> dict[str, float | str]:
    model = _tiny_llama()
    ids = torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(1))
    results: dict[str, float | str] = dict(_error_checks(rank, model, ids))
    results["hf_loss"] = _hf_loss(model, ids)
    for docs in DOCS:
        ref_logits, ref_grads = _reference(model, ids, docs)
        for mode in MODES:
            for layout in LAYOUTS:
                logits, grads = _sharded(model, ids, docs, mode, layout)
                key = f"{docs}/{mode}/{layout}"
                results[f"logits/{key}"] = _rel(logits, ref_logits)
                results[f"grads/{key}"], results[f"grads_where/{key}"] = _grad_ratio(grads, ref_grads)
        with torch.no_grad():  # the context has exited: the same model runs single-process again, bitwise
            again = model(input_ids=ids, position_ids=_positions(docs), use_cache=False).logits
        results[f"restored/{docs}"] = float((again - ref_logits).abs().max())
    for kind, mode, layout in HYBRID:
        model = _tiny_hybrid(kind)
        ref_logits, ref_grads = _reference(model, ids, "causal")
        logits, grads = _sharded(model, ids, "causal", mode, layout)
        key = f"{kind}/{mode}/{layout}"
        results[f"logits/{key}"] = _rel(logits, ref_logits)
        results[f"grads/{key}"], results[f"grads_where/{key}"] = _grad_ratio(grads, ref_grads)
    return results


# ---------------------------------------------------------------------------------------------------------
# The tests (one spawn for all)


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, float | str]]:
    """Every check's result on each of the P ranks."""
    return run_ranks(_checks, P, timeout=180.0)


CASES = [f"{d}/{m}/{lay}" for d in DOCS for m in MODES for lay in LAYOUTS]
CASES += [f"{kind}/{m}/{lay}" for kind, m, lay in HYBRID]


@pytest.mark.parametrize("case", CASES)
def test_sharded_logits_equal_single_process(ranks, case):
    errs = [r[f"logits/{case}"] for r in ranks]
    assert max(errs) <= LOGITS_TOL, f"{case}: max|diff| / max|ref| per rank {errs} > {LOGITS_TOL}"


@pytest.mark.parametrize("case", CASES)
def test_summed_gradients_equal_single_process(ranks, case):
    """Per parameter: max|diff| <= 1e-5 * max|ref| + 1e-7, i.e. the worst ratio is at most 1."""
    got = [(r[f"grads/{case}"], r[f"grads_where/{case}"]) for r in ranks]
    assert all(ratio <= 1.0 for ratio, _ in got), f"{case}: worst ratio per rank (parameter): {got}"


def test_transformers_loss_from_shard_inputs(ranks):
    """shard_inputs' shift_labels with num_items_in_batch: the ranks' HF losses add up to the full one."""
    errs = [r["hf_loss"] for r in ranks]
    assert max(errs) <= 1e-6, f"relative loss difference per rank {errs}"


@pytest.mark.parametrize("docs", DOCS)
def test_model_runs_single_process_after_the_context(ranks, docs):
    diffs = [r[f"restored/{docs}"] for r in ranks]
    assert diffs == [0.0] * P, f"max|diff| per rank {diffs}"


ERRORS = {
    "padding": [
        "ValueError: attnopt.distributed.context_parallel: attention_mask has 1 zero(s) (padding)",
        "RankError: attnopt.distributed.context_parallel: rank 0 rejected its inputs",
    ],
    "no_positions": ["ValueError: attnopt.distributed.context_parallel: rank 0's position_ids are not"] * P,
    "past_tokens": [  # 3 cached + 33 / 34 tokens of the shard
        f"NotImplementedError: attnopt.distributed.context_parallel: the keys hold {n} positions for"
        for n in (36, 37)
    ],
    "wrong_cu": [
        "ValueError: attnopt.distributed.context_parallel: cu_seqlens=[0, 5, 66] ends at 66, but the "
        "sequence holds N=67 tokens"
    ]
    * P,
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_uses_raise_on_every_rank(ranks, name):
    got = [r[f"error/{name}"] for r in ranks]
    for rank, (msg, want) in enumerate(zip(got, ERRORS[name])):
        assert msg.startswith(want), f"rank {rank}: {msg!r} does not start with {want!r}"
    if name == "padding":  # rank 1 says why rank 0 stopped
        assert "padding is not supported across ranks" in got[1], got[1]


def test_warns_when_no_layer_ran_through_attnopt(ranks):
    for rank, msg in enumerate(r["warning/not_attnopt"] for r in ranks):
        assert "no attention layer ran through attnopt" in msg, f"rank {rank}: {msg!r}"


# ---------------------------------------------------------------------------------------------------------
# No processes needed


def test_shard_inputs_shifts_before_sharding():
    """The shards' labels, put back in global order, are the full row's shifted labels; positions too."""
    ids = torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(2))
    for layout in LAYOUTS:
        for cu, want_pos in ((None, _positions("causal")), (CU, _positions("documents"))):
            shards = [
                cp.shard_inputs(ids, labels=ids, layout=layout, cu_seqlens=cu, rank=r, world_size=P)
                for r in range(P)
            ]
            lay = cp.Layout.make(layout, N, P)
            order = lay.order()
            for key, want in (
                ("input_ids", ids),
                ("position_ids", want_pos),
                ("labels", torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)),
            ):
                got = torch.empty_like(want)
                got[:, order] = torch.cat([s[key] for s in shards], dim=1)
                assert torch.equal(got, want), f"{layout}, cu={cu}: {key}\n{got}\n!=\n{want}"
            assert all(s["shift_labels"] is s["labels"] for s in shards)


def test_global_positions_and_shift_labels():
    assert global_positions(6).tolist() == [0, 1, 2, 3, 4, 5]
    assert global_positions(6, [0, 2, 2, 5, 6]).tolist() == [0, 1, 0, 1, 2, 0]
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"labels": torch.zeros(B, N - 1, dtype=torch.long)}, ValueError, r"labels must be a tensor of"),
        (
            {"cu_seqlens": [0, 5]},
            ValueError,
            r"shard_inputs: cu_seqlens=\[0, 5\] ends at 5, but the sequence holds N=67",
        ),
        ({"cu_seqlens": [1, 67]}, ValueError, r"shard_inputs: document cu_seqlens=\[1, 67\] must start at 0"),
    ],
)
def test_shard_inputs_rejects_bad_arguments(kwargs, error, match):
    ids = torch.zeros(B, N, dtype=torch.long)
    with pytest.raises(error, match=match):
        cp.shard_inputs(ids, rank=0, world_size=P, **kwargs)


def test_shard_inputs_rejects_1d_ids():
    with pytest.raises(TypeError, match=r"input_ids must be a \(batch, tokens\) tensor, got Tensor \(67,\)"):
        cp.shard_inputs(torch.zeros(N, dtype=torch.long), rank=0, world_size=P)


def test_context_parallel_needs_a_process_group():
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialized"), cp.context_parallel():
        pass
