"""Accuracy, per-row loss and the evidence that a model has forgotten a set of rows."""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import mannwhitneyu, norm, rankdata
from torch import nn
from torch.nn import functional as F

from models.data import Split

logger = logging.getLogger(__name__)

# Rows per forward pass, to bound memory on large inputs.
PREDICT_BATCH_ROWS = 65_536

# Draws of the subject-resampling null when the caller passes none.
DEFAULT_NULL_DRAWS = 500

# The z reported when the null has zero spread and the observed value differs from it.
# A finite number keeps gate comparisons and metric logging working.
Z_LIMIT = 1e6


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
    return _cross_entropy(predict_logits(model, split.x, device), split.y)


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits_tensor = torch.tensor(logits, dtype=torch.float64)
    labels_tensor = torch.tensor(labels, dtype=torch.int64)
    return F.cross_entropy(logits_tensor, labels_tensor, reduction="none").numpy()


def loss_and_correctness(model: nn.Module, split: Split, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Return the cross-entropy (float64) and the correctness (bool) of each row, from one forward pass."""
    logits = predict_logits(model, split.x, device)
    return _cross_entropy(logits, split.y), logits.argmax(axis=1) == split.y


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
class SubjectNull:
    """Accuracy and loss AUC of random held-out subject sets, one value per draw.

    `with_replacement` is True when the held-out split had too few subjects to draw
    the sets without replacement.
    """

    accuracy: np.ndarray
    auc: np.ndarray
    with_replacement: bool


def encode_groups(groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Map subject ids to codes 0..n_subjects-1 and return (codes, n_subjects).

    Ids of any hashable type work. Ids that numpy can sort get sorted codes, and other
    ids get codes in order of first appearance.
    """
    ids = np.asarray(groups)
    if ids.ndim != 1:
        raise ValueError(f"Subject ids must be a 1-D array with one id per row, got shape {ids.shape}.")
    try:
        unique_ids, codes = np.unique(ids, return_inverse=True)
        return codes.astype(np.int64), len(unique_ids)
    except TypeError:
        # np.unique sorts, which fails on ids of mixed or unorderable types.
        code_of: dict[Hashable, int] = {}
        codes = np.fromiter((code_of.setdefault(subject, len(code_of)) for subject in ids.tolist()), dtype=np.int64, count=len(ids))
        return codes, len(code_of)


def subject_resampling_null(
    losses: np.ndarray,
    correct: np.ndarray,
    groups: np.ndarray,
    n_subjects: int,
    draws: int = DEFAULT_NULL_DRAWS,
    seed: int = 0,
) -> SubjectNull:
    """Draw the null distribution of forget-set accuracy and AUC from held-out subjects.

    `losses`, `correct` and `groups` describe the held-out rows. Each draw picks
    `n_subjects` held-out subjects without replacement and returns the accuracy over
    their rows and the loss AUC (as `mia_auc` defines it) of their rows against the
    remaining held-out rows. The draws come from numpy's default Generator seeded
    with `seed`, so equal inputs give equal results.

    With n_subjects or fewer held-out subjects, sampling without replacement would
    leave no rows to compare with, so the draws sample subjects with replacement and
    weight each row by how often its subject was drawn. A draw that picks every
    held-out subject is dropped, so `accuracy` and `auc` may then hold fewer than
    `draws` values. Raises ValueError when fewer than two draws remain.
    """
    losses = np.asarray(losses, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    codes, n_heldout_subjects = encode_groups(groups)
    if not len(losses) == len(correct) == len(codes):
        raise ValueError(f"losses, correct and groups must have one value per row, got lengths {len(losses)}, {len(correct)} and {len(codes)}.")
    if np.isnan(losses).any():
        raise ValueError("The held-out losses contain NaN, so they cannot be ranked. Check the model's outputs.")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}.")
    if draws < 2:
        raise ValueError(f"draws must be at least 2 to estimate a standard deviation, got {draws}.")
    if n_heldout_subjects < 2:
        raise ValueError(
            f"The held-out rows belong to {n_heldout_subjects} subject(s), but a subject-level null needs at least 2. "
            "Pass more held-out subjects, or no groups to use the analytic standard errors."
        )

    rng = np.random.default_rng(seed)
    if n_heldout_subjects > n_subjects:
        return _null_without_replacement(losses, correct, codes, n_heldout_subjects, n_subjects, draws, rng)

    # NOTE: with replacement, the drawn sets repeat subjects and leave fewer rows to
    # compare with, so this null is only an approximation of a forget set drawn from
    # a larger population. Pass more held-out subjects than forget subjects to avoid it.
    logger.warning(
        "The held-out split has %d subjects, not more than the %d forget subjects, so the null samples subjects with replacement.",
        n_heldout_subjects, n_subjects,
    )
    null = _null_with_replacement(losses, correct, codes, n_heldout_subjects, n_subjects, draws, rng)
    if len(null.auc) < 2:
        raise ValueError(
            f"Only {len(null.auc)} of {draws} draws left a held-out subject to compare with, because the held-out split has "
            f"{n_heldout_subjects} subjects for {n_subjects} forget subjects. Pass more held-out subjects, or no groups."
        )
    return null


def _null_without_replacement(
    losses: np.ndarray, correct: np.ndarray, codes: np.ndarray, n_heldout_subjects: int, n_subjects: int, draws: int, rng: np.random.Generator
) -> SubjectNull:
    # Rank all held-out losses once, with ties at their average rank, and sum the ranks
    # per subject. For a drawn set of m rows with rank sum R, the Mann-Whitney statistic
    # U = R - m (m + 1) / 2 counts the pairs in which a drawn row has a higher loss than
    # one of the other n - m rows, ties counting 1/2. Each draw then costs O(n_subjects).
    n_rows = len(losses)
    rows_per_subject = np.bincount(codes, minlength=n_heldout_subjects).astype(np.float64)
    correct_per_subject = np.bincount(codes, weights=correct, minlength=n_heldout_subjects)
    rank_sum_per_subject = np.bincount(codes, weights=rankdata(losses), minlength=n_heldout_subjects)

    chosen = np.stack([rng.choice(n_heldout_subjects, size=n_subjects, replace=False) for _ in range(draws)])
    members = rows_per_subject[chosen].sum(axis=1)
    nonmembers = n_rows - members
    higher_loss_pairs = rank_sum_per_subject[chosen].sum(axis=1) - members * (members + 1.0) / 2.0
    pairs = members * nonmembers
    return SubjectNull(
        accuracy=correct_per_subject[chosen].sum(axis=1) / members,
        auc=(pairs - higher_loss_pairs) / pairs,
        with_replacement=False,
    )


def _null_with_replacement(
    losses: np.ndarray, correct: np.ndarray, codes: np.ndarray, n_heldout_subjects: int, n_subjects: int, draws: int, rng: np.random.Generator
) -> SubjectNull:
    # Repeated subjects break the rank-sum shortcut, so each draw sorts its comparison rows.
    null_accuracy: list[float] = []
    null_auc: list[float] = []
    for _ in range(draws):
        times_drawn = np.bincount(rng.integers(0, n_heldout_subjects, size=n_subjects), minlength=n_heldout_subjects)
        row_weights = times_drawn[codes].astype(np.float64)
        is_member = row_weights > 0
        if is_member.all():
            continue

        member_losses, member_weights = losses[is_member], row_weights[is_member]
        nonmember_losses = np.sort(losses[~is_member])
        lower = np.searchsorted(nonmember_losses, member_losses, side="left")
        upper = np.searchsorted(nonmember_losses, member_losses, side="right")
        # Non-member rows with a higher loss count 1 and ties count 1/2.
        lower_loss_pairs = np.dot(member_weights, len(nonmember_losses) - upper + 0.5 * (upper - lower))

        null_accuracy.append(float(np.dot(member_weights, correct[is_member]) / member_weights.sum()))
        null_auc.append(float(lower_loss_pairs / (member_weights.sum() * len(nonmember_losses))))
    return SubjectNull(accuracy=np.array(null_accuracy), auc=np.array(null_auc), with_replacement=True)


@dataclass(frozen=True)
class ForgettingEvidence:
    """How much a model still treats the forget set as training data, compared with held-out rows.

    Each z is the observed value minus its null mean, divided by the null standard
    deviation, where the null hypothesis is that the forget set is held-out data of
    the same size. A positive z means the model fits the forget set better than
    held-out data, as it does for rows it was trained on. The p-values are one-sided
    in the same direction.

    With `null_draws` 0 the null is analytic: rows are treated as independent, the
    null means are the held-out accuracy and 0.5, and the p-values are normal upper
    tails of z. With `null_draws` > 0 the null comes from that many draws of held-out
    subjects (see `subject_resampling_null`): accuracy_se and mia_auc_se hold the
    null standard deviations, and the p-values are empirical.
    """

    n_forget: int
    forget_accuracy: float
    heldout_accuracy: float
    accuracy_se: float
    accuracy_z: float
    mia_auc: float
    mia_auc_se: float
    mia_z: float
    accuracy_p: float
    mia_p: float
    null_draws: int

    # A property rather than a field, so that every field stays numeric: callers log
    # dataclasses.asdict(evidence) as float metrics.
    @property
    def null_method(self) -> str:
        """Name of the null: "subject_resampling" when it comes from resampled subjects, else "analytic"."""
        return "subject_resampling" if self.null_draws > 0 else "analytic"


def forgetting_evidence(
    model: nn.Module,
    forget: Split,
    heldout: Split,
    device: torch.device,
    forget_groups: np.ndarray | None = None,
    heldout_groups: np.ndarray | None = None,
    draws: int = DEFAULT_NULL_DRAWS,
    seed: int = 0,
) -> ForgettingEvidence:
    """Compare the model's accuracy and losses on the forget set with those on held-out rows.

    The observed values are the forget-set accuracy and the loss AUC (`mia_auc`) of
    the forget rows against all held-out rows. Without groups the null is analytic
    (formulas in `_analytic_evidence`). When `forget_groups` and `heldout_groups`
    give the subject id of every row, the null comes from `draws` random sets of
    held-out subjects, as many as the forget set has, drawn with `seed`
    (`subject_resampling_null`). Pass groups when a forget set is whole subjects with
    several correlated rows each. The analytic standard errors are then too small, so
    z spreads wider than a standard normal: on RAND HIE, bench/gate_calibration.py
    measured standard deviations of 1.1 to 1.7 for exact retrains.

    When the null has zero spread, z is 0 if the observed value equals the null value
    and otherwise ±Z_LIMIT. An empty forget set gives NaN accuracy, AUC and standard
    errors, both z 0, both p-values 1 and null_draws 0, so a gate on z or p passes it.
    Raises ValueError on an empty held-out split, on only one of the two group arrays,
    or on group arrays whose lengths differ from their splits.
    """
    if len(heldout) == 0:
        raise ValueError("The held-out split is empty, so there is nothing to compare the forget set with.")
    if (forget_groups is None) != (heldout_groups is None):
        raise ValueError("Pass both forget_groups and heldout_groups for subject resampling, or neither for the analytic null.")
    if forget_groups is not None and heldout_groups is not None:
        for name, groups, split in (("forget_groups", forget_groups, forget), ("heldout_groups", heldout_groups, heldout)):
            if len(groups) != len(split):
                raise ValueError(f"{name} has {len(groups)} subject ids, but its split has {len(split)} rows.")

    heldout_losses, heldout_correct = loss_and_correctness(model, heldout, device)
    heldout_accuracy = float(np.mean(heldout_correct))
    n_forget = len(forget)
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
            accuracy_p=1.0,
            mia_p=1.0,
            null_draws=0,
        )

    forget_losses, forget_correct = loss_and_correctness(model, forget, device)
    forget_accuracy = float(np.mean(forget_correct))
    auc = mia_auc(forget_losses, heldout_losses)
    if forget_groups is None:
        return _analytic_evidence(n_forget, forget_accuracy, heldout_accuracy, auc, len(heldout))

    _, n_forget_subjects = encode_groups(forget_groups)
    null = subject_resampling_null(heldout_losses, heldout_correct, heldout_groups, n_forget_subjects, draws, seed)
    accuracy_se, accuracy_z, accuracy_p = _compare_with_null(forget_accuracy, null.accuracy)
    mia_auc_se, mia_z, mia_p = _compare_with_null(auc, null.auc)
    return ForgettingEvidence(
        n_forget=n_forget,
        forget_accuracy=forget_accuracy,
        heldout_accuracy=heldout_accuracy,
        accuracy_se=accuracy_se,
        accuracy_z=accuracy_z,
        mia_auc=auc,
        mia_auc_se=mia_auc_se,
        mia_z=mia_z,
        accuracy_p=accuracy_p,
        mia_p=mia_p,
        null_draws=len(null.auc),
    )


def _analytic_evidence(n_forget: int, forget_accuracy: float, heldout_accuracy: float, auc: float, n_heldout: int) -> ForgettingEvidence:
    """Build the evidence from standard errors that treat every row as independent.

    accuracy_se = sqrt(p (1 - p) / n_forget), with p the held-out accuracy, is the
    sampling error of the accuracy of n_forget held-out rows. mia_auc_se =
    sqrt((n_forget + n_heldout + 1) / (12 n_forget n_heldout)) is the standard error
    of the Mann-Whitney AUC when both sets come from one distribution.

    NOTE: when p is 0 or 1, p is moved half a row inside the interval (to
    0.5 / n_heldout or 1 - 0.5 / n_heldout) so that the standard error stays positive.
    The AUC standard error ignores the tie correction, which is negligible for
    continuous losses. Rows of one subject are correlated, so for forget sets of whole
    subjects z spreads wider than a standard normal. Pass groups to forgetting_evidence
    for a null that accounts for this.
    """
    half_row = 0.5 / n_heldout
    p = min(max(heldout_accuracy, half_row), 1.0 - half_row)
    accuracy_se = math.sqrt(p * (1.0 - p) / n_forget)
    accuracy_z = (forget_accuracy - heldout_accuracy) / accuracy_se

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
        accuracy_p=float(norm.sf(accuracy_z)),
        mia_p=float(norm.sf(mia_z)),
        null_draws=0,
    )


def _compare_with_null(observed: float, null: np.ndarray) -> tuple[float, float, float]:
    """Return the null standard deviation, the z of `observed` and its one-sided empirical p-value.

    p = (1 + #{null >= observed}) / (1 + draws), which never reaches 0. Null values
    within 1e-12 of the observed value count as ties, and ties count as at least as
    extreme, so rounding cannot make p smaller.
    """
    p_value = (1.0 + np.count_nonzero(null >= observed - 1e-12)) / (1.0 + len(null))

    # A constant null gets a spread of exactly 0, which np.std can miss by a rounding error.
    if null.min() == null.max():
        difference = observed - null[0]
        z = 0.0 if abs(difference) <= 1e-12 else math.copysign(Z_LIMIT, difference)
        return 0.0, z, float(p_value)

    spread = float(np.std(null, ddof=1))
    return spread, float((observed - null.mean()) / spread), float(p_value)
