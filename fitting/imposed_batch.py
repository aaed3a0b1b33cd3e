"""The answer for a batch size the user must use: which η, and what it costs.

``learning_rate_for_batch`` comes from the bell curve of η*(B) fitted across the groups
(:mod:`fitting.bell_state`), scaled through the loss surface's optimum (x*, y*) at (N, D):

    ln η(B) = x* + g(y* − ln b_crit(N, D)) − g(ln B − ln b_crit(N, D)),
    g(v) = ln((β·e^(−α·v) + α·e^(β·v)) / (α + β))   (Li et al.'s bell at α = β = ½),

with its 90 % prediction interval from the bell's and the surface's draws and the groups'
own η*_g(B) about it. On the Step Law sweep, leave one group out, its regret at each of the
held-out groups' batch sizes is 0.057 % mean against 0.099 % for the surface coupling below
(``benchmarks/imposed_batch.py``; the figures and the forms tried are in
:mod:`fitting.bell_state`).

When the bell fit is not ok (too few groups with 3 batch sizes whose η optimum is
bracketed), the named fallback is the surface's own η–B coupling: exp(x* + u*(v)) with
v = ln B − y* and u* the ln η offset minimising the surface's valley Q at v
(:func:`fitting.surface.best_eta_offset`). On the Step Law sweep it overestimates the groups'
own best η by 1.3–1.8× once B ≥ 2–4 × B*, so above 2·B* the answer warns.

Its cost versus running at the critical batch size: ``token_overhead`` =
max(0, T(B)/T(CBS) − 1) (extra tokens, paid above the CBS) and ``step_overhead`` =
max(0, S(B)/S(CBS) − 1) (extra optimizer steps, paid below it), with tokens-to-target T and
steps S = T/B either from Zhang et al.'s steps-to-target model, T(B) ∝ B + k and
S(B) ∝ 1 + k/B (when the fit has a steps-to-target CBS law), or from the surface
(:func:`fitting.surface.log_tokens_to_target`), with T(CBS) = (1+ε)·D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fitting import surface as surf
from fitting.bell_state import BellState
from fitting.results import Interval

SOURCE_LR_FOR_BATCH = "loss_surface argmin over learning rate at the imposed batch size"
#: The fallback's source, with why the bell was not used.
SOURCE_FALLBACK = SOURCE_LR_FOR_BATCH + " (fallback: the bell fit is {status}: {reason})"
FALLBACK_WARNING = (
    "learning_rate_for_batch comes from the loss surface's learning-rate-batch coupling "
    "(the bell fit is {status}), which overestimated the best learning rate by 1.3-1.8x "
    "at batch sizes 2-4x above the optimal one on the Step Law sweep; "
    "batch_size_tokens={batch:.4g} is {ratio:.3g}x the optimal batch size"
)


@dataclass(frozen=True)
class ImposedBatch:
    """The imposed-batch part of a recommendation: ``fields`` go into the answer as they
    are, ``sources`` name what gave each, ``warnings`` say what to distrust."""

    fields: dict[str, Any]
    sources: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def learning_rate_for_batch(
    p: surf.SurfaceParams[float],
    *,
    log_scale: tuple[float, float],
    log_optimum: tuple[float, float],
    batch_size_tokens: float,
    bell: BellState | None,
    draws: surf.SurfaceParams[np.ndarray] | None,
    surface_interval: Interval | None,
    anchor_variance: float = 0.0,
) -> tuple[float, Interval | None, str, list[str]]:
    """(η, its interval, its source, warnings) at the imposed batch (module docstring):
    from ``bell`` when it is ok, else the surface coupling of ``p`` with
    ``surface_interval``. ``log_scale`` = (ln N, ln D), ``log_optimum`` = (x*, y*),
    ``draws`` the surface's bootstrap draws (None without any), ``anchor_variance`` that
    of x* between law forms (:mod:`fitting.extrapolation`), added to the bell's interval."""
    log_n, log_d = log_scale
    x, y = log_optimum
    log_batch = math.log(batch_size_tokens)
    if bell is not None and bell.ok:
        log_lr = bell.log_learning_rate(log_n, log_d, log_batch, log_optimum)
        interval = bell.interval(
            log_n, log_d, log_batch, log_optimum, draws, extra_variance=anchor_variance
        )
        return math.exp(log_lr), interval, bell.source, []
    status, reason = ("not fitted", "") if bell is None else (bell.status.value, bell.reason)
    lr = math.exp(x + float(surf.best_eta_offset(p, log_batch - y)))
    source = SOURCE_FALLBACK.format(status=status, reason=reason or "no bell state stored")
    warnings = []
    if log_batch - y > math.log(2.0):
        ratio = math.exp(log_batch - y)
        warnings.append(
            FALLBACK_WARNING.format(status=status, batch=batch_size_tokens, ratio=ratio)
        )
    return lr, surface_interval, source, warnings


def imposed_batch(
    p: surf.SurfaceParams[float],
    *,
    log_scale: tuple[float, float],
    log_optimum: tuple[float, float],
    batch_size_tokens: float,
    cbs: float,
    k_steps: float | None,
    overhead: float,
    lr_interval: Interval | None,
    cbs_source: str,
    bell: BellState | None = None,
    draws: surf.SurfaceParams[np.ndarray] | None = None,
    anchor_variance: float = 0.0,
) -> ImposedBatch:
    """η at the imposed ``batch_size_tokens`` (:func:`learning_rate_for_batch`) and its step
    and token overheads (module docstring). ``log_optimum`` = (x*, y*); ``lr_interval`` is
    the surface coupling's interval, used with the fallback; ``k_steps`` is the
    steps-to-target law's k at (N, D) or None to take tokens-to-target from the surface;
    ``bell``, ``draws`` and ``anchor_variance`` go to :func:`learning_rate_for_batch`."""
    lr_b, lr_b_interval, lr_source, warnings = learning_rate_for_batch(
        p,
        log_scale=log_scale,
        log_optimum=log_optimum,
        batch_size_tokens=batch_size_tokens,
        bell=bell,
        draws=draws,
        surface_interval=lr_interval,
        anchor_variance=anchor_variance,
    )
    v0 = math.log(batch_size_tokens) - log_optimum[1]
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
            "learning_rate_for_batch_interval": lr_b_interval,
            "step_overhead": max(0.0, step_ratio - 1.0),
            "token_overhead": max(0.0, token_ratio - 1.0),
        },
        sources={
            "learning_rate_for_batch": lr_source,
            "step_overhead": cbs_source,
            "token_overhead": cbs_source,
        },
        warnings=warnings,
    )
