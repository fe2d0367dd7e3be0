"""Helpers for tests that start real servers on 127.0.0.1 and stop them."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster_graphql import DagsterGraphQLClient

from kimera_core.demo import generate_demo_data

ROOT = Path(__file__).resolve().parents[2]


def require_binary(name: str, package: str) -> str:
    """Path of a binary; missing fails under CI=true and skips otherwise."""
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found (install the Debian package {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the whole group (dagster dev has children), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}: {last_error!r}")


@contextlib.contextmanager
def recording_pushgateway() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """A stand-in Pushgateway on a free port: (address, [(method, path, body), ...]).

    Answers every PUT and POST with 200 and records it, so a test sees exactly what a push
    sent without the Debian binary (the e2e test runs the real one).
    """
    pushes: list[tuple[str, str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            pushes.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        do_PUT = do_POST = _record  # noqa: N815 - http.server's naming

        def log_message(self, *args) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", pushes
    finally:
        server.shutdown()
        server.server_close()


# --- a real `dagster dev`, shared by the e2e and browser tests -----------------------------------
DAGSTER_LOCATION = "kimera_pipelines.definitions"
_DAGSTER_DEV: dict[str, object] = {}


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    """POST a GraphQL query to the webserver; errors fail the caller."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=20) as resp:
        payload = json.loads(resp.read())
    assert "errors" not in payload, payload
    return payload["data"]


def start_dagster_dev(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int, Path]:
    """(process, port, log path) of a new `dagster dev` with DAGSTER_HOME under ``tmp``.

    ``env`` is added to this process's environment (``KIMERA_DB``: a file or a database
    server's address, ``KIMERA_DB_TOKEN``, ...). Waits until the webserver answers and the
    code location is loaded; the caller stops it with ``stop_process_group`` (the log file
    stays open in the child only).
    """
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    log_path = tmp / "dagster_dev.log"
    dagster = Path(sys.executable).parent / "dagster"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                str(dagster),
                "dev",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                str(ROOT / "workspace.yaml"),
            ],
            cwd=ROOT,
            env={**os.environ, "DAGSTER_HOME": str(home), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).status
                == 200
            ),
            timeout=180,
            what="dagster webserver",
        )
        wait_until(
            lambda: graphql(
                port,
                "{ repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }",
            )["repositoriesOrError"]["nodes"],
            timeout=120,
            what="code location",
        )
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, port, log_path


def shared_dagster_dev(request, tmp_path_factory):
    """(port, db path, log path) of one `dagster dev` for the whole session, started on demand.

    The first caller starts it over a fresh demo database; a session finalizer stops it.
    """
    if "port" in _DAGSTER_DEV:
        return _DAGSTER_DEV["port"], _DAGSTER_DEV["db"], _DAGSTER_DEV["log"]
    tmp = tmp_path_factory.mktemp("dagster_dev")
    db = tmp / "kimera.duckdb"
    generate_demo_data(db, geoids=1000, scars=400, seed=11, broken_share=0.02)
    proc, port, log_path = start_dagster_dev(tmp, {"KIMERA_DB": str(db)})

    def stop() -> None:
        stop_process_group(proc)
        _DAGSTER_DEV.clear()

    request.addfinalizer(stop)
    _DAGSTER_DEV.update(port=port, db=db, log=log_path)
    return port, db, log_path


def launch_run(port: int, job: str, tags: dict[str, str] | None = None, run_config=None) -> str:
    """Launch a job through Dagster's GraphQL Python client; returns the run id."""
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    return client.submit_job_execution(
        job,
        repository_location_name=DAGSTER_LOCATION,
        repository_name="__repository__",
        run_config=run_config or {},
        tags=tags or {},
    )


def wait_for_run(port: int, run_id: str, timeout: float = 240) -> str:
    """The final status of a run (SUCCESS, FAILURE or CANCELED)."""
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)

    def finished():
        status = client.get_run_status(run_id).value
        return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

    return wait_until(finished, timeout=timeout, interval=1, what=f"run {run_id} to finish")


def check_executions(port: int, check: str, asset: str = "identities", limit: int = 1) -> list:
    """The latest executions of an asset check, with their evaluation and metadata."""
    data = graphql(
        port,
        """query($key: AssetKeyInput!, $check: String!, $limit: Int!) {
             assetCheckExecutions(assetKey: $key, checkName: $check, limit: $limit) {
               runId status evaluation { success description metadataEntries { label
                 ... on JsonMetadataEntry { jsonString }
                 ... on TextMetadataEntry { text } } } } }""",
        {"key": {"path": [asset]}, "check": check, "limit": limit},
    )
    return data["assetCheckExecutions"]


def run_logs(port: int, run_id: str) -> list[str]:
    """Every event message of a run (step logs, engine events), a step failure's error after it."""
    data = graphql(
        port,
        """query($runId: ID!) { logsForRun(runId: $runId, limit: 10000) {
             ... on EventConnection { events {
               ... on MessageEvent { message }
               ... on ExecutionStepFailureEvent { error { message } } } } } }""",
        {"runId": run_id},
    )
    lines = []
    for event in data["logsForRun"]["events"]:
        lines.append(event.get("message") or "")
        if event.get("error"):
            lines.append(event["error"]["message"])
    return lines


# --- a real `kimera db serve` (server mode, docs/deployment.md) ----------------------------------
@contextlib.contextmanager
def kimera_db_server(db: Path, token: str, log_path: Path) -> Iterator[tuple[str, int]]:
    """(address, pid) of `kimera db serve --db db` on a free 127.0.0.1 port; stopped by PID.

    The token goes through ``KIMERA_DB_TOKEN`` (never the command line); the server's
    stderr goes to ``log_path``. On exit: SIGTERM to its PID (clients dropped, the file
    checkpointed and closed), SIGKILL if it has not stopped within 30 s.
    """
    kimera = Path(sys.executable).parent / "kimera"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(kimera), "db", "serve", "--db", str(db), "--port", "0"],
            env={**os.environ, "KIMERA_DB_TOKEN": token},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        address = proc.stdout.readline().strip() if ready else ""
        if not address.startswith("kimera://"):
            raise RuntimeError(f"kimera db serve did not start: {address!r}")
        yield address, proc.pid
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        proc.stdout.close()
