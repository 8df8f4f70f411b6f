"""Fuzzing every generation endpoint with bodies drawn from its own wire Struct's JSON schema (and broken
variants of them): no 5xx, no hang (each request has a timeout), every error in the dialect's shape, and a
normal request succeeds after each case. Bounded: a fixed number of cases per endpoint."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest
import schemas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from litestar_llm.dialects.ollama import wire as ollama_wire
from litestar_llm.dialects.openai import wire as openai_wire
from litestar_llm.dialects.responses import wire as responses_wire

CASES_PER_ENDPOINT = 60
MAX_TOKENS = {"max_tokens": 6, "max_completion_tokens": 6, "max_output_tokens": 6}

ENDPOINTS = {
    "/v1/chat/completions": (openai_wire.ChatCompletionRequest, "openai"),
    "/v1/completions": (openai_wire.CompletionRequest, "openai"),
    "/v1/responses": (responses_wire.CreateResponse, "openai"),
    "/api/chat": (ollama_wire.ChatRequest, "ollama"),
    "/api/generate": (ollama_wire.GenerateRequest, "ollama"),
}


def _body_strategy(struct: type, path: str) -> st.SearchStrategy:
    """Schema-valid bodies (some naming the real model, bounded to a few tokens so the run stays short) and
    broken ones: a field replaced by a value of another type, or a body that is not an object at all."""
    schema = msgspec.json.schema(struct)
    valid = from_schema(schema).map(lambda body: _bounded(body, path))
    junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5))
    broken = st.tuples(valid, st.sampled_from(sorted(_fields(schema))), junk).map(lambda t: {**t[0], t[1]: t[2]})
    return st.one_of(valid, valid, broken, junk)


def _fields(schema: dict) -> set[str]:
    root = schema["$defs"][schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema
    return set(root.get("properties", {}))


def _bounded(body: dict, path: str) -> dict:
    body = dict(body)
    if len(str(body.get("model", ""))) % 2 == 0:
        body["model"] = "tiny"
    if path.startswith("/api/"):
        options = body.get("options")
        body["options"] = {**(options if isinstance(options, dict) else {}), "num_predict": 6}
    else:
        field = {"/v1/responses": "max_output_tokens"}.get(path, "max_tokens")
        body.pop("max_completion_tokens", None)
        body[field] = min(body[field], 6) if isinstance(body.get(field), int) and body[field] > 0 else 6
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 2)
    return body


def _check_error(dialect: str, response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if dialect == "openai":
        schemas.openai("ErrorResponse", response.json())
    else:
        schemas.ollama("ErrorResponse", response.json())


def _send(client: httpx.Client, path: str, body: object, dialect: str) -> None:
    content = json.dumps(body).encode()
    with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as response:
        if response.status_code != 200:
            response.read()
            _check_error(dialect, response)
            return
        for line in response.iter_lines():  # a stream may end in an error chunk: never a server error one
            assert "internal server error" not in line, line


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_fuzzed_bodies_never_break_the_server(server, path: str) -> None:
    struct, dialect = ENDPOINTS[path]
    normal = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": False}
    with httpx.Client(base_url=server.url, timeout=60) as client:

        @settings(
            max_examples=CASES_PER_ENDPOINT,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(body=_body_strategy(struct, path))
        def case(body: object) -> None:
            _send(client, path, body, dialect)
            after = client.post("/v1/chat/completions", json=normal)
            assert after.status_code == 200, f"after {body!r}: {after.text}"

        case()
