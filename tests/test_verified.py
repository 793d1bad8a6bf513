"""Verification records: a later training start decodes no chunk it decoded before, but still
refuses every corrupt or changed chunk; records never go into the store and are never needed."""

from __future__ import annotations

import numpy as np
import pytest

import saliency_cache.verified as verified
import saliency_cache.verify as verify
from saliency_cache.errors import CorruptChunkError
from saliency_cache.store import SaliencyStore
from tests.helpers import corrupt_chunk
from trainer.loader import StoreStream

N, CHUNK, SHARD = 42, 4, 3  # 11 chunks (the last of 2 samples) in shards of 3, 3, 3 and 2
CHUNKS = 11
PROV = {"source": "teacher", "method": "random", "created": "2000-01-01T00:00:00+00:00"}


@pytest.fixture
def store(make_split, tmp_path, monkeypatch):
    """(store path, values int8 (N, 3, 5, 6)) of a split with images and a complete ternary
    map ``m``; records go to ``tmp_path / "records"``."""
    monkeypatch.setenv(verified.CACHE_ENV, str(tmp_path / "records"))
    st, sp, _, _ = make_split(n=N, chunk_size=CHUNK)
    values = np.random.default_rng(1).integers(-1, 2, (N, 3, 5, 6)).astype(np.int8)
    with sp.create_map("m", provenance=PROV, encoding="ternary", channels=3,
                       shard_chunks=SHARD) as w:
        w.write_chunks(0, values)
        assert w.finalize()
    return st.url, values


@pytest.fixture
def decodes(monkeypatch):
    """Counts of chunk decodes during a start: ``raw`` by the record's check, ``zarr`` by
    verify's own per-chunk path (each decoded chunk's values are validated once)."""
    counts = {"raw": 0, "zarr": 0}

    def counting(module, key):
        real = module.invalid_bytes

        def spy(*a, **k):
            counts[key] += 1
            return real(*a, **k)

        monkeypatch.setattr(module, "invalid_bytes", spy)

    counting(verified, "raw")
    counting(verify, "zarr")
    return counts


def start(path: str) -> StoreStream:
    """What training does before its first step (every check of StoreStream)."""
    return StoreStream(path, "train", ["m"], batch_size=8)


def shard_file(path: str, k: int):
    from pathlib import Path

    return Path(path) / "train" / "maps" / "m" / "data" / "c" / str(k // SHARD) / "0"


def test_a_later_start_decodes_no_chunk_the_first_start_decoded(store, decodes, tmp_path):
    path, _ = store
    start(path)
    assert decodes == {"raw": CHUNKS, "zarr": 0}  # each chunk decoded once, from its bytes
    assert len(list((tmp_path / "records").iterdir())) == 1
    decodes.update(raw=0, zarr=0)
    start(path)
    assert decodes == {"raw": 0, "zarr": 0}


@pytest.mark.parametrize("k", [0, 7, CHUNKS - 1])
def test_a_flipped_byte_is_refused_although_the_chunk_was_recorded(store, k):
    path, _ = store
    start(path)
    corrupt_chunk(shard_file(path, k), k % SHARD, SHARD)  # same size, same stored checksum
    with pytest.raises(CorruptChunkError, match=f"chunk {k} .*failed to decode"):
        start(path)


def test_a_chunk_rewritten_with_invalid_bytes_is_refused(store):
    path, _ = store
    start(path)
    # Valid checksums over bytes no ternary map packs to (code 0b11), written past the writer.
    r = SaliencyStore.open(path, "a").split("train").inspect_map("m")
    bad = np.full((CHUNK, r.packed_nbytes), 0xFF, dtype=np.uint8)
    r.data_array.with_config({"write_empty_chunks": True})[2 * CHUNK : 3 * CHUNK] = bad
    with pytest.raises(CorruptChunkError, match="chunk 2: sample 8 holds bytes no valid ternary"):
        start(path)


def test_a_chunk_changed_to_other_valid_values_is_decoded_again(store, decodes):
    path, values = store
    start(path)
    sp = SaliencyStore.open(path, "a").split("train")
    with sp.open_map_writer("m") as w:
        w.reset_chunks([5])
        w.write_chunk(5, -values[5 * CHUNK : 6 * CHUNK])
        assert w.finalize()
    decodes.update(raw=0, zarr=0)
    start(path)
    assert decodes == {"raw": 1, "zarr": 0}
    decodes.update(raw=0)
    start(path)
    assert decodes == {"raw": 0, "zarr": 0}


def test_an_unwritable_record_folder_costs_only_time(store, decodes, tmp_path, monkeypatch):
    path, _ = store
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(verified.CACHE_ENV, str(tmp_path / "file" / "records"))
    before = sorted(p for p in tmp_path.rglob("*"))
    for _ in range(2):
        decodes.update(raw=0)
        start(path)
        assert decodes["raw"] == CHUNKS  # nothing recorded, so everything decoded again
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing new, in the store or out


def test_records_off_and_a_malformed_record_mean_a_full_check(store, decodes, tmp_path,
                                                              monkeypatch):
    path, _ = store
    start(path)
    (record,) = (tmp_path / "records").iterdir()
    record.write_text("{not json")
    decodes.update(raw=0)
    start(path)
    assert decodes["raw"] == CHUNKS
    assert record.read_text().startswith("{")  # rewritten whole
    monkeypatch.setenv(verified.CACHE_ENV, "off")
    decodes.update(raw=0, zarr=0)
    start(path)
    assert decodes == {"raw": 0, "zarr": CHUNKS}  # verify's own full decode


def test_a_read_only_store_is_checked_with_its_record_outside_it(store, decodes, tmp_path):
    path, _ = store
    keys = SaliencyStore.open(path, "r").location.list_keys()
    st = SaliencyStore.open(path, "r")
    assert verify.verify(st, "train", "m", records=tmp_path / "elsewhere") == []
    assert verify.verify(st, "train", "m", records=tmp_path / "elsewhere") == []
    assert decodes["raw"] == CHUNKS
    assert SaliencyStore.open(path, "r").location.list_keys() == keys
    assert len(list((tmp_path / "elsewhere").iterdir())) == 1
