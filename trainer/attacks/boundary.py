"""Distance to the decision boundary, by a minimum-norm attack (Etmann et al.'s robustness).

Per image, the size of the smallest adversarial perturbation that FAB (Croce & Hein 2020,
"Minimally distorted adversarial examples with a fast adaptive boundary attack", from
torchattacks) finds, in L2 or L∞ and in [0, 1] pixel space. FAB is untargeted here, with
no random restart (its first run starts at the image, so no ball radius enters the search)
and its acceptance radius set to the diameter of the pixel box, so every adversarial
example it finds is kept. The value is an upper bound on the true distance: a stronger
attack can only lower it.

Conventions of the returned per-image distances (float64 ``(B,)``):

- an image the model already misclassifies has distance 0 (it is on the wrong side);
- an image for which FAB found no adversarial example has distance ``inf``, so a median
  over images treats it as "farther than anything found" (see :func:`summarise`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from saliency_cache.errors import SatError
from trainer.modules import unwrap

NORMS = ("l2", "linf")
_FAB_NORM = {"l2": "L2", "linf": "Linf"}


def min_norm_distance(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-image distance to the boundary found by FAB: float64 ``(B,)`` (0 / ``inf`` above).

    ``x`` float ``(B, C, H, W)`` in [0, 1]; ``y`` int64 ``(B,)``; ``norm`` ``"l2"`` or
    ``"linf"``; ``steps`` FAB iterations (each costs one input gradient per class). The model
    is used in its current mode (put it in eval mode). torchattacks seeds the global RNG, so
    it runs inside :func:`torch.random.fork_rng` with a seed drawn from ``generator``.
    """
    if norm not in NORMS:
        raise SatError(f"unknown boundary norm {norm!r}; choose one of: {', '.join(NORMS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SatError(f"boundary attack steps must be an integer >= 1, got {steps!r}")
    try:
        import torchattacks
    except ImportError:
        raise SatError(
            "the boundary distance needs torchattacks: pip install 'sat-pipeline[autoattack]'"
        ) from None
    net = unwrap(model)
    x = x.detach()
    with torch.no_grad():
        logits = net(x)
    n_classes = int(logits.shape[1])
    wrong = logits.argmax(1) != y
    dim = x[0].numel()
    # The largest distance possible inside the [0, 1] box: FAB keeps only examples within it.
    radius = 1.0 if norm == "linf" else math.sqrt(dim)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=x.device).item())
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        atk = torchattacks.FAB(net, norm=_FAB_NORM[norm], eps=radius, steps=steps,
                               n_restarts=1, n_classes=n_classes, seed=seed)
        x_adv = atk(x.float(), y).to(x.dtype)
    with torch.no_grad():
        fooled = net(x_adv).argmax(1) != y
    diff = (x_adv - x).flatten(1).double()
    size = diff.norm(dim=1) if norm == "l2" else diff.abs().amax(1)
    out = torch.where(fooled, size, torch.full_like(size, math.inf))
    return torch.where(wrong, torch.zeros_like(out), out)


def summarise(dist: np.ndarray) -> dict[str, float | None]:
    """Summary of per-image distances ``dist`` (float64 ``(N,)``, N >= 1, 0 / inf as above).

    ``median``: over all N images, misclassified ones at 0 and not-found ones counted as
    infinitely far, so it is ``None`` (no finite median) when at least half were not found;
    ``median_correct``: the same over the correctly classified images only (``None`` if there
    are none), which does not mix clean accuracy into the distance; ``not_found``: fraction of
    the N images without an adversarial example; ``misclassified``: fraction already wrong.
    """
    dist = np.asarray(dist, dtype=np.float64)
    if dist.size == 0:
        raise SatError("boundary distance over no images is undefined")
    correct = dist[dist > 0]

    def finite_median(v: np.ndarray) -> float | None:
        med = float(np.median(v)) if v.size else math.inf
        return med if math.isfinite(med) else None

    return {
        "median": finite_median(dist),
        "median_correct": finite_median(correct),
        "not_found": float(np.mean(~np.isfinite(dist))),
        "misclassified": float(np.mean(dist == 0)),
    }
