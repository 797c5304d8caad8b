"""The nightly deletion run: ingest, purge, unlearn, validate, commit, register, retire, acknowledge.

Parameters are references (a workspace, queue sources), never subject ids, because
Prefect stores flow-run parameters in its database and shows them in the UI.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks import registry
from tasks.context import RunContext, open_context, recover_interrupted, roll_back_batch
from tasks.ingest import ingest_task
from tasks.publish import acknowledge_task, commit_task, register_task, set_batch
from tasks.purge import purge_task
from tasks.report import batch_markdown
from tasks.retire import retire_task
from tasks.settings import GateSettings
from tasks.shards import read_all
from tasks.sources import QueueSource, open_sources, validate_specs
from tasks.unlearn import unlearn_task
from tasks.validate import validate_data_task
from flows.logs import workspace_log_file

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
            self.seconds[stage] = round(time.perf_counter() - started, 3)


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
        method: Unlearning method tried first; defaults to the workspace setting.
        gates: Gate thresholds for this run; defaults to the workspace setting.
    """
    validate_specs(sources)
    logger = get_run_logger()
    ctx = open_context(workspace, gates)
    with workspace_log_file(ctx.ws.log_file):
        return _run(ctx, open_sources(sources, ctx.ws), method, logger)


def _run(ctx: RunContext, queue_sources: list[QueueSource], method: str | None, logger) -> dict:
    from models.device import pick_device

    timer = StageTimer()
    recovered = recover_interrupted(ctx)
    if recovered:
        logger.warning("Rolled back %d interrupted batch(es): %s", len(recovered), recovered)

    # 1. Ingest: open a batch over every pending request.
    with timer("ingest"):
        batch = ingest_task(ctx.ws, ctx.ledger, ctx.hasher, ctx.settings.deadline_days, queue_sources)
    if batch.batch_id is None:
        logger.info("No pending requests; nothing to do")
        return {"status": "empty", "quarantined": batch.quarantined, "stage_seconds": timer.seconds}

    champion_version = registry.champion_version(ctx.ws, ctx.settings.model_name)
    device = pick_device(ctx.settings.unlearn.device)
    try:
        # 2. Purge: new data version without the batch's subjects (not committed yet).
        with timer("purge"):
            purged = purge_task(ctx.ws, batch.subject_hashes, ctx.hasher)

        if purged.rows_removed:
            # 3. Validate the data, then 4. unlearn with gates and the exact fallback.
            with timer("validate_data"):
                data_report = validate_data_task(ctx.ws, ctx.hasher, purged, batch.subject_hashes)
            if not data_report["success"]:
                raise RuntimeError("The new data version failed validation; see data_validation.json in the log.")
            with timer("unlearn"):
                champion = registry.load_version(ctx.ws, ctx.settings.model_name, champion_version)
                candidate = unlearn_task(champion, read_all(ctx.ws.data_dir), purged.forget_rows,
                                         ctx.settings, device, method)
            with timer("log_candidate"):
                logged = registry.log_candidate(
                    ctx.ws, ctx.settings.model_name, candidate.model.cpu(), run_name=batch.batch_id,
                    params={"method": candidate.method, "batch_id": batch.batch_id,
                            "parent_version": champion_version, "settings": ctx.settings.model_dump_json()},
                    metrics=candidate.metrics,
                    artifacts={"data_validation.json": data_report,
                               "gates.json": {"attempts": [a.as_dict() for a in candidate.attempts]},
                               "unlearn_record.json": candidate.record},
                )
    except BaseException as exc:
        roll_back_batch(ctx, batch.batch_id, exc)
        raise

    if not purged.rows_removed:
        # Every subject was unknown: nothing to erase, so no new data or model version.
        summary = {"batch_id": batch.batch_id, "status": "no_data_held", "request_count": len(batch.request_ids),
                   "stage_seconds": timer.seconds}
        acknowledge_task(ctx, batch, set(), summary, queue_sources)
        logger.info("Batch %s: no subject held data; %d requests closed", batch.batch_id, len(batch.request_ids))
        return summary

    # 5. Commit: from here on the erasure is permanent.
    with timer("commit"):
        git_rev = commit_task(ctx, batch, purged)

    # 6. Register: new champion with provenance.
    with timer("register"):
        new_version = register_task(ctx, logged, {
            "parent_version": champion_version, "batch_id": batch.batch_id,
            "request_count": str(len(batch.request_ids)), "subject_digest": batch.subject_digest,
            "rows_removed": str(purged.rows_removed), "data_git_rev": git_rev, "data_md5": purged.data_md5_after,
            "method": candidate.method, "method_reason": candidate.reason,
            "gates": json.dumps([{"name": g.name, "value": round(g.value, 4), "passed": g.passed} for g in candidate.gates]),
            "prefect_flow_run_id": str(flow_run.id or ""), "device": str(device), "contains_erased_data": "false",
        })
        set_batch(ctx, batch.batch_id, model_version_before=champion_version,
                  model_version_after=new_version, method=candidate.method)

    # 7. Retire lineage: tombstone old shard objects, tag old model versions.
    with timer("retire"):
        tombstones, retired = retire_task(ctx.ws, ctx.ledger, ctx.settings.model_name, batch.batch_id,
                                          purged.affected_objects, new_version)

    # 8. Acknowledge: close the requests and publish the summary.
    summary = {
        "batch_id": batch.batch_id, "status": "completed", "request_count": len(batch.request_ids),
        "subject_count": len(batch.subject_hashes), "subject_digest": batch.subject_digest,
        "no_data_held": len(set(batch.subject_hashes) - purged.found_hashes),
        "rows_removed": purged.rows_removed, "data_md5_before": purged.data_md5_before,
        "data_md5_after": purged.data_md5_after, "git_rev": git_rev,
        "model_version_before": champion_version, "model_version_after": new_version,
        "method": candidate.method, "method_reason": candidate.reason,
        "metrics_before": candidate.champion_metrics, "metrics_after": candidate.metrics,
        "attempts": [a.as_dict() for a in candidate.attempts], "tombstones": tombstones,
        "retired_versions": retired, "stage_seconds": timer.seconds,
    }
    with timer("acknowledge"):
        acknowledge_task(ctx, batch, purged.found_hashes, summary, queue_sources)
        create_markdown_artifact(key="erasure-batch", markdown=batch_markdown(summary),
                                 description=f"Erasure batch {batch.batch_id}")
    summary["stage_seconds"] = timer.seconds
    logger.info("Batch %s done: %d rows removed, version %s -> %s via %s",
                batch.batch_id, purged.rows_removed, champion_version, new_version, candidate.method)
    return summary
