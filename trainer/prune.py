"""Global magnitude pruning for the paper's sparse teachers (95 % of the weights zero).

The teacher stage prunes gradually: for each cumulative amount of :func:`prune_schedule` it
calls :func:`prune_global`, fine-tunes (the pruning forward pre-hook multiplies the weight by
its mask on every forward pass, so pruned weights stay zero while the rest train), then
:func:`make_permanent` so the exported weights are plain tensors holding real zeros.

Prunable weights are the ``weight`` of every convolution and linear layer; biases and
batch-norm parameters stay dense (they are a negligible fraction of the parameters).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune

from saliency_cache.errors import SatError

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every convolution and linear layer of ``model``, in module order."""
    return [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE)]


def _masked_count(params: list[tuple[nn.Module, str]]) -> int:
    """Positions already removed by an installed pruning mask."""
    n = 0
    for m, name in params:
        mask = getattr(m, f"{name}_mask", None)
        if mask is not None:
            n += int((mask == 0).sum().item())
    return n


def prune_global(model: nn.Module, amount: float = 0.95) -> None:
    """Zero the ``amount`` fraction of smallest-magnitude prunable weights, ranked globally.

    ``amount`` is cumulative, a fraction in [0, 1) of *all* prunable weights: calling it with
    0.6 and then 0.9 leaves 90 % pruned, whether the earlier pruning is still a mask or was
    made permanent (its zeros are the smallest magnitudes, so they are chosen again).
    Installs torch's pruning reparametrisation (``weight_orig`` parameter, ``weight_mask``
    buffer, a forward pre-hook); call :func:`make_permanent` to remove it. Modifies ``model``
    in place.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise SatError(f"pruning amount must be in [0, 1), got {amount!r}")
    params = prunable(model)
    if not params:
        raise SatError(
            f"model {type(model).__name__} has no convolution or linear weights to prune"
        )
    total = sum(getattr(m, name).numel() for m, name in params)
    # With masks installed, torch applies a new amount to the still-unpruned weights only, so
    # ask for the number of *additional* weights that reaches the cumulative target.
    # Round up, so the achieved sparsity is never below the requested amount.
    extra = max(0, math.ceil(amount * total) - _masked_count(params))
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=extra)


def make_permanent(model: nn.Module) -> None:
    """Fold every pruning mask into its weight and drop the reparametrisation.

    Afterwards ``state_dict`` holds plain ``weight`` tensors with zeros at pruned positions,
    loadable into an unpruned model of the same architecture. A no-op for unpruned layers.
    """
    for m, name in prunable(model):
        if prune.is_pruned(m) and hasattr(m, f"{name}_orig"):
            prune.remove(m, name)


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among the prunable weights (masked or permanent), in [0, 1]."""
    params = prunable(model)
    total = sum(getattr(m, name).numel() for m, name in params)
    if total == 0:
        return 0.0
    zeros = sum(int((getattr(m, name) == 0).sum().item()) for m, name in params)
    return zeros / total


def prune_schedule(target: float = 0.95, steps: int = 3) -> list[float]:
    """Cumulative pruning amounts for gradual pruning, ending exactly at ``target``.

    Each step removes the same fraction of the weights still alive (amount_i =
    1 - (1 - target)^(i / steps)), the usual iterative magnitude pruning: e.g. target 0.95
    in 3 steps gives [0.632, 0.864, 0.95]. Returns ``steps`` increasing floats in (0, target].
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target < 1.0:
        raise SatError(f"pruning target must be in (0, 1), got {target!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SatError(f"pruning steps must be an integer >= 1, got {steps!r}")
    keep = 1.0 - float(target)
    amounts = [1.0 - keep ** (i / steps) for i in range(1, steps + 1)]
    amounts[-1] = float(target)  # exact, whatever the rounding of the power
    return amounts
