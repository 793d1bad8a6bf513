"""Fault tests: killed and concurrent processes, corrupted chunks.

The processes are real ``sat`` commands (``python -m pipelines.cli``, the code behind the
console script) killed with SIGKILL, so nothing gets to clean up: what survives is what a
power cut or an OOM kill leaves behind. Tiny data (16x16 synthetic shapes, ResNet-10 of width
4) keeps each test to seconds; ``OMP_NUM_THREADS=1`` keeps the subprocesses light and their
arithmetic identical to each other.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipelines.cli import main
from saliency_cache.errors import CorruptChunkError, IncompleteMapError, SatError
from saliency_cache.store import LOCK_NAME, SaliencyStore
from saliency_cache.verify import verify
from tests.chunk_log import sat_command
from tests.helpers import (
    MASK,
    add_random_map,
    corrupt_chunk,
    make_store,
    one_line_error,
    teacher_provenance,
)
from tests.runs import assert_same_weights, metrics_rows, untimed, without_times
from trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainer.loader import StoreStream

SAT = [sys.executable, "-m", "pipelines.cli"]
TEACHER_MAP = "resnet10-std-smoothgrad"
N_CHUNKS = 16  # 256 samples in chunks of 16, 4 chunks per shard
TIMEOUT = 180


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for(what: str, cond, procs=(), timeout: float = TIMEOUT, every: float = 0.02):
    """Poll ``cond()`` until it returns something truthy; fail if a process in ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"process exited ({p.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


# ---- precompute ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """An untrained ResNet-10 (width 4) checkpoint: saliency needs a model, not a good one."""
    from trainer.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet10", 4, width=4)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_checkpoint(
        path,
        Checkpoint(
            arch=model.arch, model_state=model.state_dict(), extra={"teacher_mode": "standard"}
        ),
    )
    return path


def _precompute_args(store: Path, teacher: Path) -> list[str]:
    # SmoothGrad (16 noisy passes per image) makes a chunk take ~0.15 s, so there is time to
    # kill the run part-way; its noise is seeded per image, so a resume is deterministic.
    return [
        "precompute", "--dataset", "synthetic", "--n", "256", "--n-val", "32",
        "--image-size", "16", "--num-classes", "4", "--store", str(store),
        "--teacher", str(teacher), "--method", "smoothgrad", "--chunk-size", "16",
        "--shard-chunks", "4", "--workers", "1", "--quiet",
    ]


def _done_flags(store: Path) -> np.ndarray | None:
    try:
        return SaliencyStore.open(store, "r").split("train").inspect_map(TEACHER_MAP).done_chunks()
    except (SatError, OSError):  # not created yet
        return None


def _logged(log: Path) -> list[int]:
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    assert all(ln.startswith(f"train/{TEACHER_MAP} ") for ln in lines), lines
    return [int(ln.split()[1]) for ln in lines]


def _store_files(root: Path) -> dict[str, object]:
    """Every file's bytes; map metadata parsed, without the ``created`` time a resume keeps."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        if not p.is_file() or key.endswith(".partial"):
            continue  # a temp file of a killed write: never read by zarr
        data = p.read_bytes()
        if key.startswith("train/maps/") and key.count("/") == 3 and key.endswith("zarr.json"):
            meta = json.loads(data)
            meta["attributes"]["provenance"].pop("created")
            out[key] = meta
        else:
            out[key] = data
    return out


def test_killed_precompute_resumes_byte_identical(tmp_path, teacher):
    rng = random.Random(20200914)  # seeds where the kill lands
    killed, reference = tmp_path / "killed.zarr", tmp_path / "reference.zarr"
    first_log, resume_log = tmp_path / "first.log", tmp_path / "resume.log"
    proc = subprocess.Popen(
        [*sat_command(first_log), *_precompute_args(killed, teacher)], env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for("the first chunk", lambda: (d := _done_flags(killed)) is not None and d.any(),
                  [proc])
        time.sleep(rng.uniform(0.0, 1.0))
    finally:
        proc.kill()  # SIGKILL
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = _done_flags(killed)
    assert 0 < done.sum() < N_CHUNKS, f"the kill landed after {done.sum()} chunks"
    assert (killed / "train" / "maps" / TEACHER_MAP / LOCK_NAME).exists()  # nobody released it
    # What the kill left is consistent: missing chunks, nothing corrupt, and readers refuse it.
    problems = verify(SaliencyStore.open(killed, "r"))
    assert problems and {p.kind for p in problems} <= {"missing", "incomplete"}, problems
    with pytest.raises(IncompleteMapError):
        SaliencyStore.open(killed, "r").split("train").open_map(TEACHER_MAP)

    # The resume (taking over the dead writer's lock) and an uninterrupted run, side by side.
    resume = subprocess.Popen([*sat_command(resume_log), *_precompute_args(killed, teacher)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    full = subprocess.Popen([*SAT, *_precompute_args(reference, teacher)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for p in (resume, full):
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err

    done_before = set(np.flatnonzero(done).tolist())
    first, again = _logged(first_log), _logged(resume_log)
    assert len(first) == len(set(first)) and set(first) <= done_before
    assert len(again) == len(set(again))
    assert not set(again) & done_before, "a chunk completed before the kill was computed again"
    assert set(again) | done_before == set(range(N_CHUNKS))
    assert verify(SaliencyStore.open(killed, "r")) == []
    assert _store_files(killed) == _store_files(reference)


def test_concurrent_precompute_on_one_map_is_refused(tmp_path, teacher):
    store = tmp_path / "store.zarr"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    # B imports everything first and waits, so that it reaches the map within a fraction of a
    # second of the go signal, while A is still computing.
    warm = textwrap.dedent(
        """
        import sys
        import captum.attr, torch  # noqa: F401
        import pipelines.precompute, pipelines.teacher, trainer.saliency  # noqa: F401
        from pipelines.cli import main
        from tests.chunk_log import install
        install(sys.argv[1])  # B must not compute a chunk: the log says if it did
        print("ready", flush=True)
        sys.stdin.readline()
        main(sys.argv[2:], prog_name="sat")
        """
    )
    args = _precompute_args(store, teacher)
    b = subprocess.Popen([sys.executable, "-c", warm, str(log_b), *args], env=_env(), text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    a = subprocess.Popen([*sat_command(log_a), *args], env=_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b.stdout.readline().strip() == "ready"
        lock = store / "train" / "maps" / TEACHER_MAP / LOCK_NAME
        _wait_for("A's writer lock", lock.exists, [a])
        assert json.loads(lock.read_text())["pid"] == a.pid
        out, err = b.communicate("go\n", timeout=TIMEOUT)
        assert b.returncode == 2, (out, err)
        assert a.poll() is None, "A finished before B tried: the test did not test anything"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"being written by pid {a.pid}" in lines[0], err
        assert TEACHER_MAP in lines[0]
        out, err = a.communicate(timeout=TIMEOUT)
        assert a.returncode == 0, err
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert _logged(log_b) == []
    assert sorted(_logged(log_a)) == list(range(N_CHUNKS))
    assert not (store / "train" / "maps" / TEACHER_MAP / LOCK_NAME).exists()
    assert verify(SaliencyStore.open(store, "r")) == []
    res = CliRunner().invoke(main, ["cache", "verify", str(store)])
    assert res.exit_code == 0 and res.stdout.strip() == "ok", res.output


# ---- corruption ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_store(tmp_path_factory):
    """256 training samples (chunks of 32, map shards of 2 chunks) with the mask map, 64 val."""
    return make_store(tmp_path_factory.mktemp("train"), n=256, n_val=64, chunk_size=32,
                      maps=("mask",), shard_chunks=2)


def test_corrupt_chunk_is_named_and_training_refuses(train_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(train_store.path, store)
    corrupt_chunk(store / "train" / "maps" / MASK / "data" / "c" / "2" / "0", 1, 2)  # chunk 5

    res = CliRunner().invoke(main, ["cache", "verify", str(store)])
    assert res.exit_code == 1, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train/maps/{MASK} chunk 5: corrupt"), lines

    out = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "train", "--store", str(store), "--mode", "sat", "--map", MASK, "--epochs", "1",
        "--width", "4", "--device", "cpu", "--out", str(out), "--quiet",
    ])
    line = one_line_error(res)
    assert f"map '{MASK}'" in line and "chunk 5" in line and "corrupt" in line, line
    assert not out.exists()  # refused before the run directory was made

    with pytest.raises(CorruptChunkError, match="chunk 5"):
        StoreStream(str(store), "train", [MASK], batch_size=32)
    StoreStream(str(store), "train", [], batch_size=32)  # baselines stream no maps: unaffected


def test_stream_accepts_a_clean_partial_map(tmp_path):
    """The start-up check refuses damage, not the chunks a partial precompute has not written."""
    st = make_store(tmp_path, n=64, chunk_size=16, maps=())
    name = add_random_map(st, "train", teacher_provenance(), skip_chunks=[1], seed=3)
    stream = StoreStream(st.path, "train", [name], batch_size=16, allow_partial=True)
    assert stream.num_samples == 48
    corrupt_chunk(Path(st.path) / "train" / "maps" / name / "data" / "c" / "1" / "0", 0, 2)
    with pytest.raises(CorruptChunkError, match="chunk 2"):
        StoreStream(st.path, "train", [name], batch_size=16, allow_partial=True)


# ---- training -----------------------------------------------------------------------------
def test_killed_training_resumes_to_the_same_result(train_store, tmp_path):
    # PGD-SAT (5 PGD steps on half the batches) makes an epoch last long enough (~0.3 s) to
    # kill the run inside the second one.
    args = [
        *SAT, "train", "--store", train_store.path, "--mode", "pgd-sat", "--map", MASK,
        "--epochs", "4", "--width", "4", "--batch-size", "32", "--device", "cpu",
        "--robust-val-samples", "32", "--quiet",
    ]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref = subprocess.Popen([*args, "--out", str(ref_dir)], env=_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = subprocess.Popen([*args, "--out", str(run_dir)], env=_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The first epoch's checkpoint is written after its metrics row: kill right after it.
        last = run_dir / "checkpoints" / "last.safetensors"
        _wait_for("the first checkpoint", last.exists, [run], every=0.01)
    finally:
        run.kill()
        run.communicate()
    assert run.returncode == -signal.SIGKILL
    epoch = load_checkpoint(run_dir / "checkpoints" / "last.safetensors").epoch
    assert 1 <= epoch < 4 and not (run_dir / "result.json").exists()
    lines_before = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines_before) >= epoch, "a checkpointed epoch has no metrics row"

    resumed = subprocess.run([*args, "--out", str(run_dir), "--resume"], env=_env(), text=True,
                             capture_output=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    out, err = ref.communicate(timeout=TIMEOUT)
    assert ref.returncode == 0, err

    # It continued from the checkpoint: the rows of the epochs before the kill are the killed
    # run's own (their timings included), and only the later epochs were run again.
    lines_after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines_after[:epoch] == lines_before[:epoch]
    rows, ref_rows = metrics_rows(run_dir), metrics_rows(ref_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert without_times(rows) == without_times(ref_rows)
    final = json.loads((run_dir / "result.json").read_text())
    ref_final = json.loads((ref_dir / "result.json").read_text())
    assert untimed(final["final"]) == untimed(ref_final["final"])
    assert final["best"] == ref_final["best"]
    a = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    b = load_checkpoint(ref_dir / "checkpoints" / "last.safetensors")
    assert a.epoch == b.epoch == 4
    assert_same_weights(run_dir / "checkpoints" / "last.safetensors",
                        ref_dir / "checkpoints" / "last.safetensors")
