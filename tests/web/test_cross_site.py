"""A web page on another origin cannot write to the service, in headless Chromium: it tries
what a browser sends without asking first (``fetch`` in ``no-cors`` mode with text/plain and
untyped bodies, HTML forms posting urlencoded, multipart and text/plain bodies), and nothing is
written; the dashboard, on the service's own origin, still writes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import InProcessServer, LocalSite, agent_event, make_settings, running_server
from tests.web.test_dashboard import CHROMIUM_ARGS, WAIT_MS, open_dashboard

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
]

# What a hostile page does on load: every kind of write a browser makes to another origin
# without a CORS preflight, then it says it is done in its title.
HOSTILE = """<!doctype html>
<html><head><title>loading</title></head><body>
<iframe name="sink" style="display:none"></iframe>
<form id="urlencoded" method="post" target="sink" action="SERVICE/ingests">
  <input name="url" value="https://www.youtube.com/watch?v=dQw4w9WgXcQ"></form>
<form id="multipart" method="post" target="sink" enctype="multipart/form-data"
      action="SERVICE/agents/runs"><input name="scope" value="all"></form>
<form id="plain" method="post" target="sink" enctype="text/plain"
      action="SERVICE/agents/forged/events">
  <input name='{"event":"progress","payload":{"agent_name":"forged","x":"' value='"}}'>
</form>
<script>
const service = "SERVICE";
const body = JSON.stringify({event: "progress", payload: {agent_name: "forged"}});
async function attack() {
  const attempts = [
    fetch(service + "/agents/forged/events", {method: "POST", mode: "no-cors",
      headers: {"content-type": "text/plain"}, body}),
    fetch(service + "/agents/forged/events", {method: "POST", mode: "no-cors",
      body: new Blob([body])}),
    fetch(service + "/agents/events", {method: "POST", mode: "no-cors",
      headers: {"content-type": "application/x-www-form-urlencoded"},
      body: JSON.stringify({events: [{source_id: "forged", event: "progress",
        payload: {agent_name: "forged"}}]})}),
    fetch(service + "/ingests", {method: "POST", mode: "no-cors",
      body: JSON.stringify({url: "https://www.youtube.com/watch?v=dQw4w9WgXcQ"})}),
  ];
  await Promise.allSettled(attempts);
  for (const id of ["urlencoded", "multipart", "plain"]) {
    const loaded = new Promise(resolve => document.querySelector("iframe").onload = resolve);
    document.getElementById(id).submit();
    await loaded;
  }
  document.title = "done";
}
attack();
</script></body></html>
"""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        AGENTS_AUTO_RUN="false",
        INGEST_CONCURRENCY="0",
        AGENT_RUN_CONCURRENCY="0",
    )
    async with running_server(settings) as running:
        yield running


@pytest.fixture
def hostile_site(server: InProcessServer) -> Iterator[LocalSite]:
    page = HOSTILE.replace("SERVICE", server.base_url).encode()
    with LocalSite({"/": (200, "text/html; charset=utf-8", page)}) as site:
        yield site


@pytest.fixture
async def page(server: InProcessServer) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as driver:
        browser = await driver.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            context = await browser.new_context()
            opened = await context.new_page()
            opened.set_default_timeout(WAIT_MS)
            yield opened
            await context.close()
        finally:
            await browser.close()


async def log_head(client: httpx.AsyncClient) -> int:
    value: int = (await client.get("/events", params={"limit": 1})).json()["head"]
    return value


async def test_a_page_on_another_origin_writes_nothing_and_the_dashboard_still_writes(
    server: InProcessServer, hostile_site: LocalSite, page: Any
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        assert (await client.post("/agents/own/events", json=agent_event())).status_code == 201
        before = await log_head(client)

        refused: list[tuple[str, int]] = []
        page.on(
            "response",
            lambda response: (
                refused.append((response.url, response.status))
                if response.url.startswith(server.base_url)
                else None
            ),
        )
        assert hostile_site.base_url != server.base_url
        await page.goto(f"{hostile_site.base_url}/")
        await page.wait_for_function("document.title === 'done'")

        # Seven writes reached the service, and each was refused.
        assert len(refused) == 7, refused
        assert {status for _, status in refused} == {403}, refused
        assert await log_head(client) == before
        assert (await client.get("/ingests")).json() == []
        assert (await client.get("/agents", params={"agent_name": "forged"})).json() == []

        # The dashboard, served by the service, writes from its own origin: its ingest form.
        await open_dashboard(page, server.base_url)
        await page.get_by_label("URL of a video, channel or article").fill(
            "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
        )
        await page.get_by_role("button", name="Ingest", exact=True).click()
        await page.locator("#ingest-progress[data-ingest]").wait_for()
        ingests = (await client.get("/ingests")).json()
        assert [row["url"] for row in ingests] == ["https://www.youtube.com/watch?v=dQw4w9WgXcQ"]
        # And a script of the page, as another agent of the user's might.
        answer = await page.evaluate(
            """async body => {
                const r = await fetch("/agents/own/events", {method: "POST",
                  headers: {"content-type": "application/json"}, body});
                return r.status;
            }""",
            json.dumps(agent_event()),
        )
        assert answer == 201
        assert await log_head(client) > before
