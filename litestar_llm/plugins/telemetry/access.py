"""`[server] access_log`: one line per request, and `Outcome`, what became of a response, which the audit plugin
shares so both record the same status.

A client that leaves before its response is complete is a normal outcome, recorded as 499 ("client closed
request", as nginx has it): never a 500, never a traceback. Nothing here runs per token: `send` is wrapped, and a
streamed response's chunks pass through one comparison each.
"""

from __future__ import annotations

import asyncio
import logging
import time

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("litestar_llm.access")

CLIENT_CLOSED = 499
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Probes and scrapes: logged at debug level, so that a load balancer's checks do not flood the log."""


class Outcome:
    """Follows one HTTP request's ASGI messages: the status sent, whether the response was completed, whether the
    client disconnected. `status` is what to record."""

    __slots__ = ("completed", "disconnected", "sent_status", "started")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.sent_status: int | None = None
        self.completed = False
        self.disconnected = False

    def wrap(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        async def observed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
            return message

        async def observed_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                self.sent_status = message["status"]
            elif kind == "http.response.body" and not message.get("more_body", False):
                self.completed = True
            try:
                await send(message)
            except OSError:  # the connection is gone
                self.disconnected = True
                raise

        return observed_receive, observed_send

    def failed(self, exc: BaseException) -> None:
        """The app raised (the exception handlers outside every middleware answer it): take its status."""
        if isinstance(exc, asyncio.CancelledError):  # the server gave up on the request: its client is gone
            self.disconnected = True
        if self.sent_status is None:
            self.sent_status = getattr(exc, "status_code", 500)

    @property
    def status(self) -> int:
        if self.disconnected and not self.completed:
            return CLIENT_CLOSED
        return self.sent_status if self.sent_status is not None else 500

    @property
    def duration_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class AccessLogMiddleware(ASGIMiddleware):
    """`127.0.0.1 POST /v1/chat/completions 200 152.3 ms key=alice`: outermost, so it sees requests that auth
    refuses and bodies that time out."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        outcome = Outcome()
        receive, send = outcome.wrap(receive, send)
        try:
            await next_app(scope, receive, send)
        except BaseException as exc:
            outcome.failed(exc)
            raise
        finally:
            log_access(scope, outcome.status, outcome.duration_ms)


def log_access(scope: Scope, status: int, duration_ms: float) -> None:
    path = scope["path"]
    level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
    if logger.isEnabledFor(level):
        client = (scope.get("client") or ("-", 0))[0]
        key = scope.get("state", {}).get("api_key_name") or "-"
        logger.log(level, "%s %s %s %d %.1f ms key=%s", client, scope["method"], path, status, duration_ms, key)
