"""Every error the Ollama routes can raise, in Ollama's shape: {"error": "..."} with Ollama's status codes."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from litestar import Request, Response

from litestar_llm.dialects.common import invalid_field
from litestar_llm.dialects.ollama import wire
from litestar_llm.errors import InvalidRequestError, LitestarLLMError, ModelNotFoundError
from litestar_llm.serving import classify

T = TypeVar("T")


def decode_body(body: bytes, type_: type[T]) -> T:
    if not body:
        raise InvalidRequestError("missing request body")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        field, text, missing = invalid_field(exc)
        text = "is required" if missing else text
        raise InvalidRequestError(f"{field}: {text}" if field else text, param=field) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"invalid JSON: {exc}") from None


def error_status(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, ModelNotFoundError):
        return 404, f"model '{exc.model}' not found"
    info = classify(exc)
    if info.status == 413:
        return 413, "request body is larger than this server accepts (server.max_request_bytes)"
    return info.status, info.message


def handle(_: Request, exc: Exception) -> Response[bytes]:
    status, message = error_status(exc)
    headers = getattr(exc, "headers", None) or None
    return Response(
        wire.encoder.encode(wire.Error(message)), status_code=status, media_type="application/json", headers=headers
    )


def ndjson_error(exc: BaseException) -> bytes:
    """An error after streaming began: a final NDJSON line, as Ollama sends it."""
    return wire.encoder.encode(wire.Error(error_status(exc)[1])) + b"\n"


def exception_handlers() -> dict:
    # LitestarLLMError named too: it must outrank the app-wide handler for it that non-dialect routes use.
    return {Exception: handle, LitestarLLMError: handle}
