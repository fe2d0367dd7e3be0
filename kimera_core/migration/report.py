"""What a migration run did, as typed reports, and the read-only views of past runs.

``MigrationReport`` is the hand-off from the core to its front ends: the CLI prints it,
Dagster publishes ``to_dict()`` whole as JSON metadata and the metrics code rebuilds it with
``from_dict`` (the exact inverse), so nothing is flattened into strings and parsed back. It
carries the run's totals and each partition's own counts (``PartitionCounts``).

The reconciliation a report states: legacy rows = migrated (inserted + updated) + already
present (unchanged + kept) + quarantined, over the whole legacy tables.

The quarantine's standing now: a row is current until a later run judges its key again
(``cleared_by``); a current scar row for ``WAITING_REASONS`` waits for migration work (its
geoid's partition), not for a repair: ``waiting_scars`` counts them, and
``settled_quarantine_keys_sql`` lists the keys the quarantine accounts for without them,
which is what the consistency gates may forgive.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import duckdb

from kimera_core.migration.statements import WAITING_REASONS
from kimera_core.sql import table_exists

COUNT_NAMES: tuple[str, ...] = ("read", "inserted", "updated", "unchanged", "kept", "quarantined")


@dataclass
class MigrationCounts:
    """Row counts of a run or partition; read = inserted+updated+unchanged+kept+quarantined."""

    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    kept: int = 0
    quarantined: int = 0

    @property
    def changes(self) -> int:
        return self.inserted + self.updated

    @property
    def already_present(self) -> int:
        return self.unchanged + self.kept

    @property
    def balanced(self) -> bool:
        return self.read == self.changes + self.already_present + self.quarantined

    def add(self, other: MigrationCounts) -> None:
        for name in COUNT_NAMES:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, int]:
        """The six counts plus the derived ``changes`` and ``already_present``."""
        return {**asdict(self), "changes": self.changes, "already_present": self.already_present}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MigrationCounts:
        """The inverse of ``to_dict`` (derived keys are ignored); KeyError if a count is missing."""
        return cls(**{name: int(data[name]) for name in COUNT_NAMES})


@dataclass
class PartitionCounts:
    """One partition's own counts: the legacy rows of ``kind`` whose key hashes to ``bucket``.

    ``skipped``: done by an earlier attempt of a resumed run; its counts are the ones that
    attempt recorded in ``kimera_migration_partitions``.
    """

    kind: str
    bucket: int
    counts: MigrationCounts
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "bucket": self.bucket,
            "counts": self.counts.to_dict(),
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionCounts:
        """The inverse of ``to_dict``."""
        return cls(
            kind=str(data["kind"]),
            bucket=int(data["bucket"]),
            counts=MigrationCounts.from_dict(data["counts"]),
            skipped=bool(data.get("skipped", False)),
        )


@dataclass
class MigrationReport:
    """What a run did, for the CLI, Dagster metadata, the metrics and the reconciliation check.

    ``seconds`` is the run's wall time in seconds; ``partition_counts`` lists every
    partition of the run in the order it ran (geoid buckets, then scar buckets, then the
    ``waiting_scar`` second looks of a run of selected buckets). ``waiting``: scars left in
    quarantine after the run waiting for a geoid not yet judged (``related_geoid_pending``),
    over the whole database: 0 once every bucket ran. ``rows_skipped``: legacy rows a full
    run did not judge again because their inputs are unchanged since the last full run
    (``migration.fingerprints``); they are counted by that judgement (unchanged, kept or
    quarantined), and ``quarantine_reasons`` and ``warnings`` count only the rows judged.
    """

    run_id: str
    dry_run: bool
    resumed: bool
    partitions: int
    counts: MigrationCounts
    legacy_rows: int
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    partitions_skipped: int = 0
    seconds: float = 0.0
    identities_checksum: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"
    partition_counts: list[PartitionCounts] = field(default_factory=list)
    waiting: int = 0
    rows_skipped: int = 0

    @property
    def balanced(self) -> bool:
        """legacy rows = migrated + already present + quarantined, over the whole tables."""
        return self.counts.balanced and self.counts.read == self.legacy_rows

    @property
    def rows_per_second(self) -> float:
        return self.counts.read / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus the derived ``balanced`` and ``rows_per_second``."""
        data = asdict(self)
        data["counts"] = self.counts.to_dict()
        data["partition_counts"] = [p.to_dict() for p in self.partition_counts]
        data["balanced"] = self.balanced
        data["rows_per_second"] = round(self.rows_per_second, 1)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MigrationReport:
        """The exact inverse of ``to_dict`` (derived keys are ignored); KeyError if one is missing."""
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["counts"] = MigrationCounts.from_dict(data["counts"])
        values["partition_counts"] = [
            PartitionCounts.from_dict(p) for p in data.get("partition_counts", [])
        ]
        for name in ("quarantine_reasons", "warnings", "identities_checksum"):
            values[name] = dict(data.get(name, {}))
        return cls(**values)


# (partition number of total, kind, bucket, its counts): called after each partition
ProgressCallback = Callable[[int, int, str, int, MigrationCounts], None]

REASON_COUNTS_SQL = """
SELECT source_table || ':' || reason, count(*) FROM kimera_quarantine
WHERE run_id = ? GROUP BY ALL ORDER BY 1
"""

WARNING_COUNTS_SQL = """
SELECT source_table || ':' || w, count(*) FROM kimera_migration_warnings,
       LATERAL (SELECT unnest(CAST(warnings AS TEXT[])) AS w)
WHERE run_id = ? GROUP BY ALL ORDER BY 1
"""

RUN_HISTORY_SQL = """
SELECT r.run_id, r.status, r.started_at, r.finished_at, r.partitions,
       (SELECT count(*) FROM kimera_migration_partitions p
        WHERE p.run_id = r.run_id AND p.kind IN ('geoid', 'scar')),
       r.counts, r.identities_rows, r.identities_checksum
FROM kimera_migration_runs r ORDER BY r.started_at DESC LIMIT ?
"""

LATEST_RUN_SQL = """
SELECT run_id FROM kimera_migration_runs WHERE status <> 'rolled_back'
ORDER BY started_at DESC LIMIT 1
"""

QUARANTINE_BY_REASON_SQL = """
SELECT source_table, reason, count(*), list(key ORDER BY key)[1:?]
FROM kimera_quarantine WHERE run_id = ? GROUP BY ALL ORDER BY 1, 2
"""


def reason_counts(
    con: duckdb.DuckDBPyConnection, run_id: str
) -> tuple[dict[str, int], dict[str, int]]:
    """({'table:reason': rows quarantined}, {'table:warning': rows migrated with it}) of a run."""
    reasons = dict(con.execute(REASON_COUNTS_SQL, [run_id]).fetchall())
    warnings = dict(con.execute(WARNING_COUNTS_SQL, [run_id]).fetchall())
    return reasons, warnings


def run_history(con: duckdb.DuckDBPyConnection, limit: int = 20) -> list[dict[str, Any]]:
    """Recent runs, newest first, with their progress (partitions done of total)."""
    if not table_exists(con, "kimera_migration_runs"):
        return []
    return [
        {
            "run_id": r[0],
            "status": r[1],
            "started_at": r[2],
            "finished_at": r[3],
            "partitions_total": 2 * int(r[4]),
            "partitions_done": int(r[5]),
            "counts": json.loads(r[6]) if r[6] else None,
            "identities_rows": r[7],
            "identities_checksum": r[8],
        }
        for r in con.execute(RUN_HISTORY_SQL, [limit]).fetchall()
    ]


def quarantine_summary(
    con: duckdb.DuckDBPyConnection, run_id: str | None = None, sample: int = 5
) -> dict[str, Any]:
    """Quarantined rows of a run (default: the latest run) by reason, with sample keys.

    Shape: ``{"run_id", "total", "reasons": {"table:reason": {"rows", "sample_keys"}}}``.
    """
    if run_id is None:
        row = con.execute(LATEST_RUN_SQL).fetchone()
        if row is None:
            return {"run_id": None, "total": 0, "reasons": {}}
        run_id = row[0]
    reasons: dict[str, Any] = {}
    for table, reason, count, keys in con.execute(
        QUARANTINE_BY_REASON_SQL, [sample, run_id]
    ).fetchall():
        reasons[f"{table}:{reason}"] = {"rows": int(count), "sample_keys": keys}
    return {"run_id": run_id, "total": sum(v["rows"] for v in reasons.values()), "reasons": reasons}


_WAITING = f"list_has_any(CAST(q.reasons AS TEXT[]), {list(WAITING_REASONS)!r})"
WAITING_SCARS_SQL = f"""
SELECT count(DISTINCT q.key) FROM kimera_quarantine q
WHERE q.source_table = 'legacy_scars' AND q.cleared_by IS NULL AND {_WAITING}
  AND q.key IN (SELECT id FROM legacy_scars)
"""

# Legacy keys the quarantine accounts for: current rows of runs not rolled back, except the
# scars waiting for migration work.
SETTLED_QUARANTINE_KEYS_SQL = f"""
SELECT DISTINCT q.key FROM kimera_quarantine q
JOIN kimera_migration_runs r ON r.run_id = q.run_id AND r.status <> 'rolled_back'
WHERE q.cleared_by IS NULL AND NOT {_WAITING}
"""
# A file whose quarantine predates cleared_by: every row of a run not rolled back counts.
_OLD_QUARANTINE_KEYS_SQL = """
SELECT DISTINCT q.key FROM kimera_quarantine q
JOIN kimera_migration_runs r ON r.run_id = q.run_id AND r.status <> 'rolled_back'
"""
_HAS_CLEARED_BY_SQL = """
SELECT count(*) > 0 FROM information_schema.columns
WHERE table_catalog = current_database() AND table_schema = 'main'
  AND table_name = 'kimera_quarantine' AND column_name = 'cleared_by'
"""


def waiting_scars(con: duckdb.DuckDBPyConnection) -> int:
    """Legacy scars waiting in quarantine for a geoid no run has judged yet; 0 if never migrated."""
    if not table_exists(con, "kimera_quarantine") or not _has_cleared_by(con):
        return 0
    return int(con.execute(WAITING_SCARS_SQL).fetchone()[0])


def settled_quarantine_keys_sql(con: duckdb.DuckDBPyConnection) -> str | None:
    """SQL (one column ``key``) of the legacy keys the quarantine accounts for now.

    None when the database was never migrated. Scars waiting for migration work
    (``WAITING_REASONS``) are left out, so a gate that forgives quarantined keys holds while
    one waits; superseded rows (``cleared_by``) are left out too.
    """
    if not table_exists(con, "kimera_quarantine"):
        return None
    return SETTLED_QUARANTINE_KEYS_SQL if _has_cleared_by(con) else _OLD_QUARANTINE_KEYS_SQL


def _has_cleared_by(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(con.execute(_HAS_CLEARED_BY_SQL).fetchone()[0])
