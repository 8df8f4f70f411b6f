"""The Ollama dialect against a real server under granian, with the official `ollama` client (its pydantic
models validate every response) and Ollama's own OpenAPI description."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest
import schemas

HELLO = [{"role": "user", "content": "Tell me about JSON."}]
GREEDY = {"temperature": 0, "num_predict": 12}


def test_root_and_version(server) -> None:
    root = httpx.get(server.url + "/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert httpx.head(server.url + "/").status_code == 200
    version = httpx.get(f"{server.url}/api/version").json()
    schemas.ollama("VersionResponse", version)
    assert version["version"]
    assert httpx.head(f"{server.url}/api/version").status_code == 200


def test_generate_non_stream(ollama_client: ollama.Client, tokenizer) -> None:
    response = ollama_client.generate(model="tiny", prompt="Tell me about JSON.", options=GREEDY, stream=False)
    assert response.done is True and response.done_reason == "length"
    assert response.response
    assert response.eval_count == 12
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert response.prompt_eval_count == len(prompt["input_ids"])
    # durations are measured, in nanoseconds, and add up
    assert 0 < response.prompt_eval_duration < response.total_duration
    assert 0 < response.eval_duration < response.total_duration


def test_generate_stream_matches_non_stream(ollama_client: ollama.Client) -> None:
    whole = ollama_client.generate(model="tiny", prompt="Paths", options=GREEDY, stream=False)
    chunks = list(ollama_client.generate(model="tiny", prompt="Paths", options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert "".join(c.response for c in chunks) == whole.response
    assert chunks[-1].done_reason == "length" and chunks[-1].eval_count == 12


def test_chat_stream_and_not(ollama_client: ollama.Client) -> None:
    whole = ollama_client.chat(model="tiny", messages=HELLO, options=GREEDY, stream=False)
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.done_reason == "length" and whole.eval_count == 12
    chunks = list(ollama_client.chat(model="tiny", messages=HELLO, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert chunks[-1].done and chunks[-1].eval_count == 12


def test_same_greedy_text_as_the_openai_dialect(ollama_client: ollama.Client, openai_client) -> None:
    through_ollama = ollama_client.chat(model="tiny", messages=HELLO, options=GREEDY).message.content
    through_openai = openai_client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=12)
    assert through_ollama == through_openai.choices[0].message.content


def test_system_prompt_and_raw(ollama_client: ollama.Client) -> None:
    plain = ollama_client.generate(model="tiny", prompt="Paths", options=GREEDY)
    with_system = ollama_client.generate(model="tiny", prompt="Paths", system="You are terse.", options=GREEDY)
    raw = ollama_client.generate(model="tiny", prompt="Paths", raw=True, options=GREEDY)
    assert with_system.prompt_eval_count > plain.prompt_eval_count > raw.prompt_eval_count
    assert len({plain.response, with_system.response, raw.response}) > 1


def test_options_are_honoured(ollama_client: ollama.Client) -> None:
    reference = ollama_client.generate(model="tiny", prompt="Paths", options={"temperature": 0, "num_predict": 40})
    text = reference.response
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = ollama_client.generate(
        model="tiny", prompt="Paths", options={"temperature": 0, "num_predict": 40, "stop": [stop]}
    )
    assert stopped.response == text[: text.index(stop)]
    assert stopped.done_reason == "stop"

    def seeded(seed: int) -> str:
        options = {"temperature": 0.9, "seed": seed, "num_predict": 16, "top_k": 50, "min_p": 0.01, "unknown": 1}
        return ollama_client.generate(model="tiny", prompt="Paths", options=options).response

    assert seeded(3) == seeded(3)
    assert len({seeded(3), seeded(4), seeded(5)}) > 1
    # num_ctx and repeat_penalty are accepted; repeat_penalty changes greedy text
    penalised = ollama_client.generate(
        model="tiny",
        prompt="Paths",
        options={"temperature": 0, "num_predict": 40, "repeat_penalty": 1.5, "num_ctx": 2048},
    )
    assert penalised.eval_count == 40


def test_load_and_unload_checks(ollama_client: ollama.Client) -> None:
    loaded = ollama_client.generate(model="tiny", prompt="")
    assert loaded.done and loaded.done_reason == "load"
    unloaded = ollama_client.generate(model="tiny", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    chat = ollama_client.chat(model="tiny", messages=[])
    assert chat.done and chat.done_reason == "load"


def test_tags_show_ps(ollama_client: ollama.Client, server, tiny_model) -> None:
    import hashlib

    tags = ollama_client.list()
    assert [m.model for m in tags.models] == ["tiny:latest"]
    entry = tags.models[0]
    assert entry.size == sum(p.stat().st_size for p in tiny_model.iterdir())
    assert entry.digest == hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    assert entry.details.family == "llama" and entry.details.format == "safetensors"
    assert entry.details.parameter_size.endswith("M")
    assert entry.details.quantization_level == "F32"

    shown = ollama_client.show("tiny")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["general.parameter_count"] > 1_000_000
    assert shown.modelinfo["llama.context_length"] == 2048
    assert "completion" in shown.capabilities and "im_start" in shown.template

    running = ollama_client.ps()
    assert [m.model for m in running.models] == ["tiny:latest"]
    assert running.models[0].size_vram == 0  # MLX on a CPU: nothing in accelerator memory
    assert running.models[0].context_length == 2048

    for path, name in (("/api/tags", "ListResponse"), ("/api/ps", "PsResponse")):
        schemas.ollama(name, httpx.get(server.url + path).json())
    schemas.ollama("ShowResponse", httpx.post(f"{server.url}/api/show", json={"model": "tiny"}).json())
    assert httpx.head(f"{server.url}/api/tags").status_code == 200


@pytest.mark.parametrize("name", ["tiny", "tiny:latest"])
def test_name_tag_resolution(ollama_client: ollama.Client, name: str) -> None:
    assert ollama_client.generate(model=name, prompt="x", options={"num_predict": 1}).eval_count == 1
    assert ollama_client.show(name).details.family == "llama"


def test_ndjson_framing_and_content_type(server) -> None:
    body = {"model": "tiny", "prompt": "Paths", "options": GREEDY}
    with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        raw = b"".join(response.iter_bytes())
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    events = [json.loads(line) for line in lines]  # one complete JSON object per line
    for event in events[:-1]:
        schemas.ollama("GenerateStreamEvent", event)
        assert event["done"] is False and "response" in event and event["model"] == "tiny"
        assert "total_duration" not in event  # zero stats are left out
    schemas.ollama("GenerateResponse", events[-1])
    assert events[-1]["done"] is True and events[-1]["eval_count"] == 12

    chat = httpx.post(f"{server.url}/api/chat", json={"model": "tiny", "messages": HELLO, "options": GREEDY})
    chat_events = [json.loads(line) for line in chat.text.splitlines()]
    for event in chat_events[:-1]:
        schemas.ollama("ChatStreamEvent", event)
    schemas.ollama("ChatResponse", chat_events[-1])
    whole = httpx.post(
        f"{server.url}/api/chat", json={"model": "tiny", "messages": HELLO, "options": GREEDY, "stream": False}
    )
    assert whole.headers["content-type"] == "application/json"
    schemas.ollama("ChatResponse", whole.json())


ERRORS = [
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
    ("/api/chat", {"model": "nope", "messages": HELLO}, 404, "model 'nope' not found"),
    ("/api/show", {"model": "nope"}, 404, "not found"),
    ("/api/generate", {"prompt": "x"}, 400, "model: is required"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "format": {"type": "objekt"}}, 400, "format: llguidance cannot use this JSON schema: Invalid type"),
    ("/api/chat", {"model": "tiny", "messages": HELLO, "format": {"not": {}}}, 400, "format: llguidance cannot use this JSON schema: Unimplemented keys"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ("/api/embed", {"model": "tiny", "input": "x"}, 400, "serves text generation"),
    ("/api/embeddings", {"model": "tiny", "prompt": "x"}, 400, "serves text generation"),
    ("/api/create", {"model": "x", "from": "tiny"}, 400, "declared in server.toml"),
    ("/api/copy", {"source": "tiny", "destination": "t2"}, 400, "declared in server.toml"),
    ("/api/push", {"model": "tiny"}, 400, "declared in server.toml"),
    ("/api/pull", {"model": "llama3"}, 404, "model 'llama3' not found"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "message"), ERRORS, ids=[f"{e[0]}-{e[2]}-{e[3][:20]}" for e in ERRORS]
)
def test_errors_in_ollamas_shape(server, path: str, body: dict, status: int, message: str) -> None:
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    schemas.ollama("ErrorResponse", response.json())
    assert message in response.json()["error"]


def test_malformed_json_and_delete(server) -> None:
    bad = httpx.post(f"{server.url}/api/chat", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]
    deleted = httpx.request("DELETE", f"{server.url}/api/delete", json={"model": "tiny"})
    assert deleted.status_code == 400 and "server.toml" in deleted.json()["error"]


def test_client_raises_response_error(ollama_client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        ollama_client.chat(model="nope", messages=HELLO)
    assert error.value.status_code == 404
    assert ollama_client.pull("tiny").status == "success"  # declared models "pull" fine


def test_ollama_routes_are_off_by_default(start_server, tiny_model) -> None:
    from conftest import model_toml

    server = start_server(f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}')
    assert httpx.get(f"{server.url}/api/tags").status_code == 404
    assert httpx.post(f"{server.url}/api/chat", json={}).status_code == 404
