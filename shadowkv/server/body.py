"""Reading a request body: a size limit, JSON, no lone surrogates, then strict validation.

Handlers read their body themselves (after the API key is checked), so a malformed body on a
keyed server is a 401, an oversized one a 413 before it is parsed, and every validation error
names the field as the client wrote it (``messages[1].content``), never a pydantic path.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from shadowkv.server.protocol import APIError

DEFAULT_MAX_BODY_BYTES = 4 * 2**20

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, limit: int) -> Any:
    """The parsed JSON body; 413 past ``limit`` bytes (read no further), 400 when malformed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, 5000-digit ints
        msg = f"the request body is not valid JSON: {err}"
        raise APIError(400, msg, code="invalid_json") from None
    where = _surrogate(body, "")
    if where is not None:
        raise APIError(
            400,
            f"{where or 'the body'} contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
            "escape), which is not text; send valid Unicode",
            param=where or None,
            code="invalid_value",
        )
    return body


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes "
        "(--max-request-bytes)",
        code="request_too_large",
    )


def _surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or object key) holding a lone surrogate, else None."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _bad(v):
                return p
        elif isinstance(v, list):
            stack.extend((x, f"{p}[{i}]") for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                sub = f"{p}.{k}" if p else str(k)
                if not k.isascii() and _bad(k):
                    return p or "the body"
                stack.append((x, sub))
    return None


def _bad(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def validate(model: type[M], body: Any) -> M:
    """``model`` from a parsed body, or a 400 naming the first offending field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_value")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err) from None


def validation_error(err: ValidationError) -> APIError:
    """The most specific error (the deepest location: for a union, the branch that matched
    the input's shape) as a 400 with ``param`` in the client's terms."""
    best = max(err.errors(), key=lambda e: len(_param_parts(e["loc"])))
    parts = _param_parts(best["loc"])
    param = "".join(parts).lstrip(".") or None
    msg = best["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def _param_parts(loc: tuple[Any, ...]) -> list[str]:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and p.isidentifier() and p.islower() and p not in _TYPE_TAGS:
            parts.append(f".{p}")
        # else: a union branch tag ('str', 'list[ContentPart]', 'function-after[...]'): the
        # client never wrote it
    return parts


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "literal", "json"}
