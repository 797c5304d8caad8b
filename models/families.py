"""Model families: train a model of a family, tell a model's family, and retrain one exactly.

A family is the kind of model a deployment serves and unlearns from:

- `mlp`: one TabularMLP, trained with the production recipe;
- `sisa-mlp`: a SisaEnsemble, one TabularMLP per data shard, trained slice by slice;
- `certified`: a CertifiedMLP, the frozen features of a trained TabularMLP with a
  certified logistic-regression head.

`retrain_family` is the exact method for every family: it trains a new model of the
champion's family and configuration from scratch on the retained rows.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn

from models.certified import CertifiedConfig, CertifiedMLP, certify_mlp
from models.data import Split
from models.network import TabularMLP
from models.sisa import ShardMap, SisaConfig, SisaEnsemble, train_sisa
from models.training import TrainConfig, train_mlp
from models.unlearning.base import UnlearnRecord, UnlearnResult

# Family name -> the model class it serves. Subclasses come first, because a lookup takes the first match.
FAMILY_TYPES: dict[str, type[nn.Module]] = {"sisa-mlp": SisaEnsemble, "certified": CertifiedMLP, "mlp": TabularMLP}


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    """What a family needs besides the MLP recipe.

    `sisa` contains SisaConfig fields other than the MLP recipe (n_shards, n_slices,
    epochs_per_slice). `certified` contains CertifiedConfig fields (lam, epsilon, delta,
    noise_std). A family ignores the other's fields.
    """

    name: str = "mlp"
    sisa: dict = dataclasses.field(default_factory=dict)
    certified: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in FAMILY_TYPES:
            raise ValueError(f"Unknown model family {self.name!r}; valid families: {', '.join(sorted(FAMILY_TYPES))}.")


def family_of(model: nn.Module) -> str:
    """Return the family name of `model`. Raises TypeError for a class no family serves."""
    for name, model_type in FAMILY_TYPES.items():
        if isinstance(model, model_type):
            return name
    raise TypeError(f"{type(model).__name__} belongs to no model family; families: {', '.join(sorted(FAMILY_TYPES))}.")


def sisa_config(recipe: TrainConfig, options: dict) -> SisaConfig:
    """Combine the MLP recipe (architecture, optimizer, seed) with the SISA layout in `options`."""
    shared = {key: getattr(recipe, key) for key in ("hidden", "dropout", "lr", "weight_decay", "batch_size", "seed")}
    return SisaConfig(**shared, **options)


def train_family(family: FamilyConfig, train: Split, val: Split, recipe: TrainConfig, device: torch.device) -> tuple[nn.Module, dict]:
    """Train a model of `family` on `train` and return it with a JSON-compatible training summary.

    The `sisa-mlp` family needs `train.shards` and `train.groups`. The `certified`
    family trains a TabularMLP with `recipe` first and fits its head on the same rows.
    """
    started = time.perf_counter()
    if family.name == "sisa-mlp":
        config = sisa_config(recipe, family.sisa)
        model = train_sisa(train, config, device)
        summary = {"family": family.name, **model.describe()}
    else:
        model, report = train_mlp(train, val, recipe, device)
        summary = {"family": family.name, "epochs": report.epochs, "best_epoch": report.best_epoch}
        if family.name == "certified":
            config = CertifiedConfig(**{**family.certified, "seed": recipe.seed})
            model = certify_mlp(model, train, config, device)
            summary.update(model.head.describe())
    summary["wall_time_s"] = time.perf_counter() - started
    return model.eval(), summary


def retrain_family(champion: nn.Module, retain: Split, val: Split, recipe: TrainConfig, device: torch.device,
                   map_shards: ShardMap | None = None) -> UnlearnResult:
    """Train a new model of the champion's family from scratch on `retain` (exact unlearning).

    A SisaEnsemble retrains every constituent with its own SisaConfig. A CertifiedMLP
    retrains its feature extractor with `recipe` and fits a new head with its own
    CertifiedConfig, so the new features never saw the forget rows either. A
    TabularMLP retrains with `recipe`, its architecture taken from the champion.
    `map_shards` runs the SISA constituents' jobs elsewhere (see `SisaEnsemble.fit`).
    """
    started = time.perf_counter()
    family = family_of(champion)
    if family == "sisa-mlp":
        if len(retain) == 0:
            raise ValueError("The retain split is empty, so there is nothing to retrain the ensemble on.")
        model = SisaEnsemble(champion.n_features, champion.config)
        steps = model.fit(retain, device, map_shards)
        settings = dataclasses.asdict(champion.config)
        epochs = champion.config.epochs_per_slice * champion.config.n_slices
        details = {"family": family, "retrained_shards": champion.config.n_shards}
    else:
        extractor = champion.extractor if family == "certified" else champion
        recipe = dataclasses.replace(recipe, hidden=extractor.hidden, dropout=extractor.dropout)
        model, report = train_mlp(retain, val, recipe, device)
        settings, epochs = dataclasses.asdict(recipe), report.epochs
        steps = epochs * math.ceil(len(retain) / recipe.batch_size)
        details = {"family": family}
        if family == "certified":
            model = certify_mlp(model, retain, champion.head.config, device)
            details.update(model.head.describe())
            settings["certified"] = dataclasses.asdict(champion.head.config)

    record = UnlearnRecord(method="retrain", steps=steps, epochs=epochs, wall_time_s=time.perf_counter() - started,
                           device=str(device), settings=settings, details=details)
    return UnlearnResult(model=model.eval(), record=record)
