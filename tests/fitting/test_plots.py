"""The steps-to-target figure: drawn from a cbs fit's groups, as PNG or SVG."""

from __future__ import annotations

import math

import pytest

from fitting.critical_batch import fit_critical_batch_size
from fitting.plots import plot_steps_to_target


def group(n_params: float, n_tokens: float, k: float) -> dict:
    """A group as the cbs fit stores it: S(B) = a + a·k/B with one censored batch size."""
    batch = [16.0, 32.0, 64.0, 128.0, 256.0]
    a = n_tokens / (16 + k)
    steps = [a + a * k / b for b in batch[:-1]] + [math.inf]
    fit = fit_critical_batch_size(batch, steps, n_bootstrap=0)
    return {
        "n_params": n_params,
        "n_tokens": n_tokens,
        "target_loss": 1.01,
        "batch_sizes": batch,
        "steps_to_target": steps,
        "fit": fit.as_dict(),
    }


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_the_figure_is_written_in_the_format_its_name_asks(tmp_path, suffix, magic):
    groups = [group(n, d, 30 * (d / 2048) ** 0.4) for n in (256, 1024) for d in (2048, 8192, 32768)]
    law = {"coefficient": 1.5, "n_params_exponent": 0.0, "n_tokens_exponent": 0.4}
    out = plot_steps_to_target(groups, tmp_path / f"cbs{suffix}", law=law, title="test")
    assert out.read_bytes().startswith(magic)
    assert out.stat().st_size > 5_000  # three panels of points and curves, not an empty canvas


def test_no_groups_is_an_error():
    with pytest.raises(ValueError, match="at least one group"):
        plot_steps_to_target([], "unused.png")
