"""Hooks that tests pass to ``train(on_step=...)`` and ``run_sweep(on_step=...)``.

A hook travels to Ray's workers pickled with Ray's cloudpickle: tests that give one to a
sweep register this module to be pickled by value (``ray.cloudpickle.register_pickle_by_value``),
so that a worker need not import ``tests``. A worker that Ray Train restarts starts afresh,
so whatever a hook must remember lives in a file.
"""

import os
import signal
from dataclasses import dataclass
from pathlib import Path


class InjectedFailure(RuntimeError):
    """The failure a test asked for."""


@dataclass(frozen=True)
class FailOnce:
    """Fails every worker after optimizer step ``step``, once: rank 0 leaves ``marker``
    behind, and a run that finds it (the restarted or resumed one) goes on."""

    step: int
    marker: str

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or Path(self.marker).exists():
            return
        if rank == 0:
            Path(self.marker).touch()
        raise InjectedFailure(f"injected failure after step {step}")


@dataclass(frozen=True)
class KillOnce:
    """Kills the worker of rank ``rank`` with SIGKILL after optimizer step ``step``, once (the
    way an out-of-memory killer or a lost node ends a process: no exception, no cleanup).
    It leaves ``marker`` behind first, so that the restarted run goes on."""

    step: int
    marker: str
    rank: int = 1

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank or Path(self.marker).exists():
            return
        Path(self.marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
