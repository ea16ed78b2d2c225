"""The paper's experiment in miniature: every method on the demo world, three seeds, one command.

What it does: builds the demo world, one teacher and its trajectories, then for each seed a base
student (the student architecture language-model-pretrained on the corpus text, never shown the
protocol), its KD cold start, and every arm below with the same budget and the same small
learning-rate grid, each selected on validation (step 0 included) and evaluated on the test split
with the ARC metrics. Every stage is a step of the demo chain (train.py: demo_world, train_tiny,
teacher_trajectories, cold_start, rl_on_pool, evaluate_on_test) with the recipes of the scale-1
demo (train.PRESETS["scale1"], the default demo before it moved to the larger world); the experiment's own choices are the seeds, the learning-rate grid and KD on
every trajectory (no held-out share). It writes the Markdown table (mean ± std over seeds, paired
differences) and a PNG of the RL arms' curves, and prints its wall time. Every arm × seed lives in
its own directory with a result.json written last: a second run reuses what is finished and redoes
what is not.

Data roles (disjoint; sizes in the printed design): the teacher's trajectories for KD come from the
KD pool of training questions; every RL arm trains on the RL pool, which KD never saw; validation
selects (learning rate, checkpoint); test reports.

Arms (RL: the same steps and rollouts per step; GRPO = prompts × G, PPO = prompts·G prompts × 1):
  Student (base)   the pretrained student, prompted
  Teacher          the demo teacher (one, shared by every seed)
  KD               cold start from the base student on the KD pool's teacher trajectories
  KD continued     KD trained on for as many sequences as an RL arm trains on (the control that
                   separates RL's gain from more training); KD itself competes on validation
  GRPO / PPO from base          RL without a teacher from the base student
  KD → GRPO / KD → PPO          RL without a teacher from KD
  DGPO (GRPO, selective KL)     the project's default: KL(π_θ‖π_T) as a loss on wrong rollouts
  DGPO (GRPO, KL on all)        the same KL on every rollout (the paper's ablation)
  DGPO (PPO, reward penalty)    the paper's form: per-token k1 penalty in the reward of wrong rollouts
  weak KD → DGPO / → GRPO       from an early KD checkpoint, where all-wrong groups are common

What it does not do: tune anything beyond the stated grid, or run on GPUs (it is sized for this
2-core CPU; --preset small is the same pipeline on a handful of questions, for CI).

    python bench/experiment.py --out runs/experiment --readme README.md     # the full table, ≤ 2 hours
    python bench/experiment.py --preset small --out /tmp/exp-small           # seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import ddp  # noqa: E402
import demo  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
import plot  # noqa: E402
import rl  # noqa: E402
import sft  # noqa: E402
import train  # noqa: E402

SupervisedConfig = sft.SupervisedConfig


@dataclass
class Design:
    """Everything that defines the experiment; the presets below are its two sizes. `chain` is what it
    shares with the demo chain (train.DemoPreset: the world and its disjoint question pools, the model
    sizes, the teacher, base-student and KD recipes, the RL settings); the rest is the experiment's own."""
    chain: train.DemoPreset = field(default_factory=train.PRESETS["scale1"])
    seeds: tuple = (0, 1, 2)
    kd_early_step: int = 300         # the weak start: this KD step's checkpoint
    beta_loss: float = 1.0           # β of the KL-as-a-loss arms (exact KL over the vocabulary)
    beta_reward: float = 0.01        # β of the paper's k1 reward penalty (set by arithmetic, not tuned: README)
    lrs: tuple = (3e-4, 1e-3)        # the grid every RL arm and KD-continued gets (it replaces the chain's lr)


PRESETS = {
    "full": Design,
    "small": lambda: Design(
        chain=train.DemoPreset(
            teacher=SupervisedConfig(steps=3, batch_size=4, micro_batch_size=4, lr=3e-3, warmup_steps=1),
            pretrain=SupervisedConfig(steps=2, batch_size=4, micro_batch_size=4, lr=3e-3, warmup_steps=1),
            kd=SupervisedConfig(steps=3, batch_size=4, micro_batch_size=4, lr=3e-3, warmup_steps=1),
            rl=dict(steps=1, prompts_per_step=2, group_size=2, micro_batch_size=8, rollout_batch_size=8,
                    warmup_ratio=0.0, temperature=1.0, max_new_tokens=8, max_turns=1, eval_every=1),
            teacher_size="test", student_size="test", kd_pool=10, rl_pool=8, tgo_keep_wrong=True, max_new_tokens=8,
            eval_limit=6, val_limit=4, eval_batch_size=8),
        seeds=(0, 1), kd_early_step=1),
}

# RL arms: (start model, settings on top of the chain's RL settings). "beta" is filled in from the Design.
ARMS = {
    "GRPO from base": ("base", dict(algo="grpo", teacher_mode="none")),
    "PPO from base": ("base", dict(algo="ppo", teacher_mode="none")),
    "KD → GRPO": ("kd", dict(algo="grpo", teacher_mode="none")),
    "KD → PPO": ("kd", dict(algo="ppo", teacher_mode="none")),
    "DGPO (GRPO, selective KL)": ("kd", dict(algo="grpo", teacher_mode="selective", teacher_as="loss")),
    "DGPO (GRPO, KL on all)": ("kd", dict(algo="grpo", teacher_mode="uniform", teacher_as="loss")),
    "DGPO (PPO, reward penalty)": ("kd", dict(algo="ppo", teacher_mode="selective", teacher_as="reward")),
    "weak KD → DGPO": ("kd_early", dict(algo="grpo", teacher_mode="selective", teacher_as="loss")),
    "weak KD → GRPO": ("kd_early", dict(algo="grpo", teacher_mode="none")),
}
COLUMNS = [("EM", "all", "em"), ("EM 1-hop", "demo_1hop", "em"), ("EM 2-hop", "demo_2hop", "em"),
           ("hit ratio", "all", "hit_substr"), ("searches", "all", "searches"),
           ("probe w/o think", "all", "probe_em_no_think"), ("probe w/ think", "all", "probe_em_think")]


def rl_settings(design: Design, arm: str, lr: float, seed: int) -> rl.RLConfig:
    """One arm's RLConfig: the shared settings, the arm's own, this grid point and seed. PPO runs one
    rollout per prompt on prompts × G prompts, so every arm samples the same number of rollouts."""
    shared = design.chain.rl
    settings = {**shared, **ARMS[arm][1], "lr": lr, "seed": seed}
    settings["beta"] = design.beta_reward if settings.get("teacher_as") == "reward" else design.beta_loss
    if settings["algo"] == "ppo":
        settings["prompts_per_step"] = shared["prompts_per_step"] * shared["group_size"]
        settings["group_size"] = 1
        settings["critic_warmup_ratio"] = 0.0
        settings["critic_lr"] = lr * 10               # the paper's critic/actor ratio (1e-5 / 1e-6)
    return rl.RLConfig(**settings)


# -----------------------------------------------------------------------------
# Units of work: each in its own directory, finished when its result.json exists


class Units:
    """Runs each unit once: a directory with result.json is reused, anything else there is redone."""

    def __init__(self, root: str):
        self.root, self.seconds, self.reused, self.reused_seconds = root, {}, 0, 0.0

    def __call__(self, name: str, compute) -> dict:
        path = os.path.join(self.root, name)
        done = os.path.join(path, "result.json")
        if os.path.isfile(done):
            self.reused += 1
            with open(done) as f:
                result = json.load(f)
            self.reused_seconds += result.get("seconds", 0.0)
            return result
        if os.path.isdir(path):
            shutil.rmtree(path)                      # an unfinished unit: start it again
        t0 = time.time()
        result = compute(path)
        result["seconds"] = round(time.time() - t0, 1)
        self.seconds[name] = result["seconds"]
        os.makedirs(path, exist_ok=True)
        with open(done + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(done + ".tmp", done)
        return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--readme", help="replace the block between the experiment markers of this file")
    ap.add_argument("--png", help="where the curves go (default: OUT/curves.png)")
    args = ap.parse_args(argv)
    started = time.time()
    design = PRESETS[args.preset]()
    os.makedirs(args.out, exist_ok=True)
    units = Units(args.out)
    dist = ddp.Dist()

    chain = design.chain                               # the demo chain's steps (train.py) do every stage
    w = train.demo_world(chain, args.out)
    assert not {q["id"] for q in w.kd_pool} & {q["id"] for q in w.rl_pool}
    sizes = {"corpus": len(w.world.corpus), "kd_pool": len(w.kd_pool), "rl_pool": len(w.rl_pool),
             "validation": len(w.validation), "test": len(w.test), "seeds": list(design.seeds),
             "lrs": list(design.lrs)}
    print(f"design: {json.dumps(sizes)}", flush=True)
    path = lambda *parts: os.path.join(args.out, *parts)          # noqa: E731

    # the teacher: the demo's recipe, on the oracle's correct trajectories of every training question
    def make_teacher(out):
        records = train.oracle_trajectories(w)
        train.train_tiny(w, chain.teacher_size, 1, records, chain.teacher, dist, out, out + "-init", desc="teacher")
        shutil.rmtree(out + "-init")
        return {"oracle_trajectories": len(records)}
    units("teacher", make_teacher)

    teacher_model = models.load_model(path("teacher"), dist, trainable=False)

    def make_tgo(out):
        return {"kept": len(train.teacher_trajectories(w, teacher_model, chain, dist, os.path.join(out, "tgo.jsonl")))}
    tgo_stats = units("tgo", make_tgo)
    tgo = data.load_trajectories(path("tgo", "tgo.jsonl"), vocab_size=len(w.tokenizer),
                                 tokenizer_fingerprint=data.vocab_fingerprint(w.tokenizer))

    def evaluate(model_dir):
        return lambda out: {"report": train.evaluate_on_test(w, model_dir, chain, dist, out)}

    def val_em(model_dir):
        model = models.load_model(model_dir, dist, trainable=False)
        return rl.validation_em(model, w.tokenizer, w.validation, w.retriever, w.greedy, chain.eval_batch_size, dist)

    reports = {"Teacher": {0: units("eval-teacher", evaluate(path("teacher")))["report"]}}
    chosen = {}                                        # (method, seed) -> the selected lr / step / val EM
    for seed in design.seeds:
        s = f"seed{seed}"

        def make_base(out, seed=seed):
            shutil.rmtree(out + "-init", ignore_errors=True)
            train.train_tiny(w, chain.student_size, 100 + seed, demo.corpus_records(w.world, w.tokenizer),
                             dataclasses.replace(chain.pretrain, seed=seed), dist, out, out + "-init", desc="pretrain")
            shutil.rmtree(out + "-init")
            return {}
        units(f"{s}/base", make_base)

        def make_kd(out, seed=seed):          # KD on every trajectory: no held-out share
            cfg = dataclasses.replace(chain.kd, seed=seed)
            model = models.load_model(path(s, "base"), dist, trainable=True)
            train.cold_start(w, model, teacher_model, tgo, cfg, dist, loop.Run(out, stop_after=design.kd_early_step),
                             heldout=False)
            shutil.rmtree(out + "-early", ignore_errors=True)   # left by an interrupted earlier run
            shutil.copytree(out, out + "-early")           # the weak start, a complete checkpoint
            model = models.load_model(out, dist, trainable=True)
            train.cold_start(w, model, teacher_model, tgo, cfg, dist, loop.Run(out, resume=out), heldout=False)
            return {}
        units(f"{s}/kd", make_kd)
        starts = {"base": path(s, "base"), "kd": path(s, "kd"), "kd_early": path(s, "kd-early")}
        start_val = {name: units(f"{s}/val-{name}", lambda out, d=d: {"val_em": val_em(d)})["val_em"]
                     for name, d in starts.items()}

        # KD continued: as many sequences as an RL arm trains on, per grid point; KD itself competes
        sequences = chain.rl["steps"] * chain.rl["prompts_per_step"] * chain.rl["group_size"]
        candidates = {"kd": (start_val["kd"], path(s, "kd"), None)}
        for lr in design.lrs:
            def make_kdc(out, lr=lr, seed=seed):
                cfg = dataclasses.replace(chain.kd, seed=1000 + seed, lr=lr, warmup_steps=0,
                                          steps=max(1, sequences // chain.kd.batch_size))
                model = models.load_model(path(s, "kd"), dist, trainable=True)
                train.cold_start(w, model, teacher_model, tgo, cfg, dist, loop.Run(out), heldout=False)
                return {"val_em": val_em(out)}
            res = units(f"{s}/kd-continued-lr{lr:g}", make_kdc)
            candidates[f"lr{lr:g}"] = (res["val_em"], path(s, f"kd-continued-lr{lr:g}"), lr)
        best = max(candidates.values(), key=lambda c: c[0])    # ties: the first (KD itself, then the lower lr)
        chosen[("KD continued", seed)] = {"lr": best[2], "val_em": best[0]}
        selected = {"Student (base)": path(s, "base"), "KD": path(s, "kd"), "weak KD (start)": path(s, "kd-early"),
                    "KD continued": best[1]}

        for arm, (start, _) in ARMS.items():
            runs = {}
            for lr in design.lrs:
                name = f"{s}/{arm_dir(arm)}-lr{lr:g}"

                def make_rl(out, arm=arm, lr=lr, seed=seed, start=start):
                    cfg = rl_settings(design, arm, lr, seed)
                    summary = train.rl_on_pool(w, starts[start], path("teacher"), cfg, dist, loop.Run(out))
                    return {"summary": summary, "config": dataclasses.asdict(cfg)}
                runs[lr] = units(name, make_rl)
            lr = max(design.lrs, key=lambda x: runs[x]["summary"]["best_val_em"])   # ties: the lower lr
            summary = runs[lr]["summary"]
            chosen[(arm, seed)] = {"lr": lr, "val_em": summary["best_val_em"], "step": summary["best_step"],
                                   "metrics": path(s, f"{arm_dir(arm)}-lr{lr:g}", "metrics.jsonl")}
            selected[arm] = path(s, f"{arm_dir(arm)}-lr{lr:g}", "best")
        for method, model_dir in selected.items():
            reports.setdefault(method, {})[seed] = units(f"{s}/eval-{arm_dir(method)}", evaluate(model_dir))["report"]

    wall = time.time() - started
    errors = {method: {seed: error_kinds(path(f"seed{seed}", f"eval-{arm_dir(method)}", "trajectories.jsonl"))
                       for seed in by_seed} for method, by_seed in reports.items() if method != "Teacher"}
    errors["Teacher"] = {0: error_kinds(path("eval-teacher", "trajectories.jsonl"))}
    markdown = render(design, sizes, tgo_stats, reports, chosen, units, wall, args, errors)
    with open(path("results.md"), "w") as f:
        f.write(markdown + "\n")
    png = args.png or path("curves.png")
    draw_curves(chosen, design, png)
    print(markdown)
    print(f"\nwrote {path('results.md')} and {png}; wall time {wall / 60:.1f} min "
          f"({units.reused} units reused, {len(units.seconds)} run now)")
    if args.readme:
        replace_block(args.readme, markdown)
    return reports


def arm_dir(name: str) -> str:
    """A directory name for a method: 'DGPO (GRPO, KL on all)' -> 'dgpo-grpo-kl-on-all'."""
    keep = "".join(c.lower() if c.isalnum() else "-" for c in name.replace("→", "to"))
    return "-".join(part for part in keep.split("-") if part)


# -----------------------------------------------------------------------------
# The table and the curves


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def cell(reports_by_seed: dict, source: str, metric: str) -> str:
    values = [r[source][metric] for r in reports_by_seed.values() if metric in r.get(source, {})]
    return mean_std(values) if values else "–"


def error_kinds(trajectories_path: str) -> dict:
    """Fractions of questions answered right, wrong with the gold never retrieved, and wrong with the
    gold retrieved (the ARC scores of each trajectory: em, hit_substr)."""
    scores = [row["scores"] for _, row in data.read_jsonl(trajectories_path)]
    n = len(scores)
    return {"right": sum(s["em"] for s in scores) / n,
            "miss": sum(1 for s in scores if not s["em"] and not s["hit_substr"]) / n,
            "read": sum(1 for s in scores if not s["em"] and s["hit_substr"]) / n}


def training_signal(metrics_path: str, last: int = 5) -> dict:
    """What an RL run learned from, read from its metrics.jsonl: the mean training reward and wrong
    fraction per rollout, the fraction of steps whose update had a non-zero gradient, and the
    teacher KL averaged over the first and the last `last` steps (0 for arms without a teacher)."""
    steps = [row for _, row in data.read_jsonl(metrics_path) if "reward" in row]
    kl = [row.get("teacher_kl", 0.0) for row in steps]
    return {"reward": sum(r["reward"] for r in steps) / len(steps),
            "wrong": sum(r["wrong_frac"] for r in steps) / len(steps),
            "moved": sum(1 for r in steps if r.get("grad_norm", 0.0) > 0) / len(steps),
            "kl_first": sum(kl[:last]) / len(kl[:last]), "kl_last": sum(kl[-last:]) / len(kl[-last:])}


def render(design, sizes, tgo_stats, reports, chosen, units, wall, args, errors) -> str:
    order = ["Student (base)", "Teacher", "KD", "KD continued", "weak KD (start)"] + list(ARMS)
    shared = design.chain.rl
    lines = [f"<!-- written by bench/experiment.py --preset {args.preset}; do not edit by hand -->", "",
             f"**The experiment in miniature** — demo world, {len(design.seeds)} seeds "
             f"({', '.join(map(str, design.seeds))}), mean ± std over seeds (the teacher is one model). "
             f"KD pool {sizes['kd_pool']} questions ({tgo_stats['kept']} correct teacher trajectories), RL pool "
             f"{sizes['rl_pool']} questions KD never saw, validation {sizes['validation']}, test {sizes['test']}. "
             f"Every RL arm: {shared['steps']} steps × {shared['prompts_per_step'] * shared['group_size']} "
             f"rollouts, learning rate from {{{', '.join(f'{lr:g}' for lr in design.lrs)}}} and checkpoint "
             f"(every {shared['eval_every']} steps, step 0 included) chosen by validation EM.", "",
             "| method | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for method in order:
        if method in reports:
            lines.append(f"| {method} | " + " | ".join(cell(reports[method], src, m) for _, src, m in COLUMNS) + " |")
    lines += ["", "Paired differences in test EM, per seed (the same base student, data order and sampling):", "",
              "| difference | " + " | ".join(f"seed {s}" for s in design.seeds) + " | mean ± std |",
              "|---|" + "---:|" * (len(design.seeds) + 1)]
    for a, b in [("DGPO (GRPO, selective KL)", "KD"), ("DGPO (GRPO, selective KL)", "KD → GRPO"),
                 ("DGPO (GRPO, selective KL)", "KD continued"), ("weak KD → DGPO", "weak KD → GRPO"),
                 ("DGPO (PPO, reward penalty)", "KD → PPO")]:
        diffs = [reports[a][s]["all"]["em"] - reports[b][s]["all"]["em"] for s in design.seeds]
        lines.append(f"| {a} − {b} | " + " | ".join(f"{d:+.3f}" for d in diffs) + f" | {mean_std(diffs)} |")
    lines += ["", "Where the wrong answers come from (fractions of the test questions, mean over seeds): the gold "
              "answer never appeared in anything the model's own searches retrieved (a retrieval miss), or it did "
              "and the answer was still wrong (a reading error):", "",
              "| method | right | wrong: retrieval miss | wrong: reading error |", "|---|---:|---:|---:|"]
    for method in order:
        if method in errors:
            cells = [mean_std([e[k] for e in errors[method].values()]) for k in ("right", "miss", "read")]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "What the RL arms learned from (their selected runs, every training step; mean over seeds): the "
              "training reward and the fraction of wrong rollouts, the fraction of steps with a non-zero "
              "gradient, and the teacher KL over the first and the last five steps:", "",
              "| method | reward | wrong rollouts | steps with a gradient | teacher KL, first 5 → last 5 |",
              "|---|---:|---:|---:|---:|"]
    for arm in ARMS:
        sig = [training_signal(chosen[(arm, s)]["metrics"]) for s in design.seeds]
        cells = [mean_std([x[k] for x in sig]) for k in ("reward", "wrong", "moved")]
        kl = f"{mean_std([x['kl_first'] for x in sig])} → {mean_std([x['kl_last'] for x in sig])}"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {kl} |")
    lines += ["", "Selected on validation (learning rate, step; validation EM), per seed:", "",
              "| method | " + " | ".join(f"seed {s}" for s in design.seeds) + " |", "|---|" + "---|" * len(design.seeds)]
    for method in ["KD continued"] + list(ARMS):
        cells = []
        for s in design.seeds:
            c = chosen[(method, s)]
            lr = "KD itself" if c["lr"] is None else f"lr {c['lr']:g}"
            cells.append(f"{lr}" + (f", step {c['step']}" if "step" in c else "") + f"; {c['val_em']:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    total = sum(units.seconds.values())
    lines += ["", f"Time on this machine: the whole table from scratch takes "
                  f"{(total + units.reused_seconds) / 60:.1f} min (every unit's time when it ran, summed); "
                  f"this invocation took {wall / 60:.1f} min ({units.reused} finished units reused, "
                  f"{len(units.seconds)} run now, {total / 60:.1f} min of them)."]
    return "\n".join(lines)


def draw_curves(chosen, design, png):
    """Training reward, validation EM and teacher KL of the RL arms' selected runs: mean over seeds, min–max band."""
    groups = {arm: [chosen[(arm, s)]["metrics"] for s in design.seeds] for arm in ARMS}
    plot.plot_metrics(groups, png, keys=["reward", "val_em", "teacher_kl"])


BEGIN, END = "<!-- experiment:begin -->", "<!-- experiment:end -->"


def replace_block(readme: str, markdown: str) -> None:
    """Puts the table between the markers of `readme` (which must hold both), atomically."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no {BEGIN} … {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme + ".tmp", "w", encoding="utf-8") as f:
        f.write(head + BEGIN + "\n" + markdown + "\n" + END + tail)
    os.replace(readme + ".tmp", readme)


if __name__ == "__main__":
    main()
