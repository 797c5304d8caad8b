"""`lethe serve` end to end: a real Prefect server, process worker and MLflow server on 127.0.0.1.

One `lethe serve` process is shared by the module and stopped by
test_sigint_stops_all_children, so the tests must run in file order. The module took
61-91 s on a 2-core x86_64 machine, most of it bootstrapping the workspace and starting
the services, and 168 s while another test suite shared the cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from flows import serve as serve_module
from tests.helpers import request, train_subjects, write_requests

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "Press Ctrl-C to stop."
SERVE_READY_TIMEOUT = 180
FLOW_RUN_TIMEOUT = 150
STOP_TIMEOUT = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment() -> dict[str, str]:
    """The test's environment without any Prefect server or home of its own."""
    env = dict(os.environ)
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH", "LETHE_WORKSPACE", "LETHE_REPO_DIR"):
        env.pop(name, None)
    env.update({"PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    return env


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Served:
    process: subprocess.Popen
    ws: object
    prefect_port: int
    mlflow_port: int
    stdout: Path
    stderr: Path

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def diagnostics(self) -> str:
        """The output of `lethe serve` and the tail of each child's log, for failure messages."""
        parts = [f"--- lethe serve stdout\n{tail(self.stdout)}", f"--- lethe serve stderr\n{tail(self.stderr)}"]
        for name in ("prefect-server.log", "prefect-worker.log", "mlflow-server.log"):
            parts.append(f"--- {name}\n{tail(self.ws.log_file.parent / name)}")
        return "\n".join(parts)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def wait_for_ready_line(served: Served) -> None:
    deadline = time.monotonic() + SERVE_READY_TIMEOUT
    while READY_LINE not in served.stdout.read_text():
        code = served.process.poll()
        if code is not None:
            pytest.fail(f"lethe serve exited with code {code} before it was ready\n{served.diagnostics()}")
        if time.monotonic() > deadline:
            pytest.fail(f"lethe serve was not ready within {SERVE_READY_TIMEOUT} s\n{served.diagnostics()}")
        time.sleep(0.5)


def shut_down(served: Served) -> None:
    """Stop `lethe serve` and, if it failed to, every process it started, by PID."""
    children = served.descendants()
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGINT)
        try:
            served.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A bootstrapped workspace served by `lethe serve` on free ports."""
    from tasks.bootstrap import bootstrap
    from tasks.workspace import Workspace

    root = tmp_path_factory.mktemp("serve")
    ws = Workspace(root / "ws")
    bootstrap(ws)
    prefect_port, mlflow_port = free_port(), free_port()
    env = child_environment()
    # Workers poll for flow runs every 10 s by default, and 2 s keeps the flow-run test short.
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    stdout, stderr = root / "serve.stdout", root / "serve.stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        # The working directory is outside the checkout, so serve must find prefect.yaml through the package.
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--workspace", str(ws.root),
             "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
        )
    served = Served(process, ws, prefect_port, mlflow_port, stdout, stderr)
    try:
        wait_for_ready_line(served)
        yield served
    finally:
        shut_down(served)


@pytest.fixture(scope="module")
def deployed(served):
    """Run `prefect deploy --all` from the checkout against the served Prefect server."""
    env = child_environment()
    env.update({"PREFECT_API_URL": served.prefect_api_url, "PREFECT_HOME": str(served.ws.prefect_home),
                "LETHE_WORKSPACE": str(served.ws.root), "LETHE_REPO_DIR": str(REPO_ROOT)})
    # Without --no-prompt, a question about the deployment would wait for input forever.
    result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO_ROOT,
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"prefect deploy --all failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def prefect_client(served):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: served.prefect_api_url}):
        with get_client(sync_client=True) as client:
            yield client


def test_serve_prints_local_urls(served):
    output = served.stdout.read_text()
    assert f"Prefect UI: http://127.0.0.1:{served.prefect_port}" in output
    assert f"(API {served.prefect_api_url})" in output
    assert f"MLflow UI:  {served.mlflow_url}" in output
    assert f"Logs:       {served.ws.log_file.parent}" in output


def test_prefect_server_healthy(served):
    response = httpx.get(f"{served.prefect_api_url}/health", timeout=10, trust_env=False)
    assert response.status_code == 200
    assert response.json() is True


def test_mlflow_server_healthy(served):
    response = httpx.get(f"{served.mlflow_url}/health", timeout=10, trust_env=False)
    assert response.status_code == 200
    assert response.text.strip() == "OK"


def test_mlflow_ui_serves_html(served):
    response = httpx.get(f"{served.mlflow_url}/", timeout=10, trust_env=False)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()


def test_mlflow_server_reads_workspace_registry(served):
    from tasks.settings import WorkspaceSettings

    name = WorkspaceSettings.load(served.ws.root).model_name
    response = httpx.get(f"{served.mlflow_url}/api/2.0/mlflow/registered-models/alias",
                         params={"name": name, "alias": "champion"}, timeout=10, trust_env=False)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"]["version"] == "1"


def test_state_kept_in_workspace(served):
    assert (served.ws.prefect_home / "prefect.db").is_file()
    for name in ("prefect-server.log", "prefect-worker.log", "mlflow-server.log"):
        assert (served.ws.log_file.parent / name).is_file(), name


def test_worker_online_in_pool(served):
    response = httpx.post(f"{served.prefect_api_url}/work_pools/lethe/workers/filter", json={}, timeout=10,
                          trust_env=False)
    assert response.status_code == 200
    workers = response.json()
    assert [w["status"] for w in workers if w["name"].startswith("lethe-serve-")] == ["ONLINE"]


def test_second_serve_rejects_busy_port(served):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve", "--workspace", str(served.ws.root),
         "--prefect-port", str(served.prefect_port), "--mlflow-port", str(free_port())],
        env=child_environment(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    message = " ".join(result.stderr.split())
    assert result.returncode == 1, message
    assert f"Port {served.prefect_port} on 127.0.0.1 is not available" in message
    assert "--prefect-port" in message


def test_nightly_deployment_schedule(deployed, prefect_client):
    deployment = prefect_client.read_deployment_by_name("nightly_deletion_run/nightly")
    assert deployment.work_pool_name == "lethe"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.schedules[0].schedule.timezone == "UTC"
    assert deployment.schedules[0].active


def test_deployment_parameters_reference_workspace(served, deployed, prefect_client):
    deployment = prefect_client.read_deployment_by_name("nightly_deletion_run/nightly")
    assert deployment.parameters == {"workspace": str(served.ws.root), "sources": ["local"]}
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
    ]


@pytest.mark.parametrize("parameter, default", [
    ("workspace", None), ("sources", ["local"]), ("method", None), ("gates", None),
])
def test_parameter_form_documents(deployed, prefect_client, parameter, default):
    schema = prefect_client.read_deployment_by_name("nightly_deletion_run/nightly").parameter_openapi_schema
    field = schema["properties"][parameter]
    assert field["default"] == default
    assert field.get("description", "").strip(), f"{parameter} has no description in the run form"


def test_parameter_form_documents_gate_fields(deployed, prefect_client):
    from tasks.settings import GateSettings

    schema = prefect_client.read_deployment_by_name("nightly_deletion_run/nightly").parameter_openapi_schema
    assert {"$ref": "#/definitions/GateSettings"} in schema["properties"]["gates"]["anyOf"]
    fields = schema["definitions"]["GateSettings"]["properties"]
    assert set(fields) == set(GateSettings.model_fields)
    for name, spec in GateSettings.model_fields.items():
        assert fields[name]["default"] == spec.default, name
        assert fields[name]["description"] == spec.description, name


def flow_run_messages(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return [entry.message for entry in logs]


def test_custom_run_registers_new_champion(served, deployed, prefect_client):
    from tasks import registry
    from tasks.settings import WorkspaceSettings

    ws = served.ws
    model_name = WorkspaceSettings.load(ws.root).model_name
    before = registry.champion_version(ws, model_name)
    write_requests(ws, "serve-custom-run.jsonl", [request("serve-1", train_subjects(ws, 1)[0])])
    # As the UI's Custom run sends them: every form field. The thresholds differ from the
    # workspace's, so the run's gate log lines show that the gates reached the flow.
    parameters = {
        "workspace": str(ws.root),
        "sources": ["local"],
        "method": "neggrad_plus",
        "gates": {"max_retain_drop_pp": 7.5, "max_test_drop_pp": 7.5, "max_accuracy_z": 4.5, "max_mia_z": 4.5},
    }
    deployment = prefect_client.read_deployment_by_name("nightly_deletion_run/on-demand")
    flow_run = prefect_client.create_flow_run_from_deployment(deployment.id, parameters=parameters)

    deadline = time.monotonic() + FLOW_RUN_TIMEOUT
    while True:
        flow_run = prefect_client.read_flow_run(flow_run.id)
        if flow_run.state is not None and flow_run.state.is_final():
            break
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {flow_run.id} still {flow_run.state_name} after {FLOW_RUN_TIMEOUT} s\n"
                        f"{served.diagnostics()}")
        time.sleep(1)
    assert flow_run.state.is_completed(), f"flow run ended {flow_run.state_name}\n{served.diagnostics()}"
    assert flow_run.parameters == parameters

    after = registry.champion_version(ws, model_name)
    assert before == "1"
    assert after == "2"
    tags = registry.version_tags(ws, model_name, after)
    assert tags["prefect_flow_run_id"] == str(flow_run.id)
    assert tags["parent_version"] == before
    # Also when a gate fails and the exact fallback is registered, the reason starts with the request.
    assert tags["method_reason"].startswith("method neggrad_plus requested explicitly"), tags["method_reason"]
    assert list(ws.incoming_dir.glob("*.jsonl")) == []

    messages = "\n".join(flow_run_messages(prefect_client, flow_run.id))
    assert re.search(r"retain_accuracy_drop_pp = \S+ \(max 7\.5\)", messages), messages
    assert re.search(r"forget_mia_z = \S+ \(\|value\| max 4\.5\)", messages), messages


def test_sigint_stops_all_children(served):
    children = served.descendants()
    assert len(children) >= 3, [c.cmdline() for c in children]

    served.process.send_signal(signal.SIGINT)
    code = served.process.wait(STOP_TIMEOUT)

    assert code == 0, served.diagnostics()
    _, alive = psutil.wait_procs(children, timeout=10)
    # An exited grandchild stays a zombie until PID 1 reaps it; it has exited all the same.
    running = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert running == [], [p.cmdline() for p in running]
    assert "Stopped all services." in served.stdout.read_text()


def test_failed_start_names_port_and_log(tmp_path):
    log_file = tmp_path / "logs" / "broken.log"
    spec = serve_module.ServiceSpec(
        name="Broken server",
        command=[sys.executable, "-c", "import sys; print('cannot bind'); sys.exit(3)"],
        env=child_environment(), log_file=log_file, is_ready=lambda: False, port=45678, port_option="--broken-port",
    )
    service = serve_module.start(spec)
    try:
        with pytest.raises(serve_module.ServeError) as raised:
            serve_module.wait_ready(service, timeout=30, stop_requested=lambda: False)
    finally:
        serve_module.stop(service, timeout=5)
    message = str(raised.value)
    assert "Broken server on 127.0.0.1:45678 stopped (exit code 3) before it was ready" in message
    assert str(log_file) in message
    assert "cannot bind" in message


def test_stop_kills_child_ignoring_sigterm(tmp_path):
    ready_file = tmp_path / "ready"
    script = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"pathlib.Path({json.dumps(str(ready_file))}).touch(); time.sleep(60)")
    spec = serve_module.ServiceSpec(name="Stubborn", command=[sys.executable, "-c", script], env=child_environment(),
                                    log_file=tmp_path / "stubborn.log", is_ready=ready_file.exists)
    service = serve_module.start(spec)
    assert serve_module.wait_ready(service, timeout=30, stop_requested=lambda: False)

    started = time.monotonic()
    serve_module.stop(service, timeout=1)

    assert service.process.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_tracking_server_replaces_local_mlflow(tmp_path, monkeypatch):
    from tasks.workspace import Workspace

    monkeypatch.setenv("LETHE_MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    specs = serve_module.service_specs(Workspace(tmp_path / "ws"), REPO_ROOT, 4201, 5001, worker=True, mlflow_workers=1)

    assert [spec.name for spec in specs] == ["Prefect server", "Prefect worker"]
