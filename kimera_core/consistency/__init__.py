"""The consistency verifier: do the legacy tables and ``identities`` hold the same identities?

Both stores are mapped to the ADR-001 fields (id, identity_type, raw, echo, lang_axis, tags,
weight, related_ids, meta, created_at, updated_at) and compared set-based in DuckDB, one
algorithm per module, as reladiff splits hashdiff from joindiff:

- ``sources``: the two sides as normalised rows (which tables, which columns, the row digest,
  the SQL macros that normalise and compare values);
- ``expected``: the fast digest, each legacy row as the identities row the migration writes;
- ``digests``: both digests summed per fine segment of the key-hash space (the normalised one
  only where the fast sums disagree), the explained exceptions subtracted; ``cache``: the
  digest cache that spares re-digesting unchanged rows;
- ``segments``: bisection of differing segments (≈ hashdiff);
- ``rows``: row-by-row comparison of the rows bisection leaves (≈ joindiff): keys on one
  side only, and fields that differ under ``kimera_core.compare``'s rules (NULL-safe, weight
  and timestamps at a stated tolerance, JSON compared as values);
- ``report``: ``Finding``, ``VerificationReport`` (with ``to_dict``/``from_dict``), the
  verdict's reasons, the ``kimera_verifications`` record;
- ``verify``: the driver, full or incremental (keys changed since the last recorded run).

Checksums are a fast filter, never the judge: normalised values hash exactly (JSON minified,
timestamps in microseconds), so equal rows hash equal; a row whose hash differs is compared
field by field with the tolerances, and may still turn out equal (e.g. JSON keys in another
order). docs/consistency.md explains each finding and what to do about it.

This package re-exports the names other modules import; tests that patch a module constant
(``rows.KEY_LIST_MAX``, ``digests.RECIPE``) patch it in its module.
"""

from __future__ import annotations

from kimera_core.consistency.report import (
    Finding,
    VerificationReport,
    count_of,
    last_verification,
    n_keys,
    n_rows,
)
from kimera_core.consistency.segments import FINE_BITS
from kimera_core.consistency.sources import SOURCES, Source
from kimera_core.consistency.verify import DEFAULT_SAMPLE, verify

__all__ = [
    "DEFAULT_SAMPLE",
    "FINE_BITS",
    "SOURCES",
    "Finding",
    "Source",
    "VerificationReport",
    "count_of",
    "last_verification",
    "n_keys",
    "n_rows",
    "verify",
]
