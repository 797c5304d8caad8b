"""The embedded deletion queue: a directory of JSON Lines files.

    queue/incoming/    files waiting for a run
    queue/quarantine/  invalid lines with their reason (nothing is dropped)
    queue/done/        acknowledged files, with subject ids replaced by their keyed hash
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

from tasks.hashing import SubjectHasher
from tasks.requests import QuarantinedLine, decode_file, parse_lines
from tasks.sources.records import QuarantineRecord, QueuedRequest, quarantine_jsonl, redacted_jsonl
from tasks.workspace import Workspace

log = logging.getLogger("lethe.sources.local")

REF_PREFIX = "local:"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    os.replace(tmp, path)


def _new_name(origin: str | None = None) -> str:
    """Name a new queue file after the file it came from, so quarantine records stay traceable."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(origin).stem)[:60] if origin else "requests"
    return f"{stem}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.jsonl"


class LocalQueue:
    """Deletion requests in a workspace's queue directory, referenced by file name."""

    name = "local"

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    def _quarantine(self, source_ref: str, lines: list[QuarantinedLine]) -> list[QuarantineRecord]:
        """Append invalid lines with their reasons to quarantine/<source_ref>."""
        if not lines:
            return []
        self.ws.quarantine_dir.mkdir(parents=True, exist_ok=True)
        path = self.ws.quarantine_dir / source_ref
        with path.open("a", encoding="utf-8", errors="surrogateescape") as out:
            out.write(quarantine_jsonl(lines))
        for item in lines:
            log.warning("Quarantined line %d of %s: %s", item.line_number, source_ref, item.reason)
        return [QuarantineRecord(source_ref, item.line_number, item.reason) for item in lines]

    def enqueue_lines(self, lines: list[str], origin: str | None = None) -> tuple[Path | None, list[QuarantineRecord], int]:
        """Validate lines, quarantine the invalid ones and write the valid ones as a new incoming file.

        `origin` names the file the lines came from; the queue and quarantine files reuse its stem.
        """
        valid, invalid = parse_lines(lines)
        name = _new_name(origin)
        records = self._quarantine(name, invalid)
        if not valid:
            return None, records, 0
        self.ws.incoming_dir.mkdir(parents=True, exist_ok=True)
        path = self.ws.incoming_dir / name
        _atomic_write(path, "".join(r.model_dump_json() + "\n" for r in valid))
        return path, records, len(valid)

    def read_pending(self) -> tuple[list[QueuedRequest], list[QuarantineRecord]]:
        """Read every incoming file; invalid lines move to quarantine, the file keeps the valid ones."""
        requests: list[QueuedRequest] = []
        quarantined: list[QuarantineRecord] = []
        quarantined += self._quarantine_unreadable_files()
        for path in sorted(p for p in self.ws.incoming_dir.glob("*") if p.is_file() and p.suffix == ".jsonl"):
            lines = decode_file(path.read_bytes())
            valid, invalid = parse_lines(lines)
            if invalid:
                quarantined += self._quarantine(path.name, invalid)
                _atomic_write(path, "".join(r.model_dump_json() + "\n" for r in valid))
            requests += [QueuedRequest(r, path.name) for r in valid]
        return requests, quarantined

    def _quarantine_unreadable_files(self) -> list[QuarantineRecord]:
        """Move files the queue cannot read (no `.jsonl` suffix) to quarantine whole, with a reason."""
        records = []
        for path in sorted(self.ws.incoming_dir.glob("*")):
            if not path.is_file() or path.suffix == ".jsonl" or path.name.startswith("."):
                continue
            reason = "not a JSON Lines file: queue files must end in .jsonl"
            self.ws.quarantine_dir.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.ws.quarantine_dir / path.name)
            (self.ws.quarantine_dir / f"{path.name}.reason.txt").write_text(reason + "\n")
            log.warning("Quarantined file %s: %s", path.name, reason)
            records.append(QuarantineRecord(path.name, 0, reason))
        return records

    def acknowledge(self, source_refs: set[str], hasher: SubjectHasher) -> int:
        """Move processed files to done/, replacing each subject id with its keyed hash."""
        self.ws.done_dir.mkdir(parents=True, exist_ok=True)
        moved = 0
        for ref in sorted(source_refs):
            path = self.ws.incoming_dir / ref
            if not path.exists():
                continue  # acknowledged by an earlier, interrupted run
            valid, _ = parse_lines(decode_file(path.read_bytes()))
            _atomic_write(self.ws.done_dir / ref, redacted_jsonl(valid, hasher))
            path.unlink()
            moved += 1
        return moved


class LocalSource:
    """The workspace's queue directory as a queue source, with source refs `local:<file name>`.

    Quarantine records keep the bare file name, which is also the name of the
    quarantine file under queue/quarantine/.
    """

    name = "local"

    def __init__(self, ws: Workspace) -> None:
        self.queue = LocalQueue(ws)

    def owns(self, source_ref: str) -> bool:
        return source_ref.startswith(REF_PREFIX)

    def read_pending(self) -> tuple[list[QueuedRequest], list[QuarantineRecord]]:
        """Read the incoming files as LocalQueue does, with refs prefixed by `local:`."""
        requests, quarantined = self.queue.read_pending()
        return [QueuedRequest(item.request, REF_PREFIX + item.source_ref) for item in requests], quarantined

    def acknowledge(self, source_refs: set[str], hasher: SubjectHasher) -> int:
        """Move the files of the `local:` refs to done/; refs of other sources are ignored."""
        names = {ref.removeprefix(REF_PREFIX) for ref in source_refs if self.owns(ref)}
        return self.queue.acknowledge(names, hasher)
