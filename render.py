"""The docs' numbers, rendered from the records in results/: every table and number-bearing sentence the
README and docs/ state about a run this project made.

What it does: reads the records (records.py; layout in results/README.md) — the default demo's
(results/demo) and the RL study's seeded answer (results/rl_answer) — computes every comparison the
pages report (paired differences with the question-level bootstrap interval and, pooled over seeds, the
seed-level t-interval beside it; discordant counts; McNemar p; error kinds; the smallest detectable
difference) and writes each block between its markers in the pages:

    <!-- render:NAME begin -->            ...rendered text...            <!-- render:NAME end -->

`python render.py` rewrites the pages; `python render.py --check` exits 1 naming each block that differs
from its render (tests/test_render.py runs the check on the committed pages and records).

One convention for discordant counts, everywhere: a comparison "X − Y" lists the questions only X got
right, then those only Y got right ("gained / lost" for X).

What it does not: run anything, or render numbers whose records were not kept (the pages label those).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

import numpy as np

import arc_metric
import records
import stats

REPO = os.path.dirname(os.path.abspath(__file__))
PAGES = ("README.md", "docs/demo.md", "docs/rl_settings.md", "docs/performance.md")
CHECKED = PAGES + ("docs/experiment.md",)    # no measured number outside a rendered or labelled block
MARKER = re.compile(r"<!-- render:([a-z0-9-]+) (begin|end) -->")
REGION = re.compile(r"^\s*<!-- (render:[a-z0-9-]+|unrecorded) (begin|end) -->")
# a measured figure: a number with 2-4 decimals (EM 0.281, +0.039, 30.25), not a version (2.13.0) or an arXiv id
MEASURED = re.compile(r"(?<![\w.])[+−-]?\d+\.\d{2,4}(?![\d.])")
UNRECORDED_LABEL = "Records not kept"
DISCORDANT = "only X right / only Y right, for X − Y"


# -----------------------------------------------------------------------------
# Comparisons


def paired(x: np.ndarray, y: np.ndarray) -> dict:
    """X − Y over the same questions: x, y of shape (N,) or (S, N). The question-level bootstrap interval
    (conditional on the runs), for S > 1 the seed-level t-interval (conditional on the questions), for one
    run the discordant counts (only X right, only Y right) and McNemar's exact p."""
    out = {"questions": stats.paired_difference(y, x), "seeds": None}
    if np.ndim(x) == 2 and len(x) > 1:
        out["seeds"] = stats.seed_interval(y, x)
    else:
        x1, y1 = np.ravel(x), np.ravel(y)
        only_y, only_x = stats.discordant_counts(x1, y1)
        out.update(only_x=only_x, only_y=only_y, p=stats.mcnemar_exact(x1, y1))
    return out


def eos_rule(eos_ends: bool) -> str:
    """The rollout rule a table ran under, in words."""
    return ("an end-of-sequence token ended a rollout (`--eos-ends`)" if eos_ends else
            "Search-R1's rule (an end-of-sequence token is an invalid action and the rollout goes on)")


def p_value(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def share(values, key: str) -> float:
    return float(np.mean([v[key] for v in values]))


# -----------------------------------------------------------------------------
# The default demo (results/demo)


class Demo:
    """The default demo's records: run.json, a row per test question of each model, the RL stage's rows."""

    def __init__(self, path: str):
        self.path = path
        self.run = records.read_json(os.path.join(path, "run.json"))
        self.rows = {name: records.read_rows(os.path.join(path, file))
                     for name, file in self.run["evaluations"].items()}
        self.metrics = records.read_rows(os.path.join(path, "rl_metrics.jsonl.gz"))
        self.reports = {name: records.question_means(rows) for name, rows in self.rows.items()}

    def em(self, name: str) -> float:
        return self.reports[name]["all"]["em"]

    def versus_kd(self, name: str) -> dict:
        x, y = records.paired_scores(self.rows[name], self.rows["KD only"], (name, "KD only"))
        return paired(x, y)


def machine(made: dict) -> str:
    """'AMD EPYC, 2 cores, torch 2.13.0+cpu, 1 thread, commit 314fe9f' — where a run was made."""
    threads = f"{made['threads']} thread" + ("s" if made["threads"] != 1 else "")
    return (f"{made['cpu']}, {made['cores']} cores, no GPU, torch {made['torch']}, {made.get('precision', 'fp32')}, "
            f"{threads}; code at commit "
            f"{made['commit'][:7]}" + (f"; {made['note']}" if made.get("note") else ""))


def demo_em_table(d: Demo) -> str:
    return arc_metric.render_comparison(d.reports, metric="em", title="EM on the demo test split")


def demo_readme(d: Demo) -> str:
    """The README's demo section: where and how long, the EM table, the three-line reading."""
    made, n = d.run["made"], d.reports["KD only"]["all"]["n"]
    rl = versus = d.versus_kd("DGPO")
    q = versus["questions"]
    steps = d.run["rl"]["settings"]["steps"]
    return "\n".join([
        f"On this project's machine ({machine(made)}) `{made['command']}` took "
        f"**{d.run['seconds']['total'] / 60:.1f} minutes** and printed:", "",
        demo_em_table(d), "",
        f"Reading it, with the same run's ARC and paired tables ([docs/demo.md](docs/demo.md#the-other-tables);"
        f" over all {n:,} test questions, where the table's Avg is the unweighted mean of the "
        f"{len(d.reports['KD only']) - 1} sources):", "",
        f"- The base student, never shown the protocol, scores {d.em('Student (base)'):.3f}; the teacher gets "
        f"{d.em('Teacher'):.3f} of the unseen test questions right.",
        f"- The cold start (KD) takes the smaller student from {d.em('Student (base)'):.3f} to "
        f"{d.em('KD only'):.3f}.",
        f"- {steps} DGPO steps then {'add' if q['diff'] >= 0 else 'change test EM by'} "
        f"**{stats.format_difference(q)}** test EM {'over' if q['diff'] >= 0 else 'against'} the KD student "
        f"(paired 95% interval over questions; {rl['only_x']} questions gained, {rl['only_y']} lost; McNemar "
        f"p = {p_value(rl['p'])}) — one run, at RL seed 0, the RL study's tuning seed (the seed its settings "
        f"were chosen on), so not an independent confirmation of them.",
        f"- Every rollout of the run, in training and in evaluation, followed "
        f"{eos_rule(d.run['rl']['settings']['eos_ends'])}.",
    ])


def demo_time(d: Demo) -> str:
    s, made = d.run["seconds"], d.run["made"]
    parts = ", ".join(f"{name} {s[name]:.0f} s" for name in s if name != "total")
    return (f"Measured on this project's machine ({machine(made)}), `{made['command']}`: "
            f"**{s['total'] / 60:.1f} minutes** ({parts}).")


def demo_stages(d: Demo) -> str:
    r, n = d.run, d.reports["KD only"]["all"]
    sources = {k: v["n"] for k, v in d.reports["KD only"].items() if k != "all"}
    return (f"The default run builds the demo world — {r['passages']:,} passages; the scripted oracle's correct "
            f"trajectories on {r['oracle_trajectories']:,} training questions teach the teacher; {n['n']:,} test "
            f"questions (" + ", ".join(f"{v:,} {k}" for k, v in sources.items()) + "; the standard error of a test EM "
            f"is ≤ {math.sqrt(0.25 / n['n']):.3f}); tgo kept the teacher's {r['tgo']['kept']:,} correct of "
            f"{r['tgo']['rollouts']:,} KD-pool rollouts.")


def demo_tables(d: Demo) -> str:
    """Evidence-given EM, the ARC columns and the paired table against KD (this page's convention)."""
    probe = arc_metric.render_comparison(d.reports, metric="probe_em_think",
                                         title="Evidence-given EM, w/ think, on the demo test split")
    columns = ["em", "f1", "hit_substr", "searches", "probe_em_no_think", "probe_em_think", "probe_own_turn",
               "has_answer"]
    arc = ["ARC (all test questions)", "", "| method | " + " | ".join(columns) + " |",
           "|---" + "|---:" * len(columns) + "|"]
    arc += [f"| {name} | " + " | ".join(f"{rep['all'].get(c, float('nan')):.3f}" for c in columns) + " |"
            for name, rep in d.reports.items()]
    pair = ["Paired on the same test questions (95% interval: bootstrap over questions; " + DISCORDANT + ")", "",
            "| X − KD only | questions | EM difference [95% CI] | only X right | only KD right | McNemar p |",
            "|---|---:|---|---:|---:|---:|"]
    for name in d.rows:
        if name != "KD only":
            c = d.versus_kd(name)
            pair.append(f"| {name} | {c['questions']['n']} | {stats.format_difference(c['questions'])} | "
                        f"{c['only_x']} | {c['only_y']} | {p_value(c['p'])} |")
    chosen = d.run["rl"]["chosen"]
    steps = d.run["rl"]["settings"]["steps"]
    how = (f"How the reported checkpoints were selected: Teacher and KD only are the last checkpoints of their "
           f"stages; DGPO is the RL checkpoint with {chosen['rule']} — here step {chosen['step']} of {steps} "
           f"(validation EM {chosen['val_em']:.3f})" + (", i.e. the KD model itself" if chosen["step"] == 0 else "")
           + ". Avg is the unweighted mean over the sources (the paper's Avg); the ARC table's `em` and the paired "
           f"table are over all {d.reports['KD only']['all']['n']:,} questions.")
    return "\n".join([probe, "", *arc, "", *pair, "", how])


def quarters(values: list[float]) -> tuple[float, float]:
    q = max(1, len(values) // 4)
    return float(np.mean(values[:q])), float(np.mean(values[-q:]))


def demo_rl(d: Demo) -> str:
    """What the RL stage did, from its metrics rows."""
    m = d.metrics
    steps = [x for x in m if "reward" in x]
    val = [(x["step"], x["val_em"]) for x in m if "val_em" in x]
    pool = [(x["step"], x["pool_em"]) for x in m if "pool_em" in x]
    probe = [(x["step"], x["probe_reward"], x.get("probe_reward_se")) for x in m if "probe_reward" in x]
    mixed = [x["mixed_groups"] for x in steps]
    no_mixed = sum(1 for v in mixed if v == 0)
    no_grad = sum(1 for x in steps if x.get("grad_norm", 1.0) == 0.0)
    rollouts = d.run["rl"]["settings"]["prompts_per_step"] * d.run["rl"]["settings"]["group_size"]
    line = lambda key: "{:.2f} → {:.2f}".format(*quarters([x[key] for x in steps]))  # noqa: E731
    text = [f"Validation EM " + ", ".join(f"{v:.3f} (step {s})" for s, v in val) +
            f"; step {d.run['rl']['chosen']['step']} was kept (the highest; ties go to the earlier step)."]
    if pool:
        text.append("Greedy EM on the RL-pool questions it evaluates: " + " → ".join(f"{v:.3f}" for _, v in pool)
                    + ".")
    if probe:
        se = [p[2] for p in probe if p[2] is not None]
        text.append("The sampled probe reward on the validation questions: " + " → ".join(f"{p[1]:.3f}" for p in probe)
                    + (f" (standard error ≈ {np.mean(se):.3f})." if se else "."))
    text.append(f"The signal: on average {np.mean(mixed):.2f} of a step's groups had mixed rewards "
                f"({line('mixed_groups')}, first → last quarter), {np.mean([x['nonzero_adv'] for x in steps]):.1f} "
                f"of its {rollouts} rollouts a non-zero advantage; {no_mixed} of the {len(steps)} steps had no mixed "
                f"group and {no_grad} had no gradient at all; the sampled training reward {line('reward')}, the "
                f"teacher KL on the wrong rollouts {line('teacher_kl')} nats a token, the sampled tokens' entropy "
                f"{line('entropy')} nats, searches per rollout {line('searches')} (first → last quarter).")
    return " ".join(text)


def demo_reading(d: Demo) -> str:
    """The 'how to read it' bullets whose numbers come from the demo's records."""
    t, k, dg = (d.reports[n]["all"] for n in ("Teacher", "KD only", "DGPO"))
    c = d.versus_kd("DGPO")
    return "\n".join([
        f"- The base student scores {d.em('Student (base)'):.3f}: pretrained on the corpus text, it has never "
        "seen the protocol.",
        f"- The teacher answers {d.run['tgo']['kept']:,} of its {d.run['tgo']['rollouts']:,} KD-pool questions "
        f"(which it trained on) but {t['em']:.3f} of the unseen test questions. Handed the evidence with its own "
        f"search turn, it answers {t['probe_em_think']:.3f}; forced to answer at once (w/o think), "
        f"{t['probe_em_no_think']:.3f}.",
        f"- The cold start carries the student from {d.em('Student (base)'):.3f} to {k['em']:.3f}, against the "
        f"teacher's {t['em']:.3f}.",
        f"- The RL stage then changed test EM by **{stats.format_difference(c['questions'])}** against the KD "
        f"student ({c['only_x']} questions gained, {c['only_y']} lost; McNemar p = {p_value(c['p'])}); the hit "
        f"ratio (a gold answer in the passages the model's own searches retrieved) {k['hit_substr']:.3f} → "
        f"{dg['hit_substr']:.3f}, evidence-given EM w/ think {k['probe_em_think']:.3f} → "
        f"{dg['probe_em_think']:.3f}, searches {k['searches']:.2f} → {dg['searches']:.2f}. One run, at the RL "
        "study's tuning seed (0).",
    ])


# -----------------------------------------------------------------------------
# The seeded answer (results/rl_answer)


class Answer:
    """The RL study's answer: KD → GRPO and DGPO on the reporting seeds, from one KD student."""

    def __init__(self, path: str):
        self.path = path
        self.run = records.read_json(os.path.join(path, "run.json"))
        read = lambda file: records.read_rows(os.path.join(path, file))  # noqa: E731
        self.kd, self.teacher = read("kd.jsonl.gz"), read("teacher.jsonl.gz")
        self.arms = self.run["arms"]
        self.rows = {}
        for name, arm in self.arms.items():
            best = read(f"{name}/best.jsonl.gz")
            self.rows[name] = {"best": best, "last": best if arm["last_is_best"] else read(f"{name}/last.jsonl.gz"),
                               "metrics": read(f"{name}/metrics.jsonl.gz")}
        self.seeds = self.run["seeds"]

    def em(self, rows: list[dict]) -> float:
        return records.question_means(rows)["all"]["em"]

    def scores(self, arm: str, which: str, key: str = "em") -> np.ndarray:
        """(seeds, N) scores of arm ("grpo", "dgpo", or "kd") at a checkpoint, questions in one order."""
        out = []
        for s in self.seeds:
            rows = self.kd if arm == "kd" else self.rows[f"{arm}-s{s}"][which]
            out.append(records.paired_scores(rows, self.kd, (f"{arm}-s{s}", "kd"), key)[0])
        return np.array(out)


ARM_LABEL = {"grpo": "KD → GRPO", "dgpo": "DGPO"}
COMPARISONS = (("dgpo", "kd"), ("dgpo", "grpo"), ("grpo", "kd"))


def label(arm: str, beta: float) -> str:
    return {"kd": "KD", "grpo": "(KD → GRPO)", "dgpo": f"DGPO β {beta:g}"}[arm]


def answer_arms(a: Answer) -> str:
    """A row per arm and seed: test EM at both checkpoints, the curves' start → end, the signal."""
    beta = a.run["beta"]
    head = ["| arm | test EM, best val (step) | test EM, last | val EM start → end | RL-pool EM start → end | "
            "probe reward start → end | mixed groups | steps without a gradient | entropy, first → last quarter | "
            "teacher KL, first → last quarter |", "|---|---:|---:|---|---|---|---:|---:|---|---|"]
    for arm in ("grpo", "dgpo"):
        for s in a.seeds:
            name = f"{arm}-s{s}"
            rec, m = a.arms[name], a.rows[name]["metrics"]
            steps = [x for x in m if "reward" in x]

            def span(key: str) -> str:
                c = [x[key] for x in m if key in x]
                return f"{c[0]:.3f} → {c[-1]:.3f}" if c else "–"

            def q(key: str) -> str:
                v = [x[key] for x in steps if key in x]
                return "{:.3f} → {:.3f}".format(*quarters(v)) if len(v) >= 4 and any(v) else "–"
            head.append(f"| {ARM_LABEL[arm] + (f' β {beta:g}' if arm == 'dgpo' else '')}, seed {s} | "
                        f"{a.em(a.rows[name]['best']):.3f} ({rec['chosen']['step']}) | {a.em(a.rows[name]['last']):.3f} | "
                        f"{span('val_em')} | {span('pool_em')} | {span('probe_reward')} | "
                        f"{np.mean([x['mixed_groups'] for x in steps]):.2f} | "
                        f"{sum(1 for x in steps if x.get('grad_norm', 1.0) == 0.0)} | {q('entropy')} | {q('teacher_kl')} |")
    return "\n".join(head)


def answer_paired(a: Answer) -> str:
    """Per seed and pooled, at both checkpoints: X − Y with the question-level interval, and pooled the
    seed-level interval beside it; per seed the discordant counts and McNemar p."""
    beta, steps = a.run["beta"], a.run["common"]["steps"]
    lines = [f"| comparison | checkpoints | EM difference, question-level 95% interval | seed-level 95% interval "
             f"(t over seed means) | only X right / only Y right | McNemar p |", "|---|---|---|---|---:|---:|"]
    for which, name in (("best", "best validation"), ("last", f"last (step {steps})")):
        em = {arm: a.scores(arm, which) for arm in ("kd", "grpo", "dgpo")}
        for x, y in COMPARISONS:
            title = f"{label(x, beta)} − {label(y, beta)}"
            for i, s in enumerate(a.seeds):
                c = paired(em[x][i], em[y][i])
                lines.append(f"| seed {s}: {title} | {name} | {stats.format_difference(c['questions'])} | – | "
                             f"{c['only_x']} / {c['only_y']} | {p_value(c['p'])} |")
            c = paired(em[x], em[y])
            lines.append(f"| **{len(a.seeds)} seeds: {title}** | {name} | {stats.format_difference(c['questions'])} | "
                         f"{stats.format_difference(c['seeds'])} | – | – |")
    return "\n".join(lines)


def answer_where(a: Answer) -> str:
    """Where DGPO's gain is, at the last checkpoints: the hit ratio, the error kinds, the gained questions that
    were KD's retrieval misses."""
    beta = a.run["beta"]
    kd = records.question_means(a.kd)["all"]
    kd_error = {(r["source"], r["id"]): r["error"] for r in a.kd}
    hit = {arm: a.scores(arm, "last", "hit_substr") for arm in ("kd", "grpo", "dgpo")}
    per_seed, gained_misses = [], []
    for s in a.seeds:
        rows = a.rows[f"dgpo-s{s}"]["last"]
        means = records.question_means(rows)["all"]
        read = sum(1 for r in rows if r["error"] == "read") / len(rows)
        gained = [r for r in rows if r["error"] == "right" and kd_error[(r["source"], r["id"])] != "right"]
        lost = [r for r in rows if r["error"] != "right" and kd_error[(r["source"], r["id"])] == "right"]
        misses = sum(1 for r in gained if kd_error[(r["source"], r["id"])] == "miss")
        gained_misses.append((len(gained), misses, len(lost)))
        per_seed.append((means, read))
    kd_read = sum(1 for r in a.kd if r["error"] == "read") / len(a.kd)
    fmt = lambda c: f"{stats.format_difference(c['questions'])} (seed-level {stats.format_difference(c['seeds'])})"  # noqa: E731
    return " ".join([
        f"At the last checkpoints, against the KD student on the same test questions: the hit ratio (a gold answer "
        f"in the passages the model's own searches retrieved) {kd['hit_substr']:.3f} → "
        + " / ".join(f"{m['hit_substr']:.3f}" for m, _ in per_seed) + f" for DGPO β {beta:g} on seeds "
        + ", ".join(map(str, a.seeds)) + f" (pooled DGPO − KD {fmt(paired(hit['dgpo'], hit['kd']))}; "
        f"KD → GRPO − KD {fmt(paired(hit['grpo'], hit['kd']))}).",
        f"The reading error (hit but wrong answer): KD {kd_read:.3f}, DGPO "
        + " / ".join(f"{r:.3f}" for _, r in per_seed) + ".",
        "Of the " + " / ".join(str(g) for g, _, _ in gained_misses) + " questions DGPO answered right and KD wrong, "
        + " / ".join(str(m) for _, m, _ in gained_misses) + " were questions on which KD's searches had not found "
        "the answer (retrieval misses); its losses: " + " / ".join(str(x) for _, _, x in gained_misses)
        + " questions.",
        f"Searches per question: KD {kd['searches']:.2f}, DGPO "
        + " / ".join(f"{m['searches']:.2f}" for m, _ in per_seed) + f"; invalid actions per turn: KD "
        f"{kd['invalid_rate']:.3f}, DGPO " + " / ".join(f"{m['invalid_rate']:.3f}" for m, _ in per_seed) + ".",
    ])


def excludes_zero(d: dict | None) -> str:
    if d is None or d.get("differing", 1) == 0 or ("per_seed" in d and max(d["per_seed"]) == min(d["per_seed"])):
        return "cannot say"
    return "excludes 0" if d["low"] > 0 or d["high"] < 0 else "includes 0"


def answer_reading(a: Answer) -> str:
    """What the answer shows, each bullet a computed statement: the sign per seed and whether each interval
    excludes 0, for DGPO − KD, GRPO − KD and DGPO − GRPO, and the sampled probe's movement."""
    beta = a.run["beta"]
    em = {w: {arm: a.scores(arm, w) for arm in ("kd", "grpo", "dgpo")} for w in ("best", "last")}
    out = []
    for x, y, what in (("dgpo", "kd", "The teacher term's gain over the cold start"),
                       ("grpo", "kd", "Plain GRPO's gain over the cold start"),
                       ("dgpo", "grpo", "DGPO against plain GRPO")):
        parts = []
        for w, name in (("best", "best-validation"), ("last", "last")):
            c = paired(em[w][x], em[w][y])
            positive = sum(1 for v in c["seeds"]["per_seed"] if v > 0)
            parts.append(f"at the {name} checkpoints {positive} of {len(a.seeds)} seeds positive, pooled "
                         f"{stats.format_difference(c['questions'])} (question-level interval "
                         f"{excludes_zero(c['questions'])}; seed-level {stats.format_difference(c['seeds'])}, "
                         f"{excludes_zero(c['seeds'])})")
        out.append(f"- **{what}** ({label(x, beta)} − {label(y, beta)}): " + "; ".join(parts) + ".")
    probe = {arm: [[x["probe_reward"] for x in a.rows[f"{arm}-s{s}"]["metrics"] if "probe_reward" in x]
                   for s in a.seeds] for arm in ("grpo", "dgpo")}
    se = [x["probe_reward_se"] for arm in ("grpo", "dgpo") for s in a.seeds
          for x in a.rows[f"{arm}-s{s}"]["metrics"] if "probe_reward_se" in x]
    if all(probe[arm] and all(probe[arm]) for arm in probe):
        out.append("- **The sampled probe** (validation questions, one sample each at the training temperature): "
                   + "; ".join(f"{ARM_LABEL[arm]} " + " / ".join(f"{c[0]:.3f} → {c[-1]:.3f}" for c in probe[arm])
                               for arm in ("grpo", "dgpo"))
                   + (f" (seeds {', '.join(map(str, a.seeds))}; standard error ≈ {np.mean(se):.3f})." if se else "."))
    return "\n".join(out)


def answer_power(a: Answer) -> str:
    """The smallest difference the design detects (80% power, two-sided 5%), from its own per-question scores."""
    em = {arm: a.scores(arm, "last") for arm in ("kd", "grpo", "dgpo")}
    per_seed = [stats.detectable_from_pairs(em["kd"][i], em["dgpo"][i]) for i in range(len(a.seeds))]
    pooled = stats.detectable_from_pairs(em["kd"], em["dgpo"])
    n = em["kd"].shape[1]
    return (f"**Smallest detectable difference** (DGPO − KD at the last checkpoints; two-sided 5% test, 80% power, "
            f"from the design's own per-question differences, `stats.detectable_from_pairs`): on {n:,} paired test "
            f"questions {min(per_seed):.3f}–{max(per_seed):.3f} per seed and {pooled:.3f} pooled over "
            f"{len(a.seeds)} seeds. This is the question-level design: it takes the seeds' runs as given; the "
            f"seed-level interval beside each pooled row is what the spread between seeds allows.")


def answer_summary(a: Answer) -> str:
    """The headline sentence (README and docs/rl_settings.md): DGPO − KD and GRPO, pooled, both intervals."""
    beta, seeds = a.run["beta"], a.seeds
    em = {w: {arm: a.scores(arm, w) for arm in ("kd", "grpo", "dgpo")} for w in ("best", "last")}
    best, last = (paired(em[w]["dgpo"], em[w]["kd"]) for w in ("best", "last"))
    grpo_last = paired(em["last"]["grpo"], em["last"]["kd"])
    positive = sum(1 for v in best["seeds"]["per_seed"] if v > 0)
    grpo_steps = [a.arms[f"grpo-s{s}"]["chosen"]["step"] for s in seeds]
    grpo_text = ("plain GRPO's best-validation checkpoint was the KD student itself (step 0) on every seed"
                 if not any(grpo_steps) else "plain GRPO's best-validation checkpoints were steps "
                 + ", ".join(map(str, grpo_steps)))
    return (f"DGPO (β {beta:g}) − KD **{stats.format_difference(best['questions'])} test EM** (question-level "
            f"95% interval; seed-level {stats.format_difference(best['seeds'])}), pooled over the {len(seeds)} "
            f"reporting seeds ({', '.join(map(str, seeds))}), each run's checkpoint chosen by validation EM with "
            f"step 0 competing; {stats.format_difference(last['questions'])} (seed-level "
            f"{stats.format_difference(last['seeds'])}) at the last checkpoints; {positive} of {len(seeds)} seeds "
            f"positive. {grpo_text[0].upper() + grpo_text[1:]} (its last checkpoints "
            f"{stats.format_difference(grpo_last['questions'])}, seed-level "
            f"{stats.format_difference(grpo_last['seeds'])}). The seeds replicate the RL run only: one world, one "
            f"teacher and one KD student (the default demo's), RL seeds {', '.join(map(str, seeds))}.")


def answer_start(a: Answer) -> str:
    t, k = records.question_means(a.teacher)["all"], records.question_means(a.kd)["all"]
    common = a.run["common"]
    rule = eos_rule(common.get("eos_ends", False))
    seconds = sum(arm["train_seconds"] + arm["test_eval_seconds"] for arm in a.arms.values())
    made = next(iter(a.arms.values()))["made"]
    return (f"Test EM ({k['n']:,} questions) of the KD student {k['em']:.3f} and the teacher {t['em']:.3f}, "
            f"evaluated as the arms are (greedy; {rule} — in training and evaluation alike, so the KD student's "
            f"figures here may differ from the default demo's, which runs Search-R1's rule). β {a.run['beta']:g}: "
            f"{a.run['beta_source']}. The {len(a.arms)} arms took {seconds / 3600:.1f} core-hours "
            f"({machine(made)}; training with its validation, and the test evaluations; wall time of one-thread runs, "
            f"so other jobs sharing the two cores count in it). Records: "
            f"`results/rl_answer/`, made by `{a.run['command']}`.")


# -----------------------------------------------------------------------------
# Speed (results/speed: bench/bench_speed.py's measurements; results/demo_before: the demo before them)


def speed_machine(made: dict, native_bf16: bool, capability: str) -> str:
    return (f"{made['cpu']} ({capability}; {'native' if native_bf16 else 'no native'} bf16), {made['threads']} "
            f"thread{'s' if made['threads'] != 1 else ''}, torch {made['torch']}, commit {made['commit'][:7]}")


def measured(runs: dict[str, dict], part: str) -> list[tuple[str, dict]]:
    """(where it ran, the run) of each speed run that measured `part`, in file order."""
    return [(speed_machine(r["made"], r["native_bf16"], r["cpu_capability"]), r) for r in runs.values() if part in r]


def perf_limit(runs: dict[str, dict]) -> str:
    lines = [f"- {where}: a 1024³ matmul runs at "
             f"**{r['peak']['fp32']:.1f} GFLOP/s in fp32** and {r['peak']['bf16']:.1f} GFLOP/s in bf16"
             + ("" if r["native_bf16"] else " (emulated, measured at 256³)")
             for where, r in measured(runs, "peak")]
    return "\n".join(lines)


def perf_steps(runs: dict[str, dict]) -> str:
    out = []
    for where, r in measured(runs, "steps"):
        out += [f"{where}, `{r['made']['command']}` "
                f"(× old: the arm's speed over fp32 (old) round by round, median [min, max]):", "",
                "| stage | arm | s/step | × old | forward + loss | backward | optimizer | padded | GFLOP/s | of fp32 peak |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {s['stage']} | {s['arm']} | {s['s_per_step']:.3f} | {s['speedup']:.2f} [{s['speedup_min']:.2f}, "
                f"{s['speedup_max']:.2f}] | {s['forward']:.3f} | {s['backward']:.3f} | {s['optimizer']:.3f} | "
                f"{s['padded']:.1%} | {s['gflops']:.1f} | {s['gflops'] / r['peak']['fp32']:.0%} |" for s in r["steps"]]
        out.append("")
    return "\n".join(out).rstrip()


def perf_ops(runs: dict[str, dict]) -> str:
    out = []
    for where, r in measured(runs, "ops"):
        kinds = list(next(iter(r["ops"].values())))
        out += [f"{where} (share of the step's operator "
                "time, torch.profiler):", "", "| step | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        out += [f"| {stage} | " + " | ".join(f"{split[k]:.0%}" for k in kinds) + " |" for stage, split in r["ops"].items()]
        out.append("")
    return "\n".join(out).rstrip()


def perf_decode(runs: dict[str, dict]) -> str:
    out = []
    for where, r in measured(runs, "decode"):
        out += [f"{where}, `{r['made']['command']}`:", "",
                "| model | eval batch | s/question | × batch 64 | EM |", "|---|---:|---:|---|---:|"]
        out += [f"| {d['model']} | {d['batch']} | {d['s_per_question']:.4f} | {d['speedup']:.2f} "
                f"[{d['speedup_min']:.2f}, {d['speedup_max']:.2f}] | {d['em']:.3f} |" for d in r["decode"]]
        out.append("")
    return "\n".join(out).rstrip()


def perf_threads(runs: dict[str, dict]) -> str:
    out = []
    for where, r in measured(runs, "threads"):
        t = r["threads"]
        out.append(f"{where}: a teacher step takes "
                   f"{t['s_per_step_1_thread']:.3f} s at 1 thread alone, {t['s_per_step_2_threads']:.3f} s at 2 threads, "
                   f"and {t['s_per_step_1_thread_beside_another']:.3f} s at 1 thread beside another one-thread process: "
                   f"two one-thread units make {t['steps_per_s_two_1_thread_processes']:.2f} steps/s against "
                   f"{t['steps_per_s_one_2_thread_process']:.2f} for one two-thread unit "
                   f"({t['steps_per_s_two_1_thread_processes'] / t['steps_per_s_one_2_thread_process']:.2f}×).")
    return "\n".join(out)


def perf_summary(runs: dict[str, dict]) -> str:
    """One sentence per measured option, from the runs that measured it."""
    out = []
    for r in runs.values():
        where = f"{r['made']['threads']} thread{'s' if r['made']['threads'] != 1 else ''}"
        by = {(s["stage"], s["arm"]): s for s in r.get("steps", [])}
        if by:
            bucketed = ", ".join(f"{stage} ×{s['speedup']:.2f}" for (stage, arm), s in by.items() if arm == "length-bucketed")
            compiled = ", ".join(f"{stage} ×{s['speedup']:.2f}" for (stage, arm), s in by.items() if arm == "compiled")
            pad = next(s["padded"] for (_, arm), s in by.items() if arm == "fp32 (old)")
            out.append(f"- At {where}: length-bucketed batches — {bucketed} per step (padding "
                       f"{pad:.1%} → {next(s['padded'] for (_, arm), s in by.items() if arm == 'length-bucketed'):.1%})"
                       + (f"; torch.compile of the forward — {compiled}, its compile time counted" if compiled else "")
                       + ".")
        if r.get("decode"):
            best = {d["model"]: d for d in r["decode"] if d["batch"] == 256}
            out.append(f"- At {where}: evaluation in batches of 256 instead of 64 — "
                       + ", ".join(f"{m} ×{d['speedup']:.2f}" for m, d in best.items()) + " per question.")
        if "peak" in r and not r["native_bf16"]:
            out.append(f"- At {where}: bf16 — this CPU has no native bf16, and a bf16 matmul runs at "
                       f"{r['peak']['bf16'] / r['peak']['fp32']:.1%} of fp32's speed, so bf16 is not used here.")
    return "\n".join(out)


def perf_kd_bucketing(path: str, demo: Demo) -> str:
    """The KD control: the demo's KD stage again from its own base, teacher and tgo, batches in the old order
    (b1) and length-bucketed (b16), side by side at one thread; each against the other and the demo's KD."""
    run = records.read_json(os.path.join(path, "run.json"))
    rows = {name: records.read_rows(os.path.join(path, f"{name}.jsonl.gz")) for name in run["arms"]}
    made = run["arms"]["b1"]["made"]
    out = [f"{machine(made)}; `{made['command']}` and the same with `--buckets 16`:", "",
           "| X − Y | EM X | EM Y | X − Y [95% CI] | only X / only Y right | McNemar p |", "|---|---:|---:|---|---|---:|"]
    pairs = [("KD, bucketed (b16)", rows["b16"], "KD, old order (b1)", rows["b1"]),
             ("the demo's KD (bucketed, 2 threads)", demo.rows["KD only"], "KD, bucketed (b16)", rows["b16"]),
             ("the demo's KD (bucketed, 2 threads)", demo.rows["KD only"], "KD, old order (b1)", rows["b1"])]
    for xn, xr, yn, yr in pairs:
        x, y = records.paired_scores(xr, yr, (xn, yn))
        p = paired(x, y)
        out.append(f"| {xn} − {yn} | {x.mean():.3f} | {y.mean():.3f} | {stats.format_difference(p['questions'])} | "
                   f"{p['only_x']} / {p['only_y']} | {p_value(p['p'])} |")
    return "\n".join(out)


def perf_demo(new: Demo, before: Demo) -> str:
    """The demo after the speed settings against the one before: time per stage, and each method's test EM
    paired over the same questions (new − before)."""
    rows = ["| | before | after |", "|---|---:|---:|"]
    for stage in new.run["seconds"]:
        rows.append(f"| {stage} | {before.run['seconds'].get(stage, float('nan')):.0f} s | "
                    f"{new.run['seconds'][stage]:.0f} s |")
    table = ["| method | EM before | EM after | after − before | only after / only before right | McNemar p |",
             "|---|---:|---:|---|---|---:|"]
    for name in ("Teacher", "KD only", "DGPO"):
        x, y = records.paired_scores(new.rows[name], before.rows[name], ("after", "before"))
        p = paired(x, y)
        table.append(f"| {name} | {y.mean():.3f} | {x.mean():.3f} | {stats.format_difference(p['questions'])} | "
                     f"{p['only_x']} / {p['only_y']} | {p_value(p['p'])} |")
    inside = []
    for label_, d in (("before", before), ("after", new)):
        total = {k: sum(r.get(k, 0.0) for r in d.metrics) for k in ("rollout_s", "update_s", "eval_s")}
        inside.append(f"{label_}: rollouts {total['rollout_s']:.0f} s, updates {total['update_s']:.0f} s, "
                      f"evaluations (validation, RL-pool EM, probe) {total['eval_s']:.0f} s")
    return "\n".join([f"Before: {machine(before.run['made'])}, `{before.run['made']['command']}`.",
                      f"After: {machine(new.run['made'])}, `{new.run['made']['command']}`.", "",
                      *rows, "", "Inside the RL stage (its metrics rows): " + "; ".join(inside) + ".", "",
                      *table])


# -----------------------------------------------------------------------------
# Pages


def blocks(results: str) -> dict[str, str]:
    """Every block's text, by name, from the records under `results` (blocks of records not there are left out)."""
    out = {}
    if os.path.isfile(os.path.join(results, "demo", "run.json")):
        d = Demo(os.path.join(results, "demo"))
        out.update({"demo-readme": demo_readme(d), "demo-time": demo_time(d), "demo-stages": demo_stages(d),
                    "demo-tables": demo_tables(d), "demo-rl": demo_rl(d), "demo-reading": demo_reading(d)})
    if os.path.isfile(os.path.join(results, "rl_answer", "run.json")):
        a = Answer(os.path.join(results, "rl_answer"))
        out.update({"answer-summary": answer_summary(a), "answer-start": answer_start(a), "answer-arms": answer_arms(a),
                    "answer-paired": answer_paired(a), "answer-where": answer_where(a),
                    "answer-power": answer_power(a), "answer-reading": answer_reading(a)})
    speed = os.path.join(results, "speed")
    if os.path.isdir(speed):
        runs = {name: records.read_json(os.path.join(speed, name)) for name in sorted(os.listdir(speed))
                if name.endswith(".json")}
        out.update({"perf-summary": perf_summary(runs), "perf-limit": perf_limit(runs), "perf-steps": perf_steps(runs), "perf-ops": perf_ops(runs),
                    "perf-decode": perf_decode(runs), "perf-threads": perf_threads(runs)})
    if os.path.isfile(os.path.join(results, "demo_before", "run.json")) and "demo-readme" in out:
        out["perf-demo"] = perf_demo(Demo(os.path.join(results, "demo")), Demo(os.path.join(results, "demo_before")))
    if os.path.isfile(os.path.join(results, "kd_bucketing", "run.json")) and "demo-readme" in out:
        out["perf-kd-bucketing"] = perf_kd_bucketing(os.path.join(results, "kd_bucketing"),
                                                     Demo(os.path.join(results, "demo")))
    return out


def render_page(text: str, rendered: dict[str, str], where: str = "page") -> str:
    """`text` with every marked block replaced by its render; a marker without its pair, or a block with no
    render, is an error naming the page and the block."""
    out, pos = [], 0
    for match in MARKER.finditer(text):
        name, kind = match.groups()
        if kind == "end":
            continue
        end = text.find(f"<!-- render:{name} end -->", match.end())
        if end < 0:
            raise ValueError(f"{where}: block {name!r} has no end marker")
        if name not in rendered:
            raise ValueError(f"{where}: block {name!r} has no records to render it from (results/README.md)")
        out += [text[pos:match.end()], "\n", rendered[name], "\n"]
        pos = end
    return "".join(out) + text[pos:]


def unlabelled_numbers(text: str, where: str) -> list[str]:
    """Lines outside every rendered block and every `<!-- unrecorded begin/end -->` region that state a measured
    figure, as "page:line: text"; and each unrecorded region whose first line lacks the visible label."""
    problems, region, label_due = [], None, False
    for number, line in enumerate(text.splitlines(), 1):
        mark = REGION.match(line)
        if mark:
            region = mark.group(1) if mark.group(2) == "begin" else None
            label_due = region == "unrecorded"
            continue
        if label_due and line.strip():
            if UNRECORDED_LABEL not in line:
                problems.append(f"{where}:{number}: an unrecorded region must open with '{UNRECORDED_LABEL}'")
            label_due = False
        if region is None and MEASURED.search(line):
            problems.append(f"{where}:{number}: {line.strip()[:100]}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Render the docs' numbers from the records in results/.")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each page that differs")
    p.add_argument("--results", default=os.path.join(REPO, "results"))
    args = p.parse_args(argv)
    rendered, stale = blocks(args.results), []
    for page in PAGES:
        path = os.path.join(REPO, page)
        with open(path) as f:
            text = f.read()
        new = render_page(text, rendered, page)
        if new != text:
            stale.append(page)
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    problems = []
    for page in CHECKED:
        with open(os.path.join(REPO, page)) as f:
            problems += unlabelled_numbers(f.read(), page)
    if problems:
        print("render.py: measured figures with neither records nor a 'Records not kept' label:\n  "
              + "\n  ".join(problems), file=sys.stderr)
    if args.check and stale:
        print("render.py: these pages differ from the render of results/: " + ", ".join(stale)
              + " (run `python render.py`)", file=sys.stderr)
    if problems or (args.check and stale):
        return 1
    print(("rendered: " + ", ".join(stale)) if stale else "every page is its render")
    return 0


if __name__ == "__main__":
    sys.exit(main())
