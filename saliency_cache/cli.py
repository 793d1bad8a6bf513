"""``sat cache ...``: inspect a saliency store (ls, info, stats, show, verify).

A thin click layer over :mod:`saliency_cache.store` and :mod:`saliency_cache.verify`. Every
command opens the store read-only, takes ``--json`` for machine-readable output, and turns
bad input into a one-line ``error: ...`` with exit code 2 (also when the ``cache`` group is
run on its own, outside ``sat``). ``verify`` exits 1 when it finds problems.
"""

from __future__ import annotations

import json
from typing import Any

import click
import numpy as np

from saliency_cache.errors import SatError

_CONTEXT = {"help_option_names": ["-h", "--help"]}


class ErrorReportingGroup(click.Group):
    """Reports SatError (and OS errors reaching a store) as ``error: ...`` with exit code 2.

    Used by ``sat`` and by ``sat cache``, so the cache group behaves the same when run alone.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SatError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except OSError as e:
            click.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            ctx.exit(2)


@click.group(name="cache", cls=ErrorReportingGroup, context_settings=_CONTEXT)
def cache() -> None:
    """Inspect a saliency store: list, describe, count, draw and verify its maps."""


# ---- shared helpers ------------------------------------------------------------------------
def parse_key_values(items: tuple[str, ...], option: str) -> dict[str, Any]:
    """The ``KEY=VALUE`` items of a repeatable ``option`` (e.g. ``--storage-option``) as a
    dict; a VALUE that parses as JSON (``true``, ``3``, ``{"a": 1}``) becomes that value, any
    other stays text. An item without ``=`` is a SatError quoting it."""
    opts: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SatError(f"{option} must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            opts[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            opts[k.strip()] = v
    return opts


def parse_storage_options(items: tuple[str, ...]) -> dict[str, Any] | None:
    """fsspec options from ``--storage-option KEY=VALUE`` items (None when there are none)."""
    return parse_key_values(items, "--storage-option") or None


def _store_args(f):
    f = click.option(
        "-o",
        "--storage-option",
        "storage_option",
        multiple=True,
        metavar="KEY=VALUE",
        help="fsspec option for remote stores (repeatable; VALUE may be JSON), e.g. anon=true.",
    )(f)
    return click.argument("store")(f)


def _json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(f)


def _split_option(f):
    return click.option(
        "--split",
        "split_name",
        default=None,
        help="Split (default: the only split, else 'train'). MAP may also be given as SPLIT/MAP.",
    )(f)


def _open(store: str, storage_option: tuple[str, ...]):
    from saliency_cache.store import SaliencyStore

    return SaliencyStore.open(store, "r", storage_options=parse_storage_options(storage_option))


def _resolve(st, split_name: str | None, map_arg: str | None):
    """(Split, map name or None): see :func:`saliency_cache.store.resolve_map`."""
    from saliency_cache.store import resolve_map  # zarr loads only when a command runs

    return resolve_map(st, split_name, map_arg)


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def _short_provenance(prov: dict[str, Any]) -> str:
    keys = ("source", "teacher_arch", "teacher_mode", "method", "target_rule", "threshold")
    return " ".join(f"{k}={prov[k]}" for k in keys if prov.get(k) not in (None, "", {}))


def _emit(as_json: bool, payload: Any, text: str) -> None:
    click.echo(json.dumps(payload, indent=2, default=str) if as_json else text)


def _map_summary(sp, name: str) -> dict[str, Any]:
    try:
        r = sp.inspect_map(name)
        done = r.done_chunks()
        damage = r.damage()
        return {
            "name": name,
            "encoding": r.encoding,
            "shape": list(r.shape),
            "complete": bool(r.complete and done.all()) and damage is None,
            "damaged": damage,
            "done_chunks": int(done.sum()),
            "n_chunks": r.n_chunks,
            "bytes_on_disk": r.nbytes_on_disk(),
            "provenance": _short_provenance(r.provenance),
            "matches_split": (r.n, r.fingerprint, r.ids_sha256)
            == (sp.n, sp.fingerprint, sp.ids_sha256),
        }
    except SatError as e:
        return {"name": name, "error": str(e)}


# ---- commands ------------------------------------------------------------------------------
@cache.command(name="ls", context_settings=_CONTEXT)
@_store_args
@_json_option
def ls_cmd(store: str, storage_option: tuple[str, ...], as_json: bool) -> None:
    """List the splits and maps of STORE, with sizes, completeness and provenance."""
    st = _open(store, storage_option)
    out: dict[str, Any] = {"store": st.url, "splits": []}
    lines = [f"store {st.url}"]
    for name in st.splits():
        try:
            sp = st.split(name)
        except SatError as e:
            out["splits"].append({"name": name, "error": str(e)})
            lines.append(f"split {name}: unreadable: {e}")
            continue
        maps = [_map_summary(sp, m) for m in sp.maps()]
        damage = sp.damage()
        out["splits"].append(
            {
                "name": name,
                "damaged": damage,
                "n": sp.n,
                "fingerprint": sp.fingerprint,
                "has_images": sp.has_images(),
                "chunk_size": sp.chunk_size,
                "num_classes": sp.num_classes,
                "maps": maps,
            }
        )
        lines.append(
            f"split {name}: n={sp.n} fingerprint={sp.fingerprint[:12]} "
            f"images={'yes' if sp.has_images() else 'no'} classes={sp.num_classes}"
        )
        if damage is not None:
            lines.append(f"  damaged: {damage}")
        for m in maps:
            if "error" in m:
                lines.append(f"  {m['name']}: unreadable: {m['error']}")
                continue
            state = (
                "complete"
                if m["complete"]
                else f"partial {m['done_chunks']}/{m['n_chunks']} chunks"
            )
            if m["damaged"] is not None:
                state = f"DAMAGED ({m['damaged']})"
            warn = "" if m["matches_split"] else "  [does not match the split]"
            lines.append(
                f"  {m['name']}: {m['encoding']} {tuple(m['shape'])} {state} "
                f"{_human(m['bytes_on_disk'])}  {m['provenance']}{warn}"
            )
        if not maps:
            lines.append("  (no maps)")
    if not out["splits"]:
        lines.append("(no splits)")
    _emit(as_json, out, "\n".join(lines))


@cache.command(context_settings=_CONTEXT)
@_store_args
@click.argument("map_name", metavar="MAP")
@_split_option
@_json_option
def info(
    store: str,
    storage_option: tuple[str, ...],
    map_name: str,
    split_name: str | None,
    as_json: bool,
) -> None:
    """Full provenance and storage layout of MAP."""
    sp, name = _resolve(_open(store, storage_option), split_name, map_name)
    r = sp.inspect_map(name)
    done = r.done_chunks()
    damage = r.damage()
    out = {
        "split": sp.name,
        "map": name,
        "encoding": r.encoding,
        "shape": list(r.shape),
        "n": r.n,
        "chunk_size": r.chunk_size,
        "shard_chunks": r.shard_chunks,
        "shard_samples": r.chunk_size * r.shard_chunks,
        "n_chunks": r.n_chunks,
        "n_shards": r.n_shards,
        "packed_nbytes_per_sample": r.packed_nbytes,
        "done_chunks": int(done.sum()),
        "complete": bool(r.complete and done.all()) and damage is None,
        "damaged": damage,
        "bytes_on_disk": r.nbytes_on_disk(),
        "fingerprint": r.fingerprint,
        "ids_sha256": r.ids_sha256,
        "split_fingerprint": sp.fingerprint,
        "matches_split": (r.n, r.fingerprint, r.ids_sha256)
        == (sp.n, sp.fingerprint, sp.ids_sha256),
        "codecs": r.codecs(),
        "provenance": r.provenance,
    }
    lines = [f"map {sp.name}/{name}"]
    for k, v in out.items():
        if k in ("split", "map", "provenance", "codecs"):
            continue
        lines.append(f"  {k}: {v}")
    lines.append("  codecs: " + " -> ".join(_codec_text(c) for c in out["codecs"]))
    lines.append("provenance:")
    lines += [
        f"  {k}: {json.dumps(v) if isinstance(v, dict | list) else v}"
        for k, v in r.provenance.items()
    ]
    _emit(as_json, out, "\n".join(lines))


def _codec_text(c: dict[str, Any]) -> str:
    if c.get("name") == "sharding_indexed":
        conf = c.get("configuration", {})
        inner = " -> ".join(_codec_text(x) for x in conf.get("codecs", []))
        index = " -> ".join(_codec_text(x) for x in conf.get("index_codecs", []))
        return f"sharding(chunk {conf.get('chunk_shape')}: {inner}; index: {index})"
    conf = c.get("configuration") or {}
    return c.get("name", "?") + (
        f"({', '.join(f'{k}={v}' for k, v in conf.items())})" if conf else ""
    )


@cache.command(context_settings=_CONTEXT)
@_store_args
@click.argument("map_name", metavar="MAP")
@_split_option
@_json_option
def stats(
    store: str,
    storage_option: tuple[str, ...],
    map_name: str,
    split_name: str | None,
    as_json: bool,
) -> None:
    """Fractions of -1 / 0 / +1 in MAP (streamed over its written chunks) and bits per element on disk."""
    from saliency_cache.encoding import value_counts

    sp, name = _resolve(_open(store, storage_option), split_name, map_name)
    r = sp.inspect_map(name)
    r.check_files()  # partial maps are counted over their written chunks; damaged ones refused
    done = r.done_chunks()
    order = [int(k) for k in np.flatnonzero(done)]
    counts = {-1: 0, 0: 0, 1: 0}
    samples = 0
    for s, e, rows in r.iter_blocks(order, packed=True):
        for k, v in value_counts(rows, r.encoding, r.shape).items():
            counts[k] += v
        samples += e - s
    total = sum(counts.values())
    numel = int(np.prod(r.shape))
    nbytes = r.nbytes_on_disk()
    out = {
        "split": sp.name,
        "map": name,
        "encoding": r.encoding,
        "samples": samples,
        "chunks_counted": len(order),
        "n_chunks": r.n_chunks,
        "fraction": {str(k): (counts[k] / total if total else None) for k in (-1, 0, 1)},
        "counts": {str(k): counts[k] for k in (-1, 0, 1)},
        "bytes_on_disk": nbytes,
        "bits_per_element_on_disk": nbytes * 8 / (r.n * numel),
    }
    f = out["fraction"]
    text = (
        f"map {sp.name}/{name} ({r.encoding}, {samples} samples in {len(order)}/{r.n_chunks} chunks)\n"
        + "\n".join(
            f"  {k:>2}: {f[k]:.4f}" if f[k] is not None else f"  {k:>2}: -"
            for k in ("-1", "0", "1")
        )
        + f"\n  bits per element on disk: {out['bits_per_element_on_disk']:.4f} ({_human(nbytes)})"
    )
    _emit(as_json, out, text)


@cache.command(context_settings=_CONTEXT)
@_store_args
@click.argument("map_name", metavar="MAP")
@click.option(
    "--index",
    "indices",
    type=int,
    multiple=True,
    required=True,
    help="Sample index to draw (repeatable); one row per index.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@_split_option
@_json_option
def show(
    store: str,
    storage_option: tuple[str, ...],
    map_name: str,
    indices: tuple[int, ...],
    out: str,
    split_name: str | None,
    as_json: bool,
) -> None:
    """Draw MAP for the given samples: image, map (channel mean; blue -1, red +1) and overlay."""
    from saliency_cache.render import render_show

    info = render_show(_open(store, storage_option), split_name, map_name, indices, out)
    _emit(as_json, info, f"wrote {info['out']}")


@cache.command(name="verify", context_settings=_CONTEXT)
@_store_args
@click.argument("map_name", metavar="[MAP]", required=False)
@_split_option
@_json_option
@click.pass_context
def verify_cmd(
    ctx: click.Context,
    store: str,
    storage_option: tuple[str, ...],
    map_name: str | None,
    split_name: str | None,
    as_json: bool,
) -> None:
    """Decode every chunk and check completeness and alignment; exit 1 if anything is wrong.

    Without MAP and --split, the whole store is checked.
    """
    from saliency_cache.verify import verify

    st = _open(store, storage_option)
    if map_name is None and split_name is None:
        problems = verify(st)
        target = st.url
    else:
        sp, name = _resolve(st, split_name, map_name)
        problems = verify(st, sp.name, name)
        target = f"{st.url} {sp.name}" + (f"/{name}" if name else "")
    payload = {
        "target": target,
        "ok": not problems,
        "problems": [
            {"split": p.split, "map": p.map, "chunk": p.chunk, "kind": p.kind, "message": p.message}
            for p in problems
        ],
    }
    _emit(as_json, payload, "ok" if not problems else "\n".join(str(p) for p in problems))
    if problems:
        ctx.exit(1)


@cache.command(name="copy", context_settings=_CONTEXT)
@click.argument("src")
@click.argument("dst")
@click.option(
    "-o",
    "--storage-option",
    "storage_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec option for SRC (repeatable; VALUE may be JSON), e.g. anon=true.",
)
@click.option(
    "--dst-option",
    multiple=True,
    metavar="KEY=VALUE",
    help='fsspec option for DST (repeatable), e.g. client_kwargs=\'{"endpoint_url": "..."}\'.',
)
@click.option("--overwrite", is_flag=True, help="Replace a saliency store already at DST.")
@click.option("--split", "splits", multiple=True, help="Copy only this split (repeatable).")
@click.option("--map", "maps", multiple=True, help="Copy only this map of each split (repeatable).")
@click.option(
    "--allow-partial", is_flag=True, help="Also copy maps whose writing has not finished."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_json_option
def copy_cmd(
    src: str,
    dst: str,
    storage_option: tuple[str, ...],
    dst_option: tuple[str, ...],
    overwrite: bool,
    splits: tuple[str, ...],
    maps: tuple[str, ...],
    allow_partial: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Copy the store SRC to DST byte for byte (any fsspec URL; HTTP only as SRC) and verify it.

    DST must be empty unless --overwrite (which only replaces a saliency store). A manifest
    of every file is written with the copy, so static HTTP hosts can serve it.
    """
    from saliency_cache.copy import copy_store

    res = copy_store(
        src,
        dst,
        src_options=parse_storage_options(storage_option),
        dst_options=_dst_options(dst_option),
        overwrite=overwrite,
        splits=splits or None,
        maps=maps or None,
        allow_partial=allow_partial,
        progress=not quiet and not as_json,
    )
    maps_text = "; ".join(f"{s}: {', '.join(m) or 'no maps'}" for s, m in res["splits"].items())
    text = (
        f"copied {res['files']} files ({_human(res['bytes'])}) from {res['src']} to {res['dst']} "
        f"in {res['seconds']:.1f}s; verified ({maps_text})"
    )
    if res["partial"]:
        text += "\n" + "\n".join(f"  partial: {p}" for p in res["partial"])
    _emit(as_json, res, text)


def _dst_options(items: tuple[str, ...]) -> dict[str, Any] | None:
    try:
        return parse_storage_options(items)
    except SatError as e:
        raise SatError(str(e).replace("--storage-option", "--dst-option")) from None
