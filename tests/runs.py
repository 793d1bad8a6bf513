"""Reading what a training run leaves in its directory (shared by the training, teacher and
fault tests): its metrics rows without the wall-clock fields, and its checkpoints' weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.checkpoint import load_checkpoint

TIMES = ("epoch_time_s", "images_per_s")  # the metrics that differ between identical runs


def metrics_rows(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` ([] when the file does not exist)."""
    path = Path(run_dir, "metrics.jsonl")
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMES}


def without_times(rows: list[dict]) -> list[dict]:
    return [untimed(r) for r in rows]


def assert_same_weights(a: str | Path, b: str | Path) -> None:
    """The two checkpoint files hold the same tensors, bit for bit."""
    wa, wb = load_checkpoint(a).model_state, load_checkpoint(b).model_state
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
