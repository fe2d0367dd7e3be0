"""The multilingual tokenizer and the BM25 index: folding, CJK grams, ranking, staleness."""

from __future__ import annotations

import math

import duckdb
import pytest
from support.legacy_rows import insert_geoids

from kimera_core import textsearch
from kimera_core.identity import Geoid
from kimera_core.legacy import create_legacy_schema


def test_latin_accents_and_case_fold_to_the_same_term():
    assert textsearch.tokenize("L'Été à NOËL, Café!") == ["l", "ete", "a", "noel", "cafe"]
    assert textsearch.tokenize("Die Größe") == ["die", "grosse"]


def test_arabic_tashkeel_tatweel_and_letter_variants_are_folded():
    assert textsearch.tokenize("مَدْرَسَة") == textsearch.tokenize("مدرسه")
    assert textsearch.tokenize("أحمد إلى آخر") == ["احمد", "الي", "اخر"]
    assert textsearch.tokenize("كتـــاب") == ["كتاب"]


def test_japanese_runs_index_unigrams_and_bigrams_and_keep_voicing_marks():
    assert textsearch.tokenize("図書館") == ["図", "書", "館", "図書", "書館"]
    assert textsearch.query_terms("図書館") == ["図書", "書館"]
    assert textsearch.query_terms("川") == ["川"]
    assert textsearch.tokenize("が") == ["が"]  # not folded to か


def test_words_split_on_punctuation_and_underscore_and_queries_are_deduplicated():
    assert textsearch.tokenize("naïve_model · 42") == ["naive", "model", "42"]
    assert textsearch.query_terms("river RIVER river") == ["river"]
    assert textsearch.tokenize("") == [] and textsearch.tokenize(None) == []


@pytest.fixture
def con():
    con = duckdb.connect()
    create_legacy_schema(con)
    texts = [
        ("en", "the river remembers the river"),
        ("en", "the river"),
        ("en", "a quiet city"),
        ("fr", "La rivière se souvient"),
        ("ar", "المكتبة القديمة"),
        ("ja", "古い図書館は"),
    ]
    insert_geoids(con, [Geoid.new(t, lang, created_at=1.0) for lang, t in texts])
    textsearch.build_text_index(con, "legacy")
    yield con
    con.close()


def _bm25(tf: int, dl: int, avgdl: float, n: int, df: int) -> float:
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    return (
        idf
        * tf
        * (textsearch.K1 + 1)
        / (tf + textsearch.K1 * (1 - textsearch.B + textsearch.B * dl / avgdl))
    )


def test_bm25_score_matches_the_formula(con):
    hits = textsearch.search(con, "river")
    n, avgdl = con.execute("SELECT n_docs, avgdl FROM kimera_text_meta").fetchone()
    top = hits[0]
    assert top.score == pytest.approx(_bm25(2, 5, avgdl, n, 2))
    assert [h.matched for h in hits] == [1, 1]


def test_more_matching_terms_and_rarer_terms_rank_higher(con):
    ranked = textsearch.search(con, "river quiet")
    raws = dict(con.execute("SELECT gid, raw FROM legacy_geoids").fetchall())
    # "quiet" occurs once in the corpus, "river" twice: the rarer term weighs more
    assert raws[ranked[0].id] == "a quiet city"


def test_multilingual_queries_find_their_documents(con):
    raws = dict(con.execute("SELECT gid, raw FROM legacy_geoids").fetchall())
    assert [raws[h.id] for h in textsearch.search(con, "RIVIERE")] == ["La rivière se souvient"]
    assert [raws[h.id] for h in textsearch.search(con, "المكتبه")] == ["المكتبة القديمة"]
    assert [raws[h.id] for h in textsearch.search(con, "図書館")] == ["古い図書館は"]


def test_no_match_and_no_terms_give_an_empty_result(con):
    assert textsearch.search(con, "zzzz") == []
    assert textsearch.search(con, "  ·  ") == []


def test_index_goes_stale_after_a_write_and_is_missing_before_a_build(con):
    assert not textsearch.index_status(con, "legacy").stale
    insert_geoids(con, [Geoid.new("a new river", "en", created_at=2.0)])
    assert textsearch.index_status(con, "legacy").stale
    assert textsearch.index_status(con, "new").stale  # built from another store
    fresh = duckdb.connect()
    create_legacy_schema(fresh)
    assert not textsearch.index_status(fresh, "legacy").exists
    with pytest.raises(textsearch.TextIndexMissing):
        textsearch.search(fresh, "river")


def test_the_in_memory_postings_rank_exactly_as_the_sql(con):
    # many equal scores (repeated texts) so ties, broken by id, decide page boundaries
    words = ["river", "city", "quiet", "light", "memory", "the"]
    texts = [
        " ".join([words[(i * k) % 6] for k in range(1 + i % 4)] + [f"n{i}"]) for i in range(120)
    ]
    insert_geoids(con, [Geoid.new(t, "en", created_at=3.0 + i) for i, t in enumerate(texts)])
    textsearch.build_text_index(con, "legacy")
    postings = textsearch.Postings(con)
    for text in ["river", "river city", "the quiet light memory", "city city", "zzz", "図書館"]:
        for limit, offset in [(1, 0), (5, 0), (7, 3), (50, 10), (500, 0)]:
            sql = textsearch.search(con, text, limit=limit, offset=offset)
            mem = textsearch.search(con, text, limit=limit, offset=offset, postings=postings)
            assert [(h.id, h.matched) for h in mem] == [(h.id, h.matched) for h in sql]
            assert [h.score for h in mem] == pytest.approx([h.score for h in sql], rel=1e-12)


def test_in_memory_postings_need_a_built_index():
    fresh = duckdb.connect()
    create_legacy_schema(fresh)
    with pytest.raises(textsearch.TextIndexMissing):
        textsearch.Postings(fresh)
