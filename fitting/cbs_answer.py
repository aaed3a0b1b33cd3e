"""The answer of a family whose runs measure steps to a target but do not determine a loss
surface: the critical batch size alone.

A sweep of Zhang et al.'s protocol (the sweep's ``cbs:`` section) trains, at each (N, D),
reference runs at one batch size and runs to a target at the others: it measures S(B) and
the CBS, not L(η, B), so the family's loss surface, and with it η* and B*, cannot be fitted.
Its recommender still answers with the CBS of its steps-to-target law
(:class:`fitting.steps_law.StepsCbsLaw`) and that law's prediction interval; η and B are NaN,
their sources say why, and a warning says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fitting.intervals import prediction_interval
from fitting.recommender_state import Recommendation
from fitting.results import Interval
from fitting.steps_law import StepsCbsLaw


def cbs_only_answer(
    law: StepsCbsLaw,
    law_document: Mapping[str, Any],
    *,
    n_params: float,
    n_tokens: float,
    seq_len: int,
    why: str,
    level: float = 0.9,
) -> Recommendation:
    """The :class:`~fitting.recommender_state.Recommendation` of the module docstring at
    (``n_params``, ``n_tokens``); ``law_document`` is the law as answers show it
    (:func:`fitting.steps_law.cbs_law_document`), ``why`` says why the loss surface is
    missing."""
    log_n, log_d = math.log(n_params), math.log(n_tokens)
    log_cbs = law.critical_batch_size.log_value(log_n, log_d)
    interval = prediction_interval(
        log_cbs,
        law.log_critical_batch_size_draws(log_n, log_d),
        np.array(law.critical_batch_size_residuals),
        law.residual_dof,
        level,
    )
    nan = Interval(math.nan, math.nan, level)
    unavailable = f"unavailable: {why}"
    sources = {
        "learning_rate": unavailable,
        "batch_size_tokens": unavailable,
        "critical_batch_size_tokens": law_document["source"],
    }
    return Recommendation(
        n_params=n_params,
        n_tokens=n_tokens,
        seq_len=seq_len,
        learning_rate=math.nan,
        learning_rate_interval=nan,
        batch_size_tokens=math.nan,
        batch_size_tokens_interval=nan,
        batch_size_sequences=math.nan,
        batch_size_sequences_interval=nan,
        critical_batch_size_tokens=math.exp(log_cbs),
        critical_batch_size_tokens_interval=interval,
        sources=sources,
        warnings=[
            f"learning_rate and batch_size_tokens are NaN: {why}; the critical batch size "
            "comes from the family's measured steps to target alone"
        ],
        critical_batch_size_law=dict(law_document),
    )
