"""The bodies of ``/v1/trials/{id}/points``: loss-curve points in and out, and the rules of
a point's *extras*, the metrics a training loop logs beside the known columns.

A point is one JSON object: ``step``, the known columns (``PointColumns``: ``tokens``,
``train_loss``, ..., ``wall_time_s``, each with its own rules, as before) and any other key,
which is an extra (``"mfu"``, ``"tokens_per_s/device"``, ``"loss/aux"``). Rules of extras,
each a 422 naming the field (``points.3.mfu``) and the rule:

- ``extra_key``: a key is 1-64 characters, letters, digits, ``_``, ``-``, ``.`` or ``/``
  (:data:`EXTRA_KEY_PATTERN`); a key that is a known column's name is that column;
- ``extra_value``: a value is a number, or ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (and the
  bare tokens ``NaN``, ``Infinity``, ``-Infinity``) as the known columns take non-finite ones;
  not a string otherwise, a boolean, a list or an object. ``null`` is allowed and means what
  it means for a known column: no value sent, whatever is stored stays;
- ``max_extras``: at most :data:`MAX_EXTRAS` extra keys per point (``null`` ones included),
  and at most as many stored for one step once merged with those a re-send keeps
  (``server.points``);
- numbers beyond a 64-bit float are ``float_range``, as everywhere (``server.api.limits``).

Out, ``PointPublic.extras`` is an object of numbers (non-finite ones as the API writes them),
or null when the point has none.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import ConfigDict, Field, GetPydanticSchema, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError, core_schema

from client.wire import EXTRA_KEY_PATTERN, MAX_EXTRAS, MAX_POINTS_PER_REQUEST
from server.schemas import NONFINITE_NOTE, AnyFloat, InModel, NonNegativeInt, OutModel

EXTRA_KEY_RULE = "1-64 letters, digits, '_', '-', '.' or '/'"
EXTRA_VALUE_RULE = 'a number, "NaN", "Infinity", "-Infinity" or null'
#: The sentences of the 422 (after the field's name; server.main).
EXTRA_KEY_MESSAGE = f"is not a known field, and not an extra key ({EXTRA_KEY_RULE})"
EXTRA_VALUE_MESSAGE = f"must be {EXTRA_VALUE_RULE}"
EXTRAS_NOTE = (
    "Any key other than the known columns is the client's own metric (an extra): a key of "
    f"{EXTRA_KEY_RULE}, a value that is {EXTRA_VALUE_RULE} (null: no value sent, the stored "
    f"one stays); at most {MAX_EXTRAS} per point. Re-sending a step replaces the values of "
    "the extras it sends and keeps the others. " + NONFINITE_NOTE
)
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _extra_key_schema(_source: Any, _handler: Any) -> core_schema.CoreSchema:
    return core_schema.custom_error_schema(
        core_schema.str_schema(pattern=EXTRA_KEY_PATTERN),
        custom_error_type="extra_key",
        custom_error_message=EXTRA_KEY_MESSAGE,
    )


def _extra_value_schema(_source: Any, _handler: Any) -> core_schema.CoreSchema:
    """A strict float (JSON numbers, not strings or booleans) or a non-finite float's
    string, or null: one error, ``extra_value``, for anything else (all in pydantic-core)."""
    nonfinite = core_schema.no_info_after_validator_function(
        _NONFINITE.__getitem__, core_schema.literal_schema(list(_NONFINITE))
    )
    number = core_schema.union_schema([core_schema.float_schema(strict=True), nonfinite])
    return core_schema.custom_error_schema(
        core_schema.nullable_schema(number),
        custom_error_type="extra_value",
        custom_error_message=EXTRA_VALUE_MESSAGE,
    )


ExtraKey = Annotated[str, GetPydanticSchema(_extra_key_schema)]
ExtraValue = Annotated[float | None, GetPydanticSchema(_extra_value_schema)]
# An extra's value out: a number, or a non-finite one's string (stated, since they occur).
ExtraOut = Annotated[
    float,
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string", "enum": list(_NONFINITE)}]}),
]


class PointColumns(InModel):
    """A point's known columns, and no other key: the rules ``server.points`` validates a
    batch by first (a batch without extras never needs more)."""

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


class PointIn(PointColumns):
    """One loss-curve row; (trial, step) is the key, re-sending a step overwrites the values
    it sends. Keys other than the columns are extras (module docstring), in
    ``__pydantic_extra__``; :meth:`sent_extras` gives those with a value."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "description": "One loss-curve row. " + EXTRAS_NOTE,
            "propertyNames": {"pattern": EXTRA_KEY_PATTERN},
        },
    )
    __pydantic_extra__: dict[ExtraKey, ExtraValue]

    @model_validator(mode="before")
    @classmethod
    def _at_most_max_extras(cls, data: Any) -> Any:
        """Counted before anything is validated: 10,000 keys are refused at once."""
        if isinstance(data, dict) and len(data) > MAX_EXTRAS:
            extras = len(data.keys() - cls.model_fields.keys())
            if extras > MAX_EXTRAS:
                raise PydanticCustomError(
                    "max_extras",
                    "must hold at most {max_extras} extra keys (got {extras})",
                    {"max_extras": MAX_EXTRAS, "extras": extras},
                )
        return data

    def sent_extras(self) -> dict[str, float] | None:
        """The extras sent with a value (null ones keep the stored value: left out), or
        None when there are none."""
        extra = self.__pydantic_extra__ or {}
        return {k: v for k, v in extra.items() if v is not None} or None


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
    extras: dict[str, ExtraOut] | None = Field(
        description="the client's own metrics sent with the point, by key (non-finite ones "
        'as "NaN", "Infinity", "-Infinity"); null when it has none'
    )


class PointsPublic(OutModel):
    trial_id: int
    data: list[PointPublic]
    count: int


class PointsStored(OutModel):
    trial_id: int
    count: int = Field(description="distinct steps written (inserted or overwritten)")
