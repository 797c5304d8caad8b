"""Deletion requests as JSON Lines objects under an S3 prefix.

    <prefix><name>.jsonl             objects waiting for a run (any depth below the prefix)
    <prefix>quarantine/<name>.jsonl  invalid lines with their reason, appended per object
    <prefix>quarantine/<name>.jsonl.oversized-<UTC time>  objects too large to read, moved whole
    <prefix>done/<name>.jsonl        acknowledged objects, with subject ids replaced by their keyed hash

Producers must write each set of requests under a new key. Reads and rewrites are
conditional on the ETag that read_pending saw, so an object overwritten in between is
left for the next run, but the final deletes are unconditional.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from tasks.hashing import SubjectHasher
from tasks.requests import QuarantinedLine, decode_file, parse_lines
from tasks.sources import aws
from tasks.sources.records import QuarantineRecord, QueuedRequest, quarantine_jsonl, redacted_jsonl

log = logging.getLogger("lethe.sources.s3")

DEFAULT_MAX_OBJECT_BYTES = 16 * 1024 * 1024
# Line number of a quarantine record that covers a whole object.
WHOLE_OBJECT = 0


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


class S3Source:
    """Pending request objects under `s3://<bucket>/<prefix>`, with source refs `s3://<bucket>/<key>`."""

    def __init__(self, bucket: str, prefix: str, *, max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
                 client: Any = None) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.name = f"s3://{bucket}/{prefix}"
        self.done_prefix = prefix + "done/"
        self.quarantine_prefix = prefix + "quarantine/"
        self.max_object_bytes = max_object_bytes
        self.client = client if client is not None else aws.client("s3")
        # ETag of each object whose requests read_pending returned, as read or rewritten.
        self._etags: dict[str, str] = {}

    def _is_pending_key(self, key: str) -> bool:
        return (key.startswith(self.prefix) and key.endswith(".jsonl")
                and not key.startswith((self.done_prefix, self.quarantine_prefix)))

    def _ref(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _key(self, source_ref: str) -> str | None:
        head = f"s3://{self.bucket}/"
        return source_ref[len(head):] if source_ref.startswith(head) else None

    def owns(self, source_ref: str) -> bool:
        key = self._key(source_ref)
        return key is not None and self._is_pending_key(key)

    def _pending_objects(self) -> list[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        objects = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            objects += [obj for obj in page.get("Contents", []) if self._is_pending_key(obj["Key"])]
        return sorted(objects, key=lambda obj: obj["Key"])

    def read_pending(self) -> tuple[list[QueuedRequest], list[QuarantineRecord]]:
        """Read every pending object; invalid lines move to quarantine, the object keeps the valid ones.

        Objects larger than max_object_bytes move to quarantine whole, unread.
        """
        requests: list[QueuedRequest] = []
        quarantined: list[QuarantineRecord] = []
        for obj in self._pending_objects():
            key = obj["Key"]
            if obj["Size"] > self.max_object_bytes:
                quarantined.append(self._quarantine_object(key, obj["ETag"], obj["Size"]))
                continue
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=obj["ETag"])
            except ClientError as exc:
                if _error_code(exc) not in ("NoSuchKey", "PreconditionFailed"):
                    raise
                log.warning("Skipped %s: it changed or disappeared after listing (%s); the next run reads it",
                            self._ref(key), _error_code(exc))
                continue
            etag = response["ETag"]
            valid, invalid = parse_lines(decode_file(response["Body"].read()))
            if invalid:
                quarantined += self._quarantine_lines(key, invalid)
                # Only after the quarantine object is written, so an interrupted run loses no line.
                etag = self._remove_invalid_lines(key, etag, valid)
                if etag is None:
                    continue
            self._etags[key] = etag
            requests += [QueuedRequest(request, self._ref(key)) for request in valid]
        return requests, quarantined

    def _quarantine_lines(self, key: str, lines: list[QuarantinedLine]) -> list[QuarantineRecord]:
        """Append invalid lines with their reasons to the object's quarantine object."""
        quarantine_key = self.quarantine_prefix + key[len(self.prefix):]
        try:
            existing = self.client.get_object(Bucket=self.bucket, Key=quarantine_key)["Body"].read()
        except ClientError as exc:
            if _error_code(exc) != "NoSuchKey":
                raise
            existing = b""
        added = quarantine_jsonl(lines).encode("utf-8")
        self.client.put_object(Bucket=self.bucket, Key=quarantine_key, Body=existing + added,
                               ContentType="application/jsonl")
        ref = self._ref(key)
        for item in lines:
            log.warning("Quarantined line %d of %s: %s", item.line_number, ref, item.reason)
        return [QuarantineRecord(ref, item.line_number, item.reason) for item in lines]

    def _remove_invalid_lines(self, key: str, etag: str, valid: list) -> str | None:
        """Rewrite the object with its valid lines only, or delete it when none is left.

        Returns the new ETag, or None when the object is gone or changed since it was read.
        """
        if not valid:
            self.client.delete_object(Bucket=self.bucket, Key=key)
            log.info("Deleted %s: every line was quarantined", self._ref(key))
            return None
        body = "".join(request.model_dump_json() + "\n" for request in valid).encode("utf-8")
        try:
            # NOTE: If-Match on PutObject needs S3 conditional writes (the S3 user guide's
            # "conditional writes"; checked with moto 5.2.5). A service that ignores the header
            # overwrites unconditionally.
            response = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfMatch=etag,
                                               ContentType="application/jsonl")
        except ClientError as exc:
            if _error_code(exc) not in ("NoSuchKey", "PreconditionFailed"):
                raise
            log.warning("Skipped %s: it changed while its invalid lines were quarantined (%s); "
                        "the next run reads it again", self._ref(key), _error_code(exc))
            return None
        return response["ETag"]

    def _quarantine_object(self, key: str, etag: str, size: int) -> QuarantineRecord:
        """Move an object too large to read to quarantine, with the reason in its metadata."""
        reason = f"object of {size} bytes is larger than the maximum of {self.max_object_bytes} bytes"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        # The suffix keeps line quarantine objects (always *.jsonl) and earlier moves of the same key intact.
        quarantine_key = f"{self.quarantine_prefix}{key[len(self.prefix):]}.oversized-{stamp}"
        # Managed copy, because CopyObject alone stops at 5 GB.
        self.client.copy({"Bucket": self.bucket, "Key": key}, self.bucket, quarantine_key,
                         ExtraArgs={"CopySourceIfMatch": etag, "MetadataDirective": "REPLACE",
                                    "Metadata": {"lethe-reason": reason}})
        self.client.delete_object(Bucket=self.bucket, Key=key)
        ref = self._ref(key)
        log.warning("Quarantined %s whole as s3://%s/%s: %s", ref, self.bucket, quarantine_key, reason)
        return QuarantineRecord(ref, WHOLE_OBJECT, reason)

    def acknowledge(self, source_refs: set[str], hasher: SubjectHasher) -> int:
        """Move the objects of the refs to done/, replacing each subject id with its keyed hash.

        Only objects that read_pending of this source returned are moved, and only while their
        ETag is unchanged. Refs of other sources are ignored.
        """
        moved = 0
        for ref in sorted(source_refs):
            if not self.owns(ref):
                continue
            key = self._key(ref)
            etag = self._etags.get(key)
            if etag is None:
                log.debug("Not acknowledging %s: this run did not read it", ref)
                continue
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            except ClientError as exc:
                if _error_code(exc) == "NoSuchKey":
                    continue  # acknowledged by an earlier, interrupted run
                if _error_code(exc) != "PreconditionFailed":
                    raise
                log.warning("Not acknowledging %s: it changed after it was read; the next run reads it again", ref)
                continue
            valid, _ = parse_lines(decode_file(response["Body"].read()))
            done_key = self.done_prefix + key[len(self.prefix):]
            self.client.put_object(Bucket=self.bucket, Key=done_key, Body=redacted_jsonl(valid, hasher).encode("utf-8"),
                                   ContentType="application/jsonl")
            self.client.delete_object(Bucket=self.bucket, Key=key)
            del self._etags[key]
            moved += 1
        return moved
