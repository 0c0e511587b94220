"""Article fetching against a real HTTP server on 127.0.0.1, and the private-address guard."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from app.config import IngestSettings
from app.ingest.articles import Article, check_address, fetch_article, resolve_host
from app.ingest.model import IngestFailure

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "articles"
ARTICLE_HTML = (FIXTURES / "fog_signals.html").read_bytes()
HTML = "text/html; charset=utf-8"


@dataclass
class Route:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": HTML})
    body: bytes = b""
    # Sent with Transfer-Encoding: chunked and no Content-Length, in pieces of this size.
    chunk_size: int | None = None


class PageServer:
    """A minimal HTTP/1.1 server: one request per connection, routes by path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        # Per path, what its next requests meet before the route answers, one entry each:
        # "hang up" closes the connection unanswered, a number stalls the answer that long.
        self.troubles: dict[str, list[Literal["hang up"] | float]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, as it does when it refuses a body
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *lines = head.split("\r\n")
        _, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        self.requests.append((target, headers))
        trouble = self.troubles[target].pop(0) if self.troubles.get(target) else None
        if isinstance(trouble, str):  # "hang up"
            return
        if trouble is not None:
            await asyncio.sleep(trouble)
        route = self.routes.get(target) or Route(404, body=b"<html><h1>Not found</h1></html>")
        reason = {200: "OK", 301: "Moved Permanently", 302: "Found", 404: "Not Found"}
        out = [f"HTTP/1.1 {route.status} {reason.get(route.status, 'Status')}"]
        out += [f"{name}: {value}" for name, value in route.headers.items()]
        out.append("Connection: close")
        if route.chunk_size is None:
            out.append(f"Content-Length: {len(route.body)}")
        else:
            out.append("Transfer-Encoding: chunked")
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
        if route.chunk_size is None:
            writer.write(route.body)
        else:
            for start in range(0, len(route.body), route.chunk_size):
                piece = route.body[start : start + route.chunk_size]
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture
async def server() -> AsyncIterator[PageServer]:
    pages = PageServer()
    await pages.start()
    try:
        yield pages
    finally:
        await pages.stop()


def settings(
    *,
    allow_private: bool = True,
    max_bytes: int = 10 * 1024 * 1024,
    http_timeout: float = 5.0,
    article_timeout: float = 10.0,
) -> IngestSettings:
    return IngestSettings(
        allow_private_urls=allow_private,
        http_timeout_seconds=http_timeout,
        article_timeout_seconds=article_timeout,
        max_article_bytes=max_bytes,
        retry_attempts=3,
        retry_base_seconds=0.01,
    )


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def __call__(self, step: str, message: str, extras: dict[str, Any]) -> None:
        self.calls.append((step, message, extras))


def fake_dns(names: dict[str, list[str]]) -> Any:
    """A resolver for made-up names; IP literals resolve as the system would."""

    def resolve(host: str, port: int) -> Sequence[str]:
        return names[host] if host in names else resolve_host(host, port)

    return resolve


async def failure_of(coro: Any) -> IngestFailure:
    with pytest.raises(IngestFailure) as caught:
        await coro
    return caught.value


def redirect(location: str, status: int = 302) -> Route:
    return Route(status, {"Location": location, "Content-Type": HTML}, b"")


# --- fetching and extraction ---------------------------------------------------------------


async def test_fetches_and_extracts_the_article(server: PageServer) -> None:
    server.routes["/2024/03/18/fog/"] = Route(body=ARTICLE_HTML)

    article = await fetch_article(server.url("/2024/03/18/fog/"), settings())

    assert isinstance(article, Article)
    assert article.url == server.url("/2024/03/18/fog/")
    assert article.title == "How Lighthouse Keepers Listened to the Fog"
    assert article.author == "Margaret Ellery"
    assert article.date == "2024-03-18"
    assert article.language == "en"
    assert article.content_type == HTML
    assert article.html == ARTICLE_HTML.decode("utf-8")
    assert "they wrote down, hour by hour, how long the fog lay on the water" in article.text
    assert "Volunteers at the Île d\u2019Ouessant museum" in article.text
    assert "answering a question their authors never heard asked." in article.text
    # Navigation, cookie banner, related links and reader comments are not the article.
    for boilerplate in ("Accept all", "More from History", "My grandfather kept"):
        assert boilerplate not in article.text


async def test_follows_redirects_and_reports_each_hop(server: PageServer) -> None:
    server.routes["/old"] = redirect("/moved", 301)
    server.routes["/moved"] = redirect(server.url("/2024/03/18/fog/"), 308)
    server.routes["/2024/03/18/fog/"] = Route(body=ARTICLE_HTML)
    progress = Recorder()

    article = await fetch_article(server.url("/old"), settings(), progress=progress)

    assert article.url == server.url("/2024/03/18/fog/")
    assert article.title == "How Lighthouse Keepers Listened to the Fog"
    assert [message for _, message, _ in progress.calls] == [
        f"Following redirect to {server.url('/moved')}",
        f"Following redirect to {server.url('/2024/03/18/fog/')}",
    ]
    assert [target for target, _ in server.requests] == ["/old", "/moved", "/2024/03/18/fog/"]


async def test_five_redirects_are_followed_and_a_sixth_is_refused(server: PageServer) -> None:
    for hop in range(6):
        server.routes[f"/hop{hop}"] = redirect(f"/hop{hop + 1}")
    server.routes["/hop6"] = Route(body=ARTICLE_HTML)

    article = await fetch_article(server.url("/hop1"), settings())
    assert article.url == server.url("/hop6")

    failure = await failure_of(fetch_article(server.url("/hop0"), settings()))
    assert failure.kind == "too_many_redirects"
    assert not failure.retryable
    assert "/hop6" not in [target for target, _ in server.requests[-6:]]


async def test_decodes_with_the_declared_charset(server: PageServer) -> None:
    page = ARTICLE_HTML.decode("utf-8").replace('<meta charset="utf-8">', "")
    # Latin-1 has no curly quotes, middle dots or dashes.
    page = page.translate(
        str.maketrans({"\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00b7": "-", "\u00a9": "c"})
    )
    server.routes["/latin1"] = Route(
        headers={"Content-Type": "text/html; charset=ISO-8859-1"}, body=page.encode("latin-1")
    )
    server.routes["/meta"] = Route(
        headers={"Content-Type": "text/html"},
        body=page.replace("<head>", '<head><meta charset="iso-8859-1">').encode("latin-1"),
    )

    for path in ("/latin1", "/meta"):
        article = await fetch_article(server.url(path), settings())
        assert "Volunteers at the Île d'Ouessant museum" in article.text


async def test_a_page_without_article_text_is_no_content(server: PageServer) -> None:
    server.routes["/empty"] = Route(
        body=b"<html><head><title>Hi</title></head><body></body></html>"
    )

    failure = await failure_of(fetch_article(server.url("/empty"), settings()))

    assert failure.kind == "no_content"
    assert not failure.retryable


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"),
        ("application/json", b'{"title": "not a page"}'),
        ("image/png", b"\x89PNG\r\n\x1a\n"),
    ],
)
async def test_refuses_what_is_not_html(server: PageServer, content_type: str, body: bytes) -> None:
    server.routes["/file"] = Route(headers={"Content-Type": content_type}, body=body)

    failure = await failure_of(fetch_article(server.url("/file"), settings()))

    assert failure.kind == "not_html"
    assert not failure.retryable
    assert content_type in failure.message


async def test_refuses_a_body_over_the_limit_by_content_length(server: PageServer) -> None:
    server.routes["/big"] = Route(body=ARTICLE_HTML + b" " * 40_000)

    failure = await failure_of(fetch_article(server.url("/big"), settings(max_bytes=20_000)))

    assert failure.kind == "too_large"
    assert not failure.retryable
    assert "bytes declared" in failure.message


async def test_refuses_a_chunked_body_over_the_limit_while_it_streams(server: PageServer) -> None:
    server.routes["/stream"] = Route(body=ARTICLE_HTML + b" " * 40_000, chunk_size=4096)

    failure = await failure_of(fetch_article(server.url("/stream"), settings(max_bytes=20_000)))

    assert failure.kind == "too_large"
    assert "declared" not in failure.message
    # The same body under the limit is fine: the limit is what refused it.
    article = await fetch_article(server.url("/stream"), settings(max_bytes=100_000))
    assert article.title == "How Lighthouse Keepers Listened to the Fog"


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(404, False), (410, False), (403, False), (408, True), (429, True), (500, True), (503, True)],
)
async def test_maps_http_errors(server: PageServer, status: int, retryable: bool) -> None:
    server.routes["/error"] = Route(status, body=b"<html><p>error page</p></html>")

    failure = await failure_of(fetch_article(server.url("/error"), settings()))

    assert failure.kind == "http_error"
    assert failure.retryable is retryable
    assert failure.details["status"] == status
    assert f"HTTP {status}" in failure.message
    # A status that may pass is asked again, as often as the settings allow.
    assert len(server.requests) == (3 if retryable else 1)


async def test_a_server_that_is_gone_is_a_retryable_request_failure(server: PageServer) -> None:
    url = server.url("/anything")
    await server.stop()

    failure = await failure_of(fetch_article(url, settings()))

    assert failure.kind == "request_failed"
    assert failure.retryable


async def test_a_site_that_cannot_be_reached_is_named_in_a_sentence(server: PageServer) -> None:
    url = server.url("/anything")
    await server.stop()

    failure = await failure_of(fetch_article(url, settings()))

    assert failure.message == "Could not connect to 127.0.0.1 (network error)."
    # httpx's own words are kept for whoever debugs it, not shown as the message.
    assert failure.details["error"].startswith("ConnectError: ")
    assert failure.details["attempts"] == 3
    assert failure.as_details()["retryable"] is True


async def test_a_connection_that_breaks_is_tried_again(server: PageServer) -> None:
    server.routes["/fog"] = Route(body=ARTICLE_HTML)
    server.troubles["/fog"] = ["hang up"]

    article = await fetch_article(server.url("/fog"), settings())

    assert article.title == "How Lighthouse Keepers Listened to the Fog"
    assert [target for target, _ in server.requests] == ["/fog", "/fog"]


@pytest.mark.parametrize(
    ("http_timeout", "article_timeout", "message"),
    [
        # One request that gets no answer within the per-request timeout.
        (0.2, 10.0, "127.0.0.1 did not answer within 0.2 s."),
        # A whole fetch that outlives its deadline.
        (5.0, 0.2, "Fetching {url} took longer than 0.2 s."),
    ],
)
async def test_a_fetch_that_times_out_is_a_timeout_and_tried_again(
    server: PageServer, http_timeout: float, article_timeout: float, message: str
) -> None:
    server.routes["/fog"] = Route(body=ARTICLE_HTML)
    server.troubles["/fog"] = [0.6, 0.6, 0.6]
    url = server.url("/fog")

    failure = await failure_of(
        fetch_article(url, settings(http_timeout=http_timeout, article_timeout=article_timeout))
    )

    assert (failure.kind, failure.retryable) == ("timeout", True)
    assert failure.message == message.format(url=url)
    assert failure.details["attempts"] == 3
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "url", ["ftp://example.com/article", "file:///etc/passwd", "javascript:alert(1)", "http://"]
)
async def test_refuses_urls_that_are_not_http(url: str) -> None:
    failure = await failure_of(fetch_article(url, settings()))

    assert failure.kind == "unsupported_url"
    assert not failure.retryable


async def test_a_redirect_to_another_scheme_is_refused(server: PageServer) -> None:
    server.routes["/to-file"] = redirect("file:///etc/passwd")

    failure = await failure_of(fetch_article(server.url("/to-file"), settings()))

    assert failure.kind == "unsupported_url"


# --- private addresses ----------------------------------------------------------------------


async def test_loopback_is_refused_before_any_connection(server: PageServer) -> None:
    server.routes["/2024/03/18/fog/"] = Route(body=ARTICLE_HTML)

    failure = await failure_of(
        fetch_article(server.url("/2024/03/18/fog/"), settings(allow_private=False))
    )

    assert failure.kind == "blocked_address"
    assert not failure.retryable
    assert failure.details["address"] == "127.0.0.1"
    assert server.requests == []


async def test_a_name_that_resolves_to_a_private_address_is_refused(server: PageServer) -> None:
    # "intranet.test" cannot resolve for real: the check applies to the resolver's answer.
    resolver = fake_dns({"intranet.test": ["93.184.216.34", "10.20.30.40"]})

    failure = await failure_of(
        fetch_article("http://intranet.test/wiki", settings(allow_private=False), resolver=resolver)
    )

    assert failure.kind == "blocked_address"
    assert failure.details == {"host": "intranet.test", "address": "10.20.30.40"}


async def test_connects_to_the_address_that_was_checked(server: PageServer) -> None:
    # A made-up name: only the checked answer from the resolver can have been connected to.
    server.routes["/2024/03/18/fog/"] = Route(body=ARTICLE_HTML)
    resolver = fake_dns({"news.test": ["127.0.0.1"]})

    article = await fetch_article(
        server.url("/2024/03/18/fog/", host="news.test"),
        settings(allow_private=False),
        resolver=resolver,
        trusted_addresses=["127.0.0.1"],
    )

    assert article.title == "How Lighthouse Keepers Listened to the Fog"
    assert server.requests[0][1]["host"] == f"news.test:{server.port}"


async def test_a_name_is_resolved_once_per_connection(server: PageServer) -> None:
    # A rebinding DNS server answers a harmless address first and a private one afterwards; a
    # second lookup between check and connect would be the hole. There is none.
    server.routes["/2024/03/18/fog/"] = Route(body=ARTICLE_HTML)
    answers = [["127.0.0.1"], ["10.0.0.1"]]
    lookups: list[str] = []

    def rebinding(host: str, port: int) -> Sequence[str]:
        lookups.append(host)
        return answers[min(len(lookups), len(answers)) - 1]

    article = await fetch_article(
        server.url("/2024/03/18/fog/", host="rebind.test"),
        settings(allow_private=False),
        resolver=rebinding,
        trusted_addresses=["127.0.0.1"],
    )

    assert article.title == "How Lighthouse Keepers Listened to the Fog"
    assert lookups == ["rebind.test"]


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://10.0.0.8:8080/admin",
        "http://[::1]/",
        "http://metadata.test/computeMetadata/v1/",
    ],
)
async def test_every_redirect_hop_is_checked(server: PageServer, location: str) -> None:
    # The first hop is a host the test trusts; the redirect leaves it for a private address.
    server.routes["/story"] = redirect(location)
    resolver = fake_dns({"news.test": ["127.0.0.1"], "metadata.test": ["169.254.169.254"]})
    progress = Recorder()

    failure = await failure_of(
        fetch_article(
            server.url("/story", host="news.test"),
            settings(allow_private=False),
            progress=progress,
            resolver=resolver,
            trusted_addresses=["127.0.0.1"],
        )
    )

    assert failure.kind == "blocked_address"
    assert not failure.retryable
    assert [target for target, _ in server.requests] == ["/story"]
    assert progress.calls[-1][1] == f"Following redirect to {location}"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.251",
        "fe80::1",
        "fd00::1",
        "2002:7f00:1::",
    ],
)
def test_check_address_refuses_non_public_addresses(host: str) -> None:
    with pytest.raises(IngestFailure) as caught:
        check_address(host, 80, allow_private=False)

    assert caught.value.kind == "blocked_address"
    assert not caught.value.retryable


@pytest.mark.parametrize("host", ["93.184.216.34", "2606:4700:4700::1111", "::ffff:93.184.216.34"])
def test_check_address_accepts_public_addresses(host: str) -> None:
    check_address(host, 443, allow_private=False)


def test_check_address_allows_private_addresses_when_configured() -> None:
    check_address("127.0.0.1", 80, allow_private=True)
    check_address("169.254.169.254", 80, allow_private=True)
