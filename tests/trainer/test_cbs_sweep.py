"""A ``cbs:`` sweep end to end against a live service: reference runs, then runs to their
target (several runs per Ray Tune trial), each storing its steps to target; --resume reads
everything back instead of training again."""

import math

import pytest

from client import HyperlawClient
from fitting.cbs import steps_to_target
from trainer.config import TrainConfig
from trainer.sweep import run_sweep
from trainer.sweep_config import parse_sweep_config

RAY_INIT = {"num_cpus": 2, "include_dashboard": False}
D = 16 * 128


def test_a_cbs_sweep_trains_to_the_best_reference_loss(live_server, tmp_path, caplog):
    """Two reference runs set the target; the runs to it follow cbs.relative_learning_rates
    (m · η_ref* · (B / B_ref)^s, capped, registered once the reference has set η_ref*), four
    per Ray Tune trial; each stores its steps to the target, measured on its stored curve;
    --resume reads everything back and trains nothing. (Absolute η grids differ only in when
    their runs are registered: tests/trainer/test_cbs_relative.py.)"""
    config = parse_sweep_config(
        {
            "experiment": "trainer-test-cbs",
            "family": "synthetic-regression",
            "task": "synthetic",
            "synthetic": {"dim": 64},
            "n_tokens": [D],
            "optimizer": {"name": "sgd", "beta1": 0.0, "grad_clip": 0.0},
            "schedule": {"ewa_decay": 0.95},
            "eval": {"every": 4},
            "cbs": {
                "reference_batch_size_tokens": 16,
                "reference_learning_rates": [0.03, 0.1],
                "batch_size_tokens": [64, 256],
                "relative_learning_rates": [1, 4, 16],
                "learning_rate_scaling": 0.5,
                "max_learning_rate": 1.0,  # x16 at B=256 would be 3.2 or 0.96: capped or not
            },
            "runs_per_trial": 4,  # 2 reference runs in 1 Tune trial, then the rest in 2
            "cpus_per_worker": 1,
            "max_failures": 0,
            "output_dir": str(tmp_path / "runs"),
        }
    )
    caplog.set_level("INFO", logger="trainer.cbs_protocol")
    summary = run_sweep(config, url=live_server.url, token=live_server.token, ray_init=RAY_INIT)
    assert summary.failed == 0 and summary.completed >= 5

    with HyperlawClient(live_server.url, live_server.token) as client:
        trials = client.list_trials(experiment_id=summary.experiment_id)["data"]
        roles = {t["id"]: t["config"]["train"]["cbs_role"] for t in trials}
        references = [t for t in trials if roles[t["id"]] == "reference"]
        runs = [t for t in trials if roles[t["id"]] == "to_target"]
        points = {t["id"]: client.get_points(t["id"])["data"] for t in runs}

    assert len(references) == 2 and len(runs) == summary.completed - 2
    assert all(t["n_tokens"] == D and t["status"] == "completed" for t in trials)
    best = min((t for t in references if not t["diverged"]), key=lambda t: t["final_eval_loss"])
    target, eta_ref = best["final_eval_loss"], best["learning_rate"]
    # the reference that set the target stores it, reached at its budget's steps
    assert all(t["tokens_done"] == D for t in references)
    assert (best["target_loss"], best["reached_target"]) == (target, True)
    assert best["steps_to_target"] == D // 16
    other = [t for t in references if t["id"] != best["id"]]
    assert [t["target_loss"] for t in other] == [None]  # not a point of S(B)
    for b in (64, 256):  # multipliers clipped to the same η run once
        want = sorted({min(m * eta_ref * (b / 16) ** 0.5, 1.0) for m in (1, 4, 16)})
        got = sorted(t["learning_rate"] for t in runs if t["batch_size_tokens"] == b)
        assert got == pytest.approx(want)
    for t in runs:
        rule = t["config"]["train"]["relative_learning_rate"]
        assert rule["reference_learning_rate"] == eta_ref and rule["scaling"] == 0.5
        assert f"-lrx{rule['multiplier']:g}-B{t['batch_size_tokens']}-" in t["idempotency_key"]
        assert t["target_loss"] == target  # filled in at dispatch, not part of the identity
        assert t["config"]["train"]["target_loss"] is None
        cap = TrainConfig.from_dict(t["config"]["train"]).max_steps
        assert cap == 4 * D // t["batch_size_tokens"]
        evaluated = [(p["step"], p["ewa_eval_loss"]) for p in points[t["id"]]]
        evaluated = [(s, loss) for s, loss in evaluated if loss is not None]
        measured = steps_to_target(*zip(*evaluated, strict=True), target)
        assert t["reached_target"] is (not measured.censored)
        if t["reached_target"]:
            assert t["stop_reason"] == "target" and t["steps_done"] == evaluated[-1][0]
            assert t["steps_to_target"] == pytest.approx(measured.steps)
            assert evaluated[-2][0] < t["steps_to_target"] <= evaluated[-1][0]
        elif not t["diverged"]:  # censored at the cap
            assert t["steps_to_target"] is None and t["steps_done"] == cap
            assert t["tokens_done"] == cap * t["batch_size_tokens"]
    assert any(t["reached_target"] for t in runs)
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.cbs_protocol"]
    assert any(line.startswith("cbs N=64 D=2048: target ") for line in lines)
    assert any("reached at step" in line or "censored" in line for line in lines)

    # --resume: the reference runs are read back, the relative runs found by key, nothing
    # is trained again and no trial is created
    again = run_sweep(
        config, url=live_server.url, token=live_server.token, resume=True, ray_init=RAY_INIT
    )
    assert (again.skipped, again.completed, again.failed) == (len(trials), 0, 0)
    assert math.isfinite(again.best["final_eval_loss"])
    with HyperlawClient(live_server.url, live_server.token) as client:
        assert client.list_trials(experiment_id=summary.experiment_id)["count"] == len(trials)
