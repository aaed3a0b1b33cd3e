"""The FastAPI application factory.

``create_app(settings, background=...)`` opens the database (``app.state.database``, a
``server.core.db.Database`` disposed at shutdown), refuses to start when its schema is not
at the head revision (``SchemaOutdatedError``, naming ``hyperlaw db upgrade``), mounts the
``/v1`` routers and maps errors to JSON bodies:

- 422: ``{"detail": [{"field": "batch_size_tokens", "rule": "gt",
  "message": "batch_size_tokens must be > 0"}]}`` -- one entry per violated rule, ``field``
  a dotted path into the body or the query parameter's name (``points.3.step``);
- 401/403/404/409/503: ``{"detail": "trial 17 not found"}``;
- 500: ``{"detail": "internal error: <exception type>"}`` (details go to the log).

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
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from client.wire import dumps
from server.api.routes import experiments, families, fits, recommendations, trials
from server.core.config import Settings, get_settings
from server.core.db import Database, require_current_schema
from server.core.errors import HyperlawError, InputError
from server.schemas import NONFINITE_NOTE

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
}


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
    async def _integrity(_request: Request, exc: IntegrityError):
        return HyperlawJSONResponse(
            {"detail": f"conflicts with stored data: {exc.orig}"}, status_code=409
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return HyperlawJSONResponse(
            {"detail": f"internal error: {type(exc).__name__}"}, status_code=500
        )


DESCRIPTION = f"""
Trial store and recommendations for learning rate, batch size and critical batch size.

**Auth.** Writes need `Authorization: Bearer <token>` with write scope
(`hyperlaw token create --name NAME --scope write`); reads are open unless
`HYPERLAW_READ_REQUIRES_TOKEN=true`. 401: no token or a bad/revoked one; 403: the token lacks
the scope.

**Errors.** 422 bodies list every violated rule:
`{{"detail": [{{"field": "batch_size_tokens", "rule": "greater_than",
"message": "batch_size_tokens must be > 0"}}]}}`. Other errors:
`{{"detail": "trial 17 not found"}}`. One transaction per request: a rejected request
writes nothing.

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
    for module in (experiments, families, trials, fits, recommendations):
        app.include_router(module.router, prefix="/v1")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
