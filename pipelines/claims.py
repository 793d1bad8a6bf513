"""The seed papers' claims, each judged from an experiment's runs (never written by hand).

A claim is one small function in :data:`CLAIMS`: given the experiment's groups of runs it
finds the pairs of methods the claim is about and returns one :class:`Finding` per pair,
or an empty list when the experiment holds no such pair (the report then says what the claim
needs). Verdicts come from paired per-seed differences and their 95 % Student-t intervals:

- ``supported``: the interval lies on the side the claim predicts;
- ``contradicted``: it lies on the other side;
- ``inconclusive``: it contains 0, or there is one seed and so no interval.

Every finding quotes robust and clean accuracy together, and says when a robust win comes
mainly through clean accuracy: when the clean gain is at least half the robust gain, the
method may only look robust because its baseline is less accurate to begin with.

Claim 4 (Etmann et al.) is judged by a rank correlation over runs instead of a paired
difference. A new claim is a function ``(Experiment) -> list[Finding]`` appended to :data:`CLAIMS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.stats import (
    CONFIDENCE,
    Interval,
    fmt,
    fmt_difference,
    interval,
    paired,
    paired_ratio,
)

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
SAT_MODES = ("sat", "multi-sat")


@dataclass
class Group:
    """One method of an experiment: its runs by seed, as the report loaded them.

    ``results[seed]`` is a ``results`` mapping of ``results.json`` (accuracies in [0, 1]);
    ``epoch_time[seed]`` the mean epoch time in seconds (missing when not logged).
    """

    name: str
    label: str
    mode: str
    maps: tuple[str, ...]
    baseline: str | None
    results: dict[int, dict[str, Any]]
    epoch_time: dict[int, float] = field(default_factory=dict)

    def values(self, attack: str, eps: str | None = None) -> dict[int, float]:
        """{seed: accuracy} for ``clean`` or an attack at a budget key (e.g. ``"2"``)."""
        out = {}
        for seed, res in self.results.items():
            v = res["clean"] if attack == "clean" else res["attacks"].get(attack, {}).get(eps)
            if v is not None:
                out[seed] = float(v)
        return out


@dataclass
class Experiment:
    groups: list[Group]
    robust_eps: str  # budget key of the PGD-5 accuracy the claims use, e.g. "2"
    teacher_modes: dict[str, str]  # teacher name (prefix of a map reference) -> its mode
    parallel: int = 1  # student runs that trained at once (epoch times share the machine)

    def group(self, name: str | None) -> Group | None:
        return next((g for g in self.groups if g.name == name), None)


@dataclass(frozen=True)
class Finding:
    verdict: str
    subject: str  # "Segmentation Masks vs Original"
    evidence: tuple[str, ...]  # the numbers behind the verdict, one line each


def side(iv: Interval | None, low: float = 0.0, high: float | None = None) -> str:
    """Verdict for an interval that the claim predicts lies above ``low`` (and below
    ``high`` when given)."""
    if iv is None or iv.half is None:
        return INCONCLUSIVE
    if iv.low > low and (high is None or iv.high < high):
        return SUPPORTED
    if iv.high < low or (high is not None and iv.low > high):
        return CONTRADICTED
    return INCONCLUSIVE


def combine(*verdicts: str) -> str:
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return SUPPORTED if all(v == SUPPORTED for v in verdicts) else INCONCLUSIVE


def robust_vs(exp: Experiment, a: Group, b: Group) -> tuple[str, list[str], Interval | None]:
    """PGD-5 (at the experiment's ε) of ``a`` against ``b``: the verdict "a is more robust",
    the evidence lines (robust and clean accuracy of both, the paired differences, AutoAttack
    where both were attacked with it) and the robust difference."""
    eps = exp.robust_eps
    rob = paired(a.values("pgd5", eps), b.values("pgd5", eps))
    clean = paired(a.values("clean"), b.values("clean"))
    lines = []
    for g in (a, b):
        r, c = g.values("pgd5", eps), g.values("clean")
        lines.append(f"{g.label} (n={len(r)}): PGD-5 ε={eps}/255 "
                     f"{fmt(_iv(r), mark_single=False)}, clean {fmt(_iv(c), mark_single=False)}")
    lines.append(f"difference (paired by seed): PGD-5 {fmt_difference(rob)}, "
                 f"clean {fmt_difference(clean)}")
    for e in sorted(set(_aa_keys(a)) & set(_aa_keys(b)), key=float):
        aa = paired(a.values("autoattack", e), b.values("autoattack", e))
        lines.append(f"AutoAttack ε={e}/255: {fmt_difference(aa)}")
    verdict = side(rob)
    if (verdict == SUPPORTED and clean is not None and rob is not None and clean.mean > 0
            and clean.mean >= 0.5 * rob.mean):
        lines.append("the robust gain comes mainly through clean accuracy (the clean gain is at "
                     "least half of it): the baseline may simply be less accurate")
    return verdict, lines, rob


def _iv(values: dict[int, float]) -> Interval | None:
    return interval(list(values.values())) if values else None


def _aa_keys(g: Group) -> list[str]:
    return sorted({e for r in g.results.values() for e in r["attacks"].get("autoattack", {})})


def _against_baseline(exp: Experiment, modes: tuple[str, ...], base_mode: str) -> list[tuple[Group, Group]]:
    """(method, its named baseline) pairs with the method's mode in ``modes`` and the
    baseline's mode ``base_mode``."""
    pairs = []
    for g in exp.groups:
        b = exp.group(g.baseline)
        if g.mode in modes and b is not None and b.mode == base_mode:
            pairs.append((g, b))
    return pairs


# ---- the claims ------------------------------------------------------------------------------
def sat_beats_original(exp: Experiment) -> list[Finding]:
    out = []
    for g, b in _against_baseline(exp, SAT_MODES, "standard"):
        verdict, lines, _ = robust_vs(exp, g, b)
        out.append(Finding(verdict, f"{g.label} vs {b.label}", tuple(lines)))
    return out


def pgd_sat_beats_pgd_cheaper(exp: Experiment) -> list[Finding]:
    """Robust accuracy above PGD's, and an epoch-time ratio inside [0.5, 0.7]."""
    out = []
    for g, b in _against_baseline(exp, ("pgd-sat",), "pgd"):
        rverdict, lines, _ = robust_vs(exp, g, b)
        ratio = paired_ratio(g.epoch_time, b.epoch_time)
        if ratio is None:
            tverdict = INCONCLUSIVE
            lines.append("epoch time: not logged for both")
        else:
            tverdict = side(ratio, 0.5, 0.7)
            lines.append(f"epoch time relative to {b.label}: {fmt(ratio, 1.0, 3)} "
                         f"(claim: 0.5-0.7; {tverdict})")
        out.append(Finding(combine(rverdict, tverdict), f"{g.label} vs {b.label}", tuple(lines)))
    return out


def adversarial_maps_beat_standard(exp: Experiment) -> list[Finding]:
    """Pairs of students with the same mode whose one map comes from the same method of an
    adversarial and of a standard teacher."""
    def split(ref: str) -> tuple[str | None, str]:
        teacher, _, method = ref.partition("/")
        return (exp.teacher_modes.get(teacher), method) if method else (None, ref)

    out = []
    for a in exp.groups:
        for b in exp.groups:
            if a.mode != b.mode or len(a.maps) != 1 or len(b.maps) != 1:
                continue
            (ta, ma), (tb, mb) = split(a.maps[0]), split(b.maps[0])
            if ta == "adversarial" and tb == "standard" and ma == mb:
                verdict, lines, _ = robust_vs(exp, a, b)
                out.append(Finding(verdict, f"{a.label} vs {b.label}", tuple(lines)))
    return out


def sgt_brings_no_robustness(exp: Experiment) -> list[Finding]:
    """Karkehabadi et al. report saliency-guided models *less* robust than standard ones:
    supported when ``sgt`` is significantly less robust than its standard baseline,
    contradicted when significantly more, inconclusive otherwise."""
    pairs = _against_baseline(exp, ("sgt",), "standard")
    if not pairs:  # no named baseline: compare with the experiment's standard student
        std = next((g for g in exp.groups if g.mode == "standard"), None)
        pairs = [(g, std) for g in exp.groups if g.mode == "sgt" and std is not None]
    out = []
    for g, b in pairs:
        more, lines, rob = robust_vs(exp, g, b)
        verdict = {SUPPORTED: CONTRADICTED, CONTRADICTED: SUPPORTED}.get(more, INCONCLUSIVE)
        out.append(Finding(verdict, f"{g.label} vs {b.label}", tuple(
            ln for ln in lines if not ln.startswith("the robust gain"))))
    return out


def alignment_rises_with_robustness(exp: Experiment) -> list[Finding]:
    """Etmann et al.: the more robust a model (the farther its images lie from the decision
    boundary), the better its saliency aligns with the image. Every run (each method's each
    seed) with both measurements is one point: its mean Etmann alignment
    (``alignments.margin_projection.mean``) against its median minimum-norm boundary
    distance over the correctly classified images (``boundary.<norm>.median_correct``). Spearman's ρ over the points, two-sided, at 5 %:
    supported when ρ > 0 significantly, contradicted when ρ < 0 significantly."""
    from pipelines.alignment_report import DISTANCE, MIN_RUNS, PLOT_FORM, spearman
    from trainer.attacks.boundary import NORMS

    out = []
    for norm in NORMS:
        pts = []  # (distance, alignment, group)
        for g in exp.groups:
            for res in g.results.values():
                d = res.get("boundary", {}).get(norm, {}).get(DISTANCE)
                a = res.get("alignments", {}).get(PLOT_FORM, {}).get("mean")
                if isinstance(d, (int, float)) and isinstance(a, (int, float)):
                    pts.append((float(d), float(a), g))
        if len(pts) < MIN_RUNS:
            continue
        rho, pval = spearman([d for d, _, _ in pts], [a for _, a, _ in pts])
        if rho is None:
            verdict = INCONCLUSIVE
        elif pval < 1 - CONFIDENCE:
            verdict = SUPPORTED if rho > 0 else CONTRADICTED
        else:
            verdict = INCONCLUSIVE
        lines = [f"Spearman ρ over {len(pts)} runs: "
                 + ("undefined (a constant variable)" if rho is None else f"{rho:.3f}, p={pval:.3g}")]
        for g in exp.groups:
            mine = [(d, a) for d, a, h in pts if h is g]
            if mine:
                lines.append(f"{g.label} (n={len(mine)}): median {norm.upper()} distance "
                             f"{sum(d for d, _ in mine) / len(mine):.4g}, alignment "
                             f"{sum(a for _, a in mine) / len(mine):.4g} (means over seeds)")
        out.append(Finding(verdict, f"alignment ({PLOT_FORM}) against median {norm.upper()} "
                           "boundary distance of correct images (FAB)", tuple(lines)))
    return out


@dataclass(frozen=True)
class Claim:
    key: str
    statement: str
    source: str
    needs: str  # what the experiment must contain, said when it does not
    judge: Callable[[Experiment], list[Finding]]


CLAIMS: list[Claim] = [
    Claim("sat-beats-original", "SAT with a saliency map is more robust than Original under PGD-5",
          "Mangla et al. 2020, Tables 1-2",
          "a student of mode sat (or multi-sat) whose baseline is a standard student",
          sat_beats_original),
    Claim("pgd-sat-beats-pgd", "PGD-SAT is more robust than PGD, at 50-70 % of its epoch time",
          "Mangla et al. 2020, Tables 1-2 and Fig. 6",
          "a pgd-sat student whose baseline is a pgd student", pgd_sat_beats_pgd_cheaper),
    Claim("adversarial-maps", "maps from an adversarial teacher beat maps from a standard one",
          "Mangla et al. 2020, Table 1",
          "two students of one mode using the same method's map of an adversarial and of a "
          "standard teacher", adversarial_maps_beat_standard),
    Claim("alignment-robustness", "alignment between image and saliency rises with the "
          "distance to the decision boundary", "Etmann et al. 2019",
          "at least 3 runs evaluated with the alignment and boundary-distance measurements",
          alignment_rises_with_robustness),
    Claim("sgt-no-robustness", "saliency-guided training does not bring robustness (less "
          "robust than standard training)", "Karkehabadi et al.",
          "an sgt student and a standard student", sgt_brings_no_robustness),
]


def judge_all(exp: Experiment, claims: list[Claim] | None = None) -> tuple[list[tuple[Claim, list[Finding]]], list[Claim]]:
    """(claims with their findings, claims the experiment cannot judge)."""
    judged, absent = [], []
    for c in CLAIMS if claims is None else claims:
        found = c.judge(exp)
        (judged.append((c, found)) if found else absent.append(c))
    return judged, absent


def claims_markdown(exp: Experiment) -> list[str]:
    """The report's claims section, as markdown lines."""
    judged, absent = judge_all(exp)
    md = ["## Claims", "",
          f"Verdicts at 95 % confidence from paired per-seed differences (PGD-5 at "
          f"ε={exp.robust_eps}/255; accuracies in %).", ""]
    for c, findings in judged:
        md += [f"### {c.statement} ({c.source})", ""]
        for f in findings:
            md.append(f"- **{f.verdict}**: {f.subject}")
            md += [f"  - {line}" for line in f.evidence]
        md.append("")
    if absent:
        md += ["Not evaluable with these runs:", ""]
        md += [f"- {c.statement} ({c.source}): needs {c.needs}" for c in absent]
        md.append("")
    return md
