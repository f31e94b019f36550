import hashlib
import re
from pathlib import Path

import pytest
import torch

from conftest import c4_like_file
from shrink import data, models
from shrink.errors import DataMissingError, OfflineError, UnknownNameError


def test_calibration_windows_are_seeded_contiguous_and_skip_short_docs():
    docs = [torch.arange(0, 10), torch.arange(100, 400), torch.arange(1000, 1050)]
    a = data.calibration_windows(docs, nsamples=20, seqlen=64, seed=7)
    b = data.calibration_windows(docs, nsamples=20, seqlen=64, seed=7)
    c = data.calibration_windows(docs, nsamples=20, seqlen=64, seed=8)
    assert a.shape == (20, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every window comes from the only document longer than the window, and is contiguous
    assert ((a >= 100) & (a < 400)).all()
    assert (a[:, 1:] - a[:, :-1] == 1).all()


def test_calibration_windows_error_when_no_long_document():
    with pytest.raises(ValueError, match="longer than seqlen"):
        data.calibration_windows([torch.arange(10)], 2, 10)


def test_missing_data_dir_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SHRINK_DATA")
    with pytest.raises(DataMissingError, match="SHRINK_DATA"):
        data.load_text("wikitext2", "test")
    monkeypatch.setenv("SHRINK_DATA", "/nonexistent/folder")
    with pytest.raises(DataMissingError, match="MANIFEST"):
        data.load_text("wikitext2", "test")


def test_missing_file_names_the_file(monkeypatch, tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    monkeypatch.setenv("SHRINK_DATA", str(tmp_path))
    with pytest.raises(DataMissingError, match="wiki.test.joined.txt"):
        data.load_text("wikitext2", "test")


def test_unknown_names():
    with pytest.raises(UnknownNameError, match="wikitext2"):
        data.load_text("nope")
    with pytest.raises(UnknownNameError, match="splits"):
        data.load_text("wikitext2", "dev")


def test_c4_offline_without_files_is_online_only():
    with pytest.raises(OfflineError, match="SHRINK_C4_FILES"):
        data.load_documents("c4", "train")


def test_c4_format_file_through_datasets(tmp_path, monkeypatch):
    path = c4_like_file(tmp_path / "c4-train.00000-of-01024.json")
    docs = data.load_documents("c4", "train", data_files=str(path))
    assert len(docs) == 6 and all(len(d.split()) == 400 for d in docs)
    monkeypatch.setenv("SHRINK_C4_FILES", str(path))
    assert data.source("c4", "train").startswith("offline:")
    calib = data.calibration_set(models.ByteTokenizer(), "c4", "train", nsamples=4, seqlen=128, seed=0)
    assert calib.shape == (4, 128)


def _manifest_hashes(root):
    text = (Path(root) / "MANIFEST.md").read_text()
    return dict(re.findall(r"\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|", text))


def test_offline_files_match_the_manifest(data_dir):
    hashes = _manifest_hashes(data_dir)
    assert len(hashes) >= 10
    for rel in ("wikitext-2/wiki.test.joined.txt", "wikitext-2/wiki.valid.tokens"):
        assert hashlib.sha256((Path(data_dir) / rel).read_bytes()).hexdigest() == hashes[rel], rel


@pytest.mark.parametrize("name,split,count", [("lima", "train", 1030), ("lima", "test", 300),
                                              ("gsm8k", "train", 7473), ("gpteacher-roleplay", "train", 3146),
                                              ("gpteacher-toolformer", "train", 7673),
                                              ("selfinstruct-seed", "train", 175)])
def test_instruction_sets(data_dir, name, split, count):
    rows = data.load_instructions(name, split)
    assert len(rows) == count
    assert set(rows[0]) == {"instruction", "input", "output"} and rows[0]["instruction"]


def test_text_corpora(data_dir):
    assert len(data.load_documents("pydocs")) > 50
    fortunes = data.load_documents("fortunes")
    assert len(fortunes) > 10000 and not any(f.startswith("%") for f in fortunes[:100])
    wt = data.load_text("wikitext2", "test")
    assert wt.startswith(" = Robert Boulter = ") or "Robert Boulter" in wt[:100]
    assert "<unk>" in data.load_text("wikitext2", "validation")[:20000]
