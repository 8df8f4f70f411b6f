"""The server as a process: deployment plugins, graceful shutdown, models that cannot load."""

from __future__ import annotations

import json
import signal
import threading

import httpx
from conftest import ROOT, model_toml


def test_audit_plugin_from_plugins_folder_loads_and_logs(start_server, tiny_model, tmp_path) -> None:
    audit = tmp_path / "audit.jsonl"
    server = start_server(
        f"""
        [server]
        plugins = ["plugins.audit:AuditPlugin"]
        [backends.local]
        kind = "mlx"
        {model_toml(tiny_model)}
        """,
        env={"PYTHONPATH": str(ROOT), "AUDIT_LOG_FILE": str(audit)},
    )
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
    missing = httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "a"})
    assert (ok.status_code, missing.status_code) == (200, 404)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["path"], line["status"]) for line in lines] == [("/v1/completions", 200), ("/v1/completions", 404)]
    assert all(line["duration_ms"] > 0 and "prompt" not in line for line in lines)


def test_sigterm_drains_in_flight_streams_and_exits_0(start_server, tiny_model) -> None:
    server = start_server(f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}')
    body = {"model": "tiny", "prompt": "The", "max_tokens": 400, "temperature": 0, "stream": True}
    events: list[str] = []
    started = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30)
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    reader.join(30)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"  # the whole answer arrived, not a cut-off stream


def test_model_that_cannot_load_stops_with_one_readable_line(start_server) -> None:
    server = start_server(
        '[backends.local]\nkind = "mlx"\n[[models]]\nname = "x"\nbackend = "local"\nsource = "someorg/not-cached"\n',
        env={"HF_HUB_OFFLINE": "1"},
        wait=False,
    )
    assert server.process.wait(60) != 0
    log = server.log.read_text()
    assert "model 'x' could not be loaded from someorg/not-cached: not a local folder" in log
    assert "Traceback" not in log


def test_health_and_ready(server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json()["models"]["tiny"]["ready"] is True
