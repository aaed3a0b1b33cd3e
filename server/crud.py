"""Database operations behind the routes (loss-curve points: ``server.points``; families:
``server.families``). Every function takes a keyword-only ``session``
and leaves commit/rollback to ``server.core.db.session_scope`` (one transaction per request).

Missing objects raise ``NotFoundError``; requests that contradict stored state raise
``ConflictError``. Nothing here knows about HTTP.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.core.errors import ConflictError, FieldError, InputError, NotFoundError
from server.models import (
    FINISHED_STATUSES,
    ApiToken,
    Experiment,
    Fit,
    TokenScope,
    Trial,
    TrialSource,
    TrialStatus,
    utcnow,
)
from server.schemas import BLANK_TEXT, NO_NUL_TEXT, ExperimentCreate, TrialCreate, TrialUpdate
from server.trial_results import check_target, store_b_simple_summary

log = logging.getLogger(__name__)

TRIALS_CHANNEL = "hyperlaw_trials"
TOKEN_PREFIX = "hl_"


def _page(session: Session, stmt: Select, *, limit: int, offset: int) -> tuple[list[Any], int]:
    count = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
    rows = session.scalars(stmt.limit(limit).offset(offset)).all()
    return list(rows), int(count or 0)


def notify_trial(*, session: Session, trial_id: int) -> None:
    """Tell LISTENers on ``hyperlaw_trials`` (PostgreSQL only) that a trial has results;
    ``pg_notify`` is transactional: the message goes out when the request commits."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": TRIALS_CHANNEL, "payload": str(trial_id)},
        )


# --- experiments ---------------------------------------------------------------------------


def create_experiment(
    *, session: Session, experiment_in: ExperimentCreate
) -> tuple[Experiment, bool]:
    """Get or create the experiment named ``experiment_in.name``; returns (it, created). A
    family given explicitly that differs from the stored experiment's is a ``ConflictError``:
    moving an experiment is ``PATCH``'s job (``server.families.move_experiment``)."""
    named = select(Experiment).where(Experiment.name == experiment_in.name)
    existing = session.scalar(named)
    if existing is None:
        experiment = Experiment(**experiment_in.model_dump())
        try:
            with session.begin_nested():
                session.add(experiment)
            return experiment, True
        except IntegrityError:  # created concurrently by another request
            existing = session.scalar(named)
            if existing is None:
                raise
    if "family" in experiment_in.model_fields_set and existing.family != experiment_in.family:
        raise ConflictError(
            f"experiment {existing.name!r} is in family {existing.family!r}, not "
            f"{experiment_in.family!r}; to move it: PATCH /v1/experiments/{existing.id}"
        )
    return existing, False


def get_experiment(*, session: Session, experiment_id: int) -> Experiment:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise NotFoundError(f"experiment {experiment_id} not found")
    return experiment


def list_experiments(
    *,
    session: Session,
    name: str | None = None,
    family: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Experiment], int]:
    stmt = select(Experiment).order_by(Experiment.id)
    if name is not None:
        stmt = stmt.where(Experiment.name == name)
    if family is not None:
        stmt = stmt.where(Experiment.family == family)
    return _page(session, stmt, limit=limit, offset=offset)


# --- trials --------------------------------------------------------------------------------


def _find_by_key(session: Session, experiment_id: int, key: str) -> Trial | None:
    return session.scalar(
        select(Trial).where(Trial.experiment_id == experiment_id, Trial.idempotency_key == key)
    )


def create_trial(
    *, session: Session, trial_in: TrialCreate, token: ApiToken | None = None
) -> tuple[Trial, bool]:
    """Create a trial; returns (trial, created). ``token``: the API token of the request,
    recorded as the trial's creator (``Trial.created_by``).

    With an ``idempotency_key`` already used in the same experiment, the stored trial is
    returned unchanged (created=False, its creator too), so a client may safely retry the
    POST.
    An imported or already-completed trial notifies the fitting worker. Steps to target
    that break their rules raise ``InputError`` (``server.trial_results.check_target``).
    """
    check_target(given=trial_in.model_dump())
    get_experiment(session=session, experiment_id=trial_in.experiment_id)
    key = trial_in.idempotency_key
    if key is not None:
        existing = _find_by_key(session, trial_in.experiment_id, key)
        if existing is not None:
            return existing, False
    now = utcnow()
    trial = Trial(**trial_in.model_dump(), created_at=now, updated_at=now)  # enums as values
    trial.created_by_token = token
    if trial_in.status in FINISHED_STATUSES:
        trial.completed_at = now
    try:
        with session.begin_nested():
            session.add(trial)
    except IntegrityError:
        existing = _find_by_key(session, trial_in.experiment_id, key) if key else None
        if existing is None:
            raise
        return existing, False
    if trial_in.source == TrialSource.IMPORTED or trial_in.status == TrialStatus.COMPLETED:
        notify_trial(session=session, trial_id=trial.id)
    return trial, True


def get_trial(
    *, session: Session, trial_id: int, for_update: bool = False, key_share: bool = False
) -> Trial:
    """The trial, its row locked on PostgreSQL as SQLAlchemy's ``with_for_update`` names the
    locks: ``for_update`` takes ``FOR UPDATE``; ``key_share`` alone the shared ``FOR KEY
    SHARE``, which only ``FOR UPDATE`` waits for; both ``FOR NO KEY UPDATE``, exclusive
    among writers that do not change the key (``server.points`` says why it needs them). A
    locked read refreshes a trial already in the session to the row it locked."""
    if for_update or key_share:
        lock = select(Trial).where(Trial.id == trial_id)
        lock = lock.with_for_update(read=not for_update, key_share=key_share)
        trial = session.scalar(lock.execution_options(populate_existing=True))
    else:
        trial = session.get(Trial, trial_id)
    if trial is None:
        raise NotFoundError(f"trial {trial_id} not found")
    return trial


def list_trials(
    *,
    session: Session,
    experiment_id: int | None = None,
    status: Sequence[TrialStatus] | None = None,
    source: TrialSource | None = None,
    n_params_min: int | None = None,
    n_params_max: int | None = None,
    n_tokens_min: int | None = None,
    n_tokens_max: int | None = None,
    idempotency_key: str | None = None,
    family: str | None = None,
    excluded: bool | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Trial], int]:
    """Trials matching every given filter (ranges inclusive), ordered by id."""
    stmt = select(Trial).order_by(Trial.id)
    if family is not None:
        stmt = stmt.join(Experiment, Experiment.id == Trial.experiment_id).where(
            Experiment.family == family
        )
    if experiment_id is not None:
        stmt = stmt.where(Trial.experiment_id == experiment_id)
    if status:
        stmt = stmt.where(Trial.status.in_([s.value for s in status]))
    if source is not None:
        stmt = stmt.where(Trial.source == source.value)
    if n_params_min is not None:
        stmt = stmt.where(Trial.n_params >= n_params_min)
    if n_params_max is not None:
        stmt = stmt.where(Trial.n_params <= n_params_max)
    if n_tokens_min is not None:
        stmt = stmt.where(Trial.n_tokens >= n_tokens_min)
    if n_tokens_max is not None:
        stmt = stmt.where(Trial.n_tokens <= n_tokens_max)
    if idempotency_key is not None:
        stmt = stmt.where(Trial.idempotency_key == idempotency_key)
    if excluded is not None:
        stmt = stmt.where(Trial.excluded.is_(excluded))
    return _page(session, stmt, limit=limit, offset=offset)


# Allowed status changes; a finished trial may only be re-sent its own status.
_TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"queued", "running", "completed", "failed", "pruned"}),
    "running": frozenset({"running", "completed", "failed", "pruned"}),
    "completed": frozenset({"completed"}),
    "failed": frozenset({"failed"}),
    "pruned": frozenset({"pruned"}),
}


def _set_status(session: Session, trial: Trial, new: TrialStatus, now: dt.datetime) -> None:
    old = trial.status
    if new.value not in _TRANSITIONS[old]:
        if old in {s.value for s in FINISHED_STATUSES}:
            raise ConflictError(
                f"trial {trial.id} is {old}; a finished trial cannot be reopened or set to "
                f"{new.value}"
            )
        raise ConflictError(f"trial {trial.id} cannot go from {old} to {new.value}")
    if new.value == old:
        return
    trial.status = new.value
    if new in FINISHED_STATUSES:
        trial.completed_at = now
    if new == TrialStatus.COMPLETED:
        store_b_simple_summary(session=session, trial=trial)
        notify_trial(session=session, trial_id=trial.id)


def update_trial(*, session: Session, trial_id: int, trial_in: TrialUpdate) -> Trial:
    """Apply the fields set in ``trial_in``; status changes follow ``_TRANSITIONS``, and a
    trial that becomes completed gets its b_simple summary (``server.trial_results``). Steps
    to target that break its rules with the stored fields raise ``InputError``."""
    trial = get_trial(session=session, trial_id=trial_id, for_update=True)
    now = utcnow()
    changes = trial_in.model_dump(exclude_unset=True)
    check_target(given=changes, trial=trial)
    status = changes.pop("status", None)
    if status is not None:
        _set_status(session, trial, TrialStatus(status), now)
    if "config" in changes:
        merged = dict(trial.config or {})
        merged.update(changes.pop("config") or {})
        trial.config = merged
    for name, value in changes.items():
        setattr(trial, name, value)
    trial.updated_at = now
    session.flush()
    return trial


def heartbeat(*, session: Session, trial_id: int) -> Trial:
    """Record that the trial's trainer is alive; a queued trial becomes running. A finished
    trial (including one the reaper failed) answers 409: its trainer should stop."""
    trial = get_trial(session=session, trial_id=trial_id, for_update=True)
    if trial.status in {s.value for s in FINISHED_STATUSES}:
        reason = f" ({trial.status_reason})" if trial.status_reason else ""
        raise ConflictError(f"trial {trial_id} is {trial.status}{reason}; heartbeat refused")
    now = utcnow()
    trial.heartbeat_at = now
    trial.updated_at = now
    if trial.status == TrialStatus.QUEUED.value:
        trial.status = TrialStatus.RUNNING.value
    session.flush()
    return trial


# --- fits ----------------------------------------------------------------------------------


def fits_query(kind: str | None, scope: str | None, status: str | None) -> Select:
    """Fits matching every given filter, newest first: the one definition of "latest"."""
    stmt = select(Fit).order_by(Fit.created_at.desc(), Fit.id.desc())
    if kind is not None:
        stmt = stmt.where(Fit.kind == kind)
    if scope is not None:
        stmt = stmt.where(Fit.scope == scope)
    if status is not None:
        stmt = stmt.where(Fit.status == status)
    return stmt


def list_fits(
    *,
    session: Session,
    kind: str | None = None,
    scope: str | None = None,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Fit], int]:
    """Fit history, newest first."""
    return _page(session, fits_query(kind, scope, status), limit=limit, offset=offset)


def latest_fit(
    *,
    session: Session,
    kind: str | None = None,
    scope: str | None = None,
    status: str | None = None,
) -> Fit:
    """The newest fit matching the filters; ``NotFoundError`` naming them when none does."""
    fit = session.scalars(fits_query(kind, scope, status).limit(1)).first()
    if fit is None:
        what = ", ".join(
            f"{k}={v}" for k, v in (("kind", kind), ("scope", scope), ("status", status)) if v
        )
        raise NotFoundError(f"no fit found{' with ' + what if what else ''}")
    return fit


def latest_ok_fit(*, session: Session, kind: str, scope: str) -> Fit | None:
    """The newest fit of (kind, scope) with status ok: the one that serves. A refit that
    failed or had too little data is stored too, but never replaces it."""
    return session.scalars(fits_query(kind, scope, "ok").limit(1)).first()


def latest_ok_fit_id(*, session: Session, kind: str, scope: str) -> int | None:
    """The id of :func:`latest_ok_fit` without loading the row (its params are large): what
    a reader asks to learn whether the fit it holds is still the newest."""
    return session.scalar(fits_query(kind, scope, "ok").with_only_columns(Fit.id).limit(1))


def get_fit(*, session: Session, fit_id: int) -> Fit:
    fit = session.get(Fit, fit_id)
    if fit is None:
        raise NotFoundError(f"fit {fit_id} not found")
    return fit


# --- API tokens ----------------------------------------------------------------------------


def hash_token(secret: str) -> str:
    """SHA-256 hex digest; tokens carry 256 random bits, so no salt or stretching is needed."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _token_text_errors(**texts: str | None) -> list[FieldError]:
    """The rules of ``server.schemas.TokenCreate``'s text (its name, its owner) for callers
    that do not go through it (the CLI): no NUL, not blank, at most 200 characters."""
    errors = []
    for field, value in texts.items():
        if value is None:
            continue
        if "\x00" in value:
            errors.append(FieldError(field, "no_nul", f"{field} {NO_NUL_TEXT}"))
        elif not value.strip():
            errors.append(FieldError(field, "blank", f"{field} {BLANK_TEXT}"))
        elif len(value) > 200:
            message = f"{field} must be at most 200 characters"
            errors.append(FieldError(field, "string_too_long", message))
    return errors


def create_token(
    *, session: Session, name: str, scope: TokenScope, owner: str | None = None
) -> tuple[ApiToken, str]:
    """Create a named token; returns (row, secret). Only the hash is stored. A blank name
    or owner, one holding NUL or longer than 200 characters, is an ``InputError`` (the rules
    of ``server.schemas.TokenCreate``); a name in use, revoked or not, a ``ConflictError``."""
    errors = _token_text_errors(name=name, owner=owner)
    if errors:
        raise InputError(errors)
    if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
        raise ConflictError(f"a token named {name!r} already exists")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name,
        token_hash=hash_token(secret),
        prefix=secret[:10],
        scope=scope.value,
        owner=owner,
    )
    try:
        with session.begin_nested():
            session.add(token)
    except IntegrityError:  # the name was taken meanwhile
        raise ConflictError(f"a token named {name!r} already exists") from None
    return token, secret


def list_tokens(*, session: Session) -> list[ApiToken]:
    """Every token, revoked ones too, by id."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def page_tokens(*, session: Session, limit: int, offset: int) -> tuple[list[ApiToken], int]:
    """A page of :func:`list_tokens` and the number of tokens."""
    return _page(session, select(ApiToken).order_by(ApiToken.id), limit=limit, offset=offset)


def revoke_token(*, session: Session, name: str) -> ApiToken:
    """Revoke the token named ``name`` (``NotFoundError`` when none is); revoking a revoked
    token changes nothing. It fails from the next request on."""
    token = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if token is None:
        raise NotFoundError(f"token {name!r} not found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


def authenticate(*, session: Session, secret: str) -> ApiToken | None:
    """The live (not revoked) token with this secret, or None."""
    return session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == hash_token(secret), ApiToken.revoked_at.is_(None)
        )
    )
