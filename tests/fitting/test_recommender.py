"""The recommender: its contract, its closed forms on a known surface, and its quality."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import stats

from fitting.data import Runs, bundled_steplaw_path, load_steplaw_csv
from fitting.group_optima import fit_group_optima
from fitting.intervals import NO_CBS_SCATTER_WARNING, NO_SCATTER_WARNING, GroupScatter
from fitting.recommender import (
    STATE_VERSION,
    Recommender,
    RecommenderUnavailable,
    fit_recommender,
)
from fitting.recommender_state import SurfaceDraws, SurfacePoint
from fitting.results import FitStatus
from fitting.surface import fit_surface, optimum_log


@pytest.fixture(scope="module")
def steplaw() -> Runs:
    return load_steplaw_csv(bundled_steplaw_path())


@pytest.fixture(scope="module")
def fitted(steplaw) -> Recommender:
    """One law form: the closed forms below are the surface's own (the average over law
    forms is tested in test_extrapolation.py)."""
    return fit_recommender(steplaw, n_bootstrap=20, seed=1, law_forms=False)


def synthetic_runs(
    *, eta=(-0.7, 0.3), batch=(0.0, 0.6), curv=(0.01, 0.006), loss_d=-0.04, noise=0.0, seed=0
) -> Runs:
    """A full (η, B) grid per (N, D) group from a known surface:
    ln L = 0.9 − 0.06·n + loss_d·d + A·u² + Bc·v², optimum lines as power laws."""
    rng = np.random.default_rng(seed)
    records = []
    for n_params in (2e8, 4e8, 8e8):
        for n_tokens in (5e9, 2e10, 8e10):
            n, d = math.log(n_params / 4e8), math.log(n_tokens / 2e10)
            x_opt = math.log(2e-3) + eta[0] * n + eta[1] * d
            y_opt = math.log(2**19) + batch[0] * n + batch[1] * d
            for x in x_opt + np.log(2) * np.arange(-3, 4) / 2 + 0.1:
                for y in y_opt + np.log(2) * np.arange(-3, 4) / 2 - 0.1:
                    log_loss = (
                        0.9
                        - 0.06 * n
                        + loss_d * d
                        + curv[0] * (x - x_opt) ** 2
                        + curv[1] * (y - y_opt) ** 2
                        + noise * rng.standard_normal()
                    )
                    records.append(
                        {
                            "n_params": n_params,
                            "n_tokens": n_tokens,
                            "seq_len": 2048,
                            "learning_rate": math.exp(x),
                            "batch_size_tokens": math.exp(y),
                            "loss": math.exp(log_loss),
                        }
                    )
    return Runs.from_records(records)


def test_recovers_a_known_surface_and_its_critical_batch_size():
    runs = synthetic_runs()
    rec = fit_recommender(runs, n_bootstrap=0, window=0.05)
    assert rec.status is FitStatus.OK, rec.reason
    params = rec.to_dict()["params"]
    assert params["eta_n"] == pytest.approx(-0.7, abs=0.01)
    assert params["eta_d"] == pytest.approx(0.3, abs=0.01)
    assert params["batch_n"] == pytest.approx(0.0, abs=0.01)
    assert params["batch_d"] == pytest.approx(0.6, abs=0.01)
    assert params["loss_d"] == pytest.approx(-0.04, abs=1e-3)
    out = rec.recommend(4e8, 2e10)
    assert out.learning_rate == pytest.approx(2e-3, rel=0.02)
    assert out.batch_size_tokens == pytest.approx(2**19, rel=0.02)
    # Q_B(v) = Bc·v² with no coupling: v_c = sqrt(−loss_d·ln 1.2 / Bc) and
    # CBS = B*(1.2·D) · e^v_c.
    v_c = math.sqrt(0.04 * math.log(1.2) / 0.006)
    expected = 2**19 * 1.2**0.6 * math.exp(v_c)
    assert out.critical_batch_size_tokens == pytest.approx(expected, rel=0.03)
    # At the CBS itself both overheads vanish; at the optimum only steps are paid.
    at_cbs = rec.recommend(4e8, 2e10, batch_size_tokens=expected)
    assert at_cbs.token_overhead == pytest.approx(0.0, abs=0.02)
    assert at_cbs.step_overhead == pytest.approx(0.0, abs=0.02)
    at_opt = rec.recommend(4e8, 2e10, batch_size_tokens=2**19)
    assert at_opt.token_overhead == 0.0
    assert at_opt.step_overhead == pytest.approx(expected / 2**19 / 1.2 - 1, rel=0.05)
    # No η–B coupling in this surface: the best η does not move with B.
    assert at_cbs.learning_rate_for_batch == pytest.approx(out.learning_rate, rel=0.02)


def test_contract_on_the_steplaw_sweep(fitted):
    assert fitted.status is FitStatus.OK and fitted.n_runs == 1911
    assert fitted.fitted_range["n_params"] == [214663680.0, 1073741824.0]
    out = fitted.recommend(4e8, 2e10, seq_len=4096)
    for name in (
        "learning_rate",
        "batch_size_tokens",
        "batch_size_sequences",
        "critical_batch_size_tokens",
    ):
        value = getattr(out, name)
        interval = getattr(out, f"{name}_interval")
        assert math.isfinite(value) and value > 0
        assert interval.level == 0.9
        assert interval.low < value < interval.high
    assert out.batch_size_sequences == pytest.approx(out.batch_size_tokens / 4096)
    assert out.critical_batch_size_tokens > out.batch_size_tokens
    assert set(out.sources) == {"learning_rate", "batch_size_tokens", "critical_batch_size_tokens"}
    assert "Zhang" in out.sources["critical_batch_size_tokens"]
    assert out.learning_rate_for_batch is None and out.step_overhead is None
    assert out.warnings == [
        "seq_len=4096 is outside the fitted range [2048, 2048]; batch "
        "sizes are in tokens and assumed to transfer"
    ]
    # Within the range the answer sits where the sweep's best runs are.
    assert 1e-3 < out.learning_rate < 4e-3
    assert 100 * 2048 < out.batch_size_tokens < 400 * 2048
    laws = fitted.power_laws()
    for name in ("learning_rate", "batch_size_tokens", "critical_batch_size_tokens"):
        law = laws[name]
        value = (
            law["coefficient"] * 4e8 ** law["n_params_exponent"] * 2e10 ** law["n_tokens_exponent"]
        )
        assert value == pytest.approx(getattr(out, name), rel=1e-9)
    # Like Step Law's: η falls with N and rises with D; B rises with D.
    assert laws["learning_rate"]["n_params_exponent"] < 0
    assert laws["learning_rate"]["n_tokens_exponent"] > 0
    assert laws["batch_size_tokens"]["n_tokens_exponent"] > 0.3
    as_json = json.loads(json.dumps(out.as_dict()))
    assert as_json["critical_batch_size_tokens_interval"]["level"] == 0.9


def test_extrapolation_is_warned_with_the_fitted_range_and_how_far(fitted):
    assert fitted.recommend(7e10, 2e12).warnings == [
        "n_params=7e+10 is outside the fitted range [2.147e+08, 1.074e+09], "
        "65.2× above the largest fitted: extrapolating",
        "n_tokens=2e+12 is outside the fitted range [4e+09, 1e+11], "
        "20× above the largest fitted: extrapolating",
    ]
    below = fitted.recommend(1e8, 1e9).warnings
    assert below[:2] == [
        "n_params=1e+08 is outside the fitted range [2.147e+08, 1.074e+09], "
        "2.15× below the smallest fitted: extrapolating",
        "n_tokens=1e+09 is outside the fitted range [4e+09, 1e+11], "
        "4× below the smallest fitted: extrapolating",
    ]
    # D/N = 10 is below the sweep's smallest tokens per parameter too.
    assert below[2].startswith("n_tokens/n_params=10 is outside the fitted range [")
    assert "× below the smallest fitted: extrapolating" in below[2]
    assert fitted.recommend(4e8, 2e10).warnings == []


def test_imposed_batch_size(fitted):
    base = fitted.recommend(4e8, 2e10)
    previous_lr = 0.0
    for factor in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        batch = base.critical_batch_size_tokens * factor
        out = fitted.recommend(4e8, 2e10, batch_size_tokens=batch)
        assert out.imposed_batch_size_tokens == batch
        assert out.step_overhead >= 0 and out.token_overhead >= 0
        if factor < 1:
            assert out.step_overhead > 0 and out.token_overhead == 0
        if factor > 1:
            assert out.token_overhead > 0 and out.step_overhead == 0
        # The best η rises with B up to about the CBS and falls slowly beyond it (the bell
        # curve of fitting.bell_state): within 20 % of the recommended η up to 8× the CBS.
        if factor <= 1:
            assert out.learning_rate_for_batch > previous_lr
        assert 0.8 < out.learning_rate_for_batch / base.learning_rate < 1.2
        previous_lr = out.learning_rate_for_batch
        iv = out.learning_rate_for_batch_interval
        assert iv.low < out.learning_rate_for_batch < iv.high
        assert "learning_rate_for_batch" in out.sources
    far = fitted.recommend(4e8, 2e10, batch_size_tokens=2**24)
    assert far.warnings == [
        "batch_size_tokens=1.678e+07 is outside the fitted range "
        "[3.277e+04, 4.194e+06], 4× above the largest fitted: extrapolating"
    ]
    # A batch 8× the CBS costs more than the 20 % token overhead that defines the CBS.
    assert (
        fitted.recommend(
            4e8, 2e10, batch_size_tokens=8 * base.critical_batch_size_tokens
        ).token_overhead
        > 0.2
    )


def test_intervals_are_prediction_intervals_for_a_new_group(fitted, steplaw):
    """At N = 4e8, D = 3e10 the 90 % interval of η* (and of B*) is
    exp(x̂ + r̄ ± t_{0.95, G−3}·√(Var_b(x*_b) + Σ(r − r̄)²/(G − 3))), r the groups' own
    optima (fit_group_optima on the same runs) minus the laws: about ±18 % in η, where the
    laws' own bootstrap interval is about ±3 %; the groups' scatter sets the width."""
    n, d = 4e8, 3e10
    out = fitted.recommend(n, d, batch_size_tokens=2**20)
    for name in (
        "learning_rate",
        "batch_size_tokens",
        "critical_batch_size_tokens",
        "learning_rate_for_batch",
    ):
        iv = getattr(out, f"{name}_interval")
        assert iv.low < getattr(out, name) < iv.high, name
    draws = SurfaceDraws.stack([SurfacePoint.from_dict(row) for row in fitted.to_dict()["draws"]])
    laws = fitted.power_laws()
    optima = fit_group_optima(steplaw)
    t = stats.t.ppf(0.95, optima.n_params.size - 3)
    xs, ys = optimum_log(draws.params, math.log(n), math.log(d))
    for name, own, law_draws in (
        ("learning_rate", optima.learning_rate, xs),
        ("batch_size_tokens", optima.batch_size_tokens, ys),
    ):
        law = laws[name]
        on_law = (
            law["coefficient"]
            * optima.n_params ** law["n_params_exponent"]
            * optima.n_tokens ** law["n_tokens_exponent"]
        )
        offsets = np.log(own / on_law)
        scatter = np.sum((offsets - offsets.mean()) ** 2) / (offsets.size - 3)
        half = t * math.sqrt(law_draws.var(ddof=1) + scatter)
        centre = math.log(getattr(out, name)) + offsets.mean()
        iv = getattr(out, f"{name}_interval")
        assert math.log(iv.low) == pytest.approx(centre - half, abs=1e-9)
        assert math.log(iv.high) == pytest.approx(centre + half, abs=1e-9)
        # Wider than the laws' own interval, by about the groups' scatter.
        law_low, law_high = np.percentile(law_draws, [5, 95])
        assert half > 2 * (law_high - law_low) / 2
        assert t * math.sqrt(scatter) < half < 1.25 * t * math.sqrt(scatter)
    assert 0.75 < out.learning_rate_interval.low / out.learning_rate < 0.9
    assert 1.1 < out.learning_rate_interval.high / out.learning_rate < 1.3


def test_without_the_groups_scatter_the_intervals_are_the_laws_and_say_so(fitted):
    state = json.loads(json.dumps(fitted.to_dict()))
    state["scatter"] = GroupScatter.empty().as_dict()
    narrow = Recommender.from_dict(state).recommend(4e8, 3e10)
    served = fitted.recommend(4e8, 3e10)
    assert NO_SCATTER_WARNING in narrow.warnings and served.warnings == []
    for name in ("learning_rate", "batch_size_tokens", "critical_batch_size_tokens"):
        iv, wide = getattr(narrow, f"{name}_interval"), getattr(served, f"{name}_interval")
        assert wide.low < iv.low < getattr(narrow, name) < iv.high < wide.high
    # No bootstrap, no intervals, and no warning about what they hold.
    none = fit_recommender(synthetic_runs(), n_bootstrap=0, window=0.05).recommend(4e8, 2e10)
    assert math.isnan(none.learning_rate_interval.low) and none.warnings == []


def test_the_bootstrap_counts_a_group_drawn_k_times_k_times(steplaw):
    """Each draw refits the surface on the resampled groups as a list, a group drawn k times
    listed k times (fitting.surface.fit_surface's ``groups``), not on the resampled runs,
    where the equal-weight rule merged the copies into one group."""
    runs = steplaw.subset(np.concatenate([group.index for group in steplaw.groups()[::2]]))
    groups = runs.groups()
    rec = fit_recommender(runs, n_bootstrap=1, seed=3)
    pick = np.random.default_rng(3).integers(0, len(groups), len(groups))  # the same draw
    assert np.bincount(pick).max() >= 2
    draw = rec.to_dict()["draws"][0]
    listed = fit_surface(runs, groups=[groups[i].index for i in pick]).params
    merged = fit_surface(runs.subset(np.concatenate([groups[i].index for i in pick]))).params
    assert {k: draw[k] for k in listed.as_dict()} == pytest.approx(listed.as_dict(), rel=1e-9)
    assert abs(merged.eta_0 - listed.eta_0) > 1e-3


def test_state_round_trips_through_json_and_queries_are_cheap(fitted):
    state = json.loads(json.dumps(fitted.to_dict()))
    again = Recommender.from_dict(state)
    assert again.status is FitStatus.OK and again.n_runs == fitted.n_runs
    a = fitted.recommend(5e8, 3e10, batch_size_tokens=2**20).as_dict()
    b = again.recommend(5e8, 3e10, batch_size_tokens=2**20).as_dict()
    assert a == b
    assert len(json.dumps(state)) < 50_000
    start = time.perf_counter()
    for _ in range(500):
        again.recommend(5e8, 3e10)
    assert (time.perf_counter() - start) / 500 < 1e-3
    # A state stored by another version (1 stored the steps-to-target law positionally, 2
    # had no groups' scatter for the prediction intervals) is refused, so that the service
    # refits instead of misreading it.
    for version in (STATE_VERSION - 1, 99):
        with pytest.raises(ValueError, match="not a loss_surface recommender state"):
            Recommender.from_dict({**state, "version": version})


def test_bad_input_names_the_field(fitted):
    with pytest.raises(ValueError, match="n_params must be finite and > 0"):
        fitted.recommend(0, 1e10)
    with pytest.raises(ValueError, match="n_tokens must be finite and > 0"):
        fitted.recommend(1e8, float("nan"))
    with pytest.raises(ValueError, match="batch_size_tokens must be finite and > 0"):
        fitted.recommend(1e8, 1e10, batch_size_tokens=-5)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        fitted.recommend(1e8, 1e10, seq_len=20.5)
    with pytest.raises(ValueError, match="n_bootstrap must be an integer >= 0"):
        fit_recommender(synthetic_runs(), n_bootstrap=-1)


def test_thin_data_is_insufficient_not_a_number(steplaw):
    groups = steplaw.groups()
    three = np.concatenate([group.index for group in groups[:3]])
    rec = fit_recommender(steplaw.subset(three), n_bootstrap=0)
    assert rec.status is FitStatus.INSUFFICIENT_DATA
    assert "need at least 4" in rec.reason and "have 3" in rec.reason
    with pytest.raises(RecommenderUnavailable, match="insufficient_data"):
        rec.recommend(4e8, 2e10)
    # The state of a thin fit still round-trips (the worker stores it with its reason).
    assert Recommender.from_dict(json.loads(json.dumps(rec.to_dict()))).reason == rec.reason
    # One N only: the N dependence cannot be fitted.
    same_n = np.flatnonzero(steplaw.n_params == groups[0].n_params)
    rec = fit_recommender(steplaw.subset(same_n), n_bootstrap=0)
    assert rec.status is FitStatus.INSUFFICIENT_DATA and "2 distinct n_params" in rec.reason
    # Diverged-only data.
    diverged = Runs(
        n_params=[1e8],
        n_tokens=[1e9],
        seq_len=[2048],
        learning_rate=[1.0],
        batch_size_tokens=[2048.0],
        loss=[float("nan")],
    )
    assert fit_recommender(diverged).status is FitStatus.INSUFFICIENT_DATA


def test_diverged_runs_are_tolerated(steplaw):
    loss = steplaw.loss.copy()
    loss[steplaw.learning_rate > 0.015] = float("inf")
    runs = Runs(
        n_params=steplaw.n_params,
        n_tokens=steplaw.n_tokens,
        seq_len=steplaw.seq_len,
        learning_rate=steplaw.learning_rate,
        batch_size_tokens=steplaw.batch_size_tokens,
        loss=loss,
    )
    rec = fit_recommender(runs, n_bootstrap=0)
    assert rec.status is FitStatus.OK
    assert 1e-3 < rec.recommend(4e8, 2e10).learning_rate < 4e-3


def test_steps_to_target_data_supplies_the_critical_batch_size():
    """Runs with steps-to-target follow Zhang et al.'s S(B) = a + b/B with k = b/a ∝ D^0.5;
    the CBS then comes from fitting.cbs, B* = 1.2·B_ref + 0.2·k per group."""
    surface = synthetic_runs()
    records = [
        {
            "n_params": n,
            "n_tokens": d,
            "seq_len": 2048,
            "learning_rate": lr,
            "loss": loss,
            "batch_size_tokens": b,
        }
        for n, d, lr, loss, b in zip(
            surface.n_params,
            surface.n_tokens,
            surface.learning_rate,
            surface.loss,
            surface.batch_size_tokens,
            strict=True,
        )
    ]
    b_ref = 2.0**16
    batches = b_ref * 2.0 ** np.arange(0, 9)

    def k_of(d):
        return 2.0**20 * (d / 1e10) ** 0.5

    for n_params in (2e8, 8e8):
        for n_tokens in (3e9, 1e10, 3e10):
            k = k_of(n_tokens)
            a = n_tokens / (b_ref + k)  # tokens to target at B_ref = a·(B_ref + k) = D
            target = round(3.0 - 0.1 * math.log(n_tokens), 6)
            for b in batches:
                records.append(
                    {
                        "n_params": n_params,
                        "n_tokens": (a + a * k / b) * b,
                        "seq_len": 2048,
                        "learning_rate": 1e-3,
                        "loss": target,
                        "batch_size_tokens": b,
                        "steps_to_target": a + a * k / b,
                        "target_loss": target,
                    }
                )
    runs = Runs.from_records(records)
    rec = fit_recommender(runs, n_bootstrap=10, window=0.05)
    assert rec.status is FitStatus.OK, rec.reason
    state = json.loads(json.dumps(rec.to_dict()))
    law = state["cbs_law"]
    assert law["n_groups"] == 6 and law["regressors"] == ["n_params", "n_tokens"]
    # Stored by name: ln k = log_coefficient + n_params_exponent·ln N + n_tokens_exponent·ln D
    # with k = 2^20·(D/1e10)^0.5 here, and one entry per bootstrap draw of each law.
    assert law["k"]["n_tokens_exponent"] == pytest.approx(0.5, abs=0.01)
    assert law["k"]["n_params_exponent"] == pytest.approx(0.0, abs=0.01)
    assert law["k"]["log_coefficient"] == pytest.approx(
        math.log(2.0**20) - 0.5 * math.log(1e10), abs=0.05
    )
    assert 2 <= len(law["critical_batch_size_draws"]) == len(law["k_draws"]) <= 10
    # Each group's offset of ln B* from the law (exact here, so about 0): the scatter a new
    # group's B* carries in its prediction interval.
    assert len(law["critical_batch_size_residuals"]) == 6
    assert np.abs(law["critical_batch_size_residuals"]).max() < 0.05
    assert set(law["critical_batch_size"]) == {
        "log_coefficient",
        "n_params_exponent",
        "n_tokens_exponent",
    }
    again = Recommender.from_dict(state)
    out = again.recommend(4e8, 1e10)
    assert "steps-to-target" in out.sources["critical_batch_size_tokens"]
    expected = 1.2 * b_ref + 0.2 * k_of(1e10)
    assert out.critical_batch_size_tokens == pytest.approx(expected, rel=0.05)
    iv = out.critical_batch_size_tokens_interval
    assert iv.low <= out.critical_batch_size_tokens * 1.01 and iv.high >= iv.low
    at_cbs = again.recommend(4e8, 1e10, batch_size_tokens=out.critical_batch_size_tokens)
    assert at_cbs.step_overhead == pytest.approx(0.0, abs=1e-9)
    assert at_cbs.token_overhead == pytest.approx(0.0, abs=1e-9)
    k = k_of(1e10)
    big = again.recommend(4e8, 1e10, batch_size_tokens=4 * expected)
    assert big.token_overhead == pytest.approx((4 * expected + k) / (expected + k) - 1, rel=0.1)
    small = again.recommend(4e8, 1e10, batch_size_tokens=expected / 4)
    assert small.step_overhead == pytest.approx(
        (1 + 4 * k / expected) / (1 + k / expected) - 1, rel=0.1
    )
    assert small.token_overhead == 0.0
    # The groups' scatter about the CBS law widens its interval (ν = 6 − 1 − 2 = 3); with
    # no degree of freedom left it is the law's own, and the answer says so.
    scattered = json.loads(json.dumps(state))
    scattered["cbs_law"]["critical_batch_size_residuals"] = [0.2, -0.2, 0.1, -0.1, 0.0, 0.0]
    wide = Recommender.from_dict(scattered).recommend(4e8, 1e10)
    wide_iv = wide.critical_batch_size_tokens_interval
    assert wide_iv.low < iv.low <= iv.high < wide_iv.high
    assert math.log(wide_iv.high / wide_iv.low) / 2 == pytest.approx(
        stats.t.ppf(0.95, 3) * math.sqrt(0.1 / 3), rel=0.05
    )
    scattered["cbs_law"]["critical_batch_size_residuals"] = [0.2, -0.2, 0.0]
    assert NO_CBS_SCATTER_WARNING in Recommender.from_dict(scattered).recommend(4e8, 1e10).warnings
    assert NO_CBS_SCATTER_WARNING not in out.warnings
    # Without steps-to-target columns the surface supplies the CBS.
    plain = fit_recommender(surface, n_bootstrap=0, window=0.05).recommend(4e8, 1e10)
    assert plain.sources["critical_batch_size_tokens"].startswith("loss_surface")
