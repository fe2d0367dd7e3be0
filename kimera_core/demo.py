"""A realistic, deterministic legacy Kimera database, generated set-based in DuckDB.

Every random choice is ``hash(row, seed, salt)`` (DuckDB's hash), so the same seed and
DuckDB version give the same database, and a million geoids take seconds. A small share
of rows is broken the way production data breaks, so migration has something to
quarantine; ``DemoReport.broken`` counts them by kind.

A share of the rows is also written to ``identities`` as P1's dual-write path writes them:
the JSON document with ISO-8601 timestamps by ``kimera_core.sql``'s one formula (the same
text as ``identity.epoch_to_iso``), the entropy score.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from kimera_core.db import checkpoint, open_database, transaction
from kimera_core.entropy import geoid_entropy_sql, scar_entropy_sql
from kimera_core.errors import KimeraError
from kimera_core.legacy import create_legacy_schema, missing_tables, table_counts
from kimera_core.sql import (
    epoch_iso_fixes,
    epoch_iso_sql,
    install_epoch_iso_macros,
    p1_document_sql,
    p1_scar_document_sql,
)

DEFAULT_END_TIME = 1793491200.0  # 2026-11-01T00:00:00Z: the newest timestamp in demo data
SPAN_SECONDS = 90 * 24 * 3600
# created_at/updated_at are rounded to this many decimals (6: whole microseconds)
DEFAULT_TIMESTAMP_DECIMALS = 6

# r(i, salt): a uniform number in [0, 1) from the row number, the seed and a salt.
_R = "((hash({i}, $seed, '{salt}') % 1000003) / 1000003.0)"


def _r(i: str, salt: str) -> str:
    return _R.format(i=i, salt=salt)


LANGS_SQL = """
CREATE TEMP TABLE demo_lang AS
SELECT * FROM (VALUES
  (0, 'en', 0.40,
   ['The river', 'A memory', 'Every contradiction', 'The old library', 'This signal', 'Our hypothesis'],
   ['remembers', 'reshapes', 'questions', 'echoes', 'resists', 'explains'],
   ['the morning light', 'a forgotten promise', 'its own reflection', 'the quiet city', 'every rule', 'the naïve model']),
  (1, 'fr', 0.20,
   ['La rivière', 'Un souvenir', 'Chaque contradiction', 'La vieille bibliothèque', 'Ce signal', 'Notre hypothèse'],
   ['se souvient de', 'façonne', 'interroge', 'fait écho à', 'résiste à', 'éclaire'],
   ['la lumière du matin', 'une promesse oubliée', 'son propre reflet', 'la ville tranquille', 'chaque règle', 'l''été à Noël']),
  (2, 'ar', 0.15,
   ['النهر', 'ذكرى', 'كل تناقض', 'المكتبة القديمة', 'هذه الإشارة', 'فرضيتنا'],
   ['يتذكر', 'يعيد تشكيل', 'يتساءل عن', 'يردد', 'يقاوم', 'يفسر'],
   ['ضوء الصباح', 'وعدا منسيا', 'انعكاسه', 'المدينة الهادئة', 'كل قاعدة', 'النموذج الساذج']),
  (3, 'es', 0.10,
   ['El río', 'Un recuerdo', 'Cada contradicción', 'La biblioteca antigua', 'Esta señal', 'Nuestra hipótesis'],
   ['recuerda', 'reconfigura', 'cuestiona', 'hace eco de', 'resiste', 'explica'],
   ['la luz de la mañana', 'una promesa olvidada', 'su propio reflejo', 'la ciudad tranquila', 'cada regla', 'el niño pequeño']),
  (4, 'de', 0.08,
   ['Der Fluss', 'Eine Erinnerung', 'Jeder Widerspruch', 'Die alte Bibliothek', 'Dieses Signal', 'Unsere Hypothese'],
   ['erinnert an', 'formt', 'hinterfragt', 'spiegelt', 'widersteht', 'erklärt'],
   ['das Morgenlicht', 'ein vergessenes Versprechen', 'sein eigenes Spiegelbild', 'die ruhige Straße', 'jede Regel', 'die Größe der Welt']),
  (5, 'ja', 0.07,
   ['川は', '記憶は', 'すべての矛盾は', '古い図書館は', 'この信号は', '私たちの仮説は'],
   ['思い出す', '形を変える', '問いかける', '響き合う', '抵抗する', '説明する'],
   ['朝の光を', '忘れられた約束を', '自らの影を', '静かな街を', 'すべての規則を', '素朴なモデルを'])
) AS t(lang_no, lang, share, subjects, verbs, objects)
"""

# Geoids, before breakage: one row per i in range(n).
GEOIDS_SQL = f"""
CREATE TEMP TABLE demo_geoid_base AS
WITH base AS (
    SELECT i,
           {_r("i", "lang")} AS r_lang,
           {_r("i", "created")} AS r_created,
           {_r("i", "updated")} AS r_updated,
           {_r("i", "emoji")} AS r_emoji,
           {_r("i", "pad")} AS r_pad,
           {_r("i", "terms")} AS r_terms,
           {_r("i", "broken")} AS r_broken,
           {_r("i", "kind")} AS r_kind,
           hash(i, $seed, 'words') AS h_words,
           hash(i, $seed, 'tags') AS h_tags
    FROM range($n) AS t(i)
), with_lang AS (
    SELECT b.*,
           CASE WHEN r_lang < 0.40 THEN 0 WHEN r_lang < 0.60 THEN 1 WHEN r_lang < 0.75 THEN 2
                WHEN r_lang < 0.85 THEN 3 WHEN r_lang < 0.93 THEN 4 ELSE 5 END AS lang_no,
           round($end_time - r_created * {SPAN_SECONDS}, $decimals) AS created_at
    FROM base b
), texts AS (
    SELECT w.*, l.lang,
           l.subjects[1 + (h_words % 6)::INTEGER] || ' ' || l.verbs[1 + ((h_words // 6) % 6)::INTEGER]
             || ' ' || l.objects[1 + ((h_words // 36) % 6)::INTEGER]
             || CASE WHEN r_emoji < 0.12
                     THEN ' ' || ['🌊', '🧠', '⚡', '📚', '🌙', '🔥'][1 + ((h_words // 216) % 6)::INTEGER]
                     ELSE '' END
             || ' · ' || i::VARCHAR AS text
    FROM with_lang w JOIN demo_lang l USING (lang_no)
)
SELECT i, lang, r_broken, r_kind,
       CASE WHEN r_pad < 0.03 THEN '  ' || text || ' ' ELSE text END AS raw,
       text AS echo,
       substr(sha256(lang || ':' || text), 1, 16) AS gid,
       list_distinct(list_transform(range((h_tags % 5)::INTEGER),
           j -> ['physics', 'memory', 'ethics', 'language', 'contradiction', 'art', 'history',
                 'biology', 'music', 'dream'][1 + (hash(i, $seed, 'tag', j) % 10)::INTEGER])) AS tag_list,
       round(0.1 + 0.9 * {_r("i", "weight")}, 4) AS weight,
       CASE WHEN r_terms < 0.85 THEN
           to_json({{'terms': list_transform(range((hash(i, $seed, 'nterms') % 7)::INTEGER), j -> {{
               'symbol': ['kairos', 'echo', 'seed', 'drift', 'anchor', 'vortex', 'lumen', 'ἀλήθεια'][1 + (hash(i, $seed, 'sym', j) % 8)::INTEGER],
               'role': ['subject', 'object', 'relation', 'context'][1 + (hash(i, $seed, 'role', j) % 4)::INTEGER],
               'intensity': CASE WHEN hash(i, $seed, 'zero', j) % 40 = 0 THEN 0.0
                                 WHEN hash(i, $seed, 'zero', j) % 97 = 1 THEN -0.5
                                 ELSE round(exp(((hash(i, $seed, 'int', j) % 1000) / 1000.0) * 4 - 2), 4) END,
               'timestamp': round(created_at + (hash(i, $seed, 'ts', j) % 86400), 6)
           }}), 'source': 'ingest'}})
       ELSE to_json({{'source': ['import', 'user', 'lattice'][1 + (h_words % 3)::INTEGER],
                      'confidence': round({_r("i", "conf")}, 3)}})
       END AS meta_json,
       created_at,
       CASE WHEN r_updated < 0.5 THEN created_at
            ELSE round(created_at + r_updated * ($end_time - created_at), $decimals) END AS updated_at
FROM texts
"""

# Broken geoids: the share $broken of rows, split evenly over five kinds.
GEOID_KINDS = ("malformed_meta", "non_object_meta", "empty_raw", "null_weight", "nan_intensity")

INSERT_GEOIDS_SQL = """
INSERT INTO legacy_geoids (gid, raw, echo, lang_axis, tags, weight, meta, created_at, updated_at)
SELECT gid,
       CASE WHEN kind = 'empty_raw' THEN '' ELSE raw END,
       CASE WHEN kind = 'empty_raw' THEN '' ELSE echo END,
       lang,
       to_json(tag_list),
       CASE WHEN kind = 'null_weight' THEN NULL ELSE weight END,
       CASE kind
            WHEN 'malformed_meta' THEN to_json(substr(meta_json, 1, 23))
            WHEN 'non_object_meta' THEN '["terms", 1, 2]'
            WHEN 'nan_intensity' THEN
                '{"terms": [{"symbol": "drift", "role": "subject", "intensity": NaN}, '
                || '{"symbol": "echo", "role": "object", "intensity": 0.5}]}'
            ELSE meta_json END::JSON,
       created_at, updated_at
FROM demo_geoids
"""

SCARS_SQL = f"""
CREATE TEMP TABLE demo_scar_members AS
WITH base AS (
    SELECT j,
           (({_r("j", "scar_a")}) * $n)::BIGINT % $n AS a,
           {_r("j", "scar_size")} AS r_size
    FROM range($m) AS t(j)
), members AS (
    SELECT j, a,
           unnest(range(CASE WHEN r_size < 0.90 THEN 2 WHEN r_size < 0.97 THEN 3 ELSE 4 END)) AS pos
    FROM base
)
SELECT j, pos,
       CASE WHEN pos = 0 THEN a
            ELSE (a + 1 + (hash(j, $seed, 'member', pos) % ($n - 1))) % $n END AS geo_i
FROM members
"""

SCAR_ROWS_SQL = f"""
CREATE TEMP TABLE demo_scars AS
WITH members AS (
    SELECT m.j, list(g.gid ORDER BY m.pos) AS gids
    FROM demo_scar_members m JOIN demo_geoid_ids g ON g.i = m.geo_i
    GROUP BY m.j
), base AS (
    SELECT j, gids,
           'scar_' || substr(sha256('scar:' || $seed::VARCHAR || ':' || j::VARCHAR), 1, 16) AS id,
           {_r("j", "broken")} AS r_broken,
           {_r("j", "kind")} AS r_kind,
           round($end_time - {_r("j", "created")} * {SPAN_SECONDS}, $decimals) AS created_at,
           round(0.05 + 0.95 * {_r("j", "weight")}, 4) AS weight,
           ['contradicts', 'supports', 'refines', 'echoes', 'resolves'][1 + (hash(j, $seed, 'rel') % 5)::INTEGER] AS rel
    FROM members
)
SELECT b.*, c.gid AS colliding_gid,
       CASE WHEN r_broken >= $broken THEN NULL
            -- a colliding id must be unique: take geoid number j, which exists only when j < n
            WHEN floor(r_kind * 5) = 3 AND j >= $n THEN 'null_weight'
            ELSE ['dangling_related_id', 'single_related_id', 'null_weight',
                  'id_collides_with_geoid', 'non_list_related_ids'][1 + floor(r_kind * 5)::INTEGER]
       END AS kind
FROM base b LEFT JOIN demo_geoid_ids c ON c.i = b.j
"""

SCAR_KINDS = (
    "dangling_related_id",
    "single_related_id",
    "null_weight",
    "id_collides_with_geoid",
    "non_list_related_ids",
)

INSERT_SCARS_SQL = """
INSERT INTO legacy_scars (id, weight, related_ids, meta, created_at, updated_at)
SELECT CASE WHEN kind = 'id_collides_with_geoid' THEN colliding_gid ELSE id END,
       CASE WHEN kind = 'null_weight' THEN NULL ELSE weight END,
       CASE kind
            WHEN 'dangling_related_id' THEN to_json([gids[1], substr(sha256('ghost:' || id), 1, 16)])
            WHEN 'single_related_id' THEN to_json([gids[1]])
            WHEN 'non_list_related_ids' THEN to_json(array_to_string(gids, ','))
            ELSE to_json(gids) END,
       to_json({'relationship_type': rel, 'confidence': weight}),
       created_at,
       created_at + (hash(j, $seed, 'upd') % 3600)
FROM demo_scars
"""

ECHOFORMS_SQL = """
INSERT INTO echoforms (anchor, blob, created_at, updated_at, domain, phase, intensity_sum)
WITH pairs AS (
    SELECT s.j, s.gids[1] AS a, s.gids[2] AS b, s.created_at,
           0.1 * (1 + (ea.entropy + eb.entropy) / 2) AS cls_intensity,
           ['physics', 'ethics', 'language', 'memory'][1 + (hash(s.j, $seed, 'dom') % 4)::INTEGER] AS domain
    FROM demo_scars s
    JOIN demo_entropy ea ON ea.key = s.gids[1]
    JOIN demo_entropy eb ON eb.key = s.gids[2]
    WHERE s.kind IS NULL AND len(s.gids) = 2
    -- the anchor is the echoform's key: two scars can link the same pair (few geoids)
    QUALIFY row_number() OVER (PARTITION BY s.gids[1], s.gids[2] ORDER BY s.j) = 1
    ORDER BY s.j
    LIMIT $echoforms
)
SELECT a || '_' || b,
       to_json({'anchor': a || '_' || b, 'domain': domain, 'phase': 'resolved',
                'terms': [{'symbol': 'CLS', 'role': 'seed', 'intensity': 1.0},
                          {'symbol': 'cls_event', 'role': 'event', 'intensity': cls_intensity}],
                'topology': {'nodes': [a, b], 'edges': 1},
                'trace_signature': substr(sha256(a || b), 1, 32)}),
       created_at, created_at, domain, 'resolved', 1.0 + cls_intensity
FROM pairs
"""

# A share of the data was already written by P1's dual-write path into identities, as P1
# writes it: the JSON document, timestamps as ISO-8601, the entropy score.
_IDENTITIES_SQL = """
INSERT INTO identities (id, identity_type, data, created_at, updated_at, lang_axis, entropy_score)
SELECT g.gid, 'geoid',
       __G_DOC__,
       g.created_at, g.updated_at, g.lang_axis, e.entropy
FROM legacy_geoids g JOIN demo_geoids d USING (gid) JOIN demo_entropy e ON e.key = g.gid
WHERE d.kind IS NULL AND __DUAL_I__ < $dual
UNION ALL
SELECT s.id, 'scar',
       __S_DOC__,
       s.created_at, s.updated_at, NULL, se.entropy
FROM legacy_scars s JOIN demo_scars d ON d.id = s.id JOIN (__SCAR_ENTROPY__) se ON se.key = s.id
WHERE d.kind IS NULL AND __DUAL_J__ < $dual
"""

# Every legacy timestamp: those the ISO macros cannot write exactly are formatted in Python.
LEGACY_EPOCHS_SQL = """
SELECT created_at FROM legacy_geoids UNION ALL SELECT updated_at FROM legacy_geoids
UNION ALL SELECT created_at FROM legacy_scars UNION ALL SELECT updated_at FROM legacy_scars
"""


def identities_sql(iso_fixes: bool) -> str:
    """The dual-written identities' INSERT; ``iso_fixes``: kimera_core.sql's fixes view exists."""
    tokens = {
        "__G_DOC__": p1_document_sql(
            id="g.gid",
            identity_type="'geoid'",
            raw="g.raw",
            echo="g.echo",
            lang_axis="g.lang_axis",
            tags="g.tags",
            weight="g.weight",
            related_ids="'[]'::JSON",
            meta="g.meta",
            created_at=epoch_iso_sql("g.created_at", fixes=iso_fixes),
            updated_at=epoch_iso_sql("g.updated_at", fixes=iso_fixes),
        ),
        "__S_DOC__": p1_scar_document_sql(
            id="s.id",
            weight="s.weight",
            related_ids="s.related_ids",
            meta="s.meta",
            created_at=epoch_iso_sql("s.created_at", fixes=iso_fixes),
            updated_at=epoch_iso_sql("s.updated_at", fixes=iso_fixes),
        ),
        "__DUAL_I__": _r("d.i", "dual"),
        "__DUAL_J__": _r("d.j", "dual"),
        "__SCAR_ENTROPY__": scar_entropy_sql("legacy_scars", "id"),
    }
    sql = _IDENTITIES_SQL
    for token, fragment in tokens.items():
        sql = sql.replace(token, fragment)
    return sql


DUAL_WRITE_LOG_SQL = f"""
INSERT INTO dual_write_log (timestamp, identity_id, operation, status, details)
SELECT updated_at, id, 'store',
       CASE WHEN {_r("hash(id)", "fail")} < 0.002 THEN 'failed' ELSE 'success' END,
       CASE WHEN {_r("hash(id)", "fail")} < 0.002
            THEN to_json({{'identity_type': identity_type, 'error': 'legacy write timed out'}})
            ELSE to_json({{'identity_type': identity_type, 'stores': ['identities', 'legacy']}}) END
FROM identities
ORDER BY updated_at, id
"""


@dataclass
class DemoReport:
    """What demo-data wrote."""

    path: str
    counts: dict[str, int]
    broken: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def generate_demo_data(
    path: str | os.PathLike[str],
    *,
    geoids: int = 10_000,
    scars: int = 5_000,
    seed: int = 42,
    broken_share: float = 0.005,
    dual_written_share: float = 0.05,
    echoforms: int = 20,
    end_time: float = DEFAULT_END_TIME,
    timestamp_decimals: int = DEFAULT_TIMESTAMP_DECIMALS,
    replace: bool = False,
) -> DemoReport:
    """Write a legacy Kimera database at ``path`` (refuses to touch an existing one unless replace).

    Timestamps are epoch seconds in the ``SPAN_SECONDS`` before ``end_time``, rounded to
    ``timestamp_decimals`` (0-9) decimals. Raises KimeraError for invalid sizes or shares
    (before any file is made) and for an existing ``path`` without ``replace``; on any
    failure the new file is removed.
    """
    if geoids < 2:
        raise KimeraError("--geoids must be at least 2 (scars link two geoids)")
    if scars < 0:
        raise KimeraError("--scars must not be negative")
    if not 0 <= broken_share <= 1 or not 0 <= dual_written_share <= 1:
        raise KimeraError("shares must lie between 0 and 1")
    if not 0 <= timestamp_decimals <= 9:
        raise KimeraError("timestamp decimals must lie between 0 and 9")
    path = Path(path)
    if path.exists():
        if not replace:
            raise KimeraError(f"{path}: already exists; pass --replace to overwrite it")
        # open first so a file that is not ours is refused rather than deleted
        open_database(path, read_only=True).close()
        path.unlink()
        Path(f"{path}.wal").unlink(missing_ok=True)
    started = time.perf_counter()
    params = {
        "n": geoids,
        "m": scars,
        "seed": seed,
        "end_time": end_time,
        "decimals": timestamp_decimals,
        "broken": broken_share,
        "dual": dual_written_share,
        "echoforms": echoforms,
    }
    con = open_database(path, create=True)
    try:
        with transaction(con):
            broken = _generate(con, params)
        checkpoint(con)
        counts = table_counts(con)
        assert not missing_tables(con)
    except BaseException:
        con.close()
        path.unlink(missing_ok=True)
        Path(f"{path}.wal").unlink(missing_ok=True)
        raise
    con.close()
    return DemoReport(str(path), counts, broken, time.perf_counter() - started)


def _generate(con: duckdb.DuckDBPyConnection, params: dict[str, Any]) -> dict[str, int]:
    """Fill the legacy tables, identities and the log (caller owns the transaction).

    Returns the broken rows by ``table.kind``.
    """

    def run(sql: str) -> None:
        con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql})

    create_legacy_schema(con)
    install_epoch_iso_macros(con)
    run(LANGS_SQL)
    run(GEOIDS_SQL)
    kinds = ", ".join(f"'{k}'" for k in GEOID_KINDS)
    run(
        "CREATE TEMP TABLE demo_geoids AS SELECT b.*, "
        "CASE WHEN r_broken < $broken THEN "
        f"[{kinds}][1 + floor(r_kind * {len(GEOID_KINDS)})::INTEGER] END AS kind "
        "FROM demo_geoid_base b"
    )
    run(INSERT_GEOIDS_SQL)
    con.execute("CREATE TEMP TABLE demo_geoid_ids AS SELECT i, gid FROM demo_geoids")
    con.execute("CREATE TEMP TABLE demo_entropy AS " + geoid_entropy_sql("legacy_geoids", "gid"))
    if params["m"]:
        run(SCARS_SQL)
        run(SCAR_ROWS_SQL)
        run(INSERT_SCARS_SQL)
        run(ECHOFORMS_SQL)
    else:
        con.execute(
            "CREATE TEMP TABLE demo_scars AS SELECT 0 AS j, ''::VARCHAR AS id, "
            "NULL::VARCHAR AS kind WHERE false"
        )
    with epoch_iso_fixes(con, LEGACY_EPOCHS_SQL) as fixes:
        run(identities_sql(fixes))
    run(DUAL_WRITE_LOG_SQL)
    broken: dict[str, int] = {}
    for table in ("demo_geoids", "demo_scars"):
        prefix = "geoid" if table == "demo_geoids" else "scar"
        # table names are the two fixed temp tables above
        for kind, count in con.execute(
            f"SELECT kind, count(*) FROM {table} WHERE kind IS NOT NULL GROUP BY kind ORDER BY kind"
        ).fetchall():
            broken[f"{prefix}.{kind}"] = count
    return broken
