"""Hugging Face ``transformers``: ``HyperlawCallback`` logs a ``Trainer`` run to hyperlaw.

>>> from client.integrations.huggingface import HyperlawCallback
>>> trainer = Trainer(model=model, args=args, train_dataset=train,
...                   callbacks=[HyperlawCallback(experiment="gpt2-sweep", seq_len=1024)])

What it derives, at ``on_train_begin`` (an argument given to the callback wins over each):

- η: ``args.learning_rate``.
- B, tokens: ``per_device_train_batch_size × gradient_accumulation_steps × world_size ×
  seq_len``. ``seq_len`` is asked for: the Trainer cannot tell how many tokens a batch's
  sequences hold (padded, truncated, packed). ``seq_len_from_model=True`` takes the model
  config's ``n_positions`` or ``max_position_embeddings`` instead, which is right only when
  every sequence fills the context (packed pre-training data).
- D: B × ``state.max_steps`` (from ``max_steps``, or from the epochs and the data).
- N: counted from the model (:func:`client.integrations.common.non_embedding_params`: all
  parameters minus the embedding matrices; a tied readout is the token embedding).
- Trial fields from ``args``: ``weight_decay``, ``adam_beta1``, ``adam_beta2``,
  ``adam_epsilon`` (adam_eps), ``max_grad_norm`` (grad_clip, when > 0),
  ``lr_scheduler_type`` (schedule), the warmup (warmup_fraction: a ``warmup_steps`` below 1
  or ``warmup_ratio`` is one, whole steps are divided by ``max_steps``), ``seed``,
  ``world_size``; ``model_shape`` (n_layer, n_head, d_model, vocab_size) from the model's
  config; every argument, made JSON, under the trial's ``config["training_args"]``.

Events: ``on_train_begin`` starts the run (``hyperlaw.init``; only on the main process,
``state.is_world_process_zero``; a second ``train()`` goes on in the same run). ``on_log``
sends a point at ``state.global_step`` (optimizer steps done) with ``tokens`` = step × B:
``loss`` → train_loss, ``eval_loss``, ``learning_rate`` → lr, ``grad_norm``; other keys
that are point columns as they are; other numeric keys (``epoch``, ``eval_runtime``, ...)
are sent as extras (``common.SEND_EXTRAS``). The log ``train()`` writes at its
end (``train_runtime`` and the mean ``train_loss`` over the run) is no point: its mean
would replace the last step's loss. ``on_train_end`` finishes the run as completed, with
the last train and eval losses, ``steps_done`` = global_step and ``tokens_done`` = steps × B.

An exception out of ``trainer.train()`` reaches no callback. When it ends the program, the
client's exit handling finishes the run as failed with the exception as the reason; when
you catch it, call ``callback.fail(exc)`` (else the run is finished as completed at exit).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.integrations.common import (
    PointMapper,
    jsonable,
    missing,
    non_embedding_params,
    reason_of,
    tokens_at,
)
from client.run import Run, init

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "client.integrations.huggingface needs Hugging Face transformers: pip install transformers"
    ) from exc

#: ``on_log`` keys renamed to the service's point columns
RENAMES = {"loss": "train_loss", "learning_rate": "lr"}
#: The key that marks the summary log of the end of ``train()`` (no point)
SUMMARY_KEY = "train_runtime"
_SHAPE_NAMES = {
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "d_model": "hidden_size",
    "vocab_size": "vocab_size",
}


class HyperlawCallback(TrainerCallback):
    """Log the ``Trainer``'s run to hyperlaw (module docstring). ``experiment``, ``family``,
    ``config`` (merged over what is derived), ``key``, ``url``, ``token``, ``offline`` and
    ``spool_dir`` are ``hyperlaw.init``'s; ``n_params``, ``n_tokens``, ``learning_rate`` and
    ``batch_size_tokens`` replace what would be derived."""

    def __init__(
        self,
        experiment: str,
        *,
        seq_len: int | None = None,
        seq_len_from_model: bool = False,
        family: str | None = None,
        n_params: int | None = None,
        n_tokens: int | None = None,
        learning_rate: float | None = None,
        batch_size_tokens: int | None = None,
        config: Mapping[str, Any] | None = None,
        key: str | None = None,
        url: str | None = None,
        token: str | None = None,
        offline: bool | None = None,
        spool_dir: str | Path | None = None,
    ) -> None:
        if seq_len is None and not seq_len_from_model:
            raise ValueError(
                "HyperlawCallback needs seq_len= (the tokens in each training sequence), or "
                "seq_len_from_model=True to take the model config's context length"
            )
        self.experiment = experiment
        self.seq_len = seq_len
        self.seq_len_from_model = seq_len_from_model
        self.given = {
            "n_params": n_params,
            "n_tokens": n_tokens,
            "learning_rate": learning_rate,
            "batch_size_tokens": batch_size_tokens,
        }
        self.user_config = dict(config or {})
        self.init_kwargs: dict[str, Any] = {
            "family": family,
            "key": key,
            "url": url,
            "token": token,
            "offline": offline,
            "spool_dir": spool_dir,
        }
        self.run: Run | None = None
        self.shape: dict[str, Any] = {}
        self.points = PointMapper(RENAMES)

    # -- what the run is -------------------------------------------------------------------

    def derive(self, args: Any, state: Any, model: Any) -> dict[str, Any]:
        """N, D, seq_len, η and B of this run (module docstring)."""
        model_config = getattr(model, "config", None)
        seq_len = self.seq_len
        if seq_len is None:
            seq_len = next(
                (
                    int(found)
                    for name in ("n_positions", "max_position_embeddings")
                    if isinstance(found := getattr(model_config, name, None), int)
                ),
                None,
            )
        shape: dict[str, Any] = {"seq_len": seq_len, **self.given}
        if shape["learning_rate"] is None:
            shape["learning_rate"] = float(args.learning_rate)
        if shape["batch_size_tokens"] is None and seq_len is not None:
            sequences = args.per_device_train_batch_size * args.gradient_accumulation_steps
            shape["batch_size_tokens"] = sequences * max(int(args.world_size), 1) * seq_len
        if shape["n_tokens"] is None and shape["batch_size_tokens"] and state.max_steps > 0:
            shape["n_tokens"] = int(state.max_steps) * shape["batch_size_tokens"]
        if shape["n_params"] is None and model is not None:
            shape["n_params"] = non_embedding_params(model)
        missing(
            shape,
            {
                "seq_len": "the model config has neither n_positions nor "
                "max_position_embeddings: pass seq_len=",
                "n_tokens": "state.max_steps is unknown: pass n_tokens=",
                "n_params": "the Trainer passed no model: pass n_params=",
            },
            "transformers",
        )
        return shape

    def trial_config(self, args: Any, state: Any, model: Any) -> dict[str, Any]:
        """The trial's fields from ``args`` and the model config, and ``training_args``."""
        fields: dict[str, Any] = {
            "weight_decay": args.weight_decay,
            "adam_beta1": args.adam_beta1,
            "adam_beta2": args.adam_beta2,
            "adam_eps": args.adam_epsilon,
            "schedule": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "seed": args.seed,
            "world_size": max(int(args.world_size), 1),
        }
        if args.max_grad_norm and args.max_grad_norm > 0:
            fields["grad_clip"] = args.max_grad_norm
        warmup = _warmup_fraction(args, state.max_steps)
        if warmup is not None:
            fields["warmup_fraction"] = warmup
        model_config = getattr(model, "config", None)
        model_shape = {
            name: found
            for name, attribute in _SHAPE_NAMES.items()
            if isinstance(found := getattr(model_config, attribute, None), int)
        }
        if model_shape:
            fields["model_shape"] = model_shape
        to_dict = getattr(args, "to_dict", None)
        training_args = jsonable(to_dict() if callable(to_dict) else vars(args))
        return {**fields, "trainer": "transformers", "training_args": training_args}

    # -- the Trainer's events --------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or (self.run is not None and not self.run.finished):
            return
        model = kwargs.get("model")
        self.shape = self.derive(args, state, model)
        config = {**self.trial_config(args, state, model), **self.user_config}
        self.run = init(experiment=self.experiment, config=config, **self.shape, **self.init_kwargs)

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.run is None or not logs or SUMMARY_KEY in logs:
            return
        point = self.points(logs)
        if point:
            step = int(state.global_step)
            point["tokens"] = tokens_at(step, self.shape["batch_size_tokens"])
            self.run.log(self.points.at_step(step, point), step=step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        steps = int(state.global_step)
        self.run.finish(
            final_loss=self.points.last.get("train_loss"),
            final_eval_loss=self.points.last.get("eval_loss"),
            tokens_done=tokens_at(steps, self.shape["batch_size_tokens"]),
            steps_done=steps,
        )

    def fail(self, exc: BaseException) -> None:
        """Finish the run as failed with ``exc`` as the reason (an exception you caught)."""
        if self.run is not None:
            self.run.finish(status="failed", reason=reason_of(exc))


def _warmup_fraction(args: Any, max_steps: int) -> float | None:
    ratio = getattr(args, "warmup_ratio", None)  # transformers < 5
    if ratio:
        return float(ratio)
    steps = getattr(args, "warmup_steps", 0) or 0
    if 0 < steps < 1:
        return float(steps)
    if steps >= 1 and max_steps > 0:
        return min(float(steps) / max_steps, 1.0)
    return 0.0 if steps == 0 else None
