"""``hyperlaw db backup`` and ``db restore`` on both databases, as a user runs them: a store
filled through crud comes back exactly after its data was changed and deleted; a backup
taken while a writer is busy is consistent; what cannot be restored (garbage, a truncated
archive, the other backend's file, an older schema over a newer one) is refused with the
database unchanged; a missing pg_dump and an unwritable path are named; no password shows."""

from __future__ import annotations

import math
import os
import re
import sqlite3
import threading
import uuid

import pytest
from sqlalchemy import delete, select

from server import crud, points
from server.backup import pg_connection
from server.core.db import current_revision, downgrade, head_revision, open_database, upgrade
from server.models import Base, Experiment, Fit, TokenScope, TrialStatus
from server.point_schemas import PointIn
from server.schemas import ExperimentCreate, TrialCreate, TrialUpdate
from tests.databases import hyperlaw_command, run_hyperlaw

BACKENDS = ["postgresql", "sqlite"]
CURVE = [  # (step, train_loss, eval_loss, b_simple): non-finite values are data
    (0, 10.5, math.nan, None),
    (10, 4.25, math.inf, 1.5e5),
    (20, 3.125, 3.5, -math.inf),
    (30, 2.9990234375, 3.0000000000000004, 2.0e5),
]


def _fill(url: str) -> dict[str, int]:
    """Two experiments, three trials (one completed with a curve), a fit and a token,
    through crud as the API writes them; returns some ids."""
    with open_database(url) as database, database.session() as session:
        exp, _ = crud.create_experiment(
            session=session, experiment_in=ExperimentCreate(name="kept", family="team-a")
        )
        other, _ = crud.create_experiment(
            session=session, experiment_in=ExperimentCreate(name="doomed")
        )
        trials = []
        for experiment_id, lr in ((exp.id, 1e-3), (exp.id, 3e-3), (other.id, 1e-2)):
            trial, _ = crud.create_trial(
                session=session,
                trial_in=TrialCreate(
                    experiment_id=experiment_id,
                    n_params=10**7,
                    n_tokens=2 * 10**9,
                    seq_len=512,
                    learning_rate=lr,
                    batch_size_tokens=32_768,
                    final_loss=math.nan if lr == 1e-2 else None,
                ),
            )
            trials.append(trial.id)
        rows = [  # with extras of their own, non-finite too (points.extras: JSONB, JSON)
            PointIn.model_validate(
                {"step": s, "tokens": s * 32_768, "train_loss": t, "eval_loss": e, "b_simple": b}
                | {"mfu": t / 10, "loss/aux": math.nan if s == 30 else 1e-3}
            )
            for s, t, e, b in CURVE
        ]
        points.upsert_points(session=session, trial_id=trials[0], points=rows)
        points.upsert_points(session=session, trial_id=trials[2], points=rows[:2])
        crud.update_trial(
            session=session,
            trial_id=trials[0],
            trial_in=TrialUpdate(status=TrialStatus.RUNNING),
        )
        crud.update_trial(
            session=session,
            trial_id=trials[0],
            trial_in=TrialUpdate(status=TrialStatus.COMPLETED, final_loss=2.75),
        )
        fit = Fit(
            kind="recommender",
            scope="family:team-a",
            experiment_id=exp.id,
            status="ok",
            n_trials=2,
            data_watermark="w1",
            params={"alpha": 0.25, "edge": [math.inf, math.nan]},
            trial_ids=trials[:2],
        )
        session.add(fit)
        crud.create_token(session=session, name="ci", scope=TokenScope.WRITE)
        session.flush()
        return {"kept": exp.id, "doomed": other.id, "trial": trials[0], "fit": fit.id}


def _snapshot(url: str) -> dict[str, str]:
    """Every row of every table, in key order, as text (NaN compares equal as 'nan'):
    read through the models' column types, so SQLite's stored 'NaN' reads as a float."""
    with open_database(url) as database, database.engine.connect() as conn:
        return {
            table.name: repr(conn.execute(select(table).order_by(*table.primary_key.columns)).all())
            for table in Base.metadata.sorted_tables
        }


def _change_everything(url: str, ids: dict[str, int]) -> None:
    """Delete an experiment (its trials and points go with it), change a point and a fit,
    add an experiment, revoke the token."""
    with open_database(url) as database, database.session() as session:
        session.execute(delete(Experiment).where(Experiment.id == ids["doomed"]))  # cascades
        points.upsert_points(
            session=session, trial_id=ids["trial"], points=[PointIn(step=10, train_loss=99.0)]
        )
        crud.get_fit(session=session, fit_id=ids["fit"]).status = "failed"
        crud.create_experiment(session=session, experiment_in=ExperimentCreate(name="later"))
        crud.revoke_token(session=session, name="ci")


@pytest.fixture(params=BACKENDS)
def filled(request, make_database) -> tuple[str, dict[str, int]]:
    url = make_database(request.param)
    upgrade(url)
    return url, _fill(url)


def test_backup_and_restore_bring_everything_back(filled, tmp_path):
    url, ids = filled
    before = _snapshot(url)
    path = tmp_path / "store.backup"
    done = run_hyperlaw(url, "db", "backup", str(path))
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert f"to {path} (revision {head_revision()}" in line, line
    assert "experiments 2, fits 1, points 6, trials 3" in line and "api_tokens 1" in line

    _change_everything(url, ids)
    assert _snapshot(url) != before
    done = run_hyperlaw(url, "db", "restore", str(path))
    assert done.returncode == 0, done.stderr
    assert "experiments 2, fits 1, points 6, trials 3" in done.stdout
    assert _snapshot(url) == before
    with open_database(url) as database, database.session() as session:
        got, _ = points.get_points(session=session, trial_id=ids["trial"])
        values = [(p["step"], p["train_loss"], p["eval_loss"], p["b_simple"]) for p in got]
        assert repr(values) == repr(CURVE)  # NaN, ±inf and the last bits of each float
        # ids go on after the restored rows (PostgreSQL: the sequences came back too)
        new, created = crud.create_experiment(
            session=session, experiment_in=ExperimentCreate(name="after-restore")
        )
        assert created and new.id > max(ids["kept"], ids["doomed"])

    again = run_hyperlaw(url, "db", "backup", str(path))  # the file is not overwritten
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    assert run_hyperlaw(url, "db", "backup", "--overwrite", str(path)).returncode == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_into_an_empty_database(make_database, backend, tmp_path):
    url = make_database(backend)
    upgrade(url)
    _fill(url)
    path = tmp_path / "store.backup"
    assert run_hyperlaw(url, "db", "backup", str(path)).returncode == 0
    empty = make_database(backend)  # not even migrated
    done = run_hyperlaw(empty, "db", "restore", str(path))
    assert done.returncode == 0, done.stderr
    assert _snapshot(empty) == _snapshot(url)


def test_refused_restores_change_nothing(filled, tmp_path):
    url, _ids = filled
    backend = "postgresql" if url.startswith("postgresql") else "sqlite"
    path = tmp_path / "store.backup"
    assert run_hyperlaw(url, "db", "backup", str(path)).returncode == 0
    before = _snapshot(url)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(64 * 1024))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.backup"  # the archive's table of contents is cut
    truncated.write_bytes(data[: len(data) * 3 // 4])
    cut_short = tmp_path / "cut-short.backup"  # PostgreSQL: the restore begins, then fails
    cut_short.write_bytes(data[:-100])
    other = tmp_path / "other.backup"
    if backend == "postgresql":
        with sqlite3.connect(other) as conn:
            conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
    else:
        other.write_bytes(b"PGDMP" + os.urandom(1024))
    refusals = {
        garbage: "is not a hyperlaw backup",
        truncated: "",  # pg_restore's or SQLite's own words
        cut_short: "server.cli: pg_restore failed" if backend == "postgresql" else "",
        other: "is a backup of a" + ("n SQLite" if backend == "postgresql" else " PostgreSQL"),
        tmp_path / "missing.backup": "cannot read",
    }
    for file, message in refusals.items():
        done = run_hyperlaw(url, "db", "restore", str(file))
        assert done.returncode in (1, 2), (file, done.stdout)
        assert "ERROR" in done.stderr and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert _snapshot(url) == before, file


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_older_backup_needs_the_database_downgraded_then_upgraded(
    make_database, backend, tmp_path
):
    url = make_database(backend)
    upgrade(url, "0004")
    path = tmp_path / "at-0004.backup"
    assert run_hyperlaw(url, "db", "backup", str(path)).returncode == 0
    upgrade(url)
    refused = run_hyperlaw(url, "db", "restore", str(path))
    assert refused.returncode == 2
    head = head_revision()
    assert f"at schema revision {head}, newer than the backup's 0004" in refused.stderr
    with open_database(url) as database:
        assert current_revision(database.engine) == head
    downgrade(url, "0004")
    done = run_hyperlaw(url, "db", "restore", str(path))
    assert done.returncode == 0 and "run `hyperlaw db upgrade`" in done.stderr
    assert run_hyperlaw(url, "db", "upgrade").returncode == 0
    with open_database(url) as database:
        assert current_revision(database.engine) == head


def test_a_backup_while_a_writer_is_busy_is_consistent(filled, tmp_path):
    """Points land in batches of 50, one transaction each: the backup holds whole batches,
    and the counts it reports are the rows it holds."""
    url, ids = filled
    stop = threading.Event()

    def write() -> None:
        step = 1000
        with open_database(url) as database:
            while not stop.is_set():
                batch = [PointIn(step=s, train_loss=1.0) for s in range(step, step + 50)]
                with database.session() as session:
                    points.upsert_points(session=session, trial_id=ids["trial"], points=batch)
                step += 50

    writer = threading.Thread(target=write)
    writer.start()
    try:
        path = tmp_path / "busy.backup"
        done = run_hyperlaw(url, "db", "backup", str(path))
    finally:
        stop.set()
        writer.join()
    assert done.returncode == 0, done.stderr
    n_points = int(re.search(r"points (\d+)", done.stdout).group(1))
    assert n_points > 6 and (n_points - 6) % 50 == 0
    empty = tmp_path / "restored.db"
    target = url if url.startswith("postgresql") else f"sqlite:///{empty}"
    assert run_hyperlaw(target, "db", "restore", str(path)).returncode == 0
    with open_database(target) as database, database.session() as session:
        assert points.get_points(session=session, trial_id=ids["trial"])[1] == n_points - 2


def test_a_missing_pg_dump_names_the_package(pg_url, tmp_path):
    import subprocess

    argv, env = hyperlaw_command(pg_url, "db", "backup", str(tmp_path / "x.backup"))
    env["PATH"] = str(tmp_path)  # python is run by its full path; nothing else is found
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "pg_dump not found on PATH" in done.stderr and "postgresql-client" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_path_is_named(filled, tmp_path):
    url, _ = filled
    nowhere = tmp_path / "no-such-dir" / "x.backup"
    done = run_hyperlaw(url, "db", "backup", str(nowhere))
    assert done.returncode == 2 and f"cannot write {nowhere}" in done.stderr
    done = run_hyperlaw(url, "db", "backup", str(tmp_path))
    assert done.returncode == 2 and "is a directory" in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial file


def test_the_password_goes_to_the_environment_never_to_argv_or_output(pg_url, tmp_path):
    password = f"pw-{uuid.uuid4().hex}"
    with_password = pg_url.replace("postgres@", f"postgres:{password}@", 1)
    assert password in with_password
    for url in (with_password, with_password.replace("postgresql+psycopg2://", "postgresql://")):
        dbname, env = pg_connection(url)
        assert dbname.startswith("postgresql://postgres@127.0.0.1") and password not in dbname
        assert env["PGPASSWORD"] == password
    path = tmp_path / "pw.backup"
    done = run_hyperlaw(with_password, "db", "backup", str(path))  # trust auth: not asked
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr and "***" in done.stdout
    wrong = with_password.rsplit("/", 1)[0] + "/no_such_database"
    failed = run_hyperlaw(wrong, "db", "restore", str(path))
    assert failed.returncode == 1 and "no_such_database" in failed.stderr
    assert password not in failed.stdout + failed.stderr and "Traceback" not in failed.stderr


def test_an_sqlite_backup_is_one_self_contained_file(make_database, tmp_path):
    url = make_database("sqlite")
    upgrade(url)
    _fill(url)
    path = tmp_path / "copy.db"
    assert run_hyperlaw(url, "db", "backup", str(path)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db"]  # no -wal, no partial
    assert path.stat().st_mode & 0o077 == 0  # the owner's only
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM points").fetchone() == (6,)
