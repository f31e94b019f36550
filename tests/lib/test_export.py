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
    with pytest.raises(QuantError, match="per tensor"):
        export_quantized(m, tmp_path / "a", QuantSpec(bits=8, symmetric=False, granularity="tensor"))
    with pytest.raises(QuantError, match="w_spec"):
        export_quantized(m, tmp_path / "a")
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


# --------------------------------------------------------------------------------------------------------------
# weight-only results with their own grids (issue 15): GPTQ, RSQ (rotated), FlexRound, PB-LLM
# --------------------------------------------------------------------------------------------------------------
CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))


def _dequantized_reload(folder):
    from shrink.quant.export import dequantized_reload

    return dequantized_reload(folder)


def _assert_round_trip(q, folder):
    """The reloaded model (as transformers loads it) has q's perplexity; dequantized, q's weights bit for bit."""
    ref = {n: p.detach().clone() for n, p in q.named_parameters()}
    assert perplexity(X.reload(folder), IDS, seqlen=128).ppl == perplexity(q, IDS, seqlen=128).ppl
    r = _dequantized_reload(folder)
    for n, v in ref.items():
        assert torch.equal(r.get_parameter(n), v), n


@pytest.mark.parametrize("bits,gran,sym,fmt", [(4, "channel", False, "int-quantized"),
                                               (3, "group", False, "int-quantized"),
                                               (2, "channel", False, "int-quantized"),
                                               (8, "channel", False, "int-quantized"),
                                               (3, "group", True, "pack-quantized")],
                         ids=["w4-asym", "w3g32-asym", "w2-asym", "w8-asym", "w3g32-sym"])
def test_gptq_export_keeps_its_grids_bit_for_bit(tmp_path, bits, gran, sym, fmt):
    pytest.importorskip("compressed_tensors")
    import copy

    from shrink.quant import WeightQuantSpec, quantize_model, rtn_quantize
    from shrink.quant.export import export_quantized

    m, _ = models.load("tiny-llama")
    grid = QuantSpec(bits=bits, symmetric=sym, granularity=gran, group_size=32)
    res = quantize_model(m, CALIB, WeightQuantSpec(method="gptq", grid=grid), verbose=False)
    w = m.model.layers[0].mlp.down_proj.weight
    if not sym:  # an asymmetric grid re-derived from GPTQ's rounded weights is not the one GPTQ used
        assert not torch.equal(w, rtn_quantize(w, grid))
    man = export_quantized(copy.deepcopy(m), tmp_path / "q", grids=res["grids"])
    assert man["what"]["format"] == fmt and man["what"]["grid_source"] == "the quantizer's grids"
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["symmetric"] is sym
    _assert_round_trip(m, tmp_path / "q")


def test_rsq_rotated_and_flexround_export_round_trip(tmp_path):
    pytest.importorskip("compressed_tensors")
    import copy

    from shrink.quant import WeightQuantSpec, quantize_model
    from shrink.quant.export import export_quantized
    from shrink.quant.flexround import FlexRoundSpec, flexround_model
    from shrink.quant.rsq import rotate_model, token_weight_fn

    grid = QuantSpec(bits=3, symmetric=False, granularity="channel")
    m, _ = models.load("tiny-llama")
    m.config.tie_word_embeddings = True
    m.lm_head.weight = m.model.embed_tokens.weight  # tied, as SmolLM2: rotation's folded norm unties them
    rotate_model(m, "hadamard", seed=0)
    res = quantize_model(m, CALIB, WeightQuantSpec(method="gptq", grid=grid),
                         token_weights=token_weight_fn(m, "attncon"), verbose=False)
    assert m.config.tie_word_embeddings is False  # rotate_model untied them (the final norm folds into lm_head)
    export_quantized(copy.deepcopy(m), tmp_path / "rsq", grids=res["grids"])
    _assert_round_trip(m, tmp_path / "rsq")
    t, _ = models.load("tiny-llama")  # a head changed behind a config that still says "tied": saved untied
    t.config.tie_word_embeddings = True
    t.lm_head.weight = torch.nn.Parameter(t.model.embed_tokens.weight.detach() * 1.5)
    man = export_quantized(copy.deepcopy(t), tmp_path / "tied", QuantSpec(bits=8))
    assert man["what"]["untied"] is True
    assert torch.equal(_dequantized_reload(tmp_path / "tied").lm_head.weight, t.lm_head.weight)

    f, _ = models.load("tiny-llama")
    res = flexround_model(f, CALIB, FlexRoundSpec(grid=grid, steps=4, lr=1e-2, batch_size=2), verbose=False)
    assert sum(r["flips"] for r in res["recon"]) > 0  # learned rounding moved codes off RTN's
    export_quantized(copy.deepcopy(f), tmp_path / "flex", grids=res["grids"])
    _assert_round_trip(f, tmp_path / "flex")


def test_export_refuses_weights_off_their_grid_and_permuted_groups(tmp_path):
    pytest.importorskip("compressed_tensors")
    import copy

    from shrink.quant import WeightQuantSpec, quantize_model
    from shrink.quant.export import export_quantized

    m, _ = models.load("tiny-llama")
    grid = QuantSpec(bits=4, symmetric=False, granularity="channel")
    res = quantize_model(m, CALIB, WeightQuantSpec(method="gptq", grid=grid), verbose=False)
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.model.layers[1].self_attn.o_proj.weight[3, 5] += 1e-3
    with pytest.raises(QuantError, match="o_proj.*not on its"):
        export_quantized(bad, tmp_path / "bad", grids=res["grids"])
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    with pytest.raises(QuantError, match="differs"):
        export_quantized(copy.deepcopy(m), tmp_path / "bad", QuantSpec(bits=4), grids=res["grids"])
    g = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    p, _ = models.load("tiny-llama")
    r = quantize_model(p, CALIB, WeightQuantSpec(method="gptq", grid=g, act_order=True), verbose=False)
    with pytest.raises(QuantError, match="act_order"):
        export_quantized(p, tmp_path / "perm", grids=r["grids"])
    c, _ = models.load("tiny-llama")  # per channel, act_order only reorders the sweep: exports
    r = quantize_model(c, CALIB, WeightQuantSpec(method="gptq", grid=grid, act_order=True), verbose=False)
    export_quantized(copy.deepcopy(c), tmp_path / "ao", grids=r["grids"])
    _assert_round_trip(c, tmp_path / "ao")


def test_pbllm_export_packs_what_the_bit_accounting_counts(tmp_path):
    from safetensors import safe_open

    from shrink.quant.export import PBLLM_FILE, export_pbllm, load_pbllm
    from shrink.quant.pbllm import PBSpec, pbllm_model

    m, _ = models.load("tiny-llama")
    spec = PBSpec(salient_frac=0.1, metric="hessian")
    res = pbllm_model(m, CALIB, spec, keep_params=True, verbose=False)
    before = perplexity(m, IDS, seqlen=128).ppl
    man = export_pbllm(m, tmp_path / "pb", res["params"], spec)
    r = X.reload(tmp_path / "pb")
    assert perplexity(r, IDS, seqlen=128).ppl == before
    packed = load_pbllm(tmp_path / "pb")
    for n, w in packed.items():  # the packed sidecar alone rebuilds every linear bit for bit
        assert torch.equal(w, r.model.layers.get_submodule(n).weight), n
    acc = res["bits"]
    with safe_open(str(tmp_path / "pb" / PBLLM_FILE), "pt") as f:
        nbytes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert sum(v[0] for k, v in nbytes.items() if k.endswith(".codes")) == acc["salient"]  # one byte per salient
    assert sum(v[0] for k, v in nbytes.items() if k.endswith(".mask")) * 8 - acc["mask_bitmap"] < 8 * len(packed)
    assert sum(v[0] for k, v in nbytes.items() if k.endswith(".sign")) * 8 - (acc["weights"] - acc["salient"]) \
        < 8 * len(packed)
    assert man["what"]["bits"]["salient"] == acc["salient"]
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(QuantError, match="not the PB-LLM result"):
        export_pbllm(m, tmp_path / "pb2", res["params"], spec)


def test_cli_export_gptq_stores_its_grid_and_rejects_bad_recipes(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from shrink.cli import main

    main(["export", str(tmp_path / "g"), "--model", "tiny-llama", "--quant", "w3", "--method", "gptq", "--calib", "4",
          "--seqlen", "64"])
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "int-quantized"
    what = X.read_manifest(tmp_path / "g")["what"]
    assert what["method"] == "gptq" and what["w_spec"]["bits"] == 3 and what["w_spec"]["symmetric"] is False
    r = _dequantized_reload(tmp_path / "g")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = r.get_parameter(name)
        assert max(len(torch.unique(row)) for row in w) <= 8  # 3 bits per row: at most 8 levels
    for argv, msg in ((["--quant", "w9"], "not a recipe"), (["--quant", "w4", "--method", "awq"], "--method"),
                      (["--quant", "w8a8", "--method", "gptq"], "weight-only"), (["--quant", "w4", "--grid", "x"], "--grid")):
        with pytest.raises(SystemExit) as e:
            main(["export", str(tmp_path / "bad"), "--model", "tiny-llama", *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().out
    assert not (tmp_path / "bad").exists()
