"""Unlearning scores as the field reports them: UA, RA, TA, MIA-efficacy, average gap and output divergences.

UA, RA, TA, MIA-efficacy and the average gap follow Jia et al., "Model Sparsity Can
Simplify Machine Unlearning" (NeurIPS 2023), and Fan et al., "SalUn: Empowering
Machine Unlearning via Gradient-based Weight Saliency" (ICLR 2024). docs/metrics.md
defines each one. All scores here are fractions in [0, 1], not percentages.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.special import log_softmax
from torch import nn

from models.data import Split
from models.evaluation import accuracy, predict_logits
from models.membership import mia_efficacy

logger = logging.getLogger(__name__)

# The scores that the average gap compares.
GAP_SCORES = ("ua", "ra", "ta", "mia_efficacy")


@dataclass(frozen=True)
class UnlearningScores:
    """Unlearning accuracy (1 - forget accuracy), retain accuracy, test accuracy and MIA-efficacy."""

    ua: float
    ra: float
    ta: float
    mia_efficacy: float

    def as_dict(self) -> dict[str, float]:
        """Return the scores by name."""
        return asdict(self)


def unlearning_scores(
    model: nn.Module,
    forget: Split,
    retain: Split,
    test: Split,
    device: torch.device,
    mia_feature: str = "confidence",
    seed: int = 0,
) -> UnlearningScores:
    """Score a model on its forget, retain and test rows. An empty forget set gives NaN UA and MIA-efficacy."""
    return UnlearningScores(
        ua=1.0 - accuracy(model, forget, device),
        ra=accuracy(model, retain, device),
        ta=accuracy(model, test, device),
        mia_efficacy=mia_efficacy(model, forget, retain, test, device, feature=mia_feature, seed=seed),
    )


def average_gap(scores: UnlearningScores, reference: UnlearningScores) -> float:
    """Return the mean absolute difference over UA, RA, TA and MIA-efficacy from a retrained reference.

    0 means the scores equal the reference's. The result is a fraction, so 0.012 is
    the 1.2 (percentage points) of SalUn's tables.
    """
    differences = [abs(getattr(scores, name) - getattr(reference, name)) for name in GAP_SCORES]
    return float(np.mean(differences))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Return KL(p || q) in nats for each row, where p and q are the softmax of the given logits."""
    log_p = log_softmax(np.asarray(p_logits, dtype=np.float64), axis=1)
    log_q = log_softmax(np.asarray(q_logits, dtype=np.float64), axis=1)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def js_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Return the Jensen-Shannon divergence in nats for each row: the mean KL of p and q to their average, at most log 2."""
    p = np.exp(log_softmax(np.asarray(p_logits, dtype=np.float64), axis=1))
    q = np.exp(log_softmax(np.asarray(q_logits, dtype=np.float64), axis=1))
    middle = 0.5 * (p + q)

    def kl_to_middle(distribution: np.ndarray) -> np.ndarray:
        # 0 * log(0 / m) is 0, so rows with a zero probability need no special case beyond the mask.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(distribution > 0.0, distribution * np.log(distribution / middle), 0.0)
        return terms.sum(axis=1)

    return 0.5 * (kl_to_middle(p) + kl_to_middle(q))


@dataclass(frozen=True)
class OutputDivergence:
    """Mean KL(reference || model) and mean JS divergence of the two models' output distributions over a split, in nats."""

    kl: float
    js: float


def output_divergence(model: nn.Module, reference: nn.Module, split: Split, device: torch.device) -> OutputDivergence:
    """Compare a model's softmax outputs with a retrained reference's on `split`. An empty split gives NaN."""
    if len(split) == 0:
        return OutputDivergence(kl=float("nan"), js=float("nan"))
    model_logits = predict_logits(model, split.x, device)
    reference_logits = predict_logits(reference, split.x, device)
    return OutputDivergence(
        kl=float(kl_divergence(reference_logits, model_logits).mean()),
        js=float(js_divergence(reference_logits, model_logits).mean()),
    )
