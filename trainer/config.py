"""Configuration of one training run, and how its global batch is cut over the workers.

``TrainConfig`` is everything one run needs. ``RunSettings`` are the fields that all runs of a
sweep share (optimizer, schedule, evaluation, ...): ``TrainConfig`` and the sweep YAML
(``trainer.sweep_config.SweepConfig``) both extend it, so each default is written once, here.
All are frozen pydantic models that refuse unknown fields; a field's docstring is its
description in the sweep's JSON Schema.

Errors name the field and the rule, e.g. "schedule.warmup_fraction must be in [0, 1) (got 1.5)"
(``TrainConfigError``). The rule is read from the field's declaration, the same one that
validates it and that the JSON Schema publishes, so the message cannot drift from either.

Precision (``precision``, default fp32): bf16 runs on the CPU and on CUDA; fp16 only on CUDA,
since DeepSpeed 0.19's CPU accelerator refuses it: the engine refuses fp16 on the CPU when it
starts (``trainer.engine.deepspeed_config``), and a sweep file with ``use_gpu: false`` when it
is read, naming the field and the rule.

Batch arithmetic (asserted exactly, in tokens):
    batch_size_tokens = micro_batch_size_sequences × seq_len × gradient_accumulation × world_size
and the number of optimizer steps is steps = ⌊n_tokens / batch_size_tokens⌋, so the run
trains on D = steps · B tokens. The synthetic task counts one sample as one token (seq_len 1).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Gt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Task = Literal["synthetic", "gpt"]
Precision = Literal["fp32", "bf16", "fp16"]
PositiveInt = Annotated[int, Gt(0)]


class TrainConfigError(ValueError):
    """A training configuration that breaks a rule; the message names the field."""


class BatchSizeError(TrainConfigError):
    """Batch arithmetic that does not add up; the message shows the numbers."""


class FrozenConfig(BaseModel):
    """Immutable, unknown fields refused, field docstrings as descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# ----------------------------------------------------------------------------- the models


class OptimizerConfig(FrozenConfig):
    name: Literal["adamw", "sgd"] = "adamw"
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW's beta1; SGD's momentum"""
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    """decoupled weight decay of the matrices (µP: of the hidden matrices)"""
    grad_clip: float = Field(1.0, ge=0)
    """max global gradient norm; 0 disables clipping"""


class ScheduleConfig(FrozenConfig):
    name: Literal["constant_ewa", "wsd", "cosine"] = "constant_ewa"
    """learning-rate schedule after the warmup (trainer.schedule)"""
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    """linear warmup over ceil(warmup_fraction * steps) steps"""
    ewa_decay: float = Field(0.99, gt=0, lt=1)
    """constant_ewa: decay of the exponential weight average per optimizer step"""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """wsd: fraction of the steps spent decaying"""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """wsd and cosine: final learning rate / peak learning rate"""


class EvalConfig(FrozenConfig):
    every: int = Field(1000, gt=0)
    """evaluate every K steps (besides after step 0, powers of two and the dense tail)"""
    dense_start_fraction: float = 0.7
    """the dense tail starts at this fraction of the steps ..."""
    dense_interval_fraction: float = 0.05
    """... and evaluates every such fraction of the steps"""
    batches: int = Field(4, gt=0)
    """gpt: validation batches per evaluation and worker"""
    log_every: int = Field(0, ge=0)
    """record a train-loss point every k steps; 0: about 500 points per run"""


class RunSettings(FrozenConfig):
    """The settings that all runs of a sweep share."""

    task: Task
    """'synthetic': power-law linear regression; 'gpt': a GPT on a token corpus"""
    seq_len: PositiveInt = 1
    """tokens per sequence; 1 for the synthetic task (one sample is one token)"""
    micro_batch_size_sequences: PositiveInt | None = None
    """sequences per micro batch and worker; default: the worker's whole share (no accumulation)"""
    synthetic: dict[str, Any] = Field(default_factory=dict)
    """the synthetic task: dim, capacity_exponent, source_exponent, noise_std, task_seed"""
    corpus_dir: str | None = None
    """gpt: the token corpus (hyperlaw corpus build): a path, or a URI (s3://bucket/corpus)
    that each node copies once into its cache (trainer.storage)"""
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    target_loss: float | None = Field(None, allow_inf_nan=False)
    """stop when the evaluation loss reaches it"""
    divergence_factor: float = Field(100.0, gt=1)
    """a train loss above this many times the first one ends the run as diverged"""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage"""
    precision: Precision = "fp32"
    """parameters, activations and gradients: 'fp32'; or 'bf16' / 'fp16' (dynamic loss
    scaling) through DeepSpeed's own config, its optimizer keeping fp32 master weights; losses
    are computed and reported in fp32. fp16 needs CUDA: DeepSpeed's CPU accelerator has none"""
    checkpoint_every: int = Field(0, ge=0)
    """optimizer steps between checkpoints; 0: none"""

    @field_validator("synthetic", "optimizer", "schedule", "eval", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value  # a YAML key with nothing under it

    @model_validator(mode="after")
    def _shared_rules(self) -> RunSettings:
        if self.task == "synthetic" and self.seq_len != 1:
            raise ValueError(f"seq_len must be 1 for the synthetic task (got {self.seq_len})")
        if self.task == "gpt" and self.corpus_dir is None:
            raise ValueError("corpus_dir is required for task 'gpt'")
        if self.schedule.name == "constant_ewa" and self.zero_stage == 3:
            raise ValueError(
                "schedule.name 'constant_ewa' needs full parameters on every worker: "
                "zero_stage must be <= 2"
            )
        return self


class RelativeLearningRate(FrozenConfig):
    """How a run of a ``cbs:`` relative η grid chose its learning rate, from the reference run
    that set its (N, D) group's target: η = min(multiplier · η_ref* · (B / B_ref)^scaling,
    max_learning_rate)."""

    multiplier: float = Field(gt=0, allow_inf_nan=False)
    """m, one of cbs.relative_learning_rates"""
    scaling: float = Field(allow_inf_nan=False)
    """s, cbs.learning_rate_scaling"""
    reference_batch_size_tokens: PositiveInt
    """B_ref"""
    max_learning_rate: float | None = Field(None, gt=0, allow_inf_nan=False)
    """the cap on η; None: none"""
    reference_learning_rate: float | None = Field(None, gt=0, allow_inf_nan=False)
    """η_ref*: the reference run's learning rate, filled in with the group's target (not part
    of the run's identity)"""

    def learning_rate(self, batch_size_tokens: int) -> float:
        """η at B; needs ``reference_learning_rate``."""
        if self.reference_learning_rate is None:
            raise ValueError("the relative learning rate needs the reference_learning_rate")
        ratio = batch_size_tokens / self.reference_batch_size_tokens
        eta = self.multiplier * self.reference_learning_rate * ratio**self.scaling
        return eta if self.max_learning_rate is None else min(eta, self.max_learning_rate)


class TrainConfig(RunSettings):
    """Everything one run needs. ``from_dict`` validates and names the field that is wrong."""

    learning_rate: float = Field(gt=0, allow_inf_nan=False)
    """peak learning rate"""
    batch_size_tokens: PositiveInt
    """global batch size B, in tokens"""
    n_tokens: PositiveInt
    """token budget D"""
    model: dict[str, Any] = Field(default_factory=dict)
    """gpt: the shape (trainer.model.GPTConfig fields)"""
    seed: int = 0
    threads_per_worker: PositiveInt = 1
    checkpoint_dir: str | None = None
    """checkpoints in this directory, which every worker writes (trainer.checkpoints)"""
    ray_checkpoints: bool = False
    """checkpoints through Ray Train's storage instead (a sweep with storage)"""
    trial_id: int | None = None
    service_url: str | None = None
    service_token: str | None = None
    spool_dir: str | None = None
    """where points that cannot be delivered to the service are written"""
    cbs_role: Literal["reference", "to_target"] | None = None
    """a run of a sweep's cbs: protocol (Zhang et al. 2024): 'reference' trains n_tokens and
    its EWA evaluation loss sets its (N, D) group's target; 'to_target' trains until that
    target, which the sweep fills into target_loss when it starts the run"""
    max_budget_factor: float = Field(1.0, ge=1, allow_inf_nan=False)
    """a run to target_loss may train up to this many times n_tokens; its schedule's horizon
    (warmup, dense evaluation start) stays n_tokens"""
    relative_learning_rate: RelativeLearningRate | None = None
    """a run to the target of a cbs: relative η grid: how its learning_rate was chosen"""

    @model_validator(mode="after")
    def _budget_holds_a_batch(self) -> TrainConfig:
        if self.n_tokens < self.batch_size_tokens:
            raise ValueError(
                f"n_tokens must be >= batch_size_tokens (got n_tokens={self.n_tokens}, "
                f"batch_size_tokens={self.batch_size_tokens})"
            )
        if self.max_budget_factor > 1 and self.cbs_role != "to_target" and self.target_loss is None:
            raise ValueError(
                f"max_budget_factor {self.max_budget_factor:g} > 1 needs a target: "
                "target_loss, or cbs_role 'to_target'"
            )
        if self.max_budget_factor > 1 and self.schedule.name != "constant_ewa":
            raise ValueError(
                f"max_budget_factor {self.max_budget_factor:g} > 1 needs schedule.name "
                f"'constant_ewa' (got {self.schedule.name!r}): a decaying schedule ends at n_tokens"
            )
        return self._learning_rate_follows_its_rule()

    def _learning_rate_follows_its_rule(self) -> TrainConfig:
        rule = self.relative_learning_rate
        if rule is None:
            return self
        if self.cbs_role != "to_target":
            raise ValueError("relative_learning_rate needs cbs_role 'to_target'")
        if rule.reference_learning_rate is not None:
            expected = rule.learning_rate(self.batch_size_tokens)
            if not math.isclose(self.learning_rate, expected, rel_tol=1e-9):
                raise ValueError(
                    f"learning_rate must be relative_learning_rate's η at batch_size_tokens "
                    f"(got {self.learning_rate:.6g}, the rule gives {expected:.6g})"
                )
        return self

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise TrainConfigError(describe_errors(exc, cls, top="training")) from exc

    @property
    def steps(self) -> int:
        """Optimizer steps of the budget, the schedule's horizon: ⌊n_tokens / B⌋."""
        return self.n_tokens // self.batch_size_tokens

    @property
    def max_steps(self) -> int:
        """Optimizer steps at most: ⌊⌊max_budget_factor · n_tokens⌋ / batch_size_tokens⌋
        (``steps`` unless a run to a target may go beyond its budget)."""
        return int(self.max_budget_factor * self.n_tokens) // self.batch_size_tokens


# ----------------------------------------------------------------------------- batch layout


@dataclass(frozen=True)
class BatchLayout:
    """How one global batch is cut: micro × seq_len × accumulation × world = tokens."""

    batch_size_tokens: int
    seq_len: int
    world_size: int
    micro_batch_size_sequences: int
    gradient_accumulation_steps: int

    @property
    def batch_size_sequences(self) -> int:
        return self.batch_size_tokens // self.seq_len

    @property
    def micro_batch_tokens(self) -> int:
        return self.micro_batch_size_sequences * self.seq_len


def batch_layout(
    batch_size_tokens: int,
    seq_len: int,
    world_size: int,
    micro_batch_size_sequences: int | None = None,
) -> BatchLayout:
    """Split a global batch of ``batch_size_tokens`` over ``world_size`` workers; the micro
    batch defaults to each worker's whole share (no accumulation)."""
    if batch_size_tokens <= 0:
        raise BatchSizeError(f"batch_size_tokens must be > 0 (got {batch_size_tokens})")
    if seq_len <= 0:
        raise BatchSizeError(f"seq_len must be > 0 (got {seq_len})")
    if world_size <= 0:
        raise BatchSizeError(f"world_size must be > 0 (got {world_size})")
    if batch_size_tokens % seq_len:
        raise BatchSizeError(
            f"batch_size_tokens must be a multiple of seq_len: {batch_size_tokens} tokens is "
            f"not a whole number of {seq_len}-token sequences"
        )
    sequences = batch_size_tokens // seq_len
    if sequences % world_size:
        raise BatchSizeError(
            f"batch_size_sequences must be divisible by world_size: {sequences} sequences "
            f"({batch_size_tokens} tokens / seq_len {seq_len}) over {world_size} workers"
        )
    per_worker = sequences // world_size
    micro = per_worker if micro_batch_size_sequences is None else micro_batch_size_sequences
    if micro <= 0:
        raise BatchSizeError(f"micro_batch_size_sequences must be > 0 (got {micro})")
    if per_worker % micro:
        raise BatchSizeError(
            f"micro_batch_size_sequences must divide the per-worker batch: {per_worker} "
            f"sequences per worker ({sequences} / {world_size} workers) is not a multiple "
            f"of {micro}"
        )
    gas = per_worker // micro
    total = micro * seq_len * gas * world_size
    if total != batch_size_tokens:  # cannot happen after the checks above; kept as the contract
        raise BatchSizeError(
            f"batch arithmetic: micro {micro} × seq_len {seq_len} × accumulation {gas} × "
            f"world {world_size} = {total} tokens, expected batch_size_tokens={batch_size_tokens}"
        )
    return BatchLayout(batch_size_tokens, seq_len, world_size, micro, gas)


# ----------------------------------------------------------------------------- error messages


def describe_errors(exc: ValidationError, model: type[BaseModel], top: str = "") -> str:
    """One message for a pydantic ``ValidationError`` of ``model``: each wrong field with its
    rule ("eval.every must be > 0 (got 0)"), a missing one as "n_tokens is required", unknown
    ones per section ("unknown optimizer fields: momentum"; ``top`` names the top level), and
    the text of a validator's ValueError as it is (prefixed by the field it validated)."""
    unknown: dict[str, list[str]] = {}
    messages: dict[str, str] = {}  # one per field (a union reports each of its members)
    for error in exc.errors():
        loc, kind = error["loc"], error["type"]
        path, declared = _field_at(model, loc)
        if kind == "extra_forbidden":
            section = ".".join(str(part) for part in loc[:-1]) or top
            unknown.setdefault(section, []).append(str(loc[-1]))
        elif kind == "missing":
            messages.setdefault(path, f"{path} is required")
        elif kind in ("value_error", "assertion_error"):
            reason = str(error["ctx"]["error"])
            messages.setdefault(path, f"{path} {reason}" if path else reason)
        else:
            rule, got = _rule(declared), f"(got {error['input']!r})"
            text = f"must be {rule}" if rule else f"is wrong: {error['msg']}"
            messages.setdefault(path, f"{path} {text} {got}")
    listed = [
        f"unknown {section + ' ' if section else ''}fields: {', '.join(names)}"
        for section, names in unknown.items()
    ]
    return "; ".join(listed + list(messages.values()))


def _field_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[str, Any]:
    """The dotted path of the field at an error's location and its declared type (constraints
    included). An item of a list is "<list> values"; a union member's tag ends the walk (the
    rule of the whole union applies)."""
    names: list[str] = []
    item = False
    declared: Any = model
    for part in loc:
        kinds = [kind for kind, _ in _alternatives(declared)]
        submodel = next(
            (k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None
        )
        listed = next((k for k in kinds if get_origin(k) is list), None)
        if isinstance(part, str) and submodel is not None and part in submodel.model_fields:
            info = submodel.model_fields[part]
            declared = (
                Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            )
            names.append(part)
        elif isinstance(part, int) and listed is not None:
            declared, item = get_args(listed)[0], True
        else:
            break
    return ".".join(names) + (" values" if item else ""), declared


def _alternatives(declared: Any) -> list[tuple[Any, list[Any]]]:
    """(type, constraints) of each member of a union but None, or of the one type."""
    base, outer = _split(declared)
    union = get_origin(base) in (Union, types.UnionType)
    found = []
    for member in get_args(base) if union else (base,):
        if member is not type(None):
            kind, constraints = _split(member)
            found.append((kind, outer + constraints))
    return found


def _split(declared: Any) -> tuple[Any, list[Any]]:
    if get_origin(declared) is Annotated:
        base, *metadata = get_args(declared)
        return base, list(metadata)
    return declared, []


def _rule(declared: Any) -> str:
    """What a declared type demands, in the words that follow "must be": "> 0", "in [0, 1)",
    "'grid' or 'adaptive'", "one of 'constant_ewa', 'wsd' or 'cosine'", "'auto' or > 0"."""
    rules = [_member_rule(kind, constraints) for kind, constraints in _alternatives(declared)]
    return " or ".join(rule for rule in rules if rule)


def _member_rule(kind: Any, constraints: list[Any]) -> str:
    if get_origin(kind) is Literal:
        values = get_args(kind)
        words = [str(v).lower() if isinstance(v, bool) else repr(v) for v in values]
        listing = f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]
        names = len(values) > 2 and all(isinstance(v, str) for v in values)
        return f"one of {listing}" if names else listing  # "one of 'a', 'b' or 'c'"; "0, 1 or 2"
    bound = {}
    for constraint in constraints:
        for key in ("gt", "ge", "lt", "le", "min_length", "allow_inf_nan"):
            if getattr(constraint, key, None) is not None:
                bound[key] = getattr(constraint, key)
    if bound.get("min_length"):
        return "a non-empty list"
    lower = ("(", bound["gt"]) if "gt" in bound else ("[", bound["ge"]) if "ge" in bound else None
    upper = (bound["lt"], ")") if "lt" in bound else (bound["le"], "]") if "le" in bound else None
    if lower and upper:  # an interval: "in [0, 1)"
        text = f"in {lower[0]}{lower[1]}, {upper[0]}{upper[1]}"
    else:  # one bound or none: "> 0", ">= 0", "< 1", "<= 1", ""
        signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        text = " ".join(f"{sign} {bound[key]}" for key, sign in signs.items() if key in bound)
    if bound.get("allow_inf_nan") is False:
        text = f"{text} and finite" if text else "finite"
    return text
