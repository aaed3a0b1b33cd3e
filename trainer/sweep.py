"""``hyperlaw sweep``: a Ray Tune experiment whose trials are Ray Train TorchTrainers.

Flow: read the YAML (``trainer.sweep_config``) → expand it into training configs and register
the experiment with one queued trial per run in the service (``trainer.plan``; repeatable, and
``resume`` skips what is finished) → run a Tune function trainable per run (``_trial_driver``)
that builds a TorchTrainer of ``workers_per_trial`` DeepSpeed workers (``_ray_worker``, which
calls ``trainer.train.train``; gloo on CPU, NCCL on GPUs, chosen by Ray Train) → each worker's
rank 0 streams points and the final metrics to the service; Ray Train restarts a failed
worker group from its last checkpoint up to ``max_failures`` times, and a trial whose training
still fails is marked failed (stop reason ``failed``).

Nothing reaches a worker but its config: ``run_sweep`` hands each trial driver its training
config and the run settings through Tune's ``param_space``, and the driver hands the workers
theirs through the TorchTrainer's ``train_loop_config``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import HyperlawClient
from trainer.plan import register_trials
from trainer.sweep_config import SweepConfig

logger = logging.getLogger(__name__)


@dataclass
class SweepSummary:
    experiment_id: int
    completed: int = 0
    failed: int = 0
    skipped: int = 0
    diverged: int = 0
    trial_ids: list[int] = field(default_factory=list)
    best: dict[str, Any] | None = None  # lowest final_eval_loss over the sweep's trials
    wall_time_s: float = 0.0

    def best_description(self) -> str:
        if not self.best:
            return "none"
        return (
            f"final_eval_loss={self.best['final_eval_loss']:.5g} at "
            f"learning_rate={self.best['learning_rate']:.4g}, "
            f"batch_size_tokens={self.best['batch_size_tokens']} (trial {self.best['id']})"
        )


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker function of the TorchTrainer: one DeepSpeed worker of one trial.
    ``loop_config`` is the training config plus ``on_step``, the hook that tests use to
    inject failures (None otherwise), taken out before the config is validated."""
    import ray.train

    from trainer.train import train

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    train_config = dict(loop_config)
    on_step = train_config.pop("on_step", None)
    train(train_config, report=ray.train.report, mark_failed=False, on_step=on_step)


def _trial_driver(tune_config: dict[str, Any]) -> None:
    """Tune function trainable: runs one trial as a TorchTrainer and marks it failed in the
    service when training fails after its retries."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec, run = tune_config["spec"], tune_config["run"]
    trial_id = spec["trial_id"]
    out = Path(run["output_dir"])
    loop_config = {
        **spec,
        "service_url": run["url"],
        "service_token": run["token"],
        "checkpoint_dir": str(out / "checkpoints" / f"trial-{trial_id}"),
        "spool_dir": str(out / "spool"),
        "on_step": run["on_step"],
    }
    resources = {"CPU": run["cpus_per_worker"]}
    if run["use_gpu"]:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=run["workers_per_trial"],
            use_gpu=run["use_gpu"],
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=f"trial-{trial_id}",
            storage_path=str(out / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=run["max_failures"]),
            # Ray's annotations name Train V1's Callback; V2 (the default) takes UserCallback
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        logger.error("trial %s: training failed: %s: %s", trial_id, type(exc).__name__, exc)
        with HyperlawClient(run["url"], run["token"]) as client:
            try:
                client.update_trial(
                    trial_id,
                    status="failed",
                    status_reason=f"{type(exc).__name__}: {exc}"[:2000],
                    stop_reason="failed",
                )
            except Exception as update_exc:  # noqa: BLE001 - already finished, or unreachable
                logger.warning("trial %s: could not mark failed: %s", trial_id, update_exc)
        raise


def _progress_callback(total: int, skipped: int) -> Any:
    from ray import tune

    class SweepProgress(tune.Callback):
        """Logs trials done / running / failed and the best final evaluation loss so far."""

        def __init__(self) -> None:
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
                "sweep progress: %d/%d done (%d skipped), %d running, %d failed; %s",
                self.done + skipped,
                total + skipped,
                skipped,
                len(self.running),
                self.failed,
                best,
            )

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._log()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.done += 1
            loss = (trial.last_result or {}).get("final_eval_loss")
            spec = trial.config["spec"]
            if (
                loss is not None
                and math.isfinite(loss)
                and (self.best is None or loss < self.best[0])
            ):
                where = f"lr={spec['learning_rate']:.4g}, B={spec['batch_size_tokens']}"
                self.best = (loss, f"{where}, trial {spec['trial_id']}")
            self._log()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.failed += 1
            self._log()

    return SweepProgress()


def run_sweep(
    config: SweepConfig,
    *,
    url: str,
    token: str | None,
    address: str | None = None,
    resume: bool = False,
    ray_init: dict[str, Any] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> SweepSummary:
    """Run the sweep end to end; returns what happened (the service holds the details).
    ``ray_init`` adds keyword arguments to ``ray.init`` for a local cluster (tests use
    ``num_cpus=2, include_dashboard=False``). ``on_step(step, rank)`` is passed to every
    worker's ``train`` (tests inject failures with it): it must pickle with Ray's cloudpickle
    and keep across a worker restart whatever state it needs in files."""
    import ray
    from ray import tune

    t0 = time.perf_counter()
    with HyperlawClient(url, token) as client:
        exp_id, pending, skipped_ids = register_trials(config, client, resume=resume)
    skipped = len(skipped_ids)
    summary = SweepSummary(
        experiment_id=exp_id, skipped=skipped, trial_ids=[s["trial_id"] for s in pending]
    )
    logger.info(
        "experiment %s (id %d): %d trials to run, %d already completed",
        config.experiment,
        exp_id,
        len(pending),
        skipped,
    )
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if pending:
        started_ray = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address)
            else:
                kwargs = {"include_dashboard": True, **(ray_init or {})}
                context = ray.init(**kwargs)
                if kwargs.get("include_dashboard") and getattr(context, "dashboard_url", None):
                    logger.info("Ray dashboard: http://%s", context.dashboard_url)
            started_ray = True
        try:
            resources = ray.cluster_resources()
            if config.use_gpu == "auto":
                use_gpu = resources.get("GPU", 0) > 0
            else:
                use_gpu = bool(config.use_gpu)
            per_trial = config.workers_per_trial * config.cpus_per_worker
            if config.max_concurrent_trials == "auto":
                concurrent = max(1, int(resources.get("CPU", 1) // per_trial))
                if use_gpu:
                    gpu_trials = max(1, int(resources["GPU"] // config.workers_per_trial))
                    concurrent = min(concurrent, gpu_trials)
            else:
                concurrent = int(config.max_concurrent_trials)
            logger.info(
                "running up to %d trials at once (%d workers x %g CPUs each%s)",
                concurrent,
                config.workers_per_trial,
                config.cpus_per_worker,
                ", GPUs" if use_gpu else "",
            )
            run = {
                "url": url,
                "token": token,
                "output_dir": str(out),
                "workers_per_trial": config.workers_per_trial,
                "cpus_per_worker": config.cpus_per_worker,
                "use_gpu": use_gpu,
                "max_failures": config.max_failures,
                "on_step": on_step,
            }
            tuner = tune.Tuner(
                # the driver only waits on its TorchTrainer: it holds no CPU (a token of memory
                # keeps its placement bundle non-empty), so the workers get all the cores
                tune.with_resources(_trial_driver, {"cpu": 0, "memory": 16 * 2**20}),
                param_space={"spec": tune.grid_search(pending), "run": run},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=concurrent,
                    trial_name_creator=lambda t: f"trial-{t.config['spec']['trial_id']}",
                    trial_dirname_creator=lambda t: f"trial-{t.config['spec']['trial_id']}",
                ),
                run_config=tune.RunConfig(
                    name=_slug(config.experiment),
                    storage_path=str(out / "ray_tune"),
                    callbacks=[_progress_callback(len(pending), skipped)],
                    verbose=0,
                ),
            )
            tuner.fit()
        finally:
            if started_ray:
                ray.shutdown()

    with HyperlawClient(url, token) as client:
        for trial_id in summary.trial_ids + skipped_ids:
            t = client.get_trial(trial_id)
            ran_now = trial_id in summary.trial_ids
            if t["status"] == "completed":
                summary.completed += ran_now
                summary.diverged += ran_now and bool(t.get("diverged"))
                loss = t.get("final_eval_loss")
                if (
                    loss is not None
                    and math.isfinite(loss)
                    and (summary.best is None or loss < summary.best["final_eval_loss"])
                ):
                    summary.best = t
            elif ran_now:
                summary.failed += 1
    summary.wall_time_s = time.perf_counter() - t0
    return summary


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:100]
