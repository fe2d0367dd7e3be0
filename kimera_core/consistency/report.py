"""What a verification found: findings, the verdict and its reasons, and the record of each run.

A ``VerificationReport`` is the verifier's typed result. Each kind of problem is a
``Finding``: a complete total and a capped sample of offending keys, sorted by key (as
reladiff reports counts and a sample). The verdict is derived, never stored: a report is
consistent when it has no reason, and ``verdict_reasons`` writes one operator-readable line per
non-zero finding ("1 row whose mapped fields differ"; counts through ``count_of``).

``to_dict`` is the JSON form every consumer reads (the CLI's ``--json``, the
``kimera_verifications`` row, Dagster metadata); ``from_dict`` is its exact inverse, so a
report can travel as JSON and come back typed. Each verification appends one row to
``kimera_verifications`` (time, mode, verdict, the report as JSON); incremental mode starts
from the latest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import duckdb

VERIFICATIONS_DDL = """CREATE TABLE IF NOT EXISTS kimera_verifications (
    verified_at DOUBLE NOT NULL,
    mode TEXT NOT NULL,
    verdict TEXT NOT NULL,
    findings JSON
)"""
LAST_VERIFICATION_SQL = """
SELECT verified_at, mode, verdict FROM kimera_verifications ORDER BY verified_at DESC LIMIT 1
"""

# The findings of a report whose totals make a reason, each with what one offending item is.
KEY_FINDINGS: tuple[tuple[str, str, str], ...] = (
    ("duplicate_keys", "duplicate key", "duplicate keys"),
    ("missing_in_new", "key in legacy but not in identities", "keys in legacy but not in identities"),
    ("missing_in_legacy", "key in identities but not in legacy", "keys in identities but not in legacy"),
)  # fmt: skip


def count_of(n: int, singular: str, plural: str | None = None) -> str:
    """``n`` with the noun in the right number: '1 key', '2 keys', '1,024 rows'.

    ``plural`` defaults to ``singular + 's'``; give it when the noun phrase has words after
    the noun ("1 key in legacy", "2 keys in legacy").
    """
    return f"{n:,} {singular if n == 1 else (plural or singular + 's')}"


def n_rows(n: int) -> str:
    """'1 row', '2 rows': counts in verdicts an operator reads."""
    return count_of(n, "row")


def n_keys(n: int) -> str:
    """'1 key', '2 keys'."""
    return count_of(n, "key")


@dataclass
class Finding:
    """One kind of problem: its total and a capped sample of offending keys (dicts by key)."""

    total: int = 0
    sample: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "sample": self.sample}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(int(d["total"]), list(d["sample"]))


@dataclass
class VerificationReport:
    """What a verification found, and its verdict.

    ``counts``: per store ('legacy', 'new', and 'difference' = new - legacy), rows per identity
    type and 'total'. ``null_keys``: rows without a key per store. ``seconds``: wall time of
    the run (rounded to 0.1 ms); ``started_at`` and ``since``: epoch seconds. ``checksums``:
    the checksum pass (top-level sums, bisection levels, the digest cache's statistics).
    ``tolerance``: ``Tolerance.to_dict()`` of the run.
    """

    mode: str
    started_at: float
    seconds: float = 0.0
    since: float | None = None
    keys_checked: int | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    null_keys: dict[str, int] = field(default_factory=dict)
    duplicate_keys: Finding = field(default_factory=Finding)
    missing_in_new: Finding = field(default_factory=Finding)
    missing_in_legacy: Finding = field(default_factory=Finding)
    field_mismatches: Finding = field(default_factory=Finding)
    mismatches_by_field: dict[str, int] = field(default_factory=dict)
    checksums: dict[str, Any] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.reasons

    @property
    def verdict(self) -> str:
        return "consistent" if self.consistent else "inconsistent"

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data; ``from_dict`` reads it back."""
        return {
            "verdict": self.verdict,
            "consistent": self.consistent,
            "reasons": self.reasons,
            "mode": self.mode,
            "started_at": self.started_at,
            "since": self.since,
            "seconds": self.seconds,
            "keys_checked": self.keys_checked,
            "counts": self.counts,
            "null_keys": self.null_keys,
            "duplicate_keys": self.duplicate_keys.to_dict(),
            "missing_in_new": self.missing_in_new.to_dict(),
            "missing_in_legacy": self.missing_in_legacy.to_dict(),
            "field_mismatches": self.field_mismatches.to_dict(),
            "mismatches_by_field": self.mismatches_by_field,
            "checksums": self.checksums,
            "tolerance": self.tolerance,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerificationReport:
        """The report ``to_dict`` made (also after a JSON round trip); ``verdict`` and
        ``consistent`` are derived from ``reasons``. Raises KeyError on a missing entry."""
        return cls(
            mode=d["mode"],
            started_at=d["started_at"],
            seconds=d["seconds"],
            since=d["since"],
            keys_checked=d["keys_checked"],
            counts=d["counts"],
            null_keys=d["null_keys"],
            duplicate_keys=Finding.from_dict(d["duplicate_keys"]),
            missing_in_new=Finding.from_dict(d["missing_in_new"]),
            missing_in_legacy=Finding.from_dict(d["missing_in_legacy"]),
            field_mismatches=Finding.from_dict(d["field_mismatches"]),
            mismatches_by_field=d["mismatches_by_field"],
            checksums=d["checksums"],
            tolerance=d["tolerance"],
            reasons=list(d["reasons"]),
        )


def verdict_reasons(report: VerificationReport) -> list[str]:
    """One line per non-zero finding of ``report`` (counts, NULL keys, keys, fields)."""
    reasons = []
    for kind, diff in report.counts["difference"].items():
        if diff and kind != "total":
            reasons.append(
                f"row counts differ for {kind}: legacy {report.counts['legacy'].get(kind, 0):,}, "
                f"new {report.counts['new'].get(kind, 0):,}"
            )
    for store, n in report.null_keys.items():
        if n:
            reasons.append(f"{n_rows(n)} with a NULL key in the {store} store")
    for name, singular, plural in KEY_FINDINGS:
        total = getattr(report, name).total
        if total:
            reasons.append(count_of(total, singular, plural))
    if report.field_mismatches.total:
        reasons.append(f"{n_rows(report.field_mismatches.total)} whose mapped fields differ")
    if report.mismatches_by_field:
        fields = ", ".join(f"{k} {v:,}" for k, v in report.mismatches_by_field.items())
        reasons.append(f"differing fields: {fields}")
    return reasons


def last_verification(con: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
    """The most recent recorded verification ({verified_at, mode, verdict}), or None."""
    try:
        row = con.execute(LAST_VERIFICATION_SQL).fetchone()
    except duckdb.CatalogException:
        return None
    return None if row is None else {"verified_at": row[0], "mode": row[1], "verdict": row[2]}


def record_verification(con: duckdb.DuckDBPyConnection, report: VerificationReport) -> None:
    """Append ``report`` to ``kimera_verifications`` (created if absent)."""
    con.execute(VERIFICATIONS_DDL)
    con.execute(
        "INSERT INTO kimera_verifications VALUES (?, ?, ?, ?)",
        [report.started_at, report.mode, report.verdict, json.dumps(report.to_dict(), default=str)],
    )
