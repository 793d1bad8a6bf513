"""The one training loop shared by teachers and students, for every training mode.

A run directory receives ``checkpoints/last.safetensors`` and ``checkpoints/best.safetensors``
(atomic), ``metrics.jsonl`` (one row per epoch) and ``result.json``. All randomness of an
epoch (data order, augmentation, perturbations) is derived from ``(seed, epoch, rank)``, so
``resume=True`` continues exactly where the last completed epoch left off.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from saliency_cache.errors import SatError
from trainer.augment import random_crop_flip
from trainer.batches import Batch, BatchSource, epoch_seed
from trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainer.modules import module_mode, unwrap

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "cosine", "step")


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 10  # passes over the training split
    optimizer: str = "adam"  # "adam" (the paper: lr 1e-3) or "sgd" (momentum, nesterov)
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0  # L2 penalty for both optimisers
    schedule: str = "none"  # "none", "cosine" (per step) or "step" (x0.1 at 50 % and 75 %)
    crop_padding: int = 4  # random-crop padding in pixels; 0 disables cropping
    flip: bool = True  # random horizontal flips
    amp: bool = True  # mixed precision, used only on CUDA
    seed: int = 0  # seeds data order, augmentation and perturbations
    robust_val_eps: float = 2 / 255  # budget of the cheap per-epoch robust check (PGD-3)
    robust_val_samples: int = 256  # validation samples attacked per epoch (0 disables)
    best_metric: str = "val_robust_acc"  # which metric picks best.safetensors
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise SatError(f"epochs must be >= 1, got {self.epochs}")
        if self.optimizer not in OPTIMIZERS:
            raise SatError(
                f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise SatError(
                f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SatError(f"lr must be a positive number, got {self.lr}")
        if self.crop_padding < 0:
            raise SatError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.best_metric not in ("val_robust_acc", "val_acc"):
            raise SatError(f"best_metric must be val_robust_acc or val_acc, got {self.best_metric!r}")


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )


def make_scheduler(opt: torch.optim.Optimizer, cfg: LoopConfig, total_steps: int):
    """The learning-rate schedule over ``total_steps`` optimiser steps (the whole run)."""
    total = max(1, total_steps)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    if cfg.schedule == "step":
        m1, m2 = int(0.5 * total), int(0.75 * total)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 1.0 if s < m1 else (0.1 if s < m2 else 0.01)
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


SYNC_EVERY = 20  # steps between reads of the loss on a GPU


def _stop_if_nonfinite(first_bad: torch.Tensor, bad_value: torch.Tensor, epoch: int) -> None:
    """Raise if any step (on any rank) had a non-finite loss. Under DDP every rank takes part
    and stops together: a rank that raised alone would leave the others waiting forever in
    the gradient all-reduce."""
    rank, world = _dist_info()
    flag = first_bad
    if world > 1:
        flag = first_bad.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    step = int(flag.item())
    if step:
        here = int(first_bad.item()) == step
        where = f"epoch {epoch + 1}, step {step}"
        if world > 1:
            where += f" (rank {rank})" if here else " (another rank)"
        value = bad_value.item() if here else float("nan")
        raise SatError(f"loss became {value} at {where}; nothing was saved for this epoch")


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    rank, world = _dist_info()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def prepare_batch(
    batch: Batch, source: BatchSource, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Move a batch to ``device``: images to float [0,1], maps decoded to int8."""
    x = batch.images.to(device, non_blocking=True).float().div_(255.0)
    y = batch.labels.to(device, non_blocking=True)
    maps = source.decode_maps([m.to(device, non_blocking=True) for m in batch.maps], device)
    return x, y, maps


@torch.no_grad()
def _clean_accuracy(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    correct = n = 0.0
    for x, y in batches:
        correct += (model(x).argmax(1) == y).sum().item()
        n += y.numel()
    return correct, n


def evaluate(
    model: torch.nn.Module,
    source: BatchSource,
    device: torch.device,
    *,
    robust_eps: float,
    robust_samples: int,
    seed: int,
) -> dict[str, float]:
    """Clean accuracy over ``source`` and PGD-3 accuracy at ``robust_eps`` on its first samples."""
    from trainer.attacks import pgd

    correct = n = r_correct = r_n = 0.0
    gen = torch.Generator(device=device).manual_seed(epoch_seed(seed, 0, salt=99))
    with module_mode(model, False):
        for batch in source.epoch_batches(0):
            x, y, _ = prepare_batch(batch, source, device)
            c, k = _clean_accuracy(model, [(x, y)])
            correct, n = correct + c, n + k
            if r_n < robust_samples:
                take = int(min(robust_samples - r_n, y.numel()))
                xa = pgd(
                    model, x[:take], y[:take], eps=robust_eps, steps=3,
                    step_size=robust_eps / 2, random_start=True, generator=gen,
                )
                c, k = _clean_accuracy(model, [(xa, y[:take])])
                r_correct, r_n = r_correct + c, r_n + k
    correct, n, r_correct, r_n = _all_sum([correct, n, r_correct, r_n], device)
    out = {"val_acc": correct / max(n, 1)}
    if robust_samples > 0:
        out["val_robust_acc"] = r_correct / max(r_n, 1)
    return out


def fit(
    model: torch.nn.Module,
    mode,
    train: BatchSource,
    val: BatchSource | None,
    cfg: LoopConfig,
    run_dir: str | Path,
    device: torch.device | str,
    *,
    resume: bool = False,
    run_config: dict[str, Any] | None = None,
    steps_per_epoch: int | None = None,
    on_epoch_end: Callable[[int, torch.nn.Module], dict[str, Any] | None] | None = None,
    extra: dict[str, Any] | None = None,
    resume_match: tuple[str, ...] = (),
    resume_added: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` with training mode ``mode`` and return the final result dict.

    ``mode`` is a :class:`trainer.perturb.TrainingMode`. Under ``torchrun`` (an initialised
    process group) the model is wrapped in DDP and only rank 0 writes files;
    ``steps_per_epoch`` then caps every rank's epoch at the same step count (the stream
    computes it); otherwise each epoch runs over the whole source.
    ``on_epoch_end(epoch, model)`` may return extra metrics for the row (the sparse teacher
    reports its sparsity this way).
    ``resume_match`` names ``run_config`` keys (dotted for nested ones, e.g. ``"loop.seed"``)
    whose values must equal those the checkpoint was written with: a resume with another
    mode, map or dataset would silently train something else, so it is refused instead.

    The steps: :func:`_restore` (a resume), then per epoch :func:`_train_epoch`,
    :func:`_epoch_row` (validation) and :meth:`_RunDir.log_epoch` (metrics and checkpoints).
    """
    device = torch.device(device)
    rank, world = _dist_info()
    base = unwrap(model).to(device)
    files = _RunDir(Path(run_dir), is_main=rank == 0)
    run_config = dict(run_config or {})
    run_config.setdefault("loop", asdict(cfg))

    epoch_steps = _epoch_steps(train, cfg, steps_per_epoch)
    optimizer = make_optimizer(base, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    stepper = _Stepper(
        optimizer, make_scheduler(optimizer, cfg, sum(epoch_steps)),
        torch.amp.GradScaler("cuda", enabled=use_amp), use_amp,
    )
    start_epoch, best = 0, -1.0
    if resume:
        start_epoch, best = _restore(files, base, stepper, run_config=run_config, keys=resume_match,
                                     added=resume_added)
    files.start(run_config, epochs_done=start_epoch if resume else None)

    net: torch.nn.Module = base
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            base, device_ids=[device.index] if device.type == "cuda" else None
        )
    row: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        sums = _train_epoch(
            net, mode, train, cfg, epoch, device, stepper, rank=rank,
            bar_total=epoch_steps[epoch], cap=steps_per_epoch,
            show_progress=cfg.show_progress and files.is_main,
        )
        row = _epoch_row(base, mode, val, cfg, epoch, device, stepper, sums, on_epoch_end)
        best = files.log_epoch(base, row, best, cfg, stepper, run_config=run_config,
                               extra=extra or {})
    result = {"final": row, "best": best, "epochs": cfg.epochs, "run_dir": str(files.path)}
    files.finish(result)
    return result


def _epoch_steps(train: BatchSource, cfg: LoopConfig, cap: int | None) -> list[int]:
    """Optimiser steps of each epoch: the schedule's length and the progress bar's total."""
    # A cap on steps is needed only under DDP, where ranks must take the same number of steps.
    est_steps = cap or max(1, math.ceil(train.num_samples / max(1, _batch_size_hint(train))))
    # A store stream counts its batches per epoch exactly (DataLoader workers each cut their
    # own share, so an epoch can run past ceil(n / batch)); other sources are estimated.
    count = getattr(train, "epoch_steps", None) if cap is None else None
    return [count(e) if callable(count) else est_steps for e in range(cfg.epochs)]


@dataclass
class _Stepper:
    """The optimiser, its learning-rate schedule and AMP's loss scaler, stepped together."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    use_amp: bool

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (a scalar) and take one optimiser and one schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        scale = self.scaler.get_scale() if self.use_amp else 1.0
        self.scaler.step(self.optimizer)  # skipped by AMP when the scaled gradients overflowed
        self.scaler.update()  # which lowers the scale: then the schedule waits too
        if not self.use_amp or self.scaler.get_scale() >= scale:
            self.scheduler.step()


def _restore(files: _RunDir, base: torch.nn.Module, stepper: _Stepper, *,
             run_config: dict[str, Any], keys: tuple[str, ...],
             added: dict[str, Any] | None = None) -> tuple[int, float]:
    """Load ``last.safetensors`` of the run into the model, optimiser, schedule and loss
    scaler, after :func:`check_resumable`; returns (epochs done, best score so far)."""
    last = files.checkpoints / "last.safetensors"
    if not last.is_file():
        raise SatError(f"--resume given but {last} does not exist")
    ck = load_checkpoint(last)
    check_resumable(ck, last, arch=getattr(base, "arch", {}), run_config=run_config, keys=keys,
                    added=added)
    base.load_state_dict(ck.model_state)
    if ck.optim_state is not None:
        stepper.optimizer.load_state_dict(ck.optim_state)
    if ck.sched_state is not None:
        stepper.scheduler.load_state_dict(ck.sched_state)
    if stepper.use_amp and ck.extra.get("grad_scaler"):
        stepper.scaler.load_state_dict(ck.extra["grad_scaler"])  # the loss scale a resume continues
    return ck.epoch, float(ck.extra.get("best", -1.0))


@dataclass
class _EpochSums:
    """One epoch's training totals, summed over ranks."""

    loss_sum: float
    correct: float
    seen: float
    steps: int
    seconds: float


def _train_epoch(
    net: torch.nn.Module, mode, source: BatchSource, cfg: LoopConfig, epoch: int,
    device: torch.device, stepper: _Stepper, *, rank: int, bar_total: int, cap: int | None,
    show_progress: bool,
) -> _EpochSums:
    """One pass over ``source`` (at most ``cap`` steps when given). Raises :class:`SatError`
    when a loss is not finite (on any rank, which all stop together)."""
    net.train()
    gen = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch, rank, 1))
    # Reading the loss back (NaN check, progress bar) makes the host wait for the device: on
    # the CPU that costs nothing, so every step; on a GPU every SYNC_EVERY steps.
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    t0 = time.perf_counter()
    # Running sums stay on the device; first_bad is the first step with a non-finite loss.
    loss_sum_t = torch.zeros((), dtype=torch.float64, device=device)
    correct_t = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.zeros((), dtype=torch.int64, device=device)
    bad_value = torch.zeros((), dtype=torch.float32, device=device)
    seen = 0
    steps = 0
    batches = source.epoch_batches(epoch)
    bar = tqdm(total=bar_total, desc=f"epoch {epoch + 1}/{cfg.epochs} [{mode.name}]",
               disable=not show_progress, leave=False)
    for batch in batches:
        if cap is not None and steps >= cap:
            break
        x, y, maps = prepare_batch(batch, source, device)
        if cfg.crop_padding or cfg.flip:
            x, maps = random_crop_flip(x, maps, padding=cfg.crop_padding, flip=cfg.flip, generator=gen)
        with torch.autocast(device_type=device.type, enabled=stepper.use_amp):
            loss, logits = mode.loss(net, x, y, maps or None, epoch=float(epoch), generator=gen)
        lv = loss.detach()
        newly_bad = (first_bad == 0) & ~torch.isfinite(lv)
        first_bad = torch.where(newly_bad, steps + 1, first_bad)
        bad_value = torch.where(newly_bad, lv.float(), bad_value)
        if (steps + 1) % sync_every == 0:
            _stop_if_nonfinite(first_bad, bad_value, epoch)
        stepper.step(loss)
        steps += 1
        b = y.numel()
        loss_sum_t += lv.double() * b
        correct_t += (logits.detach().argmax(1) == y).sum()
        seen += b
        if steps % sync_every == 0:
            # No forced redraw: the bar redraws at its own interval (every 30 s in a log).
            bar.set_postfix(loss=f"{loss_sum_t.item() / seen:.3f}",
                            acc=f"{correct_t.item() / seen:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    _stop_if_nonfinite(first_bad, bad_value, epoch)
    loss_sum, correct = loss_sum_t.item(), float(correct_t.item())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], device)
    return _EpochSums(loss_sum, correct, seen, steps, seconds)


def _epoch_row(
    base: torch.nn.Module, mode, val: BatchSource | None, cfg: LoopConfig, epoch: int,
    device: torch.device, stepper: _Stepper, sums: _EpochSums,
    on_epoch_end: Callable[[int, torch.nn.Module], dict[str, Any] | None] | None,
) -> dict[str, Any]:
    """The metrics row of an epoch: training totals, validation and ``on_epoch_end``'s extras."""
    seen, seconds = sums.seen, sums.seconds
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "mode": mode.name,
        "loss": sums.loss_sum / max(seen, 1),
        "train_acc": sums.correct / max(seen, 1),
        "epoch_time_s": seconds,
        "images_per_s": seen / seconds if seconds > 0 else float("nan"),
        "lr": stepper.optimizer.param_groups[0]["lr"],
        "steps": sums.steps,
        "train_samples": int(seen),  # summed over ranks: the images this epoch trained on
    }
    if val is not None:
        row.update(
            evaluate(
                base, val, device, robust_eps=cfg.robust_val_eps,
                robust_samples=cfg.robust_val_samples, seed=cfg.seed,
            )
        )
    if on_epoch_end is not None:
        row.update(on_epoch_end(epoch, base) or {})
    return row


@dataclass
class _RunDir:
    """The files of a run directory (see the module docstring); only rank 0 writes them."""

    path: Path
    is_main: bool

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def start(self, run_config: dict[str, Any], *, epochs_done: int | None) -> None:
        """Write ``config.json``; keep the metric rows of the ``epochs_done`` a resume
        continues from (None: a fresh run, which drops any old rows)."""
        if not self.is_main:
            return
        if epochs_done is not None:
            _truncate_metrics(self.metrics, epochs_done)
        elif self.metrics.exists():
            self.metrics.unlink()
        # After the resume checks: a refused resume leaves the run directory as it was.
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(json.dumps(run_config, indent=2, default=str))

    def log_epoch(self, base: torch.nn.Module, row: dict[str, Any], best: float,
                  cfg: LoopConfig, stepper: _Stepper, *, run_config: dict[str, Any],
                  extra: dict[str, Any]) -> float:
        """Append ``row``, save ``last`` (and ``best`` when the score improved); return the
        best score so far (computed on every rank, so all ranks agree)."""
        score = row.get(cfg.best_metric, row.get("val_acc", row["train_acc"]))
        improved = score > best
        best = max(best, score)
        if not self.is_main:
            return best
        ck = Checkpoint(
            arch=getattr(base, "arch", {}), model_state=base.state_dict(), epoch=row["epoch"],
            config=run_config, optim_state=stepper.optimizer.state_dict(),
            sched_state=stepper.scheduler.state_dict(),
            extra={"best": best, "metrics": row, "grad_scaler": stepper.scaler.state_dict(),
                   **extra},
        )
        # The metrics row and best go first and last.safetensors last: a run killed in
        # between resumes from the previous epoch, and the resume drops the extra row.
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if improved:
            save_checkpoint(self.checkpoints / "best.safetensors", ck)
        save_checkpoint(self.checkpoints / "last.safetensors", ck)
        if cfg.show_progress:
            tqdm.write(" ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ))
        return best

    def finish(self, result: dict[str, Any]) -> None:
        if self.is_main:
            (self.path / "result.json").write_text(json.dumps(result, indent=2, default=str))


def _config_value(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_resumable(
    ck: Checkpoint, path: Path, *, arch: dict[str, Any], run_config: dict[str, Any],
    keys: tuple[str, ...] = (),
    added: dict[str, Any] | None = None,
) -> None:
    """Refuse to resume from ``ck`` (read from ``path``) into another architecture, or with a
    value of one of ``keys`` (dotted ``run_config`` keys) that differs from the checkpoint's.

    ``added`` names settings introduced after some runs were written (dotted keys, with the
    value whose behaviour the older code had): a checkpoint whose config lacks one is
    compared as if it held that value, so such runs stay resumable. Any other missing key
    is a difference like any other.
    """
    if arch and ck.arch and ck.arch != arch:
        diff = sorted(k for k in set(arch) | set(ck.arch) if arch.get(k) != ck.arch.get(k))
        raise SatError(
            f"--resume: {path} holds a different model ("
            + ", ".join(f"{k} {ck.arch.get(k)!r}, now {arch.get(k)!r}" for k in diff)
            + "); use the same settings or a new --out"
        )
    old_config = json.loads(json.dumps(ck.config, default=str))
    for dotted, value in (added or {}).items():
        *parents, leaf = dotted.split(".")
        node = old_config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = json.loads(json.dumps(value, default=str))
    new_config = json.loads(json.dumps(run_config, default=str))
    for key in keys:
        before, now = _config_value(old_config, key), _config_value(new_config, key)
        if before != now:
            raise SatError(
                f"--resume: {key} was {before!r} when {path} was written, now {now!r}; "
                "use the same settings or a new --out"
            )


def _batch_size_hint(source: BatchSource) -> int:
    return int(getattr(source, "batch_size", 128))


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric rows past the checkpoint's epoch (written by a run killed after logging)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in rows if json.loads(ln).get("epoch", 0) <= epochs_done]
    path.write_text("".join(ln + "\n" for ln in keep))
