"""The legacy-to-identities migration: set-based, resumable, quarantining, reversible.

A run copies ``legacy_geoids`` and ``legacy_scars`` into P1's ``identities`` one hash
partition at a time, each partition one transaction; a run killed at any point resumes
from its last committed partition and converges to the state of an uninterrupted run, and
``rollback`` undoes runs from their journal. docs/migration.md is the operator's runbook.

The package, along its seams:

* ``schema``: the migration's own tables (runs, partitions, journal, quarantine, warnings);
* ``statements``: the named SQL of one partition (prepare, quarantine, journal, merge);
* ``indexes``: identities' secondary indexes dropped for the load and rebuilt after it;
* ``engine``: ``migrate``, ``migrate_buckets``, partitions, resume, dry run, memory limit;
* ``fingerprints``: per-segment fingerprints of a full run's inputs, so that a rerun
  judges again only what changed;
* ``rollback``: ``rollback`` and its rule (refused while reads come from identities);
* ``report``: the typed reports (``MigrationReport``, ``MigrationCounts``,
  ``PartitionCounts``, with ``to_dict``/``from_dict``) and the views of past runs.

This module re-exports the public names; import from here.
"""

from __future__ import annotations

from kimera_core.migration.engine import (
    DEFAULT_MEMORY_LIMIT,
    KINDS,
    MEMORY_LIMIT_ENV,
    ROWS_PER_PARTITION,
    WAITING_KIND,
    auto_partitions,
    migrate,
    migrate_buckets,
)
from kimera_core.migration.report import (
    MigrationCounts,
    MigrationReport,
    PartitionCounts,
    ProgressCallback,
    quarantine_summary,
    run_history,
    settled_quarantine_keys_sql,
    waiting_scars,
)
from kimera_core.migration.rollback import RollbackRefused, RollbackReport, rollback
from kimera_core.migration.schema import IDENTITY_COLUMNS, SCHEMA_SQL, ensure_schema

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "IDENTITY_COLUMNS",
    "KINDS",
    "MEMORY_LIMIT_ENV",
    "ROWS_PER_PARTITION",
    "SCHEMA_SQL",
    "WAITING_KIND",
    "MigrationCounts",
    "MigrationReport",
    "PartitionCounts",
    "ProgressCallback",
    "RollbackRefused",
    "RollbackReport",
    "auto_partitions",
    "ensure_schema",
    "migrate",
    "migrate_buckets",
    "quarantine_summary",
    "rollback",
    "run_history",
    "settled_quarantine_keys_sql",
    "waiting_scars",
]
