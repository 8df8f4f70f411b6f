"""Helpers for tests that drive `VLLMEngine` in this process: an event loop on its own thread (vLLM's AsyncLLM
stays bound to the loop it started on), the deltas of one generation gathered into one answer, and a tiny random
model whose template takes tools and thinks."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import VLLM_ENGINE_ARGS as ENGINE_ARGS
from conftest import VLLM_ENV
from conftest import VLLM_START_TIMEOUT as START_TIMEOUT

from litestar_llm.engine.types import Delta, GenerationRequest


class EngineLoop:
    """A private event loop on a daemon thread; `run` waits for a coroutine scheduled on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-test-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def submit(self, coroutine: Coroutine[Any, Any, Any]):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_engine(source: Path, name: str = "m", **model_fields: Any):
    """A started VLLMEngine over `source` and the loop it runs on."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    from litestar_llm.config import ModelConfig, VLLMBackendConfig
    from litestar_llm.engine.vllm import VLLMEngine

    loop = EngineLoop()
    engine = VLLMEngine(
        ModelConfig(name=name, backend="gpu", source=str(source), **model_fields),
        VLLMBackendConfig(engine_args=ENGINE_ARGS),
        "gpu",
    )
    loop.run(engine.start(), timeout=START_TIMEOUT)
    return engine, loop


@dataclass
class Answer:
    """One generation's deltas, joined; `calls` are the tool calls with their argument fragments joined."""

    deltas: list[Delta]
    text: str = ""
    reasoning: str = ""
    calls: list[dict] = field(default_factory=list)
    fragments: list[list[str]] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return self.deltas[-1].finish_reason

    @property
    def usage(self):
        return self.deltas[-1].usage

    @property
    def token_ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]


def gather(deltas: list[Delta]) -> Answer:
    """Join the deltas, checking the fragment contract on the way: a call's first fragment has its id and name,
    every later one neither; indices count up from 0 in order of appearance."""
    answer = Answer(deltas=deltas)
    for delta in deltas:
        answer.text += delta.text
        answer.reasoning += delta.reasoning
        for fragment in delta.tool_calls or []:
            if fragment.index == len(answer.calls):
                assert fragment.id and fragment.name, f"first fragment without id or name: {fragment}"
                answer.calls.append({"id": fragment.id, "name": fragment.name, "arguments": ""})
                answer.fragments.append([])
            else:
                assert fragment.index < len(answer.calls), f"index out of order: {fragment}"
                assert fragment.id is None and fragment.name is None, f"a later fragment with id or name: {fragment}"
            answer.calls[fragment.index]["arguments"] += fragment.arguments
            answer.fragments[fragment.index].append(fragment.arguments)
    for i, delta in enumerate(deltas):
        assert (delta.finish_reason is not None) == (i == len(deltas) - 1)
    return answer


async def _collect(engine, request: GenerationRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


def generate(engine, loop: EngineLoop, request: GenerationRequest, timeout: float = 120) -> Answer:
    return gather(loop.run(_collect(engine, request), timeout))


# -- a hand-made tool-taking, thinking model (random weights) -----------------------------------------------

TOOL_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within ' }}
{{- '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}' }}
{{- '\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}
{{- message.content }}
{%- for tool_call in message.tool_calls or [] %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
{{- tool_call.function.arguments | tojson }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""
MARKERS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]


def make_tool_model(path: Path) -> Path:
    """make_tiny_model's BPE tokenizer plus the markers as plain added tokens (as Qwen's are), a Qwen3-style
    template with tools and an enable_thinking switch, and a smaller random llama: it cannot choose to call a tool,
    but structured output can force it to."""
    from safetensors.numpy import save_file

    from examples.make_tiny_model import _random_weights, _train_tokenizer

    if (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(2048)
    tokenizer.add_tokens(MARKERS)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
    save_file(_random_weights(config, 0), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
