"""When two values of one identity are equal: the one comparator of every consistency path.

The verifier, shadow reads, the gates and the metrics all decide equality here, by the rules
docs/consistency.md states field by field. In short, a field is compared as the value P1
reads (``json.loads`` of the document, the legacy columns as the legacy reader gives them):

* ``raw``, ``echo``, ``lang_axis``: text, byte-exact (no trimming, no normalisation); a JSON
  value that is not a string (``2024``) never equals text (``'2024'``).
* ``weight``: numbers as doubles, equal within ``Tolerance.weight_relative`` of the legacy
  value (relative to max(1, |legacy|)); -0.0 equals 0.0, NaN equals NaN, an infinity only
  itself; a JSON value that is not a number (``"None"``) is a difference, never NULL.
* ``created_at``, ``updated_at``: epoch seconds within ``Tolerance.seconds`` (the document's
  ISO-8601 text parsed exactly as ``identity.iso_to_epoch`` parses it, or a JSON number);
  text that does not parse is a difference.
* ``tags``, ``related_ids``, ``meta``: JSON compared as values with Python's ``json.loads`` +
  ``==`` semantics: object key order does not count, a duplicate key keeps its last value (as
  ``json.loads`` reads it), array order counts, integers are exact at any size (no doubles),
  an integer equals a float only when the float is that integer (``1 == 1.0``,
  ``9007199254740993 != 9007199254740992.0``), -0.0 equals 0.0; two deviations from Python:
  ``true`` is not ``1`` (distinct JSON types never equal) and NaN equals NaN (the same
  non-number on both sides is no loss). null, a missing member and ``"None"`` all differ.
* A document member that is absent reads as null, as P1's reader (``Identity.from_document``)
  reads it; a geoid's ``related_ids`` null equals ``[]`` (legacy_geoids has no column for it).

``FIELD_RULES`` names each field's rule; the Python functions (``differing_fields``,
``json_equal``) are what shadow reads run. The verifier compares millions of rows in DuckDB,
so the same rules are stated here in SQL too: ``COMPARE_MACROS`` (text, numbers, times) and
``JSON_CANON_SQL``, which turns JSON values into canonical lists of (path, atom) so that two
values are equal exactly when their lists are (no hash decides, no double touches an
integer). tests/core/consistency/test_differential.py runs generated pairs through both
forms and an independent reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from kimera_core.identity import DOCUMENT_KEYS, Identity, created_or

COMPARED_FIELDS: tuple[str, ...] = DOCUMENT_KEYS[1:]  # every field but the key
JSON_FIELDS = frozenset({"tags", "related_ids", "meta"})
TIME_FIELDS = frozenset({"created_at", "updated_at"})
WEIGHT_FIELDS = frozenset({"weight"})

Rule = Literal["exact", "relative", "seconds", "json"]
# How each compared field is judged: text byte-exact; weight within Tolerance.weight_relative
# of the legacy value; timestamps within Tolerance.seconds; JSON as parsed values. The
# verifier's SQL (kimera_core.consistency.rows) is built from this table.
FIELD_RULES: dict[str, Rule] = {
    name: (
        "relative"
        if name in WEIGHT_FIELDS
        else "seconds"
        if name in TIME_FIELDS
        else "json"
        if name in JSON_FIELDS
        else "exact"
    )
    for name in COMPARED_FIELDS
}
MISSING_IN_NEW = "<missing in new>"
MISSING_IN_LEGACY = "<missing in legacy>"


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far two values may differ and still be equal (docs/consistency.md)."""

    # weight: |a - b| <= weight_relative * max(1, |a|)
    weight_relative: float = 1e-9
    # created_at / updated_at, in seconds: microseconds are what the P1 document carries
    seconds: float = 1e-6

    def to_dict(self) -> dict[str, float]:
        """``{"weight_relative": ..., "seconds": ...}``: echoed in reports, bound in SQL."""
        return {"weight_relative": self.weight_relative, "seconds": self.seconds}


DEFAULT_TOLERANCE = Tolerance()


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values (``json.loads`` + ``==``), except true != 1, NaN == NaN.

    Object key order is ignored; integers compare exactly, also against floats (Python's
    ``==``: ``2**53 + 1 != float(2**53)``); -0.0 == 0.0.
    """
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b or (_is_nan(a) and _is_nan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def as_double(x: Any) -> float | None:
    """A JSON number as the double it reads as (an integer beyond the double range is an
    infinity, as ``json.loads('1e400')`` is); None for anything that is not a number."""
    if not _is_number(x):
        return None
    try:
        return float(x)
    except OverflowError:
        return math.copysign(math.inf, x)


def float_equal(a: Any, b: Any, tolerance: float, relative: bool) -> bool:
    """Two numbers within ``tolerance`` (absolute, or relative to max(1, |a|)); NULL-safe.

    None equals only None; a value that is not a number (a string, a bool) equals nothing;
    NaN equals NaN; an infinity equals only itself.
    """
    if a is None or b is None:
        return a is None and b is None
    x, y = as_double(a), as_double(b)
    if x is None or y is None:
        return False
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    if x == y:
        return True
    if not (math.isfinite(x) and math.isfinite(y)):
        return False
    return abs(x - y) <= tolerance * (max(1.0, abs(x)) if relative else 1.0)


def text_equal(a: Any, b: Any) -> bool:
    """Byte-exact text, NULL-safe; a value that is not text equals no text."""
    if a is None or b is None:
        return a is None and b is None
    return isinstance(a, str) and isinstance(b, str) and a == b


def field_equal(
    name: str, a: Any, b: Any, legacy_type: str, tolerance: Tolerance = DEFAULT_TOLERANCE
) -> bool:
    """Whether field ``name`` is equal: ``a`` as legacy holds it, ``b`` as P1 reads it.

    ``legacy_type``: the legacy side's identity type ('geoid' or 'scar'), which decides the
    related_ids rule (a geoid's null equals ``[]``). Raises KeyError for an unknown field.
    """
    rule = FIELD_RULES[name]
    if rule == "relative":
        return float_equal(a, b, tolerance.weight_relative, relative=True)
    if rule == "seconds":
        return float_equal(a, b, tolerance.seconds, relative=False)
    if name == "related_ids" and legacy_type == "geoid":
        # legacy_geoids cannot hold related ids: its null stands for the empty list
        return json_equal([] if a is None else a, [] if b is None else b)
    if rule == "json":
        return json_equal(a, b)
    return text_equal(a, b)


def differing_fields(
    legacy: Identity | None, new: Identity | None, tolerance: Tolerance = DEFAULT_TOLERANCE
) -> list[str]:
    """Names of the ADR-001 fields on which two reads of one identity differ, in
    ``COMPARED_FIELDS`` order; ``[MISSING_IN_NEW]`` / ``[MISSING_IN_LEGACY]`` for a side
    without the identity."""
    if legacy is None and new is None:
        return []
    if new is None:
        return [MISSING_IN_NEW]
    if legacy is None:
        return [MISSING_IN_LEGACY]
    # the legacy timestamps as the migration writes them (a missing one takes the other's)
    legacy_values = {
        "created_at": created_or(legacy.created_at, legacy.updated_at),
        "updated_at": created_or(legacy.updated_at, legacy.created_at),
    }
    return [
        name
        for name in FIELD_RULES
        if not field_equal(
            name,
            legacy_values.get(name, getattr(legacy, name)),
            getattr(new, name),
            legacy.identity_type,
            tolerance,
        )
    ]


def compare_reads(
    legacy: Identity | list[Identity] | None,
    new: Identity | list[Identity] | None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> dict[str | None, list[str]]:
    """Differences between two answers (one identity or a list), keyed by identity id."""
    if isinstance(legacy, list) or isinstance(new, list):
        left = {i.id: i for i in legacy or []}
        right = {i.id: i for i in new or []}
        found = {}
        for key in left.keys() | right.keys():
            fields = differing_fields(left.get(key), right.get(key), tolerance)
            if fields:
                found[key] = fields
        return found
    fields = differing_fields(legacy, new, tolerance)
    if not fields:
        return {}
    return {(legacy or new).id: fields}  # type: ignore[union-attr]


# --- the same rules in SQL ----------------------------------------------------------------
# Temp macros (per connection, so they work on read-only files). A legacy value is a column
# (TEXT, DOUBLE, or JSON text); a document value is the JSON value of its member, SQL NULL
# when the member is absent. ``install_compare_macros`` creates them.
# identity.iso_to_epoch's pattern, with the ranges datetime.fromisoformat enforces that a
# DuckDB TIMESTAMP cast does not (hour 24, year 0); the cast checks the calendar date.
_ISO_RE = (
    r"^(\d{4}-\d{2}-\d{2})[T ]((?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d)(?:\.(\d+))?"
    r"(Z|[+-]\d{2}:?\d{2})?$"
)
# Macro arguments are substituted as expressions, so a value used twice is bound once with a
# one-element list_transform (else nested macros would repeat a regular expression per use).
COMPARE_MACROS: tuple[str, ...] = (
    # a JSON value that is absent or null (what P1's reader turns into None)
    """CREATE OR REPLACE TEMP MACRO kimera_json_null(j) AS
       (j IS NULL OR json_type(j) = 'NULL')""",
    # a JSON number as the double it reads as (beyond the range: an infinity); else NULL
    """CREATE OR REPLACE TEMP MACRO kimera_json_double(j) AS
       CASE WHEN json_type(j) IN ('UBIGINT', 'BIGINT', 'DOUBLE', 'HUGEINT', 'UHUGEINT')
            THEN TRY_CAST(j::VARCHAR AS DOUBLE) END""",
    # float_equal: NULL-safe, NaN = NaN, an infinity only itself (DuckDB: NaN = NaN is true)
    """CREATE OR REPLACE TEMP MACRO kimera_float_eq(a, b, tol, rel) AS
       (a IS NULL AND b IS NULL)
       OR (a IS NOT NULL AND b IS NOT NULL AND (a = b OR (isnan(a) AND isnan(b))
           OR (isfinite(a) AND isfinite(b)
               AND abs(a - b) <= tol * CASE WHEN rel THEN greatest(1, abs(a)) ELSE 1 END)))""",
    # text_equal: legacy text l against the document's JSON value n
    """CREATE OR REPLACE TEMP MACRO kimera_text_eq(l, n) AS
       CASE WHEN kimera_json_null(n) THEN l IS NULL
            ELSE l IS NOT NULL AND json_type(n) = 'VARCHAR' AND l = (n ->> '$') END""",
    # weight: legacy DOUBLE l against the document's JSON value n
    """CREATE OR REPLACE TEMP MACRO kimera_weight_eq(l, n, tol) AS
       CASE WHEN kimera_json_null(n) THEN l IS NULL
            ELSE list_transform([kimera_json_double(n)], d ->
                 l IS NOT NULL AND d IS NOT NULL AND kimera_float_eq(l, d, tol, true))[1] END""",
    # ISO-8601 text -> epoch seconds exactly as identity.iso_to_epoch: the decimal value
    # whole + 0.fraction rounded once to the nearest double (a text cast is correctly
    # rounded; before 1970 through the complement of the fraction); NULL when the text is not
    # such a timestamp or not a calendar date
    """CREATE OR REPLACE TEMP MACRO kimera_iso_value(w, f) AS
       CASE WHEN w IS NULL THEN NULL
            WHEN w >= 0 OR ltrim(f, '0') = '' THEN TRY_CAST(w::VARCHAR || '.' || f AS DOUBLE)
            WHEN length(f) <= 38 THEN -TRY_CAST((-w - 1)::VARCHAR || '.' || lpad(
                 (('1' || repeat('0', length(f)))::HUGEINT - f::HUGEINT)::VARCHAR,
                 length(f)::INTEGER, '0') AS DOUBLE)
            ELSE w + TRY_CAST('0.' || f AS DOUBLE) END""",
    f"""CREATE OR REPLACE TEMP MACRO kimera_iso_epoch_exact(x) AS
       list_transform([regexp_extract(trim(x, E' \\t\\n\\r\\x0B\\x0C'), '{_ISO_RE}',
                                      ['date', 'time', 'frac', 'tz'])], m ->
           CASE WHEN m.date = '' OR starts_with(m.date, '0000') THEN NULL
                ELSE list_transform([
                     epoch(TRY_CAST(m.date || ' ' || m.time AS TIMESTAMP))::BIGINT
                     - CASE WHEN m.tz IN ('', 'Z') THEN 0
                            ELSE (CASE WHEN starts_with(m.tz, '-') THEN -1 ELSE 1 END)
                                 * (substr(m.tz, 2, 2)::INTEGER * 3600
                                    + right(replace(m.tz, ':', ''), 2)::INTEGER * 60) END],
                     w -> kimera_iso_value(w, coalesce(nullif(m.frac, ''), '0')))[1]
           END)[1]""",
    # a document timestamp (ISO-8601 text or a JSON number) as epoch seconds; else NULL
    """CREATE OR REPLACE TEMP MACRO kimera_json_epoch(j) AS
       CASE WHEN json_type(j) = 'VARCHAR' THEN kimera_iso_epoch_exact(j ->> '$')
            ELSE kimera_json_double(j) END""",
    # created_at / updated_at: legacy DOUBLE l against the document's JSON value n
    """CREATE OR REPLACE TEMP MACRO kimera_time_eq(l, n, tol) AS
       CASE WHEN kimera_json_null(n) THEN l IS NULL
            ELSE list_transform([kimera_json_epoch(n)], e ->
                 l IS NOT NULL AND e IS NOT NULL AND kimera_float_eq(l, e, tol, false))[1] END""",
    # one JSON scalar (json_tree's type and value text) as a canonical atom: numbers by
    # value ('n' + the exact integer, or the double's shortest text when not integral),
    # strings as DuckDB writes them (one text per string), the rest by type
    """CREATE OR REPLACE TEMP MACRO kimera_json_atom(t, v) AS
       CASE WHEN t IN ('UBIGINT', 'BIGINT', 'HUGEINT', 'UHUGEINT')
                 OR (t = 'DOUBLE' AND regexp_full_match(v, '-?[0-9]+'))
                 THEN 'n' || CASE WHEN regexp_full_match(v, '-0+') THEN '0' ELSE v END
            WHEN t = 'DOUBLE' THEN
                 CASE WHEN isnan(TRY_CAST(v AS DOUBLE)) THEN 'nan'
                      WHEN NOT isfinite(TRY_CAST(v AS DOUBLE))
                           THEN CASE WHEN starts_with(v, '-') THEN '-inf' ELSE 'inf' END
                      WHEN TRY_CAST(v AS DOUBLE) = trunc(TRY_CAST(v AS DOUBLE))
                           THEN 'n' || printf('%.0f', TRY_CAST(v AS DOUBLE) + 0.0)
                      ELSE 'n' || TRY_CAST(v AS DOUBLE)::VARCHAR END
            WHEN t = 'VARCHAR' THEN 's' || v
            WHEN t = 'BOOLEAN' THEN 'b' || v
            WHEN t = 'NULL' THEN 'null'
            ELSE v END""",
)

# JSON values as canonical lists, set-based: from {values} (k BIGINT unique, j JSON text,
# valid), (k, canon) where canon is the sorted list of (path, atom) of the value's leaves
# (scalars and empty containers). A path step is a member name as JSON text or an array
# index as digits, so no two paths of different values coincide; an object member that a
# later member of the same name overrides is dropped with its subtree (json.loads keeps the
# last). Two values are equal exactly when their canon lists are.
JSON_CANON_SQL = """
WITH RECURSIVE nodes AS (
    SELECT v.k, t.id, t.parent, t.key, t.type, t.value::VARCHAR AS value
    FROM {values} v, json_tree(v.j) t
), marked AS (
    SELECT n.*, p.type AS ptype,
           coalesce(p.type = 'OBJECT'
                    AND n.id < max(n.id) OVER (PARTITION BY n.k, n.parent, n.key), false)
               AS shadowed
    FROM nodes n LEFT JOIN nodes p ON p.k = n.k AND p.id = n.parent
), paths AS (
    SELECT k, id, type, value, []::VARCHAR[] AS path FROM marked WHERE parent IS NULL
    UNION ALL
    SELECT c.k, c.id, c.type, c.value,
           list_append(p.path, CASE WHEN c.ptype = 'ARRAY' THEN c.key
                                    ELSE to_json(c.key)::VARCHAR END)
    FROM marked c JOIN paths p ON c.k = p.k AND c.parent = p.id
    WHERE NOT c.shadowed
), leaves AS (
    SELECT p.k, p.path,
           CASE WHEN p.type IN ('OBJECT', 'ARRAY') THEN p.value
                ELSE kimera_json_atom(p.type, p.value) END AS atom
    FROM paths p
    WHERE p.type NOT IN ('OBJECT', 'ARRAY') OR p.value IN ('{{}}', '[]')
)
SELECT k, list({{'path': path, 'atom': atom}} ORDER BY path, atom) AS canon
FROM leaves GROUP BY k
"""


def install_compare_macros(con: Any) -> None:
    """Create the ``COMPARE_MACROS`` on ``con`` (a DuckDB connection; temp: this one only)."""
    for macro in COMPARE_MACROS:
        con.execute(macro)
