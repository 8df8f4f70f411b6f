"""The MLX engine defends itself: one request's failure stays its own, a dead generation thread fails everyone at
once and comes back, the waiting queue is bounded, and stop strings cost the same whatever their number."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import openai
import pytest

from litestar_llm.engine.stops import StopStringMatcher
from tests.conftest import Server, model_toml

FAULT = "litestar-llm-test-fault:"


@pytest.fixture(scope="module")
def guarded(start_server, tiny_model: Path) -> Server:
    """A small batch (4 slots) and queue (64) over the tiny model, with test fault injection on."""
    return start_server(
        f"""
        [backends.local]
        kind = "mlx"
        max_batch_size = 4
        max_queue = 64

        {model_toml(tiny_model)}
        """,
        env={"LITESTAR_LLM_TEST_FAULTS": "1"},
    )


def _client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


async def _stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, started: asyncio.Event | None = None):
    """(text, completion tokens) of a greedy completions stream; `started` is set at its first chunk."""
    stream = await client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text, tokens = "", 0
    async for chunk in stream:
        if started is not None:
            started.set()
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return text, tokens


def _wait_for(server: Server, check, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if check(stats):
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


BAD = [
    ("/v1/completions", {"top_k": 10**9, "temperature": 1}),
    ("/v1/completions", {"seed": -1, "temperature": 1}),
    ("/v1/completions", {"min_p": 5, "temperature": 1}),
    ("/v1/completions", {"repetition_penalty": -1}),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 100000}),
    ("/v1/completions", {"prompt": FAULT + "sampler", "temperature": 1}),  # mlx-lm's sampler raises in the step
    ("/v1/completions", {"prompt": FAULT + "emit"}),  # this row's delta raises
]


def test_a_failing_request_fails_alone(guarded: Server) -> None:
    async def run():
        async with _client(guarded) as client, httpx.AsyncClient(base_url=guarded.url, timeout=60) as http:
            alone = await _stream(client, "The", 200)
            started = asyncio.Event()
            concurrent = asyncio.create_task(_stream(client, "The", 200, started))
            await asyncio.wait_for(started.wait(), 60)

            async def bad(path: str, fields: dict) -> httpx.Response:
                body = {"model": "tiny", "max_tokens": 16, **fields}
                if path.endswith("chat/completions"):
                    body["messages"] = [{"role": "user", "content": "Hello"}]
                else:
                    body.setdefault("prompt", "Hello")
                return await http.post(path, json=body)

            answers = await asyncio.gather(*(bad(path, fields) for path, fields in BAD))
            after = await http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 8})
            return alone, await asyncio.wait_for(concurrent, 120), answers, after

    alone, concurrent, answers, after = asyncio.run(run())
    for (_, fields), answer in zip(BAD, answers, strict=True):
        assert 400 <= answer.status_code < 600 and answer.status_code != 500, (fields, answer.text)
        assert "error" in answer.json()
    assert concurrent == alone and concurrent[1] > 0  # the stream in the same batch went on, token for token
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] > 0
    assert guarded.stats()["state"] == "ready"


def test_a_thousand_concurrent_requests_finish_or_are_refused(guarded: Server) -> None:
    async def run() -> list[httpx.Response | BaseException]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=guarded.url, timeout=120, limits=limits) as http:
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
            calls = [http.post("/v1/completions", json=body) for _ in range(1000)]
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 600)

    answers = asyncio.run(run())
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert not failures, failures[:3]
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 503]
    assert len(ok) + len(refused) == 1000, {a.status_code for a in answers}
    assert ok and all(a.json()["usage"]["completion_tokens"] > 0 for a in ok)
    assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
    assert all(a.json()["error"]["code"] == "server_overloaded" for a in refused), refused[0].text
    stats = guarded.wait_idle()
    assert stats["refused"] >= len(refused)


def test_a_dead_generation_thread_fails_every_request_at_once_and_comes_back(guarded: Server) -> None:
    async def run():
        async with _client(guarded) as client:
            # 4 running and 2 waiting for a slot, all long enough to be there when the thread dies.
            streams = [asyncio.create_task(_stream(client, f"request {i}", 1500)) for i in range(6)]
            await asyncio.to_thread(_wait_for, guarded, lambda s: s["running"] == 4 and s["waiting"] == 2)
            kill = asyncio.create_task(client.completions.create(model="tiny", prompt=FAULT + "thread", max_tokens=4))
            results = await asyncio.wait_for(asyncio.gather(*streams, kill, return_exceptions=True), 120)
            down = await asyncio.to_thread(httpx.get, f"{guarded.url}/ready", timeout=10)
            refused = await asyncio.gather(
                client.completions.create(model="tiny", prompt="Hi", max_tokens=4), return_exceptions=True
            )
            await client.completions.create(model="tiny", prompt=FAULT + "release", max_tokens=4)
            return results, down, refused[0]

    results, down, refused = asyncio.run(run())
    assert all(isinstance(r, openai.APIError) for r in results), results
    assert all("test fault injection" in str(r) for r in results), results
    assert down.status_code == 503
    model = down.json()["models"]["tiny"]
    assert model["ready"] is False and model["state"] == "failed" and "test fault injection" in model["error"]
    assert isinstance(refused, openai.APIStatusError) and refused.status_code == 503

    guarded.wait_ready()
    stats = guarded.stats()
    assert stats["state"] == "ready" and stats["restarts"] == 1 and stats["error"] is None
    assert stats["running"] == 0 and stats["waiting"] == 0
    again = httpx.post(
        f"{guarded.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 8}, timeout=60
    )
    assert again.status_code == 200, again.text


# -- the queue, on the engine itself ---------------------------------------------------------------------------


def test_a_request_that_leaves_or_waits_too_long_is_dropped_before_prefill(tiny_model: Path) -> None:
    from litestar_llm.config import MLXBackendConfig, ModelConfig
    from litestar_llm.engine.mlx import MLXEngine
    from litestar_llm.engine.types import GenerationRequest, SamplingParams
    from litestar_llm.errors import OverloadedError

    def request(prompt: str, max_tokens: int | None = None) -> GenerationRequest:
        return GenerationRequest(
            model="tiny", prompt=prompt, sampling=SamplingParams(temperature=0, max_tokens=max_tokens)
        )

    async def first(engine: MLXEngine, req: GenerationRequest):
        async for delta in engine.generate(req):
            return delta

    async def until(engine: MLXEngine, check) -> dict:
        while not check(engine.stats()):
            await asyncio.sleep(0.01)
        return engine.stats()

    async def run():
        model = ModelConfig(name="tiny", backend="local", source=str(tiny_model))
        engine = MLXEngine(model, MLXBackendConfig(max_batch_size=2, max_queue_wait_s=600), "local")
        await engine.start()
        try:
            # Both slots busy until cancelled (a whole context of tokens each).
            blockers = [asyncio.create_task(first_then_hold(engine, request(f"busy {i}"))) for i in range(2)]
            await asyncio.wait_for(until(engine, lambda s: s["running"] == 2 and s["waiting"] == 0), 60)
            before = engine.stats()
            leaver = asyncio.create_task(first(engine, request("I leave before my turn")))
            # In the thread's own queue (not still being tokenized): taken from the inbox, not inserted.
            await asyncio.wait_for(until(engine, lambda s: s["waiting"] == 1 and len(engine._pending) == 1), 60)
            leaver.cancel()
            left = await asyncio.wait_for(until(engine, lambda s: s["waiting"] == 0), 60)
            assert left["cancelled_waiting"] == before["cancelled_waiting"] + 1
            assert left["prompt_tokens"] == before["prompt_tokens"]  # never inserted, never prefilled

            engine.backend.max_queue_wait_s = 0.05  # read at each step by the thread
            with pytest.raises(OverloadedError, match="no slot within"):
                await asyncio.wait_for(first(engine, request("I wait too long", 4)), 60)
            expired = engine.stats()
            assert expired["expired"] == before["expired"] + 1 and expired["prompt_tokens"] == before["prompt_tokens"]
            assert expired["running"] == 2  # the running ones were never touched

            for blocker in blockers:
                blocker.cancel()
            await asyncio.wait_for(until(engine, lambda s: s["running"] == 0), 60)
            assert (await asyncio.wait_for(first(engine, request("my turn", 2)), 60)).token_ids
        finally:
            await engine.close()

    async def first_then_hold(engine, req):
        async for _ in engine.generate(req):
            await asyncio.sleep(3600)

    asyncio.run(run())


# -- stop strings ----------------------------------------------------------------------------------------------


class _Reference:
    """The obvious matcher (every stop searched at every feed): what StopStringMatcher must answer, piece by piece."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held, self.stopped, self.matched = [s for s in stops if s], "", False, None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        buffer = self.held + text
        cut = min((i for s in self.stops if (i := buffer.find(s)) >= 0), default=-1)
        if cut >= 0:  # of the stops there, the one that completed first (the shortest)
            self.held, self.stopped = "", True
            self.matched = min((s for s in self.stops if buffer.find(s) == cut), key=len)
            return buffer[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0)
        self.held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _pieces(matcher, pieces: list[str]) -> tuple[list[str], bool, str | None]:
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return out, True, matcher.matched
    out.append(matcher.flush())
    return out, False, matcher.matched


def _word(rng: random.Random, alphabet: str, size: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(size))


def test_stop_matcher_answers_as_the_obvious_one() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        alphabet = "ab c"[: rng.randint(2, 4)]
        stops = [_word(rng, alphabet, rng.randint(0, 5)) for _ in range(rng.randint(0, 5))]
        pieces = [_word(rng, alphabet, rng.randint(0, 4)) for _ in range(rng.randint(1, 8))]
        assert _pieces(StopStringMatcher(stops), pieces) == _pieces(_Reference(stops), pieces), (stops, pieces)


def test_fifty_thousand_stops() -> None:
    rng = random.Random(3)
    stops = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(6, 12))) for _ in range(50_000)]
    target = stops[12_345]
    text = "xyz " * 50 + target[:-1]
    matcher = StopStringMatcher(stops)
    out = "".join(matcher.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    assert not matcher.stopped and out == "xyz " * 50  # the partial stop is held back
    assert matcher.feed(target[-1] + " more") == "" and matcher.stopped and matcher.matched == target
