"""DSIR exact mode against the official `data-selection` 1.0.3 package, resampling and KL identities."""

import json

import numpy as np
import pytest

from shrink.selection import DSIR, featurize, metrics, pools, tokenize
from shrink.selection.features import sha256_bucket
from shrink.selection.resample import gumbel_topk, topk

official = pytest.importorskip("data_selection.hashed_ngram_dsir", reason="pip install -e .[test] (data-selection)")
from shrink.selection.features import nltk_engine  # noqa: E402

ENGINE = nltk_engine()  # the official features follow the installed nltk's regex engine


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_dir_module):
    raw = pools.build_pool(["shakespeare", "pydocs", "fortunes", "gsm8k"], with_wiki=True, max_per_domain=40)
    # combining marks (the regex engines differ on them) and a few short examples for the length filter
    raw = raw + [{"id": "ipa/0", "text": " ".join(["going to → gonna: [ˈɡəʊɪ̃ŋtə] → [ˈgə̃nə] café\u0301"] * 20),
                  "domain": "ipa"}]
    short = [{"id": f"short/{i}", "text": " ".join(raw[i]["text"].split()[: 30 + 20 * i]), "domain": "short"}
             for i in range(6)]
    raw = raw + short
    target = pools.target_chunks(max_chunks=60)
    d = tmp_path_factory.mktemp("dsir")
    for name, recs in (("raw.jsonl", raw), ("target.jsonl", target)):
        with open(d / name, "w") as f:
            for r in recs:
                f.write(json.dumps({"id": r["id"], "text": r["text"]}) + "\n")
    return raw, target, d


@pytest.fixture(scope="module")
def data_dir_module():
    import os

    if not os.environ.get("SHRINK_DATA"):
        pytest.fail("SHRINK_DATA is not set: run the tests through `make test` (it points it at ../shared/data)")


def _official(d, tag, num_proc=1, num_tokens_to_fit="all"):
    """The official pipeline; num_proc > 1 runs its joblib jobs on threads (same virtual shards, no
    process start-up on the 2-core CI machine)."""
    import joblib

    o = official.HashedNgramDSIR([str(d / "raw.jsonl")], [str(d / "target.jsonl")], cache_dir=str(d / f"cache-{tag}"),
                                 num_proc=num_proc)
    with joblib.parallel_backend("threading"):
        o.fit_importance_estimator(num_tokens_to_fit=num_tokens_to_fit)
        o.compute_importance_weights()
    return o


def _official_weights(o, d, tag, n):
    """Official log weights in pool order (virtual shard j holds examples i % num_proc == j)."""
    out = np.empty(n)
    for j in range(o.num_proc):
        out[np.arange(j, n, o.num_proc)] = np.load(d / f"cache-{tag}" / "log_importance_weights" / f"{j}.npy")
    return out


def _official_selection(o, d, tag, k, top_k, seed=None):
    if seed is not None:
        np.random.seed(seed)
    import joblib

    out = d / f"out-{tag}"
    with joblib.parallel_backend("threading"):
        o.resample(out_dir=str(out), num_to_sample=k, cache_dir=str(d / f"rs-{tag}"), top_k=top_k)
    return sorted(json.loads(line)["id"] for f in sorted(out.glob("*.jsonl")) for line in open(f))


def test_tokenizer_is_wordpunct():
    """Equal to the installed nltk, combining marks included (nltk >= 3.9.3 tokenizes with `regex`)."""
    from nltk.tokenize import WordPunctTokenizer

    from shrink.selection.features import nltk_engine

    s = "Héllo, wörld!! It's 3.14 -- naïve café's «quote» 東京 x_y ... ?! [ˈɡəʊɪ̃ŋtə] → [ˈgə̃nə] e\u0301"
    assert tokenize(s, nltk_engine()) == WordPunctTokenizer().tokenize(s.lower())
    assert tokenize(s, "regex") != tokenize(s, "re")  # the engines differ on combining marks


def test_buckets_equal_official(corpus):
    raw, _, _ = corpus
    assert sha256_bucket("alice") == official.hash_buckets("alice") == 6720  # the official test's pin
    for s in ["the", "the cat", "東京", "x_y", "«", "a b"]:
        assert sha256_bucket(s) == official.hash_buckets(s)
        assert sha256_bucket(s, 997) == official.hash_buckets(s, 997)
    texts = [r["text"] for r in raw]
    for mode_n in (1, 2):
        feats = featurize(texts, "exact", ngrams=mode_n, engine=ENGINE)
        for i, t in enumerate(texts):
            np.testing.assert_array_equal(feats.dense(i), official.get_ngram_counts(t, n=mode_n))


def test_fast_mode_has_the_same_ngram_counts(corpus):
    raw, _, _ = corpus
    texts = [r["text"] for r in raw]
    fe, ff = featurize(texts, "exact"), featurize(texts, "fast")
    np.testing.assert_array_equal(fe.ngram_totals(), ff.ngram_totals())
    np.testing.assert_array_equal(fe.n_tokens, ff.n_tokens)
    assert not np.array_equal(fe.buckets, ff.buckets)  # a different hash, documented


@pytest.mark.parametrize("num_proc,fit", [(1, "all"), (1, 20_000), (2, 20_000)])
def test_log_weights_equal_official(corpus, num_proc, fit):
    raw, target, d = corpus
    tag = f"w{num_proc}-{fit}"
    o = _official(d, tag, num_proc, fit)
    ours = DSIR(mode="exact", num_tokens_to_fit=fit, virtual_shards=num_proc, engine=ENGINE).fit([r["text"] for r in raw],
                                                                                 [r["text"] for r in target])
    np.testing.assert_allclose(ours.raw_probs, o.raw_probs, rtol=0, atol=1e-15)
    np.testing.assert_allclose(ours.log_diff, o.log_diff, rtol=0, atol=1e-12)
    lw = ours.log_weights()
    np.testing.assert_allclose(lw, _official_weights(o, d, tag, len(raw)), rtol=0, atol=1e-9)
    meta = np.concatenate([np.load(d / f"cache-{tag}" / "perexample_metadata" / f"{j}.npy") for j in range(num_proc)])
    assert (~ours.eligible()).sum() == (~o.perexample_metadata_filter(meta)).sum() > 0


@pytest.mark.parametrize("num_proc", [1, 2])
def test_topk_selection_equals_official(corpus, num_proc):
    raw, target, d = corpus
    tag = f"topk{num_proc}"
    o = _official(d, tag, num_proc)
    ours = DSIR(mode="exact", engine=ENGINE).fit([r["text"] for r in raw], [r["text"] for r in target])
    for k in (10, 57):
        got = sorted(raw[i]["id"] for i in ours.select(k, top_k=True))
        assert got == _official_selection(o, d, f"{tag}-{k}", k, top_k=True)


def test_gumbel_selection_equals_official_seed_stream(corpus):
    raw, target, d = corpus
    o = _official(d, "gumbel", 1)
    ours = DSIR(mode="exact", engine=ENGINE).fit([r["text"] for r in raw], [r["text"] for r in target])
    for seed in (0, 1, 2):
        got = sorted(raw[i]["id"] for i in ours.select(40, seed=seed))
        assert got == _official_selection(o, d, f"gumbel-{seed}", 40, top_k=False, seed=seed)


def test_gumbel_topk_inclusion_frequencies_chi2():
    """k=1: P(i) = w_i / sum w; 10k draws pass a chi-square goodness-of-fit test at p > 0.01."""
    from scipy.stats import chisquare

    w = np.array([0.05, 0.1, 0.15, 0.2, 0.5])
    n = 10_000
    draws = np.array([gumbel_topk(np.log(w), 1, seed)[0] for seed in range(n)])
    obs = np.bincount(draws, minlength=w.size)
    assert chisquare(obs, n * w / w.sum()).pvalue > 0.01
    # and a wrong distribution (uniform) is rejected: the test can fail
    assert chisquare(obs, np.full(w.size, n / w.size)).pvalue < 1e-6


def test_gumbel_topk_k2_pair_frequencies():
    """k=2 without replacement: P({i,j}) = p_i p_j/(1-p_i) + p_j p_i/(1-p_j) (sequential sampling)."""
    from scipy.stats import chisquare

    p = np.array([0.1, 0.2, 0.3, 0.4])
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = np.array([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
    n = 6_000
    got = [tuple(gumbel_topk(np.log(p), 2, s)) for s in range(n)]
    obs = np.array([sum(g == pr for g in got) for pr in pairs])
    assert abs(expected.sum() - 1) < 1e-12
    assert chisquare(obs, n * expected).pvalue > 0.01


def test_topk_and_mask():
    lw = np.array([3.0, 1.0, 5.0, 4.0, 2.0])
    np.testing.assert_array_equal(topk(lw, 2), [2, 3])
    np.testing.assert_array_equal(topk(lw, 2, mask=lw != 5.0), [0, 3])
    np.testing.assert_array_equal(topk(lw, 5), np.arange(5))  # k == n works (official argpartition fails)
    np.testing.assert_array_equal(gumbel_topk(lw, 4, 0, mask=lw != 2.0), [0, 1, 2, 3])


def test_kl_reduction_identities(corpus):
    raw, target, _ = corpus
    wiki = [r for r in raw if r["domain"] == "wikitext2"]
    pool = raw
    tf = featurize([r["text"] for r in target])
    pf = featurize([r["text"] for r in pool])
    t, q = tf.counts(), pf.counts()
    assert metrics.kl_reduction(t, q, q) == 0.0  # selecting all raw
    # the target itself in the pool: KL-red = KL(p || q) exactly
    both = featurize([r["text"] for r in pool] + [r["text"] for r in target])
    sel = np.zeros(len(both), bool)
    sel[len(pool):] = True
    qb = both.counts()
    assert abs(metrics.kl_reduction(t, qb, both.counts(sel)) - metrics.kl(t, qb)) < 1e-9
    # a wiki-only selection reduces KL, a shakespeare-only selection increases it
    dom = np.array([r["domain"] for r in pool])
    assert metrics.kl_reduction(t, q, pf.counts(dom == "wikitext2")) > 0.1
    assert metrics.kl_reduction(t, q, pf.counts(dom == "shakespeare")) < 0
    assert metrics.precision(list(dom), np.flatnonzero(dom == "wikitext2"), "wikitext2") == 1.0
    assert len(wiki) > 0
