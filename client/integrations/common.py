"""What the framework callbacks share: N counted from a torch model, a framework's metrics as
the service's point columns, a config made JSON, the reason of an exception.

N (:func:`non_embedding_params`): every parameter of the model counted once (weights tied
to each other count once), minus the weights of its ``torch.nn.Embedding`` modules (token,
learned position and token-type embeddings) and of ``model.get_input_embeddings()`` where
the model has one. A readout tied to the token embedding is that embedding, so it is not
counted; an untied output head (an ``nn.Linear``) is. This is the rule of the trainer's GPT
(``trainer.model``: all parameters minus ``wte`` and ``wpe``), after Kaplan et al. 2020.
Parameters partitioned by DeepSpeed ZeRO-3 count their full size (``ds_numel``).

Points (:class:`PointMapper`): a framework's metric is renamed to the service's column
(``loss`` → ``train_loss``, ...; :data:`POINT_COLUMNS`). A numeric metric that has no column
(``epoch``, ``eval_runtime``, ...) is an *extra*: sent as it is (:data:`SEND_EXTRAS`),
under the service's rules for extras (a key of 1-64 letters, digits, ``_``, ``-``, ``.``,
``/``; at most 64 a point; others left out). Against a service older than extras, turn
:data:`SEND_EXTRAS` off: such a service refuses a whole batch with an extra in it. Either
way a key left out is named once in the log at INFO.
A step logged in two calls (train, then eval) is sent whole the second time (a service
before the same-step merge kept only the last of two rows of one step in one batch).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from client.wire import EXTRA_KEY_PATTERN, MAX_EXTRAS

log = logging.getLogger(__name__)

#: The value columns of a point (``server.models.POINT_VALUE_COLUMNS``; a test checks that
#: they match), besides ``step``.
POINT_COLUMNS = frozenset(
    {
        "tokens",
        "train_loss",
        "eval_loss",
        "ewa_eval_loss",
        "lr",
        "grad_norm",
        "b_simple",
        "tokens_per_s",
        "wall_time_s",
    }
)
#: Whether a numeric metric that has no column is sent as an extra (module docstring); the
#: service's rules for extras are in ``server/point_schemas.py``.
SEND_EXTRAS = True
_EXTRA_KEY = re.compile(EXTRA_KEY_PATTERN)
#: The five numbers of a trial the fits read: N, D, the sequence length, η, B in tokens.
SHAPE_KEYS = ("n_params", "n_tokens", "seq_len", "learning_rate", "batch_size_tokens")


def non_embedding_params(model: Any) -> int:
    """N of a ``torch.nn.Module`` (module docstring)."""
    import torch

    sizes = {id(p): int(getattr(p, "ds_numel", 0) or p.numel()) for p in model.parameters()}
    embeddings: list[torch.nn.Module] = [
        m for m in model.modules() if isinstance(m, torch.nn.Embedding)
    ]
    get_input = getattr(model, "get_input_embeddings", None)
    if callable(get_input):
        found = get_input()
        if isinstance(found, torch.nn.Module):
            embeddings.append(found)
    excluded = {id(p) for module in embeddings for p in module.parameters()}
    return sum(size for key, size in sizes.items() if key not in excluded)


def as_number(value: Any) -> float | None:
    """``value`` as a float: an int, a float, a one-element tensor or array; else None (and
    None for a bool, which is no measurement)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            got = item()
        except (TypeError, ValueError, RuntimeError):  # more than one element
            return None
        return None if isinstance(got, bool) else as_number(got)
    return None


class PointMapper:
    """A framework's metrics as points of the service: ``renames`` maps a framework's key to
    its column; values that are not numbers are left out, and keys without a column unless
    ``extras`` (default :data:`SEND_EXTRAS`). ``last`` holds the last value sent of each
    column (what a run finishes with)."""

    def __init__(self, renames: Mapping[str, str], *, extras: bool | None = None) -> None:
        self.renames = dict(renames)
        self.extras = SEND_EXTRAS if extras is None else extras
        self.last: dict[str, float] = {}
        self._unsent: set[str] = set()
        self._step: int | None = None
        self._at_step: dict[str, float] = {}

    def __call__(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        point: dict[str, float] = {}
        extras = 0
        for key, value in metrics.items():
            column = self.renames.get(key, key)
            number = as_number(value)
            if number is None:
                continue
            if column in POINT_COLUMNS:
                point[column] = number
            elif self.extras and _EXTRA_KEY.match(key) and extras < MAX_EXTRAS:
                point[key] = number
                extras += 1
            elif key not in self._unsent:
                self._unsent.add(key)
                log.info("hyperlaw: metric %r is not sent (no column of the service)", key)
        self.last.update(point)
        return point

    def at_step(self, step: int, point: Mapping[str, float]) -> dict[str, float]:
        """``point`` with what was sent before at the same ``step`` (a framework logs a step's
        train and eval metrics in two calls): the whole row goes again, because of two rows
        of one step in one batch the service keeps the last."""
        if step != self._step:
            self._step, self._at_step = step, {}
        self._at_step.update(point)
        return dict(self._at_step)


def tokens_at(step: int, batch_size_tokens: int) -> int:
    return max(int(step), 0) * int(batch_size_tokens)


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can hold it: mappings and sequences kept (keys as text), numbers,
    text, booleans and None as they are, anything else as its ``str``; nested deeper than 8
    levels as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value  # a non-finite float travels in the API's encoding (client.wire)
    if depth >= 8:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    number = as_number(value)
    return str(value) if number is None else number


def reason_of(exc: BaseException) -> str:
    """A trial's ``status_reason`` for ``exc`` (as ``client.run`` writes it)."""
    return f"{type(exc).__name__}: {exc}"[:2000]


def missing(shape: Mapping[str, Any], how: Mapping[str, str], framework: str) -> None:
    """Raise ``ValueError`` naming each of :data:`SHAPE_KEYS` that ``shape`` lacks, with
    ``how[key]``: how the user gives it."""
    lacking = [key for key in SHAPE_KEYS if shape.get(key) is None]
    if lacking:
        lines = "; ".join(f"{key}: {how.get(key, f'pass {key}=')}" for key in lacking)
        raise ValueError(f"hyperlaw ({framework}) cannot tell {', '.join(lacking)}: {lines}")
