"""The migration engine: legacy geoids and scars into ``identities``, set-based and resumable.

A run walks partitions: every geoid hash bucket first, then every scar bucket (a scar's
related ids are checked against the geoids already migrated). A run of selected buckets
(``migrate_buckets``, one Dagster partition) then judges again, after its geoids, the scars
of other buckets that wait for a geoid (``related_geoid_pending``/``_quarantined``), so that
however the buckets are launched every scar ends judged against the final geoid state. Each partition is one
transaction (through a server, consecutive buckets of the smaller table share one: ``_groups``)
that prepares its rows in SQL (validation, the P1 document, entropy and tau
with the bulk form; ``migration.statements``), quarantines what cannot be migrated, merges
the rest into ``identities`` (newer ``updated_at`` wins, identical rows are left alone),
journals every insert and update for rollback, and records itself as done with counts and
a checksum. A run killed at any point resumes from its last committed partition and ends
in the same state as an uninterrupted run. docs/migration.md is the operator's runbook.

The document's ISO timestamps come from ``kimera_core.sql``'s one formula: its macros in
SQL, and ``identity.epoch_to_iso`` for the few epochs they cannot write exactly, so a
migrated document rebuilds its identity's timestamps exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import duckdb

from kimera_core.checksum import Checksum, table_checksum
from kimera_core.db import checkpoint, is_served, retry_conflicts, transaction
from kimera_core.entropy import geoid_shannon_sql, scar_entropy_sql
from kimera_core.errors import KimeraError
from kimera_core.identity import IDENTITY_TYPES
from kimera_core.migration import fingerprints
from kimera_core.migration import statements as q
from kimera_core.migration.fingerprints import SkipPlan
from kimera_core.migration.indexes import (
    clear_dropped_record,
    drop_indexes_for_load,
    rebuild_indexes_one_at_a_time,
)
from kimera_core.migration.report import (
    COUNT_NAMES,
    MigrationCounts,
    MigrationReport,
    PartitionCounts,
    ProgressCallback,
    reason_counts,
    waiting_scars,
)
from kimera_core.migration.schema import IDENTITY_COLUMNS, ensure_schema
from kimera_core.sql import (
    epoch_iso_fixes,
    epoch_iso_sql,
    install_epoch_iso_macros,
    install_value_macros,
)

# The order a run walks: geoids first (IDENTITY_TYPES' order), so that a scar's related
# geoids are migrated before it.
KINDS: tuple[str, ...] = IDENTITY_TYPES
# Rows of the larger legacy table per partition when --partitions is not given: bounds the
# memory of one partition's transaction (docs/benchmarks.md has the measured peak). At least
# two DuckDB row groups (122,880 rows), so that most of a partition is written to the file
# at its commit instead of through the WAL and again by the checkpoint. (400 k was tried:
# the checkpoint's vacuum of the partitions' tail row groups went, but two first runs each
# way at 1 M rows on a loaded host gave no gain in wall or CPU time; docs/benchmarks.md.)
ROWS_PER_PARTITION = 250_000
# Through a database server (``db.is_served``) a partition's COMMIT holds every other
# client's COMMIT while it appends its rows and their index entries (~3 ms per 1,000):
# ~10 k rows kept a live writer's p99 under 50 ms beside a 1 M-row migration, 25 k did not
# (docs/benchmarks.md, issue 15 s5; docs/deployment.md, "What a live write waits for").
ROWS_PER_PARTITION_SERVED = 10_000
MAX_PARTITIONS = 4096
# Whether an embedded run groups the smaller table's buckets into transactions as a served
# run does (``_groups``); the tests set it to exercise the grouping without a server.
GROUP_EMBEDDED = False
# Rows of one DuckDB row group (its default row_group_size)
ROW_GROUP_ROWS = 122_880
MEMORY_LIMIT_ENV = "KIMERA_MEMORY_LIMIT"
DEFAULT_MEMORY_LIMIT = "1GB"
# (legacy table, its key column) per kind: fixed names, never input
SOURCES: dict[str, tuple[str, str]] = {
    "geoid": ("legacy_geoids", "gid"),
    "scar": ("legacy_scars", "id"),
}
# Legacy rows of some buckets of one table ({table}, {key}: a SOURCES pair, fixed names).
BUCKETS_ROWS_SQL = "SELECT count(*) FROM {table} WHERE list_contains($b, hash({key}) % $n::UBIGINT)"
# The partition kind of a run's second look at one bucket's waiting scars (recorded apart
# from "scar", so that resuming the run still migrates that whole scar bucket).
WAITING_KIND = "waiting_scar"
# A rerun that judges at most this share of the segments again keeps identities' secondary
# indexes live (updating a few rows in them costs less than rebuilding them whole).
REBUILD_INDEXES_SHARE = 0.25


def migrate(
    con: duckdb.DuckDBPyConnection,
    *,
    partitions: int | None = None,
    dry_run: bool = False,
    on_partition: ProgressCallback | None = None,
    skip_unchanged: bool = True,
) -> MigrationReport:
    """Backfill identities from the legacy tables; resumes an unfinished run if there is one.

    ``partitions``: hash buckets per table (1..4096; default one per ROWS_PER_PARTITION
    rows). ``dry_run`` computes every count inside one transaction and rolls it back:
    nothing is written, not even the run record. ``skip_unchanged``: judge again only the
    keys whose inputs changed since the last full run recorded their fingerprints
    (``migration.fingerprints``); the others are counted by that judgement. False judges
    every row. Raises KimeraError (one line) for a bad partition count, a resume that cannot
    continue, or an out-of-memory partition.
    """
    if partitions is not None and not 1 <= partitions <= MAX_PARTITIONS:
        raise KimeraError(f"--partitions must be between 1 and {MAX_PARTITIONS}")
    started = time.perf_counter()
    _prepare_connection(con)
    if dry_run:
        # commit=False: a dry run is never committed, it always ends in ROLLBACK.
        try:
            with transaction(con, commit=False):
                ensure_schema(con)
                return _dry_run(con, partitions or auto_partitions(con), started, on_partition)
        except BaseException:
            _restore_threads(con)
            raise

    ensure_schema(con)
    resumed = False
    skip: SkipPlan | None = None
    unfinished = _unfinished_run(con)
    if unfinished is not None:
        run_id, buckets, version = unfinished
        if partitions is not None and partitions != buckets:
            raise KimeraError(
                f"run {run_id} is unfinished with {buckets} partitions: resume it with "
                f"--partitions {buckets} (or omit --partitions), or roll it back first"
            )
        if version != duckdb.__version__:
            raise KimeraError(
                f"run {run_id} was started with DuckDB {version} and this is {duckdb.__version__}:"
                " partition buckets would differ; roll it back (kimera migrate rollback) and rerun"
            )
        resumed = True
    else:
        buckets = partitions or auto_partitions(con)
        legacy = _legacy_rows(con)
        if skip_unchanged:
            skip = fingerprints.plan(con, buckets, legacy)
        else:
            skip = SkipPlan(fingerprints.segment_count(legacy, buckets))
        fingerprints.start_outcomes(con)
        run_id = _start_run(con, buckets)

    # Through a server the indexes stay: dropping and rebuilding them beside a live writer
    # made DuckDB 1.5.6 invalidate the database ("Failed to delete all rows from index").
    if not is_served(con) and (skip is None or _load_is_large(con, skip)):
        drop_indexes_for_load(con, run_id)
    plan = [(kind, b) for kind in KINDS for b in range(buckets)]
    done = _done_partitions(con, run_id)
    total, by_partition, read_legacy = _run_partitions(
        con, run_id, buckets, plan, done, on_partition, skip
    )
    legacy_rows = _legacy_rows(con) if read_legacy is None else read_legacy
    try:
        return _finish(
            con, run_id, buckets, total, by_partition, resumed, started, legacy_rows, skip
        )
    except duckdb.OutOfMemoryException as exc:
        raise _out_of_memory("rebuilding the identities indexes", run_id, exc) from None


def migrate_buckets(
    con: duckdb.DuckDBPyConnection,
    buckets: Sequence[int],
    *,
    partitions: int,
    on_partition: ProgressCallback | None = None,
) -> MigrationReport:
    """Migrate only the selected hash buckets (of ``partitions``) as one new run, geoids first.

    For an orchestrator that partitions the migration by bucket. A scar whose geoid sits in a
    bucket not yet migrated waits in quarantine (``related_geoid_pending``); after the
    selected buckets, the run judges again the waiting scars of every other bucket (one
    ``WAITING_KIND`` partition per bucket), so the last bucket to run leaves every scar
    judged against the final geoids, in any order of runs. The reconciliation counts the
    legacy rows of the selected buckets plus the waiting scars judged again; selecting every
    bucket gives the same result as ``migrate``. Raises KimeraError for bad buckets or while
    another run is unfinished.
    """
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise KimeraError(f"--partitions must be between 1 and {MAX_PARTITIONS}")
    selected = sorted(set(buckets))
    if not selected or selected[0] < 0 or selected[-1] >= partitions:
        raise KimeraError(f"buckets must be a non-empty subset of 0..{partitions - 1}")
    started = time.perf_counter()
    _prepare_connection(con)
    ensure_schema(con)
    unfinished = _unfinished_run(con)
    if unfinished is not None:
        raise KimeraError(
            f"run {unfinished[0]} is unfinished: resume it (kimera migrate) or roll it back "
            "(kimera migrate rollback) before migrating selected buckets"
        )
    run_id = _start_run(con, partitions)
    plan = [(kind, b) for kind in KINDS for b in selected]
    waiting = [
        (WAITING_KIND, int(r[0]))
        for r in con.execute(
            q.WAITING_BUCKETS_SQL, {"buckets": partitions, "selected": selected}
        ).fetchall()
    ]
    total, by_partition, legacy = _run_partitions(
        con, run_id, partitions, plan + waiting, {}, on_partition
    )
    if legacy is None:
        legacy = int(
            con.execute(q.SELECTED_LEGACY_ROWS_SQL, {"b": selected, "n": partitions}).fetchone()[0]
        )
        legacy += sum(p.counts.read for p in by_partition if p.kind == WAITING_KIND)
    return _finish(con, run_id, partitions, total, by_partition, False, started, legacy)


def auto_partitions(con: duckdb.DuckDBPyConnection) -> int:
    """Partitions so that each holds at most ROWS_PER_PARTITION rows of either table
    (ROWS_PER_PARTITION_SERVED through a database server), at most MAX_PARTITIONS."""
    largest = max(con.execute(q.TABLE_ROWS_SQL).fetchone())
    per_partition = ROWS_PER_PARTITION_SERVED if is_served(con) else ROWS_PER_PARTITION
    return min(MAX_PARTITIONS, max(1, -(-int(largest) // per_partition)))


def _prepare_connection(con: duckdb.DuckDBPyConnection) -> None:
    # DuckDB's SET of these options acts on the whole database: through a server, on every
    # client (and on the server's own --checkpoint-threshold), so a client leaves them alone.
    if not is_served(con):
        _limit_memory(con)
    install_epoch_iso_macros(con)
    install_value_macros(con)
    con.execute(q.SAME_DOC_MACRO)


def _start_run(con: duckdb.DuckDBPyConnection, buckets: int) -> str:
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    con.execute(q.START_RUN_SQL, [run_id, time.time(), buckets, duckdb.__version__])
    return run_id


def _load_is_large(con: duckdb.DuckDBPyConnection, skip: SkipPlan) -> bool:
    """Whether a run judges enough rows that dropping and rebuilding the indexes pays."""
    if skip.everything:
        return True
    if skip.nothing_to_judge:
        return False
    judged = con.execute("SELECT count(*) FROM mig_rejudge").fetchone()[0]
    return judged > skip.segments * REBUILD_INDEXES_SHARE


def _run_partitions(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    buckets: int,
    plan: list[tuple[str, int]],
    done: dict[tuple[str, int], MigrationCounts],
    on_partition: ProgressCallback | None,
    skip: SkipPlan | None = None,
) -> tuple[MigrationCounts, list[PartitionCounts], int | None]:
    """Migrate each partition of ``plan`` not in ``done``, one transaction each; returns the
    run's counts, each partition's, and (through a server, else None) the legacy rows the
    reconciliation compares with.

    With ``skip`` (a full run), only the segments it lists are judged (all when
    ``skip.everything``); the other rows are counted by their recorded judgement, and a
    partition without a segment to judge is recorded done with those counts. A partition
    that DuckDB aborts for a concurrent client's write (``db.is_conflict``; a key a live
    writer committed after the partition's snapshot included) runs again on a fresh
    snapshot, where the merge rule judges the live write like any other row.

    Through a server the application may add or delete legacy rows while the run goes on,
    so each partition counts its bucket's legacy rows in its own transaction (the snapshot
    it read) and the reconciliation compares the run with their sum; the buckets no
    partition of this call read (done before a resume, or unchanged since the last run)
    are counted at the end. Embedded (no other writer) that sum is the tables' count.
    """
    total = MigrationCounts()
    by_partition: list[PartitionCounts] = []
    served = is_served(con)
    legacy = 0
    counted_at_end: dict[str, list[int]] = {}
    prepared: dict[tuple[str, bool, bool], str] = {}
    index = 0

    def finished(kind: str, bucket: int, counts: MigrationCounts, skipped: bool) -> None:
        nonlocal index
        index += 1
        total.add(counts)
        by_partition.append(PartitionCounts(kind, bucket, counts, skipped))
        if on_partition:
            on_partition(index, len(plan), kind, bucket, counts)

    for kind, group in _groups(con, plan, done, skip, buckets):
        if len(group) == 1 and (kind, group[0]) in done:
            counted_at_end.setdefault(kind, []).append(group[0])
            finished(kind, group[0], done[(kind, group[0])], True)
            continue
        if len(group) == 1 and skip is not None and not skip.judges(group[0]):
            # nothing to judge: done by its recorded judgement (status shows it done)
            counts = skip.skipped_counts(kind, group[0])
            with transaction(con):
                _record_partition(con, run_id, kind, group[0], counts, Checksum.empty())
            counted_at_end.setdefault(kind, []).append(group[0])
            finished(kind, group[0], counts, False)
            continue

        def work(
            c: duckdb.DuckDBPyConnection, kind: str = kind, group: list[int] = group
        ) -> tuple[list[tuple[int, MigrationCounts, Checksum]], int]:
            results = _migrate_partition(c, run_id, kind, group, buckets, True, skip, prepared)
            if not served:
                return results, 0
            return results, _partition_legacy_rows(c, kind, group, skip, results)

        try:
            results, rows = retry_conflicts(con, work, duplicate_keys=True)
            legacy += rows
        except BaseException as exc:
            _restore_threads(con)
            if isinstance(exc, duckdb.OutOfMemoryException):
                where = f"{kind} partition {_group_name(group)}"
                raise _out_of_memory(where, run_id, exc) from None
            raise
        for bucket, counts, _ in results:
            finished(kind, bucket, counts, False)
    if not served:
        return total, by_partition, None
    for kind, selected in counted_at_end.items():
        table, key = SOURCES["scar" if kind == WAITING_KIND else kind]
        sql = BUCKETS_ROWS_SQL.format(table=table, key=key)
        legacy += int(con.execute(sql, {"b": selected, "n": buckets}).fetchone()[0])
    return total, by_partition, legacy


def _groups(
    con: duckdb.DuckDBPyConnection,
    plan: list[tuple[str, int]],
    done: dict[tuple[str, int], MigrationCounts],
    skip: SkipPlan | None,
    buckets: int,
) -> list[tuple[str, list[int]]]:
    """The plan cut into transactions: runs of consecutive buckets of one kind to judge.

    Through a server (``db.is_served``: small partitions), a bucket of the larger legacy
    table is one transaction and the smaller table's buckets are grouped, consecutive and
    up to as many as make one bucket of the larger table's rows (800 k geoids and 200 k
    scars: four scar buckets a transaction). Every transaction reads its tables whole to
    find its buckets' rows (``hash(key) % n``), so fewer transactions cost less, and none
    holds more rows than the largest bucket. A bucket done already (``done``), with nothing
    to judge (``skip``) or of WAITING_KIND is a group of its own, and so is every bucket of
    an embedded run unless GROUP_EMBEDDED (its few large partitions gain little, and a
    group's peak memory at 10 M rows is not measured).
    """
    if not (GROUP_EMBEDDED or is_served(con)):
        return [(kind, [bucket]) for kind, bucket in plan]
    geoids, scars = con.execute(q.TABLE_ROWS_SQL).fetchone()
    rows = {"geoid": int(geoids), "scar": int(scars)}
    largest = max(rows.values())
    groups: list[tuple[str, list[int]]] = []
    for kind, bucket in plan:
        alone = (
            kind == WAITING_KIND
            or (kind, bucket) in done
            or (skip is not None and not skip.judges(bucket))
        )
        size = 1 if alone else max(1, largest // max(1, rows[kind]))
        if groups and not alone and _joins(groups[-1], kind, bucket, size, done, skip):
            groups[-1][1].append(bucket)
        else:
            groups.append((kind, [bucket]))
    return groups


def _joins(
    last: tuple[str, list[int]],
    kind: str,
    bucket: int,
    size: int,
    done: dict[tuple[str, int], MigrationCounts],
    skip: SkipPlan | None,
) -> bool:
    """Whether ``bucket`` extends the group ``last`` (same kind, next bucket, room left,
    and ``last`` itself a group of buckets to judge)."""
    last_kind, members = last
    return (
        last_kind == kind
        and members[-1] + 1 == bucket
        and len(members) < size
        and (kind, members[0]) not in done
        and (skip is None or skip.judges(members[0]))
    )


def _group_name(group: list[int]) -> str:
    return str(group[0]) if len(group) == 1 else f"{group[0]}-{group[-1]}"


def _partition_legacy_rows(
    con: duckdb.DuckDBPyConnection,
    kind: str,
    group: list[int],
    skip: SkipPlan | None,
    results: list[tuple[int, MigrationCounts, Checksum]],
) -> int:
    """The legacy rows of the partition just run (through a server): its copy of the buckets
    (``mig_part``, in its transaction's snapshot), the scars it read for a WAITING_KIND
    partition. A rerun's copy holds the segments it judges again; the others' rows are
    those its plan found unchanged, their recorded reads (a row written since into one of
    them is, like one written into a partition already run, for the next run)."""
    if kind == WAITING_KIND:
        return sum(counts.read for _, counts, _ in results)
    copied = int(con.execute("SELECT count(*) FROM mig_part").fetchone()[0])
    if skip is None or skip.everything:
        return copied
    return copied + sum(skip.skipped_counts(kind, bucket).read for bucket in group)


def _restore_threads(con: duckdb.DuckDBPyConnection) -> None:
    """``RESET threads`` after a failed partition's ROLLBACK (``_migrate_partition`` may have
    left ``SET threads = 1``); a connection that is gone does not hide the first error."""
    if not is_served(con):
        with contextlib.suppress(duckdb.Error):
            con.execute("RESET threads")


def _out_of_memory(where: str, run_id: str, exc: duckdb.Error) -> KimeraError:
    return KimeraError(
        f"out of memory in {where} of run {run_id} ({str(exc).splitlines()[0]}); the run "
        f"resumes from there: raise {MEMORY_LIMIT_ENV} "
        f"(now {os.environ.get(MEMORY_LIMIT_ENV, DEFAULT_MEMORY_LIMIT)})"
        " or roll the run back and start again with more --partitions"
    )


def _finish(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    buckets: int,
    total: MigrationCounts,
    by_partition: list[PartitionCounts],
    resumed: bool,
    started: float,
    legacy_rows: int,
    skip: SkipPlan | None = None,
) -> MigrationReport:
    """Rebuild the dropped indexes, reconcile, record the run's outcome and checkpoint.

    A full run (``skip``) records its fingerprints, whose identities part is the checksum.
    """
    rebuild_indexes_one_at_a_time(con, run_id)
    with transaction(con):
        if skip is None:
            checksum = table_checksum(con, "identities", IDENTITY_COLUMNS)
        elif skip.nothing_to_judge and skip.checksum is not None:
            checksum = skip.checksum
        else:
            checksum = fingerprints.record(con, skip, run_id)
        reasons, warnings = reason_counts(con, run_id)
        report = MigrationReport(
            run_id=run_id,
            dry_run=False,
            resumed=resumed,
            partitions=buckets,
            counts=total,
            legacy_rows=legacy_rows,
            quarantine_reasons=reasons,
            warnings=warnings,
            partitions_skipped=sum(p.skipped for p in by_partition),
            seconds=time.perf_counter() - started,
            partition_counts=by_partition,
            waiting=waiting_scars(con),
        )
        report.identities_checksum = checksum.to_dict()
        report.rows_skipped = 0 if skip is None else skip.rows_skipped
        report.status = "completed" if report.balanced else "unbalanced"
        clear_dropped_record(con, run_id)
        con.execute(
            q.FINISH_RUN_SQL,
            [
                time.time(),
                report.status,
                json.dumps(total.to_dict()),
                checksum.rows,
                checksum.hex,
                run_id,
            ],
        )
    checkpoint(con)
    return report


def _dry_run(
    con: duckdb.DuckDBPyConnection,
    buckets: int,
    started: float,
    on_partition: ProgressCallback | None,
) -> MigrationReport:
    """Every partition computed and applied inside the caller's transaction, nothing recorded."""
    total = MigrationCounts()
    by_partition: list[PartitionCounts] = []
    reasons: dict[str, int] = {}
    plan = [(kind, b) for kind in KINDS for b in range(buckets)]
    prepared: dict[tuple[str, bool, bool], str] = {}
    for index, (kind, bucket) in enumerate(plan, start=1):
        [(_, counts, _)] = _migrate_partition(
            con, "dry-run", kind, [bucket], buckets, False, None, prepared
        )
        for key, n in con.execute(q.DRY_RUN_REASONS_SQL).fetchall():
            reasons[key] = reasons.get(key, 0) + n
        total.add(counts)
        by_partition.append(PartitionCounts(kind, bucket, counts))
        if on_partition:
            on_partition(index, len(plan), kind, bucket, counts)
    report = MigrationReport(
        run_id="dry-run",
        dry_run=True,
        resumed=False,
        partitions=buckets,
        counts=total,
        legacy_rows=_legacy_rows(con),
        quarantine_reasons=dict(sorted(reasons.items())),
        seconds=time.perf_counter() - started,
        partition_counts=by_partition,
        waiting=waiting_scars(con),
    )
    report.status = "dry-run" if report.balanced else "unbalanced"
    return report


def _migrate_partition(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    kind: str,
    group: list[int],
    buckets: int,
    record: bool,
    skip: SkipPlan | None = None,
    prepared: dict[tuple[str, bool, bool], str] | None = None,
) -> list[tuple[int, MigrationCounts, Checksum]]:
    """Prepare, quarantine, merge and journal one partition (caller owns the transaction).

    ``group``: consecutive buckets (``_groups``), judged together; each is recorded as its
    own partition (counts and checksum) in this one transaction. Returns per bucket of the
    group, in order: (bucket, counts, checksum). ``kind`` WAITING_KIND judges only the
    bucket's waiting scars (a group of one). The quarantine is written in a dry run too (its
    transaction is rolled back): a scar's judgement reads it. With ``skip`` (a full run) the
    judged rows' outcomes are collected for the run's fingerprints, only its segments are
    judged unless ``skip.everything``, and a bucket's counts (returned and recorded) include
    the rows it does not judge again. The checksum covers the judged rows. ``prepared``
    keeps the prepare statements of one run (their catalog reads) between partitions.
    """
    source = "scar" if kind == WAITING_KIND else kind
    table, key = SOURCES[source]
    only = skip is not None and not skip.everything
    # An embedded rerun's rows to judge, and their identities, are the copies made at its
    # plan (fingerprints' mig_todo_<kind>, fixed names; each table read once). Through a
    # server the application writes while the run goes on: a copy may be stale by now, and
    # the merge rule would write its old legacy version over a newer identity, so a served
    # rerun reads its segments' rows in this transaction.
    copied = only and not is_served(con)
    if kind == WAITING_KIND:
        rows_sql = q.WAITING_ROWS_SQL
    else:
        segments = q.SEGMENT_ROWS_FILTER.format(key=key) if only and not copied else ""
        rows_from = f"mig_todo_{source}" if copied else table
        rows_sql = q.PARTITION_ROWS_SQL.format(table=rows_from, key=key, segments=segments)
    params = {
        "run_id": run_id,
        "bucket": group[0],
        "last": group[-1],
        "buckets": buckets,
        "now": time.time(),
        "source_table": table,
        "segments": 0 if skip is None else skip.segments,
    }
    _exec(con, rows_sql, params)
    with epoch_iso_fixes(con, q.PARTITION_EPOCHS_SQL) as fixes:
        cache = {} if prepared is None else prepared
        if (source, fixes, copied) not in cache:
            cache[(source, fixes, copied)] = _prepare_sql(con, source, fixes, copied)
        _exec(con, cache[(source, fixes, copied)], params)
    judged = {
        int(r[0]): (MigrationCounts(*map(int, r[1:7])), Checksum(int(r[7]), int(r[8])))
        for r in con.execute(q.PARTITION_BUCKETS_SQL, {"buckets": buckets}).fetchall()
    }
    results = []
    inserts = 0  # this partition's own, before the skipped rows' counts join
    for bucket in group:
        counts, checksum = judged.get(bucket, (MigrationCounts(), Checksum.empty()))
        inserts += counts.inserted
        if skip is not None:
            counts.add(skip.skipped_counts(kind, bucket))
        results.append((bucket, counts, checksum))
    if skip is not None:
        fingerprints.collect_outcomes(con, source, skip.segments)
    # One thread appends whole row groups, which DuckDB writes to the file at commit
    # ("optimistic writes"); parallel appends leave partial row groups that go through the
    # WAL and are written a second time by the checkpoint. Only for an insert of at least
    # one whole row group (the SET itself costs ~40 ms: a rerun's or a scar partition's few
    # rows skip it). Not through a server: the setting would act on every client. No
    # ``finally``: after a failed statement DuckDB refuses any other until the ROLLBACK
    # (which would hide the error); the caller's ``_restore_threads`` resets it after the
    # rollback.
    single_thread = not is_served(con) and inserts >= ROW_GROUP_ROWS
    if single_thread:
        con.execute("SET threads = 1")
    _exec(con, q.QUARANTINE_SQL, params)
    _exec(con, q.CLEAR_SUPERSEDED_SQL, params)
    if record:
        _exec(con, q.WARNINGS_SQL, params)
        _exec(con, q.JOURNAL_SQL, params)
    con.execute(q.APPLY_INSERT_SQL)
    con.execute(q.APPLY_UPDATE_SQL)
    if single_thread:
        con.execute("RESET threads")
    if record:
        for bucket, counts, checksum in results:
            _record_partition(con, run_id, kind, bucket, counts, checksum)
    return results


def _record_partition(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    kind: str,
    bucket: int,
    counts: MigrationCounts,
    checksum: Checksum,
) -> None:
    """The partition is done: its counts and checksum, what a resumed run skips."""
    con.execute(
        q.RECORD_PARTITION_SQL,
        [run_id, kind, bucket, time.time()]
        + [getattr(counts, name) for name in COUNT_NAMES]
        + [checksum.rows, checksum.hex],
    )


def _prepare_sql(
    con: duckdb.DuckDBPyConnection, kind: str, iso_fixes: bool, only: bool = False
) -> str:
    """The partition's prepare statement with its ``__NAME__`` tokens filled in.

    ``only``: the identities it compares with are the copy of those of the segments judged
    again (fingerprints' ``mig_todo_identities``, an embedded rerun's).
    """
    table, key = SOURCES[kind]
    # A primary key already rules out duplicates; old files without one get the window count.
    dup = "1" if _has_primary_key(con, table) else f"count(*) OVER (PARTITION BY {key})"
    json_columns = _json_typed_columns(con, table)

    def parsed(column: str) -> str:
        # a JSON column holds valid JSON already; TEXT columns (old files) are validated
        return column if column in json_columns else f"TRY(json({column}))"

    if kind == "geoid":
        sql = q.PREPARE_GEOIDS_SQL.replace("__SHANNON__", geoid_shannon_sql("e_in"))
        sql = sql.replace("__META__", parsed("meta")).replace("__TAGS__", parsed("tags"))
    else:
        sql = q.PREPARE_SCARS_SQL.replace(
            "__SCAR_ENTROPY__", scar_entropy_sql("parsed", "src_rowid", "rel_j", "weight")
        )
        sql = sql.replace("__META__", parsed("meta")).replace("__RELATED__", parsed("related_ids"))
    # a rerun compares with the identities of its segments, read once (fingerprints.TODO_SQL)
    return (
        sql.replace("__DUP_COUNT__", dup)
        .replace("__IDENTITIES__", "mig_todo_identities" if only else "identities")
        .replace("__CREATED_ISO__", epoch_iso_sql("c_at", fixes=iso_fixes))
        .replace("__UPDATED_ISO__", epoch_iso_sql("u_at", fixes=iso_fixes))
    )


def _exec(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> None:
    """Run ``sql`` with the named parameters it uses (DuckDB refuses unused ones)."""
    con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql})


def _unfinished_run(con: duckdb.DuckDBPyConnection) -> tuple[str, int, str] | None:
    row = con.execute(q.UNFINISHED_RUN_SQL).fetchone()
    return None if row is None else (row[0], int(row[1]), row[2])


def _done_partitions(
    con: duckdb.DuckDBPyConnection, run_id: str
) -> dict[tuple[str, int], MigrationCounts]:
    rows = con.execute(q.DONE_PARTITIONS_SQL, [run_id]).fetchall()
    return {(r[0], int(r[1])): MigrationCounts(*map(int, r[2:])) for r in rows}


def _has_primary_key(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(con.execute(q.HAS_PRIMARY_KEY_SQL, [table]).fetchone()[0])


def _json_typed_columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {r[0] for r in con.execute(q.JSON_COLUMNS_SQL, [table]).fetchall()}


def _limit_memory(con: duckdb.DuckDBPyConnection) -> None:
    # DuckDB spills to its temp directory beyond the limit instead of growing without bound.
    limit = os.environ.get(MEMORY_LIMIT_ENV, DEFAULT_MEMORY_LIMIT)
    try:
        con.execute(f"SET memory_limit = '{_vetted_size(limit)}'")
    except duckdb.Error as exc:
        raise KimeraError(
            f"{MEMORY_LIMIT_ENV}={limit!r} is not a DuckDB memory size: {exc}"
        ) from None
    con.execute("SET preserve_insertion_order = false")
    # Hand freed memory back to the OS promptly: with the defaults the allocator kept up to
    # ~800 MB above the limit at 10 M rows (docs/benchmarks.md).
    con.execute("SET allocator_flush_threshold = '16MB'")
    con.execute("SET allocator_bulk_deallocation_flush_threshold = '16MB'")
    con.execute("SET allocator_background_threads = true")
    # One checkpoint at the end of the run instead of one every 16 MB of WAL: each rewrites
    # identities and its indexes. A crash replays the WAL, which holds only committed partitions.
    con.execute("SET checkpoint_threshold = '16GB'")


def _vetted_size(text: str) -> str:
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", text, re.I):
        raise KimeraError(f"{MEMORY_LIMIT_ENV}={text!r} is not a memory size like 1GB or 512MiB")
    return text.strip()


def _legacy_rows(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute(q.LEGACY_ROWS_SQL).fetchone()[0])
