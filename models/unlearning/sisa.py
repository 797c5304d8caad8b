"""Exact unlearning of a SISA ensemble: retrain only the affected constituents from their checkpoints.

Source: Bourtoule et al., "Machine Unlearning", IEEE S&P 2021. The model and its
training live in `models.sisa`.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import nn

from models.data import Split
from models.network import TabularMLP
from models.sisa import ShardMap, SisaConfig, SisaEnsemble, train_sisa
from models.unlearning.base import UnlearnResult, check_model_type, copy_to_device, register_method, resolve_settings
from models.unlearning.loops import make_record


def prepare_sisa(model: TabularMLP, train: Split, val: Split, settings: dict, device: torch.device) -> nn.Module:
    """Train a SisaEnsemble on `train` with the baseline's architecture, one constituent per shard id in `train.shards`.

    `settings` are SisaConfig fields that override these defaults.
    """
    if train.shards is None:
        raise ValueError("SISA needs Split.shards on the training split to align constituents with data shards.")
    defaults = {
        **dataclasses.asdict(SisaConfig()),
        "n_shards": int(np.max(train.shards)) + 1 if len(train) else 1,
        "hidden": model.hidden,
        "dropout": model.dropout,
    }
    return train_sisa(train, SisaConfig(**resolve_settings("sisa model", defaults, settings)), device)


@register_method("sisa", model_types=(SisaEnsemble,), prepare=prepare_sisa, exact=True)
def sisa(model: SisaEnsemble, forget: Split, retain: Split, val: Split, settings: dict, device: torch.device,
         map_shards: ShardMap | None = None) -> UnlearnResult:
    """Delete `forget` from a copy of a SisaEnsemble by retraining the constituents that held it.

    `forget` and `retain` need `shards` and `groups`, and `retain` must hold every
    remaining training row of the affected shards in training order (see
    `SisaEnsemble.unlearn`). The recipe is the ensemble's own, so the method has no
    settings. `val` is not used. The record's details give the first retrained
    slice of each retrained shard. `map_shards` runs the per-shard jobs elsewhere, for
    example on a Dask cluster (see `SisaEnsemble.fit`).
    """
    options = resolve_settings("sisa", {}, settings)
    check_model_type("sisa", model)

    started = time.perf_counter()
    new_model = copy_to_device(model, device)
    deletion = new_model.unlearn(forget, retain, device, map_shards)

    details = {
        "restart_slices": {str(shard): slice_index for shard, slice_index in deletion.restart_slices.items()},
        "retrained_shards": len(deletion.restart_slices),
        "n_shards": new_model.config.n_shards,
        "n_slices": new_model.config.n_slices,
    }
    epochs = new_model.config.epochs_per_slice * sum(new_model.config.n_slices - start for start in deletion.restart_slices.values())
    settings_used = {**options, **new_model.describe()}
    record = make_record("sisa", deletion.steps, epochs, started, device, settings_used, details)
    return UnlearnResult(model=new_model, record=record)
