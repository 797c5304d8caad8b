"""MLflow model registry: log candidates, register versions with provenance, walk lineage.

Models are logged with `serialization_format="pickle"` because MLflow 3's default
(`torch.export`) loads back a graph instead of the module, and is about 10x slower.

Every call goes to `Workspace.mlflow_uri`: the workspace's SQLite store, or the tracking
server that LETHE_MLFLOW_TRACKING_URI names. A client of a server that proxies artifacts
(`mlflow-artifacts:/` URIs) needs no artifact-store credentials.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tasks.workspace import Workspace

log = logging.getLogger("lethe.registry")

CHAMPION = "champion"
TAG_PREFIX = "lethe."
DATA_DOCS_DIR = "data_docs"
MISSING = "RESOURCE_DOES_NOT_EXIST"



def _quiet() -> None:
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    # MLflow 3 sends usage telemetry by default; a tool that handles erasure data sends nothing out.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # The pickle format is chosen on purpose (see the module docstring); its warning repeats on every save.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)


def client(ws: Workspace):
    """Point MLflow at the workspace's store or tracking server and return a client for it."""
    _quiet()
    import mlflow

    mlflow.set_tracking_uri(ws.mlflow_uri)
    mlflow.set_registry_uri(ws.mlflow_uri)
    return mlflow.MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)


def uses_workspace_store(ws: Workspace) -> bool:
    """Return whether MLflow runs on the workspace's own SQLite store (LETHE_MLFLOW_TRACKING_URI unset)."""
    return ws.mlflow_uri == f"sqlite:///{ws.mlflow_db}"


def uses_tracking_server(ws: Workspace) -> bool:
    """Return whether the tracking URI is an HTTP(S) tracking server rather than a database."""
    return urlparse(ws.mlflow_uri).scheme in ("http", "https")


def ui_hint(ws: Workspace) -> str:
    """Return a command-line hint on where to open the MLflow UI for this workspace."""
    if uses_tracking_server(ws):
        return f"Open the MLflow UI of the tracking server:\n  {ws.mlflow_uri}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    return (f"Open the MLflow UI on this workspace:\n  {mlflow_bin} ui --backend-store-uri {ws.mlflow_uri} "
            "--host 127.0.0.1 --port 5000")


def is_missing(exc: Exception) -> bool:
    """Return whether an MLflow error reports that the run, model or version does not exist."""
    return getattr(exc, "error_code", None) == MISSING


@contextlib.contextmanager
def ignore_missing():
    """Skip a step whose target is already gone, so a resumed deletion repeats every step safely."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if not is_missing(exc):
            raise


def experiment_id(ws: Workspace, name: str) -> str:
    mlflow_client = client(ws)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    if not uses_workspace_store(ws):
        # The server chooses the artifact root (mlflow-artifacts:/ when it proxies artifacts).
        return mlflow_client.create_experiment(name)
    return mlflow_client.create_experiment(name, artifact_location=ws.artifacts_dir.as_uri())


@dataclass(frozen=True)
class LoggedCandidate:
    run_id: str
    model_uri: str


def log_candidate(ws: Workspace, model_name: str, model, run_name: str, params: dict[str, str],
                  metrics: dict[str, float], artifacts: dict[str, str | dict]) -> LoggedCandidate:
    """Log a trained model with its params, metrics and JSON/text artifacts in one MLflow run.

    A Great Expectations result passed as `data_validation.json` is also rendered as
    Data Docs under `data_docs/`. Uses an explicit run id, not the fluent active run,
    because the fluent run is thread-local and Prefect runs tasks in worker threads.
    """
    import mlflow
    import torch

    from tasks.validate import DATA_VALIDATION_ARTIFACT

    mlflow_client = client(ws)
    run = mlflow_client.create_run(experiment_id(ws, model_name), run_name=run_name)
    run_id = run.info.run_id
    for key, value in params.items():
        mlflow_client.log_param(run_id, key, str(value)[:6000])
    for key, value in metrics.items():
        mlflow_client.log_metric(run_id, key, float(value))
    for name, content in artifacts.items():
        if isinstance(content, dict):
            mlflow_client.log_dict(run_id, content, name)
        else:
            mlflow_client.log_text(run_id, content, name)
    if isinstance(artifacts.get(DATA_VALIDATION_ARTIFACT), dict):
        log_data_docs(mlflow_client, run_id, artifacts[DATA_VALIDATION_ARTIFACT], run_name)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            pytorch_model=model,
            name="model",
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    return LoggedCandidate(run_id=run_id, model_uri=info.model_uri)


def log_data_docs(mlflow_client, run_id: str, report: dict, run_name: str) -> None:
    """Render the validation result as Great Expectations Data Docs and log them under data_docs/."""
    from tasks.validate import build_data_docs

    with tempfile.TemporaryDirectory(prefix="lethe-data-docs-") as directory:
        build_data_docs(report, Path(directory), run_name)
        mlflow_client.log_artifacts(run_id, directory, DATA_DOCS_DIR)


def find_version_of_run(ws: Workspace, model_name: str, run_id: str) -> str | None:
    """Return the version already registered from this run, so a resumed batch registers once."""
    for version in client(ws).search_model_versions(f"name = '{model_name}'"):
        if version.run_id == run_id:
            return str(version.version)
    return None


def register(ws: Workspace, model_name: str, candidate: LoggedCandidate, tags: dict[str, str]) -> str:
    """Register the candidate as a new version with its provenance and make it the champion.

    Idempotent per candidate run: a version created by an interrupted attempt is reused.
    The tags are written with the version in one call, so no version lacks its provenance.
    The description, naming the parent version, and the run's input dataset (the DVC data
    version) are written before the alias moves, and again on a resumed attempt.
    """
    mlflow_client = client(ws)
    try:
        mlflow_client.get_registered_model(model_name)
    except Exception:  # noqa: BLE001 - MLflow raises RestException/MlflowException by store
        mlflow_client.create_registered_model(model_name, description="Lethe-managed model; see the lethe.* tags for provenance.")
    version = find_version_of_run(ws, model_name, candidate.run_id)
    if version is None:
        created = mlflow_client.create_model_version(
            model_name, candidate.model_uri, run_id=candidate.run_id,
            tags={TAG_PREFIX + key: str(value) for key, value in tags.items()},
            # A tracking server rejects a models:/<model id> source without the model id (MLflow 3.17.2).
            model_id=logged_model_id(candidate.model_uri),
        )
        version = str(created.version)
    else:
        log.info("Found version %s already registered from run %s; reusing it", version, candidate.run_id)
    mlflow_client.update_model_version(model_name, version, description=version_description(model_name, tags))
    if tags.get("data_md5"):
        from tasks.training_data import log_training_data

        log_training_data(ws, model_name, candidate.run_id, tags["data_md5"], tags.get("data_git_rev", ""))
    mlflow_client.set_registered_model_alias(model_name, CHAMPION, version)
    log.info("Registered %s version %s as %s", model_name, version, CHAMPION)
    return version


def logged_model_id(model_uri: str | None) -> str | None:
    """Return the logged model id of an MLflow 3 `models:/m-...` URI, else None."""
    if model_uri and model_uri.startswith("models:/m-"):
        return model_uri.removeprefix("models:/")
    return None


def version_description(model_name: str, tags: dict[str, str]) -> str:
    """Describe in Markdown where a version came from, for its page in the MLflow UI."""
    data = f"data version `{tags.get('data_md5', '?')}` (git revision `{tags.get('data_git_rev', '?')}`)"
    parent = tags.get("parent_version")
    if not parent:
        return f"Baseline of {model_name}, with no parent version: trained by `lethe init` on {data}."
    return (f"Derived from version {parent} of {model_name} by erasure batch `{tags.get('batch_id', '?')}` "
            f"({tags.get('request_count', '?')} requests) with `{tags.get('method', '?')}`, on {data}. "
            "The lethe.* tags hold the full provenance.")


def log_json_artifact(ws: Workspace, run_id: str, payload: dict, name: str) -> None:
    client(ws).log_dict(run_id, payload, name)


def champion_version(ws: Workspace, model_name: str) -> str | None:
    mlflow_client = client(ws)
    try:
        return str(mlflow_client.get_model_version_by_alias(model_name, CHAMPION).version)
    except Exception:  # noqa: BLE001 - no such model or alias
        return None


def load_version(ws: Workspace, model_name: str, version: str):
    """Load a registered version back as the PyTorch module."""
    client(ws)
    import mlflow

    return mlflow.pytorch.load_model(f"models:/{model_name}/{version}", map_location="cpu")


def version_tags(ws: Workspace, model_name: str, version: str) -> dict[str, str]:
    mv = client(ws).get_model_version(model_name, version)
    return {k[len(TAG_PREFIX):]: v for k, v in mv.tags.items() if k.startswith(TAG_PREFIX)}


def tag_version(ws: Workspace, model_name: str, version: str, tags: dict[str, str]) -> None:
    mlflow_client = client(ws)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, version, TAG_PREFIX + key, str(value))


def all_versions(ws: Workspace, model_name: str) -> list[str]:
    versions = client(ws).search_model_versions(f"name = '{model_name}'")
    return sorted((str(v.version) for v in versions), key=int)


def lineage(ws: Workspace, model_name: str) -> list[dict]:
    """Walk from the champion through `lethe.parent_version` back to the bootstrap version.

    A version deleted under the `delete` retirement policy appears with status "deleted",
    filled from its deletion record, and the walk continues at its recorded parent.
    """
    from tasks.model_deletion import deletion_records

    mlflow_client = client(ws)
    deleted = deletion_records(ws, model_name)
    version = champion_version(ws, model_name)
    chain: list[dict] = []
    seen: set[str] = set()
    while version and version not in seen:
        seen.add(version)
        try:
            mv = mlflow_client.get_model_version(model_name, version)
        except Exception as exc:  # noqa: BLE001 - RestException or MlflowException, by store
            if not is_missing(exc):
                raise
            entry = _deleted_entry(version, deleted.get(version))
            chain.append(entry)
            version = entry.pop("parent_version") or None
            continue
        tags = {k[len(TAG_PREFIX):]: v for k, v in mv.tags.items() if k.startswith(TAG_PREFIX)}
        chain.append({
            "version": version,
            "status": "registered",
            "created_at_ms": mv.creation_timestamp,
            "method": tags.get("method", "?"),
            "batch_id": tags.get("batch_id", "-"),
            "request_count": tags.get("request_count", "0"),
            "data_rev": tags.get("data_git_rev", "?"),
            "data_md5": tags.get("data_md5", "?"),
            **accuracies(mlflow_client, mv.run_id),
            "contains_erased_data": tags.get("contains_erased_data", "false"),
        })
        version = tags.get("parent_version") or None
    return chain


def accuracies(mlflow_client, run_id: str | None) -> dict[str, float | None]:
    metrics = {}
    if run_id:
        with ignore_missing():
            metrics = mlflow_client.get_run(run_id).data.metrics
    return {"test_accuracy": metrics.get("test_accuracy"), "retain_accuracy": metrics.get("retain_accuracy")}


def _deleted_entry(version: str, record) -> dict:
    """Describe a version that no longer exists, from its deletion record when Lethe wrote one."""
    if record is None:
        # Deleted outside Lethe: nothing is known about it, not even its parent.
        # NOTE: created_at_ms 0 (1970-01-01) keeps `lethe lineage` printing; it is not a real time.
        return {"version": version, "status": "deleted", "created_at_ms": 0, "method": "deleted (no record)",
                "batch_id": "-", "request_count": "?", "data_rev": "?", "data_md5": "?", "test_accuracy": None,
                "retain_accuracy": None, "contains_erased_data": "true", "parent_version": ""}
    return {"version": version, "status": "deleted", "created_at_ms": record.created_at_ms,
            "method": f"{record.method} (deleted)", "batch_id": record.batch_id or "-",
            "request_count": record.request_count, "data_rev": record.data_git_rev, "data_md5": record.data_md5,
            "test_accuracy": record.test_accuracy, "retain_accuracy": record.retain_accuracy,
            "contains_erased_data": "true", "parent_version": record.parent_version}
