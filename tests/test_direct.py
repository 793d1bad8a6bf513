"""Direct chunk reads (saliency_cache.direct): the loader's reads give the bytes zarr gives, for
every way a list of ranges can cut the chunks and shards, and refuse damage as zarr's path does."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from numcodecs import Zstd

from saliency_cache import direct
from saliency_cache.direct import DirectRows, zstd_content_size
from saliency_cache.errors import CorruptChunkError, MissingChunkError, SatError
from saliency_cache.store import SaliencyStore
from tests.helpers import GBP_TERNARY, MASK, add_random_map, make_store, teacher_provenance

# Ranges over a split of 72 samples (chunks of 16 images, maps in chunks of 16 or 24, two
# chunks per shard): whole chunks, the short last chunk, pieces inside one chunk, ranges
# across chunk and shard boundaries, an empty range, the same rows twice, reverse order.
RANGES = [
    [(0, 16)], [(64, 72)], [(3, 9)], [(10, 40)], [(48, 16 * 4), (0, 16), (20, 21)],
    [(5, 5), (0, 72)], [(16, 32), (16, 32)], [(56, 72), (40, 56), (24, 40), (8, 24)],
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    same = make_store(root, n=72, n_val=16, chunk_size=16, maps=("mask", "gbp-ternary"),
                      name="same.zarr")
    other = make_store(root, n=72, n_val=16, chunk_size=16, maps=("mask", "gbp-ternary"),
                       map_chunk_size=24, name="other.zarr")
    return same, other


def _expected(read, ranges) -> np.ndarray:
    return np.concatenate([read(s, e) for s, e in ranges])


@pytest.mark.parametrize("ranges", RANGES, ids=[str(i) for i in range(len(RANGES))])
def test_direct_reads_equal_zarr_reads(stores, ranges):
    for tiny in stores:
        sp = SaliencyStore.open(tiny.path, "r").split("train")
        rows = sum(e - s for s, e in ranges)
        out = np.full((rows, *sp.image_shape), 7, np.uint8)
        sp.read_images_into(ranges, out)
        np.testing.assert_array_equal(out, _expected(sp.read_images, ranges))
        assert sp._direct[0] is not None  # the direct path was taken
        for name in (MASK, GBP_TERNARY):
            r = sp.open_map(name)
            out = np.full((rows, r.packed_nbytes), 7, np.uint8)
            r.read_packed_into(ranges, out)
            np.testing.assert_array_equal(out, _expected(r.read_packed, ranges))
            assert r._direct[0] is not None


def test_without_a_direct_reader_zarr_gives_the_same_rows(stores, monkeypatch):
    monkeypatch.setattr(DirectRows, "of", classmethod(lambda cls, *a: None))
    sp = SaliencyStore.open(stores[1].path, "r").split("train")
    ranges = RANGES[4]
    out = np.empty((sum(e - s for s, e in ranges), *sp.image_shape), np.uint8)
    sp.read_images_into(ranges, out)
    np.testing.assert_array_equal(out, _expected(sp.read_images, ranges))
    r = sp.open_map(GBP_TERNARY)
    out = np.empty((out.shape[0], r.packed_nbytes), np.uint8)
    r.read_packed_into(ranges, out)
    np.testing.assert_array_equal(out, _expected(r.read_packed, ranges))
    assert sp._direct == [None] and r._direct == [None]


def test_other_layouts_and_remote_stores_get_no_direct_reader(stores, tmp_path):
    sp = SaliencyStore.open(stores[0].path, "r").split("train")
    assert DirectRows.of(sp.array("images"), sp.store.location, "x") is not None

    class Remote:  # any location but a local directory
        pass

    assert DirectRows.of(sp.array("images"), Remote(), "x") is None
    z = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    for kw in ({"compressors": None}, {"chunks": (4, 2)}, {"shards": (8, 4), "chunks": (4, 4)}):
        kw.setdefault("chunks", (4, 4))
        arr = z.create_array("a", shape=(16, 4), dtype="uint8", overwrite=True, **kw)
        assert DirectRows.of(arr, sp.store.location, "x") is None, kw
    arr = z.create_array("b", shape=(16, 4), dtype="int16", chunks=(4, 4))
    assert DirectRows.of(arr, sp.store.location, "x") is None


def test_partial_map_reads_unwritten_chunks_as_zeros_like_zarr(tmp_path):
    st = make_store(tmp_path, n=48, n_val=16, chunk_size=16, maps=())
    # Chunks of 8, two per shard: chunk 2 unwritten inside a shard, chunks 4-5 a whole
    # shard never written (no file).
    name = add_random_map(st, "train", teacher_provenance(), chunk_size=8, skip_chunks=(2, 4, 5))
    r = st.split().open_map(name, allow_partial=True)
    ranges = [(0, 48), (12, 30)]
    out = np.full((66, r.packed_nbytes), 7, np.uint8)
    r.read_packed_into(ranges, out)
    want = _expected(r.read_packed, ranges)
    np.testing.assert_array_equal(out, want)
    assert not want[16:24].any() and not want[32:48].any() and want[:16].any()


def test_bad_out_arrays_and_ranges_are_refused(stores):
    sp = SaliencyStore.open(stores[0].path, "r").split("train")
    with pytest.raises(SatError, match="out must be uint8"):
        sp.read_images_into([(0, 4)], np.empty((5, *sp.image_shape), np.uint8))
    with pytest.raises(SatError, match=r"range \[70, 80\)"):
        sp.read_images_into([(70, 80)], np.empty((10, *sp.image_shape), np.uint8))
    r = sp.open_map(MASK)
    with pytest.raises(SatError, match="out must be uint8"):
        r.read_packed_into([(0, 4)], np.empty((4, r.packed_nbytes), np.int8))


def test_a_chunk_damaged_after_opening_is_refused(stores, tmp_path):
    import shutil

    root = tmp_path / "s.zarr"
    shutil.copytree(stores[0].path, root)
    sp = SaliencyStore.open(root, "r").split("train")
    r = sp.open_map(GBP_TERNARY)
    imgs = np.empty((16, *sp.image_shape), np.uint8)
    sp.read_images_into([(32, 48)], imgs)  # the readers exist and checked their files
    r.read_packed_into([(0, 16)], np.empty((16, r.packed_nbytes), np.uint8))
    f = root / "train/images/c/2/0/0/0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match=r"images of split 'train'.*chunk 2 \(samples 32\.\.47\)"):
        sp.read_images_into([(32, 48)], imgs)
    f.unlink()
    with pytest.raises(MissingChunkError, match="train/images/c/2/0/0/0"):
        sp.read_images_into([(40, 41)], imgs[:1])
    shard = root / f"train/maps/{GBP_TERNARY}/data/c/0/0"  # chunks 0 and 1
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF  # inside chunk 0, the first stored
    shard.write_bytes(bytes(raw))
    out = np.empty((16, r.packed_nbytes), np.uint8)
    with pytest.raises(CorruptChunkError, match=rf"{GBP_TERNARY}.*chunk 0 \(samples 0\.\.15\)"):
        r.read_packed_into([(0, 16)], out)
    shard.write_bytes(bytes(raw[:-8]))  # truncated: the index no longer passes its crc32c
    with pytest.raises(CorruptChunkError, match="index of shard file"):
        r.read_packed_into([(16, 32)], out)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65791, 65792, 1 << 20])
def test_zstd_content_size_reads_the_frame_header(size):
    frame = Zstd(level=3).encode(np.arange(size, dtype=np.uint32).astype(np.uint8))
    assert zstd_content_size(memoryview(frame)) == size
    with pytest.raises(ValueError, match="not a zstd frame"):
        zstd_content_size(memoryview(b"\x00" * 8))


def test_a_frame_that_decodes_to_the_wrong_size_is_refused(stores, monkeypatch):
    sp = SaliencyStore.open(stores[0].path, "r").split("train")
    sp.read_images_into([(0, 1)], np.empty((1, *sp.image_shape), np.uint8))
    monkeypatch.setattr(direct, "zstd_content_size", lambda frame: 5)
    with pytest.raises(CorruptChunkError, match="decodes to 5 bytes"):
        sp.read_images_into([(0, 1)], np.empty((1, *sp.image_shape), np.uint8))
