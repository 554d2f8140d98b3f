"""``/openapi.json`` as the server behaves: request bodies (read by the handlers themselves, so
FastAPI does not see them) with their value ranges, 200 schemas, the 4xx the server sends (400,
never FastAPI's 422), ``/metrics`` as text and, with an API key, a bearer security scheme."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from shadowkv.server.responses import ChatCompletion, Completion, ErrorResponse

SSE = {  # one event: a JSON chunk (or the closing [DONE]) in its data field
    "text/event-stream": {
        "schema": {
            "type": "object",
            "description": "a server-sent event; 'data' holds a JSON chunk, or [DONE] at the end",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
            "required": ["data"],
        }
    }
}
ERRORS = {
    400: "Invalid request (the error names the field in 'param')",
    401: "Missing or wrong API key",
    404: "Unknown model",
    413: "Request body over the server's size limit",
    503: "The engine thread is not running",
}
_REQUEST_MODELS: dict[str, type[BaseModel]] = {}


def route_docs(
    body: type[BaseModel] | None,
    response: type[BaseModel] | str,
    secured: bool,
    not_found: bool = False,
    unavailable: bool = False,
) -> dict[str, Any]:
    """Decorator arguments that document one route."""
    responses: dict[int | str, dict[str, Any]] = {}
    kwargs: dict[str, Any] = {}
    if response in ("completion", "chat"):
        model = Completion if response == "completion" else ChatCompletion
        responses[200] = {"model": model, "content": SSE}
        not_found = unavailable = True  # an unknown 'model'; the engine thread stopped
    elif response == "metrics":
        responses[200] = {"description": "Prometheus text exposition"}
        kwargs["response_class"] = PlainTextResponse
    else:
        responses[200] = {"model": response}
    codes = [400, 413] * (body is not None) + [401] * secured + [404] * not_found
    codes += [503] * unavailable
    for code in codes:
        responses[code] = {"model": ErrorResponse, "description": ERRORS[code]}
    extra: dict[str, Any] = {}
    if body is not None:
        _REQUEST_MODELS[body.__name__] = body
        ref = {"$ref": f"#/components/schemas/{body.__name__}"}
        extra["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    if secured:
        extra["security"] = [{"bearer": []}]
    return {"responses": responses, "openapi_extra": extra or None, **kwargs}


def install_openapi(app: FastAPI, secured: bool) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name, model in _REQUEST_MODELS.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
        for item in doc.get("paths", {}).values():
            for op in item.values():
                op.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        if secured:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
