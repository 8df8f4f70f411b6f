"""The remote engine in-process: contract ↔ chat-completions mapping (tools, tool calls, reasoning, usage details)
and how failures are told apart (timeouts, 5xx, /ready).

The upstream here is `RecordedUpstream`, a real aiohttp server on 127.0.0.1 that replays recorded vLLM-style
streams (vLLM 0.32's chunk shapes with a hermes tool parser and a reasoning parser) and records every request it
receives. It is a named fake, for what no upstream in this test environment produces: the tiny model writes
gibberish, so neither tool calls chosen by the model nor separated reasoning, and no server can be made to hang or
fail with a 5xx on demand. Everything a real upstream does produce is tested against real upstreams in
test_remote_backend.py (and tool calls against vLLM itself below, where it is installed).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from conftest import free_port

from litestar_llm.config import ModelConfig, OpenAIBackendConfig
from litestar_llm.engine.remote import UNKNOWN_TOKEN_ID, RemoteEngine
from litestar_llm.engine.types import (
    ChatMessage,
    Delta,
    GenerationRequest,
    NamedToolChoice,
    ReasoningOptions,
    SamplingParams,
    Tool,
    ToolCall,
)
from litestar_llm.errors import EngineUnavailableError, UpstreamError

WEATHER = Tool(
    name="get_weather",
    description="The weather in a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = Tool(name="get_time", parameters={"type": "object", "properties": {"zone": {"type": "string"}}})


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    event: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "agent",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage is not None:
        event["usage"] = usage
    return event


# A vLLM stream of a reasoning model calling two tools in parallel: role chunk, reasoning (vLLM ≥0.10 names it
# `reasoning`; older servers and DeepSeek `reasoning_content`), a little content, then the hermes parser's tool-call
# fragments (id, type and name first, arguments in pieces), the finish chunk, and the usage chunk.
TOOL_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning": "The user wants"}),
    chunk({"reasoning": " the weather"}),
    chunk({"reasoning_content": " and the time."}),
    chunk({"content": "Checking."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_a1", "type": "function", "function": {"name": "get_weather"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_b2", "type": "function", "function": {"name": "get_time"}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"zone": "CET"}'}}]}),
    chunk({"content": ""}, finish="tool_calls"),
    chunk(
        usage={
            "prompt_tokens": 412,
            "completion_tokens": 37,
            "total_tokens": 449,
            "prompt_tokens_details": {"cached_tokens": 384},
            "completion_tokens_details": {"reasoning_tokens": 9},
        }
    ),
]
TEXT_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hello"}),
    chunk({"content": " there"}),
    chunk({"content": ""}, finish="stop"),
    chunk(usage={"prompt_tokens": 1000, "completion_tokens": 2, "total_tokens": 1002}),
]
NO_USAGE_STREAM = TEXT_STREAM[:-1]  # a server that ignores stream_options.include_usage


class RecordedUpstream:
    """A real HTTP server (aiohttp, in this event loop) that replays `stream` to every chat request and records
    the bodies. `mode`: "replay", "hang" (headers never come: a poison request that stalls the upstream), "500";
    `ready`: what `/ready` answers (404: the server has none); `tokenize`: the count `/tokenize` answers, or None
    for a 404."""

    def __init__(self, stream: list[dict] | None = None) -> None:
        self.stream = stream or TEXT_STREAM
        self.mode = "replay"
        self.ready = 404
        self.tokenize: int | None = None
        self.bodies: list[dict] = []
        self.hits: dict[str, int] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> RecordedUpstream:
        app = web.Application()
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/tokenize", self._tokenize)
        # handler_cancellation: a hanging handler ends when the engine drops its connection, as a real server's does
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def _hit(self, request: web.Request) -> None:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1

    async def _ready(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.json_response({"status": "ok"}, status=self.ready)

    async def _models(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.json_response({"object": "list", "data": [{"id": "agent", "max_model_len": 4096}]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        self._hit(request)
        self.bodies.append(await request.json())
        if self.tokenize is None:
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.json_response({"count": self.tokenize, "max_model_len": 4096, "tokens": [1] * self.tokenize})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        self.bodies.append(await request.json())
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "500":
            return web.json_response({"error": {"message": "engine crashed", "code": 500}}, status=500)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in self.stream:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def engine_for(*upstreams: RecordedUpstream, **backend: Any) -> RemoteEngine:
    config = OpenAIBackendConfig(urls=[u.url for u in upstreams], cooldown_s=60, health_interval_s=60, **backend)
    return RemoteEngine(ModelConfig(name="agent", backend="fleet", source="agent"), config, "fleet")


async def collect(engine: RemoteEngine, request: GenerationRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


def hello(**fields: Any) -> GenerationRequest:
    return GenerationRequest(model="agent", messages=[ChatMessage(role="user", content="Hi")], **fields)


async def wait_for(condition, timeout: float = 30) -> None:
    """Wait for a state the engine reaches by itself (a background health check); the deadline is a hang guard."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


def run(coroutine) -> Any:
    return asyncio.run(coroutine)


def test_request_maps_messages_tools_and_reasoning() -> None:
    async def main() -> dict:
        async with RecordedUpstream() as upstream:
            engine = engine_for(upstream)
            await engine.start()
            try:
                request = GenerationRequest(
                    model="agent",
                    messages=[
                        ChatMessage(role="system", content="Be useful."),
                        ChatMessage(role="user", content="Weather in Paris?"),
                        ChatMessage(
                            role="assistant",
                            reasoning="They want the weather.",
                            tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')],
                        ),
                        ChatMessage(role="tool", content='{"temp": 21}', tool_call_id="call_1", name="get_weather"),
                    ],
                    sampling=SamplingParams(temperature=0.0, max_tokens=64),
                    tools=[WEATHER, TIME],
                    tool_choice=NamedToolChoice(name="get_weather"),
                    parallel_tool_calls=False,
                    reasoning=ReasoningOptions(enabled=False, effort="low", budget_tokens=128),
                    chat_template_kwargs={"custom": 1},
                )
                await collect(engine, request)
                return upstream.bodies[-1]
            finally:
                await engine.close()

    body = run(main())
    assert body["messages"] == [
        {"role": "system", "content": "Be useful."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
            "reasoning": "They want the weather.",
        },
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1", "name": "get_weather"},
    ]
    assert body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                          "parameters": WEATHER.parameters}},
        {"type": "function", "function": {"name": "get_time", "parameters": TIME.parameters}},
    ]  # fmt: skip
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["reasoning_effort"] == "low" and body["thinking_token_budget"] == 128
    assert body["chat_template_kwargs"] == {"enable_thinking": False, "custom": 1}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("agent", 0.0, 64)


def test_plain_request_sends_no_agent_fields() -> None:
    """A request without tools or reasoning options sends none of their fields (OpenAI itself refuses
    tool_choice without tools and unknown fields such as chat_template_kwargs)."""

    async def main() -> dict:
        async with RecordedUpstream() as upstream:
            engine = engine_for(upstream)
            await engine.start()
            try:
                await collect(engine, hello())
                return upstream.bodies[-1]
            finally:
                await engine.close()

    body = run(main())
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    for field in ("tools", "tool_choice", "parallel_tool_calls", "reasoning_effort", "chat_template_kwargs"):
        assert field not in body


def test_constraints_are_sent_as_response_format_or_structured_outputs() -> None:
    """JSON constraints go as OpenAI's response_format; regex, choice and grammar as vLLM's structured_outputs."""

    async def main() -> list[dict]:
        async with RecordedUpstream() as upstream:
            engine = engine_for(upstream)
            await engine.start()
            try:
                for sampling in (
                    SamplingParams(json_schema={"type": "object"}),
                    SamplingParams(regex="[0-9]+"),
                    SamplingParams(choice=["a", "b"]),
                ):
                    await collect(engine, hello(sampling=sampling))
                return upstream.bodies[-3:]
            finally:
                await engine.close()

    schema, regex, choice = run(main())
    assert schema["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert "structured_outputs" not in schema and "response_format" not in regex
    assert regex["structured_outputs"] == {"regex": "[0-9]+"} and choice["structured_outputs"] == {"choice": ["a", "b"]}


def test_stream_maps_reasoning_tool_calls_and_usage_details() -> None:
    async def main() -> list[Delta]:
        async with RecordedUpstream(TOOL_STREAM) as upstream:
            engine = engine_for(upstream)
            await engine.start()
            try:
                return await collect(engine, hello(tools=[WEATHER, TIME]))
            finally:
                await engine.close()

    deltas = run(main())
    assert "".join(d.reasoning for d in deltas) == "The user wants the weather and the time."
    assert "".join(d.text for d in deltas) == "Checking."
    fragments = [call for d in deltas for call in d.tool_calls or []]
    assert [(f.index, f.id, f.name, f.arguments) for f in fragments] == [
        (0, "call_a1", "get_weather", ""),
        (0, None, None, '{"city": '),
        (0, None, None, '"Paris"}'),
        (1, "call_b2", "get_time", ""),
        (1, None, None, '{"zone": "CET"}'),
    ]
    final = deltas[-1]
    assert final.finish_reason == "tool_calls" and all(d.finish_reason is None for d in deltas[:-1])
    usage = final.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (412, 37)
    assert (usage.reasoning_tokens, usage.cached_prompt_tokens) == (9, 384)
    # one placeholder token id per upstream chunk that carried something, none for the role and finish chunks
    assert [len(d.token_ids) for d in deltas] == [1] * 9 + [0]
    assert {i for d in deltas for i in d.token_ids} == {UNKNOWN_TOKEN_ID}


def test_final_delta_without_upstream_usage_counts_the_stream() -> None:
    async def main() -> list[Delta]:
        async with RecordedUpstream(NO_USAGE_STREAM) as upstream:
            engine = engine_for(upstream)
            await engine.start()
            try:
                return await collect(engine, hello())
            finally:
                await engine.close()

    deltas = run(main())
    assert "".join(d.text for d in deltas) == "Hello there"
    usage = deltas[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (0, 2)


def test_timeouts_are_retried_once_and_do_not_take_healthy_replicas_out() -> None:
    """A poison request that stalls every upstream it reaches: tried on two replicas, never a third; the replicas
    answer their health check, so they stay in until max_failures timeouts in a row."""

    async def main() -> None:
        async with RecordedUpstream() as a, RecordedUpstream() as b, RecordedUpstream() as c:
            replicas = (a, b, c)
            for u in replicas:
                u.mode, u.ready = "hang", 200
            engine = engine_for(a, b, c, timeout_s=0.3, max_failures=3)
            await engine.start()
            try:
                with pytest.raises(EngineUnavailableError) as raised:
                    await collect(engine, hello())
                assert raised.value.message.count("SocketTimeoutError") == 2
                assert sorted(u.hits.get("/v1/chat/completions", 0) for u in replicas) == [0, 1, 1]
                stats = engine.stats()["replicas"]
                assert [r["up"] for r in stats] == [True] * 3 and sum(r["failures"] for r in stats) == 2
                # each failure had the replica's /ready checked at once: 200, so it stays in
                tried = [u for u in replicas if u.hits.get("/v1/chat/completions")]
                await wait_for(lambda: all(u.hits.get("/ready", 0) >= 2 for u in tried))
                assert engine.ready and all(r["up"] for r in engine.stats()["replicas"])

                # max_failures timeouts in a row take a replica out even though its /ready says 200
                for _ in range(3):
                    with pytest.raises(EngineUnavailableError):
                        await collect(engine, hello())
                stats = engine.stats()["replicas"]
                assert sum(r["failures"] for r in stats) == 8  # still two tries each
                assert sorted(r["failures"] for r in stats) == [2, 3, 3]
                assert [r["up"] for r in stats] == [r["failures"] < 3 for r in stats]
            finally:
                await engine.close()

    run(main())


def test_a_failed_health_check_takes_the_replica_out_after_one_timeout() -> None:
    async def main() -> None:
        async with RecordedUpstream() as sick, RecordedUpstream() as well:
            sick.ready = well.ready = 200
            engine = engine_for(sick, well, timeout_s=0.3, max_failures=3)
            await engine.start()
            try:
                sick.mode, sick.ready = "hang", 503  # the upstream's own /ready now says it cannot serve
                answered = []
                for _ in range(2):  # round robin: one of the two lands on the sick replica first
                    answered.append("".join(d.text for d in await collect(engine, hello())))
                assert answered == ["Hello there"] * 2  # the one that timed out was retried on the other
                await wait_for(lambda: not engine.stats()["replicas"][0]["up"])
                assert engine.stats()["replicas"][0]["failures"] == 1 and engine.ready
                before = well.hits["/v1/chat/completions"]
                for _ in range(4):
                    await collect(engine, hello())
                assert well.hits["/v1/chat/completions"] - before == 4  # the sick replica gets none
            finally:
                await engine.close()

    run(main())


def test_5xx_is_retried_once_elsewhere() -> None:
    async def main() -> None:
        async with RecordedUpstream() as broken, RecordedUpstream() as fine, RecordedUpstream() as also_broken:
            for u in (broken, fine, also_broken):
                u.ready = 200
            broken.mode = "500"
            engine = engine_for(broken, fine, max_failures=2)
            await engine.start()
            try:
                # round robin from the second replica: every other request lands on the broken one first, gets its
                # 500, and is answered by the other
                for _ in range(4):
                    assert "".join(d.text for d in await collect(engine, hello())) == "Hello there"
                assert (broken.hits["/v1/chat/completions"], fine.hits["/v1/chat/completions"]) == (2, 4)
                broken_stats = engine.stats()["replicas"][0]
                assert broken_stats["failures"] == 2 and not broken_stats["up"]  # max_failures in a row
            finally:
                await engine.close()

            # a request every replica answers with a 5xx is tried on two of them, not more
            also_broken.mode = fine.mode = "500"
            engine = engine_for(broken, fine, also_broken)
            await engine.start()
            try:
                with pytest.raises(EngineUnavailableError) as raised:
                    await collect(engine, hello())
                assert raised.value.message.count("500 engine crashed") == 2
                assert sum(r["failures"] for r in engine.stats()["replicas"]) == 2
            finally:
                await engine.close()

    run(main())


def test_count_prompt_tokens_uses_tokenize_where_the_upstream_has_it() -> None:
    async def main() -> None:
        async with RecordedUpstream() as vllm_like, RecordedUpstream() as plain:
            vllm_like.tokenize = 417
            engine = engine_for(vllm_like)
            await engine.start()
            try:
                request = hello(tools=[WEATHER], reasoning=ReasoningOptions(enabled=True))
                assert await engine.count_prompt_tokens(request) == 417
                sent = vllm_like.bodies[-1]
                assert sent["messages"] == [{"role": "user", "content": "Hi"}] and sent["add_generation_prompt"]
                assert sent["tools"][0]["function"]["name"] == "get_weather"
                assert sent["chat_template_kwargs"] == {"enable_thinking": True}
                completion = GenerationRequest(model="agent", prompt="The json module")
                assert await engine.count_prompt_tokens(completion) == 417
                assert vllm_like.bodies[-1] == {"model": "agent", "prompt": "The json module"}
                # token ids are counted here, with no request
                asked = vllm_like.hits["/tokenize"]
                assert await engine.count_prompt_tokens(GenerationRequest(model="agent", prompt=[5, 6, 7])) == 3
                assert vllm_like.hits["/tokenize"] == asked
            finally:
                await engine.close()

            engine = engine_for(plain)  # this server, OpenAI: no /tokenize, asked once only
            await engine.start()
            try:
                assert await engine.count_prompt_tokens(hello()) is None
                assert await engine.count_prompt_tokens(hello()) is None
                assert plain.hits["/tokenize"] == 1
            finally:
                await engine.close()

            engine = engine_for(vllm_like, tokenize=False)
            await engine.start()
            try:
                asked = vllm_like.hits["/tokenize"]
                assert await engine.count_prompt_tokens(hello()) is None and vllm_like.hits["/tokenize"] == asked
            finally:
                await engine.close()

    run(main())


def test_health_reads_ready_and_falls_back_to_models() -> None:
    async def main() -> None:
        async with RecordedUpstream() as has_ready, RecordedUpstream() as no_ready, RecordedUpstream() as loading:
            has_ready.ready, no_ready.ready, loading.ready = 200, 404, 503
            engine = engine_for(has_ready, no_ready, loading)
            await engine.start()
            try:
                stats = engine.stats()["replicas"]
                assert [(r["up"], r["health"]) for r in stats] == [(True, "ready"), (True, "models"), (False, "ready")]
                assert has_ready.hits.get("/ready") == 1 and no_ready.hits.get("/ready") == 1
                assert engine.info.context_length == 4096  # from /models' max_model_len
            finally:
                await engine.close()

    run(main())


def test_upstream_4xx_passes_through_unretried() -> None:
    async def main() -> None:
        async with RecordedUpstream() as a, RecordedUpstream() as b:
            a.ready = b.ready = 200
            a.stream = b.stream = [{"error": {"message": "tool 'x' is not defined", "code": 400}}]
            engine = engine_for(a, b)
            await engine.start()
            try:
                with pytest.raises(UpstreamError) as raised:
                    await collect(engine, hello())
                assert (raised.value.status_code, raised.value.message) == (400, "tool 'x' is not defined")
                assert a.hits.get("/v1/chat/completions", 0) + b.hits.get("/v1/chat/completions", 0) == 1
                assert all(r["up"] and r["failures"] == 0 for r in engine.stats()["replicas"])
            finally:
                await engine.close()

    run(main())
