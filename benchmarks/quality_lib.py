"""The machinery of ``benchmarks/recommend_quality.py``: the methods it scores, the candidates
its nested choice picks from, every candidate's fit on every training set it needs (computed
once in a process pool, whichever fold asks) and the nested choice itself.

A method maps training runs to ``predict(n_params, n_tokens) -> (learning_rate, B tokens)``.
A training set is "every group but ``excluded``" (indices into ``Runs.groups()``), so a fit
on the runs without groups {g, h} serves the inner fold g of the outer fold h and the inner
fold h of the outer fold g alike.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.quality_scores import Scorer, nearest_regret, own_optima
from fitting.bell import fit_bell_surface
from fitting.data import Runs
from fitting.near_optimal import fit_near_optimal, published_step_law
from fitting.recommender import fit_recommender

logger = logging.getLogger("recommend_quality")

Predictor = Callable[[float, float], tuple[float, float]]
Method = Callable[..., Predictor | None]
Excluded = frozenset[int]


def steplaw_published(_: Runs) -> Predictor:
    """Li et al. 2025, eq. (published fit): η = 1.79·N^-0.713·D^0.307, B = 0.58·D^0.571."""
    return lambda n, d: tuple(float(v) for v in published_step_law(n, d))  # type: ignore[return-value]


def deepseek_published(_: Runs) -> Predictor:
    """DeepSeek LLM (2024): η = 0.3118·C^-0.125, B = 0.2920·C^0.3271 tokens, C = 6·N·D."""

    def predict(n, d):
        c = 6.0 * n * d
        return 0.3118 * c**-0.125, 0.2920 * c**0.3271

    return predict


def recommender(runs: Runs, **options) -> Predictor:
    """``fitting.recommender`` with its defaults (``options`` override them)."""
    rec = fit_recommender(runs, n_bootstrap=0, **options)

    def predict(n, d):
        r = rec.recommend(n, d)
        return r.learning_rate, r.batch_size_tokens

    return predict


def steplaw_refit(runs: Runs, **options) -> Predictor:
    """The Step Law method (near-optimal regression, ``fitting.near_optimal``) refitted;
    ``options`` go to ``fit_near_optimal``."""
    fit = fit_near_optimal(
        runs.n_params,
        runs.n_tokens,
        runs.learning_rate,
        runs.batch_size_tokens,
        runs.loss,
        n_bootstrap=0,
        **options,
    )
    return lambda n, d: tuple(float(v) for v in fit.predict(n, d))


def bell_laws(runs: Runs) -> Predictor:
    """Bell-curve estimator (``fitting.bell``): B from its B_opt power law, η from the bell
    η*(B) at that B (see ``BellSurfaceFit.predict``)."""
    fit = fit_bell_surface(
        runs.n_params,
        runs.n_tokens,
        runs.learning_rate,
        runs.batch_size_tokens,
        runs.loss,
        n_bootstrap=0,
    )
    return lambda n, d: tuple(float(v) for v in fit.predict(n, d))


FITTERS: dict[str, Method] = {
    "steplaw_published": steplaw_published,
    "deepseek_published": deepseek_published,
    "recommender": recommender,
    "near_optimal": steplaw_refit,
    "bell": bell_laws,
}


@dataclass(frozen=True)
class Candidate:
    """A method of ``FITTERS`` with its options: a row of the table, a choice of the nested
    selection, or both."""

    label: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()

    def fit(self, runs: Runs, extra: dict[str, Any] | None = None) -> Predictor | None:
        """The method fitted to ``runs``; ``extra`` options go to the recommender only."""
        options = dict(self.options)
        if self.method == "recommender":
            options.update(extra or {})
        return FITTERS[self.method](runs, **options)


WINDOWS = (0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02)
F_SCALES = (0.002, 0.01)  # the robust loss's scale; 0.01 in ln L is about least squares here


def recommender_defaults() -> dict[str, Any]:
    """``fit_recommender``'s own window, f_scale and cubic (the served options)."""
    params = inspect.signature(fit_recommender).parameters
    return {name: params[name].default for name in ("window", "f_scale", "cubic")}


def fast_inner_options() -> dict[str, Any]:
    """What ``--fast-inner`` adds to a recommender candidate's options in the inner folds:
    ``law_forms=False`` where ``fit_recommender`` averages law forms (that averaging refits
    the surface a dozen times, five times the cost of the rest of the fit). Not faithful:
    it changes which candidate wins (see ``benchmarks/recommend_quality.py``)."""
    params = inspect.signature(fit_recommender).parameters
    return {"law_forms": False} if "law_forms" in params else {}


def recommender_grid() -> list[Candidate]:
    """Every option of the recommender that was set by looking at this benchmark's score
    (window × f_scale × cubic terms), the served defaults first so that ties keep them."""
    default = recommender_defaults()
    combos = [default] + [
        {"window": w, "f_scale": f, "cubic": c}
        for c in (True, False)
        for f in F_SCALES
        for w in WINDOWS
        if {"window": w, "f_scale": f, "cubic": c} != default
    ]
    return [
        Candidate(
            f"recommender w={o['window']:.2%} f={o['f_scale']:g}"
            + ("" if o["cubic"] else " quadratic"),
            "recommender",
            tuple(sorted(o.items())),
        )
        for o in combos
    ]


def other_methods() -> list[Candidate]:
    """The fitted methods of the table besides the recommender. The published formulas are
    not candidates: the Step Law formula was fitted to this sweep, test groups included."""
    return [
        Candidate("near_optimal (Step Law refit)", "near_optimal"),
        Candidate("near_optimal, B in N and D", "near_optimal", (("batch_uses_n_params", True),)),
        Candidate("bell laws", "bell"),
    ]


# Per worker process: the runs, their groups, the candidates and the inner fits' extra
# options (set by ``_init_worker``).
_WORKER: dict[str, Any] = {}
Key = tuple[int, Excluded, bool]  # candidate, groups left out, an inner fold's fit


def _init_worker(runs: Runs, candidates: Sequence[Candidate], inner: dict[str, Any]) -> None:
    _WORKER.update(runs=runs, groups=runs.groups(), candidates=list(candidates), inner=inner)
    logging.getLogger("fitting").setLevel(logging.WARNING)  # a line per bootstrap otherwise


def training_runs(runs: Runs, groups, excluded: Iterable[int]) -> Runs:
    """The runs of every group but those numbered in ``excluded`` (indices into ``groups``)."""
    keep = np.ones(len(runs), bool)
    for g in excluded:
        keep[groups[g].index] = False
    return runs.subset(keep)


def _fit_job(key: Key) -> tuple[Key, np.ndarray]:
    """Candidate ``key[0]`` fitted without the groups ``key[1]`` (with the inner fits'
    options when ``key[2]``): its (η, B) at every group's (N, D), NaN where it has none."""
    k, excluded, inner = key
    runs, groups, cand = _WORKER["runs"], _WORKER["groups"], _WORKER["candidates"][k]
    predictor = cand.fit(training_runs(runs, groups, excluded), _WORKER["inner"] if inner else None)
    out = np.full((len(groups), 2), np.nan)
    for i, group in enumerate(groups):
        if predictor is not None:
            try:
                out[i] = predictor(group.n_params, group.n_tokens)
            except (ValueError, RuntimeError) as exc:  # not ok on this training set
                logger.debug("%s without %s: %s", cand.label, sorted(excluded), exc)
    return key, out


class FitCache:
    """Predictions of each candidate fitted on each training set, by (candidate index,
    excluded groups, inner); ``compute`` fits the missing ones, ``workers`` processes at a
    time. With ``fast_inner`` the inner folds' fits add :func:`fast_inner_options` to the
    recommender's options; by default every fit is the method as served."""

    def __init__(
        self, runs: Runs, candidates: Sequence[Candidate], workers: int, fast_inner: bool = False
    ):
        self.runs, self.groups, self.candidates = runs, runs.groups(), list(candidates)
        self.workers = workers
        self.inner = fast_inner_options() if fast_inner else {}
        self._pred: dict[Key, np.ndarray] = {}
        _init_worker(runs, candidates, self.inner)  # for workers=1

    def key(self, k: int, excluded: Excluded, inner: bool = False) -> Key:
        """The key under which a fit is stored: an inner fit is the outer one where the
        inner options change nothing for this candidate."""
        return (
            k,
            excluded,
            inner and bool(self.inner) and self.candidates[k].method == "recommender",
        )

    def __getitem__(self, key: Key) -> np.ndarray:
        return self._pred[self.key(*key)]

    def map(self, fn: Callable, jobs: Sequence, what: str) -> list:
        """``fn`` over ``jobs`` in the worker pool, in order, with progress on stderr."""
        start, out = time.perf_counter(), []
        step = max(1, len(jobs) // 10)
        if self.workers <= 1:
            results: Iterable = map(fn, jobs)
        else:
            ctx = multiprocessing.get_context("fork")
            pool = ctx.Pool(self.workers, _init_worker, (self.runs, self.candidates, self.inner))
            results = pool.imap(fn, jobs, chunksize=max(1, min(8, len(jobs) // 64)))
        try:
            for i, result in enumerate(results, 1):
                out.append(result)
                if i % step == 0 or i == len(jobs):
                    logger.info(
                        "%s: %d of %d (%.0f s)", what, i, len(jobs), time.perf_counter() - start
                    )
        finally:
            if self.workers > 1:
                pool.close()
                pool.join()
        return out

    def compute(self, keys: Iterable[Key], what: str = "fits") -> None:
        todo = sorted({self.key(*key) for key in keys} - set(self._pred), key=_key_order)
        for key, pred in self.map(_fit_job, todo, what):
            self._pred[key] = pred


def _key_order(key: Key) -> tuple:
    return (len(key[1]), sorted(key[1]), key[0], key[2])


def nested_jobs(candidates: Iterable[int], excluded: Excluded, n_groups: int):
    """The inner fits that the nested choice on the training set "all but ``excluded``"
    needs: every candidate on that set less each of its groups."""
    for k in candidates:
        for g in range(n_groups):
            if g not in excluded:
                yield k, excluded | {g}, True


def nested_choice(
    cache: FitCache, candidates: Sequence[int], excluded: Excluded
) -> tuple[int, dict[int, float]]:
    """The candidate whose mean nearest-run regret over a leave-one-group-out on the groups
    not in ``excluded`` is least (the first on ties), and every candidate's inner score."""
    runs, groups = cache.runs, cache.groups
    train = [g for g in range(len(groups)) if g not in excluded]
    scores = {
        k: float(
            np.mean(
                [
                    nearest_regret(runs, groups[g].index, *cache[k, excluded | {g}, True][g])
                    for g in train
                ]
            )
        )
        for k in candidates
    }
    return min(candidates, key=lambda k: scores[k]), scores


def served_job(job: tuple[Excluded, tuple[int, ...], int]) -> dict[int, dict[str, Any]]:
    """The served recommender (``fit_recommender``'s defaults, ``job[2]`` bootstrap draws)
    fitted without the groups ``job[0]``: for each group of ``job[1]``, its (N, D) and the
    90 % intervals (low, high) of η and B there."""
    excluded, held, n_bootstrap = job
    runs, groups = _WORKER["runs"], _WORKER["groups"]
    rec = fit_recommender(training_runs(runs, groups, excluded), n_bootstrap=n_bootstrap, seed=0)
    out = {}
    for g in held:
        n, d = groups[g].n_params, groups[g].n_tokens
        answer = rec.recommend(n, d)
        lr, batch = answer.learning_rate_interval, answer.batch_size_tokens_interval
        out[g] = {
            "n_params": n,
            "n_tokens": d,
            "learning_rate": (lr.low, lr.high),
            "batch_size_tokens": (batch.low, batch.high),
        }
    return out


def extrapolation_splits(runs: Runs) -> dict[str, Excluded]:
    """Held-out groups of each split: those at the largest N, those at the largest D."""
    groups = runs.groups()
    largest_n = max(g.n_params for g in groups)
    largest_d = max(g.n_tokens for g in groups)
    return {
        "largest N": frozenset(i for i, g in enumerate(groups) if g.n_params == largest_n),
        "largest D": frozenset(i for i, g in enumerate(groups) if g.n_tokens == largest_d),
    }


def in_sample_references(runs: Runs, score: Scorer) -> dict[str, np.ndarray]:
    """Regrets per group (``score``'s two, in %) of two fits that have seen the group's own
    runs (not predictions): the recommender's laws fitted on every group, and each group's
    own smooth optimum under the shared valley shape (``fit_group_optima``). Where these
    already miss a group's best cell, no law in N and D fitted without the group can be
    expected to hit it."""
    law = recommender(runs)
    by_group = own_optima(runs)
    nan = (float("nan"), float("nan"))
    points = [(g.n_params, g.n_tokens) for g in runs.groups()]
    return {
        "law fitted in-sample": np.array([score(g, law(*nd)) for g, nd in enumerate(points)]),
        "group's own optimum": np.array(
            [score(g, by_group.get(nd, nan)) for g, nd in enumerate(points)]
        ),
    }
