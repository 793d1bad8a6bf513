"""Fault injection on the store's own files: every kind of file, removed, truncated or corrupted.

Each case damages one file of a copy of a complete store (a file of every kind in
:data:`saliency_cache.layout.FILE_KINDS`, so a new kind of file is covered once it is listed
there) and checks what a user meets: reading through the API raises a one-line SatError
naming the file; ``sat cache verify`` exits non-zero naming it; ``sat cache ls`` does not
call a damaged map complete; training refuses to start; and none of it writes a byte.

A removed chunk file is the case zarr hides by design (it reads an absent chunk as the fill
value, and zeros are valid labels, ids, images and packed maps), so it is the one that
needs the store's own file checks.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from saliency_cache.errors import CorruptChunkError, MissingChunkError, SatError
from saliency_cache.layout import FILE_KINDS
from saliency_cache.store import SaliencyStore
from saliency_cache.verify import verify
from tests.helpers import GBP_TERNARY, MASK, make_store, one_line_error
from trainer.loader import StoreStream

DAMAGES = ("remove", "truncate", "corrupt")
MAP = GBP_TERNARY  # the damaged map: ternary, 4 chunks of 16 in 2 shards
# The placeholders of FILE_KINDS, filled with a file of the store made below.
PLACES = {"<node>": f"train/maps/{MAP}/data/", "<split>": "train", "<map>": MAP, "<i>": "0"}


def _key(kind: str) -> str:
    key = FILE_KINDS[kind]
    for k, v in PLACES.items():
        key = key.replace(k, v)
    assert "<" not in key, f"FILE_KINDS[{kind!r}] = {FILE_KINDS[kind]!r} has an unknown placeholder"
    return key


def _is_map_file(kind: str) -> bool:
    return "/maps/" in _key(kind)


CASES = [(kind, damage) for kind in FILE_KINDS for damage in DAMAGES]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    return Path(make_store(root, maps=(MASK, "gbp-ternary"), shard_chunks=2).path)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _damage(root: Path, kind: str, damage: str) -> str:
    """Damage the file of ``kind`` in the store at ``root``; return its key."""
    key = _key(kind)
    path = root / key
    raw = path.read_bytes()
    assert raw, key
    if damage == "remove":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # flip every bit of the middle byte (metadata: no longer UTF-8; chunks: bad crc32c)
        mid = len(raw) // 2
        path.write_bytes(raw[:mid] + bytes([raw[mid] ^ 0xFF]) + raw[mid + 1 :])
    return key


@pytest.fixture(params=CASES, ids=[f"{k}-{d}" for k, d in CASES])
def damaged(request, pristine, tmp_path):
    kind, damage = request.param
    root = tmp_path / "store.zarr"
    shutil.copytree(pristine, root)
    key = _damage(root, kind, damage)
    return root, kind, damage, key


def _read_all(root: Path) -> None:
    """Everything a consumer reads: the split's arrays and every map, whole."""
    sp = SaliencyStore.open(root, "r").split("train")
    sp.labels()
    sp.ids()
    sp.read_images(0, sp.n)
    sp.read_images_indices([3, 40])
    for m in sp.maps():
        r = sp.open_map(m)
        r.read(0, r.n)
        r.read_indices([3, 40])


def _read_all_into(root: Path) -> None:
    """What the loader reads: labels, then images and packed maps into its buffers, whole."""
    sp = SaliencyStore.open(root, "r").split("train")
    sp.labels()
    sp.read_images_into([(0, sp.n)], np.empty((sp.n, *sp.image_shape), np.uint8))
    for m in sp.maps():
        r = sp.open_map(m)
        r.read_packed_into([(0, 20), (20, r.n)], np.empty((r.n, r.packed_nbytes), np.uint8))


def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern).replace("<node>", "(?:.+/)?")
    return re.compile("^" + re.sub(r"<[a-z]+>", "[^/]+", out) + "$")


def test_file_kinds_cover_every_file_of_a_store(pristine):
    """Each file of a store is of a listed kind (else a new kind would go untested here)."""
    regexes = [_regex(p) for p in FILE_KINDS.values()]
    unknown = [k for k in _files(pristine) if not any(r.match(k) for r in regexes)]
    assert not unknown, unknown
    assert all((pristine / _key(kind)).is_file() for kind in FILE_KINDS)


@pytest.mark.parametrize("read", [_read_all, _read_all_into], ids=["api", "loader-reads"])
def test_the_api_refuses_with_one_line_naming_the_file(damaged, read):
    root, kind, damage, key = damaged
    if read is _read_all_into and kind == "ids":
        read(root)  # the loader's reads never touch the ids (sat cache verify finds them)
        return
    with pytest.raises(SatError) as e:
        read(root)
    msg = str(e.value)
    assert "\n" not in msg
    if damage == "remove" or kind == "metadata":
        assert f"{root}/{key}" in msg, msg
        if kind != "metadata":
            assert isinstance(e.value, MissingChunkError)
    else:  # a chunk that fails its checksum: named by its map or array (as before)
        assert isinstance(e.value, CorruptChunkError), msg
        assert (MAP if _is_map_file(kind) else kind) in msg and "'train'" in msg, msg


def test_verify_finds_it_and_writes_nothing(damaged):
    root, kind, damage, key = damaged
    before = _files(root)
    problems = verify(SaliencyStore.open(root, "r"))
    assert problems, "verify found nothing"
    if damage == "remove":
        assert any(f"{root}/{key}" in str(p) for p in problems), problems
    res = CliRunner().invoke(main, ["cache", "verify", str(root)])
    assert res.exit_code == 1, res.output  # verify's exit code for "problems found"
    assert res.output.strip() != "ok"
    if damage == "remove":
        assert key in res.output
    assert _files(root) == before


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_ls_does_not_call_a_map_with_a_lost_file_complete(pristine, tmp_path, kind):
    root = tmp_path / "store.zarr"
    shutil.copytree(pristine, root)
    key = _damage(root, kind, "remove")
    before = _files(root)
    res = CliRunner().invoke(main, ["cache", "ls", str(root), "--json"])
    assert res.exit_code == 0, res.output  # ls lists; what it lists says what is wrong
    train = {s["name"]: s for s in json.loads(res.stdout)["splits"]}["train"]
    maps = {m["name"]: m for m in train["maps"]}
    if _is_map_file(kind):
        m = maps[MAP]
        assert not m.get("complete"), m
        assert key in (m.get("damaged") or m.get("error") or ""), m
        assert maps[MASK]["complete"] and maps[MASK]["damaged"] is None
    else:
        assert key in (train["damaged"] or ""), train
    text = CliRunner().invoke(main, ["cache", "ls", str(root)])
    assert key in text.output
    assert _files(root) == before


@pytest.mark.parametrize("kind", [k for k in FILE_KINDS if _is_map_file(k)])
def test_stats_and_show_refuse_a_map_with_a_lost_file(pristine, tmp_path, kind):
    root = tmp_path / "store.zarr"
    shutil.copytree(pristine, root)
    key = _damage(root, kind, "remove")
    before = _files(root)
    for cmd in (["stats"], ["show", "--index", "0", "--out", str(tmp_path / "x.png")]):
        res = CliRunner().invoke(main, ["cache", cmd[0], str(root), MAP, *cmd[1:]])
        assert key in one_line_error(res)
    assert not (tmp_path / "x.png").exists()
    res = CliRunner().invoke(main, ["cache", "info", str(root), MAP, "--json"])
    if kind == "metadata":
        assert key in one_line_error(res)
    else:
        info = json.loads(res.stdout)
        assert info["complete"] is False and key in info["damaged"]
    assert _files(root) == before


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_training_refuses_a_lost_file_before_the_first_step(pristine, tmp_path, kind):
    root = tmp_path / "store.zarr"
    shutil.copytree(pristine, root)
    key = _damage(root, kind, "remove")
    with pytest.raises(SatError, match="is missing") as e:
        StoreStream(str(root), "train", [MAP], batch_size=16, allow_partial=kind == "map_shard")
    assert f"{root}/{key}" in str(e.value)


def test_a_lost_shard_is_recomputed_by_a_resumed_writer(pristine, tmp_path):
    """pending_chunks lists the chunks of a lost shard, and writing them back repairs the map."""
    root = tmp_path / "store.zarr"
    shutil.copytree(pristine, root)
    want = SaliencyStore.open(root).split("train").open_map(MAP).read(0, 64)
    _damage(root, "map_shard", "remove")
    sp = SaliencyStore.open(root, "a").split("train")
    with sp.open_map_writer(MAP) as w:
        assert w.pending_chunks() == [0, 1]
        assert not w.finalize()  # not complete while chunks are lost
        w.write_chunks(0, want[:32])
        assert w.pending_chunks() == [] and w.finalize()
    assert verify(SaliencyStore.open(root)) == []
    np.testing.assert_array_equal(SaliencyStore.open(root).split("train").open_map(MAP).read(0, 64), want)


def test_a_write_into_a_lost_shard_unflags_the_chunks_it_does_not_cover(pristine, tmp_path):
    """Rewriting one chunk of a lost shard must not leave its other chunks flagged done
    (the new shard file would not hold them: they would read as zeros)."""
    root = tmp_path / "store.zarr"
    shutil.copytree(pristine, root)
    want = SaliencyStore.open(root).split("train").open_map(MAP).read(0, 64)
    _damage(root, "map_shard", "remove")
    sp = SaliencyStore.open(root, "a").split("train")
    with sp.open_map_writer(MAP) as w:
        w.write_chunk(0, want[:16])
        assert w.pending_chunks() == [1]
    r = SaliencyStore.open(root).split("train").open_map(MAP, allow_partial=True)
    assert r.done_chunks().tolist() == [True, False, True, True]
    np.testing.assert_array_equal(r.read(0, 16), want[:16])


def test_all_zero_chunks_still_get_their_files(tmp_path):
    """Chunks equal to the fill value are written too (zarr skips them by default), so an
    absent file always means a lost chunk: labels all 0, black images, an all -1 map."""
    st = SaliencyStore.open(tmp_path / "z.zarr", "w")
    sp = st.create_split(
        "train", labels=np.zeros(8, np.int64), ids=[str(i) for i in range(8)], fingerprint="f",
        image_shape=(1, 4, 4), num_classes=2, chunk_size=4, with_images=True,
    )
    sp.write_images(0, np.zeros((8, 1, 4, 4), np.uint8))
    sp.mark_images_complete()
    with sp.create_map("m", provenance={"source": "box"}, encoding="binary", channels=1,
                       shard_chunks=1) as w:
        w.write_chunks(0, -np.ones((8, 1, 4, 4), np.int8))
        assert w.finalize()
    sp = SaliencyStore.open(tmp_path / "z.zarr").split("train")
    sp.check_files()
    assert sp.open_map("m").read(0, 8).min() == -1
    assert verify(SaliencyStore.open(tmp_path / "z.zarr")) == []


def test_file_checks_cost_nothing_per_batch(pristine, monkeypatch):
    """The chunk-file checks run once per file and handle: an epoch in batches of 2 asks as
    many existence questions as one in batches of 32."""
    from saliency_cache.location import LocalLocation

    asked = []
    real = LocalLocation.exists
    monkeypatch.setattr(LocalLocation, "exists", lambda self, key: asked.append(key) or real(self, key))
    counts = {}
    for batch in (2, 32):
        asked.clear()
        stream = StoreStream(str(pristine), "train", [MASK, MAP], batch_size=batch, seed=0)
        assert sum(b.images.shape[0] for b in stream.epoch_batches(0)) == 64
        counts[batch] = len([k for k in asked if "/c/" in k])
    assert counts[2] == counts[32] > 0


def test_an_older_copy_of_a_shard_is_refused(tmp_path):
    """A shard file put back from before its last write holds fewer chunks than the done
    flags say: the missing chunk is named instead of reading as zeros."""
    st = SaliencyStore.open(tmp_path / "z.zarr", "w")
    sp = st.create_split(
        "train", labels=np.zeros(8, np.int64), ids=[str(i) for i in range(8)], fingerprint="f",
        image_shape=(1, 4, 4), num_classes=2, chunk_size=4,
    )
    values = np.where(np.arange(8 * 16).reshape(8, 1, 4, 4) % 3 == 0, 1, -1).astype(np.int8)
    shard = tmp_path / "z.zarr" / "train" / "maps" / "m" / "data" / "c" / "0" / "0"
    with sp.create_map("m", provenance={"source": "box"}, encoding="binary", channels=1,
                       shard_chunks=2) as w:
        w.write_chunk(0, values[:4])
        old = shard.read_bytes()  # holds chunk 0 only
        w.write_chunk(1, values[4:])
        assert w.finalize()
    shard.write_bytes(old)
    with pytest.raises(MissingChunkError, match=r"does not hold them.*chunks marked written \(1\.\.1\)"):
        SaliencyStore.open(tmp_path / "z.zarr").split("train").open_map("m")
    problems = verify(SaliencyStore.open(tmp_path / "z.zarr"))
    assert [(p.kind, p.chunk) for p in problems] == [("lost", 1)], problems
    with SaliencyStore.open(tmp_path / "z.zarr", "a").split("train").open_map_writer("m") as w:
        assert w.pending_chunks() == [1]
        w.write_chunk(1, values[4:])
        assert w.finalize()
    r = SaliencyStore.open(tmp_path / "z.zarr").split("train").open_map("m")
    np.testing.assert_array_equal(r.read(0, 8), values)
