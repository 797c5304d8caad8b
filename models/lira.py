"""Per-example likelihood-ratio membership attack (LiRA) with shadow models.

Source: Carlini, Chien, Nasr, Song, Terzis and Tramer, "Membership Inference Attacks
From First Principles", IEEE Symposium on Security and Privacy 2022.

K shadow models train on random halves of a population of rows, each row in exactly
half of them. For each row, the attack collects the logit-scaled confidence
phi = log p_y - log(1 - p_y) of the shadows that trained on it (IN) and of those that
did not (OUT), and fits a Gaussian to each. The online attack scores a target model's
phi by the log likelihood ratio of the IN and OUT Gaussians. The offline attack uses
only the OUT Gaussian and scores by its CDF at phi (a one-sided test: a higher phi
than OUT models give means member). With few shadows the per-row variances are
noisy. So by default each of the IN and OUT Gaussians takes one standard deviation
pooled over all rows, from each row's deviations from its own median, which is
Carlini et al.'s "fixed variance". Their released code takes the plain standard
deviation of all IN values instead. Means are per-row medians, as in that code.
Higher scores mean "member".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import norm, rankdata
from torch import nn

from models.data import Split
from models.evaluation import predict_logits

logger = logging.getLogger(__name__)

# Trains a shadow model on a Split with the given seed.
TrainShadow = Callable[[Split, int], nn.Module]

# Floor of the fitted standard deviations, so a row whose shadows agree exactly does not divide by zero.
MIN_STD = 1e-6


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return phi = log p_y - log(sum of the other classes' p) per row, computed stably from logits."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))
    true_logit = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return true_logit - logsumexp(others, axis=1)


@dataclass(frozen=True)
class ShadowModels:
    """The logit-scaled confidence of K shadow models on a population, and which rows each trained on.

    `confidences` and `membership` have shape (K, n). Only these are kept, not the
    models, so the same shadows can score any number of target models.
    """

    confidences: np.ndarray
    membership: np.ndarray

    @property
    def n_shadows(self) -> int:
        """Number of shadow models K."""
        return self.confidences.shape[0]


def balanced_membership(n_rows: int, n_shadows: int, seed: int) -> np.ndarray:
    """Draw a (K, n) membership matrix in which every row is IN for exactly K // 2 shadows."""
    rng = np.random.default_rng(seed)
    ranks = rng.random((n_shadows, n_rows)).argsort(axis=0)
    return ranks < n_shadows // 2


def train_shadow_models(
    population: Split, train_shadow: TrainShadow, n_shadows: int, device: torch.device, seed: int = 0
) -> ShadowModels:
    """Train `n_shadows` shadow models on random halves of `population` and record their confidences on all of it.

    `train_shadow(split, seed)` must train a fresh model, the same recipe as the
    target's. Raises ValueError when n_shadows is below 2, because the attack needs
    IN and OUT models for every row.
    """
    if n_shadows < 2:
        raise ValueError(f"n_shadows must be at least 2, so every row has IN and OUT shadows, got {n_shadows}.")
    started = time.perf_counter()
    membership = balanced_membership(len(population), n_shadows, seed)
    confidences = np.empty((n_shadows, len(population)))
    for index in range(n_shadows):
        shadow = train_shadow(population.take(membership[index]), seed * 1000 + index)
        confidences[index] = logit_confidence(predict_logits(shadow, population.x, device), population.y)
    logger.info("Trained %d LiRA shadow models on %d rows in %.1f s.", n_shadows, len(population), time.perf_counter() - started)
    return ShadowModels(confidences=confidences, membership=membership)


def lira_scores(
    target: nn.Module,
    population: Split,
    shadows: ShadowModels,
    device: torch.device,
    online: bool = True,
    fixed_variance: bool = True,
) -> np.ndarray:
    """Return one membership score per population row for the target model (higher means member)."""
    if shadows.confidences.shape[1] != len(population):
        raise ValueError(f"The shadows cover {shadows.confidences.shape[1]} rows, but the population has {len(population)}.")
    observed = logit_confidence(predict_logits(target, population.x, device), population.y)

    inside = np.where(shadows.membership, shadows.confidences, np.nan)
    outside = np.where(shadows.membership, np.nan, shadows.confidences)
    mean_out = np.nanmedian(outside, axis=0)
    std_out = _spread(outside, fixed_variance)
    if not online:
        return norm.logcdf(observed, loc=mean_out, scale=std_out)

    mean_in = np.nanmedian(inside, axis=0)
    std_in = _spread(inside, fixed_variance)
    return norm.logpdf(observed, loc=mean_in, scale=std_in) - norm.logpdf(observed, loc=mean_out, scale=std_out)


def _spread(values: np.ndarray, fixed_variance: bool) -> np.ndarray | float:
    # The fixed variance is the spread of each row's values around its own median, pooled over all rows.
    if fixed_variance:
        centred = values - np.nanmedian(values, axis=0)
        return max(float(np.sqrt(np.nanmean(centred**2))), MIN_STD)
    return np.maximum(np.nanstd(values, axis=0), MIN_STD)


def attack_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Return the probability that a member outscores a non-member (ties count 1/2): the attack's ROC AUC."""
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError(f"attack_auc needs scores of both kinds, got {members.size} members and {nonmembers.size} non-members.")
    ranks = rankdata(np.concatenate([members, nonmembers]))
    member_rank_sum = ranks[: members.size].sum()
    return float((member_rank_sum - members.size * (members.size + 1) / 2.0) / (members.size * nonmembers.size))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = 0.01) -> float:
    """Return the fraction of members scored above the threshold that flags `fpr` of the non-members.

    Carlini et al. argue for this low-FPR view over AUC. The threshold is the
    (1 - fpr) quantile of the non-member scores, so with few non-members the FPR is approximate.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}.")
    threshold = np.quantile(np.asarray(nonmember_scores, dtype=np.float64), 1.0 - fpr)
    return float(np.mean(np.asarray(member_scores, dtype=np.float64) > threshold))
