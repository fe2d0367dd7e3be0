"""Entropy and adaptive-tau decay: the existing Kimera formulas, in two forms that agree.

The scalar functions are the reference. The bulk form (``bulk_*``) computes the same
values for a whole table or batch in one set-based DuckDB statement; migration and
statistics use it. Both follow the existing Kimera's Python (KIMERA_LEGACY.md; where and why
they still differ: docs/entropy.md):

* Geoid: if ``meta`` is an object whose ``terms`` is a list, H is the Shannon entropy in
  bits of the terms' intensities that pass Python's ``isinstance(v, (int, float))`` and
  ``v > 0``, normalised to sum 1: ``true`` counts as 1 (a bool is an int), ``false``, zero,
  negatives, NaN, strings such as ``"0.5"`` and null do not. Infinite intensities and
  integers beyond the double range are ignored too: the existing Python would turn the
  whole entropy into NaN with them, and the migration and the storage API refuse such rows
  (``non_finite_intensity``). No usable term gives H = 0. Otherwise, with n = the length of
  ``tags`` when it is a list: log2(n) if n > 1, else 0. ``meta or {}``, ``tags or []``: a
  null, empty or otherwise false value is the default.
* Scar: 0 when related_ids is not a list of at least two items; else
  log2(len(related_ids)) * weight, where a missing weight (None / SQL NULL) is 1.0 and a
  bool is 0 or 1. A non-finite or non-numeric weight makes H unknown (None / SQL NULL);
  such a scar decays with tau_0, as if H were 0 (the migration and the storage API refuse
  a non-finite weight: ``non_finite_weight``).
* tau_eff = tau_0 * (1 + k * H); decay(age) = exp(-age / tau_eff), 0 when tau_eff <= 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import duckdb
import pyarrow as pa

from kimera_core.sql import vetted_identifier

TAU_0_SECONDS = 14 * 24 * 3600  # 1,209,600 s
TAU_K = 0.1


# --- scalar reference ---------------------------------------------------------------------
def _usable_intensity(term: Any) -> float | None:
    if not isinstance(term, dict):
        return None
    value = term.get("intensity")
    if not isinstance(value, int | float):  # a bool is an int: True counts as 1
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond the double range is infinite
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return value


def shannon_entropy(values: Iterable[float]) -> float:
    """Shannon entropy in bits of positive finite weights, normalised to sum 1."""
    values = list(values)
    if not values:
        return 0.0
    # Scale by the maximum first so the sum cannot overflow to infinity.
    top = max(values)
    scaled = [x / top for x in values]
    total = sum(scaled)
    h = 0.0
    for x in scaled:
        p = x / total
        if p > 0:
            h += -p * math.log2(p)
    return h


def term_entropy(terms: list[Any]) -> float:
    """Entropy of a ``meta.terms`` list (non-usable intensities ignored)."""
    return shannon_entropy(v for v in map(_usable_intensity, terms) if v is not None)


def geoid_entropy(meta: Any, tags: Any) -> float:
    """Entropy of a geoid from its parsed ``meta`` and ``tags``."""
    if isinstance(meta, dict) and isinstance(meta.get("terms"), list):
        return term_entropy(meta["terms"])
    n = len(tags) if isinstance(tags, list) else 0
    return math.log2(n) if n > 1 else 0.0


# A scar's weight when it has none, as the existing Identity model reads it.
DEFAULT_SCAR_WEIGHT = 1.0


def scar_entropy(related_ids: Any, weight: Any) -> float | None:
    """Entropy of a scar; a missing weight is 1.0; None when the weight is not a finite number."""
    n = len(related_ids) if isinstance(related_ids, list) else 0
    if n <= 1:
        return 0.0
    if weight is None:
        weight = DEFAULT_SCAR_WEIGHT
    if not isinstance(weight, int | float):  # a bool is an int: 0 or 1
        return None
    try:
        weight = float(weight)
    except OverflowError:  # an integer beyond the double range
        return None
    weight = float(weight)
    if not math.isfinite(weight):
        return None
    return math.log2(n) * weight


def _parse_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def geoid_entropy_json(meta_json: str | None, tags_json: str | None) -> float:
    """geoid_entropy over the JSON text of the legacy columns (unparseable text = absent)."""
    return geoid_entropy(_parse_json(meta_json), _parse_json(tags_json))


def scar_entropy_json(related_ids_json: str | None, weight: float | None) -> float | None:
    """scar_entropy over the JSON text of legacy_scars.related_ids; None as scar_entropy.

    P1's public API: the existing system's scar formula (docs/entropy.md) over the legacy
    column's text, the twin of ``geoid_entropy_json``. P1's own code computes entropy in bulk
    (``scar_entropy_sql``); the tests check that SQL against this reference.
    """
    return scar_entropy(_parse_json(related_ids_json), weight)


def identity_entropy(identity: Any) -> float | None:
    """Entropy of an ``Identity`` by its type."""
    if identity.identity_type == "scar":
        return scar_entropy(identity.related_ids, identity.weight)
    return geoid_entropy(identity.meta, identity.tags)


def effective_tau(entropy: float | None, tau_0: float = TAU_0_SECONDS, k: float = TAU_K) -> float:
    """Adaptive tau in seconds: tau_0 * (1 + k * H); unknown H counts as 0."""
    h = 0.0 if entropy is None else entropy
    return tau_0 * (1 + k * h)


def decay_factor(age_seconds: float, tau_eff: float) -> float:
    """exp(-age / tau_eff), ages and tau in seconds; 0 when tau_eff <= 0.

    A negative age (clock skew) counts as 0; a NaN age or tau raises ValueError. P1's public
    API: the existing system's decay formula (docs/entropy.md), kept for callers that decay
    an item; P1's own code does not call it (its tests check the formula).
    """
    if math.isnan(age_seconds) or math.isnan(tau_eff):
        raise ValueError("age and tau must not be NaN")
    if tau_eff <= 0:
        return 0.0
    return math.exp(-max(age_seconds, 0.0) / tau_eff)


# --- bulk form (DuckDB, set-based) ------------------------------------------------------
# An intensity's JSON text (as json_extract writes it: minified) that passes Python's
# isinstance(v, (int, float)) as a double: a number (it starts with '-' or a digit; one beyond
# the double range casts to an infinity, which the filter drops) or true (a bool is an int:
# 1.0); false, strings, null, lists and objects are NULL. Reading the text, not json_type and
# a JSON cast, saves two parses per term.
_INTENSITY_SQL = (
    "CASE WHEN x = 'true' THEN 1.0 "
    "WHEN x[1] IN ('-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9') "
    "THEN TRY_CAST(x AS DOUBLE) END"
)

# The first stage reads meta once for its terms' intensities; TRY turns text that is not JSON
# (old files, VARCHAR batches) into NULL. json_array_length is 0 for a value that is not a
# list. Migration reuses the later stages over columns it parsed itself (geoid_shannon_sql).
GEOID_PARSE_SQL = """
SELECT {key} AS key, {meta} AS meta, TRY(json_array_length({tags})) AS n_tags
FROM {source}
"""

# From {parsed}, a relation with columns key and n_tags and the column {src}: {intens} (SQL
# over {src}) is the list of the `intensity` members of meta.terms' items (JSON); {is_list}
# (SQL over kimera_src) whether meta.terms is a list, read only for rows with no intensity
# (an intensity means a list; otherwise a list without usable terms gives 0, anything else
# the tags' formula). Each stage is its own projection so every JSON value is parsed once,
# and meta.terms' type a second time only where the intensities cannot tell it.
GEOID_SHANNON_SQL = f"""
WITH kimera_intens AS (
    SELECT key, n_tags, {{src}} AS kimera_src, {{intens}} AS intens FROM {{parsed}}
), kimera_terms AS (
    SELECT key, n_tags, kimera_src, len(intens) > 0 AS listed,
           list_filter(list_transform(intens::VARCHAR[], x -> {_INTENSITY_SQL}),
                       x -> x > 0 AND isfinite(x)) AS v
    FROM kimera_intens
), kimera_scaled AS (
    SELECT key, listed, kimera_src, n_tags, list_transform(v, x -> x / list_max(v)) AS s
    FROM kimera_terms
), kimera_summed AS (
    SELECT key, listed, kimera_src, n_tags, s, list_sum(s) AS total FROM kimera_scaled
)
SELECT key,
       CASE WHEN listed THEN
                CASE WHEN len(s) = 0 THEN 0.0
                     ELSE list_sum(list_transform(s, x ->
                              CASE WHEN x / total > 0 THEN -(x / total) * log2(x / total)
                                   ELSE 0.0 END))
                END
            WHEN n_tags > 1 AND NOT coalesce({{is_list}}, false) THEN log2(n_tags)
            ELSE 0.0
       END::DOUBLE AS entropy
FROM kimera_summed
"""

# A NULL weight is DEFAULT_SCAR_WEIGHT (1.0), as the existing Identity model reads it.
SCAR_ENTROPY_SQL = f"""
WITH src AS (
    SELECT {{key}} AS key,
           coalesce(TRY(CASE WHEN json_type({{related}}) = 'ARRAY'
                             THEN json_array_length({{related}}) END), 0) AS n,
           coalesce({{weight}}, {DEFAULT_SCAR_WEIGHT!r}) AS w
    FROM {{source}}
)
SELECT key,
       CASE WHEN n <= 1 THEN 0.0
            WHEN NOT isfinite(w) THEN NULL
            ELSE log2(n) * w
       END::DOUBLE AS entropy
FROM src
"""

TAU_SQL = """
SELECT key, entropy,
       (? * (1 + ? * coalesce(entropy, 0.0)))::DOUBLE AS tau_eff
FROM ({inner})
"""


def geoid_entropy_sql(
    source: str = "legacy_geoids", key: str = "gid", meta: str = "meta", tags: str = "tags"
) -> str:
    """The bulk geoid-entropy query over a table or view (vetted identifiers only)."""
    parse = GEOID_PARSE_SQL.format(
        source=vetted_identifier(source),
        key=vetted_identifier(key),
        meta=vetted_identifier(meta),
        tags=vetted_identifier(tags),
    )
    shannon = geoid_meta_shannon_sql("kimera_parsed")
    return f"WITH kimera_parsed AS ({parse}) SELECT * FROM ({shannon})"


def geoid_meta_shannon_sql(parsed: str) -> str:
    """Geoid entropy from a relation (table or CTE) with columns key, meta (the JSON value,
    NULL when it is not JSON) and n_tags (the length of tags when it is a list, else 0 or
    NULL): (key, entropy). meta is parsed once (twice where meta.terms holds no intensity)."""
    return GEOID_SHANNON_SQL.format(
        parsed=vetted_identifier(parsed),
        src="meta",
        intens="TRY(json_extract(meta, '$.terms[*].intensity'))",
        is_list="TRY(json_type(kimera_src, '$.terms')) = 'ARRAY'",
    )


def geoid_shannon_sql(parsed: str) -> str:
    """Geoid entropy from a relation (table or CTE) with columns key, terms_j (meta.terms as
    json_extract gives it, NULL when absent) and n_tags: (key, entropy)."""
    return GEOID_SHANNON_SQL.format(
        parsed=vetted_identifier(parsed),
        src="terms_j",
        intens="TRY(json_extract(terms_j, '$[*].intensity'))",
        is_list="TRY(json_type(kimera_src)) = 'ARRAY'",
    )


def scar_entropy_sql(
    source: str = "legacy_scars",
    key: str = "id",
    related: str = "related_ids",
    weight: str = "weight",
) -> str:
    """The bulk scar-entropy query over a table or view (vetted identifiers only)."""
    return SCAR_ENTROPY_SQL.format(
        source=vetted_identifier(source),
        key=vetted_identifier(key),
        related=vetted_identifier(related),
        weight=f"TRY_CAST({vetted_identifier(weight)} AS DOUBLE)",
    )


def entropy_union_sql(geoid_sql: str, scar_sql: str) -> str:
    """(key, entropy) of geoids and scars in one relation: the two bulk queries, UNION ALL."""
    return f"SELECT * FROM ({geoid_sql}) UNION ALL SELECT * FROM ({scar_sql})"


def _with_tau(con: duckdb.DuckDBPyConnection, inner: str, tau_0: float, k: float) -> pa.Table:
    result = con.execute(TAU_SQL.format(inner=inner), [tau_0, k])
    if hasattr(result, "to_arrow_table"):  # duckdb >= 1.5
        return result.to_arrow_table()
    return result.fetch_arrow_table()


def entropy_table_sql(kind: str, source: str | None = None, key: str | None = None) -> str:
    """SELECT key, entropy, tau_eff for a geoid or scar table, with two parameters (tau_0, k).

    For use inside larger set-based statements (CREATE TABLE AS, INSERT ... SELECT).
    """
    if kind == "geoid":
        inner = geoid_entropy_sql(source or "legacy_geoids", key or "gid")
    elif kind == "scar":
        inner = scar_entropy_sql(source or "legacy_scars", key or "id")
    else:
        raise ValueError(f"kind must be 'geoid' or 'scar', got {kind!r}")
    return TAU_SQL.format(inner=inner)


def bulk_geoid_entropy(
    con: duckdb.DuckDBPyConnection,
    source: str = "legacy_geoids",
    *,
    key: str = "gid",
    tau_0: float = TAU_0_SECONDS,
    k: float = TAU_K,
) -> pa.Table:
    """Entropy and effective tau for every row of a geoid table/view: columns key, entropy, tau_eff."""
    return _with_tau(con, geoid_entropy_sql(source, key), tau_0, k)


def bulk_scar_entropy(
    con: duckdb.DuckDBPyConnection,
    source: str = "legacy_scars",
    *,
    key: str = "id",
    tau_0: float = TAU_0_SECONDS,
    k: float = TAU_K,
) -> pa.Table:
    """Entropy and effective tau for every row of a scar table/view: columns key, entropy, tau_eff."""
    return _with_tau(con, scar_entropy_sql(source, key), tau_0, k)


# Fixed histogram bucket upper bounds in bits (Prometheus ``le`` semantics). Edges sit where
# the formulas put mass and alerts look: 0 (no information), 1 (two equal terms), log2(3),
# 2 (four equal terms), log2(6) (six equal terms, the usual maximum), and beyond.
ENTROPY_BUCKETS_BITS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
