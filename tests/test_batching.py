"""Concurrency on one MLX model: streams share decode steps, and a client that leaves frees its slot."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import openai


async def _stream(client: openai.AsyncOpenAI, i: int) -> tuple[str, int, str]:
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": f"request {i}"}],
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, tokens = "", None, 0
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return text, tokens, finish


def _concurrently(server, count: int) -> list[tuple[str, int, str]]:
    async def run() -> list[tuple[str, int, str]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(_stream(client, i) for i in range(count)))

    return asyncio.run(run())


def test_sixteen_concurrent_streams_share_decode_steps(server) -> None:
    before = server.stats()
    results = _concurrently(server, 16)
    after = server.stats()
    assert all(finish in ("length", "stop") for _, _, finish in results)
    generated = sum(tokens for _, tokens, _ in results)
    assert after["generated_tokens"] - before["generated_tokens"] == generated
    steps = after["decode_steps"] - before["decode_steps"]
    # One at a time would take one step per token; sharing steps takes far fewer.
    assert steps < generated / 4, (steps, generated)
    assert after["max_batch"] >= 8
    assert after["running"] == 0 and after["waiting"] == 0


def test_concurrent_greedy_results_match_sequential(server, openai_client) -> None:
    """Batching must not change what a request gets: same greedy text alone or among others."""
    alone = (
        openai_client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "request 3"}], max_tokens=32, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert _concurrently(server, 6)[3][0] == alone


def test_disconnect_mid_stream_frees_the_slot(server) -> None:
    body = {"model": "tiny", "prompt": "The", "max_tokens": 1500, "temperature": 0, "stream": True}
    before = server.stats()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert server.stats()["running"] == 1
    stats = server.wait_idle()
    # It stopped long before its 1500 tokens.
    assert stats["generated_tokens"] - before["generated_tokens"] < 1000


def test_disconnect_while_waiting_for_a_non_streamed_answer_frees_the_slot(server) -> None:
    body = {"model": "tiny", "prompt": "The", "max_tokens": 1500, "temperature": 0}
    before = server.stats()
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    stats = server.wait_idle()
    assert stats["generated_tokens"] - before["generated_tokens"] < 1000
