"""Scratch databases for the tests and the benchmarks, and the data they start from.

- ``postgres_admin_url()``: the PostgreSQL server the tests may create and drop databases on
  (``HYPERLAW_TEST_DATABASE_URL``, else postgresql://postgres@127.0.0.1:5432/test);
- ``create_postgres_database`` / ``drop_postgres_database``: an empty database with a
  unique name, and its removal (connections closed first);
- ``seed_steplaw(url)``: the bundled Step Law sweep imported and fitted;
- ``light_fits()`` / ``LIGHT_FITS_ENV``: the worker's fits without bootstrap draws or
  law-form averaging, in process and for a ``hyperlaw`` process;
- ``shared_fitter``: the recommender's ``default_fitter``, run once per distinct input in
  the test process (tests that fit the same trials on both backends);
- ``add_completed_trial(url)``: one completed trained trial, created as the API creates it;
- ``hyperlaw_command(url, *args)`` / ``run_hyperlaw(url, *args)``: the ``hyperlaw`` command
  of this checkout on a database, as a user types it (``python -m hyperlaw``).

The benchmarks import this module too (they put the repository root on ``sys.path``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from server.core.db import open_database

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REPO_ROOT = Path(__file__).resolve().parents[1]


def hyperlaw_command(
    database_url: str, *args: str, env: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of ``hyperlaw --log-level WARNING ARGS`` run from this
    checkout on the database at ``database_url`` (``env`` is added to this process's)."""
    run_env = {**os.environ, "HYPERLAW_DATABASE_URL": database_url, **(env or {})}
    run_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + run_env.get("PYTHONPATH", "")
    return [sys.executable, "-m", "hyperlaw", "--log-level", "WARNING", *args], run_env


def run_hyperlaw(
    database_url: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``hyperlaw ARGS`` on the database at ``database_url`` to the end; its output is
    captured as text."""
    argv, env = hyperlaw_command(database_url, *args)
    return subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def postgres_admin_url() -> str:
    """The server for scratch databases, with the installed driver (psycopg2) named."""
    url = os.environ.get("HYPERLAW_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    if url.startswith("postgresql://"):
        url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
    return url


def create_postgres_database(admin_url: str, prefix: str) -> str:
    """Create an empty database named ``<prefix>_<random>`` on the server of ``admin_url``
    (a role allowed to CREATE DATABASE); returns the new database's URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    # CREATE DATABASE cannot run inside a transaction
    with open_database(admin_url, isolation_level="AUTOCOMMIT") as admin:
        with admin.engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return admin.engine.url.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(admin_url: str, url: str) -> None:
    """Drop the database of ``url`` (closing its connections) through ``admin_url``."""
    name = make_url(url).database
    with open_database(admin_url, isolation_level="AUTOCOMMIT") as admin:
        with admin.engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


#: ``light_fits()`` for a ``hyperlaw worker`` or ``hyperlaw serve`` process (its settings).
LIGHT_FITS_ENV = {"HYPERLAW_WORKER_N_BOOTSTRAP": "0", "HYPERLAW_WORKER_LAW_FORMS": "false"}


def light_fits() -> dict[str, Any]:
    """``options`` and ``estimators`` (for ``refit_once``, ``refit_scope``, ``FittingWorker``)
    of fits with no bootstrap draws (no intervals) and no averaging over law forms: a fraction
    of the default fits' time on the bundled sweep, for tests whose checks depend on neither."""
    from server.worker.loop import worker_fits

    return worker_fits(n_bootstrap=0, law_forms=False)


_FITTED: dict[str, Any] = {}


def shared_fitter(runs: Any, **options: Any) -> Any:
    """``default_fitter``, run once per distinct input (every field of the runs, and the
    options) in this test process: a test whose two backends hold the same trials gets, on
    the second backend, the recommenders fitted for the first (a fit is a deterministic
    function of its input). Load, store and serve still run on each backend; a backend whose
    runs differ in any value fits afresh."""
    import numpy as np

    from server.worker.fits import default_fitter

    digest = hashlib.sha256(pickle.dumps(sorted(options.items())))
    for field in dataclasses.fields(runs):
        value = getattr(runs, field.name)
        digest.update(
            field.name.encode() + pickle.dumps(None if value is None else np.asarray(value))
        )
    key = digest.hexdigest()
    if key not in _FITTED:
        _FITTED[key] = default_fitter(runs, **options)
    return _FITTED[key]


def seed_steplaw(
    url: str, kinds: Iterable[str] | None = ("recommender",), *, light: bool = False
) -> int:
    """Import the bundled Step Law sweep into the migrated database at ``url`` and fit
    ``kinds`` (default: the recommender only, which is what serves; None: every kind), with
    the default options or, with ``light``, :func:`light_fits`; returns the experiment id."""
    from server.importers import import_steplaw
    from server.worker.fits import RECOMMENDER_KIND
    from server.worker.loop import refit_once

    with open_database(url) as database:
        experiment_id, created, _ = import_steplaw(database)
        assert created == 1911
        outcomes = refit_once(database, kinds=kinds, **(light_fits() if light else {}))
    assert {o.status for o in outcomes if o.kind == RECOMMENDER_KIND} == {"ok"}, outcomes
    return experiment_id


def add_completed_trial(
    url: str,
    experiment: str = "steplaw",
    *,
    loss: float = 3.1,
    learning_rate: float = 1e-3,
    n_params: int = 300_000_000,
) -> int:
    """A completed trained trial, created as the API would (crud, which notifies)."""
    from server import crud
    from server.models import TrialSource, TrialStatus
    from server.schemas import ExperimentCreate, TrialCreate

    with open_database(url) as database, database.session() as session:
        exp, _ = crud.create_experiment(
            session=session, experiment_in=ExperimentCreate(name=experiment)
        )
        trial, _ = crud.create_trial(
            session=session,
            trial_in=TrialCreate(
                experiment_id=exp.id,
                n_params=n_params,
                n_tokens=20_000_000_000,
                seq_len=2048,
                learning_rate=learning_rate,
                batch_size_tokens=1_048_576,
                status=TrialStatus.COMPLETED,
                source=TrialSource.TRAINED,
                final_loss=loss,
            ),
        )
        return trial.id
