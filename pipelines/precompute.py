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
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.common import DataSpec, config_dict, git_sha, tune_allocator, write_json
from pipelines.precompute_plan import (  # noqa: F401 - auto_shard_chunks is part of this module's API
    auto_shard_chunks,
    cleanup_failed,
    cli_advice,
    method_params,
    plan_all,
    shard_chunks,
)
from saliency_cache.errors import IncompleteMapError, MismatchError, SatError
from saliency_cache.store import TARGET_RULES, SaliencyStore
from trainer.data.weak import WEAK_SOURCES


@dataclass(frozen=True)
class PrecomputeConfig:
    store: str  # path or URL of the store (created if missing)
    data: DataSpec
    splits: tuple[str, ...] = ("train", "val")  # splits ingested (labels, ids, fingerprint, images)
    map_splits: tuple[str, ...] = ("train",)  # splits that get maps
    with_images: bool = True  # store uint8 images too, so training reads one store
    teachers: tuple[str, ...] = ()  # teacher checkpoints, or timm:/torchvision: teachers
    cam_layer: str | None = None  # Grad-CAM layer of timm/torchvision teachers (None: default)
    methods: tuple[str, ...] = ("gbp",)  # saliency methods run on every teacher
    weak: tuple[str, ...] = ()  # weak saliency from annotations: "box", "mask"
    target_rule: str = "label"  # saliency target: ground truth (paper) or teacher argmax
    quantile: float = 0.0  # zero |attribution| below this per-image quantile (ternary maps)
    heat_threshold: float = 0.5  # binarise heatmaps at this fraction of the per-image max
    method_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"n_steps": 32}
    chunk_size: int = 256  # samples per chunk (the unit of completion and of a read)
    shard_chunks: int | None = None  # chunks per shard file = per task (None: see auto_shard_chunks)
    batch_size: int = 64  # teacher sub-batch inside a chunk (fixed, for identical bytes)
    workers: int = 1  # local dask workers (1 and 0 run in-process)
    scheduler: str | None = None  # address of an existing dask.distributed scheduler
    threads_per_worker: int = 1  # torch threads per worker
    device: str = "cpu"
    seed: int = 0  # seeds stochastic methods (SmoothGrad) per chunk
    show_progress: bool = True
    overwrite: bool = False  # replace maps of the same name computed with other settings

    def __post_init__(self) -> None:
        if self.target_rule not in TARGET_RULES:
            raise SatError(f"unknown target rule {self.target_rule!r}; choose label or argmax")
        for w in self.weak:
            if w not in WEAK_SOURCES:
                raise SatError(f"unknown weak saliency source {w!r}; choose box or mask")
        if self.teachers and not self.methods:
            raise SatError("teachers given but no saliency methods")
        from trainer.saliency import list_methods
        from trainer.teachers import is_external, parse_teacher

        for m in self.methods:
            if m not in list_methods():
                raise SatError(f"unknown saliency method {m!r}; choose one of: {', '.join(list_methods())}")
        for t in self.teachers:
            if is_external(t):
                parse_teacher(t)  # refuses a malformed spec or a missing weights file
            elif not Path(t).is_file():
                raise SatError(f"teacher checkpoint not found: {t}")
        if not 0.0 <= self.quantile < 1.0:
            raise SatError(f"quantile must be in [0, 1), got {self.quantile}")
        if not 0.0 < self.heat_threshold <= 1.0:
            raise SatError(f"heat threshold must be in (0, 1], got {self.heat_threshold}")
        for what, v in (("chunk size", self.chunk_size), ("batch size", self.batch_size)):
            if v < 1:
                raise SatError(f"{what} must be >= 1, got {v}")
        if self.shard_chunks is not None and self.shard_chunks < 1:
            raise SatError(f"shard chunks must be >= 1, got {self.shard_chunks}")
        if self.workers < 0:
            raise SatError(f"workers must be >= 0, got {self.workers}")
        if not self.splits:
            raise SatError("no splits given to ingest (--splits)")
        if (self.teachers or self.weak) and not self.map_splits:
            # Teachers or weak sources with nothing to map would be skipped without a word.
            raise SatError("teachers or weak sources given but no map splits (--map-splits)")
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
    teacher_sha256: str | None = None  # of the checkpoint recorded in the map's provenance
    teacher_options: dict[str, Any] = field(default_factory=dict)  # timm/torchvision: see load_external
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
    # Read the next chunk's images and write the last chunk's maps on a second thread while
    # the teacher computes: set where a core (or the CPU beside a GPU) would otherwise idle.
    overlap_io: bool = False


# ---- worker side ---------------------------------------------------------------------------
# Loaded objects are cached per worker process, so a teacher is loaded once per worker, not
# once per task. The keys carry what identifies the content (the checkpoint's sha256, the
# split's fingerprint), not only paths: an in-process run and the workers of an existing
# scheduler outlive one precompute, and a teacher retrained in place must not be served stale.
_WORKER_CACHE: dict[tuple, Any] = {}
# Teachers the input checks of an in-process run loaded on the CPU, by (path, sha256): the
# first task takes its model from here (after the same sha256 check) instead of loading it.
_CHECKED: dict[tuple, Any] = {}


def _cached(key: tuple, make):
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = make()
    return _WORKER_CACHE[key]


def _chunk_images(split, dataset, start: int, stop: int) -> np.ndarray:
    if split.has_images():
        return split.read_images(start, stop)
    return np.asarray(dataset.load_images(start, stop), dtype=np.uint8)


def run_map_job_in_worker(job: MapJob) -> int:
    """:func:`run_map_job` as a dask task: tunes the worker's allocator first, and spreads the
    workers of a ``cuda`` precompute over the visible GPUs."""
    import torch

    tune_allocator()
    if job.device == "cuda" and torch.cuda.device_count() > 1:
        from distributed import get_worker

        job = replace(job, device=worker_device(job.device, get_worker().name,
                                                 torch.cuda.device_count()))
    return run_map_job(job)


def worker_device(device: str, worker_name: object, gpus: int) -> str:
    """The device a dask worker computes on: a plain ``cuda`` becomes ``cuda:i`` with ``i``
    the worker's number (a local cluster names its workers 0, 1, ...) or, for other names, a
    stable hash of the name, modulo the GPU count. Any other device is kept."""
    if device != "cuda" or gpus <= 1:
        return device
    if isinstance(worker_name, int) or (isinstance(worker_name, str) and worker_name.isdigit()):
        index = int(worker_name)
    else:
        index = zlib.crc32(str(worker_name).encode())
    return f"cuda:{index % gpus}"


def _load_teacher(job: MapJob, device):
    """The teacher of ``job``, after checking that the file is the one recorded in provenance."""
    from trainer.checkpoint import file_sha256, load_model
    from trainer.teachers import is_external, load_external

    if is_external(job.teacher):
        return load_external(job.teacher, device, sha256=job.teacher_sha256, **job.teacher_options)
    if job.teacher_sha256 is not None:
        actual = file_sha256(job.teacher)
        if actual != job.teacher_sha256:
            raise SatError(
                f"teacher checkpoint {job.teacher} changed since precompute planned map "
                f"{job.name!r} (sha256 {actual[:12]}..., recorded {job.teacher_sha256[:12]}...); "
                "run precompute again"
            )
    checked = _CHECKED.pop((job.teacher, job.teacher_sha256), None)
    if checked is not None and str(device) == "cpu":
        return checked
    return load_model(job.teacher, device)[0]


def run_map_job(job: MapJob) -> int:
    """Compute and write every pending chunk of ``job.shard``; return how many were written."""
    return run_map_jobs([job])


def run_map_jobs(jobs: list[MapJob], on_job_done=None, writers: dict | None = None) -> int:
    """Compute and write every pending chunk of each job, in order; return how many were written.

    Computes with the jobs' torch thread count (the same in every process, so the bytes do
    not depend on where a task runs) and restores the caller's afterwards. With
    :attr:`MapJob.overlap_io` the chunks of all the jobs form one pipeline (see
    :func:`_pipeline`). ``on_job_done()`` is called once per job, when its chunks are written.
    ``writers`` maps (split, map name) to the coordinator's own writer, which an in-process
    run uses instead of opening the store again for every job.
    """
    import torch

    if not jobs:
        return 0
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, jobs[0].threads))
    try:
        writers = writers or {}
        tasks = (
            task for job in jobs
            for task in _job_tasks(job, on_job_done, writers.get((job.split, job.name)))
        )
        return _pipeline(tasks, overlap=any(job.overlap_io for job in jobs))
    finally:
        torch.set_num_threads(previous)


class _ChunkTask:
    """One pending chunk of a map: ``read()`` its inputs, ``compute(inputs)`` its maps,
    ``write(maps)`` them with the chunk's done flag. ``last`` marks a job's final chunk."""

    def __init__(self, k: int, read, compute, write, last: bool, on_done=None):
        self.k, self._read, self._compute, self._write = k, read, compute, write
        self.last, self._on_done = last, on_done

    def read(self):
        return self._read(self.k)

    def compute(self, inputs):
        return self._compute(self.k, inputs)

    def write(self, maps) -> None:
        self._write(self.k, maps)
        if self.last and self._on_done is not None:
            self._on_done()


def _job_tasks(job: MapJob, on_job_done=None, writer=None):
    """The :class:`_ChunkTask` of each pending chunk of ``job`` (a generator: the store is
    opened, unless ``writer`` is given, and the teacher loaded when the first chunk is asked
    for)."""
    import torch

    if writer is None:
        writer = SaliencyStore.attach_writer(job.store, job.split, job.name)
    done = writer.done_chunks()
    chunks = [k for k in writer.chunks_of_shard(job.shard) if not done[k]]
    if not chunks:
        if on_job_done is not None:
            on_job_done()
        return
    split = writer.split  # the writer's own handle: no second open of the store per task
    dataset = _cached(
        ("data", job.data.name, job.data.root, repr(job.data.options), job.split, split.fingerprint),
        lambda: job.data.open(job.split),
    )

    def write(k: int, maps: np.ndarray) -> None:
        writer.write_chunk(k, maps)

    if job.kind == "weak":
        from trainer.data.weak import weak_maps

        def read(k: int) -> np.ndarray:
            return weak_maps(dataset, *writer.chunk_bounds(k), source=job.weak_source)

        def compute(k: int, maps: np.ndarray) -> np.ndarray:
            return maps
    else:
        from trainer.saliency import compute_maps, create_method
        from trainer.saliency.maps import NonFiniteSaliencyError

        device = torch.device(job.device)
        model = _cached(("teacher", job.teacher, job.teacher_sha256, job.device),
                        lambda: _load_teacher(job, device))
        method = create_method(job.method, **job.method_params)
        labels = np.asarray(split.labels())

        def read(k: int) -> np.ndarray:
            return _chunk_images(split, dataset, *writer.chunk_bounds(k))

        def compute(k: int, imgs: np.ndarray) -> np.ndarray:
            s, e = writer.chunk_bounds(k)
            parts = []
            for b in range(0, e - s, job.batch_size):
                x = torch.from_numpy(imgs[b : b + job.batch_size]).to(device).float().div_(255.0)
                y = torch.from_numpy(labels[s + b : s + b + x.shape[0]]).to(device)
                try:
                    maps, _ = compute_maps(
                        method, model, x, y, target_rule=job.target_rule,
                        quantile=job.quantile, heat_threshold=job.heat_threshold,
                    )
                except NonFiniteSaliencyError as err:
                    i = s + b + err.index
                    raise SatError(
                        f"teacher {job.teacher} gives non-finite {err.what} on sample "
                        f"{split.ids()[i]!r} (index {i} of split {job.split!r}); map "
                        f"{job.name!r} chunk {k} not written"
                    ) from None
                parts.append(np.asarray(maps, dtype=np.int8))
            return np.concatenate(parts)

    for i, k in enumerate(chunks):
        yield _ChunkTask(k, read, compute, write, last=i == len(chunks) - 1, on_done=on_job_done)


def _pipeline(tasks, overlap: bool) -> int:
    """Run chunk tasks in order; return how many were written.

    With ``overlap`` one I/O thread reads the next chunk's inputs and writes the previous
    chunk's maps while this thread computes. It runs reads and writes in submission order,
    so chunks land in the same order as without overlap. A failed read or write surfaces at
    the next ``result()``; on an error the queued write still completes its chunk (and its
    done flag) or fails it, so no chunk is left half-written.
    """
    if not overlap:
        n = 0
        for task in tasks:
            task.write(task.compute(task.read()))
            n += 1
        return n

    from concurrent.futures import ThreadPoolExecutor

    n = 0
    tasks = iter(tasks)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="precompute-io") as io:
        task = next(tasks, None)
        inputs = io.submit(task.read) if task is not None else None
        last_write = None
        while task is not None:
            nxt = next(tasks, None)  # may open the next job's store and load its teacher
            current = inputs.result()
            inputs = io.submit(nxt.read) if nxt is not None else None
            maps = task.compute(current)
            if last_write is not None:
                last_write.result()
                n += 1
            last_write = io.submit(task.write, maps)
            task = nxt
        if last_write is not None:
            last_write.result()
            n += 1
    return n


# ---- coordinator side ----------------------------------------------------------------------
def _ingest(st: SaliencyStore, cfg: PrecomputeConfig, split_name: str, ds):
    from tqdm.auto import tqdm

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


def _existing_client(address: str):
    """This process's default dask client if it is connected to ``address`` (else None)."""
    from dask.distributed import default_client

    try:
        client = default_client()
    except ValueError:
        return None
    same = getattr(client.scheduler, "address", None) == address and client.status == "running"
    return client if same else None


def _client(cfg: PrecomputeConfig):
    """(client, cluster to close or None, whether to close the client)."""
    from dask.distributed import Client

    if cfg.scheduler:
        # A notebook or script that already holds a client of that scheduler keeps it.
        client = _existing_client(cfg.scheduler)
        if client is not None:
            return client, None, False
        try:
            return Client(cfg.scheduler, timeout="10s"), None, True
        except OSError as e:
            raise SatError(f"cannot reach dask scheduler {cfg.scheduler}: {e}") from None
    cluster = local_cluster(cfg.workers)
    return Client(cluster), cluster, True


# Worker settings of the local cluster. Map tasks are long, CPU-bound and alike, so dask's
# statistical profiler (a stack sample of every thread each 10 ms) and its fast monitors
# only take CPU from the tasks: idle, they cost 2 workers and their scheduler about 13 % of
# one core, against 8 % with these settings.
_QUIET_WORKERS = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def local_cluster(n_workers: int):
    """The local dask cluster ``sat precompute --workers N`` starts: N worker processes of one
    thread each (a map task sets its own torch thread count), no dashboard."""
    import dask
    from dask.distributed import LocalCluster

    with dask.config.set(_QUIET_WORKERS):
        return LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True,
            dashboard_address=None, silence_logs=40,
        )


def _overlap_io(cfg: PrecomputeConfig) -> bool:
    """Whether map tasks overlap their store I/O with the teacher (:attr:`MapJob.overlap_io`):
    on CUDA, and where this machine keeps a core free beside the torch threads of the
    in-process run or local cluster. Not for an external scheduler, whose workers' cores are
    not known here."""
    if cfg.device.startswith("cuda"):
        return True
    if cfg.scheduler:
        return False
    busy = max(1, cfg.workers) * max(1, cfg.threads_per_worker)
    return busy < available_cpus()


def run(cfg: PrecomputeConfig) -> dict[str, Any]:
    """Ingest ``cfg.splits`` and write every planned map; return the run's summary.

    Every input is checked first (:func:`pipelines.precompute_plan.plan_all`), so bad data
    or a wrong teacher is reported before the store location is touched. On a failure after
    that, the maps this run created without writing a chunk are deleted again, and a store
    this run created is removed whole unless some map in it got a chunk (which a retry
    resumes)."""
    t0 = time.perf_counter()
    datasets = {name: cfg.data.open(name) for name in cfg.splits}
    plans, models = plan_all(cfg, datasets)
    if cfg.device == "cpu" and cfg.workers <= 1 and not cfg.scheduler:
        # The in-process tasks use the models the checks loaded, instead of loading again.
        for plan in (p for split_plans in plans.values() for p in split_plans):
            kw = plan[4]
            if kw["kind"] == "teacher":
                _CHECKED[(kw["teacher"], kw["teacher_sha256"])] = models[kw["teacher"]]
    local = "://" not in cfg.store
    created_store = local and not Path(cfg.store).exists()
    writers: list = []
    created_maps: set[tuple[str, str]] = set()
    try:
        st = SaliencyStore.open(cfg.store, "a")
        summary = _write(cfg, st, datasets, plans, writers, created_maps)
    except BaseException as e:
        _CHECKED.clear()
        if local:
            cleanup_failed(cfg.store, created_store, writers, created_maps)
        else:
            for w in writers:
                w.close()
        if isinstance(e, OSError) and not isinstance(e, SatError):
            # A full disk or a permission error names the store, not only "No space left".
            where = f" ({e.filename})" if e.filename else ""
            raise SatError(f"cannot write store {cfg.store}: {e.strerror or e}{where}") from None
        raise
    _CHECKED.clear()
    for w in writers:
        w.close()
    summary.update(
        seconds=time.perf_counter() - t0, config=config_dict(cfg), git_sha=git_sha(),
    )
    if local:
        write_json(Path(cfg.store).with_suffix(".precompute.json"), summary)
    return summary


def _write(cfg: PrecomputeConfig, st: SaliencyStore, datasets: dict, plans: dict,
           writers: list, created_maps: set) -> dict[str, Any]:
    """Ingest the splits into ``st`` and compute their planned maps. Every map writer opened
    is appended to ``writers`` (the caller closes them), and each map that did not exist
    before is added to ``created_maps`` as (split, name)."""
    from tqdm.auto import tqdm

    ingest_s = 0.0  # ingesting splits and checking existing ones against the data
    summary: dict[str, Any] = {"store": cfg.store, "splits": {}, "maps": []}
    jobs: list[MapJob] = []
    overlap_io = _overlap_io(cfg)
    for split_name in cfg.splits:
        t_ingest = time.perf_counter()
        ds, split = _ingest(st, cfg, split_name, datasets[split_name])
        ingest_s += time.perf_counter() - t_ingest
        summary["splits"][split_name] = {"n": split.n, "fingerprint": split.fingerprint}
        for name, prov, enc, channels, kw in plans.get(split_name, []):
            existed = name in split.maps()
            try:
                w = split.create_map(
                    name, provenance=prov, encoding=enc, channels=channels,
                    chunk_size=cfg.chunk_size, shard_chunks=shard_chunks(cfg, split, name),
                    overwrite=cfg.overwrite,
                )
            except (MismatchError, IncompleteMapError) as e:
                raise cli_advice(e) from None
            writers.append(w)
            if not existed:
                created_maps.add((split_name, name))
            pending = set(w.pending_chunks())
            # Name and provenance go back to the caller (compare), so it needs neither to
            # reopen the store nor to hash the teachers again to tell the maps apart.
            summary["maps"].append({"split": split_name, "name": name, "provenance": prov,
                                    "teacher": kw.get("teacher"), "pending_chunks": len(pending)})
            for s in range(w.n_shards):
                if pending.intersection(w.chunks_of_shard(s)):
                    jobs.append(MapJob(
                        store=cfg.store, split=split_name, name=name, data=cfg.data, shard=s,
                        method_params=method_params(cfg), target_rule=cfg.target_rule,
                        quantile=cfg.quantile, heat_threshold=cfg.heat_threshold,
                        batch_size=cfg.batch_size, device=cfg.device, seed=cfg.seed,
                        threads=cfg.threads_per_worker, overlap_io=overlap_io, **kw,
                    ))
    written = 0
    bar = tqdm(total=len(jobs), desc="precompute shards", disable=not cfg.show_progress, unit="shard")
    if cfg.workers <= 1 and not cfg.scheduler:
        written += run_map_jobs(
            jobs, on_job_done=lambda: bar.update(1),
            writers={(w.split.name, w.name): w for w in writers},
        )
    else:
        from dask.distributed import as_completed

        client, cluster, own_client = _client(cfg)
        try:
            futures = client.map(run_map_job_in_worker, jobs, pure=False)
            for fut in as_completed(futures):
                written += fut.result()
                bar.update(1)
        finally:
            if own_client:
                client.close()
            if cluster is not None:
                cluster.close()
    bar.close()
    for w in writers:
        if not w.finalize():
            raise SatError(f"map {w.name!r} still has missing chunks after precompute")
    summary.update(chunks_written=written, seconds_ingest=ingest_s)
    return summary


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, as under
    ``taskset`` or a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
