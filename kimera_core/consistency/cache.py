"""The digest cache ``kimera_verify_digests``: per source table and fine segment, the sums a
verification computed, sealed with the recipe they were computed under.

An entry holds, for the rows of one table in one fine segment (``segments.FINE_BITS``):
``rows``, ``fingerprint_sum`` (a mixed ``hash()`` of the key and every stored column, read
verbatim, nothing parsed), ``digest_sum`` (the fast digests: for a legacy table the
``identities`` row the migration writes for each row, ``expected``; for ``identities`` its
fingerprint), ``normal_sum`` (the normalised digests of ``sources``, NULL when the segment
was never compared by them) and ``column_mismatches`` (``identities`` rows whose columns
disagree with their document; 0 for the legacy tables). The seal is
``hash(recipe, store, segment, rows, fingerprint_sum, digest_sum, column_mismatches,
normal_sum)``.

Every verification fingerprints every row afresh; a segment takes its cached sums only when
its row count and fingerprint sum equal the entry's and the seal holds, so rows changed by
any writer since are digested again (docs/consistency.md gives the argument). An entry is
written only with sums of the same rows computed in this run or taken from a sealed entry of
the same rows; a table's entries change in one transaction.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterator

import duckdb

from kimera_core.db import is_served, setting_within

DIGESTS_DDL = """CREATE TABLE IF NOT EXISTS kimera_verify_digests (
    store TEXT NOT NULL,            -- the source table: legacy_geoids, legacy_scars, identities
    segment UBIGINT NOT NULL,       -- hash(key) >> (64 - FINE_BITS)
    rows BIGINT NOT NULL,           -- rows in the segment
    fingerprint_sum HUGEINT NOT NULL,  -- sum of the rows' fingerprints (stored columns, verbatim)
    digest_sum HUGEINT NOT NULL,    -- sum of the rows' fast digests (the expected identities row)
    seal UBIGINT NOT NULL,          -- hash(recipe, store, segment, rows, fingerprint_sum,
                                    --      digest_sum, column_mismatches, normal_sum)
    column_mismatches BIGINT,       -- identities rows whose columns disagree with the document
    normal_sum HUGEINT              -- sum of the rows' normalised digests, when computed
)"""
# A cache of an older layout gains the columns; its entries fail the seal (another recipe).
DIGESTS_UPGRADE_SQL: tuple[str, ...] = (
    "ALTER TABLE kimera_verify_digests ADD COLUMN IF NOT EXISTS column_mismatches BIGINT",
    "ALTER TABLE kimera_verify_digests ADD COLUMN IF NOT EXISTS normal_sum HUGEINT",
)
LAYOUT_SQL = """
SELECT count(*) FILTER (WHERE column_name = 'normal_sum'), count(*)
FROM information_schema.columns
WHERE table_catalog = current_database() AND table_schema = 'main'
  AND table_name = 'kimera_verify_digests'
"""
# The seal of an entry, over its row of kimera_verify_digests ($recipe: the run's).
SEAL = (
    "hash($recipe, store, segment, rows, fingerprint_sum, digest_sum, column_mismatches, "
    "normal_sum)"
)
# The cached sums of each segment of {fp} (seg, n, fsum) whose rows and fingerprint sum are
# unchanged: an entry counts only if its seal holds.
LOOKUP_SQL = f"""
SELECT f.seg, f.n, f.fsum, c.digest_sum AS xsum, c.normal_sum AS nsum, c.column_mismatches AS bad,
       c.segment IS NOT NULL AS hit
FROM {{fp}} f LEFT JOIN (
    SELECT segment, rows, fingerprint_sum, digest_sum, normal_sum, column_mismatches
    FROM kimera_verify_digests WHERE store = $store AND seal = {SEAL}) c
ON f.seg = c.segment AND f.n = c.rows AND f.fsum = c.fingerprint_sum
"""
STATS_SQL = f"""
SELECT store, count(*) AS entries, count(*) FILTER (WHERE seal = {SEAL}) AS sealed
FROM kimera_verify_digests GROUP BY store
"""
# Keep only the store's sealed entries of {table}'s segments that are not ``dirty`` (about to
# be rewritten): stale, rejected and emptied segments go; with {all}, every entry goes.
PRUNE_SQL = f"""
DELETE FROM kimera_verify_digests WHERE store = $store AND ({{all}}
    OR seal IS DISTINCT FROM {SEAL}
    OR segment NOT IN (SELECT seg FROM {{table}} WHERE NOT dirty))
"""
WRITE_SQL = """
INSERT INTO kimera_verify_digests
    (store, segment, rows, fingerprint_sum, digest_sum, seal, column_mismatches, normal_sum)
SELECT $store, seg, n, fsum, xsum, hash($recipe, $store, seg, n, fsum, xsum, bad, nsum), bad, nsum
FROM {table} WHERE {which}
"""


def recipe(base: str, variant: object) -> str:
    """The recipe of this run: ``base`` (the module's SQL, macros, widths and DuckDB version)
    and the ``variant`` the SQL was built for (e.g. which legacy columns are typed JSON)."""
    return hashlib.sha256(json.dumps([base, repr(variant)]).encode()).hexdigest()


def base_recipe(parts: dict[str, object]) -> str:
    """sha256 of ``parts`` (JSON): what a cached sum was computed with."""
    return hashlib.sha256(
        json.dumps({"duckdb": duckdb.__version__, **parts}, default=repr).encode()
    ).hexdigest()


def writable(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether ``con``'s own database accepts writes."""
    row = con.execute(
        "SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    return row is not None and not row[0]


def ready(con: duckdb.DuckDBPyConnection, can_write: bool) -> bool:
    """Whether the cache exists in the current layout (an older one is upgraded when the
    connection is writable, else not used)."""
    current, columns = con.execute(LAYOUT_SQL).fetchone()
    if current:
        return True
    if not (columns and can_write):
        return False
    for statement in DIGESTS_UPGRADE_SQL:
        con.execute(statement)
    return True


def stats(con: duckdb.DuckDBPyConnection, run_recipe: str) -> dict[str, tuple[int, int]]:
    """Per store: (entries, entries whose seal holds)."""
    rows = con.execute(STATS_SQL, {"recipe": run_recipe}).fetchall()
    return {store: (int(n), int(sealed)) for store, n, sealed in rows}


def lookup_sql(fp: str) -> str:
    """SQL (parameters: ``params``) for each segment of ``fp`` (a table or a parenthesised
    query of our own: seg, n, fsum) with its sealed cached sums, NULL where there is none
    (``hit`` false)."""
    return LOOKUP_SQL.format(fp=fp)


def params(store: str, run_recipe: str) -> dict[str, str]:
    """The parameters of ``lookup``'s SQL and of ``persist``."""
    return {"store": store, "recipe": run_recipe}


def create(con: duckdb.DuckDBPyConnection) -> None:
    """Create kimera_verify_digests in the current layout (an older one gains the columns)."""
    con.execute(DIGESTS_DDL)
    for statement in DIGESTS_UPGRADE_SQL:
        con.execute(statement)


def persist(
    con: duckdb.DuckDBPyConnection,
    store: str,
    table: str,
    run_recipe: str,
    everything: bool,
    created: bool = False,
) -> int:
    """Make the store's entries those of the temp table ``table`` (seg, n, fsum, xsum, nsum,
    bad, dirty): rewrite its ``dirty`` rows (all with ``everything``), keep sealed entries of
    its other rows, drop the rest; returns the entries written. Called inside the
    verification's transaction, which makes the change atomic. ``created``: ``create`` ran
    already in this transaction."""
    if not created:
        create(con)
    bound = params(store, run_recipe)
    # inside the verification's transaction (its snapshot), which makes these two atomic
    con.execute(PRUNE_SQL.format(table=table, all="true" if everything else "false"), bound)
    which = "true" if everything else "dirty"
    return con.execute(WRITE_SQL.format(table=table, which=which), bound).fetchone()[0]


# DuckDB's buffer pool limit while a warm run's fingerprint passes read every block: a fresh
# process then recycles the memory of blocks already hashed instead of faulting in new pages
# for every block it loads (identities, 1 M rows, 370 MB of blocks: 93 k page faults -> 34 k,
# 0.1 CPU-s of kernel time less).
SCAN_MEMORY_LIMIT = 128 * 2**20
MEMORY_LIMIT_SQL = "SELECT current_setting('memory_limit')"
MEMORY_USED_SQL = "SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()"


@functools.cache
def _default_memory_limit() -> str:
    """DuckDB's default memory_limit as it prints it (that of a fresh in-memory database)."""
    with duckdb.connect() as fresh:
        return fresh.execute(MEMORY_LIMIT_SQL).fetchone()[0]


@contextlib.contextmanager
def recycled_buffers(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Within the block DuckDB's memory_limit is ``SCAN_MEMORY_LIMIT`` (or what the database
    already holds plus half of it, so no block has to be evicted for the SET); ``RESET`` after.

    For a statement that streams every block of a table through a small aggregate (the
    fingerprint pass), nothing else. Only on an embedded database whose limit is DuckDB's
    default (which RESET sets again exactly): through a database server the setting would act
    on every client, and a limit its caller chose is left alone. If the block raises, the
    RESET is tried and its own failure ignored.
    """
    if is_served(con) or con.execute(MEMORY_LIMIT_SQL).fetchone()[0] != _default_memory_limit():
        yield
        return
    held = int(con.execute(MEMORY_USED_SQL).fetchone()[0])
    limit = max(SCAN_MEMORY_LIMIT, held + SCAN_MEMORY_LIMIT // 2)
    with setting_within(con, f"SET memory_limit = '{int(limit)}B'", "RESET memory_limit"):
        yield
