"""End-to-end runs of the nightly flow on the real dataset, through Prefect's test harness."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
from sqlalchemy import select

from flows.nightly import nightly_deletion_run
from tasks import registry, versioning
from tasks.ledger import Batch, BatchState, DeletionRequest, Ledger, QuarantinedLine, RequestState
from tasks.settings import GateSettings, WorkspaceSettings
from tests.helpers import files_under, raw_id_hits, request, subjects_in_objects, train_subjects, write_requests

MODEL = WorkspaceSettings().model_name

pytestmark = pytest.mark.usefixtures("prefect_harness")


def prefect_database_path():
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    return url.split(":///", 1)[1]


def test_run_erases_subjects_everywhere(workspace, caplog, capfd):
    ws = workspace
    caplog.set_level(logging.INFO, logger="lethe")
    subjects = train_subjects(ws, 3)
    stores = [ws.dvc_cache_dir, ws.dvc_remote_dir]
    assert set(subjects) <= subjects_in_objects(stores), "precondition: the stores hold the subjects"
    md5_before = versioning.data_md5(ws)

    write_requests(ws, "batch-a.jsonl", [
        request("r-1", subjects[0]),
        request("r-2", str(subjects[1])),
        "{not json",
        request("r-3", subjects[2]),
        {"request_id": "r-4", "subject_id": "", "received_at": "2026-01-01T00:00:00Z", "source": "test"},
        request("r-1", subjects[0]),  # duplicate delivery of r-1
        request("r-5", 999999999),  # no such subject in the dataset
    ])
    summary = nightly_deletion_run(workspace=str(ws.root))

    assert summary["status"] == "completed"
    assert summary["request_count"] == 4
    assert summary["no_data_held"] == 1

    # Neither the new data version nor the DVC cache and remote contain the subjects.
    from tasks.shards import read_all

    assert not set(subjects) & set(read_all(ws.data_dir)["zper"])
    assert versioning.data_md5(ws) != md5_before
    assert not set(subjects) & subjects_in_objects(stores)
    assert subjects_in_objects(stores), "the other shards stay in the stores"

    # A new champion with provenance; the old version is tagged as containing erased data.
    assert registry.champion_version(ws, MODEL) == "2"
    tags = registry.version_tags(ws, MODEL, "2")
    assert tags["parent_version"] == "1"
    assert tags["batch_id"] == summary["batch_id"]
    assert tags["request_count"] == "4"
    assert tags["data_md5"] == versioning.data_md5(ws)
    assert tags["data_git_rev"] == versioning.head_rev(ws)
    assert tags["method"] in {"neggrad_plus", "retrain"}
    assert registry.version_tags(ws, MODEL, "1")["contains_erased_data"] == "true"

    # The ledger closed every request; invalid lines are quarantined with a reason.
    ledger = Ledger(ws.ledger_url)
    with ledger.session() as s:
        states = {r.request_id: r.state for r in s.scalars(select(DeletionRequest))}
        reasons = [q.reason for q in s.scalars(select(QuarantinedLine))]
        batch = s.get(Batch, summary["batch_id"])
    assert states == {"r-1": RequestState.COMPLETED, "r-2": RequestState.COMPLETED,
                      "r-3": RequestState.COMPLETED, "r-5": RequestState.NO_DATA_HELD}
    assert batch.state == BatchState.ACKNOWLEDGED
    assert len(reasons) == 2
    assert any("invalid JSON" in r for r in reasons)
    assert any("subject_id" in r for r in reasons)
    quarantined = [json.loads(l) for l in (ws.quarantine_dir / "batch-a.jsonl").read_text().splitlines()]
    assert [q["line"] for q in quarantined] == [3, 5]
    assert (ws.done_dir / "batch-a.jsonl").exists()
    assert not (ws.incoming_dir / "batch-a.jsonl").exists()

    # No raw subject id outside the dataset and the queue's quarantine.
    git_log = ws.state_dir / "git-log.txt"
    git_log.write_text(subprocess.run(["git", "log", "-p", "--all"], cwd=ws.root, capture_output=True, text=True).stdout)
    scanned = files_under(ws.state_dir / "mlartifacts", ws.state_dir / "logs", ws.done_dir)
    scanned += [ws.mlflow_db, ws.ledger_path, git_log]
    from pathlib import Path

    scanned.append(Path(prefect_database_path()))
    assert raw_id_hits(scanned, subjects) == []
    captured = capfd.readouterr()
    for sid in subjects:
        assert str(sid) not in caplog.text
        assert str(sid) not in captured.out + captured.err

    # The batch summary is a Prefect artifact.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    markdown = [a.data for a in artifacts if a.key == "erasure-batch"]
    assert any(summary["batch_id"] in m for m in markdown)

    # 2nd run with an empty queue: no new version, no commit.
    rev = versioning.head_rev(ws)
    empty = nightly_deletion_run(workspace=str(ws.root))
    assert empty["status"] == "empty"
    assert versioning.head_rev(ws) == rev
    assert registry.all_versions(ws, MODEL) == ["1", "2"]

    # 3rd run with only an unknown subject: the request closes as "no data held", nothing else changes.
    write_requests(ws, "unknown.jsonl", [request("u-1", 999999998)])
    unknown = nightly_deletion_run(workspace=str(ws.root))
    assert unknown["status"] == "no_data_held"
    assert versioning.head_rev(ws) == rev
    assert registry.all_versions(ws, MODEL) == ["1", "2"]
    with ledger.session() as s:
        assert s.get(DeletionRequest, "u-1").state == RequestState.NO_DATA_HELD


def test_failed_gate_registers_retrain(workspace):
    ws = workspace
    write_requests(ws, "gate.jsonl", [request("g-1", s) for s in train_subjects(ws, 2, offset=40)])
    # |z| <= 0 holds only for z exactly 0, so both forgetting gates fail.
    impossible = GateSettings(max_accuracy_z=0.0, max_mia_z=0.0)

    summary = nightly_deletion_run(workspace=str(ws.root), gates=impossible)

    assert [a["method"] for a in summary["attempts"]] == ["neggrad_plus", "retrain"]
    assert summary["attempts"][0]["passed"] is False
    tags = registry.version_tags(ws, MODEL, registry.champion_version(ws, MODEL))
    assert tags["method"] == "retrain"
    assert "escalated to retrain" in tags["method_reason"]


def test_crash_in_unlearning_changes_nothing(workspace):
    from models.unlearning import METHODS

    ws = workspace
    subjects = train_subjects(ws, 2, offset=80)
    write_requests(ws, "crash.jsonl", [request(f"c-{i}", s) for i, s in enumerate(subjects)])
    md5, rev = versioning.data_md5(ws), versioning.head_rev(ws)

    def crash(*args, **kwargs):
        raise RuntimeError("injected fault inside unlearning")

    METHODS["crash"] = crash
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            nightly_deletion_run(workspace=str(ws.root), method="crash")
    finally:
        del METHODS["crash"]

    assert versioning.data_md5(ws) == md5
    assert versioning.head_rev(ws) == rev
    assert not versioning.has_uncommitted_data(ws)
    assert set(subjects) <= subjects_in_objects([ws.data_dir])
    assert registry.all_versions(ws, MODEL) == ["1"]
    assert registry.champion_version(ws, MODEL) == "1"
    assert (ws.incoming_dir / "crash.jsonl").exists()
    ledger = Ledger(ws.ledger_url)
    assert {r.request_id for r in ledger.pending_requests()} == {"c-0", "c-1"}

    summary = nightly_deletion_run(workspace=str(ws.root))

    assert summary["status"] == "completed"
    assert summary["request_count"] == 2
    assert registry.champion_version(ws, MODEL) == "2"
    assert not set(subjects) & subjects_in_objects([ws.data_dir, ws.dvc_cache_dir, ws.dvc_remote_dir])
    assert ledger.pending_requests() == []
