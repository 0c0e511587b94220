"""Where ingested content lands: the SurrealDB content store and the on-disk archive."""

from __future__ import annotations

from app.content.archive import Archive
from app.content.store import (
    TABLES,
    ContentStore,
    ContentStoreLocked,
    ContentUnavailable,
    article_key,
    normalize_article_url,
)

__all__ = [
    "TABLES",
    "Archive",
    "ContentStore",
    "ContentStoreLocked",
    "ContentUnavailable",
    "article_key",
    "normalize_article_url",
]
