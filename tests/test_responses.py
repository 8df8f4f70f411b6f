"""OpenAI's Responses API (/v1/responses) against a real server under granian, with the official `openai` client
and a tiny MLX model."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import openai
import pytest
import schemas

HELLO = "Tell me about JSON."


def greedy(client: openai.OpenAI, input: str | list = HELLO, **kwargs):
    return client.responses.create(model="tiny", input=input, temperature=0, **kwargs)


def template_tokens(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(ids["input_ids"])


def sent(response) -> dict:
    """What the server sent, as the SDK parsed it (the SDK's own optional fields left out, not set to None)."""
    return response.model_dump(exclude_unset=True)


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """Parse typed SSE by hand: every event is `event: <type>\\ndata: <json>`."""
    events = []
    for block in response.text.split("\n\n"):
        if block:
            event_line, data_line = block.split("\n")
            events.append((event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return events


def test_create_non_stream(openai_client: openai.OpenAI, server, tokenizer) -> None:
    response = greedy(openai_client, instructions="Be brief.", max_output_tokens=12, metadata={"run": "test"})
    schemas.openai("Response", sent(response))
    assert response.object == "response" and response.id.startswith("resp_") and response.model == "tiny"
    assert response.output_text
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [part.type for part in item.content] == ["output_text"] and item.content[0].annotations == []
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": HELLO}]
    assert response.usage.input_tokens == template_tokens(tokenizer, expected)
    assert 0 < response.usage.output_tokens <= 12
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    # a prefix an earlier request left in the prompt cache may serve part of the prompt, never all of it
    assert 0 <= response.usage.input_tokens_details.cached_tokens < response.usage.input_tokens
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    if response.status == "incomplete":
        assert response.usage.output_tokens == 12 and item.status == "incomplete"
    else:
        assert response.status == "completed" and response.completed_at and item.status == "completed"
    # the request's settings come back
    assert response.instructions == "Be brief." and response.metadata == {"run": "test"}
    assert response.temperature == 0 and response.max_output_tokens == 12 and response.store is True
    assert response.tools == [] and response.tool_choice == "auto" and response.previous_response_id is None
    raw = httpx.post(f"{server.url}/v1/responses", json={"model": "tiny", "input": HELLO, "max_output_tokens": 4})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    schemas.openai("Response", raw.json())


def test_message_list_input(openai_client: openai.OpenAI, tokenizer) -> None:
    conversation = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}, {"type": "input_text", "text": "!"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"role": "user", "content": HELLO},
    ]
    response = greedy(openai_client, conversation, max_output_tokens=4)
    expected = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": HELLO},
    ]
    assert response.usage.input_tokens == template_tokens(tokenizer, expected)


def test_stream(openai_client: openai.OpenAI) -> None:
    events = list(greedy(openai_client, max_output_tokens=16, stream=True))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert types[-1] == f"response.{final.status}" and final.status in ("completed", "incomplete")
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == final.output_text
    assert {e.item_id for e in events[4:-1] if hasattr(e, "item_id")} == {final.output[0].id}
    assert text == greedy(openai_client, max_output_tokens=16).output_text
    assert final.usage.output_tokens <= 16


def test_stream_events_follow_openapi(server) -> None:
    body = {"model": "tiny", "input": HELLO, "max_output_tokens": 6, "stream": True}
    response = httpx.post(f"{server.url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    for event_type, data in events:
        assert data["type"] == event_type
        schemas.openai("ResponseStreamEvent", data)
    assert events[-1][0] == "response.incomplete"  # 6 tokens of a random model: cut by max_output_tokens


def test_greedy_is_deterministic(openai_client: openai.OpenAI) -> None:
    first = greedy(openai_client, max_output_tokens=20, store=False)
    second = greedy(openai_client, max_output_tokens=20, store=False)
    assert first.output_text == second.output_text
    assert first.id != second.id


def test_max_output_tokens_gives_incomplete(openai_client: openai.OpenAI) -> None:
    response = greedy(openai_client, max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5
    assert response.output[0].status == "incomplete"
    assert response.completed_at is None


def test_conversation_by_previous_response_id(openai_client: openai.OpenAI, tokenizer) -> None:
    turns = ["My name is Ada.", "What is my name?", "Say it again."]
    first = greedy(openai_client, turns[0], instructions="Be brief.", max_output_tokens=8)
    second = greedy(openai_client, turns[1], previous_response_id=first.id, max_output_tokens=8)
    third = greedy(openai_client, turns[2], previous_response_id=second.id, max_output_tokens=8)
    assert third.previous_response_id == second.id
    history = [
        {"role": "user", "content": turns[0]},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": turns[1]},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": turns[2]},
    ]
    # the whole history was in the prompt, and the first turn's instructions were not carried over
    assert third.usage.input_tokens == template_tokens(tokenizer, history)
    assert third.usage.input_tokens > template_tokens(tokenizer, history[-1:]) + 2 * third.usage.output_tokens
    # the same conversation sent in full gives the same greedy answer
    assert greedy(openai_client, history, max_output_tokens=8).output_text == third.output_text


def test_retrieve_and_delete(openai_client: openai.OpenAI, server) -> None:
    created = greedy(openai_client, max_output_tokens=4)
    retrieved = openai_client.responses.retrieve(created.id)
    assert sent(retrieved) == sent(created)
    schemas.openai("Response", httpx.get(f"{server.url}/v1/responses/{created.id}").json())
    deleted = httpx.delete(f"{server.url}/v1/responses/{created.id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": created.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.delete(created.id)
    missing = httpx.get(f"{server.url}/v1/responses/resp_nope")
    assert missing.status_code == 404
    schemas.openai("ErrorResponse", missing.json())
    assert missing.json()["error"]["type"] == "invalid_request_error"


def test_store_false_is_not_retrievable(openai_client: openai.OpenAI) -> None:
    response = greedy(openai_client, max_output_tokens=4, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as not_found:
        greedy(openai_client, "more", previous_response_id=response.id, max_output_tokens=2)
    assert not_found.value.param == "previous_response_id"
    assert not_found.value.message.endswith(f"Previous response with id '{response.id}' not found.")


def test_stored_stream_is_retrievable(openai_client: openai.OpenAI) -> None:
    final = list(greedy(openai_client, max_output_tokens=4, stream=True))[-1].response
    assert sent(openai_client.responses.retrieve(final.id)) == sent(final)


MESSAGES = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    ("malformed json", b"{not json", 400, None),
    ("missing model", {"input": "hi"}, 400, "model"),
    ("missing input", {"model": "tiny"}, 400, "input"),
    ("empty input", {"model": "tiny", "input": []}, 400, "input"),
    ("input a number", {"model": "tiny", "input": 5}, 400, "input"),
    ("bad role", {"model": "tiny", "input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role"),
    ("no role", {"model": "tiny", "input": [{"content": "x"}]}, 400, "input[0].role"),
    ("image part", {"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400, "input[0].content[0]"),
    ("tool output without its call", {"model": "tiny", "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, 400, "input"),
    ("unknown item type", {"model": "tiny", "input": [{"type": "web_search_call", "id": "w"}]}, 400, "input[0]"),
    ("temperature too high", {"model": "tiny", "input": "hi", "temperature": 3}, 400, "temperature"),
    ("max_output_tokens string", {"model": "tiny", "input": "hi", "max_output_tokens": "ten"}, 400, "max_output_tokens"),
    ("beyond context", {"model": "tiny", "input": "hi", "max_output_tokens": 100000}, 400, "max_output_tokens"),
    ("metadata not strings", {"model": "tiny", "input": "hi", "metadata": {"a": 1}}, 400, "metadata[...]"),
    ("unsupported schema", {"model": "tiny", "input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}}, 400, "text.format"),
    ("tools", {"model": "tiny", "input": "hi", "tools": [{"type": "function", "name": "f"}]}, 400, "tools"),
    ("tool_choice required", {"model": "tiny", "input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
    ("background", {"model": "tiny", "input": "hi", "background": True}, 400, "background"),
    ("conversation", {"model": "tiny", "input": "hi", "conversation": "conv_1"}, 400, "conversation"),
    ("unknown model", {"model": "gpt-9", "input": "hi"}, 404, "model"),
    ("unknown previous", {"model": "tiny", "input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests(server, case: str, body, status: int, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server.url}/v1/responses", content=content, headers={"content-type": "application/json"}, timeout=30
    )
    schemas.assert_openai_error(response, status, param)


def test_harmless_fields_are_ignored(server) -> None:
    body = {
        "model": "tiny",
        "input": "hi",
        "max_output_tokens": 2,
        "text": {"format": {"type": "text"}, "verbosity": "low"},
        "user": "someone",
        "truncation": "auto",
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "reasoning": {"effort": "low"},
        "include": ["message.output_text.logprobs"],
        "some_future_parameter": {"x": 1},
    }
    response = httpx.post(f"{server.url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["parallel_tool_calls"] is False


def test_openai_client_raises_typed_errors(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        openai_client.responses.create(model="nope", input="hi")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.responses.create(model="tiny", input="hi", tools=[{"type": "function", "name": "f"}])
    assert bad.value.param == "tools"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_cancels_generation(server, stream: bool) -> None:
    body = {"model": "tiny", "input": HELLO, "max_output_tokens": 1500, "temperature": 0, "stream": stream}
    before = server.stats()
    if stream:
        with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for _ in range(20):
                next(lines)
    else:
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/responses", json=body, timeout=0.5)
    stats = server.wait_idle()
    assert stats["generated_tokens"] - before["generated_tokens"] < 1000  # it stopped long before 1500 tokens


@pytest.fixture(scope="module")
def short_server(start_server, tiny_model):
    """Stored responses kept 1 s, and a model default stop at the first space, so that answers complete."""
    from conftest import model_toml

    return start_server(
        f"""
        [state]
        responses_ttl_s = 1
        [backends.local]
        kind = "mlx"
        {model_toml(tiny_model, defaults='stop = [" "]')}
        """
    )


def test_completed_response(short_server) -> None:
    client = openai.OpenAI(base_url=f"{short_server.url}/v1", api_key="x", max_retries=0)
    response = greedy(client, max_output_tokens=50)
    assert response.status == "completed" and response.incomplete_details is None
    assert response.completed_at >= response.created_at and response.output[0].status == "completed"
    assert " " not in response.output_text and response.usage.output_tokens < 50
    schemas.openai("Response", sent(response))
    events = list(greedy(client, max_output_tokens=50, stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == response.output_text
    for event in events:
        schemas.openai("ResponseStreamEvent", sent(event))


def test_stored_responses_expire(short_server) -> None:
    client = openai.OpenAI(base_url=f"{short_server.url}/v1", api_key="x", max_retries=0)
    response = greedy(client, max_output_tokens=2)
    assert client.responses.retrieve(response.id).id == response.id
    time.sleep(2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        greedy(client, "more", previous_response_id=response.id, max_output_tokens=2)


def test_engine_failure_mid_stream_fails_the_response() -> None:
    """An engine that fails after the first token (no real one can be made to): the stream ends with
    response.failed carrying the error, and the failed response is stored as such."""
    import asyncio

    from litestar.stores.memory import MemoryStore

    from litestar_llm.dialects.responses import routes, translate, wire
    from litestar_llm.dialects.responses.store import ResponseStore
    from litestar_llm.engine.types import Delta, GenerationRequest, SamplingParams
    from litestar_llm.errors import EngineUnavailableError
    from litestar_llm.serving import Generation

    async def deltas():
        yield 0, Delta(text="Hel")
        raise EngineUnavailableError("model 'tiny' is not loaded")

    async def run() -> tuple[list[bytes], ResponseStore]:
        body = wire.CreateResponse(model="tiny", input="hi")
        draft = translate.in_progress(body, SamplingParams(), "resp_x", 0)
        store = ResponseStore(MemoryStore(), None, 60)
        stream = deltas()
        generation = Generation(None, None, None, [GenerationRequest(model="tiny")], stream, await anext(stream))
        chunks = routes.response_events(generation, routes.EventWriter(), draft, routes.ResponseSaver(store, True, []))
        return [chunk async for chunk in chunks], store

    chunks, store = asyncio.run(run())
    events = [json.loads(chunk.split(b"\ndata: ")[1]) for chunk in chunks]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    for event in events:
        schemas.openai("ResponseStreamEvent", event)
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "model 'tiny' is not loaded"}
    stored = asyncio.run(store.get("resp_x"))
    assert stored.status == "failed" and stored.conversation() == []


def test_a_repeated_prompt_reports_cached_tokens(openai_client: openai.OpenAI) -> None:
    first = greedy(openai_client, "Cache me: a prompt no other test sends.", max_output_tokens=3)
    again = greedy(openai_client, "Cache me: a prompt no other test sends.", max_output_tokens=3)
    assert first.usage.input_tokens == again.usage.input_tokens
    assert 0 < again.usage.input_tokens_details.cached_tokens < again.usage.input_tokens
