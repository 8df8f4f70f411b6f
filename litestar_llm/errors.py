"""One exception root; each dialect maps these to its own error shape in one place."""

from __future__ import annotations


class LitestarLLMError(Exception):
    """Root of every error this package raises on purpose."""

    status_code = 500


class ConfigError(LitestarLLMError):
    """server.toml (or the environment layered over it) is invalid. `path` is the TOML path of the bad field."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class InvalidRequestError(LitestarLLMError):
    """The client sent something we cannot serve: a dialect answers 400 with `param` naming the field."""

    status_code = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        self.message = message
        self.param = param
        super().__init__(message)


class ModelNotFoundError(LitestarLLMError):
    status_code = 404

    def __init__(self, model: str) -> None:
        self.model = model
        self.message = f"The model '{model}' does not exist"
        super().__init__(self.message)


class EngineUnavailableError(LitestarLLMError):
    """The model's engine is not loaded or has stopped: 503, the client may retry later."""

    status_code = 503

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class ModelLoadError(LitestarLLMError):
    """A declared model could not be loaded: start-up stops with this one readable line."""

    def __init__(self, model: str, source: str, reason: str) -> None:
        self.message = f"model '{model}' could not be loaded from {source}: {reason}"
        super().__init__(self.message)


class MissingDependencyError(LitestarLLMError, ImportError):
    """An optional dependency is needed for a configured feature; the message names the extra to install."""

    def __init__(self, package: str, extra: str) -> None:
        self.message = f"'{package}' is not installed: pip install 'litestar-llm[{extra}]'"
        super().__init__(self.message)


class AuthenticationError(LitestarLLMError):
    """No API key, or one this server does not know: 401."""

    status_code = 401

    def __init__(self, message: str) -> None:
        self.message = message
        self.headers = {"WWW-Authenticate": "Bearer"}
        super().__init__(message)


class RateLimitError(LitestarLLMError):
    """A key's rate limit is reached: 429 with Retry-After and the x-ratelimit-* headers."""

    status_code = 429

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        self.message = message
        self.headers = headers
        super().__init__(message)


class StateUnavailableError(LitestarLLMError):
    """The shared state store (Redis) is unreachable and limits fail closed: 503, retry later."""

    status_code = 503

    def __init__(self, message: str) -> None:
        self.message = message
        self.headers = {"Retry-After": "1"}
        super().__init__(message)


class UpstreamError(LitestarLLMError):
    """A remote replica (an `openai` backend) refused the request: the client gets the upstream's own status and
    message, in its dialect's shape."""

    def __init__(
        self, status_code: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        self.status_code = status_code
        self.message = message
        self.headers = headers or {}
        self.param = param
        super().__init__(message)


class OverloadedError(LitestarLLMError):
    """A model's queue is full, or a request waited longer than its backend allows for a batch slot: 503 with
    Retry-After; the client may retry later. `reason` tells it apart from an engine that is down."""

    status_code = 503
    reason = "overload"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        self.message = message
        self.headers = {"Retry-After": str(retry_after_s)}
        super().__init__(message)
