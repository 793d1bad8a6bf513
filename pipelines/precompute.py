"""Stage 1: write dataset splits, teacher saliency maps and weak (box / mask) maps into a store.

Work is split into one task per *shard* of a map: with Zarr sharding the shard file is what a
write replaces, so a task that owns a whole shard (and the completion flags stored beside it)
can never lose another task's chunks. Tasks run on dask: an in-process local cluster by
default, or an existing ``dask.distributed`` scheduler. Each task recomputes only the chunks
its shard still lacks, so a killed run resumes where it stopped, and every chunk is computed
from the same inputs in the same sub-batches whatever the worker count, so the bytes on disk
do not depend on how the work was split.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.common import DataSpec, config_dict, git_sha, write_json
from saliency_cache.errors import SatError
from saliency_cache.store import SaliencyStore, map_name_from_provenance, sanitize_map_name

WEAK_SOURCES = ("box", "mask")
TARGET_RULES = ("label", "argmax")


@dataclass(frozen=True)
class PrecomputeConfig:
    store: str  # path or URL of the store (created if missing)
    data: DataSpec
    splits: tuple[str, ...] = ("train", "val")  # splits ingested (labels, ids, fingerprint, images)
    map_splits: tuple[str, ...] = ("train",)  # splits that get maps
    with_images: bool = True  # store uint8 images too, so training reads one store
    teachers: tuple[str, ...] = ()  # teacher checkpoints (teacher.safetensors)
    methods: tuple[str, ...] = ("gbp",)  # saliency methods run on every teacher
    weak: tuple[str, ...] = ()  # weak saliency from annotations: "box", "mask"
    target_rule: str = "label"  # saliency target: ground truth (paper) or teacher argmax
    quantile: float = 0.0  # zero |attribution| below this per-image quantile (ternary maps)
    heat_threshold: float = 0.5  # binarise heatmaps at this fraction of the per-image max
    method_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"n_steps": 32}
    chunk_size: int = 256  # samples per chunk (the unit of completion and of a read)
    shard_chunks: int | None = None  # chunks per shard file (None: the store's default)
    batch_size: int = 64  # teacher sub-batch inside a chunk (fixed, for identical bytes)
    workers: int = 1  # local dask workers (1 and 0 run in-process)
    scheduler: str | None = None  # address of an existing dask.distributed scheduler
    threads_per_worker: int = 1  # torch threads per worker
    device: str = "cpu"
    seed: int = 0  # seeds stochastic methods (SmoothGrad) per chunk
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.target_rule not in TARGET_RULES:
            raise SatError(f"unknown target rule {self.target_rule!r}; choose label or argmax")
        for w in self.weak:
            if w not in WEAK_SOURCES:
                raise SatError(f"unknown weak saliency source {w!r}; choose box or mask")
        if self.teachers and not self.methods:
            raise SatError("teachers given but no saliency methods")
        from trainer.saliency import list_methods

        for m in self.methods:
            if m not in list_methods():
                raise SatError(f"unknown saliency method {m!r}; choose one of: {', '.join(list_methods())}")
        for t in self.teachers:
            if not Path(t).is_file():
                raise SatError(f"teacher checkpoint not found: {t}")
        if not 0.0 <= self.quantile < 1.0:
            raise SatError(f"quantile must be in [0, 1), got {self.quantile}")
        if not 0.0 < self.heat_threshold <= 1.0:
            raise SatError(f"heat threshold must be in (0, 1], got {self.heat_threshold}")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise SatError("chunk size and batch size must be >= 1")
        if self.workers < 0:
            raise SatError(f"workers must be >= 0, got {self.workers}")
        for s in self.map_splits:
            if s not in self.splits:
                raise SatError(f"map split {s!r} is not among the ingested splits {self.splits}")


@dataclass(frozen=True)
class MapJob:
    """Everything a worker needs to fill one shard of one map (picklable, no open handles)."""

    store: str
    split: str
    name: str
    kind: str  # "teacher" or "weak"
    data: DataSpec
    shard: int
    teacher: str | None = None
    method: str | None = None
    method_params: dict[str, Any] = field(default_factory=dict)
    target_rule: str = "label"
    quantile: float = 0.0
    heat_threshold: float = 0.5
    weak_source: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    seed: int = 0
    threads: int = 1


# ---- worker side ---------------------------------------------------------------------------
# Loaded objects are cached per worker process, so a teacher is loaded once per worker, not
# once per task. Keys include the checkpoint path and device.
_WORKER_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, make):
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = make()
    return _WORKER_CACHE[key]


def _chunk_images(split, dataset, start: int, stop: int) -> np.ndarray:
    if split.has_images():
        return split.read_images(start, stop)
    return np.asarray(dataset.load_images(start, stop), dtype=np.uint8)


def run_map_job(job: MapJob) -> int:
    """Compute and write every pending chunk of ``job.shard``; return how many were written."""
    import torch

    torch.set_num_threads(max(1, job.threads))
    writer = SaliencyStore.attach_writer(job.store, job.split, job.name)
    done = writer.done_chunks()
    chunks = [k for k in writer.chunks_of_shard(job.shard) if not done[k]]
    if not chunks:
        return 0
    st = SaliencyStore.open(job.store, "r")
    split = st.split(job.split)
    dataset = _cached(("data", job.data.name, job.data.root, repr(job.data.options), job.split),
                      lambda: job.data.open(job.split))
    labels = np.asarray(split.labels())
    written = 0
    if job.kind == "weak":
        from trainer.weak import weak_maps

        for k in chunks:
            s, e = writer.chunk_bounds(k)
            writer.write_chunk(k, weak_maps(dataset, s, e, source=job.weak_source))
            written += 1
        return written

    from trainer.checkpoint import load_model
    from trainer.saliency import compute_maps, create_method

    device = torch.device(job.device)
    model = _cached(("teacher", job.teacher, job.device), lambda: load_model(job.teacher, device)[0])
    method = create_method(job.method, **job.method_params)
    for k in chunks:
        s, e = writer.chunk_bounds(k)
        imgs = _chunk_images(split, dataset, s, e)
        parts = []
        for b in range(0, e - s, job.batch_size):
            x = torch.from_numpy(imgs[b : b + job.batch_size]).to(device).float().div_(255.0)
            y = torch.from_numpy(labels[s + b : s + b + x.shape[0]]).to(device)
            maps, _ = compute_maps(
                method, model, x, y, target_rule=job.target_rule,
                quantile=job.quantile, heat_threshold=job.heat_threshold,
            )
            parts.append(np.asarray(maps, dtype=np.int8))
        writer.write_chunk(k, np.concatenate(parts))
        written += 1
    return written


# ---- coordinator side ----------------------------------------------------------------------
def _ingest(st: SaliencyStore, cfg: PrecomputeConfig, split_name: str):
    from tqdm.auto import tqdm

    ds = cfg.data.open(split_name)
    split = st.create_split(
        split_name, labels=np.asarray(ds.labels(), dtype=np.int64), ids=ds.ids(),
        fingerprint=ds.fingerprint(), image_shape=tuple(ds.image_shape),
        num_classes=ds.num_classes, class_names=list(ds.class_names), dataset=ds.describe(),
        chunk_size=cfg.chunk_size, with_images=cfg.with_images,
    )
    if cfg.with_images and not split.images_complete():
        for s in tqdm(range(0, split.n, split.chunk_size), desc=f"ingest {split_name} images",
                      disable=not cfg.show_progress, unit="chunk"):
            e = min(s + split.chunk_size, split.n)
            split.write_images(s, np.asarray(ds.load_images(s, e), dtype=np.uint8))
        split.mark_images_complete()
    return ds, split


def _plan_maps(cfg: PrecomputeConfig, split_name: str, ds) -> list[tuple[str, dict, str, int, dict]]:
    """(name, provenance, encoding, channels, job kwargs) for every map to write in a split."""
    from pipelines.teacher import describe_teacher
    from trainer.saliency import create_method, map_channels, method_encoding
    from trainer.weak import weak_encoding

    plans = []
    for source in cfg.weak:
        enc, missing = weak_encoding(ds, source)
        prov = {
            "source": source, "method": f"{source}-annotation", "encoding": enc,
            "threshold": None, "target_rule": None, "missing_annotations": int(missing),
            "dataset": ds.describe(),
        }
        plans.append((sanitize_map_name(source), prov, enc, 1, {"kind": "weak", "weak_source": source}))
    for t in cfg.teachers:
        tprov = describe_teacher(t)
        if tprov["teacher_num_classes"] not in (None, ds.num_classes):
            raise SatError(
                f"teacher {t} predicts {tprov['teacher_num_classes']} classes, dataset "
                f"{ds.name} has {ds.num_classes}"
            )
        for m in cfg.methods:
            method = create_method(m, **_method_params(cfg))
            enc = method_encoding(method)
            prov = {
                "source": "teacher", **tprov, "method": m, "method_params": method.params,
                "encoding": enc,
                "threshold": cfg.quantile if enc == "ternary" else method.params.get("threshold", cfg.heat_threshold),
                "threshold_kind": "quantile" if enc == "ternary" else "heatmap_fraction",
                "target_rule": cfg.target_rule, "seed": cfg.seed,
            }
            plans.append(
                (map_name_from_provenance(prov), prov, enc, map_channels(method, ds.image_shape[0]),
                 {"kind": "teacher", "teacher": t, "method": m})
            )
    names = [p[0] for p in plans]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SatError(f"two maps would share the name(s) {sorted(dup)}; vary teachers or methods")
    return plans


def _method_params(cfg: PrecomputeConfig) -> dict[str, Any]:
    """Parameters for every method; each method keeps the ones it takes (seed: SmoothGrad,
    threshold: Grad-CAM++ boxes)."""
    return {"seed": cfg.seed, "threshold": cfg.heat_threshold, **cfg.method_params}


def _client(cfg: PrecomputeConfig):
    from dask.distributed import Client, LocalCluster

    if cfg.scheduler:
        try:
            return Client(cfg.scheduler, timeout="10s"), None
        except OSError as e:
            raise SatError(f"cannot reach dask scheduler {cfg.scheduler}: {e}") from None
    cluster = LocalCluster(
        n_workers=cfg.workers, threads_per_worker=1, processes=True,
        dashboard_address=None, silence_logs=40,
    )
    return Client(cluster), cluster


def run(cfg: PrecomputeConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    st = SaliencyStore.open(cfg.store, "a")
    summary: dict[str, Any] = {"store": cfg.store, "splits": {}, "maps": []}
    jobs: list[MapJob] = []
    writers = []
    try:
        for split_name in cfg.splits:
            ds, split = _ingest(st, cfg, split_name)
            summary["splits"][split_name] = {"n": split.n, "fingerprint": split.fingerprint}
            if split_name not in cfg.map_splits:
                continue
            for name, prov, enc, channels, kw in _plan_maps(cfg, split_name, ds):
                w = split.create_map(
                    name, provenance=prov, encoding=enc, channels=channels,
                    chunk_size=cfg.chunk_size, shard_chunks=cfg.shard_chunks,
                )
                writers.append(w)
                pending = set(w.pending_chunks())
                summary["maps"].append({"split": split_name, "name": name, "pending_chunks": len(pending)})
                for s in range(w.n_shards):
                    if pending.intersection(w.chunks_of_shard(s)):
                        jobs.append(MapJob(
                            store=cfg.store, split=split_name, name=name, data=cfg.data, shard=s,
                            method_params=_method_params(cfg), target_rule=cfg.target_rule,
                            quantile=cfg.quantile, heat_threshold=cfg.heat_threshold,
                            batch_size=cfg.batch_size, device=cfg.device, seed=cfg.seed,
                            threads=cfg.threads_per_worker, **kw,
                        ))
        written = 0
        bar = tqdm(total=len(jobs), desc="precompute shards", disable=not cfg.show_progress, unit="shard")
        if cfg.workers <= 1 and not cfg.scheduler:
            for job in jobs:
                written += run_map_job(job)
                bar.update(1)
        else:
            from dask.distributed import as_completed

            client, cluster = _client(cfg)
            try:
                futures = client.map(run_map_job, jobs, pure=False)
                for fut in as_completed(futures):
                    written += fut.result()
                    bar.update(1)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
        bar.close()
        for w in writers:
            if not w.finalize():
                raise SatError(f"map {w.name!r} still has missing chunks after precompute")
    finally:
        for w in writers:
            w.close()
    summary.update(
        chunks_written=written, seconds=time.perf_counter() - t0, config=config_dict(cfg),
        git_sha=git_sha(),
    )
    if "://" not in cfg.store:
        write_json(Path(cfg.store).with_suffix(".precompute.json"), summary)
    return summary


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
