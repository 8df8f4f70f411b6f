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
import gc
import importlib
import logging
import math
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.plugins import InitPlugin

from litestar_llm.caller import current_caller
from litestar_llm.config import ModelConfig, Settings, keep_alive_seconds
from litestar_llm.engine.base import Engine, ModelInfo
from litestar_llm.engine.types import Delta, EmbeddingRequest, Embeddings, GenerationRequest
from litestar_llm.errors import EngineUnavailableError, InvalidRequestError, ModelLoadError, ModelNotFoundError

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
    counted while in flight (per model, for idle unloading) and can be ended by `EngineRegistry.abort()`. The
    backend's engine is replaced by a fresh one whenever the model is unloaded, so this object stays valid for
    the model's life in the config. Per delta that costs one `current_task()` and two attribute writes."""

    def __init__(self, engine: Engine, registry: EngineRegistry, slot: _Slot | None = None) -> None:
        self.engine = engine
        self._registry = registry
        self._slot = slot

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

    @property
    def lifecycle_state(self) -> str:
        """unloaded, loading, ready, draining or failed (see `EngineRegistry.load_state`)."""
        return self._slot.state if self._slot is not None else "ready"

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        return await self.engine.count_prompt_tokens(request)

    async def count_input_tokens(self, request: EmbeddingRequest) -> int | None:
        return await self.engine.count_input_tokens(request)

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """The backend's own, counted in flight like a generation and ended the same way by `abort()`."""
        live = self._registry._admit(self._slot)
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
            self._registry._dismiss(live, self._slot)

    def __getattr__(self, name: str) -> Any:  # a backend's own extras
        if name == "engine":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        live = self._registry._admit(self._slot)
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
            self._registry._dismiss(live, self._slot)
            await inner.aclose()


STATES = ("unloaded", "loading", "ready", "draining", "failed")
LOAD_RETRY_S = 5.0
"""A model that failed to load is tried again by a request after this, doubling per failure in a row..."""
LOAD_RETRY_MAX_S = 60.0
"""...up to this."""


class _Slot:
    """One declared model's lifecycle: its state, the load that requests share, what keeps it busy, when it expires.

    States: `unloaded` (declared, not in memory), `loading`, `ready`, `draining` (being unloaded: it waits for its
    generations, then frees its memory), `failed` (the last load failed: `error` says why; a request after
    `retry_at` tries again)."""

    def __init__(self, config: ModelConfig, served: ServedEngine, kind: str) -> None:
        self.config, self.served, self.kind = config, served, kind
        self.state = "loading" if config.load == "startup" else "unloaded"
        self.error: str | None = None
        self.seconds: float | None = None
        self.loading: asyncio.Future | None = None
        """The load in progress, awaited by every request that needs the model."""
        self.startup = False
        """The load in progress is the server's start-up load: requests answer 503 meanwhile instead of waiting."""
        self.unloading: asyncio.Future | None = None
        self.loaded_once = False
        self.started = False
        """The backend's engine was started (so it must be closed)."""
        self.busy = 0
        """Generations in flight plus requests holding the model (waiting for its load, or before their first delta)."""
        self.last_used = 0.0
        self.keep_alive: float | None = None
        """The keep_alive (seconds, inf: forever) for the time after the current requests; None: the configured."""
        self.expires_at: float | None = None
        """Wall-clock time of the idle unload that is scheduled."""
        self.timer: asyncio.TimerHandle | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.size = 0
        """Bytes of weights: measured from the model's files, then as the engine reports them."""
        self.backend: Any = None
        self.gates_ready = False
        """Declared at start-up, so /ready waits for it (a start-up model); a reload's additions do not."""
        self.retired = False
        """Removed or replaced by a reload: draining, then gone."""

    @property
    def counts(self) -> bool:
        """Whether the model takes room in max_loaded_models and memory_budget (a remote model takes none)."""
        return self.kind != "openai"

    @property
    def occupying(self) -> bool:
        return self.state in ("loading", "ready", "draining")


class Hold:
    """What `EngineRegistry.acquire` returns: give it back with `release()` once the generation has started (its
    own count then keeps the model busy). `load_s` is how long this request waited for the model to load."""

    __slots__ = ("_registry", "_slot", "load_s")

    def __init__(self, registry: EngineRegistry, slot: _Slot, load_s: float) -> None:
        self._registry, self._slot, self.load_s = registry, slot, load_s

    def release(self) -> None:
        if self._slot is not None:
            slot, self._slot = self._slot, None
            self._registry._unbusy(slot)


class EngineRegistry:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engines: dict[str, ServedEngine] = {}
        self._by_name: dict[str, tuple[ServedEngine, ModelConfig]] = {}
        self._models: dict[str, ModelConfig] = {}
        self._slots: dict[str, _Slot] = {}
        self._retiring: set[_Slot] = set()
        """Models a reload removed or replaced: draining until their streams end, then unloaded."""
        self._tasks: set[asyncio.Future] = set()
        self._live: set[_Live] = set()
        self._changed = asyncio.Event()
        """Set (and replaced) whenever a model became idle or was unloaded: loads waiting for room look again."""
        self.draining = False
        """A shutdown began: /ready answers 503 so that load balancers stop sending requests."""
        self.stopping = False
        """Generations in flight were ended, and new ones are refused."""

    def build(self) -> None:
        for model in self._settings.models:
            self._add(model).gates_ready = True

    def _add(self, model: ModelConfig) -> _Slot:
        backend = self._settings.backends[model.backend]
        served = ServedEngine(engine_class(backend.kind)(model, backend, model.backend), self)
        slot = served._slot = _Slot(model, served, backend.kind)
        slot.backend = backend
        slot.size = _weights_size(model, backend.kind)
        self._engines[model.name] = served
        self._models[model.name] = model
        self._slots[model.name] = slot
        for name in (model.name, *model.aliases):
            self._by_name[name] = (served, model)
        return slot

    def _new_engine(self, slot: _Slot) -> Engine:
        return engine_class(slot.kind)(slot.config, slot.backend, slot.config.backend)

    # -- reloading -------------------------------------------------------------------------------------------

    def reconfigure(self, _old: Settings, settings: Settings) -> None:
        """A reload (litestar_llm.reload): models added are declared (start-up ones load now), removed ones stop
        taking requests and unload once their streams end, changed ones are replaced the same way (the new one
        loads now or on first use); a change of aliases, defaults, load, keep_alive or pin applies in place.
        Budgets and load_wait_s apply to the loads from now on."""
        self._settings = settings
        wanted = {model.name: model for model in settings.models}
        for name in [name for name in self._slots if name not in wanted]:
            self._retire(self._slots[name], "removed from server.toml")
        for name, model in wanted.items():
            slot = self._slots.get(name)
            if slot is not None and not _needs_new_engine(slot, model, settings):
                slot.config = model
                self._models[name] = model
                if slot.state == "ready" and slot.busy == 0:
                    self._idle(slot)  # keep_alive or pin may have changed
                continue
            was_loaded = slot is not None and slot.occupying
            if slot is not None:
                self._retire(slot, "changed in server.toml: replaced once its streams end")
            new = self._add(model)
            if model.load == "startup" or was_loaded:
                self._spawn(self._ensure_loaded(new))
        self._by_name = {
            alias: (slot.served, slot.config)
            for slot in self._slots.values()
            for alias in (slot.config.name, *slot.config.aliases)
        }
        self._notify()

    def _retire(self, slot: _Slot, why: str) -> None:
        name = slot.config.name
        del self._slots[name], self._engines[name], self._models[name]
        self._retiring.add(slot)
        slot.retired = True
        self._cancel_expiry(slot)
        if slot.busy:
            why += f"; {slot.busy} request{'' if slot.busy == 1 else 's'} in flight"

        async def retire() -> None:
            if slot.loading is not None:
                with suppress(Exception):
                    await asyncio.shield(slot.loading)
            if slot.occupying:
                await asyncio.shield(self._begin_unload(slot, why))
            else:
                logger.info("model '%s' %s", name, why.partition(":")[0])
            self._retiring.discard(slot)

        self._spawn(retire())

    def _spawn(self, work: Awaitable) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are logged where they happen

    def _all_slots(self) -> list[_Slot]:
        return [*self._slots.values(), *self._retiring]

    # -- loading ---------------------------------------------------------------------------------------------

    def _startup_slots(self) -> list[_Slot]:
        return [slot for slot in self._slots.values() if slot.config.load == "startup"]

    async def start(self) -> None:
        """Load every start-up model at once (each engine loads on its own thread); raise the first
        `ModelLoadError`."""
        if not self._engines:
            self.build()
        slots = self._startup_slots()
        results = await asyncio.gather(*(self._ensure_loaded(slot) for slot in slots), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def start_in_background(
        self, on_failure: Callable[[ModelLoadError], None], on_loaded: Callable[[], None] | None = None
    ) -> asyncio.Task:
        """Load every start-up model in a task of its own; a model that cannot load is reported to `on_failure`,
        and `on_loaded` is called once every one has loaded. Requests for them answer 503 meanwhile."""
        if not self._engines:
            self.build()

        slots = self._startup_slots()
        for slot in slots:  # from now on, not at the task's first step
            slot.startup = True

        async def load(slot: _Slot) -> bool:
            try:
                await self._ensure_loaded(slot)
                return True
            except ModelLoadError as exc:
                on_failure(exc)
                return False
            finally:
                slot.startup = False

        async def load_all() -> None:
            loaded = await asyncio.gather(*(load(slot) for slot in slots))
            if all(loaded) and on_loaded is not None:
                on_loaded()

        return asyncio.create_task(load_all(), name="load models")

    async def acquire(self, name: str, keep_alive: float | None = None) -> Hold:
        """Hold model `name` (its canonical name) for a request: load it first if it is not loaded (every request
        waiting shares one load), making room under max_loaded_models and memory_budget. `keep_alive` (seconds,
        `math.inf` forever) replaces the model's own for the idle time after this request. Raises 503 when the
        model cannot be loaded (with the reason), or no room frees up within load_wait_s (with Retry-After)."""
        slot = self._slots[name]
        slot.busy += 1
        slot.keep_alive = keep_alive
        self._cancel_expiry(slot)
        started = time.perf_counter()
        try:
            waited = await self._ensure_loaded(slot)
        except ModelLoadError as exc:
            self._unbusy(slot)
            raise unavailable(exc.message, self._retry_in(slot)) from None
        except BaseException:
            self._unbusy(slot)
            raise
        return Hold(self, slot, time.perf_counter() - started if waited else 0.0)

    async def _ensure_loaded(self, slot: _Slot) -> bool:
        """Wait until the model is ready, loading it when needed; True when it was not ready at first."""
        waited = False
        while slot.state != "ready":
            waited = True
            if self.stopping:
                raise unavailable(SHUTTING_DOWN)
            if slot.state == "draining" and slot.unloading is not None:
                await asyncio.shield(slot.unloading)
                continue
            if slot.state == "failed" and time.monotonic() < slot.retry_at and slot.loading is None:
                raise ModelLoadError(slot.config.name, slot.config.source, _reason(slot))
            if slot.loading is None:
                slot.loading = asyncio.ensure_future(self._load(slot))
            await asyncio.shield(slot.loading)
        return waited

    async def _load(self, slot: _Slot) -> None:
        try:
            victims = await self._make_room(slot)
            for victim in victims:
                await asyncio.shield(victim.unloading)
            await self._start(slot)
        finally:
            slot.loading = None
            self._notify()

    async def _make_room(self, slot: _Slot) -> list[_Slot]:
        """Reserve room for `slot` (its state becomes `loading`), unloading idle models least recently used first;
        returns the models being unloaded for it. Waits up to load_wait_s for busy ones to become idle."""
        server = self._settings.server
        budget = server.memory_budget_bytes
        if slot.counts and budget is not None and slot.size > budget:
            self._set_state(slot, "failed", f"its weights ({_size(slot.size)}) exceed memory_budget ({_size(budget)})")
            slot.retry_at = math.inf
            raise ModelLoadError(slot.config.name, slot.config.source, _reason(slot))
        deadline = time.monotonic() + server.load_wait_s
        while True:
            victims = self._plan(slot) if slot.counts else []
            if victims is not None:
                for victim in victims:
                    self._begin_unload(victim, f"to make room for '{slot.config.name}'")
                self._set_state(slot, "loading")
                return victims
            changed = self._changed
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stopping:
                busy = [s.config.name for s in self._all_slots() if s.occupying and s.counts and s is not slot]
                raise unavailable(
                    f"model '{slot.config.name}' cannot be loaded now: no room within max_loaded_models / "
                    f"memory_budget, and the loaded models ({', '.join(busy)}) are busy or pinned; retry shortly",
                    RETRY_AFTER_LOADING_S,
                )
            with suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def _plan(self, slot: _Slot) -> list[_Slot] | None:
        """The idle models to unload so that `slot` fits, least recently used first; None when it cannot fit now."""
        server = self._settings.server
        limit, budget = server.max_loaded_models, server.memory_budget_bytes
        others = [s for s in self._all_slots() if s is not slot and s.counts and s.occupying]
        count, size = len(others) + 1, sum(s.size for s in others) + slot.size
        idle = sorted(
            (s for s in others if s.state == "ready" and s.busy == 0 and not s.config.pin), key=lambda s: s.last_used
        )
        victims: list[_Slot] = []
        while (limit is not None and count > limit) or (budget is not None and size > budget):
            if not idle:
                return None
            victim = idle.pop(0)
            victims.append(victim)
            count, size = count - 1, size - victim.size
        return victims

    async def _start(self, slot: _Slot) -> None:
        name, model = slot.config.name, slot.config
        engine = slot.served
        if slot.started:  # a backend engine is loaded once: a reload gets a fresh one
            engine.engine, slot.started = self._new_engine(slot), False
        self._set_state(slot, "loading")
        logger.info("loading model '%s' (%s) from %s", name, slot.kind, _describe_source(model, self._settings))
        started = time.perf_counter()
        if gate := os.environ.get(TEST_LOAD_GATE_ENV):
            while not os.path.exists(gate):
                await asyncio.sleep(0.05)
        missing = _missing_from_hub_cache(model, slot.kind)
        try:
            if missing:
                raise ModelLoadError(name, model.source, missing)
            slot.started = True
            await engine.start()
        except ModelLoadError as exc:
            self._failed(slot, exc.message)
            raise
        except Exception as exc:  # a backend's unexpected failure still stops start-up with one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            error = ModelLoadError(name, model.source, reason)
            self._failed(slot, error.message)
            raise error from None
        slot.seconds = time.perf_counter() - started
        slot.size = slot.size or engine.info.size_bytes or 0  # measured the same way before and after loading
        slot.failures, slot.error, slot.loaded_once = 0, None, True
        slot.last_used = time.monotonic()
        self._set_state(slot, "ready", log=False)
        logger.info("model '%s' ready in %.2f s%s", name, slot.seconds, _describe_loaded(engine.info))
        if slot.busy == 0:
            self._idle(slot)

    def _failed(self, slot: _Slot, message: str) -> None:
        slot.failures += 1
        delay = min(LOAD_RETRY_S * 2 ** (slot.failures - 1), LOAD_RETRY_MAX_S)
        slot.retry_at = time.monotonic() + delay
        slot.error = message
        with suppress(Exception):
            if slot.started:
                slot.served.engine, slot.started = self._new_engine(slot), False  # drop what half-loaded
        self._set_state(slot, "failed", log=False)
        if not slot.startup:  # a start-up failure is reported once, by the server's supervision
            logger.error("%s (a request after %.0f s tries again)", message, delay)

    def _retry_in(self, slot: _Slot) -> int | None:
        if slot.state != "failed" or slot.retry_at == math.inf:
            return None
        return max(1, math.ceil(slot.retry_at - time.monotonic()))

    def _set_state(self, slot: _Slot, state: str, why: str | None = None, log: bool = True) -> None:
        if state == "failed" and why is not None:
            slot.error = f"model '{slot.config.name}' could not be loaded from {slot.config.source}: {why}"
        changed, slot.state = slot.state != state, state
        if changed and log and state != "loading":  # the loading line says more (see _start)
            logger.info("model '%s' %s%s", slot.config.name, state, f" ({why})" if why else "")

    # -- idle models and unloading ---------------------------------------------------------------------------

    def _keep_alive(self, slot: _Slot) -> float:
        """Seconds an idle model stays loaded (inf: forever)."""
        if slot.config.pin:
            return math.inf
        if slot.keep_alive is not None:
            return slot.keep_alive
        for value in (slot.config.keep_alive, self._settings.backends[slot.config.backend].keep_alive):
            if (seconds := keep_alive_seconds(value)) is not None:
                return seconds
        return math.inf

    def _unbusy(self, slot: _Slot) -> None:
        slot.busy -= 1
        if slot.busy == 0:
            slot.last_used = time.monotonic()
            if slot.state == "ready":
                self._idle(slot)
            self._notify()

    def _idle(self, slot: _Slot) -> None:
        """The model has nothing in flight: schedule its unload after keep_alive."""
        self._cancel_expiry(slot)
        seconds = self._keep_alive(slot)
        if seconds == math.inf or self.draining:
            return
        if seconds == 0:
            self._begin_unload(slot, "keep_alive 0: unloaded after use")
            return
        slot.expires_at = time.time() + seconds
        slot.timer = asyncio.get_running_loop().call_later(
            seconds, self._expire, slot, f"idle for keep_alive {_duration(seconds)}"
        )

    def _expire(self, slot: _Slot, why: str) -> None:
        slot.timer = None
        if slot.state == "ready" and slot.busy == 0 and not slot.retired:
            self._begin_unload(slot, why)

    def _cancel_expiry(self, slot: _Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
        slot.timer = slot.expires_at = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _begin_unload(self, slot: _Slot, why: str) -> asyncio.Future:
        if slot.unloading is None:
            self._cancel_expiry(slot)
            self._set_state(slot, "draining", why)
            slot.unloading = asyncio.ensure_future(self._unload(slot, why))
        return slot.unloading

    async def _unload(self, slot: _Slot, why: str) -> None:
        """Wait for the model's generations to end, close its engine and let go of it, so its memory is freed."""
        try:
            while slot.busy > 0:
                changed = self._changed
                await changed.wait()
            old, slot.served.engine = slot.served.engine, self._new_engine(slot)
            slot.started = False
            try:
                await old.close()
            except Exception as exc:
                logger.warning("closing model '%s' failed: %s", slot.config.name, exc)
            release = getattr(old, "release_freed_memory", None)  # a backend's own cache of freed buffers
            del old
            gc.collect()
            if release is not None:
                release()
            _malloc_trim()
            self._set_state(slot, "unloaded", f"{why}; process RSS now {_size(_rss())}")
        finally:
            slot.unloading = None
            self._notify()

    async def unload(self, name: str) -> None:
        """Unload model `name` now (Ollama's keep_alive 0 with no prompt), or once its requests in flight end.
        A pinned model stays: InvalidRequestError."""
        slot = self._slots[name]
        if slot.config.pin:
            raise InvalidRequestError(f"model '{name}' is pinned (pin = true in server.toml): it is never unloaded")
        if slot.loading is not None:
            with suppress(Exception):
                await asyncio.shield(slot.loading)
        if slot.state == "ready" and slot.busy == 0:
            await asyncio.shield(self._begin_unload(slot, "unload requested"))
        elif slot.state == "ready":
            slot.keep_alive = 0.0  # after the requests in flight
        elif slot.unloading is not None:
            await asyncio.shield(slot.unloading)

    # -- shutdown --------------------------------------------------------------------------------------------

    def _admit(self, slot: _Slot | None) -> _Live:
        if self.stopping:
            raise unavailable(SHUTTING_DOWN)
        live = _Live()
        self._live.add(live)
        if slot is not None:
            slot.busy += 1
            self._cancel_expiry(slot)
        return live

    def _dismiss(self, live: _Live, slot: _Slot | None) -> None:
        self._live.discard(live)
        if slot is not None:
            self._unbusy(slot)

    @property
    def in_flight(self) -> int:
        """Generations running now (a request with n choices counts n)."""
        return len(self._live)

    def drain(self) -> int:
        """A shutdown began: stop answering ready; the generations in flight may finish. Returns how many there are."""
        self.draining = True
        for slot in self._slots.values():
            self._cancel_expiry(slot)
        return len(self._live)

    def abort(self) -> int:
        """End every generation in flight now (each raises `EngineUnavailableError("server is shutting down")`
        where it waits for its next delta) and refuse new ones. Returns how many were ended."""
        self.draining = self.stopping = True
        self._notify()
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
        for slot in self._all_slots():
            self._cancel_expiry(slot)
        for task in list(self._tasks):
            task.cancel()
        closing = {
            f"{slot.config.name}{' (retiring)' if slot.retired else ''}": asyncio.ensure_future(slot.served.close())
            for slot in self._all_slots()
            if slot.started or slot.state in ("loading", "ready")
        }
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
        """The engine serving `name` (a model name or alias) and its config, loaded or not (`acquire` loads it).
        Unknown names, and models outside the calling API key's scope, raise 404: a scoped key cannot tell them
        apart. A model still in its start-up load, one whose last load failed (until its retry is due), and
        every model during a shutdown, raise 503."""
        found = self._by_name.get(name)
        caller = current_caller.get()
        if found is None or (caller is not None and not caller.may_use(found[1].name)):
            raise ModelNotFoundError(name)
        slot = self._slots[found[1].name]
        if self.stopping:
            raise unavailable(SHUTTING_DOWN)
        if slot.state == "failed" and time.monotonic() < slot.retry_at:
            raise unavailable(_reason(slot, full=True), self._retry_in(slot))
        if slot.startup and slot.state != "ready":
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
        """A model's lifecycle, for /ready and status pages: `state` (unloaded, loading, ready, draining, failed),
        `error` (why the last load failed), `seconds` (the last load's), `expires_at` (unix time of the idle unload
        scheduled), `pinned`, `retry_in_s` (failed: when a request may try again), `requests` (generations in
        flight and requests waiting for the model)."""
        slot = self._slots[name]
        out: dict[str, Any] = {"state": slot.state}
        if slot.error is not None and slot.state == "failed":
            out["error"] = slot.error
            if (retry := self._retry_in(slot)) is not None:
                out["retry_in_s"] = retry
        if slot.seconds is not None:
            out["seconds"] = round(slot.seconds, 3)
        if slot.expires_at is not None:
            out["expires_at"] = round(slot.expires_at, 3)
        if slot.config.pin:
            out["pinned"] = True
        if slot.busy:
            out["requests"] = slot.busy
        return out

    def declared(self, name: str) -> ModelConfig | None:
        """The config of model `name` (or alias) if it is declared and the calling key may use it; no 503s."""
        found = self._by_name.get(name)
        caller = current_caller.get()
        if found is None or (caller is not None and not caller.may_use(found[1].name)):
            return None
        return found[1]

    def backend_kind(self, name: str) -> str:
        return self._slots[name].kind

    def forget_failure(self, name: str) -> None:
        """The model's files were fixed (pulled): the next request loads it without waiting out the back-off."""
        if (slot := self._slots.get(name)) is not None and slot.state == "failed":
            slot.retry_at = 0.0

    def expires_at(self, name: str) -> float | None:
        """When a loaded model will be unloaded if nothing uses it (unix time); None: never. A busy model expires
        keep_alive after its last request ends (Ollama reports it as from now)."""
        slot = self._slots[name]
        if slot.expires_at is not None:
            return slot.expires_at
        seconds = self._keep_alive(slot)
        return None if seconds == math.inf else time.time() + seconds

    def loaded_bytes(self) -> int:
        return sum(slot.size for slot in self._all_slots() if slot.counts and slot.occupying)

    @property
    def ready(self) -> bool:
        """Every start-up model has loaded, every loaded model's engine runs, and no shutdown is under way
        (on-demand models, and models unloaded since, load when asked)."""
        return (
            bool(self._engines)
            and not self.draining
            and all(slot.loaded_once for slot in self._startup_slots() if slot.gates_ready)
            and all(slot.served.ready for slot in self._slots.values() if slot.state == "ready")
        )


def _needs_new_engine(slot: _Slot, model: ModelConfig, settings: Settings) -> bool:
    """Whether a model's new config changes what its engine loads (else it applies in place)."""
    in_place = {"aliases", "defaults", "load", "keep_alive", "pin"}
    old = {f: getattr(slot.config, f) for f in slot.config.__struct_fields__ if f not in in_place}
    new = {f: getattr(model, f) for f in model.__struct_fields__ if f not in in_place}
    return old != new or settings.backends.get(model.backend) != slot.backend


def _reason(slot: _Slot, full: bool = False) -> str:
    message = slot.error or f"model '{slot.config.name}' could not be loaded"
    if full:
        return message
    prefix = f"model '{slot.config.name}' could not be loaded from {slot.config.source}: "
    return message.removeprefix(prefix)


def _weights_size(model: ModelConfig, kind: str) -> int:
    """Bytes of the model's weight files, before it loads (a hub model: in the local cache; 0 when unknown)."""
    if kind == "openai":
        return 0
    folder = Path(model.source)
    if not folder.is_dir():
        with suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(model.source, "config.json")
            folder = Path(found).parent if isinstance(found, str) else folder
    if not folder.is_dir():
        return 0
    return sum(
        p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".npz", ".pt")
    )


def _missing_from_hub_cache(model: ModelConfig, kind: str) -> str | None:
    """Why a hub model cannot load here: it is not in the local cache and the hub cannot be asked."""
    from litestar_llm.config import _hub_offline

    if kind == "openai" or Path(model.source).exists() or not _hub_offline():
        return None
    with suppress(Exception):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model.source, "config.json"), str):
            return None
    return (
        f"Hugging Face repo {model.source} is not in the local cache and HF_HUB_OFFLINE is set: "
        f"run `litestar-llm pull {model.name}` where the hub can be reached"
    )


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the system (glibc keeps them otherwise, and RSS would not fall)."""
    with suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    """The process's resident memory now (bytes), from /proc; 0 where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


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

    def __init__(self, registry: EngineRegistry, settings: Settings, live: Any = None) -> None:
        run_dir = os.environ.get(RUN_DIR_ENV)
        self.run_dir = Path(run_dir) if run_dir else None
        self.registry, self.settings, self.live = registry, settings, live
        self.applied = 1
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

    async def follow_reloads(self) -> None:
        """The CLI validated server.toml again and wrote its generation to `reload`: re-read it and apply it."""
        try:
            generation = int((self.run_dir / "reload").read_text())
        except (OSError, ValueError):
            return
        if generation > self.applied and self.live is not None:
            self.applied = generation
            await self.live.reload(generation)

    async def watch(self) -> None:
        """Follow the CLI's shutdown requests (`drain`, then `now`) and reloads."""
        if self.run_dir is None:
            return
        request, seen = self.run_dir / "shutdown", ""
        while seen != "now":
            await asyncio.sleep(POLL_S)
            if not self.registry.draining:
                await self.follow_reloads()
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
    async def _lifespan(self, app: Litestar) -> AsyncIterator[None]:
        supervision = _WorkerSupervision(self.registry, self.settings, app.state.get("live_config"))
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
