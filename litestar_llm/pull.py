"""`litestar-llm pull [MODEL...]` and the hub side of `litestar-llm check`: the declared Hugging Face models, as
the local cache has them.

server.toml is read without the full validation here: a hub model that is not downloaded yet is what `pull` is
for, and offline the validation would take its id for a missing folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from litestar_llm.config import _hub_shaped, _in_hub_cache, expand_env, read_toml
from litestar_llm.errors import ConfigError


def hub_models(path: Path) -> list[tuple[str, str]]:
    """(model name, repo id) of every declared model whose source is a Hugging Face repo id (not a folder, not a
    remote backend's model id)."""
    data = expand_env(read_toml(path))
    backends = data.get("backends") or {}
    out = []
    for model in data.get("models") or []:
        if not isinstance(model, dict) or not isinstance(model.get("source"), str):
            continue
        backend = backends.get(model.get("backend"), {})
        if isinstance(backend, dict) and backend.get("kind") == "openai":
            continue
        source = model["source"]
        if _hub_shaped(source, path.parent) or _in_hub_cache(source):
            out.append((str(model.get("name", source)), source))
    return out


def cached_folder(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    return Path(found).parent if isinstance(found, str) else None


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pull(path: Path, names: list[str]) -> int:
    """Download each declared hub model (all, or those named) with huggingface_hub's progress bars; print where it
    is and its size. 1 when any could not be downloaded."""
    from huggingface_hub import snapshot_download

    from litestar_llm.config import _hub_offline
    from litestar_llm.engine.registry import _size

    models = hub_models(path)
    known = {name for name, _ in models}
    for name in names:
        if name not in known:
            declared = ", ".join(sorted(known)) or "none"
            raise ConfigError("models", f"no Hugging Face model named {name!r} is declared (hub models: {declared})")
    failed = 0
    for name, repo in models:
        if names and name not in names:
            continue
        try:
            folder = Path(snapshot_download(repo))
        except Exception as exc:
            failed += 1
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if _hub_offline():
                why = f"HF_HUB_OFFLINE is set and it is not in the local cache ({why})"
            print(f"litestar-llm: model '{name}': cannot download {repo}: {why}", file=sys.stderr)
            continue
        print(f"model '{name}': {repo}, {_size(folder_size(folder))} at {folder}")
    return 1 if failed else 0


def missing_from_cache(path: Path) -> list[tuple[str, str]]:
    return [(name, repo) for name, repo in hub_models(path) if cached_folder(repo) is None]


def hub_repo(model, registry) -> bool:
    """Whether a declared model (a ModelConfig) comes from the Hugging Face hub: not a folder, not remote."""
    return registry.backend_kind(model.name) != "openai" and not Path(model.source).exists()


def download_snapshot(repo_id: str, progress, loop) -> Path:
    """snapshot_download on this thread, its progress (files done, files in all) put into the asyncio queue
    `progress` on `loop`. A failure is an EngineUnavailableError saying why."""
    from huggingface_hub import snapshot_download
    from tqdm.auto import tqdm

    from litestar_llm.config import _hub_offline
    from litestar_llm.errors import EngineUnavailableError

    class Reporting(tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            loop.call_soon_threadsafe(progress.put_nowait, (int(self.n), int(self.total or 0)))
            return out

    try:
        return Path(snapshot_download(repo_id, tqdm_class=Reporting))
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _hub_offline():
            why = f"HF_HUB_OFFLINE is set and it is not in the local cache ({why})"
        raise EngineUnavailableError(f"cannot download {repo_id}: {why}") from None
