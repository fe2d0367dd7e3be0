"""The consistency gates: the verifier's findings judged with the migration's quarantine.

One blocking check per gate (``CONSISTENCY_GATES``, described in ``GATE_DESCRIPTIONS``);
``judge_gates`` runs the verifier once and judges every gate from its report and the
standing of each legacy key (in identities, quarantined by a run not rolled back, or
unexplained). Quarantined legacy rows are accounted for, not forgiven.

Each ``Gate`` carries ``offending``, the number of rows or keys that hold it (0 exactly when
it passes): count_parity the sum over identity types of |legacy - quarantined - identities|;
key_coverage_legacy_to_new the unexplained legacy keys; key_coverage_new_to_legacy the
identities keys in no legacy table plus identities rows without a key; field_equality the
rows whose mapped fields differ; reconciliation |legacy - present - quarantined| (the
unexplained keys, plus legacy rows without a key). The result is a ``GateReport``: the gates
and the typed ``VerificationReport`` they were judged from, with ``to_dict``/``from_dict``
so it travels as one JSON value (Dagster metadata, Prometheus samples) and comes back typed.
The CLI, the Dagster checks and the rollout all read these results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb

from kimera_core.consistency import DEFAULT_SAMPLE, VerificationReport, count_of, n_rows, verify
from kimera_core.identity import IDENTITY_TYPES

CONSISTENCY_GATES: tuple[str, ...] = (
    "count_parity",
    "key_coverage_legacy_to_new",
    "key_coverage_new_to_legacy",
    "field_equality",
    "reconciliation",
)

GATE_DESCRIPTIONS: dict[str, str] = {
    "count_parity": (
        "Per identity type, legacy rows minus quarantined rows equal identities rows."
    ),
    "key_coverage_legacy_to_new": (
        "Every legacy key is in identities or was quarantined by a migration run."
    ),
    "key_coverage_new_to_legacy": "Every identities key exists in a legacy table.",
    "field_equality": (
        "Rows in both stores agree field by field (ADR-001 mapping, NULL-safe, JSON as "
        "values, weight and timestamps within the stated tolerance)."
    ),
    "reconciliation": "legacy rows = migrated or already present + quarantined.",
}

# Legacy keys by where they stand: in identities, quarantined (by a run not rolled back) and
# absent from identities, or neither (unexplained). {quarantined}: QUARANTINED_KEYS_SQL, or
# NO_QUARANTINE_SQL on a database never migrated (no kimera_quarantine table).
QUARANTINED_KEYS_SQL = """
    SELECT DISTINCT q.key FROM kimera_quarantine q
    JOIN kimera_migration_runs r ON r.run_id = q.run_id AND r.status <> 'rolled_back'
"""
NO_QUARANTINE_SQL = "SELECT NULL::TEXT AS key WHERE false"
KEY_STANDING_SQL = """
WITH legacy AS (
    SELECT gid AS id, 'geoid' AS kind FROM legacy_geoids WHERE gid IS NOT NULL
    UNION ALL SELECT id, 'scar' FROM legacy_scars WHERE id IS NOT NULL
), q AS ({quarantined})
SELECT l.id, l.kind,
       CASE WHEN i.id IS NOT NULL THEN 'present'
            WHEN l.id IN (SELECT key FROM q) THEN 'quarantined'
            ELSE 'unexplained' END AS standing
FROM legacy l LEFT JOIN (SELECT DISTINCT id FROM identities) i ON i.id = l.id
"""


# Whether this database (not an attached one) was ever migrated.
QUARANTINE_EXISTS_SQL = """
SELECT count(*) FROM information_schema.tables
WHERE table_catalog = current_database() AND table_schema = 'main'
  AND table_name = 'kimera_quarantine'
"""


@dataclass
class Gate:
    """One blocking check's outcome: verdict, one-line reason, counts and offending keys.

    ``offending``: the rows or keys that hold the gate (module docstring), 0 when it passes;
    ``sample``: a capped sample of them.
    """

    name: str
    passed: bool
    summary: str
    counts: dict[str, Any]
    sample: list[Any]
    offending: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "summary": self.summary,
            "counts": self.counts,
            "sample": self.sample,
            "offending": self.offending,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gate:
        return cls(
            d["name"], d["passed"], d["summary"], d["counts"], list(d["sample"]), d["offending"]
        )


@dataclass
class GateReport:
    """Every gate (in ``CONSISTENCY_GATES`` order) and the verification they were judged from."""

    gates: list[Gate]
    verification: VerificationReport

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def gate(self, name: str) -> Gate:
        """The gate called ``name``; KeyError if there is none."""
        for g in self.gates:
            if g.name == name:
                return g
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "gates": [g.to_dict() for g in self.gates],
            "verification": self.verification.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateReport:
        """The report ``to_dict`` made (``passed`` is derived from the gates)."""
        return cls(
            [Gate.from_dict(g) for g in d["gates"]],
            VerificationReport.from_dict(d["verification"]),
        )


def _key_standing(
    con: duckdb.DuckDBPyConnection, sample: int
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Legacy keys counted by standing and identity type, and a sample of unexplained keys."""
    migrated = bool(con.execute(QUARANTINE_EXISTS_SQL).fetchone()[0])
    sql = KEY_STANDING_SQL.format(
        quarantined=QUARANTINED_KEYS_SQL if migrated else NO_QUARANTINE_SQL
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_gate_keys AS {sql}")
    counts: dict[str, dict[str, int]] = {}
    for kind, standing, n in con.execute(
        "SELECT kind, standing, count(*) FROM kimera_gate_keys GROUP BY ALL"
    ).fetchall():
        counts.setdefault(standing, {}).setdefault(kind, 0)
        counts[standing][kind] += int(n)
    keys = [
        r[0]
        for r in con.execute(
            "SELECT id FROM kimera_gate_keys WHERE standing = 'unexplained' ORDER BY id LIMIT ?",
            [sample],
        ).fetchall()
    ]
    con.execute("DROP TABLE kimera_gate_keys")
    return counts, keys


def judge_gates(
    con: duckdb.DuckDBPyConnection,
    *,
    incremental: bool = False,
    sample: int = DEFAULT_SAMPLE,
    record: bool = True,
) -> GateReport:
    """Run the consistency verifier and judge each gate.

    A legacy key missing from identities passes only if a migration run (not rolled back)
    quarantined it. Counts and key coverage legacy -> new are computed over the whole tables
    (cheap key joins); field equality and keys only in identities come from the verifier (full
    or incremental). ``sample`` caps each gate's offending keys; ``record`` as in
    ``consistency.verify``.
    """
    report = verify(con, incremental=incremental, sample=sample, record=record)
    standing, unexplained = _key_standing(con, sample)
    return GateReport(_judge(report, standing, unexplained), report)


def _judge(
    report: VerificationReport, standing: dict[str, dict[str, int]], unexplained: list[str]
) -> list[Gate]:
    def total(kind_counts: dict[str, int] | None) -> int:
        return sum((kind_counts or {}).values())

    present, quarantined = standing.get("present", {}), standing.get("quarantined", {})
    n_unexplained = total(standing.get("unexplained"))
    legacy_counts, new_counts = report.counts["legacy"], report.counts["new"]
    parity = {
        kind: {
            "legacy": legacy_counts.get(kind, 0),
            "quarantined": quarantined.get(kind, 0),
            "new": new_counts.get(kind, 0),
        }
        for kind in IDENTITY_TYPES
    }
    parity_gap = {k: abs(c["legacy"] - c["quarantined"] - c["new"]) for k, c in parity.items()}
    parity_off = [k for k, gap in parity_gap.items() if gap]
    legacy_total = legacy_counts.get("total", 0)
    accounted = total(present) + total(quarantined)
    missing_in_legacy = report.missing_in_legacy.total
    null_new = report.null_keys.get("new", 0)
    mismatches = report.field_mismatches.total
    return [
        Gate(
            "count_parity",
            not parity_off,
            (
                "per type, legacy rows - quarantined = identities rows"
                if not parity_off
                else "counts differ for "
                + ", ".join(
                    f"{k}: legacy {parity[k]['legacy']:,} - quarantined "
                    f"{parity[k]['quarantined']:,} != identities {parity[k]['new']:,}"
                    for k in parity_off
                )
            ),
            {"by_type": parity},
            [],
            sum(parity_gap.values()),
        ),
        Gate(
            "key_coverage_legacy_to_new",
            n_unexplained == 0,
            count_of(
                n_unexplained,
                "legacy key neither in identities nor quarantined",
                "legacy keys neither in identities nor quarantined",
            ),
            {
                "legacy_keys": legacy_total,
                "present": total(present),
                "quarantined": total(quarantined),
                "unexplained": n_unexplained,
                "verifier_missing_in_new": report.missing_in_new.total,
                "duplicate_keys": report.duplicate_keys.total,
            },
            unexplained,
            n_unexplained,
        ),
        Gate(
            "key_coverage_new_to_legacy",
            missing_in_legacy == 0 and not null_new,
            count_of(
                missing_in_legacy,
                "identities key in no legacy table",
                "identities keys in no legacy table",
            )
            + (f", {n_rows(null_new)} without a key" if null_new else ""),
            {"missing_in_legacy": missing_in_legacy, "mode": report.mode},
            report.missing_in_legacy.sample,
            missing_in_legacy + null_new,
        ),
        Gate(
            "field_equality",
            mismatches == 0,
            f"{n_rows(mismatches)} whose mapped fields differ",
            {
                "field_mismatches": mismatches,
                "by_field": report.mismatches_by_field,
                "mode": report.mode,
                "keys_checked": report.keys_checked,
            },
            report.field_mismatches.sample,
            mismatches,
        ),
        Gate(
            "reconciliation",
            legacy_total == accounted,
            (
                f"legacy {legacy_total:,} = migrated or present {total(present):,} + "
                f"quarantined {total(quarantined):,}"
                + ("" if n_unexplained == 0 else f" (+ {n_unexplained:,} unexplained)")
            ),
            {
                "legacy": legacy_total,
                "present": total(present),
                "quarantined": total(quarantined),
                "unexplained": n_unexplained,
            },
            unexplained,
            abs(legacy_total - accounted),
        ),
    ]
