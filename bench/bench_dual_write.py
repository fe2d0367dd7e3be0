"""Dual-write benchmarks: single-write latency off/on against the bare two-INSERT floor, and batches.

Usage: .venv/bin/python bench/bench_dual_write.py [--writes 3000] [--rounds 6]
       [--batch-rows 1000000] [--batch-size 100000]      (--writes 0: batches only)

Variants are interleaved (single writes in rounds, batches turn by turn), each on its own
database file, so the machine's noise hits them alike; read the ratios, which are measured
in the same run. Batches report wall and CPU seconds (CPU is less disturbed by other jobs on
a shared machine); the variants on tables without P1's keys and indexes are for information.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from kimera_core.db import open_database
from kimera_core.entropy import identity_entropy
from kimera_core.identity import Identity
from kimera_core.legacy import LEGACY_DDL, LEGACY_INDEXES, create_legacy_schema, geoid_to_row
from kimera_core.sql import vetted_identifier
from kimera_core.storage import GEOID_INSERT, IDENTITY_INSERT, Storage


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


def floor_writer(con, fold_begin: bool):
    """The floor: two bare parameterised INSERTs of the same rows in one transaction."""

    def write(item: Identity) -> None:
        new_row = [
            item.id,
            item.identity_type,
            item.to_json(),
            item.created_at,
            item.updated_at,
            item.lang_axis,
            identity_entropy(item),
        ]
        legacy_row = geoid_to_row(item.to_legacy())
        if fold_begin:
            con.execute("BEGIN TRANSACTION; " + IDENTITY_INSERT, new_row)
        else:
            con.execute("BEGIN TRANSACTION")
            con.execute(IDENTITY_INSERT, new_row)
        con.execute(GEOID_INSERT, legacy_row)
        con.execute("COMMIT")

    return write


def single_writes(tmp: Path, writes: int, rounds: int) -> dict[str, list[float]]:
    variants = {}
    for name, stage in (
        ("dual-write off (legacy-only)", "legacy-only"),
        ("new store only (write-new)", "write-new"),
        ("dual-write on", "dual-write"),
    ):
        storage = Storage.open(str(tmp / f"{stage}.duckdb"), stage=stage, shadow_sample=0.0)
        variants[name] = (storage.store, storage.con)
    for name, fold in (("floor: BEGIN + 2 INSERTs + COMMIT", False), ("floor, BEGIN folded", True)):
        con = open_database(tmp / f"floor{int(fold)}.duckdb", create=True)
        create_legacy_schema(con)
        variants[name] = (floor_writer(con, fold), con)
    times: dict[str, list[float]] = {name: [] for name in variants}
    per_round = writes // rounds
    for r in range(rounds):
        for v, (name, (write, _)) in enumerate(variants.items()):
            items = [identity(r * per_round + i, f"v{v}_") for i in range(per_round)]
            for item in items[:20]:  # warm up this round's code path
                write(dataclass_copy(item, "w"))
            for item in items:
                t0 = time.perf_counter()
                write(item)
                times[name].append(time.perf_counter() - t0)
    for _, con in variants.values():
        con.close()
    return times


def dataclass_copy(item: Identity, prefix: str) -> Identity:
    import dataclasses

    return dataclasses.replace(item, id=prefix + item.id)


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


def dual_writer(path: Path, indexed: bool):
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


def bare_writer(path: Path, indexed: bool):
    """The floor: the same rows, identities rows ready-made, two INSERTs in one transaction."""
    con = open_database(path, create=True)
    if indexed:
        create_legacy_schema(con)
    else:
        create_unindexed(con)

    def write(part: pa.Table, ready: pa.Table) -> None:
        con.register("part", part)
        con.register("ready", ready)
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute("INSERT INTO identities SELECT * FROM ready")
            con.execute(
                "INSERT INTO legacy_geoids SELECT id, raw, echo, lang_axis, tags, weight, meta, "
                "created_at, updated_at FROM part"
            )
            con.execute("COMMIT")
        finally:
            con.unregister("part")
            con.unregister("ready")

    return write, con


BATCH_VARIANTS = {
    "dual-write store_arrow": (dual_writer, True),
    "bare two-table insert": (bare_writer, True),
    "dual-write, no indexes (info)": (dual_writer, False),
    "bare, no indexes (info)": (bare_writer, False),
}


def batches(tmp: Path, total: int, batch_rows: int) -> dict[str, tuple[float, float]]:
    """(wall s, CPU s) per variant; the variants take turns batch by batch, each on its file."""
    scratch = open_database(tmp / "scratch.duckdb", create=True)
    parts = [
        arrow_batch(scratch, s, min(batch_rows, total - s)) for s in range(0, total, batch_rows)
    ]
    scratch.close()
    ready = [ready_rows(part) for part in parts]
    writers = {
        name: make(tmp / f"batch{i}.duckdb", indexed)
        for i, (name, (make, indexed)) in enumerate(BATCH_VARIANTS.items())
    }
    spent = {name: [0.0, 0.0] for name in writers}
    for part, rows in zip(parts, ready, strict=True):
        for name, (write, _) in writers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            write(part, rows)
            spent[name][0] += time.perf_counter() - t0
            spent[name][1] += time.process_time() - c0
    for _, con in writers.values():
        con.close()
    return {name: (wall, cpu) for name, (wall, cpu) in spent.items()}


def report_single_writes(tmp: Path, writes: int, rounds: int) -> None:
    times = single_writes(tmp, writes, rounds)
    print(f"single-identity writes ({writes:,} per variant, interleaved in {rounds} rounds)")
    print(f"  {'variant':<36} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, values in times.items():
        print(
            f"  {name:<36} {pct(values, 0.5):8.3f} {pct(values, 0.99):8.3f} "
            f"{statistics.fmean(values) * 1e3:8.3f}"
        )
    on = pct(times["dual-write on"], 0.5)
    off = pct(times["dual-write off (legacy-only)"], 0.5)
    new_only = pct(times["new store only (write-new)"], 0.5)
    floor = pct(times["floor: BEGIN + 2 INSERTs + COMMIT"], 0.5)
    floor_folded = pct(times["floor, BEGIN folded"], 0.5)
    print(f"  dual-write p50 / floor p50                 {on / floor:6.2f}x (target <= 1.20)")
    print(f"  dual-write p50 / floor (BEGIN folded) p50  {on / floor_folded:6.2f}x")
    print(
        f"  dual-write overhead vs legacy-only write   {100 * (on / off - 1):+6.1f} % (P1: +164 %)"
    )
    print(f"  dual-write overhead vs new-only write      {100 * (on / new_only - 1):+6.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--writes", type=int, default=3000, help="single writes per variant (0: skip)"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--batch-rows", type=int, default=1_000_000, help="identities in batches (0: skip)"
    )
    parser.add_argument("--batch-size", type=int, default=100_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.writes:
            report_single_writes(Path(tmp), args.writes, args.rounds)

        n = args.batch_rows
        if n <= 0:
            return
        spent = batches(Path(tmp), n, args.batch_size)
        print(f"batched writes ({n:,} identities in batches of {args.batch_size:,}, turn by turn)")
        print(f"  {'variant':<32} {'wall s':>7} {'ids/s':>9} {'CPU s':>7} {'ids/CPU s':>10}")
        for name, (wall, cpu) in spent.items():
            print(f"  {name:<32} {wall:7.2f} {n / wall:9,.0f} {cpu:7.2f} {n / cpu:10,.0f}")
        for label, ours, bare in (
            ("P1 tables", "dual-write store_arrow", "bare two-table insert"),
            ("no indexes (info)", "dual-write, no indexes (info)", "bare, no indexes (info)"),
        ):
            wall = spent[bare][0] / spent[ours][0]
            cpu = spent[bare][1] / spent[ours][1]
            print(
                f"  ratio dual-write / bare throughput, {label:<18} wall {wall:5.2f}  CPU {cpu:5.2f}"
            )
        print("  targets: dual-write >= 300,000 ids/s; ratio >= 0.80 on the P1 tables")


if __name__ == "__main__":
    main()
