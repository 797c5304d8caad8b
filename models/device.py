"""Device selection and seeding for reproducible training runs."""

from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cuda", "cpu")


def pick_device(prefer: str = "auto") -> torch.device:
    """Return CUDA when it is available and `prefer` is "auto" or "cuda", else the CPU.

    Raises ValueError when `prefer` is not one of DEVICE_CHOICES.
    """
    if prefer not in DEVICE_CHOICES:
        raise ValueError(f"Invalid device preference {prefer!r}: expected one of {', '.join(DEVICE_CHOICES)}.")

    if prefer in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")

    if prefer == "cuda":
        logger.warning("CUDA was requested but is not available, so the CPU is used.")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed the Python, NumPy and torch (CPU and every CUDA device) random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Return a bfloat16 autocast context on CUDA and a no-op context on any other device.

    Training loops wrap their forward passes in it, so one code path runs in mixed
    precision on a GPU and in float32 on the CPU. bfloat16 has float32's exponent
    range, so no gradient scaler is needed.
    """
    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
