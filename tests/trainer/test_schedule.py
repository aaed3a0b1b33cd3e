"""Learning-rate schedules, the evaluation grid and the exponential weight average."""

import pytest
import torch

from trainer.config import EvalConfig, ScheduleConfig
from trainer.schedule import EWA, evaluation_steps, lr_multiplier


def test_schedules():
    total = 100
    ewa = ScheduleConfig(name="constant_ewa", warmup_fraction=0.1)
    assert lr_multiplier(0, total, ewa) == pytest.approx(0.1)
    assert lr_multiplier(9, total, ewa) == 1.0
    assert lr_multiplier(99, total, ewa) == 1.0
    wsd = ScheduleConfig(name="wsd", warmup_fraction=0.0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(79, total, wsd) == 1.0
    assert lr_multiplier(89, total, wsd) == pytest.approx(0.5)
    assert lr_multiplier(99, total, wsd) == pytest.approx(0.0)
    cos = ScheduleConfig(name="cosine", warmup_fraction=0.0, min_lr_ratio=0.1)
    assert lr_multiplier(49, total, cos) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)
    assert lr_multiplier(99, total, cos) == pytest.approx(0.1)


def test_evaluation_grid_is_hybrid():
    steps = evaluation_steps(200, EvalConfig(every=64))
    assert {0, 1, 2, 4, 8, 16, 32, 64, 128} <= steps  # powers of two
    assert {64, 128, 192} <= steps  # every K
    assert {140, 150, 160, 170, 180, 190, 200} <= steps  # dense over the last 30 %
    assert max(steps) == 200 and 100 not in steps


def test_ewa_is_debiased_swapped_in_for_evaluation_and_checkpointed():
    w = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    ewa = EWA([w, b], decay=0.5)
    assert torch.equal(ewa.weights()[0], w.detach())  # before any update: the weights
    with torch.no_grad():
        w.fill_(2.0)
        b.fill_(-2.0)
    ewa.update()  # ξ1 = 0.5·0 + 0.5·2 = 1, debiased 1 / (1 − 0.5) = 2
    assert torch.allclose(ewa.weights()[0], torch.full((3,), 2.0))
    with torch.no_grad():
        w.fill_(4.0)
        b.fill_(-4.0)
    ewa.update()  # ξ2 = 0.5·1 + 0.5·4 = 2.5, debiased 2.5 / 0.75 = (0.5·2 + 1·4) / 1.5
    assert torch.allclose(ewa.weights()[0], torch.full((3,), 10 / 3))
    assert torch.allclose(ewa.weights()[1], torch.full((2,), -10 / 3))

    with ewa.swapped_in():
        assert torch.allclose(w, torch.full((3,), 10 / 3))
    assert torch.equal(w, torch.full((3,), 4.0)) and torch.equal(b, torch.full((2,), -4.0))
    with pytest.raises(RuntimeError, match="evaluation failed"), ewa.swapped_in():
        raise RuntimeError("evaluation failed")
    assert torch.equal(w, torch.full((3,), 4.0))  # restored on the way out of an error too

    restored = EWA([w, b], decay=0.5)
    restored.load_state_dict(ewa.state_dict())
    assert restored.count == 2
    assert all(torch.equal(x, y) for x, y in zip(restored.weights(), ewa.weights(), strict=True))
