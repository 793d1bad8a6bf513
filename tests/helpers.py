"""Tiny saliency stores for tests of the loader, training and evaluation stages.

``make_store(tmp_path)`` writes, in a second or so, what ``sat precompute`` would write for
the synthetic shapes dataset: a ``train`` and a ``val`` split holding their uint8 images, and
on ``train`` the maps asked for. Map kinds (``maps=``):

- ``"mask"``: the weak mask maps of the dataset (one channel, binary), store name ``"mask"``;
- ``"box"``: the weak box maps (one channel, binary), store name ``"box"``;
- ``"gbp"``: random {-1, +1} maps with the image's channels and the provenance of a
  standard ResNet-10 teacher's guided backprop, store name :data:`GBP` (``resnet10-std-gbp``);
- ``"gbp-ternary"``: random {-1, 0, +1} maps (provenance of an adversarial teacher's GBP
  thresholded at a quantile), store name :data:`GBP_TERNARY` (``resnet10-adv-gbp``).

Teacher maps are random rather than computed, so no teacher is trained; their values come
from ``np.random.default_rng(seed + k)`` and are the same for the same arguments.

The dataset the store was made from is ``TinyStore.data`` (a :class:`DataSpec`), so a test
can hand the same data to ``images_from`` / ``TrainConfig.data``, and ``TinyStore.path`` is
the store's path (``os.fspath(store)`` works too). :func:`add_random_map` adds a map of
chosen encoding with some chunks left unwritten (a partial precompute).

The signatures here are used by several test files: extend them with keyword arguments,
do not change what existing ones mean.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.common import DataSpec
from saliency_cache.store import SaliencyStore, map_name_from_provenance

MASK = "mask"
BOX = "box"
GBP = "resnet10-std-gbp"
GBP_TERNARY = "resnet10-adv-gbp"
MAP_KINDS = ("mask", "box", "gbp", "gbp-ternary")


@dataclass(frozen=True)
class TinyStore:
    """A store written by :func:`make_store`.

    path: the store's directory (str). data: the synthetic dataset spec it was made from.
    maps: store names of the ``train`` maps, in the order asked for. n, n_val: split sizes.
    chunk_size: samples per chunk of images and maps. size: image height and width.
    """

    path: str
    data: DataSpec
    maps: tuple[str, ...]
    n: int
    n_val: int
    chunk_size: int
    size: int
    num_classes: int

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def open(self, mode: str = "r") -> SaliencyStore:
        return SaliencyStore.open(self.path, mode)

    def split(self, name: str = "train"):
        return self.open().split(name)


def teacher_provenance(mode: str = "standard", *, ternary: bool = False) -> dict:
    """The provenance ``sat precompute`` records for a ResNet-10 teacher's GBP map."""
    return {
        "source": "teacher",
        "teacher_arch": "resnet10",
        "teacher_mode": mode,
        "checkpoint_sha256": "0" * 64,
        "method": "gbp",
        "method_params": {},
        "threshold": 0.5 if ternary else 0.0,
        "threshold_kind": "quantile",
        "target_rule": "label",
        "note": "random values written by tests/helpers.py",
    }


def make_store(
    tmp_path: str | os.PathLike,
    n: int = 64,
    n_val: int = 32,
    size: int = 16,
    chunk_size: int = 16,
    maps: Sequence[str] = ("mask",),
    *,
    num_classes: int = 4,
    seed: int = 0,
    with_images: bool = True,
    name: str = "store.zarr",
    map_chunk_size: int | None = None,
    shard_chunks: int | None = 2,
) -> TinyStore:
    """Write a store of the synthetic dataset to ``tmp_path / name`` and return it.

    Args:
        n, n_val: samples of the ``train`` and ``val`` splits.
        size: image height and width (>= 12). Images are uint8 (3, size, size).
        chunk_size: samples per chunk of the splits' images (and of maps by default).
        maps: map kinds for ``train`` (see the module docstring), written completely.
        num_classes, seed: of the synthetic dataset (``seed`` also seeds random maps).
        with_images: store the images (otherwise training needs ``images_from``/``data``).
        map_chunk_size: samples per map chunk when it should differ from ``chunk_size``.
        shard_chunks: chunks per map shard file (small, so tests cover several shards).
    """
    unknown = [m for m in maps if m not in MAP_KINDS]
    if unknown:
        raise ValueError(f"unknown map kinds {unknown}; choose from {MAP_KINDS}")
    path = Path(tmp_path) / name
    data = DataSpec(
        "synthetic", None,
        {"n": n, "n_val": n_val, "image_size": size, "num_classes": num_classes, "seed": seed},
    )
    st = SaliencyStore.open(path, "a")
    datasets = {}
    for split_name in ("train", "val"):
        ds = data.open(split_name)
        datasets[split_name] = ds
        sp = st.create_split(
            split_name, labels=np.asarray(ds.labels(), dtype=np.int64), ids=ds.ids(),
            fingerprint=ds.fingerprint(), image_shape=tuple(ds.image_shape),
            num_classes=ds.num_classes, class_names=list(ds.class_names),
            dataset=ds.describe(), chunk_size=chunk_size, with_images=with_images,
        )
        if with_images:
            for s in range(0, sp.n, chunk_size):
                sp.write_images(s, ds.load_images(s, min(s + chunk_size, sp.n)))
            sp.mark_images_complete()
    names = []
    train = datasets["train"]
    for k, kind in enumerate(maps):
        if kind in ("mask", "box"):
            names.append(_add_weak_map(st, train, kind, map_chunk_size, shard_chunks))
        else:
            ternary = kind == "gbp-ternary"
            names.append(
                add_random_map(
                    st, "train", teacher_provenance(
                        "adversarial" if ternary else "standard", ternary=ternary),
                    encoding="ternary" if ternary else "binary", seed=seed + 1000 + k,
                    chunk_size=map_chunk_size, shard_chunks=shard_chunks,
                )
            )
    return TinyStore(
        str(path), data, tuple(names), n, n_val, chunk_size, size, num_classes
    )


def _add_weak_map(st, ds, source, chunk_size, shard_chunks) -> str:
    from trainer.data.weak import weak_encoding, weak_maps

    enc, missing = weak_encoding(ds, source)
    prov = {"source": source, "method": f"{source}-annotation", "threshold": None,
            "target_rule": None, "missing_annotations": int(missing)}
    sp = st.split("train")
    with sp.create_map(source, provenance=prov, encoding=enc, channels=1,
                       chunk_size=chunk_size, shard_chunks=shard_chunks) as w:
        for k in range(w.n_chunks):
            s, e = w.chunk_bounds(k)
            w.write_chunk(k, weak_maps(ds, s, e, source=source))
        assert w.finalize()
    return source


def random_map_values(n: int, shape: Sequence[int], encoding: str, seed: int) -> np.ndarray:
    """int8 (n, *shape): uniform {-1, +1} (binary) or {-1, 0, +1} (ternary) values."""
    rng = np.random.default_rng(seed)
    choices = np.array([-1, 1] if encoding == "binary" else [-1, 0, 1], dtype=np.int8)
    return choices[rng.integers(0, len(choices), size=(n, *shape))]


def add_random_map(
    store: SaliencyStore | TinyStore | str | os.PathLike,
    split: str,
    provenance: dict,
    *,
    encoding: str = "binary",
    channels: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    shard_chunks: int | None = 2,
    skip_chunks: Sequence[int] = (),
    name: str | None = None,
) -> str:
    """Add a map of random values to ``split`` and return its name.

    ``channels`` defaults to the images' channel count. Chunks listed in ``skip_chunks`` are
    left unwritten and the map is then not finalized (a precompute that stopped part-way);
    otherwise it is finalized and complete. ``name`` defaults to the provenance's name.
    The values are :func:`random_map_values` of the whole split with ``seed``.
    """
    st = store if isinstance(store, SaliencyStore) else SaliencyStore.open(os.fspath(store), "a")
    if st.read_only:
        st = SaliencyStore.open(st.url, "a")
    sp = st.split(split)
    ch = sp.image_shape[0] if channels is None else channels
    name = name or map_name_from_provenance({**provenance, "encoding": encoding})
    values = random_map_values(sp.n, (ch, *sp.image_shape[1:]), encoding, seed)
    skip = {int(k) for k in skip_chunks}
    with sp.create_map(name, provenance=provenance, encoding=encoding, channels=ch,
                       chunk_size=chunk_size, shard_chunks=shard_chunks) as w:
        for k in range(w.n_chunks):
            if k not in skip:
                s, e = w.chunk_bounds(k)
                w.write_chunk(k, values[s:e])
        if not skip:
            assert w.finalize()
    return name


def corrupt_chunk(shard: Path, k: int, chunks_per_shard: int) -> None:
    """Flip one byte inside inner chunk ``k`` of a shard (located through the shard index)."""
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(raw[-(16 * chunks_per_shard + 4) : -4]), dtype="<u8").reshape(-1, 2)
    offset, nbytes = (int(v) for v in index[k])
    raw[offset + nbytes // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


def one_line_error(res) -> str:
    """Assert a click result is a user error: exit 2, one ``error:`` line, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]
