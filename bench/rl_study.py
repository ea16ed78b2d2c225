"""The RL settings study and the seeded answer of docs/rl_settings.md, from one demo run's KD student.

What it does: takes the world, the teacher and the KD student a `python train.py demo` run wrote, and
runs RL arms from that KD student on the demo's RL pool (the training questions KD never saw), each
a `train.py rl` subprocess at one thread with the instruments on (validation EM, the sampled probe
reward with its standard error, greedy EM on the RL pool, mixed-group fraction, zero-gradient
steps). Each finished arm is evaluated on the test split twice — its best-validation checkpoint
(step 0 included) and its last — and compared with the KD student on the same questions: the paired
EM difference with its 95% bootstrap interval (stats.paired_difference) and the exact McNemar p.

  --part study    the levers on the tuning seed (seed 0), which the answer does not use
  --part forms    β of the two other teacher forms (KL on all rollouts; PPO's reward penalty) on the same
                  seed and budget, for the experiment (bench/experiment.py)
  --part capacity the capacity question: a student of the teacher's size, pretrained and distilled as
                  the demo makes its student, then KD → GRPO and DGPO β 0.1 from it at the tuning seed
  --part long     KD → GRPO and DGPO β 0.1 for 200 steps, DGPO for 400, at the tuning seed: where does
                  validation EM level off?
  --part answer   KD → GRPO and DGPO (β chosen on the study: the DGPO arm with the best validation
                  EM at seed 0) on seeds 1, 2, 3, and the paired differences per seed and pooled
                  (each question's EM averaged over the seeds, resampled by question)

Every arm lives in --out/<arm>/ (the RL run, its log, eval-best/ and eval-last/); an interrupted arm
resumes from its last checkpoint (--save-every), a finished one is reused. The tables go to
--out/<part>.md and stdout.

What it does not: train the teacher or the KD student (run the demo first), tune anything outside
the grids below, or run on GPU.

    python train.py demo --out runs/demo                                     # world, teacher, KD
    python bench/rl_study.py --demo runs/demo --out runs/rl_study --part study --jobs 2
    python bench/rl_study.py --demo runs/demo --out runs/rl_study --part answer --jobs 2
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import checkpoint  # noqa: E402
import data  # noqa: E402
import ddp  # noqa: E402
import demo  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
import retriever as retriever_lib  # noqa: E402
import records  # noqa: E402
import rl  # noqa: E402
import rollout  # noqa: E402
import stats  # noqa: E402
import train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every arm: 100 steps × 8 questions = 800 distinct RL-pool questions (the scale-2 demo's pool has
# 1,020), so no question is seen twice; G = 8 at T = 1.0 gives the KD student mixed groups often
# enough that most steps carry a policy gradient (docs/usage.md, "Signal in every step").
COMMON = dict(steps=100, prompts_per_step=8, group_size=8, temperature=1.0, lr=3e-4, warmup_ratio=0.1,
              micro_batch_size=16, rollout_batch_size=64, max_new_tokens=64, eval_every=25, save_every=25,
              probe_samples=1, pool_eval_limit=200, eos_ends=True)
# eos_ends: the study ran while an eos still ended a rollout (now Search-R1's invalid action is the
# default); every part keeps that rule, in training and in evaluate(), so that its arms compare
GRPO = dict(teacher_mode="none")
STUDY = {                       # arm: settings over COMMON, all at the tuning seed 0, run in this order
    "grpo": GRPO,
    "dgpo-b0.1": dict(beta=0.1),
    "dgpo-b1": dict(beta=1.0),
    "dgpo-b0.01": dict(beta=0.01),
    "grpo-drop": dict(GRPO, drop_constant_groups=True),
    "grpo-G16-p4": dict(GRPO, group_size=16, prompts_per_step=4),     # the same 64 rollouts a step
    "grpo-G4-p16": dict(GRPO, group_size=4, prompts_per_step=16),     # 1,600 draws: the pool seen ~1.6 times
    "grpo-T0.7": dict(GRPO, temperature=0.7),
    "grpo-lr1e-3": dict(GRPO, lr=1e-3),
    "grpo-T0.7-G4": dict(GRPO, temperature=0.7, group_size=4),        # the old demo's starved setting
    "grpo-lr1e-4": dict(GRPO, lr=1e-4),
    "ppo": dict(GRPO, algo="ppo"),                                    # critic lr 1e-5 with warm-up (the paper's)
    "ppo-critic3e-4": dict(GRPO, algo="ppo", critic_lr=3e-4),         # the critic at the actor's lr
}
# β of the two other teacher forms the experiment compares, chosen by the same rule (BETA_RULE) on the
# same seed and budget: KL(π_θ‖π_T) as a loss on every rollout, and the paper's k1 penalty in the reward
# of wrong rollouts under PPO (the paper's β 0.001 and a decade either side)
FORMS = {
    "dgpo-all-b0.01": dict(teacher_mode="uniform", beta=0.01),
    "dgpo-all-b0.1": dict(teacher_mode="uniform", beta=0.1),
    "dgpo-all-b1": dict(teacher_mode="uniform", beta=1.0),
    "ppo-pen-b0.001": dict(algo="ppo", teacher_as="reward", beta=0.001),
    "ppo-pen-b0.01": dict(algo="ppo", teacher_as="reward", beta=0.01),
    "ppo-pen-b0.1": dict(algo="ppo", teacher_as="reward", beta=0.1),
}
TUNING_SEED, ANSWER_SEEDS = 0, (1, 2, 3)
# the capacity question: the same two arms from a KD student of the teacher's size (tuning seed)
CAPACITY = {"cap-grpo": GRPO, "cap-dgpo-b0.1": dict(beta=0.1)}
# the budget question: the same two arms (β as chosen) for twice the steps, 1,600 draws from the 1,020-question
# pool (each question seen about 1.6 times), to see whether validation EM levels off or keeps rising; the
# probe with 4 samples per validation question (measured standard error 0.017 against 0.019 with one: the
# samples of one question are correlated). DGPO, still rising at 200, once more at 400 steps (3,200 draws:
# each pool question about 3 times; its warm-up, 10% of the run, is 40 steps)
LONG = {"grpo-long": dict(GRPO, steps=200, probe_samples=4),
        "dgpo-b0.1-long": dict(beta=0.1, steps=200, probe_samples=4),
        "dgpo-b0.1-400": dict(beta=0.1, steps=400, probe_samples=4)}


def flags(settings: dict) -> list[str]:
    """{"group_size": 8, "drop_constant_groups": True} → ["--group-size", "8", "--drop-constant-groups"]."""
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [f"--no-{key.replace('_', '-')}"] if value is False else [flag, str(value)]
    return out


def write_pool(demo_dir: str, kd_pool: int, out: str) -> str:
    """The RL pool: the demo's training questions after the first `kd_pool` (the ones KD learnt from)."""
    path = os.path.join(out, "rl_pool.jsonl")
    with open(os.path.join(demo_dir, "data", "train.jsonl")) as f:
        rows = f.readlines()[kd_pool:]
    if not rows:
        raise ValueError(f"--demo {demo_dir}: no training questions after the KD pool's {kd_pool}")
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)
    return path


def run(cmd: list[str], log: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{cmd[1:3]} failed (exit {done.returncode}); see {log}")


def train_arm(arm_dir: str, settings: dict, seed: int, demo_dir: str, pool: str, student: str | None = None) -> None:
    """The RL run from `student` (default: the demo's KD student), resumed from its last checkpoint if one
    exists; nothing to do if it finished."""
    run_dir = os.path.join(arm_dir, "run")
    if os.path.isfile(os.path.join(arm_dir, "trained")):
        return
    os.makedirs(arm_dir, exist_ok=True)
    data = os.path.join(demo_dir, "data")
    cmd = [sys.executable, "train.py", "rl", "--student", student or os.path.join(demo_dir, "kd"),
           "--teacher", os.path.join(demo_dir, "teacher"), "--data", pool,
           "--val", os.path.join(data, "validation.jsonl"), "--corpus", os.path.join(data, "corpus.jsonl"),
           "--out", run_dir, "--seed", str(seed)] + flags({**COMMON, **settings})
    has_state = checkpoint.resumable_step(run_dir) is not None
    made = os.path.join(arm_dir, "provenance.json")
    if not has_state or not os.path.isfile(made):       # what the run is made from, recorded when it starts
        records.write_json(made, records.provenance(" ".join(cmd[1:]), threads=1, inputs={
            "student": os.path.join(student or os.path.join(demo_dir, "kd"), "model.safetensors"),
            "teacher": os.path.join(demo_dir, "teacher", "model.safetensors"), "pool": pool,
            "validation": os.path.join(data, "validation.jsonl")}))
    run(cmd + (["--resume", run_dir] if has_state else ["--overwrite"]), os.path.join(arm_dir, "log.txt"))
    open(os.path.join(arm_dir, "trained"), "w").close()


def evaluate(model: str, demo_dir: str, out: str, log: str) -> dict[str, float]:
    """Greedy EM per test question id (the eval stage resumes a half-written --out by itself)."""
    path = os.path.join(out, "trajectories.jsonl")
    if not os.path.isfile(os.path.join(out, "report.json")):
        data = os.path.join(demo_dir, "data")
        t0 = time.time()
        run([sys.executable, "train.py", "eval", "--model", model, "--data", os.path.join(data, "test.jsonl"),
             "--corpus", os.path.join(data, "corpus.jsonl"), "--out", out, "--no-probe", "--batch-size", "64",
             "--no-progress"] + flags({k: COMMON[k] for k in ("max_new_tokens", "eos_ends")}), log)
        records.write_json(os.path.join(out, "seconds.json"), {"eval": round(time.time() - t0, 1)})
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return {r["id"]: r["scores"]["em"] for r in rows}


def arm_result(arm_dir: str, demo_dir: str) -> dict:
    """The arm's test EM per question (best-validation and last checkpoint) and its training curves.
    When the best checkpoint is the last one (the same weight file, byte for byte), it is evaluated once."""
    run_dir, log = os.path.join(arm_dir, "run"), os.path.join(arm_dir, "log.txt")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    best_dir = os.path.join(run_dir, "best")
    best = evaluate(best_dir, demo_dir, os.path.join(arm_dir, "eval-best"), log)
    weights = "model.safetensors"
    same = filecmp.cmp(os.path.join(best_dir, weights), os.path.join(run_dir, weights), shallow=False)
    last = best if same else evaluate(run_dir, demo_dir, os.path.join(arm_dir, "eval-last"), log)
    return {"best": best, "last": last, "metrics": metrics}


def do_arm(name: str, settings: dict, seed: int, args, student: str | None = None) -> dict:
    arm_dir = os.path.join(args.out, name)
    t0 = time.time()
    train_arm(arm_dir, settings, seed, args.demo, args.pool, student)
    result = arm_result(arm_dir, args.demo)
    print(f"{name}: done ({time.time() - t0:.0f} s this call)", flush=True)
    return result


def write_answer_records(args, arms: dict, beta: float, beta_given: bool) -> None:
    """--part answer's records into --records (layout: results/README.md): run.json (the design, β and where
    it came from, each arm's settings, provenance, chosen checkpoint and seconds), the KD student's and the
    teacher's test rows, and per arm its metrics rows and the test rows of its best and last checkpoints."""
    out = args.records
    evaluations = {"kd": "kd-eval", "teacher": "teacher-eval"}
    for name, folder in evaluations.items():
        records.write_rows(os.path.join(out, f"{name}.jsonl.gz"),
                           records.question_rows(os.path.join(args.out, folder, "trajectories.jsonl")))
    arm_records = {}
    for name, (settings, seed) in arms.items():
        arm_dir, run_dir = os.path.join(args.out, name), os.path.join(args.out, name, "run")
        summary, metrics = records.rl_run_record(run_dir)
        records.write_rows(os.path.join(out, name, "metrics.jsonl.gz"), metrics)
        last_is_best = not os.path.isdir(os.path.join(arm_dir, "eval-last"))
        eval_seconds = 0.0
        for which in ("best",) + (() if last_is_best else ("last",)):
            folder = os.path.join(arm_dir, f"eval-{which}")
            records.write_rows(os.path.join(out, name, f"{which}.jsonl.gz"),
                               records.question_rows(os.path.join(folder, "trajectories.jsonl")))
            eval_seconds += records.read_json(os.path.join(folder, "seconds.json"))["eval"]
        arm_records[name] = {**summary, "seed": seed, "arm": settings, "last_is_best": last_is_best,
                             "test_eval_seconds": round(eval_seconds, 1),
                             "made": records.read_json(os.path.join(arm_dir, "provenance.json"))}
    records.write_json(os.path.join(out, "run.json"), {
        "kind": "rl_answer", "command": "python bench/rl_study.py " + " ".join(sys.argv[1:]),
        "common": COMMON, "tuning_seed": TUNING_SEED, "seeds": list(ANSWER_SEEDS), "beta": beta,
        "beta_rule": BETA_RULE, "beta_source": ("given with --beta: chosen by the rule in an earlier run of "
                                                "--part study, whose records were not kept") if beta_given else
        "chosen by the rule from the study's arms in " + args.out,
        "kd_pool": args.kd_pool, "evaluations": {name: f"{name}.jsonl.gz" for name in evaluations},
        "eval_seconds": {name: records.read_json(os.path.join(args.out, folder, "seconds.json"))["eval"]
                         for name, folder in evaluations.items()},
        "demo": {name: records.fingerprint(os.path.join(args.demo, name, "model.safetensors"))
                 for name in ("teacher", "kd")},
        "arms": arm_records})


def curve(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in metrics if key in m]


def summary_row(name: str, result: dict, kd: dict[str, float], settings: dict, pool_size: int) -> str:
    """One arm: test EM (best-val / last), the paired difference of best-val against KD, the questions it
    drew from the pool of `pool_size`, and the curves' start → end of validation EM, RL-pool EM and the
    probe reward, plus the signal it trained on."""
    m = result["metrics"]
    steps = [x for x in m if "reward" in x]
    drawn = rl.questions_drawn(steps, {**COMMON, **settings}["prompts_per_step"])
    keys = sorted(kd)
    a = np.array([kd[k] for k in keys])
    best, last = (np.array([result[which][k] for k in keys]) for which in ("best", "last"))
    diff = stats.paired_difference(a, best)
    val, pool, probe = curve(m, "val_em"), curve(m, "pool_em"), curve(m, "probe_reward")
    best_step = max(val, key=lambda sv: (sv[1], -sv[0]))[0] if val else "-"

    def span(c):
        return f"{c[0][1]:.3f} → {c[-1][1]:.3f}" if c else "-"
    mixed = np.mean([x.get("mixed_groups", float("nan")) for x in steps])
    no_grad = sum(1 for x in steps if x.get("grad_norm", 1.0) == 0.0)
    return (f"| {name} | {best.mean():.3f} (step {best_step}) | {last.mean():.3f} | "
            f"{stats.format_difference(diff)} | {drawn:,} ({drawn / pool_size:.1f}) | {span(val)} | {span(pool)} | {span(probe)} | {mixed:.2f} | {no_grad} | "
            f"{quarters(steps, 'entropy')} | {quarters(steps, 'teacher_kl')} |")


def quarters(steps: list[dict], key: str) -> str:
    """The mean of a per-step metric over the first and the last quarter of the run: "0.240 → 0.262"
    ("-" when the run did not compute it: fewer than 4 steps, or a teacher KL of 0 in an arm without a teacher)."""
    values = [x[key] for x in steps if key in x]
    if len(values) < 4 or not any(values):
        return "-"
    q = len(values) // 4
    return f"{np.mean(values[:q]):.3f} → {np.mean(values[-q:]):.3f}"


HEADER = ("| arm | test EM, best val | test EM, last | best − KD [95% CI] | questions drawn (× pool) | "
          "val EM start → end | RL-pool EM start → end | probe reward start → end | mixed groups | no-grad steps | "
          "entropy, first → last quarter | teacher KL, first → last quarter |\n"
          "|---|---:|---:|---|---:|---|---|---|---:|---:|---|---|")


PAIRED_HEADER = ("| comparison X − Y | questions | EM difference, question-level 95% interval | seed-level 95% "
                 "interval | only X right | only Y right |\n|---|---:|---|---|---:|---:|")


def answer_arms(beta: float) -> dict[str, tuple[dict, int]]:
    """--part answer's arms: KD → GRPO and DGPO (β as chosen) on each reporting seed, never the tuning seed."""
    arms = {}
    for seed in ANSWER_SEEDS:
        arms[f"grpo-s{seed}"] = (GRPO, seed)
        arms[f"dgpo-s{seed}"] = (dict(beta=beta), seed)
    return arms


def paired_row(label: str, a: np.ndarray, b: np.ndarray) -> str:
    """b − a over the same questions, a and b of shape (N,) or (seeds, N): the difference with its
    question-level interval (for seeds: each question's difference averaged over them, questions resampled),
    the seed-level t-interval over the seeds' means ("–" for one run), and for one run the discordant
    counts, only b right / only a right (results/README.md's convention for b − a)."""
    d = stats.paired_difference(a, b)
    seeds = stats.seed_interval(a, b) if np.ndim(a) == 2 else None
    counts = " | ".join(map(str, stats.discordant_counts(a, b))) if np.ndim(a) == 1 else "– | –"
    return f"| {label} | {d['n']} | {stats.format_difference(d)} | {stats.format_difference(seeds)} | {counts} |"


BETA_RULE = ("of the study's arms of one teacher form (selective KL as a loss: dgpo-b*; KL on all rollouts: "
             "dgpo-all-b*; PPO's reward penalty: ppo-pen-b*), the β whose best-validation checkpoint has the "
             "highest validation EM at the tuning seed; on a tie, the smaller β")


def chosen_beta(out: str, form: str = "dgpo-b") -> float:
    """The β of one teacher form (the prefix of its arms' names), by BETA_RULE."""
    scored, part = [], "forms" if any(name.startswith(form) for name in FORMS) else "study"
    for name, settings in {**STUDY, **FORMS}.items():
        if not name.startswith(form) or not name[len(form):].replace(".", "").isdigit():
            continue
        path = os.path.join(out, name, "run", "metrics.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: run --part {part} first (this form's β is chosen on it)")
        with open(path) as f:
            val = [json.loads(line).get("val_em") for line in f]
        scored.append((max(v for v in val if v is not None), -settings["beta"], settings["beta"]))
    return max(scored)[2]


def capacity_student(demo_dir: str, out: str, preset_name: str = "default") -> str:
    """The capacity question's start: a student of the teacher's size (demo size "teacher"), made the way
    the demo makes its student — language-model pretraining on the corpus text (the preset's `pretrain`),
    then KD on the demo's own tgo.jsonl with the demo's teacher (the preset's `kd`) — through the demo
    chain's steps (train.train_tiny, train.cold_start). Made once; returns its directory."""
    root = os.path.join(out, "capacity")
    kd_dir = os.path.join(root, "kd")
    if os.path.isfile(os.path.join(root, "made")):
        return kd_dir
    if os.path.isdir(root):                  # an interrupted earlier call: its half-made models are redone
        shutil.rmtree(root)
    preset, dist = train.PRESETS[preset_name](), ddp.Dist()
    tokenizer = models.load_tokenizer(os.path.join(demo_dir, "tokenizer"))
    corpus = retriever_lib.load_corpus(os.path.join(demo_dir, "data", "corpus.jsonl"))
    # the chain's steps read the tokenizer (and, for the pretraining records, the corpus) from a DemoWorld;
    # no question or search is involved here, so those fields stay empty
    w = train.DemoWorld(demo.World(seed=preset.world_seed, corpus=corpus, train=[], validation=[], test=[], facts={}),
                        tokenizer, None, [], [], [], [], rollout.RolloutConfig(greedy=True))
    student = train.train_tiny(w, preset.teacher_size, 2, demo.corpus_records(w.world, tokenizer), preset.pretrain,
                               dist, os.path.join(root, "base"), os.path.join(root, "init"), desc="pretrain")
    teacher = models.load_model(os.path.join(demo_dir, "teacher"), dist, trainable=False)
    tgo = data.load_trajectories(os.path.join(demo_dir, "tgo.jsonl"), vocab_size=len(tokenizer),
                                 tokenizer_fingerprint=data.vocab_fingerprint(tokenizer))
    train.cold_start(w, student, teacher, tgo, preset.kd, dist, loop.Run(kd_dir, overwrite=True))
    open(os.path.join(root, "made"), "w").close()
    return kd_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a `python train.py demo` output directory")
    p.add_argument("--out", required=True)
    p.add_argument("--part", choices=("study", "forms", "answer", "capacity", "long"), required=True)
    p.add_argument("--arms", nargs="*", help="--part study: only these arms (default: all)")
    p.add_argument("--kd-pool", type=int, default=800, help="the demo preset's kd_pool (default: 800)")
    p.add_argument("--preset", choices=sorted(train.PRESETS), default="default",
                   help="--part capacity: the demo preset whose pretrain and kd recipes make the student")
    p.add_argument("--jobs", type=int, default=2, help="arms run at once, one thread each")
    p.add_argument("--steps", type=int, default=COMMON["steps"], help="RL steps per arm (fewer: a check of the "
                   "pipeline, not the study)")
    p.add_argument("--records", help="--part answer: write its records (results/README.md) into this directory, "
                   "e.g. results/rl_answer")
    p.add_argument("--beta", type=float, help="--part answer: DGPO's β as already chosen by BETA_RULE (when the "
                   "study's arms are not in --out); default: chosen from the study's arms in --out")
    args = p.parse_args(argv)
    COMMON["steps"] = args.steps
    os.makedirs(args.out, exist_ok=True)
    args.pool = write_pool(args.demo, args.kd_pool, args.out)
    kd = evaluate(os.path.join(args.demo, "kd"), args.demo, os.path.join(args.out, "kd-eval"),
                  os.path.join(args.out, "kd-eval.log"))
    teacher = evaluate(os.path.join(args.demo, "teacher"), args.demo, os.path.join(args.out, "teacher-eval"),
                       os.path.join(args.out, "teacher-eval.log"))

    student = None
    if args.part == "study":
        arms = {name: (STUDY[name], TUNING_SEED) for name in (args.arms or STUDY)}
    elif args.part == "forms":
        arms = {name: (settings, TUNING_SEED) for name, settings in FORMS.items()}
    elif args.part == "long":
        arms = {name: (settings, TUNING_SEED) for name, settings in LONG.items()}
    elif args.part == "capacity":
        student = capacity_student(args.demo, args.out, args.preset)
        arms = {name: (settings, TUNING_SEED) for name, settings in CAPACITY.items()}
    else:
        beta = args.beta if args.beta is not None else chosen_beta(args.out)
        arms = answer_arms(beta)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(do_arm, name, settings, seed, args, student)
                   for name, (settings, seed) in arms.items()}
        results = {name: f.result() for name, f in futures.items()}

    with open(args.pool) as f:
        pool_size = sum(1 for _ in f)
    lines = [f"On the {len(kd)} test questions: teacher EM {np.mean(list(teacher.values())):.3f}, KD student "
             f"{np.mean(list(kd.values())):.3f}. RL pool: {pool_size} questions.", ""]
    start, header = kd, HEADER
    if args.part == "capacity":       # the arms against their own start, and that start against the demo's KD
        start = evaluate(student, args.demo, os.path.join(args.out, "capacity", "kd-eval"),
                         os.path.join(args.out, "capacity", "kd-eval.log"))
        keys = sorted(kd)
        lines += [f"KD student of the teacher's size: test EM {np.mean(list(start.values())):.3f}.", "",
                  PAIRED_HEADER,
                  paired_row("KD (teacher's size) − KD", np.array([kd[q] for q in keys]),
                             np.array([start[q] for q in keys])), ""]
        header = HEADER.replace("best − KD", "best − its start (the KD student of the teacher's size)")
    lines += [header]
    lines += [summary_row(name, results[name], start, arms[name][0], pool_size) for name in arms]
    if args.part == "forms":
        # the selective form's β was chosen in --part study (its arms may live in another --out)
        lines += ["", "β chosen (" + BETA_RULE + "): " + ", ".join(
            f"{form}* {chosen_beta(args.out, form)}" for form in ("dgpo-all-b", "ppo-pen-b")) + "."]
    if args.part == "answer" and args.records:
        write_answer_records(args, arms, beta, args.beta is not None)
    if args.part == "answer":
        lines += ["", f"β = {beta}, chosen on the tuning seed {TUNING_SEED}: {BETA_RULE}."]
        keys = sorted(kd)
        k = np.array([kd[q] for q in keys])                                       # (N,)
        ks = np.tile(k, (len(ANSWER_SEEDS), 1))                                   # (seeds, N)
        for which, label in (("best", "best-validation checkpoints"), ("last", "last checkpoints (step "
                                                                                 f"{COMMON['steps']})")):
            em = {arm: np.array([[results[f"{arm}-s{s}"][which][q] for q in keys] for s in ANSWER_SEEDS])
                  for arm in ("grpo", "dgpo")}                                    # (seeds, N)
            lines += ["", PAIRED_HEADER.replace("comparison", f"comparison ({label})", 1)]
            for i, seed in enumerate(ANSWER_SEEDS):
                g, d = em["grpo"][i], em["dgpo"][i]
                lines += [paired_row(f"seed {seed}: DGPO − KD", k, d),
                          paired_row(f"seed {seed}: DGPO − (KD → GRPO)", g, d),
                          paired_row(f"seed {seed}: (KD → GRPO) − KD", k, g)]
            lines += [paired_row("3 seeds: DGPO − KD", ks, em["dgpo"]),
                      paired_row("3 seeds: DGPO − (KD → GRPO)", em["grpo"], em["dgpo"]),
                      paired_row("3 seeds: (KD → GRPO) − KD", ks, em["grpo"])]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"{args.part}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
