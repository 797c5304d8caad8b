"""The `lethe` command line, through Typer's runner on real workspaces."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


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
    assert "invalid JSON" in result.output
    incoming = list(workspace.incoming_dir.glob("*.jsonl"))
    assert len(incoming) == 1
    assert len(incoming[0].read_text().splitlines()) == 2
    assert len(list(workspace.quarantine_dir.glob("*.jsonl"))) == 1


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
