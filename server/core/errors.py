"""The service's own exception types; ``server.main`` maps each to an HTTP status.

Error bodies on the wire:

- 422 (bad input): ``{"detail": [{"field": "batch_size_tokens", "rule": "gt",
  "message": "batch_size_tokens must be > 0"}, ...]}`` -- one entry per violated rule.
- every other 4xx/5xx: ``{"detail": "trial 17 not found"}`` (a sentence naming the object
  or field and the rule).
"""

from __future__ import annotations

from dataclasses import dataclass


class HyperlawError(Exception):
    """Base class; ``status_code`` is the HTTP status the API answers with."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(HyperlawError):
    """The named object does not exist (404)."""

    status_code = 404


class ConflictError(HyperlawError):
    """The request contradicts the stored state, e.g. reopening a finished trial (409)."""

    status_code = 409


class StorageUnavailableError(HyperlawError):
    """The database could not serve the request (503; clients retry). Its message is a
    fixed sentence (``server.core.db.STORAGE_UNAVAILABLE``): the driver's text, which names
    hosts, databases and roles, goes to the log only."""

    status_code = 503


class SchemaOutdatedError(HyperlawError):
    """The database is not migrated to this version's schema; the message names the fix
    (``hyperlaw db upgrade``). The service refuses to start on it; commands exit with 2."""

    status_code = 503


class NoFitError(HyperlawError):
    """No ok recommender fit can serve the scope yet (503: retry once the worker stored
    one); the message says why (the last fit's status and reason) and how to get one."""

    status_code = 503


@dataclass(frozen=True)
class FieldError:
    """One violated rule: the field (dotted path), the rule's name and a sentence."""

    field: str
    rule: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "rule": self.rule, "message": self.message}


class InputError(HyperlawError):
    """Input that passed parsing but breaks a rule only the service can check (422)."""

    status_code = 422

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(e.message for e in errors))
        self.errors = errors
