"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright)."""

from __future__ import annotations

import re
from pathlib import Path

from playwright import sync_api as playwright

from tests.control_plane import TOKEN, recipients_at, send, start_engine
from tests.harness import Sink, wait_for

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_dashboard_shows_lanes_side_by_side_with_live_numbers(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "sink")
    engine, admin, ports = start_engine(tmp_path, sink.address)
    try:
        send(ports[0], ["a@dest.test", "b@dest.test"])
        send(ports[1], ["c@dest.test"], headers="X-Engine-Campaign: spring\r\n")
        wait_for(lambda: len(recipients_at(sink)) == 3, 10)
        admin.ok("POST", "/api/v1/suspend", {"lane": "bulk", "domain": "held.test", "reason": "warm-up pause"})
        send(ports[1], ["d@held.test"])
        wait_for(lambda: admin.ok("GET", "/api/v1/queues")["queues"], 10, what="the held message queued")
        wait_for(lambda: _lane(admin, "transactional")["p99"] is not None, 10, what="latency in the overview")

        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{admin.base}/#token={TOKEN}")
                page.wait_for_selector('[data-lane="transactional"] [data-metric="queued"]', timeout=10_000)
                lanes = page.locator("article.lane")
                assert [lanes.nth(i).get_attribute("data-lane") for i in range(lanes.count())] == [
                    "transactional",
                    "bulk",
                ]
                boxes = [lanes.nth(i).bounding_box() for i in range(2)]
                assert boxes[0]["x"] < boxes[1]["x"] and abs(boxes[0]["y"] - boxes[1]["y"]) < 1, "side by side"

                def metric(lane: str, name: str) -> str:
                    return page.locator(f'[data-lane="{lane}"] [data-metric="{name}"] b').inner_text()

                assert metric("bulk", "queued") == "1"
                assert metric("transactional", "queued") == "0"
                assert metric("transactional", "success") == "100.00%"
                assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", metric("transactional", "p99"))
                assert page.locator('[data-lane="bulk"] tr[data-domain="held.test"]').count() == 1
                assert page.locator('[data-lane="transactional"] line.sla').count() == 1, "the SLA line"
                assert "warm-up pause" in page.locator("#suspensions").inner_text()
                assert "spring" in page.locator('[data-lane="bulk"]').inner_text()

                admin.ok("POST", "/api/v1/suspend", {"lane": "transactional", "domain": "held.test", "reason": "x"})
                send(ports[0], ["e@held.test"])
                page.wait_for_function(
                    """() => document.querySelector('[data-lane="transactional"] [data-metric="queued"] b')
                        ?.textContent === "1" """,
                    timeout=10_000,
                )
                assert "updated" in page.locator("#status").inner_text()
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            finally:
                browser.close()
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        engine.stop()
        sink.stop()


def test_dashboard_asks_for_the_token(tmp_path: Path) -> None:
    engine, admin, _ = start_engine(tmp_path, "127.0.0.1:9")
    try:
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            try:
                page = browser.new_page()
                page.goto(admin.base + "/")
                page.wait_for_selector("#login", state="visible", timeout=10_000)
                assert page.locator("#status").inner_text() == "admin token needed"
                page.fill("#token", TOKEN)
                page.click("#login button")
                page.wait_for_selector('[data-lane="bulk"]', timeout=10_000)
                assert page.locator("#login").is_hidden()
            finally:
                browser.close()
    finally:
        engine.stop()


def _lane(admin, name: str) -> dict:
    return next(lane for lane in admin.ok("GET", "/api/v1/overview")["lanes"] if lane["name"] == name)
