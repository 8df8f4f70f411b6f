"""server.toml validation: every mistake names its TOML path and stops start-up before any port is bound."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from litestar_llm.config import Settings
from litestar_llm.errors import ConfigError
from litestar_llm.settings import load_settings

BACKEND = '[backends.local]\nkind = "mlx"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def model(source: str = "./m", **extra: str) -> str:
    lines = ['name = "tiny"', 'backend = "local"', f'source = "{source}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "[[models]]\n" + "\n".join(lines) + "\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    return tmp_path


BAD_CONFIGS = [
    ("unknown top-level table", "[srever]\nport = 1\n" + BACKEND + model(), "srever: unknown field"),
    ("unknown server key", "[server]\nprot = 1\n" + BACKEND + model(), "server.prot: unknown field; did you mean port?"),
    ("top-level typo", "[srever]\nport = 1\n" + BACKEND + model(), "srever: unknown field; did you mean server?"),
    ("backend key typo", BACKEND + "max_batch = 4\n" + model(), "backends.local.max_batch: unknown field; did you mean max_batch_size?"),
    ("remote key typo", '[backends.local]\nkind = "openai"\nurls = ["http://h/v1"]\ncooldown = 1\n' + model(), "backends.local.cooldown: unknown field; did you mean cooldown_s?"),
    ("default typo", BACKEND + model() + "[models.defaults]\ntemprature = 1\n", "models[0].defaults.temprature: unknown field; did you mean temperature?"),
    ("nothing close", "[server]\nzzzzzz = 1\n" + BACKEND + model(), "server.zzzzzz: unknown field"),
    ("host not an ip", '[server]\nhost = "localhost"\n' + BACKEND + model(), "server: host must be an IP address (127.0.0.1, 0.0.0.0, ::), got 'localhost'"),
    ("negative drain", "[server]\ndrain_timeout_s = -1\n" + BACKEND + model(), "server.drain_timeout_s: expected float >= 0"),
    ("zero body timeout", "[server]\nbody_read_timeout_s = 0\n" + BACKEND + model(), "server.body_read_timeout_s: expected float > 0"),
    ("port out of range", "[server]\nport = 70000\n" + BACKEND + model(), "server.port: expected int <= 65535"),
    ("port wrong type", '[server]\nport = "x"\n' + BACKEND + model(), "server.port: expected int, got str"),
    ("workers zero", "[server]\nworkers = 0\n" + BACKEND + model(), "server.workers: expected int >= 1"),
    ("bad log level", '[server]\nlog_level = "loud"\n' + BACKEND + model(), "server.log_level"),
    ("unknown backend kind", '[backends.local]\nkind = "tpu"\n' + model(), "backends.local.kind: unknown kind 'tpu'"),
    ("backend without kind", "[backends.local]\nmax_batch_size = 4\n" + model(), "backends.local.kind: required field is missing"),
    ("unknown backend key", BACKEND + "batch = 4\n" + model(), "backends.local.batch: unknown field"),
    ("undeclared backend", BACKEND + model().replace('"local"', '"gpu"'), "models[0].backend: no backend 'gpu' (declared: local)"),
    ("missing source", BACKEND + '[[models]]\nname = "a"\nbackend = "local"\n', "models[0].source: required field is missing"),
    ("missing folder", BACKEND + model("./nowhere"), "models[0].source: no model folder at"),
    ("duplicate name", BACKEND + model() + model(), "models[1].name: 'tiny' is already used by models[0]"),
    ("alias clash", BACKEND + model(aliases='["x"]') + model(aliases='["x"]').replace('"tiny"', '"other"'), "models[1].aliases[0]: 'x' is already used"),
    ("bad default", BACKEND + model() + "[models.defaults]\ntemperature = 5\n", "models[0].defaults.temperature: expected float <= 2.0"),
    ("unknown default", BACKEND + model() + "[models.defaults]\ntemprature = 1\n", "models[0].defaults.temprature: unknown field"),
    ("no models", BACKEND, "models: no [[models]] declared"),
    ("missing variable", '[server]\nhost = "${LLM_TEST_UNSET_HOST}"\n' + BACKEND + model(), "server.host: environment variable LLM_TEST_UNSET_HOST is not set"),
    ("not toml", "[server\n", "is not valid TOML"),
    ("key without secret", BACKEND + model() + '[[auth.keys]]\nname = "a"\n', "auth.keys[0]: give exactly one of key or key_sha256"),
    ("bad key hash", BACKEND + model() + '[[auth.keys]]\nname = "a"\nkey_sha256 = "abc"\n', "auth.keys[0]: key_sha256 must be 64 lowercase hex digits"),
    ("duplicate key name", BACKEND + model() + '[[auth.keys]]\nname = "a"\nkey = "1"\n[[auth.keys]]\nname = "a"\nkey = "2"\n', "auth.keys[1].name: 'a' is already used by auth.keys[0]"),
    ("undeclared policy", BACKEND + model() + '[[auth.keys]]\nname = "a"\nkey = "k"\nrate_limit = "gold"\n', "auth.keys[0].rate_limit: no policy 'gold' (declared: none)"),
    ("scope names unknown model", BACKEND + model() + '[[auth.keys]]\nname = "a"\nkey = "k"\nmodels = ["big"]\n', "auth.keys[0].models[0]: no model 'big' (declared: tiny)"),
    ("zero rate", BACKEND + model() + "[rate_limits.std]\nrequests_per_minute = 0\n", "rate_limits.std.requests_per_minute: expected int >= 1"),
    ("unknown policy key", BACKEND + model() + "[rate_limits.std]\nrpm = 5\n", "rate_limits.std.rpm: unknown field"),
    ("bad state url", BACKEND + model() + '[state]\nurl = "postgres://db"\n', "state: expected memory:// or redis://"),
    ("sample ratio", BACKEND + model() + "[telemetry]\nsample_ratio = 2.0\n", "telemetry.sample_ratio: expected float <= 1.0"),
    ("pooling on a generation model", BACKEND + model(pooling='"mean"'), "models[0].pooling: only for an embedding model"),
    ("unknown task", BACKEND + model(task='"rerank"'), "models[0].task"),
    ("unknown pooling", BACKEND + model(task='"embed"', pooling='"max"'), "models[0].pooling"),
    ("remote pooling", '[backends.local]\nkind = "openai"\nurls = ["http://h/v1"]\n' + model(task='"embed"', normalize="true"), "models[0].normalize: an openai backend's upstream pools"),
    ("vllm with workers", '[server]\nworkers = 2\n[backends.local]\nkind = "vllm"\n' + model(), "server.workers: must be 1 with a vllm backend"),
    ("bad keep_alive", BACKEND + model(keep_alive='"soon"'), 'models[0]: keep_alive: expected a duration such as "5m"'),
    ("bad backend keep_alive", BACKEND + 'keep_alive = "5x"\n' + model(), "backends.local: keep_alive: expected a duration"),
    ("pin and keep_alive", BACKEND + model(pin="true", keep_alive='"5m"'), "models[0]: a pinned model stays loaded"),
    ("bad load", BACKEND + model(load='"lazy"'), "models[0].load: invalid enum value 'lazy'"),
    ("bad budget", "[server]\nmemory_budget = \"lots\"\n" + BACKEND + model(), 'server: memory_budget: expected a size such as "24GiB"'),
    ("too many at start-up", "[server]\nmax_loaded_models = 1\n" + BACKEND + model() + model().replace('"tiny"', '"two"'), "server.max_loaded_models: 1 is fewer than the 2 models loaded at start-up"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "toml", "message"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_toml_path(folder: Path, case: str, toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(write(folder, toml))
    assert message in str(error.value)


def test_good_config_resolves(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_TEST_HOST", "0.0.0.0")
    toml = '[server]\nhost = "${LLM_TEST_HOST}"\nport = "${LLM_TEST_PORT:-9001}"\n' + BACKEND + model(aliases='["t"]')
    with pytest.raises(ConfigError, match=r"server\.port: expected int, got str"):
        load_settings(write(folder, toml))  # expansion gives strings; a port must be written as a number
    settings = load_settings(write(folder, toml.replace('port = "${LLM_TEST_PORT:-9001}"', "port = 9001")))
    assert isinstance(settings, Settings)
    assert settings.server.host == "0.0.0.0" and settings.server.port == 9001
    assert settings.models[0].source == str((folder / "m").resolve())  # relative to server.toml, not the cwd
    assert settings.backends["local"].kind == "mlx"


def test_hub_ids_are_not_folders(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the hub may be asked: an uncached org/name is a repo id
    settings = load_settings(write(folder, BACKEND + model("mlx-community/Llama-3.2-1B-Instruct-4bit")))
    assert settings.models[0].source == "mlx-community/Llama-3.2-1B-Instruct-4bit"


def test_a_relative_path_that_is_missing_is_a_config_error_not_a_hub_lookup(folder: Path) -> None:
    """`models/tiny` beside a `models/` folder is a model folder that is not there, whatever the hub has."""
    (folder / "models").mkdir()
    with pytest.raises(ConfigError) as error:
        load_settings(write(folder, BACKEND + model("models/tiny")))
    message = str(error.value)
    assert f"models[0].source: no model folder at {(folder / 'models' / 'tiny').resolve()}" in message
    assert "a folder 'models' exists beside server.toml" in message and "./models/tiny" in message


def test_an_uncached_repo_id_while_offline_is_a_config_error(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        load_settings(write(folder, BACKEND + model("someorg/not-cached")))
    assert f"no model folder at {(folder / 'someorg' / 'not-cached').resolve()}" in str(error.value)
    assert "not in the hub cache and HF_HUB_OFFLINE is set" in str(error.value)


def test_a_cached_repo_id_stays_a_repo_id_offline(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    cache = folder / "hub"
    snapshot = cache / "models--someorg--cached" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--someorg--cached" / "refs").mkdir()
    (cache / "models--someorg--cached" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (folder / "someorg").mkdir()  # even beside a folder of the org's name: the cache decides first
    settings = load_settings(write(folder, BACKEND + model("someorg/cached")))
    assert settings.models[0].source == "someorg/cached"


def test_server_hardening_defaults(folder: Path) -> None:
    server = load_settings(write(folder, BACKEND + model())).server
    assert (server.drain_timeout_s, server.access_log, server.backpressure) == (30.0, True, 4096)
    assert (server.header_read_timeout_s, server.body_read_timeout_s) == (30.0, 60.0)


def test_environment_and_flags_override_the_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(folder, "[server]\nport = 8000\nworkers = 1\n" + BACKEND + model())
    monkeypatch.setenv("LITESTAR_LLM_CONFIG", str(path))
    monkeypatch.setenv("LITESTAR_LLM_PORT", "8100")
    monkeypatch.setenv("LITESTAR_LLM_WORKERS", "3")
    settings = load_settings()
    assert (settings.server.port, settings.server.workers) == (8100, 3)
    assert load_settings(port=8200).server.port == 8200  # a flag beats the environment
    monkeypatch.setenv("LITESTAR_LLM_PORT", "eighty")
    with pytest.raises(ConfigError, match="environment LITESTAR_LLM_PORT"):
        load_settings()
    monkeypatch.setenv("LITESTAR_LLM_PORT", "0")
    monkeypatch.setenv("LITESTAR_LLM_WORKERS", "0")
    with pytest.raises(ConfigError, match=r"server\.workers: expected int >= 1"):
        load_settings()


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "litestar_llm", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_serve_with_bad_config_exits_2_before_binding(folder: Path) -> None:
    path = write(folder, BACKEND + model().replace('"local"', '"gpu"'))
    port = free_port()
    result = _cli("serve", "--config", str(path), "--port", str(port), cwd=folder)
    assert result.returncode == 2
    assert "models[0].backend: no backend 'gpu' (declared: local)" in result.stderr
    assert "Traceback" not in result.stderr
    with socket.socket() as s:  # nothing was listening: the port is still free to bind
        s.bind(("127.0.0.1", port))


def test_bad_plugin_path_is_a_config_error(folder: Path) -> None:
    path = write(folder, '[server]\nplugins = ["plugins.nothing:Nope"]\n' + BACKEND + model())
    result = _cli("check", "--config", str(path), cwd=folder)
    assert result.returncode == 2
    assert "server.plugins[0]: cannot import 'plugins.nothing'" in result.stderr


def test_check_prints_resolved_config_with_secrets_masked(folder: Path) -> None:
    toml = '[server]\nhost = "${LLM_TEST_SECRET_HOST}"\n' + BACKEND + model()
    path = write(folder, toml)
    result = _cli("check", "--config", str(path), cwd=folder, env={"LLM_TEST_SECRET_HOST": "127.0.0.2"})
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["server"]["host"] == "127.0.0.2"
    assert resolved["server"]["workers"] == 1  # defaults are shown, not only what the file says
    assert resolved["models"][0]["source"] == str((folder / "m").resolve())


def test_masking_hides_secret_fields_and_url_passwords() -> None:
    from litestar_llm.config import masked

    out = masked({"auth": {"keys": [{"name": "a", "key": "sk-123"}]}, "state": {"url": "redis://:hunter2@h:6379/0"}})
    assert out["auth"]["keys"][0] == {"name": "a", "key": "****"}
    assert out["state"]["url"] == "redis://:****@h:6379/0"


def test_version() -> None:
    from litestar_llm import __version__

    result = _cli("--version", cwd=Path.cwd())
    assert result.returncode == 0 and result.stdout.strip() == f"litestar-llm {__version__}"
