"""Training modes: how a batch is perturbed and scored, one registered class per mode.

Every mode implements :meth:`TrainingMode.loss`, the only thing the training loop calls:
``loss(model, x, y, maps, epoch=t, generator=g) -> (scalar loss, logits)`` with ``x`` float
``(B, C, H, W)`` in [0, 1], ``y`` int64 ``(B,)`` and ``maps`` a list of int8 saliency maps
``(B, C|1, H, W)`` in {-1, 0, +1}. All budgets are l_inf in pixel units; all random draws
come from ``generator`` (on ``x``'s device), so a seed fixes the batch's perturbation.

Modes (``list_modes()``):

========================  ====================================================================
``standard``              cross-entropy on the clean batch
``uniform``               CE on ``clip(x + U[-uniform_eps, uniform_eps])``
``sat``                   CE on the paper's Eq. 9 perturbation (:func:`sat_perturb`)
``multi-sat``             ``sat`` with one of several cached maps picked per sample
``pgd``                   PGD-AT (Madry et al.): CE on a ``pgd_steps``-step PGD example
``trades``                TRADES: ``CE(f(x), y) + beta * KL(f(x) || f(x'))``
``pgd+uniform``           uniform noise first, then PGD-AT around the noisy image
``trades+uniform``        uniform noise first, then TRADES with the noisy image as "clean"
``pgd-sat``               per batch: the SAT perturbation with prob. ``mix_p``, else PGD
``trades-sat``            per batch: x' from SAT with prob. ``mix_p``, else the KL attack
``fgsm-rs``               Wong, Rice & Kolter 2020: random start + one FGSM step of 1.25 eps
``gradnorm``              CE + gradnorm_lambda * mean ||∇x CE||² (double backprop, Etmann et al.)
``sgt``                   saliency-guided training (Ismail et al. 2021): CE + sgt_lambda * KL
========================  ====================================================================

``gradnorm`` and ``sgt`` live in :mod:`trainer.regularizers` (registered on import of this
module); like ``standard`` they read no map.

Choices, with the reasons:

- PGD-AT-style modes (``pgd``, ``pgd+uniform``, ``pgd-sat``, ``fgsm-rs``) generate their
  examples with the model in train mode, as Madry et al.'s and the authors' code do; the
  TRADES family generates them in eval mode, as the official TRADES code does. The model's
  per-module modes are restored exactly before the loss is computed.
- TRADES training uses ``trades_steps`` = 5 steps of ``pgd_step_size`` (2/255), the budget
  of the paper's 5-step PGD-AT, so the two baselines cost the same per batch (the official
  TRADES uses 10 steps of 0.007).
- "+ uniform" modes: the batch is first replaced by ``clip(x + U[-uniform_eps, uniform_eps])``
  and that noisy batch is then treated as the clean input (the attack's ball is centred on
  it, and TRADES' natural term scores it), so ``|x' - x|_inf <= eps + uniform_eps``.
- ``pgd-sat`` / ``trades-sat``: the SAT branch is Eq. 9 with the same alpha^t schedule as
  ``sat``, then projected onto the ``eps`` ball (a no-op when ``sat_eps <= eps``). The
  authors' code used ``-s`` after a random start and skipped that projection; its
  TRADES-SAT also used beta = 1 where this uses ``trades_beta``. In ``trades-sat`` both
  branches feed the TRADES loss, whose KL term then compares f(x) with f(x_sat).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from saliency_cache.errors import SatError
from trainer.attacks import (
    check_generator,
    expand_map,
    pgd,
    project,
    trades_kl_attack,
    uniform_noise,
)
from trainer.modules import module_mode
from trainer.registry import Registry

# --------------------------------------------------------------------------- config

SGT_FILLS = ("uniform", "channel-mean")  # how sgt fills the masked features


@dataclass(frozen=True)
class PerturbConfig:
    """Hyperparameters of every training mode (budgets in [0, 1] pixel units)."""

    eps: float = 8 / 255  # l_inf training budget of PGD, TRADES and FGSM-RS
    pgd_steps: int = 5  # PGD-AT steps (the paper: 5)
    pgd_step_size: float = 2 / 255  # step of PGD-AT and of TRADES' inner maximisation
    trades_beta: float = 6.0  # weight of TRADES' KL term (the paper: 6)
    trades_steps: int = 5  # TRADES inner steps; 5 matches PGD-AT's cost (official TRADES: 10)
    uniform_eps: float = 8 / 255  # half-width of the uniform noise of the "+uniform" modes
    sat_eps: float = 8 / 255  # ε0 of Eq. 9: size of the SAT step
    sat_alpha: float = 0.6 ** (1 / 10)  # α of Eq. 9: P(random sign) = α^t
    sat_time_scale: float = 1.0  # t = epoch * sat_time_scale (express the schedule per run)
    mix_p: float = 0.5  # pgd-sat / trades-sat: probability of the SAT branch per batch
    fgsm_rs_alpha: float = 10 / 255  # FGSM-RS step (Wong et al.: 1.25 eps)
    # gradnorm: λ of the mean squared input-gradient norm, the gradient taken in [0, 1] pixel
    # space (a model that normalises inside sees it scaled by 1/std; Etmann et al. vary λ).
    gradnorm_lambda: float = 1.0
    sgt_fraction: float = 0.5  # sgt: fraction k of input features masked per image, in (0, 1)
    sgt_fill: str = "uniform"  # sgt: masked values, "uniform" (image's range) or "channel-mean"
    sgt_lambda: float = 1.0  # sgt: weight of KL(f(x) || f(x masked)) (Ismail et al.'s code: 1)

    def __post_init__(self) -> None:
        for name in ("eps", "uniform_eps", "sat_eps"):
            v = getattr(self, name)
            if not (_is_number(v) and 0 <= v <= 1):
                raise SatError(f"{name} must be in [0, 1] (pixel units, e.g. 8/255), got {v!r}")
        for name in ("pgd_step_size", "fgsm_rs_alpha"):
            v = getattr(self, name)
            if not (_is_number(v) and 0 < v <= 1):
                raise SatError(f"{name} must be in (0, 1] (pixel units), got {v!r}")
        for name in ("pgd_steps", "trades_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SatError(f"{name} must be an integer >= 1, got {v!r}")
        if not (_is_number(self.trades_beta) and self.trades_beta >= 0):
            raise SatError(f"trades_beta must be a number >= 0, got {self.trades_beta!r}")
        if not (_is_number(self.sat_alpha) and 0 < self.sat_alpha <= 1):
            raise SatError(f"sat_alpha must be in (0, 1], got {self.sat_alpha!r}")
        if not (_is_number(self.sat_time_scale) and self.sat_time_scale > 0):
            raise SatError(f"sat_time_scale must be a number > 0, got {self.sat_time_scale!r}")
        if not (_is_number(self.mix_p) and 0 <= self.mix_p <= 1):
            raise SatError(f"mix_p must be a probability in [0, 1], got {self.mix_p!r}")
        for name in ("gradnorm_lambda", "sgt_lambda"):
            v = getattr(self, name)
            if not (_is_number(v) and v >= 0):
                raise SatError(f"{name} must be a number >= 0, got {v!r}")
        if not (_is_number(self.sgt_fraction) and 0 < self.sgt_fraction < 1):
            raise SatError(f"sgt_fraction must be in (0, 1) (exclusive), got {self.sgt_fraction!r}")
        if self.sgt_fill not in SGT_FILLS:
            raise SatError(
                f"unknown sgt_fill {self.sgt_fill!r}; choose one of: {', '.join(SGT_FILLS)}"
            )

    def sat_p_random(self, epoch: float) -> float:
        """α^t with t = epoch * sat_time_scale: the probability that an element of the SAT
        perturbation is a random sign rather than ``-s`` (0.6 at epoch 10 by default)."""
        if not (_is_number(epoch) and epoch >= 0):
            raise SatError(f"epoch must be a number >= 0, got {epoch!r}")
        return float(self.sat_alpha ** (epoch * self.sat_time_scale))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerturbConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SatError(f"unknown perturbation setting(s) {', '.join(map(repr, unknown))}")
        return cls(**d)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- SAT (Eq. 9)


def _random_halfwords(shape: tuple[int, ...], generator: torch.Generator,
                      device: torch.device) -> torch.Tensor:
    """Uniformly random int16 of ``shape`` (every one of the 65,536 values equally likely),
    four per 64-bit draw of ``generator``: a quarter of the draws of ``torch.rand`` and no
    float conversion, which made the uniform draw half of SAT's extra cost per batch."""
    n = math.prod(shape)
    words = torch.empty(((n + 3) // 4,), dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # the full 64-bit range
    return words.view(torch.int16)[:n].view(shape)


# Resolution of p_random in sat_delta: the branch is decided by 15 random bits per element.
SAT_P_STEPS = 2**15


def sat_delta(
    s: torch.Tensor, *, p_random: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 per element: ``δ = z`` (a uniform random sign) with probability ``p_random``,
    else ``-s``.

    ``s``: tensor of any shape with values in {-1, 0, +1} (already broadcast to the image's
    shape), int8 or float; the arithmetic runs in its dtype, so int8 maps cost a quarter
    of the memory traffic. Returns ``(δ, from_random)``: ``δ`` has ``s``'s shape and dtype,
    values in {-1, 0, +1} (0 only where ``s`` is 0 and the element was not drawn random);
    ``from_random`` is a bool mask of the elements that took the random branch.

    Each element gets 16 random bits: the lowest is z's sign, the other 15 decide the branch,
    so the probability of the random branch is ``p_random`` rounded to a multiple of 2^-15
    (within 1.6e-5 of it; 0 and 1 exactly), and z is a fair coin independent of the branch.
    """
    if not (_is_number(p_random) and 0 <= p_random <= 1):
        raise SatError(f"p_random must be a probability in [0, 1], got {p_random!r}")
    bits = _random_halfwords(tuple(s.shape), generator, s.device)
    steps = round(p_random * SAT_P_STEPS)
    if steps >= SAT_P_STEPS:
        from_random = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    else:
        # bits + 2^15 is uniform on [0, 2^16); its upper 15 bits are below `steps` exactly
        # when bits < 2 * steps - 2^15 (an even bound, so the lowest bit plays no part).
        from_random = bits < 2 * steps - SAT_P_STEPS
    # With R = [random] and Z = the lowest bit, δ = R (2Z - 1) + (1 - R)(-s)
    # = R (2Z - 1 + s) - s: five vectorised ops in s's dtype (no torch.where, which costs
    # several times more on a CPU).
    rnd = from_random.view(torch.int8) if s.dtype == torch.int8 else from_random.to(s.dtype)
    z = bits.bitwise_and(1).to(s.dtype)
    delta = z.mul_(2).add_(s).sub_(1).mul_(rnd).sub_(s)
    return delta, from_random


def sat_perturb(
    x: torch.Tensor,
    smap: torch.Tensor,
    *,
    eps: float,
    p_random: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The SAT training input of Eq. 9 / Algorithm 1: ``clip(x + eps * δ, 0, 1)``.

    ``x``: float ``(B, C, H, W)`` in [0, 1]. ``smap``: ``(B, C|1, H, W)`` in {-1, 0, +1}
    (int8 or float; 1-channel maps broadcast over C). ``δ`` is drawn per element by
    :func:`sat_delta` in the map's own dtype; ternary zeros stay unperturbed unless drawn
    random. Returns a detached tensor of ``x``'s shape in [0, 1] with ``|x' - x|_inf <= eps``.
    """
    if not (_is_number(eps) and eps >= 0):
        raise SatError(f"SAT eps must be a number >= 0 in pixel units, got {eps!r}")
    check_generator(generator, x)
    s = expand_map(smap, x, keep_dtype=True)
    delta, _ = sat_delta(s, p_random=p_random, generator=generator)
    # x + eps * delta in one pass (eps * delta is exact for delta in {-1, 0, +1}, whatever
    # delta's dtype).
    return x.detach().add(delta, alpha=eps).clamp_(0.0, 1.0)


def select_maps(
    maps: list[torch.Tensor], x: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Per sample, one of ``maps`` chosen uniformly at random (the appendix's multi-map SAT).

    ``maps``: tensors ``(B, C|1, H, W)`` in {-1, 0, +1}; 1- and C-channel maps may be mixed
    (each is broadcast to ``x``'s shape first). Returns float ``(B, C, H, W)``.
    """
    full = [expand_map(m, x) for m in maps]
    pick = torch.randint(len(full), (x.shape[0],), generator=generator, device=x.device)
    out = full[0]
    for i in range(1, len(full)):
        out = torch.where((pick == i)[:, None, None, None], full[i], out)
    return out


# --------------------------------------------------------------------------- modes


MODES: Registry[type[TrainingMode]] = Registry("training mode")


def _register(name: str) -> Callable[[type[TrainingMode]], type[TrainingMode]]:
    def deco(cls: type[TrainingMode]) -> type[TrainingMode]:
        cls.name = name
        return MODES.register(name)(cls)

    return deco


class TrainingMode(abc.ABC):
    """How one training batch is perturbed and turned into a loss.

    ``needs_maps``: the mode reads cached saliency maps (and refuses to run without them);
    ``multi_map``: it accepts several maps at once.
    """

    name: ClassVar[str]
    needs_maps: ClassVar[bool] = False
    multi_map: ClassVar[bool] = False

    def __init__(self, cfg: PerturbConfig | None = None) -> None:
        self.cfg = PerturbConfig() if cfg is None else cfg

    def loss(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        maps: list[torch.Tensor] | None,
        *,
        epoch: float,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one batch.

        ``x`` float ``(B, C, H, W)`` in [0, 1]; ``y`` int64 ``(B,)``; ``maps`` a list of int8
        tensors ``(B, C|1, H, W)`` on ``x``'s device, one per cached map (ignored by modes
        without ``needs_maps``); ``epoch`` is t of the SAT schedule (0-based, fractions
        allowed); ``generator`` on ``x``'s device. The model is in train mode and is left so.
        Returns ``(loss, logits)``: a scalar to backpropagate and the float ``(B, classes)``
        logits of the inputs the loss scored (for TRADES, the clean/natural ones).
        """
        check_generator(generator, x)
        if not (_is_number(epoch) and epoch >= 0):
            raise SatError(f"epoch must be a number >= 0, got {epoch!r}")
        if isinstance(maps, torch.Tensor):
            maps = [maps]
        maps = list(maps or [])
        if self.needs_maps:
            if not maps:
                raise SatError(
                    f"training mode {self.name!r} needs a cached saliency map; none given"
                )
            if len(maps) > 1 and not self.multi_map:
                raise SatError(
                    f"training mode {self.name!r} takes one map, got {len(maps)}; use multi-sat"
                )
        return self.compute(model, x, y, maps, epoch=float(epoch), generator=generator)

    @abc.abstractmethod
    def compute(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        maps: list[torch.Tensor],
        *,
        epoch: float,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`loss` after its checks: ``maps`` is a (possibly empty) list."""

    # Shared pieces -----------------------------------------------------------------

    def _sat(self, x, maps, epoch, generator, smap=None) -> torch.Tensor:
        return sat_perturb(
            x,
            maps[0] if smap is None else smap,
            eps=self.cfg.sat_eps,
            p_random=self.cfg.sat_p_random(epoch),
            generator=generator,
        )

    def _pgd(self, model, x, y, generator) -> torch.Tensor:
        return pgd(
            model,
            x,
            y,
            eps=self.cfg.eps,
            steps=self.cfg.pgd_steps,
            step_size=self.cfg.pgd_step_size,
            random_start=True,
            generator=generator,
        )

    def _kl_attack(self, model, x, generator) -> torch.Tensor:
        with module_mode(model, False):
            return trades_kl_attack(
                model,
                x,
                eps=self.cfg.eps,
                steps=self.cfg.trades_steps,
                step_size=self.cfg.pgd_step_size,
                generator=generator,
            )

    def _sat_branch(self, x, generator) -> bool:
        coin = torch.rand((1,), generator=generator, device=x.device)
        return bool(coin.item() < self.cfg.mix_p)


class _CEMode(TrainingMode):
    """Cross-entropy on one perturbed input, produced by :meth:`perturb`."""

    @abc.abstractmethod
    def perturb(self, model, x, y, maps, epoch, generator) -> torch.Tensor: ...

    def compute(self, model, x, y, maps, *, epoch, generator):
        x_in = self.perturb(model, x, y, maps, epoch, generator)
        logits = model(x_in)
        return F.cross_entropy(logits.float(), y), logits


class _TradesMode(TrainingMode):
    """TRADES loss ``CE(f(x_nat), y) + beta * KL(f(x_nat) || f(x_adv))`` (batch mean) on the
    pair from :meth:`pair`."""

    @abc.abstractmethod
    def pair(self, model, x, y, maps, epoch, generator) -> tuple[torch.Tensor, torch.Tensor]: ...

    def compute(self, model, x, y, maps, *, epoch, generator):
        x_nat, x_adv = self.pair(model, x, y, maps, epoch, generator)
        # Two forwards, as in the official code, so BatchNorm sees clean and adversarial
        # batches separately.
        logits_nat = model(x_nat)
        return ce_plus_kl(logits_nat, model(x_adv), y, self.cfg.trades_beta), logits_nat



def ce_plus_kl(logits: torch.Tensor, logits_other: torch.Tensor, y: torch.Tensor,
               weight: float) -> torch.Tensor:
    """CE(f(x), y) + weight · KL(f(x) ‖ f(x')), batch means, in float32: TRADES' loss, and
    saliency-guided training's with x' the masked input. logits: (B, K) of x; logits_other:
    (B, K) of x'; y: int64 (B,)."""
    kl = F.kl_div(F.log_softmax(logits_other.float(), dim=1), F.softmax(logits.float(), dim=1),
                  reduction="batchmean")
    return F.cross_entropy(logits.float(), y) + weight * kl

@_register("standard")
class Standard(_CEMode):
    """Plain training on the clean batch (the paper's "Original")."""

    def perturb(self, model, x, y, maps, epoch, generator):
        return x


@_register("uniform")
class Uniform(_CEMode):
    """Original + uniform noise U[-uniform_eps, uniform_eps], clipped to [0, 1]."""

    def perturb(self, model, x, y, maps, epoch, generator):
        return uniform_noise(x, self.cfg.uniform_eps, generator)


@_register("sat")
class SAT(_CEMode):
    """Saliency-based adversarial training (Eq. 9, Algorithm 1) with one cached map."""

    needs_maps = True

    def perturb(self, model, x, y, maps, epoch, generator):
        return self._sat(x, maps, epoch, generator)


@_register("multi-sat")
class MultiSAT(_CEMode):
    """SAT where each sample uses one of the given maps, picked uniformly (Table 8)."""

    needs_maps = True
    multi_map = True

    def perturb(self, model, x, y, maps, epoch, generator):
        return self._sat(x, maps, epoch, generator, smap=select_maps(maps, x, generator))


@_register("pgd")
class PGDAT(_CEMode):
    """PGD adversarial training: ``pgd_steps`` steps of ``pgd_step_size``, random start."""

    def perturb(self, model, x, y, maps, epoch, generator):
        return self._pgd(model, x, y, generator)


@_register("pgd+uniform")
class PGDUniform(_CEMode):
    """Uniform noise on the clean batch, then PGD-AT in the ball around the noisy batch."""

    def perturb(self, model, x, y, maps, epoch, generator):
        return self._pgd(model, uniform_noise(x, self.cfg.uniform_eps, generator), y, generator)


@_register("pgd-sat")
class PGDSAT(_CEMode):
    """Per batch, the SAT perturbation (projected onto the eps ball) with probability mix_p,
    else a PGD-AT example."""

    needs_maps = True

    def perturb(self, model, x, y, maps, epoch, generator):
        if self._sat_branch(x, generator):
            return project(self._sat(x, maps, epoch, generator), x, self.cfg.eps)
        return self._pgd(model, x, y, generator)


@_register("fgsm-rs")
class FGSMRS(_CEMode):
    """FGSM with a random start (Wong et al. 2020, "Fast is better than free"): a uniform
    start in the eps ball, one signed step of ``fgsm_rs_alpha``, projected (one-step PGD)."""

    def perturb(self, model, x, y, maps, epoch, generator):
        return pgd(
            model,
            x,
            y,
            eps=self.cfg.eps,
            steps=1,
            step_size=self.cfg.fgsm_rs_alpha,
            random_start=True,
            generator=generator,
        )


@_register("trades")
class TRADES(_TradesMode):
    """TRADES (Zhang et al. 2019) with beta = trades_beta."""

    def pair(self, model, x, y, maps, epoch, generator):
        return x, self._kl_attack(model, x, generator)


@_register("trades+uniform")
class TRADESUniform(_TradesMode):
    """Uniform noise on the clean batch, then TRADES with the noisy batch as natural input."""

    def pair(self, model, x, y, maps, epoch, generator):
        xu = uniform_noise(x, self.cfg.uniform_eps, generator)
        return xu, self._kl_attack(model, xu, generator)


@_register("trades-sat")
class TRADESSAT(_TradesMode):
    """Per batch, x' from SAT (projected onto the eps ball) with probability mix_p, else from
    the TRADES KL attack; the loss is TRADES' in both cases."""

    needs_maps = True

    def pair(self, model, x, y, maps, epoch, generator):
        if self._sat_branch(x, generator):
            return x, project(self._sat(x, maps, epoch, generator), x, self.cfg.eps)
        return x, self._kl_attack(model, x, generator)


def create_mode(name: str, cfg: PerturbConfig | None = None) -> TrainingMode:
    """The training mode registered as ``name`` (see :func:`list_modes`), built with ``cfg``."""
    return MODES.get(name)(PerturbConfig() if cfg is None else cfg)


def list_modes() -> list[str]:
    """Names of all registered training modes, sorted."""
    return MODES.names()


# The regularised modes register themselves in MODES; importing them here means every user
# of the registry (create_mode, list_modes, the CLI) sees them. Import at the end: they
# subclass TrainingMode, defined above.
from trainer import regularizers as _regularizers  # noqa: E402,F401
