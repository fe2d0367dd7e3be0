"""Headless Chromium against the real `dagster dev`: the operator's journey through the rollout.

Uses Debian's chromium through Playwright's ``executable_path`` (no browser download). Every
action is the UI's own button: the migration job's "Materialize all…", the consistency job's
launchpad "Launch Run", the repair job's "Materialize", the advance job's "Materialize all".
The test only sets the scene (stage at read-new, a divergence planted in identities) and
reads the outcome from the database. Screenshots of each step go to
var/test-artifacts/browser/ (NN_step.png) for a human to look at.
"""

from __future__ import annotations

import re

import pytest
from support.servers import (
    ROOT,
    check_executions,
    graphql,
    launch_run,
    require_binary,
    shared_dagster_dev,
    wait_for_run,
    wait_until,
)

from kimera_core.db import connect
from kimera_core.legacy import fetch_legacy_identity, read_identity_p1
from kimera_core.rollout import get_stage, stage_history

pytestmark = pytest.mark.e2e

ARTIFACTS = ROOT / "var" / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCATION = "/locations/kimera_pipelines.definitions"
RUNS = """query($job: String!) {
  runsOrError(filter: {pipelineName: $job}, limit: 5) {
    ... on Runs { results { runId status tags { key value } } } } }"""


@pytest.fixture(scope="session")
def dagster_dev(request, tmp_path_factory):
    return shared_dagster_dev(request, tmp_path_factory)


@pytest.fixture(scope="module")
def page():
    chromium = require_binary("chromium", "chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def _dismiss_welcome(page) -> None:
    """Close the webserver's first-visit community dialog if it shows."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=5_000)
    except Exception:  # noqa: BLE001 - the dialog does not always show
        return
    skip.click()


def _shot(page, name: str) -> None:
    # animations finished: a dialog still fading in shows as a ghost otherwise
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False, animations="disabled")


def _button(page, text: str):
    """The button whose whole text is ``text`` (its icon has no text)."""
    return page.locator("button").filter(has_text=re.compile(rf"^\s*{re.escape(text)}\s*$"))


def _runs(port: int, job: str) -> list[dict]:
    return graphql(port, RUNS, {"job": job})["runsOrError"]["results"]


def _new_run(port: int, job: str, before: set[str], timeout: float = 120) -> str:
    """The id of a run of ``job`` not in ``before``, once it exists (backfills take a while)."""

    def found():
        fresh = [r["runId"] for r in _runs(port, job) if r["runId"] not in before]
        return fresh[0] if fresh else None

    return wait_until(found, timeout=timeout, interval=1, what=f"a new run of {job}")


def _run_ids(port: int, job: str) -> set[str]:
    return {r["runId"] for r in _runs(port, job)}


def _watch(page, port: int, run_id: str, expect: str, shot: str) -> None:
    """Open the run's page and wait until it shows the expected outcome."""
    assert wait_for_run(port, run_id) == expect.upper()
    page.goto(f"http://127.0.0.1:{port}/runs/{run_id}")
    page.get_by_text(expect, exact=True).first.wait_for()
    page.get_by_text(f"RUN_{expect.upper()}").first.wait_for()  # the log has loaded
    _shot(page, shot)


def test_asset_graph_shows_the_asset_groups(dagster_dev, page):
    port, _, _ = dagster_dev
    page.goto(f"http://127.0.0.1:{port}/asset-groups")
    _dismiss_welcome(page)
    for group in ("legacy", "identities", "entropy", "rollout"):
        page.get_by_text(group, exact=True).first.wait_for()
    _shot(page, "00_asset_graph")


def test_the_operator_journey_with_the_ui_buttons(dagster_dev, page):
    port, db, _ = dagster_dev
    base = f"http://127.0.0.1:{port}"

    # 1. launch the migration by its button: all partitions, one backfill run
    before = _run_ids(port, "migration_job")
    page.goto(f"{base}{LOCATION}/jobs/migration_job")
    _dismiss_welcome(page)
    page.get_by_role("button", name="Materialize all…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("button", name="All", exact=True).click()
    dialog.get_by_text("8 partitions selected").wait_for()
    _shot(page, "01_migration_launch_dialog")
    dialog.get_by_role("button", name="Launch backfill").click()
    migration = _new_run(port, "migration_job", before)

    # 2. watch the run
    _watch(page, port, migration, "Success", "02_migration_run")
    executions = check_executions(port, "migration_reconciliation")
    assert executions[0]["runId"] == migration and executions[0]["evaluation"]["success"]

    # the scene: the operator advanced to read-new earlier (checks run, then the advance)
    assert wait_for_run(port, launch_run(port, "consistency_check_job")) == "SUCCESS"
    advance = launch_run(
        port,
        "advance_rollout_job",
        run_config={"ops": {"rollout": {"config": {"target": "read-new"}}}},
    )
    assert wait_for_run(port, advance) == "SUCCESS"
    with connect(db) as con:
        assert get_stage(con) == "read-new"

    # 3. plant a divergence: one geoid's text changed in identities only
    with connect(db) as con:
        key = con.execute(
            "SELECT id FROM identities WHERE identity_type = 'geoid' ORDER BY id LIMIT 1"
        ).fetchone()[0]
        legacy_raw = fetch_legacy_identity(con, key).raw
        con.execute(
            'UPDATE identities SET data = json_merge_patch(data, \'{"raw": "planted"}\') '
            "WHERE id = ?",
            [key],
        )

    # 4. run the consistency job by its button (a checks-only job: its launchpad)
    before = _run_ids(port, "consistency_check_job")
    page.goto(f"{base}{LOCATION}/jobs/consistency_check_job/playground")
    page.get_by_role("button", name="Launch Run").click()
    checks = _new_run(port, "consistency_check_job", before)
    _watch(page, port, checks, "Failure", "03_consistency_run_failed")

    # 5. read the failing key with both values on the check's page
    page.goto(f"{base}/assets/rollout_stage?view=checks&checkDetail=field_equality")
    page.get_by_text("1 row whose mapped fields differ").first.wait_for()
    page.locator("tr", has_text="evidence").get_by_text("[Show Markdown]").click()
    evidence = page.get_by_role("dialog")
    evidence.get_by_text(key).first.wait_for()
    evidence.get_by_text("planted").first.wait_for()
    evidence.get_by_text(legacy_raw[:30]).first.wait_for()
    _shot(page, "04_field_equality_evidence")
    page.keyboard.press("Escape")
    page.locator("tr", has_text="repair").get_by_text("[Show Markdown]").click()
    page.get_by_role("dialog").get_by_text("Applies.").wait_for()
    _shot(page, "05_field_equality_repair_applies")
    page.keyboard.press("Escape")

    # 6. see the automatic read rollback (the daemon's sensor, every 30 s)
    rollback = _new_run(port, "rollback_reads_job", set(), timeout=150)
    _watch(page, port, rollback, "Success", "06_automatic_read_rollback")
    page.get_by_text("Launched by auto_rollback_reads").first.wait_for()
    with connect(db, read_only=True) as con:
        assert get_stage(con) == "verified"
        assert stage_history(con)[-1]["actor"] == "sensor:auto_rollback_reads"

    # 7. launch the repair by its button: identities gets the legacy row back (stage verified)
    before = _run_ids(port, "repair_job")
    page.goto(f"{base}{LOCATION}/jobs/repair_job")
    _button(page, "Materialize").click()
    repair = _new_run(port, "repair_job", before)
    _watch(page, port, repair, "Success", "07_repair_run")
    with connect(db, read_only=True) as con:
        assert read_identity_p1(con, key).raw == legacy_raw
    page.goto(f"{base}/assets/repair?view=checks&checkDetail=repaired_keys_agree")
    page.get_by_text("repaired keys agree").first.wait_for()
    _shot(page, "08_repair_check")

    # 8. consistency green: the consistency job by its button again, every gate passes
    before = _run_ids(port, "consistency_check_job")
    page.goto(f"{base}{LOCATION}/jobs/consistency_check_job/playground")
    page.get_by_role("button", name="Launch Run").click()
    green = _new_run(port, "consistency_check_job", before)
    _watch(page, port, green, "Success", "09_consistency_run_green")
    (latest,) = check_executions(port, "field_equality", asset="rollout_stage")
    assert latest["runId"] == green and latest["evaluation"]["success"]
    page.goto(f"{base}/assets/rollout_stage?view=checks&checkDetail=field_equality")
    page.get_by_text("0 rows whose mapped fields differ").first.wait_for()
    _shot(page, "10_gates_green")

    # 9. advance by the Materialize button to read-new
    before = _run_ids(port, "advance_rollout_job")
    page.goto(f"{base}{LOCATION}/jobs/advance_rollout_job")
    _button(page, "Materialize all").click()
    advanced = _new_run(port, "advance_rollout_job", before)
    _watch(page, port, advanced, "Success", "11_advance_run")
    with connect(db, read_only=True) as con:
        assert get_stage(con) == "read-new"
    page.goto(f"{base}/assets/rollout_stage")
    page.get_by_text("moved to read-new").first.wait_for()
    _shot(page, "12_rollout_stage_read_new")
