"""Single-process DeepSpeed runs reporting to a live service: divergence, a target loss
reached early, resume, and failure -- each stored with why the run stopped."""

import math

import pytest

from client import HyperlawClient
from tests.trainer.hooks import FailOnce, InjectedFailure
from trainer.train import train


def _new_trial(client, name, **over):
    exp = client.ensure_experiment(name)
    fields = {
        "experiment_id": exp["id"],
        "n_params": 64,
        "n_tokens": 1280,
        "seq_len": 1,
        "learning_rate": 0.01,
        "batch_size_tokens": 32,
        "world_size": 1,
        "zero_stage": 0,
    }
    fields.update(over)
    return client.create_trial(**fields)


def _config(live_server, trial_id, **over):
    cfg = {
        "task": "synthetic",
        "learning_rate": 0.01,
        "batch_size_tokens": 32,
        "n_tokens": 1280,
        "synthetic": {"dim": 64},
        "optimizer": {"grad_clip": 0.0},
        "schedule": {"ewa_decay": 0.9},
        "trial_id": trial_id,
        "service_url": live_server.url,
        "service_token": live_server.token,
    }
    cfg.update(over)
    return cfg


def test_diverging_learning_rate_is_recorded_not_raised(live_server):
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = _new_trial(client, "trainer-test-divergence", learning_rate=1000.0)
        result = train(_config(live_server, trial["id"], learning_rate=1000.0))
        assert result.diverged and result.status == "completed"
        assert result.stop_reason == "diverged"
        assert result.steps_done < 40
        stored = client.get_trial(trial["id"])
        points = client.get_points(trial["id"])["data"]
    assert stored["status"] == "completed" and stored["diverged"] is True
    assert stored["stop_reason"] == "diverged"
    assert stored["final_loss"] == math.inf and stored["final_eval_loss"] == math.inf
    assert stored["steps_done"] == result.steps_done
    assert stored["tokens_done"] == result.steps_done * 32
    # the curve up to the blow-up is kept, with the huge loss that ended it
    assert [p["step"] for p in points] == list(range(result.steps_done + 1))
    assert points[-1]["train_loss"] > 100 * points[1]["train_loss"] or not math.isfinite(
        points[-1]["train_loss"]
    )


def test_a_reached_target_loss_stops_the_run_before_its_budget(live_server):
    """The synthetic task's EWA evaluation loss falls from about 1.6 to about 0.25 in 200
    steps at this learning rate, crossing 0.5 between the evaluations at steps 64 and 128:
    the run stops there, stored as stopped at its target with the tokens it trained."""
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = _new_trial(client, "trainer-test-target", n_tokens=32 * 200)
        result = train(_config(live_server, trial["id"], n_tokens=32 * 200, target_loss=0.5))
        stored = client.get_trial(trial["id"])
        points = client.get_points(trial["id"])["data"]
    assert result.status == "completed" and result.reached_target and not result.diverged
    assert result.stop_reason == "target"
    assert result.final_eval_loss <= 0.5 and 0 < result.steps_done < 200
    assert result.tokens_done == result.steps_done * 32 < 32 * 200
    assert stored["status"] == "completed" and stored["stop_reason"] == "target"
    assert stored["steps_done"] == result.steps_done
    assert stored["tokens_done"] == result.tokens_done < stored["n_tokens"] - 32
    evaluated = [p for p in points if p["ewa_eval_loss"] is not None]
    assert evaluated[-1]["step"] == result.steps_done and evaluated[-1]["ewa_eval_loss"] <= 0.5
    assert all(p["ewa_eval_loss"] > 0.5 for p in evaluated[:-1])  # the first one at or below


def test_resume_from_checkpoint_continues_the_step_count(live_server, tmp_path):
    ckpt = tmp_path / "ckpt"
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = _new_trial(client, "trainer-test-resume")
        cfg = _config(
            live_server,
            trial["id"],
            checkpoint_dir=str(ckpt),
            checkpoint_every=10,
            learning_rate=0.05,
        )
        fail_once = FailOnce(step=25, marker=str(tmp_path / "failed-once"))
        with pytest.raises(InjectedFailure):
            # as in a sweep, whose workers may be restarted: the trial is not marked failed
            train(cfg, mark_failed=False, on_step=fail_once)
        assert (ckpt / "latest").read_text().strip() == "step20"
        assert client.get_trial(trial["id"])["status"] == "running"
        resumed = train(cfg, on_step=fail_once)  # the failure is injected once only
        assert resumed.resumed_from_step == 20
        assert resumed.steps_done == 40 and resumed.tokens_done == 40 * 32
        stored = client.get_trial(trial["id"])
        points = client.get_points(trial["id"])["data"]
    assert stored["status"] == "completed" and stored["steps_done"] == 40
    assert resumed.stop_reason == "budget" and stored["stop_reason"] == "budget"
    # every step once (steps 21..25 were re-sent and upserted), tokens = step x B
    assert [p["step"] for p in points] == list(range(41))
    assert all(p["tokens"] == p["step"] * 32 for p in points)
    assert not ckpt.exists()  # a finished run drops its checkpoint
    # the resumed run ends exactly where an uninterrupted one does (same batches, optimizer
    # state and EWA restored from the checkpoint)
    elsewhere = ("trial_id", "service_url", "service_token", "checkpoint_dir", "checkpoint_every")
    plain = train({k: v for k, v in cfg.items() if k not in elsewhere})
    assert resumed.final_eval_loss == pytest.approx(plain.final_eval_loss, rel=1e-6)
    assert plain.final_eval_loss < 0.5 * points[0]["eval_loss"]  # and it learned


def test_gradient_noise_scale_from_micro_batches(live_server):
    """ZeRO-0 on one worker with accumulation 4: |g_small|² from one 8-sample micro batch,
    |g_big|² from the 32-sample batch; b_simple lands in the points."""
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = _new_trial(client, "trainer-test-noise-scale")
        result = train(
            _config(
                live_server,
                trial["id"],
                micro_batch_size_sequences=8,
                n_tokens=32 * 400,
                learning_rate=0.02,
            )
        )
        points = client.get_points(trial["id"])["data"]
    assert result.steps_done == 400
    late = [p["b_simple"] for p in points if p["step"] > 200]
    assert late and all(b is not None and math.isfinite(b) and b > 0 for b in late)
    # as the loss falls the gradient signal |G|² shrinks faster than the noise tr(Σ):
    # b_simple grows during training (McCandlish et al. 2018, fig. 5)
    early = [p["b_simple"] for p in points if 40 <= p["step"] <= 80]
    assert late[-1] > 2 * sum(early) / len(early)


def test_an_error_from_the_step_hook_fails_the_run_like_any_error(live_server, tmp_path):
    with HyperlawClient(live_server.url, live_server.token) as client:
        trial = _new_trial(client, "trainer-test-hook-failure", n_tokens=32 * 10)
        fail_once = FailOnce(step=3, marker=str(tmp_path / "failed-once"))
        with pytest.raises(InjectedFailure):
            train(_config(live_server, trial["id"], n_tokens=32 * 10), on_step=fail_once)
        stored = client.get_trial(trial["id"])
        points = client.get_points(trial["id"])["data"]
    assert stored["status"] == "failed" and stored["stop_reason"] == "failed"
    assert stored["status_reason"] == "InjectedFailure: injected failure after step 3"
    assert stored["steps_done"] == 3 and stored["tokens_done"] == 3 * 32
    assert [p["step"] for p in points] == [0, 1, 2, 3]  # flushed before the trial was closed
