"""Validate response bodies against the published OpenAPI descriptions (copied into tests/data)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator

DATA = Path(__file__).parent / "data"


def _nullable(node: object) -> object:
    """OpenAI's description is OpenAPI 3.1 but still says `nullable: true` in places (a 3.0 keyword that JSON
    Schema ignores): read it as 3.0 meant it, "this, or null"."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def _validator(spec: str, name: str) -> Draft202012Validator:
    root = _nullable(json.loads((DATA / spec).read_text()))
    # The $ref resolves against this same document, so every nested #/components/schemas/... ref works.
    return Draft202012Validator({**root, "$ref": f"#/components/schemas/{name}"})


def assert_valid(spec: str, name: str, instance: object) -> None:
    errors = sorted(_validator(spec, name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, f"{name} violates the spec: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
    )


def openai(name: str, instance: object) -> None:
    assert_valid("openai_schemas.json", name, instance)


def ollama(name: str, instance: object) -> None:
    assert_valid("ollama_schemas.json", name, instance)


def assert_openai_error(response, status: int, param: str | None, error_type: str = "invalid_request_error") -> dict:
    """An OpenAI-shaped error with the right status, `param` and `type`, valid against OpenAI's ErrorResponse."""
    assert response.status_code == status, response.text
    error = response.json()
    openai("ErrorResponse", error)
    assert error["error"]["message"]
    assert error["error"]["param"] == param
    assert error["error"]["type"] == error_type
    return error
