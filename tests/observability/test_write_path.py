"""The storage API records its metrics and log lines."""

from __future__ import annotations

import json
import logging

import pytest

from kimera_core import metrics
from kimera_core.identity import Identity
from kimera_core.shadow import ShadowReads
from kimera_core.storage import Storage, StorageError


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def storage(tmp_path):
    with Storage.open(str(tmp_path / "w.duckdb"), stage="dual-write", shadow_sample=1.0) as s:
        yield s


GEOID = Identity(
    id="g1",
    identity_type="geoid",
    raw="two terms",
    meta={"terms": [{"intensity": 1.0}, {"intensity": 1.0}]},
    created_at=1.0,
)


def test_store_counts_success_latency_and_entropy(storage):
    before = value(
        "kimera_dual_writes_total", operation="store", write_mode="both", outcome="success"
    )
    seconds = value("kimera_identity_operation_duration_seconds_count", operation="store",
                    identity_type="geoid", write_mode="both")  # fmt: skip
    at_one_bit = value("kimera_identity_entropy_bucket", identity_type="geoid", le="1.0")
    storage.store(GEOID)
    assert value("kimera_dual_writes_total", operation="store", write_mode="both",
                 outcome="success") == before + 1  # fmt: skip
    assert value("kimera_identity_operation_duration_seconds_count", operation="store",
                 identity_type="geoid", write_mode="both") == seconds + 1  # fmt: skip
    # two equal terms: exactly 1 bit, counted in the le="1.0" bucket
    assert (
        value("kimera_identity_entropy_bucket", identity_type="geoid", le="1.0") == at_one_bit + 1
    )
    assert value("kimera_rollout_stage", stage="dual-write") == 1
    assert value("kimera_rollout_stage", stage="legacy-only") == 0


def test_refused_write_counts_a_failure_and_an_error(storage):
    failures = value(
        "kimera_dual_writes_total", operation="store", write_mode="both", outcome="failure"
    )
    errors = value("kimera_identity_operation_errors_total", operation="store", identity_type="geoid",
                   write_mode="both")  # fmt: skip
    with pytest.raises(StorageError):
        storage.store(Identity(id="bad", identity_type="geoid", raw="x", created_at=float("nan")))
    assert value("kimera_dual_writes_total", operation="store", write_mode="both",
                 outcome="failure") == failures + 1  # fmt: skip
    assert value("kimera_identity_operation_errors_total", operation="store",
                 identity_type="geoid", write_mode="both") == errors + 1  # fmt: skip


def test_shadow_mismatch_is_counted_by_field(storage):
    storage.store(GEOID)
    storage.con.execute("UPDATE legacy_geoids SET weight = 5 WHERE gid = 'g1'")
    mismatches = value("kimera_shadow_reads_total", operation="fetch", outcome="mismatch")
    weight = value("kimera_shadow_mismatched_fields_total", field="weight")
    storage.fetch("g1")
    assert (
        value("kimera_shadow_reads_total", operation="fetch", outcome="mismatch") == mismatches + 1
    )
    assert value("kimera_shadow_mismatched_fields_total", field="weight") == weight + 1


def test_shadow_match_is_counted(tmp_path):
    with Storage.open(str(tmp_path / "m.duckdb"), stage="dual-write") as s:
        s.shadow = ShadowReads(s.con, 1.0)
        s.store(GEOID)
        before = value("kimera_shadow_reads_total", operation="fetch", outcome="match")
        s.fetch("g1")
        assert value("kimera_shadow_reads_total", operation="fetch", outcome="match") == before + 1


def test_entropy_event_is_a_json_line_with_the_id(storage, caplog):
    caplog.set_level(logging.INFO, logger="kimera.entropy")
    storage.store(GEOID)
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kimera.entropy"]
    assert events == [
        {"evt": "entropy", "id": "g1", "identity_type": "geoid", "entropy": 1.0,
         "tau": 14 * 86400 * 1.1}
    ]  # fmt: skip


def test_ids_are_never_labels(storage):
    storage.store(GEOID)
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            assert "g1" not in sample.labels.values(), sample
