"""Evaluation metrics: accuracy and the alignment of saliency with the image.

Alignment (Etmann et al. 2019, "On the connection between adversarial robustness and
saliency map interpretability") is ``|<x, g>| / ||g||_2`` with ``g = ∇x Φ^y(x)`` the gradient
of the true-class logit: the length of the image's projection on its own saliency map.
Robust models tend to have maps that look like the image, hence a larger alignment.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from saliency_cache.errors import SatError
from trainer.attacks import true_logit_grad


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of ``logits`` ``(B, classes)`` whose argmax equals ``y`` ``(B,)``: [0, 1]."""
    if logits.dim() != 2 or y.shape != logits.shape[:1]:
        raise SatError(
            f"accuracy needs logits (B, classes) and labels (B,), got {tuple(logits.shape)} "
            f"and {tuple(y.shape)}"
        )
    if y.numel() == 0:
        raise SatError("accuracy of an empty batch is undefined")
    return float((logits.argmax(1) == y).float().mean().item())


def alignment(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample alignment ``|<x, ∇x Φ^y(x)>| / ||∇x Φ^y(x)||_2``: float ``(B,)``, >= 0.

    ``x`` float ``(B, C, H, W)`` in [0, 1] (the pixel-space input the model takes); ``y``
    int64 ``(B,)``. Each sample is flattened; a sample whose gradient is exactly zero gets
    0. The model is used in its current mode (use eval mode, so samples do not interact
    through BatchNorm). No parameter ``.grad`` is written.
    """
    g = true_logit_grad(model, x, y).flatten(1).double()
    xf = x.detach().flatten(1).double()
    norm = g.norm(dim=1)
    dot = (xf * g).sum(1).abs()
    out = torch.where(norm > 0, dot / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return out.to(x.dtype)


def mean_alignment(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    device: torch.device | str,
) -> float:
    """Mean :func:`alignment` over all samples of ``batches`` (each ``(x, y, ...)``; ``x``
    float in [0, 1] or uint8, moved to ``device``), with the model in eval mode; the model's
    modes are restored afterwards."""
    device = torch.device(device)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    total, n = 0.0, 0
    try:
        for batch in batches:
            x, y = batch[0].to(device), batch[1].to(device).long()
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)
            total += float(alignment(model, x, y).double().sum().item())
            n += int(y.numel())
    finally:
        for m, training in was:
            m.training = training
    if n == 0:
        raise SatError("mean alignment over no samples is undefined")
    return total / n
