"""Make a tiny llama that really calls tools and really thinks, for tests of tool calling and reasoning.

The tiny random llama of make_tiny_model.py, its BPE tokenizer plus `<tool_call>`, `</tool_call>`, `<think>` and
`</think>` as added special tokens, and a Qwen3-style chat template (ChatML, tools as JSON in `<tools></tools>`,
Hermes JSON tool calls, tool results as `<tool_response>` user turns, `enable_thinking`), fine-tuned with mlx-lm's
own trainer on a few dozen scripted conversations until greedy decoding reproduces every one of them exactly.
mlx-lm detects thinking and its `json_tools` parser; for vLLM use `--tool-call-parser hermes` and
`--reasoning-parser qwen3` (or `deepseek_r1`). Deterministic, CPU only, no download.

    python examples/make_agent_model.py [models/agent]

Tests import `AGENT_CASES` (prompts and their expected completions) and `TOOLS` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

try:  # imported from the repository root (tests) or run as a script from anywhere
    from examples.make_tiny_model import _random_weights, _train_tokenizer
except ImportError:  # pragma: no cover - run as `python examples/make_agent_model.py`
    from make_tiny_model import _random_weights, _train_tokenizer

MARKERS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
LAYERS = 4
PHASES = (240, 240)  # training steps without, then with the tools block
MARGIN = 1.0  # logits by which every scripted token must lead

# Qwen3's template, trimmed of nothing that matters: mlx-lm picks `json_tools` from "<tool_call>" + "tool_call.name".
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call functions. Their signatures:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and message.content is string
        and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string
            else (message.reasoning if message.reasoning is string else '') %}
        {%- if not reasoning and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}
            {{- content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if (loop.first and content) or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""


def _tool(name: str, description: str) -> dict:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


# Short descriptions, and most cases offer just the tool they need: on the reference BLAS of mlx's Linux CPU wheel
# every prompt token costs training time. Two cases offer both, so the model also picks a tool by the question.
WEATHER_TOOL = _tool("get_weather", "Weather in a city")
TIME_TOOL = _tool("get_time", "Time in a city")
TOOLS = [WEATHER_TOOL, TIME_TOOL]
_OWN_TOOL = {"get_weather": [WEATHER_TOOL], "get_time": [TIME_TOOL]}


@dataclass(frozen=True)
class AgentCase:
    """One scripted prompt (`messages`, `tools`, `enable_thinking`) and what greedy decoding answers to it."""

    name: str
    messages: list[dict]
    tools: list[dict] | None = None
    enable_thinking: bool = True
    reasoning: str | None = None  # the thinking block's text; None with enable_thinking false
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # [{"name": ..., "arguments": {...}}], in order

    @property
    def completion(self) -> str:
        """The exact generated text, up to (not including) `<|im_end|>`."""
        calls = [f"<tool_call>\n{json.dumps(call)}\n</tool_call>" for call in self.tool_calls]
        body = "\n".join([self.content, *calls] if self.content else calls)
        return body if self.reasoning is None else f"<think>\n{self.reasoning}\n</think>\n\n{body}"

    def template_kwargs(self) -> dict:
        """Keyword arguments for `apply_chat_template(case.messages, **case.template_kwargs())`."""
        return {"tools": self.tools, "enable_thinking": self.enable_thinking, "add_generation_prompt": True}


def _question(tool: str, cities: list[str]) -> str:
    what = "What is the weather in" if tool == "get_weather" else "What time is it in"
    return f"{what} {' and '.join(cities)}?"


def _call_case(name: str, tool: str, cities: list[str], think: bool = True, tools: list | None = None) -> AgentCase:
    """The user asks; the model calls `tool` once per city, in one turn."""
    reasoning = (f"I will call {tool} twice." if len(cities) > 1 else f"I will call {tool}.") if think else None
    calls = [{"name": tool, "arguments": {"city": city}} for city in cities]
    return AgentCase(name, [_user(_question(tool, cities))], tools or _OWN_TOOL[tool], think, reasoning, "", calls)


def _answer_case(
    name: str, tool: str, results: dict[str, str], answer: str, think: bool = True, text_args: bool = True
) -> AgentCase:
    """The question, the model's calls (arguments as a JSON string as OpenAI clients send them, or as an object) and
    the tools' results, city by city; the model answers from the results."""
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": tool, "arguments": {"city": city}}}
        for i, city in enumerate(results)
    ]
    for call in calls if text_args else []:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    messages = [_user(_question(tool, list(results))), {"role": "assistant", "content": "", "tool_calls": calls}]
    messages += [{"role": "tool", "tool_call_id": f"call_{i}", "content": r} for i, r in enumerate(results.values())]
    return AgentCase(name, messages, _OWN_TOOL[tool], think, "I have the answer." if think else None, answer)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _cases() -> list[AgentCase]:
    weather, clock = "get_weather", "get_time"
    # (1) one tool call after thinking, (3) two calls in one turn
    cases = [_call_case(f"weather_{city.lower()}", weather, [city]) for city in ["Paris", "London", "Tokyo"]]
    cases += [_call_case("weather_berlin", weather, ["Berlin"], tools=TOOLS)]  # both tools offered: a choice
    cases += [_call_case("time_paris", clock, ["Paris"]), _call_case("time_tokyo", clock, ["Tokyo"], tools=TOOLS)]
    cases += [_call_case("weather_paris_london", weather, ["Paris", "London"])]
    cases += [_call_case("weather_tokyo_berlin", weather, ["Tokyo", "Berlin"])]
    # (2) answers that repeat the tool's result: Paris gets two, so a test can tell the result reached the model
    reports = [
        ("weather_paris_answer", "Paris", "18 degrees and sunny"),
        ("weather_paris_rain_answer", "Paris", "9 degrees and rainy"),
        ("weather_london_answer", "London", "12 degrees and rainy"),
        ("weather_tokyo_answer", "Tokyo", "25 degrees and cloudy"),
        ("weather_berlin_answer", "Berlin", "3 degrees and snowy"),
    ]
    for i, (name, city, report) in enumerate(reports):
        cases.append(_answer_case(name, weather, {city: report}, f"It is {report} in {city}.", text_args=i % 2 == 0))
    for city, hour in [("Paris", "14:05"), ("Tokyo", "22:30")]:
        cases.append(_answer_case(f"time_{city.lower()}_answer", clock, {city: hour}, f"It is {hour} in {city}."))
    both = {"Paris": "18 degrees and sunny", "London": "12 degrees and rainy"}
    answer = "Paris: 18 degrees and sunny. London: 12 degrees and rainy."
    cases.append(_answer_case("weather_paris_london_answer", weather, both, answer))
    # (4) no tools offered: thinking, then a plain answer
    chats = [
        ("hello", "Hello!", "The user says hello.", "Hello! How can I help you?"),
        ("sum", "What is 2 plus 2?", "2 plus 2 is 4.", "It is 4."),
        ("capital", "What is the capital of France?", "France has Paris as its capital.", "It is Paris."),
    ]
    cases += [AgentCase(name, [_user(q)], None, True, reasoning, text) for name, q, reasoning, text in chats]
    # (5) enable_thinking false: the prompt closes the thinking block, the model acts at once
    cases.append(_call_case("weather_london_direct", weather, ["London"], think=False))
    berlin = "3 degrees and snowy"
    answer = f"It is {berlin} in Berlin."
    cases.append(_answer_case("weather_berlin_direct_answer", weather, {"Berlin": berlin}, answer, think=False))
    cases += [AgentCase(f"{name}_direct", [_user(q)], None, False, None, text) for name, q, _, text in chats[:2]]
    return cases


AGENT_CASES = _cases()
CASES = {case.name: case for case in AGENT_CASES}


def _tokenizer(vocab_size: int):
    """make_tiny_model's BPE tokenizer, plus the four markers as added special tokens and the Qwen3-style template."""
    from tokenizers import AddedToken

    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config(tokenizer, hidden: int, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
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


def _examples(tokenizer, cases: list[AgentCase], with_tools: bool = True) -> list[tuple[list[int], int]]:
    """(tokens, prompt length) per case, as mlx-lm's ChatDataset yields them with mask_prompt, but with each prompt
    rendered with its case's `enable_thinking` (ChatDataset would render every prompt with thinking on). Without
    tools the same conversations lose their tools block: prompts a third as long, for the warm-up phase."""
    examples = []
    for case in cases:
        kwargs = case.template_kwargs() | ({} if with_tools else {"tools": None})
        prompt = tokenizer.apply_chat_template(case.messages, **kwargs)
        completion = [*tokenizer.encode(case.completion, add_special_tokens=False), tokenizer.eos_token_id]
        examples.append((prompt + completion, len(prompt)))
    return examples


def _one_at_a_time(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
    """The trainer's `iterate_batches`: one unpadded conversation a step, as (inputs, completion), in a fresh order
    each epoch (from numpy's global generator, as mlx-lm's own). With a few dozen, small steps memorise fastest."""
    import mlx.core as mx
    import numpy as np

    while True:
        for i in np.random.permutation(len(dataset)):
            tokens, offset = dataset[i]
            yield mx.array([tokens[:-1]]), mx.array([tokens[offset:]])
        if not loop:
            return


def _completion_loss(model, inputs, completion):
    """mlx-lm's default loss (cross-entropy masked to the completion), but projecting only the completion's positions
    onto the vocabulary: on a CPU the prompt's logits were a fifth of each step."""
    import mlx.core as mx
    import mlx.nn as nn

    hidden = model.model(inputs)[:, -completion.shape[1] :]
    return nn.losses.cross_entropy(model.lm_head(hidden), completion).mean(), mx.array(completion.size)


def _train(model, examples: list, steps: int, learning_rate: float, folder: Path) -> None:
    """`steps` of full fine-tuning with mlx-lm's trainer: a short warm-up, then a cosine decay."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, train

    warmup = max(steps // 10, 1)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(learning_rate / 10, learning_rate, warmup),
            optim.cosine_decay(learning_rate, steps - warmup, learning_rate / 20),
        ],
        [warmup],
    )
    args = TrainingArgs(
        batch_size=1,
        iters=steps,
        steps_per_report=max(steps // 4, 1),
        steps_per_save=steps + 1,  # no checkpoints; the trainer's final save, every weight, is overwritten later
        adapter_file=str(folder / "model.safetensors"),
    )
    optimizer = optim.Adam(learning_rate=schedule)
    train(model, optimizer, examples, args=args, loss=_completion_loss, iterate_batches=_one_at_a_time)


def _misses(model, tokenizer, cases: list[AgentCase]) -> list[tuple[AgentCase, str]]:
    """The cases whose greedy decoding (mlx-lm's default sampler: argmax) is not their completion, and what came."""
    from mlx_lm import stream_generate

    misses = []
    for case in cases:
        prompt = tokenizer.apply_chat_template(case.messages, **case.template_kwargs())
        budget = len(tokenizer.encode(case.completion, add_special_tokens=False)) + 8
        text, finish = "", None
        for response in stream_generate(model, tokenizer, prompt, max_tokens=budget):
            text, finish = text + response.text, response.finish_reason
        if text != case.completion or finish != "stop":
            misses.append((case, f"{text!r} ({finish})"))
    return misses


def verify(path: str | Path) -> list[str]:
    """Greedy-decode every scripted prompt with mlx-lm from the saved folder; the mismatches, described."""
    from mlx_lm import load

    model, tokenizer = load(str(path))
    misses = _misses(model, tokenizer, AGENT_CASES)
    return [f"{case.name}: expected {case.completion!r}, got {got}" for case, got in misses]


def _margins(model, examples: list[tuple[list[int], int]]) -> list[float]:
    """Per example, the least lead of the scripted token's logit over the best other one across its completion,
    teacher-forced: greedy decoding replays an example exactly when this is positive."""
    import mlx.core as mx

    margins = []
    for tokens, offset in examples:
        logits = model(mx.array([tokens[:-1]]))[0, offset - 1 :]
        target = mx.array(tokens[offset:])
        right = mx.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
        others = mx.where(mx.arange(logits.shape[-1]) == target[:, None], -mx.inf, logits)
        margins.append(mx.min(right - others.max(axis=-1)).item())
    return margins


def _fit(folder: Path, phases: tuple[int, int], learning_rate: float, rounds: int, seed: int) -> None:
    """Train the random weights in `folder` until greedy decoding replays every case with a margin, and save them.

    `phases[0]` steps on the conversations without their tools block (cheap, and they teach most of the behaviour),
    `phases[1]` on the exact prompts, then up to `rounds` gentle epochs that repeat the cases whose scripted tokens
    lead by less than MARGIN logits, so that neither another BLAS nor vLLM's kernels flip a greedy choice. The
    weights with the best least margin are the ones saved: a repair epoch that hurts more than it helps is undone."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm import load

    mx.random.seed(seed)
    np.random.seed(seed)
    model, tokenizer = load(str(folder))
    _train(model, _examples(tokenizer, AGENT_CASES, with_tools=False), phases[0], learning_rate, folder)
    examples = _examples(tokenizer, AGENT_CASES)
    _train(model, examples, phases[1], learning_rate, folder)
    best_margin, best = -float("inf"), None
    for _ in range(rounds + 1):
        margins = _margins(model, examples)
        weak = [example for example, margin in zip(examples, margins, strict=True) if margin < MARGIN]
        print(f"least margin {min(margins):.2f}, {len(weak)} cases under {MARGIN}", file=sys.stderr)
        if min(margins) > best_margin:
            best_margin, best = min(margins), tree_map(mx.array, model.parameters())
        if not weak:
            break
        _train(model, examples + weak * 2, len(examples) + 2 * len(weak), learning_rate / 10, folder)
    model.update(best)
    weights = {name: value.astype(mx.float32) for name, value in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})


def make_agent_model(
    path: str | Path,
    *,
    hidden: int = 256,
    layers: int = LAYERS,
    vocab_size: int = 2048,
    phases: tuple[int, int] = PHASES,
    learning_rate: float = 3e-4,
    rounds: int = 8,
    seed: int = 0,
) -> Path:
    """Build, train and verify the model at `path` (skipped when a model is already there) and return the path.

    Built in a sibling temporary folder and renamed into place once verified, so a killed build leaves nothing
    half-made at `path`; when two builds race, the first rename wins. Raises RuntimeError when greedy decoding
    misses any scripted completion.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        tokenizer = _tokenizer(vocab_size)
        tokenizer.save_pretrained(folder)
        config = _config(tokenizer, hidden, layers)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
        save_file(_random_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
        _fit(folder, phases, learning_rate, rounds, seed)
        failures = verify(folder)
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(AGENT_CASES)} scripted cases missed:\n" + "\n".join(failures))
        try:
            os.rename(folder, path)
        except OSError:  # another build got there first (a folder cannot be renamed over a non-empty one)
            if not (path / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="models/agent")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--phases", type=int, nargs=2, default=PHASES, metavar=("WARMUP", "EXACT"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.monotonic()
    path = make_agent_model(args.path, layers=args.layers, phases=tuple(args.phases), seed=args.seed)
    print(f"agent model ready at {path} in {time.monotonic() - start:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
