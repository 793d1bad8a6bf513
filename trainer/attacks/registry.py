"""The evaluation attacks: registered classes in :data:`ATTACKS` wrap the primitives of
:mod:`trainer.attacks.primitives` behind one call signature; :func:`parse_attack` turns names
such as ``pgd20`` into instances. The conventions of the primitives hold here too.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from saliency_cache.errors import SatError
from trainer.attacks.primitives import (
    LOSSES,
    _check_eps,
    check_generator,
    fgsm,
    pgd,
    project,
    saliency_attack,
    saliency_attack_from_map,
    trades_kl_attack,
    uniform_noise,
)
from trainer.modules import unwrap
from trainer.registry import Registry

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
        net = unwrap(model)
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
