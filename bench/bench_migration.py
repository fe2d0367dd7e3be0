"""Migration benchmark: the migration against the write floor, and its reruns, in one run.

Usage:
  .venv/bin/python bench/bench_migration.py [--geoids 800000 --scars 200000] [--rounds 3] \
      [--source var/bench/demo_1m.duckdb]   # reuse (or keep) the generated demo database
  .venv/bin/python bench/bench_migration.py --memory-only --geoids 8000000 --scars 2000000 \
      [--source var/bench/demo_10m.duckdb]

Each round, on a fresh copy of the demo database: the first ``migrate()``; a no-op rerun
(nothing changed: it must judge no row); a rerun after 1 % of the legacy rows changed (it
must update exactly those); then the **write floor**: writing only the rows the migration
produced, ready-made, into P1's ``identities`` with its primary key and its three secondary
indexes (built after the load, asserted to exist) and a checkpoint: what any migration to
P1's layout pays before validating, building a document or computing an entropy. The 1 %
rerun has its own floor, the **update floor**: on a copy of the file as that rerun found
it, one UPDATE of exactly the rows the rerun updated (their values taken from its result)
and a checkpoint. The ratios (first / write floor, no-op / first, 1 % / first, update
floor / first) are printed per round with their best and median. The raw-copy floor (``INSERT INTO ... SELECT`` into plain tables) is
printed once for context. Peak memory is the peak RSS of a ``kimera migrate`` process, read
by a small launcher process: Linux carries a parent's peak RSS into a forked child's
ru_maxrss, so the child must not be started by this (large) benchmark process itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
from demo_source import demo_source

from kimera_core.db import connect, transaction
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


def update_floor(before: Path, after: Path, run_id: str) -> float:
    """Floor of the 1 % rerun: only writing the rows it updated, ready-made, and a checkpoint.

    On ``before`` (the file as the rerun found it), the rows run ``run_id`` updated are
    written as ``after`` holds them, by one UPDATE in one transaction with P1's primary key
    and secondary indexes live (the rerun keeps them), then CHECKPOINT: no fingerprint, no
    judgement, no journal. Returns the seconds of the UPDATE, its COMMIT and the checkpoint.
    """
    con = duckdb.connect(str(before))
    con.execute("SET enable_progress_bar = false")
    con.execute(f"ATTACH '{after}' AS src (READ_ONLY)")
    con.execute(
        "CREATE TEMP TABLE changed AS SELECT i.* FROM src.identities i "
        "JOIN src.kimera_migration_changes c ON c.id = i.id "
        "WHERE c.run_id = ? AND c.action = 'update'",
        [run_id],
    )
    con.execute("DETACH src")
    start = time.perf_counter()
    with transaction(con):
        con.execute(
            "UPDATE identities SET identity_type = c.identity_type, data = c.data, "
            "created_at = c.created_at, updated_at = c.updated_at, lang_axis = c.lang_axis, "
            "entropy_score = c.entropy_score FROM changed c WHERE identities.id = c.id"
        )
    con.execute("CHECKPOINT")
    elapsed = time.perf_counter() - start
    con.close()
    return elapsed


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


# 1 % of the legacy rows, each one the migration put in identities as it is (not quarantined,
# not kept against a newer identity), changed so that the rerun must update exactly them.
CHANGE_SQL = """
UPDATE {table} SET weight = coalesce(weight, 0) + 1,
       updated_at = coalesce(updated_at, created_at) + 1
WHERE {key} IN (
    SELECT t.{key} FROM {table} t JOIN identities i ON i.id = t.{key}
    WHERE i.updated_at = coalesce(t.updated_at, t.created_at)
      AND t.{key} NOT IN (SELECT key FROM kimera_quarantine WHERE cleared_by IS NULL
                          AND key IS NOT NULL)
    ORDER BY hash(t.{key}, $seed) LIMIT $n
)
"""


def change_one_percent(con: duckdb.DuckDBPyConnection, seed: int) -> int:
    """Change 1 % of each legacy table's rows (weight and updated_at); returns how many."""
    changed = 0
    for table, key in (("legacy_geoids", "gid"), ("legacy_scars", "id")):
        # table and key are the fixed legacy names above, never input
        n = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] // 100
        sql = CHANGE_SQL.format(table=table, key=key)
        changed += con.execute(sql, {"seed": seed, "n": n}).fetchone()[0]
    return changed


def one_round(source: Path, tmp: Path, seed: int) -> dict[str, float]:
    """First run, no-op rerun, rerun after 1 % changed, then the write floor: seconds each."""
    target = tmp / f"migrate_{seed}.duckdb"
    shutil.copy(source, target)
    with connect(target) as con:
        start = time.perf_counter()
        first = migrate(con)
        t_first = time.perf_counter() - start
        start = time.perf_counter()
        noop = migrate(con)
        t_noop = time.perf_counter() - start
        changed = change_one_percent(con, seed)
        con.execute("CHECKPOINT")
    before_pct = tmp / f"before_pct_{seed}.duckdb"
    shutil.copy(target, before_pct)
    with connect(target) as con:
        start = time.perf_counter()
        pct = migrate(con)
        t_pct = time.perf_counter() - start
        run_id = pct.run_id
    if not (first.balanced and noop.balanced and pct.balanced):
        raise SystemExit("a run did not balance")
    if noop.counts.changes or noop.rows_skipped != noop.legacy_rows:
        raise SystemExit(f"the no-op rerun changed or judged rows: {noop.counts}")
    if pct.counts.updated != changed or pct.counts.inserted:
        raise SystemExit(f"{changed} rows changed, but the rerun did {pct.counts}")
    pct_floor = update_floor(before_pct, target, run_id)
    before_pct.unlink()
    written, identities = write_floor(target, tmp / f"write_floor_{seed}.duckdb")
    target.unlink()
    (tmp / f"write_floor_{seed}.duckdb").unlink()
    print(
        f"  round {seed}: first {t_first:.2f} s ({first.partitions} partitions; inserted "
        f"{first.counts.inserted:,}, unchanged {first.counts.unchanged:,}, quarantined "
        f"{first.counts.quarantined:,}); write floor {written:.2f} s ({identities:,} rows); "
        f"no-op {t_noop:.2f} s; 1 % ({changed:,} rows changed, {pct.counts.updated:,} updated, "
        f"{pct.counts.read - pct.rows_skipped:,} judged) {t_pct:.2f} s; its update floor "
        f"{pct_floor:.2f} s"
    )
    return {
        "first": t_first,
        "floor": written,
        "noop": t_noop,
        "pct": t_pct,
        "pct_floor": pct_floor,
    }


def _best_median(values: list[float]) -> str:
    return f"best {min(values):.2f}, median {statistics.median(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--geoids", type=int, default=800_000)
    parser.add_argument("--scars", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the peak-memory measurement of a CLI migration",
    )
    parser.add_argument("--skip-memory", action="store_true", help="no CLI peak-memory run")
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
        demo_source(args.source, source, args.geoids, args.scars)

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
        rounds = [one_round(source, tmp, seed) for seed in range(1, args.rounds + 1)]
        first = [r["first"] for r in rounds]
        print(
            f"write floor (P1's identities, primary key, 3 indexes): "
            f"{_best_median([r['floor'] for r in rounds])} s"
        )
        print(f"first run: {_best_median(first)} s")
        ratios = {
            "first run / write floor (target <= 2.0)": [r["first"] / r["floor"] for r in rounds],
            "no-op rerun / first run (target <= 0.05)": [r["noop"] / r["first"] for r in rounds],
            "rerun after 1 % changed / first run (target <= 0.2)": [
                r["pct"] / r["first"] for r in rounds
            ],
            "its update floor (UPDATE of those rows + checkpoint) / first run": [
                r["pct_floor"] / r["first"] for r in rounds
            ],
        }
        for name, values in ratios.items():
            print(
                f"{name}: "
                + ", ".join(f"{v:.3f}" for v in values)
                + f" -> best {min(values):.3f}, median {statistics.median(values):.3f}"
            )

        if not args.skip_memory:
            mem_db = tmp / "memory.duckdb"
            shutil.copy(source, mem_db)
            cli_elapsed, peak, _ = peak_memory_of_cli_migration(mem_db)
            print(
                f"kimera migrate (CLI) on the same rows: {cli_elapsed:.1f} s, "
                f"peak RSS {peak:,.0f} MiB"
            )
    print(f"duckdb {duckdb.__version__}")


if __name__ == "__main__":
    main()
