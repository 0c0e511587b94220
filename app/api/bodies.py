"""Request bodies as the routed handlers decode them, with refusals that say what is wrong.

msgspec decodes JSON in C and is right to refuse what it refuses, but three of its refusals
read badly to a client: a body nested so deep that decoding it would exhaust the stack
raises RecursionError (a 500, left to itself); an unpaired UTF-16 surrogate escape such as
``"\\ud800"`` is reported as "Input data was truncated"; and an integer longer than Python
will convert reads "Integer value out of range - at `$[...]`". :class:`JsonRequest` words each
as a 400 naming the body and the limit it broke. The direct append path
(:mod:`app.api.direct`) hands every body it cannot decode to the router, so these are its
refusals too.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from litestar import Request
from litestar.exceptions import ClientException, SerializationException

from app.events.envelope import MAX_PAYLOAD_DEPTH

__all__ = ["MAX_INTEGER_DIGITS", "JsonRequest", "describe_undecodable"]

#: The longest a JSON integer may be, its sign included: Python's own bound on converting
#: text to int, which guards every int() of untrusted text against quadratic-time conversion.
MAX_INTEGER_DIGITS = sys.get_int_max_str_digits() or 4300

# A \uD800-\uDBFF escape (after an even run of backslashes: not itself escaped) that no
# \uDC00-\uDFFF escape follows, or a low surrogate escape that no high one precedes.
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2})(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<![0-9a-fA-F]{2})(?<!\\)(?:\\\\)*(\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)


def describe_undecodable(body: bytes, message: str) -> str:
    """What is wrong with a body msgspec refused to decode with ``message``."""
    if "Integer value out of range" in message:
        return (
            f"the request body holds an integer longer than {MAX_INTEGER_DIGITS} characters "
            "(the longest a JSON integer may be, its sign included)"
        )
    if "truncated" in message or "surrogate" in message:
        found = _LONE_SURROGATE.search(body)
        if found is not None:
            escape = (found.group(1) or found.group(2)).decode()
            return (
                f"the request body is not valid JSON: the string escape {escape} at byte "
                f"{found.start(1) if found.group(1) else found.start(2)} is half of a UTF-16 "
                "surrogate pair with no other half, which is not a character"
            )
    return f"the request body is not valid JSON: {message}"


def _too_deep() -> ClientException:
    return ClientException(
        detail="the request body is nested too deeply to decode; event payloads may nest "
        f"at most {MAX_PAYLOAD_DEPTH} levels",
        extra={"field": "body", "limit": MAX_PAYLOAD_DEPTH},
    )


class JsonRequest(Request[Any, Any, Any]):
    """The application's request class: :meth:`json` refuses with a clear 400."""

    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise _too_deep() from None
        except SerializationException as exc:
            raise ClientException(
                detail=describe_undecodable(await self.body(), str(exc)),
                extra={"field": "body"},
            ) from None
