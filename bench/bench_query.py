"""Query latency on 1 M identities: through the HTTP API and in-process, p50 / p99.

    python bench/bench_query.py [--geoids 700000 --scars 300000] [--queries 300]

Builds (once, reused) a demo database of geoids + scars, migrates it, sets the stage to
read-new (reads from identities) and builds the text index; then runs the same random
queries (entropy range, text search, by-id lookup) three ways, back to back per query:
through a real `kimera serve` over HTTP (one keep-alive client, sequential), in-process as
the server runs them (with the ReadSnapshot of the read-only file), and in-process through
SQL only. Semantic search: bench/bench_semantic.py. Prints JSON; docs/benchmarks.md
records a run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.servers import free_port, stop_process_group, wait_until  # noqa: E402

from kimera_core import query, textsearch  # noqa: E402
from kimera_core.demo import generate_demo_data  # noqa: E402
from kimera_core.migration import migrate  # noqa: E402
from kimera_core.rollout import set_stage  # noqa: E402

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
    proc = subprocess.Popen(
        [str(kimera), "serve", "--db", str(path), "--port", str(port), "--no-index"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
    con: duckdb.DuckDBPyConnection,
    snapshot: query.ReadSnapshot,
    client: httpx.Client,
    plan: list[tuple[str, dict]],
) -> dict:
    """Each query three ways back to back (so load from other processes hits all alike):
    over HTTP, in-process as the server runs it (snapshot), in-process through SQL only."""
    ways = {
        "http": lambda k, p: request(client, k, p),
        "in_process": lambda k, p: call(con, k, p, snapshot),
        "in_process_sql": lambda k, p: call(con, k, p, None),
    }
    for kind, p in plan[:30]:  # warm-up: connection, DuckDB buffers, code paths
        for way in ways.values():
            way(kind, p)
    times = {w: {"entropy": [], "text": [], "by_id": []} for w in ways}
    for kind, p in plan:
        for name, way in ways.items():
            t = time.perf_counter()
            way(kind, p)
            times[name][kind].append((time.perf_counter() - t) * 1000)
    out: dict = {w: {k: summary(v) for k, v in kinds.items()} for w, kinds in times.items()}
    out["http_over_in_process_p50"] = {
        k: round(out["http"][k]["p50_ms"] / out["in_process"][k]["p50_ms"], 2)
        for k in times["http"]
    }
    out["sql_over_snapshot_p50"] = {
        k: round(out["in_process_sql"][k]["p50_ms"] / out["in_process"][k]["p50_ms"], 2)
        for k in times["http"]
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", type=Path, default=ROOT / "var" / "bench" / "query_1m.duckdb")
    parser.add_argument("--geoids", type=int, default=700_000)
    parser.add_argument("--scars", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    out: dict = {"duckdb": duckdb.__version__}
    out["prepare"] = prepare(args.db, args.geoids, args.scars)
    with duckdb.connect(str(args.db), read_only=True) as con:
        out["identities"] = con.execute("SELECT count(*) FROM identities").fetchone()[0]
        plan = workload(con, args.queries, seed=3)
        t = time.perf_counter()
        snapshot = query.ReadSnapshot(con)
        snapshot.warm()
        out["snapshot_load_s"] = round(time.perf_counter() - t, 1)
        with served(args.db, out) as client:
            out.update(side_by_side(con, snapshot, client, plan))
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
