"""Migrations from empty to head and back, revision by revision, on both databases; the
models match the migrated schema; data already stored is backfilled (0003: the trials'
stop reasons; 0004: the experiments' families; 0005: steps to target from configs and the
b_simple summaries from points; 0006: null extras, owners and creators; 0007: every trial
included, no deletions) and kept on the way down; the service refuses an out-of-date
schema."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import httpx
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
from server.models import Base, FaithfulFloat, Point
from tests.conftest import REPO_ROOT
from tests.databases import add_completed_trial

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
        assert revisions == ["0001", "0002", "0003", "0004", "0005", "0006", "0007"]
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


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_extras_owners_and_creators_start_null_and_drop_with_the_data_kept(make_database, backend):
    url = make_database(backend)
    upgrade(url, "0005")
    target_ids, curve_ids = _trials_at_0004(url)  # 0005 reads and writes none of 0006's
    tokens = sa.table(
        "api_tokens",
        *(sa.column(c) for c in ("id", "name", "token_hash", "prefix", "scope")),
        sa.column("created_at", TS),
    )
    now = dt.datetime.now(dt.timezone.utc)
    with open_database(url) as database, database.engine.begin() as conn:
        conn.execute(
            tokens.insert().values(
                id=1, name="ci", token_hash="0" * 64, prefix="hl_0", scope="write", created_at=now
            )
        )
    upgrade(url, "0006")
    with open_database(url) as database, database.engine.begin() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM points WHERE extras IS NOT NULL")) == 0
        assert conn.scalar(sa.text("SELECT owner FROM api_tokens")) is None
        creators = conn.execute(sa.text("SELECT DISTINCT created_by_token_id FROM trials"))
        assert creators.all() == [(None,)]
        conn.execute(sa.text("UPDATE api_tokens SET owner = 'team a'"))
        conn.execute(
            sa.text(f"UPDATE trials SET created_by_token_id = 1 WHERE id = {curve_ids[0]}")
        )
        point = sa.table("points", sa.column("step"), sa.column("extras", Point.extras.type))
        conn.execute(point.update().where(point.c.step == 0).values(extras={"mfu": 0.5}))
    with pytest.raises(IntegrityError), open_database(url) as database:  # a token that exists
        with database.engine.begin() as conn:
            conn.execute(sa.text("UPDATE trials SET created_by_token_id = 99"))
    downgrade(url, "0005")
    with open_database(url) as database, database.engine.connect() as conn:
        inspector = inspect(database.engine)
        assert "extras" not in {c["name"] for c in inspector.get_columns("points")}
        assert "owner" not in {c["name"] for c in inspector.get_columns("api_tokens")}
        assert "created_by_token_id" not in {c["name"] for c in inspector.get_columns("trials")}
        assert conn.scalar(sa.text("SELECT count(*) FROM trials")) == len(target_ids + curve_ids)
        n_points = sum(len(curve) for _, curve in B_SIMPLE_CURVES)
        assert conn.scalar(sa.text("SELECT count(*) FROM points")) == n_points
        assert conn.scalar(sa.text("SELECT count(*) FROM api_tokens")) == 1
    upgrade(url)  # and up again over the same rows
    with open_database(url) as database, database.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM points WHERE extras IS NOT NULL")) == 0


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_exclusion_and_deletions_start_clear_and_drop_with_the_data_kept(make_database, backend):
    url = make_database(backend)
    upgrade(url, "0006")
    target_ids, curve_ids = _trials_at_0004(url)
    n_points = sum(len(curve) for _, curve in B_SIMPLE_CURVES)
    upgrade(url, "0007")
    with open_database(url) as database, database.engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT DISTINCT excluded, excluded_reason FROM trials"))
        assert [(bool(e), r) for e, r in rows] == [(False, None)]  # SQLite: 0
        assert conn.scalar(sa.text("SELECT DISTINCT trials_deleted FROM experiments")) == 0
        excluded = "excluded = true, excluded_reason = 'bad'"
        conn.execute(sa.text(f"UPDATE trials SET {excluded} WHERE id = {curve_ids[0]}"))
    downgrade(url, "0006")
    with open_database(url) as database, database.engine.connect() as conn:
        inspector = inspect(database.engine)
        assert not {"excluded", "excluded_reason"} & {
            c["name"] for c in inspector.get_columns("trials")
        }
        assert "trials_deleted" not in {c["name"] for c in inspector.get_columns("experiments")}
        assert conn.scalar(sa.text("SELECT count(*) FROM trials")) == len(target_ids + curve_ids)
        assert conn.scalar(sa.text("SELECT count(*) FROM points")) == n_points
    upgrade(url)  # and up again over the same rows: included, as before
    with open_database(url) as database, database.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM trials WHERE excluded")) == 0


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
    url = make_database("sqlite")  # serve migrating an empty one: tests/server/test_first_hour.py
    assert _cli(url, "db", "current").returncode == 1
    assert _cli(url, "db", "upgrade").returncode == 0  # from an unrelated cwd
    current = _cli(url, "db", "current")
    assert current.returncode == 0 and "current=0007 head=0007" in current.stdout
    created = _cli(url, "token", "create", "--name", "ci", "--scope", "write")
    secret = created.stdout.strip()
    assert created.returncode == 0 and secret.startswith("hl_") and len(secret) > 40
    assert _cli(url, "token", "create", "--name", "ci", "--scope", "read").returncode == 2
    listed = _cli(url, "token", "list").stdout
    assert "ci\twrite\t" in listed and secret not in listed
    assert _cli(url, "token", "revoke", "--name", "ci").returncode == 0
    assert "revoked" in _cli(url, "token", "list").stdout
    assert _cli(url, "token", "revoke", "--name", "nobody").returncode == 1
    assert _cli(url, "db", "downgrade", "base").returncode == 0
    assert _tables(url) == set()


# --- from the first revision to head, with a store written as 0001 wrote it ----------------

TS = sa.DateTime(timezone=True)
#: 0001's tables, frozen here with their types (migrations/versions/0001_*.py)
EXPERIMENTS_0001 = sa.table(
    "experiments",
    sa.column("id", sa.BigInteger),
    sa.column("name", sa.String),
    sa.column("description", sa.Text),
    sa.column("created_at", TS),
)
TRIALS_0001 = sa.table(
    "trials",
    sa.column("id", sa.BigInteger),
    sa.column("experiment_id", sa.BigInteger),
    *(sa.column(c, sa.BigInteger) for c in ("n_params", "n_tokens", "batch_size_tokens")),
    *(sa.column(c, sa.Integer) for c in ("seq_len", "zero_stage", "world_size")),
    *(
        sa.column(c, FaithfulFloat)
        for c in (
            "learning_rate",
            "adam_beta1",
            "adam_beta2",
            "adam_eps",
            "weight_decay",
            "grad_clip",
            "warmup_fraction",
            "final_loss",
            "final_eval_loss",
        )
    ),
    sa.column("model_shape", sa.JSON),
    sa.column("config", sa.JSON),
    *(sa.column(c, sa.String) for c in ("schedule", "status", "source", "idempotency_key")),
    sa.column("status_reason", sa.Text),
    *(sa.column(c, sa.BigInteger) for c in ("seed", "steps_done", "tokens_done")),
    sa.column("diverged", sa.Boolean),
    *(sa.column(c, TS) for c in ("heartbeat_at", "created_at", "updated_at", "completed_at")),
)
POINTS_0001 = sa.table(
    "points",
    sa.column("trial_id", sa.BigInteger),
    sa.column("step", sa.BigInteger),
    sa.column("tokens", sa.BigInteger),
    *(
        sa.column(c, FaithfulFloat)
        for c in (
            "train_loss",
            "eval_loss",
            "ewa_eval_loss",
            "lr",
            "grad_norm",
            "b_simple",
            "tokens_per_s",
            "wall_time_s",
        )
    ),
)
TABLES_0001 = (EXPERIMENTS_0001, TRIALS_0001, POINTS_0001)
T0 = dt.datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
# the team sweep's trials: (status, diverged, tokens_done, final_loss, config) and what
# head derives for each: (stop_reason, target_loss, steps_to_target, reached_target)
SWEEP_0001 = [
    ("completed", False, 2_000, 3.25, {"steps_to_target": 120.5, "target_loss": 3.3}),
    ("completed", True, 700, float("nan"), {"steps_to_target": "Infinity", "target_loss": 3.3}),
    ("failed", None, 300, None, {"dataset": "web-en"}),
    ("running", None, 900, None, None),
]
SWEEP_AT_HEAD = [
    ("budget", 3.3, 120.5, True),
    ("diverged", 3.3, None, False),
    ("failed", None, None, None),
    (None, None, None, None),
]
# the first trial's loss curve: (step, train_loss, eval_loss, b_simple)
CURVE_0001 = [
    (s, 10.0 / (1 + s), float("inf") if s == 5 else 4.0 - s / 100, 1000.0 + 7.0 * s)
    for s in range(0, 200, 5)
] + [(200, float("nan"), None, float("nan"))]


def _store_at_0001(url: str) -> dict[str, list[int]]:
    """A Step Law import and a team sweep with its curves, inserted as 0001's schema has
    them (ids from the database, as the service got them); returns the ids per table."""
    ids: dict[str, list[int]] = {"experiments": [], "trials": []}
    with open_database(url) as database, database.engine.begin() as conn:

        def insert(table: sa.TableClause, **values) -> int:
            return conn.execute(table.insert().values(**values).returning(table.c.id)).scalar_one()

        for name, description in (("steplaw", None), ("team-sweep", "lr sweep, ünïcode")):
            ids["experiments"].append(
                insert(EXPERIMENTS_0001, name=name, description=description, created_at=T0)
            )
        common = dict(n_tokens=2_000, seq_len=128, batch_size_tokens=100, created_at=T0)
        for i, n_params in enumerate((10**6, 10**7)):  # the import: keyed steplaw:<sha>:<row>
            ids["trials"].append(
                insert(
                    TRIALS_0001,
                    experiment_id=ids["experiments"][0],
                    n_params=n_params,
                    learning_rate=2.0 ** -(10 + i),
                    status="completed",
                    source="imported",
                    idempotency_key=f"steplaw:0123456789abcdef:{i}",
                    final_loss=2.5 + i,
                    updated_at=T0,
                    **common,
                )
            )
        for i, (status, diverged, tokens_done, final_loss, config) in enumerate(SWEEP_0001):
            ids["trials"].append(
                insert(
                    TRIALS_0001,
                    experiment_id=ids["experiments"][1],
                    n_params=3 * 10**6,
                    learning_rate=1e-3,
                    model_shape={"n_layer": 4, "d_model": 256},
                    adam_beta1=0.9,
                    adam_beta2=0.95,
                    adam_eps=1e-8,
                    weight_decay=0.1,
                    grad_clip=1.0,
                    schedule="cosine",
                    warmup_fraction=0.01,
                    zero_stage=1,
                    world_size=2,
                    seed=2**40 + 1,
                    status=status,
                    status_reason="CUDA out of memory" if status == "failed" else None,
                    heartbeat_at=T0 + dt.timedelta(minutes=5),
                    source="trained",
                    idempotency_key=f"N3e6-{i}",
                    final_loss=final_loss,
                    final_eval_loss=final_loss,
                    steps_done=tokens_done // 100,
                    tokens_done=tokens_done,
                    diverged=diverged,
                    config=config,
                    updated_at=T0 + dt.timedelta(hours=1),
                    completed_at=T0 + dt.timedelta(hours=1) if status == "completed" else None,
                    **common,
                )
            )
        first = ids["trials"][2]
        for step, train, evaluation, b_simple in CURVE_0001:
            conn.execute(
                POINTS_0001.insert().values(
                    trial_id=first,
                    step=step,
                    tokens=100 * step,
                    train_loss=train,
                    eval_loss=evaluation,
                    lr=1e-3,
                    b_simple=b_simple,
                    wall_time_s=0.5 * step,
                )
            )
        conn.execute(POINTS_0001.insert().values(trial_id=ids["trials"][3], step=0, train_loss=9.0))
    return ids


def _rows_0001(url: str) -> dict[str, str]:
    """Every row of 0001's tables, 0001's columns only, in key order, as text."""
    with open_database(url) as database, database.engine.connect() as conn:
        return {
            table.name: repr(
                conn.execute(
                    sa.select(table).order_by(
                        *(table.c[k] for k in ("id", "trial_id", "step") if k in table.c)
                    )
                ).all()
            )
            for table in TABLES_0001
        }


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_store_from_the_first_revision_reaches_head_with_every_row(
    make_database, live_server_factory, backend
):
    url = make_database(backend)
    first = _revisions()[0]
    upgrade(url, first)
    ids = _store_at_0001(url)
    before = _rows_0001(url)
    assert "nan" in before["points"] and "inf" in before["points"]  # stored as such
    upgrade(url)
    with open_database(url) as database:
        assert schema_is_current(database.engine)
        with database.engine.connect() as conn:
            counts = {
                t: conn.scalar(sa.text(f"SELECT count(*) FROM {t}")) for t in sorted(ALL_TABLES)
            }
            assert counts == {
                "api_tokens": 0,
                "experiments": 2,
                "fits": 0,
                "points": len(CURVE_0001) + 1,
                "trials": 2 + len(SWEEP_0001),
            }
            families = conn.execute(sa.text("SELECT id, family FROM experiments ORDER BY id"))
            steplaw, sweep = ids["experiments"]
            assert families.all() == [(steplaw, "step-law"), (sweep, f"experiment-{sweep}")]
            derived = conn.execute(
                sa.text(
                    "SELECT stop_reason, target_loss, steps_to_target, reached_target,"
                    " parametrization FROM trials ORDER BY id"
                )
            ).all()
        reached = [None if row[3] is None else bool(row[3]) for row in derived]  # SQLite: 0/1
        assert [(*row[:3], r, row[4]) for row, r in zip(derived, reached, strict=True)] == [
            ("budget", None, None, None, "standard"),
            ("budget", None, None, None, "standard"),
            *((*want, "standard") for want in SWEEP_AT_HEAD),
        ]
    assert _rows_0001(url) == before  # every column 0001 wrote, as it wrote it

    # the service serves the old rows, with the summary 0005 computed from their points
    curve = [(s, b) for s, *_, b in CURVE_0001]
    server = live_server_factory(database_url=url)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        trial = client.get(f"/v1/trials/{ids['trials'][2]}").json()
        assert trial["stop_reason"] == "budget" and trial["model_shape"]["n_layer"] == 4
        want = _late_quartiles(curve)
        assert [trial["b_simple_q25"], trial["b_simple"], trial["b_simple_q75"]] == want
        assert client.get(f"/v1/trials/{ids['trials'][3]}").json()["b_simple"] is None
        body = client.get(f"/v1/trials/{ids['trials'][2]}/points", params={"limit": 1000}).json()
        got = [(p["step"], p["train_loss"], p["eval_loss"], p["b_simple"]) for p in body["data"]]
        assert dumps(got) == dumps(CURVE_0001)
        assert {p["extras"] for p in body["data"]} == {None}  # 0006: no extras before it
        assert trial["created_by"] is None  # nor a record of the token that created it
        listed = client.get("/v1/trials", params={"experiment_id": ids["experiments"][1]})
        assert listed.json()["count"] == len(SWEEP_0001)
    # and new rows follow the old ones (their ids continue after them)
    add_completed_trial(url, experiment="team-sweep")
    with open_database(url) as database, database.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT max(id) FROM trials")) == ids["trials"][-1] + 1
