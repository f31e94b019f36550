"""Shared fixtures. Result records written by tests go to a temporary folder, never to results/."""

import os

import pytest


def pytest_collectstart(collector):
    # nbval: compare text outputs only (figures and HTML differ in bytes, not in meaning)
    if collector.fspath and str(collector.fspath).endswith(".ipynb"):
        collector.skip_compare += ("image/png", "image/svg+xml", "text/html", "application/javascript", "stderr")


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("SHRINK_STANDINS", raising=False)
    monkeypatch.delenv("SHRINK_ONLINE", raising=False)
    monkeypatch.delenv("SHRINK_RECOMPUTE", raising=False)


@pytest.fixture
def one_thread():
    """One torch thread: the CI machine's 2 cores are shared by pytest-xdist workers; more threads are slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def data_dir():
    path = os.environ.get("SHRINK_DATA")
    if not path:
        pytest.fail("SHRINK_DATA is not set: run the tests through `make test` (it points it at ../shared/data)")
    return path


def c4_like_file(path, n_docs=6, words=400):
    """Write a small JSON-lines file in C4's format (text, timestamp, url)."""
    import json
    import random

    rng = random.Random(0)
    vocab = "the model of a sparse weight prunes bits tokens data layer block error small large".split()
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                "url": f"https://example.org/{i}"}) + "\n")
    return path
