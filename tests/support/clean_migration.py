"""A clean set-based migration for tests and benchmarks: every legacy row as its P1 document.

No validation, no quarantine, no journal: the legacy rows are copied into ``identities``
in one INSERT, the document built by ``kimera_core.sql.p1_document_sql`` (the one spelling of
the P1 layout) with the ISO timestamps by ``kimera_core.sql``'s one formula. A geoid's
related_ids is null (legacy_geoids cannot hold the list); entropy_score is 0 (callers that
need it recompute it). The consistency tests and bench/bench_consistency.py share it.
"""

from __future__ import annotations

import duckdb

from kimera_core.sql import (
    epoch_iso_fixes,
    epoch_iso_sql,
    install_epoch_iso_macros,
    p1_document_sql,
    p1_scar_document_sql,
)

_GEOID_EPOCHS = (
    "SELECT created_at FROM legacy_geoids UNION ALL SELECT updated_at FROM legacy_geoids"
)
_SCAR_EPOCHS = "SELECT created_at FROM legacy_scars UNION ALL SELECT updated_at FROM legacy_scars"


def clean_migration_sql(*, fixes: bool, scars: bool = True) -> str:
    """The INSERT INTO identities of every legacy geoid (and scar, with ``scars``).

    ``fixes``: the ``epoch_iso_fixes`` view exists (see ``kimera_core.sql``).
    """
    created = epoch_iso_sql("created_at", fixes=fixes)
    updated = epoch_iso_sql("updated_at", fixes=fixes)
    geoid_doc = p1_document_sql(
        id="gid",
        identity_type="'geoid'",
        raw="raw",
        echo="echo",
        lang_axis="lang_axis",
        tags="tags",
        weight="weight",
        related_ids="NULL",
        meta="meta",
        created_at=created,
        updated_at=updated,
    )
    sql = (
        "INSERT INTO identities\n"
        f"SELECT gid, 'geoid', {geoid_doc}, created_at, updated_at, lang_axis, 0\n"
        "FROM legacy_geoids\n"
    )
    if not scars:
        return sql
    scar_doc = p1_scar_document_sql(
        id="id",
        weight="weight",
        related_ids="related_ids",
        meta="meta",
        created_at=created,
        updated_at=updated,
    )
    return (
        sql + "UNION ALL\n"
        f"SELECT id, 'scar', {scar_doc}, created_at, updated_at, NULL, 0\n"
        "FROM legacy_scars\n"
    )


def migrate_documents(con: duckdb.DuckDBPyConnection, *, scars: bool = True) -> None:
    """Copy every legacy geoid (and scar, with ``scars``) into identities as its P1 document."""
    install_epoch_iso_macros(con)
    epochs = f"{_GEOID_EPOCHS} UNION ALL {_SCAR_EPOCHS}" if scars else _GEOID_EPOCHS
    with epoch_iso_fixes(con, epochs) as fixes:
        con.execute(clean_migration_sql(fixes=fixes, scars=scars))
