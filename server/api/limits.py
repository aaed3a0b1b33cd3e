"""What a request may hold, checked before anything parses or authorizes it.

- ``BodySizeLimit``: a pure ASGI middleware that answers 413 ``{"detail": "request body
  exceeds N bytes (HYPERLAW_MAX_BODY_BYTES)"}`` as soon as a request's ``Content-Length``
  exceeds the limit, before reading a byte of the body, or, for a body streamed without a
  length (``Transfer-Encoding: chunked``), as soon as the bytes received pass it: such a
  body is read up to the limit (never further) and handed to the app in one piece, so the
  413 comes before authentication and parsing on every route. The 413 closes the
  connection (``Connection: close``): the rest of the body is never read.
- ``JsonLimitsRoute``: the routers' route class. It parses a JSON body with
  :func:`parse_json_body` before the route's dependencies run, so that a number beyond a
  64-bit float (``1e-400`` would become 0.0, ``1e400`` or a 400-digit integer infinity) is
  a 422 with rule ``float_range`` naming the field (``points.3.train_loss``), and a body
  nested too deeply for the parser a 422 with rule ``max_depth``, not a 400 or a 500.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# --- body size -----------------------------------------------------------------------------


def body_too_large(max_bytes: int) -> str:
    """The 413's sentence: the limit and the setting that raises it."""
    return f"request body exceeds {max_bytes} bytes (HYPERLAW_MAX_BODY_BYTES)"


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` (module docstring) while reading them."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            # the server holds the body to this length (h11 and httptools both do)
            if length.isdigit() and int(length) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)  # no body
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": body_too_large(self.max_bytes)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` as the whole request, then defers to the server's
    (which reports the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --- JSON numbers and depth ----------------------------------------------------------------


class _OutOfRange:
    """A JSON number literal no 64-bit float holds (left in the parsed value, then reported
    with its path)."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


def _parse_float(literal: str) -> float | _OutOfRange:
    value = float(literal)
    if math.isinf(value):
        return _OutOfRange(literal)
    if value == 0.0 and re.search(r"[1-9]", re.split(r"[eE]", literal)[0]):
        return _OutOfRange(literal)  # underflow: a non-zero literal that became 0.0
    return value


def _parse_int(literal: str) -> int | _OutOfRange:
    # 309 digits and more: beyond any float (|x| > 1.8e308), and beyond int() past 4,300
    if len(literal.lstrip("-")) > 308:
        return _OutOfRange(literal)
    return int(literal)


def _out_of_range(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[Any, str]]:
    """(path, literal) of every out-of-range number in a parsed body, without recursion."""
    stack = [(value, path)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, _OutOfRange):
            yield at, node.literal
        elif isinstance(node, dict):
            stack.extend((v, (*at, k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, (*at, i)) for i, v in enumerate(node))


def _error(rule: str, loc: tuple[Any, ...], ctx: dict[str, Any]) -> dict[str, Any]:
    return {"type": rule, "loc": ("body", *loc), "msg": rule, "input": None, "ctx": ctx}


def parse_json_body(raw: bytes) -> Any:
    """``json.loads`` (non-finite tokens accepted, as the API documents) that raises
    ``RequestValidationError`` for numbers beyond a 64-bit float (rule ``float_range``, one
    entry per number, at its path), for nesting deeper than the parser's recursion allows
    (rule ``max_depth``) and for bytes that are not UTF-8 text (rule ``json_invalid``);
    ``json.JSONDecodeError`` for the rest of invalid JSON."""
    try:
        value = json.loads(raw, parse_float=_parse_float, parse_int=_parse_int)
    except RecursionError:
        raise RequestValidationError([_error("max_depth", (), {})]) from None
    except UnicodeDecodeError as exc:
        raise RequestValidationError(
            [_error("json_invalid", (), {"error": f"not UTF-8 text: {exc.reason}"})]
        ) from None
    found = sorted(_out_of_range(value), key=lambda item: [str(p) for p in item[0]])
    if found:
        raise RequestValidationError(
            [_error("float_range", at, {"literal": literal}) for at, literal in found[:20]]
        )
    return value


# Literals that may under- or overflow: an exponent of 3 digits or more, or 300 digits in a
# row. Bodies without one parse as they are; those with one go through parse_json_body.
# Sought with every digit made "0", "E" made "e" and signs dropped (C-speed translate and
# find: 5 ms on a 2.5 MB batch of 10,000 points, where a regex took 65 ms); "e-001" is
# suspect too, which costs only a parse.
_ZEROED = bytes.maketrans(b"123456789E", b"000000000e")


def _suspect_number(raw: bytes) -> bool:
    zeroed = raw.translate(_ZEROED, b"+-")
    return b"e000" in zeroed or b"0" * 300 in zeroed


class _CheckedRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


def _is_json(request: Request) -> bool:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class JsonLimitsRoute(APIRoute):
    """Route class of the ``/v1`` routers (module docstring). A route whose body FastAPI
    parses gets it from :func:`parse_json_body` (parsed once); a route that parses its body
    itself (``POST /v1/trials/{id}/points``, with pydantic's faster parser) has it checked
    first when it holds a suspect number literal."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        parsed_by_fastapi = self.body_field is not None

        async def checked(request: Request) -> Response:
            request = _CheckedRequest(request.scope, request.receive)
            if request.method in {"POST", "PUT", "PATCH"} and _is_json(request):
                if parsed_by_fastapi:
                    try:
                        await request.json()
                    except json.JSONDecodeError:
                        pass  # FastAPI parses it again and answers json_invalid
                elif _suspect_number(await request.body()):
                    try:
                        parse_json_body(await request.body())
                    except json.JSONDecodeError:
                        pass  # the route's own parser says where
            return await handler(request)

        return checked
