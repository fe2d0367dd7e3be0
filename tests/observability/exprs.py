"""Every PromQL expression of the dashboard and the alert rules, as the e2e test evaluates it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "kimera.json"
ALERTS = ROOT / "dashboards" / "alerts.yml"
# Grafana macros as a Grafana with a 1 s scrape interval would set them
MACROS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}


def substitute(expr: str) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title / refId, expr) for every target of every panel."""
    board = json.loads(DASHBOARD.read_text())
    return [
        (f"{panel['title']} / {target['refId']}", substitute(target["expr"]))
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def annotation_exprs() -> list[tuple[str, str]]:
    """(annotation name, expr) for every Prometheus annotation of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    return [(a["name"], substitute(a["expr"])) for a in board["annotations"]["list"]]


_COMPARISON = re.compile(r"\s(>|<|==|!=|>=|<=)\s")


def alert_signals(expr: str) -> list[str]:
    """The signals an alert compares: each side of its top-level comparison that is not a
    number, or the argument of absent(). These must exist for the alert to mean anything."""
    expr = " ".join(expr.split())
    match = re.fullmatch(r"absent\((.*)\)", expr)
    if match:
        return [match[1]]
    depth, cut = 0, None
    for i, ch in enumerate(expr):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and _COMPARISON.match(expr, i - 1 if i else 0) and cut is None:
            cut = i
    if cut is None:
        return [expr]
    m = _COMPARISON.match(expr, cut - 1)
    left, right = expr[: m.start()], expr[m.end() :]
    return [side for side in (left, right) if not re.fullmatch(r"[0-9.e+-]+", side.strip())]


def alert_rules() -> list[dict]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]
