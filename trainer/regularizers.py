"""Training modes that add a regulariser to the clean cross-entropy: ``gradnorm`` and ``sgt``.

They are the methods of the two companion papers (``../shared/DESIGN.md``), registered in
:data:`trainer.perturb.MODES` like every other mode (this module is imported at the end of
:mod:`trainer.perturb`), share the one training loop, and read no cached map. Inputs follow
:class:`trainer.perturb.TrainingMode`: ``x`` float ``(B, C, H, W)`` in [0, 1] pixel space.

- ``gradnorm`` (double backprop; the local Lipschitz penalty Etmann et al. 2019 train with):
  ``loss = mean_i CE_i + gradnorm_lambda * mean_i ||∇_{x_i} CE_i||_2²``. The gradient is of
  the batch *sum* of per-sample cross-entropies, so row i is sample i's own gradient (exactly
  so in eval mode; in train mode BatchNorm couples the samples, as in any double-backprop
  code), and λ does not depend on the batch size. It is taken with ``create_graph=True``, so
  the penalty is differentiated through. With λ = 0 the mode is ``standard`` exactly.
- ``sgt`` (saliency-guided training, Ismail et al. 2021, the method Karkehabadi evaluates):
  see :func:`sgt_mask` and :class:`SGT`.

Both are DDP-safe: the loss's forwards run through the (possibly DDP-wrapped) model once
per input, the saliency gradient of ``sgt`` through the unwrapped module, and the penalty's
gradient is taken with respect to the input only, so no reduction hook fires before the
loop's one ``backward``. Under CUDA autocast the inner gradients are scaled by
:data:`trainer.attacks.AMP_GRAD_SCALE` against float16 underflow (``gradnorm`` recomputes its
penalty in float32 if the scaled gradient overflows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saliency_cache.errors import SatError
from trainer.attacks import AMP_GRAD_SCALE, true_logit_grad
from trainer.modules import unwrap
from trainer.perturb import SGT_FILLS, TrainingMode, _register, ce_plus_kl


def grad_norm_sq(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per-sample cross-entropy and squared input-gradient norm, both differentiable.

    Returns ``(logits, ce, sq)``: the float ``(B, classes)`` logits of ``x``, ``ce`` float32
    ``(B,)`` and ``sq[i] = ||∇_{x_i} CE_i||_2²`` float32 ``(B,)``, with the graph kept so
    that ``sq`` can be backpropagated (to the parameters; ``x`` itself is not a leaf).
    """
    autocast = torch.is_autocast_enabled(x.device.type)

    def attempt(scale: float):
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        (g,) = torch.autograd.grad(ce.sum() * scale, [xg], create_graph=True)
        return logits, ce, (g.float() / scale).flatten(1).pow(2).sum(1)

    if not autocast:
        return attempt(1.0)
    logits, ce, sq = attempt(AMP_GRAD_SCALE)
    if bool(torch.isfinite(sq).all()):
        return logits, ce, sq
    with torch.autocast(x.device.type, enabled=False):
        return attempt(1.0)


@_register("gradnorm")
class GradNorm(TrainingMode):
    """CE + ``gradnorm_lambda`` · mean of ||∇x CE||² over the batch (double backprop)."""

    def compute(self, model, x, y, maps, *, epoch, generator):
        lam = self.cfg.gradnorm_lambda
        if lam == 0:
            logits = model(x)
            return F.cross_entropy(logits.float(), y), logits
        logits, ce, sq = grad_norm_sq(model, x, y)
        return ce.mean() + lam * sq.mean(), logits


def sgt_mask(
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    fraction: float,
    fill: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace, per image, the ``floor(fraction * C*H*W)`` features of smallest ``|grad|``.

    ``x``, ``grad``: float ``(B, C, H, W)``, ``x`` in [0, 1]. A feature is one element of an
    image (a colour channel of a pixel). Ties in ``|grad|`` go to the lower flat index.
    ``fill="uniform"``: each masked feature gets an independent draw from ``U[min, max]`` of
    that image's values (so it stays in the image's range); ``"channel-mean"``: the mean of
    that image's channel. Returns ``(x_masked, masked)``: the detached masked images and the
    bool ``(B, C, H, W)`` mask of the replaced features.
    """
    if fill not in SGT_FILLS:
        raise SatError(f"unknown sgt fill {fill!r}; choose one of: {', '.join(SGT_FILLS)}")
    b, c, h, w = x.shape
    k = int(fraction * c * h * w)
    flat = x.detach().flatten(1).clone()
    masked = torch.zeros_like(flat, dtype=torch.bool)
    if k == 0:
        return flat.view_as(x), masked.view_as(x)
    idx = torch.argsort(grad.detach().abs().flatten(1), dim=1, stable=True)[:, :k]
    if fill == "uniform":
        lo = flat.amin(1, keepdim=True)
        hi = flat.amax(1, keepdim=True)
        u = torch.rand((b, k), generator=generator, device=x.device, dtype=flat.dtype)
        vals = lo + (hi - lo) * u
    else:
        means = x.detach().mean((2, 3))  # (B, C)
        vals = means.gather(1, idx // (h * w))
    flat.scatter_(1, idx, vals)
    masked.scatter_(1, idx, True)
    return flat.view_as(x), masked.view_as(x)


@_register("sgt")
class SGT(TrainingMode):
    """Saliency-guided training: ``CE(f(x), y) + sgt_lambda · KL(f(x) || f(x̃))`` (batch mean).

    Per batch, ``g = ∇x Φ^y(x)``, the model's own gradient of the true-class logit (model in
    train mode, as in the authors' loop; through the unwrapped module), and ``x̃`` is ``x``
    with the ``sgt_fraction`` of features of **smallest magnitude** ``|g|`` replaced
    (:func:`sgt_mask`, fill ``sgt_fill``). Both ``f(x)`` and ``f(x̃)`` are trained through
    (``x̃`` itself is a constant).

    This follows the paper (Ismail et al. 2021, "Improving Deep Learning Interpretability by
    Saliency Guided Training": mask the features with the lowest saliency, i.e. gradient
    magnitude). The authors' released code sorts the *signed* gradients, so its "lowest"
    features are the most negative ones, which masks strongly relevant evidence against the
    class rather than the irrelevant features; this mode does not copy that. The default
    λ = 1 is the authors' code's.
    """

    def compute(self, model, x, y, maps, *, epoch, generator):
        g = true_logit_grad(unwrap(model), x, y)
        x_masked, _ = sgt_mask(
            x, g, fraction=self.cfg.sgt_fraction, fill=self.cfg.sgt_fill, generator=generator
        )
        logits = model(x)
        return ce_plus_kl(logits, model(x_masked), y, self.cfg.sgt_lambda), logits
