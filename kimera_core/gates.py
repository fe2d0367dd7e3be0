"""The consistency gates: the verifier's findings judged with the migration's quarantine.

One blocking check per gate (``CONSISTENCY_GATES``, described in ``GATE_DESCRIPTIONS``);
``consistency_gates`` runs the verifier once and judges every gate from its report and the
standing of each legacy key (in identities, quarantined by a run not rolled back, or
unexplained). The CLI, the Dagster checks and the rollout all read these results.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from kimera_core.consistency import n_rows, verify

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
# absent from identities, or neither (unexplained).
KEY_STANDING_SQL = """
WITH legacy AS (
    SELECT gid AS id, 'geoid' AS kind FROM legacy_geoids WHERE gid IS NOT NULL
    UNION ALL SELECT id, 'scar' FROM legacy_scars WHERE id IS NOT NULL
), q AS (
    SELECT DISTINCT q.key FROM kimera_quarantine q
    JOIN kimera_migration_runs r ON r.run_id = q.run_id AND r.status <> 'rolled_back'
)
SELECT l.id, l.kind,
       CASE WHEN i.id IS NOT NULL THEN 'present'
            WHEN l.id IN (SELECT key FROM q) THEN 'quarantined'
            ELSE 'unexplained' END AS standing
FROM legacy l LEFT JOIN (SELECT DISTINCT id FROM identities) i ON i.id = l.id
"""


@dataclass
class Gate:
    """One blocking check's outcome: verdict, one-line reason, counts and offending keys."""

    name: str
    passed: bool
    summary: str
    counts: dict[str, object]
    sample: list[object]


def _key_standing(con: duckdb.DuckDBPyConnection, sample: int) -> tuple[dict, list[str]]:
    has_quarantine = bool(
        con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'kimera_quarantine'"
        ).fetchone()[0]
    )
    sql = KEY_STANDING_SQL
    if not has_quarantine:  # never migrated: nothing is quarantined
        sql = sql.replace(
            "SELECT DISTINCT q.key FROM kimera_quarantine q\n    JOIN kimera_migration_runs r "
            "ON r.run_id = q.run_id AND r.status <> 'rolled_back'",
            "SELECT NULL::TEXT AS key WHERE false",
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


def consistency_gates(
    con: duckdb.DuckDBPyConnection,
    *,
    incremental: bool = False,
    sample: int = 20,
    record: bool = True,
) -> tuple[list[Gate], dict[str, object]]:
    """Run the consistency verifier and judge each gate; returns the gates and the report.

    Quarantined legacy rows are accounted for, not forgiven: a legacy key missing from
    identities passes only if a migration run (not rolled back) quarantined it. Counts and
    key coverage legacy -> new are computed over the whole tables (cheap key joins); field
    equality and keys only in identities come from the verifier (full or incremental).
    """
    report = verify(con, incremental=incremental, sample=sample, record=record)
    standing, unexplained = _key_standing(con, sample)

    def total(kind_counts: dict[str, int] | None) -> int:
        return sum((kind_counts or {}).values())

    present, quarantined = standing.get("present", {}), standing.get("quarantined", {})
    n_unexplained = total(standing.get("unexplained"))
    new_counts = report.counts["new"]
    legacy_counts = report.counts["legacy"]
    parity = {
        kind: {
            "legacy": legacy_counts.get(kind, 0),
            "quarantined": quarantined.get(kind, 0),
            "new": new_counts.get(kind, 0),
        }
        for kind in ("geoid", "scar")
    }
    parity_off = [k for k, c in parity.items() if c["legacy"] - c["quarantined"] != c["new"]]
    legacy_total = legacy_counts.get("total", 0)
    gates = [
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
        ),
        Gate(
            "key_coverage_legacy_to_new",
            n_unexplained == 0,
            f"{n_unexplained:,} legacy keys neither in identities nor quarantined",
            {
                "legacy_keys": legacy_total,
                "present": total(present),
                "quarantined": total(quarantined),
                "unexplained": n_unexplained,
                "verifier_missing_in_new": report.missing_in_new.total,
                "duplicate_keys": report.duplicate_keys.total,
            },
            unexplained,
        ),
        Gate(
            "key_coverage_new_to_legacy",
            report.missing_in_legacy.total == 0 and not report.null_keys.get("new"),
            f"{report.missing_in_legacy.total:,} identities keys in no legacy table",
            {"missing_in_legacy": report.missing_in_legacy.total, "mode": report.mode},
            report.missing_in_legacy.sample,
        ),
        Gate(
            "field_equality",
            report.field_mismatches.total == 0,
            f"{n_rows(report.field_mismatches.total)} whose mapped fields differ",
            {
                "field_mismatches": report.field_mismatches.total,
                "by_field": report.mismatches_by_field,
                "mode": report.mode,
                "keys_checked": report.keys_checked,
            },
            report.field_mismatches.sample,
        ),
        Gate(
            "reconciliation",
            legacy_total == total(present) + total(quarantined),
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
        ),
    ]
    return gates, report.to_dict()
