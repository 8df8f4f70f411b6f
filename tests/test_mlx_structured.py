"""Structured output on MLX by constrained decoding (llguidance), on a real server with the official clients.

The models have random weights: left alone they never write JSON, so JSON that parses and validates can only
come from the grammar. Schemas here bound every value (enums, ranges, maxLength) so a random walk ends.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import llguidance
import llguidance.hf
import ollama
import openai
import pytest
from conftest import Server, free_port, model_toml
from vllm_inprocess import make_tool_model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
LOOSE = {k: v for k, v in PERSON.items() if k != "additionalProperties"}
"""The same without additionalProperties: only `strict` keeps other keys out."""
HELLO = [{"role": "user", "content": "Describe a person."}]


def schema_number(i: int) -> dict:
    """Eight different schemas for the concurrent test."""
    kinds = [
        {"type": "integer", "minimum": 0, "maximum": 9},
        {"type": "boolean"},
        {"enum": ["a", "b", "c"]},
        {"type": "string", "maxLength": 5},
    ]
    props = {f"k{i}_{j}": kinds[(i + j) % 4] for j in range(1 + i % 3)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vllm_inprocess's tool model, its template marked for mlx-lm's json_tools parser (which it detects by
    `tool_call.name` in the template)."""
    path = make_tool_model(tmp_path_factory.mktemp("models") / "toolish")
    template = path / "chat_template.jinja"
    template.write_text(template.read_text() + "{#- calls as json_tools writes them: tool_call.name, arguments #}")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tool_model: Path):
    folder = tmp_path_factory.mktemp("structured")
    config = folder / "server.toml"
    config.write_text(
        f"""
        [server]
        max_request_bytes = 2000000

        [routes]
        openai = true
        ollama = true
        responses = true
        anthropic = true

        [backends.local]
        kind = "mlx"
        max_batch_size = 32

        {model_toml(tiny_model)}
        {model_toml(tool_model, name="toolish")}
        """
    )
    server = Server(config, free_port()).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def json_format(schema: dict, strict: bool | None = None) -> dict:
    spec = {"name": "person", "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


def test_chat_json_schema_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=HELLO, response_format=json_format(PERSON), seed=1)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = client.chat.completions.create(
        model="tiny", messages=HELLO, response_format=json_format(PERSON), seed=2, stream=True
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 3
    jsonschema.validate(json.loads(text), PERSON)


def test_strict_keeps_unnamed_properties_out(client: openai.OpenAI) -> None:
    """strict: true honours OpenAI's meaning (no properties beyond those named); without it, JSON schema's own
    (others allowed), which a random model uses at once."""
    for seed in range(3):
        answer = client.chat.completions.create(
            model="tiny", messages=HELLO, response_format=json_format(LOOSE, strict=True), seed=seed, max_tokens=300
        )
        document = json.loads(answer.choices[0].message.content)
        assert set(document) == {"name", "age", "pet"}
        jsonschema.validate(document, PERSON)
    loose = [
        client.chat.completions.create(
            model="tiny", messages=HELLO, response_format=json_format(LOOSE), seed=seed, max_tokens=60
        ).choices[0]
        for seed in range(3)
    ]
    assert any(
        c.finish_reason == "length" or set(json.loads(c.message.content)) != set(PERSON["properties"]) for c in loose
    )


def test_json_object_and_completions(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=HELLO, response_format={"type": "json_object"}, seed=3, max_tokens=400
    )
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:
        assert answer.choices[0].message.content.startswith("{")
    completion = client.completions.create(
        model="tiny", prompt="A person:", max_tokens=200, seed=4, extra_body={"response_format": json_format(PERSON)}
    )
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)


def test_regex_choice_and_grammar(client: openai.OpenAI) -> None:
    """vLLM's structured_outputs extension, on chat and completions."""
    regex = client.completions.create(
        model="tiny", prompt="A code:", max_tokens=50, extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}
    )
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"
    for seed in range(4):
        choice = client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            seed=seed,
            extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
        )
        assert choice.choices[0].message.content in ("yes", "no", "maybe")
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9]/'
    grammar = client.chat.completions.create(
        model="tiny", messages=HELLO, seed=5, max_tokens=100, extra_body={"structured_outputs": {"grammar": lark}}
    )
    text = grammar.choices[0].message.content
    assert re.fullmatch(r"\([1-9](\+[1-9])*\)", text), text
    as_text = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        seed=6,
        max_tokens=200,
        extra_body={"structured_outputs": {"json": json.dumps(PERSON)}},
    )
    jsonschema.validate(json.loads(as_text.choices[0].message.content), PERSON)


def test_responses_text_format(client: openai.OpenAI) -> None:
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": LOOSE, "strict": True}}
    response = client.responses.create(model="tiny", input="Describe a person.", text=fmt, max_output_tokens=300)
    document = json.loads(response.output_text)
    assert set(document) == set(PERSON["properties"])
    jsonschema.validate(document, PERSON)
    events = list(client.responses.create(model="tiny", input="Again.", text=fmt, max_output_tokens=300, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.completed"
    jsonschema.validate(json.loads(text), PERSON)


def test_anthropic_output_config_format(server: Server) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    fmt = {"output_config": {"format": {"type": "json_schema", "schema": PERSON}}}
    message = client.messages.create(model="tiny", max_tokens=300, messages=HELLO, extra_body=fmt)
    jsonschema.validate(json.loads(message.content[0].text), PERSON)
    with pytest.raises(anthropic.BadRequestError) as caught:
        bad = {"output_config": {"format": {"type": "json_schema", "schema": {"not": {}}}}}
        client.messages.create(model="tiny", max_tokens=30, messages=HELLO, extra_body=bad)
    assert caught.value.body["error"]["message"].startswith("output_config.format: llguidance cannot use")


def test_ollama_format(ollama_client: ollama.Client) -> None:
    chat = ollama_client.chat(model="tiny", messages=HELLO, format=PERSON, options={"seed": 7, "num_predict": 300})
    jsonschema.validate(json.loads(chat.message.content), PERSON)
    parts = list(ollama_client.chat(model="tiny", messages=HELLO, format=PERSON, options={"seed": 8}, stream=True))
    jsonschema.validate(json.loads("".join(p.message.content for p in parts)), PERSON)
    generated = ollama_client.generate(
        model="tiny", prompt="JSON:", format="json", options={"seed": 9, "num_predict": 300}
    )
    assert generated.response.startswith("{")
    if generated.done_reason == "stop":
        assert isinstance(json.loads(generated.response), dict)
    streamed = list(
        ollama_client.generate(model="tiny", prompt="JSON:", format=PERSON, options={"seed": 10}, stream=True)
    )
    jsonschema.validate(json.loads("".join(p.response for p in streamed)), PERSON)


def test_length_cut_is_a_valid_prefix(client: openai.OpenAI, tokenizer) -> None:
    """max_tokens ends the document early: finish_reason length, and the text is a prefix the grammar accepts."""
    numbers = {"type": "array", "items": {"type": "integer", "minimum": 10, "maximum": 99}, "minItems": 40}
    answer = client.chat.completions.create(
        model="tiny", messages=HELLO, response_format=json_format(numbers), max_tokens=12, seed=11
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == 12
    with pytest.raises(ValueError):
        json.loads(choice.message.content)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(numbers, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    assert matcher.consume_tokens(ll_tokenizer.tokenize_str(choice.message.content)), matcher.get_error()
    assert not matcher.is_accepting()


def test_stops_seeds_and_choices(client: openai.OpenAI, server: Server) -> None:
    """Stop strings still end the text; a seed reproduces; n > 1 gives each choice its own matcher, from a
    grammar compiled once for the schema's text."""
    stopped = client.chat.completions.create(
        model="tiny", messages=HELLO, response_format=json_format(PERSON), stop=[":"], seed=12
    )
    answer = stopped.choices[0]
    assert answer.finish_reason == "stop" and answer.message.content == '{"name"'  # properties in the schema's order
    compiled = server.stats()["grammars_compiled"]
    first, again = (
        client.chat.completions.create(
            model="tiny", messages=HELLO, response_format=json_format(PERSON), n=4, seed=13, temperature=1.0
        )
        for _ in range(2)
    )
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 1  # four choices, four matchers: not one document repeated
    assert server.stats()["grammars_compiled"] == compiled  # eight sequences, the schema's grammar from the cache


def test_sixteen_at_once_half_constrained(client: openai.OpenAI, server: Server) -> None:
    """8 constrained requests (8 different schemas) and 8 free ones share the batch: every constrained answer
    validates against its own schema, every free one runs to its max_tokens."""
    before = server.stats()["max_batch"]

    def constrained(i: int) -> tuple[int, str]:
        stream = client.chat.completions.create(
            model="tiny", messages=HELLO, response_format=json_format(schema_number(i)), seed=100 + i, stream=True
        )
        return i, "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def free(i: int) -> str:
        answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=60, seed=200 + i)
        return answer.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        docs = [pool.submit(constrained, i) for i in range(8)]
        frees = [pool.submit(free, i) for i in range(8)]
        for future in docs:
            i, text = future.result()
            jsonschema.validate(json.loads(text), schema_number(i))
        assert [f.result() for f in frees].count("length") >= 7
    assert server.stats()["max_batch"] >= min(before, 2) and server.stats()["failed"] == 0


REFUSALS = [
    ("/v1/chat/completions", {"messages": HELLO, "response_format": json_format({"type": "objekt"})}, "response_format", "Invalid type"),
    ("/v1/chat/completions", {"messages": HELLO, "response_format": json_format({"not": {"type": "string"}})}, "response_format", "Unimplemented keys"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "[0-9"}}, "structured_outputs.regex", "regex"),
    ("/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"grammar": "start: nothing"}}, "structured_outputs.grammar", "nothing"),
    ("/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"minLength": 5, "maxLength": 2, "type": "string"}}}}, "text.format", "Unsatisfiable"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param", "reason"), REFUSALS, ids=[r[2] + "-" + r[3] for r in REFUSALS])
def test_bad_grammars_are_400s_naming_the_field(server: Server, path: str, body: dict, param: str, reason: str) -> None:
    before = server.stats()["prompt_tokens"]
    response = httpx.post(f"{server.url}{path}", json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}:") and reason in error["message"]
    assert server.stats()["prompt_tokens"] == before  # refused before anything was queued


def test_ollama_refusal_names_format(server: Server) -> None:
    response = httpx.post(f"{server.url}/api/chat", json={"model": "tiny", "messages": HELLO, "format": {"not": {}}})
    assert response.status_code == 400 and response.json()["error"].startswith("format: llguidance cannot use")


def test_forced_tool_calls(client: openai.OpenAI) -> None:
    """tool_choice required / named on MLX: the calls are decoded with vLLM's schema for them."""
    weather = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    zone = {
        "type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    }
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": weather}},
        {"type": "function", "function": {"name": "get_time", "parameters": zone}},
    ]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    off = {"chat_template_kwargs": {"enable_thinking": False}}  # a random model would think forever
    named = client.chat.completions.create(
        model="toolish",
        messages=ask,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        extra_body=off,
    )
    (call,) = named.choices[0].message.tool_calls
    assert named.choices[0].finish_reason == "tool_calls" and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), zone)
    # vLLM's schema lets an array element carry keys besides name and parameters, which a random model may fill
    # without end: some seeds run to max_tokens; the calls that come are whole and valid
    finished = []
    for seed in range(4):
        required = client.chat.completions.create(
            model="toolish", messages=ask, tools=tools, tool_choice="required", seed=seed, max_tokens=300,
            parallel_tool_calls=False, extra_body=off,
        )  # fmt: skip
        choice = required.choices[0]
        assert choice.finish_reason in ("tool_calls", "length")
        if choice.finish_reason == "tool_calls":
            (call,) = choice.message.tool_calls
            finished.append(call.function.name)
            schema = weather if call.function.name == "get_weather" else zone
            jsonschema.validate(json.loads(call.function.arguments), schema)
    assert finished
    stream = client.chat.completions.create(
        model="toolish", messages=ask, tools=tools, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=off,
    )  # fmt: skip
    fragments = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert fragments[0][0].function.name == "get_weather" and len(fragments) > 2
    jsonschema.validate(json.loads("".join(f[0].function.arguments or "" for f in fragments)), weather)


def test_a_slow_compile_does_not_stall_other_streams(client: openai.OpenAI) -> None:
    """A schema that takes llguidance a second or more to compile: meanwhile a free stream keeps its pace. Were
    the compile on the generation thread, that stream would stop for the whole compile."""
    n = 3000
    big = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1}}}[0-9]+$"} for i in range(n)},
        "required": ["p0"],
        "additionalProperties": False,
    }
    arrivals: list[float] = []
    started, done = threading.Event(), threading.Event()

    def free() -> None:
        stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1500, seed=1, stream=True)
        for _chunk in stream:
            arrivals.append(time.perf_counter())
            started.set()
            if done.is_set():
                stream.close()
                return

    reader = threading.Thread(target=free)
    reader.start()
    assert started.wait(60)
    time.sleep(0.3)
    sent = time.perf_counter()
    slow = client.chat.completions.create(
        model="tiny", messages=HELLO, response_format=json_format(big), max_tokens=1, stream=True
    )
    next(iter(slow))  # the first chunk: compiled and prefilled
    compiled = time.perf_counter()
    slow.close()
    done.set()
    reader.join(60)
    during = [t for t in arrivals if sent <= t <= compiled]
    gaps = [b - a for a, b in zip([sent, *during], [*during, compiled], strict=True)]
    assert compiled - sent > 0.5, "the schema compiled too fast to tell"
    assert len(during) >= 3 and max(gaps) < 0.5 * (compiled - sent), (max(gaps), compiled - sent, len(during))


def test_a_thinking_model_thinks_first(tool_model: Path) -> None:
    """On a model with thinking markers (special tokens), the grammar leaves the thinking block free and constrains
    what follows, as vLLM applies structured output after the thinking; a prompt that opened the block already
    starts inside it. In process: llguidance's matcher on the model's tokenizer."""
    from transformers import AutoTokenizer

    from litestar_llm.engine.mlx_grammar import Grammars, constraint_of
    from litestar_llm.engine.types import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(tool_model)
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
    _, kind, text = constraint_of(SamplingParams(json_schema=PERSON))

    def accepts(opened: bool, output: str) -> bool:
        matcher = grammars.matcher("response_format", *grammars.after_thinking(kind, text, (start,), (end,), opened))
        return matcher.consume_tokens(tokenizer.encode(output, add_special_tokens=False)) and matcher.is_accepting()

    document = '{"name":"Ada","age":36,"pet":"cat"}'
    assert accepts(False, document) and accepts(False, f"<think>A person.\n</think>\n\n{document}")
    assert not accepts(False, f"Sure: {document}") and not accepts(False, '<think>x</think>{"name":1}')
    assert accepts(True, f"still thinking</think>{document}") and not accepts(True, document)
