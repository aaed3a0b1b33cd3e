"""The service's token stays off the disk in a sweep: it is in no file that Tune or Ray Train
writes for the run (its param_space, trial configs, results, checkpoints) nor in Ray's
session logs, and the trials still report; a trial takes HYPERLAW_URL / HYPERLAW_TOKEN from
its own environment first, the driver's values otherwise, and the driver logs the URL that
trials on a joined cluster will use."""

import logging
from pathlib import Path

import ray

from client import HyperlawClient
from tests.trainer.test_sweep import RAY_INIT
from trainer.ray_cluster import ServiceAccess
from trainer.sweep import run_sweep
from trainer.sweep_config import load_sweep_config


def _files_holding(root: Path, secret: str) -> list[str]:
    return [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes()
    ]


def test_the_token_reaches_no_file_and_the_trials_still_report(
    live_server, sweep_yaml, tmp_path, monkeypatch, caplog
):
    """A cluster that the sweep joins, whose nodes set HYPERLAW_URL (the same service under
    another name) and no token: the trials take that URL and the driver's token."""
    caplog.set_level(logging.INFO, logger="trainer.ray_cluster")
    node_url = live_server.url.replace("127.0.0.1", "localhost")
    path = sweep_yaml(
        experiment="trainer-test-secrets",
        workers_per_trial=1,
        zero_stage=0,
        search={"learning_rate": [0.03], "batch_size_tokens": [64]},
        n_tokens=[64 * 8],
    )
    monkeypatch.setenv("HYPERLAW_URL", node_url)  # the environment the cluster's nodes inherit
    monkeypatch.delenv("HYPERLAW_TOKEN", raising=False)
    ray.init(**RAY_INIT)
    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        summary = run_sweep(load_sweep_config(path), url=live_server.url, token=live_server.token)
    finally:
        ray.shutdown()

    assert (summary.completed, summary.failed) == (1, 0)
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = client.get_trial(summary.trial_ids[0])
        points = client.get_points(trial["id"])["data"]
    assert trial["status"] == "completed" and trial["steps_done"] == 8
    assert [p["step"] for p in points] == list(range(9))
    assert f"trials will report to {node_url} (HYPERLAW_URL on the Ray nodes)" in caplog.text

    written = tmp_path / "runs"
    params = list((written / "ray_tune").rglob("params.json"))  # Tune wrote the trial's config
    assert params and _files_holding(params[0].parent, '"learning_rate": 0.03')  # and is read
    assert _files_holding(written, live_server.token) == []
    assert _files_holding(session, live_server.token) == []  # Ray's logs: no runtime_env


def test_a_trial_prefers_its_own_environment_to_the_drivers_values(monkeypatch):
    driver = ServiceAccess("http://localhost:8000", "driver-token")
    assert "driver-token" not in repr(driver)
    monkeypatch.delenv("HYPERLAW_URL", raising=False)
    monkeypatch.setenv("HYPERLAW_TOKEN", "")  # set but empty: not set
    assert driver.in_trial() == driver
    monkeypatch.setenv("HYPERLAW_URL", "http://api:8000")
    assert (driver.in_trial().url, driver.in_trial().token) == ("http://api:8000", "driver-token")
    monkeypatch.setenv("HYPERLAW_TOKEN", "node-token")
    assert driver.in_trial().token == "node-token"
    # a local cluster started by the sweep has only the driver's environment: the driver's
    local = ServiceAccess("http://localhost:8000", "driver-token", trial_environment_wins=False)
    assert local.in_trial() == local
