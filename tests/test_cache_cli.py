"""``sat cache ...``: ls, info, stats, show, verify, and their error paths (exit 2, one line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from saliency_cache.cli import cache
from saliency_cache.encoding import VALUES
from saliency_cache.store import SaliencyStore

PROV = {
    "source": "teacher",
    "teacher_arch": "resnet10",
    "teacher_mode": "adversarial",
    "method": "gbp",
    "target_rule": "label",
    "threshold": None,
}
GROUPS = [pytest.param((cache, []), id="cache"), pytest.param((main, ["cache"]), id="sat")]


@pytest.fixture
def store(make_split, tmp_path):
    """train (10 samples, images): a complete binary map and a partial 1-channel ternary map;
    val (5 samples, no images): a complete map."""
    st, sp, _, _ = make_split(n=10, image_shape=(3, 6, 6), chunk_size=4, path=tmp_path / "s.zarr")
    rng = np.random.default_rng(0)
    gbp = rng.choice(VALUES["binary"], size=(10, 3, 6, 6)).astype(np.int8)
    mask = rng.choice(VALUES["ternary"], size=(10, 1, 6, 6)).astype(np.int8)
    with sp.create_map("resnet10-adv-gbp", provenance=PROV, encoding="binary", channels=3) as w:
        for k in range(w.n_chunks):
            s, e = w.chunk_bounds(k)
            w.write_chunk(k, gbp[s:e])
        w.finalize()
    with sp.create_map("mask", provenance={"source": "mask"}, encoding="ternary", channels=1) as w:
        w.write_chunk(0, mask[0:4])
        w.write_chunk(2, mask[8:10])
        w.finalize()
    val = st.create_split(
        "val",
        labels=np.arange(5) % 3,
        ids=[f"v{i}" for i in range(5)],
        fingerprint="val-fp",
        image_shape=(3, 6, 6),
        num_classes=3,
        chunk_size=4,
    )
    with val.create_map("box", provenance={"source": "box"}, encoding="binary", channels=1) as w:
        w.write_chunk(0, np.ones((4, 1, 6, 6), dtype=np.int8))
        w.write_chunk(1, -np.ones((1, 1, 6, 6), dtype=np.int8))
        w.finalize()
    return {"path": str(tmp_path / "s.zarr"), "gbp": gbp, "mask": mask}


def _invoke(group, args):
    grp, prefix = group
    return CliRunner().invoke(grp, [*prefix, *args])


def _error(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("cmd", ["ls", "info", "stats", "show", "verify"])
def test_help(group, cmd):
    res = _invoke(group, [cmd, "--help"])
    assert res.exit_code == 0 and "--json" in res.output


@pytest.mark.parametrize("group", GROUPS)
def test_ls(group, store):
    res = _invoke(group, ["ls", store["path"]])
    assert res.exit_code == 0, res.output
    assert "split train: n=10" in res.output and "images=yes" in res.output
    assert "split val: n=5" in res.output and "images=no" in res.output
    assert "resnet10-adv-gbp: binary (3, 6, 6) complete" in res.output
    assert "mask: ternary (1, 6, 6) partial 2/3 chunks" in res.output
    assert "teacher_mode=adversarial" in res.output
    data = json.loads(_invoke(group, ["ls", store["path"], "--json"]).output)
    train = {s["name"]: s for s in data["splits"]}["train"]
    maps = {m["name"]: m for m in train["maps"]}
    assert maps["mask"]["done_chunks"] == 2 and maps["mask"]["complete"] is False
    assert maps["resnet10-adv-gbp"]["bytes_on_disk"] > 0 and train["has_images"] is True


def test_info(store):
    res = _invoke((cache, []), ["info", store["path"], "resnet10-adv-gbp", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["split"] == "train" and info["encoding"] == "binary" and info["shape"] == [3, 6, 6]
    assert (info["chunk_size"], info["n_chunks"], info["n_shards"]) == (4, 3, 1)
    assert info["provenance"]["method"] == "gbp" and info["provenance"]["created"]
    assert info["codecs"][0]["name"] == "sharding_indexed" and info["complete"] is True
    text = _invoke((main, ["cache"]), ["info", store["path"], "val/box"]).output
    assert "map val/box" in text and "crc32c" in text and "source: box" in text


def test_stats_counts_written_chunks(store):
    res = _invoke((cache, []), ["stats", store["path"], "mask", "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    written = np.concatenate([store["mask"][0:4], store["mask"][8:10]])
    assert st["samples"] == 6 and st["chunks_counted"] == 2 and st["n_chunks"] == 3
    for v in (-1, 0, 1):
        assert st["counts"][str(v)] == int((written == v).sum())
    assert sum(st["fraction"].values()) == pytest.approx(1.0)
    assert st["bits_per_element_on_disk"] > 0
    text = _invoke((cache, []), ["stats", store["path"], "val/box"]).output
    assert "-1: 0.2000" in text and " 1: 0.8000" in text


def test_show_writes_a_png_grid(store, tmp_path):
    out = tmp_path / "grid.png"
    res = _invoke(
        (main, ["cache"]),
        [
            "show",
            store["path"],
            "resnet10-adv-gbp",
            "--index",
            "0",
            "--index",
            "9",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.format == "PNG"
        w3, h2 = im.size
    # The val split has no images: one column (map only), one row.
    out1 = tmp_path / "one.png"
    res = _invoke(
        (cache, []),
        [
            "show",
            store["path"],
            "box",
            "--split",
            "val",
            "--index",
            "4",
            "--out",
            str(out1),
            "--json",
        ],
    )
    assert res.exit_code == 0 and json.loads(res.output)["indices"] == [4]
    with Image.open(out1) as im:
        w1, h1 = im.size
    assert w3 > 2 * w1 and h2 > 1.5 * h1


def test_verify(store, tmp_path):
    res = _invoke((cache, []), ["verify", store["path"], "resnet10-adv-gbp"])
    assert (res.exit_code, res.output.strip()) == (0, "ok")
    res = _invoke((main, ["cache"]), ["verify", store["path"]])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines == [
        "train/maps/mask chunk 1: missing: chunk 1 (samples 4..7) was never written",
        "train/maps/mask: incomplete: 1 of 3 chunks missing",
    ]
    shard = Path(store["path"]) / "train/maps/resnet10-adv-gbp/data/c/0/0"
    raw = bytearray(shard.read_bytes())
    raw[20] ^= 0xFF
    shard.write_bytes(bytes(raw))
    res = _invoke((cache, []), ["verify", store["path"], "train/resnet10-adv-gbp", "--json"])
    assert res.exit_code == 1
    problems = json.loads(res.output)["problems"]
    assert [(p["chunk"], p["kind"]) for p in problems] == [(0, "corrupt")]


def test_split_defaults(make_split, tmp_path):
    st, sp, _, _ = make_split(n=4, split="a", path=tmp_path / "two.zarr")
    st.create_split(
        "b", labels=[0, 1], ids=["x", "y"], fingerprint="b", image_shape=(3, 5, 6), num_classes=3
    )
    msg = _error(_invoke((cache, []), ["stats", st.url, "m"]))
    assert "several splits" in msg and "a, b" in msg
    single, sp, _, _ = make_split(n=4, path=tmp_path / "one.zarr")
    with sp.create_map("m", provenance=PROV, encoding="binary", channels=3) as w:
        w.write_chunk(0, np.ones((4, 3, 5, 6), dtype=np.int8))
        w.finalize()
    res = _invoke((cache, []), ["stats", single.url, "m", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["split"] == "train"


def _corrupt_split_meta(path: str) -> None:
    (Path(path) / "train" / "zarr.json").write_text("{broken")


def _corrupt_map_meta(path: str) -> None:
    (Path(path) / "train" / "maps" / "mask" / "zarr.json").write_text("[]")


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(
    "args,prepare,expect",
    [
        (["ls", "{missing}"], None, "no store at"),
        (["ls", "{plain}"], None, "not a saliency store"),
        (["info", "{store}", "nope"], None, "no map 'nope'"),
        (["info", "{store}", "mask", "--split", "test"], None, "no split 'test'"),
        (["info", "{store}", "val/mask", "--split", "train"], None, "names split 'val'"),
        (["info", "{store}", "resnet10-adv-gbp"], _corrupt_split_meta, "cannot read the metadata"),
        (["info", "{store}", "mask"], _corrupt_map_meta, "cannot read the metadata"),
        (["show", "{store}", "mask", "--index", "10", "--out", "{tmp}/x.png"], None, "--index 10"),
        (["show", "{store}", "mask", "--index", "-1", "--out", "{tmp}/x.png"], None, "--index -1"),
        (
            ["show", "{store}", "mask", "--index", "5", "--out", "{tmp}/x.png"],
            None,
            "never written",
        ),
        (
            ["show", "{store}", "mask", "--index", "1", "--out", "{tmp}/no/dir/x.png"],
            None,
            "cannot write --out",
        ),
        (
            ["show", "{store}", "mask", "--index", "1", "--out", "{tmp}/x.unknownext"],
            None,
            "cannot write --out",
        ),
        (["verify", "{store}", "nope"], None, "no map 'nope'"),
        (["ls", "{store}", "-o", "novalue"], None, "KEY=VALUE"),
    ],
)
def test_error_paths(group, store, tmp_path, args, prepare, expect):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file.txt").write_text("hello")
    if prepare:
        prepare(store["path"])
    fmt = {
        "store": store["path"],
        "missing": str(tmp_path / "missing.zarr"),
        "plain": str(plain),
        "tmp": str(tmp_path),
    }
    res = _invoke(group, [a.format(**fmt) for a in args])
    assert expect in _error(res)


def test_ls_survives_a_corrupt_map(store):
    _corrupt_map_meta(store["path"])
    res = _invoke((cache, []), ["ls", store["path"]])
    assert res.exit_code == 0
    assert "mask: unreadable" in res.output and "resnet10-adv-gbp: binary" in res.output


def test_store_stays_untouched_by_inspection(store):
    before = {p: p.read_bytes() for p in Path(store["path"]).rglob("*") if p.is_file()}
    for args in (["ls"], ["info", "mask"], ["stats", "mask"], ["verify"]):
        _invoke((cache, []), [args[0], store["path"], *args[1:]])
    after = {p: p.read_bytes() for p in Path(store["path"]).rglob("*") if p.is_file()}
    assert before == after
    assert SaliencyStore.open(store["path"]).split("train").maps() == ["mask", "resnet10-adv-gbp"]
