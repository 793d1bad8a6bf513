"""Adversarial attacks in [0, 1] pixel space: the primitives every attack and training mode uses.

Conventions shared by every function here:

- ``x`` is a float tensor ``(B, C, H, W)`` with values in ``[0, 1]``; ``y`` is int64 ``(B,)``;
  ``eps`` is an l_inf budget in pixel units (``8/255``). Returned adversarial inputs have
  ``x``'s shape and dtype, lie in ``[0, 1]`` and within ``eps`` of ``x`` in l_inf, and are
  detached.
- The model is used in whatever train/eval mode the caller left it in; nothing here changes
  it. Gradients are taken with :func:`torch.autograd.grad` with respect to the input only, so
  no ``.grad`` of a model parameter is ever written.
- Every random draw takes the explicit ``generator`` (on ``x``'s device); the global RNG is
  never used, so a seed fixes the result.

The primitives (:func:`fgsm`, :func:`pgd`, :func:`trades_kl_attack`, :func:`uniform_noise`,
:func:`saliency_attack`, :func:`saliency_attack_from_map`) are reused by the training modes
in :mod:`trainer.perturb`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from saliency_cache.errors import MismatchError, SatError
from trainer.modules import unwrap

LOSSES = ("ce", "margin")


# --------------------------------------------------------------------------- helpers


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto the l_inf ball of radius ``eps`` around ``x``, then clip to [0, 1].

    Both tensors are float ``(B, C, H, W)``; the result has the same shape. Since ``x`` is in
    [0, 1], the clipped point is still inside the ball.
    """
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def _check_eps(eps: float, what: str = "eps") -> float:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise SatError(f"{what} must be a finite number >= 0 in pixel units, got {eps!r}")
    return float(eps)


def check_generator(generator: torch.Generator, x: torch.Tensor) -> None:
    """Raise :class:`SatError` unless ``generator`` is a torch.Generator on ``x``'s device type."""
    if not isinstance(generator, torch.Generator):
        raise SatError(f"expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise SatError(
            f"generator is on {generator.device} but the inputs are on {x.device}; "
            "create it with torch.Generator(device=x.device)"
        )


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Loss the attacker maximises, per sample: float ``(B,)``.

    ``"ce"``: cross-entropy. ``"margin"``: the Carlini-Wagner margin
    ``max_{j != y} z_j - z_y`` (positive once the sample is misclassified).
    """
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="none")
    if loss == "margin":
        z = logits.float()
        true = z.gather(1, y[:, None]).squeeze(1)
        others = z.scatter(1, y[:, None], float("-inf"))
        return others.amax(1) - true
    raise SatError(f"unknown attack loss {loss!r}; choose one of: {', '.join(LOSSES)}")


# Under autocast (mixed precision on CUDA) the backward pass runs in float16, where the small
# input gradients of a batch-summed objective (TRADES' KL near x above all) underflow to zero
# and lose their sign. The objective is scaled up first, as GradScaler scales the training
# loss; a scaled gradient that overflows is recomputed in float32.
AMP_GRAD_SCALE = 2.0**12


def input_grad(
    model: torch.nn.Module, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Gradient of ``objective(model(x)).sum()`` with respect to ``x`` only: ``x``'s shape.

    Works inside ``torch.no_grad()`` callers and never touches parameter ``.grad``. Inside an
    autocast region the objective is scaled by :data:`AMP_GRAD_SCALE` (and the gradient
    scaled back), with a float32 recomputation if that overflows.
    """
    def grad(scale: float) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(objective(model(xg)).sum() * scale, [xg])
        return g.detach()

    if not torch.is_autocast_enabled(x.device.type):
        return grad(1.0)
    g = grad(AMP_GRAD_SCALE)
    if bool(torch.isfinite(g).all()):
        return g / AMP_GRAD_SCALE
    with torch.autocast(x.device.type, enabled=False):
        return grad(1.0)


def true_logit_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇x Φ^y(x): gradient of each sample's true-class logit w.r.t. its input, ``x``'s shape.

    Samples are summed before differentiation, which equals per-sample gradients when the
    model treats samples independently (eval mode).
    """
    return input_grad(model, x, lambda z: z.float().gather(1, y[:, None]))


def expand_map(smap: torch.Tensor, x: torch.Tensor, *, keep_dtype: bool = False) -> torch.Tensor:
    """A saliency map as a tensor of ``x``'s shape (1-channel maps broadcast over C), of
    ``x``'s dtype, or of its own with ``keep_dtype`` (no conversion pass; an expanded view).

    ``smap``: ``(B, C, H, W)`` or ``(B, 1, H, W)`` with values in {-1, 0, +1}, normally int8,
    on ``x``'s device. Raises :class:`MismatchError` when batch or spatial size disagree or
    the dtype cannot hold -1 (a still bit-packed map, for instance).
    """
    if smap.dtype in (torch.uint8, torch.bool):
        raise MismatchError(f"saliency map must be signed (int8 in {{-1,0,+1}}), got {smap.dtype}")
    b, c, h, w = x.shape
    if (
        smap.dim() != 4
        or smap.shape[0] != b
        or smap.shape[2:] != (h, w)
        or smap.shape[1] not in (1, c)
    ):
        raise MismatchError(
            f"saliency map of shape {tuple(smap.shape)} does not fit images of shape "
            f"{tuple(x.shape)}; expected ({b}, {c} or 1, {h}, {w})"
        )
    dtype = smap.dtype if keep_dtype else x.dtype
    return smap.to(device=x.device, dtype=dtype).expand(b, c, h, w)


# --------------------------------------------------------------------------- primitives


def uniform_noise(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """``clip(x + u, 0, 1)`` with ``u ~ U[-eps, eps]`` drawn independently per element."""
    eps = _check_eps(eps)
    check_generator(generator, x)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.clamp(x.detach() + (2.0 * u - 1.0) * eps, 0.0, 1.0)


def fgsm(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, loss: str = "ce"
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al.): ``clip(x + eps * sign(∇x L(x, y)))``."""
    eps = _check_eps(eps)
    net = unwrap(model)
    g = input_grad(net, x, lambda z: per_sample_loss(z, y, loss))
    return project(x.detach() + eps * g.sign(), x.detach(), eps)


def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool,
    generator: torch.Generator | None = None,
    restarts: int = 1,
    loss: str = "ce",
) -> torch.Tensor:
    """l_inf projected gradient ascent on ``loss`` (Madry et al., the paper's Eq. 1).

    Each step is ``x' <- project(x' + step_size * sign(∇ L(x', y)))``; the last iterate of a
    run is its result. With ``random_start`` a run starts at ``project(x + U[-eps, eps])``
    (needs ``generator``), otherwise at ``x``. With ``restarts > 1`` (needs ``random_start``)
    the runs are repeated and, per sample, the one that fools the model is kept, or among
    equals the one with the highest loss.
    """
    eps = _check_eps(eps)
    _check_eps(step_size, "step_size")
    if int(steps) != steps or steps < 1:
        raise SatError(f"PGD steps must be an integer >= 1, got {steps!r}")
    if int(restarts) != restarts or restarts < 1:
        raise SatError(f"PGD restarts must be an integer >= 1, got {restarts!r}")
    if restarts > 1 and not random_start:
        raise SatError(f"{restarts} PGD restarts without random_start would repeat one run")
    if random_start:
        if generator is None:
            raise SatError("PGD with random_start needs a torch.Generator")
        check_generator(generator, x)
    if loss not in LOSSES:
        raise SatError(f"unknown attack loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    net = unwrap(model)
    x0 = x.detach()
    best: torch.Tensor | None = None
    best_fooled = best_loss = None
    for _ in range(int(restarts)):
        if random_start:
            x_adv = uniform_noise(x0, eps, generator)
        else:
            x_adv = x0.clone()
        for _ in range(int(steps)):
            g = input_grad(net, x_adv, lambda z: per_sample_loss(z, y, loss))
            x_adv = project(x_adv + step_size * g.sign(), x0, eps)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            z = net(x_adv)
            fooled = z.argmax(1) != y
            value = per_sample_loss(z, y, loss)
        if best is None:
            best, best_fooled, best_loss = x_adv, fooled, value
            continue
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (value > best_loss))
        best = torch.where(better[:, None, None, None], x_adv, best)
        best_fooled = best_fooled | fooled
        best_loss = torch.where(better, value, best_loss)
    assert best is not None
    return best


def trades_kl_attack(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """TRADES inner maximisation (Zhang et al. 2019): ascend ``KL(f(x) || f(x'))`` in the ball.

    Starts at ``project(x + 0.001 * N(0, 1))`` (projected, unlike the official code, so the
    output is always a valid image) and takes ``steps`` signed steps of ``step_size``.
    Labels are not used: the attack pushes the prediction away from the clean one.
    """
    eps = _check_eps(eps)
    _check_eps(step_size, "step_size")
    if int(steps) != steps or steps < 1:
        raise SatError(f"TRADES attack steps must be an integer >= 1, got {steps!r}")
    check_generator(generator, x)
    net = unwrap(model)
    x0 = x.detach()
    with torch.no_grad():
        p_clean = F.softmax(net(x0).float(), dim=1)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_adv = project(x0 + 0.001 * noise, x0, eps)

    def kl(z: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(z.float(), dim=1), p_clean, reduction="none").sum(1)

    for _ in range(int(steps)):
        g = input_grad(net, x_adv, kl)
        x_adv = project(x_adv + step_size * g.sign(), x0, eps)
    return x_adv


def saliency_attack(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
) -> torch.Tensor:
    """The paper's Section 3 attack: ``clip(x - eps * sign(∇x Φ^y(x)), 0, 1)``.

    Φ^y is the true-class logit, so the step lowers the evidence for the right class.
    """
    eps = _check_eps(eps)
    g = true_logit_grad(unwrap(model), x, y)
    return torch.clamp(x.detach() - eps * g.sign(), 0.0, 1.0)


def saliency_attack_from_map(x: torch.Tensor, smap: torch.Tensor, eps: float) -> torch.Tensor:
    """The saliency attack with a cached map: ``clip(x - eps * s, 0, 1)``.

    ``smap``: int8 ``(B, C|1, H, W)`` in {-1, 0, +1} (1-channel maps broadcast over C).
    """
    eps = _check_eps(eps)
    return torch.clamp(x.detach() - eps * expand_map(smap, x), 0.0, 1.0)


