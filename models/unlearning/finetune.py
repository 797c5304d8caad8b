"""Fine-tuning on the retained rows only, relying on catastrophic forgetting of the rest."""

from __future__ import annotations

import time
from typing import Any

import torch

from models.batching import split_tensors
from models.data import Split
from models.network import TabularMLP
from models.training import train_one_epoch
from models.unlearning.base import UnlearnResult, check_model_type, copy_to_device, register_method, resolve_settings
from models.unlearning.loops import make_record, refit_scaler, seeded_generator

FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "epochs": 3,
    "batch_size": 256,
    "weight_decay": 1e-4,
    "seed": 0,
}


@register_method("finetune")
def finetune(
    model: TabularMLP, forget: Split, retain: Split, val: Split, settings: dict, device: torch.device
) -> UnlearnResult:
    """Continue training a copy of the model on `retain` only, for a few epochs.

    The scaler is refitted on `retain` because its mean and std are statistics of
    the original training data, forget rows included.
    """
    options = resolve_settings("finetune", FINETUNE_DEFAULTS, settings)
    check_model_type("finetune", model)
    if len(retain) == 0:
        raise ValueError("The retain split is empty, so there is nothing to fine-tune on.")

    started = time.perf_counter()
    generator = seeded_generator(options["seed"])

    new_model = copy_to_device(model, device)
    refit_scaler(new_model, retain.x)
    optimizer = torch.optim.Adam(new_model.parameters(), lr=options["lr"], weight_decay=options["weight_decay"])
    x_retain, y_retain = split_tensors(retain, device)

    steps = 0
    for _ in range(options["epochs"]):
        steps += train_one_epoch(new_model, optimizer, x_retain, y_retain, options["batch_size"], generator)
    new_model.eval()

    record = make_record("finetune", steps, options["epochs"], started, device, options)
    return UnlearnResult(model=new_model, record=record)
