"""Which families a family's surface fit borrows from, and that fit.

:func:`fitting.surface.fit_surface` fits every family's runs in one least squares: each
family its own level and valley, the exponents shrunk towards shared ones. The families
share only the exponents, but the solve is one: a family whose runs do not pin down a valley
(few runs near each group's best, a valley flat in B, optima off the grid) has parameters
that walk off without end, and the whole fit walks with them. Measured (one core) with the
Step Law family beside a small synthetic regression family (N = 512 and 1024, losses
≈ 0.09, η from 0.05 to 2, B from 8 to 512): where the family's optimum lies past its grid,
the Step Law joint fit failed after 58 s with overflow warnings, and so did its recommender
(4.5 s without that family); where the family's valley is flat near its best runs, the
joint fit took 2.5 s (0.06 s alone) and the recommender over 300 s.

So a family's fit borrows only from families whose own runs are fitted sanely, and never
depends on the others to converge:

1. Screen. Every other family's groups are fitted on their own
   (:func:`fitting.group_optima.fit_group_optima`: a free optimum per group under the
   family's own valley; no laws in N and D, so a family of one group is screened too). A
   family whose fit does not converge within its bound (:func:`fitting.valley_fit.solve`)
   or whose valley has no minimum (4·A·B ≤ C²) lends nothing: its runs are left out. A
   family with no usable group is no part of the joint fit anyway and stays. The family
   being fitted is not screened: its own fit says whether it can be fitted.
2. Fall back. If the joint fit over the family and the families that passed still fails
   (the bounded solve gives up, or the family's valley has no minimum), the family is
   fitted on its own runs; when that fit is ok it is the answer and every other family is
   left out, with the joint fit's reason.

Families left out are named, with the reason, in :attr:`Pool.left_out` (the recommender's
``quality["families_left_out"]``). When every family passes and the joint fit is ok, the
result is the joint fit, exactly as before; the screen's optima are the ones the
recommender needs for its intervals and law forms anyway, so it costs no extra fit. With
the screen, both recommenders above take 1.3 to 1.5 s (1.4 s without the family, the same
machine) and answer exactly as without it.

A family that passes the screen is pooled as :func:`fitting.surface.fit_surface` says, its
exponents shrunk together with the others': a well-sampled regression family with exponents
of its own (ln η* rising as N^−0.3 where Step Law's falls faster) moves the Step Law η* at
N = 1.07e9, D = 5.69e10 by +29 % and B* by +15 % (under 6 % inside the sweep), as it did
before this screen. That is the partial pooling's prior (``exponent_sd``), not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fitting import surface as surf
from fitting.data import Runs
from fitting.group_optima import GroupOptima, fit_group_optima
from fitting.results import FitStatus


@dataclass(frozen=True)
class Pool:
    """The runs a family's fits use (its own and its lenders'), its surface fit on them,
    every pooled family's groups' own optima (None when not asked for and not needed by
    the screen), and each family left out with why."""

    runs: Runs
    fit: surf.SurfaceFit
    optima: GroupOptima | None
    left_out: dict[str, str]


def pooled_fit(
    runs: Runs,
    family: str | None,
    *,
    window: float,
    f_scale: float,
    cubic: bool,
    need_optima: bool = True,
) -> Pool:
    """Screen the other families, fit ``family``'s surface jointly with those that pass,
    and fall back to its own runs when that fit fails (module docstring). ``window``,
    ``f_scale`` and ``cubic`` go to every fit; ``need_optima``: fit the groups' own optima
    even without other families to screen."""
    valley: dict[str, Any] = {"window": window, "f_scale": f_scale, "cubic": cubic}
    left_out: dict[str, str] = {}
    optima = None
    if runs.family is not None and len(runs.families()) > 1:
        optima = fit_group_optima(runs, **valley)
        left_out = {
            name: f"its groups' own fit failed: {why}"
            for name, why in optima.failed.items()
            if name != family
        }
        if left_out:
            runs = runs.subset(~np.isin(runs.family, list(left_out)))
    fit = surf.fit_surface(runs, **valley, family=family)
    if fit.status is FitStatus.FAILED and runs.family is not None and len(runs.families()) > 1:
        own = runs.subset(runs.family == family)
        alone = surf.fit_surface(own, **valley, family=family)
        if alone.status is FitStatus.OK:
            why = f"the joint fit with it failed: {fit.reason}"
            left_out.update({name: why for name in runs.families() if name != family})
            runs, fit = own, alone
            optima = None if optima is None else optima.of_family(str(family))
    if optima is None and need_optima:
        optima = fit_group_optima(runs, **valley)
    return Pool(runs=runs, fit=fit, optima=optima, left_out=left_out)
