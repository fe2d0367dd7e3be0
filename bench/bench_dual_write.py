"""Dual-write benchmarks: single-write latency against the bare INSERT floors, and batches.

Usage: .venv/bin/python bench/bench_dual_write.py [--writes 3000] [--repeat 3]
       [--batch-rows 1000000] [--batch-size 100000] [--info]     (--writes 0: batches only)

Everything is measured side by side in one run, ``--repeat`` times, and the ratios of each
run are printed, then their best and median: the machine is shared and noisy, so read the
ratios, never an absolute figure alone.

Single writes take turns write by write (each turn starting with the next variant; each
variant on its own database file), so the machine's noise hits them alike; each reports
wall p50/p99/mean and the p50 of its CPU time (which leaves out the disk flush at COMMIT: on
a loaded machine that flush takes several milliseconds for every variant and hides the
statements' cost). The floors write the same rows, in one transaction each:

* ``floor``: BEGIN, two bare parameterised ``INSERT ... VALUES`` (``identities``,
  ``legacy_geoids``), COMMIT: the issue's reference (target: dual write p50 <= 1.2x);
* ``floor, SELECT form``: the same two INSERTs spelled ``INSERT ... SELECT ?`` as
  ``kimera_core.storage`` spells them (DuckDB plans that cheaper);
* ``three-INSERT floor``: that, plus the ``dual_write_log`` row P1's layout requires: the
  least any dual write with its log can cost.

Batches take turns batch by batch (each turn starting with the next variant), each variant
on its own file. ``bare two-table insert`` inserts the identities rows ready-made (document
and entropy computed before timing) and the legacy rows (target: dual write throughput
>= 0.9x); ``bare + log rows`` adds the batch's ``dual_write_log`` rows. Batches report wall
and CPU seconds (CPU is less disturbed by other jobs on a shared machine). ``--info`` adds
the same two on tables without P1's keys and indexes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa

from kimera_core.db import open_database
from kimera_core.entropy import identity_entropy
from kimera_core.identity import Identity
from kimera_core.legacy import (
    GEOID_COLUMNS,
    IDENTITY_ROW_COLUMNS,
    LEGACY_DDL,
    LEGACY_INDEXES,
    create_legacy_schema,
    geoid_to_row,
    identities_row,
)
from kimera_core.sql import vetted_identifier
from kimera_core.storage import (
    BATCH_LOG_INSERT,
    BATCH_VIEW,
    GEOID_INSERT,
    IDENTITY_INSERT,
    LOG_INSERT,
    Storage,
)

# The textbook bare INSERTs, the floor (storage spells them INSERT ... SELECT ?).
VALUES_IDENTITY_INSERT = (
    f"INSERT INTO identities ({IDENTITY_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
VALUES_GEOID_INSERT = (
    f"INSERT INTO legacy_geoids ({GEOID_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
GEOID_DETAILS = '{"identity_type": "geoid", "stores": ["identities", "legacy"]}'

DUAL = "dual-write on"
FLOOR = "floor: BEGIN + 2 INSERTs + COMMIT"
FLOOR_SELECT = "floor, SELECT form"
FLOOR_LOG = "three-INSERT floor (+ log row)"
BATCH_DUAL = "dual-write store_arrow"
BATCH_BARE = "bare two-table insert"
BATCH_BARE_LOG = "bare + log rows"


def identity(i: int, tag: str) -> Identity:
    return Identity(
        id=f"{tag}{i:012d}",
        identity_type="geoid",
        raw=f"The river remembers the morning light · {i}",
        echo=f"The river remembers the morning light · {i}",
        lang_axis="en",
        tags=["memory", "physics"],
        weight=0.5,
        meta={
            "terms": [{"symbol": "echo", "intensity": 0.7}, {"symbol": "seed", "intensity": 1.3}]
        },
        created_at=1_790_000_000.25 + i,
        updated_at=1_790_000_000.25 + i,
    )


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e3


def floor_writer(con: duckdb.DuckDBPyConnection, inserts: tuple[str, str], log: bool):
    """BEGIN, the two INSERTs (and the log row), COMMIT; rows built as dual write builds them."""
    identity_sql, geoid_sql = inserts

    def write(item: Identity) -> None:
        new_row = identities_row(item, identity_entropy(item))
        legacy_row = geoid_to_row(item.to_legacy())
        con.execute("BEGIN TRANSACTION")
        con.execute(identity_sql, new_row)
        con.execute(geoid_sql, legacy_row)
        if log:
            con.execute(LOG_INSERT, [time.time(), item.id, "store", "success", GEOID_DETAILS])
        con.execute("COMMIT")

    return write


def single_writes(
    tmp: Path, writes: int, run: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall, CPU) seconds per write of each variant; the variants take turns write by write.

    CPU seconds (this process, all its threads) leave out the wait for the disk's flush at
    COMMIT, which a loaded shared machine stretches to several milliseconds for every variant.
    """
    variants: dict[str, tuple[Callable[[Identity], object], duckdb.DuckDBPyConnection]] = {}
    for name, stage in (
        ("dual-write off (legacy-only)", "legacy-only"),
        ("new store only (write-new)", "write-new"),
        (DUAL, "dual-write"),
    ):
        storage = Storage.open(str(tmp / f"s{run}-{stage}.duckdb"), stage=stage, shadow_sample=0.0)
        variants[name] = (storage.store, storage.con)
    for i, (name, inserts, log) in enumerate(
        (
            (FLOOR, (VALUES_IDENTITY_INSERT, VALUES_GEOID_INSERT), False),
            (FLOOR_SELECT, (IDENTITY_INSERT, GEOID_INSERT), False),
            (FLOOR_LOG, (IDENTITY_INSERT, GEOID_INSERT), True),
        )
    ):
        con = open_database(tmp / f"s{run}-floor{i}.duckdb", create=True)
        create_legacy_schema(con)
        variants[name] = (floor_writer(con, inserts, log), con)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for v, (write, _) in enumerate(variants.values()):
        for i in range(20):  # warm up every code path
            write(identity(i, f"w{v}_"))
    order = list(enumerate(variants.items()))
    for i in range(writes):
        # each write's turn starts with another variant: none is always first or last
        for v, (name, (write, _)) in order[i % len(order) :] + order[: i % len(order)]:
            item = identity(i, f"v{v}_")
            t0, c0 = time.perf_counter(), time.process_time()
            write(item)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for _, con in variants.values():
        con.close()
    return times, cpu


def arrow_batch(con, start: int, rows: int) -> pa.Table:
    result = con.execute(
        """
        SELECT 'b' || lpad((i)::VARCHAR, 12, '0') AS id, 'geoid' AS identity_type,
               'The river remembers · ' || i AS raw, 'The river remembers · ' || i AS echo,
               'en' AS lang_axis, '["memory", "physics"]' AS tags, 0.5 AS weight,
               NULL::VARCHAR AS related_ids,
               '{"terms": [{"symbol": "echo", "intensity": ' || (1 + i % 7) ||
               '}, {"symbol": "seed", "intensity": 1.3}]}' AS meta,
               1790000000.25 + i AS created_at, 1790000000.25 + i AS updated_at
        FROM range(?, ?) t(i)
        """,
        [start, start + rows],
    )
    return result.to_arrow_table() if hasattr(result, "to_arrow_table") else result.arrow()


def ready_rows(part: pa.Table) -> pa.Table:
    """The identities rows dual write makes of a batch (same document, same entropy), made
    before timing in a scratch in-memory store: the bare insert only inserts them."""
    with Storage(duckdb.connect(), stage="write-new", shadow_sample=0.0) as scratch:
        scratch.store_arrow(part)
        res = scratch.con.execute(
            "SELECT id, identity_type, data, created_at, updated_at, lang_axis, entropy_score "
            "FROM identities ORDER BY id"
        )
        return res.to_arrow_table() if hasattr(res, "to_arrow_table") else res.arrow()


def create_unindexed(con) -> None:
    """The P1 tables without their primary keys and indexes (for information only)."""
    for ddl in LEGACY_DDL:
        con.execute(ddl.replace(" PRIMARY KEY", ""))


def dual_writer(path: Path, indexed: bool, log: bool = True):
    con = open_database(path, create=True)
    if not indexed:
        create_unindexed(con)
    storage = Storage(con, stage="dual-write", shadow_sample=0.0)
    if not indexed:  # Storage created P1's secondary indexes: drop them again
        for name, *_ in LEGACY_INDEXES:
            con.execute(f"DROP INDEX IF EXISTS {vetted_identifier(name)}")

    def write(part: pa.Table, ready: pa.Table) -> None:
        storage.store_arrow(part)

    return write, con


def bare_writer(path: Path, indexed: bool, log: bool = False):
    """The floor: the same rows, identities rows ready-made, two INSERTs in one transaction
    (and, with ``log``, the batch's dual_write_log rows as store_arrow writes them)."""
    con = open_database(path, create=True)
    if indexed:
        create_legacy_schema(con)
    else:
        create_unindexed(con)
    details = {"now": time.time(), "geoid": GEOID_DETAILS, "scar": GEOID_DETAILS}

    def write(part: pa.Table, ready: pa.Table) -> None:
        con.register(BATCH_VIEW, part)
        con.register("ready", ready)
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute("INSERT INTO identities SELECT * FROM ready")
            con.execute(
                "INSERT INTO legacy_geoids SELECT id, raw, echo, lang_axis, tags, weight, meta, "
                f"created_at, updated_at FROM {BATCH_VIEW}"
            )
            if log:
                con.execute(BATCH_LOG_INSERT, details)
            con.execute("COMMIT")
        finally:
            con.unregister(BATCH_VIEW)
            con.unregister("ready")

    return write, con


def batch_variants(info: bool) -> dict[str, tuple[Callable, bool, bool]]:
    variants = {
        BATCH_DUAL: (dual_writer, True, True),
        BATCH_BARE: (bare_writer, True, False),
        BATCH_BARE_LOG: (bare_writer, True, True),
    }
    if info:
        variants["dual-write, no indexes (info)"] = (dual_writer, False, True)
        variants["bare, no indexes (info)"] = (bare_writer, False, False)
    return variants


def batches(
    tmp: Path, parts: list[pa.Table], ready: list[pa.Table], run: int, info: bool
) -> dict[str, tuple[float, float]]:
    """(wall s, CPU s) per variant; the variants take turns batch by batch, each on its file."""
    writers = {
        name: make(tmp / f"b{run}-{i}.duckdb", indexed, log)
        for i, (name, (make, indexed, log)) in enumerate(batch_variants(info).items())
    }
    spent = {name: [0.0, 0.0] for name in writers}
    order = list(writers.items())
    for b, (part, rows) in enumerate(zip(parts, ready, strict=True)):
        # each batch's turn starts with another variant: measured, the first to read a batch
        # pays up to 20 % more, which a fixed order would always charge to the same variant
        for name, (write, _) in order[b % len(order) :] + order[: b % len(order)]:
            t0, c0 = time.perf_counter(), time.process_time()
            write(part, rows)
            spent[name][0] += time.perf_counter() - t0
            spent[name][1] += time.process_time() - c0
    for _, con in writers.values():
        con.close()
    return {name: (wall, cpu) for name, (wall, cpu) in spent.items()}


def report_single(
    times: dict[str, list[float]], cpu: dict[str, list[float]], writes: int, run: int
) -> dict[str, float]:
    print(f"run {run}: single-identity writes ({writes:,} per variant, taking turns)")
    print(f"  {'variant':<36} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'CPU p50':>8}")
    for name, values in times.items():
        print(
            f"  {name:<36} {pct(values, 0.5):8.3f} {pct(values, 0.99):8.3f} "
            f"{statistics.fmean(values) * 1e3:8.3f} {pct(cpu[name], 0.5):8.3f}"
        )
    ratios = {}
    for kind, series in (("p50", times), ("CPU p50", cpu)):
        p50 = {name: pct(values, 0.5) for name, values in series.items()}
        legacy_only = p50["dual-write off (legacy-only)"]
        ratios |= {
            f"dual-write {kind} / floor (target <= 1.20)": p50[DUAL] / p50[FLOOR],
            f"dual-write {kind} / floor, SELECT form": p50[DUAL] / p50[FLOOR_SELECT],
            f"dual-write {kind} / three-INSERT floor": p50[DUAL] / p50[FLOOR_LOG],
            f"three-INSERT floor {kind} / floor": p50[FLOOR_LOG] / p50[FLOOR],
            f"dual-write {kind} / legacy-only write": p50[DUAL] / legacy_only,
        }
    for label, value in ratios.items():
        print(f"  {label:<48} {value:6.2f}x")
    return ratios


def report_batches(spent: dict[str, tuple[float, float]], rows: int, size: int, run: int):
    print(f"run {run}: batched writes ({rows:,} identities in batches of {size:,}, turn by turn)")
    print(f"  {'variant':<32} {'wall s':>7} {'ids/s':>9} {'CPU s':>7} {'ids/CPU s':>10}")
    for name, (wall, cpu) in spent.items():
        print(f"  {name:<32} {wall:7.2f} {rows / wall:9,.0f} {cpu:7.2f} {rows / cpu:10,.0f}")
    ratios = {}
    for label, ours, bare in (
        ("dual-write / bare throughput (target >= 0.90)", BATCH_DUAL, BATCH_BARE),
        ("bare + log rows / bare throughput", BATCH_BARE_LOG, BATCH_BARE),
        ("dual-write / bare + log rows throughput", BATCH_DUAL, BATCH_BARE_LOG),
        (
            "no indexes (info): dual / bare",
            "dual-write, no indexes (info)",
            "bare, no indexes (info)",
        ),
    ):
        if ours not in spent:
            continue
        ratios[f"{label}, wall"] = spent[bare][0] / spent[ours][0]
        ratios[f"{label}, CPU"] = spent[bare][1] / spent[ours][1]
    for label, value in ratios.items():
        print(f"  {label:<60} {value:5.2f}")
    return ratios


def summary(title: str, runs: list[dict[str, float]], best: Callable) -> None:
    print(f"{title}: best and median of {len(runs)} runs")
    for label in runs[0]:
        values = [r[label] for r in runs]
        print(f"  {label:<60} best {best(values):5.2f}  median {statistics.median(values):5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--writes", type=int, default=3000, help="single writes per variant and run (0: skip)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs, each measuring all variants")
    parser.add_argument(
        "--batch-rows", type=int, default=1_000_000, help="identities in batches (0: skip)"
    )
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--info", action="store_true", help="also the tables without indexes")
    args = parser.parse_args()

    single_runs: list[dict[str, float]] = []
    batch_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parts: list[pa.Table] = []
        ready: list[pa.Table] = []
        n, size = args.batch_rows, args.batch_size
        if n > 0:
            scratch = open_database(folder / "scratch.duckdb", create=True)
            parts = [arrow_batch(scratch, s, min(size, n - s)) for s in range(0, n, size)]
            scratch.close()
            ready = [ready_rows(part) for part in parts]
        for run in range(1, args.repeat + 1):
            if args.writes:
                times, cpu = single_writes(folder, args.writes, run)
                single_runs.append(report_single(times, cpu, args.writes, run))
            if n > 0:
                spent = batches(folder, parts, ready, run, args.info)
                batch_runs.append(report_batches(spent, n, size, run))
            for path in folder.glob(f"[sb]{run}-*"):
                path.unlink()
    if single_runs:
        summary("single writes, ratios (lower is better)", single_runs, min)
    if batch_runs:
        summary("batches, throughput ratios (higher is better)", batch_runs, max)


if __name__ == "__main__":
    main()
