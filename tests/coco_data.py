"""A generated COCO-format dataset for the ``coco`` source's tests: polygons, uncompressed and
compressed RLE, a crowd region, several categories with non-contiguous ids, an image with
only a crowd annotation and one with none. pycocotools is imported only to encode RLE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

S = 32  # native images are S x S, so image_size=S keeps the file's pixels
CATS = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 11, "name": "bird"}]


def _rect(x0, y0, x1, y1) -> list[float]:
    """Polygon of an axis-aligned rectangle; pycocotools fills pixels x0..x1-1, y0..y1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _rect_mask(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((S, S), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _blob(seed: int) -> np.ndarray:
    """An irregular bool (S, S) mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    cx, cy = rng.uniform(10, 22, 2)
    return ((xx - cx) ** 2 / 40 + (yy - cy) ** 2 / 25 + rng.uniform(0, 0.4, (S, S))) < 1.0


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written out: column-major run lengths, starting with zeros."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [S, S], "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [S, S], "counts": rle["counts"].decode("ascii")}


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


def make_coco(root: Path) -> dict:
    """Train: 5 images (one skipped: crowd only, one skipped: no annotation); val: 2 images.

    Image channel 0 is 255 exactly on the labelled object's mask, so the picture shows where
    its mask map must be +1. Returns the hand-made references per split, in image-id order.
    """
    holes = np.random.default_rng(5).uniform(size=(S, S)) > 0.3
    blob_dog, blob_val = _blob(1), _blob(4)
    blob_small = _rect_mask(1, 22, 7, 30) & holes  # smaller than the cat of image 10
    blob_crowd = _rect_mask(22, 2, 31, 12) & holes
    train = [  # (image id, [(ann id, category, segmentation, bbox, iscrowd, mask)])
        (10, [(100, 3, [_rect(4, 6, 20, 18)], [4.0, 6.0, 16.0, 12.0], 0, _rect_mask(4, 6, 20, 18)),
              (101, 7, _uncompressed_rle(blob_small), _box_of(blob_small), 0, blob_small)]),
        (11, [(110, 7, _compressed_rle(blob_dog), _box_of(blob_dog), 0, blob_dog),
              (111, 7, _compressed_rle(blob_crowd), _box_of(blob_crowd), 1, blob_crowd)]),
        (12, [(120, 11, [_rect(2, 3, 13, 11)], [2.5, 3.2, 10.1, 7.7], 0, _rect_mask(2, 3, 13, 11))]),
        (13, [(130, 3, [_rect(1, 1, 9, 9)], [1.0, 1.0, 8.0, 8.0], 0, _rect_mask(1, 1, 9, 9)),
              (131, 3, [_rect(20, 18, 31, 30)], [20.0, 18.0, 11.0, 12.0], 0,
               _rect_mask(20, 18, 31, 30))]),
        (14, [(140, 7, _compressed_rle(blob_crowd), _box_of(blob_crowd), 1, blob_crowd)]),
        (15, []),
    ]
    val = [(20, [(200, 11, [_rect(5, 5, 25, 25)], [5.0, 5.0, 20.0, 20.0], 0, _rect_mask(5, 5, 25, 25))]),
           (21, [(210, 7, _uncompressed_rle(blob_val), _box_of(blob_val), 0, blob_val)])]
    refs = {}
    (root / "annotations").mkdir(parents=True)
    for split, items, cats in (("train", train, CATS), ("val", val, CATS[::-1])):
        (root / split).mkdir()
        images, anns = [], []
        for iid, objs in items:
            img = np.zeros((S, S, 3), dtype=np.uint8)
            img[..., 1] = (np.arange(S) * 7 % 256)[None, :]  # not mirror-symmetric
            plain = [o for o in objs if not o[4]]
            if plain:
                chosen = max(plain, key=lambda o: (o[5].sum(), -o[0]))
                img[chosen[5], 0] = 255
            name = f"img_{iid}.png"
            Image.fromarray(img).save(root / split / name)
            images.append({"id": iid, "file_name": name, "width": S, "height": S})
            for aid, cat, seg, bbox, crowd, mask in objs:
                anns.append({"id": aid, "image_id": iid, "category_id": cat, "segmentation": seg,
                             "bbox": bbox, "iscrowd": crowd, "area": float(mask.sum())})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
        refs[split] = items
    return refs
