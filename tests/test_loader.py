"""The streaming store loader: coverage across ranks and workers, alignment of images, labels
and maps with the store, shuffling, partial maps, and refusal of mismatched data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from saliency_cache.errors import IncompleteMapError, MismatchError, SatError
from saliency_cache.store import SaliencyStore
from tests.helpers import (
    BOX,
    GBP,
    GBP_TERNARY,
    MASK,
    add_random_map,
    make_store,
    teacher_provenance,
)
from trainer.batches import epoch_seed
from trainer.loader import StoreStream, WorkerLoader

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 72 samples in chunks of 16: four full blocks and a short one of 8.
    return make_store(
        tmp_path_factory.mktemp("loader"), n=72, n_val=16, chunk_size=16,
        maps=("mask", "gbp", "gbp-ternary"),
    )


def indices(batches) -> np.ndarray:
    return np.concatenate([b.index.numpy() for b in batches]) if batches else np.zeros(0, int)


def check_batch_matches_store(batch, stream: StoreStream, split, readers) -> None:
    idx = batch.index.numpy()
    assert batch.images.dtype == torch.uint8
    np.testing.assert_array_equal(batch.images.numpy(), split.read_images_indices(idx))
    np.testing.assert_array_equal(batch.labels.numpy(), split.labels()[idx])
    decoded = stream.decode_maps(batch.maps, CPU)
    assert len(decoded) == len(readers)
    for got, reader in zip(decoded, readers, strict=True):
        assert got.dtype == torch.int8
        np.testing.assert_array_equal(got.numpy(), reader.read_indices(idx))


# --------------------------------------------------------------------------- coverage


def test_every_sample_once_across_two_ranks_and_two_workers(store):
    split = store.split("train")
    names = [GBP, MASK, GBP_TERNARY]
    readers = [split.open_map(m) for m in names]
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = StoreStream(
                store.path, "train", names, batch_size=10, seed=5, buffer_blocks=2,
                rank=rank, world_size=2,
            )
            batches = list(WorkerLoader(stream, num_workers=2).epoch_batches(epoch))
            for b in batches:
                check_batch_matches_store(b, stream, split, readers)
            got = indices(batches)
            assert len(got) == len(set(got.tolist()))  # nothing twice within a rank
            seen.append(got)
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(store.n))


def test_workers_and_single_process_deliver_the_same_samples(store):
    stream = StoreStream(store.path, "train", [MASK], batch_size=8, seed=1)
    single = indices(list(stream.epoch_batches(0)))
    multi = indices(list(WorkerLoader(stream, num_workers=2).epoch_batches(0)))
    np.testing.assert_array_equal(np.sort(single), np.arange(store.n))
    np.testing.assert_array_equal(np.sort(multi), np.arange(store.n))


def test_batches_are_full_except_the_last_of_each_worker(store):
    stream = StoreStream(store.path, "train", (), batch_size=12, seed=0, buffer_blocks=1)
    sizes = [b.labels.numel() for b in stream.epoch_batches(0)]
    # One worker: a short batch only at the very end (short buffers carry over).
    assert sum(sizes) == store.n
    assert all(s == 12 for s in sizes[:-1]) and 0 < sizes[-1] <= 12
    assert stream.num_samples == store.n


def test_steps_per_epoch_is_a_count_every_rank_reaches(store):
    for workers in (0, 2):
        counts = []
        for rank in (0, 1):
            stream = StoreStream(store.path, "train", (), batch_size=8, seed=3, rank=rank,
                                 world_size=2)
            cap = stream.steps_per_epoch(epochs=3, num_workers=workers)
            for epoch in range(3):
                n_batches = len(list(WorkerLoader(stream, workers).epoch_batches(epoch)))
                assert n_batches >= cap
                counts.append(n_batches)
        assert cap == min(counts)


def test_epoch_steps_counts_the_batches_each_epoch_really_has(store):
    # The learning-rate schedule is sized from this count: with workers each one cuts its
    # own share into batches, so an epoch can have more batches than ceil(n / batch).
    stream = StoreStream(store.path, "train", (), batch_size=12, seed=1)
    seen = set()
    for workers in (0, 2):
        loader = WorkerLoader(stream, workers)
        for epoch in range(3):
            n_batches = len(list(loader.epoch_batches(epoch)))
            assert loader.epoch_steps(epoch) == n_batches
            seen.add(n_batches)
    assert max(seen) > -(-store.n // 12), "expected a workers' epoch with extra partial batches"


# --------------------------------------------------------------------------- order


def test_no_shuffle_reads_the_split_in_order(store):
    stream = StoreStream(store.path, "train", [MASK], batch_size=16, shuffle=False)
    np.testing.assert_array_equal(indices(list(stream.epoch_batches(0))), np.arange(store.n))
    np.testing.assert_array_equal(indices(list(stream.epoch_batches(3))), np.arange(store.n))


def test_shuffle_takes_whole_blocks_in_shuffled_order_then_shuffles_a_buffer(tmp_path):
    st = make_store(tmp_path, n=64, n_val=16, chunk_size=16, maps=())
    cs = st.chunk_size
    for buffer_blocks in (1, 2):
        size = cs * buffer_blocks  # one batch per buffer: no short batch carries over
        stream = StoreStream(st.path, "train", (), batch_size=size, seed=11,
                             buffer_blocks=buffer_blocks)
        block_orders = []
        for epoch in range(4):
            batches = [b.index.numpy() for b in stream.epoch_batches(epoch)]
            assert [len(b) for b in batches] == [size] * (st.n // size)
            order = []
            for b in batches:
                blocks = sorted(set((b // cs).tolist()))
                assert len(blocks) == buffer_blocks  # a buffer holds whole blocks...
                whole = np.concatenate([np.arange(k * cs, (k + 1) * cs) for k in blocks])
                np.testing.assert_array_equal(np.sort(b), whole)
                assert not np.array_equal(b, whole)  # ...shuffled together
                order += list(dict.fromkeys((b // cs).tolist()))
            assert sorted(order) == list(range(st.n // cs))
            block_orders.append(order)
        # Blocks are taken in a shuffled order that changes between epochs.
        assert any(o != sorted(o) for o in block_orders)
        assert len({tuple(o) for o in block_orders}) > 1


def reference_batches(stream: StoreStream, epoch: int, worker: int = 0, num_workers: int = 1):
    """The batches of an epoch as the loader's first implementation made them, which every
    faster one must reproduce exactly: each range read through zarr (``read_images`` /
    ``read_packed``), the carried short batch and the buffer's pieces concatenated, permuted
    by ``rng.permutation`` of the buffer, cut into batches. [(images, labels, index, *maps)]."""
    sp = SaliencyStore.open(stream.store_url, "r").split(stream.split_name)
    readers = [sp.open_map(m, allow_partial=stream.allow_partial) for m in stream.map_names]
    labels = torch.from_numpy(sp.labels())
    ranges = stream._rank_ranges(epoch)[worker::num_workers]
    rng = np.random.default_rng(epoch_seed(stream.seed, epoch, stream.rank, salt=4 + worker))
    bb, bs = stream.buffer_blocks, stream.batch_size
    carry, out = [], []
    for g in range(0, len(ranges), bb):
        parts = []
        for s, e in ranges[g : g + bb]:
            imgs = (sp.read_images(s, e) if stream.images_from is None
                    else np.asarray(stream.images_from.load_images(s, e), dtype=np.uint8))
            parts.append((torch.from_numpy(imgs), labels[s:e], torch.arange(s, e),
                          *[torch.from_numpy(r.read_packed(s, e)) for r in readers]))
        buf = [torch.cat(cols) for cols in zip(*(carry + parts), strict=True)]
        carry, n = [], buf[0].shape[0]
        perm = torch.from_numpy(rng.permutation(n)) if stream.shuffle else torch.arange(n)
        buf = [t[perm] for t in buf]
        for s in range(0, n, bs):
            cols = tuple(t[s : s + bs] for t in buf)
            if cols[0].shape[0] < bs and g + bb < len(ranges):
                carry = [cols]
                break
            out.append(cols)
    return out


def assert_same_batches(got, want) -> None:
    assert len(got) == len(want)
    for b, ref in zip(got, want, strict=True):
        cols = (b.images, b.labels, b.index, *b.maps)
        assert len(cols) == len(ref)
        for x, y in zip(cols, ref, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y)


@pytest.mark.parametrize(
    "batch_size,buffer_blocks,shuffle,world_size,num_workers",
    [(8, 1, True, 1, 1), (5, 2, True, 1, 1), (16, 3, True, 1, 1), (7, None, True, 1, 1),
     (12, 2, False, 1, 1), (5, 2, True, 3, 1), (6, 1, True, 2, 2), (40, 2, True, 2, 1)],
)
def test_batches_equal_the_reference_order(store, batch_size, buffer_blocks, shuffle,
                                           world_size, num_workers):
    # The split's short last block, ranks splitting blocks sample-wise (world 2 and 3 over
    # 4 full blocks + 8 samples), carried short batches and workers' shares; every batch of
    # two epochs, collected first so that batches sharing memory would show.
    names = [MASK, GBP, GBP_TERNARY]
    for rank in range(world_size):
        stream = StoreStream(store.path, "train", names, batch_size=batch_size, seed=9,
                             buffer_blocks=buffer_blocks, shuffle=shuffle, rank=rank,
                             world_size=world_size)
        for epoch in (0, 1):
            for w in range(num_workers):
                got = list(stream.iter_epoch(epoch, worker=w, num_workers=num_workers))
                assert_same_batches(got, reference_batches(stream, epoch, w, num_workers))


def test_batches_equal_the_reference_order_for_other_layouts(tmp_path):
    # Map chunks of 24 that straddle the images' blocks of 16, a partial map (chunks of 8,
    # two unwritten: their blocks are skipped), and images supplied by the dataset.
    st = make_store(tmp_path, n=72, n_val=16, chunk_size=16, maps=("mask", "gbp-ternary"),
                    map_chunk_size=24)
    partial = add_random_map(st, "train", teacher_provenance(), chunk_size=8, skip_chunks=(3, 8))
    streams = [StoreStream(st.path, "train", [MASK, GBP_TERNARY], batch_size=10, seed=2,
                           buffer_blocks=2, rank=r, world_size=2) for r in (0, 1)]
    streams.append(StoreStream(st.path, "train", [partial, MASK], batch_size=6, seed=1,
                               buffer_blocks=2, allow_partial=True))
    assert streams[-1].blocks == [0, 2, 3]
    bare = make_store(tmp_path, n=40, n_val=16, chunk_size=16, maps=("box",),
                      with_images=False, name="bare.zarr")
    streams.append(StoreStream(bare.path, "train", [BOX], batch_size=8, seed=4,
                               buffer_blocks=2, images_from=bare.data.open("train")))
    for stream in streams:
        for epoch in (0, 1):
            assert_same_batches(list(stream.iter_epoch(epoch)), reference_batches(stream, epoch))


def test_order_is_deterministic_per_seed_and_epoch(store):
    def order(seed, epoch, workers=0):
        s = StoreStream(store.path, "train", [MASK], batch_size=8, seed=seed)
        return indices(list(WorkerLoader(s, workers).epoch_batches(epoch)))

    a = order(7, 0)
    np.testing.assert_array_equal(a, order(7, 0))
    np.testing.assert_array_equal(order(7, 0, 2), order(7, 0, 2))
    assert not np.array_equal(a, order(7, 1))  # a new order every epoch
    assert not np.array_equal(a, order(8, 0))  # and per seed
    assert not np.array_equal(order(7, 1), order(7, 2))


def test_set_epoch_changes_the_order_seen_by_workers(store):
    stream = StoreStream(store.path, "train", (), batch_size=8, seed=2)
    loader = WorkerLoader(stream, 2)
    e0 = indices(list(loader.epoch_batches(0)))
    e1 = indices(list(loader.epoch_batches(1)))
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, indices(list(loader.epoch_batches(0))))


# --------------------------------------------------------------------------- maps


def test_multiple_maps_per_sample_are_streamed_aligned(store):
    split = store.split("train")
    names = [MASK, GBP]
    stream = StoreStream(store.path, "train", names, batch_size=16, seed=4)
    assert [s.shape for s in stream.specs] == [(1, 16, 16), (3, 16, 16)]
    readers = [split.open_map(m) for m in names]
    n = 0
    for b in stream.epoch_batches(0):
        assert len(b.maps) == 2 and all(m.dtype == torch.uint8 for m in b.maps)  # still packed
        check_batch_matches_store(b, stream, split, readers)
        n += b.labels.numel()
    assert n == store.n


def test_decode_on_device_matches_reader_for_binary_and_ternary(store):
    split = store.split("train")
    for name in (GBP, GBP_TERNARY, MASK):
        stream = StoreStream(store.path, "train", [name], batch_size=32, shuffle=False)
        batch = next(iter(stream.epoch_batches(0)))
        (dec,) = stream.decode_maps(batch.maps, CPU)
        want = split.open_map(name).read(0, 32)
        np.testing.assert_array_equal(dec.numpy(), want)
        assert set(np.unique(want)) <= {-1, 0, 1}


def test_partial_map_is_refused_unless_allowed_and_unwritten_chunks_are_skipped(tmp_path):
    st = make_store(tmp_path, n=80, n_val=16, chunk_size=16, maps=())
    # Map chunks of 8 samples: chunk 3 (samples 24..31) is missing, so split block 1
    # (samples 16..31) must be skipped; chunk 9 (72..79) takes out block 4 (64..79).
    name = add_random_map(st, "train", teacher_provenance(), chunk_size=8, skip_chunks=(3, 9))
    with pytest.raises(IncompleteMapError, match="allow_partial"):
        StoreStream(st.path, "train", [name], batch_size=8)
    reader = st.split().open_map(name, allow_partial=True)
    for rank in (0, 1):
        stream = StoreStream(st.path, "train", [name], batch_size=8, allow_partial=True,
                             rank=rank, world_size=2)
        assert stream.blocks == [0, 2, 3]
    got = []
    for rank in (0, 1):
        stream = StoreStream(st.path, "train", [name], batch_size=8, allow_partial=True,
                             rank=rank, world_size=2)
        for b in WorkerLoader(stream, 2).epoch_batches(0):
            (dec,) = stream.decode_maps(b.maps, CPU)
            np.testing.assert_array_equal(dec.numpy(), reader.read_indices(b.index.numpy()))
            got.append(b.index.numpy())
    want = np.r_[0:16, 32:64]
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), want)


def test_partial_map_with_nothing_written_is_refused(tmp_path):
    st = make_store(tmp_path, n=32, n_val=16, chunk_size=16, maps=())
    name = add_random_map(st, "train", teacher_provenance(), skip_chunks=(0, 1))
    with pytest.raises(SatError, match="no chunk"):
        StoreStream(st.path, "train", [name], batch_size=8, allow_partial=True)


def test_images_from_the_dataset_when_the_store_has_none(tmp_path):
    st = make_store(tmp_path, n=40, n_val=16, chunk_size=16, maps=("box",), with_images=False)
    with pytest.raises(SatError, match="no images"):
        StoreStream(st.path, "train", [BOX], batch_size=8)
    ds = st.data.open("train")
    stream = StoreStream(st.path, "train", [BOX], batch_size=8, images_from=ds)
    n = 0
    for b in WorkerLoader(stream, 2).epoch_batches(0):
        idx = b.index.numpy()
        np.testing.assert_array_equal(
            b.images.numpy(), np.stack([ds.load_images(i, i + 1)[0] for i in idx])
        )
        np.testing.assert_array_equal(b.labels.numpy(), ds.labels()[idx])
        n += len(idx)
    assert n == st.n


# --------------------------------------------------------------------------- refusals


def test_dataset_of_other_data_is_refused(tmp_path):
    st = make_store(tmp_path, n=32, n_val=16, maps=(), with_images=False)
    other_seed = st.data.options | {"seed": 1}
    other_len = st.data.options | {"n": 48}
    from pipelines.common import DataSpec

    for opts in (other_seed, other_len):
        ds = DataSpec("synthetic", None, opts).open("train")
        with pytest.raises(MismatchError, match="does not match") as e:
            StoreStream(st.path, "train", (), batch_size=8, images_from=ds)
        assert ds.fingerprint()[:16] in str(e.value)
    with pytest.raises(MismatchError, match="fingerprint"):
        StoreStream(st.path, "train", (), images_from=st.data.open("train"),
                    expect_fingerprint="f" * 64)


def test_map_copied_from_a_store_of_other_data_is_refused(tmp_path):
    st = make_store(tmp_path, n=32, n_val=16, maps=("mask",))
    for name, kw in (("seed.zarr", {"seed": 3}), ("len.zarr", {"n": 48})):
        other = make_store(tmp_path, **({"n": 32, "n_val": 16} | kw), maps=("gbp",), name=name)
        shutil.copytree(
            f"{other.path}/train/maps/{GBP}", f"{st.path}/train/maps/{GBP}", dirs_exist_ok=False
        )
        key = "fingerprint" if "seed" in kw else "'n'|n "
        with pytest.raises(MismatchError, match=key):
            StoreStream(st.path, "train", [MASK, GBP], batch_size=8)
        shutil.rmtree(f"{st.path}/train/maps/{GBP}")
    StoreStream(st.path, "train", [MASK], batch_size=8)  # the store itself is fine


def test_map_of_other_sample_ids_is_refused(tmp_path):
    st = make_store(tmp_path, n=32, n_val=16, maps=("gbp",))
    g = zarr.open_group(f"{st.path}/train/maps/{GBP}", mode="r+")
    g.attrs.update({"ids_sha256": "0" * 64})
    with pytest.raises(MismatchError, match="ids_sha256"):
        StoreStream(st.path, "train", [GBP], batch_size=8)


def test_map_of_other_spatial_shape_is_refused(tmp_path):
    # A map written by another tool for 8x8 images into a 16x16 split (the store API itself
    # never creates one, so it is edited in with plain zarr).
    st = make_store(tmp_path, n=32, n_val=16, maps=("mask",))
    g = zarr.open_group(f"{st.path}/train/maps/{MASK}", mode="r+")
    attrs = g.attrs.asdict()
    g.attrs.update({"shape": [1, 8, 8], "packed_nbytes": 8})
    g.create_array("data", shape=(attrs["n"], 8), dtype="uint8", chunks=(16, 8),
                   overwrite=True, fill_value=0)
    g["data"][:] = np.full((attrs["n"], 8), 0xFF, dtype=np.uint8)
    with pytest.raises(SatError, match=r"shape \(1, 8, 8\)"):
        StoreStream(st.path, "train", [MASK], batch_size=8)


def test_incomplete_map_without_allow_partial_is_refused(tmp_path):
    st = make_store(tmp_path, n=32, n_val=16, maps=())
    name = add_random_map(st, "train", teacher_provenance(), skip_chunks=(1,))
    with pytest.raises(IncompleteMapError, match="1 of 2 chunks missing"):
        StoreStream(st.path, "train", [name], batch_size=8)
    # A map whose chunks are all written but that was never finalized is refused too.
    g = zarr.open_group(f"{st.path}/train/maps/{name}", mode="r+")
    g["done"][:] = 1
    assert json.loads(json.dumps(g.attrs.asdict()))["complete"] is False
    with pytest.raises(IncompleteMapError, match="finalized"):
        StoreStream(st.path, "train", [name], batch_size=8)


def test_bad_arguments_are_refused(store):
    with pytest.raises(SatError, match="batch_size"):
        StoreStream(store.path, "train", (), batch_size=0)
    with pytest.raises(SatError, match="rank 2"):
        StoreStream(store.path, "train", (), rank=2, world_size=2)
    with pytest.raises(SatError, match="no map 'nope'"):
        StoreStream(store.path, "train", ["nope"])


@pytest.mark.parametrize("n,world", [(72, 2), (72, 3), (64, 3), (40, 4), (16, 2), (100, 7)])
def test_ranks_get_shares_that_differ_by_at_most_one_sample(tmp_path, n, world):
    # Blocks that do not divide evenly between ranks are split sample-wise, so no rank's
    # lock-step cap drops a whole block of the others' data.
    st = make_store(tmp_path, n=n, n_val=16, chunk_size=16, maps=("mask",))
    batches_per_rank = []
    for epoch in (0, 1):
        got = []
        for rank in range(world):
            stream = StoreStream(st.path, "train", [MASK], batch_size=8, seed=3,
                                 rank=rank, world_size=world)
            batches = list(stream.epoch_batches(epoch))
            batches_per_rank.append(len(batches))
            got.append(indices(batches))
        sizes = [len(g) for g in got]
        assert max(sizes) - min(sizes) <= 1, sizes
        np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.arange(n))
    # The DDP lock-step count is the fewest batches any rank delivers in any epoch.
    assert stream.steps_per_epoch(2) == min(batches_per_rank)


@pytest.mark.parametrize("encoding", ["binary", "ternary"])
@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 5, 3), (3, 7, 5)])
def test_map_decoder_inverts_the_store_packing(encoding, shape):
    # Rows whose element count is not a multiple of the values per byte end in padding.
    from saliency_cache.encoding import pack
    from tests.helpers import random_map_values
    from trainer.loader import MapDecoder, MapSpec

    values = random_map_values(9, shape, encoding, seed=len(shape) + shape[1])
    packed = torch.from_numpy(pack(values, encoding))
    got = MapDecoder(MapSpec("m", encoding, shape))(packed)
    assert got.dtype == torch.int8 and tuple(got.shape) == (9, *shape)
    np.testing.assert_array_equal(got.numpy(), values)
    np.testing.assert_array_equal(
        MapDecoder(MapSpec("m", encoding, shape))(packed[:0]).numpy(), values[:0]
    )


def test_default_buffer_mixes_a_class_sorted_store(tmp_path):
    """Stores keep the dataset order, often sorted by class; the default shuffle buffer must
    still give batches that mix the classes (a few-block buffer gave 1-2 classes per batch)."""
    from saliency_cache.store import SaliencyStore

    n, classes, cs = 256, 8, 16  # 16 blocks, each holding a single class
    labels = np.repeat(np.arange(classes), n // classes).astype(np.int64)
    st = SaliencyStore.open(tmp_path / "sorted.zarr", "a")
    sp = st.create_split(
        "train", labels=labels, ids=[str(i) for i in range(n)], fingerprint="sorted",
        image_shape=(3, 4, 4), num_classes=classes, chunk_size=cs, with_images=True,
    )
    for s in range(0, n, cs):
        sp.write_images(s, np.zeros((cs, 3, 4, 4), np.uint8))
    sp.mark_images_complete()
    per_batch = [
        len(np.unique(b.labels.numpy()))
        for b in StoreStream(tmp_path / "sorted.zarr", "train", batch_size=32, seed=0).iter_epoch(0)
    ]
    assert min(per_batch) >= 6, per_batch
    few = StoreStream(tmp_path / "sorted.zarr", "train", batch_size=32, seed=0, buffer_blocks=1)
    assert max(len(np.unique(b.labels.numpy())) for b in few.iter_epoch(0)) <= 2


def test_map_decoder_leaves_its_device_tables_behind_when_pickled():
    # DataLoader workers under spawn/forkserver receive the stream pickled; a cached CUDA
    # table would start a CUDA context in every worker.
    import pickle

    from trainer.loader import MapDecoder, MapSpec

    dec = MapDecoder(MapSpec("m", "ternary", (3, 4, 4)))
    packed = torch.zeros(2, 12, dtype=torch.uint8)
    want = dec(packed)
    assert dec._on  # the table was cached for the CPU
    copy = pickle.loads(pickle.dumps(dec))
    assert copy._on == {} and dec._on
    assert torch.equal(copy(packed), want)


def test_pinned_loading_pins_every_tensor_of_a_batch(store, monkeypatch):
    # Page-locked batches make the loop's non_blocking copies to a GPU asynchronous. No GPU
    # here, so Tensor.pin_memory is replaced by a marker.
    from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin

    pinned = []

    def fake_pin(self, *a, **k):
        out = self.clone()
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    stream = StoreStream(store.path, "train", [MASK, GBP], batch_size=16, seed=0)
    batches = list(WorkerLoader(stream, 0, pin_memory=True).epoch_batches(0))
    assert len(pinned) == 5 * len(batches)  # images, labels, index and both maps
    assert all(any(t is p for p in pinned) for b in batches for t in (b.images, *b.maps))
    # DataLoader's pin_memory thread (workers > 0) calls the same method on a Batch.
    b = batches[0]
    again = dataloader_pin(b)
    assert type(again) is type(b) and torch.equal(again.images, b.images)
    plain = list(WorkerLoader(stream, 0).epoch_batches(0))
    assert len(pinned) == 5 * len(batches) + 5 and len(plain) == len(batches)
