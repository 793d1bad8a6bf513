"""Statistics over seeds: mean ± a Student-t confidence interval, and paired differences.

With n values the interval is mean ± t_{1-a/2, n-1} · s / sqrt(n) (s: the sample standard
deviation, ddof 1). One value has no interval: ``half`` is None and the report says so
instead of printing a number. A paired difference pairs two methods' runs by seed, so the
seed-to-seed variation they share (data order, initialisation) cancels.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and the half-width of its confidence interval (None when n < 2)."""

    mean: float
    half: float | None
    n: int
    confidence: float = CONFIDENCE

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half

    @property
    def significant(self) -> bool | None:
        """Whether the interval excludes 0 (None: no interval, so it cannot be said)."""
        if self.half is None:
            return None
        return self.low > 0 or self.high < 0


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t quantile t_{1-(1-confidence)/2, dof}."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean ± Student-t interval of ``values`` (at least one finite number)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarise")
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return Interval(mean, None, 1, confidence)
    sd = statistics.stdev(vals)
    half = t_quantile(confidence, len(vals) - 1) * sd / math.sqrt(len(vals))
    return Interval(mean, half, len(vals), confidence)


def paired(method: dict[int, float], baseline: dict[int, float],
           confidence: float = CONFIDENCE) -> Interval | None:
    """Interval of ``method[s] - baseline[s]`` over the seeds both have (None: no common seed)."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    return interval([method[s] - baseline[s] for s in seeds], confidence)


def paired_ratio(method: dict[int, float], baseline: dict[int, float],
                 confidence: float = CONFIDENCE) -> Interval | None:
    """Interval of ``method[s] / baseline[s]`` over the common seeds (epoch-time ratios)."""
    seeds = sorted(s for s in set(method) & set(baseline) if baseline[s] > 0)
    if not seeds:
        return None
    return interval([method[s] / baseline[s] for s in seeds], confidence)


def fmt(iv: Interval | None, scale: float = 100.0, digits: int = 2, signed: bool = False,
        mark_single: bool = True) -> str:
    """``mean ± half`` (scaled, e.g. accuracies as percent); one value: ``mean (n=1)``
    (``mean`` alone with ``mark_single=False``, where n is stated beside it)."""
    if iv is None:
        return "–"
    sign = "+" if signed else ""
    m = f"{iv.mean * scale:{sign}.{digits}f}"
    if iv.half is None:
        return f"{m} (n=1)" if mark_single else m
    return f"{m} ± {iv.half * scale:.{digits}f}"


def fmt_difference(iv: Interval | None, scale: float = 100.0, digits: int = 2) -> str:
    """A paired difference with its verdict: ``+3.20 ± 1.10 (significant)``, ``(n.s.)``, or
    ``+3.20 (interval unavailable: one seed)``."""
    if iv is None:
        return "–"
    m = f"{iv.mean * scale:+.{digits}f}"
    if iv.half is None:
        return f"{m} (interval unavailable: one seed)"
    word = "significant" if iv.significant else "n.s."
    return f"{m} ± {iv.half * scale:.{digits}f} ({word})"
