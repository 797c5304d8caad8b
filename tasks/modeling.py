"""Bridge between the data frames of the pipeline and the PyTorch code in `models/`."""

from __future__ import annotations

import pandas as pd

from models.data import Split
from models.evaluation import accuracy
from models.families import FamilyConfig
from models.training import TrainConfig
from tasks.dataset import FEATURES, LABEL, SPLIT, SUBJECT_KEY, shard_of
from tasks.settings import TrainSettings, WorkspaceSettings

SHARD_COLUMN = "_shard"


def to_split(frame: pd.DataFrame, n_shards: int) -> Split:
    """Build a Split with the subject key as `groups` and the data shard of each row as `shards`.

    SISA aligns its constituents with these shards, so the shard must be the one the
    rows are stored in: `shard_of` with the workspace's shard count, as `materialize` uses it.
    """
    frame = frame.assign(**{SHARD_COLUMN: shard_of(frame[SUBJECT_KEY], n_shards)})
    return Split.from_frame(frame, FEATURES, LABEL, group=SUBJECT_KEY, shard=SHARD_COLUMN)


def splits_of(frame: pd.DataFrame, n_shards: int) -> dict[str, Split]:
    """Return the train, val and test splits recorded in the data version, in the frame's row order."""
    return {name: to_split(frame[frame[SPLIT] == name], n_shards) for name in ("train", "val", "test")}


def train_config(settings: TrainSettings) -> TrainConfig:
    return TrainConfig(**settings.model_dump())


def family_config(settings: WorkspaceSettings) -> FamilyConfig:
    """Build the model family of the workspace, with SISA constituents aligned to its data shards."""
    return FamilyConfig(
        name=settings.model.family,
        sisa={"n_shards": settings.data.n_shards, **settings.model.sisa.model_dump()},
        certified=settings.model.certified.model_dump(),
    )


def utility_metrics(model, splits: dict[str, Split], device, retain: Split | None = None) -> dict[str, float]:
    """Accuracy on the retain set (the training split unless given) and on the test split."""
    return {
        "retain_accuracy": accuracy(model, retain if retain is not None else splits["train"], device),
        "val_accuracy": accuracy(model, splits["val"], device),
        "test_accuracy": accuracy(model, splits["test"], device),
    }
