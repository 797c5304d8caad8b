"""Store servers for production-mode tests: moto S3 over HTTP, fresh PostgreSQL databases, MLflow and Prefect servers.

Every server listens on 127.0.0.1 and on a free port, and uses fake AWS credentials,
so nothing reaches a real cloud. Each helper stops what it started, by process group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
# Migrating a fresh PostgreSQL store took the MLflow server 6-25 s on a 2-core machine shared with other tests.
SERVER_START_TIMEOUT = 120
SERVER_STOP_TIMEOUT = 30
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_server() -> Iterator[str]:
    """Run a moto server (S3, SQS) on 127.0.0.1 and yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """Create a uniquely named PostgreSQL database, yield its name and drop it at the end."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is not reachable ({exc}). These tests need it: "
                    "start the server or run them where CI provides it.", pytrace=False)
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def versioned_bucket(endpoint: str, name: str) -> None:
    s3 = s3_client(endpoint)
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})


@contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: str, s3_endpoint: str, home: Path) -> Iterator[str]:
    """Run `mlflow server` with the given stores, proxying artifacts to S3 on moto, and yield its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = home / "mlflow-server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
               "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=server_environment(s3_endpoint, home), cwd=home,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(f"{url}/health", process, log_path)
        yield url
    finally:
        stop_process_group(process)


@contextmanager
def prefect_server(database_url: str, home: Path) -> Iterator[str]:
    """Run `prefect server start` on a PostgreSQL database and yield its API URL."""
    port = free_port()
    log_path = home / "prefect-server.log"
    env = server_environment("http://127.0.0.1:9", home)
    env.update({"PREFECT_API_DATABASE_CONNECTION_URL": database_url, "PREFECT_HOME": str(home / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_PROMPT": "false"})
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_health(f"{api}/health", process, log_path)
        yield api
    finally:
        stop_process_group(process)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def server_environment(s3_endpoint: str, home: Path) -> dict[str, str]:
    """The server writes to S3 itself (it proxies artifacts), so it gets the fake credentials and endpoint."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AWS_", "LETHE_", "MLFLOW_")) and key.lower() not in
           {"http_proxy", "https_proxy", "all_proxy"}}
    env.update(FAKE_AWS)
    env.update({
        "AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_CONFIG_FILE": str(home / "missing-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "missing-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_CONFIGURE_LOGGING": "false",
        # The job runner starts seven Huey consumer processes for GenAI jobs that Lethe never uses.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    })
    return env


def wait_for_health(health_url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[3]} server exited with code {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(health_url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"{process.args[3]} server did not answer {health_url} within {SERVER_START_TIMEOUT} s:\n"
                f"{log_path.read_text()[-4000:]}")


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a server and its children (uvicorn workers), which share the process group the server leads."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=SERVER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=SERVER_STOP_TIMEOUT)
    except ProcessLookupError:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # a child that outlived the server
    except ProcessLookupError:
        pass
