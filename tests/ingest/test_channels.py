"""Channel listing through the real yt-dlp and requests, with YouTube's answers recorded.

yt-dlp's HTTP goes through its requests handler (requests is installed), whose adapter is a
``requests.adapters.HTTPAdapter``: ``responses`` intercepts it there, as it does the feed
requests. A request nobody registered fails as a connection error, never reaches a network.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from app.config import IngestSettings
from app.ingest.channels import ChannelListing, channel_feed_url, list_channel
from app.ingest.model import IngestFailure

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "channels"
PAGE = (FIXTURES / "channel_videos.html").read_text(encoding="utf-8")
FEED = (FIXTURES / "videos.xml").read_bytes()
CHANNEL_ID = "UCx7Qm2Lr9TbVn4KpWd3Hs8A"
FEED_URL = channel_feed_url(CHANNEL_ID)
VIDEOS_URL = "https://www.youtube.com/@hollowpine/videos"
CONTINUATION = json.loads((FIXTURES / "browse_continuation.json").read_text(encoding="utf-8"))
BROWSE_URL = re.compile(r"https://www\.youtube\.com/youtubei/v1/browse\b.*")
RESOLVE_URL = re.compile(r"https://www\.youtube\.com/youtubei/v1/navigation/resolve_url.*")
HTML = "text/html; charset=utf-8"
# The fixtures' world: the page says "2 days ago" for a video the feed dates 2025-04-15.
TODAY = datetime.date(2025, 4, 17)
NEWEST_FIRST = [
    "Jq8vN2xLp4A",
    "Tz3kW9bRm1E",
    "hY6pC0sDf5U",
    "Lm4rX7eQa2O",
    "Bw1nH8uGk3I",
    "Pd5sV2yJc9Z",
]
CHANNEL_PAGE = "https://www.youtube.com/@hollowpine"
# What requests says when the name www.youtube.com does not resolve (DNS down).
UNREACHABLE = (
    "HTTPSConnectionPool(host='www.youtube.com', port=443): Max retries exceeded with url: "
    '/@hollowpine (Caused by NameResolutionError("<urllib3.connection.HTTPSConnection object '
    "at 0x7f3a2c1e5d10>: Failed to resolve 'www.youtube.com' ([Errno -3] Temporary failure in "
    'name resolution)"))'
)
NOT_FOUND_JSON = {
    "error": {
        "code": 404,
        "message": "Requested entity was not found.",
        "errors": [{"message": "Requested entity was not found.", "reason": "notFound"}],
        "status": "NOT_FOUND",
    }
}


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def settings(**overrides: Any) -> IngestSettings:
    return IngestSettings(
        **{
            "http_timeout_seconds": 5.0,
            "channel_timeout_seconds": 30.0,
            "retry_attempts": 3,
            "retry_base_seconds": 0.01,
            **overrides,
        }
    )


def page_with(change: Callable[[dict[str, Any]], None]) -> str:
    """The fixture page with its ytInitialData changed."""
    start = PAGE.index("var ytInitialData = ") + len("var ytInitialData = ")
    end = PAGE.index(";</script>", start)
    data = json.loads(PAGE[start:end])
    change(data)
    return PAGE[:start] + json.dumps(data) + PAGE[end:]


def grid(data: dict[str, Any]) -> list[dict[str, Any]]:
    tab = data["contents"]["twoColumnBrowseResultsRenderer"]["tabs"][1]["tabRenderer"]
    items: list[dict[str, Any]] = tab["content"]["richGridRenderer"]["contents"]
    return items


def video_renderers(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for item in grid(data):
        yield item["richItemRenderer"]["content"]["videoRenderer"]


def requested(mock: responses.RequestsMock) -> list[str]:
    return [str(call.request.url) for call in mock.calls]


class Recorder:
    def __init__(self) -> None:
        self.messages: list[str] = []

    async def __call__(self, step: str, message: str, extras: dict[str, Any]) -> None:
        self.messages.append(message)


async def failure_of(coro: Any) -> IngestFailure:
    with pytest.raises(IngestFailure) as caught:
        await coro
    return caught.value


def ids(listing: ChannelListing) -> list[str]:
    return [video.video_id for video in listing.videos]


# --- yt-dlp ---------------------------------------------------------------------------------


async def test_lists_the_videos_tab_newest_first(youtube: responses.RequestsMock) -> None:
    youtube.get(VIDEOS_URL, body=PAGE, content_type=HTML)

    listing = await list_channel(
        "https://www.youtube.com/@hollowpine", "all", settings(), today=TODAY
    )

    assert listing.source == "yt-dlp"
    assert listing.fallback_reason is None
    assert listing.channel_id == CHANNEL_ID
    assert listing.channel_name == "Hollow Pine Woodworking"
    assert listing.channel_url == f"https://www.youtube.com/channel/{CHANNEL_ID}"
    # The upcoming premiere at the top of the tab has nothing to transcribe yet.
    assert ids(listing) == NEWEST_FIRST
    first = listing.videos[0]
    assert first.url == "https://www.youtube.com/watch?v=Jq8vN2xLp4A"
    assert first.title == "Cutting Hand-Cut Dovetails in White Oak (No Jigs)"
    assert first.duration_seconds == 18 * 60 + 42
    assert listing.videos[-1].duration_seconds == 3600 + 2 * 60 + 11
    # "2 days ago", "1 week ago", "3 weeks ago", counted back from today.
    assert [video.published for video in listing.videos[:3]] == [
        "2025-04-15",
        "2025-04-10",
        "2025-03-27",
    ]
    assert requested(youtube) == [VIDEOS_URL]


@pytest.mark.parametrize(
    ("limit", "expected"),
    [("month", NEWEST_FIRST[:3]), ("year", NEWEST_FIRST[:5]), ("all", NEWEST_FIRST)],
)
async def test_date_windows_count_back_from_today(
    youtube: responses.RequestsMock, limit: Any, expected: list[str]
) -> None:
    youtube.get(VIDEOS_URL, body=PAGE, content_type=HTML)

    listing = await list_channel(VIDEOS_URL, limit, settings(), today=TODAY)

    assert ids(listing) == expected
    assert FEED_URL not in requested(youtube)


async def test_today_moves_the_window(youtube: responses.RequestsMock) -> None:
    youtube.get(VIDEOS_URL, body=PAGE, content_type=HTML)

    listing = await list_channel(VIDEOS_URL, "month", settings(), today=TODAY)
    assert listing.videos[-1].published == "2025-03-27"

    # The ages are the page's; a later `today` shifts every date by as much.
    later = await list_channel(
        VIDEOS_URL, "all", settings(), today=TODAY + datetime.timedelta(days=10)
    )
    assert later.videos[0].published == "2025-04-25"


def big_channel_ages() -> list[str]:
    """150 uploads: 45 in the last 15 days, then months old, the last 10 two years old."""
    ages = []
    for number in range(150):
        if number < 45:
            days = number // 3 + 1
            ages.append(f"{days} day{'s' if days > 1 else ''} ago")
        elif number < 140:
            ages.append(f"{number // 15} months ago")
        else:
            ages.append("2 years ago")
    return ages


def serve_big_channel(youtube: responses.RequestsMock, ages: list[str]) -> None:
    """The tab page shows 30 videos; the browse API answers each continuation with 30 more."""
    actions = CONTINUATION["onResponseReceivedActions"][0]["appendContinuationItemsAction"]
    template, more = actions["continuationItems"][0], actions["continuationItems"][-1]

    def video(number: int) -> dict[str, Any]:
        item = copy.deepcopy(template)
        renderer = item["richItemRenderer"]["content"]["videoRenderer"]
        renderer["videoId"] = f"v{number:010d}"
        renderer["title"]["runs"][0]["text"] = f"Shop tip #{len(ages) - number}"
        renderer["publishedTimeText"]["simpleText"] = ages[number]
        return item

    def page(index: int) -> list[dict[str, Any]]:
        items = [video(number) for number in range(index * 30, min(len(ages), index * 30 + 30))]
        if (index + 1) * 30 < len(ages):
            link = copy.deepcopy(more)
            command = link["continuationItemRenderer"]["continuationEndpoint"]
            command["continuationCommand"]["token"] = f"4qmFsgKrCBIYVUN4N1FtMkxyOVRi{index + 1}"
            items.append(link)
        return items

    def browse(request: Any) -> tuple[int, dict[str, str], str]:
        token = json.loads(request.body)["continuation"]
        answer = copy.deepcopy(CONTINUATION)
        index = int(token.removeprefix("4qmFsgKrCBIYVUN4N1FtMkxyOVRi"))
        answer["onResponseReceivedActions"][0]["appendContinuationItemsAction"][
            "continuationItems"
        ] = page(index)
        return 200, {}, json.dumps(answer)

    youtube.get(
        VIDEOS_URL,
        body=page_with(lambda data: grid(data).__setitem__(slice(None), page(0))),
        content_type=HTML,
    )
    youtube.add_callback(
        responses.POST, BROWSE_URL, callback=browse, content_type="application/json"
    )


@pytest.mark.parametrize(
    ("limit", "count", "pages_fetched"),
    [("50", 50, 2), ("100", 100, 4), ("all", 150, 5), ("month", 45, 2), ("year", 140, 5)],
)
async def test_a_long_channel_is_read_only_as_far_as_the_limit_needs(
    youtube: responses.RequestsMock, limit: Any, count: int, pages_fetched: int
) -> None:
    serve_big_channel(youtube, big_channel_ages())

    listing = await list_channel(VIDEOS_URL, limit, settings(), today=TODAY)

    assert ids(listing) == [f"v{number:010d}" for number in range(count)]
    assert listing.videos[0].title == "Shop tip #150"
    assert len(youtube.calls) == pages_fetched


async def test_undated_entries_take_their_dates_from_the_feed(
    youtube: responses.RequestsMock,
) -> None:
    def without_dates(data: dict[str, Any]) -> None:
        for renderer in video_renderers(data):
            renderer.pop("publishedTimeText", None)

    youtube.get(VIDEOS_URL, body=page_with(without_dates), content_type=HTML)
    youtube.get(FEED_URL, body=FEED, content_type="application/atom+xml; charset=UTF-8")
    progress = Recorder()

    listing = await list_channel(VIDEOS_URL, "year", settings(), today=TODAY, progress=progress)

    assert listing.source == "yt-dlp"
    assert ids(listing) == NEWEST_FIRST[:5]
    assert [video.published for video in listing.videos] == [
        "2025-04-15",
        "2025-04-10",
        "2025-03-27",
        "2025-02-13",
        "2024-09-19",
    ]
    assert listing.fallback_reason == "yt-dlp gave no upload dates; dates from the RSS feed"
    assert progress.messages == ["yt-dlp gave no upload dates; dates from the RSS feed..."]

    # Without a date window nobody needs the dates: the feed is not read.
    youtube.calls.reset()
    listing = await list_channel(VIDEOS_URL, "all", settings(), today=TODAY)
    assert ids(listing) == NEWEST_FIRST
    assert all(video.published is None for video in listing.videos)
    assert requested(youtube) == [VIDEOS_URL]


@pytest.mark.parametrize(
    ("url", "page_url"),
    [
        ("https://www.youtube.com/@hollowpine", VIDEOS_URL),
        ("https://youtube.com/@hollowpine/videos", VIDEOS_URL),
        ("https://m.youtube.com/@hollowpine/featured?sub_confirmation=1", VIDEOS_URL),
        (
            f"https://www.youtube.com/channel/{CHANNEL_ID}",
            f"https://www.youtube.com/channel/{CHANNEL_ID}/videos",
        ),
        (
            "https://www.youtube.com/c/HollowPineWoodworking",
            "https://www.youtube.com/c/HollowPineWoodworking/videos",
        ),
        (
            "http://www.youtube.com/user/hollowpine/videos",
            "https://www.youtube.com/user/hollowpine/videos",
        ),
    ],
)
async def test_every_channel_url_form_lists_the_videos_tab(
    youtube: responses.RequestsMock, url: str, page_url: str
) -> None:
    youtube.get(page_url, body=PAGE, content_type=HTML)

    listing = await list_channel(url, "all", settings(), today=TODAY)

    assert listing.channel_id == CHANNEL_ID
    assert ids(listing) == NEWEST_FIRST
    assert requested(youtube) == [page_url]


@pytest.mark.parametrize(
    "url",
    [
        "https://www.youtube.com/watch?v=Jq8vN2xLp4A",
        "https://www.youtube.com/playlist?list=PL590L5WQmH8fJ54F369BLDSqIwcs-TCfs",
        "https://example.com/@hollowpine",
        f"https://www.youtube.com/channel/{CHANNEL_ID[:-2]}",
        "ftp://www.youtube.com/@hollowpine",
    ],
)
async def test_refuses_urls_that_are_not_channels(
    youtube: responses.RequestsMock, url: str
) -> None:
    failure = await failure_of(list_channel(url, "all", settings(), today=TODAY))

    assert failure.kind == "unsupported_url"
    assert not failure.retryable
    assert requested(youtube) == []


# --- the RSS fallback -----------------------------------------------------------------------


def break_ytdlp(youtube: responses.RequestsMock, page_url: str = VIDEOS_URL) -> None:
    youtube.get(page_url, status=500, body="<html>Oops</html>", content_type=HTML)
    youtube.post(RESOLVE_URL, status=500, json={"error": {"code": 500, "status": "INTERNAL"}})


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ("all", NEWEST_FIRST),
        ("50", NEWEST_FIRST),
        ("month", NEWEST_FIRST[:3]),
        ("year", NEWEST_FIRST[:5]),
    ],
)
async def test_falls_back_to_the_feed_when_ytdlp_fails(
    youtube: responses.RequestsMock, limit: Any, expected: list[str]
) -> None:
    break_ytdlp(youtube)
    youtube.get("https://www.youtube.com/@hollowpine", body=PAGE, content_type=HTML)
    youtube.get(FEED_URL, body=FEED, content_type="application/atom+xml; charset=UTF-8")
    progress = Recorder()

    listing = await list_channel(
        "https://www.youtube.com/@hollowpine", limit, settings(), today=TODAY, progress=progress
    )

    assert listing.source == "rss"
    assert listing.channel_id == CHANNEL_ID
    assert listing.channel_name == "Hollow Pine Woodworking"
    assert ids(listing) == expected
    assert listing.videos[0].title == "Cutting Hand-Cut Dovetails in White Oak (No Jigs)"
    assert listing.videos[0].published == "2025-04-15"
    assert listing.fallback_reason is not None
    assert listing.fallback_reason.startswith("yt-dlp failed: ")
    assert "HTTP Error 500" in listing.fallback_reason
    assert progress.messages[-1].endswith("; reading the channel's RSS feed...")
    # The channel id came from the channel page, then the feed.
    assert requested(youtube)[-2:] == ["https://www.youtube.com/@hollowpine", FEED_URL]


async def test_a_channel_id_url_goes_straight_to_the_feed(
    youtube: responses.RequestsMock,
) -> None:
    # A layout yt-dlp cannot read: no ytInitialData in the page at all.
    page_url = f"https://www.youtube.com/channel/{CHANNEL_ID}/videos"
    youtube.get(page_url, body="<html><body>Something went wrong</body></html>")
    youtube.post(RESOLVE_URL, status=500, json={"error": {"code": 500, "status": "INTERNAL"}})
    youtube.get(FEED_URL, body=FEED, content_type="application/atom+xml; charset=UTF-8")

    listing = await list_channel(
        f"https://www.youtube.com/channel/{CHANNEL_ID}", "all", settings(), today=TODAY
    )

    assert listing.source == "rss"
    assert ids(listing) == NEWEST_FIRST
    assert f"https://www.youtube.com/channel/{CHANNEL_ID}" not in requested(youtube)


async def test_a_ytdlp_listing_that_takes_too_long_falls_back_to_the_feed(
    youtube: responses.RequestsMock,
) -> None:
    release = threading.Event()

    def stalled_page(request: Any) -> tuple[int, dict[str, str], str]:
        release.wait(timeout=10)
        # Complete, so that the abandoned listing needs nothing more from the network.
        return 200, {"Content-Type": HTML}, PAGE

    youtube.add_callback(responses.GET, VIDEOS_URL, callback=stalled_page)
    youtube.post(RESOLVE_URL, status=500, json={"error": {"code": 500}})
    youtube.get("https://www.youtube.com/@hollowpine", body=PAGE, content_type=HTML)
    youtube.get(FEED_URL, body=FEED, content_type="application/atom+xml; charset=UTF-8")
    try:
        listing = await list_channel(
            VIDEOS_URL, "all", settings(channel_timeout_seconds=0.5), today=TODAY
        )
    finally:
        release.set()

    assert listing.source == "rss"
    assert listing.fallback_reason == "yt-dlp took longer than 0.5 s"
    assert ids(listing) == NEWEST_FIRST


async def test_an_empty_channel_is_an_empty_listing(youtube: responses.RequestsMock) -> None:
    youtube.get(VIDEOS_URL, body=page_with(lambda data: grid(data).clear()), content_type=HTML)
    empty_feed = re.sub(rb"\s*<entry>.*?</entry>", b"", FEED, flags=re.DOTALL)
    youtube.get(FEED_URL, body=empty_feed, content_type="application/atom+xml; charset=UTF-8")

    listing = await list_channel(VIDEOS_URL, "all", settings(), today=TODAY)

    assert listing.videos == []
    assert listing.channel_id == CHANNEL_ID
    assert listing.channel_name == "Hollow Pine Woodworking"


# --- failures -------------------------------------------------------------------------------


async def test_a_channel_that_does_not_exist(youtube: responses.RequestsMock) -> None:
    youtube.get(
        "https://www.youtube.com/@nosuchchannel/videos", status=404, body="<html>404</html>"
    )
    youtube.post(RESOLVE_URL, status=404, json=NOT_FOUND_JSON)
    youtube.get("https://www.youtube.com/@nosuchchannel", status=404, body="<html>404</html>")

    failure = await failure_of(
        list_channel("https://www.youtube.com/@nosuchchannel", "all", settings(), today=TODAY)
    )

    assert failure.kind == "channel_not_found"
    assert not failure.retryable
    assert "HTTP Error 404" in failure.details["yt_dlp_error"]


async def test_a_channel_id_without_a_feed_does_not_exist(
    youtube: responses.RequestsMock,
) -> None:
    missing = "UCAAAAAAAAAAAAAAAAAAAAAA"
    youtube.get(f"https://www.youtube.com/channel/{missing}/videos", status=404, body="")
    youtube.post(RESOLVE_URL, status=404, json=NOT_FOUND_JSON)
    youtube.get(channel_feed_url(missing), status=404, body="")

    failure = await failure_of(
        list_channel(f"https://www.youtube.com/channel/{missing}", "all", settings())
    )

    assert failure.kind == "channel_not_found"
    assert not failure.retryable


@pytest.mark.parametrize("status", [403, 429])
async def test_youtube_refusing_requests_is_blocked_and_retryable(
    youtube: responses.RequestsMock, status: int
) -> None:
    youtube.get(re.compile(r"https://www\.youtube\.com/.*"), status=status, body="<html></html>")
    youtube.post(RESOLVE_URL, status=status, json={"error": {"code": status}})

    failure = await failure_of(list_channel(VIDEOS_URL, "all", settings(), today=TODAY))

    assert failure.kind == "blocked"
    assert failure.retryable


async def test_an_unreachable_youtube_is_a_retryable_request_failure(
    youtube: responses.RequestsMock,
) -> None:
    down = requests.ConnectionError("Failed to establish a new connection: Network unreachable")
    youtube.get(re.compile(r"https://www\.youtube\.com/.*"), body=down)
    youtube.post(RESOLVE_URL, body=down)

    failure = await failure_of(list_channel(VIDEOS_URL, "all", settings(), today=TODAY))

    assert failure.kind == "request_failed"
    assert failure.retryable


def unreachable(request: Any) -> Any:
    raise requests.ConnectionError(UNREACHABLE)


def youtube_unreachable_for_ytdlp(youtube: responses.RequestsMock) -> None:
    """yt-dlp cannot reach the videos tab, on every attempt: each listing ends in the feed."""
    youtube.add_callback(responses.GET, VIDEOS_URL, callback=unreachable)
    youtube.add_callback(responses.POST, RESOLVE_URL, callback=unreachable)


async def test_a_listing_that_cannot_reach_youtube_is_tried_again(
    youtube: responses.RequestsMock,
) -> None:
    youtube_unreachable_for_ytdlp(youtube)
    # The channel page (for the feed's channel id) fails the first time only.
    youtube.get(CHANNEL_PAGE, body=requests.ConnectionError(UNREACHABLE))
    youtube.get(CHANNEL_PAGE, body=PAGE, content_type=HTML)
    youtube.get(FEED_URL, body=FEED, content_type="application/atom+xml; charset=UTF-8")

    listing = await list_channel(CHANNEL_PAGE, "all", settings(), today=TODAY)

    assert listing.source == "rss"
    assert ids(listing) == NEWEST_FIRST
    assert requested(youtube).count(CHANNEL_PAGE) == 2


async def test_youtube_unreachable_on_every_attempt_fails_in_a_sentence(
    youtube: responses.RequestsMock,
) -> None:
    youtube_unreachable_for_ytdlp(youtube)
    youtube.add_callback(responses.GET, CHANNEL_PAGE, callback=unreachable)

    failure = await failure_of(list_channel(CHANNEL_PAGE, "all", settings(), today=TODAY))

    assert (failure.kind, failure.retryable) == ("request_failed", True)
    assert failure.message == "Could not connect to YouTube (network error)."
    # requests' own words are kept for whoever debugs it, not shown as the message.
    assert UNREACHABLE in failure.details["error"]
    assert failure.details["attempts"] == 3
    assert requested(youtube).count(CHANNEL_PAGE) == 3


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("read timeout", "YouTube did not answer within 5 s."),
        ("deadline", "Reading the channel's RSS feed took longer than 0.5 s."),
    ],
)
async def test_a_feed_that_times_out_is_a_timeout_and_tried_again(
    youtube: responses.RequestsMock, how: str, message: str
) -> None:
    break_ytdlp(youtube)
    youtube.get(CHANNEL_PAGE, body=PAGE, content_type=HTML)
    release = threading.Event()
    asked: list[str] = []

    def slow_feed(request: Any) -> tuple[int, dict[str, str], bytes]:
        asked.append(request.url)
        if how == "read timeout":
            raise requests.ReadTimeout(
                "HTTPSConnectionPool(host='www.youtube.com', port=443): Read timed out. "
                "(read timeout=5.0)"
            )
        release.wait(timeout=10)
        return 200, {"Content-Type": "application/atom+xml"}, FEED

    youtube.add_callback(responses.GET, FEED_URL, callback=slow_feed)
    try:
        failure = await failure_of(
            list_channel(CHANNEL_PAGE, "all", settings(channel_timeout_seconds=0.5), today=TODAY)
        )
    finally:
        release.set()

    assert (failure.kind, failure.retryable) == ("timeout", True)
    assert failure.message == message
    assert failure.details["attempts"] == 3
    assert asked == [FEED_URL] * 3
