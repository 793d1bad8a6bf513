"""Shared fixtures. Keep this small: tests build their own data in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="session")
def _verification_records(tmp_path_factory):
    """Training's verification records (saliency_cache.verified) go to a folder of this test
    session, not to the user's cache; tests of the records set their own folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAT_VERIFY_CACHE", str(tmp_path_factory.mktemp("sat-verified")))
        yield


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: its tensors are tiny, and extra intra-op threads only
    contend with the other tests on a 2-core machine. Restores the thread count afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_split(tmp_path: Path):
    """Factory: a fresh store holding one split of random uint8 images and labels.

    ``make_split(n=21, image_shape=(3, 5, 6), chunk_size=4, ...)`` returns
    ``(store, split, images uint8 (n, C, H, W), labels int64 (n,))``; everything is drawn
    from ``np.random.default_rng(seed)``.
    """
    from saliency_cache.store import SaliencyStore

    counter = iter(range(1_000_000))

    def make(
        n: int = 21,
        image_shape=(3, 5, 6),
        chunk_size: int = 4,
        num_classes: int = 3,
        with_images: bool = True,
        seed: int = 0,
        split: str = "train",
        path: Path | None = None,
        fingerprint: str | None = None,
    ):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=n).astype(np.int64)
        st = SaliencyStore.open(path or tmp_path / f"store{next(counter)}.zarr", "a")
        sp = st.create_split(
            split,
            labels=labels,
            ids=[f"img_{i:04d}.png" for i in range(n)],
            fingerprint=fingerprint or f"fp-{seed}-{n}",
            image_shape=tuple(image_shape),
            num_classes=num_classes,
            class_names=[f"class{c}" for c in range(num_classes)],
            dataset={"name": "synthetic", "seed": seed},
            chunk_size=chunk_size,
            with_images=with_images,
        )
        if with_images:
            for s in range(0, n, chunk_size):
                sp.write_images(s, images[s : s + chunk_size])
            sp.mark_images_complete()
        return st, sp, images, labels

    return make
