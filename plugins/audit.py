"""An audit trail: one JSON line per API request (who, what model, status, duration), never the prompt.

    [server]
    plugins = ["plugins.audit:AuditPlugin"]

Lines go to the `litestar_llm.audit` logger, so they land wherever the server's logs go; set
`AUDIT_LOG_FILE` to also append them to a file. A client that left before its response was complete is recorded
with status 499, as in the access log.
"""

from __future__ import annotations

import json
import logging
import os
import time

from litestar.config.app import AppConfig
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.plugins import InitPlugin
from litestar.types import ASGIApp, Receive, Scope, Send

from litestar_llm.plugins.telemetry.access import Outcome

logger = logging.getLogger("litestar_llm.audit")


class AuditMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)
    exclude_path_pattern = ("^/health$", "^/ready$", "^/metrics$")

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        outcome = Outcome()
        receive, send = outcome.wrap(receive, send)
        try:
            await next_app(scope, receive, send)
        except BaseException as exc:  # answered by the app's exception handlers, outside every middleware
            outcome.failed(exc)
            raise
        finally:
            auth = scope.get("state", {}).get("api_key_name")  # set by the auth plugin when one is installed
            line = json.dumps(
                {
                    "ts": round(time.time(), 3),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": outcome.status,
                    "duration_ms": round(outcome.duration_ms, 2),
                    "key": auth,
                    "client": (scope.get("client") or ("", 0))[0],
                }
            )
            logger.info(line)


class AuditPlugin(InitPlugin):
    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get("AUDIT_LOG_FILE")

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.middleware.insert(0, AuditMiddleware())  # outermost: requests refused by auth are audited too
        app_config.on_startup.append(self._attach_file)  # after the app's logging config, which resets handlers
        return app_config

    def _attach_file(self) -> None:
        logger.setLevel(logging.INFO)
        if self.path:
            handler = logging.FileHandler(self.path, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
