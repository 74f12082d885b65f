"""The dashboard in a real browser: headless Chromium (Debian's package) over a service that ran a real
round; the token is typed into the page once; every chart holds data; the console stays clean."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.api.conftest import LiveServer, jpeg, unique_seed
from tests.worker.test_inprocess_rounds import AUTH, PASSING_GATE, TINY_ROUND, TOKEN, wait_for_round

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHARTS = ["chart-agreement", "chart-parse", "chart-reward", "chart-margins", "chart-scores"]

pytestmark = pytest.mark.slow


@pytest.fixture
def evolved(start_server, tmp_path: Path) -> LiveServer:
    server = start_server(
        f"sqlite:///{tmp_path / 'evoq.db'}",
        data_dir=tmp_path,
        admin_token=TOKEN,
        **{**TINY_ROUND, "round_votes": 3},  # odd: no tied held-out pair, so agreement has a value
        **PASSING_GATE,
    )
    for _ in range(5):
        assert server.score(jpeg(unique_seed()), samples=2).status_code == 200
    started = server.http.post("/admin/evolutions", headers=AUTH, json={"seed": 1})
    assert wait_for_round(server, started.json()["id"])["state"] == "succeeded"
    for _ in range(3):  # predictions of the new version too
        server.score(jpeg(unique_seed()), samples=2)
    return server


def test_the_dashboard_draws_every_chart_with_data_and_no_console_error(
    evolved: LiveServer, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Chromium is missing: apt-get install chromium (as .ci/run does)"
    assert evolved.http.get("/admin/dashboard").status_code == 401  # the data needs the token
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.on(
            "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
        external: list[str] = []
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith(evolved.url) else None)
        page.goto(f"{evolved.url}/dashboard")
        page.wait_for_selector("#token", state="visible")
        page.fill("#token", TOKEN)
        page.click("#save")
        page.wait_for_selector("#content", state="visible", timeout=30_000)
        drawn = "ids => ids.every(id => (document.getElementById(id).data || []).length > 0)"
        page.wait_for_function(
            drawn,
            arg=CHARTS,
            timeout=30_000,
        )
        count = "id => document.getElementById(id).data.map(t => (t.y || t.x).filter(v => v != null).length)"
        points = {chart: page.evaluate(count, chart) for chart in CHARTS}
        rounds = page.eval_on_selector_all(
            "#rounds tbody tr", "rows => rows.map(r => r.cells[1].textContent)"
        )
        lineage = page.inner_text("#lineage")
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        page.reload()  # the token was kept: no login a second time
        page.wait_for_selector("#content", state="visible", timeout=30_000)
        assert not page.is_visible("#login")
        browser.close()
    assert all(sum(counts) > 0 for counts in points.values()), points
    assert rounds == ["succeeded"]
    assert lineage.startswith("serving v2") and "from v1" in lineage
    assert not problems, problems
    assert not external, external  # works offline: nothing but the service itself was asked
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_the_dashboard_is_off_with_the_admin_api(start_server, tmp_path: Path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'evoq.db'}", data_dir=tmp_path)
    assert server.http.get("/dashboard").status_code == 404
