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
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Literal
from urllib.parse import parse_qsl

from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.types import ASGIApp, Receive, Scope, Send

from app.settings import SecuritySettings

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


class AccessPolicy:
    """The configured tokens, and the guard that checks requests against them."""

    def __init__(self, settings: SecuritySettings) -> None:
        self._write = [_digest(token) for token in settings.api_tokens]
        self._read = self._write + [_digest(token) for token in settings.read_tokens]
        self.writes_guarded = bool(settings.api_tokens)
        self.reads_guarded = bool(settings.read_tokens)

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
        """Raise NotAuthorizedException (401, with its challenge) unless the request's token
        grants what its route needs."""
        method = str(scope.get("method", "GET"))
        path_template = str(scope.get("path_template", ""))
        access = access_for(method, path_template)
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
