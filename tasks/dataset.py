"""The default dataset: RAND Health Insurance Experiment records shipped by statsmodels.

Source: statsmodels `datasets/randhie/src/randhie.csv` (public domain), 20,190 yearly
records of 5,912 people. `zper` is the person id and the subject key. The label
`binexp` says whether the person had any medical spending that year.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

SUBJECT_KEY = "zper"
LABEL = "binexp"
SPLIT = "split"
SHARD = "shard"

# Enrollment, plan and health-status columns known before the year's spending.
# Spending, visit and admission counts (meddol, mdvis, totadm, lnmeddol, ...) are
# outcomes of the same year as the label, so using them would leak the label.
FEATURES = [
    "plan", "site", "coins", "tookphys", "year", "black", "income", "xage",
    "female", "educdec", "time", "num", "mhi", "disea", "physlm", "ghindx",
    "mdeoff", "pioff", "child", "fchild", "lfam", "lpi", "idp", "logc", "fmde",
    "hlthg", "hlthf", "hlthp", "xghindx", "linc", "lnum",
]

SPLITS = ("train", "val", "test")


def randhie_csv_path() -> Path:
    """Locate the CSV inside the installed statsmodels package."""
    import statsmodels

    return Path(statsmodels.__file__).parent / "datasets" / "randhie" / "src" / "randhie.csv"


def load_randhie() -> pd.DataFrame:
    """Load the raw records, sorted by subject and year so every write is deterministic."""
    frame = pd.read_csv(randhie_csv_path())
    frame[SUBJECT_KEY] = frame[SUBJECT_KEY].astype("int64")
    frame[LABEL] = frame[LABEL].astype("int64")
    return frame.sort_values([SUBJECT_KEY, "year"], kind="stable").reset_index(drop=True)


def unit_interval(subject_ids: pd.Series, salt: str) -> np.ndarray:
    """Map each subject id to a stable pseudo-random number in [0, 1).

    Unkeyed BLAKE2b, not Python's `hash`, so the value is the same in every process.
    """
    values = [
        int.from_bytes(hashlib.blake2b(f"{salt}:{sid}".encode(), digest_size=8).digest(), "big")
        for sid in subject_ids
    ]
    return np.asarray(values, dtype=np.float64) / float(2**64)


def shard_of(subject_ids: pd.Series, n_shards: int) -> np.ndarray:
    """Return the data shard of each subject: a subject lives in exactly one shard."""
    return np.floor(unit_interval(subject_ids, "shard") * n_shards).astype("int64")


def assign_split(subject_ids: pd.Series, seed: int, test_fraction: float, val_fraction: float) -> np.ndarray:
    """Assign train/val/test by subject, so all records of a person share one split."""
    u = unit_interval(subject_ids, f"split-{seed}")
    split = np.full(len(u), "train", dtype=object)
    split[u < test_fraction + val_fraction] = "val"
    split[u < test_fraction] = "test"
    return split
