"""The Anthropic Messages dialect against real servers under granian, with the official `anthropic` SDK (its
pydantic models parse every answer, and its own accumulator turns a stream into a message); and the codec's
block rules on synthetic deltas (thinking, text and tool calls, whatever the test model can do)."""

from __future__ import annotations

import json

import anthropic
import httpx
import msgspec
import pytest
from conftest import Server, gateway_toml, model_toml

from litestar_llm.dialects.anthropic import wire
from litestar_llm.dialects.anthropic.errors import sse_error, status_and_body
from litestar_llm.dialects.anthropic.translate import Blocks, messages_request, stop_reason
from litestar_llm.engine.types import Delta, NamedToolChoice, ToolCallDelta, Usage
from litestar_llm.errors import (
    AuthenticationError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RateLimitError,
)
from litestar_llm.serving import ClientDisconnected, classify

HELLO = [{"role": "user", "content": "Tell me about JSON."}]
GREEDY = {"max_tokens": 12, "extra_body": {"temperature": 0}}
"""Greedy: the SDK no longer has sampling parameters of its own, so they go in the body as Anthropic's API takes them."""
HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
KEY, LIMITED_KEY = "anthropic-test-key-5c1d", "anthropic-limited-key-9e2f"


@pytest.fixture(scope="module")
def server(start_server, tiny_model) -> Server:
    return start_server(
        f"""
        [server]
        max_request_bytes = 65536
        [routes]
        openai = true
        ollama = true
        anthropic = true
        [backends.local]
        kind = "mlx"
        {model_toml(tiny_model)}
        """
    )


@pytest.fixture(scope="module")
def client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60)


def _without_ids(message: anthropic.types.Message) -> dict:
    dumped = message.model_dump()
    dumped.pop("id")
    for block in dumped["content"]:
        if block.get("type") == "tool_use":
            block.pop("id")
    return dumped


def _events(server: Server, body: dict) -> list[tuple[str, dict]]:
    """The raw SSE events of a streamed request, as (event name, payload)."""
    events = []
    with httpx.stream("POST", f"{server.url}/v1/messages", json={**body, "stream": True}, headers=HEADERS) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


# -- messages -----------------------------------------------------------------------------------------------


def test_messages_create(client: anthropic.Anthropic, tokenizer) -> None:
    message = client.messages.create(model="tiny", messages=HELLO, **GREEDY)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "tiny"
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert message.usage.input_tokens == len(prompt["input_ids"])
    assert message.usage.output_tokens == 12


def test_stream_accumulates_to_the_non_streamed_message(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model="tiny", messages=HELLO, **GREEDY)
    with client.messages.stream(model="tiny", messages=HELLO, **GREEDY) as stream:
        texts = list(stream.text_stream)
        streamed = stream.get_final_message()
    assert "".join(texts) == whole.content[0].text
    assert _without_ids(streamed) == _without_ids(whole)


def test_stream_events_in_order_named_by_type(server: Server, client: anthropic.Anthropic) -> None:
    events = _events(server, {"model": "tiny", "messages": HELLO, "max_tokens": 12, "temperature": 0})  # raw JSON
    assert all(name == payload["type"] for name, payload in events)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    counted = client.messages.count_tokens(model="tiny", messages=HELLO).input_tokens
    assert start["usage"] == {"input_tokens": counted, "output_tokens": 0}
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(p["delta"]["type"] == "text_delta" and p["index"] == 0 for _, p in events[3:-3])
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert final["usage"] == {"input_tokens": counted, "output_tokens": 12}


def test_count_tokens_equals_usage(client: anthropic.Anthropic) -> None:
    cases = [
        {"messages": HELLO},
        {"messages": HELLO, "system": "You are terse."},
        {"messages": [*HELLO, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "More."}]},
    ]
    for case in cases:
        counted = client.messages.count_tokens(model="tiny", **case).input_tokens
        answered = client.messages.create(model="tiny", max_tokens=2, **case).usage.input_tokens
        assert counted == answered, case


def test_system_forms_are_one_prompt(client: anthropic.Anthropic) -> None:
    """`system` as a string, as text blocks (with cache_control), or as a leading system-role entry in messages
    (as some coding agents send it): the same prompt, so the same greedy text."""
    as_string = client.messages.create(model="tiny", system="You are terse.", messages=HELLO, **GREEDY)
    as_blocks = client.messages.create(
        model="tiny",
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=HELLO,
        **GREEDY,
    )
    in_messages = client.messages.create(
        model="tiny", messages=[{"role": "system", "content": "You are terse."}, *HELLO], **GREEDY
    )
    plain = client.messages.create(model="tiny", messages=HELLO, **GREEDY)
    assert as_string.usage.input_tokens > plain.usage.input_tokens
    assert _without_ids(as_string) == _without_ids(as_blocks) == _without_ids(in_messages)


def test_unknown_fields_and_blocks_are_accepted(server: Server) -> None:
    body = {
        "model": "tiny",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Tell me about JSON.", "cache_control": {"type": "ephemeral"}}],
            }
        ],
        "metadata": {"user_id": "u-1"},
        "service_tier": "auto",
        "some_future_field": {"x": 1},
    }
    r = httpx.post(f"{server.url}/v1/messages", json=body, headers=HEADERS)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["output_tokens"] == 4


def test_max_tokens_and_stop_sequences(client: anthropic.Anthropic) -> None:
    reference = client.messages.create(model="tiny", messages=HELLO, max_tokens=40, extra_body={"temperature": 0})
    assert reference.stop_reason == "max_tokens"
    text = reference.content[0].text
    stop = next(text[i : i + 3] for i in range(len(text) // 2, len(text)) if text[i : i + 3].strip() == text[i : i + 3])
    stopped = client.messages.create(
        model="tiny", messages=HELLO, max_tokens=40, extra_body={"temperature": 0}, stop_sequences=["never-there", stop]
    )
    assert stopped.content[0].text == text[: text.index(stop)]
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    with client.messages.stream(
        model="tiny", messages=HELLO, max_tokens=40, extra_body={"temperature": 0}, stop_sequences=[stop]
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == stop
    assert streamed.content[0].text == stopped.content[0].text


def test_sampling_fields_are_honoured(client: anthropic.Anthropic) -> None:
    greedy = client.messages.create(model="tiny", messages=HELLO, **GREEDY).content[0].text
    top_k_1 = client.messages.create(
        model="tiny", messages=HELLO, max_tokens=12, extra_body={"top_k": 1, "temperature": 1}
    )
    assert top_k_1.content[0].text == greedy  # top_k 1 is greedy whatever the temperature
    tiny_p = client.messages.create(
        model="tiny", messages=HELLO, max_tokens=12, extra_body={"top_p": 0.0001, "temperature": 1}
    )
    assert tiny_p.content[0].text == greedy


def test_same_greedy_text_through_every_dialect(server: Server, client: anthropic.Anthropic) -> None:
    import ollama
    import openai

    through_anthropic = client.messages.create(model="tiny", messages=HELLO, **GREEDY).content[0].text
    chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0).chat.completions.create(
        model="tiny", messages=HELLO, temperature=0, max_tokens=12
    )
    through_ollama = ollama.Client(host=server.url).chat(
        model="tiny", messages=HELLO, options={"temperature": 0, "num_predict": 12}
    )
    assert through_anthropic == chat.choices[0].message.content == through_ollama.message.content


def test_models_in_anthropic_shape(server: Server, client: anthropic.Anthropic) -> None:
    models = list(client.models.list())
    assert [m.id for m in models] == ["tiny"]
    assert models[0].type == "model" and models[0].display_name == "tiny" and models[0].created_at.year >= 1970
    page = client.models.list(limit=1)
    assert page.has_more is False and page.first_id == page.last_id == "tiny"
    assert client.models.retrieve("tiny").id == "tiny"
    assert client.models.retrieve("tiny:latest").id == "tiny:latest"
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        client.models.list(after_id="nope")
    # without the header: OpenAI's shape, as before
    assert httpx.get(f"{server.url}/v1/models").json()["object"] == "list"
    assert httpx.get(f"{server.url}/v1/models/tiny").json()["object"] == "model"


# -- other backends: a gateway (kind = "openai") in front of the MLX server, and vLLM's CPU build -------------


@pytest.fixture(scope="module", params=["remote", "vllm"])
def backend(request, start_server, server: Server, agent_model) -> tuple[str, anthropic.Anthropic]:
    """A gateway in front of this module's MLX server, and conftest's shared vLLM server (which also serves the
    agent model: named here so that conftest gives these tests room for its build)."""
    other = start_server(gateway_toml(server)) if request.param == "remote" else request.getfixturevalue("vllm_server")
    return request.param, anthropic.Anthropic(base_url=other.url, api_key="x", max_retries=0, timeout=120)


@pytest.mark.timeout(900)
def test_other_backends(backend: tuple[str, anthropic.Anthropic], client: anthropic.Anthropic) -> None:
    """create, stream, count_tokens, stop sequences and the chat dialect's text, over each other backend."""
    import openai

    kind, backend = backend

    whole = backend.messages.create(model="tiny", messages=HELLO, **GREEDY)
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 12
    with backend.messages.stream(model="tiny", messages=HELLO, **GREEDY) as stream:
        assert _without_ids(stream.get_final_message()) == _without_ids(whole)
    assert backend.messages.count_tokens(model="tiny", messages=HELLO).input_tokens == whole.usage.input_tokens
    chat = openai.OpenAI(
        base_url=str(backend.base_url).rstrip("/") + "/v1", api_key="x", max_retries=0
    ).chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=12)
    assert chat.choices[0].message.content == whole.content[0].text
    if kind == "remote":  # a gateway: what its upstream answers
        assert _without_ids(whole) == _without_ids(client.messages.create(model="tiny", messages=HELLO, **GREEDY))
    text = backend.messages.create(model="tiny", messages=HELLO, max_tokens=40, extra_body={"temperature": 0})
    text = text.content[0].text
    stop = next(text[i : i + 3] for i in range(len(text) // 2, len(text)) if text[i : i + 3].strip() == text[i : i + 3])
    stopped = backend.messages.create(
        model="tiny", messages=HELLO, max_tokens=40, extra_body={"temperature": 0}, stop_sequences=[stop]
    )
    assert stopped.content[0].text == text[: text.index(stop)]
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop


# -- errors -------------------------------------------------------------------------------------------------


def _error(caught: pytest.ExceptionInfo, kind: str) -> str:
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    return body["error"]["message"]


def test_bad_fields_are_400s_naming_the_field(client: anthropic.Anthropic, server: Server) -> None:
    cases = [
        ({"messages": HELLO, "max_tokens": 4, "temperature": 1.5}, "temperature"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": [], "max_tokens": 4}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}], "max_tokens": 4}, "messages[0].role"),
        ({"messages": HELLO, "max_tokens": 4, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"messages": HELLO, "max_tokens": 8, "thinking": {"type": "enabled", "budget_tokens": 8}}, "budget_tokens"),
        (
            {"messages": [*HELLO, {"role": "assistant", "content": "The answer is"}], "max_tokens": 4},
            "messages[1]: the last message must be a user turn",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "server_tool_use", "id": "x"}]}], "max_tokens": 4},
            "messages[0].content[0]: content blocks of type 'server_tool_use' are not supported",
        ),
        (
            {"messages": HELLO, "max_tokens": 4, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools[0].type: server tools",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}
                ],
                "max_tokens": 4,
            },
            "messages[0].content[0].tool_use_id",
        ),
    ]
    for body, expected in cases:
        rest = dict(body)
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(
                model="tiny", max_tokens=rest.pop("max_tokens"), messages=rest.pop("messages"), extra_body=rest
            )
        assert expected in _error(caught, "invalid_request_error"), body
    r = httpx.post(f"{server.url}/v1/messages", json={"model": "tiny", "messages": HELLO}, headers=HEADERS)
    assert r.status_code == 400 and r.json()["error"]["message"] == "max_tokens: Field required"
    r = httpx.post(f"{server.url}/v1/messages", content=b"{not json", headers=HEADERS)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_images_and_documents_are_refused_clearly(client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hi"}}
    for block, where in [(image, "messages[0].content[1]"), (document, "messages[0].content[1]")]:
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(
                model="tiny",
                max_tokens=4,
                messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, block]}],
            )
        message = _error(caught, "invalid_request_error")
        assert message.startswith(f"{where}: {block['type']} content is not supported by this server"), message
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": [image]}])
    assert "image content is not supported" in _error(caught, "invalid_request_error")
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [image]}
    history = [
        {"role": "user", "content": "Look."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "look", "input": {}}]},
        {"role": "user", "content": [result]},
    ]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="tiny", max_tokens=4, messages=history)
    assert _error(caught, "invalid_request_error").startswith("messages[2].content[0].content[0]: image content")


def test_tools_on_a_model_that_cannot_call_them(client: anthropic.Anthropic) -> None:
    tool = {"name": "get_weather", "description": "Weather.", "input_schema": {"type": "object", "properties": {}}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="tiny", max_tokens=4, messages=HELLO, tools=[tool])
    assert _error(caught, "invalid_request_error").startswith("tools: model 'tiny' cannot call tools")
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="tiny", max_tokens=4, messages=HELLO, tools=[tool], tool_choice={"type": "tool", "name": "other"}
        )
    assert "tool_choice" in _error(caught, "invalid_request_error")
    # tool_choice none offers no tools: nothing the model must be able to do
    message = client.messages.create(
        model="tiny", max_tokens=4, messages=HELLO, tools=[tool], tool_choice={"type": "none"}
    )
    assert message.stop_reason == "max_tokens"


def test_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-nope", max_tokens=4, messages=HELLO)
    assert "claude-nope" in _error(caught, "not_found_error")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-nope", messages=HELLO)
    with (
        pytest.raises(anthropic.NotFoundError),
        client.messages.stream(model="claude-nope", max_tokens=4, messages=HELLO) as stream,
    ):
        stream.get_final_message()


def test_too_large_body_is_413(client: anthropic.Anthropic) -> None:
    too_large = getattr(anthropic, "ContentTooLargeError", anthropic.APIStatusError)
    with pytest.raises(too_large) as caught:
        client.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "x" * 70_000}])
    assert caught.value.status_code == 413
    assert _error(caught, "request_too_large")


def test_a_client_that_leaves_frees_its_batch_slot(server: Server) -> None:
    # Greedy: the tiny model's answer to HELLO runs for hundreds of tokens (sampled, it may end after a few).
    body = {"model": "tiny", "max_tokens": 1500, "messages": HELLO, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, headers=HEADERS) as r:
        for line in r.iter_lines():
            if line.startswith("event: content_block_delta"):
                break
    server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):  # hundreds of tokens take far longer than this on any machine
        httpx.post(f"{server.url}/v1/messages", json={**body, "stream": False}, headers=HEADERS, timeout=0.3)
    server.wait_idle()


def test_fuzzed_bodies_never_break_the_server(server: Server) -> None:
    """Bodies drawn from the request Struct's own JSON schema, and broken variants: never a 5xx, every error in
    Anthropic's shape, and a normal request succeeds after each."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis_jsonschema import from_schema

    schema = msgspec.json.schema(wire.MessagesRequest)
    fields = sorted(schema["$defs"]["MessagesRequest"]["properties"])

    def bounded(body: dict) -> dict:
        body = {**body, "max_tokens": 4}
        if len(str(body.get("model", ""))) % 2 == 0:
            body["model"] = "tiny"
        return body

    valid = from_schema(schema).map(bounded)
    junk = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
    broken = st.tuples(valid, st.sampled_from(fields), junk).map(lambda t: {**t[0], t[1]: t[2]})
    normal = {"model": "tiny", "max_tokens": 2, "messages": HELLO}
    with httpx.Client(base_url=server.url, timeout=60, headers=HEADERS) as http:

        @settings(
            max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        @given(body=st.one_of(valid, valid, broken, junk))
        def case(body: object) -> None:
            with http.stream("POST", "/v1/messages", content=json.dumps(body).encode()) as response:
                response.read()
                if response.status_code != 200:
                    assert response.status_code < 500, response.text
                    error = response.json()
                    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}, error
                else:
                    assert b"api_error" not in response.content, response.content
            after = http.post("/v1/messages", json=normal)
            assert after.status_code == 200, f"after {body!r}: {after.text}"

        case()


@pytest.fixture(scope="module")
def keyed_server(start_server, tiny_model) -> Server:
    return start_server(
        f"""
        [routes]
        anthropic = true
        [auth]
        [[auth.keys]]
        name = "main"
        key = "{KEY}"
        [[auth.keys]]
        name = "limited"
        key = "{LIMITED_KEY}"
        rate_limit = "one"
        [[auth.keys]]
        name = "elsewhere"
        key = "{KEY}-other-model"
        models = ["other"]
        [rate_limits.one]
        requests_per_minute = 1
        [backends.local]
        kind = "mlx"
        {model_toml(tiny_model)}
        {model_toml(tiny_model, name="other")}
        """
    )


def test_keys_and_rate_limits(keyed_server: Server) -> None:
    def client(key: str) -> anthropic.Anthropic:  # the SDK sends its key as x-api-key
        return anthropic.Anthropic(base_url=keyed_server.url, api_key=key, max_retries=0, timeout=60)

    assert client(KEY).messages.create(model="tiny", messages=HELLO, max_tokens=2).usage.output_tokens == 2
    bearer = anthropic.Anthropic(base_url=keyed_server.url, auth_token=KEY, max_retries=0, timeout=60)
    assert bearer.messages.count_tokens(model="tiny", messages=HELLO).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client("wrong-key").messages.create(model="tiny", messages=HELLO, max_tokens=2)
    _error(caught, "authentication_error")
    missing = httpx.post(f"{keyed_server.url}/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": HELLO})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as caught:  # out of a key's scope: as if it did not exist
        client(f"{KEY}-other-model").messages.create(model="tiny", messages=HELLO, max_tokens=2)
    _error(caught, "not_found_error")
    limited = client(LIMITED_KEY)
    limited.messages.create(model="tiny", messages=HELLO, max_tokens=2)
    with pytest.raises(anthropic.RateLimitError) as caught:
        limited.messages.create(model="tiny", messages=HELLO, max_tokens=2)
    _error(caught, "rate_limit_error")
    assert int(caught.value.response.headers["retry-after"]) > 0


def test_route_set_is_off_by_default(start_server, tiny_model) -> None:
    server = start_server(f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}')
    r = httpx.post(f"{server.url}/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": HELLO})
    assert r.status_code == 404
    # and /v1/models keeps OpenAI's shape even for a client that sends anthropic-version
    assert httpx.get(f"{server.url}/v1/models", headers=HEADERS).json()["object"] == "list"


# -- the codec on synthetic deltas: blocks, streams and errors ----------------------------------------------


def _sdk_accumulate(events: bytes) -> anthropic.types.Message:
    """The SDK's own accumulator over our SSE bytes, as `messages.stream()` runs it."""
    from anthropic.lib.streaming._messages import accumulate_event

    snapshot, json_bufs = None, {}
    for frame in events.decode().strip().split("\n\n"):
        name, data = frame.split("\n", 1)
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        if payload["type"] in ("ping", "message_stop"):
            continue
        if payload["type"] == "message_start":
            payload["message"]["content"] = []
        snapshot = accumulate_event(event=payload, current_snapshot=snapshot, json_bufs=json_bufs)
    return snapshot


AGENT_DELTAS = [
    Delta(reasoning="The user asks about Paris. "),
    Delta(reasoning="I will call get_weather."),
    Delta(text="Let me look."),
    Delta(tool_calls=[ToolCallDelta(index=0, id="call_a", name="get_weather")]),
    Delta(tool_calls=[ToolCallDelta(index=0, arguments='{"city": ')]),
    Delta(tool_calls=[ToolCallDelta(index=0, arguments='"Paris"}')]),
    Delta(tool_calls=[ToolCallDelta(index=1, id="call_b", name="get_time", arguments='{"city": "Paris"}')]),
    Delta(finish_reason="tool_calls", usage=Usage(prompt_tokens=30, completion_tokens=20)),
]


def test_blocks_streamed_equal_blocks_collected() -> None:
    collected, streamed = Blocks(events=False), Blocks(events=True)
    frames = b""
    for delta in AGENT_DELTAS:
        collected.add(delta)
        frames += streamed.add(delta)
    collected.finish()
    frames += streamed.finish()
    assert [msgspec.to_builtins(b) for b in collected.content] == [
        {"type": "thinking", "thinking": "The user asks about Paris. I will call get_weather.", "signature": ""},
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"city": "Paris"}},
    ]
    assert collected.tool_use and stop_reason("tool_calls", True, None) == "tool_use"
    start = wire.MessageResponse(
        id="msg_1",
        model="m",
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=wire.Usage(input_tokens=30, output_tokens=0),
    )
    end = wire.MessageDelta(
        delta=wire.MessageDeltaBody(stop_reason="tool_use", stop_sequence=None),
        usage=wire.Usage(input_tokens=30, output_tokens=20),
    )
    from litestar_llm.dialects.anthropic.translate import sse

    stream = sse(wire.MessageStart(message=start)) + frames + sse(end) + sse(wire.MessageStop())
    accumulated = _sdk_accumulate(stream)
    whole = wire.MessageResponse(
        id="msg_1",
        model="m",
        content=collected.content,
        stop_reason="tool_use",
        stop_sequence=None,
        usage=wire.Usage(input_tokens=30, output_tokens=20),
    )
    parsed = anthropic.types.Message.model_validate(msgspec.to_builtins(whole))
    assert accumulated.model_dump() == parsed.model_dump()
    kinds = [
        json.loads(f.split("\ndata: ")[1])["delta"]["type"] for f in frames.decode().split("\n\n") if "_delta" in f
    ]
    assert kinds == ["thinking_delta"] * 2 + ["signature_delta", "text_delta"] + ["input_json_delta"] * 3


def test_empty_answer_has_one_empty_text_block() -> None:
    blocks = Blocks(events=False)
    blocks.add(Delta(finish_reason="stop"))
    blocks.finish()
    assert [msgspec.to_builtins(b) for b in blocks.content] == [{"type": "text", "text": ""}]
    streamed = Blocks(events=True)
    frames = streamed.add(Delta(finish_reason="stop")) + streamed.finish()
    assert [json.loads(f.split("\ndata: ")[1])["type"] for f in frames.decode().strip().split("\n\n")] == [
        "content_block_start",
        "content_block_stop",
    ]


def test_stop_reasons() -> None:
    assert stop_reason("stop", False, None) == "end_turn"
    assert stop_reason("stop", False, "###") == "stop_sequence"
    assert stop_reason("length", True, None) == "max_tokens"
    assert stop_reason("tool_calls", True, None) == "tool_use"
    assert stop_reason("stop", True, None) == "tool_use"


def test_error_classes_map_to_anthropic_types_and_statuses() -> None:
    cases = [
        (InvalidRequestError("bad"), 400, "invalid_request_error", anthropic.BadRequestError),
        (AuthenticationError("who"), 401, "authentication_error", anthropic.AuthenticationError),
        (ModelNotFoundError("m"), 404, "not_found_error", anthropic.NotFoundError),
        (RateLimitError("slow", {"Retry-After": "7"}), 429, "rate_limit_error", anthropic.RateLimitError),
        (OverloadedError("full"), 529, "overloaded_error", anthropic.InternalServerError),
        (EngineUnavailableError("down"), 503, "overloaded_error", anthropic.InternalServerError),
        (RuntimeError("bug"), 500, "api_error", anthropic.InternalServerError),
        (ClientDisconnected(), 499, "invalid_request_error", anthropic.APIStatusError),
    ]
    sdk = anthropic.Anthropic(api_key="x")
    for exc, status, kind, sdk_class in cases:
        code, body = status_and_body(classify(exc))
        assert (code, body.error.type) == (status, kind), exc
        response = httpx.Response(code, request=httpx.Request("POST", "http://x/v1/messages"))
        raised = sdk._make_status_error("x", body=msgspec.to_builtins(body), response=response)
        assert isinstance(raised, sdk_class), (exc, raised)
    frame = sse_error(OverloadedError("queue full"))
    assert (
        frame == b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"queue full"}}\n\n'
    )


def test_translation_of_a_tool_conversation() -> None:
    body = msgspec.convert(
        {
            "model": "m",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris and the time?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Two calls.", "signature": "sig"},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 and sunny"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "14:05"}],
                        },
                        {"type": "text", "text": "Thanks."},
                    ],
                },
            ],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}, {"name": "get_time"}],
            "tool_choice": {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
            "thinking": {"type": "enabled", "budget_tokens": 50},
            "stop_sequences": ["###"],
            "top_k": 5,
        },
        wire.MessagesRequest,
    )
    build, names = messages_request(body)
    from litestar_llm.config import ModelConfig
    from litestar_llm.engine.base import ModelInfo

    request = build(ModelConfig(name="m", backend="b", source="s"), ModelInfo(name="m", backend="b", source="s"))
    roles = [(m.role, m.content, m.tool_call_id, m.name) for m in request.messages]
    assert roles == [
        ("system", "Be brief.\n\nUse tools.", None, None),
        ("user", "Weather in Paris and the time?", None, None),
        ("assistant", "", None, None),
        ("tool", "18 and sunny", "toolu_1", "get_weather"),
        ("tool", "14:05", "toolu_2", "get_time"),
        ("user", "Thanks.", None, None),
    ]
    assistant = request.messages[2]
    assert assistant.reasoning == "Two calls."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in assistant.tool_calls] == [
        ("toolu_1", "get_weather", {"city": "Paris"}),
        ("toolu_2", "get_time", {"city": "Paris"}),
    ]
    assert [t.name for t in request.tools] == ["get_weather", "get_time"]
    assert request.tool_choice == NamedToolChoice(name="get_time") and request.parallel_tool_calls is False
    assert request.reasoning.enabled is True and request.reasoning.budget_tokens == 50
    assert request.sampling.stop == ["###"] and request.sampling.top_k == 5 and request.sampling.max_tokens == 100
    assert names("messages[4].tool_call_id") == "messages[2].content[1].tool_use_id"
    assert names("messages[2].tool_calls[1].arguments") == "messages[1].content[2].input"
    assert names("tools[1].parameters") == "tools[1].input_schema"
    assert names("stop") == "stop_sequences" and names("messages[0]") == "system"
    disabled = msgspec.convert(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": HELLO,
            "thinking": {"type": "disabled"},
            "tool_choice": {"type": "any"},
        },
        wire.MessagesRequest,
    )
    request = messages_request(disabled)[0](
        ModelConfig(name="m", backend="b", source="s"), ModelInfo(name="m", backend="b", source="s")
    )
    assert request.reasoning.enabled is False and request.tool_choice == "required"


# -- tools and thinking, with the fine-tuned tiny agent model -----------------------------------------------
# The model reproduces scripted conversations (examples/make_agent_model.py) exactly under greedy decoding, so the
# prompts here are the scripts' own: an assistant turn sent back carries its tool_use blocks only, as the script's
# history does (a thinking block sent back is rendered by the template and makes another prompt).

try:
    from agent_fixtures import agent_model  # the agent model, built once per session
except ImportError:

    @pytest.fixture(scope="session")
    def agent_model():
        pytest.skip("tests/agent_fixtures.py (the tiny tool-calling, thinking model) is not there yet")


def _script():
    from examples.make_agent_model import CASES

    return CASES


def _tools(case) -> list[dict]:
    """A scripted case's tools (OpenAI's form) as Anthropic's."""
    return [
        {"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}
        for f in (t["function"] for t in case.tools or ())
    ]


@pytest.fixture(scope="module", params=["mlx", "remote", "vllm"])
def agent_backend(request, agent_model) -> tuple[str, anthropic.Anthropic]:
    """The agent model over MLX (mlx-lm's parsers), through a gateway (the remote backend) in front of an MLX
    server, and over vLLM's CPU build (vLLM's hermes and qwen3 parsers): conftest's shared servers."""
    name = {"mlx": "agent_server", "remote": "agent_gateway", "vllm": "vllm_server"}[request.param]
    server = request.getfixturevalue(name)
    return request.param, anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def agent(agent_backend: tuple[str, anthropic.Anthropic]) -> anthropic.Anthropic:
    return agent_backend[1]


AGENT = {"model": "agent", "max_tokens": 160, "extra_body": {"temperature": 0}}


def _turn(agent: anthropic.Anthropic, stream: bool, **request) -> anthropic.types.Message:
    if not stream:
        return agent.messages.create(**AGENT, **request)
    with agent.messages.stream(**AGENT, **request) as events:
        return events.get_final_message()


def _blocks(message: anthropic.types.Message) -> list[tuple]:
    return [
        (b.type, b.thinking if b.type == "thinking" else b.text if b.type == "text" else (b.name, b.input))
        for b in message.content
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_tool_use_loop(agent: anthropic.Anthropic, stream: bool) -> None:
    """tool_use → tool_result → answer; two different results for one call give two different answers, so the
    answer really comes from the tool_result."""
    cases = _script()
    ask = cases["weather_paris"]
    tools = _tools(ask)
    question = [{"role": "user", "content": ask.messages[0]["content"]}]
    first = _turn(agent, stream, messages=question, tools=tools)
    assert first.stop_reason == "tool_use"
    assert _blocks(first) == [
        ("thinking", ask.reasoning),
        *(("tool_use", (call["name"], call["arguments"])) for call in ask.tool_calls),
    ]
    assert first.content[0].signature == ""
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.id
    for name in ("weather_paris_answer", "weather_paris_rain_answer"):
        answer = cases[name]
        result = answer.messages[2]["content"]
        history = [
            *question,
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}]},
        ]
        second = _turn(agent, stream, messages=history, tools=tools)
        assert _blocks(second) == [("thinking", answer.reasoning), ("text", answer.content)], name
        assert second.stop_reason == "end_turn" and second.stop_sequence is None
        counted = agent.messages.count_tokens(model="agent", messages=history, tools=tools).input_tokens
        assert counted == second.usage.input_tokens
    # the tool result as text blocks is the same prompt
    blocks = [{"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": result}]}]
    again = _turn(agent, stream, messages=[*history[:2], {"role": "user", "content": blocks}], tools=tools)
    assert _blocks(again) == _blocks(second)


def test_streamed_tool_calls_equal_the_non_streamed_ones(agent: anthropic.Anthropic) -> None:
    cases = _script()
    case = cases["weather_paris_london"]
    tools = _tools(case)
    messages = [{"role": "user", "content": case.messages[0]["content"]}]
    whole = agent.messages.create(**AGENT, messages=messages, tools=tools)
    assert [b.input for b in whole.content if b.type == "tool_use"] == [c["arguments"] for c in case.tool_calls]
    fragments: dict[int, list[str]] = {}
    with agent.messages.stream(**AGENT, messages=messages, tools=tools) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                fragments.setdefault(event.index, []).append(event.delta.partial_json)
        streamed = stream.get_final_message()
    assert _without_ids(streamed) == _without_ids(whole)
    calls = {i: b for i, b in enumerate(whole.content) if b.type == "tool_use"}
    assert sorted(fragments) == sorted(calls)
    for index, parts in fragments.items():
        assert json.loads("".join(parts)) == calls[index].input


def test_thinking_blocks(agent: anthropic.Anthropic) -> None:
    cases = _script()
    hello, direct = cases["hello"], cases["hello_direct"]
    messages = [{"role": "user", "content": hello.messages[0]["content"]}]
    default = agent.messages.create(**AGENT, messages=messages)
    assert _blocks(default) == [("thinking", hello.reasoning), ("text", hello.content)]
    enabled = agent.messages.create(**AGENT, messages=messages, thinking={"type": "enabled", "budget_tokens": 100})
    assert _blocks(enabled) == _blocks(default)
    disabled = agent.messages.create(**AGENT, messages=messages, thinking={"type": "disabled"})
    assert _blocks(disabled) == [("text", direct.content)]
    with agent.messages.stream(**AGENT, messages=messages) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert _without_ids(streamed) == _without_ids(default)
    assert kinds[0] == "thinking_delta" and kinds[-1] == "text_delta" and "signature_delta" in kinds


def test_thinking_sent_back_is_part_of_the_prompt(agent: anthropic.Anthropic) -> None:
    cases = _script()
    answer = cases["weather_paris_answer"]
    tools = _tools(answer)
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    thinking = {"type": "thinking", "thinking": "I will call get_weather.", "signature": ""}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": answer.messages[2]["content"]}

    def count(assistant: list[dict]) -> int:
        history = [
            answer.messages[0],
            {"role": "assistant", "content": assistant},
            {"role": "user", "content": [result]},
        ]
        return agent.messages.count_tokens(model="agent", messages=history, tools=tools).input_tokens

    assert count([thinking, use]) > count([use])


def test_forcing_a_tool(agent_backend: tuple[str, anthropic.Anthropic]) -> None:
    """tool_choice any / tool force a call by constrained decoding on both backends (vLLM's schema for forced
    calls; llguidance on MLX). auto lets the model call; none offers no tools."""
    _kind, agent = agent_backend
    from examples.make_agent_model import TOOLS

    case = _script()["weather_london_direct"]  # thinking off: the model acts at once
    tools = _tools(case)
    everything = [
        {"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}
        for f in (t["function"] for t in TOOLS)
    ]
    messages = [{"role": "user", "content": case.messages[0]["content"]}]
    off = {"thinking": {"type": "disabled"}}
    forced = agent.messages.create(**AGENT, **off, messages=messages, tools=everything, tool_choice={"type": "any"})
    assert forced.stop_reason == "tool_use" and {b.type for b in forced.content} == {"tool_use"}
    assert forced.content[0].name in ("get_weather", "get_time")
    named = agent.messages.create(
        **AGENT, **off, messages=messages, tools=everything, tool_choice={"type": "tool", "name": "get_time"}
    )
    assert named.stop_reason == "tool_use" and [(b.type, b.name) for b in named.content] == [("tool_use", "get_time")]
    assert set(named.content[0].input) <= {"city"}
    auto = agent.messages.create(**AGENT, **off, messages=messages, tools=tools, tool_choice={"type": "auto"})
    assert _blocks(auto) == [("tool_use", (c["name"], c["arguments"])) for c in case.tool_calls]
    assert auto.stop_reason == "tool_use"
    none = agent.messages.create(**AGENT, **off, messages=messages, tools=tools, tool_choice={"type": "none"})
    assert not [b for b in none.content if b.type == "tool_use"] and none.stop_reason != "tool_use"
