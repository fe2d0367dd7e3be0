"""Semantic search on 100 k geoids: the embedding rate, then exact vs IVF search, p50 / recall.

    python bench/bench_semantic.py embed [--minutes 30]   # time-boxed, resumable
    python bench/bench_semantic.py search [--queries 100]

``embed`` copies 100,000 geoids (id order) of the query benchmark's database
(bench/bench_query.py builds it) into var/bench/semantic.duckdb and embeds them with the
real all-MiniLM-L6-v2 (kimera_core.semantic, numpy) until done or out of time; a rerun
continues. ``search`` times cosine search over the real vectors (exact scan vs the IVF
index, recall@10 of the index against the exact answer, queries embedded from held-out
geoid texts), and over 100,000 random unit vectors (the latency at full size when fewer
real vectors exist). OpenBLAS runs one thread: on 2 shared cores its spinning threads made
encoding ten times slower. Prints JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import duckdb  # noqa: E402
import numpy as np  # noqa: E402

from kimera_core import semantic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "var" / "bench" / "query_1m.duckdb"
TARGET = ROOT / "var" / "bench" / "semantic.duckdb"
ROWS = 100_000


def prepare(con: duckdb.DuckDBPyConnection) -> None:
    if con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_catalog = current_database() "
        "AND table_schema = 'main' AND table_name = 'identities'"
    ).fetchone()[0]:
        return
    con.execute(f"ATTACH '{SOURCE}' AS src (READ_ONLY)")  # a fixed path of this script
    con.execute(
        "CREATE TABLE identities AS SELECT * FROM src.identities "
        "WHERE identity_type = 'geoid' ORDER BY id LIMIT ?",
        [ROWS],
    )
    con.execute("DETACH src")


def embed(minutes: float, batch: int) -> dict:
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(TARGET))
    prepare(con)
    encoder = semantic.Encoder()
    con.execute(semantic.EMBEDDINGS_DDL)
    before = con.execute("SELECT count(*) FROM kimera_embeddings").fetchone()[0]
    t0 = time.perf_counter()
    done = 0
    while time.perf_counter() - t0 < minutes * 60:
        n = semantic.embed_geoids(con, encoder, limit=batch)
        if n == 0:
            break
        done += n
        con.execute("CHECKPOINT")
    seconds = time.perf_counter() - t0
    total = con.execute("SELECT count(*) FROM kimera_embeddings").fetchone()[0]
    con.close()
    return {
        "embedded_now": done,
        "seconds": round(seconds, 1),
        "texts_per_second": round(done / seconds, 1) if seconds else None,
        "embedded_total": total,
        "embedded_before": before,
        "rows": ROWS,
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(pct(ms, 0.99), 2)}


def exact_vs_index(
    con: duckdb.DuckDBPyConnection, queries: np.ndarray, nprobes: tuple[int, ...]
) -> dict:
    """Each query exact then through the index (side by side); recall@10 against exact."""
    exact: list[float] = []
    ivf: dict[int, list[float]] = {n: [] for n in nprobes}
    recall: dict[int, list[float]] = {n: [] for n in nprobes}
    for v in queries:
        t = time.perf_counter()
        truth = {h[0] for h in semantic.search_vector(con, v, k=10, method="exact")}
        exact.append((time.perf_counter() - t) * 1000)
        for n in nprobes:
            t = time.perf_counter()
            got = semantic.search_vector(con, v, k=10, method="ivf", nprobe=n)
            ivf[n].append((time.perf_counter() - t) * 1000)
            recall[n].append(len(truth & {h[0] for h in got}) / 10)
    out: dict = {"queries": len(queries), "exact": summary(exact)}
    for n in nprobes:
        out[f"ivf_nprobe_{n}"] = {
            **summary(ivf[n]),
            "recall_at_10": round(statistics.mean(recall[n]), 3),
            "exact_over_ivf_p50": round(statistics.median(exact) / statistics.median(ivf[n]), 1),
        }
    return out


def search(queries: int, nprobes: tuple[int, ...] = (4, 8, 16)) -> dict:
    con = duckdb.connect(str(TARGET))
    real = con.execute("SELECT count(*) FROM kimera_embeddings").fetchone()[0]
    encoder = semantic.Encoder()
    # queries: texts of geoids that were not embedded (held out), encoded one at a time
    texts = [
        r[0]
        for r in con.execute(
            "SELECT data->>'$.raw' FROM identities WHERE id NOT IN "
            "(SELECT id FROM kimera_embeddings) AND (data->>'$.raw') <> '' "
            "ORDER BY hash(id) LIMIT ?",
            [queries],
        ).fetchall()
    ]
    encode_ms, vectors = [], []
    for text in texts:
        t = time.perf_counter()
        vectors.append(encoder.encode([text])[0])
        encode_ms.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    info = semantic.build_ivf_index(con)
    build_s = time.perf_counter() - t
    out: dict = {
        "duckdb": duckdb.__version__,
        "query_encode": summary(encode_ms),
        "real": {
            "vectors": real,
            "index": info,
            "index_build_s": round(build_s, 1),
            **exact_vs_index(con, np.array(vectors), nprobes),
        },
    }
    con.close()
    # the same searches at full size over random unit vectors (the cost ignores the text)
    mem = duckdb.connect()
    t = time.perf_counter()
    semantic.load_random_embeddings(mem, ROWS, seed=5)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    info = semantic.build_ivf_index(mem)
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(9)
    random_queries = rng.standard_normal((queries, semantic.DIM)).astype(np.float32)
    out["random"] = {
        "vectors": ROWS,
        "load_s": round(load_s, 1),
        "index": info,
        "index_build_s": round(build_s, 1),
        **exact_vs_index(mem, random_queries, nprobes),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--minutes", type=float, default=30)
    e.add_argument("--batch", type=int, default=512)
    s = sub.add_parser("search")
    s.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    out = embed(args.minutes, args.batch) if args.command == "embed" else search(args.queries)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
