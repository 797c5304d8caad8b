"""The deletion-request schema and the parsing of JSON Lines into valid and quarantined requests.

Quarantine reasons are built from field names and rule descriptions only, never from
the offending value, so a reason can be logged and stored without leaking a subject id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Subject keys of the default dataset (`zper`) are positive integers; 18 digits keep
# them inside int64.
SUBJECT_ID_PATTERN = r"^[0-9]{1,18}$"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
MAX_LINE_BYTES = 4096
# Clocks of request producers drift; a request stamped more than this far in the
# future is a bug upstream, not a real receipt time.
MAX_CLOCK_SKEW = timedelta(hours=1)
# Erasure deadlines are weeks, so a receipt time years back is a producer bug (a zeroed
# or epoch timestamp), not a real backlog. Quarantine lets a person check it.
MAX_REQUEST_AGE = timedelta(days=5 * 365)

# pydantic also reads a string of digits as Unix time; an ISO 8601 date starts YYYY-MM-DD.
ISO_DATE_START = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ]|$)")

# Human-readable rules for pattern fields, used in place of pydantic's regex messages.
FIELD_RULES = {
    "request_id": "must be 1 to 128 characters of letters, digits and . _ : -, starting with a letter or digit",
    "subject_id": "must be a decimal integer of 1 to 18 digits (the dataset's subject key)",
    "source": "must be 1 to 64 printable ASCII characters",
}


class RequestLine(BaseModel):
    """One deletion request as a producer writes it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    subject_id: str = Field(pattern=SUBJECT_ID_PATTERN)
    received_at: datetime
    source: str = Field(min_length=1, max_length=64, pattern=r"^[\x20-\x7e]+$")

    @field_validator("subject_id", mode="before")
    @classmethod
    def _integer_to_text(cls, value: object) -> object:
        # JSON producers often write numeric ids as numbers; bool is an int in Python but never an id.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("subject_id")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return str(int(value))

    @model_validator(mode="after")
    def _request_id_hides_subject(self) -> "RequestLine":
        # The request id is stored and journaled in the ledger for good, so it must not spell out the subject.
        if re.search(rf"(?<![0-9]){re.escape(self.subject_id)}(?![0-9])", self.request_id):
            raise ValueError("request_id must not contain the subject_id; use an id that reveals nothing about the subject")
        return self

    @field_validator("received_at", mode="before")
    @classmethod
    def _iso_text_only(cls, value: object) -> object:
        # pydantic would read a number as Unix seconds; the format is ISO 8601 text only.
        if not isinstance(value, str) or not ISO_DATE_START.match(value.strip()):
            raise ValueError("must be an ISO 8601 string with a time zone, for example 2026-12-01T09:30:00Z")
        return value

    @field_validator("received_at")
    @classmethod
    def _aware_and_plausible(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("timestamp must carry a time zone, for example 2026-12-01T09:30:00Z")
        try:
            value = value.astimezone(UTC)
        except OverflowError:
            raise ValueError("timestamp is out of range") from None
        now = datetime.now(UTC)
        if value > now + MAX_CLOCK_SKEW:
            raise ValueError("timestamp is in the future")
        if value < now - MAX_REQUEST_AGE:
            raise ValueError(f"timestamp is more than {MAX_REQUEST_AGE.days} days in the past; check the producer's clock")
        return value


@dataclass(frozen=True)
class QuarantinedLine:
    line_number: int
    reason: str
    raw: str


# pydantic's own messages for these ("Input should be a valid string") do not state the rule.
RULE_ERRORS = {"string_pattern_mismatch", "string_type", "string_unicode", "string_too_short", "string_too_long"}


def describe_validation_error(error: ValidationError) -> str:
    """Summarise pydantic errors by field and rule, leaving the input values out."""
    parts = []
    for item in error.errors(include_input=False, include_url=False):
        field = ".".join(str(p) for p in item["loc"]) or "line"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            # The field name is input text too, so it is left out of the reason.
            field = "line"
            message = "unexpected field (allowed: request_id, subject_id, received_at, source)"
        elif item["type"] in RULE_ERRORS and field in FIELD_RULES:
            message = FIELD_RULES[field]
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        parts.append(f"{field}: {message}")
    return "; ".join(parts)


class DuplicateKeyError(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys, so a line naming two subjects would silently lose one.
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise DuplicateKeyError("a field appears twice in one object")
    return dict(pairs)


def parse_line(text: str) -> RequestLine:
    """Parse one JSON line; raise ValueError with a value-free reason."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("line is not valid UTF-8") from None
    if size > MAX_LINE_BYTES:
        raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        payload = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except DuplicateKeyError as exc:
        raise ValueError(f"invalid request: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
    try:
        return RequestLine.model_validate(payload)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc)) from None


def parse_lines(lines: Iterable[str]) -> tuple[list[RequestLine], list[QuarantinedLine]]:
    """Split lines into valid requests and quarantined lines; blank lines are skipped."""
    valid: list[RequestLine] = []
    invalid: list[QuarantinedLine] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            valid.append(parse_line(line))
        except ValueError as exc:
            invalid.append(QuarantinedLine(number, str(exc), line.rstrip("\n")))
    return valid, invalid


def decode_file(data: bytes) -> list[str]:
    """Decode a JSON Lines file as UTF-8 into lines; undecodable lines are kept for quarantine.

    Splits on "\n" only (with "\r\n" accepted), because `str.splitlines` also splits on
    characters such as U+2028 that JSON allows inside strings. A leading UTF-8 byte order
    mark, as some editors write it, is dropped.
    """
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def new_request(subject_id: str, source: str = "cli") -> dict:
    """Build a request line for an id typed on the command line."""
    import uuid

    return {
        "request_id": f"req-{uuid.uuid4().hex}",
        "subject_id": subject_id,
        "received_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
    }
