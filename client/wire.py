"""The API's JSON wire format, shared by the service and its clients.

Non-finite floats: the one encoding of them in JSON, used on the wire and in the service's
JSON columns.

JSON has no NaN or infinity (PostgreSQL's ``json`` type and Starlette's responses both
refuse them), but diverged runs produce them. hyperlaw writes them as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` and reads those strings back as floats,
except under keys that hold text (``name``, ``message``, ...).

Family names: a family (what makes losses comparable: data, tokenizer, model family) is
named by 1-100 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or digit
(:data:`FAMILY_NAME_PATTERN`); an experiment created without one is in
:data:`DEFAULT_FAMILY`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

#: The most loss-curve points one ``POST /v1/trials/{id}/points`` may carry.
MAX_POINTS_PER_REQUEST = 10_000
#: What a point's extra key may be, and how many a point may carry (the rules are stated in
#: ``server/point_schemas.py``; the callbacks of ``client.integrations`` keep to them).
EXTRA_KEY_PATTERN = r"^[A-Za-z0-9_./-]{1,64}$"
MAX_EXTRAS = 64
#: What a family name may be (module docstring), and the family of an experiment that names
#: none.
FAMILY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
FAMILY_NAME_RULE = (
    "must be 1-100 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
)
DEFAULT_FAMILY = "default"

_TO_STR = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_FROM_STR = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Keys whose values are text: a value "NaN" under them stays a string.
TEXT_KEYS = frozenset(
    {
        "name",
        "description",
        "status_reason",
        "message",
        "kind",
        "scope",
        "idempotency_key",
        "data_watermark",
        "schedule",
        "family",
        "fit_key",
        "main_fit_key",
        "parametrization",
        "detail",
        "status",
        "source",
        "reason",
    }
)


def family_name_problem(name: str) -> str | None:
    """Why ``name`` is not a family name (:data:`FAMILY_NAME_RULE`), or None when it is."""
    if re.fullmatch(FAMILY_NAME_PATTERN, name):
        return None
    return f"{FAMILY_NAME_RULE} (got {name!r})"


def encode_nonfinite(value: Any) -> Any:
    """Replace NaN/±inf floats by "NaN"/"Infinity"/"-Infinity", recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else _TO_STR[repr(value)]
    if isinstance(value, Mapping):
        return {k: encode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_nonfinite(v) for v in value]
    return value


def decode_nonfinite(value: Any, key: str | None = None) -> Any:
    """Turn "NaN"/"Infinity"/"-Infinity" strings back into floats, recursively."""
    if isinstance(value, str):
        if key not in TEXT_KEYS and value in _FROM_STR:
            return _FROM_STR[value]
        return value
    if isinstance(value, dict):
        return {k: decode_nonfinite(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_nonfinite(v, key) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never emits bare NaN/Infinity (fast path when all is finite)."""
    kwargs.setdefault("separators", (",", ":"))
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(encode_nonfinite(value), allow_nan=False, **kwargs)


def loads(text: str | bytes) -> Any:
    """``json.loads`` that turns the non-finite strings back into floats."""
    return decode_nonfinite(json.loads(text))
