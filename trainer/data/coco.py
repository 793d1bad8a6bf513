"""``coco``: images plus one COCO-format annotation file per split (boxes, polygon / RLE masks).

Masks are decoded by pycocotools (the ``sat-pipeline[coco]`` extra), imported only when a
``coco`` dataset is opened, so the rest of the data package keeps to numpy and PIL.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from saliency_cache.errors import SatError
from trainer.data.base import DATASETS, Box, Sample, _check_source, _Hasher
from trainer.data.files import (
    _FileDataset,
    _first_per_class,
    _image_size,
    _need_root,
    _positive_int,
    _read_rgb,
    rescale_box,
)

LABEL_RULES = ("largest", "single")
OBJECT_RULES = ("chosen", "class")
# A box may reach past the image border by float rounding in the file, not by more.
_BORDER_SLACK = 0.01


def _pycocotools_mask():
    try:
        from pycocotools import mask
    except ImportError:
        raise SatError("dataset 'coco' needs pycocotools: pip install 'sat-pipeline[coco]'") from None
    return mask


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@DATASETS.register("coco")
class CocoDataset(_FileDataset):
    """Images with a COCO-format (``instances_*.json``) annotation file per split.

    Layout: ``<root>/<annotations>`` (default ``annotations/instances_{split}.json``) lists
    ``images`` (id, file_name, width, height), ``categories`` (id, name) and ``annotations``
    (id, image_id, category_id, bbox ``[x, y, w, h]``, optional segmentation as polygons or
    RLE, optional area and iscrowd); image files are ``<root>/<images>/<file_name>`` (default
    ``images = "{split}"``). Any split name with an annotation file works. Samples are in
    image-id order; ids are paths relative to ``root``.

    Labels: category ids sorted ascending map to labels ``0..K-1``. That order is read from
    the ``class_split`` file (default ``train``) for every split, and a split whose own
    categories differ from it is refused. ``label_rule`` picks an image's label: ``largest``
    (default) takes the category of its largest object by ``area`` (the mask area in COCO
    files; the box area when absent), ties to the lower annotation id; ``single`` refuses an
    image with objects of several categories. Crowd annotations (``iscrowd: 1``) never choose
    a label; images without any other annotation are skipped (``describe()`` counts them).

    Weak saliency: ``objects="chosen"`` (default) uses the labelled object's box and mask,
    ``"class"`` every object of that category. A float box covers the pixels it overlaps
    (``x0 = floor(x)``, ``x1 = ceil(x + w) - 1``), then is rescaled outward like Tiny
    ImageNet's (:func:`rescale_box`); masks are decoded at the file's size and resized
    nearest-neighbour like Oxford-17's. Crowd regions outside the foreground are the mask's
    ignore region (0 in a mask map), as in COCO's evaluation.

    Options: ``image_size`` (default 224; aspect ratio not kept), ``images``,
    ``annotations``, ``class_split``, ``label_rule``, ``objects``, ``max_per_class``.
    Malformed annotations (unknown image or category id, a box outside its image, a bad
    segmentation) are refused at open with the file and the annotation id.
    """

    name = "coco"

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        *,
        image_size: int = 224,
        images: str = "{split}",
        annotations: str = "annotations/instances_{split}.json",
        class_split: str = "train",
        label_rule: str = "largest",
        objects: str = "chosen",
        max_per_class: int | None = None,
    ) -> None:
        self.root = _need_root(self.name, root)
        self.split = split
        self._image_size = _positive_int(self.name, "image_size", image_size)
        self._max_per_class = _positive_int(self.name, "max_per_class", max_per_class, allow_none=True)
        for key, value, valid in (("label_rule", label_rule, LABEL_RULES), ("objects", objects, OBJECT_RULES)):
            if value not in valid:
                raise SatError(f"dataset {self.name!r}: {key} must be one of {', '.join(valid)}, got {value!r}")
        self._opts = {"image_size": self._image_size, "images": images, "annotations": annotations,
                      "class_split": class_split, "label_rule": label_rule, "objects": objects,
                      "max_per_class": self._max_per_class}
        for key, value in (("images", images), ("annotations", annotations)):
            if not isinstance(value, str) or not value:
                raise SatError(f"dataset {self.name!r}: {key} must be a path pattern, got {value!r}")
        self._ann_path = self._annotation_file(split)
        data = _read_json(self._ann_path)
        cats = _categories(self._ann_path, data)
        if class_split != split:
            ref_path = self._annotation_file(class_split)
            ref = _categories(ref_path, _read_json(ref_path))
            if ref != cats:
                raise SatError(f"{self._ann_path}: categories differ from those of {ref_path} "
                               f"(split {class_split!r} fixes the class order for every split)")
        self.category_ids = sorted(cats)
        self.class_names = [cats[c] for c in self.category_ids]
        self.num_classes = len(self.category_ids)
        img_dir = self.root / _fill(images, split)
        imgs = _images(self._ann_path, data, img_dir)
        anns = _annotations(self._ann_path, data, imgs, cats)
        self._build(imgs, anns, img_dir, label_rule)

    def _annotation_file(self, split: str) -> Path:
        path = self.root / _fill(self._opts["annotations"], split)
        if not path.is_file():
            raise SatError(f"dataset {self.name!r} has no split {split!r}: annotation file not "
                           f"found: {path}")
        return path

    def _build(self, imgs: dict[int, dict], anns: dict[int, list[dict]], img_dir: Path, rule: str) -> None:
        label_of = {c: k for k, c in enumerate(self.category_ids)}
        entries, skipped = [], 0
        for iid in sorted(imgs):
            objs = [a for a in anns.get(iid, []) if not a.get("iscrowd", 0)]
            if not objs:
                skipped += 1
                continue
            cats = sorted({a["category_id"] for a in objs})
            if rule == "single" and len(cats) > 1:
                names = [self.class_names[label_of[c]] for c in cats]
                raise SatError(f"{self._ann_path}: image id {iid} ({imgs[iid]['file_name']}) has "
                               f"objects of several categories {names}; label_rule 'single' "
                               "refuses it (label_rule 'largest' picks one)")
            chosen = min(objs, key=lambda a: (-_area(a), a["id"]))
            same = [a for a in objs if a["category_id"] == chosen["category_id"]]
            crowd = [a for a in anns.get(iid, []) if a.get("iscrowd", 0)]
            entries.append((iid, label_of[chosen["category_id"]], chosen, same, crowd))
        if not entries:
            raise SatError(f"dataset {self.name!r}: {self._ann_path} has no annotated images")
        labels = np.array([e[1] for e in entries], dtype=np.int64)
        keep = _first_per_class(labels, self._max_per_class)
        entries = [entries[i] for i in keep]
        self._skipped = skipped
        self._labels = labels[keep]
        self._image_ids = [e[0] for e in entries]
        self._files = [img_dir / imgs[e[0]]["file_name"] for e in entries]
        # ids relative to root; images kept elsewhere (an absolute ``images``) as <split>/<file>
        self._ids = [p.relative_to(self.root).as_posix() if p.is_relative_to(self.root)
                     else f"{self.split}/{imgs[e[0]]['file_name']}"
                     for p, e in zip(self._files, entries, strict=True)]
        self._natives = [(imgs[e[0]]["width"], imgs[e[0]]["height"]) for e in entries]
        self._objects = [[e[2]] if self._opts["objects"] == "chosen" else e[3] for e in entries]
        self._crowd = [e[4] for e in entries]
        self._size = (self._image_size, self._image_size)
        self._native = None  # images differ in size; each is checked against its JSON entry
        self.image_shape = (3, self._image_size, self._image_size)
        self._boxes = [[rescale_box(_pixel_box(a["bbox"], n), n, self._size) for a in objs]
                       for objs, n in zip(self._objects, self._natives, strict=True)]
        self._has_mask = np.array([all("segmentation" in a for a in objs) for objs in self._objects])
        self.has_boxes = True
        self.has_masks = bool(self._has_mask.any())
        self.has_ignore = self.has_masks and any(
            "segmentation" in a for crowd in self._crowd for a in crowd)

    # ---- samples -------------------------------------------------------------------------
    def _image(self, i: int) -> np.ndarray:
        self._check_size(i)
        return _read_rgb(self._files[i], self._size, None)

    def _check_size(self, i: int) -> None:
        actual = _image_size(self._files[i])
        if actual != self._natives[i]:
            w, h = self._natives[i]
            raise SatError(f"image {self._files[i]} is {actual[0]}x{actual[1]} but {self._ann_path} "
                           f"says image id {self._image_ids[i]} is {w}x{h}")

    def _decode(self, anns: list[dict], native: tuple[int, int]) -> np.ndarray | None:
        """bool (H, W) union of the segmentations of ``anns`` at the output size; None if none."""
        anns = [a for a in anns if "segmentation" in a]
        if not anns:
            return None
        mask_utils = _pycocotools_mask()
        w, h = native
        union = np.zeros((h, w), dtype=bool)
        for a in anns:
            seg = a["segmentation"]
            try:
                if isinstance(seg, dict) and isinstance(seg["counts"], str):
                    rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
                else:  # polygons, or an RLE with uncompressed run lengths
                    rle = mask_utils.frPyObjects(seg, h, w)
                    rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
                with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation notice
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = mask_utils.decode(rle)
            except (ValueError, TypeError, UnicodeEncodeError) as e:
                raise SatError(f"{self._ann_path}: annotation id {a['id']}: cannot decode its "
                               f"segmentation ({e})") from None
            if decoded.shape != (h, w):
                raise SatError(f"{self._ann_path}: annotation id {a['id']}: segmentation decodes "
                               f"to {decoded.shape}, image is {h}x{w}")
            union |= decoded.astype(bool)
        if (h, w) != self._size:
            im = Image.fromarray(union.astype(np.uint8)).resize(
                (self._size[1], self._size[0]), Image.Resampling.NEAREST)
            union = np.asarray(im).astype(bool)
        return union

    def _read_mask(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self._has_mask[i]:
            return None, None
        self._check_size(i)
        fg = self._decode(self._objects[i], self._natives[i])
        crowd = self._decode(self._crowd[i], self._natives[i])
        return fg, (None if crowd is None else crowd & ~fg)

    def _get(self, i: int) -> Sample:
        mask, ign = self._read_mask(i)
        return Sample(self._image(i), int(self._labels[i]), self._ids[i], box=self._boxes[i][0],
                      mask=mask, ignore=ign)

    def get_box(self, i: int) -> Box | None:
        return self._boxes[self._index_of(i)][0]

    def get_boxes(self, i: int) -> list[Box]:
        """Every box the weak ``box`` map of sample ``i`` covers (one with ``objects="chosen"``)."""
        return list(self._boxes[self._index_of(i)])

    def get_mask(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return self._read_mask(self._index_of(i))

    def annotated(self, source: str) -> np.ndarray:
        _check_source(source)
        return np.ones(len(self), dtype=bool) if source == "box" else self._has_mask.copy()

    def options(self) -> dict[str, Any]:
        return dict(self._opts)

    def _pixel_options(self) -> dict[str, Any]:
        return {k: self._opts[k] for k in ("image_size", "label_rule", "objects")}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "category_ids": list(self.category_ids),
                "skipped_unannotated": self._skipped}

    def _hash_sources(self, h: _Hasher) -> None:
        super()._hash_sources(h)
        h.file(self._ann_path)  # boxes, masks and labels all come from it


def _fill(pattern: str, split: str) -> str:
    """``pattern`` with ``{split}`` replaced (the only placeholder a path option may use)."""
    try:
        return pattern.format(split=split)
    except (KeyError, IndexError, ValueError):
        raise SatError(f"dataset 'coco': path pattern {pattern!r} may use only {{split}}") from None


# ---- annotation file parsing (every check names the file and the offending id) --------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise SatError(f"cannot read annotation file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise SatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SatError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise SatError(f"{path}: {key!r} must be a list, got {type(data.get(key)).__name__}")
    return data


def _categories(path: Path, data: dict) -> dict[int, str]:
    cats: dict[int, str] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise SatError(f"{path}: category {c!r} needs an integer id and a string name")
        if c["id"] in cats:
            raise SatError(f"{path}: category id {c['id']} is listed twice")
        cats[c["id"]] = c["name"]
    if not cats:
        raise SatError(f"{path}: lists no categories")
    return cats


def _images(path: Path, data: dict, img_dir: Path) -> dict[int, dict]:
    imgs: dict[int, dict] = {}
    for im in data["images"]:
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            raise SatError(f"{path}: image entry {im!r} needs an integer id")
        iid = im["id"]
        if iid in imgs:
            raise SatError(f"{path}: image id {iid} is listed twice")
        if not isinstance(im.get("file_name"), str) or not all(
                _is_int(im.get(k)) and im[k] > 0 for k in ("width", "height")):
            raise SatError(f"{path}: image id {iid} needs a file_name and positive integer width "
                           "and height")
        if not (img_dir / im["file_name"]).is_file():
            raise SatError(f"{path}: image id {iid}: file not found: {img_dir / im['file_name']}")
        imgs[iid] = im
    return imgs


def _annotations(path: Path, data: dict, imgs: dict[int, dict], cats: dict[int, str]
                 ) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = {}
    seen: set[int] = set()
    for a in data["annotations"]:
        if not isinstance(a, dict) or not _is_int(a.get("id")):
            raise SatError(f"{path}: annotation {str(a)[:80]} needs an integer id")
        aid = a["id"]
        where = f"{path}: annotation id {aid}"
        if aid in seen:
            raise SatError(f"{where} is listed twice")
        seen.add(aid)
        if a.get("image_id") not in imgs:
            raise SatError(f"{where}: image id {a.get('image_id')!r} is not in the file's images")
        if a.get("category_id") not in cats:
            raise SatError(f"{where}: category id {a.get('category_id')!r} is not in the file's "
                           "categories")
        if a.get("iscrowd", 0) not in (0, 1):
            raise SatError(f"{where}: iscrowd must be 0 or 1, got {a['iscrowd']!r}")
        if "area" in a and not (_is_num(a["area"]) and a["area"] >= 0):
            raise SatError(f"{where}: area must be a number >= 0, got {a['area']!r}")
        im = imgs[a["image_id"]]
        _check_bbox(where, a.get("bbox"), im)
        if "segmentation" in a:
            _check_segmentation(where, a["segmentation"], im)
        by_image.setdefault(a["image_id"], []).append(a)
    return by_image


def _check_bbox(where: str, bbox: Any, im: dict) -> None:
    w, h = im["width"], im["height"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
        raise SatError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    x, y, bw, bh = bbox
    if not (bw > 0 and bh > 0 and x >= -_BORDER_SLACK and y >= -_BORDER_SLACK
            and x + bw <= w + _BORDER_SLACK and y + bh <= h + _BORDER_SLACK):
        raise SatError(f"{where}: bbox {bbox} is not inside image id {im['id']} "
                       f"({im['file_name']}, {w}x{h}); need x, y >= 0, width, height > 0, "
                       "x + width <= image width, y + height <= image height")


def _check_segmentation(where: str, seg: Any, im: dict) -> None:
    if isinstance(seg, list):
        ok = bool(seg) and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                               and all(_is_num(v) for v in p) for p in seg)
        if not ok:
            raise SatError(f"{where}: polygon segmentation must be lists of >= 3 x, y pairs")
        return
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise SatError(f"{where}: segmentation must be polygons or an RLE with size and counts")
    if seg["size"] != [im["height"], im["width"]]:
        raise SatError(f"{where}: RLE size {seg['size']} is not [height, width] = "
                       f"[{im['height']}, {im['width']}] of image id {im['id']}")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != im["height"] * im["width"]:
            raise SatError(f"{where}: RLE counts must be run lengths >= 0 summing to height * width")
    elif not isinstance(counts, str):
        raise SatError(f"{where}: RLE counts must be a list of run lengths or a compressed string")


def _area(a: dict) -> float:
    return float(a["area"]) if "area" in a else float(a["bbox"][2] * a["bbox"][3])


def _pixel_box(bbox: list[float], native: tuple[int, int]) -> Box:
    """Inclusive pixel box of the pixels a float ``[x, y, w, h]`` box overlaps, in the image."""
    x, y, bw, bh = bbox
    w, h = native
    x0, y0 = min(max(math.floor(x), 0), w - 1), min(max(math.floor(y), 0), h - 1)
    x1, y1 = min(math.ceil(x + bw) - 1, w - 1), min(math.ceil(y + bh) - 1, h - 1)
    return (x0, y0, max(x0, x1), max(y0, y1))
