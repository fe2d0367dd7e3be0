"""Migration benchmark: the migration against the floor of a raw copy, side by side.

Usage:
  .venv/bin/python bench/bench_migration.py [--geoids 800000 --scars 200000]
  .venv/bin/python bench/bench_migration.py --memory-only --geoids 8000000 --scars 2000000 \
      [--source var/bench/demo_10m.duckdb]   # reuse a generated demo database

The floor is ``INSERT INTO ... SELECT`` of the same legacy rows into plain tables (no keys,
no indexes, no transformation) in one transaction. A second floor, the write floor, is
writing only the rows the migration produced, ready-made, into P1's ``identities`` (its
primary key, its secondary indexes built after the load): what any migration to P1's
layout pays before validating, building a document or computing an entropy. The migration
runs on a fresh copy of the same database. Peak memory is the peak RSS of a ``kimera migrate`` process, read by a small
launcher process: Linux carries a parent's peak RSS into a forked child's ru_maxrss, so the
child must not be started by this (large) benchmark process itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from kimera_core.db import connect, transaction
from kimera_core.demo import generate_demo_data
from kimera_core.legacy import LEGACY_INDEXES, create_legacy_schema
from kimera_core.migration import migrate

# P1's secondary indexes of identities, which the write floor must build
P1_IDENTITY_INDEXES = tuple(name for name, table, _c, _d in LEGACY_INDEXES if table == "identities")
KIMERA = str(Path(sys.executable).parent / "kimera")
# Runs its arguments as a child and prints the child's peak RSS (KiB) as the last stderr line.
PEAK_RSS_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def floor_copy(source: Path, target: Path) -> float:
    con = duckdb.connect(str(target))
    con.execute("SET enable_progress_bar = false")
    con.execute(f"ATTACH '{source}' AS src (READ_ONLY)")
    con.execute("CREATE TABLE g AS SELECT * FROM src.legacy_geoids WHERE false")
    con.execute("CREATE TABLE s AS SELECT * FROM src.legacy_scars WHERE false")
    start = time.perf_counter()
    with transaction(con):
        con.execute("INSERT INTO g SELECT * FROM src.legacy_geoids")
        con.execute("INSERT INTO s SELECT * FROM src.legacy_scars")
    con.execute("CHECKPOINT")
    elapsed = time.perf_counter() - start
    con.close()
    return elapsed


def write_floor(migrated: Path, target: Path) -> tuple[float, int]:
    """Second floor: only writing the rows the migration produced into P1's identities table.

    The rows come ready-made from the migrated copy: no validation, no JSON building, no
    entropy, no merge, no journal; P1's primary key is kept (the migration keeps it too, and
    rebuilds the secondary indexes at its end, as this does).
    """
    con = duckdb.connect(str(target))
    con.execute("SET enable_progress_bar = false")
    create_legacy_schema(con, indexes=False)
    con.execute(f"ATTACH '{migrated}' AS src (READ_ONLY)")
    rows = con.execute("SELECT count(*) FROM src.identities").fetchone()[0]
    start = time.perf_counter()
    with transaction(con):
        con.execute("INSERT INTO identities SELECT * FROM src.identities")
    create_legacy_schema(con)  # the missing P1 indexes, as the migration rebuilds them
    con.execute("CHECKPOINT")
    elapsed = time.perf_counter() - start
    assert_p1_layout(con)
    con.close()
    return elapsed, rows


def assert_p1_layout(con: duckdb.DuckDBPyConnection) -> None:
    """The write floor paid for P1's primary key and all three secondary indexes of identities.

    Asked of this database only (another one is attached and has them too).
    """
    names = {
        r[0]
        for r in con.execute(
            "SELECT index_name FROM duckdb_indexes() WHERE database_name = current_database() "
            "AND table_name = 'identities'"
        ).fetchall()
    }
    missing = set(P1_IDENTITY_INDEXES) - names
    primary = con.execute(
        "SELECT count(*) FROM duckdb_constraints() WHERE database_name = current_database() "
        "AND table_name = 'identities' AND constraint_type = 'PRIMARY KEY'"
    ).fetchone()[0]
    if missing or primary != 1:
        raise SystemExit(
            f"write floor without P1's layout: missing {missing}, primary keys {primary}"
        )


def peak_memory_of_cli_migration(db: Path) -> tuple[float, float, dict]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_LAUNCHER, KIMERA, "migrate", "--db", str(db), "--json"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"kimera migrate failed ({out.returncode}): {out.stderr[-3000:]}")
    elapsed = time.perf_counter() - start
    peak_kib = int(out.stderr.strip().splitlines()[-1])
    return elapsed, peak_kib / 1024, json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--geoids", type=int, default=800_000)
    parser.add_argument("--scars", type=int, default=200_000)
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the peak-memory measurement of a CLI migration",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="demo database to reuse (generated there first when missing; never modified)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        source = tmp / "legacy.duckdb"
        rows = args.geoids + args.scars
        if args.source is not None and args.source.exists():
            shutil.copy(args.source, source)
            print(f"demo database: {args.source} ({rows:,} legacy rows asked for; reused)")
        else:
            t0 = time.perf_counter()
            generate_demo_data(source, geoids=args.geoids, scars=args.scars, seed=3)
            elapsed = time.perf_counter() - t0
            print(f"demo database: {rows:,} legacy rows generated in {elapsed:.1f} s")
            if args.source is not None:
                shutil.copy(source, args.source)

        if args.memory_only:
            elapsed, peak, report = peak_memory_of_cli_migration(source)
            print(
                f"kimera migrate (CLI, {report['partitions']} partitions): {elapsed:.1f} s, "
                f"peak RSS {peak:,.0f} MiB, balanced={report['balanced']}"
            )
            return

        floor = floor_copy(source, tmp / "floor.duckdb")
        print(
            f"floor: raw INSERT INTO ... SELECT of {rows:,} rows into plain tables: {floor:.2f} s"
        )

        target = tmp / "migrate.duckdb"
        shutil.copy(source, target)
        with connect(target) as con:
            start = time.perf_counter()
            report = migrate(con)
            elapsed = time.perf_counter() - start
            again_start = time.perf_counter()
            again = migrate(con)
            again_elapsed = time.perf_counter() - again_start
        print(
            f"migration: {elapsed:.2f} s ({rows / elapsed:,.0f} rows/s, {report.partitions} "
            f"partitions; inserted {report.counts.inserted:,}, unchanged "
            f"{report.counts.unchanged:,}, quarantined {report.counts.quarantined:,})"
        )
        print(f"ratio migration / floor: {elapsed / floor:.1f}x (target <= 3x)")
        print(f"second (idempotent) run: {again_elapsed:.2f} s, changes {again.counts.changes}")
        written, identities = write_floor(target, tmp / "write_floor.duckdb")
        print(
            f"write floor: the {identities:,} identities rows the migration left, ready-made, "
            f"into P1's identities (primary key, indexes built after): {written:.2f} s = "
            f"{written / floor:.1f}x the raw copy; migration / write floor: "
            f"{elapsed / written:.1f}x"
        )

        mem_db = tmp / "memory.duckdb"
        shutil.copy(source, mem_db)
        cli_elapsed, peak, _ = peak_memory_of_cli_migration(mem_db)
        print(
            f"kimera migrate (CLI) on the same rows: {cli_elapsed:.1f} s, peak RSS {peak:,.0f} MiB"
        )
    print(f"duckdb {duckdb.__version__}")


if __name__ == "__main__":
    main()
