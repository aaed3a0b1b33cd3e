"""Families in the fit: one joint surface, each family its own level, shrunk exponents.

The team's runs are Step Law groups moved to another level: every run's learning rate × 1.6,
batch size × 0.6 and loss × 1.1, so the team's true optimum is 1.6 × and 0.6 × Step Law's
at every (N, D), with the same exponents.
"""

from __future__ import annotations

import numpy as np
import pytest

from fitting.data import Runs, bundled_steplaw_path, load_steplaw_csv
from fitting.recommender import fit_recommender
from fitting.results import FitStatus

COLUMNS = ("n_params", "n_tokens", "seq_len", "learning_rate", "batch_size_tokens", "loss")
ETA_SHIFT, BATCH_SHIFT = 1.6, 0.6


@pytest.fixture(scope="module")
def steplaw() -> Runs:
    return load_steplaw_csv(bundled_steplaw_path())


def labelled(runs: Runs, family: str, **scale: float) -> Runs:
    columns = {name: getattr(runs, name) * scale.get(name, 1) for name in COLUMNS}
    columns["seq_len"] = runs.seq_len
    return Runs(**columns, family=[family] * len(runs))


def pooled(*parts: Runs) -> Runs:
    return Runs(
        **{name: np.concatenate([getattr(p, name) for p in parts]) for name in COLUMNS},
        family=np.concatenate([p.family for p in parts if p.family is not None]),
    )


def team_groups(steplaw: Runs, picks: list[int], **scale: float) -> Runs:
    groups = steplaw.groups()
    return labelled(
        steplaw.subset(np.concatenate([groups[i].index for i in picks])), "team", **scale
    )


def exponents(recommender, quantity: str) -> np.ndarray:
    law = recommender.power_laws()[quantity]
    return np.array([law["n_params_exponent"], law["n_tokens_exponent"]])


def test_runs_of_two_families_are_never_one_group(steplaw):
    a = labelled(steplaw, "a")
    both = pooled(a, labelled(steplaw, "b"))
    assert len(both.groups()) == 2 * len(steplaw.groups())
    assert {g.family for g in both.groups()} == {"a", "b"}
    assert both.families() == ["a", "b"]
    with pytest.raises(ValueError, match="family must be a non-empty string"):
        Runs(**{name: getattr(a, name)[:1] for name in COLUMNS}, family=[""])


def test_one_family_of_labels_is_the_unlabelled_fit(steplaw):
    plain = fit_recommender(steplaw, n_bootstrap=0)
    one = fit_recommender(labelled(steplaw, "step-law"), n_bootstrap=0)
    for n, d in [(4e8, 3e10), (7e10, 1.5e13)]:
        a, b = plain.recommend(n, d), one.recommend(n, d)
        assert b.learning_rate == pytest.approx(a.learning_rate, rel=1e-9)
        assert b.batch_size_tokens == pytest.approx(a.batch_size_tokens, rel=1e-9)


def test_two_team_groups_move_the_answer_to_the_team_level_with_pooled_exponents(steplaw):
    """The acceptance test of families: two of a team's own groups beside the Step Law
    family. The team's answer moves to the team's level (within 10 % of 1.6 × in η and
    15 % of 0.6 × in B, on the Step Law grid whose B steps are 1.33–2 × apart), its exponents
    stay within 0.01 of the Step Law family's, and the Step Law family's own answer moves by
    less than 4 % anywhere (2 % at N = 7e10, D = 1.5e13, where the law forms' weights, weighed
    over both families' groups, move a little)."""
    team = team_groups(steplaw, [5, 11], learning_rate=ETA_SHIFT, batch_size_tokens=BATCH_SHIFT)
    both = pooled(labelled(steplaw, "step-law"), team)
    alone = fit_recommender(steplaw, n_bootstrap=0)
    ours = fit_recommender(both, family="team", n_bootstrap=0)
    theirs = fit_recommender(both, family="step-law", n_bootstrap=0)
    assert ours.n_groups == 2 and ours.quality["n_families_pooled"] == 2
    for n, d in [(2.68e8, 1.42e10), (1e9, 1e11), (7e10, 1.5e13)]:
        base, mine, other = alone.recommend(n, d), ours.recommend(n, d), theirs.recommend(n, d)
        assert mine.learning_rate / base.learning_rate == pytest.approx(ETA_SHIFT, rel=0.10)
        assert mine.batch_size_tokens / base.batch_size_tokens == pytest.approx(
            BATCH_SHIFT, rel=0.15
        )
        assert other.learning_rate == pytest.approx(base.learning_rate, rel=0.04)
        assert other.batch_size_tokens == pytest.approx(base.batch_size_tokens, rel=0.04)
    for quantity in ("learning_rate", "batch_size_tokens"):
        np.testing.assert_allclose(exponents(ours, quantity), exponents(alone, quantity), atol=0.01)
    # its fitted range is its own: Step Law's other N are an extrapolation for the team
    assert ours.fitted_range["n_params"] == [268304384.0, 429260800.0]


def test_a_family_with_many_groups_gets_its_own_exponent(steplaw):
    """The team's η rises as D^0.2 faster than Step Law's. With 3 groups the exponent stays
    near the pooled one; with all 17 it moves most of the way (shrinkage, not sharing)."""
    base = exponents(fit_recommender(steplaw, n_bootstrap=0), "learning_rate")[1]

    def team_eta_d(picks: list[int]) -> float:
        groups = steplaw.groups()
        sub = steplaw.subset(np.concatenate([groups[i].index for i in picks]))
        team = labelled(sub, "team")
        team = Runs(
            **{name: getattr(team, name) for name in COLUMNS if name != "learning_rate"},
            learning_rate=team.learning_rate * (team.n_tokens / 2e10) ** 0.2,
            family=team.family,
        )
        both = pooled(labelled(steplaw, "step-law"), team)
        return exponents(fit_recommender(both, family="team", n_bootstrap=0), "learning_rate")[1]

    few, many = team_eta_d([0, 6, 12]), team_eta_d(list(range(17)))
    assert abs(few - base) < 0.08
    assert many - base > 0.12  # of the true 0.2
    assert many > few


def test_families_need_a_name_and_a_known_family(steplaw):
    both = pooled(labelled(steplaw, "a"), labelled(steplaw, "b"))
    with pytest.raises(ValueError, match="name the one to fit"):
        fit_recommender(both, n_bootstrap=0)
    missing = fit_recommender(both, family="c", n_bootstrap=0)
    assert missing.status is FitStatus.INSUFFICIENT_DATA
    assert "family 'c'" in missing.reason


def test_intervals_of_a_small_family_use_every_groups_scatter(steplaw):
    team = team_groups(steplaw, [5, 11], learning_rate=ETA_SHIFT, batch_size_tokens=BATCH_SHIFT)
    both = pooled(labelled(steplaw, "step-law"), team)
    ours = fit_recommender(both, family="team", n_bootstrap=8)
    assert ours.quality["n_scatter_groups"] == 19
    answer = ours.recommend(4e8, 2e10)
    iv = answer.learning_rate_interval
    assert iv.low < answer.learning_rate < iv.high
    assert 1.1 < iv.high / iv.low < 4
