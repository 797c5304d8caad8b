"""The DVC remote on S3, against a moto server on 127.0.0.1: init, push, and the lineage purge
that deletes every version and delete marker of each tombstoned object."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import uuid

import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from tasks import remote_store, versioning
from tasks.dataset import SUBJECT_KEY
from tasks.errors import ConfigurationError
from tasks.remote_store import S3Remote
from tasks.workspace import Workspace
from tests.helpers import files_under, raw_id_hits, request, subjects_in_objects, train_subjects, write_requests
from tests.stores import moto_server

PREFIX = "lethe"


@pytest.fixture(scope="module")
def moto_endpoint():
    """One moto server over HTTP on 127.0.0.1 for this module; tests isolate by bucket name."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def refused_endpoint():
    """A 127.0.0.1 URL whose port is bound but not listening, so every connection to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def s3(moto_endpoint, refused_endpoint, monkeypatch, tmp_path):
    """A boto3 S3 client on moto, with LETHE_AWS_ENDPOINT_URL pointing there and dummy credentials."""
    from tasks.sources import aws

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
                 "LETHE_DVC_REMOTE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("LETHE_AWS_ENDPOINT_URL", moto_endpoint)
    # boto3 and s3fs fall back to AWS_ENDPOINT_URL. A refused port there makes DVC fail fast,
    # instead of reaching AWS, if it ignored the endpointurl that init writes.
    monkeypatch.setenv("AWS_ENDPOINT_URL", refused_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return aws.client("s3")


def make_bucket(s3, versioned: bool) -> str:
    name = f"lethe-dvc-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def stored_entries(s3, bucket: str) -> tuple[list[dict], list[dict]]:
    """Every object version and every delete marker in the bucket."""
    versions, markers = [], []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        versions += page.get("Versions", [])
        markers += page.get("DeleteMarkers", [])
    return versions, markers


def current_keys(s3, bucket: str) -> set[str]:
    versions, _ = stored_entries(s3, bucket)
    return {v["Key"] for v in versions if v["IsLatest"]}


def download_versions(s3, bucket: str, target) -> list:
    """Write every stored version to its own file under `target`, so the file-based helpers can scan them."""
    versions, _ = stored_entries(s3, bucket)
    paths = []
    for i, version in enumerate(versions):
        path = target / f"{i:04d}-{version['Key'].replace('/', '_')}"
        path.write_bytes(s3.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])["Body"].read())
        paths.append(path)
    return paths


def add_history(s3, bucket: str, key: str) -> None:
    """Add the history that `dvc gc --cloud` and a later push leave: a delete marker and a newer version."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.delete_object(Bucket=bucket, Key=key)
    s3.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.mark.parametrize("url", ["gs://bucket/lethe", "s3://", "/srv/dvc-remote", "s3://bucket/lethe?x=1"])
def test_init_rejects_non_s3_remote_url(tmp_path, monkeypatch, url):
    from tasks.bootstrap import create_workspace
    from tasks.settings import WorkspaceSettings

    monkeypatch.setenv("LETHE_DVC_REMOTE_URL", url)
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(ConfigurationError, match="LETHE_DVC_REMOTE_URL"):
        create_workspace(ws, WorkspaceSettings())
    assert not ws.root.exists(), "nothing is written before the URL is checked"


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_purge_object_deletes_every_version(s3, moto_endpoint, versioned):
    bucket = make_bucket(s3, versioned)
    remote = S3Remote(bucket, PREFIX, endpoint_url=moto_endpoint)
    md5 = hashlib.md5(b"erased").hexdigest()
    key = remote.object_key(md5)
    # Keys that share the object's prefix must survive: its neighbour by name and a directory object.
    neighbours = [remote.object_key(md5 + ".dir"), remote.object_key(md5[:-1] + "0")]
    for name in [key, *neighbours]:
        s3.put_object(Bucket=bucket, Key=name, Body=b"v1")
    s3.put_object(Bucket=bucket, Key=key, Body=b"v2")
    s3.delete_object(Bucket=bucket, Key=key)
    s3.put_object(Bucket=bucket, Key=key, Body=b"v3")
    before = remote_store.key_versions(s3, bucket, key)
    assert len(before) == (4 if versioned else 1), "precondition: versions and a delete marker exist"

    deleted = remote_store.purge_object(remote, md5)

    assert deleted == len(before)
    assert remote_store.key_versions(s3, bucket, key) == []
    versions, markers = stored_entries(s3, bucket)
    assert sorted(v["Key"] for v in versions) == sorted(neighbours)
    assert markers == []
    assert remote_store.purge_object(remote, md5) == 0, "a second purge finds nothing"


def test_purge_object_rejects_other_endpoint(s3, refused_endpoint):
    bucket = make_bucket(s3, versioned=True)
    remote = S3Remote(bucket, PREFIX, endpoint_url=refused_endpoint)
    md5 = hashlib.md5(b"kept").hexdigest()
    s3.put_object(Bucket=bucket, Key=remote.object_key(md5), Body=b"kept")

    with pytest.raises(ConfigurationError, match="LETHE_AWS_ENDPOINT_URL"):
        remote_store.purge_object(remote, md5)
    assert len(remote_store.key_versions(s3, bucket, remote.object_key(md5))) == 1


def doomed_objects(ws: Workspace, listing: dict[str, str], subjects: list[int]) -> set[str]:
    """Return the md5 of each cached shard that contains one of the subjects: what the run must tombstone."""
    doomed = set()
    for md5 in listing.values():
        keys = pq.read_table(versioning.object_path(ws.dvc_cache_dir, md5), columns=[SUBJECT_KEY]).column(SUBJECT_KEY)
        if set(keys.to_pylist()) & set(subjects):
            doomed.add(md5)
    return doomed


def test_erasure_purges_all_s3_versions(s3, moto_endpoint, monkeypatch, tmp_path, prefect_harness):
    from flows.nightly import nightly_deletion_run
    from tasks.audit import scan_subject
    from tasks.bootstrap import bootstrap
    from tasks.ledger import Ledger, Tombstone
    from tasks.shards import read_all

    bucket = make_bucket(s3, versioned=True)
    monkeypatch.setenv("LETHE_DVC_REMOTE_URL", f"s3://{bucket}/{PREFIX}/")
    ws = Workspace(tmp_path / "ws")
    bootstrap(ws)
    remote = S3Remote(bucket, PREFIX)

    # The remote URL is committed, and the endpoint only in the git-ignored local config.
    config = (ws.root / ".dvc" / "config").read_text()
    assert f"url = s3://{bucket}/{PREFIX}" in config
    assert "endpointurl" not in config
    assert f"endpointurl = {moto_endpoint}" in (ws.root / ".dvc" / "config.local").read_text()
    assert ".dvc/config.local" not in versioning.git(ws, "ls-files").split()
    assert not files_under(ws.dvc_remote_dir), "nothing is pushed to the workspace directory remote"

    # DVC 3 layout: <prefix>/files/md5/<2 hex>/<30 hex>, with the directory object as <md5>.dir.
    md5_before = versioning.data_md5(ws)
    listing_before = versioning.dir_listing(ws, md5_before)
    assert current_keys(s3, bucket) == {remote.object_key(m) for m in [md5_before, *listing_before.values()]}

    subjects = train_subjects(ws, 3)
    doomed = doomed_objects(ws, listing_before, subjects)
    assert doomed, "precondition: the subjects live in pushed shards"
    for md5 in doomed:
        add_history(s3, bucket, remote.object_key(md5))
    history = tmp_path / "history"
    history.mkdir()
    download_versions(s3, bucket, history)
    assert set(subjects) <= subjects_in_objects([history]), "precondition: the bucket holds the subjects"
    findings = scan_subject(ws, Ledger(ws.ledger_url), str(subjects[0]))
    assert any(f.location.startswith(f"s3://{bucket}/") for f in findings), "the audit reads the S3 remote"

    write_requests(ws, "s3.jsonl", [request(f"s3-{i}", subject) for i, subject in enumerate(subjects)])
    summary = nightly_deletion_run(workspace=str(ws.root))
    assert summary["status"] == "completed"
    assert summary["request_count"] == 3

    # Each tombstone names the S3 remote, and no version or delete marker of its object is left.
    with Ledger(ws.ledger_url).session() as s:
        tombstones = list(s.scalars(select(Tombstone).where(Tombstone.batch_id == summary["batch_id"])))
    assert {t.object_md5 for t in tombstones} == doomed
    for tombstone in tombstones:
        assert remote.url in tombstone.stores
        assert remote_store.key_versions(s3, bucket, remote.object_key(tombstone.object_md5)) == []
    certificate = json.loads((ws.certificates_dir / f"{summary['batch_id']}.json").read_text())
    assert all(remote.url in t["stores"] for t in certificate["certificate"]["tombstones"])

    # The current data version is complete in the bucket, and the old directory object stays.
    md5_after = versioning.data_md5(ws)
    listing_after = versioning.dir_listing(ws, md5_after)
    expected = {remote.object_key(m) for m in [md5_after, *listing_after.values()]}
    assert expected <= current_keys(s3, bucket)
    assert remote.object_key(md5_before) in current_keys(s3, bucket)

    # No stored version of any object contains a subject, as a Parquet row or as a raw id.
    erased_history = tmp_path / "erased-history"
    erased_history.mkdir()
    paths = download_versions(s3, bucket, erased_history)
    assert not set(subjects) & subjects_in_objects([erased_history])
    assert subjects_in_objects([erased_history]), "the other subjects stay in the bucket"
    assert raw_id_hits(paths, subjects) == []
    findings = scan_subject(ws, Ledger(ws.ledger_url), str(subjects[0]))
    assert [f for f in findings if f.location.startswith("s3://")] == []

    # A checkout without cache or data restores the current version from the bucket alone.
    shutil.rmtree(ws.dvc_cache_dir)
    shutil.rmtree(ws.data_dir)
    with versioning.open_dvc(ws) as repo:
        repo.pull(targets=[str(ws.dvc_file)])
    pulled = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in ws.data_dir.iterdir()}
    assert pulled == listing_after
    assert not set(subjects) & set(read_all(ws.data_dir)[SUBJECT_KEY])
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ws.root, capture_output=True, text=True).stdout == ""
    # The old listing is read from the bucket now that the cache is gone.
    assert versioning.dir_listing(ws, md5_before) == listing_before
