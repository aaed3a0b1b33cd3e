"""One training run: a DeepSpeed data-parallel engine over the GPT or the synthetic task.

``train(config)`` is the per-worker function (Ray Train calls it on every worker; it also runs
as a single process). It reads top to bottom: configuration and batch arithmetic, process
group, task and model, optimizer and DeepSpeed engine, resume, then the loop (learning-rate
schedule, micro batches, gradient noise scale, EWA, evaluation, telemetry, checkpoints).

Batch arithmetic (asserted exactly, in tokens):
    batch_size_tokens = micro_batch_size_sequences × seq_len × gradient_accumulation × world_size
and the number of optimizer steps is steps = ⌊n_tokens / batch_size_tokens⌋, so the run
trains on D = steps · B tokens. The synthetic task counts one sample as one token (seq_len 1).

Schedules (multiplier of the peak learning rate η after a linear warmup over
⌈warmup_fraction · steps⌉ steps):
  * ``constant_ewa``: 1; evaluation uses the exponential weight average
    ξ_{t+1} = τ·ξ_t + (1 − τ)·θ_{t+1} (Zhang et al. 2024, τ = ``ewa_decay``), started at
    ξ_0 = 0 and debiased as ξ_t / (1 − τ^t) (as Adam debiases its moments), so that short runs
    are not dragged towards the initial weights;
  * ``wsd``: 1, then linear decay to ``min_lr_ratio`` over the last ``decay_fraction``;
  * ``cosine``: min + (1 − min)·(1 + cos(π·progress))/2 after warmup.

Evaluation (Zhang et al. 2024, appendix G, hybrid schedule): after step 0, at every power of
two, every ``eval_every`` steps, and at 0.70·n, 0.75·n, …, n over the last 30 %.

Gradient noise scale b_simple (McCandlish et al. 2018, estimators in
``fitting.noise_scale``): with ZeRO stage 0 the gradient of one worker (or, on one worker with
gradient accumulation, of the first micro batch) is read before the all-reduce and compared
with the all-reduced gradient. With ZeRO stages 1–3 DeepSpeed reduces (and partitions)
gradients inside ``backward``, so no per-worker gradient exists to read: b_simple is not
measured there (points carry null) and grad_norm comes from DeepSpeed's global norm.
Clipping to ``optimizer.grad_clip``: DeepSpeed clips under ZeRO 1–3 (it holds the gradient
partitions); under ZeRO-0 the trainer clips the all-reduced gradient itself with the norm it
computes anyway for grad_norm and b_simple, one fused norm instead of a second per-parameter
one (and a collective) inside DeepSpeed's step.

A loss that becomes NaN/inf, or exceeds ``divergence_factor`` × the first loss, ends the run
as diverged: recorded with its non-finite loss, not raised.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

TASKS = ("synthetic", "gpt")
REPORT_INTERVAL_S = 2.5  # Ray Train's controller polls workers every 2 s by default
SCHEDULES = ("constant_ewa", "wsd", "cosine")
OPTIMIZERS = ("adamw", "sgd")


class TrainConfigError(ValueError):
    """A training configuration that breaks a rule; the message names the field."""


class BatchSizeError(TrainConfigError):
    """Batch arithmetic that does not add up; the message shows the numbers."""


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "constant_ewa"
    warmup_fraction: float = 0.05
    ewa_decay: float = 0.99  # τ per optimizer step
    decay_fraction: float = 0.2  # WSD: fraction of the steps spent decaying
    min_lr_ratio: float = 0.0  # WSD / cosine: final η / peak η


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1000  # evaluate every K steps (besides powers of two and the dense tail)
    dense_start_fraction: float = 0.7
    dense_interval_fraction: float = 0.05
    batches: int = 4  # GPT: validation batches per evaluation (per worker)
    log_every: int = 0  # record a train-loss point every k steps; 0: about 500 points per run


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs. ``from_dict`` validates and names the field that is wrong."""

    task: str
    learning_rate: float
    batch_size_tokens: int
    n_tokens: int
    seq_len: int = 1
    micro_batch_size_sequences: int | None = None
    model: dict[str, Any] = field(default_factory=dict)  # GPTConfig or LinearRegressionConfig
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticRegressionConfig
    corpus_dir: str | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    target_loss: float | None = None
    divergence_factor: float = 100.0
    zero_stage: int = 0
    seed: int = 0
    threads_per_worker: int = 1
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps between checkpoints; 0: none
    trial_id: int | None = None
    service_url: str | None = None
    service_token: str | None = None
    spool_dir: str | None = None
    fail_at_step: int | None = None  # for tests of resume: raise once after this step

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainConfigError(f"unknown training fields: {', '.join(unknown)}")
        values = dict(raw)
        for name, sub in (("optimizer", OptimizerConfig), ("schedule", ScheduleConfig),
                          ("eval", EvalConfig)):
            part = values.get(name) or {}
            if isinstance(part, sub):
                continue
            sub_known = {f.name for f in fields(sub)}
            bad = sorted(set(part) - sub_known)
            if bad:
                raise TrainConfigError(f"unknown {name} fields: {', '.join(bad)}")
            values[name] = sub(**part)
        missing = [n for n in ("task", "learning_rate", "batch_size_tokens", "n_tokens")
                   if n not in values]
        if missing:
            raise TrainConfigError(f"missing training fields: {', '.join(missing)}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        def rule(ok: bool, message: str) -> None:
            if not ok:
                raise TrainConfigError(message)

        rule(self.task in TASKS, f"task must be one of {TASKS} (got {self.task!r})")
        rule(math.isfinite(self.learning_rate) and self.learning_rate > 0,
             f"learning_rate must be > 0 (got {self.learning_rate})")
        rule(self.batch_size_tokens > 0, f"batch_size_tokens must be > 0 (got {self.batch_size_tokens})")
        rule(self.n_tokens > 0, f"n_tokens must be > 0 (got {self.n_tokens})")
        rule(self.seq_len > 0, f"seq_len must be > 0 (got {self.seq_len})")
        rule(self.n_tokens >= self.batch_size_tokens,
             f"n_tokens must be >= batch_size_tokens (got n_tokens={self.n_tokens}, "
             f"batch_size_tokens={self.batch_size_tokens})")
        if self.task == "synthetic":
            rule(self.seq_len == 1, f"seq_len must be 1 for the synthetic task (got {self.seq_len})")
        else:
            rule(self.corpus_dir is not None, "corpus_dir is required for task 'gpt'")
        rule(self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3 (got {self.zero_stage})")
        o, s, e = self.optimizer, self.schedule, self.eval
        rule(o.name in OPTIMIZERS, f"optimizer.name must be one of {OPTIMIZERS} (got {o.name!r})")
        rule(0 <= o.beta1 < 1, f"optimizer.beta1 must be in [0, 1) (got {o.beta1})")
        rule(0 <= o.beta2 < 1, f"optimizer.beta2 must be in [0, 1) (got {o.beta2})")
        rule(o.eps > 0, f"optimizer.eps must be > 0 (got {o.eps})")
        rule(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0 (got {o.weight_decay})")
        rule(o.grad_clip >= 0, f"optimizer.grad_clip must be >= 0 (got {o.grad_clip})")
        rule(s.name in SCHEDULES, f"schedule.name must be one of {SCHEDULES} (got {s.name!r})")
        rule(0 <= s.warmup_fraction < 1, f"schedule.warmup_fraction must be in [0, 1) (got {s.warmup_fraction})")
        rule(0 < s.ewa_decay < 1, f"schedule.ewa_decay must be in (0, 1) (got {s.ewa_decay})")
        rule(0 < s.decay_fraction <= 1, f"schedule.decay_fraction must be in (0, 1] (got {s.decay_fraction})")
        rule(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1] (got {s.min_lr_ratio})")
        rule(not (s.name == "constant_ewa" and self.zero_stage == 3),
             "schedule.name 'constant_ewa' needs full parameters on every worker: zero_stage must be <= 2")
        rule(e.every > 0, f"eval.every must be > 0 (got {e.every})")
        rule(e.batches > 0, f"eval.batches must be > 0 (got {e.batches})")
        rule(e.log_every >= 0, f"eval.log_every must be >= 0 (got {e.log_every})")
        rule(self.divergence_factor > 1, f"divergence_factor must be > 1 (got {self.divergence_factor})")
        rule(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (got {self.checkpoint_every})")
        rule(self.threads_per_worker > 0, f"threads_per_worker must be > 0 (got {self.threads_per_worker})")
        if self.target_loss is not None:
            rule(math.isfinite(self.target_loss), f"target_loss must be finite (got {self.target_loss})")

    @property
    def steps(self) -> int:
        """Optimizer steps: ⌊n_tokens / batch_size_tokens⌋."""
        return self.n_tokens // self.batch_size_tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatchLayout:
    """How one global batch is cut: micro × seq_len × accumulation × world = tokens."""

    batch_size_tokens: int
    seq_len: int
    world_size: int
    micro_batch_size_sequences: int
    gradient_accumulation_steps: int

    @property
    def batch_size_sequences(self) -> int:
        return self.batch_size_tokens // self.seq_len

    @property
    def micro_batch_tokens(self) -> int:
        return self.micro_batch_size_sequences * self.seq_len


def batch_layout(
    batch_size_tokens: int, seq_len: int, world_size: int,
    micro_batch_size_sequences: int | None = None,
) -> BatchLayout:
    """Split a global batch of ``batch_size_tokens`` over ``world_size`` workers; the micro
    batch defaults to each worker's whole share (no accumulation)."""
    if batch_size_tokens <= 0:
        raise BatchSizeError(f"batch_size_tokens must be > 0 (got {batch_size_tokens})")
    if seq_len <= 0:
        raise BatchSizeError(f"seq_len must be > 0 (got {seq_len})")
    if world_size <= 0:
        raise BatchSizeError(f"world_size must be > 0 (got {world_size})")
    if batch_size_tokens % seq_len:
        raise BatchSizeError(
            f"batch_size_tokens must be a multiple of seq_len: {batch_size_tokens} tokens is "
            f"not a whole number of {seq_len}-token sequences"
        )
    sequences = batch_size_tokens // seq_len
    if sequences % world_size:
        raise BatchSizeError(
            f"batch_size_sequences must be divisible by world_size: {sequences} sequences "
            f"({batch_size_tokens} tokens / seq_len {seq_len}) over {world_size} workers"
        )
    per_worker = sequences // world_size
    micro = per_worker if micro_batch_size_sequences is None else micro_batch_size_sequences
    if micro <= 0:
        raise BatchSizeError(f"micro_batch_size_sequences must be > 0 (got {micro})")
    if per_worker % micro:
        raise BatchSizeError(
            f"micro_batch_size_sequences must divide the per-worker batch: {per_worker} "
            f"sequences per worker ({sequences} / {world_size} workers) is not a multiple "
            f"of {micro}"
        )
    gas = per_worker // micro
    total = micro * seq_len * gas * world_size
    if total != batch_size_tokens:  # cannot happen after the checks above; kept as the contract
        raise BatchSizeError(
            f"batch arithmetic: micro {micro} × seq_len {seq_len} × accumulation {gas} × "
            f"world {world_size} = {total} tokens, expected batch_size_tokens={batch_size_tokens}"
        )
    return BatchLayout(batch_size_tokens, seq_len, world_size, micro, gas)


# ----------------------------------------------------------------------------- schedules


def lr_multiplier(step: int, total_steps: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the peak η for the update with 0-based index ``step`` (module docstring)."""
    warmup = math.ceil(schedule.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule.name == "constant_ewa":
        return 1.0
    floor = schedule.min_lr_ratio
    if schedule.name == "wsd":
        decay = max(1, math.ceil(schedule.decay_fraction * total_steps))
        start = total_steps - decay
        if step < start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step - start + 1) / decay
    progress = (step - warmup + 1) / max(1, total_steps - warmup)  # cosine
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def evaluation_steps(total_steps: int, eval_config: EvalConfig) -> set[int]:
    """Step counts after which the model is evaluated: 0, powers of two, multiples of
    ``every`` and the dense tail 0.70·n, 0.75·n, …, n (always including n)."""
    steps = {0, total_steps}
    power = 1
    while power <= total_steps:
        steps.add(power)
        power *= 2
    steps.update(range(eval_config.every, total_steps + 1, eval_config.every))
    fraction = eval_config.dense_start_fraction
    while fraction < 1.0 + 1e-9:
        steps.add(min(total_steps, max(1, round(fraction * total_steps))))
        fraction += eval_config.dense_interval_fraction
    return steps


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, bool]:
    """Join the process group (the one Ray Train made, or a 1-process one). DeepSpeed picks
    its accelerator and backend (gloo on CPU, NCCL on GPUs). Returns (rank, world size,
    whether this call created the group)."""
    import deepspeed
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        created = True
    else:  # DeepSpeed reads these; Ray Train sets the address but not always the ranks
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size(), created


def deepspeed_config(config: TrainConfig, layout: BatchLayout,
                     accelerator: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed configuration, built in code. Batch sizes are in sequences.

    ``accelerator`` is DeepSpeed's device name ("cpu", "cuda"). On the CPU, ZeRO stages 1–2
    run without ``contiguous_gradients``: that buffer exists to keep a GPU allocator from
    fragmenting, and on the CPU it only costs one more copy of every gradient inside each
    backward hook (plus a fresh ``reduce_bucket_size``-element buffer per step); the
    reduction itself is the same all-reduce of the same bucket either way, so this holds at
    every world size (benchmarks/train_throughput.py has the numbers). Stage 3 manages its
    gradients itself and keeps DeepSpeed's defaults, as do GPUs. Under ZeRO-0 the trainer
    clips, not DeepSpeed (module docstring)."""
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if accelerator == "cpu" and config.zero_stage in (1, 2):
        zero["contiguous_gradients"] = False
    return {
        "train_batch_size": layout.batch_size_sequences,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size_sequences,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "gradient_clipping": config.optimizer.grad_clip if config.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def merge_equal_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parameter groups with the same hyperparameters (every key but ``params``) merged into
    one, in the order of their first appearance; the update is the same. ZeRO 1–2 keep one
    flat fp32 partition per group and pay per group for the gradient norm (a collective
    each), the flattening and the optimizer call, so fewer groups is less work per step."""
    merged: list[dict[str, Any]] = []
    for group in groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        for target in merged:
            if {k: v for k, v in target.items() if k != "params"} == settings:
                target["params"] = target["params"] + list(group["params"])
                break
        else:
            merged.append({**settings, "params": list(group["params"])})
    return merged


def _grad_sq_norm(params: list[torch.nn.Parameter], clip_to: float = 0.0) -> float:
    """Σ over parameters of |grad|² (one fused norm over all gradients), before clipping;
    with ``clip_to`` > 0 the gradients are then scaled by min(1, clip_to / (|grad| + 1e-6)),
    as torch and DeepSpeed clip."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if clip_to > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip_to, total)
    return float(total) ** 2


@dataclass
class RunResult:
    """What a run ended with (also the final metrics stored on the trial)."""

    status: str  # completed | failed
    diverged: bool
    steps_done: int
    tokens_done: int
    final_loss: float  # smoothed train loss (EMA, decay 0.9 per step); NaN/inf when diverged
    final_eval_loss: float  # last evaluation with the evaluation weights (EWA for constant_ewa)
    reached_target: bool
    n_params: int
    resumed_from_step: int
    wall_time_s: float  # the loop, evaluations included
    tokens_per_s: float  # tokens trained / (wall time − evaluation time)
    points_recorded: int

    def final_metrics(self) -> dict[str, Any]:
        return {
            "final_loss": self.final_loss, "final_eval_loss": self.final_eval_loss,
            "steps_done": self.steps_done, "tokens_done": self.tokens_done,
            "diverged": self.diverged,
        }


class InjectedFailure(RuntimeError):
    """Raised once at ``fail_at_step`` so tests can exercise checkpoint resume."""


# ----------------------------------------------------------------------------- the run


def train(
    raw_config: dict[str, Any],
    report: Callable[[dict[str, Any]], None] | None = None,
    telemetry: Any | None = None,
    mark_failed: bool = True,
) -> RunResult:
    """Train one run on this worker. ``report(metrics)`` is called on every worker after each
    evaluation (Ray Train's ``ray.train.report`` in sweeps). ``telemetry`` overrides the sink
    built from ``service_url``/``trial_id`` (used on rank 0 only). On an exception the points
    are flushed and, with ``mark_failed``, the trial is marked failed before re-raising; sweeps
    pass False because Ray Train may restart the run from its checkpoint and the sweep marks
    the trial failed only when the retries are spent."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from trainer.data import SyntheticRegression, SyntheticRegressionConfig, TokenCorpus, batch_generator
    from trainer.model import GPT, GPTConfig, LinearRegression, LinearRegressionConfig
    from trainer.telemetry import NullTelemetry, ServiceTelemetry

    config = raw_config if isinstance(raw_config, TrainConfig) else TrainConfig.from_dict(raw_config)
    torch.set_num_threads(config.threads_per_worker)
    rank, world_size, created_group = init_distributed()
    layout = batch_layout(config.batch_size_tokens, config.seq_len, world_size,
                          config.micro_batch_size_sequences)
    total_steps = config.steps
    gas = layout.gradient_accumulation_steps

    # -- task and model (same initialisation on every worker)
    torch.manual_seed(config.seed)
    if config.task == "synthetic":
        task = SyntheticRegression(SyntheticRegressionConfig(**config.synthetic))
        model = LinearRegression(LinearRegressionConfig(dim=task.config.dim))
        data_fingerprint = task.config.fingerprint

        def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
            return task.batch(layout.micro_batch_size_sequences,
                              batch_generator(config.seed, step, rank, micro))
    else:
        corpus = TokenCorpus(config.corpus_dir)
        model_cfg = GPTConfig(**{"seq_len": config.seq_len, "vocab_size": corpus.vocab_size,
                                 **config.model})
        if model_cfg.seq_len < config.seq_len:
            raise TrainConfigError(
                f"model.seq_len must be >= seq_len (got {model_cfg.seq_len} < {config.seq_len})"
            )
        model = GPT(model_cfg)
        data_fingerprint = corpus.fingerprint

        def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
            return corpus.batch("train", layout.micro_batch_size_sequences, config.seq_len,
                                batch_generator(config.seed, step, rank, micro))
    n_params = model.n_params

    # -- optimizer and engine
    opt = config.optimizer
    groups = merge_equal_groups(model.optimizer_groups(config.learning_rate, opt.weight_decay))
    base_lrs = [g["lr"] for g in groups]
    if opt.name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(opt.beta1, opt.beta2),
                                      eps=opt.eps, weight_decay=opt.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=config.learning_rate, momentum=opt.beta1,
                                    weight_decay=opt.weight_decay)
    accelerator = get_accelerator().device_name()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(config, layout, accelerator))
    device = engine.device  # cpu here; cuda:<local rank> on GPUs
    params = [p for p in engine.module.parameters()]
    if world_size == 1 and config.zero_stage == 0:
        engine.enable_backward_allreduce = False  # averaging over one worker is the identity
    use_ewa = config.schedule.name == "constant_ewa"
    ewa = [torch.zeros_like(p, dtype=torch.float32) for p in params] if use_ewa else None
    ewa_count = 0

    # -- resume from the last checkpoint of this run, if any
    start_step, train_loss_ema, first_loss, points_recorded = 0, None, None, 0
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if ckpt_dir is not None and (ckpt_dir / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(ckpt_dir))
        start_step = int(client_state["step"])
        train_loss_ema = client_state["train_loss_ema"]
        first_loss = client_state["first_loss"]
        if use_ewa:
            ewa = [t.float() for t in client_state["ewa"]]
            ewa_count = int(client_state["ewa_count"])
        logger.info("resumed from checkpoint at step %d", start_step)
    resumed_from_step = start_step

    # -- telemetry (rank 0 reports)
    if rank == 0 and telemetry is not None:
        sink = telemetry
    elif rank == 0 and config.service_url and config.trial_id is not None:
        from client import HyperlawClient

        spool = (Path(config.spool_dir) / f"trial-{config.trial_id}.jsonl"
                 if config.spool_dir else None)
        sink = ServiceTelemetry(
            lambda: HyperlawClient(config.service_url, config.service_token),
            config.trial_id, spool_path=spool,
        )
    else:
        sink = NullTelemetry()
    gauges = _ray_gauges() if (rank == 0 and report is not None) else None
    sink.start()

    eval_at = evaluation_steps(total_steps, config.eval)
    log_every = config.eval.log_every or max(1, total_steps // 500)
    measure_noise = config.zero_stage == 0 and (world_size > 1 or gas > 1)
    noise = None
    if measure_noise:
        try:
            from fitting.noise_scale import GradientNoiseScale
        except ImportError as exc:  # the estimator module is optional at run time
            logger.warning("b_simple not measured: %s", exc)
            measure_noise = False
        else:
            noise = GradientNoiseScale()
    if world_size > 1:
        b_small = layout.batch_size_tokens // world_size  # one worker's share
    else:
        b_small = layout.micro_batch_tokens  # one micro batch
    b_big = layout.batch_size_tokens

    def ewa_weights() -> list[torch.Tensor]:
        """Debiased EWA ξ_t / (1 − τ^t); the current weights before the first step."""
        if ewa_count == 0:
            return [p.detach().float() for p in params]
        scale = 1.0 / (1.0 - config.schedule.ewa_decay ** ewa_count)
        return [e * scale for e in ewa]

    eval_time_s = [0.0]

    def evaluate() -> tuple[float, float | None]:
        """(loss of the current weights, loss of the EWA weights or None)."""
        t_eval = time.perf_counter()
        engine.module.eval()
        with torch.no_grad():
            if config.task == "synthetic":
                current = task.risk(engine.module.w)
                averaged = task.risk(ewa_weights()[0]) if use_ewa else None
            else:
                current = _mean_val_loss(engine.module, corpus, config, rank, world_size,
                                         device)
                averaged = None
                if use_ewa:
                    saved = [p.detach().clone() for p in params]
                    for p, e in zip(params, ewa_weights()):
                        p.data.copy_(e)
                    averaged = _mean_val_loss(engine.module, corpus, config, rank,
                                              world_size, device)
                    for p, s in zip(params, saved):
                        p.data.copy_(s)
        engine.module.train()
        eval_time_s[0] += time.perf_counter() - t_eval
        return current, averaged

    last_report = [-math.inf]

    def maybe_report(metrics: dict[str, Any], force: bool = False) -> None:
        """Report to Ray at most every REPORT_INTERVAL_S (Ray Train drains one report per
        controller poll, so denser reports would stall training); rank 0 decides for all
        workers so every worker reports the same sequence."""
        if report is None:
            return
        due = torch.tensor([1 if force or time.monotonic() - last_report[0] >= REPORT_INTERVAL_S
                            else 0], device=device)  # NCCL reduces only device tensors
        if world_size > 1:
            dist.broadcast(due, src=0)
        if due.item():
            last_report[0] = time.monotonic()
            report(metrics)

    def reduce_mean(value: float) -> float:
        if world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / world_size

    # -- the loop
    t_start = time.perf_counter()
    last_heartbeat = time.monotonic()
    last_eval: float = math.nan
    diverged = False
    reached_target = False
    step = start_step
    tokens_since, time_since = 0, time.perf_counter()
    tokens_per_s = math.nan
    failed_once = False
    try:
        if start_step == 0:
            current, averaged = evaluate()
            last_eval = averaged if use_ewa else current
            sink.add_point({"step": 0, "tokens": 0, "eval_loss": current,
                            "ewa_eval_loss": averaged, "wall_time_s": 0.0})
            points_recorded += 1
        while step < total_steps:
            mult = lr_multiplier(step, total_steps, config.schedule)
            for group, base in zip(engine.optimizer.param_groups, base_lrs):
                group["lr"] = base * mult
            loss_sum = 0.0
            g_small_sq = g_big_sq = None
            for micro in range(gas):
                x, y = (t.to(device) for t in get_batch(step, micro))
                _, loss = engine(x, y)
                loss_sum += float(loss.detach())
                boundary = micro == gas - 1
                if boundary and measure_noise and world_size > 1:
                    engine.enable_backward_allreduce = False
                    engine.backward(loss)
                    engine.enable_backward_allreduce = True
                    # local mean gradient over this worker's share of the batch
                    g_small_sq = reduce_mean(_grad_sq_norm(params))
                    engine.allreduce_gradients()
                else:
                    engine.backward(loss)
                if micro == 0 and measure_noise and world_size == 1 and gas > 1:
                    # DeepSpeed scaled the loss by 1/gas: undo it for one micro batch's gradient
                    g_small_sq = _grad_sq_norm(params) * gas * gas
                if boundary and config.zero_stage == 0:  # the trainer clips under ZeRO-0
                    g_big_sq = _grad_sq_norm(params, clip_to=opt.grad_clip)
                engine.step()
            step += 1
            if use_ewa:
                tau = config.schedule.ewa_decay
                with torch.no_grad():  # ξ ← τ·ξ + (1 − τ)·θ = lerp(ξ, θ, 1 − τ)
                    torch._foreach_lerp_(ewa, [p.detach() for p in params], 1.0 - tau)
                ewa_count += 1

            train_loss = reduce_mean(loss_sum / gas)
            if first_loss is None:
                first_loss = train_loss
            train_loss_ema = (train_loss if train_loss_ema is None
                              else 0.9 * train_loss_ema + 0.1 * train_loss)
            grad_norm = (math.sqrt(g_big_sq) if g_big_sq is not None
                         else _maybe(engine.get_global_grad_norm()))
            b_simple = None
            if noise is not None and g_small_sq is not None and g_big_sq is not None:
                b_simple = _finite_or_none(noise.update(g_small_sq, g_big_sq, b_small, b_big))

            tokens_since += layout.batch_size_tokens
            now = time.perf_counter()
            if now - time_since >= 1.0 or step == total_steps:
                tokens_per_s = tokens_since / (now - time_since)
                tokens_since, time_since = 0, now

            diverged = (not math.isfinite(train_loss)
                        or train_loss > config.divergence_factor * first_loss)
            point: dict[str, Any] = {
                "step": step, "tokens": step * layout.batch_size_tokens,
                "train_loss": train_loss, "lr": config.learning_rate * mult,
                "grad_norm": grad_norm, "b_simple": b_simple,
                "tokens_per_s": _finite_or_none(tokens_per_s),
                "wall_time_s": now - t_start,
            }
            if step in eval_at or diverged:
                current, averaged = evaluate()
                last_eval = averaged if use_ewa else current
                point.update(eval_loss=current, ewa_eval_loss=averaged)
                if config.target_loss is not None and last_eval <= config.target_loss:
                    reached_target = True
                metrics = {"step": step, "tokens": point["tokens"], "train_loss": train_loss,
                           "eval_loss": last_eval, "tokens_per_s": point["tokens_per_s"] or 0.0}
                if gauges is not None:
                    _set_gauges(gauges, metrics, config.trial_id)
                maybe_report(metrics)
            if step in eval_at or step % log_every == 0 or diverged:
                sink.add_point(point)
                points_recorded += 1
            if time.monotonic() - last_heartbeat > 10.0:
                sink.heartbeat()
                last_heartbeat = time.monotonic()
            if diverged:
                logger.warning("run diverged at step %d (train loss %s)", step, train_loss)
                break
            if reached_target:
                logger.info("target loss %s reached at step %d", config.target_loss, step)
                break
            if (ckpt_dir is not None and config.checkpoint_every
                    and step % config.checkpoint_every == 0 and step < total_steps):
                # save shard → barrier (inside) → report, so a reported checkpoint is complete
                _save_checkpoint(engine, ckpt_dir, step, {
                    "step": step, "train_loss_ema": train_loss_ema, "first_loss": first_loss,
                    "ewa": ewa, "ewa_count": ewa_count,
                }, rank)
                maybe_report({"step": step, "tokens": step * layout.batch_size_tokens,
                              "train_loss": train_loss, "checkpoint_step": step}, force=True)
            if config.fail_at_step is not None and step == config.fail_at_step and not failed_once:
                marker = ckpt_dir / "injected_failure_done" if ckpt_dir else None
                if marker is None or not marker.exists():
                    if marker is not None and rank == 0:
                        marker.touch()
                    failed_once = True
                    raise InjectedFailure(f"injected failure after step {step}")
    except InjectedFailure:
        sink.close(timeout_s=30.0)
        raise
    except Exception as exc:
        logger.exception("training failed at step %d", step)
        if mark_failed:
            sink.finish("failed", status_reason=f"{type(exc).__name__}: {exc}"[:2000],
                        steps_done=step, tokens_done=step * layout.batch_size_tokens)
        sink.close(timeout_s=30.0)
        raise

    wall = time.perf_counter() - t_start
    trained_tokens = (step - resumed_from_step) * layout.batch_size_tokens
    final_loss = train_loss_ema if train_loss_ema is not None else math.nan
    if diverged:  # the measured values stay in the points; the trial's result is "no loss"
        final_loss = train_loss if not math.isfinite(train_loss) else math.inf
        last_eval = last_eval if not math.isfinite(last_eval) else math.inf
    result = RunResult(
        status="completed", diverged=diverged, steps_done=step,
        tokens_done=step * layout.batch_size_tokens, final_loss=final_loss,
        final_eval_loss=last_eval, reached_target=reached_target, n_params=n_params,
        resumed_from_step=resumed_from_step, wall_time_s=wall,
        tokens_per_s=(trained_tokens / (wall - eval_time_s[0]) if wall > eval_time_s[0]
                      else math.nan),
        points_recorded=points_recorded,
    )
    sink.finish("completed", **result.final_metrics())
    sink.close(timeout_s=60.0)
    # no key named "done": Tune would take it as the end of the trial and kill its driver
    maybe_report(force=True, metrics={
        "step": step, "tokens": result.tokens_done, "finished": True,
        "final_loss": final_loss if math.isfinite(final_loss) else math.inf,
        "final_eval_loss": last_eval if math.isfinite(last_eval) else math.inf,
        "diverged": diverged, "n_params": n_params, "data_fingerprint": data_fingerprint,
    })
    if ckpt_dir is not None and rank == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the checkpoint has no more use
    if created_group:
        dist.barrier()
    return result


def _mean_val_loss(module: torch.nn.Module, corpus: Any, config: TrainConfig, rank: int,
                   world_size: int, device: torch.device) -> float:
    """Mean next-token loss over ``eval.batches`` fixed validation batches per worker,
    averaged over the workers (the same batches at every evaluation)."""
    import torch.distributed as dist

    from trainer.data import batch_generator

    n_seq = max(1, min(16, config.batch_size_tokens // config.seq_len))
    total = 0.0
    for i in range(config.eval.batches):
        x, y = corpus.batch("val", n_seq, config.seq_len,
                            batch_generator(config.seed + 1_000_003, i, rank, 0))
        total += float(module(x.to(device), y.to(device))[1])
    mean = total / config.eval.batches
    if world_size > 1:
        t = torch.tensor([mean], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        mean = float(t.item()) / world_size
    return mean


def _save_checkpoint(engine: Any, ckpt_dir: Path, step: int, client_state: dict, rank: int) -> None:
    """Save shard → barrier → drop older tags. DeepSpeed writes ``latest`` naming the tag."""
    import torch.distributed as dist

    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0:
        for old in ckpt_dir.glob("step*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)


def _maybe(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _ray_gauges() -> dict[str, Any] | None:
    """Per-trial gauges on the Ray dashboard (Metrics tab), when running inside Ray."""
    try:
        import ray
        from ray.util.metrics import Gauge
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    keys = ("trial_id",)
    return {
        "train_loss": Gauge("hyperlaw_train_loss", "training loss of a trial", tag_keys=keys),
        "eval_loss": Gauge("hyperlaw_eval_loss", "evaluation loss of a trial", tag_keys=keys),
        "tokens_per_s": Gauge("hyperlaw_tokens_per_s", "training throughput of a trial",
                              tag_keys=keys),
        "step": Gauge("hyperlaw_step", "optimizer steps done by a trial", tag_keys=keys),
    }


def _set_gauges(gauges: dict[str, Any], metrics: dict[str, Any], trial_id: int | None) -> None:
    tags = {"trial_id": str(trial_id)}
    for name, gauge in gauges.items():
        value = metrics.get(name)
        if value is not None and math.isfinite(float(value)):
            gauge.set(float(value), tags=tags)
