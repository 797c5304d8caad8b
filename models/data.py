"""In-memory feature matrix and label vector of one data split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# Only for the annotation: the models package depends on torch, numpy and scipy alone.
if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, eq=False)
class Split:
    """Features and binary labels of one split, row-aligned.

    `x` is float32 with shape (n, d) and may contain NaN, which the model maps to the
    training mean. `y` is int64 with shape (n,) and contains only 0 and 1. The
    constructor converts dtypes and raises ValueError on shapes or labels that do not fit.
    """

    x: np.ndarray
    y: np.ndarray

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

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return self.x.shape[1]

    def take(self, indices: np.ndarray) -> Split:
        """Return the rows at `indices` (integer positions or a boolean mask) as a new Split."""
        return Split(self.x[indices], self.y[indices])

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, features: list[str], label: str) -> Split:
        """Build a Split from the `features` columns and the `label` column of a data frame.

        Raises KeyError naming the missing columns, and ValueError when the label has
        missing values.
        """
        missing = [column for column in [*features, label] if column not in frame.columns]
        if missing:
            raise KeyError(f"Columns not found in the frame: {missing}.")
        if frame[label].isna().any():
            raise ValueError(f"Label column {label!r} has {int(frame[label].isna().sum())} missing values.")

        x = frame[features].to_numpy(dtype=np.float32, na_value=np.nan)
        y = frame[label].to_numpy(dtype=np.int64)
        return cls(x, y)
