"""The `lethe` command line, through Typer's runner on real workspaces."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("restore_environment")


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("init", "request", "run", "lineage"):
        assert command in result.output


def test_run_outside_workspace_fails_clearly(tmp_path):
    result = runner.invoke(app, ["run", "--workspace", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "lethe init --workspace" in result.output


def test_init_refuses_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["init", "--workspace", str(tmp_path)])
    assert result.exit_code == 2
    assert "not empty" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_request_add_quarantines_invalid_lines(workspace, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        json.dumps({"request_id": "f-1", "subject_id": "125024", "received_at": "2026-12-01T00:00:00Z", "source": "web"})
        + "\n{broken\n"
    )
    result = runner.invoke(app, ["request", "add", "125133", "--file", str(requests), "--workspace", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert "Enqueued 2 request(s)" in result.output
    assert "Quarantined 1 line(s) of requests.jsonl" in result.output
    incoming = sorted(workspace.incoming_dir.glob("*.jsonl"))
    assert [p.name.split("-")[0] for p in incoming] == ["cli", "requests"]
    assert [len(p.read_text().splitlines()) for p in incoming] == [1, 1]
    quarantined = list(workspace.quarantine_dir.glob("requests-*.jsonl"))
    assert len(quarantined) == 1
    assert "invalid JSON" in quarantined[0].read_text()


def test_request_add_all_invalid_exits_1(workspace, tmp_path):
    requests = tmp_path / "bad.jsonl"
    requests.write_text("{broken\n")
    result = runner.invoke(app, ["request", "add", "--file", str(requests), "--workspace", str(workspace.root)])
    assert result.exit_code == 1
    assert "Enqueued 0 request(s)" in result.output


def test_request_add_rejects_bad_typed_id(workspace):
    result = runner.invoke(app, ["request", "add", "125133", "12x", "--workspace", str(workspace.root)])
    assert result.exit_code == 1
    assert "argument 2 is invalid" in result.output
    assert list(workspace.incoming_dir.glob("*.jsonl")) == []


def test_run_rejects_unknown_method(workspace):
    result = runner.invoke(app, ["run", "--method", "bogus", "--workspace", str(workspace.root)])
    assert result.exit_code == 2
    assert "valid for the mlp family" in result.output


def test_request_add_without_ids_fails(workspace):
    result = runner.invoke(app, ["request", "add", "--workspace", str(workspace.root)])
    assert result.exit_code == 1
    assert "Give subject ids" in result.output


def test_lineage_prints_version_one(workspace, monkeypatch):
    from flows import cli

    monkeypatch.setattr(cli.console, "width", 200)
    result = runner.invoke(app, ["lineage", "--workspace", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output
    assert "ui --backend-store-uri" in result.output


def test_other_ledger_rejected(workspace, monkeypatch, tmp_path):
    monkeypatch.setenv("LETHE_LEDGER_URL", f"sqlite:///{tmp_path / 'other.db'}")
    result = runner.invoke(app, ["status", "--workspace", str(workspace.root)])
    assert result.exit_code == 2
    assert "was created with the ledger" in result.output
    assert "a new, empty ledger" in result.output


def test_deleted_ledger_fails_verify(workspace):
    workspace.ledger_path.unlink()
    result = runner.invoke(app, ["audit", "verify", "--workspace", str(workspace.root)])
    assert result.exit_code == 4
    assert "a new, empty ledger" in result.output


def test_corrupt_ledger_fails_verify(workspace):
    workspace.ledger_path.write_bytes(b"not a database" * 1000)
    result = runner.invoke(app, ["audit", "verify", "--workspace", str(workspace.root)])
    assert result.exit_code == 4
    assert "could not be opened" in result.output
    assert "Traceback" not in result.output
