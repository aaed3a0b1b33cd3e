"""Runs from experiment trackers into a real PostgreSQL trial store: a W&B runs table (and
its history) through ``hyperlaw import wandb-csv``, an MLflow SQLite store written with
``mlflow`` itself through ``hyperlaw import mlflow``. Each: states mapped to statuses and
stop reasons, points stored, a second import storing nothing new, a bad export refused
whole with every bad line or run named."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import func, select

from server.models import Point, Trial
from tests.databases import run_hyperlaw

RUNS_HEADER = (
    "Name,State,Notes,User,Tags,Created,Runtime,Sweep,n_params,n_tokens,seq_len,optimizer.lr,"
    "batch_size_tokens,_step,_runtime,eval/loss,loss"
)
RUNS = [
    "run-a,finished,,me,,2025-01-01T00:00:00.000Z,100,,1e8,2e9,2048,0.001,524288,300,100,3.1,3.2",
    "run-b,finished,,me,,2025-01-01T00:00:00.000Z,50,,1e8,2e9,2048,0.05,524288,20,50,NaN,NaN",
    "run-c,crashed,,me,,2025-01-01T00:00:00.000Z,30,,1e8,2e9,2048,0.002,524288,40,30,,3.9",
    "run-d,killed,,me,,2025-01-01T00:00:00.000Z,30,,2e8,4e9,2048,0.002,1048576,40,30,3.5,3.6",
    "run-e,running,,me,,2025-01-01T00:00:00.000Z,10,,2e8,4e9,2048,0.004,1048576,5,10,,",
]
HISTORY = [
    "Name,_step,_runtime,loss,eval/loss,lr",
    "run-a,0,1.5,10.5,,0.0",
    "run-a,100,30,4.0,4.1,0.001",
    "run-a,300,100,3.2,3.1,0.0001",
    "run-c,0,1,10.4,,0.0",
    "run-c,40,30,3.9,,0.002",
    "run-e,0,1,10.6,,0.0",
    "run-a,200,,,,",  # a step without values: no point
]


def _trials(database) -> dict[str, Trial]:
    with database.session() as session:
        trials = session.scalars(select(Trial)).all()
        session.expunge_all()
    return {t.config["run_name"]: t for t in trials}


def _points(database, trial_id: int) -> list[Point]:
    with database.session() as session:
        rows = session.scalars(select(Point).where(Point.trial_id == trial_id).order_by(Point.step))
        points = rows.all()
        session.expunge_all()
    return points


def test_wandb_runs_table_and_history(fresh_pg, tmp_path, database_for):
    runs, history = tmp_path / "wandb_export.csv", tmp_path / "history.csv"
    runs.write_text("\n".join([RUNS_HEADER, *RUNS]) + "\n")
    history.write_text("\n".join(HISTORY) + "\n")
    args = ["import", "wandb-csv", str(runs), "--history", str(history)]
    args += ["--experiment", "wb", "--family", "team-w"]
    unmapped = run_hyperlaw(fresh_pg, *args)
    assert unmapped.returncode == 2
    assert "line 1: no column for learning_rate" in unmapped.stderr
    assert "--map learning_rate=NAME" in unmapped.stderr
    args += ["--map", "learning_rate=optimizer.lr"]
    done = run_hyperlaw(fresh_pg, *args)
    assert done.returncode == 0, done.stderr
    assert "family team-w): 4 trials imported, 0 already there, 5 points stored" in done.stdout
    assert "1 runs not over left out" in done.stdout and "run-e" in done.stderr
    database = database_for(fresh_pg)
    trials = _trials(database)
    assert sorted(trials) == ["run-a", "run-b", "run-c", "run-d"]
    a, b, c, d = (trials[name] for name in ("run-a", "run-b", "run-c", "run-d"))
    assert (a.status, a.stop_reason, a.source) == ("completed", "budget", "imported")
    assert (a.n_params, a.n_tokens, a.seq_len, a.batch_size_tokens) == (
        10**8,
        2 * 10**9,
        2048,
        524288,
    )
    assert a.learning_rate == 0.001 and a.final_loss == 3.1  # eval/loss before loss
    assert a.tokens_done == a.n_tokens and a.idempotency_key == "wandb:run-a"
    assert (b.status, b.stop_reason, b.diverged) == ("completed", "diverged", True)
    assert math.isnan(b.final_loss)
    assert (c.status, c.stop_reason, c.final_loss) == ("failed", "failed", None)  # no eval loss
    assert c.status_reason == "wandb state crashed"
    assert (d.status, d.stop_reason) == ("pruned", None)
    curve = _points(database, a.id)
    assert [(p.step, p.train_loss, p.eval_loss, p.lr) for p in curve] == [
        (0, 10.5, None, 0.0),
        (100, 4.0, 4.1, 0.001),
        (300, 3.2, 3.1, 0.0001),
    ]
    assert curve[0].wall_time_s == 1.5
    assert [p.step for p in _points(database, c.id)] == [0, 40]  # a failed run's curve too

    again = run_hyperlaw(fresh_pg, *args)
    assert again.returncode == 0, again.stderr
    assert "0 trials imported, 4 already there" in again.stdout
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Trial)) == 4
        assert session.scalar(select(func.count()).select_from(Point)) == 5


def test_a_bad_wandb_export_is_refused_whole(fresh_pg, tmp_path, database_for):
    bad_runs = [
        RUNS[0],
        RUNS[1].replace(",0.05,", ",-1,"),  # line 3: learning rate
        RUNS[2].replace("crashed", "exploded"),  # line 4: a state not known
        RUNS[0],  # line 5: the same run again
        RUNS[3].replace(",2048,", ",20.5,"),  # line 6: seq_len
        RUNS[0].replace(",3.1,3.2", ",,").replace("run-a", "run-f"),  # line 7: no final loss
    ]
    runs = tmp_path / "runs.csv"
    runs.write_text("\n".join([RUNS_HEADER, *bad_runs]) + "\n")
    args = ["import", "wandb-csv", str(runs), "--experiment", "wb"]
    refused = run_hyperlaw(fresh_pg, *args, "--map", "learning_rate=optimizer.lr")
    assert refused.returncode == 2
    err = refused.stderr
    assert "line 3: column optimizer.lr: learning_rate must be > 0, got -1" in err
    assert "line 4: state 'exploded' is not one of" in err
    assert "line 5: Name 'run-a' is also on line 2" in err
    assert "line 6: seq_len must be an integer, got 20.5" in err
    assert "line 7: column eval/loss: final_loss is empty" in err
    history = tmp_path / "history.csv"
    history.write_text("Name,_step,loss\nrun-a,0,10.0\nrun-z,0,9.0\nrun-a,-3,8.0\n")
    runs.write_text("\n".join([RUNS_HEADER, RUNS[0]]) + "\n")
    args += ["--history", str(history), "--map", "learning_rate=optimizer.lr"]
    refused = run_hyperlaw(fresh_pg, *args)
    assert refused.returncode == 2
    assert "line 3: Name 'run-z' is not in the runs table" in refused.stderr
    assert "line 4: _step: step must be an integer >= 0, got -3" in refused.stderr
    with database_for(fresh_pg).session() as session:
        assert session.scalar(select(func.count()).select_from(Trial)) == 0


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """A real MLflow SQLite store: two finished runs with loss histories (one diverged), a
    failed one, one still running, and a run of another experiment."""
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("sweep")
    sizes = {"n_params": 10**8, "n_tokens": 2 * 10**9, "seq_len": 2048}
    for name, lr, losses, status in (
        ("lr-1e-3", 1e-3, [10.0, 4.0, 3.1], "FINISHED"),
        ("lr-5e-2", 5e-2, [10.0, float("nan")], "FINISHED"),
        ("lr-2e-3", 2e-3, [10.0, 5.0], "FAILED"),
    ):
        with mlflow.start_run(run_name=name):
            mlflow.log_params({**sizes, "optimizer.lr": lr, "batch_size_tokens": 524288})
            for i, loss in enumerate(losses):
                mlflow.log_metrics({"loss": loss, "lr": lr}, step=100 * i)
            mlflow.end_run(status=status)
    client = MlflowClient(uri)
    running = client.create_run(mlflow.get_experiment_by_name("sweep").experiment_id)
    client.log_param(running.info.run_id, "n_params", 10**8)
    mlflow.set_experiment("other")
    with mlflow.start_run(run_name="elsewhere"):
        mlflow.log_param("n_params", 1)
    return uri


def test_mlflow_runs_params_metrics_and_history(fresh_pg, mlflow_store, database_for):
    args = ["import", "mlflow", mlflow_store, "--experiment-name", "sweep"]
    args += ["--experiment", "ml", "--family", "team-m", "--map", "learning_rate=optimizer.lr"]
    done = run_hyperlaw(fresh_pg, *args)
    assert done.returncode == 0, done.stderr
    assert "family team-m): 3 trials imported, 0 already there, 7 points stored" in done.stdout
    assert "1 runs not over left out" in done.stdout
    database = database_for(fresh_pg)
    trials = _trials(database)
    assert sorted(trials) == ["lr-1e-3", "lr-2e-3", "lr-5e-2"]
    good, diverged, failed = trials["lr-1e-3"], trials["lr-5e-2"], trials["lr-2e-3"]
    assert (good.status, good.stop_reason, good.final_loss) == ("completed", "budget", 3.1)
    assert (good.n_params, good.learning_rate, good.batch_size_tokens) == (10**8, 1e-3, 524288)
    assert good.idempotency_key == f"mlflow:{good.config['run_id']}"
    assert (diverged.stop_reason, diverged.diverged) == ("diverged", True)
    assert (failed.status, failed.stop_reason) == ("failed", "failed")
    curve = _points(database, good.id)
    assert [(p.step, p.train_loss, p.lr) for p in curve] == [
        (0, 10.0, 1e-3),
        (100, 4.0, 1e-3),
        (200, 3.1, 1e-3),
    ]
    assert [p.step for p in _points(database, failed.id)] == [0, 100]
    again = run_hyperlaw(fresh_pg, *args)
    assert again.returncode == 0 and "0 trials imported, 3 already there" in again.stdout


def test_mlflow_runs_missing_fields_are_refused_whole(fresh_pg, mlflow_store, database_for):
    args = ["import", "mlflow", mlflow_store, "--experiment-name", "sweep"]
    refused = run_hyperlaw(fresh_pg, *args)  # learning_rate is optimizer.lr here
    assert refused.returncode == 2
    assert "3 problem(s), nothing imported" in refused.stderr
    assert "lr-1e-3 (" in refused.stderr and "no learning_rate: none of" in refused.stderr
    unknown = run_hyperlaw(fresh_pg, "import", "mlflow", mlflow_store, "--experiment-name", "x")
    assert unknown.returncode == 2 and "no MLflow experiment 'x'" in unknown.stderr
    with database_for(fresh_pg).session() as session:
        assert session.scalar(select(func.count()).select_from(Trial)) == 0
