"""Experiment spec files: ``sat compare --spec FILE.yaml`` and the shipped presets.

A spec is a YAML mapping that describes a whole comparison (data, teachers, maps, students,
seeds, attacks, evaluation size, device); :func:`load_spec` turns it into a
:class:`pipelines.compare.CompareConfig`. Unknown keys, a key written twice and values of the
wrong kind are refused with one line that quotes the key. The presets are spec files in
``pipelines/specs/`` (package data, so an installed ``sat`` has them); each may carry
``variants`` (e.g. ``full``, the paper's scale) that override its top-level keys.

Budgets (ε) are in /255 units everywhere in a spec, as on the command line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from saliency_cache.errors import SatError

SPEC_DIR = Path(__file__).resolve().parent / "specs"

# Top-level keys -> what a value must be ("variants" is handled before validation).
_TOP = {
    "title": str, "data": dict, "arch": str, "width": int, "batch_size": int, "seeds": list,
    "teachers": list, "weak": list, "students": list, "student_epochs": int,
    "sat_reach_fraction": (float, type(None)), "eval": dict, "device": str, "workers": int,
    "parallel": int,
}
_DATA = {"dataset": str, "root": (str, type(None)), "options": dict}
_TEACHER = {"name": str, "mode": str, "epochs": int, "methods": list, "arch": str, "width": int}
_STUDENT = {"name": str, "mode": str, "maps": list, "baseline": (str, type(None)),
            "options": dict}
_EVAL = {"attacks": list, "eps": list, "uniform_eps": list, "samples": (int, type(None)),
         "autoattack": (dict, type(None)), "boundary": (dict, type(None)),
         "robust_eps": (int, float)}
_AUTOATTACK = {"eps": (int, float), "samples": int}
_BOUNDARY = {"samples": (int, type(None)), "steps": int}
# Perturbation options given in /255 units in a spec (PerturbConfig holds [0, 1] pixels).
PIXEL_OPTIONS = ("eps", "uniform_eps", "sat_eps", "pgd_step_size", "fgsm_rs_alpha")


def _yaml_loader():
    """A safe YAML loader that refuses a mapping key written twice (PyYAML keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise SatError(f"key {key!r} is given twice (line {seen[key]} and line {line})")
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def read_spec(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a spec file; SatError (quoting the file) for unreadable YAML or a
    repeated key."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SatError(f"spec file not found: {path}")
    try:
        data = yaml.load(p.read_text(), Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
    except SatError as e:
        raise SatError(f"spec {path}: {e}") from None
    except yaml.YAMLError as e:
        raise SatError(f"spec {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SatError(f"spec {path} must hold a mapping of key: value")
    return data


def list_presets() -> list[str]:
    """Names of the shipped presets (spec files in ``pipelines/specs/``)."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    p = SPEC_DIR / f"{name}.yaml"
    if not p.is_file():
        raise SatError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return p


def _check(where: str, value: Any, allowed: dict[str, Any]) -> dict[str, Any]:
    """``value`` as a mapping whose keys are in ``allowed`` and whose values have its types."""
    if not isinstance(value, dict):
        raise SatError(f"{where} must be a mapping, got {value!r}")
    for key, v in value.items():
        if key not in allowed:
            raise SatError(f"unknown key {key!r} in {where}; valid: {', '.join(sorted(allowed))}")
        want = allowed[key]
        if want is object:
            continue  # checked by whoever takes the value
        ok = isinstance(v, want) and not (isinstance(v, bool) and want is not bool)
        if want in ((int, float), (float, type(None))) and isinstance(v, int) and not isinstance(v, bool):
            ok = True  # an integer where a number is asked for
        if not ok:
            kind = _kind(want)
            raise SatError(f"{where}.{key}: {v!r} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind}")
    return value


def _kind(want: Any) -> str:
    names = {str: "string", int: "integer", float: "number", list: "list", dict: "mapping",
             type(None): "null"}
    kinds = want if isinstance(want, tuple) else (want,)
    return " or ".join(names[k] for k in kinds)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _budgets(where: str, values: list[Any]) -> tuple[float, ...]:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise SatError(f"{where}: {v!r} is not a budget (a number >= 0, in /255 units)")
    return tuple(float(v) for v in values)


def _names(where: str, values: list[Any]) -> tuple[str, ...]:
    for v in values:
        if not isinstance(v, str) or not v:
            raise SatError(f"{where}: {v!r} is not a name")
    return tuple(values)


def resolve(raw: dict[str, Any], variant: str | None = None, where: str = "spec") -> dict[str, Any]:
    """The spec with ``variant``'s overrides applied (variants themselves dropped)."""
    raw = dict(raw)
    variants = raw.pop("variants", {}) or {}
    if not isinstance(variants, dict):
        raise SatError(f"{where}: variants must be a mapping of name: overrides")
    if variant is not None:
        if variant not in variants:
            have = ", ".join(sorted(variants)) or "none"
            raise SatError(f"{where} has no variant {variant!r} (variants: {have})")
        if not isinstance(variants[variant], dict):
            raise SatError(f"{where}: variant {variant!r} must be a mapping of overrides")
        raw = _merge(raw, variants[variant])
    return raw


def load_spec(path: str | Path, *, variant: str | None = None, out: str | None = None,
              overrides: dict[str, Any] | None = None):
    """A :class:`~pipelines.compare.CompareConfig` from a spec file.

    ``overrides`` are spec keys set on top (after the variant), e.g. from command-line flags;
    ``out`` is the experiment folder. Every problem is one SatError line quoting the key.
    """
    where = f"spec {path}"
    spec = resolve(read_spec(path), variant, where)
    spec = _merge(spec, overrides or {})
    try:
        return build_config(spec, out=out)
    except SatError as e:
        raise SatError(f"{where}: {e}") from None


def build_config(spec: dict[str, Any], *, out: str | None):
    """The parsed form of a resolved spec mapping (see :func:`load_spec`)."""
    from pipelines.common import DataSpec
    from pipelines.compare import CompareConfig, EvalPlan, Student, Teacher
    from trainer.perturb import PerturbConfig

    spec = _check("spec", spec, _TOP)
    for key in ("data", "students"):
        if key not in spec:
            raise SatError(f"missing key {key!r}")
    data = _check("data", spec["data"], _DATA)
    if "dataset" not in data:
        raise SatError("missing key 'dataset' in data")
    dspec = DataSpec(data["dataset"], data.get("root"), dict(data.get("options") or {}))

    seeds = spec.get("seeds", [0])
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise SatError(f"seeds: {seeds!r} is not a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise SatError(f"seeds: {seeds!r} repeats a seed")

    teachers = []
    for i, t in enumerate(spec.get("teachers", []) or []):
        t = _check(f"teachers[{i}]", t, _TEACHER)
        if "mode" not in t:
            raise SatError(f"missing key 'mode' in teachers[{i}]")
        teachers.append(Teacher(
            name=t.get("name", t["mode"]), mode=t["mode"], epochs=t.get("epochs", 4),
            methods=_names(f"teachers[{i}].methods", t.get("methods", ["gbp"])),
            arch=t.get("arch"), width=t.get("width"),
        ))

    pfields = set(PerturbConfig.__dataclass_fields__) - {"sat_time_scale"}
    students = []
    for i, s in enumerate(spec["students"]):
        s = _check(f"students[{i}]", s, _STUDENT)
        for key in ("name", "mode"):
            if key not in s:
                raise SatError(f"missing key {key!r} in students[{i}]")
        opts = _check(f"students[{i}].options", s.get("options", {}), dict.fromkeys(pfields, object))
        opts = {k: (v / 255 if k in PIXEL_OPTIONS and isinstance(v, (int, float)) else v)
                for k, v in opts.items()}
        PerturbConfig(**opts)  # refuses a bad value, naming the option
        students.append(Student(
            name=s["name"], mode=s["mode"], maps=_names(f"students[{i}].maps", s.get("maps", [])),
            baseline=s.get("baseline"), options=tuple(sorted(opts.items())),
        ))

    ev = _check("eval", spec.get("eval", {}), _EVAL)
    aa = ev.get("autoattack", {"eps": 8, "samples": 100})
    if aa is not None:
        aa = _check("eval.autoattack", aa, _AUTOATTACK)
        aa = (float(_budgets("eval.autoattack.eps", [aa.get("eps", 8)])[0]), aa.get("samples", 100))
    bd = ev.get("boundary", {})
    if bd is not None:
        bd = _check("eval.boundary", bd, _BOUNDARY)
        bd = (bd.get("samples", 100), bd.get("steps", 20))
    plan = EvalPlan(
        attacks=_names("eval.attacks", ev.get("attacks", ["pgd5", "pgd20", "uniform", "saliency"])),
        eps=_budgets("eval.eps", ev.get("eps", [1, 2, 4, 8])),
        uniform_eps=_budgets("eval.uniform_eps", ev.get("uniform_eps", [8, 16, 32])),
        samples=ev.get("samples", 500), autoattack=aa, boundary=bd,
        robust_eps=float(_budgets("eval.robust_eps", [ev.get("robust_eps", 2)])[0]),
    )
    kw = {k: spec[k] for k in ("title", "arch", "width", "batch_size", "student_epochs",
                               "sat_reach_fraction", "device", "workers", "parallel") if k in spec}
    return CompareConfig(
        out=out or "runs/experiment", data=dspec, teachers=tuple(teachers),
        weak=_names("weak", spec.get("weak", [])), students=tuple(students),
        seeds=tuple(seeds), eval=plan, **kw,
    )
