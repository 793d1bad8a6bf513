"""A whole experiment end to end: teachers -> precompute -> students x seeds -> eval -> report.

An experiment is described by a spec file (:mod:`pipelines.spec`; the presets ``demo``,
``tiny``, ``flowers``, ``cifar10``, ``cifar10-maps`` are spec files in ``pipelines/specs/``).
Layout under ``out``: ``teachers/<name>/``, one ``store.zarr`` shared by all students,
``students/<name>/seed<k>/`` (with ``eval/`` and, for robust rows, ``eval-autoattack/``),
``experiment.json`` (runs grouped by student) and ``report/``. A rerun reuses every finished
piece and resumes interrupted training, so a long experiment survives being killed; the
precompute stage is itself resumable and idempotent.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.common import DataSpec, config_dict, git_sha, write_json
from saliency_cache.errors import SatError
from trainer.loop import LoopConfig
from trainer.perturb import PerturbConfig

# Rows whose robustness the report claims or tests get AutoAttack too: adversarial training,
# and the companion papers' regularisers (a gradient penalty or input masking can look robust
# to PGD by obscuring the gradient; AutoAttack's gradient-free Square attack checks that).
ROBUST_MODES = ("pgd", "pgd+uniform", "pgd-sat", "trades", "trades+uniform", "trades-sat",
                "sgt", "gradnorm")


@dataclass(frozen=True)
class Teacher:
    name: str  # folder under <out>/teachers and the prefix of map references ("<name>/<method>")
    mode: str  # standard | adversarial | sparse
    epochs: int = 4
    methods: tuple[str, ...] = ("gbp",)  # saliency methods cached from this teacher
    arch: str | None = None  # None: the experiment's arch
    width: int | None = None  # None: the experiment's width


@dataclass(frozen=True)
class Student:
    name: str  # run folder under <out>/students (one sub-folder per seed)
    mode: str  # training mode
    maps: tuple[str, ...] = ()  # "box", "mask", or "<teacher name>/<method>", e.g. "adversarial/gbp"
    baseline: str | None = None  # the student it is compared with (paired over seeds)
    options: tuple[tuple[str, Any], ...] = ()  # PerturbConfig overrides, [0, 1] pixel units


@dataclass(frozen=True)
class EvalPlan:
    attacks: tuple[str, ...] = ("pgd5", "pgd20", "uniform", "saliency")
    eps: tuple[float, ...] = (1, 2, 4, 8)  # /255
    uniform_eps: tuple[float, ...] = (8, 16, 32)  # /255
    samples: int | None = 500  # validation images attacked (None: all)
    # Robust rows (ROBUST_MODES) are also attacked with AutoAttack at one budget: (eps /255,
    # samples). It is slow on a CPU, hence its own, usually smaller, sample count. None: skip.
    autoattack: tuple[float, int] | None = (8.0, 100)
    # The alignment-vs-robustness test (Etmann et al.) needs each run's distance to the
    # boundary: FAB on (first N images or None: all, FAB steps). None: not measured.
    boundary: tuple[int | None, int] | None = (100, 20)
    robust_eps: float = 2.0  # the PGD-5 budget the claims and the cost-robustness plot use


@dataclass(frozen=True)
class CompareConfig:
    out: str
    data: DataSpec
    teachers: tuple[Teacher, ...] = ()
    weak: tuple[str, ...] = ()  # weak saliency cached from annotations ("box", "mask")
    students: tuple[Student, ...] = ()
    seeds: tuple[int, ...] = (0,)  # every student runs once per seed; teachers use the first
    arch: str = "resnet10"
    width: int = 8  # student and teacher width (64 in the paper)
    student_epochs: int = 6
    batch_size: int = 64
    sat_reach_fraction: float | None = 0.5  # alpha^t reaches 0.6 half-way through the run
    eval: EvalPlan = field(default_factory=EvalPlan)
    workers: int = 2  # dask workers for precompute
    parallel: int = 1  # student runs trained at once, each in its own process
    device: str = "cpu"
    title: str = "SAT and baselines"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.students:
            raise SatError("a comparison needs at least one student")
        if not self.seeds:
            raise SatError("a comparison needs at least one seed")
        for what, items in (("teacher", [t.name for t in self.teachers]),
                            ("student", [s.name for s in self.students])):
            dup = sorted({n for n in items if items.count(n) > 1})
            if dup:
                raise SatError(f"{what} name {dup[0]!r} is used twice")
        if self.parallel < 1 or self.workers < 0 or self.student_epochs < 1:
            raise SatError("parallel and student_epochs must be >= 1, workers >= 0")
        self._check_names()
        known = {f"{t.name}/{m}" for t in self.teachers for m in t.methods} | set(self.weak)
        names = {s.name for s in self.students}
        for s in self.students:
            for ref in s.maps:
                if ref not in known:
                    raise SatError(f"student {s.name!r} uses map {ref!r}; available: {sorted(known)}")
            if s.baseline is not None and s.baseline not in names - {s.name}:
                raise SatError(f"student {s.name!r} names baseline {s.baseline!r}, which is not "
                               f"another student; students: {sorted(names)}")
        if self.eval.robust_eps not in self.eval.eps and "pgd5" in self.eval.attacks:
            raise SatError(f"robust_eps {self.eval.robust_eps:g} is not one of the evaluated "
                           f"budgets {[f'{e:g}' for e in self.eval.eps]}")


    def _check_names(self) -> None:
        """Refuse unknown names before anything trains (a typo found after the teachers have
        trained would cost their training time)."""
        from pipelines.precompute import WEAK_SOURCES
        from pipelines.teacher import TEACHER_MODES
        from trainer.attacks import parse_attack
        from trainer.models import list_models
        from trainer.perturb import list_modes
        from trainer.saliency import list_methods

        checks = [("training mode", [s.mode for s in self.students], list_modes()),
                  ("teacher mode", [t.mode for t in self.teachers], TEACHER_MODES),
                  ("saliency method", [m for t in self.teachers for m in t.methods], list_methods()),
                  ("weak saliency source", list(self.weak), WEAK_SOURCES),
                  ("architecture", [self.arch] + [t.arch for t in self.teachers if t.arch],
                   list_models())]
        for what, given, valid in checks:
            for name in given:
                if name not in valid:
                    raise SatError(f"unknown {what} {name!r}; choose one of: {', '.join(valid)}")
        for t in self.teachers:
            if t.epochs < 1 or (t.width is not None and t.width < 1):
                raise SatError(f"teacher {t.name!r}: epochs and width must be >= 1")
        for a in self.eval.attacks:
            parse_attack(a)
        if self.eval.samples is not None and self.eval.samples < 1:
            raise SatError(f"eval samples must be >= 1, got {self.eval.samples}")
        if self.eval.autoattack is not None and self.eval.autoattack[1] < 1:
            raise SatError(f"autoattack samples must be >= 1, got {self.eval.autoattack[1]}")
        if self.width < 1 or self.batch_size < 1:
            raise SatError("width and batch_size must be >= 1")


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
    """Teachers, one store of maps, every student for every seed, evaluation and the report.

    A rerun reuses every finished piece: a teacher or student run that was interrupted is
    resumed from its last checkpoint, and an evaluation is redone only when its settings
    changed. Returns the summary also written to ``<out>/summary.json``.
    """
    from pipelines import report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare_config.json", {**config_dict(cfg), "git_sha": git_sha()})
    t_start = time.perf_counter()
    log: list[dict[str, Any]] = []
    teachers = _teachers(cfg, out, log)
    store = out / "store.zarr"
    names = _precompute(cfg, teachers, store, log)

    jobs = [_student_job(cfg, st, seed, store, names) for st in cfg.students for seed in cfg.seeds]
    if cfg.parallel > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked child would inherit torch's thread pools and dask's state.
        with ProcessPoolExecutor(cfg.parallel, mp_context=mp.get_context("spawn")) as pool:
            for rows in pool.map(run_student, jobs):
                log += rows
    else:
        for job in jobs:
            log += run_student(job)

    experiment = _experiment(cfg, jobs)
    write_json(out / "experiment.json", experiment)
    rep = report.run(report.ReportConfig(
        runs=tuple(j.train.out for j in jobs), out=str(out / "report"), title=cfg.title,
        experiment=str(out / "experiment.json"),
    ))
    overlays = _overlays(store, sorted(set(names.values())), out)
    summary = {
        "seconds": round(time.perf_counter() - t_start, 1), "stages": log, "report": rep,
        "maps": names, "overlays": overlays, "store": str(store),
    }
    write_json(out / "summary.json", summary)
    return summary


def _teachers(cfg: CompareConfig, out: Path, log: list[dict[str, Any]]) -> dict[str, Path]:
    """Train (or reuse, or resume) every teacher; {teacher name: its checkpoint}."""
    from pipelines import teacher

    paths: dict[str, Path] = {}
    for t in cfg.teachers:
        tdir = out / "teachers" / t.name
        paths[t.name] = tdir / "teacher.safetensors"
        tloop = LoopConfig(epochs=t.epochs, seed=cfg.seeds[0], robust_val_samples=128,
                           show_progress=cfg.show_progress)
        tc = teacher.TeacherConfig(
            data=cfg.data, out=str(tdir), arch=t.arch or cfg.arch, width=t.width or cfg.width,
            mode=t.mode, loop=tloop, batch_size=cfg.batch_size, device=cfg.device,
            resume=(tdir / "checkpoints" / "last.safetensors").is_file(),
        )
        _stage(f"teacher {t.name}", paths[t.name], lambda tc=tc: teacher.run(tc), log)
    return paths


def _precompute(cfg: CompareConfig, teachers: dict[str, Path], store: Path,
                log: list[dict[str, Any]]) -> dict[str, str]:
    """Write every map into one store (resumable); {map reference: map name}.

    Teachers that share their list of methods go through one precompute call; the weak maps
    go with the first call.
    """
    from pipelines import precompute

    groups: dict[tuple[str, ...], list[Teacher]] = {}
    for t in cfg.teachers:
        groups.setdefault(t.methods, []).append(t)
    calls = list(groups.items()) or [((), [])]
    by_path = {str(teachers[t.name]): t.name for t in cfg.teachers}
    names: dict[str, str] = {}
    t0 = time.perf_counter()
    for i, (methods, ts) in enumerate(calls):
        pc = precompute.PrecomputeConfig(
            store=str(store), data=cfg.data, splits=("train", "val"), map_splits=("train",),
            teachers=tuple(str(teachers[t.name]) for t in ts), methods=methods,
            weak=cfg.weak if i == 0 else (), workers=cfg.workers, device=cfg.device,
            seed=cfg.seeds[0], show_progress=cfg.show_progress,
        )
        for entry in precompute.run(pc)["maps"]:
            prov = entry["provenance"]
            if prov.get("source") == "teacher":
                names[f"{by_path[entry['teacher']]}/{prov['method']}"] = entry["name"]
            else:
                names[str(prov["source"])] = entry["name"]
    log.append({"stage": "precompute", "seconds": round(time.perf_counter() - t0, 2)})
    return names


@dataclass(frozen=True)
class StudentJob:
    """One student at one seed: its training and its evaluations (picklable for a process pool)."""

    name: str
    seed: int
    train: Any  # pipelines.train.TrainConfig (resume is decided when the job runs)
    # EvalConfig keyword arguments, one folder each. The configs are built when the job runs:
    # an EvalConfig checks that its checkpoint exists, which it does only after training.
    evals: tuple[dict[str, Any], ...]


def _student_job(cfg: CompareConfig, st: Student, seed: int, store: Path,
                 names: dict[str, str]) -> StudentJob:
    from pipelines import train

    rdir = Path(cfg.out) / "students" / st.name / f"seed{seed}"
    loop = LoopConfig(epochs=cfg.student_epochs, seed=seed, robust_val_samples=128,
                      show_progress=cfg.show_progress)
    tc = train.TrainConfig(
        store=str(store), out=str(rdir), mode=st.mode, maps=tuple(names[m] for m in st.maps),
        arch=cfg.arch, width=cfg.width, batch_size=cfg.batch_size, loop=loop,
        perturb=PerturbConfig(**dict(st.options)), sat_reach_fraction=cfg.sat_reach_fraction,
        device=cfg.device,
    )
    ev = cfg.eval
    common = dict(checkpoint=str(rdir / "checkpoints" / "last.safetensors"), store=str(store),
                  split="val", device=cfg.device, seed=seed, show_progress=cfg.show_progress)
    evals = [(ev.attacks, ev.eps, ev.samples, rdir / "eval")]
    if ev.autoattack is not None and st.mode in ROBUST_MODES:
        evals.append((("autoattack",), (ev.autoattack[0],), ev.autoattack[1], rdir / "eval-autoattack"))
    bd = ({"boundary": False} if ev.boundary is None else
          {"boundary": True, "boundary_samples": ev.boundary[0], "boundary_steps": ev.boundary[1]})
    # The AutoAttack pass only adds its accuracy: alignment and boundary come from the main one.
    extra = [bd] + [{"alignment": False, "boundary": False}] * (len(evals) - 1)
    ecs = tuple(dict(common, attacks=a, eps=e, uniform_eps=ev.uniform_eps, max_samples=n,
                     out=str(o), **x) for (a, e, n, o), x in zip(evals, extra, strict=True))
    return StudentJob(name=st.name, seed=seed, train=tc, evals=ecs)


def _finished(rdir: Path, epochs: int) -> bool | None:
    """True: trained to ``epochs``; False: a checkpoint to resume from; None: nothing yet."""
    res = rdir / "result.json"
    if res.is_file():
        try:
            if json.loads(res.read_text()).get("epochs") == epochs:
                return True
        except (json.JSONDecodeError, AttributeError):
            pass
    return False if (rdir / "checkpoints" / "last.safetensors").is_file() else None


def _eval_current(results: Path, ec: Any) -> bool:
    """Whether ``results`` was written with the settings of ``ec`` (else evaluate again)."""
    ckpt = Path(ec.checkpoint)
    if not results.is_file() or results.stat().st_mtime < ckpt.stat().st_mtime:
        return False  # none yet, or the model trained on (a resumed run) after it was written
    try:
        old = json.loads(results.read_text()).get("config", {})
    except (json.JSONDecodeError, AttributeError):
        return False
    new = config_dict(ec)
    keys = ("checkpoint", "attacks", "eps", "uniform_eps", "max_samples", "seed", "split",
            "alignment", "boundary", "boundary_samples", "boundary_steps")
    return all(old.get(k) == new.get(k) for k in keys)


def run_student(job: StudentJob) -> list[dict[str, Any]]:
    """Train (fresh, resumed or not at all) and evaluate one student at one seed; the stage log."""
    from pipelines import evaluate, train

    log: list[dict[str, Any]] = []
    tag = f"{job.name} seed {job.seed}"
    rdir = Path(job.train.out)
    state = _finished(rdir, job.train.loop.epochs)
    if state is True:
        print(f"[compare] train {tag}: reusing {rdir}", flush=True)
    else:
        tc = replace(job.train, resume=state is False)
        verb = "resuming" if tc.resume else "training"
        print(f"[compare] train {tag}: {verb} ...", flush=True)
        t0 = time.perf_counter()
        train.run(tc)
        log.append({"stage": f"train {tag}", "seconds": round(time.perf_counter() - t0, 2)})
    for kw in job.evals:
        ec = evaluate.EvalConfig(**kw)
        res = Path(kw["out"]) / "results.json"
        if _eval_current(res, ec):
            print(f"[compare] eval {tag}: reusing {res}", flush=True)
            continue
        t0 = time.perf_counter()
        evaluate.run(ec)
        log.append({"stage": f"eval {tag} ({','.join(ec.attacks)})",
                    "seconds": round(time.perf_counter() - t0, 2)})
    return log


def _experiment(cfg: CompareConfig, jobs: list[StudentJob]) -> dict[str, Any]:
    """What the report needs to group runs: each student's runs by seed, its baseline and
    mode, the maps it used (by reference), and the budget the claims use."""
    groups = []
    for st in cfg.students:
        runs = [{"seed": j.seed, "run": j.train.out,
                 "extra_results": [str(Path(kw["out"]) / "results.json") for kw in j.evals[1:]]}
                for j in jobs if j.name == st.name]
        groups.append({"name": st.name, "mode": st.mode, "maps": list(st.maps),
                       "baseline": st.baseline, "runs": runs})
    tmodes = {t.name: t.mode for t in cfg.teachers}
    return {"title": cfg.title, "robust_eps": cfg.eval.robust_eps, "seeds": list(cfg.seeds),
            "teacher_modes": tmodes, "parallel": cfg.parallel, "groups": groups}


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


