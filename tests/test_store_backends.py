"""One contract for every place a store can live: local disk, HTTP (with and without
directory listings) and S3 (a moto server).

:class:`TestReadContract` runs the same read behaviours against each backend, through the
one :class:`saliency_cache.location.Location` interface: what a consumer reads equals the
local original, writes are refused, unknown names list what exists, and a chunk file lost
on the backend is reported by name instead of reading as fill values.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from saliency_cache.copy import copy_store
from saliency_cache.errors import MapNotFoundError, MissingChunkError, ReadOnlyError
from saliency_cache.location import FsspecLocation, LocalLocation
from saliency_cache.store import SaliencyStore
from saliency_cache.verify import verify
from tests.helpers import GBP_TERNARY, MASK, make_store
from tests.servers import moto_s3, serve

BACKENDS = ("local", "http-listing", "http-static", "s3")
SHARD = f"train/maps/{GBP_TERNARY}/data/c/1/0"  # chunks 2..3 of the ternary map


@dataclass
class Backend:
    """A published copy of the test store: its URL, fsspec options and how to lose a file."""

    name: str
    url: str
    options: dict | None
    remove: Callable[[str], None]  # delete the file at a store key, on the backend itself


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("origin")
    return Path(make_store(root, maps=(MASK, "gbp-ternary"), shard_chunks=2).path)


@contextlib.contextmanager
def _servers(kind: str, site: Path):
    """Whatever serves ``site`` for ``kind``; yields ``(base URL, options, rm(name, key))``."""
    if kind == "local":
        yield str(site), None, None
    elif kind.startswith("http"):
        with serve(site, listings=kind == "http-listing") as (base, _):
            yield base, None, lambda name, key: (site / name / key).unlink()
    else:
        with moto_s3("contract") as (_endpoint, bucket, options):
            import s3fs

            fs = s3fs.S3FileSystem(**options)
            yield f"s3://{bucket}", options, lambda name, key: fs.rm(f"{bucket}/{name}/{key}")


@pytest.fixture(scope="module", params=BACKENDS)
def published(request, origin, tmp_path_factory):
    """A factory: each call publishes a fresh copy of ``origin`` on the backend."""
    kind = request.param
    site = tmp_path_factory.mktemp(f"site-{kind}")
    count = iter(range(1000))
    with _servers(kind, site) as (base, options, rm):

        def publish() -> Backend:
            name = f"store{next(count)}.zarr"
            if kind == "local":
                shutil.copytree(origin, site / name)
                return Backend(kind, str(site / name), None, lambda k: (site / name / k).unlink())
            if kind == "http-listing":  # served as written by precompute
                shutil.copytree(origin, site / name)
            else:  # published with `sat cache copy` (with the manifest)
                dst = str(site / name) if kind == "http-static" else f"{base}/{name}"
                copy_store(origin, dst, dst_options=options)
            url = f"{base}/{name}"
            return Backend(kind, url, options, lambda k: rm(name, k))

        yield publish


@pytest.fixture(scope="module")
def store(published) -> tuple[Backend, SaliencyStore]:
    """One published copy per backend, opened read-only, shared by the read-only tests."""
    b = published()
    return b, SaliencyStore.open(b.url, "r", storage_options=b.options)


class TestReadContract:
    """The read behaviours every backend must share."""

    def test_location_kind(self, store):
        b, st = store
        want = LocalLocation if b.name == "local" else FsspecLocation
        assert isinstance(st.location, want) and st.read_only

    def test_splits_arrays_and_maps_equal_the_original(self, store, origin):
        _, st = store
        local = SaliencyStore.open(origin)
        assert st.splits() == local.splits() == ["train", "val"]
        for name in local.splits():
            r, lo = st.split(name), local.split(name)
            assert (r.n, r.fingerprint, r.ids_sha256) == (lo.n, lo.fingerprint, lo.ids_sha256)
            assert r.ids() == lo.ids()
            np.testing.assert_array_equal(r.labels(), lo.labels())
            np.testing.assert_array_equal(r.read_images(0, r.n), lo.read_images(0, lo.n))
            np.testing.assert_array_equal(
                r.read_images_indices([7, 0, 7]), lo.read_images_indices([7, 0, 7])
            )
            assert r.maps() == lo.maps()
            for m in lo.maps():
                rm, lm = r.open_map(m), lo.open_map(m)
                assert rm.provenance == lm.provenance
                np.testing.assert_array_equal(rm.read(0, rm.n), lm.read(0, lm.n))
                idx = [5, 0, lm.n - 1, 5]
                np.testing.assert_array_equal(rm.read_indices(idx), lm.read_indices(idx))
                blocks = [(s, e) for s, e, _ in rm.iter_blocks([3, 0], packed=True)]
                assert blocks == [(48, 64), (0, 16)]
                assert rm.nbytes_on_disk() == lm.nbytes_on_disk() > 0

    def test_verify_is_clean(self, store):
        assert verify(store[1]) == []

    def test_writes_are_refused(self, store):
        sp = store[1].split("train")
        with pytest.raises(ReadOnlyError):
            sp.create_map("new", provenance={"source": "box"}, encoding="binary", channels=1)
        with pytest.raises(ReadOnlyError):
            sp.delete_map(MASK)
        with pytest.raises(ReadOnlyError):
            sp.open_map_writer(MASK)

    def test_unknown_names_list_what_exists(self, store):
        st = store[1]
        with pytest.raises(MapNotFoundError, match="available: train, val"):
            st.split("test")
        with pytest.raises(MapNotFoundError, match=f"available: {MASK}, {GBP_TERNARY}"):
            st.split("train").open_map("nope")

    @pytest.mark.parametrize(
        "key, read",
        [
            (SHARD, lambda sp: sp.open_map(GBP_TERNARY)),
            (SHARD, lambda sp: sp.open_map(GBP_TERNARY, allow_partial=True).read(0, 64)),
            ("train/images/c/2/0/0/0", lambda sp: sp.read_images(32, 48)),
            ("train/labels/c/0", lambda sp: sp.labels()),
            ("train/ids/c/0", lambda sp: sp.ids()),
        ],
        ids=["shard-open", "shard-partial-read", "images", "labels", "ids"],
    )
    def test_a_lost_chunk_file_is_named_not_filled(self, published, key, read):
        b = published()
        b.remove(key)  # on the backend: a manifest that still lists the file must not hide it
        sp = SaliencyStore.open(b.url, "r", storage_options=b.options).split("train")
        with pytest.raises(MissingChunkError) as e:
            read(sp)
        assert f"{b.url}/{key}" in str(e.value)
        st = SaliencyStore.open(b.url, "r", storage_options=b.options)
        assert any(p.kind == "lost" and key in p.message for p in verify(st, "train"))
