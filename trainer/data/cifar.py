"""``cifar10`` / ``cifar100``: the CIFAR python pickles, loaded without running pickled code.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from saliency_cache.errors import SatError
from trainer.data.base import _RESAMPLE, DATASETS, ImageDataset, Sample, _Hasher
from trainer.data.files import _check_split, _first_per_class, _positive_int


# ---- CIFAR pickles -------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Loads the CIFAR batch dicts (lists, str/bytes, numpy arrays) and nothing else, so a
    tampered file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles from numpy 1.x
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path, how_to_get: str) -> dict[str, Any]:
    if not path.is_file():
        raise SatError(f"CIFAR file not found: {path}; {how_to_get}")
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise SatError(f"cannot read CIFAR file {path}: {e}") from None
    if not isinstance(obj, dict):
        raise SatError(f"CIFAR file {path} does not hold a dict (got {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(values: Iterable[Any]) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class _CifarDataset(ImageDataset):
    """CIFAR in torchvision's on-disk pickle format, read without torch.

    Images are uint8 (3, 32, 32) (the pickle's rows are the red, green, blue planes of a
    32x32 image, row-major). Splits: ``train`` and ``test``; ``val`` reads the test set.
    ids are ``"<name>/<train|test>/<index in the original split>"``.

    Options: ``image_size`` (default 32) resizes (bilinear, antialiased); ``max_per_class``
    keeps the first k images of each class; ``download=True`` fetches the data with
    torchvision when it is missing (needs torchvision and network).
    """

    _folder: str
    _train_files: tuple[str, ...]
    _test_files: tuple[str, ...]
    _meta_file: str
    _label_key: str
    _names_key: str
    _display: str
    _tv_class: str

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        image_size: int = 32,
        max_per_class: int | None = None,
        download: bool = False,
    ) -> None:
        _check_split(self.name, split, ("train", "test", "val"))
        self.split = split
        self._image_size = _positive_int(self.name, "image_size", image_size)
        self._max_per_class = _positive_int(
            self.name, "max_per_class", max_per_class, allow_none=True
        )
        self._download = bool(download)
        if root is None or str(root) == "":
            raise SatError(f"dataset {self.name!r} needs a root folder (--data-root)")
        base = Path(root).expanduser().resolve()
        # Accept either the folder that holds cifar-10-batches-py/ or that folder itself.
        folder = base / self._folder
        if not folder.is_dir() and (base / self._meta_file).is_file():
            folder = base
        if not (folder / self._meta_file).is_file() and self._download:
            self._fetch(base)
            folder = base / self._folder
        self.root = folder
        how = (
            f"download the {self._display} python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {base}, "
            "or pass download=True (needs torchvision)"
        )
        meta = _load_cifar_pickle(folder / self._meta_file, how)
        if self._names_key not in meta:
            raise SatError(
                f"CIFAR file {folder / self._meta_file} has no {self._names_key!r} entry"
            )
        self.class_names = _names(meta[self._names_key])
        self.num_classes = len(self.class_names)
        files = self._train_files if split == "train" else self._test_files
        data, labels = [], []
        for fname in files:
            d = _load_cifar_pickle(folder / fname, how)
            if "data" not in d or self._label_key not in d:
                raise SatError(f"CIFAR file {folder / fname} lacks 'data' or {self._label_key!r}")
            arr = np.asarray(d["data"])
            lab = np.asarray(d[self._label_key], dtype=np.int64)
            if (
                arr.dtype != np.uint8
                or arr.ndim != 2
                or arr.shape[1] != 3072
                or len(lab) != len(arr)
            ):
                raise SatError(
                    f"CIFAR file {folder / fname}: expected uint8 data (N, 3072) and N labels, got "
                    f"{arr.dtype} {arr.shape} and {len(lab)} labels"
                )
            if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise SatError(
                    f"CIFAR file {folder / fname}: labels outside 0..{self.num_classes - 1}"
                )
            data.append(arr)
            labels.append(lab)
        all_labels = np.concatenate(labels)
        keep = _first_per_class(all_labels, self._max_per_class)
        self._data = np.concatenate(data)[keep].reshape(-1, 3, 32, 32)
        self._labels = all_labels[keep]
        self._index = keep
        self.image_shape = (3, self._image_size, self._image_size)

    def _fetch(self, base: Path) -> None:
        try:
            import torchvision.datasets as tvd
        except ImportError:
            raise SatError(
                f"download=True needs torchvision, which is not installed; "
                f"{self._display} not found in {base}"
            ) from None
        try:
            base.mkdir(parents=True, exist_ok=True)
            # One archive holds both splits; torchvision checks its md5 before extracting.
            getattr(tvd, self._tv_class)(str(base), train=True, download=True)
        except (OSError, RuntimeError) as e:
            raise SatError(f"downloading {self._display} into {base} failed: {e}") from None

    def _source_split(self) -> str:
        return "train" if self.split == "train" else "test"

    def __len__(self) -> int:
        return len(self._labels)

    def ids(self) -> list[str]:
        s = self._source_split()
        return [f"{self.name}/{s}/{i}" for i in self._index]

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def _resized(self, images: np.ndarray) -> np.ndarray:
        if self._image_size == 32:
            return images.copy()
        s = self._image_size
        out = np.empty((len(images), 3, s, s), dtype=np.uint8)
        for k, img in enumerate(images):
            pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))
            out[k] = np.asarray(pil.resize((s, s), _RESAMPLE)).transpose(2, 0, 1)
        return out

    def _get(self, i: int) -> Sample:
        s = self._source_split()
        return Sample(
            self._resized(self._data[i : i + 1])[0],
            int(self._labels[i]),
            f"{self.name}/{s}/{self._index[i]}",
        )

    def load_images(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        return self._resized(self._data[start:stop])

    def options(self) -> dict[str, Any]:
        return {
            "image_size": self._image_size,
            "max_per_class": self._max_per_class,
            "download": self._download,
        }

    def _pixel_options(self) -> dict[str, Any]:
        return {"image_size": self._image_size}

    def _hash_sources(self, h: _Hasher) -> None:
        h.array(self._data)


@DATASETS.register("cifar10")
class Cifar10Dataset(_CifarDataset):
    __doc__ = _CifarDataset.__doc__
    name = "cifar10"
    _folder = "cifar-10-batches-py"
    _train_files = tuple(f"data_batch_{k}" for k in range(1, 6))
    _test_files = ("test_batch",)
    _meta_file = "batches.meta"
    _label_key = "labels"
    _names_key = "label_names"
    _display = "CIFAR-10"
    _tv_class = "CIFAR10"


@DATASETS.register("cifar100")
class Cifar100Dataset(_CifarDataset):
    __doc__ = _CifarDataset.__doc__
    name = "cifar100"
    _folder = "cifar-100-python"
    _train_files = ("train",)
    _test_files = ("test",)
    _meta_file = "meta"
    _label_key = "fine_labels"
    _names_key = "fine_label_names"
    _display = "CIFAR-100"
    _tv_class = "CIFAR100"


