"""``oxford17``: Oxford-17 flowers with the segmentation masks of its trimap subset.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from saliency_cache.errors import SatError
from trainer.data.base import DATASETS, Sample, _check_source, _Hasher
from trainer.data.files import (
    _check_split,
    _FileDataset,
    _find_dir_with,
    _first_per_class,
    _image_size,
    _int_set,
    _list_images,
    _need_root,
    _positive_int,
)

_OXFORD_NAME = re.compile(r"^image_(\d{4})\.(jpg|jpeg|png)$", re.IGNORECASE)
_OXFORD_PER_CLASS = 80
_OXFORD_TRAIN_PER_CLASS = 60
_OXFORD_CLASSES = tuple(
    "daffodil snowdrop lily_valley bluebell crocus iris tigerlily tulip fritillary sunflower "
    "daisy colts_foot dandelion cowslip buttercup windflower pansy".split()
)


@DATASETS.register("oxford17")
class Oxford17Dataset(_FileDataset):
    """Oxford 17 Category Flowers with optional segmentation label maps.

    Images are ``<root>/<image_dir>/image_NNNN.jpg`` (NNNN = 0001..1360); the class is
    ``(NNNN - 1) // 80``. The layout ships no official split, so this one is fixed by the
    image number: within each class of 80, numbers 1..60 are ``train`` and 61..80 are
    ``val`` (1,020 / 340 images); ``all`` is every image. Samples are in image-number order;
    ids are paths relative to ``root``.

    Masks are label maps ``<mask_dir>/image_NNNN.png`` (palette or grayscale PNG; the pixel
    value is the label) of the same size as their image. A pixel is foreground when its
    label is in ``foreground`` and ignored (neither foreground nor background; 0 in a mask
    map) when it is in ``ignore``. A sample without a mask file has ``mask=None``.

    Options: ``image_size`` (default 256; images bilinear, masks nearest-neighbour; aspect
    ratio is not kept), ``image_dir`` (default ``images``), ``mask_dir`` (default
    ``labels``; relative to root or absolute), ``foreground`` (default ``[1]``), ``ignore``
    (default ``[0]``), ``only_with_masks`` (default False) keeps only segmented images,
    ``max_per_class`` keeps the first k images of each class.
    """

    name = "oxford17"

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        image_size: int = 256,
        image_dir: str = "images",
        mask_dir: str = "labels",
        foreground: int | Sequence[int] = (1,),
        ignore: int | Sequence[int] = (0,),
        only_with_masks: bool = False,
        max_per_class: int | None = None,
    ) -> None:
        _check_split(self.name, split, ("train", "val", "all"))
        self.root = _find_dir_with(_need_root(self.name, root), image_dir, self.name)
        self.split = split
        self._image_size = _positive_int(self.name, "image_size", image_size)
        self._max_per_class = _positive_int(
            self.name, "max_per_class", max_per_class, allow_none=True
        )
        self._foreground = _int_set(self.name, "foreground", foreground)
        self._ignore = _int_set(self.name, "ignore", ignore)
        both = set(self._foreground) & set(self._ignore)
        if both:
            raise SatError(
                f"dataset {self.name!r}: label values {sorted(both)} are both foreground and ignore"
            )
        if not isinstance(only_with_masks, bool):
            raise SatError(
                f"dataset {self.name!r}: only_with_masks must be true or false, "
                f"got {only_with_masks!r}"
            )
        self._only_with_masks = only_with_masks
        self._image_dir, self._mask_dir_opt = str(image_dir), str(mask_dir)
        img_dir = self.root / image_dir
        mask_dir_path = Path(mask_dir) if Path(mask_dir).is_absolute() else self.root / mask_dir
        mask_names = set(_list_images(mask_dir_path)) if mask_dir_path.is_dir() else set()
        if only_with_masks and not mask_dir_path.is_dir():
            raise SatError(
                f"dataset {self.name!r}: only_with_masks set but mask folder not found: "
                f"{mask_dir_path}"
            )
        entries = []
        for f in _list_images(img_dir):
            m = _OXFORD_NAME.match(f)
            if m is None:
                continue  # the original archive keeps other files (files.txt) beside the images
            number = int(m.group(1))
            label = (number - 1) // _OXFORD_PER_CLASS
            if not 1 <= number <= _OXFORD_PER_CLASS * len(_OXFORD_CLASSES):
                raise SatError(
                    f"image {img_dir / f}: number {number} is outside 1..1360, so it has no class "
                    f"of the {len(_OXFORD_CLASSES)}"
                )
            in_train = (number - 1) % _OXFORD_PER_CLASS < _OXFORD_TRAIN_PER_CLASS
            if split == "all" or (split == "train") == in_train:
                mask_name = f"image_{m.group(1)}.png"
                mask = mask_dir_path / mask_name if mask_name in mask_names else None
                if mask is not None or not only_with_masks:
                    entries.append((number, img_dir / f, label, mask))
        if not entries:
            raise SatError(f"dataset {self.name!r}: no images for split {split!r} in {img_dir}")
        entries.sort(key=lambda e: e[0])
        labels = np.array([e[2] for e in entries], dtype=np.int64)
        keep = _first_per_class(labels, self._max_per_class)
        self._files = [entries[i][1] for i in keep]
        self._masks: list[Path | None] = [entries[i][3] for i in keep]
        self._labels = labels[keep]
        self._ids = [p.relative_to(self.root).as_posix() for p in self._files]
        self.class_names = list(_OXFORD_CLASSES)
        self.num_classes = len(_OXFORD_CLASSES)
        self._size = (self._image_size, self._image_size)
        self._native = None  # images may differ in size; each mask must match its own image
        self.image_shape = (3, self._image_size, self._image_size)
        self.has_masks = any(m is not None for m in self._masks)
        self.has_ignore = self.has_masks and bool(self._ignore)

    def _read_mask(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        path = self._masks[i]
        if path is None:
            return None, None
        img_size = _image_size(self._files[i])
        try:
            with Image.open(path) as im:
                if im.mode not in ("P", "L", "1", "I", "I;16"):
                    raise SatError(
                        f"mask {path} has mode {im.mode}; expected a palette or grayscale label map"
                    )
                if im.size != img_size:
                    raise SatError(
                        f"mask {path} is {im.size[0]}x{im.size[1]} but its image {self._files[i]} "
                        f"is {img_size[0]}x{img_size[1]}"
                    )
                im.load()
                if im.size != (self._size[1], self._size[0]):
                    im = im.resize((self._size[1], self._size[0]), Image.Resampling.NEAREST)
                values = np.asarray(im).astype(np.int64)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise SatError(f"cannot read mask {path}: {e}") from None
        fg = np.isin(values, self._foreground)
        ign = np.isin(values, self._ignore) if self._ignore else None
        return fg, ign

    def _get(self, i: int) -> Sample:
        mask, ign = self._read_mask(i)
        return Sample(self._image(i), int(self._labels[i]), self._ids[i], mask=mask, ignore=ign)

    def get_mask(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return self._read_mask(self._index_of(i))

    def annotated(self, source: str) -> np.ndarray:
        _check_source(source)
        if source == "box":
            return np.zeros(len(self), dtype=bool)
        return np.array([m is not None for m in self._masks], dtype=bool)

    def options(self) -> dict[str, Any]:
        return {
            "image_size": self._image_size,
            "image_dir": self._image_dir,
            "mask_dir": self._mask_dir_opt,
            "foreground": list(self._foreground),
            "ignore": list(self._ignore),
            "only_with_masks": self._only_with_masks,
            "max_per_class": self._max_per_class,
        }

    def _pixel_options(self) -> dict[str, Any]:
        return {"image_size": self._image_size}

    def _hash_sources(self, h: _Hasher) -> None:
        super()._hash_sources(h)
        # Mask files are sources too: an edited label map changes the weak maps built from it.
        for m in self._masks:
            if m is None:
                h.text("")
            else:
                h.text(m.name)
                h.file(m)


