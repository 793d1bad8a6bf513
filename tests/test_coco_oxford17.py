"""Real-data cross-check of the ``coco`` source: the shared Oxford-17 label maps, converted to a
COCO RLE file by ``tools/oxford17_to_coco.py``, give the same ``mask`` map bytes in a store as
the native ``oxford17`` source. Skips when the shared data is absent (see test_shared_data).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from saliency_cache.store import SaliencyStore
from tests.test_shared_data import _extract, _shared_tarball
from trainer.data import open_dataset
from trainer.data.weak import weak_maps

pytest.importorskip("pycocotools")
REPO = Path(__file__).resolve().parents[1]
SIZE = 48


@pytest.fixture(scope="module")
def oxford17(tmp_path_factory) -> Path:
    """Three segmented images per class, train (numbers 1..60) and val (61..80) alike."""
    tarball = _shared_tarball("oxford17-flowers-seg.tar.gz")
    with tarfile.open(tarball, "r:gz") as tar:
        names = tar.getnames()
    numbers = sorted(int(m.group(1)) for m in
                     map(re.compile(r"/labels/image_(\d{4})\.png$").search, names) if m)
    chosen: dict[tuple[int, bool], list[int]] = {}
    for n in numbers:
        c, j = divmod(n - 1, 80)
        key = (c, j < 60)
        if len(chosen.setdefault(key, [])) < 3:
            chosen[key].append(n)
    wanted = {f"image_{n:04d}" for ns in chosen.values() for n in ns}
    dest = tmp_path_factory.mktemp("oxford")
    assert _extract(tarball, dest, lambda name: Path(name).stem in wanted) == 2 * len(wanted)
    return dest / "oxford17-flowers-seg"


def _store(tmp: Path, name: str, data_args: list[str]) -> Path:
    store = tmp / f"{name}.zarr"
    res = CliRunner().invoke(main, ["precompute", *data_args, "--image-size", str(SIZE),
                                    "--store", str(store), "--splits", "train,val",
                                    "--map-splits", "train,val", "--weak", "mask", "--no-images",
                                    "--chunk-size", "16", "--quiet"])
    assert res.exit_code == 0, res.output
    return store


def test_coco_rle_of_oxford17_gives_the_native_mask_bytes(oxford17, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "oxford17_to_coco.py"),
                          "--root", str(oxford17)], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert res.returncode == 0, res.stderr
    native = _store(tmp_path, "native", ["--dataset", "oxford17", "--data-root", str(oxford17),
                                         "--data-option", "only_with_masks=true"])
    coco = _store(tmp_path, "coco", ["--dataset", "coco", "--data-root", str(oxford17),
                                     "--data-option", "images=images"])
    a, b = SaliencyStore.open(str(native), "r"), SaliencyStore.open(str(coco), "r")
    for split in ("train", "val"):
        sa, sb = a.split(split), b.split(split)
        assert sa.ids() == sb.ids() and sa.n > 16
        assert np.array_equal(sa.labels(), sb.labels()) and sa.class_names == sb.class_names
        ma, mb = sa.open_map("mask"), sb.open_map("mask")
        assert ma.encoding == mb.encoding == "ternary"
        got, want = mb.read(0, sb.n), ma.read(0, sa.n)
        assert got.tobytes() == want.tobytes()
        assert set(np.unique(want)) == {-1, 0, 1}  # flower, background and the unlabelled band
    # the same bytes come straight from the two sources too
    ds_native = open_dataset("oxford17", oxford17, "train", image_size=SIZE, only_with_masks=True)
    ds_coco = open_dataset("coco", oxford17, "train", image_size=SIZE, images="images")
    assert weak_maps(ds_coco, 0, len(ds_coco), "mask").tobytes() == \
        weak_maps(ds_native, 0, len(ds_native), "mask").tobytes()
