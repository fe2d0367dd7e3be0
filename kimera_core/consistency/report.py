"""What a verification found: findings, exceptions, the verdict and its reasons, and the record.

A ``VerificationReport`` is the verifier's typed result. Each kind of problem is a
``Finding``: a complete total, a capped sample of offending keys sorted by key (as reladiff
reports counts and a sample), their evidence (both sides' values of each differing field,
``consistency.evidence``) and the next step. Failures and explained exceptions are kept
apart: rows still in quarantine (``quarantined``, counted by reason), quarantined keys that
identities holds with the same row (``quarantined_in_identities``) and rows where identities
is newer than legacy (``legacy_stale``: the merge rule kept the newer identity) are
exceptions, reported but not failures unless the run is ``strict``.

The verdict is derived, never stored: a report is consistent when it has no reason, and
``verdict_reasons`` writes one operator-readable line per failing finding ("1 row whose
mapped fields differ"; counts through ``count_of``); ``exception_lines`` does the same for
the exceptions. ``kimera_core.gates`` judges the gates from these same totals, so the CLI,
the Dagster checks and the rollout share one verdict.

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

from kimera_core.consistency.evidence import COLUMN_SIDES, STORE_SIDES, KeyEvidence

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
    """One kind of problem: its total, a capped sample of offending keys (dicts by key), their
    evidence (``KeyEvidence``: both ``sides``' values), and what the operator does next."""

    total: int = 0
    sample: list[dict[str, Any]] = field(default_factory=list)
    evidence: list[KeyEvidence] = field(default_factory=list)
    next_step: str = ""
    sides: tuple[str, str] = STORE_SIDES

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "sample": self.sample,
            "evidence": [e.to_dict(self.sides) for e in self.evidence],
            "next_step": self.next_step,
            "sides": list(self.sides),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        """The finding ``to_dict`` made (a record from before evidence existed reads too)."""
        sides = tuple(d.get("sides", STORE_SIDES))
        return cls(
            int(d["total"]),
            list(d["sample"]),
            [KeyEvidence.from_dict(e, sides) for e in d.get("evidence", [])],  # type: ignore[arg-type]
            d.get("next_step", ""),
            sides,  # type: ignore[arg-type]
        )


def _column_finding() -> Finding:
    return Finding(sides=COLUMN_SIDES)


# Failing findings and exceptions, as the report's attribute names, in report order.
FAILURES: tuple[str, ...] = (
    "duplicate_keys",
    "missing_in_new",
    "missing_in_legacy",
    "field_mismatches",
    "column_mismatches",
)
EXCEPTIONS: tuple[str, ...] = ("quarantined", "quarantined_in_identities", "legacy_stale")


@dataclass
class VerificationReport:
    """What a verification found, and its verdict.

    ``counts``: per store ('legacy', 'quarantined': legacy rows still in quarantine and absent
    from identities, 'new', and 'difference' = new - (legacy - quarantined)), rows per identity
    type and 'total'. ``null_keys``: rows without a key per store. ``seconds``: wall time of
    the run (rounded to 0.1 ms); ``started_at`` and ``since``: epoch seconds. ``checksums``:
    the checksum pass (top-level sums net of the rows excluded up front, bisection levels,
    the digest cache's statistics). ``tolerance``: ``Tolerance.to_dict()`` of the run.
    ``stage``: the rollout stage when it ran; ``authoritative``: 'legacy' or 'identities',
    where reads come from at that stage. ``strict``: exceptions count as failures.
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
    column_mismatches: Finding = field(default_factory=_column_finding)
    mismatches_by_column: dict[str, int] = field(default_factory=dict)
    quarantined: Finding = field(default_factory=Finding)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    quarantined_in_identities: Finding = field(default_factory=Finding)
    legacy_stale: Finding = field(default_factory=Finding)
    stage: str | None = None
    authoritative: str = "legacy"
    strict: bool = False
    duplicates_by_store: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

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
            "column_mismatches": self.column_mismatches.to_dict(),
            "mismatches_by_column": self.mismatches_by_column,
            "quarantined": self.quarantined.to_dict(),
            "quarantine_reasons": self.quarantine_reasons,
            "quarantined_in_identities": self.quarantined_in_identities.to_dict(),
            "legacy_stale": self.legacy_stale.to_dict(),
            "exceptions": exception_lines(self),
            "stage": self.stage,
            "authoritative": self.authoritative,
            "strict": self.strict,
            "duplicates_by_store": self.duplicates_by_store,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerificationReport:
        """The report ``to_dict`` made (also after a JSON round trip); ``verdict``,
        ``consistent`` and ``exceptions`` are derived. Raises KeyError on a missing entry of
        the issue-10 layout; the entries added since default when absent (older records)."""
        empty: dict[str, Any] = {"total": 0, "sample": []}
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
            column_mismatches=Finding.from_dict(
                d.get("column_mismatches", {**empty, "sides": list(COLUMN_SIDES)})
            ),
            mismatches_by_column=d.get("mismatches_by_column", {}),
            quarantined=Finding.from_dict(d.get("quarantined", empty)),
            quarantine_reasons=d.get("quarantine_reasons", {}),
            quarantined_in_identities=Finding.from_dict(d.get("quarantined_in_identities", empty)),
            legacy_stale=Finding.from_dict(d.get("legacy_stale", empty)),
            stage=d.get("stage"),
            authoritative=d.get("authoritative", "legacy"),
            strict=d.get("strict", False),
            duplicates_by_store=d.get("duplicates_by_store", {}),
            notes=list(d.get("notes", [])),
        )


def exception_lines(report: VerificationReport) -> list[str]:
    """One line per kind of explained exception of ``report`` (not failures unless strict)."""
    lines = []
    if report.quarantined.total:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(report.quarantine_reasons.items()))
        lines.append(
            count_of(report.quarantined.total, "row in quarantine", "rows in quarantine")
            + (f" ({reasons})" if reasons else "")
        )
    if report.quarantined_in_identities.total:
        lines.append(
            count_of(
                report.quarantined_in_identities.total,
                "quarantined key that identities holds with the same row",
                "quarantined keys that identities holds with the same row",
            )
        )
    if report.legacy_stale.total:
        lines.append(
            count_of(
                report.legacy_stale.total,
                "row where legacy is stale: identities newer",
                "rows where legacy is stale: identities newer",
            )
        )
    return lines


def verdict_reasons(report: VerificationReport) -> list[str]:
    """One line per failing finding of ``report`` (counts net of quarantine, NULL keys, keys,
    fields, columns), and with ``strict`` one per exception too."""
    reasons = []
    quarantined = report.counts.get("quarantined", {})
    for kind, diff in report.counts["difference"].items():
        if diff and kind != "total":
            legacy = report.counts["legacy"].get(kind, 0)
            net = (
                f"legacy {legacy:,} - quarantined {quarantined[kind]:,}"
                if quarantined.get(kind)
                else f"legacy {legacy:,}"
            )
            reasons.append(
                f"row counts differ for {kind}: {net}, new {report.counts['new'].get(kind, 0):,}"
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
    if report.column_mismatches.total:
        columns = ", ".join(f"{k} {v:,}" for k, v in report.mismatches_by_column.items())
        reasons.append(
            count_of(
                report.column_mismatches.total,
                "identities row whose columns disagree with its document",
                "identities rows whose columns disagree with their document",
            )
            + (f" ({columns})" if columns else "")
        )
    if report.strict:
        reasons += [f"strict: {line}" for line in exception_lines(report)]
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
