"""``sat report``: many evaluated runs -> the paper's tables (markdown + CSV) and plots (PNG).

- Table 1: clean and PGD-5 accuracy for each method across ε (the paper's Tables 1 and 2);
- Table 4: other attacks (uniform noise, TRADES, saliency) at their budgets;
- Table 6: PGD-20 and PGD-40 across ε;
- ``accuracy_vs_eps.png``: PGD-5 accuracy against ε, one curve per method;
- ``epoch_time.png``: mean epoch time per method (the paper's Fig. 4).

A run directory is one that holds ``eval/results.json`` (written by ``sat eval``); its
``metrics.jsonl`` supplies epoch times.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.common import write_json
from saliency_cache.errors import SatError


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[str, ...]  # run directories (or results.json files)
    out: str  # output directory for tables and plots
    title: str = "Robustness of SAT and baselines"

    def __post_init__(self) -> None:
        if not self.runs:
            raise SatError("no run directories given")


@dataclass
class RunResult:
    label: str
    results: dict[str, Any]
    epoch_time: float | None
    run_dir: Path


def _load_run(path: str) -> RunResult:
    p = Path(path)
    res_path = p if p.is_file() else p / "eval" / "results.json"
    if not res_path.is_file():
        raise SatError(f"no evaluation results in {path} (expected {res_path}; run `sat eval` first)")
    try:
        summary = json.loads(res_path.read_text())
        results = summary["results"]
    except (json.JSONDecodeError, KeyError) as e:
        raise SatError(f"{res_path} is not a results file written by `sat eval` ({e})") from None
    run_dir = res_path.parent.parent if res_path.parent.name == "eval" else res_path.parent
    times = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "epoch_time_s" in row:
                    times.append(float(row["epoch_time_s"]))
    return RunResult(
        label=summary.get("label") or run_dir.name, results=results,
        epoch_time=statistics.mean(times) if times else None, run_dir=run_dir,
    )


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _table(rows: list[list[str]], header: list[str]) -> tuple[str, str]:
    md = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


def _eps_keys(runs: list[RunResult], attack: str) -> list[str]:
    keys: set[str] = set()
    for r in runs:
        keys |= set(r.results.get("attacks", {}).get(attack, {}))
    return sorted(keys, key=float)


def build_tables(runs: list[RunResult]) -> dict[str, tuple[str, str]]:
    tables: dict[str, tuple[str, str]] = {}
    eps = _eps_keys(runs, "pgd5")
    if eps:
        rows = [[r.label, _fmt(r.results.get("clean"))]
                + [_fmt(r.results["attacks"].get("pgd5", {}).get(e)) for e in eps] for r in runs]
        tables["table1_pgd5"] = _table(rows, ["Method", "Clean"] + [f"ε={e}/255" for e in eps])
    other = [a for a in ("uniform", "trades", "saliency", "saliency-map", "fgsm", "autoattack")
             if any(a in r.results.get("attacks", {}) for r in runs)]
    if other:
        cols = [(a, e) for a in other for e in _eps_keys(runs, a)]
        rows = [[r.label] + [_fmt(r.results["attacks"].get(a, {}).get(e)) for a, e in cols] for r in runs]
        tables["table4_other_attacks"] = _table(rows, ["Method"] + [f"{a} ε={e}/255" for a, e in cols])
    strong = [a for a in ("pgd20", "pgd40") if any(a in r.results.get("attacks", {}) for r in runs)]
    if strong:
        cols = [(a, e) for a in strong for e in _eps_keys(runs, a)]
        rows = [[r.label] + [_fmt(r.results["attacks"].get(a, {}).get(e)) for a, e in cols] for r in runs]
        tables["table6_pgd20_40"] = _table(rows, ["Method"] + [f"{a.upper()} ε={e}/255" for a, e in cols])
    return tables


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
            ys = [100 * r.results.get("clean", float("nan"))] + [
                100 * r.results["attacks"].get("pgd5", {}).get(e, float("nan")) for e in eps
            ]
            ax.plot(xs, ys, marker="o", label=r.label)
        ax.set_xlabel("ε (/255), PGD-5; 0 = clean")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy under PGD-5")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_eps.png", dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_eps.png")
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
    runs = [_load_run(r) for r in cfg.runs]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs)
    md = [f"# {cfg.title}", ""]
    titles = {
        "table1_pgd5": "Table 1: clean and PGD-5 accuracy (%)",
        "table4_other_attacks": "Table 4: other attacks, accuracy (%)",
        "table6_pgd20_40": "Table 6: stronger PGD attacks, accuracy (%)",
    }
    for key, (tmd, tcsv) in tables.items():
        md += [f"## {titles[key]}", "", tmd]
        (out / f"{key}.csv").write_text(tcsv)
    align = [(r.label, r.results["alignment"]) for r in runs if "alignment" in r.results]
    if align:
        amd, acsv = _table([[lab, f"{a:.4f}"] for lab, a in align], ["Method", "Alignment"])
        md += ["## Alignment (Etmann et al.)", "", amd]
        (out / "alignment.csv").write_text(acsv)
    plots = _plots(runs, out)
    md += [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")
    summary = {"runs": [str(r.run_dir) for r in runs], "tables": sorted(tables), "plots": plots,
               "out": str(out)}
    write_json(out / "report.json", summary)
    return summary
