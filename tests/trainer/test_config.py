"""Batch arithmetic, configuration rules, schedules and the evaluation grid."""
import math

import pytest

from trainer.train import (
    BatchSizeError, EvalConfig, ScheduleConfig, TrainConfig, TrainConfigError, batch_layout,
    evaluation_steps, lr_multiplier,
)


def test_batch_layout_splits_exactly():
    layout = batch_layout(batch_size_tokens=4096, seq_len=64, world_size=2,
                          micro_batch_size_sequences=8)
    assert layout.batch_size_sequences == 64
    assert layout.gradient_accumulation_steps == 4
    assert (layout.micro_batch_size_sequences * layout.seq_len
            * layout.gradient_accumulation_steps * layout.world_size) == 4096
    default = batch_layout(4096, 64, 2)
    assert default.micro_batch_size_sequences == 32 and default.gradient_accumulation_steps == 1


@pytest.mark.parametrize("args,message", [
    ((1000, 64, 1, None), r"batch_size_tokens must be a multiple of seq_len: 1000 tokens .* 64"),
    ((192, 64, 2, None), r"divisible by world_size: 3 sequences \(192 tokens / seq_len 64\) over 2"),
    ((4096, 64, 2, 5), r"32 sequences per worker .* not a multiple of 5"),
    ((0, 64, 1, None), r"batch_size_tokens must be > 0 \(got 0\)"),
    ((64, 0, 1, None), r"seq_len must be > 0"),
    ((64, 1, 1, 0), r"micro_batch_size_sequences must be > 0"),
])
def test_batch_layout_errors_show_the_numbers(args, message):
    with pytest.raises(BatchSizeError, match=message):
        batch_layout(*args)


def _cfg(**over):
    base = {"task": "synthetic", "learning_rate": 0.01, "batch_size_tokens": 32,
            "n_tokens": 3200}
    base.update(over)
    return TrainConfig.from_dict(base)


@pytest.mark.parametrize("over,message", [
    ({"learning_rate": -1.0}, "learning_rate must be > 0"),
    ({"learning_rate": math.nan}, "learning_rate must be > 0"),
    ({"n_tokens": 16}, "n_tokens must be >= batch_size_tokens"),
    ({"seq_len": 8}, "seq_len must be 1 for the synthetic task"),
    ({"task": "gpt", "seq_len": 8}, "corpus_dir is required"),
    ({"zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3"),
    ({"zero_stage": 3}, "zero_stage must be <= 2"),
    ({"optimizer": {"beta2": 1.0}}, r"optimizer.beta2 must be in \[0, 1\)"),
    ({"optimizer": {"momentum": 0.9}}, "unknown optimizer fields: momentum"),
    ({"schedule": {"name": "linear"}}, "schedule.name must be one of"),
    ({"eval": {"every": 0}}, "eval.every must be > 0"),
    ({"colour": "red"}, "unknown training fields: colour"),
])
def test_config_errors_name_the_field(over, message):
    with pytest.raises(TrainConfigError, match=message):
        _cfg(**over)


def test_steps_is_floor_of_tokens_over_batch():
    assert _cfg(n_tokens=3200).steps == 100
    assert _cfg(n_tokens=3231).steps == 100


def test_schedules():
    total = 100
    ewa = ScheduleConfig(name="constant_ewa", warmup_fraction=0.1)
    assert lr_multiplier(0, total, ewa) == pytest.approx(0.1)
    assert lr_multiplier(9, total, ewa) == 1.0
    assert lr_multiplier(99, total, ewa) == 1.0
    wsd = ScheduleConfig(name="wsd", warmup_fraction=0.0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(79, total, wsd) == 1.0
    assert lr_multiplier(89, total, wsd) == pytest.approx(0.5)
    assert lr_multiplier(99, total, wsd) == pytest.approx(0.0)
    cos = ScheduleConfig(name="cosine", warmup_fraction=0.0, min_lr_ratio=0.1)
    assert lr_multiplier(49, total, cos) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)
    assert lr_multiplier(99, total, cos) == pytest.approx(0.1)


def test_evaluation_grid_is_hybrid():
    steps = evaluation_steps(200, EvalConfig(every=64))
    assert {0, 1, 2, 4, 8, 16, 32, 64, 128} <= steps  # powers of two
    assert {64, 128, 192} <= steps  # every K
    assert {140, 150, 160, 170, 180, 190, 200} <= steps  # dense over the last 30 %
    assert max(steps) == 200 and 100 not in steps
