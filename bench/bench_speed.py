"""Benchmark: where the default demo's time goes, how far each stage runs from this machine's limit, and
what each speed option buys — every ratio measured in the same process, arms in turn, several rounds.

Parts (--parts, default all):
  peak      the arithmetic limit: GFLOP/s of a large fp32 and a bf16 matmul at this thread count.
  steps     one optimizer step of each supervised stage on the default demo's own data (the teacher on
            the oracle's trajectories, the base student on corpus text, KD of the student from the
            teacher on the oracle's trajectories, which stand in for the teacher's tgo ones), timed by
            phase (batch, forward + loss, backward, optimizer), with its FLOPs (linear layers
            6·N·tokens, attention 12·layers·width·T² per row, the head at the loss positions only) and
            the share of the measured peak that makes. Arms: fp32 (the old path), length-bucketed
            batches (--length-buckets), bf16 autocast, torch.compile of the forward; each arm trains on
            the same --bucket-steps × 8 sequences, so the ratio compares the same work.
  ops       torch.profiler's split of each stage's step by operator kind (matmul, attention, the
            loss's log-softmax, optimizer, the rest).
  decode    the eval stage's unit, arc_eval.evaluate (greedy rollouts and the evidence-given probes), of
            --questions test questions at each --eval-batches size (64 was the old default), fp32 and,
            on a CPU with native bf16, bf16: wall seconds per question and the EM each arm got.
  threads   the teacher step at 1 and at 2 threads, and two one-thread steps side by side in two
            processes: whether two single-thread units use the two cores better than one two-thread unit.

The models are the demo's sizes, untrained (step time does not depend on the weights) except for
decode, which needs models that write the protocol: --run DIR, a finished demo, and --models, which of
its model directories (kd, base, teacher, ...). Without native bf16 the bf16 arms are left out
(--bf16-anyway runs them, emulated). Prints
tables and, with --json FILE, writes every measurement there (the records docs/performance.md is
rendered from when FILE is results/speed/...).

    OMP_NUM_THREADS=1 python bench/bench_speed.py --parts peak,steps,ops --json /tmp/speed1.json
    python bench/bench_speed.py --parts decode --run runs/demo --models kd,base --eval-batches 64,256
    python bench/bench_speed.py --parts steps,ops --rounds 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import arc_eval  # noqa: E402
import ddp  # noqa: E402
import demo  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
import records  # noqa: E402
import sft  # noqa: E402
import train  # noqa: E402

PARTS = ("peak", "steps", "ops", "decode", "threads")


# -----------------------------------------------------------------------------
# The limit


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of an n×n×n matmul in `dtype` (2n³ FLOPs), the best of `repeats`: the arithmetic peak the
    steps are compared with."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b                                                            # warm-up (kernel selection, caches)
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -----------------------------------------------------------------------------
# One supervised step, by phase


def step_flops(model, batch: models.Batch) -> float:
    """FLOPs of one training step (forward + backward ≈ 3 × forward) of `model` on `batch` as computed:
    every padded position through the decoder, the head at the loss positions only."""
    cfg = model.config
    width, hidden, layers = batch.inputs.shape[1], cfg.hidden_size, cfg.num_hidden_layers
    head_dim = hidden // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    per_token = layers * (2 * hidden * (hidden + 2 * kv + hidden) + 2 * 3 * hidden * cfg.intermediate_size)
    attention = layers * 4 * cfg.num_attention_heads * head_dim * width * width / 2     # causal: half the square
    rows = batch.inputs.shape[0]
    head = 2 * hidden * cfg.vocab_size * int(batch.mask.sum())
    return 3 * (rows * (per_token * width + attention) + head)


def forward_flops(model, batch: models.Batch) -> float:
    return step_flops(model, batch) / 3


@dataclasses.dataclass
class StepArm:
    name: str
    buckets: int = 1                 # length_buckets
    precision: str = "fp32"
    compiled: bool = False


ARMS = (StepArm("fp32 (old)"), StepArm("length-bucketed", buckets=16), StepArm("bf16 autocast", precision="bf16"),
        StepArm("bucketed + bf16", buckets=16, precision="bf16"), StepArm("compiled", compiled=True),
        StepArm("bucketed + compiled", buckets=16, compiled=True))


def run_steps(view, teacher_view, rows: list[dict], arm: StepArm, steps: int, vocab_size: int, optimizer,
              seed: int = 0) -> dict:
    """`steps` supervised steps (batch 8, one micro-batch, as the demo's stages) on `rows` in the arm's
    data order and precision: seconds by phase, FLOPs, padded share of the positions."""
    dist = ddp.Dist(precision=arm.precision)
    lengths = [len(r["input_ids"]) for r in rows]
    phases = {"batch": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    flops = padded = positions = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        chunk = [rows[i] for i in loop.length_bucketed_window(seed, lengths, step, 8, arm.buckets)]
        batch = models.make_batch(chunk, dist.device)
        normaliser = models.loss_token_count(chunk)
        t1 = time.perf_counter()
        loss, _ = sft.supervised_loss(view, teacher_view, chunk, normaliser, vocab_size, 1.0, dist)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for key, a, b in (("batch", t0, t1), ("forward", t1, t2), ("backward", t2, t3), ("optimizer", t3, t4)):
            phases[key] += b - a
        model = models.hf_model(view)
        flops += step_flops(model, batch) + (forward_flops(models.hf_model(teacher_view), batch)
                                              if teacher_view is not None else 0.0)
        real = sum(len(r["input_ids"]) - 1 for r in chunk)
        positions += batch.inputs.numel()
        padded += batch.inputs.numel() - real
    return {**phases, "seconds": sum(phases.values()), "flops": flops, "padded": padded / positions}


def stage_models(kind: str, tokenizer):
    """(the trained model, the frozen teacher or None) of a supervised stage, untrained, at the demo's sizes."""
    dist = ddp.Dist()
    with tempfile.TemporaryDirectory() as tmp:
        size = "student" if kind in ("pretrain", "kd") else "teacher"
        demo.make_tiny_model(tokenizer, size, seed=1, out_dir=os.path.join(tmp, "m"))
        model = models.load_model(os.path.join(tmp, "m"), dist, trainable=True)
        teacher = None
        if kind == "kd":
            demo.make_tiny_model(tokenizer, "teacher", seed=2, out_dir=os.path.join(tmp, "t"))
            teacher = models.load_model(os.path.join(tmp, "t"), dist, trainable=False).eval().requires_grad_(False)
    return model, teacher


def bench_steps(w, data: dict, args, peak: dict) -> list[dict]:
    """Each stage × arm, --rounds rounds in turn; the median seconds per step and the ratio to fp32 (old)
    round by round."""
    out = []
    for kind, rows in data.items():
        arms = [a for a in ARMS if a.name in args.arms and (a.precision != "bf16" or args.native_bf16)]
        results = {a.name: [] for a in arms}
        for r in range(args.rounds):
            for arm in arms:
                model, teacher = stage_models(kind, w.tokenizer)
                view = models.HeadAtPositions(model).check()
                teacher_view = models.HeadAtPositions(teacher).check() if teacher is not None else None
                if arm.compiled:
                    view = compile_or_say(view)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
                t = time.perf_counter()
                if arm.compiled:       # compiling happens in these warm-up steps; their time counts below
                    run_steps(view, teacher_view, rows, arm, 2, len(w.tokenizer), optimizer, seed=99)
                warm = time.perf_counter() - t if arm.compiled else 0.0
                res = run_steps(view, teacher_view, rows, arm, args.bucket_steps, len(w.tokenizer), optimizer,
                                seed=r)
                res["warmup_s"] = warm
                results[arm.name].append(res)
        base = results[arms[0].name]
        # compile time counts: spread over the steps the demo's stage runs (its warm-up is the arm's only
        # extra cost; the other arms have none)
        stage_steps = getattr(train.PRESETS["default"](), kind).steps
        for arm in arms:
            rs = results[arm.name]
            per_step = statistics.median(x["seconds"] for x in rs) / args.bucket_steps
            ratios = [b["seconds"] / (x["seconds"] + x["warmup_s"] * args.bucket_steps / stage_steps)
                      for x, b in zip(rs, base)]
            gflops = statistics.median(x["flops"] / x["seconds"] for x in rs) / 1e9
            limit = peak.get("bf16" if arm.precision == "bf16" else "fp32")
            out.append({"stage": kind, "arm": arm.name, "s_per_step": per_step, "speedup": statistics.median(ratios),
                        "speedup_min": min(ratios), "speedup_max": max(ratios), "gflops": gflops,
                        "of_peak": gflops / limit if limit else None, "padded": statistics.median(x["padded"] for x in rs),
                        "warmup_s": statistics.median(x["warmup_s"] for x in rs),
                        **{k: statistics.median(x[k] for x in rs) / args.bucket_steps
                           for k in ("batch", "forward", "backward", "optimizer")}})
    return out


def compile_or_say(view):
    """The view compiled in place (nn.Module.compile, dynamic shapes: every batch has its own width) or,
    where compile is unavailable, the view itself with one line saying so."""
    try:
        view.compile(dynamic=True)
    except Exception as error:                    # noqa: BLE001 - any failure means: run uncompiled
        print(f"torch.compile unavailable ({type(error).__name__}: {error}); running uncompiled")
    return view


# -----------------------------------------------------------------------------
# Operator split


def op_split(view, teacher_view, rows: list[dict], vocab_size: int) -> dict:
    """Self CPU seconds of one step's operators, by kind."""
    from torch.profiler import ProfilerActivity, profile
    model = models.hf_model(view)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run_steps(view, teacher_view, rows, StepArm("warm"), 2, vocab_size, optimizer, seed=7)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(view, teacher_view, rows, StepArm("fp32"), 4, vocab_size, optimizer, seed=8)
    # an operator's kind by a part of its name (aten::addmm, aten::_scaled_dot_product_flash_attention_for_cpu
    # and its _backward, aten::_log_softmax_backward_data, aten::_foreach_addcdiv_ ...); forward and backward alike
    kinds = {"attention": ("scaled_dot_product", "flash_attention"),
             "matmul": ("mm", "addmm", "bmm", "matmul", "linear"),
             "log-softmax (loss)": ("log_softmax", "softmax"),
             "optimizer": ("adamw", "_foreach")}
    split = {k: 0.0 for k in (*kinds, "rest")}
    for event in prof.key_averages():
        name = event.key.split("::")[-1].lower()
        kind = next((k for k, names in kinds.items()
                     if any(name == n or (n != "mm" and n in name) for n in names)), "rest")
        split[kind] += event.self_cpu_time_total / 1e6
    total = sum(split.values())
    return {k: v / total for k, v in split.items()}


# -----------------------------------------------------------------------------
# Evaluation decode


def bench_decode(w, run: str, args) -> list[dict]:
    """The eval stage's unit, arc_eval.evaluate (greedy rollouts and the evidence-given probes) of
    --questions test questions, for each model of --models in --run, at each batch size and precision in
    turn: wall seconds per question, and the EM each arm got (greedy: the same answers up to ties)."""
    from transformers import AutoTokenizer
    questions = w.test[:args.questions]
    out = []
    for name in args.models:
        model_dir = os.path.join(run, name)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)     # the run's own (the same world's, trained alike)
        arms = [(b, p) for p in ("fp32", "bf16") for b in args.eval_batches if p in args.decode_precisions
                and (p == "fp32" or args.native_bf16)]
        times, ems = {arm: [] for arm in arms}, {}
        for _ in range(args.rounds):
            for batch, precision in arms:
                dist = ddp.Dist(precision=precision)
                model = models.load_model(model_dir, dist, trainable=False)
                t = time.perf_counter()
                with ddp.autocast(dist):
                    recs, _ = arc_eval.evaluate(model, tokenizer, questions, w.retriever, w.greedy, probe=True,
                                                batch_size=batch, progress=False)
                times[(batch, precision)].append(time.perf_counter() - t)
                ems[(batch, precision)] = sum(r["scores"]["em"] for r in recs) / len(recs)
        base = times[arms[0]]
        for arm in arms:
            ratios = [b / x for x, b in zip(times[arm], base)]
            out.append({"model": name, "batch": arm[0], "precision": arm[1],
                        "s_per_question": statistics.median(times[arm]) / len(questions),
                        "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                        "em": ems[arm]})
    return out


# -----------------------------------------------------------------------------
# Threads


def one_thread_step_seconds(threads: int, steps: int) -> float:
    """Seconds per teacher step in a fresh process at `threads` threads (the child re-enters this script)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--child-steps", str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def child_steps(steps: int) -> None:
    w = bench_world()
    rows = train.oracle_trajectories(w)
    model, _ = stage_models("teacher", w.tokenizer)
    view = models.HeadAtPositions(model).check()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run_steps(view, None, rows, StepArm("warm"), 2, len(w.tokenizer), optimizer, seed=9)
    res = run_steps(view, None, rows, StepArm("fp32"), steps, len(w.tokenizer), optimizer)
    print(res["seconds"] / steps)


def bench_threads(args) -> dict:
    """Teacher steps per second: one process at 1 thread, one at 2 threads, two one-thread processes at once."""
    one = statistics.median(one_thread_step_seconds(1, args.bucket_steps) for _ in range(args.rounds))
    two = statistics.median(one_thread_step_seconds(2, args.bucket_steps) for _ in range(args.rounds))
    pairs = []
    for _ in range(args.rounds):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, "--child-steps", str(args.bucket_steps)], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        pairs.append(statistics.mean(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs))
    side = statistics.median(pairs)
    return {"s_per_step_1_thread": one, "s_per_step_2_threads": two, "s_per_step_1_thread_beside_another": side,
            "steps_per_s_one_2_thread_process": 1 / two, "steps_per_s_two_1_thread_processes": 2 / side}


# -----------------------------------------------------------------------------


def bench_world():
    preset = train.PRESETS["default"]()
    tmp = tempfile.mkdtemp(prefix="bench-speed-")
    return train.demo_world(preset, tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bucket-steps", type=int, default=16, help="steps per arm per round (= the bucketed window)")
    parser.add_argument("--arms", default=",".join(a.name for a in ARMS))
    parser.add_argument("--stages", default="teacher,pretrain,kd")
    parser.add_argument("--run", help="a finished demo run (runs/demo): decode uses its teacher and KD student")
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--models", default="kd,base", help="decode: model directories of --run")
    parser.add_argument("--eval-batches", default="64,256")
    parser.add_argument("--decode-precisions", default="fp32,bf16")
    parser.add_argument("--bf16-anyway", action="store_true", help="run the bf16 arms without native bf16 too")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_steps:
        return child_steps(args.child_steps)
    args.arms = args.arms.split(",")
    args.eval_batches = [int(b) for b in args.eval_batches.split(",")]
    args.decode_precisions = args.decode_precisions.split(",")
    args.models = args.models.split(",")
    parts = args.parts.split(",")
    result = {"made": records.provenance("python bench/bench_speed.py " + shlex.join(sys.argv[1:]),
                                         native_bf16=ddp.native_bf16_cpu()),
              "native_bf16": ddp.native_bf16_cpu(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(f"threads {torch.get_num_threads()}; native bf16: {result['native_bf16']}; "
          f"torch CPU capability {result['cpu_capability']}")
    args.native_bf16 = result["native_bf16"] or args.bf16_anyway
    if not args.native_bf16:
        print("no native bf16 on this CPU: the bf16 arms are left out (emulated bf16 runs ~100x slower: see the "
              "peak); --bf16-anyway runs them")
    w = bench_world()
    if "peak" in parts or "steps" in parts:
        # emulated bf16 is ~100x slower: a 256³ matmul measures it well enough without minutes of waiting
        result["peak"] = {"fp32": matmul_gflops(torch.float32),
                          "bf16": matmul_gflops(torch.bfloat16, n=1024 if result["native_bf16"] else 256)}
        print(f"peak (1024³ matmul; bf16 256³ without native bf16): fp32 {result['peak']['fp32']:.1f} GFLOP/s, bf16 {result['peak']['bf16']:.1f} GFLOP/s")
    if "steps" in parts or "ops" in parts:
        oracle = train.oracle_trajectories(w)
        data = {"teacher": oracle, "pretrain": demo.corpus_records(w.world, w.tokenizer), "kd": oracle}
        data = {k: v for k, v in data.items() if k in args.stages.split(",")}
    if "steps" in parts:
        result["steps"] = bench_steps(w, data, args, result["peak"])
        print("\n| stage | arm | s/step | × old | [min, max] | forward | backward | optimizer | padded | GFLOP/s | of peak |")
        print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in result["steps"]:
            print(f"| {r['stage']} | {r['arm']} | {r['s_per_step']:.3f} | {r['speedup']:.2f} | [{r['speedup_min']:.2f}, "
                  f"{r['speedup_max']:.2f}] | {r['forward']:.3f} | {r['backward']:.3f} | {r['optimizer']:.3f} | "
                  f"{r['padded']:.1%} | {r['gflops']:.1f} | {r['of_peak']:.0%} |")
    if "ops" in parts:
        result["ops"] = {}
        for kind, rows in data.items():
            model, teacher = stage_models(kind, w.tokenizer)
            result["ops"][kind] = op_split(models.HeadAtPositions(model).check(),
                                           models.HeadAtPositions(teacher).check() if teacher else None,
                                           rows, len(w.tokenizer))
            print(f"ops of a {kind} step: " + ", ".join(f"{k} {v:.0%}" for k, v in result["ops"][kind].items()))
    if "decode" in parts:
        if not args.run:
            raise SystemExit("--parts decode needs --run DIR (a finished demo: its models write the protocol)")
        result["decode"] = bench_decode(w, args.run, args)
        print("\n| model | eval batch | precision | s/question | × first arm | [min, max] | EM |")
        print("|---|---:|---|---:|---:|---|---:|")
        for r in result["decode"]:
            print(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['s_per_question']:.4f} | {r['speedup']:.2f} | "
                  f"[{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | {r['em']:.3f} |")
    if "threads" in parts:
        result["threads"] = bench_threads(args)
        print("threads:", json.dumps({k: round(v, 4) for k, v in result["threads"].items()}))
    if args.json:
        records.write_json(args.json, result)


if __name__ == "__main__":
    main()
