"""The progress of a sweep in its log: a Ray Tune callback of the driver (``trainer.sweep``).

One line when a Tune trial starts, when a run finishes and when a trial fails: runs done (and
skipped: completed before), Tune trials running and failed, and the best final evaluation loss
so far with its learning rate, batch size and service trial, e.g. ``sweep progress: 5/12 runs
done (2 skipped), 2 trials running, 0 failed; best final_eval_loss 0.2513 (lr=0.03, B=64,
trial 17)``. A Tune trial trains ``runs_per_trial`` runs; each report of a finished run names
its service trial (``hyperlaw_trial_id``). A ``cbs:`` sweep raises ``total`` once the runs of
its relative η grids are registered.
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger("trainer.sweep")  # the sweep's own lines


def progress_callback(total: int, skipped: int) -> Any:
    """The sweep's ``SweepProgress``: ``total`` runs to train, ``skipped`` already done."""
    from ray import tune

    class SweepProgress(tune.Callback):
        """Logs runs done, Tune trials running and failed, and the best final evaluation loss
        so far (a Tune trial trains ``runs_per_trial`` runs)."""

        def __init__(self) -> None:
            self.total, self.skipped = total, skipped  # a cbs: sweep adds its relative runs
            self.done = self.failed = 0
            self.running: set[str] = set()
            self.best: tuple[float, str] | None = None

        def _log(self) -> None:
            best = (
                f"best final_eval_loss {self.best[0]:.5g} ({self.best[1]})"
                if self.best
                else "no result yet"
            )
            logger.info(
                "sweep progress: %d/%d runs done (%d skipped), %d trials running, %d failed; %s",
                self.done + self.skipped,
                self.total + self.skipped,
                self.skipped,
                len(self.running),
                self.failed,
                best,
            )

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._log()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not result.get("finished"):
                return
            self.done += 1
            loss = result.get("final_eval_loss")
            spec = next(
                s for s in trial.config["specs"] if s["trial_id"] == result["hyperlaw_trial_id"]
            )
            if (
                loss is not None
                and math.isfinite(loss)
                and (self.best is None or loss < self.best[0])
            ):
                where = f"lr={spec['learning_rate']:.4g}, B={spec['batch_size_tokens']}"
                self.best = (loss, f"{where}, trial {spec['trial_id']}")
            self._log()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.failed += 1
            self._log()

    return SweepProgress()
