"""Queue sources against a moto server on 127.0.0.1: S3 objects, SQS messages, and the flow reading both."""

from __future__ import annotations

import json
import logging
import time
import uuid

import pytest

from tasks.hashing import SubjectHasher
from tasks.sources import (SourceSpecError, acknowledge_sources, open_sources, parse_spec, read_sources,
                           validate_specs)
from tasks.workspace import Workspace
from tests import stores
from tests.helpers import request, train_subjects

HASHER = SubjectHasher(b"k" * 32)
SUBJECT = "125024"
INVALID_SUBJECT_LINE = json.dumps({"request_id": "bad-1", "subject_id": "98765x",
                                   "received_at": "2026-11-30T10:00:00Z", "source": "test"})


@pytest.fixture(scope="session")
def moto_server():
    """One moto server over HTTP on 127.0.0.1 for the whole session; tests isolate by unique names."""
    with stores.moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws(moto_server, monkeypatch, tmp_path):
    """Point every boto3 client at the moto server with dummy credentials, for one test only."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SQS",
                 "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "LETHE_AWS_ENDPOINT_URL",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    # No profile, config file or instance metadata can add another endpoint or credentials.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("LETHE_SQS_WAIT_SECONDS", "1")
    return moto_server


@pytest.fixture
def s3(aws):
    from tasks.sources import aws as aws_clients

    return aws_clients.client("s3")


@pytest.fixture
def sqs(aws):
    from tasks.sources import aws as aws_clients

    return aws_clients.client("sqs")


@pytest.fixture
def bucket(s3):
    name = f"lethe-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def unique_queue_name() -> str:
    return f"lethe-{uuid.uuid4().hex[:12]}"


def put_lines(s3, bucket: str, key: str, lines: list[str | dict]) -> None:
    body = "".join((json.dumps(item) if isinstance(item, dict) else item) + "\n" for item in lines)
    s3.put_object(Bucket=bucket, Key=key, Body=body.encode("utf-8"))


def read_lines(s3, bucket: str, key: str) -> list[dict]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    return [json.loads(line) for line in body.splitlines()]


def keys(s3, bucket: str) -> list[str]:
    return sorted(obj["Key"] for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def queue_counts(sqs, url: str) -> tuple[int, int]:
    """Return the visible and in-flight message counts of a queue."""
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])


def workspace_hasher(ws: Workspace) -> SubjectHasher:
    from tasks.hashing import load_hasher
    from tasks.settings import EnvironmentSettings

    return load_hasher(EnvironmentSettings().hmac_key, ws.hmac_key_file)


def s3_source(bucket: str, prefix: str = "requests/", **options):
    from tasks.sources.s3 import S3Source

    return S3Source(bucket, prefix, **options)


def sqs_source(name: str, **options):
    from tasks.sources.sqs import SQSSource

    return SQSSource(f"sqs://{name}", wait_seconds=1, **options)


# Source specs


@pytest.mark.parametrize(("spec", "problem"), [
    ("", "unknown form"),
    ("LOCAL", "unknown form"),
    ("ftp://host/x", "unknown form"),
    ("https://sqs.example.com/name-only", "unknown form"),
    ("s3://", "bucket name"),
    ("s3://Upper_Case/requests/", "bucket name"),
    ("sqs://", "queue name"),
    ("sqs://bad name", "queue name"),
    ("sqs://" + "q" * 81, "queue name"),
    ("https://sqs.us-east-1.amazonaws.com/123456789012/bad!name", "not a valid SQS queue name"),
])
def test_parse_spec_rejects_invalid(spec, problem):
    with pytest.raises(SourceSpecError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert problem in message
    assert "s3://<bucket>/<prefix>/" in message
    assert "sqs://<queue name>" in message


def test_parse_spec_accepts_each_form():
    assert parse_spec("local").kind == "local"
    s3_spec = parse_spec("s3://bucket-1/incoming")
    assert (s3_spec.kind, s3_spec.bucket, s3_spec.prefix) == ("s3", "bucket-1", "incoming/")
    assert parse_spec("s3://bucket-1").prefix == ""
    assert parse_spec("sqs://requests.fifo").queue_name == "requests.fifo"
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/requests"
    url_spec = parse_spec(url)
    assert (url_spec.kind, url_spec.queue_name, url_spec.queue_url) == ("sqs", "requests", url)


@pytest.mark.parametrize(("specs", "message"), [
    ([], "at least one"),
    ("local", "at least one"),
    (["local", "local"], "listed twice"),
    (["sqs://q", "sqs://q"], "listed twice"),
    (["s3://bucket-1/a/", "s3://bucket-1/a/b/"], "overlap"),
    (["s3://bucket-1", "s3://bucket-1/a/"], "overlap"),
])
def test_validate_specs_rejects_lists(specs, message):
    with pytest.raises(SourceSpecError, match=message):
        validate_specs(specs)


def test_validate_specs_allows_disjoint_prefixes():
    parsed = validate_specs(["s3://bucket-1/a/", "s3://bucket-1/ab/", "s3://bucket-2/a/", "local"])
    assert [spec.kind for spec in parsed] == ["s3", "s3", "s3", "local"]


# Clients and endpoints


def test_client_reads_aws_endpoint_url(aws):
    from tasks.sources import aws as aws_clients

    client = aws_clients.client("s3")
    assert client.meta.endpoint_url == aws
    assert client.meta.region_name == "us-east-1"


def test_client_prefers_lethe_endpoint_override(aws, monkeypatch):
    from tasks.sources import aws as aws_clients

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"{aws}/not-this-one")
    monkeypatch.setenv("LETHE_AWS_ENDPOINT_URL", aws)
    client = aws_clients.client("sqs")
    assert client.meta.endpoint_url == aws
    assert client.list_queues()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_client_region_defaults_to_us_east_1(aws, monkeypatch):
    from tasks.sources import aws as aws_clients

    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert aws_clients.client("s3").meta.region_name == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert aws_clients.client("s3").meta.region_name == "eu-west-1"


# S3


def test_s3_reads_pending_objects_only(s3, bucket):
    put_lines(s3, bucket, "requests/a.jsonl", [request("s3-a1", SUBJECT), request("s3-a2", "125025")])
    put_lines(s3, bucket, "requests/nested/b.jsonl", [request("s3-b1", SUBJECT)])
    put_lines(s3, bucket, "requests/done/old.jsonl", [request("s3-done", SUBJECT)])
    put_lines(s3, bucket, "requests/quarantine/old.jsonl", [request("s3-quarantined", SUBJECT)])
    put_lines(s3, bucket, "requests/notes.txt", [request("s3-txt", SUBJECT)])
    put_lines(s3, bucket, "elsewhere/c.jsonl", [request("s3-elsewhere", SUBJECT)])
    source = s3_source(bucket)

    requests, quarantined = source.read_pending()

    assert [item.request.request_id for item in requests] == ["s3-a1", "s3-a2", "s3-b1"]
    assert [item.source_ref for item in requests] == [
        f"s3://{bucket}/requests/a.jsonl", f"s3://{bucket}/requests/a.jsonl", f"s3://{bucket}/requests/nested/b.jsonl"]
    assert quarantined == []
    assert source.name == f"s3://{bucket}/requests/"
    assert source.owns(f"s3://{bucket}/requests/a.jsonl")
    assert not source.owns(f"s3://{bucket}/requests/done/old.jsonl")
    assert not source.owns(f"s3://{bucket}/elsewhere/c.jsonl")


def test_s3_quarantines_invalid_lines(s3, bucket):
    put_lines(s3, bucket, "requests/mixed.jsonl", [request("s3-ok", SUBJECT), "{not json", INVALID_SUBJECT_LINE])
    source = s3_source(bucket)

    requests, quarantined = source.read_pending()

    assert [item.request.request_id for item in requests] == ["s3-ok"]
    assert [(record.line_number, record.source_ref) for record in quarantined] == [
        (2, f"s3://{bucket}/requests/mixed.jsonl"), (3, f"s3://{bucket}/requests/mixed.jsonl")]
    assert quarantined[0].reason.startswith("invalid JSON")
    assert "subject_id" in quarantined[1].reason
    assert "98765" not in quarantined[1].reason
    stored = read_lines(s3, bucket, "requests/quarantine/mixed.jsonl")
    assert [entry["line"] for entry in stored] == [2, 3]
    assert [entry["reason"] for entry in stored] == [record.reason for record in quarantined]
    assert stored[0]["raw"] == "{not json"
    assert [entry["request_id"] for entry in read_lines(s3, bucket, "requests/mixed.jsonl")] == ["s3-ok"]

    # The rewritten object is clean, so a second read quarantines nothing more.
    again, quarantined_again = s3_source(bucket).read_pending()
    assert [item.request.request_id for item in again] == ["s3-ok"]
    assert quarantined_again == []

    # A later object with the same name appends to the same quarantine object.
    s3.delete_object(Bucket=bucket, Key="requests/mixed.jsonl")
    put_lines(s3, bucket, "requests/mixed.jsonl", ["oops"])
    requests, quarantined = s3_source(bucket).read_pending()
    assert requests == []
    assert [record.line_number for record in quarantined] == [1]
    assert [entry["line"] for entry in read_lines(s3, bucket, "requests/quarantine/mixed.jsonl")] == [2, 3, 1]
    assert "requests/mixed.jsonl" not in keys(s3, bucket), "an object with no valid line left is deleted"


def test_s3_quarantines_oversized_object(s3, bucket):
    big = [request(f"s3-big-{i}", SUBJECT) for i in range(5)]
    put_lines(s3, bucket, "requests/big.jsonl", big)
    put_lines(s3, bucket, "requests/small.jsonl", ["{}"])
    original = s3.get_object(Bucket=bucket, Key="requests/big.jsonl")["Body"].read()
    source = s3_source(bucket, max_object_bytes=64)

    requests, quarantined = source.read_pending()

    assert requests == []
    big_records = [record for record in quarantined if record.source_ref.endswith("big.jsonl")]
    assert len(big_records) == 1
    assert big_records[0].line_number == 0
    assert f"{len(original)} bytes is larger than the maximum of 64 bytes" in big_records[0].reason
    assert "requests/big.jsonl" not in keys(s3, bucket)
    moved = [key for key in keys(s3, bucket) if key.startswith("requests/quarantine/big.jsonl.oversized-")]
    assert len(moved) == 1
    head = s3.head_object(Bucket=bucket, Key=moved[0])
    assert head["Metadata"]["lethe-reason"] == big_records[0].reason
    assert s3.get_object(Bucket=bucket, Key=moved[0])["Body"].read() == original
    small_records = [record for record in quarantined if record.source_ref.endswith("small.jsonl")]
    assert [record.line_number for record in small_records] == [1], "objects under the limit are still read"


def test_s3_acknowledge_moves_to_done_with_hashes(s3, bucket):
    put_lines(s3, bucket, "requests/a.jsonl", [request("s3-a1", SUBJECT), request("s3-a2", 125025)])
    put_lines(s3, bucket, "requests/b.jsonl", [request("s3-b1", SUBJECT)])
    source = s3_source(bucket)
    requests, _ = source.read_pending()
    refs = {item.source_ref for item in requests}

    assert source.acknowledge(refs | {"local:other.jsonl"}, HASHER) == 2

    assert keys(s3, bucket) == ["requests/done/a.jsonl", "requests/done/b.jsonl"]
    done = read_lines(s3, bucket, "requests/done/a.jsonl")
    assert [entry["request_id"] for entry in done] == ["s3-a1", "s3-a2"]
    assert all("subject_id" not in entry for entry in done)
    assert [entry["subject_hash"] for entry in done] == [HASHER.hash(SUBJECT), HASHER.hash("125025")]
    assert SUBJECT.encode() not in s3.get_object(Bucket=bucket, Key="requests/done/a.jsonl")["Body"].read()
    assert source.acknowledge(refs, HASHER) == 0, "a second acknowledge finds nothing to move"


def test_s3_acknowledge_skips_changed_object(s3, bucket):
    put_lines(s3, bucket, "requests/a.jsonl", [request("s3-a1", SUBJECT)])
    source = s3_source(bucket)
    requests, _ = source.read_pending()
    # A producer overwrites the object with a request this run never read.
    put_lines(s3, bucket, "requests/a.jsonl", [request("s3-a1", SUBJECT), request("s3-late", 125025)])

    assert source.acknowledge({item.source_ref for item in requests}, HASHER) == 0

    assert keys(s3, bucket) == ["requests/a.jsonl"]
    assert [entry["request_id"] for entry in read_lines(s3, bucket, "requests/a.jsonl")] == ["s3-a1", "s3-late"]


def test_s3_acknowledge_needs_a_read_first(s3, bucket):
    put_lines(s3, bucket, "requests/a.jsonl", [request("s3-a1", SUBJECT)])

    assert s3_source(bucket).acknowledge({f"s3://{bucket}/requests/a.jsonl"}, HASHER) == 0

    assert keys(s3, bucket) == ["requests/a.jsonl"]


# SQS


def test_sqs_deletes_only_on_acknowledge(sqs):
    name = unique_queue_name()
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "2"})["QueueUrl"]
    for i in range(12):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(request(f"sqs-{i}", SUBJECT)))
    source = sqs_source(name)

    requests, quarantined = source.read_pending()

    assert sorted(item.request.request_id for item in requests) == sorted(f"sqs-{i}" for i in range(12))
    assert quarantined == []
    assert all(item.source_ref.startswith(f"sqs:{url}#") for item in requests)
    assert len({item.source_ref for item in requests}) == 12
    assert source.in_flight_messages == 12
    assert queue_counts(sqs, url) == (0, 12), "received messages are in flight, not deleted"

    refs = {item.source_ref for item in requests}
    assert source.acknowledge(refs | {"local:other.jsonl"}, HASHER) == 12

    assert queue_counts(sqs, url) == (0, 0)
    assert source.in_flight_messages == 0
    time.sleep(2.5)
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", []) == []


def test_sqs_max_messages_limits_one_read(sqs):
    name = unique_queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    for i in range(5):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(request(f"sqs-{i}", SUBJECT)))

    requests, _ = sqs_source(name, max_messages=3).read_pending()

    assert len(requests) == 3
    assert queue_counts(sqs, url) == (2, 3)


def test_sqs_read_stops_when_messages_come_back(sqs, caplog):
    name = unique_queue_name()
    # A visibility timeout of 0 returns the same messages on every receive.
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "0"})["QueueUrl"]
    for i in range(2):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(request(f"sqs-{i}", SUBJECT)))
    source = sqs_source(name)
    caplog.set_level(logging.WARNING, logger="lethe.sources.sqs")

    requests, _ = source.read_pending()

    assert sorted(item.request.request_id for item in requests) == ["sqs-0", "sqs-1"]
    assert source.in_flight_messages == 2
    assert "Stopped receiving" in caplog.text


def test_sqs_redelivers_after_crash(sqs):
    name = unique_queue_name()
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "2"})["QueueUrl"]
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(request(f"sqs-{i}", SUBJECT)))
    crashed = sqs_source(name)
    first, _ = crashed.read_pending()
    del crashed  # the run dies before acknowledge

    time.sleep(2.5)
    restarted = sqs_source(name)
    second, _ = restarted.read_pending()

    assert sorted(item.request.request_id for item in second) == sorted(item.request.request_id for item in first)
    assert {item.source_ref for item in second} == {item.source_ref for item in first}, "message ids are stable"
    assert restarted.acknowledge({item.source_ref for item in second}, HASHER) == 3
    assert queue_counts(sqs, url) == (0, 0)


def test_sqs_extend_visibility_keeps_messages_hidden(sqs):
    name = unique_queue_name()
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "2"})["QueueUrl"]
    for i in range(2):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(request(f"sqs-{i}", SUBJECT)))
    source = sqs_source(name)
    requests, _ = source.read_pending()

    assert source.extend_visibility(30) == 2

    time.sleep(2.5)
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", []) == []
    assert source.acknowledge({item.source_ref for item in requests}, HASHER) == 2
    assert queue_counts(sqs, url) == (0, 0)
    with pytest.raises(ValueError, match="between 0 and 43200"):
        source.extend_visibility(43201)


def test_sqs_invalid_message_to_quarantine_queue(sqs):
    name = unique_queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="{not json")
    sqs.send_message(QueueUrl=url, MessageBody=INVALID_SUBJECT_LINE)
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(request("sqs-ok", SUBJECT)))
    source = sqs_source(name)

    requests, quarantined = source.read_pending()

    assert [item.request.request_id for item in requests] == ["sqs-ok"]
    assert len(quarantined) == 2
    reasons = sorted(record.reason for record in quarantined)
    assert any(reason.startswith("invalid JSON") for reason in reasons)
    assert any("subject_id" in reason for reason in reasons)
    assert all("98765" not in reason for reason in reasons)
    quarantine_url = sqs.get_queue_url(QueueName=f"{name}-quarantine")["QueueUrl"]
    stored = sqs.receive_message(QueueUrl=quarantine_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                 MessageAttributeNames=["All"])["Messages"]
    by_body = {message["Body"]: message["MessageAttributes"] for message in stored}
    assert set(by_body) == {"{not json", INVALID_SUBJECT_LINE}
    assert sorted(attributes["lethe-reason"]["StringValue"] for attributes in by_body.values()) == reasons
    assert {attributes["lethe-source-ref"]["StringValue"] for attributes in by_body.values()} == {
        record.source_ref for record in quarantined}
    assert queue_counts(sqs, url) == (0, 1), "only the valid message is left, in flight"


def test_sqs_invalid_message_left_for_dead_letter_queue(sqs):
    name = unique_queue_name()
    dead_letter_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dead_letter_arn = sqs.get_queue_attributes(QueueUrl=dead_letter_url,
                                               AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": "1"})
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "2", "RedrivePolicy": redrive})["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="{not json")
    source = sqs_source(name)

    requests, quarantined = source.read_pending()

    assert requests == []
    assert [record.reason.startswith("invalid JSON") for record in quarantined] == [True]
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        sqs.get_queue_url(QueueName=f"{name}-quarantine")
    assert queue_counts(sqs, url) == (0, 1), "the invalid message is not deleted"

    # Once the visibility timeout ends, the next receive moves it past maxReceiveCount to the DLQ.
    time.sleep(2.5)
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", []) == []
    moved = sqs.receive_message(QueueUrl=dead_letter_url, WaitTimeSeconds=1)["Messages"]
    assert [message["Body"] for message in moved] == ["{not json"]


def test_sqs_missing_queue_named_in_error(aws):
    from tasks.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="SQS queue lethe-missing-queue .* not found"):
        sqs_source("lethe-missing-queue")


def test_sqs_missing_queue_url_named_in_error(aws):
    from tasks.errors import ConfigurationError
    from tasks.sources.sqs import SQSSource

    url = f"{aws}/123456789012/lethe-missing-queue"
    source = SQSSource(url, url, wait_seconds=1)

    with pytest.raises(ConfigurationError, match="lethe-missing-queue .* not found"):
        source.read_pending()


def test_sqs_quarantine_queue_name_keeps_fifo_suffix():
    from tasks.errors import ConfigurationError
    from tasks.sources.sqs import quarantine_queue_name

    assert quarantine_queue_name("requests") == "requests-quarantine"
    assert quarantine_queue_name("requests.fifo") == "requests-quarantine.fifo"
    with pytest.raises(ConfigurationError, match="longer than 80"):
        quarantine_queue_name("q" * 70)


# Several sources


def test_several_sources_in_one_read(s3, sqs, bucket, tmp_path):
    from tasks.sources.local import LocalQueue

    ws = Workspace(tmp_path / "ws")
    ws.make_dirs()
    path, _, _ = LocalQueue(ws).enqueue_lines([json.dumps(request("local-1", SUBJECT))])
    put_lines(s3, bucket, "requests/a.jsonl", [request("s3-1", SUBJECT), "oops"])
    name = unique_queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(request("sqs-1", SUBJECT)))

    sources = open_sources(["local", f"s3://{bucket}/requests/", f"sqs://{name}"], ws)
    queued, quarantined = read_sources(sources)

    assert [item.request.request_id for item in queued] == ["local-1", "s3-1", "sqs-1"]
    assert [item.source_ref.split(":", 1)[0] for item in queued] == ["local", "s3", "sqs"]
    assert queued[0].source_ref == f"local:{path.name}"
    assert [record.source_ref for record in quarantined] == [f"s3://{bucket}/requests/a.jsonl"]

    assert acknowledge_sources(sources, {item.source_ref for item in queued}, HASHER) == 3
    assert (ws.done_dir / path.name).exists()
    assert not path.exists()
    assert keys(s3, bucket) == ["requests/done/a.jsonl", "requests/quarantine/a.jsonl"]
    assert queue_counts(sqs, url) == (0, 0)


def test_open_sources_rejects_queue_named_twice(sqs, tmp_path):
    name = unique_queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]

    with pytest.raises(SourceSpecError, match="listed twice"):
        open_sources([f"sqs://{name}", url], Workspace(tmp_path))


# The flow


@pytest.mark.usefixtures("prefect_harness")
def test_flow_rejects_invalid_source_spec(tmp_path):
    from flows.nightly import nightly_deletion_run

    with pytest.raises(SourceSpecError, match="'ftp://host/x'"):
        nightly_deletion_run(workspace=str(tmp_path), sources=["local", "ftp://host/x"])


@pytest.mark.usefixtures("prefect_harness")
def test_flow_processes_s3_and_sqs_in_one_batch(workspace, s3, sqs, bucket, caplog):
    from sqlalchemy import select

    from flows.nightly import nightly_deletion_run
    from tasks.ledger import DeletionRequest, Ledger, QuarantinedLine, RequestState

    ws = workspace
    caplog.set_level(logging.INFO, logger="lethe")
    subjects = train_subjects(ws, 2, offset=120)
    put_lines(s3, bucket, "requests/a.jsonl", [request("e2e-s3", subjects[0]), "{not json"])
    name = unique_queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs_line = json.dumps(request("e2e-sqs", subjects[1]))
    sqs.send_message(QueueUrl=url, MessageBody=sqs_line)

    summary = nightly_deletion_run(workspace=str(ws.root), sources=[f"s3://{bucket}/requests/", f"sqs://{name}"])

    assert summary["status"] == "completed"
    assert summary["request_count"] == 2
    ledger = Ledger(ws.ledger_url)
    with ledger.session() as s:
        s3_request = s.get(DeletionRequest, "e2e-s3")
        sqs_request = s.get(DeletionRequest, "e2e-sqs")
        assert s3_request.state == RequestState.COMPLETED
        assert sqs_request.state == RequestState.COMPLETED
        assert s3_request.batch_id == sqs_request.batch_id == summary["batch_id"]
        assert s3_request.source_ref == f"s3://{bucket}/requests/a.jsonl"
        assert sqs_request.source_ref.startswith(f"sqs:{url}#")
        quarantine_refs = [q.source_ref for q in s.scalars(select(QuarantinedLine))]
        assert quarantine_refs == [f"s3://{bucket}/requests/a.jsonl"]
    assert keys(s3, bucket) == ["requests/done/a.jsonl", "requests/quarantine/a.jsonl"]
    assert read_lines(s3, bucket, "requests/done/a.jsonl")[0]["subject_hash"] == workspace_hasher(ws).hash(str(subjects[0]))
    assert queue_counts(sqs, url) == (0, 0)

    # A second delivery of a closed request opens no batch, and the run still deletes the message.
    sqs.send_message(QueueUrl=url, MessageBody=sqs_line)
    empty = nightly_deletion_run(workspace=str(ws.root), sources=[f"s3://{bucket}/requests/", f"sqs://{name}"])

    assert empty["status"] == "empty"
    assert queue_counts(sqs, url) == (0, 0)
    for sid in subjects:
        assert str(sid) not in caplog.text
