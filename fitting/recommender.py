"""The recommender: peak learning rate, batch size and critical batch size for (N, D).

Method (chosen by leave-one-group-out regret on the Step Law sweep, see
``benchmarks/recommend_quality.py``): one smooth loss surface over all runs,
ln L = c_g + Q(ln η − x*(N, D), ln B − y*(N, D)) (:mod:`fitting.surface`), whose argmin gives

    η* = exp(eta_0 + eta_n·(ln N − n_ref) + eta_d·(ln D − d_ref))
    B* = exp(batch_0 + batch_n·(ln N − n_ref) + batch_d·(ln D − d_ref))      [tokens]

Critical batch size (Zhang et al. 2024, ε = ``overhead`` = 0.2): the largest B whose
tokens-to-target are at most (1+ε) times those of B*, with the target the loss of (η*, B*)
at budget D. Tokens-to-target come from the same surface, with the loss level at the
optimum modelled as the local power law ln L_opt = loss_0 + loss_n·n + loss_d·d fitted to the
group offsets: a run at B (η retuned) reaches the target after T tokens where
loss_d·ln(T/D) + Q_B(ln B − y*(N, T)) = 0 and Q_B(v) = min_u Q(u, v). Hence
ln CBS = y*(N, D) + batch_d·ln(1+ε) + v_c with Q_B(v_c) = −loss_d·ln(1+ε); v_c is computed
once per fit.

When the runs carry steps-to-target (``Runs.steps_to_target`` with ``target_loss``, e.g. from
the generic CSV) for at least 3 groups of (n_params, target_loss), the CBS comes instead from
Zhang et al.'s own method (:mod:`fitting.cbs`): per group, log S = log(a + b/B) and
B*_g = (1+ε)·B_ref + ε·b/a, with D_g = S(B_ref)·B_ref the tokens to target at the reference
(smallest) batch; then the power law B* = c·N^β·D^γ (or c·D^γ when N does not vary) across
groups, and likewise k = b/a ∝ N^β_k·D^γ_k. The imposed-batch overheads then follow that
model: T(B)/T(B*) = (B + k)/(B* + k) and S(B)/S(B*) = (1 + k/B)/(1 + k/B*).

Imposed batch size B: ``learning_rate_for_batch`` = exp(x* + u*(v)) with v = ln B − y* and u*
the ln η offset minimising Q at v (the fitted η–B coupling). Its cost versus running at the
CBS, from the tokens-to-target T(B) above and steps S(B) = T(B)/B:
``token_overhead`` = max(0, T(B)/T(CBS) − 1) (extra tokens, paid above the CBS) and
``step_overhead`` = max(0, S(B)/S(CBS) − 1) (extra optimizer steps, paid below it), with
T(CBS) = (1+ε)·D.

Intervals: percentile intervals (90 %) over a bootstrap of (N, D) groups; each draw refits
the surface, and the draws' parameters are kept in the fitted state so that a query only
evaluates closed forms (no fitting at query time).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields

import numpy as np

from fitting.data import Runs
from fitting.results import FitStatus, Interval, ParameterError, percentile_interval
from fitting import surface as surf

logger = logging.getLogger(__name__)

METHOD = "loss_surface"
STATE_VERSION = 1
_SOURCE_OPTIMUM = "loss_surface argmin (power laws in N and D)"
_SOURCE_CBS = "loss_surface tokens-to-target, Zhang et al. epsilon={eps:g}"
_SOURCE_STEPS_CBS = ("steps-to-target, Zhang et al. epsilon={eps:g}: power law in {regressors} "
                     "over {n_groups} groups (fitting.cbs)")
_SOURCE_LR_FOR_BATCH = "loss_surface argmin over learning rate at the imposed batch size"


class RecommenderUnavailable(RuntimeError):
    """``recommend`` was called on a recommender whose status is not ok."""


@dataclass(frozen=True)
class Recommendation:
    """One answer. Batch sizes in tokens unless the name says sequences.

    ``learning_rate_for_batch``, ``step_overhead`` and ``token_overhead`` are set only when a
    batch size was imposed (see the module docstring for their formulas).
    """

    n_params: float
    n_tokens: float
    seq_len: int
    learning_rate: float
    learning_rate_interval: Interval
    batch_size_tokens: float
    batch_size_tokens_interval: Interval
    batch_size_sequences: float
    batch_size_sequences_interval: Interval
    critical_batch_size_tokens: float
    critical_batch_size_tokens_interval: Interval
    sources: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    imposed_batch_size_tokens: float | None = None
    learning_rate_for_batch: float | None = None
    learning_rate_for_batch_interval: Interval | None = None
    step_overhead: float | None = None
    token_overhead: float | None = None

    def as_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Interval):
                value = value.as_dict()
            elif isinstance(value, (dict, list)):
                value = type(value)(value)
            out[f.name] = value
        return out


def _check_positive(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ParameterError(name, "number", f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ParameterError(name, "positive_finite",
                             f"{name} must be finite and > 0, got {value!r}")
    return number


class _Draws:
    """Bootstrap draws of the surface parameters as arrays (attribute access like params)."""

    def __init__(self, rows: list[dict[str, float]]):
        names = [f.name for f in fields(surf.SurfaceParams)] + ["cbs_offset"]
        for name in names:
            setattr(self, name, np.array([row[name] for row in rows], dtype=float))
        self.size = len(rows)


class Recommender:
    """A fitted recommender; build with :func:`fit_recommender` or :meth:`from_dict`.

    ``recommend`` evaluates closed forms on the stored parameters (tens of microseconds);
    the object is read-only after construction and safe to share between threads.
    """

    def __init__(self, *, status: FitStatus, reason: str, n_runs: int, n_groups: int,
                 fitted_range: dict[str, list[float]], options: dict,
                 params: dict[str, float] | None, draws: list[dict[str, float]],
                 quality: dict[str, float], cbs_law: dict | None = None):
        self.status = FitStatus(status)
        self.reason = reason
        self.n_runs = int(n_runs)
        self.n_groups = int(n_groups)
        self.fitted_range = {k: [float(v) for v in vals] for k, vals in fitted_range.items()}
        self.options = dict(options)
        self.quality = dict(quality)
        self._params_dict = None if params is None else dict(params)
        self._draw_rows = [dict(r) for r in draws]
        self._params = None
        self._cbs_offset = float("nan")
        if params is not None:
            core = {k: v for k, v in params.items() if k != "cbs_offset"}
            self._params = surf.SurfaceParams(**core)
            self._cbs_offset = float(params["cbs_offset"])
        self._draws = _Draws(self._draw_rows) if self._draw_rows else None
        self._cbs_law = None if cbs_law is None else {
            "regressors": list(cbs_law["regressors"]), "n_groups": int(cbs_law["n_groups"]),
            "point": [float(v) for v in cbs_law["point"]],
            "draws": [[float(v) for v in row] for row in cbs_law["draws"]]}

    @property
    def overhead(self) -> float:
        return float(self.options["overhead"])

    def to_dict(self) -> dict:
        """JSON-able state; :meth:`from_dict` restores an equal recommender."""
        return {
            "method": METHOD,
            "version": STATE_VERSION,
            "status": self.status.value,
            "reason": self.reason,
            "n_runs": self.n_runs,
            "n_groups": self.n_groups,
            "fitted_range": self.fitted_range,
            "options": self.options,
            "params": self._params_dict,
            "draws": self._draw_rows,
            "quality": self.quality,
            "cbs_law": self._cbs_law,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Recommender:
        if d.get("method") != METHOD or d.get("version") != STATE_VERSION:
            raise ValueError(f"not a {METHOD} recommender state of version {STATE_VERSION}: "
                             f"method={d.get('method')!r}, version={d.get('version')!r}")
        return cls(status=d["status"], reason=d["reason"], n_runs=d["n_runs"],
                   n_groups=d["n_groups"], fitted_range=d["fitted_range"],
                   options=d["options"], params=d["params"], draws=d["draws"],
                   quality=d.get("quality", {}), cbs_law=d.get("cbs_law"))

    def power_laws(self) -> dict[str, dict[str, float]]:
        """The fitted laws as ``value = coefficient · N^n_params_exponent · D^n_tokens_exponent``
        for learning_rate, batch_size_tokens and critical_batch_size_tokens (the CBS shares
        B*'s exponents; its coefficient carries (1+ε)^batch_d · e^v_c)."""
        if self._params is None:
            raise RecommenderUnavailable(f"recommender is {self.status.value}: {self.reason}")
        p = self._params

        def law(intercept: float, slope_n: float, slope_d: float) -> dict[str, float]:
            coefficient = math.exp(intercept - slope_n * p.n_ref - slope_d * p.d_ref)
            return {"coefficient": coefficient, "n_params_exponent": slope_n,
                    "n_tokens_exponent": slope_d}

        cbs_intercept = p.batch_0 + p.batch_d * math.log1p(self.overhead) + self._cbs_offset
        return {
            "learning_rate": law(p.eta_0, p.eta_n, p.eta_d),
            "batch_size_tokens": law(p.batch_0, p.batch_n, p.batch_d),
            "critical_batch_size_tokens": law(cbs_intercept, p.batch_n, p.batch_d),
        }

    def _interval(self, samples: np.ndarray, level: float = 0.9) -> Interval:
        if self._draws is None or self._draws.size < 2:
            return Interval(float("nan"), float("nan"), level)
        return percentile_interval(samples, level)

    def _warnings(self, n_params: float, n_tokens: float, seq_len: int) -> list[str]:
        out = []
        for name, value in (("n_params", n_params), ("n_tokens", n_tokens)):
            low, high = self.fitted_range[name]
            if value < low * (1 - 1e-9) or value > high * (1 + 1e-9):
                out.append(f"{name}={value:.4g} is outside the fitted range "
                           f"[{low:.4g}, {high:.4g}]: extrapolating")
        ratio = n_tokens / n_params
        low, high = self.fitted_range["tokens_per_param"]
        if ratio < low * (1 - 1e-9) or ratio > high * (1 + 1e-9):
            out.append(f"n_tokens/n_params={ratio:.4g} is outside the fitted range "
                       f"[{low:.4g}, {high:.4g}]: extrapolating")
        seq_lens = self.fitted_range.get("seq_len")
        if seq_lens and not (seq_lens[0] <= seq_len <= seq_lens[1]):
            out.append(f"seq_len={seq_len} is outside the fitted range "
                       f"[{seq_lens[0]:g}, {seq_lens[1]:g}]; batch sizes are in tokens and "
                       f"assumed to transfer")
        return out

    def recommend(self, n_params: float, n_tokens: float, seq_len: int = 2048,
                  batch_size_tokens: float | None = None) -> Recommendation:
        """Recommend η, B and the CBS for a model of ``n_params`` trained on ``n_tokens``.

        Raises :class:`~fitting.results.ParameterError` (a ``ValueError`` naming the field
        and the rule) for bad input and :class:`RecommenderUnavailable` when the
        fit's status is not ok.
        """
        n_params = _check_positive("n_params", n_params)
        n_tokens = _check_positive("n_tokens", n_tokens)
        if isinstance(seq_len, bool) or float(_check_positive("seq_len", seq_len)) != int(seq_len):
            raise ParameterError("seq_len", "positive_integer",
                                 f"seq_len must be a positive integer, got {seq_len!r}")
        seq_len = int(seq_len)
        if batch_size_tokens is not None:
            batch_size_tokens = _check_positive("batch_size_tokens", batch_size_tokens)
        if self.status is not FitStatus.OK or self._params is None:
            raise RecommenderUnavailable(f"recommender is {self.status.value}: {self.reason}")

        p, draws = self._params, self._draws
        log_n, log_d = math.log(n_params), math.log(n_tokens)
        log_eps = math.log1p(self.overhead)
        x, y = surf.optimum_log(p, log_n, log_d)
        lr, bs = math.exp(x), math.exp(y)
        cbs = math.exp(y + p.batch_d * log_eps + self._cbs_offset)
        if draws is not None:
            xs, ys = surf.optimum_log(draws, log_n, log_d)
            lr_iv = self._interval(np.exp(xs))
            bs_iv = self._interval(np.exp(ys))
            cbs_iv = self._interval(np.exp(ys + draws.batch_d * log_eps + draws.cbs_offset))
        else:
            lr_iv = bs_iv = cbs_iv = self._interval(np.array([]))
        k_steps = None
        if self._cbs_law is not None:
            law = self._cbs_law
            point = np.array(law["point"])
            logs = np.array([1.0, log_n, log_d])
            cbs = math.exp(float(point[:3] @ logs))
            k_steps = math.exp(float(point[3:] @ logs))
            if law["draws"]:
                cbs_iv = self._interval(np.exp(np.array(law["draws"])[:, :3] @ logs))
            else:
                cbs_iv = self._interval(np.array([]))
        seq_iv = Interval(bs_iv.low / seq_len, bs_iv.high / seq_len, bs_iv.level)
        warnings = self._warnings(n_params, n_tokens, seq_len)
        if not math.isfinite(cbs):
            warnings.append("the critical batch size is undefined for this fit (the loss at "
                            "the optimum does not fall with n_tokens)")
        sources = {
            "learning_rate": _SOURCE_OPTIMUM,
            "batch_size_tokens": _SOURCE_OPTIMUM,
            "critical_batch_size_tokens": _SOURCE_CBS.format(eps=self.overhead),
        }
        if self._cbs_law is not None:
            sources["critical_batch_size_tokens"] = _SOURCE_STEPS_CBS.format(
                eps=self.overhead, regressors=", ".join(self._cbs_law["regressors"]),
                n_groups=self._cbs_law["n_groups"])
        extra: dict = {}
        if batch_size_tokens is not None:
            v0 = math.log(batch_size_tokens) - y
            lr_b = math.exp(x + float(surf.best_eta_offset(p, v0)))
            if draws is not None:
                v_draws = math.log(batch_size_tokens) - ys
                lr_b_iv = self._interval(np.exp(xs + surf.best_eta_offset(draws, v_draws)))
            else:
                lr_b_iv = self._interval(np.array([]))
            if k_steps is not None:
                # Zhang et al.'s model: T(B) ∝ B + k, S(B) ∝ 1 + k/B.
                tau = 0.0
                token_ratio = (batch_size_tokens + k_steps) / (cbs + k_steps)
                step_ratio = (1.0 + k_steps / batch_size_tokens) / (1.0 + k_steps / cbs)
            else:
                tau = surf.log_tokens_to_target(p, v0)
                # T(B)/D = e^tau; T(CBS) = (1+ε)·D; S = T/B.
                token_ratio = math.exp(tau - log_eps) if math.isfinite(tau) else float("inf")
                step_ratio = token_ratio * cbs / batch_size_tokens
            extra = {
                "imposed_batch_size_tokens": batch_size_tokens,
                "learning_rate_for_batch": lr_b,
                "learning_rate_for_batch_interval": lr_b_iv,
                "step_overhead": max(0.0, step_ratio - 1.0),
                "token_overhead": max(0.0, token_ratio - 1.0),
            }
            sources["learning_rate_for_batch"] = _SOURCE_LR_FOR_BATCH
            sources["step_overhead"] = sources["token_overhead"] = sources[
                "critical_batch_size_tokens"]
            batch_range = self.fitted_range.get("batch_size_tokens")
            if batch_range and not (batch_range[0] * (1 - 1e-9) <= batch_size_tokens
                                    <= batch_range[1] * (1 + 1e-9)):
                warnings.append(f"batch_size_tokens={batch_size_tokens:.4g} is outside the "
                                f"fitted range [{batch_range[0]:.4g}, {batch_range[1]:.4g}]: "
                                f"extrapolating")
            if math.isinf(tau):
                warnings.append(f"batch_size_tokens={batch_size_tokens:.4g} does not reach the "
                                f"optimum's loss within e^12 times n_tokens on the fitted "
                                f"surface")
        return Recommendation(
            n_params=n_params, n_tokens=n_tokens, seq_len=seq_len,
            learning_rate=lr, learning_rate_interval=lr_iv,
            batch_size_tokens=bs, batch_size_tokens_interval=bs_iv,
            batch_size_sequences=bs / seq_len, batch_size_sequences_interval=seq_iv,
            critical_batch_size_tokens=cbs, critical_batch_size_tokens_interval=cbs_iv,
            sources=sources, warnings=warnings, **extra)


def _steps_cbs_law(runs: Runs, overhead: float, n_bootstrap: int,
                   seed: int) -> tuple[dict | None, str]:
    """The steps-to-target CBS law of the module docstring, or (None, why not)."""
    from fitting.cbs import fit_cbs_scaling, fit_critical_batch_size
    from fitting.powerlaw import fit_power_law

    if runs.steps_to_target is None or runs.target_loss is None:
        return None, "no steps-to-target data"
    has = ~np.isnan(runs.steps_to_target) & np.isfinite(runs.target_loss)
    if not has.any():
        return None, "no steps-to-target data"
    keys = np.column_stack([runs.n_params[has], runs.target_loss[has]])
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    batch, steps = runs.batch_size_tokens[has], runs.steps_to_target[has]
    n_g, d_g, cbs_g, k_g = [], [], [], []
    for i, (n_params, _) in enumerate(uniq):
        sel = inverse == i
        fit = fit_critical_batch_size(batch[sel], steps[sel], overhead=overhead, n_bootstrap=0)
        if fit.ok and fit.a > 0:
            n_g.append(n_params)
            d_g.append(float(fit.predict_steps(fit.b_opt)) * fit.b_opt)
            cbs_g.append(fit.critical_batch_size)
            k_g.append(fit.b / fit.a)
    if len(cbs_g) < 3:
        return None, (f"{len(cbs_g)} (n_params, target_loss) groups have a steps-to-target "
                      f"fit; the CBS law needs 3")
    n_g, d_g, cbs_g, k_g = (np.array(v) for v in (n_g, d_g, cbs_g, k_g))

    def laws(idx, names):
        regs = {name: (n_g if name == "n_params" else d_g)[idx] for name in names}
        cbs = fit_cbs_scaling(cbs_g[idx], n_bootstrap=0, **regs)
        k = fit_power_law(k_g[idx], regs, n_bootstrap=0)
        return (cbs, k) if cbs.ok and k.ok else None

    all_idx = np.arange(cbs_g.size)
    names = ("n_params", "n_tokens")
    best = laws(all_idx, names)
    if best is None:
        names = ("n_tokens",)
        best = laws(all_idx, names)
    if best is None:
        return None, "the steps-to-target CBS values do not support a power law in n_tokens"

    def row(pair) -> list[float]:
        out = []
        for law in pair:
            exps = dict(zip(law.names, law.exponents))
            out += [math.log(law.coefficient), exps.get("n_params", 0.0),
                    exps.get("n_tokens", 0.0)]
        return out

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_bootstrap):
        pair = laws(rng.integers(0, cbs_g.size, cbs_g.size), names)
        if pair is not None:
            draws.append(row(pair))
    return {"regressors": list(names), "n_groups": int(cbs_g.size), "point": row(best),
            "draws": draws}, ""


def _params_row(fit: surf.SurfaceFit, overhead: float) -> dict[str, float]:
    row = fit.params.as_dict()
    row["cbs_offset"] = float(surf.critical_log_batch_offset(fit.params, overhead))
    return row


def fit_recommender(runs: Runs, *, overhead: float = 0.2, window: float = 0.01,
                    f_scale: float = 0.002, cubic: bool = True, n_bootstrap: int = 50,
                    seed: int = 0) -> Recommender:
    """Fit the recommender of the module docstring to ``runs``.

    ``overhead`` is the CBS's ε; ``window``, ``f_scale`` and ``cubic`` go to
    :func:`fitting.surface.fit_surface`; ``n_bootstrap`` group-bootstrap refits give the
    intervals (0 = no intervals, NaN bounds).
    """
    overhead = _check_positive("overhead", overhead)
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    options = {"overhead": overhead, "window": window, "f_scale": f_scale,
               "cubic": bool(cubic), "n_bootstrap": int(n_bootstrap), "seed": seed}
    if len(runs):
        finite = ~runs.diverged
        ratio = runs.n_tokens / runs.n_params
        fitted_range = {
            "n_params": [float(runs.n_params.min()), float(runs.n_params.max())],
            "n_tokens": [float(runs.n_tokens.min()), float(runs.n_tokens.max())],
            "tokens_per_param": [float(ratio.min()), float(ratio.max())],
            "seq_len": [float(runs.seq_len.min()), float(runs.seq_len.max())],
            "batch_size_tokens": [float(runs.batch_size_tokens.min()),
                                  float(runs.batch_size_tokens.max())],
        }
    else:
        finite = np.zeros(0, bool)
        fitted_range = {"n_params": [], "n_tokens": [], "tokens_per_param": [], "seq_len": [],
                        "batch_size_tokens": []}
    common = dict(n_runs=len(runs), n_groups=len(runs.groups()) if len(runs) else 0,
                  fitted_range=fitted_range, options=options)
    if len(runs) == 0 or finite.sum() == 0:
        return Recommender(status=FitStatus.INSUFFICIENT_DATA,
                           reason="no runs with a finite loss", params=None, draws=[],
                           quality={}, **common)
    fit = surf.fit_surface(runs, window=window, f_scale=f_scale, cubic=cubic)
    if fit.status is not FitStatus.OK:
        return Recommender(status=fit.status, reason=fit.reason, params=None, draws=[],
                           quality={}, **common)
    params = _params_row(fit, overhead)
    reason = ""
    if not math.isfinite(params["cbs_offset"]):
        reason = "critical batch size undefined: the loss at the optimum does not fall with D"
    groups = runs.groups()
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(int(n_bootstrap)):
        pick = rng.integers(0, len(groups), len(groups))
        idx = np.concatenate([groups[i][2] for i in pick])
        boot = surf.fit_surface(runs.subset(idx), window=window, f_scale=f_scale, cubic=cubic)
        if boot.status is FitStatus.OK:
            draws.append(_params_row(boot, overhead))
    if n_bootstrap:
        logger.info("recommender bootstrap: %d of %d draws fitted", len(draws), n_bootstrap)
    quality = {"n_runs_used": fit.n_runs_used, "rms_residual_log_loss": fit.rms_residual,
               "n_bootstrap_ok": len(draws)}
    cbs_law, why = _steps_cbs_law(runs, overhead, int(n_bootstrap), seed)
    if cbs_law is None and runs.steps_to_target is not None:
        logger.info("critical batch size from the loss surface: %s", why)
    if cbs_law is not None and reason:
        reason = ""  # the steps-to-target law supplies the CBS
    return Recommender(status=FitStatus.OK, reason=reason, params=params, draws=draws,
                       quality=quality, cbs_law=cbs_law, **common)
