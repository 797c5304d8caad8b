"""Epoch, batch, optimizer-step and gradient-mask helpers shared by the unlearning methods."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from models.batching import shuffled_batches
from models.device import seed_everything
from models.unlearning.base import UnlearnRecord

# A gradient mask: parameter name -> tensor of 0 and 1 with the parameter's shape.
GradientMask = dict[str, torch.Tensor]


def cycle_batches(n_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield batches of row indices forever, reshuffling after each full pass."""
    if n_rows < 1:
        raise ValueError("cycle_batches needs at least one row, or it would never yield.")
    while True:
        yield from shuffled_batches(n_rows, batch_size, generator)


def seeded_generator(seed: int) -> torch.Generator:
    """Seed the global generators (dropout draws from them) and return a CPU generator for batch order."""
    seed_everything(seed)
    return torch.Generator().manual_seed(seed)


def refit_scaler(model: nn.Module, x: object) -> None:
    """Refit the model's feature scaler on `x` when it has one.

    The scaler's mean and std are statistics of the original training data, forget
    rows included, so methods that keep the scaler would keep a trace of them.
    """
    fit_scaler = getattr(model, "fit_scaler", None)
    if callable(fit_scaler):
        fit_scaler(x)


def apply_mask(model: nn.Module, mask: GradientMask) -> None:
    """Multiply each parameter's gradient by its mask, so only the unmasked weights change."""
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and name in mask:
            parameter.grad.mul_(mask[name])


def reset_frozen_weights(model: nn.Module, mask: GradientMask, frozen: dict[str, torch.Tensor]) -> None:
    """Set every weight whose mask entry is 0 back to its value in `frozen`.

    Masking gradients is not enough with decoupled or L2 weight decay, because the
    optimizer then moves masked weights too. Calling this after each step keeps them fixed.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in mask:
                parameter.copy_(torch.where(mask[name].bool(), parameter, frozen[name]))


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    mask: GradientMask | None = None,
    max_grad_norm: float | None = None,
) -> None:
    """Backpropagate `loss`, mask and clip the gradients, and take one optimizer step.

    The caller zeroes the gradients before the forward pass. Clipping runs after
    masking, so the norm counts only the weights that may change.
    """
    loss.backward()
    if mask is not None:
        apply_mask(model, mask)
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


def make_record(
    method: str,
    steps: int,
    epochs: int,
    started: float,
    device: torch.device,
    settings: dict,
    details: dict | None = None,
) -> UnlearnRecord:
    """Build the UnlearnRecord of a run that began at `started` (a time.perf_counter value)."""
    return UnlearnRecord(
        method=method,
        steps=steps,
        epochs=epochs,
        wall_time_s=time.perf_counter() - started,
        device=str(device),
        settings=settings,
        details=details or {},
    )
