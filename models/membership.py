"""Confidence-based membership inference, and MIA-efficacy of the forget set.

The protocol is SalUn's (Fan et al., "SalUn: Empowering Machine Unlearning via
Gradient-based Weight Saliency", ICLR 2024), taken from Jia et al., "Model Sparsity
Can Simplify Machine Unlearning" (NeurIPS 2023). A classifier learns to tell retained
rows (members) from test rows (non-members) by one feature of the model's output.
MIA-efficacy is the fraction of forget rows it labels non-members, so higher is
better for unlearning.

Their released code fits scikit-learn's RBF SVC (C=3, gamma="auto") on the feature.
This module uses logistic regression on the standardised feature instead, because
`models` depends on torch, numpy and scipy only. On a one-dimensional feature both
draw a threshold between members and non-members. They can differ where the RBF
boundary is not monotone, so numbers are comparable with SalUn's tables only roughly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit, log_softmax
from torch import nn

from models.data import Split
from models.evaluation import predict_logits

logger = logging.getLogger(__name__)

ATTACK_FEATURES = ("confidence", "entropy", "modified_entropy", "correctness")

# A small L2 penalty keeps the logistic fit finite when members and non-members are separable.
RIDGE = 1e-6


def attack_feature(logits: np.ndarray, labels: np.ndarray, feature: str) -> np.ndarray:
    """Compute one attack feature per row from the logits (n, classes) and true labels.

    "confidence" is the softmax probability of the true class, "entropy" the
    Shannon entropy of the softmax (nats), "modified_entropy" the label-aware entropy
    of Song and Mittal, "Systematic Evaluation of Privacy Risks of Machine Learning
    Models" (USENIX Security 2021), and "correctness" is 1 when the arg-max class is
    the label. Raises ValueError for any other name.
    """
    log_probabilities = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    probabilities = np.exp(log_probabilities)
    rows = np.arange(len(labels))
    if feature == "confidence":
        return probabilities[rows, labels]
    if feature == "entropy":
        return -(probabilities * log_probabilities).sum(axis=1)
    if feature == "modified_entropy":
        # -(1 - p_y) log p_y - sum_{j != y} p_j log(1 - p_j), with log(1 - p) from log1p for accuracy near p = 1.
        log_complement = np.log1p(-np.clip(probabilities, 0.0, 1.0 - 1e-15))
        terms = -probabilities * log_complement
        terms[rows, labels] = -(1.0 - probabilities[rows, labels]) * log_probabilities[rows, labels]
        return terms.sum(axis=1)
    if feature == "correctness":
        return (np.argmax(log_probabilities, axis=1) == labels).astype(np.float64)
    raise ValueError(f"Unknown attack feature {feature!r}. Valid features: {', '.join(ATTACK_FEATURES)}.")


@dataclass(frozen=True)
class ThresholdAttack:
    """A fitted logistic regression on one standardised feature: member when w * z + b > 0."""

    mean: float
    std: float
    weight: float
    bias: float

    def predict_member(self, values: np.ndarray) -> np.ndarray:
        """Return True for each value the attack labels a member."""
        z = (np.asarray(values, dtype=np.float64) - self.mean) / self.std
        return self.weight * z + self.bias > 0.0


def fit_attack(member_values: np.ndarray, nonmember_values: np.ndarray, iterations: int = 50) -> ThresholdAttack:
    """Fit logistic regression of membership on one feature by Newton's method.

    Raises ValueError when either set is empty.
    """
    members = np.asarray(member_values, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_values, dtype=np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError(f"The attack needs rows of both kinds, got {members.size} members and {nonmembers.size} non-members.")

    values = np.concatenate([members, nonmembers])
    targets = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    mean = float(values.mean())
    std = float(values.std()) or 1.0
    design = np.stack([(values - mean) / std, np.ones_like(values)], axis=1)

    coefficients = np.zeros(2)
    for _ in range(iterations):
        probabilities = expit(design @ coefficients)
        gradient = design.T @ (probabilities - targets) + RIDGE * coefficients
        hessian = design.T @ (design * (probabilities * (1.0 - probabilities))[:, None]) + RIDGE * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        coefficients -= step
        if np.abs(step).max() < 1e-10:
            break
    return ThresholdAttack(mean=mean, std=std, weight=float(coefficients[0]), bias=float(coefficients[1]))


def mia_efficacy(
    model: nn.Module,
    forget: Split,
    retain: Split,
    test: Split,
    device: torch.device,
    feature: str = "confidence",
    seed: int = 0,
) -> float:
    """Return the fraction of forget rows that a confidence attack labels non-members.

    The attack trains on all of `test` (non-members) against as many retained rows
    (members), drawn without replacement with `seed`, or all of `retain` when it is
    smaller. SalUn's evaluation takes the first rows of its retain set instead.
    Returns NaN for an empty forget set.
    """
    if len(forget) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    n_members = min(len(retain), len(test))
    members = retain.take(np.sort(rng.choice(len(retain), size=n_members, replace=False)))

    def values(split: Split) -> np.ndarray:
        return attack_feature(predict_logits(model, split.x, device), split.y, feature)

    attack = fit_attack(values(members), values(test))
    return float(1.0 - attack.predict_member(values(forget)).mean())
