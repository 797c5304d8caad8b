"""Contents of the MLflow tracking server and the Prefect server, for `lethe audit scan`.

In the embedded setup both keep their databases in the workspace, and the scan reads
those files. With LETHE_MLFLOW_TRACKING_URI or PREFECT_API_URL set, the scan reads the
servers through their APIs instead: every run's parameters, tags, metric names and
artifacts, every model version's tags and description, and every flow run's
parameters, logs and artifacts. Each item is yielded as `(location, bytes)`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tasks import registry
from tasks.workspace import Workspace

log = logging.getLogger("lethe.audit")

# Pages of the Prefect API; a nightly deployment has a few hundred flow runs a year.
PREFECT_PAGE = 200


def mlflow_server_contents(ws: Workspace) -> Iterator[tuple[str, bytes]]:
    """Yield the text and artifacts of every run (deleted ones included) and every model version of the server."""
    from mlflow.entities import ViewType

    client = registry.client(ws)
    server = ws.mlflow_uri
    for experiment in client.search_experiments(view_type=ViewType.ALL):
        for run in _all_runs(client, experiment.experiment_id):
            data = {"params": run.data.params, "tags": run.data.tags, "metrics": sorted(run.data.metrics),
                    "name": run.info.run_name}
            location = f"{server} run {run.info.run_id}"
            yield location, json.dumps(data, sort_keys=True).encode()
            yield from _run_artifacts(client, run.info.run_id, location)
    for model in client.search_registered_models():
        yield f"{server} model {model.name}", json.dumps({"tags": model.tags, "description": model.description}).encode()
        for version in client.search_model_versions(f"name = '{model.name}'"):
            text = json.dumps({"tags": version.tags, "description": version.description}, sort_keys=True)
            yield f"{server} model {model.name} version {version.version}", text.encode()


def _all_runs(client, experiment_id: str) -> Iterator:
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _run_artifacts(client, run_id: str, location: str) -> Iterator[tuple[str, bytes]]:
    """Download the run's artifacts one run at a time into a temporary folder and yield each file."""
    with tempfile.TemporaryDirectory(prefix="lethe-audit-") as folder:
        try:
            root = Path(client.download_artifacts(run_id, "", folder))
        except Exception as exc:  # noqa: BLE001 - a run whose artifacts were garbage-collected
            log.warning("Audit: could not download the artifacts of run %s: %s", run_id, exc)
            return
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            yield f"{location} artifact {path.relative_to(root)}", path.read_bytes()


def prefect_server_contents(api_url: str) -> Iterator[tuple[str, bytes]]:
    """Yield the parameters, logs and artifacts of every flow run the Prefect server stores."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        for run in _pages(lambda offset: client.read_flow_runs(limit=PREFECT_PAGE, offset=offset)):
            location = f"{api_url} flow run {run.id}"
            yield location, json.dumps({"name": run.name, "parameters": run.parameters}, default=str).encode()
            run_logs = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            logs = _pages(lambda offset: client.read_logs(log_filter=run_logs, limit=PREFECT_PAGE, offset=offset))
            yield f"{location} logs", "\n".join(entry.message for entry in logs).encode()
        for artifact in _pages(lambda offset: client.read_artifacts(limit=PREFECT_PAGE, offset=offset)):
            yield f"{api_url} artifact {artifact.key or artifact.id}", json.dumps(artifact.data, default=str).encode()


def _pages(read) -> Iterator:
    """Call `read(offset)` page by page until a page comes back short, because the server caps each response."""
    offset = 0
    while True:
        page = read(offset)
        yield from page
        if len(page) < PREFECT_PAGE:
            return
        offset += PREFECT_PAGE
