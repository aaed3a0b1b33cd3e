"""PyTorch Lightning: ``HyperlawLogger`` logs a ``Trainer.fit`` to hyperlaw.

>>> from client.integrations.lightning import HyperlawLogger
>>> trainer = Trainer(max_steps=10_000, logger=HyperlawLogger(experiment="gpt-sweep",
...                                                           seq_len=1024))

It subclasses ``lightning.pytorch.loggers.Logger`` (``pip install lightning``), else, where
only the older package is installed, ``pytorch_lightning.loggers.Logger`` (``pip install
pytorch-lightning``); either package's ``Trainer`` takes it.

What it reads. Each number comes from the first that has it: the logger's argument, the
hyperparameters Lightning logs (``self.save_hyperparameters()`` of the module and the data
module), then the fit itself:

- N: argument or hparam ``n_params``; else counted from the LightningModule
  (:func:`client.integrations.common.non_embedding_params`).
- η: ``learning_rate``, hparam ``learning_rate`` or ``lr``; else the largest ``initial_lr``
  (the scheduler's base) or ``lr`` among the first optimizer's parameter groups.
- seq_len: argument or hparam ``seq_len``; asked for (nothing in a fit says it).
- B, tokens: ``batch_size_tokens`` (argument or hparam); else ``batch_size`` (sequences per
  device and step: argument, hparam, or the train DataLoader's ``batch_size``) × seq_len ×
  ``trainer.accumulate_grad_batches`` × ``trainer.world_size``.
- D: ``n_tokens`` (argument or hparam); else B × the planned optimizer steps
  (``trainer.max_steps``, or ``trainer.estimated_stepping_batches`` from the epochs).
- Trial fields: ``weight_decay``, ``adam_beta1``/``adam_beta2`` (``betas``) and ``adam_eps``
  from the first optimizer group, ``grad_clip`` from ``gradient_clip_val``, ``world_size``;
  the hparams, made JSON, under the trial's ``config["hparams"]``.

The run starts when all five are known: at ``log_graph`` (which Lightning calls with the
module at the start of each fit, after the optimizers exist) when they need no data, else at
the first ``log_metrics`` (the DataLoader is loaded then). A number nothing gives raises a
``ValueError`` that says how to give it. Only a fit is logged (not ``validate``/``test``),
and only on global rank 0 (``rank_zero_only``).

``log_metrics(metrics, step)``: Lightning logs the loss of the k-th optimizer step at step
k − 1; hyperlaw counts optimizer steps done (as the trainer and transformers do), so a point
is at Lightning's step + 1, with ``tokens`` = that × B. ``loss`` and ``train_loss`` →
train_loss; ``val_loss``, ``validation_loss`` and ``eval_loss`` → eval_loss;
``learning_rate``, ``lr`` and LearningRateMonitor's ``lr-<Optimizer>`` → lr; ``grad_norm``;
a ``<name>_step`` key (``self.log(on_step=True, on_epoch=True)``) as ``<name>``;
``metric_names`` adds renames. Other keys (``epoch``, ...) are sent as extras
(``common.SEND_EXTRAS``).

``finalize(status)``: "success" finishes the run as completed with the last losses,
``steps_done`` and ``tokens_done``; "failed" (an exception in the fit) as failed, the
exception as the reason. Lightning's "finished" (a SLURM requeue signal) leaves the run
open, so that the requeued job, started with the same ``key``, goes on in the same trial.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.integrations.common import (
    PointMapper,
    jsonable,
    missing,
    non_embedding_params,
    reason_of,
    tokens_at,
)
from client.run import Run, init


def _lightning() -> tuple[Any, Any]:
    """``Logger`` and ``rank_zero_only`` of ``lightning``, else of ``pytorch_lightning``."""
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            loggers = importlib.import_module(f"{package}.loggers")
            utilities = importlib.import_module(f"{package}.utilities")
        except ImportError:
            continue
        return loggers.Logger, utilities.rank_zero_only
    raise ImportError(
        "client.integrations.lightning needs PyTorch Lightning: pip install lightning "
        "(or pip install pytorch-lightning)"
    )


if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.utilities import rank_zero_only
else:
    Logger, rank_zero_only = _lightning()

log = logging.getLogger(__name__)

#: ``log_metrics`` keys renamed to the service's point columns
RENAMES = {
    "loss": "train_loss",
    "val_loss": "eval_loss",
    "validation_loss": "eval_loss",
    "learning_rate": "lr",
}


class HyperlawLogger(Logger):
    """Log a Lightning fit to hyperlaw (module docstring). ``experiment``, ``family``,
    ``config`` (merged over what is derived), ``key``, ``url``, ``token``, ``offline`` and
    ``spool_dir`` are ``hyperlaw.init``'s."""

    def __init__(
        self,
        experiment: str,
        *,
        seq_len: int | None = None,
        family: str | None = None,
        n_params: int | None = None,
        n_tokens: int | None = None,
        learning_rate: float | None = None,
        batch_size_tokens: int | None = None,
        batch_size: int | None = None,
        metric_names: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        key: str | None = None,
        url: str | None = None,
        token: str | None = None,
        offline: bool | None = None,
        spool_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.experiment_name = experiment
        self.given: dict[str, Any] = {
            "n_params": n_params,
            "n_tokens": n_tokens,
            "seq_len": seq_len,
            "learning_rate": learning_rate,
            "batch_size_tokens": batch_size_tokens,
            "batch_size": batch_size,
        }
        self.user_config = dict(config or {})
        self.key = key
        self.init_kwargs: dict[str, Any] = {
            "family": family,
            "key": key,
            "url": url,
            "token": token,
            "offline": offline,
            "spool_dir": spool_dir,
        }
        self.hparams: dict[str, Any] = {}
        self.points = PointMapper({**RENAMES, **dict(metric_names or {})})
        self.run: Run | None = None
        self.shape: dict[str, Any] = {}
        self._module: Any = None
        self._last_step = 0

    @property
    def name(self) -> str:
        return self.experiment_name

    @property
    def version(self) -> str:
        return self.key or ""  # Lightning's checkpoints: <save_dir>/<name>/<version>/

    # -- what the run is -------------------------------------------------------------------

    def _trainer(self) -> Any:
        return getattr(self._module, "_trainer", None)

    def derive(self) -> dict[str, Any]:
        """N, D, seq_len, η and B (module docstring); ``ValueError`` for a number that
        nothing gives."""

        def first(*names: str) -> Any:
            for name in names:
                if self.given.get(name) is not None:
                    return self.given[name]
            return next((self.hparams[n] for n in names if self.hparams.get(n) is not None), None)

        trainer = self._trainer()
        shape: dict[str, Any] = {
            "n_params": first("n_params"),
            "n_tokens": first("n_tokens"),
            "seq_len": first("seq_len"),
            "learning_rate": first("learning_rate", "lr"),
            "batch_size_tokens": first("batch_size_tokens"),
        }
        if shape["n_params"] is None and self._module is not None:
            shape["n_params"] = non_embedding_params(self._module)
        groups = _param_groups(trainer)
        if shape["learning_rate"] is None and groups:
            shape["learning_rate"] = max(float(g.get("initial_lr", g["lr"])) for g in groups)
        batch_size = first("batch_size")
        if batch_size is None and trainer is not None:
            batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        if shape["batch_size_tokens"] is None and batch_size and shape["seq_len"]:
            per_step = 1
            if trainer is not None:
                per_step = int(trainer.accumulate_grad_batches) * int(trainer.world_size)
            shape["batch_size_tokens"] = int(batch_size) * int(shape["seq_len"]) * per_step
        if shape["n_tokens"] is None and shape["batch_size_tokens"] and trainer is not None:
            steps = trainer.max_steps
            if steps is None or steps < 0:
                steps = trainer.estimated_stepping_batches
            if math.isfinite(steps) and steps > 0:
                shape["n_tokens"] = int(steps) * int(shape["batch_size_tokens"])
        missing(
            shape,
            {
                "n_params": "pass n_params= (or hparam n_params); the module is counted only "
                "when Lightning logs hyperparameters",
                "n_tokens": "pass n_tokens= (or hparam n_tokens), or give the Trainer max_steps",
                "seq_len": "pass seq_len= (or hparam seq_len): the tokens in each sequence",
                "learning_rate": "pass learning_rate= (or hparam learning_rate or lr)",
                "batch_size_tokens": "pass batch_size= (sequences per device and step) or "
                "batch_size_tokens= (or the same hparams)",
            },
            "lightning",
        )
        return shape

    def trial_config(self) -> dict[str, Any]:
        trainer = self._trainer()
        fields: dict[str, Any] = {}
        groups = _param_groups(trainer)
        if groups:
            group = groups[0]
            if "weight_decay" in group:
                fields["weight_decay"] = float(group["weight_decay"])
            betas = group.get("betas")
            if isinstance(betas, (tuple, list)) and len(betas) == 2:
                fields["adam_beta1"], fields["adam_beta2"] = float(betas[0]), float(betas[1])
            if group.get("eps"):
                fields["adam_eps"] = float(group["eps"])
        if trainer is not None:
            fields["world_size"] = int(trainer.world_size)
            if trainer.gradient_clip_val:
                fields["grad_clip"] = float(trainer.gradient_clip_val)
        return {**fields, "trainer": "lightning", "hparams": jsonable(self.hparams)}

    def _fitting(self) -> bool:
        trainer = self._trainer()
        return trainer is None or trainer.state.fn == "fit"

    def _start(self) -> Run | None:
        """The run, started now if it has not been and the fit allows (module docstring)."""
        if self.run is None and self._fitting():
            self.shape = self.derive()
            config = {**self.trial_config(), **self.user_config}
            self.run = init(
                experiment=self.experiment_name, config=config, **self.shape, **self.init_kwargs
            )
        return self.run

    # -- Lightning's calls -----------------------------------------------------------------

    @rank_zero_only
    def log_hyperparams(
        self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        self.hparams.update(vars(params) if isinstance(params, Namespace) else dict(params))

    @rank_zero_only
    def log_graph(self, model: Any, input_array: Any = None) -> None:
        self._module = model
        if self.run is None and self._fitting():
            try:
                self._start()
            except ValueError:  # a number the data gives: at the first log_metrics
                pass

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        run = self._start()
        if run is None or run.finished:
            return
        point = self.points({_column_key(k): v for k, v in metrics.items()})
        if point:
            self._last_step = self._last_step if step is None else int(step) + 1
            point["tokens"] = tokens_at(self._last_step, self.shape["batch_size_tokens"])
            run.log(self.points.at_step(self._last_step, point), step=self._last_step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if status not in ("success", "failed"):
            return  # "finished": a SLURM requeue (module docstring)
        if status == "failed":
            exc = sys.exc_info()[1]
            reason = reason_of(exc) if exc is not None else "the Lightning fit failed"
            try:
                run = self._start()
            except Exception:  # the fit's own exception is the one to see
                log.warning("hyperlaw: the failed fit is not recorded", exc_info=True)
                return
            if run is not None:
                run.finish(status="failed", reason=reason, **self._final())
            return
        run = self._start() if self._trainer() is not None and self._fitting() else self.run
        if run is not None:
            run.finish(**self._final())

    def _final(self) -> dict[str, Any]:
        trainer = self._trainer()
        steps = int(trainer.global_step) if trainer is not None else self._last_step
        final: dict[str, Any] = {
            "final_loss": self.points.last.get("train_loss"),
            "final_eval_loss": self.points.last.get("eval_loss"),
            "steps_done": steps,
        }
        if self.shape.get("batch_size_tokens"):
            final["tokens_done"] = tokens_at(steps, self.shape["batch_size_tokens"])
        return final


def _column_key(key: str) -> str:
    """LearningRateMonitor's ``lr-<Optimizer>`` as ``lr``; ``<name>_step`` (``self.log`` with
    ``on_step`` and ``on_epoch``) as ``<name>``, its ``<name>_epoch`` mean left as it is."""
    if key.startswith("lr-"):
        return "lr"
    return key[: -len("_step")] if key.endswith("_step") else key


def _param_groups(trainer: Any) -> list[dict[str, Any]]:
    optimizers = getattr(trainer, "optimizers", None) or []
    return list(optimizers[0].param_groups) if optimizers else []
