"""Distance to the decision boundary by FAB: the closed form of a linear classifier, the
conventions for misclassified and unfooled images, and the summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saliency_cache.errors import SatError
from tests.nets import Linear
from trainer.attacks.boundary import min_norm_distance, summarise

pytest.importorskip("torchattacks")
pytestmark = pytest.mark.usefixtures("one_thread")


def binary_linear(seed=0, b=8):
    """Logits (0, w·x + b): a binary linear classifier Ψ(x) = w·x + b, images in [0.4, 0.6]
    and distances small enough that the nearest boundary point stays inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    d = 3 * 4 * 4
    w = torch.randn(d, generator=g)
    x = 0.4 + 0.2 * torch.rand(b, 3, 4, 4, generator=g)
    bias = -float((x.flatten(1) @ w).median()) + 0.013  # both classes, no point on the boundary
    psi = x.flatten(1) @ w + bias
    net = Linear(torch.stack([torch.zeros(d), w]), torch.tensor([0.0, bias])).eval()
    return net, x, (psi > 0).long(), w, psi


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_distance_of_a_linear_classifier_is_the_closed_form(norm):
    net, x, y, w, psi = binary_linear()
    dist = min_norm_distance(net, x, y, norm=norm, steps=20, generator=torch.Generator())
    # |w·x + b| / ||w||_2 in L2; in L∞ the dual norm: |w·x + b| / ||w||_1.
    expect = psi.abs().double() / (w.norm() if norm == "l2" else w.abs().sum()).double()
    assert dist.dtype == torch.float64 and dist.shape == (8,)
    assert torch.allclose(dist, expect, rtol=0.01), (dist / expect)
    # Batched and one by one agree.
    one = torch.cat([min_norm_distance(net, x[i : i + 1], y[i : i + 1], norm=norm, steps=20,
                                       generator=torch.Generator()) for i in range(8)])
    assert torch.allclose(one, dist, rtol=1e-4)  # float32 batched vs single rounding


def test_misclassified_images_are_at_zero_and_unfooled_ones_at_infinity():
    net, x, y, w, psi = binary_linear(seed=1)
    wrong = y.clone()
    wrong[:3] = 1 - wrong[:3]
    dist = min_norm_distance(net, x, wrong, norm="l2", steps=5, generator=torch.Generator())
    assert (dist[:3] == 0).all() and (dist[3:] > 0).all() and torch.isfinite(dist).all()
    # A model whose logits ignore the input can never be fooled.
    const = Linear(torch.zeros(2, 48), torch.tensor([0.0, 1.0])).eval()
    dist = min_norm_distance(const, x, torch.ones(8, dtype=torch.long), norm="linf", steps=5,
                             generator=torch.Generator())
    assert torch.isinf(dist).all()


def test_summary_median_counts_not_found_as_infinitely_far():
    s = summarise(np.array([0.0, 0.1, 0.2, 0.3, math.inf]))
    assert s == {"median": 0.2, "median_correct": 0.25, "not_found": 0.2, "misclassified": 0.2}
    s = summarise(np.array([0.1, math.inf, math.inf]))
    assert s["median"] is None and s["median_correct"] is None and s["not_found"] == 2 / 3
    assert summarise(np.array([0.0, 0.0]))["median_correct"] is None
    with pytest.raises(SatError, match="no images"):
        summarise(np.array([]))


def test_bad_settings_are_refused():
    net, x, y, _, _ = binary_linear()
    with pytest.raises(SatError, match="'l1'"):
        min_norm_distance(net, x, y, norm="l1", steps=5, generator=torch.Generator())
    with pytest.raises(SatError, match="got 0"):
        min_norm_distance(net, x, y, norm="l2", steps=0, generator=torch.Generator())
