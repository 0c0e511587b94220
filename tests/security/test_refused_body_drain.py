"""A body refused part way (413) is read to its end before the response ends, so the server
never closes a socket with the client's bytes unread (which resets the connection, and the
client may see the reset instead of the 413)."""

from __future__ import annotations

from typing import Any

from app.api.limits import DRAIN_MAX_BYTES, drain_refused_bodies


async def _run(status: int, chunks: int, size: int = 1024) -> tuple[int, list[Any]]:
    pending = [
        {"type": "http.request", "body": b"x" * size, "more_body": n < chunks - 1}
        for n in range(chunks)
    ]
    taken = 0
    sent: list[Any] = []

    async def receive() -> Any:
        nonlocal taken
        taken += 1
        return pending.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    async def refusing_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # one chunk, then the answer
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    await drain_refused_bodies(refusing_app)({"type": "http"}, receive, send)  # type: ignore[arg-type]
    return taken, sent


async def test_the_rest_of_a_refused_body_is_read_before_the_response_ends() -> None:
    taken, sent = await _run(413, chunks=5)
    assert taken == 5
    assert sent[0]["status"] == 413


async def test_an_accepted_answer_reads_nothing_more_and_a_huge_body_is_read_only_so_far() -> None:
    taken, _ = await _run(201, chunks=5)
    assert taken == 1
    chunk = 1024 * 1024
    taken, _ = await _run(413, chunks=DRAIN_MAX_BYTES // chunk + 10, size=chunk)
    assert taken == 1 + DRAIN_MAX_BYTES // chunk
