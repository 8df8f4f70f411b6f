"""`litestar-llm pull` and `check` against a local Hugging Face cache folder (there is no network here): a cached
model is found and reported with its size and place, a missing one gets the offline error, and `check` names it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A Hugging Face cache folder holding `example/tiny` (a copy of the tiny model) at revision main."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--example--tiny"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    for path in tiny_model.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return cache


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    path = tmp_path_factory.mktemp("pull") / "server.toml"
    path.write_text(
        f"""
        [backends.local]
        kind = "mlx"
        [[models]]
        name = "local"
        backend = "local"
        source = "{tiny_model}"
        [[models]]
        name = "cached"
        backend = "local"
        source = "example/tiny"
        load = "on_demand"
        [[models]]
        name = "missing"
        backend = "local"
        source = "example/not-downloaded"
        load = "on_demand"
        """
    )
    return path


def cli(hub: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    return subprocess.run(
        [sys.executable, "-m", "litestar_llm", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_pull_reports_the_cached_model_and_the_offline_error(hub: Path, config: Path, tiny_model: Path) -> None:
    done = cli(hub, config, "pull")
    snapshot = next((hub / "models--example--tiny" / "snapshots").iterdir())
    size = sum(p.stat().st_size for p in tiny_model.iterdir()) / 2**20
    assert f"model 'cached': example/tiny, {size:.1f} MB at {snapshot}" in done.stdout
    assert done.returncode == 1
    assert (
        "litestar-llm: model 'missing': cannot download example/not-downloaded: HF_HUB_OFFLINE is set and it is "
        "not in the local cache" in done.stderr
    )
    assert "'local'" not in done.stdout + done.stderr  # a folder is not pulled

    one = cli(hub, config, "pull", "cached")
    assert one.returncode == 0 and "model 'cached'" in one.stdout and "missing" not in one.stderr

    unknown = cli(hub, config, "pull", "nope")
    assert unknown.returncode == 2 and "no Hugging Face model named 'nope' is declared" in unknown.stderr


def test_check_names_the_hub_models_missing_from_the_cache(hub: Path, config: Path) -> None:
    checked = cli(hub, config, "check")
    assert checked.returncode == 0, checked.stderr
    assert (
        "# model 'missing': example/not-downloaded is not in the local Hugging Face cache: litestar-llm pull missing"
        in checked.stderr
    )
    assert "'cached'" not in checked.stderr


def test_api_pull_streams_and_serves_a_cached_hub_model(start_server, hub: Path, config: Path) -> None:
    import json

    import httpx

    toml = config.read_text().replace("[backends.local]", "[routes]\nollama = true\n[backends.local]")
    server = start_server(toml, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)})
    try:
        pulled = httpx.post(f"{server.url}/api/pull", json={"model": "cached"}, timeout=60)
        lines = [json.loads(line) for line in pulled.text.splitlines()]
        assert pulled.headers["content-type"].startswith("application/x-ndjson") and lines[-1] == {"status": "success"}
        answer = httpx.post(
            f"{server.url}/api/generate",
            json={"model": "cached", "prompt": "Once", "stream": False, "options": {"num_predict": 3}},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["eval_count"] == 3  # loaded on demand from the cache
        missing = httpx.post(f"{server.url}/api/pull", json={"model": "missing", "stream": False}, timeout=60)
        assert missing.status_code == 503
        assert "cannot download example/not-downloaded: HF_HUB_OFFLINE is set" in missing.json()["error"]
        streamed = httpx.post(f"{server.url}/api/pull", json={"model": "missing"}, timeout=60)
        assert "HF_HUB_OFFLINE is set" in json.loads(streamed.text.splitlines()[-1])["error"]
        assert httpx.post(f"{server.url}/api/pull", json={"model": "nope"}).status_code == 404
    finally:
        server.stop()
