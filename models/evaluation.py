"""Accuracy, per-row loss and the evidence that a model has forgotten a set of rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import mannwhitneyu
from torch import nn
from torch.nn import functional as F

from models.data import Split

# Rows per forward pass, to bound memory on large inputs.
PREDICT_BATCH_ROWS = 65_536


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
    """Return the model's logits for raw features `x` as a float32 array of shape (n, 2).

    The model is moved to `device` (in place, as `nn.Module.to` does) and run in
    eval mode. Its previous train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.to(device)
    model.eval()

    # torch.tensor copies, so a read-only array from pandas raises no warning.
    x_tensor = torch.tensor(np.asarray(x, dtype=np.float32))
    chunks = [model(chunk.to(device)).cpu() for chunk in torch.split(x_tensor, PREDICT_BATCH_ROWS)]

    model.train(was_training)
    if not chunks:
        return np.zeros((0, 2), dtype=np.float32)
    return torch.cat(chunks).numpy()


def accuracy(model: nn.Module, split: Split, device: torch.device) -> float:
    """Return the fraction of rows whose arg-max class equals the label, or NaN for an empty split."""
    if len(split) == 0:
        return float("nan")
    predicted = predict_logits(model, split.x, device).argmax(axis=1)
    return float(np.mean(predicted == split.y))


def per_example_loss(model: nn.Module, split: Split, device: torch.device) -> np.ndarray:
    """Return the cross-entropy of each row as a float64 array of shape (n,)."""
    logits = torch.tensor(predict_logits(model, split.x, device), dtype=torch.float64)
    labels = torch.tensor(split.y, dtype=torch.int64)
    return F.cross_entropy(logits, labels, reduction="none").numpy()


def mia_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """Return the AUC of a loss-threshold membership-inference attack.

    The AUC is the probability that a random member row has a lower loss than a
    random non-member row, with ties counted as 1/2. 0.5 means the attack cannot
    tell the two sets apart, and values above 0.5 mean members look like training data.
    Raises ValueError on an empty input or a NaN loss.
    """
    members = np.asarray(member_losses, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_losses, dtype=np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError(f"mia_auc needs losses in both sets, got {members.size} members and {nonmembers.size} non-members.")
    if np.isnan(members).any() or np.isnan(nonmembers).any():
        raise ValueError("The losses contain NaN, so mia_auc cannot rank them. Check the model's outputs.")

    # SciPy's U for the first sample counts the pairs where it is greater, plus half the ties.
    u_statistic = mannwhitneyu(nonmembers, members, alternative="two-sided").statistic
    return float(u_statistic / (members.size * nonmembers.size))


@dataclass(frozen=True)
class ForgettingEvidence:
    """How much a model still treats the forget set as training data, compared with held-out rows.

    Each z is a difference divided by its sampling error under the hypothesis that
    the forget set is held-out data of the same size. A positive z means the model
    fits the forget set better than held-out data, as it does for rows it was trained on.
    """

    n_forget: int
    forget_accuracy: float
    heldout_accuracy: float
    accuracy_se: float
    accuracy_z: float
    mia_auc: float
    mia_auc_se: float
    mia_z: float


def forgetting_evidence(model: nn.Module, forget: Split, heldout: Split, device: torch.device) -> ForgettingEvidence:
    """Compare the model's accuracy and losses on the forget set with those on held-out rows.

    accuracy_se = sqrt(p (1 - p) / n_forget), with p the held-out accuracy, is the
    sampling error of the accuracy of n_forget held-out rows. mia_auc_se =
    sqrt((n_forget + n_heldout + 1) / (12 n_forget n_heldout)) is the standard error
    of the Mann-Whitney AUC when both sets come from one distribution.

    NOTE: an empty forget set gives NaN accuracy, AUC and standard errors with both
    z set to 0, so a gate on z passes it. When p is 0 or 1, p is moved half a row
    inside the interval (to 0.5 / n_heldout or 1 - 0.5 / n_heldout) so that the
    standard error stays positive. The AUC standard error ignores the tie correction,
    which is negligible for continuous losses.

    NOTE: both standard errors treat rows as independent. Rows of one subject are
    correlated, so for forget sets of whole subjects z spreads wider than a standard
    normal. bench/gate_calibration.py measures the spread for exact retrains.
    """
    if len(heldout) == 0:
        raise ValueError("The held-out split is empty, so there is nothing to compare the forget set with.")

    heldout_accuracy = accuracy(model, heldout, device)
    n_forget = len(forget)
    n_heldout = len(heldout)
    if n_forget == 0:
        return ForgettingEvidence(
            n_forget=0,
            forget_accuracy=float("nan"),
            heldout_accuracy=heldout_accuracy,
            accuracy_se=float("nan"),
            accuracy_z=0.0,
            mia_auc=float("nan"),
            mia_auc_se=float("nan"),
            mia_z=0.0,
        )

    forget_accuracy = accuracy(model, forget, device)
    half_row = 0.5 / n_heldout
    p = min(max(heldout_accuracy, half_row), 1.0 - half_row)
    accuracy_se = math.sqrt(p * (1.0 - p) / n_forget)
    accuracy_z = (forget_accuracy - heldout_accuracy) / accuracy_se

    auc = mia_auc(per_example_loss(model, forget, device), per_example_loss(model, heldout, device))
    mia_auc_se = math.sqrt((n_forget + n_heldout + 1) / (12.0 * n_forget * n_heldout))
    mia_z = (auc - 0.5) / mia_auc_se

    return ForgettingEvidence(
        n_forget=n_forget,
        forget_accuracy=forget_accuracy,
        heldout_accuracy=heldout_accuracy,
        accuracy_se=accuracy_se,
        accuracy_z=accuracy_z,
        mia_auc=auc,
        mia_auc_se=mia_auc_se,
        mia_z=mia_z,
    )
