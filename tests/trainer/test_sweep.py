"""``hyperlaw sweep`` end to end: Ray Tune trials of 2-worker DeepSpeed ZeRO-2 Ray Train runs
reporting to a live service; resume without duplicates; YAML rules."""
import math
import time
import urllib.request

import pytest
import ray
import yaml

from client import HyperlawClient
from trainer import cli
from trainer.sweep import (
    SweepConfigError, expand_trials, idempotency_key, load_sweep_config, parse_sweep_config,
    run_sweep,
)

RAY_INIT = {"num_cpus": 2, "include_dashboard": False}


def _sweep_yaml(tmp_path, **over):
    doc = {
        "experiment": "trainer-test-sweep", "task": "synthetic", "synthetic": {"dim": 64},
        "n_tokens": [2048],
        "search": {"kind": "grid", "learning_rate": [0.03, 1000.0], "batch_size_tokens": [64]},
        "optimizer": {"grad_clip": 0.0}, "schedule": {"ewa_decay": 0.9},
        "workers_per_trial": 2, "zero_stage": 2, "cpus_per_worker": 1,
        "max_failures": 0, "output_dir": str(tmp_path / "runs"),
    }
    doc.update(over)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_sweep_runs_zero2_trials_through_ray_and_fills_the_store(live_server, tmp_path,
                                                                 monkeypatch):
    path = _sweep_yaml(tmp_path)
    config = load_sweep_config(path)
    summary = run_sweep(config, url=live_server.url, token=live_server.token, ray_init=RAY_INIT)
    assert (summary.completed, summary.failed, summary.diverged) == (2, 0, 1)

    with HyperlawClient(live_server.url, live_server.token) as client:
        trials = client.list_trials(experiment_id=summary.experiment_id)["data"]
        assert len(trials) == 2
        by_lr = {t["learning_rate"]: t for t in trials}
        good, bad = by_lr[0.03], by_lr[1000.0]
        points = client.get_points(good["id"])["data"]

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
        again = run_sweep(config, url=live_server.url, token=live_server.token, resume=True,
                          ray_init=RAY_INIT)
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


@pytest.mark.parametrize("over,message", [
    ({"experiment": ""}, "experiment must be a non-empty name"),
    ({"search": {"kind": "random"}}, "search.kind must be 'grid' or 'adaptive'"),
    ({"search": {"learning_rate": [0.1]}}, "search.batch_size_tokens is required"),
    ({"search": {"learning_rate": [-0.1], "batch_size_tokens": [64]}},
     "search.learning_rate values must be > 0"),
    ({"workers_per_trial": 3}, "divisible by world_size: 64 sequences"),
    ({"seq_len": 4}, "seq_len must be 1 for the synthetic task"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials must be 'auto' or > 0"),
    ({"lr": 0.1}, "unknown fields: lr"),
])
def test_bad_sweep_files_name_the_field(tmp_path, over, message):
    with pytest.raises(SweepConfigError, match=message):
        load_sweep_config(_sweep_yaml(tmp_path, **over))


@pytest.mark.parametrize("example", ["examples/cpu_small.yaml", "examples/cpu_small_gpt.yaml"])
def test_shipped_cpu_examples_are_valid(example):
    config = load_sweep_config(example)
    specs = expand_trials(config)
    assert len({s["batch_size_tokens"] for s in specs}) >= 3
    assert len({s["learning_rate"] for s in specs}) >= 3
    assert len({idempotency_key(config, s) for s in specs}) == len(specs)


def test_shipped_gpu_example_is_valid():
    config = load_sweep_config("examples/gpu_small_gpt.yaml")
    specs = expand_trials(config)
    assert config.use_gpu == "auto" and config.workers_per_trial == 1
    assert {s["zero_stage"] for s in specs} == {2}
    assert len({s["batch_size_tokens"] for s in specs}) == 3
    assert len({idempotency_key(config, s) for s in specs}) == len(specs)


def test_gpt_sweep_counts_n_from_the_shape(tmp_path):
    corpus = tmp_path / "corpus"
    config = parse_sweep_config({
        "experiment": "gpt", "task": "gpt", "seq_len": 32, "corpus_dir": str(corpus),
        "models": [{"n_layer": 2, "n_head": 2, "d_model": 32}], "n_tokens": [65536],
        "search": {"learning_rate": [1e-3], "batch_size_tokens": [1024]},
    })
    spec = expand_trials(config)[0]
    assert idempotency_key(config, spec).startswith(f"N{2 * (12 * 32 * 32 + 64) + 32}-")


class _FixedRecommendation:
    """Stands in for the service's recommendation (the placement arithmetic is under test)."""

    def __init__(self):
        self.asked = []

    def recommend(self, **params):
        self.asked.append(params)
        return {"learning_rate": 0.01, "batch_size_tokens": 128}


def test_adaptive_search_concentrates_around_the_predicted_optimum():
    config = parse_sweep_config({
        "experiment": "adaptive", "task": "synthetic", "synthetic": {"dim": 64},
        "n_tokens": [4096, 8192], "workers_per_trial": 2,
        "search": {"kind": "adaptive", "points_per_axis": 3, "lr_spread_decades": 0.5,
                   "batch_spread_octaves": 1.0},
    })
    service = _FixedRecommendation()
    specs = expand_trials(config, service)
    assert service.asked == [{"n_params": 64, "n_tokens": 4096, "seq_len": 1},
                             {"n_params": 64, "n_tokens": 8192, "seq_len": 1}]
    assert len(specs) == 2 * 3 * 3
    lrs = sorted({s["learning_rate"] for s in specs})
    assert lrs == pytest.approx([0.01 / 10**0.5, 0.01, 0.01 * 10**0.5])
    assert sorted({s["batch_size_tokens"] for s in specs}) == [64, 128, 256]
    with pytest.raises(SweepConfigError, match="needs the service"):
        expand_trials(config)


def _ray_metrics_lines(name: str, timeout_s: float = 30.0) -> list[str]:
    """Lines of this node's Prometheus export that carry ``name`` (waits for the export)."""
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        lines = [line for line in text.decode().splitlines()
                 if name in line and not line.startswith("#")]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(1.0)


def test_a_failed_worker_is_restarted_from_its_checkpoint(live_server, tmp_path):
    """FailureConfig(max_failures=1): the 2-worker ZeRO-0 run dies after step 25, Ray Train
    restarts it, and it continues from the step-20 checkpoint instead of step 0. ZeRO-0 over
    2 workers also measures b_simple (one worker's gradient vs the all-reduced one)."""
    path = _sweep_yaml(tmp_path, experiment="trainer-test-restart", workers_per_trial=2,
                       zero_stage=0, max_failures=1, checkpoint_every=10,
                       search={"learning_rate": [0.03], "batch_size_tokens": [64]},
                       n_tokens=[64 * 40])
    ray.init(**RAY_INIT)  # a cluster the sweep joins (as with --address) and leaves running
    try:
        summary = run_sweep(load_sweep_config(path), url=live_server.url,
                            token=live_server.token, train_overrides={"fail_at_step": 25})
        exported = _ray_metrics_lines("hyperlaw_train_loss")
    finally:
        ray.shutdown()
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
    assert all(p["b_simple"] is not None and math.isfinite(p["b_simple"])
               for p in points if p["step"] >= 5)
    assert points[-1]["eval_loss"] < 0.6 * points[0]["eval_loss"]
    assert not (tmp_path / "runs" / "checkpoints" / f"trial-{trial['id']}").exists()


def test_cli_rejects_a_bad_sweep_file(tmp_path):
    assert cli.main(["sweep", str(_sweep_yaml(tmp_path, zero_stage=7))]) == 2
