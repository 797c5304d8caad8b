"""Tests of the models package on small synthetic problems, plus one smoke test on RAND HIE."""

from __future__ import annotations

import copy
import itertools
import logging
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import norm

from models.data import Split
from models.device import pick_device, seed_everything
from models.evaluation import (
    Z_LIMIT,
    accuracy,
    encode_groups,
    forgetting_evidence,
    mia_auc,
    per_example_loss,
    predict_logits,
    subject_resampling_null,
)
from models.network import TabularMLP
from models.training import TrainConfig, train_mlp
from models.unlearning import METHODS, get_method, method_spec

CPU = torch.device("cpu")
N_FEATURES = 5

# Up to 300 epochs without dropout or weight decay. Tests that need a memorising model
# also pass the training rows as the validation split, so early stopping never cuts in.
MEMORISE = TrainConfig(hidden=(128, 128), dropout=0.0, lr=3e-3, weight_decay=0.0, batch_size=64, max_epochs=300, patience=300)


def make_split(n_rows: int, seed: int, shift: float = 0.0, random_labels: bool = False) -> Split:
    """Build a learnable problem with features on different scales and 10% NaN in column 2."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, N_FEATURES)) * np.array([1.0, 10.0, 0.1, 100.0, 1.0]) + shift
    logit = x[:, 0] + 0.2 * x[:, 1]
    y = (logit > shift * 1.2).astype(np.int64)
    if random_labels:
        y = rng.integers(0, 2, size=n_rows)
    x[rng.random(n_rows) < 0.1, 2] = np.nan
    return Split(x, y)


def make_subject_split(
    n_subjects: int, rows_per_subject: int, seed: int, random_labels: bool = False, first_subject: int = 0
) -> tuple[Split, np.ndarray]:
    """Build rows grouped by subject, and return them with the subject id of each row.

    The rows of one subject are small perturbations of a common feature vector, and with
    `random_labels` they share one random label, so they are strongly correlated.
    """
    rng = np.random.default_rng(seed)
    scales = np.array([1.0, 10.0, 0.1, 100.0, 1.0])
    centres = rng.normal(size=(n_subjects, N_FEATURES)) * scales
    noise = 0.1 * rng.normal(size=(n_subjects * rows_per_subject, N_FEATURES)) * scales
    x = np.repeat(centres, rows_per_subject, axis=0) + noise
    if random_labels:
        y = np.repeat(rng.integers(0, 2, size=n_subjects), rows_per_subject)
    else:
        y = (x[:, 0] + 0.2 * x[:, 1] > 0).astype(np.int64)
    groups = first_subject + np.repeat(np.arange(n_subjects), rows_per_subject)
    return Split(x, y), groups


def repeat_rows(split: Split, times: int) -> tuple[Split, np.ndarray]:
    """Copy every row `times` times and make each row with its copies one subject."""
    groups = np.repeat(np.arange(len(split)), times)
    return Split(np.repeat(split.x, times, axis=0), np.repeat(split.y, times)), groups


def concat(*splits: Split) -> Split:
    return Split(np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits]))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.fixture(scope="module")
def train_split() -> Split:
    return make_split(400, seed=1)


@pytest.fixture(scope="module")
def val_split() -> Split:
    return make_split(150, seed=2)


@pytest.fixture(scope="module")
def trained(train_split: Split, val_split: Split) -> tuple[TabularMLP, object]:
    return train_mlp(train_split, val_split, TrainConfig(max_epochs=60), CPU)


# Device and data


def test_package_imports_no_pipeline_libraries() -> None:
    # A fresh interpreter, because this test session has already imported pandas and more.
    code = (
        "import sys, models.device, models.data, models.network, models.training, models.evaluation, models.unlearning; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'prefect', 'mlflow', 'dvc'})))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == ""


def test_pick_device_cpu() -> None:
    assert pick_device("cpu") == torch.device("cpu")


def test_pick_device_invalid() -> None:
    with pytest.raises(ValueError, match="tpu"):
        pick_device("tpu")


def test_seed_everything_repeats() -> None:
    seed_everything(3)
    first = torch.rand(3), np.random.rand()
    seed_everything(3)
    second = torch.rand(3), np.random.rand()
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]


def test_split_converts_dtypes() -> None:
    split = Split(np.zeros((3, 2), dtype=np.float64), np.array([0, 1, 1], dtype=np.int32))
    assert split.x.dtype == np.float32
    assert split.y.dtype == np.int64
    assert len(split) == 3


def test_split_length_mismatch() -> None:
    with pytest.raises(ValueError, match="rows"):
        Split(np.zeros((3, 2)), np.zeros(2))


def test_split_non_binary_label() -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        Split(np.zeros((2, 2)), np.array([0, 2]))


def test_from_frame_reads_columns() -> None:
    import pandas as pd

    frame = pd.DataFrame({"a": [1.0, np.nan], "b": [3, 4], "label": [0, 1]})
    split = Split.from_frame(frame, ["a", "b"], "label")
    assert split.x.shape == (2, 2)
    assert np.isnan(split.x[1, 0])
    assert split.y.tolist() == [0, 1]


def test_from_frame_missing_column() -> None:
    import pandas as pd

    frame = pd.DataFrame({"a": [1.0], "label": [0]})
    with pytest.raises(KeyError, match="'b'"):
        Split.from_frame(frame, ["a", "b"], "label")


# Network and scaler


def test_scaler_fitted_on_train_only(trained, train_split: Split) -> None:
    model, _ = trained
    expected_mean = np.nanmean(train_split.x.astype(np.float64), axis=0)
    expected_std = np.nanstd(train_split.x.astype(np.float64), axis=0)
    assert np.allclose(model.feature_mean.numpy(), expected_mean, rtol=1e-5)
    assert np.allclose(model.feature_std.numpy(), expected_std, rtol=1e-5)


def test_scaler_ignores_val_shift() -> None:
    train = make_split(200, seed=5)
    shifted_val = make_split(100, seed=6, shift=50.0)
    model, _ = train_mlp(train, shifted_val, TrainConfig(max_epochs=2), CPU)
    assert np.allclose(model.feature_mean.numpy(), np.nanmean(train.x, axis=0), rtol=1e-4)


def test_scaler_constant_column() -> None:
    model = TabularMLP(2)
    model.fit_scaler(np.array([[1.0, 7.0], [3.0, 7.0]]))
    assert model.feature_std.tolist() == [1.0, 1.0]
    assert model.feature_mean.tolist() == [2.0, 7.0]


def test_scaler_all_nan_column() -> None:
    model = TabularMLP(2)
    model.fit_scaler(np.array([[1.0, np.nan], [3.0, np.nan]]))
    assert model.feature_mean[1].item() == 0.0
    assert model.feature_std[1].item() == 1.0


def test_scaler_wrong_width() -> None:
    with pytest.raises(ValueError, match="shape"):
        TabularMLP(3).fit_scaler(np.zeros((4, 2)))


def test_forward_nan_means_train_mean(trained) -> None:
    model, _ = trained
    row_with_mean = np.array([[0.5, -3.0, model.feature_mean[2].item(), 20.0, 1.0]], dtype=np.float32)
    row_with_nan = row_with_mean.copy()
    row_with_nan[0, 2] = np.nan
    logits_mean = predict_logits(model, row_with_mean, CPU)
    logits_nan = predict_logits(model, row_with_nan, CPU)
    assert np.allclose(logits_mean, logits_nan, atol=1e-6)
    assert np.isfinite(logits_nan).all()


def test_forward_logits_shape(trained, val_split: Split) -> None:
    model, _ = trained
    assert predict_logits(model, val_split.x, CPU).shape == (len(val_split), 2)


def test_model_pickle_roundtrip(trained, val_split: Split) -> None:
    model, _ = trained
    restored = pickle.loads(pickle.dumps(model))
    assert np.array_equal(predict_logits(restored, val_split.x, CPU), predict_logits(model, val_split.x, CPU))


# Training


def test_training_learns(trained, val_split: Split) -> None:
    model, _ = trained
    assert accuracy(model, val_split, CPU) > 0.85


def test_training_deterministic(train_split: Split, val_split: Split) -> None:
    config = TrainConfig(max_epochs=5)
    first, _ = train_mlp(train_split, val_split, config, CPU)
    second, _ = train_mlp(train_split, val_split, config, CPU)
    assert same_weights(first, second)


def test_training_seed_matters(train_split: Split, val_split: Split) -> None:
    first, _ = train_mlp(train_split, val_split, TrainConfig(max_epochs=5, seed=0), CPU)
    second, _ = train_mlp(train_split, val_split, TrainConfig(max_epochs=5, seed=1), CPU)
    assert not same_weights(first, second)


def test_early_stopping_restores_best() -> None:
    # Random labels make validation loss rise after a few epochs, so training stops early.
    train = make_split(200, seed=7, random_labels=True)
    val = make_split(200, seed=8, random_labels=True)
    config = TrainConfig(hidden=(64, 64), dropout=0.0, lr=1e-2, max_epochs=100, patience=5)
    model, report = train_mlp(train, val, config, CPU)

    assert report.epochs < config.max_epochs
    assert report.epochs == report.best_epoch + config.patience
    assert float(per_example_loss(model, val, CPU).mean()) == pytest.approx(report.best_val_loss, rel=1e-5)

    # The same run cut at best_epoch follows the same trajectory, so it must end at the restored weights.
    cut_config = TrainConfig(hidden=(64, 64), dropout=0.0, lr=1e-2, max_epochs=report.best_epoch, patience=100)
    cut_model, _ = train_mlp(train, val, cut_config, CPU)
    assert same_weights(model, cut_model)


def test_train_config_list_hidden() -> None:
    assert TrainConfig(hidden=[8, 4]).hidden == (8, 4)


def test_train_config_invalid_patience() -> None:
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=0)


# Evaluation


def test_mia_auc_members_lower() -> None:
    assert mia_auc(np.array([0.1, 0.2]), np.array([0.5, 0.9, 1.0])) == 1.0


def test_mia_auc_members_higher() -> None:
    assert mia_auc(np.array([2.0, 3.0]), np.array([0.5, 0.9, 1.0])) == 0.0


def test_mia_auc_identical() -> None:
    losses = np.array([0.1, 0.4, 0.7])
    assert mia_auc(losses, losses) == 0.5


def test_mia_auc_ties_count_half() -> None:
    # Pairs (1,2), (1,3), (2,3) are wins and (2,2) is a tie: 3.5 of 4.
    assert mia_auc(np.array([1.0, 2.0]), np.array([2.0, 3.0])) == 0.875


def test_mia_auc_empty() -> None:
    with pytest.raises(ValueError, match="both sets"):
        mia_auc(np.array([]), np.array([1.0]))


def test_per_example_loss_matches_mean(trained, val_split: Split) -> None:
    model, _ = trained
    losses = per_example_loss(model, val_split, CPU)
    logits = torch.tensor(predict_logits(model, val_split.x, CPU))
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(val_split.y)).item()
    assert losses.shape == (len(val_split),)
    assert losses.mean() == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def memorisation_case() -> dict:
    """Build a model that memorised a random-label forget set, and one retrained without it."""
    base = make_split(300, seed=10)
    forget = make_split(40, seed=11, random_labels=True)
    heldout = make_split(300, seed=12, random_labels=True)

    # Validating on the training rows themselves keeps early stopping from ending memorisation.
    with_forget = concat(base, forget)
    memorised, _ = train_mlp(with_forget, with_forget, MEMORISE, CPU)
    retrained, _ = train_mlp(base, base, MEMORISE, CPU)
    return {"forget": forget, "heldout": heldout, "memorised": memorised, "retrained": retrained}


def test_evidence_memorised_positive(memorisation_case: dict) -> None:
    case = memorisation_case
    evidence = forgetting_evidence(case["memorised"], case["forget"], case["heldout"], CPU)
    assert evidence.n_forget == 40
    assert evidence.accuracy_z > 3.0
    assert evidence.mia_z > 3.0


def test_evidence_retrained_small(memorisation_case: dict) -> None:
    case = memorisation_case
    evidence = forgetting_evidence(case["retrained"], case["forget"], case["heldout"], CPU)
    assert abs(evidence.accuracy_z) < 2.0
    assert abs(evidence.mia_z) < 2.0


def test_evidence_standard_errors(memorisation_case: dict) -> None:
    case = memorisation_case
    evidence = forgetting_evidence(case["retrained"], case["forget"], case["heldout"], CPU)
    p = evidence.heldout_accuracy
    assert evidence.accuracy_se == pytest.approx(np.sqrt(p * (1 - p) / 40))
    assert evidence.mia_auc_se == pytest.approx(np.sqrt((40 + 300 + 1) / (12 * 40 * 300)))


def test_evidence_empty_forget(trained, val_split: Split) -> None:
    model, _ = trained
    evidence = forgetting_evidence(model, val_split.take(np.array([], dtype=np.int64)), val_split, CPU)
    assert evidence.n_forget == 0
    assert evidence.accuracy_z == 0.0
    assert evidence.mia_z == 0.0
    assert np.isnan(evidence.forget_accuracy)


def test_evidence_perfect_heldout() -> None:
    # Zero weights and a positive output bias predict class 1 for every row.
    model = TabularMLP(2, hidden=())
    with torch.no_grad():
        model.layers[0].weight.zero_()
        model.layers[0].bias.copy_(torch.tensor([0.0, 1.0]))
    rows = Split(np.ones((10, 2)), np.ones(10))
    evidence = forgetting_evidence(model, rows.take(np.arange(4)), rows, CPU)
    assert evidence.heldout_accuracy == 1.0
    assert evidence.accuracy_se > 0.0
    assert evidence.accuracy_z == 0.0


def test_evidence_analytic_without_groups(memorisation_case: dict) -> None:
    case = memorisation_case
    model, forget, heldout = case["retrained"], case["forget"], case["heldout"]
    evidence = forgetting_evidence(model, forget, heldout, CPU)

    p = accuracy(model, heldout, CPU)
    expected_accuracy_z = (accuracy(model, forget, CPU) - p) / np.sqrt(p * (1 - p) / 40)
    expected_auc = mia_auc(per_example_loss(model, forget, CPU), per_example_loss(model, heldout, CPU))
    expected_mia_z = (expected_auc - 0.5) / np.sqrt((40 + 300 + 1) / (12 * 40 * 300))
    assert evidence.null_method == "analytic"
    assert evidence.null_draws == 0
    assert evidence.accuracy_z == pytest.approx(expected_accuracy_z)
    assert evidence.mia_auc == pytest.approx(expected_auc)
    assert evidence.mia_z == pytest.approx(expected_mia_z)
    assert evidence.accuracy_p == pytest.approx(norm.sf(expected_accuracy_z))
    assert evidence.mia_p == pytest.approx(norm.sf(expected_mia_z))


@pytest.fixture(scope="module")
def subject_case() -> dict:
    """Build a memorising model and its retrain for forget and held-out sets of 4-row subjects."""
    base, _ = make_subject_split(100, 4, seed=20)
    forget, forget_groups = make_subject_split(40, 4, seed=21, random_labels=True, first_subject=1000)
    heldout, heldout_groups = make_subject_split(150, 4, seed=22, random_labels=True, first_subject=2000)

    with_forget = concat(base, forget)
    memorised, _ = train_mlp(with_forget, with_forget, MEMORISE, CPU)
    retrained, _ = train_mlp(base, base, MEMORISE, CPU)
    return {
        "forget": forget,
        "heldout": heldout,
        "forget_groups": forget_groups,
        "heldout_groups": heldout_groups,
        "memorised": memorised,
        "retrained": retrained,
    }


def subject_evidence(case: dict, model_key: str, **options):
    return forgetting_evidence(
        case[model_key], case["forget"], case["heldout"], CPU, case["forget_groups"], case["heldout_groups"], **options
    )


def test_subject_null_reproducible(subject_case: dict) -> None:
    first = subject_evidence(subject_case, "retrained", seed=5)
    second = subject_evidence(subject_case, "retrained", seed=5)
    other_seed = subject_evidence(subject_case, "retrained", seed=6)
    assert first == second
    assert first.null_method == "subject_resampling"
    assert first.null_draws == 500
    assert other_seed.accuracy_se != first.accuracy_se


def test_subject_null_retrained_near_zero(subject_case: dict) -> None:
    evidence = subject_evidence(subject_case, "retrained")
    assert abs(evidence.accuracy_z) < 2.0
    assert abs(evidence.mia_z) < 2.0
    assert evidence.accuracy_p > 0.05
    assert evidence.mia_p > 0.05


def test_subject_null_memorised_large(subject_case: dict) -> None:
    evidence = subject_evidence(subject_case, "memorised")
    assert evidence.accuracy_z > 3.0
    assert evidence.mia_z > 3.0
    # No draw reaches the observed values, so p is the smallest possible, 1 / (1 + draws).
    assert evidence.accuracy_p == pytest.approx(1 / 501)
    assert evidence.mia_p == pytest.approx(1 / 501)


def test_subject_null_draws_option(subject_case: dict) -> None:
    evidence = subject_evidence(subject_case, "memorised", draws=99)
    assert evidence.null_draws == 99
    assert evidence.accuracy_p == pytest.approx(1 / 100)


def test_subject_null_wider_when_correlated(trained) -> None:
    model, _ = trained
    # Eight identical rows per subject carry the information of one row.
    heldout, heldout_groups = repeat_rows(make_split(120, seed=30), 8)
    forget, forget_groups = repeat_rows(make_split(10, seed=31), 8)

    analytic = forgetting_evidence(model, forget, heldout, CPU)
    resampled = forgetting_evidence(model, forget, heldout, CPU, forget_groups, heldout_groups + 1000)
    # With 10 of 120 subjects drawn, the expected ratio is sqrt(8 * 110 / 119), about 2.7.
    assert resampled.accuracy_se > 2.0 * analytic.accuracy_se
    assert resampled.mia_auc_se > 2.0 * analytic.mia_auc_se


def test_subject_null_matches_analytic_when_independent(trained) -> None:
    model, _ = trained
    heldout = make_split(2000, seed=32)
    forget = make_split(40, seed=33)
    analytic = forgetting_evidence(model, forget, heldout, CPU)
    resampled = forgetting_evidence(model, forget, heldout, CPU, np.arange(40), np.arange(2000))
    assert resampled.accuracy_se == pytest.approx(analytic.accuracy_se, rel=0.15)
    assert resampled.mia_auc_se == pytest.approx(analytic.mia_auc_se, rel=0.15)


def test_subject_null_leave_one_out_values() -> None:
    # Five of six subjects are drawn, so each draw equals one of six leave-one-out sets.
    groups = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5, 5])
    losses = np.array([0.5, 0.1, 0.5, 0.9, 0.2, 0.5, 0.7, 0.1, 0.3, 0.5, 0.9, 0.05, 0.2])
    correct = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 1], dtype=bool)
    expected = set()
    for left_out in range(6):
        members = groups != left_out
        expected.add((round(correct[members].mean(), 12), round(mia_auc(losses[members], losses[~members]), 12)))

    null = subject_resampling_null(losses, correct, groups, n_subjects=5, draws=200, seed=1)
    drawn = {(round(a, 12), round(b, 12)) for a, b in zip(null.accuracy, null.auc)}
    assert not null.with_replacement
    assert len(null.auc) == 200
    assert drawn == expected


def test_subject_null_with_replacement_values(caplog) -> None:
    # Three held-out subjects for three forget subjects force sampling with replacement.
    groups = np.array([0, 0, 1, 2, 2, 2])
    losses = np.array([0.5, 0.1, 0.5, 0.9, 0.2, 0.5])
    correct = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    expected = set()
    for times_drawn in itertools.product(range(4), repeat=3):
        if sum(times_drawn) != 3 or min(times_drawn) > 0:
            continue
        weights = np.array(times_drawn)[groups]
        members = weights > 0
        member_losses = np.repeat(losses[members], weights[members])
        member_accuracy = np.repeat(correct[members], weights[members]).mean()
        expected.add((round(member_accuracy, 12), round(mia_auc(member_losses, losses[~members]), 12)))

    with caplog.at_level(logging.WARNING, logger="models.evaluation"):
        null = subject_resampling_null(losses, correct, groups, n_subjects=3, draws=300, seed=2)
    drawn = {(round(a, 12), round(b, 12)) for a, b in zip(null.accuracy, null.auc)}
    assert null.with_replacement
    assert "with replacement" in caplog.text
    # A draw of all three subjects leaves nothing to compare with and is dropped.
    assert 2 <= len(null.auc) < 300
    assert drawn <= expected


def test_subject_null_fallback_evidence(trained, val_split: Split) -> None:
    model, _ = trained
    forget = val_split.take(np.arange(10))
    heldout = val_split.take(np.arange(10, 150))
    evidence = forgetting_evidence(model, forget, heldout, CPU, np.arange(10), np.arange(140) % 5)
    assert evidence.null_method == "subject_resampling"
    assert 2 <= evidence.null_draws <= 500
    assert np.isfinite(evidence.accuracy_z)
    assert np.isfinite(evidence.mia_z)


def test_subject_null_zero_spread() -> None:
    # Zero weights and a positive output bias predict class 1 with one loss for every row.
    model = TabularMLP(2, hidden=())
    with torch.no_grad():
        model.layers[0].weight.zero_()
        model.layers[0].bias.copy_(torch.tensor([0.0, 1.0]))
    heldout = Split(np.ones((12, 2)), np.ones(12))
    groups = np.repeat(np.arange(6), 2)

    evidence = forgetting_evidence(model, heldout.take(np.arange(4)), heldout, CPU, groups[:4] + 100, groups)
    assert evidence.accuracy_se == 0.0
    assert evidence.accuracy_z == 0.0
    assert evidence.mia_auc_se == 0.0
    assert evidence.mia_z == 0.0

    wrong = Split(np.ones((4, 2)), np.zeros(4))
    evidence = forgetting_evidence(model, wrong, heldout, CPU, np.array([0, 0, 1, 1]), groups)
    assert evidence.accuracy_z == -Z_LIMIT
    assert evidence.mia_z == -Z_LIMIT
    assert evidence.accuracy_p == 1.0


def test_subject_null_empty_forget(trained, val_split: Split) -> None:
    model, _ = trained
    empty = val_split.take(np.array([], dtype=np.int64))
    evidence = forgetting_evidence(model, empty, val_split, CPU, np.array([], dtype=np.int64), np.arange(len(val_split)))
    assert evidence.accuracy_z == 0.0
    assert evidence.mia_z == 0.0
    assert evidence.accuracy_p == 1.0
    assert evidence.mia_p == 1.0


def test_subject_null_string_ids(subject_case: dict) -> None:
    case = dict(subject_case)
    by_integer = subject_evidence(case, "retrained")
    case["forget_groups"] = np.array([f"subject-{g}" for g in case["forget_groups"]], dtype=object)
    case["heldout_groups"] = np.array([f"subject-{g:05d}" for g in case["heldout_groups"]], dtype=object)
    # Zero-padded ids sort like the integers, so the codes and therefore the draws match.
    assert subject_evidence(case, "retrained") == by_integer


def test_encode_groups_unorderable_ids() -> None:
    codes, n_subjects = encode_groups(np.array([3, "a", 3, (1, 2), "a"], dtype=object))
    assert n_subjects == 3
    assert codes.tolist() == [0, 1, 0, 2, 1]


def test_subject_null_only_one_group_array(subject_case: dict) -> None:
    case = subject_case
    with pytest.raises(ValueError, match="both"):
        forgetting_evidence(case["retrained"], case["forget"], case["heldout"], CPU, forget_groups=case["forget_groups"])


def test_subject_null_group_length_mismatch(subject_case: dict) -> None:
    case = subject_case
    with pytest.raises(ValueError, match="heldout_groups has 5 subject ids"):
        forgetting_evidence(case["retrained"], case["forget"], case["heldout"], CPU, case["forget_groups"], np.arange(5))


def test_subject_null_one_heldout_subject() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        subject_resampling_null(np.array([0.1, 0.2]), np.array([True, False]), np.array([7, 7]), n_subjects=1)


def test_subject_null_too_few_draws() -> None:
    with pytest.raises(ValueError, match="draws"):
        subject_resampling_null(np.array([0.1, 0.2]), np.array([True, False]), np.array([1, 2]), n_subjects=1, draws=1)


def test_subject_null_realistic_size() -> None:
    # 4,000 held-out rows in about 1,200 subjects, as many as the RAND HIE test split.
    # Its speed is measured in bench/gate_calibration.py, not asserted here.
    rng = np.random.default_rng(0)
    groups = np.sort(rng.integers(0, 1200, size=4000))
    losses = rng.exponential(size=4000)
    correct = rng.random(4000) < 0.7
    null = subject_resampling_null(losses, correct, groups, n_subjects=60, draws=500)
    assert len(null.auc) == 500
    assert 0.4 < float(np.mean(null.auc)) < 0.6


# Unlearning methods

# Each method may lose at most this much retain accuracy on the synthetic problem.
RETAIN_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def unlearning_case(train_split: Split, val_split: Split, trained) -> dict:
    model, _ = trained
    forget_mask = np.zeros(len(train_split), dtype=bool)
    forget_mask[:20] = True
    return {
        "model": model,
        "forget": train_split.take(forget_mask),
        "retain": train_split.take(~forget_mask),
        "val": val_split,
    }


# Methods that unlearn from a plain TabularMLP. Others, such as sisa, need the model their
# MethodSpec.prepare builds, and tests/test_methods.py covers them.
MLP_METHODS = sorted(name for name in METHODS if method_spec(name).accepts(TabularMLP))


@pytest.mark.parametrize("name", MLP_METHODS)
def test_method_contract(name: str, unlearning_case: dict) -> None:
    case = unlearning_case
    original = case["model"]
    snapshot = copy.deepcopy(original)
    settings = {"max_epochs": 60} if name == "retrain" else {}

    result = get_method(name)(original, case["forget"], case["retain"], case["val"], settings, CPU)

    assert result.model is not original
    assert same_weights(original, snapshot)
    assert result.record.method == name
    assert result.record.steps > 0
    assert result.record.device == "cpu"
    drop = accuracy(original, case["retain"], CPU) - accuracy(result.model, case["retain"], CPU)
    assert drop <= RETAIN_TOLERANCE


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_unknown_setting(name: str, unlearning_case: dict) -> None:
    case = unlearning_case
    with pytest.raises(ValueError, match="no_such_option"):
        get_method(name)(case["model"], case["forget"], case["retain"], case["val"], {"no_such_option": 1}, CPU)


def test_retrain_ignores_original_weights(unlearning_case: dict) -> None:
    case = unlearning_case
    result = get_method("retrain")(case["model"], case["forget"], case["retain"], case["val"], {"max_epochs": 5}, CPU)
    expected, _ = train_mlp(case["retain"], case["val"], TrainConfig(max_epochs=5), CPU)
    assert same_weights(result.model, expected)


def test_neggrad_plus_records_bound(unlearning_case: dict) -> None:
    case = unlearning_case
    result = get_method("neggrad_plus")(case["model"], case["forget"], case["retain"], case["val"], {}, CPU)
    assert result.record.settings["forget_loss_bound"] > 0.0


def test_get_method_unknown_lists_choices() -> None:
    with pytest.raises(KeyError) as error:
        get_method("amnesia")
    message = str(error.value)
    assert "amnesia" in message
    for name in METHODS:
        assert name in message


# Smoke test on the real data set


@pytest.fixture(scope="module")
def randhie() -> dict:
    pytest.importorskip("statsmodels")
    from tasks.dataset import FEATURES, LABEL, SUBJECT_KEY, assign_split, load_randhie

    frame = load_randhie()
    split = assign_split(frame[SUBJECT_KEY], seed=0, test_fraction=0.2, val_fraction=0.1)
    train_frame = frame[split == "train"].reset_index(drop=True)
    return {
        "train_frame": train_frame,
        "subject_key": SUBJECT_KEY,
        "train": Split.from_frame(train_frame, FEATURES, LABEL),
        "val": Split.from_frame(frame[split == "val"], FEATURES, LABEL),
        "test": Split.from_frame(frame[split == "test"], FEATURES, LABEL),
    }


def test_randhie_smoke(randhie: dict) -> None:
    model, report = train_mlp(randhie["train"], randhie["val"], TrainConfig(), CPU)
    test_accuracy = accuracy(model, randhie["test"], CPU)
    majority_rate = max(randhie["test"].y.mean(), 1 - randhie["test"].y.mean())
    assert report.best_epoch >= 1
    assert test_accuracy > majority_rate

    # Forget 1% of the training subjects with NegGrad+ and keep utility within 1 point.
    subjects = randhie["train_frame"][randhie["subject_key"]]
    rng = np.random.default_rng(0)
    unique_subjects = subjects.unique()
    chosen = rng.choice(unique_subjects, size=round(0.01 * len(unique_subjects)), replace=False)
    forget_mask = subjects.isin(chosen).to_numpy()
    forget, retain = randhie["train"].take(forget_mask), randhie["train"].take(~forget_mask)
    result = get_method("neggrad_plus")(model, forget, retain, randhie["val"], {}, CPU)

    assert test_accuracy - accuracy(result.model, randhie["test"], CPU) < 0.01
    assert accuracy(model, retain, CPU) - accuracy(result.model, retain, CPU) < 0.01
