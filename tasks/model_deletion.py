"""Permanent deletion of model versions under the `delete` retirement policy.

A version's deletion removes the registered version, its logged models, its run and the
run's artifacts, as `mlflow gc` does, and on S3 every object version under their
folders. A deletion record, saved as a registered-model tag before the first delete,
lets a killed run resume and lets `lethe lineage` describe the version afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from tasks import remote_store
from tasks.errors import ConfigurationError
from tasks.registry import TAG_PREFIX, accuracies, client, ignore_missing, is_missing, logged_model_id, uses_tracking_server
from tasks.settings import EnvironmentSettings
from tasks.sources import aws
from tasks.workspace import Workspace

log = logging.getLogger("lethe.retire")

# Registered-model tag per permanently deleted version: lineage and a resumed deletion read it.
DELETED_VERSION_TAG = TAG_PREFIX + "deleted_version."


@dataclass
class VersionDeletion:
    """Deletion record of one model version, saved before the first delete so that a killed run can resume.

    Contains version numbers, run and model ids, artifact URIs and provenance, never subject ids.
    """

    version: str
    deleted_by_batch: str
    run_id: str | None
    experiment_id: str | None
    run_artifact_uri: str | None
    logged_model_ids: list[str]
    model_artifact_uris: list[str]
    parent_version: str
    method: str
    batch_id: str
    request_count: str
    data_git_rev: str
    data_md5: str
    created_at_ms: int
    test_accuracy: float | None
    retain_accuracy: float | None
    state: str = "pending"  # "deleted" once every step has succeeded
    s3_object_versions_deleted: int = 0
    s3_prefixes: list[str] = field(default_factory=list)

    @property
    def artifact_uris(self) -> list[str]:
        return [uri for uri in [self.run_artifact_uri, *self.model_artifact_uris] if uri]


def deletion_records(ws: Workspace, model_name: str) -> dict[str, VersionDeletion]:
    """Return the deletion record of every version Lethe deleted or began to delete, by version."""
    try:
        tags = client(ws).get_registered_model(model_name).tags
    except Exception as exc:  # noqa: BLE001 - RestException or MlflowException, by store
        if is_missing(exc):
            return {}
        raise
    return {key[len(DELETED_VERSION_TAG):]: VersionDeletion(**json.loads(value))
            for key, value in tags.items() if key.startswith(DELETED_VERSION_TAG)}


def save_deletion_record(ws: Workspace, model_name: str, record: VersionDeletion) -> None:
    client(ws).set_registered_model_tag(model_name, DELETED_VERSION_TAG + record.version,
                                        json.dumps(asdict(record), sort_keys=True))


def plan_version_deletion(ws: Workspace, model_name: str, version: str, batch_id: str) -> VersionDeletion:
    """Collect the run, logged models and artifact locations of a version and save the deletion record.

    Raises ConfigurationError before anything is written or deleted when a setting that
    the deletion needs is missing, so a misconfigured run deletes nothing.
    """
    mlflow_client = client(ws)
    mv = mlflow_client.get_model_version(model_name, version)
    tags = {k[len(TAG_PREFIX):]: v for k, v in mv.tags.items() if k.startswith(TAG_PREFIX)}
    run = None
    if mv.run_id:
        with ignore_missing():
            run = mlflow_client.get_run(mv.run_id)
    models = _logged_models(mlflow_client, mv, run)
    record = VersionDeletion(
        version=version, deleted_by_batch=batch_id, run_id=run.info.run_id if run else None,
        experiment_id=run.info.experiment_id if run else None, run_artifact_uri=run.info.artifact_uri if run else None,
        logged_model_ids=sorted(m.model_id for m in models),
        model_artifact_uris=sorted(m.artifact_location for m in models),
        parent_version=tags.get("parent_version", ""), method=tags.get("method", "?"),
        batch_id=tags.get("batch_id", ""), request_count=tags.get("request_count", "?"),
        data_git_rev=tags.get("data_git_rev", "?"), data_md5=tags.get("data_md5", "?"),
        created_at_ms=int(mv.creation_timestamp or 0), **accuracies(mlflow_client, mv.run_id),
    )
    check_deletion_settings(ws, record.artifact_uris)
    record.s3_prefixes = [f"s3://{bucket}/{prefix}" for bucket, prefix in s3_artifact_prefixes(record)]
    save_deletion_record(ws, model_name, record)
    return record


def _logged_models(mlflow_client, mv, run) -> list:
    """Every logged model of the version: its source model and any other model the run logged."""
    models = {}
    if run is not None:
        token = None
        while True:
            page = mlflow_client.search_logged_models(
                experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'",
                page_token=token)
            models.update({m.model_id: m for m in page})
            token = page.token
            if not token:
                break
    for model_id in {mv.model_id, logged_model_id(mv.source)} - {None, *models}:
        with ignore_missing():
            models[model_id] = mlflow_client.get_logged_model(model_id)
    return list(models.values())


def delete_version_entities(ws: Workspace, model_name: str, record: VersionDeletion) -> None:
    """Delete the version, its logged models and its run. Each step skips what is already gone.

    The version's tags go first, because MLflow 3.17.2 keeps a deleted version's row, tags included,
    until the registered model itself is deleted. Models and the run are soft-deleted
    here, which `collect_garbage` requires before it removes them for good.
    """
    mlflow_client = client(ws)
    with ignore_missing():
        mv = mlflow_client.get_model_version(model_name, record.version)
        for key in mv.tags:
            mlflow_client.delete_model_version_tag(model_name, record.version, key)
        mlflow_client.delete_model_version(model_name, record.version)
    for model_id in record.logged_model_ids:
        with ignore_missing():
            mlflow_client.delete_logged_model(model_id)
    if record.run_id:
        with ignore_missing():
            mlflow_client.delete_run(record.run_id)


def collect_garbage(ws: Workspace, record: VersionDeletion) -> None:
    """Remove the soft-deleted run and logged models for good, with their artifacts, as `mlflow gc` does.

    Ids that an earlier attempt already removed are skipped. NOTE: this calls the function
    behind `mlflow gc` (`mlflow.cli._gc_tracking_resources`, private in MLflow 3.17.2),
    because the command, even with --run-ids and --logged-model-ids, also removes every
    soft-deleted experiment of the store, which on a shared server belongs to other users.
    """
    from mlflow.cli import _gc_tracking_resources
    from mlflow.tracking import _get_store

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        _gc_tracking_resources(
            _get_store(backend_store_uri(ws)), run_ids=[record.run_id] if record.run_id else [],
            experiment_ids=None, logged_model_ids=record.logged_model_ids, older_than=None, time_delta=0,
            skip_experiments=True, skip_logged_models=False, ignore_not_found=True,
        )
    for line in output.getvalue().splitlines():
        log.info("Retire: %s", line)
    _remove_empty_local_folders(record)


def _remove_empty_local_folders(record: VersionDeletion) -> None:
    """Remove the run and model folders that gc leaves empty in a local artifact store."""
    for uri in record.artifact_uris:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            continue
        folder = Path(parsed.path)
        for path in (folder, folder.parent):
            with contextlib.suppress(OSError):  # missing, or not empty
                path.rmdir()


def mark_deleted(ws: Workspace, model_name: str, record: VersionDeletion, s3_versions: int) -> None:
    record.state = "deleted"
    record.s3_object_versions_deleted += s3_versions
    save_deletion_record(ws, model_name, record)


def backend_store_uri(ws: Workspace) -> str:
    """Return the database URI that `mlflow gc` needs: the tracking URI itself, or the server's store."""
    if not uses_tracking_server(ws):
        return ws.mlflow_uri
    uri = EnvironmentSettings().mlflow_backend_store_uri
    if not uri:
        raise ConfigurationError(
            f"LETHE_RETIREMENT_POLICY=delete with the tracking server {ws.mlflow_uri} needs LETHE_MLFLOW_BACKEND_STORE_URI: "
            "set it to the server's --backend-store-uri (such as postgresql+psycopg://user@host:5432/mlflow), "
            "because `mlflow gc` deletes runs in the database directly. Or use LETHE_RETIREMENT_POLICY=archive.")
    return uri


def check_deletion_settings(ws: Workspace, artifact_uris: list[str]) -> None:
    """Raise ConfigurationError when the `delete` policy lacks a setting it needs for these artifacts."""
    backend_store_uri(ws)
    proxied = any(urlparse(uri).scheme == "mlflow-artifacts" for uri in artifact_uris)
    if proxied and not EnvironmentSettings().mlflow_artifacts_destination:
        raise ConfigurationError(
            f"LETHE_RETIREMENT_POLICY=delete with the tracking server {ws.mlflow_uri} needs "
            "LETHE_MLFLOW_ARTIFACTS_DESTINATION: set it to the server's --artifacts-destination (such as "
            "s3://bucket/mlartifacts), so the old S3 object versions of deleted artifacts can be found and purged.")


def s3_artifact_prefixes(record: VersionDeletion) -> list[tuple[str, str]]:
    """Return (bucket, key prefix) of each artifact location of the record that lies in S3.

    `s3://` URIs name the location directly. A proxied `mlflow-artifacts:/PATH` lies at
    PATH under the server's artifacts destination. Other stores (local files) hold no
    old object versions, so `mlflow gc` alone removes their artifacts.
    """
    destination = EnvironmentSettings().mlflow_artifacts_destination or ""
    prefixes = []
    for uri in record.artifact_uris:
        parsed = urlparse(uri)
        if parsed.scheme == "mlflow-artifacts" and destination:
            parsed = urlparse(destination.rstrip("/") + "/" + parsed.path.lstrip("/"))
        if parsed.scheme == "s3":
            # The trailing slash keeps a prefix from matching a longer run or model id.
            prefixes.append((parsed.netloc, parsed.path.strip("/") + "/"))
    return prefixes


def complete_deletion(ws: Workspace, model_name: str, record: VersionDeletion) -> None:
    """Run every step of one version's deletion. Each step skips what an earlier attempt removed."""
    delete_version_entities(ws, model_name, record)
    collect_garbage(ws, record)
    # `mlflow gc` deletes S3 objects without a VersionId, so a versioned bucket keeps each
    # byte as a noncurrent version behind a delete marker until it is deleted by version.
    purged = sum(purge_prefix_versions(uri) for uri in record.s3_prefixes)
    mark_deleted(ws, model_name, record, purged)
    log.info("Retire: deleted version %s of %s for good: run %s, logged models %s, %d S3 object versions",
             record.version, model_name, record.run_id or "-", ", ".join(record.logged_model_ids) or "-", purged)


def purge_prefix_versions(uri: str) -> int:
    """Delete every object version and delete marker under an `s3://bucket/prefix/` URI and return how many.

    Lists the prefix again afterwards and raises RemoteStoreError if anything is left.
    """
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if not prefix.strip("/"):
        # An artifact location is always a folder of one run or model, never a whole bucket.
        raise remote_store.RemoteStoreError(
            f"Invalid artifact prefix {uri}: a bucket root is never a run or model folder, so Lethe does not "
            "purge it. Check LETHE_MLFLOW_ARTIFACTS_DESTINATION.")
    s3 = aws.client("s3")
    with remote_store.s3_errors(uri, f"delete every object version under {uri}"):
        targets = remote_store.prefix_versions(s3, bucket, prefix)
        remote_store.delete_versions(s3, bucket, targets)
        left = remote_store.prefix_versions(s3, bucket, prefix)
    if left:
        raise remote_store.RemoteStoreError(f"{len(left)} object version(s) are still under {uri} after deleting them, "
                                            "so something wrote there again. Stop other writers and run again.")
    return len(targets)
