"""A real ``kimera db serve`` process for tests: started on 127.0.0.1, stopped by its PID.

``DbServer(path, token).start()`` runs the command on a free port (``--port 0``, or the
port of an earlier run of the same server for a restart) and reads the address from the
first stdout line; ``stop()`` sends SIGTERM to that PID (a clean stop: clients dropped, file
checkpointed), ``kill()`` SIGKILL (a crash: DuckDB replays the WAL at the next start).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

KIMERA = str(Path(sys.executable).parent / "kimera")
START_TIMEOUT = 60.0


class DbServer:
    """One ``kimera db serve --db path`` process at a time (restartable on the same port)."""

    def __init__(
        self, path: Path, token: str, log: Path | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.path = Path(path)
        self.args = args
        self.token = token
        self.log = log or self.path.with_suffix(".server.log")
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.port = 0

    def start(self) -> str:
        env = {**os.environ, "KIMERA_DB_TOKEN": self.token}
        with self.log.open("a", encoding="utf-8") as err:
            self.proc = subprocess.Popen(
                [
                    KIMERA,
                    "db",
                    "serve",
                    "--db",
                    str(self.path),
                    "--port",
                    str(self.port),
                    *self.args,
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
            )
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.startswith("kimera://"):
            self.kill()
            raise RuntimeError(f"the server did not start: {line!r}; {self.log.read_text()}")
        self.address = line
        self.port = int(line.rsplit(":", 1)[1])
        return line

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM by PID and wait; SIGKILL if it does not stop in time; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL by PID (a crash) and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
