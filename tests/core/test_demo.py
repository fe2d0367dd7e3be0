"""The demo generator at small sizes (where two scars can link the same pair of geoids)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import duckdb
from hypothesis import given, settings
from hypothesis import strategies as st

from kimera_core.demo import generate_demo_data


@settings(max_examples=15)
@given(
    geoids=st.integers(2, 40),
    scars=st.integers(0, 80),
    seed=st.integers(0, 2**31),
    echoforms=st.integers(0, 30),
)
def test_small_demo_databases_generate_with_one_echoform_per_pair(geoids, scars, seed, echoforms):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.duckdb"
        generate_demo_data(path, geoids=geoids, scars=scars, seed=seed, echoforms=echoforms)
        with duckdb.connect(str(path), read_only=True) as con:
            anchors = [a for (a,) in con.execute("SELECT anchor FROM echoforms").fetchall()]
            # the pairs two-geoid scars link, taken plainly from what the generator wrote
            pairs = {
                tuple(ids)
                for (ids,) in con.execute(
                    "SELECT related_ids::VARCHAR[] FROM legacy_scars "
                    "WHERE json_type(related_ids) = 'ARRAY' AND json_array_length(related_ids) = 2"
                ).fetchall()
            }
    assert len(anchors) == len(set(anchors)) <= echoforms
    assert set(anchors) <= {f"{a}_{b}" for a, b in pairs}


def test_nineteen_geoids_and_thirty_six_scars_generate(tmp_path):
    """The size the review of session s5 found failing (two scars linking one pair)."""
    report = generate_demo_data(tmp_path / "d.duckdb", geoids=19, scars=36, seed=42)
    assert report is not None
