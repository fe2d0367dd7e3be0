"""Entropy statistics over the legacy tables: distribution by identity type, set-based."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb

from kimera_core.entropy import (
    ENTROPY_BUCKETS_BITS,
    TAU_0_SECONDS,
    TAU_K,
    geoid_entropy_sql,
    scar_entropy_sql,
)
from kimera_core.legacy import missing_tables, table_counts

DISTRIBUTION_SQL = """
WITH e AS ({inner}), t AS (
    SELECT entropy, ? * (1 + ? * coalesce(entropy, 0.0)) AS tau FROM e
)
SELECT count(*) AS n,
       count(entropy) AS n_known,
       avg(entropy) AS mean,
       quantile_cont(entropy, 0.5) AS p50,
       quantile_cont(entropy, 0.9) AS p90,
       quantile_cont(entropy, 0.99) AS p99,
       min(entropy) AS min,
       max(entropy) AS max,
       avg(tau) / 86400.0 AS tau_mean_days,
       quantile_cont(tau, 0.5) / 86400.0 AS tau_p50_days,
       quantile_cont(tau, 0.99) / 86400.0 AS tau_p99_days
FROM t
"""

BUCKETS_SQL = """
WITH e AS ({inner})
SELECT bucket, count(*) FROM (
    SELECT CASE WHEN entropy IS NULL THEN -1
                ELSE coalesce(list_position(list_transform(?::DOUBLE[], b -> entropy <= b), true), 0)
           END AS bucket
    FROM e
) GROUP BY bucket
"""


@dataclass
class Distribution:
    """Entropy and effective-tau distribution of one identity type."""

    identity_type: str
    count: int
    unknown: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    min: float | None
    max: float | None
    tau_mean_days: float | None
    tau_p50_days: float | None
    tau_p99_days: float | None
    # upper bound (bits, or "+Inf") -> number of rows with entropy <= bound and > the previous
    histogram: dict[str, int] = field(default_factory=dict)


@dataclass
class LegacySummary:
    """Rows per legacy table and the entropy distribution per identity type."""

    tables: dict[str, int]
    missing_tables: list[str]
    distributions: list[Distribution]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distribution_of(con: duckdb.DuckDBPyConnection, identity_type: str, inner: str) -> Distribution:
    """The entropy distribution of ``inner``, a query of (key, entropy) rows of one type.

    Count, unknowns (NULL entropy), mean and quantiles in bits, effective tau in days,
    and the fixed-bucket histogram (ENTROPY_BUCKETS_BITS, ``le`` labels plus "+Inf").
    """
    row = con.execute(DISTRIBUTION_SQL.format(inner=inner), [TAU_0_SECONDS, TAU_K]).fetchone()
    n, known, mean, p50, p90, p99, lo, hi, tau_mean, tau_p50, tau_p99 = row
    labels = [f"{b:g}" for b in ENTROPY_BUCKETS_BITS] + ["+Inf"]
    histogram = dict.fromkeys(labels, 0)
    for bucket, count in con.execute(
        BUCKETS_SQL.format(inner=inner), [list(ENTROPY_BUCKETS_BITS)]
    ).fetchall():
        if bucket == -1:
            continue
        histogram[labels[bucket - 1] if bucket > 0 else "+Inf"] += count
    return Distribution(
        identity_type,
        n,
        n - known,
        mean,
        p50,
        p90,
        p99,
        lo,
        hi,
        tau_mean,
        tau_p50,
        tau_p99,
        histogram,
    )


def legacy_summary(con: duckdb.DuckDBPyConnection) -> LegacySummary:
    """Row counts and entropy distributions of the legacy geoid and scar tables."""
    missing = missing_tables(con)
    distributions = []
    if "legacy_geoids" not in missing:
        distributions.append(distribution_of(con, "geoid", geoid_entropy_sql()))
    if "legacy_scars" not in missing:
        distributions.append(distribution_of(con, "scar", scar_entropy_sql()))
    return LegacySummary(table_counts(con), missing, distributions)
