"""A stand-in for YouTube at the edge of the network: recorded-shape watch pages, innertube
player JSON and timedtext XML, served through ``responses`` to the real youtube-transcript-api
and requests."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import responses
from responses import matchers

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "youtube"

API_KEY = "AIzaSyAO_FJ2SlqU8Q4STEHLGCilw_Y9_11qcW8"  # the one in watch.html
WATCH = "https://www.youtube.com/watch"
PLAYER = "https://www.youtube.com/youtubei/v1/player"
OEMBED = "https://www.youtube.com/oembed"

VIDEO = "Xk3fQ9pLm2A"  # manual English, auto-generated English, manual German
GENERATED_ONLY = "Q7mTr2vXbN4"
GERMAN_ONLY = "Lp5Zc8wHd0E"

# Which timedtext file each caption track (by vssId) serves.
TIMEDTEXT = {
    ".en": "timedtext_en.xml",
    "a.en": "timedtext_en_asr.xml",
    ".de": "timedtext_de.xml",
}


def read_fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def player(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(read_fixture(name))
    return data


def serve_watch_page(
    mock: responses.RequestsMock, video_id: str, *, status: int = 200, body: str | None = None
) -> None:
    mock.get(
        WATCH,
        body=read_fixture("watch.html") if body is None else body,
        status=status,
        content_type="text/html; charset=utf-8",
        match=[matchers.query_param_matcher({"v": video_id})],
    )


def serve_player(
    mock: responses.RequestsMock, video_id: str, data: dict[str, Any], *, status: int = 200
) -> None:
    mock.post(
        PLAYER,
        json=data,
        status=status,
        match=[
            # Only a key read from the watch page and this video's id get an answer.
            matchers.query_param_matcher({"key": API_KEY}),
            matchers.json_params_matcher({"videoId": video_id}, strict_match=False),
        ],
    )


def serve_timedtext(
    mock: responses.RequestsMock, data: dict[str, Any], *, status: int = 200
) -> None:
    """Serve each caption track's transcript at exactly the URL the player JSON gives for it
    (the library drops ``&fmt=srv3`` to get the plain XML format)."""
    renderer = data.get("captions", {}).get("playerCaptionsTracklistRenderer", {})
    for track in renderer.get("captionTracks", []):
        url, _, query = track["baseUrl"].replace("&fmt=srv3", "").partition("?")
        mock.get(
            url,
            body=read_fixture(TIMEDTEXT[track["vssId"]]),
            status=status,
            content_type="text/xml; charset=UTF-8",
            match=[matchers.query_string_matcher(query)],
        )


def serve_video(mock: responses.RequestsMock, video_id: str, data: dict[str, Any]) -> None:
    serve_watch_page(mock, video_id)
    serve_player(mock, video_id, data)
    serve_timedtext(mock, data)


@contextlib.contextmanager
def recorded_video(video_id: str = VIDEO) -> Iterator[responses.RequestsMock]:
    """YouTube serving ``video_id`` (its oEmbed, watch page, player and captions: manual and
    generated English, manual German), and the local servers reached for real."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(OEMBED, body=read_fixture("oembed.json"), content_type="application/json")
        serve_video(mock, video_id, player("player_manual_and_generated.json"))
        mock.add_passthru("http://127.0.0.1")
        yield mock


def calls_to(mock: responses.RequestsMock, prefix: str) -> int:
    return sum(1 for call in mock.calls if (call.request.url or "").startswith(prefix))


def tracks_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    tracks: list[dict[str, Any]] = data["captions"]["playerCaptionsTracklistRenderer"][
        "captionTracks"
    ]
    return tracks


def with_tracks(data: dict[str, Any], *tracks: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(data)
    changed["captions"]["playerCaptionsTracklistRenderer"]["captionTracks"] = list(tracks)
    return changed


def track_like(track: dict[str, Any], *, code: str, name: str, asr: bool) -> dict[str, Any]:
    """A caption track for another language, shaped like ``track``."""
    changed = copy.deepcopy(track)
    changed["baseUrl"] = changed["baseUrl"].replace(
        f"&lang={track['languageCode']}", f"&lang={code}"
    )
    if asr:
        changed["baseUrl"] = changed["baseUrl"].replace("&key=yt8", "&key=yt8&kind=asr")
        changed["kind"] = "asr"
    changed["languageCode"] = code
    changed["name"] = {"runs": [{"text": name}]}
    changed["vssId"] = ("a." if asr else ".") + code
    return changed
