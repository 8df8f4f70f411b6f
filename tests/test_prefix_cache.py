"""MLX prefix reuse: a shared prompt prefix is prefilled once, reused exactly, reported, and the cache stays within
its byte bound. One server, three models over the tiny model: the default cache, no cache (the reference for
greedy text), and a cache bounded to a few prompts."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import model_toml

SMALL_CACHE_BYTES = 4_000_000
"""A few of the long prompts below (the tiny model keeps about 4 KB of KV cache a token)."""

WORDS = [
    "the", "path", "of", "a", "file", "object", "returns", "an", "iterator", "over",
    "lines", "and", "the", "value", "of", "each", "key", "in", "the", "mapping",
]  # fmt: skip


def system_prompt(tag: str, words: int = 400) -> str:
    """A long system prompt, distinct per test (its first words) so no test reuses another's prefix."""
    return f"{tag}: " + " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(words))


def chat(system: str, *turns: str) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


@pytest.fixture(scope="module")
def prefix_server(start_server, tiny_model):
    return start_server(
        f"""
        [backends.local]
        kind = "mlx"

        [backends.nocache]
        kind = "mlx"
        prompt_cache_bytes = 0

        [backends.small]
        kind = "mlx"
        prompt_cache_bytes = {SMALL_CACHE_BYTES}

        {model_toml(tiny_model)}
        {model_toml(tiny_model, name="uncached", backend="nocache")}
        {model_toml(tiny_model, name="small", backend="small")}
        """
    )


@pytest.fixture(scope="module")
def client(prefix_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{prefix_server.url}/v1", api_key="x", max_retries=0)


def ask(client: openai.OpenAI, messages: list[dict], model: str = "tiny", max_tokens: int = 24):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)


def cached_tokens(response) -> int:
    return response.usage.prompt_tokens_details.cached_tokens


def ids(tokenizer, messages: list[dict]) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_reused_prefix_gives_the_same_greedy_text_and_reports_what_it_reused(
    prefix_server, client, tokenizer
) -> None:
    system = system_prompt("reuse")
    first, second = chat(system, "first question"), chat(system, "a second, different question")
    ask(client, first)
    before = prefix_server.stats()
    warm = ask(client, second)
    after = prefix_server.stats()
    cold = ask(client, second, model="uncached")
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert cached_tokens(cold) == 0
    # Reused: exactly the prompt tokens the first request shares with it, and the engine prefilled only the rest.
    shared = common(ids(tokenizer, first), ids(tokenizer, second))
    assert shared > 400
    assert cached_tokens(warm) == shared == after["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    prefilled = after["prefilled_tokens"] - before["prefilled_tokens"]
    assert prefilled == warm.usage.prompt_tokens - shared
    assert after["prompt_cache_hits"] > before["prompt_cache_hits"]


def test_the_next_turn_reuses_the_previous_prompt_and_answer(client, tokenizer) -> None:
    system = system_prompt("turns")
    first = chat(system, "what is a path")
    answer = ask(client, first).choices[0].message.content
    # mlx-lm's BPE detokenizer trims the answer's leading space, which the model did generate: put it back, or the
    # answer sent back tokenizes differently from its first token on (the first turn's prompt is reused anyway).
    second = chat(system, "what is a path", " " + answer, "and a file")
    again = ask(client, second)
    # More than the first turn's whole prompt: part of the answer's cache is reused too.
    assert cached_tokens(again) > len(ids(tokenizer, first))
    assert again.choices[0].message.content == ask(client, second, model="uncached").choices[0].message.content


def test_concurrent_requests_sharing_a_prefix_prefill_it_once(prefix_server, tokenizer) -> None:
    system = system_prompt("together")
    conversations = [chat(system, f"question {i} about {WORDS[i]}") for i in range(8)]
    shared = min(common(ids(tokenizer, conversations[0]), ids(tokenizer, c)) for c in conversations[1:])
    assert shared > 400

    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=f"{prefix_server.url}/v1", api_key="x", max_retries=0) as aclient:
            return await asyncio.gather(
                *(
                    aclient.chat.completions.create(model="tiny", messages=m, max_tokens=8, temperature=0)
                    for m in conversations
                )
            )

    before = prefix_server.stats()
    responses = asyncio.run(run())
    after = prefix_server.stats()
    cached = sorted(cached_tokens(r) for r in responses)
    # One of them prefilled the shared prefix; every other one started from it.
    assert all(c >= shared for c in cached[1:]), (cached, shared)
    prefilled = after["prefilled_tokens"] - before["prefilled_tokens"]
    assert prefilled == sum(r.usage.prompt_tokens - cached_tokens(r) for r in responses)
    assert prefilled < 2 * shared
    assert after["prompt_cache_kept"] > before["prompt_cache_kept"]


def test_the_cache_stays_within_its_byte_bound(prefix_server, client) -> None:
    kept_before = prefix_server.stats("small")["prompt_cache_kept"]
    for i in range(12):
        ask(client, chat(system_prompt(f"distinct {i}"), "a question"), model="small", max_tokens=8)
        stats = prefix_server.stats("small")
        assert stats["prompt_cache_max_bytes"] == SMALL_CACHE_BYTES
        assert 0 < stats["prompt_cache_bytes"] <= SMALL_CACHE_BYTES, stats
    # It kept every prompt at some point and had to let most of them go again.
    assert stats["prompt_cache_kept"] - kept_before >= 12
    assert stats["prompt_cache_entries"] < 12
