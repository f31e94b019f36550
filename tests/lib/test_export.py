"""Export (issue 14 §4): pruned and quantized models saved so that transformers reloads them.

Pruned: bit-identical weights and perplexity after reload, masks round-trip, the sparsity asked for.
Quantized (compressed-tensors): the decompressed weights are bit for bit the chapter's fake-quantized weights;
weight-only exports reload with identical perplexity; W8A8 within the activation-step convention difference.
"""

import json

import pytest
import torch
from safetensors import safe_open

from shrink import export as X
from shrink import models
from shrink.eval import perplexity
from shrink.pruning import MaskSet, PruningError
from shrink.pruning.export import export_pruned, load_masks
from shrink.quant import QuantError, QuantSpec, fake_quant, wrap_model

IDS = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0))


def _masks(m, sparsity=0.5):
    out = {}
    for n, p in m.named_parameters():
        if "layers" in n and n.endswith("proj.weight"):
            k = int(p.numel() * sparsity)
            idx = p.detach().abs().flatten().argsort()[:k]
            keep = torch.ones(p.numel(), dtype=torch.bool)
            keep[idx] = False
            out[n] = keep.view_as(p)
    return MaskSet(m, out)


def _stored_dtypes(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_pruned_export_reloads_bit_identical(tmp_path):
    m, _ = models.load("tiny-llama")
    ms = _masks(m)
    ms.apply()
    before = perplexity(m, IDS, seqlen=128).ppl
    man = export_pruned(m, ms, tmp_path / "out", what={"method": "magnitude 50%"})
    r = X.reload(tmp_path / "out")
    for n, p in m.named_parameters():
        assert torch.equal(r.get_parameter(n), p), n
    assert perplexity(r, IDS, seqlen=128).ppl == before
    back = load_masks(tmp_path / "out")
    assert set(back) == set(ms.masks) and all(torch.equal(back[n], ms.masks[n]) for n in back)
    assert man["what"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    rep = X.linear_report(r)
    assert all(abs(rep[n[:-len(".weight")]]["sparsity"] - 0.5) < 1e-3 for n in ms.masks)
    files = json.loads((tmp_path / "out" / X.MANIFEST).read_text())["files"]
    assert "masks.safetensors" in files and "model.safetensors" in files


def test_pruned_export_refuses_weights_that_break_their_masks(tmp_path):
    m, _ = models.load("tiny-llama")
    ms = _masks(m)  # not applied: pruned positions still hold weights
    with pytest.raises(PruningError, match="re-apply the masks"):
        export_pruned(m, ms, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("w_spec", [QuantSpec(bits=8, granularity="channel"),
                                    QuantSpec(bits=4, granularity="group", group_size=32)], ids=["w8", "w4g32"])
def test_weight_only_export_reloads_with_identical_perplexity(tmp_path, w_spec):
    pytest.importorskip("compressed_tensors")
    from shrink.quant.export import export_quantized

    m, _ = models.load("tiny-llama")
    ref = {n: fake_quant(p.detach(), w_spec) for n, p in m.named_parameters() if "layers" in n and "proj" in n}
    f, _ = models.load("tiny-llama")
    wrap_model(f, w_spec, None)
    expect = perplexity(f, IDS, seqlen=128).ppl
    man = export_quantized(m, tmp_path / "q", w_spec)
    stored = _stored_dtypes(tmp_path / "q")
    assert man["what"]["format"] == "pack-quantized"
    assert all(stored[k] == "I32" for k in stored if k.endswith("proj.weight_packed"))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == w_spec.bits
    r = X.reload(tmp_path / "q")
    got = perplexity(r, IDS, seqlen=128).ppl
    for n, v in ref.items():
        assert torch.equal(r.get_parameter(n), v), n
    assert got == expect


def test_w8a8_export_stores_int8_and_reloads_within_the_step_convention(tmp_path):
    pytest.importorskip("compressed_tensors")
    from shrink.quant.export import export_quantized

    w, a = QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, granularity="token")
    m, _ = models.load("tiny-llama")
    f, _ = models.load("tiny-llama")
    wrap_model(f, w, a)
    expect = perplexity(f, IDS, seqlen=128).ppl
    man = export_quantized(m, tmp_path / "q", w, a)
    assert man["what"]["format"] == "int-quantized"
    stored = _stored_dtypes(tmp_path / "q")
    assert sum(1 for k, v in stored.items() if k.endswith("proj.weight") and v == "I8") == 14
    got = perplexity(X.reload(tmp_path / "q"), IDS, seqlen=128).ppl
    assert abs(got - expect) / expect < 2e-3  # activation step max/127.5 (compressed-tensors) vs max/127 (ours)


def test_export_bad_input_is_clear(tmp_path):
    pytest.importorskip("compressed_tensors")
    from shrink.quant.export import export_quantized

    m, _ = models.load("tiny-llama")
    with pytest.raises(QuantError, match="symmetric"):
        export_quantized(m, tmp_path / "a", QuantSpec(bits=8, symmetric=False))
    with pytest.raises(QuantError, match="Static"):
        export_quantized(m, tmp_path / "b", QuantSpec(bits=8), QuantSpec(bits=8, granularity="tensor", static=True))
    wrap_model(m, QuantSpec(bits=8), None)
    with pytest.raises(QuantError, match="unwrap_model"):
        export_quantized(m, tmp_path / "c", QuantSpec(bits=8))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("keep me")
    m2, _ = models.load("tiny-llama")
    ms = _masks(m2)
    ms.apply()
    with pytest.raises(Exception, match="not empty"):
        export_pruned(m2, ms, tmp_path / "d")
    assert (tmp_path / "d" / "x").read_text() == "keep me"
    with pytest.raises(Exception, match="config.json"):
        X.reload(tmp_path / "d")


def test_cli_export_prune_and_quant(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from shrink.cli import main

    main(["export", str(tmp_path / "p"), "--model", "tiny-llama", "--prune", "wanda:2:4", "--calib", "4",
          "--seqlen", "64"])
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "pruned" and out["sparsity"] == 0.5
    r = X.reload(tmp_path / "p")
    w = r.model.layers[0].mlp.up_proj.weight
    assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())  # 2:4 kept after reload
    main(["export", str(tmp_path / "q"), "--model", "tiny-llama", "--quant", "w8"])
    assert json.loads(capsys.readouterr().out)["format"] == "pack-quantized"
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "q"), "--model", "tiny-llama", "--quant", "w8"])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().out
