"""Paired comparisons of two models on the same questions: the difference, its 95% interval, an
exact test, and the smallest difference a design of this size can detect.

What it does
- `paired_difference(a, b)`: the mean of b − a over the same questions (per-question scores such as
  EM in {0, 1}), with a percentile interval from a paired bootstrap that resamples *questions*.
  Scores of several seeds, shape (S, N) with the same N questions in every row, are pooled: each
  resample draws N question indices and averages the difference over every seed and those
  questions. The interval is conditional on the runs: it counts the spread between questions (what
  a larger test set shrinks), not the spread between seeds — a shift that moves one whole seed
  moves the estimate but does not widen the interval.
- `seed_interval(a, b)`: the other interval for pooled seeds, conditional on the questions: a
  Student-t interval over the S seeds' mean differences, mean ± t_{S−1} · sd / √S. It widens with
  the spread between seeds (what more seeds shrink). A t-interval rather than a bootstrap over seeds:
  with 3 seeds a bootstrap has 10 distinct resamples and can never reach past the seeds' range.
  What a seed replicates (the RL run only, or the whole chain) is the caller's to say.
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
    a, b = _paired_runs(a, b)
    _check_confidence(confidence)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a whole number ≥ 1; got {resamples!r}")
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
            "seeds": a.shape[0], "differing": int(np.count_nonzero(per_question))}


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| ≤ t) = confidence for Student's t with `df` (a whole number ≥ 1) degrees of freedom:
    the closed-form distribution of integer df (Abramowitz & Stegun 26.7.3–4), inverted by bisection."""
    _check_confidence(confidence)
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a whole number ≥ 1; got {df!r}")

    def central(t: float) -> float:                               # P(|T| ≤ t)
        theta = math.atan(t / math.sqrt(df))
        c, s_ = math.cos(theta), math.sin(theta)
        if df % 2:                                                # odd: 2/π (θ + sin θ Σ …)
            term, total = c, c if df > 1 else 0.0
            for k in range(3, df, 2):
                term *= (k - 1) / k * c * c
                total += term
            return 2 / math.pi * (theta + s_ * total)
        term, total = 1.0, 1.0                                    # even: sin θ (1 + Σ …)
        for k in range(2, df, 2):
            term *= (k - 1) / k * c * c
            total += term
        return s_ * total
    low, high = 0.0, 1.0
    while central(high) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if central(mid) < confidence else (low, mid)
    return (low + high) / 2


def seed_interval(a, b, confidence: float = 0.95) -> dict | None:
    """mean(b − a) with a Student-t interval over the seeds: each seed's mean difference over the same N
    questions, mean ± t_{S−1} · sd / √S (sd with S − 1). a, b of shape (S, N); None for one seed (no spread
    to measure). Returns {"diff", "low", "high", "seeds", "per_seed": [each seed's mean difference]}."""
    a, b = _paired_runs(a, b)
    _check_confidence(confidence)
    per_seed = (b - a).mean(axis=1)                               # (S,)
    s = per_seed.size
    if s < 2:
        return None
    half = t_quantile(confidence, s - 1) * float(per_seed.std(ddof=1)) / math.sqrt(s)
    mean = float(per_seed.mean())
    return {"diff": mean, "low": mean - half, "high": mean + half, "seeds": s,
            "per_seed": [float(x) for x in per_seed]}


def _paired_runs(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_runs(a), _as_runs(b)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape (the same seeds and questions); got {a.shape} and "
                         f"{b.shape}")
    return a, b


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")


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
    a, b = _paired_runs(a, b)
    d = (b - a).mean(axis=0)                                      # (N,)
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * math.sqrt(float((d ** 2).mean()) / d.size)


def format_difference(d: dict | None) -> str:
    """'+0.031 [+0.012, +0.050]' — a difference and its interval, as the tables print it; a bootstrap over
    questions none of which differ says so ('+0.000 (no question differs)'), and so does a seed interval over
    seeds that agree exactly ('(every seed the same)'), since a zero-width interval is no certainty; '–' for no
    interval (seed_interval of one seed)."""
    if d is None:
        return "–"
    if d.get("differing", 1) == 0:
        return f"{d['diff']:+.3f} (no question differs)"
    if "per_seed" in d and max(d["per_seed"]) == min(d["per_seed"]):
        return f"{d['diff']:+.3f} (every seed the same)"
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
