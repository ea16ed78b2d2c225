"""The paper's experiment in miniature: every method on the demo world, three reporting seeds, with power.

What it does: builds the demo world of the default preset (1,000 test and 500 validation questions,
a KD pool of 800 and an RL pool of 1,020), one teacher and its trajectories,
then for each reporting seed a base student (the student architecture language-model-pretrained on
the corpus text, never shown the protocol), its KD cold start, and every arm below with the same RL
budget and the settings docs/rl_settings.md chose on its tuning seed (seed 0, which reports nothing
here), each checkpoint selected on validation (step 0 included) and evaluated on the test split with
the ARC metrics. Every stage is a step of the demo chain (train.py: demo_world, train_tiny,
teacher_trajectories, cold_start, rl_on_pool, evaluate_on_test); the experiment's own choices are the
seeds, the oracle's share of answers without a thought (so the evidence-given probe without thinking
measures reading, not format), the β of each teacher form (chosen by the study's rule) and KD on
every trajectory (no held-out share). It writes the Markdown table (mean ± std over seeds; every
difference paired over the same test questions with its 95% interval, per seed and pooled; the
smallest difference the design detects), a PNG of the RL arms' curves with their instruments, and
prints its wall time.

Units: every arm × seed lives in its own directory with a result.json written last, which records
what the unit was made from; a second run reuses a finished unit only if that record matches (else it
stops, naming the directory), resumes the long units (teacher, RL) from their last checkpoint and
redoes the others. Units lock their directory, so two invocations on different seeds share the
machine's two cores (`--seeds 1` and `--seeds 2 3`, one thread each) and a third renders the table.

Data roles (disjoint; sizes in the printed design): the teacher's trajectories for KD come from the
KD pool of training questions; every RL arm trains on the RL pool, which KD never saw; validation
selects the checkpoint; test reports.

Arms (RL: the same steps and 64 rollouts a step — 8 questions × 8, GRPO and PPO alike; an arm with
no gradient in any of its first Design.no_gradient_window steps stops there, and the table says so):
  Student (base)   the pretrained student, prompted
  Teacher          the demo teacher (one, shared by every seed)
  KD               cold start from the base student on the KD pool's teacher trajectories
  KD continued     KD trained on for as many sequences as an RL arm trains on (the control that
                   separates RL's gain from more training); KD itself competes on validation
  GRPO / PPO from base          RL without a teacher from the base student
  KD → GRPO / KD → PPO          RL without a teacher from KD
  KD → GRPO, drop constant groups   the policy gradient over mixed groups only, refilled (DAPO)
  DGPO (GRPO, selective KL)     the project's default: KL(π_θ‖π_T) as a loss on wrong rollouts
  DGPO (GRPO, selective KL), drop constant groups
  DGPO (GRPO, KL on all)        the same KL on every rollout (the paper's ablation)
  DGPO (PPO, reward penalty)    the paper's form: per-token k1 penalty in the reward of wrong rollouts
  weak KD → DGPO / → GRPO       from an early KD checkpoint, where all-wrong groups are common

What it does not do: tune anything (the settings study did, on its own seed), or run on GPUs (it is
sized for this 2-core CPU; --preset small is the same pipeline on a handful of questions, for CI).

    OMP_NUM_THREADS=1 python bench/experiment.py --out runs/experiment --seeds 1 &      # one core
    OMP_NUM_THREADS=1 python bench/experiment.py --out runs/experiment --seeds 2 3 &    # the other
    python bench/experiment.py --out runs/experiment --doc docs/experiment.md --readme README.md \
        --png docs/experiment_curves.png                                        # renders (all reused)
    python bench/experiment.py --preset small --out /tmp/exp-small              # seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import arc_eval  # noqa: E402
import checkpoint  # noqa: E402
import data  # noqa: E402
import ddp  # noqa: E402
import demo  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
import plot  # noqa: E402
import rl  # noqa: E402
import sft  # noqa: E402
import stats  # noqa: E402
import train  # noqa: E402

SupervisedConfig = sft.SupervisedConfig


def experiment_chain() -> train.DemoPreset:
    """The default demo's chain with one change: the oracle answers a quarter of its questions straight
    after the observation that holds the answer, without a thought. The protocol asks for a thought
    after every observation, and with none of these trajectories no model ever answers without one, so
    the probe's w/o-think column scored 0 for every trained model and measured format, not reading. A
    quarter keeps thinking first the dominant behaviour (three in four trajectories, as the prompt
    asks); measured, the teacher's own KD-pool trajectories then hold 68 direct answers of 776."""
    return dataclasses.replace(train.PRESETS["default"](), oracle_no_think=0.25)


@dataclass
class Design:
    """Everything that defines the experiment; the presets below are its two sizes. `chain` is what it
    shares with the demo chain (train.DemoPreset: the world and its disjoint question pools, the model
    sizes, the teacher, base-student and KD recipes, the RL settings); the rest is the experiment's own.
    The RL settings and every β come from docs/rl_settings.md, chosen on its tuning seed 0."""
    chain: train.DemoPreset = field(default_factory=experiment_chain)
    seeds: tuple = (1, 2, 3)         # the reporting seeds: never the settings study's tuning seed 0
    kd_early_step: int = 300         # the weak start: this KD step's checkpoint
    # every RL arm's steps (8 questions × 8 rollouts each): past it DGPO's held-out gain was not measurable on
    # the tuning seed (docs/rl_settings.md §5: 100 → 200 steps +0.016 test EM, 200 → 400 +0.005); 1,600 draws
    # from the 1,020-question pool, each question seen about 1.6 times
    rl_steps: int = 200
    # an RL arm with no gradient in any of its first this many steps stops there and the table says so: its
    # model is still its start (a zero-gradient step moves nothing, loop.optimizer_step), and a start whose
    # rollouts all failed this long (the prompted base student) would spend its whole budget on nothing
    no_gradient_window: int = 25
    lr: float = 3e-4                 # every RL arm's and KD continued's learning rate (the study's choice)
    # β of each teacher form, chosen by the study's rule (bench/rl_study.py BETA_RULE) on the tuning seed;
    # None: not chosen (the arms that need it refuse to run)
    beta_selective: float | None = 0.1       # KL as a loss on wrong rollouts (docs/rl_settings.md §4)
    beta_all: float | None = 0.1             # KL as a loss on every rollout (§7; β 1 within 0.002 of it)
    beta_reward: float | None = 0.001        # PPO's k1 reward penalty (§7; the grid's smallest β)


PRESETS = {
    "full": Design,
    "small": lambda: Design(
        chain=train.DemoPreset(
            teacher=SupervisedConfig(steps=3, batch_size=4, micro_batch_size=4, lr=3e-3, warmup_steps=1),
            pretrain=SupervisedConfig(steps=2, batch_size=4, micro_batch_size=4, lr=3e-3, warmup_steps=1),
            kd=SupervisedConfig(steps=3, batch_size=4, micro_batch_size=4, lr=3e-3, warmup_steps=1),
            rl=dict(steps=1, prompts_per_step=2, group_size=2, micro_batch_size=8, rollout_batch_size=8,
                    warmup_ratio=0.0, temperature=1.0, max_new_tokens=8, max_turns=1, eval_every=1,
                    probe_samples=1, pool_eval_limit=2),
            teacher_size="test", student_size="test", kd_pool=10, rl_pool=8, tgo_keep_wrong=True, max_new_tokens=8,
            eval_limit=6, val_limit=4, eval_batch_size=8, oracle_no_think=0.25),
        seeds=(1, 2), kd_early_step=1, rl_steps=2, no_gradient_window=1, beta_all=0.1, beta_reward=0.01),
}

# RL arms: (start model, settings on top of the chain's RL settings). "beta" comes from the Design, by form.
GRPO, DROP = dict(algo="grpo", teacher_mode="none"), dict(drop_constant_groups=True)
SELECTIVE = dict(algo="grpo", teacher_mode="selective", teacher_as="loss")
ARMS = {
    "GRPO from base": ("base", GRPO),
    "PPO from base": ("base", dict(algo="ppo", teacher_mode="none")),
    "KD → GRPO": ("kd", GRPO),
    "KD → GRPO, drop constant groups": ("kd", {**GRPO, **DROP}),
    "KD → PPO": ("kd", dict(algo="ppo", teacher_mode="none")),
    "DGPO (GRPO, selective KL)": ("kd", SELECTIVE),
    "DGPO (GRPO, selective KL), drop constant groups": ("kd", {**SELECTIVE, **DROP}),
    "DGPO (GRPO, KL on all)": ("kd", dict(algo="grpo", teacher_mode="uniform", teacher_as="loss")),
    "DGPO (PPO, reward penalty)": ("kd", dict(algo="ppo", teacher_mode="selective", teacher_as="reward")),
    "weak KD → DGPO": ("kd_early", SELECTIVE),
    "weak KD → GRPO": ("kd_early", GRPO),
}
COLUMNS = [("EM", "all", "em"), ("EM 1-hop", "demo_1hop", "em"), ("EM 2-hop", "demo_2hop", "em"),
           ("hit ratio", "all", "hit_substr"), ("searches", "all", "searches"),
           ("probe w/o think", "all", "probe_em_no_think"), ("probe w/ think", "all", "probe_em_think")]
# the paired comparisons of the table: (method, reference)
COMPARISONS = [("DGPO (GRPO, selective KL)", "KD"), ("DGPO (GRPO, selective KL)", "KD → GRPO"),
               ("KD → GRPO", "KD"), ("DGPO (GRPO, selective KL)", "KD continued"),
               ("DGPO (GRPO, selective KL), drop constant groups", "KD → GRPO, drop constant groups"),
               ("DGPO (GRPO, KL on all)", "DGPO (GRPO, selective KL)"), ("DGPO (PPO, reward penalty)", "KD → PPO"),
               ("weak KD → DGPO", "weak KD → GRPO")]


def teacher_beta(design: Design, settings: dict) -> float | None:
    """The Design's β for the arm's teacher form (None for an arm without a teacher)."""
    if settings["teacher_mode"] == "none":
        return None
    if settings.get("teacher_as") == "reward":
        return design.beta_reward
    return design.beta_all if settings["teacher_mode"] == "uniform" else design.beta_selective


def rl_settings(design: Design, arm: str, seed: int) -> rl.RLConfig:
    """One arm's RLConfig: the chain's RL settings (the study's), the arm's own, the Design's budget, lr and
    β, this seed, and a checkpoint every 25 steps (a unit resumes from it). PPO keeps the groups of 8
    (its critic ignores them) so that every arm samples the same 64 rollouts a step on the same 8
    questions; its critic learning rate and warm-up are RLConfig's (the paper's 1e-5, warmed up)."""
    settings = {**design.chain.rl, **ARMS[arm][1], "steps": design.rl_steps, "lr": design.lr, "seed": seed,
                "save_every": 25}
    beta = teacher_beta(design, settings)
    if settings["teacher_mode"] != "none":
        if beta is None:
            field_name = "beta_reward" if settings.get("teacher_as") == "reward" else "beta_all"
            raise ValueError(f"arm {arm!r}: Design.{field_name} is not chosen yet; run bench/rl_study.py "
                             "--part forms and set it to the β that study's rule chose")
        settings["beta"] = beta
    return rl.RLConfig(**settings)


# -----------------------------------------------------------------------------
# Units of work: each in its own directory, finished when its result.json exists


def as_record(spec) -> object:
    """A unit's spec as JSON would hold it (tuples → lists), so a stored one compares equal."""
    return json.loads(json.dumps(spec, default=str))


class Units:
    """Runs each unit once. A unit's directory with result.json is reused if the spec stored there (what
    the unit was made from) is this run's, and refused otherwise; an unfinished one is resumed by a
    resumable unit (its compute continues from its own checkpoint) and redone from scratch by any
    other. A lock file per unit keeps two invocations from making the same unit at once."""

    def __init__(self, root: str):
        self.root, self.seconds, self.reused, self.reused_seconds = root, {}, 0, 0.0

    def __call__(self, name: str, compute, spec, resumable: bool = False) -> dict:
        path = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)             # blocks while another invocation makes this unit
            return self._run(name, path, compute, as_record(spec), resumable)

    def _run(self, name: str, path: str, compute, spec, resumable: bool) -> dict:
        done = os.path.join(path, "result.json")
        if os.path.isfile(done):
            with open(done) as f:
                result = json.load(f)
            if result.get("spec") != spec:
                raise ValueError(f"{path}: this unit was made from other settings than this run's "
                                 f"(stored {json.dumps(result.get('spec'))[:300]}, now {json.dumps(spec)[:300]}); "
                                 "use another --out, or delete the directory to remake it")
            self.reused += 1
            self.reused_seconds += result.get("seconds", 0.0)
            return result
        if os.path.isdir(path) and not resumable:
            shutil.rmtree(path)                      # an unfinished unit: start it again
        started = path + ".spec.json"                # what an unfinished resumable unit was started from
        if resumable and os.path.isdir(path) and os.path.isfile(started):
            with open(started) as f:
                if json.load(f) != spec:
                    raise ValueError(f"{path}: this unfinished unit was started from other settings than this "
                                     "run's; it cannot resume with these — use another --out, or delete it")
        elif resumable and os.path.isdir(path):
            raise ValueError(f"{path}: an unfinished unit with no record of what it was started from; delete it")
        if resumable:
            with open(started + ".tmp", "w") as f:
                json.dump(spec, f)
            os.replace(started + ".tmp", started)
        spent = path + ".seconds"                    # what interrupted calls of a resumable unit spent
        # an interrupted call's time counts only while its unit holds a checkpoint to resume from (one
        # interrupted before its first save is redone from scratch, and that time is not part of it)
        resumes = resumable and checkpoint.resumable_step(path) is not None
        earlier = float(open(spent).read()) if resumes and os.path.isfile(spent) else 0.0
        t0 = time.time()
        try:
            result = compute(path)
        except BaseException:                        # Ctrl-C, SIGTERM (the trainers save first), a crash
            if resumable:
                with open(spent, "w") as f:
                    f.write(str(earlier + time.time() - t0))
            raise
        result["seconds"] = round(earlier + time.time() - t0, 1)
        result["spec"] = spec
        self.seconds[name] = result["seconds"]
        os.makedirs(path, exist_ok=True)
        with open(done + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(done + ".tmp", done)
        for leftover in (spent, started):
            if os.path.isfile(leftover):
                os.remove(leftover)
        return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--seeds", type=int, nargs="+", help="make only these of the design's seeds (the shared "
                    "units too), and render nothing; without it: every seed, then the table")
    ap.add_argument("--doc", help="replace the block between the experiment markers of this file (the whole "
                    "table: docs/experiment.md)")
    ap.add_argument("--readme", help="replace the block between the experiment-headline markers of this file "
                    "(the main table and its caption: README.md)")
    ap.add_argument("--png", help="where the curves go (default: OUT/curves.png)")
    args = ap.parse_args(argv)
    for target, (begin, end) in ((args.doc, (BEGIN, END)), (args.readme, (HEADLINE_BEGIN, HEADLINE_END))):
        if target:                     # before hours of units, not after them
            check_block(target, begin, end)
    started = time.time()
    design = PRESETS[args.preset]()
    if args.seeds and not set(args.seeds) <= set(design.seeds):
        ap.error(f"--seeds {args.seeds}: the design's seeds are {list(design.seeds)}")
    os.makedirs(args.out, exist_ok=True)
    units = Units(args.out)
    dist = ddp.Dist()

    chain = design.chain                               # the demo chain's steps (train.py) do every stage
    w = train.demo_world(chain, args.out)
    sizes = {"corpus": len(w.world.corpus), "kd_pool": len(w.kd_pool), "rl_pool": len(w.rl_pool),
             "validation": len(w.validation), "test": len(w.test), "seeds": list(design.seeds)}
    print(f"design: {json.dumps(sizes)}", flush=True)
    path = lambda *parts: os.path.join(args.out, *parts)          # noqa: E731
    world_spec = {k: getattr(chain, k) for k in ("world_seed", "world_scale", "n_test", "n_validation", "kd_pool",
                                                 "rl_pool", "val_limit", "eval_limit", "max_new_tokens")}
    greedy_spec = dataclasses.asdict(w.greedy)

    # the teacher: the demo's recipe, on the oracle's correct trajectories of every training question;
    # resumable (a checkpoint every 500 steps): at one thread it is the longest unit
    teacher_cfg = dataclasses.replace(chain.teacher, save_every=500)

    def make_teacher(out):
        records = train.oracle_trajectories(w, chain.oracle_no_think)
        if checkpoint.resumable_step(out) is not None:
            model = models.load_model(out, dist, trainable=True)
            sft.train_supervised(model, w.tokenizer, records, teacher_cfg, dist, loop.Run(out, resume=out),
                                 desc="teacher")
        else:
            shutil.rmtree(out, ignore_errors=True)
            train.train_tiny(w, chain.teacher_size, 1, records, teacher_cfg, dist, out, out + "-init", desc="teacher")
        shutil.rmtree(out + "-init", ignore_errors=True)
        return {"oracle_trajectories": len(records),
                "no_think": sum(1 for r in records if demo.answers_without_thought(r["question"], chain.oracle_no_think))}
    teacher_spec = {"world": world_spec, "size": chain.teacher_size, "oracle_no_think": chain.oracle_no_think,
                    "recipe": dataclasses.asdict(teacher_cfg)}
    teacher_stats = units("teacher", make_teacher, teacher_spec, resumable=True)
    teacher_model = models.load_model(path("teacher"), dist, trainable=False)

    def make_tgo(out):
        return {"kept": len(train.teacher_trajectories(w, teacher_model, chain, dist, os.path.join(out, "tgo.jsonl")))}
    tgo_spec = {"teacher": teacher_spec, "greedy": greedy_spec, "keep_wrong": chain.tgo_keep_wrong,
                "batch_size": chain.eval_batch_size}
    tgo_stats = units("tgo", make_tgo, tgo_spec)
    tgo = data.load_trajectories(path("tgo", "tgo.jsonl"), vocab_size=len(w.tokenizer),
                                 tokenizer_fingerprint=data.vocab_fingerprint(w.tokenizer))

    def evaluate(model_dir):
        return lambda out: {"report": train.evaluate_on_test(w, model_dir, chain, dist, out)}

    def val_em(model_dir):
        model = models.load_model(model_dir, dist, trainable=False)
        return rl.validation_em(model, w.tokenizer, w.validation, w.retriever, w.greedy, chain.eval_batch_size, dist)

    eval_spec = {"world": world_spec, "greedy": greedy_spec}
    reports = {"Teacher": {0: units("eval-teacher", evaluate(path("teacher")), {**eval_spec, "model": teacher_spec})
                           ["report"]}}
    configs = {(arm, seed): rl_settings(design, arm, seed)      # every arm's settings before any unit runs:
               for seed in args.seeds or design.seeds for arm in ARMS}   # a β not chosen stops here, not hours in
    chosen = {}                                        # (method, seed) -> the selected step / val EM / metrics
    for seed in args.seeds or design.seeds:
        s = f"seed{seed}"
        base_cfg = dataclasses.replace(chain.pretrain, seed=seed)
        base_spec = {"world": world_spec, "size": chain.student_size, "init_seed": 100 + seed,
                     "recipe": dataclasses.asdict(base_cfg)}

        def make_base(out, seed=seed, base_cfg=base_cfg):
            shutil.rmtree(out + "-init", ignore_errors=True)
            train.train_tiny(w, chain.student_size, 100 + seed, demo.corpus_records(w.world, w.tokenizer),
                             base_cfg, dist, out, out + "-init", desc="pretrain")
            shutil.rmtree(out + "-init")
            return {}
        units(f"{s}/base", make_base, base_spec)

        kd_cfg = dataclasses.replace(chain.kd, seed=seed)
        kd_spec = {"base": base_spec, "teacher": teacher_spec, "tgo": tgo_stats["kept"], "early": design.kd_early_step,
                   "recipe": dataclasses.asdict(kd_cfg)}

        def make_kd(out, s=s, kd_cfg=kd_cfg):          # KD on every trajectory: no held-out share
            model = models.load_model(path(s, "base"), dist, trainable=True)
            train.cold_start(w, model, teacher_model, tgo, kd_cfg, dist,
                             loop.Run(out, stop_after=design.kd_early_step), heldout=False)
            shutil.rmtree(out + "-early", ignore_errors=True)   # left by an interrupted earlier run
            shutil.copytree(out, out + "-early")           # the weak start, a complete checkpoint
            model = models.load_model(out, dist, trainable=True)
            train.cold_start(w, model, teacher_model, tgo, kd_cfg, dist, loop.Run(out, resume=out), heldout=False)
            return {}
        units(f"{s}/kd", make_kd, kd_spec)
        starts = {"base": path(s, "base"), "kd": path(s, "kd"), "kd_early": path(s, "kd-early")}
        start_specs = {"base": base_spec, "kd": kd_spec, "kd_early": {**kd_spec, "stop_after": design.kd_early_step}}
        start_val = {name: units(f"{s}/val-{name}", lambda out, d=d: {"val_em": val_em(d)},
                                 {**eval_spec, "model": start_specs[name]})["val_em"]
                     for name, d in starts.items()}

        # KD continued: as many sequences as an RL arm trains on; KD itself competes on validation
        sequences = design.rl_steps * chain.rl["prompts_per_step"] * chain.rl["group_size"]
        kdc_cfg = dataclasses.replace(chain.kd, seed=1000 + seed, lr=design.lr, warmup_steps=0,
                                      steps=max(1, sequences // chain.kd.batch_size))

        def make_kdc(out, s=s, kdc_cfg=kdc_cfg):
            model = models.load_model(path(s, "kd"), dist, trainable=True)
            train.cold_start(w, model, teacher_model, tgo, kdc_cfg, dist, loop.Run(out), heldout=False)
            return {"val_em": val_em(out)}
        kdc = units(f"{s}/kd-continued", make_kdc, {"kd": kd_spec, "recipe": dataclasses.asdict(kdc_cfg)})
        kd_wins = start_val["kd"] >= kdc["val_em"]           # ties: KD itself
        chosen[("KD continued", seed)] = {"val_em": max(start_val["kd"], kdc["val_em"]),
                                          "step": 0 if kd_wins else kdc_cfg.steps}
        selected = {"Student (base)": path(s, "base"), "KD": path(s, "kd"), "weak KD (start)": path(s, "kd-early"),
                    "KD continued": path(s, "kd") if kd_wins else path(s, "kd-continued")}
        selected_specs = {"Student (base)": base_spec, "KD": kd_spec, "weak KD (start)": start_specs["kd_early"],
                          "KD continued": {"kd": kd_spec, "recipe": dataclasses.asdict(kdc_cfg), "kd_wins": kd_wins}}

        for arm, (start, _) in ARMS.items():
            cfg = configs[(arm, seed)]
            name = f"{s}/{arm_dir(arm)}"

            def make_rl(out, cfg=cfg, start=start):
                run_rl = lambda run: train.rl_on_pool(w, starts[start], path("teacher"), cfg, dist, run)  # noqa: E731
                window, done = min(design.no_gradient_window, cfg.steps), checkpoint.resumable_step(out)
                first = None
                if done is None or done < window:     # the first window, fresh or resumed inside it
                    first = run_rl(loop.Run(out, overwrite=True, stop_after=window) if done is None
                                   else loop.Run(out, resume=out, stop_after=window - done))
                    if window == cfg.steps:
                        return {"summary": first}
                # checked also when a resume finds the window already run (its decision was not recorded)
                if window < cfg.steps and no_gradient_steps(os.path.join(out, "metrics.jsonl"), window) >= window:
                    return {"summary": first or saved_best(out), "stopped_after": window}
                return {"summary": run_rl(loop.Run(out, resume=out))}     # resumes are exact (tests/test_rl.py)
            rl_spec = {"start": start_specs[start], "teacher": teacher_spec, "config": dataclasses.asdict(cfg)}
            made = units(name, make_rl, {**rl_spec, "no_gradient_window": design.no_gradient_window}, resumable=True)
            summary = made["summary"]
            chosen[(arm, seed)] = {"val_em": summary["best_val_em"], "step": summary["best_step"],
                                   "metrics": path(name, "metrics.jsonl"), "stopped_after": made.get("stopped_after")}
            selected[arm] = path(name, "best")
            selected_specs[arm] = {**rl_spec, "checkpoint": "best"}
        for method, model_dir in selected.items():
            reports.setdefault(method, {})[seed] = units(f"{s}/eval-{arm_dir(method)}", evaluate(model_dir),
                                                         {**eval_spec, "model": selected_specs[method]})["report"]
    if args.seeds:
        print(f"made seeds {args.seeds} in {(time.time() - started) / 60:.1f} min ({units.reused} units reused, "
              f"{len(units.seconds)} run now); run without --seeds to render the table")
        return reports

    wall = time.time() - started
    trajectories = {method: {seed: path(f"seed{seed}", f"eval-{arm_dir(method)}", "trajectories.jsonl")
                             for seed in by_seed} for method, by_seed in reports.items() if method != "Teacher"}
    trajectories["Teacher"] = {0: path("eval-teacher", "trajectories.jsonl")}
    errors = {method: {seed: error_kinds(p) for seed, p in by_seed.items()} for method, by_seed in trajectories.items()}
    per_question = {method: {seed: arc_eval.per_question_em(p) for seed, p in by_seed.items()}
                    for method, by_seed in trajectories.items()}          # once per file, not per comparison
    markdown = render(design, sizes, teacher_stats, tgo_stats, reports, chosen, per_question, units, wall, args, errors)
    with open(path("results.md"), "w") as f:
        f.write(markdown + "\n")
    png = args.png or path("curves.png")
    draw_curves(chosen, design, png)
    print(markdown)
    print(f"\nwrote {path('results.md')} and {png}; wall time {wall / 60:.1f} min "
          f"({units.reused} units reused, {len(units.seconds)} run now)")
    if args.doc:
        replace_block(args.doc, markdown, BEGIN, END)
    if args.readme:
        replace_block(args.readme, headline(markdown), HEADLINE_BEGIN, HEADLINE_END)
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


def saved_best(run_dir: str) -> dict:
    """An RL run's best validation so far as its summary gives it ({best_val_em, best_step}), read from
    its checkpoint's train_config.json (rl.train_rl records it there with every save)."""
    with open(os.path.join(run_dir, checkpoint.CONFIG_FILE)) as f:
        best = json.load(f)["best"]
    return {"best_val_em": best["em"], "best_step": best["step"]}


def no_gradient_steps(metrics_path: str, up_to: int) -> int:
    """Training steps 1..up_to of a run whose update had no gradient (grad_norm 0: every rollout's
    advantage and teacher term were 0), from its metrics.jsonl (which a resume truncates to its checkpoint,
    so a resumed run counts each step once)."""
    return sum(1 for _, row in data.read_jsonl(metrics_path)
               if "reward" in row and row["step"] <= up_to and row.get("grad_norm", 1.0) == 0.0)


def training_signal(metrics_path: str, prompts_per_step: int, last: int = 5) -> dict:
    """What an RL run learned from, read from its metrics.jsonl: the mean training reward and wrong
    fraction per rollout, the fraction of mixed groups, the fraction of steps whose update had a
    non-zero gradient, the questions drawn (a --drop-constant-groups run refills its steps), the probe
    reward at the first and the last evaluation, and the teacher KL averaged over the first and the last
    `last` steps (0 for arms without a teacher)."""
    rows = [row for _, row in data.read_jsonl(metrics_path)]
    steps = [row for row in rows if "reward" in row]
    probe = [row["probe_reward"] for row in rows if "probe_reward" in row]
    kl = [row.get("teacher_kl", 0.0) for row in steps]
    mean = lambda key: sum(r.get(key, 0.0) for r in steps) / len(steps)         # noqa: E731
    return {"reward": mean("reward"), "wrong": mean("wrong_frac"), "mixed": mean("mixed_groups"),
            "moved": sum(1 for r in steps if r.get("grad_norm", 0.0) > 0) / len(steps),
            "drawn": rl.questions_drawn(steps, prompts_per_step),
            "probe_first": probe[0] if probe else float("nan"), "probe_last": probe[-1] if probe else float("nan"),
            "kl_first": sum(kl[:last]) / len(kl[:last]), "kl_last": sum(kl[-last:]) / len(kl[-last:])}


def paired_scores(per_question: dict, method: str, reference: str, seeds) -> tuple[np.ndarray, np.ndarray]:
    """Test EM per question of `reference` and `method`, shape (len(seeds), N) each, the same questions in
    the same order in every row (arc_eval.seed_paired_arrays; refused otherwise). per_question:
    {method: {seed: arc_eval.per_question_em(...)}}."""
    return arc_eval.seed_paired_arrays([per_question[reference][s] for s in seeds],
                                       [per_question[method][s] for s in seeds], names=(reference, method),
                                       runs=[f"seed {s}" for s in seeds])


def render(design, sizes, teacher_stats, tgo_stats, reports, chosen, per_question, units, wall, args, errors) -> str:
    order = ["Student (base)", "Teacher", "KD", "KD continued", "weak KD (start)"] + list(ARMS)
    seeds, shared = list(design.seeds), design.chain.rl
    rollouts = shared["prompts_per_step"] * shared["group_size"]
    lines = [f"<!-- written by bench/experiment.py --preset {args.preset}; do not edit by hand -->", "",
             f"**The experiment in miniature** — demo world of {sizes['corpus']:,} passages, reporting seeds "
             f"{', '.join(map(str, seeds))} (the settings were chosen on seed 0, docs/rl_settings.md), mean ± std "
             f"over seeds (the teacher is one model). The teacher learnt from the oracle's trajectories of every "
             f"training question, {teacher_stats['no_think']} of {teacher_stats['oracle_trajectories']} of them "
             f"answering straight after the observation, without a thought. KD pool {sizes['kd_pool']} questions "
             f"({tgo_stats['kept']} correct teacher trajectories), RL pool {sizes['rl_pool']} questions KD never "
             f"saw, validation {sizes['validation']}, test {sizes['test']}. Every RL arm: {design.rl_steps} steps × "
             f"{rollouts} rollouts ({shared['prompts_per_step']} questions × {shared['group_size']}, PPO too) at "
             f"temperature {shared['temperature']}, lr {design.lr:g}; β {design.beta_selective} (selective KL), "
             f"{design.beta_all} (KL on all), {design.beta_reward} (PPO's reward penalty); the checkpoint (every "
             f"{shared['eval_every']} steps, step 0 included) chosen by validation EM.", "",
             "| method | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for method in order:
        if method in reports:
            lines.append(f"| {method} | " + " | ".join(cell(reports[method], src, m) for _, src, m in COLUMNS) + " |")

    lines += ["", "Paired differences in test EM over the same questions, with 95% bootstrap intervals over "
              "questions: per seed (the same base student, data order and sampling) and pooled over the seeds "
              "(each question's difference averaged over them). The last column is the smallest difference "
              "the pooled design detects (two-sided, level 0.05, power 0.8, stats.detectable_from_pairs: from that "
              "comparison's per-question differences under no difference, the seeds' runs taken as given):", "",
              "| difference | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled | detectable |",
              "|---|" + "---|" * (len(seeds) + 1) + "---:|"]
    for method, reference in COMPARISONS:
        a, b = paired_scores(per_question, method, reference, seeds)                 # (S, N) each
        per_seed = [stats.format_difference(stats.paired_difference(a[i], b[i])) for i in range(len(seeds))]
        pooled = stats.format_difference(stats.paired_difference(a, b))
        lines.append(f"| {method} − {reference} | " + " | ".join(per_seed) +
                     f" | {pooled} | {stats.detectable_from_pairs(a, b):.3f} |")

    lines += ["", "Where the wrong answers come from (fractions of the test questions, mean over seeds): the gold "
              "answer never appeared in anything the model's own searches retrieved (a retrieval miss), or it did "
              "and the answer was still wrong (a reading error):", "",
              "| method | right | wrong: retrieval miss | wrong: reading error |", "|---|---:|---:|---:|"]
    for method in order:
        if method in errors:
            cells = [mean_std([e[k] for e in errors[method].values()]) for k in ("right", "miss", "read")]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "What the RL arms learned from (every training step; mean over seeds): the training reward, the "
              "fraction of wrong rollouts and of mixed groups, the fraction of steps with a non-zero gradient, "
              "the questions drawn from the RL pool, the sampled probe reward on validation at the first and "
              "the last evaluation, and the teacher KL over the first and the last five steps:", "",
              "| method | reward | wrong rollouts | mixed groups | steps with a gradient | questions drawn | "
              "probe reward, first → last | teacher KL, first 5 → last 5 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        sig = [training_signal(chosen[(arm, s)]["metrics"], shared["prompts_per_step"]) for s in seeds]
        cells = [mean_std([x[k] for x in sig]) for k in ("reward", "wrong", "mixed", "moved")]
        drawn = f"{statistics.mean(x['drawn'] for x in sig):,.0f}"
        probe = f"{mean_std([x['probe_first'] for x in sig])} → {mean_std([x['probe_last'] for x in sig])}"
        kl = f"{mean_std([x['kl_first'] for x in sig])} → {mean_std([x['kl_last'] for x in sig])}"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {drawn} | {probe} | {kl} |")
    stopped = {arm: [s for s in seeds if chosen[(arm, s)]["stopped_after"]] for arm in ARMS}
    stopped = {arm: seeds_of for arm, seeds_of in stopped.items() if seeds_of}
    if stopped:
        window = design.no_gradient_window
        lines += ["", f"Stopped early, with no gradient in any of their first {window} step{'s' * (window > 1)} "
                  "(their model is still their start): " + "; ".join(
                      f"{arm} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))})" for arm, v in stopped.items())
                  + "."]
    lines += ["", "Selected on validation (step; validation EM), per seed:", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for method in ["KD continued"] + list(ARMS):
        cells = [f"step {chosen[(method, s)]['step']}; {chosen[(method, s)]['val_em']:.3f}" for s in seeds]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    total = sum(units.seconds.values())
    longest = max(units.seconds.values(), default=0.0)
    lines += ["", f"Time on this machine: the whole table from scratch takes "
                  f"{(total + units.reused_seconds) / 60:.1f} min (every unit's time when it ran, summed); "
                  f"this invocation took {wall / 60:.1f} min ({units.reused} finished units reused, "
                  f"{len(units.seconds)} run now, {total / 60:.1f} min of them"
                  + (f", the longest {longest / 60:.1f} min" if units.seconds else "") + ")."]
    return "\n".join(lines)


def draw_curves(chosen, design, png):
    """The RL arms' selected runs: training reward, validation EM, the probe reward, the mixed-group
    fraction and the teacher KL; mean over seeds, min–max band."""
    groups = {arm: [chosen[(arm, s)]["metrics"] for s in design.seeds] for arm in ARMS}
    plot.plot_metrics(groups, png, keys=["reward", "val_em", "probe_reward", "mixed_groups", "teacher_kl"])


BEGIN, END = "<!-- experiment:begin -->", "<!-- experiment:end -->"
HEADLINE_BEGIN, HEADLINE_END = "<!-- experiment-headline:begin -->", "<!-- experiment-headline:end -->"


def headline(markdown: str) -> str:
    """The README's part of the table: render's first line (the script and preset that wrote it), the
    caption paragraph and the main table (render's first table)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("**The experiment in miniature**"))
    first_row = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(first_row, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join([lines[0], ""] + lines[start:end])       # lines[0]: which script and preset wrote it


def check_block(path: str, begin: str, end: str) -> str:
    """The file's text, if it holds `begin` once and `end` once after it (else an error naming the file)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path}: needs one {begin} and, after it, one {end} to write between")
    return text


def replace_block(path: str, markdown: str, begin: str, end: str) -> None:
    """Puts `markdown` between the markers `begin` and `end` of the file at `path` (check_block),
    atomically."""
    text = check_block(path, begin, end)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(head + begin + "\n" + markdown + "\n" + end + tail)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
