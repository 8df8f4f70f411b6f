"""Constrained decoding vs free decoding on one server, as ratios, on MLX (llguidance) and vLLM (xgrammar).

    # MLX at C=16, and vLLM's CPU build on the same model side by side:
    python benchmarks/structured.py --model-path models/tiny -c 16 --vllm --engine-arg max_model_len=2048

For each backend one server runs the same prompts with and without a 10-property JSON schema
(`response_format`), in alternating order round by round (so drift in the machine's load hits both alike); each
figure is the median round [min, max]. The schema's documents are longer than `--max-tokens`, so every request of
both loads streams exactly `--max-tokens` tokens. Then, in this process with the model's tokenizer, llguidance's
compile time of a 50-property schema: cold (a schema text not seen before) and cached (the engine's cache by text).
Target: constrained tok/s at least 0.9x free on MLX.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving import _value, run_load, show, start_ours, unwind_on_sigterm


def object_schema(properties: int, prefix: str = "field") -> dict:
    """`properties` string fields of up to 40 characters, all required, no others."""
    props = {f"{prefix}_{i}": {"type": "string", "maxLength": 40} for i in range(properties)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def response_format(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}}}


def compare(name: str, start, args: argparse.Namespace) -> dict[int, dict]:
    """Free and constrained loads on one server, alternating; returns per C the median ratios."""
    proc, url, model = start()
    loads = {"free": None, "constrained": response_format(object_schema(10))}
    out = {}
    try:
        c0 = max(args.concurrency)
        for extra in loads.values():  # warm-up (and the grammar's compile), not counted
            asyncio.run(run_load(url, model, 2 * c0, c0, args.max_tokens, extra=extra))
        for c in args.concurrency:
            runs: dict[str, list[dict]] = {k: [] for k in loads}
            n = args.requests or max(8 * c, 32)
            for r in range(args.rounds):
                for kind in list(loads) if r % 2 == 0 else list(loads)[::-1]:
                    runs[kind].append(asyncio.run(run_load(url, model, n, c, args.max_tokens, extra=loads[kind])))
            for kind, figures in runs.items():
                show(f"{name} {kind}", c, {k: statistics.median(f[k] for f in figures) for k in figures[0]})
            ratios = [s["tok_s"] / f["tok_s"] for s, f in zip(runs["constrained"], runs["free"], strict=True)]
            ttft = [
                (s["ttft_p50"] - f["ttft_p50"]) * 1000 for s, f in zip(runs["constrained"], runs["free"], strict=True)
            ]
            out[c] = {"ratio": ratios, "ttft_ms": ttft}
    finally:
        proc.stop()
    return out


def compile_times(model_path: str, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds to get a matcher for a 50-property schema: cold (new text each time) and cached (same text)."""
    from mlx_lm import load

    from litestar_llm.engine.mlx_grammar import Grammars, constraint_of
    from litestar_llm.engine.types import SamplingParams

    _, tokenizer, config = load(model_path, return_config=True)
    grammars = Grammars(tokenizer._tokenizer, config["vocab_size"], list(tokenizer.eos_token_ids))
    cold, cached = [], []
    for i in range(repeats):
        constraint = constraint_of(SamplingParams(json_schema=object_schema(50, prefix=f"p{i}")))
        started = time.perf_counter()
        grammars.matcher(*constraint)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        grammars.matcher(*constraint)
        cached.append(time.perf_counter() - started)
    return cold, cached


def spread(values: list[float], unit: str = "", digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f}{unit} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("-c", "--concurrency", type=int, action="append", help="repeatable; default 16")
    parser.add_argument("-n", "--requests", type=int, help="requests per run (default 8 x concurrency, at least 32)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm", action="store_true", help="also our vllm backend (vLLM's xgrammar) on the model")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="for the vllm backend")
    parser.add_argument("--compile-repeats", type=int, default=10)
    args = parser.parse_args()
    unwind_on_sigterm()
    args.concurrency = args.concurrency or [16]
    engine_args = {k: _value(v) for k, _, v in (a.partition("=") for a in args.engine_arg)}

    results = {"mlx": compare("mlx", lambda: start_ours(args.model_path, "mlx"), args)}
    if args.vllm:
        results["vllm"] = compare("vllm", lambda: start_ours(args.model_path, "vllm", engine_args), args)
    cold, cached = compile_times(args.model_path, args.compile_repeats)

    print(f"\nconstrained (10-property schema) / free, median of {args.rounds} rounds [min, max]")
    for c in args.concurrency:
        for backend, by_c in results.items():
            r = by_c[c]
            print(f"{backend:<5} C={c:<3} tok/s {spread(r['ratio'], 'x')}   TTFT p50 {spread(r['ttft_ms'], ' ms', 1)}")
        if "vllm" in results:
            mlx, vllm = (statistics.median(results[b][c]["ratio"]) for b in ("mlx", "vllm"))
            print(f"      C={c:<3} MLX ratio / vLLM ratio: {mlx / vllm:.2f}")
    speedup = statistics.median(cold) / statistics.median(cached)
    print(f"\n50-property schema, llguidance, {args.compile_repeats} runs: cold {spread(cold, ' s', 4)}")
    print(f"{'':38}cached {spread(cached, ' s', 6)}   cold / cached {speedup:.0f}x")


if __name__ == "__main__":
    main()
