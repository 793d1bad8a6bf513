"""``tiny-imagenet``: Tiny ImageNet (200 classes or a subset) with its bounding-box files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saliency_cache.errors import SatError
from trainer.data.base import DATASETS, Box, Sample, _check_source, _Hasher
from trainer.data.files import (
    _check_split,
    _FileDataset,
    _find_dir_with,
    _first_per_class,
    _image_size,
    _list_images,
    _need_root,
    _parse_box,
    _positive_int,
    _read_lines,
    rescale_box,
)


@DATASETS.register("tiny-imagenet")
class TinyImageNetDataset(_FileDataset):
    """Tiny ImageNet in its original layout (the 200-class set or any subset of it).

    ``root`` holds ``wnids.txt`` (one class id per line; the label is the line's index, so
    the class order is the file's order) or is a folder with exactly one such dataset folder.
    train: ``train/<wnid>/images/*.JPEG``, boxes in ``train/<wnid>/<wnid>_boxes.txt``
    (``file x0 y0 x1 y1`` per line); samples are class by class in ``wnids.txt`` order,
    files in sorted name order. val: ``val/images/*.JPEG`` in sorted name order, labels and
    boxes in ``val/val_annotations.txt`` (``file wnid x0 y0 x1 y1``). ids are paths relative
    to ``root``. Box coordinates are inclusive pixel indices of the original image.
    ``wnids`` lists the class ids; ``class_names`` are readable names, the first synonym of
    each wnid in ``words.txt`` (the wnid itself when that file or its line is missing, and
    ``name (wnid)`` when two classes share a first synonym).

    Options: ``image_size`` (default 64) resizes images (bilinear, antialiased) and rescales
    boxes outward (see :func:`rescale_box`). ``max_per_class`` keeps the first k images of
    each class in the order above. A train image with no line in its boxes file has
    ``box=None``; a val image with no annotation line is an error (its label is unknown).
    """

    name = "tiny-imagenet"

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        image_size: int = 64,
        max_per_class: int | None = None,
    ) -> None:
        _check_split(self.name, split, ("train", "val"))
        self.root = _find_dir_with(_need_root(self.name, root), "wnids.txt", self.name)
        self.split = split
        self._image_size = _positive_int(self.name, "image_size", image_size)
        self._max_per_class = _positive_int(
            self.name, "max_per_class", max_per_class, allow_none=True
        )
        self.wnids = self._read_wnids()
        self.class_names = self._read_words(self.wnids)
        self.num_classes = len(self.wnids)
        cls_of = {w: c for c, w in enumerate(self.wnids)}
        if split == "train":
            files, labels, boxes = self._scan_train(cls_of)
        else:
            files, labels, boxes = self._scan_val(cls_of)
        keep = _first_per_class(np.asarray(labels, dtype=np.int64), self._max_per_class)
        self._files = [files[i] for i in keep]
        self._labels = np.asarray(labels, dtype=np.int64)[keep]
        self._ids = [p.relative_to(self.root).as_posix() for p in self._files]
        self._size = (self._image_size, self._image_size)
        self._boxes = [
            None if boxes[i] is None else rescale_box(boxes[i], self._native, self._size)
            for i in keep
        ]
        self.image_shape = (3, self._image_size, self._image_size)
        self.has_boxes = any(b is not None for b in self._boxes)

    def _read_wnids(self) -> list[str]:
        path = self.root / "wnids.txt"
        wnids: list[str] = []
        seen: dict[str, int] = {}
        for n, fields in _read_lines(path, "class list"):
            if len(fields) != 1:
                raise SatError(f"{path} line {n}: expected one wnid, got {' '.join(fields)!r}")
            if fields[0] in seen:
                raise SatError(
                    f"{path} line {n}: wnid {fields[0]!r} repeats line {seen[fields[0]]}"
                )
            seen[fields[0]] = n
            wnids.append(fields[0])
        if not wnids:
            raise SatError(f"{path} lists no classes")
        return wnids

    def _read_words(self, wnids: list[str]) -> list[str]:
        """Readable class names from ``words.txt`` (``wnid<TAB>synonym, synonym, ...``)."""
        path = self.root / "words.txt"
        first: dict[str, str] = {}
        if path.is_file():
            wanted = set(wnids)
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    wnid, _, words = line.rstrip("\n").partition("\t")
                    if wnid in wanted and words.strip():
                        first[wnid] = words.split(",")[0].strip()
        names = [first.get(w, w) for w in wnids]
        shared = {n for n in names if names.count(n) > 1}
        return [f"{n} ({w})" if n in shared and n != w else n for n, w in zip(names, wnids, strict=True)]

    def _scan_train(self, cls_of: dict[str, int]):
        train = self.root / "train"
        if not train.is_dir():
            raise SatError(f"dataset {self.name!r}: train folder not found: {train}")
        folders = sorted(
            d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        for f in folders:
            if f not in cls_of:
                raise SatError(
                    f"dataset {self.name!r}: class folder {train / f} is not listed in "
                    f"{self.root / 'wnids.txt'}"
                )
        files: list[Path] = []
        labels: list[int] = []
        names_per_class = []
        for wnid in self.wnids:
            img_dir = train / wnid / "images"
            if not img_dir.is_dir():
                raise SatError(
                    f"dataset {self.name!r}: wnid {wnid!r} from {self.root / 'wnids.txt'} has no "
                    f"image folder {img_dir}"
                )
            names = _list_images(img_dir)
            names_per_class.append(names)
            files += [img_dir / f for f in names]
            labels += [cls_of[wnid]] * len(names)
        if not files:
            raise SatError(f"dataset {self.name!r}: no images under {train}")
        self._native = _image_size(files[0])
        boxes: list[Box | None] = []
        for wnid, names in zip(self.wnids, names_per_class, strict=True):
            table = self._read_train_boxes(train / wnid / f"{wnid}_boxes.txt")
            boxes += [table.get(f) for f in names]
        return files, labels, boxes

    def _read_train_boxes(self, path: Path) -> dict[str, Box]:
        table: dict[str, Box] = {}
        for n, fields in _read_lines(path, "box annotation file"):
            if len(fields) != 5:
                raise SatError(
                    f"{path} line {n}: expected 5 tab-separated fields (file x0 y0 x1 y1), "
                    f"got {len(fields)}: {' '.join(fields)!r}"
                )
            if fields[0] in table:
                raise SatError(f"{path} line {n}: second box for {fields[0]!r}")
            table[fields[0]] = _parse_box(path, n, fields[1:], self._native)
        return table

    def _scan_val(self, cls_of: dict[str, int]):
        img_dir = self.root / "val" / "images"
        if not img_dir.is_dir():
            raise SatError(f"dataset {self.name!r}: val image folder not found: {img_dir}")
        names = _list_images(img_dir)
        if not names:
            raise SatError(f"dataset {self.name!r}: no images in {img_dir}")
        self._native = _image_size(img_dir / names[0])
        path = self.root / "val" / "val_annotations.txt"
        table: dict[str, tuple[int, Box]] = {}
        for n, fields in _read_lines(path, "val annotation file"):
            if len(fields) != 6:
                raise SatError(
                    f"{path} line {n}: expected 6 tab-separated fields (file wnid x0 y0 x1 y1), "
                    f"got {len(fields)}: {' '.join(fields)!r}"
                )
            if fields[1] not in cls_of:
                raise SatError(
                    f"{path} line {n}: wnid {fields[1]!r} of {fields[0]} is not listed in "
                    f"{self.root / 'wnids.txt'}"
                )
            if fields[0] in table:
                raise SatError(f"{path} line {n}: second annotation for {fields[0]!r}")
            table[fields[0]] = (cls_of[fields[1]], _parse_box(path, n, fields[2:], self._native))
        files, labels, boxes = [], [], []
        for f in names:
            if f not in table:
                raise SatError(f"image {img_dir / f} has no line in {path} (its class is unknown)")
            files.append(img_dir / f)
            labels.append(table[f][0])
            boxes.append(table[f][1])
        return files, labels, boxes

    def _get(self, i: int) -> Sample:
        return Sample(self._image(i), int(self._labels[i]), self._ids[i], box=self._boxes[i])

    def get_box(self, i: int) -> Box | None:
        return self._boxes[self._index_of(i)]

    def annotated(self, source: str) -> np.ndarray:
        _check_source(source)
        if source == "mask":
            return np.zeros(len(self), dtype=bool)
        return np.array([b is not None for b in self._boxes], dtype=bool)

    def options(self) -> dict[str, Any]:
        return {"image_size": self._image_size, "max_per_class": self._max_per_class}

    def _pixel_options(self) -> dict[str, Any]:
        return {"image_size": self._image_size}

    def _hash_sources(self, h: _Hasher) -> None:
        super()._hash_sources(h)
        h.array(np.array([b if b is not None else (-1, -1, -1, -1) for b in self._boxes], "<i8"))


