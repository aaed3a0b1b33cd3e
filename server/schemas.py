"""Request and response bodies of the ``/v1`` API (pydantic v2).

Naming: ``XCreate`` (POST body), ``XUpdate`` (PATCH body), ``XPublic`` (one object out),
``XsPublic`` (a page: ``{"data": [...], "count": N}``, ``count`` being the total number of
matches, not the page length).

Non-finite floats on the wire: JSON has no NaN or infinity, so the API writes them as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` and accepts those strings (and the
bare tokens ``NaN``/``Infinity``/``-Infinity`` that Python's ``json`` emits) wherever a
float may be non-finite (loss-curve values, final losses). Fields that must be finite
(``learning_rate``, optimizer settings) reject them with ``<field> must be finite``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer
from pydantic_core import PydanticCustomError

from client.wire import (
    DEFAULT_FAMILY,
    MAX_POINTS_PER_REQUEST,
    encode_nonfinite,
    family_name_problem,
)
from server.models import Parametrization, StopReason, TokenScope, TrialSource, TrialStatus

NONFINITE_NOTE = (
    'Non-finite values are written as the strings "NaN", "Infinity" and "-Infinity", '
    "and accepted in the same form."
)
INT64_MAX = 2**63 - 1
STOP_REASON_NOTE = (
    "why the run stopped: budget (it trained its n_tokens), target (its evaluation loss "
    "reached its target_loss), diverged or failed; null when not known. Only completed runs "
    "that trained their budget (or diverged) enter the final-loss fits"
)
TOKENS_DONE_NOTE = (
    "tokens the run trained (steps_done x batch_size_tokens): its final loss is the loss after "
    "these, short of n_tokens when it stopped early"
)

FAMILY_NOTE = (
    "what makes the experiment's losses comparable (same data, tokenizer and model family): "
    "fits pool trials within a family only. 1-100 letters, digits, '.', '_' or '-', starting "
    "with a letter or digit"
)
PARAMETRIZATION_NOTE = (
    "standard or mup (µP): part of what a fit groups by, never mixed with the other"
)


def _family_name(name: str) -> str:
    """The family rule (``client.wire.FAMILY_NAME_PATTERN``) as a 422 entry whose rule is
    ``family_name``."""
    problem = family_name_problem(name)
    if problem is not None:
        raise PydanticCustomError("family_name", "{problem}", {"problem": problem})
    return name


FamilyName = Annotated[
    str, Field(min_length=1, max_length=100, description=FAMILY_NOTE), AfterValidator(_family_name)
]
PositiveInt = Annotated[int, Field(gt=0, le=INT64_MAX)]
NonNegativeInt = Annotated[int, Field(ge=0, le=INT64_MAX)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
AnyFloat = Annotated[float, Field(description=NONFINITE_NOTE)]
# Free-form JSON objects out: non-finite floats inside become "NaN"/"Infinity" strings
# (pydantic would otherwise write null for floats it only sees as Any).
JsonObjectOut = Annotated[
    dict[str, Any] | None, PlainSerializer(encode_nonfinite, when_used="json")
]


class InModel(BaseModel):
    """Base of request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class OutModel(BaseModel):
    model_config = ConfigDict(from_attributes=True, ser_json_inf_nan="strings")


# --- experiments ---------------------------------------------------------------------------


class ExperimentCreate(InModel):
    """POST body: get or create the experiment ``name``; a ``family`` given explicitly must
    match the stored experiment's (move one with ``PATCH``)."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Annotated[str | None, Field(max_length=10_000)] = None
    family: FamilyName = DEFAULT_FAMILY


class ExperimentUpdate(InModel):
    """PATCH body: move the experiment, with all its trials, to another family."""

    family: FamilyName


class ExperimentPublic(OutModel):
    id: int
    name: str
    description: str | None
    family: str = Field(description=FAMILY_NOTE)
    created_at: dt.datetime


class ExperimentsPublic(OutModel):
    data: list[ExperimentPublic]
    count: int


# --- trials --------------------------------------------------------------------------------


class TrialCreate(InModel):
    """A trial: one training run at (n_params, n_tokens, learning_rate, batch_size_tokens)."""

    experiment_id: PositiveInt
    n_params: Annotated[PositiveInt, Field(description="non-embedding parameters")]
    n_tokens: Annotated[PositiveInt, Field(description="token budget D of the run")]
    seq_len: Annotated[int, Field(gt=0, le=2**31 - 1, description="tokens per sequence")]
    learning_rate: Annotated[PositiveFinite, Field(description="peak learning rate")]
    batch_size_tokens: Annotated[PositiveInt, Field(description="global batch size in tokens")]
    model_shape: dict[str, Any] | None = Field(
        default=None, description="n_layer, n_head, d_model, ..."
    )
    adam_beta1: Beta | None = None
    adam_beta2: Beta | None = None
    adam_eps: PositiveFinite | None = None
    weight_decay: NonNegativeFinite | None = None
    grad_clip: NonNegativeFinite | None = None
    schedule: Annotated[str | None, Field(max_length=50)] = None
    parametrization: Annotated[Parametrization, Field(description=PARAMETRIZATION_NOTE)] = (
        Parametrization.STANDARD
    )
    warmup_fraction: Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False)] = None
    zero_stage: Annotated[int | None, Field(ge=0, le=3)] = None
    world_size: Annotated[int | None, Field(gt=0, le=2**31 - 1)] = None
    seed: Annotated[int | None, Field(ge=-INT64_MAX, le=INT64_MAX)] = None
    status: TrialStatus = TrialStatus.QUEUED
    status_reason: Annotated[str | None, Field(max_length=10_000)] = None
    source: TrialSource = TrialSource.TRAINED
    idempotency_key: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=200,
            description="re-posting the same key in the same experiment returns that trial",
        ),
    ] = None
    final_loss: AnyFloat | None = None
    final_eval_loss: AnyFloat | None = None
    steps_done: NonNegativeInt | None = None
    tokens_done: Annotated[NonNegativeInt | None, Field(description=TOKENS_DONE_NOTE)] = None
    diverged: bool | None = None
    stop_reason: Annotated[StopReason | None, Field(description=STOP_REASON_NOTE)] = None
    config: dict[str, Any] | None = Field(
        default=None, description="everything else: resolved config, code version, data hash"
    )


class TrialUpdate(InModel):
    """PATCH body. A finished trial (completed/failed/pruned) cannot change status."""

    status: TrialStatus | None = None
    status_reason: Annotated[str | None, Field(max_length=10_000)] = None
    final_loss: AnyFloat | None = None
    final_eval_loss: AnyFloat | None = None
    steps_done: NonNegativeInt | None = None
    tokens_done: Annotated[NonNegativeInt | None, Field(description=TOKENS_DONE_NOTE)] = None
    diverged: bool | None = None
    stop_reason: Annotated[StopReason | None, Field(description=STOP_REASON_NOTE)] = None
    model_shape: dict[str, Any] | None = None
    config: dict[str, Any] | None = Field(
        default=None, description="merged key by key into the stored config"
    )


class TrialPublic(OutModel):
    id: int
    experiment_id: int
    n_params: int
    n_tokens: int
    seq_len: int
    learning_rate: float
    batch_size_tokens: int
    batch_size_sequences: float = Field(description="batch_size_tokens / seq_len")
    model_shape: JsonObjectOut
    adam_beta1: float | None
    adam_beta2: float | None
    adam_eps: float | None
    weight_decay: float | None
    grad_clip: float | None
    schedule: str | None
    parametrization: Parametrization = Field(description=PARAMETRIZATION_NOTE)
    warmup_fraction: float | None
    zero_stage: int | None
    world_size: int | None
    seed: int | None
    status: TrialStatus
    status_reason: str | None
    heartbeat_at: dt.datetime | None
    source: TrialSource
    idempotency_key: str | None
    final_loss: AnyFloat | None
    final_eval_loss: AnyFloat | None
    steps_done: int | None
    tokens_done: int | None = Field(description=TOKENS_DONE_NOTE)
    diverged: bool | None
    stop_reason: StopReason | None = Field(description=STOP_REASON_NOTE)
    config: JsonObjectOut
    created_at: dt.datetime
    updated_at: dt.datetime
    completed_at: dt.datetime | None = Field(description="when the trial finished, any status")


class TrialsPublic(OutModel):
    data: list[TrialPublic]
    count: int


# --- points --------------------------------------------------------------------------------


class PointIn(InModel):
    """One loss-curve row; (trial, step) is the key, re-sending a step overwrites it."""

    step: NonNegativeInt
    tokens: NonNegativeInt | None = None
    train_loss: AnyFloat | None = None
    eval_loss: AnyFloat | None = None
    ewa_eval_loss: AnyFloat | None = None
    lr: AnyFloat | None = None
    grad_norm: AnyFloat | None = None
    b_simple: Annotated[float | None, Field(description="gradient noise scale, tokens")] = None
    tokens_per_s: AnyFloat | None = None
    wall_time_s: AnyFloat | None = None


class PointsCreate(InModel):
    points: Annotated[list[PointIn], Field(max_length=MAX_POINTS_PER_REQUEST)]


class PointPublic(OutModel):
    step: int
    tokens: int | None
    train_loss: float | None
    eval_loss: float | None
    ewa_eval_loss: float | None
    lr: float | None
    grad_norm: float | None
    b_simple: float | None
    tokens_per_s: float | None
    wall_time_s: float | None


class PointsPublic(OutModel):
    trial_id: int
    data: list[PointPublic]
    count: int


class PointsStored(OutModel):
    trial_id: int
    count: int = Field(description="distinct steps written (inserted or overwritten)")


# --- fits ----------------------------------------------------------------------------------


class FitPublic(OutModel):
    id: int
    kind: str
    scope: str
    experiment_id: int | None
    status: Literal["ok", "insufficient_data", "failed"]
    message: str | None
    params: JsonObjectOut
    intervals: JsonObjectOut
    quality: JsonObjectOut
    trial_ids: list[int] | None
    n_trials: int
    data_watermark: str
    created_at: dt.datetime


class FitsPublic(OutModel):
    data: list[FitPublic]
    count: int


# --- families ------------------------------------------------------------------------------


class FitKeyPublic(OutModel):
    """The completed trials of a family under one fit key: parametrization and schedule."""

    fit_key: str = Field(description="<family>[/mup][/<schedule>] (server.worker.scopes)")
    parametrization: Parametrization
    schedule: str | None
    n_trials: int = Field(description="completed trials")
    n_groups: int = Field(description="(N, D) groups of those trials")


class FamilyFitPublic(OutModel):
    """The newest recommender fit of the family's scope, whatever its status."""

    id: int
    status: Literal["ok", "insufficient_data", "failed"]
    message: str | None = Field(description="why, when the status is not ok")
    created_at: dt.datetime


class FamilyPublic(OutModel):
    """One family: its experiments and completed trials, and the state of its fit."""

    name: str
    scope: str = Field(description="the fits' scope: family:<name>")
    n_experiments: int
    n_trials: int = Field(description="completed trials")
    n_groups: int = Field(description="(N, D) groups of the completed trials")
    n_params: list[int] | None = Field(
        description="[min, max] non-embedding parameters of the completed trials; null without any"
    )
    n_tokens: list[int] | None = Field(description="[min, max] token budgets D, likewise")
    main_fit_key: str | None = Field(
        description="the fit key the family's fits serve: the one with the most (N, D) groups"
    )
    fit_keys: list[FitKeyPublic]
    fit: FamilyFitPublic | None = Field(
        description="the newest recommender fit of the family; null before the first"
    )


class FamiliesPublic(OutModel):
    data: list[FamilyPublic]
    count: int


# --- tokens --------------------------------------------------------------------------------


class TokenPublic(OutModel):
    id: int
    name: str
    prefix: str
    scope: TokenScope
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


# --- recommendations -----------------------------------------------------------------------


class IntervalPublic(OutModel):
    """A prediction interval: where the optimum of a new (N, D) group lies, from the laws'
    bootstrap over groups plus the groups' own scatter about the laws
    (``fitting.intervals``)."""

    low: AnyFloat = Field(description="lower end; NaN when the fit kept no bootstrap draws")
    high: AnyFloat = Field(description="upper end; NaN when the fit kept no bootstrap draws")
    level: float = Field(
        description="the probability that a new group's optimum lies in [low, high], e.g. 0.9"
    )


class RecommendationPublic(OutModel):
    """``GET /v1/recommendations``: η, B and the critical batch size for (N, D), from the
    newest ok recommender fit of the scope (formulas: ``fitting.recommender``). Batch sizes
    are in tokens unless the name says sequences."""

    n_params: float = Field(description="non-embedding parameters N, as queried")
    n_tokens: float = Field(description="training tokens D (the run's budget), as queried")
    seq_len: int = Field(description="tokens per sequence, as queried (default 2048)")
    learning_rate: float = Field(description="recommended peak learning rate η* at B*")
    learning_rate_interval: IntervalPublic = Field(description="interval of learning_rate")
    batch_size_tokens: float = Field(description="recommended global batch size B*, tokens")
    batch_size_tokens_interval: IntervalPublic = Field(
        description="interval of batch_size_tokens, tokens"
    )
    batch_size_sequences: float = Field(description="B* / seq_len, sequences")
    batch_size_sequences_interval: IntervalPublic = Field(
        description="interval of batch_size_sequences, sequences"
    )
    critical_batch_size_tokens: AnyFloat = Field(
        description="critical batch size (Zhang et al., ε = 0.2), tokens: the largest B whose "
        "tokens to reach the loss of (η*, B*) at D are at most 1.2 times those of B*; "
        "Infinity when undefined for the fit (a warning says so)"
    )
    critical_batch_size_tokens_interval: IntervalPublic = Field(
        description="interval of critical_batch_size_tokens, tokens"
    )
    sources: dict[str, str] = Field(
        description="for each number above (and the imposed-batch ones), the method that "
        "produced it"
    )
    warnings: list[str] = Field(
        description="why to trust an answer less, each stating it: e.g. n_params or n_tokens "
        "outside the fitted range (extrapolation), with that range"
    )
    imposed_batch_size_tokens: float | None = Field(
        default=None, description="the batch_size_tokens query parameter; null without it"
    )
    learning_rate_for_batch: float | None = Field(
        default=None,
        description="best peak learning rate at the imposed batch size; null without one",
    )
    learning_rate_for_batch_interval: IntervalPublic | None = Field(
        default=None, description="interval of learning_rate_for_batch; null without one"
    )
    step_overhead: AnyFloat | None = Field(
        default=None,
        description="extra optimizer steps at the imposed batch size versus the critical "
        "batch size, as a fraction (0.3 = 30 % more; paid below the CBS); null without one",
    )
    token_overhead: AnyFloat | None = Field(
        default=None,
        description="extra training tokens at the imposed batch size versus the critical "
        "batch size, as a fraction (paid above the CBS); null without one",
    )
    family: str | None = Field(
        description="the family whose fit answered (scope family:<name>); null when an "
        "experiment's own fit answered"
    )
    fit_key: str | None = Field(
        description="the runs the answer is for: <family>[/mup][/<schedule>], the family's "
        "(or experiment's) main fit key"
    )
    fit_ids: list[int] = Field(description="ids of the fits the answer came from (/v1/fits)")
    fitted_at: dt.datetime = Field(description="when that fit was stored (UTC)")
    n_trials: int = Field(
        description="completed trials the fit used: for a family, every family's it borrowed "
        "exponents from (its quality in /v1/fits/{id} counts its own)"
    )
    scope: str = Field(description="the fit's scope: family:<name>, or experiment:<id>")
