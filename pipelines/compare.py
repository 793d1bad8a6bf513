"""A whole comparison end to end: teachers -> precompute -> students -> eval -> report.

``make demo`` runs the ``demo`` preset (synthetic shapes, minutes on a CPU) and
``make repro-tiny`` the ``tiny`` preset (Tiny ImageNet with its boxes, docs/RESULTS.md).
A stage whose output already exists is reused, so a rerun only does what is missing; the
precompute stage is itself resumable and idempotent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.common import DataSpec, config_dict, git_sha, write_json
from saliency_cache.errors import SatError
from trainer.loop import LoopConfig
from trainer.perturb import PerturbConfig


@dataclass(frozen=True)
class Student:
    name: str  # run folder under <out>/students
    mode: str  # training mode
    maps: tuple[str, ...] = ()  # "box", "mask", or "<teacher mode>/<method>", e.g. "adversarial/gbp"


@dataclass(frozen=True)
class CompareConfig:
    out: str
    data: DataSpec
    teacher_modes: tuple[str, ...] = ("standard", "adversarial")  # one ResNet-10 teacher each
    methods: tuple[str, ...] = ("gbp",)  # saliency methods cached for every teacher
    weak: tuple[str, ...] = ("mask",)  # weak saliency cached from annotations
    students: tuple[Student, ...] = ()
    arch: str = "resnet10"
    width: int = 8  # student and teacher width (64 in the paper)
    teacher_epochs: int = 4
    student_epochs: int = 6
    batch_size: int = 64
    sat_reach_fraction: float | None = 0.5  # alpha^t reaches 0.6 half-way through the run
    attacks: tuple[str, ...] = ("pgd5", "pgd20", "uniform", "saliency")
    eps: tuple[float, ...] = (1, 2, 4, 8)  # /255
    uniform_eps: tuple[float, ...] = (8, 16, 32)  # /255
    eval_samples: int | None = 500
    workers: int = 2  # dask workers for precompute
    device: str = "cpu"
    seed: int = 0
    title: str = "SAT and baselines"
    show_progress: bool = True
    extra_eval: dict[str, dict[str, Any]] = field(default_factory=dict)  # student -> eval overrides

    def __post_init__(self) -> None:
        if not self.students:
            raise SatError("a comparison needs at least one student")
        known = {f"{t}/{m}" for t in self.teacher_modes for m in self.methods} | set(self.weak)
        for s in self.students:
            for ref in s.maps:
                if ref not in known:
                    raise SatError(f"student {s.name!r} uses map {ref!r}; available: {sorted(known)}")


def _stage(name: str, done: Path, fn, log: list[dict[str, Any]]) -> None:
    if done.exists():
        print(f"[compare] {name}: reusing {done}", flush=True)
        return
    print(f"[compare] {name} ...", flush=True)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    log.append({"stage": name, "seconds": round(dt, 2)})
    print(f"[compare] {name}: {dt:.1f}s", flush=True)


def run(cfg: CompareConfig) -> dict[str, Any]:
    from pipelines import evaluate, precompute, report, teacher, train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare_config.json", {**config_dict(cfg), "git_sha": git_sha()})
    t_start = time.perf_counter()
    log: list[dict[str, Any]] = []

    tloop = LoopConfig(epochs=cfg.teacher_epochs, seed=cfg.seed, robust_val_samples=128,
                       show_progress=cfg.show_progress)
    teachers: dict[str, Path] = {}
    for tmode in cfg.teacher_modes:
        tdir = out / "teachers" / tmode
        teachers[tmode] = tdir / "teacher.safetensors"
        tc = teacher.TeacherConfig(data=cfg.data, out=str(tdir), arch=cfg.arch, width=cfg.width,
                                   mode=tmode, loop=tloop, batch_size=cfg.batch_size, device=cfg.device)
        _stage(f"teacher {tmode}", teachers[tmode], lambda tc=tc: teacher.run(tc), log)

    store = out / "store.zarr"
    pc = precompute.PrecomputeConfig(
        store=str(store), data=cfg.data, splits=("train", "val"), map_splits=("train",),
        teachers=tuple(str(teachers[m]) for m in cfg.teacher_modes), methods=cfg.methods,
        weak=cfg.weak, workers=cfg.workers, device=cfg.device, seed=cfg.seed,
        show_progress=cfg.show_progress,
    )
    t0 = time.perf_counter()
    pres = precompute.run(pc)
    log.append({"stage": "precompute", "seconds": round(time.perf_counter() - t0, 2)})
    names = _map_names(pres, teachers)

    sloop = LoopConfig(epochs=cfg.student_epochs, seed=cfg.seed, robust_val_samples=128,
                       show_progress=cfg.show_progress)
    run_dirs = []
    for st in cfg.students:
        rdir = out / "students" / st.name
        run_dirs.append(str(rdir))
        tc = train.TrainConfig(
            store=str(store), out=str(rdir), mode=st.mode, maps=tuple(names[m] for m in st.maps),
            arch=cfg.arch, width=cfg.width, batch_size=cfg.batch_size, loop=sloop,
            perturb=PerturbConfig(), sat_reach_fraction=cfg.sat_reach_fraction, device=cfg.device,
        )
        _stage(f"train {st.name}", rdir / "result.json", lambda tc=tc: train.run(tc), log)
        ec = evaluate.EvalConfig(
            checkpoint=str(rdir / "checkpoints" / "last.safetensors"), store=str(store),
            split="val", attacks=cfg.attacks, eps=cfg.eps, uniform_eps=cfg.uniform_eps,
            max_samples=cfg.eval_samples, device=cfg.device, seed=cfg.seed,
            show_progress=cfg.show_progress,
        )
        ec = replace(ec, **cfg.extra_eval.get(st.name, {}))
        _stage(f"eval {st.name}", rdir / "eval" / "results.json", lambda ec=ec: evaluate.run(ec), log)

    rep = report.run(report.ReportConfig(runs=tuple(run_dirs), out=str(out / "report"), title=cfg.title))
    overlays = _overlays(store, sorted(set(names.values())), out)
    summary = {
        "seconds": round(time.perf_counter() - t_start, 1), "stages": log, "report": rep,
        "maps": names, "overlays": overlays, "store": str(store),
    }
    write_json(out / "summary.json", summary)
    return summary


def _map_names(pres: dict[str, Any], teachers: dict[str, Path]) -> dict[str, str]:
    """Map references ("adversarial/gbp", "box") -> names of the maps precompute wrote."""
    from saliency_cache.store import SaliencyStore

    st = SaliencyStore.open(pres["store"], "r")
    split = st.split("train")
    from trainer.checkpoint import file_sha256

    by_sha = {file_sha256(p): m for m, p in teachers.items()}
    names: dict[str, str] = {}
    for entry in pres["maps"]:
        prov = split.open_map(entry["name"]).provenance
        if prov.get("source") == "teacher":
            names[f"{by_sha[prov['checkpoint_sha256']]}/{prov['method']}"] = entry["name"]
        else:
            names[str(prov["source"])] = entry["name"]
    return names


def _overlays(store: Path, names: list[str], out: Path) -> list[str]:
    """`sat cache show` grids of the first training samples for every cached map."""
    from saliency_cache.render import render_show
    from saliency_cache.store import SaliencyStore

    st = SaliencyStore.open(str(store), "r")
    written = []
    for name in names:
        png = out / f"cache_show_{name}.png"
        render_show(st, "train", name, [0, 1, 2, 3], png)
        written.append(str(png))
    return written


# ---- presets -------------------------------------------------------------------------------
def demo_config(out: str = "runs/demo", device: str = "cpu", **overrides: Any) -> CompareConfig:
    """Synthetic shapes with exact masks: everything from teachers to tables in minutes on a CPU."""
    data = DataSpec("synthetic", None, {"n": 2000, "n_val": 500, "image_size": 32,
                                        "num_classes": 6, "seed": 0})
    students = (
        Student("original", "standard"),
        Student("sat-teacher", "sat", ("adversarial/gbp",)),
        Student("sat-mask", "sat", ("mask",)),
        Student("pgd", "pgd"),
        Student("pgd-sat", "pgd-sat", ("adversarial/gbp",)),
    )
    base = dict(out=out, data=data, students=students, device=device, teacher_epochs=4,
                student_epochs=10, title="Demo: SAT on synthetic shapes (ResNet-10, width 8)")
    return CompareConfig(**{**base, **overrides})


def tiny_config(data_root: str, out: str = "runs/tiny/repro", device: str = "cpu",
                **overrides: Any) -> CompareConfig:
    """Tiny ImageNet (20-class subset or full), downsampled, with its boxes as weak saliency."""
    data = DataSpec("tiny-imagenet", data_root, {"image_size": 32})
    # The paper's Table 2 setting: the dataset's boxes are the only saliency, so no teacher.
    students = (
        Student("original", "standard"),
        Student("original-uniform", "uniform"),
        Student("sat-box", "sat", ("box",)),
        Student("pgd", "pgd"),
        Student("pgd-uniform", "pgd+uniform"),
        Student("pgd-sat-box", "pgd-sat", ("box",)),
    )
    base = dict(
        out=out, data=data, students=students, device=device, weak=("box",), teacher_modes=(),
        methods=(), width=16, student_epochs=8, batch_size=128,
        attacks=("pgd5", "pgd40", "uniform", "saliency"), eps=(1, 2, 3, 4), eval_samples=500,
        title="Tiny ImageNet-20 at 32x32 (ResNet-10, width 16), boxes as weak saliency",
    )
    return CompareConfig(**{**base, **overrides})
