"""SalUn: random-label unlearning restricted to the weights most salient for the forget loss.

Source: Fan, Liu, Zhang, Wei, Wong and Liu, "SalUn: Empowering Machine Unlearning via
Gradient-based Weight Saliency", ICLR 2024.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from models.batching import shuffled_batches, split_tensors
from models.data import Split
from models.device import autocast
from models.network import N_CLASSES, TabularMLP
from models.unlearning.base import UnlearnResult, check_model_type, copy_to_device, register_method, resolve_settings
from models.unlearning.loops import (
    GradientMask,
    make_record,
    optimizer_step,
    refit_scaler,
    reset_frozen_weights,
    seeded_generator,
)

logger = logging.getLogger(__name__)

SALUN_DEFAULTS: dict[str, Any] = {
    # Fraction of all weights that may change, the largest by forget-loss gradient magnitude.
    # 0.5 is the sparsity Fan et al. use for classification.
    "mask_ratio": 0.5,
    # "other" draws each forget row's label uniformly from the classes other than its own,
    # so with two classes every label flips. "any" draws from all classes, as the authors'
    # released random-label code does, which with two classes keeps half the true labels.
    "random_labels": "other",
    "epochs": 3,
    "lr": 1e-3,
    "batch_size": 256,
    "weight_decay": 1e-4,
    "max_grad_norm": 5.0,
    "seed": 0,
}


RANDOM_LABEL_CHOICES = ("other", "any")


def draw_random_labels(labels: torch.Tensor, choice: str, generator: torch.Generator) -> torch.Tensor:
    """Draw one random label per row: from the other classes ("other") or from all classes ("any")."""
    if choice == "any":
        return torch.randint(0, N_CLASSES, labels.shape, generator=generator).to(labels.device)
    # An offset in 1..N_CLASSES-1 added modulo N_CLASSES never lands on the true class.
    offsets = torch.randint(1, N_CLASSES, labels.shape, generator=generator).to(labels.device)
    return (labels + offsets) % N_CLASSES


def saliency_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ratio: float) -> GradientMask:
    """Mark the `ratio` fraction of weights with the largest |gradient| of the mean forget cross-entropy.

    The gradient is taken at the input weights in eval mode, over all of `x` at once.
    The ranking is global across layers, as in SalUn's hard mask. Exactly
    round(ratio * n_weights) weights are marked, at least one. With a handful of
    forget rows many gradients are exactly 0 (inactive ReLUs), and a threshold
    comparison would then mark all of them.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {ratio}.")

    model.eval()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    gradients = {name: parameter.grad.detach().abs() for name, parameter in model.named_parameters() if parameter.grad is not None}
    model.zero_grad()

    magnitudes = torch.cat([gradient.flatten() for gradient in gradients.values()])
    n_kept = max(1, round(ratio * magnitudes.numel()))
    flat_mask = torch.zeros_like(magnitudes)
    flat_mask[torch.topk(magnitudes, n_kept).indices] = 1.0

    mask: GradientMask = {}
    offset = 0
    for name, gradient in gradients.items():
        mask[name] = flat_mask[offset:offset + gradient.numel()].view_as(gradient)
        offset += gradient.numel()
    return mask


@register_method("salun")
def salun(
    model: TabularMLP, forget: Split, retain: Split, val: Split, settings: dict, device: torch.device
) -> UnlearnResult:
    """Unlearn `forget` by SalUn: saliency mask, then random-label fine-tuning of the masked weights.

    The mask keeps the `mask_ratio` fraction of weights with the largest gradient of
    the forget loss (`saliency_mask`). Each epoch is one shuffled pass over the
    forget rows with fresh random labels (chosen by `random_labels`) mixed with the
    retained rows with their true labels, as in the released code's random-label
    variant for CIFAR-100. Mixing, rather than a separate forget pass, weights the
    forget rows by their share of the data: with Adam a separate pass over three
    rows moves the weights as far as a pass over thousands, and flips those rows'
    predictions well past what retraining gives. Only masked weights change:
    gradients outside the mask are zeroed and those weights are reset after every
    step, so weight decay cannot move them. The scaler is refitted on `retain`,
    because its mean and std include the forget rows. `val` is not used.
    """
    options = resolve_settings("salun", SALUN_DEFAULTS, settings)
    check_model_type("salun", model)
    if len(retain) == 0:
        raise ValueError("The retain split is empty, so SalUn has nothing to preserve.")
    if options["random_labels"] not in RANDOM_LABEL_CHOICES:
        raise ValueError(f"random_labels must be one of {RANDOM_LABEL_CHOICES}, got {options['random_labels']!r}.")

    started = time.perf_counter()
    generator = seeded_generator(options["seed"])

    new_model = copy_to_device(model, device)
    x_retain, y_retain = split_tensors(retain, device)
    x_forget, y_forget = split_tensors(forget, device)

    if len(forget) == 0:
        logger.info("SalUn got no forget rows, so it returns a copy of the input model.")
        return UnlearnResult(new_model.eval(), make_record("salun", 0, 0, started, device, options, {"masked_fraction": 0.0}))

    # The mask comes from the input model with its original scaler, whose gradients point at what the forget rows taught it.
    mask = saliency_mask(new_model, x_forget, y_forget, options["mask_ratio"])
    frozen = {name: parameter.detach().clone() for name, parameter in new_model.named_parameters()}
    masked_fraction = float(sum(m.sum() for m in mask.values()) / sum(m.numel() for m in mask.values()))

    refit_scaler(new_model, retain.x)
    optimizer = torch.optim.Adam(new_model.parameters(), lr=options["lr"], weight_decay=options["weight_decay"])

    x_union = torch.cat([x_forget, x_retain])
    steps = 0
    for _ in range(options["epochs"]):
        y_union = torch.cat([draw_random_labels(y_forget, options["random_labels"], generator), y_retain])
        for rows in shuffled_batches(len(y_union), options["batch_size"], generator):
            rows = rows.to(device)
            optimizer.zero_grad()
            new_model.train()
            with autocast(device):
                loss = F.cross_entropy(new_model(x_union[rows]), y_union[rows])
            optimizer_step(new_model, optimizer, loss, mask=mask, max_grad_norm=options["max_grad_norm"])
            reset_frozen_weights(new_model, mask, frozen)
            steps += 1
    new_model.eval()

    logger.info("SalUn ran %d steps on %.0f%% of the weights for %d forget rows.", steps, 100 * masked_fraction, len(forget))
    record = make_record("salun", steps, options["epochs"], started, device, options, {"masked_fraction": masked_fraction})
    return UnlearnResult(model=new_model, record=record)
