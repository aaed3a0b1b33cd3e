"""Recommendations from the newest ok recommender fit, for the API and the command line.

``GET /v1/recommendations`` and ``hyperlaw recommend`` (which reads the database directly)
give the same body, built here: the fitted ``Recommender``'s answer
(:class:`fitting.recommender.Recommendation`, see
``server.recommendation_schemas.RecommendationPublic``) plus the fit it came from
(``family``, ``fit_key``, ``fit_ids``, ``fitted_at``, ``n_trials``, ``scope``).

Which scope (:func:`resolve_scope`): the family named by the query (``family:<name>``), else
the experiment named by id or name (``experiment:<id>``, its own trials' fit), else the
default family (``HYPERLAW_DEFAULT_FAMILY``, ``step-law`` out of the box). A family and an
experiment together are a 422 (``InputError``, rule ``exclusive``).

Which fit serves: the newest fit of kind ``recommender`` with status ok in the scope
(``server.crud.latest_ok_fit``); a refit that failed or had too little data never replaces
it. Without one, ``NoFitError`` (503) says why (the last fit's status and reason) and how to
get one (:data:`HOW_TO_FIT`). An experiment that does not exist is ``NotFoundError`` (404),
and so is a family that holds no experiment when the query named it (the message lists the
known families); when it is the default family, 503 says so and how to get a fit.

The API keeps the loaded recommender of each scope in memory (:class:`RecommenderCache`):
at most once per check interval a request asks the database for the id of the newest ok fit
and reloads only when it changed, so a query costs no database round trip and no refit,
only the recommender's closed forms, and those once per fit: each :class:`ServedFit` keeps
the encoded bodies of its last :data:`ANSWERS_PER_FIT` distinct queries
(:meth:`ServedFit.answer`). A new fit is a new ``ServedFit`` with none, so it answers from
the first request after the check that found it.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from client.wire import dumps
from fitting.results import ParameterError
from server import crud
from server.core.config import STEP_LAW_FAMILY
from server.core.db import Database
from server.core.errors import FieldError, HyperlawError, InputError, NoFitError, NotFoundError
from server.families import family_names
from server.models import Experiment
from server.worker.fits import RECOMMENDER_KIND
from server.worker.scopes import (
    experiment_scope,
    family_scope,
    scope_experiment_id,
    scope_family,
)

if TYPE_CHECKING:
    from fitting.recommender import Recommendation, Recommender

HOW_TO_FIT = (
    "run `hyperlaw import steplaw` then `hyperlaw fit` to fit the bundled Step Law sweep "
    "(family step-law), "
    "or run a sweep (`hyperlaw sweep CONFIG.yaml`); a running worker (`hyperlaw serve` or "
    "`hyperlaw worker`) fits new completed trials by itself"
)
#: Encoded answers one served fit keeps, least recently used dropped first (~2 kB each).
ANSWERS_PER_FIT = 1024


def recommendation_body(
    answer: Recommendation,
    *,
    fit_id: int,
    fitted_at: dt.datetime | str,
    n_trials: int,
    scope: str,
    fit_key: str | None = None,
) -> dict[str, Any]:
    """The JSON body of a recommendation (API and CLI alike): the ``Recommendation``'s fields
    plus the fit it came from (``family``, ``fit_key``, ``fit_ids``, ``fitted_at``,
    ``n_trials``, ``scope``)."""
    body = answer.as_dict()
    if isinstance(fitted_at, dt.datetime):
        fitted_at = fitted_at.isoformat()
    body.update(
        family=scope_family(scope),
        fit_key=fit_key,
        fit_ids=[fit_id],
        fitted_at=fitted_at,
        n_trials=n_trials,
        scope=scope,
    )
    return body


# --- scopes --------------------------------------------------------------------------------


def resolve_scope(
    database: Database,
    experiment: str | None = None,
    family: str | None = None,
    *,
    default_family: str = STEP_LAW_FAMILY,
) -> str:
    """The scope a query asks for (module docstring): ``family:<family>``, else the scope of
    ``experiment`` (an id or a name), else ``family:<default_family>``.

    Only an experiment's name costs a query: an id is taken as given and a family by its
    name (whether they exist matters only when no fit serves them: see
    :class:`RecommenderCache`); a name that no experiment has raises ``NotFoundError``.
    Both an experiment and a family raise ``InputError``.
    """
    if experiment is not None and family is not None:
        message = (
            "family and experiment are exclusive: family=NAME asks for the family's fit, "
            "experiment=ID|NAME for one experiment's own fit"
        )
        raise InputError([FieldError(field="family", rule="exclusive", message=message)])
    if experiment is None:
        return family_scope(family or default_family)
    if experiment.isdigit():
        return experiment_scope(int(experiment))
    with database.session() as session:
        found = session.scalar(select(Experiment.id).where(Experiment.name == experiment))
    if found is None:
        raise NotFoundError(f"experiment {experiment!r} not found")
    return experiment_scope(found)


def _unknown_family(session: Session, family: str, *, by_default: bool) -> HyperlawError | None:
    """None when ``family`` holds an experiment; else 404 naming the known families, or, for
    the default family, 503 saying how to get a fit."""
    if session.scalar(select(Experiment.id).where(Experiment.family == family).limit(1)):
        return None
    known = family_names(session=session)
    listed = ", ".join(known[:50]) + (f" and {len(known) - 50} more" if len(known) > 50 else "")
    listed = listed or "none yet"
    if by_default:
        return NoFitError(
            f"no recommender fit for the default family {family!r} (HYPERLAW_DEFAULT_FAMILY): "
            f"no experiment is in it; known families: {listed} (ask with family=NAME). "
            f"To get one: {HOW_TO_FIT}"
        )
    return NotFoundError(f"family {family!r} not found; known families: {listed}")


def _no_fit(session: Session, scope: str, *, by_default: bool = False) -> HyperlawError:
    """Why nothing serves ``scope``: its experiment or family does not exist (404, see
    :func:`_unknown_family`), or no ok fit exists yet (503, with the last fit's status and
    reason and :data:`HOW_TO_FIT`)."""
    experiment_id, family = scope_experiment_id(scope), scope_family(scope)
    if experiment_id is not None and session.get(Experiment, experiment_id) is None:
        return NotFoundError(f"experiment {experiment_id} not found")
    if family is not None:
        unknown = _unknown_family(session, family, by_default=by_default)
        if unknown is not None:
            return unknown
    last, _count = crud.list_fits(session=session, kind=RECOMMENDER_KIND, scope=scope, limit=1)
    why = f"; the last fit ({last[0].id}) is {last[0].status}: {last[0].message}" if last else ""
    return NoFitError(f"no recommender fit for scope {scope} yet{why}. To get one: {HOW_TO_FIT}")


# --- the fit that serves -------------------------------------------------------------------


def answer_key(
    n_params: float, n_tokens: float, seq_len: int, batch_size_tokens: float | None
) -> tuple[float, float, int, float | None]:
    """The key :meth:`ServedFit.answer` keeps a query's body under."""
    return (n_params, n_tokens, seq_len, batch_size_tokens)


@dataclass(frozen=True)
class ServedFit:
    """The recommender of one ok fit, ready to answer queries. ``answer`` (its cache) is
    for one thread at a time: the API calls it on the event loop."""

    fit_id: int
    scope: str
    recommender: Recommender
    fitted_at: str  # ISO 8601, UTC
    n_trials: int
    fit_key: str | None = None
    # (n_params, n_tokens, seq_len, batch_size_tokens) -> encoded body, least recent first
    _answers: OrderedDict[tuple, bytes] = field(
        default_factory=OrderedDict, init=False, repr=False, compare=False
    )

    def answer(
        self,
        n_params: float,
        n_tokens: float,
        *,
        seq_len: int = 2048,
        batch_size_tokens: float | None = None,
    ) -> bytes:
        """The body of :meth:`recommend`, JSON-encoded (``client.wire.dumps``, UTF-8):
        computed once per distinct query and kept (:data:`ANSWERS_PER_FIT`). Raises as
        :meth:`recommend` does; errors are not kept."""
        key = answer_key(n_params, n_tokens, seq_len, batch_size_tokens)
        body = self.kept_answer(key)
        if body is not None:
            return body
        body = dumps(
            self.recommend(n_params, n_tokens, seq_len=seq_len, batch_size_tokens=batch_size_tokens)
        ).encode()
        self._answers[key] = body
        if len(self._answers) > ANSWERS_PER_FIT:
            self._answers.popitem(last=False)
        return body

    def kept_answer(self, key: tuple) -> bytes | None:
        """The body :meth:`answer` keeps for ``key`` (:func:`answer_key`), or None;
        computes nothing."""
        body = self._answers.get(key)
        if body is not None:
            self._answers.move_to_end(key)
        return body

    def recommend(
        self,
        n_params: float,
        n_tokens: float,
        *,
        seq_len: int = 2048,
        batch_size_tokens: float | None = None,
    ) -> dict[str, Any]:
        """The recommendation body for (N, D[, seq_len][, imposed B in tokens]); raises
        ``fitting.results.ParameterError`` (naming the field and the rule) for bad input,
        and for input so far from the fit that its laws overflow (rule ``evaluable``)."""
        try:
            answer = self.recommender.recommend(
                n_params, n_tokens, seq_len=seq_len, batch_size_tokens=batch_size_tokens
            )
        except ArithmeticError as exc:  # OverflowError, ZeroDivisionError
            raise self._not_evaluable(n_params, n_tokens, seq_len, batch_size_tokens) from exc
        return recommendation_body(
            answer,
            fit_id=self.fit_id,
            fitted_at=self.fitted_at,
            n_trials=self.n_trials,
            scope=self.scope,
            fit_key=self.fit_key,
        )

    def _not_evaluable(
        self, n_params: float, n_tokens: float, seq_len: int, batch_size_tokens: float | None
    ) -> ParameterError:
        """The error for a query whose answer overflows: the imposed batch size when the
        answer without it is fine, else (N, D)."""
        if batch_size_tokens is not None:
            try:
                best = self.recommender.recommend(n_params, n_tokens, seq_len=seq_len)
            except ArithmeticError:
                pass
            else:
                message = (
                    f"batch_size_tokens={batch_size_tokens:g} is too far from this fit's "
                    f"B* = {best.batch_size_tokens:.4g} tokens for its laws to be evaluated "
                    "(they overflow); impose a batch size closer to it"
                )
                return ParameterError("batch_size_tokens", "evaluable", message)
        message = (
            f"n_params={n_params:g} with n_tokens={n_tokens:g} is too far from the fitted "
            "range for this fit's laws to be evaluated (they overflow)"
        )
        return ParameterError("n_params", "evaluable", message)


def load_served_fit(session: Session, scope: str, *, by_default: bool = False) -> ServedFit:
    """The newest ok recommender fit of ``scope``, loaded. Raises ``NoFitError`` when there
    is none or it cannot be loaded, ``NotFoundError`` when the scope's experiment or family
    does not exist (module docstring; ``by_default``: the family is the default one)."""
    from fitting.recommender import Recommender

    family = scope_family(scope)
    unknown = None if family is None else _unknown_family(session, family, by_default=by_default)
    if unknown is not None:
        raise unknown
    fit = crud.latest_ok_fit(session=session, kind=RECOMMENDER_KIND, scope=scope)
    if fit is None:
        raise _no_fit(session, scope, by_default=by_default)
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
        fit_key=(fit.quality or {}).get("fit_key"),
    )


def recommend_from_database(
    database: Database,
    *,
    n_params: float,
    n_tokens: float,
    seq_len: int = 2048,
    batch_size_tokens: float | None = None,
    experiment: str | None = None,
    family: str | None = None,
    default_family: str = STEP_LAW_FAMILY,
) -> dict[str, Any]:
    """The API's recommendation body, computed from the newest ok fit in ``database``
    without a server (``hyperlaw recommend``). ``family`` or ``experiment`` (an id or name)
    choose the fit, as :func:`resolve_scope` says (default: ``default_family``'s).

    Raises ``NotFoundError`` for an unknown experiment or family, ``NoFitError`` when no fit
    serves, ``InputError`` for both a family and an experiment,
    ``fitting.results.ParameterError`` (a ``ValueError``) for bad parameters.
    """
    scope = resolve_scope(database, experiment, family, default_family=default_family)
    by_default = experiment is None and family is None
    with database.session() as session:
        served = load_served_fit(session, scope, by_default=by_default)
    return served.recommend(
        n_params, n_tokens, seq_len=seq_len, batch_size_tokens=batch_size_tokens
    )


class RecommenderCache:
    """Per-scope cache of the newest ok recommender fit. Thread-safe.

    ``get(scope)`` answers from memory while the entry was checked within
    ``check_interval_s``; otherwise the caller must ``refresh(scope)`` (a database query or
    two, and a reload only when a newer ok fit exists). A family that no longer holds an
    experiment stops serving at the next check.
    """

    def __init__(self, database: Database, check_interval_s: float):
        self._database = database
        self._interval = check_interval_s
        self._entries: dict[str, ServedFit] = {}
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def peek(self, scope: str) -> ServedFit | None:
        """The entry while it is fresh, else None; unlike :meth:`get` it never claims the
        check, so a caller that gets None must go on to ``get``."""
        entry = self._entries.get(scope)
        return entry if entry is not None and self._fresh(scope, time.monotonic()) else None

    def _fresh(self, scope: str, now: float) -> bool:
        """Whether ``scope`` was checked against the database within the interval."""
        return now - self._checked.get(scope, -math.inf) < self._interval

    def get(self, scope: str) -> ServedFit | None:
        """The entry while it is fresh; None when the caller must ``refresh``. A stale
        entry is claimed by one caller, who gets None and refreshes; callers in the
        meantime keep getting the entry."""
        entry = self._entries.get(scope)
        if entry is None:
            return None
        now = time.monotonic()
        if self._fresh(scope, now):
            return entry
        self._checked[scope] = now  # claimed: this caller checks, the others serve
        return None

    def refresh(self, scope: str, *, by_default: bool = False) -> ServedFit:
        """Reload when a newer ok fit exists. Raises as :func:`load_served_fit` does; when
        no ok fit exists any more (or the family no experiment), the scope's entry is
        forgotten too. ``by_default``: the scope is the default family's."""
        with self._lock:
            with self._database.session() as session:
                family = scope_family(scope)
                if family is not None:
                    unknown = _unknown_family(session, family, by_default=by_default)
                    if unknown is not None:
                        self._entries.pop(scope, None)
                        raise unknown
                fit_id = crud.latest_ok_fit_id(session=session, kind=RECOMMENDER_KIND, scope=scope)
                if fit_id is None:
                    self._entries.pop(scope, None)
                    raise _no_fit(session, scope, by_default=by_default)
                entry = self._entries.get(scope)
                if entry is None or entry.fit_id != fit_id:
                    # a fit that cannot be loaded raises here and the entry held keeps
                    # serving, like a failed refit
                    entry = self._entries[scope] = load_served_fit(
                        session, scope, by_default=by_default
                    )
            self._checked[scope] = time.monotonic()
            return entry
