"""DDP smoke test: `sat train` under torchrun with 2 CPU ranks (gloo) finishes, rank 0 writes
the run directory, and each epoch counts both ranks' samples (up to the lock-step cap)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import MASK, make_store
from trainer.checkpoint import load_checkpoint
from trainer.loader import StoreStream

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed unavailable"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_ranks(tmp_path):
    # 72 samples in blocks of 16 (the last one 8): 5 blocks do not split evenly between 2
    # ranks, so the loader must balance the shares, and the lock-step cap keeps ranks from
    # deadlocking in DDP's all-reduce if they still differ.
    store = make_store(tmp_path, n=72, n_val=32, chunk_size=16, maps=("mask",))
    out = tmp_path / "run"
    epochs, batch, seed = 2, 8, 4
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "pipelines.cli", "train", "--store", store.path, "--mode", "sat", "--map", MASK,
        "--epochs", str(epochs), "--width", "4", "--batch-size", str(batch), "--seed", str(seed),
        "--robust-val-samples", "16", "--device", "cpu", "--quiet", "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for f in ("config.json", "metrics.jsonl", "result.json", "checkpoints/last.safetensors",
              "checkpoints/best.safetensors"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # rank 0 alone writes: no duplicate rows
    # Each epoch trains on every sample once: both ranks' halves are counted.
    assert [r["train_samples"] for r in rows] == [store.n] * epochs
    assert [r["steps"] for r in rows] == [StoreStream(
        store.path, "train", [MASK], batch_size=batch, rank=0, world_size=2
    ).steps_per_epoch(epochs)] * epochs
    assert all(0 <= r["val_acc"] <= 1 for r in rows)
    assert load_checkpoint(out / "checkpoints/last.safetensors").epoch == epochs


NAN_ON_RANK_1 = """
import os
from pipelines.cli import main
from trainer.perturb import create_mode

cls = type(create_mode("sat"))
real, calls = cls.compute, []

def compute(self, *a, **k):
    loss, logits = real(self, *a, **k)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        loss = loss * float("nan")
    return loss, logits

cls.compute = compute
main()
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    # A rank that raised alone would leave the other one waiting in DDP's all-reduce (under
    # launchers that do not kill the survivors); both stop, each saying where it happened.
    store = make_store(tmp_path, n=64, n_val=16, chunk_size=16, maps=("mask",))
    script = tmp_path / "nan_rank1.py"
    script.write_text(NAN_ON_RANK_1)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
        "train", "--store", store.path, "--mode", "sat", "--map", MASK, "--epochs", "1",
        "--width", "4", "--batch-size", "8", "--robust-val-samples", "0", "--device", "cpu",
        "--quiet", "--out", str(tmp_path / "run"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "error: loss became nan at epoch 1, step 2 (rank 1)" in out, out[-3000:]
    assert "error: loss became nan at epoch 1, step 2 (another rank)" in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
