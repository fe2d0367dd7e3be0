"""Semantic search: the numpy all-MiniLM-L6-v2 encoder, stored vectors, exact vs IVF search."""

from __future__ import annotations

import json
import os
import shutil

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from kimera_core import query, semantic
from kimera_core.cli.main import cli


def _encoder() -> semantic.Encoder:
    try:
        return semantic.Encoder()
    except semantic.SemanticUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs the [semantic] extra and the model: {exc}")
        pytest.skip(f"semantic extra not installed: {exc}")


@pytest.fixture(scope="module")
def encoder():
    return _encoder()


def test_embeddings_are_unit_vectors_matching_the_published_similarity(encoder):
    v = encoder.encode(
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby.",
        ]
    )
    assert v.shape == (3, semantic.DIM)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # sentence-transformers' documented similarity for this pair with all-MiniLM-L6-v2
    assert float(v[0] @ v[1]) == pytest.approx(0.7553, abs=0.01)
    assert float(v[0] @ v[2]) < 0.1


def test_geoids_are_embedded_and_found_by_meaning(encoder):
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE identities (id TEXT PRIMARY KEY, identity_type TEXT, data JSON, "
        "created_at DOUBLE, updated_at DOUBLE, lang_axis TEXT, entropy_score DOUBLE)"
    )
    texts = {
        "g1": "The old library keeps forgotten books",
        "g2": "A storm floods the river at night",
        "g3": "Children play football in the park",
    }
    for key, text in texts.items():
        con.execute(
            "INSERT INTO identities VALUES (?, 'geoid', json_object('raw', ?), 0, 0, 'en', 0)",
            [key, text],
        )
    assert semantic.embed_geoids(con, encoder) == 3
    assert semantic.embed_geoids(con, encoder) == 0  # only missing vectors are computed
    hits = semantic.search_text(con, encoder, "a flood on the water", k=3)
    assert hits[0][0] == "g2"
    assert semantic.search_text(con, encoder, "reading in a library", k=1)[0][0] == "g1"


def test_ivf_search_finds_what_exact_search_finds():
    con = duckdb.connect()
    semantic.load_random_embeddings(con, 3000, seed=1)
    info = semantic.build_ivf_index(con, lists=16)
    assert info == {"vectors": 3000, "lists": 16, "iterations": 10}
    rng = np.random.default_rng(2)
    recalls = []
    for _ in range(10):
        q = rng.standard_normal(semantic.DIM)
        exact = semantic.search_vector(con, q, k=10, method="exact")
        assert [s for _, s in exact] == sorted((s for _, s in exact), reverse=True)
        probed_all = semantic.search_vector(con, q, k=10, method="ivf", nprobe=16)
        assert [i for i, _ in probed_all] == [i for i, _ in exact]
        some = semantic.search_vector(con, q, k=10, method="ivf", nprobe=4)
        recalls.append(len({i for i, _ in some} & {i for i, _ in exact}) / 10)
    assert np.mean(recalls) > 0.3  # random vectors are the worst case for an IVF index


def test_an_empty_store_has_nothing_to_index_and_search_without_index_is_exact():
    con = duckdb.connect()
    con.execute(semantic.EMBEDDINGS_DDL)
    with pytest.raises(ValueError):
        semantic.build_ivf_index(con)
    vec = np.eye(semantic.DIM, dtype=np.float32)[:2]
    semantic.store_embeddings(con, ["a", "b"], vec)
    assert semantic.search_vector(con, vec[1], k=1) == [("b", pytest.approx(1.0))]


def test_a_vector_stored_after_the_index_build_is_found_through_the_index():
    con = duckdb.connect()
    semantic.load_random_embeddings(con, 2000, seed=3)
    semantic.build_ivf_index(con, lists=32)
    late = np.random.default_rng(4).standard_normal(semantic.DIM).astype(np.float32)
    semantic.store_embeddings(con, ["late"], (late / np.linalg.norm(late))[None])
    assert semantic.search_vector(con, late, k=1, method="ivf", nprobe=1)[0][0] == "late"
    # a replaced vector is found where it is now, never where its old copy was listed
    (old_vec,) = con.execute("SELECT vec FROM kimera_embeddings WHERE id = 'v00000000'").fetchone()
    semantic.store_embeddings(con, ["v00000000"], -np.asarray(old_vec, np.float32)[None])
    by_old = semantic.search_vector(con, np.asarray(old_vec), k=3, method="ivf", nprobe=32)
    assert "v00000000" not in {i for i, _ in by_old}
    by_new = semantic.search_vector(con, -np.asarray(old_vec), k=1, method="ivf", nprobe=1)
    assert by_new == [("v00000000", pytest.approx(1.0))]
    exact = semantic.search_vector(con, np.asarray(old_vec), k=3, method="exact")
    assert [i for i, _ in by_old] == [i for i, _ in exact]


def test_searching_a_database_without_embeddings_says_so():
    con = duckdb.connect()
    with pytest.raises(semantic.EmbeddingsMissing, match="no embeddings"):
        semantic.search_vector(con, np.ones(semantic.DIM), k=3)


class _FixedEncoder:
    """Encodes every text as one fixed unit vector (the query path, not the model)."""

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.tile(np.eye(semantic.DIM, dtype=np.float32)[0], (len(texts), 1))


def test_semantic_query_validates_and_returns_documents_best_first():
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE identities (id TEXT PRIMARY KEY, identity_type TEXT, data JSON, "
        "created_at DOUBLE, updated_at DOUBLE, lang_axis TEXT, entropy_score DOUBLE)"
    )
    for key in ("g1", "g2"):
        con.execute(
            "INSERT INTO identities VALUES (?, 'geoid', json_object('id', ?, "
            "'identity_type', 'geoid', 'raw', ?), 0, 0, 'en', 0.5)",
            [key, key, f"text {key}"],
        )
    near, far = np.eye(semantic.DIM, dtype=np.float32)[[0, 1]]
    semantic.store_embeddings(con, ["g1", "g2"], np.vstack([0.6 * near + 0.8 * far, near]))
    page = query.search_semantic(con, _FixedEncoder(), "anything", limit=2, source="new")
    assert [h.identity.id for h in page.items] == ["g2", "g1"]
    assert [h.score for h in page.items] == pytest.approx([1.0, 0.6])
    assert "next_offset" not in page.to_dict() and "next_cursor" not in page.to_dict()
    for bad in (
        {"text": "  "},
        {"text": "x" * 257},
        {"text": "a", "limit": 0},
        {"text": "a", "limit": 51},
    ):
        with pytest.raises(query.QueryError):
            query.search_semantic(con, _FixedEncoder(), source="new", **bad)


def test_search_index_embeds_geoids_and_builds_the_index(encoder, demo_db, tmp_path):
    path = tmp_path / "embed.duckdb"
    shutil.copy(demo_db[0], path)
    result = CliRunner().invoke(cli, ["search-index", "--db", str(path), "--embed", "6"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])["semantic"]
    assert report["embedded"] == 6 and report["vectors"] == 6
    assert report["ivf_index"]["vectors"] == 6
    with duckdb.connect(str(path), read_only=True) as con:
        gid, raw = con.execute(
            "SELECT e.id, g.raw FROM kimera_embeddings e JOIN legacy_geoids g ON g.gid = e.id "
            "ORDER BY e.id LIMIT 1"
        ).fetchone()
        assert semantic.search_text(con, encoder, raw, k=1)[0][0] == gid  # through the index


def test_an_attached_database_with_an_index_does_not_pass_for_this_one(tmp_path):
    # information_schema lists attached databases too: 'auto' must look at this one only
    vectors = np.eye(semantic.DIM, dtype=np.float32)[:3]
    with duckdb.connect(str(tmp_path / "indexed.duckdb")) as other:
        semantic.store_embeddings(other, ["a", "b", "c"], vectors)
        semantic.build_ivf_index(other, lists=1)
    con = duckdb.connect(str(tmp_path / "plain.duckdb"))
    semantic.store_embeddings(con, ["x", "y"], vectors[:2])
    con.execute(f"ATTACH '{tmp_path / 'indexed.duckdb'}' AS other (READ_ONLY)")
    assert semantic.search_vector(con, vectors[1], k=1) == [("y", pytest.approx(1.0))]
