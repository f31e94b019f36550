"""What real INT8 W8A8 buys: prefill and decode time and weight memory against fp32, and how far real INT8
departs from the fake quantization the bits chapter measures with (notebook 02l, ``benchmarks/bench_int8.py``).

Three variants of one model, on identical inputs, in one process (one thread by default):

* ``fp32``: the model as loaded;
* ``fake W8A8``: :func:`~shrink.quant.wrap_model` with symmetric per-channel INT8 weights and per-token
  dynamic INT8 activations (quantize, dequantize, fp32 GEMM: what every bits-chapter number is measured with);
* ``real W8A8 (int8)``: the same wrapped model converted by :func:`~shrink.quant.int8.to_int8` (int8 weights
  stored, int32 accumulation through ``shrink.ops.int8_matmul_dequant``, dequant epilogue).

Prefill = one forward over ``prefill`` tokens; decode = ``decode`` greedy steps with the KV cache after a
64-token prompt (16 at tiny). The variants are interleaved ``repeats`` times and the median is kept; the load
average is recorded around the run (timings on a shared machine are upper bounds). Timings never go into
asserts.

Real and fake W8A8 compute the same codes and differ only in the order of float rounding (module
:mod:`shrink.quant.int8`), but SmolLM2's massive activations make per-token steps large, so one activation code
that flips at a ``.5`` tie moves the next block's input by a whole step and the difference grows with depth.
The fair yardstick is the band that a ``1e-6`` relative range perturbation (notebook 02c) already moves fake
W8A8 by: :func:`compare` reports the perplexity of real, fake and fake under ``perturb_seeds`` perturbations.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

from ..scales import Preset, PresetError, register
from .fakequant import perturb_ranges, wrap_model
from .int8 import to_int8
from .quantizer import QuantSpec

#: the W8A8 recipe of the comparison: SmoothQuant's O1 grid (symmetric, per channel / per token dynamic)
W_SPEC = QuantSpec(bits=8, symmetric=True, granularity="channel")
A_SPEC = QuantSpec(bits=8, symmetric=True, granularity="token")
VARIANTS = ("fp32", "fake W8A8", "real W8A8 (int8)")


@dataclass(frozen=True)
class Int8SpeedPreset(Preset):
    """Notebook 02l: model, prefill / decode lengths, prompt length, interleaved repeats, threads, and the
    perplexity check (``ppl_windows`` windows of ``ppl_seqlen`` tokens; ``perturb_seeds`` perturbations)."""

    model: str = "smollm2-135m"
    prefill: int = 512
    decode: int = 32
    prompt: int = 64
    repeats: int = 3
    threads: int = 1
    ppl_windows: int = 4
    ppl_seqlen: int = 512
    perturb_seeds: int = 3
    perturb_eps: float = 1e-6

    def check(self) -> None:
        if min(self.prefill, self.decode, self.prompt, self.repeats, self.threads) < 1:
            raise PresetError("Int8SpeedPreset: prefill, decode, prompt, repeats and threads must be >= 1")
        if self.prompt > self.prefill:
            raise PresetError(f"Int8SpeedPreset: prompt {self.prompt} must not exceed prefill {self.prefill} "
                              "(the prompt is the start of the prefill window)")


register("int8-speed", {
    "tiny": Int8SpeedPreset(model="tiny-llama", prefill=64, decode=4, prompt=16, repeats=1, ppl_windows=2,
                            ppl_seqlen=64, perturb_seeds=2),
    "cpu": Int8SpeedPreset(),
    "paper": Int8SpeedPreset(),
})


@torch.no_grad()
def _prefill(model, ids):
    return model(input_ids=ids).logits


@torch.no_grad()
def _decode(model, prompt, steps):
    out = model(input_ids=prompt, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    toks = [tok]
    for _ in range(steps - 1):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        toks.append(tok)
    return torch.cat(toks, 1)


def _timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def compare(model: torch.nn.Module, eval_ids: torch.Tensor, cfg: Int8SpeedPreset) -> dict:
    """Time and compare the three variants (module docstring). ``model`` is not modified (deep copies).

    Args:
        model: a causal LM (fp32) whose decoder linears :func:`~shrink.quant.wrap_model` wraps.
        eval_ids: int64 ``[N]`` evaluation stream (``shrink.data.eval_tokens``); the prefill window is its
            first ``cfg.prefill`` tokens and the prompt the first ``cfg.prompt`` of those.
        cfg: :class:`Int8SpeedPreset`.

    Returns:
        JSON-able dict: ``rows`` (per variant: median prefill s, decode ms/token, speed-ups vs fp32, the prefill
        window's perplexity), ``memory`` (decoder-linear weight bytes fp32 vs int8 incl. steps), the int8
        backend that ran, real-vs-fake logits (max relative difference, same greedy tokens) and
        ``perplexity_band``.
    """
    from .. import ops
    from ..eval import perplexity

    threads0 = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        fake, real = copy.deepcopy(model), copy.deepcopy(model)
        wrap_model(fake, W_SPEC, A_SPEC)
        wrap_model(real, W_SPEC, A_SPEC)
        mem = to_int8(real)
        ids = eval_ids[: cfg.prefill].unsqueeze(0)
        prompt = ids[:, : cfg.prompt]
        variants = dict(zip(VARIANTS, (model, fake, real)))
        times = {k: {"prefill": [], "decode": []} for k in variants}
        outs, load0 = {}, os.getloadavg()
        for _ in range(cfg.repeats):  # interleaved: drifting machine load hits every variant alike
            for k, m in variants.items():
                t, lg = _timed(lambda: _prefill(m, ids))
                times[k]["prefill"].append(t)
                t, gen = _timed(lambda: _decode(m, prompt, cfg.decode))
                times[k]["decode"].append(t)
                outs[k] = (lg, gen)
        load1 = os.getloadavg()
        backend = ops.last_backend("int8_matmul_dequant")
        lg_f, gen_f = outs["fake W8A8"]
        lg_r, gen_r = outs["real W8A8 (int8)"]
        rel = float((lg_r - lg_f).abs().max() / lg_f.abs().max())
        nll = {k: float(torch.nn.functional.cross_entropy(o[0][0, :-1], ids[0, 1:])) for k, o in outs.items()}
        base = {s: statistics.median(times["fp32"][s]) for s in ("prefill", "decode")}
        rows = []
        for k in variants:
            p, d = statistics.median(times[k]["prefill"]), statistics.median(times[k]["decode"])
            rows.append({"variant": k, "prefill_s": p, "prefill_speedup_vs_fp32": base["prefill"] / p,
                         "decode_ms_per_token": 1000 * d / cfg.decode, "decode_speedup_vs_fp32": base["decode"] / d,
                         "prefill_s_all": times[k]["prefill"], "decode_s_all": times[k]["decode"],
                         "prefill_window_ppl": math.exp(nll[k])})
        band = None
        if cfg.ppl_windows:
            ppl = lambda m: perplexity(m, eval_ids, seqlen=cfg.ppl_seqlen, max_windows=cfg.ppl_windows).ppl  # noqa: E731
            band = {"windows": cfg.ppl_windows, "seqlen": cfg.ppl_seqlen, "eps": cfg.perturb_eps,
                    "real": ppl(real), "fake": ppl(fake), "fp32": ppl(model), "fake_perturbed": []}
            for seed in range(cfg.perturb_seeds):
                perturb_ranges(fake, cfg.perturb_eps, seed)
                band["fake_perturbed"].append(ppl(fake))
            lo = min(band["fake_perturbed"] + [band["fake"]])
            hi = max(band["fake_perturbed"] + [band["fake"]])
            band |= {"band_lo": lo, "band_hi": hi, "inside_band": bool(lo <= band["real"] <= hi),
                     "real_minus_fake": band["real"] - band["fake"], "band_width": hi - lo}
    finally:
        torch.set_num_threads(threads0)
    return {"variants": list(VARIANTS), "w_spec": W_SPEC.describe(), "a_spec": A_SPEC.describe(),
            "prefill_tokens": cfg.prefill, "decode_tokens": cfg.decode, "prompt_tokens": cfg.prompt,
            "repeats": cfg.repeats, "threads": cfg.threads, "rows": rows, "memory": mem, "int8_backend": backend,
            "logits_max_rel_diff_real_vs_fake": rel, "same_greedy_tokens": bool(torch.equal(gen_r, gen_f)),
            "greedy_tokens_agree": int((gen_r == gen_f).sum()), "perplexity_band": band,
            "load_average_before": list(load0), "load_average_after": list(load1)}
