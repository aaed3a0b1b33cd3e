"""Planning a sweep: its runs, their identities in the service, and their registration.

``expand_trials`` gives one training config (``TrainConfig`` fields) per run: the runs of the
sweep file's ``cbs:`` protocol (``SweepConfig.cbs_grid``), the grid, or for adaptive search,
at each (N, D), ``points_per_axis`` learning rates and batch sizes placed log-uniformly
within ±``lr_spread_decades`` decades of the service's recommended η* and
±``batch_spread_octaves`` octaves of its B*, so that trials concentrate around the predicted
optimum; the recommendation is that of the sweep's ``family``.

``register_trials`` creates the experiment in the sweep's family and one queued trial per
run (parametrization ``mup`` when the model is µP); a run's
``idempotency_key`` (N, D, η, B, seed and a hash of its training config) makes this
repeatable. The service is the record of what is finished: with ``resume`` (``hyperlaw sweep
--resume``) completed trials are skipped, a trial left ``running`` by an interrupted sweep
keeps its record and continues from its last DeepSpeed checkpoint
(``output_dir/checkpoints/trial-<id>``, or with ``storage`` Ray Train's: ``trainer.sweep``),
and a failed trial is run again as a new trial record (key suffix ``#retry<k>``) so that its
failure stays in the history. Without ``resume`` a
sweep whose trials already exist refuses to start.

The runs of a ``cbs:`` relative η grid (``learning_rate`` None) are known by their rule (the
multiplier, role and caps), not their η: their keys are checked at once, but their trials are
created only once their group's target sets η (``Registration.deferred``, then
``register_run``); there, a record still queued or running with another η (the group's
reference η changed since) is marked failed and retried.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.data import SyntheticRegressionConfig
from trainer.model import GPTConfig, gpt_non_embedding_params
from trainer.storage import basename, corpus_meta
from trainer.sweep_config import SweepConfig, SweepConfigError


def model_n_params(task: str, model: dict[str, Any], synthetic: dict[str, Any]) -> int:
    """N of a model shape without building it (the formulas live in trainer.model)."""
    if task == "synthetic":
        return int(synthetic.get("dim", SyntheticRegressionConfig().dim))
    shape = GPTConfig(**model)
    return gpt_non_embedding_params(shape.n_layer, shape.d_model)


def _adaptive_points(
    config: SweepConfig, client: Any, n_params: int, n_tokens: int
) -> tuple[list[float], list[int]]:
    """Learning rates and batch sizes around the service's recommendation at (N, D); batch
    sizes are whole multiples of seq_len × workers_per_trial (one sequence per worker)."""
    rec = client.recommend(
        n_params=n_params, n_tokens=n_tokens, seq_len=config.seq_len, family=config.family
    )
    eta, batch = float(rec["learning_rate"]), float(rec["batch_size_tokens"])
    search = config.search
    k = search.points_per_axis
    offsets = [0.0] if k == 1 else [-1 + 2 * i / (k - 1) for i in range(k)]  # in [-1, 1]
    lrs = [eta * 10 ** (search.lr_spread_decades * o) for o in offsets]
    unit = config.seq_len * config.workers_per_trial
    batches = {
        max(unit, round(batch * 2 ** (search.batch_spread_octaves * o) / unit) * unit)
        for o in offsets
    }
    return lrs, sorted(batches)


def expand_trials(config: SweepConfig, client: Any | None = None) -> list[dict[str, Any]]:
    """All training configs of the sweep (cbs: protocol, grid, or adaptive around the
    service's optimum)."""
    if config.cbs is not None:
        return config.cbs_grid()
    search = config.search
    if search.kind == "grid":  # both lists are there: checked when the file was read
        return config.grid(search.learning_rate or [], search.batch_size_tokens or [])
    if client is None:
        raise SweepConfigError("search.kind 'adaptive' needs the service for its recommendation")
    specs = []
    for shape in config.shapes:
        synthetic = {**config.synthetic, **shape} if config.task == "synthetic" else {}
        n_params = model_n_params(config.task, shape, synthetic)
        for n_tokens in config.n_tokens:
            lrs, batches = _adaptive_points(config, client, n_params, n_tokens)
            specs.extend(config.grid(lrs, batches, shapes=[shape], n_tokens=[n_tokens]))
    return specs


def idempotency_key(config: SweepConfig, spec: dict[str, Any]) -> str:
    """Readable and unique per (experiment, run config): N, D, η, B, seed and a hash of the
    whole training config. A run of a ``cbs:`` relative η grid is known by its rule, not its
    η (which its group's target sets): ``lrx<multiplier>``, and a hash of the config with
    neither η nor η_ref*, the same before and after they are filled in."""
    n = model_n_params(spec["task"], spec["model"], spec["synthetic"])
    rule = spec.get("relative_learning_rate")
    if rule is None:
        identity, lr = spec, f"lr{spec['learning_rate']:.6g}"
    else:
        rule = {k: v for k, v in rule.items() if k != "reference_learning_rate"}
        identity = {**spec, "learning_rate": None, "relative_learning_rate": rule}
        lr = f"lrx{rule['multiplier']:.6g}"
    text = json.dumps(identity, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return (
        f"N{n}-D{spec['n_tokens']}-{lr}-B{spec['batch_size_tokens']}-s{spec['seed']}-{digest[:12]}"
    )


def code_version() -> str:
    """Package version and, inside a git checkout, the commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("hyperlaw")
    except PackageNotFoundError:
        v = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{v}+{commit}" if commit else v


def _trial_fields(
    config: SweepConfig, spec: dict[str, Any], experiment_id: int, key: str, version: str
) -> dict[str, Any]:
    """The service's trial record of one run (``HyperlawClient.create_trial`` arguments)."""
    train = TrainConfig.from_dict(spec)
    n_params = model_n_params(spec["task"], spec["model"], spec["synthetic"])
    shape = spec["model"] if spec["task"] == "gpt" else {"dim": n_params}
    opt, schedule = train.optimizer, train.schedule
    return {
        "experiment_id": experiment_id,
        "n_params": n_params,
        "n_tokens": spec["n_tokens"],
        "seq_len": spec["seq_len"],
        "learning_rate": spec["learning_rate"],
        "batch_size_tokens": spec["batch_size_tokens"],
        "model_shape": shape,
        "adam_beta1": opt.beta1,
        "adam_beta2": opt.beta2,
        "adam_eps": opt.eps,
        "weight_decay": opt.weight_decay,
        "grad_clip": opt.grad_clip,
        "schedule": schedule.name,
        "parametrization": "mup" if spec["model"].get("mup") else "standard",
        "warmup_fraction": schedule.warmup_fraction,
        "zero_stage": spec["zero_stage"],
        "world_size": config.workers_per_trial,
        "seed": spec["seed"],
        "idempotency_key": key,
        "config": {
            "train": train.model_dump(),
            "code_version": version,
            "task": spec["task"],
            "data": _data_description(spec),
        },
    }


def _data_description(spec: dict[str, Any]) -> dict[str, Any]:
    """What the run trains on, with a fingerprint that changes when the data does."""
    if spec["task"] == "synthetic":
        task = SyntheticRegressionConfig(**spec["synthetic"])
        return {"synthetic": task.as_dict(), "fingerprint": task.fingerprint}
    meta = corpus_meta(spec["corpus_dir"])  # a path or a URI
    return {
        "corpus": basename(spec["corpus_dir"]),
        "fingerprint": meta.get("fingerprint"),
        "tokenizer": meta.get("tokenizer"),
    }


def _existing_trials(client: Any, experiment_id: int) -> dict[str, dict[str, Any]]:
    """The experiment's trials by idempotency key (all pages)."""
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
class Registration:
    """The sweep's experiment and its runs: ``pending`` (to run) and ``skipped`` (completed)
    with their ``trial_id``; ``deferred``, the runs of a ``cbs:`` relative η grid, whose η is
    known only once their group's target is (``register_run`` then)."""

    experiment_id: int
    existing: dict[str, dict[str, Any]]  # the experiment's trials by key, when registering
    version: str
    pending: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    deferred: list[dict[str, Any]] = field(default_factory=list)


def register_trials(config: SweepConfig, client: Any, *, resume: bool) -> Registration:
    """Create the experiment and a queued trial per run whose η is known; a run with
    ``learning_rate`` None is deferred, its key checked already."""
    experiment = client.ensure_experiment(config.experiment, config.description, config.family)
    exp_id = int(experiment["id"])
    registration = Registration(exp_id, _existing_trials(client, exp_id), code_version())
    for spec in expand_trials(config, client):
        attempts = _attempts(registration, idempotency_key(config, spec))
        if attempts and not resume:
            raise SweepConfigError(
                f"experiment {config.experiment!r} already has trial {attempts[0]!r}; "
                "use --resume to continue it"
            )
        if spec["learning_rate"] is None:
            registration.deferred.append(spec)
        else:
            register_run(config, client, registration, spec)
    return registration


def _attempts(registration: Registration, key: str) -> list[str]:
    """The keys of the trials of the run with ``key``: its own, then its retries
    ``#retry<k>``."""
    found = [k for k in registration.existing if k == key or k.startswith(key + "#retry")]
    return sorted(found, key=lambda k: (len(k), k))


def register_run(
    config: SweepConfig, client: Any, registration: Registration, spec: dict[str, Any]
) -> None:
    """Find or create the run's trial: a completed one is skipped; one left queued or running
    is continued; a failed one is retried as a new trial (``#retry<k>``), and so is one
    registered with another η (a relative run whose η_ref* changed since: it is marked
    failed, with the reason)."""
    key = idempotency_key(config, spec)
    attempts = _attempts(registration, key)
    latest_key = attempts[-1] if attempts else key
    latest = registration.existing.get(latest_key)
    if latest is not None and latest["status"] == "completed":
        registration.skipped.append({**spec, "trial_id": int(latest["id"])})
        return
    if latest is not None and latest["status"] in ("failed", "pruned"):
        latest_key = f"{key}#retry{len(attempts)}"
    fields = _trial_fields(
        config, spec, registration.experiment_id, latest_key, registration.version
    )
    trial = client.create_trial(**fields)  # the stored one where the key is taken
    if not math.isclose(trial["learning_rate"], spec["learning_rate"], rel_tol=1e-9):
        reason = (
            f"registered with lr={trial['learning_rate']:.6g}; its group's reference η now "
            f"gives lr={spec['learning_rate']:.6g}: run again as a new trial"
        )
        client.update_trial(
            trial["id"], status="failed", status_reason=reason, stop_reason="failed"
        )
        fields["idempotency_key"] = f"{key}#retry{len(attempts)}"
        trial = client.create_trial(**fields)
    registration.pending.append({**spec, "trial_id": int(trial["id"])})
