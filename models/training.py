"""The production training recipe: Adam, cross-entropy and early stopping on validation loss."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from models.batching import shuffled_batches, split_tensors
from models.data import Split
from models.device import autocast, seed_everything
from models.network import TabularMLP

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of `train_mlp`."""

    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    lr: float = 1e-3
    # Adam's L2 penalty, kept mild because early stopping already limits overfitting.
    weight_decay: float = 1e-4
    batch_size: int = 256
    # An upper bound only. On RAND HIE, early stopping ends training near epoch 30.
    max_epochs: int = 200
    # Validation loss on about 2k rows is noisy from epoch to epoch, so a short patience would stop too early.
    patience: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        # Settings read back from MLflow or JSON give `hidden` as a list, and the model expects a tuple.
        object.__setattr__(self, "hidden", tuple(int(width) for width in self.hidden))

        for name in ("batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}.")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must not be negative, got {self.weight_decay}.")


@dataclass
class TrainReport:
    """Summary of one `train_mlp` run. `best_epoch` counts from 1."""

    epochs: int
    best_epoch: int
    best_val_loss: float
    wall_time_s: float
    device: str


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> int:
    """Run one shuffled pass of cross-entropy minimization and return the number of optimizer steps.

    The forward pass runs under bfloat16 autocast on CUDA and in float32 elsewhere.
    """
    model.train()
    batches = shuffled_batches(len(y), batch_size, generator)
    for rows in batches:
        rows = rows.to(x.device)
        optimizer.zero_grad()
        with autocast(x.device):
            loss = F.cross_entropy(model(x[rows]), y[rows])
        loss.backward()
        optimizer.step()
    return len(batches)


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Compute the mean cross-entropy of `model` in eval mode (dropout off) and leave it in eval mode."""
    model.eval()
    return F.cross_entropy(model(x), y).item()


def train_mlp(train: Split, val: Split, config: TrainConfig, device: torch.device) -> tuple[TabularMLP, TrainReport]:
    """Train a TabularMLP on `train` and return the weights of its best validation epoch.

    The scaler is fitted on `train` only. Training stops after `config.patience`
    epochs without a lower validation loss, or at `config.max_epochs`. The global
    Python, NumPy and torch generators are reseeded with `config.seed`, so two runs
    with the same inputs give identical weights on the CPU. The model is returned
    in eval mode on `device`.
    """
    if len(train) == 0:
        raise ValueError("The training split is empty.")
    if len(val) == 0:
        raise ValueError("The validation split is empty, so early stopping cannot work.")
    if train.n_features != val.n_features:
        raise ValueError(f"train has {train.n_features} features but val has {val.n_features}.")

    started = time.perf_counter()
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    model = TabularMLP(train.n_features, hidden=tuple(config.hidden), dropout=config.dropout)
    model.fit_scaler(train.x)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    x_train, y_train = split_tensors(train, device)
    x_val, y_val = split_tensors(val, device)

    best_val_loss = float("inf")
    best_epoch = 0
    best_state = copy.deepcopy(model.state_dict())
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        train_one_epoch(model, optimizer, x_train, y_train, config.batch_size, generator)
        val_loss = mean_loss(model, x_val, y_val)
        logger.debug("epoch %d: validation loss %.5f", epoch, val_loss)

        if val_loss < best_val_loss:
            best_val_loss = val_loss
            best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= config.patience:
            break

    if best_epoch == 0:
        logger.warning("Validation loss was never finite, so the initial weights are returned.")
    model.load_state_dict(best_state)
    model.eval()

    report = TrainReport(
        epochs=epoch,
        best_epoch=best_epoch,
        best_val_loss=best_val_loss,
        wall_time_s=time.perf_counter() - started,
        device=str(device),
    )
    logger.info(
        "Trained for %d epochs on %d rows, best validation loss %.4f at epoch %d (%.1f s on %s).",
        report.epochs, len(train), report.best_val_loss, report.best_epoch, report.wall_time_s, report.device,
    )
    return model, report
