"""Embedding throughput against its references, and what an embedding load does to chat streams, as ratios.

    # MLX: ours vs mlx-lm's raw forward pass on the same batches, and chat ITL with and without an embedding load
    python benchmarks/embeddings.py --model-path models/tiny --mlx

    # vLLM: our vllm backend vs vLLM's own /v1/embeddings (`vllm serve --runner pooling --convert embed`)
    python benchmarks/embeddings.py --model-path models/tiny --vllm --engine-arg max_model_len=512 \
        --engine-arg enforce_eager=true

The embedding load is N requests (`-n`, default 4 x C) of `--inputs` texts each (default 32), at most C in flight
(`-c`, default 16); it prints inputs/s and input tokens/s (from each answer's usage). The raw ceiling runs the same
batches of `--inputs` texts through mlx-lm's model (`model.model`, right-padded, last-token pooling, normalized) in
this process, with no server. The chat check streams `--chat` requests at once (default 4) on a generation model on
the same MLX backend, alone and then beside the embedding load, and prints the inter-token latency p50 of both.
Every comparison runs `--rounds` rounds (default 3) in alternating order and prints the median round [min, max].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import Process, free_port, one_request, percentile, unwind_on_sigterm

WORDS = [
    "return",
    "the",
    "json",
    "representation",
    "of",
    "an",
    "object",
    "split",
    "string",
    "path",
    "file",
    "system",
    "iterator",
    "typing",
]


def texts(count: int, offset: int = 0) -> list[str]:
    """Inputs of 8 to 40 words, different for every request."""
    out = []
    for i in range(offset, offset + count):
        n = 8 + (i * 7) % 33
        out.append(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + f" ({i})")
    return out


async def embed_load(url: str, model: str, requests: int, concurrency: int, inputs: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:

        async def one(i: int) -> int:
            async with gate:
                body = {"model": model, "input": texts(inputs, i * inputs), "encoding_format": "float"}
                response = await client.post(f"{url}/embeddings", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
                return response.json()["usage"]["prompt_tokens"]

        await one(requests)  # warm-up, not counted
        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    return {"inputs_s": requests * inputs / wall, "tokens_s": sum(tokens) / wall}


def raw_ceiling(model_path: str, requests: int, inputs: int) -> dict:
    """mlx-lm's forward pass on the same batches, pooled and normalized here: the engine's own inputs/s."""
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(model_path)
    encode = tokenizer._tokenizer
    batches = [encode(texts(inputs, i * inputs))["input_ids"] for i in range(requests + 1)]

    def forward(rows: list[list[int]]) -> None:
        width = max(map(len, rows))
        hidden = model.model(mx.array([r + [0] * (width - len(r)) for r in rows])).astype(mx.float32)
        pooled = hidden[mx.arange(len(rows)), mx.array([len(r) - 1 for r in rows])]
        pooled = pooled / mx.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled.tolist()

    forward(batches[-1])  # warm-up
    started = time.perf_counter()
    for rows in batches[:-1]:
        forward(rows)
    wall = time.perf_counter() - started
    return {"inputs_s": requests * inputs / wall, "tokens_s": sum(len(r) for b in batches[:-1] for r in b) / wall}


async def chat_itl(url: str, model: str, streams: int, max_tokens: int, load=None) -> float:
    """ITL p50 of `streams` chat streams sent at once; with `load` (a coroutine) running beside them."""
    async with httpx.AsyncClient(timeout=1800) as client:
        background = asyncio.ensure_future(load) if load is not None else None
        if background is not None:
            await asyncio.sleep(0.5)  # the embedding load is under way first
        results = await asyncio.gather(
            *(one_request(client, url, model, f"Stream {i}: explain paths.", max_tokens) for i in range(streams))
        )
        if background is not None:
            await background
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(errors[0])
    return percentile([x for r in results for x in r.itl], 50)


def start_ours(model_path: str, backend: str, engine_args: dict, chat: bool) -> tuple[Process, str]:
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="bench-")) / "server.toml"
    source = Path(model_path).resolve()
    table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in engine_args.items())
    text = f'[server]\nport = {port}\n[backends.local]\nkind = "{backend}"\n'
    text += f"[backends.local.engine_args]\n{table}" if backend == "vllm" else ""
    text += f'[[models]]\nname = "embed"\nbackend = "local"\nsource = "{source}"\ntask = "embed"\npooling = "last"\n'
    if chat:
        text += f'[[models]]\nname = "chat"\nbackend = "local"\nsource = "{source}"\n'
    config.write_text(text)
    argv = [sys.executable, "-m", "litestar_llm", "serve", "--config", str(config)]
    return Process(argv, f"http://127.0.0.1:{port}/ready"), f"http://127.0.0.1:{port}/v1"


def start_vllm(model_path: str, engine_args: dict) -> tuple[Process, str]:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--port", str(port)]
    argv += [
        "--served-model-name",
        "embed",
        "--runner",
        "pooling",
        "--convert",
        "embed",
        "--disable-uvicorn-access-log",
    ]
    argv += ["--pooler-config", json.dumps({"pooling_type": "LAST", "use_activation": True})]
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [] if value is False else [flag, str(value)]
    return Process(argv, f"http://127.0.0.1:{port}/health"), f"http://127.0.0.1:{port}/v1"


def rounds(runs: dict, count: int) -> dict[str, list[dict]]:
    """Each named run `count` times, in alternating order round by round."""
    names = list(runs)
    out: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(count):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(runs[name]())
    return out


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):9.1f} [{min(values):.1f}, {max(values):.1f}]"


def show_throughput(figures: dict[str, list[dict]], reference: str) -> None:
    for name, runs in figures.items():
        inputs, tokens = [f["inputs_s"] for f in runs], [f["tokens_s"] for f in runs]
        print(f"{name:<22} inputs/s {summary(inputs)}   tokens/s {summary(tokens)}", flush=True)
    ours, ref = figures["litestar-llm"], figures[reference]
    ratios = [o["inputs_s"] / r["inputs_s"] for o, r in zip(ours, ref, strict=True)]
    print(
        f"ratio litestar-llm / {reference}: inputs/s {statistics.median(ratios):.3f}x "
        f"[{min(ratios):.3f}, {max(ratios):.3f}]\n",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--mlx", action="store_true", help="ours on MLX vs the raw forward pass; chat ITL")
    parser.add_argument("--vllm", action="store_true", help="ours on vllm vs vLLM's own /v1/embeddings")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("-n", "--requests", type=int, help="embedding requests per run (default 4 x C)")
    parser.add_argument("--inputs", type=int, default=32, help="inputs per embedding request")
    parser.add_argument("--chat", type=int, default=4, help="chat streams for the ITL check")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    unwind_on_sigterm()
    n, c, k = args.requests or 4 * args.concurrency, args.concurrency, args.inputs
    engine_args = {key: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
                   for key, _, v in (a.partition("=") for a in args.engine_arg)}  # fmt: skip
    print(f"embedding load: {n} requests of {k} inputs, C={c}; {args.rounds} rounds, median [min, max]\n")
    if args.mlx:
        proc, url = start_ours(args.model_path, "mlx", {}, chat=True)
        try:
            figures = rounds(
                {
                    "litestar-llm": lambda: asyncio.run(embed_load(url, "embed", n, c, k)),
                    "raw mlx-lm forward": lambda: raw_ceiling(args.model_path, n, k),
                },
                args.rounds,
            )
            show_throughput(figures, "raw mlx-lm forward")
            asyncio.run(chat_itl(url, "chat", args.chat, 4))  # warm-up
            itl = rounds(
                {
                    "chat alone": lambda: {"itl": asyncio.run(chat_itl(url, "chat", args.chat, args.max_tokens))},
                    "chat + embedding load": lambda: {
                        "itl": asyncio.run(
                            chat_itl(url, "chat", args.chat, args.max_tokens, embed_load(url, "embed", n, c, k))
                        )
                    },
                },
                args.rounds,
            )
            for name, runs in itl.items():
                print(f"{name:<22} ITL p50 ms {summary([r['itl'] * 1000 for r in runs])}")
            ratios = [b["itl"] / a["itl"] for a, b in zip(itl["chat alone"], itl["chat + embedding load"], strict=True)]
            print(f"ratio ITL p50 with / without the embedding load: {statistics.median(ratios):.3f}x\n", flush=True)
        finally:
            proc.stop()
    if args.vllm:
        ours, ours_url = start_ours(args.model_path, "vllm", engine_args, chat=False)
        try:
            theirs, their_url = start_vllm(args.model_path, engine_args)
            try:
                figures = rounds(
                    {
                        "litestar-llm": lambda: asyncio.run(embed_load(ours_url, "embed", n, c, k)),
                        "vllm serve": lambda: asyncio.run(embed_load(their_url, "embed", n, c, k)),
                    },
                    args.rounds,
                )
                show_throughput(figures, "vllm serve")
            finally:
                theirs.stop()
        finally:
            ours.stop()


if __name__ == "__main__":
    main()
