"""One command that verifies and measures the GPU path, in at most ten minutes on one GPU.

Nothing in this project has run on a GPU yet: NCCL, CUDA devices, bf16 autocast in training, the
rollout's speed and docs/gpu.md's per-GPU memory figures are arithmetic until this script runs. Every
part goes through the project's own code (ddp.py's set-up, models.py's loader and batches, sft.py's KD
loss, loop.py's optimizer step, rl.py's update with its critic, rollout.py through
arc_eval.generate_records); only the random
weights, the synthetic trajectories and the baselines are made here. Nothing is downloaded.

Parts (each reports pass/fail checks, seconds, peak memory; a failure in one is reported with its
traceback and the others still run):
  distributed   ddp.setup(): NCCL and cuda:LOCAL_RANK on a GPU (gloo on CPU); one all-reduce checked;
                a DDP-wrapped HeadAtPositions whose gradients equal the unwrapped model's
  models        a Qwen2.5-0.5B-shaped student (hidden 896, 24 layers, 14 heads / 2 KV heads, vocabulary
                151,936, tied embeddings) and a Qwen2.5-3B-shaped teacher, random weights from a config;
                the student is saved and re-read through models.load_model / rl.load_critic like a checkpoint
  kd, grpo, ppo one optimizer step each under bf16 autocast (plus a warm-up step before it) on synthetic
                trajectories of ~4,000 tokens with ~20% loss positions, DDP-wrapped as on N GPUs:
                KD (sft.supervised_loss), DGPO = GRPO with the selective teacher KL (rl.rl_update), PPO
                with its critic and the paper's teacher penalty (rl.rl_update); `_ckpt` = the same with
                gradient checkpointing. Checks: loss finite, no step skipped, every parameter changed
  head          one KD loss step with logits at the loss positions only (models.HeadAtPositions) vs
                full (B, T, V) logits at V = 151,936: time, peak memory, the same loss
  rollout_bN    arc_eval.generate_records (rollout() under autocast, as RL calls it) at batch N with up to
                500 new tokens a turn, against model.generate on the same prompts and a plain ragged
                decode loop (each row decodes as many tokens as it sampled in the rollout, then leaves);
                tokens per second as ratios, prefill and decode timed apart
Each part is printed beside docs/gpu.md's figures on paper (from the parameter counts) where it has one.

Time: a budget (--budget-s, default 540 s, so that start-up included the run stays within 10 min) is
shared among the parts by weight; a part that finishes early leaves its time to the later ones. The
rollouts calibrate their per-token cost first and shorten the turns if the full ones would not fit;
a training part skips its measured step (reporting the warm-up step) if the warm-up took more than a
third of its share. Whatever was scaled down says so in the output.

Output: DIR/gpu_check.json (every number, every traceback) and DIR/gpu_check.md (the table, also
printed). Exit status 0 only if every part passed.

With --tiny, or when CUDA is absent, every part runs on tiny shapes (a 2-layer student, 256-token
trajectories, batches of 4 and 8, 12 tokens a turn) in seconds; tests/test_gpu_check.py runs it so
the script cannot rot. On a GPU, --tiny is a half-minute smoke test of the same code on the GPU.

    torchrun --standalone --nproc_per_node=1 bench/gpu_check.py --out runs/gpu_check
    python bench/gpu_check.py --tiny --out /tmp/gpu_check
    torchrun --standalone --nproc_per_node=1 bench/gpu_check.py --parts rollout_b64,head --out runs/gc2

What it does not do: load real checkpoints or data, run the retrieval server, or measure more than one
GPU (with several ranks a budget decision could differ between ranks and hang a collective, so
WORLD_SIZE > 1 is refused).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")            # nothing is downloaded, whatever the cache holds
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import arc_eval  # noqa: E402
import checkpoint  # noqa: E402
import ddp  # noqa: E402
import demo  # noqa: E402
import dgpo  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
import retriever as retriever_lib  # noqa: E402
import rl  # noqa: E402
import rollout  # noqa: E402
import sft  # noqa: E402
from rollout import prompt_ids  # noqa: E402

GB = 1e9                      # decimal GB, as docs/gpu.md's figures on paper
PAPER_TFLOPS = 100e12         # docs/gpu.md's "~30 s at 100 TFLOP/s"
LR = 1e-5                     # every weight moves by more than its fp32 rounding step, so "changed" means something
# docs/gpu.md's totals per GPU for the real shapes (micro-batch 4 × 4,096 with gradient checkpointing)
PAPER_TOTALS = {"ppo_ckpt": "; docs/gpu.md: ~30–35 GB in all, the rollout's KV cache included",
                 "grpo_ckpt": "; docs/gpu.md: PPO's less the critic's 7.9 GB"}


# -----------------------------------------------------------------------------
# Shapes: the real ones for a GPU, tiny ones for a CPU


QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151_936)
QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151_936)


@dataclass
class Shapes:
    student: dict                 # Qwen2Config fields of the student (and of the critic)
    teacher: dict                 # ... of the teacher
    tokens: int                   # token ids in use: Qwen2.5's tokenizer has 151,665 of the 151,936 rows
    seq_len: int                  # trajectory length (rows are 90-100% of it)
    batch: int                    # trajectories per optimizer step
    micro_batch: int              # trajectories per forward/backward
    group_size: int               # GRPO rollouts per question
    loss_frac: float              # share of positions the policy sampled (the loss positions)
    rollout_batches: tuple        # rows per rollout() call, one part each
    max_new_tokens: int           # sampled tokens per turn (at most; the budget may shorten it)
    max_turns: int                # searches allowed; a random model hardly ever writes a tag: max_turns + 1 turns
    expected_params: tuple = ()   # (student, teacher) parameter counts of the real models, checked


FULL = Shapes(student=QWEN25_05B, teacher=QWEN25_3B, tokens=151_665, seq_len=4096, batch=8, micro_batch=4,
              group_size=4, loss_frac=0.2, rollout_batches=(64, 256), max_new_tokens=500, max_turns=1,
              expected_params=(494_032_768, 3_085_938_688))
TINY = Shapes(student=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=2304),
              teacher=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=2304),
              tokens=2048, seq_len=256, batch=4, micro_batch=2, group_size=2, loss_frac=0.2,
              rollout_batches=(4, 8), max_new_tokens=12, max_turns=1)


def qwen_config(fields: dict):
    """A Qwen2.5-style config: tied embeddings, RoPE θ = 1e6, 32k positions, RMSNorm ε = 1e-6."""
    from transformers import Qwen2Config
    return Qwen2Config(**fields, tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=32768)


def random_model(fields: dict, device, dtype, seed: int):
    """A causal LM with random weights, built directly on `device` (a 3B model initialised on the CPU
    would take longer than its whole training part)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(qwen_config(fields), dtype=dtype)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def millions(n: int) -> str:
    return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n / 1e6:.3g}M"


def gb(n_bytes: float) -> str:
    """Decimal GB, one decimal from 1 GB up, three significant digits below (tiny shapes)."""
    return f"{n_bytes / GB:.1f}" if n_bytes >= GB else f"{n_bytes / GB:.3g}"


# -----------------------------------------------------------------------------
# Measuring: time, peak memory, whether parameters moved, forward time by kind


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn(), seconds), with the GPU's queue drained at both ends."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def _proc_status_gb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024 / GB
    except (OSError, StopIteration):
        return None


class PeakMemory:
    """Peak memory while the block runs: the CUDA allocator's peak on a GPU (what docs/gpu.md's
    figures count); on a CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs where
    that is allowed). `peak_gb` is absolute, `growth_gb` above the start of the block."""

    def __init__(self, device):
        self.device, self.peak_gb, self.growth_gb = device, None, None

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / GB
        else:
            self.start = _proc_status_gb("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass                                          # VmHWM then holds the process's peak so far
        return self

    def __exit__(self, *exc):
        sync(self.device)
        if self.device.type == "cuda":
            self.peak_gb = torch.cuda.max_memory_allocated(self.device) / GB
        else:
            self.peak_gb = _proc_status_gb("VmHWM")
        if self.peak_gb is not None and self.start is not None:
            self.growth_gb = self.peak_gb - self.start
        return False


@torch.no_grad()
def fingerprint(model) -> torch.Tensor:
    """Per parameter tensor (Σ w, Σ w²) in float64, (P, 2): an optimizer step that moves any weight of
    a tensor changes its row (the chance of an exact cancellation in both is nil)."""
    return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()])


def changed(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int]:
    """(tensors whose fingerprint moved, tensors)."""
    return int((before != after).any(dim=1).sum()), before.shape[0]


class ForwardClock:
    """Times every forward of `model`, filed as prefill (more than one new token per row) or decode
    (one token per row). The GPU is synchronised around each forward; rollout() and generate() read
    every step's tokens back to the host anyway, so this adds no wait they do not already have."""

    def __init__(self, model, device):
        self.device = device
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.calls = {"prefill": 0, "decode": 0}
        self.tokens = {"prefill": 0, "decode": 0}
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)                 # (R, n)
        self.kind = "decode" if ids.shape[1] == 1 else "prefill"
        self.count = ids.numel()
        sync(self.device)
        self.start = time.perf_counter()

    def _after(self, module, args, kwargs, output):
        sync(self.device)
        self.seconds[self.kind] += time.perf_counter() - self.start
        self.calls[self.kind] += 1
        self.tokens[self.kind] += self.count

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# -----------------------------------------------------------------------------
# The shared pieces every part may need, built on first use (a failed build is kept and re-raised,
# so a broken model costs its time once, not once per part)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_distributed():
    """ddp.setup() as torchrun would call it: without torchrun this process becomes rank 0 of 1
    (the variables torchrun would set), so the same NCCL/gloo initialisation runs either way."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    return ddp.setup()


class Context:
    def __init__(self, shapes: Shapes, work_dir: str):
        self.shapes, self.work_dir = shapes, work_dir
        self._built: dict[str, object] = {}
        self._errors: dict[str, BaseException] = {}
        self._dist: ddp.Dist | None = None
        self.dist_error: Exception | None = None

    def _once(self, name: str, build):
        if name in self._errors:
            raise RuntimeError(f"needs {name}, which failed to build: {self._errors[name]!r}") \
                from self._errors[name]
        if name not in self._built:
            try:
                self._built[name] = build()
            except Exception as error:
                self._errors[name] = error
                raise
        return self._built[name]

    @property
    def dist(self) -> ddp.Dist:
        """ddp.setup()'s Dist; if the set-up fails, the distributed part reports it and the other
        parts still run on the device setup() would have picked, without DDP."""
        if self._dist is None:
            try:
                self._dist = start_distributed()
            except Exception as error:
                self.dist_error = error
                local = int(os.environ.get("LOCAL_RANK", 0))
                self._dist = ddp.Dist(device=torch.device("cuda", local) if torch.cuda.is_available()
                                      else torch.device("cpu"))
        return self._dist

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def student_dir(self) -> str:
        """A directory holding the random student (bf16 on disk; models.load_model reads it as fp32,
        as it reads a real checkpoint for training)."""
        def build():
            model = random_model(self.shapes.student, self.device, torch.bfloat16, seed=0)
            path = os.path.join(self.work_dir, "student")
            model.save_pretrained(path)
            self.student_params = n_params(model)
            return path
        return self._once("student", build)

    @property
    def teacher_view(self) -> models.HeadAtPositions:
        """The frozen teacher, as models.load_model keeps one (bf16 on a GPU, fp32 on a CPU), behind
        its checked head-at-positions view. Built in memory: 6 GB of random weights are not worth a
        round trip through the disk."""
        def build():
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            teacher = random_model(self.shapes.teacher, self.device, dtype, seed=1).eval().requires_grad_(False)
            bad = checkpoint.first_non_finite(teacher)
            if bad is not None:
                raise ValueError(f"teacher weight {bad} is not finite")
            return models.HeadAtPositions(teacher).check()
        return self._once("teacher", build)

    def drop_teacher(self) -> None:
        self._built.pop("teacher", None)
        self.release()

    def release(self) -> None:
        """Frees what the last part left behind (its models, optimizers, cached GPU blocks)."""
        gc.collect()
        if self._dist is not None and self._dist.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def world(self):
        return self._once("demo world", lambda: demo.make_world(seed=0))

    @property
    def tokenizer(self):
        return self._once("demo tokenizer", lambda: demo.train_tokenizer(self.world))

    @property
    def retriever(self):
        return self._once("retriever", lambda: retriever_lib.BM25Retriever(self.world.corpus))


def ddp_view(model, dist: ddp.Dist):
    """The view a trainer computes its losses through, DDP-wrapped as on N GPUs. models.wrap wraps only
    when world_size > 1; here the one rank is wrapped anyway, so the no_sync accumulation and the
    bucketed all-reduce of a multi-GPU run are exercised (and their memory counted). Unwrapped only if
    the distributed set-up failed (that part reports why)."""
    view = models.HeadAtPositions(model).check()
    if not torch_dist.is_initialized():
        return view
    return DDP(view, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)


# -----------------------------------------------------------------------------
# Synthetic trajectories


def synthetic_records(n: int, length: int, loss_frac: float, tokens: int, seed: int, ragged: bool = True,
                      turns: int = 4) -> list[dict]:
    """n trajectories laid out like Search-R1's: a prompt (6% of the row), then `turns` rounds of a
    sampled run (loss_mask 1) followed by a forced observation (loss_mask 0), the sampled runs a
    `loss_frac` share of the row. Ids uniform in [0, tokens); rows 90-100% of `length` when ragged."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(n):
        size = int(length * (0.9 + 0.1 * torch.rand((), generator=g).item())) if ragged else length
        ids = torch.randint(0, tokens, (size,), generator=g).tolist()
        prompt = int(0.06 * size)
        span = (size - prompt) // turns
        run = min(span, round(loss_frac * size / turns))
        mask = [0] * size
        for k in range(turns):
            mask[prompt + k * span:prompt + k * span + run] = [1] * run
        records.append({"input_ids": ids, "loss_mask": mask})
    return records


def rl_records(algo: str, shapes: Shapes, seed: int) -> list[dict]:
    """Scored rollouts for one RL step: GRPO groups of group_size with right and wrong answers mixed
    (so advantages are not 0 and the selective KL acts on the wrong ones); PPO one rollout a question."""
    records = synthetic_records(shapes.batch, shapes.seq_len, shapes.loss_frac, shapes.tokens, seed)
    size = shapes.group_size if algo == "grpo" else 1
    for i, r in enumerate(records):
        r["group"], r["em"] = i // size, float(i % 3 == 0)
    return records


def total_tokens(records: list[dict]) -> int:
    return sum(len(r["input_ids"]) - 1 for r in records)


# -----------------------------------------------------------------------------
# Part: distributed set-up


def check_distributed(ctx: Context, share: float) -> dict:
    dist = ctx.dist
    if ctx.dist_error is not None:
        raise ctx.dist_error
    cuda = torch.cuda.is_available()
    backend = torch_dist.get_backend()
    local_rank = int(os.environ["LOCAL_RANK"])
    want_device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    # one all-reduce: every rank adds rank + 1, so the sum is ws(ws + 1)/2
    value = torch.tensor([dist.rank + 1.0], device=dist.device)
    torch_dist.all_reduce(value)
    want_sum = dist.world_size * (dist.world_size + 1) / 2
    # a DDP-wrapped head-at-positions view: one CE step's gradients equal the plain model's
    model = random_model(TINY.student, dist.device, torch.float32, seed=2).train()
    plain = copy.deepcopy(model)
    records = synthetic_records(2, 64, 0.2, TINY.tokens, seed=3)
    n = models.loss_token_count(records)
    with PeakMemory(dist.device) as mem:
        (loss, _), seconds = timed(lambda: sft.supervised_loss(ddp_view(model, dist), None, records, n,
                                                               TINY.tokens, 1.0, dist), dist.device)
        loss.backward()
    plain_loss, _ = sft.supervised_loss(models.HeadAtPositions(plain), None, records, n, TINY.tokens, 1.0, dist)
    plain_loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    plain_grads = torch.cat([p.grad.flatten() for p in plain.parameters()])
    grad_error = ((grads - plain_grads).norm() / plain_grads.norm()).item()
    return {"seconds": seconds, "peak_gb": mem.peak_gb, "growth_gb": mem.growth_gb, "loss": loss.item(),
            "details": {"backend": backend, "device": str(dist.device), "rank": dist.rank,
                        "world_size": dist.world_size, "all_reduce": value.item(), "ddp_grad_rel_error": grad_error},
            "checks": {f"backend {'nccl' if cuda else 'gloo'}": backend == ("nccl" if cuda else "gloo"),
                       f"device {want_device}": dist.device == want_device,
                       "all-reduce sum": value.item() == want_sum,
                       "DDP gradients = plain gradients": grad_error < 1e-3,
                       "loss finite": math.isfinite(loss.item())},
            "summary": f"{backend} on {dist.device}; all-reduce {value.item():g} (want {want_sum:g}); "
                       f"DDP grad rel. error {grad_error:.1e}"}


# -----------------------------------------------------------------------------
# Part: the models


def check_models(ctx: Context, share: float) -> dict:
    with PeakMemory(ctx.device) as mem:
        (_, view), seconds = timed(lambda: (ctx.student_dir, ctx.teacher_view), ctx.device)
    student, teacher = ctx.student_params, n_params(view.lm)
    saved = sorted(os.listdir(ctx.student_dir))
    checks = {"teacher weights finite": checkpoint.first_non_finite(view.lm) is None,
              "student saved as an HF directory": "config.json" in saved and any(f.endswith(".safetensors")
                                                                                 for f in saved)}
    if ctx.shapes.expected_params:
        want_s, want_t = ctx.shapes.expected_params
        checks.update({f"student has Qwen2.5-0.5B's {want_s:,} parameters": student == want_s,
                       f"teacher has Qwen2.5-3B's {want_t:,} parameters": teacher == want_t})
    dtype = str(next(view.lm.parameters()).dtype).replace("torch.", "")
    return {"seconds": seconds, "peak_gb": mem.peak_gb, "growth_gb": mem.growth_gb,
            "details": {"student_params": student, "teacher_params": teacher, "teacher_dtype": dtype},
            "checks": checks,
            "summary": f"student {millions(student)} parameters (saved, read back by models.load_model), "
                       f"teacher {millions(teacher)} in {dtype}",
            "paper": f"student 494M, teacher 3.09B; teacher frozen in bf16 {gb(2 * teacher)} GB"}


# -----------------------------------------------------------------------------
# Parts: one optimizer step of KD, DGPO (GRPO) and PPO


def kd_step(actor, teacher, optimizer, scheduler, records: list[dict], shapes: Shapes, dist: ddp.Dist) -> dict:
    """sft.train_supervised's step: micro-batches of sft.supervised_loss (CE + λ·KL(π_T‖π_θ), the
    global-token normaliser), gradients accumulated under DDP's no_sync, loop.optimizer_step."""
    normaliser = models.global_token_count(dist, records) / dist.world_size
    chunks = models.micro_batches(records, shapes.micro_batch)
    total, finite = 0.0, True
    for i, chunk in enumerate(chunks):
        with ddp.ddp_sync(actor, last=i == len(chunks) - 1):
            loss, _ = sft.supervised_loss(actor, teacher, chunk, normaliser, shapes.tokens, 1.0, dist)
            loss.backward()
        total += loss.item()
        finite &= math.isfinite(loss.item())
    counters: dict = {}
    norm = loop.optimizer_step(actor, optimizer, scheduler, 1.0, counters, dist, finite)
    return {"loss": total, "grad_norm": norm, "skipped_steps": counters.get("skipped_steps", 0)}


def rl_config(algo: str, shapes: Shapes) -> rl.RLConfig:
    """DGPO as the project runs it by default (GRPO, selective KL(π_θ‖π_T) as a loss, exact KL), or
    the paper's PPO (critic, k1 teacher penalty in the reward of wrong rollouts, entropy bonus)."""
    common = dict(prompts_per_step=shapes.batch // (shapes.group_size if algo == "grpo" else 1),
                  micro_batch_size=shapes.micro_batch, lr=LR, warmup_ratio=0.0, critic_lr=LR,
                  critic_warmup_ratio=0.0, teacher_mode="selective")
    if algo == "grpo":
        return rl.RLConfig(algo="grpo", group_size=shapes.group_size, teacher_as="loss", kl="full", **common)
    return rl.RLConfig(algo="ppo", group_size=1, teacher_as="reward", entropy_coef=0.001, **common)


def paper_step(algo: str, student: int, teacher: int, tokens: int) -> tuple[float, float]:
    """docs/gpu.md's arithmetic: the models' bytes (16 a trained parameter: fp32 weights, gradient, two
    Adam moments; the critic as much again; 2 a teacher parameter) and the step's FLOPs (6 a token per
    trained parameter, 2 per teacher parameter)."""
    trained = student * (2 if algo == "ppo" else 1)
    return 16 * trained + 2 * teacher, tokens * (6 * trained + 2 * teacher)


def check_training(ctx: Context, share: float, algo: str, checkpointing: bool) -> dict:
    shapes, dist = ctx.shapes, ctx.dist
    teacher = ctx.teacher_view
    model = models.load_model(ctx.student_dir, dist, trainable=True, grad_checkpointing=checkpointing,
                              arg="--student")
    model.train()
    actor = ddp_view(model, dist)
    optimizer, scheduler = loop.make_optimizer(model, LR, 0.0, 2, 0, None)
    nets = {"actor": model}
    if algo == "kd":
        records = synthetic_records(shapes.batch, shapes.seq_len, shapes.loss_frac, shapes.tokens, seed=10)

        def step():
            return kd_step(actor, teacher, optimizer, scheduler, records, shapes, dist)
    else:
        records, cfg = rl_records(algo, shapes, seed=20), rl_config(algo, shapes)
        rl.check_rl_config(cfg, dist)
        critic = None
        if algo == "ppo":
            critic_hf = rl.load_critic(ctx.student_dir, dist, checkpointing, "--student", fresh=True)
            critic = rl.Critic(ddp_view(critic_hf, dist), *loop.make_optimizer(critic_hf, LR, 0.0, 2, 0, None))
            nets.update({"critic": critic_hf, "critic head": critic_hf.score})

        def step():
            counters: dict = {}
            out = rl.rl_update(actor, teacher, optimizer, scheduler, copy.deepcopy(records), cfg, dist,
                               shapes.tokens, counters, critic)
            return {**out, "skipped_steps": counters.get("skipped_steps", 0)
                    + counters.get("critic", {}).get("skipped_steps", 0)}
    before = {k: fingerprint(m) for k, m in nets.items()}
    with PeakMemory(dist.device) as mem:
        warmup, warmup_s = timed(step, dist.device)
        measured = warmup_s <= share / 3
        out, seconds = timed(step, dist.device) if measured else (warmup, warmup_s)
    moved = {k: changed(before[k], fingerprint(m)) for k, m in nets.items()}
    tokens = total_tokens(records)
    loss_share = sum(sum(r["loss_mask"][1:]) for r in records) / tokens
    losses = {k: v for k, v in out.items() if k in ("loss", "vf_loss")}
    models_bytes, flops = paper_step(algo, n_params(model), n_params(teacher.lm), tokens)
    # the student's bf16 logits at the loss positions of one micro-batch (docs/gpu.md's "≈ 1.1 GB")
    longest = max(sum(r["loss_mask"][1:]) for r in records)
    logits_bytes = shapes.micro_batch * longest * shapes.student["vocab_size"] * 2
    checks = {"loss finite": all(math.isfinite(v) for v in [*losses.values(), *(warmup[k] for k in losses)]),
              "no step skipped": out["skipped_steps"] == 0 and warmup["skipped_steps"] == 0}
    checks["every actor parameter changed"] = moved["actor"][0] == moved["actor"][1]
    if "critic" in moved:
        # the critic's value head starts at zero, so the first step moves the head alone (its backbone's
        # gradient flows through the head's weights); from the second step on, everything moves
        checks["critic value head changed"] = moved["critic head"][0] == moved["critic head"][1]
        if measured:
            checks["every critic parameter changed (2 steps)"] = moved["critic"][0] == moved["critic"][1]
    note = "" if measured else "; warm-up step only (time budget)"
    note += "" if isinstance(actor, DDP) else "; not DDP-wrapped (the distributed set-up failed)"
    name = algo + ("_ckpt" if checkpointing else "")
    return {"seconds": seconds, "peak_gb": mem.peak_gb, "growth_gb": mem.growth_gb, "loss": out["loss"],
            "params_changed": ", ".join(f"{k} {a}/{b}" for k, (a, b) in moved.items() if k != "critic head"),
            "details": {"metrics": out, "warmup_s": warmup_s, "measured_step": measured, "tokens": tokens,
                        "sequences": len(records), "micro_batch": shapes.micro_batch, "loss_share": loss_share,
                        "ddp": isinstance(actor, DDP),
                        "gradient_checkpointing": checkpointing, "paper_models_gb": models_bytes / GB,
                        "paper_logits_gb": logits_bytes / GB, "paper_seconds": flops / PAPER_TFLOPS,
                        "tflops_by_paper_count": flops / seconds / 1e12},
            "checks": checks,
            "summary": f"{len(records)} × ~{tokens // len(records):,} tokens, {loss_share:.0%} loss positions, "
                       f"micro-batch {shapes.micro_batch}; {tokens / seconds:,.0f} tokens/s, "
                       f"{flops / seconds / 1e12:.3g} TFLOP/s by docs/gpu.md's count (warm-up step "
                       f"{warmup_s:.1f} s){note}",
            "paper": f"models {gb(models_bytes)} GB + logits {gb(logits_bytes)} GB + activations"
                     f"{PAPER_TOTALS.get(name, '') if shapes is FULL else ''}; {flops / PAPER_TFLOPS:.2g} s at "
                     "100 TFLOP/s"}


# -----------------------------------------------------------------------------
# Part: logits at the loss positions only vs full logits


def full_batch(records: list[dict], device):
    """Equal-length records as (B, T) inputs, targets and bool mask: what a full-logits trainer uses."""
    inputs = torch.tensor([r["input_ids"][:-1] for r in records], device=device)                    # (B, T)
    targets = torch.tensor([r["input_ids"][1:] for r in records], device=device)                    # (B, T)
    mask = torch.tensor([r["loss_mask"][1:] for r in records], dtype=torch.bool, device=device)     # (B, T)
    return inputs, targets, mask


def check_head(ctx: Context, share: float) -> dict:
    """One KD micro-batch (forward of student and teacher, backward of the student) both ways, with
    gradient checkpointing on so the logits, not the activations, decide the difference."""
    shapes, dist = ctx.shapes, ctx.dist
    teacher = ctx.teacher_view
    model = models.load_model(ctx.student_dir, dist, trainable=True, grad_checkpointing=True, arg="--student")
    model.train()
    records = synthetic_records(shapes.micro_batch, shapes.seq_len, shapes.loss_frac, shapes.tokens, seed=30,
                                ragged=False)
    n = models.loss_token_count(records)
    inputs, targets, mask = full_batch(records, dist.device)

    def heads():
        model.zero_grad(set_to_none=True)
        loss, _ = sft.supervised_loss(models.HeadAtPositions(model), teacher, records, n, shapes.tokens, 1.0, dist)
        loss.backward()
        return loss.item()

    def full():
        model.zero_grad(set_to_none=True)
        with ddp.autocast(dist):
            logits = model(input_ids=inputs, use_cache=False).logits                                # (B, T, V)
            with torch.no_grad():
                teacher_logits = teacher.lm(input_ids=inputs, use_cache=False).logits              # (B, T, V)
            loss, _ = dgpo.kd_loss(logits, teacher_logits, targets, mask, lam=1.0, normaliser=n,
                                   vocab_size=shapes.tokens)
        loss.backward()
        return loss.item()

    runs = {}
    for name, fn in (("heads", heads), ("full", full)):
        timed(fn, dist.device)                                                   # warm-up
        with PeakMemory(dist.device) as mem:
            loss, seconds = timed(fn, dist.device)
        runs[name] = {"loss": loss, "seconds": seconds, "peak_gb": mem.peak_gb, "growth_gb": mem.growth_gb}
    h, f = runs["heads"], runs["full"]
    tol = 1e-2 if dist.device.type == "cuda" else 1e-5                          # bf16 logits vs fp32
    L = max(sum(r["loss_mask"][1:]) for r in records)
    B, T, V = inputs.shape[0], inputs.shape[1], shapes.student["vocab_size"]
    itemsize = 2 if dist.device.type == "cuda" else 4
    time_ratio = h["seconds"] / f["seconds"]
    mem_ratio = h["growth_gb"] / f["growth_gb"] if h["growth_gb"] and f["growth_gb"] else float("nan")
    return {"seconds": h["seconds"], "peak_gb": h["peak_gb"], "growth_gb": h["growth_gb"], "loss": h["loss"],
            "details": {**{f"{k}_{m}": v for k, r in runs.items() for m, v in r.items()},
                        "time_ratio": time_ratio, "memory_ratio": mem_ratio, "B": B, "T": T, "L": L, "V": V},
            "checks": {"loss finite": math.isfinite(h["loss"]) and math.isfinite(f["loss"]),
                       "heads loss = full loss": abs(h["loss"] - f["loss"]) <= tol * max(1.0, abs(f["loss"]))},
            "summary": f"B·T = {B}×{T}, V = {V:,}: heads {h['seconds']:.2f} s, +{_num(h['growth_gb'], '.3g')} GB; "
                       f"full {f['seconds']:.2f} s, +{_num(f['growth_gb'], '.3g')} GB; time {time_ratio:.2f}×, "
                       f"memory {mem_ratio:.2f}×",
            "paper": f"student logits {gb(B * L * V * itemsize)} GB instead of {gb(B * T * V * itemsize)} GB"}


# -----------------------------------------------------------------------------
# Parts: rollout speed against model.generate and a ragged decode loop


def left_pad(rows: list[list[int]], pad_id: int, device):
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)                   # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)            # (B, T)
    return ids, mask


@torch.no_grad()
def generate_decode(model, prompts: list[list[int]], new_tokens: int, pad_id: int, device) -> int:
    """model.generate over the prompts, greedy, every row exactly `new_tokens` new tokens."""
    ids, mask = left_pad(prompts, pad_id, device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    return out[:, ids.shape[1]:].numel()


@torch.no_grad()
def ragged_decode(model, prompts: list[list[int]], new_tokens: list[int], pad_id: int, device) -> int:
    """The decode limit of the rollout's own workload: a bare forward + argmax loop over a DynamicCache
    in which row i decodes exactly new_tokens[i] tokens and then leaves the batch (bench_rollout.py's
    'ragged raw loop', on the device)."""
    from transformers import DynamicCache
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)                                   # (B, T)
    left = torch.tensor(new_tokens)                                                     # (B,) on the host
    cache = DynamicCache()
    while len(left):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]                  # (R, V)
        ids = logits.argmax(dim=-1, keepdim=True)                                       # (R, 1)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
        left = left - 1
        if (left == 0).any():
            keep = (left > 0).nonzero().squeeze(-1)
            index = keep.to(device)
            cache.batch_select_indices(index)
            ids, mask, positions, left = ids[index], mask[index], positions[index], left[keep]
    return sum(new_tokens)


def timed_forwards(fn, model, device) -> dict:
    """fn()'s wall time and the time of its forwards, prefill and decode apart."""
    clock = ForwardClock(model, device)
    try:
        with PeakMemory(device) as mem:
            result, seconds = timed(fn, device)
    finally:
        clock.close()
    steps = max(clock.calls["decode"], 1)
    return {"result": result, "seconds": seconds, "prefill_s": clock.seconds["prefill"],
            "prefill_calls": clock.calls["prefill"], "prefill_tokens": clock.tokens["prefill"],
            "decode_forward_s": clock.seconds["decode"], "decode_steps": clock.calls["decode"],
            "ms_per_decode_step": 1000 * (seconds - clock.seconds["prefill"]) / steps,
            "forward_ms_per_decode_step": 1000 * clock.seconds["decode"] / steps,
            "peak_gb": mem.peak_gb, "growth_gb": mem.growth_gb}


CALIBRATION_TOKENS = 16


def check_rollout(ctx: Context, share: float, batch: int) -> dict:
    began = time.perf_counter()
    shapes, dist = ctx.shapes, ctx.dist
    ctx.drop_teacher()                                 # rollouts come last and need no teacher
    tokenizer, retriever, world = ctx.tokenizer, ctx.retriever, ctx.world
    # the RL actor as train_rl holds it: fp32 weights, rollouts under ddp.autocast (bf16 on a GPU)
    model = models.load_model(ctx.student_dir, dist, trainable=True, arg="--student").eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    questions = (world.train * (batch // len(world.train) + 1))[:batch]
    prompts = [prompt_ids(tokenizer, q["question"]) for q in questions]
    length_budget = rollout.length_budget(None, model)
    generator = torch.Generator(device=dist.device).manual_seed(0)

    def run_rollout(cfg: rl.RLConfig):
        rcfg = rl.rollout_config(cfg, max_total_tokens=length_budget)
        return arc_eval.generate_records(model, tokenizer, questions, retriever, rcfg, dist, batch, generator)

    # calibrate on a few tokens of one turn (which also warms the kernels up), then shorten the turns if
    # the three methods, each at most (max_turns + 1) × max_new_tokens decoding steps, would not fit
    calibration = timed_forwards(lambda: run_rollout(rl.RLConfig(max_turns=0, max_new_tokens=CALIBRATION_TOKENS)),
                                 model, dist.device)
    step_s = calibration["ms_per_decode_step"] / 1000
    left = share - (time.perf_counter() - began)
    projected = 3 * ((shapes.max_turns + 1) * shapes.max_new_tokens * step_s + calibration["prefill_s"])
    new_tokens = shapes.max_new_tokens
    if projected > 0.8 * left:
        new_tokens = max(CALIBRATION_TOKENS, int(shapes.max_new_tokens * 0.8 * left / projected))
    cfg = rl.RLConfig(max_turns=shapes.max_turns, max_new_tokens=new_tokens, temperature=1.0)

    ours = timed_forwards(lambda: run_rollout(cfg), model, dist.device)
    records = ours.pop("result")
    sampled = [sum(r["loss_mask"]) for r in records]                    # tokens the model wrote, per row
    per_row = max(1, round(sum(sampled) / batch))                      # generate: the same total, evenly
    pad = tokenizer.pad_token_id
    with ddp.autocast(dist):
        generate = timed_forwards(lambda: generate_decode(model, prompts, per_row, pad, dist.device), model,
                                  dist.device)
        ragged = timed_forwards(lambda: ragged_decode(model, prompts, [max(1, n) for n in sampled], pad,
                                                      dist.device), model, dist.device)
    ours["tokens"] = sum(sampled)
    for m in (generate, ragged):
        m["tokens"] = m.pop("result")
    for m in (ours, generate, ragged):
        m["tokens_per_s"] = m["tokens"] / m["seconds"]
    vs_generate = ours["tokens_per_s"] / generate["tokens_per_s"]
    vs_ragged = ours["tokens_per_s"] / ragged["tokens_per_s"]
    # docs/gpu.md's KV-cache arithmetic: layers × (K, V) × KV heads × head dim × bytes, for the longest row
    s = shapes.student
    kv_bytes = s["num_hidden_layers"] * 2 * s["num_key_value_heads"] * (s["hidden_size"] // s["num_attention_heads"]) \
        * (2 if dist.device.type == "cuda" else 4)
    longest = max(len(r["input_ids"]) for r in records)
    well_formed = all(len(r["input_ids"]) == len(r["loss_mask"]) and r["loss_mask"][:r["prompt_length"]] ==
                      [0] * r["prompt_length"] for r in records)

    scaled = "" if new_tokens == shapes.max_new_tokens else \
        f" (shortened from {shapes.max_new_tokens} to fit the time budget)"
    return {"seconds": ours["seconds"], "peak_gb": ours["peak_gb"], "growth_gb": ours["growth_gb"],
            "details": {"batch": batch, "max_new_tokens": new_tokens, "max_turns": shapes.max_turns,
                        "calibration_ms_per_step": 1000 * step_s, "projected_s": projected, "rollout": ours,
                        "generate": generate, "ragged_loop": ragged, "vs_generate": vs_generate,
                        "vs_ragged_loop": vs_ragged,
                        "turns_per_row": sum(r["num_turns"] for r in records) / batch,
                        "rows_hitting_budget": sum(r["truncated"] for r in records),
                        "kv_bytes_per_token": kv_bytes, "longest_row": longest},
            # each baseline did the work it is credited with: the first new token of a row comes from the
            # prefill, each further one from a decoding step
            "checks": {"every row sampled tokens": all(n > 0 for n in sampled),
                       "trajectories well formed": well_formed,
                       "generate decoded k tokens a row": generate["tokens"] == batch * per_row
                       and generate["decode_steps"] == per_row - 1,
                       "the ragged loop ran as long as the longest row": ragged["decode_steps"] == max(sampled) - 1},
            "summary": f"{batch} rows, ≤ {new_tokens} tokens × {shapes.max_turns + 1} turns{scaled}: "
                       f"{ours['tokens_per_s']:,.0f} tokens/s = {vs_generate:.2f}× generate, {vs_ragged:.2f}× ragged "
                       f"loop; prefill {ours['prefill_s']:.2f} s, decode {ours['ms_per_decode_step']:.1f} ms/step "
                       f"({ours['forward_ms_per_decode_step']:.1f} ms in the forward)",
            "paper": f"10–20 ms a decoding step; KV cache {gb(batch * longest * kv_bytes)} GB "
                     f"({kv_bytes / 1024:.3g} KB a token × {batch} rows × {longest})"}


# -----------------------------------------------------------------------------
# The runner and the report


def part_list(shapes: Shapes) -> list[tuple[str, object, float]]:
    """(name, fn(ctx, share) -> result, weight of the time budget), in running order."""
    parts = [("distributed", check_distributed, 1), ("models", check_models, 2)]
    for algo in ("kd", "grpo", "ppo"):
        for ckpt in (False, True):
            parts.append((algo + ("_ckpt" if ckpt else ""),
                          lambda ctx, share, a=algo, c=ckpt: check_training(ctx, share, a, c), 2))
    parts.append(("head", check_head, 2))
    for i, batch in enumerate(shapes.rollout_batches):
        parts.append((f"rollout_b{batch}", lambda ctx, share, b=batch: check_rollout(ctx, share, b), 4 + i))
    return parts


class Budget:
    """Seconds left until the deadline, shared among the parts still to run by their weights."""

    def __init__(self, seconds: float, weights: dict[str, float]):
        self.deadline = time.perf_counter() + seconds
        self.weights = dict(weights)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self, name: str) -> float:
        weight = self.weights.pop(name)
        return max(0.0, self.remaining()) * weight / (weight + sum(self.weights.values()))


def run_parts(parts: list[tuple[str, object]], budget: Budget, fail_part: str | None = None,
              cleanup=lambda: None, log=print) -> list[dict]:
    """Runs each part fn(share); a part passes when it returns with every check true. An exception is
    caught and reported with its traceback, and the next part runs."""
    results = []
    for name, fn in parts:
        share = budget.share(name)
        if budget.remaining() <= 0:
            results.append({"part": name, "status": "skipped", "error": "the time budget was spent"})
            log(f"gpu_check: {name}: skipped (time budget spent)")
            continue
        log(f"gpu_check: {name} ({share:.0f} s of budget) ...")
        started = time.perf_counter()
        try:
            if name == fail_part:
                raise RuntimeError(f"failure injected by --fail-part {name}")
            out = fn(share)
            failed = [k for k, ok in out.get("checks", {}).items() if not ok]
            row = {"part": name, "status": "fail" if failed else "ok", **out}
            if failed:
                row["error"] = "failed: " + "; ".join(failed)
        except Exception as error:
            row = {"part": name, "status": "error", "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc()}
        finally:
            cleanup()
        row["wall_s"] = time.perf_counter() - started
        results.append(row)
        log(f"gpu_check: {name}: {row['status']} in {row['wall_s']:.1f} s"
            + (f" — {row['error']}" if row.get("error") else ""))
    return results


def _num(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown_table(results: list[dict], meta: dict) -> str:
    lines = [f"# gpu_check: {meta['shapes']} shapes on {meta['device_name']}",
             "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, CUDA {meta['cuda']}, "
             f"commit {meta['commit']}; {meta['total_s']:.0f} s in all (budget {meta['budget_s']:.0f} s). "
             "GB = 10⁹ bytes; peak = the allocator's peak during the measured work (process RSS on a CPU), "
             "+growth above its start. 'On paper' = docs/gpu.md's arithmetic for these shapes.",
             "",
             "| part | status | seconds | peak GB (+growth) | loss | parameters changed | measured | on paper |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for r in results:
        peak = _num(r.get("peak_gb"), ".2f") + (f" ({r['growth_gb']:+.2f})" if r.get("growth_gb") is not None else "")
        text = r.get("summary", "")
        if r["status"] != "ok":
            text = f"**{r.get('error', '')}** " + text
        cells = [r["part"], r["status"], _num(r.get("seconds"), ".2f"), peak, _num(r.get("loss"), ".4g"),
                 r.get("params_changed", ""), text.replace("|", "\\|").replace("\n", " "), r.get("paper", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_args(argv=None):
    names = [name for name, _, _ in part_list(FULL)] + [name for name, _, _ in part_list(TINY)]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_check", help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (automatic without CUDA): every part in seconds")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="seconds shared among the parts (start-up comes on top; the default keeps it ≤ 10 min)")
    ap.add_argument("--parts", default="", help="comma-separated subset of the parts to run (default: all)")
    ap.add_argument("--fail-part", default=None, help=argparse.SUPPRESS)       # tests: a part that raises
    args = ap.parse_args(argv)
    if args.budget_s <= 0:
        ap.error(f"--budget-s must be > 0, got {args.budget_s}")
    chosen = [p for p in args.parts.split(",") if p]
    unknown = [p for p in chosen if p not in names]
    if unknown:
        ap.error(f"--parts: unknown part(s) {unknown}; the parts are {sorted(set(names))}")
    args.parts = chosen
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                 # a "Loading weights" bar per part drowns the report
    if int(os.environ.get("WORLD_SIZE", 1)) != 1:
        raise SystemExit(f"gpu_check measures one GPU: run it with --nproc_per_node=1 (WORLD_SIZE is "
                         f"{os.environ['WORLD_SIZE']}; a time-budget decision could differ between ranks)")
    tiny = args.tiny or not torch.cuda.is_available()
    if not args.tiny and tiny:
        print("gpu_check: no CUDA device, so every part runs on tiny shapes on the CPU", flush=True)
    shapes = TINY if tiny else FULL
    parts = [p for p in part_list(shapes) if not args.parts or p[0] in args.parts]
    if args.parts and len(parts) != len(args.parts):
        missing = sorted(set(args.parts) - {p[0] for p in parts})
        raise SystemExit(f"--parts {missing}: not parts of the {'tiny' if tiny else 'full'}-shape run")
    os.makedirs(args.out, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="gpu_check-models-", dir=args.out)     # the student's directory
    ctx = Context(shapes, work_dir)
    budget = Budget(args.budget_s, {name: weight for name, _, weight in parts})
    print(f"gpu_check: {'tiny' if tiny else 'full'} shapes, {len(parts)} parts, budget {args.budget_s:.0f} s",
          flush=True)
    try:
        results = run_parts([(name, lambda share, fn=fn: fn(ctx, share)) for name, fn, _ in parts], budget,
                            args.fail_part, cleanup=ctx.release, log=lambda text: print(text, flush=True))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    import transformers
    cuda = ctx.device.type == "cuda"
    meta = {"shapes": "tiny" if tiny else "full (Qwen2.5-0.5B student, Qwen2.5-3B teacher)",
            "device_name": torch.cuda.get_device_name() if cuda else "CPU",
            "device_memory_gb": torch.cuda.get_device_properties(0).total_memory / GB if cuda else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "commit": git_commit(), "command": " ".join(sys.argv), "budget_s": args.budget_s,
            "total_s": time.perf_counter() - started, "shape_settings": dataclasses.asdict(shapes)}
    table = markdown_table(results, meta)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"meta": meta, "parts": results}, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table)
    print("\n" + table, flush=True)
    failed = [r["part"] for r in results if r["status"] != "ok"]
    print(f"gpu_check: {len(results) - len(failed)}/{len(results)} parts ok"
          + (f"; not ok: {', '.join(failed)}" if failed else "") + f" -> {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
