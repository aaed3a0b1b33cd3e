"""Where a training run sends what it measures.

``TelemetrySink`` is the interface the training loop talks to (rank 0 only):
``start()`` marks the trial running, ``add_point(point)`` queues one loss-curve row,
``heartbeat()`` says the run is alive, ``finish(status, **final)`` records the outcome and
``close(timeout_s)`` delivers everything still queued.

``ServiceTelemetry`` backs it with the hyperlaw service: the client's buffered sender
(:class:`client.sender.BufferedSender`: batches posted in the background, a short outage
survived, what cannot be delivered spooled for ``hyperlaw sync``, refusals not retried).

``NullTelemetry`` discards everything (benchmarks).

``RayProgress`` is what a run shows Ray in a sweep: its reports to Ray Tune and its gauges on
the Ray dashboard.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from client.sender import BufferedSender

logger = logging.getLogger(__name__)

# Ray Train's controller polls workers every 2 s by default; a sweep's local cluster polls
# every 0.25 s (trainer.ray_cluster.RAY_TRAIN_POLL_S). Reports denser than the poll stall training.
REPORT_INTERVAL_S = 0.5


class TelemetrySink(Protocol):
    def start(self) -> None: ...
    def add_point(self, point: dict[str, Any]) -> None: ...
    def heartbeat(self) -> None: ...
    def flush(self, timeout_s: float = 60.0) -> bool: ...
    def finish(self, status: str, **final: Any) -> None: ...
    def close(self, timeout_s: float = 60.0) -> bool: ...


class NullTelemetry:
    """Discards everything."""

    def start(self) -> None:
        pass

    def add_point(self, point: dict[str, Any]) -> None:
        pass

    def heartbeat(self) -> None:
        pass

    def flush(self, timeout_s: float = 60.0) -> bool:
        return True

    def finish(self, status: str, **final: Any) -> None:
        pass

    def close(self, timeout_s: float = 60.0) -> bool:
        return True


#: the trainer's sink of a trial in the service (module docstring)
ServiceTelemetry = BufferedSender


class RayProgress:
    """What a run shows Ray: ``report(metrics)`` (``ray.train.report``) on every worker, at
    most every REPORT_INTERVAL_S (Ray Train drains one report per controller poll, so denser
    reports would stall training), and on rank 0 the trial's gauges on the Ray dashboard
    (Metrics tab). Every report names the run's service trial (``hyperlaw_trial_id``: one Tune
    trial may train several runs). Without ``report`` (outside Ray) it does nothing."""

    def __init__(
        self,
        report: Callable[..., None] | None,
        rank: int,
        world_size: int,
        device: torch.device,
        trial_id: int | None,
    ) -> None:
        self._report = report
        self.world_size, self.device = world_size, device
        self.trial_id = trial_id
        self.tags = {"trial_id": str(trial_id)}
        self.gauges = self._gauges() if report is not None and rank == 0 else {}
        self.last_report = -math.inf  # time.monotonic() of the last report

    @staticmethod
    def _gauges() -> dict[str, Any]:
        import ray
        from ray.util.metrics import Gauge

        if not ray.is_initialized():
            return {}
        keys = ("trial_id",)
        return {
            "train_loss": Gauge("hyperlaw_train_loss", "training loss of a trial", tag_keys=keys),
            "eval_loss": Gauge("hyperlaw_eval_loss", "evaluation loss of a trial", tag_keys=keys),
            "tokens_per_s": Gauge(
                "hyperlaw_tokens_per_s", "training throughput of a trial", tag_keys=keys
            ),
            "step": Gauge("hyperlaw_step", "optimizer steps done by a trial", tag_keys=keys),
        }

    def set_gauges(self, metrics: dict[str, Any]) -> None:
        for name, gauge in self.gauges.items():
            value = metrics.get(name)
            if value is not None and math.isfinite(float(value)):
                gauge.set(float(value), tags=self.tags)

    def report(self, metrics: dict[str, Any], force: bool = False, **checkpoint: Any) -> None:
        """Rank 0 decides for all workers whether a report is due, so that every worker
        reports the same sequence (a collective: every worker must call it). ``checkpoint``:
        ``ray.train.report``'s checkpoint arguments (``trainer.checkpoints``)."""
        if self._report is None:
            return
        due = force or time.monotonic() - self.last_report >= REPORT_INTERVAL_S
        flag = torch.tensor([1 if due else 0], device=self.device)  # NCCL: device tensors only
        if self.world_size > 1:
            dist.broadcast(flag, src=0)
        if flag.item():
            self.last_report = time.monotonic()
            self._report({**metrics, "hyperlaw_trial_id": self.trial_id}, **checkpoint)
