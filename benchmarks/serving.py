"""Streaming load against OpenAI-compatible servers, side by side with the reference, as ratios.

    # our server vs mlx_lm.server on the same model, C=1 and C=16, plus mlx-lm's raw batch_generate ceiling:
    python benchmarks/serving.py --model-path models/tiny --ours --mlx-lm --raw -c 1 -c 16

    # our vllm backend vs vLLM's own OpenAI server, same engine arguments, C=16 and C=64:
    python benchmarks/serving.py --model-path models/tiny --ours --backend vllm --vllm -c 16 -c 64 \
        --engine-arg max_model_len=2048 --engine-arg enforce_eager=true

    # telemetry overhead: ours with [telemetry] on (the default) and off, same load
    python benchmarks/serving.py --model-path models/tiny --ours --telemetry-off -c 16

    # any running server:
    python benchmarks/serving.py --base-url http://127.0.0.1:8000/v1 --model tiny -c 16

    # the cost of tools and thinking on MLX (a model that calls tools and thinks, e.g. the test model of
    # examples/make_agent_model.py): chat with `tools` against the same rendered prompts on /v1/completions (the
    # same tokens in and out, nothing parsed) and against the same messages without `tools`, alternating rounds:
    python benchmarks/serving.py --model-path models/agent --ours --tools -c 16 --rounds 5

    # the workloads of agents and RAG apps, ours beside mlx_lm.server and vllm-mlx, alternating rounds, C=1/16/64:
    # plain prompts, a shared 750-token system prompt, multi-turn chats, and long (1,900-token) prompts among
    # short ones (ITL p99 shows whether running decodes keep flowing while a long prompt prefills); --raw adds
    # mlx-lm's own engine on the plain and prefix loads, the prefix prefilled once (the ceiling of any server on it)
    python benchmarks/serving.py --model-path models/tiny --ours --mlx-lm --vllm-mlx --raw -c 1 -c 16 -c 64 \
        --workload plain --workload prefix --workload multi-turn --workload mix --shared-prefix-tokens 750

vllm-mlx pins another mlx-lm than ours, so it lives in its own virtual environment:
`python -m venv /work/.venv-vllm-mlx && /work/.venv-vllm-mlx/bin/pip install vllm-mlx "mlx[cpu]"`
(`--vllm-mlx-bin` names another executable).

Each run sends N chat requests (N = max(8 x C, 32) unless -n is given) with at most C in flight, every request streaming
`--max-tokens` tokens at temperature 0. It prints requests/s, output tokens/s, and TTFT and inter-token latency
p50/p99. Output tokens are counted from the stream's usage (or its content chunks where a server sends none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TOPICS = ["JSON", "paths", "regular expressions", "asyncio", "argparse", "collections", "typing", "iterators"]


def prompts(count: int) -> list[str]:
    return [f"Request {i}: explain {TOPICS[i % len(TOPICS)]} in the standard library." for i in range(count)]


WORKLOADS = ("plain", "prefix", "multi-turn", "mix")
WORDS = [
    "the", "path", "of", "a", "file", "object", "returns", "an", "iterator", "over",
    "lines", "and", "the", "value", "of", "each", "key", "in", "the", "mapping",
]  # fmt: skip


def long_text(tokens: int, model_path: str | None, tag: str = "") -> str:
    """Text of about `tokens` tokens (counted with the model's tokenizer where there is one)."""
    words = [tag, *(WORDS[(i * 7) % len(WORDS)] for i in range(tokens))]
    if model_path is None:
        return " ".join(words[: tokens * 3 // 4])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    low, high = 1, len(words)
    while low < high:  # the most words within `tokens`
        middle = (low + high + 1) // 2
        if len(tokenizer.encode(" ".join(words[:middle]))) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


@dataclass
class Workload:
    """What each request of a run sends: `plain` prompts; the same system prompt before each (`prefix`); chats
    that continue their own earlier answers (`multi-turn`: C chats, each request one more turn); one long prompt
    in four among short ones (`mix`)."""

    name: str
    system: str | None = None
    long: str | None = None
    turns: int = 4

    def first(self, i: int) -> list[dict]:
        user = prompts(i + 1)[i]
        if self.name == "mix" and i % 4 == 0:  # distinct from their first words: no prefix to share
            user = f"Document {i}: {self.long} {user}"
        messages = [{"role": "user", "content": user}]
        return [{"role": "system", "content": self.system}, *messages] if self.system else messages


@dataclass
class Result:
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    retries: int = 0
    text: str = ""


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"Get the {name.removeprefix('get_')} in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    for name in ("get_weather", "get_time")
]


async def one_request(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: str | list,
    max_tokens: int,
    extra: dict | None = None,
    completions: bool = False,
) -> Result:
    """One streamed request. A connection that fails before any byte arrives is retried (mlx_lm.server's
    http.server drops connections beyond its small listen backlog); the wait counts in TTFT, and retries are
    reported."""
    started = time.perf_counter()
    for attempt in range(5):
        try:
            result = await _stream_once(client, url, model, prompt, max_tokens, started, extra, completions)
            result.retries = attempt
            return result
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError) as exc:
            error = exc
    return Result(error=repr(error))


async def _stream_once(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: str | list,
    max_tokens: int,
    started: float,
    extra: dict | None,
    completions: bool = False,
) -> Result:
    """A chat request, or with `completions` a /v1/completions request of the text `prompt`."""
    if completions:
        sent: dict = {"prompt": prompt}
    else:
        sent = {"messages": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt}
    body = {
        **(extra or {}),
        "model": model,
        **sent,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Result()
    last = None
    chunks = 0
    path = "/completions" if completions else "/chat/completions"
    async with client.stream("POST", f"{url}{path}", json=body) as response:
        if response.status_code != 200:
            result.error = f"{response.status_code}: {(await response.aread())[:200]!r}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                result.tokens = event["usage"]["completion_tokens"]
                result.prompt_tokens = event["usage"]["prompt_tokens"]
            choices = event.get("choices") or []
            delta = choices[0].get("delta", {}) if choices else {}
            if completions and choices:
                delta = {"content": choices[0].get("text")}
            if delta.get("content") or delta.get("reasoning") or delta.get("tool_calls"):
                result.text += delta.get("content") or ""
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - started
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
    result.tokens = result.tokens or chunks
    return result


async def run_load(
    url: str,
    model: str,
    requests: int,
    concurrency: int,
    max_tokens: int,
    keep_alive: bool = False,
    extra: dict | None = None,
    workload: Workload | None = None,
    texts: list[str] | None = None,
) -> dict:
    """`texts`: prompt texts sent to /v1/completions instead of chat messages (request i sends texts[i])."""
    gate = asyncio.Semaphore(concurrency)
    # By default a new connection per request: mlx_lm.server closes its connections, and every target gets the same.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency if keep_alive else 0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def bounded(prompt: str | list) -> Result:
            async with gate:
                return await one_request(client, url, model, prompt, max_tokens, extra, texts is not None)

        async def chat(i: int) -> list[Result]:
            """One multi-turn chat: each turn sends the earlier turns and their answers."""
            messages, results = workload.first(i), []
            for turn in range(workload.turns):
                result = await one_request(client, url, model, messages, max_tokens, extra)
                results.append(result)
                messages = [*messages, {"role": "assistant", "content": result.text}]
                messages.append({"role": "user", "content": f"Turn {turn + 2}: and then?"})
            return results

        await one_request(client, url, model, "warm up", 4)
        started = time.perf_counter()
        if workload is not None and workload.name == "multi-turn":
            chats = await asyncio.gather(*(chat(i) for i in range(concurrency)))
            results = [r for c in chats for r in c]
            requests = len(results)
        elif workload is not None:
            results = await asyncio.gather(*(bounded(workload.first(i)) for i in range(requests)))
        elif texts is not None:
            results = await asyncio.gather(*(bounded(texts[i % len(texts)]) for i in range(requests)))
        else:
            results = await asyncio.gather(*(bounded(p) for p in prompts(requests)))
        wall = time.perf_counter() - started
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    ttfts = [r.ttft for r in results]
    itls = [x for r in results for x in r.itl]
    return {
        "req_s": requests / wall,
        "tok_s": sum(r.tokens for r in results) / wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "itl_p50": percentile(itls, 50),
        "itl_p99": percentile(itls, 99),
        "retries": sum(r.retries for r in results),
        "prompt_tokens": sum(r.prompt_tokens for r in results) / requests,
        "output_tokens": sum(r.tokens for r in results) / requests,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def prefilled_prefix(model, ids: list[list[int]]) -> tuple[int, list]:
    """The leading tokens every prompt shares (never a whole prompt: its last token gives the first logits) and
    their KV cache, prefilled once."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from litestar_llm.engine.mlx_prefix import common_prefix

    shared = min(min(common_prefix(ids[0], other) for other in ids), min(len(i) for i in ids) - 1)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([ids[0][:shared]]), cache=cache))
    mx.eval([c.state for c in cache])
    return shared, cache


def raw_ceiling(
    model_path: str, requests: int, max_tokens: int, workload: Workload | None = None, share_prefix: bool = False
) -> float:
    """mlx-lm's own batch_generate on the same prompts, no HTTP: the engine's output tokens/s. Each prompt is
    prefilled whole (batch_generate shares no prefix), or with `share_prefix` the best any server on mlx-lm can do
    with a shared system prompt: its prefix prefilled once, untimed, and each sequence starting from a copy of that
    cache (so the figure is the decode steps over the longer context, plus each prompt's own suffix)."""
    import copy

    from mlx_lm import batch_generate, load

    model, tokenizer = load(model_path)
    ids = [
        tokenizer.apply_chat_template(
            workload.first(i) if workload else [{"role": "user", "content": p}], add_generation_prompt=True
        )
        for i, p in enumerate(prompts(requests))
    ]
    batch_generate(model, tokenizer, ids[:2], max_tokens=4)  # warm up
    caches = None
    if share_prefix:
        shared, prefix = prefilled_prefix(model, ids)
        caches = [copy.deepcopy(prefix) for _ in ids]
        ids = [i[shared:] for i in ids]
    started = time.perf_counter()
    response = batch_generate(model, tokenizer, ids, prompt_caches=caches, max_tokens=max_tokens, return_token_ids=True)
    wall = time.perf_counter() - started
    return sum(len(t) for t in response.token_ids) / wall


def raw_continuous(
    model_path: str, requests: int, concurrency: int, max_tokens: int, workload: Workload, share_prefix: bool
) -> float:
    """mlx-lm's BatchGenerator in process under the load the servers get: `requests` prompts, at most
    `concurrency` in flight, a new one inserted as one finishes (so each join and each leave reshapes the batch's
    KV cache, as in a server). With `share_prefix` every prompt starts from a copy of its shared prefix's cache,
    prefilled once and untimed: the best any server on mlx-lm can do on a shared-prefix load."""
    import copy

    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from litestar_llm.config import MLXBackendConfig

    model, tokenizer = load(model_path)
    ids = [tokenizer.apply_chat_template(workload.first(i), add_generation_prompt=True) for i in range(requests)]
    shared, prefix = prefilled_prefix(model, ids) if share_prefix else (0, None)
    eos = [[t] for t in sorted(tokenizer.eos_token_ids)]
    ours = MLXBackendConfig()  # our server's batch settings, so only the server around the engine differs
    generator = BatchGenerator(
        model,
        stop_tokens=eos,
        completion_batch_size=ours.max_batch_size,
        prefill_batch_size=ours.prefill_batch_size,
        prefill_step_size=ours.prefill_step_size,
    )

    def insert(i: int) -> None:
        caches = [copy.deepcopy(prefix)] if prefix is not None else None
        generator.insert([ids[i][shared:]], max_tokens=[max_tokens], caches=caches)

    tokens, submitted, finished = 0, 0, 0
    started = time.perf_counter()
    while submitted < min(concurrency, requests):
        insert(submitted)
        submitted += 1
    while finished < requests:
        _, responses = generator.next()
        for r in responses:
            tokens += 1
            if r.finish_reason is not None:
                finished += 1
                if submitted < requests:
                    insert(submitted)
                    submitted += 1
    wall = time.perf_counter() - started
    generator.close()
    return tokens / wall


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(group: int) -> float:
    """User + system CPU time of every process in a process group (the server: the CLI and its granian workers),
    from /proc: on a shared machine, CPU spent is steadier than wall-clock throughput."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == group:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def unwind_on_sigterm() -> None:
    """A SIGTERM (`timeout`, a CI limit, kill) unwinds like Ctrl-C, so the `finally` blocks stop the servers started
    in their own process groups instead of leaving them running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server started for the run, stopped at the end."""

    def __init__(self, argv: list[str], ready_url: str, cwd: str | None = None) -> None:
        self.ready_url = ready_url
        self.log = tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False)  # noqa: SIM115 - kept for the run
        # Its own process group (to stop it whole) but not its own session: Linux's scheduler autogroups split the
        # CPU between sessions, which would give a server and all its processes one share against the load
        # generator's, and halve a CPU-bound server's figures.
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd, process_group=0)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0:3]} exited; see {self.log.name}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{argv} not ready; see {self.log.name}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def _toml_lines(values: dict | None) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in (values or {}).items())


def start_ours(
    model_path: str,
    backend: str = "mlx",
    engine_args: dict | None = None,
    telemetry: bool = True,
    backend_fields: dict | None = None,
):
    port = free_port()
    folder = tempfile.mkdtemp(prefix="bench-")
    config = Path(folder) / "server.toml"
    fields = _toml_lines(backend_fields)
    table = f"[backends.local.engine_args]\n{_toml_lines(engine_args)}" if backend == "vllm" else ""
    config.write_text(
        f'[server]\nport = {port}\n[backends.local]\nkind = "{backend}"\n{fields}{table}'
        f'[[models]]\nname = "bench"\nbackend = "local"\nsource = "{Path(model_path).resolve()}"\n'
        + ("" if telemetry else "[telemetry]\nprometheus = false\ntraces = false\n")
    )
    argv = [sys.executable, "-m", "litestar_llm", "serve", "--config", str(config)]
    return Process(argv, f"http://127.0.0.1:{port}/ready"), f"http://127.0.0.1:{port}/v1", "bench"


def start_vllm(model_path: str, engine_args: dict) -> tuple[Process, str, str]:
    """vLLM's own OpenAI server (`vllm serve`), with the same engine arguments as our vllm backend."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--port", str(port)]
    argv += ["--served-model-name", "bench", "--disable-uvicorn-access-log"]  # request logging is off by default
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [] if value is False else [flag, str(value)]
    return Process(argv, f"http://127.0.0.1:{port}/health"), f"http://127.0.0.1:{port}/v1", "bench"


def start_mlx_lm(model_path: str) -> tuple[Process, str, str]:
    port = free_port()
    argv = [sys.executable, "-m", "mlx_lm.server", "--model", model_path, "--port", str(port), "--log-level", "WARNING"]
    return Process(argv, f"http://127.0.0.1:{port}/health"), f"http://127.0.0.1:{port}/v1", "default_model"


VLLM_MLX_BIN = "/work/.venv-vllm-mlx/bin/vllm-mlx"


def start_vllm_mlx(model_path: str, executable: str) -> tuple[Process, str, str]:
    """vllm-mlx (its own venv: it pins another mlx-lm), continuous batching and its prefix cache on."""
    port = free_port()
    argv = [executable, "serve", model_path, "--port", str(port), "--continuous-batching"]
    argv += ["--served-model-name", "bench", "--offline"]
    return Process(argv, f"http://127.0.0.1:{port}/health"), f"http://127.0.0.1:{port}/v1", "bench"


def _value(text: str):
    """An --engine-arg value as TOML/JSON would read it: numbers and booleans typed, the rest strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def show(name: str, c: int, figures: dict) -> None:
    print(
        f"{name:<16} C={c:<3} {figures['req_s']:7.2f} req/s {figures['tok_s']:8.1f} tok/s  "
        f"TTFT p50 {figures['ttft_p50'] * 1000:7.1f} ms p99 {figures['ttft_p99'] * 1000:7.1f} ms  "
        f"ITL p50 {figures['itl_p50'] * 1000:6.1f} ms p99 {figures['itl_p99'] * 1000:6.1f} ms"
        + (f"  ({figures['retries']} reconnects)" if figures["retries"] else ""),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an already running OpenAI-compatible server (…/v1)")
    parser.add_argument("--model", default="tiny", help="the model id to send with --base-url")
    parser.add_argument("--model-path", help="model folder for --ours / --mlx-lm / --raw")
    parser.add_argument("--ours", action="store_true", help="start litestar-llm on --model-path")
    parser.add_argument("--mlx-lm", action="store_true", help="start mlx_lm.server on --model-path (the reference)")
    parser.add_argument("--raw", action="store_true", help="also print mlx-lm's batch_generate ceiling")
    parser.add_argument("--backend", choices=["mlx", "vllm"], default="mlx", help="the backend kind for --ours")
    parser.add_argument("--vllm", action="store_true", help="start vLLM's own OpenAI server (the reference for vllm)")
    parser.add_argument(
        "--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="vLLM engine argument, for both servers"
    )
    parser.add_argument(
        "--telemetry-off", action="store_true", help="also start ours with [telemetry] off, to measure its overhead"
    )
    parser.add_argument("-c", "--concurrency", type=int, action="append", help="repeatable; default 1 and 16")
    parser.add_argument("-n", "--requests", type=int, help="requests per run (default 8 x concurrency, at least 32)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vllm-mlx", action="store_true", help="start vllm-mlx on --model-path (a reference)")
    parser.add_argument("--vllm-mlx-bin", default=VLLM_MLX_BIN, help="the vllm-mlx executable")
    parser.add_argument(
        "--workload",
        action="append",
        metavar="NAME[:C,C]",
        help=f"repeatable, one of {', '.join(WORKLOADS)}, optionally at its own concurrencies (prefix:16,64); "
        "all servers run side by side, alternating",
    )
    parser.add_argument("--shared-prefix-tokens", type=int, default=750, help="system prompt of prefix, multi-turn")
    parser.add_argument(
        "--long-tokens", type=int, default=1900, help="the long prompts of mix (the tiny model: 2,048 context)"
    )
    parser.add_argument("--turns", type=int, default=4, help="turns per chat of multi-turn")
    parser.add_argument("--alternate", type=int, default=2, help="rounds per cell for --workload, servers rotated")
    parser.add_argument(
        "--ours-field",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [backends] field for ours with --workload (e.g. max_batch_size=64)",
    )
    parser.add_argument("--tools", action="store_true", help="ours with and without tools, alternating rounds")
    parser.add_argument("--rounds", type=int, default=5, help="rounds for --tools")
    args = parser.parse_args()
    unwind_on_sigterm()
    levels = args.concurrency or [1, 16]
    if args.tools:
        tools_and_thinking(args, levels)
        return
    if args.workload or args.vllm_mlx:
        side_by_side(args, levels)
        return

    # One server at a time, each warmed up first (compilation, caches, first allocations), so no idle server
    # shares the cores and no first-request cost lands in the figures.
    engine_args = {k: _value(v) for k, _, v in (a.partition("=") for a in args.engine_arg)}
    starters: list[tuple[str, object]] = []
    if args.base_url:
        starters.append(("server", lambda: (None, args.base_url, args.model)))
    if args.ours:
        starters.append(("litestar-llm", lambda: start_ours(args.model_path, args.backend, engine_args)))
    if args.telemetry_off:
        starters.append(
            ("telemetry off", lambda: start_ours(args.model_path, args.backend, engine_args, telemetry=False))
        )
    if args.mlx_lm:
        starters.append(("mlx_lm.server", lambda: start_mlx_lm(args.model_path)))
    if args.vllm:
        starters.append(("vllm serve", lambda: start_vllm(args.model_path, engine_args)))
    table: dict[tuple[str, int], dict] = {}
    targets = [name for name, _ in starters]
    for name, start in starters:
        proc, url, model = start()
        try:
            asyncio.run(run_load(url, model, 2 * max(levels), max(levels), args.max_tokens))  # warm-up, not counted
            for c in levels:
                table[name, c] = asyncio.run(run_load(url, model, args.requests or max(8 * c, 32), c, args.max_tokens))
                show(name, c, table[name, c])
        finally:
            if proc is not None:
                proc.stop()
    if args.raw:
        for c in levels:
            print(f"{'raw mlx-lm':<14} C={c:<3} {raw_ceiling(args.model_path, c, args.max_tokens):26.1f} tok/s")
    names = set(targets)
    for reference in ("mlx_lm.server", "vllm serve", "telemetry off"):
        if "litestar-llm" not in names or reference not in names:
            continue
        print(f"\nratios litestar-llm / {reference} (tok/s higher is better; TTFT lower is better)")
        for c in levels:
            ours, ref = table["litestar-llm", c], table[reference, c]
            ratios = {k: ours[k] / ref[k] for k in ("tok_s", "ttft_p50", "itl_p50")}
            print(
                f"C={c:<3} tok/s {ratios['tok_s']:.2f}x   TTFT p50 {ratios['ttft_p50']:.2f}x   "
                f"ITL p50 {ratios['itl_p50']:.2f}x"
            )


def side_by_side(args: argparse.Namespace, levels: list[int]) -> None:
    """Every server started at once (idle ones wait on a socket), each cell run on each server in turn, the order
    rotated round by round; a cell's figures are the median of its rounds. N = max(C, 16) requests a run unless -n
    is given (multi-turn: C chats of --turns requests)."""
    starters = []
    if args.ours:
        fields = {k: _value(v) for k, _, v in (a.partition("=") for a in args.ours_field)}
        starters.append(("litestar-llm", lambda: start_ours(args.model_path, backend_fields=fields)))
    if args.mlx_lm:
        starters.append(("mlx_lm.server", lambda: start_mlx_lm(args.model_path)))
    if args.vllm_mlx:
        starters.append(("vllm-mlx", lambda: start_vllm_mlx(args.model_path, args.vllm_mlx_bin)))
    system = long_text(args.shared_prefix_tokens, args.model_path, "Instructions:")
    long = long_text(args.long_tokens, args.model_path)
    cells = []
    for spec in args.workload or ["plain"]:
        name, _, at = spec.partition(":")
        if name not in WORKLOADS:
            raise SystemExit(f"--workload: {name!r} is not one of {', '.join(WORKLOADS)}")
        workload = Workload(name, system if name in ("prefix", "multi-turn") else None, long, args.turns)
        cells += [(workload, c) for c in ([int(c) for c in at.split(",")] if at else levels)]
    servers = []
    try:
        for name, start in starters:
            proc, url, model = start()
            servers.append((name, proc, url, model))
            asyncio.run(run_load(url, model, 2 * max(c for _, c in cells), max(c for _, c in cells), args.max_tokens))
        table: dict[tuple[str, int, str], dict] = {}
        for workload, c in cells:
            runs: dict[str, list[dict]] = {name: [] for name, *_ in servers}
            n = args.requests or max(c, 16)
            for r in range(args.alternate):
                for name, _, url, model in servers[r % len(servers) :] + servers[: r % len(servers)]:
                    runs[name].append(asyncio.run(run_load(url, model, n, c, args.max_tokens, workload=workload)))
            for name, figures in runs.items():
                table[workload.name, c, name] = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
                show(f"{workload.name} {name}", c, table[workload.name, c, name])
    finally:
        for _, proc, _, _ in servers:
            proc.stop()
    if args.raw:  # batch_generate on C prompts at once
        for workload, c in cells:
            if workload.name in ("plain", "prefix"):
                figure = raw_ceiling(args.model_path, c, args.max_tokens, workload)
                print(f"raw mlx-lm {workload.name} C={c:<3} {figure:26.1f} tok/s", flush=True)
            if workload.name == "prefix":
                figure = raw_ceiling(args.model_path, c, args.max_tokens, workload, share_prefix=True)
                print(f"raw mlx-lm prefix, prefilled once C={c:<3} {figure:12.1f} tok/s", flush=True)
                # The servers' load in process: what mlx-lm's engine itself keeps of its plain throughput.
                n = args.requests or max(c, 16)
                plain = raw_continuous(args.model_path, n, c, args.max_tokens, Workload("plain"), False)
                shared = raw_continuous(args.model_path, n, c, args.max_tokens, workload, True)
                print(
                    f"raw BatchGenerator, {n} requests at C={c}: plain {plain:.1f} tok/s, prefix prefilled once "
                    f"{shared:.1f} tok/s: {shared / plain:.2f}x",
                    flush=True,
                )
    print_comparison(table, cells, [name for name, *_ in servers])


def print_comparison(table: dict, cells: list, names: list[str]) -> None:
    """The table: each server's tok/s and TTFT p50 per cell, and ours over the better reference."""
    refs = [n for n in names if n != "litestar-llm"]
    header = f"{'workload':<11} {'C':>3} " + "".join(
        f"{n + ' tok/s':>20} {'TTFT p50':>9} {'ITL p99':>8}" for n in names
    )
    if "litestar-llm" in names and refs:
        header += f" {'tok/s vs best':>14} {'TTFT vs best':>13}"
    print("\n" + header)
    for workload, c in cells:
        row = [table[workload.name, c, n] for n in names]
        line = f"{workload.name:<11} {c:>3} " + "".join(
            f"{f['tok_s']:20.1f} {f['ttft_p50'] * 1000:7.0f}ms {f['itl_p99'] * 1000:6.0f}ms" for f in row
        )
        if "litestar-llm" in names and refs:
            ours = table[workload.name, c, "litestar-llm"]
            best_tok = max(table[workload.name, c, n]["tok_s"] for n in refs)
            best_ttft = min(table[workload.name, c, n]["ttft_p50"] for n in refs)
            line += f" {ours['tok_s'] / best_tok:13.2f}x {ours['ttft_p50'] / best_ttft:12.2f}x"
        print(line)
    for name in names:  # what a shared prefix costs each server: the same load without it
        for c in sorted({c for _, c in cells}):
            if ("prefix", c, name) in table and ("plain", c, name) in table:
                ratio = table["prefix", c, name]["tok_s"] / table["plain", c, name]["tok_s"]
                print(f"{name}: C={c} tok/s with the shared prefix / without: {ratio:.2f}x")


def tools_and_thinking(args: argparse.Namespace, levels: list[int]) -> None:
    """Tools and thinking against two loads without them, on one server, in alternating order round by round;
    each cell is the median round [min, max].

    - `tools + thinking`: chat requests with `tools`; the model thinks and calls tools, the server parses both.
    - `same tokens`: the very prompt the chat template renders for those requests, sent to /v1/completions, which
      parses nothing: the same tokens in and, greedy, the same tokens out. The ratio to it is what the tool and
      reasoning handling costs (template, parsers, the deltas they add).
    - `no tools`: the same messages without `tools`: a shorter prompt (no tool schemas) and other answers, so its
      ratio also holds what the model does differently.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    n = args.requests or max(8 * max(levels), 32)
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tools=TOOLS, tokenize=False, add_generation_prompt=True
        )
        for p in prompts(n)
    ]
    loads = {
        "tools + thinking": {"extra": {"tools": TOOLS}},
        "same tokens": {"texts": rendered},
        "no tools": {},
    }
    proc, url, model = start_ours(args.model_path, args.backend)
    try:
        for load in loads.values():  # warm-up, not counted
            asyncio.run(run_load(url, model, 2 * max(levels), max(levels), args.max_tokens, **load))
        for c in levels:
            runs: dict[str, list[dict]] = {name: [] for name in loads}
            for r in range(args.rounds):
                order = list(loads)[r % len(loads) :] + list(loads)[: r % len(loads)]
                for name in order:
                    count = args.requests or max(8 * c, 32)
                    before = cpu_seconds(proc.proc.pid)
                    figures = asyncio.run(run_load(url, model, count, c, args.max_tokens, **loads[name]))
                    spent = cpu_seconds(proc.proc.pid) - before
                    figures["cpu_ms_per_token"] = 1000 * spent / (figures["output_tokens"] * count)
                    runs[name].append(figures)
            for name, figures in runs.items():
                median = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
                show(name, c, median)
                print(
                    f"{'':<16} {median['prompt_tokens']:.1f} prompt and {median['output_tokens']:.1f} output tokens "
                    f"per request; server CPU {median['cpu_ms_per_token']:.2f} ms per output token"
                )
            for reference in ("same tokens", "no tools"):
                for figure, label in (("tok_s", "tok/s"), ("cpu_ms_per_token", "server CPU per token")):
                    pairs = zip(runs["tools + thinking"], runs[reference], strict=True)
                    ratios = [t[figure] / p[figure] for t, p in pairs]
                    print(
                        f"C={c:<3} {label} tools + thinking / {reference}: {statistics.median(ratios):.3f}x "
                        f"[{min(ratios):.3f}, {max(ratios):.3f}] over {args.rounds} rounds"
                    )
    finally:
        proc.stop()


if __name__ == "__main__":
    main()
