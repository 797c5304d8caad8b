"""MLflow model registry: log candidates, register versions with provenance, walk lineage.

Models are logged with `serialization_format="pickle"` because MLflow 3's default
(`torch.export`) loads back a graph instead of the module, and is about 10x slower.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tasks.workspace import Workspace

log = logging.getLogger("lethe.registry")

CHAMPION = "champion"
TAG_PREFIX = "lethe."


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    # MLflow 3 sends usage telemetry by default; a tool that handles erasure data sends nothing out.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # The pickle format is chosen on purpose (see the module docstring); its warning repeats on every save.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)


def client(ws: Workspace):
    """Point MLflow at the workspace's store and return a client for it."""
    _quiet()
    import mlflow

    mlflow.set_tracking_uri(ws.mlflow_uri)
    mlflow.set_registry_uri(ws.mlflow_uri)
    return mlflow.MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)


def experiment_id(ws: Workspace, name: str) -> str:
    mlflow_client = client(ws)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=ws.artifacts_dir.as_uri())


@dataclass(frozen=True)
class LoggedCandidate:
    run_id: str
    model_uri: str


def log_candidate(ws: Workspace, model_name: str, model, run_name: str, params: dict[str, str],
                  metrics: dict[str, float], artifacts: dict[str, str | dict]) -> LoggedCandidate:
    """Log a trained model with its params, metrics and JSON/text artifacts in one MLflow run.

    Uses an explicit run id, not the fluent active run, because the fluent run is
    thread-local and Prefect runs tasks in worker threads.
    """
    import mlflow
    import torch

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
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            pytorch_model=model,
            name="model",
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    return LoggedCandidate(run_id=run_id, model_uri=info.model_uri)


def find_version_of_run(ws: Workspace, model_name: str, run_id: str) -> str | None:
    """Return the version already registered from this run, so a resumed batch registers once."""
    for version in client(ws).search_model_versions(f"name = '{model_name}'"):
        if version.run_id == run_id:
            return str(version.version)
    return None


def register(ws: Workspace, model_name: str, candidate: LoggedCandidate, tags: dict[str, str]) -> str:
    """Register the candidate as a new version, tag its provenance and make it the champion.

    Idempotent per candidate run: a version created by an interrupted attempt is reused.
    The tags are written with the version in one call, so no version lacks its provenance.
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
        )
        version = str(created.version)
    else:
        log.info("Found version %s already registered from run %s; reusing it", version, candidate.run_id)
    mlflow_client.set_registered_model_alias(model_name, CHAMPION, version)
    log.info("Registered %s version %s as %s", model_name, version, CHAMPION)
    return version


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
    """Walk from the champion through `lethe.parent_version` back to the bootstrap version."""
    mlflow_client = client(ws)
    version = champion_version(ws, model_name)
    chain = []
    while version:
        mv = mlflow_client.get_model_version(model_name, version)
        tags = {k[len(TAG_PREFIX):]: v for k, v in mv.tags.items() if k.startswith(TAG_PREFIX)}
        metrics = mlflow_client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        chain.append({
            "version": version,
            "created_at_ms": mv.creation_timestamp,
            "method": tags.get("method", "?"),
            "batch_id": tags.get("batch_id", "-"),
            "request_count": tags.get("request_count", "0"),
            "data_rev": tags.get("data_git_rev", "?"),
            "data_md5": tags.get("data_md5", "?"),
            "test_accuracy": metrics.get("test_accuracy"),
            "retain_accuracy": metrics.get("retain_accuracy"),
            "contains_erased_data": tags.get("contains_erased_data", "false"),
        })
        version = tags.get("parent_version") or None
    return chain
