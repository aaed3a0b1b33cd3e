"""``hyperlaw sweep``: a Ray Tune experiment whose trials are Ray Train TorchTrainers.

Flow: read the YAML (``trainer.sweep_config``) → expand it into training configs and register
the experiment with one queued trial per run in the service (``trainer.plan``; repeatable, and
``resume`` skips what is finished) → run a Tune function trainable per ``runs_per_trial`` runs
(``_trial_driver``) that builds a TorchTrainer of ``workers_per_trial`` DeepSpeed workers
(``_ray_worker``, which calls ``trainer.train.train`` for each run in turn; gloo on CPU, NCCL
on GPUs, chosen by Ray Train) → each worker's rank 0 streams points and the final metrics to
the service; Ray Train restarts a failed worker group from its last checkpoint up to
``max_failures`` times (runs already completed are skipped), and a run whose training still
fails is marked failed (stop reason ``failed``), the runs after it going on in a new worker
group. A ``cbs:`` sweep runs this twice (``trainer.cbs_protocol``): the reference runs, then
the runs to the targets they set.

Nothing reaches a worker but its config: ``run_sweep`` hands each trial driver its training
config and the run settings through Tune's ``param_space``, and the driver hands the workers
theirs through the TorchTrainer's ``train_loop_config``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import HyperlawClient
from trainer import cbs_protocol
from trainer.plan import Registration, register_run, register_trials
from trainer.sweep_config import SweepConfig

logger = logging.getLogger(__name__)
RAY_TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_TRAIN_POLL_S = 0.25  # telemetry.REPORT_INTERVAL_S stays above it


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
    """Per-worker function of the TorchTrainer: one DeepSpeed worker of one Tune trial, which
    trains its ``runs`` (training configs) one after the other in this process. A run the
    service already shows completed is skipped (a worker group restarted by Ray Train goes
    on where it failed, from that run's checkpoint). ``on_step`` is the hook that tests use
    to inject failures (None otherwise)."""
    import ray.train
    import torch.distributed as dist

    from trainer.train import train

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    for run in loop_config["runs"]:
        with HyperlawClient(run["service_url"], run["service_token"]) as client:
            if client.get_trial(run["trial_id"])["status"] == "completed":
                continue
        train(run, report=ray.train.report, mark_failed=False, on_step=loop_config["on_step"])
        if dist.is_initialized():
            dist.barrier()  # every worker sees the run completed before the next one's check


def _trial_driver(tune_config: dict[str, Any]) -> None:
    """Tune function trainable: trains the Tune trial's runs (``specs``, one or more service
    trials) in a TorchTrainer. When training fails after its retries, the first run not
    completed is marked failed in the service and the runs after it get a new TorchTrainer;
    the trial then ends with the failure."""
    specs, run = tune_config["specs"], tune_config["run"]
    remaining, failure = list(specs), None
    while remaining:
        try:
            _fit(remaining, run)
            break
        except Exception as exc:  # noqa: BLE001 - raised once the runs after it have run
            failure = exc
            ids = [s["trial_id"] for s in remaining]
            logger.error("trials %s: training failed: %s: %s", ids, type(exc).__name__, exc)
            with HyperlawClient(run["url"], run["token"]) as client:
                unfinished = [i for i in ids if client.get_trial(i)["status"] != "completed"]
                if not unfinished:
                    break
                _mark_failed(client, unfinished[0], f"{type(exc).__name__}: {exc}")
            remaining = [s for s in remaining if s["trial_id"] in unfinished[1:]]
    if failure is not None:
        raise failure


def _fit(specs: list[dict[str, Any]], run: dict[str, Any]) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    out = Path(run["output_dir"])
    runs = [
        {
            **spec,
            "service_url": run["url"],
            "service_token": run["token"],
            "checkpoint_dir": str(out / "checkpoints" / f"trial-{spec['trial_id']}"),
            "spool_dir": str(out / "spool"),
        }
        for spec in specs
    ]
    resources = {"CPU": run["cpus_per_worker"]}
    if run["use_gpu"]:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"runs": runs, "on_step": run["on_step"]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=run["workers_per_trial"],
            use_gpu=run["use_gpu"],
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=_pack_name(specs),
            storage_path=str(out / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=run["max_failures"]),
            # Ray's annotations name Train V1's Callback; V2 (the default) takes UserCallback
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
        ),
    )
    trainer.fit()


def _mark_failed(client: HyperlawClient, trial_id: int, reason: str) -> None:
    try:
        client.update_trial(
            trial_id, status="failed", status_reason=reason[:2000], stop_reason="failed"
        )
    except Exception as exc:  # noqa: BLE001 - already finished, or unreachable
        logger.warning("trial %s: could not mark failed: %s", trial_id, exc)


def _pack_name(specs: list[dict[str, Any]]) -> str:
    """trial-<id> for one run, trial-<first id>-<last id> for several."""
    ids = [s["trial_id"] for s in specs]
    return f"trial-{ids[0]}" + (f"-{ids[-1]}" if len(ids) > 1 else "")


def _progress_callback(total: int, skipped: int) -> Any:
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
    and keep across a worker restart whatever state it needs in files.

    With a ``cbs:`` section the runs go in two phases (``trainer.cbs_protocol``): the
    reference runs, then, with each (N, D) group's target read back from the service, the
    runs to the target."""
    t0 = time.perf_counter()
    with HyperlawClient(url, token) as client:
        registration = register_trials(config, client, resume=resume)
    logger.info(
        "experiment %s (id %d): %d trials to run, %d already completed, %d once their "
        "cbs targets are known",
        config.experiment,
        registration.experiment_id,
        len(registration.pending),
        len(registration.skipped),
        len(registration.deferred),
    )
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    with ExitStack() as stack:
        settings: dict[str, Any] = {}

        def cluster() -> dict[str, Any]:
            """The run settings, the Ray cluster started on first use (a --resume with
            nothing left to run starts none)."""
            if not settings:
                stack.enter_context(_ray_cluster(address, ray_init))
                settings.update(_run_settings(config, url, token, out, on_step))
            return settings

        progress = _progress_callback(len(registration.pending), len(registration.skipped))
        if config.cbs is None:
            _tune(config, registration.pending, cluster, [progress])
        else:  # registers the runs of relative η grids on the way
            _run_cbs(config, registration, cluster, progress, url, token)
    skipped_ids = [s["trial_id"] for s in registration.skipped]
    summary = SweepSummary(
        experiment_id=registration.experiment_id,
        skipped=len(skipped_ids),
        trial_ids=[s["trial_id"] for s in registration.pending],
    )
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


def _run_cbs(
    config: SweepConfig,
    registration: Registration,
    cluster: Callable[[], dict[str, Any]],
    progress: Any,
    url: str,
    token: str | None,
) -> None:
    """The ``cbs:`` protocol's two phases (``trainer.cbs_protocol``): the reference runs;
    then each group's target read back from the service, the runs of relative η grids
    registered with their η, and the runs to the target."""
    references, to_target = cbs_protocol.split_phases(registration.pending)
    _tune(config, references, cluster, [progress], phase="reference")
    done_references, _ = cbs_protocol.split_phases(registration.skipped)
    with HyperlawClient(url, token) as client:
        targets = cbs_protocol.reference_targets(client, references + done_references)
        cbs_protocol.record_reference_steps(client, references + done_references, targets)
        n_pending = len(registration.pending)
        for spec in cbs_protocol.with_learning_rates(registration.deferred, targets):
            register_run(config, client, registration, spec)
        to_target += registration.pending[n_pending:]
        progress.total, progress.skipped = len(registration.pending), len(registration.skipped)
        runnable = cbs_protocol.with_targets(client, to_target, targets)
    callbacks = [progress, cbs_protocol.progress_callback(runnable)]
    _tune(config, runnable, cluster, callbacks, phase="to-target")


@contextmanager
def _ray_cluster(address: str | None, ray_init: dict[str, Any] | None) -> Iterator[None]:
    """Join the cluster at ``address``, or the one already initialised, or start a local one
    (shut down on leaving)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address)
    else:
        # Ray Train's controller takes in one report per poll (2 s by default): a run that
        # lasts seconds (a packed one) would mostly wait for it. The local cluster's workers
        # inherit this process's environment.
        os.environ.setdefault(RAY_TRAIN_POLL_ENV, str(RAY_TRAIN_POLL_S))
        kwargs = {"include_dashboard": True, **(ray_init or {})}
        context = ray.init(**kwargs)
        if kwargs.get("include_dashboard") and getattr(context, "dashboard_url", None):
            logger.info("Ray dashboard: http://%s", context.dashboard_url)
    try:
        yield
    finally:
        ray.shutdown()


def _run_settings(
    config: SweepConfig,
    url: str,
    token: str | None,
    out: Path,
    on_step: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    """What every trial driver needs besides its runs; trials per phase from the cluster."""
    import ray

    resources = ray.cluster_resources()
    if config.use_gpu == "auto":
        use_gpu = resources.get("GPU", 0) > 0
    else:
        use_gpu = bool(config.use_gpu)
    per_trial = config.workers_per_trial * config.cpus_per_worker
    if config.max_concurrent_trials == "auto":
        concurrent = max(1, int(resources.get("CPU", 1) // per_trial))
        if use_gpu:
            concurrent = min(concurrent, max(1, int(resources["GPU"] // config.workers_per_trial)))
    else:
        concurrent = int(config.max_concurrent_trials)
    logger.info(
        "running up to %d trials at once (%d workers x %g CPUs each%s), %d runs per trial",
        concurrent,
        config.workers_per_trial,
        config.cpus_per_worker,
        ", GPUs" if use_gpu else "",
        config.runs_per_trial,
    )
    return {
        "url": url,
        "token": token,
        "output_dir": str(out),
        "workers_per_trial": config.workers_per_trial,
        "cpus_per_worker": config.cpus_per_worker,
        "use_gpu": use_gpu,
        "max_failures": config.max_failures,
        "on_step": on_step,
        "concurrent": concurrent,
    }


def _tune(
    config: SweepConfig,
    specs: list[dict[str, Any]],
    cluster: Callable[[], dict[str, Any]],
    callbacks: list[Any],
    phase: str = "",
) -> None:
    """One Tune experiment over ``specs``: Tune trials of ``runs_per_trial`` runs each, on
    the cluster that ``cluster`` gives with its run settings (none without specs)."""
    from ray import tune

    if not specs:
        return
    run = cluster()
    k = config.runs_per_trial
    packs = [specs[i : i + k] for i in range(0, len(specs), k)]
    tuner = tune.Tuner(
        # the driver only waits on its TorchTrainer: it holds no CPU (a token of memory
        # keeps its placement bundle non-empty), so the workers get all the cores
        tune.with_resources(_trial_driver, {"cpu": 0, "memory": 16 * 2**20}),
        param_space={"specs": tune.grid_search(packs), "run": run},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=run["concurrent"],
            trial_name_creator=lambda t: _pack_name(t.config["specs"]),
            trial_dirname_creator=lambda t: _pack_name(t.config["specs"]),
        ),
        run_config=tune.RunConfig(
            name=_slug(config.experiment + (f"-{phase}" if phase else "")),
            storage_path=str(Path(run["output_dir"]) / "ray_tune"),
            callbacks=callbacks,
            verbose=0,
        ),
    )
    tuner.fit()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:100]
