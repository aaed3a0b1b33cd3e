"""Ray Tune: ``HyperlawTuneCallback`` makes one hyperlaw run per Tune trial.

>>> from client.integrations.ray_tune import HyperlawTuneCallback
>>> tuner = tune.Tuner(train, param_space={
...     "learning_rate": tune.loguniform(1e-4, 1e-2), "batch_size": 512, "seq_len": 1024,
...     "n_params": 85_000_000, "n_tokens": 2_500_000_000},
...     run_config=tune.RunConfig(callbacks=[HyperlawTuneCallback(experiment="gpt-sweep")]))

It runs in the Tune driver (the process of ``Tuner.fit``), not in the trials: a trainable
reports with ``tune.report`` as it would anyway (``pip install "ray[tune]"``).

The config keys it reads, per trial, from ``trial.config`` (nested keys as Tune flattens
them, ``"optim/lr"``; ``config_keys`` names other keys, ``{"learning_rate": "optim/lr"}``);
the callback's argument of the same name is the value for a trial whose config lacks it:

- ``n_params``: N, the non-embedding parameters.
- ``n_tokens``: D, the run's token budget.
- ``seq_len``: the tokens per sequence.
- ``learning_rate``, else ``lr``: the peak η.
- ``batch_size_tokens``: B in tokens; else ``batch_size`` × ``seq_len``, where
  ``batch_size`` is the global batch in sequences (all workers, accumulation included).

A trial that lacks one of the five raises ``ValueError`` at its start, naming it. The whole
config, made JSON, is stored on the trial (its keys that are trial fields, ``weight_decay``,
``schedule``, ..., set them, as ``hyperlaw.init`` does).

Events:

- ``on_trial_start``: ``hyperlaw.init`` with ``key`` = the trial id, so a trial restored
  (``Tuner.restore``) goes on in its trial; a trial retried after a failure
  (``FailureConfig(max_failures=...)``, ``on_trial_recover``) goes on in its open run.
- ``on_trial_result``: a point at ``result[step_key]`` (default ``training_iteration``):
  ``loss`` and ``train_loss`` → train_loss, ``val_loss``, ``validation_loss`` and
  ``eval_loss`` → eval_loss, ``learning_rate`` and ``lr`` → lr, ``grad_norm``, other point
  columns as they are (``metric_names`` adds renames); ``tokens`` as reported, else step × B
  (right when the step key counts optimizer steps). Tune's own keys are not sent; the
  trainable's other numeric keys are sent as extras (``common.SEND_EXTRAS``).
- ``on_trial_complete``: completed, with the last losses, ``steps_done`` and
  ``tokens_done``; pruned when Tune stopped the trial before its ``stop`` criteria (a dict)
  were met: its scheduler (ASHA, ...) or a ``Stopper``, so give a budget as a ``stop`` dict
  or as the trainable's own end.
- ``on_trial_error``: failed, with the last line of the trial's error as the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.integrations.common import SHAPE_KEYS, PointMapper, jsonable, missing, tokens_at
from client.run import Run, init

try:
    from ray.tune import Callback
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        'client.integrations.ray_tune needs Ray Tune: pip install "ray[tune]"'
    ) from exc

#: result keys renamed to the service's point columns
RENAMES = {
    "loss": "train_loss",
    "val_loss": "eval_loss",
    "validation_loss": "eval_loss",
    "learning_rate": "lr",
}


class HyperlawTuneCallback(Callback):
    """One hyperlaw run per Tune trial (module docstring). ``experiment``, ``family``,
    ``config`` (merged over each trial's), ``url``, ``token``, ``offline`` and ``spool_dir``
    are ``hyperlaw.init``'s."""

    def __init__(
        self,
        experiment: str,
        *,
        family: str | None = None,
        n_params: int | None = None,
        n_tokens: int | None = None,
        seq_len: int | None = None,
        learning_rate: float | None = None,
        batch_size_tokens: int | None = None,
        config_keys: Mapping[str, str] | None = None,
        step_key: str = "training_iteration",
        metric_names: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        url: str | None = None,
        token: str | None = None,
        offline: bool | None = None,
        spool_dir: str | Path | None = None,
    ) -> None:
        self.experiment = experiment
        self.defaults: dict[str, Any] = {
            "n_params": n_params,
            "n_tokens": n_tokens,
            "seq_len": seq_len,
            "learning_rate": learning_rate,
            "batch_size_tokens": batch_size_tokens,
        }
        self.config_keys = dict(config_keys or {})
        self.step_key = step_key
        self.renames = {**RENAMES, **dict(metric_names or {})}
        self.user_config = dict(config or {})
        self.init_kwargs: dict[str, Any] = {
            "family": family,
            "url": url,
            "token": token,
            "offline": offline,
            "spool_dir": spool_dir,
        }
        self.runs: dict[str, Run] = {}
        self.shapes: dict[str, dict[str, Any]] = {}
        self.points: dict[str, PointMapper] = {}
        self.last_step: dict[str, int] = {}
        self.last_tokens: dict[str, int] = {}
        self.stopped_early: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        """Tune may pickle its callbacks: the open runs (threads) stay behind."""
        state = dict(self.__dict__)
        state.update(runs={}, points={}, last_step={}, last_tokens={}, stopped_early=set())
        return state

    def shape_of(self, trial_config: Mapping[str, Any]) -> dict[str, Any]:
        """N, D, seq_len, η and B of a trial (module docstring)."""
        flat = _flatten(trial_config)

        def value(name: str, *fallbacks: str) -> Any:
            for key in (self.config_keys.get(name, name), *fallbacks):
                if flat.get(key) is not None:
                    return flat[key]
            return self.defaults.get(name)

        shape = {name: value(name) for name in SHAPE_KEYS}
        if shape["learning_rate"] is None:
            shape["learning_rate"] = value("learning_rate", "lr")
        sequences = value("batch_size")
        if shape["batch_size_tokens"] is None and sequences and shape["seq_len"]:
            shape["batch_size_tokens"] = int(sequences) * int(shape["seq_len"])
        missing(
            shape,
            {
                key: f"put {self.config_keys.get(key, key)!r} in the trial's config or pass "
                f"{key}= to the callback"
                for key in SHAPE_KEYS
            },
            "ray tune",
        )
        return shape

    # -- Tune's events ---------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        trial_id = str(trial.trial_id)
        open_run = self.runs.get(trial_id)
        if open_run is not None and not open_run.finished:
            return  # retried after a failure: the same run goes on
        trial_config = dict(trial.config or {})
        shape = self.shape_of(trial_config)
        config = {**jsonable(trial_config), **self.user_config, "trainer": "ray tune"}
        self.shapes[trial_id] = shape
        self.points[trial_id] = PointMapper(self.renames)
        self.stopped_early.discard(trial_id)
        self.runs[trial_id] = init(
            experiment=self.experiment, key=trial_id, config=config, **shape, **self.init_kwargs
        )

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        trial_id = str(trial.trial_id)
        run = self.runs.get(trial_id)
        if run is None or run.finished:
            return
        step = result.get(self.step_key)
        if step is None:
            return
        step = int(step)
        point = self.points[trial_id]({k: v for k, v in result.items() if k not in _TUNE_KEYS})
        if "tokens" not in point:
            point["tokens"] = tokens_at(step, self.shapes[trial_id]["batch_size_tokens"])
        run.log(self.points[trial_id].at_step(step, point), step=step)
        self.last_step[trial_id], self.last_tokens[trial_id] = step, int(point["tokens"])
        if result.get("done") and not _criteria_met(trial, result):
            self.stopped_early.add(trial_id)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        trial_id = str(trial.trial_id)
        if trial_id in self.stopped_early:
            reason = "stopped by Tune before its stop criteria were met (scheduler or Stopper)"
            self._finish(trial_id, status="pruned", reason=reason)
        else:
            self._finish(trial_id, status="completed")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(str(trial.trial_id), status="failed", reason=_error_line(trial))

    def _finish(self, trial_id: str, *, status: str, reason: str | None = None) -> None:
        run = self.runs.get(trial_id)
        if run is None or run.finished:
            return
        last = self.points[trial_id].last
        final: dict[str, Any] = {
            "final_loss": last.get("train_loss"),
            "final_eval_loss": last.get("eval_loss"),
        }
        if trial_id in self.last_step:
            final["steps_done"] = self.last_step[trial_id]
            final["tokens_done"] = self.last_tokens[trial_id]
        run.finish(status=status, reason=reason, **final)


#: what Tune adds to every result (``ray.tune.result.AUTO_RESULT_KEYS`` and the rest)
_TUNE_KEYS = frozenset(
    {
        "done",
        "trial_id",
        "experiment_tag",
        "training_iteration",
        "time_this_iter_s",
        "time_total_s",
        "time_since_restore",
        "iterations_since_restore",
        "timesteps_total",
        "timesteps_since_restore",
        "episodes_total",
        "timestamp",
        "date",
        "pid",
        "hostname",
        "node_ip",
        "config",
        "checkpoint_dir_name",
        "should_checkpoint",
    }
)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _criteria_met(trial: Any, result: Mapping[str, Any]) -> bool:
    """Whether ``result`` meets the trial's own ``stop`` dict (Tune's rule: value ≥ bound)."""
    flat = _flatten(result)
    criteria = getattr(trial, "stopping_criterion", None) or {}
    return any(key in flat and flat[key] >= bound for key, bound in criteria.items())


def _error_line(trial: Any) -> str:
    """The last line of the trial's error, the exception's (``Type: message``): from the
    driver's error file (written before ``on_trial_error``), else from the trial's storage."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        text = ""
    text = text or str(trial.get_error() or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:2000] if lines else "the Tune trial failed"
