"""NegGrad+: fine-tune on the retained rows while ascending the loss on the forget rows."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.nn import functional as F

from models.batching import shuffled_batches, split_tensors
from models.data import Split
from models.device import autocast
from models.network import TabularMLP
from models.training import mean_loss
from models.unlearning.base import UnlearnResult, check_model_type, copy_to_device, register_method, resolve_settings
from models.unlearning.loops import cycle_batches, make_record, optimizer_step, refit_scaler, seeded_generator

logger = logging.getLogger(__name__)

NEGGRAD_PLUS_DEFAULTS: dict[str, Any] = {
    # Weight of the retain loss, and the forget term gets 1 - alpha. Chosen on RAND HIE: with
    # 0.9 the forget set's z scores matched exact retraining when forgetting 1% or 5% of training
    # subjects, and with 0.99 they stayed near the original model's. bench/gate_calibration.py
    # measures the default again.
    "alpha": 0.9,
    "epochs": 3,
    "lr": 1e-3,
    "batch_size": 256,
    "forget_batch_size": 64,
    "weight_decay": 1e-4,
    # Gradient ascent pauses while the forget set's mean loss is above this bound.
    # None means the input model's mean validation loss, the loss level of rows it never saw.
    "forget_loss_bound": None,
    "max_grad_norm": 5.0,
    "seed": 0,
}


@register_method("neggrad_plus")
def neggrad_plus(
    model: TabularMLP, forget: Split, retain: Split, val: Split, settings: dict, device: torch.device
) -> UnlearnResult:
    """Fine-tune on `retain` while ascending the loss on `forget` (NegGrad+).

    Each step minimizes alpha * CE(retain batch) - (1 - alpha) * CE(forget batch),
    as in the NegGrad+ baseline of Kurmanji et al., "Towards Unbounded Machine
    Unlearning" (NeurIPS 2023). The forget term is dropped for any step in which the
    mean loss of the whole forget set is already above `forget_loss_bound`. As a
    result, the forget set ends near the loss of unseen data rather than far above
    it, where an attacker could also detect it. Gradients are clipped to `max_grad_norm`. One
    epoch is one pass over `retain`. The scaler is refitted on `retain`, because its
    mean and std include the forget rows.
    """
    options = resolve_settings("neggrad_plus", NEGGRAD_PLUS_DEFAULTS, settings)
    check_model_type("neggrad_plus", model)
    if len(retain) == 0:
        raise ValueError("The retain split is empty, so NegGrad+ has nothing to preserve.")
    if not 0.0 <= options["alpha"] <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {options['alpha']}.")

    started = time.perf_counter()
    generator = seeded_generator(options["seed"])

    new_model = copy_to_device(model, device)
    x_retain, y_retain = split_tensors(retain, device)
    x_forget, y_forget = split_tensors(forget, device)

    # The bound comes from the input model before any change, so it is the loss level of unseen rows.
    if options["forget_loss_bound"] is None:
        if len(val) == 0:
            raise ValueError("The validation split is empty, so set forget_loss_bound explicitly.")
        x_val, y_val = split_tensors(val, device)
        options["forget_loss_bound"] = mean_loss(new_model, x_val, y_val)

    refit_scaler(new_model, retain.x)
    optimizer = torch.optim.Adam(new_model.parameters(), lr=options["lr"], weight_decay=options["weight_decay"])
    forget_batches = cycle_batches(len(forget), options["forget_batch_size"], generator) if len(forget) else None

    steps = 0
    ascent_steps = 0
    for _ in range(options["epochs"]):
        for rows in shuffled_batches(len(retain), options["batch_size"], generator):
            rows = rows.to(device)
            optimizer.zero_grad()

            # This check reads the whole forget set in eval mode, because the mean of one
            # small batch with dropout is too noisy and lets the ascent overshoot.
            ascend = forget_batches is not None and mean_loss(new_model, x_forget, y_forget) < options["forget_loss_bound"]

            new_model.train()
            with autocast(device):
                loss = options["alpha"] * F.cross_entropy(new_model(x_retain[rows]), y_retain[rows])
                if ascend:
                    forget_rows = next(forget_batches).to(device)
                    forget_loss = F.cross_entropy(new_model(x_forget[forget_rows]), y_forget[forget_rows])
                    loss = loss - (1.0 - options["alpha"]) * forget_loss
                    ascent_steps += 1

            optimizer_step(new_model, optimizer, loss, max_grad_norm=options["max_grad_norm"])
            steps += 1
    new_model.eval()

    logger.info("NegGrad+ ran %d steps, %d of them with gradient ascent on %d forget rows.", steps, ascent_steps, len(forget))
    record = make_record("neggrad_plus", steps, options["epochs"], started, device, options, {"ascent_steps": ascent_steps})
    return UnlearnResult(model=new_model, record=record)
