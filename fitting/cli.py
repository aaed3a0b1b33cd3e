"""``hyperlaw cbs``: critical batch size per model size from a steps-to-target CSV.

The estimators live in :mod:`fitting.critical_batch` and the CSV reader in :mod:`fitting.data`; this
module only parses options and prints. Registration stays light: numpy and scipy are
imported inside the handler.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fitting.critical_batch import CriticalBatchFit
    from fitting.powerlaw import PowerLawFit


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cbs`` subcommand."""
    p = subparsers.add_parser(
        "cbs",
        help="critical batch size per n_params group from steps-to-target (Zhang et al. 2024)",
        description=(
            "Read a CSV with columns n_params,batch_size,steps (steps to reach the group's "
            "target loss; empty, 'inf' or 'nan' when never reached; several rows of one "
            "batch size, e.g. one per learning rate, count as their fewest steps), fit "
            "log S = log(a + b/B) per n_params group and print a, b and the critical batch "
            "size B* = (1+overhead)*B_opt + overhead*b/a, then the power law of B* in "
            "n_params. batch_size may be in any unit; B* is in the same unit."
        ),
    )
    p.add_argument("file", metavar="FILE.csv", help="CSV with n_params,batch_size,steps")
    p.add_argument(
        "--overhead",
        type=float,
        default=0.2,
        help="tolerated step overhead versus linear scaling (default 0.2)",
    )
    p.add_argument(
        "--b-opt",
        type=float,
        default=None,
        dest="b_opt",
        help="reference batch size in the linear-scaling regime "
        "(default: each group's smallest batch size)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cbs_command)


def _cbs_command(args: argparse.Namespace) -> int:
    return cbs_command(args.file, overhead=args.overhead, b_opt=args.b_opt, as_json=args.json)


def cbs_command(
    path: str,
    *,
    overhead: float,
    b_opt: float | None = None,
    as_json: bool = False,
    out: IO[str] | None = None,
) -> int:
    """The ``hyperlaw cbs`` handler: per-n_params fits of log S = log(a + b/B), then
    B* = c·N^β across groups. Returns the exit code (2 for a bad file or option)."""
    import numpy as np

    from fitting.cbs import best_per_batch
    from fitting.critical_batch import fit_cbs_scaling, fit_critical_batch_size
    from fitting.data import read_steps_csv

    out = out or sys.stdout
    try:
        if not math.isfinite(overhead) or overhead <= 0:
            raise ValueError(f"--overhead must be > 0, got {overhead}")
        if b_opt is not None and not (math.isfinite(b_opt) and b_opt > 0):
            raise ValueError(f"--b-opt must be > 0, got {b_opt}")
        n_params, batch, steps = read_steps_csv(path)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"hyperlaw cbs: {exc}\n")
        return 2
    fits: dict[float, CriticalBatchFit] = {}
    for n in np.unique(n_params):
        sel = n_params == n  # a batch size's steps: its best run's (η tuned per B)
        sizes, best, _ = best_per_batch(batch[sel], steps[sel])
        fits[float(n)] = fit_critical_batch_size(sizes, best, b_opt=b_opt, overhead=overhead)
    ok = {n: fit for n, fit in fits.items() if fit.ok}
    law = fit_cbs_scaling(
        np.array([fit.critical_batch_size for fit in ok.values()]) if ok else [],
        n_params=np.array(list(ok)),
        n_bootstrap=200,
    )
    if as_json:
        out.write(json.dumps(_as_json(fits, law, overhead), indent=2) + "\n")
    else:
        _write_table(fits, law, overhead, out)
    return 0


def _as_json(
    fits: dict[float, CriticalBatchFit], law: PowerLawFit, overhead: float
) -> dict[str, Any]:
    """The ``--json`` document: one entry per n_params group, then the power law."""
    groups = [
        {
            "n_params": n,
            "a": _num(fit.a),
            "b": _num(fit.b),
            "critical_batch_size": _num(fit.critical_batch_size),
            "critical_batch_size_interval": _num_dict(fit.critical_batch_size_interval.as_dict()),
            "b_opt": _num(fit.b_opt),
            "r2_log": _num(fit.r2_log),
            "n_points": fit.n_points,
            "n_censored": fit.n_censored,
            "status": fit.status.value,
            "reason": fit.reason,
        }
        for n, fit in fits.items()
    ]
    power_law = {
        "coefficient": _num(law.coefficient),
        "exponent": _num(law.exponent("n_params")),
        "exponent_interval": _num_dict(law.exponent_interval("n_params").as_dict()),
        "r2_log": _num(law.r2_log),
        "n_points": law.n_points,
        "status": law.status.value,
        "reason": law.reason,
    }
    return {"groups": groups, "power_law": power_law, "overhead": overhead}


def _write_table(
    fits: dict[float, CriticalBatchFit], law: PowerLawFit, overhead: float, out: IO[str]
) -> None:
    """The default output: a table of the groups' fits, then the power law in n_params."""
    out.write(f"log S = log(a + b/B), B* = (1+{overhead:g})·B_opt + {overhead:g}·b/a\n")
    out.write(
        f"{'n_params':>12} {'a':>12} {'b':>14} {'B_opt':>10} {'critical_batch_size':>20}"
        f" {'90% interval':>22} {'runs':>5} {'censored':>8}\n"
    )
    for n, fit in fits.items():
        if fit.ok:
            iv = fit.critical_batch_size_interval
            out.write(
                f"{n:>12.4g} {fit.a:>12.6g} {fit.b:>14.8g} {fit.b_opt:>10.4g} "
                f"{fit.critical_batch_size:>20.6g} "
                f"{f'[{iv.low:.4g}, {iv.high:.4g}]':>22} "
                f"{fit.n_points:>5} {fit.n_censored:>8}\n"
            )
        else:
            out.write(f"{n:>12.4g}  {fit.status.value}: {fit.reason}\n")
    if law.ok:
        iv = law.exponent_interval("n_params")
        out.write(
            f"critical_batch_size = {law.coefficient:.6g} · n_params^{law.exponent('n_params'):.4f}"
            f"  (exponent 90% interval [{iv.low:.3f}, {iv.high:.3f}], "
            f"R² log {law.r2_log:.3f}, {law.n_points} groups)\n"
        )
    else:
        out.write(f"power law: {law.status.value}: {law.reason}\n")


def _num(value: float) -> float | None:
    """A JSON-safe number: non-finite values become null."""
    return float(value) if math.isfinite(value) else None


def _num_dict(values: dict[str, float]) -> dict[str, float | None]:
    return {key: _num(value) for key, value in values.items()}
