"""Multilingual BM25 text search over geoid text, in plain DuckDB SQL.

DuckDB's ``fts`` extension would need a download at run time (the PyPI packages that carry
it are built for other DuckDB versions), so the index is our own side tables:

* ``kimera_text_postings(term, id, tf, dl)``: one row per (term, geoid) with the term's
  frequency in the geoid's text and the text's length in tokens, sorted by term so a
  lookup reads a few row groups;
* ``kimera_text_terms(term, df)``: document frequency per term;
* ``kimera_text_meta``: one row: document count, mean length, the store it was built from
  and that store's signature (geoid count, latest ``updated_at``) at build time.

The index is rebuilt set-based (``build_text_index``, ``kimera search-index``;
``query.ensure_text_index``, which ``kimera serve`` calls, rebuilds it when it is missing or
stale). It is not maintained by each write: a
geoid written after the build is found by id and by entropy at once, by text after the next
rebuild (``index_status`` says whether the index is stale).

Tokens (``tokenize``): NFKC, case-folded; combining marks stripped (Latin accents, Arabic
tashkeel; Japanese voicing marks are kept); Arabic tatweel removed and alef / ya / ta
marbuta variants folded; words are runs of letters and digits; Han, Hiragana and Katakana
runs become character unigrams and bigrams in documents, bigrams (or the single character)
in queries. Ranking is Okapi BM25 with k1 = 1.2 and b = 0.75.
"""

from __future__ import annotations

import contextlib
import re
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kimera_core.db import transaction

K1 = 1.2
B = 0.75
MAX_QUERY_TERMS = 32


# Every nonspacing mark except the kana voicing marks (U+3099, U+309A): stripping those
# would turn が into か. Written as ranges: a class of single characters is slow to match.
def _mark_class() -> str:
    codes = [
        c
        for c in (*range(0x20000), *range(0xE0100, 0xE01F0))
        if unicodedata.category(chr(c)) == "Mn" and c not in (0x3099, 0x309A)
    ]
    codes.append(0x0640)  # Arabic tatweel
    codes.sort()
    ranges: list[tuple[int, int]] = []
    for c in codes:
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], c)
        else:
            ranges.append((c, c))
    return "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
        for a, b in ranges
    )


_MARK_RE = re.compile(f"[{_mark_class()}]")
_ARABIC_FOLD = (("ٱ", "ا"), ("ى", "ي"), ("ة", "ه"), ("ی", "ي"), ("ک", "ك"))
_ARABIC_RE = re.compile("[\u0600-\u06ff]")
_WORD_RE = re.compile(r"[^\W_]+")
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_CJK_SPLIT_RE = re.compile(f"([{_CJK}]+)")
_CJK_RE = re.compile(f"[{_CJK}]")


def normalize(text: str) -> str:
    """Text folded for matching: case, accents, Arabic variants (CJK untouched)."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = unicodedata.normalize("NFC", _MARK_RE.sub("", text))
    if _ARABIC_RE.search(text):
        for variant, base in _ARABIC_FOLD:
            text = text.replace(variant, base)
    return text


def _cjk_grams(run: str, *, query: bool) -> list[str]:
    if len(run) == 1:
        return [run]
    bigrams = [run[i : i + 2] for i in range(len(run) - 1)]
    return bigrams if query else [*run, *bigrams]


def tokenize(text: str | None, *, query: bool = False) -> list[str]:
    """Index terms of a text (``query=True``: the terms a query looks up)."""
    if not text:
        return []
    out: list[str] = []
    for word in _WORD_RE.findall(normalize(text)):
        if not _CJK_RE.search(word):
            out.append(word)
            continue
        for part in _CJK_SPLIT_RE.split(word):
            if not part:
                continue
            if _CJK_RE.match(part):
                out.extend(_cjk_grams(part, query=query))
            else:
                out.append(part)
    return out


def query_terms(text: str) -> list[str]:
    """The distinct terms a query looks up, in first-seen order, at most MAX_QUERY_TERMS."""
    return list(dict.fromkeys(tokenize(text, query=True)))[:MAX_QUERY_TERMS]


def _tokenize_arrow(texts: pa.Array) -> pa.Array:
    return pa.array([tokenize(t) for t in texts.to_pylist()], pa.list_(pa.string()))


# --- the index ------------------------------------------------------------------------
SOURCE_SQL = {
    "new": "SELECT id, data->>'$.raw' AS text FROM identities WHERE identity_type = 'geoid'",
    "legacy": "SELECT gid AS id, raw AS text FROM legacy_geoids",
}
SIGNATURE_SQL = {
    "new": "SELECT count(*), max(updated_at) FROM identities WHERE identity_type = 'geoid'",
    "legacy": "SELECT count(*), max(updated_at) FROM legacy_geoids",
}
BUILD_SQL = (
    "CREATE OR REPLACE TEMP TABLE kimera_text_tokens AS "
    "SELECT id, kimera_tokenize(text) AS toks FROM ({source}) WHERE id IS NOT NULL",
    "CREATE OR REPLACE TABLE kimera_text_postings AS "
    "SELECT term, id, count(*)::INTEGER AS tf, any_value(dl)::INTEGER AS dl FROM ("
    "  SELECT id, unnest(toks) AS term, len(toks) AS dl FROM kimera_text_tokens"
    ") GROUP BY term, id ORDER BY term, id",
    "CREATE OR REPLACE TABLE kimera_text_terms AS "
    "SELECT term, count(*)::INTEGER AS df FROM kimera_text_postings GROUP BY term ORDER BY term",
    "CREATE OR REPLACE TABLE kimera_text_meta AS "
    "SELECT count(*)::BIGINT AS n_docs, coalesce(avg(len(toks)), 0)::DOUBLE AS avgdl, "
    "?::VARCHAR AS source, ?::BIGINT AS source_rows, ?::DOUBLE AS source_updated_at, "
    "?::DOUBLE AS built_at FROM kimera_text_tokens",
)

# BM25 over the query's terms; a document scores on every term it holds (OR semantics).
SEARCH_SQL = f"""
WITH q AS (SELECT DISTINCT unnest($terms::VARCHAR[]) AS term),
m AS (SELECT n_docs, greatest(avgdl, 1e-9) AS avgdl FROM kimera_text_meta),
w AS (
    SELECT t.term, ln(1 + (m.n_docs - t.df + 0.5) / (t.df + 0.5)) AS idf
    FROM kimera_text_terms t JOIN q ON q.term = t.term CROSS JOIN m
),
s AS (
    SELECT p.id,
           sum(w.idf * p.tf * ({K1} + 1) / (p.tf + {K1} * (1 - {B} + {B} * p.dl / m.avgdl)))
               AS score,
           count(*) AS matched
    FROM kimera_text_postings p JOIN w ON w.term = p.term CROSS JOIN m
    WHERE p.term IN (SELECT term FROM q)
    GROUP BY p.id
)
SELECT id, score, matched FROM s ORDER BY score DESC, id LIMIT $limit OFFSET $offset
"""


@dataclass(frozen=True)
class IndexStatus:
    """Whether the text index exists, which store it was built from and whether it is stale."""

    exists: bool
    source: str | None = None
    documents: int = 0
    built_at: float | None = None
    stale: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "exists": self.exists,
            "source": self.source,
            "documents": self.documents,
            "built_at": self.built_at,
            "stale": self.stale,
        }


class TextIndexMissing(RuntimeError):
    """The text index has not been built in this database."""


def _signature(con: duckdb.DuckDBPyConnection, source: str) -> tuple[int, float | None]:
    rows, updated = con.execute(SIGNATURE_SQL[source]).fetchone()
    return int(rows), None if updated is None else float(updated)


def index_status(con: duckdb.DuckDBPyConnection, source: str) -> IndexStatus:
    """The index's state against the store ``source`` ('legacy' or 'new') as it is now."""
    try:
        row = con.execute(
            "SELECT n_docs, source, source_rows, source_updated_at, built_at FROM kimera_text_meta"
        ).fetchone()
    except duckdb.CatalogException:
        return IndexStatus(exists=False)
    if row is None:
        return IndexStatus(exists=False)
    n_docs, built_source, rows, updated, built_at = row
    stale = built_source != source or _signature(con, source) != (rows, updated)
    return IndexStatus(True, built_source, int(n_docs), built_at, stale)


def build_text_index(con: duckdb.DuckDBPyConnection, source: str) -> IndexStatus:
    """(Re)build the BM25 index from the geoids of ``source``, in one transaction."""
    if source not in SOURCE_SQL:
        raise ValueError(f"source must be 'legacy' or 'new', got {source!r}")
    with contextlib.suppress(duckdb.InvalidInputException, duckdb.CatalogException):
        con.remove_function("kimera_tokenize")
    con.create_function(
        "kimera_tokenize",
        _tokenize_arrow,
        ["VARCHAR"],
        "VARCHAR[]",
        type="arrow",
        null_handling="special",
    )
    with transaction(con):
        rows, updated = _signature(con, source)
        con.execute(BUILD_SQL[0].format(source=SOURCE_SQL[source]))
        for sql in BUILD_SQL[1:3]:
            con.execute(sql)
        con.execute(BUILD_SQL[3], [source, rows, updated, time.time()])
        con.execute("DROP TABLE kimera_text_tokens")
    return index_status(con, source)


@dataclass(frozen=True)
class TextHit:
    """One ranked match: the geoid id, its BM25 score and how many query terms it holds."""

    id: str
    score: float
    matched: int


def _missing() -> TextIndexMissing:
    return TextIndexMissing(
        "the text index has not been built: run `kimera search-index --db PATH`"
    )


def _arrow(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    result = con.execute(sql).arrow()
    return result.read_all() if isinstance(result, pa.RecordBatchReader) else result


class Postings:
    """The whole BM25 index in memory (numpy), for a database that cannot change.

    Built from the index tables of a read-only connection (``kimera serve``), it scores
    every posting of every query term, vectorised, with the formula of ``SEARCH_SQL``: the
    same exhaustive ranking, a few milliseconds even for terms in a fifth of all geoids.
    The cost is the postings of the query's terms (at most MAX_QUERY_TERMS terms), with no
    early stop and so no approximation; memory is ~10 bytes per posting plus the terms.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        try:
            meta = con.execute("SELECT n_docs, avgdl FROM kimera_text_meta").fetchone()
            terms = _arrow(con, "SELECT term, df FROM kimera_text_terms ORDER BY term")
            docs = _arrow(con, "SELECT DISTINCT id FROM kimera_text_postings ORDER BY id")
            rows = _arrow(con, "SELECT id, tf, dl FROM kimera_text_postings ORDER BY term, id")
        except duckdb.CatalogException as exc:
            raise _missing() from exc
        if meta is None:
            raise _missing()
        self.n_docs, self.avgdl = int(meta[0]), max(float(meta[1]), 1e-9)
        # Document numbers in id order, so ties broken by number are ties broken by id.
        self.ids: list[str] = docs.column("id").to_pylist()
        doc = pc.index_in(rows.column("id"), value_set=docs.column("id"))
        self.doc = doc.to_numpy(zero_copy_only=False).astype(np.int32)
        self.tf = rows.column("tf").to_numpy().astype(np.float64)
        self.dl = rows.column("dl").to_numpy().astype(np.float64)
        self.df = terms.column("df").to_numpy().astype(np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.df)])
        if self.start[-1] != len(self.doc):
            raise RuntimeError("text index tables disagree (terms vs postings): rebuild it")
        self.term_index = {t: i for i, t in enumerate(terms.column("term").to_pylist())}

    def search(self, terms: list[str], *, limit: int, offset: int = 0) -> list[TextHit]:
        """The page of ``SEARCH_SQL``'s ranking (score desc, id asc) for these terms."""
        found = [self.term_index[t] for t in dict.fromkeys(terms) if t in self.term_index]
        if not found:
            return []
        docs, weights = [], []
        for i in found:
            a, b = self.start[i], self.start[i + 1]
            df = float(self.df[i])
            idf = np.log(1 + (self.n_docs - df + 0.5) / (df + 0.5))
            tf, dl = self.tf[a:b], self.dl[a:b]
            docs.append(self.doc[a:b])
            weights.append(idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * dl / self.avgdl)))
        every, weight = np.concatenate(docs), np.concatenate(weights)
        dense = np.bincount(every, weights=weight, minlength=len(self.ids))
        score = dense[every]  # each posting carries its document's full score
        # Fewer than `want` documents score above the want-th best, each with at most one
        # posting per term: the (want * terms)-th best posting is no better than it, so
        # keeping every posting at least that good keeps the top `want` and all their ties.
        rank = min(len(score), (offset + limit) * len(found))
        floor = np.partition(score, len(score) - rank)[len(score) - rank]
        cand, matched = np.unique(every[score >= floor], return_counts=True)
        score = dense[cand]
        order = np.lexsort((cand, -score))[offset : offset + limit]
        return [TextHit(self.ids[cand[j]], float(score[j]), int(matched[j])) for j in order]


def search(
    con: duckdb.DuckDBPyConnection,
    text: str,
    *,
    limit: int = 20,
    offset: int = 0,
    postings: Postings | None = None,
) -> list[TextHit]:
    """Geoids ranked by BM25 for ``text`` (best first, ties by id); [] when no term matches.

    ``postings``: the in-memory index of this (read-only) database, if loaded; the same
    ranking as the SQL, faster.
    """
    terms = query_terms(text)
    if not terms:
        return []
    if postings is not None:
        return postings.search(terms, limit=limit, offset=offset)
    try:
        rows = con.execute(
            SEARCH_SQL, {"terms": terms, "limit": limit, "offset": offset}
        ).fetchall()
    except duckdb.CatalogException as exc:
        raise _missing() from exc
    return [TextHit(r[0], float(r[1]), int(r[2])) for r in rows]
