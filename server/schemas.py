"""Request and response bodies of the ``/v1`` API (pydantic v2).

Naming: ``XCreate`` (POST body), ``XUpdate`` (PATCH body), ``XPublic`` (one object out),
``XsPublic`` (a page: ``{"data": [...], "count": N}``, ``count`` being the total number of
matches, not the page length). The bodies of ``/v1/families`` are in
``server.family_schemas``, that of ``/v1/recommendations`` in
``server.recommendation_schemas``, those of ``/v1/trials/{id}/points`` in
``server.point_schemas``.

Rules every request body follows (``InModel``): unknown fields are an error (but for a
point's extras, ``server.point_schemas``); text never
holds NUL (``\\u0000``, rule ``no_nul``: PostgreSQL's text cannot) and names are never blank
(rule ``blank``); booleans are ``true`` or ``false`` only (not ``0``, ``1`` or ``"true"``);
integers that reach a BIGINT column are at most 2**63 - 1; a free-form JSON object (a trial's
``config`` and ``model_shape``) nests at most ``MAX_JSON_DEPTH`` levels (rule ``max_depth``)
and serialises to at most ``MAX_JSON_CHARS`` characters (rule ``max_size``). Numbers beyond a
64-bit float and body size are checked before the models see the body
(``server.api.limits``).

Non-finite floats on the wire: JSON has no NaN or infinity, so the API writes them as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` and accepts those strings (and the
bare tokens ``NaN``/``Infinity``/``-Infinity`` that Python's ``json`` emits) wherever a
float may be non-finite (loss-curve values, final losses). Fields that must be finite
(``learning_rate``, optimizer settings, steps to target) reject them with ``<field> must be
finite``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, StrictBool
from pydantic_core import PydanticCustomError

from client.wire import DEFAULT_FAMILY, dumps, encode_nonfinite, family_name_problem
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
    "these, short of n_tokens when it stopped early, beyond it when it trained past its budget "
    "towards a target loss (steps-to-target runs train up to 4 x n_tokens)"
)
TARGET_LOSS_NOTE = "the loss the run was trained towards (steps-to-target runs); finite"
STEPS_TO_TARGET_NOTE = (
    "optimizer steps at which the run's evaluated loss (the EWA-evaluated one under the "
    "constant+EWA schedule) first reached target_loss, interpolated linearly between the two "
    "evaluations around it; finite, >= 0; null when it did not reach it. Needs target_loss"
)
REACHED_TARGET_NOTE = "whether the evaluated loss reached target_loss; null when not known"
B_SIMPLE_NOTE = (
    "the run's gradient noise scale b_simple (McCandlish et al. 2018), tokens: the {what} of "
    "its points' finite b_simple at steps >= 0.7 x the last such step; the service sets it "
    "when the trial completes and when points arrive for a completed trial (null: none)"
)
EXCLUDED_NOTE = (
    "left out of every fit (its scope is refitted without it); true needs excluded_reason, "
    "false clears it"
)
EXCLUDED_REASON_NOTE = "why the trial is excluded: 1-1000 characters, sent with excluded: true"

FAMILY_NOTE = (
    "what makes the experiment's losses comparable (same data, tokenizer and model family): "
    "fits pool trials within a family only. 1-100 letters, digits, '.', '_' or '-', starting "
    "with a letter or digit"
)
PARAMETRIZATION_NOTE = (
    "standard or mup (µP): part of what a fit groups by, never mixed with the other"
)


#: How deep a free-form JSON object (a trial's config or model_shape) may nest, and how many
#: characters it may take as JSON: room for any resolved training config, while keeping
#: recursive encoders (and the database's JSON functions) far from their limits.
MAX_JSON_DEPTH = 32
MAX_JSON_CHARS = 65_536


#: The sentences of the text rules, shared by the 422 (server.main) and token names (crud).
NO_NUL_TEXT = "must not contain NUL (\\u0000) characters"
BLANK_TEXT = "must not be blank (whitespace only)"


def _no_nul(text: str | None) -> str | None:
    """PostgreSQL's text types cannot hold NUL (U+0000): a 422 naming the field here, rather
    than the driver's error (a 500) at the insert or the query."""
    if text is not None and "\x00" in text:
        raise PydanticCustomError("no_nul", NO_NUL_TEXT)
    return text


def _not_blank(text: str) -> str:
    """A name made of whitespace only names nothing anyone can tell apart or type."""
    if not text.strip():
        raise PydanticCustomError("blank", BLANK_TEXT)
    return text


#: Metadata of every text field and text query parameter, and of every name.
NoNul = AfterValidator(_no_nul)
NotBlank = AfterValidator(_not_blank)


def _json_object(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A free-form JSON object's rules (module docstring): checked depth-first without
    recursion, so the depth rule holds before anything recursive touches the value."""
    if value is None:
        return None
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise PydanticCustomError(
                "max_depth",
                "must nest at most {max_depth} levels of objects and lists",
                {"max_depth": MAX_JSON_DEPTH},
            )
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            at = f"{path}.{key}" if path else str(key)
            if (isinstance(key, str) and "\x00" in key) or (
                isinstance(child, str) and "\x00" in child
            ):
                raise PydanticCustomError(
                    "no_nul",
                    "must not contain NUL (\\u0000) characters (at {at})",
                    {"at": at.replace("\x00", "\\u0000")},
                )
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1, at))
    if len(dumps(value)) > MAX_JSON_CHARS:
        raise PydanticCustomError(
            "max_size",
            "must take at most {max_chars} characters as JSON",
            {"max_chars": MAX_JSON_CHARS},
        )
    return value


def _family_name(name: str) -> str:
    """The family rule (``client.wire.FAMILY_NAME_PATTERN``) as a 422 entry whose rule is
    ``family_name``."""
    problem = family_name_problem(name)
    if problem is not None:
        raise PydanticCustomError("family_name", "{problem}", {"problem": problem})
    return name


FamilyName = Annotated[
    str,
    Field(min_length=1, max_length=100, description=FAMILY_NOTE),
    NoNul,
    NotBlank,
    AfterValidator(_family_name),
]
PositiveInt = Annotated[int, Field(gt=0, le=INT64_MAX)]
NonNegativeInt = Annotated[int, Field(ge=0, le=INT64_MAX)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
AnyFloat = Annotated[float, Field(description=NONFINITE_NOTE)]
TargetLoss = Annotated[float | None, Field(allow_inf_nan=False, description=TARGET_LOSS_NOTE)]
StepsToTarget = Annotated[
    float | None, Field(ge=0, allow_inf_nan=False, description=STEPS_TO_TARGET_NOTE)
]
ReachedTarget = Annotated[StrictBool | None, Field(description=REACHED_TARGET_NOTE)]
# Free-form JSON objects in: the rules of _json_object.
JsonObjectIn = Annotated[dict[str, Any] | None, AfterValidator(_json_object)]
# Free-form JSON objects out: non-finite floats inside become "NaN"/"Infinity" strings
# (pydantic would otherwise write null for floats it only sees as Any).
JsonObjectOut = Annotated[
    dict[str, Any] | None, PlainSerializer(encode_nonfinite, when_used="json")
]


class InModel(BaseModel):
    """Base of request bodies: unknown fields are an error, not silently dropped. Its
    fields follow the rules of the module docstring (``NoNul`` on text, ``StrictBool``)."""

    model_config = ConfigDict(extra="forbid")


class OutModel(BaseModel):
    model_config = ConfigDict(from_attributes=True, ser_json_inf_nan="strings")


# --- experiments ---------------------------------------------------------------------------


class ExperimentCreate(InModel):
    """POST body: get or create the experiment ``name``; a ``family`` given explicitly must
    match the stored experiment's (move one with ``PATCH``)."""

    name: Annotated[str, Field(min_length=1, max_length=200), NoNul, NotBlank]
    description: Annotated[str, Field(max_length=10_000), NoNul] | None = None
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
    model_shape: JsonObjectIn = Field(default=None, description="n_layer, n_head, d_model, ...")
    adam_beta1: Beta | None = None
    adam_beta2: Beta | None = None
    adam_eps: PositiveFinite | None = None
    weight_decay: NonNegativeFinite | None = None
    grad_clip: NonNegativeFinite | None = None
    schedule: Annotated[str, Field(max_length=50), NoNul] | None = None
    parametrization: Annotated[Parametrization, Field(description=PARAMETRIZATION_NOTE)] = (
        Parametrization.STANDARD
    )
    warmup_fraction: Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False)] = None
    zero_stage: Annotated[int | None, Field(ge=0, le=3)] = None
    world_size: Annotated[int | None, Field(gt=0, le=2**31 - 1)] = None
    seed: Annotated[int | None, Field(ge=-INT64_MAX, le=INT64_MAX)] = None
    status: TrialStatus = TrialStatus.QUEUED
    status_reason: Annotated[str, Field(max_length=10_000), NoNul] | None = None
    source: TrialSource = TrialSource.TRAINED
    idempotency_key: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=200,
            description="re-posting the same key in the same experiment returns that trial",
        ),
        NoNul,
    ] = None
    final_loss: AnyFloat | None = None
    final_eval_loss: AnyFloat | None = None
    steps_done: NonNegativeInt | None = None
    tokens_done: Annotated[NonNegativeInt | None, Field(description=TOKENS_DONE_NOTE)] = None
    diverged: StrictBool | None = None
    stop_reason: Annotated[StopReason | None, Field(description=STOP_REASON_NOTE)] = None
    target_loss: TargetLoss = None
    steps_to_target: StepsToTarget = None
    reached_target: ReachedTarget = None
    config: JsonObjectIn = Field(
        default=None, description="everything else: resolved config, code version, data hash"
    )


class TrialUpdate(InModel):
    """PATCH body. A finished trial (completed/failed/pruned) cannot change status; the
    rules of ``excluded`` and ``excluded_reason`` are ``server.curation``'s."""

    status: TrialStatus | None = None
    status_reason: Annotated[str, Field(max_length=10_000), NoNul] | None = None
    final_loss: AnyFloat | None = None
    final_eval_loss: AnyFloat | None = None
    steps_done: NonNegativeInt | None = None
    tokens_done: Annotated[NonNegativeInt | None, Field(description=TOKENS_DONE_NOTE)] = None
    diverged: StrictBool | None = None
    stop_reason: Annotated[StopReason | None, Field(description=STOP_REASON_NOTE)] = None
    target_loss: TargetLoss = None
    steps_to_target: StepsToTarget = None
    reached_target: ReachedTarget = None
    model_shape: JsonObjectIn = None
    config: JsonObjectIn = Field(
        default=None, description="merged key by key into the stored config"
    )
    excluded: Annotated[StrictBool | None, Field(description=EXCLUDED_NOTE)] = None
    excluded_reason: (
        Annotated[str, Field(min_length=1, max_length=1000), NoNul, NotBlank] | None
    ) = Field(default=None, description=EXCLUDED_REASON_NOTE)


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
    target_loss: float | None = Field(description=TARGET_LOSS_NOTE)
    steps_to_target: float | None = Field(description=STEPS_TO_TARGET_NOTE)
    reached_target: bool | None = Field(description=REACHED_TARGET_NOTE)
    b_simple: float | None = Field(description=B_SIMPLE_NOTE.format(what="median"))
    b_simple_q25: float | None = Field(description=B_SIMPLE_NOTE.format(what="25th percentile"))
    b_simple_q75: float | None = Field(description=B_SIMPLE_NOTE.format(what="75th percentile"))
    config: JsonObjectOut
    created_at: dt.datetime
    updated_at: dt.datetime
    completed_at: dt.datetime | None = Field(description="when the trial finished, any status")
    excluded: bool = Field(description=EXCLUDED_NOTE)
    excluded_reason: str | None = Field(description="why the trial is excluded; null when not")
    created_by: str | None = Field(
        description="the name of the API token whose request created the trial; null when "
        "none did (imports from the command line, trials stored before this was recorded)"
    )


class TrialsPublic(OutModel):
    data: list[TrialPublic]
    count: int


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


# --- tokens ------------------------------------------------------------------------------

TOKEN_OWNER_NOTE = "free text: the person or team the token is for; null when not said"


class TokenCreate(InModel):
    """POST body of ``/v1/tokens``: a new token; its secret is shown once, in the answer."""

    name: Annotated[str, Field(min_length=1, max_length=200), NoNul, NotBlank]
    scope: Annotated[
        TokenScope, Field(description="read, write or admin (each implies the one before)")
    ]
    owner: Annotated[str, Field(min_length=1, max_length=200), NoNul, NotBlank] | None = Field(
        default=None, description=TOKEN_OWNER_NOTE
    )


class TokenPublic(OutModel):
    """A token as listed: never its secret or its hash (``prefix`` is its first characters,
    to tell tokens apart)."""

    id: int
    name: str
    prefix: str
    scope: TokenScope
    owner: str | None = Field(description=TOKEN_OWNER_NOTE)
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None = Field(
        description="when the token last authorized a request (updated at most once a minute)"
    )


class TokensPublic(OutModel):
    data: list[TokenPublic]
    count: int


class TokenCreated(TokenPublic):
    secret: str = Field(
        description="the bearer token itself, shown this once: only its SHA-256 hash is stored"
    )


# --- errors --------------------------------------------------------------------------------


class FieldErrorPublic(OutModel):
    """One violated rule of a 422 body."""

    field: str = Field(description="dotted path into the body, or the parameter's name")
    rule: str = Field(description="the rule's name: gt, missing, no_nul, float_range, ...")
    message: str = Field(description="a sentence naming the field and the rule")


class ValidationErrorPublic(OutModel):
    """The body of every 422: one entry per violated rule."""

    detail: list[FieldErrorPublic]


class ErrorPublic(OutModel):
    """The body of every other error: one sentence naming the object or field and the rule."""

    detail: str
