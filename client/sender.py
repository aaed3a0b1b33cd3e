"""Points and a trial's outcome, sent to the service from a buffer in the background.

``BufferedSender`` is what a training loop's rank 0 talks to (the trainer's
``trainer.telemetry.ServiceTelemetry`` and the light client's ``hyperlaw.init`` run): ``start()``
marks the trial running, ``add_point(point)`` queues one loss-curve row, ``heartbeat()`` says
the run is alive, ``finish(status, **final)`` records the outcome and ``close(timeout_s)``
delivers everything still queued.

Points are buffered in memory and posted in batches by a background thread, which also sends
a heartbeat every ``heartbeat_interval_s``. A failed post
(service down, retries of the client exhausted) keeps the batch at the front of the buffer
and tries again later, so a short outage loses nothing; whatever still cannot be delivered
when the run closes is written to a spool file (:mod:`client.spool`: JSON lines, one point
per line) and logged; ``hyperlaw sync`` sends it later. Points are idempotent on (trial,
step) in the service, so a re-post never duplicates.
A batch the service refuses with a 4xx other than 429 is not retried and not spooled: sending it
again would get the same answer. It is dropped with one warning naming the trial and the
status; when the answer is about the trial rather than the batch (409: the trial is failed
or pruned, e.g. by the reaper; 404), no later point is posted either. A refused token (401,
403: revoked or expired mid-run) is about the caller, not the points: posting stops with one
warning, and every point from then on is kept and spooled when the run closes, for
``hyperlaw sync`` with a valid token.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client import spool

logger = logging.getLogger(__name__)


class BufferedSender:
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
        self.refused = 0  # points the service refused (4xx): dropped, neither retried nor spooled
        self.refused_status: int | None = None  # set once a refusal of the trial stops posting
        self.held_status: int | None = None  # set once a refused token stops posting (spooled)
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
            if self.refused_status is not None:  # the service takes no more points of the trial
                self.refused += 1
                return
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
        """Post everything buffered now; True when the buffer emptied within ``timeout_s``
        (False at once while a refused token holds the points back)."""
        deadline = time.monotonic() + timeout_s
        while self.held_status is None:
            if self._post_once():
                with self._lock:
                    if not self._buffer:
                        return True
                continue
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.retry_interval_s)
        return False

    def close(self, timeout_s: float = 60.0) -> bool:
        """Deliver what is queued, spool what cannot be; True when the service took every
        point (none spooled, none refused)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        delivered_all = self.flush(timeout_s=timeout_s)
        if not delivered_all:
            self._spool()
        return delivered_all and self.refused == 0

    # ---------------------------------------------------------------- background work
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.flush_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            if not self._post_once():
                self._stop.wait(self.retry_interval_s)
            if self.held_status is not None:
                continue  # a refused token would refuse the heartbeat too
            if time.monotonic() - self._last_heartbeat >= self.heartbeat_interval_s:
                self.heartbeat()

    def _post_once(self) -> bool:
        """Post one batch from the front of the buffer; False when the post failed (the batch
        stays queued). One post at a time (the background thread and ``flush`` share this)."""
        with self._post_lock:
            return self._post_front_batch()

    def _post_front_batch(self) -> bool:
        if self.held_status is not None:
            return False
        with self._lock:
            batch = [self._buffer[i] for i in range(min(self.batch_size, len(self._buffer)))]
        if not batch:
            return True
        try:
            self.client.post_points(self.trial_id, batch)
        except Exception as exc:  # noqa: BLE001 - any other failure keeps the batch for a retry
            if getattr(exc, "status_code", None) in _TOKEN_REFUSALS:
                self.held_status = int(getattr(exc, "status_code", 0))
                logger.warning(
                    "trial %s: the service refused the token (HTTP %d: %s); posting stops and "
                    "the points are kept for the spool (send them with `hyperlaw sync` and a "
                    "valid HYPERLAW_TOKEN)",
                    self.trial_id,
                    self.held_status,
                    getattr(exc, "detail", exc),
                )
                return False
            if _is_client_error(exc):
                self._drop_refused(batch, exc)
                return True
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

    def _drop_refused(self, batch: list[dict[str, Any]], exc: Exception) -> None:
        """The service answered ``batch`` (the front of the buffer) with a 4xx: drop it. When
        the answer concerns the trial, drop the rest of the buffer too and take no more."""
        status = int(getattr(exc, "status_code", 0))
        whole_trial = status not in _BATCH_REFUSALS
        with self._lock:
            for _ in batch:
                self._buffer.popleft()
            dropped = len(batch)
            if whole_trial:
                dropped += len(self._buffer)
                self._buffer.clear()
                self.refused_status = status
            self.refused += dropped
        steps = f"steps {batch[0].get('step')}..{batch[-1].get('step')}"
        after = "no more points of this trial are posted" if whole_trial else "later batches go on"
        logger.warning(
            "trial %s: the service refused points (%s) with HTTP %d: %s; %d points dropped, "
            "not retried and not spooled; %s",
            self.trial_id,
            steps,
            status,
            getattr(exc, "detail", exc),
            dropped,
            after,
        )

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
        spool.append(self.spool_path, self.trial_id, rest)
        logger.error(
            "trial %s: %d undelivered points written to %s (send them with `hyperlaw sync %s`)",
            self.trial_id,
            len(rest),
            self.spool_path,
            self.spool_path,
        )


#: 4xx answers about the batch itself (its body, size or values): the trial may still take
#: other batches. Any other 4xx is about the trial (failed or pruned, unknown, not allowed).
_BATCH_REFUSALS = frozenset({400, 413, 415, 422})
#: answers about the caller's token: the points are kept and spooled (module docstring)
_TOKEN_REFUSALS = frozenset({401, 403})


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
