"""The dashboard in headless Chromium (Playwright), against a real server started by the test:
an ingest's steps appear live and in order, a reload mid-ingest picks the same ingest up
without repeating a step, agents show progress and a stall, headline numbers move live, a
dropped connection resumes without duplicate or missing rows, the token prompt, and a
screenshot of a known state in ``test-output/``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.ingest.pipeline import STEPS
from tests.support import InProcessServer, LocalSite, agent_event, make_settings, running_server

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "the browser tests need Debian's chromium at /usr/bin/chromium "
        "(apt-get install -y chromium; .ci/run installs it)",
        allow_module_level=True,
    )
playwright_api = pytest.importorskip(
    "playwright.async_api", reason="the browser tests need the playwright package (test extra)"
)
Browser = playwright_api.Browser
Page = playwright_api.Page
expect = playwright_api.expect

ROOT = Path(__file__).resolve().parent.parent.parent
OUTPUT = ROOT / "test-output"
ARTICLE = (ROOT / "tests" / "fixtures" / "articles" / "fog_signals.html").read_bytes()
TITLE = "How Lighthouse Keepers Listened to the Fog"
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
WAIT_MS = 15_000
expect.set_options(timeout=WAIT_MS)
ELAPSED = re.compile(r"^\d+(\.\d)? (ms|s)$")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def site() -> Iterator[LocalSite]:
    html = "text/html; charset=utf-8"
    with LocalSite({"/fog": (200, html, ARTICLE), "/slow": (200, html, ARTICLE)}) as running:
        yield running


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    # The browser is what these tests exercise; the server's SQLite/PostgreSQL behaviour is
    # covered by the API suites, so one backend here.
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        ARCHIVE_DIR=str(tmp_path / "archive"),
        INGEST_ALLOW_PRIVATE_URLS="true",
        AGENTS_AUTO_RUN="false",
        HEARTBEAT_SECONDS="1",
        SSE_RETRY_MS="200",
    )
    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def client(server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as opened:
        yield opened


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as driver:
        launched = await driver.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Any, server: InProcessServer) -> AsyncIterator[Any]:
    # Closed before the server stops, so that no stream of the page is still open then.
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
    opened.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


async def open_dashboard(page: Any, base_url: str) -> None:
    await page.goto(f"{base_url}/")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")


async def post_agent(client: httpx.AsyncClient, source_id: str, event: str, **payload: Any) -> int:
    response = await client.post(f"/agents/{source_id}/events", json=agent_event(event, **payload))
    assert response.status_code == 201, response.text
    position: int = response.json()["position"]
    return position


async def shown_steps(page: Any) -> list[str]:
    steps: list[str] = await page.locator("#ingest-steps li[data-event=progress]").evaluate_all(
        "items => items.map(item => item.dataset.step)"
    )
    return steps


async def test_an_ingest_shows_each_step_in_order_then_the_result_and_its_timeline(
    page: Any, server: InProcessServer, site: LocalSite
) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await open_dashboard(page, server.base_url)
    url = f"{site.base_url}/fog"
    await page.get_by_label("URL of a video, channel or article").fill(url)
    await page.get_by_role("button", name="Ingest", exact=True).click()

    result = page.locator("#ingest-result .result-box")
    await expect(result).to_have_attribute("data-status", "success")
    await expect(result).to_contain_text("Done.")
    assert await shown_steps(page) == list(STEPS["article"])
    ids = await page.locator("#ingest-steps li").evaluate_all(
        "items => items.map(item => Number(item.dataset.id))"
    )
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    events = await page.locator("#ingest-steps li").evaluate_all(
        "items => items.map(item => item.dataset.event)"
    )
    assert events[:2] == ["requested", "started"]

    # Recent results and the headline numbers follow; the title links to the timeline.
    recent = page.locator("#recent-list li[data-kind=ingest]")
    await expect(recent).to_have_count(1)
    await expect(recent).to_contain_text(TITLE)
    await expect(page.locator("#stat-ingests")).to_have_text("1")
    await expect(page.locator("#stat-ingests-detail")).to_contain_text("1 done")

    await recent.get_by_role("link", name=TITLE).click()
    timeline = page.locator("#audit-view table.timeline tbody tr")
    # requested, started, nine steps, complete
    await expect(timeline).to_have_count(len(STEPS["article"]) + 3)
    cells = await timeline.evaluate_all(
        "rows => rows.map(row => [...row.cells].map(cell => cell.textContent))"
    )
    assert [row[3] for row in cells] == ["requested", "started", *["progress"] * 9, "complete"]
    assert [row[4] for row in cells[2:11]] == [
        step.capitalize().replace("_", " ") for step in STEPS["article"]
    ]
    assert all(row[1] for row in cells)  # a time on every row
    assert all(row[6].endswith(("ms", "s")) for row in cells[:-1])  # time spent per step
    await expect(page.locator("#audit-view .facts")).to_contain_text("success")

    # Everything the page loaded came from the service itself.
    origins = {"/".join(address.split("/")[:3]) for address in requested}
    assert origins == {server.base_url}, origins


async def test_a_reload_mid_ingest_continues_the_same_ingest_without_repeating_a_step(
    page: Any, server: InProcessServer, site: LocalSite, client: httpx.AsyncClient
) -> None:
    site.delays["/slow"] = 2.5
    await open_dashboard(page, server.base_url)
    await page.get_by_label("URL of a video, channel or article").fill(f"{site.base_url}/slow")
    await page.get_by_label("URL of a video, channel or article").press("Enter")
    await expect(page.locator("#ingest-steps li[data-step=fetching]")).to_have_count(1)
    ingest_id = await page.locator("#ingest-progress").get_attribute("data-ingest")
    assert ingest_id

    await page.reload()
    # The same ingest is back on screen, its steps so far shown once, and it carries on.
    await expect(page.locator("#ingest-progress")).to_have_attribute("data-ingest", ingest_id)
    await expect(page.locator("#ingest-steps li[data-step=fetching]")).to_have_count(1)
    assert await page.locator("#ingest-result .result-box").count() == 0, "finished too early"
    await expect(page.locator("#ingest-result .result-box")).to_have_attribute(
        "data-status", "success"
    )
    assert await shown_steps(page) == list(STEPS["article"])
    assert await page.locator("#ingest-steps li[data-event=requested]").count() == 1

    # One ingest ran, and fetched the page once.
    rows = (await client.get("/ingests")).json()
    assert [row["ingest_id"] for row in rows] == [ingest_id]
    assert site.hits["/slow"] == 1


async def test_errors_are_shown_in_plain_words(
    page: Any, server: InProcessServer, site: LocalSite
) -> None:
    await open_dashboard(page, server.base_url)
    field = page.get_by_label("URL of a video, channel or article")
    error = page.get_by_role("alert")
    await page.get_by_role("button", name="Ingest", exact=True).click()
    await expect(error).to_have_text("Enter the URL of a video, a channel or an article.")
    await expect(field).to_have_attribute("aria-invalid", "true")

    await field.fill("not a web address")
    await field.press("Enter")
    await expect(error).to_have_text(
        "That URL was not accepted: URL must start with http:// or https://"
    )
    await expect(page.locator("#ingest-progress")).to_be_hidden()

    await field.fill(f"{site.base_url}/missing")
    await field.press("Enter")
    await expect(error).to_be_hidden()
    result = page.locator("#ingest-result .result-box")
    await expect(result).to_have_attribute("data-status", "error")
    await expect(result).to_contain_text("It did not work.")
    await expect(result).to_contain_text("404")


async def test_headline_numbers_and_running_now_follow_an_ingest_live(
    page: Any, server: InProcessServer, site: LocalSite, client: httpx.AsyncClient
) -> None:
    site.delays["/slow"] = 2.0
    await open_dashboard(page, server.base_url)
    await expect(page.locator("#stat-processing")).to_have_text("0")
    await expect(page.locator("#active-empty")).to_be_visible()

    # Started by another client: the page learns of it from /stats/stream alone.
    url = f"{site.base_url}/slow"
    ingest_id = (await client.post("/ingests", json={"url": url})).json()["ingest_id"]
    await expect(page.locator("#stat-processing")).to_have_text("1")
    running = page.locator(f"#active-list li[data-ingest='{ingest_id}']")
    await expect(running).to_contain_text(url)
    await expect(running.locator(".step-now")).to_have_text("Fetching")
    await expect(running.locator(".elapsed")).to_have_text(ELAPSED)

    await expect(page.locator("#stat-processing")).to_have_text("0")
    await expect(page.locator("#active-list li")).to_have_count(0)
    await expect(page.locator("#stat-ingests")).to_have_text("1")
    await expect(page.locator("#recent-list li[data-kind=ingest]")).to_contain_text(TITLE)


async def test_agents_show_progress_rising_and_a_stalled_activity_flagged(
    page: Any, server: InProcessServer, client: httpx.AsyncClient
) -> None:
    await post_agent(client, "tagger_live", "started", message="Tagging", progress=0.0)
    await open_dashboard(page, server.base_url)
    live = page.locator("#agent-list li[data-source=tagger_live]")
    bar = live.get_by_role("progressbar", name="tagger progress")
    await expect(bar).to_have_attribute("value", "0")

    await post_agent(client, "summarizer_quiet", "started", agent_name="summarizer")
    seen = []
    for step in range(1, 6):
        await post_agent(
            client,
            "tagger_live",
            "progress",
            message=f"Processing video {step}/5",
            progress=step / 5,
        )
        await expect(bar).to_have_attribute("value", str(step * 20))
        seen.append(int(await bar.get_attribute("value") or 0))
        await expect(live).to_contain_text(f"Processing video {step}/5")
    assert seen == [20, 40, 60, 80, 100]
    await expect(page.locator("#stat-agents")).to_have_text("2")

    # HEARTBEAT_SECONDS=1: the quiet one is stalled after three periods; the live one, which
    # keeps sending heartbeats, is not.
    async def keep_alive() -> None:
        while True:
            await post_agent(client, "tagger_live", "heartbeat")
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(keep_alive())
    try:
        quiet = page.locator("#agent-list li[data-source=summarizer_quiet]")
        await expect(quiet).to_have_attribute("data-status", "stalled")
        await expect(quiet.locator(".stalled-flag")).to_contain_text("Stalled")
        await expect(page.locator("#stat-stalled")).to_have_text("1")
        await expect(page.locator("#tile-stalled")).to_have_class("tile warn")
        await expect(live).to_have_attribute("data-status", "running")
        await expect(live.locator(".stalled-flag")).to_have_count(0)
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    await post_agent(client, "tagger_live", "complete", message="Tagged 5 videos")
    await expect(live).to_have_attribute("data-status", "completed")
    await expect(live.locator(".stalled-flag")).to_have_count(0)
    await expect(page.locator("#recent-list li[data-source=tagger_live]")).to_contain_text(
        "Tagged 5 videos"
    )


class DroppingProxy:
    """A TCP proxy between the browser and the server whose connections the test can cut,
    standing in for a network drop."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self._transports: set[asyncio.BaseTransport] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> DroppingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def cut(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if self.refusing:
                writer.transport.abort()
                return
            try:
                upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.transport.abort()
                return
            self._transports.update((writer.transport, upstream[1].transport))
            await asyncio.gather(_pipe(reader, upstream[1]), _pipe(upstream[0], writer))
        finally:
            self._handlers.discard(task)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    sink.transport.abort()


async def test_a_dropped_connection_resumes_without_duplicate_or_missing_rows(
    page: Any, server: InProcessServer, client: httpx.AsyncClient
) -> None:
    port = int(server.base_url.rsplit(":", 1)[1])
    positions = [await post_agent(client, "tagger_1", "progress", progress=0.1)]
    async with DroppingProxy(port) as proxy:
        await open_dashboard(page, proxy.base_url)
        rows = page.locator("#log-rows tr")
        await expect(rows).to_have_count(1)
        positions.append(await post_agent(client, "tagger_1", "progress", progress=0.2))
        await expect(rows).to_have_count(2)

        proxy.refusing = True
        proxy.cut()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
        await expect(page.locator("#connection")).to_contain_text("Reconnecting")
        for step in range(3, 9):
            positions.append(
                await post_agent(client, f"tagger_{step % 2}", "progress", progress=step / 10)
            )
        await asyncio.sleep(0.5)
        proxy.refusing = False

        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(rows).to_have_count(len(positions))
        positions.append(await post_agent(client, "tagger_1", "progress", progress=0.95))
        await expect(rows).to_have_count(len(positions))
        shown = await rows.evaluate_all("rows => rows.map(row => Number(row.dataset.position))")
        assert shown == sorted(positions, reverse=True)

        # The other panels caught up too: the agent's bar shows its newest event.
        bar = page.locator("#agent-list li[data-source=tagger_1] progress")
        await expect(bar).to_have_attribute("value", "95")
        await expect(page.locator("#stat-events")).to_have_text(str(len(positions)))

        # Filters narrow the tail; the stream resumes with them the same way.
        await page.get_by_label("Source id").fill("tagger_0")
        await page.get_by_role("button", name="Apply filters").click()
        await expect(rows).to_have_count(3)
        positions.append(await post_agent(client, "tagger_0", "progress", progress=0.99))
        await post_agent(client, "tagger_1", "progress", progress=0.99)
        await expect(rows).to_have_count(4)
        await expect(rows.first).to_have_attribute("data-position", str(positions[-1]))


async def test_a_token_is_asked_for_once_and_sent_with_every_request(
    browser: Any, server: InProcessServer
) -> None:
    # The server does not enforce tokens yet (issue 9): the browser's requests are checked
    # here instead, answering 401 to any without the token.
    token = "s3cret-token"
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    seen: list[tuple[str, str | None]] = []

    async def guard(route: Any, request: Any) -> None:
        path = request.url.removeprefix(server.base_url)
        needs_token = not (path == "/" or path.startswith("/web/"))
        auth = request.headers.get("authorization")
        if needs_token:
            seen.append((path, auth))
        if needs_token and auth != f"Bearer {token}":
            body = {"status_code": 401, "detail": "a token is required", "extra": {}}
            await route.fulfill(status=401, content_type="application/json", body=json.dumps(body))
            return
        await route.continue_()

    await context.route(f"{server.base_url}/**", guard)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        await page.goto(f"{server.base_url}/")
        dialog = page.get_by_role("dialog", name="Access token needed")
        await expect(dialog).to_be_visible()
        # Cancelled: it does not nag (the streams keep retrying), the header offers it instead.
        await dialog.get_by_role("button", name="Cancel").click()
        await expect(dialog).to_be_hidden()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "unauthorized")
        await asyncio.sleep(1.5)
        assert not await dialog.is_visible()
        await page.get_by_role("button", name="Enter access token").click()
        await expect(dialog).to_be_visible()
        await dialog.get_by_label("Access token").fill(token)
        await dialog.get_by_role("button", name="Use this token").click()
        await expect(dialog).to_be_hidden()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(page.locator("#stat-events")).to_have_text("0")
        assert await page.evaluate("localStorage.getItem('activity.token')") == token

        # After a reload the stored token is used at once: no prompt, no 401.
        before = len(seen)
        await page.reload()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await asyncio.sleep(0.3)
        assert not await dialog.is_visible()
        after_reload = seen[before:]
        assert after_reload
        assert all(auth == f"Bearer {token}" for _, auth in after_reload), after_reload
        paths = {path.split("?")[0] for path, _ in after_reload}
        assert {"/stats/stream", "/agents/stream", "/events/stream"} <= paths
    finally:
        await context.close()


async def test_a_screenshot_of_a_known_state(
    page: Any, server: InProcessServer, site: LocalSite, client: httpx.AsyncClient
) -> None:
    done = await client.post("/ingest", json={"url": f"{site.base_url}/fog"})
    assert done.json()["status"] == "success"
    failed = await client.post("/ingest", json={"url": f"{site.base_url}/missing"})
    assert failed.json()["status"] == "error"
    await post_agent(client, "summarizer_7f3a", "started", agent_name="summarizer")
    await post_agent(client, "tagger_2c41", "started", message="Tagging 10 videos")
    await post_agent(client, "tagger_2c41", "complete", message="Tagged 10 videos")
    await open_dashboard(page, server.base_url)

    site.delays["/slow"] = 10
    await page.get_by_label("URL of a video, channel or article").fill(f"{site.base_url}/slow")
    await page.get_by_role("button", name="Ingest", exact=True).click()
    await expect(page.locator("#ingest-steps li[data-step=fetching]")).to_have_count(1)
    await post_agent(client, "tagger_9b20", "started", message="Tagging 5 videos")
    await post_agent(
        client, "tagger_9b20", "progress", message="Processing video 3/5", progress=0.6
    )
    await expect(page.locator("#agent-list li[data-source=summarizer_7f3a]")).to_have_attribute(
        "data-status", "stalled"
    )
    await post_agent(client, "tagger_9b20", "heartbeat")
    await expect(page.locator("#stat-processing")).to_have_text("2")
    await expect(page.locator("#agent-list li[data-source=tagger_9b20]")).to_have_attribute(
        "data-status", "running"
    )

    await page.locator("#recent-list").get_by_role("link", name=TITLE).click()
    await expect(page.locator("#audit-view table.timeline tbody tr")).to_have_count(
        len(STEPS["article"]) + 3
    )

    # Keyboard: every control has a label and the form is reachable and usable by Tab/Enter.
    unlabelled = await page.evaluate(
        """() => [...document.querySelectorAll('input, select, button, progress')]
            .filter(el => !el.closest('dialog') && !(el.labels?.length || el.ariaLabel ||
                    el.getAttribute('aria-label') || el.textContent.trim()))
            .map(el => el.outerHTML)"""
    )
    assert unlabelled == []
    await page.locator("#ingest-url").focus()
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "ingest-limit"
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "ingest-submit"

    OUTPUT.mkdir(exist_ok=True)
    await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)

    # A narrow screen: one column, nothing wider than the viewport.
    await page.set_viewport_size({"width": 390, "height": 844})
    await asyncio.sleep(0.2)
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a narrow screen"
    await page.screenshot(path=str(OUTPUT / "dashboard-narrow.png"), full_page=True)
    assert (OUTPUT / "dashboard.png").stat().st_size > 10_000


async def test_the_page_and_its_assets_are_served_by_the_service(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)
    for asset, kind in (("/web/app.js", "javascript"), ("/web/style.css", "text/css")):
        response = await client.get(asset)
        assert response.status_code == 200, asset
        assert kind in response.headers["content-type"]
    assert (await client.get("/web/missing.js")).status_code == 404
