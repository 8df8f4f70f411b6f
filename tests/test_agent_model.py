"""The agent model's build: mlx-lm sees its thinking and tool-call markers, and greedy decoding replays the script."""

from __future__ import annotations

import pytest
from agent_fixtures import agent_model  # noqa: F401  (a no-op once conftest.py imports it)

pytest.importorskip("mlx_lm")


@pytest.fixture(scope="module")
def loaded(agent_model):  # noqa: F811
    from mlx_lm import load

    return load(str(agent_model))


def test_mlx_lm_detects_thinking_and_hermes_json_tool_calls(loaded) -> None:
    from mlx_lm.tool_parsers import json_tools

    _, tokenizer = loaded
    assert tokenizer.has_thinking
    assert (tokenizer.think_start, tokenizer.think_end) == ("<think>", "</think>")
    assert len(tokenizer.think_start_tokens) == len(tokenizer.think_end_tokens) == 1  # single added tokens
    assert tokenizer.has_tool_calling
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == ("<tool_call>", "</tool_call>")
    assert len(tokenizer.tool_call_start_tokens) == len(tokenizer.tool_call_end_tokens) == 1
    assert tokenizer.init_kwargs["tool_parser_type"] == "json_tools"
    assert tokenizer.tool_parser is json_tools.parse_tool_call
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("name", ["weather_paris", "weather_paris_answer"])
def test_greedy_decoding_replays_the_script(loaded, name: str) -> None:
    from mlx_lm import generate

    from examples.make_agent_model import CASES

    model, tokenizer = loaded
    case = CASES[name]
    prompt = tokenizer.apply_chat_template(case.messages, **case.template_kwargs())
    assert generate(model, tokenizer, prompt, max_tokens=200) == case.completion
    if case.tool_calls:  # what mlx-lm's parser makes of the text between the markers
        inner = case.completion.split(tokenizer.tool_call_start)[1].split(tokenizer.tool_call_end)[0]
        assert tokenizer.tool_parser(inner) == case.tool_calls[0]
    else:  # the answer repeats the tool's result, so the result reached the model
        assert case.messages[-1]["content"] in case.content
