"""The DGPO pipeline: teacher data → cold-start KD → GRPO with teacher guidance → evaluation, on DDP.

What it does. The command line and the wiring of the stages, each runnable alone with explicit inputs
and outputs (HF model directories and JSONL files), and `demo` (the default with no arguments)
chaining all of them on the built-in world:
  teacher  SFT a model on trajectories (the demo teacher learns from the oracle; real users bring one)
  tgo      roll the teacher out over training questions, keep the correct trajectories (docs/method.md §1)
  kd       cold start: student ← CE + λ·KL(π_T‖π_θ) on the teacher's tokens (dgpo.kd_loss)
  rl       DGPO: rollouts, binary EM reward, the teacher's guidance on wrong rollouts; GRPO or PPO
           with a critic (rl.py)
  eval     arc_eval.evaluate on a questions file
  demo     world → teacher → tgo → kd → rl → eval, then the paper-style results table

What it does not do: train or evaluate itself. The layers below it, lowest first: ddp.py (DDP set-up,
precision), settings.py (each setting's legal values and help, on its config field), cli.py (flags,
one-line errors), checkpoint.py (atomic checkpoints, resume, run directories), models.py (loading,
batches, HeadAtPositions), loop.py (what both trainers share: the stage skeleton, optimizer, stopping,
metrics), arc_eval.py (scored rollouts, evaluation), then the stages sft.py (teacher SFT, kd, tgo) and
rl.py; the losses are dgpo.py's, generation rollout.py's, the metric arc_metric.py's, the search
engine retriever.py's.

Distributed. `torchrun --nproc_per_node=N train.py rl ...` runs plain DDP: NCCL + bf16 autocast on
GPUs, gloo + fp32 on CPU (decided in `ddp.setup()` and `ddp.autocast()` only). Each rank rolls out its
own shard of whole GRPO groups; every loss is normalised by the GLOBAL token count, so N ranks make the
same update as one process with the whole batch, and every rank runs the same number of backward
passes (equal shards). Checkpoints are `save_pretrained` directories plus `trainer_state.pt`.

    python train.py                                    # the whole demo on CPU (~20 min)
    python train.py demo --preset small                # the same chain in under a minute
    torchrun --nproc_per_node=8 train.py rl --student ckpt/kd --teacher ckpt/teacher \\
        --data data/nq_hotpotqa_train/train.parquet --retriever-url http://127.0.0.1:8000/retrieve --out runs/rl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

import arc_eval
import checkpoint
import cli
import data
import ddp
import demo
import loop
import models
import records
import retriever as retriever_lib
import rl
import rollout
import settings
import sft


# -----------------------------------------------------------------------------
# Stage chain on the demo world


@dataclass
class DemoPreset:
    """Everything the demo chain needs. Data roles are disjoint: the teacher's trajectories for KD come
    from the first `kd_pool` training questions, RL trains on the next `rl_pool`, which KD never saw;
    validation selects the RL checkpoint (the start model included); test reports. Demo turns are
    short (the oracle writes ≤ ~40 tokens a turn), so the per-turn budget is 64, not the paper's 500."""
    teacher: sft.SupervisedConfig
    pretrain: sft.SupervisedConfig     # the base student: language modelling on the corpus text only
    kd: sft.SupervisedConfig
    rl: dict                       # rl.RLConfig's settings
    teacher_size: str = "teacher"
    student_size: str = "student"
    world_seed: int = 0
    world_scale: int = 1           # demo.make_world's scale: entities and distractors × this
    n_test: int = 240              # the world's held-out splits
    n_validation: int = 120
    kd_pool: int = 800             # training questions the teacher is rolled out on for KD
    rl_pool: int = 500             # the other training questions: the only ones RL trains on
    tgo_keep_wrong: bool = False   # True only in the plumbing preset, whose teacher cannot be right yet
    oracle_no_think: float = 0.0   # share of the oracle's trajectories that answer straight after an observation
    max_new_tokens: int = 64
    eval_limit: int = 0            # test questions evaluated (0 = the whole test split)
    val_limit: int = 0             # validation questions (0 = all)
    eval_batch_size: int = 64


PRESETS = {
    # the world twice the size of scale 1, so that 1,000 test and 500 validation questions leave 1,820 for
    # training (800 KD, 1,020 RL: 100 steps × 8 never repeat one); a teacher twice as long, which that world
    # needs (docs/rl_settings.md §1); the RL settings the study chose on its tuning seed (§4): G 8 at T 1.0
    # so that most groups are mixed, lr 3e-4, β 0.1, with the instruments on; the speed settings measured
    # in docs/performance.md: batches grouped by length over 16 steps, evaluations in batches of 256
    "default": lambda: DemoPreset(
        teacher=sft.SupervisedConfig(steps=3000, batch_size=8, micro_batch_size=8, lr=4e-3, warmup_steps=50,
                                     length_buckets=16),
        pretrain=sft.SupervisedConfig(steps=400, batch_size=8, micro_batch_size=8, lr=4e-3, warmup_steps=20,
                                      length_buckets=16),
        kd=sft.SupervisedConfig(steps=1200, batch_size=8, micro_batch_size=8, lr=4e-3, warmup_steps=30,
                                length_buckets=16),
        rl=dict(steps=100, prompts_per_step=8, group_size=8, micro_batch_size=16, rollout_batch_size=256,
                lr=3e-4, warmup_ratio=0.1, beta=0.1, temperature=1.0, max_new_tokens=64, eval_every=25,
                probe_samples=1, pool_eval_limit=200),
        world_scale=2, n_test=1000, n_validation=500, rl_pool=1020, eval_batch_size=256),
    # the scale-1 world and the first RL settings (T 0.7, G 4, β 1, 30 steps): the chain the previous
    # experiment's table (docs/experiment.md, bench/experiment.py) ran on
    "scale1": lambda: DemoPreset(
        teacher=sft.SupervisedConfig(steps=1500, batch_size=8, micro_batch_size=8, lr=4e-3, warmup_steps=50),
        pretrain=sft.SupervisedConfig(steps=400, batch_size=8, micro_batch_size=8, lr=4e-3, warmup_steps=20),
        kd=sft.SupervisedConfig(steps=1200, batch_size=8, micro_batch_size=8, lr=4e-3, warmup_steps=30),
        rl=dict(steps=30, prompts_per_step=8, group_size=4, micro_batch_size=16, rollout_batch_size=64,
                lr=3e-4, warmup_ratio=0.1, beta=1.0, temperature=0.7, max_new_tokens=64, eval_every=10)),
    # the same chain in well under a minute: it checks the plumbing (every stage writes what the next
    # reads), not learning — its teacher trains for 4 steps, so its tgo keeps wrong trajectories too
    "small": lambda: DemoPreset(
        teacher=sft.SupervisedConfig(steps=4, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=2),
        pretrain=sft.SupervisedConfig(steps=2, batch_size=4, micro_batch_size=4, lr=3e-3, warmup_steps=1),
        kd=sft.SupervisedConfig(steps=3, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=1, eval_every=3),
        rl=dict(steps=2, prompts_per_step=2, group_size=2, micro_batch_size=4, rollout_batch_size=8,
                lr=1e-4, warmup_ratio=0.0, beta=0.05, max_new_tokens=8, max_turns=1, eval_every=1),
        teacher_size="test", student_size="test", kd_pool=8, rl_pool=4, tgo_keep_wrong=True, max_new_tokens=8,
        eval_limit=4, val_limit=4, eval_batch_size=8),
}


DEMO_MARKER = ".dgpo-demo"   # a directory holding this file was made by run_demo, which may replace it
# what run_demo writes in its directory: a rerun deletes these, and nothing else
DEMO_ENTRIES = ("data", "tokenizer", "init", "teacher", "base", "kd", "dgpo", "eval", "oracle.jsonl", "tgo.jsonl",
                "tgo.jsonl.config.json", "tgo.jsonl.progress-rank0.jsonl", "results.json", "provenance.json",
                DEMO_MARKER)


@dataclass
class DemoWorld:
    """The demo world in the chain's disjoint roles, with its tokenizer, its search engine and the greedy
    rollout settings of every evaluation: what each step of the chain (below) takes."""
    world: demo.World
    tokenizer: object
    retriever: retriever_lib.BM25Retriever
    kd_pool: list[dict]          # the first kd_pool training questions: the teacher is rolled out on them
    rl_pool: list[dict]          # the next rl_pool: the only ones RL trains on
    validation: list[dict]       # selects the RL checkpoint
    test: list[dict]             # reports
    greedy: rollout.RolloutConfig


def question_pools(world: demo.World, preset: DemoPreset) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """The chain's question roles in `world`: (KD pool, RL pool, validation, test). The two pools are
    consecutive slices of the training questions, so all four are disjoint as the world's splits are."""
    return (world.train[:preset.kd_pool], world.train[preset.kd_pool:preset.kd_pool + preset.rl_pool],
            world.validation[:preset.val_limit] if preset.val_limit else world.validation,
            world.test[:preset.eval_limit] if preset.eval_limit else world.test)


def demo_world(preset: DemoPreset, out: str) -> DemoWorld:
    """The world of `preset`, its tokenizer (trained, saved in out/tokenizer) and BM25 over its corpus."""
    world = demo.make_world(seed=preset.world_seed, n_test=preset.n_test, n_validation=preset.n_validation,
                            scale=preset.world_scale)
    return DemoWorld(world, demo.train_tokenizer(world, os.path.join(out, "tokenizer")),
                     retriever_lib.BM25Retriever(world.corpus), *question_pools(world, preset),
                     rollout.RolloutConfig(max_new_tokens=preset.max_new_tokens, greedy=True))


def oracle_trajectories(w: DemoWorld, no_think_fraction: float = 0.0) -> list[dict]:
    """The scripted oracle's correct trajectories on every training question: the demo teacher's data;
    in `no_think_fraction` of them it answers straight after an observation, without a thought."""
    return demo.oracle_records(w.world.train, w.retriever, w.tokenizer,
                               dataclasses.replace(w.greedy, max_new_tokens=500), no_think_fraction)


def train_tiny(w: DemoWorld, size: str, seed: int, records: list[dict], cfg: sft.SupervisedConfig, dist: ddp.Dist,
               out_dir: str, init_dir: str, desc: str):
    """A tiny model of `size` initialised from `seed` (saved in init_dir), trained on `records` into
    out_dir: the demo teacher (on the oracle's trajectories) and the base student (on the corpus text)."""
    demo.make_tiny_model(w.tokenizer, size, seed=seed, out_dir=init_dir)
    model = models.load_model(init_dir, dist, trainable=True)
    sft.train_supervised(model, w.tokenizer, records, cfg, dist, loop.Run(out_dir), desc=desc)
    return model


def teacher_trajectories(w: DemoWorld, teacher, preset: DemoPreset, dist: ddp.Dist, path: str) -> list[dict]:
    """tgo: the teacher rolled out greedily on the KD pool, its correct trajectories written to `path`
    and read back (checked against the tokenizer) for KD."""
    stats = sft.run_tgo(teacher, w.tokenizer, w.kd_pool, w.retriever, w.greedy, dist, path,
                        batch_size=preset.eval_batch_size, keep_wrong=preset.tgo_keep_wrong)
    if not stats["kept"]:       # said here: the loader rejects an empty file less clearly
        raise RuntimeError("the teacher got no training question right: nothing to distil")
    return data.load_trajectories(path, vocab_size=len(w.tokenizer),
                                  tokenizer_fingerprint=data.vocab_fingerprint(w.tokenizer))


def cold_start(w: DemoWorld, student, teacher, trajectories: list[dict], cfg: sft.SupervisedConfig, dist: ddp.Dist,
               run: loop.Run, heldout: bool = True) -> None:
    """kd: `student` distilled on the teacher's trajectories; with `heldout`, the first one in twenty is
    held out for the held-out KD loss."""
    n = max(1, len(trajectories) // 20) if heldout else 0
    sft.train_supervised(student, w.tokenizer, trajectories[n:], cfg, dist, run, teacher=teacher,
                         heldout=trajectories[:n] or None, desc="kd")


def rl_on_pool(w: DemoWorld, start_dir: str, teacher_dir: str, cfg: rl.RLConfig, dist: ddp.Dist,
               run: loop.Run) -> dict:
    """rl: from the model in start_dir on the RL pool, the best validation checkpoint (step 0 included) kept."""
    return rl.train_rl(start_dir, teacher_dir, w.rl_pool, w.retriever, cfg, dist, run, validation=w.validation)


def evaluate_on_test(w: DemoWorld, model_dir: str, preset: DemoPreset, dist: ddp.Dist, out_dir: str) -> dict:
    """eval: the model in model_dir rolled out greedily on the test questions; its ARC report."""
    return arc_eval.evaluate_dir(model_dir, w.test, w.retriever, w.greedy, dist, out_dir,
                                 batch_size=preset.eval_batch_size)


def run_demo(preset_name: str, out: str, dist: ddp.Dist) -> dict:
    """world → teacher (SFT on the oracle) → base student (LM on the corpus) → tgo → kd → rl → eval;
    prints the results table."""
    if dist.enabled:
        raise ValueError("the demo chain runs in one process; use the stage subcommands with torchrun")
    preset = PRESETS[preset_name]()
    checkpoint.own_directory(out, DEMO_MARKER, DEMO_ENTRIES, "the demo")
    # what made this run, for its records (records.py demo; results/README.md)
    records.write_json(os.path.join(out, "provenance.json"),
                       records.provenance(f"python train.py demo --preset {preset_name} --out {out}",
                                          precision=dist.precision, native_bf16=ddp.native_bf16_cpu()))
    t_start = t = time.time()
    seconds = {}                          # wall time per stage, reported with the results
    w = demo_world(preset, out)
    paths = demo.write_world(w.world, os.path.join(out, "data"))
    ddp.print0(dist, f"demo world: {len(w.world.corpus)} passages; questions: KD pool {len(w.kd_pool)}, RL pool "
               f"{len(w.rl_pool)} (disjoint), validation {len(w.validation)}, test {len(w.test)} -> {paths['corpus']}")
    dirs = {name: os.path.join(out, name) for name in ("init", "teacher", "base", "kd", "dgpo")}

    # 1. the demo teacher learns the protocol from the oracle's correct trajectories (all training questions)
    oracle = oracle_trajectories(w, preset.oracle_no_think)
    data.write_jsonl(os.path.join(out, "oracle.jsonl"), oracle)
    ddp.print0(dist, f"oracle: {len(oracle)}/{len(w.world.train)} correct training trajectories")
    seconds["world+tokenizer+oracle"], t = time.time() - t, time.time()
    teacher = train_tiny(w, preset.teacher_size, 1, oracle, preset.teacher, dist, dirs["teacher"],
                         os.path.join(dirs["init"], "teacher"), desc="teacher")
    teacher.eval().requires_grad_(False)
    seconds["teacher"], t = time.time() - t, time.time()

    # 2. the base student: the student architecture, language-model-pretrained on the corpus text only
    student = train_tiny(w, preset.student_size, 2, demo.corpus_records(w.world, w.tokenizer), preset.pretrain, dist,
                         dirs["base"], os.path.join(dirs["init"], "student"), desc="pretrain")
    seconds["base student"], t = time.time() - t, time.time()

    # 3. tgo: the teacher's correct trajectories on the KD pool
    tgo = teacher_trajectories(w, teacher, preset, dist, os.path.join(out, "tgo.jsonl"))
    seconds["tgo"], t = time.time() - t, time.time()

    # 4. kd: cold start of the base student on the teacher's trajectories
    cold_start(w, student, teacher, tgo, preset.kd, dist, loop.Run(dirs["kd"]))
    del student
    seconds["kd"], t = time.time() - t, time.time()

    # 5. rl: DGPO from the KD student on the RL pool; the best validation checkpoint (step 0 = KD) is kept
    summary = rl_on_pool(w, dirs["kd"], dirs["teacher"], rl.RLConfig(**preset.rl), dist, loop.Run(dirs["dgpo"]))
    seconds["rl"], t = time.time() - t, time.time()

    # 6. evaluation on the test split
    reports = {name: evaluate_on_test(w, model_dir, preset, dist, os.path.join(out, "eval", name.split()[0].lower()))
               for name, model_dir in [("Student (base)", dirs["base"]), ("Teacher", dirs["teacher"]),
                                       ("KD only", dirs["kd"]), ("DGPO", best_or_last(dirs["dgpo"]))]}
    seconds["eval"], seconds["total"] = time.time() - t, time.time() - t_start
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    per_question = {name: arc_eval.per_question_em(os.path.join(out, "eval", name.split()[0].lower(),
                                                                "trajectories.jsonl"))
                    for name in reports}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"preset": preset_name, "reports": reports, "paired_vs_kd": arc_eval.paired_differences(per_question),
                   "rl": summary, "seconds": seconds}, f, indent=1)
    ddp.print0(dist, "\n" + arc_eval.comparison_tables(reports, per_question, split="the demo test split"))
    ddp.print0(dist, f"\nDGPO = the RL checkpoint with the best validation EM (step {summary['best_step']} of "
               f"{preset.rl['steps']}; step 0 is the KD model itself). Seconds per stage: {seconds}. "
               f"Everything is in {out}/.")
    return reports


def best_or_last(run_dir: str) -> str:
    """The checkpoint a run reports: best/ (by validation EM) when it validated, else its last one."""
    best = os.path.join(run_dir, "best")
    return best if os.path.isdir(best) else run_dir


# -----------------------------------------------------------------------------
# Command line: one subcommand per stage; config fields become --options with their defaults


def add_run_args(parser) -> None:
    """Where a training stage writes, and how it resumes."""
    parser.add_argument("--out", required=True, help="the run's directory (a checkpoint of the model)")
    parser.add_argument("--resume", help="a checkpoint dir of this stage (trainer_state.pt) to continue")
    parser.add_argument("--override-config", action="store_true",
                        help="with --resume: apply settings that differ from the checkpoint's (recorded)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out run directory")
    parser.add_argument("--stop-after", type=cli.bounded(int, ge=1), help="end this run after N steps, resumable")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--report-to", choices=loop.REPORT_TO, default="none",
                        help="also send the metrics to TensorBoard or W&B (metrics.jsonl is always written)")
    parser.add_argument("--save-dtype", choices=sorted(checkpoint.SAVE_DTYPES), default="float32",
                        help="dtype of the saved model files (bfloat16 halves them; a resume is then not exact)")


def add_precision_arg(parser) -> None:
    parser.add_argument("--precision", choices=ddp.PRECISIONS, default="auto",
                        help="the forwards' arithmetic: auto = bf16 autocast on a GPU, fp32 on a CPU; bf16 on a CPU "
                             "runs fast only where it has native bf16 (avx512_bf16 / AMX), else emulated and far "
                             "slower (docs/performance.md)")


def add_retriever_args(parser) -> None:
    parser.add_argument("--corpus", help="JSONL corpus {id, contents} (.jsonl or .jsonl.gz) for in-process BM25")
    parser.add_argument("--index", help="a BM25 index directory built by `python retriever.py index`")
    parser.add_argument("--retriever-url", help="a Search-R1 retrieval server, e.g. http://127.0.0.1:8000/retrieve")
    parser.add_argument("--retrieval-caller", choices=("one", "each"), default="one",
                        help="with --retriever-url under torchrun: 'one' (default) gathers every rank's searches of a "
                             "turn and sends them from rank 0 as one request, as Search-R1 does (its e5 server may "
                             "not survive concurrent requests); 'each': every rank sends its own")
    cli.add_retriever_client_args(parser)


def retriever_from_args(args, topk: int, dist: ddp.Dist):
    """A function that builds the retriever the arguments name: called by a stage only after its
    cheaper checks, since a corpus may take minutes to index and a server minutes to answer."""
    def build():
        found = retriever_lib.make_retriever(args.corpus, args.retriever_url, topk, index=args.index,
                                             retry_seconds=args.retriever_retry_seconds, timeout=args.retriever_timeout)
        one_caller = args.retriever_url and dist.enabled and args.retrieval_caller == "one"
        return ddp.OneCallerRetriever(found, dist) if one_caller else found
    return build


def parse_args(argv):
    parser = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Errors print one line; --debug (anywhere on the line) shows the traceback.")
    sub = parser.add_subparsers(dest="stage")

    p = sub.add_parser("demo", help="the whole chain on the built-in world (default)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--out", default="runs/demo")
    add_precision_arg(p)

    for name, help_text in [("teacher", "SFT a model on trajectories (CE on loss tokens)"),
                            ("kd", "cold start: CE + λ·KL(teacher‖student) on teacher trajectories")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model" if name == "teacher" else "--student", required=True, help="HF model dir")
        if name == "kd":
            p.add_argument("--teacher", required=True, help="HF model dir of the teacher")
        p.add_argument("--data", required=True, help="trajectories JSONL (e.g. tgo.jsonl)")
        p.add_argument("--heldout", help="held-out trajectories JSONL for the held-out loss")
        add_run_args(p)
        add_precision_arg(p)
        cli.add_config_args(p, sft.SupervisedConfig)

    p = sub.add_parser("tgo", help="teacher rollouts over questions; keep the correct ones")
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True, help="questions JSONL")
    p.add_argument("--out", required=True, help="output trajectories JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--samples", type=cli.bounded(int, ge=1), default=1, help="rollouts per question (greedy if 1)")
    add_precision_arg(p)
    p.add_argument("--batch-size", type=cli.bounded(int, ge=1), default=64,
                   help="sequences per rollout() call on one rank")
    add_retriever_args(p)
    cli.add_config_args(p, rollout.RolloutConfig)

    p = sub.add_parser("rl", help="DGPO (or GRPO / the paper's reward-penalty variant)")
    p.add_argument("--student", required=True)
    p.add_argument("--teacher")
    p.add_argument("--data", required=True, help="training questions JSONL")
    p.add_argument("--val", help="validation questions JSONL (for --eval-every)")
    add_run_args(p)
    add_precision_arg(p)
    add_retriever_args(p)
    cli.add_config_args(p, rl.RLConfig)

    sub.add_parser("eval", add_help=False,
                   help="ARC evaluation of a model dir: the options of `python arc_metric.py --help`")

    args = parser.parse_args(argv)
    if args.stage is None:               # `python train.py`: the whole demo
        args = parser.parse_args(["demo"] + list(argv))
    if args.stage in ("teacher", "kd", "rl"):   # settings legal alone but not together: said at parse time
        p = sub.choices[args.stage]
        try:
            if args.stage == "rl":
                rl.check_rl_settings(cli.config_from_args(args, rl.RLConfig))
            run_from_args(args)
        except ValueError as error:
            p.error(str(error))
        flag, what = ("--val", "the validation questions") if args.stage == "rl" else \
            ("--heldout", "the held-out trajectories it scores")
        if args.eval_every and not getattr(args, flag[2:]):
            p.error(f"--eval-every needs {flag} FILE ({what})")
    return args


def run_from_args(args, info: dict | None = None, inputs: dict | None = None) -> loop.Run:
    """The run options of a training stage (add_run_args), with what train_config.json and the trainer
    state record: `info` (run_info) and `inputs` ({argument: checkpoint.fingerprint})."""
    return loop.Run(args.out, resume=args.resume, stop_after=args.stop_after, override_config=args.override_config,
                    overwrite=args.overwrite, report_to=args.report_to, save_dtype=args.save_dtype, info=info,
                    inputs=inputs)


def main(argv=None) -> None:
    """The command line as a function (errors are raised; `run_cli` turns them into one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:             # one evaluation entry point: arc_metric's
        arc_eval.main(argv[1:])
        return
    args = parse_args(argv)
    dist = ddp.setup()
    dist = dataclasses.replace(dist, precision=ddp.resolve_precision(args.precision, dist.device))
    ddp.print0(dist, ddp.precision_line(dist))
    torch.manual_seed(1234 + dist.rank)  # each rank its own seed; sampling uses explicit generators
    try:
        run_stage(args, dist, argv)
    finally:
        if dist.enabled:
            torch_dist.destroy_process_group()


def run_info(args, argv: list[str]) -> dict:
    """What train_config.json records besides the settings: every command-line value, the command
    line itself (the one a hint to continue the run repeats), and the versions that matter for
    reproducing the run."""
    import transformers
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == "train.py" else "train.py"
    return {"args": {k: v for k, v in vars(args).items()}, "argv": [script, *argv],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]}}


def run_stage(args, dist: ddp.Dist, argv: list[str] | None = None) -> None:
    """One stage from its parsed arguments. Everything cheap is checked before anything slow: the
    settings, that --out may be written (and is no input), the data files, then models, then the
    retriever (building a BM25 index of a large corpus takes minutes); nothing is deleted before
    every input is loaded."""
    info = run_info(args, argv if argv is not None else sys.argv[1:])
    if args.stage == "demo":
        run_demo(args.preset, args.out, dist)
    elif args.stage in ("teacher", "kd"):
        cfg = cli.config_from_args(args, sft.SupervisedConfig)
        settings.check(cfg)
        start, model_arg = (args.model, "--model") if args.stage == "teacher" else (args.student, "--student")
        reads = {"--data": args.data, "--heldout": args.heldout, "--teacher": getattr(args, "teacher", None)}
        # before any data or model is loaded; resumed, the weights come from the checkpoint, not from `start`
        loop.check_run(run_from_args(args), {model_arg: None if args.resume else start, **reads}, dist)
        arg = "--resume" if args.resume else model_arg
        init = args.resume or start
        tokenizer = models.load_tokenizer(init, arg)
        teacher_tok = models.load_tokenizer(args.teacher, "--teacher") if args.stage == "kd" else None
        if teacher_tok is not None:          # first: the trajectories were made with the teacher's tokenizer
            models.check_same_tokenizer(tokenizer, teacher_tok, args.student, args.teacher)
        made_with = {"vocab_size": len(tokenizer), "tokenizer_fingerprint": data.accepted_fingerprints(
            tokenizer, *([teacher_tok] if teacher_tok is not None else []))}
        records = data.load_trajectories(args.data, **made_with)
        heldout = data.load_trajectories(args.heldout, **made_with) if args.heldout else None
        for flag, rows in (("--data", records), ("--heldout", heldout)):
            if rows is not None and models.loss_token_count(rows) == 0:
                raise ValueError(f"{flag} {reads[flag]}: no row has a loss token (every loss_mask is 0 after the "
                                 "prompt): nothing to train on")
        teacher = None
        if args.stage == "kd":
            teacher = models.load_model(args.teacher, dist, trainable=False, arg="--teacher")
        model = models.load_model(init, dist, trainable=True, grad_checkpointing=args.grad_checkpointing, arg=arg)
        inputs = checkpoint.input_fingerprints(reads, rows={"--data": len(records), "--heldout": len(heldout or [])})
        sft.train_supervised(model, tokenizer, records, cfg, dist, run_from_args(args, info, inputs), teacher=teacher,
                             heldout=heldout, desc=args.stage)
    elif args.stage == "tgo":
        rcfg = cli.config_from_args(args, rollout.RolloutConfig)
        rcfg.greedy = rcfg.greedy or args.samples == 1
        reads = {"--data": args.data, "--teacher": args.teacher, "--corpus": args.corpus, "--index": args.index,
                 "--retriever-url": args.retriever_url}
        if dist.master:
            checkpoint.check_output(args.out, None, args.overwrite, kind="file", inputs=reads)
        questions = data.load_questions(args.data)
        tokenizer = models.load_tokenizer(args.teacher, "--teacher")
        teacher = models.load_model(args.teacher, dist, trainable=False, arg="--teacher")
        inputs = checkpoint.input_fingerprints(reads, rows={"--data": len(questions)})
        sft.run_tgo(teacher, tokenizer, questions, retriever_from_args(args, rcfg.topk, dist), rcfg, dist, args.out,
                    samples=args.samples, batch_size=args.batch_size, seed=rcfg.seed or 0, info=info, inputs=inputs,
                    overwrite=args.overwrite)
    elif args.stage == "rl":
        cfg = cli.config_from_args(args, rl.RLConfig)
        rl.check_rl_config(cfg, dist)
        reads = {"--data": args.data, "--val": args.val, "--teacher": args.teacher, "--corpus": args.corpus,
                 "--index": args.index, "--retriever-url": args.retriever_url}
        # before any data or model is loaded; resumed, the weights come from the checkpoint, not from --student
        loop.check_run(run_from_args(args), {"--student": None if args.resume else args.student, **reads}, dist)
        questions = data.load_questions(args.data)
        validation = data.load_questions(args.val) if args.val else None
        inputs = checkpoint.input_fingerprints(reads, rows={"--data": len(questions), "--val": len(validation or [])})
        summary = rl.train_rl(args.student, args.teacher, questions, retriever_from_args(args, cfg.topk, dist), cfg, dist,
                              run_from_args(args, info, inputs), validation=validation,
                              grad_checkpointing=args.grad_checkpointing)
        ddp.print0(dist, json.dumps(summary))


if __name__ == "__main__":
    cli.run_cli(main)
