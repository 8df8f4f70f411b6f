"""Who is calling, for the length of one request: set by the auth plugin, read by the registry (model scopes) and
by `generate_choices` (token budgets, concurrent streams). Dialects and backends never see it."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from litestar_llm.limits import KeyLimits


class Caller:
    """The API key behind a request. `models` is the key's scope (canonical model names); None means every model.
    `limits` is None for keys without a [rate_limits] policy."""

    __slots__ = ("limits", "models", "name")

    def __init__(self, name: str, models: frozenset[str] | None = None, limits: KeyLimits | None = None) -> None:
        self.name, self.models, self.limits = name, models, limits

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


current_caller: ContextVar[Caller | None] = ContextVar("litestar_llm_caller", default=None)
