"""kimera_core.sql's epoch -> ISO macros write exactly identity.epoch_to_iso's text, or NULL."""

from __future__ import annotations

import math
import random
import struct

import duckdb
import pytest

from kimera_core.identity import epoch_to_iso
from kimera_core.sql import EPOCH_ISO_MACROS


@pytest.fixture(scope="module")
def con():
    c = duckdb.connect()
    for macro in EPOCH_ISO_MACROS:
        c.execute(macro)
    yield c
    c.close()


def sample() -> list[float]:
    rng = random.Random(4)
    values = [0.0, -0.0, 1e-7, 5e-05, -0.5, -0.1234567, 1 / 3, 5e9, 5e9 + 0.25]
    values += [1_790_000_000.1234567, 1_764_092_345.123456, 4294967295.999999, 99999999999.99998]
    values += [rng.uniform(-1e10, 1e11) for _ in range(3000)]
    values += [round(rng.uniform(0, 2e9), rng.randint(0, 9)) for _ in range(3000)]
    values += [round(rng.uniform(-2e9, 0), rng.randint(0, 6)) for _ in range(1000)]
    bits = (struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(3000))
    return values + [v for v in bits if math.isfinite(v)]


def test_macro_text_is_epoch_to_iso_or_null(con):
    rows = con.execute(
        "SELECT t, kimera_epoch_iso(t), kimera_epoch_iso_exact(t) FROM unnest(?::DOUBLE[]) u(t)",
        [sample()],
    ).fetchall()
    written = 0
    for t, iso, exact in rows:
        assert exact == (iso is not None), t
        if iso is not None:
            assert iso == epoch_to_iso(t), t
            written += 1
    # the common shapes are written in SQL: whole microseconds and time.time()-like digits
    assert written > 0.6 * len(rows)
    for t in (1_790_000_000.1234567, 1_764_092_345.123456, -0.5, 0.0, 1 / 3):
        assert con.execute("SELECT kimera_epoch_iso(?::DOUBLE)", [t]).fetchone()[0] == (
            epoch_to_iso(t)
        )


def test_macro_leaves_what_it_cannot_write_exactly_to_python(con):
    for t in (1e-7, -0.1234567, 1e12 + 0.5, float("nan"), float("inf"), None):
        iso, exact = con.execute(
            "SELECT kimera_epoch_iso(?::DOUBLE), kimera_epoch_iso_exact(?::DOUBLE)", [t, t]
        ).fetchone()
        assert iso is None and exact is False
