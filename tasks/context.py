"""The run context: workspace, settings, ledger and hasher that every stage of a run uses."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tasks import versioning
from tasks.errors import ConfigurationError, WorkspaceError
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
    return RunContext(ws, settings, open_ledger(ws), hasher)


def open_ledger(ws: Workspace) -> Ledger:
    """Open the ledger LETHE_LEDGER_URL names, else the workspace's, and check it is the workspace's own.

    A workspace records the id of the ledger it was created with. A different or new,
    empty ledger (LETHE_LEDGER_URL forgotten or pointing elsewhere, a deleted ledger
    file) is rejected, because erasures recorded there would be missing from the real one.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    configured = EnvironmentSettings().ledger_url
    url = configured or ws.ledger_url
    redacted_url = make_url(url).render_as_string(hide_password=True)
    try:
        ledger = Ledger(url)
        actual = ledger.ledger_id()
    except SQLAlchemyError as exc:
        reason = str(exc.orig if getattr(exc, "orig", None) else exc).splitlines()[0]
        raise WorkspaceError(f"The ledger {redacted_url} could not be opened ({reason}). Restore it from a backup, or set "
                             "LETHE_LEDGER_URL to the workspace's ledger.") from None
    if not ws.ledger_id_file.exists():
        # A workspace created before ledgers had ids adopts the ledger it opens now.
        ws.ledger_id_file.write_text(ledger.assign_id() + "\n")
        return ledger
    expected = ws.ledger_id_file.read_text().strip()
    if actual != expected:
        ledger.dispose()
        found = "a new, empty ledger" if actual is None else f"the ledger {actual}"
        setting = f"LETHE_LEDGER_URL is {redacted_url}" if configured else "LETHE_LEDGER_URL is unset"
        raise ConfigurationError(
            f"Workspace {ws.root} was created with the ledger {expected}, but {redacted_url} is {found} ({setting}). "
            "Set LETHE_LEDGER_URL to the database the workspace was created with, or restore its ledger from a backup."
        )
    return ledger


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


def check_champion_family(ctx: RunContext) -> None:
    """Reject a run whose `model.family` setting differs from the family of the registered champion.

    The router and the method checks follow the setting, so a mismatch would fail only
    after the purge, or unlearn with the wrong family's methods.
    """
    from tasks import registry

    version = registry.champion_version(ctx.ws, ctx.settings.model_name)
    if version is None:
        return
    family = registry.version_tags(ctx.ws, ctx.settings.model_name, version).get("model_family")
    if family and family != ctx.settings.model.family:
        raise ConfigurationError(
            f"lethe.json sets model.family to {ctx.settings.model.family!r}, but the champion (version {version}) is a "
            f"{family!r} model. Set model.family back to {family!r}; a new family needs a new workspace "
            f"(`lethe init --family {ctx.settings.model.family}`)."
        )
