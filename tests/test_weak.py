"""Weak saliency: exact rasterisation of inclusive boxes and masks, batched == unbatched, and
the binary / ternary encoding rule."""

from __future__ import annotations

import re

import numpy as np
import pytest

from saliency_cache.errors import SatError
from tests.dataset_files import (
    make_cifar_pickles,
    make_oxford17,
    make_tiny_imagenet,
    oxford_label_map,
)
from trainer.data import open_dataset
from trainer.data.weak import box_to_map, mask_to_map, missing_annotations, weak_encoding, weak_maps


def _reference_box(box, h, w):
    x0, y0, x1, y1 = box
    out = np.empty((1, h, w), np.int8)
    for y in range(h):
        for x in range(w):
            out[0, y, x] = 1 if (x0 <= x <= x1 and y0 <= y <= y1) else -1
    return out


def test_box_whole_image_single_pixel_and_edges():
    h, w = 6, 9  # not square, so a swapped x/y would show
    full = box_to_map((0, 0, w - 1, h - 1), h, w)
    assert full.dtype == np.int8 and full.shape == (1, h, w) and (full == 1).all()
    one = box_to_map((7, 2, 7, 2), h, w)
    assert (one == 1).sum() == 1 and one[0, 2, 7] == 1
    corner = box_to_map((w - 1, h - 1, w - 1, h - 1), h, w)
    assert corner[0, h - 1, w - 1] == 1 and (corner == 1).sum() == 1
    left = box_to_map((0, 0, 0, h - 1), h, w)
    assert (left[0, :, 0] == 1).all() and (left[0, :, 1:] == -1).all()
    bottom = box_to_map((0, h - 1, w - 1, h - 1), h, w)
    assert (bottom[0, h - 1] == 1).all() and (bottom[0, : h - 1] == -1).all()


def test_every_box_of_a_small_image_matches_the_reference():
    h, w = 4, 5
    for x0 in range(w):
        for x1 in range(x0, w):
            for y0 in range(h):
                for y1 in range(y0, h):
                    box = (x0, y0, x1, y1)
                    got = box_to_map(box, h, w)
                    np.testing.assert_array_equal(got, _reference_box(box, h, w))
                    assert (got == 1).sum() == (x1 - x0 + 1) * (y1 - y0 + 1)


@pytest.mark.parametrize(
    "box", [(0, 0, 9, 3), (0, 0, 3, 6), (4, 0, 3, 3), (0, 3, 3, 2), (-1, 0, 2, 2)]
)
def test_box_outside_the_image_is_an_error(box):
    with pytest.raises(SatError, match=re.escape(str(box)) + ".*9x6"):
        box_to_map(box, 6, 9)


def test_mask_map_binary_and_ternary():
    rng = np.random.default_rng(0)
    mask = rng.random((5, 7)) < 0.4
    m = mask_to_map(mask)
    assert m.dtype == np.int8 and m.shape == (1, 5, 7)
    np.testing.assert_array_equal(m[0], np.where(mask, 1, -1))
    ignore = rng.random((5, 7)) < 0.3
    t = mask_to_map(mask, ignore)
    assert set(np.unique(t)) <= {-1, 0, 1}
    np.testing.assert_array_equal(t[0][ignore], 0)  # ignore wins over foreground
    np.testing.assert_array_equal(t[0][~ignore], np.where(mask, 1, -1)[~ignore])
    with pytest.raises(SatError, match="bool"):
        mask_to_map(mask.astype(np.uint8))
    with pytest.raises(SatError, match=r"\(5, 7\)"):
        mask_to_map(mask, ignore[:4])


def _datasets(tmp_path):
    syn = open_dataset("synthetic", None, "train", n=40, image_size=16, seed=4)
    tiny = open_dataset(
        "tiny-imagenet", make_tiny_imagenet(tmp_path / "t", per_class=4), "train", image_size=16
    )
    ox = open_dataset("oxford17", make_oxford17(tmp_path / "o"), "all", image_size=16)
    return [(syn, "box"), (syn, "mask"), (tiny, "box"), (ox, "mask")]


def test_batched_equals_unbatched(tmp_path):
    for ds, source in _datasets(tmp_path):
        n = len(ds)
        whole = weak_maps(ds, 0, n, source=source)
        assert whole.dtype == np.int8 and whole.shape == (n, 1, *ds.image_shape[1:])
        singles = np.concatenate([weak_maps(ds, i, i + 1, source=source) for i in range(n)])
        np.testing.assert_array_equal(whole, singles)
        pieces = [weak_maps(ds, s, min(s + 3, n), source=source) for s in range(0, n, 3)]
        np.testing.assert_array_equal(whole, np.concatenate(pieces))
        assert weak_maps(ds, 2, 2, source=source).shape == (0, 1, *ds.image_shape[1:])


def test_maps_follow_the_annotations(tmp_path):
    for ds, source in _datasets(tmp_path):
        maps = weak_maps(ds, 0, len(ds), source=source)
        _, h, w = ds.image_shape
        for i in range(len(ds)):
            s = ds[i]
            if source == "box":
                np.testing.assert_array_equal(maps[i], _reference_box(s.box, h, w))
            elif s.mask is None:
                assert (maps[i] == 0).all()  # no annotation: no information
            else:
                expected = np.where(s.mask, 1, -1)
                if s.ignore is not None:
                    expected[s.ignore] = 0
                np.testing.assert_array_equal(maps[i, 0], expected)


def test_oxford_mask_map_against_the_label_file(tmp_path):
    root = make_oxford17(tmp_path, n_classes=1, in_class=(0,))
    ds = open_dataset("oxford17", root, "all", image_size=16)
    values = oxford_label_map(root / "labels" / "image_0001.png")
    m = weak_maps(ds, 0, 1, source="mask")[0, 0]
    np.testing.assert_array_equal(m, np.select([values == 1, values == 0], [1, 0], -1))


def test_encoding_rule_and_missing_counts(tmp_path):
    syn = open_dataset("synthetic", None, "train", n=20, image_size=16)
    assert weak_encoding(syn, "box") == ("binary", 0) == weak_encoding(syn, "mask")

    root = make_tiny_imagenet(tmp_path / "t", n_classes=2, per_class=3)
    tiny = open_dataset("tiny-imagenet", root, "train", image_size=16)
    assert weak_encoding(tiny, "box") == ("binary", 0)
    wnid = tiny.wnids[1]
    boxes = root / "train" / wnid / f"{wnid}_boxes.txt"
    boxes.write_text("\n".join(boxes.read_text().splitlines()[:2]) + "\n")  # drop image _2's box
    tiny = open_dataset("tiny-imagenet", root, "train", image_size=16)
    assert tiny[5].box is None
    assert weak_encoding(tiny, "box") == ("ternary", 1) and missing_annotations(tiny, "box") == 1
    maps = weak_maps(tiny, 0, 6, source="box")
    assert (maps[5] == 0).all() and not (maps[:5] == 0).any()

    ox_root = make_oxford17(tmp_path / "o", n_classes=2)  # image 3 and class 1 have no mask
    ox = open_dataset("oxford17", ox_root, "all", image_size=16)
    assert weak_encoding(ox, "mask") == ("ternary", 6)
    # The ignore band alone makes maps ternary, even when every sample has a mask ...
    only = open_dataset("oxford17", ox_root, "all", image_size=16, only_with_masks=True)
    assert weak_encoding(only, "mask") == ("ternary", 0)
    # ... and without ignore values every value is +-1.
    plain = open_dataset("oxford17", ox_root, "all", image_size=16, only_with_masks=True, ignore=[])
    assert weak_encoding(plain, "mask") == ("binary", 0)
    assert set(np.unique(weak_maps(plain, 0, len(plain), source="mask"))) == {-1, 1}


def test_sources_a_dataset_lacks_are_errors(tmp_path):
    ox = open_dataset("oxford17", make_oxford17(tmp_path / "o"), "all", image_size=16)
    with pytest.raises(SatError, match="oxford17/all has no box annotations"):
        weak_maps(ox, 0, 2, source="box")
    with pytest.raises(SatError, match="no box annotations"):
        weak_encoding(ox, "box")
    cifar = open_dataset("cifar10", make_cifar_pickles(tmp_path / "c"), "test")
    with pytest.raises(SatError, match="cifar10/test has no mask annotations"):
        weak_maps(cifar, 0, 2, source="mask")
    with pytest.raises(SatError, match="'boxes'"):
        weak_maps(ox, 0, 2, source="boxes")
    with pytest.raises(SatError, match=r"\[3, 99\)"):
        weak_maps(ox, 3, 99, source="mask")
