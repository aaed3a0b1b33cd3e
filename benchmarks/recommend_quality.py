"""Recommendation quality on the Step Law sweep, leave one (N, D) group out.

For each of the 17 (N, D) groups of the Step Law sweep (Li et al. 2025, arXiv 2503.04715;
the copy bundled in ``fitting/bundled``): fit each method on the other 16 groups, recommend
(η, B) for the held-out (N, D), take the held-out group's run nearest to the recommendation
in (ln η, ln B) (Euclidean), and score regret = its smoothed loss / the group's best − 1.
Fixed published formulas need no fit and are scored the same way.

Prints one row per method (mean, median and max regret in %), then, as its last line,
``recommender mean_regret_pct=<float> max_regret_pct=<float>``.

    python benchmarks/recommend_quality.py [--csv PATH] [--json OUT.json] [--nested]
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.data import Runs, bundled_steplaw_path, load_steplaw_csv  # noqa: E402
from fitting.recommender import fit_recommender  # noqa: E402

logger = logging.getLogger("recommend_quality")

# A method maps (training runs) -> predict(n_params, n_tokens) -> (learning_rate, B tokens).
Predictor = Callable[[float, float], tuple[float, float]]
Method = Callable[[Runs], Predictor]


def steplaw_published(_: Runs) -> Predictor:
    """Li et al. 2025, eq. (published fit): η = 1.79·N^-0.713·D^0.307, B = 0.58·D^0.571."""
    return lambda n, d: (1.79 * n ** -0.713 * d ** 0.307, 0.58 * d ** 0.571)


def deepseek_published(_: Runs) -> Predictor:
    """DeepSeek LLM (2024): η = 0.3118·C^-0.125, B = 0.2920·C^0.3271 tokens, C = 6·N·D."""
    def predict(n, d):
        c = 6.0 * n * d
        return 0.3118 * c ** -0.125, 0.2920 * c ** 0.3271
    return predict


def recommender(runs: Runs, **options) -> Predictor:
    """``fitting.recommender`` with its defaults (``options`` override them)."""
    rec = fit_recommender(runs, n_bootstrap=0, **options)

    def predict(n, d):
        r = rec.recommend(n, d)
        return r.learning_rate, r.batch_size_tokens
    return predict


WINDOWS = (0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02)


def recommender_nested(runs: Runs) -> Predictor:
    """The recommender with its window chosen by an inner leave-one-group-out on the
    training groups only: an honest estimate for a window tuned on the data at hand."""
    scores = [leave_one_group_out(runs, functools.partial(recommender, window=w)).mean()
              for w in WINDOWS]
    window = WINDOWS[int(np.argmin(scores))]
    logger.debug("inner leave-one-group-out chose window=%g", window)
    return recommender(runs, window=window)


def steplaw_refit(runs: Runs, **options) -> Predictor | None:
    """The Step Law method (near-optimal regression, ``fitting.near_optimal``) refitted;
    ``options`` go to ``fit_near_optimal``."""
    try:
        module = importlib.import_module("fitting.near_optimal")
    except ImportError:
        return None
    fit = module.fit_near_optimal(runs.n_params, runs.n_tokens, runs.learning_rate,
                                  runs.batch_size_tokens, runs.loss, n_bootstrap=0, **options)
    return lambda n, d: tuple(float(v) for v in fit.predict(n, d))


def bell_laws(runs: Runs) -> Predictor | None:
    """Bell-curve estimator (``fitting.bell``): B from its B_opt power law, η from the bell
    η*(B) at that B (see ``BellSurfaceFit.predict``)."""
    try:
        bell = importlib.import_module("fitting.bell")
    except ImportError:
        return None
    fit = bell.fit_bell_surface(runs.n_params, runs.n_tokens, runs.learning_rate,
                                runs.batch_size_tokens, runs.loss, n_bootstrap=0)
    return lambda n, d: tuple(float(v) for v in fit.predict(n, d))


METHODS: list[tuple[str, Method]] = [
    ("steplaw_published", steplaw_published),
    ("deepseek_published", deepseek_published),
    ("steplaw_refit (near_optimal)", steplaw_refit),
    ("near_optimal, B in N and D", functools.partial(steplaw_refit, batch_uses_n_params=True)),
    ("bell laws (bell)", bell_laws),
    # Sensitivity to the near-optimal window (the default, 1 %, was chosen on this benchmark).
    ("recommender window=0.5%", functools.partial(recommender, window=0.005)),
    ("recommender window=2%", functools.partial(recommender, window=0.02)),
    ("recommender", recommender),
]
# Slow (about 1,600 surface fits, minutes on 2 cores): only with --nested.
NESTED = ("recommender window nested-LOO", recommender_nested)


def nearest_regret(runs: Runs, idx: np.ndarray, learning_rate: float, batch: float) -> float:
    """Regret of the group's run nearest to (η, B) in (ln η, ln B): loss/best − 1."""
    dist = ((np.log(runs.learning_rate[idx]) - math.log(learning_rate)) ** 2
            + (np.log(runs.batch_size_tokens[idx]) - math.log(batch)) ** 2)
    loss = runs.loss[idx]
    picked = loss[int(np.argmin(dist))]
    best = np.nanmin(loss)
    return float(picked / best - 1.0) if np.isfinite(picked) else float("inf")


def leave_one_group_out(runs: Runs, method: Method) -> np.ndarray | None:
    """Regret per held-out group (fitting ``method`` on the other groups)."""
    groups = runs.groups()
    regrets = []
    for n, d, idx in groups:
        keep = np.ones(len(runs), bool)
        keep[idx] = False
        predictor = method(runs.subset(keep))
        if predictor is None:
            return None
        lr, batch = predictor(n, d)
        regrets.append(nearest_regret(runs, idx, lr, batch))
    return np.array(regrets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=None,
                        help="Step Law format CSV (default: the bundled copy)")
    parser.add_argument("--json", type=Path, default=None, help="write per-group regrets here")
    parser.add_argument("--nested", action="store_true",
                        help="also score the recommender with its window chosen by an inner "
                             "leave-one-group-out (slow)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = load_steplaw_csv(args.csv or bundled_steplaw_path())
    groups = runs.groups()
    print(f"Step Law sweep (Li et al. 2025, arXiv 2503.04715): {len(runs)} runs, "
          f"{len(groups)} (N, D) groups; leave one group out, regret of the nearest grid run")
    print(f"{'method':<30} {'mean %':>8} {'median %':>9} {'max %':>8} {'seconds':>8}")
    results = {}
    methods = METHODS[:-1] + [NESTED] + METHODS[-1:] if args.nested else METHODS
    for name, method in methods:
        start = time.perf_counter()
        regrets = leave_one_group_out(runs, method)
        elapsed = time.perf_counter() - start
        if regrets is None:
            print(f"{name:<30} {'(estimator not available)':>36}")
            continue
        pct = 100.0 * regrets
        results[name] = pct.tolist()
        print(f"{name:<30} {pct.mean():8.4f} {np.median(pct):9.4f} {pct.max():8.4f} "
              f"{elapsed:8.1f}")
    if args.json:
        payload = {"groups": [[n, d] for n, d, _ in groups], "regret_pct": results}
        args.json.write_text(json.dumps(payload, indent=2))
    rec = np.array(results["recommender"])
    print(f"recommender mean_regret_pct={rec.mean():.4f} max_regret_pct={rec.max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
