"""Datasets for every stage: one module per source, plus weak saliency from their annotations.

``open_dataset(name, root, split, **options)`` opens a registered source (``list_datasets()``
names them); :mod:`trainer.data.weak` rasterises boxes and masks into ±1 maps. Importing this
package registers every source. Like the sources themselves it imports numpy and PIL only.
"""

from trainer.data import cifar, imagefolder, oxford17, synthetic, tiny_imagenet  # noqa: F401  (register)
from trainer.data.base import (
    DATASETS,
    FINGERPRINT_VERSION,
    Box,
    ImageDataset,
    Sample,
    dataset_options,
    list_datasets,
    open_dataset,
)
from trainer.data.cifar import Cifar10Dataset, Cifar100Dataset
from trainer.data.files import rescale_box
from trainer.data.imagefolder import ImageFolderDataset
from trainer.data.oxford17 import Oxford17Dataset
from trainer.data.synthetic import SHAPES, SyntheticShapes, mask_bbox
from trainer.data.tiny_imagenet import TinyImageNetDataset

__all__ = [
    "DATASETS",
    "FINGERPRINT_VERSION",
    "SHAPES",
    "Box",
    "Cifar10Dataset",
    "Cifar100Dataset",
    "ImageDataset",
    "ImageFolderDataset",
    "Oxford17Dataset",
    "Sample",
    "SyntheticShapes",
    "TinyImageNetDataset",
    "dataset_options",
    "list_datasets",
    "mask_bbox",
    "open_dataset",
    "rescale_box",
]
