"""Paper-scale code paths, exercised offline on random-init stand-ins and local files in the real formats."""

import pytest

from conftest import c4_like_file
from shrink import data, eval, models, scales


def test_tour_paper_preset_on_a_standin(monkeypatch, data_dir):
    monkeypatch.setenv("SHRINK_STANDINS", "1")
    cfg = scales.get("tour", "paper")
    model, tok = models.load(cfg.model)
    assert model.shrink_info["standin_for"] == cfg.model
    res = eval.perplexity(model, data.eval_tokens(tok, cfg.eval_corpus, cfg.eval_split), 256, max_windows=2,
                          progress=False)
    assert res.n_windows == 2 and res.ppl > 1


@pytest.mark.parametrize("hub_id", ["facebook/opt-125m", "mistralai/Mistral-7B-v0.1", "meta-llama/Meta-Llama-3-8B"])
def test_c4_calibration_and_block_runner_on_standins(monkeypatch, tmp_path, hub_id):
    monkeypatch.setenv("SHRINK_STANDINS", "1")
    monkeypatch.setenv("SHRINK_C4_FILES", str(c4_like_file(tmp_path / "c4-train.00000-of-01024.json")))
    model, tok = models.load(hub_id)
    calib = data.calibration_set(tok, "c4", "train", nsamples=3, seqlen=128, seed=0)
    runner = models.BlockRunner(model)
    assert (runner.logits(calib) - model(calib).logits).abs().max() <= 1e-5
