"""Tiny torch models shared by tests: a linear model whose input gradients are known in
closed form, and a small seeded ReLU convnet.

Kept apart from ``tests/helpers.py``, which the torch-free store tests import."""

import torch
from torch import nn


class Linear(nn.Module):
    """Φ(x) = W·flatten(x) + b: the true-logit gradient of sample i is W[y_i]."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def tiny_net(classes=3, *, channels=3, width=4, seed=0, bn=True, gain=1.0, pool=True):
    """Two 3x3 convs with ReLUs (the second with stride 2), optional BatchNorm, then a linear
    layer; weights drawn from ``torch.manual_seed(seed)``.

    With ``pool`` an adaptive 2x2 average pool takes any input size; without it the linear
    layer expects 8x8 inputs. ``gain`` scales the first layer, so that, without BatchNorm or
    in eval mode, a random net is easy to fool.
    """
    torch.manual_seed(seed)
    layers = [nn.Conv2d(channels, width, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(width))
    layers += [nn.ReLU(), nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.AdaptiveAvgPool2d(2))
    layers += [nn.Flatten(), nn.Linear(width * (4 if pool else 16), classes)]
    net = nn.Sequential(*layers)
    if gain != 1.0:
        with torch.no_grad():
            net[0].weight.mul_(gain)
            net[0].bias.mul_(gain)
    return net
