"""The content store's schema: full-text indexes, and the listing that orders items by time.

Both are defined by the store itself when it opens (``IF NOT EXISTS``: the same statements
on ``surrealkv://``, ``mem://`` and a ``ws://`` server, repeatable on every start).

Full text: one analyzer (words split on character class, lower-cased, accents folded,
English stems, so "Signals" finds "signalling") and BM25 indexes with highlights on the
title and the body of ``document`` records: one per searchable item, ``document:[table, key]``,
holding a copy of its title and text. One table for every kind of item makes one corpus, so
a word's weight (how rare it is) is the same whether a video or an article holds it; an index
per table would weigh a word by the few items of that table alone.

The listing: one small record per item, ``listing:[<order>, "<table>:<key>"]``. Its id sorts
newest first (``order`` counts down with the ingest time), so a page is a range scan of ids
that stops after ``limit`` matches: the engine orders a range by id without reading the
rest, while ``ORDER BY ingested_at`` over the items would read and sort every record.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

__all__ = [
    "DOCUMENT",
    "LISTING",
    "SCHEMA",
    "SEARCHABLE",
    "listing_key",
    "order_of",
]

LISTING: Final = "listing"
DOCUMENT: Final = "document"
ANALYZER: Final = "content_words"

#: Table -> the field holding its searchable text.
SEARCHABLE: Final = {"video": "transcript", "article": "text"}

SCHEMA: Final = f"""
DEFINE ANALYZER IF NOT EXISTS {ANALYZER} TOKENIZERS class
    FILTERS lowercase, ascii, snowball(english);
DEFINE INDEX IF NOT EXISTS {DOCUMENT}_title ON {DOCUMENT} FIELDS title
    SEARCH ANALYZER {ANALYZER} BM25 HIGHLIGHTS;
DEFINE INDEX IF NOT EXISTS {DOCUMENT}_body ON {DOCUMENT} FIELDS body
    SEARCH ANALYZER {ANALYZER} BM25 HIGHLIGHTS;
"""

# Milliseconds since the epoch count down from here; 16 digits cover the year 318857.
_ORDER_BASE: Final = 10**16 - 1
_ORDER_DIGITS: Final = 16


def _epoch_ms(timestamp: str) -> int:
    moment = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def order_of(timestamp: str) -> str:
    """The listing order of an ingest time: later times sort first as strings.

    Raises ValueError for a timestamp that is not ISO 8601.
    """
    return f"{_ORDER_BASE - _epoch_ms(timestamp):0{_ORDER_DIGITS}d}"


def listing_key(ingested_at: str, item: str) -> list[str]:
    """The listing record key of ``item`` (``table:key``) ingested at ``ingested_at``."""
    return [order_of(ingested_at), item]
