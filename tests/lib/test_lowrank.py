"""Core low-rank compensation (shrink.lowrank): EoRA vs plain SVD, exactness at full rank, use from both axes."""

import copy

import pytest
import torch

from shrink.lowrank import LowRankError, compensate_model, eora_factors, extra_parameters, svd_factors


def _layer(seed, out=10, d=16, n=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)) \
        * torch.linspace(0.1, 4, d)
    dW = torch.randn(out, d, generator=g)
    return X, dW


def test_eora_vs_svd_each_optimal_in_its_norm():
    X, dW = _layer(0)
    act = lambda D: float(((X @ D.T) ** 2).sum())  # noqa: E731
    fro = lambda D: float((D ** 2).sum())  # noqa: E731
    for r in (1, 3, 6):
        Be, Ae = eora_factors(dW, X.T @ X, r)
        Bs, As = svd_factors(dW, r)
        assert act(dW - Be @ Ae) < act(dW - Bs @ As)      # EoRA: best in the activation norm
        assert fro(dW - Bs @ As) < fro(dW - Be @ Ae)      # SVD: best in the Frobenius norm (Eckart-Young)
        assert Be.shape == (10, r) and Ae.shape == (r, 16)
        assert Be.numel() + Ae.numel() == extra_parameters(10, 16, r) == Bs.numel() + As.numel()
    Bs, As = svd_factors(dW, 10)
    assert torch.allclose(Bs @ As, dW, atol=1e-5)
    with pytest.raises(LowRankError, match="rank"):
        svd_factors(dW, 0)
    with pytest.raises(LowRankError, match="gram"):
        eora_factors(dW, torch.eye(3), 2)


def test_pruning_reexports_the_core():
    import shrink.lowrank as core
    from shrink.pruning import compensate as pc

    assert pc.eora_factors is core.eora_factors and pc.LowRankAdd is core.LowRankAdd
    assert pc.bias_compensation is core.bias_compensation and pc.extra_parameters is core.extra_parameters


@pytest.mark.parametrize("method", ["eora", "svd"])
def test_quantized_model_compensation(method):
    from shrink.models import load
    from shrink.quant import QuantSpec, WeightQuantSpec, quantize_model
    from shrink.quant.compensate import compensate_quantized, extra_parameters_of

    model, _ = load("tiny-llama", seed=0)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    q = copy.deepcopy(model)
    quantize_model(q, ids, WeightQuantSpec(method="gptq", grid=QuantSpec(bits=3, symmetric=False,
                                                                         granularity="channel")), verbose=False)
    with torch.no_grad():
        ref = model(ids).logits
        err = lambda m: float(((m(ids).logits - ref) ** 2).mean())  # noqa: E731
        base = err(q)
        qw = {n: p.clone() for n, p in q.named_parameters()}
        c = copy.deepcopy(q)
        info = compensate_quantized(c, model, ids, rank=4, method=method)
        assert info["extra_params"] == extra_parameters_of(q, 4)
        assert err(c) < base
        for n, p in c.named_parameters():  # quantized weights untouched (now under .linear)
            key = n.replace(".linear.", ".")
            if key in qw:
                assert torch.equal(p, qw[key])
        full = copy.deepcopy(q)
        compensate_quantized(full, model, ids, rank=10_000, method=method)  # full rank: B A = dW
        assert err(full) < 1e-8 * base + 1e-10


def test_eora_beats_svd_on_the_calibration_outputs_of_a_pbllm_model():
    from shrink.models import load
    from shrink.quant.compensate import compensate_quantized
    from shrink.quant.pbllm import PBSpec, pbllm_model

    model, _ = load("tiny-llama", seed=0)
    ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(2))
    q = copy.deepcopy(model)
    pbllm_model(q, ids, PBSpec(salient_frac=0.1, metric="hessian"), verbose=False)
    with torch.no_grad():
        ref = model(ids).logits
        errs = {}
        for method in ("eora", "svd"):
            c = copy.deepcopy(q)
            compensate_quantized(c, model, ids, rank=4, method=method)
            errs[method] = float(((c(ids).logits - ref) ** 2).mean())
    assert errs["eora"] < errs["svd"]


def test_nothing_to_do_is_an_error():
    from shrink.models import load

    m, _ = load("tiny-llama", seed=0)
    with pytest.raises(LowRankError, match="rank > 0 or bias"):
        compensate_model(m, m, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(LowRankError, match="method"):
        compensate_model(m, m, torch.zeros(1, 4, dtype=torch.long), rank=1, method="qr")


def test_eora_experiment_cells_on_tiny(monkeypatch, tmp_path):
    from shrink import scales
    from shrink.quant.compensate_experiment import EoRAContext

    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    cfg = scales.get("eora", "tiny").with_(windows=2, calib_nsamples=2, bases=("pbllm",))
    ctx = EoRAContext(cfg, "tiny")
    none, eora, svd = (ctx.measure("pbllm", m, 2, 0) for m in (None, "eora", "svd"))
    assert none["extra_params"] == 0 and eora["extra_params"] == svd["extra_params"] == ctx.extra_params(2)
    from shrink.models import BlockRunner
    from shrink.quant.gptq import decoder_weight_linears

    numel = sum(l.weight.numel() for b in BlockRunner(ctx.model).blocks for l in decoder_weight_linears(b).values())
    assert eora["extra_bits_per_weight"] == 16 * eora["extra_params"] / numel
    assert all(c["ppl"] > 1 for c in (none, eora, svd))
    # the base quantization is computed once per draw and reused (local tensor cache)
    assert len(list((tmp_path / "cache" / "tensors").glob("eora-base-*.pt"))) == 1


def test_eora_paper_preset_on_a_standin(monkeypatch, tmp_path, data_dir):
    """02k's paper preset (LLaMA-3-8B, C4 calibration) on a random-init stand-in and a local C4-format file, shrunk
    to a few short windows: the base alone and one EoRA cell, with the exact extra-parameter count."""
    from conftest import c4_like_file
    from shrink import scales
    from shrink.quant.compensate_experiment import EoRAContext

    monkeypatch.setenv("SHRINK_STANDINS", "1")
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SHRINK_C4_FILES", str(c4_like_file(tmp_path / "c4-train.00000-of-01024.json")))
    cfg = scales.get("eora", "paper").with_(seqlen=64, windows=2, calib_nsamples=2, calib_seqlen=64, ranks=(2,),
                                            bases=("gptq",), methods=("eora",))
    assert cfg.calib_corpus == "c4"
    ctx = EoRAContext(cfg, "paper")
    assert ctx.model.shrink_info["standin_for"] == "meta-llama/Meta-Llama-3-8B"
    base, cell = ctx.measure("gptq", None, 0, 0), ctx.measure("gptq", "eora", 2, 0)
    assert base["ppl"] > 1 and cell["ppl"] > 1 and base["extra_params"] == 0
    assert cell["extra_params"] == ctx.extra_params(2) > 0
    assert cell["zero_shot"].startswith("not run: offline")
    assert len(list((tmp_path / "results" / "paper" / "02-bits").glob("eora-*.json"))) == 2
