"""What SurrealDB's full-text index costs as it grows: the engine alone, no HTTP, no service.

    python -m bench.fulltext                      # 50, 100, 200 and 400 documents
    python -m bench.fulltext --sizes 100,300 --queries 20

The search documents of ``bench.content``'s generated items (the same vocabulary and Zipf
weights, the same lengths) are written one transaction each, with the statement the content
store writes them with, into two embedded ``mem://`` databases side by side, alternating
document by document: one with the content store's schema (``app/content/schema.py``: the
analyzer and the BM25 indexes) and one without any index. At each size the figures are:

- the median time to write one more document, indexed and unindexed, and their ratio: the
  index's share of storing an item, and how it grows with the documents already indexed;
- search latency with the content store's own ranking statement (the 20 best of every
  document a word matches) for words drawn by the same Zipf weights, and its median time per
  matching document: the engine reads every match to rank it, so a query costs about that
  much per document it matches. (Counting the matches, which reads only the index, is what
  tells how many there are.)

These are the engine's figures that bound ``bench.content``: a store can be filled only as
fast as the index takes documents, and a search answers no faster than its matches are read.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import time
from typing import Any

from surrealdb import AsyncSurreal, RecordID

from app.content.filters import ContentFilter
from app.content.schema import DOCUMENT, SCHEMA
from app.content.search import _statement
from bench.content import Corpus, _article, _video
from bench.report import quantile

__all__ = ["main", "run"]

SIZES = (50, 100, 200, 400)
QUERIES = 30
# The last documents before each size are the ones timed.
TIMED = 10
_WRITE = f"UPSERT type::thing('{DOCUMENT}', $key) CONTENT $document"


async def _database(schema: str) -> Any:
    database = AsyncSurreal("mem://")
    await database.connect()
    await database.use("bench", "fulltext")
    if schema:
        await database.query(schema)
    return database


def _documents(corpus: Corpus, count: int) -> list[tuple[list[str], dict[str, Any]]]:
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    documents = []
    for number in range(count):
        at = (start + dt.timedelta(seconds=37 * number)).isoformat()
        table, make, field = (
            ("video", _video, "transcript") if number % 5 < 3 else ("article", _article, "text")
        )
        key, record = make(corpus, number, at)
        documents.append(
            (
                [table, key],
                {
                    "item": RecordID(table, key),
                    "type": table,
                    "title": record["title"],
                    "body": record[field],
                    "ingested_at": at,
                },
            )
        )
    return documents


async def run(sizes: list[int], queries: int) -> list[str]:
    corpus = Corpus.build()
    documents = _documents(corpus, max(sizes))
    words = corpus.take(queries)
    indexed, plain = await _database(SCHEMA), await _database("")
    statement, variables = _statement(ContentFilter())
    lines = [
        "| documents | write one, indexed (ms) | unindexed (ms) | ratio | search p50 / p99 (ms)"
        " | matches per query, median | ms per matching document, median |",
        "|---|---|---|---|---|---|---|",
    ]
    written = 0
    try:
        for size in sorted(sizes):
            with_index: list[float] = []
            without: list[float] = []
            for key, document in documents[written:size]:
                for database, samples in ((indexed, with_index), (plain, without)):
                    began = time.perf_counter()
                    await database.query(_WRITE, {"key": key, "document": document})
                    samples.append(time.perf_counter() - began)
            written = size
            latencies: list[float] = []
            per_match: list[float] = []
            matches: list[int] = []
            for word in words:
                count = await indexed.query(
                    f"SELECT count() FROM {DOCUMENT} WHERE body @1@ $q GROUP ALL", {"q": word}
                )
                began = time.perf_counter()
                await indexed.query(statement, {**variables, "q": word, "limit": 20})
                latencies.append(time.perf_counter() - began)
                found = int(count[0]["count"]) if count else 0
                matches.append(found)
                if found:
                    per_match.append(latencies[-1] / found)
            one = statistics.median(with_index[-TIMED:]) * 1000
            bare = statistics.median(without[-TIMED:]) * 1000
            line = (
                f"| {size:,} | {one:.1f} | {bare:.2f} | {one / bare:.0f}x"
                f" | {quantile(latencies, 0.5) * 1000:.1f} / {quantile(latencies, 0.99) * 1000:.1f}"
                f" | {statistics.median(matches):.0f}"
                f" | {statistics.median(per_match) * 1000 if per_match else 0:.3f} |"
            )
            print(line, flush=True)
            lines.append(line)
    finally:
        await indexed.close()
        await plain.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fulltext", description=__doc__)
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="documents, comma-separated"
    )
    parser.add_argument("--queries", type=int, default=QUERIES, help="searches at each size")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    lines = asyncio.run(run(sizes, args.queries))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
