"""Tests of the models package on small synthetic problems, plus one smoke test on RAND HIE."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.data import Split
from models.device import pick_device, seed_everything
from models.evaluation import accuracy, forgetting_evidence, mia_auc, per_example_loss, predict_logits
from models.network import TabularMLP
from models.training import TrainConfig, train_mlp
from models.unlearning import METHODS, get_method

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


@pytest.mark.parametrize("name", sorted(METHODS))
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
