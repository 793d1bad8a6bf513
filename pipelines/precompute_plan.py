"""Precompute, before anything is written: every input checked, every map planned.

:func:`plan_all` opens nothing at the store location. It reads each split's image headers,
every box or mask the weak maps will use, and loads each teacher, checks its weights, its
class count and channels against the data and runs it on the first image, so that a wrong
input is reported before a store, a split or a map exists. :func:`cleanup_failed` undoes
what a failed run created: maps that got no chunk, and a store that was new and got none.
The shard layout of a new map (:func:`auto_shard_chunks`) is planned here too.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from saliency_cache.errors import SatError
from saliency_cache.store import map_name_from_provenance, sanitize_map_name

# One map to write: (name, provenance, encoding, channels, MapJob keyword arguments).
Plan = tuple[str, dict, str, int, dict]


def method_params(cfg) -> dict[str, Any]:
    """Parameters for every method; each method keeps the ones it takes (seed: SmoothGrad,
    threshold: Grad-CAM++ boxes)."""
    return {"seed": cfg.seed, "threshold": cfg.heat_threshold, **cfg.method_params}


def check_annotations(ds, source: str) -> None:
    """Read every ``source`` ("box" or "mask") annotation of ``ds``: a mask of the wrong size or
    an unreadable file raises :class:`SatError` (naming the file) here, not in a map task."""
    for i in np.flatnonzero(ds.annotated(source)):
        if source == "box":
            ds.get_box(int(i))
        else:
            ds.get_mask(int(i))


def check_teacher(path: str, ds, cfg) -> tuple[dict[str, Any], Any]:
    """(provenance, model on the CPU in eval mode) of teacher ``path``, checked against ``ds``.

    Loads the model (a truncated file, weights that do not fit the recorded architecture or
    hold NaN/inf raise :class:`SatError`), compares its class count and input channels with
    the dataset's, and runs it on the first image: logits of another shape, or non-finite
    ones, are refused with the teacher and the sample id named. A timm / torchvision teacher
    is also refused here when it cannot run ``cfg.methods`` (see
    :func:`trainer.teachers.describe_external`).
    """
    import torch

    from pipelines.teacher import describe_teacher
    from trainer.checkpoint import load_model
    from trainer.teachers import is_external, load_external

    tprov = describe_teacher(path, image_shape=ds.image_shape, methods=cfg.methods,
                             cam_layer=cfg.cam_layer)
    if tprov["teacher_num_classes"] not in (None, ds.num_classes):
        raise SatError(
            f"teacher {path} predicts {tprov['teacher_num_classes']} classes, dataset "
            f"{ds.name}/{ds.split} has {ds.num_classes}"
        )
    if is_external(path):
        model = load_external(path, "cpu", sha256=tprov["checkpoint_sha256"],
                              **teacher_options(tprov, ds))
        channels = ds.image_shape[0]  # the teacher was built for these images
    else:
        model, ck = load_model(path, "cpu")
        channels = ck.arch.get("in_channels", 3)
    if channels != ds.image_shape[0]:
        raise SatError(
            f"teacher {path} takes {channels}-channel images, dataset {ds.name} has "
            f"{ds.image_shape[0]} channels"
        )
    if len(ds):
        x = torch.from_numpy(np.asarray(ds.load_images(0, 1))).float().div_(255.0)
        try:
            with torch.no_grad():
                logits = model(x)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise SatError(
                f"teacher {path} cannot run on {ds.name} images of shape "
                f"{tuple(ds.image_shape)}: {first}"
            ) from None
        if tuple(logits.shape) != (1, ds.num_classes):
            raise SatError(
                f"teacher {path} gives logits of shape {tuple(logits.shape)[1:]}, dataset "
                f"{ds.name} has {ds.num_classes} classes"
            )
        if not bool(torch.isfinite(logits).all()):
            raise SatError(
                f"teacher {path} gives non-finite logits on sample {ds.ids()[0]!r} of "
                f"{ds.name}/{ds.split}"
            )
    return tprov, model


def teacher_options(tprov: dict[str, Any], ds) -> dict[str, Any]:
    """How a worker rebuilds a timm/torchvision teacher as planned (empty for ours)."""
    if "teacher_library" not in tprov:
        return {}
    return {"image_shape": list(ds.image_shape), "cam_layer": tprov["teacher_cam_layer"]}


def plan_maps(cfg, ds, teachers: dict[str, dict[str, Any]]) -> list[Plan]:
    """Every map to write in split ``ds``; ``teachers`` maps each checkpoint to its checked
    provenance (:func:`check_teacher`)."""
    from trainer.data.weak import weak_encoding
    from trainer.saliency import create_method, map_channels, method_encoding

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
        tprov = teachers[t]
        for m in cfg.methods:
            method = create_method(m, **method_params(cfg))
            enc = method_encoding(method)
            prov = {
                "source": "teacher", **tprov, "method": m, "method_params": method.params,
                "encoding": enc,
                "threshold": cfg.quantile if enc == "ternary" else method.params.get("threshold", cfg.heat_threshold),
                "threshold_kind": "quantile" if enc == "ternary" else "heatmap_fraction",
                "target_rule": cfg.target_rule, "seed": cfg.seed,
            }
            if method.version > 1:  # maps of version 1 carry no such key (written before it)
                prov["method_version"] = method.version
            plans.append(
                (map_name_from_provenance(prov), prov, enc, map_channels(method, ds.image_shape[0]),
                 {"kind": "teacher", "teacher": t, "method": m,
                  "teacher_sha256": tprov["checkpoint_sha256"],
                  "teacher_options": teacher_options(tprov, ds)})
            )
    names = [p[0] for p in plans]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SatError(f"two maps would share the name(s) {sorted(dup)}; vary teachers or methods")
    return plans


def plan_all(cfg, datasets: dict[str, Any]) -> tuple[dict[str, list[Plan]], dict[str, Any]]:
    """Check every input of a precompute and plan its maps: ({split: [Plan, ...]},
    {teacher checkpoint: its model, loaded on the CPU}).

    Reads every image header of each split (a zero-byte or non-image file is named), every
    annotation the weak maps use, and loads every teacher once (:func:`check_teacher`,
    against the first map split's data). Raises :class:`SatError` on the first bad input.
    """
    for ds in datasets.values():
        ds.check_files()
    teachers: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    plans: dict[str, list[Plan]] = {}
    for split in cfg.map_splits:
        ds = datasets[split]
        for source in cfg.weak:
            check_annotations(ds, source)
        for t in cfg.teachers:
            if t not in teachers:
                teachers[t], models[t] = check_teacher(t, ds, cfg)
        plans[split] = plan_maps(cfg, ds, teachers)
    return plans, models


# A shard is the unit of a task (a task must own whole shards), so a map needs several of
# them for the workers to share it: by default a map gets up to this many shards, each of at
# most the store's DEFAULT_SHARD_CHUNKS chunks. It depends on the map's length only, never on
# the worker count, so the layout (and every byte) is the same however the map was computed.
TARGET_SHARDS = 16


def auto_shard_chunks(n_chunks: int) -> int:
    """Chunks per shard for a new map of ``n_chunks`` chunks when none is asked for.

    ``ceil(n_chunks / 16)``, between 1 and 64: in chunks of 256, a 2,048-sample map gets 8
    one-chunk shards and a 50,000-sample map 16 shards (15 of 13 chunks, 1 of 1). The store's
    own default of 64 chunks per shard would make any map of up to 16,384 samples one task.
    """
    from saliency_cache.store import DEFAULT_SHARD_CHUNKS

    return max(1, min(DEFAULT_SHARD_CHUNKS, math.ceil(n_chunks / TARGET_SHARDS)))


def shard_chunks(cfg, split, name: str) -> int | None:
    """Chunks per shard of map ``name``: the asked number, the layout of an existing map
    (None), or :func:`auto_shard_chunks` for a new one."""
    if cfg.shard_chunks is not None:
        return cfg.shard_chunks
    if name in split.maps():
        return None  # resume the map with the layout it was created with
    return auto_shard_chunks(math.ceil(split.n / cfg.chunk_size))


def cli_advice(e: SatError) -> SatError:
    """``e`` with the store's advice in terms of ``sat precompute``'s flags."""
    return type(e)(str(e).replace("pass overwrite=True", "pass --overwrite"))


def cleanup_failed(store: str, created_store: bool, writers, created_maps: set) -> None:
    """After a failed precompute: delete the maps this run created that got no chunk, and the
    whole store when this run created it and no map in it got a chunk (a retry then starts
    from nothing instead of being refused by a half-made map). Maps with chunks stay, so a
    retry resumes them. Best effort: a failure here must not hide the original error."""
    written = False
    for w in writers:
        try:
            got = bool(w.done_chunks().any())
        except Exception:  # noqa: BLE001 - the map may be what failed; keep it then
            got = True
        written = written or got
        try:
            w.close()
            if not got and (w.split.name, w.name) in created_maps:
                w.split.delete_map(w.name)
        except Exception:  # noqa: BLE001
            pass
    if created_store and not written and not _in_use(store):
        shutil.rmtree(Path(store), ignore_errors=True)


def _in_use(store: str) -> bool:
    """Whether another writer may be using the local ``store``: a writer lock file in it, or a
    map with a written chunk. Two precomputes started together on a store that did not exist
    both see it as new; the one that fails must not delete what the other writes. (Their
    ingests, before any map exists, are not protected: the store has no lock for those.)"""
    from saliency_cache.store import LOCK_NAME, SaliencyStore

    if any(Path(store).rglob(LOCK_NAME)):
        return True
    try:
        st = SaliencyStore.open(store, "r")
        return any(
            bool(st.split(s).inspect_map(m).done_chunks().any())
            for s in st.splits() for m in st.split(s).maps()
        )
    except (SatError, OSError):  # a store too incomplete to open holds no map data
        return False
