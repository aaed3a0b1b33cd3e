"""The critical batch size as a law in (N, D) across groups of runs that carry steps to a
target loss: Zhang et al. (2024)'s method as :mod:`fitting.recommender` uses it.

The input is a :class:`fitting.cbs.StepsTable`: per group (same N, same target), each batch
size's steps to the target. Per group, log S = log(a + b/B) is fitted
(:func:`fitting.critical_batch.fit_critical_batch_size`, α = 1), which gives

    B*_g = (1+ε)·B_ref + ε·k_g,   k_g = b/a,

with B_ref the group's smallest batch size that reached the target; D_g is the group's budget,
the D at which the reference run set the target (Zhang et al.'s CBS(D)), or, where the table
does not know it (a CSV of steps), S(B_ref)·B_ref, the tokens the fit takes to reach the
target at B_ref. Across at least 3 groups, both B* and k are fitted as power laws in log space
(:mod:`fitting.powerlaw`),

    ln B* = log_coefficient + n_params_exponent·ln N + n_tokens_exponent·ln D,

and likewise ln k; in D alone (n_params_exponent = 0) when the joint law cannot be fitted.
A bootstrap over groups refits both laws; with the groups' offsets from the B* law,
ln B*_g − ln B*(N_g, D_g), on G − 1 − (number of regressors) degrees of freedom, its draws
give the prediction interval of a new group's B* (:func:`fitting.intervals.prediction_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fitting.cbs import StepsTable
from fitting.critical_batch import fit_cbs_scaling, fit_critical_batch_size
from fitting.powerlaw import PowerLawFit, fit_power_law

_JOINT: tuple[str, ...] = ("n_params", "n_tokens")
_TOKENS_ONLY: tuple[str, ...] = ("n_tokens",)


@dataclass(frozen=True)
class LogLinearLaw:
    """y = e^log_coefficient · N^n_params_exponent · D^n_tokens_exponent, kept in log space:

        ln y = log_coefficient + n_params_exponent·ln N + n_tokens_exponent·ln D.

    An exponent the law was not fitted in is 0.
    """

    log_coefficient: float
    n_params_exponent: float
    n_tokens_exponent: float

    @classmethod
    def from_power_law(cls, fit: PowerLawFit) -> LogLinearLaw:
        """The law of an ok :class:`~fitting.powerlaw.PowerLawFit` in n_params and/or n_tokens."""
        exponents = dict(zip(fit.names, fit.exponents, strict=True))
        return cls(
            log_coefficient=math.log(fit.coefficient),
            n_params_exponent=exponents.get("n_params", 0.0),
            n_tokens_exponent=exponents.get("n_tokens", 0.0),
        )

    def terms(self) -> np.ndarray:
        """(log_coefficient, n_params_exponent, n_tokens_exponent), so that
        ln y = terms · (1, ln N, ln D)."""
        return np.array([self.log_coefficient, self.n_params_exponent, self.n_tokens_exponent])

    def power_law(self) -> dict[str, float]:
        """``{"coefficient", "n_params_exponent", "n_tokens_exponent"}``: y = c·N^β·D^γ."""
        return {
            "coefficient": math.exp(self.log_coefficient),
            "n_params_exponent": self.n_params_exponent,
            "n_tokens_exponent": self.n_tokens_exponent,
        }

    def log_value(self, log_n: float, log_d: float) -> float:
        """ln y at ln N = ``log_n``, ln D = ``log_d``."""
        return float(self.terms() @ np.array([1.0, log_n, log_d]))

    def as_dict(self) -> dict[str, float]:
        return {
            "log_coefficient": self.log_coefficient,
            "n_params_exponent": self.n_params_exponent,
            "n_tokens_exponent": self.n_tokens_exponent,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> LogLinearLaw:
        return cls(
            log_coefficient=float(d["log_coefficient"]),
            n_params_exponent=float(d["n_params_exponent"]),
            n_tokens_exponent=float(d["n_tokens_exponent"]),
        )


@dataclass(frozen=True)
class StepsCbsLaw:
    """The critical batch size law (``critical_batch_size``, B* in tokens) and the law of
    k = b/a (``k``, tokens) of the module docstring, fitted over ``n_groups`` groups in the
    ``regressors`` (("n_params", "n_tokens") or ("n_tokens",)), with the bootstrap refits
    of each (``critical_batch_size_draws`` and ``k_draws``, one entry per ok draw, in the
    same order), and ``critical_batch_size_residuals``, each group's ln B*_g minus the law's.
    """

    regressors: tuple[str, ...]
    n_groups: int
    critical_batch_size: LogLinearLaw
    k: LogLinearLaw
    critical_batch_size_draws: tuple[LogLinearLaw, ...] = ()
    k_draws: tuple[LogLinearLaw, ...] = ()
    critical_batch_size_residuals: tuple[float, ...] = ()

    def describe(self, overhead: float) -> str:
        """The source of a CBS this law gives, as recommendations name it."""
        return (
            f"steps-to-target, Zhang et al. epsilon={overhead:g}: power law in "
            f"{', '.join(self.regressors)} over {self.n_groups} groups of measured steps to "
            "target (fitting.steps_law)"
        )

    def log_critical_batch_size_draws(self, log_n: float, log_d: float) -> np.ndarray:
        """ln B* of every bootstrap draw at (ln N, ln D) (empty without draws)."""
        if not self.critical_batch_size_draws:
            return np.zeros(0)
        terms = np.array([law.terms() for law in self.critical_batch_size_draws])
        return terms @ np.array([1.0, log_n, log_d])

    @property
    def residual_dof(self) -> int:
        """Degrees of freedom of the residuals about the B* law: G − 1 − len(regressors)."""
        return max(len(self.critical_batch_size_residuals) - 1 - len(self.regressors), 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "regressors": list(self.regressors),
            "n_groups": self.n_groups,
            "critical_batch_size": self.critical_batch_size.as_dict(),
            "k": self.k.as_dict(),
            "critical_batch_size_draws": [law.as_dict() for law in self.critical_batch_size_draws],
            "k_draws": [law.as_dict() for law in self.k_draws],
            "critical_batch_size_residuals": list(self.critical_batch_size_residuals),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepsCbsLaw:
        return cls(
            regressors=tuple(str(name) for name in d["regressors"]),
            n_groups=int(d["n_groups"]),
            critical_batch_size=LogLinearLaw.from_dict(d["critical_batch_size"]),
            k=LogLinearLaw.from_dict(d["k"]),
            critical_batch_size_draws=tuple(
                LogLinearLaw.from_dict(law) for law in d["critical_batch_size_draws"]
            ),
            k_draws=tuple(LogLinearLaw.from_dict(law) for law in d["k_draws"]),
            critical_batch_size_residuals=tuple(
                float(v) for v in d["critical_batch_size_residuals"]
            ),
        )


@dataclass(frozen=True, eq=False)
class _GroupValues:
    """Per (n_params, target_loss) group with an ok fit: N, D_g, B*_g and k_g (arrays)."""

    n_params: np.ndarray
    n_tokens: np.ndarray
    critical_batch_size: np.ndarray
    k: np.ndarray

    def laws(
        self, pick: np.ndarray, regressors: Sequence[str]
    ) -> tuple[LogLinearLaw, LogLinearLaw] | None:
        """(B* law, k law) over the groups ``pick`` in ``regressors``; None unless both fit."""
        regs = {name: getattr(self, name)[pick] for name in regressors}
        cbs = fit_cbs_scaling(
            self.critical_batch_size[pick],
            n_params=regs.get("n_params"),
            n_tokens=regs.get("n_tokens"),
            n_bootstrap=0,
        )
        k = fit_power_law(self.k[pick], regs, n_bootstrap=0)
        if not (cbs.ok and k.ok):
            return None
        return LogLinearLaw.from_power_law(cbs), LogLinearLaw.from_power_law(k)


def _group_values(table: StepsTable, overhead: float) -> _GroupValues:
    """Fit log S = log(a + b/B) per group of ``table``; D_g is the group's budget where the
    table knows it (the D whose reference loss set the target), else the tokens the fitted
    steps take at B_ref."""
    n_g, d_g, cbs_g, k_g = [], [], [], []
    for g in np.unique(table.group):
        sel = table.group == g
        fit = fit_critical_batch_size(
            table.batch_size[sel],
            table.steps[sel],
            overhead=overhead,
            n_bootstrap=0,
            censored_at=table.steps_bound[sel],
        )
        if fit.ok and fit.a > 0:
            budget = float(table.n_tokens[sel][0])
            n_g.append(float(table.n_params[sel][0]))
            d_g.append(
                budget if math.isfinite(budget) else float(fit.predict_steps(fit.b_opt)) * fit.b_opt
            )
            cbs_g.append(fit.critical_batch_size)
            k_g.append(fit.b / fit.a)
    return _GroupValues(
        n_params=np.array(n_g),
        n_tokens=np.array(d_g),
        critical_batch_size=np.array(cbs_g),
        k=np.array(k_g),
    )


def fit_steps_cbs_law(
    table: StepsTable | None, *, overhead: float, n_bootstrap: int, seed: int
) -> tuple[StepsCbsLaw | None, str]:
    """The law of the module docstring at ε = ``overhead`` over the groups of ``table``
    (:class:`fitting.cbs.StepsTable`), with ``n_bootstrap`` refits over groups (seeded);
    ``(None, why not)`` without steps-to-target data for 3 groups or when neither the joint
    law nor the law in D can be fitted."""
    if table is None:
        return None, "no steps-to-target data"
    groups = _group_values(table, overhead)
    n_groups = int(groups.critical_batch_size.size)
    if n_groups < 3:
        return None, (
            f"{n_groups} of {table.n_groups} groups with steps to a target have a "
            "steps-to-target CBS fit; the CBS law needs 3"
        )
    every = np.arange(n_groups)
    regressors = _JOINT
    best = groups.laws(every, regressors)
    if best is None:
        regressors = _TOKENS_ONLY
        best = groups.laws(every, regressors)
    if best is None:
        return None, "the steps-to-target CBS values do not support a power law in n_tokens"
    cbs_law, k_law = best
    rng = np.random.default_rng(seed)
    cbs_draws, k_draws = [], []
    for _ in range(n_bootstrap):
        draw = groups.laws(rng.integers(0, n_groups, n_groups), regressors)
        if draw is not None:
            cbs_draw, k_draw = draw
            cbs_draws.append(cbs_draw)
            k_draws.append(k_draw)
    # Each group's offset of ln B* from the law: the scatter a new group's B* carries.
    terms = np.column_stack([np.ones(n_groups), np.log(groups.n_params), np.log(groups.n_tokens)])
    residuals = np.log(groups.critical_batch_size) - terms @ cbs_law.terms()
    law = StepsCbsLaw(
        regressors=regressors,
        n_groups=n_groups,
        critical_batch_size=cbs_law,
        k=k_law,
        critical_batch_size_draws=tuple(cbs_draws),
        k_draws=tuple(k_draws),
        critical_batch_size_residuals=tuple(float(v) for v in residuals),
    )
    return law, ""


def cbs_law_document(
    law: StepsCbsLaw | None, power_law: Mapping[str, float], source: str
) -> dict[str, Any]:
    """The CBS law a recommendation is evaluated from, B* = c·N^β·D^γ: ``power_law``'s
    ``coefficient``, ``n_params_exponent`` and ``n_tokens_exponent``, their 90 % bootstrap
    intervals over groups (``*_interval``; null without draws or for the loss surface's law,
    whose exponents are B*'s), ``n_groups`` (null for the surface) and ``source``, as the
    answer's sources name it."""
    doc: dict[str, Any] = {
        **power_law,
        "n_params_exponent_interval": None,
        "n_tokens_exponent_interval": None,
        "n_groups": None,
        "source": source,
    }
    if law is None:
        return doc
    doc["n_groups"] = law.n_groups
    draws = law.critical_batch_size_draws
    for name in ("n_params_exponent", "n_tokens_exponent"):
        values = np.array([getattr(d, name) for d in draws], dtype=float)
        if values.size and name.removesuffix("_exponent") in law.regressors:
            low, high = np.percentile(values, [5.0, 95.0])
            doc[f"{name}_interval"] = {"low": float(low), "high": float(high), "level": 0.9}
    return doc
