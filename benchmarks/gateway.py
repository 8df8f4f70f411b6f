"""What a gateway costs: the same streaming load sent straight to an upstream and through a `kind = "openai"` gateway.

    python examples/make_tiny_model.py
    python benchmarks/gateway.py --model-path models/tiny -c 16 -c 64

The upstream is litestar-llm serving --model-path with MLX, its batch as large as the largest C, so TTFT is prefill
and decode rather than seconds of queue; the gateway is a second litestar-llm whose only backend is `kind = "openai"`
with that upstream as its one replica. The load generator is serving.py's (N streamed chat requests, at most C in
flight, `--max-tokens` tokens each at temperature 0), its clients keeping their connections alive as SDK clients do:
a new connection per request is the load generator's own CPU, which on a small machine shares cores with the gateway.

Each round runs the load direct and through the gateway back to back, in alternating order, so a shared machine's
drift hits both alike; a round gives one ratio of output tokens/s (target >= 0.95) and one TTFT p50 difference
(target < 2 ms). Printed: the median round and the range over `--rounds` rounds. The upstream's decode steps per run
are printed too: equal counts mean the gateway changed nothing in what the upstream did.

Under load the TTFT difference moves in whole decode steps: a request that reaches the upstream just after a step
began waits for the next one, so p50 differences spread by tens of ms from round to round, either way. One request at
a time, alternating direct and gateway (`--hop-requests` pairs), the median of the per-pair differences is the hop
alone, with nothing queued. Prompts differ per request so the upstream's prefix cache favours neither.

The upstream is pinned to one half of the CPUs, where its compute keeps the cores busy, so the scheduler puts the
gateway and the load generator on the other half; they are not pinned, since a granian worker held to a single CPU
waits about a millisecond at each response start for its own I/O thread to get that CPU (measured on 2 cores: 0.9 ms
pinned, 0.04 ms not), which a gateway given more than one core never sees.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from serving import Process, free_port, one_request, run_load, show, start_ours, unwind_on_sigterm


def start_gateway(upstream_url: str, model: str) -> tuple[Process, str, str]:
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="bench-gateway-")) / "server.toml"
    config.write_text(
        f'[server]\nport = {port}\n[backends.fleet]\nkind = "openai"\nurls = ["{upstream_url}"]\n'
        f'[[models]]\nname = "{model}"\nbackend = "fleet"\nsource = "{model}"\n'
    )
    argv = [sys.executable, "-m", "litestar_llm", "serve", "--config", str(config)]
    return Process(argv, f"http://127.0.0.1:{port}/ready"), f"http://127.0.0.1:{port}/v1", model


def median_round(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def decode_steps(upstream: Process) -> int:
    models = httpx.get(upstream.ready_url, timeout=10).json()["models"]
    return sum(m.get("decode_steps", 0) for m in models.values())


async def hop_latency(direct_url: str, gateway_url: str, model: str, pairs: int) -> tuple[float, float, float]:
    """TTFT p50 direct, through the gateway, and the median per-pair difference (seconds), one request at a time."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)  # a new connection each, both targets alike
    direct, through = [], []
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for url in (direct_url, gateway_url) * 5:  # warm up
            await one_request(client, url, model, "warm up", 2)
        for i in range(pairs):
            direct.append((await one_request(client, direct_url, model, f"{2 * i} apples and pears", 2)).ttft)
            through.append((await one_request(client, gateway_url, model, f"{2 * i + 1} apples and pears", 2)).ttft)
    added = statistics.median(g - d for d, g in zip(direct, through, strict=True))
    return statistics.median(direct), statistics.median(through), added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="model folder the upstream serves")
    parser.add_argument("-c", "--concurrency", type=int, action="append", help="repeatable; default 16 and 64")
    parser.add_argument("-n", "--requests", type=int, help="requests per run (default 8 x concurrency, at least 32)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="direct/gateway run pairs per concurrency")
    parser.add_argument("--hop-requests", type=int, default=200, help="direct/gateway pairs sent one at a time")
    args = parser.parse_args()
    unwind_on_sigterm()
    levels = args.concurrency or [16, 64]

    # A child inherits its parent's CPUs: pin this process to one half while starting the upstream.
    cpus = sorted(os.sched_getaffinity(0))
    upstream_cpus = set(cpus[: max(1, len(cpus) // 2)])
    print(f"upstream on CPUs {sorted(upstream_cpus)}; gateway and load generator on any of {cpus}")
    os.sched_setaffinity(0, upstream_cpus)
    upstream, upstream_url, model = start_ours(args.model_path, backend_fields={"max_batch_size": max(levels)})
    os.sched_setaffinity(0, cpus)
    gateway = None
    try:
        gateway, gateway_url, _ = start_gateway(upstream_url, model)
        targets = {"direct": upstream_url, "gateway": gateway_url}
        summary = []
        for c in levels:
            n = args.requests or max(8 * c, 32)
            rounds: dict[str, list[dict]] = {name: [] for name in targets}
            for i in range(args.rounds):
                for name in list(targets)[:: 1 if i % 2 == 0 else -1]:
                    before = decode_steps(upstream)
                    figures = asyncio.run(run_load(targets[name], model, n, c, args.max_tokens, keep_alive=True))
                    rounds[name].append({**figures, "upstream_steps": decode_steps(upstream) - before})
            for name in targets:
                show(name, c, median_round(rounds[name]))
                print(f"{'':14} upstream decode steps per run: {[r['upstream_steps'] for r in rounds[name]]}")
            summary.append((c, rounds["direct"], rounds["gateway"]))
        hop = asyncio.run(hop_latency(upstream_url, gateway_url, model, args.hop_requests))
        print(f"\ngateway vs direct, per round (median [min, max] of {args.rounds} rounds)")
        for c, direct, through in summary:
            ratios = [g["tok_s"] / d["tok_s"] for d, g in zip(direct, through, strict=True)]
            added = [(g["ttft_p50"] - d["ttft_p50"]) * 1000 for d, g in zip(direct, through, strict=True)]
            print(
                f"C={c:<3} tok/s ratio {statistics.median(ratios):.3f}x [{min(ratios):.3f}, {max(ratios):.3f}]"
                f"   added TTFT p50 {statistics.median(added):+.2f} ms [{min(added):+.1f}, {max(added):+.1f}]"
            )
        print(
            f"one at a time ({args.hop_requests} pairs): TTFT p50 {hop[1] * 1000:.2f} / {hop[0] * 1000:.2f} ms"
            f"   added TTFT p50 (median of pair differences) {hop[2] * 1000:+.2f} ms"
        )
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
