"""Headless Chromium against the real `dagster dev`: what an operator sees in the UI.

Uses Debian's chromium through Playwright's ``executable_path`` (no browser download).
Screenshots are saved under var/test-artifacts/browser/ for a human to look at.
"""

from __future__ import annotations

import pytest
from support.servers import (
    ROOT,
    launch_run,
    require_binary,
    shared_dagster_dev,
    wait_for_run,
)

from kimera_core.db import connect

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
ALL_BUCKETS = {
    "dagster/asset_partition_range_start": "0",
    "dagster/asset_partition_range_end": "7",
}


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


@pytest.fixture(scope="module")
def migrated_with_failing_check(dagster_dev):
    """A successful migration run, then a consistency run failing on a planted divergence.

    The planted change is undone afterwards so the other e2e tests see consistent stores.
    """
    port, db, _ = dagster_dev
    migration = launch_run(port, "migration_job", tags=ALL_BUCKETS)
    assert wait_for_run(port, migration) == "SUCCESS"
    with connect(db) as con:
        key, data = con.execute(
            "SELECT id, data FROM identities WHERE identity_type = 'geoid' ORDER BY id LIMIT 1"
        ).fetchone()
        con.execute(
            'UPDATE identities SET data = json_merge_patch(data, \'{"raw": "planted"}\') '
            "WHERE id = ?",
            [key],
        )
    checks = launch_run(port, "consistency_check_job")
    assert wait_for_run(port, checks) == "FAILURE"
    yield migration, checks, key
    with connect(db) as con:
        con.execute("UPDATE identities SET data = ? WHERE id = ?", [data, key])


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


def test_asset_graph_shows_the_asset_groups(dagster_dev, page):
    port, _, _ = dagster_dev
    page.goto(f"http://127.0.0.1:{port}/asset-groups")
    _dismiss_welcome(page)
    for group in ("legacy", "identities", "entropy", "rollout"):
        page.get_by_text(group, exact=True).first.wait_for()
    _shot(page, "asset_graph")


def test_run_page_shows_the_migration_success(dagster_dev, page, migrated_with_failing_check):
    port, _, _ = dagster_dev
    migration, _, _ = migrated_with_failing_check
    page.goto(f"http://127.0.0.1:{port}/runs/{migration}")
    page.get_by_text("migration_job").first.wait_for()
    page.get_by_text("Success", exact=True).first.wait_for()
    _shot(page, "migration_run")


def test_failed_check_is_visible_with_its_metadata(dagster_dev, page, migrated_with_failing_check):
    port, _, _ = dagster_dev
    _, _, key = migrated_with_failing_check
    page.goto(f"http://127.0.0.1:{port}/assets/identities?view=checks")
    page.get_by_text("field_equality").first.wait_for()
    page.get_by_text("Failed").first.wait_for()
    _shot(page, "identities_checks")
    page.goto(f"http://127.0.0.1:{port}/assets/identities?view=checks&checkDetail=field_equality")
    page.get_by_text("1 row whose mapped fields differ").first.wait_for()
    page.get_by_text("offending_keys_sample").first.wait_for()
    page.locator("tr", has_text="offending_keys_sample").get_by_text("[Show JSON]").click()
    page.get_by_text(key).first.wait_for()
    _shot(page, "field_equality_failure")
