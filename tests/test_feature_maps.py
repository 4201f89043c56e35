"""Feature maps: fixed draws, unbiasedness, and FAVOR+'s closed-form relative variance."""

from __future__ import annotations

import math

import pytest
import torch

from selective_attention.tree_kernel.feature_maps import favor_relative_variance, feature_map, random_features


def test_draw_is_fixed_per_seed():
    a = random_features("favor+", 16, 32, seed=3)
    random_features.cache_clear()
    b = random_features("favor+", 16, 32, seed=3)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, random_features("favor+", 16, 32, seed=4).projection)


@pytest.mark.parametrize("kind", ["favor+", "rff"])
def test_unbiased_for_softmax_kernel(kind):
    d = 8
    torch.manual_seed(0)
    q, k = torch.randn(d, dtype=torch.float64) * 0.6, torch.randn(d, dtype=torch.float64) * 0.6
    exact = math.exp(float(q @ k) / math.sqrt(d))
    estimates = []
    for seed in range(3000):
        f = random_features(kind, d, 16, seed=seed, orthogonal=False)
        estimates.append(float(feature_map(q / d**0.25, f) @ feature_map(k / d**0.25, f)))
    mean = sum(estimates) / len(estimates)
    assert abs(mean - exact) / exact < 0.03


def test_favor_closed_form_variance():
    d, rows = 8, 16
    torch.manual_seed(1)
    q, k = torch.randn(d, dtype=torch.float64) * 0.5, torch.randn(d, dtype=torch.float64) * 0.5
    values = torch.tensor([float(feature_map(q / d**0.25, f) @ feature_map(k / d**0.25, f)) for f in
                           (random_features("favor+", d, rows, seed=s, orthogonal=False) for s in range(4000))])
    measured = float(values.var() / values.mean() ** 2)
    predicted = float(favor_relative_variance(q, k, rows))
    assert abs(measured - predicted) / predicted < 0.15


def test_bad_feature_map_input():
    with pytest.raises(ValueError, match="unknown feature map"):
        random_features("nope", 8)
    with pytest.raises(ValueError, match="d=8"):
        feature_map(torch.randn(3, 16), random_features("favor+", 8))
