"""Shared fixtures: one Prefect test harness per session and freshly bootstrapped workspaces."""

from __future__ import annotations

import os

# Before Prefect or MLflow are imported: offline cold starts otherwise log
# "database is locked", and MLflow would reconfigure the root logger.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lethe")
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# Bootstrap and CLI code log outside flow runs; those records go to the console and the log file only.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.pop("LETHE_HMAC_KEY", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """Run flows against a temporary Prefect database shared by the whole session (cold start ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workspace(tmp_path):
    """A bootstrapped workspace: data version 1 and model version 1 as champion."""
    from tasks.bootstrap import bootstrap
    from tasks.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    bootstrap(ws)
    return ws


@pytest.fixture
def restore_environment(monkeypatch):
    """The CLI sets Prefect and MLflow variables in os.environ; undo them after each test."""
    for name in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_EXTRA_LOGGERS",
                 "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "MLFLOW_CONFIGURE_LOGGING", "GIT_PYTHON_REFRESH"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
