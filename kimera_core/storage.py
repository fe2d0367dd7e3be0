"""The storage API the Kimera application writes identities through, routed by the rollout stage.

``Storage`` stores, fetches, deletes, lists and searches identities. The rollout stage
(``kimera_core.rollout``) decides where writes go (legacy only, both, new only) and where
reads come from; in the dual-write stages a sampled share of reads is shadowed on the new
store (``kimera_core.shadow``).

A write to both stores is one DuckDB transaction on one connection (both stores live in the
same file, ``kimera_core.db.transaction``): the new-store row, the legacy row and the
``dual_write_log`` row commit together or not at all. A failed write is rolled back, then
recorded as ``failed`` in its own transaction, and raised as ``DualWriteError``. (Sending
``BEGIN`` in one round trip with the first INSERT was measured: 0.02 ms of a 2.1 ms write,
1 % at the median and nothing on the mean, so writes use the one transaction helper.)

Values are carried exactly or refused, by the migration's rules (docs/migration.md, "Values
carried exactly or refused"): a single write is checked by ``identity.value_refusals``, a
batch by the same rules in SQL (``kimera_core.sql``'s value macros); a refused write raises
``StorageError`` naming the migration's quarantine reason, after a ``failed`` log row. A
write that changes an id's type (a scar id stored as a geoid) removes the old legacy row of
the other type in the same transaction, as ``delete`` removes both.

A batch (``store_arrow``) is checked in one query, then written set-based straight from the
registered Arrow table, one ``INSERT ... SELECT`` per table and one for its log rows (one per
identity, as P1 writes them), all in one transaction. The document's ISO timestamps are
formatted in SQL by ``kimera_core.sql``'s macros; the few those cannot write exactly go
through ``identity.epoch_to_iso`` by way of ``sql.epoch_iso_fixes`` (as the migration's do).

Reads in the legacy stages read the legacy tables as identities through ``kimera_core.legacy``
(the same read ``kimera_core.query`` serves); from ``read-new`` on they read P1 documents.

DuckDB allows one writer process per file: a ``Storage`` holds one connection, and the
application keeps one ``Storage`` per process. It is not safe to share between threads
without a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter
from typing import Any, NoReturn

import duckdb
import pyarrow as pa

from kimera_core import metrics
from kimera_core.db import is_conflict, open_database, transaction
from kimera_core.entropy import (
    entropy_union_sql,
    geoid_entropy_sql,
    identity_entropy,
    scar_entropy_sql,
)
from kimera_core.errors import KimeraError
from kimera_core.identity import (
    DOCUMENT_KEYS,
    IDENTITY_TYPES,
    VALUE_RULES,
    ConversionError,
    Identity,
    value_refusals,
)
from kimera_core.legacy import (
    GEOID_COLUMNS,
    IDENTITY_ROW_COLUMNS,
    LEGACY_IDENTITIES_ENTROPY_SQL,
    LEGACY_IDENTITIES_SQL,
    LEGACY_IDENTITY_FIELDS,
    SCAR_COLUMNS,
    create_legacy_schema,
    fetch_legacy_identity,
    geoid_to_row,
    identities_row,
    identity_from_legacy_row,
    read_identity_p1,
    scar_to_row,
)
from kimera_core.rollout import Routing, get_stage, routing
from kimera_core.shadow import ShadowReads
from kimera_core.sql import (
    epoch_iso_fixes,
    epoch_iso_sql,
    install_epoch_iso_macros,
    install_value_macros,
    p1_document_sql,
)

# The fault-injection points of a write, in the order a write passes them.
WRITE_STEPS: tuple[str, ...] = (
    "after_new_store",
    "after_legacy_store",
    "before_log",
    "before_commit",
)

# Store names as P1 wrote them in dual_write_log.details.stores.
# Through a database server the application's write runs beside other transactions (a
# migration partition holding the same rows for its whole transaction): DuckDB aborts the
# write at once on such a conflict, with no waiting. The write runs again (rolled back
# first), 10 ms, 20 ms ... apart, capped, for longer than a served partition holds its rows.
CONFLICT_RETRY_SECONDS = 30.0
CONFLICT_BACKOFF_CAP_SECONDS = 0.5
NEW_STORE = "identities"
LEGACY_STORE = "legacy"

# A single write's INSERTs are spelled INSERT ... SELECT ?: DuckDB plans a one-row SELECT
# cheaper than a VALUES list (measured 0.07-0.10 ms less per statement, about 20 %; same
# parameters, same stored values).
IDENTITY_INSERT = f"INSERT INTO identities ({IDENTITY_ROW_COLUMNS}) SELECT ?, ?, ?, ?, ?, ?, ?"
GEOID_INSERT = f"INSERT INTO legacy_geoids ({GEOID_COLUMNS}) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?"
SCAR_INSERT = f"INSERT INTO legacy_scars ({SCAR_COLUMNS}) SELECT ?, ?, ?, ?, ?, ?"
# A single write's legacy insert inserts nothing while the other legacy table holds the id
# (a type change), and the write then takes the replacing path, which deletes that row.
# Measured: the guard costs 0.18 ms a write, a DELETE of the other table in every write 0.32.
GUARDED_GEOID_INSERT = (
    f"INSERT INTO legacy_geoids ({GEOID_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 "
    "WHERE NOT EXISTS (SELECT 1 FROM legacy_scars WHERE id = $1)"
)
GUARDED_SCAR_INSERT = (
    f"INSERT INTO legacy_scars ({SCAR_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6 "
    "WHERE NOT EXISTS (SELECT 1 FROM legacy_geoids WHERE gid = $1)"
)
GUARDED_INSERTS = frozenset({GUARDED_GEOID_INSERT, GUARDED_SCAR_INSERT})
IDENTITY_DELETE = "DELETE FROM identities WHERE id = ?"
GEOID_DELETE = "DELETE FROM legacy_geoids WHERE gid = ?"
SCAR_DELETE = "DELETE FROM legacy_scars WHERE id = ?"
LOG_INSERT = (
    "INSERT INTO dual_write_log (timestamp, identity_id, operation, status, details) "
    "SELECT ?, ?, ?, ?, ?"
)


# --- batch writes: set-based, straight from a registered Arrow table ------------------------
# Every statement reads the registered batch through the same typed projection (a CTE over
# the zero-copy Arrow scan): no temp table or view is created per batch. The identities
# statement reads the projection three times (rows, geoid and scar entropy); DuckDB keeps it
# in memory once, measured cheaper than three scans (NOT MATERIALIZED).
BATCH_VIEW = "kimera_storage_batch"
BATCH_COLUMNS: tuple[str, ...] = DOCUMENT_KEYS

_BATCH_SRC = f"""kimera_src AS (
    SELECT id::VARCHAR AS id, identity_type::VARCHAR AS identity_type, raw::VARCHAR AS raw,
           echo::VARCHAR AS echo, lang_axis::VARCHAR AS lang_axis, tags::VARCHAR AS tags,
           weight::DOUBLE AS weight, related_ids::VARCHAR AS related_ids, meta::VARCHAR AS meta,
           coalesce(updated_at::DOUBLE, $now) AS updated_at,
           coalesce(created_at::DOUBLE, updated_at::DOUBLE, $now) AS created_at
    FROM {BATCH_VIEW}
)"""
_TYPE_LIST = ", ".join(f"'{t}'" for t in IDENTITY_TYPES)  # constants, never input
# The batch's timestamps, for sql.epoch_iso_fixes (the few the ISO macros cannot write).
BATCH_EPOCHS_SQL = f"""
WITH {_BATCH_SRC}
SELECT created_at FROM kimera_src UNION ALL SELECT updated_at FROM kimera_src
"""
# Everything a batch is refused for, in one pass over it: first its shape (BATCH_SHAPE_COUNTS:
# duplicate and null ids, types, a geoid without raw text, scar fields legacy_scars cannot
# hold, timestamps), then the value rules of identity.value_refusals in SQL (the migration's,
# kimera_core.sql; BATCH_VALUE_REASONS, rows per quarantine reason); each part ends with one id
# that breaks it. NaN/Infinity in a JSON text column also fail these checks. Measured: one
# pass instead of a shape query and a value query, and meta.terms extracted only where the
# meta text hints at a non-finite number (terms is part of meta, so it cannot hold one where
# meta does not), cut the check from 150 to 65 ms of CPU per 100k geoids.
BATCH_CHECK_SQL = f"""
WITH {_BATCH_SRC}, kimera_checked AS (
    SELECT id, identity_type, raw,
        identity_type = 'scar' AND (raw IS NOT NULL OR echo IS NOT NULL
            OR lang_axis IS NOT NULL OR (tags IS NOT NULL AND tags <> '[]')) AS scar_fields,
        NOT (isfinite(created_at) AND isfinite(updated_at)) AS bad_time,
        coalesce(json_type(meta) <> 'OBJECT' AND NOT kimera_json_falsy(meta), false)
            AS non_object_meta,
        coalesce(json_type(tags) <> 'ARRAY' AND NOT kimera_json_falsy(tags), false)
            AS non_list_tags,
        identity_type = 'geoid' AND (raw IS NULL OR kimera_py_strip(raw) = '') AS empty_raw,
        NOT isfinite(weight) AS non_finite_weight,
        CASE WHEN identity_type = 'geoid' AND kimera_non_finite_hint(meta)
             THEN kimera_terms_non_finite(TRY(json_extract(meta, '$.terms')))
             ELSE false END AS non_finite_intensity,
        kimera_json_non_finite(meta) OR kimera_json_non_finite(tags)
            OR kimera_json_non_finite(related_ids) AS non_finite_number,
        (isfinite(created_at) AND NOT kimera_epoch_in_range(created_at))
            OR (isfinite(updated_at) AND NOT kimera_epoch_in_range(updated_at))
            AS timestamp_out_of_range
    FROM kimera_src
)
SELECT count(*) - count(DISTINCT id),
       count(*) FILTER (WHERE id IS NULL),
       count(*) FILTER (WHERE identity_type IS NULL OR identity_type NOT IN ({_TYPE_LIST})),
       count(*) FILTER (WHERE identity_type = 'geoid' AND raw IS NULL),
       count(*) FILTER (WHERE scar_fields),
       count(*) FILTER (WHERE bad_time),
       min(id) FILTER (WHERE identity_type = 'geoid' AND raw IS NULL),
       count(*) FILTER (WHERE non_object_meta),
       count(*) FILTER (WHERE non_list_tags),
       count(*) FILTER (WHERE empty_raw),
       count(*) FILTER (WHERE non_finite_weight),
       count(*) FILTER (WHERE non_finite_intensity),
       count(*) FILTER (WHERE non_finite_number),
       count(*) FILTER (WHERE timestamp_out_of_range),
       min(id) FILTER (WHERE non_object_meta OR non_list_tags OR empty_raw OR non_finite_weight
                       OR non_finite_intensity OR non_finite_number OR timestamp_out_of_range)
FROM kimera_checked
"""
BATCH_SHAPE_COUNTS = 7  # the first seven columns of BATCH_CHECK_SQL: the shape, then an id
BATCH_VALUE_REASONS: tuple[str, ...] = (
    "non_object_meta",
    "non_list_tags",
    "empty_raw",
    "non_finite_weight",
    "non_finite_intensity",
    "non_finite_number",
    "timestamp_out_of_range",
)


def _batch_identity_insert(fixes: bool) -> str:
    entropy = entropy_union_sql(
        geoid_entropy_sql("kimera_batch_geoids", "id", "meta", "tags"),
        scar_entropy_sql("kimera_batch_scars", "id", "related_ids", "weight"),
    )
    created = epoch_iso_sql("p.created_at", fixes=fixes)
    updated = epoch_iso_sql("p.updated_at", fixes=fixes)
    # a new identity's two timestamps are equal: the text is formatted once (the optimizer
    # computes the repeated expression once)
    document = p1_document_sql(
        id="p.id",
        identity_type="p.identity_type",
        raw="p.raw",
        echo="p.echo",
        lang_axis="p.lang_axis",
        tags="p.tags::JSON",
        weight="p.weight",
        related_ids="p.related_ids::JSON",
        meta="p.meta::JSON",
        created_at=created,
        updated_at=f"CASE WHEN p.updated_at = p.created_at THEN {created} ELSE {updated} END",
    )
    return f"""
INSERT INTO identities ({IDENTITY_ROW_COLUMNS})
WITH {_BATCH_SRC},
kimera_batch_geoids AS (SELECT id, meta, tags FROM kimera_src WHERE identity_type = 'geoid'),
kimera_batch_scars AS (
    SELECT id, related_ids, weight FROM kimera_src WHERE identity_type = 'scar'
),
kimera_batch_entropy AS ({entropy})
SELECT p.id, p.identity_type,
       {document},
       p.created_at, p.updated_at, p.lang_axis, e.entropy
FROM kimera_src p LEFT JOIN kimera_batch_entropy e ON e.key = p.id
"""


BATCH_IDENTITY_INSERT = _batch_identity_insert(fixes=False)
# with the epoch_iso_fixes view registered: every timestamp gets identity.epoch_to_iso's text
BATCH_IDENTITY_INSERT_WITH_FIXES = _batch_identity_insert(fixes=True)
BATCH_GEOID_INSERT = f"""
INSERT INTO legacy_geoids ({GEOID_COLUMNS})
WITH {_BATCH_SRC}
SELECT id, raw, echo, lang_axis, tags, weight, meta, created_at, updated_at
FROM kimera_src WHERE identity_type = 'geoid'
"""
BATCH_SCAR_INSERT = f"""
INSERT INTO legacy_scars ({SCAR_COLUMNS})
WITH {_BATCH_SRC}
SELECT id, weight, related_ids, meta, created_at, updated_at
FROM kimera_src WHERE identity_type = 'scar'
"""
# log_id comes from dual_write_log_seq per row, as P1 writes it: measured against one range
# of ids reserved up front, nextval costs nothing measurable in bulk, and stays correct
# beside other writers of the same sequence.
BATCH_LOG_INSERT = f"""
INSERT INTO dual_write_log (timestamp, identity_id, operation, status, details)
SELECT $now, id::VARCHAR, 'store', 'success',
       CASE identity_type::VARCHAR WHEN 'scar' THEN $scar::JSON ELSE $geoid::JSON END
FROM {BATCH_VIEW}
"""
BATCH_FAILURE_LOG_INSERT = f"""
INSERT INTO dual_write_log (timestamp, identity_id, operation, status, details)
SELECT $now, id::VARCHAR, 'store', 'failed',
       json_merge_patch($details, json_object('identity_type', identity_type::VARCHAR))
FROM {BATCH_VIEW} WHERE id IS NOT NULL
"""
BATCH_DELETES = {
    "identities": f"DELETE FROM identities WHERE id IN (SELECT id::VARCHAR FROM {BATCH_VIEW})",
    "legacy_geoids": f"DELETE FROM legacy_geoids WHERE gid IN "
    f"(SELECT id::VARCHAR FROM {BATCH_VIEW} WHERE identity_type::VARCHAR = 'geoid')",
    "legacy_scars": f"DELETE FROM legacy_scars WHERE id IN "
    f"(SELECT id::VARCHAR FROM {BATCH_VIEW} WHERE identity_type::VARCHAR = 'scar')",
}
# A batch row that changes its id's type: the legacy row of the other type goes.
BATCH_TYPE_CHANGE_DELETES: tuple[str, ...] = (
    f"DELETE FROM legacy_scars WHERE id IN "
    f"(SELECT id::VARCHAR FROM {BATCH_VIEW} WHERE identity_type::VARCHAR = 'geoid')",
    f"DELETE FROM legacy_geoids WHERE gid IN "
    f"(SELECT id::VARCHAR FROM {BATCH_VIEW} WHERE identity_type::VARCHAR = 'scar')",
)
# A single write's legacy row of the other type, by its id (the type-change rule).
OTHER_TYPE_DELETE = {"geoid": SCAR_DELETE, "scar": GEOID_DELETE}


class _TypeChange(Exception):
    """A guarded legacy insert found the id in the other legacy table: replace instead."""


STATS_TOTALS_SQL = """
SELECT count(*), count(*) FILTER (WHERE status = 'success'),
       count(*) FILTER (WHERE status = 'failed'), max(timestamp) FILTER (WHERE status = 'failed')
FROM dual_write_log
"""
STATS_STORES_SQL = """
SELECT store, status, count(*) FROM (
    SELECT status, unnest(TRY_CAST(json_extract(details, '$.stores') AS VARCHAR[])) AS store
    FROM dual_write_log
) GROUP BY ALL ORDER BY ALL
"""
STATS_OPERATIONS_SQL = (
    "SELECT operation, status, count(*) FROM dual_write_log GROUP BY ALL ORDER BY ALL"
)

Fault = Callable[[str], None]
# A write's steps: (fault-injection point, [(statement, parameters), ...]) in order.
Steps = list[tuple[str, list[tuple[str, Any]]]]


class StorageError(KimeraError):
    """A write was refused before touching either store."""


class DualWriteError(StorageError):
    """A write failed part-way and was rolled back: both stores are as before."""


def _no_fault(step: str) -> None:
    return None


def get_dual_write_stats(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """Totals, failures, success rate and counts per store and operation over the whole log."""
    total, successes, failures, last_failure = con.execute(STATS_TOTALS_SQL).fetchone()
    stores: dict[str, dict[str, int]] = {}
    for store, status, count in con.execute(STATS_STORES_SQL).fetchall():
        stores.setdefault(store, {"success": 0, "failed": 0})[status] = count
    operations: dict[str, dict[str, int]] = {}
    for operation, status, count in con.execute(STATS_OPERATIONS_SQL).fetchall():
        operations.setdefault(operation, {"success": 0, "failed": 0})[status] = count
    return {
        "total": total,
        "successes": successes,
        "failures": failures,
        "success_rate": None if total == 0 else successes / total,
        "last_failure_at": last_failure,
        "stores": stores,
        "operations": operations,
    }


def identities_to_arrow(identities: Iterable[Identity]) -> pa.Table:
    """A batch for ``Storage.store_arrow``: the identity fields, JSON fields as text."""
    items = list(identities)

    def dumps(value: Any) -> str | None:
        return None if value is None else json.dumps(value, ensure_ascii=False)

    return pa.table(
        {
            "id": [i.id for i in items],
            "identity_type": [i.identity_type for i in items],
            "raw": [i.raw for i in items],
            "echo": [i.echo for i in items],
            "lang_axis": [i.lang_axis for i in items],
            "tags": [dumps(i.tags) for i in items],
            "weight": pa.array([i.weight for i in items], pa.float64()),
            "related_ids": [dumps(i.related_ids) for i in items],
            "meta": [dumps(i.meta) for i in items],
            "created_at": pa.array([i.created_at for i in items], pa.float64()),
            "updated_at": pa.array([i.updated_at for i in items], pa.float64()),
        }
    )


class Storage:
    """Identity storage for the application, routed by the rollout stage (one connection)."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        *,
        stage: str | None = None,
        shadow_sample: float = 0.01,
        shadow: ShadowReads | None = None,
        fault: Fault | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.con = con
        create_legacy_schema(con)
        install_epoch_iso_macros(con)
        install_value_macros(con)
        self._clock = clock
        self._fault = fault or _no_fault
        self.stage = stage or get_stage(con)
        self.routing: Routing = routing(self.stage)
        self.shadow = shadow or ShadowReads(con, shadow_sample)
        self._details_cache: dict[str, str] = {}
        self._step = ""
        self._instrument()

    @classmethod
    def open(cls, path: str, **kwargs: Any) -> Storage:
        """A Storage on its own connection to the file at ``path`` (created if missing)."""
        return cls(open_database(path, create=True), **kwargs)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh_stage(self) -> str:
        """Re-read the live stage (the stage is read once at start, not per operation)."""
        self.stage = get_stage(self.con)
        self.routing = routing(self.stage)
        self._details_cache.clear()
        self._instrument()
        return self.stage

    # --- metrics (kimera_core.metrics): public operations time themselves ----------------
    def _instrument(self) -> None:
        route = self.routing
        self._write_mode = route.write
        self._write_store = {"legacy": LEGACY_STORE, "both": "both", "new": NEW_STORE}[route.write]
        self._read_store = NEW_STORE if route.read == "new" else LEGACY_STORE
        metrics.init_write_path_metrics(route.write, self.stage)

    def _timed(self, operation: str, identity_type: str, call: Callable[[], Any]) -> Any:
        t0 = perf_counter()
        try:
            result = call()
        except Exception:
            metrics.IDENTITY_OPERATION_ERRORS.labels(
                operation, identity_type, self._write_mode
            ).inc()
            raise
        finally:
            metrics.IDENTITY_OPERATION_SECONDS.labels(
                operation, identity_type, self._write_mode
            ).observe(perf_counter() - t0)
        return result

    def _counted_write(
        self, operation: str, identity_type: str, identity_id: str | None, rows: int, call: Any
    ) -> Any:
        t0 = perf_counter()
        try:
            result = self._timed(operation, identity_type, call)
        except StorageError as exc:
            metrics.DUAL_WRITES.labels(operation, self._write_mode, "failure").inc(rows)
            metrics.log_storage_write(
                identity_id,
                operation,
                self._write_mode,
                "failure",
                perf_counter() - t0,
                rows,
                str(exc),
            )
            raise
        metrics.DUAL_WRITES.labels(operation, self._write_mode, "success").inc(rows)
        metrics.log_storage_write(
            identity_id, operation, self._write_mode, "success", perf_counter() - t0, rows
        )
        return result

    # --- writes --------------------------------------------------------------------------
    def _stores(self) -> list[str]:
        route = self.routing
        return [
            s
            for s, on in ((NEW_STORE, route.writes_new), (LEGACY_STORE, route.writes_legacy))
            if on
        ]

    def _details(self, identity_type: str) -> str:
        text = self._details_cache.get(identity_type)
        if text is None:
            text = json.dumps({"identity_type": identity_type, "stores": self._stores()})
            self._details_cache[identity_type] = text
        return text

    def _stamped(self, identity: Identity) -> Identity:
        if identity.updated_at is not None and identity.created_at is not None:
            return identity
        updated = identity.updated_at if identity.updated_at is not None else self._clock()
        created = identity.created_at if identity.created_at is not None else updated
        return dataclasses.replace(identity, created_at=created, updated_at=updated)

    def store(self, identity: Identity) -> Identity:
        """Write an identity to the stores of the live stage; returns it with its timestamps."""
        return self._counted_write(
            "store", identity.identity_type, identity.id, 1, lambda: self._store(identity)
        )

    def _store(self, identity: Identity) -> Identity:
        identity = self._stamped(identity)
        refusals = value_refusals(identity)
        if refusals:
            reason = refusals[0]
            error = StorageError(
                f"identity {identity.id!r} refused ({', '.join(refusals)}): {VALUE_RULES[reason]}"
            )
            self._record_failure(identity.id, identity.identity_type, "store", "validate", error)
            raise error
        route = self.routing
        entropy = identity_entropy(identity)
        fast: Steps = []
        slow: Steps = []
        try:
            if route.writes_new:
                row = identities_row(identity, entropy)
                fast.append(("after_new_store", [(IDENTITY_INSERT, row)]))
                slow.append(
                    ("after_new_store", [(IDENTITY_DELETE, [identity.id]), (IDENTITY_INSERT, row)])
                )
            if route.writes_legacy:
                record = identity.to_legacy()
                if identity.identity_type == "geoid":
                    guarded, insert, delete = GUARDED_GEOID_INSERT, GEOID_INSERT, GEOID_DELETE
                    row = geoid_to_row(record)  # type: ignore[arg-type]
                else:
                    guarded, insert, delete = GUARDED_SCAR_INSERT, SCAR_INSERT, SCAR_DELETE
                    row = scar_to_row(record)  # type: ignore[arg-type]
                # a type change: the replacing path deletes the other table's row under the id
                other = (OTHER_TYPE_DELETE[identity.identity_type], [identity.id])
                fast.append(("after_legacy_store", [(guarded, row)]))
                slow.append(("after_legacy_store", [(delete, [identity.id]), other, (insert, row)]))
        except (ConversionError, ValueError, TypeError) as exc:
            # TypeError: a value json cannot serialise
            self._record_failure(identity.id, identity.identity_type, "store", "validate", exc)
            raise StorageError(f"identity {identity.id!r} refused: {exc}") from exc
        details = self._details(identity.identity_type)
        self._write("store", identity.id, identity.identity_type, details, fast, slow)
        metrics.observe_entropy(identity.id, identity.identity_type, entropy)
        return identity

    def delete(self, identity_id: str) -> bool:
        """Remove an identity from the stores of the live stage; True if any row was removed."""
        return self._counted_write(
            "delete", metrics.ANY_TYPE, identity_id, 1, lambda: self._delete(identity_id)
        )

    def _delete(self, identity_id: str) -> bool:
        route = self.routing
        steps: Steps = []
        if route.writes_new:
            steps.append(("after_new_store", [(IDENTITY_DELETE, [identity_id])]))
        if route.writes_legacy:
            steps.append(
                (
                    "after_legacy_store",
                    [(GEOID_DELETE, [identity_id]), (SCAR_DELETE, [identity_id])],
                )
            )
        details = json.dumps({"stores": self._stores()})
        removed = self._write("delete", identity_id, None, details, steps, None)
        return removed > 0

    def _write(
        self,
        operation: str,
        identity_id: str,
        identity_type: str | None,
        details: str,
        fast: Steps,
        slow: Steps | None,
    ) -> int:
        log = [self._clock(), identity_id, operation, "success", details]
        try:
            return self._attempt_or_replace("write_transaction", fast, slow, LOG_INSERT, log)
        except Exception as exc:
            step = self._step
            self._record_failure(identity_id, identity_type, operation, step, exc)
            raise DualWriteError(
                f"{operation} of identity {identity_id!r} failed at {step or 'begin'} and was "
                f"rolled back ({type(exc).__name__}: {exc})"
            ) from exc

    def _attempt_or_replace(
        self,
        operation: str,
        fast: Steps,
        slow: Steps | None,
        log_sql: str,
        log: Any,
    ) -> int:
        """``fast`` in one transaction; on a key conflict, ``slow`` (delete, then insert).

        A write DuckDB aborts for a concurrent transaction's write (``db.is_conflict``: only
        beside other clients of a database server) runs again from the start, backing off
        from 10 ms to ``CONFLICT_BACKOFF_CAP_SECONDS``, for up to ``CONFLICT_RETRY_SECONDS``;
        then the conflict is raised (and logged failed by the caller).
        """
        deadline = perf_counter() + CONFLICT_RETRY_SECONDS
        pause = 0.01
        while True:
            try:
                return self._fast_or_slow(operation, fast, slow, log_sql, log)
            except duckdb.TransactionException as exc:
                if not is_conflict(exc) or perf_counter() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, CONFLICT_BACKOFF_CAP_SECONDS)

    def _fast_or_slow(
        self, operation: str, fast: Steps, slow: Steps | None, log_sql: str, log: Any
    ) -> int:
        try:
            return self._attempt(operation, fast, log_sql, log)
        except (duckdb.ConstraintException, _TypeChange):
            # the key exists already, or as the other type: replace it (rarer than a new key,
            # so tried second)
            if slow is None:
                raise
            return self._attempt(operation, slow, log_sql, log)

    def _attempt(self, operation: str, steps: Steps, log_sql: str, log: Any) -> int:
        """Run the steps and the log row in one transaction; the rows the steps changed.

        ``self._step`` names the last step passed, for the failure record; each step ends at
        a fault-injection point (WRITE_STEPS).
        """
        con, fault = self.con, self._fault
        changed = 0
        self._step = ""
        with self._transaction(operation):
            for step, statements in steps:
                for sql, params in statements:
                    rows = con.execute(sql, params).fetchone()[0]
                    if rows == 0 and sql in GUARDED_INSERTS:
                        raise _TypeChange
                    changed += rows
                self._step = step
                fault(step)
            self._step = "before_log"
            fault("before_log")
            con.execute(log_sql, log)
            self._step = "before_commit"
            fault("before_commit")
        self._step = "commit"
        return changed

    @contextlib.contextmanager
    def _transaction(self, operation: str) -> Iterator[None]:
        """``db.transaction``, timed: the attempt as ``operation``, a rollback as ``rollback``."""
        t0 = perf_counter()
        failed_at: float | None = None
        try:
            with transaction(self.con):
                try:
                    yield
                except BaseException:
                    failed_at = perf_counter()
                    raise
        finally:
            end = perf_counter()
            store = self._write_store
            metrics.STORAGE_OPERATION_SECONDS.labels(operation, store).observe(
                (end if failed_at is None else failed_at) - t0
            )
            if failed_at is not None:
                metrics.STORAGE_OPERATION_SECONDS.labels("rollback", store).observe(end - failed_at)

    def _record_failure(
        self,
        identity_id: str,
        identity_type: str | None,
        operation: str,
        step: str,
        exc: BaseException,
    ) -> None:
        details = {
            "identity_type": identity_type,
            "stores": self._stores(),
            "step": step,
            "error": f"{type(exc).__name__}: {exc}",
        }
        t0 = perf_counter()
        try:
            self.con.execute(
                LOG_INSERT, [self._clock(), identity_id, operation, "failed", json.dumps(details)]
            )
        except duckdb.Error as log_exc:
            # the write is already refused; losing its log row must not hide why
            exc.add_note(f"recording the failure in dual_write_log failed too: {log_exc}")
        metrics.STORAGE_OPERATION_SECONDS.labels("failure_log", self._write_store).observe(
            perf_counter() - t0
        )

    def store_batch(self, identities: Iterable[Identity]) -> int:
        """Write many identities in one transaction, set-based; returns how many.

        Raises StorageError (after a failed log row per identity) for a value the batch
        cannot carry (NaN or infinity in a JSON field, a lone surrogate in a text) and for
        the rules ``store_arrow`` checks.
        """
        items = list(identities)
        try:
            batch = identities_to_arrow(items)
        except (ValueError, TypeError, UnicodeError, pa.ArrowException) as exc:
            # the batch cannot be built: name the rules its identities break, as single writes
            broken = [(i.id, value_refusals(i)) for i in items]
            broken = [(key, reasons) for key, reasons in broken if reasons]
            detail = (
                f"{len(broken)} identities break a value rule, e.g. {broken[0][0]!r} "
                f"({', '.join(broken[0][1])}): {VALUE_RULES[broken[0][1][0]]}"
                if broken
                else f"{type(exc).__name__}: {exc}"
            )
            error = StorageError(f"batch refused: {detail}")
            return self._counted_write(
                "store_batch",
                metrics.ANY_TYPE,
                None,
                len(items),
                lambda: self._refuse_items(items, error),
            )
        return self.store_arrow(batch)

    def _refuse_items(self, items: list[Identity], error: StorageError) -> int:
        for item in items:
            self._record_failure(item.id, item.identity_type, "store", "validate", error)
        raise error

    def store_arrow(self, batch: pa.Table) -> int:
        """Write a batch (columns BATCH_COLUMNS, JSON fields as text) in one transaction."""
        return self._counted_write(
            "store_batch", metrics.ANY_TYPE, None, batch.num_rows, lambda: self._store_arrow(batch)
        )

    def _store_arrow(self, batch: pa.Table) -> int:
        missing = [c for c in BATCH_COLUMNS if c not in batch.column_names]
        if missing:
            raise StorageError(f"batch lacks columns: {', '.join(missing)}")
        if batch.num_rows == 0:
            return 0
        con, now = self.con, self._clock()
        con.register(BATCH_VIEW, batch)
        try:
            self._check_batch(now)
            # only the documents in identities carry ISO text
            iso = (
                epoch_iso_fixes(con, BATCH_EPOCHS_SQL, {"now": now})
                if self.routing.writes_new
                else contextlib.nullcontext(False)
            )
            with iso as fixes:
                self._write_batch(batch.num_rows, now, fixes)
            return batch.num_rows
        finally:
            con.unregister(BATCH_VIEW)

    def _write_batch(self, rows: int, now: float, fixes: bool) -> None:
        route, at = self.routing, {"now": now}
        fast: Steps = []
        slow: Steps = []
        if route.writes_new:
            insert = BATCH_IDENTITY_INSERT_WITH_FIXES if fixes else BATCH_IDENTITY_INSERT
            fast.append(("after_new_store", [(insert, at)]))
            slow.append(("after_new_store", [(BATCH_DELETES["identities"], None), (insert, at)]))
        if route.writes_legacy:
            inserts = [(BATCH_GEOID_INSERT, at), (BATCH_SCAR_INSERT, at)]
            retyped = [(sql, None) for sql in BATCH_TYPE_CHANGE_DELETES]
            fast.append(("after_legacy_store", retyped + inserts))
            deletes = [(BATCH_DELETES[t], None) for t in ("legacy_geoids", "legacy_scars")]
            slow.append(("after_legacy_store", deletes + retyped + inserts))
        log = {"now": now, "scar": self._details("scar"), "geoid": self._details("geoid")}
        try:
            self._attempt_or_replace("batch_transaction", fast, slow, BATCH_LOG_INSERT, log)
        except Exception as exc:
            step = self._step
            self._record_batch_failure(now, step, exc)
            raise DualWriteError(
                f"batch of {rows} identities failed at {step or 'begin'} and was "
                f"rolled back ({type(exc).__name__}: {exc})"
            ) from exc

    def _check_batch(self, now: float) -> None:
        """Refuse a bad batch before touching either store: its shape, then its values."""
        try:
            row = self.con.execute(BATCH_CHECK_SQL, {"now": now}).fetchone()
        except duckdb.InvalidInputException as exc:
            # malformed JSON text in tags, related_ids or meta: no value rule can judge it
            self._refuse_batch(now, f"batch refused: a JSON column holds malformed JSON ({exc})")
        (dup, null_ids, bad_type, no_raw, scar_fields, bad_time, example) = row[:BATCH_SHAPE_COUNTS]
        problems = [
            f"{n} {what}"
            for n, what in (
                (dup, "duplicate ids"),
                (null_ids, "null ids"),
                (bad_type, "rows whose identity_type is not geoid or scar"),
                (no_raw, f"geoids without raw text (e.g. {example!r})"),
                (
                    scar_fields,
                    "scars carrying raw/echo/lang_axis/tags, which legacy_scars cannot hold",
                ),
                (bad_time, "rows whose created_at or updated_at is not a finite number"),
            )
            if n
        ]
        if problems:
            self._refuse_batch(now, f"batch refused: {'; '.join(problems)}")
        *counts, example = row[BATCH_SHAPE_COUNTS:]
        broken = [(n, reason) for n, reason in zip(counts, BATCH_VALUE_REASONS, strict=True) if n]
        if broken:
            self._refuse_batch(
                now,
                "batch refused: "
                + "; ".join(f"{n} rows {reason} ({VALUE_RULES[reason]})" for n, reason in broken)
                + f" (e.g. {example!r})",
            )

    def _refuse_batch(self, now: float, message: str) -> NoReturn:
        error = StorageError(message)
        self._record_batch_failure(now, "validate", error)
        raise error

    def _record_batch_failure(self, now: float, step: str, exc: BaseException) -> None:
        details = json.dumps(
            {"stores": self._stores(), "step": step, "error": f"{type(exc).__name__}: {exc}"}
        )
        try:
            self.con.execute(BATCH_FAILURE_LOG_INSERT, {"now": now, "details": details})
        except duckdb.Error as log_exc:
            exc.add_note(f"recording the failure in dual_write_log failed too: {log_exc}")

    # --- reads ---------------------------------------------------------------------------
    def _read(
        self,
        operation: str,
        legacy: Callable[[], Any],
        new: Callable[[], Any],
        key: str | None = None,
    ) -> Any:
        route = self.routing
        t0 = perf_counter()
        try:
            if route.read == "new":
                return new()
            if route.shadow:
                return self.shadow.run(operation, legacy, new, key)
            return legacy()
        finally:
            metrics.STORAGE_OPERATION_SECONDS.labels("read", self._read_store).observe(
                perf_counter() - t0
            )

    def fetch(self, identity_id: str) -> Identity | None:
        """The identity with this id from the stage's read store, or None."""
        t0 = perf_counter()
        try:
            found = self._read(
                "fetch",
                lambda: self._fetch_legacy(identity_id),
                lambda: self._fetch_new(identity_id),
                identity_id,
            )
        except Exception:
            metrics.IDENTITY_OPERATION_ERRORS.labels(
                "fetch", metrics.ANY_TYPE, self._write_mode
            ).inc()
            raise
        kind = metrics.ANY_TYPE if found is None else found.identity_type
        metrics.IDENTITY_OPERATION_SECONDS.labels("fetch", kind, self._write_mode).observe(
            perf_counter() - t0
        )
        return found

    def list_identities(
        self, identity_type: str | None = None, *, after_id: str | None = None, limit: int = 100
    ) -> list[Identity]:
        """Identities in id order, a page at a time (pass the last id seen as ``after_id``)."""
        params = [identity_type, identity_type, after_id, after_id, limit]
        kind = identity_type if identity_type in IDENTITY_TYPES else metrics.ANY_TYPE
        return self._timed(
            "list",
            kind,
            lambda: self._read(
                "list",
                lambda: self._legacy_query(LEGACY_LIST_SQL, params),
                lambda: self._new_query(NEW_LIST_SQL, params),
            ),
        )

    def find_by_entropy(self, low: float, high: float, *, limit: int = 100) -> list[Identity]:
        """Identities whose entropy lies in [low, high], highest first (ties by id)."""
        params = [low, high, limit]
        return self._timed(
            "find_by_entropy",
            metrics.ANY_TYPE,
            lambda: self._read(
                "find_by_entropy",
                lambda: self._legacy_query(LEGACY_ENTROPY_RANGE_SQL, params),
                lambda: self._new_query(NEW_ENTROPY_SQL, params),
            ),
        )

    def search(self, text: str, *, limit: int = 100) -> list[Identity]:
        """Geoids whose raw text contains ``text`` (case-insensitive, literally), in id order."""
        params = [text, limit]
        return self._timed(
            "search",
            "geoid",
            lambda: self._read(
                "search",
                lambda: self._legacy_query(LEGACY_SEARCH_SQL, params),
                lambda: self._new_query(NEW_SEARCH_SQL, params),
            ),
        )

    def stats(self) -> dict[str, Any]:
        """get_dual_write_stats over this storage's log."""
        return get_dual_write_stats(self.con)

    def _fetch_legacy(self, identity_id: str) -> Identity | None:
        return fetch_legacy_identity(self.con, identity_id)

    def _fetch_new(self, identity_id: str) -> Identity | None:
        return read_identity_p1(self.con, identity_id)

    def _new_query(self, sql: str, params: list[Any]) -> list[Identity]:
        return [Identity.from_document(r[0]) for r in self.con.execute(sql, params).fetchall()]

    def _legacy_query(self, sql: str, params: list[Any]) -> list[Identity]:
        return [identity_from_legacy_row(r) for r in self.con.execute(sql, params).fetchall()]


# The reads of each store: the legacy tables as identities (kimera_core.legacy), P1 documents.
_LEGACY_SELECT = f"SELECT {LEGACY_IDENTITY_FIELDS} FROM ({{rows}}) u"
LEGACY_LIST_SQL = (
    _LEGACY_SELECT.format(rows=LEGACY_IDENTITIES_SQL)
    + " WHERE (? IS NULL OR identity_type = ?) AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?"
)
NEW_LIST_SQL = (
    "SELECT data FROM identities WHERE (? IS NULL OR identity_type = ?) "
    "AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?"
)
# Storage.find_by_entropy's plain range read (positional low, high, limit; no entropy column).
# Not query.LEGACY_ENTROPY_PAGE_SQL: the API's page filters by type, lang, tag and a cursor and
# returns the entropy; both read the one legacy source, legacy.LEGACY_IDENTITIES_ENTROPY_SQL.
LEGACY_ENTROPY_RANGE_SQL = (
    _LEGACY_SELECT.format(rows=LEGACY_IDENTITIES_ENTROPY_SQL)
    + " WHERE entropy BETWEEN ? AND ? ORDER BY entropy DESC, id LIMIT ?"
)
NEW_ENTROPY_SQL = (
    "SELECT data FROM identities WHERE entropy_score BETWEEN ? AND ? "
    "ORDER BY entropy_score DESC, id LIMIT ?"
)
LEGACY_SEARCH_SQL = (
    _LEGACY_SELECT.format(rows=LEGACY_IDENTITIES_SQL)
    + " WHERE identity_type = 'geoid' AND contains(lower(raw), lower(?)) ORDER BY id LIMIT ?"
)
NEW_SEARCH_SQL = (
    "SELECT data FROM identities WHERE identity_type = 'geoid' "
    "AND contains(lower(data->>'$.raw'), lower(?)) ORDER BY id LIMIT ?"
)
