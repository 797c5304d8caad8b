"""`lethe serve`: a Prefect server, a process worker and an MLflow tracking server for one workspace.

Every service listens on 127.0.0.1 only. Each child runs in its own process group,
so stopping a service also stops the processes it started (uvicorn workers, for
example), and a Ctrl-C in the terminal reaches only `lethe serve`, which then stops
the children in reverse start order. Child output goes to `state/logs/<service>.log`
in the workspace. POSIX only: process groups and `os.killpg` do not exist on Windows.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.errors import LetheError
from tasks.registry import uses_tracking_server
from tasks.workspace import Workspace

log = logging.getLogger("lethe.serve")

HOST = "127.0.0.1"
# The work pool that every deployment in prefect.yaml names.
WORK_POOL = "lethe"
POLL_SECONDS = 0.25
STOP_TIMEOUT_SECONDS = 20.0
LOG_TAIL_LINES = 20
# Health checks go straight to 127.0.0.1, never through an HTTP proxy named in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Defaults that the operator's environment overrides. Prefect analytics and MLflow telemetry
# are off, because a machine that processes erasure requests should send no usage data out.
CHILD_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "lethe",
    "MLFLOW_CONFIGURE_LOGGING": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


class ServeError(LetheError):
    """A service failed to start or stopped on its own while `lethe serve` was running."""


@dataclass(frozen=True)
class Endpoints:
    prefect_url: str
    mlflow_url: str

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"


@dataclass(frozen=True)
class ServiceSpec:
    """A child process to start: its command, environment and log file, and the check that it is ready."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_file: Path
    is_ready: Callable[[], bool]
    port: int | None = None
    port_option: str | None = None


@dataclass
class Service:
    spec: ServiceSpec
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid


def endpoints(prefect_port: int, mlflow_port: int) -> Endpoints:
    return Endpoints(prefect_url=f"http://{HOST}:{prefect_port}", mlflow_url=f"http://{HOST}:{mlflow_port}")


def default_repo_dir() -> Path:
    """Return the Lethe checkout that contains prefect.yaml: LETHE_REPO_DIR, else the directory above `flows/`."""
    configured = os.environ.get("LETHE_REPO_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(__file__).resolve().parent.parent


def check_repo_dir(repo_dir: Path) -> Path:
    """Raise unless repo_dir contains prefect.yaml and the flow that its deployments run."""
    for required in ("prefect.yaml", "flows/nightly.py"):
        if not (repo_dir / required).is_file():
            raise ServeError(
                f"{repo_dir / required} not found: the worker runs the deployments of prefect.yaml from the "
                f"Lethe checkout. Pass that directory with --repo-dir or LETHE_REPO_DIR."
            )
    return repo_dir


def service_environment(ws: Workspace, repo_dir: Path, prefect_api_url: str) -> dict[str, str]:
    """Build the environment of every child, and so of every flow run that the worker starts.

    PREFECT_HOME is the workspace's state/prefect, so the server's SQLite database stays
    in the workspace. A flow run reads LETHE_WORKSPACE when its `workspace` parameter is
    empty. prefect.yaml's `{{ $LETHE_REPO_DIR }}` and `{{ $LETHE_WORKSPACE }}` are read
    by `prefect deploy`, which stores their values in the deployment (Prefect 3.9.1), so
    runs start where the deployment was made, even when the worker's variables differ.
    """
    env = {**CHILD_DEFAULTS, **os.environ}
    env.update({
        "PREFECT_HOME": str(ws.prefect_home),
        "PREFECT_API_URL": prefect_api_url,
        "LETHE_WORKSPACE": str(ws.root),
        "LETHE_REPO_DIR": str(repo_dir),
        # Without a terminal a prompt would block the child forever.
        "PREFECT_CLI_PROMPT": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def prefect_server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


def worker_command(name: str) -> list[str]:
    # The worker creates the work pool when it does not exist yet.
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process", "--name", name]


def mlflow_server_command(ws: Workspace, port: int, workers: int) -> list[str]:
    """Serve the workspace's own store: the SQLite URI and artifact directory that tasks.registry writes.

    New experiments get the same file:// artifact root that tasks.registry gives them, so
    runs logged by flows and by the UI keep their artifacts in state/mlartifacts.
    """
    artifacts = ws.artifacts_dir.as_uri()
    return [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
            "--backend-store-uri", ws.mlflow_uri, "--default-artifact-root", artifacts,
            "--artifacts-destination", artifacts, "--workers", str(workers)]


def mlflow_environment(env: dict[str, str]) -> dict[str, str]:
    """Turn off MLflow's server jobs unless the operator set MLFLOW_SERVER_ENABLE_JOB_EXECUTION.

    Lethe uses none of them (they run GenAI evaluation and trace tasks), and the job
    runner of MLflow 3.17.2 starts seven Huey consumer processes beside the server.
    """
    return {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}


def service_specs(ws: Workspace, repo_dir: Path, prefect_port: int, mlflow_port: int, worker: bool,
                  mlflow_workers: int) -> list[ServiceSpec]:
    """List the services in start order. Each starts once the one before it is ready."""
    urls = endpoints(prefect_port, mlflow_port)
    env = service_environment(ws, repo_dir, urls.prefect_api_url)
    logs = ws.log_file.parent
    specs = [ServiceSpec("Prefect server", prefect_server_command(prefect_port), env, logs / "prefect-server.log",
                         health_check(f"{urls.prefect_api_url}/health"), prefect_port, "--prefect-port")]
    if worker:
        name = worker_name()
        specs.append(ServiceSpec("Prefect worker", worker_command(name), env, logs / "prefect-worker.log",
                                 worker_check(urls.prefect_api_url, name, datetime.now(UTC))))
    if uses_tracking_server(ws):
        # LETHE_MLFLOW_TRACKING_URI names the production tracking server, which serves its own UI.
        log.info("MLflow: using the tracking server %s; no local MLflow server is started", ws.mlflow_uri)
        return specs
    specs.append(ServiceSpec("MLflow server", mlflow_server_command(ws, mlflow_port, mlflow_workers),
                             mlflow_environment(env), logs / "mlflow-server.log",
                             health_check(f"{urls.mlflow_url}/health"), mlflow_port, "--mlflow-port"))
    return specs


def worker_name() -> str:
    """Name the worker after this host and process, so `lethe serve` finds its own worker in the pool."""
    return f"lethe-serve-{socket.gethostname()}-{os.getpid()}"


def check_port_free(port: int, option: str) -> None:
    """Raise if something listens on HOST:port, so a health check cannot mistake it for the server we start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # The servers bind with SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise ServeError(f"Port {port} on {HOST} is not available ({exc.strerror}). Stop the process that "
                             f"uses it or choose another port with {option}.") from None


def _die_with_parent() -> Callable[[], None] | None:
    """Return a preexec_fn that sets the child's parent-death signal (Linux PR_SET_PDEATHSIG) to SIGTERM.

    So a child gets SIGTERM when `lethe serve` dies, even by SIGKILL. Returns None on other systems. The function runs between fork and exec, so it only
    makes system calls, and it exits the child if the parent died before the request.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def request_signal() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return request_signal


def start(spec: ServiceSpec) -> Service:
    """Start the child in a new process group, with stdout and stderr appended to its log file."""
    spec.log_file.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_file.open("ab") as output:
        output.write(f"\n=== {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC: {' '.join(spec.command)}\n".encode())
        output.flush()
        process = subprocess.Popen(spec.command, env=spec.env, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent())
    log.info("Started %s (pid %d), log %s", spec.name, process.pid, spec.log_file)
    return Service(spec, process)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _start_failure(service: Service, reason: str) -> ServeError:
    spec = service.spec
    where = f" on {HOST}:{spec.port}" if spec.port else ""
    tail = log_tail(spec.log_file)
    return ServeError(f"{spec.name}{where} {reason}. See its log {spec.log_file}"
                      + (f". Its last lines:\n{tail}" if tail else "."))


def _http_ok(url: str, method: str = "GET", body: dict | None = None) -> bytes | None:
    """Return the response body on HTTP 200, else None (refused, reset, timed out or another status)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with _DIRECT.open(request, timeout=2) as response:
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # Expected while a server starts, so only at debug level.
        log.debug("%s %s failed: %s", method, url, exc)
        return None


def wait_ready(service: Service, timeout: float, stop_requested: Callable[[], bool]) -> bool:
    """Poll the service's readiness check until it passes, and return True.

    Returns False when a stop was requested first. Raises ServeError when the child
    exits or the timeout passes first.
    """
    deadline = time.monotonic() + timeout
    while not stop_requested():
        code = service.process.poll()
        if code is not None:
            raise _start_failure(service, f"stopped ({describe_exit(code)}) before it was ready")
        if service.spec.is_ready():
            return True
        if time.monotonic() > deadline:
            raise _start_failure(service, f"was not ready within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
    return False


def health_check(url: str) -> Callable[[], bool]:
    return lambda: _http_ok(url) is not None


def worker_check(prefect_api_url: str, name: str, started: datetime) -> Callable[[], bool]:
    """Check that the worker called name has sent the server a heartbeat since `started`.

    The time check skips a worker of the same name left in the pool by an earlier
    `lethe serve` whose process id was the same.
    """
    url = f"{prefect_api_url}/work_pools/{WORK_POOL}/workers/filter"
    # The server stamps heartbeats with the clock of this same host, so 5 s allows for rounding only.
    since = started - timedelta(seconds=5)

    def ready() -> bool:
        body = _http_ok(url, "POST", {})
        if body is None:
            return False
        for worker in json.loads(body):
            heartbeat = worker.get("last_heartbeat_time")
            if worker.get("name") == name and heartbeat and datetime.fromisoformat(heartbeat) >= since:
                return True
        return False

    return ready


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def stop(service: Service, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """Send SIGTERM to the service's process group, wait, and SIGKILL what is left after the timeout."""
    name, pgid = service.spec.name, service.pid
    _signal_group(pgid, signal.SIGTERM)
    try:
        code = service.process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) still running %.0f s after SIGTERM, sending SIGKILL", name, pgid, timeout)
        _signal_group(pgid, signal.SIGKILL)
        code = service.process.wait()
    # Processes that the child started share its process group and may outlive it for a moment.
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    if _group_alive(pgid):
        log.warning("Processes in the group %d of %s still running, sending SIGKILL", pgid, name)
        _signal_group(pgid, signal.SIGKILL)
    log.info("Stopped %s (pid %d, %s)", name, pgid, describe_exit(code))


class _StopSignal:
    """Record SIGINT and SIGTERM instead of raising, so every loop can stop the children in order."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is None:
            log.info("Received %s, stopping the services", signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def _stop_signals() -> Iterator[_StopSignal]:
    handler = _StopSignal()
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield handler
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def describe_exit(code: int) -> str:
    """Describe a Popen return code: negative codes are the signal that ended the process."""
    if code < 0:
        return f"ended by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _supervise(services: list[Service], stop_signal: _StopSignal) -> None:
    """Block until a stop signal, and raise ServeError if a service exits on its own first."""
    while not stop_signal.requested:
        for service in services:
            code = service.process.poll()
            if code is not None:
                raise ServeError(f"{service.spec.name} (pid {service.pid}) stopped on its own ({describe_exit(code)}). "
                                 f"See its log {service.spec.log_file}. The other services were stopped too.")
        time.sleep(POLL_SECONDS)


def serve(ws: Workspace, repo_dir: Path, on_ready: Callable[[Endpoints], None], prefect_port: int = 4200,
          mlflow_port: int = 5000, worker: bool = True, mlflow_workers: int = 1, startup_timeout: float = 120.0) -> None:
    """Start the services one after another, call on_ready, and run until SIGINT or SIGTERM.

    Returns after stopping every child when a signal arrives, also during start-up.
    Raises ServeError, after stopping the children already started, when a service
    fails to become ready or exits on its own.
    """
    check_repo_dir(repo_dir)
    specs = service_specs(ws, repo_dir, prefect_port, mlflow_port, worker, mlflow_workers)
    for spec in specs:
        if spec.port is not None:
            check_port_free(spec.port, spec.port_option)
    urls = endpoints(prefect_port, mlflow_port)
    if uses_tracking_server(ws):
        urls = Endpoints(prefect_url=urls.prefect_url, mlflow_url=ws.mlflow_uri)
    services: list[Service] = []
    with _stop_signals() as stop_signal:
        try:
            for spec in specs:
                if stop_signal.requested:
                    return
                service = start(spec)
                services.append(service)
                if not wait_ready(service, startup_timeout, lambda: stop_signal.requested):
                    return
                log.info("%s is ready", spec.name)
            on_ready(urls)
            _supervise(services, stop_signal)
        finally:
            for service in reversed(services):
                stop(service)
