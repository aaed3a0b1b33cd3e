"""``hyperlaw sweep`` end to end: Ray Tune trials of 2-worker DeepSpeed ZeRO-2 Ray Train runs
reporting to a live service; resume without duplicates; a worker killed with SIGKILL
mid-trial restarted from its checkpoint, or, with no retries left, its trial marked failed
with the reason (never left running)."""

import math
import time
import urllib.request

import pytest
import ray
import ray.cloudpickle

import tests.trainer.hooks
from client import HyperlawClient
from tests.trainer.hooks import KillOnce
from trainer import cli
from trainer.plan import expand_trials, idempotency_key
from trainer.sweep import run_sweep
from trainer.sweep_config import SweepConfigError, load_sweep_config

RAY_INIT = {"num_cpus": 2, "include_dashboard": False}


@pytest.fixture(scope="module")
def joined_cluster():
    """A Ray cluster that the sweeps of the killed-worker tests join (as with --address) and
    leave running: one for both (a start and a shutdown take seconds), while the first test's
    sweep starts and stops its own. The hooks reach the workers by value: they need not
    import the tests."""
    ray.cloudpickle.register_pickle_by_value(tests.trainer.hooks)
    ray.init(**RAY_INIT)
    try:
        yield
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(tests.trainer.hooks)


def test_sweep_runs_zero2_trials_through_ray_and_fills_the_store(
    live_server, sweep_yaml, monkeypatch
):
    path = sweep_yaml()
    config = load_sweep_config(path)
    summary = run_sweep(config, url=live_server.url, token=live_server.token, ray_init=RAY_INIT)
    assert (summary.completed, summary.failed, summary.diverged) == (2, 0, 1)

    with HyperlawClient(live_server.url, live_server.token) as client:
        trials = client.list_trials(experiment_id=summary.experiment_id)["data"]
        assert len(trials) == 2
        by_lr = {t["learning_rate"]: t for t in trials}
        good, bad = by_lr[0.03], by_lr[1000.0]
        points = client.get_points(good["id"])["data"]

        assert client.get_experiment(summary.experiment_id)["family"] == "synthetic-regression"
        assert good["parametrization"] == "standard" and good["schedule"] == "constant_ewa"
        assert good["status"] == "completed" and good["diverged"] is False
        assert (good["world_size"], good["zero_stage"], good["n_params"]) == (2, 2, 64)
        assert good["steps_done"] == 32 and good["tokens_done"] == 2048
        assert good["config"]["train"]["learning_rate"] == 0.03
        assert good["config"]["data"]["fingerprint"].startswith("synthetic-")
        assert good["idempotency_key"] == idempotency_key(config, expand_trials(config)[0])
        # one point per step, tokens = step x B, and the loss went down
        assert [p["step"] for p in points] == list(range(33))
        assert all(p["tokens"] == 64 * p["step"] for p in points)
        assert points[-1]["eval_loss"] < 0.6 * points[0]["eval_loss"]
        assert good["final_eval_loss"] == pytest.approx(points[-1]["ewa_eval_loss"])
        assert all(p["grad_norm"] is not None and p["grad_norm"] > 0 for p in points[1:])

        assert bad["status"] == "completed" and bad["diverged"] is True
        assert bad["final_loss"] == math.inf and bad["steps_done"] < 32

        # --resume: nothing left to run, nothing duplicated
        again = run_sweep(
            config, url=live_server.url, token=live_server.token, resume=True, ray_init=RAY_INIT
        )
        assert (again.skipped, again.completed, again.failed) == (2, 0, 0)
        assert again.best["id"] == good["id"]  # best over the sweep, skipped trials included
        assert client.list_trials(experiment_id=summary.experiment_id)["count"] == 2

        # the same through the command line, token from the environment
        monkeypatch.setenv("HYPERLAW_TOKEN", live_server.token)
        assert cli.main(["sweep", str(path), "--resume", "--url", live_server.url]) == 0
        assert client.list_trials(experiment_id=summary.experiment_id)["count"] == 2

        # without --resume the sweep refuses to run over existing trials
        with pytest.raises(SweepConfigError, match="use --resume"):
            run_sweep(config, url=live_server.url, token=live_server.token, ray_init=RAY_INIT)


def _ray_metrics_lines(name: str, timeout_s: float = 30.0) -> list[str]:
    """Lines of this node's Prometheus export that carry ``name`` (waits for the export)."""
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        lines = [
            line for line in text.decode().splitlines() if name in line and not line.startswith("#")
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(1.0)


def test_a_killed_worker_is_restarted_from_its_checkpoint(
    live_server, sweep_yaml, tmp_path, joined_cluster
):
    """FailureConfig(max_failures=1): rank 1 of the 2-worker ZeRO-0 run is killed with SIGKILL
    after step 25, Ray Train restarts the worker group, and it continues from the step-20
    checkpoint instead of step 0. ZeRO-0 over 2 workers also measures b_simple (one worker's
    gradient vs the all-reduced one)."""
    path = sweep_yaml(
        experiment="trainer-test-restart",
        workers_per_trial=2,
        zero_stage=0,
        max_failures=1,
        checkpoint_every=10,
        search={"learning_rate": [0.03], "batch_size_tokens": [64]},
        n_tokens=[64 * 40],
    )
    fail_once = KillOnce(step=25, marker=str(tmp_path / "failed-once"))
    summary = run_sweep(
        load_sweep_config(path), url=live_server.url, token=live_server.token, on_step=fail_once
    )
    assert ray.is_initialized()  # the sweep left the cluster it joined running
    exported = _ray_metrics_lines("hyperlaw_train_loss")
    assert (tmp_path / "failed-once").exists()  # the failure happened
    assert (summary.completed, summary.failed) == (1, 0)
    # the trial's loss reached Ray's metrics export (what the dashboard's Metrics tab reads)
    assert any(f'trial_id="{summary.trial_ids[0]}"' in line for line in exported)
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = client.get_trial(summary.trial_ids[0])
        points = client.get_points(trial["id"])["data"]
    assert trial["status"] == "completed" and trial["steps_done"] == 40
    assert [p["step"] for p in points] == list(range(41))
    # wall time restarts with the resumed process: step 21 was (re)done after step 20 was
    # restored from the checkpoint, so its wall clock is behind step 20's
    wall = {p["step"]: p["wall_time_s"] for p in points}
    assert wall[21] < wall[20]
    assert all(
        p["b_simple"] is not None and math.isfinite(p["b_simple"]) for p in points if p["step"] >= 5
    )
    assert points[-1]["eval_loss"] < 0.6 * points[0]["eval_loss"]
    assert not (tmp_path / "runs" / "checkpoints" / f"trial-{trial['id']}").exists()


def test_a_killed_worker_without_retries_fails_its_trial_with_the_reason(
    live_server, sweep_yaml, tmp_path, joined_cluster
):
    """max_failures=0: the run whose worker was killed is marked failed, with the reason and
    stop reason ``failed``, and the sweep counts it; it is never left running."""
    path = sweep_yaml(
        experiment="trainer-test-killed",
        max_failures=0,
        search={"learning_rate": [0.03], "batch_size_tokens": [64]},
        n_tokens=[64 * 12],
    )
    kill = KillOnce(step=5, marker=str(tmp_path / "killed"))
    summary = run_sweep(
        load_sweep_config(path), url=live_server.url, token=live_server.token, on_step=kill
    )
    assert (tmp_path / "killed").exists()
    assert (summary.completed, summary.failed) == (0, 1)
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = client.get_trial(summary.trial_ids[0])
    assert trial["status"] == "failed" and trial["stop_reason"] == "failed"
    # Ray Train's error, with the surviving worker's traceback (its peer closed the connection)
    assert trial["status_reason"].startswith("WorkerGroupError: Training failed"), trial
