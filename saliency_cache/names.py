"""Map names, sample-id digests and map provenance (no zarr).

A map's name is one safe path component (:func:`sanitize_map_name`), derived by convention
from its provenance (:func:`map_name_from_provenance`). :class:`Provenance` is the record of
where a map came from, stored flat in the map group's ``provenance`` attribute.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from saliency_cache.encoding import ENCODINGS
from saliency_cache.errors import SatError

TEACHER_MODES = ("standard", "adversarial", "sparse")
TARGET_RULES = ("label", "argmax")
MODE_SHORT = {"standard": "std", "adversarial": "adv", "sparse": "sparse"}
_MAX_NAME = 128


def sanitize_map_name(name: str) -> str:
    """Turn ``name`` into a safe single path component.

    Keeps ``[A-Za-z0-9._-]``, replaces every other run of characters with ``_`` and strips
    leading dots and underscores: ``"../evil"`` -> ``"evil"``, ``"a/b"`` -> ``"a_b"``,
    ``"my map"`` -> ``"my_map"``. Raises SatError for names that end up empty, ``".."``,
    ``"zarr.json"`` (the metadata file) or longer than 128 characters.
    """
    if not isinstance(name, str):
        raise SatError(f"a map name must be a string, got {name!r}")
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._")
    if not out or out == ".." or "/" in out:
        raise SatError(f"map name {name!r} is empty after sanitising")
    if out == "zarr.json":
        raise SatError(f"map name {name!r} is reserved")
    if len(out) > _MAX_NAME:
        raise SatError(f"map name {name!r} is longer than {_MAX_NAME} characters")
    return out


def plain_name(name: object) -> bool:
    """True for a name that is one path component (lookups never walk into other nodes)."""
    return (
        isinstance(name, str)
        and bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
    )


def check_split_name(name: str) -> str:
    """``name`` if it is a valid split name (sanitising leaves it unchanged), else SatError."""
    if not isinstance(name, str) or sanitize_map_name(name) != name:
        raise SatError(
            f"split name {name!r} must be a plain name of letters, digits, '.', '_' and '-'"
        )
    return name


def map_name_from_provenance(prov: Mapping[str, Any]) -> str:
    """The conventional map name: ``<arch>-<mode>-<method>`` for teacher maps, the source otherwise.

    ``{"source": "teacher", "teacher_arch": "ResNet10", "teacher_mode": "adversarial",
    "method": "gbp"}`` -> ``"resnet10-adv-gbp"`` (modes: std, adv, sparse); the suffix
    ``-argmax`` marks maps computed for the teacher's prediction instead of the label. Weak
    maps are named after their source (``"box"``, ``"mask"``). The result is sanitised.
    """
    source = prov.get("source")
    if not source:
        raise SatError(f"provenance needs a 'source' to derive a map name, got {dict(prov)!r}")
    if source != "teacher":
        return sanitize_map_name(str(source))
    arch, mode, method = prov.get("teacher_arch"), prov.get("teacher_mode"), prov.get("method")
    if not arch or not method:
        raise SatError(
            f"teacher provenance needs teacher_arch and method, got arch={arch!r} method={method!r}"
        )
    # "++" would sanitise to "_"; spell it "pp" so gradcam++ stays distinct and readable.
    parts = [
        str(arch).lower(),
        MODE_SHORT.get(str(mode), str(mode or "unknown")),
        str(method).replace("++", "pp"),
    ]
    if prov.get("target_rule") == "argmax":
        parts.append("argmax")
    return sanitize_map_name("-".join(parts))


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 (hex) of the ids as a compact JSON list: ``json.dumps(ids, ensure_ascii=False, separators=(",", ":"))`` in UTF-8."""
    text = json.dumps(list(ids), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def now_utc() -> str:
    """The current time, ISO-8601 UTC to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_version() -> str:
    """Installed version of ``sat-pipeline``, or ``"unknown"`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sat-pipeline")
    except PackageNotFoundError:
        return "unknown"


def jsonable(value: Any, what: str) -> Any:
    """``value`` round-tripped through strict JSON (SatError naming ``what`` if it cannot be)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise SatError(f"{what} must be JSON-serialisable (no NaN): {e}") from None


@dataclass(frozen=True)
class Provenance:
    """Where a map came from. Stored as a flat dict in the map's ``provenance`` attribute.

    ``extra`` holds any further keys the caller records (they are flattened by :meth:`to_dict`).
    """

    source: str  # "teacher", "box", "mask", ...
    teacher_arch: str | None = None
    teacher_mode: str | None = None  # "standard", "adversarial", "sparse" (or "unknown")
    checkpoint_sha256: str | None = None
    method: str | None = None  # saliency method, e.g. "gbp"
    method_params: Mapping[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    target_rule: str | None = None  # "label" (paper) or "argmax" (authors' code)
    encoding: str | None = None
    created: str | None = None  # ISO-8601 UTC, set once when the map is created
    package_version: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise SatError(f"provenance source must be a non-empty string, got {self.source!r}")
        if self.target_rule not in (None, *TARGET_RULES):
            raise SatError(
                f"provenance target_rule must be label or argmax, got {self.target_rule!r}"
            )
        if self.encoding not in (None, *ENCODINGS):
            raise SatError(f"provenance encoding must be binary or ternary, got {self.encoding!r}")
        if self.teacher_mode is not None and not isinstance(self.teacher_mode, str):
            raise SatError(f"provenance teacher_mode must be a string, got {self.teacher_mode!r}")
        if not isinstance(self.method_params, Mapping):
            raise SatError(f"provenance method_params must be a dict, got {self.method_params!r}")
        clash = set(self.extra) & {f.name for f in fields(self)}
        if clash:
            raise SatError(f"provenance extra keys {sorted(clash)} shadow standard fields")

    def to_dict(self) -> dict[str, Any]:
        """Standard fields in a fixed order, then the extra keys sorted (stable metadata bytes)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["method_params"] = dict(self.method_params)
        for k in sorted(self.extra):
            out[k] = self.extra[k]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        if known.get("method_params") is None:
            known["method_params"] = {}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


def normalize_provenance(
    provenance: Mapping[str, Any] | Provenance, encoding: str
) -> dict[str, Any]:
    """Validate ``provenance`` and fill ``encoding``, ``created`` and ``package_version``."""
    prov = provenance if isinstance(provenance, Provenance) else Provenance.from_dict(provenance)
    if prov.encoding not in (None, encoding):
        raise SatError(f"provenance says encoding {prov.encoding!r} but the map is {encoding!r}")
    d = prov.to_dict()
    d["encoding"] = encoding
    d["created"] = d["created"] or now_utc()
    d["package_version"] = d["package_version"] or package_version()
    return jsonable(d, "provenance")


def provenance_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``key: a vs b`` for every key (but ``created``) whose values differ."""
    keys = sorted((set(a) | set(b)) - {"created"})
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
