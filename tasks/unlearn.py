"""Unlearn: make the champion forget the batch's rows, escalating to exact retraining when a gate fails.

Nothing is promoted that failed a forgetting gate: approximate candidates must pass
every gate, and the exact fallback forgets by construction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.dataset import SPLIT, SUBJECT_KEY
from tasks.modeling import splits_of, to_split, train_config, utility_metrics
from tasks.router import RETRAIN, is_exact, route
from tasks.settings import WorkspaceSettings
from tasks.validate import GateResult, forgetting_gates, gates_as_dict, utility_gates

log = logging.getLogger("lethe.unlearn")

@dataclass
class Attempt:
    method: str
    gates: list[GateResult]
    metrics: dict[str, float]
    wall_time_s: float

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def as_dict(self) -> dict:
        return {"method": self.method, "passed": self.passed, "wall_time_s": round(self.wall_time_s, 3),
                "gates": gates_as_dict(self.gates), "metrics": self.metrics}


@dataclass
class Candidate:
    model: object
    method: str
    reason: str
    champion_metrics: dict[str, float]
    metrics: dict[str, float]
    gates: list[GateResult]
    record: dict
    attempts: list[Attempt] = field(default_factory=list)


@dataclass(frozen=True)
class ForgetSet:
    """The forget rows the champion trained on, with the subject of each row and of each test row.

    Subjects let the forgetting gate resample whole held-out subjects, because the
    yearly rows of one person are correlated and a row-level null understates the spread.
    """

    split: object
    subjects: np.ndarray
    test_subjects: np.ndarray


def evaluate(model, splits, forget: ForgetSet | None, device) -> tuple[dict[str, float], object | None]:
    """Utility metrics, plus forgetting evidence against the test split when there is a forget set."""
    from models.evaluation import forgetting_evidence

    metrics = utility_metrics(model, splits, device)
    if forget is None:
        return metrics, None
    evidence = forgetting_evidence(model, forget.split, splits["test"], device,
                                   forget_groups=forget.subjects, heldout_groups=forget.test_subjects)
    metrics.update({f"forget_{k}": float(v) for k, v in asdict(evidence).items()})
    return metrics, evidence


def run_method(name: str, champion, forget, splits, settings: WorkspaceSettings, device):
    """Run one method: `retrain` retrains the champion's family, any other comes from the registry."""
    from models.families import retrain_family
    from models.unlearning import get_method
    from tasks.settings import EnvironmentSettings
    from tasks.shard_runner import shard_map

    environment = EnvironmentSettings()
    map_shards = shard_map(environment.dask_cluster, environment.dask_workers)
    if name == RETRAIN:
        return retrain_family(champion, splits["train"], splits["val"], train_config(settings.train), device, map_shards)
    method_settings = dict(settings.unlearn.method_settings.get(name, {}))
    if name == "sisa" and map_shards is not None:
        return get_method(name)(champion, forget, splits["train"], splits["val"], method_settings, device, map_shards=map_shards)
    return get_method(name)(champion, forget, splits["train"], splits["val"], method_settings, device)


def unlearn(champion, new_data: pd.DataFrame, forget_rows: pd.DataFrame, settings: WorkspaceSettings,
            device, method: str | None = None) -> Candidate:
    """Try the methods the router picks, gate each, and register the first that passes or is exact."""
    n_shards = settings.data.n_shards
    splits = splits_of(new_data, n_shards)
    trained_on = forget_rows[forget_rows[SPLIT] == "train"] if len(forget_rows) else forget_rows
    forget = None
    if len(trained_on):
        test_subjects = new_data.loc[new_data[SPLIT] == "test", SUBJECT_KEY].to_numpy()
        forget = ForgetSet(to_split(trained_on, n_shards), trained_on[SUBJECT_KEY].to_numpy(), test_subjects)
    champion_metrics, _ = evaluate(champion, splits, forget, device)

    chosen = route(champion, method or settings.unlearn.method, settings.unlearn)
    fallback = f", falling back to {chosen.plan[-1]} on a failed gate" if len(chosen.plan) > 1 else ""
    log.info("Unlearn: router chose %s%s (%s)", chosen.plan[0], fallback, chosen.reason)
    attempts: list[Attempt] = []
    for name in chosen.plan:
        started = time.perf_counter()
        if forget is None and name != RETRAIN:
            # Only held-out rows were erased: the champion never trained on them. A requested
            # retrain still runs, because early stopping read the validation rows.
            log.info("Unlearn: no training rows among the forget rows; the champion's weights carry over")
            model, record, name = champion, {"method": "carry_over", "steps": 0}, "carry_over"
        else:
            forget_rows = len(forget.split) if forget is not None else 0
            log.info("Unlearn: running %s on %d forget rows, %d retain rows", name, forget_rows, len(splits["train"]))
            result = run_method(name, champion, forget.split if forget is not None else None, splits, settings, device)
            model, record = result.model, asdict(result.record)
        elapsed = time.perf_counter() - started

        metrics, evidence = evaluate(model, splits, forget, device)
        gates = utility_gates(champion_metrics, metrics, settings.gates)
        if evidence is not None:
            gates += forgetting_gates(evidence, settings.gates)
        attempt = Attempt(name, gates, metrics, elapsed)
        attempts.append(attempt)
        for gate in gates:
            log.info("Gate %s: %s", name, gate.describe())

        exact = name == "carry_over" or is_exact(name)
        if attempt.passed or exact:
            if exact and not attempt.passed:
                log.warning("Exact method %s missed a utility gate; registering it because it forgets by construction", name)
            reason = chosen.reason if len(attempts) == 1 else \
                f"{chosen.reason}; {attempts[0].method} failed gates {[g.name for g in attempts[0].gates if not g.passed]}; escalated to {name}"
            if record.get("details", {}).get("retrained") and name == "newton":
                reason += "; the removal would have overrun the budget, so newton refit the head from scratch with fresh noise"
            return Candidate(model, name, reason, champion_metrics, metrics, gates, record, attempts)
        log.warning("Unlearn: %s failed gates %s; escalating", name, [g.name for g in gates if not g.passed])

    failed = attempts[-1].method
    raise RuntimeError(f"Unlearning method {failed} failed its gates and no exact method followed it; "
                       f"set unlearn.fallback to 'retrain' in lethe.json.")


@task(name="unlearn", cache_policy=NO_CACHE, persist_result=False)
def unlearn_task(champion, new_data: pd.DataFrame, forget_rows: pd.DataFrame, settings: WorkspaceSettings,
                 device, method: str | None = None) -> Candidate:
    """Produce a gated candidate model that has forgotten the forget rows."""
    return unlearn(champion, new_data, forget_rows, settings, device, method)
