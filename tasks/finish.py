"""The stages after commit: register, retire, certify and acknowledge.

Each reads what it needs from the ledger and is idempotent, so the next run can
finish a batch whose run was killed anywhere after commit.
"""

from __future__ import annotations

import hashlib
import json
import logging

from tasks import registry
from tasks.certificate import load_signing_key, sign
from tasks.chain import LedgerEntry, canonical
from tasks.context import RunContext
from tasks.faults import checkpoint
from tasks.ledger import Batch, BatchState, DeletionRequest, RequestState, Tombstone, utcnow
from tasks.publish import push_data, set_batch
from tasks.retire import purge_objects, retire_models
from tasks.settings import EnvironmentSettings
from tasks.sources import QueueSource, acknowledge_sources

log = logging.getLogger("lethe.finish")


def register_batch(ctx: RunContext, batch_id: str) -> str:
    """Register the batch's candidate as the new champion with its provenance tags."""
    batch = ctx.ledger.get_batch(batch_id)
    summary = batch.summary or {}
    candidate = registry.LoggedCandidate(run_id=batch.candidate_run_id, model_uri=batch.candidate_model_uri)
    version = registry.register(ctx.ws, ctx.settings.model_name, candidate, {
        "parent_version": batch.model_version_before or "", "batch_id": batch_id,
        "request_count": str(batch.request_count), "subject_digest": batch.subject_digest,
        "rows_removed": str(batch.rows_removed), "data_git_rev": batch.git_rev_after,
        "data_md5": batch.data_md5_after, "method": batch.method,
        "method_reason": summary.get("method_reason", ""), "model_family": summary.get("model_family", ""),
        "gates": json.dumps(summary.get("gates", [])),
        "prefect_flow_run_id": summary.get("flow_run_id", ""), "device": summary.get("device", ""),
        "contains_erased_data": "false",
    })
    set_batch(ctx, batch_id, state=BatchState.REGISTERED, model_version_after=version)
    return version


def retire_batch(ctx: RunContext, batch_id: str) -> None:
    """Purge the old data objects and retire the old model versions by LETHE_RETIREMENT_POLICY.

    What was archived or deleted (version numbers, run and model ids) is stored in the
    batch's summary in the ledger, and the signed certificate repeats it.
    """
    batch = ctx.ledger.get_batch(batch_id)
    purge_objects(ctx.ws, ctx.ledger, batch_id, batch.affected_objects or {})
    if not batch.model_version_after:
        set_batch(ctx, batch_id, state=BatchState.RETIRED)
        return
    policy = EnvironmentSettings().retirement_policy
    retired = retire_models(ctx.ws, ctx.settings.model_name, batch_id, batch.model_version_after, policy)
    summary = {**(batch.summary or {}), "retired_models": {"policy": policy, "versions": retired}}
    set_batch(ctx, batch_id, state=BatchState.RETIRED, summary=summary)


def certificate_body(ctx: RunContext, batch_id: str) -> dict:
    """Collect the facts the certificate attests, from the ledger only."""
    with ctx.ledger.session() as s:
        batch = s.get(Batch, batch_id)
        tombstones = [{"relpath": t.relpath, "md5": t.object_md5, "stores": t.stores}
                      for t in s.query(Tombstone).filter(Tombstone.batch_id == batch_id).order_by(Tombstone.relpath)]
        request_ids = sorted(r.request_id for r in s.query(DeletionRequest).filter(DeletionRequest.batch_id == batch_id))
        head = s.query(LedgerEntry).order_by(LedgerEntry.seq.desc()).first()
    summary = batch.summary or {}
    return {
        "type": "lethe.erasure-certificate", "version": 1, "batch_id": batch_id,
        "issued_at": utcnow().isoformat(timespec="seconds"),
        "subjects": {"count": batch.subject_count, "hashed_key_digest": batch.subject_digest,
                     "hash": "HMAC-SHA256 of the subject key; digest = SHA-256 over the sorted hashes"},
        "requests": {"count": batch.request_count,
                     "request_id_digest": hashlib.sha256("\n".join(request_ids).encode()).hexdigest()},
        "data": {"md5_before": batch.data_md5_before, "md5_after": batch.data_md5_after,
                 "git_rev_after": batch.git_rev_after, "rows_removed": batch.rows_removed},
        "tombstones": tombstones,
        "model": {"name": ctx.settings.model_name, "version_before": batch.model_version_before,
                  "version_after": batch.model_version_after},
        "retired_models": summary.get("retired_models", {}),
        "method": batch.method, "method_reason": summary.get("method_reason"),
        "gates": summary.get("gates", []),
        "metrics": {"before": summary.get("metrics_before", {}), "after": summary.get("metrics_after", {})},
        "timestamps": {"started_at": batch.started_at.isoformat(timespec="seconds")},
        "ledger_head": {"seq": head.seq, "entry_hash": head.entry_hash} if head else None,
    }


def certify_batch(ctx: RunContext, batch_id: str) -> dict:
    """Sign the certificate, store it in the workspace and on the MLflow run, and record its digest."""
    envelope = sign(certificate_body(ctx, batch_id), load_signing_key(ctx.ws.signing_key_file))
    digest = hashlib.sha256(canonical(envelope).encode()).hexdigest()
    path = ctx.ws.certificates_dir / f"{batch_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")
    batch = ctx.ledger.get_batch(batch_id)
    if batch.candidate_run_id:
        registry.log_json_artifact(ctx.ws, batch.candidate_run_id, envelope, "certificate.json")
    set_batch(ctx, batch_id, certificate_digest=digest)
    log.info("Certify: signed certificate %s (sha256 %s)", path.name, digest[:16])
    return envelope


def acknowledge_batch(ctx: RunContext, batch_id: str, sources: list[QueueSource]) -> int:
    """Close the batch's requests in the ledger, then acknowledge each one at its source.

    A source that this run does not read keeps its refs; the next run that reads it finds
    the requests closed and acknowledges them then.
    """
    now = utcnow()
    with ctx.ledger.session() as s:
        refs = set()
        closed = 0
        for request in s.query(DeletionRequest).filter(DeletionRequest.batch_id == batch_id):
            closed += 1
            if not request.state.is_closed:
                request.state = RequestState.COMPLETED if request.rows_removed else RequestState.NO_DATA_HELD
                request.completed_at = now
            refs.add(request.source_ref)
        batch = s.get(Batch, batch_id)
        batch.state = BatchState.ACKNOWLEDGED
        batch.finished_at = now
    acknowledged = acknowledge_sources(sources, refs, ctx.hasher)
    log.info("Acknowledge: %d requests closed, %d queue items acknowledged", closed, acknowledged)
    return acknowledged


def finish_batch(ctx: RunContext, batch_id: str, sources: list[QueueSource], timer) -> None:
    """Drive a committed batch through register, retire, certify and acknowledge, from its current state."""
    batch = ctx.ledger.get_batch(batch_id)
    state, has_data = batch.state, batch.rows_removed > 0
    if state == BatchState.COMMITTED and has_data:
        with timer("register"):
            push_data(ctx)
            register_batch(ctx, batch_id)
        checkpoint("after_register")
        state = BatchState.REGISTERED
    if state in (BatchState.COMMITTED, BatchState.REGISTERED):
        with timer("retire"):
            retire_batch(ctx, batch_id)
        checkpoint("after_retire")
    checkpoint("before_acknowledge")
    with timer("acknowledge"):
        certify_batch(ctx, batch_id)
        acknowledge_batch(ctx, batch_id, sources)


def batch_summary(ctx: RunContext, batch_id: str, stage_seconds: dict[str, float]) -> dict:
    """Assemble the batch's summary from the ledger: counts, digests, versions, gates, never subject ids."""
    with ctx.ledger.session() as s:
        batch = s.get(Batch, batch_id)
        tombstones = [{"relpath": t.relpath, "md5": t.object_md5, "stores": t.stores}
                      for t in s.query(Tombstone).filter(Tombstone.batch_id == batch_id)]
        no_data = {r.subject_hash for r in s.query(DeletionRequest).filter(DeletionRequest.batch_id == batch_id)
                   if not r.rows_removed}
    stored = batch.summary or {}
    return {
        "batch_id": batch_id, "status": "completed" if batch.rows_removed else "no_data_held",
        "request_count": batch.request_count, "subject_count": batch.subject_count,
        "subject_digest": batch.subject_digest, "no_data_held": len(no_data), "rows_removed": batch.rows_removed,
        "data_md5_before": batch.data_md5_before, "data_md5_after": batch.data_md5_after,
        "git_rev": batch.git_rev_after, "model_version_before": batch.model_version_before,
        "model_version_after": batch.model_version_after, "method": batch.method or "none",
        "method_reason": stored.get("method_reason", "no subject held data"),
        "metrics_before": stored.get("metrics_before", {}), "metrics_after": stored.get("metrics_after", {}),
        "attempts": stored.get("attempts", []), "tombstones": tombstones,
        "certificate_digest": batch.certificate_digest, "stage_seconds": stage_seconds,
    }


def seal_ledger(ctx: RunContext) -> dict | None:
    """Sign the journal head at the end of a run, unless an earlier seal already covers it.

    A certificate anchors the head at issue time. The entries written after it (closing
    the requests, the certificate digest) are covered by this seal, so rewriting them
    and recomputing their hashes is detected too.
    """
    with ctx.ledger.session() as s:
        head = s.query(LedgerEntry).order_by(LedgerEntry.seq.desc()).first()
    if head is None:
        return None
    path = ctx.ws.seals_dir / f"seal-{head.seq:010d}.json"
    if path.exists():
        return None
    body = {"type": "lethe.ledger-seal", "version": 1, "seq": head.seq, "entry_hash": head.entry_hash,
            "sealed_at": utcnow().isoformat(timespec="seconds")}
    envelope = sign(body, load_signing_key(ctx.ws.signing_key_file))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")
    log.info("Sealed the ledger journal at entry %d", head.seq)
    return envelope
