"""The run context: workspace, settings, ledger and hasher that every stage of a run uses."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tasks import versioning
from tasks.hashing import SubjectHasher, load_hasher
from tasks.ledger import Batch, BatchState, DeletionRequest, Ledger, RequestState, utcnow
from tasks.settings import EnvironmentSettings, GateSettings, WorkspaceSettings
from tasks.workspace import Workspace, resolve_workspace

log = logging.getLogger("lethe.context")


@dataclass
class RunContext:
    ws: Workspace
    settings: WorkspaceSettings
    ledger: Ledger
    hasher: SubjectHasher


def open_context(workspace: str | None, gates: GateSettings | None = None) -> RunContext:
    """Load the workspace; flow parameters override the stored gate thresholds for this run only."""
    ws = resolve_workspace(workspace).require()
    settings = WorkspaceSettings.load(ws.root)
    if gates is not None:
        settings = settings.model_copy(update={"gates": gates})
    environment = EnvironmentSettings()
    hasher = load_hasher(environment.hmac_key, ws.hmac_key_file)
    return RunContext(ws, settings, Ledger(environment.ledger_url or ws.ledger_url), hasher)


def open_ledger(ws: Workspace) -> Ledger:
    """Open the workspace's ledger, or the one LETHE_LEDGER_URL names."""
    return Ledger(EnvironmentSettings().ledger_url or ws.ledger_url)


def roll_back_batch(ctx: RunContext, batch_id: str, error: BaseException | str) -> None:
    """Restore the committed data version and return the batch's requests to pending."""
    if versioning.has_uncommitted_data(ctx.ws):
        versioning.rollback_data(ctx.ws)
    versioning.delete_orphans(ctx.ws)
    with ctx.ledger.session() as s:
        batch = s.get(Batch, batch_id)
        batch.state = BatchState.ROLLED_BACK
        batch.finished_at = utcnow()
        batch.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"[:2000]
        for request in s.query(DeletionRequest).filter(DeletionRequest.batch_id == batch_id):
            request.state = RequestState.PENDING
            request.batch_id = None
    log.warning("Rolled back batch %s; its requests are pending again", batch_id)


def check_run_inputs(ws: Workspace, method: str | None, sources: list[str]) -> None:
    """Validate a run's inputs before any work starts, so a typo fails in a second, not after the purge."""
    from tasks.sources import validate_specs

    ws.require()
    settings = WorkspaceSettings.load(ws.root)
    environment = EnvironmentSettings()
    load_hasher(environment.hmac_key, ws.hmac_key_file)
    check_unlearning(settings, method)
    validate_specs(sources)


def check_unlearning(settings: WorkspaceSettings, method: str | None) -> None:
    """Reject unlearning settings, or a requested method, that cannot unlearn from the workspace's model family."""
    from tasks.router import validate_method, validate_settings

    validate_settings(settings.unlearn, settings.model.family)
    if method is not None:
        validate_method(method, settings.model.family)
