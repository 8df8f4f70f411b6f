"""Sampling values that once took an MLX model down for everyone: each is now a 400 naming the field, in the
dialect's own shape, before anything is queued; a stream running meanwhile finishes untouched and the model
serves the next request."""

from __future__ import annotations

import threading

import httpx
import pytest
import schemas

from litestar_llm.config import SamplingDefaults
from litestar_llm.engine.base import ModelInfo
from litestar_llm.engine.types import GenerationRequest, NamedToolChoice, SamplingParams, Tool
from litestar_llm.errors import InvalidRequestError
from litestar_llm.serving import check_request, sampling

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
OLLAMA = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "stream": False}

OPENAI_CASES = [
    ("top_k vocab", {"top_k": 10**9}, "top_k"),
    ("top_k 2**63", {"top_k": 2**63}, "top_k"),
    ("seed -1", {"seed": -1, "temperature": 1}, "seed"),
    ("seed 2**64", {"seed": 2**64, "temperature": 1}, "seed"),
    ("min_p 5", {"min_p": 5}, "min_p"),
    ("repetition_penalty -1", {"repetition_penalty": -1}, "repetition_penalty"),
    ("top_logprobs 100000", {"logprobs": True, "top_logprobs": 100000}, "top_logprobs"),
    ("temperature -1", {"temperature": -1}, "temperature"),
    ("n 1000", {"n": 1000}, "n"),
    ("100 stops", {"stop": [f"s{i}" for i in range(100)]}, "stop"),
    ("max_tokens beyond context", {"max_tokens": 10**6}, "max_tokens"),
]
OLLAMA_CASES = [
    ("top_k vocab", {"top_k": 10**9}, "options.top_k"),
    ("seed -1", {"seed": -1, "temperature": 1}, "options.seed"),
    ("min_p 5", {"min_p": 5}, "options.min_p"),
    ("repeat_penalty -1", {"repeat_penalty": -1}, "options.repeat_penalty"),
    ("temperature -1", {"temperature": -1}, "options.temperature"),
    ("top_p 2", {"top_p": 2}, "options.top_p"),
    ("100 stops", {"stop": [f"s{i}" for i in range(100)]}, "options.stop"),
]


@pytest.fixture(scope="module")
def running_stream(server):
    """A greedy 64-token stream that runs while the bad requests arrive; yields its result once finished."""
    result: dict = {}

    def run() -> None:
        body = {**CHAT, "max_tokens": 64, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
            result["lines"] = [line for line in response.iter_lines() if line.startswith("data: ")]

    thread = threading.Thread(target=run)
    thread.start()
    yield lambda: (thread.join(120), result)[1]


@pytest.mark.parametrize(("case", "fields", "param"), OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
def test_openai_bad_sampling_is_a_400(server, running_stream, case: str, fields: dict, param: str) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, **fields}, timeout=30)
    schemas.assert_openai_error(response, 400, param)


@pytest.mark.parametrize(("case", "options", "field"), OLLAMA_CASES, ids=[c[0] for c in OLLAMA_CASES])
def test_ollama_bad_options_are_a_400(server, running_stream, case: str, options: dict, field: str) -> None:
    response = httpx.post(f"{server.url}/api/chat", json={**OLLAMA, "options": options}, timeout=30)
    assert response.status_code == 400, response.text
    schemas.ollama("ErrorResponse", response.json())
    assert response.json()["error"].startswith(field)


def test_ollama_top_logprobs_is_bounded(server) -> None:
    response = httpx.post(f"{server.url}/api/chat", json={**OLLAMA, "logprobs": True, "top_logprobs": 100000})
    assert response.status_code == 400 and "top_logprobs" in response.json()["error"]


def test_completions_and_responses_name_their_own_fields(server) -> None:
    completion = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "top_k": 10**9}
    schemas.assert_openai_error(httpx.post(f"{server.url}/v1/completions", json=completion), 400, "top_k")
    beyond = {"model": "tiny", "input": "hi", "max_output_tokens": 10**6}
    schemas.assert_openai_error(httpx.post(f"{server.url}/v1/responses", json=beyond), 400, "max_output_tokens")


def test_the_stream_finished_untouched_and_the_model_still_serves(server, running_stream) -> None:
    lines = running_stream()["lines"]
    assert lines[-1] == "data: [DONE]"
    assert '"completion_tokens":64' in lines[-2], lines[-2]
    assert '"finish_reason":"length"' in "".join(lines)
    after = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{server.url}/ready").status_code == 200


# -- in process: the checks themselves ----------------------------------------------------------------------

INFO = ModelInfo(name="m", backend="mlx", source="m", vocab_size=100, structured_output=False, tools=True)


def _refused(request: GenerationRequest, names=None, info: ModelInfo = INFO) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        check_request(request, info, names or {})
    return caught.value


def test_top_k_up_to_the_vocabulary_passes_and_beyond_is_refused() -> None:
    check_request(GenerationRequest(model="m", sampling=SamplingParams(top_k=100)), INFO, {})
    assert _refused(GenerationRequest(model="m", sampling=SamplingParams(top_k=101))).param == "top_k"


def test_nan_and_infinity_are_refused() -> None:
    for value in (float("nan"), float("inf")):
        assert _refused(GenerationRequest(model="m", sampling=SamplingParams(temperature=value))).param == "temperature"


def test_the_dialect_names_the_field() -> None:
    error = _refused(GenerationRequest(model="m", sampling=SamplingParams(min_p=2)), {"min_p": "options.min_p"})
    assert error.param == "options.min_p" and error.message.startswith("options.min_p:")


def test_tool_checks() -> None:
    tools = [Tool(name="f"), Tool(name="g", parameters={"type": "array"})]
    assert _refused(GenerationRequest(model="m", tools=tools)).param == "tools[1].parameters"
    named = GenerationRequest(model="m", tools=[Tool(name="f")], tool_choice=NamedToolChoice(name="h"))
    assert _refused(named).param == "tool_choice"
    forced = GenerationRequest(model="m", tools=[Tool(name="f")], tool_choice="required")
    assert "constrained decoding" in _refused(forced).message
    no_tools = ModelInfo(name="m", backend="mlx", source="m")
    assert _refused(GenerationRequest(model="m", tools=[Tool(name="f")]), info=no_tools).param == "tools"
    # "none" offers nothing, so a model without tools serves it
    check_request(GenerationRequest(model="m", tools=[Tool(name="f")], tool_choice="none"), no_tools, {})


def test_sampling_precedence() -> None:
    defaults = SamplingDefaults(temperature=0.5, max_tokens=100)
    assert sampling({}, defaults, {"max_tokens": 16}).max_tokens == 100  # the model's default beats the dialect's
    assert sampling({}, SamplingDefaults(), {"max_tokens": 16}).max_tokens == 16
    assert sampling({"temperature": 0.0}, defaults).temperature == 0.0  # a sent 0 is sent
    assert sampling({}, defaults).temperature == 0.5
    assert sampling({"top_k": -1}, defaults).top_k == 0
