"""Benchmark the saliency store: bits per element on disk, write and read throughput.

Writes a 50,000 x 3 x 32 x 32 map in each encoding (random {-1, +1} for binary, random
{-1, 0, +1} for ternary, fixed seed) into a temporary directory and reads it back
sequentially and in shuffled chunk order. Random maps are the worst case for the
compressor, so the bits per element measured here bound real maps from above.

    python bench/bench_store.py --out bench/results/store.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _machine() -> dict:
    import numcodecs
    import zarr

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
    }


def _values(rng: np.random.Generator, encoding: str, shape: tuple[int, ...]) -> np.ndarray:
    if encoding == "binary":
        v = rng.integers(0, 2, size=shape, dtype=np.int8)
        return (v << 1) - 1  # {0, 1} -> {-1, +1} without a wider temporary
    return rng.integers(-1, 2, size=shape, dtype=np.int8)


def bench_encoding(
    root: Path,
    encoding: str,
    n: int,
    shape: tuple[int, int, int],
    chunk_size: int,
    shard_chunks: int,
    seed: int,
) -> dict:
    from saliency_cache.store import SaliencyStore

    rng = np.random.default_rng(seed)
    values = _values(rng, encoding, (n, *shape))
    st = SaliencyStore.open(root / f"{encoding}.zarr", "w")
    sp = st.create_split(
        "train",
        labels=np.zeros(n, dtype=np.int64),
        ids=[str(i) for i in range(n)],
        fingerprint="bench",
        image_shape=shape,
        num_classes=1,
        chunk_size=chunk_size,
    )
    prov = {"source": "bench", "method": "random", "created": "2000-01-01T00:00:00+00:00"}

    # Chunk by chunk, as a precompute task writes: each write rewrites its shard file.
    t0 = time.perf_counter()
    with sp.create_map(
        "by-chunk", provenance=prov, encoding=encoding, channels=shape[0], shard_chunks=shard_chunks
    ) as w:
        for k in range(w.n_chunks):
            s, e = w.chunk_bounds(k)
            w.write_chunk(k, values[s:e])
        assert w.finalize()
    t_chunk = time.perf_counter() - t0

    # One call per shard: each shard file is written once.
    t0 = time.perf_counter()
    with sp.create_map(
        "by-shard", provenance=prov, encoding=encoding, channels=shape[0], shard_chunks=shard_chunks
    ) as w:
        for s_ in range(w.n_shards):
            ks = w.chunks_of_shard(s_)
            a, _ = w.chunk_bounds(ks[0])
            _, b = w.chunk_bounds(ks[-1])
            w.write_chunks(ks[0], values[a:b])
        assert w.finalize()
        n_chunks, n_shards = w.n_chunks, w.n_shards
    t_shard = time.perf_counter() - t0

    r = sp.open_map("by-shard")
    nbytes = r.nbytes_on_disk()
    files = sum(len(f) for _, _, f in os.walk(root / f"{encoding}.zarr" / "train/maps/by-shard"))
    same = st.split("train").open_map("by-chunk").read_packed(0, n)
    assert np.array_equal(same, r.read_packed(0, n)), "per-chunk and per-shard writes differ"

    t0 = time.perf_counter()
    rows = 0
    for _s, _e, v in r.iter_blocks():
        rows += v.shape[0]
    t_seq = time.perf_counter() - t0
    assert rows == n
    np.testing.assert_array_equal(r.read(0, n), values)  # untimed: the bytes decode to the input

    order = np.random.default_rng(seed + 1).permutation(n_chunks).tolist()
    t0 = time.perf_counter()
    rows = 0
    for _s, _e, v in r.iter_blocks(order):
        rows += v.shape[0]
    t_shuf = time.perf_counter() - t0
    assert rows == n

    t0 = time.perf_counter()
    for _ in r.iter_blocks(order, packed=True):
        pass
    t_packed = time.perf_counter() - t0

    elements = n * int(np.prod(shape))
    return {
        "bits_per_element": nbytes * 8 / elements,
        "bytes_on_disk": nbytes,
        "files": files,
        "n_chunks": n_chunks,
        "n_shards": n_shards,
        "write_maps_per_s": n / t_chunk,
        "write_by_shard_maps_per_s": n / t_shard,
        "seq_read_maps_per_s": n / t_seq,
        "block_shuffled_read_maps_per_s": n / t_shuf,
        "block_shuffled_packed_read_maps_per_s": n / t_packed,
    }


def main(argv: list[str] | None = None) -> int:
    """The benchmark, top to bottom (long on purpose: every figure of the results file is
    measured here in one run, one after another, so that the ratios compare like with like)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="bench/results/store.json", help="JSON result file.")
    ap.add_argument("--n", type=int, default=50_000, help="Samples per map.")
    ap.add_argument(
        "--chunk-size", type=int, default=None, help="Samples per chunk (store default)."
    )
    ap.add_argument(
        "--shard-chunks", type=int, default=None, help="Chunks per shard (store default)."
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from saliency_cache.store import DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_CHUNKS, ZSTD_LEVEL

    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    shard_chunks = args.shard_chunks or DEFAULT_SHARD_CHUNKS
    shape = (3, 32, 32)
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        for enc in ("binary", "ternary"):
            results[enc] = bench_encoding(
                Path(tmp), enc, args.n, shape, chunk_size, shard_chunks, args.seed
            )
    b, t = results["binary"], results["ternary"]
    out = {
        "bits_per_element_binary": b["bits_per_element"],
        "bits_per_element_ternary": t["bits_per_element"],
        # Headline throughputs are the binary map's (the paper's sign maps); both are below.
        "seq_read_maps_per_s": b["seq_read_maps_per_s"],
        "block_shuffled_read_maps_per_s": b["block_shuffled_read_maps_per_s"],
        "write_maps_per_s": b["write_maps_per_s"],
        "per_encoding": results,
        "params": {
            "n": args.n,
            "map_shape": list(shape),
            "chunk_size": chunk_size,
            "shard_chunks": shard_chunks,
            "compressor": f"zstd(level={ZSTD_LEVEL}) + crc32c",
            "seed": args.seed,
            "write_maps_per_s": "write_chunk per chunk (a precompute task's path), pack included",
            "read_maps_per_s": "iter_blocks, decoded to int8 unless marked packed",
        },
        "machine": _machine(),
        "seconds": time.perf_counter() - t0,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    for enc, r in results.items():
        print(
            f"{enc:8s} {r['bits_per_element']:.4f} bits/element, {r['files']} files, "
            f"write {r['write_maps_per_s']:,.0f} maps/s (by shard {r['write_by_shard_maps_per_s']:,.0f}), "
            f"read seq {r['seq_read_maps_per_s']:,.0f} / shuffled {r['block_shuffled_read_maps_per_s']:,.0f} "
            f"/ shuffled packed {r['block_shuffled_packed_read_maps_per_s']:,.0f} maps/s"
        )
    print(f"wrote {path} in {out['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
