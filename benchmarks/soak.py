"""A soak run: steady load with bad requests and disconnects mixed in, watching memory and failures.

    python benchmarks/soak.py --model-path models/tiny --minutes 10 -c 8

C clients loop for the whole run. Each request is, by turns: a normal streamed chat (most of them), a bad request
in one of the dialects (a value out of range, a wrong type, a tool without a name, a body that is not JSON), or a
stream the client abandons after its first chunk. It prints, per minute, the server's resident memory (all its
processes) and the counts so far, then the growth from minute 1 to the last minute, the number of 5xx answers and
of requests that hung (no answer within --timeout seconds). The issue's bar: growth under 5 %, no 5xx, no hang.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serving import start_ours, unwind_on_sigterm

CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Tell me about paths."}], "max_tokens": 32}
BAD = [
    ("/v1/chat/completions", {**CHAT, "top_k": 10**9}),
    ("/v1/chat/completions", {**CHAT, "seed": -1, "temperature": 1}),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"description": "x"}}]}),
    ("/v1/chat/completions", {**CHAT, "stop": [f"s{i}" for i in range(500)]}),
    ("/v1/completions", {"model": "bench", "prompt": [10**9], "max_tokens": 4}),
    ("/v1/responses", {"model": "bench", "input": [{"type": "nope"}]}),
    ("/api/chat", {"model": "bench", "messages": CHAT["messages"], "options": {"min_p": 5}, "stream": False}),
    ("/api/generate", {"model": "bench", "prompt": "x", "options": {"repeat_penalty": -1}, "stream": False}),
    ("/v1/chat/completions", b"{not json"),
]
MIX = ["ok"] * 7 + ["bad"] * 2 + ["leave"]


def rss_bytes(pgid: int) -> int:
    """Resident memory of every process in the server's process group (granian's parent and its workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


async def client_loop(client: httpx.AsyncClient, deadline: float, counts: Counter, worker: int) -> None:
    bad = itertools.cycle(BAD[worker % len(BAD) :] + BAD[: worker % len(BAD)])
    for kind in itertools.cycle(MIX[worker % len(MIX) :] + MIX[: worker % len(MIX)]):
        if time.monotonic() > deadline:
            return
        try:
            if kind == "ok":
                async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
                    async for _ in response.aiter_lines():
                        pass
                    status = response.status_code
            elif kind == "leave":
                async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
                    status = response.status_code
                    async for _ in response.aiter_lines():
                        break  # the client goes away after the first chunk
            else:
                path, body = next(bad)
                kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
                status = (await client.post(path, **kwargs)).status_code
        except httpx.TimeoutException:
            counts["hung"] += 1
            continue
        counts[f"{status // 100}xx"] += 1
        counts[kind] += 1


async def soak(url: str, pgid: int, minutes: float, concurrency: int, timeout: float) -> int:
    counts: Counter = Counter()
    deadline = time.monotonic() + minutes * 60
    samples: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        workers = [asyncio.create_task(client_loop(client, deadline, counts, i)) for i in range(concurrency)]
        for minute in itertools.count(1):
            await asyncio.sleep(max(min(60.0, deadline - time.monotonic()), 0))
            samples.append(rss_bytes(pgid))
            print(f"minute {minute:>2}: RSS {samples[-1] / 2**20:8.1f} MiB  {dict(sorted(counts.items()))}", flush=True)
            if time.monotonic() >= deadline:
                break
        await asyncio.gather(*workers)
    growth = (samples[-1] - samples[0]) / samples[0] * 100
    print(
        f"\nRSS minute 1 {samples[0] / 2**20:.1f} MiB -> minute {len(samples)} {samples[-1] / 2**20:.1f} MiB: "
        f"{growth:+.2f} %   5xx: {counts['5xx']}   hung: {counts['hung']}   "
        f"requests: {sum(counts[k] for k in ('ok', 'bad', 'leave'))} ({counts['ok']} ok, {counts['bad']} bad, "
        f"{counts['leave']} abandoned)"
    )
    return 0 if growth < 5 and not counts["5xx"] and not counts["hung"] else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120, help="a request with no answer by then has hung")
    args = parser.parse_args()
    unwind_on_sigterm()
    proc, url, _ = start_ours(args.model_path)
    try:
        code = asyncio.run(
            soak(url.removesuffix("/v1"), os.getpgid(proc.proc.pid), args.minutes, args.concurrency, args.timeout)
        )
    finally:
        proc.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
