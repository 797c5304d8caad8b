"""Certified removal by a Newton step on a logistic-regression head over frozen MLP features.

Source: Guo et al., "Certified Data Removal from Machine Learning Models", ICML 2020.
The head, its bound and its budget live in `models.certified`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from torch import nn

from models.certified import CertifiedConfig, CertifiedMLP, certify_mlp
from models.data import Split
from models.network import TabularMLP
from models.unlearning.base import UnlearnResult, check_model_type, copy_to_device, register_method, resolve_settings
from models.unlearning.loops import make_record

logger = logging.getLogger(__name__)

# The certification parameters of a new head. A CertifiedMLP keeps the ones it was built with.
NEWTON_DEFAULTS: dict[str, Any] = dataclasses.asdict(CertifiedConfig())


def prepare_certified(model: TabularMLP, train: Split, val: Split, settings: dict, device: torch.device) -> nn.Module:
    """Build a CertifiedMLP on the baseline's frozen features and fit its head on `train`.

    `settings` are CertifiedConfig fields that override the defaults.
    """
    return certify_mlp(model, train, CertifiedConfig(**resolve_settings("newton model", NEWTON_DEFAULTS, settings)), device)


@register_method("newton", model_types=(CertifiedMLP, TabularMLP), prepare=prepare_certified)
def newton(model: nn.Module, forget: Split, retain: Split, val: Split, settings: dict, device: torch.device) -> UnlearnResult:
    """Remove `forget` from a copy of a CertifiedMLP by one Newton step on its head.

    `retain` must hold every remaining training row. When the step's residual bound
    would exceed the budget left, the head is retrained on `retain` with fresh noise
    and the budget resets (see `CertifiedHead.remove`). Given a plain TabularMLP, the
    method builds a CertifiedMLP on its frozen features and fits the head on `retain`
    alone, which removes `forget` from the head exactly. `settings` configure that new
    head. For a CertifiedMLP they must equal the values it was built with, because b
    and lam define the objective that the Newton step continues. `val` is not used.
    The record's details give the bound, the budget left and the (epsilon, delta) kept.
    """
    options = resolve_settings("newton", NEWTON_DEFAULTS, settings)
    check_model_type("newton", model)
    config = CertifiedConfig(**options)
    started = time.perf_counter()

    if isinstance(model, CertifiedMLP):
        changed = {key: value for key, value in settings.items() if getattr(model.head.config, key) != value}
        if changed:
            raise ValueError(
                f"Settings {changed} differ from the CertifiedMLP's own {dataclasses.asdict(model.head.config)}, "
                "and a removal cannot change the objective the head was trained on. Drop these settings."
            )
        new_model = copy_to_device(model, device)
        report = new_model.remove(forget, retain, device)
        details = {**new_model.head.describe(), "retrained": report.retrained, "residual_bound": report.residual_bound,
                   "converted": False}
        steps = report.newton_iterations
    else:
        logger.info("newton got a %s, so it builds a certified head on its frozen features from the retained rows.", type(model).__name__)
        if len(retain) == 0:
            raise ValueError("The retain split is empty, so there is nothing to fit the certified head on.")
        new_model = CertifiedMLP(model, config)
        steps = new_model.fit(retain, device)
        details = {**new_model.head.describe(), "retrained": True, "residual_bound": 0.0, "converted": True}

    new_model.eval()
    record = make_record("newton", steps, 0, started, device, {**dataclasses.asdict(new_model.head.config)}, details)
    return UnlearnResult(model=new_model, record=record)
