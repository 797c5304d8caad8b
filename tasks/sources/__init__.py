"""Queue sources of deletion requests: the workspace's queue directory, S3 prefixes and SQS queues.

A source spec names one source:

    local                        the workspace's queue/incoming/ directory
    s3://<bucket>/<prefix>/      JSON Lines objects under the prefix
    sqs://<queue name>           an SQS queue, looked up by name
    https://sqs.<region>.amazonaws.com/<account id>/<queue name>   an SQS queue URL

Every request carries a source ref that starts with its source's own prefix
(`local:<file>`, `s3://<bucket>/<key>`, `sqs:<queue URL>#<message id>`), so refs are
unique across sources and acknowledge_sources routes each ref to the source it came from.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.errors import ConfigurationError
from tasks.hashing import SubjectHasher
from tasks.sources.local import LocalSource
from tasks.sources.records import QuarantineRecord, QueuedRequest
from tasks.workspace import Workspace

log = logging.getLogger("lethe.sources")

VALID_FORMS = ('"local", "s3://<bucket>/<prefix>/", "sqs://<queue name>", or an SQS queue URL such as '
               '"https://sqs.us-east-1.amazonaws.com/123456789012/<queue name>"')
# S3 bucket names: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending alphanumeric.
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# SQS queue names: up to 80 letters, digits, hyphens and underscores, including a ".fifo" suffix.
QUEUE_NAME_PATTERN = re.compile(r"^(?:[A-Za-z0-9_-]{1,75}\.fifo|[A-Za-z0-9_-]{1,80})$")
QUEUE_URL_PATTERN = re.compile(r"^https?://[^/\s?#]+/[^/\s?#]+/(?P<name>[^/\s?#]+)$")


class SourceSpecError(ConfigurationError, ValueError):
    """A queue source spec is invalid, duplicated or overlaps another one."""


@runtime_checkable
class QueueSource(Protocol):
    """A queue of deletion requests that ingest reads and publish acknowledges after commit."""

    name: str

    def owns(self, source_ref: str) -> bool:
        """Return whether the ref names a file, object or message of this source."""
        ...

    def read_pending(self) -> tuple[list[QueuedRequest], list[QuarantineRecord]]:
        """Quarantine the invalid pending requests, then return the valid ones and the quarantine records."""
        ...

    def acknowledge(self, source_refs: set[str], hasher: SubjectHasher) -> int:
        """Acknowledge the files, objects or messages of the refs and return how many.

        Refs of other sources are ignored.
        """
        ...


class SourceSettings(BaseSettings):
    """Limits of the S3 and SQS sources, read from the environment (prefix LETHE_)."""

    model_config = SettingsConfigDict(env_prefix="LETHE_")

    s3_max_object_bytes: int = Field(16 * 1024 * 1024, ge=1,
                                     description="Objects larger than this many bytes are quarantined whole, unread.")
    sqs_wait_seconds: int = Field(20, ge=0, le=20, description="Long-poll wait of each SQS receive, in seconds.")
    sqs_max_messages: int = Field(1000, ge=1, description="Maximum number of SQS messages one run receives per queue.")
    sqs_visibility_timeout: int | None = Field(
        None, ge=0, le=43200,
        description="Visibility timeout in seconds set on receive; unset keeps the queue's own setting.")
    sqs_hold_seconds: int = Field(
        900, ge=1, le=43200,
        description="Visibility timeout in seconds renewed between stages while a run holds SQS messages.")


@dataclass(frozen=True)
class SourceSpec:
    """One parsed source spec."""

    text: str
    kind: str  # "local", "s3" or "sqs"
    bucket: str = ""
    prefix: str = ""
    queue_name: str = ""
    queue_url: str | None = None


def _invalid(spec: object, problem: str) -> SourceSpecError:
    return SourceSpecError(f"Invalid queue source {spec!r}: {problem}. Valid forms: {VALID_FORMS}.")


def parse_spec(spec: str) -> SourceSpec:
    """Parse one source spec; raise SourceSpecError naming the spec and the valid forms."""
    if not isinstance(spec, str):
        raise _invalid(spec, "expected a string")
    if spec == "local":
        return SourceSpec(spec, "local")
    if spec.startswith("s3://"):
        bucket, _, prefix = spec.removeprefix("s3://").partition("/")
        if not BUCKET_PATTERN.match(bucket):
            raise _invalid(spec, "the bucket name must be 3 to 63 lowercase letters, digits, dots or hyphens")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return SourceSpec(spec, "s3", bucket=bucket, prefix=prefix)
    if spec.startswith("sqs://"):
        name = spec.removeprefix("sqs://")
        if not QUEUE_NAME_PATTERN.match(name):
            raise _invalid(spec, "the queue name must be 1 to 80 letters, digits, hyphens or underscores, "
                                 "with an optional .fifo suffix")
        return SourceSpec(spec, "sqs", queue_name=name)
    match = QUEUE_URL_PATTERN.match(spec)
    if match:
        if not QUEUE_NAME_PATTERN.match(match["name"]):
            raise _invalid(spec, "the queue name at the end of the URL is not a valid SQS queue name")
        return SourceSpec(spec, "sqs", queue_name=match["name"], queue_url=spec)
    raise _invalid(spec, "unknown form")


def validate_specs(specs: list[str]) -> list[SourceSpec]:
    """Parse the specs and reject an empty list, duplicates and S3 prefixes that contain each other."""
    if isinstance(specs, str) or not specs:
        raise SourceSpecError(f"Give a list of at least one queue source. Valid forms: {VALID_FORMS}.")
    parsed = [parse_spec(spec) for spec in specs]
    for i, first in enumerate(parsed):
        for second in parsed[i + 1:]:
            if first.kind != second.kind:
                continue
            if first.kind == "s3" and first.bucket == second.bucket and (
                    first.prefix.startswith(second.prefix) or second.prefix.startswith(first.prefix)):
                raise SourceSpecError(
                    f"Queue sources {first.text!r} and {second.text!r} overlap: one prefix contains the other, "
                    "so their objects would be read twice. Keep only one of them.")
            if first.kind != "s3" and (first.queue_url or first.queue_name) == (second.queue_url or second.queue_name):
                raise SourceSpecError(f"Queue source {second.text!r} is listed twice.")
    return parsed


def load_source_settings() -> SourceSettings:
    try:
        return SourceSettings()
    except ValidationError as exc:
        raise ConfigurationError(f"Invalid queue source setting in the environment (prefix LETHE_): {exc}") from None


def open_sources(specs: list[str], ws: Workspace) -> list[QueueSource]:
    """Validate the specs and open one source per spec, in the order given.

    SQS queues given by name are looked up now, so a missing queue fails before ingest.
    """
    parsed = validate_specs(specs)
    settings = load_source_settings()
    sources: list[QueueSource] = []
    for spec in parsed:
        if spec.kind == "local":
            sources.append(LocalSource(ws))
        elif spec.kind == "s3":
            from tasks.sources.s3 import S3Source

            sources.append(S3Source(spec.bucket, spec.prefix, max_object_bytes=settings.s3_max_object_bytes))
        else:
            from tasks.sources.sqs import SQSSource

            sources.append(SQSSource(spec.text, spec.queue_url, wait_seconds=settings.sqs_wait_seconds,
                                     max_messages=settings.sqs_max_messages,
                                     visibility_timeout=settings.sqs_visibility_timeout))
    queue_urls = [source.queue_url for source in sources if hasattr(source, "queue_url")]
    repeated = sorted({url for url in queue_urls if queue_urls.count(url) > 1})
    if repeated:
        raise SourceSpecError(f"SQS queue {repeated[0]} is listed twice, once by name and once by URL.")
    return sources


def read_sources(sources: list[QueueSource]) -> tuple[list[QueuedRequest], list[QuarantineRecord]]:
    """Read every source in order and return all requests and quarantine records."""
    queued: list[QueuedRequest] = []
    quarantined: list[QuarantineRecord] = []
    for source in sources:
        requests, records = source.read_pending()
        log.info("Read %d requests from %s (%d quarantined)", len(requests), source.name, len(records))
        queued += requests
        quarantined += records
    return queued, quarantined


def acknowledge_sources(sources: list[QueueSource], source_refs: set[str], hasher: SubjectHasher) -> int:
    """Acknowledge each ref at the source that owns it; return the total acknowledged."""
    acknowledged = 0
    unowned = set(source_refs)
    for source in sources:
        owned = {ref for ref in source_refs if source.owns(ref)}
        unowned -= owned
        if owned:
            acknowledged += source.acknowledge(owned, hasher)
    if unowned:
        log.warning("%d source refs belong to no source of this run and stay unacknowledged, for example %s",
                    len(unowned), min(unowned))
    return acknowledged


__all__ = [
    "QuarantineRecord", "QueueSource", "QueuedRequest", "SourceSettings", "SourceSpec", "SourceSpecError",
    "acknowledge_sources", "open_sources", "parse_spec", "read_sources", "validate_specs",
]


def hold_messages(sources: list[QueueSource]) -> int:
    """Renew the visibility timeout of held SQS messages, so no other consumer receives them mid-run."""
    seconds = load_source_settings().sqs_hold_seconds
    extended = 0
    for source in sources:
        extend = getattr(source, "extend_visibility", None)
        if extend is not None:
            extended += extend(seconds)
    return extended
