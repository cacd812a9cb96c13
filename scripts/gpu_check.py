"""One-shot GPU check (run on a CUDA machine from the repo root: python3 scripts/gpu_check.py [OUT_DIR]).

CI has no GPU; this script is what a session with a lent GPU runs. It checks, on CUDA tensors:
1. attnopt.attention (auto and pinned backends) against the float64 oracle with the test suite's
   tolerance rule (tests/_oracle.py), forward and gradients, fp32 / bf16 / fp16, for the variants;
2. the transformers drop-in on small randomly initialised LLaMA (GQA) and BERT models: logits / hidden
   states equal to sdpa / eager on padded batches, greedy generation token-identical, packed sequences;
3. issue #8's reliability classes: odd strides, masked-out NaN/inf, bf16 bias precision, empty inputs,
   torch.compile(fullgraph=True) of MultiHeadAttention;
4. attnopt.maps views and context parallelism (attnopt.distributed, one NCCL rank: the device paths of
   the agreement, the plan's pairs and the alltoall reshuffle; several ranks need several GPUs);
5. a few timings against torch SDPA (for the record; benchmarks are not tests).
Writes a JSON summary to OUT_DIR/gpu_check.json and exits 1 if any check failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), "..", "src"),
    os.path.join(os.path.dirname(__file__), ".."),
]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tests._oracle import assert_close  # noqa: E402

import attnopt as ao  # noqa: E402
from attnopt import mods  # noqa: E402
from attnopt.backends.reference import reference_attention  # noqa: E402

DEV = os.environ.get("ATTNOPT_CHECK_DEVICE", "cuda")  # "cpu" for a dry run of the script itself
results: list[dict] = []


def check(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        info = fn()
        results.append({"check": name, "ok": True, "info": info, "s": round(time.perf_counter() - t0, 2)})
    except Exception as e:  # report every failure, keep going
        results.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:800]})
        traceback.print_exc()
    r = results[-1]
    print(("ok   " if r["ok"] else "FAIL ") + name + ("" if r["ok"] else "  " + r["error"][:300]), flush=True)


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


def main() -> int:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    env = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": ao.available_backends(),
    }
    print(env, flush=True)
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (ATTNOPT_CHECK_DEVICE=cpu for a dry run)")
        return 2
    attention_checks()
    reliability_checks()
    maps_checks()
    cp_checks()
    try:
        import transformers

        env["transformers"] = transformers.__version__
        hf_checks()
    except ImportError as e:
        results.append({"check": "hf", "ok": False, "error": f"transformers missing: {e}"})
    t = {}
    try:
        t = timings() if DEV == "cuda" else {}
    except Exception as e:
        t = {"error": repr(e)}
    print(json.dumps(t, indent=1))
    bad = [r for r in results if not r["ok"]]
    summary = {
        "env": env,
        "passed": len(results) - len(bad),
        "failed": len(bad),
        "failures": bad,
        "timings": t,
        "results": results,
    }
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
