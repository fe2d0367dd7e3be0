"""The consistency gates: the one verdict of the verifier, judged gate by gate.

``judge_gates`` runs the verifier once and judges every gate (``CONSISTENCY_GATES``,
described in ``GATE_DESCRIPTIONS``) from its report alone (``judge``): each failing finding
of the report fails exactly the gates that cover it, so the gates all pass exactly when the
verification is consistent (``GateReport.consistent``). ``kimera verify``, the Dagster
checks and the rollout all read this one result; none judges on its own.

Explained exceptions do not fail a gate: legacy rows still in quarantine (counted by reason),
quarantined keys identities holds with the same row, rows where legacy is stale because the
merge rule kept the newer identity. Each gate counts them (``Gate.exceptions``) and, in a
strict run, fails on them.

Each ``Gate`` carries ``offending``, the number of rows or keys that fail it (0 exactly when
it passes): count_parity the sum over identity types of |legacy - quarantined - identities|;
key_coverage_legacy_to_new the legacy keys neither in identities nor explained, duplicate
legacy keys and legacy rows without a key; key_coverage_new_to_legacy the identities keys
in no legacy table, duplicate identities keys and identities rows without a key;
field_equality the rows whose mapped fields differ; reconciliation |legacy - present -
quarantined| (the unexplained keys, plus legacy rows without a key); column_agreement the
identities rows whose columns disagree with their document. Its ``evidence`` names the
offending keys with both sides' values, ``authoritative`` the side reads come from and
``next_step`` what to do; ``evidence_markdown`` renders it for a Dagster check's metadata.
The result is a ``GateReport``: the gates and the typed ``VerificationReport`` they were
judged from, with ``to_dict``/``from_dict`` so it travels as one JSON value (Dagster
metadata, Prometheus samples) and comes back typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb

from kimera_core.consistency import DEFAULT_SAMPLE, VerificationReport, count_of, n_rows, verify
from kimera_core.consistency.evidence import (
    COLUMN_SIDES,
    STORE_SIDES,
    KeyEvidence,
    evidence_markdown,
    next_step,
)
from kimera_core.consistency.exceptions import QUARANTINE_EXISTS_SQL, QUARANTINED_KEYS_SQL
from kimera_core.consistency.report import Finding
from kimera_core.identity import IDENTITY_TYPES

__all__ = [
    "CONSISTENCY_GATES",
    "GATE_DESCRIPTIONS",
    "QUARANTINED_KEYS_SQL",
    "QUARANTINE_EXISTS_SQL",
    "Gate",
    "GateReport",
    "gate_markdown",
    "judge",
    "judge_gates",
]

CONSISTENCY_GATES: tuple[str, ...] = (
    "count_parity",
    "key_coverage_legacy_to_new",
    "key_coverage_new_to_legacy",
    "field_equality",
    "reconciliation",
    "column_agreement",
)

GATE_DESCRIPTIONS: dict[str, str] = {
    "count_parity": (
        "Per identity type, legacy rows minus rows still in quarantine equal identities rows."
    ),
    "key_coverage_legacy_to_new": (
        "Every legacy key is in identities or still in quarantine (a run not rolled back), "
        "once per legacy table."
    ),
    "key_coverage_new_to_legacy": "Every identities key exists in a legacy table, once.",
    "field_equality": (
        "Rows in both stores agree field by field (ADR-001 mapping; text byte-exact, JSON as "
        "values, integers exact, weight and timestamps within the stated tolerance); rows "
        "where identities is newer (legacy stale) are counted apart."
    ),
    "reconciliation": "legacy rows = migrated or already present + quarantined.",
    "column_agreement": (
        "Each identities row's columns (id, identity_type, lang_axis, created_at, "
        "updated_at, entropy_score) agree with its own document."
    ),
}


@dataclass
class Gate:
    """One blocking check's outcome: verdict, one-line reason, counts and offending keys.

    ``offending``: the rows or keys that fail the gate (module docstring), 0 when it passes;
    ``sample``: a capped sample of them; ``exceptions``: the explained exceptions it counted
    (not failures unless strict); ``evidence``: the sampled keys with both ``sides``' values;
    ``authoritative``: 'legacy' or 'identities'; ``next_step``: what the operator does.
    """

    name: str
    passed: bool
    summary: str
    counts: dict[str, Any]
    sample: list[Any]
    offending: int
    exceptions: int = 0
    evidence: list[KeyEvidence] = field(default_factory=list)
    sides: tuple[str, str] = STORE_SIDES
    authoritative: str = "legacy"
    next_step: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "summary": self.summary,
            "counts": self.counts,
            "sample": self.sample,
            "offending": self.offending,
            "exceptions": self.exceptions,
            "evidence": [e.to_dict(self.sides) for e in self.evidence],
            "sides": list(self.sides),
            "authoritative": self.authoritative,
            "next_step": self.next_step,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gate:
        """The gate ``to_dict`` made (one recorded before evidence existed reads too)."""
        sides: tuple[str, str] = tuple(d.get("sides", STORE_SIDES))  # type: ignore[assignment]
        return cls(
            d["name"],
            d["passed"],
            d["summary"],
            d["counts"],
            list(d["sample"]),
            d["offending"],
            d.get("exceptions", 0),
            [KeyEvidence.from_dict(e, sides) for e in d.get("evidence", [])],
            sides,
            d.get("authoritative", "legacy"),
            d.get("next_step", ""),
        )


@dataclass
class GateReport:
    """Every gate (in ``CONSISTENCY_GATES`` order) and the verification they were judged from."""

    gates: list[Gate]
    verification: VerificationReport

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def consistent(self) -> bool:
        """The one verdict: every gate passed, exactly when the verification is consistent."""
        return self.passed

    @property
    def verdict(self) -> str:
        return "consistent" if self.consistent else "inconsistent"

    def gate(self, name: str) -> Gate:
        """The gate called ``name``; KeyError if there is none."""
        for g in self.gates:
            if g.name == name:
                return g
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "gates": [g.to_dict() for g in self.gates],
            "verification": self.verification.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateReport:
        """The report ``to_dict`` made (``passed`` and ``verdict`` are derived)."""
        return cls(
            [Gate.from_dict(g) for g in d["gates"]],
            VerificationReport.from_dict(d["verification"]),
        )


def judge_gates(
    con: duckdb.DuckDBPyConnection,
    *,
    incremental: bool = False,
    sample: int = DEFAULT_SAMPLE,
    record: bool = True,
    strict: bool = False,
    cache: bool = True,
) -> GateReport:
    """Run the consistency verifier once and judge each gate from its report.

    ``incremental``, ``sample``, ``record``, ``cache``: as in ``consistency.verify``;
    ``strict``: explained exceptions fail their gates too. Raises what ``verify`` raises
    (ValueError for a negative sample, duckdb.Error from the database).
    """
    report = verify(
        con, incremental=incremental, sample=sample, record=record, cache=cache, strict=strict
    )
    return GateReport(judge(report), report)


def _total(counts: dict[str, int] | None) -> int:
    return sum(v for k, v in (counts or {}).items() if k != "total")


def _gate(
    name: str,
    failing: int,
    exceptions: int,
    strict: bool,
    summary: str,
    counts: dict[str, Any],
    findings: list[Finding],
    report: VerificationReport,
    kind: str,
    ids: bool = False,
) -> Gate:
    """A gate failing on ``failing`` items (and, strict, on ``exceptions``), its sample and
    evidence from ``findings`` (as many as the largest finding's sample; ``ids``: the sample
    as bare keys, as the key gates have always given it)."""
    offending = failing + (exceptions if strict else 0)
    cap = max((len(f.sample) for f in findings), default=0)
    shown = [f for f in findings if f.total]
    sample = [s for f in shown for s in f.sample][:cap]
    return Gate(
        name,
        offending == 0,
        summary,
        counts,
        [s["id"] for s in sample] if ids else sample,
        offending,
        exceptions,
        [e for f in shown for e in f.evidence][:cap],
        findings[0].sides if findings else STORE_SIDES,
        report.authoritative,
        next_step(kind, report.authoritative) if offending or exceptions else "",
    )


def judge(report: VerificationReport) -> list[Gate]:
    """Every gate of ``CONSISTENCY_GATES``, judged from ``report`` alone."""
    strict = report.strict
    legacy, new = report.counts.get("legacy", {}), report.counts.get("new", {})
    quarantined = report.counts.get("quarantined", {})
    parity = {
        kind: {
            "legacy": legacy.get(kind, 0),
            "quarantined": quarantined.get(kind, 0),
            "new": new.get(kind, 0),
        }
        for kind in IDENTITY_TYPES
    }
    gaps = {k: abs(c["legacy"] - c["quarantined"] - c["new"]) for k, c in parity.items()}
    off = [k for k, gap in gaps.items() if gap]
    dups = {"legacy": 0, "new": 0, **report.duplicates_by_store}
    null_legacy, null_new = report.null_keys.get("legacy", 0), report.null_keys.get("new", 0)
    missing_new, missing_legacy = report.missing_in_new.total, report.missing_in_legacy.total
    q_rows, q_present = report.quarantined.total, report.quarantined_in_identities.total
    stale, mismatches = report.legacy_stale.total, report.field_mismatches.total
    legacy_total = _total(legacy)
    present = legacy_total - _total(quarantined) - missing_new - null_legacy
    unexplained = missing_new + dups["legacy"] + null_legacy
    by_reason = ", ".join(f"{r} {n:,}" for r, n in sorted(report.quarantine_reasons.items()))
    return [
        _gate(
            "count_parity",
            sum(gaps.values()),
            0,
            strict,
            (
                "per type, legacy rows - quarantined = identities rows"
                if not off
                else "counts differ for "
                + ", ".join(
                    f"{k}: legacy {parity[k]['legacy']:,} - quarantined "
                    f"{parity[k]['quarantined']:,} != identities {parity[k]['new']:,}"
                    for k in off
                )
            ),
            {"by_type": parity},
            [],
            report,
            "missing_in_new",
        ),
        _gate(
            "key_coverage_legacy_to_new",
            unexplained,
            q_rows + q_present,
            strict,
            count_of(
                missing_new,
                "legacy key neither in identities nor quarantined",
                "legacy keys neither in identities nor quarantined",
            )
            + (f", {count_of(dups['legacy'], 'duplicate legacy key')}" if dups["legacy"] else "")
            + (f", {n_rows(null_legacy)} without a key" if null_legacy else ""),
            {
                "legacy_keys": legacy_total,
                "present": present,
                "quarantined": q_rows,
                "quarantine_reasons": report.quarantine_reasons,
                "quarantined_in_identities": q_present,
                "unexplained": missing_new,
                "duplicate_keys": dups["legacy"],
                "null_keys": null_legacy,
            },
            [report.missing_in_new, report.duplicate_keys]
            + ([report.quarantined, report.quarantined_in_identities] if strict else []),
            report,
            "missing_in_new",
            ids=True,
        ),
        _gate(
            "key_coverage_new_to_legacy",
            missing_legacy + dups["new"] + null_new,
            0,
            strict,
            count_of(
                missing_legacy,
                "identities key in no legacy table",
                "identities keys in no legacy table",
            )
            + (f", {count_of(dups['new'], 'duplicate identities key')}" if dups["new"] else "")
            + (f", {n_rows(null_new)} without a key" if null_new else ""),
            {
                "missing_in_legacy": missing_legacy,
                "duplicate_keys": dups["new"],
                "null_keys": null_new,
                "mode": report.mode,
            },
            [report.missing_in_legacy],
            report,
            "missing_in_legacy",
        ),
        _gate(
            "field_equality",
            mismatches,
            stale,
            strict,
            f"{n_rows(mismatches)} whose mapped fields differ"
            + (
                "; "
                + count_of(stale, "row where legacy is stale", "rows where legacy is stale")
                + " (identities newer)"
                if stale
                else ""
            ),
            {
                "field_mismatches": mismatches,
                "legacy_stale": stale,
                "by_field": report.mismatches_by_field,
                "mode": report.mode,
                "keys_checked": report.keys_checked,
            },
            [report.field_mismatches] + ([report.legacy_stale] if strict else []),
            report,
            "field_mismatches" if mismatches or not stale else "legacy_stale",
        ),
        _gate(
            "reconciliation",
            abs(legacy_total - present - _total(quarantined)),
            q_rows,
            strict,
            (
                f"legacy {legacy_total:,} = migrated or present {present:,} + "
                f"quarantined {_total(quarantined):,}"
                + (f" ({by_reason})" if by_reason else "")
                + ("" if not missing_new else f" (+ {missing_new:,} unexplained)")
            ),
            {
                "legacy": legacy_total,
                "present": present,
                "quarantined": _total(quarantined),
                "unexplained": missing_new,
            },
            [report.missing_in_new] + ([report.quarantined] if strict else []),
            report,
            "missing_in_new",
            ids=True,
        ),
        _gate(
            "column_agreement",
            report.column_mismatches.total,
            0,
            strict,
            count_of(
                report.column_mismatches.total,
                "identities row whose columns disagree with its document",
                "identities rows whose columns disagree with their document",
            ),
            {"column_mismatches": report.column_mismatches.total, **report.mismatches_by_column},
            [report.column_mismatches],
            report,
            "column_mismatches",
        ),
    ]


def gate_markdown(gate: Gate) -> str:
    """A gate's evidence as markdown (Dagster check metadata): its summary, a table of the
    offending keys with both sides' values per differing field, the authoritative side and
    the next step."""
    title = f"{gate.name}: {'passed' if gate.passed else 'FAILED'} ({gate.summary})"
    return evidence_markdown(
        title,
        gate.evidence,
        gate.sides if gate.sides else COLUMN_SIDES,
        gate.authoritative,
        gate.next_step,
        gate.offending + (gate.exceptions if gate.passed else 0) or None,
    )
