"""Adversarial attacks in [0, 1] pixel space: shared primitives and the evaluation registry.

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
in :mod:`trainer.perturb`. The registered classes in :data:`ATTACKS` wrap them behind one
call signature for evaluation; :func:`parse_attack` turns names such as ``pgd20`` into
instances.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from saliency_cache.errors import MismatchError, SatError
from trainer.registry import Registry

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


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/DataParallel: attack iterations need input gradients only, and
    running them through the wrapper would arm its gradient-reduction hooks for nothing."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


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


def expand_map(smap: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A saliency map as a float tensor of ``x``'s shape (1-channel maps broadcast over C).

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
    return smap.to(device=x.device, dtype=x.dtype).expand(b, c, h, w)


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
    net = _inner(model)
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
    net = _inner(model)
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
    net = _inner(model)
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
    g = true_logit_grad(_inner(model), x, y)
    return torch.clamp(x.detach() - eps * g.sign(), 0.0, 1.0)


def saliency_attack_from_map(x: torch.Tensor, smap: torch.Tensor, eps: float) -> torch.Tensor:
    """The saliency attack with a cached map: ``clip(x - eps * s, 0, 1)``.

    ``smap``: int8 ``(B, C|1, H, W)`` in {-1, 0, +1} (1-channel maps broadcast over C).
    """
    eps = _check_eps(eps)
    return torch.clamp(x.detach() - eps * expand_map(smap, x), 0.0, 1.0)


# --------------------------------------------------------------------------- registry

ATTACKS: Registry[type[Attack]] = Registry("attack")


def _register(name: str) -> Callable[[type[Attack]], type[Attack]]:
    def deco(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        return ATTACKS.register(name)(cls)

    return deco


class Attack(abc.ABC):
    """An evaluation attack. The caller puts the model in eval mode.

    ``attack(model, x, y, eps=..., generator=..., maps=None)`` returns ``x_adv``: float
    ``(B, C, H, W)`` in [0, 1] with ``|x_adv - x|_inf <= eps``, detached. ``maps`` (int8
    ``(B, C|1, H, W)``) is used only by attacks with ``needs_maps``.
    """

    name: ClassVar[str]
    needs_maps: ClassVar[bool] = False

    @abc.abstractmethod
    def run(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        generator: torch.Generator,
        maps: torch.Tensor | None,
    ) -> torch.Tensor: ...

    def params(self) -> dict[str, Any]:
        """The attack's settings, for result files."""
        return {}

    def __call__(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        generator: torch.Generator,
        maps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        eps = _check_eps(eps)
        check_generator(generator, x)
        if self.needs_maps and maps is None:
            raise SatError(f"attack {self.name!r} needs a cached saliency map (--map)")
        if eps == 0:
            return x.detach().clone()
        return self.run(model, x, y, eps, generator, maps).detach()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


@_register("fgsm")
class FGSMAttack(Attack):
    """One signed-gradient step of size eps on the cross-entropy."""

    def run(self, model, x, y, eps, generator, maps):
        return fgsm(model, x, y, eps)


@_register("pgd")
class PGDAttack(Attack):
    """PGD-k: ``steps`` steps of ``step_size`` (default ``2.5 * eps / steps``, Madry et al.'s
    rule, so the iterate can cross the ball), from a random start, best of ``restarts``."""

    def __init__(
        self,
        steps: int = 5,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
    ) -> None:
        if int(steps) != steps or steps < 1:
            raise SatError(f"PGD steps must be an integer >= 1, got {steps!r}")
        if step_size is not None:
            _check_eps(step_size, "step_size")
        if int(restarts) != restarts or restarts < 1:
            raise SatError(f"PGD restarts must be an integer >= 1, got {restarts!r}")
        if restarts > 1 and not random_start:
            raise SatError(f"{restarts} PGD restarts without random_start would repeat one run")
        if loss not in LOSSES:
            raise SatError(f"unknown attack loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        self.steps, self.step_size = int(steps), step_size
        self.random_start, self.restarts, self.loss = random_start, int(restarts), loss

    def params(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "loss": self.loss,
        }

    def run(self, model, x, y, eps, generator, maps):
        step = 2.5 * eps / self.steps if self.step_size is None else self.step_size
        return pgd(
            model,
            x,
            y,
            eps=eps,
            steps=self.steps,
            step_size=step,
            random_start=self.random_start,
            generator=generator,
            restarts=self.restarts,
            loss=self.loss,
        )


@_register("trades")
class TradesAttack(Attack):
    """The TRADES KL attack. Defaults follow the official TRADES evaluation (10 steps of
    about a quarter of eps: 0.007 at eps 0.031), written as ``2.5 * eps / steps`` so the step
    scales with the budget."""

    def __init__(self, steps: int = 10, step_size: float | None = None) -> None:
        if int(steps) != steps or steps < 1:
            raise SatError(f"TRADES attack steps must be an integer >= 1, got {steps!r}")
        if step_size is not None:
            _check_eps(step_size, "step_size")
        self.steps, self.step_size = int(steps), step_size

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "step_size": self.step_size}

    def run(self, model, x, y, eps, generator, maps):
        step = 2.5 * eps / self.steps if self.step_size is None else self.step_size
        return trades_kl_attack(
            model, x, eps=eps, steps=self.steps, step_size=step, generator=generator
        )


@_register("uniform")
class UniformAttack(Attack):
    """Uniform noise U[-eps, eps] per element (the paper evaluates 8, 16, 32 /255)."""

    def run(self, model, x, y, eps, generator, maps):
        return uniform_noise(x, eps, generator)


@_register("saliency")
class SaliencyAttack(Attack):
    """``x - eps * sign(s)``: ``source="model"`` takes s from the attacked model's true-class
    logit gradient (the paper's Section 3); ``source="map"`` uses the cached ``maps``."""

    def __init__(self, source: str = "model") -> None:
        if source not in ("model", "map"):
            raise SatError(f"saliency attack source must be 'model' or 'map', got {source!r}")
        self.source = source
        self.needs_maps = source == "map"

    def params(self) -> dict[str, Any]:
        return {"source": self.source}

    def run(self, model, x, y, eps, generator, maps):
        if self.source == "map":
            return saliency_attack_from_map(x, maps, eps)
        return saliency_attack(model, x, y, eps)


@_register("autoattack")
class AutoAttackAttack(Attack):
    """Standard l_inf AutoAttack (APGD-CE, APGD-T, FAB-T, Square) via torchattacks.

    The number of classes is read from the model's output; torchattacks' seed is drawn from
    ``generator``. torchattacks seeds the global RNG, so it runs inside
    :func:`torch.random.fork_rng` and the caller's global RNG state is left untouched.
    """

    def __init__(self, version: str = "standard") -> None:
        if version not in ("standard", "plus", "rand"):
            raise SatError(f"AutoAttack version must be standard, plus or rand, got {version!r}")
        self.version = version

    def params(self) -> dict[str, Any]:
        return {"version": self.version}

    def run(self, model, x, y, eps, generator, maps):
        try:
            import torchattacks
        except ImportError:
            raise SatError(
                "the autoattack attack needs torchattacks: pip install 'sat-pipeline[autoattack]'"
            ) from None
        net = _inner(model)
        with torch.no_grad():
            n_classes = int(net(x[:1]).shape[1])
        if n_classes < 4:
            # APGD-T's targeted DLR loss compares the 1st, 3rd and 4th largest logits.
            raise SatError(f"AutoAttack needs a model with >= 4 classes, this one has {n_classes}")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=x.device).item())
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            atk = torchattacks.AutoAttack(
                net, norm="Linf", eps=eps, version=self.version, n_classes=n_classes, seed=seed
            )
            x_adv = atk(x.detach(), y)
        # torchattacks works in float32 and may round a hair outside the ball.
        return project(x_adv.to(x.dtype), x.detach(), eps)


_PARAM_NAME = re.compile(r"^(pgd|trades)(\d+)$")
_ALIASES: dict[str, Callable[[], Attack]] = {
    "fgsm": FGSMAttack,
    "pgd": PGDAttack,
    "trades": TradesAttack,
    "uniform": UniformAttack,
    "saliency": lambda: SaliencyAttack("model"),
    "saliency-map": lambda: SaliencyAttack("map"),
    "autoattack": AutoAttackAttack,
}


def list_attacks() -> list[str]:
    """Attack specs understood by :func:`parse_attack` (``pgdN``/``tradesN`` set the steps)."""
    return sorted({*_ALIASES, *ATTACKS.names(), "pgd<N>", "trades<N>"})


def parse_attack(spec: str) -> Attack:
    """An attack instance from a spec: ``fgsm``, ``pgd`` (5 steps), ``pgd<N>`` (N steps, e.g.
    ``pgd20``), ``trades`` (10 steps), ``trades<N>``, ``uniform``, ``saliency`` (from the
    model's gradient), ``saliency-map`` (from a cached map) or ``autoattack``.

    Raises :class:`SatError` listing the valid specs for anything else.
    """
    s = str(spec).strip().lower()
    m = _PARAM_NAME.match(s)
    if m:
        steps = int(m.group(2))
        if steps < 1:
            raise SatError(f"attack {spec!r} needs at least 1 step")
        return PGDAttack(steps=steps) if m.group(1) == "pgd" else TradesAttack(steps=steps)
    if s in _ALIASES:
        return _ALIASES[s]()
    raise SatError(f"unknown attack {spec!r}; choose one of: {', '.join(list_attacks())}")


def evaluate_attack(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    attack: Attack | str,
    eps: float,
    device: torch.device | str,
    generator: torch.Generator,
) -> dict[str, float]:
    """Accuracy of ``model`` under ``attack`` at budget ``eps`` over ``batches``.

    Each batch is ``(x, y)`` or ``(x, y, maps)``: ``x`` float in [0, 1] or uint8 (divided by
    255), ``(B, C, H, W)``; ``y`` int ``(B,)``; ``maps`` int8 ``(B, C|1, H, W)``. They are
    moved to ``device``. The model runs in eval mode and is returned to its previous mode.
    Returns ``{"accuracy": fraction correct in [0, 1], "n": samples}``.
    """
    atk = parse_attack(attack) if isinstance(attack, str) else attack
    device = torch.device(device)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = n = 0
    try:
        for batch in batches:
            x, y = batch[0].to(device), batch[1].to(device).long()
            maps = batch[2].to(device) if len(batch) > 2 and batch[2] is not None else None
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)
            x_adv = atk(model, x, y, eps=eps, generator=generator, maps=maps)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == y).sum().item())
            n += int(y.numel())
    finally:
        for m, training in was:
            m.training = training
    if n == 0:
        raise SatError("no samples to evaluate the attack on")
    return {"accuracy": correct / n, "n": n}
