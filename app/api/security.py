"""Who may call what: bearer tokens for writes (``API_TOKENS``) and, when configured, for reads
(``READ_TOKENS``), and which other origins a browser may call the API from (``CORS_ORIGINS``).

One check in front of every route (route middleware on the whole application: cheaper than a
Litestar guard, which copies the route handler per request) decides from the method and the
route, so an endpoint added later is guarded without anyone remembering to: every
POST/PUT/PATCH/DELETE needs an API token, every other route a read token (or an API token)
when read tokens are set. Only
the routes in :func:`access_for`'s public list stay open: the dashboard page and its assets
(the page must load to ask for a token; its data calls carry it), ``/health`` (a load balancer
must reach it; with read tokens set it says no more than its status without one) and the
OpenAPI document (it describes the API and holds no data).

The same check refuses what a web page on another origin could make a browser send: a
browser posts text/plain, form and multipart bodies to any origin without asking first (no
CORS preflight), so a page the user merely visits could append events or start ingests on a
service listening on their machine. Every unsafe method therefore takes JSON bodies only
(415: a JSON body needs a preflight, which other origins fail), and a request whose
``Origin`` is neither the service's own nor allowed by ``CORS_ORIGINS`` is refused (403),
with tokens or without. Clients that are not browsers send no ``Origin`` and are unaffected.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Literal
from urllib.parse import parse_qsl

from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.types import ASGIApp, Receive, Scope, Send

from app.config import SecuritySettings

__all__ = [
    "ACCESS_TOKEN_PARAMETER",
    "Access",
    "AccessPolicy",
    "access_for",
    "build_cors_config",
    "may_read",
    "require_access",
]

Access = Literal["public", "read", "write"]

#: EventSource cannot set headers: SSE endpoints also take the token in this query parameter.
ACCESS_TOKEN_PARAMETER = "access_token"

_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON = b"application/json"
#: Ports an origin or a Host header may leave out.
_DEFAULT_PORTS = (":80", ":443")
_PUBLIC_PATHS = frozenset({"/", "/health", "/schema"})
_PUBLIC_PREFIXES = ("/web/", "/schema/")


def access_for(method: str, path_template: str) -> Access:
    """What a request needs, from its method and its route's path template."""
    if method == "OPTIONS":
        return "public"  # a CORS preflight never carries credentials
    if method in _WRITE_METHODS:
        return "write"
    if path_template in _PUBLIC_PATHS or path_template.startswith(_PUBLIC_PREFIXES):
        return "public"
    return "read"


def is_stream(method: str, path_template: str) -> bool:
    return method == "GET" and path_template.endswith("/stream")


def _digest(token: str) -> bytes:
    # Compared as fixed-length digests: compare_digest on the raw strings would still reveal
    # a token's length through timing.
    return hashlib.sha256(token.encode()).digest()


def _bearer(scope: Scope) -> tuple[str | None, bool]:
    """The token the request presents, and whether an Authorization header was malformed."""
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None, True
            return token, False
    if is_stream(str(scope.get("method", "")), str(scope.get("path_template", ""))):
        query: str = scope.get("query_string", b"").decode("latin-1")
        for key, given in parse_qsl(query, keep_blank_values=True):
            if key == ACCESS_TOKEN_PARAMETER:
                return given or None, False
    return None, False


def _host_port(authority: str) -> str:
    """``host[:port]`` lowercased, without a default port, for comparing an origin's
    authority with a Host header whatever scheme a proxy in front terminated."""
    authority = authority.strip().lower()
    return authority.removesuffix(_DEFAULT_PORTS[0]).removesuffix(_DEFAULT_PORTS[1])


class _UnsupportedBody(HTTPException):
    status_code = 415


class AccessPolicy:
    """The configured tokens and origins, and the guard that checks requests against them."""

    def __init__(self, settings: SecuritySettings) -> None:
        self._write = [_digest(token) for token in settings.api_tokens]
        self._read = self._write + [_digest(token) for token in settings.read_tokens]
        self.writes_guarded = bool(settings.api_tokens)
        self.reads_guarded = bool(settings.read_tokens)
        self._any_origin = "*" in settings.cors_origins
        self._origins = frozenset(
            origin.lower().encode() for origin in settings.cors_origins if origin != "*"
        )

    def write_refusal(self, scope: Scope) -> HTTPException | None:
        """Why a request with an unsafe method may not write (None: it may): a body that
        is not JSON (415), an ``Origin`` of a page that is not this service's nor allowed
        (403). See the module's docstring."""
        content_type: bytes | None = None
        has_body = False
        origin: bytes | None = None
        host = b""
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                has_body = value.strip() not in (b"", b"0")
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"origin":
                origin = value
            elif name == b"host":
                host = value
        if origin is not None and not self._origin_allowed(origin, host):
            shown = origin.decode("latin-1")[:100]
            return PermissionDeniedException(
                detail=f"a write from the web page at {shown!r} is refused: only this "
                "service's own pages and the origins in CORS_ORIGINS may write",
                extra={"field": "Origin", "origin": shown},
            )
        if content_type is not None or has_body:
            media_type = (content_type or b"").partition(b";")[0].strip().lower()
            if media_type != _JSON:
                shown = (content_type or b"").decode("latin-1")[:100]
                return _UnsupportedBody(
                    detail="a request body must be JSON: send Content-Type: application/json, "
                    f"got {shown or 'none'!r}",
                    extra={"field": "Content-Type", "content_type": shown},
                )
        return None

    def _origin_allowed(self, origin: bytes, host: bytes) -> bool:
        if self._any_origin or origin.lower() in self._origins:
            return True
        # Same origin: the page was served by this service, under the name it was asked by
        # (``null``, a sandboxed or file page, never matches).
        _, separator, authority = origin.decode("latin-1").partition("://")
        return (
            bool(separator)
            and bool(host)
            and (_host_port(authority) == _host_port(host.decode("latin-1")))
        )

    def needs_token(self, access: Access) -> bool:
        if access == "public":
            return False
        return self.writes_guarded if access == "write" else self.reads_guarded

    def accepts(self, token: str | None, access: Access) -> bool:
        if not self.needs_token(access):
            return True
        if token is None:
            return False
        probe = _digest(token)
        found = False
        # Every configured token is compared, so the time taken says nothing about which one
        # (if any) matched.
        for known in self._write if access == "write" else self._read:
            found |= hmac.compare_digest(probe, known)
        return found

    def permits(self, scope: Scope, access: Access) -> bool:
        """Whether this request may reach a route that needs ``access`` (what :meth:`check`
        decides; the headers are read only when a token is needed)."""
        return not self.needs_token(access) or self.accepts(_bearer(scope)[0], access)

    def may_read(self, scope: Scope) -> bool:
        token, _ = _bearer(scope)
        return self.accepts(token, "read")

    def check(self, scope: Scope) -> None:
        """Raise the refusal of a write a web page may not make (:meth:`write_refusal`: 403,
        415), or NotAuthorizedException (401, with its challenge) unless the request's token
        grants what its route needs."""
        method = str(scope.get("method", "GET"))
        path_template = str(scope.get("path_template", ""))
        access = access_for(method, path_template)
        if access == "write" and (refusal := self.write_refusal(scope)) is not None:
            raise refusal
        if self.permits(scope, access):
            return
        token, malformed = _bearer(scope)
        needed = "an API token (API_TOKENS)" if access == "write" else "a read or API token"
        how = "Authorization: Bearer <token>"
        if is_stream(method, path_template):
            how += f" or ?{ACCESS_TOKEN_PARAMETER}=<token>"
        if malformed:
            detail = (
                f"the Authorization header must be 'Bearer <token>'; this endpoint needs {needed}"
            )
            challenge = 'Bearer realm="activity", error="invalid_request"'
        elif token is None:
            detail = f"this endpoint needs {needed}: send {how}"
            challenge = 'Bearer realm="activity"'
        else:
            detail = f"the token is not valid for this endpoint, which needs {needed}"
            challenge = 'Bearer realm="activity", error="invalid_token"'
        raise NotAuthorizedException(detail=detail, headers={"WWW-Authenticate": challenge})


def require_access(app: ASGIApp, policy: AccessPolicy) -> ASGIApp:
    """Route middleware: :meth:`AccessPolicy.check` before the route runs (its refusal is
    answered by the application's exception handlers, like any other error)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope["type"]) == "http":
            policy.check(scope)
        await app(scope, receive, send)

    return middleware


def may_read(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """Whether this request may see read-guarded details (always, without read tokens)."""
    policy: AccessPolicy | None = connection.app.state.get("access_policy")
    return policy is None or policy.may_read(connection.scope)


def build_cors_config(settings: SecuritySettings) -> CORSConfig | None:
    """None (same-origin only: no CORS headers at all) unless origins are configured."""
    if not settings.cors_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID"],
        expose_headers=["X-Ingest-Id", "X-Request-ID", "Retry-After"],
        # Tokens travel in a header, not in cookies: no credentialed requests needed.
        allow_credentials=False,
        max_age=600,
    )
