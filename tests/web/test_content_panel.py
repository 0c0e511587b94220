"""The dashboard's content panel in headless Chromium, against a real server that ingested
the recorded video and the fog article: the newest items, a search whose hits show the
matched words, a hit that opens the item with the passage highlighted and the video at that
second, the item's link to its ingest's timeline, and a screenshot in ``test-output/``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import responses

from tests.fakes.youtube import VIDEO, recorded_video
from tests.support import InProcessServer, LocalSite, make_settings, running_server
from tests.web.test_dashboard import (
    ARTICLE,
    OUTPUT,
    TITLE,
    browser,
    expect,
    open_dashboard,
    page,
)

__all__ = ["browser", "page"]  # fixtures shared with the dashboard's other tests

VIDEO_TITLE = "How Transit Maps Lie to You & Why It Works"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    with recorded_video() as mock:
        yield mock


@pytest.fixture
async def server(tmp_path: Path, youtube: responses.RequestsMock) -> AsyncIterator[InProcessServer]:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        ARCHIVE_DIR=str(tmp_path / "archive"),
        INGEST_ALLOW_PRIVATE_URLS="true",
        AGENTS_AUTO_RUN="true",
    )
    with LocalSite({"/fog": (200, "text/html; charset=utf-8", ARTICLE)}) as site:
        async with (
            running_server(settings) as running,
            httpx.AsyncClient(base_url=running.base_url, timeout=60) as client,
        ):
            for url in (f"https://www.youtube.com/watch?v={VIDEO}", f"{site.base_url}/fog"):
                done = await client.post("/ingest", json={"url": url})
                assert done.json()["status"] == "success", done.text
            running.app.state.article = done.json()
            for _ in range(300):
                items = (await client.get("/content")).json()["items"]
                if all(item["tags"] and item["summary"] for item in items):
                    break
                await asyncio.sleep(0.1)
            yield running


async def test_a_search_hit_opens_the_item_at_its_passage_and_the_video_at_its_second(
    page: Any, server: InProcessServer
) -> None:
    article = server.app.state.article
    await open_dashboard(page, server.base_url)
    panel = page.locator(".panel-content")
    # The newest first, before any search.
    await expect(panel.locator("#content-list li")).to_have_count(2)
    await expect(panel.locator("#content-list li").first).to_contain_text(TITLE)

    await page.get_by_label("Search titles, transcripts and articles").fill("Vignelli")
    await page.get_by_role("button", name="Search", exact=True).click()
    hit = panel.locator("#content-list li.hit")
    await expect(hit).to_have_count(1)
    await expect(hit.locator("mark")).to_have_text("Vignelli")
    watch = hit.get_by_role("link", name="Watch at 0:08")
    await expect(watch).to_have_attribute("href", f"https://www.youtube.com/watch?v={VIDEO}&t=8s")

    await hit.get_by_role("link", name=VIDEO_TITLE).click()
    item = panel.locator("#content-item")
    await expect(item.locator("h3")).to_have_text(VIDEO_TITLE)
    passage = item.locator("li.segment.matched mark.passage")
    await expect(passage).to_contain_text("Massimo Vignelli's 1972 map")
    await expect(item.locator("li.segment.matched a.at")).to_have_attribute(
        "href", f"https://www.youtube.com/watch?v={VIDEO}&t=8s"
    )
    await expect(item.locator(".tags .tag").first).to_be_visible()
    await expect(item.locator(".summary p")).not_to_be_empty()

    # An article: its passage is marked in its text; the item leads to its ingest's timeline.
    await page.get_by_label("Search titles, transcripts and articles").fill("fog signal")
    await page.get_by_role("button", name="Search", exact=True).click()
    await expect(hit).to_have_count(1)
    await expect(hit.locator("mark").first).to_have_text("fog", ignore_case=True)
    await hit.get_by_role("link", name=TITLE).click()
    await expect(item.locator("h3")).to_have_text(TITLE)
    await expect(item.locator(".text mark.passage")).to_contain_text("fog signal")
    OUTPUT.mkdir(exist_ok=True)
    await panel.scroll_into_view_if_needed()
    await panel.screenshot(path=str(OUTPUT / "dashboard-content.png"))
    assert (OUTPUT / "dashboard-content.png").stat().st_size > 10_000

    await item.get_by_role("link", name="Timeline of its ingest").click()
    await expect(page.locator("#audit-view .audit-body")).to_have_attribute(
        "data-ingest", article["ingest_id"]
    )


async def test_a_search_that_finds_nothing_or_is_refused_says_so(
    page: Any, server: InProcessServer
) -> None:
    await open_dashboard(page, server.base_url)
    box = page.get_by_label("Search titles, transcripts and articles")

    await box.fill("zeppelin")
    await page.get_by_role("button", name="Search", exact=True).click()
    await expect(page.locator("#content-status")).to_have_text("Nothing matches “zeppelin”.")
    await box.fill("@@")
    await page.get_by_role("button", name="Search", exact=True).click()
    await expect(page.locator("#content-status")).to_have_text("'@@' has no words to search for")
    await expect(page.locator("#content-list li")).to_have_count(0)


async def test_a_snippet_keeps_the_blanks_around_its_marked_words(
    page: Any, server: InProcessServer
) -> None:
    await open_dashboard(page, server.base_url)
    await page.get_by_label("Search titles, transcripts and articles").fill("Vignelli")
    await page.get_by_role("button", name="Search", exact=True).click()

    snippet = page.locator("#content-list li.hit .snippet")

    await expect(snippet).to_contain_text("Massimo Vignelli's 1972 map called this")
