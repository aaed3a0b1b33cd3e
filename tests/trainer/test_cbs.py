"""Zhang et al.'s critical-batch-size protocol (the sweep file's ``cbs:`` section): its rules,
its runs and their identities, and a run to a target loss trained in-process."""

import math

import pytest

from fitting.cbs import steps_to_target
from trainer.cbs_protocol import Target, progress_line, split_phases, with_targets
from trainer.config import TrainConfig, TrainConfigError
from trainer.plan import _trial_fields, expand_trials, idempotency_key
from trainer.sweep_config import SweepConfigError, parse_sweep_config
from trainer.train import train

CBS = {
    "reference_batch_size_tokens": 16,
    "reference_learning_rates": [0.03, 0.1],
    "batch_size_tokens": [32, 64],
    "learning_rates": [0.1, 0.3],
}


def _doc(**over):
    doc = {
        "experiment": "cbs",
        "task": "synthetic",
        "synthetic": {"dim": 64},
        "n_tokens": [2048, 4096],
        "optimizer": {"name": "sgd", "beta1": 0.0, "grad_clip": 0.0},
        "cbs": CBS,
    }
    doc.update(over)
    return doc


@pytest.mark.parametrize(
    "over,message",
    [
        (
            {"schedule": {"name": "wsd"}},
            r"schedule.name must be 'constant_ewa' with cbs: \(got 'wsd'\)",
        ),
        (
            {"search": {"learning_rate": [0.1], "batch_size_tokens": [64]}},
            "search must not be given with cbs:",
        ),
        ({"target_loss": 0.2}, "target_loss must not be set with cbs:"),
        (
            {"cbs": {**CBS, "batch_size_tokens": [16, 64]}},
            r"cbs.batch_size_tokens values must be > cbs.reference_batch_size_tokens "
            r"\(got 16 <= 16\)",
        ),
        ({"cbs": {**CBS, "max_budget_factor": 0.5}}, r"cbs.max_budget_factor must be >= 1"),
        ({"cbs": {**CBS, "reference_learning_rates": []}}, "must be a non-empty list"),
        (
            {"cbs": {**CBS, "learning_rates": {32: [0.1]}}},
            r"one entry per cbs.batch_size_tokens value \(missing \[64\], unknown \[\]\)",
        ),
        ({"cbs": {**CBS, "tau": 0.9}}, "unknown cbs fields: tau"),
        ({"workers_per_trial": 32}, "divisible by world_size: 16 sequences"),
    ],
)
def test_bad_cbs_sections_name_the_field_and_the_rule(over, message):
    with pytest.raises(SweepConfigError, match=message):
        parse_sweep_config(_doc(**over))


def test_the_runs_carry_their_role_and_not_the_target():
    config = parse_sweep_config(
        _doc(cbs={**CBS, "learning_rates": {32: [0.1, 0.3], 64: [0.3]}}, runs_per_trial=4)
    )
    specs = expand_trials(config)
    references, to_target = split_phases(specs)
    # per (N, D): 2 reference η at B=16, then 2 η at B=32 and 1 at B=64
    assert len(references) == 2 * 2 and len(to_target) == 2 * 3 and len(specs) == 10
    assert {(s["batch_size_tokens"], s["n_tokens"]) for s in references} == {
        (16, 2048),
        (16, 4096),
    }
    assert sorted((s["batch_size_tokens"], s["learning_rate"]) for s in to_target) == sorted(
        [(32, 0.1), (32, 0.3), (64, 0.3)] * 2
    )
    assert all("max_budget_factor" not in s for s in references)
    assert all(s["max_budget_factor"] == 4.0 for s in to_target)
    assert all(s["target_loss"] is None for s in specs)

    keys = [idempotency_key(config, s) for s in specs]
    assert len(set(keys)) == len(specs)
    # the trial record: budget D, the role in its config, no target yet; the trainer's cap
    fields = _trial_fields(config, to_target[0], 1, keys[4], "test")
    assert fields["n_tokens"] == to_target[0]["n_tokens"] == 2048
    assert fields["config"]["train"]["cbs_role"] == "to_target"
    assert fields["config"]["train"]["target_loss"] is None
    train_config = TrainConfig.from_dict(to_target[0])
    assert (train_config.steps, train_config.max_steps) == (2048 // 32, 4 * 2048 // 32)

    # the target is filled in at dispatch; the identity is that of the registered run
    targets = {(64, 2048): Target(0.25, 7, 0.1, 16), (64, 4096): Target(0.2, 8, 0.1, 16)}
    dispatched = with_targets(None, to_target, targets)
    assert [s["target_loss"] for s in dispatched] == [
        {2048: 0.25, 4096: 0.2}[s["n_tokens"]] for s in to_target
    ]
    assert [idempotency_key(config, s) for s in expand_trials(config)] == keys


def test_the_ordinary_grid_keeps_its_identity():
    """Runs of a sweep without cbs: carry no cbs fields: their keys did not change."""
    config = parse_sweep_config(
        _doc(cbs=None, search={"learning_rate": [0.1], "batch_size_tokens": [16]})
    )
    specs = expand_trials(config)
    assert all("cbs_role" not in s and "max_budget_factor" not in s for s in specs)
    # the key this run had before cbs: existed
    assert idempotency_key(config, specs[0]) == "N64-D2048-lr0.1-B16-s0-23e934c8be89"


def test_a_cap_beyond_the_budget_needs_a_target_and_constant_ewa():
    base = {"task": "synthetic", "learning_rate": 0.1, "batch_size_tokens": 16, "n_tokens": 64}
    with pytest.raises(TrainConfigError, match="max_budget_factor 4 > 1 needs a target"):
        TrainConfig.from_dict({**base, "max_budget_factor": 4})
    with pytest.raises(TrainConfigError, match="needs schedule.name 'constant_ewa'"):
        TrainConfig.from_dict(
            {**base, "max_budget_factor": 4, "target_loss": 0.1, "schedule": {"name": "wsd"}}
        )
    with pytest.raises(TrainConfigError, match="target_loss is required for cbs_role"):
        train({**base, "cbs_role": "to_target", "max_budget_factor": 4})


class RecordingSink:
    """A telemetry sink that keeps what the run sends (the service's side is tested in
    test_cbs_sweep.py)."""

    def __init__(self):
        self.points, self.final = [], None

    def start(self):
        pass

    def add_point(self, point):
        self.points.append(point)

    def heartbeat(self):
        pass

    def flush(self, timeout_s=60.0):
        return True

    def finish(self, status, **final):
        self.final = {"status": status, **final}

    def close(self, timeout_s=60.0):
        return True


RUN = {
    "task": "synthetic",
    "synthetic": {"dim": 64},
    "optimizer": {"name": "sgd", "beta1": 0.0, "grad_clip": 0.0},
    "schedule": {"ewa_decay": 0.95},
    "learning_rate": 0.1,
    "n_tokens": 16 * 128,
    "eval": {"every": 4},
}


def _evaluated(points):
    return [(p["step"], p["ewa_eval_loss"]) for p in points if p.get("ewa_eval_loss") is not None]


def test_a_run_to_the_reference_target_stops_at_it_and_interpolates_the_steps():
    """The protocol in miniature: the reference (B=16) trains D and sets the target; B=64
    trains past its D-steps until its EWA evaluation loss first reaches the target."""
    reference = train({**RUN, "batch_size_tokens": 16, "cbs_role": "reference"})
    assert reference.stop_reason == "budget" and reference.tokens_done == 16 * 128
    assert reference.steps_to_target is None and "steps_to_target" not in (
        reference.final_metrics()
    )
    target = reference.final_eval_loss

    sink = RecordingSink()
    run = {**RUN, "batch_size_tokens": 64, "cbs_role": "to_target", "max_budget_factor": 4}
    result = train({**run, "learning_rate": 0.3, "target_loss": target}, telemetry=sink)
    evaluated = _evaluated(sink.points)
    assert result.reached_target and result.stop_reason == "target"
    # it needed more tokens than D (B=64 is past the linear-scaling regime here), within 4 D
    assert 16 * 128 < result.tokens_done < 4 * 16 * 128
    # it stopped at the first evaluation at or below the target ...
    assert evaluated[-1] == (result.steps_done, result.final_eval_loss)
    assert evaluated[-1][1] <= target < evaluated[-2][1]
    assert all(loss > target for _, loss in evaluated[:-1])
    # ... and the steps to target are interpolated between it and the one before
    (s0, l0), (s1, l1) = evaluated[-2:]
    assert result.steps_to_target == pytest.approx(s0 + (l0 - target) / (l0 - l1) * (s1 - s0))
    assert s0 < result.steps_to_target <= s1 and s1 - s0 <= 4  # eval.every 4 past D
    steps, losses = zip(*evaluated, strict=True)
    assert result.steps_to_target == steps_to_target(steps, losses, target).steps
    assert sink.final == {
        "status": "completed",
        **result.final_metrics(),
        "steps_to_target": result.steps_to_target,
        "target_loss": target,
        "reached_target": True,
    }


def test_a_run_that_never_reaches_its_target_is_censored_at_the_cap():
    sink = RecordingSink()
    run = {**RUN, "batch_size_tokens": 64, "cbs_role": "to_target", "max_budget_factor": 2.5}
    result = train({**run, "target_loss": 1e-6}, telemetry=sink)
    cap = int(2.5 * 16 * 128) // 64
    assert not result.reached_target and result.stop_reason == "budget"
    assert result.steps_done == cap and result.tokens_done == cap * 64
    assert sink.final["steps_to_target"] is None and sink.final["reached_target"] is False
    assert sink.final["target_loss"] == 1e-6
    # the dense tail of evaluations goes on past the budget's 32 steps up to the cap
    steps = [s for s, _ in _evaluated(sink.points)]
    assert steps[-1] == cap and {40, 50, 60, 70, 80} <= set(steps)


def test_progress_lines_say_where_each_batch_size_stands():
    spec = {
        "task": "synthetic",
        "model": {},
        "synthetic": {"dim": 512},
        "n_tokens": 65536,
        "batch_size_tokens": 128,
        "learning_rate": 0.1,
        "cbs_role": "to_target",
        "max_budget_factor": 4.0,
        "target_loss": 0.0981,
    }
    head = "cbs N=512 D=65536 B=128 lr=0.1"
    assert progress_line(spec, {"step": 812, "eval_loss": 0.10321}) == (
        f"{head}: step 812/2048 (cap 4×D), ewa_eval_loss 0.1032 -> target 0.0981"
    )
    finished = {"finished": True, "step": 800, "reached_target": True, "steps_to_target": 790.44}
    assert progress_line(spec, finished) == f"{head}: reached at step 790.4 (cap 2048)"
    censored = {"finished": True, "step": 2048, "reached_target": False, "best_eval_loss": 0.099}
    assert progress_line(spec, censored) == (f"{head}: censored: never reached 0.0981 (best 0.099)")
    assert progress_line(spec, {"step": 40, "checkpoint_step": 40}) is None
    assert math.isfinite(censored["best_eval_loss"])
