"""Sharing stores across teams: `sat cache copy`, read-only consumption over HTTP and S3.

Every test talks to a live local server it starts itself: a static HTTP host (a thread
running ``http.server`` with byte ranges, with or without directory listings) and, for S3, a
moto server. Nothing is mocked below the network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipelines.cli import main
from saliency_cache.cli import cache
from saliency_cache.copy import CopyError, copy_store
from saliency_cache.errors import (
    IncompleteMapError,
    MapNotFoundError,
    ReadOnlyError,
    SatError,
    StoreFormatError,
    StoreNotFoundError,
)
from saliency_cache.store import LOCK_NAME, MANIFEST_NAME, SaliencyStore
from saliency_cache.verify import verify
from tests.helpers import (
    GBP_TERNARY,
    MASK,
    add_random_map,
    corrupt_chunk,
    make_store,
    one_line_error,
    teacher_provenance,
)
from tests.servers import moto_s3, serve
from trainer.checkpoint import load_checkpoint
from trainer.loader import StoreStream


# ---- shared data --------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    """A complete store: train (64 samples: a binary mask map, a ternary map over 2 shards), val."""
    root = tmp_path_factory.mktemp("origin")
    return Path(make_store(root, maps=("mask", "gbp-ternary"), shard_chunks=2).path)


def _assert_same_store(remote: SaliencyStore, local: SaliencyStore) -> None:
    assert remote.splits() == local.splits() == ["train", "val"]
    for name in local.splits():
        r, lo = remote.split(name), local.split(name)
        assert (r.n, r.fingerprint, r.ids_sha256) == (lo.n, lo.fingerprint, lo.ids_sha256)
        assert r.ids() == lo.ids()
        np.testing.assert_array_equal(r.labels(), lo.labels())
        assert r.has_images() and lo.has_images()
        np.testing.assert_array_equal(r.read_images(0, r.n), lo.read_images(0, lo.n))
        assert r.maps() == lo.maps()
        for m in lo.maps():
            rm, lm = r.open_map(m), lo.open_map(m)
            assert rm.provenance == lm.provenance and rm.encoding == lm.encoding
            np.testing.assert_array_equal(rm.read(0, rm.n), lm.read(0, lm.n))
            idx = [5, 0, lm.n - 1, 5]
            np.testing.assert_array_equal(rm.read_indices(idx), lm.read_indices(idx))
            assert rm.nbytes_on_disk() == lm.nbytes_on_disk() > 0


def _assert_writes_refused(remote: SaliencyStore) -> None:
    sp = remote.split("train")
    with pytest.raises(ReadOnlyError):
        sp.create_map("new", provenance={"source": "box"}, encoding="binary", channels=1)
    with pytest.raises(ReadOnlyError):
        sp.open_map_writer(MASK)
    with pytest.raises(ReadOnlyError):
        remote.create_split(
            "test", labels=np.zeros(2, np.int64), ids=["a", "b"], fingerprint="f",
            image_shape=(3, 16, 16), num_classes=4,
        )
    with pytest.raises(ReadOnlyError):
        sp.delete_map(MASK)


def _cli(group, args: list[str]):
    return CliRunner().invoke(group, args)


# ---- HTTP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["listing", "static"])
def test_http_consumer_reads_the_store_read_only(origin, tmp_path, host):
    """A listing host serves the precompute output as is; a static host (no listings) serves a
    copy published with `sat cache copy`, whose manifest replaces the listings."""
    if host == "listing":
        served = origin.parent
    else:
        served = tmp_path / "site"
        copy_store(origin, served / origin.name)
    with serve(served, listings=host == "listing") as (base, _):
        url = f"{base}/{origin.name}"
        if host == "static":
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{url}/train/")
            assert e.value.code == 404  # the host really gives no listings
        remote = SaliencyStore.open(url, "r")
        assert remote.read_only and remote.url == url
        local = SaliencyStore.open(origin, "r")
        _assert_same_store(remote, local)
        assert verify(remote) == []
        assert verify(remote, "train", GBP_TERNARY) == []

        res = _cli(cache, ["ls", url, "--json"])
        assert res.exit_code == 0, res.output
        listed = {s["name"]: s for s in json.loads(res.stdout)["splits"]}
        assert [m["name"] for m in listed["train"]["maps"]] == [MASK, GBP_TERNARY]
        assert all(m["complete"] and m["matches_split"] for m in listed["train"]["maps"])
        res = _cli(main, ["cache", "verify", url])
        assert res.exit_code == 0 and res.stdout.strip() == "ok", res.output

        _assert_writes_refused(remote)
        for mode in ("a", "w"):
            with pytest.raises(ReadOnlyError, match="read-only"):
                SaliencyStore.open(url, mode)


def test_http_stream_and_training_match_the_local_store(origin, tmp_path):
    """StoreStream yields the same batches from a URL as from the path; `sat train --store URL`
    trains the same model (same seed, CPU) as from the local path."""
    served = tmp_path / "site"
    copy_store(origin, served / "store.zarr")
    with serve(served, listings=False) as (base, _):
        url = f"{base}/store.zarr"
        a = StoreStream(url, "train", [MASK, GBP_TERNARY], batch_size=16, seed=3)
        b = StoreStream(str(origin), "train", [MASK, GBP_TERNARY], batch_size=16, seed=3)
        batches = 0
        for x, y in zip(a.epoch_batches(1), b.epoch_batches(1), strict=True):
            assert torch.equal(x.images, y.images) and torch.equal(x.index, y.index)
            assert torch.equal(x.labels, y.labels)
            assert all(torch.equal(p, q) for p, q in zip(x.maps, y.maps, strict=True))
            batches += 1
        assert batches == 4

        runs = {}
        for where, store in (("http", url), ("local", str(origin))):
            out = tmp_path / where
            args = [
                "train", "--store", store, "--mode", "sat", "--map", MASK, "--epochs", "1",
                "--width", "4", "--batch-size", "16", "--device", "cpu", "--out", str(out),
                "--robust-val-samples", "8", "--quiet",
            ]
            res = _cli(main, args)
            assert res.exit_code == 0, res.output
            runs[where] = load_checkpoint(out / "checkpoints" / "last.safetensors")
    final = {w: ck.extra["metrics"] for w, ck in runs.items()}
    for key in ("loss", "train_acc", "val_acc", "val_robust_acc"):
        assert final["http"][key] == final["local"][key], key
    for k, v in runs["local"].model_state.items():
        assert torch.equal(runs["http"].model_state[k], v), k


def test_http_without_listings_or_manifest(origin):
    """Named splits and maps open by their paths alone; listing them fails with a clear message
    (and `sat cache verify` does not pass by checking nothing)."""
    with serve(origin.parent, listings=False) as (base, _):
        url = f"{base}/{origin.name}"
        remote = SaliencyStore.open(url, "r")
        m = remote.split("train").open_map(MASK)
        local = SaliencyStore.open(origin, "r").split("train").open_map(MASK)
        np.testing.assert_array_equal(m.read(0, m.n), local.read(0, local.n))
        assert remote.split("train").has_images()
        with pytest.raises(SatError, match="no directory listings.*sat cache copy"):
            remote.splits()
        for cmd in ("ls", "verify"):
            line = one_line_error(_cli(cache, [cmd, url]))
            assert MANIFEST_NAME in line
        with pytest.raises(SatError, match="no directory listings"):
            copy_store(url, origin.parent / "never.zarr")
        assert not (origin.parent / "never.zarr").exists()


def test_http_static_host_with_a_damaged_manifest(origin, tmp_path):
    site = tmp_path / "site"
    copy_store(origin, site / "store.zarr")
    (site / "store.zarr" / MANIFEST_NAME).write_text('{"format": "something else"}')
    with serve(site, listings=False) as (base, _):
        remote = SaliencyStore.open(f"{base}/store.zarr", "r")
        with pytest.raises(StoreFormatError, match="not a valid manifest"):
            remote.splits()
        assert remote.split("train").open_map(MASK).n == 64  # named access does not need it


def test_http_host_without_byte_ranges_is_refused(origin):
    with serve(origin.parent, ranges=False) as (base, _):
        with pytest.raises(SatError, match="ignores HTTP Range requests"):
            SaliencyStore.open(f"{base}/{origin.name}", "r")
    with serve(origin.parent) as (base, _):
        with pytest.raises(StoreNotFoundError):
            SaliencyStore.open(f"{base}/nothing.zarr", "r")


def test_copy_from_a_static_http_host(origin, tmp_path):
    site = tmp_path / "site"
    first = copy_store(origin, site / "store.zarr")
    with serve(site, listings=False) as (base, _):
        res = copy_store(f"{base}/store.zarr", tmp_path / "mirror.zarr")
    assert res["verified"] and res["files"] == first["files"] == len(_files(origin))
    # Every byte, the regenerated manifest included, equals the published copy.
    assert _files(tmp_path / "mirror.zarr") == _files(site / "store.zarr")


# ---- copy: local behaviour ------------------------------------------------------------------
def test_copy_imports_no_torch():
    """Publishing needs the format layer only (numpy, zarr, numcodecs, fsspec)."""
    code = "import sys, saliency_cache.copy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_copy_preserves_bytes_and_writes_a_manifest(origin, tmp_path):
    res = copy_store(origin, tmp_path / "copy.zarr")
    src, dst = _files(origin), _files(tmp_path / "copy.zarr")
    manifest = json.loads(dst.pop(MANIFEST_NAME))
    assert dst == src
    assert set(manifest["files"]) == set(src)
    assert all(manifest["files"][k]["size"] == len(v) for k, v in src.items())
    assert res["bytes"] == sum(len(v) for v in src.values())
    assert res["splits"] == {"train": [MASK, GBP_TERNARY], "val": []}


def test_copy_subsets_and_skips_bookkeeping(origin, tmp_path):
    src = tmp_path / "src.zarr"
    copy_store(origin, src)
    # What a killed writer leaves behind must not travel.
    (src / "train" / "maps" / MASK / LOCK_NAME).write_text('{"pid": 1}')
    (src / "train" / "maps" / MASK / "data" / f"c.{'0' * 32}.partial").write_bytes(b"junk")
    (src / "README.md").write_text("made by team A")  # not zarr, but part of the store

    copy_store(src, tmp_path / "all.zarr")
    files = _files(tmp_path / "all.zarr")
    assert files["README.md"] == b"made by team A"
    assert not any(LOCK_NAME in k or k.endswith(".partial") for k in files)
    assert len(files) == len(_files(origin)) + 2  # + README.md and the manifest

    copy_store(src, tmp_path / "one_map.zarr", maps=[MASK])
    st = SaliencyStore.open(tmp_path / "one_map.zarr")
    assert st.splits() == ["train", "val"] and st.split("train").maps() == [MASK]
    assert verify(st) == []
    files = _files(tmp_path / "one_map.zarr")
    assert not any(GBP_TERNARY in k or k == "README.md" for k in files)

    copy_store(src, tmp_path / "val.zarr", splits=["val"])
    st = SaliencyStore.open(tmp_path / "val.zarr")
    assert st.splits() == ["val"] and verify(st) == []

    with pytest.raises(MapNotFoundError, match="available"):
        copy_store(src, tmp_path / "x.zarr", splits=["train"], maps=["nope"])
    with pytest.raises(MapNotFoundError, match="available: train, val"):
        copy_store(src, tmp_path / "x.zarr", splits=["test"])
    assert not (tmp_path / "x.zarr").exists()


def test_copy_refuses_partial_maps_unless_allowed(tmp_path):
    st = make_store(tmp_path, maps=("mask",))
    add_random_map(st, "train", teacher_provenance(), skip_chunks=[2], seed=5)
    with pytest.raises(IncompleteMapError, match="resnet10-std-gbp"):
        copy_store(st.path, tmp_path / "copy.zarr")
    assert not (tmp_path / "copy.zarr").exists()
    res = copy_store(st.path, tmp_path / "copy.zarr", allow_partial=True)
    assert res["partial"] and all("resnet10-std-gbp" in p for p in res["partial"])
    copy = SaliencyStore.open(tmp_path / "copy.zarr").split("train")
    with pytest.raises(IncompleteMapError):
        copy.open_map("resnet10-std-gbp")
    part = copy.open_map("resnet10-std-gbp", allow_partial=True)
    assert part.done_chunks().tolist() == [True, True, False, True]


def test_copy_of_a_corrupt_store_fails_verification(origin, tmp_path):
    src = tmp_path / "src.zarr"
    copy_store(origin, src)
    corrupt_chunk(src / "train" / "maps" / GBP_TERNARY / "data" / "c" / "1" / "0", 1, 2)
    with pytest.raises(CopyError, match=rf"{GBP_TERNARY} chunk 3: corrupt"):
        copy_store(src, tmp_path / "copy.zarr")


def test_copy_cli(origin, tmp_path):
    dst = tmp_path / "cli.zarr"
    res = _cli(cache, ["copy", str(origin), str(dst), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "verified" in res.stdout and verify(SaliencyStore.open(dst)) == []
    line = one_line_error(_cli(cache, ["copy", str(origin), str(dst)]))
    assert "not empty" in line and "--overwrite" in line
    res = _cli(main, ["cache", "copy", str(origin), str(dst), "--overwrite", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verified"] is True

    junk = tmp_path / "notes"
    junk.mkdir()
    (junk / "todo.txt").write_text("keep me")
    line = one_line_error(_cli(cache, ["copy", str(origin), str(junk), "--overwrite"]))
    assert "not a saliency store" in line and (junk / "todo.txt").read_text() == "keep me"

    cases = [
        ([str(tmp_path / "missing.zarr"), str(tmp_path / "y.zarr")], "no store"),
        ([str(origin), "http://127.0.0.1:9/store.zarr"], "read-only"),
        ([str(origin), str(origin)], "overlap"),
        ([str(origin), str(origin / "inner.zarr")], "overlap"),
        ([str(origin), str(tmp_path / "y.zarr"), "--dst-option", "novalue"], "--dst-option"),
        ([str(origin), str(tmp_path / "y.zarr"), "--map", "nope"], "no map 'nope'"),
    ]
    for args, expect in cases:
        assert expect in one_line_error(_cli(cache, ["copy", *args])), args
    assert not (tmp_path / "y.zarr").exists()


# ---- S3 (moto) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with the bucket ``team-a``: ``(endpoint, bucket, options)``."""
    with moto_s3("team-a") as server:
        yield server


def _s3_cli_options(options: dict, flag: str = "-o") -> list[str]:
    out = []
    for k, v in options.items():
        out += [flag, f"{k}={json.dumps(v) if isinstance(v, dict) else v}"]
    return out


def test_s3_publish_consume_and_mirror(origin, tmp_path, s3):
    endpoint, bucket, options = s3
    url = f"s3://{bucket}/published/store.zarr"
    res = copy_store(origin, url, dst_options=options)
    assert res["verified"] and res["files"] == len(_files(origin))

    remote = SaliencyStore.open(url, "r", storage_options=options)
    _assert_same_store(remote, SaliencyStore.open(origin, "r"))
    assert verify(remote) == []
    _assert_writes_refused(remote)

    opts = _s3_cli_options(options)
    res = _cli(cache, ["ls", url, *opts, "--json"])
    assert res.exit_code == 0, res.output
    assert [s["name"] for s in json.loads(res.stdout)["splits"]] == ["train", "val"]
    res = _cli(cache, ["verify", url, *opts])
    assert res.exit_code == 0 and res.stdout.strip() == "ok", res.output

    res = _cli(cache, ["copy", url, str(tmp_path / "back.zarr"), *opts, "--quiet"])
    assert res.exit_code == 0, res.output
    back = _files(tmp_path / "back.zarr")
    manifest = back.pop(MANIFEST_NAME)
    assert back == _files(origin)  # byte for byte, there and back
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    assert fs.cat(f"{bucket}/published/store.zarr/{MANIFEST_NAME}") == manifest


def test_s3_copy_cli_refuses_and_overwrites(origin, s3):
    endpoint, bucket, options = s3
    url = f"s3://{bucket}/cli/store.zarr"
    dst_opts = _s3_cli_options(options, "--dst-option")
    res = _cli(cache, ["copy", str(origin), url, *dst_opts, "--quiet"])
    assert res.exit_code == 0, res.output
    assert "not empty" in one_line_error(_cli(cache, ["copy", str(origin), url, *dst_opts]))
    args = ["copy", str(origin), url, *dst_opts, "--overwrite", "--map", MASK, "--quiet"]
    res = _cli(cache, args)
    assert res.exit_code == 0, res.output
    remote = SaliencyStore.open(url, "r", storage_options=options)
    assert remote.split("train").maps() == [MASK] and verify(remote) == []

    import s3fs

    s3fs.S3FileSystem(**options).pipe(f"{bucket}/notes/todo.txt", b"keep me")
    line = one_line_error(
        _cli(cache, ["copy", str(origin), f"s3://{bucket}/notes", *dst_opts, "--overwrite"])
    )
    assert "not a saliency store" in line


def test_s3_training_reads_the_bucket(origin, tmp_path, s3, monkeypatch):
    """`sat train --store s3://...` takes its endpoint and keys from the standard AWS variables."""
    import s3fs

    endpoint, bucket, options = s3
    url = f"s3://{bucket}/train/store.zarr"
    copy_store(origin, url, dst_options=options)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    # Option-less filesystems are cached; one made before the variable was set would be stale.
    s3fs.S3FileSystem.clear_instance_cache()
    common = [
        "train", "--mode", "sat", "--map", MASK, "--epochs", "1", "--width", "4",
        "--batch-size", "16", "--device", "cpu", "--robust-val-samples", "8", "--quiet",
    ]
    finals = {}
    for where, store in (("s3", url), ("local", str(origin))):
        res = _cli(main, [*common, "--store", store, "--out", str(tmp_path / where)])
        assert res.exit_code == 0, res.output
        finals[where] = json.loads((tmp_path / where / "result.json").read_text())["final"]
    for key in ("loss", "train_acc", "val_acc", "val_robust_acc"):
        assert finals["s3"][key] == finals["local"][key], key
