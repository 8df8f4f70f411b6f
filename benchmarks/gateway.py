"""What a gateway costs: the same streaming load sent straight to an upstream and through a `kind = "openai"` gateway.

    python examples/make_tiny_model.py
    python benchmarks/gateway.py --model-path models/tiny -c 16 -c 64

The upstream is litestar-llm serving --model-path with MLX; the gateway is a second litestar-llm whose only backend is
`kind = "openai"` with that upstream as its one replica. The load generator is serving.py's (N streamed chat requests,
at most C in flight, `--max-tokens` tokens each at temperature 0). Direct and gateway runs alternate, `--rounds` of
each, so a shared machine's drifting load hits both alike; the median round is printed, then the ratio of output
tokens/s (target >= 0.95) and the TTFT p50 the hop adds (target < 2 ms).

Two ways of reading the hop's TTFT, because they answer different questions:
- under load, the difference of the two runs' TTFT p50. Once the upstream is saturated, TTFT is mostly its queue,
  and that swings by a few percent between runs of the same target (tens of ms at C=64 on a small CPU), more than
  the hop costs. The upstream's decode steps per run are printed: equal counts mean the gateway changed nothing
  in what the upstream did, and the TTFT difference is the upstream's own drift plus the hop.
- one request at a time, alternating direct and gateway (`--hop-requests` pairs), the median of the per-pair
  differences: the hop alone, with nothing queued. Prompts differ per request so the upstream's prefix cache
  favours neither.

The upstream is pinned to one half of the CPUs and the gateway to the other, as a gateway in front of GPU servers
runs beside them, not on them: otherwise every millisecond of the gateway's CPU is taken from the upstream and shows
up as upstream latency. The load generator may run on any CPU (pinned beside the gateway it delays the gateway's
wake-ups by up to a millisecond).
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
from serving import Process, free_port, one_request, run_load, show, start_ours


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
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)  # a new connection each, as run_load
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
    parser.add_argument("--rounds", type=int, default=3, help="runs of each target per concurrency")
    parser.add_argument("--hop-requests", type=int, default=200, help="direct/gateway pairs sent one at a time")
    args = parser.parse_args()
    levels = args.concurrency or [16, 64]

    # A child inherits its parent's CPUs: pin this process to each half in turn while starting that half's server.
    cpus = sorted(os.sched_getaffinity(0))
    halves = [set(cpus[: len(cpus) // 2]), set(cpus[len(cpus) // 2 :])] if len(cpus) > 1 else [set(cpus)] * 2
    print(f"upstream on CPUs {sorted(halves[0])}; gateway on CPUs {sorted(halves[1])}; load generator on any")
    os.sched_setaffinity(0, halves[0])
    upstream, upstream_url, model = start_ours(args.model_path)
    os.sched_setaffinity(0, halves[1])
    gateway = None
    try:
        gateway, gateway_url, _ = start_gateway(upstream_url, model)
        os.sched_setaffinity(0, cpus)
        targets = {"direct": upstream_url, "gateway": gateway_url}
        summary = []
        for c in levels:
            n = args.requests or max(8 * c, 32)
            rounds: dict[str, list[dict]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, url in targets.items():
                    before = decode_steps(upstream)
                    figures = asyncio.run(run_load(url, model, n, c, args.max_tokens))
                    rounds[name].append({**figures, "upstream_steps": decode_steps(upstream) - before})
            direct, through = median_round(rounds["direct"]), median_round(rounds["gateway"])
            for name, figures in (("direct", direct), ("gateway", through)):
                show(name, c, figures)
                print(f"{'':14} upstream decode steps per run: {[r['upstream_steps'] for r in rounds[name]]}")
            summary.append((c, direct, through))
        hop = asyncio.run(hop_latency(upstream_url, gateway_url, model, args.hop_requests))
        print(f"\ngateway / direct (median of {args.rounds} rounds; tok/s higher is better, TTFT lower is better)")
        for c, direct, through in summary:
            added = (through["ttft_p50"] - direct["ttft_p50"]) * 1000
            ratio = through["tok_s"] / direct["tok_s"]
            print(
                f"C={c:<3} tok/s {through['tok_s']:8.1f} / {direct['tok_s']:8.1f} = {ratio:.3f}x"
                f"   TTFT p50 {through['ttft_p50'] * 1000:6.1f} / {direct['ttft_p50'] * 1000:6.1f} ms"
                f"   added TTFT p50 {added:+.2f} ms"
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
