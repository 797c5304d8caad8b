"""Unlearning metrics on constructed cases: UA/RA/TA, MIA-efficacy, average gap, divergences and LiRA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.data import Split
from models.lira import (
    attack_auc,
    balanced_membership,
    lira_scores,
    logit_confidence,
    tpr_at_fpr,
    train_shadow_models,
)
from models.membership import ATTACK_FEATURES, attack_feature, fit_attack, mia_efficacy
from models.metrics import (
    UnlearningScores,
    average_gap,
    js_divergence,
    kl_divergence,
    output_divergence,
    unlearning_scores,
)
from models.network import TabularMLP
from models.training import TrainConfig, train_mlp

CPU = torch.device("cpu")


def linear_model(scale: float = 1.0) -> TabularMLP:
    """Return a model whose logits are (0, scale * x0), so P(class 1) = sigmoid(scale * x0)."""
    model = TabularMLP(2, hidden=())
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.tensor([[0.0, 0.0], [scale, 0.0]]))
        model.layers[0].bias.zero_()
    return model.eval()


def rows(x0: list[float], labels: list[int]) -> Split:
    x = np.stack([np.array(x0, dtype=np.float64), np.zeros(len(x0))], axis=1)
    return Split(x, np.array(labels))


# UA, RA, TA and the average gap


def test_scores_from_accuracies() -> None:
    model = linear_model()
    # The model predicts class 1 exactly when x0 > 0.
    forget = rows([1.0, 2.0, -1.0, -2.0], [1, 0, 0, 1])  # 2 of 4 right
    retain = rows([1.0, 2.0, 3.0, -1.0, -2.0], [1, 1, 1, 0, 0])  # all right
    test = rows([1.0, -1.0, 2.0, -2.0, 3.0], [1, 0, 0, 0, 0])  # 3 of 5 right

    scores = unlearning_scores(model, forget, retain, test, CPU)

    assert scores.ua == pytest.approx(0.5)
    assert scores.ra == pytest.approx(1.0)
    assert scores.ta == pytest.approx(0.6)
    assert 0.0 <= scores.mia_efficacy <= 1.0


def test_scores_empty_forget() -> None:
    model = linear_model()
    retain = rows([1.0, -1.0], [1, 0])
    scores = unlearning_scores(model, retain.take(np.array([], dtype=np.int64)), retain, retain, CPU)
    assert math.isnan(scores.ua)
    assert math.isnan(scores.mia_efficacy)


def test_average_gap_mean_absolute_difference() -> None:
    scores = UnlearningScores(ua=0.10, ra=0.90, ta=0.80, mia_efficacy=0.30)
    reference = UnlearningScores(ua=0.20, ra=0.95, ta=0.80, mia_efficacy=0.10)
    assert average_gap(scores, reference) == pytest.approx((0.10 + 0.05 + 0.0 + 0.20) / 4)
    assert average_gap(reference, reference) == 0.0


# Divergences


def test_kl_closed_form() -> None:
    # p = (0.5, 0.5) and q = (0.9, 0.1) from logits (0, 0) and (log 9, 0).
    p = np.array([[0.0, 0.0]])
    q = np.array([[math.log(9.0), 0.0]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q)[0] == pytest.approx(expected)
    assert kl_divergence(p, p)[0] == pytest.approx(0.0, abs=1e-12)


def test_js_symmetric_and_bounded() -> None:
    p = np.array([[0.0, 0.0], [60.0, -60.0]])
    q = np.array([[math.log(9.0), 0.0], [-60.0, 60.0]])
    forward, backward = js_divergence(p, q), js_divergence(q, p)
    assert forward == pytest.approx(backward)
    # Nearly disjoint outputs reach the maximum, log 2 nats.
    assert forward[1] == pytest.approx(math.log(2.0), abs=1e-9)
    middle = np.array([0.7, 0.3])
    expected = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
    assert middle.sum() == pytest.approx(1.0)
    assert forward[0] == pytest.approx(expected)


def test_output_divergence_same_model_zero() -> None:
    model = linear_model()
    split = rows([0.5, -2.0, 3.0], [1, 0, 1])
    divergence = output_divergence(model, linear_model(), split, CPU)
    assert divergence.kl == pytest.approx(0.0, abs=1e-12)
    assert divergence.js == pytest.approx(0.0, abs=1e-12)


def test_output_divergence_direction() -> None:
    split = rows([1.0], [1])
    divergence = output_divergence(linear_model(scale=math.log(9.0)), linear_model(scale=0.0), split, CPU)
    # The reference (scale 0) outputs (0.5, 0.5) and the model (0.1, 0.9), so KL(reference || model) is:
    assert divergence.kl == pytest.approx(0.5 * math.log(0.5 / 0.1) + 0.5 * math.log(0.5 / 0.9))


# Attack features and MIA-efficacy


def test_attack_features_closed_form() -> None:
    logits = np.array([[0.0, math.log(3.0)]])  # probabilities (0.25, 0.75)
    label = np.array([1])
    assert attack_feature(logits, label, "confidence")[0] == pytest.approx(0.75)
    assert attack_feature(logits, label, "entropy")[0] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # -(1 - p_y) log p_y - p_other log(1 - p_other), with p_y = 0.75 and p_other = 0.25.
    expected_modified = -(0.25 * math.log(0.75)) - 0.25 * math.log(0.75)
    assert attack_feature(logits, label, "modified_entropy")[0] == pytest.approx(expected_modified)
    assert attack_feature(logits, label, "correctness")[0] == 1.0
    assert attack_feature(logits, np.array([0]), "correctness")[0] == 0.0


def test_attack_feature_unknown() -> None:
    with pytest.raises(ValueError, match="Valid features"):
        attack_feature(np.zeros((1, 2)), np.array([0]), "loss")
    assert "confidence" in ATTACK_FEATURES


def test_fit_attack_separable() -> None:
    attack = fit_attack(np.array([0.9, 0.95, 0.99]), np.array([0.5, 0.55, 0.6]))
    assert attack.predict_member(np.array([0.97, 0.52])).tolist() == [True, False]


def test_fit_attack_empty() -> None:
    with pytest.raises(ValueError, match="both kinds"):
        fit_attack(np.array([]), np.array([0.5]))


def test_mia_efficacy_extremes() -> None:
    model = linear_model(scale=3.0)
    # Members are confidently right (x0 far from 0), non-members sit near the boundary (confidence near 0.5).
    retain = rows([2.0, 2.5, 3.0, -2.0, -2.5, -3.0] * 5, [1, 1, 1, 0, 0, 0] * 5)
    test = rows([0.05, -0.05, 0.1, -0.1, 0.0, 0.02] * 5, [1, 0, 1, 0, 1, 0] * 5)
    forget_like_test = rows([0.03, -0.03, 0.08], [1, 0, 1])
    forget_like_retain = rows([2.2, -2.7, 2.9], [1, 0, 1])

    assert mia_efficacy(model, forget_like_test, retain, test, CPU) == 1.0
    assert mia_efficacy(model, forget_like_retain, retain, test, CPU) == 0.0


def test_mia_efficacy_member_subsample() -> None:
    # With more retained rows than test rows, the attack trains on a seeded subsample, so seeds may differ but repeat.
    model = linear_model(scale=3.0)
    rng = np.random.default_rng(0)
    retain = rows(list(rng.normal(0, 2, 200)), list(rng.integers(0, 2, 200)))
    test = rows(list(rng.normal(0, 1, 40)), list(rng.integers(0, 2, 40)))
    forget = rows(list(rng.normal(0, 2, 30)), list(rng.integers(0, 2, 30)))
    assert mia_efficacy(model, forget, retain, test, CPU, seed=3) == mia_efficacy(model, forget, retain, test, CPU, seed=3)


@pytest.mark.parametrize("member_shape", [5.0, 6.0])
def test_attack_agrees_with_svc(member_shape: float) -> None:
    # SalUn's released code uses scikit-learn's RBF SVC; the logistic attack should label most rows alike.
    svm = pytest.importorskip("sklearn.svm")
    rng = np.random.default_rng(0)
    members, nonmembers, targets = rng.beta(member_shape, 2, 2000), rng.beta(4, 2, 2000), rng.beta(4.5, 2, 1000)
    svc = svm.SVC(C=3, gamma="auto", kernel="rbf").fit(
        np.concatenate([members, nonmembers])[:, None], np.r_[np.ones(2000), np.zeros(2000)]
    )
    attack = fit_attack(members, nonmembers)
    agreement = np.mean(svc.predict(targets[:, None]).astype(bool) == attack.predict_member(targets))
    assert agreement >= 0.8


# LiRA


def test_logit_confidence_two_classes() -> None:
    logits = np.array([[0.5, 2.0], [1.0, -1.0]])
    assert logit_confidence(logits, np.array([1, 1])).tolist() == pytest.approx([1.5, -2.0])


def test_logit_confidence_matches_probabilities() -> None:
    logits = np.array([[0.2, 1.0, -0.5]])
    p = np.exp(logits) / np.exp(logits).sum()
    assert logit_confidence(logits, np.array([1]))[0] == pytest.approx(math.log(p[0, 1] / (1 - p[0, 1])))


def test_balanced_membership_each_row_half() -> None:
    membership = balanced_membership(n_rows=50, n_shadows=6, seed=1)
    assert membership.shape == (6, 50)
    assert (membership.sum(axis=0) == 3).all()


def test_attack_auc_and_tpr() -> None:
    assert attack_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert attack_auc(np.array([1.0]), np.array([1.0])) == 0.5
    nonmembers = np.arange(100, dtype=float)
    assert tpr_at_fpr(np.array([200.0, 50.0]), nonmembers, fpr=0.01) == 0.5


@pytest.fixture(scope="module")
def lira_case() -> dict:
    """Train a target that memorises half of a noisy 120-row population, and 8 shadows of the same recipe."""
    rng = np.random.default_rng(50)
    x = rng.normal(size=(120, 4))
    y = ((x[:, 0] + rng.normal(scale=1.0, size=120)) > 0).astype(np.int64)
    population = Split(x, y)
    config = TrainConfig(hidden=(64, 64), dropout=0.0, lr=1e-2, weight_decay=0.0, batch_size=32, max_epochs=80, patience=80)

    def train_shadow(split: Split, seed: int) -> TabularMLP:
        model, _ = train_mlp(split, split, TrainConfig(**{**config.__dict__, "seed": seed}), CPU)
        return model

    is_member = np.zeros(120, dtype=bool)
    is_member[rng.choice(120, 60, replace=False)] = True
    target = train_shadow(population.take(is_member), 999)
    shadows = train_shadow_models(population, train_shadow, n_shadows=8, device=CPU, seed=0)
    return {"population": population, "target": target, "is_member": is_member, "shadows": shadows}


@pytest.mark.parametrize("online", [True, False])
def test_lira_detects_members(lira_case: dict, online: bool) -> None:
    # The target fits its 60 rows exactly. On this problem the loss-threshold attack reaches an
    # AUC of about 0.61 and LiRA with 8 shadows about 0.68, so 0.6 leaves room for seeds.
    case = lira_case
    scores = lira_scores(case["target"], case["population"], case["shadows"], CPU, online=online)
    assert np.isfinite(scores).all()
    assert attack_auc(scores[case["is_member"]], scores[~case["is_member"]]) > 0.6


def test_lira_per_row_variance(lira_case: dict) -> None:
    case = lira_case
    scores = lira_scores(case["target"], case["population"], case["shadows"], CPU, fixed_variance=False)
    assert scores.shape == (120,)
    assert np.isfinite(scores).all()


def test_lira_needs_two_shadows(lira_case: dict) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        train_shadow_models(lira_case["population"], lambda split, seed: None, n_shadows=1, device=CPU)


def test_lira_population_mismatch(lira_case: dict) -> None:
    case = lira_case
    with pytest.raises(ValueError, match="population has 10"):
        lira_scores(case["target"], case["population"].take(np.arange(10)), case["shadows"], CPU)
