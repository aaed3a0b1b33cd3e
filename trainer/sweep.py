"""``hyperlaw sweep``: a Ray Tune experiment whose trials are Ray Train TorchTrainers.

Flow: read the YAML (``load_sweep_config``) → expand it into trial specs, one per
(model, n_tokens, learning_rate, batch_size_tokens, seed) → register the experiment and one
queued trial per spec in the service (``idempotency_key`` makes this repeatable) → run a Tune
function trainable per spec (``_trial_driver``) that builds a TorchTrainer of
``workers_per_trial`` DeepSpeed workers (``trainer.train.train`` on each; gloo on CPU, NCCL on
GPUs, chosen by Ray Train) → each worker's rank 0 streams points and the final metrics to the
service; a trial whose training fails after its retries is marked failed.

Resume (``--resume``): the service is the record of what is finished. Trials already
completed are skipped; a trial left ``running`` by an interrupted sweep continues from its
last DeepSpeed checkpoint (``output_dir/checkpoints/trial-<id>``); a failed trial is run again
as a new trial record (key suffix ``#retry<k>``) so its failure stays in the history. Without
``--resume`` a sweep whose trials already exist refuses to start.

Adaptive search (``search.kind: adaptive``) asks the service for its current recommendation
(η*, B*) at each (N, D) and places ``points_per_axis`` learning rates and batch sizes
log-uniformly within ±``lr_spread_decades`` decades of η* and ±``batch_spread_octaves``
octaves of B*, so trials concentrate around the predicted optimum.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from trainer.train import TrainConfig, TrainConfigError, batch_layout

logger = logging.getLogger(__name__)


class SweepConfigError(ValueError):
    """A sweep YAML that breaks a rule; the message names the field."""


@dataclass(frozen=True)
class SweepConfig:
    experiment: str
    task: str
    n_tokens: list[int]
    learning_rate: list[float]
    batch_size_tokens: list[int]
    models: list[dict[str, Any]]
    description: str | None = None
    search_kind: str = "grid"
    points_per_axis: int = 3
    lr_spread_decades: float = 0.5
    batch_spread_octaves: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0])
    seq_len: int = 1
    micro_batch_size_sequences: int | None = None
    synthetic: dict[str, Any] = field(default_factory=dict)
    corpus_dir: str | None = None
    optimizer: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    target_loss: float | None = None
    divergence_factor: float = 100.0
    zero_stage: int = 0
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: str | bool = "auto"
    max_concurrent_trials: int | str = "auto"
    max_failures: int = 1
    checkpoint_every: int = 0
    output_dir: str = "hyperlaw-runs"

    def with_output_dir(self, output_dir: str) -> "SweepConfig":
        return replace(self, output_dir=output_dir)


_TOP_LEVEL = {
    "experiment", "description", "task", "models", "model", "n_tokens", "search", "seeds",
    "seq_len", "micro_batch_size_sequences", "synthetic", "corpus_dir", "optimizer", "schedule",
    "eval", "target_loss", "divergence_factor", "zero_stage", "workers_per_trial",
    "cpus_per_worker", "use_gpu", "max_concurrent_trials", "max_failures", "checkpoint_every",
    "output_dir",
}


def _as_list(value: Any, name: str) -> list:
    if value is None:
        raise SweepConfigError(f"{name} is required")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise SweepConfigError(f"{name} must not be empty")
    return values


def parse_sweep_config(raw: dict[str, Any], base_dir: Path | None = None) -> SweepConfig:
    """Validate a parsed YAML document; relative ``corpus_dir`` is resolved against
    ``base_dir`` (the YAML's folder)."""
    if not isinstance(raw, dict):
        raise SweepConfigError("the sweep file must be a mapping")
    unknown = sorted(set(raw) - _TOP_LEVEL)
    if unknown:
        raise SweepConfigError(f"unknown fields: {', '.join(unknown)}")
    experiment = raw.get("experiment")
    if not isinstance(experiment, str) or not experiment.strip():
        raise SweepConfigError("experiment must be a non-empty name")
    task = raw.get("task", "synthetic")
    search = raw.get("search") or {}
    kind = search.get("kind", "grid")
    if kind not in ("grid", "adaptive"):
        raise SweepConfigError(f"search.kind must be 'grid' or 'adaptive' (got {kind!r})")
    bad = sorted(set(search) - {"kind", "learning_rate", "batch_size_tokens", "points_per_axis",
                                "lr_spread_decades", "batch_spread_octaves"})
    if bad:
        raise SweepConfigError(f"unknown search fields: {', '.join(bad)}")
    if kind == "grid":
        lrs = [float(v) for v in _as_list(search.get("learning_rate"), "search.learning_rate")]
        batches = [int(v) for v in _as_list(search.get("batch_size_tokens"),
                                             "search.batch_size_tokens")]
    else:
        lrs, batches = [], []
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise SweepConfigError(f"search.learning_rate values must be > 0 (got {lr})")
    for b in batches:
        if b <= 0:
            raise SweepConfigError(f"search.batch_size_tokens values must be > 0 (got {b})")
    models = raw.get("models")
    if models is None:
        models = [raw.get("model") or {}]
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise SweepConfigError("models must be a list of mappings (model shapes)")
    n_tokens = [int(v) for v in _as_list(raw.get("n_tokens"), "n_tokens")]
    corpus_dir = raw.get("corpus_dir")
    if corpus_dir is not None and base_dir is not None and not Path(corpus_dir).is_absolute():
        corpus_dir = str((base_dir / corpus_dir).resolve())
    mct = raw.get("max_concurrent_trials", "auto")
    if mct != "auto" and (not isinstance(mct, int) or mct <= 0):
        raise SweepConfigError(f"max_concurrent_trials must be 'auto' or > 0 (got {mct!r})")
    workers = raw.get("workers_per_trial", 1)
    if not isinstance(workers, int) or workers <= 0:
        raise SweepConfigError(f"workers_per_trial must be an integer > 0 (got {workers!r})")
    cpus = float(raw.get("cpus_per_worker", 1.0))
    if cpus <= 0:
        raise SweepConfigError(f"cpus_per_worker must be > 0 (got {cpus})")
    use_gpu = raw.get("use_gpu", "auto")
    if use_gpu not in ("auto", True, False):
        raise SweepConfigError(f"use_gpu must be auto, true or false (got {use_gpu!r})")
    config = SweepConfig(
        experiment=experiment.strip(), description=raw.get("description"), task=task,
        n_tokens=n_tokens, learning_rate=lrs, batch_size_tokens=batches, models=models,
        search_kind=kind,
        points_per_axis=int(search.get("points_per_axis", 3)),
        lr_spread_decades=float(search.get("lr_spread_decades", 0.5)),
        batch_spread_octaves=float(search.get("batch_spread_octaves", 1.0)),
        seeds=[int(s) for s in _as_list(raw.get("seeds", [0]), "seeds")],
        seq_len=int(raw.get("seq_len", 1)),
        micro_batch_size_sequences=raw.get("micro_batch_size_sequences"),
        synthetic=dict(raw.get("synthetic") or {}), corpus_dir=corpus_dir,
        optimizer=dict(raw.get("optimizer") or {}), schedule=dict(raw.get("schedule") or {}),
        eval=dict(raw.get("eval") or {}), target_loss=raw.get("target_loss"),
        divergence_factor=float(raw.get("divergence_factor", 100.0)),
        zero_stage=int(raw.get("zero_stage", 0)), workers_per_trial=workers,
        cpus_per_worker=cpus, use_gpu=use_gpu, max_concurrent_trials=mct,
        max_failures=int(raw.get("max_failures", 1)),
        checkpoint_every=int(raw.get("checkpoint_every", 0)),
        output_dir=str(raw.get("output_dir", "hyperlaw-runs")),
    )
    if config.points_per_axis <= 0:
        raise SweepConfigError(f"search.points_per_axis must be > 0 (got {config.points_per_axis})")
    if config.max_failures < 0:
        raise SweepConfigError(f"max_failures must be >= 0 (got {config.max_failures})")
    # every grid point must make a valid run: fail now, with the field, not inside Ray
    for spec in _grid(config, config.learning_rate or [1e-3], config.batch_size_tokens or [None]):
        if spec["batch_size_tokens"] is None:
            continue
        try:
            TrainConfig.from_dict(spec)
            batch_layout(spec["batch_size_tokens"], config.seq_len, config.workers_per_trial,
                         config.micro_batch_size_sequences)
        except TrainConfigError as exc:
            raise SweepConfigError(str(exc)) from exc
    return config


def load_sweep_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepConfigError(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"not valid YAML: {exc}") from exc
    return parse_sweep_config(raw, base_dir=path.parent)


# ----------------------------------------------------------------------------- trial specs


def model_n_params(task: str, model: dict[str, Any], synthetic: dict[str, Any]) -> int:
    """N of a model shape without building it (the formulas live in trainer.model)."""
    from trainer.model import GPTConfig, gpt_non_embedding_params

    if task == "synthetic":
        return int(synthetic.get("dim", 256))
    shape = GPTConfig(**model)
    return gpt_non_embedding_params(shape.n_layer, shape.d_model)


def _grid(config: SweepConfig, lrs: list[float], batches: list[int | None]) -> list[dict[str, Any]]:
    """Training configs (``TrainConfig`` fields) of the full product."""
    specs = []
    for model in config.models:
        synthetic = {**config.synthetic, **model} if config.task == "synthetic" else config.synthetic
        for n_tokens in config.n_tokens:
            for lr in lrs:
                for batch in batches:
                    for seed in config.seeds:
                        specs.append({
                            "task": config.task, "learning_rate": lr,
                            "batch_size_tokens": batch, "n_tokens": n_tokens,
                            "seq_len": config.seq_len,
                            "micro_batch_size_sequences": config.micro_batch_size_sequences,
                            "model": {} if config.task == "synthetic" else dict(model),
                            "synthetic": synthetic if config.task == "synthetic" else {},
                            "corpus_dir": config.corpus_dir, "optimizer": config.optimizer,
                            "schedule": config.schedule, "eval": config.eval,
                            "target_loss": config.target_loss,
                            "divergence_factor": config.divergence_factor,
                            "zero_stage": config.zero_stage, "seed": seed,
                            "threads_per_worker": max(1, int(config.cpus_per_worker)),
                            "checkpoint_every": config.checkpoint_every,
                        })
    return specs


def _adaptive_points(config: SweepConfig, client: Any, n_params: int, n_tokens: int
                     ) -> tuple[list[float], list[int]]:
    rec = client.recommend(n_params=n_params, n_tokens=n_tokens, seq_len=config.seq_len)
    eta, batch = float(rec["learning_rate"]), float(rec["batch_size_tokens"])
    k = config.points_per_axis
    offsets = [0.0] if k == 1 else [-1 + 2 * i / (k - 1) for i in range(k)]
    lrs = [eta * 10 ** (config.lr_spread_decades * o) for o in offsets]
    unit = config.seq_len * config.workers_per_trial
    batches = sorted({max(unit, int(round(batch * 2 ** (config.batch_spread_octaves * o) / unit))
                          * unit) for o in offsets})
    return lrs, batches


def expand_trials(config: SweepConfig, client: Any | None = None) -> list[dict[str, Any]]:
    """All training configs of the sweep (grid, or adaptive around the service's optimum)."""
    if config.search_kind == "grid":
        return _grid(config, config.learning_rate, config.batch_size_tokens)
    if client is None:
        raise SweepConfigError("search.kind 'adaptive' needs the service for its recommendation")
    specs = []
    for model in config.models:
        sub = replace(config, models=[model])
        synthetic = {**config.synthetic, **model} if config.task == "synthetic" else {}
        n_params = model_n_params(config.task, model, synthetic)
        for n_tokens in config.n_tokens:
            lrs, batches = _adaptive_points(sub, client, n_params, n_tokens)
            specs.extend(_grid(replace(sub, n_tokens=[n_tokens]), lrs, batches))
    return specs


def idempotency_key(config: SweepConfig, spec: dict[str, Any]) -> str:
    """Readable and unique per (experiment, run config): N, D, η, B, seed and a hash of the
    whole training config."""
    synthetic = spec["synthetic"]
    n = model_n_params(spec["task"], spec["model"], synthetic)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return (f"N{n}-D{spec['n_tokens']}-lr{spec['learning_rate']:.6g}-"
            f"B{spec['batch_size_tokens']}-s{spec['seed']}-{digest[:12]}")


def code_version() -> str:
    """Package version and, inside a git checkout, the commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("hyperlaw")
    except PackageNotFoundError:
        v = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{v}+{commit}" if commit else v


def _trial_fields(config: SweepConfig, spec: dict[str, Any], experiment_id: int, key: str,
                  version: str) -> dict[str, Any]:
    train = TrainConfig.from_dict(spec)
    n_params = model_n_params(spec["task"], spec["model"], spec["synthetic"])
    shape = (spec["model"] if spec["task"] == "gpt" else {"dim": n_params})
    return {
        "experiment_id": experiment_id, "n_params": n_params, "n_tokens": spec["n_tokens"],
        "seq_len": spec["seq_len"], "learning_rate": spec["learning_rate"],
        "batch_size_tokens": spec["batch_size_tokens"], "model_shape": shape,
        "adam_beta1": train.optimizer.beta1, "adam_beta2": train.optimizer.beta2,
        "adam_eps": train.optimizer.eps, "weight_decay": train.optimizer.weight_decay,
        "grad_clip": train.optimizer.grad_clip, "schedule": train.schedule.name,
        "warmup_fraction": train.schedule.warmup_fraction, "zero_stage": spec["zero_stage"],
        "world_size": config.workers_per_trial, "seed": spec["seed"],
        "idempotency_key": key,
        "config": {"train": train.as_dict(), "code_version": version, "task": spec["task"],
                   "data": _data_description(spec)},
    }


def _data_description(spec: dict[str, Any]) -> dict[str, Any]:
    """What the run trains on, with a fingerprint that changes when the data does."""
    from trainer.data import SyntheticRegressionConfig

    if spec["task"] == "synthetic":
        task = SyntheticRegressionConfig(**spec["synthetic"])
        return {"synthetic": task.as_dict(), "fingerprint": task.fingerprint}
    meta_path = Path(spec["corpus_dir"]) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {"corpus": Path(spec["corpus_dir"]).name, "fingerprint": meta.get("fingerprint"),
            "tokenizer": meta.get("tokenizer")}


def _existing_trials(client: Any, experiment_id: int) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = client.list_trials(experiment_id=experiment_id, limit=1000, offset=offset)
        for t in page["data"]:
            if t.get("idempotency_key"):
                found[t["idempotency_key"]] = t
        offset += len(page["data"])
        if not page["data"] or offset >= page["count"]:
            return found


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
        return (f"final_eval_loss={self.best['final_eval_loss']:.5g} at "
                f"learning_rate={self.best['learning_rate']:.4g}, "
                f"batch_size_tokens={self.best['batch_size_tokens']} (trial {self.best['id']})")


def register_trials(config: SweepConfig, client: Any, *, resume: bool
                    ) -> tuple[int, list[dict[str, Any]], list[int]]:
    """Create the experiment and its queued trials. Returns (experiment id, the specs still
    to run with their ``trial_id``, the ids of trials skipped as already completed)."""
    experiment = client.ensure_experiment(config.experiment, config.description)
    exp_id = int(experiment["id"])
    existing = _existing_trials(client, exp_id)
    specs = expand_trials(config, client)
    version = code_version()
    pending: list[dict[str, Any]] = []
    skipped: list[int] = []
    for spec in specs:
        key = idempotency_key(config, spec)
        attempts = [k for k in existing if k == key or k.startswith(key + "#retry")]
        if attempts and not resume:
            raise SweepConfigError(
                f"experiment {config.experiment!r} already has trial {key!r}; "
                "use --resume to continue it"
            )
        latest_key = max(attempts, key=lambda k: (len(k), k)) if attempts else key
        latest = existing.get(latest_key)
        if latest is not None and latest["status"] == "completed":
            skipped.append(int(latest["id"]))
            continue
        if latest is not None and latest["status"] in ("failed", "pruned"):
            latest_key = f"{key}#retry{len(attempts)}"
        trial = client.create_trial(**_trial_fields(config, spec, exp_id, latest_key, version))
        pending.append({**spec, "trial_id": int(trial["id"])})
    return exp_id, pending, skipped


# ----------------------------------------------------------------------------- Ray


def _ray_worker(train_config: dict[str, Any]) -> None:
    """Per-worker function of the TorchTrainer: one DeepSpeed worker of one trial."""
    import ray.train

    from trainer.train import train

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    train(train_config, report=ray.train.report, mark_failed=False)


def _trial_driver(tune_config: dict[str, Any]) -> None:
    """Tune function trainable: runs one trial as a TorchTrainer and marks it failed in the
    service when training fails after its retries."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from client import HyperlawClient

    spec = tune_config["spec"]
    run = tune_config["run"]
    trial_id = spec["trial_id"]
    out = Path(run["output_dir"])
    train_config = {
        **{k: v for k, v in spec.items() if k != "trial_id"},
        "trial_id": trial_id, "service_url": run["url"], "service_token": run["token"],
        "checkpoint_dir": str(out / "checkpoints" / f"trial-{trial_id}"),
        "spool_dir": str(out / "spool"),
        **run["train_overrides"],
    }
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=train_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=run["workers_per_trial"], use_gpu=run["use_gpu"],
            resources_per_worker={"GPU": 1, "CPU": run["cpus_per_worker"]} if run["use_gpu"]
            else {"CPU": run["cpus_per_worker"]},
        ),
        run_config=ray.train.RunConfig(
            name=f"trial-{trial_id}", storage_path=str(out / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=run["max_failures"]),
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        logger.error("trial %s: training failed: %s: %s", trial_id, type(exc).__name__, exc)
        with HyperlawClient(run["url"], run["token"]) as client:
            try:
                client.update_trial(trial_id, status="failed",
                                    status_reason=f"{type(exc).__name__}: {exc}"[:2000])
            except Exception as update_exc:  # noqa: BLE001 - already finished, or unreachable
                logger.warning("trial %s: could not mark failed: %s", trial_id, update_exc)
        raise


def _progress_callback(total: int, skipped: int):
    from ray import tune

    class SweepProgress(tune.Callback):
        """Logs trials done / running / failed and the best final evaluation loss so far."""

        def __init__(self) -> None:
            self.done = self.failed = 0
            self.running: set[str] = set()
            self.best: tuple[float, str] | None = None

        def _log(self) -> None:
            best = (f"best final_eval_loss {self.best[0]:.5g} ({self.best[1]})"
                    if self.best else "no result yet")
            logger.info("sweep progress: %d/%d done (%d skipped), %d running, %d failed; %s",
                        self.done + skipped, total + skipped, skipped, len(self.running),
                        self.failed, best)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._log()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.done += 1
            result = trial.last_result or {}
            loss = result.get("final_eval_loss")
            spec = trial.config["spec"]
            if loss is not None and math.isfinite(loss) and (self.best is None or loss < self.best[0]):
                self.best = (loss, f"lr={spec['learning_rate']:.4g}, "
                                   f"B={spec['batch_size_tokens']}, trial {spec['trial_id']}")
            self._log()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.failed += 1
            self._log()

    return SweepProgress()


def run_sweep(
    config: SweepConfig, *, url: str, token: str | None, address: str | None = None,
    resume: bool = False, ray_init: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> SweepSummary:
    """Run the sweep end to end; returns what happened (the service holds the details).
    ``ray_init`` adds keyword arguments to ``ray.init`` for a local cluster (tests use
    ``num_cpus=2, include_dashboard=False``); ``train_overrides`` are merged into every
    trial's training config at run time (not into its identity), e.g. ``fail_at_step`` to
    exercise restarts."""
    import ray
    from ray import tune

    from client import HyperlawClient

    t0 = time.perf_counter()
    with HyperlawClient(url, token) as client:
        exp_id, pending, skipped_ids = register_trials(config, client, resume=resume)
    skipped = len(skipped_ids)
    summary = SweepSummary(experiment_id=exp_id, skipped=skipped,
                           trial_ids=[s["trial_id"] for s in pending])
    logger.info("experiment %s (id %d): %d trials to run, %d already completed",
                config.experiment, exp_id, len(pending), skipped)
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
            use_gpu = (resources.get("GPU", 0) > 0 if config.use_gpu == "auto"
                       else bool(config.use_gpu))
            per_trial = config.workers_per_trial * config.cpus_per_worker
            if config.max_concurrent_trials == "auto":
                concurrent = max(1, int(resources.get("CPU", 1) // per_trial))
                if use_gpu:
                    concurrent = min(concurrent,
                                     max(1, int(resources["GPU"] // config.workers_per_trial)))
            else:
                concurrent = int(config.max_concurrent_trials)
            logger.info("running up to %d trials at once (%d workers x %g CPUs each%s)",
                        concurrent, config.workers_per_trial, config.cpus_per_worker,
                        ", GPUs" if use_gpu else "")
            run = {"url": url, "token": token, "output_dir": str(out),
                   "workers_per_trial": config.workers_per_trial,
                   "cpus_per_worker": config.cpus_per_worker, "use_gpu": use_gpu,
                   "max_failures": config.max_failures,
                   "train_overrides": dict(train_overrides or {})}
            tuner = tune.Tuner(
                # the driver only waits on its TorchTrainer: it holds no CPU (a token of memory keeps its
                # placement bundle non-empty), so the workers get all the cores
                tune.with_resources(_trial_driver, {"cpu": 0, "memory": 16 * 2**20}),
                param_space={"spec": tune.grid_search(pending), "run": run},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=concurrent,
                    trial_name_creator=lambda t: f"trial-{t.config['spec']['trial_id']}",
                    trial_dirname_creator=lambda t: f"trial-{t.config['spec']['trial_id']}",
                ),
                run_config=tune.RunConfig(
                    name=_slug(config.experiment), storage_path=str(out / "ray_tune"),
                    callbacks=[_progress_callback(len(pending), skipped)], verbose=0,
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
                if loss is not None and math.isfinite(loss) and (
                        summary.best is None or loss < summary.best["final_eval_loss"]):
                    summary.best = t
            elif ran_now:
                summary.failed += 1
    summary.wall_time_s = time.perf_counter() - t0
    return summary


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:100]


__all__ = ["SweepConfig", "SweepConfigError", "SweepSummary", "load_sweep_config",
           "parse_sweep_config", "expand_trials", "register_trials", "run_sweep",
           "idempotency_key", "model_n_params"]
