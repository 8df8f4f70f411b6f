"""The OpenAI dialect against a real server under granian, with the official `openai` client and a tiny MLX model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import schemas

HELLO = [{"role": "user", "content": "Tell me about JSON."}]


def greedy_chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, **kwargs)


def sse_events(response: httpx.Response) -> list[dict]:
    """Parse an SSE body by hand: every event is `data: <json>`, and the stream ends with `data: [DONE]`."""
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def test_models_list_and_get(openai_client: openai.OpenAI, server) -> None:
    models = openai_client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert openai_client.models.retrieve("tiny").id == "tiny"
    assert openai_client.models.retrieve("tiny:latest").id == "tiny:latest"  # aliases resolve too
    raw = httpx.get(f"{server.url}/v1/models").json()
    schemas.openai("ListModelsResponse", raw)
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("nope")


def test_chat_non_stream(openai_client: openai.OpenAI, tokenizer) -> None:
    completion = greedy_chat(openai_client, max_tokens=12)
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("length", "stop")
    prompt_ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt_ids = prompt_ids["input_ids"]
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.id.startswith("chatcmpl-") and completion.model == "tiny"


def test_max_tokens_gives_length(openai_client: openai.OpenAI) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        completion = greedy_chat(openai_client, **{field: 7})
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 7


def test_chat_stream_matches_non_stream(openai_client: openai.OpenAI) -> None:
    whole = greedy_chat(openai_client, max_tokens=16, seed=1)
    chunks = list(
        greedy_chat(openai_client, max_tokens=16, seed=1, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_chunks_and_bodies_follow_openapi(server) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert whole.status_code == 200 and whole.headers["content-type"].startswith("application/json")
    schemas.openai("CreateChatCompletionResponse", whole.json())

    stream = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=30,
    )
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    events = sse_events(stream)
    for event in events:
        schemas.openai("CreateChatCompletionStreamResponse", event)

    text = httpx.post(
        f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 5}, timeout=30
    )
    schemas.openai("CreateCompletionResponse", text.json())
    events = sse_events(
        httpx.post(
            f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 5, "stream": True}
        )
    )
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    for event in events:
        # The spec has no stream schema for /v1/completions and reuses the final object, whose finish_reason is
        # never null; mid-stream chunks carry null there, as OpenAI's own API and vLLM send them.
        for choice in event["choices"]:
            assert choice["finish_reason"] in (None, "length", "stop")
            choice["finish_reason"] = choice["finish_reason"] or "length"
        schemas.openai("CreateCompletionResponse", event)


def test_completions(openai_client: openai.OpenAI, tokenizer) -> None:
    prompt = "The json module"
    completion = openai_client.completions.create(model="tiny", prompt=prompt, max_tokens=9, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert completion.usage.completion_tokens == 9
    # token-id prompts give the same text as the string they encode
    ids = tokenizer.encode(prompt)
    by_ids = openai_client.completions.create(model="tiny", prompt=ids, max_tokens=9, temperature=0)
    assert by_ids.choices[0].text == completion.choices[0].text
    # a batch of prompts answers one choice per prompt, in order
    batch = openai_client.completions.create(model="tiny", prompt=[prompt, "Path"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text.startswith(completion.choices[0].text[:3])
    echoed = openai_client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt)


def test_default_completion_length_is_openais(openai_client: openai.OpenAI) -> None:
    completion = openai_client.completions.create(model="tiny", prompt="The", temperature=0)
    assert completion.usage.completion_tokens <= 16
    assert completion.choices[0].finish_reason == "length" or completion.usage.completion_tokens < 16


def test_stop_strings_cut_exactly(openai_client: openai.OpenAI) -> None:
    reference = greedy_chat(openai_client, max_tokens=40).choices[0].message.content
    # a stop taken from the middle of the greedy text: the answer must be exactly the text before it
    stop = reference[len(reference) // 2 : len(reference) // 2 + 3]
    expected = reference[: reference.index(stop)]
    for stream in (False, True):
        result = greedy_chat(openai_client, max_tokens=40, stop=[stop, "\x00never"], stream=stream)
        if stream:
            chunks = list(result)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
            assert all(stop not in (c.choices[0].delta.content or "") for c in chunks if c.choices)
        else:
            text, finish = result.choices[0].message.content, result.choices[0].finish_reason
        assert text == expected
        assert finish == "stop"


def test_seeded_sampling_is_reproducible(openai_client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            openai_client.chat.completions.create(
                model="tiny", messages=HELLO, temperature=1.0, top_p=0.9, seed=seed, max_tokens=20
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1  # the seed matters: different seeds give different text
    assert (
        greedy_chat(openai_client, max_tokens=20).choices[0].message.content
        == greedy_chat(openai_client, max_tokens=20, seed=123).choices[0].message.content
    )


def test_logprobs(openai_client: openai.OpenAI) -> None:
    completion = greedy_chat(openai_client, max_tokens=5, logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
    text = openai_client.completions.create(model="tiny", prompt="The", max_tokens=4, temperature=0, logprobs=2)
    assert len(text.choices[0].logprobs.tokens) == 4
    assert "".join(text.choices[0].logprobs.tokens) == text.choices[0].text


def test_n_choices(openai_client: openai.OpenAI) -> None:
    completion = openai_client.chat.completions.create(
        model="tiny", messages=HELLO, n=3, max_tokens=8, temperature=1.0, seed=5
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert len({c.message.content for c in completion.choices}) > 1
    assert completion.usage.completion_tokens == sum(8 for _ in completion.choices)
    chunks = list(
        openai_client.chat.completions.create(
            model="tiny", messages=HELLO, n=2, max_tokens=5, temperature=0, stream=True
        )
    )
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] == greedy_chat(openai_client, max_tokens=5).choices[0].message.content


def test_model_defaults_apply(start_server, tiny_model) -> None:
    from conftest import model_toml

    server = start_server(f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model, defaults="max_tokens = 3")}')
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    completion = client.chat.completions.create(model="tiny", messages=HELLO)
    assert completion.usage.completion_tokens == 3 and completion.choices[0].finish_reason == "length"
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5).usage.completion_tokens == 5


BAD_REQUESTS = [
    ("malformed json", b"{not json", 400, None),
    ("empty body", b"", 400, None),
    ("missing messages", {"model": "tiny"}, 400, "messages"),
    ("empty messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("bad role", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("temperature too high", {"model": "tiny", "messages": HELLO, "temperature": 3}, 400, "temperature"),
    ("max_tokens zero", {"model": "tiny", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens string", {"model": "tiny", "messages": HELLO, "max_tokens": "ten"}, 400, "max_tokens"),
    ("n too large", {"model": "tiny", "messages": HELLO, "n": 1000}, 400, "n"),
    ("top_logprobs too large", {"model": "tiny", "messages": HELLO, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("image content", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]"),
    ("unsupported schema", {"model": "tiny", "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}, 400, "response_format"),
    ("beyond context", {"model": "tiny", "messages": HELLO, "max_tokens": 100000}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-9", "messages": HELLO}, 404, "model"),
    ("too large", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 70000}]}, 413, None),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_chat_requests(server, case: str, body, status: int, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=30
    )
    schemas.assert_openai_error(response, status, param)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny"}, 400, "prompt"),
        ({"model": "tiny", "prompt": ["a", 1]}, 400, "prompt"),
        ({"model": "tiny", "prompt": [999999]}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "logprobs": 9}, 400, "logprobs"),
        ({"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix"),
        ({"model": "nope", "prompt": "x"}, 404, "model"),
    ],
)
def test_bad_completion_requests(server, body: dict, status: int, param: str) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_openai_client_raises_typed_errors(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        openai_client.chat.completions.create(model="nope", messages=HELLO)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.chat.completions.create(model="tiny", messages=HELLO, temperature=9)
    assert bad.value.param == "temperature"


def test_unknown_request_fields_are_tolerated(server) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 2, "some_future_parameter": {"x": 1}}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).status_code == 200
