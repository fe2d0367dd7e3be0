"""Online operation benchmark: the application's write latency while the server does heavy work.

Usage:
  .venv/bin/python bench/bench_online.py [--geoids 800000 --scars 200000] [--rounds 3] \
      [--source var/bench/online_1m.duckdb]   # reuse (or keep) the generated demo database
      [--checkpoint-threshold 1GB]            # passed to every `kimera db serve`
      [--variants auto,auto:1,10000:1]        # served migrations side by side, ROWS[:THREADS]

Everything runs in one process run, side by side, so the ratios share the machine's load.
Each round takes fresh copies of the demo database (legacy tables only) and measures:

* **migration time**, embedded vs through the server: ``kimera migrate --json`` on a copy
  (the file opened by the CLI itself) and, per variant, ``kimera migrate --db
  kimera://...`` on another copy owned by ``kimera db serve``, nothing else running; the
  time is the report's own ``seconds`` (the ``migrate()`` call, without the interpreter's
  start). The order of the steps alternates between rounds.
* **write latency during a migration**, per variant: a copy behind a server; this process
  stores identities through the server (``Storage.store``, routed as ``dual-write``: one
  transaction writing both stores and ``dual_write_log``) at ``--rate`` per second while
  ``kimera migrate --db ADDRESS`` runs; p50 and p99 of the stores that started during it.
  A variant ``ROWS:THREADS`` cuts partitions of ``ROWS`` rows of the larger legacy table
  (``--partitions``; ``auto``: the engine's own size) on a server started with ``--threads
  THREADS`` (``default``: DuckDB's).
* **write latency during a full verification**: the same, while ``kimera verify --db
  ADDRESS --no-cache`` (every row digested) runs on a migrated copy behind the first
  variant's server.
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
from dataclasses import dataclass
from pathlib import Path

import duckdb
from demo_source import demo_source

from kimera_core.db import open_database
from kimera_core.storage import Storage
from kimera_core.workload import random_geoid, random_scar

KIMERA = str(Path(sys.executable).parent / "kimera")
STAGE = "dual-write"  # the application's writes go to both stores, one transaction each
SERVE_OPTIONS: list[str] = []  # extra `kimera db serve` options (--checkpoint-threshold)


class Server:
    """``kimera db serve`` on a copy, on a free port, stopped by its PID (SIGTERM)."""

    def __init__(self, path: Path, log: Path, options: list[str] | None = None) -> None:
        command = [KIMERA, "db", "serve", "--db", str(path), "--port", "0", *SERVE_OPTIONS]
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [*command, *(options or [])],
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


class Command:
    """``kimera ARGS`` in the background, its stdout and stderr in temporary files (a pipe
    nobody reads while the command runs would block it once its report fills the pipe)."""

    def __init__(self, *args: str) -> None:
        self.out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by communicate()
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by communicate()
        self.proc = subprocess.Popen([KIMERA, *args], stdout=self.out, stderr=self.err)

    def poll(self) -> int | None:
        return self.proc.poll()

    def communicate(self) -> tuple[bytes, bytes]:
        """Wait for the command; its stdout and stderr."""
        self.proc.wait()
        texts = []
        for fh in (self.out, self.err):
            fh.seek(0)
            texts.append(fh.read())
            fh.close()
        return texts[0], texts[1]

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


def cli(*args: str) -> Command:
    return Command(*args)


def migration_seconds(proc: Command, unbalanced: list[str] | None = None) -> float:
    """The report's ``seconds``; exit 3 (unbalanced) is noted in ``unbalanced`` if given."""
    out, err = proc.communicate()
    if proc.returncode != 0 and not (proc.returncode == 3 and unbalanced is not None):
        raise RuntimeError(f"kimera migrate exited {proc.returncode}: {err.decode()[-2000:]}")
    report = json.loads(out)
    if not report["balanced"] and unbalanced is not None:
        unbalanced.append(f"{report['legacy_rows']:,} legacy rows, {report['counts']}")
    return float(report["seconds"])


def while_running(writer: Writer, proc: Command) -> list[float]:
    """The writer's latencies while ``proc`` runs (it is waited for)."""
    latencies = writer.write(until=lambda: proc.poll() is not None)
    if not latencies:
        raise RuntimeError("the background command ended before the first write")
    return latencies


@dataclass(frozen=True)
class Variant:
    """How the served migrations of a round run: ``rows`` per partition (None: the engine's
    own ``ROWS_PER_PARTITION_SERVED``, i.e. no ``--partitions``) and the server's
    ``--threads`` (None: DuckDB's default, one per core). Written ``ROWS[:THREADS]`` or
    ``auto[:THREADS]``."""

    rows: int | None
    threads: int | None

    @classmethod
    def parse(cls, text: str) -> Variant:
        rows, _, threads = text.partition(":")
        return cls(
            None if rows in ("", "auto") else int(rows),
            int(threads) if threads not in ("", "default") else None,
        )

    def __str__(self) -> str:
        rows = "auto" if self.rows is None else f"{self.rows}"
        return f"{rows}:{'default' if self.threads is None else self.threads}"

    def serve_options(self) -> list[str]:
        return [] if self.threads is None else ["--threads", str(self.threads)]

    def migrate_args(self, largest: int) -> list[str]:
        """``--partitions`` so that each holds at most ``rows`` rows of the largest table (the
        engine's own rule, ``auto_partitions``); none for the engine's default."""
        return [] if self.rows is None else ["--partitions", str(max(1, -(-largest // self.rows)))]


def variant_round(
    variant: Variant, source: Path, tmp: Path, name: str, rate: float, seed: int, largest: int
) -> dict[str, float]:
    """A served migration alone, then one beside the writer (its store latencies)."""
    alone, live = (tmp / f"{kind}-{name}.duckdb" for kind in ("alone", "live"))
    for copy in (alone, live):
        shutil.copy(source, copy)
    result: dict[str, float] = {}
    args = variant.migrate_args(largest)
    server = Server(alone, tmp / f"alone-{name}.log", variant.serve_options())
    try:
        result["migrate_server_s"] = migration_seconds(
            cli("migrate", "--db", server.address, "--json", *args)
        )
    finally:
        server.stop()
    server = Server(live, tmp / f"live-{name}.log", variant.serve_options())
    writer = Writer(server.address, seed=seed, rate=rate)
    try:
        writer.write(count=20)  # warm: the server's cursor, the caches
        migration = cli("migrate", "--db", server.address, "--json", *args)
        latencies = while_running(writer, migration)
        unbalanced: list[str] = []
        result["migrate_server_with_writer_s"] = migration_seconds(migration, unbalanced)
        if unbalanced:  # the reconciliation counts the writer's later rows: docs/benchmarks.md
            print(f"  {name}: the migration beside the writer reported unbalanced: {unbalanced[0]}")
    finally:
        writer.close()
        server.stop()
    remove_copies(name, alone, live)
    if writer.errors:
        print(f"  {name}: {len(writer.errors)} failed stores, e.g. {writer.errors[0]}")
    result["store_errors"] = float(len(writer.errors))
    result["during_migration_p50_ms"] = percentile(latencies, 0.50)
    result["during_migration_p99_ms"] = percentile(latencies, 0.99)
    result["during_migration_n"] = float(len(latencies))
    return result


def remove_copies(name: str, *copies: Path) -> None:
    for copy in copies:
        wal = copy.with_name(copy.name + ".wal")
        if wal.exists():  # a clean stop checkpoints and removes it
            print(f"  {name}: {wal.name} left behind ({wal.stat().st_size:,} bytes)")
        copy.unlink()
        wal.unlink(missing_ok=True)


def one_round(
    source: Path,
    tmp: Path,
    index: int,
    rate: float,
    idle: int,
    variants: list[Variant],
    largest: int,
) -> tuple[dict[str, float], dict[Variant, dict[str, float]]]:
    """The embedded migration, each variant's served migrations (order alternating between
    rounds), then, with the first variant's server, the full verification beside the writer
    and the idle stores against an embedded copy."""
    embedded, live = (tmp / f"{name}-{index}.duckdb" for name in ("embedded", "live"))
    for copy in (embedded, live):
        shutil.copy(source, copy)
    result: dict[str, float] = {}
    by_variant: dict[Variant, dict[str, float]] = {}

    def migrate_embedded() -> None:
        result["migrate_embedded_s"] = migration_seconds(
            cli("migrate", "--db", str(embedded), "--json")
        )

    steps: list[Callable[[], None]] = [migrate_embedded]
    for number, variant in enumerate(variants):

        def served(variant: Variant = variant, number: int = number) -> None:
            by_variant[variant] = variant_round(
                variant, source, tmp, f"{index}-{number}", rate, index, largest
            )

        steps.append(served)
    for step in steps if index % 2 else reversed(steps):
        step()

    # the migrated copy behind the first variant's server: verification and idle stores
    first = variants[0]
    server = Server(live, tmp / f"live-{index}.log", first.serve_options())
    writer = Writer(server.address, seed=index, rate=rate)
    local = Writer(str(embedded), seed=100 + index, rate=rate)
    try:
        migration_seconds(cli("migrate", "--db", server.address, "--json"))
        writer.write(count=20)
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
    remove_copies(f"round {index}", embedded, live)
    errors = writer.errors + local.errors
    if errors:
        print(f"  round {index}: {len(errors)} failed stores, e.g. {errors[0]}")
    result["store_errors"] = float(len(errors))
    for name, values in (
        ("idle_server", served_idle),
        ("idle_embedded", embedded_idle),
        ("during_verify", during_verify),
    ):
        result[f"{name}_p50_ms"] = percentile(values, 0.50)
        result[f"{name}_p99_ms"] = percentile(values, 0.99)
        result[f"{name}_n"] = float(len(values))
    result["idle_p50_ratio"] = result["idle_server_p50_ms"] / result["idle_embedded_p50_ms"]
    for figures in by_variant.values():
        figures["migrate_ratio"] = figures["migrate_server_s"] / result["migrate_embedded_s"]
    return result, by_variant


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
    parser.add_argument(
        "--variants",
        default="auto",
        help="comma-separated ROWS[:THREADS] of the served migrations, side by side in each "
        "round: ROWS per partition (auto: the engine's default) and the server's --threads "
        "(default: DuckDB's); the first variant's server also runs the verification and the "
        "idle stores. E.g. auto,auto:1,10000:1",
    )
    args = parser.parse_args()
    variants = [Variant.parse(text.strip()) for text in args.variants.split(",")]
    if args.checkpoint_threshold:
        SERVE_OPTIONS.extend(["--checkpoint-threshold", args.checkpoint_threshold])
    os.environ.setdefault("KIMERA_DB_TOKEN", secrets.token_urlsafe(32))  # servers and clients
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        source = tmp / "legacy.duckdb"
        rows = args.geoids + args.scars
        demo_source(args.source, source, args.geoids, args.scars)
        with duckdb.connect(str(source), read_only=True) as con:
            largest = max(
                con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed
                for table in ("legacy_geoids", "legacy_scars")
            )

        rounds = []
        per_variant: dict[Variant, list[dict[str, float]]] = {v: [] for v in variants}
        for index in range(1, args.rounds + 1):
            r, by_variant = one_round(source, tmp, index, args.rate, args.idle, variants, largest)
            rounds.append(r)
            print(
                f"round {index}: migrate embedded {r['migrate_embedded_s']:.1f} s; store "
                f"p50/p99 ms: idle server {r['idle_server_p50_ms']:.1f}/"
                f"{r['idle_server_p99_ms']:.1f}, idle embedded {r['idle_embedded_p50_ms']:.1f}/"
                f"{r['idle_embedded_p99_ms']:.1f} ({r['idle_p50_ratio']:.2f}x), during the "
                f"verification {r['during_verify_p50_ms']:.1f}/{r['during_verify_p99_ms']:.1f} "
                f"(n={r['during_verify_n']:.0f}); failed stores {r['store_errors']:.0f}",
                flush=True,
            )
            for variant, v in by_variant.items():
                per_variant[variant].append(v)
                print(
                    f"  variant {variant}: migrate server {v['migrate_server_s']:.1f} s "
                    f"({v['migrate_ratio']:.2f}x), with the writer "
                    f"{v['migrate_server_with_writer_s']:.1f} s; store p50/p99 during it "
                    f"{v['during_migration_p50_ms']:.1f}/{v['during_migration_p99_ms']:.1f} ms "
                    f"(n={v['during_migration_n']:.0f}); failed stores {v['store_errors']:.0f}",
                    flush=True,
                )

    print(f"\nover {len(rounds)} rounds ({rows:,} legacy rows, {args.rate:g} stores/s):")
    for key, label in (
        ("idle_server_p50_ms", "idle store p50 through the server (ms)"),
        ("idle_server_p99_ms", "idle store p99 through the server (ms)"),
        ("idle_embedded_p50_ms", "idle store p50 embedded (ms)"),
        ("idle_p50_ratio", "idle p50 server / embedded (target <= 2)"),
        ("during_verify_p50_ms", "store p50 during the full verification (ms)"),
        ("during_verify_p99_ms", "store p99 during the full verification (ms)"),
        ("migrate_embedded_s", "migration embedded (s)"),
        ("store_errors", "failed stores (verification, idle)"),
    ):
        values = [r[key] for r in rounds]
        print(f"  {label}: " + ", ".join(f"{v:.2f}" for v in values) + f" -> {best_median(values)}")
    for variant, figures in per_variant.items():
        print(f" variant {variant} (rows per partition:server threads):")
        for key, label in (
            ("during_migration_p50_ms", "store p50 during the migration (ms)"),
            ("during_migration_p99_ms", "store p99 during the migration (ms, target <= 50)"),
            ("migrate_server_s", "migration through the server (s)"),
            ("migrate_ratio", "migration server / embedded (target <= 1.3)"),
            ("migrate_server_with_writer_s", "migration through the server with the writer (s)"),
            ("store_errors", "failed stores during the migration"),
        ):
            values = [f[key] for f in figures]
            print(
                f"    {label}: "
                + ", ".join(f"{v:.2f}" for v in values)
                + f" -> {best_median(values)}"
            )
    load_after = os.getloadavg()
    print(
        "load average (1/5/15 min) before "
        + "/".join(f"{v:.2f}" for v in load_before)
        + ", after "
        + "/".join(f"{v:.2f}" for v in load_after)
    )


if __name__ == "__main__":
    main()
