"""SISA training: an ensemble of constituents, one per data shard, each trained slice by slice with checkpoints.

Source: Bourtoule, Chandrasekaran, Choquette-Choo, Jia, Travers, Zhang, Lie and
Papernot, "Machine Unlearning", IEEE Symposium on Security and Privacy 2021.

Rows are assigned to constituents by `Split.shards`, the caller's data shards, so in
Lethe a subject lives in one constituent. Inside a shard, rows are assigned to slices
by a stable hash of `Split.groups`, so all rows of a subject share one slice. Constituent k
trains in stages: stage r runs `epochs_per_slice` epochs over the rows of slices
0..r of shard k, and the constituent's state after each stage is kept as a
checkpoint in the module's buffers. Deleting rows restores each affected constituent
from the checkpoint before the first slice that held a deleted row and retrains the
later stages without those rows. Every stage draws its initial weights, dropout
masks and batch order from a seed derived from (seed, shard, stage), so a deletion
gives the same weights as training the ensemble from scratch on the remaining rows.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.batching import split_tensors
from models.data import Split
from models.network import TabularMLP
from models.training import train_one_epoch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SisaConfig:
    """Shards, slices and the per-stage recipe of a SisaEnsemble."""

    n_shards: int = 8
    n_slices: int = 4
    # Epochs of each stage. Stage r covers r + 1 slices, so a constituent makes
    # epochs_per_slice * (n_slices + 1) / 2 passes over its shard in all.
    epochs_per_slice: int = 10
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(width) for width in self.hidden))
        for name in ("n_shards", "n_slices", "epochs_per_slice", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SisaConfig.{name} must be at least 1, got {getattr(self, name)}.")


@dataclass(frozen=True)
class SisaDeletion:
    """Outcome of one deletion: the first retrained slice of each affected shard, the optimizer steps and the wall time."""

    restart_slices: dict[int, int]
    steps: int
    wall_time_s: float


def slice_of(groups: np.ndarray, n_slices: int, seed: int) -> np.ndarray:
    """Map each subject id to a slice in 0..n_slices-1 by a salted BLAKE2b hash of its string form.

    The hash, unlike Python's `hash`, is the same in every process, so a deletion
    finds the slices that training used.
    """
    salt = f"sisa-slice-{seed}:"
    digests = [hashlib.blake2b((salt + str(group)).encode(), digest_size=8).digest() for group in groups.tolist()]
    return np.array([int.from_bytes(digest, "big") % n_slices for digest in digests], dtype=np.int64)


def stage_seed(seed: int, shard: int, stage: int) -> int:
    """Derive the seed of one training stage (stage -1 draws the initial weights) from the ensemble seed."""
    return int(np.random.SeedSequence([seed, shard, stage + 1]).generate_state(1)[0])


class SisaEnsemble(nn.Module):
    """Constituent TabularMLPs aligned with data shards, with a checkpoint after every slice.

    `forward` returns the log of the mean softmax of the constituents that have
    training rows, so argmax, softmax and cross-entropy of its output act on the
    aggregated probabilities. The buffer `checkpoints` (shape n_shards x
    (n_slices + 1) x state size) contains each constituent's flattened state dict
    before the first stage and after each stage, and `shard_rows` the number of rows
    each constituent trained on. Both are buffers, so saving the module saves them.
    """

    def __init__(self, n_features: int, config: SisaConfig) -> None:
        super().__init__()
        self.n_features = n_features
        self.config = config

        constituents = []
        for shard in range(config.n_shards):
            torch.manual_seed(stage_seed(config.seed, shard, -1))
            constituents.append(TabularMLP(n_features, hidden=config.hidden, dropout=config.dropout))
        self.constituents = nn.ModuleList(constituents)

        state_size = _state_vector(self.constituents[0]).numel()
        checkpoints = torch.zeros(config.n_shards, config.n_slices + 1, state_size)
        for shard, constituent in enumerate(self.constituents):
            checkpoints[shard, 0] = _state_vector(constituent)
        self.register_buffer("checkpoints", checkpoints)
        self.register_buffer("shard_rows", torch.zeros(config.n_shards, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return log mean softmax over the trained constituents, shape (N, 2), for raw features of shape (N, n_features)."""
        trained = [constituent for constituent, rows in zip(self.constituents, self.shard_rows.tolist()) if rows > 0]
        if not trained:
            raise RuntimeError("No constituent of the SisaEnsemble has training rows. Call fit first.")
        probabilities = torch.stack([F.softmax(constituent(x), dim=1) for constituent in trained]).mean(dim=0)
        return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))

    def fit(self, train: Split, device: torch.device, map_shards: ShardMap | None = None) -> int:
        """Train every constituent on its shard from its initial checkpoint, and return the optimizer steps.

        `map_shards` runs the per-shard jobs, for example on a Dask cluster; by default they run here, one after another.
        """
        shards, slices = self._assignment(train, "train")
        jobs = [self._job(shard, train.take(shards == shard), slices[shards == shard], first_stage=0)
                for shard in range(self.config.n_shards)]
        steps = self._load_results((map_shards or run_in_process)(train_shard, jobs, device))
        self.to(device).eval()
        return steps

    def unlearn(self, forget: Split, retain: Split, device: torch.device, map_shards: ShardMap | None = None) -> SisaDeletion:
        """Retrain only the constituents whose shards held forget rows, from the checkpoint before the first such slice.

        `retain` must hold every remaining training row of the affected shards, in
        training order. Raises ValueError when an affected shard's row count does
        not equal its retained plus forgotten rows, because retraining from a
        checkpoint is exact only on the rows the checkpoint was made with.
        `map_shards` runs the per-shard jobs, as in `fit`.
        """
        started = time.perf_counter()
        forget_shards, forget_slices = self._assignment(forget, "forget")
        retain_shards, retain_slices = self._assignment(retain, "retain")

        restart_slices: dict[int, int] = {}
        jobs = []
        for shard in np.unique(forget_shards).tolist():
            in_shard = retain_shards == shard
            n_forget = int(np.count_nonzero(forget_shards == shard))
            n_retain = int(np.count_nonzero(in_shard))
            if int(self.shard_rows[shard]) != n_forget + n_retain:
                raise ValueError(
                    f"Constituent {shard} trained on {int(self.shard_rows[shard])} rows, but forget and retain contain "
                    f"{n_forget} + {n_retain} rows of shard {shard}. Pass every remaining training row of the shard."
                )
            restart_slices[shard] = int(forget_slices[forget_shards == shard].min())
            jobs.append(self._job(shard, retain.take(in_shard), retain_slices[in_shard], first_stage=restart_slices[shard]))
        steps = self._load_results((map_shards or run_in_process)(train_shard, jobs, device))
        self.to(device).eval()

        logger.info("SISA retrained %d of %d constituents, from slices %s.", len(restart_slices), self.config.n_shards, restart_slices)
        return SisaDeletion(restart_slices=restart_slices, steps=steps, wall_time_s=time.perf_counter() - started)

    def _assignment(self, split: Split, name: str) -> tuple[np.ndarray, np.ndarray]:
        if split.shards is None or split.groups is None:
            raise ValueError(f"SISA needs the shard and subject id of every {name} row: set Split.shards and Split.groups.")
        if split.n_features != self.n_features:
            raise ValueError(f"The {name} split has {split.n_features} features, but the ensemble expects {self.n_features}.")
        if len(split) and int(split.shards.max()) >= self.config.n_shards:
            raise ValueError(f"The {name} split has shard id {int(split.shards.max())}, but the ensemble has {self.config.n_shards} shards.")
        return split.shards, slice_of(split.groups, self.config.n_slices, self.config.seed)

    def _job(self, shard: int, rows: Split, slices: np.ndarray, first_stage: int) -> ShardJob:
        # Subject ids stay here: a job carries features, labels and slice numbers only.
        return ShardJob(shard=shard, first_stage=first_stage, start_state=self.checkpoints[shard, first_stage].clone(),
                        x=rows.x, y=rows.y, slices=slices, n_features=self.n_features, config=self.config)

    def _load_results(self, results: list[ShardResult]) -> int:
        """Load each retrained constituent and its new checkpoints, and return the summed optimizer steps."""
        steps = 0
        for result in results:
            last = self.config.n_slices
            self.checkpoints[result.shard, result.first_stage + 1:last + 1] = result.checkpoints.to(self.checkpoints.device)
            _load_state_vector(self.constituents[result.shard], self.checkpoints[result.shard, last])
            self.shard_rows[result.shard] = result.rows
            steps += result.steps
        return steps

    def describe(self) -> dict:
        """Return the configuration and per-shard row counts as JSON-compatible values."""
        return {**asdict(self.config), "shard_rows": self.shard_rows.tolist()}


@dataclass(frozen=True)
class ShardJob:
    """One constituent's training from a checkpoint: picklable, so a Dask or Ray worker can run it.

    `start_state` is the flattened constituent state before `first_stage`. `x`, `y` and
    `slices` are the shard's rows in training order with the slice of each row.
    """

    shard: int
    first_stage: int
    start_state: torch.Tensor
    x: np.ndarray
    y: np.ndarray
    slices: np.ndarray
    n_features: int
    config: SisaConfig


@dataclass(frozen=True)
class ShardResult:
    """The states of one constituent after each stage from `first_stage` on (CPU tensors), its rows and steps."""

    shard: int
    first_stage: int
    checkpoints: torch.Tensor
    rows: int
    steps: int


# map_shards(train_shard, jobs, device) -> one ShardResult per job, in job order.
ShardMap = Callable[[Callable[[ShardJob, torch.device], ShardResult], list[ShardJob], torch.device], list[ShardResult]]


def run_in_process(function: Callable[[ShardJob, torch.device], ShardResult], jobs: list[ShardJob], device: torch.device) -> list[ShardResult]:
    """Run the shard jobs here, one after another."""
    return [function(job, device) for job in jobs]


def train_shard(job: ShardJob, device: torch.device) -> ShardResult:
    """Restore a constituent from `job.start_state`, train stage `job.first_stage` and every later one, and return the checkpoints.

    Every stage seeds its own generators from (seed, shard, stage), so the result does
    not depend on the process that runs the job.
    """
    config = job.config
    constituent = TabularMLP(job.n_features, hidden=config.hidden, dropout=config.dropout)
    _load_state_vector(constituent, job.start_state)
    constituent.to(device)

    # Rows sorted by slice and then by their order in the shard, so stage r trains on a prefix.
    order = np.argsort(job.slices, kind="stable")
    rows = Split(job.x[order], job.y[order])
    x_all, y_all = split_tensors(rows, device)
    rows_through = np.searchsorted(job.slices[order], np.arange(config.n_slices), side="right")

    steps = 0
    checkpoints = []
    for stage in range(job.first_stage, config.n_slices):
        n_rows = int(rows_through[stage])
        if n_rows > 0:
            # The scaler comes from the first non-empty stage only, so a deletion in a
            # later slice leaves it, and every checkpoint before that slice, valid.
            n_earlier = int(rows_through[stage - 1]) if stage > 0 else 0
            if n_earlier == 0:
                constituent.fit_scaler(rows.x[:n_rows])
            steps += _train_stage(constituent, x_all[:n_rows], y_all[:n_rows], config, stage_seed(config.seed, job.shard, stage))
        checkpoints.append(_state_vector(constituent).cpu())

    state_size = job.start_state.numel()
    stacked = torch.stack(checkpoints) if checkpoints else torch.zeros(0, state_size)
    return ShardResult(shard=job.shard, first_stage=job.first_stage, checkpoints=stacked, rows=len(job.y), steps=steps)


def _train_stage(constituent: TabularMLP, x: torch.Tensor, y: torch.Tensor, config: SisaConfig, seed: int) -> int:
    # A fresh optimizer per stage, so a checkpoint contains all the state that later stages need.
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(constituent.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = 0
    for _ in range(config.epochs_per_slice):
        steps += train_one_epoch(constituent, optimizer, x, y, config.batch_size, generator)
    return steps


def train_sisa(train: Split, config: SisaConfig, device: torch.device) -> SisaEnsemble:
    """Build a SisaEnsemble and train it on `train`, which needs `shards` and `groups`."""
    if len(train) == 0:
        raise ValueError("The training split is empty.")
    started = time.perf_counter()
    ensemble = SisaEnsemble(train.n_features, config)
    steps = ensemble.fit(train, device)
    logger.info("Trained a SISA ensemble of %d shards x %d slices in %d steps (%.1f s).",
                config.n_shards, config.n_slices, steps, time.perf_counter() - started)
    return ensemble


def _state_vector(module: nn.Module) -> torch.Tensor:
    return torch.cat([tensor.detach().flatten().float() for tensor in module.state_dict().values()])


def _load_state_vector(module: nn.Module, vector: torch.Tensor) -> None:
    state = module.state_dict()
    offset = 0
    for name, tensor in state.items():
        size = tensor.numel()
        state[name] = vector[offset:offset + size].view_as(tensor).to(tensor.dtype).clone()
        offset += size
    module.load_state_dict(state)
