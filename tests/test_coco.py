"""The ``coco`` dataset source on a generated COCO-format dataset (polygons, RLE, crowd, several
categories with non-contiguous ids).

What a user relies on: box and mask maps equal the annotation rasterised by hand, before and
after resizing; a flip moves map and image together; train and val share one class order;
the label rule is the documented one; a malformed annotation file is refused in one line
naming the file and the annotation id, before anything is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from saliency_cache.errors import SatError
from saliency_cache.store import SaliencyStore
from tests.helpers import one_line_error
from trainer.augment import random_crop_flip
from trainer.data import open_dataset
from trainer.data.weak import weak_maps

mask_utils = pytest.importorskip("pycocotools.mask")

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


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    return root, make_coco(root)


def _box_ref(bbox, out: int, native: int = S) -> np.ndarray:
    """+1 on every output pixel whose footprint overlaps the float box (hand rule), -1 elsewhere."""
    x, y, w, h = bbox
    edges = np.arange(out + 1) * native / out  # output pixel u covers [edges[u], edges[u+1])
    inx = (edges[1:] > np.floor(x)) & (edges[:-1] < np.ceil(x + w))
    iny = (edges[1:] > np.floor(y)) & (edges[:-1] < np.ceil(y + h))
    return np.where(iny[:, None] & inx[None, :], 1, -1).astype(np.int8)[None]


def _nearest(mask: np.ndarray, out: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((out, out), Image.NEAREST)) > 0


@pytest.mark.parametrize("size", [S, 20])
def test_box_and_mask_maps_equal_hand_rasterised(coco, size):
    root, refs = coco
    ds = open_dataset("coco", root, "train", image_size=size)
    kept = [(iid, objs) for iid, objs in refs["train"] if any(not o[4] for o in objs)]
    assert ds.ids() == [f"train/img_{iid}.png" for iid, _ in kept]  # images 14, 15 skipped
    assert ds.describe()["skipped_unannotated"] == 2
    boxes, masks = weak_maps(ds, 0, len(ds), "box"), weak_maps(ds, 0, len(ds), "mask")
    for k, (_iid, objs) in enumerate(kept):
        plain = [o for o in objs if not o[4]]
        chosen = max(plain, key=lambda o: (o[5].sum(), -o[0]))
        assert np.array_equal(boxes[k], _box_ref(chosen[3], size)), k
        fg = _nearest(chosen[5], size)
        crowd = np.zeros((size, size), dtype=bool)
        for o in objs:
            if o[4]:
                crowd |= _nearest(o[5], size)
        expect = np.where(fg, 1, np.where(crowd, 0, -1)).astype(np.int8)[None]
        assert np.array_equal(masks[k], expect), k
    assert (masks[1] == 0).any()  # the crowd region of image 11 is the ignore region


def test_label_is_the_largest_object_in_one_id_order(coco):
    root, _ = coco
    train = open_dataset("coco", root, "train", image_size=S)
    val = open_dataset("coco", root, "val", image_size=S)
    assert train.class_names == val.class_names == ["cat", "dog", "bird"]  # ids 3, 7, 11
    assert train.category_ids == val.category_ids == [3, 7, 11]
    # image 10: a cat (192 px) beats a small dog; 11: dog; 12: bird; 13: cat
    assert train.labels().tolist() == [0, 1, 2, 0]
    assert val.labels().tolist() == [2, 1]


def test_single_rule_refuses_images_with_several_categories(coco):
    root, _ = coco
    with pytest.raises(SatError, match=r"instances_train.json: image id 10 \(img_10.png\) has "
                                       r"objects of several categories \['cat', 'dog'\]"):
        open_dataset("coco", root, "train", image_size=S, label_rule="single")
    assert open_dataset("coco", root, "val", image_size=S, label_rule="single").labels().tolist() == [2, 1]


def test_objects_class_covers_every_object_of_the_label(coco):
    root, refs = coco
    ds = open_dataset("coco", root, "train", image_size=S, objects="class")
    k = ds.ids().index("train/img_13.png")
    objs = dict(refs["train"])[13]
    box = weak_maps(ds, k, k + 1, "box")[0]
    assert np.array_equal(box, np.maximum(_box_ref(objs[0][3], S), _box_ref(objs[1][3], S)))
    mask = weak_maps(ds, k, k + 1, "mask")[0, 0]
    assert np.array_equal(mask == 1, objs[0][5] | objs[1][5])
    # with the default rule only the larger cat counts
    chosen = open_dataset("coco", root, "train", image_size=S)
    assert np.array_equal(weak_maps(chosen, k, k + 1, "mask")[0, 0] == 1, objs[1][5])


def test_flip_moves_map_and_image_together(coco):
    root, _ = coco
    ds = open_dataset("coco", root, "train", image_size=S)
    images = torch.from_numpy(ds.load_images(0, len(ds)))
    maps = torch.from_numpy(weak_maps(ds, 0, len(ds), "mask"))
    # the picture marks the labelled object: channel 0 is 255 exactly where the map is +1
    assert torch.equal(images[:, 0] == 255, maps[:, 0] == 1)
    flipped = 0
    for seed in range(4):
        out_img, (out_map,) = random_crop_flip(images, [maps], padding=0, flip=True,
                                               generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out_img[:, 0] == 255, out_map[:, 0] == 1)
        flipped += int((out_img != images).any())
    assert flipped  # some flips happened


def _mutate(root: Path, split: str, fn) -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _ann(data, aid):
    return next(a for a in data["annotations"] if a["id"] == aid)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: _ann(d, 120).update(image_id=99),
         r"instances_train.json: annotation id 120: image id 99 is not in the file's images"),
        (lambda d: _ann(d, 100).update(bbox=[20.0, 6.0, 16.0, 12.0]),
         r"instances_train.json: annotation id 100: bbox \[20.0, 6.0, 16.0, 12.0\] is not inside "
         r"image id 10 \(img_10.png, 32x32\)"),
        (lambda d: _ann(d, 110).update(category_id=5),
         r"instances_train.json: annotation id 110: category id 5 is not in the file's categories"),
        (lambda d: _ann(d, 101)["segmentation"].update(size=[16, 32]),
         r"instances_train.json: annotation id 101: RLE size \[16, 32\]"),
        (lambda d: _ann(d, 130).update(segmentation=[[1, 2, 3, 4]]),
         r"instances_train.json: annotation id 130: polygon segmentation"),
        (lambda d: d["images"][0].update(file_name="gone.png"),
         r"instances_train.json: image id 10: file not found: .*gone.png"),
        (lambda d: d["annotations"].append(dict(_ann(d, 100))),
         r"instances_train.json: annotation id 100 is listed twice"),
    ],
)
def test_malformed_annotations_are_refused_in_one_line_and_nothing_written(coco, tmp_path,
                                                                          mutate, match):
    root, _ = coco
    _mutate(root, "train", mutate)
    store = tmp_path / "s.zarr"
    res = CliRunner().invoke(main, ["precompute", "--dataset", "coco", "--data-root", str(root),
                                    "--image-size", str(S), "--store", str(store),
                                    "--weak", "box,mask", "--quiet"])
    assert re.search(match, one_line_error(res))
    assert not store.exists()


def test_val_with_other_categories_is_refused(coco):
    root, _ = coco
    _mutate(root, "val", lambda d: d["categories"][0].update(name="sparrow"))
    with pytest.raises(SatError, match=r"instances_val.json: categories differ from those of "
                                       r".*instances_train.json"):
        open_dataset("coco", root, "val", image_size=S)


def test_precompute_stores_the_weak_maps_with_the_class_order(coco, tmp_path):
    root, _ = coco
    store = tmp_path / "s.zarr"
    res = CliRunner().invoke(main, ["precompute", "--dataset", "coco", "--data-root", str(root),
                                    "--image-size", "16", "--store", str(store),
                                    "--weak", "box,mask", "--chunk-size", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    ds = open_dataset("coco", root, "train", image_size=16)
    st = SaliencyStore.open(str(store), "r")
    sp = st.split("train")
    for source in ("box", "mask"):
        assert np.array_equal(sp.open_map(source).read(0, sp.n), weak_maps(ds, 0, len(ds), source))
    assert sp.open_map("box").provenance["encoding"] == "binary"
    assert sp.open_map("mask").provenance["encoding"] == "ternary"  # crowd = ignore
    assert list(sp.class_names) == list(st.split("val").class_names) == ["cat", "dog", "bird"]
