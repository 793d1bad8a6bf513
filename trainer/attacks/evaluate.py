"""The one evaluation loop: clean accuracy, accuracy under each attack and budget, the
alignment forms and the boundary distance, over a split held in memory.

Used by ``sat eval`` (:mod:`pipelines.evaluate`) and by the tests. Seeding: batch ``bi``
(0-based) of every attack draws from a fresh generator seeded ``seed * 7919 + bi``, so a
result does not depend on which other attacks ran, and the same checkpoint, data, batch size
and seed give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saliency_cache.errors import SatError
from trainer.attacks.boundary import NORMS, min_norm_distance, summarise
from trainer.attacks.metrics import ALIGNMENT_FORMS, alignment_forms, num_correct
from trainer.attacks.registry import Attack, parse_attack
from trainer.modules import module_mode


@dataclass(frozen=True)
class BoundarySpec:
    """Which boundary distances to measure: FAB with ``steps`` iterations, in each of
    ``norms``, on the first ``max_samples`` images (None: all)."""

    norms: tuple[str, ...] = NORMS
    steps: int = 20
    max_samples: int | None = 100

    def __post_init__(self) -> None:
        for n in self.norms:
            if n not in NORMS:
                raise SatError(f"unknown boundary norm {n!r}; choose one of: {', '.join(NORMS)}")
        if not self.norms:
            raise SatError("no boundary norms given")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SatError(f"boundary attack steps must be an integer >= 1, got {self.steps!r}")
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int)
            or self.max_samples < 1
        ):
            raise SatError(f"boundary samples must be an integer >= 1, got {self.max_samples!r}")


def batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    """The generator of batch ``batch_index`` (see the module docstring)."""
    return torch.Generator(device=device).manual_seed(seed * 7919 + batch_index)


def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    attacks: dict[str, Attack | str] | None = None,
    budgets: dict[str, tuple[float, ...]] | None = None,
    maps: torch.Tensor | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    alignment: bool = True,
    boundary: BoundarySpec | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``images`` / ``labels`` batch by batch.

    ``images``: uint8 (divided by 255) or float in [0, 1], ``(N, C, H, W)``; ``labels`` int
    ``(N,)``; ``maps`` int8 ``(N, C|1, H, W)`` for attacks that need a cached map. Batches
    are moved to ``device``. ``attacks`` maps a result name to an attack (or spec);
    ``budgets[name]`` are its budgets in /255 units. The model runs in eval mode and every
    submodule gets its previous mode back. ``on_step`` is called after each (batch, attack,
    budget) step (clean counts as one) and each boundary batch (a progress bar).

    Returns ``{"n", "clean", "attacks": {name: {eps: accuracy}}}`` (accuracies in [0, 1],
    ``eps`` keys as ``f"{eps:g}"``), plus, with ``alignment``, ``"alignment"`` (mean logit
    projection, accumulated as before in float32 per batch) and ``"alignments"``
    (``{form: {"mean", "median"}}`` for each of :data:`ALIGNMENT_FORMS`), and with
    ``boundary``, ``"boundary"``: ``{"attack": "fab", "steps", "n", norm: summary}`` with
    the summary of :func:`trainer.attacks.boundary.summarise` per norm.
    """
    device = torch.device(device)
    attacks = {k: parse_attack(a) if isinstance(a, str) else a for k, a in (attacks or {}).items()}
    n = int(labels.numel())
    if n == 0:
        raise SatError("no samples to evaluate")
    if batch_size < 1:
        raise SatError(f"batch size must be >= 1, got {batch_size}")
    plan = [(name, float(e)) for name in attacks for e in (budgets or {}).get(name, ())]
    b_n = 0 if boundary is None else min(n, boundary.max_samples or n)
    tally = _Tally(plan, boundary.norms if boundary else ())
    step = on_step or (lambda: None)
    with module_mode(model, False):  # eval mode, each submodule's flag restored after
        for bi, s in enumerate(range(0, n, batch_size)):
            x = images[s : s + batch_size].to(device)
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            y = labels[s : s + batch_size].to(device).long()
            m = maps[s : s + batch_size].to(device) if maps is not None else None
            tally.clean += _correct(model, x, y)
            step()
            for name, eps in plan:
                gen = batch_generator(seed, bi, device)
                xa = attacks[name](model, x, y, eps=eps / 255.0, generator=gen, maps=m)
                tally.correct[(name, eps)] += _correct(model, xa, y)
                step()
            if alignment:
                tally.add_alignment(alignment_forms(model, x, y), x.dtype)
            if s < b_n:
                take = min(b_n - s, y.numel())
                for norm in tally.dists:
                    d = min_norm_distance(model, x[:take], y[:take], norm=norm,
                                          steps=boundary.steps,
                                          generator=batch_generator(seed, bi, device))
                    tally.dists[norm].append(d.cpu().numpy())
                step()
    res = tally.result(n, alignment)
    if boundary is not None:
        res["boundary"] = {"attack": "fab", "steps": boundary.steps, "n": b_n,
                           **{nm: summarise(np.concatenate(d)) for nm, d in tally.dists.items()}}
    return res


class _Tally:
    """Running sums of :func:`evaluate`: correct counts, alignment values, distances."""

    def __init__(self, plan: list[tuple[str, float]], norms: tuple[str, ...]) -> None:
        self.correct = {key: 0 for key in plan}
        self.clean = 0
        self.align_sum = 0.0
        self.forms: dict[str, list[np.ndarray]] = {f: [] for f in ALIGNMENT_FORMS}
        self.dists: dict[str, list[np.ndarray]] = {nm: [] for nm in norms}

    def add_alignment(self, per: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        # As the stage always did: the per-sample values in the input's dtype, summed per batch.
        self.align_sum += float(per["logit_projection"].to(dtype).sum().item())
        for f in ALIGNMENT_FORMS:
            self.forms[f].append(per[f].cpu().numpy())

    def result(self, n: int, alignment: bool) -> dict[str, Any]:
        res: dict[str, Any] = {"n": n, "clean": self.clean / n, "attacks": {}}
        for (name, eps), c in self.correct.items():
            res["attacks"].setdefault(name, {})[f"{eps:g}"] = c / n
        if alignment:
            res["alignment"] = self.align_sum / n
            res["alignments"] = {
                f: {"mean": float(np.mean(v)), "median": float(np.median(v))}
                for f, v in ((f, np.concatenate(self.forms[f])) for f in ALIGNMENT_FORMS)
            }
        return res


def steps_of(n: int, batch_size: int, plan_len: int, boundary: BoundarySpec | None) -> int:
    """Number of ``on_step`` calls :func:`evaluate` makes (the length of a progress bar)."""
    total = (plan_len + 1) * math.ceil(n / batch_size)
    if boundary is not None:
        total += math.ceil(min(n, boundary.max_samples or n) / batch_size)
    return total


def _correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return num_correct(model(x), y)
