"""Migrations from empty to head and back, revision by revision, on both databases; the
models match the migrated schema; data already stored is backfilled (0003: the trials'
stop reasons; 0004: the experiments' families; 0005: steps to target from configs and the
b_simple summaries from points) and kept on the way down; the service refuses an
out-of-date schema."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from client.wire import dumps
from server.core.config import Settings
from server.core.db import (
    alembic_config,
    current_revision,
    downgrade,
    open_database,
    schema_is_current,
    upgrade,
)
from server.core.errors import SchemaOutdatedError
from server.main import create_app
from server.models import Base, FaithfulFloat
from tests.conftest import REPO_ROOT

ALL_TABLES = {"experiments", "trials", "points", "fits", "api_tokens"}


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def _tables(url: str) -> set[str]:
    with open_database(url) as database:
        return set(inspect(database.engine).get_table_names()) - {"alembic_version"}


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_upgrade_from_empty_and_downgrade_back(make_database, backend):
    url = make_database(backend)
    with open_database(url) as database:
        engine = database.engine
        assert current_revision(engine) is None and not schema_is_current(engine)
        revisions = _revisions()
        assert revisions == ["0001", "0002", "0003", "0004", "0005"]
        for rev in revisions:  # up one revision at a time
            upgrade(url, rev)
            assert current_revision(engine) == rev
        assert _tables(url) == ALL_TABLES and schema_is_current(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        for target in reversed(["base", *revisions[:-1]]):  # and down again
            downgrade(url, target)
            assert current_revision(engine) == (None if target == "base" else target)
        assert _tables(url) == set()
        upgrade(url)  # and up again from empty, in one go
        assert _tables(url) == ALL_TABLES


# trials as revision 0002 left them: (status, source, diverged, n_tokens, tokens_done) and
# the stop reason 0003 gives each (batch size 100 tokens throughout)
BACKFILL = [
    ("completed", "trained", True, 10_000, 300, "diverged"),
    ("completed", "imported", True, 10_000, None, "diverged"),
    ("failed", "trained", False, 10_000, 300, "failed"),
    ("completed", "imported", False, 10_000, None, "budget"),
    ("completed", "trained", False, 10_000, 10_000, "budget"),
    ("completed", "trained", None, 10_000, 9_950, "budget"),  # within one batch of D
    ("completed", "trained", False, 10_000, 9_900, "budget"),  # exactly one batch short
    ("completed", "trained", False, 10_000, 9_899, None),  # stopped early: reason unknown
    ("completed", "trained", False, 10_000, None, None),  # tokens not recorded
    ("running", "trained", None, 10_000, 500, None),
    ("queued", "trained", None, 10_000, None, None),
    ("pruned", "trained", False, 10_000, 2_000, None),
]


def _rows_at_0002(url: str) -> list[int]:
    """One experiment, the BACKFILL trials and a point of each, written as 0002's schema
    has them (the columns it requires, and those 0003 reads); returns the trial ids in
    BACKFILL's order."""
    now = dt.datetime.now(dt.timezone.utc)
    experiments = sa.table(
        "experiments", sa.column("id"), sa.column("name"), sa.column("created_at")
    )
    trials = sa.table("trials", *(sa.column(c) for c in TRIAL_COLUMNS_0002))
    points = sa.table("points", sa.column("trial_id"), sa.column("step"), sa.column("eval_loss"))
    with open_database(url) as database, database.engine.begin() as conn:
        conn.execute(experiments.insert().values(id=1, name="before-0003", created_at=now))
        for i, (status, source, diverged, n_tokens, tokens_done, _) in enumerate(BACKFILL, 1):
            trial = dict(
                id=i,
                experiment_id=1,
                n_params=10**6,
                n_tokens=n_tokens,
                seq_len=1,
                learning_rate=1e-3,
                batch_size_tokens=100,
                status=status,
                source=source,
                diverged=diverged,
                tokens_done=tokens_done,
                created_at=now,
                updated_at=now,
            )
            conn.execute(trials.insert().values(**trial))
            conn.execute(points.insert().values(trial_id=i, step=0, eval_loss=3.0))
    return list(range(1, len(BACKFILL) + 1))


TRIAL_COLUMNS_0002 = (
    "id",
    "experiment_id",
    "n_params",
    "n_tokens",
    "seq_len",
    "learning_rate",
    "batch_size_tokens",
    "status",
    "source",
    "diverged",
    "tokens_done",
    "created_at",
    "updated_at",
)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_stop_reason_is_backfilled_and_dropped_with_the_data_kept(make_database, backend):
    url = make_database(backend)
    upgrade(url, "0002")
    ids = _rows_at_0002(url)
    upgrade(url, "0003")
    with open_database(url) as database:
        with database.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, stop_reason FROM trials ORDER BY id")).all()
            updated = conn.execute(sa.text("SELECT DISTINCT updated_at FROM trials")).all()
        assert rows == [(i, case[-1]) for i, case in zip(ids, BACKFILL, strict=True)]
        assert len(updated) == 1  # the backfill changes no other column
        # the column holds a stop reason or nothing else
        with pytest.raises(IntegrityError), database.engine.begin() as conn:
            conn.execute(sa.text("UPDATE trials SET stop_reason = 'bored' WHERE id = 1"))
    downgrade(url, "0002")
    with open_database(url) as database, database.engine.connect() as conn:
        columns = {c["name"] for c in inspect(database.engine).get_columns("trials")}
        assert "stop_reason" not in columns and "tokens_done" in columns
        assert conn.scalar(sa.text("SELECT count(*) FROM trials")) == len(BACKFILL)
        assert conn.scalar(sa.text("SELECT count(*) FROM points")) == len(BACKFILL)
    upgrade(url)  # and up again over the same rows
    with open_database(url) as database, database.engine.connect() as conn:
        backfilled = conn.execute(sa.text("SELECT stop_reason FROM trials ORDER BY id"))
        assert [r for (r,) in backfilled] == [case[-1] for case in BACKFILL]


# experiments as revision 0003 left them: (name, idempotency keys of their trials, source) and
# the family 0004 gives each; the Step Law import is known by its keys, not by its name
FAMILIES = [
    ("published", ["steplaw:0123456789abcdef:0", "steplaw:0123456789abcdef:1"], "imported"),
    ("team-sweep", ["N1-D2-lr0.001", None], "trained"),
    ("steplaw", ["runs:fedcba9876543210:0"], "imported"),  # a CSV import named steplaw
    ("empty", [], "trained"),
]


def _experiments_at_0003(url: str) -> dict[str, int]:
    """The FAMILIES experiments and their trials, written as 0003's schema has them;
    returns the experiments' ids by name."""
    now = dt.datetime.now(dt.timezone.utc)
    experiments = sa.table(
        "experiments", sa.column("id"), sa.column("name"), sa.column("created_at")
    )
    trials = sa.table("trials", *(sa.column(c) for c in (*TRIAL_COLUMNS_0002, "idempotency_key")))
    ids, trial_id = {}, 0
    with open_database(url) as database, database.engine.begin() as conn:
        for experiment_id, (name, keys, source) in enumerate(FAMILIES, 7):
            conn.execute(experiments.insert().values(id=experiment_id, name=name, created_at=now))
            ids[name] = experiment_id
            for key in keys:
                trial_id += 1
                conn.execute(
                    trials.insert().values(
                        id=trial_id,
                        experiment_id=experiment_id,
                        n_params=10**6,
                        n_tokens=10**4,
                        seq_len=1,
                        learning_rate=1e-3,
                        batch_size_tokens=100,
                        status="completed",
                        source=source,
                        diverged=False,
                        tokens_done=10**4,
                        idempotency_key=key,
                        created_at=now,
                        updated_at=now,
                    )
                )
    return ids


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_families_are_backfilled_and_dropped_with_the_data_kept(make_database, backend):
    url = make_database(backend)
    upgrade(url, "0003")
    ids = _experiments_at_0003(url)
    expected = {
        "published": "step-law",
        "team-sweep": f"experiment-{ids['team-sweep']}",
        "steplaw": f"experiment-{ids['steplaw']}",
        "empty": f"experiment-{ids['empty']}",
    }
    upgrade(url, "0004")
    families = "SELECT name, family FROM experiments ORDER BY id"
    with open_database(url) as database:
        with database.engine.connect() as conn:
            assert dict(conn.execute(sa.text(families)).all()) == expected
            parametrizations = conn.execute(sa.text("SELECT DISTINCT parametrization FROM trials"))
            assert parametrizations.scalars().all() == ["standard"]
        with database.engine.begin() as conn:  # what the API creates without saying
            conn.execute(
                sa.text("INSERT INTO experiments (name, created_at) VALUES ('new', '2026-01-01')")
            )
            assert (
                conn.scalar(sa.text("SELECT family FROM experiments WHERE name = 'new'"))
                == "default"
            )
        with pytest.raises(IntegrityError), database.engine.begin() as conn:
            conn.execute(sa.text("UPDATE trials SET parametrization = 'ntk' WHERE id = 1"))
        with pytest.raises(IntegrityError), database.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE experiments SET family = NULL WHERE id = :i"), {"i": ids["empty"]}
            )
    downgrade(url, "0003")
    with open_database(url) as database, database.engine.connect() as conn:
        assert "family" not in {
            c["name"] for c in inspect(database.engine).get_columns("experiments")
        }
        assert "parametrization" not in {
            c["name"] for c in inspect(database.engine).get_columns("trials")
        }
        assert conn.scalar(sa.text("SELECT count(*) FROM experiments")) == len(FAMILIES) + 1
        assert conn.scalar(sa.text("SELECT count(*) FROM trials")) == 5
    upgrade(url)  # and up again over the same rows
    with open_database(url) as database, database.engine.connect() as conn:
        new = conn.scalar(sa.text("SELECT id FROM experiments WHERE name = 'new'"))
        assert dict(conn.execute(sa.text(families)).all()) == {
            **expected,
            "new": f"experiment-{new}",
        }


# trials as revision 0004 left them: (status, config) and the (target_loss, steps_to_target,
# reached_target) 0005 gives each; configs are written as the service writes JSON (non-finite
# floats as "Infinity"/"NaN" text)
STEPS_TO_TARGET = [
    ("completed", {"steps_to_target": 1234.5, "target_loss": 3.25}, (3.25, 1234.5, True)),
    ("completed", {"steps_to_target": "Infinity", "target_loss": 3.25}, (3.25, None, False)),
    ("completed", {"steps_to_target": 0, "target_loss": 2}, (2.0, 0.0, True)),
    ("completed", {"steps_to_target": 100.0}, (None, None, None)),  # no target: left out
    ("completed", {"steps_to_target": "NaN", "target_loss": 3.0}, (None, None, None)),
    ("completed", {"steps_to_target": -5.0, "target_loss": 3.0}, (None, None, None)),
    ("completed", {"steps_to_target": 100.0, "target_loss": "Infinity"}, (None, None, None)),
    ("completed", {"steps_to_target": "many", "target_loss": 3.0}, (None, None, None)),
    ("completed", {"dataset": "x.csv"}, (None, None, None)),
    ("completed", None, (None, None, None)),
    ("running", {"steps_to_target": 10.0, "target_loss": 4.0}, (4.0, 10.0, True)),
]
# (status, points as (step, b_simple)) for the b_simple backfill: completed trials only
B_SIMPLE_CURVES = [
    ("completed", [(s, 1000.0 + 10 * s) for s in range(0, 101, 5)]),
    ("completed", [(10, -50.0), (69, 1.0), (70, 2.0), (80, float("nan")), (90, 4.0), (100, 9.0)]),
    ("completed", [(1, float("nan")), (2, None)]),  # nothing finite: stays null
    ("running", [(s, 500.0) for s in range(10)]),  # summarized when it completes
]


def _trials_at_0004(url: str) -> tuple[list[int], list[int]]:
    """The STEPS_TO_TARGET and B_SIMPLE_CURVES trials (the curves as points), written as
    0004's schema has them; returns the ids of each, in order."""
    now = dt.datetime.now(dt.timezone.utc)
    experiments = sa.table(
        "experiments", sa.column("id"), sa.column("name"), sa.column("created_at")
    )
    trials = sa.table(
        "trials", *(sa.column(c) for c in TRIAL_COLUMNS_0002), sa.column("config", sa.JSON)
    )
    points = sa.table(  # NaN as the service stores it (SQLite would make it NULL)
        "points", sa.column("trial_id"), sa.column("step"), sa.column("b_simple", FaithfulFloat)
    )
    base = dict(
        experiment_id=1,
        n_params=10**6,
        n_tokens=10**4,
        seq_len=1,
        learning_rate=1e-3,
        batch_size_tokens=100,
        source="imported",
        created_at=now,
        updated_at=now,
    )
    rows = [(status, config, []) for status, config, _ in STEPS_TO_TARGET]
    rows += [(status, None, curve) for status, curve in B_SIMPLE_CURVES]
    with open_database(url) as database, database.engine.begin() as conn:
        conn.execute(experiments.insert().values(id=1, name="before-0005", created_at=now))
        for i, (status, config, curve) in enumerate(rows, 1):
            conn.execute(trials.insert().values(id=i, status=status, config=config, **base))
            for step, b_simple in curve:
                conn.execute(points.insert().values(trial_id=i, step=step, b_simple=b_simple))
    ids = list(range(1, len(rows) + 1))
    return ids[: len(STEPS_TO_TARGET)], ids[len(STEPS_TO_TARGET) :]


def _late_quartiles(curve: list[tuple[int, float | None]]) -> list[float] | None:
    """numpy's 25th, 50th and 75th percentiles of the finite values at steps >= 0.7 x the
    last step with one: the summary 0005 stores, computed here independently."""
    finite = [(s, v) for s, v in curve if v is not None and np.isfinite(v)]
    if not finite:
        return None
    last = max(s for s, _ in finite)
    late = [v for s, v in finite if 10 * s >= 7 * last]
    return [float(q) for q in np.percentile(late, [25, 50, 75])]


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_steps_to_target_and_b_simple_are_backfilled_and_dropped_with_the_data_kept(
    make_database, backend
):
    url = make_database(backend)
    upgrade(url, "0004")
    target_ids, curve_ids = _trials_at_0004(url)
    upgrade(url, "0005")
    columns = "target_loss, steps_to_target, reached_target"
    summary = "b_simple_q25, b_simple, b_simple_q75"
    with open_database(url) as database, database.engine.connect() as conn:
        for trial_id, (*_, want) in zip(target_ids, STEPS_TO_TARGET, strict=True):
            got = conn.execute(sa.text(f"SELECT {columns} FROM trials WHERE id = {trial_id}"))
            row = tuple(got.one())
            assert row[:2] == want[:2] and (None if row[2] is None else bool(row[2])) == want[2]
        for trial_id, (status, curve) in zip(curve_ids, B_SIMPLE_CURVES, strict=True):
            got = conn.execute(sa.text(f"SELECT {summary} FROM trials WHERE id = {trial_id}"))
            want = _late_quartiles(curve) if status == "completed" else None
            assert list(got.one()) == (want or [None, None, None]), (trial_id, curve)
        # the second curve by hand: steps 70, 90, 100 (69 is short of 0.7 x 100, 80 is NaN)
        assert _late_quartiles(B_SIMPLE_CURVES[1][1]) == [3.0, 4.0, 6.5]
        config = sa.table("trials", sa.column("id"), sa.column("config", sa.JSON)).c.config
        kept = conn.scalars(sa.select(config).order_by(sa.column("id"))).all()
        originals = [c for _, c, _ in STEPS_TO_TARGET]
        assert dumps(kept[: len(originals)]) == dumps(originals)  # untouched (as JSON text)
        updated = conn.execute(sa.text("SELECT DISTINCT updated_at FROM trials")).all()
        assert len(updated) == 1  # the backfill changes no other column
    downgrade(url, "0004")
    with open_database(url) as database, database.engine.connect() as conn:
        left = {c["name"] for c in inspect(database.engine).get_columns("trials")}
        assert not left & {"target_loss", "steps_to_target", "reached_target", "b_simple"}
        assert conn.scalar(sa.text("SELECT count(*) FROM trials")) == len(target_ids + curve_ids)
        n_points = sum(len(curve) for _, curve in B_SIMPLE_CURVES)
        assert conn.scalar(sa.text("SELECT count(*) FROM points")) == n_points
    upgrade(url)  # and up again over the same rows
    with open_database(url) as database, database.engine.connect() as conn:
        again = conn.execute(sa.text(f"SELECT {columns} FROM trials WHERE id = {target_ids[0]}"))
        assert tuple(again.one())[:2] == (3.25, 1234.5)


def test_app_refuses_an_outdated_schema(make_database):
    url = make_database("sqlite")
    upgrade(url, "0001")
    with pytest.raises(SchemaOutdatedError, match=r"run `hyperlaw db upgrade`"):
        create_app(Settings(database_url=url))


def _cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYPERLAW_DATABASE_URL": url, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_db_and_token_commands(make_database):
    url = make_database("sqlite")
    refused = _cli(url, "serve", "--no-worker", "--port", "1")
    assert refused.returncode == 2 and "hyperlaw db upgrade" in refused.stderr
    assert _cli(url, "db", "current").returncode == 1
    assert _cli(url, "db", "upgrade").returncode == 0  # from an unrelated cwd
    current = _cli(url, "db", "current")
    assert current.returncode == 0 and "current=0005 head=0005" in current.stdout
    created = _cli(url, "token", "create", "--name", "ci", "--scope", "write")
    secret = created.stdout.strip()
    assert created.returncode == 0 and secret.startswith("hl_") and len(secret) > 40
    assert _cli(url, "token", "create", "--name", "ci", "--scope", "read").returncode == 1
    listed = _cli(url, "token", "list").stdout
    assert "ci\twrite\t" in listed and secret not in listed
    assert _cli(url, "token", "revoke", "--name", "ci").returncode == 0
    assert "revoked" in _cli(url, "token", "list").stdout
    assert _cli(url, "token", "revoke", "--name", "nobody").returncode == 1
    assert _cli(url, "db", "downgrade", "base").returncode == 0
    assert _tables(url) == set()
