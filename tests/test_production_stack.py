"""The nightly run against every production store at once, through the `lethe` command line.

Prefect server on PostgreSQL, MLflow tracking server on PostgreSQL with artifacts on S3,
the ledger on PostgreSQL, and the DVC remote on S3, all on 127.0.0.1: S3 is a moto
server with versioned buckets. `lethe init`, `lethe request add` and `lethe run` run as
subprocesses with only the environment a production worker would have.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tasks.ledger import Batch, BatchState, DeletionRequest, Ledger, RequestState, Tombstone
from tasks.workspace import Workspace
from tests.helpers import raw_id_hits, subjects_in_objects, train_subjects
from tests.stores import FAKE_AWS, mlflow_server, moto_server, postgres_database, prefect_server, s3_client, versioned_bucket

DATA_BUCKET = "lethe-data"
ARTIFACT_BUCKET = "lethe-mlflow"
MODEL = "lethe-randhie"
LETHE = str(Path(sys.executable).with_name("lethe"))
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/{}"


def lethe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([LETHE, *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"lethe {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def worker_environment(home: Path, s3: str, prefect_api: str, mlflow_url: str, databases: dict[str, str]) -> dict[str, str]:
    """The variables a production worker sets (README, "Deploying"), with moto as S3 and nothing else."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")
    env = {key: value for key, value in os.environ.items() if key in keep}
    env.update(FAKE_AWS)
    env.update({
        # Only LETHE_AWS_ENDPOINT_URL and the DVC remote's own endpoint lead to moto; anything
        # that fell back to AWS_ENDPOINT_URL would hit a closed port and fail.
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "LETHE_AWS_ENDPOINT_URL": s3,
        "AWS_CONFIG_FILE": str(home / "missing-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "missing"),
        "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1",
        "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(home / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
        "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(home / "dvc-site-cache"),
        "LETHE_LEDGER_URL": PG.format(databases["ledger"]),
        "LETHE_MLFLOW_TRACKING_URI": mlflow_url,
        "LETHE_MLFLOW_BACKEND_STORE_URI": PG.format(databases["mlflow"]),
        "LETHE_MLFLOW_ARTIFACTS_DESTINATION": f"s3://{ARTIFACT_BUCKET}/mlartifacts",
        "LETHE_DVC_REMOTE_URL": f"s3://{DATA_BUCKET}/lethe",
        "LETHE_RETIREMENT_POLICY": "delete",
    })
    return env


def download_versions(endpoint: str, bucket: str, folder: Path) -> list[Path]:
    """Write every stored object version of the bucket to its own file."""
    s3 = s3_client(endpoint)
    folder.mkdir()
    paths = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for number, version in enumerate(page.get("Versions", []), start=len(paths)):
            body = s3.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])["Body"].read()
            path = folder / f"{number:05d}"
            path.write_bytes(body)
            paths.append(path)
    return paths


def key_versions(endpoint: str, bucket: str, key: str) -> list[dict]:
    page = s3_client(endpoint).list_object_versions(Bucket=bucket, Prefix=key)
    return [v for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])] if v["Key"] == key]


def database_dump(database: str, path: Path) -> Path:
    dump = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "--data-only", database],
                          capture_output=True, check=True, timeout=120)
    path.write_bytes(dump.stdout)
    return path


def test_nightly_run_on_production_stores(stack, tmp_path):
    env, s3, databases = stack["env"], stack["s3"], stack["databases"]
    root = tmp_path / "ws"
    lethe(env, "init", "--workspace", str(root))
    ws = Workspace(root)
    subjects = train_subjects(ws, 2, offset=70)
    lethe(env, "request", "add", "--workspace", str(root), *map(str, subjects))

    run = lethe(env, "run", "--workspace", str(root))

    assert "version 1 -> 2" in run.stdout, run.stdout

    # Prefect: the server on PostgreSQL recorded the completed flow run.
    flow_runs = httpx.post(f"{stack['api']}/flow_runs/filter", json={"limit": 10}, timeout=30).json()
    assert [run_["state_type"] for run_ in flow_runs] == ["COMPLETED"]

    # Ledger on PostgreSQL: requests closed, batch acknowledged, tombstones name the S3 remote.
    assert not ws.ledger_path.exists(), "the ledger lives in PostgreSQL, not in the workspace"
    ledger = Ledger(env["LETHE_LEDGER_URL"])
    with ledger.session() as session:
        states = {r.state for r in session.query(DeletionRequest)}
        batches = [b.state for b in session.query(Batch)]
        tombstones = [(t.object_md5, t.stores) for t in session.query(Tombstone)]
    ledger.dispose()
    assert states == {RequestState.COMPLETED}
    assert batches == [BatchState.ACKNOWLEDGED]
    assert tombstones
    assert all(f"s3://{DATA_BUCKET}/lethe" in stores for _, stores in tombstones)

    # DVC on S3: no version of a tombstoned object is left, and no stored version contains the subjects.
    for md5, _ in tombstones:
        assert key_versions(s3, DATA_BUCKET, f"lethe/files/md5/{md5[:2]}/{md5[2:]}") == []
    data_versions = download_versions(s3, DATA_BUCKET, tmp_path / "data-versions")
    assert data_versions, "the data bucket holds the current data version"
    assert not set(subjects) & subjects_in_objects([tmp_path / "data-versions"])

    # MLflow server on PostgreSQL with S3 artifacts: version 2 is champion, version 1 is deleted for good.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
    assert [v.version for v in client.search_model_versions(f"name = '{MODEL}'")] == ["2"]
    assert not ws.mlflow_db.exists(), "MLflow lives on the tracking server, not in the workspace"

    # No raw subject id in any database or in any stored artifact version.
    dumps = [database_dump(name, tmp_path / f"{kind}.sql") for kind, name in databases.items()]
    artifacts = download_versions(s3, ARTIFACT_BUCKET, tmp_path / "artifact-versions")
    assert artifacts, "the artifact bucket holds the champion's model and reports"
    assert raw_id_hits(dumps + artifacts, subjects) == []
    certificate = json.loads(next(ws.certificates_dir.glob("*.json")).read_text())
    assert [entry["version"] for entry in certificate["certificate"]["retired_models"]["versions"]] == ["1"]

    # `lethe audit scan` reads both servers through their APIs and finds nothing of an erased subject...
    clean = lethe(env, "audit", "scan", "--workspace", str(root), "--subject", str(subjects[0]))
    assert "Nothing found" in clean.stdout

    # ...but finds an id planted in an MLflow run and in a flow run's logs, so the scan can fail.
    planted = 999999
    run_id = client.create_run(client.get_experiment_by_name(MODEL).experiment_id).info.run_id
    client.log_param(run_id, "note", f"subject {planted}")
    log_line = {"name": "audit-test", "level": 20, "message": f"subject {planted}",
                "timestamp": "2026-01-01T00:00:00Z", "flow_run_id": flow_runs[0]["id"]}
    assert httpx.post(f"{stack['api']}/logs/", json=[log_line], timeout=30).status_code == 201
    found = subprocess.run([LETHE, "audit", "scan", "--workspace", str(root), "--subject", str(planted)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert found.returncode == 5, found.stdout + found.stderr
    assert "mlflow server" in found.stdout
    assert "prefect server" in found.stdout


@pytest.fixture
def stack(tmp_path):
    """Moto S3, three PostgreSQL databases, a Prefect server and an MLflow server, stopped and dropped afterwards."""
    with (moto_server() as s3, postgres_database("lethe_prefect") as prefect_db,
          postgres_database("lethe_mlflow") as mlflow_db, postgres_database("lethe_ledger") as ledger_db):
        versioned_bucket(s3, DATA_BUCKET)
        versioned_bucket(s3, ARTIFACT_BUCKET)
        home = tmp_path / "servers"
        home.mkdir()
        with (prefect_server(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}", home) as api,
              mlflow_server(PG.format(mlflow_db), f"s3://{ARTIFACT_BUCKET}/mlartifacts", s3, home) as mlflow_url):
            databases = {"prefect": prefect_db, "mlflow": mlflow_db, "ledger": ledger_db}
            yield {"s3": s3, "api": api, "mlflow": mlflow_url, "databases": databases,
                   "env": worker_environment(home, s3, api, mlflow_url, databases)}
