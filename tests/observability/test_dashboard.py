"""The Grafana dashboard is import-ready and uniform; the generator and the JSON agree."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

from kimera_core.rollout import STAGES
from observability.exprs import DASHBOARD, ROOT

BUILDER = ROOT / "dashboards" / "build_dashboard.py"


def _board() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_json_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("build_dashboard", BUILDER)
    build_dashboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_dashboard)
    assert build_dashboard.build() == _board()


def test_uid_and_panel_ids_are_unique():
    board = _board()
    assert board["uid"] == "kimera-rollout"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


def test_datasource_is_a_template_variable_not_a_uid():
    board = _board()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    text = DASHBOARD.read_text()
    uids = {m for m in re.findall(r'"uid": "([^"]*)"', text)}
    assert uids == {"kimera-rollout", "${datasource}"}


def test_every_panel_uses_the_variable_has_a_unit_and_complete_targets():
    data_panels = [p for p in _board()["panels"] if p["type"] != "row"]
    assert len(data_panels) >= 25
    for panel in data_panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_rows_in_the_order_on_call_reads_them():
    rows = [p["title"] for p in _board()["panels"] if p["type"] == "row"]
    assert rows == [
        "Rollout overview",
        "Migration progress",
        "Consistency",
        "Entropy and effective tau",
        "Identity operations",
        "Storage operations",
    ]


def test_panels_do_not_overlap():
    cells = set()
    for panel in _board()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def test_generator_runs_as_a_script(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BUILDER)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(DASHBOARD.read_text()) == _board()


def _panel(title: str) -> dict:
    (panel,) = [p for p in _board()["panels"] if p["title"] == title]
    return panel


def test_the_stage_has_one_source_and_a_colour_per_stage():
    (target,) = _panel("Rollout stage")["targets"]
    assert target["expr"] == 'max(kimera_rollout_stage_number{job="kimera_rollout"})'
    (app,) = _panel("Stage the application routes by")["targets"]
    assert 'job!="kimera_rollout"' in app["expr"] and "by (instance)" in app["expr"]
    (mapping,) = _panel("Rollout stage")["fieldConfig"]["defaults"]["mappings"]
    options = mapping["options"]
    assert [options[str(i)]["text"] for i in range(len(STAGES))] == list(STAGES)
    assert len({o["color"] for o in options.values()}) == len(STAGES)


def test_stage_changes_and_automatic_rollbacks_are_annotations():
    annotations = {a["name"]: a for a in _board()["annotations"]["list"]}
    assert set(annotations) == {"Rollout stage changes", "Automatic read rollbacks"}
    assert "kimera_rollout_stage_number" in annotations["Rollout stage changes"]["expr"]
    assert "auto_rollback" in annotations["Automatic read rollbacks"]["expr"]
    for annotation in annotations.values():
        assert annotation["datasource"]["uid"] == "${datasource}"
