"""Attacks and evaluation: primitives in [0, 1] pixel space, the registered evaluation attacks,
and the metrics computed beside them.

- :mod:`trainer.attacks.primitives`: FGSM, PGD, the TRADES KL attack, uniform noise, the
  saliency attack, and the gradient helpers; the training modes reuse them.
- :mod:`trainer.attacks.registry`: ``ATTACKS``, :func:`parse_attack` (``pgd20``, ...).
- :mod:`trainer.attacks.metrics`: correct counts and the image-gradient alignment forms.
- :mod:`trainer.attacks.boundary`: distance to the decision boundary by FAB.
- :mod:`trainer.attacks.evaluate`: the one evaluation loop (``sat eval`` and the tests).
"""

from trainer.attacks.primitives import (
    AMP_GRAD_SCALE,
    LOSSES,
    check_generator,
    expand_map,
    fgsm,
    input_grad,
    per_sample_loss,
    pgd,
    project,
    saliency_attack,
    saliency_attack_from_map,
    trades_kl_attack,
    true_logit_grad,
    uniform_noise,
)
from trainer.attacks.registry import (
    ATTACKS,
    Attack,
    AutoAttackAttack,
    FGSMAttack,
    PGDAttack,
    SaliencyAttack,
    TradesAttack,
    UniformAttack,
    list_attacks,
    parse_attack,
)

__all__ = [
    "AMP_GRAD_SCALE",
    "ATTACKS",
    "LOSSES",
    "Attack",
    "AutoAttackAttack",
    "FGSMAttack",
    "PGDAttack",
    "SaliencyAttack",
    "TradesAttack",
    "UniformAttack",
    "check_generator",
    "expand_map",
    "fgsm",
    "input_grad",
    "list_attacks",
    "parse_attack",
    "per_sample_loss",
    "pgd",
    "project",
    "saliency_attack",
    "saliency_attack_from_map",
    "trades_kl_attack",
    "true_logit_grad",
    "uniform_noise",
]
