"""Every error the OpenAI routes can raise, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from typing import TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from litestar_llm.dialects.common import invalid_field
from litestar_llm.dialects.openai import wire
from litestar_llm.errors import InvalidRequestError, LitestarLLMError, ModelNotFoundError

logger = logging.getLogger(__name__)
T = TypeVar("T")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}
_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}


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


def error_body(exc: BaseException) -> tuple[int, wire.ErrorResponse]:
    if isinstance(exc, LitestarLLMError):
        status = exc.status_code
        message = getattr(exc, "message", str(exc))
        param = (
            exc.param
            if isinstance(exc, InvalidRequestError)
            else ("model" if isinstance(exc, ModelNotFoundError) else None)
        )
    elif isinstance(exc, HTTPException):
        status, message, param = exc.status_code, exc.detail, None
        if status == 413:
            message = "the request body is larger than this server accepts (server.max_request_bytes)"
    else:
        logger.error("unhandled error", exc_info=exc)
        status, message, param = 500, "internal server error", None
    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, wire.ErrorResponse(
        wire.Error(message=message, type=error_type, param=param, code=_CODES.get(status))
    )


def handle(_: Request, exc: Exception) -> Response[bytes]:
    status, body = error_body(exc)
    headers = getattr(exc, "headers", None) or None
    return Response(wire.encoder.encode(body), status_code=status, media_type="application/json", headers=headers)


def sse_error(exc: BaseException) -> bytes:
    """An error after the stream began: one SSE event the openai SDK raises as APIError."""
    return b"data: " + wire.encoder.encode(error_body(exc)[1]) + b"\n\n"


def exception_handlers() -> dict:
    # LitestarLLMError named too: it must outrank the app-wide handler for it that non-dialect routes use.
    return {Exception: handle, LitestarLLMError: handle}
