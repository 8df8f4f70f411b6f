"""The `agent_model` fixture: the tiny llama of examples/make_agent_model.py that really calls tools and thinks.

Training it takes minutes, so it is built once per version of the scripts that make it and kept between test runs
in `~/.cache/litestar-llm-tests/agent-model-<sha>` ($LITESTAR_LLM_TEST_CACHE or $XDG_CACHE_HOME move the folder).
A build goes to a temporary folder renamed into place only once verified: a killed build leaves no half model.
Use it from conftest.py with

    from agent_fixtures import agent_model  # noqa: F401
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "examples" / "make_agent_model.py", ROOT / "examples" / "make_tiny_model.py"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # examples/ is a folder of scripts, importable from the repository root


def agent_model_path() -> Path:
    """Where the model for the current sources lives: a new folder whenever either script changes."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES)).hexdigest()[:16]
    root = os.environ.get("LITESTAR_LLM_TEST_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "litestar-llm-tests"
    return Path(root) / f"agent-model-{digest}"


@pytest.fixture(scope="session")
def agent_model() -> Path:
    """The model folder (Hugging Face layout, loads with mlx-lm and vLLM), built on first use."""
    pytest.importorskip("mlx_lm")
    from examples.make_agent_model import make_agent_model

    return make_agent_model(agent_model_path())
