"""Shadow reads in the manner of GitHub's Scientist: the legacy answer is served, the new one compared.

While the legacy store stays authoritative, a sampled share of reads is also served from the
new store. The two answers are compared field by field by ``kimera_core.compare`` (the rules
the consistency verifier states in SQL: NULL-safe, floats at a tolerance, JSON as values); a
mismatch is counted and recorded in ``kimera_shadow_mismatches`` with the identity id and the
differing field names. Nothing the new side does reaches the caller: its exceptions are
counted and recorded, and a failure to record is counted too.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import duckdb

from kimera_core import metrics
from kimera_core.compare import DEFAULT_TOLERANCE, Tolerance, compare_reads

T = TypeVar("T")

SHADOW_DDL = """CREATE TABLE IF NOT EXISTS kimera_shadow_mismatches (
    "at" DOUBLE NOT NULL,
    identity_id TEXT,
    operation TEXT NOT NULL,
    kind TEXT NOT NULL,
    fields JSON,
    error TEXT
)"""


@dataclass
class ShadowCounters:
    """What the shadow experiment has seen since the process started."""

    reads: int = 0
    sampled: int = 0
    matched: int = 0
    mismatched: int = 0
    errors: int = 0
    record_failures: int = 0


class ShadowReads:
    """A Scientist-style experiment: serve the control, sample and compare the candidate."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        sample_rate: float = 0.01,
        *,
        tolerance: Tolerance = DEFAULT_TOLERANCE,
        rng: Callable[[], float] = random.random,
        record: bool = True,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in [0, 1], got {sample_rate!r}")
        self.con = con
        self.sample_rate = sample_rate
        self.tolerance = tolerance
        self.rng = rng
        self.record = record
        self.counters = ShadowCounters()
        if record:
            con.execute(SHADOW_DDL)

    def run(
        self,
        operation: str,
        control: Callable[[], T],
        candidate: Callable[[], T],
        key: str | None = None,
    ) -> T:
        """Return control(); for a sampled share also run candidate() and record differences."""
        result = control()  # the authoritative path: its exceptions are the caller's
        self.counters.reads += 1
        if self.sample_rate <= 0.0 or self.rng() >= self.sample_rate:
            return result
        self.counters.sampled += 1
        try:
            observed = candidate()
            found = compare_reads(result, observed, self.tolerance)  # type: ignore[arg-type]
        except Exception as exc:  # the new side must never reach the caller
            self.counters.errors += 1
            metrics.SHADOW_READS.labels(operation, "error").inc()
            self._record(operation, [(key, None)], "error", f"{type(exc).__name__}: {exc}")
            return result
        if found:
            self.counters.mismatched += 1
            metrics.SHADOW_READS.labels(operation, "mismatch").inc()
            for fields in found.values():
                for name in fields:
                    metrics.SHADOW_MISMATCHED_FIELDS.labels(name).inc()
            self._record(operation, list(found.items()), "mismatch", None)
        else:
            self.counters.matched += 1
            metrics.SHADOW_READS.labels(operation, "match").inc()
        return result

    def _record(
        self,
        operation: str,
        items: list[tuple[str | None, list[str] | None]],
        kind: str,
        error: str | None,
    ) -> None:
        if not self.record:
            return
        now = time.time()
        try:
            self.con.executemany(
                "INSERT INTO kimera_shadow_mismatches VALUES (?, ?, ?, ?, ?, ?)",
                [
                    [now, key, operation, kind, None if f is None else json.dumps(f), error]
                    for key, f in items
                ],
            )
        except Exception:  # recording is best effort: the read has been served already
            self.counters.record_failures += 1
            metrics.SHADOW_RECORD_FAILURES.inc()


def mismatch_summary(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """Recorded shadow mismatches and errors: totals and counts per field."""
    try:
        total, mismatches, errors = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE kind = 'mismatch'), "
            "count(*) FILTER (WHERE kind = 'error') FROM kimera_shadow_mismatches"
        ).fetchone()
        per_field = con.execute(
            "SELECT f, count(*) FROM (SELECT unnest(fields::VARCHAR[]) AS f "
            "FROM kimera_shadow_mismatches WHERE kind = 'mismatch') GROUP BY f ORDER BY f"
        ).fetchall()
    except duckdb.CatalogException:
        return {"total": 0, "mismatches": 0, "errors": 0, "fields": {}}
    return {
        "total": total,
        "mismatches": mismatches,
        "errors": errors,
        "fields": dict(per_field),
    }
