"""Model name → engine. Loads every declared model, counts the generations in flight, and ends them at shutdown.

Under the server (`litestar-llm serve`) the models load in the background: the lifespan returns at once, so the
port answers (`/health` 200) while `/ready` says 503 and a request for a model still loading answers 503 with
Retry-After. In-process use (`create_app(settings)` under a TestClient) keeps the simple order: the lifespan waits
until every model is loaded and raises the first `ModelLoadError`.

Handlers get each engine wrapped in a `ServedEngine`, so that whatever the backend, and even when a backend's own
thread never answers, a shutdown can end every generation in flight with `EngineUnavailableError("server is
shutting down")`: the dialect turns that into its error event (or a 503 when nothing was sent yet).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.plugins import InitPlugin

from litestar_llm.caller import current_caller
from litestar_llm.config import ModelConfig, Settings
from litestar_llm.engine.base import Engine, ModelInfo
from litestar_llm.engine.types import Delta, EmbeddingRequest, Embeddings, GenerationRequest
from litestar_llm.errors import EngineUnavailableError, ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)

# Backend kind → engine class, imported only when a model uses it (mlx-lm, vllm, aiohttp are optional installs).
ENGINE_CLASSES = {
    "mlx": "litestar_llm.engine.mlx:MLXEngine",
    "vllm": "litestar_llm.engine.vllm:VLLMEngine",
    "openai": "litestar_llm.engine.remote:RemoteEngine",
}

SHUTTING_DOWN = "server is shutting down"
RETRY_AFTER_LOADING_S = 5
"""Retry-After on a 503 for a model that is still loading."""
CLOSE_TIMEOUT_S = 30.0
"""How long engines get to stop at shutdown, once their generations have finished."""
ABORTED_CLOSE_TIMEOUT_S = 5.0
"""The same, once their generations were ended (a second signal, or drain_timeout_s): the operator wants out."""

RUN_DIR_ENV = "LITESTAR_LLM_RUN_DIR"
"""Set by `litestar-llm serve` for its granian workers: a folder private to one server, through which the workers
and the CLI (cli.py) talk. A worker whose models are all loaded creates `loaded.<pid>`; one whose model cannot load
writes the one line to print to `failed`; the CLI writes `drain` (first SIGINT/SIGTERM) and then `now` (second
signal, or drain_timeout_s) to `shutdown`."""
POLL_S = 0.1

TEST_LOAD_GATE_ENV = "LITESTAR_LLM_TEST_LOAD_GATE"
"""Test hook: a path; every model waits for that file to exist before it starts loading, so a test holds the server
in its loading state for as long as it needs, with no timing involved."""


def engine_class(kind: str) -> type[Engine]:
    module, _, name = ENGINE_CLASSES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def unavailable(message: str, retry_after_s: int | None = None) -> EngineUnavailableError:
    exc = EngineUnavailableError(message)
    if retry_after_s is not None:
        exc.headers = {"Retry-After": str(retry_after_s)}
    return exc


class _Live:
    """One generation in flight: the task awaiting its next delta (None between deltas), and whether it was ended."""

    __slots__ = ("ended", "task")

    def __init__(self) -> None:
        self.ended = False
        self.task: asyncio.Task | None = None


class ServedEngine(Engine):
    """An engine as the registry hands it out. Everything is the backend's own, except that each generation is
    counted while in flight and can be ended by `EngineRegistry.abort()`. Per delta that costs one
    `current_task()` and two attribute writes."""

    def __init__(self, engine: Engine, registry: EngineRegistry) -> None:
        self.engine = engine
        self._registry = registry

    @property
    def info(self) -> ModelInfo:  # engines replace their ModelInfo once loaded: always read it through
        return self.engine.info

    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    @property
    def ready(self) -> bool:
        return self.engine.ready

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        return await self.engine.count_prompt_tokens(request)

    async def count_input_tokens(self, request: EmbeddingRequest) -> int | None:
        return await self.engine.count_input_tokens(request)

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """The backend's own, counted in flight like a generation and ended the same way by `abort()`."""
        live = self._registry._admit()
        live.task = asyncio.current_task()
        try:
            return await self.engine.embed(request)
        except asyncio.CancelledError:
            if not live.ended:
                raise
            asyncio.current_task().uncancel()
            raise unavailable(SHUTTING_DOWN) from None
        finally:
            live.task = None
            self._registry._live.discard(live)

    def __getattr__(self, name: str) -> Any:  # a backend's own extras
        if name == "engine":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        live = self._registry._admit()
        inner = aiter(self.engine.generate(request))
        try:
            while True:
                if live.ended:
                    raise unavailable(SHUTTING_DOWN)
                live.task = asyncio.current_task()
                try:
                    delta = await anext(inner)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not live.ended:
                        raise
                    # abort() cancelled the wait for the next delta: this generation ends with an error instead.
                    asyncio.current_task().uncancel()
                    raise unavailable(SHUTTING_DOWN) from None
                finally:
                    live.task = None
                yield delta
        finally:
            self._registry._live.discard(live)
            await inner.aclose()


class _LoadState:
    __slots__ = ("error", "seconds", "status")

    def __init__(self) -> None:
        self.status = "pending"  # pending | loading | ready | failed
        self.error: str | None = None
        self.seconds: float | None = None


class EngineRegistry:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engines: dict[str, ServedEngine] = {}
        self._by_name: dict[str, tuple[ServedEngine, ModelConfig]] = {}
        self._models: dict[str, ModelConfig] = {}
        self._load: dict[str, _LoadState] = {}
        self._live: set[_Live] = set()
        self.draining = False
        """A shutdown began: /ready answers 503 so that load balancers stop sending requests."""
        self.stopping = False
        """Generations in flight were ended, and new ones are refused."""

    def build(self) -> None:
        for model in self._settings.models:
            backend = self._settings.backends[model.backend]
            engine = ServedEngine(engine_class(backend.kind)(model, backend, model.backend), self)
            self._engines[model.name] = engine
            self._models[model.name] = model
            self._load[model.name] = _LoadState()
            for name in (model.name, *model.aliases):
                self._by_name[name] = (engine, model)

    # -- loading ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every model at once (each engine loads on its own thread); raise the first `ModelLoadError`."""
        if not self._engines:
            self.build()
        results = await asyncio.gather(*(self._start(name) for name in self._engines), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def start_in_background(
        self, on_failure: Callable[[ModelLoadError], None], on_loaded: Callable[[], None] | None = None
    ) -> asyncio.Task:
        """Load every model in a task of its own; a model that cannot load is reported to `on_failure`, and
        `on_loaded` is called once every model has loaded."""
        if not self._engines:
            self.build()

        async def load(name: str) -> bool:
            try:
                await self._start(name)
                return True
            except ModelLoadError as exc:
                on_failure(exc)
                return False

        async def load_all() -> None:
            if all(await asyncio.gather(*(load(name) for name in self._engines))) and on_loaded is not None:
                on_loaded()

        return asyncio.create_task(load_all(), name="load models")

    async def _start(self, name: str) -> None:
        engine, model, state = self._engines[name], self._models[name], self._load[name]
        kind = self._settings.backends[model.backend].kind
        state.status = "loading"
        logger.info("loading model '%s' (%s) from %s", name, kind, _describe_source(model, self._settings))
        started = time.perf_counter()
        if gate := os.environ.get(TEST_LOAD_GATE_ENV):
            while not os.path.exists(gate):
                await asyncio.sleep(0.05)
        try:
            await engine.start()
        except ModelLoadError as exc:
            state.status, state.error = "failed", exc.message
            raise
        except Exception as exc:  # a backend's unexpected failure still stops start-up with one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            error = ModelLoadError(name, model.source, reason)
            state.status, state.error = "failed", error.message
            raise error from None
        state.status, state.seconds = "ready", time.perf_counter() - started
        logger.info("model '%s' ready in %.2f s%s", name, state.seconds, _describe_loaded(engine.info))

    # -- shutdown --------------------------------------------------------------------------------------------

    def _admit(self) -> _Live:
        if self.stopping:
            raise unavailable(SHUTTING_DOWN)
        live = _Live()
        self._live.add(live)
        return live

    @property
    def in_flight(self) -> int:
        """Generations running now (a request with n choices counts n)."""
        return len(self._live)

    def drain(self) -> int:
        """A shutdown began: stop answering ready; the generations in flight may finish. Returns how many there are."""
        self.draining = True
        return len(self._live)

    def abort(self) -> int:
        """End every generation in flight now (each raises `EngineUnavailableError("server is shutting down")`
        where it waits for its next delta) and refuse new ones. Returns how many were ended."""
        self.draining = self.stopping = True
        ended = 0
        for live in list(self._live):
            if not live.ended:
                live.ended = True
                ended += 1
                if live.task is not None:
                    live.task.cancel()
        return ended

    async def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> bool:
        """Close every engine; False when some did not stop within `timeout` (they are left behind)."""
        closing = {name: asyncio.ensure_future(engine.close()) for name, engine in self._engines.items()}
        if not closing:
            return True
        _, pending = await asyncio.wait(closing.values(), timeout=timeout)
        for task in closing.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                logger.warning("closing an engine failed: %s", task.exception())
        if pending:
            stuck = ", ".join(name for name, task in closing.items() if task in pending)
            logger.warning("engine(s) of %s did not stop within %.0f s", stuck, timeout)
            return False
        return True

    # -- lookups ---------------------------------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[Engine, ModelConfig]:
        """The engine serving `name` (a model name or alias) and its config. Unknown names, and models outside the
        calling API key's scope, raise 404: a scoped key cannot tell them apart. A model that is still loading (or
        could not load), and every model during a shutdown, raise 503."""
        found = self._by_name.get(name)
        caller = current_caller.get()
        if found is None or (caller is not None and not caller.may_use(found[1].name)):
            raise ModelNotFoundError(name)
        state = self._load[found[1].name]
        if self.stopping:
            raise unavailable(SHUTTING_DOWN)
        if state.status == "failed":
            raise unavailable(state.error or f"model '{found[1].name}' could not be loaded")
        if state.status != "ready":
            raise unavailable(
                f"model '{found[1].name}' is still loading; retry in a few seconds", RETRY_AFTER_LOADING_S
            )
        return found

    def __iter__(self) -> Iterator[tuple[str, Engine]]:
        """The models the calling API key may use, by name (loaded or not)."""
        caller = current_caller.get()
        if caller is None or caller.models is None:
            return iter(self._engines.items())
        return iter([(name, engine) for name, engine in self._engines.items() if name in caller.models])

    def load_state(self, name: str) -> dict[str, Any]:
        """How a model's loading went, for /ready: `state` (loading, ready, failed), and `error` or `seconds`."""
        state = self._load[name]
        out: dict[str, Any] = {"state": "loading" if state.status == "pending" else state.status}
        if state.error is not None:
            out["error"] = state.error
        if state.seconds is not None:
            out["seconds"] = round(state.seconds, 3)
        return out

    @property
    def ready(self) -> bool:
        """Every model loaded and its engine running, and no shutdown under way."""
        return (
            bool(self._engines)
            and not self.draining
            and all(state.status == "ready" for state in self._load.values())
            and all(engine.ready for engine in self._engines.values())
        )


def _describe_source(model: ModelConfig, settings: Settings) -> str:
    backend = settings.backends[model.backend]
    if backend.kind == "openai":
        return f"upstream model id '{model.source}' at {', '.join(backend.urls)}"
    if Path(model.source).is_absolute():
        return f"{model.source} (local folder)"
    cached = None
    with suppress(Exception):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model.source, "config.json")
        cached = str(Path(found).parent) if isinstance(found, str) else None
    where = f"cached at {cached}" if cached else "not in the local cache: downloading"
    return f"Hugging Face repo {model.source} ({where})"


def _describe_loaded(info: ModelInfo) -> str:
    facts = []
    if info.size_bytes:
        facts.append(f"{_size(info.size_bytes)} of weights{' on the GPU' if info.on_gpu else ''}")
    if info.parameter_count:
        facts.append(f"{_count(info.parameter_count)} parameters")
    if info.quantization:
        facts.append(info.quantization)
    if info.context_length:
        facts.append(f"context {info.context_length} tokens")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    facts.append(f"process peak RSS {_size(peak)}")
    return ": " + ", ".join(facts)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def prepare_worker() -> None:
    """In a worker of `litestar-llm serve`, before granian's own set-up: SIGINT is the CLI's to handle (a
    terminal's Ctrl-C reaches the whole process group), and the CLI stops each worker with one SIGTERM. During
    the worker's start-up that SIGTERM just ends it (the default, not a handler inherited from the CLI)."""
    if os.environ.get(RUN_DIR_ENV):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _WorkerSupervision:
    """The worker's end of the talk with `litestar-llm serve` (see RUN_DIR_ENV). Without the CLI (granian run by
    hand, a TestClient) there is no run folder: a model that cannot load is logged and answers 503."""

    def __init__(self, registry: EngineRegistry, settings: Settings) -> None:
        run_dir = os.environ.get(RUN_DIR_ENV)
        self.run_dir = Path(run_dir) if run_dir else None
        self.registry, self.settings = registry, settings
        self.prefix = f"worker {os.getpid()}: " if settings.server.workers > 1 else ""

    def ignore_interrupts(self) -> None:
        """granian's worker handles SIGINT and SIGTERM alike, and its handler blocks the worker for good from the
        third signal on (its shutdown channel holds one): Ctrl-C twice plus the CLI's SIGTERM would hang it. So,
        once granian has set its handlers, a supervised worker gives SIGINT back to the CLI and keeps SIGTERM."""
        if self.run_dir is not None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def models_loaded(self) -> None:
        """Every model of this worker is loaded: the CLI prints its banner once every worker says so."""
        if self.run_dir is not None:
            (self.run_dir / f"loaded.{os.getpid()}").touch()

    def model_failed(self, exc: ModelLoadError) -> None:
        if self.run_dir is None:
            logger.error("%s", exc.message)
            return
        # The CLI prints the line once and stops the server: written whole, then renamed into place.
        part = self.run_dir / f"failed.{os.getpid()}"
        part.write_text(exc.message + "\n", encoding="utf-8")
        os.replace(part, self.run_dir / "failed")

    async def watch(self) -> None:
        """Follow the CLI's shutdown requests: `drain`, then `now`."""
        if self.run_dir is None:
            return
        request, seen = self.run_dir / "shutdown", ""
        while seen != "now":
            await asyncio.sleep(POLL_S)
            try:
                wanted = request.read_text().strip()
            except OSError:
                continue
            if wanted == seen:
                continue
            if wanted == "drain":
                count = self.registry.drain()
                logger.info(
                    "%sshutting down: waiting for %d generation%s in flight to finish (up to drain_timeout_s = %g s; "
                    "a second Ctrl-C or SIGTERM ends them now)",
                    self.prefix, count, "" if count == 1 else "s", self.settings.server.drain_timeout_s,
                )  # fmt: skip
            if wanted == "now":
                count = self.registry.abort()
                if count:
                    logger.info("%sshutting down now: ending %d generation%s in flight", self.prefix, count,
                                "" if count == 1 else "s")  # fmt: skip
            seen = wanted


class EngineRegistryPlugin(InitPlugin):
    """Builds the registry, loads the models in the app's lifespan, provides `registry` to handlers, and closes the
    engines at shutdown. `background=True` (the server's) lets the lifespan return before the models are loaded."""

    def __init__(self, settings: Settings, background: bool = False) -> None:
        self.settings = settings
        self.background = background
        self.registry = EngineRegistry(settings)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        self.registry.build()
        app_config.dependencies["registry"] = Provide(self._provide, use_cache=True, sync_to_thread=False)
        app_config.lifespan.append(self._lifespan if self.background else self._lifespan_in_process)
        app_config.state["registry"] = self.registry
        return app_config

    def _provide(self) -> EngineRegistry:
        return self.registry

    @asynccontextmanager
    async def _lifespan_in_process(self, _app: Litestar) -> AsyncIterator[None]:
        try:
            await self.registry.start()
            yield
        finally:
            await self.registry.close()

    @asynccontextmanager
    async def _lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        supervision = _WorkerSupervision(self.registry, self.settings)
        supervision.ignore_interrupts()
        loader = self.registry.start_in_background(supervision.model_failed, supervision.models_loaded)
        watcher = asyncio.create_task(supervision.watch(), name="shutdown requests")
        try:
            yield
        finally:
            # granian runs this once the connections have drained: every generation has ended by now.
            for task in (watcher, loader):
                task.cancel()
            await asyncio.gather(watcher, loader, return_exceptions=True)
            timeout = ABORTED_CLOSE_TIMEOUT_S if self.registry.stopping else CLOSE_TIMEOUT_S
            if not await self.registry.close(timeout):
                # A backend thread that never answers must not keep the process: its engine is abandoned.
                logger.warning("exiting without waiting for them")
                logging.shutdown()
                os._exit(0)
