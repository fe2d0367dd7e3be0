"""SQL safety: values are always bound parameters; identifiers pass through ``vetted_identifier``."""

from __future__ import annotations

import re

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def vetted_identifier(name: str) -> str:
    """A quoted SQL identifier, refusing anything but a plain name."""
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return f'"{name}"'


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
