"""Query latency on 1 M identities in a stage that reads legacy and in read-new, p50 / p99.

    python bench/bench_query.py [--geoids 700000 --scars 300000] [--queries 300]

Builds (once, reused) a demo database of geoids + scars, migrates it, sets the stage to
read-new (reads from identities) and builds the text index from identities; and a copy in
`verified` (dual write on, backfill done, reads from the legacy tables) with the text index
built from legacy. Then runs the same random queries (entropy range, text search, by-id
lookup) against both, back to back per query so that load from other processes hits all
alike: through a real `kimera serve` per file over HTTP (one keep-alive client each,
sequential), in-process as the server runs them (with the ReadSnapshot of the read-only
file), and in-process through SQL only (for the legacy file only the first
--legacy-sql-queries of each kind: there an entropy page is a scan of both legacy tables).
Semantic search: bench/bench_semantic.py. Prints JSON; docs/benchmarks.md records runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.servers import free_port, stop_process_group, wait_until  # noqa: E402

from kimera_core import query, textsearch  # noqa: E402
from kimera_core.demo import generate_demo_data  # noqa: E402
from kimera_core.migration import migrate  # noqa: E402
from kimera_core.rollout import set_stage  # noqa: E402

# dual write on, backfill complete and verified, reads still from the legacy tables
LEGACY_STAGE = "verified"
STORES = ("legacy", "new")
KINDS = ("entropy", "text", "by_id")
TARGET_MS = {"p50_ms": 20.0, "p99_ms": 50.0}

WORDS = [
    "river",
    "memory",
    "morning light",
    "bibliothèque",
    "promesse oubliée",
    "المكتبة",
    "ضوء الصباح",
    "biblioteca antigua",
    "Erinnerung",
    "図書館",
    "記憶",
    "contradiction rule",
    "the quiet city",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(pct(ms, 0.99), 2),
        "n": len(ms),
    }


def prepare(path: Path, geoids: int, scars: int) -> dict[str, float]:
    timings: dict[str, float] = {}
    if path.exists():
        return timings
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    generate_demo_data(path, geoids=geoids, scars=scars, seed=11)
    timings["demo_data_s"] = round(time.perf_counter() - t, 1)
    with duckdb.connect(str(path)) as con:
        t = time.perf_counter()
        migrate(con)
        timings["migrate_s"] = round(time.perf_counter() - t, 1)
        set_stage(con, "read-new", "bench", "query benchmark")
        t = time.perf_counter()
        textsearch.build_text_index(con, "new")
        timings["text_index_s"] = round(time.perf_counter() - t, 1)
        con.execute("CHECKPOINT")
    return timings


def prepare_legacy(path: Path, legacy: Path) -> dict[str, float]:
    """A copy of the read-new database in ``LEGACY_STAGE``, text indexed from legacy."""
    timings: dict[str, float] = {}
    if legacy.exists():
        return timings
    partial = legacy.with_suffix(".partial")
    shutil.copy(path, partial)
    with duckdb.connect(str(partial)) as con:
        set_stage(con, LEGACY_STAGE, "bench", "query benchmark, legacy reads")
        t = time.perf_counter()
        textsearch.build_text_index(con, "legacy")
        timings["legacy_text_index_s"] = round(time.perf_counter() - t, 1)
        con.execute("CHECKPOINT")
    partial.rename(legacy)
    return timings


def workload(con: duckdb.DuckDBPyConnection, n: int, seed: int) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    ids = [
        r[0]
        for r in con.execute(
            "SELECT id FROM identities ORDER BY hash(id, 1) LIMIT ?", [n]
        ).fetchall()
    ]
    plan: list[tuple[str, dict]] = []
    for i in range(n):
        low = round(rng.uniform(0, 2.5), 3)
        plan.append(("entropy", {"min_entropy": low, "max_entropy": low + 0.5, "limit": 50}))
        plan.append(("text", {"q": rng.choice(WORDS), "limit": 20}))
        plan.append(("by_id", {"id": ids[i % len(ids)]}))
    return plan


def call(
    con: duckdb.DuckDBPyConnection, kind: str, p: dict, snapshot: query.ReadSnapshot | None
) -> None:
    """One planned query as a function call; with ``snapshot`` as `kimera serve` runs it."""
    if kind == "entropy":
        query.find_identities_by_entropy(
            con, p["min_entropy"], p["max_entropy"], limit=p["limit"], snapshot=snapshot
        )
    elif kind == "text":
        query.search_text(con, p["q"], limit=p["limit"], snapshot=snapshot)
    else:
        query.get_identity(con, p["id"], source=None if snapshot is None else snapshot.source)


def request(client: httpx.Client, kind: str, p: dict) -> None:
    if kind == "by_id":
        r = client.get("/identities/" + p["id"])
    else:
        r = client.get("/identities" if kind == "entropy" else "/search", params=p)
    r.raise_for_status()


@contextmanager
def served(path: Path, facts: dict) -> Iterator[httpx.Client]:
    """A real `kimera serve` on a free port and a keep-alive client to it; ``facts`` gets
    its start-up time (with the snapshot load) and its peak memory."""
    port = free_port()
    kimera = Path(sys.executable).parent / "kimera"
    with path.with_suffix(".serve.log").open("w") as log:  # why a server did not start
        proc = subprocess.Popen(
            [str(kimera), "serve", "--db", str(path), "--port", str(port), "--no-index"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 300, 0.5, "serve")
        facts["serve_ready_s"] = round(time.perf_counter() - t, 1)
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
        status = Path(f"/proc/{proc.pid}/status")
        if status.exists():  # Linux: the server's peak resident memory
            peak = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM"))
            facts["serve_peak_rss_mb"] = round(int(peak.split()[1]) / 1024)
    finally:
        stop_process_group(proc)


def side_by_side(
    cons: dict[str, duckdb.DuckDBPyConnection],
    snapshots: dict[str, query.ReadSnapshot],
    clients: dict[str, httpx.Client],
    plan: list[tuple[str, dict]],
    legacy_sql_queries: int,
) -> dict:
    """Each query every way against both stores, back to back: over HTTP, in-process as the
    server runs it (snapshot), in-process through SQL only (legacy: the first few only)."""
    ways: dict[tuple[str, str], Any] = {}
    for store in STORES:
        con, snapshot, client = cons[store], snapshots[store], clients[store]
        ways[store, "http"] = lambda k, p, c=client: request(c, k, p)
        ways[store, "in_process"] = lambda k, p, c=con, s=snapshot: call(c, k, p, s)
        ways[store, "in_process_sql"] = lambda k, p, c=con: call(c, k, p, None)
    for kind, p in plan[:30]:  # warm-up: connection, DuckDB buffers, code paths
        for (store, way), run in ways.items():
            if store == "new" or way != "in_process_sql":
                run(kind, p)
    times = {w: {k: [] for k in KINDS} for w in ways}
    for kind, p in plan:
        for (store, way), run in ways.items():
            scan = (store, way) == ("legacy", "in_process_sql")
            if scan and len(times[store, way][kind]) >= legacy_sql_queries:
                continue
            t = time.perf_counter()
            run(kind, p)
            times[store, way][kind].append((time.perf_counter() - t) * 1000)
    out: dict = {store: {} for store in STORES}
    for (store, way), kinds in times.items():
        out[store][way] = {k: summary(v) for k, v in kinds.items() if v}
    for store in STORES:
        result = out[store]
        result["http_over_in_process_p50"] = {
            k: round(result["http"][k]["p50_ms"] / result["in_process"][k]["p50_ms"], 2)
            for k in KINDS
        }
        result["sql_over_snapshot_p50"] = {
            k: round(result["in_process_sql"][k]["p50_ms"] / result["in_process"][k]["p50_ms"], 2)
            for k in KINDS
            if k in result["in_process_sql"]
        }
    out["http_legacy_over_new_p50"] = {
        k: round(out["legacy"]["http"][k]["p50_ms"] / out["new"]["http"][k]["p50_ms"], 2)
        for k in KINDS
    }
    out["http_targets_met"] = all(
        out[store]["http"][k][m] <= limit
        for store in STORES
        for k in KINDS
        for m, limit in TARGET_MS.items()
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", type=Path, default=ROOT / "var" / "bench" / "query_1m.duckdb")
    parser.add_argument("--geoids", type=int, default=700_000)
    parser.add_argument("--scars", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--legacy-sql-queries", type=int, default=10)
    args = parser.parse_args()
    paths = {"new": args.db, "legacy": args.db.with_name(args.db.stem + "_legacy.duckdb")}
    out: dict = {"duckdb": duckdb.__version__, "legacy_stage": LEGACY_STAGE}
    out["prepare"] = prepare(paths["new"], args.geoids, args.scars)
    out["prepare"].update(prepare_legacy(paths["new"], paths["legacy"]))
    with contextlib.ExitStack() as stack:
        cons, snapshots, clients = {}, {}, {}
        for store in STORES:
            con = stack.enter_context(duckdb.connect(str(paths[store]), read_only=True))
            cons[store] = con
            t = time.perf_counter()
            snapshots[store] = query.ReadSnapshot(con)
            if snapshots[store].source != store:
                raise SystemExit(f"{paths[store]} reads {snapshots[store].source}, not {store}")
            snapshots[store].warm()
            out[f"{store}_snapshot_load_s"] = round(time.perf_counter() - t, 1)
        out["identities"] = cons["new"].execute("SELECT count(*) FROM identities").fetchone()[0]
        out["legacy_rows"] = (
            cons["legacy"]
            .execute(
                "SELECT (SELECT count(*) FROM legacy_geoids) + (SELECT count(*) FROM legacy_scars)"
            )
            .fetchone()[0]
        )
        plan = workload(cons["new"], args.queries, seed=3)
        for store in STORES:
            facts = out.setdefault(f"{store}_serve", {})
            clients[store] = stack.enter_context(served(paths[store], facts))
        # the machine is shared: its 1-minute load average around the measured part
        out["load_average_before"] = round(os.getloadavg()[0], 1)
        out.update(side_by_side(cons, snapshots, clients, plan, args.legacy_sql_queries))
        out["load_average_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
