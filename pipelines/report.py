"""``sat report``: many evaluated runs -> the paper's tables (markdown + CSV) and plots (PNG).

- Table 1: clean and PGD-5 accuracy for each method across ε (the paper's Tables 1 and 2);
- Table 4: other attacks (uniform noise, TRADES, saliency) at their budgets;
- Table 6: PGD-20 and PGD-40 across ε;
- ``accuracy_vs_eps.png``: PGD-5 accuracy against ε, one curve per method;
- ``epoch_time.png``: mean epoch time per method (the paper's Fig. 4);
- ``alignment_vs_boundary.png``: alignment against median boundary distance, with Spearman's
  rank correlation (:mod:`pipelines.alignment_report`).

A run directory is one that holds ``eval/results.json`` (written by ``sat eval``); its
``metrics.jsonl`` supplies epoch times.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.alignment_report import alignment_vs_boundary
from pipelines.common import check_out_dir, write_json
from saliency_cache.errors import SatError


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[str, ...]  # run directories (or results.json files)
    out: str  # output directory for tables and plots
    title: str = "Robustness of SAT and baselines"
    # An experiment.json of `sat compare` (runs grouped by method and seed): tables with
    # intervals over seeds, differences from baselines and the claims (pipelines/experiment_report.py).
    # Its runs replace ``runs``.
    experiment: str | None = None

    def __post_init__(self) -> None:
        if not self.runs and not self.experiment:
            raise SatError("no run directories given")
        check_out_dir(self.out)


@dataclass
class RunResult:
    label: str
    results: dict[str, Any]
    epoch_time: float | None
    run_dir: Path
    mode: str | None = None  # the training mode recorded by `sat eval`


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_results(results: Any, where: Path) -> dict[str, Any]:
    """``results`` of a results.json, or SatError naming what is wrong with it."""
    bad = f"{where} is not a results file written by `sat eval`"
    if not isinstance(results, dict) or not _number(results.get("clean")):
        raise SatError(f"{bad} (results.clean is missing or not a number)")
    attacks = results.get("attacks", {})
    if not isinstance(attacks, dict):
        raise SatError(f"{bad} (results.attacks is not a mapping)")
    for name, by_eps in attacks.items():
        if not isinstance(by_eps, dict):
            raise SatError(f"{bad} (results.attacks.{name} is not a mapping of eps: accuracy)")
        for eps, acc in by_eps.items():
            try:
                float(eps)
            except ValueError:
                raise SatError(f"{bad} (attack {name}: budget {eps!r} is not a number)") from None
            if not _number(acc):
                raise SatError(f"{bad} (attack {name} at {eps}/255: accuracy {acc!r})")
    align = results.get("alignment", 0.0)
    if not isinstance(align, (int, float)) or isinstance(align, bool):
        raise SatError(f"{bad} (results.alignment is not a number)")
    return {**results, "attacks": attacks}


def read_results_file(res_path: Path, missing: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the whole ``results.json`` of ``sat eval``, its checked ``results``); SatError naming
    the file when it is absent (``missing`` says what to do), unreadable or not such a file."""
    if not res_path.is_file():
        raise SatError(f"no evaluation results in {missing}")
    try:
        summary = json.loads(res_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SatError(f"{res_path} is not a results file written by `sat eval` ({e})") from None
    if not isinstance(summary, dict) or "results" not in summary:
        raise SatError(f"{res_path} is not a results file written by `sat eval` (no 'results')")
    return summary, _check_results(summary["results"], res_path)


def load_run(path: str) -> RunResult:
    p = Path(path)
    res_path = p if p.is_file() else p / "eval" / "results.json"
    summary, results = read_results_file(
        res_path, f"{path} (expected {res_path}; run `sat eval` first)")
    run_dir = res_path.parent.parent if res_path.parent.name == "eval" else res_path.parent
    times = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for lineno, line in enumerate(metrics.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    if isinstance(row, dict) and "epoch_time_s" in row:
                        times.append(float(row["epoch_time_s"]))
                except (json.JSONDecodeError, TypeError, ValueError):
                    raise SatError(
                        f"{metrics} line {lineno} is not a metrics row (JSON with a numeric "
                        "epoch_time_s)"
                    ) from None
    return RunResult(
        label=str(summary.get("label") or run_dir.name), results=results,
        epoch_time=statistics.mean(times) if times else None, run_dir=run_dir,
        mode=summary.get("mode"),
    )


def _percent(v: float) -> str:
    return f"{100 * v:.2f}"


def _table(
    rows: list[list[Any]], header: list[str], fmt: Callable[[float], str] = _percent
) -> tuple[str, str]:
    """Markdown and CSV of ``rows`` (a label, then values, None where nothing was measured).

    Values are written with ``fmt`` (accuracies in [0, 1] as percent with two decimals); a
    missing one is "–" in markdown and an empty cell in the CSV, so spreadsheet and pandas
    readers see a missing value.
    """
    md = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    md += ["| " + " | ".join([str(r[0]), *("–" if v is None else fmt(v) for v in r[1:])]) + " |"
           for r in rows]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([r[0], *("" if v is None else fmt(v) for v in r[1:])] for r in rows)
    return "\n".join(md) + "\n", buf.getvalue()


def _eps_keys(runs: list[RunResult], attack: str) -> list[str]:
    keys: set[str] = set()
    for r in runs:
        keys |= set(r.results["attacks"].get(attack, {}))
    return sorted(keys, key=float)


def _acc(r: RunResult, attack: str, eps: str) -> float | None:
    return r.results["attacks"].get(attack, {}).get(eps)


TABLE1_ATTACK = "pgd5"
STRONG_ATTACKS = ("pgd20", "pgd40")
OTHER_ORDER = ("uniform", "trades", "saliency", "saliency-map", "fgsm", "autoattack")


def build_tables(runs: list[RunResult]) -> dict[str, tuple[str, str]]:
    """Table 1 (clean + PGD-5 by ε), Table 4 (every other attack but PGD-20/40 by budget) and
    Table 6 (PGD-20/40 by ε), each as (markdown, CSV); tables with no data are left out."""
    tables: dict[str, tuple[str, str]] = {}
    eps = _eps_keys(runs, TABLE1_ATTACK)
    if eps:
        rows = [[r.label, r.results["clean"]] + [_acc(r, TABLE1_ATTACK, e) for e in eps]
                for r in runs]
        tables["table1_pgd5"] = _table(rows, ["Method", "Clean"] + [f"ε={e}/255" for e in eps])
    seen = {a for r in runs for a in r.results["attacks"]}
    rest = seen - {TABLE1_ATTACK, *STRONG_ATTACKS}
    other = [a for a in OTHER_ORDER if a in rest] + sorted(rest - set(OTHER_ORDER))
    if other:
        cols = [(a, e) for a in other for e in _eps_keys(runs, a)]
        rows = [[r.label] + [_acc(r, a, e) for a, e in cols] for r in runs]
        tables["table4_other_attacks"] = _table(rows, ["Method"] + [f"{a} ε={e}/255" for a, e in cols])
    strong = [a for a in STRONG_ATTACKS if a in seen]
    if strong:
        cols = [(a, e) for a in strong for e in _eps_keys(runs, a)]
        rows = [[r.label] + [_acc(r, a, e) for a, e in cols] for r in runs]
        tables["table6_pgd20_40"] = _table(rows, ["Method"] + [f"PGD-{a[3:]} ε={e}/255" for a, e in cols])
    return tables


def save_plot(fig, ax, out: Path, name: str) -> str:
    """Grid and legend on ``ax``, then ``fig`` written to ``out / name`` (PNG, 120 dpi) and
    closed; returns ``name`` for the report's list of plots."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def _plots(runs: list[RunResult], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    eps = _eps_keys(runs, "pgd5")
    if eps:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in runs:
            xs = [0.0] + [float(e) for e in eps]
            accs = [r.results["clean"]] + [_acc(r, TABLE1_ATTACK, e) for e in eps]
            ys = [float("nan") if a is None else 100 * a for a in accs]
            ax.plot(xs, ys, marker="o", label=r.label)
        ax.set_xlabel("ε (/255), PGD-5; 0 = clean")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy under PGD-5")
        written.append(save_plot(fig, ax, out, "accuracy_vs_eps.png"))
    timed = [r for r in runs if r.epoch_time is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(timed) + 1.5))
        ax.barh([r.label for r in timed], [r.epoch_time for r in timed], color="tab:blue")
        ax.set_xlabel("mean epoch time (s)")
        ax.set_title("Training time per epoch")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "epoch_time.png", dpi=120)
        plt.close(fig)
        written.append("epoch_time.png")
    return written


def run(cfg: ReportConfig) -> dict[str, Any]:
    titles = {
        "table1_pgd5": "Table 1: clean and PGD-5 accuracy (%)",
        "table4_other_attacks": "Table 4: other attacks, accuracy (%)",
        "table6_pgd20_40": "Table 6: stronger PGD attacks, accuracy (%)",
    }
    exp = None
    if cfg.experiment:
        from pipelines import experiment_report

        exp, runs = experiment_report.load(cfg.experiment)
        tables = experiment_report.build_tables(exp)
        titles.update(experiment_report.TITLES)
    else:
        runs = [load_run(r) for r in cfg.runs]
        tables = build_tables(runs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {cfg.title}", ""]
    for key, (tmd, tcsv) in tables.items():
        md += [f"## {titles[key]}", "", tmd]
        (out / f"{key}.csv").write_text(tcsv)
    align = [(r.label, r.results["alignment"]) for r in runs if "alignment" in r.results]
    if align:
        amd, acsv = _table([[lab, a] for lab, a in align], ["Method", "Alignment"], "{:.4f}".format)
        md += ["## Alignment (Etmann et al.)", "", amd]
        (out / "alignment.csv").write_text(acsv)
    plots = _plots(runs, out) if exp is None else experiment_report.plots(exp, out)
    amd, aplots = alignment_vs_boundary(runs, out)
    md += amd
    plots += aplots
    md += [f"![{p}]({p})" for p in plots]
    if exp is not None:
        md += ["", *experiment_report.sections(exp)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    summary = {"runs": [str(r.run_dir) for r in runs], "tables": sorted(tables), "plots": plots,
               "out": str(out)}
    write_json(out / "report.json", summary)
    return summary
