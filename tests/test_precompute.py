"""The precompute stage (``pipelines.precompute.run`` / ``sat precompute``) on tiny synthetic data.

What a user relies on: one named map per (teacher, method) and per weak source, with full
provenance; maps equal to what the teacher (or the annotation) gives for each sample; the
same bytes whatever the worker count, the scheduler, or an interruption part-way; the same
decoded maps whatever the chunk, shard and batch sizes; and a teacher loaded once per worker.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pipelines.precompute as pc
from pipelines.cli import main
from pipelines.common import DataSpec
from pipelines.precompute import PrecomputeConfig, run
from pipelines.teacher import TeacherConfig
from pipelines.teacher import run as train_teacher
from saliency_cache.errors import IncompleteMapError, MismatchError, SatError
from saliency_cache.store import LOCK_NAME, MapWriter, SaliencyStore
from tests import chunk_log
from tests.dataset_files import make_oxford17, make_tiny_imagenet
from trainer.checkpoint import file_sha256, load_model
from trainer.data.weak import box_to_map, mask_to_map
from trainer.loop import LoopConfig
from trainer.saliency import compute_maps, create_method

N, SIZE, CLASSES = 64, 16, 4
DATA = DataSpec(
    "synthetic", None, {"n": N, "n_val": 32, "image_size": SIZE, "num_classes": CLASSES, "seed": 0}
)
DATA_ARGS = ["--dataset", "synthetic", "--n", str(N), "--n-val", "32", "--image-size", str(SIZE),
             "--num-classes", str(CLASSES), "--data-seed", "0"]
REPO = Path(__file__).resolve().parents[1]


# ---- helpers -------------------------------------------------------------------------------
@contextmanager
def _torch_threads(n: int):
    # Workers compute with one torch thread; recompute expectations the same way.
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _cfg(store, teachers=(), **kw) -> PrecomputeConfig:
    """16-sample chunks, one chunk per shard: a 64-sample map is 4 chunks, 4 shards, 4 tasks."""
    base = {
        "store": str(store), "data": DATA, "teachers": tuple(str(t) for t in teachers),
        "methods": ("gbp",), "weak": ("box", "mask"), "chunk_size": 16, "shard_chunks": 1,
        "batch_size": 8, "device": "cpu", "show_progress": False,
    }
    return PrecomputeConfig(**{**base, **kw})


def _store_files(root) -> dict[str, bytes]:
    """Every file of a store by relative path; in zarr.json files the provenance's ``created``
    time is dropped (the only thing two runs of the same precompute may differ in)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name == "zarr.json":
            meta = json.loads(data)
            prov = meta.get("attributes", {}).get("provenance")
            if isinstance(prov, dict):
                prov.pop("created", None)
            data = json.dumps(meta, sort_keys=True).encode()
        out[p.relative_to(root).as_posix()] = data
    return out


def _assert_same_store(a, b) -> None:
    fa, fb = _store_files(a), _store_files(b)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"files differ: {differ}"
    # The comparison covers real data: every map has its shard files.
    assert any("/maps/" in k and "/data/c/" in k for k in fa)


def _decoded(store, split: str = "train") -> dict[str, np.ndarray]:
    sp = SaliencyStore.open(store, "r").split(split)
    return {name: sp.open_map(name).read(0, sp.n) for name in sp.maps()}


def _expected_teacher_maps(teacher, method: str, *, target_rule="label", quantile=0.0, batch=8,
                           **params):
    """int8 maps of the whole train split, computed here from the teacher checkpoint."""
    model, _ = load_model(teacher, "cpu")
    ds = DATA.open("train")
    x = torch.from_numpy(ds.load_images(0, len(ds))).float() / 255
    y = torch.from_numpy(np.asarray(ds.labels()))
    m = create_method(method, **params)
    with _torch_threads(1):
        parts = [
            compute_maps(m, model, x[s : s + batch], y[s : s + batch],
                         target_rule=target_rule, quantile=quantile)[0]
            for s in range(0, len(ds), batch)
        ]
    return np.concatenate(parts)


def _chunk_log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """A standard and an adversarial ResNet-10 (width 4, one epoch) of the synthetic data."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for mode in ("standard", "adversarial"):
        cfg = TeacherConfig(
            data=DATA, out=str(root / mode), width=4, mode=mode, batch_size=32, val_split=None,
            loop=LoopConfig(epochs=1, show_progress=False, robust_val_samples=0), device="cpu",
        )
        out[mode] = Path(train_teacher(cfg)["checkpoint"])
    return out


@pytest.fixture(scope="module")
def reference(teachers, tmp_path_factory) -> Path:
    """An uninterrupted in-process precompute: standard teacher's GBP, box and mask maps."""
    store = tmp_path_factory.mktemp("reference") / "store.zarr"
    res = run(_cfg(store, [teachers["standard"]]))
    assert res["chunks_written"] == 3 * 4
    return store


# ---- what gets written ---------------------------------------------------------------------
def test_cli_writes_one_map_per_teacher_method_and_weak_source(teachers, tmp_path):
    store = tmp_path / "s.zarr"
    res = CliRunner().invoke(main, [
        "precompute", *DATA_ARGS, "--store", str(store),
        "--teacher", str(teachers["standard"]), "--teacher", str(teachers["adversarial"]),
        "--method", "gbp,gradcam++", "--weak", "box,mask", "--chunk-size", "16",
        "--shard-chunks", "2", "--batch-size", "8", "--device", "cpu", "--quiet", "--json",
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["chunks_written"] == 6 * 4
    assert 0 < summary["seconds_ingest"] < summary["seconds"]
    assert json.loads(store.with_suffix(".precompute.json").read_text())["chunks_written"] == 24

    st = SaliencyStore.open(store, "r")
    assert st.splits() == ["train", "val"]
    assert st.split("val").maps() == []  # maps only for --map-splits (train)
    sp = st.split("train")
    ds = DATA.open("train")
    assert sp.ids() == ds.ids() and np.array_equal(sp.labels(), ds.labels())
    assert sp.fingerprint == ds.fingerprint()
    assert np.array_equal(sp.read_images(0, N), ds.load_images(0, N))
    gradcampp = create_method("gradcam++").name
    names = {
        "resnet10-std-gbp": ("standard", "gbp"), "resnet10-adv-gbp": ("adversarial", "gbp"),
        "resnet10-std-gradcampp": ("standard", gradcampp),
        "resnet10-adv-gradcampp": ("adversarial", gradcampp),
    }
    assert sorted(sp.maps()) == sorted([*names, "box", "mask"])

    for name, (mode, method) in names.items():
        r = sp.open_map(name)
        p = r.provenance
        assert p["source"] == "teacher" and p["teacher_arch"] == "resnet10"
        assert p["teacher_mode"] == mode and p["method"] == method
        assert p["checkpoint_sha256"] == file_sha256(teachers[mode])
        assert p["checkpoint_sha256"] == json.loads(
            (teachers[mode].parent / "teacher.json").read_text())["sha256"]
        assert p["method_params"] == create_method(method).params
        assert p["target_rule"] == "label"
        assert p["package_version"] == version("sat-pipeline")
        created = dt.datetime.fromisoformat(p["created"])
        assert created.utcoffset() == dt.timedelta(0)
        assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600
        if method == "gbp":  # signed gradients: ternary, one value per image channel
            assert (r.encoding, r.shape, p["encoding"]) == ("ternary", (3, SIZE, SIZE), "ternary")
            assert p["threshold"] == 0.0 and p["threshold_kind"] == "quantile"
        else:  # heatmaps: binary, one channel
            assert (r.encoding, r.shape, p["encoding"]) == ("binary", (1, SIZE, SIZE), "binary")
            assert p["threshold"] == 0.5 and p["threshold_kind"] == "heatmap_fraction"
        expected = _expected_teacher_maps(teachers[mode], method)
        assert np.array_equal(r.read(0, N), expected), name
    for source in ("box", "mask"):
        p = sp.open_map(source).provenance
        assert p["source"] == source and p["method"] == f"{source}-annotation"
        assert p["teacher_arch"] is None and p["checkpoint_sha256"] is None
        assert p["target_rule"] is None and p["encoding"] == "binary"
        assert p["package_version"] == version("sat-pipeline")
        assert p["missing_annotations"] == 0 and p["created"]
    # The teacher maps differ between teachers and methods (nothing is accidentally shared).
    dec = _decoded(store)
    assert not np.array_equal(dec["resnet10-std-gbp"], dec["resnet10-adv-gbp"])
    assert not list(store.rglob(LOCK_NAME))

    ok = CliRunner().invoke(main, ["cache", "verify", str(store)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == "ok"


def test_weak_maps_equal_the_rasterised_annotations(reference):
    ds = DATA.open("train")
    _, h, w = ds.image_shape
    dec = _decoded(reference)
    assert dec["box"].shape == dec["mask"].shape == (N, 1, h, w)
    boxes = np.stack([box_to_map(ds.get_box(i), h, w) for i in range(N)])
    masks = np.stack([mask_to_map(*ds.get_mask(i)) for i in range(N)])
    assert np.array_equal(dec["box"], boxes)
    assert np.array_equal(dec["mask"], masks)
    assert not np.array_equal(dec["box"], dec["mask"])  # shapes are not all rectangles


def test_box_maps_of_tiny_imagenet_files(tmp_path):
    root = make_tiny_imagenet(tmp_path / "data", n_classes=2, per_class=4, size=16)
    data = DataSpec("tiny-imagenet", str(root), {"image_size": 16})
    store = tmp_path / "s.zarr"
    run(PrecomputeConfig(store=str(store), data=data, splits=("train",), weak=("box",),
                         chunk_size=3, batch_size=3, show_progress=False))
    ds = data.open("train")
    sp = SaliencyStore.open(store, "r").split("train")
    assert sp.ids() == ds.ids()
    got = sp.open_map("box").read(0, sp.n)
    want = np.stack([box_to_map(ds.get_box(i), 16, 16) for i in range(len(ds))])
    assert np.array_equal(got, want)
    assert (got[0] == 1).all()  # the fixture's first box is the whole image
    assert (got[1] == 1).sum() == 1  # and its second a single pixel


def test_mask_maps_of_oxford17_files_keep_ignore_band_and_missing_masks(tmp_path):
    root = make_oxford17(tmp_path / "flowers", n_classes=2, in_class=(0, 1, 2, 3), size=16)
    data = DataSpec("oxford17", str(root), {"image_size": 16})
    store = tmp_path / "s.zarr"
    run(PrecomputeConfig(store=str(store), data=data, splits=("train",), weak=("mask",),
                         chunk_size=4, show_progress=False))
    ds = data.open("train")
    r = SaliencyStore.open(store, "r").split("train").open_map("mask")
    assert r.encoding == "ternary"  # the unlabelled band is 0: neither flower nor background
    missing = ~ds.annotated("mask")
    assert r.provenance["missing_annotations"] == int(missing.sum()) > 0
    got = r.read(0, r.n)
    for i in range(len(ds)):
        fg, ign = ds.get_mask(i)
        if fg is None:
            assert (got[i] == 0).all()
        else:
            assert np.array_equal(got[i], mask_to_map(fg, ign))
    assert set(np.unique(got[~missing])) == {-1, 0, 1}


def test_argmax_target_rule_is_recorded_and_named_apart(teachers, tmp_path):
    store = tmp_path / "s.zarr"
    t = teachers["standard"]
    run(_cfg(store, [t], weak=()))
    run(_cfg(store, [t], weak=(), target_rule="argmax"))
    sp = SaliencyStore.open(store, "r").split("train")
    assert sorted(sp.maps()) == ["resnet10-std-gbp", "resnet10-std-gbp-argmax"]
    r = sp.open_map("resnet10-std-gbp-argmax")
    assert r.provenance["target_rule"] == "argmax"
    assert sp.open_map("resnet10-std-gbp").provenance["target_rule"] == "label"
    by_argmax = r.read(0, N)
    by_label = sp.open_map("resnet10-std-gbp").read(0, N)
    assert np.array_equal(by_argmax, _expected_teacher_maps(t, "gbp", target_rule="argmax"))

    model, _ = load_model(t, "cpu")
    x = torch.from_numpy(sp.read_images(0, N)).float() / 255
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    agree = pred == sp.labels()
    assert agree.any() and not agree.all()  # a one-epoch teacher gets some samples wrong
    same = np.array([np.array_equal(a, b) for a, b in zip(by_argmax, by_label, strict=True)])
    assert same[agree].all()  # same class explained: same map
    assert not same[~agree].any()  # another class explained: another map


def test_quantile_zeroes_small_attributions_and_is_part_of_provenance(teachers, reference, tmp_path):
    t = teachers["standard"]
    store = tmp_path / "s.zarr"
    run(_cfg(store, [t], weak=(), quantile=0.5))
    r = SaliencyStore.open(store, "r").split("train").open_map("resnet10-std-gbp")
    assert r.provenance["threshold"] == 0.5
    maps = r.read(0, N)
    assert np.array_equal(maps, _expected_teacher_maps(t, "gbp", quantile=0.5))
    zeros = (maps == 0).reshape(N, -1).mean(1)
    assert np.all((zeros >= 0.45) & (zeros <= 0.75))  # about half of each map, and no more
    # The same name with another threshold would be another map: refused, not mixed.
    copy = tmp_path / "ref.zarr"
    shutil.copytree(reference, copy)
    with pytest.raises(MismatchError, match="threshold"):
        run(_cfg(copy, [t], weak=(), quantile=0.5))


def test_smoothgrad_maps_record_their_version_and_refuse_to_resume_an_older_one(teachers, tmp_path):
    t = teachers["standard"]
    name = "resnet10-std-smoothgrad"
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    run(_cfg(a, [t], methods=("smoothgrad",), weak=(), method_params={"nt_samples": 4}))
    run(_cfg(b, [t], methods=("smoothgrad",), weak=(), method_params={"nt_samples": 4},
             batch_size=5, chunk_size=32))
    ra = SaliencyStore.open(a, "r").split("train").open_map(name)
    assert ra.provenance["method_version"] == 2
    assert np.array_equal(ra.read(0, N), _expected_teacher_maps(t, "smoothgrad", nt_samples=4))
    # Batch and chunk sizes do not change a byte of the maps.
    assert np.array_equal(ra.read(0, N), SaliencyStore.open(b, "r").split("train").open_map(name).read(0, N))
    # A map written before the version existed (no method_version key) stays readable, but a
    # precompute does not resume it with the new noise.
    for meta_path in a.rglob("zarr.json"):
        meta = json.loads(meta_path.read_text())
        prov = meta.get("attributes", {}).get("provenance")
        if isinstance(prov, dict) and prov.get("method") == "smoothgrad":
            del prov["method_version"]
            meta_path.write_text(json.dumps(meta))
    old = SaliencyStore.open(a, "r").split("train").open_map(name)
    assert "method_version" not in old.provenance and old.read(0, N).shape[0] == N
    with pytest.raises(MismatchError, match="method_version"):
        run(_cfg(a, [t], methods=("smoothgrad",), weak=(), method_params={"nt_samples": 4}))


# ---- the same store whatever the execution -------------------------------------------------
@pytest.mark.parametrize(
    ("chunk_size", "shard_chunks", "batch_size"),
    [(32, 2, 8), (64, None, 5), (16, None, 16)],
    ids=["chunk32-shard2", "chunk64-batch5", "chunk16-auto-shards-batch16"],
)
def test_chunk_shard_and_batch_size_do_not_change_the_maps(
    teachers, reference, tmp_path, chunk_size, shard_chunks, batch_size
):
    store = tmp_path / "s.zarr"
    run(_cfg(store, [teachers["standard"]], chunk_size=chunk_size, shard_chunks=shard_chunks,
             batch_size=batch_size))
    got, want = _decoded(store), _decoded(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    r = SaliencyStore.open(store, "r").split("train").open_map("box")
    assert r.chunk_size == chunk_size


def test_default_shards_give_parallel_tasks_and_resume_keeps_an_existing_layout(teachers, tmp_path):
    store = tmp_path / "s.zarr"
    run(_cfg(store, (), weak=("box",), shard_chunks=None))
    r = SaliencyStore.open(store, "r").split("train").open_map("box")
    assert r.n_chunks == 4 and r.n_shards >= 2  # two workers both get work
    # A map laid out otherwise by an earlier run is resumed as it is, not refused.
    other = tmp_path / "other.zarr"
    run(_cfg(other, (), weak=("box",), shard_chunks=4))
    res = run(_cfg(other, (), weak=("box",), shard_chunks=None))
    assert res["chunks_written"] == 0
    assert SaliencyStore.open(other, "r").split("train").open_map("box").shard_chunks == 4


def test_two_dask_workers_write_the_same_bytes_as_in_process(
    teachers, reference, tmp_path, monkeypatch
):
    log = tmp_path / "chunks.log"
    store = tmp_path / "s.zarr"
    with chunk_log.in_dask_workers(log):
        res = run(_cfg(store, [teachers["standard"]], workers=2))
    assert res["chunks_written"] == 12
    _assert_same_store(store, reference)
    lines = _chunk_log(log)
    assert sorted(lines) == sorted({*lines}) and len(lines) == 12  # each chunk computed once


def _install_worker_counters():
    """Run on each dask worker: count tasks and teacher loads in that process."""
    import pipelines.precompute as wpc
    import trainer.checkpoint as wck

    counts = {"tasks": 0, "loads": 0}
    real_job, real_load = wpc.run_map_job, wck.load_model

    def counted_job(job):
        counts["tasks"] += 1
        return real_job(job)

    def counted_load(*a, **kw):
        counts["loads"] += 1
        return real_load(*a, **kw)

    wpc.run_map_job, wck.load_model = counted_job, counted_load
    wpc._test_counts = counts
    return os.getpid()


def _read_worker_counters():
    import pipelines.precompute as wpc

    return dict(wpc._test_counts)


def test_existing_scheduler_is_used_and_loads_the_teacher_once_per_worker(
    teachers, reference, tmp_path
):
    from dask.distributed import Client, LocalCluster

    store = tmp_path / "s.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster:
        # Not the default client: precompute connects to the address on its own, as the CLI does.
        with Client(cluster, set_as_default=False) as client:
            pids = client.run(_install_worker_counters)
            assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
            res = run(_cfg(store, [teachers["standard"]], scheduler=cluster.scheduler_address,
                           workers=1))
            counts = client.run(_read_worker_counters)
        # A caller's own client of that scheduler is used, and left open for the caller.
        with Client(cluster) as mine:
            again = run(_cfg(tmp_path / "t.zarr", (), weak=("box",),
                             scheduler=cluster.scheduler_address))
            assert mine.status == "running" and again["chunks_written"] == 4
    assert res["chunks_written"] == 12
    _assert_same_store(store, reference)
    assert sum(c["tasks"] for c in counts.values()) == 12  # 3 maps x 4 shards, all on the cluster
    for c in counts.values():
        assert c["loads"] <= 1  # once per worker process, whatever its number of tasks
    assert sum(c["loads"] for c in counts.values()) < sum(c["tasks"] for c in counts.values())


def test_in_process_run_loads_each_teacher_once(teachers, tmp_path, monkeypatch):
    import trainer.checkpoint

    monkeypatch.setattr(pc, "_WORKER_CACHE", {})
    calls = []
    real = trainer.checkpoint.load_model

    def counted(path, device):
        calls.append(Path(path).parent.name)
        return real(path, device)

    monkeypatch.setattr(trainer.checkpoint, "load_model", counted)
    res = run(_cfg(tmp_path / "s.zarr", teachers.values(), methods=("gbp", "gradcam++"), weak=()))
    assert res["chunks_written"] == 4 * 4  # 2 teachers x 2 methods x 4 chunks, 16 tasks
    assert sorted(calls) == ["adversarial", "standard"]


def test_in_process_run_leaves_the_callers_torch_threads_alone(teachers, tmp_path):
    with _torch_threads(2):
        run(_cfg(tmp_path / "s.zarr", [teachers["standard"]], weak=(), threads_per_worker=1))
        assert torch.get_num_threads() == 2


# ---- interruption and resume ---------------------------------------------------------------
@pytest.mark.parametrize("overlap_io", [False, True], ids=["serial", "overlapped-io"])
def test_interrupted_run_resumes_the_pending_chunks_to_identical_bytes(
    teachers, reference, tmp_path, monkeypatch, overlap_io
):
    # Both in-process schedules: chunk by chunk, and with reads and writes on an I/O thread
    # (a failed write must surface, leave the chunks before it done and none half-written).
    monkeypatch.setattr(pc, "_overlap_io", lambda cfg: overlap_io)
    store = tmp_path / "s.zarr"
    cfg = _cfg(store, [teachers["standard"]])
    real = MapWriter.write_chunk
    written = []

    def write_then_fail(self, k, values):
        if len(written) == 5:
            raise RuntimeError("simulated crash")
        real(self, k, values)
        written.append((self.name, k))

    monkeypatch.setattr(MapWriter, "write_chunk", write_then_fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    monkeypatch.setattr(MapWriter, "write_chunk", real)

    sp = SaliencyStore.open(store, "r").split("train")
    assert not list(store.rglob(LOCK_NAME))  # the failed run released its writer locks
    done = {name: sp.inspect_map(name).done_chunks() for name in sp.maps()}
    assert sum(int(d.sum()) for d in done.values()) == 5
    partial = [n for n, d in done.items() if not d.all()]
    with pytest.raises(IncompleteMapError):
        sp.open_map(partial[0])
    created = {n: sp.inspect_map(n).provenance["created"] for n in sp.maps()}

    log = tmp_path / "chunks.log"
    monkeypatch.setattr(MapWriter, "write_chunk", chunk_log.logged_write_chunk(log, real))
    res = run(cfg)
    assert res["chunks_written"] == 12 - 5
    recomputed = {tuple(line.rsplit(" ", 1)) for line in _chunk_log(log)}
    assert len(recomputed) == 7
    assert not recomputed & {(f"train/{n}", str(k)) for n, k in written}
    _assert_same_store(store, reference)
    sp = SaliencyStore.open(store, "r").split("train")
    for n, c in created.items():
        assert sp.open_map(n).provenance["created"] == c  # a resume keeps the creation time


_KILL_SCRIPT = """
import os, signal, sys
from saliency_cache.encoding import pack
from saliency_cache.store import MapWriter

kill_at = int(sys.argv[1])
calls = [0]
real = MapWriter.write_chunk

def write_chunk(self, k, values):
    calls[0] += 1
    if calls[0] < kill_at:
        return real(self, k, values)
    # Die between the data write and its done flag: the worst moment for a resume.
    s, e = self.chunk_bounds(k)
    self._data[s:e] = pack(values, self.encoding)
    os.kill(os.getpid(), signal.SIGKILL)

MapWriter.write_chunk = write_chunk
from pipelines.cli import main
main(sys.argv[2:], prog_name="sat")
"""


def test_killed_precompute_resumes_to_identical_bytes(teachers, reference, tmp_path):
    store = tmp_path / "s.zarr"
    args = ["precompute", *DATA_ARGS, "--store", str(store), "--teacher",
            str(teachers["standard"]), "--method", "gbp", "--weak", "box,mask",
            "--chunk-size", "16", "--shard-chunks", "1", "--batch-size", "8",
            "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, "7", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    locks = list(store.rglob(LOCK_NAME))
    assert len(locks) == 3  # the dead process held every map's lock
    sp = SaliencyStore.open(store, "r").split("train")
    assert sum(int(sp.inspect_map(n).done_chunks().sum()) for n in sp.maps()) == 6

    res = CliRunner().invoke(main, [*args, "--json"])  # takes over the dead writer's locks
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["chunks_written"] == 12 - 6
    _assert_same_store(store, reference)
    ok = CliRunner().invoke(main, ["cache", "verify", str(store)])
    assert ok.exit_code == 0, ok.output


# ---- the teacher that is used is the one recorded ------------------------------------------
def test_a_replaced_teacher_file_is_not_served_from_the_worker_cache(teachers, tmp_path):
    path = tmp_path / "teacher.safetensors"
    shutil.copyfile(teachers["standard"], path)
    run(_cfg(tmp_path / "a.zarr", [path], weak=()))
    shutil.copyfile(teachers["adversarial"], path)  # retrained in place, same process
    run(_cfg(tmp_path / "b.zarr", [path], weak=()))
    r = SaliencyStore.open(tmp_path / "b.zarr", "r").split("train").open_map("resnet10-adv-gbp")
    assert r.provenance["checkpoint_sha256"] == file_sha256(teachers["adversarial"])
    assert np.array_equal(r.read(0, N), _expected_teacher_maps(path, "gbp"))


def test_a_teacher_changed_during_the_run_is_refused(teachers, tmp_path, monkeypatch):
    path = tmp_path / "teacher.safetensors"
    shutil.copyfile(teachers["standard"], path)
    real = pc._job_tasks

    def replace_then_run(job, *args):
        shutil.copyfile(teachers["adversarial"], path)  # after planning, before the task
        return real(job, *args)

    monkeypatch.setattr(pc, "_job_tasks", replace_then_run)
    with pytest.raises(SatError, match="changed"):
        run(_cfg(tmp_path / "s.zarr", [path], weak=()))


# ---- refusals ------------------------------------------------------------------------------
def test_teacher_of_another_class_count_is_refused(teachers, tmp_path):
    data = DataSpec("synthetic", None, {"n": 32, "image_size": SIZE, "num_classes": 3})
    with pytest.raises(SatError, match="predicts 4 classes"):
        run(_cfg(tmp_path / "s.zarr", [teachers["standard"]], data=data, weak=()))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--method", "lime"], "unknown saliency method 'lime'"),
        (["--weak", "scribble"], "unknown weak saliency source 'scribble'"),
        (["--map-splits", "test"], "map split 'test'"),
        (["--quantile", "1.5"], "quantile must be in"),
    ],
)
def test_cli_refuses_bad_input_with_one_line(teachers, tmp_path, extra, match):
    res = CliRunner().invoke(main, ["precompute", *DATA_ARGS, "--store", str(tmp_path / "s.zarr"),
                                    "--teacher", str(teachers["standard"]), *extra, "--quiet"])
    assert res.exit_code == 2
    assert match in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()


def test_cli_refuses_a_missing_teacher(tmp_path):
    res = CliRunner().invoke(main, ["precompute", *DATA_ARGS, "--store", str(tmp_path / "s.zarr"),
                                    "--teacher", str(tmp_path / "nope.safetensors"), "--quiet"])
    assert res.exit_code == 2 and "teacher checkpoint not found" in res.output


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_io_overlap_follows_the_cpus_the_process_may_use():
    # Pinned to one CPU (taskset, a container's cpuset): no I/O thread competing with the
    # teacher for that CPU.
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from pipelines.precompute import PrecomputeConfig, _overlap_io, available_cpus\n"
        "from pipelines.common import DataSpec\n"
        "cfg = PrecomputeConfig(store='s.zarr', data=DataSpec('synthetic', None, {}))\n"
        "print(available_cpus(), _overlap_io(cfg))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]


def test_dask_workers_of_a_cuda_precompute_spread_over_the_gpus():
    from pipelines.precompute import worker_device

    assert [worker_device("cuda", i, 2) for i in range(4)] == ["cuda:0", "cuda:1"] * 2
    assert worker_device("cuda", "3", 4) == "cuda:3"  # local cluster names, as strings too
    named = worker_device("cuda", "tcp://10.0.0.7:4001", 4)
    assert named.startswith("cuda:") and named == worker_device("cuda", "tcp://10.0.0.7:4001", 4)
    assert worker_device("cuda", 5, 1) == "cuda"  # one GPU: nothing to spread
    assert worker_device("cuda:1", 0, 2) == "cuda:1"  # an explicit device is kept
    assert worker_device("cpu", 1, 2) == "cpu"
