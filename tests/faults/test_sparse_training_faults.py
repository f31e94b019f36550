"""Fault catalogue, sparse training (issue 16): every bad input to shrink.pruning.training raises a ShrinkError
whose message names the problem and the fix (classified with the catalogue's harness)."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import assert_clear as _clear  # noqa: E402

from shrink.pruning import MaskSet  # noqa: E402
from shrink.pruning import training as T  # noqa: E402


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))




def make(**kw):
    model = mlp()
    opt = kw.pop("opt", None) or torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = {"algorithm": "rigl", "end_step": 100, **kw}
    return T.SparseUpdater(model, opt, args.pop("algorithm"), **args)


@pytest.mark.parametrize("kw,names", [
    ({"sparsity": 1.2}, ("sparsity", "1.2")),
    ({"sparsity": "0.8"}, ("sparsity",)),
    ({"algorithm": "snap"}, ("algorithm", "snap", "rigl")),
    ({"update_every": 0}, ("update_every", "0")),
    ({"distribution": "foo"}, ("distribution", "foo", "erk")),
    ({"drop_fraction": 1.5}, ("drop_fraction",)),
    ({"drop_decay": "linear"}, ("drop_decay", "linear")),
    ({"end_step": None}, ("end_step",)),
    ({"algorithm": "gmp", "start_step": 0, "end_step": 25, "update_every": 10}, ("end_step", "update_every")),
    ({"algorithm": "lth", "rewind_step": 50, "end_step": 10}, ("end_step", "rewind_step")),
    ({"targets": ["0.bias"]}, ("0.bias",)),
    ({"targets": ["nope.weight"]}, ("nope.weight",)),
    ({"targets": []}, ("targets",)),
    ({"distribution": {"0.weight": 0.5}}, ("2.weight",)),
])
def test_bad_constructor_inputs(kw, names):
    _clear(lambda: make(**kw), *names)


def test_not_an_optimizer():
    model = mlp()
    _clear(lambda: T.SparseUpdater(model, "adamw", "rigl", end_step=10), "optimizer", "torch.optim")


def test_target_not_in_optimizer():
    model = mlp()
    opt = torch.optim.AdamW(model[2].parameters(), lr=1e-3)
    _clear(lambda: T.SparseUpdater(model, opt, "rigl", end_step=10), "0.weight", "optimizer")


def test_initial_masks_miss_a_target():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ms = MaskSet(model, {"0.weight": torch.ones(16, 8, dtype=torch.bool)})
    _clear(lambda: T.SparseUpdater(model, opt, "static", masks=ms), "2.weight", "MaskSet")


def test_rigl_update_without_gradients():
    upd = make(update_every=1, start_step=0)
    _clear(upd.step, "gradient", "backward")


def test_optimizer_state_that_cannot_be_reset():
    model = mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    upd = T.SparseUpdater(model, opt, "magnitude", sparsity=0.5)

    def go():
        model(torch.randn(4, 8)).sum().backward()
        upd.step()

    _clear(go, "Adagrad", "sum")


def test_state_dict_of_another_algorithm():
    a, b = make(algorithm="set"), make(algorithm="rigl")
    _clear(lambda: b.load_state_dict(a.state_dict()), "set", "algorithm")


def test_masks_changed_outside_the_updater():
    upd = make(algorithm="static")
    upd.masks.masks["0.weight"][0, 0] = not bool(upd.masks.masks["0.weight"][0, 0])
    _clear(upd.check, "0.weight", "pruned")
