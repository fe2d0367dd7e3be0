"""Decay verification (P2): identities of known entropy and age, stored through the storage API,
decay exactly as exp(-age / (tau_0 * (1 + k * H))), computed here independently."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimera_core.entropy import decay_factor, effective_tau
from kimera_core.identity import Identity
from kimera_core.storage import Storage

TAU_0 = 14 * 24 * 3600.0  # stated independently of kimera_core.entropy
K = 0.1
NOW = 1_800_000_000.0
DAY = 86400.0


def closed_form(age: float, entropy: float) -> float:
    return math.exp(-age / (TAU_0 * (1 + K * entropy)))


def geoid_with_entropy(n_terms: int, age_days: float) -> tuple[Identity, float]:
    """n equal intensities carry exactly log2(n) bits."""
    created = NOW - age_days * DAY
    terms = [{"symbol": f"s{i}", "role": "r", "intensity": 0.5} for i in range(n_terms)]
    identity = Identity(
        id=f"g{n_terms}_{age_days}",
        identity_type="geoid",
        raw=f"text {n_terms} {age_days}",
        lang_axis="en",
        weight=1.0,
        meta={"terms": terms},
        created_at=created,
        updated_at=created,
    )
    return identity, math.log2(n_terms) if n_terms > 1 else 0.0


def scar_with_entropy(n_related: int, weight: float, age_days: float) -> tuple[Identity, float]:
    """log2(n) * weight bits."""
    created = NOW - age_days * DAY
    identity = Identity(
        id=f"s{n_related}_{weight}_{age_days}",
        identity_type="scar",
        weight=weight,
        related_ids=[f"g{i}" for i in range(n_related)],
        meta={},
        created_at=created,
        updated_at=created,
    )
    return identity, math.log2(n_related) * weight


CASES = [
    geoid_with_entropy(1, 0),
    geoid_with_entropy(2, 1),
    geoid_with_entropy(4, 14),
    geoid_with_entropy(8, 30),
    geoid_with_entropy(64, 90),
    scar_with_entropy(2, 0.5, 7),
    scar_with_entropy(4, 2.0, 28),
    scar_with_entropy(3, 1.0, 365),
]


@pytest.fixture(params=["dual-write", "write-new"])
def stored(request, tmp_path):
    with Storage.open(str(tmp_path / "decay.duckdb"), stage=request.param) as storage:
        for identity, _ in CASES:
            storage.store(identity)
        yield storage


def test_decayed_weights_match_the_closed_form(stored):
    for identity, entropy in CASES:
        score, created = stored.con.execute(
            "SELECT entropy_score, created_at FROM identities WHERE id = ?", [identity.id]
        ).fetchone()
        assert score == pytest.approx(entropy, abs=1e-12), identity.id
        age = NOW - created
        fetched = stored.fetch(identity.id)
        decayed = fetched.weight * decay_factor(age, effective_tau(score))
        expected = identity.weight * closed_form(age, entropy)
        assert decayed == pytest.approx(expected, rel=1e-12), identity.id


def test_decay_in_sql_over_the_stored_table_matches_the_closed_form(stored):
    rows = stored.con.execute(
        "SELECT id, (data->>'$.weight')::DOUBLE * exp(-(?::DOUBLE - created_at) "
        "/ (?::DOUBLE * (1 + ?::DOUBLE * entropy_score))) "
        "FROM identities",
        [NOW, TAU_0, K],
    ).fetchall()
    expected = {i.id: i.weight * closed_form(NOW - i.created_at, h) for i, h in CASES}
    assert {key: pytest.approx(expected[key], rel=1e-12) for key, _ in rows} == dict(rows)


def test_known_points_of_the_curve():
    # one tau_eff of age leaves 1/e; higher entropy decays slower
    for entropy in (0.0, 1.0, 2.5):
        tau = TAU_0 * (1 + K * entropy)
        assert decay_factor(tau, effective_tau(entropy)) == pytest.approx(math.exp(-1), rel=1e-15)
    assert decay_factor(30 * DAY, effective_tau(3.0)) > decay_factor(30 * DAY, effective_tau(1.0))
    assert decay_factor(0, effective_tau(0.0)) == 1.0


@settings(max_examples=200, deadline=None)
@given(
    age=st.floats(min_value=0, max_value=10 * 365 * DAY),
    entropy=st.floats(min_value=0, max_value=64),
)
def test_decay_factor_is_the_closed_form(age, entropy):
    assert decay_factor(age, effective_tau(entropy)) == pytest.approx(
        closed_form(age, entropy), rel=1e-12, abs=1e-300
    )
