"""Every error the Anthropic routes can raise, in Anthropic's shape: `{"type": "error", "error": {"type",
"message"}}`, with Anthropic's statuses, so the `anthropic` SDK raises its own typed exception for each."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from litestar import Request, Response

from litestar_llm.dialects.anthropic import wire
from litestar_llm.dialects.common import invalid_field
from litestar_llm.errors import InvalidRequestError, LitestarLLMError
from litestar_llm.serving import ErrorInfo, ErrorKind, classify

T = TypeVar("T")

_TYPES: dict[ErrorKind, str] = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "too_large": "request_too_large",
    "rate_limit": "rate_limit_error",
    "overloaded": "overloaded_error",
    "unavailable": "overloaded_error",  # an engine that is down or loading: retry later, as after a 529
    "client_closed": "invalid_request_error",  # nobody reads it
    "server": "api_error",
}
_STATUSES: dict[ErrorKind, int] = {"overloaded": 529}  # a full queue: Anthropic's "overloaded", which the SDK retries
_BLOCK_TYPE = re.compile(r"^(.*\.content\[\d+\])\.type$")


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode and validate a JSON body; msgspec's error becomes a 400 naming the field."""
    if not body:
        raise InvalidRequestError("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        field, text, missing = invalid_field(exc)
        if missing:
            text = "Field required"
        elif field and (m := _BLOCK_TYPE.match(field)) and text.startswith("Invalid value"):
            kind = text.removeprefix("Invalid value").strip()
            text = f"content blocks of type {kind} are not supported by this server"
            field = m.group(1)
        raise InvalidRequestError(f"{field}: {text}" if field else text, param=field) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None


def status_and_body(info: ErrorInfo) -> tuple[int, wire.ErrorResponse]:
    body = wire.ErrorResponse(error=wire.ErrorBody(type=_TYPES[info.kind], message=info.message))
    return _STATUSES.get(info.kind, info.status), body


def handle(_: Request, exc: Exception) -> Response[bytes]:
    info = classify(exc)
    status, body = status_and_body(info)
    return Response(
        wire.encoder.encode(body), status_code=status, media_type="application/json", headers=info.headers or None
    )


def sse_error(exc: BaseException) -> bytes:
    """An error after the stream began: Anthropic's `error` event, which the SDK raises as an APIStatusError."""
    return b"event: error\ndata: " + wire.encoder.encode(status_and_body(classify(exc))[1]) + b"\n\n"


def exception_handlers() -> dict:
    # LitestarLLMError named too: it must outrank the app-wide handler for it that non-dialect routes use.
    return {Exception: handle, LitestarLLMError: handle}
