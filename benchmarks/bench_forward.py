"""SmolLM2-135M forward at 2048 tokens against its GEMM floor, and the perplexity function against a bare
forward (issue 14 §2).

    .venv/bin/python benchmarks/bench_forward.py [--repeats 5] [--tokens 2048] [--threads 1,2]

**Floor.** The forward's matrix products, at their exact shapes (``n = --tokens`` rows): per block q ``[n,576]x
[576,576]``, k and v ``[576,192]``, o ``[576,576]``, gate and up ``[576,1536]``, down ``[1536,576]``; the LM head
``[n,576]x[576,49152]``; attention's two batched products ``q kᵀ`` ``[9,n,64]x[9,64,n]`` and ``A v``
``[9,n,n]x[9,n,64]`` (the full square). Each product is timed by itself (fp32, ``F.linear`` / ``torch.bmm``) on this
machine; ``floor = Σ_shapes count x median time`` (= Σ FLOPs / measured throughput per shape). The FLOPs of the
shapes are checked against :func:`shrink.tokens.flops.model_flops` (the project's one FLOPs model).

**Forward.** ``model(input_ids=ids)`` under ``torch.inference_mode`` on the first ``n`` tokens of WikiText-2 test,
the registry's SmolLM2 (fp32, SDPA attention). Ratio = median forward / floor.

**Perplexity.** :func:`shrink.eval.perplexity` on the same window (``seqlen=n``, one window) against the bare
forward; the extra time is the cross-entropy over ``(n-1) x 49,152`` logits (the ``.float()`` upcast is a no-op
on fp32 logits). The cross-entropy itself is timed on the forward's logits in three forms (the library's
``F.cross_entropy``, ``logsumexp - gather``, and row chunks of 256) with their nll differences.

**Where the excess goes.** One extra forward with module hooks (inclusive wall time per module: linears, the
attention module minus its linears = RoPE + attention core + reshapes, the MLP minus its linears = SiLU x up,
RMSNorm, rotary cos/sin, LM head) and ``torch.profiler``'s top operators by self time; the attention core
alone at the exact shapes, SDPA (what the model runs) against eager (``softmax(q kᵀ/√d + mask) v`` in fp32).

Everything is interleaved per repeat (floor shapes, forward, perplexity), medians of ``--repeats``. The load
average is recorded: on a shared machine the ratios move; rerun on an idle one before quoting them. Writes
``results/bench/forward.json``. About 4 minutes on an idle core (1 and 2 threads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from shrink import data, env, models
from shrink.eval import perplexity
from shrink.tokens.flops import model_flops


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def gemm_shapes(config, n: int) -> dict:
    """``{name: (kind, dims, count)}``: every matrix product of one forward on ``n`` tokens.

    ``linear``: dims ``(n, in, out)`` = ``x[n, in] @ W[out, in]ᵀ``; ``bmm``: ``(b, m, k, p)`` = ``[b,m,k] @ [b,k,p]``."""
    d, H, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // H
    m, V, L = config.intermediate_size, config.vocab_size, config.num_hidden_layers
    return {"q_proj": ("linear", (n, d, H * hd), L), "k_proj": ("linear", (n, d, kv * hd), L),
            "v_proj": ("linear", (n, d, kv * hd), L), "o_proj": ("linear", (n, H * hd, d), L),
            "gate_proj": ("linear", (n, d, m), L), "up_proj": ("linear", (n, d, m), L),
            "down_proj": ("linear", (n, m, d), L), "lm_head": ("linear", (n, d, V), 1),
            "attn q@kT": ("bmm", (H, n, hd, n), L), "attn A@v": ("bmm", (H, n, n, hd), L)}


def shape_flops(kind, dims) -> int:
    return 2 * math.prod(dims)


def make_gemm(kind, dims, g):
    if kind == "linear":
        n, i, o = dims
        x, w = torch.randn(n, i, generator=g), torch.randn(o, i, generator=g)
        return lambda: F.linear(x, w)
    b, mm, k, p = dims
    a, c = torch.randn(b, mm, k, generator=g), torch.randn(b, k, p, generator=g)
    return lambda: torch.bmm(a, c)


def attention_core(H, kv, n, hd, g):
    """SDPA (as HF's sdpa path calls it: k/v repeated to H heads, is_causal) and eager attention in fp32."""
    q, k, v = (torch.randn(1, h, n, hd, generator=g) for h in (H, kv, kv))
    rep = H // kv
    scale = hd ** -0.5
    mask = torch.full((n, n), float("-inf")).triu(1)

    def sdpa():
        kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=scale)

    def eager():
        kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        w = torch.matmul(q, kr.transpose(2, 3)) * scale + mask
        return torch.matmul(torch.softmax(w, -1, dtype=torch.float32), vr)

    return sdpa, eager


def ce_variants(logits, ids):
    """Three ways to the summed next-token nll of one window (``logits [1, n, V]`` fp32, ``ids [1, n]``)."""
    lg, y = logits[0, :-1], ids[0, 1:]

    def library():  # what shrink.eval.perplexity does
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()

    def lse_gather():
        return (torch.logsumexp(lg, -1) - lg.gather(1, y[:, None])[:, 0]).sum().item()

    def chunked(rows=256):
        return sum(F.cross_entropy(lg[s:s + rows], y[s:s + rows], reduction="sum").item()
                   for s in range(0, lg.shape[0], rows))

    return {"F.cross_entropy (library)": library, "logsumexp - gather": lse_gather, "chunked 256 rows": chunked}


class CachedLogits(torch.nn.Module):
    """Stands in for ``model`` inside :func:`shrink.eval.perplexity` and returns a precomputed output: timing the
    perplexity function on it measures everything the function does besides the forward (checks, slicing,
    cross-entropy, ``.item()``), free of the forward's load noise."""

    def __init__(self, model, out):
        super().__init__()
        self.inner, self.config, self._out = model, model.config, out
        self.shrink_info = getattr(model, "shrink_info", {})

    def forward(self, input_ids=None, **kwargs):
        return self._out


def module_breakdown(model, ids):
    """One forward with inclusive wall-time hooks on the modules, and the profiler's top operators."""
    inc = defaultdict(float)
    stack = {}

    def cat(name):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            return "attn linears (q/k/v/o)"
        if leaf in ("gate_proj", "up_proj", "down_proj"):
            return "mlp linears (gate/up/down)"
        if leaf == "self_attn":
            return "self_attn (incl.)"
        if leaf == "mlp":
            return "mlp (incl.)"
        if leaf in ("input_layernorm", "post_attention_layernorm", "norm"):
            return "RMSNorm"
        if leaf == "rotary_emb":
            return "rotary cos/sin"
        if leaf == "lm_head":
            return "lm_head"
        if leaf == "embed_tokens":
            return "embedding"
        return None

    hooks = []
    for name, mod in model.named_modules():
        c = cat(name)
        if c is None:
            continue
        hooks.append(mod.register_forward_pre_hook(lambda m, a, _n=name: stack.__setitem__(_n, time.perf_counter())))
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, _n=name, _c=c: inc.__setitem__(_c, inc[_c] + time.perf_counter() - stack[_n])))
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            total, _ = timed(lambda: model(input_ids=ids).logits)
    finally:
        for h in hooks:
            h.remove()
    parts = {"attn linears (q/k/v/o)": inc["attn linears (q/k/v/o)"],
             "RoPE + attention core + reshapes (self_attn - linears)":
                 inc["self_attn (incl.)"] - inc["attn linears (q/k/v/o)"],
             "mlp linears (gate/up/down)": inc["mlp linears (gate/up/down)"],
             "SiLU x up (mlp - linears)": inc["mlp (incl.)"] - inc["mlp linears (gate/up/down)"],
             "RMSNorm": inc["RMSNorm"], "rotary cos/sin": inc["rotary cos/sin"], "lm_head": inc["lm_head"],
             "embedding": inc["embedding"]}
    parts["rest (residual adds, casts, output)"] = total - sum(parts.values())
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    top = [{"op": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 4)} for e in ops]
    return total, {k: round(v, 4) for k, v in parts.items()}, top


def run_threads(model, ids, threads, repeats, with_ppl, g, with_eager=True):
    torch.set_num_threads(threads)
    shapes = gemm_shapes(model.config, ids.shape[1])
    fns = {k: make_gemm(kind, dims, g) for k, (kind, dims, _) in shapes.items()}
    sdpa, eager = attention_core(model.config.num_attention_heads, model.config.num_key_value_heads, ids.shape[1],
                                 model.config.hidden_size // model.config.num_attention_heads, g)
    for f in list(fns.values()) + [sdpa] + ([eager] if with_eager else []):  # warm-up (allocator, MKL)
        f()
    model(input_ids=ids)
    t = defaultdict(list)
    res = ce_vals = None
    for _ in range(repeats):  # interleaved: floor shapes, attention cores, forward, perplexity
        for k, f in fns.items():
            t[k].append(timed(f)[0])
        t["sdpa core"].append(timed(sdpa)[0])
        if with_eager:
            t["eager core"].append(timed(eager)[0])
        dt, out = timed(lambda: model(input_ids=ids))
        t["forward"].append(dt)
        if with_ppl:
            dt, res = timed(lambda: perplexity(model, ids[0], seqlen=ids.shape[1], max_windows=1, progress=False))
            t["perplexity"].append(dt)
            stub = CachedLogits(model, out)
            dt, res_stub = timed(lambda: perplexity(stub, ids[0], seqlen=ids.shape[1], max_windows=1, progress=False))
            assert res_stub.nll == res.nll  # the same logits: the stand-in measures the same computation
            t["perplexity minus forward"].append(dt)
            ce_vals = {}
            for name, f in ce_variants(out.logits, ids).items():
                dt, ce_vals[name] = timed(f)
                t[f"ce: {name}"].append(dt)
        del out
    med = {k: statistics.median(v) for k, v in t.items()}
    floor_rows = []
    for k, (kind, dims, count) in shapes.items():
        fl = shape_flops(kind, dims)
        floor_rows.append({"product": k, "dims": list(dims), "count": count, "gflop_each": round(fl / 1e9, 4),
                           "median_s": round(med[k], 5), "gflops_per_s": round(fl / med[k] / 1e9, 2),
                           "floor_s": round(count * med[k], 4)})
    floor = sum(r["floor_s"] for r in floor_rows)
    total_flops = sum(shape_flops(kind, dims) * c for kind, dims, c in shapes.values())
    L = model.config.num_hidden_layers
    causal_floor = floor - 0.5 * L * (med["attn q@kT"] + med["attn A@v"])
    lin_floor = sum(r["floor_s"] for r in floor_rows if shapes[r["product"]][0] == "linear")
    peak = max(r["gflops_per_s"] for r in floor_rows)  # the best measured GEMM throughput of the forward's shapes
    attn_flops = sum(shape_flops(kind, dims) * c for kind, dims, c in shapes.values() if kind == "bmm")
    peak_floor = lin_floor + 0.5 * attn_flops / (peak * 1e9)
    row = {"threads": threads, "repeats": repeats, "forward_s": round(med["forward"], 4),
           "forward_all_s": [round(x, 4) for x in t["forward"]], "floor_s": round(floor, 4),
           "ratio_forward_over_floor": round(med["forward"] / floor, 3),
           "floor_causal_half_attention_s": round(causal_floor, 4),
           "ratio_forward_over_causal_floor": round(med["forward"] / causal_floor, 3),
           "floor_linears_s": round(lin_floor, 4), "gemm_peak_gflops_per_s": peak,
           "floor_causal_attention_at_peak_s": round(peak_floor, 4),
           "ratio_forward_over_peak_floor": round(med["forward"] / peak_floor, 3),
           "forward_gflops_per_s": round(total_flops / med["forward"] / 1e9, 2), "floor_products": floor_rows,
           "attention_core_s": {"sdpa (model)": round(med["sdpa core"], 5),
                                "per_forward_sdpa": round(L * med["sdpa core"], 4)}}
    if with_eager:
        row["attention_core_s"].update({"eager": round(med["eager core"], 5),
                                        "per_forward_eager": round(L * med["eager core"], 4)})
    if with_ppl:
        row.update({"perplexity_s": round(med["perplexity"], 4), "perplexity_all_s": [round(x, 4) for x in t["perplexity"]],
                    "ratio_perplexity_over_forward": round(med["perplexity"] / med["forward"], 4),
                    "paired_ratio_perplexity_over_forward": round(statistics.median(
                        p / f for p, f in zip(t["perplexity"], t["forward"])), 4),
                    "perplexity_minus_forward_s": round(med["perplexity minus forward"], 4),
                    "ratio_perplexity_over_forward_composed": round(
                        (med["forward"] + med["perplexity minus forward"]) / med["forward"], 4),
                    "ppl": res.ppl, "ce_values": ce_vals, "cross_entropy_s": {k[4:]: round(v, 4) for k, v in med.items() if k.startswith("ce: ")}})
    return row, total_flops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts; perplexity rows at the first")
    a = ap.parse_args(argv)
    threads = [int(x) for x in a.threads.split(",")]
    load_before = list(os.getloadavg())
    t_start = time.perf_counter()
    model, tok = models.load("smollm2-135m")
    model.eval()
    ids = data.eval_tokens(tok)[: a.tokens].unsqueeze(0)
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for i, th in enumerate(threads):
            row, total_flops = run_threads(model, ids, th, a.repeats, with_ppl=(i == 0), g=g, with_eager=(i == 0))
            rows.append(row)
        torch.set_num_threads(threads[0])
        t_prof, parts, top = module_breakdown(model, ids)
        ce = rows[0]["ce_values"]
    ref = model_flops(model.config, [a.tokens] * model.config.num_hidden_layers)
    assert total_flops == ref["total"], (total_flops, ref)  # same count as the project's FLOPs model
    base = ce["F.cross_entropy (library)"]
    ce_diff = {k: {"nll_sum": v, "abs_diff_vs_library": abs(v - base),
                   "ppl_rel_diff": abs(math.exp(v / (a.tokens - 1)) / math.exp(base / (a.tokens - 1)) - 1)}
               for k, v in ce.items()}
    rec = {"benchmark": "forward-vs-floor", "argv": list(argv) if argv is not None else __import__("sys").argv[1:],
           "model": "smollm2-135m", "tokens": a.tokens, "dtype": "float32",
           "attn_implementation": model.config._attn_implementation, "flops": ref, "rows": rows,
           "breakdown_threads": threads[0], "breakdown_forward_s": round(t_prof, 4), "breakdown": parts,
           "profiler_top_ops": top, "cross_entropy_values": ce_diff,
           "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
           "wall_s": round(time.perf_counter() - t_start, 1), "versions": env.versions(), "kernels": env.kernel_set()}
    print(f"SmolLM2-135M forward on {a.tokens} tokens (fp32, {rec['attn_implementation']}), {ref['total'] / 1e9:.1f} "
          f"GFLOP (proj {ref['proj'] / 1e9:.1f}, attn {ref['attn'] / 1e9:.1f}, mlp {ref['mlp'] / 1e9:.1f}, "
          f"head {ref['head'] / 1e9:.1f}); medians of {a.repeats}, load average {load_before[0]:.1f}")
    print("  floors: full = every product timed at its shape (attention's q kᵀ and A v over the full square); causal ="
          " half the square; peak = linears at their shapes + causal attention FLOPs at the best GEMM throughput")
    print(f"  {'threads':>7} {'forward s':>10} {'full floor':>10} {'ratio':>6} {'causal':>7} {'ratio':>6} {'peak':>7} "
          f"{'ratio':>6} {'GFLOP/s':>8} {'ppl s':>7} {'ppl/fwd':>8} {'paired':>7} {'ppl-fwd s':>9}")
    for r in rows:
        print(f"  {r['threads']:>7} {r['forward_s']:>10.3f} {r['floor_s']:>10.3f} {r['ratio_forward_over_floor']:>6.3f} "
              f"{r['floor_causal_half_attention_s']:>7.3f} {r['ratio_forward_over_causal_floor']:>6.3f} "
              f"{r['floor_causal_attention_at_peak_s']:>7.3f} {r['ratio_forward_over_peak_floor']:>6.3f} "
              f"{r['forward_gflops_per_s']:>8.1f} {r.get('perplexity_s', float('nan')):>7.3f} "
              f"{r.get('ratio_perplexity_over_forward', float('nan')):>8.4f} "
              f"{r.get('paired_ratio_perplexity_over_forward', float('nan')):>7.4f} "
              f"{r.get('perplexity_minus_forward_s', float('nan')):>9.3f}")
    r0 = rows[0]
    print("  floor per product (threads=%d): " % r0["threads"] + ", ".join(
        f"{p['product']} {p['floor_s']:.2f}s @ {p['gflops_per_s']:.0f} GFLOP/s" for p in r0["floor_products"]))
    print(f"  attention core per forward (30 layers): sdpa {r0['attention_core_s']['per_forward_sdpa']:.3f} s, eager "
          f"{r0['attention_core_s']['per_forward_eager']:.3f} s")
    print(f"  breakdown of one forward ({t_prof:.2f} s with hooks + profiler): " +
          ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    print("  profiler top ops (self s): " + ", ".join(f"{o['op']} {o['self_s']:.3f}" for o in top[:8]))
    print("  cross-entropy (s): " + ", ".join(f"{k} {v:.3f}" for k, v in r0["cross_entropy_s"].items()) +
          "; nll vs library: " + ", ".join(f"{k} |d|={v['abs_diff_vs_library']:.2e}" for k, v in ce_diff.items()))
    out = Path(env.repo_root() or ".") / "results" / "bench" / "forward.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(f"wrote {out} ({rec['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
