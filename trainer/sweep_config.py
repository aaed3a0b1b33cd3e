"""The sweep file of ``hyperlaw sweep``: a YAML document read into a frozen pydantic model.

A sweep is the product models × n_tokens × learning rates × batch sizes × seeds of runs that
share everything else. What they share are the ``RunSettings`` of ``trainer.config`` (task,
optimizer, schedule, eval, ...), so a sweep file's ``optimizer:``, ``schedule:`` and ``eval:``
sections are the training configuration's own models, with their defaults. Grid search lists
the learning rates and batch sizes; adaptive search places them around the service's
recommendation (``trainer.plan``). A ``cbs:`` section replaces the search with Zhang et al.'s
critical-batch-size protocol (``CBSConfig``; run by ``trainer.cbs_protocol``). Every run is
checked to be valid when the file is read (batch arithmetic included), so a bad file fails at
once, not inside Ray; so is ``precision`` (the training config's): 'fp16' with
``use_gpu: false`` is refused, DeepSpeed's CPU accelerator having no fp16.

``hyperlaw sweep --schema`` prints the JSON Schema (``sweep_json_schema``), committed as
``examples/sweep.schema.json``; a sweep file whose first line is
``# yaml-language-server: $schema=sweep.schema.json`` is checked and completed by editors
with a YAML language server. Errors are ``SweepConfigError``s naming the field and the rule,
as in ``trainer.config``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Gt, MinLen
from pydantic import (
    AllowInfNan,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from client.wire import DEFAULT_FAMILY, FAMILY_NAME_PATTERN, family_name_problem
from trainer.config import (
    FrozenConfig,
    PositiveInt,
    RunSettings,
    Task,
    TrainConfig,
    batch_layout,
    describe_errors,
)
from trainer.storage import is_uri, location_problem

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class SweepConfigError(ValueError):
    """A sweep file that breaks a rule; the message names the field."""


def _as_list(value: Any) -> Any:
    return value if value is None or isinstance(value, list) else [value]  # one value: a list


# a list in the YAML, or one value standing for a list of one
LearningRates = Annotated[
    list[Annotated[float, Gt(0), AllowInfNan(False)]], MinLen(1), BeforeValidator(_as_list)
]
Counts = Annotated[list[PositiveInt], MinLen(1), BeforeValidator(_as_list)]
Seeds = Annotated[list[int], MinLen(1), BeforeValidator(_as_list)]


class SearchConfig(FrozenConfig):
    kind: Literal["grid", "adaptive"] = "grid"
    """grid: the listed learning rates and batch sizes; adaptive: points around the
    service's recommendation at each (N, D)"""
    learning_rate: LearningRates | None = None
    """grid: peak learning rates"""
    batch_size_tokens: Counts | None = None
    """grid: global batch sizes in tokens"""
    points_per_axis: PositiveInt = 3
    """adaptive: learning rates and batch sizes per (N, D)"""
    lr_spread_decades: float = 0.5
    """adaptive: learning rates within ± this many decades of the recommended one"""
    batch_spread_octaves: float = 1.0
    """adaptive: batch sizes within ± this many octaves of the recommended one"""


class CBSConfig(FrozenConfig):
    """Zhang et al. 2024's critical-batch-size protocol at each (N, D), constant_ewa only:
    reference runs at a small batch size train D, tuned over a short η grid; the lowest EWA
    evaluation loss among them at D is the group's target; every other batch size (η tuned
    per B) trains until its EWA evaluation loss first reaches the target, interpolated between
    evaluations, capped at max_budget_factor × D and censored if never reached."""

    reference_batch_size_tokens: PositiveInt
    """the reference batch size B_ref, in tokens (small: in the linear-scaling regime)"""
    reference_learning_rates: LearningRates
    """the η grid of the reference runs (their best one sets the target)"""
    batch_size_tokens: Counts
    """the other batch sizes, each > reference_batch_size_tokens"""
    learning_rates: LearningRates | dict[PositiveInt, LearningRates] | None = None
    """the η grid tried at each other batch size; or one grid per batch size
    ({batch_size_tokens: [η, ...]}, one entry for each). Exactly one of learning_rates and
    relative_learning_rates"""
    relative_learning_rates: LearningRates | None = None
    """instead of learning_rates: multipliers m of the group's tuned reference η (η_ref*, of
    the reference run that set the target): each other B tries η = m · η_ref* ·
    (B / B_ref)^learning_rate_scaling, capped at max_learning_rate, so that the grid follows
    the optimum as it moves with D. The η values are known only once the group's target is,
    so they cannot be checked when the file is read; the batch layouts are"""
    learning_rate_scaling: float = Field(1.0, allow_inf_nan=False)
    """relative_learning_rates: s in (B / B_ref)^s; 1.0: linear scaling (SGD), 0.5:
    square-root scaling (Adam-style)"""
    max_learning_rate: float | None = Field(None, gt=0, allow_inf_nan=False)
    """relative_learning_rates: the largest η tried; a multiplier that would exceed it is
    clipped to it, and multipliers clipped to the same η run once (the smallest)"""
    max_budget_factor: float = Field(4.0, ge=1, allow_inf_nan=False)
    """a run to the target trains at most this many times D tokens"""

    @model_validator(mode="after")
    def _larger_than_the_reference(self) -> CBSConfig:
        for batch in self.batch_size_tokens:
            if batch <= self.reference_batch_size_tokens:
                raise ValueError(
                    f"cbs.batch_size_tokens values must be > cbs.reference_batch_size_tokens "
                    f"(got {batch} <= {self.reference_batch_size_tokens})"
                )
        if len(set(self.batch_size_tokens)) != len(self.batch_size_tokens):
            raise ValueError("cbs.batch_size_tokens values must be distinct")
        self._one_learning_rate_grid()
        if isinstance(self.learning_rates, dict):
            given, wanted = set(self.learning_rates), set(self.batch_size_tokens)
            if given != wanted:
                raise ValueError(
                    "cbs.learning_rates must have one entry per cbs.batch_size_tokens value "
                    f"(missing {sorted(wanted - given)}, unknown {sorted(given - wanted)})"
                )
        return self

    def _one_learning_rate_grid(self) -> None:
        absolute, relative = self.learning_rates, self.relative_learning_rates
        if (absolute is None) == (relative is None):
            raise ValueError(
                "needs exactly one of cbs.learning_rates (η values) and "
                "cbs.relative_learning_rates (multipliers of the reference η) "
                f"(got {'both' if relative is not None else 'neither'})"
            )
        if relative is None:
            given = sorted({"learning_rate_scaling", "max_learning_rate"} & self.model_fields_set)
            if given:
                raise ValueError(
                    f"cbs.{given[0]} applies to cbs.relative_learning_rates only "
                    "(cbs.learning_rates are η values)"
                )
        elif len(set(relative)) != len(relative):
            raise ValueError("cbs.relative_learning_rates values must be distinct")

    def learning_rates_at(self, batch: int) -> list[float]:
        """The η grid at ``batch`` of ``learning_rates`` (not of relative ones)."""
        rates = self.learning_rates
        assert rates is not None
        return rates[batch] if isinstance(rates, dict) else rates

    def relative_rules(self) -> list[dict[str, Any]]:
        """The ``relative_learning_rate`` of each multiplier (``trainer.config``'s
        ``RelativeLearningRate`` fields, η_ref* left out): what a run's identity holds."""
        return [
            {
                "multiplier": m,
                "scaling": self.learning_rate_scaling,
                "reference_batch_size_tokens": self.reference_batch_size_tokens,
                "max_learning_rate": self.max_learning_rate,
            }
            for m in self.relative_learning_rates or []
        ]


class SweepConfig(RunSettings):
    """A sweep of DeepSpeed trainings under Ray Tune, reported to the hyperlaw service."""

    experiment: str
    """the experiment's name in the service (trials are registered under it)"""
    family: Annotated[str, Field(json_schema_extra={"pattern": FAMILY_NAME_PATTERN})] = (
        DEFAULT_FAMILY
    )
    """what the runs' losses are comparable with (same data, tokenizer and model family):
    the service fits them only with the runs of the same family; 1-100 letters, digits,
    '.', '_' or '-', starting with a letter or digit"""
    description: str | None = None
    task: Task = "synthetic"
    models: list[dict[str, Any]] | None = None
    """gpt: model shapes (n_layer, n_head, d_model, ...); synthetic: overrides of the
    synthetic section (e.g. dim)"""
    model: dict[str, Any] | None = None
    """one model shape, instead of models"""
    n_tokens: Counts
    """token budgets D"""
    search: SearchConfig = SearchConfig()
    cbs: CBSConfig | None = None
    """Zhang et al.'s critical-batch-size protocol instead of search (constant_ewa only)"""
    seeds: Seeds = [0]
    workers_per_trial: PositiveInt = 1
    """DeepSpeed data-parallel workers of one trial"""
    cpus_per_worker: float = Field(1.0, gt=0)
    """also torch's threads per worker"""
    use_gpu: Literal["auto", True, False] = "auto"
    """auto: one GPU per worker when the Ray cluster has GPUs"""
    max_concurrent_trials: Literal["auto"] | PositiveInt = "auto"
    """auto: as many as the cluster's CPUs (and GPUs) hold"""
    max_failures: int = Field(1, ge=0)
    """restarts of a trial's workers from their last checkpoint"""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """how Ray places a trial's workers on the nodes (the strategy of its Ray Train placement
    group): PACK, on as few nodes as they fit; SPREAD, on as many as it can; STRICT_PACK, all
    on one node; STRICT_SPREAD, each on a node of its own (a trial waits until the cluster
    has workers_per_trial nodes with room)"""
    runs_per_trial: PositiveInt = 1
    """runs trained one after the other by one Ray Tune trial, in the same Ray Train workers
    (each still its own trial in the service): saves the workers' start-up (~20 s on a CPU)
    per run when runs are short"""
    output_dir: str = "hyperlaw-runs"
    """Ray's trial results and the checkpoints (without storage), and the spool"""
    storage: str | None = None
    """where Ray Tune's and Ray Train's results and the checkpoints go instead of output_dir
    (under a folder per experiment), so that a trial resumes on any node: a path every node
    mounts, or a URI (s3://bucket/prefix, with options such as
    ?endpoint_override=host:port&scheme=http; gs://, abfs://, hdfs://); credentials from the
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never in the URI"""

    @field_validator("experiment")
    @classmethod
    def _named(cls, experiment: str) -> str:
        if not experiment.strip():
            raise ValueError("must be a non-empty name")
        return experiment.strip()

    @field_validator("family")
    @classmethod
    def _family_name(cls, family: str) -> str:
        problem = family_name_problem(family)
        if problem is not None:
            raise ValueError(problem)
        return family

    @field_validator("storage", "corpus_dir")
    @classmethod
    def _location(cls, location: str | None) -> str | None:
        problem = None if location is None else location_problem(location)
        if problem is not None:
            raise ValueError(problem)
        return location

    @field_validator("search", mode="before")
    @classmethod
    def _empty_search(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _fp16_needs_gpus(self) -> SweepConfig:
        if self.precision == "fp16" and self.use_gpu is False:
            raise ValueError(
                "precision 'fp16' needs GPUs (use_gpu is false): DeepSpeed's CPU accelerator "
                "supports 'fp32' and 'bf16' only"
            )
        return self

    @model_validator(mode="after")
    def _every_run_is_valid(self) -> SweepConfig:
        """Every grid point must make a valid run: fail now, naming the field, not inside Ray.
        (Adaptive points are placed later, on the batch-size unit seq_len × workers.)"""
        if self.cbs is not None:
            return self._cbs_runs_are_valid(self.cbs)
        search = self.search
        if search.kind != "grid":
            return self
        learning_rates, batch_sizes = search.learning_rate, search.batch_size_tokens
        if learning_rates is None:
            raise ValueError("search.learning_rate is required")
        if batch_sizes is None:
            raise ValueError("search.batch_size_tokens is required")
        for batch in batch_sizes:
            batch_layout(
                batch, self.seq_len, self.workers_per_trial, self.micro_batch_size_sequences
            )
        for spec in self.grid(learning_rates, batch_sizes):
            TrainConfig.from_dict(spec)
        return self

    def _cbs_runs_are_valid(self, cbs: CBSConfig) -> SweepConfig:
        if "search" in self.model_fields_set:
            raise ValueError("search must not be given with cbs: (cbs: lists the runs)")
        if self.schedule.name != "constant_ewa":
            raise ValueError(
                f"schedule.name must be 'constant_ewa' with cbs: (got {self.schedule.name!r}): "
                "the target is an EWA loss, and runs to it train past D with no fixed horizon"
            )
        if self.target_loss is not None:
            raise ValueError("target_loss must not be set with cbs: (the reference runs set it)")
        for batch in [cbs.reference_batch_size_tokens, *cbs.batch_size_tokens]:
            batch_layout(
                batch, self.seq_len, self.workers_per_trial, self.micro_batch_size_sequences
            )
        for spec in self.cbs_grid():
            if spec["learning_rate"] is None:  # relative: η is known once the target is
                spec = {**spec, "learning_rate": 1.0}
            TrainConfig.from_dict(spec)
        return self

    def cbs_grid(self) -> list[dict[str, Any]]:
        """The training configs of the ``cbs:`` protocol, all shapes and budgets: reference
        runs (``cbs_role`` 'reference': B_ref × the reference η grid, trained to D), then runs
        to the target (``cbs_role`` 'to_target', up to ``max_budget_factor`` × D) of each
        other B × its η grid. Their identity holds the role, not the target: the target is
        known only once the reference runs are done, and is filled in at dispatch. A run of
        a relative η grid has ``learning_rate`` None and its ``relative_learning_rate`` rule
        (multiplier, scaling, cap): η is filled in with the target
        (``trainer.cbs_protocol.with_learning_rates``)."""
        assert self.cbs is not None
        cbs = self.cbs
        reference = {"cbs_role": "reference"}
        specs = self.grid(
            cbs.reference_learning_rates, [cbs.reference_batch_size_tokens], extra=reference
        )
        to_target = {"cbs_role": "to_target", "max_budget_factor": cbs.max_budget_factor}
        for batch in cbs.batch_size_tokens:
            if cbs.relative_learning_rates is None:
                specs += self.grid(cbs.learning_rates_at(batch), [batch], extra=to_target)
            for rule in cbs.relative_rules():
                relative = {**to_target, "relative_learning_rate": rule}
                specs += self.grid([None], [batch], extra=relative)
        return specs

    @property
    def shapes(self) -> list[dict[str, Any]]:
        """The model shapes: ``models``, else ``model``, else one default shape."""
        return self.models if self.models is not None else [self.model or {}]

    def grid(
        self,
        learning_rates: Sequence[float | None],
        batch_sizes: list[int],
        *,
        shapes: list[dict[str, Any]] | None = None,
        n_tokens: list[int] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """The training configs (``TrainConfig`` fields) of the product shapes × n_tokens ×
        learning rates (None: not known yet) × batch sizes × seeds; by default of all shapes
        and budgets; ``extra`` fields are added to each. The sections hold what the file sets
        (``TrainConfig`` adds the defaults): a run's identity (``trainer.plan.idempotency_key``)
        is a hash of these."""
        specs = []
        for shape in self.shapes if shapes is None else shapes:
            synthetic = {**self.synthetic, **shape} if self.task == "synthetic" else {}
            for budget in self.n_tokens if n_tokens is None else n_tokens:
                for lr in learning_rates:
                    for batch in batch_sizes:
                        for seed in self.seeds:
                            spec = self._spec(shape, synthetic, budget, lr, batch, seed)
                            specs.append({**spec, **(extra or {})})
        return specs

    def _spec(
        self, shape: dict, synthetic: dict, n_tokens: int, lr: float | None, batch: int, seed: int
    ) -> dict[str, Any]:
        return {
            "task": self.task,
            "learning_rate": lr,
            "batch_size_tokens": batch,
            "n_tokens": n_tokens,
            "seq_len": self.seq_len,
            "micro_batch_size_sequences": self.micro_batch_size_sequences,
            "model": {} if self.task == "synthetic" else dict(shape),
            "synthetic": synthetic,
            "corpus_dir": self.corpus_dir,
            "optimizer": self.optimizer.model_dump(exclude_unset=True),
            "schedule": self.schedule.model_dump(exclude_unset=True),
            "eval": self.eval.model_dump(exclude_unset=True),
            "target_loss": self.target_loss,
            "divergence_factor": self.divergence_factor,
            "zero_stage": self.zero_stage,
            "seed": seed,
            "threads_per_worker": max(1, int(self.cpus_per_worker)),
            "checkpoint_every": self.checkpoint_every,
            # only when not the default: the runs of files without it keep their identity
            **({"precision": self.precision} if self.precision != "fp32" else {}),
        }

    def with_output_dir(self, output_dir: str) -> SweepConfig:
        return self.model_copy(update={"output_dir": output_dir})

    def with_storage(self, storage: str) -> SweepConfig:
        """The sweep with ``storage`` replaced (``hyperlaw sweep --storage``), checked as the
        file's field is."""
        problem = location_problem(storage)
        if problem is not None:
            raise SweepConfigError(f"storage {problem}")
        return self.model_copy(update={"storage": storage})


def parse_sweep_config(raw: Any, base_dir: Path | None = None) -> SweepConfig:
    """Validate a parsed YAML document; a relative ``corpus_dir`` is resolved against
    ``base_dir`` (the YAML's folder); a URI is left as it is."""
    if not isinstance(raw, dict):
        raise SweepConfigError("the sweep file must be a mapping")
    corpus_dir = raw.get("corpus_dir")
    if (
        isinstance(corpus_dir, str)
        and base_dir is not None
        and not Path(corpus_dir).is_absolute()
        and not is_uri(corpus_dir)
    ):
        raw = {**raw, "corpus_dir": str((base_dir / corpus_dir).resolve())}
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise SweepConfigError(describe_errors(exc, SweepConfig)) from exc


def load_sweep_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepConfigError(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"not valid YAML: {exc}") from exc
    return parse_sweep_config(raw, base_dir=path.parent)


def sweep_json_schema() -> dict[str, Any]:
    """The JSON Schema of a sweep file, for editors (``hyperlaw sweep --schema``)."""
    return {"$schema": SCHEMA_DIALECT, **SweepConfig.model_json_schema()}
