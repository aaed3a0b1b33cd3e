"""What changes with the step: the learning rate, when to evaluate, and the weight average.

Schedules (multiplier of the peak learning rate η after a linear warmup over
⌈warmup_fraction · steps⌉ steps):
  * ``constant_ewa``: 1; evaluation uses the exponential weight average ``EWA``
    ξ_{t+1} = τ·ξ_t + (1 − τ)·θ_{t+1} (Zhang et al. 2024, τ = ``ewa_decay``), started at
    ξ_0 = 0 and debiased as ξ_t / (1 − τ^t) (as Adam debiases its moments), so that short runs
    are not dragged towards the initial weights;
  * ``wsd``: 1, then linear decay to ``min_lr_ratio`` over the last ``decay_fraction``;
  * ``cosine``: min + (1 − min)·(1 + cos(π·progress))/2 after warmup.

Evaluation (Zhang et al. 2024, appendix G, hybrid schedule): after step 0, at every power of
two, every ``eval.every`` steps, and at 0.70·n, 0.75·n, …, n over the last 30 % (continued
at that spacing up to the cap of a run to a target loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from trainer.config import EvalConfig, ScheduleConfig


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


def evaluation_steps(
    total_steps: int, eval_config: EvalConfig, until: int | None = None
) -> set[int]:
    """Step counts after which the model is evaluated: 0, powers of two, multiples of
    ``every`` and the dense tail 0.70·n, 0.75·n, … of the horizon n = ``total_steps``,
    always including n. A run that may train beyond its horizon, up to ``until`` steps (a run
    to a target loss, capped at a multiple of its budget), keeps the dense tail's spacing
    up to ``until``: wherever its loss crosses the target after 0.70·n, the two
    evaluations around the crossing are at most ``dense_interval_fraction``·n steps apart."""
    last = total_steps if until is None else max(until, total_steps)
    steps = {0, total_steps, last}
    power = 1
    while power <= last:
        steps.add(power)
        power *= 2
    steps.update(range(eval_config.every, last + 1, eval_config.every))
    fraction = eval_config.dense_start_fraction
    while fraction * total_steps < last + 0.5:
        steps.add(min(last, max(1, round(fraction * total_steps))))
        fraction += eval_config.dense_interval_fraction
    return steps


class EWA:
    """Exponential weight average of ``params`` (module docstring), in fp32 on their device.

    ``update()`` after each optimizer step; ``weights()`` are the debiased average;
    ``with ewa.swapped_in():`` the parameters hold those weights inside the block (to evaluate
    them) and their own again after it; ``state_dict()`` / ``load_state_dict()`` carry it
    through a checkpoint. Needs the full parameters on every worker (ZeRO stage ≤ 2).
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay  # τ per optimizer step
        self.average = [torch.zeros_like(p, dtype=torch.float32) for p in params]  # ξ_t
        self.count = 0  # t: updates folded in

    @torch.no_grad()
    def update(self) -> None:
        """ξ ← τ·ξ + (1 − τ)·θ = lerp(ξ, θ, 1 − τ), one fused op over all parameters; bf16 or
        fp16 parameters are folded into the fp32 average as fp32 (``float()`` of an fp32
        tensor is the tensor itself: no copy)."""
        params = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.average, params, 1.0 - self.decay)
        self.count += 1

    def weights(self) -> list[torch.Tensor]:
        """Debiased ξ_t / (1 − τ^t); the current weights before the first update."""
        if self.count == 0:
            return [p.detach().float() for p in self.params]
        scale = 1.0 / (1.0 - self.decay**self.count)
        return [a * scale for a in self.average]

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, w in zip(self.params, self.weights(), strict=True):
                p.copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"ewa": self.average, "ewa_count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = [t.float() for t in state["ewa"]]
        self.count = int(state["ewa_count"])
