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

Where things go: without ``storage`` (the sweep file's, or ``--storage``), under
``output_dir``: Ray Tune's results in ``ray_tune/``, Ray Train's in ``ray_train/``, and the
DeepSpeed checkpoints that the workers write in ``checkpoints/trial-<id>/`` (a path every node
must share for a run to resume on another one). With ``storage`` (a shared path or a URI such
as ``s3://bucket/prefix``, ``trainer.storage``), under ``STORAGE/<experiment>/``: Tune's and
Train's ``storage_path`` are ``ray_tune/`` and ``ray_train/`` there, and the checkpoints go
through Ray Train (``trainer.checkpoints``): into ``ray_train/<Tune trial>/trial-<id>-step<N>/``,
one kept per Ray Train run and deleted with the run's folder once its runs are done (failed
or not; an interrupted sweep keeps it, and ``--resume`` starts the same Ray Train run again,
which resumes from it: always with ``runs_per_trial: 1``, with more when the Tune trial packs
the same runs again). The spool stays in ``output_dir/spool/`` on the node of each run's rank 0.

Nothing reaches a worker but its config and the service: ``run_sweep`` hands each trial driver
its training config and the run settings through Tune's ``param_space``, and the driver hands
the workers theirs through the TorchTrainer's ``train_loop_config``; the service's URL and
token never go there (Tune writes param_space to disk): a trial takes them from its own
environment, else from the driver through Ray's object store (``trainer.ray_cluster``).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import HyperlawClient
from trainer import cbs_protocol
from trainer.plan import Registration, register_run, register_trials
from trainer.progress import progress_callback
from trainer.ray_cluster import ServiceAccess, log_trial_service, ray_cluster
from trainer.storage import child, delete, is_uri, resolve
from trainer.sweep_config import SweepConfig, SweepConfigError

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


def _ray_worker(loop_config: dict[str, Any], driver: ServiceAccess) -> None:
    """Per-worker function of the TorchTrainer: one DeepSpeed worker of one Tune trial, which
    trains its ``runs`` (training configs) one after the other in this process. A run the
    service already shows completed is skipped (a worker group restarted by Ray Train goes
    on where it failed, from that run's checkpoint). ``on_step`` is the hook that tests use
    to inject failures (None otherwise). The service: ``driver.in_trial()``."""
    import ray.train
    import torch.distributed as dist

    from trainer.train import train

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    service = driver.in_trial()
    for run in loop_config["runs"]:
        with HyperlawClient(service.url, service.token) as client:
            if client.get_trial(run["trial_id"])["status"] == "completed":
                continue
        run = {**run, "service_url": service.url, "service_token": service.token}
        train(run, report=ray.train.report, mark_failed=False, on_step=loop_config["on_step"])
        if dist.is_initialized():
            dist.barrier()  # every worker sees the run completed before the next one's check


def _trial_driver(tune_config: dict[str, Any], driver: ServiceAccess) -> None:
    """Tune function trainable: trains the Tune trial's runs (``specs``, one or more service
    trials) in a TorchTrainer. When training fails after its retries, the first run not
    completed is marked failed in the service and the runs after it get a new TorchTrainer;
    the trial then ends with the failure. ``driver``: the service as the driver reaches it,
    from ``tune.with_parameters`` (``trainer.ray_cluster``)."""
    specs, run = tune_config["specs"], tune_config["run"]
    service = driver.in_trial()
    remaining, failure = list(specs), None
    while remaining:
        try:
            _fit(remaining, run, driver)
            break
        except Exception as exc:  # noqa: BLE001 - raised once the runs after it have run
            failure = exc
            ids = [s["trial_id"] for s in remaining]
            logger.error("trials %s: training failed: %s: %s", ids, type(exc).__name__, exc)
            with HyperlawClient(service.url, service.token) as client:
                unfinished = [i for i in ids if client.get_trial(i)["status"] != "completed"]
                if not unfinished:
                    break
                _mark_failed(client, unfinished[0], f"{type(exc).__name__}: {exc}")
            remaining = [s for s in remaining if s["trial_id"] in unfinished[1:]]
    if failure is not None:
        raise failure


def _fit(specs: list[dict[str, Any]], run: dict[str, Any], driver: ServiceAccess) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    out, storage = Path(run["output_dir"]), run["storage"]
    runs = [
        {
            **spec,
            **(
                {"ray_checkpoints": True}  # in Ray Train's storage: resumable on any node
                if storage
                else {"checkpoint_dir": str(out / "checkpoints" / f"trial-{spec['trial_id']}")}
            ),
            "spool_dir": str(out / "spool"),
        }
        for spec in specs
    ]
    name = _pack_name(specs)
    train_root = child(storage, "ray_train") if storage else str(out / "ray_train")
    filesystem, path = resolve(train_root)
    resources = {"CPU": run["cpus_per_worker"]}
    if run["use_gpu"]:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        functools.partial(_ray_worker, driver=driver),  # the token: not in train_loop_config
        train_loop_config={"runs": runs, "on_step": run["on_step"]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=run["workers_per_trial"],
            use_gpu=run["use_gpu"],
            resources_per_worker=resources,
            placement_strategy=run["placement_strategy"],
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=run["max_failures"]),
            # the latest checkpoint only: the one a restarted worker group resumes from
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            # Ray's annotations name Train V1's Callback; V2 (the default) takes UserCallback
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
        ),
    )
    try:
        trainer.fit()
    except Exception:
        if storage:  # the failed run is marked failed: no run resumes from it
            _delete_train_run(child(train_root, name))
        raise
    if storage:
        _delete_train_run(child(train_root, name))


def _delete_train_run(location: str) -> None:
    """A Ray Train run's folder in storage, its checkpoint with it, once its runs are done.
    (An interrupted sweep keeps it: ``--resume`` starts the same Ray Train run again, which
    resumes from it.)"""
    try:
        delete(location)
    except OSError as exc:
        logger.warning("could not delete %s: %s", location, exc)


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
    ``url`` and ``token`` are the service as this process reaches it; trials prefer
    ``HYPERLAW_URL`` / ``HYPERLAW_TOKEN`` set on the nodes of a cluster the sweep joins
    (``trainer.ray_cluster``). ``ray_init`` adds keyword arguments to ``ray.init`` for a
    local cluster (tests use ``num_cpus=2, include_dashboard=False``). ``on_step(step,
    rank)`` is passed to every worker's ``train`` (tests inject failures with it): it must
    pickle with Ray's cloudpickle and keep across a worker restart whatever state it needs in
    files.

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
            """The run settings and, under "driver", the service as the driver reaches it; the
            Ray cluster started on first use (a --resume with nothing left to run starts
            none)."""
            if not settings:
                started = stack.enter_context(ray_cluster(address, ray_init))
                driver = ServiceAccess(url, token, trial_environment_wins=not started)
                log_trial_service(driver)
                settings.update(_run_settings(config, out, on_step), driver=driver)
            return settings

        progress = progress_callback(len(registration.pending), len(registration.skipped))
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


def _run_settings(
    config: SweepConfig, out: Path, on_step: Callable[[int, int], None] | None
) -> dict[str, Any]:
    """What every trial driver needs besides its runs (the service aside); trials per phase
    from the cluster."""
    import ray

    resources = ray.cluster_resources()
    if config.use_gpu == "auto":
        use_gpu = resources.get("GPU", 0) > 0
    else:
        use_gpu = bool(config.use_gpu)
    if config.precision == "fp16" and not use_gpu:
        raise SweepConfigError(
            "precision 'fp16' needs GPUs and the Ray cluster has none: DeepSpeed's CPU "
            "accelerator supports 'fp32' and 'bf16' only"
        )
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
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if config.placement_strategy == "STRICT_SPREAD" and nodes < config.workers_per_trial:
        logger.warning(
            "placement_strategy STRICT_SPREAD puts each of a trial's %d workers on a node of "
            "its own; the cluster has %d node(s): trials wait for more",
            config.workers_per_trial,
            nodes,
        )
    storage = config.storage
    if storage is not None:
        if not is_uri(storage):
            storage = str(Path(storage).resolve())
        storage = child(storage, _slug(config.experiment))  # a folder per sweep
        logger.info("Ray's results and the checkpoints go to %s", storage)
    return {
        "output_dir": str(out),
        "storage": storage,
        "workers_per_trial": config.workers_per_trial,
        "cpus_per_worker": config.cpus_per_worker,
        "use_gpu": use_gpu,
        "max_failures": config.max_failures,
        "placement_strategy": config.placement_strategy,
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
    the cluster that ``cluster`` gives with its run settings (none without specs). The
    service goes to the trial drivers through ``tune.with_parameters`` (Ray's object store;
    Ray is up, so it is put there at once), not in ``param_space``."""
    from ray import tune

    if not specs:
        return
    run = dict(cluster())
    driver = run.pop("driver")
    k = config.runs_per_trial
    packs = [specs[i : i + k] for i in range(0, len(specs), k)]
    trainable = tune.with_parameters(_trial_driver, driver=driver)
    storage = run["storage"]
    tune_root = child(storage, "ray_tune") if storage else str(Path(run["output_dir"]) / "ray_tune")
    filesystem, path = resolve(tune_root)
    tuner = tune.Tuner(
        # the driver only waits on its TorchTrainer: it holds no CPU (a token of memory
        # keeps its placement bundle non-empty), so the workers get all the cores
        tune.with_resources(trainable, {"cpu": 0, "memory": 16 * 2**20}),
        param_space={"specs": tune.grid_search(packs), "run": run},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=run["concurrent"],
            trial_name_creator=lambda t: _pack_name(t.config["specs"]),
            trial_dirname_creator=lambda t: _pack_name(t.config["specs"]),
        ),
        run_config=tune.RunConfig(
            name=_slug(config.experiment + (f"-{phase}" if phase else "")),
            storage_path=path,
            storage_filesystem=filesystem,
            callbacks=callbacks,
            verbose=0,
        ),
    )
    tuner.fit()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:100]
