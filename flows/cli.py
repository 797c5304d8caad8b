"""The `lethe` command line: thin wrappers that parse, call one function, and map errors to exit codes."""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.errors import LetheError
from tasks.workspace import Workspace, resolve_workspace

app = typer.Typer(help="Lethe: erase data subjects from training data, its lineage and the models trained on it.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
request_app = typer.Typer(help="Manage deletion requests.", no_args_is_help=True)
app.add_typer(request_app, name="request")
audit_app = typer.Typer(help="Verify the ledger and certificates, and scan the stores for a subject.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
# Piped output (make, CI logs) gets a wide fixed width instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="Workspace directory (default: LETHE_WORKSPACE, else ~/.local/share/lethe/workspace)."),
]


def configure_environment(ws: Workspace) -> None:
    """Set Prefect and MLflow defaults before either is imported.

    Without a Prefect server (PREFECT_API_URL unset), the ephemeral API keeps its
    database in the workspace, so one workspace's history stays in one place.
    """
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = str(ws.prefect_home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lethe")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # Bootstrap and CLI code log outside flow runs; those records go to the console and the log file only.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
    logger = logging.getLogger("lethe")
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def fail(exc: LetheError) -> None:
    # Messages quote values such as file contents and lists, which rich would read as markup.
    err.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(exc.exit_code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False) -> None:
    setup_logging(verbose)


@app.command()
def init(
    workspace: WorkspaceOption = None,
    family: Annotated[str, typer.Option(help="Model family: mlp, sisa-mlp (SISA ensemble over the data shards) or certified (MLP features with a certified head).")] = "mlp",
) -> None:
    """Create a workspace: git + DVC data, ledger, queue, and the baseline model as version 1."""
    from tasks.bootstrap import bootstrap
    from tasks.settings import MODEL_FAMILIES, ModelSettings, WorkspaceSettings

    ws = resolve_workspace(workspace)
    configure_environment(ws)
    if family not in MODEL_FAMILIES:
        fail(LetheError(f"Unknown model family {family!r}; use one of: {', '.join(MODEL_FAMILIES)}."))
    started = time.perf_counter()
    try:
        with console.status(f"Materializing data, training and registering the {family} baseline..."):
            result = bootstrap(ws, WorkspaceSettings(model=ModelSettings(family=family)))
    except LetheError as exc:
        fail(exc)
    console.print(f"Workspace [bold]{ws.root}[/] ready in {time.perf_counter() - started:.1f} s")
    console.print(f"  data version {result.data_md5} ({result.rows} rows), git {result.git_rev[:12]}")
    console.print(f"  model version {result.model_version} (champion): test accuracy {result.metrics['test_accuracy']:.4f}")


@request_app.command("add")
def request_add(
    subject_ids: Annotated[list[str] | None, typer.Argument(help="Subject ids to erase.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="JSON Lines file of requests (request_id, subject_id, received_at, source).")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Enqueue deletion requests; invalid lines of a file are quarantined with their reason.

    Exits with code 1 when nothing could be enqueued.
    """
    import json

    from tasks.queue import LocalQueue
    from tasks.requests import decode_file, new_request, parse_line

    ws = resolve_workspace(workspace)
    try:
        ws.require()
        if not subject_ids and file is None:
            raise LetheError("Give subject ids or --file requests.jsonl.")
        typed = [json.dumps(new_request(sid)) for sid in subject_ids or []]
        for position, line in enumerate(typed, start=1):
            try:
                parse_line(line)
            except ValueError as exc:
                raise LetheError(f"Subject id argument {position} is invalid ({exc}); nothing was enqueued.") from None
        if file is not None and not file.exists():
            raise LetheError(f"Request file {file} not found.")
        if file is not None and not file.is_file():
            raise LetheError(f"{file} is not a file; give the path of a JSON Lines file.")
        queue = LocalQueue(ws)
        accepted, quarantined, written = 0, [], []
        if typed:
            path, _, count = queue.enqueue_lines(typed, origin="cli")
            accepted += count
            written.append(path)
        if file is not None:
            path, quarantined, count = queue.enqueue_lines(decode_file(file.read_bytes()), origin=file.name)
            accepted += count
            written.append(path)
    except LetheError as exc:
        fail(exc)
    names = ", ".join(str(p.relative_to(ws.root)) for p in written if p)
    console.print(f"Enqueued {accepted} request(s)" + (f" in {names}" if names else ""))
    if quarantined:
        console.print(f"Quarantined {len(quarantined)} line(s) of {file.name} with their reasons in "
                      f"{ws.quarantine_dir.relative_to(ws.root)}/{quarantined[0].source_ref}")
    if accepted == 0:
        raise typer.Exit(1)


@app.command()
def run(
    workspace: WorkspaceOption = None,
    method: Annotated[str | None, typer.Option(help="Unlearning method tried first (default: the workspace setting); see `lethe methods`.")] = None,
    sources: Annotated[list[str] | None, typer.Option("--source", help="Queue source to read, repeatable: local, s3://BUCKET/PREFIX/, sqs://QUEUE or a queue URL (default: local).")] = None,
) -> None:
    """Run the nightly deletion flow once, now."""
    from tasks.context import check_run_inputs

    ws = resolve_workspace(workspace)
    configure_environment(ws)
    try:
        check_run_inputs(ws, method, sources or ["local"])
    except LetheError as exc:
        fail(exc)
    from flows.nightly import nightly_deletion_run

    started = time.perf_counter()
    try:
        summary = nightly_deletion_run(workspace=str(ws.root), method=method, sources=sources or ["local"])
    except LetheError as exc:
        fail(exc)
    elapsed = time.perf_counter() - started
    if summary["status"] == "empty":
        console.print(f"No pending requests; nothing changed ({elapsed:.1f} s).")
        return
    if summary["status"] == "no_data_held":
        console.print(f"Batch {summary['batch_id']}: no requested subject held data; {summary['request_count']} request(s) closed.")
        return
    console.print(
        f"Batch [bold]{summary['batch_id']}[/]: {summary['request_count']} request(s), "
        f"{summary['rows_removed']} rows removed, model version {summary['model_version_before']} -> "
        f"{summary['model_version_after']} via {summary['method']} in {elapsed:.1f} s"
    )
    table = Table("stage", "seconds", title="Stage times")
    for stage, seconds in summary["stage_seconds"].items():
        table.add_row(stage, f"{seconds:.2f}")
    console.print(table)


@app.command()
def methods() -> None:
    """List the unlearning methods that `--method` and `lethe.json` accept, with the model families they serve."""
    from models.families import FAMILY_TYPES
    from tasks.router import AUTO, family_methods, is_exact

    table = Table(title="Unlearning methods")
    for header in ("method", "kind", "families"):
        table.add_column(header)
    table.add_row(AUTO, "router", "all: sisa for sisa-mlp, newton for certified, unlearn.approximate for mlp")
    served = {family: family_methods(family) for family in sorted(FAMILY_TYPES)}
    for name in sorted({name for names in served.values() for name in names}):
        kind = "approximate"
        if is_exact(name):
            kind = "exact"
        elif name == "newton":
            kind = "certified"
        table.add_row(name, kind, ", ".join(family for family, names in served.items() if name in names))
    console.print(table)


@app.command()
def lineage(
    workspace: WorkspaceOption = None,
    model: Annotated[str | None, typer.Option("--model", help="Registered model name (default: the workspace setting).")] = None,
) -> None:
    """Print the chain of model versions from the champion back to version 1."""
    from tasks import registry
    from tasks.settings import WorkspaceSettings

    ws = resolve_workspace(workspace)
    configure_environment(ws)
    try:
        ws.require()
        name = model or WorkspaceSettings.load(ws.root).model_name
        chain = registry.lineage(ws, name)
    except LetheError as exc:
        fail(exc)
    if not chain:
        fail(LetheError(f"Model {name} has no champion in {ws.mlflow_uri}."))
    table = Table(title=f"Lineage of {name}")
    for header in ("version", "parent", "method", "batch", "requests", "data rev", "test acc", "retain acc", "created (UTC)"):
        # Fold instead of truncating, so a narrow terminal or a pipe never loses an id.
        table.add_column(header, overflow="fold")
    for i, entry in enumerate(chain):
        parent = chain[i + 1]["version"] if i + 1 < len(chain) else "-"
        created = datetime.fromtimestamp(entry["created_at_ms"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(entry["version"], parent, entry["method"], entry["batch_id"] or "-", entry["request_count"],
                      entry["data_rev"][:10], _pct(entry["test_accuracy"]), _pct(entry["retain_accuracy"]), created)
    console.print(table)
    console.print(registry.ui_hint(ws))


@app.command()
def status(workspace: WorkspaceOption = None,
           days: Annotated[int, typer.Option(help="Show requests completed in the last DAYS days.")] = 7) -> None:
    """List pending, overdue and recently completed requests (hashed ids) and the next scheduled run."""
    from tasks.context import open_ledger
    from tasks.status import next_scheduled_run, open_requests, recently_completed

    ws = resolve_workspace(workspace)
    configure_environment(ws)
    try:
        ws.require()
        ledger = open_ledger(ws)
        pending, completed = open_requests(ledger), recently_completed(ledger, days)
    except LetheError as exc:
        fail(exc)
    table = Table(title=f"Open requests ({len(pending)})")
    for header in ("request", "subject (hashed)", "state", "received (UTC)", "deadline (UTC)", ""):
        table.add_column(header, overflow="fold")
    for row in pending:
        flag = "[bold red]OVERDUE[/]" if row.overdue else ""
        table.add_row(row.request_id, row.subject_hash[:16], row.state, f"{row.received_at:%Y-%m-%d %H:%M}",
                      f"{row.deadline:%Y-%m-%d %H:%M}", flag)
    console.print(table)
    done = Table(title=f"Completed in the last {days} days ({len(completed)})")
    for header in ("request", "subject (hashed)", "state", "completed (UTC)"):
        done.add_column(header, overflow="fold")
    for row in completed:
        done.add_row(row.request_id, row.subject_hash[:16], row.state, f"{row.completed_at:%Y-%m-%d %H:%M}")
    console.print(done)
    overdue = sum(r.overdue for r in pending)
    when, origin = next_scheduled_run()
    console.print(f"{len(pending)} open, {overdue} overdue. Next scheduled run: "
                  + (f"{when:%Y-%m-%d %H:%M} UTC ({origin})" if when else f"none ({origin})"))


@audit_app.command("verify")
def audit_verify(workspace: WorkspaceOption = None) -> None:
    """Check the ledger's hash chain, every row against its journal entry, and every certificate's signature."""
    from tasks.audit import verify_ledger
    from tasks.context import open_ledger

    ws = resolve_workspace(workspace)
    configure_environment(ws)
    try:
        ws.require()
    except LetheError as exc:
        fail(exc)
    try:
        ledger = open_ledger(ws)
    except LetheError as exc:
        # A missing, replaced or unreadable ledger is what an audit exists to catch.
        err.print(f"[bold red]tampered:[/] {escape(str(exc))}")
        err.print(f"Verification failed: the ledger of {ws.root} is not the one it was created with.")
        raise typer.Exit(4) from None
    try:
        report = verify_ledger(ws, ledger)
    except LetheError as exc:
        fail(exc)
    if report.ok:
        console.print(f"[green]OK[/]: {report.entries} journal entries chain correctly, every ledger row matches "
                      f"its entry, and {report.certificates} certificate(s) carry valid signatures.")
        return
    for problem in report.problems:
        err.print(f"[bold red]tampered:[/] {problem}")
    err.print(f"Verification failed: {len(report.problems)} problem(s) in {ws.root}.")
    raise typer.Exit(4)


@audit_app.command("scan")
def audit_scan(
    subject: Annotated[str, typer.Option("--subject", help="Raw subject id to search for (it is not logged).")],
    workspace: WorkspaceOption = None,
) -> None:
    """Search every store the pipeline writes for a subject's raw id and records; exit 5 on any finding."""
    from tasks.audit import scan_subject
    from tasks.context import open_ledger

    ws = resolve_workspace(workspace)
    configure_environment(ws)
    try:
        ws.require()
        if not subject.strip().isdigit():
            raise LetheError("--subject must be a decimal subject id (the dataset's zper), for example --subject 125024.")
        with console.status("Scanning data, DVC cache and remote, MLflow, Prefect, logs, ledger, certificates, queue and git history..."):
            findings = scan_subject(ws, open_ledger(ws), str(int(subject)))
    except LetheError as exc:
        fail(exc)
    if not findings:
        console.print("Nothing found: no store holds the subject's id or records.")
        return
    table = Table(title=f"{len(findings)} finding(s)")
    for header in ("store", "location", "what"):
        table.add_column(header, overflow="fold")
    for finding in findings:
        table.add_row(finding.store, finding.location, finding.detail)
    console.print(table)
    raise typer.Exit(5)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


@app.command()
def serve(
    workspace: WorkspaceOption = None,
    prefect_port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the Prefect server, API and UI on 127.0.0.1.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the MLflow tracking server and UI on 127.0.0.1.")] = 5000,
    worker: Annotated[bool, typer.Option("--worker/--no-worker", help="Start a process worker on the work pool `lethe`.")] = True,
    repo_dir: Annotated[Path | None, typer.Option(help="Lethe checkout that contains prefect.yaml, where flow runs start (default: LETHE_REPO_DIR, else the checkout of this installation's flows package).")] = None,
    startup_timeout: Annotated[float, typer.Option(min=1, help="Seconds each service may take to become ready.")] = 120.0,
) -> None:
    """Run a Prefect server, a process worker and an MLflow server for the workspace on 127.0.0.1 until Ctrl-C."""
    from flows.serve import default_repo_dir
    from flows.serve import serve as run_services

    ws = resolve_workspace(workspace)
    configure_environment(ws)
    repo = (repo_dir or default_repo_dir()).expanduser().resolve()
    prefect_bin = Path(sys.executable).with_name("prefect")

    def announce(urls) -> None:
        lines = [
            f"Serving workspace {ws.root}",
            f"  Prefect UI: {urls.prefect_url}  (API {urls.prefect_api_url})",
            f"  MLflow UI:  {urls.mlflow_url}",
            f"  Logs:       {ws.log_file.parent}",
            "Create the deployments with:",
            f"  cd {repo} && PREFECT_API_URL={urls.prefect_api_url} LETHE_WORKSPACE={ws.root} LETHE_REPO_DIR={repo} "
            f"{prefect_bin} --no-prompt deploy --all",
            "Press Ctrl-C to stop.",
        ]
        for line in lines:
            console.print(line, markup=False, highlight=False, soft_wrap=True)

    try:
        ws.require()
        run_services(ws, repo, announce, prefect_port=prefect_port, mlflow_port=mlflow_port, worker=worker,
                     startup_timeout=startup_timeout)
    except LetheError as exc:
        from rich.markup import escape

        # The message can quote a child's log, whose brackets rich would read as markup.
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(exc.exit_code) from None
    console.print("Stopped all services.")


if __name__ == "__main__":
    sys.exit(app())
