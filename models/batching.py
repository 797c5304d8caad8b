"""Tensor conversion and minibatch index helpers shared by training and unlearning."""

from __future__ import annotations

import torch

from models.data import Split


def split_tensors(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a Split's features and labels to `device` as float32 and int64 tensors."""
    # torch.tensor copies, so arrays that pandas returns read-only are safe to use.
    x = torch.tensor(split.x, dtype=torch.float32, device=device)
    y = torch.tensor(split.y, dtype=torch.int64, device=device)
    return x, y


def shuffled_batches(n_rows: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Return the row indices of one epoch, shuffled and cut into batches of `batch_size`.

    The last batch keeps the remainder. The permutation is drawn on the CPU from
    `generator`, so the order depends only on its seed and not on the device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")

    order = torch.randperm(n_rows, generator=generator)
    return list(torch.split(order, batch_size))
