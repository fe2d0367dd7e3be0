"""Fingerprints of a migration's inputs: a rerun judges again only what changed since.

A key's judgement reads the legacy rows with that key (both tables: ``key_in_both_tables``),
the ``identities`` row with that id, and the key's current quarantine rows; a scar's reads
too the state of its related geoids (in ``identities``, in ``legacy_geoids``, quarantined),
each a key of its own. Keys are grouped into *segments*, ``hash(key) % segments``; a
segment's fingerprint is the sum (as HUGEINT) of the 64-bit hashes of every stored column
of every row of those four sources whose key falls in it. A full ``migrate`` run records,
at its end, every segment's fingerprint with the outcome counts of its legacy rows
(``kimera_migration_fingerprints``): the state a full run leaves is a fixed point (judging
any key again changes nothing; the idempotence test), so as long as a segment's
fingerprint is unchanged, its rows' judgement stands and a rerun counts them by their
recorded outcome instead of judging them again.

A rerun (``plan``) computes every segment's fingerprint in one pass over the four sources
and compares it with the recorded one (no difference: nothing to judge, and identities'
checksum is the recorded one). A segment is judged again when its fingerprint differs, when it holds a scar
whose related geoid's state may differ from the one it was judged against (the geoid lies
in a segment whose *geoid state* differs: a second sum per segment over which keys are
legacy geoids, identities of type geoid, quarantined geoids; or it is a legacy geoid of a
changed segment not yet in identities, which this run may migrate), or when
the recorded fingerprints were made by another recipe (DuckDB version, the migration's
SQL: ``RECIPE``). The segments to judge again go to the temp table ``mig_rejudge``, their
legacy rows to ``mig_todo_geoid`` and ``mig_todo_scar``, their identities to
``mig_todo_identities`` (each table read once).

``segments`` is a multiple of the run's partition count (a segment lies in one partition:
``bucket = segment % partitions``) with about ``SEGMENT_ROWS`` legacy rows each: a change
to 1 % of the rows then makes a few percent of the segments judged again, not every
partition. A resumed run, a run of selected buckets (``migrate_buckets``) and a dry run
record nothing; their changes make the recorded fingerprints differ, never match wrongly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import duckdb

from kimera_core.checksum import Checksum
from kimera_core.entropy import geoid_shannon_sql, scar_entropy_sql
from kimera_core.migration import statements as q
from kimera_core.migration.report import MigrationCounts
from kimera_core.sql import EPOCH_ISO_MACROS, VALUE_MACROS

# Legacy rows per segment, on average: a 1 % change makes about 1 - 0.99**2 = 2 % of the
# segments differ.
SEGMENT_ROWS = 2

# The four sources of a segment: per row its segment, its hash ``h`` over every stored
# column (identities' is the checksum's row hash, so the identities part of the
# fingerprints adds up to kimera_core.checksum.table_checksum of identities), whether it is
# an identities row, and ``g``, its part of the geoid state a scar reads of its related ids
# (a geoid in legacy_geoids, an identity of type geoid, a current geoid quarantine row;
# migration.statements' member_state): not their content, which no scar reads.
_SOURCES = """
    SELECT hash(gid) % $segments::UBIGINT AS segment,
           hash('legacy_geoids', gid, raw, echo, lang_axis, tags, weight, meta, created_at,
                updated_at)::HUGEINT AS h, false AS is_identity,
           hash('legacy_geoids', gid)::HUGEINT AS g
    FROM legacy_geoids
    UNION ALL
    SELECT hash(id) % $segments::UBIGINT, hash('legacy_scars', id, weight, related_ids, meta,
                created_at, updated_at)::HUGEINT, false, 0::HUGEINT
    FROM legacy_scars
    UNION ALL
    SELECT hash(id) % $segments::UBIGINT, hash(id, identity_type, data, created_at, updated_at,
                lang_axis, entropy_score)::HUGEINT, true,
           CASE WHEN identity_type = 'geoid' THEN hash('identities', id)::HUGEINT ELSE 0 END
    FROM identities
    UNION ALL
    SELECT hash(key) % $segments::UBIGINT, hash('kimera_quarantine', source_table, key,
                reasons, original)::HUGEINT, false,
           CASE WHEN source_table = 'legacy_geoids' AND key IS NOT NULL
                THEN hash('kimera_quarantine', key)::HUGEINT ELSE 0 END
    FROM kimera_quarantine WHERE cleared_by IS NULL
"""

# Per segment, optionally only the segments of mig_rejudge ({only}).
SEGMENTS_SQL = """
SELECT segment, sum(h) AS fingerprint, count(*) FILTER (WHERE is_identity) AS identities_rows,
       coalesce(sum(h) FILTER (WHERE is_identity), 0) AS identities_sum, sum(g) AS geoid_state
FROM ({sources}) {only} GROUP BY segment
"""
_ONLY = "WHERE segment IN (SELECT segment FROM mig_rejudge)"

STORED_SQL = "SELECT DISTINCT segments, recipe FROM kimera_migration_fingerprints"

# Segments whose fingerprint differs from the recorded one (or exists on one side only),
# and whether the geoid state a scar reads changed in it.
CHANGED_SQL = f"""
CREATE OR REPLACE TEMP TABLE mig_changed AS
SELECT coalesce(c.segment, f.segment::UBIGINT) AS segment,
       c.geoid_state IS DISTINCT FROM f.geoid_state AS geoids_changed
FROM ({SEGMENTS_SQL.format(sources=_SOURCES, only="")}) c
FULL JOIN kimera_migration_fingerprints f ON f.segment::UBIGINT = c.segment
WHERE c.fingerprint IS DISTINCT FROM f.fingerprint
"""

# The segments judged again: the changed ones, and those of scars with a related id whose
# state may differ from the one they were judged against: in a segment whose geoid state
# changed, or a legacy geoid of a changed segment that is not an identity of type geoid
# (judging it again may migrate it; a geoid already in identities stays there, and a scar
# reads nothing else of it).
REJUDGE_SQL = """
CREATE OR REPLACE TEMP TABLE mig_rejudge AS
WITH unsettled AS (
    SELECT gid AS member FROM legacy_geoids
    WHERE hash(gid) % $segments::UBIGINT IN (SELECT segment FROM mig_changed)
      AND gid NOT IN (SELECT id FROM identities WHERE identity_type = 'geoid'
                      AND hash(id) % $segments::UBIGINT IN (SELECT segment FROM mig_changed))
), members AS (
    SELECT id, unnest(TRY(CAST(json_extract_string(related_ids, '$[*]') AS TEXT[]))) AS member
    FROM legacy_scars
)
SELECT segment FROM mig_changed
UNION
SELECT hash(id) % $segments::UBIGINT FROM members
WHERE hash(member) % $segments::UBIGINT IN (SELECT segment FROM mig_changed WHERE geoids_changed)
   OR member IN (SELECT member FROM unsettled)
"""

# The legacy rows and identities of the segments judged again, each table read once (not
# once per partition: a filter on hash(id) reads every column of every row, documents too).
TODO_SQL = tuple(
    f"""CREATE OR REPLACE TEMP TABLE mig_todo_{kind} AS SELECT * FROM {table}
    WHERE hash({key}) % $segments::UBIGINT IN (SELECT segment FROM mig_rejudge)"""
    for kind, table, key in (
        ("geoid", "legacy_geoids", "gid"),
        ("scar", "legacy_scars", "id"),
        ("identities", "identities", "id"),
    )
)

# Recorded outcome counts of the segments not judged again, per (kind, partition).
SKIPPED_COUNTS_SQL = """
SELECT segment % $buckets AS bucket,
       sum(geoid_unchanged), sum(geoid_kept), sum(geoid_quarantined),
       sum(scar_unchanged), sum(scar_kept), sum(scar_quarantined)
FROM kimera_migration_fingerprints
WHERE {where}
GROUP BY bucket
"""

REJUDGE_BUCKETS_SQL = "SELECT DISTINCT (segment % $buckets)::INTEGER FROM mig_rejudge"

# One partition's judged rows, counted by outcome per segment (collected over the run).
OUTCOMES_SCHEMA_SQL = """
CREATE OR REPLACE TEMP TABLE mig_outcomes (kind TEXT, segment UBIGINT, unchanged BIGINT,
                                           kept BIGINT, quarantined BIGINT)
"""
OUTCOMES_SQL = """
INSERT INTO mig_outcomes
SELECT $kind, hash(key) % $segments::UBIGINT,
       count(*) FILTER (WHERE action IN ('insert', 'update', 'unchanged')),
       count(*) FILTER (WHERE action = 'kept'),
       count(*) FILTER (WHERE len(reasons) > 0)
FROM mig_src GROUP BY ALL
"""

RECORD_SQL = """
INSERT INTO kimera_migration_fingerprints
SELECT $segments, c.segment, c.fingerprint, c.identities_rows, c.identities_sum, c.geoid_state,
       coalesce(o.geoid_unchanged, 0), coalesce(o.geoid_kept, 0),
       coalesce(o.geoid_quarantined, 0), coalesce(o.scar_unchanged, 0),
       coalesce(o.scar_kept, 0), coalesce(o.scar_quarantined, 0), $recipe, $run_id
FROM ({segments}) c LEFT JOIN (
    SELECT segment,
           sum(unchanged) FILTER (WHERE kind = 'geoid') AS geoid_unchanged,
           sum(kept) FILTER (WHERE kind = 'geoid') AS geoid_kept,
           sum(quarantined) FILTER (WHERE kind = 'geoid') AS geoid_quarantined,
           sum(unchanged) FILTER (WHERE kind = 'scar') AS scar_unchanged,
           sum(kept) FILTER (WHERE kind = 'scar') AS scar_kept,
           sum(quarantined) FILTER (WHERE kind = 'scar') AS scar_quarantined
    FROM mig_outcomes GROUP BY segment
) o ON o.segment = c.segment
"""

IDENTITIES_CHECKSUM_SQL = """
SELECT coalesce(sum(identities_rows), 0), coalesce(sum(identities_sum), 0)
FROM kimera_migration_fingerprints
"""


def _recipe() -> str:
    """What a recorded judgement was made with: DuckDB, the migration's SQL and macros."""
    parts = {
        "duckdb": duckdb.__version__,
        "statements": {k: v for k, v in sorted(vars(q).items()) if isinstance(v, str)},
        "macros": list(VALUE_MACROS) + list(EPOCH_ISO_MACROS),
        "entropy": [geoid_shannon_sql("e_in"), scar_entropy_sql("parsed", "src_rowid")],
        "fingerprint": _SOURCES,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


RECIPE = _recipe()


@dataclass
class SkipPlan:
    """What a run judges: every row (``everything``) or the segments of ``mig_rejudge``.

    ``skipped``: per (kind, bucket), the recorded outcome counts of the rows not judged
    again; ``buckets_to_judge``: the partitions holding a segment to judge again;
    ``checksum``: identities' checksum when nothing is judged (the total pass computed it).
    """

    segments: int
    everything: bool = True
    skipped: dict[tuple[str, int], MigrationCounts] = field(default_factory=dict)
    buckets_to_judge: set[int] = field(default_factory=set)
    checksum: Checksum | None = None

    @property
    def nothing_to_judge(self) -> bool:
        return not self.everything and not self.buckets_to_judge

    @property
    def rows_skipped(self) -> int:
        return sum(c.read for c in self.skipped.values())

    def judges(self, bucket: int) -> bool:
        """Whether the run judges rows of partition ``bucket`` again."""
        return self.everything or bucket in self.buckets_to_judge

    def skipped_counts(self, kind: str, bucket: int) -> MigrationCounts:
        return self.skipped.get((kind, bucket), MigrationCounts())


def segment_count(legacy_rows: int, buckets: int) -> int:
    """A multiple of ``buckets`` with about SEGMENT_ROWS legacy rows per segment."""
    return buckets * max(1, -(-legacy_rows // (SEGMENT_ROWS * buckets)))


def plan(con: duckdb.DuckDBPyConnection, buckets: int, legacy_rows: int) -> SkipPlan:
    """Compare the inputs with the recorded fingerprints; the segments to judge again.

    Everything is judged when nothing usable is recorded (none, another recipe, or a
    segment count that is not a multiple of ``buckets``).
    """
    stored = con.execute(STORED_SQL).fetchall()
    if len(stored) != 1 or stored[0][1] != RECIPE or int(stored[0][0]) % buckets:
        return SkipPlan(segment_count(legacy_rows, buckets))
    segments = int(stored[0][0])
    params = {"segments": segments}
    result = SkipPlan(segments, everything=False)
    con.execute(CHANGED_SQL, params)
    if not con.execute("SELECT count(*) FROM mig_changed").fetchone()[0]:
        # nothing changed: identities are as recorded, and so is their checksum
        con.execute("CREATE OR REPLACE TEMP TABLE mig_rejudge (segment UBIGINT)")
        rows, digest = con.execute(IDENTITIES_CHECKSUM_SQL).fetchone()
        result.checksum = Checksum(int(rows), int(digest) & ((1 << 128) - 1))
        where = "true"
    else:
        con.execute(REJUDGE_SQL, params)
        for sql in TODO_SQL:
            con.execute(sql, params)
        result.buckets_to_judge = {
            int(r[0]) for r in con.execute(REJUDGE_BUCKETS_SQL, {"buckets": buckets}).fetchall()
        }
        where = "segment::UBIGINT NOT IN (SELECT segment FROM mig_rejudge)"
    sql = SKIPPED_COUNTS_SQL.format(where=where)
    for bucket, *counts in con.execute(sql, {"buckets": buckets}).fetchall():
        g_unchanged, g_kept, g_quarantined, s_unchanged, s_kept, s_quarantined = map(int, counts)
        for kind, (u, k, qu) in (
            ("geoid", (g_unchanged, g_kept, g_quarantined)),
            ("scar", (s_unchanged, s_kept, s_quarantined)),
        ):
            result.skipped[(kind, int(bucket))] = MigrationCounts(
                read=u + k + qu, unchanged=u, kept=k, quarantined=qu
            )
    return result


def start_outcomes(con: duckdb.DuckDBPyConnection) -> None:
    """An empty ``mig_outcomes`` for the run's judged partitions."""
    con.execute(OUTCOMES_SCHEMA_SQL)


def collect_outcomes(con: duckdb.DuckDBPyConnection, kind: str, segments: int) -> None:
    """Count the partition's judged rows (``mig_src``) by outcome per segment."""
    con.execute(OUTCOMES_SQL, {"kind": kind, "segments": segments})


def record(con: duckdb.DuckDBPyConnection, skip: SkipPlan, run_id: str) -> Checksum:
    """Record the judged segments' fingerprints and outcomes (caller owns the transaction).

    Returns identities' checksum (the identities part of every recorded fingerprint).
    """
    if skip.everything:
        con.execute("DELETE FROM kimera_migration_fingerprints")
        only = ""
    else:
        con.execute(
            "DELETE FROM kimera_migration_fingerprints "
            "WHERE segment::UBIGINT IN (SELECT segment FROM mig_rejudge)"
        )
        only = _ONLY
    segments_sql = SEGMENTS_SQL.format(sources=_SOURCES, only=only)
    # Not under a lowered memory limit: at 10 M rows half the 1 GB limit ran this pass out of
    # memory (docs/benchmarks.md, issue 14 memory).
    con.execute(
        RECORD_SQL.format(segments=segments_sql),
        {"segments": skip.segments, "recipe": RECIPE, "run_id": run_id},
    )
    rows, digest = con.execute(IDENTITIES_CHECKSUM_SQL).fetchone()
    return Checksum(int(rows), int(digest) & ((1 << 128) - 1))
