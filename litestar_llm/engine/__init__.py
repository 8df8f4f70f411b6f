"""The engine contract and the registry that maps model names to loaded engines."""

from litestar_llm.engine.base import Engine, ModelInfo, generate_choices
from litestar_llm.engine.registry import EngineRegistry, EngineRegistryPlugin
from litestar_llm.engine.types import ChatMessage, Delta, GenerationRequest, SamplingParams, Usage

__all__ = [
    "ChatMessage",
    "Delta",
    "Engine",
    "EngineRegistry",
    "EngineRegistryPlugin",
    "GenerationRequest",
    "ModelInfo",
    "SamplingParams",
    "Usage",
    "generate_choices",
]
