"""Calibration sets for pruning (shrink.selection.calibration, notebook 04h): exact token budgets, packing
against a naive version, DSIR moves the selection towards the target, errors that name the fix."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from shrink import data, scales
from shrink.models import ByteTokenizer
from shrink.scales import PresetError
from shrink.selection import DSIR, calibration
from shrink.selection.calibration import CalibrationError

WIKI = "the river flows past the old town and the castle on the hill where the king lived in the war".split()
CODE = "def return import class self lambda yield print for in range if else while try except".split()


def _pool(n_per=40, words=32, seed=0):
    rng = np.random.default_rng(seed)
    pool = []
    for dom, vocab in (("prose", WIKI), ("code", CODE)):
        for i in range(n_per):
            pool.append({"id": f"{dom}/{i:06d}", "domain": dom, "text": " ".join(rng.choice(vocab, words))})
    return pool


def test_chunks_needed_is_the_ceiling():
    assert calibration.chunks_needed(8, 256, 128) == 16
    assert calibration.chunks_needed(3, 100, 128) == 3          # 300 / 128 -> 2.34 -> 3
    assert calibration.chunks_needed(1, 2, 128) == 1
    with pytest.raises(CalibrationError, match="words per chunk"):
        calibration.chunks_needed(8, 256, 0)
    with pytest.raises(CalibrationError, match="nsamples"):
        calibration.chunks_needed(0, 256, 128)


def test_pack_texts_equals_the_naive_join_and_slice():
    tok = ByteTokenizer()
    texts = ["alpha beta gamma", "delta", "epsilon zeta eta theta iota"]
    ids = calibration.pack_texts(tok, texts, 3, 7)
    naive = torch.tensor(tok.encode("alpha beta gamma\n\ndelta\n\nepsilon zeta eta theta iota"))[:21].view(3, 7)
    assert ids.dtype == torch.long and ids.shape == (3, 7)
    assert torch.equal(ids, naive)
    # consecutive windows: the rows concatenated are a prefix of the stream
    assert tok.decode(ids.reshape(-1).tolist()) == "alpha beta gamma\n\ndel"
    with pytest.raises(CalibrationError, match="select more chunks"):
        calibration.pack_texts(tok, texts, 10, 7)
    with pytest.raises(CalibrationError, match="no texts"):
        calibration.pack_texts(tok, [], 1, 7)


def test_random_pool_exact_budget_deterministic_and_seeded():
    tok, pool = ByteTokenizer(), _pool()
    a = calibration.build("random-pool", tok, 4, 48, 0, pool=pool, words=32)
    b = calibration.build("random-pool", tok, 4, 48, 0, pool=pool, words=32)
    c = calibration.build("random-pool", tok, 4, 48, 1, pool=pool, words=32)
    assert a.tokens == 4 * 48 and a.ids.shape == (4, 48)
    assert torch.equal(a.ids, b.ids) and a.chunk_ids == b.chunk_ids
    assert a.sha() != c.sha()
    k = calibration.chunks_needed(4, 48, 32)
    assert len(a.chunk_ids) == len(set(a.chunk_ids)) == k
    assert abs(sum(a.composition.values()) - 1) < 1e-12
    # the packed stream is the chunks in the recorded order: its text starts with the first chunk's text
    by_id = {c["id"]: c["text"] for c in pool}
    assert tok.decode(a.ids.reshape(-1).tolist()).startswith(by_id[a.chunk_ids[0]][:40])
    info = a.info()
    assert info["shape"] == [4, 48] and info["source"] == "random-pool" and info["sha"] == a.sha()


def test_dsir_pool_moves_the_selection_towards_the_target():
    tok, pool = ByteTokenizer(), _pool(n_per=60)
    rng = np.random.default_rng(7)
    target = [" ".join(rng.choice(WIKI, 32)) for _ in range(20)]
    dsir = DSIR(mode="exact", min_example_length=0).fit([c["text"] for c in pool], target)
    prose = {"dsir": [], "random": []}
    for sd in range(3):
        d = calibration.build("dsir-pool", tok, 4, 64, sd, pool=pool, dsir=dsir, words=32)
        r = calibration.build("random-pool", tok, 4, 64, sd, pool=pool, words=32)
        assert d.tokens == r.tokens == 4 * 64
        prose["dsir"].append(d.composition.get("prose", 0.0))
        prose["random"].append(r.composition.get("prose", 0.0))
    # the target is prose-only: DSIR's importance weights put (almost) all mass on the prose domain
    assert min(prose["dsir"]) == 1.0, prose
    assert max(prose["random"]) < 0.9, prose


def test_dsir_pool_needs_a_fitted_dsir_on_this_pool():
    tok, pool = ByteTokenizer(), _pool()
    with pytest.raises(CalibrationError, match="fitted DSIR"):
        calibration.build("dsir-pool", tok, 2, 32, 0, pool=pool, dsir=DSIR())
    other = DSIR(mode="exact", min_example_length=0).fit([c["text"] for c in pool[:10]], ["the river"])
    with pytest.raises(CalibrationError, match="fit it on this pool"):
        calibration.build("dsir-pool", tok, 2, 32, 0, pool=pool, dsir=other)
    with pytest.raises(CalibrationError, match="needs dsir="):
        calibration.build("dsir-pool", tok, 2, 32, 0, pool=pool)
    with pytest.raises(CalibrationError, match="needs pool="):
        calibration.build("random-pool", tok, 2, 32, 0)
    with pytest.raises(CalibrationError, match="larger pool"):
        calibration.build("random-pool", tok, 64, 64, 0, pool=pool[:3], words=32)


def test_generated_windows_pass_through_and_retokenize():
    gen = torch.arange(5 * 20, dtype=torch.long).view(5, 20) % 200
    w = calibration.generated_windows(gen, 4, 16, seed=3)
    assert torch.equal(w.ids, gen[:4, :16]) and w.seed == 3 and w.source == "self-generated"
    tok = ByteTokenizer()
    same = calibration.generated_windows(gen, 4, 16, tokenizer=tok, source_tokenizer=ByteTokenizer())
    assert torch.equal(same.ids, gen[:4, :16])  # same vocabulary: ids unchanged

    class Upper(ByteTokenizer):  # another tokenizer: texts decoded by the source, re-encoded by the target
        vocab_size = 300

        def get_vocab(self):
            return {"upper": 1}

    text_ids = torch.tensor([tok.encode("hello world, " * 3)[:30]] * 2, dtype=torch.long)
    re = calibration.generated_windows(text_ids, 2, 24, tokenizer=Upper(), source_tokenizer=tok)
    naive = torch.tensor(Upper().encode("\n\n".join([tok.decode(r.tolist()) for r in text_ids])))[:48].view(2, 24)
    assert torch.equal(re.ids, naive)
    with pytest.raises(CalibrationError, match="generate at least"):
        calibration.generated_windows(gen, 6, 16)
    with pytest.raises(CalibrationError, match="int64"):
        calibration.generated_windows(gen.float(), 2, 16)
    with pytest.raises(CalibrationError, match="needs generated="):
        calibration.build("self-generated", tok, 2, 16, 0)


def test_wikitext_source_is_the_weights_chapter_sampler(data_dir):
    tok = ByteTokenizer()
    c = calibration.build("wikitext2", tok, 3, 40, 5)
    assert torch.equal(c.ids, data.calibration_set(tok, "wikitext2", "validation", nsamples=3, seqlen=40, seed=5))
    assert c.composition == {"wikitext2": 1.0}
    with pytest.raises(CalibrationError, match="unknown calibration source"):
        calibration.build("c5", tok, 3, 40, 5)


def test_preset_validates_sources_and_draws():
    import shrink.selection.presets  # noqa: F401 (registers)

    cfg = scales.get("data-calibration", "cpu")
    assert cfg.calib_nsamples * cfg.calib_seqlen > 0 and set(cfg.calib_sources) == set(calibration.SOURCES)
    with pytest.raises(PresetError, match="calib_sources"):
        cfg.with_(calib_sources=("wikitext2", "c5"))
    with pytest.raises(PresetError, match="calib_draws"):
        cfg.with_(calib_draws=(("obs", (0,)),))
    with pytest.raises(PresetError, match="calib_draws"):
        cfg.with_(calib_draws=(("wanda", ()),))


def test_selection_does_not_import_pruning():
    code = ("import sys, shrink.selection.calibration, shrink.selection.presets; "
            "bad = [m for m in sys.modules if m.startswith(('shrink.pruning', 'shrink.quant', 'shrink.tokens'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
