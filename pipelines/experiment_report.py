"""The report of a seeded experiment (``experiment.json``, written by ``sat compare``).

Runs are grouped by method (one run per seed). Every cell is mean ± the half-width of a 95 %
Student-t interval over seeds, with n; each method with a named baseline gets its paired
per-seed differences (marked significant or not; "interval unavailable" with one seed); the
epoch times get the same treatment, and a cost-robustness plot shows robust accuracy at the
experiment's ε against mean epoch time. The claims section comes from :mod:`pipelines.claims`.

``experiment.json``: ``{"robust_eps": 2, "teacher_modes": {name: mode}, "groups": [{"name",
"mode", "maps": [refs], "baseline": name | null, "runs": [{"seed", "run": dir,
"extra_results": [results.json, ...]}]}]}``; extra results (e.g. AutoAttack on fewer images)
add their attacks to the run's.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from pipelines.claims import Experiment, Group, claims_markdown
from pipelines.report import (
    STRONG_ATTACKS,
    TABLE1_ATTACK,
    RunResult,
    load_run,
    read_results_file,
    save_plot,
)
from pipelines.stats import Interval, fmt, fmt_difference, interval, paired, paired_ratio
from saliency_cache.errors import SatError

TITLES = {
    "table1_pgd5": "Table 1: clean and PGD-5 accuracy (%), mean ± 95 % interval over seeds",
    "table4_other_attacks": "Table 4: other attacks, accuracy (%), mean ± 95 % interval",
    "table6_pgd20_40": "Table 6: stronger PGD attacks, accuracy (%), mean ± 95 % interval",
    "differences": "Differences from each method's baseline (percentage points, paired by seed)",
    "epoch_time": "Epoch time (s), mean ± 95 % interval over seeds",
}


def _bad(path: Path, why: str) -> SatError:
    return SatError(f"{path} is not an experiment file written by `sat compare` ({why})")


def load(path: str | Path) -> tuple[Experiment, list[RunResult]]:
    """The experiment's groups and every run (labelled ``<method> · seed <k>``)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise SatError(f"experiment file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(p, str(e)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list) or not doc["groups"]:
        raise _bad(p, "no groups")
    groups, runs = [], []
    for g in doc["groups"]:
        if not isinstance(g, dict) or not {"name", "mode", "runs"} <= set(g):
            raise _bad(p, f"group {g!r} lacks name, mode or runs")
        results, times, label = {}, {}, None
        for r in g["runs"]:
            run = load_run(r["run"])
            res = {**run.results, "attacks": dict(run.results["attacks"])}
            for extra in r.get("extra_results", []):
                res["attacks"].update(_extra(Path(extra)))
            results[int(r["seed"])] = res
            if run.epoch_time is not None:
                times[int(r["seed"])] = run.epoch_time
            label = label or run.label
            runs.append(RunResult(f"{run.label} · seed {r['seed']}", res, run.epoch_time,
                                  run.run_dir, mode=run.mode or str(g["mode"])))
        if not results:
            raise _bad(p, f"group {g['name']!r} has no runs")
        groups.append(Group(str(g["name"]), label or str(g["name"]), str(g["mode"]),
                            tuple(g.get("maps", [])), g.get("baseline"), results, times))
    labels = [g.label for g in groups]
    for g in groups:  # two students with one paper name (e.g. other options) stay apart
        if labels.count(g.label) > 1:
            g.label = f"{g.label} [{g.name}]"
    exp = Experiment(groups, f"{float(doc.get('robust_eps', 2)):g}", dict(doc.get("teacher_modes", {})),
                     parallel=int(doc.get("parallel", 1)))
    return exp, runs


def _extra(path: Path) -> dict[str, Any]:
    """The attacks of an extra evaluation (AutoAttack) of a run."""
    _, results = read_results_file(path, f"{path} (run `sat compare` again to evaluate)")
    return results["attacks"]


# ---- tables ------------------------------------------------------------------------------------
def _eps_keys(exp: Experiment, attack: str) -> list[str]:
    keys = {e for g in exp.groups for r in g.results.values() for e in r["attacks"].get(attack, {})}
    return sorted(keys, key=float)


def _write(rows: list[list[Any]], header: list[str], cell, csv_cells,
           ns: list[int] | None = None) -> tuple[str, str]:
    """Markdown (``cell(value)``) and CSV (``csv_cells(value)``: mean, ci95 half-width and,
    for differences, significance) of rows of a label and values. ``ns``: an n column (seeds
    behind each row) after the label."""
    head = [header[0], *(["n"] if ns else []), *header[1:]]
    md = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    n_cols = [[str(n)] for n in ns] if ns else [[] for _ in rows]
    md += ["| " + " | ".join([str(r[0]), *n, *(cell(v) for v in r[1:])]) + " |"
           for r, n in zip(rows, n_cols, strict=True)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    suffixes = ["", " ci95", " significant"][: len(csv_cells(None))]
    w.writerow([*head[: len(head) - len(header) + 1], *(f"{h}{s}" for h in header[1:] for s in suffixes)])
    w.writerows([r[0], *n, *(c for v in r[1:] for c in csv_cells(v))]
                for r, n in zip(rows, n_cols, strict=True))
    return "\n".join(md) + "\n", buf.getvalue()


def _acc_csv(iv: Interval | None) -> list[str]:
    if iv is None:
        return ["", ""]
    return [f"{100 * iv.mean:.2f}", "" if iv.half is None else f"{100 * iv.half:.2f}"]


def _diff_csv(iv: Interval | None) -> list[str]:
    if iv is None:
        return ["", "", ""]
    sig = "" if iv.significant is None else str(iv.significant).lower()
    return [*_acc_csv(iv), sig]


def _accuracy_table(exp: Experiment, cols: list[tuple[str, str, str | None]]) -> tuple[str, str]:
    rows, ns = [], []
    for g in exp.groups:
        vals = [g.values(a, e) for _, a, e in cols]
        ns.append(max((len(v) for v in vals), default=0))
        rows.append([g.label, *(interval(list(v.values())) if v else None for v in vals)])
    return _write(rows, ["Method"] + [h for h, _, _ in cols], fmt, _acc_csv, ns)


def build_tables(exp: Experiment) -> dict[str, tuple[str, str]]:
    """The interval tables (Table 1, 4, 6 as in :func:`pipelines.report.build_tables`), the
    paired differences and the epoch times, each (markdown, CSV); empty ones are left out."""
    tables: dict[str, tuple[str, str]] = {}
    eps = _eps_keys(exp, TABLE1_ATTACK)
    if eps:
        cols = [("Clean", "clean", None)] + [(f"ε={e}/255", TABLE1_ATTACK, e) for e in eps]
        tables["table1_pgd5"] = _accuracy_table(exp, cols)
    seen = {a for g in exp.groups for r in g.results.values() for a in r["attacks"]}
    other = sorted(seen - {TABLE1_ATTACK, *STRONG_ATTACKS})
    if other:
        cols = [(f"{a} ε={e}/255", a, e) for a in other for e in _eps_keys(exp, a)]
        tables["table4_other_attacks"] = _accuracy_table(exp, cols)
    strong = [a for a in STRONG_ATTACKS if a in seen]
    if strong:
        cols = [(f"PGD-{a[3:]} ε={e}/255", a, e) for a in strong for e in _eps_keys(exp, a)]
        tables["table6_pgd20_40"] = _accuracy_table(exp, cols)
    diffs = _differences(exp, eps)
    if diffs:
        tables["differences"] = diffs
    timed = [g for g in exp.groups if g.epoch_time]
    if timed:
        tables["epoch_time"] = _epoch_times(exp, timed)
    return tables


def _differences(exp: Experiment, eps: list[str]) -> tuple[str, str] | None:
    cols = [("Δ Clean", "clean", None)] + [(f"Δ PGD-5 ε={e}/255", TABLE1_ATTACK, e) for e in eps]
    cols += [(f"Δ AutoAttack ε={e}/255", "autoattack", e) for e in _eps_keys(exp, "autoattack")]
    rows = []
    for g in exp.groups:
        b = exp.group(g.baseline)
        if b is None:
            continue
        cells = [paired(g.values(a, e), b.values(a, e)) for _, a, e in cols]
        rows.append([f"{g.label} − {b.label}", *cells])
    if not rows:
        return None
    return _write(rows, ["Method − baseline"] + [h for h, _, _ in cols], fmt_difference, _diff_csv)


def _epoch_times(exp: Experiment, timed: list[Group]) -> tuple[str, str]:
    rows = []
    for g in timed:
        b = exp.group(g.baseline)
        base = b.epoch_time if b is not None else {}
        rows.append([g.label, interval(list(g.epoch_time.values())),
                     paired(g.epoch_time, base) if base else None,
                     paired_ratio(g.epoch_time, base) if base else None])

    def cell(v):
        return v if isinstance(v, str) else fmt(v, 1.0, 3)

    md = ["| Method | n | Epoch time (s) | Δ vs baseline (s) | ratio to baseline |",
          "| --- | --- | --- | --- | --- |"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Method", "n", "epoch_time_s", "epoch_time_s ci95", "delta_s", "delta_s ci95",
                "delta significant", "ratio", "ratio ci95"])
    for label, t, d, r in rows:
        dcell = "–" if d is None else fmt_difference(d, 1.0, 3)
        md.append(f"| {label} | {t.n} | {cell(t)} | {dcell} | {cell(r) if r else '–'} |")
        w.writerow([label, t.n, *(_num(t)), *(_num(d)),
                    "" if d is None or d.significant is None else str(d.significant).lower(),
                    *(_num(r))])
    return "\n".join(md) + "\n", buf.getvalue()


def _num(iv: Interval | None) -> list[str]:
    if iv is None:
        return ["", ""]
    return [f"{iv.mean:.4f}", "" if iv.half is None else f"{iv.half:.4f}"]


# ---- plots -------------------------------------------------------------------------------------
def plots(exp: Experiment, out: Path) -> list[str]:
    """``accuracy_vs_eps.png`` (PGD-5 against ε, mean with 95 % error bars per method) and
    ``cost_robustness.png`` (PGD-5 accuracy at the experiment's ε against mean epoch time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bar(values: dict[int, float], scale: float) -> tuple[float, float]:
        iv = interval(list(values.values()))
        return scale * iv.mean, 0.0 if iv.half is None else scale * iv.half

    written = []
    eps = _eps_keys(exp, TABLE1_ATTACK)
    if eps:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for g in exp.groups:
            pts = [(0.0, g.values("clean"))] + [(float(e), g.values(TABLE1_ATTACK, e)) for e in eps]
            pts = [(x, bar(v, 100)) for x, v in pts if v]
            ax.errorbar([x for x, _ in pts], [m for _, (m, _) in pts],
                        yerr=[h for _, (_, h) in pts], marker="o", capsize=3, label=g.label)
        ax.set_xlabel("ε (/255), PGD-5; 0 = clean")
        ax.set_ylabel("accuracy (%), mean ± 95 % interval")
        # Accuracy lies in [0, 100]; a wide interval (few seeds) is cut at the frame rather
        # than stretching the axis until the means cannot be told apart.
        ax.set_ylim(-2, 102)
        ax.set_title("Accuracy under PGD-5 (intervals cut at 0 and 100)")
        written.append(save_plot(fig, ax, out, "accuracy_vs_eps.png"))
    pts = [(g, g.values(TABLE1_ATTACK, exp.robust_eps)) for g in exp.groups if g.epoch_time]
    pts = [(g, v) for g, v in pts if v]
    if pts:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for g, v in pts:
            (x, xe), (y, ye) = bar(g.epoch_time, 1.0), bar(v, 100)
            ax.errorbar([x], [y], xerr=[xe], yerr=[ye], marker="o", capsize=3, label=g.label)
        ax.set_xlabel("mean epoch time (s)")
        ax.set_ylabel(f"PGD-5 accuracy at ε={exp.robust_eps}/255 (%)")
        ax.set_ylim(-2, 102)
        ax.set_xlim(left=0)
        ax.set_title("Cost and robustness (mean ± 95 % interval over seeds)")
        written.append(save_plot(fig, ax, out, "cost_robustness.png"))
    return written


def sections(exp: Experiment) -> list[str]:
    """Markdown after the tables and plots: how to read the intervals, then the claims."""
    seeds = sorted({s for g in exp.groups for s in g.results})
    note = [f"Seeds: {', '.join(map(str, seeds))}. Intervals are 95 % Student-t intervals over "
            "seeds; with one seed there is none (n=1), and a difference then says "
            "\"interval unavailable\".", ""]
    if any(len(g.results) < 2 for g in exp.groups):
        note += ["Some methods ran with one seed: their verdicts are inconclusive.", ""]
    if exp.parallel > 1:
        note += [f"The students trained {exp.parallel} at a time, sharing the machine: their "
                 "epoch times (and the time part of the claims) measure contention too.", ""]
    return note + claims_markdown(exp)
