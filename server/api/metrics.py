"""Prometheus metrics of the service: ``GET /metrics``, in the text exposition format (or
OpenMetrics when the scraper asks for it in ``Accept``).

Each app has a registry of its own (``ServiceMetrics.registry``, never the process-wide
default one), installed by :func:`install_metrics`. ``/metrics`` follows the API's read auth
(open unless ``HYPERLAW_READ_REQUIRES_TOKEN=true``, then a read token), is left out of the
OpenAPI document and is counted like any other route.

Requests, measured by :class:`RequestMetrics`, a pure ASGI middleware around the whole app:

- ``hyperlaw_http_requests_total{method, route, status}``: requests answered.
- ``hyperlaw_http_request_duration_seconds{method, route, status}``: histogram of the time
  from the request's arrival to the end of its response (buckets 0.5 ms to 10 s: a query
  answers in about 1 ms, a batch of 10,000 points in about 200 ms).

  ``method`` is the HTTP method (``other`` beyond the usual seven); ``status`` the response's
  code; ``route`` the route's template, never the raw path (``/v1/trials/{trial_id}/points``,
  ``/static/{path}``), or ``unmatched`` for a request no route took: an unknown path, a
  redirect to the path with(out) its trailing slash, a body refused (413) before routing.

Ingest, counted when ``POST /v1/trials/{trial_id}/points`` answers 2xx:

- ``hyperlaw_points_stored_total``: points stored, the sum of those answers' ``count``.
- ``hyperlaw_point_batches_total``: batches stored (such answers).

Read from the database at scrape time, two grouped queries in one transaction:

- ``hyperlaw_trials{status}``: trials per status (all five, 0 included).
- ``hyperlaw_fit_last_ok_age_seconds{kind, scope}``: seconds since the newest ok fit of the
  (kind, scope) was stored; absent while it has none.
- ``hyperlaw_fit_last_duration_seconds{kind, scope}``: the last fit's ``quality["seconds"]``,
  whatever its status; absent when it has none.
- ``hyperlaw_fit_last_status{kind, scope, status}``: 1 for the last fit's status (``ok``,
  ``insufficient_data``, ``failed``), 0 for the others. "Last" is ``/v1/fits/latest``'s:
  the newest ``created_at``, then the highest id.
- ``hyperlaw_database_up``: 1 when those queries answered; 0 when the database did not, in
  which case the metrics above are left out of the scrape (a warning is logged) and the
  others are served as usual.

And what ``prometheus_client`` gives for free: ``process_*`` (CPU seconds, resident and
virtual memory, open file descriptors, start time; Linux), ``python_info`` and
``python_gc_*``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import and_, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.convertors import PathConvertor
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import require_read_apart
from server.core.db import Database
from server.core.errors import StorageUnavailableError
from server.models import Fit, Trial, TrialStatus

log = logging.getLogger(__name__)

#: Latency buckets, seconds: sub-millisecond reads up to a slow batch under load.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
FIT_STATUSES = ("ok", "insufficient_data", "failed")
#: The scope key under which the points route leaves the count it stored.
POINTS_STORED = "hyperlaw.points_stored"


def note_points_stored(request: Request, count: int) -> None:
    """Say that this request stored ``count`` points; counted once its answer is 2xx."""
    request.scope[POINTS_STORED] = count


# --- the database-backed metrics -----------------------------------------------------------


def _families() -> dict[str, GaugeMetricFamily]:
    return {
        "trials": GaugeMetricFamily("hyperlaw_trials", "Trials per status.", labels=["status"]),
        "age": GaugeMetricFamily(
            "hyperlaw_fit_last_ok_age_seconds",
            "Seconds since the newest ok fit of the (kind, scope) was stored.",
            labels=["kind", "scope"],
        ),
        "duration": GaugeMetricFamily(
            "hyperlaw_fit_last_duration_seconds",
            "The last fit's duration (its quality['seconds']), whatever its status.",
            labels=["kind", "scope"],
        ),
        "status": GaugeMetricFamily(
            "hyperlaw_fit_last_status",
            "1 for the status of the last fit of the (kind, scope), 0 for the others.",
            labels=["kind", "scope", "status"],
        ),
        "up": GaugeMetricFamily(
            "hyperlaw_database_up",
            "1 when the database answered this scrape's queries, else 0 (and the "
            "database-backed metrics are left out).",
        ),
    }


def _last_fits_query() -> Any:
    """Per (kind, scope): the newest ok fit's time and the last fit's id, status and
    seconds (several rows where fits tie on ``created_at``: the highest id wins)."""
    newest = (
        select(
            Fit.kind,
            Fit.scope,
            func.max(Fit.created_at).label("last_at"),
            func.max(case((Fit.status == "ok", Fit.created_at))).label("last_ok_at"),
        )
        .group_by(Fit.kind, Fit.scope)
        .subquery()
    )
    return select(
        newest.c.kind,
        newest.c.scope,
        newest.c.last_ok_at,
        Fit.id,
        Fit.status,
        Fit.quality["seconds"].as_float().label("seconds"),
    ).join(
        Fit,
        and_(
            Fit.kind == newest.c.kind,
            Fit.scope == newest.c.scope,
            Fit.created_at == newest.c.last_at,
        ),
    )


class StoreCollector(Collector):
    """The trials and fits metrics, read from the database at each scrape."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def describe(self) -> Iterable[Metric]:
        return list(_families().values())

    def collect(self) -> Iterable[Metric]:
        families = _families()
        try:
            with self.database.session() as session:
                trials = dict(
                    session.execute(select(Trial.status, func.count()).group_by(Trial.status))
                    .tuples()
                    .all()
                )
                fits = session.execute(_last_fits_query()).all()
        except (StorageUnavailableError, SQLAlchemyError) as exc:
            log.warning("/metrics: the database did not answer, its metrics are left out: %s", exc)
            families["up"].add_metric([], 0)
            return [families["up"]]
        now = time.time()
        for trial_status in TrialStatus:
            families["trials"].add_metric([trial_status.value], trials.get(trial_status.value, 0))
        last: dict[tuple[str, str], Any] = {}
        for row in fits:
            key = (row.kind, row.scope)
            if key not in last or row.id > last[key].id:
                last[key] = row
        for (kind, scope), row in sorted(last.items()):
            if row.last_ok_at is not None:
                families["age"].add_metric([kind, scope], now - row.last_ok_at.timestamp())
            if row.seconds is not None:
                families["duration"].add_metric([kind, scope], row.seconds)
            for fit_status in FIT_STATUSES:
                families["status"].add_metric(
                    [kind, scope, fit_status], int(row.status == fit_status)
                )
        families["up"].add_metric([], 1)
        return list(families.values())


# --- the request metrics -------------------------------------------------------------------


class ServiceMetrics:
    """One app's collectors, in a registry of their own."""

    def __init__(self, database: Database) -> None:
        self.registry = CollectorRegistry()
        labels = ("method", "route", "status")
        self.requests = Counter(
            "hyperlaw_http_requests", "HTTP requests answered.", labels, registry=self.registry
        )
        self.latency = Histogram(
            "hyperlaw_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            labels,
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.points = Counter(
            "hyperlaw_points_stored",
            "Loss-curve points stored by POST /v1/trials/{trial_id}/points (its count).",
            registry=self.registry,
        )
        self.batches = Counter(
            "hyperlaw_point_batches",
            "Point batches stored by POST /v1/trials/{trial_id}/points.",
            registry=self.registry,
        )
        self.registry.register(StoreCollector(database))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)  # each registers only where it has data
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:  # once per label set: labels() is the slow part
            values = (method, route, str(status))
            children = (self.requests.labels(*values), self.latency.labels(*values))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


def _route_shape(route: BaseRoute) -> tuple[str, int]:
    """A route's own template and its count of "/", -1 where no prefix can be told apart
    (a parameter that may span segments)."""
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return UNMATCHED, -1
    convertors = getattr(route, "param_convertors", {})
    if any(isinstance(c, PathConvertor) for c in convertors.values()):
        return template, -1
    return template, template.count("/")


def _route_template(shape: tuple[str, int], path: str) -> str:
    """The template of the route of ``shape`` that took ``path``, with the prefix of the
    router that included it: a route keeps its own path (``/trials/{trial_id}``), and the
    prefix (``/v1``) is the leading segments of the path that the template does not hold
    (the prefix routed the request, so it is always the same text)."""
    template, slashes = shape
    extra = path.count("/") - slashes
    if slashes < 0 or extra <= 0:
        return template
    return "/".join(path.split("/", extra + 1)[: extra + 1]) + template


class RequestMetrics:
    """Count and time every HTTP request by method, route template and status (module
    docstring); a pure ASGI middleware, so the hot path pays a few microseconds."""

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics, routes: list[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's, for routes that leave no "route" in the scope
        self._shapes: dict[int, tuple[str, int]] = {}  # by id: a route lives as its app
        self._by_endpoint: dict[int, str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = self._route(scope)
            self.metrics.observe(method, route, status, time.perf_counter() - started)
            stored = scope.get(POINTS_STORED)
            if stored is not None and 200 <= status < 300:
                self.metrics.points.inc(stored)
                self.metrics.batches.inc()

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            shape = self._shapes.get(id(route))
            if shape is None:  # once per route
                shape = self._shapes[id(route)] = _route_shape(route)
            return _route_template(shape, scope["path"])
        # FastAPI routes only its own routes this way; plain Starlette routes (/openapi.json,
        # /docs) and mounts (/static) are known by the endpoint they left in the scope
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return UNMATCHED
        if self._by_endpoint is None:
            self._by_endpoint = {}
            for each in self.routes:
                if isinstance(each, Mount):
                    self._by_endpoint[id(each.app)] = each.path + "/{path}"
                elif isinstance(each, Route):
                    self._by_endpoint[id(each.endpoint)] = each.path_format
        return self._by_endpoint.get(id(endpoint), UNMATCHED)


# --- the route -----------------------------------------------------------------------------


async def metrics_endpoint(request: Request) -> Response:
    """The app's metrics, in the format the scraper's ``Accept`` asks for (text by default).
    Collected off the event loop: the database-backed ones run two queries."""
    metrics: ServiceMetrics = request.app.state.metrics
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    body = await run_in_threadpool(encode, metrics.registry)
    return Response(body, media_type=content_type)


def install_metrics(app: FastAPI) -> ServiceMetrics:
    """Give ``app`` its metrics (``app.state.metrics``), the middleware that measures its
    requests (added outermost when called after the other middleware) and ``GET /metrics``,
    behind the read auth and out of the OpenAPI document."""
    metrics = ServiceMetrics(app.state.database)
    app.state.metrics = metrics
    app.add_middleware(RequestMetrics, metrics=metrics, routes=app.router.routes)
    app.add_api_route(
        "/metrics",
        metrics_endpoint,
        methods=["GET"],
        include_in_schema=False,
        dependencies=[Depends(require_read_apart)],
        response_class=Response,
    )
    return metrics
