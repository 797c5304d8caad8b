"""Deletion requests as SQS messages, one request line (a JSON object) per message body.

Delivery is at least once: a message is deleted only by acknowledge, after the batch
commits, so a crash before that lets SQS deliver it again once its visibility timeout
ends. The ledger keys requests by request_id, so a second delivery is applied once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from tasks.errors import ConfigurationError
from tasks.hashing import SubjectHasher
from tasks.requests import parse_line
from tasks.sources import aws
from tasks.sources.records import QuarantineRecord, QueuedRequest

log = logging.getLogger("lethe.sources.sqs")

DEFAULT_WAIT_SECONDS = 20
DEFAULT_MAX_MESSAGES = 1000
MAX_WAIT_SECONDS = 20  # the SQS limit of WaitTimeSeconds
MAX_VISIBILITY_TIMEOUT = 43200  # the SQS limit of a visibility timeout, 12 hours
RECEIVE_BATCH = 10  # the SQS limit of messages per ReceiveMessage and per batch call
MAX_QUEUE_NAME = 80
QUARANTINE_SUFFIX = "-quarantine"
# The body of a request line is one line, so a quarantine record of a message has this line number.
MESSAGE_LINE = 1


def quarantine_queue_name(queue_name: str) -> str:
    """Name the quarantine queue of `queue_name`: `<queue>-quarantine`, keeping a `.fifo` suffix last."""
    base, fifo = (queue_name[:-5], ".fifo") if queue_name.endswith(".fifo") else (queue_name, "")
    name = f"{base}{QUARANTINE_SUFFIX}{fifo}"
    if len(name) > MAX_QUEUE_NAME:
        raise ConfigurationError(
            f"The quarantine queue name {name} is longer than {MAX_QUEUE_NAME} characters. "
            f"Give queue {queue_name} a redrive policy with a dead-letter queue, or use a shorter queue name."
        )
    return name


class SQSSource:
    """Messages of one SQS queue, with source refs `sqs:<queue URL>#<message id>`.

    The receipt handles of the messages that read_pending returned stay in memory until
    acknowledge deletes the messages. Keep the queue's visibility timeout longer than a
    run, or call extend_visibility while the run has the messages in flight.
    """

    def __init__(self, spec: str, queue_url: str | None = None, *, wait_seconds: int = DEFAULT_WAIT_SECONDS,
                 max_messages: int = DEFAULT_MAX_MESSAGES, visibility_timeout: int | None = None,
                 client: Any = None) -> None:
        if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
            raise ValueError(f"wait_seconds must be between 0 and {MAX_WAIT_SECONDS}, got {wait_seconds}")
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        if visibility_timeout is not None and not 0 <= visibility_timeout <= MAX_VISIBILITY_TIMEOUT:
            raise ValueError(f"visibility_timeout must be between 0 and {MAX_VISIBILITY_TIMEOUT} seconds, "
                             f"got {visibility_timeout}")
        self.name = spec
        self.wait_seconds = wait_seconds
        self.max_messages = max_messages
        self.visibility_timeout = visibility_timeout
        self.client = client if client is not None else aws.client("sqs")
        self.queue_url = queue_url or self._resolve_url(spec)
        self.queue_name = self.queue_url.rstrip("/").rsplit("/", 1)[-1]
        # Receipt handle of each message that read_pending returned, by message id.
        self._receipt_handles: dict[str, str] = {}
        self._quarantine_url: str | None = None

    def _resolve_url(self, spec: str) -> str:
        name = spec.removeprefix("sqs://")
        try:
            return self.client.get_queue_url(QueueName=name)["QueueUrl"]
        except self.client.exceptions.QueueDoesNotExist:
            raise ConfigurationError(
                f"SQS queue {name} (source {spec}) not found at {self.client.meta.endpoint_url}. "
                "Create the queue, or check AWS_ENDPOINT_URL, LETHE_AWS_ENDPOINT_URL and AWS_DEFAULT_REGION."
            ) from None

    def _ref(self, message_id: str) -> str:
        return f"sqs:{self.queue_url}#{message_id}"

    def owns(self, source_ref: str) -> bool:
        return source_ref.startswith(f"sqs:{self.queue_url}#")

    @property
    def in_flight_messages(self) -> int:
        return len(self._receipt_handles)

    def _has_dead_letter_queue(self) -> bool:
        try:
            attributes = self.client.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"])
        except self.client.exceptions.QueueDoesNotExist:
            raise ConfigurationError(
                f"SQS queue {self.queue_url} (source {self.name}) not found. Create the queue or fix the queue URL."
            ) from None
        return "RedrivePolicy" in attributes.get("Attributes", {})

    def read_pending(self) -> tuple[list[QueuedRequest], list[QuarantineRecord]]:
        """Receive up to max_messages messages with long polling, until a receive returns none.

        Invalid messages stay in the queue for its dead-letter queue when the queue has a
        redrive policy. Otherwise they move to the `<queue>-quarantine` queue.
        """
        dead_letter = self._has_dead_letter_queue()
        requests: list[QueuedRequest] = []
        quarantined: list[QuarantineRecord] = []
        seen: set[str] = set()
        while len(seen) < self.max_messages:
            messages = self._receive(min(RECEIVE_BATCH, self.max_messages - len(seen)))
            if not messages:
                break
            if all(message["MessageId"] in seen for message in messages):
                # Without this stop, messages whose visibility timeout ends during the read
                # would come back on every receive until max_messages.
                log.warning("Stopped receiving from %s: it delivered only messages this read already has. "
                            "Set a visibility timeout longer than the run.", self.queue_url)
                break
            for message in messages:
                message_id = message["MessageId"]
                ref = self._ref(message_id)
                if message_id in seen:
                    if message_id in self._receipt_handles:
                        # The latest receipt handle is the one that deletes.
                        self._receipt_handles[message_id] = message["ReceiptHandle"]
                    continue
                seen.add(message_id)
                try:
                    request = parse_line(message["Body"])
                except ValueError as exc:
                    reason = str(exc)
                    quarantined.append(QuarantineRecord(ref, MESSAGE_LINE, reason))
                    if dead_letter:
                        count = message.get("Attributes", {}).get("ApproximateReceiveCount", "?")
                        log.warning("Invalid message %s (receive %s): %s; left for the dead-letter queue",
                                    ref, count, reason)
                    else:
                        self._quarantine(message, ref, reason)
                    continue
                self._receipt_handles[message_id] = message["ReceiptHandle"]
                requests.append(QueuedRequest(request, ref))
        log.info("Received %d messages from %s: %d requests, %d invalid", len(seen), self.queue_url,
                 len(requests), len(quarantined))
        return requests, quarantined

    def _receive(self, count: int) -> list[dict]:
        arguments: dict[str, Any] = {
            "QueueUrl": self.queue_url, "MaxNumberOfMessages": count, "WaitTimeSeconds": self.wait_seconds,
            "MessageSystemAttributeNames": ["ApproximateReceiveCount"],
        }
        if self.visibility_timeout is not None:
            arguments["VisibilityTimeout"] = self.visibility_timeout
        return self.client.receive_message(**arguments).get("Messages", [])

    def _quarantine(self, message: dict, ref: str, reason: str) -> None:
        """Send the raw body with its reason to the quarantine queue, then delete the original."""
        url = self._quarantine_queue_url()
        arguments: dict[str, Any] = {
            "QueueUrl": url, "MessageBody": message["Body"],
            "MessageAttributes": {
                "lethe-reason": {"DataType": "String", "StringValue": reason},
                "lethe-source-ref": {"DataType": "String", "StringValue": ref},
            },
        }
        if url.endswith(".fifo"):
            arguments["MessageGroupId"] = "quarantine"
            arguments["MessageDeduplicationId"] = message["MessageId"]
        self.client.send_message(**arguments)
        self.client.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        log.warning("Quarantined message %s in %s: %s", ref, url, reason)

    def _quarantine_queue_url(self) -> str:
        if self._quarantine_url is None:
            name = quarantine_queue_name(self.queue_name)
            try:
                self._quarantine_url = self.client.get_queue_url(QueueName=name)["QueueUrl"]
            except self.client.exceptions.QueueDoesNotExist:
                attributes = {"FifoQueue": "true"} if name.endswith(".fifo") else {}
                self._quarantine_url = self.client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
                log.info("Created quarantine queue %s", self._quarantine_url)
        return self._quarantine_url

    def extend_visibility(self, seconds: int) -> int:
        """Set the visibility timeout of every in-flight message to `seconds` from now; return how many succeeded."""
        if not 0 <= seconds <= MAX_VISIBILITY_TIMEOUT:
            raise ValueError(f"seconds must be between 0 and {MAX_VISIBILITY_TIMEOUT}, got {seconds}")
        entries = [{"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": seconds}
                   for i, handle in enumerate(self._receipt_handles.values())]
        succeeded = 0
        for start in range(0, len(entries), RECEIVE_BATCH):
            response = self.client.change_message_visibility_batch(
                QueueUrl=self.queue_url, Entries=entries[start:start + RECEIVE_BATCH])
            succeeded += len(response.get("Successful", []))
            for failure in response.get("Failed", []):
                log.warning("Visibility of a message in %s not extended: %s %s", self.queue_url,
                            failure.get("Code"), failure.get("Message"))
        return succeeded

    def acknowledge(self, source_refs: set[str], hasher: SubjectHasher) -> int:
        """Delete the in-flight messages of the refs; return how many were deleted.

        Messages without a receipt handle in this source (received by an earlier run) stay in the
        queue, and a later run deletes them once they are delivered again, because their
        requests are then already closed. Refs of other sources are ignored. SQS keeps no
        subject id after a delete, so `hasher` is unused.
        """
        message_ids = sorted(ref.rsplit("#", 1)[1] for ref in source_refs if self.owns(ref))
        in_flight = [message_id for message_id in message_ids if message_id in self._receipt_handles]
        if len(in_flight) < len(message_ids):
            log.info("%d acknowledged messages of %s were not received by this run; "
                     "they are deleted when delivered again", len(message_ids) - len(in_flight), self.queue_url)
        deleted = 0
        for start in range(0, len(in_flight), RECEIVE_BATCH):
            chunk = in_flight[start:start + RECEIVE_BATCH]
            entries = [{"Id": str(i), "ReceiptHandle": self._receipt_handles[message_id]}
                       for i, message_id in enumerate(chunk)]
            response = self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            for success in response.get("Successful", []):
                del self._receipt_handles[chunk[int(success["Id"])]]
                deleted += 1
            for failure in response.get("Failed", []):
                log.warning("Message %s not deleted: %s %s. It is deleted when delivered again.",
                            self._ref(chunk[int(failure["Id"])]), failure.get("Code"), failure.get("Message"))
        return deleted
