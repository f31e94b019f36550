import json
import os

import pytest
import torch

from shrink import results
from shrink.errors import CacheCorruptError


def test_cached_computes_once_and_keys_by_config():
    calls = []

    def fn():
        calls.append(1)
        return {"ppl": 12.5, "curve": torch.tensor([1.0, 2.0])}

    a = results.cached("exp", {"lr": 1e-3}, fn, scale="tiny", chapter="t")
    b = results.cached("exp", {"lr": 1e-3}, fn, scale="tiny", chapter="t")
    c = results.cached("exp", {"lr": 2e-3}, fn, scale="tiny", chapter="t")
    assert len(calls) == 2 and a == b == c == {"ppl": 12.5, "curve": [1.0, 2.0]}
    rec = results.load(results.record_path("exp", {"lr": 1e-3}, scale="tiny", chapter="t"))
    for key in ("config", "metrics", "versions", "git_sha", "device", "created", "seconds", "key"):
        assert key in rec
    folder = results.results_root() / "tiny" / "t"
    assert sorted(p.name.startswith(".") for p in folder.iterdir()) == [False, False]  # no temp files left


def test_interrupted_run_leaves_no_record_and_keeps_others():
    results.cached("done", {"a": 1}, lambda: {"x": 1}, scale="tiny", chapter="t")

    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        results.cached("broken", {"a": 1}, boom, scale="tiny", chapter="t")
    names = [p.name for p in (results.results_root() / "tiny" / "t").iterdir()]
    assert len(names) == 1 and names[0].startswith("done-")


def test_corrupt_record_names_the_file_and_spares_the_rest():
    results.cached("good", {"a": 1}, lambda: {"x": 1}, scale="tiny", chapter="t")
    bad = results.record_path("bad", {"a": 2}, scale="tiny", chapter="t")
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("{not json")
    with pytest.raises(CacheCorruptError, match=bad.name):
        results.cached("bad", {"a": 2}, lambda: {"x": 2}, scale="tiny", chapter="t")
    assert results.cached("good", {"a": 1}, lambda: {"x": 99}, scale="tiny", chapter="t") == {"x": 1}


def test_recompute_flag(monkeypatch):
    results.cached("e", {}, lambda: {"v": 1}, scale="tiny", chapter="t")
    monkeypatch.setenv("SHRINK_RECOMPUTE", "1")
    assert results.cached("e", {}, lambda: {"v": 2}, scale="tiny", chapter="t") == {"v": 2}


def test_bad_scale_and_unstorable_values(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the fallback copy goes there
    with pytest.raises(ValueError, match="scale"):
        results.cached("e", {}, lambda: {}, scale="huge", chapter="t")
    with pytest.raises(TypeError, match="cannot store"):
        results.save("e", {}, {"obj": object()}, scale="tiny", chapter="t")


def test_cached_tensors(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    calls = []
    x = results.cached_tensors("w", {"k": 1}, lambda: calls.append(1) or {"w": torch.ones(3)})
    y = results.cached_tensors("w", {"k": 1}, lambda: calls.append(1) or {"w": torch.zeros(3)})
    assert len(calls) == 1 and torch.equal(x["w"], y["w"])
    path = next((tmp_path / "tensors").glob("w-*.pt"))
    path.write_bytes(b"garbage")
    with pytest.raises(CacheCorruptError, match=path.name):
        results.cached_tensors("w", {"k": 1}, lambda: {})


def test_config_key_is_order_independent():
    assert results.config_key({"a": 1, "b": 2}) == results.config_key({"b": 2, "a": 1})
    assert results.config_key({"a": 1}) != results.config_key({"a": 2})


def _record_from_other_code(scale):
    """Store {"v": 1} for config {"a": 1} at ``scale``, then mark the record as made by other code."""
    results.cached("c", {"a": 1}, lambda: {"v": 1}, scale=scale, chapter="t")
    path = results.record_path("c", {"a": 1}, scale=scale, chapter="t")
    rec = json.loads(path.read_text())
    rec["code"] = "000000000000"
    path.write_text(json.dumps(rec))


def test_record_from_other_code_is_recomputed(monkeypatch, capsys):
    _record_from_other_code("tiny")
    monkeypatch.setenv("SHRINK_REUSE_STALE", "1")
    assert results.cached("c", {"a": 1}, lambda: {"v": 2}, scale="tiny", chapter="t") == {"v": 1}
    monkeypatch.delenv("SHRINK_REUSE_STALE")
    assert results.cached("c", {"a": 1}, lambda: {"v": 2}, scale="tiny", chapter="t") == {"v": 2}
    assert "recomputing" in capsys.readouterr().out


def test_stale_cpu_record_is_reused_and_announced(monkeypatch, capsys):
    _record_from_other_code("cpu")
    assert results.cached("c", {"a": 1}, lambda: {"v": 2}, scale="cpu", chapter="t") == {"v": 1}
    assert "reused" in capsys.readouterr().out
    monkeypatch.setenv("SHRINK_STALE", "recompute")
    assert results.cached("c", {"a": 1}, lambda: {"v": 2}, scale="cpu", chapter="t") == {"v": 2}


def test_code_hash_is_scoped_per_chapter():
    from shrink import env

    weights, bits = results.chapter_code_hash("01-weights"), results.chapter_code_hash("02-bits")
    assert weights != bits and len(weights) == 12
    assert env.code_hash(("pruning",)) == weights and env.code_hash(None) == results.chapter_code_hash("99-new")


# ----------------------------------------------------------------------------------------------------------
# Kernel sets, committed tensors, config-derived prefix keys, conversions, load mode (issue 9 §1, issue 10 §3)
# ----------------------------------------------------------------------------------------------------------
def test_every_record_stores_the_kernel_set():
    from shrink import env

    results.cached("k", {"a": 1}, lambda: {"v": 1}, scale="tiny", chapter="t")
    rec = results.load(results.record_path("k", {"a": 1}, scale="tiny", chapter="t"))
    ks = env.kernel_set()
    assert rec["kernels"] == ks and rec["schema"] == results.SCHEMA
    assert ks["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert ks["threads"] == torch.get_num_threads()
    assert set(env.KERNEL_FIELDS) <= set(ks)


def test_isa_variables_enter_the_kernel_set(monkeypatch):
    from shrink import env

    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "avx2")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    ks = env.kernel_set()
    assert ks["mkl_isa"] == "AVX2" and ks["dnnl_isa"] == "AVX2"
    assert ks["env"] == {"MKL_ENABLE_INSTRUCTIONS": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}


def test_record_from_another_kernel_set_is_reused_and_announced_once(capsys):
    results.cached("ks", {"a": 1}, lambda: {"v": 1}, scale="cpu", chapter="t")
    path = results.record_path("ks", {"a": 1}, scale="cpu", chapter="t")
    rec = json.loads(path.read_text())
    rec["kernels"] = {**rec["kernels"], "cpu_capability": "AVX512", "mkl_isa": "AVX512"}
    path.write_text(json.dumps(rec))
    for _ in range(3):
        assert results.cached("ks", {"a": 1}, lambda: {"v": 2}, scale="cpu", chapter="t") == {"v": 1}
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "kernel set" in ln]
    assert len(lines) == 1 and lines[0].startswith("[shrink.results]") and "cpu_capability AVX512" in lines[0]


def test_nbval_sanitizer_strips_every_results_announcement():
    import configparser
    import re
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "nbval_sanitize.cfg")
    regexes = [(s["regex"], s["replace"]) for name, s in cfg.items() if "regex" in s]
    text = ("a\n[shrink.results] x.json was made under another kernel set (cpu_capability AVX512 here AVX2): "
            "reused; ...\n[shrink.results] y.json was computed by other shrink code (a != b): recomputing.\nb\n")
    for rx, rep in regexes:
        text = re.sub(rx, rep, text)
    assert text == "a\nb\n"


def test_committed_tensors_roundtrip_hash_and_metadata():
    import hashlib

    calls = []

    def fn():
        calls.append(1)
        return {"keys": [torch.arange(6.0).reshape(1, 2, 3), torch.ones(2)], "mask": torch.tensor([True, False]),
                "token_ids": [216], "history": [{"step": 0, "loss": 1.5}]}

    a = results.cached_tensors("pt", {"lam": 0.0}, fn, scale="cpu", chapter="t")
    b = results.cached_tensors("pt", {"lam": 0.0}, fn, scale="cpu", chapter="t")
    assert len(calls) == 1
    for out in (a, b):
        assert torch.equal(out["keys"][0], torch.arange(6.0).reshape(1, 2, 3)) and len(out["keys"]) == 2
        assert out["mask"].dtype == torch.bool and out["token_ids"] == [216]
        assert out["history"] == [{"step": 0, "loss": 1.5}]
    file, rec_path = results.tensor_paths("pt", {"lam": 0.0}, scale="cpu", chapter="t")
    assert file.parent.name == "tensors" and file.parent.parent == results.results_root() / "cpu" / "t"
    rec = json.loads(rec_path.read_text())
    assert rec["tensors"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert rec["key"] == results.config_key({"lam": 0.0}) and rec["config"] == {"lam": 0.0}
    assert rec["metrics"] == {"token_ids": [216], "history": [{"step": 0, "loss": 1.5}]} and "kernels" in rec
    assert rec["tensors"]["shapes"]["keys.0"] == ["float32", [1, 2, 3]]
    assert any(r["name"] == "pt" for r in results.records("cpu", "t"))


def test_committed_tensors_refuse_more_than_the_limit():
    from shrink.errors import RecordWriteError

    big = torch.zeros(results.TENSOR_LIMIT // 4 + 16)
    with pytest.raises(RecordWriteError, match="SHRINK_CACHE") as info:
        results.cached_tensors("big", {}, lambda: {"w": big}, scale="cpu", chapter="t")
    assert info.value.result["w"] is big
    assert not any(results.tensor_paths("big", {}, scale="cpu", chapter="t")[i].exists() for i in (0, 1))
    ok = results.cached_tensors("small", {}, lambda: {"w": torch.zeros(1000)}, scale="cpu", chapter="t")
    assert ok["w"].shape == (1000,)


def test_conversions_of_metrics():
    np = pytest.importorskip("numpy")
    out = results.cached("conv", {}, lambda: {"arr": np.arange(3), "f": np.float32(0.5), "s": {3, 1, 2},
                                              "t": (1, 2), "nan": float("nan")}, scale="tiny", chapter="t")
    assert out == {"arr": [0, 1, 2], "f": 0.5, "s": [1, 2, 3], "t": [1, 2], "nan": "nan"}
    assert results.load(results.record_path("conv", {}, scale="tiny", chapter="t"))["metrics"] == out


def test_load_mode_never_computes(monkeypatch):
    from shrink.errors import EnvError, RecordMissingError

    results.cached("have", {}, lambda: {"v": 1}, scale="cpu", chapter="t")
    monkeypatch.setenv("SHRINK_RESULTS_MODE", "load")
    assert results.cached("have", {}, lambda: {"v": 2}, scale="cpu", chapter="t") == {"v": 1}
    calls = []
    with pytest.raises(RecordMissingError, match="SHRINK_RESULTS_MODE"):
        results.cached("missing", {}, lambda: calls.append(1) or {"v": 3}, scale="cpu", chapter="t")
    with pytest.raises(RecordMissingError, match="SHRINK_RESULTS_MODE"):
        results.cached_tensors("missing", {}, lambda: calls.append(1) or {"w": torch.ones(1)}, scale="cpu",
                               chapter="t")
    with pytest.raises(RecordMissingError, match="SHRINK_RESULTS_MODE"):
        results.cached_tensors("missing", {}, lambda: calls.append(1) or {"w": torch.ones(1)})
    assert calls == []
    monkeypatch.setenv("SHRINK_RESULTS_MODE", "sometimes")
    with pytest.raises(EnvError, match="SHRINK_RESULTS_MODE"):
        results.cached("have", {}, lambda: {"v": 2}, scale="cpu", chapter="t")


def test_prefix_key_derives_from_configs_only():
    from shrink.errors import ShrinkError
    from shrink.models import KVPrefix
    from shrink.quant.experiments import prefix_key

    k = [torch.randn(1, 1, 1, 2)]
    p = KVPrefix(k, k, [216])
    assert prefix_key(None) == "none" and prefix_key(p) == "tokens=[216]"
    assert prefix_key(KVPrefix([x * 1.0001 for x in k], k, [216])) == "tokens=[216]"  # values never enter
    p.origin = "tuned=0123456789abcdef"
    assert prefix_key(p) == "tuned=0123456789abcdef"
    with pytest.raises(ShrinkError, match="origin"):
        prefix_key(KVPrefix(k, k, None))


def test_run_tuning_stores_the_prefix_with_the_results(one_thread):
    from shrink import scales
    from shrink.quant.experiments import BitsContext, prefix_key, run_tuning, tuning_config

    ctx = BitsContext(scales.get("bits", "tiny"), "tiny")
    out = run_tuning(ctx, lambda_q=0.0)
    key = results.config_key(tuning_config(ctx, 0.0))
    assert prefix_key(out["prefix"]) == f"tuned={key}"
    file, rec = results.tensor_paths("prefix-tuning", tuning_config(ctx, 0.0), scale="tiny", chapter="02-bits")
    assert file.exists() and rec.exists() and json.loads(rec.read_text())["metrics"]["history"] == out["history"]
    again = run_tuning(ctx, lambda_q=0.0)  # from the stored file: identical tensors
    assert all(torch.equal(a, b) for a, b in zip(out["prefix"].keys, again["prefix"].keys))
