"""Query functions: identities by id, by entropy range, by text and by relation, paginated.

Reads go to the store the rollout stage names (``kimera_core.rollout``): ``identities``
from ``read-new`` on, the legacy tables before. Every statement is a named constant with
bound parameters; nothing of a caller's text becomes SQL.

Pagination is bounded: ``limit`` is at most ``MAX_LIMIT``. Entropy and relation queries page
by keyset (an opaque ``cursor`` naming the last row seen), so a deep page costs what the
first does; text search pages by ``offset`` (at most ``MAX_OFFSET``), since BM25 scores are
recomputed per query anyway.

In the legacy stages entropy is computed from ``meta`` / ``tags`` / ``related_ids`` by the
same set-based SQL the migration uses (``kimera_core.entropy``). Through SQL that is a full
scan per query. A read-only database (``kimera serve``) cannot change, so its
``ReadSnapshot`` computes that scan once, at load, into an in-memory order (``EntropyOrder``)
of whichever store the stage reads: a page is then a binary search, and in the legacy stages
it holds the legacy rows with their own entropy, exactly what the scan returns, whatever
``identities`` holds (a twin missing or divergent changes nothing). ``identities`` is not
used as an index of legacy: in the stages that read legacy, legacy is authoritative and its
answers must not depend on the store being checked against it. An identity whose entropy is
unknown (a scar whose weight is not a finite number) is never in an entropy range.

Every parameter is checked before any SQL runs and refused with ``QueryError`` (the API's
400 ``bad_request``): a text holding a lone surrogate (UTF-8 cannot encode it), a number
that is not finite, a cursor this module did not make (not base64 JSON of the right shape,
or holding such a text or number: NaN, Infinity, 1e999, integers beyond the double range).
The legacy tables are read as identities by ``kimera_core.legacy`` (the read ``storage``
serves too).

The search indexes follow the store the stage reads: ``ensure_text_index`` builds the BM25
index when it is missing or stale (looking read-only first, so a current index needs no
write access), ``embed_read_store`` embeds geoids without a vector; ``kimera search-index``
and ``kimera serve`` call them.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kimera_core import semantic, textsearch
from kimera_core.db import connect
from kimera_core.entropy import identity_entropy
from kimera_core.identity import IDENTITY_TYPES, Identity, has_lone_surrogate
from kimera_core.legacy import (
    GEOID_COLUMNS,
    LEGACY_IDENTITIES_ENTROPY_SQL,
    LEGACY_IDENTITY_FIELDS,
    SCAR_COLUMNS,
    fetch_legacy_identity,
    geoid_from_row,
    identity_from_legacy_row,
    scar_from_row,
)
from kimera_core.rollout import get_stage, routing

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_OFFSET = 10_000
MAX_QUERY_CHARS = 256


class QueryError(ValueError):
    """A query's parameters are out of bounds or malformed (the caller's mistake)."""


@dataclass(frozen=True)
class Hit:
    """One identity in a result, with its entropy (bits; None if unknown) and text score."""

    identity: Identity
    entropy: float | None
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = self.identity.to_document()
        doc["entropy"] = self.entropy
        if self.score is not None:
            doc["score"] = self.score
        return doc


@dataclass(frozen=True)
class Page:
    """A page of hits, the store it was read from and the cursor of the next page (or None)."""

    items: list[Hit]
    source: str
    next_cursor: str | None = None
    next_offset: int | None = None
    paging: str = "cursor"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "items": [h.to_dict() for h in self.items],
            "count": len(self.items),
            "source": self.source,
        }
        if self.paging == "cursor":
            out["next_cursor"] = self.next_cursor
        elif self.paging == "offset":
            out["next_offset"] = self.next_offset
        out.update(self.extra)
        return out


def read_source(con: duckdb.DuckDBPyConnection) -> str:
    """'new' when the live rollout stage reads from identities, else 'legacy'."""
    return "new" if routing(get_stage(con)).read == "new" else "legacy"


# --- cursors ----------------------------------------------------------------------------
def encode_cursor(values: list[Any]) -> str:
    text = json.dumps(values, separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


NOT_A_CURSOR = "cursor is not one this API returned"
NON_FINITE_CURSOR = f"{NOT_A_CURSOR}: it holds a number that is not finite"


class _NonFinite(ValueError):
    """NaN, Infinity or -Infinity in a cursor's JSON (not JSON numbers)."""


def _no_constant(name: str) -> None:
    raise _NonFinite(name)


def decode_cursor(cursor: str, shape: tuple[type, ...]) -> list[Any]:
    """The values of a cursor made by ``encode_cursor`` (floats as float), in ``shape``.

    Raises QueryError if it is not one: not base64 JSON of a list of that shape, or holding
    a number that is not finite (NaN, Infinity, 1e999, an integer beyond the double range)
    or a text with a lone surrogate.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw.decode(), parse_constant=_no_constant)
    except _NonFinite:
        raise QueryError(NON_FINITE_CURSOR) from None
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise QueryError(NOT_A_CURSOR) from None
    if not isinstance(values, list) or len(values) != len(shape):
        raise QueryError(NOT_A_CURSOR)
    decoded: list[Any] = []
    for value, kind in zip(values, shape, strict=True):
        if isinstance(value, bool) or not isinstance(value, int | float if kind is float else kind):
            raise QueryError(NOT_A_CURSOR)
        if kind is float:
            try:
                value = float(value)
            except OverflowError:
                value = math.inf
            if not math.isfinite(value):
                raise QueryError(NON_FINITE_CURSOR)
        if isinstance(value, str):
            _check_unicode("cursor", value)
        decoded.append(value)
    return decoded


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return limit


def _check_number(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise QueryError(f"{name} must be a finite number")
    return float(value)


def _check_unicode(name: str, text: str | None) -> str | None:
    """``text`` unless it holds a lone surrogate (QueryError): no text then reaches SQL."""
    if text is not None and has_lone_surrogate(text):
        raise QueryError(f"{name} holds a lone surrogate (U+D800-U+DFFF), which is not text")
    return text


def _check_text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise QueryError("q must be a non-empty text")
    _check_unicode("q", text)
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"q must be at most {MAX_QUERY_CHARS} characters")
    return text


def _check_type(identity_type: str | None) -> str | None:
    if identity_type is not None and identity_type not in IDENTITY_TYPES:
        raise QueryError(f"identity_type must be one of {', '.join(IDENTITY_TYPES)}")
    return identity_type


# --- SQL --------------------------------------------------------------------------------

_ENTROPY_FILTER = """
    entropy IS NOT NULL
    AND ($min IS NULL OR entropy >= $min) AND ($max IS NULL OR entropy <= $max)
    AND ($type IS NULL OR identity_type = $type)
    AND ($lang IS NULL OR lang_axis = $lang)
    AND ($tag IS NULL OR list_contains(TRY_CAST(tags AS VARCHAR[]), $tag))
    AND ($c_entropy IS NULL OR entropy < $c_entropy OR (entropy = $c_entropy AND id > $c_id))
ORDER BY entropy DESC, id
LIMIT $limit
"""
# Keys first (entropy_score, id: narrow columns, a top-N), then the documents of that page by
# key: reading ``data`` for every row in range would cost a JSON column scan.
NEW_ENTROPY_KEYS_SQL = (
    "SELECT id, entropy FROM ("
    "  SELECT id, identity_type, lang_axis, entropy_score AS entropy, NULL AS tags FROM identities"
    ") WHERE " + _ENTROPY_FILTER
)
NEW_ENTROPY_TAG_KEYS_SQL = (
    "SELECT id, entropy FROM ("
    "  SELECT id, identity_type, lang_axis, entropy_score AS entropy, data->'$.tags' AS tags "
    "  FROM identities"
    ") WHERE " + _ENTROPY_FILTER
)
# The legacy tables as identities with their entropy (kimera_core.legacy), column 12 entropy:
# the API's filtered page (named parameters of _ENTROPY_FILTER). Not
# storage.LEGACY_ENTROPY_RANGE_SQL, Storage.find_by_entropy's plain range read without the
# entropy column; both read the one legacy source, legacy.LEGACY_IDENTITIES_ENTROPY_SQL.
LEGACY_ENTROPY_PAGE_SQL = (
    f"SELECT {LEGACY_IDENTITY_FIELDS}, entropy FROM ({LEGACY_IDENTITIES_ENTROPY_SQL}) "
    "WHERE " + _ENTROPY_FILTER
)

NEW_BY_ID_SQL = "SELECT data, entropy_score FROM identities WHERE id = ?"

# A page's rows by key: an IN list of placeholders (as many as keys, at most MAX_LIMIT + 1)
# uses the primary-key index; a join with a list parameter scans the JSON column instead.
# data as VARCHAR: the JSON type's conversion to Python costs twice as much for the same str
NEW_BY_IDS_SQL = "SELECT data::VARCHAR, entropy_score FROM identities WHERE id IN ({marks})"
LEGACY_GEOIDS_BY_IDS_SQL = f"SELECT {GEOID_COLUMNS} FROM legacy_geoids WHERE gid IN ({{marks}})"
LEGACY_SCARS_BY_IDS_SQL = f"SELECT {SCAR_COLUMNS} FROM legacy_scars WHERE id IN ({{marks}})"

# Scars whose related_ids hold the id: a substring test first (cheap) then the exact one.
NEW_RELATED_SQL = """
SELECT data, entropy_score FROM identities
WHERE identity_type = 'scar' AND contains(data::VARCHAR, $id)
  AND list_contains(TRY_CAST(data->'$.related_ids' AS VARCHAR[]), $id)
  AND ($after IS NULL OR id > $after)
ORDER BY id LIMIT $limit
"""
LEGACY_RELATED_SQL = f"""
SELECT {SCAR_COLUMNS} FROM legacy_scars
WHERE contains(related_ids::VARCHAR, $id)
  AND list_contains(TRY_CAST(related_ids AS VARCHAR[]), $id)
  AND ($after IS NULL OR id > $after)
ORDER BY id LIMIT $limit
"""


# --- in-memory orders of a database that cannot change -----------------------------------
# Every identity with an entropy in the entropy query's order (id, entropy, type, language,
# tags as the tag filter reads them), per store: the identities table's entropy_score
# column, or the legacy tables' entropy by the bulk formulas (one scan, at load: the same
# values the legacy page's scan computes). The type breaks a tie of (entropy, id) between a
# geoid and a scar sharing an id.
ENTROPY_ORDER_SQL = {
    "new": """
SELECT id, entropy_score AS entropy, identity_type, lang_axis,
       TRY_CAST(data->'$.tags' AS VARCHAR[]) AS tags
FROM identities
WHERE entropy_score IS NOT NULL ORDER BY entropy_score DESC, id
""",
    "legacy": f"""
SELECT id, entropy, identity_type, lang_axis, TRY_CAST(tags AS VARCHAR[]) AS tags
FROM ({LEGACY_IDENTITIES_ENTROPY_SQL})
WHERE entropy IS NOT NULL ORDER BY entropy DESC, id, identity_type
""",
}


def is_read_only(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether this connection's database was opened read-only (and so cannot change)."""
    row = con.execute(
        "SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    return bool(row and row[0])


class EntropyOrder:
    """Every identity of one store with an entropy, in the entropy query's order, in numpy.

    ``source``: 'new' (``identities.entropy_score``) or 'legacy' (the legacy tables' entropy
    by the bulk formulas, computed here once: a scan of both tables, ~2 s at a million rows).
    A page is a binary search to the range (and the cursor) and a walk forward through the
    type / language codes until the page is full: no scan of the rows in range. A tag
    filter walks the tag's rows instead (``tag_rows``: per tag, the ascending positions of
    the rows whose tags hold it, as ``list_contains(TRY_CAST(tags AS VARCHAR[]), tag)``
    finds them in SQL: the same cast, so the same rows).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, source: str = "new") -> None:
        self.source = source
        table = con.execute(ENTROPY_ORDER_SQL[source]).arrow()
        if isinstance(table, pa.RecordBatchReader):
            table = table.read_all()
        self.entropy = table.column("entropy").to_numpy().astype(np.float64)
        self.ids: list[str] = table.column("id").to_pylist()
        # DuckDB orders NaN above every number: those rows come first, then a descending run.
        self.nan = int(np.isnan(self.entropy).sum())
        if self.nan and not np.isnan(self.entropy[: self.nan]).all():
            raise RuntimeError("entropy order: NaN rows are not first")
        self.neg = -self.entropy[self.nan :]  # ascending, for searchsorted
        self.types, self.type_codes = self._codes(table.column("identity_type"))
        self.type_names: list[str] = list(self.type_codes)
        self.langs, self.lang_codes = self._codes(table.column("lang_axis"))
        self.tag_rows, self.tag_spans = self._tag_rows(table.column("tags").combine_chunks())

    @staticmethod
    def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, dict[str, int]]:
        encoded = column.combine_chunks().dictionary_encode()
        codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
        return codes, {v: i for i, v in enumerate(encoded.dictionary.to_pylist())}

    @staticmethod
    def _tag_rows(tags: pa.Array) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
        """Positions grouped by tag, ascending and distinct within a tag, and each tag's span."""
        encoded = pc.list_flatten(tags).dictionary_encode()
        codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        rows = pc.list_parent_indices(tags).to_numpy(zero_copy_only=False).astype(np.int64)
        keep = codes >= 0
        codes, rows = codes[keep], rows[keep]
        order = np.lexsort((rows, codes))
        codes, rows = codes[order], rows[order]
        first = np.ones(len(rows), bool)  # a tag listed twice in one row counts once
        first[1:] = (codes[1:] != codes[:-1]) | (rows[1:] != rows[:-1])
        codes, rows = codes[first], rows[first]
        names = encoded.dictionary.to_pylist()
        bounds = np.searchsorted(codes, np.arange(len(names) + 1))
        spans = {t: (int(bounds[i]), int(bounds[i + 1])) for i, t in enumerate(names)}
        return rows, spans

    def _first_at_most(self, value: float) -> int:
        return self.nan + int(np.searchsorted(self.neg, -value, "left"))

    def _after_last_at_least(self, value: float) -> int:
        return self.nan + int(np.searchsorted(self.neg, -value, "right"))

    def _after_cursor(self, c_entropy: float, c_id: str) -> int:
        # rows after (c_entropy, c_id): equal entropy and a greater id, then lower entropy
        if math.isnan(c_entropy):
            low, high = 0, self.nan
        else:
            low, high = self._first_at_most(c_entropy), self._after_last_at_least(c_entropy)
        return bisect.bisect_right(self.ids, c_id, low, high)

    def page(
        self,
        low: float | None,
        high: float | None,
        *,
        identity_type: str | None,
        lang: str | None,
        cursor: tuple[float, str] | None,
        limit: int,
        tag: str | None = None,
    ) -> list[tuple[str, float, str]]:
        """(id, entropy, identity type) of the first ``limit`` rows of the range after the cursor."""
        start = 0 if high is None else self._first_at_most(high)
        end = len(self.ids) if low is None else self._after_last_at_least(low)
        if cursor is not None:
            start = max(start, self._after_cursor(*cursor))
        wanted = []
        for codes, table, value in (
            (self.types, self.type_codes, identity_type),
            (self.langs, self.lang_codes, lang),
        ):
            if value is not None:
                if value not in table:
                    return []
                wanted.append((codes, table[value]))
        rows: np.ndarray | None = None  # the positions a tag filter allows, ascending
        if tag is not None:
            if tag not in self.tag_spans:
                return []
            rows = self.tag_rows[slice(*self.tag_spans[tag])]
            rows = rows[np.searchsorted(rows, start) : np.searchsorted(rows, end)]
        total = max(0, end - start) if rows is None else len(rows)
        found: list[int] = []
        at, step = 0, 4 * limit
        while at < total and len(found) < limit:
            stop = min(total, at + step)
            chunk = np.arange(start + at, start + stop) if rows is None else rows[at:stop]
            for codes, code in wanted:
                chunk = chunk[codes[chunk] == code]
            found.extend(chunk[: limit - len(found)].tolist())
            at, step = stop, step * 4
        names = self.type_names
        return [(self.ids[i], float(self.entropy[i]), names[self.types[i]]) for i in found]


class ReadSnapshot:
    """In-memory indexes of a read-only database: the entropy order and the text postings.

    A database opened read-only cannot change while it is open: DuckDB refuses writes on
    that connection, and its file lock keeps every writing process (and a read-write open in
    this one) out until it is closed. So what is loaded here cannot go stale; the snapshot
    refuses a writable connection, where the SQL paths answer instead. Built lazily (or by
    ``warm``) once per open database, then shared by every request's cursor.

    The lock is a POSIX record lock, which a process drops when it closes *any* descriptor
    of the file: so this process must not open the file by other means meanwhile (e.g.
    ``kimera_core.db.open_database``, whose header check opens and closes it).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        if not is_read_only(con):
            raise ValueError("a ReadSnapshot needs a read-only connection (a writable one changes)")
        self._con = con
        self._lock = threading.Lock()
        self.stage = get_stage(con)
        self.source = "new" if routing(self.stage).read == "new" else "legacy"
        self._entropy: EntropyOrder | None = None
        self._postings: textsearch.Postings | None = None

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        return self._con.cursor()

    def entropy_order(self) -> EntropyOrder:
        """The entropy order of the store the stage reads (built on first use)."""
        with self._lock:
            if self._entropy is None:
                with self._cursor() as cur:
                    self._entropy = EntropyOrder(cur, self.source)
            return self._entropy

    def postings(self) -> textsearch.Postings:
        """The text index in memory; TextIndexMissing if it was never built."""
        with self._lock:
            if self._postings is None:
                with self._cursor() as cur:
                    self._postings = textsearch.Postings(cur)
            return self._postings

    def warm(self) -> None:
        """Load both now (a few seconds at a million rows) rather than on first use."""
        self.entropy_order()
        with contextlib.suppress(textsearch.TextIndexMissing):  # then /search answers 503
            self.postings()


# --- the query functions -----------------------------------------------------------------
def get_identity(
    con: duckdb.DuckDBPyConnection, identity_id: str, *, source: str | None = None
) -> Hit | None:
    """The identity with this id from the read store, with its entropy; None if absent."""
    _check_unicode("identity_id", identity_id)
    source = source or read_source(con)
    if source == "new":
        row = con.execute(NEW_BY_ID_SQL, [identity_id]).fetchone()
        if row is None:
            return None
        return Hit(Identity.from_document(row[0]), row[1])
    identity = fetch_legacy_identity(con, identity_id)
    return None if identity is None else Hit(identity, identity_entropy(identity))


def find_identities_by_entropy(
    con: duckdb.DuckDBPyConnection,
    min_entropy: float | None = None,
    max_entropy: float | None = None,
    *,
    identity_type: str | None = None,
    lang: str | None = None,
    tag: str | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    source: str | None = None,
    snapshot: ReadSnapshot | None = None,
) -> Page:
    """Identities with entropy in [min_entropy, max_entropy], highest first (ties by id).

    ``snapshot``: the in-memory order of this read-only database (``ReadSnapshot``), used
    for the store it was built from: in the legacy stages its entropies are the legacy rows'
    own (the bulk formulas, computed at load), so a page holds exactly the rows and values
    the scan would. Without one, a page is one SQL statement (in the legacy stages a scan
    of both legacy tables, which computes every row's entropy).
    """
    low = _check_number("min_entropy", min_entropy)
    high = _check_number("max_entropy", max_entropy)
    if low is not None and high is not None and low > high:
        raise QueryError("min_entropy must not exceed max_entropy")
    limit = _check_limit(limit)
    _check_unicode("lang", lang)
    _check_unicode("tag", tag)
    c_entropy, c_id = decode_cursor(cursor, (float, str)) if cursor else (None, None)
    source = source or (snapshot.source if snapshot is not None else read_source(con))
    params = {
        "min": low,
        "max": high,
        "type": _check_type(identity_type),
        "lang": lang,
        "tag": tag,
        "c_entropy": c_entropy,
        "c_id": c_id,
        "limit": limit + 1,
    }
    rows: list[tuple[Any, ...]] | None = None
    if snapshot is not None and snapshot.source == source:
        keys = snapshot.entropy_order().page(
            low,
            high,
            identity_type=params["type"],
            lang=lang,
            tag=tag,
            cursor=None if c_entropy is None else (c_entropy, c_id),
            limit=limit + 1,
        )
    elif source == "new":
        sql = NEW_ENTROPY_TAG_KEYS_SQL if tag is not None else NEW_ENTROPY_KEYS_SQL
        keys = [(k, e, None) for k, e in con.execute(sql, params).fetchall()]
    else:
        rows = con.execute(LEGACY_ENTROPY_PAGE_SQL, params).fetchall()
        keys = [(r[1], r[11], r[0]) for r in rows]
    if rows is None:  # the key after the page only says there is a next page: not read
        hits = _hits(con, keys[:limit], source)
    else:
        hits = [Hit(identity_from_legacy_row(r), r[11]) for r in rows[:limit]]
    next_cursor = None
    if len(keys) > limit:
        key, entropy, _ = keys[limit - 1]
        next_cursor = encode_cursor([entropy, key])
    return Page(hits, source, next_cursor)


def find_related(
    con: duckdb.DuckDBPyConnection,
    identity_id: str,
    *,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    source: str | None = None,
) -> Page:
    """The scars whose related_ids hold ``identity_id``, in id order."""
    _check_unicode("identity_id", identity_id)
    limit = _check_limit(limit)
    (after,) = decode_cursor(cursor, (str,)) if cursor else (None,)
    source = source or read_source(con)
    params = {"id": identity_id, "after": after, "limit": limit + 1}
    if source == "new":
        rows = con.execute(NEW_RELATED_SQL, params).fetchall()
        hits = [Hit(Identity.from_document(r[0]), r[1]) for r in rows]
    else:
        rows = con.execute(LEGACY_RELATED_SQL, params).fetchall()
        hits = []
        for r in rows:
            identity = scar_from_row(r).to_identity()
            hits.append(Hit(identity, identity_entropy(identity)))
    next_cursor = None
    if len(hits) > limit:
        hits = hits[:limit]
        next_cursor = encode_cursor([hits[-1].identity.id])
    return Page(hits, source, next_cursor)


def search_text(
    con: duckdb.DuckDBPyConnection,
    text: str,
    *,
    lang: str | None = None,
    limit: int = DEFAULT_LIMIT,
    offset: int = 0,
    source: str | None = None,
    snapshot: ReadSnapshot | None = None,
) -> Page:
    """Geoids ranked by BM25 relevance to ``text`` (``kimera_core.textsearch``).

    Raises ``textsearch.TextIndexMissing`` when the index was never built. ``lang``
    keeps only geoids of that language (applied after ranking, within the page).
    ``snapshot``: rank with the in-memory index of this read-only database (the same
    ranking as the SQL).
    """
    _check_text(text)
    _check_unicode("lang", lang)
    limit = _check_limit(limit)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise QueryError(f"offset must be an integer from 0 to {MAX_OFFSET}")
    source = source or (snapshot.source if snapshot is not None else read_source(con))
    postings = snapshot.postings() if snapshot is not None else None
    ranked = textsearch.search(con, text, limit=limit + 1, offset=offset, postings=postings)
    more = len(ranked) > limit
    ranked = ranked[:limit]
    found = _identities_by_ids(con, [h.id for h in ranked], source)
    hits = [
        Hit(found[h.id][0], found[h.id][1], h.score)
        for h in ranked
        if h.id in found and (lang is None or found[h.id][0].lang_axis == lang)
    ]
    return Page(
        hits,
        source,
        next_offset=offset + limit if more else None,
        paging="offset",
        extra={"terms": textsearch.query_terms(text)},
    )


MAX_SEMANTIC_LIMIT = 50


def search_semantic(
    con: duckdb.DuckDBPyConnection,
    encoder: Any,
    text: str,
    *,
    limit: int = 10,
    source: str | None = None,
) -> Page:
    """Geoids nearest in meaning to ``text`` (``kimera_core.semantic``), most similar first.

    ``encoder``: a ``semantic.Encoder``. Searches through the IVF index when one is built,
    exactly otherwise; raises ``semantic.EmbeddingsMissing`` when nothing was embedded.
    """
    _check_text(text)
    if (
        isinstance(limit, bool)
        or not isinstance(limit, int)
        or not 1 <= limit <= MAX_SEMANTIC_LIMIT
    ):
        raise QueryError(f"limit must be an integer from 1 to {MAX_SEMANTIC_LIMIT}")
    source = source or read_source(con)
    nearest = semantic.search_text(con, encoder, text, k=limit)
    found = _identities_by_ids(con, [key for key, _ in nearest], source)
    hits = [Hit(found[k][0], found[k][1], s) for k, s in nearest if k in found]
    return Page(hits, source, paging="none")


def _hits(
    con: duckdb.DuckDBPyConnection, keys: list[tuple[str, float, str | None]], source: str
) -> list[Hit]:
    """The hits of a page's (id, entropy, identity type) keys, in that order, the rows read
    by primary key; the entropy is the key's. A legacy key names its table by its type."""
    if source == "new":
        found = _identities_by_ids(con, [k for k, _, _ in keys], source)
        return [Hit(found[k][0], e) for k, e, _ in keys if k in found]
    by_type: dict[str, dict[str, Identity]] = {}
    for kind, sql, from_row in (
        ("geoid", LEGACY_GEOIDS_BY_IDS_SQL, geoid_from_row),
        ("scar", LEGACY_SCARS_BY_IDS_SQL, scar_from_row),
    ):
        rows = _rows_by_keys(con, sql, [k for k, _, t in keys if t == kind])
        by_type[kind] = {r[0]: from_row(r).to_identity() for r in rows}
    return [Hit(by_type[t][k], e) for k, e, t in keys if k in by_type.get(t or "", {})]


# Keys per statement of a by-keys read: DuckDB (dynamic_or_filter_threshold, 50 in 1.5)
# pushes the keys of an IN list into the table scan as a filter only up to this many; a 51st
# key doubled the read's time at a million rows (measured), so larger pages read in chunks.
KEYS_PER_READ = 50


def _rows_by_keys(con: duckdb.DuckDBPyConnection, sql: str, keys: list[str]) -> list[tuple]:
    """The rows of ``sql`` (a by-keys read with a ``{marks}`` IN list) for ``keys``."""
    assert len(keys) <= MAX_LIMIT + 1
    rows: list[tuple] = []
    for at in range(0, len(keys), KEYS_PER_READ):
        chunk = keys[at : at + KEYS_PER_READ]
        rows += con.execute(sql.format(marks=", ".join("?" * len(chunk))), chunk).fetchall()
    return rows


def _identities_by_ids(
    con: duckdb.DuckDBPyConnection, ids: list[str], source: str
) -> dict[str, tuple[Identity, float | None]]:
    out: dict[str, tuple[Identity, float | None]] = {}
    if source == "new":
        for data, entropy in _rows_by_keys(con, NEW_BY_IDS_SQL, ids):
            identity = Identity.from_document(data)
            out[identity.id] = (identity, entropy)
        return out
    for row in _rows_by_keys(con, LEGACY_GEOIDS_BY_IDS_SQL, ids):
        identity = geoid_from_row(row).to_identity()
        out[identity.id] = (identity, identity_entropy(identity))
    return out


# --- the search indexes of the read store ---------------------------------------------------
@dataclass(frozen=True)
class TextIndexReport:
    """Whether ``ensure_text_index`` (re)built the text index, and the index's state after."""

    built: bool
    status: textsearch.IndexStatus

    def to_dict(self) -> dict[str, Any]:
        return {"built": self.built, **self.status.to_dict()}


def ensure_text_index(path: str | os.PathLike[str], *, force: bool = False) -> TextIndexReport:
    """Build the BM25 index of the store the rollout stage reads if missing or stale (or ``force``).

    A read-only look comes first, so a current index needs no write access (other readers,
    such as ``kimera serve``, may hold the file); a build opens the file read-write for its
    one transaction. Raises ``DatabaseOpenError`` for a file that cannot be opened.
    """
    if not force:
        with connect(path, read_only=True) as con:
            status = textsearch.index_status(con, read_source(con))
        if status.exists and not status.stale:
            return TextIndexReport(False, status)
    with connect(path) as con:
        status = textsearch.build_text_index(con, read_source(con))
    return TextIndexReport(True, status)


def embed_read_store(
    path: str | os.PathLike[str], *, most: int, encoder: semantic.Encoder | None = None
) -> semantic.EmbedReport:
    """Embed up to ``most`` geoids of the read store that have no vector; rebuild the IVF index.

    Raises ``semantic.SemanticUnavailable`` (before opening the file) when the model or the
    ``[semantic]`` extra is missing, ``DatabaseOpenError`` for a file that cannot be opened.
    """
    encoder = encoder or semantic.Encoder()
    with connect(path) as con:
        return semantic.embed_missing(con, encoder, source=read_source(con), most=most)
