"""DVC remotes on S3: where DVC puts each object, and deleting every stored version of one.

DVC 3 pushes the object with md5 `ab12…` to `<remote url>/files/md5/ab/12…`, and a
directory listing to the same key with `.dir` appended (dvc 3.67.1 with dvc-s3 3.3.0;
tests/test_dvc_s3.py checks the layout against moto). In a bucket with versioning, a plain
DELETE only adds a delete marker and every earlier version stays readable, so an erasure
deletes each version and each delete marker of the key by its VersionId. The same calls
work on a bucket without versioning, where the one version has the VersionId "null".

Every boto3 client comes from tasks.sources.aws, so it uses LETHE_AWS_ENDPOINT_URL. DVC
itself uses the remote's `endpointurl` from `.dvc/config.local`, which `lethe init` writes
from the same variable. check_endpoint raises when the two differ, so that Lethe does not
delete from, or audit, another endpoint than the one DVC pushes to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from tasks.errors import ConfigurationError, LetheError
from tasks.sources import aws
from tasks.workspace import Workspace

log = logging.getLogger("lethe.remote_store")

# Name of the DVC remote that `lethe init` adds for LETHE_DVC_REMOTE_URL.
REMOTE_NAME = "s3"
# DeleteObjects accepts at most 1000 keys (or key versions) per request.
DELETE_BATCH_SIZE = 1000


class RemoteStoreError(LetheError):
    """A request to a DVC remote on S3 failed, or left a version of an erased object behind."""


@dataclass(frozen=True)
class S3Remote:
    """One DVC remote in an S3 bucket."""

    bucket: str
    prefix: str  # key prefix without leading or trailing "/"; "" when the remote is the bucket root
    endpoint_url: str | None = None  # the remote's `endpointurl` in the DVC config

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def key_prefix(self) -> str:
        """Prefix of every key under the remote, ending in "/" unless it is the bucket root."""
        return f"{self.prefix}/" if self.prefix else ""

    def object_key(self, md5: str) -> str:
        """Key of a DVC 3 object. Objects pushed by DVC 2 (`<prefix>/ab/12…`) are not covered."""
        return f"{self.key_prefix}files/md5/{md5[:2]}/{md5[2:]}"


def parse_s3_url(url: str, setting: str = "LETHE_DVC_REMOTE_URL") -> S3Remote:
    """Parse `s3://bucket/prefix`; raise ConfigurationError naming `setting` for anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigurationError(
            f"{setting}={url!r} is not an S3 URL. Lethe can erase data only from an S3 remote or from the "
            f"workspace's own directory remote: set it to s3://<bucket>/<prefix>, or unset it."
        )
    return S3Remote(bucket=parts.netloc, prefix=parts.path.strip("/"))


def add_remote(repo: Any, remote: S3Remote) -> None:
    """Make `remote` the default DVC remote of an open `dvc.repo.Repo`.

    The endpoint goes to the git-ignored local config (`.dvc/config.local`), because it
    differs between machines and deployments. Credentials come from the usual AWS
    variables and files, read by DVC and boto3 alike.
    """
    with repo.config.edit() as conf:
        conf["remote"][REMOTE_NAME] = {"url": remote.url}
        conf["core"]["remote"] = REMOTE_NAME
    endpoint = aws.endpoint_override()
    if endpoint:
        with repo.config.edit("local") as local:
            local["remote"][REMOTE_NAME] = {"endpointurl": endpoint}


def s3_remotes(ws: Workspace) -> list[S3Remote]:
    """Return every S3 remote in the workspace's DVC config, with all config levels merged."""
    from dvc.config import Config

    remotes = []
    for name, settings in Config(dvc_dir=str(ws.root / ".dvc"))["remote"].items():
        if not settings.get("url", "").startswith("s3://"):
            continue
        if settings.get("version_aware") or settings.get("worktree"):
            # These modes store files under their workspace paths, not under files/md5/.
            raise ConfigurationError(
                f"DVC remote {name!r} ({settings['url']}) has version_aware or worktree set, so its objects are not "
                f"under files/md5/ and Lethe cannot erase them. Remove both settings with "
                f"`dvc remote modify --unset {name} version_aware` and `dvc remote modify --unset {name} worktree`."
            )
        remote = parse_s3_url(settings["url"], setting=f"the url of DVC remote {name!r}")
        remotes.append(replace(remote, endpoint_url=settings.get("endpointurl")))
    return remotes


def check_endpoint(remote: S3Remote) -> None:
    """Raise ConfigurationError unless boto3 and DVC reach the remote through the same endpoint."""
    configured = (remote.endpoint_url or "").rstrip("/")
    override = (aws.endpoint_override() or "").rstrip("/")
    if configured != override:
        raise ConfigurationError(
            f"DVC reaches {remote.url} through endpointurl {remote.endpoint_url or '(none: AWS or AWS_ENDPOINT_URL)'}, "
            f"but LETHE_AWS_ENDPOINT_URL is {aws.endpoint_override() or '(unset)'}. Set LETHE_AWS_ENDPOINT_URL to the "
            f"remote's endpoint, or change the remote with `dvc remote modify --local {REMOTE_NAME} endpointurl URL`."
        )


@contextmanager
def s3_errors(location: str, action: str) -> Iterator[None]:
    """Turn botocore's errors into a RemoteStoreError that names the S3 location and the action."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise RemoteStoreError(
            f"Could not {action} in {location} (endpoint {aws.endpoint_override() or 'AWS'}): {exc}. "
            f"Check the credentials, the bucket and LETHE_AWS_ENDPOINT_URL, then run again."
        ) from exc


def key_versions(client: Any, bucket: str, key: str) -> list[dict[str, str]]:
    """Return `{"Key", "VersionId"}` of every version and delete marker of exactly `key`.

    The Prefix filter also matches longer keys, such as `<key>.dir`, so keys are compared in full.
    """
    found = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
        for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
            if entry["Key"] == key:
                found.append({"Key": key, "VersionId": entry["VersionId"]})
    return found


def prefix_versions(client: Any, bucket: str, prefix: str) -> list[dict[str, str]]:
    """Return `{"Key", "VersionId"}` of every version and delete marker of every key under `prefix`."""
    found = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
            found.append({"Key": entry["Key"], "VersionId": entry["VersionId"]})
    return found


def delete_versions(client: Any, bucket: str, targets: list[dict[str, str]]) -> None:
    """Delete the given object versions and delete markers, 1,000 per request (the S3 maximum)."""
    for start in range(0, len(targets), DELETE_BATCH_SIZE):
        chunk = targets[start:start + DELETE_BATCH_SIZE]
        response = client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise RemoteStoreError(
                f"S3 rejected the delete of {len(errors)} version(s) in bucket {bucket}, first {first.get('Key')} "
                f"version {first.get('VersionId')}: {first.get('Code')} {first.get('Message')}. Object Lock "
                f"retention, or a policy that denies s3:DeleteObjectVersion, blocks the erasure: lift it and run again."
            )


def purge_object(remote: S3Remote, md5: str, client: Any = None) -> int:
    """Delete every version and delete marker of one DVC object; return how many were deleted.

    Lists the key again afterwards and raises RemoteStoreError if anything is left, so a
    version uploaded during the delete cannot go unnoticed.
    """
    check_endpoint(remote)
    client = client or aws.client("s3")
    key = remote.object_key(md5)
    with s3_errors(f"DVC remote {remote.url}", f"delete every version of {key}"):
        targets = key_versions(client, remote.bucket, key)
        delete_versions(client, remote.bucket, targets)
        left = key_versions(client, remote.bucket, key)
    if left:
        raise RemoteStoreError(
            f"{len(left)} version(s) of {key} are still in {remote.url} after deleting them, so something wrote "
            f"the object again. Stop other writers to the remote and run again."
        )
    log.info("Deleted %d version(s) and delete marker(s) of %s from %s", len(targets), key, remote.url)
    return len(targets)


def read_object(remote: S3Remote, md5: str, client: Any = None) -> bytes | None:
    """Return the current version of one DVC object, or None when the remote does not have it."""
    from botocore.exceptions import ClientError

    check_endpoint(remote)
    client = client or aws.client("s3")
    key = remote.object_key(md5)
    with s3_errors(f"DVC remote {remote.url}", f"read {key}"):
        try:
            return client.get_object(Bucket=remote.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                return None
            raise


def all_object_versions(remote: S3Remote, client: Any = None) -> Iterator[tuple[str, bytes]]:
    """Yield `(location, content)` of every stored version of every object under the remote.

    Delete markers have no content and are skipped. Each version is read into memory
    one at a time, so memory use is bounded by the largest object.
    """
    check_endpoint(remote)
    client = client or aws.client("s3")
    with s3_errors(f"DVC remote {remote.url}", "list and read every object version"):
        pages = client.get_paginator("list_object_versions").paginate(Bucket=remote.bucket, Prefix=remote.key_prefix)
        for page in pages:
            for version in page.get("Versions", []):
                key, version_id = version["Key"], version["VersionId"]
                body = client.get_object(Bucket=remote.bucket, Key=key, VersionId=version_id)["Body"].read()
                yield f"s3://{remote.bucket}/{key} (version {version_id})", body
