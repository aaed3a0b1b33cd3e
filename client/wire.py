"""The API's JSON wire format, shared by the service and its clients.

Non-finite floats: the one encoding of them in JSON, used on the wire and in the service's
JSON columns.

JSON has no NaN or infinity (PostgreSQL's ``json`` type and Starlette's responses both
refuse them), but diverged runs produce them. hyperlaw writes them as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` and reads those strings back as floats,
except under keys that hold text (``name``, ``message``, ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

#: The most loss-curve points one ``POST /v1/trials/{id}/points`` may carry.
MAX_POINTS_PER_REQUEST = 10_000

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
        "detail",
        "status",
        "source",
        "reason",
    }
)


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
