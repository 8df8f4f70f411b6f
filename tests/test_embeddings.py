"""Embeddings over the MLX backend: /v1/embeddings (the openai client), /api/embed and /api/embeddings (the ollama
client), against one real server for the module. The tiny decoder model serves as the embedding model; its
vectors are checked against mlx-lm's own forward pass, pooled here in the test."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import math

import httpx
import numpy as np
import ollama
import openai
import pytest
from conftest import model_toml
from prometheus_client.parser import text_string_to_metric_families
from schemas import assert_openai_error
from schemas import openai as openai_schema

KEY = {"Authorization": "Bearer embed-all-key"}
SCOPED = {"Authorization": "Bearer embed-scoped-key"}
SIP = {"Authorization": "Bearer embed-sip-key"}
TEXTS = [
    "Return the JSON representation of an object.",
    "A path object for the file system.",
    "Split the string at the last occurrence of sep.",
]
CONTEXT = 64
"""The embedding models' context: the tiny model's weights with a short max_position_embeddings, so an input
beyond it is cheap to embed (RoPE does not depend on it: the vectors are the tiny model's own)."""


@pytest.fixture(scope="module")
def short_model(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("short") / "tiny-short"
    folder.mkdir()
    for path in tiny_model.iterdir():
        if path.name != "config.json":
            (folder / path.name).symlink_to(path)
    config = json.loads((tiny_model / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return folder


@pytest.fixture(scope="module")
def server(start_server, tiny_model, short_model):
    server = start_server(
        f"""
        [routes]
        openai = true
        ollama = true
        [auth]
        public_paths = ["/health", "/ready", "/metrics"]
        [[auth.keys]]
        name = "all"
        key = "embed-all-key"
        [[auth.keys]]
        name = "scoped"
        key = "embed-scoped-key"
        models = ["tiny"]
        [[auth.keys]]
        name = "sip"
        key = "embed-sip-key"
        rate_limit = "sip"
        [rate_limits.sip]
        tokens_per_minute = 60
        [backends.local]
        kind = "mlx"
        {model_toml(tiny_model)}
        {model_toml(short_model, name="embed")}
        task = "embed"
        {model_toml(short_model, name="embed-mean")}
        task = "embed"
        pooling = "mean"
        normalize = false
        {model_toml(short_model, name="embed-lazy")}
        task = "embed"
        load = "on_demand"
        """
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="embed-all-key", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ollama_client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60, headers=KEY)


@pytest.fixture(scope="module")
def reference(tiny_model, tokenizer):
    """mlx-lm's own forward pass over one input, pooled here: what the server must answer."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(tiny_model))

    def embed(item: str | list[int], pooling: str = "last", normalize: bool = True) -> np.ndarray:
        ids = tokenizer(item)["input_ids"] if isinstance(item, str) else item
        hidden = np.array(model.model(mx.array([ids]))[0].astype(mx.float32))
        vector = hidden[-1] if pooling == "last" else hidden.mean(axis=0)
        return vector / np.linalg.norm(vector) if normalize else vector

    return embed


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers or KEY, timeout=60)


# -- OpenAI ---------------------------------------------------------------------------------------------------


def test_openai_floats_match_mlx_lm_and_validate(server, client, reference, tokenizer) -> None:
    result = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    assert [d.index for d in result.data] == [0, 1, 2]
    for text, item in zip(TEXTS, result.data, strict=True):
        assert len(item.embedding) == 256
        assert cosine(item.embedding, reference(text)) > 0.999
        assert math.isclose(np.linalg.norm(item.embedding), 1.0, rel_tol=1e-4)
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens
    raw = post(server, "/v1/embeddings", {"model": "embed", "input": TEXTS[0]})
    assert raw.status_code == 200
    openai_schema("CreateEmbeddingResponse", raw.json())
    assert raw.json()["object"] == "list" and raw.json()["model"] == "embed"


def test_base64_decodes_to_the_same_floats(server, client) -> None:
    floats = post(server, "/v1/embeddings", {"model": "embed", "input": TEXTS, "encoding_format": "float"}).json()
    encoded = post(server, "/v1/embeddings", {"model": "embed", "input": TEXTS, "encoding_format": "base64"}).json()
    assert encoded["usage"] == floats["usage"]  # (the spec describes the float shape only)
    for f, b in zip(floats["data"], encoded["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == f["embedding"]
    # The SDK asks for base64 by default and decodes it itself.
    sdk = client.embeddings.create(model="embed", input=TEXTS)
    assert [d.embedding for d in sdk.data] == [d["embedding"] for d in floats["data"]]


def test_token_id_inputs_equal_their_texts(client, tokenizer) -> None:
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    texts = client.embeddings.create(model="embed", input=TEXTS, encoding_format="float")
    lists = client.embeddings.create(model="embed", input=ids, encoding_format="float")
    single = client.embeddings.create(model="embed", input=ids[1], encoding_format="float")
    for a, b in zip(texts.data, lists.data, strict=True):
        assert cosine(a.embedding, b.embedding) > 0.9999
    assert cosine(single.data[0].embedding, texts.data[1].embedding) > 0.9999
    assert lists.usage.prompt_tokens == sum(map(len, ids))


def test_dimensions_cut_and_renormalize(client) -> None:
    full = client.embeddings.create(model="embed", input=TEXTS[0], encoding_format="float").data[0].embedding
    short = client.embeddings.create(model="embed", input=TEXTS[0], dimensions=32, encoding_format="float")
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (32,)
    assert math.isclose(np.linalg.norm(vector), 1.0, rel_tol=1e-6)
    head = np.array(full[:32])
    assert np.allclose(vector, head / np.linalg.norm(head), atol=1e-6)


def test_a_batch_of_64_equals_64_single_calls(client) -> None:
    texts = [f"{i}: {TEXTS[i % 3][: 8 + i % 30]}" for i in range(64)]
    batch = client.embeddings.create(model="embed", input=texts, encoding_format="float")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        singles = list(
            pool.map(lambda t: client.embeddings.create(model="embed", input=t, encoding_format="float"), texts)
        )
    assert len(batch.data) == 64
    for item, single in zip(batch.data, singles, strict=True):
        assert cosine(item.embedding, single.data[0].embedding) > 0.9999
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_mean_pooling_without_normalizing(client, reference) -> None:
    result = client.embeddings.create(model="embed-mean", input=TEXTS, encoding_format="float")
    for text, item in zip(TEXTS, result.data, strict=True):
        expected = reference(text, pooling="mean", normalize=False)
        assert cosine(item.embedding, expected) > 0.999
        assert math.isclose(np.linalg.norm(item.embedding), np.linalg.norm(expected), rel_tol=1e-3)


def test_openai_input_beyond_the_context_names_its_index(server, tokenizer) -> None:
    long = "json " * (CONTEXT + 10)
    assert len(tokenizer(long)["input_ids"]) > CONTEXT
    response = post(server, "/v1/embeddings", {"model": "embed", "input": [TEXTS[0], long]})
    error = assert_openai_error(response, 400, "input[1]")
    assert "input[1]" in error["error"]["message"] and str(CONTEXT) in error["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "embed"}, "input"),
        ({"model": "embed", "input": []}, "input"),
        ({"model": "embed", "input": ""}, "input[0]"),
        ({"model": "embed", "input": ["a", ""]}, "input[1]"),
        ({"model": "embed", "input": [[1, 2], []]}, "input[1]"),
        ({"model": "embed", "input": ["a", 5]}, "input"),
        ({"model": "embed", "input": [1, [2]]}, "input"),
        ({"model": "embed", "input": {"text": "a"}}, "input"),
        ({"model": "embed", "input": [1, 10**6]}, "input[0]"),
        ({"model": "embed", "input": [-1]}, "input[0]"),
        ({"model": "embed", "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": "embed", "input": "a", "dimensions": 257}, "dimensions"),
        ({"model": "embed", "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "tiny", "input": "a"}, "model"),
        ({"input": "a"}, "model"),
    ],
)
def test_openai_bad_input_is_a_400_naming_the_field(server, body, param) -> None:
    assert_openai_error(post(server, "/v1/embeddings", body), 400, param)


def test_task_mismatch_says_which_task_the_model_serves(server, client) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input="a")
    assert "text generation" in refused.value.message and refused.value.param == "model"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])
    assert "serves embeddings" in refused.value.message and refused.value.param == "model"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="embed", prompt="hi")
    chat = post(server, "/api/chat", {"model": "embed", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "serves embeddings" in chat.json()["error"]
    embed = post(server, "/api/embed", {"model": "tiny", "input": "a"})
    assert embed.status_code == 400 and "text generation" in embed.json()["error"]


def test_unknown_model_and_scoped_key_are_404(server) -> None:
    assert_openai_error(post(server, "/v1/embeddings", {"model": "nope", "input": "a"}), 404, "model")
    assert_openai_error(post(server, "/v1/embeddings", {"model": "embed", "input": "a"}, SCOPED), 404, "model")
    assert post(server, "/api/embed", {"model": "embed", "input": "a"}, SCOPED).status_code == 404
    no_key = httpx.post(f"{server.url}/v1/embeddings", json={"model": "embed", "input": "a"})
    assert_openai_error(no_key, 401, None, "authentication_error")


def test_token_budget_counts_the_input_tokens(server, tokenizer) -> None:
    text = "Return the JSON representation of an object, " * 3
    tokens = len(tokenizer(text)["input_ids"])
    assert 20 < tokens <= 30  # two fit into the 60-token minute, three do not
    for _ in range(2):
        response = post(server, "/v1/embeddings", {"model": "embed", "input": text}, SIP)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == tokens
    limited = post(server, "/v1/embeddings", {"model": "embed", "input": text}, SIP)
    assert_openai_error(limited, 429, None, "rate_limit_error")
    assert int(limited.headers["Retry-After"]) >= 1
    too_many = post(server, "/v1/embeddings", {"model": "embed", "input": [text] * 3}, SIP)
    assert_openai_error(too_many, 400, "input")


# -- Ollama ---------------------------------------------------------------------------------------------------


def test_ollama_embed_one_and_many(ollama_client, reference, tokenizer) -> None:
    one = ollama_client.embed(model="embed", input=TEXTS[0])
    assert len(one.embeddings) == 1 and cosine(one.embeddings[0], reference(TEXTS[0])) > 0.999
    many = ollama_client.embed(model="embed:latest", input=TEXTS)
    assert len(many.embeddings) == 3
    for text, vector in zip(TEXTS, many.embeddings, strict=True):
        assert cosine(vector, reference(text)) > 0.999
    assert many.prompt_eval_count == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert many.total_duration > 0 and many.model == "embed:latest"
    short = ollama_client.embed(model="embed", input=TEXTS[0], dimensions=16)
    assert len(short.embeddings[0]) == 16


def test_an_on_demand_embedding_model_loads_for_its_first_request(server, reference) -> None:
    first = post(server, "/api/embed", {"model": "embed-lazy", "input": TEXTS[0]}).json()
    assert first["load_duration"] > 0 and cosine(first["embeddings"][0], reference(TEXTS[0])) > 0.999
    again = post(server, "/api/embed", {"model": "embed-lazy", "input": TEXTS[0]}).json()
    assert "load_duration" not in again  # loaded now: no wait, and Ollama leaves zero stats out
    assert again["embeddings"] == first["embeddings"]


def test_ollama_older_embeddings_call(ollama_client, reference) -> None:
    result = ollama_client.embeddings(model="embed", prompt=TEXTS[1])
    assert cosine(result.embedding, reference(TEXTS[1])) > 0.999


def test_ollama_truncates_unless_told_not_to(server, ollama_client, tokenizer) -> None:
    long = "json " * (CONTEXT + 10)
    ids = tokenizer(long)["input_ids"]
    cut = ollama_client.embed(model="embed", input=long)
    assert cut.prompt_eval_count == CONTEXT
    exact = post(server, "/v1/embeddings", {"model": "embed", "input": ids[:CONTEXT], "encoding_format": "float"})
    assert cosine(cut.embeddings[0], exact.json()["data"][0]["embedding"]) > 0.9999
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.embed(model="embed", input=long, truncate=False)
    assert refused.value.status_code == 400 and str(CONTEXT) in refused.value.error


def test_ollama_load_checks_and_bad_input(server) -> None:
    assert post(server, "/api/embed", {"model": "embed"}).json() == {"model": "embed", "embeddings": []}
    assert post(server, "/api/embeddings", {"model": "embed"}).json() == {"embedding": []}
    for body, status in [
        ({"model": "embed", "input": 5}, 400),
        ({"input": "a"}, 400),
        ({"model": "embed", "input": ["a", ""]}, 400),
        ({"model": "embed", "input": "a", "dimensions": 999}, 400),
        ({"model": "nope", "input": "a"}, 404),
    ]:
        response = post(server, "/api/embed", body)
        assert response.status_code == status, (body, response.text)
        assert isinstance(response.json()["error"], str) and response.json()["error"]


# -- listings and telemetry -----------------------------------------------------------------------------------


def test_listings_show_the_embedding_model(server) -> None:
    models = httpx.get(f"{server.url}/v1/models", headers=KEY).json()
    assert {"tiny", "embed", "embed-mean"} <= {m["id"] for m in models["data"]}
    tags = httpx.get(f"{server.url}/api/tags", headers=KEY).json()
    assert "embed:latest" in {m["name"] for m in tags["models"]}
    show = post(server, "/api/show", {"model": "embed"}).json()
    assert show["capabilities"] == ["embedding"]
    assert "completion" in post(server, "/api/show", {"model": "tiny"}).json()["capabilities"]


def test_telemetry_records_the_embeddings_operation(server, tokenizer) -> None:
    post(server, "/v1/embeddings", {"model": "embed-mean", "input": TEXTS})
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    text = httpx.get(f"{server.url}/metrics").text
    counts = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gen_ai_client_token_usage_sum"
        and sample.labels.get("gen_ai_operation_name") == "embeddings"
        and sample.labels.get("gen_ai_request_model") == "embed-mean"
    ]
    assert counts and counts[0].labels["gen_ai_token_type"] == "input"
    assert sum(s.value for s in counts) >= tokens


# -- the openai backend: a gateway in front of this module's server -----------------------------------------


@pytest.fixture(scope="module")
def gateway(start_server, server):
    upstream = f"{server.url}/v1"
    gateway = start_server(
        f"""
        [routes]
        openai = true
        ollama = true
        [backends.fleet]
        kind = "openai"
        urls = ["{upstream}", "{upstream}/"]
        api_key = "embed-all-key"
        [[models]]
        name = "remote-embed"
        backend = "fleet"
        source = "embed"
        task = "embed"
        """
    )
    yield gateway
    gateway.stop()


def test_remote_passthrough_is_balanced_and_equal(server, gateway) -> None:
    direct = post(server, "/v1/embeddings", {"model": "embed", "input": TEXTS, "encoding_format": "float"}).json()
    for _ in range(2):
        through = post(gateway, "/v1/embeddings", {"model": "remote-embed", "input": TEXTS, "encoding_format": "float"})
        assert through.status_code == 200, through.text
        openai_schema("CreateEmbeddingResponse", through.json())
        assert [d["embedding"] for d in through.json()["data"]] == [d["embedding"] for d in direct["data"]]
        assert through.json()["usage"] == direct["usage"] and through.json()["model"] == "remote-embed"
    replicas = httpx.get(f"{gateway.url}/ready").json()["models"]["remote-embed"]["replicas"]
    assert [r["served"] for r in replicas] == [1, 1]
    long = "json " * (CONTEXT + 10)
    cut = post(gateway, "/api/embed", {"model": "remote-embed", "input": long})
    assert cut.status_code == 200 and cut.json()["prompt_eval_count"] == CONTEXT
    refused = post(gateway, "/v1/embeddings", {"model": "remote-embed", "input": [long]})
    assert_openai_error(refused, 400, "input[0]")  # the upstream's own 400, passed through
