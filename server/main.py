"""The FastAPI application factory.

``create_app(settings, background=...)`` opens the database (``app.state.database``, a
``server.core.db.Database`` disposed at shutdown), refuses to start when its schema is not
at the head revision (``SchemaOutdatedError``, naming ``hyperlaw db upgrade``), mounts the
``/v1`` routers behind the body-size limit (``server.api.limits``), serves the dashboard at
``/`` with its files under ``/static`` (``server.api.routes.dashboard``) and maps errors to
JSON bodies:

- 422: ``{"detail": [{"field": "batch_size_tokens", "rule": "gt",
  "message": "batch_size_tokens must be > 0"}]}`` -- one entry per violated rule, ``field``
  a dotted path into the body or the query parameter's name (``points.3.step``);
- 401/403/404/409/413/503: ``{"detail": "trial 17 not found"}``, one sentence; a 409 from
  a database constraint and a 503 never repeat the driver's text (it goes to the log);
- 500: ``{"detail": "internal error: <exception type>"}`` (details go to the log).

The OpenAPI document states these bodies for every ``/v1`` operation (``ValidationErrorPublic``
for 422, ``ErrorPublic`` for the rest; ``document_errors``).

Each background starter is called with the settings at startup and returns a stop
function called at shutdown (the stale-trial reaper, the fitting worker).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import IntegrityError

from client.wire import dumps
from server.api.limits import BodySizeLimit
from server.api.metrics import install_metrics
from server.api.routes import (
    dashboard,
    experiments,
    families,
    fits,
    imports,
    recommendations,
    tokens,
    trials,
)
from server.core.config import Settings, get_settings
from server.core.db import Database, require_current_schema
from server.core.errors import HyperlawError, InputError
from server.point_schemas import EXTRA_KEY_MESSAGE, EXTRA_VALUE_MESSAGE
from server.schemas import (
    BLANK_TEXT,
    NO_NUL_TEXT,
    NONFINITE_NOTE,
    ErrorPublic,
    ValidationErrorPublic,
)

log = logging.getLogger(__name__)

BackgroundStarter = Callable[[Settings], Callable[[], None]]


class HyperlawJSONResponse(JSONResponse):
    """JSON response that writes NaN/±inf as "NaN"/"Infinity"/"-Infinity" (valid JSON)."""

    def render(self, content: Any) -> bytes:
        return dumps(content, ensure_ascii=False).encode("utf-8")


# --- validation errors as {"field", "rule", "message"} -------------------------------------

_RULE_TEXT = {
    "greater_than": lambda ctx: f"must be > {ctx.get('gt')}",
    "greater_than_equal": lambda ctx: f"must be >= {ctx.get('ge')}",
    "less_than": lambda ctx: f"must be < {ctx.get('lt')}",
    "less_than_equal": lambda ctx: f"must be <= {ctx.get('le')}",
    "finite_number": lambda ctx: "must be finite",
    "missing": lambda ctx: "is required",
    "extra_forbidden": lambda ctx: "is not a known field",
    "int_type": lambda ctx: "must be an integer",
    "int_parsing": lambda ctx: "must be an integer",
    "int_from_float": lambda ctx: "must be an integer",
    "float_type": lambda ctx: "must be a number",
    "float_parsing": lambda ctx: "must be a number",
    "bool_type": lambda ctx: "must be true or false",
    "bool_parsing": lambda ctx: "must be true or false",
    "string_type": lambda ctx: "must be a string",
    "dict_type": lambda ctx: "must be an object",
    "list_type": lambda ctx: "must be a list",
    "model_type": lambda ctx: "must be an object",
    "model_attributes_type": lambda ctx: "must be an object",
    "too_long": lambda ctx: f"must have at most {ctx.get('max_length')} items",
    "too_short": lambda ctx: f"must have at least {ctx.get('min_length')} items",
    "string_too_long": lambda ctx: f"must be at most {ctx.get('max_length')} characters",
    "string_too_short": lambda ctx: f"must be at least {ctx.get('min_length')} characters",
    "enum": lambda ctx: f"must be one of {ctx.get('expected')}",
    "literal_error": lambda ctx: f"must be one of {ctx.get('expected')}",
    "json_invalid": lambda ctx: f"must be valid JSON ({ctx.get('error')})",
    "family_name": lambda ctx: str(ctx.get("problem")),
    "no_nul": lambda ctx: NO_NUL_TEXT + (f" (at {ctx['at']})" if ctx.get("at") else ""),
    "blank": lambda ctx: BLANK_TEXT,
    "float_range": lambda ctx: (
        "must be within a 64-bit float's range (0, or a magnitude "
        f"from 5e-324 to 1.8e308): got {_abridged(str(ctx.get('literal')))}"
    ),
    "max_depth": lambda ctx: (
        f"must nest at most {ctx['max_depth']} levels of objects and lists"
        if "max_depth" in ctx
        else "nests too deeply to be parsed"
    ),
    "max_size": lambda ctx: f"must take at most {ctx.get('max_chars')} characters as JSON",
    # a point's extras (server.point_schemas)
    "extra_key": lambda ctx: EXTRA_KEY_MESSAGE,
    "extra_value": lambda ctx: EXTRA_VALUE_MESSAGE,
    "max_extras": lambda ctx: (
        f"must hold at most {ctx.get('max_extras')} extra keys (got {ctx.get('extras')})"
    ),
}


def _abridged(literal: str) -> str:
    """A number literal short enough for a message (a 5,000-digit one is not)."""
    return literal if len(literal) <= 40 else f"{literal[:20]}...({len(literal)} characters)"


def validation_details(errors: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Pydantic/FastAPI errors -> ``[{"field", "rule", "message"}]``."""
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in {"body", "query", "path", "header"}:
            loc = loc[1:]
        rule = err.get("type", "invalid")
        field = "body" if rule == "json_invalid" else (".".join(loc) or "body")
        ctx = err.get("ctx") or {}
        text = _RULE_TEXT.get(rule)
        sentence = text(ctx) if text else str(err.get("msg", "is invalid")).lower()
        out.append({"field": field, "rule": rule, "message": f"{field} {sentence}"})
    return out


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        return HyperlawJSONResponse({"detail": validation_details(exc.errors())}, status_code=422)

    @app.exception_handler(InputError)
    async def _input(_request: Request, exc: InputError):
        return HyperlawJSONResponse({"detail": [e.as_dict() for e in exc.errors]}, status_code=422)

    @app.exception_handler(HyperlawError)
    async def _hyperlaw(_request: Request, exc: HyperlawError):
        headers = {"Retry-After": "1"} if exc.status_code == 503 else None
        return HyperlawJSONResponse(
            {"detail": exc.message}, status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError):
        log.warning("constraint violated on %s %s: %s", request.method, request.url.path, exc.orig)
        return HyperlawJSONResponse(
            {"detail": "the request conflicts with stored data (a uniqueness or reference rule)"},
            status_code=409,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return HyperlawJSONResponse(
            {"detail": f"internal error: {type(exc).__name__}"}, status_code=500
        )


# --- the error bodies in the OpenAPI document ---------------------------------------------

_ERROR_TEXT = {
    "401": "no bearer token, or a bad or revoked one",
    "403": "the token lacks the scope this route needs",
    "404": "an object the request names does not exist",
    "409": "the request conflicts with the stored state",
    "413": "the body exceeds HYPERLAW_MAX_BODY_BYTES",
    "422": "a parameter or a body field breaks a rule: one entry per rule",
    "503": "the database is unavailable; retry (Retry-After)",
}
_READ_AUTH = " (only when the service runs with HYPERLAW_READ_REQUIRES_TOKEN=true)"


def _error_statuses(path: str, method: str) -> dict[str, str]:
    """The errors any ``/v1`` operation can answer, by how it is called; a route declares
    its own beyond these (404 for a missing object named in a body or query)."""
    write = method != "get"
    codes = ["401", "403", "422", "503"] + (["409", "413"] if write else [])
    codes += ["404"] if "{" in path else []
    return {
        code: _ERROR_TEXT[code] + (_READ_AUTH if code in {"401", "403"} and not write else "")
        for code in codes
    }


def document_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """Give every ``/v1`` operation of the OpenAPI document ``spec`` its error responses
    with the service's bodies: ``ValidationErrorPublic`` for 422 (replacing FastAPI's
    ``HTTPValidationError``, a shape this service never sends), ``ErrorPublic`` for every
    other 4xx and 5xx, those a route declares itself included."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorPublic, ValidationErrorPublic):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for path, operations in spec.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for status, text in _error_statuses(path, method).items():
                responses.setdefault(status, {"description": text})
            if responses["422"].get("description") == "Validation Error":  # FastAPI's
                responses["422"]["description"] = _ERROR_TEXT["422"]
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    body = "ValidationErrorPublic" if status == "422" else "ErrorPublic"
                    ref = {"$ref": f"#/components/schemas/{body}"}
                    response["content"] = {"application/json": {"schema": ref}}
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return spec


DESCRIPTION = f"""
Trial store and recommendations for learning rate, batch size and critical batch size.

**Auth.** Writes need `Authorization: Bearer <token>` with write scope
(`hyperlaw token create --name NAME --scope write`); reads are open unless
`HYPERLAW_READ_REQUIRES_TOKEN=true`. `/v1/tokens` (list, create, revoke tokens) needs admin
scope, for reads too, and so does `DELETE /v1/trials/{{trial_id}}`. 401: no token or a
bad/revoked one; 403: the token lacks the scope.

**Errors.** 422 bodies list every violated rule:
`{{"detail": [{{"field": "batch_size_tokens", "rule": "greater_than",
"message": "batch_size_tokens must be > 0"}}]}}`. Other errors:
`{{"detail": "trial 17 not found"}}`. One transaction per request: a rejected request
writes nothing. Text never holds NUL (rule `no_nul`), names are never blank (`blank`), booleans
are `true`/`false` only, numbers stay within a 64-bit float (`float_range`) and integers
within 2**63 - 1; a body over `HYPERLAW_MAX_BODY_BYTES` gets 413 before anything else.

**Lists** answer `{{"data": [...], "count": N}}` (N = all matches), paged by `limit`/`offset`.

**Non-finite floats.** {NONFINITE_NOTE}
"""


def create_app(
    settings: Settings | None = None,
    *,
    background: Sequence[BackgroundStarter] = (),
) -> FastAPI:
    """Build the app over ``settings.database_url``.

    Raises ``server.core.errors.SchemaOutdatedError`` when the database is not migrated to
    head.
    """
    settings = settings or get_settings()
    database = Database.from_url(settings.database_url)
    try:
        require_current_schema(database.engine)
    except BaseException:
        database.dispose()
        raise

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stops = [start(settings) for start in background]
        try:
            yield
        finally:
            for stop in reversed(stops):
                try:
                    stop()
                except Exception:
                    log.exception("stopping a background task failed")
            database.dispose()

    app = FastAPI(
        title="hyperlaw",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=HyperlawJSONResponse,
    )
    app.state.settings = settings
    app.state.database = database
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:  # off unless configured; outermost, so errors carry it too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    install_metrics(app)  # GET /metrics; its middleware outermost, to time every request
    # the hot path first: Starlette tries the routes in order (benchmarks/query.py)
    routers = (recommendations, experiments, families, trials, imports, fits, tokens, dashboard)
    for module in routers:
        app.include_router(module.router, prefix="/v1")
    app.include_router(dashboard.page)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(build_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
