"""Mixed precision through DeepSpeed's own config: bf16 trains on the CPU with bf16 module
parameters and fp32 master weights in the optimizer, losses in fp32, over one worker and two
(ZeRO-0's gradient noise scale included); fp16, which DeepSpeed's CPU accelerator does not
support, is refused naming the field; the sweep file validates ``precision`` and the trial
records it."""

import math

import pytest
import torch

from tests.trainer import test_zero
from tests.trainer.test_zero import SHAPE, Collect, _train_two_processes
from trainer.config import TrainConfig, TrainConfigError, batch_layout
from trainer.data import TokenCorpus, batch_generator
from trainer.engine import (
    GradientStep,
    build_engine,
    deepspeed_config,
    fp32_loss,
    init_distributed,
)
from trainer.model import GPT, GPTConfig
from trainer.plan import _trial_fields, expand_trials, idempotency_key
from trainer.sweep_config import SweepConfigError, parse_sweep_config
from trainer.train import train

corpus_dir = test_zero.corpus_dir  # the fixture: a small byte corpus


def _gpt(corpus_dir, **over):
    raw = {
        "task": "gpt",
        "corpus_dir": str(corpus_dir),
        "seq_len": 16,
        "model": SHAPE,
        "batch_size_tokens": 16 * 8,
        "n_tokens": 16 * 8 * 12,
        "learning_rate": 2e-2,
        "micro_batch_size_sequences": 4,
        "schedule": {"name": "wsd", "warmup_fraction": 0.1},
        "eval": {"batches": 2, "log_every": 1},
        "precision": "bf16",
    }
    return {**raw, **over}


def _master_weights(optimizer) -> list[torch.Tensor]:
    """The fp32 copies that DeepSpeed's optimizer updates: per parameter under ZeRO-0 (its
    fp16/bf16 wrapper), one flat partition per group under ZeRO 1-2."""
    if hasattr(optimizer, "fp32_groups"):
        return [p for group in optimizer.fp32_groups for p in group]
    return list(optimizer.single_partition_of_fp32_groups)


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_trains_bf16_parameters_from_fp32_master_weights(corpus_dir, stage):
    config = TrainConfig.from_dict(_gpt(corpus_dir, zero_stage=stage))
    layout = batch_layout(config.batch_size_tokens, config.seq_len, 1, 4)
    data = TokenCorpus(config.corpus_dir)
    init_distributed()  # a 1-process group, as train() joins it
    torch.manual_seed(0)
    engine, _ = build_engine(config, GPT(GPTConfig(seq_len=16, **SHAPE)), layout)
    step = GradientStep(engine, config, layout)

    def batches(i):
        for micro in range(layout.gradient_accumulation_steps):
            yield data.batch("train", 4, 16, batch_generator(0, i, 0, micro))

    losses = [step(batches(i)).loss for i in range(12)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # it learned
    params = list(engine.module.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    masters = _master_weights(engine.optimizer)
    assert masters and {m.dtype for m in masters} == {torch.float32}
    if stage == 0:  # the module holds the bf16 rounding of each master weight
        pairs = zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups, strict=True)
        for low, high in pairs:
            for param, master in zip(low, high, strict=True):
                assert torch.equal(master.detach().to(torch.bfloat16), param.detach())
        assert sum(m.numel() for m in masters) == sum(p.numel() for p in params)
    else:  # one flat partition of every parameter (one worker: all of them)
        assert sum(m.numel() for m in masters) == sum(p.numel() for p in params)
    # the loss is an fp32 tensor computed from the bf16 logits
    x, y = data.batch("val", 4, 16, batch_generator(1, 0, 0, 0))
    loss = fp32_loss(engine, engine.module, x, y, torch.bfloat16)
    assert loss.dtype == torch.float32
    logits = engine.module(x)[0]
    assert logits.dtype == torch.bfloat16
    reference = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)


def test_bf16_synthetic_run_learns_with_fp32_losses_and_its_ewa():
    """The synthetic task's fp32 inputs are cast to bf16; its EWA (constant_ewa) folds the
    bf16 weights into an fp32 average; it ends near where the same run in fp32 does."""
    raw = {
        "task": "synthetic",
        "learning_rate": 0.05,
        "batch_size_tokens": 32,
        "n_tokens": 32 * 40,
        "synthetic": {"dim": 64},
        "schedule": {"ewa_decay": 0.9},
        "eval": {"log_every": 1},
    }
    results = {}
    for precision in ("bf16", "fp32"):
        sink = Collect()
        result = train({**raw, "precision": precision}, telemetry=sink)
        results[precision] = (result, sink.points)
    bf16, points = results["bf16"]
    losses = [p["train_loss"] for p in points if p.get("train_loss") is not None]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert not bf16.diverged and bf16.final_eval_loss < 0.3 * points[0]["eval_loss"]
    assert bf16.final_eval_loss == pytest.approx(results["fp32"][0].final_eval_loss, rel=0.05)
    assert all(p["grad_norm"] > 0 for p in points[1:])


def test_bf16_on_two_workers_measures_the_gradient_noise_scale(corpus_dir):
    """ZeRO-0 over 2 gloo workers: one worker's bf16 gradient read before the all-reduce,
    the trainer clipping in fp32 norms."""
    raw = _gpt(corpus_dir, zero_stage=0, micro_batch_size_sequences=None)
    raw["optimizer"] = {"grad_clip": 0.05}
    points, final_eval = _train_two_processes(raw)
    steps = [p for p in points if p.get("train_loss") is not None]
    assert len(steps) == 12 and math.isfinite(final_eval)
    assert steps[-1]["train_loss"] < 0.8 * steps[0]["train_loss"]
    assert all(p["b_simple"] is not None and math.isfinite(p["b_simple"]) for p in steps[4:])
    assert all(p["grad_norm"] > 0.05 for p in steps)  # clipping was active


def test_fp16_is_refused_on_the_cpu_and_built_for_cuda(corpus_dir):
    raw = _gpt(corpus_dir, precision="fp16")
    with pytest.raises(TrainConfigError, match=r"precision 'fp16' needs a CUDA accelerator"):
        train(raw, telemetry=Collect())
    config, layout = TrainConfig.from_dict(raw), batch_layout(128, 16, 1)
    built = deepspeed_config(config, layout, "cuda")
    assert built["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert "bf16" not in built
    assert built["gradient_clipping"] == 1.0  # DeepSpeed unscales and clips, even at ZeRO-0
    bf16 = deepspeed_config(TrainConfig.from_dict(_gpt(corpus_dir)), layout)
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    fp32 = deepspeed_config(TrainConfig.from_dict(_gpt(corpus_dir, precision="fp32")), layout)
    assert "bf16" not in fp32 and "fp16" not in fp32


def _sweep(**over):
    raw = {
        "experiment": "precision",
        "task": "synthetic",
        "synthetic": {"dim": 16},
        "n_tokens": [256],
        "search": {"learning_rate": [0.1], "batch_size_tokens": [32]},
    }
    return parse_sweep_config({**raw, **over})


def test_the_sweep_file_validates_precision_and_the_trial_records_it():
    with pytest.raises(SweepConfigError) as bad:
        _sweep(precision="int8")
    assert str(bad.value) == "precision must be one of 'fp32', 'bf16' or 'fp16' (got 'int8')"
    with pytest.raises(SweepConfigError, match=r"precision 'fp16' needs GPUs \(use_gpu is false"):
        _sweep(precision="fp16", use_gpu=False)
    assert _sweep(precision="fp16").precision == "fp16"  # use_gpu auto: checked on the cluster

    plain, bf16 = _sweep(), _sweep(precision="bf16")
    [plain_spec], [bf16_spec] = expand_trials(plain), expand_trials(bf16)
    assert "precision" not in plain_spec  # the runs of files without it keep their keys
    assert bf16_spec["precision"] == "bf16"
    assert idempotency_key(plain, plain_spec) != idempotency_key(bf16, bf16_spec)
    fields = _trial_fields(bf16, bf16_spec, 1, "key", "test")
    assert fields["config"]["train"]["precision"] == "bf16"
    assert _trial_fields(plain, plain_spec, 1, "key", "test")["config"]["train"]["precision"] == (
        "fp32"
    )
