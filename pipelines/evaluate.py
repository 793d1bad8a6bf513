"""Stage 3: attack a trained model and write ``results.json`` plus a markdown table.

Every attack runs in [0, 1] pixel space with the model in eval mode, batch by batch, with a
generator seeded from the config (the loop is :func:`trainer.attacks.evaluate.evaluate`), so
the same checkpoint and config give the same numbers.

``results.json`` holds the run's identity (checkpoint, arch, split, fingerprint, label,
mode, config, git SHA) and under ``"results"``:

- ``clean``: clean accuracy in [0, 1]; ``attacks``: ``{spec: {eps: accuracy}}`` with ``eps``
  in /255 units written ``f"{eps:g}"`` (``"pgd5": {"1": 0.41, ...}``);
- ``alignment`` (unless ``--no-alignment``): the mean logit projection
  ``|<x, ∇Φ^y>| / ||∇Φ^y||``, the number reported before the forms below existed;
- ``alignments``: ``{form: {"mean": ..., "median": ...}}`` over the evaluated images for
  ``logit_projection``, ``logit_cosine``, ``margin_projection`` (Etmann et al.'s alignment,
  of the binarised logit Ψ = Φ^y - max_{j≠y} Φ^j) and ``margin_cosine``; the definitions,
  and why the projection forms scale with ||x||, are in :mod:`trainer.attacks.metrics`;
- ``boundary`` (unless ``--no-boundary``): the distance to the decision boundary found by
  FAB (:mod:`trainer.attacks.boundary`), on the first ``boundary_samples`` images:
  ``{"attack": "fab", "steps": k, "n": images, "l2": S, "linf": S}`` where each ``S`` is
  ``{"median", "median_correct", "not_found", "misclassified"}``: the median distance in
  [0, 1] pixel units over all images, misclassified ones at 0 and not-found ones counted as
  infinitely far (null when at least half were not found; Etmann et al.'s robustness
  measure), the same median over the correctly classified images only, and the fractions of
  images without an adversarial example and already misclassified.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines.common import DataSpec, check_out_dir, config_dict, git_sha, write_json
from saliency_cache.errors import MismatchError, SatError

DEFAULT_ATTACKS = ("pgd5", "pgd20", "pgd40", "uniform", "trades", "saliency")


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str  # a run's checkpoints/best.safetensors (or last, or a teacher)
    out: str | None = None  # output directory (default: <run dir>/eval)
    attacks: tuple[str, ...] = DEFAULT_ATTACKS  # attack specs, see trainer.attacks.parse_attack
    eps: tuple[float, ...] = (1, 2, 3, 4)  # l_inf budgets in /255 units
    uniform_eps: tuple[float, ...] = (8, 16, 32)  # budgets of the uniform-noise attack, /255
    store: str | None = None  # evaluate on a store's split ...
    data: DataSpec | None = None  # ... or on a dataset split
    split: str = "val"
    map: str | None = None  # cached map for the "saliency-map" attack
    max_samples: int | None = None  # evaluate the first N samples only
    batch_size: int = 256
    alignment: bool = True  # report Etmann et al.'s alignment (all forms)
    boundary: bool = True  # measure the distance to the boundary with FAB (slow on CPU)
    boundary_samples: int | None = 100  # ... on the first N evaluated images (None: all)
    boundary_steps: int = 20  # FAB iterations (each: one input gradient per class)
    expect_arch: str | None = None  # refuse a checkpoint of another architecture
    device: str = "cpu"
    seed: int = 0
    show_progress: bool = True
    storage_options: dict[str, Any] | None = None  # fsspec options of a remote store

    def __post_init__(self) -> None:
        from trainer.attacks import parse_attack

        if (self.store is None) == (self.data is None):
            raise SatError("give exactly one of --store or --dataset to evaluate on")
        # Results are keyed by (attack, eps): a repeated name or budget would be counted twice.
        # "pgd" is PGD-5, filed under "pgd5" so it lands in the report's Table 1.
        specs = (str(a).strip().lower() for a in self.attacks)
        object.__setattr__(
            self, "attacks", tuple(dict.fromkeys("pgd5" if a == "pgd" else a for a in specs))
        )
        if not self.attacks:
            raise SatError("no attacks given")
        for a in self.attacks:
            parse_attack(a)  # raises SatError for unknown names
        for e in (*self.eps, *self.uniform_eps):
            if not (isinstance(e, (int, float)) and math.isfinite(e) and e >= 0):
                raise SatError(f"epsilon must be a finite number >= 0 (in /255 units), got {e}")
            if e > 255:
                raise SatError(f"epsilon {e}/255 exceeds the pixel range")
        object.__setattr__(self, "eps", tuple(dict.fromkeys(float(e) for e in self.eps)))
        object.__setattr__(
            self, "uniform_eps", tuple(dict.fromkeys(float(e) for e in self.uniform_eps))
        )
        if "uniform" in self.attacks and not self.uniform_eps:
            raise SatError("the uniform attack needs at least one budget (--uniform-eps)")
        if any(a != "uniform" for a in self.attacks) and not self.eps:
            raise SatError("no attack budgets given (--eps)")
        if self.batch_size < 1:
            raise SatError(f"batch size must be >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise SatError(f"max samples must be >= 1, got {self.max_samples}")
        self.boundary_spec()  # raises SatError for bad boundary settings
        if self.boundary and importlib.util.find_spec("torchattacks") is None:
            raise SatError("the boundary distance needs torchattacks: pip install "
                           "'sat-pipeline[autoattack]', or pass --no-boundary")
        if not Path(self.checkpoint).is_file():
            raise SatError(f"checkpoint not found: {self.checkpoint}")
        if any(a.startswith("saliency-map") for a in self.attacks) and not self.map:
            raise SatError("the saliency-map attack needs --map (and --store)")
        if self.map and self.store is None:
            raise SatError(f"--map {self.map} reads a cached map from a store; give --store")
        check_out_dir(self.out_dir())

    def boundary_spec(self):
        """The :class:`trainer.attacks.evaluate.BoundarySpec` to measure, or None."""
        from trainer.attacks.evaluate import BoundarySpec

        if not self.boundary:
            return None
        return BoundarySpec(steps=self.boundary_steps, max_samples=self.boundary_samples)

    def out_dir(self) -> Path:
        """``out``, or ``<run dir>/eval`` for a checkpoint in ``<run dir>/checkpoints/``."""
        if self.out:
            return Path(self.out)
        run_dir = Path(self.checkpoint).resolve().parent
        if run_dir.name == "checkpoints":
            run_dir = run_dir.parent
        return run_dir / "eval"


def _eval_arrays(cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """uint8 images, labels and (optionally) int8 maps of the evaluation split, plus its identity."""
    stop = None
    if cfg.store is not None:
        from saliency_cache.store import SaliencyStore

        split = SaliencyStore.open(cfg.store, "r", storage_options=cfg.storage_options).split(cfg.split)
        stop = split.n if cfg.max_samples is None else min(split.n, cfg.max_samples)
        if not split.has_images():
            raise SatError(f"split {cfg.split!r} of {cfg.store} holds no images; evaluate with --dataset")
        images = split.read_images(0, stop)
        labels = np.asarray(split.labels())[:stop]
        maps = None
        if cfg.map:
            maps = torch.from_numpy(split.open_map(cfg.map).read(0, stop))
        ident = {"store": cfg.store, "split": cfg.split, "fingerprint": split.fingerprint,
                 "num_classes": split.num_classes}
    else:
        ds = cfg.data.open(cfg.split)
        stop = len(ds) if cfg.max_samples is None else min(len(ds), cfg.max_samples)
        images = ds.load_images(0, stop)
        labels = np.asarray(ds.labels())[:stop]
        maps = None
        ident = {"dataset": ds.describe(), "split": cfg.split, "fingerprint": ds.fingerprint(),
                 "num_classes": ds.num_classes}
    return (torch.from_numpy(np.ascontiguousarray(images)),
            torch.from_numpy(np.asarray(labels, dtype=np.int64)), maps, ident)


def run(cfg: EvalConfig) -> dict[str, Any]:
    from trainer.attacks import parse_attack
    from trainer.attacks.evaluate import evaluate, steps_of
    from trainer.checkpoint import load_model

    device = torch.device(cfg.device)
    model, ckpt = load_model(cfg.checkpoint, device)
    arch = ckpt.arch
    if cfg.expect_arch and arch.get("name") != cfg.expect_arch:
        raise MismatchError(
            f"checkpoint {cfg.checkpoint} is a {arch.get('name')}, expected {cfg.expect_arch}"
        )
    images, labels, maps, ident = _eval_arrays(cfg)
    if arch.get("num_classes") != ident["num_classes"]:
        raise MismatchError(
            f"checkpoint {cfg.checkpoint} predicts {arch.get('num_classes')} classes, the "
            f"evaluation split has {ident['num_classes']}"
        )
    if images.shape[1] != arch.get("in_channels", images.shape[1]):
        raise MismatchError(f"checkpoint expects {arch.get('in_channels')} channels, images have {images.shape[1]}")
    out = cfg.out_dir()
    n = labels.numel()
    t0 = time.perf_counter()
    attacks = {spec: parse_attack(spec) for spec in cfg.attacks}
    budgets = {spec: cfg.uniform_eps if spec == "uniform" else cfg.eps for spec in cfg.attacks}
    boundary = cfg.boundary_spec()
    plan_len = sum(len(b) for b in budgets.values())
    bar = tqdm(total=steps_of(n, cfg.batch_size, plan_len, boundary), desc="eval",
               disable=not cfg.show_progress, unit="batch")
    results = evaluate(
        model, images, labels, attacks=attacks, budgets=budgets, maps=maps,
        batch_size=cfg.batch_size, device=device, seed=cfg.seed, alignment=cfg.alignment,
        boundary=boundary, on_step=lambda: bar.update(1),
    )
    bar.close()
    del results["n"]
    train_cfg = ckpt.config or {}
    summary = {
        "checkpoint": str(cfg.checkpoint), "arch": arch, "n": n, **ident,
        "results": results, "seconds": time.perf_counter() - t0,
        "label": run_label(train_cfg, ckpt.extra),
        "mode": ckpt.extra.get("mode", train_cfg.get("mode")),
        "attack_params": {spec: atk.params() for spec, atk in attacks.items()},
        "config": config_dict(cfg), "git_sha": git_sha(),
    }
    write_json(out / "results.json", summary)
    (out / "results.md").write_text(results_markdown(summary))
    return summary


def results_markdown(summary: dict[str, Any]) -> str:
    res = summary["results"]
    lines = [
        f"# Evaluation of {summary['label']}",
        "",
        f"checkpoint `{summary['checkpoint']}`, {summary['n']} samples of split `{summary['split']}`",
        "",
        f"clean accuracy: **{100 * res['clean']:.2f} %**"
        + (f"; alignment: {res['alignment']:.4f}" if "alignment" in res else ""),
        "",
        "| attack | ε | accuracy (%) |",
        "| --- | --- | --- |",
    ]
    for spec, by_eps in res["attacks"].items():
        for eps, acc in by_eps.items():
            lines.append(f"| {spec} | {eps}/255 | {100 * acc:.2f} |")
    if "alignments" in res:
        lines += ["", "| alignment form | mean | median |", "| --- | --- | --- |"]
        lines += [f"| {f} | {v['mean']:.4f} | {v['median']:.4f} |"
                  for f, v in res["alignments"].items()]
    if "boundary" in res:
        b = res["boundary"]
        lines += ["", f"boundary distance (FAB, {b['steps']} steps, {b['n']} images, pixel units):",
                  "", "| norm | median | median (correct only) | not found (%) |", "| --- | --- | --- | --- |"]
        for norm in ("l2", "linf"):
            if norm in b:
                d = b[norm]
                med = "–" if d["median"] is None else f"{d['median']:.4f}"
                found = "–" if d["median_correct"] is None else f"{d['median_correct']:.4f}"
                lines.append(f"| {norm} | {med} | {found} | {100 * d['not_found']:.1f} |")
    return "\n".join(lines) + "\n"


# Paper naming (Section 4.1): X - Y - Z = teacher, its training mode, saliency method.
_ARCH_NAMES = {"resnet10": "Resnet-10", "resnet34": "Resnet-34", "resnet18": "Resnet-18"}
_TMODE_NAMES = {"standard": "Std.", "adversarial": "Adv.", "sparse": "Sparse"}
# The paper's "G.CAM++" rows are Grad-CAM++ *boxes* (Sec. 4.1: "bounding boxes obtained from
# GradCAM++"), so the box method takes that name and the thresholded heatmap is told apart.
_METHOD_NAMES = {
    "gbp": "GBP", "gradcam++": "G.CAM++ heatmap", "gradcam++-box": "G.CAM++", "gradcam": "G.CAM",
    "smoothgrad": "S.Grad", "ig": "I.Grad", "guided-gradcam++": "G.G.CAM++", "gradient": "Grad",
}
_MODE_NAMES = {
    "standard": "Original", "uniform": "Original + Uniform-Noise", "sat": "SAT", "pgd": "PGD",
    "trades": "TRADES", "pgd+uniform": "PGD + Uniform-Noise", "trades+uniform": "TRADES + Uniform-Noise",
    "pgd-sat": "PGD-SAT", "trades-sat": "TRADES-SAT", "multi-sat": "SAT", "fgsm-rs": "FGSM-RS",
    "gradnorm": "GradNorm", "sgt": "SGT",
}


def map_label(prov: dict[str, Any]) -> str:
    """``Resnet-10 — Adv. — GBP`` for teacher maps, ``Bounding Boxes`` / ``Masks`` for weak maps."""
    src = prov.get("source")
    if src == "box":
        return "Bounding Boxes"
    if src == "mask":
        return "Segmentation Masks"
    arch = _ARCH_NAMES.get(str(prov.get("teacher_arch")), str(prov.get("teacher_arch")))
    tmode = _TMODE_NAMES.get(str(prov.get("teacher_mode")), str(prov.get("teacher_mode")))
    method = _METHOD_NAMES.get(str(prov.get("method")), str(prov.get("method")))
    return f"{arch} — {tmode} — {method}"


def run_label(train_cfg: dict[str, Any], extra: dict[str, Any]) -> str:
    """A row name in the paper's convention, read from the run's recorded provenance."""
    mode = extra.get("mode") or train_cfg.get("mode")
    if train_cfg.get("stage") == "teacher":
        return f"Teacher {train_cfg.get('arch')} ({train_cfg.get('mode')})"
    prov = extra.get("map_provenance") or train_cfg.get("map_provenance") or {}
    base = _MODE_NAMES.get(str(mode), str(mode))
    perturb = train_cfg.get("perturb") or {}
    if mode == "gradnorm" and "gradnorm_lambda" in perturb:
        base = f"{base} (λ={perturb['gradnorm_lambda']:g})"
    elif mode == "sgt" and "sgt_fraction" in perturb:
        base = f"{base} (k={perturb['sgt_fraction']:g}, λ={perturb['sgt_lambda']:g})"
    if not prov:
        return base
    maps = " + ".join(map_label(p) for p in prov.values())
    if mode in ("sat", "multi-sat"):
        return maps
    return f"{base} ({maps})"
