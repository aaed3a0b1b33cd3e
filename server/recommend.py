"""Recommendations from the newest ok recommender fit, for the API and the command line.

``GET /v1/recommendations`` and ``hyperlaw recommend`` (which reads the database directly)
give the same body, built here: the fitted ``Recommender``'s answer
(:class:`fitting.recommender.Recommendation`, see ``server.schemas.RecommendationPublic``)
plus the fit it came from (``fit_ids``, ``fitted_at``, ``n_trials``, ``scope``).

Which fit serves: the newest fit of kind ``recommender`` with status ok in the scope
(``server.crud.latest_ok_fit``); a refit that failed or had too little data never replaces
it. Without one, ``NoFitError`` (503) says why (the last fit's status and reason) and how to
get one (:data:`HOW_TO_FIT`); an experiment that does not exist is ``NotFoundError`` (404).

The API keeps the loaded recommender of each scope in memory (:class:`RecommenderCache`):
at most once per check interval a request asks the database for the id of the newest ok fit
and reloads only when it changed, so a query costs no database round trip and no refit,
only the recommender's closed forms.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server import crud
from server.core.db import Database
from server.core.errors import NoFitError, NotFoundError
from server.models import Experiment
from server.worker.fits import RECOMMENDER_KIND
from server.worker.scopes import GLOBAL_SCOPE, experiment_scope, scope_experiment_id

if TYPE_CHECKING:
    from fitting.recommender import Recommendation, Recommender

HOW_TO_FIT = (
    "run `hyperlaw import steplaw` then `hyperlaw fit` to fit the bundled Step Law sweep, "
    "or run a sweep (`hyperlaw sweep CONFIG.yaml`); a running worker (`hyperlaw serve` or "
    "`hyperlaw worker`) fits new completed trials by itself"
)


def recommendation_body(
    answer: Recommendation, *, fit_id: int, fitted_at: dt.datetime | str, n_trials: int, scope: str
) -> dict[str, Any]:
    """The JSON body of a recommendation (API and CLI alike): the ``Recommendation``'s fields
    plus the fit it came from (``fit_ids``, ``fitted_at``, ``n_trials``, ``scope``)."""
    body = answer.as_dict()
    if isinstance(fitted_at, dt.datetime):
        fitted_at = fitted_at.isoformat()
    body.update(fit_ids=[fit_id], fitted_at=fitted_at, n_trials=n_trials, scope=scope)
    return body


# --- scopes --------------------------------------------------------------------------------


def resolve_scope(database: Database, experiment: str | None) -> str:
    """The scope of ``experiment``, an experiment id or name (None: the global scope).

    An id is taken as given, without a query (whether it exists matters only when no fit
    serves it: see :func:`load_served_fit`); a name is looked up and raises
    ``NotFoundError`` when no experiment has it.
    """
    if experiment is None:
        return GLOBAL_SCOPE
    if experiment.isdigit():
        return experiment_scope(int(experiment))
    with database.session() as session:
        found = session.scalar(select(Experiment.id).where(Experiment.name == experiment))
    if found is None:
        raise NotFoundError(f"experiment {experiment!r} not found")
    return experiment_scope(found)


def _no_fit(session: Session, scope: str) -> NoFitError | NotFoundError:
    """Why nothing serves ``scope``: its experiment does not exist (404), or no ok fit
    exists yet (503, with the last fit's status and reason and :data:`HOW_TO_FIT`)."""
    experiment_id = scope_experiment_id(scope)
    if experiment_id is not None and session.get(Experiment, experiment_id) is None:
        return NotFoundError(f"experiment {experiment_id} not found")
    last, _count = crud.list_fits(session=session, kind=RECOMMENDER_KIND, scope=scope, limit=1)
    why = f"; the last fit ({last[0].id}) is {last[0].status}: {last[0].message}" if last else ""
    return NoFitError(f"no recommender fit for scope {scope} yet{why}. To get one: {HOW_TO_FIT}")


# --- the fit that serves -------------------------------------------------------------------


@dataclass(frozen=True)
class ServedFit:
    """The recommender of one ok fit, ready to answer queries."""

    fit_id: int
    scope: str
    recommender: Recommender
    fitted_at: str  # ISO 8601, UTC
    n_trials: int

    def recommend(
        self,
        n_params: float,
        n_tokens: float,
        *,
        seq_len: int = 2048,
        batch_size_tokens: float | None = None,
    ) -> dict[str, Any]:
        """The recommendation body for (N, D[, seq_len][, imposed B in tokens]); raises
        ``fitting.results.ParameterError`` (naming the field and the rule) for bad input."""
        answer = self.recommender.recommend(
            n_params, n_tokens, seq_len=seq_len, batch_size_tokens=batch_size_tokens
        )
        return recommendation_body(
            answer,
            fit_id=self.fit_id,
            fitted_at=self.fitted_at,
            n_trials=self.n_trials,
            scope=self.scope,
        )


def load_served_fit(session: Session, scope: str) -> ServedFit:
    """The newest ok recommender fit of ``scope``, loaded. Raises ``NoFitError`` when there
    is none or it cannot be loaded, ``NotFoundError`` when the scope's experiment does not
    exist (module docstring)."""
    from fitting.recommender import Recommender

    fit = crud.latest_ok_fit(session=session, kind=RECOMMENDER_KIND, scope=scope)
    if fit is None:
        raise _no_fit(session, scope)
    try:
        recommender = Recommender.from_dict(fit.params or {})
    except (ValueError, KeyError, TypeError) as exc:
        # stored by another version of the recommender; the worker refits it (the state
        # version is part of the data watermark)
        raise NoFitError(
            f"fit {fit.id} of scope {scope} cannot be loaded ({exc}); a running worker refits it"
        ) from exc
    return ServedFit(
        fit_id=fit.id,
        scope=scope,
        recommender=recommender,
        fitted_at=fit.created_at.isoformat(),
        n_trials=fit.n_trials,
    )


def recommend_from_database(
    database: Database,
    *,
    n_params: float,
    n_tokens: float,
    seq_len: int = 2048,
    batch_size_tokens: float | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """The API's recommendation body, computed from the newest ok fit in ``database``
    without a server (``hyperlaw recommend``). ``experiment``: an id or name (default: the
    fit over all trials).

    Raises ``NotFoundError`` for an unknown experiment, ``NoFitError`` when no fit serves,
    ``fitting.results.ParameterError`` (a ``ValueError``) for bad parameters.
    """
    scope = resolve_scope(database, experiment)
    with database.session() as session:
        served = load_served_fit(session, scope)
    return served.recommend(
        n_params, n_tokens, seq_len=seq_len, batch_size_tokens=batch_size_tokens
    )


class RecommenderCache:
    """Per-scope cache of the newest ok recommender fit. Thread-safe.

    ``get(scope)`` answers from memory while the entry was checked within
    ``check_interval_s``; otherwise the caller must ``refresh(scope)`` (a database query,
    and a reload only when a newer ok fit exists).
    """

    def __init__(self, database: Database, check_interval_s: float):
        self._database = database
        self._interval = check_interval_s
        self._entries: dict[str, ServedFit] = {}
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, scope: str) -> ServedFit | None:
        """The entry while it is fresh; None when the caller must ``refresh``. A stale
        entry is claimed by one caller, who gets None and refreshes; callers in the
        meantime keep getting the entry."""
        entry = self._entries.get(scope)
        if entry is None:
            return None
        now = time.monotonic()
        if now - self._checked.get(scope, -math.inf) < self._interval:
            return entry
        self._checked[scope] = now  # claimed: this caller checks, the others serve
        return None

    def refresh(self, scope: str) -> ServedFit:
        """Reload when a newer ok fit exists. Raises as :func:`load_served_fit` does; when
        no ok fit exists any more, the scope's entry is forgotten too."""
        with self._lock:
            with self._database.session() as session:
                fit_id = crud.latest_ok_fit_id(session=session, kind=RECOMMENDER_KIND, scope=scope)
                if fit_id is None:
                    self._entries.pop(scope, None)
                    raise _no_fit(session, scope)
                entry = self._entries.get(scope)
                if entry is None or entry.fit_id != fit_id:
                    # a fit that cannot be loaded raises here and the entry held keeps
                    # serving, like a failed refit
                    entry = self._entries[scope] = load_served_fit(session, scope)
            self._checked[scope] = time.monotonic()
            return entry
