"""Stage 0: train a teacher (standard, PGD-adversarial or 95 %-sparse) whose saliency gets cached.

Output directory::

    teacher.safetensors   the exported model (plain weights; sparse teachers hold real zeros)
    teacher.json          config, metrics, sparsity, data fingerprint, sha256 of the weights
    metrics.jsonl         one row per epoch (all phases), checkpoints/ of the loop
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.common import DataSpec, config_dict, git_sha, write_json
from saliency_cache.errors import SatError
from saliency_cache.store import TEACHER_MODES
from trainer.batches import ArraySource
from trainer.checkpoint import Checkpoint, save_checkpoint
from trainer.loop import LoopConfig, fit


@dataclass(frozen=True)
class TeacherConfig:
    data: DataSpec
    out: str  # output directory
    arch: str = "resnet10"  # a name from trainer.models.list_models()
    width: int = 64  # channel width multiplier of the first stage
    mode: str = "standard"  # standard | adversarial (PGD-5, 8/255) | sparse (95 % zeros)
    loop: LoopConfig = field(default_factory=LoopConfig)
    batch_size: int = 128
    sparsity: float = 0.95  # target fraction of zero weights (sparse mode)
    prune_steps: int = 3  # gradual pruning: prune, fine-tune, repeat
    finetune_epochs: int = 1  # fine-tuning epochs after each pruning step
    val_split: str | None = "val"  # evaluated every epoch; None to skip
    device: str = "cpu"
    resume: bool = False  # continue a killed run: each phase from its last.safetensors

    def __post_init__(self) -> None:
        from trainer.models import list_models

        if self.arch not in list_models():
            raise SatError(f"unknown architecture {self.arch!r}; choose one of: {', '.join(list_models())}")
        if self.mode not in TEACHER_MODES:
            raise SatError(f"unknown teacher mode {self.mode!r}; choose one of: {', '.join(TEACHER_MODES)}")
        if self.width < 1:
            raise SatError(f"width must be >= 1, got {self.width}")
        if not 0.0 < self.sparsity < 1.0:
            raise SatError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.batch_size < 1:
            raise SatError(f"batch size must be >= 1, got {self.batch_size}")
        if self.prune_steps < 1 or self.finetune_epochs < 1:
            raise SatError("prune_steps and finetune_epochs must be >= 1")


# Settings a --resume must keep (the teacher's phases build on each other); epochs may grow.
RESUME_MATCH = ("mode", "data", "batch_size", "sparsity", "prune_steps", "finetune_epochs",
                "loop.seed", "loop.optimizer", "loop.lr", "loop.schedule", "loop.weight_decay")


def load_split_arrays(data: DataSpec, split: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Open a split and load it whole as (dataset, uint8 images (N,C,H,W), int64 labels)."""
    ds = data.open(split)
    images = torch.from_numpy(np.ascontiguousarray(ds.load_images(0, len(ds))))
    labels = torch.from_numpy(np.asarray(ds.labels(), dtype=np.int64))
    return ds, images, labels


def run(cfg: TeacherConfig) -> dict[str, Any]:
    from trainer.models import create_model
    from trainer.perturb import PerturbConfig, create_mode
    from trainer.prune import make_permanent, prune_global, prune_schedule, sparsity

    # No mkdir here: the loop creates the run directory once the data has loaded and a
    # --resume is accepted, so a run refused on bad data leaves no empty --out behind.
    out = Path(cfg.out)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.loop.seed)  # model initialisation
    train_ds, images, labels = load_split_arrays(cfg.data, "train")
    train = ArraySource(images, labels, batch_size=cfg.batch_size, shuffle=True, seed=cfg.loop.seed)
    val = None
    if cfg.val_split:
        _, vi, vl = load_split_arrays(cfg.data, cfg.val_split)
        val = ArraySource(vi, vl, batch_size=max(cfg.batch_size, 256), shuffle=False)
    model = create_model(
        cfg.arch, train_ds.num_classes, width=cfg.width, in_channels=train_ds.image_shape[0]
    ).to(device)
    mode = create_mode("pgd" if cfg.mode == "adversarial" else "standard", PerturbConfig())
    run_config = {"stage": "teacher", **config_dict(cfg), "git_sha": git_sha()}
    # With --resume each phase continues from its own last checkpoint, or is skipped when that
    # checkpoint is complete. Once a phase trains, the checkpoints of later phases belong to
    # an older model, so those phases start afresh.
    resume = cfg.resume
    row, trained = _phase(model, mode, train, val, cfg.loop, out, device, resume=resume,
                          run_config=run_config)
    resume = resume and not trained
    rows = [row]

    achieved = None
    if cfg.mode == "sparse":
        ft_loop = LoopConfig(**{**config_dict(cfg.loop), "epochs": cfg.finetune_epochs})
        for step, amount in enumerate(prune_schedule(cfg.sparsity, cfg.prune_steps)):
            prune_global(model, amount)  # deterministic masks: a resumed phase gets the same
            phase_dir = out / f"prune{step + 1}"
            phase_resume = resume and (phase_dir / "checkpoints/last.safetensors").is_file()
            row, trained = _phase(
                model, mode, train, val, ft_loop, phase_dir, device, resume=phase_resume,
                run_config={**run_config, "prune_step": step + 1, "prune_amount": amount},
                on_epoch_end=lambda _e, m: {"sparsity": sparsity(m)},
            )
            resume = resume and not trained
            make_permanent(model)
            rows.append(row)
        achieved = sparsity(model)

    model.eval()
    export = Checkpoint(
        arch=getattr(model, "arch", {}), model_state=model.state_dict(), epoch=cfg.loop.epochs,
        config=run_config,
        extra={
            "teacher_mode": cfg.mode, "metrics": rows[-1], "sparsity": achieved,
            "dataset": train_ds.describe(), "fingerprint": train_ds.fingerprint(),
        },
    )
    sha = save_checkpoint(out / "teacher.safetensors", export)
    summary = {
        "checkpoint": str(out / "teacher.safetensors"), "sha256": sha, "arch": cfg.arch,
        "width": cfg.width, "mode": cfg.mode, "sparsity": achieved, "metrics": rows[-1],
        "phases": rows, "fingerprint": train_ds.fingerprint(), "config": run_config,
    }
    write_json(out / "teacher.json", summary)
    return summary


def _phase(model, mode, train, val, loop: LoopConfig, run_dir: Path, device, *, resume: bool,
           run_config: dict[str, Any], **fit_kw) -> tuple[dict[str, Any], bool]:
    """Run one training phase into ``run_dir``: (its last metrics row, whether it trained).

    Resuming a phase whose checkpoint already holds all its epochs loads that checkpoint
    into ``model`` instead of training."""
    from trainer.checkpoint import load_checkpoint, load_weights
    from trainer.loop import check_resumable

    last = run_dir / "checkpoints" / "last.safetensors"
    if resume and last.is_file():
        ck = load_checkpoint(last)
        if ck.epoch >= loop.epochs:
            check_resumable(ck, last, arch=getattr(model, "arch", {}), run_config=run_config,
                            keys=RESUME_MATCH)
            load_weights(model, ck.model_state, last)
            return dict(ck.extra.get("metrics") or {}), False
    result = fit(model, mode, train, val, loop, run_dir, device, resume=resume,
                 run_config=run_config, resume_match=RESUME_MATCH, **fit_kw)
    return result["final"], True


def describe_teacher(path: str | Path, **use: Any) -> dict[str, Any]:
    """Provenance of a teacher checkpoint: architecture, training mode and sha256.

    A timm / torchvision teacher (``timm:resnet18@w.safetensors`` or a teacher file) is
    described by :func:`trainer.teachers.describe_external`, which takes ``use``
    (image_shape, methods, cam_layer) to refuse what the teacher cannot do.
    """
    from trainer.checkpoint import file_sha256, load_checkpoint
    from trainer.teachers import describe_external, is_external

    if is_external(path):
        return describe_external(str(path), **use)
    ck = load_checkpoint(path)
    return {
        "teacher_arch": ck.arch.get("name"),
        "teacher_width": ck.arch.get("width"),
        "teacher_mode": ck.extra.get("teacher_mode", "unknown"),
        "checkpoint_sha256": file_sha256(path),
        "teacher_num_classes": ck.arch.get("num_classes"),
        "teacher_fingerprint": ck.extra.get("fingerprint"),
    }
