"""What every dialect's codec shares, and nothing dialect-specific."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from litestar_llm.engine.types import ChatMessage, ToolCall
from litestar_llm.errors import InvalidRequestError


def invalid_field(exc: msgspec.ValidationError) -> tuple[str | None, str, bool]:
    """msgspec's validation error as (the field's path, the message without backticks, whether the field is missing),
    for each dialect to word in its own way."""
    text, _, at = str(exc).partition(" - at `$")
    field = at.rstrip("`").lstrip(".") or None
    if m := re.match(r"Object missing required field `(.+)`", text):
        return (f"{field}.{m.group(1)}" if field else m.group(1)), "", True
    return field, text.replace("`", ""), False


def arguments_text(arguments: str | dict | None, param: str) -> str:
    """Tool-call arguments as JSON text, whether a client sent them as text (OpenAI) or as an object (Ollama)."""
    if arguments is None:
        return "{}"
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequestError(f"{param}: must be the JSON text of an object", param=param)
    return arguments


def names_of_calls(messages: list[ChatMessage]) -> dict[str, ToolCall]:
    return {call.id: call for message in messages for call in message.tool_calls}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("additionalProperties", "items", "prefixItems", "allOf", "anyOf", "oneOf", "not", "if", "then", "else")


def strict_schema(schema: dict) -> dict:
    """A copy of a strict schema (OpenAI's `strict: true`): an object that names its properties and does not say
    otherwise admits no others, as vLLM's `disable_additional_properties` reads it."""

    def walk(node: object) -> object:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        for key in _SCHEMA_MAPS:
            if isinstance(out.get(key), dict):
                out[key] = {name: walk(sub) for name, sub in out[key].items()}
        for key in _SUBSCHEMAS:
            if isinstance(out.get(key), dict | list):
                out[key] = walk(out[key])
        if "additionalProperties" not in out and isinstance(out.get("properties"), dict):
            out["additionalProperties"] = False
        return out

    return walk(schema)


def wire_bodies(
    request: Any = None, response: Any = None, stream: Any = None, stream_media: str = "text/event-stream"
) -> dict[str, Any]:
    """A route's `opt` naming the wire Structs it decodes and encodes, for /docs (plugins/docs): the handler keeps
    reading its raw body and decoding it with msgspec, so documenting it costs nothing per request. `stream` is
    what each event of a streamed answer holds (a Struct, or a tuple of the Structs it may be), sent as
    `stream_media`."""
    return {"wire_bodies": {"request": request, "response": response, "stream": stream, "stream_media": stream_media}}
