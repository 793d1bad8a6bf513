"""``imagefolder``: class sub-folders of images, ``root/<split>/<class>/<file>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saliency_cache.errors import SatError
from trainer.data.base import DATASETS, Sample
from trainer.data.files import (
    _FileDataset,
    _first_per_class,
    _image_size,
    _list_images,
    _need_root,
    _positive_int,
)


@DATASETS.register("imagefolder")
class ImageFolderDataset(_FileDataset):
    """Class sub-folders of images: ``root/<split>/<class>/<file>`` (classes sorted by name).

    ``split`` selects the folder ``root/<split>``; ``val`` falls back to ``root/test`` when
    there is no ``root/val``; ``split="all"`` reads class folders directly under ``root``.
    Labels are the index of the class in the sorted union of the class folder names of
    every split folder under ``root`` (so a class missing from one split does not shift the
    labels of the others); a class folder without images is an error. Files are taken in
    sorted order within a class. ids are paths relative to ``root`` (``train/cat/0001.jpg``).

    Options: ``image_size`` (int) resizes every image to a square of that side (bilinear,
    antialiased); by default images keep their size, which must then be the same for all.
    ``max_per_class`` keeps the first k files of each class.
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        image_size: int | None = None,
        max_per_class: int | None = None,
    ) -> None:
        self.root = _need_root(self.name, root)
        self.split = split
        self._image_size = _positive_int(self.name, "image_size", image_size, allow_none=True)
        self._max_per_class = _positive_int(
            self.name, "max_per_class", max_per_class, allow_none=True
        )
        folder = self._split_folder()
        classes = self._class_list(folder)
        files, labels = [], []
        for c, cname in enumerate(classes):
            if not (folder / cname).is_dir():
                continue  # a class of another split only: no samples here, same numbering
            names = _list_images(folder / cname)
            if not names:
                raise SatError(
                    f"dataset {self.name!r}: class folder {folder / cname} holds no images; "
                    "add images or remove the folder (the class list is shared by all splits)"
                )
            for f in names:
                files.append(folder / cname / f)
                labels.append(c)
        if not files:
            raise SatError(f"dataset {self.name!r}: no image files under {folder}")
        keep = _first_per_class(np.asarray(labels, dtype=np.int64), self._max_per_class)
        self._files = [files[i] for i in keep]
        self._labels = np.asarray(labels, dtype=np.int64)[keep]
        self._ids = [p.relative_to(self.root).as_posix() for p in self._files]
        self.class_names = classes
        self.num_classes = len(classes)
        w, h = _image_size(self._files[0])
        if self._image_size is None:
            self._size, self._native = None, (w, h)
            self.image_shape = (3, h, w)
        else:
            self._size, self._native = (self._image_size, self._image_size), None
            self.image_shape = (3, self._image_size, self._image_size)
        self._folder = folder

    def _class_list(self, folder: Path) -> list[str]:
        """The sorted union of the class folder names of every split folder under ``root``
        (or of ``root`` itself for split ``all``): one numbering for all splits, so label 1
        names the same class in train and val even when a split lacks a class."""
        def class_dirs(d: Path) -> set[str]:
            return {c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")}

        if folder == self.root:
            classes = class_dirs(folder)
        else:
            classes = set().union(*(
                class_dirs(d) for d in self.root.iterdir()
                if d.is_dir() and not d.name.startswith(".")
            ))
        if not class_dirs(folder):
            raise SatError(f"dataset {self.name!r}: no class folders in {folder}")
        return sorted(classes)

    def _split_folder(self) -> Path:
        if self.split == "all":
            return self.root
        for cand in (self.split, "test") if self.split == "val" else (self.split,):
            if (self.root / cand).is_dir():
                return self.root / cand
        subs = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        raise SatError(
            f"dataset {self.name!r} has no split {self.split!r}: folder {self.root / self.split} "
            f"not found (sub-folders: {', '.join(subs) or 'none'}); use split 'all' to read "
            f"class folders directly under {self.root}"
        )

    def _source_split(self) -> str:
        return "all" if self._folder == self.root else self._folder.name

    def _get(self, i: int) -> Sample:
        return Sample(self._image(i), int(self._labels[i]), self._ids[i])

    def options(self) -> dict[str, Any]:
        return {"image_size": self._image_size, "max_per_class": self._max_per_class}

    def _pixel_options(self) -> dict[str, Any]:
        return {"image_size": self._image_size}


