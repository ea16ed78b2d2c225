"""Logits only where a loss lives: one KD and one DGPO micro-batch, full-logits path vs HeadAtPositions.

The model has Qwen2.5-0.5B's head shape (hidden 896, vocabulary 151,936, tied embeddings, its MLP
and attention widths) with only a few decoder layers, so it runs on this CPU. The micro-batch is
B sequences of T tokens whose loss positions (tokens the policy sampled) are a share `--loss-frac`
of all positions (17.5% in the demo's trajectories), in a few runs like real turns.

    full    the model's own forward: (B, T, V) logits for the student and the teacher, losses on a
            (B, T) mask — what train.py did before HeadAtPositions
    heads   models.logits_of: the decoder on every position, the head on the loss positions only,
            (B, L, V) logits, L = the longest row's loss positions

Both compute exactly the same losses and gradients (tests/test_train.py checks it to 1e-6). For each
we report the median wall time of forward + backward (student) + the teacher's forward, and the
growth of the process's peak RSS during one such step (VmHWM, reset through /proc/self/clear_refs).

    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_head.py                 # B·T = 4×1024, 2 layers
    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_head.py --batch 2 --seq 512 --repeats 3
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_dgpo  # noqa: E402
import dgpo  # noqa: E402
import models  # noqa: E402


def qwen_head_model(layers: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32768)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def full_batch(records):
    width = len(records[0]["input_ids"]) - 1
    inputs = torch.tensor([r["input_ids"][:-1] for r in records])                     # (B, T)
    targets = torch.tensor([r["input_ids"][1:] for r in records])                     # (B, T)
    mask = torch.tensor([r["loss_mask"][1:] for r in records], dtype=torch.bool)      # (B, T)
    assert inputs.shape[1] == width
    return inputs, targets, mask


def steps(student, teacher, records):
    """name -> function running one micro-batch's loss forward + backward."""
    inputs, targets, mask = full_batch(records)
    batch = models.make_batch(records, "cpu")
    view, teacher_view = models.HeadAtPositions(student), models.HeadAtPositions(teacher)
    em = torch.zeros(len(records))                                  # all wrong: the teacher term acts
    adv = torch.zeros(len(records))

    def kd(logits_fn, teacher_fn, tokens, m):
        def run():
            with torch.no_grad():
                t = teacher_fn()
            loss, _ = dgpo.kd_loss(logits_fn(), t, tokens, m)
            loss.backward()
        return run

    def rl(logits_fn, teacher_fn, tokens, m):
        def run():
            with torch.no_grad():
                t = teacher_fn()
            z = logits_fn()
            lp = dgpo.token_logprobs(z, tokens)
            loss, _ = dgpo.dgpo_loss(lp, lp.detach(), adv, em, m, beta=1.0, student_logits=z, teacher_logits=t)
            loss.backward()
        return run

    full_s = lambda: student(input_ids=inputs, use_cache=False).logits           # noqa: E731  (B, T, V)
    full_t = lambda: teacher(input_ids=inputs, use_cache=False).logits           # noqa: E731
    head_s = lambda: models.logits_of(view, batch)                                 # noqa: E731  (B, L, V)
    head_t = lambda: models.logits_of(teacher_view, batch)                         # noqa: E731
    return {("kd", "full"): kd(full_s, full_t, targets, mask), ("kd", "heads"): kd(head_s, head_t, batch.targets,
                                                                                   batch.mask),
            ("dgpo", "full"): rl(full_s, full_t, targets, mask), ("dgpo", "heads"): rl(head_s, head_t, batch.targets,
                                                                                       batch.mask)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--loss-frac", type=float, default=0.175)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    student, teacher = qwen_head_model(args.layers, 1).train(), qwen_head_model(args.layers, 2).eval()
    teacher.requires_grad_(False)
    records = bench_dgpo.synthetic_records(args.batch, args.seq, args.loss_frac, 151_936)
    n_loss = sum(sum(r["loss_mask"][1:]) for r in records)
    print(f"torch {torch.__version__}, {args.threads} thread(s); Qwen2.5-0.5B head shape, {args.layers} layers; "
          f"B·T = {args.batch}×{args.seq}, loss positions {n_loss} ({n_loss / (args.batch * args.seq):.1%}); "
          f"fp32")
    fns = steps(student, teacher, records)
    times = {k: [] for k in fns}
    for fn in fns.values():                                          # warm-up
        student.zero_grad(set_to_none=True)
        fn()
    for _ in range(args.repeats):                                    # interleaved round-robin
        for k, fn in fns.items():
            student.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    peaks = {}
    for k, fn in fns.items():
        student.zero_grad(set_to_none=True)
        peaks[k] = bench_dgpo.peak_growth_gb(fn)
    print(f"{'loss':<6} {'path':<6} {'median s':>9} {'peak +GiB':>10}   heads vs full")
    for loss in ("kd", "dgpo"):
        for path in ("full", "heads"):
            t = statistics.median(times[(loss, path)])
            ratio = "" if path == "full" else (f"   time {t / statistics.median(times[(loss, 'full')]):.2f}x, "
                                               f"memory {peaks[(loss, path)] / peaks[(loss, 'full')]:.2f}x")
            print(f"{loss:<6} {path:<6} {t:>9.2f} {peaks[(loss, path)]:>10.2f}{ratio}")


if __name__ == "__main__":
    main()
