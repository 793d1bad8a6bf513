"""Stage 2: train a student from a store (images + cached maps). No teacher is in memory.

Under ``torchrun`` the process group is initialised here (NCCL on CUDA, gloo on CPU), each
rank streams its own blocks of the store, and rank 0 writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pipelines.common import DataSpec, config_dict, git_sha
from saliency_cache.errors import SatError
from trainer.loop import LoopConfig, fit
from trainer.perturb import PerturbConfig

# Settings a --resume must keep: with another mode, map, data, batch size, seed, optimiser or
# perturbation the continued run would silently be a different experiment. (Epochs may grow;
# the architecture is checked against the checkpoint's model.)
RESUME_MATCH = ("mode", "maps", "split", "split_fingerprint", "batch_size", "loop.seed",
                "loop.optimizer", "perturb", "sat_reach_fraction")
# Training-mode settings added after runs were first written (gradnorm, sgt): a checkpoint
# without them trained with none of those modes, so it resumes as if it held the defaults.
RESUME_ADDED = {f"perturb.{k}": PerturbConfig.__dataclass_fields__[k].default
                for k in ("gradnorm_lambda", "sgt_fraction", "sgt_fill", "sgt_lambda")}


@dataclass(frozen=True)
class TrainConfig:
    store: str  # path or URL of the saliency store
    out: str  # run directory
    mode: str = "sat"  # a name from trainer.perturb.list_modes()
    maps: tuple[str, ...] = ()  # cached maps streamed with each sample (SAT modes)
    split: str = "train"
    val_split: str | None = "val"  # evaluated each epoch, from the store; None to skip
    data: DataSpec | None = None  # supplies images when the store holds none
    arch: str = "resnet10"
    width: int = 64
    batch_size: int = 128
    loop: LoopConfig = field(default_factory=LoopConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    # Express the SAT schedule against the run length: alpha^t reaches 0.6 after this fraction
    # of training (None: t = epoch index, the paper's schedule for 100-200 epoch runs).
    sat_reach_fraction: float | None = None
    workers: int = 0  # DataLoader worker processes reading the store
    buffer_blocks: int | None = None  # chunk blocks shuffled together (None: fill 256 MB)
    device: str = "cpu"
    resume: bool = False
    allow_partial: bool = False  # train on maps whose precompute has not finished
    storage_options: dict[str, Any] | None = None  # fsspec options of a remote store (s3 keys...)

    def __post_init__(self) -> None:
        from trainer.models import list_models
        from trainer.perturb import list_modes

        if self.mode not in list_modes():
            raise SatError(f"unknown training mode {self.mode!r}; choose one of: {', '.join(list_modes())}")
        if self.arch not in list_models():
            raise SatError(f"unknown architecture {self.arch!r}; choose one of: {', '.join(list_models())}")
        for what, v, low in (("batch size", self.batch_size, 1), ("width", self.width, 1),
                             ("workers", self.workers, 0)):
            if v < low:
                raise SatError(f"{what} must be >= {low}, got {v}")
        if self.sat_reach_fraction is not None and not 0 < self.sat_reach_fraction <= 1:
            raise SatError(f"sat reach fraction must be in (0, 1], got {self.sat_reach_fraction}")

    def effective_perturb(self) -> PerturbConfig:
        """The perturbation config with the SAT time scale derived from the run length."""
        if self.sat_reach_fraction is None:
            return self.perturb
        # alpha^t = 0.6 at t = 10 (alpha = 0.6^(1/10)); we want that at reach * epochs.
        scale = 10.0 / (self.sat_reach_fraction * self.loop.epochs)
        return replace(self.perturb, sat_time_scale=scale)


def _init_distributed(device: str) -> tuple[int, int, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        # One GPU per rank, chosen before the process group exists (NCCL binds to it). A
        # launcher that gives each rank its own CUDA_VISIBLE_DEVICES leaves one device: 0.
        local = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if count == 0:
            raise SatError(f"--device {device} under torchrun, but no CUDA device is visible")
        if local < count:
            index = local
        elif count == 1:
            index = 0
        else:
            raise SatError(f"LOCAL_RANK {local} but only {count} CUDA devices are visible")
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    if not dist.is_initialized():
        if cuda:
            dist.init_process_group(backend="nccl", device_id=torch.device(device))
        else:
            dist.init_process_group(backend="gloo")
    return dist.get_rank(), world, device


def run(cfg: TrainConfig) -> dict[str, Any]:
    from saliency_cache.store import SaliencyStore
    from trainer.loader import StoreStream, WorkerLoader
    from trainer.models import create_model
    from trainer.perturb import create_mode

    rank, world, device = _init_distributed(cfg.device)
    perturb = cfg.effective_perturb()
    mode = create_mode(cfg.mode, perturb)
    if mode.needs_maps and not cfg.maps:
        raise SatError(f"training mode {cfg.mode!r} needs --map (a cached saliency map)")
    if not mode.needs_maps and cfg.maps:
        raise SatError(f"training mode {cfg.mode!r} uses no maps, but --map was given")
    if cfg.maps and not mode.multi_map and len(cfg.maps) > 1:
        raise SatError(f"training mode {cfg.mode!r} takes one map; use multi-sat for several")
    images_from = cfg.data.open(cfg.split) if cfg.data is not None else None
    opts = cfg.storage_options
    stream = StoreStream(
        cfg.store, cfg.split, cfg.maps, batch_size=cfg.batch_size, shuffle=True,
        seed=cfg.loop.seed, buffer_blocks=cfg.buffer_blocks, images_from=images_from,
        rank=rank, world_size=world, allow_partial=cfg.allow_partial, storage_options=opts,
    )
    train = WorkerLoader(stream, cfg.workers, pin_memory=torch.device(device).type == "cuda")
    st = SaliencyStore.open(cfg.store, "r", storage_options=opts)
    val = None
    if cfg.val_split and cfg.val_split not in st.splits():
        # Not skipped in silence: the run would pick best.safetensors on training accuracy.
        raise SatError(
            f"validation split {cfg.val_split!r} is not in store {cfg.store} (splits: "
            f"{', '.join(st.splits())}); pass --val-split '' to train without validation"
        )
    if cfg.val_split:
        val_images = cfg.data.open(cfg.val_split) if cfg.data is not None else None
        val = StoreStream(
            cfg.store, cfg.val_split, (), batch_size=max(cfg.batch_size, 256), shuffle=False,
            images_from=val_images, rank=rank, world_size=world, storage_options=opts,
        )
    split = st.split(cfg.split)
    torch.manual_seed(cfg.loop.seed)  # model initialisation, identical on every rank
    model = create_model(
        cfg.arch, split.num_classes, width=cfg.width, in_channels=int(split.image_shape[0])
    )
    map_prov = {
        name: split.open_map(name, allow_partial=cfg.allow_partial).provenance for name in cfg.maps
    }
    run_config = {
        "stage": "train", **config_dict(cfg), "effective_perturb": config_dict(perturb),
        "map_provenance": map_prov, "split_fingerprint": split.fingerprint,
        "world_size": world, "git_sha": git_sha(),
    }
    steps = stream.steps_per_epoch(cfg.loop.epochs, cfg.workers) if world > 1 else None
    result = fit(
        model, mode, train, val, cfg.loop, Path(cfg.out), device, resume=cfg.resume,
        run_config=run_config, steps_per_epoch=steps,
        extra={"mode": cfg.mode, "maps": list(cfg.maps), "map_provenance": map_prov,
               "fingerprint": split.fingerprint, "store": cfg.store},
        resume_match=RESUME_MATCH, resume_added=RESUME_ADDED,
    )
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result
