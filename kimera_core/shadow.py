"""Shadow reads in the manner of GitHub's Scientist: the legacy answer is served, the new one compared.

While the legacy store stays authoritative, a sampled share of reads is also served from the
new store. The two answers are compared field by field (the same rules as the consistency
verifier: NULL-safe, floats at a tolerance, JSON as values); a mismatch is counted and
recorded in ``kimera_shadow_mismatches`` with the identity id and the differing field names.
Nothing the new side does reaches the caller: its exceptions are counted and recorded, and a
failure to record is counted too.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import duckdb

from kimera_core import metrics
from kimera_core.identity import DOCUMENT_KEYS, Identity

T = TypeVar("T")

COMPARED_FIELDS: tuple[str, ...] = DOCUMENT_KEYS[1:]  # every field but the key
JSON_FIELDS = frozenset({"tags", "related_ids", "meta"})
TIME_FIELDS = frozenset({"created_at", "updated_at"})
MISSING_IN_NEW = "<missing in new>"
MISSING_IN_LEGACY = "<missing in legacy>"

SHADOW_DDL = """CREATE TABLE IF NOT EXISTS kimera_shadow_mismatches (
    "at" DOUBLE NOT NULL,
    identity_id TEXT,
    operation TEXT NOT NULL,
    kind TEXT NOT NULL,
    fields JSON,
    error TEXT
)"""


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far two values may differ and still be equal (docs/consistency.md)."""

    # weight: |a - b| <= weight_relative * max(1, |a|)
    weight_relative: float = 1e-9
    # created_at / updated_at, in seconds: microseconds are what the P1 document carries
    seconds: float = 1e-6


DEFAULT_TOLERANCE = Tolerance()


def json_equal(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values: object key order ignored, 1 == 1.0, true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _float_equal(a: Any, b: Any, tolerance: float, relative: bool) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if a == b:
        return True
    return abs(a - b) <= tolerance * (max(1.0, abs(a)) if relative else 1.0)


def differing_fields(
    legacy: Identity | None, new: Identity | None, tolerance: Tolerance = DEFAULT_TOLERANCE
) -> list[str]:
    """Names of the ADR-001 fields on which two reads of one identity differ."""
    if legacy is None and new is None:
        return []
    if new is None:
        return [MISSING_IN_NEW]
    if legacy is None:
        return [MISSING_IN_LEGACY]
    out = []
    for name in COMPARED_FIELDS:
        a, b = getattr(legacy, name), getattr(new, name)
        if name == "weight":
            same = _float_equal(a, b, tolerance.weight_relative, relative=True)
        elif name in TIME_FIELDS:
            same = _float_equal(a, b, tolerance.seconds, relative=False)
        elif name == "related_ids" and legacy.identity_type == "geoid":
            # legacy_geoids cannot hold related ids: its null stands for the empty list
            same = json_equal([] if a is None else a, [] if b is None else b)
        elif name in JSON_FIELDS:
            same = json_equal(a, b)
        else:
            same = a == b
        if not same:
            out.append(name)
    return out


def compare_reads(
    legacy: Identity | list[Identity] | None,
    new: Identity | list[Identity] | None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> dict[str | None, list[str]]:
    """Differences between two answers (one identity or a list), keyed by identity id."""
    if isinstance(legacy, list) or isinstance(new, list):
        left = {i.id: i for i in legacy or []}
        right = {i.id: i for i in new or []}
        found = {}
        for key in left.keys() | right.keys():
            fields = differing_fields(left.get(key), right.get(key), tolerance)
            if fields:
                found[key] = fields
        return found
    fields = differing_fields(legacy, new, tolerance)
    if not fields:
        return {}
    return {(legacy or new).id: fields}  # type: ignore[union-attr]


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
