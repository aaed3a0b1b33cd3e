"""SQLAlchemy 2.0 models: experiments, trials, loss-curve points, fits and API tokens.

Units follow the project's terms: ``n_params`` (non-embedding parameters), ``n_tokens``
(the run's token budget D), ``seq_len`` and ``batch_size_tokens`` in tokens, and
``batch_size_sequences = batch_size_tokens / seq_len`` derived, never stored.

Loss-curve floats are ``FaithfulFloat``: NaN and ±inf come back as what went in on both
PostgreSQL (native ``double precision``) and SQLite (which would turn NaN into NULL).
Timestamps are ``UTCDateTime``: timezone-aware UTC on both databases.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates
from sqlalchemy.types import DateTime, TypeDecorator

from client.wire import DEFAULT_FAMILY

# Integer primary keys: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# A point's extras: JSONB on PostgreSQL (its ``||`` merges them on re-send), JSON on SQLite.
# None is SQL NULL (not JSON null): an upsert merges a point's extras with the stored ones.
JsonB = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """``DateTime(timezone=True)`` that always returns aware UTC datetimes (SQLite too)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store aware UTC datetimes")
        return value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class FaithfulFloat(TypeDecorator):
    """A double that stores NaN and ±inf faithfully.

    PostgreSQL's ``double precision`` holds them natively (no processing at all). SQLite
    keeps ±inf in a REAL column but silently turns NaN into NULL, so on SQLite NaN is bound
    as the text ``'NaN'`` (a REAL-affinity column keeps text that is not a numeric literal)
    and read back as ``float('nan')``.
    """

    impl = Double
    cache_ok = True

    def bind_processor(self, dialect):
        if dialect.name != "sqlite":
            return None

        def process(value):
            if value is not None and value != value:  # NaN is the only value != itself
                return "NaN"
            return value

        return process

    def result_processor(self, dialect, coltype):
        if dialect.name != "sqlite":
            return None

        def process(value):
            if isinstance(value, str):
                return float(value)
            return value

        return process


class TrialStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    PRUNED = "pruned"


FINISHED_STATUSES = frozenset({TrialStatus.COMPLETED, TrialStatus.FAILED, TrialStatus.PRUNED})


class TrialSource(str, enum.Enum):
    TRAINED = "trained"
    IMPORTED = "imported"


class StopReason(str, enum.Enum):
    """Why a run stopped: it trained its token budget (``budget``), its evaluation loss
    reached its ``target_loss`` (``target``), it diverged, or it failed. A trial whose
    stop reason is not known (rows from before it was recorded, clients that do not say)
    stores null."""

    BUDGET = "budget"
    TARGET = "target"
    DIVERGED = "diverged"
    FAILED = "failed"


class Parametrization(str, enum.Enum):
    """How a trial's model is parametrized: standard, or µP (Yang et al. 2022), whose
    optimal learning rate transfers across widths. Part of a trial's fit key
    (``server.worker.scopes``): runs of the two are never fitted as one population."""

    STANDARD = "standard"
    MUP = "mup"


class TokenScope(str, enum.Enum):
    """Scopes are ordered: admin implies write implies read."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return {"read": 0, "write": 1, "admin": 2}[self.value]

    def allows(self, needed: TokenScope) -> bool:
        return self.rank >= needed.rank


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON}


class Experiment(Base):
    """A named group of trials. ``family`` says what its losses are comparable with (same
    data, tokenizer and model family): fits pool trials within a family only."""

    __tablename__ = "experiments"
    __table_args__ = (UniqueConstraint("name", name="uq_experiments_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    family: Mapped[str] = mapped_column(
        String(100), default=DEFAULT_FAMILY, server_default=DEFAULT_FAMILY, index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # completed trials an admin deleted (server.curation): part of the fits' data watermark,
    # so that a deletion refits even when it brings the trials back to an earlier state
    trials_deleted: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    trials: Mapped[list[Trial]] = relationship(back_populates="experiment", lazy="raise")


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("experiment_id", "idempotency_key", name="uq_trials_experiment_key"),
        CheckConstraint(
            "status IN ('queued','running','completed','failed','pruned')", name="ck_trials_status"
        ),
        CheckConstraint("source IN ('trained','imported')", name="ck_trials_source"),
        CheckConstraint(
            "stop_reason IN ('budget','target','diverged','failed')", name="ck_trials_stop_reason"
        ),
        CheckConstraint("parametrization IN ('standard','mup')", name="ck_trials_parametrization"),
        Index("ix_trials_status", "status"),
        Index("ix_trials_n_params_n_tokens", "n_params", "n_tokens"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    # what the run is
    n_params: Mapped[int] = mapped_column(BigInteger)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    seq_len: Mapped[int] = mapped_column(Integer)
    learning_rate: Mapped[float] = mapped_column(Double)
    batch_size_tokens: Mapped[int] = mapped_column(BigInteger)
    model_shape: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # n_layer, n_head, d_model
    # optimizer and schedule
    adam_beta1: Mapped[float | None] = mapped_column(Double)
    adam_beta2: Mapped[float | None] = mapped_column(Double)
    adam_eps: Mapped[float | None] = mapped_column(Double)
    weight_decay: Mapped[float | None] = mapped_column(Double)
    grad_clip: Mapped[float | None] = mapped_column(Double)
    schedule: Mapped[str | None] = mapped_column(String(50))
    parametrization: Mapped[str] = mapped_column(
        String(20), default=Parametrization.STANDARD.value, server_default="standard"
    )
    warmup_fraction: Mapped[float | None] = mapped_column(Double)
    # parallelism and reproducibility
    zero_stage: Mapped[int | None] = mapped_column(Integer)
    world_size: Mapped[int | None] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    # lifecycle
    status: Mapped[str] = mapped_column(String(16), default=TrialStatus.QUEUED.value)
    status_reason: Mapped[str | None] = mapped_column(Text)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column()
    source: Mapped[str] = mapped_column(String(16), default=TrialSource.TRAINED.value)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # final metrics
    final_loss: Mapped[float | None] = mapped_column(FaithfulFloat)
    final_eval_loss: Mapped[float | None] = mapped_column(FaithfulFloat)
    steps_done: Mapped[int | None] = mapped_column(BigInteger)
    tokens_done: Mapped[int | None] = mapped_column(BigInteger)
    diverged: Mapped[bool | None] = mapped_column(Boolean)
    stop_reason: Mapped[str | None] = mapped_column(String(16))  # a StopReason, or unknown
    # steps to a target loss (Zhang et al. 2024): sent by the client, rules in trial_results
    target_loss: Mapped[float | None] = mapped_column(FaithfulFloat)
    steps_to_target: Mapped[float | None] = mapped_column(FaithfulFloat)  # interpolated
    reached_target: Mapped[bool | None] = mapped_column(Boolean)
    # gradient noise scale of the run, tokens: computed from its points (server.trial_results)
    b_simple: Mapped[float | None] = mapped_column(FaithfulFloat)
    b_simple_q25: Mapped[float | None] = mapped_column(FaithfulFloat)
    b_simple_q75: Mapped[float | None] = mapped_column(FaithfulFloat)
    # left out of every fit, with the reason why (server.curation)
    excluded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    excluded_reason: Mapped[str | None] = mapped_column(Text)
    # everything else: resolved config, code version, data fingerprint, ...
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column()
    # the API token that created it: null for trials made without one (CLI imports) or
    # before revision 0006
    created_by_token_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_tokens.id"))

    experiment: Mapped[Experiment] = relationship(back_populates="trials", lazy="raise")
    # loaded when ``created_by`` is read (the API's TrialPublic, in the request's session):
    # from the session when it holds the token (the request's own), else one query per
    # token; never on the paths that do not show it (points, the worker)
    created_by_token: Mapped[ApiToken | None] = relationship(lazy="select")

    @validates("status", "source", "stop_reason", "parametrization")
    def _enum_value(self, _key: str, value: Any) -> Any:
        """TrialStatus, TrialSource, StopReason and Parametrization members are stored as
        their values."""
        return value.value if isinstance(value, enum.Enum) else value

    @property
    def batch_size_sequences(self) -> float:
        """B / seq_len, in sequences."""
        return self.batch_size_tokens / self.seq_len

    @property
    def created_by(self) -> str | None:
        """The name of the API token that created the trial (a token replaced by ``hyperlaw
        token create --replace`` shows its new name, ``NAME (replaced, id N)``)."""
        token = self.created_by_token
        return None if token is None else token.name


class Point(Base):
    """One row of a loss curve; the primary key (trial_id, step) makes ingest an upsert."""

    __tablename__ = "points"

    trial_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False
    )
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    train_loss: Mapped[float | None] = mapped_column(FaithfulFloat)
    eval_loss: Mapped[float | None] = mapped_column(FaithfulFloat)
    ewa_eval_loss: Mapped[float | None] = mapped_column(FaithfulFloat)
    lr: Mapped[float | None] = mapped_column(FaithfulFloat)
    grad_norm: Mapped[float | None] = mapped_column(FaithfulFloat)
    b_simple: Mapped[float | None] = mapped_column(FaithfulFloat)
    tokens_per_s: Mapped[float | None] = mapped_column(FaithfulFloat)
    wall_time_s: Mapped[float | None] = mapped_column(FaithfulFloat)
    # the client's own metrics, by name ("mfu", "loss/aux"): numbers, non-finite ones as
    # "NaN"/"Infinity"/"-Infinity" (client.wire); null when none was sent
    extras: Mapped[dict[str, Any] | None] = mapped_column(JsonB)


POINT_VALUE_COLUMNS = (
    "tokens",
    "train_loss",
    "eval_loss",
    "ewa_eval_loss",
    "lr",
    "grad_norm",
    "b_simple",
    "tokens_per_s",
    "wall_time_s",
)


class Fit(Base):
    """One stored fit; every refit adds a row, so the table is the fit history."""

    __tablename__ = "fits"
    __table_args__ = (
        UniqueConstraint("kind", "scope", "data_watermark", name="uq_fits_kind_scope_watermark"),
        CheckConstraint("status IN ('ok','insufficient_data','failed')", name="ck_fits_status"),
        Index("ix_fits_kind_scope_created", "kind", "scope", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(200))  # family:<name> or experiment:<id>
    experiment_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("experiments.id", ondelete="SET NULL")
    )
    status: Mapped[str] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    intervals: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    quality: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    trial_ids: Mapped[list[int] | None] = mapped_column(JSON)
    n_trials: Mapped[int] = mapped_column(Integer, default=0)
    data_watermark: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token, stored only as its SHA-256 hash; revoked tokens stay for the record."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint("scope IN ('read','write','admin')", name="ck_api_tokens_scope"),
        UniqueConstraint("name", name="uq_api_tokens_name"),
        UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str | None] = mapped_column(String(200))  # free text: a person, a team
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column()
    last_used_at: Mapped[dt.datetime | None] = mapped_column()
