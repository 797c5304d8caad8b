"""Audit: verify the ledger's hash chain and the signed certificates, and scan every store for a subject."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from tasks import audit_servers, registry, remote_store
from tasks.certificate import load_signing_key, public_key_hex, verify
from tasks.chain import LedgerEntry, canonical, latest_payloads, verify_chain
from tasks.ledger import Batch, BatchState, Ledger, audited_snapshot
from tasks.workspace import Workspace


def _models():
    from tasks.ledger import Batch, DeletionRequest, QuarantinedLine, Tombstone

    return {"requests": DeletionRequest, "batches": Batch, "quarantine": QuarantinedLine, "tombstones": Tombstone}


@dataclass
class VerifyReport:
    entries: int
    certificates: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _load_rows(session, model) -> tuple[list, list[str]]:
    """Load every row of a table; rows whose stored values no longer map to the model are listed by key."""
    try:
        return list(session.scalars(select(model))), []
    except LookupError:
        # An enum column contains a value that is not a state, so load the rows one by one to name them.
        session.rollback()
    key = inspect(model).primary_key[0]
    rows, unreadable = [], []
    for (value,) in session.execute(select(key)):
        try:
            rows.append(session.scalars(select(model).where(key == value)).one())
        except LookupError:
            session.rollback()
            unreadable.append(str(value))
    return rows, unreadable


def _verify_seals(ws: Workspace, heads: dict[int, str]) -> list[str]:
    """Every ledger seal must carry a valid signature and match the journal entry it sealed."""
    problems = []
    key = trusted_public_key(ws)
    for path in sorted(ws.seals_dir.glob("seal-*.json")) if ws.seals_dir.exists() else []:
        try:
            envelope = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            problems.append(f"seal {path.name}: not valid JSON")
            continue
        reason = verify(envelope, key)
        if reason:
            problems.append(f"seal {path.name}: {reason}")
            continue
        body = envelope["certificate"]
        if heads.get(body.get("seq")) != body.get("entry_hash"):
            problems.append(f"seal {path.name}: journal entry {body.get('seq')} was changed or removed after it was sealed")
    return problems


def trusted_public_key(ws: Workspace) -> str:
    """The key certificates must be signed with: LETHE_SIGNING_PUBLIC_KEY, else the signing key's own."""
    configured = os.environ.get("LETHE_SIGNING_PUBLIC_KEY")
    return configured.strip().lower() if configured else public_key_hex(load_signing_key(ws.signing_key_file))


def verify_ledger(ws: Workspace, ledger: Ledger) -> VerifyReport:
    """Check the chain, that every audited row matches its latest journal entry, and every certificate."""
    problems: list[str] = []
    # A plain read-only session: rows that fail to load are rolled back and retried one by one.
    with Session(ledger.engine) as s:
        count, chain_problems = verify_chain(s)
        problems += [f"journal entry {p.seq}: {p.message}" for p in chain_problems]

        for table, model in _models().items():
            journal = latest_payloads(s, table)
            seen = set()
            rows, unreadable = _load_rows(s, model)
            problems += [f"{table} row {key}: holds a value outside its allowed set (edited outside Lethe)" for key in unreadable]
            seen |= set(unreadable)
            for row in rows:
                _, subject, payload = audited_snapshot(row)
                seen.add(subject)
                recorded = journal.get(subject)
                if recorded is None:
                    problems.append(f"{table} row {subject}: not in the journal (inserted outside Lethe)")
                elif canonical(recorded) != canonical(payload):
                    changed = sorted(k for k in payload if canonical(payload.get(k)) != canonical(recorded.get(k)))
                    problems.append(f"{table} row {subject}: differs from its journal entry in {', '.join(changed)}")
            for subject in sorted(set(journal) - seen):
                problems.append(f"{table} row {subject}: in the journal but missing from the table (deleted)")

        heads = {e.seq: e.entry_hash for e in s.scalars(select(LedgerEntry))}
        problems += _verify_seals(ws, heads)
        batches = list(s.scalars(select(Batch).where(Batch.state == BatchState.ACKNOWLEDGED)))

    certificates = 0
    key = trusted_public_key(ws)
    for batch in batches:
        path = ws.certificates_dir / f"{batch.batch_id}.json"
        if not path.exists():
            problems.append(f"certificate of {batch.batch_id}: {path} not found")
            continue
        certificates += 1
        try:
            envelope = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"certificate of {batch.batch_id}: not valid JSON ({exc.__class__.__name__})")
            continue
        reason = verify(envelope, key)
        if reason:
            problems.append(f"certificate of {batch.batch_id}: {reason}")
        digest = hashlib.sha256(canonical(envelope).encode()).hexdigest()
        if digest != batch.certificate_digest:
            problems.append(f"certificate of {batch.batch_id}: its SHA-256 differs from the one the ledger recorded")
        anchor = (envelope.get("certificate") or {}).get("ledger_head") or {}
        if anchor and heads.get(anchor.get("seq")) != anchor.get("entry_hash"):
            problems.append(f"certificate of {batch.batch_id}: the journal entry it anchors ({anchor.get('seq')}) was changed")
    return VerifyReport(count, certificates, problems)


@dataclass(frozen=True)
class Finding:
    store: str
    location: str
    detail: str


def _id_pattern(subject_id: str) -> re.Pattern[bytes]:
    return re.compile(rb"(?<![0-9])" + re.escape(subject_id.encode()) + rb"(?![0-9])")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _parquet_rows(data: bytes, subject_id: str) -> int | None:
    """Count the subject's rows if `data` is Parquet with the subject key column, else None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.dataset import SUBJECT_KEY

    if data[:4] != b"PAR1":
        return None
    try:
        keys = pq.read_table(pa.BufferReader(data), columns=[SUBJECT_KEY]).column(SUBJECT_KEY).to_pylist()
    except Exception:  # noqa: BLE001 - a Parquet file of another schema cannot hold subject rows
        return None
    return sum(1 for key in keys if str(key) == subject_id)


def record_fingerprints(subject_id: str) -> list[bytes]:
    """Return the subject's records as CSV lines of the source dataset: the bytes a text copy would contain."""
    from tasks.dataset import randhie_csv_path

    pattern = re.compile(r"^(?:[^,]*,){5}" + re.escape(subject_id) + ",")
    with open(randhie_csv_path(), encoding="utf-8") as source:
        return [line.rstrip("\n").encode() for line in source if pattern.match(line)]


def scan_contents(store: str, contents: Iterable[tuple[str, bytes]], subject_id: str,
                  fingerprints: list[bytes]) -> list[Finding]:
    """Search each `(location, bytes)` for the subject's Parquet rows, raw id and record bytes."""
    pattern = _id_pattern(subject_id)
    findings = []
    for location, data in contents:
        rows = _parquet_rows(data, subject_id)
        if rows:
            findings.append(Finding(store, location, f"Parquet object with {rows} record(s) of the subject"))
            continue
        if rows is not None:
            continue
        if pattern.search(data):
            findings.append(Finding(store, location, "raw subject id"))
        if any(f in data for f in fingerprints):
            findings.append(Finding(store, location, "bytes of a record of the subject"))
    return findings


def scan_files(store: str, files: list[Path], subject_id: str, fingerprints: list[bytes]) -> list[Finding]:
    return scan_contents(store, ((str(path), path.read_bytes()) for path in files), subject_id, fingerprints)


def scan_database(store: str, ledger: Ledger, subject_id: str) -> list[Finding]:
    """Search every column of every table as text: works the same on SQLite and PostgreSQL."""
    pattern = _id_pattern(subject_id)
    findings = []
    with ledger.engine.connect() as connection:
        for table in inspect(connection).get_table_names():
            for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                if any(pattern.search(str(value).encode()) for value in row if value is not None):
                    findings.append(Finding(store, f"{ledger.url.split('@')[-1]} table {table}", "raw subject id"))
                    break
    return findings


def scan_subject(ws: Workspace, ledger: Ledger, subject_id: str) -> list[Finding]:
    """Search every store the pipeline writes for the raw id and for the subject's records."""
    fingerprints = record_fingerprints(subject_id)
    findings = []
    findings += scan_files("data", _files(ws.data_dir), subject_id, fingerprints)
    findings += scan_files("dvc cache", _files(ws.dvc_cache_dir), subject_id, fingerprints)
    findings += scan_files("dvc remote", _files(ws.dvc_remote_dir), subject_id, fingerprints)
    for remote in remote_store.s3_remotes(ws):
        # Every stored version: an erased object hidden behind a delete marker is still readable.
        findings += scan_contents("dvc remote", remote_store.all_object_versions(remote), subject_id, fingerprints)
    findings += scan_files("mlflow database", [ws.mlflow_db] if ws.mlflow_db.exists() else [], subject_id, fingerprints)
    findings += scan_files("mlflow artifacts", _files(ws.artifacts_dir), subject_id, fingerprints)
    if registry.uses_tracking_server(ws):
        findings += scan_contents("mlflow server", audit_servers.mlflow_server_contents(ws), subject_id, fingerprints)
    findings += scan_files("prefect database", _files(ws.prefect_home), subject_id, fingerprints)
    prefect_api = os.environ.get("PREFECT_API_URL")
    if prefect_api:
        findings += scan_contents("prefect server", audit_servers.prefect_server_contents(prefect_api), subject_id, fingerprints)
    findings += scan_files("logs", _files(ws.log_file.parent), subject_id, fingerprints)
    findings += scan_files("certificates", _files(ws.certificates_dir), subject_id, fingerprints)
    findings += scan_files("queue", _files(ws.queue_dir), subject_id, fingerprints)
    findings += scan_database("ledger", ledger, subject_id)
    history = subprocess.run(["git", "log", "-p", "--all", "--format=%H%n%B"], cwd=ws.root, capture_output=True).stdout
    if _id_pattern(subject_id).search(history) or any(f in history for f in fingerprints):
        findings.append(Finding("git history", str(ws.root / ".git"), "raw subject id or record bytes in a commit"))
    return findings
