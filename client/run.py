"""Log a run from your own training loop: ``hyperlaw.init``, ``run.log``, ``run.finish``.

>>> import hyperlaw
>>> run = hyperlaw.init(experiment="gpt-124m-sweep", family="web-en", n_params=85_000_000,
...                     n_tokens=2_500_000_000, seq_len=1024, learning_rate=6e-4,
...                     batch_size_tokens=524_288, config={"weight_decay": 0.1})
>>> run.log({"train_loss": 3.91, "lr": 6e-4, "mfu": 0.41}, step=100)
>>> run.finish(final_loss=3.28, tokens_done=2_500_000_000)

What the fit reads: ``n_params`` is N, the non-embedding parameters; ``n_tokens`` is D, the
run's token budget; ``learning_rate`` the peak η; ``batch_size_tokens`` the global batch in
tokens (sequences × seq_len × data-parallel ranks × accumulation). ``config`` is stored on
the trial as it is; its keys that are trial fields (``schedule``, ``weight_decay``,
``adam_beta1``, ``adam_beta2``, ``adam_eps``, ``grad_clip``, ``warmup_fraction``,
``parametrization``, ``zero_stage``, ``world_size``, ``seed``, ``model_shape``) also set them.

- **Idempotent.** The trial is got-or-created by ``key`` within the experiment (default
  ``$HYPERLAW_RUN_KEY``, else torchrun's ``$TORCHELASTIC_RUN_ID``, else a random one), so a
  job restarted with the same key logs into the same trial, and re-sent steps replace
  themselves.
- **In the background.** ``log`` only queues: a thread posts the points in batches with the
  client's retries and sends a heartbeat every 30 s (the service's reaper fails a trial whose
  heartbeats stop). What cannot be delivered when the run ends is spooled
  (:mod:`client.sender`, :mod:`client.spool`) for ``hyperlaw sync``.
- **Always finished.** Besides ``finish()``: at interpreter exit a run left open is finished
  as completed, after an uncaught exception as failed with the exception as the reason; as a
  context manager (``with hyperlaw.init(...) as run:``) likewise at the block's end.
- **Offline** (``offline=True`` or ``HYPERLAW_MODE=offline``): nothing is sent; the trial, its
  points and its outcome are written to ``spool_dir/<key>.jsonl`` (default
  ``$HYPERLAW_SPOOL_DIR``, else ``./hyperlaw-spool``) for ``hyperlaw sync`` later.
- **Distributed.** On a process whose ``$RANK`` is not 0, ``init`` returns a run that records
  nothing, so every rank can run the same three lines.

A metric key that is not one of the service's point columns (``tokens``, ``train_loss``,
``eval_loss``, ``ewa_eval_loss``, ``lr``, ``grad_norm``, ``b_simple``, ...) is sent as it is.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from client import spool
from client.rest import HyperlawClient
from client.sender import BufferedSender

log = logging.getLogger(__name__)

#: ``config`` keys that are also fields of the trial (``TrialCreate`` in the service)
TRIAL_FIELDS = frozenset(
    {
        "schedule",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_eps",
        "grad_clip",
        "warmup_fraction",
        "parametrization",
        "zero_stage",
        "world_size",
        "seed",
        "model_shape",
    }
)
_open_runs: weakref.WeakSet[Run] = weakref.WeakSet()


def init(
    *,
    experiment: str,
    n_params: int,
    n_tokens: int,
    seq_len: int,
    learning_rate: float,
    batch_size_tokens: int,
    family: str | None = None,
    config: Mapping[str, Any] | None = None,
    key: str | None = None,
    url: str | None = None,
    token: str | None = None,
    offline: bool | None = None,
    spool_dir: str | Path | None = None,
) -> Run:
    """Start (or resume, by ``key``) a trial and return its run (module docstring)."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        return Run(None, key="", offline=True, spool_path=None, enabled=False)
    key = key or os.environ.get("HYPERLAW_RUN_KEY") or _torchrun_id() or uuid.uuid4().hex
    config = dict(config or {})
    trial: dict[str, Any] = {
        "n_params": int(n_params),
        "n_tokens": int(n_tokens),
        "seq_len": int(seq_len),
        "learning_rate": float(learning_rate),
        "batch_size_tokens": int(batch_size_tokens),
        **{k: v for k, v in config.items() if k in TRIAL_FIELDS},
        "config": config,
        "idempotency_key": key,
    }
    if offline is None:
        offline = os.environ.get("HYPERLAW_MODE", "").strip().lower() == "offline"
    folder = Path(spool_dir or os.environ.get("HYPERLAW_SPOOL_DIR") or "hyperlaw-spool")
    spool_path = folder / f"{_safe(key)}{spool.SUFFIX}"
    if offline:
        create = {"experiment": experiment, "family": family, **trial}
        spool.append_records(spool_path, [{"create_trial": create}])
        log.info("hyperlaw: logging offline to %s (send it with `hyperlaw sync`)", spool_path)
        return Run(None, key=key, offline=True, spool_path=spool_path)
    client = HyperlawClient(url, token)
    exp = client.ensure_experiment(experiment, family=family)
    created = client.create_trial(experiment_id=exp["id"], **trial)
    run = Run(created["id"], key=key, offline=False, spool_path=spool_path, client=client)
    log.info("hyperlaw: logging to trial %s of %r at %s", created["id"], experiment, url or "")
    return run


class Run:
    """One trial being logged; made by :func:`init`."""

    def __init__(
        self,
        trial_id: int | None,
        *,
        key: str,
        offline: bool,
        spool_path: Path | None,
        client: HyperlawClient | None = None,
        enabled: bool = True,
    ) -> None:
        self.trial_id = trial_id
        self.key = key
        self.offline = offline
        self.spool_path = spool_path
        self.enabled = enabled
        self.finished = not enabled
        self._step = -1
        self._lock = threading.Lock()
        self._sender: BufferedSender | None = None
        if client is not None and trial_id is not None:
            self._sender = BufferedSender(lambda: client, trial_id, spool_path=spool_path)
            self._sender.start()
        if enabled:
            _open_runs.add(self)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Queue one point: ``metrics`` at ``step`` (default: the last step + 1)."""
        if self.finished:
            return
        with self._lock:
            self._step = self._step + 1 if step is None else int(step)
            point = {**metrics, "step": self._step}
        if self._sender is not None:
            self._sender.add_point(point)
        elif self.spool_path is not None:
            spool.append_records(self.spool_path, [{"trial_key": self.key, **point}])

    def finish(
        self,
        *,
        status: str = "completed",
        reason: str | None = None,
        final_loss: float | None = None,
        final_eval_loss: float | None = None,
        tokens_done: int | None = None,
        **fields: Any,
    ) -> None:
        """Record the outcome (``status`` completed, failed or pruned; ``reason`` for the last
        two) after every queued point; later calls do nothing."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
        outcome = {"status": status, **fields}
        for name, value in (
            ("status_reason", reason),
            ("final_loss", final_loss),
            ("final_eval_loss", final_eval_loss),
            ("tokens_done", tokens_done),
        ):
            if value is not None:
                outcome[name] = value
        if self._step >= 0:
            outcome.setdefault("steps_done", self._step)
        if self._sender is not None:
            self._sender.finish(**outcome)
            self._sender.close()
        elif self.spool_path is not None:
            finish = {"finish_trial": {"trial_key": self.key, **outcome}}
            spool.append_records(self.spool_path, [finish])
        _open_runs.discard(self)

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.finish()
        else:
            self.finish(status="failed", reason=_reason(exc))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _torchrun_id() -> str | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return run_id if run_id and run_id != "none" else None


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:120]


_last_exception: list[BaseException] = []
_previous_hook = sys.excepthook


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    _last_exception.append(exc)
    _previous_hook(kind, exc, tb)


@atexit.register
def _finish_open_runs() -> None:
    """At exit: every run still open is finished, failed if an exception ended the program."""
    for run in list(_open_runs):
        if _last_exception:
            run.finish(status="failed", reason=_reason(_last_exception[-1]))
        else:
            run.finish()


sys.excepthook = _excepthook
