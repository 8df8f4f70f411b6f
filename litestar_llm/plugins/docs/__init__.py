"""GET /docs: Swagger UI from files in this package (no CDN), over an OpenAPI document that describes every request
and response body with the wire Structs' own JSON Schemas.

Dialect handlers read their raw body and decode it with msgspec (fast, and errors in the dialect's own shape), so
Litestar sees no `data` parameter to document. Each such route names its Structs in `opt` (`wire_bodies` in
dialects/common.py); at start-up this plugin writes them into the document, with msgspec's schemas (exactly
what the decoder accepts) under components/schemas, prefixed by dialect (`OpenAI.ChatCompletionRequest`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Reference, RequestBody
from litestar.plugins import InitPlugin
from litestar.routes import HTTPRoute
from litestar.static_files import create_static_files_router

from litestar_llm import __version__

ASSETS = Path(__file__).parent / "swagger-ui"
ASSETS_PATH = "/docs-assets"
"""Outside /docs, whose every sub-path Litestar's OpenAPI router answers."""
JSON = "application/json"


PREFIXES = {"openai": "OpenAI"}
"""Component names are prefixed by dialect (two dialects' `Usage` differ); Swagger UI capitalises them anyway."""


def _prefix(type_: Any) -> str:
    """`OpenAI` for litestar_llm.dialects.openai.wire.X, `Ollama` for ...ollama.wire.X."""
    parts = getattr(type_, "__module__", "").split(".")
    name = parts[-2] if parts[-1] == "wire" and len(parts) > 1 else parts[-1]
    return PREFIXES.get(name, name.title())


def _schema_of(type_: Any, components: dict[str, Any]) -> dict[str, Any]:
    """`type_`'s JSON Schema (a $ref for a Struct; oneOf for a tuple of types), its named parts added to
    `components`."""
    if isinstance(type_, tuple):
        return {"oneOf": [_schema_of(member, components) for member in type_]}
    members = getattr(type_, "__args__", None) or (type_,)
    prefix = _prefix(members[0])
    (schema,), parts = msgspec.json.schema_components([type_], ref_template=f"#/components/schemas/{prefix}.{{name}}")
    for name, part in parts.items():
        components.setdefault(f"{prefix}.{name}", {**part, "title": f"{prefix}.{name}"})
    return schema


def _content(media: str, schema: dict[str, Any]) -> dict[str, OpenAPIMediaType]:
    return {media: OpenAPIMediaType(schema=Reference(schema["$ref"]) if "$ref" in schema else schema)}


def document_wire_bodies(app: Litestar) -> int:
    """Write the Structs that routes name in `opt["wire_bodies"]` into the app's OpenAPI document; returns how
    many operations were described."""
    openapi = app.openapi_schema
    components: dict[str, Any] = {}
    described = 0
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or (item := (openapi.paths or {}).get(route.path_format or "/")) is None:
            continue
        for handler in route.route_handlers:
            if not (bodies := handler.opt.get("wire_bodies")):
                continue
            for method in handler.http_methods:
                operation = getattr(item, method.lower(), None)
                if operation is None:
                    continue
                if bodies["request"] is not None:
                    schema = _schema_of(bodies["request"], components)
                    operation.request_body = RequestBody(content=_content(JSON, schema), required=True)
                content: dict[str, OpenAPIMediaType] = {}
                if bodies["response"] is not None:
                    content.update(_content(JSON, _schema_of(bodies["response"], components)))
                if bodies["stream"] is not None:
                    content.update(_content(bodies["stream_media"], _schema_of(bodies["stream"], components)))
                if content:
                    responses = operation.responses or {}
                    ok = next((code for code in responses if code.startswith("2")), "200")
                    description = "the answer; streamed, each event holds the stream schema" if bodies["stream"] else ""
                    responses[ok] = OpenAPIResponse(description=description or "the answer", content=content)
                    operation.responses = responses
                described += 1
    schemas = openapi.components.schemas
    for name, schema in sorted(components.items()):
        schemas[name] = schema  # plain JSON Schema: the document serialises dicts as they are
    return described


class DocsPlugin(InitPlugin):
    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.openapi_config = OpenAPIConfig(
            title="litestar-llm",
            version=__version__,
            path="/docs",
            render_plugins=[
                SwaggerRenderPlugin(
                    js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
                    css_url=f"{ASSETS_PATH}/swagger-ui.css",
                    standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
                    favicon="",
                    path="/",
                )
            ],
        )
        app_config.route_handlers.append(
            create_static_files_router(
                ASSETS_PATH,
                directories=[ASSETS],
                opt={"public_asset": True},
                include_in_schema=False,
                name="docs-assets",
            )
        )
        app_config.on_startup.append(document_wire_bodies)
        return app_config
