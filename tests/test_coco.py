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
from tests.coco_data import S, make_coco
from tests.helpers import one_line_error
from trainer.augment import random_crop_flip
from trainer.data import open_dataset
from trainer.data.weak import weak_maps

pytest.importorskip("pycocotools")

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
