"""The one setup call at the top of every notebook.

``shrink.notebook.setup(seed=seed, scale=scale)`` seeds Python/NumPy/torch, applies the house plot style,
turns progress bars off when headless (papermill, Make, pytest), sets torch's thread count from
``SHRINK_THREADS`` if given, and prints a banner with versions, device and scale.

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from . import env, plotting
from .scales import check_scale


def seed_everything(seed: int) -> None:
    """Seed ``random``, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0, scale: str = "tiny", quiet: bool = False) -> dict:
    """Prepare a notebook run; returns the banner as a dict (also printed unless ``quiet``).

    Args:
        seed: global seed for this run.
        scale: ``tiny`` | ``cpu`` | ``paper`` (validated).
    """
    check_scale(scale)
    seed_everything(seed)
    plotting.use_style()
    if env.headless():  # no progress bars in papermill/Make/pytest logs
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if os.environ.get("SHRINK_THREADS"):
        torch.set_num_threads(int(os.environ["SHRINK_THREADS"]))
    if scale == "tiny":
        torch.use_deterministic_algorithms(True, warn_only=True)
    banner = {"scale": scale, "seed": seed, "device": env.device_name(), "online": env.online(),
              "data": os.environ.get("SHRINK_DATA", "(unset)"), **env.versions()}
    if not quiet:
        print(" | ".join(f"{k}={v}" for k, v in banner.items()))
    return banner
