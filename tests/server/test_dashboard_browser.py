"""The dashboard in a real headless browser: Debian's Chromium driven by Playwright's Python
package (never a downloaded browser), against a live service with real data
(``tests.server.dashboard_store``).

It loads ``/``, reads the calculator's answer and checks it against ``/v1/recommendations``,
types a query and reads the new answer, counts the heatmap's cells against the group's runs,
watches a running trial's curve grow while points are posted (no reload), saves a plot as SVG
and PNG, and asks for a read token where reads need one. Screenshots go to
``HYPERLAW_TEST_ARTIFACTS`` (default ``test-artifacts/``); with
``HYPERLAW_README_SCREENSHOTS=DIR`` the calculator's and the heatmap's are also written to DIR
(the README's come from there: ``docs/``).

Skipped, saying why, when the browser or the Playwright package is missing: ``make test``
installs both (``make browser``: ``apt-get install chromium`` where it is missing).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, make_token
from tests.server.dashboard_store import GROUP, LIVE_FAMILY, Store, curve, start_running_trial

CHROMIUM = os.environ.get("HYPERLAW_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("HYPERLAW_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
TIMEOUT_MS = 30_000

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package is not installed (make install)"
)
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's package (make browser, or "
        "apt-get install chromium) or name one with HYPERLAW_CHROMIUM",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 1300, "height": 1000}, accept_downloads=True)
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, f"the page raised: {errors}"


def screenshot(page, name: str, *, readme: bool = False) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"dashboard_{name}.png"
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("HYPERLAW_README_SCREENSHOTS")
    if readme and target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / path.name)
    return path


def served(store: Store, **params) -> dict:
    response = store.http.get("/v1/recommendations", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def answer_lr(page) -> float:
    return float(page.locator("#answer-lr").get_attribute("data-value"))


def test_calculator_answers_what_the_api_answers_and_marks_the_query(dashboard_store, page):
    page.goto(dashboard_store.server.url + "/")
    page.locator("#answer-lr").wait_for()
    first = served(dashboard_store, n_params=1e9, n_tokens=1e11)
    assert answer_lr(page) == pytest.approx(first["learning_rate"], rel=1e-12)
    assert page.locator("#calc-scatter circle.marker").count() == 17  # the Step Law groups
    assert page.locator("#calc-scatter .query").count() == 1

    page.fill("#calc-n", "3e8")
    page.fill("#calc-d", "2e10")
    page.fill("#calc-b", "524288")
    page.click("#calc-submit")
    second = served(dashboard_store, n_params=3e8, n_tokens=2e10, batch_size_tokens=524288)
    page.wait_for_function(
        "v => Number(document.querySelector('#answer-lr').dataset.value) === v",
        arg=second["learning_rate"],
    )
    text = page.locator("#calc-result").inner_text()
    assert "η for B = 5.24e5 tokens" in text and "overhead" in text
    screenshot(page, "calculator", readme=True)

    page.fill("#calc-n", "many")
    page.click("#calc-submit")
    error = page.locator("#calc-result .error")
    error.wait_for()
    assert "n_params must be a number" in error.inner_text()


def test_group_shows_the_heatmap_of_its_runs_and_the_fits(dashboard_store, page):
    group = dashboard_store.http.get("/v1/dashboard/group", params=GROUP).json()
    completed = [r for r in group["runs"] if r["status"] == "completed"]
    page.goto(
        f"{dashboard_store.server.url}/#/group?family=step-law"
        f"&n={GROUP['n_params']}&d={GROUP['n_tokens']}"
    )
    page.locator("rect.cell").first.wait_for()
    assert page.locator("rect.cell").count() == len(completed)
    assert page.locator("figure .recommendation").count() == 1
    assert page.locator("figure .best").count() == 1
    bell = page.locator("figure[data-name$='-bell'] circle.marker")
    assert bell.count() == len(group["bell"]["batch_sizes"])
    assert f"best: trial {group['best']['trial_id']}" in page.locator("#group-summary").inner_text()
    screenshot(page, "group", readme=True)


def test_laws_draw_one_line_per_model_size_in_each_plot(dashboard_store, page):
    laws = dashboard_store.http.get("/v1/dashboard/laws").json()
    page.goto(dashboard_store.server.url + "/#/laws")
    page.locator("path.law").first.wait_for()
    assert page.locator("path.law").count() == 3 * len(laws["lines"])
    screenshot(page, "laws")


def test_a_running_trial_grows_on_the_page_without_a_reload(dashboard_store, page):
    client = dashboard_store.client
    trial = start_running_trial(client, 20)
    page.goto(f"{dashboard_store.server.url}/#/trial/{trial['id']}")
    page.wait_for_function("() => document.querySelector('#n-points')?.textContent === '20'")
    page.evaluate("() => { window.notReloaded = true; }")
    client.post_points(trial["id"], curve(60)[20:])
    page.wait_for_function("() => document.querySelector('#n-points').textContent === '60'")
    assert page.evaluate("() => window.notReloaded") is True
    client.update_trial(trial["id"], status="completed", final_loss=curve(60)[-1]["train_loss"])
    page.wait_for_function(
        "() => document.querySelector('#trial-status').textContent === 'completed'"
    )
    assert page.locator("figure[data-name$='-loss-step'] path.series").count() == 1

    page.goto(dashboard_store.server.url + "/#/experiments")
    page.locator("#trial-table").wait_for()
    assert page.locator("#families").inner_text().count(LIVE_FAMILY) == 1
    screenshot(page, "experiments")


def test_a_plot_saves_as_svg_and_png(dashboard_store, page, tmp_path):
    page.goto(dashboard_store.server.url + "/#/laws")
    figure = page.locator("figure.plot").first
    figure.locator("path.law").first.wait_for()
    for kind, magic in (("SVG", b"<svg"), ("PNG", b"\x89PNG\r\n\x1a\n")):
        with page.expect_download() as download:
            figure.get_by_role("button", name=kind).click()
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        assert path.suffix == "." + kind.lower()
        assert path.read_bytes().startswith(magic), path.read_bytes()[:40]


def test_with_read_tokens_required_the_page_asks_for_one(dashboard_store, page, tmp_path):
    from tests.conftest import start_live_server

    closed = start_live_server(
        dashboard_store.server.database_url,
        log_dir=tmp_path,
        env={"HYPERLAW_READ_REQUIRES_TOKEN": "true"},
    )
    try:
        assert httpx.get(closed.url + "/v1/dashboard/overview").status_code == 401
        page.goto(closed.url + "/")
        page.locator("#token-box").wait_for(state="visible")
        page.fill("#token", make_token(closed.database_url, scope="read"))
        page.click("#token-form button")
        page.locator("#answer-lr").wait_for()
        assert page.locator("#token-box").is_hidden()
    finally:
        closed.stop()
