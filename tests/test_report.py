"""``sat report``: row names from provenance, the paper's tables as markdown + CSV, PNG plots,
refused input; and one real report from two tiny trained and evaluated runs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from pipelines.evaluate import map_label, run_label


def _teacher(arch: str = "resnet10", mode: str = "adversarial", method: str = "gbp") -> dict:
    """Provenance as ``sat precompute`` records it for a teacher's map."""
    return {"source": "teacher", "teacher_arch": arch, "teacher_mode": mode,
            "checkpoint_sha256": "ab" * 32, "method": method, "method_params": {},
            "threshold": 0.5, "target_rule": "label", "encoding": "binary"}


BOX = {"source": "box", "method": "box-annotation", "encoding": "binary", "threshold": None}
MASK = {"source": "mask", "method": "mask-annotation", "encoding": "binary", "threshold": None}


def _label(mode: str, *provs: dict) -> str:
    """The label of a student run as ``sat train`` records it (train config + checkpoint extra)."""
    names = [f"map{k}" for k in range(len(provs))]  # labels come from provenance, not names
    mp = dict(zip(names, provs, strict=True))
    return run_label({"stage": "train", "mode": mode, "map_provenance": mp},
                     {"mode": mode, "maps": names, "map_provenance": mp})


@pytest.mark.parametrize("mode, provs, expected", [
    ("sat", [_teacher()], "Resnet-10 — Adv. — GBP"),
    ("sat", [_teacher("resnet34", "standard", "gbp")], "Resnet-34 — Std. — GBP"),
    ("sat", [_teacher("resnet10", "standard", "smoothgrad")], "Resnet-10 — Std. — S.Grad"),
    ("sat", [_teacher("resnet10", "adversarial", "ig")], "Resnet-10 — Adv. — I.Grad"),
    ("sat", [_teacher("resnet10", "adversarial", "guided-gradcam++")],
     "Resnet-10 — Adv. — G.G.CAM++"),
    ("sat", [_teacher("resnet10", "sparse", "gbp")], "Resnet-10 — Sparse — GBP"),
    ("pgd-sat", [_teacher()], "PGD-SAT (Resnet-10 — Adv. — GBP)"),
    ("trades-sat", [_teacher("resnet34", "adversarial", "gradcam++-box")],
     "TRADES-SAT (Resnet-34 — Adv. — G.CAM++)"),  # the paper's G.CAM++ rows are the boxes
    ("sat", [_teacher("resnet10", "standard", "gradcam++")], "Resnet-10 — Std. — G.CAM++ heatmap"),
    ("sat", [BOX], "Bounding Boxes"),
    ("sat", [MASK], "Segmentation Masks"),
    ("pgd-sat", [BOX], "PGD-SAT (Bounding Boxes)"),
    ("multi-sat", [_teacher(), BOX], "Resnet-10 — Adv. — GBP + Bounding Boxes"),
    ("standard", [], "Original"),
    ("uniform", [], "Original + Uniform-Noise"),
    ("pgd", [], "PGD"),
    ("pgd+uniform", [], "PGD + Uniform-Noise"),
    ("trades", [], "TRADES"),
    ("trades+uniform", [], "TRADES + Uniform-Noise"),
])
def test_run_label_follows_the_paper(mode, provs, expected):
    assert _label(mode, *provs) == expected


def test_map_label_and_teacher_label():
    assert map_label(_teacher("resnet10", "adversarial", "gbp")) == "Resnet-10 — Adv. — GBP"
    assert map_label(BOX) == "Bounding Boxes" and map_label(MASK) == "Segmentation Masks"
    # Names the table does not know are shown as recorded rather than dropped.
    assert map_label(_teacher("vit-tiny", "standard", "lrp")) == "vit-tiny — Std. — lrp"
    teacher_cfg = {"stage": "teacher", "arch": "resnet34", "mode": "adversarial"}
    assert run_label(teacher_cfg, {"teacher_mode": "adversarial"}) == "Teacher resnet34 (adversarial)"


# ---- tables and plots from results files written here -------------------------------------
def _write_run(path: Path, label: str, results: dict, epoch_times=None, as_file=False) -> str:
    """A run directory (``<path>/eval/results.json`` + ``metrics.jsonl``) or a bare results
    file, as ``sat eval`` and ``sat train`` write them; returns what to pass to the report."""
    res = path if as_file else path / "eval" / "results.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps({"label": label, "n": 100, "split": "val", "results": results}))
    if epoch_times:
        rows = [{"epoch": i + 1, "loss": 1.0, "epoch_time_s": t} for i, t in enumerate(epoch_times)]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(res if as_file else path)


@pytest.fixture
def three_runs(tmp_path) -> list[str]:
    a = _write_run(tmp_path / "orig", "Original", {
        "clean": 0.9, "alignment": 0.12, "attacks": {
            "pgd5": {"1": 0.5, "2": 0.3}, "pgd20": {"1": 0.45, "2": 0.25},
            "pgd40": {"1": 0.44, "2": 0.24}, "uniform": {"8": 0.85, "16": 0.8},
            "trades": {"1": 0.6}, "saliency": {"1": 0.7}}},
        epoch_times=[1.0, 3.0])
    b = _write_run(tmp_path / "sat", "Resnet-10 — Adv. — GBP", {
        "clean": 0.8, "alignment": 0.2, "attacks": {
            "pgd5": {"1": 0.6, "2": 0.4, "4": 0.1}, "saliency-map": {"8": 0.5},
            "autoattack": {"1": 0.55}}},
        epoch_times=[0.5])
    c = _write_run(tmp_path / "results_c.json", "PGD-SAT (Bounding Boxes)", {
        "clean": 0.7, "attacks": {"pgd5": {"1": 0.65}, "pgd10": {"1": 0.6}}}, as_file=True)
    return [a, b, c]


def _csv(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text())))


def test_report_tables_csv_markdown_and_plots(three_runs, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["report", *three_runs, "--out", str(out), "--title", "T"])
    assert res.exit_code == 0, (res.output, res.exception)

    assert _csv(out / "table1_pgd5.csv") == [
        ["Method", "Clean", "ε=1/255", "ε=2/255", "ε=4/255"],
        ["Original", "90.00", "50.00", "30.00", ""],
        ["Resnet-10 — Adv. — GBP", "80.00", "60.00", "40.00", "10.00"],
        ["PGD-SAT (Bounding Boxes)", "70.00", "65.00", "", ""],
    ]
    assert _csv(out / "table4_other_attacks.csv") == [
        ["Method", "uniform ε=8/255", "uniform ε=16/255", "trades ε=1/255", "saliency ε=1/255",
         "saliency-map ε=8/255", "autoattack ε=1/255", "pgd10 ε=1/255"],
        ["Original", "85.00", "80.00", "60.00", "70.00", "", "", ""],
        ["Resnet-10 — Adv. — GBP", "", "", "", "", "50.00", "55.00", ""],
        ["PGD-SAT (Bounding Boxes)", "", "", "", "", "", "", "60.00"],
    ]
    assert _csv(out / "table6_pgd20_40.csv") == [
        ["Method", "PGD-20 ε=1/255", "PGD-20 ε=2/255", "PGD-40 ε=1/255", "PGD-40 ε=2/255"],
        ["Original", "45.00", "25.00", "44.00", "24.00"],
        ["Resnet-10 — Adv. — GBP", "", "", "", ""],
        ["PGD-SAT (Bounding Boxes)", "", "", "", ""],
    ]
    assert _csv(out / "alignment.csv") == [
        ["Method", "Alignment"], ["Original", "0.1200"], ["Resnet-10 — Adv. — GBP", "0.2000"],
    ]

    md = (out / "report.md").read_text()
    assert md.startswith("# T\n")
    for title in ("Table 1: clean and PGD-5", "Table 4: other attacks", "Table 6: stronger PGD"):
        assert title in md
    assert "| Original | 90.00 | 50.00 | 30.00 | – |" in md
    assert "![accuracy_vs_eps.png](accuracy_vs_eps.png)" in md
    assert res.stdout.strip() == md.strip()

    for name in ("accuracy_vs_eps.png", "epoch_time.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    summary = json.loads((out / "report.json").read_text())
    assert summary["plots"] == ["accuracy_vs_eps.png", "epoch_time.png"]
    assert summary["tables"] == ["table1_pgd5", "table4_other_attacks", "table6_pgd20_40"]
    assert len(summary["runs"]) == 3


def test_epoch_time_is_the_mean_over_epochs(three_runs):
    from pipelines.report import load_run

    assert load_run(three_runs[0]).epoch_time == pytest.approx(2.0)
    assert load_run(three_runs[1]).epoch_time == pytest.approx(0.5)
    assert load_run(three_runs[2]).epoch_time is None


def test_report_without_times_or_pgd5_writes_what_it_can(tmp_path):
    run = _write_run(tmp_path / "r", "Original", {"clean": 0.5, "attacks": {"uniform": {"8": 0.4}}})
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["report", run, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tables"] == ["table4_other_attacks"]
    assert sorted(p.name for p in out.iterdir()) == [
        "report.json", "report.md", "table4_other_attacks.csv"]


# ---- refused input ---------------------------------------------------------------------------
def _broken(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(report arguments, text the error line must contain) for one kind of bad input."""
    good = _write_run(tmp_path / "good", "Original", {"clean": 0.9, "attacks": {"pgd5": {"1": 0.5}}})
    bad = tmp_path / "bad"
    res = bad / "eval" / "results.json"
    res.parent.mkdir(parents=True)
    if case == "missing-results":
        res.unlink(missing_ok=True)
        return [good, str(bad)], "no evaluation results"
    if case == "missing-dir":
        return [good, str(tmp_path / "nope")], "nope"
    if case == "out-is-a-file":
        (tmp_path / "file").write_text("x")
        return [good, "--out", str(tmp_path / "file")], "not a directory"
    if case == "bad-metrics-line":
        res.write_text(json.dumps({"results": {"clean": 0.5, "attacks": {}}}))
        (bad / "metrics.jsonl").write_text('{"epoch": 1, "epoch_time_s": 1.0}\n{"epoch": 2, "ep')
        return [good, str(bad)], "line 2"
    content = {
        "not-json": "{oops",
        "a-list": "[1, 2]",
        "no-results": json.dumps({"label": "x"}),
        "no-clean": json.dumps({"results": {"attacks": {}}}),
        "attacks-not-mapping": json.dumps({"results": {"clean": 0.5, "attacks": [1]}}),
        "eps-not-number": json.dumps({"results": {"clean": 0.5, "attacks": {"pgd5": {"x": 1}}}}),
        "accuracy-not-number": json.dumps(
            {"results": {"clean": 0.5, "attacks": {"pgd5": {"1": "high"}}}}),
    }[case]
    res.write_text(content)
    return [good, str(bad)], str(res)


BROKEN = ["missing-results", "missing-dir", "out-is-a-file", "bad-metrics-line", "not-json",
          "a-list", "no-results", "no-clean", "attacks-not-mapping", "eps-not-number",
          "accuracy-not-number"]


@pytest.mark.parametrize("case", BROKEN)
def test_bad_report_input_exits_2_with_one_line(tmp_path, case):
    args, quoted = _broken(tmp_path, case)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "rep")]
    res = CliRunner().invoke(main, ["report", *args])
    assert res.exit_code == 2, (res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and quoted in lines[0], res.stderr
    assert not (tmp_path / "rep").exists()  # nothing half-written


# ---- one real report: two tiny runs trained, evaluated and reported through the CLI -----------
def test_end_to_end_report_from_two_evaluated_runs(tmp_path):
    sat = CliRunner()
    data = ["--dataset", "synthetic", "--n", "64", "--n-val", "32", "--image-size", "16",
            "--num-classes", "4"]
    store = str(tmp_path / "store.zarr")
    r = sat.invoke(main, ["precompute", *data, "--store", store, "--weak", "mask",
                          "--chunk-size", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    train = ["--store", store, "--epochs", "1", "--width", "4", "--batch-size", "32",
             "--robust-val-samples", "0", "--device", "cpu", "--quiet"]
    runs = {"orig": ["--mode", "standard"], "sat": ["--mode", "sat", "--map", "mask"]}
    for name, mode in runs.items():
        r = sat.invoke(main, ["train", *train, *mode, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        r = sat.invoke(main, ["eval", "--checkpoint",
                              str(tmp_path / name / "checkpoints" / "best.safetensors"),
                              "--store", store, "--attacks", "pgd5,pgd20,saliency",
                              "--eps", "1,2", "--max-samples", "16", "--device", "cpu",
                              "--quiet"])
        assert r.exit_code == 0, r.output
    out = tmp_path / "report"
    r = sat.invoke(main, ["report", str(tmp_path / "orig"), str(tmp_path / "sat"),
                          "--out", str(out)])
    assert r.exit_code == 0, r.output

    evals = [json.loads((tmp_path / n / "eval" / "results.json").read_text())["results"]
             for n in runs]
    t1 = _csv(out / "table1_pgd5.csv")
    assert t1[0] == ["Method", "Clean", "ε=1/255", "ε=2/255"]
    assert [row[0] for row in t1[1:]] == ["Original", "Segmentation Masks"]
    for row, ev in zip(t1[1:], evals, strict=True):
        assert row[1:] == [f"{100 * v:.2f}" for v in
                           (ev["clean"], ev["attacks"]["pgd5"]["1"], ev["attacks"]["pgd5"]["2"])]
    t6 = _csv(out / "table6_pgd20_40.csv")
    assert t6[0] == ["Method", "PGD-20 ε=1/255", "PGD-20 ε=2/255"]
    assert t6[2][1] == f"{100 * evals[1]['attacks']['pgd20']['1']:.2f}"
    t4 = _csv(out / "table4_other_attacks.csv")
    assert t4[0] == ["Method", "saliency ε=1/255", "saliency ε=2/255"]
    for name in ("accuracy_vs_eps.png", "epoch_time.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG"


def _measured_run(path: Path, label: str, mode: str, align: float, l2, linf) -> str:
    """A results.json with the alignment forms and the boundary summary of `sat eval`."""
    forms = {f: {"mean": align * k, "median": align * k} for k, f in enumerate(
        ("logit_projection", "logit_cosine", "margin_projection", "margin_cosine"), 1)}
    # The robustness axis is the median over correctly classified images; the median over
    # all images (misclassified at 0) is a different number and must not be used.
    side = {"median": 0.0, "not_found": 0.0, "misclassified": 0.6}
    res = {"clean": 0.8, "attacks": {}, "alignment": align, "alignments": forms,
           "boundary": {"attack": "fab", "steps": 20, "n": 50,
                        "l2": {**side, "median_correct": l2},
                        "linf": {**side, "median_correct": linf}}}
    f = path / "eval" / "results.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"label": label, "mode": mode, "n": 50, "split": "val",
                             "results": res}))
    return str(path)


def test_alignment_against_boundary_distance_plot_and_spearman(tmp_path):
    from scipy.stats import spearmanr

    align = [0.1, 0.3, 0.2, 0.5, 0.4]
    l2 = [0.05, 0.20, 0.30, 0.40, 0.10]
    linf = [0.001, 0.002, 0.003, 0.004, None]  # the last run: no median (half not fooled)
    modes = ["standard", "gradnorm", "gradnorm", "sgt", "pgd"]
    runs = [_measured_run(tmp_path / f"r{i}", f"run {i}", modes[i], align[i], l2[i], linf[i])
            for i in range(5)]
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["report", *runs, "--out", str(out)])
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    rho, p = spearmanr(l2, [3 * a for a in align])  # margin_projection = 3 * align here
    row = next(ln for ln in md.splitlines() if ln.startswith("| margin_projection | l2 |"))
    assert row == f"| margin_projection | l2 | 5 | {rho:.3f} | {p:.3g} |"
    row = next(ln for ln in md.splitlines() if ln.startswith("| margin_projection | linf |"))
    rho4, _ = spearmanr(linf[:4], [3 * a for a in align[:4]])
    assert row.split(" | ")[2:4] == ["4", f"{rho4:.3f}"]
    assert "not fooled): run 4" in md
    assert "![alignment_vs_boundary.png](alignment_vs_boundary.png)" in md
    with Image.open(out / "alignment_vs_boundary.png") as im:
        im.verify()
    table = _csv(out / "alignment_vs_boundary.csv")
    assert table[0][:2] == ["run", "mode"] and [t[1] for t in table[1:]] == modes
    assert table[5][-1] == ""  # the missing L∞ median stays empty
    # Two runs are too few for a rank correlation: the table says so instead of a number.
    out2 = tmp_path / "report2"
    assert CliRunner().invoke(main, ["report", *runs[:2], "--out", str(out2)]).exit_code == 0
    row = next(ln for ln in (out2 / "report.md").read_text().splitlines()
               if ln.startswith("| margin_projection | l2 |"))
    assert row == "| margin_projection | l2 | 2 | – | – |"
