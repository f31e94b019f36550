"""Fault catalogue, the training loop (shrink.train): bad settings and inputs raise a ShrinkError naming the
problem and the fix; a corrupt checkpoint is named (with how to restart), and a killed run loses only the steps
after its last checkpoint (classified with the catalogue's harness)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import assert_clear as _clear  # noqa: E402

from shrink import models  # noqa: E402
from shrink import train as T  # noqa: E402




def _batches():
    return T.lm_batches(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0)), 2, 16)


@pytest.mark.parametrize("kw,names", [
    ({"steps": 0}, ("steps", "0")),
    ({"steps": 10, "warmup": 20}, ("warmup", "20")),
    ({"steps": 10, "lr": -1.0}, ("lr", "-1.0")),
    ({"steps": 10, "schedule": "exp"}, ("schedule", "exp", "cosine")),
    ({"steps": 10, "grad_clip": 0}, ("grad_clip",)),
    ({"steps": 10, "lora": {"r": 8}}, ("lora", "targets")),
    ({"steps": 10, "lora": {"targets": ["q_proj"], "r": 0}}, ("lora['r']",)),
    ({"steps": 10, "checkpoint_every": -1}, ("checkpoint_every",)),
])
def test_bad_config(kw, names):
    _clear(lambda: T.TrainConfig(**kw), *names)


def test_bad_batches_and_masks():
    _clear(lambda: T.lm_batches(torch.arange(10), 2, 64), "seqlen", "tokens")
    _clear(lambda: T.sft_batches([], 4), "examples")
    m, _ = models.load("tiny-llama")
    _clear(lambda: T.train(m, _batches(), T.TrainConfig(steps=1), masks={"nope.weight": torch.ones(2, 2).bool()},
                           progress=False), "nope.weight")
    _clear(lambda: T.train(m, _batches(), T.TrainConfig(steps=1, trainable=("zzz",)), progress=False),
           "trainable")


def test_corrupt_checkpoint_names_the_file(tmp_path):
    cfg = T.TrainConfig(steps=2, checkpoint_every=1)
    d = tmp_path / cfg.key()
    d.mkdir(parents=True)
    (d / "checkpoint.pt").write_bytes(b"not a checkpoint")
    m, _ = models.load("tiny-llama")
    _clear(lambda: T.train(m, _batches(), cfg, checkpoint_dir=tmp_path, progress=False), "checkpoint", "delete")


def test_interrupted_run_keeps_its_checkpoint(tmp_path):
    cfg = T.TrainConfig(steps=6, checkpoint_every=2)

    def stop(info):
        if info["step"] == 4:
            raise KeyboardInterrupt

    m, _ = models.load("tiny-llama")
    with pytest.raises(KeyboardInterrupt):
        T.train(m, _batches(), cfg, checkpoint_dir=tmp_path, progress=False, on_step=stop)
    st = torch.load(tmp_path / cfg.key() / "checkpoint.pt", weights_only=False)
    assert st["step"] == 4 and not list((tmp_path / cfg.key()).glob(".checkpoint*.tmp"))
