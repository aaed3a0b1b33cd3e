"""The bell curve of η*(B) behind an imposed batch size: it follows a known bell, the
surface coupling is its named fallback, and its state round-trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fitting import surface as surf
from fitting.bell import bell_learning_rate
from fitting.bell_state import BellState, fit_bell_state, log_shape
from fitting.data import Runs, bundled_steplaw_path, load_steplaw_csv
from fitting.imposed_batch import FALLBACK_WARNING, SOURCE_LR_FOR_BATCH
from fitting.recommender import Recommender, fit_recommender
from fitting.recommender_state import SurfacePoint
from fitting.results import FitStatus


def eta_peak(n_params, n_tokens):
    return 3e-3 * (n_params / 4e8) ** -0.6 * (n_tokens / 2e10) ** 0.2


def b_crit(n_params, n_tokens):
    return 2.0**21 * (n_tokens / 2e10) ** 0.5


def bell_runs() -> Runs:
    """Per (N, D) group, 8 batch sizes b_crit·2^-4 … b_crit·2^3 and 7 learning rates √2
    apart about Li et al.'s bell η*(B) with the laws above; the loss is a valley in ln η
    about η*(B) and in ln B about B_opt = b_crit/2:
    ln L = 0.9 − 0.06·n − 0.04·d + 0.02·ln²(η/η*(B)) + 0.006·ln²(B/B_opt)."""
    records = []
    for n_params in (2e8, 4e8, 8e8):
        for n_tokens in (5e9, 2e10, 8e10):
            n, d = math.log(n_params / 4e8), math.log(n_tokens / 2e10)
            peak, crit = eta_peak(n_params, n_tokens), b_crit(n_params, n_tokens)
            for k in range(-4, 4):
                batch = crit * 2.0**k
                best = bell_learning_rate(batch, peak, crit)
                for j in range(-3, 4):
                    lr = best * math.exp(0.5 * math.log(2) * j + 0.1)
                    log_loss = (
                        0.9
                        - 0.06 * n
                        - 0.04 * d
                        + 0.02 * math.log(lr / best) ** 2
                        + 0.006 * math.log(batch / (crit / 2)) ** 2
                    )
                    records.append(
                        {
                            "n_params": n_params,
                            "n_tokens": n_tokens,
                            "seq_len": 2048,
                            "learning_rate": lr,
                            "batch_size_tokens": batch,
                            "loss": math.exp(log_loss),
                        }
                    )
    return Runs.from_records(records)


@pytest.fixture(scope="module")
def known_bell() -> Recommender:
    return fit_recommender(bell_runs(), n_bootstrap=0)


def surface_only(rec: Recommender) -> Recommender:
    """The same fit without its bell state: the named fallback, as served before."""
    return Recommender.from_dict({**json.loads(json.dumps(rec.to_dict())), "bell": None})


def test_the_shape_is_li_et_al_s_bell_at_one_half():
    v = np.linspace(-4, 4, 17)
    assert log_shape(v, 0.5, 0.5) == pytest.approx(np.log(np.cosh(v / 2)), abs=1e-12)
    b = np.exp(v) * 1e6
    li = bell_learning_rate(b, 3e-3, 1e6)
    assert np.log(li) == pytest.approx(math.log(3e-3) - log_shape(v, 0.5, 0.5), abs=1e-12)
    # Rise α below the peak, fall β above it.
    assert log_shape(-10.0, 1.2, 0.1) - log_shape(-11.0, 1.2, 0.1) == pytest.approx(-1.2, abs=1e-3)
    assert log_shape(21.0, 1.2, 0.1) - log_shape(20.0, 1.2, 0.1) == pytest.approx(0.1, abs=1e-3)


def test_the_answer_follows_a_known_bell(known_bell):
    """The fitted bell is the true one (laws and shape); the answer at an imposed B is the
    bell's shape scaled through the surface's optimum, so its ratio to the truth is the
    same at every B, and the η at B* is the recommended η. The surface coupling, which it
    replaces, gives about twice the true η at 8·b_crit (16× B_opt)."""
    curve = known_bell.to_dict()["bell"]["curve"]
    assert curve["rise"] == pytest.approx(0.5, abs=0.01)
    assert curve["fall"] == pytest.approx(0.5, abs=0.01)
    assert curve["eta_peak"]["n_params_exponent"] == pytest.approx(-0.6, abs=0.01)
    assert curve["eta_peak"]["n_tokens_exponent"] == pytest.approx(0.2, abs=0.01)
    assert curve["b_crit"]["n_params_exponent"] == pytest.approx(0.0, abs=0.01)
    assert curve["b_crit"]["n_tokens_exponent"] == pytest.approx(0.5, abs=0.01)
    old = surface_only(known_bell)
    for n, d in ((4e8, 2e10), (3e8, 4e10)):
        free = known_bell.recommend(n, d)
        at_optimum = known_bell.recommend(n, d, batch_size_tokens=free.batch_size_tokens)
        assert at_optimum.learning_rate_for_batch == pytest.approx(free.learning_rate, rel=1e-9)
        ratios, old_ratios = [], []
        for factor in (1 / 16, 1 / 4, 1, 4, 16):
            batch = 0.5 * b_crit(n, d) * factor
            truth = bell_learning_rate(batch, eta_peak(n, d), b_crit(n, d))
            out = known_bell.recommend(n, d, batch_size_tokens=batch)
            assert out.sources["learning_rate_for_batch"].startswith("bell curve of eta*(B)")
            assert out.warnings == []
            ratios.append(out.learning_rate_for_batch / truth)
            old_ratios.append(old.recommend(n, d, batch_size_tokens=batch).learning_rate_for_batch)
            old_ratios[-1] /= truth
        assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=0.01)
        assert ratios == pytest.approx([1.0] * 5, abs=0.06)  # the surface's level
        assert old_ratios[-1] > 1.5 and max(old_ratios) / min(old_ratios) > 1.5


def test_without_a_bell_the_surface_coupling_is_the_named_fallback():
    """Runs whose η optimum is bracketed at two batch sizes per group only: no bell, and
    the answer is the surface's own η–B coupling, named as the fallback, with a warning
    where it overestimated on the Step Law sweep (above 2·B*)."""
    runs = bell_runs()
    crit = b_crit(runs.n_params, runs.n_tokens)
    step = np.round(np.log2(runs.batch_size_tokens / crit))
    best = bell_learning_rate(runs.batch_size_tokens, eta_peak(runs.n_params, runs.n_tokens), crit)
    kept = np.isin(step, [-1, 0]) | (runs.learning_rate > best)
    rec = fit_recommender(runs.subset(kept), n_bootstrap=2)
    assert rec.status is FitStatus.OK
    bell = rec.to_dict()["bell"]
    assert bell["status"] == "insufficient_data" and bell["curve"] is None
    assert "0 (N, D) groups have a bracketed η optimum at 3 or more" in bell["reason"]
    p = SurfacePoint.from_dict(rec.to_dict()["params"]).params
    free = rec.recommend(4e8, 2e10)
    x, y = math.log(free.learning_rate), math.log(free.batch_size_tokens)
    for factor, warned in ((0.5, False), (4.0, True)):
        batch = free.batch_size_tokens * factor
        out = rec.recommend(4e8, 2e10, batch_size_tokens=batch)
        coupling = math.exp(x + float(surf.best_eta_offset(p, math.log(batch) - y)))
        assert out.learning_rate_for_batch == pytest.approx(coupling, rel=1e-12)
        source = out.sources["learning_rate_for_batch"]
        assert source.startswith(SOURCE_LR_FOR_BATCH + " (fallback: the bell fit is ")
        assert "insufficient_data" in source
        fallback = [w for w in out.warnings if w.startswith(FALLBACK_WARNING[:40])]
        assert len(fallback) == int(warned)
        # The surface coupling's own interval comes with it.
        assert out.learning_rate_for_batch_interval is not None
    # A state stored without a bell (None) falls back the same way.
    stored = surface_only(rec).recommend(4e8, 2e10, batch_size_tokens=free.batch_size_tokens)
    assert "no bell state stored" in stored.sources["learning_rate_for_batch"]


@pytest.fixture(scope="module")
def steplaw() -> Runs:
    return load_steplaw_csv(bundled_steplaw_path())


def test_on_the_steplaw_sweep_the_bell_flattens_where_the_surface_keeps_rising(steplaw):
    """The groups' own η*(B) rise steeply below B* and stay about flat above it (the fitted
    rise exponent is near 1, the fall near 0.15): 4× above B* the bell's η is within 20 %
    of the η at B*, the surface coupling's is more than 1.3× it."""
    rec = fit_recommender(steplaw, n_bootstrap=8, seed=1)
    bell = rec.to_dict()["bell"]
    assert bell["status"] == "ok" and bell["n_groups"] == 17
    assert bell["regressors"] == ["n_params", "n_tokens"]
    assert 0.8 < bell["curve"]["rise"] < 1.5 and 0.02 < bell["curve"]["fall"] < 0.4
    old = surface_only(rec)
    free = rec.recommend(4e8, 2e10)
    far = rec.recommend(4e8, 2e10, batch_size_tokens=4 * free.batch_size_tokens)
    far_old = old.recommend(4e8, 2e10, batch_size_tokens=4 * free.batch_size_tokens)
    assert 0.8 < far.learning_rate_for_batch / free.learning_rate < 1.2
    assert far_old.learning_rate_for_batch / free.learning_rate > 1.3
    # Below B* it falls about as B^rise (rise ≈ 1 well below b_crit).
    small = rec.recommend(4e8, 2e10, batch_size_tokens=free.batch_size_tokens / 4)
    assert 0.3 < small.learning_rate_for_batch / free.learning_rate < 0.5
    # The interval: the groups' own η*(B) scatter about the answer by ~0.14 in ln η.
    iv = far.learning_rate_for_batch_interval
    assert 0.6 < iv.low / far.learning_rate_for_batch < 0.85
    assert 1.1 < iv.high / far.learning_rate_for_batch < 1.4


def test_state_round_trips_through_json(steplaw):
    groups = steplaw.groups()[::2]
    runs = steplaw.subset(np.concatenate([g.index for g in groups]))
    rec = fit_recommender(runs, n_bootstrap=3, seed=2)
    state = json.loads(json.dumps(rec.to_dict()))
    assert state["bell"]["status"] == "ok" and len(state["bell"]["draws"]) == 3
    assert BellState.from_dict(state["bell"]) == BellState.from_dict(rec.to_dict()["bell"])
    again = Recommender.from_dict(state)
    for batch in (2**17, 2**20, 2**22):
        a = rec.recommend(5e8, 3e10, batch_size_tokens=batch).as_dict()
        assert a == again.recommend(5e8, 3e10, batch_size_tokens=batch).as_dict()
        assert a["sources"]["learning_rate_for_batch"].startswith("bell curve of eta*(B)")


def test_thin_data_gives_a_bell_state_that_says_why(steplaw):
    p = surf.fit_surface(steplaw).params
    assert p is not None
    two = steplaw.subset(np.concatenate([g.index for g in steplaw.groups()[:2]]))
    state = fit_bell_state(two, p, n_bootstrap=0, seed=0)
    assert state.status is FitStatus.INSUFFICIENT_DATA and not state.ok
    assert state.reason.startswith("2 (N, D) groups have a bracketed η optimum")
    with pytest.raises(ValueError, match="the bell fit is insufficient_data"):
        _ = state.source
    assert BellState.from_dict(json.loads(json.dumps(state.as_dict()))) == state
    # One N, several D: the laws are in D alone.
    same_n = steplaw.subset(np.flatnonzero(steplaw.n_params == steplaw.n_params.min()))
    in_d = fit_bell_state(same_n, p, n_bootstrap=2, seed=0)
    assert in_d.ok and in_d.regressors == ("n_tokens",)
    assert in_d.curve is not None and in_d.curve.b_crit.n_params_exponent == 0.0
