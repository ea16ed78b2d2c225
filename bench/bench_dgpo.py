"""Cost of the DGPO losses, forward + backward, against plain cross-entropy on the same logits.

Every loss starts from the same (B, T, V) logits leaf and ends with .backward(), in one process,
interleaved round-robin so drift on a shared machine hits all of them alike; we report the median.
Losses timed (all fp32 unless --dtype bf16):
    ce           F.cross_entropy(logits, tokens)                          the baseline, 1.00x
    grpo         token_logprobs + policy_loss                             (no teacher)
    dgpo_full    token_logprobs + dgpo_loss(kl="full")  exact KL(π_θ‖π_T), the default
    dgpo_k2      token_logprobs + dgpo_loss(kl="k2")    sampled, teacher_logp precomputed
    kd           kd_loss (CE + λ·KL(π_T‖π_θ))
Peak memory is the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
above the inputs, for one forward + backward of each loss on its own.

    flock /tmp/dgpo-cpu.lock python bench/bench_dgpo.py                  # V = 32k and 151,936
    flock /tmp/dgpo-cpu.lock python bench/bench_dgpo.py --vocab 32768 --threads 2
    flock /tmp/dgpo-cpu.lock python bench/bench_dgpo.py --memory         # token_logprobs bound
    flock /tmp/dgpo-cpu.lock python bench/bench_dgpo.py --updates        # PPO's update vs GRPO's

--threads defaults to 1: on this shared 2-core machine a second OpenMP thread waits for a time
slice whenever another job runs, which punishes many small kernels far more than a few big ones.

Measured on this machine (2-core AMD EPYC VM, torch 2.13 CPU, fp32, B·T = 2×512, 1 thread),
median of 7, loss + backward relative to F.cross_entropy:
    V = 32,768:   grpo 0.49x   dgpo_full 1.40x   dgpo_k2 0.49x   kd 1.41x   (CE 214 ms)
    V = 151,936:  grpo 0.19x   dgpo_full 0.55x   dgpo_k2 0.20x   kd 0.68x   (CE 2406 ms)
CE loses at large V because it materialises the (B·T, V) fp32 log-softmax and its fresh pages.
"""
import argparse
import os
import re
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ddp  # noqa: E402
import dgpo  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
import rl  # noqa: E402


def status_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in GiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) / 2**20


def peak_growth_gb(run) -> float:
    """How far the peak RSS rises above the current RSS while `run()` runs."""
    base = status_gb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:     # resets VmHWM to the current RSS
        f.write("5")
    run()
    return status_gb("VmHWM") - base


def synthetic_records(B: int, T: int, loss_frac: float, vocab: int, seed: int = 0) -> list[dict]:
    """B trajectories of T + 1 tokens: a prompt, then three sampled turns separated by observations,
    the sampled tokens a `loss_frac` share of all positions."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(B):
        ids = torch.randint(0, vocab, (T + 1,), generator=g).tolist()
        mask = [0] * (T + 1)
        per_turn = max(1, int(loss_frac * T / 3))
        for k in range(3):                                  # turns start at 20%, 50% and 80% of the row
            start = int((0.2 + 0.3 * k) * T)
            mask[start:start + per_turn] = [1] * per_turn
        records.append({"input_ids": ids, "loss_mask": mask})
    return records


def make_inputs(B, T, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).mul_(2).to(dtype)              # (B, T, V)
    teacher = torch.randn(B, T, V, generator=g).mul_(2).to(dtype)             # (B, T, V)
    tokens = torch.randint(0, V, (B, T), generator=g)                         # (B, T)
    mask = torch.rand(B, T, generator=g) < 0.9                                # (B, T)
    with torch.no_grad():
        old_logp = dgpo.token_logprobs(logits, tokens) + 0.01 * torch.randn(B, T, generator=g)
        teacher_logp = dgpo.token_logprobs(teacher, tokens)                   # (B, T)
    advantages = torch.randn(B, generator=g)                                  # (B,)
    em = torch.zeros(B)                                          # all rollouts wrong: worst case
    return dict(logits=logits, teacher=teacher, tokens=tokens, mask=mask, old_logp=old_logp,
                teacher_logp=teacher_logp, advantages=advantages, em=em)


def losses(x):
    """name -> function(leaf logits) -> scalar loss, each starting from the same logits."""
    V = x["logits"].shape[-1]

    def ce(z):
        y = x["tokens"].masked_fill(~x["mask"], -100)                         # (B, T)
        return F.cross_entropy(z.reshape(-1, V).float(), y.reshape(-1), ignore_index=-100)

    def grpo(z):
        logp = dgpo.token_logprobs(z, x["tokens"])
        return dgpo.policy_loss(logp, x["old_logp"], x["advantages"], x["mask"])[0]

    def dgpo_full(z):
        logp = dgpo.token_logprobs(z, x["tokens"])
        return dgpo.dgpo_loss(logp, x["old_logp"], x["advantages"], x["em"], x["mask"],
                              kl="full", student_logits=z, teacher_logits=x["teacher"])[0]

    def dgpo_k2(z):
        logp = dgpo.token_logprobs(z, x["tokens"])
        return dgpo.dgpo_loss(logp, x["old_logp"], x["advantages"], x["em"], x["mask"],
                              kl="k2", teacher_logp=x["teacher_logp"])[0]

    def kd(z):
        return dgpo.kd_loss(z, x["teacher"], x["tokens"], x["mask"])[0]

    return dict(ce=ce, grpo=grpo, dgpo_full=dgpo_full, dgpo_k2=dgpo_k2, kd=kd)


def step(fn, logits):
    z = logits.detach().requires_grad_()
    fn(z).backward()
    return z.grad


def bench_vocab(B, T, V, dtype, repeats):
    x = make_inputs(B, T, V, dtype)
    fns = losses(x)
    times = {name: [] for name in fns}
    for name, fn in fns.items():                                  # warm-up
        step(fn, x["logits"])
    for _ in range(repeats):                                      # interleaved round-robin
        for name, fn in fns.items():
            t0 = time.perf_counter()
            step(fn, x["logits"])
            times[name].append(time.perf_counter() - t0)
    peaks = {}
    for name, fn in fns.items():
        peaks[name] = peak_growth_gb(lambda: step(fn, x["logits"]))
    base = statistics.median(times["ce"])
    in_gb = x["logits"].numel() * x["logits"].element_size() / 2**30
    print(f"\nB·T = {B}×{T}, V = {V}, {dtype}, {torch.get_num_threads()} thread(s), "
          f"{repeats} repeats; logits = {in_gb:.2f} GiB each (student, teacher)")
    print(f"{'loss':<10} {'median ms':>10} {'vs CE':>7} {'peak +GiB':>10}")
    for name in fns:
        t = statistics.median(times[name])
        print(f"{name:<10} {t * 1e3:>10.1f} {t / base:>6.2f}x {peaks[name]:>10.2f}")


def bench_memory(B=4, T=1024, V=151_936, dtype=torch.bfloat16):
    """Peak memory of token_logprobs at Qwen's vocabulary, forward and forward + backward, on
    shifted logits[:, :-1] (not contiguous) as a caller passes them."""
    logits = torch.zeros(B, T + 1, V, dtype=dtype)[:, :-1]       # (B, T, V) 1.16 GiB in bf16
    tokens = torch.zeros(B, T, dtype=torch.long)
    gb = logits.numel() * logits.element_size() / 2**30
    print(f"\ntoken_logprobs memory, B·T = {B}×{T}, V = {V}, {dtype} logits = {gb:.2f} GiB "
          f"(a full fp32 log-softmax would be {logits.numel() * 4 / 2**30:.2f} GiB)")
    with torch.no_grad():
        grown = peak_growth_gb(lambda: dgpo.token_logprobs(logits, tokens))
    print(f"forward (no grad)   peak +{grown:.3f} GiB")
    z = logits.requires_grad_()
    grown = peak_growth_gb(lambda: dgpo.token_logprobs(z, tokens).sum().backward())
    print(f"forward + backward  peak +{grown:.3f} GiB (of which the {dtype} gradient {gb:.2f} GiB)")


def bench_updates(repeats: int, n_records: int = 16, length: int = 368, loss_frac: float = 0.175):
    """One RL update (rl.rl_update) on the same fixed batch: GRPO (DGPO's default, teacher KL as a
    loss) vs PPO (the paper's form: critic values, per-token k1 penalty, GAE, actor + critic steps),
    on demo-size models (the demo student's shape, a 2,048-token vocabulary)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=2048, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, tie_word_embeddings=True)
    dist = ddp.Dist()
    root = tempfile.mkdtemp(prefix="bench_updates_")
    for name, seed in (("student", 1), ("teacher", 2)):
        torch.manual_seed(seed)
        Qwen2ForCausalLM(Qwen2Config(**shape)).save_pretrained(os.path.join(root, name))
    records = synthetic_records(n_records, length, loss_frac, 2048)
    for i, r in enumerate(records):
        r.update(em=float(i % 4 == 0), group=i // 2)
    teacher = models.HeadAtPositions(models.load_model(os.path.join(root, "teacher"), dist, trainable=False)).check()

    def run(cfg):
        model = models.load_model(os.path.join(root, "student"), dist, trainable=True)
        optimizer, scheduler = loop.make_optimizer(model, 1e-5, 0.0, 100, 0, None)
        critic = None
        if cfg.algo == "ppo":
            hf = rl.load_critic(os.path.join(root, "student"), dist, False, "--student", fresh=True)
            critic = rl.Critic(models.wrap(hf, dist), *loop.make_optimizer(hf, 1e-5, 0.0, 100, 0, None))
        view = models.wrap(model, dist)
        times = []
        for _ in range(repeats + 1):                       # the first is a warm-up
            t0 = time.perf_counter()
            rl.rl_update(view, teacher, optimizer, scheduler, [dict(r) for r in records], cfg, dist, 2048, {},
                         critic)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    grpo = run(rl.RLConfig(algo="grpo", group_size=2, micro_batch_size=8, beta=1.0))
    ppo = run(rl.RLConfig(algo="ppo", group_size=1, micro_batch_size=8, teacher_as="reward", beta=0.001,
                          entropy_coef=0.001))
    print(f"\nRL update on {n_records} rollouts of {length} tokens ({loss_frac:.1%} sampled), demo student shape, "
          f"{torch.get_num_threads()} thread(s), median of {repeats}:")
    print(f"GRPO (+ selective KL as a loss) {grpo * 1e3:8.1f} ms   1.00x")
    print(f"PPO (critic, k1 penalty, GAE)   {ppo * 1e3:8.1f} ms   {ppo / grpo:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32_768, 151_936])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="only the token_logprobs memory bound")
    ap.add_argument("--updates", action="store_true", help="only the PPO vs GRPO update time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    if args.memory:
        bench_memory()
        return
    if args.updates:
        bench_updates(args.repeats)
        return
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    for V in args.vocab:
        bench_vocab(args.batch, args.seq, V, dtype, args.repeats)


if __name__ == "__main__":
    main()
