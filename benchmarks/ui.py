"""What the status page costs: its weight, what /ui/status serves, and serving throughput with the page open vs closed.

    python examples/make_tiny_model.py
    python benchmarks/ui.py --model-path models/tiny -c 16 --rounds 3

- Page weight: the bytes of a cold load of /ui (the page, every file it names, its first /ui/status answer), beside
  /docs (Swagger UI and the OpenAPI document) for scale.
- /ui/status requests/s under `--status-concurrency` clients for `--seconds`, beside /ready (the JSON status that
  was there before) on the same server, alternating.
- Throughput with the page open vs closed: the streaming chat load of benchmarks/serving.py (C requests in flight,
  `--max-tokens` each) with and without a poller doing what an open page does (GET /ui/status every 2 s; `--pages`
  of them), alternating round by round; each figure the median round [min, max]. Target: open within 2% of closed.
- `--ui-off`: the same load on a server with `[routes] ui = false` (no in-memory metric reader at all) and on one
  with it on, alternating.
Beside each throughput, the server's CPU time per output token (all its processes, from /proc): on a shared machine
it varies less than wall-clock figures do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import Process, cpu_seconds, free_port, run_load, unwind_on_sigterm

POLL_S = 2.0
"""The page's own polling interval (ui.js POLL_MS)."""


def start(model_path: str, ui: bool = True) -> tuple[Process, str]:
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="bench-ui-")) / "server.toml"
    config.write_text(
        f"[server]\nport = {port}\naccess_log = false\n[routes]\nui = {'true' if ui else 'false'}\n"
        f'[backends.local]\nkind = "mlx"\n[[models]]\nname = "bench"\nbackend = "local"\n'
        f'source = "{Path(model_path).resolve()}"\n'
    )
    argv = [sys.executable, "-m", "litestar_llm", "serve", "--config", str(config)]
    return Process(argv, f"http://127.0.0.1:{port}/ready"), f"http://127.0.0.1:{port}"


def cold_load(base: str, page: str) -> tuple[int, int]:
    """(bytes, requests) of a cold load: the page, the stylesheets and scripts it names, and what they fetch first
    (/ui/status for the status page). Bytes are bodies plus status line and headers, as they cross the wire."""
    with httpx.Client(base_url=base, timeout=30) as client:
        first = client.get(page)
        urls = re.findall(r'<(?:link[^>]+href|script[^>]+src)="(/[^"]+)"', first.text)
        responses = [first, *(client.get(url) for url in urls)]
        if page == "/ui":
            responses.append(client.get("/ui/status"))
    total = 0
    for response in responses:
        assert response.status_code == 200, (response.url, response.status_code)
        head = 17 + sum(len(k) + len(v) + 4 for k, v in response.headers.raw)
        total += head + len(response.content)
    return total, len(responses)


async def hammer(url: str, concurrency: int, seconds: float) -> float:
    """GET url from `concurrency` clients for `seconds`: requests/s."""
    done = 0
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await client.get(url)
                assert response.status_code == 200, response.text
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def load_with_pages(base: str, pages: int, args: argparse.Namespace) -> tuple[dict, int]:
    """The chat load; meanwhile `pages` pollers each GET /ui/status every POLL_S (none: the page is closed)."""
    polls = 0
    stop = asyncio.Event()

    async def page(client: httpx.AsyncClient, offset: float) -> None:
        nonlocal polls
        await asyncio.sleep(offset)
        while not stop.is_set():
            assert (await client.get("/ui/status")).status_code == 200
            polls += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        pollers = [asyncio.create_task(page(client, i * POLL_S / max(pages, 1))) for i in range(pages)]
        started = time.perf_counter()
        figures = await run_load(f"{base}/v1", "bench", args.requests, args.concurrency, args.max_tokens)
        figures["wall_s"] = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*pollers)
    return figures, polls


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("-n", "--requests", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pages", type=int, default=1, help="open pages polling /ui/status (default 1)")
    parser.add_argument("--status-concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ui-off", action="store_true", help="also a server with [routes] ui = false")
    args = parser.parse_args()
    unwind_on_sigterm()
    args.requests = args.requests or max(8 * args.concurrency, 32)
    sys.stdout.reconfigure(line_buffering=True)  # figures as they come, even if a later part is cut short

    server, base = start(args.model_path)
    try:
        page, page_requests = cold_load(base, "/ui")
        docs, docs_requests = cold_load(base, "/docs")
        print(f"cold load /ui: {page / 1024:.1f} KiB in {page_requests} requests;", end=" ")
        print(f"/docs: {docs / 1024:.1f} KiB in {docs_requests} requests; ratio {page / docs:.3f}x")

        status, ready, status_ms, ready_ms = [], [], [], []
        for _ in range(args.rounds):
            for url, rates, costs in ((f"{base}/ui/status", status, status_ms), (f"{base}/ready", ready, ready_ms)):
                before = cpu_seconds(server.proc.pid)
                rates.append(asyncio.run(hammer(url, args.status_concurrency, args.seconds)))
                costs.append(1000 * (cpu_seconds(server.proc.pid) - before) / (rates[-1] * args.seconds))
        ratios = [s / r for s, r in zip(status, ready, strict=True)]
        print(f"GET /ui/status req/s {spread(status)}  vs /ready {spread(ready)}  ratio {spread(ratios)}")
        print(f"server CPU ms per answer: /ui/status {spread(status_ms)}  /ready {spread(ready_ms)}")

        asyncio.run(load_with_pages(base, 0, args))  # warm-up: the first load after start-up pays for compiling
        closed, opened, ratios, polls = [], [], [], 0
        cpu: dict[int, list[float]] = {0: [], args.pages: []}
        for i in range(args.rounds):
            order = (0, args.pages) if i % 2 == 0 else (args.pages, 0)
            figures = {}
            for pages in order:
                before = cpu_seconds(server.proc.pid)
                figures[pages], count = asyncio.run(load_with_pages(base, pages, args))
                tokens = figures[pages]["tok_s"] * figures[pages]["wall_s"]
                cpu[pages].append(1000 * (cpu_seconds(server.proc.pid) - before) / tokens)
                polls += count
            closed.append(figures[0]["tok_s"])
            opened.append(figures[args.pages]["tok_s"])
            ratios.append(opened[-1] / closed[-1])
        print(
            f"C={args.concurrency} output tok/s: page closed {spread(closed)}  {args.pages} page(s) open "
            f"{spread(opened)} ({polls} polls)  open/closed {spread(ratios)}"
        )
        cpu_ratios = [o / c for o, c in zip(cpu[args.pages], cpu[0], strict=True)]
        print(
            f"server CPU ms per output token: page closed {spread(cpu[0])}  open {spread(cpu[args.pages])}  "
            f"open/closed {spread(cpu_ratios)}"
        )
    finally:
        server.stop()

    if args.ui_off:
        off_server, off_base = start(args.model_path, ui=False)
        on_server, on_base = start(args.model_path, ui=True)
        try:
            for target in (on_base, off_base):
                asyncio.run(load_with_pages(target, 0, args))  # warm-up
            on, off, ratios, on_cpu, off_cpu = [], [], [], [], []
            for i in range(args.rounds):
                runs = ((on_server, on_base, on, on_cpu), (off_server, off_base, off, off_cpu))
                for process, target, rates, costs in runs if i % 2 == 0 else runs[::-1]:
                    before = cpu_seconds(process.proc.pid)
                    figures = asyncio.run(load_with_pages(target, 0, args))[0]
                    rates.append(figures["tok_s"])
                    tokens = figures["tok_s"] * figures["wall_s"]
                    costs.append(1000 * (cpu_seconds(process.proc.pid) - before) / tokens)
                ratios.append(on[-1] / off[-1])
            print(f"C={args.concurrency} output tok/s: ui on {spread(on)}  off {spread(off)}  on/off {spread(ratios)}")
            cpu_ratios = [a / b for a, b in zip(on_cpu, off_cpu, strict=True)]
            print(
                f"server CPU ms per output token: ui on {spread(on_cpu)}  off {spread(off_cpu)}  "
                f"on/off {spread(cpu_ratios)}"
            )
        finally:
            off_server.stop()
            on_server.stop()


if __name__ == "__main__":
    main()
