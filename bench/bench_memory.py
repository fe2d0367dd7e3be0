"""Peak memory of a migration, phase by phase: what sets the peak RSS of ``kimera migrate``.

Usage:
  .venv/bin/python bench/bench_memory.py --source var/bench/demo_10m.duckdb [--runs 1] \
      [--env NAME=VALUE ...] [--workdir DIR]

Each run copies ``--source`` (never modified) and migrates the copy in a child process that
does what ``kimera migrate`` does (``open_database``, ``migrate`` at the default memory limit,
``close``) while a thread of the child reads its resident set (``VmRSS``) every 50 ms and
names the phase it is in: ``partitions`` (geoid then scar partitions), ``checkpoint`` (the
loaded table before the index builds), ``index <name>`` and ``checkpoint <name>`` (each
secondary index rebuilt and checkpointed), ``fingerprints`` (the run's fingerprints recorded),
``final checkpoint`` and ``close``. The phases are found by wrapping the engine's own
functions in the child (the product code runs unchanged). The parent prints each phase's
seconds and highest sampled RSS, and the child's peak RSS as the kernel counts it
(``ru_maxrss`` of the finished child, which a 50 ms sampler cannot miss): that peak is the
figure of docs/benchmarks.md. The parent never opens a database (it stays far smaller than the child), so
its own size does not leak into the child's ``ru_maxrss``. ``--env`` sets environment variables of the child (e.g.
``KIMERA_MEMORY_LIMIT=900MB``) to compare settings side by side. 1 GB = 10^9 bytes; RSS is
printed in MiB (2^20 bytes) and GB.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kimera_core import db as kdb
from kimera_core.migration import engine, fingerprints, indexes

SAMPLE_SECONDS = 0.05
MIB = 1 << 20
# BENCH_MALLOC_TRIM=1: glibc's malloc_trim(0) at every phase change (how much of the RSS
# above DuckDB's own memory is freed memory the allocator keeps)
TRIM = ctypes.CDLL("libc.so.6").malloc_trim if os.environ.get("BENCH_MALLOC_TRIM") else None
# every this many samples, the memory DuckDB's buffer manager accounts for (a query)
TRACKED_EVERY = 4
TRACKED_SQL = "SELECT tag, memory_usage_bytes FROM duckdb_memory() WHERE memory_usage_bytes > 0"


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class PhaseTrace:
    """The highest RSS sampled in each phase, and each phase's seconds, in order."""

    def __init__(self) -> None:
        self.phase = "open"
        self.order: list[str] = []
        self.peak: dict[str, int] = {}
        # highest DuckDB-tracked memory (duckdb_memory(), KiB) sampled in each phase
        self.tracked: dict[str, int] = {}
        self.tags: dict[str, dict[str, int]] = {}
        self.cursor = None
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.enter("open")

    def enter(self, phase: str) -> None:
        if TRIM is not None:
            TRIM(0)
        with self._lock:
            now = time.perf_counter()
            self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self._since
            self._since = now
            self.phase = phase
            if phase not in self.peak:
                self.order.append(phase)
                self.peak[phase] = 0
            self._sample()

    def _sample(self) -> None:
        rss = _rss_kib()
        if rss > self.peak[self.phase]:
            self.peak[self.phase] = rss

    def run(self) -> None:
        ticks = 0
        while not self._stop.wait(SAMPLE_SECONDS):
            with self._lock:
                self._sample()
            ticks += 1
            if self.cursor is not None and ticks % TRACKED_EVERY == 0:
                tags = {t: int(b) // MIB for t, b in self.cursor.execute(TRACKED_SQL).fetchall()}
                tracked = sum(tags.values()) * 1024
                phase = self.phase
                if tracked >= self.tracked.get(phase, 0):
                    self.tracked[phase] = tracked
                    self.tags[phase] = tags

    def stop(self) -> None:
        self.enter("end")
        self._stop.set()


def _wrap(module: object, name: str, trace: PhaseTrace, label, after: str | None = None) -> None:
    """Replace ``module.name`` by a wrapper entering phase ``label(*args)`` around the call."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        trace.enter(label(*args) if callable(label) else label)
        try:
            return original(*args, **kwargs)
        finally:
            if after is not None:
                trace.enter(after)

    setattr(module, name, wrapper)


def child(db: str) -> None:
    """Migrate ``db`` as ``kimera migrate`` does, tracing RSS by phase; JSON on stdout."""
    trace = PhaseTrace()
    sampler = threading.Thread(target=trace.run, daemon=True)
    sampler.start()
    _wrap(engine, "_run_partitions", trace, "partition 1")
    _wrap(indexes, "checkpoint", trace, lambda *a: f"checkpoint {trace.phase}")
    _wrap(indexes, "restore_index", trace, lambda _c, _t, name, _d: f"index {name}")
    _wrap(engine, "rebuild_indexes_one_at_a_time", trace, "indexes")
    _wrap(fingerprints, "record", trace, "fingerprints", after="run record")
    _wrap(engine, "checkpoint", trace, "final checkpoint")
    trace.enter("plan")
    con = kdb.open_database(db)
    trace.cursor = con.cursor()
    report = engine.migrate(
        con, on_partition=lambda done, total, *_: trace.enter(f"partition {done + 1}")
    )
    trace.enter("close")
    trace.cursor.close()
    trace.cursor = None
    con.close()
    trace.stop()
    phases = [
        {
            "phase": p,
            "seconds": round(trace.seconds.get(p, 0.0), 2),
            "max_rss_kib": trace.peak[p],
            "tracked_kib": trace.tracked.get(p, 0),
            "tags": trace.tags.get(p, {}),
        }
        for p in trace.order
        if p != "end"
    ]
    print(
        json.dumps(
            {
                "phases": phases,
                "balanced": report.balanced,
                "partitions": report.partitions,
                "read": report.counts.read,
                "seconds": report.seconds,
            }
        )
    )


def one_run(source: Path, workdir: Path, env: dict[str, str]) -> dict:
    target = workdir / "memory.duckdb"
    for leftover in (target, target.with_suffix(".duckdb.wal")):
        leftover.unlink(missing_ok=True)
    shutil.copy(source, target)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(target)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"migration failed ({out.returncode}): {out.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise SystemExit("this run did not raise the children's peak RSS: run fewer per call")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_kib"] = peak
    result["elapsed"] = elapsed
    target.unlink(missing_ok=True)
    return result


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB ({kib * 1024 / 1e9:.2f} GB)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the child")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.source is None or not args.source.exists():
        raise SystemExit("--source must name an existing demo database")
    env = dict(item.split("=", 1) for item in args.env)
    print(f"source {args.source}, child environment {env or '{}'}, load {os.getloadavg()}")
    peaks: list[int] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for run in range(1, args.runs + 1):
            # ru_maxrss of the children is a maximum over all of them: one process per run
            result = subprocess.run(
                [sys.executable, __file__, "--one", str(args.source), tmp, json.dumps(env)],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            r = json.loads(result.stdout.strip().splitlines()[-1])
            peaks.append(r["peak_kib"])
            print(
                f"run {run}: {r['elapsed']:.1f} s ({r['partitions']} partitions, "
                f"{r['read']:,} rows, balanced={r['balanced']}), peak RSS {_mib(r['peak_kib'])}, "
                f"load {os.getloadavg()[0]:.1f}"
            )
            for p in r["phases"]:
                print(
                    f"    {p['phase']:<40} {p['seconds']:7.1f} s  RSS max {_mib(p['max_rss_kib'])}"
                    f", DuckDB's own {p['tracked_kib'] / 1024:,.0f} MiB {p['tags']}"
                )
    print(
        f"peak RSS over {len(peaks)} run(s): best {_mib(min(peaks))}, "
        f"median {_mib(int(statistics.median(peaks)))}"
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(json.dumps(one_run(Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]))))
    else:
        main()
