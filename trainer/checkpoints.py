"""A run's checkpoints: where they are written and how a run comes back from one.

Every ``checkpoint_every`` steps each worker saves its DeepSpeed shard (tag ``step<N>``: the
module's weights, its ZeRO partition of the optimizer state, and the loop's state, step,
losses and EWA, as DeepSpeed's client state), then the workers meet at a barrier, then the
checkpoint is reported to Ray: save → barrier → report, so that a checkpoint that Ray knows
of is complete. Two places:

- ``DirectoryCheckpoints`` (``checkpoint_dir``; a sweep without ``storage``): every worker
  writes into one directory, which must be on a path that every node shares; rank 0 then
  drops the older tags. A run started again with the same directory resumes from its
  ``latest`` tag; a finished run deletes the directory.
- ``RayTrainCheckpoints`` (``ray_checkpoints``; a sweep with ``storage``): each worker saves
  into a local temporary directory and hands it to ``ray.train.report(metrics,
  checkpoint=...)``, which uploads it to the Ray Train run's storage (a shared path or an
  object store, ``trainer.storage``); Ray Train merges the workers' files into one checkpoint
  directory, ``trial-<id>-step<N>``, and registers it once every worker has reported; the
  workers go on once it is registered (``get_all_reported_checkpoints``, COMMITTED: the
  controller takes reports in at its polls, and a worker lost before the next one would take
  its report with it). A worker group that Ray Train starts again (a lost worker or node)
  gets the latest one from ``ray.train.get_checkpoint()``: each worker downloads it whole
  (ZeRO reads every rank's optimizer partition) and DeepSpeed loads it. One Ray Train run may
  train several runs one after the other (``runs_per_trial``): a run resumes only from a
  checkpoint that carries its own trial id, so the next run of a pack starts from step 0, not
  from the last checkpoint of the run before it. Ray Train keeps one checkpoint per Ray Train
  run (``CheckpointConfig(num_to_keep=1)``, set by ``trainer.sweep``), and the sweep deletes
  the Ray Train run's directory when its runs are done.

Outside a sweep, ``train`` takes a ``checkpoint_dir`` only.
"""

from __future__ import annotations

import logging
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from trainer.config import TrainConfig
from trainer.engine import load_checkpoint, save_checkpoint
from trainer.telemetry import RayProgress

logger = logging.getLogger(__name__)


class RunCheckpoints(Protocol):
    def load(self, engine: Any) -> dict[str, Any] | None:
        """Restore the engine from the run's latest checkpoint; its loop state, or None."""
        ...

    def save(
        self,
        engine: Any,
        state: dict[str, Any],
        rank: int,
        progress: RayProgress,
        metrics: dict[str, Any],
    ) -> None:
        """Save a checkpoint at ``state["step"]`` and report it (every worker calls it)."""
        ...

    def finish(self, rank: int) -> None:
        """The run is done: its checkpoints have no more use."""
        ...


def run_checkpoints(config: TrainConfig) -> RunCheckpoints | None:
    """Where ``config``'s run checkpoints, or None where it does not."""
    if config.ray_checkpoints:
        return RayTrainCheckpoints(config.trial_id)
    if config.checkpoint_dir:
        return DirectoryCheckpoints(Path(config.checkpoint_dir))
    return None


class DirectoryCheckpoints:
    """In one directory that every worker writes (module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, engine: Any) -> dict[str, Any] | None:
        return load_checkpoint(engine, self.directory)

    def save(
        self,
        engine: Any,
        state: dict[str, Any],
        rank: int,
        progress: RayProgress,
        metrics: dict[str, Any],
    ) -> None:
        step = int(state["step"])
        save_checkpoint(engine, self.directory, step, state, rank)  # returns after a barrier
        progress.report({**metrics, "checkpoint_step": step}, force=True)

    def finish(self, rank: int) -> None:
        if rank == 0:
            shutil.rmtree(self.directory, ignore_errors=True)


class RayTrainCheckpoints:
    """Through Ray Train's checkpoints, in its run's storage (module docstring)."""

    def __init__(self, trial_id: int | None) -> None:
        self.prefix = f"trial-{trial_id}-step"

    def load(self, engine: Any) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        name = posixpath.basename(checkpoint.path.rstrip("/"))
        if not name.startswith(self.prefix):
            return None  # the checkpoint of another run of this Ray Train run
        local = Path(tempfile.mkdtemp(prefix=f"hyperlaw-{name}-"))
        try:
            checkpoint.to_directory(str(local))
            state = load_checkpoint(engine, local)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        if state is None:
            raise RuntimeError(f"Ray Train's checkpoint {checkpoint.path} holds no DeepSpeed tag")
        logger.info("restored %s from Ray Train's storage", name)
        return state

    def save(
        self,
        engine: Any,
        state: dict[str, Any],
        rank: int,
        progress: RayProgress,
        metrics: dict[str, Any],
    ) -> None:
        import ray.train

        step = int(state["step"])
        local = Path(tempfile.mkdtemp(prefix=f"hyperlaw-{self.prefix}{step}-"))
        try:
            engine.save_checkpoint(str(local), tag=f"step{step}", client_state=state)
            dist.barrier()  # every shard saved before any worker reports
            has_files = any(p.is_file() for p in local.rglob("*"))  # ZeRO-0: rank 0's only
            progress.report(
                {**metrics, "checkpoint_step": step},
                force=True,
                checkpoint=ray.train.Checkpoint.from_directory(str(local)) if has_files else None,
                checkpoint_dir_name=f"{self.prefix}{step:08d}",
            )
        finally:
            shutil.rmtree(local, ignore_errors=True)  # uploaded: report returns after that
        # registered before the loop goes on (a worker lost before the controller's next poll
        # would take the report with it, and a restart would go back one checkpoint more)
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
        )

    def finish(self, rank: int) -> None:
        """Nothing here: Ray Train keeps one checkpoint and the sweep deletes it (module
        docstring); a worker deleting a checkpoint that Ray Train registered would break its
        bookkeeping."""
