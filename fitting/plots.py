"""Figures of the steps-to-target critical batch size, for reports and the README.

:func:`plot_steps_to_target` draws, from a ``cbs`` fit as the service stores it
(``GET /v1/fits/{id}``: ``params.groups``, each with its batch sizes, steps to target and
the fit of S = a + b/B^α), one panel per model size N with steps to target against the batch
size for each budget D (censored batch sizes as open triangles at the steps they trained
without reaching the target, a lower bound), each group's fitted curve
and its CBS; and a last panel with the CBS against D and the fitted law. matplotlib is
imported inside (the ``plot`` extra), with its non-interactive backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def plot_steps_to_target(
    groups: Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    law: Mapping[str, Any] | None = None,
    title: str = "",
) -> Path:
    """Write the figure of the module docstring to ``out`` (PNG or SVG by its suffix).
    ``law``: the CBS law to draw in the last panel, ``{"coefficient", "n_params_exponent",
    "n_tokens_exponent"}`` (B* = c·N^β·D^γ); without it only the groups' CBS are drawn.
    Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not groups:
        raise ValueError("groups must hold at least one group")
    sizes_n = sorted({float(g["n_params"]) for g in groups})
    budgets = sorted({float(g["n_tokens"]) for g in groups if _finite(g.get("n_tokens"))})
    colour = {d: plt.cm.viridis(i / max(len(budgets) - 1, 1)) for i, d in enumerate(budgets)}
    fig, axes = plt.subplots(
        1, len(sizes_n) + 1, figsize=(4.2 * (len(sizes_n) + 1), 3.8), squeeze=False
    )
    for ax, n_params in zip(axes[0], sizes_n, strict=False):
        for g in (g for g in groups if float(g["n_params"]) == n_params):
            d = _finite(g.get("n_tokens"))
            c = colour.get(d, "grey") if d is not None else "grey"
            batch = np.asarray(g["batch_sizes"], dtype=float)
            steps = np.asarray(g["steps_to_target"], dtype=float)
            reached = np.isfinite(steps)
            label = f"D={d:.3g}" if d is not None else f"target {g['target_loss']:.4g}"
            ax.plot(batch[reached], steps[reached], "o", color=c, label=label)
            if (~reached).any() and reached.any():  # censored: at the steps they trained
                bound = np.asarray(g.get("censored_at_steps") or [np.nan] * batch.size, float)
                top = np.where(np.isfinite(bound), bound, steps[reached].max() * 1.5)
                ax.plot(batch[~reached], top[~reached], "^", color=c, mfc="none")
            fit = g.get("fit") or {}
            a, b, alpha = (_finite(fit.get(k)) for k in ("a", "b", "alpha"))
            if a is not None and b is not None and alpha is not None and batch.size:
                grid = np.geomspace(batch.min(), batch.max(), 100)
                ax.plot(grid, a + b / grid**alpha, "-", color=c, lw=1)
                cbs = _finite(fit.get("critical_batch_size"))
                if cbs is not None and cbs < 16 * batch.max():  # not an unbounded plateau
                    ax.axvline(cbs, color=c, ls=":", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="batch size B (tokens)", title=f"N={n_params:g}")
        ax.set_ylabel("steps to target S")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for n_params, marker in zip(sizes_n, "osD^v<>", strict=False):
        pts = [
            (float(g["n_tokens"]), float(g["fit"]["critical_batch_size"]))
            for g in groups
            if float(g["n_params"]) == n_params
            and _finite(g.get("n_tokens"))
            and _finite((g.get("fit") or {}).get("critical_batch_size"))
        ]
        if pts:
            d, cbs = np.array(pts).T
            ax.plot(d, cbs, marker, label=f"N={n_params:g}")
            if law is not None and d.size:
                grid = np.geomspace(d.min(), d.max(), 50)
                value = (
                    float(law["coefficient"])
                    * n_params ** float(law["n_params_exponent"])
                    * grid ** float(law["n_tokens_exponent"])
                )
                ax.plot(grid, value, "-", lw=1, color=ax.lines[-1].get_color())
    ax.set(xscale="log", yscale="log", xlabel="budget D (tokens)", ylabel="CBS (tokens)")
    if law is not None:
        ax.set_title(f"CBS ∝ D^{float(law['n_tokens_exponent']):.3f}")
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
