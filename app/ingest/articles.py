"""Fetch an article page without reaching into private networks, and extract its text.

The fetch is a plain ``GET`` through httpx with per-operation timeouts, an overall deadline,
at most :data:`MAX_REDIRECTS` redirects (followed by hand, one hop at a time), a size cap
enforced both by ``Content-Length`` and while the body streams in (so a compressed or chunked
body cannot slip past it), and HTML content types only.

Server-side request forgery: unless ``INGEST_ALLOW_PRIVATE_URLS`` is set, a URL whose host
resolves to a loopback, private, link-local, multicast, reserved or unspecified address (IPv4,
IPv6, and IPv4 embedded in IPv6) is refused with ``blocked_address``. The check lives *inside
the connection*: a custom httpcore network backend resolves the host once, refuses the request
if any of its addresses is blocked, and opens the TCP connection to one of exactly those
addresses. A check in an event hook or before the request would resolve the name a second
time, apart from the connect, and a DNS server that answers differently the second time (DNS
rebinding) would walk straight past it. Connecting by address does not weaken HTTPS: httpcore
verifies the certificate against the URL's host name. Every redirect hop opens its connection
through the same backend, so each hop is checked; a kept-alive connection is only reused for
the origin it was opened (and checked) for. Environment proxies are ignored, because through a
proxy the checked address would be the proxy's, not the site's.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Final, Protocol

import httpcore
import httpx
import msgspec
import trafilatura
from trafilatura.settings import Document

from app.config import IngestSettings
from app.ingest.failures import describe_failure, with_retries
from app.ingest.model import IngestFailure, Progress, RetryNotice

__all__ = [
    "MAX_REDIRECTS",
    "Article",
    "Resolver",
    "check_address",
    "fetch_article",
    "resolve_host",
]

MAX_REDIRECTS: Final = 5

_HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_HEADERS: Final = {
    "User-Agent": "Mozilla/5.0 (compatible; activity-service article fetcher)",
    "Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1",
}
# NAT64 (RFC 6052) carries an IPv4 address in its last 32 bits.
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_META_CHARSET: Final = re.compile(
    rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.IGNORECASE
)
_DECLARED_LANGUAGE: Final = (
    re.compile(r"""<html\b[^>]*?\blang\s*=\s*["']?\s*([A-Za-z]{2,3})\b""", re.IGNORECASE),
    re.compile(
        r"""<meta[^>]+http-equiv\s*=\s*["']?content-language["']?[^>]+content\s*=\s*["']?"""
        r"""\s*([A-Za-z]{2,3})\b""",
        re.IGNORECASE,
    ),
)


class Article(msgspec.Struct, frozen=True):
    url: str  # final URL after redirects
    title: str | None
    author: str | None
    date: str | None  # YYYY-MM-DD
    language: str | None
    text: str
    html: str  # raw HTML as fetched (decoded)
    content_type: str


class Resolver(Protocol):
    """``resolve(host, port)`` -> the IP addresses a connection to ``host`` may use."""

    def __call__(self, host: str, port: int, /) -> Sequence[str]: ...


class _Page(msgspec.Struct, frozen=True):
    url: str
    html: str
    content_type: str


class _Extracted(msgspec.Struct, frozen=True):
    title: str | None
    author: str | None
    date: str | None
    language: str | None
    text: str


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (``getaddrinfo``; blocking, run it in a thread)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise describe_failure(exc, "article", None, {"host": host}, site=host) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_address(host: str, port: int, *, allow_private: bool) -> None:
    """Resolve ``host`` and refuse it (``blocked_address``) if any address is not public.

    Blocking (``getaddrinfo``): call it in a thread. IP literals need no DNS.
    """
    _checked_addresses(host, port, allow_private=allow_private, resolver=resolve_host)


def _checked_addresses(
    host: str,
    port: int,
    *,
    allow_private: bool,
    resolver: Resolver,
    trusted: Collection[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
) -> list[str]:
    addresses = list(resolver(host, port))
    if not addresses:
        raise IngestFailure(
            "request_failed",
            f"Could not look up the address of {host}: it has none.",
            retryable=True,
            details={"host": host},
        )
    if allow_private:
        return addresses
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            reason: str | None = "not an IP address"
        else:
            reason = None if ip in trusted else _blocked_reason(ip)
        if reason is not None:
            raise IngestFailure(
                "blocked_address",
                f"Refusing to fetch {host}: it resolves to {address} ({reason}). "
                "Set INGEST_ALLOW_PRIVATE_URLS to allow private addresses.",
                retryable=False,
                details={"host": host, "address": address},
            )
    return addresses


def _blocked_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket: judge the IPv4 address alone.
            candidates = [ip.ipv4_mapped]
        elif ip.sixtofour is not None:
            candidates.append(ip.sixtofour)
        elif ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for candidate in candidates:
        flags = (
            (candidate.is_unspecified, "unspecified"),
            (candidate.is_loopback, "loopback"),
            (candidate.is_link_local, "link-local"),
            (candidate.is_multicast, "multicast"),
            (candidate.is_private, "private"),
            (candidate.is_reserved, "reserved"),
            # Shared (100.64/10), documentation, benchmarking, …: nothing to fetch there.
            (not candidate.is_global, "not globally routable"),
        )
        for flagged, reason in flags:
            if flagged:
                return f"{reason} address"
    return None


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks and connects in one step, so the address checked is the one used."""

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver,
        trusted: Collection[ipaddress.IPv4Address | ipaddress.IPv6Address],
    ) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private
        self._resolver = resolver
        self._trusted = trusted

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await asyncio.to_thread(
                    _checked_addresses,
                    host,
                    port,
                    allow_private=self._allow_private,
                    resolver=self._resolver,
                    trusted=self._trusted,
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("article fetches never use Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle takes a fifth of a second: once per process, not per fetch.
    return httpx.create_ssl_context(trust_env=False)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        super().__init__(verify=_tls_context(), trust_env=False)
        # httpx has no parameter for httpcore's network backend: replace the pool it made with
        # one of the same TLS settings around the checking backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_tls_context(),
            max_connections=10,
            max_keepalive_connections=5,
            keepalive_expiry=5.0,
            network_backend=backend,
        )


async def fetch_article(
    url: str,
    settings: IngestSettings,
    *,
    progress: Progress | None = None,
    resolver: Resolver | None = None,
    trusted_addresses: Iterable[str] = (),
    on_retry: RetryNotice | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Article:
    """Fetch ``url`` (following up to 5 redirects) and extract the article in it.

    ``resolver`` replaces ``getaddrinfo`` and ``trusted_addresses`` exempts addresses from the
    private-address check; both exist so that tests can serve pages from 127.0.0.1 while the
    check stays on for every other address. Production passes neither.
    Raises :class:`IngestFailure`: ``unsupported_url``, ``blocked_address``,
    ``too_many_redirects``, ``http_error``, ``not_html``, ``too_large``, ``no_content``,
    ``extraction_failed`` (permanent); ``request_failed``, ``timeout`` and ``http_error`` 408,
    429 and 5xx (retryable), the fetch tried again by the retry policy first.
    """
    backend = _CheckedBackend(
        allow_private=settings.allow_private_urls,
        resolver=resolver or resolve_host,
        trusted=frozenset(ipaddress.ip_address(address) for address in trusted_addresses),
    )
    deadline = settings.article_timeout_seconds

    async def fetch_once() -> _Page:
        try:
            async with asyncio.timeout(deadline):
                return await _fetch_page(url, settings, backend, progress)
        except TimeoutError as exc:
            raise describe_failure(
                exc, "article", settings, {"url": url}, timeout_seconds=deadline
            ) from None

    page = await with_retries(fetch_once, settings, on_retry=on_retry, sleep=sleep)
    try:
        extracted = await asyncio.wait_for(asyncio.to_thread(_extract, page), deadline)
    except TimeoutError:
        # The same HTML would take as long again: not worth a retry.
        raise IngestFailure(
            "extraction_failed",
            f"Extracting the text of {page.url} took longer than {deadline:g} s.",
            retryable=False,
            details={"url": page.url},
        ) from None
    return Article(
        url=page.url,
        title=extracted.title,
        author=extracted.author,
        date=extracted.date,
        language=extracted.language,
        text=extracted.text,
        html=page.html,
        content_type=page.content_type,
    )


async def _fetch_page(
    url: str,
    settings: IngestSettings,
    backend: httpcore.AsyncNetworkBackend,
    progress: Progress | None,
) -> _Page:
    current = _checked_url(url)
    async with httpx.AsyncClient(
        transport=_CheckedTransport(backend),
        timeout=httpx.Timeout(settings.http_timeout_seconds),
        follow_redirects=False,
        trust_env=False,
        headers=_HEADERS,
    ) as client:
        for hop in range(MAX_REDIRECTS + 1):
            try:
                async with client.stream("GET", current) as response:
                    location = response.headers.get("location")
                    if response.status_code not in _REDIRECT_STATUSES or not location:
                        return await _read_page(response, settings.max_article_bytes)
                    status = response.status_code
                    target = _redirect_target(response.url, location)
            except httpx.HTTPError as exc:
                raise describe_failure(
                    exc, "article", settings, {"url": str(current)}, site=current.host
                ) from None
            if hop == MAX_REDIRECTS:
                raise IngestFailure(
                    "too_many_redirects",
                    f"{url} redirects more than {MAX_REDIRECTS} times.",
                    retryable=False,
                    details={"url": url, "last_url": str(current)},
                )
            current = target
            if progress is not None:
                await progress(
                    "fetching",
                    f"Following redirect to {current}",
                    {"redirect": hop + 1, "status": status, "url": str(current)},
                )
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def _checked_url(url: str | httpx.URL) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise IngestFailure(
            "unsupported_url",
            f"{str(url)!r} is not a URL that can be parsed.",
            retryable=False,
            details={"url": str(url), "error": f"{type(exc).__name__}: {exc}"},
        ) from None
    if parsed.scheme not in ("http", "https"):
        scheme = f"{parsed.scheme}:" if parsed.scheme else "no scheme"
        raise IngestFailure(
            "unsupported_url",
            f"Only http:// and https:// URLs can be fetched, not {scheme} ({str(url)!r}).",
            retryable=False,
            details={"url": str(url)},
        )
    if not parsed.host:
        raise IngestFailure(
            "unsupported_url",
            f"The URL {str(url)!r} has no host.",
            retryable=False,
            details={"url": str(url)},
        )
    return parsed.copy_with(fragment=None)


def _redirect_target(base: httpx.URL, location: str) -> httpx.URL:
    try:
        joined = base.join(location)
    except httpx.InvalidURL as exc:
        raise IngestFailure(
            "unsupported_url",
            f"{base} redirects to {location!r}, which is not a URL that can be parsed.",
            retryable=False,
            details={"url": str(base), "error": f"{type(exc).__name__}: {exc}"},
        ) from None
    return _checked_url(joined)


async def _read_page(response: httpx.Response, limit: int) -> _Page:
    url = str(response.url)
    status = response.status_code
    if status >= 400:
        raise IngestFailure(
            "http_error",
            f"{url} answered HTTP {status} {response.reason_phrase}".rstrip() + ".",
            retryable=status >= 500 or status in (408, 429),
            details={"url": url, "status": status},
        )
    if not 200 <= status < 300:
        raise IngestFailure(
            "http_error",
            f"{url} answered HTTP {status} {response.reason_phrase}".rstrip() + ".",
            retryable=False,
            details={"url": url, "status": status},
        )
    content_type = response.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type not in _HTML_TYPES:
        raise IngestFailure(
            "not_html",
            f"{url} is {media_type or 'of no declared type'}, not an HTML page.",
            retryable=False,
            details={"url": url, "content_type": content_type},
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(url, limit, int(declared))
    body = bytearray()
    # Decompressed bytes count: a small gzip body must not inflate past the limit either.
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise _too_large(url, limit, None)
    return _Page(
        url=url,
        html=_decode(bytes(body), response.charset_encoding),
        content_type=content_type,
    )


def _too_large(url: str, limit: int, size: int | None) -> IngestFailure:
    return IngestFailure(
        "too_large",
        f"{url} is larger than {limit:,} bytes"
        + (f" ({size:,} bytes declared)" if size is not None else "")
        + ".",
        retryable=False,
        details={"url": url, "max_bytes": limit},
    )


def _decode(body: bytes, charset: str | None) -> str:
    if body.startswith(codecs.BOM_UTF8):
        return body[len(codecs.BOM_UTF8) :].decode("utf-8", errors="replace")
    candidates = [charset]
    declared = _META_CHARSET.search(body[:4096])
    if declared is not None:
        candidates.append(declared.group(1).decode("ascii"))
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return body.decode(candidate, errors="replace")
        except LookupError:  # an unknown charset name
            continue
    return body.decode("utf-8", errors="replace")


def _extract(page: _Page) -> _Extracted:
    try:
        document = trafilatura.bare_extraction(
            page.html, url=page.url, with_metadata=True, include_comments=False
        )
    except Exception as exc:  # trafilatura and lxml raise many kinds on hostile HTML
        raise IngestFailure(
            "extraction_failed",
            f"Could not extract the text of {page.url}.",
            retryable=False,
            details={"url": page.url, "error": f"{type(exc).__name__}: {exc}"},
        ) from exc
    text = document.text.strip() if isinstance(document, Document) and document.text else ""
    if not isinstance(document, Document) or not text:
        raise IngestFailure(
            "no_content",
            f"The page {page.url} has no article text.",
            retryable=False,
            details={"url": page.url},
        )
    return _Extracted(
        title=document.title or None,
        author=document.author or None,
        date=document.date or None,
        language=(document.language or _declared_language(page.html) or "").lower() or None,
        text=text,
    )


def _declared_language(html: str) -> str | None:
    head = html[:20000]
    for pattern in _DECLARED_LANGUAGE:
        found = pattern.search(head)
        if found is not None:
            return found.group(1).lower()
    return None
