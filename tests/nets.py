"""Tiny torch models whose input gradients are known in closed form (shared by tests).

Kept apart from ``tests/helpers.py``, which the torch-free store tests import."""

from torch import nn


class Linear(nn.Module):
    """Φ(x) = W·flatten(x) + b: the true-logit gradient of sample i is W[y_i]."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b
