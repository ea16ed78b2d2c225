"""Paired comparisons of two models on the same questions: the difference, its 95% interval, an
exact test, and the smallest difference a design of this size can detect.

What it does
- `paired_difference(a, b)`: the mean of b − a over the same questions (per-question scores such as
  EM in {0, 1}), with a percentile interval from a paired bootstrap that resamples *questions*.
  Scores of several seeds, shape (S, N) with the same N questions in every row, are pooled: each
  resample draws N question indices and averages the difference over every seed and those
  questions, so the interval counts the spread between questions (the thing a larger test set
  shrinks) and the seeds' own spread through their mean.
- `mcnemar_exact(a, b)`: the exact two-sided McNemar test on binary scores — only the questions on
  which the two disagree carry information: n01 (a wrong, b right) and n10 (a right, b wrong); under
  "no difference" n01 ~ Binomial(n01 + n10, 1/2).
- `detectable_difference(n, discordant)`: the smallest true paired difference that a two-sided
  test at level alpha finds with the given power, for n questions of which a fraction `discordant`
  differ between the two models (normal approximation to McNemar's test):
      MDD = (z_{1−alpha/2} + z_{power}) · sqrt(discordant / n)
  e.g. 1,000 questions with 20% discordant: 0.040 at alpha 0.05 and power 0.8.
  `detectable_from_pairs(a, b)` is the same from a design's observed scores, one seed or several.

What it does not do: multiple-comparison corrections, unpaired comparisons, or anything that is
not a per-question score (numpy and the standard library only; copy the file to reuse it).

Usage:
    import stats
    d = stats.paired_difference(em_kd, em_dgpo)          # arrays of 0/1 over the same questions
    print(f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]", stats.mcnemar_exact(em_kd, em_dgpo))
    stats.detectable_difference(1000, 0.2)               # 0.0396
"""
import math
from statistics import NormalDist

import numpy as np


def _as_runs(scores) -> np.ndarray:
    """Scores as a float array of shape (S, N): S runs (seeds) over the same N questions."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"scores must have shape (N,) or (seeds, N) with N > 0; got {x.shape}")
    return x


def paired_difference(a, b, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> dict:
    """mean(b − a) over the same questions, with a paired-bootstrap percentile interval.

    a, b: per-question scores, shape (N,) or (S, N) — the same questions, in the same order, for
    the same S seeds. Returns {"diff", "low", "high", "n", "seeds"}. Deterministic for a seed.
    """
    a, b = _as_runs(a), _as_runs(b)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape; got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    per_question = (b - a).mean(axis=0)                           # (N,) the seeds' mean per question
    n = per_question.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):                       # blocks keep memory at 1000 × N
        idx = rng.integers(0, n, size=(min(1000, resamples - start), n))
        means[start:start + len(idx)] = per_question[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"diff": float(per_question.mean()), "low": float(low), "high": float(high), "n": n,
            "seeds": a.shape[0]}


def discordant_counts(a, b) -> tuple[int, int]:
    """(n01, n10) of two binary score vectors: questions a got wrong and b right, and the reverse."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two score vectors of one length; got {a.shape} and {b.shape}")
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("McNemar's test needs binary scores (0 or 1)")
    return int(((a == 0) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value: P(a split of the n01 + n10 disagreements at least as uneven
    as the one seen | each disagreement goes either way with probability 1/2). 1.0 with none."""
    n01, n10 = discordant_counts(a, b)
    m, k = n01 + n10, min(n01, n10)
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def detectable_difference(n: int, discordant: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest paired difference a two-sided level-alpha test detects with `power`, for n
    questions of which a fraction `discordant` differ between the two models."""
    if n <= 0 or not 0 <= discordant <= 1:
        raise ValueError(f"need n > 0 and a discordant fraction in [0, 1]; got {n}, {discordant}")
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * math.sqrt(discordant / n)


def detectable_from_pairs(a, b, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest detectable difference of a design, from the per-question scores it produced: a, b
    of shape (N,) or (S, N) as in paired_difference. With d_i = the seeds' mean of b − a on question
    i, the difference's standard error under "no difference" is sqrt(mean(d²)/N), so
    MDD = (z_{1−alpha/2} + z_{power}) · sqrt(mean(d²)/N) — for one seed, mean(d²) is the discordant
    fraction: detectable_difference. It describes the design, so it does not shrink as the observed
    difference grows; it is 0 when the two never differ (then nothing can be said). The seeds' runs
    are taken as given: their training noise enters only through the averaged d_i."""
    a, b = _as_runs(a), _as_runs(b)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape; got {a.shape} and {b.shape}")
    d = (b - a).mean(axis=0)                                      # (N,)
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * math.sqrt(float((d ** 2).mean()) / d.size)


def format_difference(d: dict) -> str:
    """'+0.031 [+0.012, +0.050]' — a difference and its interval, as the tables print it."""
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
