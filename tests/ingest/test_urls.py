from __future__ import annotations

import hashlib

import pytest

from app.content.store import article_key
from app.ingest.urls import MAX_URL_LENGTH, DetectedUrl, InvalidUrl, detect_url, url_key

VIDEO_ID = "dQw4w9WgXcQ"
WATCH = f"https://www.youtube.com/watch?v={VIDEO_ID}"
CHANNEL_ID = "UCX6OQ3DkcsbYNE6H8uQQuVA"


@pytest.mark.parametrize(
    "url",
    [
        WATCH,
        f"http://www.youtube.com/watch?v={VIDEO_ID}",
        f"https://youtube.com/watch?v={VIDEO_ID}",
        f"https://m.youtube.com/watch?v={VIDEO_ID}",
        f"https://music.youtube.com/watch?v={VIDEO_ID}&list=RDAMVM{VIDEO_ID}",
        f"https://www.youtube.com/watch?v={VIDEO_ID}&t=42s",
        f"https://www.youtube.com/watch?v={VIDEO_ID}&t=1h2m3s&ab_channel=Rick",
        f"https://www.youtube.com/watch?feature=share&v={VIDEO_ID}",
        f"https://www.youtube.com/watch?list=PLx&index=3&v={VIDEO_ID}&pp=abc",
        f"https://www.youtube.com/watch?v={VIDEO_ID}#t=30",
        f"https://www.youtube.com/watch/{VIDEO_ID}",
        f"https://youtu.be/{VIDEO_ID}",
        f"https://youtu.be/{VIDEO_ID}?t=42",
        f"https://youtu.be/{VIDEO_ID}?si=AbCdEfGh12345678",
        f"https://www.youtube.com/shorts/{VIDEO_ID}",
        f"https://youtube.com/shorts/{VIDEO_ID}?feature=share",
        f"https://www.youtube.com/live/{VIDEO_ID}?si=x",
        f"https://www.youtube.com/embed/{VIDEO_ID}?start=10",
        f"https://www.youtube-nocookie.com/embed/{VIDEO_ID}",
        f"https://www.youtube.com/v/{VIDEO_ID}",
        f"  {WATCH}\n",
        f"HTTPS://WWW.YOUTUBE.COM/watch?v={VIDEO_ID}",
        f"https://www.youtube.com./watch?v={VIDEO_ID}",
        f"https://www.youtube.com:443/watch?v={VIDEO_ID}",
        f"https://www.youtube.com/shorts/{VIDEO_ID}/",
    ],
)
def test_every_spelling_of_a_video_is_the_same_video(url: str) -> None:
    detected = detect_url(url)

    assert detected == DetectedUrl(url=WATCH, type="video", video_id=VIDEO_ID)
    assert url_key(detected) == f"video:{VIDEO_ID}"


@pytest.mark.parametrize("video_id", ["abc_DEF-123", "___________", "-----------", "a1B2c3D4e5F"])
def test_video_ids_of_letters_digits_dash_and_underscore_are_accepted(video_id: str) -> None:
    detected = detect_url(f"https://youtu.be/{video_id}")

    assert detected.video_id == video_id
    assert detected.url == f"https://www.youtube.com/watch?v={video_id}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://www.youtube.com/watch?v=short", "'short'"),
        (f"https://www.youtube.com/watch?v={VIDEO_ID}X", f"'{VIDEO_ID}X'"),
        ("https://www.youtube.com/watch?v=dQw4w9WgXc!", "'dQw4w9WgXc!'"),
        ("https://youtu.be/dQw4w9WgX", "'dQw4w9WgX'"),
        ("https://www.youtube.com/shorts/not-a-video-id-at-all", "'not-a-video-id-at-all'"),
        ("https://m.youtube.com/live/abc", "'abc'"),
        ("https://www.youtube.com/embed/dQw4w9WgXc%20", "'dQw4w9WgXc '"),
        ("https://www.youtube.com/watch?v=", "''"),
    ],
)
def test_a_malformed_video_id_is_refused_naming_the_id(url: str, shown: str) -> None:
    with pytest.raises(InvalidUrl, match="video id") as caught:
        detect_url(url)

    assert shown in str(caught.value)
    assert "11" in str(caught.value)


def test_a_very_long_malformed_id_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidUrl) as caught:
        detect_url("https://www.youtube.com/watch?v=" + "x" * 500)

    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://www.youtube.com/watch", "no video id"),
        ("https://www.youtube.com/watch?feature=share&t=10", "no video id"),
        ("https://youtu.be/", "no video id"),
        ("https://youtu.be", "no video id"),
        ("https://www.youtube.com/shorts/", "no video id"),
        ("https://www.youtube.com/embed", "no video id"),
    ],
)
def test_a_video_url_without_an_id_is_refused(url: str, problem: str) -> None:
    with pytest.raises(InvalidUrl, match=problem):
        detect_url(url)


@pytest.mark.parametrize(
    ("url", "channel", "normalized"),
    [
        ("https://www.youtube.com/@MrBeast", "@MrBeast", "https://www.youtube.com/@MrBeast"),
        ("https://youtube.com/@MrBeast/", "@MrBeast", "https://www.youtube.com/@MrBeast"),
        ("https://www.youtube.com/@MrBeast/videos", "@MrBeast", "https://www.youtube.com/@MrBeast"),
        ("https://m.youtube.com/@MrBeast/featured", "@MrBeast", "https://www.youtube.com/@MrBeast"),
        ("https://www.youtube.com/@some.one-2_x/streams/", "@some.one-2_x", None),
        ("https://www.youtube.com/@MrBeast?si=abc", "@MrBeast", "https://www.youtube.com/@MrBeast"),
        (
            f"https://www.youtube.com/channel/{CHANNEL_ID}",
            f"channel/{CHANNEL_ID}",
            f"https://www.youtube.com/channel/{CHANNEL_ID}",
        ),
        (f"https://youtube.com/channel/{CHANNEL_ID}/videos", f"channel/{CHANNEL_ID}", None),
        (f"https://music.youtube.com/channel/{CHANNEL_ID}", f"channel/{CHANNEL_ID}", None),
        (f"https://www.youtube.com/channel/{CHANNEL_ID}/featured/", f"channel/{CHANNEL_ID}", None),
        ("https://www.youtube.com/c/SomeName", "c/SomeName", "https://www.youtube.com/c/SomeName"),
        ("https://www.youtube.com/c/SomeName/videos/", "c/SomeName", None),
        ("https://www.youtube.com/user/someone", "user/someone", None),
        ("https://www.youtube.com/user/someone/streams", "user/someone", None),
    ],
)
def test_channel_urls_are_detected_in_every_form(
    url: str, channel: str, normalized: str | None
) -> None:
    detected = detect_url(url)

    assert detected.type == "channel"
    assert detected.channel == channel
    assert detected.video_id is None
    assert detected.url == (normalized or f"https://www.youtube.com/{channel}")


def test_a_handle_in_another_script_is_decoded_and_the_url_stays_ascii() -> None:
    detected = detect_url("https://www.youtube.com/@%E5%B0%8F%E7%8C%AB/videos")

    assert detected.channel == "@小猫"
    assert detected.url == "https://www.youtube.com/@%E5%B0%8F%E7%8C%AB"
    assert detected.url.isascii()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://www.youtube.com/channel/UCshort", "channel id 'UCshort'"),
        (f"https://www.youtube.com/channel/XX{CHANNEL_ID[2:]}", "channel id"),
        ("https://www.youtube.com/channel/", "no channel id"),
        ("https://www.youtube.com/@", "handle '@'"),
        ("https://www.youtube.com/@bad!handle", "handle '@bad!handle'"),
        ("https://www.youtube.com/c/", "no channel name"),
        ("https://www.youtube.com/user/a%20b", "name 'user/a b'"),
    ],
)
def test_a_malformed_channel_url_is_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(InvalidUrl, match=problem):
        detect_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/post/1",
        "http://blog.example.org/2024/01/a-post.html?ref=rss",
        "https://www.youtube.com/",
        "https://www.youtube.com/playlist?list=PL0123456789",
        "https://www.youtube.com/embed/videoseries?list=PL0123456789",
        "https://www.youtube.com/results?search_query=cats",
        "https://www.youtube.com/feed/trending",
        "https://notyoutube.com/watch?v=dQw4w9WgXcQ",
        "https://youtube.com.evil.example/watch?v=dQw4w9WgXcQ",
        "https://example.com/youtu.be/dQw4w9WgXcQ",
        "https://gist.github.com/@someone",
        "http://[::1]:8080/page",
        "http://127.0.0.1/",
        "https://bücher.example/straße",
    ],
)
def test_everything_else_over_http_is_an_article(url: str) -> None:
    detected = detect_url(url)

    assert detected == DetectedUrl(url=url, type="article")


def test_an_article_url_loses_its_fragment_and_surrounding_blanks_only() -> None:
    detected = detect_url("  https://example.com/Some/Path?Q=One&b=2#section-3 \n")

    assert detected.url == "https://example.com/Some/Path?Q=One&b=2"
    assert detected.type == "article"


def test_the_same_article_spelled_differently_has_one_key() -> None:
    spellings = [
        "https://example.com/post?id=7",
        "https://example.com/post?id=7#comments",
        "HTTPS://Example.COM/post?id=7",
        " https://example.com/post?id=7 ",
    ]

    keys = {url_key(detect_url(url)) for url in spellings}

    expected = hashlib.sha256(b"https://example.com/post?id=7").hexdigest()[:32]
    assert keys == {f"article:{expected}"}
    assert article_key(spellings[2]) == expected


def test_different_articles_have_different_keys() -> None:
    first = url_key(detect_url("https://example.com/post?id=7"))
    other_query = url_key(detect_url("https://example.com/post?id=8"))
    other_path_case = url_key(detect_url("https://example.com/Post?id=7"))

    assert len({first, other_query, other_path_case}) == 3


def test_channel_keys_ignore_the_case_of_handles_and_names_but_not_of_ids() -> None:
    assert url_key(detect_url("https://www.youtube.com/@MrBeast")) == "channel:@mrbeast"
    assert url_key(detect_url("https://youtube.com/@mrbeast/videos")) == "channel:@mrbeast"
    assert url_key(detect_url("https://www.youtube.com/c/SomeName")) == "channel:c/somename"
    assert (
        url_key(detect_url(f"https://www.youtube.com/channel/{CHANNEL_ID}"))
        == f"channel:channel/{CHANNEL_ID}"
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "URL is empty"),
        ("   \n\t", "URL is empty"),
        ("https://example.com/" + "a" * MAX_URL_LENGTH, "too long"),
        ("ftp://example.com/file", "http:// or https://, not 'ftp:'"),
        ("javascript:alert(1)", "http:// or https://, not 'javascript:'"),
        ("file:///etc/passwd", "http:// or https://"),
        ("mailto:someone@example.com", "http:// or https://"),
        ("www.youtube.com/watch?v=dQw4w9WgXcQ", "http:// or https://"),
        ("example.com", "http:// or https://"),
        ("http://", "no host"),
        ("https:///path", "no host"),
        ("http://user@/x", "no host"),
        ("http:example.com", "no host"),
        ("http://[::1/", "cannot be parsed"),
        ("http://example.com:99999/", "cannot be parsed"),
        ("http://example.com:port/", "cannot be parsed"),
        ("https://exa mple.com/", "cannot be parsed"),
        ("https://example.com/a\nb", "control character"),
        ("https://example.com/\x00", "control character"),
    ],
)
def test_urls_that_cannot_be_ingested_are_refused_naming_the_problem(
    url: str, problem: str
) -> None:
    with pytest.raises(InvalidUrl, match=problem):
        detect_url(url)


def test_the_longest_allowed_url_is_accepted_and_one_more_character_is_not() -> None:
    base = "https://example.com/"
    longest = base + "a" * (MAX_URL_LENGTH - len(base))

    assert detect_url(longest).type == "article"
    with pytest.raises(InvalidUrl, match=f"{MAX_URL_LENGTH + 1} characters"):
        detect_url(longest + "a")


def test_invalid_url_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        detect_url("")
