"""Which database backends a parametrized case of the ``api`` fixture runs on.

Most hostile-input cases are refused by validation before any SQL is run: the backend does
not change their path, so running each of them on both backends checks nothing twice. Such
cases run on PostgreSQL (where a NUL or a number past BIGINT would otherwise reach the
driver); the cases whose answer depends on what is stored, and one case per rule, run on
SQLite too, so that each rule is still seen to leave both stores unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import pytest

BOTH = ("postgresql", "sqlite")


def per_backend(
    cases: Sequence[Any], ids: Sequence[str], *, sqlite_too: Callable[[Any], bool]
) -> list[Any]:
    """``pytest.param(backend, case)`` for ``parametrize("api, case", ..., indirect=["api"])``:
    every case on PostgreSQL, and on SQLite those that ``sqlite_too`` selects."""
    params = []
    for case, case_id in zip(cases, ids, strict=True):
        backends = BOTH if sqlite_too(case) else BOTH[:1]
        params += [pytest.param(backend, case, id=f"{backend}-{case_id}") for backend in backends]
    return params


def first_of_each(key: Callable[[Any], Hashable]) -> Callable[[Any], bool]:
    """A ``sqlite_too`` that selects the first case of each ``key`` (its rule, its route)."""
    seen: set[Hashable] = set()

    def first(case: Any) -> bool:
        k = key(case)
        if k in seen:
            return False
        seen.add(k)
        return True

    return first
