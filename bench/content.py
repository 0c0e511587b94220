"""Reading stored content as it grows: list and search latency over HTTP with 100, 1,000 and
10,000 items.

    python -m bench.content                 # 100, 1,000 and 10,000 items, 3 rounds
    python -m bench.content --quick         # 100, 1,000 and 3,000 items, 2 rounds
    python -m bench.content --data-dir DIR  # keep the filled stores in DIR for the next run

Each size gets its own embedded content store (``surrealkv://``), filled in this process
through ``ContentStore.put`` exactly as ingests store items: three videos in five (a
transcript of 5 to 40 minutes at about 150 words a minute, in timed segments of about ten
words) and two articles in five (400 to 2,500 words in paragraphs), with titles, channels,
authors, tags and summaries. Their prose is generated from a vocabulary of about 3,000
words (the words of the test corpus in ``tests/fixtures/texts`` and made-up ones), drawn
with a Zipf distribution as words in real text are, so that some words are in nearly
every item and most in a few; a seed makes every run generate the same items.

Then ``python -m app serve`` runs on each store (SQLite log in a scratch directory), and the
measurements go to all of them in turn, request by request (A B C A B C …), so the machine's
noise falls on every size alike. One request at a time on a keep-alive connection:

- ``GET /content?limit=20``: the first page, and the next four pages from each cursor;
- ``GET /content?type=article&limit=20``: a page filtered by type;
- ``GET /content/search?q=…``: 200 queries of one or two words, drawn from the vocabulary
  by the same Zipf distribution (common words with many hits, rare ones with a few), each
  checked to answer 200 with its hits ranked.

Figures: p50 and p99 per size, with the ratio of each size to the smallest (a list that
reads only its page stays flat; search grows with the hits it ranks). Target: search p99
under 100 ms at the largest size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.config import ContentSettings
from app.content import ContentStore
from app.events.envelope import format_timestamp
from bench.load import REPO_ROOT, free_port, start_server, stop_server
from bench.report import Figure, quantile, render

__all__ = ["Corpus", "fill_store", "main", "run"]

SIZES = (100, 1_000, 10_000)
QUICK_SIZES = (100, 1_000, 3_000)
QUERIES = 200
PAGES = 5
PAGE = 20
SEED = 20250124
TEXTS = REPO_ROOT / "tests" / "fixtures" / "texts"
SYLLABLES = ("ka", "lo", "mi", "ren", "sa", "tor", "vel", "un", "dri", "po", "th", "es", "ar")
CHANNELS = 60


@dataclass
class Corpus:
    """Generated prose: words drawn from a vocabulary with Zipf weights."""

    rng: random.Random
    words: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, seed: int = SEED, size: int = 3_000) -> Corpus:
        rng = random.Random(seed)
        seen: dict[str, None] = {}
        for path in sorted(TEXTS.glob("*.txt")):
            if path.name == "README.txt":
                continue
            for word in re.findall(r"[a-z]+", path.read_text(encoding="utf-8").lower()):
                if len(word) > 1:
                    seen.setdefault(word)
        words = list(seen)
        while len(words) < size:
            made = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
            if made not in seen:
                seen.setdefault(made)
                words.append(made)
        rng.shuffle(words)
        words = words[:size]
        weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(words))]
        return cls(rng, words, weights)

    def take(self, count: int) -> list[str]:
        return self.rng.choices(self.words, self.weights, k=count)

    def sentence(self) -> str:
        words = self.take(self.rng.randint(8, 24))
        return " ".join(words).capitalize() + "."

    def prose(self, words: int) -> list[str]:
        sentences: list[str] = []
        count = 0
        while count < words:
            sentences.append(self.sentence())
            count += sentences[-1].count(" ") + 1
        return sentences

    def title(self) -> str:
        return " ".join(self.take(self.rng.randint(4, 9))).title()


def _video(corpus: Corpus, number: int, at: str) -> tuple[str, dict[str, Any]]:
    rng = corpus.rng
    video_id = f"v{number:010d}"
    words = " ".join(corpus.prose(rng.randint(5, 40) * 150)).split()
    segments = []
    start = 0.0
    for index in range(0, len(words), 10):
        duration = round(rng.uniform(2.5, 5.5), 2)
        segments.append(
            {
                "start": round(start, 2),
                "duration": duration,
                "text": " ".join(words[index : index + 10]),
            }
        )
        start += duration
    transcript = " ".join(segment["text"] for segment in segments)
    return video_id, {
        "video_id": video_id,
        "url": f"https://www.youtube.com/watch?v={video_id}",
        "title": corpus.title(),
        "channel": f"Channel {rng.randrange(CHANNELS)}",
        "language": "English",
        "language_code": "en",
        "transcript": transcript,
        "transcript_length": len(transcript),
        "segments": segments,
        "tags": corpus.take(8),
        "summary": " ".join(corpus.sentence() for _ in range(3)),
        "ingest_id": f"ing_bench{number:010d}",
        "ingested_at": at,
    }


def _article(corpus: Corpus, number: int, at: str) -> tuple[str, dict[str, Any]]:
    rng = corpus.rng
    key = f"{number:032x}"
    sentences = corpus.prose(rng.randint(400, 2_500))
    paragraphs = [" ".join(sentences[index : index + 5]) for index in range(0, len(sentences), 5)]
    text = "\n\n".join(paragraphs)
    return key, {
        "url": f"https://example.com/posts/{key}",
        "title": corpus.title(),
        "author": f"Author {rng.randrange(200)}",
        "date": "2025-06-01",
        "language": "en",
        "text": text,
        "text_length": len(text),
        "tags": corpus.take(8),
        "summary": " ".join(corpus.sentence() for _ in range(3)),
        "ingest_id": f"ing_bench{number:010d}",
        "ingested_at": at,
    }


async def fill_store(path: Path, count: int, seed: int = SEED) -> float:
    """A content store at ``path`` holding ``count`` generated items; seconds it took."""
    corpus = Corpus.build(seed)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    began = time.perf_counter()
    store = await ContentStore.open(ContentSettings(surrealdb_url=f"surrealkv://{path}"))
    try:
        for number in range(count):
            at = format_timestamp(start + dt.timedelta(seconds=37 * number))
            make = _video if number % 5 < 3 else _article
            key, record = make(corpus, number, at)
            await store.put("video" if make is _video else "article", key, record)
            if (number + 1) % 1000 == 0:
                print(f"  {path.name}: {number + 1:,} items", file=sys.stderr, flush=True)
    finally:
        await store.close()
    return time.perf_counter() - began


@dataclass
class Service:
    """One size's store served by ``python -m app serve``, and its samples."""

    size: int
    store: Path
    scratch: Path
    process: Any = None
    client: httpx.AsyncClient | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.size:,} items"

    async def start(self) -> None:
        port = free_port()
        env = {
            "DATABASE_URL": f"sqlite+aiosqlite:///{self.scratch / 'events.db'}",
            "SURREALDB_URL": f"surrealkv://{self.store}",
            "ARCHIVE_DIR": str(self.scratch / "archive"),
            "AGENTS_AUTO_RUN": "false",
        }
        self.process = start_server(
            [sys.executable, "-m", "app", "serve", "--log-level", "warning"], port, env
        )
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await self.client.get("/health")).status_code == 200:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.store} did not start")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.process is not None:
            await asyncio.to_thread(stop_server, self.process)

    async def get(self, name: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None
        began = time.perf_counter()
        answer = await self.client.get(path, params=params)
        elapsed = (time.perf_counter() - began) * 1000
        if answer.status_code != 200:
            raise RuntimeError(f"{path} {params}: {answer.status_code} {answer.text[:200]}")
        self.samples.setdefault(name, []).append(elapsed)
        body: dict[str, Any] = answer.json()
        return body

    async def list_pages(self) -> None:
        cursor = None
        for page in range(PAGES):
            params: dict[str, Any] = {"limit": PAGE, **({"cursor": cursor} if cursor else {})}
            body = await self.get("list" if page == 0 else "list_next", "/content", params)
            assert len(body["items"]) == min(PAGE, self.size - page * PAGE)
            cursor = body["next"]
            if cursor is None:
                break
        await self.get("list_type", "/content", {"type": "article", "limit": PAGE})

    async def search(self, query: str) -> int:
        body = await self.get("search", "/content/search", {"q": query, "limit": 20})
        scores = [hit["score"] for hit in body["hits"]]
        assert scores == sorted(scores, reverse=True), query
        return len(body["hits"])


def _queries(count: int, seed: int) -> list[str]:
    corpus = Corpus.build(seed)
    picker = random.Random(seed + 1)
    return [" ".join(corpus.take(1 if picker.random() < 0.6 else 2)) for _ in range(count)]


@contextlib.asynccontextmanager
async def _serving(services: list[Service]) -> AsyncIterator[None]:
    try:
        for service in services:
            await service.start()
        yield
    finally:
        for service in services:
            await service.stop()


async def measure(services: list[Service], rounds: int, seed: int, count: int) -> None:
    async with _serving(services):
        for round_number in range(rounds):
            queries = _queries(count, seed + round_number)
            for index in range(count):
                for service in services:
                    if index % 10 == 0:
                        await service.list_pages()
                    await service.search(queries[index])
            print(f"  round {round_number + 1}/{rounds} done", file=sys.stderr, flush=True)


def figures(services: list[Service]) -> list[Figure]:
    reference = services[0].label
    made = []
    for key, name in (
        ("list", "first page of GET /content (20 items)"),
        ("list_next", "next pages from a cursor"),
        ("list_type", "GET /content?type=article"),
        ("search", "GET /content/search, 1-2 word queries"),
    ):
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            figure = Figure(
                f"{key}_{label}",
                f"{name}, {label}",
                "ms",
                higher_is_better=False,
                target="search p99 < 100 ms" if key == "search" and label == "p99" else "",
                reference=reference,
            )
            for service in services:
                values = service.samples.get(key)
                if values:
                    figure.add(service.label, quantile(values, q))
            made.append(figure)
    return made


async def run(
    sizes: tuple[int, ...], rounds: int, data_dir: Path | None, queries: int = QUERIES
) -> list[Figure]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-content-"))
    stores = data_dir or scratch
    try:
        services = []
        for size in sizes:
            path = stores / f"content-{size}"
            filled = stores / f"content-{size}.filled"
            if not filled.exists():
                # A store left half-filled by an interrupted run is filled again from empty.
                shutil.rmtree(path, ignore_errors=True)
                seconds = await fill_store(path, size)
                filled.write_text(f"{seconds:.1f}\n")
                print(f"filled {size:,} items in {seconds:.0f} s", file=sys.stderr, flush=True)
            work = scratch / f"service-{size}"
            work.mkdir(parents=True, exist_ok=True)
            services.append(Service(size, path, work))
        await measure(services, rounds, SEED, queries)
        return figures(services)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.content", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100, 1,000 and 3,000 items")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (3; 2 with --quick)")
    parser.add_argument("--data-dir", type=Path, help="keep the filled stores here")
    parser.add_argument(
        "--sizes", help="comma-separated item counts instead (e.g. 100,300,1000)", default=None
    )
    parser.add_argument("--queries", type=int, default=QUERIES, help="searches a round")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = tuple(int(size) for size in args.sizes.split(","))
    rounds = args.rounds or (2 if args.quick else 3)
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    made = asyncio.run(run(sizes, rounds, args.data_dir, args.queries))
    print(render(made))
    results = REPO_ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "content.json").write_text(
        json.dumps([figure.as_json() for figure in made], indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
