"""YouTube transcripts and metadata: the real youtube-transcript-api and requests, with YouTube
itself replaced by recorded-shape responses (watch page, innertube player JSON, timedtext XML,
oEmbed) served through ``responses``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import responses
from responses import matchers

from app.config import IngestSettings
from app.ingest.model import IngestFailure, Snippet
from app.ingest.youtube import (
    Transcript,
    VideoMeta,
    build_session,
    fetch_metadata,
    fetch_transcript,
)
from tests.fakes.youtube import (
    GENERATED_ONLY,
    GERMAN_ONLY,
    OEMBED,
    PLAYER,
    VIDEO,
    WATCH,
    calls_to,
    player,
    read_fixture,
    serve_player,
    serve_timedtext,
    serve_video,
    serve_watch_page,
    track_like,
    tracks_of,
    with_tracks,
)

SETTINGS = IngestSettings(
    retry_attempts=3,
    retry_base_seconds=0.5,
    http_timeout_seconds=7.5,
    transcript_timeout_seconds=10.0,
)


@pytest.fixture
def youtube() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


class Recorder:
    """A fake ``sleep`` and ``on_retry`` that only write down what they were asked, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    async def sleep(self, seconds: float) -> None:
        self.log.append(("sleep", seconds))

    async def on_retry(
        self, next_attempt: int, attempts: int, delay: float, failure: IngestFailure
    ) -> None:
        self.log.append(("retry", next_attempt, attempts, delay, failure.kind))

    @property
    def notices(self) -> list[tuple[Any, ...]]:
        return [entry for entry in self.log if entry[0] == "retry"]


# --- success paths -------------------------------------------------------------------------


async def test_manual_track_in_the_preferred_language_wins(
    youtube: responses.RequestsMock,
) -> None:
    serve_video(youtube, VIDEO, player("player_manual_and_generated.json"))

    transcript = await fetch_transcript(VIDEO, SETTINGS)

    assert (transcript.language, transcript.language_code, transcript.is_generated) == (
        "English",
        "en",
        False,
    )
    assert transcript.video_id == VIDEO
    # HTML entities (double-escaped the way YouTube sends them) are decoded, tags and empty
    # captions dropped.
    assert transcript.snippets[:2] == [
        Snippet(text="Every subway map you've used is lying to you.", start=0.4, duration=3.52),
        Snippet(
            text="Stations are spaced evenly, lines run at 45° angles & rivers vanish.",
            start=3.92,
            duration=4.16,
        ),
    ]
    assert transcript.snippets[2].text == (
        'Massimo Vignelli\'s 1972 map called this "a diagram, not a map".'
    )
    assert "[train doors closing]" in [s.text for s in transcript.snippets]
    assert len(transcript.snippets) == 6
    # The auto-generated track was not downloaded at all.
    assert calls_to(youtube, "https://www.youtube.com/api/timedtext") == 1


async def test_preferred_languages_are_tried_in_order(youtube: responses.RequestsMock) -> None:
    serve_video(youtube, VIDEO, player("player_manual_and_generated.json"))

    transcript = await fetch_transcript(VIDEO, IngestSettings(transcript_languages=("de", "en")))

    assert (transcript.language, transcript.language_code) == ("German", "de")
    assert transcript.snippets[0].text == "Jeder U-Bahn-Plan, den du je benutzt hast, lügt dich an."


async def test_auto_generated_track_is_used_when_it_is_the_only_one(
    youtube: responses.RequestsMock,
) -> None:
    serve_video(youtube, GENERATED_ONLY, player("player_generated_only.json"))

    transcript = await fetch_transcript(GENERATED_ONLY, SETTINGS)

    assert transcript.language == "English (auto-generated)"
    assert transcript.is_generated
    assert transcript.snippets[0] == Snippet(text="[Music]", start=0.16, duration=4.08)
    assert transcript.snippets[1].text == "every subway map you've used\nis lying to you"


async def test_a_preferred_language_beats_a_manual_track_in_another_language(
    youtube: responses.RequestsMock,
) -> None:
    base = player("player_manual_and_generated.json")
    _, generated_en, manual_de = tracks_of(base)
    serve_video(youtube, VIDEO, with_tracks(base, manual_de, generated_en))

    transcript = await fetch_transcript(VIDEO, SETTINGS)

    assert (transcript.language_code, transcript.is_generated) == ("en", True)


async def test_other_languages_are_the_fallback(youtube: responses.RequestsMock) -> None:
    serve_video(youtube, GERMAN_ONLY, player("player_german_only.json"))

    transcript = await fetch_transcript(GERMAN_ONLY, IngestSettings(transcript_languages=("en",)))

    assert (transcript.language, transcript.language_code, transcript.is_generated) == (
        "German",
        "de",
        False,
    )
    assert "Diagramm" in transcript.text


async def test_fallback_takes_a_manual_track_before_a_generated_one(
    youtube: responses.RequestsMock,
) -> None:
    base = player("player_german_only.json")
    (german,) = tracks_of(base)
    generated_english_first = track_like(german, code="en", name="English", asr=True)
    # Served in the track list before the manual German one, and still not chosen.
    data = with_tracks(base, generated_english_first, german)
    serve_video(youtube, GERMAN_ONLY, data)

    transcript = await fetch_transcript(GERMAN_ONLY, IngestSettings(transcript_languages=("fr",)))

    assert (transcript.language_code, transcript.is_generated) == ("de", False)


async def test_a_regional_manual_track_counts_as_the_preferred_language(
    youtube: responses.RequestsMock,
) -> None:
    base = player("player_manual_and_generated.json")
    manual_en, generated_en, _ = tracks_of(base)
    british = track_like(manual_en, code="en-GB", name="English (United Kingdom)", asr=False)
    british["vssId"] = ".en"  # serve the English transcript file for it
    serve_video(youtube, VIDEO, with_tracks(base, generated_en, british))

    transcript = await fetch_transcript(VIDEO, SETTINGS)

    assert (transcript.language, transcript.is_generated) == ("English (United Kingdom)", False)


def test_text_joins_snippets_into_one_paragraph() -> None:
    transcript = Transcript(
        video_id=VIDEO,
        language="English (auto-generated)",
        language_code="en",
        is_generated=True,
        snippets=[
            Snippet(text="every subway map\nyou've used", start=0.0, duration=2.0),
            Snippet(text="   ", start=2.0, duration=0.5),
            Snippet(text="is  lying to you ", start=2.5, duration=2.0),
        ],
    )

    assert transcript.text == "every subway map you've used is lying to you"


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "kind", "words"),
    [
        ("player_transcripts_disabled.json", "transcripts_disabled", "Subtitles are turned off"),
        ("player_video_unavailable.json", "video_unavailable", "unavailable"),
        ("player_age_restricted.json", "age_restricted", "age-restricted"),
        (
            "player_unplayable.json",
            "video_unplayable",
            "not made this video available in your country",
        ),
        ("player_private.json", "video_unplayable", "This video is private"),
    ],
)
async def test_permanent_failures_are_reported_at_once(
    youtube: responses.RequestsMock, fixture: str, kind: str, words: str
) -> None:
    serve_watch_page(youtube, VIDEO)
    serve_player(youtube, VIDEO, player(fixture))
    recorder = Recorder()

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, SETTINGS, on_retry=recorder.on_retry, sleep=recorder.sleep)

    assert info.value.kind == kind
    assert info.value.retryable is False
    assert words in info.value.message
    assert info.value.as_details()["error_kind"] == kind
    # Not retried: one watch page, one player request, no waiting.
    assert calls_to(youtube, WATCH) == 1
    assert calls_to(youtube, PLAYER) == 1
    assert recorder.log == []


async def test_an_unplayable_video_names_youtubes_reason(youtube: responses.RequestsMock) -> None:
    serve_watch_page(youtube, VIDEO)
    serve_player(youtube, VIDEO, player("player_unplayable.json"))

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, SETTINGS)

    assert info.value.message == (
        "YouTube will not play this video: The uploader has not made this video available "
        "in your country. This video is not available in your country."
    )
    assert info.value.details["reason"] == (
        "The uploader has not made this video available in your country"
    )


async def test_a_video_with_an_empty_track_list_has_no_transcript(
    youtube: responses.RequestsMock,
) -> None:
    serve_video(youtube, VIDEO, with_tracks(player("player_manual_and_generated.json")))

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, SETTINGS)

    assert (info.value.kind, info.value.retryable) == ("no_transcript", False)
    assert calls_to(youtube, WATCH) == 1


async def test_a_url_instead_of_an_id_is_refused_without_asking_youtube(
    youtube: responses.RequestsMock,
) -> None:
    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(f"https://www.youtube.com/watch?v={VIDEO}", SETTINGS)

    assert (info.value.kind, info.value.retryable) == ("invalid_video_id", False)
    assert len(youtube.calls) == 0


def one_attempt() -> IngestSettings:
    return IngestSettings(retry_attempts=1, http_timeout_seconds=7.5)


async def test_http_429_means_this_ip_is_blocked(youtube: responses.RequestsMock) -> None:
    serve_watch_page(youtube, VIDEO, status=429, body=read_fixture("recaptcha.html"))

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, one_attempt())

    assert (info.value.kind, info.value.retryable) == ("ip_blocked", True)
    assert "cloud" in info.value.message
    assert "YOUTUBE_PROXY_URL" in info.value.message


async def test_a_captcha_page_means_this_ip_is_blocked(youtube: responses.RequestsMock) -> None:
    serve_watch_page(youtube, VIDEO, body=read_fixture("recaptcha.html"))

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, one_attempt())

    assert (info.value.kind, info.value.retryable) == ("ip_blocked", True)


async def test_a_blocked_ip_behind_the_proxy_says_the_proxy_is_blocked_too(
    youtube: responses.RequestsMock,
) -> None:
    serve_watch_page(youtube, VIDEO, status=429)

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(
            VIDEO,
            IngestSettings(retry_attempts=1, youtube_proxy_url="http://proxy.internal:3128"),
        )

    assert info.value.kind == "ip_blocked"
    assert "even through the proxy in YOUTUBE_PROXY_URL" in info.value.message


async def test_a_bot_check_means_the_request_was_blocked(
    youtube: responses.RequestsMock,
) -> None:
    serve_watch_page(youtube, VIDEO)
    serve_player(youtube, VIDEO, player("player_bot_check.json"))

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, one_attempt())

    assert (info.value.kind, info.value.retryable) == ("request_blocked", True)
    assert "not a bot" in info.value.message
    assert "YOUTUBE_PROXY_URL" in info.value.message


async def test_a_429_on_the_transcript_itself_is_an_ip_block(
    youtube: responses.RequestsMock,
) -> None:
    data = player("player_manual_and_generated.json")
    serve_watch_page(youtube, VIDEO)
    serve_player(youtube, VIDEO, data)
    serve_timedtext(youtube, data, status=429)

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, one_attempt())

    assert (info.value.kind, info.value.retryable) == ("ip_blocked", True)


async def test_a_server_error_is_a_failed_request_with_its_status(
    youtube: responses.RequestsMock,
) -> None:
    serve_watch_page(youtube, VIDEO)
    serve_player(youtube, VIDEO, {"error": {"code": 500}}, status=500)

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, one_attempt())

    assert (info.value.kind, info.value.retryable) == ("request_failed", True)
    assert "HTTP 500" in info.value.message
    assert info.value.details["http_status"] == 500


async def test_an_unreachable_youtube_is_a_failed_request(
    youtube: responses.RequestsMock,
) -> None:
    youtube.get(WATCH, body=requests.ConnectionError("Name or service not known"))

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, one_attempt())

    assert (info.value.kind, info.value.retryable) == ("request_failed", True)
    assert "Could not connect to YouTube" in info.value.message


async def test_a_failing_proxy_is_named_without_its_password(
    youtube: responses.RequestsMock,
) -> None:
    proxy = "http://user:secret@proxy.internal:3128"
    youtube.get(WATCH, body=requests.exceptions.ProxyError(f"Unable to connect to proxy {proxy}"))

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, IngestSettings(retry_attempts=1, youtube_proxy_url=proxy))

    assert (info.value.kind, info.value.retryable) == ("request_failed", True)
    assert "YOUTUBE_PROXY_URL" in info.value.message
    assert "secret" not in json.dumps(info.value.as_details())


async def test_a_watch_page_without_an_api_key_is_a_failed_request(
    youtube: responses.RequestsMock,
) -> None:
    serve_watch_page(youtube, VIDEO, body="<!DOCTYPE html><html><body>Oops</body></html>")

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, one_attempt())

    assert (info.value.kind, info.value.retryable) == ("request_failed", True)
    assert "could not be read" in info.value.message


async def test_a_request_that_times_out_is_a_timeout(youtube: responses.RequestsMock) -> None:
    youtube.get(WATCH, body=requests.ReadTimeout("read timed out"))

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, one_attempt())

    assert (info.value.kind, info.value.retryable) == ("timeout", True)
    assert "7.5 s" in info.value.message


async def test_a_fetch_that_outlasts_the_overall_timeout_is_abandoned(
    youtube: responses.RequestsMock,
) -> None:
    release = threading.Event()

    def stall(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        release.wait(5)
        return (503, {}, "")

    youtube.add_callback(responses.GET, WATCH, callback=stall)
    settings = IngestSettings(retry_attempts=1, transcript_timeout_seconds=0.05)
    try:
        with pytest.raises(IngestFailure) as info:
            await fetch_transcript(VIDEO, settings)
    finally:
        release.set()

    assert (info.value.kind, info.value.retryable) == ("timeout", True)
    assert "0.05 s" in info.value.message


# --- retries -------------------------------------------------------------------------------


async def test_a_blocked_request_is_retried_with_backoff_and_then_succeeds(
    youtube: responses.RequestsMock,
) -> None:
    serve_watch_page(youtube, VIDEO, status=429)
    serve_watch_page(youtube, VIDEO, status=429)
    serve_video(youtube, VIDEO, player("player_manual_and_generated.json"))
    recorder = Recorder()

    transcript = await fetch_transcript(
        VIDEO, SETTINGS, on_retry=recorder.on_retry, sleep=recorder.sleep
    )

    assert transcript.language == "English"
    # Each notice comes before its wait, so the user sees "retrying in N s" while waiting.
    assert recorder.log == [
        ("retry", 2, 3, 0.5, "ip_blocked"),
        ("sleep", 0.5),
        ("retry", 3, 3, 1.0, "ip_blocked"),
        ("sleep", 1.0),
    ]
    assert calls_to(youtube, WATCH) == 3


async def test_a_block_that_persists_fails_as_retryable_after_every_attempt(
    youtube: responses.RequestsMock,
) -> None:
    serve_watch_page(youtube, VIDEO, status=429)
    recorder = Recorder()

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(
            VIDEO,
            IngestSettings(retry_attempts=4, retry_base_seconds=2.0),
            on_retry=recorder.on_retry,
            sleep=recorder.sleep,
        )

    assert (info.value.kind, info.value.retryable) == ("ip_blocked", True)
    assert info.value.details["attempts"] == 4
    assert calls_to(youtube, WATCH) == 4
    assert calls_to(youtube, PLAYER) == 0
    assert [entry[1:4] for entry in recorder.notices] == [(2, 4, 2.0), (3, 4, 4.0), (4, 4, 8.0)]


async def test_retries_work_without_a_notice_callback(youtube: responses.RequestsMock) -> None:
    youtube.get(WATCH, status=500)
    recorder = Recorder()

    with pytest.raises(IngestFailure) as info:
        await fetch_transcript(VIDEO, SETTINGS, sleep=recorder.sleep)

    assert info.value.kind == "request_failed"
    assert recorder.log == [("sleep", 0.5), ("sleep", 1.0)]
    assert calls_to(youtube, WATCH) == 3


# --- the session ---------------------------------------------------------------------------


async def test_every_request_carries_the_configured_timeout(
    youtube: responses.RequestsMock,
) -> None:
    serve_video(youtube, VIDEO, player("player_manual_and_generated.json"))

    await fetch_transcript(VIDEO, SETTINGS)

    timeouts = [getattr(call.request, "req_kwargs", {}).get("timeout") for call in youtube.calls]
    assert len(timeouts) == 3  # watch page, player, timedtext
    assert timeouts == [7.5, 7.5, 7.5]


async def test_an_explicit_timeout_is_left_alone(youtube: responses.RequestsMock) -> None:
    youtube.get(WATCH, body="ok")
    session = build_session(SETTINGS)

    session.get(WATCH, timeout=1.0)

    assert getattr(youtube.calls[0].request, "req_kwargs", {})["timeout"] == 1.0


async def test_requests_go_through_the_configured_proxy(
    youtube: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = "http://user:secret@proxy.internal:3128"
    # A proxy from the environment must not override the YouTube-specific one.
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy.internal:8080")
    settings = IngestSettings(youtube_proxy_url=proxy)
    serve_video(youtube, VIDEO, player("player_manual_and_generated.json"))

    assert build_session(settings).proxies == {"http": proxy, "https": proxy}
    await fetch_transcript(VIDEO, settings)

    used = [getattr(call.request, "req_kwargs", {}).get("proxies") for call in youtube.calls]
    assert used == [{"http": proxy, "https": proxy}] * 3


def test_the_session_looks_like_a_browser() -> None:
    session = build_session(IngestSettings())

    assert session.headers["User-Agent"].startswith("Mozilla/5.0")
    assert "Chrome/" in session.headers["User-Agent"]
    assert session.headers["Accept-Language"].startswith("en-US")
    assert session.proxies == {}


# --- metadata ------------------------------------------------------------------------------


def serve_oembed(mock: responses.RequestsMock, *, status: int = 200, body: str) -> None:
    mock.get(
        OEMBED,
        body=body,
        status=status,
        content_type="application/json",
        match=[
            matchers.query_param_matcher(
                {"url": f"https://www.youtube.com/watch?v={VIDEO}", "format": "json"}
            )
        ],
    )


async def test_metadata_comes_from_oembed(youtube: responses.RequestsMock) -> None:
    serve_oembed(youtube, body=read_fixture("oembed.json"))

    meta = await fetch_metadata(VIDEO, SETTINGS)

    assert meta == VideoMeta(
        title="How Transit Maps Lie to You & Why It Works",
        author_name="Lines & Stations",
        author_url="https://www.youtube.com/@linesandstations",
        thumbnail_url="https://i.ytimg.com/vi/Xk3fQ9pLm2A/hqdefault.jpg",
    )
    assert getattr(youtube.calls[0].request, "req_kwargs", {})["timeout"] == 7.5


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, "Not Found"),
        (401, "Unauthorized"),
        (200, "<!DOCTYPE html><html><body>Consent</body></html>"),
        (200, '["not", "an", "object"]'),
    ],
)
async def test_metadata_is_empty_when_oembed_fails(
    youtube: responses.RequestsMock, status: int, body: str
) -> None:
    serve_oembed(youtube, status=status, body=body)

    assert await fetch_metadata(VIDEO, SETTINGS) == VideoMeta()


async def test_metadata_is_empty_when_youtube_is_unreachable(
    youtube: responses.RequestsMock,
) -> None:
    assert await fetch_metadata(VIDEO, SETTINGS, session=build_session(SETTINGS)) == VideoMeta()
