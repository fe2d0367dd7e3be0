"""Foundation benchmarks: demo-data generation and bulk vs scalar entropy, side by side.

Usage: .venv/bin/python bench/bench_foundation.py [--geoids 1000000] [--scalar-sample 100000]

Prints absolute times (this machine is shared and noisy: read them as indications) and the
ratio of bulk to scalar entropy throughput measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import duckdb

from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.entropy import (
    TAU_0_SECONDS,
    TAU_K,
    bulk_geoid_entropy,
    bulk_scar_entropy,
    entropy_table_sql,
    geoid_entropy_json,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--geoids", type=int, default=1_000_000)
    parser.add_argument("--scars", type=int, default=500_000)
    parser.add_argument("--scalar-sample", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        t0 = time.perf_counter()
        report = generate_demo_data(db, geoids=args.geoids, scars=args.scars, seed=1)
        gen = time.perf_counter() - t0
        print(
            f"demo-data: {args.geoids:,} geoids + {args.scars:,} scars in {gen:.2f} s "
            f"({args.geoids / gen:,.0f} geoids/s incl. scars, echoforms, identities)"
        )

        with connect(db) as con:
            in_db_times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                con.execute(
                    "CREATE OR REPLACE TEMP TABLE bench_entropy AS " + entropy_table_sql("geoid"),
                    [TAU_0_SECONDS, TAU_K],
                )
                in_db_times.append(time.perf_counter() - t0)
            in_db = min(in_db_times)
            print(
                f"bulk geoid entropy + tau into a table (as migration uses it): "
                f"{args.geoids:,} rows in {in_db:.3f} s ({args.geoids / in_db:,.0f} rows/s)"
            )
            bulk_times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                table = bulk_geoid_entropy(con)
                bulk_times.append(time.perf_counter() - t0)
            bulk = min(bulk_times)
            assert table.num_rows == args.geoids
            print(
                f"bulk geoid entropy + tau: {args.geoids:,} rows in {bulk:.3f} s "
                f"to Arrow (best of {args.repeat}; {args.geoids / bulk:,.0f} rows/s)"
            )
            t0 = time.perf_counter()
            scar_table = bulk_scar_entropy(con)
            scar_s = time.perf_counter() - t0
            print(f"bulk scar entropy + tau: {scar_table.num_rows:,} rows in {scar_s:.3f} s")

            rows = con.execute(
                "SELECT gid, meta, tags FROM legacy_geoids ORDER BY gid LIMIT ?",
                [args.scalar_sample],
            ).fetchall()
        t0 = time.perf_counter()
        scalar_values = {gid: geoid_entropy_json(meta, tags) for gid, meta, tags in rows}
        scalar = time.perf_counter() - t0
        scalar_rate = len(rows) / scalar
        bulk_rate = args.geoids / bulk
        print(
            f"scalar geoid entropy (reference, incl. JSON parse): {len(rows):,} rows in "
            f"{scalar:.3f} s ({scalar_rate:,.0f} rows/s)"
        )
        print(f"ratio bulk (to Arrow) / scalar throughput: {bulk_rate / scalar_rate:.1f}x")
        print(
            f"ratio bulk (in database) / scalar throughput: "
            f"{args.geoids / in_db / scalar_rate:.1f}x"
        )

        bulk_values = dict(
            zip(table.column("key").to_pylist(), table.column("entropy").to_pylist(), strict=True)
        )
        worst = max(abs(bulk_values[g] - v) for g, v in scalar_values.items())
        print(
            f"max |bulk - scalar| over the sample: {worst:.3g}"
            f" ({'agree' if worst <= 1e-9 else 'DISAGREE'} at 1e-9)"
        )
        per_row_ms = 1000 * scalar / len(rows)
        print(f"scalar entropy per identity: {per_row_ms:.4f} ms (target < 10 ms)")
        assert math.isfinite(worst)
        del report
    print(f"duckdb {duckdb.__version__}")


if __name__ == "__main__":
    main()
