"""Facts read from a model folder (Hugging Face layout), for any backend that loads one."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from math import prod
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz")


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def parameter_count(folder: Path) -> int | None:
    """From the safetensors headers: exact, without reading the weights."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            total += sum(prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118 - not iterable
    return total or None


@lru_cache(maxsize=64)
def weights_digest(folder: str, mtime: float) -> str:
    """sha256 over the weight files in name order: changes exactly when the weights change. Slow for big
    models, so callers run it off the event loop and it is cached per (folder, mtime)."""
    digest = hashlib.sha256()
    for path in folder_files(Path(folder)):
        if path.suffix in WEIGHT_SUFFIXES:
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def human_count(n: int | None) -> str:
    """3_700_000 → '3.7M', as Ollama writes parameter sizes."""
    if not n:
        return ""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)
