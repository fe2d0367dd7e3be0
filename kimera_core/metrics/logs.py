"""Structured JSON log lines: one object per identity stored and per storage write.

Identity ids, run ids and free text never become Prometheus labels (their number is
unbounded); they go here instead, through ``logging``:

* ``kimera.entropy`` (INFO): ``{"evt": "entropy", "id", "identity_type", "entropy", "tau"}``
  for every identity stored one at a time;
* ``kimera.storage`` (INFO, WARNING on failure): ``{"evt": "storage_write", "id",
  "operation", "write_mode", "outcome", "rows", "seconds", "error"?}``.

Nothing is formatted unless the logger is enabled for INFO, so the write path pays for a
line only when someone reads it. ``enable_json_logs`` sends both loggers to a stream, each
line a JSON object with ``ts`` (Unix seconds) and ``logger`` added.
"""

from __future__ import annotations

import json
import logging
from typing import Any

ENTROPY_LOG = logging.getLogger("kimera.entropy")
STORAGE_LOG = logging.getLogger("kimera.storage")


def log_entropy(identity_id: str, identity_type: str, entropy: float | None, tau: float) -> None:
    """The ``kimera.entropy`` line of one stored identity (entropy in bits, tau in seconds)."""
    if not ENTROPY_LOG.isEnabledFor(logging.INFO):
        return
    ENTROPY_LOG.info(
        json.dumps(
            {
                "evt": "entropy",
                "id": identity_id,
                "identity_type": identity_type,
                "entropy": entropy,
                "tau": tau,
            }
        )
    )


def log_storage_write(
    identity_id: str | None,
    operation: str,
    write_mode: str,
    outcome: str,
    seconds: float,
    rows: int = 1,
    error: str | None = None,
) -> None:
    """A structured line for one storage write (``kimera.storage``), when INFO is enabled."""
    if not STORAGE_LOG.isEnabledFor(logging.INFO):
        return
    line: dict[str, Any] = {
        "evt": "storage_write",
        "id": identity_id,
        "operation": operation,
        "write_mode": write_mode,
        "outcome": outcome,
        "rows": rows,
        "seconds": round(seconds, 6),
    }
    if error is not None:
        line["error"] = error
    STORAGE_LOG.log(logging.WARNING if outcome == "failure" else logging.INFO, json.dumps(line))


class JsonLineFormatter(logging.Formatter):
    """Passes the JSON message through, adding the time and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            payload = json.loads(record.getMessage())
        except ValueError:
            payload = {"msg": record.getMessage()}
        if not isinstance(payload, dict):
            payload = {"msg": payload}
        return json.dumps({"ts": round(record.created, 6), "logger": record.name, **payload})


def enable_json_logs(stream: Any = None, level: int = logging.INFO) -> logging.Handler:
    """Send ``kimera.entropy`` and ``kimera.storage`` lines as JSON to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    for logger in (ENTROPY_LOG, STORAGE_LOG):
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return handler
