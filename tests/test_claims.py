"""The experiment report (intervals over seeds, paired differences, epoch times) and the
claims' verdicts, from synthetic results.json files: a verdict follows the numbers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines import experiment_report
from pipelines.claims import CLAIMS, judge_all
from pipelines.report import ReportConfig
from pipelines.report import run as report_run

LABELS = {"standard": "Original", "sat": "Segmentation Masks", "pgd": "PGD",
          "pgd-sat": "PGD-SAT (Segmentation Masks)", "sgt": "SGT"}


def _run(root: Path, name: str, seed: int, clean: float, pgd: float, epoch_time: float,
         label: str, aa: float | None = None) -> dict:
    """One seed's run directory as `sat train` + `sat eval` write it; its experiment entry."""
    rdir = root / "students" / name / f"seed{seed}"
    (rdir / "eval").mkdir(parents=True)
    results = {"clean": clean, "attacks": {"pgd5": {"1": min(1.0, pgd + 0.1), "2": pgd}}}
    (rdir / "eval" / "results.json").write_text(json.dumps({"label": label, "results": results}))
    rows = [{"epoch": e, "epoch_time_s": epoch_time} for e in (1, 2)]
    (rdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = {"seed": seed, "run": str(rdir), "extra_results": []}
    if aa is not None:
        extra = rdir / "eval-autoattack" / "results.json"
        extra.parent.mkdir()
        extra.write_text(json.dumps({"results": {"clean": clean, "attacks": {"autoattack": {"8": aa}}}}))
        entry["extra_results"] = [str(extra)]
    return entry


def _experiment(root: Path, methods: dict[str, dict], teacher_modes=None) -> Path:
    """``methods``: name -> {mode, maps, baseline, clean: [per seed], pgd: [...], time: [...]}."""
    groups = []
    for name, m in methods.items():
        runs = [_run(root, name, s, c, p, t, m.get("label", LABELS[m["mode"]]), m.get("aa"))
                for s, (c, p, t) in enumerate(zip(m["clean"], m["pgd"], m["time"], strict=True))]
        groups.append({"name": name, "mode": m["mode"], "maps": m.get("maps", []),
                       "baseline": m.get("baseline"), "runs": runs})
    path = root / "experiment.json"
    path.write_text(json.dumps({"robust_eps": 2, "teacher_modes": teacher_modes or {},
                                "groups": groups}))
    return path


ORIGINAL = {"mode": "standard", "clean": [0.90, 0.91, 0.92], "pgd": [0.30, 0.32, 0.31],
            "time": [1.0, 1.1, 1.0]}


def _verdicts(path: Path) -> dict[str, list[str]]:
    exp, _ = experiment_report.load(path)
    judged, _ = judge_all(exp)
    return {c.key: [f.verdict for f in findings] for c, findings in judged}


def test_sat_verdict_flips_when_the_numbers_flip(tmp_path):
    better = {"mode": "sat", "maps": ["mask"], "baseline": "original",
              "clean": [0.90, 0.91, 0.92], "pgd": [0.40, 0.43, 0.41], "time": [1.0, 1.0, 1.0]}
    assert _verdicts(_experiment(tmp_path / "a", {"original": ORIGINAL, "sat": better})) == {
        "sat-beats-original": ["supported"]}
    worse = {**better, "pgd": [0.20, 0.23, 0.21]}
    assert _verdicts(_experiment(tmp_path / "b", {"original": ORIGINAL, "sat": worse})) == {
        "sat-beats-original": ["contradicted"]}
    noisy = {**better, "pgd": [0.40, 0.22, 0.33]}
    assert _verdicts(_experiment(tmp_path / "c", {"original": ORIGINAL, "sat": noisy})) == {
        "sat-beats-original": ["inconclusive"]}


def test_one_seed_is_inconclusive_and_says_the_interval_is_unavailable(tmp_path):
    one = {k: (v[:1] if isinstance(v, list) else v) for k, v in ORIGINAL.items()}
    sat = {"mode": "sat", "maps": ["mask"], "baseline": "original", "clean": [0.9],
           "pgd": [0.9], "time": [1.0]}  # a huge gain, but from one seed
    path = _experiment(tmp_path, {"original": one, "sat": sat})
    assert _verdicts(path) == {"sat-beats-original": ["inconclusive"]}
    report_run(ReportConfig(runs=(), out=str(tmp_path / "rep"), experiment=str(path)))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "+60.00 (interval unavailable: one seed)" in md
    assert "| Original | 1 | 90.00 (n=1) |" in md


def test_a_win_through_clean_accuracy_is_flagged(tmp_path):
    sat = {"mode": "sat", "maps": ["mask"], "baseline": "original",
           "clean": [0.96, 0.97, 0.98], "pgd": [0.36, 0.38, 0.37], "time": [1.0, 1.0, 1.0]}
    path = _experiment(tmp_path, {"original": ORIGINAL, "sat": sat})
    exp, _ = experiment_report.load(path)
    (claim, findings), = judge_all(exp)[0]
    assert findings[0].verdict == "supported"
    assert any("mainly through clean accuracy" in line for line in findings[0].evidence)
    # Robust and clean accuracy are quoted together, for both methods.
    assert any(line.startswith("Segmentation Masks (n=3): PGD-5 ε=2/255 37.00 ± ")
               and ", clean 97.00 ± " in line for line in findings[0].evidence)


@pytest.mark.parametrize(("ratio", "pgd_gain", "verdict"), [
    (0.6, 0.10, "supported"),      # more robust, at 60 % of the time
    (0.9, 0.10, "contradicted"),   # more robust, but not cheaper enough
    (0.6, -0.10, "contradicted"),  # cheaper, but less robust
])
def test_pgd_sat_claim_needs_robustness_and_the_time_ratio(tmp_path, ratio, pgd_gain, verdict):
    pgd = {"mode": "pgd", "clean": [0.7, 0.72, 0.71], "pgd": [0.5, 0.52, 0.51],
           "time": [5.0, 5.2, 5.1]}
    pgd_sat = {"mode": "pgd-sat", "maps": ["mask"], "baseline": "pgd",
               "clean": [0.7, 0.72, 0.71], "pgd": [v + pgd_gain for v in (0.5, 0.53, 0.51)],
               "time": [ratio * t for t in (5.0, 5.2, 5.1)], "aa": 0.3}
    path = _experiment(tmp_path, {"pgd": {**pgd, "aa": 0.25}, "pgd-sat": pgd_sat})
    assert _verdicts(path) == {"pgd-sat-beats-pgd": [verdict]}


def test_adversarial_teacher_maps_are_paired_with_standard_ones(tmp_path):
    base = {"mode": "sat", "baseline": "original", "time": [1.0, 1.0, 1.0],
            "clean": [0.9, 0.9, 0.9]}
    methods = {
        "original": ORIGINAL,
        "sat-std": {**base, "maps": ["std/gbp"], "label": "Std GBP", "pgd": [0.35, 0.36, 0.37]},
        "sat-adv": {**base, "maps": ["adv/gbp"], "label": "Adv GBP", "pgd": [0.45, 0.47, 0.46]},
        "sat-adv-ig": {**base, "maps": ["adv/ig"], "label": "Adv IG", "pgd": [0.1, 0.1, 0.1]},
    }
    path = _experiment(tmp_path, methods, teacher_modes={"std": "standard", "adv": "adversarial"})
    exp, _ = experiment_report.load(path)
    judged = dict((c.key, f) for c, f in judge_all(exp)[0])
    assert [(f.subject, f.verdict) for f in judged["adversarial-maps"]] == [
        ("Adv GBP vs Std GBP", "supported")]  # IG has no standard-teacher partner


@pytest.mark.parametrize(("sgt_pgd", "verdict"), [
    ([0.20, 0.21, 0.22], "supported"),  # less robust than standard, as Karkehabadi report
    ([0.40, 0.41, 0.42], "contradicted"),
    ([0.25, 0.38, 0.31], "inconclusive"),
])
def test_sgt_claim(tmp_path, sgt_pgd, verdict):
    sgt = {"mode": "sgt", "clean": [0.9, 0.9, 0.9], "pgd": sgt_pgd, "time": [2.0, 2.0, 2.0]}
    path = _experiment(tmp_path, {"original": ORIGINAL, "sgt": sgt})  # no named baseline
    assert _verdicts(path) == {"sgt-no-robustness": [verdict]}


def _csv(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text())))


def test_experiment_report_tables_plots_and_the_unjudged_claims(tmp_path):
    sat = {"mode": "sat", "maps": ["mask"], "baseline": "original",
           "clean": [0.90, 0.91, 0.92], "pgd": [0.40, 0.43, 0.41], "time": [1.2, 1.2, 1.3]}
    path = _experiment(tmp_path, {"original": ORIGINAL, "sat": sat})
    out = tmp_path / "rep"
    summary = report_run(ReportConfig(runs=(), out=str(out), experiment=str(path), title="X"))
    assert summary["tables"] == ["differences", "epoch_time", "table1_pgd5"]
    t1 = _csv(out / "table1_pgd5.csv")
    assert t1[0] == ["Method", "n", "Clean", "Clean ci95", "ε=1/255", "ε=1/255 ci95",
                     "ε=2/255", "ε=2/255 ci95"]
    # Original's clean accuracy: 0.90, 0.91, 0.92 -> 91.00 ± 4.3027 * 1 / sqrt(3) = 2.48.
    assert t1[1][:4] == ["Original", "3", "91.00", "2.48"]
    diff = _csv(out / "differences.csv")
    assert diff[0][:4] == ["Method − baseline", "Δ Clean", "Δ Clean ci95", "Δ Clean significant"]
    assert diff[1][0] == "Segmentation Masks − Original" and diff[1][1:4] == ["0.00", "0.00", "false"]
    times = _csv(out / "epoch_time.csv")
    assert times[1][:2] == ["Original", "3"] and times[2][0] == "Segmentation Masks"
    md = (out / "report.md").read_text()
    assert "| Original | 3 | 91.00 ± 2.48 |" in md
    assert "- **supported**: Segmentation Masks vs Original" in md
    assert "Not evaluable with these runs:" in md
    for c in CLAIMS[1:]:  # no PGD, teacher or sgt runs here
        assert f"- {c.statement} ({c.source}): needs {c.needs}" in md
    assert summary["plots"] == ["accuracy_vs_eps.png", "cost_robustness.png"]
    for name in summary["plots"]:
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG"


def test_a_missing_extra_result_is_refused(tmp_path):
    path = _experiment(tmp_path, {"pgd": {"mode": "pgd", "clean": [0.7], "pgd": [0.5],
                                          "time": [1.0], "aa": 0.3}})
    (tmp_path / "students" / "pgd" / "seed0" / "eval-autoattack" / "results.json").unlink()
    from saliency_cache.errors import SatError

    with pytest.raises(SatError, match="eval-autoattack"):
        experiment_report.load(path)


def _etmann_experiment(pairs: list[tuple[float, float]]):
    """One group per (median L2 distance, mean alignment) point, one seed each."""
    from pipelines.claims import Experiment, Group

    groups = []
    for i, (dist, align) in enumerate(pairs):
        res = {"clean": 0.9, "attacks": {},
               "alignments": {"margin_projection": {"mean": align, "median": align}},
               "boundary": {"l2": {"median": 0.0, "median_correct": dist},
                            "linf": {"median": 0.0, "median_correct": dist / 10}}}
        groups.append(Group(f"m{i}", f"M{i}", "gradnorm", (), None, {0: res}))
    return Experiment(groups, robust_eps="2", teacher_modes={})


def test_etmann_claim_follows_the_rank_correlation():
    from pipelines.claims import alignment_rises_with_robustness

    rising = [(0.1 * k, 1.0 + k) for k in range(6)]
    falling = [(0.1 * k, 10.0 - k) for k in range(6)]
    noise = [(0.1, 2.0), (0.2, 1.0), (0.3, 3.0), (0.4, 1.5)]
    for pts, want in ((rising, "supported"), (falling, "contradicted"), (noise, "inconclusive")):
        findings = alignment_rises_with_robustness(_etmann_experiment(pts))
        assert [f.verdict for f in findings] == [want, want], (pts, findings)
        assert findings[0].evidence[0].startswith(f"Spearman ρ over {len(pts)} runs")
    # Fewer than three runs with both measurements: the claim is not evaluable at all.
    assert alignment_rises_with_robustness(_etmann_experiment(rising[:2])) == []
    exp = _etmann_experiment(rising)
    for g in exp.groups:
        del g.results[0]["boundary"]
    assert alignment_rises_with_robustness(exp) == []
