"""In-memory feature matrix and label vector of one data split, with optional subject and shard ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# Only for the annotation: the models package depends on torch, numpy and scipy alone.
if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, eq=False)
class Split:
    """Features and binary labels of one split, row-aligned, with optional subject and shard ids.

    `x` is float32 with shape (n, d) and may contain NaN, which the model maps to the
    training mean. `y` is int64 with shape (n,) and contains only 0 and 1. The
    constructor converts dtypes and raises ValueError on shapes or labels that do not fit.

    `groups` contains the subject id of each row (any hashable values, kept as given) and
    `shards` the data shard of each row (int64, at least 0). Both default to None, and
    only methods that need them read them: SISA assigns rows to constituents by
    `shards` and to slices by a hash of `groups`. In Lethe all rows of a subject share
    one shard, but the class does not require it.
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None
    shards: np.ndarray | None = None

    def __post_init__(self) -> None:
        # The dataclass is frozen, so the converted arrays are set through object.__setattr__.
        x = np.asarray(self.x, dtype=np.float32)
        y = np.asarray(self.y, dtype=np.int64)

        if x.ndim != 2:
            raise ValueError(f"Split.x must be 2-D (rows, features), got shape {x.shape}.")
        if y.ndim != 1:
            raise ValueError(f"Split.y must be 1-D, got shape {y.shape}.")
        if len(x) != len(y):
            raise ValueError(f"Split.x has {len(x)} rows but Split.y has {len(y)}.")
        invalid_labels = np.setdiff1d(np.unique(y), [0, 1])
        if invalid_labels.size:
            raise ValueError(f"Split.y must contain only 0 and 1, found {invalid_labels[:5].tolist()}.")

        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        if self.groups is not None:
            object.__setattr__(self, "groups", _row_ids(self.groups, "groups", len(y)))
        if self.shards is not None:
            shards = _row_ids(self.shards, "shards", len(y))
            if not np.issubdtype(shards.dtype, np.integer):
                raise ValueError(f"Split.shards must be integers, got dtype {shards.dtype}.")
            if shards.size and shards.min() < 0:
                raise ValueError(f"Split.shards must not be negative, found {shards.min()}.")
            object.__setattr__(self, "shards", shards.astype(np.int64))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return self.x.shape[1]

    def take(self, indices: np.ndarray) -> Split:
        """Return the rows at `indices` (integer positions or a boolean mask) as a new Split, ids included."""
        groups = None if self.groups is None else self.groups[indices]
        shards = None if self.shards is None else self.shards[indices]
        return Split(self.x[indices], self.y[indices], groups=groups, shards=shards)

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, features: list[str], label: str, group: str | None = None, shard: str | None = None
    ) -> Split:
        """Build a Split from the `features` columns and the `label` column of a data frame.

        `group` and `shard` name optional columns that fill `groups` and `shards`.
        Raises KeyError naming the missing columns, and ValueError when the label has
        missing values.
        """
        optional = [column for column in (group, shard) if column is not None]
        missing = [column for column in [*features, label, *optional] if column not in frame.columns]
        if missing:
            raise KeyError(f"Columns not found in the frame: {missing}.")
        if frame[label].isna().any():
            raise ValueError(f"Label column {label!r} has {int(frame[label].isna().sum())} missing values.")

        x = frame[features].to_numpy(dtype=np.float32, na_value=np.nan)
        y = frame[label].to_numpy(dtype=np.int64)
        groups = frame[group].to_numpy() if group is not None else None
        shards = frame[shard].to_numpy() if shard is not None else None
        return cls(x, y, groups=groups, shards=shards)


def _row_ids(values: np.ndarray, name: str, n_rows: int) -> np.ndarray:
    ids = np.asarray(values)
    if ids.shape != (n_rows,):
        raise ValueError(f"Split.{name} must have shape ({n_rows},), one id per row, got {ids.shape}.")
    return ids
