"""Crash recovery: a real `lethe run` process is killed with SIGKILL at each stage boundary.

After every kill, a second run must leave no request lost and none applied twice, with
the data version, registry, ledger and queue consistent and a champion that has
forgotten every requested subject.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from tasks import registry, versioning
from tasks.audit import verify_ledger
from tasks.faults import BOUNDARIES
from tasks.ledger import Batch, BatchState, DeletionRequest, Ledger, RequestState
from tasks.settings import WorkspaceSettings
from tests.helpers import request, subjects_in_objects, train_subjects, write_requests

MODEL = WorkspaceSettings().model_name
LETHE = str(Path(sys.executable).with_name("lethe"))


@pytest.fixture(scope="module")
def crash_workspace(tmp_path_factory):
    from tasks.bootstrap import bootstrap
    from tasks.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("recovery") / "ws")
    bootstrap(ws)
    return ws


def run_lethe(ws, log_path: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """Run `lethe run` in its own process group, so a killed run's children can be stopped too.

    Output goes to a file, not a pipe: Prefect's temporary API server, a child that
    outlives a SIGKILLed parent, would otherwise hold the pipe open.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "LETHE_FAULT_AT"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if fault:
        env["LETHE_FAULT_AT"] = fault
    with log_path.open("w") as log:
        proc = subprocess.Popen([LETHE, "run", "--workspace", str(ws.root)], env=env, start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(proc.args, returncode, log_path.read_text(errors="replace"), "")


def assert_consistent(ws, requested: dict[str, int]) -> None:
    """Check ledger, data, DVC stores, registry and queue against each other."""
    ledger = Ledger(ws.ledger_url)
    with ledger.session() as s:
        requests = {r.request_id: r for r in s.scalars(select(DeletionRequest))}
        batches = list(s.scalars(select(Batch).order_by(Batch.started_at)))

    # No request lost, none left open.
    assert set(requests) == set(requested)
    assert {r.state for r in requests.values()} == {RequestState.COMPLETED}

    # Each request was applied by exactly one acknowledged batch.
    acknowledged = [b for b in batches if b.state == BatchState.ACKNOWLEDGED]
    assert {b.state for b in batches} <= {BatchState.ACKNOWLEDGED, BatchState.ROLLED_BACK}
    assert {r.batch_id for r in requests.values()} <= {b.batch_id for b in acknowledged}

    # One model version per acknowledged batch, registered once, and the champion is the last one.
    versions = registry.all_versions(ws, MODEL)
    assert len(versions) == 1 + len(acknowledged)
    batch_of_version = {v: registry.version_tags(ws, MODEL, v).get("batch_id") for v in versions[1:]}
    assert sorted(batch_of_version.values()) == sorted(b.batch_id for b in acknowledged)
    latest = acknowledged[-1]
    assert registry.champion_version(ws, MODEL) == latest.model_version_after

    # The champion was trained or unlearned on the current data version, which lacks every subject.
    champion_tags = registry.version_tags(ws, MODEL, latest.model_version_after)
    assert champion_tags["data_md5"] == versioning.data_md5(ws)
    assert all(g["passed"] for g in json.loads(champion_tags["gates"])) or champion_tags["method"] == "retrain"
    assert not versioning.has_uncommitted_data(ws)
    assert not set(requested.values()) & subjects_in_objects([ws.data_dir, ws.dvc_cache_dir, ws.dvc_remote_dir])

    # No request is left in the queue, and the ledger's chain and certificates verify.
    assert list(ws.incoming_dir.glob("*.jsonl")) == []
    report = verify_ledger(ws, ledger)
    assert report.problems == []
    assert report.certificates == len(acknowledged)


def test_kill_at_every_boundary(crash_workspace, tmp_path):
    ws = crash_workspace
    subjects = train_subjects(ws, len(BOUNDARIES), offset=200)
    requested: dict[str, int] = {}

    for index, boundary in enumerate(BOUNDARIES):
        request_id = f"k-{index}"
        requested[request_id] = subjects[index]
        write_requests(ws, f"{boundary}.jsonl", [request(request_id, subjects[index])])

        killed = run_lethe(ws, tmp_path / f"{boundary}-killed.log", fault=boundary)
        assert killed.returncode == -signal.SIGKILL, f"{boundary}: expected SIGKILL\n{killed.stdout[-3000:]}"

        rerun = run_lethe(ws, tmp_path / f"{boundary}-rerun.log")
        assert rerun.returncode == 0, f"rerun after {boundary} failed\n{rerun.stdout[-3000:]}"
        assert_consistent(ws, requested)
