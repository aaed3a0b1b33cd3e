"""Planning a sweep: its runs, their identities in the service, and their registration.

``expand_trials`` gives one training config (``TrainConfig`` fields) per run: the grid of the
sweep file, or for adaptive search, at each (N, D), ``points_per_axis`` learning rates and
batch sizes placed log-uniformly within ±``lr_spread_decades`` decades of the service's
recommended η* and ±``batch_spread_octaves`` octaves of its B*, so that trials concentrate
around the predicted optimum; the recommendation is that of the sweep's ``family``.

``register_trials`` creates the experiment in the sweep's family and one queued trial per
run (parametrization ``mup`` when the model is µP); a run's
``idempotency_key`` (N, D, η, B, seed and a hash of its training config) makes this
repeatable. The service is the record of what is finished: with ``resume`` (``hyperlaw sweep
--resume``) completed trials are skipped, a trial left ``running`` by an interrupted sweep
keeps its record and continues from its last DeepSpeed checkpoint
(``output_dir/checkpoints/trial-<id>``), and a failed trial is run again as a new trial record
(key suffix ``#retry<k>``) so that its failure stays in the history. Without ``resume`` a
sweep whose trials already exist refuses to start.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.data import SyntheticRegressionConfig
from trainer.model import GPTConfig, gpt_non_embedding_params
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
    """All training configs of the sweep (grid, or adaptive around the service's optimum)."""
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
    whole training config."""
    n = model_n_params(spec["task"], spec["model"], spec["synthetic"])
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return (
        f"N{n}-D{spec['n_tokens']}-lr{spec['learning_rate']:.6g}-"
        f"B{spec['batch_size_tokens']}-s{spec['seed']}-{digest[:12]}"
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
    meta_path = Path(spec["corpus_dir"]) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {
        "corpus": Path(spec["corpus_dir"]).name,
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


def register_trials(
    config: SweepConfig, client: Any, *, resume: bool
) -> tuple[int, list[dict[str, Any]], list[int]]:
    """Create the experiment and its queued trials. Returns (experiment id, the specs still
    to run with their ``trial_id``, the ids of trials skipped as already completed)."""
    experiment = client.ensure_experiment(config.experiment, config.description, config.family)
    exp_id = int(experiment["id"])
    existing = _existing_trials(client, exp_id)
    version = code_version()
    pending: list[dict[str, Any]] = []
    skipped: list[int] = []
    for spec in expand_trials(config, client):
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
