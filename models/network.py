"""The tabular classifier, with its feature scaling stored inside the module."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

N_CLASSES = 2


class TabularMLP(nn.Module):
    """Multilayer perceptron for binary classification of raw tabular features.

    Standardization is part of the module, in the buffers `feature_mean` and
    `feature_std`, so a saved model carries its preprocessing. Call `fit_scaler` on
    the training features before training. The class is defined at module level so
    that pickle, which MLflow uses to save the model, can import it.
    """

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (64, 32), dropout: float = 0.1) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be at least 1, got {n_features}.")
        if any(width < 1 for width in hidden):
            raise ValueError(f"Every hidden layer width must be at least 1, got {hidden}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")

        self.n_features = n_features
        self.hidden = tuple(hidden)
        self.dropout = dropout

        # Identity scaling until fit_scaler runs.
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))

        layers: list[nn.Module] = []
        width_in = n_features
        for width in self.hidden:
            layers += [nn.Linear(width_in, width), nn.ReLU(), nn.Dropout(dropout)]
            width_in = width
        layers.append(nn.Linear(width_in, N_CLASSES))
        self.layers = nn.Sequential(*layers)

    def fit_scaler(self, x: np.ndarray) -> None:
        """Set `feature_mean` and `feature_std` from training features, ignoring NaN.

        A column with zero spread gets std 1 so it does not divide by zero. A column
        that is entirely NaN gets mean 0 and std 1, which the forward pass maps to 0.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"fit_scaler expects shape (n, {self.n_features}), got {x.shape}.")
        if len(x) == 0:
            raise ValueError("fit_scaler needs at least one row.")

        observed = ~np.isnan(x)
        counts = observed.sum(axis=0)
        filled = np.where(observed, x, 0.0)

        # Computed by hand rather than with np.nanmean so an all-NaN column raises no warning.
        mean = np.divide(filled.sum(axis=0), counts, out=np.zeros(self.n_features), where=counts > 0)
        squared = np.where(observed, (x - mean) ** 2, 0.0)
        std = np.sqrt(np.divide(squared.sum(axis=0), counts, out=np.zeros(self.n_features), where=counts > 0))
        std[std == 0.0] = 1.0

        self.feature_mean.copy_(torch.as_tensor(mean, dtype=self.feature_mean.dtype))
        self.feature_std.copy_(torch.as_tensor(std, dtype=self.feature_std.dtype))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Scale raw features with the fitted mean and std, and replace NaN with 0 (the training mean)."""
        z = (x.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        return torch.where(torch.isnan(z), torch.zeros_like(z), z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape (N, 2) for raw features of shape (N, n_features)."""
        return self.layers(self.standardize(x))
