"""Agents over MLX, vLLM's CPU build and the remote backend: tool calls and thinking through the chat, Responses and Ollama
dialects, with the official clients, on the tiny model fine-tuned to call tools and think
(examples/make_agent_model.py). Greedy decoding reproduces its scripted answers exactly, so every assertion names
the text the model really produces. The remote runs go through a gateway (this server with a `kind = "openai"`
backend) in front of the MLX server: the upstream's tool calls and reasoning pass through it."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest
import schemas
from conftest import Server

from examples.make_agent_model import CASES, TOOLS

GREEDY = {"temperature": 0, "max_tokens": 96}


def sent(obj) -> dict:
    return obj.model_dump(mode="json", exclude_unset=True)


@pytest.fixture(scope="module", params=["mlx", "remote", "vllm"])
def served(request, agent_model) -> Server:
    """The agent model on MLX, through a gateway in front of that server, and on vLLM's CPU build (its hermes and
    qwen3 parsers, detected from the template): conftest's shared servers. (`agent_model` is named so that
    conftest gives these tests room for its build.)"""
    name = {"mlx": "agent_server", "remote": "agent_gateway", "vllm": "vllm_server"}[request.param]
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def client(served: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(served: Server) -> ollama.Client:
    return ollama.Client(host=served.url, timeout=120)


def chat(client: openai.OpenAI, case: str, **extra):
    c = CASES[case]
    kwargs = {"tools": c.tools} if c.tools else {}
    if not c.enable_thinking:
        kwargs["extra_body"] = {"chat_template_kwargs": {"enable_thinking": False}}
    return client.chat.completions.create(model="agent", messages=c.messages, **kwargs, **GREEDY, **extra)


def calls_of(case: str) -> list[tuple[str, dict]]:
    return [(call["name"], call["arguments"]) for call in CASES[case].tool_calls]


# -- chat completions ---------------------------------------------------------------------------------------


def test_a_whole_agent_loop_through_chat_completions(client) -> None:
    first = chat(client, "weather_paris")
    schemas.openai("CreateChatCompletionResponse", sent(first))
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls] == calls_of(
        "weather_paris"
    )
    assert message.content is None  # no markup, no blank line: the call is the whole answer
    assert message.model_extra["reasoning"] == CASES["weather_paris"].reasoning
    assert message.model_extra["reasoning_content"] == CASES["weather_paris"].reasoning
    call = message.tool_calls[0]
    history = [
        *CASES["weather_paris"].messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": CASES["weather_paris_answer"].messages[2]["content"]},
    ]
    tools = CASES["weather_paris_answer"].tools
    second = client.chat.completions.create(model="agent", messages=history, tools=tools, **GREEDY)
    schemas.openai("CreateChatCompletionResponse", sent(second))
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == CASES["weather_paris_answer"].content  # the tool's result reached it
    assert second.choices[0].message.tool_calls is None


def test_streamed_fragments_join_to_the_non_streamed_call(client) -> None:
    whole = chat(client, "weather_tokyo_berlin").choices[0].message
    chunks = list(chat(client, "weather_tokyo_berlin", stream=True))
    for chunk in chunks:
        schemas.openai("CreateChatCompletionStreamResponse", sent(chunk))
    calls: dict[int, dict] = {}
    reasoning, content = [], []
    for chunk in chunks:
        delta = chunk.choices[0].delta
        reasoning.append(delta.model_extra.get("reasoning") or "")
        content.append(delta.content or "")
        for fragment in delta.tool_calls or ():
            call = calls.setdefault(fragment.index, {"id": None, "name": None, "arguments": ""})
            if fragment.id is not None:  # the first fragment of a call: its id, type and name
                assert call["id"] is None and fragment.type == "function" and fragment.function.name
                call["id"], call["name"] = fragment.id, fragment.function.name
            call["arguments"] += fragment.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (t.function.name, t.function.arguments) for t in whole.tool_calls
    ]
    assert len(calls) == 2  # parallel calls
    assert "".join(reasoning) == whole.model_extra["reasoning"] and "".join(content) == ""


def test_thinking_is_separated_and_switched_off(client) -> None:
    thought = chat(client, "hello").choices[0].message
    assert thought.content == CASES["hello"].content
    assert thought.model_extra["reasoning"] == CASES["hello"].reasoning and "<think>" not in thought.content
    direct = chat(client, "hello_direct").choices[0].message
    assert direct.content == CASES["hello_direct"].content and "reasoning" not in (direct.model_extra or {})
    acting = chat(client, "weather_london_direct")
    assert [(t.function.name, json.loads(t.function.arguments)) for t in acting.choices[0].message.tool_calls] == (
        calls_of("weather_london_direct")
    )


def test_tool_choice_none_required_and_named(client) -> None:
    none = chat(client, "weather_paris", tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    # both tools offered; forcing the one the question does not ask for shows the choice is really forced
    named = chat(client, "weather_berlin", tool_choice={"type": "function", "function": {"name": "get_time"}})
    schemas.openai("CreateChatCompletionResponse", sent(named))
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) <= {"city"}
    assert named.choices[0].finish_reason == "tool_calls"
    required = chat(client, "hello", tools=TOOLS, tool_choice="required")  # a chat the model answers without tools
    calls = required.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} <= {"get_weather", "get_time"}
    assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)


def test_tool_messages_count_in_prompt_tokens(client, agent_model) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(agent_model)
    case = CASES["weather_paris_answer"]
    kwargs = {"tools": case.tools, "add_generation_prompt": True}
    expected = tokenizer.apply_chat_template(case.messages, return_dict=True, **kwargs)["input_ids"]
    answer = client.chat.completions.create(model="agent", messages=case.messages, tools=case.tools, **GREEDY)
    assert answer.usage.prompt_tokens == len(expected)
    assert answer.usage.completion_tokens_details.reasoning_tokens > 0
    assert answer.usage.completion_tokens_details.reasoning_tokens < answer.usage.completion_tokens


BAD_TOOLS = [
    ("tool without a name", {"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
    ("parameters not an object schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools[0].function.parameters"),
    ("named choice not among tools", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("tool message without its call", {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "x"}], "tools": TOOLS}, "messages[1].tool_call_id"),
    ("arguments not JSON", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}], "tools": TOOLS}, "messages[1].tool_calls[0].function.arguments"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "fields", "param"), BAD_TOOLS, ids=[b[0] for b in BAD_TOOLS])
def test_bad_tool_input_is_a_400_naming_the_field(agent_server, case: str, fields: dict, param: str) -> None:
    body = {"model": "agent", "messages": [{"role": "user", "content": "hi"}], **fields}
    response = httpx.post(f"{agent_server.url}/v1/chat/completions", json=body, timeout=30)
    schemas.assert_openai_error(response, 400, param)


# -- Responses ----------------------------------------------------------------------------------------------


def _responses_tools(case: str) -> list[dict]:
    """The case's own tools (the scripted prompt is replayed exactly), in the Responses API's flat shape."""
    return [{"type": "function", **tool["function"]} for tool in CASES[case].tools]


def test_an_agent_loop_through_responses_by_previous_response_id(client) -> None:
    case = CASES["weather_london"]
    first = client.responses.create(
        model="agent",
        input=case.messages[0]["content"],
        tools=_responses_tools(case.name),
        temperature=0,
        max_output_tokens=96,
    )
    schemas.openai("Response", sent(first))
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "function_call"]
    assert first.output[0].content[0].text == case.reasoning
    call = first.output[1]
    assert (call.name, json.loads(call.arguments)) == calls_of("weather_london")[0]
    result = CASES["weather_london_answer"].messages[2]["content"]
    second = client.responses.create(
        model="agent",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}],
        tools=_responses_tools("weather_london_answer"),
        temperature=0,
        max_output_tokens=96,
    )
    assert second.output_text == CASES["weather_london_answer"].content
    assert second.usage.output_tokens_details.reasoning_tokens > 0


def test_streamed_responses_follow_openais_event_sequence(client) -> None:
    case = CASES["weather_paris_london"]
    events = list(
        client.responses.create(
            model="agent",
            input=case.messages[0]["content"],
            tools=_responses_tools(case.name),
            temperature=0,
            max_output_tokens=128,
            stream=True,
        )
    )
    for event in events:
        schemas.openai("ResponseStreamEvent", sent(event))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.reasoning_text.delta" in kinds and kinds[-1] == "response.completed"
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [i.type for i in added] == ["reasoning", "function_call", "function_call"]
    done = {e.item_id: e.arguments for e in events if e.type == "response.function_call_arguments.done"}
    joined: dict[str, str] = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            joined[e.item_id] = joined.get(e.item_id, "") + e.delta
    assert joined == done and [json.loads(a) for a in done.values()] == [a for _, a in calls_of("weather_paris_london")]
    final = events[-1].response
    assert [i.type for i in final.output] == ["reasoning", "function_call", "function_call"]


def test_a_message_item_is_added_empty_and_its_part_follows(client) -> None:
    events = list(
        client.responses.create(model="agent", input="Hello!", temperature=0, max_output_tokens=64, stream=True)
    )
    kinds = [e.type for e in events]
    message_added = next(e for e in events if e.type == "response.output_item.added" and e.item.type == "message")
    assert message_added.item.content == []
    assert kinds[kinds.index("response.output_item.added", kinds.index("response.reasoning_text.done")) + 1] == (
        "response.content_part.added"
    )
    assert events[-1].response.output_text == CASES["hello"].content


# -- Ollama -------------------------------------------------------------------------------------------------


def test_an_agent_loop_through_ollama(ollama_client) -> None:
    case = CASES["time_paris"]
    first = ollama_client.chat(model="agent", messages=case.messages, tools=case.tools, options={"temperature": 0})
    schemas.ollama("ChatResponse", first.model_dump(mode="json", exclude_none=True))
    assert first.message.thinking == case.reasoning and first.message.content == ""
    assert [(t.function.name, dict(t.function.arguments)) for t in first.message.tool_calls] == calls_of("time_paris")
    result = CASES["time_paris_answer"].messages[2]["content"]
    # the call goes back without its thinking: the scripted history has none (the template would render it)
    called = {"role": "assistant", "content": "", "tool_calls": first.message.tool_calls}
    history = [*case.messages, called, {"role": "tool", "tool_name": "get_time", "content": result}]
    tools = CASES["time_paris_answer"].tools
    second = ollama_client.chat(model="agent", messages=history, tools=tools, options={"temperature": 0})
    assert second.message.content == CASES["time_paris_answer"].content and not second.message.tool_calls
    streamed = list(
        ollama_client.chat(model="agent", messages=history, tools=tools, options={"temperature": 0}, stream=True)
    )
    assert "".join(c.message.content for c in streamed) == second.message.content
    assert "".join(c.message.thinking or "" for c in streamed) == second.message.thinking


def test_ollama_think_false_and_capabilities(ollama_client) -> None:
    case = CASES["sum_direct"]
    answer = ollama_client.chat(model="agent", messages=case.messages, think=False, options={"temperature": 0})
    assert answer.message.content == case.content and not answer.message.thinking
    shown = ollama_client.show("agent")
    assert {"completion", "tools", "thinking"} <= set(shown.capabilities)
    generated = ollama_client.generate(model="agent", prompt="Hello!", options={"temperature": 0})
    assert generated.thinking == CASES["hello"].reasoning and generated.response == CASES["hello"].content


def test_ollama_bad_tool_history_is_a_400(agent_server) -> None:
    body = {"model": "agent", "stream": False, "tools": TOOLS, "messages": [
        {"role": "user", "content": "hi"}, {"role": "tool", "tool_name": "get_weather", "content": "x"}]}  # fmt: skip
    response = httpx.post(f"{agent_server.url}/api/chat", json=body, timeout=30)
    assert response.status_code == 400 and "tool_name" in response.json()["error"]
    schemas.ollama("ErrorResponse", response.json())
