"""What a fit stores (:class:`FitRecord`) and the JSON helpers every fit kind shares."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from client import wire

if TYPE_CHECKING:
    from fitting.powerlaw import PowerLawFit


@dataclass(frozen=True)
class FitRecord:
    """What a fit stores: ``status`` ok / insufficient_data / failed with ``message`` (the
    estimator's reason), JSON-able ``params``, ``intervals`` and ``quality``, and the ids of
    the trials the fit used."""

    status: str
    message: str | None
    params: dict[str, Any] | None
    intervals: dict[str, Any] | None
    quality: dict[str, Any]
    trial_ids: list[int]


# --- JSON ----------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """Dataclasses, enums, tuples and numpy values as plain JSON types (non-finite floats
    stay floats: the JSON columns encode them, see ``client.wire``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def checked_json(name: str, value: Any) -> Any:
    """``plain(value)``, raising ``ValueError`` naming ``name`` if it cannot be stored."""
    out = plain(value)
    try:
        wire.dumps(out)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not JSON-serialisable: {exc}") from exc
    return out


def law_intervals(law: PowerLawFit) -> dict[str, Any]:
    """``{"coefficient": interval, "exponents": {name: interval}}`` of a PowerLawFit."""
    exponents = zip(law.names, law.exponent_intervals, strict=False)
    return {
        "coefficient": plain(law.coefficient_interval),
        "exponents": {n: plain(iv) for n, iv in exponents},
    }


def law_quality(law: PowerLawFit) -> dict[str, Any]:
    return {
        "status": law.status.value,
        "r2_log": law.r2_log,
        "rmse_log": law.rmse_log,
        "n_points": law.n_points,
        "n_groups": law.n_groups,
    }
