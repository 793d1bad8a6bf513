"""`sat compare`: one tiny experiment from a spec file (2 seeds, 1 epoch, width 4): per-seed
run folders with shared teachers and maps, the report with intervals and claims, and reruns
that train nothing when everything is finished and resume what was interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import main

SPEC = """\
title: tiny experiment
data:
  dataset: synthetic
  options: {n: 64, n_val: 32, image_size: 16, num_classes: 4, seed: 0}
width: 4
batch_size: 32
seeds: [0, 1]
teachers:
  - {name: std, mode: standard, epochs: 1, methods: [gbp]}
weak: [mask]
student_epochs: 1
students:
  - {name: original, mode: standard}
  - {name: sat-mask, mode: sat, maps: [mask], baseline: original}
  - {name: sat-gbp, mode: sat, maps: [std/gbp], baseline: original}
  - {name: pgd, mode: pgd}
eval: {attacks: [pgd5], eps: [1, 2], samples: 16, autoattack: {eps: 8, samples: 4}, robust_eps: 2,
       boundary: {samples: 4, steps: 5}}
device: cpu
workers: 0
"""
STUDENTS = ("original", "sat-mask", "sat-gbp", "pgd")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    out = root / "exp"
    res = CliRunner().invoke(main, ["compare", "--spec", str(spec), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    return spec, out


def test_layout_one_folder_per_seed_with_shared_teachers_and_store(experiment):
    _, out = experiment
    assert sorted(p.name for p in (out / "teachers").iterdir()) == ["std"]
    assert (out / "store.zarr").is_dir()
    for name in STUDENTS:
        for seed in (0, 1):
            rdir = out / "students" / name / f"seed{seed}"
            assert (rdir / "result.json").is_file() and (rdir / "eval" / "results.json").is_file()
            cfg = json.loads((rdir / "config.json").read_text())
            assert cfg["loop"]["seed"] == seed
            # AutoAttack only for robust rows, on its own (smaller) sample count.
            aa = rdir / "eval-autoattack" / "results.json"
            assert aa.is_file() == (name == "pgd")
            if name == "pgd":
                aa_res = json.loads(aa.read_text())
                assert aa_res["n"] == 4
                # The AutoAttack pass adds only its accuracy.
                assert "boundary" not in aa_res["results"] and "alignments" not in aa_res["results"]
            main_res = json.loads((rdir / "eval" / "results.json").read_text())["results"]
            assert main_res["boundary"]["n"] == 4 and main_res["boundary"]["steps"] == 5
            assert "margin_projection" in main_res["alignments"]
    groups = json.loads((out / "experiment.json").read_text())["groups"]
    assert [g["name"] for g in groups] == list(STUDENTS)
    assert [r["seed"] for r in groups[1]["runs"]] == [0, 1]


def test_map_names_come_from_precompute_provenance(experiment):
    from saliency_cache.store import SaliencyStore

    _, out = experiment
    names = json.loads((out / "summary.json").read_text())["maps"]
    assert set(names) == {"mask", "std/gbp"}
    split = SaliencyStore.open(str(out / "store.zarr"), "r").split("train")
    assert split.open_map(names["std/gbp"]).provenance["teacher_mode"] == "standard"
    assert split.open_map(names["mask"]).provenance["source"] == "mask"
    cfg = json.loads((out / "students" / "sat-gbp" / "seed0" / "config.json").read_text())
    assert cfg["maps"] == [names["std/gbp"]]


def test_report_shows_intervals_differences_and_claims(experiment):
    _, out = experiment
    md = (out / "report" / "report.md").read_text()
    assert "| Method | n | Clean | ε=1/255 | ε=2/255 |" in md
    assert "| Original | 2 | " in md and " ± " in md
    assert "Segmentation Masks − Original" in md and "## Claims" in md
    assert "autoattack ε=8/255" in md
    assert (out / "report" / "cost_robustness.png").is_file()


class _Counter:
    def __init__(self, real=None):
        self.calls: list = []
        self.real = real

    def __call__(self, cfg):
        self.calls.append(cfg)
        if self.real is None:
            raise AssertionError(f"nothing should run here, but {type(cfg).__name__} did")
        return self.real(cfg)


def test_rerun_trains_and_evaluates_nothing(experiment, monkeypatch):
    from pipelines import evaluate, teacher, train
    from pipelines.compare import run
    from pipelines.spec import load_spec

    spec, out = experiment
    ckpts = sorted(out.glob("students/*/seed*/checkpoints/last.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    for mod in (train, teacher, evaluate):
        monkeypatch.setattr(mod, "run", _Counter())
    run(load_spec(spec, out=str(out), overrides={"device": "cpu"}))
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before and len(before) == 8


def test_rerun_resumes_an_interrupted_run_only(experiment, monkeypatch):
    from pipelines import evaluate, train
    from pipelines.compare import run
    from pipelines.spec import load_spec

    spec, out = experiment
    rdir = out / "students" / "sat-mask" / "seed1"
    (rdir / "result.json").unlink()  # killed after its last checkpoint, before the end
    (rdir / "eval" / "results.json").unlink()
    trains, evals = _Counter(train.run), _Counter(evaluate.run)
    monkeypatch.setattr(train, "run", trains)
    monkeypatch.setattr(evaluate, "run", evals)
    run(load_spec(spec, out=str(out)))
    assert [(Path(c.out), c.resume) for c in trains.calls] == [(rdir, True)]
    assert [Path(c.checkpoint).parents[1] for c in evals.calls] == [rdir]
    assert (rdir / "result.json").is_file()


def test_parallel_runs_give_the_sequential_results(experiment, tmp_path):
    """Two student runs in two processes end with the numbers of the sequential runs."""
    _, out = experiment
    spec = tmp_path / "spec.yaml"
    keep = ("  - {name: std", "  - {name: sat-gbp", "  - {name: pgd")
    spec.write_text("".join(ln for ln in SPEC.splitlines(True) if not ln.startswith(keep))
                    .replace("teachers:\n", "teachers: []\n"))
    par = tmp_path / "par"
    res = CliRunner().invoke(main, ["compare", "--spec", str(spec), "--out", str(par),
                                    "--seeds", "0", "--parallel", "2", "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    for name in ("original", "sat-mask"):
        a, b = (json.loads((o / "students" / name / "seed0" / "eval" / "results.json").read_text())
                for o in (out, par))
        assert a["results"] == b["results"]


def test_the_experiment_report_colours_the_alignment_plot_by_training_mode(experiment):
    """Each seed's run is one point of the alignment-vs-boundary test, with its group's mode."""
    import csv

    _, out = experiment
    with open(out / "report" / "alignment_vs_boundary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(STUDENTS) * 2
    assert sorted({r["mode"] for r in rows}) == ["pgd", "sat", "standard"]
