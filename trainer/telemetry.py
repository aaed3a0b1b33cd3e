"""Where a training run sends what it measures.

``TelemetrySink`` is the interface the training loop talks to (rank 0 only):
``start()`` marks the trial running, ``add_point(point)`` queues one loss-curve row,
``heartbeat()`` says the run is alive, ``finish(status, **final)`` records the outcome and
``close(timeout_s)`` delivers everything still queued.

``ServiceTelemetry`` backs it with the hyperlaw service (``client.HyperlawClient``):
points are buffered in memory and posted in batches by a background thread. A failed post
(service down, retries of the client exhausted) keeps the batch at the front of the buffer
and tries again later, so a short outage loses nothing; whatever still cannot be delivered
when the run closes is written to a JSON-lines spool file (one point per line) and logged.
Points are idempotent on (trial, step) in the service, so a re-post never duplicates.

``NullTelemetry`` discards everything (benchmarks).

``RayProgress`` is what a run shows Ray in a sweep: its reports to Ray Tune and its gauges on
the Ray dashboard.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Ray Train's controller polls workers every 2 s by default; a sweep's local cluster polls
# every 0.25 s (trainer.sweep.RAY_TRAIN_POLL_S). Reports denser than the poll stall training.
REPORT_INTERVAL_S = 0.5


class TelemetrySink(Protocol):
    def start(self) -> None: ...
    def add_point(self, point: dict[str, Any]) -> None: ...
    def heartbeat(self) -> None: ...
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

    def finish(self, status: str, **final: Any) -> None:
        pass

    def close(self, timeout_s: float = 60.0) -> bool:
        return True


class ServiceTelemetry:
    """Buffered, retrying telemetry for one trial of the service.

    ``client_factory`` builds a ``HyperlawClient`` (called once, in the constructor).
    Thread-safe: ``add_point`` and ``heartbeat`` may be called from any thread.
    """

    def __init__(
        self,
        client_factory: Callable[[], Any],
        trial_id: int,
        *,
        batch_size: int = 1000,
        flush_interval_s: float = 2.0,
        heartbeat_interval_s: float = 30.0,
        retry_interval_s: float = 2.0,
        spool_path: str | Path | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0 (got {batch_size})")
        self.client = client_factory()
        self.trial_id = int(trial_id)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.retry_interval_s = retry_interval_s
        self.spool_path = Path(spool_path) if spool_path else None
        self._buffer: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()  # guards the buffer
        self._post_lock = threading.Lock()  # one post in flight
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_heartbeat = 0.0
        self.delivered = 0  # points accepted by the service
        self.failed_posts = 0  # posts that raised and were retried
        self._thread = threading.Thread(
            target=self._run, name=f"telemetry-trial-{trial_id}", daemon=True
        )
        self._thread.start()

    # ---------------------------------------------------------------- called by the trainer
    def start(self) -> None:
        self._call_with_retry(
            "mark running", self.client.update_trial, self.trial_id, status="running"
        )
        self.heartbeat()

    def add_point(self, point: dict[str, Any]) -> None:
        with self._lock:
            self._buffer.append(dict(point))
            full = len(self._buffer) >= self.batch_size
        if full:
            self._wake.set()

    def heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()
        self._call_with_retry("heartbeat", self.client.heartbeat, self.trial_id, attempts=1)

    def finish(self, status: str, **final: Any) -> None:
        """Deliver the buffered points first, then the final status and metrics (so that a
        completed trial never lacks the end of its curve)."""
        self.flush(timeout_s=120.0)
        fields = {k: _finite_or_none_for_counts(k, v) for k, v in final.items()}
        self._call_with_retry(
            f"mark {status}", self.client.update_trial, self.trial_id, status=status, **fields
        )

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Post everything buffered now; True when the buffer emptied within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._post_once():
                with self._lock:
                    if not self._buffer:
                        return True
                continue
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.retry_interval_s)

    def close(self, timeout_s: float = 60.0) -> bool:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        delivered_all = self.flush(timeout_s=timeout_s)
        if not delivered_all:
            self._spool()
        return delivered_all

    # ---------------------------------------------------------------- background work
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.flush_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            if not self._post_once():
                self._stop.wait(self.retry_interval_s)
            if time.monotonic() - self._last_heartbeat >= self.heartbeat_interval_s:
                self.heartbeat()

    def _post_once(self) -> bool:
        """Post one batch from the front of the buffer; False when the post failed (the batch
        stays queued). One post at a time (the background thread and ``flush`` share this)."""
        with self._post_lock:
            return self._post_front_batch()

    def _post_front_batch(self) -> bool:
        with self._lock:
            batch = [self._buffer[i] for i in range(min(self.batch_size, len(self._buffer)))]
        if not batch:
            return True
        try:
            self.client.post_points(self.trial_id, batch)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the batch for a retry
            self.failed_posts += 1
            logger.warning(
                "trial %s: posting %d points failed, will retry: %s", self.trial_id, len(batch), exc
            )
            return False
        with self._lock:
            for _ in batch:
                self._buffer.popleft()
            self.delivered += len(batch)
        return True

    def _call_with_retry(
        self, what: str, fn: Callable[..., Any], *args: Any, attempts: int = 5, **kwargs: Any
    ) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - logged; the run goes on
                if _is_client_error(exc) or attempt == attempts:
                    logger.warning("trial %s: %s failed: %s", self.trial_id, what, exc)
                    return None
                time.sleep(self.retry_interval_s * attempt)
        return None

    def _spool(self) -> None:
        with self._lock:
            rest = list(self._buffer)
        if not rest:
            return
        if self.spool_path is None:
            logger.error(
                "trial %s: %d points could not be delivered and no spool file is configured",
                self.trial_id,
                len(rest),
            )
            return
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spool_path.open("a") as fh:
            for point in rest:
                fh.write(json.dumps({"trial_id": self.trial_id, **point}) + "\n")
        logger.error(
            "trial %s: %d undelivered points written to %s",
            self.trial_id,
            len(rest),
            self.spool_path,
        )


def _is_client_error(exc: Exception) -> bool:
    """A 4xx answer other than 429 will not succeed on retry."""
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status != 429


def _finite_or_none_for_counts(key: str, value: Any) -> Any:
    """Counts must be integers; losses keep NaN/inf (the client encodes them)."""
    if key in ("steps_done", "tokens_done") and value is not None:
        return int(value)
    if isinstance(value, float) and key == "diverged":
        return bool(value)
    if (
        isinstance(value, float)
        and math.isnan(value)
        and key not in ("final_loss", "final_eval_loss")
    ):
        return None
    return value


class RayProgress:
    """What a run shows Ray: ``report(metrics)`` (``ray.train.report``) on every worker, at
    most every REPORT_INTERVAL_S (Ray Train drains one report per controller poll, so denser
    reports would stall training), and on rank 0 the trial's gauges on the Ray dashboard
    (Metrics tab). Every report names the run's service trial (``hyperlaw_trial_id``: one Tune
    trial may train several runs). Without ``report`` (outside Ray) it does nothing."""

    def __init__(
        self,
        report: Callable[[dict[str, Any]], None] | None,
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

    def report(self, metrics: dict[str, Any], force: bool = False) -> None:
        """Rank 0 decides for all workers whether a report is due, so that every worker
        reports the same sequence (a collective: every worker must call it)."""
        if self._report is None:
            return
        due = force or time.monotonic() - self.last_report >= REPORT_INTERVAL_S
        flag = torch.tensor([1 if due else 0], device=self.device)  # NCCL: device tensors only
        if self.world_size > 1:
            dist.broadcast(flag, src=0)
        if flag.item():
            self.last_report = time.monotonic()
            self._report({**metrics, "hyperlaw_trial_id": self.trial_id})
