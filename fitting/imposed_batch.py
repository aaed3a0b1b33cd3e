"""The answer for a batch size the user must use: which η, and what it costs.

``learning_rate_for_batch`` = exp(x* + u*(v)) with v = ln B − y* and u* the ln η offset
minimising the surface's valley Q at v (the fitted η–B coupling). Its cost versus running at
the critical batch size: ``token_overhead`` = max(0, T(B)/T(CBS) − 1) (extra tokens, paid
above the CBS) and ``step_overhead`` = max(0, S(B)/S(CBS) − 1) (extra optimizer steps, paid
below it), with tokens-to-target T and steps S = T/B either from Zhang et al.'s
steps-to-target model, T(B) ∝ B + k and S(B) ∝ 1 + k/B (when the fit has a steps-to-target
CBS law), or from the surface (:func:`fitting.surface.log_tokens_to_target`), with
T(CBS) = (1+ε)·D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fitting import surface as surf
from fitting.results import Interval

SOURCE_LR_FOR_BATCH = "loss_surface argmin over learning rate at the imposed batch size"


@dataclass(frozen=True)
class ImposedBatch:
    """The imposed-batch part of a recommendation: ``fields`` go into the answer as they
    are, ``sources`` name what gave each, ``warnings`` say what to distrust."""

    fields: dict[str, Any]
    sources: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def imposed_batch(
    p: surf.SurfaceParams[float],
    *,
    log_optimum: tuple[float, float],
    batch_size_tokens: float,
    cbs: float,
    k_steps: float | None,
    overhead: float,
    lr_interval: Interval | None,
    cbs_source: str,
) -> ImposedBatch:
    """η at the imposed ``batch_size_tokens`` and its step and token overheads (module
    docstring). ``log_optimum`` = (x*, y*); ``k_steps`` is the steps-to-target law's k at
    (N, D) or None to take tokens-to-target from the surface."""
    x, y = log_optimum
    v0 = math.log(batch_size_tokens) - y
    lr_b = math.exp(x + float(surf.best_eta_offset(p, v0)))
    warnings = []
    if k_steps is not None:
        # Zhang et al.'s model: T(B) ∝ B + k, S(B) ∝ 1 + k/B.
        token_ratio = (batch_size_tokens + k_steps) / (cbs + k_steps)
        step_ratio = (1.0 + k_steps / batch_size_tokens) / (1.0 + k_steps / cbs)
    else:
        tau = surf.log_tokens_to_target(p, v0)
        # T(B)/D = e^tau; T(CBS) = (1+ε)·D; S = T/B.
        log_eps = math.log1p(overhead)
        token_ratio = math.exp(tau - log_eps) if math.isfinite(tau) else float("inf")
        step_ratio = token_ratio * cbs / batch_size_tokens
        if math.isinf(tau):
            warnings.append(
                f"batch_size_tokens={batch_size_tokens:.4g} does not reach the "
                f"optimum's loss within e^12 times n_tokens on the fitted surface"
            )
    return ImposedBatch(
        fields={
            "imposed_batch_size_tokens": batch_size_tokens,
            "learning_rate_for_batch": lr_b,
            "learning_rate_for_batch_interval": lr_interval,
            "step_overhead": max(0.0, step_ratio - 1.0),
            "token_overhead": max(0.0, token_ratio - 1.0),
        },
        sources={
            "learning_rate_for_batch": SOURCE_LR_FOR_BATCH,
            "step_overhead": cbs_source,
            "token_overhead": cbs_source,
        },
        warnings=warnings,
    )
