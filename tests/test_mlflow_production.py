"""MLflow in production mode: a tracking server on PostgreSQL with S3 artifacts, and both retirement policies.

The module starts one moto server (S3 over HTTP on 127.0.0.1, versioned bucket) and one
`mlflow server` subprocess whose backend store is a fresh PostgreSQL database on
127.0.0.1:5432 and whose proxied artifact destination is that bucket. Lethe reaches it only
through LETHE_MLFLOW_TRACKING_URI. Each test registers its own model name. The server is
stopped by its process group and the database dropped at the end. The tests fail, not
skip, when PostgreSQL is not reachable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks import model_deletion, registry, versioning
from tasks.errors import ConfigurationError
from tasks.settings import WorkspaceSettings
from tests.helpers import raw_id_hits, request, train_subjects, write_requests
from tests.stores import FAKE_AWS, mlflow_server, moto_server, postgres_database, s3_client, versioned_bucket

pytestmark = pytest.mark.usefixtures("prefect_harness")

BUCKET = "lethe-mlflow-artifacts"
ARTIFACT_ROOT = "mlartifacts"
MISSING = "RESOURCE_DOES_NOT_EXIST"


@dataclass(frozen=True)
class TrackingServer:
    url: str
    backend_store_uri: str
    artifacts_destination: str
    database: str
    s3_endpoint: str


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` on a fresh PostgreSQL database with artifacts proxied to a versioned S3 bucket on moto."""
    home = tmp_path_factory.mktemp("mlflow-server")
    destination = f"s3://{BUCKET}/{ARTIFACT_ROOT}"
    with moto_server() as endpoint, postgres_database("lethe_mlflow") as database:
        versioned_bucket(endpoint, BUCKET)
        backend = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
        with mlflow_server(backend, destination, endpoint, home) as url:
            yield TrackingServer(url, backend, destination, database, endpoint)


@pytest.fixture
def production_env(tracking_server, monkeypatch, tmp_path):
    """Point Lethe at the tracking server, and every boto3 client at moto with fake credentials."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SQS",
                 "LETHE_DVC_REMOTE_URL", "LETHE_RETIREMENT_POLICY", "MLFLOW_TRACKING_URI",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_AWS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", tracking_server.s3_endpoint)
    monkeypatch.setenv("LETHE_AWS_ENDPOINT_URL", tracking_server.s3_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("LETHE_MLFLOW_TRACKING_URI", tracking_server.url)
    monkeypatch.setenv("LETHE_MLFLOW_BACKEND_STORE_URI", tracking_server.backend_store_uri)
    monkeypatch.setenv("LETHE_MLFLOW_ARTIFACTS_DESTINATION", tracking_server.artifacts_destination)
    return tracking_server


def bootstrap_workspace(root: Path, model_name: str):
    from tasks.bootstrap import bootstrap
    from tasks.workspace import Workspace

    ws = Workspace(root)
    bootstrap(ws, WorkspaceSettings(model_name=model_name))
    return ws


@dataclass(frozen=True)
class VersionArtifacts:
    run_id: str
    model_id: str
    prefixes: list[str]


def version_artifacts(ws, model_name: str, version: str) -> VersionArtifacts:
    """Find a version's run and logged model, and the S3 key prefixes MLflow 3 stores them under.

    The server maps mlflow-artifacts:/<experiment>/<run>/ and .../models/<model id>/ to
    the same paths under its artifacts destination.
    """
    mlflow_client = registry.client(ws)
    mv = mlflow_client.get_model_version(model_name, version)
    run = mlflow_client.get_run(mv.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), "the server proxies artifacts"
    model_id = mv.source.removeprefix("models:/")
    experiment = run.info.experiment_id
    prefixes = [f"{ARTIFACT_ROOT}/{experiment}/{run.info.run_id}/", f"{ARTIFACT_ROOT}/{experiment}/models/{model_id}/"]
    return VersionArtifacts(run.info.run_id, model_id, prefixes)


def object_versions(endpoint: str, prefix: str) -> list[dict]:
    """Every object version and delete marker under the prefix."""
    s3 = s3_client(endpoint)
    found = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=prefix):
        found += [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
    return found


def bucket_raw_id_hits(endpoint: str, subjects: list[int], folder: Path) -> list[tuple[str, int]]:
    """Download every object version in the bucket and search it for the raw subject ids."""
    s3 = s3_client(endpoint)
    paths = []
    for number, version in enumerate(v for v in object_versions(endpoint, "") if "Size" in v):
        path = folder / f"{number:05d}-{Path(version['Key']).name}"
        body = s3.get_object(Bucket=BUCKET, Key=version["Key"], VersionId=version["VersionId"])["Body"].read()
        path.write_bytes(body)
        paths.append(path)
    assert paths, "the bucket holds the artifacts of the registered versions"
    return raw_id_hits(paths, subjects)


def database_rows(database: str, query: str, *params) -> int:
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={database}", connect_timeout=5) as conn:
        return conn.execute(query, params).fetchone()[0]


def assert_missing(call, *args) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as excinfo:
        call(*args)
    assert excinfo.value.error_code == MISSING


def test_delete_policy_removes_old_versions(production_env, tmp_path, monkeypatch, restore_environment):
    from flows.nightly import nightly_deletion_run
    from tasks.hashing import load_hasher
    from tasks.ledger import Ledger

    server = production_env
    monkeypatch.setenv("LETHE_RETIREMENT_POLICY", "delete")
    model = "lethe-delete-policy"
    ws = bootstrap_workspace(tmp_path / "ws", model)
    old = version_artifacts(ws, model, "1")
    for prefix in old.prefixes:
        assert object_versions(server.s3_endpoint, prefix), f"precondition: version 1 has objects under {prefix}"

    subjects = train_subjects(ws, 3)
    write_requests(ws, "delete.jsonl", [request(f"d-{i}", s) for i, s in enumerate(subjects)])
    summary = nightly_deletion_run(workspace=str(ws.root))
    assert summary["status"] == "completed"
    assert summary["model_version_after"] == "2"

    # Version 1, its run and its logged model are gone from the registry and the database.
    mlflow_client = registry.client(ws)
    assert registry.all_versions(ws, model) == ["2"]
    assert_missing(mlflow_client.get_model_version, model, "1")
    assert_missing(mlflow_client.get_run, old.run_id)
    assert_missing(mlflow_client.get_logged_model, old.model_id)
    assert database_rows(server.database, "select count(*) from runs where run_uuid = %s", old.run_id) == 0
    assert database_rows(server.database, "select count(*) from logged_models where model_id = %s", old.model_id) == 0
    assert database_rows(server.database, "select count(*) from model_version_tags where name = %s and version = 1",
                         model) == 0

    # No object version or delete marker is left under version 1's artifact prefixes.
    for prefix in old.prefixes:
        assert object_versions(server.s3_endpoint, prefix) == [], f"object versions remain under {prefix}"

    # Version 2 is the champion, and its run names the DVC data version as input dataset.
    assert registry.champion_version(ws, model) == "2"
    mv = mlflow_client.get_model_version(model, "2")
    assert "version 1" in mv.description
    inputs = mlflow_client.get_run(mv.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.digest == versioning.data_md5(ws)
    assert dataset.source_type == "dvc"
    assert json.loads(dataset.source)["rev"] == versioning.head_rev(ws)

    # The Data Docs of the batch's validation show hashed keys, never a raw subject id.
    import mlflow.artifacts

    docs = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=registry.DATA_DOCS_DIR,
                                                    dst_path=str(tmp_path / "docs"), tracking_uri=ws.mlflow_uri))
    pages = list(docs.rglob("*.html"))
    assert (docs / "index.html") in pages
    assert len(pages) >= 2, "an index page and the validation result page"
    assert raw_id_hits(pages, subjects) == []
    text = "".join(page.read_text() for page in pages)
    hasher = load_hasher(None, ws.hmac_key_file)
    for subject in subjects:
        assert hasher.hash(str(subject)) in text
    folder = tmp_path / "bucket"
    folder.mkdir()
    assert bucket_raw_id_hits(server.s3_endpoint, subjects, folder) == []

    # The ledger records what was deleted: version numbers and run ids only.
    batch = Ledger(ws.ledger_url).get_batch(summary["batch_id"])
    retired = batch.summary["retired_models"]
    assert retired["policy"] == "delete"
    assert [entry["version"] for entry in retired["versions"]] == ["1"]
    assert retired["versions"][0]["run_id"] == old.run_id
    assert retired["versions"][0]["logged_model_ids"] == [old.model_id]
    certificate = json.loads((ws.certificates_dir / f"{summary['batch_id']}.json").read_text())
    assert certificate["certificate"]["retired_models"] == retired

    # Lineage shows the deleted parent instead of failing on it.
    chain = registry.lineage(ws, model)
    assert [(entry["version"], entry["status"]) for entry in chain] == [("2", "registered"), ("1", "deleted")]
    assert chain[1]["method"] == "baseline (deleted)"
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["lineage", "--workspace", str(ws.root), "--model", model])
    assert result.exit_code == 0, result.output
    assert "(deleted)" in result.output

    # Nothing went to the workspace's own MLflow store.
    assert not ws.mlflow_db.exists()
    assert not any(ws.artifacts_dir.iterdir())


def test_archive_policy_tags_old_versions(production_env, tmp_path, monkeypatch):
    from flows.nightly import nightly_deletion_run
    from tasks.ledger import Ledger
    from tasks.retire import retire_models

    server = production_env
    model = "lethe-archive-policy"
    ws = bootstrap_workspace(tmp_path / "ws", model)
    write_requests(ws, "archive.jsonl", [request("a-1", train_subjects(ws, 1, offset=10)[0])])
    summary = nightly_deletion_run(workspace=str(ws.root))
    batch_id = summary["batch_id"]

    # Under archive (the default), version 1 stays, tagged, with its artifacts.
    assert registry.all_versions(ws, model) == ["1", "2"]
    assert registry.champion_version(ws, model) == "2"
    tags = registry.version_tags(ws, model, "1")
    assert tags["contains_erased_data"] == "true"
    assert tags["retired"] == "true"
    assert tags["superseded_by"] == "2"
    assert tags["erased_by_batches"] == batch_id
    old = version_artifacts(ws, model, "1")
    for prefix in old.prefixes:
        assert object_versions(server.s3_endpoint, prefix)
    retired = Ledger(ws.ledger_url).get_batch(batch_id).summary["retired_models"]
    assert retired == {"policy": "archive", "versions": [{"version": "1", "action": "archived"}]}

    # The delete policy without the server's backend store URI is rejected before anything is deleted.
    monkeypatch.delenv("LETHE_MLFLOW_BACKEND_STORE_URI")
    with pytest.raises(ConfigurationError, match="LETHE_MLFLOW_BACKEND_STORE_URI"):
        retire_models(ws, model, batch_id, "2", policy="delete")
    assert registry.all_versions(ws, model) == ["1", "2"]
    assert model_deletion.deletion_records(ws, model) == {}
    monkeypatch.setenv("LETHE_MLFLOW_BACKEND_STORE_URI", server.backend_store_uri)

    # A run killed after the soft deletes, before gc and the S3 purge: the next attempt finishes the deletion.
    record = model_deletion.plan_version_deletion(ws, model, "1", batch_id)
    model_deletion.delete_version_entities(ws, model, record)
    mlflow_client = registry.client(ws)
    assert mlflow_client.get_run(old.run_id).info.lifecycle_stage == "deleted"
    assert model_deletion.deletion_records(ws, model)["1"].state == "pending"
    assert registry.all_versions(ws, model) == ["2"]

    deleted = retire_models(ws, model, batch_id, "2", policy="delete")
    assert [(entry["version"], entry["run_id"]) for entry in deleted] == [("1", old.run_id)]
    assert deleted[0]["s3_object_versions_deleted"] > 0
    assert_missing(mlflow_client.get_run, old.run_id)
    assert database_rows(server.database, "select count(*) from logged_models where model_id = %s", old.model_id) == 0
    for prefix in old.prefixes:
        assert object_versions(server.s3_endpoint, prefix) == [], f"object versions remain under {prefix}"
    assert model_deletion.deletion_records(ws, model)["1"].state == "deleted"

    # Repeating the retirement changes nothing and reports the same deletion.
    assert retire_models(ws, model, batch_id, "2", policy="delete") == deleted
    assert registry.load_version(ws, model, "2") is not None
