"""One training run: a DeepSpeed data-parallel engine over the GPT or the synthetic task.

``train(config)`` is the per-worker function (Ray Train calls it on every worker, see
``trainer.sweep``; it also runs as a single process). It reads top to bottom: configuration
and batch arithmetic (``trainer.config``), process group, task and model, optimizer and
DeepSpeed engine (``trainer.engine``), resume, then the loop: learning-rate schedule, one
optimizer step over the micro batches (gradient norm, clipping, b_simple: ``trainer.engine``),
EWA and evaluation (``trainer.schedule``), points, checkpoints. With ``precision`` bf16/fp16
the module's parameters are in that dtype; losses, evaluations and the EWA stay in fp32.

Points: every ``eval.log_every``-th step (default: about 500 per run) and every evaluated
step; rank 0 sends them to the service (``trainer.telemetry``). In a sweep every worker also
reports metrics to Ray after each evaluation (``report``, at most every REPORT_INTERVAL_S) and
rank 0 sets the trial's gauges on the Ray dashboard.

A loss that becomes NaN/inf, or exceeds ``divergence_factor`` × the first loss, ends the run
as diverged: recorded with its non-finite loss, not raised. An evaluated loss (the EWA
weights' for constant_ewa) at or below ``target_loss`` ends the run as having reached it, at
``steps_to_target`` interpolated linearly between that evaluation and the one before
(``fitting.cbs.steps_to_target``; its error is bounded by the spacing of the evaluations,
``trainer.schedule.evaluation_steps``). A run with a target may train up to
``max_budget_factor`` × ``n_tokens`` (Zhang et al.'s runs to a target loss); its schedule's
horizon stays ``n_tokens``. The trial records why the run stopped (``stop_reason``):
``diverged``, ``target`` (before its last step), ``budget`` (it trained all the tokens it
could: max_steps · batch_size_tokens), or ``failed`` on an exception.

Checkpoints, every ``checkpoint_every`` steps, into ``checkpoint_dir`` or (``ray_checkpoints``,
a sweep with ``storage``) through Ray Train's storage (``trainer.checkpoints``): save shard →
barrier → report, so a reported checkpoint is complete; rank 0 first delivers the points
before it, so that a run resumed from it loses none. A run started again (the same
directory, or a worker group that Ray Train restarts) resumes from its latest one (same
batches, optimizer state and EWA); a finished run deletes its directory (Ray Train keeps one
checkpoint, which the sweep deletes with its Ray Train run). A GPT's ``corpus_dir``
may be a URI: each node reads its own cached copy (``trainer.storage.local_corpus``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from client import HyperlawClient
from fitting.cbs import steps_to_target
from trainer.checkpoints import run_checkpoints
from trainer.config import TrainConfig, TrainConfigError, batch_layout
from trainer.data import (
    SyntheticRegression,
    SyntheticRegressionConfig,
    TokenCorpus,
    batch_generator,
)
from trainer.engine import (
    DTYPES,
    GradientStep,
    build_engine,
    finite_or_none,
    fp32_loss,
    init_distributed,
    mean_over_workers,
)
from trainer.model import GPT, GPTConfig, LinearRegression, LinearRegressionConfig
from trainer.schedule import EWA, evaluation_steps, lr_multiplier
from trainer.storage import local_corpus
from trainer.telemetry import NullTelemetry, RayProgress, ServiceTelemetry, TelemetrySink

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 10.0
#: How long a checkpoint waits for the points before it to reach the service; past it (an
#: outage) they stay buffered, sent later or spooled at the end, and the run goes on.
CHECKPOINT_FLUSH_S = 30.0


@dataclass
class RunResult:
    """What a run ended with (also the final metrics stored on the trial)."""

    status: str  # completed | failed
    stop_reason: str  # diverged | target | budget: why the loop ended (module docstring)
    diverged: bool
    steps_done: int
    tokens_done: int  # steps_done · batch_size_tokens: D of the final loss
    final_loss: float  # smoothed train loss (EMA, decay 0.9 per step); NaN/inf when diverged
    final_eval_loss: float  # last evaluation with the evaluation weights (EWA for constant_ewa)
    reached_target: bool
    steps_to_target: float | None  # interpolated; None when not reached (censored)
    target_loss: float | None
    n_params: int
    resumed_from_step: int
    wall_time_s: float  # the loop, evaluations included
    tokens_per_s: float  # tokens trained / (wall time − evaluation time)
    points_recorded: int

    def final_metrics(self) -> dict[str, Any]:
        final = {
            "final_loss": self.final_loss,
            "final_eval_loss": self.final_eval_loss,
            "steps_done": self.steps_done,
            "tokens_done": self.tokens_done,
            "diverged": self.diverged,
            "stop_reason": self.stop_reason,
        }
        if self.target_loss is not None:  # a run to a target (Zhang et al.'s CBS protocol)
            final.update(
                steps_to_target=self.steps_to_target,
                target_loss=self.target_loss,
                reached_target=self.reached_target,
            )
        return final


def train(
    config: TrainConfig | dict[str, Any],
    report: Callable[..., None] | None = None,
    telemetry: TelemetrySink | None = None,
    mark_failed: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Train one run on this worker.

    ``report(metrics)``: Ray Train's ``ray.train.report`` in sweeps. ``telemetry`` replaces
    the sink built from ``service_url``/``trial_id`` (rank 0 only). ``on_step(step, rank)``
    is called on every worker after each optimizer step and its checkpoint (tests inject
    failures through it). On an exception, the hook's included, the points are flushed and,
    with ``mark_failed``, the trial is marked failed before re-raising; sweeps pass False
    because Ray Train may restart the run from its checkpoint, and the sweep marks the trial
    failed only when the retries are spent.
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    torch.set_num_threads(config.threads_per_worker)
    rank, world_size, created_group = init_distributed()
    layout = batch_layout(
        config.batch_size_tokens, config.seq_len, world_size, config.micro_batch_size_sequences
    )
    total_steps, batch_tokens = config.steps, layout.batch_size_tokens  # the budget's steps
    max_steps, target = config.max_steps, config.target_loss  # max_steps > total: to a target
    if config.cbs_role == "to_target" and target is None:
        raise TrainConfigError("target_loss is required for cbs_role 'to_target'")

    # -- task and model (the same initialisation on every worker)
    torch.manual_seed(config.seed)
    data: SyntheticRegression | TokenCorpus
    model: LinearRegression | GPT
    if config.task == "synthetic":
        data = SyntheticRegression(SyntheticRegressionConfig(**config.synthetic))
        model = LinearRegression(LinearRegressionConfig(dim=data.config.dim))
    else:
        assert config.corpus_dir is not None  # TrainConfig requires it for the GPT
        data = TokenCorpus(local_corpus(config.corpus_dir))
        model = GPT(_gpt_config(config, data.vocab_size))

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's micro batch ``micro`` of ``step`` (a function of these only):
        x (m, dim), y (m,) for the synthetic task; token ids x, y (m, seq_len) for the GPT."""
        generator = batch_generator(config.seed, step, rank, micro)
        m = layout.micro_batch_size_sequences
        if isinstance(data, SyntheticRegression):
            return data.batch(m, generator)
        return data.batch("train", m, config.seq_len, generator)

    # -- optimizer and DeepSpeed engine
    engine, peak_lrs = build_engine(config, model, layout)
    gradient_step = GradientStep(engine, config, layout)
    ewa = None
    if config.schedule.name == "constant_ewa":
        ewa = EWA(list(engine.module.parameters()), config.schedule.ewa_decay)
    eval_seconds = 0.0  # left out of tokens/s

    def evaluate() -> tuple[float, float | None]:
        """(loss of the current weights, loss of the EWA weights or None); every worker."""
        nonlocal eval_seconds
        started = time.perf_counter()
        engine.module.eval()
        with torch.no_grad():
            current = _eval_loss(engine, data, config, rank, world_size)
            averaged = None
            if ewa is not None:
                with ewa.swapped_in():
                    averaged = _eval_loss(engine, data, config, rank, world_size)
        engine.module.train()
        eval_seconds += time.perf_counter() - started
        return current, averaged

    # -- resume from this run's last checkpoint, if any
    step, train_loss_ema, first_loss = 0, None, None
    evaluated: tuple[int, float] | None = None  # (step, loss) of the last evaluation
    best_eval = math.inf
    checkpoints = run_checkpoints(config)
    state = checkpoints.load(engine) if checkpoints is not None else None
    if state is not None:
        step, train_loss_ema = int(state["step"]), state["train_loss_ema"]
        first_loss = state["first_loss"]
        evaluated, best_eval = state.get("evaluated"), state.get("best_eval", math.inf)
        if ewa is not None:
            ewa.load_state_dict(state)
        logger.info("resumed from checkpoint at step %d", step)
    resumed_from_step = step

    # -- where the measurements go: the service (rank 0) and Ray
    sink = _telemetry(config, rank, telemetry)
    ray_progress = RayProgress(report, rank, world_size, engine.device, config.trial_id)
    sink.start()
    eval_at = evaluation_steps(total_steps, config.eval, until=max_steps)
    log_every = config.eval.log_every or max(1, total_steps // 500)  # ~500 points a run

    # -- the loop
    t_start = time.perf_counter()
    last_heartbeat = time.monotonic()
    tokens_since, time_since, tokens_per_s = 0, t_start, math.nan  # throughput over ≥ 1 s
    train_loss, last_eval = math.nan, math.nan
    diverged = reached_target = False
    reached_at: float | None = None  # steps to target, interpolated
    points_recorded = 0
    try:
        if step == 0:  # the curve starts at the initial weights
            current, averaged = evaluate()
            last_eval = averaged if averaged is not None else current  # EWA's if any
            evaluated, best_eval = (0, last_eval), last_eval
            initial = {"eval_loss": current, "ewa_eval_loss": averaged, "wall_time_s": 0.0}
            sink.add_point({"step": 0, "tokens": 0, **initial})
            points_recorded += 1
        while step < max_steps:
            lr_mult = lr_multiplier(step, total_steps, config.schedule)
            for group, peak_lr in zip(engine.optimizer.param_groups, peak_lrs, strict=True):
                group["lr"] = peak_lr * lr_mult
            gas = layout.gradient_accumulation_steps
            stats = gradient_step(get_batch(step, micro) for micro in range(gas))
            step += 1
            if ewa is not None:
                ewa.update()

            train_loss = stats.loss
            first_loss = train_loss if first_loss is None else first_loss
            ema = train_loss if train_loss_ema is None else 0.9 * train_loss_ema + 0.1 * train_loss
            train_loss_ema = ema
            diverged = (
                not math.isfinite(train_loss) or train_loss > config.divergence_factor * first_loss
            )
            tokens_since += batch_tokens
            now = time.perf_counter()
            if now - time_since >= 1.0 or step == max_steps:
                tokens_per_s = tokens_since / (now - time_since)
                tokens_since, time_since = 0, now
            progress = {"step": step, "tokens": step * batch_tokens, "train_loss": train_loss}
            point: dict[str, Any] = {
                **progress,
                "lr": config.learning_rate * lr_mult,
                "grad_norm": stats.grad_norm,
                "b_simple": stats.b_simple,
                "tokens_per_s": finite_or_none(tokens_per_s),
                "wall_time_s": now - t_start,
            }
            if step in eval_at or diverged:
                current, averaged = evaluate()
                last_eval = averaged if averaged is not None else current  # EWA's if any
                point.update(eval_loss=current, ewa_eval_loss=averaged)
                best_eval = min(best_eval, last_eval)  # (NaN never wins)
                if target is not None and not diverged and last_eval <= target:
                    reached_target = True  # interpolated from the previous evaluation (above)
                    bracket = [evaluated, (step, last_eval)] if evaluated else [(step, last_eval)]
                    steps, losses = zip(*bracket, strict=True)
                    reached_at = steps_to_target(steps, losses, target).steps
                evaluated = (step, last_eval)
                speed = point["tokens_per_s"] or 0.0  # Ray's metrics take numbers only
                metrics = {**progress, "eval_loss": last_eval, "tokens_per_s": speed}
                ray_progress.set_gauges(metrics)
                ray_progress.report(metrics)
            if step in eval_at or step % log_every == 0 or diverged:
                sink.add_point(point)
                points_recorded += 1
            if time.monotonic() - last_heartbeat > HEARTBEAT_INTERVAL_S:
                sink.heartbeat()
                last_heartbeat = time.monotonic()

            ending = diverged or reached_target or step == max_steps
            every = config.checkpoint_every
            if checkpoints is not None and every and step % every == 0 and not ending:
                # the points up to this step delivered first: a run resumed from this
                # checkpoint (on another node) starts after them, so none may be lost with
                # this worker's buffer; then save shard → barrier → report, so that a
                # reported checkpoint is complete
                sink.flush(timeout_s=CHECKPOINT_FLUSH_S)
                state = {"step": step, "train_loss_ema": train_loss_ema, "first_loss": first_loss}
                state.update(evaluated=evaluated, best_eval=best_eval)
                state.update(ewa.state_dict() if ewa is not None else {})
                checkpoints.save(engine, state, rank, ray_progress, progress)
            if on_step is not None:
                on_step(step, rank)
            if diverged:
                logger.warning("run diverged at step %d (train loss %s)", step, train_loss)
                break
            if reached_target:
                logger.info("target loss %s reached at step %.1f", target, reached_at)
                break
    except Exception as exc:
        logger.exception("training failed at step %d", step)
        if mark_failed:
            reason = f"{type(exc).__name__}: {exc}"[:2000]
            sink.finish(
                "failed",
                status_reason=reason,
                stop_reason="failed",
                steps_done=step,
                tokens_done=step * batch_tokens,
            )
        sink.close(timeout_s=30.0)
        raise

    wall = time.perf_counter() - t_start
    final_loss = train_loss_ema if train_loss_ema is not None else math.nan
    if diverged:  # the measured values stay in the points; the trial's result is "no loss"
        final_loss = train_loss if not math.isfinite(train_loss) else math.inf
        last_eval = last_eval if not math.isfinite(last_eval) else math.inf
    trained_tokens = (step - resumed_from_step) * batch_tokens
    if diverged:
        stop_reason = "diverged"
    elif step < max_steps:  # the evaluation loss reached target_loss first
        stop_reason = "target"
    else:  # a target reached at the last step trained the whole budget too
        stop_reason = "budget"
    result = RunResult(
        status="completed",
        stop_reason=stop_reason,
        diverged=diverged,
        steps_done=step,
        tokens_done=step * batch_tokens,
        final_loss=final_loss,
        final_eval_loss=last_eval,
        reached_target=reached_target,
        steps_to_target=reached_at,
        target_loss=target,
        n_params=model.n_params,
        resumed_from_step=resumed_from_step,
        wall_time_s=wall,
        tokens_per_s=trained_tokens / (wall - eval_seconds) if wall > eval_seconds else math.nan,
        points_recorded=points_recorded,
    )
    sink.finish("completed", **result.final_metrics())
    sink.close(timeout_s=60.0)
    # no key named "done": Tune would take it as the end of the trial and kill its driver
    ray_progress.report(
        force=True,
        metrics={
            "step": step,
            "tokens": result.tokens_done,
            "finished": True,
            "final_loss": final_loss if math.isfinite(final_loss) else math.inf,
            "final_eval_loss": last_eval if math.isfinite(last_eval) else math.inf,
            "diverged": diverged,
            "stop_reason": stop_reason,
            "reached_target": reached_target,
            "steps_to_target": reached_at,
            "best_eval_loss": best_eval if math.isfinite(best_eval) else math.inf,
            "n_params": model.n_params,
            "data_fingerprint": data.fingerprint,
        },
    )
    if checkpoints is not None:
        checkpoints.finish(rank)  # finished: its checkpoints have no more use
    if created_group:
        dist.barrier()
    return result


# ----------------------------------------------------------------------------- helpers


def _gpt_config(config: TrainConfig, vocab_size: int) -> GPTConfig:
    shape = GPTConfig(**{"seq_len": config.seq_len, "vocab_size": vocab_size, **config.model})
    if shape.seq_len < config.seq_len:
        raise TrainConfigError(
            f"model.seq_len must be >= seq_len (got {shape.seq_len} < {config.seq_len})"
        )
    return shape


def _eval_loss(
    engine: Any,
    data: SyntheticRegression | TokenCorpus,
    config: TrainConfig,
    rank: int,
    world_size: int,
) -> float:
    """Loss of the weights ``module`` holds now, the same on every worker: the synthetic
    task's exact population risk, or the GPT's mean next-token loss over ``eval.batches``
    fixed validation batches per worker (the same at every evaluation), averaged over the
    workers."""
    module, device = engine.module, engine.device
    if isinstance(data, SyntheticRegression):
        return data.risk(module.w)
    n_seq = max(1, min(16, config.batch_size_tokens // config.seq_len))
    total = 0.0
    for i in range(config.eval.batches):
        generator = batch_generator(config.seed + 1_000_003, i, rank, 0)
        x, y = data.batch("val", n_seq, config.seq_len, generator)
        dtype = DTYPES[config.precision]
        total += float(fp32_loss(module, module, x.to(device), y.to(device), dtype))
    return mean_over_workers(total / config.eval.batches, world_size, device)


def _telemetry(config: TrainConfig, rank: int, given: TelemetrySink | None) -> TelemetrySink:
    """Rank 0 reports: to ``given``, else to the service's trial ``trial_id``. Other ranks, and
    runs that belong to no trial, report nowhere."""
    if rank != 0:
        return NullTelemetry()
    if given is not None:
        return given
    if not config.service_url or config.trial_id is None:
        return NullTelemetry()
    url, token = config.service_url, config.service_token
    spool = Path(config.spool_dir) / f"trial-{config.trial_id}.jsonl" if config.spool_dir else None
    return ServiceTelemetry(lambda: HyperlawClient(url, token), config.trial_id, spool_path=spool)
