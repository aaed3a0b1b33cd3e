"""The DeepSpeed side of a run: the process group, the engine and its configuration, one
optimizer step over the micro batches, and checkpoints.

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

Precision (``TrainConfig.precision``): bf16 and fp16 are DeepSpeed's own (its ``bf16`` /
``fp16`` sections, fp16 with dynamic loss scaling); the engine's module holds bf16/fp16
parameters and its optimizer the fp32 master weights. Floating inputs are cast to the
parameters' dtype and the loss is computed in fp32 (``fp32_loss``); gradient norms are taken
in fp32 and, under fp16, divided by the loss scale. fp16 needs CUDA (DeepSpeed's CPU
accelerator refuses it): ``deepspeed_config`` refuses it on the CPU, naming the field. Under
fp16 DeepSpeed clips at every ZeRO stage, since it unscales the gradients and skips the steps
that overflow (a skipped step still counts as a step).

Checkpoints: every worker saves its shard, then all meet at a barrier, so that once
``save_checkpoint`` returns the checkpoint is complete and may be reported (save → barrier →
report).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fitting.noise_scale import GradientNoiseScale
from trainer.config import BatchLayout, TrainConfig, TrainConfigError
from trainer.model import GPT, LinearRegression

# DeepSpeed is imported where it is used: importing it probes the accelerator (seconds).

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_INITIAL_SCALE_POWER = 16  # the first dynamic loss scale, 2**16 (DeepSpeed's default)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, bool]:
    """Join the process group (the one Ray Train made, or a 1-process one). DeepSpeed picks
    its accelerator and backend (gloo on CPU, NCCL on GPUs). Returns (rank, world size,
    whether this call created the group)."""
    import deepspeed

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


def deepspeed_config(
    config: TrainConfig, layout: BatchLayout, accelerator: str = "cpu"
) -> dict[str, Any]:
    """The DeepSpeed configuration, built in code. Batch sizes are in sequences.

    ``accelerator`` is DeepSpeed's device name ("cpu", "cuda"). On the CPU, ZeRO stages 1–2
    run without ``contiguous_gradients``: that buffer exists to keep a GPU allocator from
    fragmenting, and on the CPU it only costs one more copy of every gradient inside each
    backward hook (plus a fresh ``reduce_bucket_size``-element buffer per step); the
    reduction itself is the same all-reduce of the same bucket either way, so this holds at
    every world size (benchmarks/train_throughput.py has the numbers). Stage 3 manages its
    gradients itself and keeps DeepSpeed's defaults, as do GPUs. Under ZeRO-0 the trainer
    clips, not DeepSpeed, but for fp16 (module docstring). ``precision`` 'fp16' on the CPU
    raises ``TrainConfigError``: DeepSpeed's CPU accelerator does not support it."""
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if accelerator == "cpu" and config.zero_stage in (1, 2):
        zero["contiguous_gradients"] = False
    deepspeed_clips = config.zero_stage > 0 or config.precision == "fp16"
    ds_config: dict[str, Any] = {
        "train_batch_size": layout.batch_size_sequences,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size_sequences,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "gradient_clipping": config.optimizer.grad_clip if deepspeed_clips else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if config.precision == "bf16":
        ds_config["bf16"] = {"enabled": True}
    elif config.precision == "fp16":
        if accelerator == "cpu":
            raise TrainConfigError(
                "precision 'fp16' needs a CUDA accelerator: DeepSpeed's CPU accelerator "
                "supports 'fp32' and 'bf16' only"
            )
        ds_config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": FP16_INITIAL_SCALE_POWER,
        }
    return ds_config


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


def build_engine(
    config: TrainConfig, model: GPT | LinearRegression, layout: BatchLayout
) -> tuple[Any, list[float]]:
    """AdamW (or SGD with momentum beta1) over the model's parameter groups, equal ones
    merged, inside a DeepSpeed engine. Returns the engine and each group's peak learning rate
    (the schedule multiplies them; a checkpoint's optimizer state overwrites the groups')."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    opt = config.optimizer
    groups = merge_equal_groups(model.optimizer_groups(config.learning_rate, opt.weight_decay))
    peak_lrs = [group["lr"] for group in groups]
    optimizer: torch.optim.Optimizer
    if opt.name == "adamw":
        betas = (opt.beta1, opt.beta2)
        optimizer = torch.optim.AdamW(
            groups, lr=config.learning_rate, betas=betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            groups, lr=config.learning_rate, momentum=opt.beta1, weight_decay=opt.weight_decay
        )
    ds_config = deepspeed_config(config, layout, get_accelerator().device_name())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if layout.world_size == 1 and config.zero_stage == 0:
        engine.enable_backward_allreduce = False  # averaging over one worker is the identity
    return engine, peak_lrs


# ----------------------------------------------------------------------------- one step


def mean_over_workers(value: float, world_size: int, device: torch.device) -> float:
    """The mean of ``value`` over the workers (a collective: every worker must call it)."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces device tensors
    dist.all_reduce(t)
    return float(t.item()) / world_size


def fp32_loss(
    forward: Any, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The model's loss on one batch, in fp32 whatever the parameters' ``dtype``. ``forward``
    runs ``module`` (the DeepSpeed engine in training, the module itself to evaluate).
    Floating inputs are cast to ``dtype``, targets are not: the synthetic task's fp32 targets
    promote its bf16/fp16 predictions, so its squared error is fp32 as it stands; the GPT's
    cross-entropy (``GPT.forward``'s) is taken of its logits cast to fp32. In fp32 runs, the
    models' own losses."""
    if dtype == torch.float32:
        return forward(x, y)[1]
    if x.is_floating_point():
        x = x.to(dtype)
    if isinstance(module, GPT):
        logits, _ = forward(x)
        return F.cross_entropy(logits.float().flatten(0, -2), y.flatten())
    return forward(x, y)[1]


def grad_sq_norm(params: list[torch.nn.Parameter], clip_to: float = 0.0) -> float:
    """Σ over parameters of |grad|² (one fused norm over all gradients, in fp32), before
    clipping; with ``clip_to`` > 0 the gradients are then scaled by
    min(1, clip_to / (|grad| + 1e-6)), as torch and DeepSpeed clip."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if all(g.dtype == torch.float32 for g in grads):
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    else:  # bf16/fp16 gradients: a norm in their dtype keeps 3 significant digits
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(list(norms)))
    if clip_to > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip_to, total)
    return float(total) ** 2


def finite_or_none(value: float | None) -> float | None:
    """A measurement for a point: NaN and ±inf (not measurable yet) become null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean training loss of the step over all workers' micro batches
    grad_norm: float | None  # global gradient norm before clipping
    b_simple: float | None  # gradient noise scale in tokens; None where not measured


class GradientStep:
    """One optimizer step of this worker over its micro batches: forward, backward, the
    global gradient norm, clipping and b_simple (module docstring). Every worker calls it for
    every step (it runs collectives); it keeps the running b_simple estimate."""

    def __init__(self, engine: Any, config: TrainConfig, layout: BatchLayout) -> None:
        self.engine = engine
        self.params = list(engine.module.parameters())
        self.dtype = DTYPES[config.precision]
        self.gas = layout.gradient_accumulation_steps
        self.world_size = layout.world_size
        self.measures = config.zero_stage == 0  # the global norm, before DeepSpeed's step
        # DeepSpeed clips under ZeRO 1–3, and under fp16 (it unscales, skips overflows)
        self.trainer_clips = self.measures and config.precision != "fp16"
        self.grad_clip = config.optimizer.grad_clip
        self.noise = None  # b_simple needs a smaller batch's gradient: ZeRO-0 only
        if config.zero_stage == 0 and (self.world_size > 1 or self.gas > 1):
            self.noise = GradientNoiseScale()
        # B_small: one worker's share of the batch, or on one worker one micro batch (tokens)
        if self.world_size > 1:
            self.b_small = layout.batch_size_tokens // self.world_size
        else:
            self.b_small = layout.micro_batch_tokens
        self.b_big = layout.batch_size_tokens

    def __call__(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        """``micro_batches``: the ``gas`` (inputs, targets) of this worker for this step."""
        engine, device = self.engine, self.engine.device
        loss_sum = 0.0
        small_sq = big_sq = None  # |g_small|², |g_big|²
        for micro, (x, y) in enumerate(micro_batches):
            loss = fp32_loss(engine, engine.module, x.to(device), y.to(device), self.dtype)
            loss_sum += float(loss.detach())
            boundary = micro == self.gas - 1
            # fp16: the gradients carry DeepSpeed's loss scale s (1 otherwise), norms s·|g|
            scale = float(getattr(engine.optimizer, "loss_scale", 1.0)) if self.measures else 1.0
            if boundary and self.noise is not None and self.world_size > 1:
                # this worker's gradient before the all-reduce, then the all-reduce by hand
                engine.enable_backward_allreduce = False
                engine.backward(loss)
                engine.enable_backward_allreduce = True
                own_sq = grad_sq_norm(self.params) / scale**2
                small_sq = mean_over_workers(own_sq, self.world_size, device)
                engine.allreduce_gradients()
            else:
                engine.backward(loss)
            if micro == 0 and self.noise is not None and self.world_size == 1 and self.gas > 1:
                # DeepSpeed scaled the loss by 1/gas: undo it for one micro batch's gradient
                small_sq = grad_sq_norm(self.params) * self.gas * self.gas / scale**2
            if boundary and self.measures:
                clip_to = self.grad_clip if self.trainer_clips else 0.0
                big_sq = grad_sq_norm(self.params, clip_to=clip_to) / scale**2
            engine.step()  # DeepSpeed updates at the accumulation boundary only
        loss_mean = mean_over_workers(loss_sum / self.gas, self.world_size, device)
        grad_norm: float | None
        if big_sq is not None:
            grad_norm = math.sqrt(big_sq)
        else:
            norm = engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        b_simple = None
        if (
            self.noise is not None
            and small_sq is not None
            and big_sq is not None
            and math.isfinite(small_sq + big_sq)  # not an fp16 overflow
        ):
            b_simple = finite_or_none(self.noise.update(small_sq, big_sq, self.b_small, self.b_big))
        return StepStats(loss_mean, grad_norm, b_simple)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    engine: Any, directory: Path, step: int, client_state: dict[str, Any], rank: int
) -> None:
    """Save this worker's shard as tag ``step<step>`` → barrier → rank 0 drops older tags.
    DeepSpeed writes ``latest`` naming the tag."""
    tag = f"step{step}"
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0:
        for old in directory.glob("step*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine: Any, directory: Path) -> dict[str, Any] | None:
    """Restore the engine (weights, optimizer state) from the latest tag in ``directory``;
    returns the client state saved with it, or None when there is no checkpoint."""
    if not (directory / "latest").is_file():
        return None
    _, client_state = engine.load_checkpoint(str(directory))
    return client_state
