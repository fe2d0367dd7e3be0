"""Online operation benchmark: the application's write latency while the server does heavy work.

Usage:
  .venv/bin/python bench/bench_online.py [--geoids 800000 --scars 200000] [--rounds 3] \
      [--source var/bench/online_1m.duckdb]   # reuse (or keep) the generated demo database

Everything runs in one process run, side by side, so the ratios share the machine's load.
Each round takes fresh copies of the demo database (legacy tables only) and measures:

* **migration time**, embedded vs through the server: ``kimera migrate --json`` on a copy
  (the file opened by the CLI itself) and ``kimera migrate --db kimera://...`` on another
  copy owned by ``kimera db serve``, nothing else running; the time is the report's own
  ``seconds`` (the ``migrate()`` call, without the interpreter's start). The order of the
  two alternates between rounds.
* **write latency during a migration**: a third copy behind a server; this process stores
  identities through the server (``Storage.store``, routed as ``dual-write``: one
  transaction writing both stores and ``dual_write_log``) at ``--rate`` per second while
  ``kimera migrate --db ADDRESS`` runs; p50 and p99 of the stores that started during it.
* **write latency during a full verification**: the same, while ``kimera verify --db
  ADDRESS --no-cache`` (every row digested) runs on the migrated copy.
* **idle write latency**, through the server vs embedded: alternating blocks of stores on
  the server's migrated copy and on the embedded migrated copy (this process opens it
  itself), so both see the same moments of load.

A store that raises is counted and printed (the figures would not be honest otherwise).
Results: one line per round, then best and median over the rounds of every figure and
ratio, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kimera_core.db import open_database
from kimera_core.demo import generate_demo_data
from kimera_core.storage import Storage
from kimera_core.workload import random_geoid, random_scar

KIMERA = str(Path(sys.executable).parent / "kimera")
STAGE = "dual-write"  # the application's writes go to both stores, one transaction each
SERVE_OPTIONS: list[str] = []  # extra `kimera db serve` options (--checkpoint-threshold)


class Server:
    """``kimera db serve`` on a copy, on a free port, stopped by its PID (SIGTERM)."""

    def __init__(self, path: Path, log: Path) -> None:
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [KIMERA, "db", "serve", "--db", str(path), "--port", "0", *SERVE_OPTIONS],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        self.address = self.proc.stdout.readline().strip() if ready else ""
        if not self.address.startswith("kimera://"):
            self.stop()
            raise RuntimeError(f"kimera db serve did not start: {log.read_text()}")

    def stop(self) -> None:
        """SIGTERM by PID; SIGKILL after 300 s, said on stdout (the WAL then stays)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                print(f"  the server (pid {self.proc.pid}) did not stop in 300 s: SIGKILL")
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc.stdout.close()


class Writer:
    """Stores random identities through one Storage, timing each ``store`` (ms)."""

    def __init__(self, target: str, seed: int, rate: float) -> None:
        self.storage = Storage(open_database(target), stage=STAGE)
        self.rng = random.Random(seed)
        self.interval = 1.0 / rate
        self.ids: list[str] = []
        self.errors: list[str] = []

    def store_one(self) -> float:
        now = time.time()
        if len(self.ids) < 4 or self.rng.random() < 0.7:
            item = random_geoid(self.rng, now)
        else:
            item = random_scar(self.rng, self.ids, now)
        t0 = time.perf_counter()
        try:
            self.storage.store(item)
        except Exception as exc:  # noqa: BLE001 - counted and printed, never hidden
            self.errors.append(f"{type(exc).__name__}: {exc}")
        ms = (time.perf_counter() - t0) * 1000
        if item.identity_type == "geoid":
            self.ids.append(item.id)
        return ms

    def write(
        self, count: int | None = None, until: Callable[[], bool] | None = None
    ) -> list[float]:
        """``count`` stores, or stores until ``until()``, at the writer's rate; their ms."""
        latencies: list[float] = []
        started = time.perf_counter()
        while (count is None or len(latencies) < count) and not (until and until()):
            latencies.append(self.store_one())
            delay = started + len(latencies) * self.interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        return latencies

    def close(self) -> None:
        self.storage.close()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([KIMERA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def migration_seconds(proc: subprocess.Popen, unbalanced: list[str] | None = None) -> float:
    """The report's ``seconds``; exit 3 (unbalanced) is noted in ``unbalanced`` if given."""
    out, err = proc.communicate()
    if proc.returncode != 0 and not (proc.returncode == 3 and unbalanced is not None):
        raise RuntimeError(f"kimera migrate exited {proc.returncode}: {err.decode()[-2000:]}")
    report = json.loads(out)
    if not report["balanced"] and unbalanced is not None:
        unbalanced.append(f"{report['legacy_rows']:,} legacy rows, {report['counts']}")
    return float(report["seconds"])


def while_running(writer: Writer, proc: subprocess.Popen) -> list[float]:
    """The writer's latencies while ``proc`` runs (it is waited for)."""
    latencies = writer.write(until=lambda: proc.poll() is not None)
    if not latencies:
        raise RuntimeError("the background command ended before the first write")
    return latencies


def one_round(source: Path, tmp: Path, index: int, rate: float, idle: int) -> dict[str, float]:
    embedded, alone, live = (
        tmp / f"{name}-{index}.duckdb" for name in ("embedded", "alone", "live")
    )
    for copy in (embedded, alone, live):
        shutil.copy(source, copy)
    result: dict[str, float] = {}

    # migration time, embedded vs through the server, nothing else running (order alternates)
    def migrate_embedded() -> None:
        result["migrate_embedded_s"] = migration_seconds(
            cli("migrate", "--db", str(embedded), "--json")
        )

    def migrate_served() -> None:
        server = Server(alone, tmp / f"alone-{index}.log")
        try:
            result["migrate_server_s"] = migration_seconds(
                cli("migrate", "--db", server.address, "--json")
            )
        finally:
            server.stop()

    for step in (
        (migrate_embedded, migrate_served) if index % 2 else (migrate_served, migrate_embedded)
    ):
        step()

    server = Server(live, tmp / f"live-{index}.log")
    writer = Writer(server.address, seed=index, rate=rate)
    local = Writer(str(embedded), seed=100 + index, rate=rate)
    try:
        writer.write(count=20)  # warm: the server's cursor, the caches
        migration = cli("migrate", "--db", server.address, "--json")
        during_migration = while_running(writer, migration)
        unbalanced: list[str] = []
        result["migrate_server_with_writer_s"] = migration_seconds(migration, unbalanced)
        if unbalanced:  # the reconciliation counts the writer's later rows: docs/benchmarks.md
            print(
                f"  round {index}: the migration beside the writer reported unbalanced: "
                f"{unbalanced[0]}"
            )

        verify = cli("verify", "--db", server.address, "--no-cache", "--json")
        during_verify = while_running(writer, verify)
        verify.communicate()
        if verify.returncode not in (0, 1):
            raise RuntimeError(f"kimera verify exited {verify.returncode}")

        local.write(count=20)
        served_idle: list[float] = []
        embedded_idle: list[float] = []
        block = max(1, idle // 3)
        for _ in range(3):  # alternating blocks: both see the same moments of load
            served_idle += writer.write(count=block)
            embedded_idle += local.write(count=block)
    finally:
        writer.close()
        local.close()
        server.stop()
    for copy in (embedded, alone, live):
        wal = copy.with_name(copy.name + ".wal")
        if wal.exists():  # a clean stop checkpoints and removes it
            print(f"  round {index}: {wal.name} left behind ({wal.stat().st_size:,} bytes)")
        copy.unlink()
        wal.unlink(missing_ok=True)
    errors = writer.errors + local.errors
    if errors:
        print(f"  round {index}: {len(errors)} failed stores, e.g. {errors[0]}")
    result["store_errors"] = float(len(errors))
    for name, values in (
        ("idle_server", served_idle),
        ("idle_embedded", embedded_idle),
        ("during_migration", during_migration),
        ("during_verify", during_verify),
    ):
        result[f"{name}_p50_ms"] = percentile(values, 0.50)
        result[f"{name}_p99_ms"] = percentile(values, 0.99)
        result[f"{name}_n"] = float(len(values))
    result["idle_p50_ratio"] = result["idle_server_p50_ms"] / result["idle_embedded_p50_ms"]
    result["migrate_ratio"] = result["migrate_server_s"] / result["migrate_embedded_s"]
    return result


def best_median(values: list[float], lower_is_better: bool = True) -> str:
    best = min(values) if lower_is_better else max(values)
    return f"best {best:.3f}, median {statistics.median(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geoids", type=int, default=800_000)
    parser.add_argument("--scars", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0, help="stores per second")
    parser.add_argument("--idle", type=int, default=300, help="idle stores per side and round")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="demo database to reuse (generated there first when missing; never modified)",
    )
    parser.add_argument(
        "--checkpoint-threshold",
        default=None,
        help="passed to every `kimera db serve` (WAL size at which DuckDB checkpoints by itself)",
    )
    args = parser.parse_args()
    if args.checkpoint_threshold:
        SERVE_OPTIONS.extend(["--checkpoint-threshold", args.checkpoint_threshold])
    os.environ.setdefault("KIMERA_DB_TOKEN", secrets.token_urlsafe(32))  # servers and clients
    load_before = os.getloadavg()

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
            print(f"demo database: {rows:,} legacy rows in {time.perf_counter() - t0:.1f} s")
            if args.source is not None:
                shutil.copy(source, args.source)

        rounds = []
        for index in range(1, args.rounds + 1):
            r = one_round(source, tmp, index, args.rate, args.idle)
            rounds.append(r)
            print(
                f"round {index}: migrate embedded {r['migrate_embedded_s']:.1f} s, server "
                f"{r['migrate_server_s']:.1f} s ({r['migrate_ratio']:.2f}x), server with the "
                f"writer {r['migrate_server_with_writer_s']:.1f} s; store p50/p99 ms: idle "
                f"server {r['idle_server_p50_ms']:.1f}/{r['idle_server_p99_ms']:.1f}, idle "
                f"embedded {r['idle_embedded_p50_ms']:.1f}/{r['idle_embedded_p99_ms']:.1f} "
                f"({r['idle_p50_ratio']:.2f}x), during the migration "
                f"{r['during_migration_p50_ms']:.1f}/{r['during_migration_p99_ms']:.1f} "
                f"(n={r['during_migration_n']:.0f}), during the verification "
                f"{r['during_verify_p50_ms']:.1f}/{r['during_verify_p99_ms']:.1f} "
                f"(n={r['during_verify_n']:.0f}); failed stores {r['store_errors']:.0f}",
                flush=True,
            )

    print(f"\nover {len(rounds)} rounds ({rows:,} legacy rows, {args.rate:g} stores/s):")
    for key, label in (
        ("idle_server_p50_ms", "idle store p50 through the server (ms)"),
        ("idle_server_p99_ms", "idle store p99 through the server (ms)"),
        ("idle_embedded_p50_ms", "idle store p50 embedded (ms)"),
        ("idle_p50_ratio", "idle p50 server / embedded (target <= 2)"),
        ("during_migration_p50_ms", "store p50 during the migration (ms)"),
        ("during_migration_p99_ms", "store p99 during the migration (ms, target <= 50)"),
        ("during_verify_p50_ms", "store p50 during the full verification (ms)"),
        ("during_verify_p99_ms", "store p99 during the full verification (ms)"),
        ("migrate_embedded_s", "migration embedded (s)"),
        ("migrate_server_s", "migration through the server (s)"),
        ("migrate_ratio", "migration server / embedded (target <= 1.3)"),
        ("migrate_server_with_writer_s", "migration through the server with the writer (s)"),
        ("store_errors", "failed stores"),
    ):
        values = [r[key] for r in rounds]
        print(f"  {label}: " + ", ".join(f"{v:.2f}" for v in values) + f" -> {best_median(values)}")
    load_after = os.getloadavg()
    print(
        "load average (1/5/15 min) before "
        + "/".join(f"{v:.2f}" for v in load_before)
        + ", after "
        + "/".join(f"{v:.2f}" for v in load_after)
    )


if __name__ == "__main__":
    main()
