"""Relaxations: temperature schedules, softmax / Gumbel (soft, hard straight-through), smooth max."""

from __future__ import annotations

import math

import pytest
import torch

from dartspar.cost.schedule import smooth_max
from dartspar.search.relax import (
    TemperatureSchedule, binary_entropy, entropy, relax_binary, relax_categorical,
)


@pytest.mark.parametrize("kind", ["linear", "exponential"])
def test_temperature_schedule_endpoints_and_monotone(kind):
    sched = TemperatureSchedule(2.0, 0.05, 50, kind)
    values = [sched(t) for t in range(50)]
    assert values[0] == pytest.approx(2.0, rel=1e-12)
    assert values[-1] == pytest.approx(0.05, rel=1e-12)
    assert all(b < a for a, b in zip(values, values[1:]))
    assert sched(500) == pytest.approx(0.05, rel=1e-12)  # past the end: stays at the end value
    if kind == "exponential":
        # Constant ratio between consecutive steps.
        ratios = [b / a for a, b in zip(values, values[1:])]
        assert max(ratios) - min(ratios) < 1e-12
    else:
        assert values[25] == pytest.approx(2.0 + (0.05 - 2.0) * 25 / 49, rel=1e-12)


def test_temperature_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="kind"):
        TemperatureSchedule(1.0, 0.1, 10, "cosine")
    with pytest.raises(ValueError, match="start"):
        TemperatureSchedule(0.0, 0.1, 10)


def test_softmax_temperature_and_mask():
    z = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    p = relax_categorical(z, 0.5)
    assert torch.allclose(p, torch.softmax(z / 0.5, -1))
    masked = relax_categorical(z, 1.0, mask=torch.tensor([True, False, True]))
    assert float(masked[1]) == 0.0 and float(masked.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no allowed entry"):
        relax_categorical(z, 1.0, mask=torch.tensor([False, False, False]))
    # Low temperature concentrates on the argmax.
    assert float(relax_categorical(z, 1e-3)[1]) == pytest.approx(1.0)


def test_gumbel_soft_is_a_distribution_and_follows_the_logits():
    gen = torch.Generator().manual_seed(0)
    z = torch.log(torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
    samples = torch.stack([relax_categorical(z, 0.1, "gumbel", gen) for _ in range(4000)])
    assert torch.allclose(samples.sum(-1), torch.ones(4000, dtype=torch.float64))
    # At low temperature a Gumbel-softmax sample is nearly one-hot with argmax ~ Categorical(p).
    freq = torch.bincount(samples.argmax(-1), minlength=3).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.03)


def test_gumbel_hard_is_one_hot_forward_with_straight_through_gradient():
    gen = torch.Generator().manual_seed(1)
    z = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64, requires_grad=True)
    y = relax_categorical(z, 0.7, "gumbel_hard", gen)
    assert sorted(y.detach().tolist()) == [0.0, 0.0, 0.0, 1.0]
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    (y * weights).sum().backward()
    # The gradient is the soft sample's: nonzero on every logit.
    assert z.grad is not None and bool((z.grad.abs() > 0).all())
    # Binary version: hard 0/1 forward, nonzero gradient.
    b = torch.tensor([0.2, -1.0, 3.0], dtype=torch.float64, requires_grad=True)
    h = relax_binary(b, 1.0, "gumbel_hard", gen)
    assert set(h.detach().tolist()) <= {0.0, 1.0}
    h.sum().backward()
    assert bool((b.grad.abs() > 0).all())


def test_relaxations_need_a_generator_for_noise():
    with pytest.raises(ValueError, match="Generator"):
        relax_categorical(torch.zeros(3), 1.0, "gumbel")
    with pytest.raises(ValueError, match="relaxation"):
        relax_categorical(torch.zeros(3), 1.0, "sparsemax")


def test_smooth_max_upper_bounds_max_and_converges():
    x = torch.tensor([1.0, 3.0, 2.5, -1.0], dtype=torch.float64)
    exact = float(x.max())
    previous = math.inf
    for T in (1.0, 0.3, 0.1, 0.01, 1e-4):
        s = float(smooth_max(x, T))
        assert s >= exact
        assert s <= exact + T * math.log(len(x)) + 1e-12  # log-sum-exp bound
        assert s <= previous
        previous = s
    assert float(smooth_max(x, 1e-4)) == pytest.approx(exact, abs=1e-3)
    assert float(smooth_max(x, None)) == exact


def test_entropies():
    assert float(entropy(torch.tensor([0.25] * 4, dtype=torch.float64))) == pytest.approx(math.log(4))
    assert float(entropy(torch.tensor([1.0, 0.0], dtype=torch.float64))) == 0.0
    assert float(binary_entropy(torch.tensor(0.5, dtype=torch.float64))) == pytest.approx(math.log(2))
