"""`lethe audit verify` and `lethe audit scan` after a real run of the nightly flow.

One run erases two training subjects from a module-scoped workspace. Checks that only
read it use that workspace, and each tampering case edits its own copy, so no case is
affected by another's damage. Copies are safe for `audit verify`, which reads only the ledger, the
certificates and the signing key, never the DVC remote or MLflow paths that point
back into the original.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.chain import _timestamp, canonical, entry_digest
from tasks.ledger import Batch, Ledger
from tasks.workspace import Workspace
from tests.helpers import request, train_subjects, write_requests

ZERO_HASH = "0" * 64


@dataclass(frozen=True)
class FinishedRun:
    ws: Workspace
    summary: dict
    forgotten: list[int]
    kept: int

    @property
    def batch_id(self) -> str:
        return self.summary["batch_id"]

    @property
    def certificate(self) -> Path:
        return self.ws.certificates_dir / f"{self.batch_id}.json"


@pytest.fixture(scope="module")
def finished_run(prefect_harness, tmp_path_factory) -> FinishedRun:
    from flows.nightly import nightly_deletion_run
    from tasks.bootstrap import bootstrap

    ws = Workspace(tmp_path_factory.mktemp("audit") / "ws")
    bootstrap(ws)
    forgotten = train_subjects(ws, 2)
    kept = train_subjects(ws, 1, offset=2)[0]
    write_requests(ws, "forget.jsonl", [request("a-1", forgotten[0]), request("a-2", forgotten[1])])

    summary = nightly_deletion_run(workspace=str(ws.root))

    assert summary["status"] == "completed", summary
    return FinishedRun(ws, summary, forgotten, kept)


@pytest.fixture
def tampered(finished_run, tmp_path) -> FinishedRun:
    """A copy of the finished workspace for one tampering case."""
    root = tmp_path / "ws"
    shutil.copytree(finished_run.ws.root, root, symlinks=True)
    return FinishedRun(Workspace(root), finished_run.summary, finished_run.forgotten, finished_run.kept)


@dataclass(frozen=True)
class AuditResult:
    code: int
    output: str  # whitespace collapsed, for substring checks
    raw: str

    def __iter__(self):
        """Unpack as (code, output)."""
        return iter((self.code, self.output))


@pytest.fixture
def audit(monkeypatch):
    """Run `lethe audit ...` in-process and return its exit code and output."""
    import logging

    from flows import cli

    logger = logging.getLogger("lethe")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    # Wide enough that no table cell or message wraps inside a word.
    monkeypatch.setattr(cli.console, "width", 400)
    monkeypatch.setattr(cli.err, "width", 400)

    def invoke(ws: Workspace, *args: str) -> AuditResult:
        # configure_environment sets PREFECT_HOME when it is unset, so set it here and let monkeypatch undo it.
        monkeypatch.setenv("PREFECT_HOME", str(ws.prefect_home))
        result = CliRunner().invoke(app, ["audit", *args, "--workspace", str(ws.root)])
        return AuditResult(result.exit_code, " ".join(result.output.split()), result.output)

    yield invoke
    logger.handlers, logger.level, logger.propagate = saved[0], saved[1], saved[2]


def run_sql(ws: Workspace, statement: str, *params) -> None:
    with closing(sqlite3.connect(ws.ledger_path)) as db, db:
        db.execute(statement, params)


def query(ws: Workspace, statement: str, *params) -> list[tuple]:
    with closing(sqlite3.connect(ws.ledger_path)) as db:
        return db.execute(statement, params).fetchall()


def last_seq(ws: Workspace, subject: str) -> int:
    return query(ws, "SELECT max(seq) FROM ledger_entries WHERE subject = ?", subject)[0][0]


def anchored_seq(run: FinishedRun) -> int:
    return json.loads(run.certificate.read_text())["certificate"]["ledger_head"]["seq"]


def forge_entry(ws: Workspace, seq: int, edit, rehash_following: bool) -> None:
    """Edit entry `seq`'s payload and recompute its hash, as a forger with write access to the database could.

    With `rehash_following`, every later entry is relinked and rehashed too, so the chain
    itself verifies again.
    """
    from sqlalchemy import select

    from tasks.chain import LedgerEntry

    ledger = Ledger(ws.ledger_url)
    try:
        with ledger.session() as s:
            entries = [e for e in s.scalars(select(LedgerEntry).order_by(LedgerEntry.seq)) if e.seq >= seq]
    finally:
        ledger.dispose()
    previous = entries[0].prev_hash
    for entry in entries if rehash_following else entries[:1]:
        payload = edit(entry.payload) if entry.seq == seq else entry.payload
        assert entry.seq != seq or payload != entry.payload, "the edit must change the payload"
        digest = entry_digest(entry.seq, _timestamp(entry.recorded_at), entry.kind, entry.subject, payload, previous)
        run_sql(ws, "UPDATE ledger_entries SET payload = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
                payload, previous, digest, entry.seq)
        previous = digest


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# A clean run.

def test_verify_passes_after_run(finished_run, audit):
    code, output = audit(finished_run.ws, "verify")

    assert code == 0, output
    assert "OK:" in output
    assert "1 certificate(s) carry valid signatures" in output


# (a) Ledger rows edited with raw SQL.

# SQLAlchemy stores enum members by name, so 'PENDING' is a valid state and 'pending' is not.
ROW_EDITS = [
    pytest.param("UPDATE requests SET state = 'PENDING' WHERE request_id = 'a-1'",
                 "requests row a-1: differs from its journal entry in state", id="request state"),
    pytest.param("UPDATE requests SET state = 'pending' WHERE request_id = 'a-1'",
                 "requests row a-1:", id="request state not in enum"),
    pytest.param(f"UPDATE requests SET subject_hash = '{ZERO_HASH}' WHERE request_id = 'a-2'",
                 "requests row a-2: differs from its journal entry in subject_hash", id="request subject_hash"),
    pytest.param("UPDATE requests SET completed_at = '2020-01-01 00:00:00.000000' WHERE request_id = 'a-1'",
                 "requests row a-1: differs from its journal entry in completed_at", id="request completed_at"),
    pytest.param("UPDATE batches SET rows_removed = rows_removed + 1",
                 "batches row {batch}: differs from its journal entry in rows_removed", id="batch rows_removed"),
    pytest.param("DELETE FROM requests WHERE request_id = 'a-2'",
                 "requests row a-2: in the journal but missing from the table (deleted)", id="request deleted"),
    pytest.param("INSERT INTO quarantine (source_ref, line_number, reason, quarantined_at) "
                 "VALUES ('forged.jsonl', 1, 'forged', '2026-01-01 00:00:00.000000')",
                 "quarantine row forged.jsonl#1: not in the journal (inserted outside Lethe)", id="row inserted"),
]


@pytest.mark.parametrize(("statement", "problem"), ROW_EDITS)
def test_verify_names_edited_row(tampered, audit, statement: str, problem: str):
    run_sql(tampered.ws, statement)

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert problem.format(batch=tampered.batch_id) in output
    assert "Verification failed" in output


# (b) and (e) Certificates changed on disk.

def test_verify_rejects_flipped_body_byte(tampered, audit):
    path = tampered.certificate
    marker = b'"md5_after": "'
    flip_byte(path, path.read_bytes().index(marker) + len(marker))  # a hex digit of the signed body

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"certificate of {tampered.batch_id}: signature does not match the certificate" in output
    assert f"certificate of {tampered.batch_id}: its SHA-256 differs from the one the ledger recorded" in output


def test_verify_rejects_flipped_signature_byte(tampered, audit):
    path = tampered.certificate
    marker = b'"signature": "'
    flip_byte(path, path.read_bytes().index(marker) + len(marker) + 10)

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"certificate of {tampered.batch_id}: signature does not match the certificate" in output


def test_verify_rejects_broken_json(tampered, audit):
    flip_byte(tampered.certificate, 0)  # "{" becomes "z"

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"certificate of {tampered.batch_id}: not valid JSON (JSONDecodeError)" in output


def test_verify_rejects_missing_certificate(tampered, audit):
    tampered.certificate.unlink()

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"certificate of {tampered.batch_id}:" in output
    assert "not found" in output


def test_verify_rejects_foreign_key_signature(tampered, audit):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tasks.certificate import sign

    envelope = json.loads(tampered.certificate.read_text())
    forged = sign(envelope["certificate"], Ed25519PrivateKey.generate())
    tampered.certificate.write_text(json.dumps(forged, indent=2, sort_keys=True) + "\n")

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"certificate of {tampered.batch_id}: signed by a key other than the workspace's signing key" in output


def test_verify_rejects_borrowed_public_key(tampered, audit):
    # The envelope names the workspace's public key, but another key made the signature.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    envelope = json.loads(tampered.certificate.read_text())
    signature = Ed25519PrivateKey.generate().sign(canonical(envelope["certificate"]).encode())
    envelope["signature"] = base64.b64encode(signature).decode()
    tampered.certificate.write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"certificate of {tampered.batch_id}: signature does not match the certificate" in output


# (c) and (d) Journal entries deleted or edited with raw SQL.

def test_verify_names_deleted_entry(tampered, audit):
    seq = last_seq(tampered.ws, "a-1") - 1
    run_sql(tampered.ws, "DELETE FROM ledger_entries WHERE seq = ?", seq)

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"journal entry {seq + 1}: entry {seq} is missing (next present is {seq + 1})" in output
    assert f"journal entry {seq + 1}: prev_hash does not match the previous entry" in output


def test_verify_names_deleted_first_entry(tampered, audit):
    run_sql(tampered.ws, "DELETE FROM ledger_entries WHERE seq = 1")

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert "journal entry 2: entry 1 is missing (next present is 2)" in output


def test_verify_detects_deleted_last_entry(tampered, audit):
    # Nothing follows the last entry, so the chain cannot show the gap. The row that
    # the entry described no longer matches the journal.
    seq, kind, subject = query(tampered.ws, "SELECT seq, kind, subject FROM ledger_entries ORDER BY seq DESC LIMIT 1")[0]
    run_sql(tampered.ws, "DELETE FROM ledger_entries WHERE seq = ?", seq)

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"{kind} row {subject}: differs from its journal entry" in output


def test_verify_names_edited_payload(tampered, audit):
    seq = last_seq(tampered.ws, "a-1")
    run_sql(tampered.ws, "UPDATE ledger_entries SET payload = replace(payload, '\"state\":\"completed\"', "
                         "'\"state\":\"pending\"') WHERE seq = ?", seq)

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"journal entry {seq}: content does not match its hash: the entry was edited" in output
    assert "requests row a-1: differs from its journal entry in state" in output


def test_verify_names_relinked_entry(tampered, audit):
    # The forger recomputes the edited entry's own hash, but the next entry still links to the old one.
    seq = last_seq(tampered.ws, "a-1")
    forge_entry(tampered.ws, seq, lambda text: text.replace('"rows_removed":5', '"rows_removed":6'), rehash_following=False)

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"journal entry {seq + 1}: prev_hash does not match the previous entry" in output


def test_verify_anchor_catches_rewritten_chain(tampered, audit):
    # Rewriting every hash after an entry that the certificate anchors makes the chain
    # verify again, but the certificate still records the anchored entry's old hash.
    anchor = anchored_seq(tampered)
    forge_entry(tampered.ws, 1, lambda text: text.replace('"source":"test"', '"source":"forged"'), rehash_following=True)

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output
    assert f"certificate of {tampered.batch_id}: the journal entry it anchors ({anchor}) was changed" in output
    assert "was edited" not in output, "the rewritten chain itself verifies"
    assert "seal seal-" in output, "the seal at the end of the run catches the rewrite too"


def test_verify_catches_backdated_completion(tampered, audit):
    seq = last_seq(tampered.ws, "a-1")
    assert seq > anchored_seq(tampered), "precondition: the completion entry comes after the anchor"
    completed = json.loads(query(tampered.ws, "SELECT payload FROM ledger_entries WHERE seq = ?", seq)[0][0])["completed_at"]
    run_sql(tampered.ws, "UPDATE requests SET completed_at = '2026-01-01 00:00:00.000000' WHERE request_id = 'a-1'")
    forge_entry(tampered.ws, seq, lambda text: text.replace(f'"completed_at":"{completed}"',
                                                            '"completed_at":"2026-01-01T00:00:00"'),
                rehash_following=True)

    code, output = audit(tampered.ws, "verify")

    assert code == 4, output


# Scanning the stores for a subject.

@pytest.mark.parametrize("index", [0, 1])
def test_scan_forgotten_finds_nothing(finished_run, audit, index: int):
    code, output = audit(finished_run.ws, "scan", "--subject", str(finished_run.forgotten[index]))

    assert code == 0, output
    assert "Nothing found" in output


def test_scan_kept_subject_lists_stores(finished_run, audit):
    result = audit(finished_run.ws, "scan", "--subject", str(finished_run.kept))

    assert result.code == 5, result.output
    # Each table row reads "│ store │ location │ what │".
    rows = [line.split("│") for line in result.raw.splitlines() if line.startswith("│")]
    stores = {cells[1].strip() for cells in rows if len(cells) > 3} - {"store"}
    assert stores == {"data", "dvc cache", "dvc remote"}
    assert "Parquet object with 5 record(s) of the subject" in result.output


def test_scan_rejects_non_numeric_subject(finished_run, audit):
    code, output = audit(finished_run.ws, "scan", "--subject", "../etc")

    assert code == 1
    assert "--subject must be a decimal subject id" in output


# The certificate as an MLflow artifact.

def test_certificate_logged_on_new_version(finished_run, tmp_path):
    from tasks import registry
    from tasks.settings import WorkspaceSettings

    ws = finished_run.ws
    mlflow_client = registry.client(ws)
    version = mlflow_client.get_model_version(WorkspaceSettings().model_name, finished_run.summary["model_version_after"])
    downloaded = Path(mlflow_client.download_artifacts(version.run_id, "certificate.json", str(tmp_path)))

    logged = json.loads(downloaded.read_text())
    stored = json.loads(finished_run.certificate.read_text())
    assert logged == stored
    ledger = Ledger(ws.ledger_url)
    try:
        with ledger.session() as s:
            recorded = s.get(Batch, finished_run.batch_id).certificate_digest
    finally:
        ledger.dispose()
    assert hashlib.sha256(canonical(logged).encode()).hexdigest() == recorded
