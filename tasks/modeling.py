"""Bridge between the data frames of the pipeline and the PyTorch code in `models/`."""

from __future__ import annotations

import pandas as pd

from models.data import Split
from models.evaluation import accuracy
from models.training import TrainConfig
from tasks.dataset import FEATURES, LABEL, SPLIT
from tasks.settings import TrainSettings


def to_split(frame: pd.DataFrame) -> Split:
    return Split.from_frame(frame, FEATURES, LABEL)


def splits_of(frame: pd.DataFrame) -> dict[str, Split]:
    """Return the train, val and test splits recorded in the data version."""
    return {name: to_split(frame[frame[SPLIT] == name]) for name in ("train", "val", "test")}


def train_config(settings: TrainSettings) -> TrainConfig:
    return TrainConfig(**settings.model_dump())


def utility_metrics(model, splits: dict[str, Split], device, retain: Split | None = None) -> dict[str, float]:
    """Accuracy on the retain set (the training split unless given) and on the test split."""
    return {
        "retain_accuracy": accuracy(model, retain if retain is not None else splits["train"], device),
        "val_accuracy": accuracy(model, splits["val"], device),
        "test_accuracy": accuracy(model, splits["test"], device),
    }
