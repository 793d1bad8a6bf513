"""The saliency store: precomputed, bit-packed saliency maps in a Zarr v3 hierarchy.

Only numpy, zarr and numcodecs are needed to read a store (no torch)::

    from saliency_cache import SaliencyStore
    split = SaliencyStore.open("stores/cifar10.zarr").split("train")
    maps = split.open_map("resnet10-adv-gbp", expect_ids=my_ids).read(0, 128)  # int8 (128, 3, 32, 32)

The names below are imported lazily, so ``import saliency_cache.errors`` stays cheap.
Integrity checks: ``from saliency_cache.verify import verify``. Modules: ``store`` (SaliencyStore,
and re-exports of the rest), ``names`` (names, provenance), ``layout`` (format constants,
file kinds), ``location`` (local / fsspec backends), ``lock`` (writer lock), ``split``,
``maps`` (readers, writers), ``verify``, ``copy``, ``render`` (pictures), ``cli`` (click).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SaliencyStore": "saliency_cache.store",
    "Split": "saliency_cache.store",
    "MapReader": "saliency_cache.store",
    "MapWriter": "saliency_cache.store",
    "Provenance": "saliency_cache.store",
    "FORMAT_VERSION": "saliency_cache.store",
    "ids_digest": "saliency_cache.store",
    "map_name_from_provenance": "saliency_cache.store",
    "sanitize_map_name": "saliency_cache.store",
    "resolve_map": "saliency_cache.store",
    "DEFAULT_CHUNK_SIZE": "saliency_cache.layout",
    "DEFAULT_SHARD_CHUNKS": "saliency_cache.layout",
    "FILE_KINDS": "saliency_cache.layout",
    "Location": "saliency_cache.location",
    "open_location": "saliency_cache.location",
    "render_show": "saliency_cache.render",
    "pack": "saliency_cache.encoding",
    "unpack": "saliency_cache.encoding",
    "packed_nbytes": "saliency_cache.encoding",
    "Problem": "saliency_cache.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saliency_cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
