"""Entropy statistics of the migrated identities and the readable entropy report.

Statistics are set-based over ``identities.entropy_score`` (the value the migration and the
storage API compute with the bulk formula): the distribution per identity type with the
fixed histogram buckets in bits, the effective-tau distribution, a daily time series by
``updated_at`` (UTC day), and a sanity check of every score. ``write_entropy_report``
renders them as markdown with a histogram PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from kimera_core.entropy import ENTROPY_BUCKETS_BITS, TAU_0_SECONDS, TAU_K
from kimera_core.identity import IDENTITY_TYPES
from kimera_core.stats import Distribution, distribution_of

# entropy_score of one identity type as (key, entropy), the shape stats' queries take
_ENTROPY_OF_TYPE = (
    "SELECT id AS key, entropy_score AS entropy FROM identities WHERE identity_type = '{kind}'"
)

DAILY_SQL = """
SELECT strftime(to_timestamp(updated_at)::DATE, '%Y-%m-%d') AS day, identity_type,
       count(*) AS n, avg(entropy_score) AS mean,
       quantile_cont(entropy_score, 0.9) AS p90
FROM identities
WHERE isfinite(updated_at)
GROUP BY ALL ORDER BY day, identity_type
"""

# The upper bound of H: log2 of the number of distribution members (terms with a positive
# intensity, else tags) for a geoid; log2(len(related_ids)) * |weight| for a scar, a missing
# weight counting 1.0 as in the existing Python (docs/entropy.md).
SANITY_SQL = """
WITH s AS (
    SELECT id, identity_type, entropy_score AS h,
           $tau0 * (1 + $k * coalesce(entropy_score, 0.0)) AS tau,
           CASE WHEN identity_type = 'geoid' THEN
                    log2(greatest(coalesce(TRY(json_array_length(data, '$.meta.terms')), 0),
                                  coalesce(TRY(json_array_length(data, '$.tags')), 0), 1))
                ELSE log2(greatest(coalesce(TRY(json_array_length(data, '$.related_ids')), 0), 1))
                     * abs(coalesce(TRY_CAST(json_extract(data, '$.weight') AS DOUBLE), 1.0))
           END AS bound
    FROM identities
), judged AS (
    SELECT *, CASE
        WHEN h IS NULL AND identity_type = 'geoid' THEN 'missing'
        WHEN h IS NOT NULL AND NOT isfinite(h) THEN 'non_finite'
        WHEN h < 0 THEN 'negative'
        WHEN h > bound + 1e-9 THEN 'above_bound'
        WHEN tau < $tau0 THEN 'tau_below_tau0'
    END AS problem
    FROM s
)
SELECT problem, count(*), list(id ORDER BY id)[1:$sample] FROM judged GROUP BY problem
"""


@dataclass
class EntropySanity:
    """Identities whose entropy is not finite, negative, above its bound, or decays too fast."""

    checked: int
    problems: dict[str, int]
    sample: dict[str, list[str]]

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass
class EntropyStatistics:
    """Entropy and effective-tau distribution per identity type, and the daily series."""

    distributions: list[Distribution]
    daily: list[dict[str, Any]] = field(default_factory=list)
    computed_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EntropyStatistics:
        """The inverse of ``to_dict`` (JSON round trip: ``from_dict(to_dict(s)) == s``)."""
        return cls(
            distributions=[Distribution(**d) for d in data["distributions"]],
            daily=[dict(d) for d in data.get("daily", [])],
            computed_at=float(data["computed_at"]),
        )


def entropy_distributions(con: duckdb.DuckDBPyConnection) -> list[Distribution]:
    """Count, mean, p50/p90/p99, histogram (bits) and tau (days) per identity type."""
    return [
        distribution_of(con, kind, _ENTROPY_OF_TYPE.format(kind=kind)) for kind in IDENTITY_TYPES
    ]


def daily_series(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Rows updated per UTC day and identity type, with their mean and p90 entropy."""
    return [
        {"day": day, "identity_type": kind, "count": int(n), "mean": mean, "p90": p90}
        for day, kind, n, mean, p90 in con.execute(DAILY_SQL).fetchall()
    ]


def entropy_statistics(con: duckdb.DuckDBPyConnection) -> EntropyStatistics:
    """Every entropy statistic of identities in one pass over the table per statistic."""
    return EntropyStatistics(entropy_distributions(con), daily_series(con), time.time())


def entropy_sanity(con: duckdb.DuckDBPyConnection, sample: int = 20) -> EntropySanity:
    """Check every identity's entropy: finite, 0 <= H <= bound, tau_eff >= tau_0."""
    rows = con.execute(
        SANITY_SQL, {"tau0": float(TAU_0_SECONDS), "k": TAU_K, "sample": sample}
    ).fetchall()
    problems = {p: int(n) for p, n, _ in rows if p is not None}
    return EntropySanity(
        checked=sum(int(n) for _, n, _ in rows),
        problems=problems,
        sample={p: keys for p, _, keys in rows if p is not None},
    )


# --- the report -------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_report(stats: EntropyStatistics, image_name: str | None = None) -> str:
    """The report as markdown: distribution table, histogram table, tau and a daily summary."""
    lines = [
        "# Entropy distribution of identities",
        "",
        "| type | count | unknown | mean (bits) | p50 | p90 | p99 | tau mean (days) | tau p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in stats.distributions:
        lines.append(
            f"| {d.identity_type} | {d.count:,} | {d.unknown:,} | {_fmt(d.mean)} | "
            f"{_fmt(d.p50)} | {_fmt(d.p90)} | {_fmt(d.p99)} | {_fmt(d.tau_mean_days, 2)} | "
            f"{_fmt(d.tau_p99_days, 2)} |"
        )
    labels = [f"{b:g}" for b in ENTROPY_BUCKETS_BITS] + ["+Inf"]
    lines += [
        "",
        "## Histogram (rows per entropy bucket: above the previous edge, up to this one, in bits)",
        "",
        "| up to (bits) | " + " | ".join(d.identity_type for d in stats.distributions) + " |",
        "|---|" + "---:|" * len(stats.distributions),
    ]
    for label in labels:
        cells = " | ".join(f"{d.histogram.get(label, 0):,}" for d in stats.distributions)
        lines.append(f"| {label} | {cells} |")
    if image_name:
        lines += ["", f"![entropy histogram]({image_name})"]
    if stats.daily:
        days = sorted({r["day"] for r in stats.daily})
        lines += [
            "",
            f"## Daily series ({len(days)} days, {days[0]} to {days[-1]}; last 7 shown)",
            "",
            "| day | type | rows | mean (bits) | p90 |",
            "|---|---|---:|---:|---:|",
        ]
        for r in stats.daily:
            if r["day"] in days[-7:]:
                lines.append(
                    f"| {r['day']} | {r['identity_type']} | {r['count']:,} | "
                    f"{_fmt(r['mean'])} | {_fmt(r['p90'])} |"
                )
    return "\n".join(lines) + "\n"


def histogram_png(stats: EntropyStatistics, path: Path) -> Path:
    """Bar chart of the fixed-bucket histogram per identity type, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"≤{b:g}" for b in ENTROPY_BUCKETS_BITS] + [">4"]
    keys = [f"{b:g}" for b in ENTROPY_BUCKETS_BITS] + ["+Inf"]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    width = 0.8 / max(len(stats.distributions), 1)
    for i, d in enumerate(stats.distributions):
        xs = [x + i * width for x in range(len(keys))]
        ax.bar(xs, [d.histogram.get(k, 0) for k in keys], width=width, label=d.identity_type)
    ax.set_xticks([x + width * (len(stats.distributions) - 1) / 2 for x in range(len(keys))])
    ax.set_xticklabels(labels)
    ax.set_xlabel("entropy H (bits)")
    ax.set_ylabel("identities")
    ax.set_title("Entropy distribution of identities")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


@dataclass
class ReportFiles:
    """Where the report was written."""

    markdown: Path
    image: Path
    text: str


def write_entropy_report(stats: EntropyStatistics, reports_dir: Path) -> ReportFiles:
    """Write ``entropy_report.md`` and ``entropy_histogram.png`` under ``reports_dir``.

    Written to temporary names and renamed, so a reader never sees half a report.
    """
    reports_dir.mkdir(parents=True, exist_ok=True)
    image = reports_dir / "entropy_histogram.png"
    tmp_image = reports_dir / ".entropy_histogram.png.tmp"
    histogram_png(stats, tmp_image)
    tmp_image.replace(image)
    text = markdown_report(stats, image.name)
    markdown = reports_dir / "entropy_report.md"
    tmp_md = reports_dir / ".entropy_report.md.tmp"
    tmp_md.write_text(text, encoding="utf-8")
    tmp_md.replace(markdown)
    return ReportFiles(markdown, image, text)
