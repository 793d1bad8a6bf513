"""The saliency store: round trips, resume, locking, corruption, refusals, remote read-only access."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from saliency_cache.encoding import VALUES, pack, unpack
from saliency_cache.errors import (
    CorruptChunkError,
    IncompleteMapError,
    MapNotFoundError,
    MismatchError,
    ReadOnlyError,
    SatError,
    StoreFormatError,
    StoreNotFoundError,
    WriterLockedError,
)
from saliency_cache.store import (
    LOCK_NAME,
    Provenance,
    SaliencyStore,
    ids_digest,
    map_name_from_provenance,
    sanitize_map_name,
)
from saliency_cache.verify import verify

PROV = {
    "source": "teacher",
    "teacher_arch": "resnet10",
    "teacher_mode": "adversarial",
    "checkpoint_sha256": "ab" * 32,
    "method": "gbp",
    "method_params": {},
    "threshold": None,
    "target_rule": "label",
    "created": "2024-01-01T00:00:00+00:00",
}


def _values(encoding: str, n: int, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(VALUES[encoding], size=(n, *shape)).astype(np.int8)


def _write_all(writer, values: np.ndarray, order=None) -> None:
    for k in order if order is not None else range(writer.n_chunks):
        s, e = writer.chunk_bounds(k)
        writer.write_chunk(k, values[s:e])


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _run(script: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["binary", "ternary"])
@pytest.mark.parametrize("channels", [3, 1])
def test_round_trip_with_partial_last_chunk(make_split, encoding, channels):
    st, sp, _, _ = make_split(n=21, image_shape=(3, 5, 6), chunk_size=4)  # last chunk: 1 row
    values = _values(encoding, 21, (channels, 5, 6))
    with sp.create_map(
        "m", provenance=PROV, encoding=encoding, channels=channels, shard_chunks=2
    ) as w:
        assert (w.n_chunks, w.n_shards, w.chunk_bounds(5)) == (6, 3, (20, 21))
        assert list(w.chunks_of_shard(2)) == [4, 5] and w.shard_of_chunk(3) == 1
        _write_all(w, values)
        assert w.finalize() is True
    r = SaliencyStore.open(st.url).split("train").open_map("m")
    assert r.shape == (channels, 5, 6) and r.encoding == encoding and r.complete
    full = r.read(0, 21)
    assert full.dtype == np.int8
    np.testing.assert_array_equal(full, values)
    np.testing.assert_array_equal(r.read(3, 10), values[3:10])
    np.testing.assert_array_equal(r.read(21, 21), values[:0])
    idx = [20, 3, 3, 0, 17, 4]
    np.testing.assert_array_equal(r.read_indices(idx), values[idx])
    np.testing.assert_array_equal(r.read_packed(0, 21), pack(values, encoding))
    order = [5, 2, 0, 4, 1, 3]
    blocks = list(r.iter_blocks(order))
    assert [(s, e) for s, e, _ in blocks] == [(20, 21), (8, 12), (0, 4), (16, 20), (4, 8), (12, 16)]
    for s, e, v in blocks:
        np.testing.assert_array_equal(v, values[s:e])
    for s, e, p in r.iter_blocks(order, packed=True):
        assert p.dtype == np.uint8
        np.testing.assert_array_equal(unpack(p, encoding, r.shape), values[s:e])


def test_split_metadata_ids_and_images(make_split):
    st, sp, images, labels = make_split(n=10, chunk_size=4)
    sp = st.split("train")
    assert sp.n == 10 and sp.image_shape == (3, 5, 6) and sp.num_classes == 3
    assert sp.class_names == ["class0", "class1", "class2"] and sp.dataset["seed"] == 0
    np.testing.assert_array_equal(sp.labels(), labels)
    assert sp.labels().dtype == np.int64
    assert sp.ids() == [f"img_{i:04d}.png" for i in range(10)]
    assert sp.ids_sha256 == ids_digest(sp.ids())
    assert sp.has_images()
    np.testing.assert_array_equal(sp.read_images(2, 9), images[2:9])
    np.testing.assert_array_equal(sp.read_images_indices([9, 0, 9, 4]), images[[9, 0, 9, 4]])


def test_ids_round_trip_exactly(tmp_path):
    ids = ["a b.png", "dir/x.jpg", "ünïcødé", "", "with\nnewline", "7"]
    st = SaliencyStore.open(tmp_path / "s.zarr", "w")
    st.create_split(
        "val",
        labels=np.zeros(6, dtype=np.int64),
        ids=ids,
        fingerprint="f",
        image_shape=(1, 2, 2),
        num_classes=1,
    )
    assert SaliencyStore.open(tmp_path / "s.zarr").split("val").ids() == ids


def test_images_need_completion_and_whole_chunks(make_split):
    st, sp, images, _ = make_split(n=10, chunk_size=4, with_images=False)
    sp = st.create_split(
        "train",
        labels=sp.labels(),
        ids=sp.ids(),
        fingerprint=sp.fingerprint,
        image_shape=(3, 5, 6),
        num_classes=3,
        chunk_size=4,
        with_images=True,
    )
    assert not sp.has_images()
    with pytest.raises(SatError, match="whole chunks"):
        sp.write_images(2, images[2:6])
    with pytest.raises(SatError, match="uint8"):
        sp.write_images(0, images[:4].astype(np.int16))
    for s in range(0, 10, 4):
        sp.write_images(s, images[s : s + 4])
    with pytest.raises(IncompleteMapError, match="not completely written"):
        sp.read_images(0, 4)
    sp.mark_images_complete()
    assert st.split("train").has_images()
    np.testing.assert_array_equal(st.split("train").read_images(0, 10), images)


def test_create_split_is_idempotent_and_refuses_other_data(make_split):
    st, sp, _, labels = make_split(n=8, fingerprint="aaaa1111")
    again = st.create_split(
        "train",
        labels=labels,
        ids=sp.ids(),
        fingerprint="aaaa1111",
        image_shape=(3, 5, 6),
        num_classes=3,
        chunk_size=4,
    )
    assert again.n == 8 and again.has_images()
    with pytest.raises(MismatchError) as e:
        st.create_split(
            "train",
            labels=labels,
            ids=sp.ids(),
            fingerprint="bbbb2222",
            image_shape=(3, 5, 6),
            num_classes=3,
        )
    assert "aaaa1111" in str(e.value) and "bbbb2222" in str(e.value)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"ids": ["a", "a", "b"]}, "'a' occurs more than once"),
        ({"labels": np.array([0, 5, 1])}, "label 5 at index 1"),
        ({"ids": ["a", "b"]}, "2 ids given for 3 labels"),
        ({"image_shape": (3, 0, 4)}, "image_shape"),
        ({"fingerprint": ""}, "fingerprint"),
        ({"class_names": ["x"]}, "1 class names given for 3 classes"),
    ],
)
def test_create_split_validates(tmp_path, kw, match):
    args = {
        "labels": np.array([0, 1, 2]),
        "ids": ["a", "b", "c"],
        "fingerprint": "f",
        "image_shape": (3, 4, 4),
        "num_classes": 3,
        **kw,
    }
    with pytest.raises(SatError, match=match):
        SaliencyStore.open(tmp_path / "s.zarr", "a").create_split("train", **args)


# ---- layout --------------------------------------------------------------------------------
def test_on_disk_layout_is_sharded_and_checksummed(make_split):
    st, sp, _, _ = make_split(n=21, chunk_size=4)
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3, shard_chunks=2) as w:
        _write_all(w, _values("binary", 21, (3, 5, 6)))
        w.finalize()
    mdir = Path(st.url) / "train" / "maps" / "m"
    meta = json.loads((mdir / "data" / "zarr.json").read_text())
    assert meta["shape"] == [21, 12] and meta["data_type"] == "uint8"
    (shard,) = meta["codecs"]
    conf = shard["configuration"]
    assert shard["name"] == "sharding_indexed" and conf["chunk_shape"] == [4, 12]
    assert [c["name"] for c in conf["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [8, 12]  # 2 chunks per shard
    done = json.loads((mdir / "done" / "zarr.json").read_text())
    assert done["chunk_grid"]["configuration"]["chunk_shape"] == [2]  # one done chunk per shard
    assert sorted(p.name for p in (mdir / "data" / "c").iterdir()) == ["0", "1", "2"]
    attrs = json.loads((mdir / "zarr.json").read_text())["attributes"]
    assert attrs["complete"] is True and attrs["provenance"]["method"] == "gbp"
    assert attrs["fingerprint"] == sp.fingerprint and attrs["ids_sha256"] == sp.ids_sha256
    root = json.loads((Path(st.url) / "zarr.json").read_text())["attributes"]
    assert root == {"format": "sat-saliency-cache", "format_version": 1}


# ---- resume --------------------------------------------------------------------------------
_INTERRUPTED = """
import os, sys, json, numpy as np
from saliency_cache.store import SaliencyStore
url, prov, order = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
values = np.load(sys.argv[4])
w = SaliencyStore.open(url, "a").split("train").create_map(
    "m", provenance=prov, encoding="ternary", channels=1, shard_chunks=2)
for k in order:
    s, e = w.chunk_bounds(k)
    w.write_chunk(k, values[s:e])
os._exit(3)  # killed: no close, no finalize, the lock file stays behind
"""


def test_killed_writer_resumes_to_identical_bytes(make_split, tmp_path):
    values = _values("ternary", 21, (1, 5, 6), seed=4)
    np.save(tmp_path / "v.npy", values)
    _, ref_split, _, _ = make_split(n=21, chunk_size=4, path=tmp_path / "ref.zarr")
    with ref_split.create_map(
        "m", provenance=PROV, encoding="ternary", channels=1, shard_chunks=2
    ) as w:
        _write_all(w, values)
        assert w.finalize()

    st, sp, _, _ = make_split(n=21, chunk_size=4, path=tmp_path / "resumed.zarr")
    res = _run(_INTERRUPTED, st.url, json.dumps(PROV), "[0, 3, 5]", str(tmp_path / "v.npy"))
    assert res.returncode == 3, res.stderr
    lock = Path(st.url) / "train" / "maps" / "m" / LOCK_NAME
    assert lock.exists()  # the dead writer's lock: stale, so it is taken over below
    with pytest.raises(IncompleteMapError, match="3 of 6 chunks missing"):
        sp.open_map("m")
    # What zarr leaves when a write is killed mid-file: the resuming writer clears it.
    stale = lock.parent / "data" / "c" / f"0.{'5a' * 16}.partial"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a shard")
    with sp.create_map("m", provenance=PROV, encoding="ternary", channels=1) as w:
        assert not stale.exists()
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert w.pending_chunks() == [1, 2, 4]
        _write_all(w, values, order=[4, 1, 2])  # another order than the reference
        w.write_chunk(3, values[12:16])  # rewriting a done chunk is a no-op
        assert w.finalize()
    assert not lock.exists()
    np.testing.assert_array_equal(sp.open_map("m").read(0, 21), values)
    ref, got = _files(tmp_path / "ref.zarr"), _files(tmp_path / "resumed.zarr")
    assert sorted(ref) == sorted(got)
    assert [k for k in ref if ref[k] != got[k]] == []


def test_resume_keeps_created_time_and_done_chunks(make_split):
    _, sp, _, _ = make_split(n=12, chunk_size=4)
    prov = {k: v for k, v in PROV.items() if k != "created"}
    values = _values("binary", 12, (3, 5, 6))
    with sp.create_map("m", provenance=prov, encoding="binary", channels=3) as w:
        w.write_chunk(1, values[4:8])
        created = sp.inspect_map("m").provenance["created"]
    assert created and created.endswith("+00:00")
    with sp.open_map_writer("m") as w:
        assert w.pending_chunks() == [0, 2]
    with sp.create_map(
        "m", provenance={**prov, "created": "2030-01-01"}, encoding="binary", channels=3
    ) as w:
        assert w.pending_chunks() == [0, 2]  # same provenance: resumed, not restarted
    assert sp.inspect_map("m").provenance["created"] == created


def test_rewriting_a_done_chunk_must_give_the_same_values(make_split):
    st, sp, _, _ = make_split(n=8, chunk_size=4)
    values = _values("binary", 8, (3, 5, 6))
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3) as w:
        _write_all(w, values)
        shard = Path(st.url) / "train" / "maps" / "m" / "data" / "c" / "0" / "0"
        before = shard.read_bytes()
        w.write_chunk(0, values[:4])
        assert shard.read_bytes() == before
        with pytest.raises(MismatchError, match="chunk 0 .* already written with other values"):
            w.write_chunk(0, -values[:4])


def test_write_chunk_validates(make_split):
    _, sp, _, _ = make_split(n=10, chunk_size=4)
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=1) as w:
        good = _values("binary", 4, (1, 5, 6))
        with pytest.raises(SatError, match=r"\(rows, 1, 5, 6\)"):
            w.write_chunk(0, _values("binary", 4, (3, 5, 6)))
        with pytest.raises(SatError, match="dtype float32"):
            w.write_chunk(0, good.astype(np.float32))
        with pytest.raises(SatError, match="holds the value 0"):
            w.write_chunk(0, np.zeros_like(good))
        with pytest.raises(SatError, match="chunk boundary"):
            w.write_chunk(0, good[:3])
        with pytest.raises(SatError, match="chunk 3 is outside 0..2"):
            w.write_chunk(3, good)
        with pytest.raises(SatError, match="no valid binary map"):
            w.write_chunk_packed(2, np.full((2, 4), 0xFF, dtype=np.uint8))  # padding bits set
        w.write_chunk(2, good[:2])  # the last chunk holds 2 rows
        w.write_chunk_packed(1, pack(good, "binary"))
        assert w.pending_chunks() == [0]
        assert w.finalize() is False
    with pytest.raises(SatError, match="closed"):
        w.write_chunk(0, good)


def test_reset_chunks_makes_them_pending(make_split):
    _, sp, _, _ = make_split(n=8, chunk_size=4)
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3) as w:
        _write_all(w, _values("binary", 8, (3, 5, 6)))
        assert w.finalize()
        w.reset_chunks([1])
        assert w.pending_chunks() == [1]
    with pytest.raises(IncompleteMapError):
        sp.open_map("m")


# ---- corruption ----------------------------------------------------------------------------
def _flip_chunk_byte(shard: Path, local_chunk: int, chunks_per_shard: int) -> None:
    """Flip one byte inside a chunk's stored bytes, located through the shard index."""
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(raw[-(16 * chunks_per_shard + 4) : -4]), dtype="<u8").reshape(-1, 2)
    offset, length = (int(x) for x in index[local_chunk])
    raw[offset + length // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


def test_corrupt_byte_is_found_by_verify_and_refused_on_read(make_split):
    st, sp, _, _ = make_split(n=21, chunk_size=4)
    values = _values("binary", 21, (3, 5, 6))
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3, shard_chunks=2) as w:
        _write_all(w, values)
        w.finalize()
    assert verify(st) == []
    _flip_chunk_byte(Path(st.url) / "train/maps/m/data/c/1/0", local_chunk=1, chunks_per_shard=2)
    ro = SaliencyStore.open(st.url)
    problems = verify(ro)
    assert [(p.split, p.map, p.chunk, p.kind) for p in problems] == [("train", "m", 3, "corrupt")]
    assert "chunk 3" in str(problems[0])
    r = ro.split("train").open_map("m")
    np.testing.assert_array_equal(r.read(8, 12), values[8:12])  # same shard, other chunk
    with pytest.raises(CorruptChunkError, match="chunk 3 "):
        r.read(0, 21)
    with pytest.raises(CorruptChunkError, match="chunk 3 "):
        r.read_indices([0, 13])
    with pytest.raises(CorruptChunkError, match="chunk 3 "):
        list(r.iter_blocks([0, 3]))
    # The writer repairs it: reset the chunk, write it again.
    with st.split("train").open_map_writer("m") as w:
        w.reset_chunks([3])
        w.write_chunk(3, values[12:16])
        assert w.finalize()
    assert verify(ro) == []


def test_corrupt_shard_index_names_every_chunk_of_the_shard(make_split):
    st, sp, _, _ = make_split(n=16, chunk_size=4)
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3, shard_chunks=2) as w:
        _write_all(w, _values("binary", 16, (3, 5, 6)))
        w.finalize()
    shard = Path(st.url) / "train/maps/m/data/c/0/0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0x01
    shard.write_bytes(bytes(raw))
    found = [(p.chunk, p.kind) for p in verify(SaliencyStore.open(st.url), "train", "m")]
    assert found == [(0, "corrupt"), (1, "corrupt")]


def test_verify_reports_missing_chunks_ids_and_labels(make_split):
    st, sp, _, _ = make_split(n=12, chunk_size=4)
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3) as w:
        w.write_chunk(1, _values("binary", 4, (3, 5, 6)))
    kinds = [(p.chunk, p.kind) for p in verify(st)]
    assert kinds == [(0, "missing"), (2, "missing"), (None, "incomplete")]
    # ids that no longer match the recorded hash (an edited store) are reported too
    g = zarr.open_group(st.url, mode="r+")
    g["train/ids"][0] = "other.png"
    g["train/labels"][1] = 7
    kinds = {(p.kind, p.chunk) for p in verify(SaliencyStore.open(st.url), map_name=None)}
    assert ("mismatch", None) in kinds and ("invalid", 0) in kinds


# ---- refusals ------------------------------------------------------------------------------
def _complete_map(sp, name="m", encoding="binary", channels=3):
    with sp.create_map(name, provenance=PROV, encoding=encoding, channels=channels) as w:
        _write_all(w, _values(encoding, sp.n, (channels, *sp.image_shape[1:])))
        assert w.finalize()


def test_open_map_refuses_mismatches_quoting_both_values(make_split):
    st, sp, _, _ = make_split(n=8, chunk_size=4)
    _complete_map(sp)
    with pytest.raises(MismatchError, match="n 8 but expected has 9"):
        sp.open_map("m", expect_n=9)
    with pytest.raises(MismatchError) as e:
        sp.open_map("m", expect_fingerprint="some-other-fp")
    assert sp.fingerprint in str(e.value) and "some-other-fp" in str(e.value)
    other_ids = [f"x{i}" for i in range(8)]
    with pytest.raises(MismatchError) as e:
        sp.open_map("m", expect_ids=other_ids)
    assert sp.ids_sha256 in str(e.value) and ids_digest(other_ids) in str(e.value)
    r = sp.open_map("m", expect_n=8, expect_fingerprint=sp.fingerprint, expect_ids=sp.ids())
    assert r.n == 8
    # A map whose recorded split data differs from the split it sits in.
    g = zarr.open_group(st.url, mode="r+")
    g["train/maps/m"].attrs.update({"fingerprint": "stale-fp"})
    with pytest.raises(MismatchError) as e:
        SaliencyStore.open(st.url).split("train").open_map("m")
    assert "stale-fp" in str(e.value) and sp.fingerprint in str(e.value)


def test_incomplete_map_refused_unless_allow_partial(make_split):
    _, sp, _, _ = make_split(n=12, chunk_size=4)
    values = _values("ternary", 12, (1, 5, 6))
    with sp.create_map("m", provenance=PROV, encoding="ternary", channels=1) as w:
        w.write_chunk(2, values[8:12])
        assert w.finalize() is False
    with pytest.raises(IncompleteMapError, match=r"2 of 3 chunks missing \(first: 0, 1\)"):
        sp.open_map("m")
    r = sp.open_map("m", allow_partial=True)
    assert r.done_chunks().tolist() == [False, False, True] and not r.complete
    np.testing.assert_array_equal(r.read(8, 12), values[8:12])
    np.testing.assert_array_equal(r.read(0, 4), np.zeros((4, 1, 5, 6)))  # unwritten: zeros


def test_provenance_collision_refused_unless_overwrite(make_split):
    _, sp, _, _ = make_split(n=8, chunk_size=4)
    _complete_map(sp)
    with pytest.raises(MismatchError, match="method: 'gbp' vs 'ig'") as e:
        sp.create_map("m", provenance={**PROV, "method": "ig"}, encoding="binary", channels=3)
    assert "overwrite=True" in str(e.value)
    with pytest.raises(MismatchError, match="encoding"):
        sp.create_map("m", provenance=PROV, encoding="ternary", channels=3)
    with pytest.raises(MismatchError, match="chunk_size 4, asked for 2"):
        sp.create_map("m", provenance=PROV, encoding="binary", channels=3, chunk_size=2)
    with sp.create_map(
        "m", provenance={**PROV, "method": "ig"}, encoding="ternary", channels=1, overwrite=True
    ) as w:
        assert w.pending_chunks() == [0, 1] and w.encoding == "ternary"
    r = sp.inspect_map("m")
    assert r.provenance["method"] == "ig" and r.shape == (1, 5, 6) and not r.complete


def test_unknown_split_and_map_list_the_available(make_split):
    st, sp, _, _ = make_split(n=8)
    _complete_map(sp, "alpha")
    _complete_map(sp, "beta", channels=1)
    assert sp.maps() == ["alpha", "beta"]
    with pytest.raises(MapNotFoundError, match="no split 'test'.*available: train"):
        st.split("test")
    with pytest.raises(MapNotFoundError, match="no map 'gamma'.*available: alpha, beta"):
        sp.open_map("gamma")
    sp.delete_map("alpha")
    assert sp.maps() == ["beta"]


# ---- locks ---------------------------------------------------------------------------------
def test_second_writer_in_this_process_is_refused(make_split):
    _, sp, _, _ = make_split(n=8)
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3):
        with pytest.raises(WriterLockedError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            sp.create_map("m", provenance=PROV, encoding="binary", channels=3)
        with pytest.raises(WriterLockedError):
            sp.open_map_writer("m")
        with pytest.raises(WriterLockedError):
            sp.delete_map("m")
    with sp.open_map_writer("m"):  # released on exit
        pass


_HOLDER = """
import sys
from saliency_cache.store import SaliencyStore
w = SaliencyStore.open(sys.argv[1], "a").split("train").open_map_writer("m")
print("locked", flush=True)
sys.stdin.readline()
w.close()
"""


def test_writer_held_by_another_live_process_is_refused(make_split):
    _, sp, _, _ = make_split(n=8)
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3):
        pass
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), sp.store.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(WriterLockedError, match=f"pid {p.pid} on"):
            sp.open_map_writer("m")
    finally:
        p.communicate("\n", timeout=30)
    assert p.returncode == 0
    with sp.open_map_writer("m"):
        pass


def _write_lock(sp, name: str, **info) -> Path:
    path = Path(sp.store.url) / "train" / "maps" / name / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"token": "t", "started": "2024-01-01T00:00:00+00:00", **info}))
    return path


def test_stale_lock_of_a_dead_process_is_taken_over(make_split):
    _, sp, _, _ = make_split(n=8)
    lock = _write_lock(sp, "m", pid=_dead_pid(), host=socket.gethostname())
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_lock_from_another_host_needs_force_unlock(make_split):
    _, sp, _, _ = make_split(n=8)
    _write_lock(sp, "m", pid=1, host="some-other-host")
    with pytest.raises(WriterLockedError, match="some-other-host.*force_unlock=True"):
        sp.create_map("m", provenance=PROV, encoding="binary", channels=3)
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3, force_unlock=True) as w:
        assert w.pending_chunks() == [0, 1]


_SHARD_TASK = """
import sys, numpy as np
from saliency_cache.store import SaliencyStore
url, shard = sys.argv[1], int(sys.argv[2])
values = np.load(sys.argv[3])
w = SaliencyStore.attach_writer(url, "train", "m", shards=[shard])
for k in w.chunks_of_shard(shard):
    s, e = w.chunk_bounds(k)
    w.write_chunk(k, values[s:e])
"""


def test_attached_workers_write_their_own_shards_concurrently(make_split, tmp_path):
    st, sp, _, _ = make_split(n=21, chunk_size=4)
    values = _values("binary", 21, (3, 5, 6), seed=9)
    np.save(tmp_path / "v.npy", values)
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3, shard_chunks=2):
        pass
    with pytest.raises(WriterLockedError, match="no writer lock"):
        SaliencyStore.attach_writer(st.url, "train", "m")
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3, shard_chunks=2) as w:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    textwrap.dedent(_SHARD_TASK),
                    st.url,
                    str(s),
                    str(tmp_path / "v.npy"),
                ],
                stderr=subprocess.PIPE,
                text=True,
            )
            for s in range(w.n_shards)
        ]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        attached = SaliencyStore.attach_writer(st.url, "train", "m", shards=[0])
        with pytest.raises(SatError, match=r"owns shards \[0\].*not \[1\]"):
            attached.write_chunk(2, values[8:12])
        with pytest.raises(SatError, match="attached writer cannot finalize"):
            attached.finalize()
        assert w.finalize()
    np.testing.assert_array_equal(sp.open_map("m").read(0, 21), values)


# ---- store handles -------------------------------------------------------------------------
def test_read_only_handle_refuses_every_write(make_split):
    st, sp, images, _ = make_split(n=8)
    _complete_map(sp)
    ro = SaliencyStore.open(st.url, "r")
    assert ro.read_only
    rsp = ro.split("train")
    calls = [
        lambda: ro.create_split(
            "x",
            labels=np.zeros(2, dtype=np.int64),
            ids=["a", "b"],
            fingerprint="f",
            image_shape=(3, 5, 6),
            num_classes=1,
        ),
        lambda: rsp.create_map("n", provenance=PROV, encoding="binary", channels=3),
        lambda: rsp.open_map_writer("m"),
        lambda: rsp.delete_map("m"),
        lambda: rsp.write_images(0, images[:4]),
        lambda: rsp.mark_images_complete(),
        lambda: (
            SaliencyStore.open(st.url, "r")
            .split("train")
            .create_map("m", provenance=PROV, encoding="binary", channels=3)
        ),
    ]
    for call in calls:
        with pytest.raises(ReadOnlyError, match="read-only"):
            call()
    assert sp.maps() == ["m"]


def test_open_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no store at"):
        SaliencyStore.open(tmp_path / "missing.zarr")
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "cat.jpg").write_bytes(b"not a store")
    with pytest.raises(StoreFormatError, match="not a saliency store"):
        SaliencyStore.open(plain)
    for mode in ("a", "w"):
        with pytest.raises(StoreFormatError, match="refusing to write into it"):
            SaliencyStore.open(plain, mode)
    assert sorted(p.name for p in plain.iterdir()) == ["cat.jpg"]
    SaliencyStore.open(tmp_path / "s.zarr", "w")
    with pytest.raises(SatError, match="already exists.*mode 'a'"):
        SaliencyStore.open(tmp_path / "s.zarr", "w")
    assert SaliencyStore.open(tmp_path / "s.zarr", "a").splits() == []
    zarr.open_group(tmp_path / "s.zarr", mode="r+").attrs.update({"format_version": 2})
    with pytest.raises(
        StoreFormatError, match="format_version 2; this package reads format_version 1"
    ):
        SaliencyStore.open(tmp_path / "s.zarr")
    zarr.create_group(str(tmp_path / "other.zarr"), attributes={"format": "something"})
    with pytest.raises(StoreFormatError, match="'something'"):
        SaliencyStore.open(tmp_path / "other.zarr")
    (tmp_path / "s.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreFormatError, match="cannot read the metadata"):
        SaliencyStore.open(tmp_path / "s.zarr")
    with pytest.raises(SatError, match="mode"):
        SaliencyStore.open(tmp_path / "s.zarr", "x")


def test_remote_fsspec_urls(make_split):
    st, sp, _, _ = make_split(n=10, chunk_size=4)
    values = _values("binary", 10, (3, 5, 6))
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3) as w:
        _write_all(w, values)
        w.finalize()
    remote = SaliencyStore.open("file://" + os.path.abspath(st.url), "r")
    rsp = remote.split("train")
    assert remote.splits() == ["train"] and rsp.maps() == ["m"]
    r = rsp.open_map("m", expect_ids=sp.ids())
    np.testing.assert_array_equal(r.read(0, 10), values)
    assert r.nbytes_on_disk() == sp.open_map("m").nbytes_on_disk() > 0
    assert verify(remote) == []
    with pytest.raises(ReadOnlyError):
        rsp.create_map("n", provenance=PROV, encoding="binary", channels=3)
    with pytest.raises(StoreNotFoundError):
        SaliencyStore.open("file://" + os.path.abspath(st.url) + "-missing")


def test_memory_store_write_then_read(tmp_path):
    url = f"memory://sat-test-{os.getpid()}-{tmp_path.name}/s.zarr"
    st = SaliencyStore.open(url, "w")
    sp = st.create_split(
        "train",
        labels=np.arange(6) % 2,
        ids=[str(i) for i in range(6)],
        fingerprint="mem",
        image_shape=(1, 3, 3),
        num_classes=2,
        chunk_size=4,
    )
    values = _values("ternary", 6, (1, 3, 3))
    with sp.create_map("m", provenance=PROV, encoding="ternary", channels=1) as w:
        with pytest.raises(WriterLockedError):  # best-effort lock through the store
            sp.open_map_writer("m")
        _write_all(w, values)
        assert w.finalize()
    ro = SaliencyStore.open(url, "r")
    np.testing.assert_array_equal(
        ro.split("train").open_map("m").read_indices([5, 0]), values[[5, 0]]
    )
    assert ro.split("train").open_map("m").nbytes_on_disk() > 0
    with pytest.raises(StoreFormatError, match="not empty"):
        SaliencyStore.open(url.rsplit("/", 1)[0], "a")


# ---- names and provenance ------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw,clean",
    [
        ("../evil", "evil"),
        ("a/b", "a_b"),
        ("my map", "my_map"),
        ("resnet10-adv-gbp", "resnet10-adv-gbp"),
        ("..hidden", "hidden"),
        ("x\\y:z", "x_y_z"),
    ],
)
def test_sanitize_map_name(raw, clean):
    assert sanitize_map_name(raw) == clean


@pytest.mark.parametrize("raw", ["", "..", "///", "._", "zarr.json", "x" * 200])
def test_sanitize_refuses(raw):
    with pytest.raises(SatError):
        sanitize_map_name(raw)


def test_map_names_stay_inside_the_store(make_split, tmp_path):
    st, sp, _, _ = make_split(n=8)
    with sp.create_map("../../evil", provenance=PROV, encoding="binary", channels=3) as w:
        assert w.name == "evil"
    assert (Path(st.url) / "train" / "maps" / "evil" / "zarr.json").is_file()
    assert not any(p.name == "evil" for p in tmp_path.iterdir())
    with pytest.raises(SatError):
        st.create_split(
            "../x", labels=[0], ids=["a"], fingerprint="f", image_shape=(1, 1, 1), num_classes=1
        )


def test_map_name_from_provenance():
    assert map_name_from_provenance(PROV) == "resnet10-adv-gbp"
    assert (
        map_name_from_provenance(
            {**PROV, "teacher_arch": "ResNet34", "teacher_mode": "standard", "method": "grad cam++"}
        )
        == "resnet34-std-grad_campp"
    )
    assert map_name_from_provenance({**PROV, "target_rule": "argmax"}) == "resnet10-adv-gbp-argmax"
    assert map_name_from_provenance({"source": "mask"}) == "mask"
    with pytest.raises(SatError, match="teacher_arch"):
        map_name_from_provenance({"source": "teacher", "method": "gbp"})


def test_provenance_dataclass_round_trip():
    p = Provenance.from_dict({**PROV, "seed": 3, "dataset": {"name": "cifar10"}})
    assert p.extra == {"seed": 3, "dataset": {"name": "cifar10"}}
    assert Provenance.from_dict(p.to_dict()) == p
    assert list(p.to_dict())[-2:] == ["dataset", "seed"]  # extras sorted, after the fields
    with pytest.raises(SatError, match="target_rule"):
        Provenance(source="teacher", target_rule="random")
    with pytest.raises(SatError, match="source"):
        Provenance.from_dict({"method": "gbp"} | {"source": ""})


def test_format_layer_does_not_import_torch():
    res = _run("""
        import sys
        import saliency_cache, saliency_cache.store, saliency_cache.verify, saliency_cache.encoding
        print("torch" in sys.modules)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
