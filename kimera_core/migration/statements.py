"""The migration's named SQL: one partition prepared, quarantined, journalled and merged.

A partition is the legacy rows whose key hashes to one bucket. ``PARTITION_ROWS_SQL`` copies
them once; ``PREPARE_GEOIDS_SQL`` / ``PREPARE_SCARS_SQL`` then validate every row, build the
P1 document (ISO timestamps by ``kimera_core.sql``'s one formula, entropy by
``kimera_core.entropy``'s bulk form) and decide each row's action by the merge rule, all in
one statement into the temp table ``mig_src``. The statements after it read ``mig_src``:
quarantine, warnings, the rollback journal, the insert and the update into ``identities``,
the partition's counts and checksum. The engine (``migration.engine``) runs them in one
transaction per partition.

``__NAME__`` tokens in the prepare statements are replaced by the engine with vetted SQL
fragments before execution (the entropy subqueries, the JSON parse of TEXT columns in old
files, the duplicate count, the ISO text expressions, the identities a rerun compares with);
values are always bound parameters.
"""

from __future__ import annotations

from kimera_core.sql import filled_times_sql, p1_document_sql, p1_scar_document_sql

_G_CREATED, _G_UPDATED = filled_times_sql("g")
_S_CREATED, _S_UPDATED = filled_times_sql("s")

# Documents equal as minified JSON; for a geoid, related_ids null and [] count as the same
# (json_merge_patch moves the key, so both sides are patched alike). Equal texts are equal
# documents: that test comes first, and only the rest are parsed (CASE runs its branches
# for the rows that reach them; the parses cost ~70 us a row).
SAME_DOC_MACRO = """
CREATE OR REPLACE TEMP MACRO kimera_same_doc(a, b, kind) AS (
    CASE WHEN CAST(a AS VARCHAR) = CAST(b AS VARCHAR) THEN true
         WHEN kind = 'geoid'
              AND coalesce(json_array_length(a, '$.related_ids'), 0) = 0
              AND coalesce(json_array_length(b, '$.related_ids'), 0) = 0
         THEN json_merge_patch(a, '{"related_ids": []}') = json_merge_patch(b, '{"related_ids": []}')
         ELSE json(a) = json(b)
    END
)
"""

# The existing identity under the same key, columns renamed so nothing is ambiguous.
# Only this partition's buckets ($bucket..$last, consecutive: ``migration.engine`` groups the
# small buckets of the smaller table): the scan hashes every id but reads documents for
# the buckets' rows only.
_EXISTING = """(SELECT id AS i_id, identity_type AS i_type, data AS i_data, created_at AS i_created,
          updated_at AS i_updated, lang_axis AS i_lang, entropy_score AS i_entropy
   FROM __IDENTITIES__ WHERE hash(id) % $buckets::UBIGINT BETWEEN $bucket::UBIGINT AND $last::UBIGINT)"""

# Entropy rows are keyed by rowid: an old file without a primary key may repeat a key.
# The merge rule: no identity -> insert; same document and timestamps -> unchanged (a geoid's
# related_ids null and [] are the same: legacy_geoids cannot hold the list); the legacy row
# strictly newer by updated_at -> update; otherwise the identity (written by the
# application, newer or tied) is kept.
_PLAN = """
SELECT c.*, e.entropy,
       hash(c.key, c.identity_type, c.doc, c.created_at, c.updated_at, c.lang_axis, e.entropy)
           AS new_hash,
       CASE WHEN c.i_id IS NOT NULL THEN hash(c.i_id, c.i_type, c.i_data, c.i_created,
                                              c.i_updated, c.i_lang, c.i_entropy) END AS old_hash,
       CASE WHEN len(c.reasons) > 0 THEN NULL
            WHEN c.i_id IS NULL THEN 'insert'
            WHEN c.i_created = c.created_at AND c.i_updated = c.updated_at
                 AND kimera_same_doc(c.i_data, c.doc, c.identity_type) THEN 'unchanged'
            WHEN c.updated_at > c.i_updated THEN 'update'
            ELSE 'kept'
       END AS action
FROM checked_out c LEFT JOIN e ON e.key = c.src_rowid
"""

# The P1 documents a partition's rows become (__NAME__ tokens as below).
_GEOID_DOC = p1_document_sql(
    id="gid",
    identity_type="'geoid'",
    raw="raw",
    echo="echo",
    lang_axis="lang_axis",
    tags="tags_j",
    weight="weight",
    related_ids="'[]'::JSON",
    meta="meta_j",
    created_at="__CREATED_ISO__",
    updated_at="__UPDATED_ISO__",
)
_SCAR_DOC = p1_scar_document_sql(
    id="p.id",
    weight="weight",
    related_ids="rel_j",
    meta="meta_j",
    created_at="__CREATED_ISO__",
    updated_at="__UPDATED_ISO__",
)

# One statement per partition: parse once, validate, build the P1 document, compute entropy
# with the bulk form's stages, and decide each row's action. __NAME__ tokens are replaced
# with vetted SQL fragments before execution.
PREPARE_GEOIDS_SQL = (
    """
CREATE OR REPLACE TEMP TABLE mig_src AS
WITH src AS (
    -- raw.strip() once: empty_raw, echo and the gid read it
    SELECT g.*, g.rowid AS src_rowid, __DUP_COUNT__ AS dup_count, kimera_py_strip(g.raw) AS raw_s,
           """
    + _G_CREATED
    + """ AS c_at,
           """
    + _G_UPDATED
    + """ AS u_at
    FROM mig_part g
), parsed AS (
    SELECT s.*, __META__ AS meta_j, __TAGS__ AS tags_j, i.*
    FROM src s LEFT JOIN """
    + _EXISTING
    + """ i ON i.i_id = s.gid
), terms AS (
    SELECT p.*, gid AS key,
           TRY(json_extract(meta_j, '$.terms')) AS terms_j,
           kimera_non_finite_hint(meta_j) AS meta_hint,
           TRY(CASE WHEN json_type(tags_j) = 'ARRAY' THEN json_array_length(tags_j) END) AS n_tags
    FROM parsed p
), e_in AS (
    SELECT src_rowid AS key, terms_j, n_tags FROM terms
), e AS (SELECT * FROM (__SHANNON__)), checked AS (
    SELECT t.*,
        list_filter([
            CASE WHEN gid IS NULL OR kimera_py_blank(gid) THEN 'null_or_empty_key' END,
            CASE WHEN dup_count > 1 THEN 'duplicate_key' END,
            CASE WHEN gid IN (SELECT id FROM legacy_scars
                              WHERE hash(id) % $buckets::UBIGINT BETWEEN $bucket::UBIGINT AND $last::UBIGINT)
                 THEN 'key_in_both_tables' END,
            CASE WHEN i_type <> 'geoid' THEN 'identity_type_conflict' END,
            CASE WHEN meta IS NOT NULL AND meta_j IS NULL THEN 'invalid_json_meta' END,
            CASE WHEN tags IS NOT NULL AND tags_j IS NULL THEN 'invalid_json_tags' END,
            -- meta or {}, tags or []: a null, empty or otherwise false value is the default
            CASE WHEN json_type(meta_j) <> 'OBJECT' AND NOT kimera_json_falsy(meta_j)
                 THEN 'non_object_meta' END,
            CASE WHEN json_type(tags_j) <> 'ARRAY' AND NOT kimera_json_falsy(tags_j)
                 THEN 'non_list_tags' END,
            CASE WHEN raw IS NULL OR raw_s = '' THEN 'empty_raw' END,
            CASE WHEN NOT isfinite(weight) THEN 'non_finite_weight' END,
            -- one text test of meta (meta_hint) rules out almost every row for both
            CASE WHEN CASE WHEN meta_hint THEN kimera_terms_non_finite_exact(terms_j) END
                 THEN 'non_finite_intensity' END,
            CASE WHEN CASE WHEN meta_hint THEN kimera_json_non_finite_exact(meta_j) END
                      OR kimera_json_non_finite(tags_j)
                 THEN 'non_finite_number' END,
            CASE WHEN NOT isfinite(created_at) OR NOT isfinite(updated_at)
                 THEN 'non_finite_timestamp'
                 WHEN NOT kimera_epoch_in_range(created_at) OR NOT kimera_epoch_in_range(updated_at)
                 THEN 'timestamp_out_of_range' END,
            CASE WHEN c_at IS NULL THEN 'missing_timestamps' END
        ], x -> x IS NOT NULL) AS reasons,
        list_filter([
            CASE WHEN weight IS NULL THEN 'null_weight' END,
            -- echo and the gid as the existing system makes them: raw.strip() (str.strip)
            CASE WHEN echo IS DISTINCT FROM raw_s THEN 'echo_differs_from_raw' END,
            CASE WHEN gid <> substr(sha256(coalesce(lang_axis, 'None') || ':'
                                            || coalesce(raw_s, 'None')), 1, 16)
                 THEN 'gid_not_derived_from_text' END,
            CASE WHEN updated_at IS NULL AND created_at IS NOT NULL THEN 'null_updated_at' END,
            CASE WHEN created_at IS NULL AND updated_at IS NOT NULL THEN 'null_created_at' END,
            CASE WHEN updated_at < created_at THEN 'updated_before_created' END,
            CASE WHEN lang_axis IS NULL THEN 'null_lang_axis' END
        ], x -> x IS NOT NULL) AS warnings,
        """
    + _GEOID_DOC
    + """ AS doc
    FROM terms t
), checked_out AS (
    SELECT key, 'geoid' AS identity_type, 'legacy_geoids' AS source_table, src_rowid, reasons,
           warnings, doc, lang_axis, c_at AS created_at, u_at AS updated_at,
           i_id, i_type, i_data, i_created, i_updated, i_lang, i_entropy
    FROM checked
)
"""
    + _PLAN
)

PREPARE_SCARS_SQL = (
    """
CREATE OR REPLACE TEMP TABLE mig_src AS
WITH src AS (
    SELECT s.*, s.rowid AS src_rowid, __DUP_COUNT__ AS dup_count,
           """
    + _S_CREATED
    + """ AS c_at,
           """
    + _S_UPDATED
    + """ AS u_at
    FROM mig_part s
), parsed AS (
    SELECT s.*, __META__ AS meta_j, __RELATED__ AS rel_j, i.*, s.id AS key
    FROM src s LEFT JOIN """
    + _EXISTING
    + """ i ON i.i_id = s.id
), member_ids AS (
    -- related ids that are strings, one row each
    SELECT p.id, unnest(TRY(CAST(json_extract_string(p.rel_j, '$[*]') AS TEXT[]))) AS member
    FROM parsed p
    WHERE json_type(p.rel_j) = 'ARRAY'
), members AS (
    -- where each stands after the geoids; joins keep the partition's few ids on the build side
    SELECT m.id, mi.id IS NOT NULL AS migrated, lg.gid IS NOT NULL AS in_legacy,
           gq.key IS NOT NULL AS quarantined
    FROM member_ids m
    LEFT JOIN (SELECT DISTINCT id FROM identities WHERE identity_type = 'geoid'
               AND id IN (SELECT member FROM member_ids)) mi ON mi.id = m.member
    LEFT JOIN (SELECT DISTINCT gid FROM legacy_geoids
               WHERE gid IN (SELECT member FROM member_ids)) lg ON lg.gid = m.member
    LEFT JOIN (SELECT DISTINCT key FROM kimera_quarantine
               WHERE source_table = 'legacy_geoids' AND cleared_by IS NULL
                 AND key IN (SELECT member FROM member_ids)) gq ON gq.key = m.member
), member_state AS (
    -- a geoid in legacy but not in identities is quarantined (its last judgement refused it)
    -- or pending (not judged since it came: its partition has not run yet)
    SELECT id,
           bool_or(NOT migrated AND NOT in_legacy) AS dangling,
           bool_or(NOT migrated AND in_legacy AND quarantined) AS quarantined_member,
           bool_or(NOT migrated AND in_legacy AND NOT quarantined) AS pending_member
    FROM members GROUP BY id
), e AS (SELECT * FROM (__SCAR_ENTROPY__)), checked AS (
    SELECT p.*,
        list_filter([
            CASE WHEN p.id IS NULL OR kimera_py_blank(p.id) THEN 'null_or_empty_key' END,
            CASE WHEN dup_count > 1 THEN 'duplicate_key' END,
            CASE WHEN p.id IN (SELECT gid FROM legacy_geoids
                               WHERE hash(gid) % $buckets::UBIGINT BETWEEN $bucket::UBIGINT AND $last::UBIGINT)
                 THEN 'key_in_both_tables' END,
            CASE WHEN i_type <> 'scar' THEN 'identity_type_conflict' END,
            CASE WHEN meta IS NOT NULL AND meta_j IS NULL THEN 'invalid_json_meta' END,
            CASE WHEN related_ids IS NOT NULL AND rel_j IS NULL THEN 'invalid_json_related_ids' END,
            CASE WHEN json_type(meta_j) <> 'OBJECT' AND NOT kimera_json_falsy(meta_j)
                 THEN 'non_object_meta' END,
            CASE WHEN rel_j IS NULL OR json_type(rel_j) <> 'ARRAY' THEN 'related_ids_not_list'
                 WHEN json_array_length(rel_j) < 2 THEN 'too_few_related_ids'
                 WHEN len(list_filter(json_extract(rel_j, '$[*]'),
                                      x -> json_type(x) <> 'VARCHAR')) > 0
                      THEN 'related_ids_not_strings'
            END,
            CASE WHEN ms.dangling THEN 'dangling_related_id' END,
            CASE WHEN ms.quarantined_member THEN 'related_geoid_quarantined' END,
            CASE WHEN ms.pending_member THEN 'related_geoid_pending' END,
            CASE WHEN NOT isfinite(weight) THEN 'non_finite_weight' END,
            CASE WHEN kimera_json_non_finite(meta_j) OR kimera_json_non_finite(rel_j)
                 THEN 'non_finite_number' END,
            CASE WHEN NOT isfinite(p.created_at) OR NOT isfinite(p.updated_at)
                 THEN 'non_finite_timestamp'
                 WHEN NOT kimera_epoch_in_range(p.created_at)
                      OR NOT kimera_epoch_in_range(p.updated_at)
                 THEN 'timestamp_out_of_range' END,
            CASE WHEN c_at IS NULL THEN 'missing_timestamps' END
        ], x -> x IS NOT NULL) AS reasons,
        list_filter([
            CASE WHEN weight IS NULL THEN 'null_weight' END,
            CASE WHEN p.updated_at IS NULL AND p.created_at IS NOT NULL THEN 'null_updated_at' END,
            CASE WHEN p.created_at IS NULL AND p.updated_at IS NOT NULL THEN 'null_created_at' END,
            CASE WHEN p.updated_at < p.created_at THEN 'updated_before_created' END
        ], x -> x IS NOT NULL) AS warnings,
        """
    + _SCAR_DOC
    + """ AS doc
    FROM parsed p LEFT JOIN member_state ms ON ms.id = p.id
), checked_out AS (
    SELECT key, 'scar' AS identity_type, 'legacy_scars' AS source_table, src_rowid, reasons,
           warnings, doc, NULL::TEXT AS lang_axis, c_at AS created_at, u_at AS updated_at,
           i_id, i_type, i_data, i_created, i_updated, i_lang, i_entropy
    FROM checked
)
"""
    + _PLAN
)

# The partition's legacy rows (buckets $bucket..$last), copied once: a plain filtered scan is
# pushed into the table scan, inside the prepare statement it is not (the whole table would
# be read per partition).
# src_rowid is this copy's rowid. {table} and {key} are fixed names (legacy_geoids/gid,
# legacy_scars/id; a rerun's mig_todo_geoid/mig_todo_scar, migration.fingerprints).
# {segments}: empty, or SEGMENT_ROWS_FILTER for a served rerun, which reads only the rows of
# the segments it judges again (migration.fingerprints' mig_rejudge) in the partition's own
# transaction, so an application's write since the rerun's plan is judged as it now stands.
PARTITION_ROWS_SQL = """
CREATE OR REPLACE TEMP TABLE mig_part AS
SELECT * FROM {table} WHERE hash({key}) % $buckets::UBIGINT BETWEEN $bucket::UBIGINT AND $last::UBIGINT
{segments}"""
SEGMENT_ROWS_FILTER = "  AND hash({key}) % $segments::UBIGINT IN (SELECT segment FROM mig_rejudge)"

# Every timestamp of the partition: those the ISO macros cannot write exactly are formatted
# in Python (kimera_core.sql.epoch_iso_fixes); the document's are among them (c_at, u_at).
PARTITION_EPOCHS_SQL = "SELECT created_at FROM mig_part UNION ALL SELECT updated_at FROM mig_part"

# The original row is serialised only for the rows quarantined (found again by rowid).
QUARANTINE_SQL = """
INSERT INTO kimera_quarantine (run_id, source_table, key, reason, reasons, original, row_hash,
                               quarantined_at)
SELECT $run_id, m.source_table, m.key, m.reasons[1], to_json(m.reasons), to_json(t),
       hash(to_json(t)), $now
FROM mig_src m JOIN mig_part t ON t.rowid = m.src_rowid
WHERE len(m.reasons) > 0
ON CONFLICT DO NOTHING
"""

# Every key this partition judged supersedes its earlier quarantine rows (of other runs): they
# are cleared by this run, whatever it decided now. A quarantine row is current while
# cleared_by is NULL; a rollback of the clearing run makes it current again.
CLEAR_SUPERSEDED_SQL = """
UPDATE kimera_quarantine SET cleared_by = $run_id
WHERE cleared_by IS NULL AND run_id <> $run_id AND source_table = $source_table
  AND key IN (SELECT key FROM mig_src WHERE key IS NOT NULL)
"""

# --- scars that wait for their geoids --------------------------------------------------------
# A scar whose related geoid is in legacy_geoids but not yet judged (its partition has not
# run: related_geoid_pending) waits; one whose geoid was refused (related_geoid_quarantined)
# waits for the geoid's repair. A run of selected buckets judges these scars again after its
# geoids, whatever their own bucket: they are the waiting scars of WAITING_SCARS.
REJUDGED_REASONS: tuple[str, ...] = ("related_geoid_pending", "related_geoid_quarantined")
# Cleared only by later migration work, no repair needed: the gates hold while one is current.
WAITING_REASONS: tuple[str, ...] = ("related_geoid_pending",)
WAITING_SCARS = f"""
SELECT key FROM kimera_quarantine
WHERE source_table = 'legacy_scars' AND cleared_by IS NULL AND key IS NOT NULL
  AND list_has_any(CAST(reasons AS TEXT[]), {list(REJUDGED_REASONS)!r})
"""
WAITING_BUCKETS_SQL = f"""
SELECT DISTINCT (hash(key) % $buckets::UBIGINT)::INTEGER AS bucket FROM ({WAITING_SCARS})
WHERE NOT list_contains($selected, (hash(key) % $buckets::UBIGINT)::INTEGER)
ORDER BY bucket
"""
WAITING_ROWS_SQL = f"""
CREATE OR REPLACE TEMP TABLE mig_part AS
SELECT * FROM legacy_scars
WHERE hash(id) % $buckets::UBIGINT = $bucket::UBIGINT AND id IN ({WAITING_SCARS})
"""

WARNINGS_SQL = """
INSERT INTO kimera_migration_warnings
SELECT $run_id, source_table, key, to_json(warnings)
FROM mig_src WHERE len(reasons) = 0 AND len(warnings) > 0 AND key IS NOT NULL
ON CONFLICT DO NOTHING
"""

# Before-images for rollback; after_hash is the hash of the row as written.
JOURNAL_SQL = """
INSERT INTO kimera_migration_changes
SELECT $run_id, key, action, i_type, i_data, i_created, i_updated, i_lang, i_entropy,
       new_hash
FROM mig_src WHERE action IN ('insert', 'update')
"""

APPLY_INSERT_SQL = """
INSERT INTO identities (id, identity_type, data, created_at, updated_at, lang_axis, entropy_score)
SELECT key, identity_type, doc, created_at, updated_at, lang_axis, entropy
FROM mig_src WHERE action = 'insert'
"""

APPLY_UPDATE_SQL = """
UPDATE identities SET
    identity_type = p.identity_type, data = p.doc, created_at = p.created_at,
    updated_at = p.updated_at, lang_axis = p.lang_axis, entropy_score = p.entropy
FROM mig_src p
WHERE identities.id = p.key AND p.action = 'update'
"""

# Per bucket of the partition: its counts (read, inserted, updated, unchanged, kept,
# quarantined) and the checksum of the identities rows its legacy keys map to, after it ran.
# A bucket without a row has no line.
PARTITION_BUCKETS_SQL = """
SELECT hash(key) % $buckets::UBIGINT AS bucket,
       count(*),
       count(*) FILTER (WHERE action = 'insert'),
       count(*) FILTER (WHERE action = 'update'),
       count(*) FILTER (WHERE action = 'unchanged'),
       count(*) FILTER (WHERE action = 'kept'),
       count(*) FILTER (WHERE len(reasons) > 0),
       count(*) FILTER (WHERE action IS NOT NULL),
       coalesce(sum((CASE WHEN action IN ('insert', 'update') THEN new_hash ELSE old_hash END)
                     ::HUGEINT) FILTER (WHERE action IS NOT NULL), 0)
FROM mig_src GROUP BY ALL
"""


RECORD_PARTITION_SQL = """
INSERT INTO kimera_migration_partitions (run_id, kind, bucket, finished_at, read, inserted,
    updated, unchanged, kept, quarantined, identities_rows, identities_checksum)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# --- a run ------------------------------------------------------------------------------
START_RUN_SQL = """
INSERT INTO kimera_migration_runs (run_id, started_at, status, partitions, duckdb_version)
VALUES (?, ?, 'running', ?, ?)
"""

FINISH_RUN_SQL = """
UPDATE kimera_migration_runs SET finished_at = ?, status = ?, counts = ?, identities_rows = ?,
    identities_checksum = ?
WHERE run_id = ?
"""

UNFINISHED_RUN_SQL = """
SELECT run_id, partitions, duckdb_version FROM kimera_migration_runs
WHERE status = 'running' ORDER BY started_at DESC LIMIT 1
"""

DONE_PARTITIONS_SQL = """
SELECT kind, bucket, read, inserted, updated, unchanged, kept, quarantined
FROM kimera_migration_partitions WHERE run_id = ?
"""

# Catalog functions list attached databases too: only this connection's own main schema.
HAS_PRIMARY_KEY_SQL = """
SELECT count(*) > 0 FROM duckdb_constraints()
WHERE database_name = current_database() AND schema_name = 'main' AND table_name = ?
  AND constraint_type = 'PRIMARY KEY'
"""

JSON_COLUMNS_SQL = """
SELECT column_name FROM information_schema.columns
WHERE table_catalog = current_database() AND table_schema = 'main' AND table_name = ?
  AND data_type = 'JSON'
"""

# (legacy geoids, legacy scars): the partition count follows the larger, and a served run
# groups the smaller table's buckets (migration.engine)
TABLE_ROWS_SQL = "SELECT (SELECT count(*) FROM legacy_geoids), (SELECT count(*) FROM legacy_scars)"

LEGACY_ROWS_SQL = (
    "SELECT (SELECT count(*) FROM legacy_geoids) + (SELECT count(*) FROM legacy_scars)"
)

SELECTED_LEGACY_ROWS_SQL = """
SELECT (SELECT count(*) FROM legacy_geoids WHERE list_contains($b, hash(gid) % $n::UBIGINT))
     + (SELECT count(*) FROM legacy_scars WHERE list_contains($b, hash(id) % $n::UBIGINT))
"""

# A dry run's quarantine reasons come from mig_src itself (nothing is recorded).
DRY_RUN_REASONS_SQL = """
SELECT source_table || ':' || reasons[1], count(*) FROM mig_src
WHERE len(reasons) > 0 GROUP BY ALL
"""
