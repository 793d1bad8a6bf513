"""Checkpoints: one safetensors file holding model, optimizer and scheduler state.

Layout of a checkpoint file (safetensors, so nothing is ever unpickled):

- tensors ``model.<name>``: the *unwrapped* model's state dict (no ``module.`` prefix);
- tensors ``optim.<param index>.<key>``: per-parameter optimizer state (e.g. Adam moments);
- metadata (all strings): ``format_version``, ``kind`` ("sat-checkpoint"), ``arch`` (JSON:
  how to rebuild the model), ``epoch`` (completed epochs), ``config`` (JSON), ``optim``
  (JSON: param groups and non-tensor state), ``sched`` (JSON), ``extra`` (JSON).

Any other tensors in a file are ignored when it is read (older files could name ``rng.*``
tensors; none was ever written). Generator state need not be saved: the loop derives every
epoch's randomness from ``(seed, epoch, rank)``.

Files are written to a temporary name in the same directory and ``os.replace``d into place,
so a killed writer leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saliency_cache.errors import SatError

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``model_state`` holds CPU tensors."""

    arch: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    epoch: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    optim_state: dict[str, Any] | None = None
    sched_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _optim_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optim_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, kv in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` atomically to ``path``; return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ckpt.model_state.items()}
    meta: dict[str, str] = {
        "kind": "sat-checkpoint",
        "format_version": str(FORMAT_VERSION),
        "arch": json.dumps(ckpt.arch, sort_keys=True),
        "epoch": str(ckpt.epoch),
        "config": json.dumps(ckpt.config, sort_keys=True, default=str),
        "extra": json.dumps(ckpt.extra, sort_keys=True, default=str),
    }
    if ckpt.optim_state is not None:
        opt_tensors, opt_meta = _optim_to_flat(ckpt.optim_state)
        tensors.update(opt_tensors)
        meta["optim"] = json.dumps(opt_meta)
    if ckpt.sched_state is not None:
        meta["sched"] = json.dumps(ckpt.sched_state)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SatError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk names the file, not only "No space left"
            raise SatError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
        raise
    return file_sha256(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`. Bad files raise :class:`SatError`."""
    path = Path(path)
    if not path.is_file():
        raise SatError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path), device="cpu")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SatError(f"checkpoint {path} is truncated or corrupt ({e})") from None
    if meta.get("kind") != "sat-checkpoint":
        raise SatError(f"{path} is not a sat checkpoint (metadata kind={meta.get('kind')!r})")
    version = int(meta.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise SatError(
            f"checkpoint {path} has format_version {version}, this tool reads {FORMAT_VERSION}"
        )
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    check_finite(model_state, path)
    optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    optim_state = (
        _optim_from_flat(optim_tensors, json.loads(meta["optim"])) if "optim" in meta else None
    )
    return Checkpoint(
        arch=json.loads(meta["arch"]),
        model_state=model_state,
        epoch=int(meta.get("epoch", 0)),
        config=json.loads(meta.get("config", "{}")),
        optim_state=optim_state,
        sched_state=json.loads(meta["sched"]) if "sched" in meta else None,
        extra=json.loads(meta.get("extra", "{}")),
    )


def load_model(path: str | Path, device: torch.device | str) -> tuple[torch.nn.Module, Checkpoint]:
    """Rebuild the model recorded in a checkpoint and load its weights (eval mode, on ``device``)."""
    from trainer.models import create_model

    ckpt = load_checkpoint(path)
    arch = dict(ckpt.arch)
    missing = [k for k in ("name", "num_classes") if k not in arch]
    if missing:
        raise SatError(f"checkpoint {path} records no model {' or '.join(missing)} (arch {arch})")
    name = arch.pop("name")
    num_classes = arch.pop("num_classes")
    try:
        model = create_model(name, num_classes, **arch)
    except (SatError, TypeError) as e:  # an architecture this code cannot build
        raise SatError(f"checkpoint {path} records an architecture that cannot be built: {e}") from None
    load_weights(model, fold_pruning(ckpt.model_state), path)
    return model.to(device).eval(), ckpt


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """:class:`SatError` naming ``path`` and the first tensor (in file order) holding a NaN or
    an infinity: a diverged run's weights would otherwise train or attack as garbage, or give
    NaN saliency that thresholds to an all-zero map."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise SatError(
                f"checkpoint {path} has non-finite weights: tensor {name!r} holds {bad} NaN/inf "
                f"of {t.numel()} values"
            )


def _listed(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)`` (strict), with a mismatch reported as one
    :class:`SatError` line naming ``path`` and the missing, unexpected and misshapen tensors
    (a few of each, then how many more), instead of torch's multi-line message."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{what}: {_listed(keys)}" for what, keys in (
        ("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes)) if keys]
    if parts:
        arch = getattr(model, "arch", {}).get("name", type(model).__name__)
        raise SatError(f"checkpoint {path} does not fit architecture {arch}: {'; '.join(parts)}")
    model.load_state_dict(state)


def fold_pruning(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with torch's pruning reparametrisation (``<p>_orig`` and ``<p>_mask``, as
    in the sparse teacher's checkpoints taken between pruning steps) turned into plain
    ``<p> = <p>_orig * <p>_mask`` tensors; any other state dict is returned as it is."""
    masks = {k[: -len("_mask")] for k in state if k.endswith("_mask")}
    folded = {p for p in masks if f"{p}_orig" in state and p not in state}
    if not folded:
        return state
    drop = {f"{p}{suffix}" for p in folded for suffix in ("_orig", "_mask")}
    out = {k: v for k, v in state.items() if k not in drop}
    for p in folded:
        out[p] = state[f"{p}_orig"] * state[f"{p}_mask"]
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

