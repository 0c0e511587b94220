"""Request ids (accepted, made up, echoed, on every log line of the request), ingest ids on
ingest log lines, JSON and text log formats, and query strings scrubbed of tokens."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from app.observability.logs import (
    JsonFormatter,
    TextFormatter,
    _ContextFilter,
    ingest_id_var,
    log_context,
    request_id_var,
    scrub_query,
)
from tests.support import InProcessServer

HEX32 = "0123456789abcdef"


@pytest.fixture
async def client(server: InProcessServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as opened:
        yield opened


async def test_request_ids_are_taken_made_up_and_echoed(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    given = await client.get("/events", headers={"X-Request-ID": "trace-42.a:b/c"})
    assert given.headers["x-request-id"] == "trace-42.a:b/c"
    made = await client.get("/events")
    made_id = made.headers["x-request-id"]
    assert len(made_id) == 32
    assert set(made_id) <= set(HEX32)
    # Not taken as is: too long, or with characters that could forge a log line.
    for bad in ("x" * 129, "a b", "new\tline"):
        echoed = (await client.get("/events", headers={"X-Request-ID": bad})).headers
        assert echoed["x-request-id"] != bad
        assert len(echoed["x-request-id"]) == 32
    # Every response has one, errors and unknown routes too.
    assert "x-request-id" in (await client.get("/nowhere")).headers
    assert "x-request-id" in (await client.get("/events", params={"limit": 0})).headers
    lines = {getattr(r, "request_id", None): r for r in caplog.records if r.name == "app.access"}
    access = lines["trace-42.a:b/c"]
    assert access.getMessage().startswith("GET /events 200 ")
    assert access.__dict__["http_status"] == 200
    assert made_id in lines


def test_the_json_format_carries_ids_and_extras() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.observability.json")
    logger.addHandler(handler)
    logger.propagate = False
    handler.addFilter(_ContextFilter())
    try:
        with log_context(request_id="req-1", ingest_id="ing-9"):
            logger.warning("fetching %s", "https://x.example/?access_token=s3cret", extra={"n": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines() if line[0] == "{")
    assert first["level"] == "warning"
    assert first["logger"] == "tests.observability.json"
    assert first["message"] == "fetching https://x.example/?access_token=[redacted]"
    assert (first["request_id"], first["ingest_id"], first["n"]) == ("req-1", "ing-9", 3)
    assert first["time"].endswith("Z")
    assert "request_id" not in second
    assert "ValueError: boom" in second["exception"]


def test_the_text_format_appends_ids_when_there_are_some() -> None:
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "x"})
    assert TextFormatter().format(record).endswith("x: hello")
    record.request_id, record.ingest_id = "r1", "i2"
    assert TextFormatter().format(record).endswith("x: hello [request_id=r1 ingest_id=i2]")


@pytest.mark.parametrize(
    ("query", "scrubbed"),
    [
        ("access_token=abc", "access_token=[redacted]"),
        ("a=1&access_token=abc&b=2", "a=1&access_token=[redacted]&b=2"),
        ("last_event_id=3", "last_event_id=3"),
        ("my_access_token=abc", "my_access_token=abc"),
        ("", ""),
    ],
)
def test_query_strings_lose_their_tokens(query: str, scrubbed: str) -> None:
    assert scrub_query(query) == scrubbed


@pytest.fixture
def isolated_context() -> Iterator[None]:
    with log_context(request_id="outer"):
        yield


def test_log_context_nests_and_restores(isolated_context: None) -> None:
    with log_context(ingest_id="i"):
        assert (request_id_var.get(), ingest_id_var.get()) == ("outer", "i")
        with log_context(request_id="inner"):
            assert request_id_var.get() == "inner"
        assert request_id_var.get() == "outer"
    assert ingest_id_var.get() is None
