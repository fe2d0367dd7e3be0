"""SQL helpers: vetted identifiers, the P1 document's layout, and the one epoch -> ISO-8601
formula in SQL.

Values are always bound parameters; identifiers pass through ``vetted_identifier``;
``table_exists`` asks the catalog about this connection's own database only.
``p1_document_sql`` is the only SQL spelling of the P1 document (``json_object`` in
``identity.DOCUMENT_KEYS`` order).

``EPOCH_ISO_MACROS`` is the only SQL that turns epoch seconds into the P1 document's
ISO-8601 text; ``identity.epoch_to_iso`` is the Python reference and both write the same
text. The macros give NULL where SQL cannot write that text exactly (below); a caller
formats those few epochs with ``epoch_to_iso`` through ``epoch_iso_fixes`` and writes
``epoch_iso_sql(column, fixes=True)``, so every epoch gets the reference text.

``VALUE_MACROS`` are the value rules the migration and the batch write path share, each the
SQL twin of a Python rule: ``kimera_py_strip`` is ``str.strip`` (``identity.PY_WHITESPACE``;
DuckDB's ``trim`` strips the Unicode spaces but not tab or line ends, RE2's ``\\s`` only ASCII),
``kimera_epoch_in_range`` is ``identity.epoch_in_range``, ``kimera_json_non_finite`` finds the
numbers ``identity.value_refusals`` calls non-finite (``kimera_terms_non_finite`` the
intensities among them), and ``kimera_json_falsy`` is Python's
truth test of a parsed JSON value (``meta or {}``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import duckdb
import pyarrow as pa

from kimera_core.identity import DOCUMENT_KEYS, EPOCH_END, EPOCH_MIN, PY_WHITESPACE, epoch_to_iso

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def vetted_identifier(name: str) -> str:
    """A quoted SQL identifier, refusing anything but a plain name."""
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return f'"{name}"'


def p1_document_sql(**column_exprs: str) -> str:
    """The P1 JSON document in SQL: ``json_object`` with its keys in ``DOCUMENT_KEYS`` order.

    ``column_exprs`` maps every key of ``identity.DOCUMENT_KEYS`` to the caller's fixed SQL
    expression for its value (never user input), e.g. ``id="g.gid"``, ``raw="NULL"``,
    ``created_at=epoch_iso_sql("g.created_at")``. Every writer of P1 documents in SQL (the
    migration, the batch write path, the demo data) builds its document here, so the key
    order is stated once. Raises ``ValueError`` when a key is missing or unknown.
    """
    missing = [k for k in DOCUMENT_KEYS if k not in column_exprs]
    unknown = sorted(set(column_exprs) - set(DOCUMENT_KEYS))
    if missing or unknown:
        raise ValueError(f"P1 document keys: missing {missing}, unknown {unknown}")
    pairs = ", ".join(f"'{k}', {column_exprs[k]}" for k in DOCUMENT_KEYS)
    return f"json_object({pairs})"


def p1_scar_document_sql(
    *, id: str, weight: str, related_ids: str, meta: str, created_at: str, updated_at: str
) -> str:
    """A scar's P1 document (``p1_document_sql``): raw, echo, lang_axis and tags are null."""
    return p1_document_sql(
        id=id,
        identity_type="'scar'",
        raw="NULL",
        echo="NULL",
        lang_axis="NULL",
        tags="NULL",
        weight=weight,
        related_ids=related_ids,
        meta=meta,
        created_at=created_at,
        updated_at=updated_at,
    )


# Catalog views list attached databases too: only this connection's own main schema counts.
TABLE_EXISTS_SQL = """
SELECT count(*) > 0 FROM information_schema.tables
WHERE table_catalog = current_database() AND table_schema = 'main' AND table_name = ?
"""


def table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """Whether this database's main schema holds ``table`` (attached databases do not count)."""
    return bool(con.execute(TABLE_EXISTS_SQL, [table]).fetchone()[0])


# --- epoch seconds -> the P1 ISO-8601 text, in SQL -----------------------------------------
# identity.epoch_to_iso writes whole seconds from the calendar, then the fraction digits of the
# float's shortest repr padded to six. These temp macros compute the same text in SQL wherever
# that is exact, and NULL elsewhere; callers format the NULL rows with epoch_to_iso in Python.
#  * micro: |t| < 2**32 and t is the double of a whole number of microseconds. There one
#    double per microsecond exists, so the shortest repr has at most six fraction digits and
#    the microsecond timestamp formats them exactly (also before 1970). Cheap: no text.
#  * digits: 0 <= t < 1e11 written without an exponent; the whole and fraction digits are
#    taken from DuckDB's shortest round-trip text of t, the same digits as Python's repr.
#    Only rows the first test rejects pay for the text cast (CASE runs branches selectively).
EPOCH_ISO_MACROS: tuple[str, ...] = (
    # rpad would cut a longer fraction to six digits: pad only
    """CREATE OR REPLACE TEMP MACRO kimera_iso_pad6(f) AS (
        f || repeat('0', greatest(0, 6 - length(f)))
    )""",
    """CREATE OR REPLACE TEMP MACRO kimera_iso_micro_exact(t) AS (
        abs(t) < 4294967296 AND round(t * 1000000) / 1000000 = t
    )""",
    """CREATE OR REPLACE TEMP MACRO kimera_iso_digits_exact(t) AS (
        t >= 0 AND t < 1e11 AND NOT contains(CAST(t AS VARCHAR), 'e')
    )""",
    # CASE, not OR: only rows the cheap test rejects are cast to text
    """CREATE OR REPLACE TEMP MACRO kimera_epoch_iso_exact(t) AS (
        CASE WHEN kimera_iso_micro_exact(t) THEN true
             ELSE coalesce(kimera_iso_digits_exact(t), false) END
    )""",
    """CREATE OR REPLACE TEMP MACRO kimera_epoch_iso(t) AS (
        CASE WHEN kimera_iso_micro_exact(t) THEN
                 strftime(make_timestamp(CAST(round(t * 1000000) AS BIGINT)),
                          '%Y-%m-%dT%H:%M:%S.%f') || '+00:00'
             WHEN kimera_iso_digits_exact(t) THEN
                 strftime(make_timestamp(CAST(split_part(CAST(t AS VARCHAR), '.', 1) AS BIGINT)
                                         * 1000000), '%Y-%m-%dT%H:%M:%S')
                 || '.' || kimera_iso_pad6(rtrim(split_part(CAST(t AS VARCHAR), '.', 2), '0'))
                 || '+00:00'
        END
    )""",
)


def install_epoch_iso_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create (or replace) the connection's temp macros of ``EPOCH_ISO_MACROS``."""
    for macro in EPOCH_ISO_MACROS:
        con.execute(macro)


# The registered view of ``epoch_iso_fixes``, one row per epoch; its column names are unlikely
# to shadow the caller's column inside the lookup subquery.
EPOCH_ISO_FIXES = "kimera_epoch_iso_fixes"

_FIXES_SQL = """
SELECT DISTINCT kimera_epoch FROM ({epochs}) AS kimera_epochs(kimera_epoch)
WHERE isfinite(kimera_epoch) AND NOT kimera_epoch_iso_exact(kimera_epoch)
"""


def filled_times_sql(alias: str = "") -> tuple[str, str]:
    """SQL for the ``(created_at, updated_at)`` a legacy row migrates with: a missing one
    takes the other's value (docs/migration.md, warnings ``null_created_at`` /
    ``null_updated_at``; both missing is the quarantine reason ``missing_timestamps``).
    ``alias``: the legacy table's alias in the caller's query, or "" for none. The Python form
    is ``kimera_core.identity.created_or`` (used by ``compare.differing_fields``)."""
    if alias and not _IDENT_RE.match(alias):
        raise ValueError(f"not a plain SQL alias: {alias!r}")
    prefix = f"{alias}." if alias else ""
    created, updated = f"{prefix}created_at", f"{prefix}updated_at"
    return f"coalesce({created}, {updated})", f"coalesce({updated}, {created})"


def epoch_iso_sql(column: str, *, fixes: bool = False) -> str:
    """SQL for the ISO-8601 text of the epoch-seconds expression ``column``.

    ``column`` is a fixed SQL expression of the caller, never user input. With ``fixes``
    the epochs the macros leave NULL are looked up in the view ``epoch_iso_fixes``
    registered (a join, so callers use it only when that view exists).
    """
    macro = f"kimera_epoch_iso({column})"
    if not fixes:
        return macro
    lookup = f"SELECT kimera_iso FROM {EPOCH_ISO_FIXES} WHERE kimera_epoch = {column}"
    return f"coalesce({macro}, ({lookup}))"


def _iso_or_none(epoch: float) -> str | None:
    try:
        return epoch_to_iso(epoch)
    except OverflowError:  # beyond the years 1-9999 that ISO-8601 text can hold
        return None


@contextlib.contextmanager
def epoch_iso_fixes(
    con: duckdb.DuckDBPyConnection, epochs_sql: str, params: Mapping[str, Any] | None = None
) -> Iterator[bool]:
    """Register ``EPOCH_ISO_FIXES`` for the epochs of ``epochs_sql`` the macros cannot write.

    ``epochs_sql`` is a fixed query of one DOUBLE column (the caller's, with ``params``).
    Yields True while the view (kimera_epoch, kimera_iso: its ``identity.epoch_to_iso``
    text, NULL past the year 9999) is registered; False when the macros write every finite
    epoch (then nothing is registered). Needs ``install_epoch_iso_macros``. There are
    usually none or a few: epochs before 1970 with more than six fraction digits, epochs
    of 1e11 s and later, tiny fractions that are written with an exponent.
    """
    found = con.execute(_FIXES_SQL.format(epochs=epochs_sql), params).fetchall()
    epochs = [row[0] for row in found]
    if not epochs:
        yield False
        return
    fixes = pa.table(
        {
            "kimera_epoch": pa.array(epochs, pa.float64()),
            "kimera_iso": pa.array([_iso_or_none(t) for t in epochs], pa.string()),
        }
    )
    con.register(EPOCH_ISO_FIXES, fixes)
    try:
        yield True
    finally:
        con.unregister(EPOCH_ISO_FIXES)


# --- value rules shared by the migration and the batch write path ------------------------
# Numbers a JSON text holds that are not finite doubles: NaN, Infinity, floats beyond the
# double range (1e999). Integers of any size are exact JSON and pass. The text test is cheap
# and rules out almost every value (a double overflows only with an exponent of two digits
# or 300 digits or more); only the rest has its strings blanked and its number tokens cast
# (CASE runs the branch only for them).
_NON_FINITE_HINT = r"(?i)nan|inf|[0-9]e\+?[0-9]{2}|[0-9]{300}"
_JSON_STRING = r'"(?:[^"\\]|\\.)*"'
_NUMBER_LEXEME = r"(?i)-?(?:nan|infinity|inf|[0-9][0-9.e+-]*)"
# RE2 class of the str.strip characters, for a test that needs no stripped copy
_PY_WHITESPACE_CLASS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE) + "]"
VALUE_MACROS: tuple[str, ...] = (
    # trim with a character set costs twice a plain trim; an anchored test skips most rows
    f"""CREATE OR REPLACE TEMP MACRO kimera_py_strip(s) AS (
        CASE WHEN regexp_matches(s, '^{_PY_WHITESPACE_CLASS}|{_PY_WHITESPACE_CLASS}$')
             THEN trim(s, '{PY_WHITESPACE}') ELSE s END
    )""",
    # s.strip() == '' without building the stripped text (cheap for keys)
    f"""CREATE OR REPLACE TEMP MACRO kimera_py_blank(s) AS (
        regexp_full_match(s, '{_PY_WHITESPACE_CLASS}*')
    )""",
    f"""CREATE OR REPLACE TEMP MACRO kimera_epoch_in_range(t) AS (
        t >= {EPOCH_MIN!r} AND t < {EPOCH_END!r}
    )""",
    # the cheap text test; the exact tests below run only where it holds (CASE is lazy)
    f"""CREATE OR REPLACE TEMP MACRO kimera_non_finite_hint(j) AS (
        coalesce(regexp_matches(CAST(j AS VARCHAR), '{_NON_FINITE_HINT}'), false)
    )""",
    f"""CREATE OR REPLACE TEMP MACRO kimera_json_non_finite_exact(j) AS (
        coalesce(list_bool_or(list_transform(
            regexp_extract_all(
                regexp_replace(CAST(j AS VARCHAR), '{_JSON_STRING}', '""', 'g'),
                '{_NUMBER_LEXEME}'),
            x -> NOT regexp_full_match(x, '-?[0-9]+')
                 AND NOT coalesce(isfinite(TRY_CAST(x AS DOUBLE)), true))), false)
    )""",
    # meta.terms (JSON) holds an intensity that is a number but not a finite double
    """CREATE OR REPLACE TEMP MACRO kimera_terms_non_finite_exact(terms_j) AS (
        coalesce(TRY(len(list_filter(json_extract(terms_j, '$[*].intensity'),
                x -> json_type(x) = 'DOUBLE' AND NOT isfinite(TRY_CAST(x AS DOUBLE)))) > 0),
            false)
    )""",
    """CREATE OR REPLACE TEMP MACRO kimera_json_non_finite(j) AS (
        CASE WHEN kimera_non_finite_hint(j) THEN kimera_json_non_finite_exact(j) ELSE false END
    )""",
    """CREATE OR REPLACE TEMP MACRO kimera_terms_non_finite(terms_j) AS (
        CASE WHEN kimera_non_finite_hint(terms_j) THEN kimera_terms_non_finite_exact(terms_j)
             ELSE false END
    )""",
    """CREATE OR REPLACE TEMP MACRO kimera_json_falsy(j) AS (
        CASE json_type(j)
            WHEN 'NULL' THEN true
            WHEN 'BOOLEAN' THEN NOT CAST(j AS BOOLEAN)
            WHEN 'VARCHAR' THEN json_extract_string(j, '$') = ''
            WHEN 'ARRAY' THEN json_array_length(j) = 0
            WHEN 'OBJECT' THEN len(json_keys(j)) = 0
            ELSE coalesce(TRY_CAST(j AS DOUBLE) = 0, false)
        END
    )""",
)


def install_value_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create (or replace) the connection's temp macros of ``VALUE_MACROS``."""
    for macro in VALUE_MACROS:
        con.execute(macro)
