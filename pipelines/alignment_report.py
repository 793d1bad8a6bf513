"""``sat report``'s test of Etmann et al.'s claim: alignment against distance to the boundary.

One point per evaluated run whose ``results.json`` holds both ``alignments`` and
``boundary`` (see :mod:`pipelines.evaluate`): x = the run's median boundary distance over its
correctly classified images (``boundary.<norm>.median_correct``, pixel units; the median over
all images counts misclassified ones at 0, which would mix clean accuracy into robustness),
y = its mean alignment (``alignments.<form>.mean``),
coloured by training mode. Etmann et al. claim that alignment grows with the distance, so the
statistic is Spearman's rank correlation over the runs, with its two-sided p-value (scipy),
for every alignment form and norm. Runs whose median is undefined (no correct image, or at
least half of them without an adversarial example found) are left out and named.

Written: ``alignment_vs_boundary.png`` (Etmann's form, ``margin_projection``, against the L2
and L∞ medians) and ``alignment_vs_boundary.csv`` (one row per run with all values).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from trainer.attacks.boundary import NORMS
from trainer.attacks.metrics import ALIGNMENT_FORMS

PLOT_FORM = "margin_projection"  # Etmann et al.'s alignment
DISTANCE = "median_correct"  # robustness: median distance over correctly classified images
MIN_RUNS = 3  # fewer points give no meaningful rank correlation


def _value(results: dict[str, Any], *path: str) -> float | None:
    node: Any = results
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    ok = isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node)
    return float(node) if ok else None


def spearman(xs: list[float], ys: list[float]) -> tuple[float | None, float | None]:
    """Spearman's ρ and its two-sided p-value, or (None, None) with fewer than
    :data:`MIN_RUNS` points or a constant variable (ρ undefined)."""
    if len(xs) < MIN_RUNS or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None, None
    from scipy.stats import spearmanr

    res = spearmanr(xs, ys)
    rho, p = float(res.statistic), float(res.pvalue)
    return (rho, p) if math.isfinite(rho) else (None, None)


def alignment_vs_boundary(runs: list[Any], out: Path) -> tuple[list[str], list[str]]:
    """Markdown lines and written plot names for ``runs`` (``pipelines.report.RunResult``:
    ``label``, ``mode``, ``results``); nothing when no run has both measurements."""
    rows = [r for r in runs if "alignments" in r.results and "boundary" in r.results]
    if not rows:
        return [], []
    table = io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(["run", "mode", *[f"{f}_mean" for f in ALIGNMENT_FORMS],
                *[f"{n}_{DISTANCE}" for n in NORMS]])
    for r in rows:
        w.writerow([r.label, r.mode or "", *[_fmt(_value(r.results, "alignments", f, "mean"))
                                             for f in ALIGNMENT_FORMS],
                    *[_fmt(_value(r.results, "boundary", n, DISTANCE)) for n in NORMS]])
    (out / "alignment_vs_boundary.csv").write_text(table.getvalue())
    md = ["## Alignment against distance to the boundary (Etmann et al.)", "",
          "Spearman's rank correlation over runs of mean alignment with the median "
          "boundary distance of the correctly classified images (FAB); Etmann et al. "
          "predict ρ > 0.", "",
          "| alignment form | norm | runs | ρ | p |", "| --- | --- | --- | --- | --- |"]
    for form in ALIGNMENT_FORMS:
        for norm in NORMS:
            pts = _points(rows, form, norm)
            rho, p = spearman([x for x, _, _ in pts], [y for _, y, _ in pts])
            md.append(f"| {form} | {norm} | {len(pts)} | {_fmt(rho, '{:.3f}', '–')} | "
                      f"{_fmt(p, '{:.3g}', '–')} |")
    dropped = sorted({r.label for r in rows for n in NORMS
                      if _value(r.results, "boundary", n, DISTANCE) is None})
    if dropped:
        md += ["", "No median distance (no correct image, or at least half of them not fooled): "
               + ", ".join(dropped)]
    md.append("")
    return md, _plot(rows, out)


def _points(rows: list[Any], form: str, norm: str) -> list[tuple[float, float, Any]]:
    pts = []
    for r in rows:
        x = _value(r.results, "boundary", norm, DISTANCE)
        y = _value(r.results, "alignments", form, "mean")
        if x is not None and y is not None:
            pts.append((x, y, r))
    return pts


def _fmt(v: float | None, spec: str = "{:.6g}", missing: str = "") -> str:
    return missing if v is None else spec.format(v)


def _plot(rows: list[Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({str(r.mode) for r in rows})
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(modes)}
    fig, axes = plt.subplots(1, len(NORMS), figsize=(5.2 * len(NORMS), 4.2), squeeze=False)
    any_point = False
    for ax, norm in zip(axes[0], NORMS, strict=True):
        pts = _points(rows, PLOT_FORM, norm)
        for x, y, r in pts:
            ax.scatter([x], [y], color=colour[str(r.mode)], s=36)
            ax.annotate(r.label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        any_point = any_point or bool(pts)
        rho, p = spearman([x for x, _, _ in pts], [y for _, y, _ in pts])
        stat = "" if rho is None else f" (Spearman ρ={rho:.2f}, p={p:.2g})"
        ax.set_title(f"{norm.upper()}{stat}", fontsize=9)
        ax.set_xlabel(f"median {norm.upper()} distance to the boundary, correct images (FAB)")
        ax.set_ylabel(f"mean alignment ({PLOT_FORM})")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colour[m], label=m) for m in modes]
    axes[0][-1].legend(handles=handles, fontsize=7, title="mode", title_fontsize=7)
    fig.tight_layout()
    written = []
    if any_point:
        fig.savefig(out / "alignment_vs_boundary.png", dpi=120)
        written.append("alignment_vs_boundary.png")
    plt.close(fig)
    return written
