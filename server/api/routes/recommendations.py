"""``GET /v1/recommendations``: η, B and the critical batch size for (N, D) from the newest
ok recommender fit.

The fitted ``Recommender`` is loaded once per scope and kept in memory
(``RecommenderCache``); at most once per ``CHECK_INTERVAL_S`` a request asks the database
for the id of the newest ok fit and reloads when it changed. A query therefore costs no
database round trip and no refit, only the recommender's closed forms.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.api.deps import authorize, bearer_scheme
from server.core.db import session_scope
from client.wire import dumps
from server.core.errors import FieldError, HyperlawError, InputError, NotFoundError
from server.models import Experiment, Fit, TokenScope
from server.worker import (
    GLOBAL_SCOPE,
    RECOMMENDER_KIND,
    experiment_scope,
    latest_ok_fit,
    latest_ok_fit_id,
    recommendation_body,
)

CHECK_INTERVAL_S = 1.0

HOW_TO_FIT = (
    "run `hyperlaw import steplaw` then `hyperlaw fit` to fit the bundled Step Law sweep, "
    "or run a sweep (`hyperlaw sweep CONFIG.yaml`); a running worker (`hyperlaw serve` or "
    "`hyperlaw worker`) fits new completed trials by itself"
)


class NoFitError(HyperlawError):
    """No ok recommender fit exists for the scope (503: retry once a fit is stored)."""

    status_code = 503


@dataclass(frozen=True)
class ServedFit:
    """The recommender of one ok fit, ready to answer queries."""

    fit_id: int
    scope: str
    recommender: Any  # fitting.recommender.Recommender
    fitted_at: str
    n_trials: int


class RecommenderCache:
    """Per-scope cache of the newest ok recommender fit. Thread-safe.

    ``get(scope)`` answers from memory while the entry was checked within
    ``check_interval_s``; otherwise the caller must ``refresh(scope)`` (a database query,
    and a reload only when a newer ok fit exists).
    """

    def __init__(self, session_factory: sessionmaker[Session], check_interval_s: float):
        self._factory = session_factory
        self._interval = check_interval_s
        self._entries: dict[str, ServedFit | None] = {}
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, scope: str) -> tuple[ServedFit | None, bool]:
        """(entry, fresh). A stale entry is handed out with fresh=False to one caller, who
        must ``refresh``; callers in the meantime keep serving the entry."""
        entry = self._entries.get(scope)
        if entry is None:
            return None, False
        now = time.monotonic()
        if now - self._checked.get(scope, -math.inf) < self._interval:
            return entry, True
        self._checked[scope] = now  # claimed: this caller checks, the others serve
        return entry, False

    def refresh(self, scope: str) -> ServedFit:
        """Reload when a newer ok fit exists; raises ``NoFitError`` when there is none."""
        from fitting.recommender import Recommender

        with self._lock:
            with session_scope(self._factory) as session:
                fit_id = latest_ok_fit_id(session, scope)
                if fit_id is None:
                    last = session.scalars(
                        select(Fit).where(Fit.kind == RECOMMENDER_KIND, Fit.scope == scope)
                        .order_by(Fit.id.desc()).limit(1)
                    ).first()
                    self._entries.pop(scope, None)
                    why = (f"; the last fit ({last.id}) is {last.status}: {last.message}"
                           if last is not None else "")
                    raise NoFitError(f"no recommender fit for scope {scope} yet{why}. "
                                     f"To get one: {HOW_TO_FIT}")
                entry = self._entries.get(scope)
                if entry is None or entry.fit_id != fit_id:
                    fit = latest_ok_fit(session, scope)
                    try:
                        recommender = Recommender.from_dict(fit.params)
                    except (ValueError, KeyError, TypeError) as exc:
                        # stored by another version of the recommender; the worker refits
                        # (the state version is part of the data watermark)
                        raise NoFitError(f"fit {fit.id} of scope {scope} cannot be loaded "
                                         f"({exc}); a running worker refits it") from exc
                    entry = ServedFit(fit_id=fit.id, scope=scope, recommender=recommender,
                                      fitted_at=fit.created_at.isoformat(),
                                      n_trials=fit.n_trials)
                    self._entries[scope] = entry
            self._checked[scope] = time.monotonic()
            return entry


def _cache(request: Request) -> RecommenderCache:
    state = request.app.state
    cache = getattr(state, "recommender_cache", None)
    if cache is None:
        cache = state.recommender_cache = RecommenderCache(state.session_factory,
                                                           CHECK_INTERVAL_S)
    return cache


def _read_auth(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Read scope, checked only when the service requires tokens for reads (no database
    session otherwise: this route must stay cheap)."""
    if not request.app.state.settings.read_requires_token:
        return
    with session_scope(request.app.state.session_factory) as session:
        authorize(TokenScope.READ, request, session, credentials)


def _resolve_scope(request: Request, experiment: str | None) -> str:
    if experiment is None:
        return GLOBAL_SCOPE
    if experiment.isdigit():
        return experiment_scope(int(experiment))
    with session_scope(request.app.state.session_factory) as session:
        found = session.scalar(select(Experiment.id).where(Experiment.name == experiment))
    if found is None:
        raise NotFoundError(f"experiment {experiment!r} not found")
    return experiment_scope(found)


def _check_experiment(request: Request, scope: str) -> None:
    experiment_id = int(scope.split(":", 1)[1])
    with session_scope(request.app.state.session_factory) as session:
        if session.get(Experiment, experiment_id) is None:
            raise NotFoundError(f"experiment {experiment_id} not found")


router = APIRouter(tags=["recommendations"])


@router.get(
    "/recommendations",
    responses={
        200: {"description": (
            "`learning_rate`, `batch_size_tokens`, `batch_size_sequences`, "
            "`critical_batch_size_tokens`, each with `<name>_interval` "
            "(`{low, high, level}`, a 90 % group-bootstrap percentile interval), `sources`, "
            "`warnings` (e.g. extrapolation outside the fitted N or D range, stating it), "
            "`fit_ids`, `fitted_at`, `n_trials`, `scope`. With `batch_size_tokens`: "
            "`learning_rate_for_batch` (+ interval), `step_overhead` and `token_overhead` "
            "versus the critical batch size.")},
        404: {"description": "the named experiment does not exist"},
        422: {"description": "a parameter is missing or breaks its rule"},
        503: {"description": "no ok fit yet; the message says how to get one"},
    },
)
async def get_recommendation(
    request: Request,
    n_params: Annotated[float, Query(gt=0, allow_inf_nan=False,
                                     description="non-embedding parameters N")],
    n_tokens: Annotated[float, Query(gt=0, allow_inf_nan=False,
                                     description="training tokens D")],
    _auth: Annotated[None, Depends(_read_auth)],
    seq_len: Annotated[int, Query(gt=0, le=2**31 - 1, description="tokens per sequence")]
    = 2048,
    batch_size_tokens: Annotated[float | None, Query(
        gt=0, allow_inf_nan=False,
        description="impose this global batch size (tokens): adds the best η for it and "
                    "its step/token overhead versus the critical batch size")] = None,
    experiment: Annotated[str | None, Query(
        min_length=1, max_length=200,
        description="experiment id or name: use that experiment's fit instead of the "
                    "global one")] = None,
) -> Response:
    """Recommend the peak learning rate η*, batch size B* and critical batch size for a
    model of ``n_params`` trained on ``n_tokens`` (formulas: ``fitting.recommender``)."""
    scope = GLOBAL_SCOPE if experiment is None else await run_in_threadpool(
        _resolve_scope, request, experiment)
    cache = _cache(request)
    entry, fresh = cache.get(scope)
    if not fresh:
        try:
            entry = await run_in_threadpool(cache.refresh, scope)
        except NoFitError:
            if experiment is not None:  # an unknown experiment id is a 404, not a 503
                await run_in_threadpool(_check_experiment, request, scope)
            raise
    try:
        answer = entry.recommender.recommend(n_params, n_tokens, seq_len=seq_len,
                                             batch_size_tokens=batch_size_tokens)
    except ValueError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        raise InputError([FieldError(field=field, rule="value", message=message)]) from exc
    body = recommendation_body(answer, fit_id=entry.fit_id, fitted_at=entry.fitted_at,
                               n_trials=entry.n_trials, scope=scope)
    return Response(dumps(body).encode(), media_type="application/json")
