"""Imposed-batch regret on the Step Law sweep, leave one (N, D) group out.

For each of the 17 (N, D) groups of the Step Law sweep (Li et al. 2025, arXiv 2503.04715;
the copy bundled in ``fitting/bundled``): fit the recommender on the other 16 groups, and for
each batch size B the held-out group was run at, take the η it gives for that imposed B
(``learning_rate_for_batch``) and score it against the held-out group's runs at that B:

* **nearest**: regret = the smoothed loss of the run nearest in ln η / the best run's − 1;
* **smooth**: the runs' loss as a function of ln η, a least-squares quadratic through the
  best run and up to two runs on each side within their span, linear between runs outside
  it (from the quadratic's values at the span's ends), the edge run's loss beyond the tried
  η; regret = its value at the η given / its minimum − 1. It scores a miss by how far it
  is, not by which side of a cell boundary it lands on.

Diverged runs (none in this sweep) are not candidates for "nearest". Side by side, on the
same folds: the η served (the bell curve of η*(B), :mod:`fitting.bell_state`), the loss
surface's η–B coupling it replaced (the same fitted recommender without its bell state,
i.e. the named fallback), and the published Step Law formula η = 1.79·N^-0.713·D^0.307,
which does not depend on B. ``--variants`` adds the bell forms that were tried (their
figures are in :mod:`fitting.bell_state`'s docstring). With ``--draws K`` ≥ 2 the recommender
is fitted with K bootstrap draws and the table adds the coverage of the 90 % interval of
η at B: the share of (group, B) whose own η*(B) (the profile minimum of the held-out runs at
B, :func:`fitting.profile.profile_minimum`) lies inside it.

    python benchmarks/imposed_batch.py [--csv PATH] [--draws 10] [--variants]

Last line: ``imposed_batch bell_mean_regret_pct=… surface_mean_regret_pct=…
stepformula_mean_regret_pct=…`` (nearest-run means). ``imposed_batch_regret`` is what
``benchmarks/recommend_quality.py`` calls.

Measured (2 cores, ``--variants``, 10 draws per fold: 3.6 minutes), regret in %, mean /
median / max on the nearest run | on the smooth curve, over 170 (group, B), and the coverage
of the 90 % interval with its median high/low:

    bell (served)                0.0571 / 0.0000 / 1.0607 | 0.0308 / 0.0097 / 0.5041  92.4 % (1.69)
    surface coupling (before)    0.0992 / 0.0107 / 0.7493 | 0.0893 / 0.0408 / 0.9299  59.2 % (1.49)
    Step Law formula             0.3890 / 0.0799 / 8.7242 | 0.3803 / 0.0512 / 8.4921
    bell, its own level          0.0575 / 0.0000 / 1.0607 | 0.0286 / 0.0086 / 0.9475
    Li et al.'s bell, scaled     0.1132 / 0.0194 / 1.5337 | 0.0929 / 0.0437 / 0.4912
    Li et al.'s bell, own level  0.0829 / 0.0211 / 1.0607 | 0.0541 / 0.0192 / 0.6874
    Li per-group fits, then laws 0.0915 / 0.0203 / 1.0607 | 0.0599 / 0.0238 / 0.6239

By B/B* (B* the recommended batch), nearest-run mean regret and the geometric mean of η over
the best run's η: below B*/2 bell 0.013 % (1.01×), surface 0.064 % (1.24×), Step Law 1.09 %
(2.64×: its η ignores B); at B ≥ 4·B* bell 0.137 % (1.05×), surface 0.263 % (1.43×). The
bell's max, 1.06 %, is N = 2.15e8, D = 4e9 (the smallest D, so an extrapolation in its fold)
at B = 4.19M tokens, 22× its B*, where the group's best η keeps rising (the answer is 0.56×
the best run's) while the other groups' fall a little. The surface coupling's max, 0.75 %,
and the Step Law formula's, 8.7 %, are at the smallest batches.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.bell import fit_bell_surface  # noqa: E402
from fitting.bell_state import BellState, fit_bell_state  # noqa: E402
from fitting.data import Runs, bundled_steplaw_path, load_steplaw_csv  # noqa: E402
from fitting.profile import profile_minimum  # noqa: E402
from fitting.recommender import Recommender, fit_recommender  # noqa: E402
from fitting.recommender_state import SurfacePoint  # noqa: E402
from fitting.surface import optimum_log  # noqa: E402

logger = logging.getLogger("imposed_batch")

SERVED, SURFACE, STEP_FORMULA = "bell (served)", "surface coupling", "Step Law formula"
#: η at an imposed B for one held-out (N, D): ``eta(batch_size_tokens) -> (η, interval)``.
EtaAtBatch = Callable[[float], tuple[float, tuple[float, float] | None]]


def nearest_regret(learning_rate: np.ndarray, loss: np.ndarray, eta: float) -> float:
    """Loss of the finite run nearest ``eta`` in ln η / the best finite run's − 1."""
    finite = np.isfinite(loss)
    lr, lv = learning_rate[finite], loss[finite]
    return float(lv[np.argmin(np.abs(np.log(lr) - math.log(eta)))] / lv.min() - 1.0)


def smooth_regret(learning_rate: np.ndarray, loss: np.ndarray, eta: float, half: int = 2):
    """Regret of ``eta`` on the smooth curve of the module docstring."""
    finite = np.isfinite(loss)
    order = np.argsort(learning_rate[finite])
    x, lv = np.log(learning_rate[finite][order]), loss[finite][order]
    best = int(np.argmin(lv))
    lo, hi = max(0, best - half), min(x.size, best + half + 1)
    coef = np.polyfit(x[lo:hi], lv[lo:hi], 2) if hi - lo >= 3 else None
    if coef is not None and coef[0] > 0:
        knots = np.concatenate([x[:lo], x[lo:hi][[0, -1]], x[hi:]])
        edge = np.polyval(coef, x[lo:hi][[0, -1]])
        values = np.concatenate([lv[:lo], edge, lv[hi:]])
        vertex = float(np.clip(-coef[1] / (2 * coef[0]), x[lo], x[hi - 1]))
        minimum = min(float(np.polyval(coef, vertex)), float(values.min()))
        xq = math.log(eta)
        inside = x[lo] <= xq <= x[hi - 1]
        at = float(np.polyval(coef, xq)) if inside else float(np.interp(xq, knots, values))
    else:  # no valley to fit: the runs joined by straight lines
        minimum, at = float(lv.min()), float(np.interp(math.log(eta), x, lv))
    return at / minimum - 1.0


def step_formula(n_params: float, n_tokens: float) -> float:
    """Li et al. 2025's published η = 1.79·N^-0.713·D^0.307 (no B in it)."""
    return 1.79 * n_params**-0.713 * n_tokens**0.307


@dataclass
class Scores:
    """Per method, one row per held-out (group, B): regret nearest and smooth (fractions),
    and whether the group's own η*(B) lay inside the interval given (NaN: no interval or
    no own η*); ``batch_ratio`` is B / B* and ``group`` the held-out group's index."""

    regrets: dict[str, list[tuple[float, float]]]
    covered: dict[str, list[float]]
    widths: dict[str, list[float]]
    batch_ratio: list[float]
    group: list[int]
    log_eta_ratio: dict[str, list[float]]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per method: mean, median and max regret in % (nearest, smooth), coverage."""
        out = {}
        for name, rows in self.regrets.items():
            r = 100.0 * np.array(rows)
            cov = np.array(self.covered[name])
            out[name] = {
                "mean_regret_pct": float(r[:, 0].mean()),
                "median_regret_pct": float(np.median(r[:, 0])),
                "max_regret_pct": float(r[:, 0].max()),
                "smooth_mean_regret_pct": float(r[:, 1].mean()),
                "smooth_median_regret_pct": float(np.median(r[:, 1])),
                "smooth_max_regret_pct": float(r[:, 1].max()),
                "coverage_pct": float(100 * np.nanmean(cov))
                if np.isfinite(cov).any()
                else math.nan,
            }
        return out


def _fixed(eta: float) -> EtaAtBatch:
    """The same η at every B, without an interval."""
    return lambda _batch: (eta, None)


def _served(rec: Recommender, n: float, d: float) -> EtaAtBatch:
    def eta(batch: float) -> tuple[float, tuple[float, float] | None]:
        out = rec.recommend(n, d, batch_size_tokens=batch)
        iv = out.learning_rate_for_batch_interval
        assert out.learning_rate_for_batch is not None
        return out.learning_rate_for_batch, None if iv is None else (iv.low, iv.high)

    return eta


def _variants(rec: Recommender, train: Runs, n: float, d: float) -> dict[str, EtaAtBatch]:
    """The bell forms tried (:mod:`fitting.bell_state`), on the fold's training runs."""
    state = rec.to_dict()
    params = SurfacePoint.from_dict(state["params"]).params
    log_n, log_d = math.log(n), math.log(d)
    anchor = optimum_log(params, log_n, log_d)
    fitted = BellState.from_dict(state["bell"])
    li = fit_bell_state(train, params, n_bootstrap=0, seed=0, shape=(0.5, 0.5))
    per_group = fit_bell_surface(
        train.n_params,
        train.n_tokens,
        train.learning_rate,
        train.batch_size_tokens,
        train.loss,
        n_bootstrap=0,
    )

    def own(bell: BellState) -> EtaAtBatch:
        assert bell.curve is not None
        curve = bell.curve
        return lambda b: (math.exp(float(curve.log_learning_rate(log_n, log_d, math.log(b)))), None)

    def scaled(bell: BellState) -> EtaAtBatch:
        return lambda b: (math.exp(bell.log_learning_rate(log_n, log_d, math.log(b), anchor)), None)

    out: dict[str, EtaAtBatch] = {}
    if fitted.ok:
        out["bell, its own level"] = own(fitted)
    if li.ok:
        out["Li et al.'s bell, scaled"] = scaled(li)
        out["Li et al.'s bell, own level"] = own(li)
    if per_group.ok:
        out["Li per-group fits, laws"] = lambda b: (
            float(per_group.learning_rate_for_batch(n, d, b)),
            None,
        )
    return out


def imposed_batch_regret(
    runs: Runs, *, n_bootstrap: int = 0, seed: int = 0, variants: bool = False
) -> Scores:
    """Leave one (N, D) group out (module docstring): every method's regret at each of the
    held-out groups' batch sizes; coverage when ``n_bootstrap`` ≥ 2."""
    groups = runs.groups()
    scores = Scores({}, {}, {}, [], [], {})
    everything = np.arange(len(runs))
    for gi, group in enumerate(groups):
        train = runs.subset(np.setdiff1d(everything, group.index))
        held = runs.subset(group.index)
        n, d = group.n_params, group.n_tokens
        rec = fit_recommender(train, n_bootstrap=n_bootstrap, seed=seed)
        surface_only = Recommender.from_dict({**rec.to_dict(), "bell": None})
        methods: dict[str, EtaAtBatch] = {
            SERVED: _served(rec, n, d),
            SURFACE: _served(surface_only, n, d),
            STEP_FORMULA: _fixed(step_formula(n, d)),
        }
        if variants:
            methods.update(_variants(rec, train, n, d))
        best_batch = rec.recommend(n, d).batch_size_tokens
        for batch in np.unique(held.batch_size_tokens):
            at = held.batch_size_tokens == batch
            lr, lv = held.learning_rate[at], held.loss[at]
            prof = profile_minimum(lr, lv, n_neighbours=2, n_bootstrap=0)
            own_eta = prof.x_opt if prof.ok else math.nan
            best_eta = float(lr[np.nanargmin(np.where(np.isfinite(lv), lv, np.nan))])
            scores.batch_ratio.append(float(batch / best_batch))
            scores.group.append(gi)
            for name, method in methods.items():
                eta, iv = method(float(batch))
                scores.regrets.setdefault(name, []).append(
                    (nearest_regret(lr, lv, eta), smooth_regret(lr, lv, eta))
                )
                scores.log_eta_ratio.setdefault(name, []).append(math.log(eta / best_eta))
                inside, width = math.nan, math.nan
                if iv is not None and math.isfinite(iv[0]) and math.isfinite(own_eta):
                    inside, width = float(iv[0] <= own_eta <= iv[1]), iv[1] / iv[0]
                scores.covered.setdefault(name, []).append(inside)
                scores.widths.setdefault(name, []).append(width)
        logger.info("group %d of %d done", gi + 1, len(groups))
    return scores


def report(scores: Scores) -> list[str]:
    """The printed table (module docstring), its last line the summary line."""
    summary = scores.summary()
    n_points = len(scores.batch_ratio)
    lines = [
        f"imposed-batch regret, leave one (N, D) group out: {len(set(scores.group))} groups, "
        f"{n_points} (group, B); regret % mean / median / max",
        f"{'method':<28}{'nearest run':>30}   {'smooth':>26}   {'coverage 90%':>12}",
        f"{'':<28}{'':>30}   {'':>26}   {'(high/low)':>12}",
    ]
    for name, s in summary.items():
        widths = np.array(scores.widths[name])
        width = np.median(widths[np.isfinite(widths)]) if np.isfinite(widths).any() else 0
        cov = "" if math.isnan(s["coverage_pct"]) else f"{s['coverage_pct']:.1f} (x{width:.2f})"
        lines.append(
            f"{name:<28}{s['mean_regret_pct']:>10.4f}{s['median_regret_pct']:>10.4f}"
            f"{s['max_regret_pct']:>10.4f}   {s['smooth_mean_regret_pct']:>8.4f}"
            f"{s['smooth_median_regret_pct']:>9.4f}{s['smooth_max_regret_pct']:>9.4f}   {cov:>12}"
        )
    ratio = np.array(scores.batch_ratio)
    bins = [(0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, math.inf)]
    lines.append("by B/B*: nearest-run mean regret % [geometric mean of η / best run's η]")
    lines.append(f"{'method':<28}" + "".join(f"{f'[{a:g}, {b:g})':>18}" for a, b in bins))
    for name in summary:
        r = 100.0 * np.array(scores.regrets[name])[:, 0]
        q = np.array(scores.log_eta_ratio[name])
        cells = []
        for a, b in bins:
            m = (ratio >= a) & (ratio < b)
            cells.append(f"{r[m].mean():>9.3f} [{math.exp(q[m].mean()):.2f}]" if m.any() else "")
        lines.append(f"{name:<28}" + "".join(f"{c:>18}" for c in cells))
    worst = int(np.argmax(np.array(scores.regrets[SERVED])[:, 0]))
    lines.append(
        f"served max: group {scores.group[worst]} at B/B* = {ratio[worst]:.3g}, "
        f"η / best run's η = {math.exp(scores.log_eta_ratio[SERVED][worst]):.2f}"
    )
    lines.append(
        f"imposed_batch bell_mean_regret_pct={summary[SERVED]['mean_regret_pct']:.4f} "
        f"surface_mean_regret_pct={summary[SURFACE]['mean_regret_pct']:.4f} "
        f"stepformula_mean_regret_pct={summary[STEP_FORMULA]['mean_regret_pct']:.4f}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=None, help="a Step Law CSV (default: bundled)")
    parser.add_argument("--draws", type=int, default=10, help="bootstrap draws per fold")
    parser.add_argument("--variants", action="store_true", help="add the bell forms tried")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    runs = load_steplaw_csv(args.csv or bundled_steplaw_path())
    scores = imposed_batch_regret(runs, n_bootstrap=args.draws, variants=args.variants)
    print("\n".join(report(scores)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
