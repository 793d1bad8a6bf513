"""Write the Oxford-17 segmentation label maps as COCO-format annotation files (RLE masks).

    python tools/oxford17_to_coco.py --root data/oxford17-flowers-seg

writes ``<root>/annotations/instances_train.json`` and ``instances_val.json`` for the images
that have a label map, with the ``oxford17`` source's conventions: category ``k + 1`` is class
``k`` (image numbers ``80k+1 .. 80k+80``), numbers 1..60 of a class are train and 61..80 val,
image ids are the image numbers. Each image gets one object, the ``--foreground`` labels as a
compressed RLE with its box and area, and one crowd annotation (``iscrowd: 1``), the
``--ignore`` labels, which the ``coco`` source turns into the mask's ignore region. Then

    sat precompute --dataset coco --data-root <root> --data-option images=images --weak mask ...

gives the same ``mask`` map bytes as ``--dataset oxford17`` with ``only_with_masks=true``
(tests/test_coco_oxford17.py checks this on the shared data). Files are written to a temporary
name and renamed, so an interrupted run leaves no half-written annotation file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

_NAME = re.compile(r"^image_(\d{4})\.png$")
_PER_CLASS, _TRAIN_PER_CLASS = 80, 60


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


def convert(root: Path, image_dir: str = "images", label_dir: str = "labels",
            foreground: tuple[int, ...] = (1,), ignore: tuple[int, ...] = (0,)) -> dict[str, int]:
    """Write the two annotation files under ``root/annotations``; return images per split."""
    from trainer.data.oxford17 import _OXFORD_CLASSES

    out = {"train": ([], []), "val": ([], [])}
    for path in sorted((root / label_dir).iterdir()):
        m = _NAME.match(path.name)
        if m is None:
            continue
        number = int(m.group(1))
        cls, j = divmod(number - 1, _PER_CLASS)
        image = root / image_dir / f"image_{m.group(1)}.jpg"
        with Image.open(path) as im, Image.open(image) as photo:
            if im.size != photo.size:
                raise SystemExit(f"{path} is {im.size}, its image {image} is {photo.size}")
            values = np.asarray(im).astype(np.int64)
        fg, ign = np.isin(values, foreground), np.isin(values, ignore)
        if not fg.any():
            print(f"skipped {path}: no foreground pixels", file=sys.stderr)
            continue
        images, anns = out["train" if j < _TRAIN_PER_CLASS else "val"]
        h, w = fg.shape
        images.append({"id": number, "file_name": image.name, "width": w, "height": h})
        anns.append({"id": 2 * number, "image_id": number, "category_id": cls + 1, "iscrowd": 0,
                     "segmentation": _rle(fg), "bbox": _bbox(fg), "area": float(fg.sum())})
        if ign.any():
            anns.append({"id": 2 * number + 1, "image_id": number, "category_id": cls + 1,
                         "iscrowd": 1, "segmentation": _rle(ign), "bbox": _bbox(ign),
                         "area": float(ign.sum())})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(_OXFORD_CLASSES)]
    (root / "annotations").mkdir(exist_ok=True)
    for split, (images, anns) in out.items():
        dest = root / "annotations" / f"instances_{split}.json"
        tmp = dest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        os.replace(tmp, dest)
    return {split: len(images) for split, (images, _) in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, type=Path, help="Oxford-17 folder (images/, labels/)")
    p.add_argument("--foreground", default="1", help="comma-separated foreground label values")
    p.add_argument("--ignore", default="0", help="comma-separated ignored label values")
    a = p.parse_args(argv)
    ints = lambda s: tuple(int(v) for v in s.split(",") if v)  # noqa: E731
    counts = convert(a.root, foreground=ints(a.foreground), ignore=ints(a.ignore))
    print(f"wrote {a.root / 'annotations'}: {counts['train']} train, {counts['val']} val images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
