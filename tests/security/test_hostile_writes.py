"""Hostile and malformed write requests against `python -m app serve`, on the direct append
path and through the router: each is refused with a 4xx naming what is wrong, nothing is
written for it, the log's writer process stays up, and other clients' appends are answered
exactly as they committed.

The last test sends generated bodies (integers at and past every bound, deep nesting, odd
strings and unicode, wrong types) with odd content types and origins to every write endpoint.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.bodies import MAX_INTEGER_DIGITS
from app.eventlog.tables import MAX_VERSION
from app.events.envelope import MAX_PAYLOAD_DEPTH
from tests.support import ServerProcess, alive

pytestmark = pytest.mark.slow

PATHS = {"direct": "1", "router": "0"}


def writer_pid(server: ServerProcess) -> int:
    """The pid of the service's SQLite writer process (a child of the server)."""
    assert server.process is not None
    parent = server.process.pid
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"app.backends.sqlite.process" in command:
                return int(child)
    raise AssertionError("the server has no writer process")


@pytest.fixture(scope="module", params=sorted(PATHS))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp(f"hostile-{request.param}")
    server = ServerProcess(
        env={
            "DATABASE_URL": f"sqlite+aiosqlite:///{data / 'events.db'}",
            "DIRECT_APPENDS": PATHS[request.param],
            # Started work stays pending: the log holds only what the requests wrote.
            "INGEST_CONCURRENCY": "0",
            "AGENT_RUN_CONCURRENCY": "0",
            "AGENTS_AUTO_RUN": "0",
        }
    )
    server.start()
    try:
        asyncio.run(server.wait_ready())
        yield server
    finally:
        server.stop()


def head(client: httpx.Client) -> int:
    response = client.get("/events", params={"limit": 1})
    assert response.status_code == 200, response.text
    value: int = response.json()["head"]
    return value


def event(n: int = 0, **fields: Any) -> dict[str, Any]:
    return {"event": "progress", "payload": {"agent_name": "fuzz", "n": n}, **fields}


@pytest.mark.parametrize("value", [-1, MAX_VERSION + 1, 2**63, 2**64, 10**30])
def test_an_expected_version_the_log_cannot_hold_is_refused_naming_it(
    server: ServerProcess, value: int
) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        before = head(client)
        single = client.post("/agents/v/events", json=event(expected_version=value))
        assert single.status_code == 400, single.text
        assert "expected_version" in single.json()["detail"]
        batch = client.post(
            "/agents/events",
            json={
                "events": [
                    {"source_id": "v", **event()},
                    {"source_id": "v", **event(expected_version=value)},
                ]
            },
        )
        assert batch.status_code == 400, batch.text
        assert "events[1].expected_version" in batch.json()["detail"]
        assert head(client) == before
        # The largest the log holds is a conflict like any other.
        largest = client.post("/agents/v/events", json=event(expected_version=MAX_VERSION))
        assert largest.status_code == 409, largest.text


async def test_concurrent_writers_beside_overflowing_requests_each_get_their_own_answer(
    server: ServerProcess,
) -> None:
    pid = writer_pid(server)
    acknowledged: list[int] = []

    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=30, limits=httpx.Limits(max_connections=30)
    ) as client:
        before = (await client.get("/events", params={"limit": 1})).json()["head"]

        async def innocent(writer: int) -> None:
            for n in range(20):
                response = await client.post(f"/agents/w{writer}/events", json=event(n=n))
                assert response.status_code == 201, response.text
                acknowledged.append(response.json()["position"])

        async def hostile() -> None:
            for _ in range(20):
                response = await client.post(
                    "/agents/w0/events", json=event(expected_version=2**64)
                )
                assert response.status_code == 400, response.text

        await asyncio.gather(*(innocent(w) for w in range(20)), hostile())
        page = await client.get("/events", params={"after": before, "limit": 1000})
    written = [e["position"] for e in page.json()["events"]]
    # Every 201 is in the table, and every event in the table got its 201.
    assert sorted(acknowledged) == written
    assert len(written) == 400
    assert writer_pid(server) == pid


DEEP = MAX_PAYLOAD_DEPTH * 40  # far past what a decoder's stack takes


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/agents/d/events", '{"event":"progress","payload":{"agent_name":"a","x":%s}}'),
        ("/agents/events", '{"events":[{"source_id":"d","event":"progress","payload":%s}]}'),
        ("/ingests", '{"url":%s}'),
        ("/agents/runs", '{"scope":%s,"agent":"tagger"}'),
        ("/ingest", '{"url":%s}'),
    ],
)
def test_deep_nesting_is_refused_naming_the_depth_limit(
    server: ServerProcess, path: str, body: str
) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        before = head(client)
        response = client.post(
            path,
            content=body % deep_json(DEEP),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400, response.text
        assert response.json()["detail"] == (
            "the request body is nested too deeply to decode; event payloads may nest at "
            f"most {MAX_PAYLOAD_DEPTH} levels"
        )
        assert head(client) == before


def test_an_unpaired_surrogate_is_named_as_such(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        body = '{"event":"progress","payload":{"agent_name":"a","s":"ok \\ud800 here"}}'
        response = client.post(
            "/agents/s/events", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert "\\ud800" in detail
        assert "surrogate" in detail
        assert "truncated" not in detail
        # An escaped backslash before it makes it text, and a whole pair is a character.
        for fine in ('"\\\\ud800"', '"\\ud83d\\ude00"'):
            body = f'{{"event":"progress","payload":{{"agent_name":"a","s":{fine}}}}}'
            response = client.post(
                "/agents/s/events", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 201, response.text


def test_a_huge_refused_value_is_not_echoed_whole(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        response = client.post("/agents/e/events", json=event(event_id="x" * 500_000))
        assert response.status_code == 422, response.text
        assert "event_id must be a UUID" in response.json()["detail"]
        assert len(response.content) < 4_000


def test_payload_integers_round_trip_up_to_the_length_limit(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for largest in ("9" * MAX_INTEGER_DIGITS, "-" + "9" * (MAX_INTEGER_DIGITS - 1)):
            body = f'{{"event":"progress","payload":{{"agent_name":"a","n":{largest}}}}}'
            response = client.post(
                "/agents/i/events", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 201, response.text
            position = response.json()["position"]
            page = client.get("/events", params={"after": position - 1, "limit": 1})
            assert f'"n":{largest}}}'.encode() in page.content
            longer = body.replace(largest, largest + "9")
            refused = client.post(
                "/agents/i/events", content=longer, headers={"content-type": "application/json"}
            )
            assert refused.status_code == 400, refused.text
            assert f"longer than {MAX_INTEGER_DIGITS} characters" in refused.json()["detail"]


# -- generated requests ------------------------------------------------------------------------

BOUNDS = [
    -(2**63) - 1,
    -(2**63),
    -1,
    0,
    1,
    MAX_VERSION,
    MAX_VERSION + 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    10**MAX_INTEGER_DIGITS - 1,
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(BOUNDS),
    st.floats(allow_nan=False),
    st.text(),
    st.text(alphabet=string.printable, max_size=5),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
events = st.fixed_dictionaries(
    {},
    optional={
        "event": st.sampled_from(["progress", "started", "complete", "nope", ""]) | json_values,
        "payload": st.fixed_dictionaries(
            {"agent_name": st.sampled_from(["fuzz", ""]) | json_values},
            optional={"progress": json_values, "status": json_values, "x": json_values},
        )
        | json_values,
        "event_id": st.uuids().map(str) | json_values,
        "expected_version": st.sampled_from(BOUNDS) | json_values,
        "source_id": st.sampled_from(["fuzz", "bad id", ""]) | json_values,
    },
)
documents = {
    "/agents/fuzz/events": events,
    "/agents/events": st.fixed_dictionaries({"events": st.lists(events, max_size=3)}) | json_values,
    "/ingests": st.fixed_dictionaries({"url": json_values}, optional={"channel_limit": json_values})
    | json_values,
    "/ingest": st.fixed_dictionaries({"url": st.integers() | st.none() | st.lists(st.none())})
    | st.none(),
    "/agents/runs": st.fixed_dictionaries(
        {"scope": json_values}, optional={"agent": json_values, "agents": json_values}
    )
    | json_values,
}


def as_text(document: Any) -> str:
    return json.dumps(document, ensure_ascii=False)


# Bodies no encoder of Python values makes: text a decoder must refuse, or nest too deep.
raw_bodies = st.one_of(
    st.integers(1, 3000).map(
        lambda depth: f'{{"event":"progress","payload":{{"x":{deep_json(depth)}}}}}'
    ),
    st.sampled_from(
        ['{"event":"progress","payload":{"agent_name":"a","s":"\\ud800"}}', "{", "", "\x00"]
    ),
    st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
    st.integers(1, 2 * MAX_INTEGER_DIGITS).map(
        lambda digits: f'{{"expected_version":{"1" * digits}}}'
    ),
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        None,
    ]
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.data(),
    path=st.sampled_from(sorted(documents)),
    content_type=content_types,
    origin=st.sampled_from([None, "same", "https://evil.example", "null"]),
)
def test_no_generated_request_gets_a_5xx_kills_the_writer_or_writes_when_refused(
    server: ServerProcess,
    data: st.DataObject,
    path: str,
    content_type: str | None,
    origin: str | None,
) -> None:
    body = data.draw(documents[path].map(as_text) | raw_bodies, label="body")
    headers = {} if content_type is None else {"content-type": content_type}
    if origin is not None:
        headers["origin"] = server.base_url if origin == "same" else origin
    pid = writer_pid(server)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        before = head(client)
        response = client.post(path, content=body.encode("utf-8", "surrogatepass"), headers=headers)
        after = head(client)
    assert response.status_code < 500, response.text
    assert alive(pid)
    assert writer_pid(server) == pid
    if response.status_code >= 300:
        assert after == before, f"{response.status_code} but the log grew"
        assert response.json()["detail"]
    elif path.endswith("/events"):
        written = 1 if path == "/agents/fuzz/events" else len(response.json()["positions"])
        assert after == before + written
    if origin in ("https://evil.example", "null"):
        assert response.status_code == 403
    elif response.status_code < 300 and content_type is not None:
        assert content_type.partition(";")[0].lower() == "application/json"
