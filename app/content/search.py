"""Full-text search over titles, transcripts and article text, ranked by SurrealDB's BM25.

The query text is only ever a bound variable (``$q``): SurrealDB's analyzer splits it into
words, so SurrealQL in it (``'; DELETE content; --``) is searched for as words. The index
gives each hit its score and where its words matched (``search::offsets``); the snippet is
cut around the first match from the stored text and the matched words marked, and a
transcript's match is placed in its segment, so a hit can open the video at that second.
"""

from __future__ import annotations

import bisect
import html
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from surrealdb import RecordID

from app.content.catalog import summary_fields, watch_url
from app.content.filters import ContentFilter, InvalidContentQuery
from app.content.items import SearchHit, SearchResults, Segment
from app.content.schema import DOCUMENT, SEARCHABLE
from app.content.store import ContentStore

__all__ = ["MAX_QUERY_LENGTH", "MAX_SEARCH_LIMIT", "search_content"]

MAX_QUERY_LENGTH: Final = 500
MAX_SEARCH_LIMIT: Final = 100
# The passage shown around a match: this much before it and after it, cut at word ends.
_BEFORE: Final = 80
_AFTER: Final = 200
_WORD = re.compile(r"\w", re.UNICODE)
_NOT_WORDS = re.compile(r"[^\w]+", re.UNICODE)
_HIT_FIELDS: Final = "title, url, ingested_at, tags, channel, author, name"


def _words(query: str) -> str:
    """The words of ``query``: every word must match, and punctuation (which the analyzer
    keeps as words of their own) would then have to be in the text too."""
    return " ".join(_NOT_WORDS.sub(" ", query).split())


def check_query(query: str) -> str:
    """The query without surrounding blanks; :class:`InvalidContentQuery` when there is
    nothing to search for or too much."""
    query = query.strip()
    if not query:
        raise InvalidContentQuery("q", "must not be empty")
    if len(query) > MAX_QUERY_LENGTH:
        raise InvalidContentQuery(
            "q", f"must be at most {MAX_QUERY_LENGTH} characters, got {len(query):,}"
        )
    if not _WORD.search(query):
        raise InvalidContentQuery("q", f"{query[:40]!r} has no words to search for")
    return query


def _statement(filters: ContentFilter) -> tuple[str, dict[str, Any]]:
    where, variables = filters.conditions("item")
    if filters.types:
        where.append("type IN $types")
        variables["types"] = list(filters.types)
    if filters.since is not None:
        where.append("ingested_at >= $since")
        variables["since"] = filters.since
    if filters.until is not None:
        where.append("ingested_at <= $until")
        variables["until"] = filters.until
    conditions = "".join(f" AND {condition}" for condition in where)
    # No item fields here: whatever is selected is worked out for every match before the best
    # are picked, and an item's fields are a read of the whole item.
    statement = (
        "SELECT record::id(id) AS key, search::score(0) + search::score(1) AS score, "
        "search::offsets(0) AS title_offsets, search::offsets(1) AS body_offsets "
        f"FROM {DOCUMENT} WHERE (title @0@ $q OR body @1@ $q){conditions} "
        "ORDER BY score DESC LIMIT $limit"
    )
    return statement, variables


# The best hits' text and fields, read by id once they are known.
_HITS_STATEMENT: Final = (
    "SELECT record::id(id) AS key, item, body, segment_index, "
    f"item.{{{_HIT_FIELDS}}} AS record FROM $ids"
)


def _spans(offsets: Any) -> list[tuple[int, int]]:
    """Where the words matched, in order: ``search::offsets`` gives ``{"0": [{"s", "e"}]}``
    (character positions) per value of the field."""
    if not isinstance(offsets, Mapping):
        return []
    spans = [
        (found["s"], found["e"])
        for found_list in offsets.values()
        if isinstance(found_list, list)
        for found in found_list
        if isinstance(found, Mapping)
        and isinstance(found.get("s"), int)
        and isinstance(found.get("e"), int)
    ]
    return sorted(spans)


def _marked(text: str, spans: Sequence[tuple[int, int]], start: int, end: int) -> str:
    """``text[start:end]`` HTML-escaped, with the spans inside it in ``<mark>``."""
    parts = []
    at = start
    for span_start, span_end in spans:
        if span_start < at or span_end > end:
            continue
        parts.append(html.escape(text[at:span_start]))
        parts.append(f"<mark>{html.escape(text[span_start:span_end])}</mark>")
        at = span_end
    parts.append(html.escape(text[at:end]))
    return "".join(parts)


def _snippet(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """A passage around the first match, at word boundaries, with an ellipsis where cut."""
    first = spans[0][0] if spans else 0
    start = max(0, first - _BEFORE)
    if start > 0:
        space = text.find(" ", start)
        start = space + 1 if 0 <= space < first else start
    end = min(len(text), (spans[0][1] if spans else 0) + _AFTER)
    if end < len(text):
        space = text.rfind(" ", first, end)
        end = space if space > first else end
    snippet = _marked(text, spans, start, end).strip()
    return ("…" if start > 0 else "") + snippet + ("…" if end < len(text) else "")


def _segment_at(video_id: str, index: Any, text: str, offset: int) -> Segment | None:
    """The segment holding character ``offset`` of the transcript ``text``, from the
    document's segment index (``position:start:duration`` entries, in order)."""
    if not isinstance(index, str) or not index:
        return None
    entries = []
    for entry in index.split(" "):
        at, _, rest = entry.partition(":")
        second, _, length = rest.partition(":")
        try:
            entries.append((int(at), float(second), float(length or 0)))
        except ValueError:
            return None
    found = bisect.bisect_right([position for position, _, _ in entries], offset) - 1
    if found < 0:
        return None
    position, start, duration = entries[found]
    end = entries[found + 1][0] - 1 if found + 1 < len(entries) else len(text)
    return Segment(
        start=start, duration=duration, text=text[position:end], url=watch_url(video_id, start)
    )


async def search_content(
    store: ContentStore, query: str, filters: ContentFilter, *, limit: int = 20
) -> SearchResults:
    """The ``limit`` best matches for ``query``, best first."""
    query = check_query(query)
    if not 1 <= limit <= MAX_SEARCH_LIMIT:
        raise InvalidContentQuery("limit", f"must be 1-{MAX_SEARCH_LIMIT}, got {limit}")
    filters = await filters.resolve(store)
    if filters.types and not set(filters.types) & set(SEARCHABLE):
        return SearchResults(query=query, hits=[])
    statement, variables = _statement(filters)
    words = _words(query)
    (ranked,) = await store.read(
        "search content", statement, {**variables, "q": words, "limit": limit}
    )
    matched = {
        ":".join(row["key"]): row
        for row in ranked or []
        if isinstance(row, dict) and isinstance(row.get("key"), list) and len(row["key"]) == 2
    }
    if not matched:
        return SearchResults(query=query, hits=[])
    ids = [RecordID(DOCUMENT, item.split(":", 1)) for item in matched]
    (rows,) = await store.read("read search hits", _HITS_STATEMENT, {"ids": ids})
    found = {row["item"]: row for row in rows or [] if isinstance(row, dict) and row.get("record")}
    return SearchResults(
        query=query,
        hits=[
            _hit({**found[item], **match}, found[item])
            for item, match in matched.items()
            if item in found
        ],
    )


def _hit(row: Mapping[str, Any], body: Mapping[str, Any]) -> SearchHit:
    item = str(row["item"])
    kind, _, key = item.partition(":")
    record = row["record"]
    text = body.get("body")
    spans = _spans(row.get("body_offsets"))
    segment = None
    if isinstance(text, str) and spans:
        snippet = _snippet(text, spans)
        if kind == "video":
            segment = _segment_at(key, body.get("segment_index"), text, spans[0][0])
    else:
        title = record["title"] if isinstance(record.get("title"), str) else ""
        snippet = _marked(title, _spans(row.get("title_offsets")), 0, len(title))
    fields = summary_fields(item, record)
    return SearchHit(
        id=item,
        type=kind,
        title=fields["title"],
        url=fields["url"],
        score=round(float(row.get("score") or 0.0), 4),
        snippet=snippet,
        segment=segment,
        channel=fields["channel"],
        author=fields["author"],
        ingested_at=fields["ingested_at"],
        tags=fields["tags"],
    )
