"""Exact unlearning: retrain from scratch on the retained rows with the production recipe."""

from __future__ import annotations

import dataclasses
import math

import torch

from models.data import Split
from models.network import TabularMLP
from models.training import TrainConfig, train_mlp
from models.unlearning.base import UnlearnRecord, UnlearnResult, check_model_type, register_method, resolve_settings


@register_method("retrain", exact=True)
def retrain(
    model: TabularMLP, forget: Split, retain: Split, val: Split, settings: dict, device: torch.device
) -> UnlearnResult:
    """Train a new model from scratch on `retain` with the production recipe (exact unlearning).

    `settings` are TrainConfig fields, normally the baseline's. `hidden` and
    `dropout` default to the input model's architecture. `forget` is not used,
    because leaving it out of training is the whole method.
    """
    architecture = {"hidden": getattr(model, "hidden", TrainConfig.hidden), "dropout": getattr(model, "dropout", TrainConfig.dropout)}
    defaults = {**dataclasses.asdict(TrainConfig()), **architecture}
    config = TrainConfig(**resolve_settings("retrain", defaults, settings))
    check_model_type("retrain", model)

    new_model, report = train_mlp(retain, val, config, device)

    steps_per_epoch = math.ceil(len(retain) / config.batch_size)
    record = UnlearnRecord(
        method="retrain",
        steps=report.epochs * steps_per_epoch,
        epochs=report.epochs,
        wall_time_s=report.wall_time_s,
        device=str(device),
        settings=dataclasses.asdict(config),
    )
    return UnlearnResult(model=new_model, record=record)
