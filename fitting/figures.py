"""The dashboard's figures for papers and reports (``hyperlaw plot``), drawn with matplotlib
from the same JSON the page draws (``/v1/dashboard/*``, ``/v1/trials/{id}/points``):

- :func:`plot_trial`: train, eval and EWA-eval loss against step and tokens, the learning
  rate, the gradient norm and b_simple;
- :func:`plot_group`: one (N, D) group's final loss over (η, B) as a heatmap with the best
  run and the recommendation, loss against η per B with the bell fit's η*, η* against B with
  the bell curve, and steps to target against B with S = a + b/B^α and the CBS;
- :func:`plot_laws`: η*, B* and the CBS against D per model size with their 90 % intervals,
  the groups' own optima and the published Step Law formula (Li et al. 2025, dashed).

The CBS figure of a ``cbs`` fit is :func:`fitting.plots.plot_steps_to_target`. Each function
writes PNG or SVG by the suffix of ``out`` and returns its path; matplotlib (the ``plot``
extra) is imported inside, with its non-interactive backend. Missing values (null, NaN) are
left out of a line, as on the page.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Doc = Mapping[str, Any]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _arr(values: Iterable[Any]) -> np.ndarray:
    """Floats, with null and non-numbers as NaN."""
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return np.asarray(out, dtype=float)


def _save(fig, out: str | Path) -> Path:
    path = Path(out)
    if path.suffix.lower() not in {".png", ".svg"}:
        raise ValueError(f"out must end in .png or .svg, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _legend(ax, **kwargs: Any) -> None:
    """A legend where something is labelled (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _loglog(ax, x, y, *args, **kwargs) -> None:
    x, y = _arr(x), _arr(y)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if keep.any():
        ax.plot(x[keep], y[keep], *args, **kwargs)


def plot_trial(trial: Doc, points: Sequence[Doc], out: str | Path) -> Path:
    """One trial's curves (module docstring); ``points`` as ``/v1/trials/{id}/points`` gives
    them."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    step = _arr(p["step"] for p in points) + 1
    tokens = _arr(p.get("tokens") for p in points)
    for ax, x, label in ((axes[0][0], step, "step"), (axes[0][1], tokens, "tokens")):
        for key, name in (("train_loss", "train"), ("eval_loss", "eval"), ("ewa_eval_loss", "EWA")):
            _loglog(ax, x, [p.get(key) for p in points], label=name)
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="loss")
        _legend(ax, fontsize=8)
    _loglog(axes[1][0], step, [p.get("lr") for p in points])
    axes[1][0].set(xscale="log", xlabel="step", ylabel="learning rate")
    _loglog(axes[1][1], step, [p.get("grad_norm") for p in points], label="grad norm")
    _loglog(axes[1][1], step, [p.get("b_simple") for p in points], label="b_simple")
    axes[1][1].set(xscale="log", yscale="log", xlabel="step")
    _legend(axes[1][1], fontsize=8)
    fig.suptitle(
        f"trial {trial['id']}: N={trial['n_params']:.3g}, D={trial['n_tokens']:.3g}, "
        f"η={trial['learning_rate']:.3g}, B={trial['batch_size_tokens']:.3g} tokens "
        f"({trial['status']})"
    )
    return _save(fig, out)


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges at the geometric midpoints of sorted distinct positive values."""
    v = np.unique(values)
    if v.size == 1:
        return np.array([v[0] / 1.5, v[0] * 1.5])
    mid = np.sqrt(v[:-1] * v[1:])
    return np.concatenate([[v[0] ** 2 / mid[0]], mid, [v[-1] ** 2 / mid[-1]]])


def plot_group(group: Doc, out: str | Path) -> Path:
    """One (N, D) group as ``/v1/dashboard/group`` gives it (module docstring)."""
    plt = _pyplot()
    runs = [r for r in group["runs"] if r["status"] == "completed"]
    if not runs:
        raise ValueError("the group has no completed run to draw")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    eta = _arr(r["learning_rate"] for r in runs)
    batch = _arr(r["batch_size_tokens"] for r in runs)
    loss = _arr(r["final_loss"] for r in runs)
    best = np.nanmin(loss)
    xs, ys = np.unique(eta), np.unique(batch)
    grid = np.full((ys.size, xs.size), np.nan)
    grid[np.searchsorted(ys, batch), np.searchsorted(xs, eta)] = 100 * (loss / best - 1)
    ax = axes[0][0]
    mesh = ax.pcolormesh(
        _edges(xs), _edges(ys), np.ma.masked_invalid(grid), cmap="viridis_r", vmin=0, vmax=2
    )
    fig.colorbar(mesh, ax=ax, label="% above the best loss")
    best_run, rec = group.get("best"), group.get("recommendation")
    if best_run:
        ax.plot(
            best_run["learning_rate"],
            best_run["batch_size_tokens"],
            "o",
            mfc="none",
            mec="black",
            ms=9,
            mew=2,
            label="best run",
        )
    if rec:
        ax.plot(
            rec["learning_rate"],
            rec["batch_size_tokens"],
            "*",
            color="red",
            ms=14,
            mec="black",
            label="recommendation",
        )
    ax.set(xscale="log", yscale="log", xlabel="learning rate η", ylabel="batch size B (tokens)")
    _legend(ax, fontsize=8)
    ax = axes[0][1]
    bell = group.get("bell") or {}
    colours = plt.cm.viridis(np.linspace(0, 0.9, ys.size))
    for colour, b in zip(colours, ys, strict=True):
        mine = batch == b
        order = np.argsort(eta[mine])
        ax.plot(eta[mine][order], loss[mine][order], "-o", ms=3, color=colour, label=f"B={b:.3g}")
    for b, eta_star in zip(
        bell.get("batch_sizes", []), bell.get("optimal_learning_rates", []), strict=False
    ):
        mine = (batch == float(b)) & np.isfinite(loss)
        if mine.any():
            ax.plot(float(eta_star), np.nanmin(loss[mine]), "kD", ms=5)
    ax.set(
        xscale="log",
        xlabel="learning rate η",
        ylabel="final loss",
        ylim=(best * 0.995, best * 1.06),
        title="loss against η per B (◆: the fit's η*)",
    )
    _legend(ax, fontsize=6, ncol=2)
    ax = axes[1][0]
    if bell:
        sizes = _arr(bell["batch_sizes"])
        ax.plot(sizes, _arr(bell["optimal_learning_rates"]), "o", label="η* per B")
        curve = bell.get("bell") or {}
        peak, b_crit = _arr([curve.get("eta_peak"), curve.get("b_crit")])
        if math.isfinite(peak) and math.isfinite(b_crit):
            line = np.geomspace(sizes.min() / 2, sizes.max() * 2, 100)
            ax.plot(
                line,
                2 * peak / (np.sqrt(b_crit / line) + np.sqrt(line / b_crit)),
                "r-",
                label="bell curve",
            )
            ax.axvline(b_crit, color="red", ls=":")
        _legend(ax, fontsize=8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size B (tokens)",
        ylabel="η*",
        title="η* against B" + ("" if bell else ": no bell fit"),
    )
    ax = axes[1][1]
    cbs = group.get("cbs") or {}
    if cbs:
        sizes, steps = _arr(cbs["batch_sizes"]), _arr(cbs["steps_to_target"])
        reached = np.isfinite(steps)
        ax.plot(sizes[reached], steps[reached], "o", label="reached the target")
        bound = _arr(cbs.get("censored_at_steps") or [math.nan] * sizes.size)
        ax.plot(sizes[~reached], bound[~reached], "^", mfc="none", label="censored")
        fit = cbs.get("fit") or {}
        a, b, alpha, cbs_b = _arr([fit.get(k) for k in ("a", "b", "alpha", "critical_batch_size")])
        if np.isfinite([a, b, alpha]).all():
            line = np.geomspace(sizes.min(), sizes.max(), 100)
            ax.plot(line, a + b / line**alpha, "r-", label="S = a + b/B^α")
            if math.isfinite(cbs_b):
                ax.axvline(cbs_b, color="green", ls=":", label=f"CBS {cbs_b:.3g}")
        _legend(ax, fontsize=8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size B (tokens)",
        ylabel="steps to target",
        title="steps to target" + ("" if cbs else ": no data for this group"),
    )
    fig.suptitle(f"{group['family']}: N={group['n_params']:.3g}, D={group['n_tokens']:.3g}")
    return _save(fig, out)


_LAWS = (
    ("learning_rate", "η*", "best_learning_rate", "learning_rate"),
    ("batch_size_tokens", "B* (tokens)", "best_batch_size_tokens", "batch_size_tokens"),
    ("critical_batch_size_tokens", "CBS (tokens)", "measured_cbs", None),
)


def plot_laws(laws: Doc, out: str | Path) -> Path:
    """The laws against D as ``/v1/dashboard/laws`` gives them (module docstring)."""
    plt = _pyplot()
    lines = laws["lines"]
    if not lines:
        raise ValueError(f"family {laws['family']!r} has no groups to draw laws for")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colours = plt.cm.tab10(np.arange(len(lines)) % 10)
    sizes = np.log([line["n_params"] for line in lines])
    for ax, (key, label, own, published) in zip(axes, _LAWS, strict=True):
        for i, (colour, line) in enumerate(zip(colours, lines, strict=True)):
            d = _arr(line["n_tokens"])
            low, high = _arr(line[key + "_low"]), _arr(line[key + "_high"])
            ok = np.isfinite(low) & np.isfinite(high)
            ax.fill_between(d[ok], low[ok], high[ok], color=colour, alpha=0.15, lw=0)
            _loglog(ax, d, line[key], "-", color=colour, label=f"N={line['n_params']:.3g}")
            if published:
                _loglog(
                    ax,
                    d,
                    laws["step_law"][i][published],
                    "--",
                    color=colour,
                    lw=1,
                    label="Step Law formula" if i == 0 else None,
                )
            mine = [
                g for g in laws["groups"] if np.argmin(np.abs(sizes - math.log(g["n_params"]))) == i
            ]
            _loglog(ax, [g["n_tokens"] for g in mine], [g[own] for g in mine], "o", color=colour)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="D (tokens)",
            ylabel=label,
            title=f"{label} against D",
        )
        _legend(ax, fontsize=7)
    fig.suptitle(f"{laws['family']}: the served fit (90 % intervals), the groups' own optima")
    return _save(fig, out)
