"""Every error the OpenAI routes can raise, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from litestar import Request, Response

from litestar_llm.dialects.common import invalid_field
from litestar_llm.dialects.openai import wire
from litestar_llm.errors import InvalidRequestError, LitestarLLMError
from litestar_llm.serving import ErrorInfo, classify

T = TypeVar("T")

_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "invalid_request_error",
    "too_large": "invalid_request_error",
    "rate_limit": "rate_limit_error",
    "overloaded": "server_error",
    "unavailable": "server_error",
    "client_closed": "invalid_request_error",
    "server": "server_error",
}
_CODES = {
    "authentication": "invalid_api_key",
    "too_large": "request_too_large",
    "rate_limit": "rate_limit_exceeded",
    "overloaded": "server_overloaded",
}


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode and validate a JSON body; msgspec's error becomes a 400 whose `param` names the field."""
    if not body:
        raise InvalidRequestError("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        param, text, missing = invalid_field(exc)
        text = "required field is missing" if missing else text
        raise InvalidRequestError(f"{param}: {text}" if param else text, param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None


def encode_error(info: ErrorInfo) -> wire.ErrorResponse:
    code = "model_not_found" if info.model_not_found else _CODES.get(info.kind)
    return wire.ErrorResponse(wire.Error(message=info.message, type=_TYPES[info.kind], param=info.param, code=code))


def error_body(exc: BaseException) -> tuple[int, wire.ErrorResponse]:
    info = classify(exc)
    return info.status, encode_error(info)


def handle(_: Request, exc: Exception) -> Response[bytes]:
    info = classify(exc)
    return Response(
        wire.encoder.encode(encode_error(info)),
        status_code=info.status,
        media_type="application/json",
        headers=info.headers or None,
    )


def sse_error(exc: BaseException) -> bytes:
    """An error after the stream began: one SSE event the openai SDK raises as APIError."""
    return b"data: " + wire.encoder.encode(error_body(exc)[1]) + b"\n\n"


def exception_handlers() -> dict:
    # LitestarLLMError named too: it must outrank the app-wide handler for it that non-dialect routes use.
    return {Exception: handle, LitestarLLMError: handle}
