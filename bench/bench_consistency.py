"""Consistency benchmarks, side by side in one run.

Synthetic part, over 1 M legacy geoids and 1 M identities:

* full verification without the digest cache (every row digested: the pre-cache cost),
* cold (empty cache) and warm full verification, and the checksum pass rate of the warm one,
  against the floor: one bare read of every stored byte the fingerprints cover,
* one changed row found by bisection (warm),
* full (warm) and incremental verification after 1 k rows changed on both sides.

Demo part, on a real-shaped database: ``kimera demo-data`` (800 k geoids, 200 k scars, its
broken rows) migrated with ``kimera migrate``, so thousands of rows are in quarantine:

* ``kimera verify`` cold (no digest cache) and warm, as a user runs it (the CLI process; the
  verifier's own time from its report beside the wall time of the process);
* reladiff 0.6's joindiff on the same geoids, compared on the same fields (both stores'
  geoids as views with the ADR-001 fields; the new side read from the P1 document), run from
  a throwaway virtualenv (``--reladiff-venv``, created with ``pip install reladiff==0.6.*
  duckdb`` when missing: reladiff is not a project dependency).

Cold runs drop the digest cache before each run; every figure is the best and the median of
``--repeat`` runs, with the process's CPU seconds (user + system, which the load of a shared
machine inflates less than wall time) and the load average. The floor beside them: one bare
read of every stored column the fingerprints cover (what any verification that reads every
row costs), the fingerprint pass alone (what a warm run cannot avoid) and the first bound
parameter of a fresh process (duckdb's Python client imports pandas then: every `kimera
verify` pays it, inside the verifier's own seconds).

Usage: .venv/bin/python bench/bench_consistency.py [--parts synthetic,demo] [--rows 1000000]
       [--changes 1000] [--repeat 3] [--geoids 800000] [--scars 200000]
       [--reladiff-venv /tmp/reladiff-venv] [--demo-db PATH]

``--demo-db`` starts from a copy of an already migrated demo database (the setup takes a
minute); without it the database is built and migrated in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.clean_migration import migrate_documents  # noqa: E402

from kimera_core.consistency import FINE_BITS, SOURCES, digests, verify  # noqa: E402
from kimera_core.consistency.cache import SCAN_MEMORY_LIMIT  # noqa: E402
from kimera_core.db import open_database  # noqa: E402
from kimera_core.identity import epoch_to_iso  # noqa: E402
from kimera_core.legacy import create_legacy_schema  # noqa: E402
from kimera_core.sql import vetted_identifier  # noqa: E402

LEGACY_SQL = """
INSERT INTO legacy_geoids
SELECT substr(sha256(i::VARCHAR), 1, 16), 'The river remembers · ' || i,
       'The river remembers · ' || i, ['en', 'fr', 'ar'][1 + i % 3], '["memory", "art"]',
       round(0.1 + (i % 1000) / 1000.0, 4),
       '{"terms": [{"symbol": "echo", "intensity": ' || (1 + i % 7) || '}], "source": "ingest"}',
       1790000000.0 + i / 1000.0, 1790000000.0 + i / 1000.0
FROM range(?) t(i)
"""
NUMERIC = {"weight", "created_at", "updated_at"}


def floor_sql() -> str:
    """The floor of any verification that reads every row: one pass over every stored column
    the fingerprints cover, doing nothing but touch each value (text lengths, numbers summed)."""
    passes = []
    for source in SOURCES:
        touch = " + ".join(
            f"coalesce({vetted_identifier(c)}, 0)"
            if c in NUMERIC
            else f"coalesce(strlen({vetted_identifier(c)}::VARCHAR), 0)"
            for c in source.stored
        )
        passes.append(f"SELECT count(*), sum({touch}) FROM {vetted_identifier(source.table)}")
    return " UNION ALL ".join(passes)


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def best(repeat, fn):
    return min((timed(fn) for _ in range(repeat)), key=lambda x: x[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="synthetic,demo")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--geoids", type=int, default=800_000)
    parser.add_argument("--scars", type=int, default=200_000)
    parser.add_argument("--reladiff-venv", type=Path, default=Path("/tmp/reladiff-venv"))
    parser.add_argument("--demo-db", type=Path, default=None)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if "synthetic" in parts:
        synthetic(args)
    if "demo" in parts:
        demo(args)


def synthetic(args: argparse.Namespace) -> None:
    """The verifier on 1 M synthetic geoids migrated set-based (no quarantine)."""
    n = args.rows

    with tempfile.TemporaryDirectory() as tmp:
        con = open_database(Path(tmp) / "c.duckdb", create=True)
        create_legacy_schema(con)
        build, _ = timed(
            lambda: (con.execute(LEGACY_SQL, [n]), migrate_documents(con, scars=False))
        )
        con.execute("CHECKPOINT")
        print(f"setup: {n:,} legacy geoids + {n:,} identities in {build:.1f} s")

        plain, report = best(args.repeat, lambda: verify(con, record=False, cache=False))
        print(
            f"full verification without the cache (every row digested): {plain:.2f} s "
            f"(best of {args.repeat}), verdict {report.to_dict()['verdict']}"
        )
        con.execute("DROP TABLE IF EXISTS kimera_verify_digests")
        cold, report = timed(lambda: verify(con, record=False))
        print(
            f"full verification, cold cache: {cold:.2f} s ({cold / plain:.2f}x without cache), "
            f"{report.checksums['digest_cache']['written']:,} segment digests cached"
        )
        warm, report = best(args.repeat, lambda: verify(con, record=False))
        cache = report.checksums["digest_cache"]
        print(
            f"full verification, warm cache: {warm:.2f} s (best of {args.repeat}; target <= 1 s; "
            f"{warm / plain:.2f}x without cache), {cache['reused']:,} of {cache['segments']:,} "
            f"segments reused, {cache['rows_digested']:,} rows digested, "
            f"verdict {report.to_dict()['verdict']}"
        )
        rows = report.checksums["legacy"]["rows"] + report.checksums["new"]["rows"]
        checksum = report.checksums["pass_seconds"]
        floor, _ = best(args.repeat, lambda: con.execute(floor_sql()).fetchall())
        print(
            f"checksum pass of the warm run (fingerprint every row, reuse cached digests, "
            f"segment sums; both sides): {checksum:.2f} s = {rows / checksum / 1e6:.1f} M rows/s "
            f"(target >= 20 M rows/s); floor, one bare read of the same columns: {floor:.2f} s "
            f"= {rows / floor / 1e6:.1f} M rows/s ({checksum / floor:.1f}x the floor)"
        )

        one = "WHERE gid = (SELECT gid FROM legacy_geoids ORDER BY gid LIMIT 1 OFFSET 4242)"
        con.execute(f"UPDATE legacy_geoids SET weight = weight + 0.5 {one}")
        t, report = timed(lambda: verify(con, record=False))
        levels = [lv["segments_differing"] for lv in report.checksums["levels"]]
        print(
            f"full verification (warm), one changed row: {t:.2f} s; found "
            f"{report.field_mismatches.sample}; differing segments per level {levels}; "
            f"rows compared row by row {report.checksums['rows_compared_row_level']:,}"
        )
        con.execute(f"UPDATE legacy_geoids SET weight = weight - 0.5 {one}")

        verify(con)  # the recorded base of the incremental run
        time.sleep(0.01)
        con.execute(
            # md5 order: keys spread over the whole key-hash space, not bunched in a few segments
            "CREATE TEMP TABLE changed AS SELECT gid FROM legacy_geoids ORDER BY md5(gid) LIMIT ?",
            [args.changes],
        )
        stamp = round(time.time() + 1, 6)
        con.execute(
            "UPDATE legacy_geoids SET raw = raw || ' (edited)', updated_at = $t "
            "WHERE gid IN (SELECT gid FROM changed)",
            {"t": stamp},
        )
        con.execute(
            "UPDATE identities SET data = json_merge_patch(data, json_object("
            "'raw', (data->>'$.raw') || ' (edited)', 'updated_at', $iso)), updated_at = $t "
            "WHERE id IN (SELECT gid FROM changed)",
            {"t": stamp, "iso": epoch_to_iso(stamp)},
        )
        t, report = timed(lambda: verify(con, incremental=True, record=False))
        print(
            f"incremental verification after {args.changes:,} changes: {t:.3f} s, "
            f"{report.keys_checked:,} keys checked, verdict {report.to_dict()['verdict']}"
        )
        t, report = timed(lambda: verify(con, record=False))
        cache = report.checksums["digest_cache"]
        print(
            f"full verification (warm) after {args.changes:,} changes: {t:.2f} s "
            f"({t / plain:.2f}x without cache), {cache['recomputed']:,} segments "
            f"({cache['rows_digested']:,} rows) digested again, "
            f"verdict {report.to_dict()['verdict']}"
        )
        con.close()


# --- the demo part: real-shaped data with its quarantine, against reladiff -----------------
KIMERA = Path(sys.executable).parent / "kimera"
# Both stores' geoids with the ADR-001 fields, for reladiff: the legacy columns (JSON
# minified), the new side from the P1 document (what P1 reads), timestamps in whole
# microseconds on both sides (so equal rows compare equal).
RELADIFF_VIEWS = (
    """CREATE OR REPLACE VIEW reladiff_legacy AS
       SELECT gid, raw, echo, lang_axis, json(tags)::VARCHAR AS tags, weight,
              json(meta)::VARCHAR AS meta,
              CAST(round(created_at * 1000000) AS BIGINT) AS created_at,
              CAST(round(updated_at * 1000000) AS BIGINT) AS updated_at
       FROM legacy_geoids""",
    """CREATE OR REPLACE VIEW reladiff_identities AS
       SELECT id AS gid, data->>'$.raw' AS raw, data->>'$.echo' AS echo,
              data->>'$.lang_axis' AS lang_axis, (data->'$.tags')::VARCHAR AS tags,
              TRY_CAST(data->>'$.weight' AS DOUBLE) AS weight, (data->'$.meta')::VARCHAR AS meta,
              epoch_us(CAST(data->>'$.created_at' AS TIMESTAMPTZ)) AS created_at,
              epoch_us(CAST(data->>'$.updated_at' AS TIMESTAMPTZ)) AS updated_at
       FROM identities WHERE identity_type = 'geoid'""",
)
RELADIFF_FIELDS = ("raw", "echo", "lang_axis", "tags", "weight", "meta", "created_at", "updated_at")
# Run inside the reladiff virtualenv: joindiff of the two views, timed, as JSON.
RELADIFF_SCRIPT = """
import json, sys, time
from reladiff import Algorithm, connect_to_table, diff_tables
path, fields = sys.argv[1], tuple(sys.argv[2].split(","))
a = connect_to_table("duckdb://" + path, "reladiff_legacy", "gid", extra_columns=fields)
b = connect_to_table("duckdb://" + path, "reladiff_identities", "gid", extra_columns=fields)
t0 = time.perf_counter()
diff = list(diff_tables(a, b, algorithm=Algorithm.JOINDIFF))
print(json.dumps({"seconds": time.perf_counter() - t0, "differences": len(diff)}))
"""


def kimera(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(KIMERA), *map(str, args)], capture_output=True, text=True, check=False
    )


def reladiff_python(venv: Path) -> Path:
    """The reladiff virtualenv's python, created (reladiff 0.6 and duckdb) when missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "reladiff==0.6.*", "duckdb"], check=True
        )
    return python


def timed_verify(db: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of the ``kimera verify --json`` process, its report)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = kimera("verify", "--db", db, "--json", "--sample", "5")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in (0, 1):
        raise RuntimeError(result.stderr)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(result.stdout)


def drop_cache(db: Path) -> None:
    with open_database(db) as con:
        con.execute("DROP TABLE IF EXISTS kimera_verify_digests")
        con.execute("CHECKPOINT")


def summary(name: str, runs: list[tuple[float, float, dict]]) -> dict:
    """Print and return best / median of the verifier's own seconds, the process and its CPU."""
    own = [r[2]["seconds"] for r in runs]
    wall = [r[0] for r in runs]
    cpu = [r[1] for r in runs]
    last = runs[-1][2]
    cache = last["checksums"]["digest_cache"]
    print(
        f"{name}: verifier best {min(own):.2f} s, median {statistics.median(own):.2f} s "
        f"({len(runs)} runs); process best {min(wall):.2f} s, median "
        f"{statistics.median(wall):.2f} s; process CPU best {min(cpu):.2f} s, median "
        f"{statistics.median(cpu):.2f} s; verdict {last['verdict']}, "
        f"{last['quarantined']['total']:,} rows in quarantine excluded up front, "
        f"{cache['rows_digested']:,} rows digested, {cache['segments_suspect']:,} segments "
        f"suspect, {cache['rows_normalised']:,} rows normalised, "
        f"{last['checksums']['rows_compared_row_level']:,} compared row by row; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    return {"best": min(own), "median": statistics.median(own)}


# Run in a fresh process, as ``kimera verify`` runs: the first read of each column pays for
# loading its blocks, which a warm process would not.
FLOOR_SCRIPT = """
import json, resource, sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
con.execute("SET enable_progress_bar = false")
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
c, t = cpu(), time.perf_counter()
con.execute(sys.argv[2]).fetchall()
print(json.dumps({"wall": time.perf_counter() - t, "cpu": cpu() - c}))
"""


# The first statement with a bound parameter in a process: duckdb's Python client (1.5.6)
# imports pandas then, whichever statement it is; `kimera verify` has numpy and pyarrow
# loaded already (the CLI imports them), so they are loaded first here too.
IMPORT_SCRIPT = """
import json, resource, sys, time, duckdb, numpy, pyarrow
con = duckdb.connect(sys.argv[1], read_only=True)
con.execute("SELECT 1").fetchall()
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
c, t = cpu(), time.perf_counter()
con.execute("SELECT ?", [1]).fetchall()
print(json.dumps({"wall": time.perf_counter() - t, "cpu": cpu() - c,
                  "pandas": "pandas" in sys.modules}))
"""


def floors(db: Path, repeat: int) -> None:
    """The bare read of every stored column the fingerprints cover, and the fingerprint pass
    alone, each in a fresh process (wall and CPU seconds of the query)."""
    fingerprints = " UNION ALL ".join(
        f"SELECT sum(fsum) FROM ({digests.fingerprints_sql(s)})" for s in SOURCES
    )
    for name, script, sql in (
        ("bare read of the fingerprinted columns", FLOOR_SCRIPT, floor_sql()),
        (
            f"fingerprint pass (every row, {2**FINE_BITS:,} segments per table)",
            FLOOR_SCRIPT,
            fingerprints,
        ),
        (
            "the same under the warm run's memory_limit (cache.recycled_buffers)",
            FLOOR_SCRIPT,
            f"SET memory_limit = '{SCAN_MEMORY_LIMIT}B'; {fingerprints}",
        ),
        ("first bound parameter of a process (duckdb imports pandas)", IMPORT_SCRIPT, ""),
    ):
        runs = []
        for _ in range(repeat):
            out = subprocess.run(
                [sys.executable, "-c", script, str(db), sql],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs.append(json.loads(out.stdout))
        wall, cpu = [r["wall"] for r in runs], [r["cpu"] for r in runs]
        print(
            f"floor, {name}: best {min(wall):.2f} s, median {statistics.median(wall):.2f} s; "
            f"CPU best {min(cpu):.2f} s, median {statistics.median(cpu):.2f} s; "
            f"load {os.getloadavg()[0]:.1f}"
        )


def demo(args: argparse.Namespace) -> None:
    """kimera verify cold and warm on the migrated demo database, and reladiff's joindiff."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "demo.duckdb"
        t0 = time.perf_counter()
        if args.demo_db is not None:
            shutil.copyfile(args.demo_db, db)
            print(f"demo: a copy of {args.demo_db}")
        else:
            built = kimera(
                "demo-data", "--db", db, "--geoids", args.geoids, "--scars", args.scars,
                "--seed", 11,
            )  # fmt: skip
            if built.returncode != 0:
                raise RuntimeError(built.stderr)
            migrated = kimera("migrate", "--db", db, "--json")
            if migrated.returncode != 0:
                raise RuntimeError(migrated.stderr)
            counts = json.loads(migrated.stdout)["counts"]
            print(
                f"demo: {args.geoids:,} geoids + {args.scars:,} scars, migrated in "
                f"{time.perf_counter() - t0:.1f} s; {counts['quarantined']:,} rows quarantined"
            )
        cold_runs = []
        for _ in range(args.repeat):
            drop_cache(db)
            cold_runs.append(timed_verify(db))
        cold = summary("kimera verify, cold (no digest cache)", cold_runs)
        warm = summary("kimera verify, warm", [timed_verify(db) for _ in range(args.repeat)])
        floors(db, args.repeat)
        with open_database(db) as con:
            for view in RELADIFF_VIEWS:
                con.execute(view)
            geoids = con.execute("SELECT count(*) FROM reladiff_identities").fetchone()[0]
        python = reladiff_python(args.reladiff_venv)
        t0 = time.perf_counter()
        result = subprocess.run(
            [str(python), "-c", RELADIFF_SCRIPT, str(db), ",".join(RELADIFF_FIELDS)],
            capture_output=True,
            text=True,
            check=True,
        )
        process = time.perf_counter() - t0
        joindiff = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"reladiff 0.6 joindiff, geoids only ({args.geoids:,} legacy, {geoids:,} in "
            f"identities), fields {', '.join(RELADIFF_FIELDS)}: {joindiff['seconds']:.2f} s "
            f"(process {process:.2f} s), {joindiff['differences']:,} differences reported; "
            f"kimera verify is {joindiff['seconds'] / cold['best']:.1f}x faster cold and "
            f"{joindiff['seconds'] / warm['best']:.0f}x warm (best against its one run; medians "
            f"{joindiff['seconds'] / cold['median']:.1f}x and "
            f"{joindiff['seconds'] / warm['median']:.0f}x), and checks scars, counts, "
            f"quarantine and columns too; load {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
