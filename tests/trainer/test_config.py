"""Batch arithmetic and the configuration's rules, with messages that name field and rule."""

import math

import pytest

from trainer.config import (
    BatchSizeError,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    TrainConfigError,
    batch_layout,
)


def test_batch_layout_splits_exactly():
    layout = batch_layout(
        batch_size_tokens=4096, seq_len=64, world_size=2, micro_batch_size_sequences=8
    )
    assert layout.batch_size_sequences == 64
    assert layout.gradient_accumulation_steps == 4
    assert (
        layout.micro_batch_size_sequences
        * layout.seq_len
        * layout.gradient_accumulation_steps
        * layout.world_size
    ) == 4096
    default = batch_layout(4096, 64, 2)
    assert default.micro_batch_size_sequences == 32 and default.gradient_accumulation_steps == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (
            (1000, 64, 1, None),
            r"batch_size_tokens must be a multiple of seq_len: 1000 tokens .* 64",
        ),
        (
            (192, 64, 2, None),
            r"divisible by world_size: 3 sequences \(192 tokens / seq_len 64\) over 2",
        ),
        ((4096, 64, 2, 5), r"32 sequences per worker .* not a multiple of 5"),
        ((0, 64, 1, None), r"batch_size_tokens must be > 0 \(got 0\)"),
        ((64, 0, 1, None), r"seq_len must be > 0"),
        ((64, 1, 1, 0), r"micro_batch_size_sequences must be > 0"),
    ],
)
def test_batch_layout_errors_show_the_numbers(args, message):
    with pytest.raises(BatchSizeError, match=message):
        batch_layout(*args)


def _cfg(**over):
    base = {"task": "synthetic", "learning_rate": 0.01, "batch_size_tokens": 32, "n_tokens": 3200}
    base.update(over)
    return TrainConfig.from_dict(base)


@pytest.mark.parametrize(
    "over,message",
    [
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
        (
            {"schedule": {"warmup_fraction": 1.5}},
            r"^schedule.warmup_fraction must be in \[0, 1\) \(got 1.5\)$",
        ),
        ({"learning_rate": math.inf}, r"learning_rate must be > 0 and finite \(got inf\)"),
        ({"target_loss": math.nan}, r"target_loss must be finite \(got nan\)"),
        ({"micro_batch_size_sequences": 0}, r"micro_batch_size_sequences must be > 0 \(got 0\)"),
        ({"n_tokens": "many"}, r"n_tokens must be > 0 \(got 'many'\)"),
    ],
)
def test_config_errors_name_the_field(over, message):
    with pytest.raises(TrainConfigError, match=message):
        _cfg(**over)


def test_steps_is_floor_of_tokens_over_batch():
    assert _cfg(n_tokens=3200).steps == 100
    assert _cfg(n_tokens=3231).steps == 100


def test_every_error_is_named_at_once():
    with pytest.raises(TrainConfigError) as caught:
        _cfg(colour=1, optimizer={"a": 1, "b": 2}, eval={"every": -1}, zero_stage=9)
    message = str(caught.value)
    assert "unknown training fields: colour" in message
    assert "unknown optimizer fields: a, b" in message
    assert "eval.every must be > 0 (got -1)" in message
    assert "zero_stage must be 0, 1, 2 or 3 (got 9)" in message
    with pytest.raises(TrainConfigError, match="task is required; learning_rate is required"):
        TrainConfig.from_dict({})


def test_config_is_frozen_and_sections_take_their_defaults():
    config = _cfg(optimizer={"beta2": 0.99}, schedule=None)
    assert config.optimizer == OptimizerConfig(beta2=0.99)
    assert config.optimizer.beta1 == OptimizerConfig().beta1
    assert config.schedule == ScheduleConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.learning_rate = 1.0
    # a validated config passes through as it is, sections included
    assert TrainConfig.from_dict(config.model_dump()) == config
    assert TrainConfig.from_dict({**config.model_dump(), "optimizer": config.optimizer}) == config
