"""The ``cbs:`` protocol's relative η grid: η = min(m · η_ref* · (B / B_ref)^s, cap) at each
other batch size, known once the group's target is; the run's identity holds m, not η."""

import pytest

from trainer.cbs_protocol import Target, split_phases, with_learning_rates
from trainer.config import TrainConfig, TrainConfigError
from trainer.plan import (
    _trial_fields,
    expand_trials,
    idempotency_key,
    register_run,
    register_trials,
)
from trainer.sweep_config import SweepConfigError, parse_sweep_config

CBS = {
    "reference_batch_size_tokens": 16,
    "reference_learning_rates": [0.03, 0.1],
    "batch_size_tokens": [32, 64],
    "relative_learning_rates": [0.5, 1, 2, 4],
    "learning_rate_scaling": 0.5,
    "max_learning_rate": 0.3,
}


def _doc(**cbs):
    return {
        "experiment": "cbs-relative",
        "task": "synthetic",
        "synthetic": {"dim": 64},
        "n_tokens": [2048, 4096],
        "optimizer": {"name": "sgd", "beta1": 0.0, "grad_clip": 0.0},
        "cbs": {**CBS, **cbs},
    }


def _without(field):
    return {k: v for k, v in CBS.items() if k != field}


@pytest.mark.parametrize(
    "doc,message",
    [
        (
            _doc(learning_rates=[0.1]),
            r"cbs needs exactly one of cbs.learning_rates \(η values\) and "
            r"cbs.relative_learning_rates \(multipliers of the reference η\) \(got both\)",
        ),
        ({**_doc(), "cbs": _without("relative_learning_rates")}, r"\(got neither\)"),
        (
            {**_doc(), "cbs": {**_without("relative_learning_rates"), "learning_rates": [0.1]}},
            "cbs.learning_rate_scaling applies to cbs.relative_learning_rates only",
        ),
        (_doc(relative_learning_rates=[1, 2, 1.0]), "relative_learning_rates values must be "),
        (_doc(relative_learning_rates=[1, 0]), r"relative_learning_rates values must be > 0"),
        (_doc(max_learning_rate=0), r"cbs.max_learning_rate must be > 0"),
        (_doc(learning_rate_scaling=float("nan")), "cbs.learning_rate_scaling must be finite"),
        # the batch layouts are checked as with an η grid
        ({**_doc(), "workers_per_trial": 32}, "divisible by world_size: 16 sequences"),
        (_doc(batch_size_tokens=[8]), r"must be > cbs.reference_batch_size_tokens \(got 8"),
    ],
)
def test_bad_relative_grids_name_the_field_and_the_rule(doc, message):
    with pytest.raises(SweepConfigError, match=message):
        parse_sweep_config(doc)


def _relative_runs(**cbs):
    config = parse_sweep_config(_doc(**cbs))
    _, to_target = split_phases(expand_trials(config))
    return config, to_target


def test_the_keys_hold_the_multiplier_not_the_learning_rate():
    config, runs = _relative_runs()
    assert len(runs) == 2 * 2 * 4  # D × B × m
    assert all(s["learning_rate"] is None and s["target_loss"] is None for s in runs)
    rule = {"scaling": 0.5, "reference_batch_size_tokens": 16, "max_learning_rate": 0.3}
    assert sorted(s["relative_learning_rate"]["multiplier"] for s in runs) == sorted(
        [0.5, 1, 2, 4] * 4
    )
    assert all(
        s["relative_learning_rate"]
        == {**rule, "multiplier": s["relative_learning_rate"]["multiplier"]}
        for s in runs
    )
    keys = [idempotency_key(config, s) for s in runs]
    assert len(set(keys)) == len(keys)
    assert keys[0].startswith("N64-D2048-lrx0.5-B32-s0-")
    # η and η_ref* filled in with the target: the same keys
    targets = {(64, 2048): Target(0.2, 1, 0.03, 16), (64, 4096): Target(0.1, 2, 0.1, 16)}
    filled = with_learning_rates(runs, targets)
    assert {idempotency_key(config, s) for s in filled} <= set(keys)
    # another cap, scaling or role is another run
    for change in ({"max_learning_rate": 0.5}, {"learning_rate_scaling": 1.0}):
        other, other_runs = _relative_runs(**change)
        assert idempotency_key(other, other_runs[0]) != keys[0]


def test_the_absolute_cbs_grid_keeps_its_identity():
    """An η grid's runs carry no relative fields: their keys are those they had before."""
    absolute = {k: CBS[k] for k in ("reference_batch_size_tokens", "batch_size_tokens")}
    config = parse_sweep_config(
        {**_doc(), "cbs": {**absolute, "reference_learning_rates": [0.1], "learning_rates": [0.1]}}
    )
    specs = expand_trials(config)
    assert all("relative_learning_rate" not in s for s in specs)
    _, to_target = split_phases(specs)
    assert idempotency_key(config, to_target[0]) == "N64-D2048-lr0.1-B32-s0-12483d1d5ba2"


def test_learning_rates_follow_the_reference_capped_and_deduplicated():
    config, runs = _relative_runs()
    # D=2048: η_ref* = 0.03; D=4096: η_ref* = 0.1; no target at another N
    targets = {(64, 2048): Target(0.2, 1, 0.03, 16), (64, 4096): Target(0.1, 2, 0.1, 16)}
    filled = with_learning_rates(runs, targets)
    got: dict[tuple[int, int], dict[float, float]] = {}  # (D, B) -> {m: η}
    for s in filled:
        rule = s["relative_learning_rate"]
        got.setdefault((s["n_tokens"], s["batch_size_tokens"]), {})[rule["multiplier"]] = s[
            "learning_rate"
        ]
        assert rule["reference_learning_rate"] == targets[(64, s["n_tokens"])].learning_rate
    # B=32: (32/16)^0.5 = √2; B=64: 2; capped at 0.3, multipliers clipped alike run once
    r2 = 2**0.5
    assert got[(2048, 32)] == pytest.approx({m: m * 0.03 * r2 for m in [0.5, 1, 2, 4]})
    assert got[(2048, 64)] == pytest.approx({0.5: 0.03, 1: 0.06, 2: 0.12, 4: 0.24})
    assert got[(4096, 32)] == pytest.approx({0.5: 0.05 * r2, 1: 0.1 * r2, 2: 0.2 * r2, 4: 0.3})
    assert got[(4096, 64)] == pytest.approx({0.5: 0.1, 1: 0.2, 2: 0.3})  # x4: clipped as x2
    # a group without a target gets no learning rate (nor a trial)
    assert {
        s["n_tokens"] for s in with_learning_rates(runs, {(64, 4096): targets[(64, 4096)]})
    } == {4096}

    # the trial record: the actual η; its config says how it was chosen
    spec = next(s for s in filled if s["n_tokens"] == 4096 and s["batch_size_tokens"] == 64)
    fields = _trial_fields(config, spec, 1, idempotency_key(config, spec), "test")
    assert fields["learning_rate"] == pytest.approx(0.1)
    assert fields["config"]["train"]["relative_learning_rate"] == {
        "multiplier": 0.5,
        "scaling": 0.5,
        "reference_batch_size_tokens": 16,
        "max_learning_rate": 0.3,
        "reference_learning_rate": 0.1,
    }


def test_a_learning_rate_must_follow_its_rule():
    base = {"task": "synthetic", "batch_size_tokens": 64, "n_tokens": 2048}
    rule = {
        "multiplier": 2,
        "scaling": 1.0,
        "reference_batch_size_tokens": 16,
        "reference_learning_rate": 0.01,
    }
    run = {**base, "cbs_role": "to_target", "relative_learning_rate": rule}
    assert TrainConfig.from_dict({**run, "learning_rate": 0.08}).learning_rate == 0.08
    with pytest.raises(TrainConfigError, match=r"\(got 0.1, the rule gives 0.08\)"):
        TrainConfig.from_dict({**run, "learning_rate": 0.1})
    with pytest.raises(TrainConfigError, match="relative_learning_rate needs cbs_role"):
        TrainConfig.from_dict({**base, "learning_rate": 0.08, "relative_learning_rate": rule})


class FakeService:
    """The trial-registration half of the service, in memory: ``create_trial`` returns the
    stored trial where its key is taken, as the service does."""

    def __init__(self):
        self.trials = {}

    def ensure_experiment(self, name, description, family):
        return {"id": 1}

    def list_trials(self, experiment_id, limit, offset):
        data = list(self.trials.values())[offset : offset + limit]
        return {"data": data, "count": len(self.trials)}

    def create_trial(self, **fields):
        key = fields["idempotency_key"]
        if key not in self.trials:
            self.trials[key] = {**fields, "id": len(self.trials) + 1, "status": "queued"}
        return self.trials[key]

    def update_trial(self, trial_id, **fields):
        trial = next(t for t in self.trials.values() if t["id"] == trial_id)
        trial.update(fields)


def test_relative_runs_are_registered_once_their_learning_rate_is_known():
    config, runs = _relative_runs()
    service = FakeService()
    registration = register_trials(config, service, resume=False)
    assert len(registration.pending) == 4 and registration.deferred == runs  # references
    targets = {(64, 2048): Target(0.2, 1, 0.03, 16), (64, 4096): Target(0.1, 2, 0.1, 16)}
    for spec in with_learning_rates(registration.deferred, targets):
        register_run(config, service, registration, spec)
    assert len(registration.pending) == 4 + 15 == len(service.trials)
    relative = [t for t in service.trials.values() if "-lrx" in t["idempotency_key"]]
    assert all(t["learning_rate"] == t["config"]["train"]["learning_rate"] for t in relative)

    # the keys of runs not yet registered are checked before any η is known
    with pytest.raises(SweepConfigError, match="already has trial 'N64-D2048-lr0.03-B16"):
        register_trials(config, service, resume=False)

    # --resume: completed runs are found again by key, the clipped duplicate dropped again
    for trial in service.trials.values():
        trial["status"] = "completed"
    again = register_trials(config, service, resume=True)
    assert (len(again.pending), len(again.skipped), len(again.deferred)) == (0, 4, 16)
    for spec in with_learning_rates(again.deferred, targets):
        register_run(config, service, again, spec)
    assert (len(again.pending), len(again.skipped), len(service.trials)) == (0, 19, 19)

    # a run left queued whose group's η_ref* has changed since is marked failed and retried
    queued = next(t for t in relative if t["learning_rate"] == pytest.approx(0.1))
    queued["status"] = "queued"
    moved = {**targets, (64, 4096): Target(0.1, 2, 0.05, 16)}
    again = register_trials(config, service, resume=True)
    for spec in with_learning_rates(again.deferred, moved):
        register_run(config, service, again, spec)
    assert queued["status"] == "failed" and "lr=0.1;" in queued["status_reason"]
    retry = service.trials[queued["idempotency_key"] + "#retry1"]
    assert retry["learning_rate"] == pytest.approx(0.05)
    # and x4 at B=64 (capped at 0.3) no longer shares x2's η (0.2 now): it runs too, while
    # the completed runs keep theirs
    assert sorted(s["learning_rate"] for s in again.pending) == pytest.approx([0.05, 0.3])
    assert retry["id"] in {s["trial_id"] for s in again.pending}
