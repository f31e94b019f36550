"""shrink.selection.downstream (04k): the byte stream of a selection, the fixed budget, reproducible records."""

import json

import numpy as np
import pytest
import torch

import shrink
from shrink.scales import PresetError
from shrink.selection import SelectionError
from shrink.selection import downstream as DS
from shrink.selection import experiment as E


def _cfg(**kw):
    cfg = shrink.scales.get("data-downstream", "tiny")
    return cfg.with_(**kw) if kw else cfg


def _fast(**kw):  # a few steps: enough to compare records, cheap at tiny
    return _cfg(steps=3, warmup=1, eval_every=2, wiki_windows=4, **kw)


def _strip(rec):
    """A record's metrics without its wall-clock fields (timings differ between identical runs)."""
    out = {k: v for k, v in rec.items() if k not in ("seconds", "seconds_per_step")}
    out["history"] = [{k: v for k, v in h.items() if "second" not in k and k not in ("time", "wall")}
                      for h in rec["history"]]
    return out


def test_stream_is_the_concatenation_of_the_selected_chunks_bytes_in_pool_order():
    cfg = _cfg()
    st = E.setting(cfg, False)
    idx = E.select(cfg, "random", 0)
    naive = b""
    for j, i in enumerate(sorted(idx.tolist())):  # written out by hand: chunk bytes, one separator between
        naive += (b" " if j else b"") + st.pool[i]["text"].encode("utf-8")
    stream = DS.selection_stream(st.texts, idx, " ")
    assert stream.dtype == torch.int64 and stream.ndim == 1
    assert bytes(stream.to(torch.uint8).tolist()) == naive
    shuffled = np.random.default_rng(1).permutation(idx)  # the order of the indices does not matter
    assert torch.equal(DS.selection_stream(st.texts, shuffled, " "), stream)
    other = DS.selection_stream(st.texts, idx, "\n\n")
    assert other.numel() == stream.numel() + len(idx) - 1  # one more byte per separator
    assert DS.selection_sha(shuffled) == DS.selection_sha(idx)


@pytest.mark.parametrize("bad, match", [(np.array([], np.int64), "non-empty"), (np.array([0, 0, 3]), "more than once"),
                                        (np.array([-1, 2]), "must lie in"), (np.array([0.0, 1.0]), "integer"),
                                        (np.array([10**9]), "must lie in")])
def test_bad_selections_raise_with_the_fix(bad, match):
    st = E.setting(_cfg(), False)
    with pytest.raises(SelectionError, match=match):
        DS.selection_stream(st.texts, bad)


def test_identical_seeds_give_identical_records_and_other_seeds_differ(tmp_path, monkeypatch, one_thread):
    cfg = _fast()
    idx = E.select(cfg, "dsir-exact", 0)
    recs = []
    for d in ("a", "b"):
        monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / d))
        recs.append(DS.train_on_selection(cfg, idx, seed=0, scale="tiny", tag="dsir-exact"))
    assert _strip(recs[0]) == _strip(recs[1])
    files = [sorted((tmp_path / d).rglob("downstream-run-*.json")) for d in ("a", "b")]
    assert len(files[0]) == 1 and files[0][0].name == files[1][0].name  # same config -> same cache key
    cfgs = [json.loads(f[0].read_text())["config"] for f in files]
    assert cfgs[0] == cfgs[1] and cfgs[0]["selection"]["sha"] == DS.selection_sha(idx)
    other = DS.train_on_selection(cfg, idx, seed=1, scale="tiny", tag="dsir-exact")
    assert other["wiki_bpb"] != recs[1]["wiki_bpb"]  # seed: other initial weights and windows
    assert len(list((tmp_path / "b").rglob("downstream-run-*.json"))) == 2
    # the record's numbers are what they say: bits/byte -> perplexities
    r = recs[0]
    assert r["wiki_ppl_byte"] == pytest.approx(2 ** r["wiki_bpb"], rel=1e-12)
    assert r["wiki_ppl_word"] == pytest.approx(2 ** (r["wiki_bpb"] * r["bytes_per_word"]), rel=1e-12)
    assert [e["step"] for e in r["evals"]] == [2, cfg.steps] and r["evals"][-1]["wiki_bpb"] == r["wiki_bpb"]


def test_budget_is_equal_across_methods_and_the_selections_are_the_shared_ones(one_thread):
    cfg = _fast()
    st = E.setting(cfg, False)
    assert DS.grid(cfg) == [(m, s) for s in cfg.seeds for m in cfg.methods] + [(m, cfg.seeds[0]) for m in
                                                                              cfg.one_seed_methods]
    recs = {m: DS.method_run(cfg, m, seed=0, scale="tiny") for m in (*cfg.methods, *cfg.one_seed_methods)}
    assert set(recs) == set(DS.METHODS)
    tokens = {m: r["tokens"] for m, r in recs.items()}
    # every run sees steps x B windows of S bytes: S - 1 next-byte targets per window
    assert set(tokens.values()) == {cfg.steps * cfg.batch_size * (cfg.seqlen - 1)}, tokens
    unique = {m: r["selection"]["unique_bytes"] for m, r in recs.items()}
    assert len(set(unique.values())) == len(unique)  # ...from selections of different sizes (so: other epochs)
    for m, r in recs.items():
        assert r["selection"]["epochs"] == pytest.approx(DS.budget(cfg) / unique[m])
        assert r["selection"]["n"] == (len(st.pool) if m == "full-pool" else cfg.k)
    assert recs["full-pool"]["selection"]["kl_official"] == pytest.approx(0.0, abs=1e-12)  # the raw pool itself
    # DSIR's and random's draws are 04b's (the same function, the same seeds): same selections
    kl = E.dsir_kl_run(cfg, with_wiki=False, seed=0, scale="tiny")["methods"]
    for m in ("dsir-exact", "random"):
        assert recs[m]["selection"]["selection_sha"] == kl[m]["selection_sha"]
        assert recs[m]["selection"]["kl_official"] == pytest.approx(kl[m]["kl_official"], abs=1e-12)


def test_preset_and_tag_validation():
    with pytest.raises(PresetError, match="methods"):
        _cfg(methods=("dsir-exact", "oracle"))
    with pytest.raises(PresetError, match="warmup"):
        _cfg(warmup=100)
    with pytest.raises(SelectionError, match="unknown selection method"):
        E.select(_cfg(), "oracle", 0)
    with pytest.raises(SelectionError, match="tag"):
        DS.train_on_selection(_cfg(), np.arange(5), seed=0, scale="tiny", tag="")


def test_with_wiki_selections_index_the_pool_with_wikitext_and_key_apart():
    cfg = _cfg()
    wiki = E.setting(cfg, True)
    idx = np.flatnonzero(np.array(wiki.domains) == "wikitext2")[:5]
    a = DS.run_config(cfg, idx, seed=0, tag="wiki")
    b = DS.run_config(cfg, idx, seed=0, tag="wiki", with_wiki=True)
    assert a["pool"]["with_wiki"] is False and b["pool"]["with_wiki"] is True and a["selection"] == b["selection"]
    stream = bytes(DS.selection_stream(wiki.texts, idx).to(torch.uint8).tolist()).decode("utf-8")
    assert stream == " ".join(wiki.pool[i]["text"] for i in idx)  # WikiText chunks, in pool order
