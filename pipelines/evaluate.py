"""Stage 3: attack a trained model and write ``results.json`` plus a markdown table.

Every attack runs in [0, 1] pixel space with the model in eval mode, batch by batch, with a
generator seeded from the config, so the same checkpoint and config give the same numbers.
"""

from __future__ import annotations

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
    alignment: bool = True  # report Etmann et al.'s alignment
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
        if not Path(self.checkpoint).is_file():
            raise SatError(f"checkpoint not found: {self.checkpoint}")
        if any(a.startswith("saliency-map") for a in self.attacks) and not self.map:
            raise SatError("the saliency-map attack needs --map (and --store)")
        if self.map and self.store is None:
            raise SatError(f"--map {self.map} reads a cached map from a store; give --store")
        check_out_dir(self.out_dir())

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


def _accuracy(model, x, y) -> int:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum().item())


def run(cfg: EvalConfig) -> dict[str, Any]:
    from trainer.attacks import parse_attack
    from trainer.attacks.metrics import alignment
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
    model.eval()
    t0 = time.perf_counter()

    plan: list[tuple[str, float]] = [("clean", 0.0)]
    for spec in cfg.attacks:
        budgets = cfg.uniform_eps if spec == "uniform" else cfg.eps
        plan += [(spec, e) for e in budgets]
    correct = {key: 0 for key in plan}
    align_sum = 0.0
    bar = tqdm(total=len(plan) * math.ceil(n / cfg.batch_size), desc="eval",
               disable=not cfg.show_progress, unit="batch")
    attacks = {spec: parse_attack(spec) for spec in cfg.attacks}
    for bi, s in enumerate(range(0, n, cfg.batch_size)):
        x = images[s : s + cfg.batch_size].to(device).float().div_(255.0)
        y = labels[s : s + cfg.batch_size].to(device)
        m = maps[s : s + cfg.batch_size].to(device) if maps is not None else None
        for spec, eps in plan:
            if spec == "clean":
                correct[(spec, eps)] += _accuracy(model, x, y)
            else:
                gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + bi)
                xa = attacks[spec](model, x, y, eps=eps / 255.0, generator=gen, maps=m)
                correct[(spec, eps)] += _accuracy(model, xa, y)
            bar.update(1)
        if cfg.alignment:
            align_sum += float(alignment(model, x, y).sum().item())
    bar.close()

    results: dict[str, Any] = {"clean": correct[("clean", 0.0)] / n, "attacks": {}}
    for (spec, eps), c in correct.items():
        if spec != "clean":
            results["attacks"].setdefault(spec, {})[_eps_key(eps)] = c / n
    if cfg.alignment:
        results["alignment"] = align_sum / n
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


def _eps_key(eps: float) -> str:
    return f"{eps:g}"


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
    if not prov:
        return base
    maps = " + ".join(map_label(p) for p in prov.values())
    if mode in ("sat", "multi-sat"):
        return maps
    return f"{base} ({maps})"
