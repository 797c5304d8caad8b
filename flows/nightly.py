"""The nightly deletion run: ingest, purge, unlearn, validate, commit, register, retire, acknowledge.

Parameters are references (a workspace, queue sources), never subject ids, because
Prefect stores flow-run parameters in its database and shows them in the UI.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.logs import workspace_log_file
from tasks import registry
from tasks.context import RunContext, check_champion_family, check_unlearning, open_context, roll_back_batch
from tasks.faults import checkpoint
from tasks.finish import batch_summary, finish_batch, seal_ledger
from tasks.ingest import ingest_task
from tasks.lock import heartbeat, run_lock
from tasks.publish import commit_task, record_candidate, record_purge, set_batch
from tasks.purge import purge_task
from tasks.recovery import recover_interrupted
from tasks.report import batch_markdown
from tasks.settings import GateSettings
from tasks.shards import read_all
from tasks.sources import QueueSource, hold_messages, open_sources, validate_specs
from tasks.unlearn import unlearn_task
from tasks.validate import validate_data_task

DEFAULT_SOURCES = ("local",)


class StageTimer:
    """Wall time per stage, reported in the batch summary and the README's numbers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 3)


@flow(name="nightly_deletion_run", persist_result=False, log_prints=False)
def nightly_deletion_run(
    workspace: str | None = None,
    sources: list[str] = list(DEFAULT_SOURCES),
    method: str | None = None,
    gates: GateSettings | None = None,
) -> dict:
    """Process every pending deletion request of the queue sources in one erasure batch.

    Args:
        workspace: Workspace directory; defaults to LETHE_WORKSPACE.
        sources: Queue sources to read, in order: "local" (the workspace's queue directory),
            "s3://<bucket>/<prefix>/", "sqs://<queue name>" or an SQS queue URL.
        method: "auto" (the router picks by model family) or a method name from `lethe methods`;
            defaults to the workspace setting.
        gates: Gate thresholds for this run; defaults to the workspace setting.
    """
    validate_specs(sources)
    logger = get_run_logger()
    ctx = open_context(workspace, gates)
    check_unlearning(ctx.settings, method)
    check_champion_family(ctx)
    holder = f"flow-run {flow_run.id or 'local'}"
    with workspace_log_file(ctx.ws.log_file), run_lock(ctx.ledger, holder):
        summary = _run(ctx, open_sources(sources, ctx.ws), method, logger, holder)
        seal_ledger(ctx)
        return summary


def _keep_alive(ctx: RunContext, queue_sources: list[QueueSource], holder: str) -> None:
    """Between stages: renew the lock's heartbeat and the visibility of held SQS messages."""
    heartbeat(ctx.ledger, holder)
    hold_messages(queue_sources)


def _run(ctx: RunContext, queue_sources: list[QueueSource], method: str | None, logger, holder: str) -> dict:
    timer = StageTimer()

    # 0. Recover: roll back batches killed before commit, finish those killed after it.
    for batch_id, outcome in recover_interrupted(ctx, queue_sources, timer).items():
        logger.warning("Recovered interrupted batch %s: %s", batch_id, outcome)

    # 1. Ingest: open a batch over every pending request.
    with timer("ingest"):
        batch = ingest_task(ctx.ws, ctx.ledger, ctx.hasher, ctx.settings.deadline_days, queue_sources)
    _warn_near_deadline(ctx, logger)
    if batch.batch_id is None:
        logger.info("No pending requests; nothing to do")
        return {"status": "empty", "quarantined": batch.quarantined, "stage_seconds": timer.seconds}
    checkpoint("after_ingest")

    try:
        _prepare(ctx, batch, lambda: _keep_alive(ctx, queue_sources, holder), method, timer)
    except BaseException as exc:
        roll_back_batch(ctx, batch.batch_id, exc)
        raise

    # 5. Commit: from here on the erasure is permanent and the next run finishes it.
    with timer("commit"):
        commit_task(ctx, batch.batch_id)
    checkpoint("after_commit")

    # 6.-8. Register, retire lineage, certify and acknowledge.
    _keep_alive(ctx, queue_sources, holder)
    finish_batch(ctx, batch.batch_id, queue_sources, timer)

    summary = batch_summary(ctx, batch.batch_id, timer.seconds)
    create_markdown_artifact(key="erasure-batch", markdown=batch_markdown(summary),
                             description=f"Erasure batch {batch.batch_id}")
    logger.info("Batch %s done: %d rows removed, version %s -> %s via %s", batch.batch_id, summary["rows_removed"],
                summary["model_version_before"], summary["model_version_after"], summary["method"])
    return summary


def _warn_near_deadline(ctx: RunContext, logger) -> None:
    from tasks.status import DEADLINE_WARNING, near_deadline

    urgent = near_deadline(ctx.ledger)
    if urgent:
        logger.warning("%d open request(s) are overdue or within %d days of their deadline: %s", len(urgent),
                       DEADLINE_WARNING.days, ", ".join(f"{r.request_id} (due {r.deadline:%Y-%m-%d})" for r in urgent[:20]))


def _prepare(ctx: RunContext, batch, keep_alive, method: str | None, timer) -> None:
    """Stages 2-4, all rolled back on failure: purge, validate the data, unlearn with gates."""
    from models.device import pick_device
    from models.families import family_of

    champion_version = registry.champion_version(ctx.ws, ctx.settings.model_name)
    set_batch(ctx, batch.batch_id, model_version_before=champion_version)

    # 2. Purge: new data version without the batch's subjects (not committed yet).
    with timer("purge"):
        purged = purge_task(ctx.ws, batch.subject_hashes, ctx.hasher)
        record_purge(ctx, batch.batch_id, purged)
    checkpoint("after_purge")
    keep_alive()

    if not purged.rows_removed:
        # No subject held data: nothing to unlearn, and no new data or model version.
        return

    # 3. Validate the new data with Great Expectations.
    with timer("validate_data"):
        data_report = validate_data_task(ctx.ws, ctx.hasher, purged, batch.subject_hashes)
    if not data_report["success"]:
        raise RuntimeError("The new data version failed validation; see data_validation.json on the MLflow run.")
    keep_alive()

    # 4. Unlearn with gates and the exact fallback, and log the candidate (not registered yet).
    device = pick_device(ctx.settings.unlearn.device)
    with timer("unlearn"):
        champion = registry.load_version(ctx.ws, ctx.settings.model_name, champion_version)
        candidate = unlearn_task(champion, read_all(ctx.ws.data_dir), purged.forget_rows, ctx.settings, device, method)
    with timer("log_candidate"):
        attempts = [a.as_dict() for a in candidate.attempts]
        logged = registry.log_candidate(
            ctx.ws, ctx.settings.model_name, candidate.model.cpu(), run_name=batch.batch_id,
            params={"method": candidate.method, "model_family": family_of(candidate.model), "batch_id": batch.batch_id,
                    "parent_version": champion_version, "settings": ctx.settings.model_dump_json()},
            metrics=candidate.metrics,
            artifacts={"data_validation.json": data_report, "gates.json": {"attempts": attempts},
                       "unlearn_record.json": candidate.record},
        )
        record_candidate(ctx, batch.batch_id, logged, candidate.method, {
            "method_reason": candidate.reason, "model_family": family_of(candidate.model),
            "gates": [{"name": g.name, "value": round(g.value, 4), "passed": g.passed} for g in candidate.gates],
            "metrics_before": candidate.champion_metrics, "metrics_after": candidate.metrics,
            "attempts": attempts, "flow_run_id": str(flow_run.id or ""), "device": str(device),
        })
    checkpoint("after_unlearn")
