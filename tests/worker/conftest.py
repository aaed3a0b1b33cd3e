"""Fixtures for the fitting worker: fresh databases seeded with the bundled Step Law sweep.

Each test that changes trials or fits gets its own database (``fresh_db``), so that fits of
other tests' trials never mix in; ``seeded_db`` (imported and fitted) is shared read-only
within a module.
"""
from __future__ import annotations

import pytest

from server.core.db import make_engine, upgrade


@pytest.fixture(params=["postgresql", "sqlite"])
def fresh_db(request, make_database) -> str:
    """An empty, migrated database of each kind (a new one per test)."""
    url = make_database(request.param)
    upgrade(url)
    return url


@pytest.fixture
def fresh_pg(make_database) -> str:
    url = make_database("postgresql")
    upgrade(url)
    return url


@pytest.fixture
def engine_for():
    """``engine_for(url)``: an engine disposed after the test."""
    engines = []

    def make(url: str):
        engine = make_engine(url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def seed(url: str, kinds=("recommender",)) -> int:
    """Import the bundled Step Law sweep and fit ``kinds`` (default: the recommender only,
    which is what serves; None: every kind); returns the experiment id."""
    from server.worker import RECOMMENDER_KIND, refit_once
    from server.worker_commands import import_steplaw

    experiment_id, created, _ = import_steplaw(url)
    assert created == 1911
    engine = make_engine(url)
    try:
        outcomes = refit_once(engine, kinds=kinds)
    finally:
        engine.dispose()
    assert {o.status for o in outcomes if o.kind == RECOMMENDER_KIND} == {"ok"}, outcomes
    return experiment_id


@pytest.fixture(scope="module")
def seeded_pg(make_database) -> str:
    """A PostgreSQL database with the Step Law sweep imported and fitted (read only)."""
    url = make_database("postgresql")
    upgrade(url)
    seed(url)
    return url
