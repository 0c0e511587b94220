"""Every failure as the contract's JSON error: ``{"status_code", "detail", "extra"}``."""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.types import ExceptionHandlersMap
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.agents.reports import InvalidReport
from app.api.limits import body_too_large_detail
from app.api.security import access_for
from app.content import ContentUnavailable, InvalidContentQuery
from app.eventlog import EventIdReused, LogUnavailable, VersionConflict
from app.ingest.urls import InvalidUrl

__all__ = [
    "AppendRefusal",
    "ErrorDocumentingJsonPlugin",
    "append_refusal",
    "document_errors",
    "error_body",
    "exception_handlers",
]

logger = logging.getLogger(__name__)


#: The longest text an error document carries in one string: refusals quote what they refuse,
#: and a refused value can be as large as the body limit.
MAX_ERROR_TEXT = 1000


def error_body(status_code: int, detail: str, extra: Any = None) -> dict[str, Any]:
    """The contract's error document, every string in it cut to :data:`MAX_ERROR_TEXT`."""
    return {
        "status_code": status_code,
        "detail": _capped(detail),
        "extra": _capped(extra) if extra is not None else {},
    }


def _capped(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) <= MAX_ERROR_TEXT:
            return value
        return f"{value[:MAX_ERROR_TEXT]}… ({len(value)} characters in all)"
    if isinstance(value, dict):
        return {key: _capped(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_capped(item) for item in value]
    return value


def error_response(status_code: int, detail: str, extra: Any = None) -> Response[Any]:
    return Response(
        error_body(status_code, detail, extra), status_code=status_code, media_type=MediaType.JSON
    )


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    # Litestar's own handler leaves out ``extra`` when there is none; the contract always has it.
    detail, extra = exc.detail, exc.extra
    if isinstance(exc, RequestEntityTooLarge):
        detail, extra = body_too_large_detail(request), {"field": "body"}
    elif isinstance(exc.__cause__, SerializationException):
        # Litestar passes on the decoder's words alone ("Input data was truncated").
        detail, extra = f"the request body is not valid JSON: {detail}", {"field": "body"}
    response = error_response(exc.status_code, detail, extra)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def _invalid_report(_: Request[Any, Any, Any], exc: InvalidReport) -> Response[Any]:
    return error_response(422, str(exc), {"field": exc.field})


def _invalid_url(_: Request[Any, Any, Any], exc: InvalidUrl) -> Response[Any]:
    return error_response(400, f"url: {exc}", {"field": "url"})


def _invalid_content_query(_: Request[Any, Any, Any], exc: InvalidContentQuery) -> Response[Any]:
    return error_response(400, str(exc), {"field": exc.field})


def _content_unavailable(_: Request[Any, Any, Any], exc: ContentUnavailable) -> Response[Any]:
    # The store's own words: which store, and what failed (never a password: URLs are redacted).
    logger.warning("content store unavailable: %s", exc)
    response = error_response(503, str(exc), {"store": "content"})
    response.headers["Retry-After"] = "1"
    return response


def _validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    # Name the offending field in the detail itself, not only in ``extra``.
    problems = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for problem in problems:
        if isinstance(problem, dict):
            key = problem.get("key")
            message = problem.get("message", "")
            parts.append(f"{key}: {message}" if key else str(message))
    detail = exc.detail if not parts else f"{exc.detail}: " + "; ".join(parts)
    return error_response(400, detail, problems or exc.extra)


AppendRefusal = VersionConflict | EventIdReused | LogUnavailable


def append_refusal(exc: AppendRefusal) -> tuple[int, str, dict[str, Any], dict[str, str]]:
    """Status, detail, extra and headers of the answer to an append the log refused."""
    if isinstance(exc, VersionConflict):
        extra: dict[str, Any] = {
            "stream": exc.stream,
            "source_id": exc.source_id,
            "expected_version": exc.expected,
            "current_version": exc.actual,
        }
        return 409, str(exc), extra, {}
    if isinstance(exc, EventIdReused):
        return 409, str(exc), {"event_id": exc.event_id, "position": exc.position}, {}
    logger.warning("log unavailable: %s", exc)
    return 503, str(exc), {}, {"Retry-After": "1"}


def _append_refused(_: Request[Any, Any, Any], exc: AppendRefusal) -> Response[Any]:
    status_code, detail, extra, headers = append_refusal(exc)
    response = error_response(status_code, detail, extra)
    response.headers.update(headers)
    return response


def _database_down(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # The database went away (a restart, a network cut): say so, and when to come back. The
    # message is ours: a driver's text can carry a connection string.
    logger.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    response = error_response(
        503, "the database is unavailable; retry shortly", {"error": type(exc).__name__}
    )
    response.headers["Retry-After"] = "1"
    return response


exception_handlers: ExceptionHandlersMap = {
    HTTPException: _http_error,
    InvalidReport: _invalid_report,
    InvalidUrl: _invalid_url,
    InvalidContentQuery: _invalid_content_query,
    ContentUnavailable: _content_unavailable,
    ValidationException: _validation,
    VersionConflict: _append_refused,
    EventIdReused: _append_refused,
    LogUnavailable: _append_refused,
    DBAPIError: _database_down,
    PoolTimeout: _database_down,
    ConnectionError: _database_down,
}


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["status_code", "detail", "extra"],
    "properties": {
        "status_code": {"type": "integer"},
        "detail": {"type": "string"},
        "extra": {"oneOf": [{"type": "object"}, {"type": "array"}]},
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_WHY = {
    "204": "Resumed after the ingest's complete event: nothing more will come",
    "401": "A token is needed (API_TOKENS for writes; READ_TOKENS, when set, for reads)",
    "404": "No such resource",
    "409": "A conflict (expected_version, a reused event_id, an ingest that already ended)",
    "413": "The body, or an event's payload, is larger than its limit",
    "422": "A field's value is refused (named in detail and extra.field)",
    "503": "The log or a store is unavailable, or the SSE connection limit is reached; "
    "retry after Retry-After",
}


def _errors_for(method: str, path: str) -> list[str]:
    codes = ["503"]
    if access_for(method.upper(), path) != "public":
        codes.append("401")
    if "{" in path:
        codes += ["404", "422"]
    if method in ("post", "put", "patch", "delete"):
        codes += ["409", "413", "422"]
    if method == "get" and path.startswith("/ingests/{") and path.endswith("/stream"):
        codes.append("204")
    return codes


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the error responses every operation can give (the contract's JSON error shape)
    to the generated OpenAPI document, in place; handlers document their successes."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = _ERROR_SCHEMA
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for code in _errors_for(method, path):
                if code == "204":
                    responses.setdefault(code, {"description": _WHY[code]})
                    continue
                if path == "/health":
                    # The health body itself, saying which part is unavailable.
                    responses.setdefault(code, {"description": "Something is unavailable"})
                    continue
                responses.setdefault(
                    code,
                    {
                        "description": _WHY[code],
                        "content": {"application/json": {"schema": _ERROR_REF}},
                    },
                )
    return schema


class ErrorDocumentingJsonPlugin(JsonRenderPlugin):
    """The OpenAPI document as JSON, with :func:`document_errors` applied."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, document_errors(openapi_schema))
