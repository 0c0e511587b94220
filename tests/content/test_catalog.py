"""Reading stored content back: pages newest first that stay put while items arrive, the
filters, one item whole, and full-text search ranked by BM25, on the embedded engines."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.config import ContentSettings
from app.content import (
    ContentStore,
    InvalidContentQuery,
    content_filter,
    get_content,
    list_content,
    search_content,
)

TEXTS = Path(__file__).resolve().parent.parent / "fixtures" / "texts"
LECTURE = (TEXTS / "lighthouse_lecture_transcript.txt").read_text(encoding="utf-8")
DARWIN = (TEXTS / "darwin_origin_introduction.txt").read_text(encoding="utf-8")
BACKGROUND = [
    text.strip()
    for text in (TEXTS / "background_corpus.txt").read_text(encoding="utf-8").split("---")
    if text.strip()
]
START = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)


@pytest.fixture(params=["mem", "surrealkv"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ContentStore]:
    url = "mem://" if request.param == "mem" else f"surrealkv://{tmp_path / 'content'}"
    opened = await ContentStore.open(ContentSettings(surrealdb_url=url))
    try:
        yield opened
    finally:
        await opened.close()


def at(minutes: float) -> str:
    moment = START + dt.timedelta(minutes=minutes)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def segments_of(text: str, words_each: int = 12) -> list[dict[str, Any]]:
    words = text.split()
    return [
        {"start": index / words_each * 4.0, "duration": 4.0, "text": " ".join(chunk)}
        for index in range(0, len(words), words_each)
        if (chunk := words[index : index + words_each])
    ]


async def put_video(
    store: ContentStore, key: str, title: str, text: str, minutes: float, **extra: Any
) -> None:
    segments = segments_of(text)
    await store.put(
        "video",
        key,
        {
            "video_id": key,
            "url": f"https://www.youtube.com/watch?v={key}",
            "title": title,
            "transcript": " ".join(segment["text"] for segment in segments),
            "segments": segments,
            "ingested_at": at(minutes),
            **extra,
        },
    )


async def put_article(
    store: ContentStore, key: str, title: str, text: str, minutes: float, **extra: Any
) -> None:
    await store.put(
        "article",
        key,
        {"url": f"https://example.com/{key}", "title": title, "text": text}
        | {"ingested_at": at(minutes), **extra},
    )


async def ids_of_all_pages(store: ContentStore, limit: int, **filters: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page = await list_content(store, content_filter(**filters), cursor=cursor, limit=limit)
        seen += [item.id for item in page.items]
        if page.next is None:
            return seen
        cursor = page.next


async def test_pages_list_newest_first_and_stay_put_while_items_arrive(
    store: ContentStore,
) -> None:
    for index in range(7):
        await put_article(store, f"a{index}", f"Article {index}", f"text {index}", index)

    first = await list_content(store, content_filter(), limit=3)
    assert [item.id for item in first.items] == ["article:a6", "article:a5", "article:a4"]
    assert first.next is not None
    # Newer items arrive between pages: the next page goes on where the first ended.
    await put_article(store, "late1", "Late", "late", 100)
    await put_video(store, "late2", "Late video", "late words", 101)
    second = await list_content(store, content_filter(), cursor=first.next, limit=3)
    third = await list_content(store, content_filter(), cursor=second.next, limit=3)

    assert [item.id for item in second.items] == ["article:a3", "article:a2", "article:a1"]
    assert [item.id for item in third.items] == ["article:a0"]
    assert third.next is None
    everything = await ids_of_all_pages(store, 2)
    assert everything[:2] == ["video:late2", "article:late1"]
    assert len(everything) == len(set(everything)) == 9


async def test_storing_an_item_again_keeps_one_entry_under_its_latest_time(
    store: ContentStore,
) -> None:
    await put_article(store, "same", "First", "text", 1)
    await put_article(store, "other", "Other", "text", 2)
    await put_article(store, "same", "Again", "text", 3)

    page = await list_content(store, content_filter())

    assert [(item.id, item.title) for item in page.items] == [
        ("article:same", "Again"),
        ("article:other", "Other"),
    ]


async def test_filters_narrow_the_list(store: ContentStore) -> None:
    await put_video(store, "v1", "Fog signals", LECTURE, 1, channel="Hollow Pine", tags=["fog"])
    await put_video(store, "v2", "Origins", DARWIN, 2, channel="Naturalists", tags=["species"])
    await put_article(store, "a1", "Bread", BACKGROUND[3], 3, tags=["bread", "fog"])
    await store.put(
        "channel",
        "UCpine",
        {"channel_id": "UCpine", "name": "Pine", "video_ids": ["v2"], "ingested_at": at(4)},
    )

    assert await ids_of_all_pages(store, 10, types=["video"]) == ["video:v2", "video:v1"]
    assert await ids_of_all_pages(store, 10, tags=["fog"]) == ["article:a1", "video:v1"]
    assert await ids_of_all_pages(store, 10, channels=["Hollow Pine"]) == ["video:v1"]
    # By channel id, the channel and the videos it listed.
    assert await ids_of_all_pages(store, 10, channels=["UCpine"]) == [
        "channel:UCpine",
        "video:v2",
    ]
    between = await ids_of_all_pages(store, 1, since=at(2), until="2026-03-01T09:03:00Z")
    assert between == ["article:a1", "video:v2"]
    assert await ids_of_all_pages(store, 10, since=at(5)) == []


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"types": ["podcast"]}, "type"),
        ({"since": "last tuesday"}, "since"),
        ({"until": "2026-13-01"}, "until"),
        ({"since": "2026-03-02", "until": "2026-03-01"}, "since"),
        ({"tags": [""]}, "tag"),
        ({"channels": ["x"] * 21}, "channel"),
    ],
)
def test_a_bad_filter_is_refused_naming_it(filters: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidContentQuery) as refused:
        content_filter(**filters)
    assert refused.value.field == field


@pytest.mark.parametrize("cursor", ["nonsense", "WyJ4Il0", "W10", "%%%"])
async def test_a_cursor_not_given_out_is_refused(store: ContentStore, cursor: str) -> None:
    with pytest.raises(InvalidContentQuery, match="cursor"):
        await list_content(store, content_filter(), cursor=cursor)


async def test_an_item_reads_back_whole_with_segments_linking_to_their_second(
    store: ContentStore,
) -> None:
    await put_video(store, "Xk3fQ9pLm2A", "Fog signals", LECTURE, 1, channel="Hollow Pine")

    item = await get_content(store, "video:Xk3fQ9pLm2A")

    assert item is not None
    assert item.title == "Fog signals"
    assert item.channel == "Hollow Pine"
    assert item.text is not None
    assert item.text.split() == LECTURE.split()
    assert item.segments is not None
    assert " ".join(s.text for s in item.segments).split() == LECTURE.split()
    third = item.segments[2]
    assert third.start == 8.0
    assert third.url == "https://www.youtube.com/watch?v=Xk3fQ9pLm2A&t=8s"
    assert await get_content(store, "video:nope") is None
    assert await get_content(store, "podcast:x") is None
    assert await get_content(store, "nonsense") is None


async def fill_corpus(store: ContentStore) -> None:
    """The lecture on fog signals, Darwin, six everyday texts and an article that mentions
    fog once in passing: "fog" is in few of them, so BM25 weighs it as rare."""
    await put_video(store, "lecture", "How lighthouses talk", LECTURE, 1)
    await put_video(store, "darwin", "On the origin of species", DARWIN, 2)
    for index, text in enumerate(BACKGROUND):
        await put_article(store, f"bg{index}", f"Report {index}", text, 3 + index)
    passing = BACKGROUND[0] + " The morning was grey and a little fog hung over the harbour."
    await put_article(store, "passing", "A court report", passing, 20)


async def test_search_ranks_by_how_much_a_text_is_about_the_words(store: ContentStore) -> None:
    await fill_corpus(store)

    found = await search_content(store, "fog", content_filter())

    # The lecture says "fog" a dozen times; the court report once.
    assert [hit.id for hit in found.hits] == ["video:lecture", "article:passing"]
    assert found.hits[0].score > found.hits[1].score > 0
    assert "<mark>fog</mark>" in found.hits[1].snippet
    assert "little <mark>fog</mark> hung over the harbour" in found.hits[1].snippet
    species = await search_content(store, "natural selection species", content_filter())
    assert [hit.id for hit in species.hits] == ["video:darwin"]


async def test_a_transcript_hit_names_the_segment_and_second_it_matched(
    store: ContentStore,
) -> None:
    await fill_corpus(store)
    item = await get_content(store, "video:lecture")
    assert item is not None
    assert item.segments is not None
    first = next(s for s in item.segments if "fog" in s.text.split())

    hit = (await search_content(store, "fog", content_filter(types=["video"]))).hits[0]

    assert hit.segment == first
    assert hit.segment.url == f"https://www.youtube.com/watch?v=lecture&t={int(first.start)}s"
    shown = html.unescape(hit.snippet.replace("<mark>", "").replace("</mark>", "")).strip("…")
    assert item.text is not None
    assert shown in item.text


async def test_stems_and_accents_match_and_the_title_counts(store: ContentStore) -> None:
    await fill_corpus(store)
    await put_article(store, "cafe", "Café signalling", "A note on naïve signals.", 30)

    by_stem = await search_content(store, "signal", content_filter(types=["article"]))
    by_accent = await search_content(store, "naive signals", content_filter())

    assert [hit.id for hit in by_stem.hits] == ["article:cafe"]
    assert [hit.id for hit in by_accent.hits] == ["article:cafe"]
    assert by_accent.hits[0].snippet == "A note on <mark>naïve</mark> <mark>signals</mark>."
    by_title = await search_content(store, "café", content_filter())
    assert by_title.hits[0].id == "article:cafe"


async def test_search_takes_the_list_filters(store: ContentStore) -> None:
    await fill_corpus(store)

    assert (await search_content(store, "fog", content_filter(types=["article"]))).hits[
        0
    ].id == "article:passing"
    assert (await search_content(store, "fog", content_filter(since=at(19)))).hits[
        0
    ].id == "article:passing"
    assert (await search_content(store, "fog", content_filter(tags=["x"]))).hits == []


@pytest.mark.parametrize(
    "query", ["'; DELETE video; --", "$x", "fog @@ fog", "SELECT * FROM video"]
)
async def test_surrealql_in_a_query_is_words_and_changes_nothing(
    store: ContentStore, query: str
) -> None:
    await fill_corpus(store)
    before = await ids_of_all_pages(store, 100)

    found = await search_content(store, query, content_filter())

    assert all(hit.id in before for hit in found.hits)
    assert await ids_of_all_pages(store, 100) == before
    if "fog" in query:
        assert found.hits[0].id == "video:lecture"


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("@@", "no words to search for"),
        ("x" * 10_000, "at most 500 characters, got 10,000"),
    ],
)
async def test_a_query_with_nothing_to_search_for_is_refused(
    store: ContentStore, query: str, said: str
) -> None:
    with pytest.raises(InvalidContentQuery, match=said) as refused:
        await search_content(store, query, content_filter())
    assert refused.value.field == "q"


async def test_a_query_that_matches_nothing_finds_nothing(store: ContentStore) -> None:
    await fill_corpus(store)

    assert (await search_content(store, "zeppelin", content_filter())).hits == []


async def test_records_stored_before_the_listing_are_listed_and_found_after_a_restart(
    tmp_path: Path,
) -> None:
    settings = ContentSettings(surrealdb_url=f"surrealkv://{tmp_path / 'content'}")
    store = await ContentStore.open(settings)
    try:
        await put_video(store, "old", "How lighthouses talk", LECTURE, 1)
        await put_article(store, "older", "A court report", BACKGROUND[0], 0)
        # As a store written before the listing and the search documents existed.
        await store.read(
            "forget",
            "DELETE listing; DELETE document; DELETE content_meta;",
            {},
        )
        assert (await list_content(store, content_filter())).items == []
    finally:
        await store.close()

    reopened = await ContentStore.open(settings)
    try:
        listed = await list_content(reopened, content_filter())
        found = await search_content(reopened, "lighthouses", content_filter())
    finally:
        await reopened.close()

    assert [item.id for item in listed.items] == ["video:old", "article:older"]
    assert [hit.id for hit in found.hits] == ["video:old"]
