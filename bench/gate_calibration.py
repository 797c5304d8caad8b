"""Measure forgetting z scores on RAND HIE to choose the threshold of the forgetting gate.

For random forget sets of whole training subjects, the script compares three models
against the test split: the original model (it remembers the forget set), an exact
retrain without the forget set (it has forgotten by construction) and NegGrad+. The
gate threshold should pass every exact retrain, and the table shows how often the
original model would also pass. The z scores and p-values come from a null that
resamples test subjects (forgetting_evidence with groups), and the report also gives
the spread of the analytic z, which treats rows as independent, for comparison.
It prints a markdown report to stdout.

Usage: .venv/bin/python bench/gate_calibration.py --repeats 30 --output bench/results/gate_calibration.md
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.data import Split
from models.device import pick_device
from models.evaluation import accuracy, forgetting_evidence
from models.network import TabularMLP
from models.training import TrainConfig, train_mlp
from models.unlearning import get_method
from tasks.dataset import FEATURES, LABEL, SUBJECT_KEY, assign_split, load_randhie

logger = logging.getLogger("gate_calibration")

# One-sided standard normal quantiles for false-positive rates of 5%, 1%, 0.135% and 0.003%.
Z_THRESHOLDS = (1.645, 2.326, 3.0, 4.0)

# p-value threshold of the `p < ...` column. With 500 draws the smallest possible p is 1/501.
P_THRESHOLD = 0.01


@dataclass
class RandhieSplits:
    """The RAND HIE splits, with the subject id of each training and test row."""

    train: Split
    val: Split
    test: Split
    train_subjects: np.ndarray
    test_subjects: np.ndarray


@dataclass
class Measurement:
    """Forgetting evidence and utility of one model for one forget set."""

    n_subjects: int
    repeat: int
    kind: str
    n_forget_rows: int
    accuracy_z: float
    mia_z: float
    accuracy_p: float
    mia_p: float
    analytic_accuracy_z: float
    analytic_mia_z: float
    retain_drop_pp: float
    test_drop_pp: float
    wall_time_s: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="Random forget sets per size (default 10).")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1, 10, 60],
        help="Forget-set sizes in training subjects, all rows of each (default 1 10 60).",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="Seed of assign_split (default 0).")
    parser.add_argument("--sample-seed", type=int, default=0, help="Seed for drawing forget subjects (default 0).")
    parser.add_argument("--draws", type=int, default=500, help="Draws of the subject-resampling null per evaluation (default 500).")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto).")
    parser.add_argument("--output", type=Path, help="Also write the markdown report to this file.")
    parser.add_argument("--raw-csv", type=Path, help="Also write one row per run and model to this CSV file.")
    return parser.parse_args()


def load_splits(split_seed: int) -> RandhieSplits:
    """Load RAND HIE and split it by subject: 20% test, 10% validation, the rest training."""
    frame = load_randhie()
    split = assign_split(frame[SUBJECT_KEY], seed=split_seed, test_fraction=0.2, val_fraction=0.1)
    train_frame = frame[split == "train"]
    test_frame = frame[split == "test"]
    return RandhieSplits(
        train=Split.from_frame(train_frame, FEATURES, LABEL),
        val=Split.from_frame(frame[split == "val"], FEATURES, LABEL),
        test=Split.from_frame(test_frame, FEATURES, LABEL),
        train_subjects=train_frame[SUBJECT_KEY].to_numpy(),
        test_subjects=test_frame[SUBJECT_KEY].to_numpy(),
    )


def sample_forget_mask(subjects: np.ndarray, n_subjects: int, rng: np.random.Generator) -> np.ndarray:
    """Mark every row of `n_subjects` training subjects drawn at random without replacement."""
    chosen = rng.choice(np.unique(subjects), size=n_subjects, replace=False)
    return np.isin(subjects, chosen)


def measure(
    model: TabularMLP,
    forget: Split,
    forget_subjects: np.ndarray,
    retain: Split,
    splits: RandhieSplits,
    baseline_accuracy: dict[str, float],
    draws: int,
    device: torch.device,
) -> dict[str, float]:
    """Return the model's z scores and p-values on `forget` against the test split, and its accuracy drops in percentage points."""
    evidence = forgetting_evidence(model, forget, splits.test, device, forget_subjects, splits.test_subjects, draws=draws)
    analytic = forgetting_evidence(model, forget, splits.test, device)
    return {
        "accuracy_z": evidence.accuracy_z,
        "mia_z": evidence.mia_z,
        "accuracy_p": evidence.accuracy_p,
        "mia_p": evidence.mia_p,
        "analytic_accuracy_z": analytic.accuracy_z,
        "analytic_mia_z": analytic.mia_z,
        "retain_drop_pp": 100.0 * (baseline_accuracy["retain"] - accuracy(model, retain, device)),
        "test_drop_pp": 100.0 * (baseline_accuracy["test"] - accuracy(model, splits.test, device)),
    }


def run_repeats(args: argparse.Namespace, splits: RandhieSplits, device: torch.device) -> tuple[list[Measurement], TrainConfig]:
    """Train the baseline once, then unlearn random forget sets of each size `args.repeats` times."""
    config = TrainConfig()
    baseline, report = train_mlp(splits.train, splits.val, config, device)
    logger.info("Baseline: best epoch %d of %d, %.1f s.", report.best_epoch, report.epochs, report.wall_time_s)

    rng = np.random.default_rng(args.sample_seed)
    retrain = get_method("retrain")
    neggrad_plus = get_method("neggrad_plus")
    measurements: list[Measurement] = []

    for n_subjects in args.sizes:
        for repeat in range(args.repeats):
            forget_mask = sample_forget_mask(splits.train_subjects, n_subjects, rng)
            forget, retain = splits.train.take(forget_mask), splits.train.take(~forget_mask)
            forget_subjects = splits.train_subjects[forget_mask]
            baseline_accuracy = {"retain": accuracy(baseline, retain, device), "test": accuracy(baseline, splits.test, device)}

            retrained = retrain(baseline, forget, retain, splits.val, dataclasses.asdict(config), device)
            unlearned = neggrad_plus(baseline, forget, retain, splits.val, {}, device)
            models = {
                "original": (baseline, 0.0),
                "retrain": (retrained.model, retrained.record.wall_time_s),
                "neggrad_plus": (unlearned.model, unlearned.record.wall_time_s),
            }

            for kind, (model, wall_time_s) in models.items():
                values = measure(model, forget, forget_subjects, retain, splits, baseline_accuracy, args.draws, device)
                measurements.append(Measurement(n_subjects, repeat, kind, len(forget), wall_time_s=wall_time_s, **values))

            logger.info(
                "%d subjects, repeat %d/%d: %d forget rows, retrain %.1f s.",
                n_subjects, repeat + 1, args.repeats, len(forget), retrained.record.wall_time_s,
            )

    return measurements, config


def summarize(measurements: list[Measurement]) -> pd.DataFrame:
    """Aggregate the measurements per forget-set size and model kind."""
    frame = pd.DataFrame([dataclasses.asdict(m) for m in measurements])
    # The gate fails a model when either z exceeds the threshold, so the pass rate depends on the larger one.
    frame["gate_z"] = frame[["accuracy_z", "mia_z"]].max(axis=1)
    frame["gate_p"] = frame[["accuracy_p", "mia_p"]].min(axis=1)

    rows = []
    for (n_subjects, kind), group in frame.groupby(["n_subjects", "kind"], sort=False):
        row = {
            "subjects": n_subjects,
            "rows (mean)": group["n_forget_rows"].mean(),
            "model": kind,
            "runs": len(group),
            "accuracy_z mean": group["accuracy_z"].mean(),
            "accuracy_z max": group["accuracy_z"].max(),
            "mia_z mean": group["mia_z"].mean(),
            "mia_z max": group["mia_z"].max(),
        }
        for threshold in Z_THRESHOLDS:
            row[f"> {threshold}"] = (group["gate_z"] > threshold).mean()
        row["min p"] = group["gate_p"].min()
        row[f"p < {P_THRESHOLD}"] = (group["gate_p"] < P_THRESHOLD).mean()
        row["test drop pp mean"] = group["test_drop_pp"].mean()
        row["test drop pp max"] = group["test_drop_pp"].max()
        row["retain drop pp mean"] = group["retain_drop_pp"].mean()
        row["retain drop pp max"] = group["retain_drop_pp"].max()
        rows.append(row)
    return pd.DataFrame(rows)


def spread_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Standard deviation of each z over the exact retrains per forget-set size, for the resampled and the analytic null."""
    retrains = frame[frame["kind"] == "retrain"]
    rows = []
    for n_subjects, group in retrains.groupby("n_subjects"):
        rows.append({
            "subjects": n_subjects,
            "retrains": len(group),
            "accuracy_z sd (resampled)": group["accuracy_z"].std(),
            "accuracy_z sd (analytic)": group["analytic_accuracy_z"].std(),
            "mia_z sd (resampled)": group["mia_z"].std(),
            "mia_z sd (analytic)": group["analytic_mia_z"].std(),
        })
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """Format a data frame as a GitHub markdown table with two decimals, three for the p-value columns."""
    header = "| " + " | ".join(table.columns) + " |"
    divider = "|" + "|".join("---" for _ in table.columns) + "|"
    lines = [header, divider]
    # itertuples keeps each column's dtype, where iterrows would turn the integer columns of an all-numeric table into floats.
    for row in table.itertuples(index=False):
        cells = [format_cell(column, value) for column, value in zip(table.columns, row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_cell(column: str, value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3f}" if column == "min p" else f"{value:.2f}"


def build_report(measurements: list[Measurement], config: TrainConfig, args: argparse.Namespace, device: torch.device, elapsed_s: float) -> str:
    """Build the markdown report: setup, the summary and spread tables, wall times and the retrain z extremes."""
    frame = pd.DataFrame([dataclasses.asdict(m) for m in measurements])
    retrains = frame[frame["kind"] == "retrain"]
    originals = frame[frame["kind"] == "original"]
    neggrad = frame[frame["kind"] == "neggrad_plus"]
    retrain_gate_z = retrains[["accuracy_z", "mia_z"]].max(axis=1)
    original_gate_z = originals[["accuracy_z", "mia_z"]].max(axis=1)

    lines = [
        "# Forgetting-gate calibration on RAND HIE",
        "",
        f"Command: `bench/gate_calibration.py --repeats {args.repeats} --sizes {' '.join(map(str, args.sizes))} "
        f"--split-seed {args.split_seed} --sample-seed {args.sample_seed} --draws {args.draws}`",
        f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {device}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads. Total time {elapsed_s:.0f} s.",
        f"Baseline and retrain recipe: {config}.",
        "",
        "Each run draws the given number of training subjects at random and forgets all their rows.",
        "z scores compare the forget set with the test split (positive: treated like training data).",
        f"The null distribution comes from {args.draws} draws of as many test subjects as the forget set has,",
        "so it keeps the correlation between the rows of one subject.",
        "The `> z` columns are the fraction of runs whose larger z (accuracy_z or mia_z) exceeds z.",
        f"`min p` is the smallest one-sided empirical p-value (the smaller of accuracy_p and mia_p) over the runs,",
        f"and `p < {P_THRESHOLD}` is the fraction of runs where it is below {P_THRESHOLD}. The smallest possible p is 1/{args.draws + 1}.",
        "Drops are the baseline's accuracy minus the model's, in percentage points.",
        "",
        to_markdown(summarize(measurements)),
        "",
        "Spread of z over the exact retrains. Under an honest null it is close to 1. The analytic null",
        "treats every row as independent.",
        "",
        to_markdown(spread_table(frame)),
        "",
        f"Retrain wall time: median {retrains['wall_time_s'].median():.2f} s, mean {retrains['wall_time_s'].mean():.2f} s, "
        f"max {retrains['wall_time_s'].max():.2f} s over {len(retrains)} retrains.",
        f"NegGrad+ wall time: median {neggrad['wall_time_s'].median():.2f} s, mean {neggrad['wall_time_s'].mean():.2f} s, "
        f"max {neggrad['wall_time_s'].max():.2f} s.",
        "Wall times vary with other load on the machine, so the median is the better summary.",
        "",
        f"Largest z of any exact retrain: {retrain_gate_z.max():.2f}. "
        f"99th percentile of the retrains' larger z: {retrain_gate_z.quantile(0.99):.2f} "
        f"(linear interpolation over {len(retrains)} values).",
    ]
    for n_subjects, group in retrains.groupby("n_subjects"):
        lines.append(f"- {n_subjects} subjects: largest retrain z {group[['accuracy_z', 'mia_z']].max(axis=1).max():.2f}")
    lines += ["", "Runs whose larger z exceeds each threshold, over all sizes:", ""]
    for threshold in Z_THRESHOLDS:
        lines.append(
            f"- z > {threshold}: {(retrain_gate_z > threshold).sum()} of {len(retrains)} exact retrains, "
            f"{(original_gate_z > threshold).sum()} of {len(originals)} originals."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}.")
    if min(args.sizes) < 1:
        raise SystemExit(f"Every --sizes value must be at least 1, got {args.sizes}.")
    if args.draws < 2:
        raise SystemExit(f"--draws must be at least 2, got {args.draws}.")

    started = time.perf_counter()
    device = pick_device(args.device)
    splits = load_splits(args.split_seed)
    logger.info("Loaded %d train, %d validation and %d test rows.", len(splits.train), len(splits.val), len(splits.test))

    measurements, config = run_repeats(args, splits, device)
    report = build_report(measurements, config, args, device, time.perf_counter() - started)

    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        logger.info("Wrote %s.", args.output)
    if args.raw_csv is not None:
        args.raw_csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([dataclasses.asdict(m) for m in measurements]).to_csv(args.raw_csv, index=False)
        logger.info("Wrote %s.", args.raw_csv)


if __name__ == "__main__":
    main()
