"""Evaluation metrics: correct counts and the alignment of saliency with the image.

Alignment (Etmann et al. 2019, "On the connection between adversarial robustness and
saliency map interpretability") measures how much an image looks like its own saliency
map. For an input ``x`` (float, [0, 1] pixel space) and a gradient ``g = ∇x f(x)`` it comes
in two forms, both computed per sample on the flattened ``(C*H*W,)`` vectors:

- **projection** ``|<x, g>| / ||g||_2``: the length of the image's projection on its map.
  With ``f = Ψ`` this is Etmann et al.'s alignment: for a linear binary classifier
  ``Ψ(x) = w·x + b`` it equals ``|Ψ(x) - b| / ||w||``, the distance to the decision boundary
  up to the bias, which is why it is the form their claim is about. It is not scale-free in
  ``x``: it grows with ``||x||`` (brighter, larger images score higher), so it compares
  models on one dataset, not across datasets.
- **cosine** ``|<x, g>| / (||x||_2 ||g||_2)`` in [0, 1]: the projection divided by the image
  norm, the scale-free form Etmann et al.'s code logs as well.

and for two choices of ``f``:

- **logit**: ``Φ^y``, the true-class logit (what the tool reported before, as
  ``results.alignment``);
- **margin**: Etmann et al.'s binarised logit ``Ψ = Φ^y - max_{j != y} Φ^j`` (the gradient of
  the max is the runner-up class's; the point where two others tie has measure zero).

A sample whose gradient is exactly zero (or whose image is all zeros, for the cosine) gets 0.
"""

from __future__ import annotations

import torch

from trainer.attacks import input_grad, true_logit_grad

ALIGNMENT_FORMS = ("logit_projection", "logit_cosine", "margin_projection", "margin_cosine")


def num_correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """How many rows of ``logits`` ``(B, classes)`` have their argmax at ``y`` ``(B,)``."""
    return int((logits.argmax(1) == y).sum().item())


def margin_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇x Ψ(x) with ``Ψ = Φ^y - max_{j != y} Φ^j``, per sample: ``x``'s shape.

    As :func:`trainer.attacks.true_logit_grad`, samples are summed before differentiation
    (per-sample gradients when the model treats samples independently, as in eval mode).
    """

    def psi(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        true = z.gather(1, y[:, None])
        others = z.scatter(1, y[:, None], float("-inf"))
        return true - others.amax(1, keepdim=True)

    return input_grad(model, x, psi)


def _forms(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(projection, cosine) per sample in float64, ``(B,)`` each."""
    tiny = torch.finfo(torch.float64).tiny
    g = g.flatten(1).double()
    xf = x.detach().flatten(1).double()
    gn, xn = g.norm(dim=1), xf.norm(dim=1)
    dot = (xf * g).sum(1).abs()
    proj = torch.where(gn > 0, dot / gn.clamp_min(tiny), 0.0)
    cos = torch.where((gn > 0) & (xn > 0), dot / (gn * xn).clamp_min(tiny), 0.0)
    return proj, cos


def alignment(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample logit projection ``|<x, ∇x Φ^y(x)>| / ||∇x Φ^y(x)||_2``: ``x.dtype`` ``(B,)``, >= 0.

    ``x`` float ``(B, C, H, W)`` in [0, 1] (the pixel-space input the model takes); ``y``
    int64 ``(B,)``. The model is used in its current mode (use eval mode, so samples do not
    interact through BatchNorm). No parameter ``.grad`` is written.
    """
    proj, _ = _forms(x, true_logit_grad(model, x, y))
    return proj.to(x.dtype)


def alignment_forms(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """All four forms of :data:`ALIGNMENT_FORMS` per sample: float64 ``(B,)`` each, >= 0.

    Inputs and model mode as :func:`alignment`; two input gradients are taken (of ``Φ^y`` and
    of ``Ψ``). ``logit_projection`` equals :func:`alignment` before its cast to ``x.dtype``.
    """
    lp, lc = _forms(x, true_logit_grad(model, x, y))
    mp, mc = _forms(x, margin_grad(model, x, y))
    return {"logit_projection": lp, "logit_cosine": lc,
            "margin_projection": mp, "margin_cosine": mc}
