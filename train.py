"""The DGPO pipeline: teacher data → cold-start KD → GRPO with teacher guidance → evaluation, on DDP.

What it does. Stages, each runnable alone with explicit inputs and outputs (HF model directories and
JSONL files), and `demo` (the default with no arguments) chaining all of them on the built-in world:
  teacher  SFT a model on trajectories (the demo teacher learns from the oracle; real users bring one)
  tgo      roll the teacher out over training questions, keep the correct trajectories (docs/method.md §1)
  kd       cold start: student ← CE + λ·KL(π_T‖π_θ) on the teacher's tokens (dgpo.kd_loss)
  rl       DGPO: rollouts, binary EM reward, the teacher's guidance on wrong rollouts; GRPO or PPO
           with a critic (rl.py, which uses the machinery below)
  eval     arc_metric.evaluate on a questions file
  demo     world → teacher → tgo → kd → rl → eval, then the paper-style results table
The shared machinery lives here too: DDP set-up, models and atomic checkpoints (checkpoint.py),
batches whose LM head runs only at loss positions (HeadAtPositions), the optimizer, the CLI.

What it does not do: define the losses (dgpo.py), the generation loop (rollout.py), the metric
(arc_metric.py), the search engine (retriever.py) or the RL update (rl.py).

Distributed. `torchrun --nproc_per_node=N train.py rl ...` runs plain DDP: NCCL + bf16 autocast on
GPUs, gloo + fp32 on CPU (decided in `setup()` and `autocast()` only). Each rank rolls out its own
shard of whole GRPO groups; every loss is normalised by the GLOBAL token count, so N ranks make the
same update as one process with the whole batch, and every rank runs the same number of backward
passes (equal shards). Checkpoints are `save_pretrained` directories plus `trainer_state.pt`.

    python train.py                                    # the whole demo on CPU (~20 min)
    python train.py demo --preset small                # the same chain in under a minute
    torchrun --nproc_per_node=8 train.py rl --student ckpt/kd --teacher ckpt/teacher \\
        --data data/nq_hotpotqa_train/train.parquet --retriever-url http://127.0.0.1:8000/retrieve --out runs/rl
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import arc_metric
import checkpoint
import data
import dgpo
import rollout as rollout_lib
import stats
from rollout import RolloutConfig, rollout

# -----------------------------------------------------------------------------
# Configs: the defaults are the paper's values where the paper gives one (docs/method.md §4)


@dataclass
class SupervisedConfig:
    """Teacher SFT (no teacher: CE only) and the KD cold start (CE + λ·forward KL to the teacher)."""
    steps: int = 1000              # optimizer steps
    batch_size: int = 8            # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8      # sequences per forward/backward on one rank
    lr: float = 1e-5               # peak learning rate
    min_lr_ratio: float = 0.1      # cosine decay to lr·min_lr_ratio
    warmup_steps: int = 20         # linear warm-up steps
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # max global gradient norm
    lam: float = 1.0               # λ of the KD term (docs/method.md §4)
    seed: int = 0                  # data order and any sampling
    eval_every: int = 0            # held-out KD loss every N steps (0 = only at the end)
    save_every: int = 0            # a resumable checkpoint every N steps (0 = only at the end)


# the legal values of the enumerated options (rl.RLConfig's): the CLI offers them as choices, the
# trainers check them
CHOICES = {"algo": ("grpo", "ppo"), "teacher_mode": ("selective", "uniform", "none"),
           "teacher_as": ("loss", "reward"), "kl": ("full", "k2", "k3"), "agg": dgpo.AGG_MODES}

# The legal range of every numeric setting, (low, high, low is allowed, high is allowed), None = no
# bound; every value must also be finite. The CLI checks them at parse time (they show in --help);
# the trainers check them again for callers of the Python API. Why some bounds exist: grad_clip 0
# would clip every update to nothing; a negative beta pushes the student away from the teacher;
# AdamW moves every weight by about lr per step and shrinks it by lr·weight_decay, so above 1 either
# destroys the model within steps (lr 1e30: NaN logits two steps later, in sampling). (RL also needs
# temperature > 0: rl.py.)
RANGES = {
    "steps": (1, None, True, None), "batch_size": (1, None, True, None),
    "micro_batch_size": (1, None, True, None), "lr": (0, 1, True, True),
    "min_lr_ratio": (0, 1, True, True), "warmup_steps": (0, None, True, None),
    "weight_decay": (0, 1, True, True), "grad_clip": (0, None, False, None), "lam": (0, None, True, None),
    "seed": (0, None, True, None), "eval_every": (0, None, True, None), "save_every": (0, None, True, None),
    "prompts_per_step": (1, None, True, None), "group_size": (1, None, True, None),
    "mini_batches": (1, None, True, None), "rollout_batch_size": (1, None, True, None),
    "warmup_ratio": (0, 1, True, True), "beta": (0, None, True, None), "clip_low": (0, 1, True, False),
    "clip_high": (0, None, True, None), "entropy_coef": (0, None, True, None),
    "temperature": (0, None, True, None), "top_p": (0, 1, False, True), "max_turns": (0, None, True, None),
    "max_new_tokens": (1, None, True, None), "max_obs_tokens": (0, None, True, None),
    "max_total_tokens": (1, None, True, None), "topk": (1, None, True, None), "eval_limit": (0, None, True, None),
    "critic_lr": (0, 1, True, True), "critic_warmup_ratio": (0, 1, True, True), "value_clip": (0, None, False, None),
    "gamma": (0, 1, True, True), "gae_lambda": (0, 1, True, True), "max_draws": (1, None, True, None),
    "probe_samples": (0, None, True, None), "pool_eval_limit": (0, None, True, None),
    "retriever_retry_seconds": (0, None, True, None), "retriever_timeout": (0, None, False, None),
}


def range_text(name: str) -> str:
    low, high, low_ok, high_ok = RANGES[name]
    if high is None:
        return f"{'>=' if low_ok else '>'} {low}"
    return f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"


def in_range(name: str, value) -> bool:
    """Inside RANGES[name], and finite: no setting means anything at inf or NaN (`--lr inf` would
    only crash steps later, in sampling)."""
    low, high, low_ok, high_ok = RANGES[name]
    if value is None:
        return name == "max_total_tokens"
    if not math.isfinite(value):
        return False
    above = value >= low if low_ok else value > low
    below = high is None or (value <= high if high_ok else value < high)
    return above and below


def check_config(cfg) -> None:
    """Every numeric setting of a config inside its RANGES, every enumerated one among CHOICES."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in RANGES and not in_range(f.name, value):
            finite = "finite and " if value is not None and not math.isfinite(value) else ""
            raise ValueError(f"{type(cfg).__name__}.{f.name}={value!r}: must be {finite}{range_text(f.name)}")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ValueError(f"{type(cfg).__name__}.{f.name}={value!r}: must be one of {CHOICES[f.name]}")


# -----------------------------------------------------------------------------
# Distributed set-up, precision and logging: the only places CPU and GPU differ


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Dist:
    """Reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return Dist(rank, world_size, local_rank, device)


def autocast(dist: Dist):
    """bf16 autocast on GPU; fp32 on CPU (this CPU has no fast bf16)."""
    if dist.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def print0(dist: Dist, *args) -> None:
    if dist.master:
        print(*args, flush=True)


def all_reduce_sum(dist: Dist, values: list[float]) -> list[float]:
    """Sums a list of numbers over ranks (one collective for the whole list)."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(dist: Dist, items: list) -> list:
    """Concatenates every rank's list, in rank order."""
    if not dist.enabled:
        return items
    gathered = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


# -----------------------------------------------------------------------------
# Models, tokenizers and checkpoints


def pretrained(loader, path: str, arg: str, **kwargs):
    """`loader.from_pretrained(path)` for a local directory or a Hub id, with one clear error naming
    the command-line argument when it is neither (a missing path, a Hub id offline and not cached)."""
    if not os.path.isdir(path) and (os.path.exists(path) or path.count("/") > 1 or path.startswith((".", "~"))):
        raise FileNotFoundError(f"{arg} {path}: not a model directory (and not a Hub id of the form org/name)")
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        if os.path.isdir(path):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"{arg} {path}: neither a local model directory nor a Hub id that can be "
                                f"loaded here (offline and not cached?): {first_line}") from None


# what a local model directory must hold: transformers' own messages for a missing piece are a
# 1-token tokenizer or "cannot reshape a tensor of 0 elements" much later
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "qwen.tiktoken")


def check_model_dir(path: str, arg: str, needs: str) -> None:
    """A local directory (not a Hub id) holds what `needs` ("model" or "tokenizer") loads from; and a
    checkpoint of this project has the checksums its files were saved with (checkpoint.verify; the
    trainer state is verified where it is read)."""
    if not os.path.isdir(path):
        return
    names = set(os.listdir(path))
    if needs == "model":
        if "config.json" not in names:
            raise FileNotFoundError(f"{arg} {path}: not a model directory: it has no config.json")
        if not names & set(WEIGHT_FILES):
            raise FileNotFoundError(f"{arg} {path}: no weights in it (none of {', '.join(WEIGHT_FILES)})")
        checkpoint.verify(path, which=lambda rel: rel != STATE_FILE)
    elif not names & set(TOKENIZER_FILES):
        raise FileNotFoundError(f"{arg} {path}: no tokenizer in it (none of {', '.join(TOKENIZER_FILES)}); "
                                "save the tokenizer beside the model (tokenizer.save_pretrained)")


def load_model(path: str, dist: Dist, trainable: bool, grad_checkpointing: bool = False, arg: str = "--model"):
    """An HF causal LM from a local directory or a Hub id: fp32 weights when trained (AdamW state in
    fp32; bf16 comes from autocast), bf16 when frozen on GPU (the teacher), fp32 on CPU. A checkpoint
    whose files differ from their recorded checksums, a directory without config or weights, weights
    that cannot be read (named) and a model with a non-finite weight are refused."""
    from transformers import AutoModelForCausalLM
    dtype = torch.float32 if trainable or dist.device.type != "cuda" else torch.bfloat16
    check_model_dir(path, arg, "model")
    try:
        model = pretrained(AutoModelForCausalLM, path, arg, dtype=dtype)
    except Exception as error:
        if not os.path.isdir(path) or isinstance(error, MemoryError):
            raise
        weights = sorted(set(os.listdir(path)) & set(WEIGHT_FILES)) + \
            sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin")) and n not in WEIGHT_FILES)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{arg} {path}: cannot load the model from {', '.join(weights)} "
                         f"({type(error).__name__}: {first_line}); the files are damaged or not this "
                         "architecture's") from None
    model = model.to(dist.device)
    bad = first_non_finite(model)
    if bad is not None:
        raise ValueError(f"{arg} {path}: weight {bad} holds NaN or inf values; refusing to use this model")
    if grad_checkpointing:
        enable_checkpointing(model)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant; it acts only while
    the model is in training mode."""
    if hasattr(model, "activation_checkpointing_enable"):        # the transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def first_non_finite(model) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return name
    return None


def load_tokenizer(path: str, arg: str = "--model"):
    """The tokenizer of a model directory or Hub id; a directory without tokenizer files, or one whose
    files make a tokenizer of fewer than 2 tokens, is refused naming it."""
    from transformers import AutoTokenizer
    check_model_dir(path, arg, "tokenizer")
    tokenizer = pretrained(AutoTokenizer, path, arg)
    if len(tokenizer) < 2:
        raise ValueError(f"{arg} {path}: its tokenizer files make a tokenizer of {len(tokenizer)} token(s); "
                         "they are damaged or incomplete")
    if tokenizer.pad_token_id is None:          # only used as filler; masks are always explicit
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(student_tok, teacher_tok, student_dir: str, teacher_dir: str) -> None:
    """Distillation compares distributions token by token: the same ids for the same strings and the
    same vocabulary size (eos and pad ids may differ: data.tokenizer_differences)."""
    differences = data.tokenizer_differences(student_tok, teacher_tok)
    if differences:
        raise ValueError(f"the tokenizers of {student_dir} and {teacher_dir} differ ({'; '.join(differences)}): "
                         "KD and the teacher KL need the same ids for the same strings")


def vocab_size_of(tokenizer, *models) -> int:
    """The tokenizer's length; model embeddings may only be larger (padding rows, as in Qwen2.5)."""
    n = len(tokenizer)
    for m in models:
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < n:
            raise ValueError(f"model has {rows} output rows but the tokenizer has {n} tokens")
    return n


# Settings a resume may change without changing what is trained (how often to save, evaluate, what to
# measure, how to batch the forward passes); every other setting must match the checkpoint's unless
# --override-config.
FREE_SETTINGS = ("eval_every", "eval_limit", "save_every", "micro_batch_size", "rollout_batch_size",
                 "term_grad_norms", "probe_samples", "pool_eval_limit")
STATE_FILE = "trainer_state.pt"


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RUN_MARKER = ".dgpo-run"   # in every run directory a trainer made: only those may be replaced (--overwrite)
# what a run directory holds beside its checkpoint; every save moves them into the new directory
RUN_ENTRIES = ("metrics.jsonl", "best", "tensorboard", "wandb", RUN_MARKER)
CONFIG_FILE = "train_config.json"   # the run's settings, readable, next to every checkpoint


def save_checkpoint(out_dir: str, model, tokenizer, dist: Dist, state: dict | None = None,
                    carry=None, extra: dict | None = None, save_dtype: str = "float32",
                    info: dict | None = None) -> None:
    """An HF directory (model + tokenizer) loadable by AutoModelForCausalLM, plus the trainer state:
    stage, config and its hash, optimizer, scheduler, step, data position and every rank's RNG
    states, for exact resume; `extra` models (PPO's critic) go to subdirectories of their name;
    train_config.json holds the stage, its settings and `info` (paths, command line) as JSON.
    save_dtype="bfloat16" halves the model files (the optimizer state stays fp32; a resume then
    continues from bf16-rounded weights, so it is no longer bit-identical). Written atomically
    (checkpoint.save): a crash at any moment leaves the previous checkpoint or this one, never a
    mix. A model with non-finite weights is never saved."""
    raw = hf_model(model)
    others = {name: hf_model(m) for name, m in (extra or {}).items()}
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if dist.device.type == "cuda" else None}
    rngs = all_gather_objects(dist, [rng])
    for name, m in [("the model", raw)] + list(others.items()):
        bad = first_non_finite(m)
        if bad is not None:
            raise RuntimeError(f"not saving {out_dir}: weight {bad} of {name} holds NaN or inf values")
    if dist.master:
        def write(tmp: str) -> None:
            for where, m in [("", raw)] + [(name, m) for name, m in others.items()]:
                with writing(out_dir, f"{where}/ model files" if where else "model files"):
                    save_pretrained(m, os.path.join(tmp, where), save_dtype)
            with writing(out_dir, "tokenizer files"):
                tokenizer.save_pretrained(tmp)
            if state is not None:
                full = {**state, "rng": rngs, "world_size": dist.world_size, "save_dtype": save_dtype}
                if "config" in state:
                    full["config_hash"] = checkpoint.config_hash(state["config"])
                with writing(out_dir, STATE_FILE):
                    torch.save(full, os.path.join(tmp, STATE_FILE))
                readable = {"stage": state.get("stage"), "step": state.get("step"), "config": state.get("config"),
                            "config_hash": full.get("config_hash"), "inputs": state.get("inputs"),
                            "world_size": dist.world_size, "save_dtype": save_dtype, **(info or {})}
                with writing(out_dir, CONFIG_FILE), open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                    json.dump(readable, f, indent=1, default=str)
        with writing(out_dir, "the checksums or the swap"):
            checkpoint.save(out_dir, write, carry=RUN_ENTRIES if carry is None else carry)
    if dist.enabled:
        torch_dist.barrier()


@contextlib.contextmanager
def writing(out_dir: str, what: str):
    """A failed write of a checkpoint file (a full disk: torch.save says only "basic_ios::clear:
    iostream error") becomes an OSError naming the checkpoint and the file; the previous checkpoint
    is intact (checkpoint.save replaces it only after everything is written)."""
    try:
        yield
    except Exception as error:           # OSError, torch's RuntimeError, safetensors' own SafetensorError
        if isinstance(error, CheckpointWriteError):
            raise
        raise CheckpointWriteError(f"cannot write checkpoint {out_dir} ({what}): {first_line(error)}; the previous "
                                   f"checkpoint there, if any, is unchanged (full disk? try --save-dtype bfloat16 "
                                   "or another --out)") from error


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (see `writing`)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (transformers' and torch's run to many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_pretrained(model, path: str, save_dtype: str) -> None:
    """model.save_pretrained(path), its floating-point weights cast to save_dtype (the model itself,
    still training, is left as it is)."""
    dtype = SAVE_DTYPES[save_dtype]
    if dtype == torch.float32:
        model.save_pretrained(path)
        return
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(path, state_dict=state)
    config_path = os.path.join(path, "config.json")       # HF records the training copy's dtype:
    with open(config_path) as f:                          # say what the files hold instead
        config = json.load(f)
    config["dtype"] = save_dtype
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def load_trainer_state(ckpt_dir: str, dist: Dist, stage: str | None = None, config: dict | None = None,
                       override: bool = False, inputs: dict | None = None) -> dict:
    """The trainer state of a checkpoint (after finishing any save a crash interrupted, its checksum
    verified), with every rank's RNG restored. Refuses a checkpoint of another stage, and one whose
    settings differ from `config` (except FREE_SETTINGS) or whose inputs differ from `inputs`
    ({argument: checkpoint.fingerprint}, for the inputs the checkpoint recorded too) unless
    `override`; state["changed"] and state["changed_inputs"] list what differs."""
    recover_resume(ckpt_dir, dist)
    path = os.path.join(ckpt_dir, STATE_FILE)
    checkpoint.verify(ckpt_dir, which=lambda rel: rel == STATE_FILE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:   # a truncated zip: checkpoint.save makes this impossible for its own saves
        raise ValueError(f"--resume {ckpt_dir}: {STATE_FILE} cannot be read ({first_line(error)})") from None
    if stage is not None and state.get("stage") != stage:
        raise ValueError(f"--resume {ckpt_dir}: a checkpoint of stage {state.get('stage')!r}; "
                         f"this is stage {stage!r}, which cannot continue it")
    if state["world_size"] != dist.world_size:
        raise ValueError(f"{path} was written by {state['world_size']} ranks; resume with the same number")
    state["changed"], state["changed_inputs"] = {}, {}
    if config is not None:
        changed = checkpoint.config_differences(state.get("config", {}), config, FREE_SETTINGS)
        if changed and not override:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"--resume {ckpt_dir}: these settings differ from the checkpoint's ({listed}). "
                             "Resume with the same settings, or pass --override-config to apply the new "
                             "values from here on (the change is recorded in metrics.jsonl)")
        state["changed"] = changed
    if inputs is not None and state.get("inputs") is not None:
        changed = checkpoint.input_differences(state["inputs"], inputs)
        if changed and not override:
            listed = "; ".join(f"{arg} {describe_input(new)} (was {describe_input(old)})"
                               for arg, (old, new) in changed.items())
            raise ValueError(f"--resume {ckpt_dir}: these inputs differ from the ones the run was started with: "
                             f"{listed}. Resume with the same inputs, or pass --override-config to continue on the "
                             "new ones (the change is recorded in metrics.jsonl)")
        state["changed_inputs"] = changed
    rng = state["rng"][dist.rank]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and dist.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def describe_input(fp: dict | None) -> str:
    """A fingerprint in a few words, for an error message."""
    if fp is None:
        return "not given"
    if "bytes" not in fp and "files" not in fp:          # a URL or a Hub id
        return fp["path"]
    if "files" in fp:
        return f"{fp['path']} ({len(fp['files'])} files)"
    rows = f", {fp['rows']} rows" if "rows" in fp else ""
    return f"{fp['path']} ({fp['bytes']} bytes{rows}, head/tail sha256 {fp['head_tail_sha256']})"


def input_fingerprints(paths: dict, rows: dict | None = None) -> dict:
    """{argument: checkpoint.fingerprint(path)} for the inputs given (None ones skipped); a URL or a Hub
    id is recorded by its name (what a server or the Hub serves cannot be fingerprinted here);
    `rows`: the row count of each data file read."""
    out = {}
    for arg, path in paths.items():
        if path is None:
            continue
        if "://" in path or not os.path.exists(path):
            out[arg] = {"path": path, "name": path}
        else:
            out[arg] = checkpoint.fingerprint(path, (rows or {}).get(arg))
    return out


def recover_resume(resume: str | None, dist: Dist) -> None:
    """Before anything reads a --resume directory: finish or roll back a save that a crash
    interrupted (checkpoint.recover), on rank 0, so that weights, state and metrics all come from
    one complete checkpoint; then refuse a directory that holds no trainer state, saying why."""
    if resume is None:
        return
    if dist.master:                     # also when `resume` itself is gone: a crash between two renames
        checkpoint.recover(resume, carry=RUN_ENTRIES)
    if dist.enabled:
        torch_dist.barrier()
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume}: not a model directory (no such directory)")
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"--resume {resume}: no checkpoint to resume from in it (no {STATE_FILE}). A run "
                                "saves one at its end, every --save-every N steps and when Ctrl-C or SIGTERM stops "
                                "it; a run that crashed before its first save has none: start it again without "
                                "--resume (with --overwrite to replace its directory)")


def restore_optimizer(optimizer, scheduler, optimizer_state: dict, scheduler_state: dict, lr: float,
                      lr_changed: bool) -> None:
    """Loads an optimizer and its schedule; with an overridden lr, the new value really takes effect
    (the schedule's base value, not only the config)."""
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if lr_changed:
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(scheduler.last_epoch)


def start_from(state: dict, optimizer, scheduler, lr: float, reporter: "Reporter", dist: Dist) -> None:
    """Restores optimizer and scheduler from a resumed state (an overridden lr applied), drops metric
    lines written after the checkpoint (and a torn last line), records any overridden settings or
    inputs in the metrics, and drops a best/ that does not belong to this state (saved just before
    a crash, by a step the resumed run has not reached: the run saves it again if it gets there)."""
    restore_optimizer(optimizer, scheduler, state["optimizer"], state["scheduler"], lr, "lr" in state["changed"])
    if state.get("save_dtype", "float32") != "float32":
        warnings.warn(f"resuming from weights saved as {state['save_dtype']}: the run continues from rounded "
                      "weights and will not be bit-identical to an uninterrupted one")
    if dist.master:
        checkpoint.truncate_metrics(reporter.path, state["step"])
        best_dir = os.path.join(os.path.dirname(reporter.path), "best")
        best_state = os.path.join(best_dir, STATE_FILE)
        if "best" in state and os.path.isfile(best_state) and \
                torch.load(best_state, map_location="cpu", weights_only=False)["step"] != state["best"]["step"]:
            warnings.warn(f"{best_dir} is not the best checkpoint this state records (a crash came between "
                          "its save and the run's); it is removed, and the next validation that improves on "
                          f"{state['best']['em']} saves it again")
            shutil.rmtree(best_dir)
    if state["changed"]:
        reporter.log({"step": state["step"], "config_override": {k: list(v) for k, v in state["changed"].items()}},
                     dist)
    if state["changed_inputs"]:
        reporter.log({"step": state["step"], "input_override": {k: list(v) for k, v in state["changed_inputs"].items()}},
                     dist)


def append_metrics(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


REPORT_TO = ("none", "tensorboard", "wandb")


class Reporter:
    """Where a stage's metric rows go: always DIR/metrics.jsonl, plus TensorBoard (DIR/tensorboard)
    or Weights & Biases with --report-to; their packages are imported only when asked for. Rank 0
    only (the rows are already reduced over ranks)."""

    def __init__(self, out_dir: str, kind: str, stage: str, config: dict, dist: Dist):
        if kind not in REPORT_TO:
            raise ValueError(f"--report-to {kind!r}: must be one of {REPORT_TO}")
        self.path, self.stage, self.writer, self.wandb = os.path.join(out_dir, "metrics.jsonl"), stage, None, None
        if not dist.master or kind == "none":
            return
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("--report-to tensorboard needs the optional package 'tensorboard' "
                                  "(pip install tensorboard)") from None
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        else:
            try:
                import wandb
            except ImportError:
                raise ImportError("--report-to wandb needs the optional package 'wandb' (pip install wandb)") from None
            self.wandb = wandb.init(project="dgpo", name=f"{stage}:{os.path.basename(out_dir)}", dir=out_dir,
                                    config=config)

    def log(self, row: dict, dist: Dist) -> None:
        if not dist.master:
            return
        append_metrics(self.path, row)
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(f"{self.stage}/{k}", v, row["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, parent: str) -> bool:
    """`path` is `parent` or lies under it (symbolic links resolved)."""
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def is_run_dir(path: str) -> bool:
    """A directory a trainer made: it holds RUN_MARKER or a checkpoint manifest (checkpoint.py)."""
    return os.path.isfile(os.path.join(path, RUN_MARKER)) or checkpoint.manifest(path) is not None


def check_writable(out: str) -> None:
    """The output can be created: its nearest existing ancestor is a directory a file can be written in
    (tried, so a read-only mount or a missing permission shows here, not after the first step)."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"--out {out}: cannot be created, {probe} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise PermissionError(f"--out {out}: cannot write in {probe} ({error.strerror})") from None


def check_output(out: str, resume: str | None, overwrite: bool, kind: str = "dir", inputs: dict | None = None) -> None:
    """Before any work, changing nothing (prepare_output acts, after every input is loaded):
    - an output that is, or contains, one of the `inputs` ({argument: path} of what the stage reads)
      is refused, --overwrite or not: writing there would destroy what the run reads (resuming a run
      in its own directory is the one exception);
    - an existing non-empty output is refused unless the run resumes from it or --overwrite is given,
      and --overwrite only replaces a directory a trainer made (is_run_dir); the message names the
      command that works;
    - the output must be writable.
    kind="file" for tgo's trajectories file."""
    for arg, path in (inputs or {}).items():
        if not path or "://" in path or (kind == "dir" and arg == "--resume" and _same(path, out)):
            continue
        if _same(path, out) or (kind == "dir" and _inside(path, out)):
            raise ValueError(f"--out {out}: {'is' if _same(path, out) else 'contains'} the input {arg} {path}; "
                             "writing there would destroy what this run reads: choose another --out")
    if kind == "file":
        if os.path.isdir(out):
            raise ValueError(f"--out {out}: is a directory; tgo writes a trajectories file (e.g. {out}/tgo.jsonl)")
        if os.path.exists(out) and not overwrite:
            raise ValueError(f"--out {out}: exists; pass --overwrite to replace it")
        check_writable(out)
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    if resume is not None and _same(resume, out):
        return
    if os.path.isdir(out) and os.listdir(out):
        if not is_run_dir(out):
            raise ValueError(f"--out {out}: exists, is not empty and is not a directory this trainer wrote (no "
                             f"{RUN_MARKER} marker or checkpoint manifest); refusing to replace it even with "
                             "--overwrite: choose another --out")
        if not overwrite:
            if os.path.isfile(os.path.join(out, STATE_FILE)):
                raise ValueError(f"--out {out}: exists and is not empty; pass --resume {out} to continue it, "
                                 "or --overwrite to replace it")
            raise ValueError(f"--out {out}: exists and is not empty; it holds a run that saved no checkpoint to "
                             "resume (it stopped before its first save): pass --overwrite to replace it")
    check_writable(out)


def prepare_output(out: str, resume: str | None, overwrite: bool) -> None:
    """After every input is loaded and check_output passed: with --overwrite, deletes the entries the
    previous run wrote (its checkpoint's files, RUN_ENTRIES; anything else in the directory stays);
    creates the directory with RUN_MARKER; a run resumed into a new directory gets the resumed run's
    metrics (and best/) there."""
    same = resume is not None and _same(resume, out)
    if overwrite and not same and os.path.isdir(out) and is_run_dir(out):
        checkpoint.recover(out, carry=RUN_ENTRIES)         # an interrupted swap leaves its pieces beside it
        own = set(checkpoint.own_entries(out)) | set(RUN_ENTRIES) | {".best.saving", ".best.old", "metrics.jsonl.tmp"}
        for name in sorted(own & set(os.listdir(out))):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, RUN_MARKER), "w") as f:
        f.write("written by train.py; --overwrite may replace what a run wrote here, nothing else\n")
    if resume is not None and not same:   # continue the resumed run's metrics (and best/) in the new directory
        source = os.path.join(resume, "metrics.jsonl")
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out, "metrics.jsonl"))
        if os.path.isdir(os.path.join(resume, "best")):
            shutil.copytree(os.path.join(resume, "best"), os.path.join(out, "best"))


def make_optimizer(model, lr: float, weight_decay: float, total_steps: int, warmup_steps: int,
                   min_lr_ratio: float | None):
    """AdamW with linear warmup, then cosine decay to lr·min_lr_ratio (or constant if None)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if min_lr_ratio is None:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def optimizer_step(model, optimizer, scheduler, grad_clip: float, counters: dict, dist: Dist,
                   finite_loss: bool = True) -> float:
    """Clips, then steps — with two exceptions, both decided on every rank alike (one all-reduce):
    - some rank's loss or the gradient is not finite: the step is skipped, counted (skipped_steps)
      and warned about;
    - the gradient is exactly zero (every GRPO group constant and no other term, say): the step is
      skipped and counted (zero_grad_steps), since AdamW would otherwise still move every weight,
      replaying its momentum (0.64, 0.50, 0.41 … × lr on the following empty steps with betas
      (0.9, 0.95)) and decaying it; the optimizer's state (moments, step count) is left as it is.
    The learning-rate schedule advances on every step, skipped or not: it follows the step count.
    A step that leaves a weight non-finite (finite gradients times a learning rate like 1e30) stops
    the run: it cannot be undone, and the next forward would sample garbage."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    bad, moved = all_reduce_sum(dist, [0.0 if finite_loss else 1.0, 1.0 if norm != 0.0 else 0.0])
    if math.isfinite(norm) and not bad and moved:
        optimizer.step()
        counters["consecutive_skipped"] = 0
        check_weights_finite(model, optimizer)
    elif math.isfinite(norm) and not bad:         # a zero gradient on every rank: nothing to learn from
        counters["zero_grad_steps"] = counters.get("zero_grad_steps", 0) + 1
        counters["consecutive_skipped"] = 0
    else:
        counters["skipped_steps"] = counters.get("skipped_steps", 0) + 1
        counters["consecutive_skipped"] = counters.get("consecutive_skipped", 0) + 1
        warnings.warn(f"non-finite loss or gradient norm ({norm}): step skipped "
                      f"({counters['skipped_steps']} so far)")
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():      # the schedule follows the step count, skipped steps included;
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        scheduler.step()                 # torch warns when the very first step was the skipped one
    return norm


def check_weights_finite(model, optimizer) -> None:
    """Raises Stopped naming the first weight an update made NaN or inf (one device sync for all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if torch.stack([torch.isfinite(p).all() for p in params]).all():
        return
    bad = first_non_finite(hf_model(model))
    lr = optimizer.param_groups[0]["lr"]
    raise Stopped(f"the update at learning rate {lr:g} made weight {bad} NaN or inf (the learning rate is far too "
                  "large?); stopping without saving: the last checkpoint saved, if any, is unchanged")


class Stopped(RuntimeError):
    """A run that stopped on purpose, with a message for the person running it (a diverged run, a
    weight made non-finite, an interrupt): the command line prints it as one line."""


MAX_CONSECUTIVE_SKIPPED = 10   # then the run stops: the model (or the data) is broken, not unlucky


def stop_if_diverged(counters: dict, out_dir: str) -> None:
    """Stops a run whose last MAX_CONSECUTIVE_SKIPPED steps all had a non-finite loss or gradient,
    without saving: the last checkpoint in out_dir (if any) stays the result."""
    if counters.get("consecutive_skipped", 0) >= MAX_CONSECUTIVE_SKIPPED:
        raise Stopped(f"{counters['consecutive_skipped']} consecutive steps had a non-finite loss or "
                      f"gradient and were skipped; stopping without saving (the last checkpoint, if any, "
                      f"is in {out_dir})")


# -----------------------------------------------------------------------------
# Interrupts: Ctrl-C or SIGTERM finishes the step, saves, and says how to continue


class Interrupted(Stopped):
    """Raised after a run stopped by SIGINT / SIGTERM has saved its resumable checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, the first SIGINT or SIGTERM only sets `.signum`: the training loop finishes its
    step, saves and raises Interrupted. A second one stops at once (the step in flight is lost, the
    last checkpoint is intact). Handlers can only be installed from the main thread; elsewhere (a
    notebook's worker thread) signals act as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:                    # the second one: stop now
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a resumable checkpoint "
              "(send it again to stop at once, losing the step)", file=sys.stderr, flush=True)

    def requested(self, dist: "Dist") -> int | None:
        """The signal any rank received (all ranks agree, so all stop after the same step)."""
        got = all_reduce_sum(dist, [float(self.signum or 0)])[0] if dist.enabled else float(self.signum or 0)
        if got and self.signum is None:      # another rank got it; name the usual one
            self.signum = signal.SIGTERM
        return self.signum if got else None


def resume_command(info: dict | None, out_dir: str, dist: "Dist") -> str:
    """The command that continues a run from out_dir: the run's own command line (info["argv"]) without
    --overwrite and any earlier --resume, plus --resume out_dir; under torchrun, as a torchrun command."""
    argv = list((info or {}).get("argv") or [])
    if not argv:
        return f"resume=\"{out_dir}\" (the Python API)"
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif arg != "--overwrite" and not arg.startswith("--resume="):
            kept.append(arg)
    launcher = [f"torchrun --nproc_per_node={dist.world_size}"] if dist.enabled else [sys.executable]
    return " ".join(launcher + [shlex.quote(a) for a in [argv[0], *kept, "--resume", out_dir]])


# -----------------------------------------------------------------------------
# Batches: token ids and explicit masks, shifted once here


@dataclass
class Batch:
    """A micro-batch with its loss positions gathered. Only tokens the policy sampled carry a loss
    (17.5% of the demo's positions, a similar share with Search-R1's observations), so the LM head
    runs on those positions only: row b's n_b loss positions are packed to the left of an (B, L)
    layout, L = max_b n_b, in sequence order."""
    inputs: torch.Tensor      # (B, T)  ids fed to the model: sequence[:-1], right-padded
    positions: torch.Tensor   # (B, L)  input position whose NEXT token is a loss token (0 in the padding)
    targets: torch.Tensor     # (B, L)  that next token, as the policy sampled it
    mask: torch.Tensor        # (B, L)  bool, True on the packed entries (row b: the first n_b)


def make_batch(records: list[dict], device, pad_id: int = 0) -> Batch:
    """Right-pads `input_ids` of trajectory records and gathers the positions their `loss_mask`
    marks. Right padding with a causal model means no real token ever attends to padding, so the
    forward needs no attention mask; the pad id is irrelevant because positions and the mask are
    carried explicitly."""
    width = max(len(r["input_ids"]) for r in records) - 1
    picked = [[t for t, m in enumerate(r["loss_mask"][1:]) if m] for r in records]   # per row, ascending
    packed = max(1, max(len(p) for p in picked))
    inputs = torch.full((len(records), width), pad_id, dtype=torch.long)
    positions = torch.zeros(len(records), packed, dtype=torch.long)
    targets = torch.full((len(records), packed), pad_id, dtype=torch.long)
    mask = torch.zeros(len(records), packed, dtype=torch.bool)
    for b, (r, rows) in enumerate(zip(records, picked)):
        ids = r["input_ids"]
        inputs[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        positions[b, :len(rows)] = torch.tensor(rows, dtype=torch.long)
        targets[b, :len(rows)] = torch.tensor([ids[t + 1] for t in rows], dtype=torch.long)
        mask[b, :len(rows)] = True
    return Batch(inputs.to(device), positions.to(device), targets.to(device), mask.to(device))


def padded(rows: list[torch.Tensor], shape: tuple[int, int], device) -> torch.Tensor:
    """Per-record values at the record's loss positions (old log-probs, per-token advantages), (n_i,)
    each, as one (B, L) tensor aligned with Batch.targets; the padding is 0 and lies outside the mask."""
    out = torch.zeros(shape, dtype=torch.float32, device=device)                 # (B, L)
    for b, row in enumerate(rows):
        out[b, :len(row)] = row.to(device)
    return out


class HeadAtPositions(torch.nn.Module):
    """A causal LM whose forward runs the decoder on the whole sequence but its head only on the
    hidden states at the given positions: logits (B, L, V) instead of (B, T, V). At Qwen2.5's
    vocabulary (151,936) that is the difference between 2.5 GB and ~0.4 GB of fp32 logits per
    4 × 1,024-token micro-batch (bench/bench_dgpo.py measures it). The same module serves a critic
    (a token-classification model with one label): its head is the one-unit `score` layer.

    It is the module DDP wraps (so gradients are all-reduced as usual) and holds no parameters of its
    own; `.lm` is the HF model that is saved. check() compares it once with the model's own forward,
    so a model whose forward does more than head(hidden) (logit scaling, soft-capping) is refused."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.head = lm.get_output_embeddings() if hasattr(lm, "lm_head") else getattr(lm, "score", None)
        if self.head is None:
            raise ValueError(f"{type(lm).__name__}: no LM head (lm_head) or value head (score) to apply")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state     # (B, T, H)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))        # (B, L, H)
        return self.head(picked)                                                                # (B, L, V)

    @torch.no_grad()
    def check(self) -> "HeadAtPositions":
        ids = torch.arange(1, 9, device=self.head.weight.device)[None] % self.head.weight.shape[0]  # (1, 8)
        positions = torch.tensor([[1, 4, 7]], device=ids.device)
        full = self.lm(input_ids=ids, use_cache=False).logits[:, [1, 4, 7]].float()
        ours = self.forward(ids, positions).float()
        # fp32 agrees to rounding; bf16/fp16 may pick other kernels for 8 rows than for 3. Either way the
        # differences this looks for (a logit scale, a soft cap) are far larger.
        tol = 1e-4 if self.head.weight.dtype == torch.float32 else 5e-2
        scale = max(1.0, full[torch.isfinite(full)].abs().max().item()) if torch.isfinite(full).any() else 1.0
        if not torch.allclose(full, ours, rtol=tol, atol=tol * scale, equal_nan=True):
            raise ValueError(f"{type(self.lm).__name__}: its forward is not head(decoder(ids)); this trainer "
                             "computes logits only at loss positions and cannot train it as is")
        return self


def at_positions(model) -> HeadAtPositions:
    """The head-at-positions view of an HF model, or the view itself (possibly DDP-wrapped). The
    trainers make their views once, checked (HeadAtPositions(model).check()); this makes an
    unchecked one for a bare model (a held-out loss, a benchmark)."""
    if isinstance(model, DDP) and not isinstance(model.module, HeadAtPositions):
        raise TypeError("wrap HeadAtPositions(model) in DDP, not the bare model: DDP must see the forward "
                        "that computes the loss")
    return model if isinstance(model, (HeadAtPositions, DDP)) else HeadAtPositions(model)


def wrap(model, dist: Dist):
    """The view a trainer computes its losses through: HeadAtPositions, checked, in DDP when distributed."""
    view = HeadAtPositions(model).check()
    if not dist.enabled:
        return view
    return DDP(view, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)


def hf_model(model):
    """The Hugging Face model inside a DDP wrapper and/or a HeadAtPositions view."""
    model = model.module if isinstance(model, DDP) else model
    return model.lm if isinstance(model, HeadAtPositions) else model


def logits_of(model, batch: Batch) -> torch.Tensor:
    """Logits at the batch's loss positions, (B, L, V): the one forward every loss uses (SFT, KD,
    and every RL forward: policy, old policy, teacher)."""
    return at_positions(model)(batch.inputs, batch.positions)                 # (B, L, V)


def micro_batches(records: list[dict], size: int) -> list[list[dict]]:
    """Consecutive chunks of `size`; sorted by length first so each chunk pads little."""
    records = sorted(records, key=lambda r: len(r["input_ids"]))
    return [records[i:i + size] for i in range(0, len(records), size)]


def loss_token_count(records: list[dict]) -> int:
    """The loss tokens of these records: targets the policy sampled, i.e. loss_mask[1:] (Batch.mask's entries)."""
    return sum(sum(r["loss_mask"][1:]) for r in records)


def global_token_count(dist: Dist, records: list[dict]) -> float:
    """Σ over ranks of the loss tokens — the normaliser every rank uses."""
    return all_reduce_sum(dist, [loss_token_count(records)])[0]


def ddp_sync(model, last: bool):
    """Gradient accumulation: DDP all-reduces only on the last micro-batch of an optimizer step."""
    if isinstance(model, DDP) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Stage: supervised (teacher SFT when teacher is None, KD cold start otherwise)


def supervised_loss(model, teacher, records: list[dict], normaliser: float, vocab_size: int,
                    lam: float, dist: Dist) -> tuple[torch.Tensor, dict]:
    """One micro-batch of the supervised loss, Σ over loss tokens / normaliser of
    CE (no teacher: teacher SFT) or CE + λ·KL(π_T‖π_θ) (the KD cold start, dgpo.kd_loss)."""
    batch = make_batch(records, dist.device)
    with autocast(dist):
        logits = logits_of(model, batch)                                # (B, L, V)
        if teacher is None:
            logp = dgpo.token_logprobs(logits[..., :vocab_size], batch.targets)   # (B, L)
            loss = dgpo.aggregate(-logp, batch.mask, "token-mean", normaliser)
            n = int(batch.mask.sum())
            ce = (-logp.detach()[batch.mask]).sum().item() / max(n, 1)
            return loss, {"ce": ce, "kl": 0.0, "n_tokens": n}
        with torch.no_grad():
            teacher_logits = logits_of(teacher, batch)                  # (B, L, V_T)
        return dgpo.kd_loss(logits, teacher_logits, batch.targets, batch.mask, lam=lam,
                            normaliser=normaliser, vocab_size=vocab_size)


def train_supervised(model, tokenizer, records: list[dict], cfg: SupervisedConfig, dist: Dist,
                     out_dir: str, teacher=None, heldout: list[dict] | None = None, resume: str | None = None,
                     desc: str = "sft", stop_after: int | None = None, override_config: bool = False,
                     overwrite: bool = False, report_to: str = "none", save_dtype: str = "float32",
                     info: dict | None = None, inputs: dict | None = None) -> dict:
    """Trains `model` on trajectory records (loss on loss_mask tokens) and saves it to `out_dir`.
    `resume`: a checkpoint of this stage to continue from (the model must already hold its weights);
    `stop_after` ends this run early with the schedule still spanning cfg.steps; `info` (input paths,
    the command line) is written into train_config.json beside the settings; `inputs`
    ({argument: checkpoint.fingerprint}) is recorded in the trainer state, and a resume with other
    inputs is refused unless `override_config`. SIGINT / SIGTERM: the step finishes, a resumable
    checkpoint is saved and Interrupted is raised."""
    check_config(cfg)
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {dist.world_size}")
    if cfg.eval_every and not heldout:
        raise ValueError(f"--eval-every {cfg.eval_every}: needs held-out trajectories (--heldout FILE)")
    if override_config and not resume:
        raise ValueError("--override-config only makes sense with --resume")
    for what, rows in (("the training trajectories", records), ("the held-out trajectories", heldout or None)):
        if rows is not None and loss_token_count(rows) == 0:
            raise ValueError(f"{what}: no row has a loss token (every loss_mask is 0 after the prompt), so there "
                             "is nothing to train on or to score")
    recover_resume(resume, dist)    # the caller loaded `model` from resume: run_stage recovers before that
    paths = {**{arg: fp["path"] for arg, fp in (inputs or {}).items()}, "--resume": resume}
    if dist.master:
        check_output(out_dir, resume, overwrite, inputs=paths)
    vocab_size = vocab_size_of(tokenizer, model, *([teacher] if teacher is not None else []))
    ddp_model = wrap(model, dist)
    teacher = HeadAtPositions(teacher).check() if teacher is not None else None
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.steps, cfg.warmup_steps,
                                          cfg.min_lr_ratio)
    state = load_trainer_state(resume, dist, desc, asdict(cfg), override_config, inputs) if resume else None
    if dist.master:                 # every input is loaded: only now may --overwrite delete anything
        prepare_output(out_dir, resume, overwrite)
    if dist.enabled:
        torch_dist.barrier()
    reporter = Reporter(out_dir, report_to, desc, asdict(cfg), dist)
    start_step, counters = 0, {}
    if resume:
        start_from(state, optimizer, scheduler, cfg.lr, reporter, dist)
        start_step, counters = state["step"], state["counters"]

    def save(step: int) -> None:
        save_checkpoint(out_dir, ddp_model, tokenizer, dist, {
            "stage": desc, "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "counters": counters, "config": asdict(cfg), "inputs": inputs}, save_dtype=save_dtype, info=info)

    per_rank = cfg.batch_size // dist.world_size
    model.train()
    end_step = min(cfg.steps, start_step + stop_after) if stop_after else cfg.steps
    bar = tqdm(range(start_step, end_step), desc=desc, disable=not dist.master, initial=start_step,
               total=cfg.steps, dynamic_ncols=True)
    with StopSignals() as stop:
        for step in bar:
            t0 = time.time()
            # the global batch of this step: a window of a per-epoch permutation; each rank its slice
            idx = data_window(cfg.seed, len(records), step * cfg.batch_size, cfg.batch_size)
            local = [records[i] for i in idx[dist.rank * per_rank:(dist.rank + 1) * per_rank]]
            normaliser = global_token_count(dist, local) / dist.world_size   # DDP averages over ranks
            chunks = micro_batches(local, cfg.micro_batch_size)
            sums, finite = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "n_tokens": 0.0}, True
            for i, chunk in enumerate(chunks):
                with ddp_sync(ddp_model, last=i == len(chunks) - 1):
                    loss, m = supervised_loss(ddp_model, teacher, chunk, normaliser, vocab_size, cfg.lam, dist)
                    loss.backward()               # even if not finite: every rank keeps in step with DDP
                finite &= math.isfinite(loss.item())
                sums["loss"] += loss.item()
                for k in ("ce", "kl"):
                    sums[k] += m[k] * m["n_tokens"]
                sums["n_tokens"] += m["n_tokens"]
            norm = optimizer_step(ddp_model, optimizer, scheduler, cfg.grad_clip, counters, dist, finite)
            loss_sum, ce_sum, kl_sum, n_tok = all_reduce_sum(dist, [sums["loss"], sums["ce"], sums["kl"],
                                                                    sums["n_tokens"]])
            row = {"step": step + 1, "loss": loss_sum / dist.world_size, "ce": ce_sum / max(n_tok, 1),
                   "kl": kl_sum / max(n_tok, 1), "grad_norm": norm, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": n_tok / (time.time() - t0), "skipped_steps": counters.get("skipped_steps", 0),
                   "zero_grad_steps": counters.get("zero_grad_steps", 0)}
            if heldout and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps):
                row["heldout_loss"] = heldout_loss(model, teacher, heldout, cfg, vocab_size, dist)
            if dist.master:
                bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}")
            reporter.log(row, dist)
            stop_if_diverged(counters, out_dir)
            if step + 1 < end_step and stop.requested(dist):
                bar.close()
                save(step + 1)
                reporter.close()
                raise interrupted(stop.signum, desc, step + 1, cfg.steps, out_dir, info, dist)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end_step:
                save(step + 1)
    bar.close()
    save(end_step)
    reporter.close()
    return counters


def interrupted(signum: int, stage: str, step: int, steps: int, out_dir: str, info: dict | None,
                dist: Dist) -> Interrupted:
    """The exception a stage raises after saving on SIGINT / SIGTERM: what happened, where the
    checkpoint is, and the exact command that continues the run."""
    return Interrupted(f"{signal.Signals(signum).name}: {stage} stopped after step {step} of {steps} and saved a "
                       f"resumable checkpoint in {out_dir}; continue with: {resume_command(info, out_dir, dist)}",
                       signum)


def data_window(seed: int, n: int, start: int, size: int) -> list[int]:
    """Items start .. start+size of an endless stream of epochs, each a permutation of range(n) that
    depends on (seed, epoch) only — so the data position is just a number, and resume is exact."""
    perms, out = {}, []
    for position in range(start, start + size):
        epoch, offset = divmod(position, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][offset]))
    return out


@torch.no_grad()
def heldout_loss(model, teacher, records: list[dict], cfg: SupervisedConfig, vocab_size: int,
                 dist: Dist) -> float:
    """The supervised loss (KD loss when a teacher is given) on held-out trajectories, token-mean."""
    was_training = model.training
    model.eval()
    total = loss_token_count(records)
    loss = sum(supervised_loss(model, teacher, chunk, total, vocab_size, cfg.lam, dist)[0].item()
               for chunk in micro_batches(records, cfg.micro_batch_size))
    model.train(was_training)
    return loss


# -----------------------------------------------------------------------------
# Rollouts as training records: the bridge between rollout.py, arc_metric.py and the losses


def length_budget(max_total_tokens: int | None, model) -> int | None:
    """The cap on prompt + response of every rollout: --max-total-tokens, by default the model's
    max_position_embeddings (a longer sequence leaves the positions the model was trained on)."""
    return max_total_tokens if max_total_tokens is not None else rollout_lib.default_length_budget(model)


def check_prompts(tokenizer, questions: list[dict], budget: int | None, what: str) -> None:
    """Refuses, before any rollout, a question whose prompt leaves no room under the length budget."""
    found = rollout_lib.first_overlong_prompt(tokenizer, [q["question"] for q in questions], budget)
    if found is not None:
        i, n = found
        q = questions[i]
        raise ValueError(f"{what} id={q.get('id')!r} ({q['question'][:60]!r}…): its prompt is {n} tokens, "
                         f"leaving no room under the length budget of {budget} tokens (--max-total-tokens, "
                         "default: the model's max_position_embeddings); shorten or drop it")


def generate_records(model, tokenizer, questions: list[dict], retriever, rcfg: RolloutConfig, dist: Dist,
                     batch_size: int, generator=None, desc: str | None = None) -> list[dict]:
    """Rolls out `questions` (in chunks of batch_size) and returns trajectory records: the question
    fields + every Trajectory field + `em` (the binary reward, scored on the model's own turns)."""
    raw = hf_model(model)
    records = []
    chunks = [questions[i:i + batch_size] for i in range(0, len(questions), batch_size)]
    for chunk in tqdm(chunks, desc=desc, disable=desc is None or not dist.master, leave=False):
        with autocast(dist):
            trajs = rollout(raw, tokenizer, [q["question"] for q in chunk], retriever, rcfg,
                            generator=generator)
        for q, t in zip(chunk, trajs):
            record = {"id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"],
                      "data_source": q["data_source"], **asdict(t)}
            record["em"] = arc_metric.answer_em(t.turns, q["golden_answers"])
            records.append(record)
    return records


# -----------------------------------------------------------------------------
# Stage: tgo — the teacher's correct trajectories


def run_tgo(teacher, tokenizer, questions: list[dict], retriever, rcfg: RolloutConfig, dist: Dist,
            out_path: str, samples: int = 1, batch_size: int = 64, seed: int = 0,
            keep_wrong: bool = False, info: dict | None = None, inputs: dict | None = None,
            overwrite: bool = False) -> dict:
    """Rolls the teacher out `samples` times per question (each rank its shard), keeps EM = 1
    (`keep_wrong` keeps everything: only for plumbing tests with an untrained teacher). Rollouts are
    capped at the length budget (length_budget), and a prompt that leaves no room is refused first.

    Nothing finished is lost: every chunk of rollouts is appended to its rank's progress file as it
    completes (tgo_progress_files), whose first line records how they are made (settings, tokenizer,
    `inputs` fingerprints); a rerun with the same ones continues after them, with any number of ranks,
    and is refused with other ones (`overwrite` deletes them and starts again). The trajectories file
    is written, atomically, only when every question is done; the progress files are then deleted.
    (A rerun of sampled rollouts draws fresh samples for the rest: not bit-identical to one run.)
    `retriever` may be a function that builds it, called after the checks, as in rl.train_rl."""
    rcfg = dataclasses.replace(rcfg, max_total_tokens=length_budget(rcfg.max_total_tokens, teacher))
    check_prompts(tokenizer, questions, rcfg.max_total_tokens, "question")
    fingerprint = data.tokenizer_fingerprint(tokenizer)       # kd refuses these ids with another tokenizer
    made_with = json.loads(json.dumps(
        {"config": asdict(rcfg), "samples": samples, "seed": seed, "keep_wrong": keep_wrong, "tokenizer": fingerprint,
         "inputs": {arg: {k: v for k, v in fp.items() if k != "path"} for arg, fp in (inputs or {}).items()}},
        default=str))
    done = {} if overwrite else read_tgo_progress(out_path, made_with)   # refuses to mix, before anything slow
    if not hasattr(retriever, "search"):     # a function that builds it (train_rl's convention)
        retriever = retriever()
    if overwrite and dist.master:
        for path in tgo_progress_files(out_path):
            os.remove(path)
    if dist.enabled:
        torch_dist.barrier()
    todo = [(s, i) for s in range(samples) for i, q in enumerate(questions)
            if (*data.question_key(q), s) not in done]
    if done:
        print0(dist, f"tgo: continuing after {len(done)} finished rollouts in {out_path}.progress-*")
    progress = f"{out_path}.progress-rank{dist.rank}.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if not os.path.isfile(progress) or os.path.getsize(progress) == 0:
        data.append_jsonl(progress, [{"made_with": made_with}])
    mine = todo[dist.rank::dist.world_size]
    generator = torch.Generator(device=dist.device).manual_seed(seed + dist.rank)
    bar = tqdm(total=samples * len(questions), initial=len(done), desc="tgo", disable=not dist.master,
               dynamic_ncols=True)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        records = generate_records(teacher, tokenizer, [questions[i] for _, i in chunk], retriever, rcfg, dist,
                                   batch_size, generator)
        data.append_jsonl(progress, [{**r, "sample": s} for r, (s, _) in zip(records, chunk)])
        bar.update(len(chunk) * dist.world_size)
    bar.close()
    if dist.enabled:
        torch_dist.barrier()
    done = read_tgo_progress(out_path, made_with)
    order = {key: n for n, key in enumerate((*data.question_key(q), s) for s in range(samples) for q in questions)}
    records = sorted((r for key, r in done.items() if key in order), key=lambda r: order[(*data.question_key(r),
                                                                                           r["sample"])])
    kept = [{**r, data.TOKENIZER_KEY: fingerprint} for r in records if r["em"] == 1.0 or keep_wrong]
    stats = {"rollouts": len(records), "kept": len(kept),
             "teacher_em": sum(r["em"] for r in records) / max(len(records), 1)}
    if dist.enabled:
        torch_dist.barrier()                  # every rank has read the progress files before they go
    if dist.master:
        data.write_jsonl(out_path, kept)
        with open(out_path + ".config.json", "w") as f:      # how these trajectories were made
            json.dump({"stage": "tgo", "config": asdict(rcfg), "samples": samples, "seed": seed,
                       "tokenizer": fingerprint, "inputs": inputs, **stats, **(info or {})}, f, indent=1, default=str)
        for path in tgo_progress_files(out_path):
            os.remove(path)
    print0(dist, f"tgo: kept {len(kept)} of {len(records)} teacher trajectories -> {out_path}")
    return stats


def tgo_progress_files(out_path: str) -> list[str]:
    """The progress files of a tgo run writing out_path: one per rank that worked on it."""
    folder, name = os.path.split(os.path.abspath(out_path))
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(name + ".progress-rank")
                  and n.endswith(".jsonl")) if os.path.isdir(folder) else []


def read_tgo_progress(out_path: str, made_with: dict) -> dict:
    """{(data_source, id, sample): record} of every finished rollout in the progress files; a file
    made with other settings or inputs is refused, naming what differs."""
    done = {}
    for path in tgo_progress_files(out_path):
        rows = data.read_appended(path)
        if not rows:
            continue
        recorded = rows[0].get("made_with")
        if recorded != made_with:
            differ = sorted(k for k in set(made_with) | set(recorded or {})
                            if (recorded or {}).get(k) != made_with.get(k))
            raise ValueError(f"{path}: unfinished tgo rollouts made with other settings or inputs (they differ in "
                             f"{', '.join(differ)}); rerun with the ones they were made with to continue them, or "
                             "pass --overwrite to start again")
        for row in rows[1:]:
            done[(*data.question_key(row), row["sample"])] = row
    return done


# -----------------------------------------------------------------------------
# Retrievers, evaluation


def make_retriever(corpus: str | None, url: str | None, topk: int = 3, index: str | None = None,
                   retry_seconds: float = 300.0, timeout: float = 30.0):
    """BM25 over a JSONL corpus (built at start-up) or over an index built once (`retriever.py index`,
    memory-mapped), or a Search-R1 retrieval server (checked once, so a dead URL stops the run here
    with a clear message instead of deep inside the first rollout). A server that fails is retried,
    a line per retry, for up to `retry_seconds` — at start-up and on every later request alike, so
    a run rides out a server restart; `timeout` bounds one request."""
    from retriever import BM25Retriever, HTTPRetriever
    if sum(bool(x) for x in (corpus, url, index)) != 1:
        raise ValueError("give exactly one of --corpus FILE.jsonl[.gz], --index DIR or --retriever-url URL")
    if url:
        retriever = HTTPRetriever(url, topk=topk, timeout=timeout, retry_seconds=retry_seconds)
        try:
            retriever.search(["test"], topk=1)
        except RuntimeError as e:          # the budget ran out: a user's problem, said in one line
            raise ConnectionError(f"--retriever-url: {e}") from e
        return retriever
    return BM25Retriever.load(index) if index else BM25Retriever.from_jsonl(corpus)


def evaluate_dir(model_dir: str, questions: list[dict], retriever, rcfg: RolloutConfig, dist: Dist,
                 out_dir: str | None, batch_size: int = 64, probe: bool = True) -> dict:
    """arc_metric's evaluation of one HF model directory (greedy rollouts, ARC report)."""
    model = load_model(model_dir, dist, trainable=False)
    tokenizer = load_tokenizer(model_dir)
    with autocast(dist):
        _, report = arc_metric.evaluate(model, tokenizer, questions, retriever, rcfg, probe=probe,
                                        batch_size=batch_size, progress=dist.master,
                                        out_path=os.path.join(out_dir, "trajectories.jsonl") if out_dir else None)
    if out_dir and dist.master:
        with open(os.path.join(out_dir, "report.json"), "w") as f:   # the layout arc_metric.main writes
            json.dump({"model": model_dir, "questions": len(questions), "config": asdict(rcfg),
                       "report": report}, f, indent=1)
    return report


# -----------------------------------------------------------------------------
# Stage chain on the demo world


@dataclass
class DemoPreset:
    """Everything the demo chain needs. Data roles are disjoint: the teacher's trajectories for KD come
    from the first `kd_pool` training questions, RL trains on the next `rl_pool`, which KD never saw;
    validation selects the RL checkpoint (the start model included); test reports. Demo turns are
    short (the oracle writes ≤ ~40 tokens a turn), so the per-turn budget is 64, not the paper's 500."""
    teacher: SupervisedConfig
    pretrain: SupervisedConfig     # the base student: language modelling on the corpus text only
    kd: SupervisedConfig
    rl: dict                       # rl.RLConfig's settings (rl.py is imported when the chain runs)
    teacher_size: str = "teacher"
    student_size: str = "student"
    world_seed: int = 0
    world_scale: int = 1           # demo.make_world's scale: entities and distractors × this
    n_test: int = 240              # the world's held-out splits
    n_validation: int = 120
    kd_pool: int = 800             # training questions the teacher is rolled out on for KD
    rl_pool: int = 500             # the other training questions: the only ones RL trains on
    tgo_keep_wrong: bool = False   # True only in the plumbing preset, whose teacher cannot be right yet
    max_new_tokens: int = 64
    eval_limit: int = 0            # test questions evaluated (0 = the whole test split)
    val_limit: int = 0             # validation questions (0 = all)
    eval_batch_size: int = 64


PRESETS = {
    "default": lambda: DemoPreset(
        teacher=SupervisedConfig(steps=1500, batch_size=8, micro_batch_size=8, lr=4e-3, warmup_steps=50),
        pretrain=SupervisedConfig(steps=400, batch_size=8, micro_batch_size=8, lr=4e-3, warmup_steps=20),
        kd=SupervisedConfig(steps=1200, batch_size=8, micro_batch_size=8, lr=4e-3, warmup_steps=30),
        rl=dict(steps=30, prompts_per_step=8, group_size=4, micro_batch_size=16, rollout_batch_size=64,
                lr=3e-4, warmup_ratio=0.1, beta=1.0, temperature=0.7, max_new_tokens=64, eval_every=10)),
    # the same chain in well under a minute: it checks the plumbing (every stage writes what the next
    # reads), not learning — its teacher trains for 4 steps, so its tgo keeps wrong trajectories too
    "small": lambda: DemoPreset(
        teacher=SupervisedConfig(steps=4, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=2),
        pretrain=SupervisedConfig(steps=2, batch_size=4, micro_batch_size=4, lr=3e-3, warmup_steps=1),
        kd=SupervisedConfig(steps=3, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=1, eval_every=3),
        rl=dict(steps=2, prompts_per_step=2, group_size=2, micro_batch_size=4, rollout_batch_size=8,
                lr=1e-4, warmup_ratio=0.0, beta=0.05, max_new_tokens=8, max_turns=1, eval_every=1),
        teacher_size="test", student_size="test", kd_pool=8, rl_pool=4, tgo_keep_wrong=True, max_new_tokens=8,
        eval_limit=4, val_limit=4, eval_batch_size=8),
}


DEMO_MARKER = ".dgpo-demo"   # a directory holding this file was made by run_demo, which may replace it


# what run_demo writes in its directory: a rerun deletes these, and nothing else
DEMO_ENTRIES = ("data", "tokenizer", "init", "teacher", "base", "kd", "dgpo", "eval", "oracle.jsonl", "tgo.jsonl",
                "tgo.jsonl.config.json", "tgo.jsonl.progress-rank0.jsonl", "results.json", DEMO_MARKER)


def own_demo_dir(out: str) -> None:
    """The demo regenerates its directory: what an earlier demo run wrote there (DEMO_ENTRIES) is
    deleted, so the README's first command works when run twice, and anything else is kept; a
    non-empty directory the demo did not make is refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory; the demo writes a directory of runs")
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, DEMO_MARKER)):
            raise ValueError(f"--out {out}: exists, is not empty and was not written by the demo; "
                             "choose another --out (the demo replaces its own directory)")
        for name in DEMO_ENTRIES:
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    check_writable(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, DEMO_MARKER), "w") as f:
        f.write("written by `python train.py demo`; the next demo run here replaces what it wrote\n")


def run_demo(preset_name: str, out: str, dist: Dist) -> dict:
    """world → teacher (SFT on the oracle) → base student (LM on the corpus) → tgo → kd → rl → eval;
    prints the results table."""
    import demo
    import rl
    from retriever import BM25Retriever
    if dist.enabled:
        raise ValueError("the demo chain runs in one process; use the stage subcommands with torchrun")
    preset = PRESETS[preset_name]()
    own_demo_dir(out)
    t_start = t = time.time()
    seconds = {}                          # wall time per stage, reported with the results
    world = demo.make_world(seed=preset.world_seed, n_test=preset.n_test, n_validation=preset.n_validation,
                            scale=preset.world_scale)
    paths = demo.write_world(world, os.path.join(out, "data"))
    tokenizer = demo.train_tokenizer(world, os.path.join(out, "tokenizer"))
    retriever = BM25Retriever(world.corpus)
    rcfg = RolloutConfig(max_new_tokens=preset.max_new_tokens, greedy=True)
    kd_pool = world.train[:preset.kd_pool]
    rl_pool = world.train[preset.kd_pool:preset.kd_pool + preset.rl_pool]
    validation = world.validation[:preset.val_limit] if preset.val_limit else world.validation
    test = world.test[:preset.eval_limit] if preset.eval_limit else world.test
    print0(dist, f"demo world: {len(world.corpus)} passages; questions: KD pool {len(kd_pool)}, RL pool "
                 f"{len(rl_pool)} (disjoint), validation {len(validation)}, test {len(test)} -> {paths['corpus']}")
    dirs = {name: os.path.join(out, name) for name in ("init", "teacher", "base", "kd", "dgpo")}

    # 1. the demo teacher learns the protocol from the oracle's correct trajectories (all training questions)
    fingerprint = data.tokenizer_fingerprint(tokenizer)
    oracle_records = demo.oracle_records(world.train, retriever, tokenizer,
                                         dataclasses.replace(rcfg, max_new_tokens=500))
    data.write_jsonl(os.path.join(out, "oracle.jsonl"), oracle_records)
    print0(dist, f"oracle: {len(oracle_records)}/{len(world.train)} correct training trajectories")
    seconds["world+tokenizer+oracle"], t = time.time() - t, time.time()
    demo.make_tiny_model(tokenizer, preset.teacher_size, seed=1, out_dir=os.path.join(dirs["init"], "teacher"))
    teacher = load_model(os.path.join(dirs["init"], "teacher"), dist, trainable=True)
    train_supervised(teacher, tokenizer, oracle_records, preset.teacher, dist, dirs["teacher"], desc="teacher")
    teacher.eval().requires_grad_(False)
    seconds["teacher"], t = time.time() - t, time.time()

    # 2. the base student: the student architecture, language-model-pretrained on the corpus text only
    demo.make_tiny_model(tokenizer, preset.student_size, seed=2, out_dir=os.path.join(dirs["init"], "student"))
    student = load_model(os.path.join(dirs["init"], "student"), dist, trainable=True)
    train_supervised(student, tokenizer, demo.corpus_records(world, tokenizer), preset.pretrain, dist, dirs["base"],
                     desc="pretrain")
    seconds["base student"], t = time.time() - t, time.time()

    # 3. tgo: the teacher's correct trajectories on the KD pool
    tgo_path = os.path.join(out, "tgo.jsonl")
    stats = run_tgo(teacher, tokenizer, kd_pool, retriever, rcfg, dist, tgo_path, samples=1,
                    batch_size=preset.eval_batch_size, keep_wrong=preset.tgo_keep_wrong)
    if not stats["kept"]:       # checked before loading: the loader rejects an empty file less clearly
        raise RuntimeError("the teacher got no training question right: nothing to distil")
    tgo = data.load_trajectories(tgo_path, vocab_size=len(tokenizer), tokenizer_fingerprint=fingerprint)
    seconds["tgo"], t = time.time() - t, time.time()

    # 4. kd: cold start of the base student on the teacher's trajectories
    heldout, train_part = tgo[:max(1, len(tgo) // 20)], tgo[max(1, len(tgo) // 20):]
    train_supervised(student, tokenizer, train_part, preset.kd, dist, dirs["kd"], teacher=teacher,
                     heldout=heldout, desc="kd")
    del student
    seconds["kd"], t = time.time() - t, time.time()

    # 5. rl: DGPO from the KD student on the RL pool; the best validation checkpoint (step 0 = KD) is kept
    summary = rl.train_rl(dirs["kd"], dirs["teacher"], rl_pool, retriever, rl.RLConfig(**preset.rl), dist,
                          dirs["dgpo"], validation=validation)
    seconds["rl"], t = time.time() - t, time.time()

    # 6. evaluation on the test split
    reports = {}
    for name, model_dir in [("Student (base)", dirs["base"]), ("Teacher", dirs["teacher"]),
                            ("KD only", dirs["kd"]), ("DGPO", best_or_last(dirs["dgpo"]))]:
        reports[name] = evaluate_dir(model_dir, test, retriever, rcfg, dist,
                                     os.path.join(out, "eval", name.split()[0].lower()),
                                     batch_size=preset.eval_batch_size)
    seconds["eval"], seconds["total"] = time.time() - t, time.time() - t_start
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    per_question = {name: per_question_em(os.path.join(out, "eval", name.split()[0].lower(), "trajectories.jsonl"))
                    for name in reports}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"preset": preset_name, "reports": reports, "paired_vs_kd": paired_differences(per_question),
                   "rl": summary, "seconds": seconds}, f, indent=1)
    print0(dist, "\n" + results_table(reports, per_question))
    print0(dist, f"\nDGPO = the RL checkpoint with the best validation EM (step {summary['best_step']} of "
                 f"{preset.rl['steps']}; step 0 is the KD model itself). Seconds per stage: {seconds}. "
                 f"Everything is in {out}/.")
    return reports


def best_or_last(run_dir: str) -> str:
    """The checkpoint a run reports: best/ (by validation EM) when it validated, else its last one."""
    best = os.path.join(run_dir, "best")
    return best if os.path.isdir(best) else run_dir


def per_question_em(trajectories_path: str) -> dict[tuple[str, str], float]:
    """{(data_source, id): EM} of every question of an evaluation's trajectories.jsonl (arc_metric's)."""
    return {data.question_key(row): float(row["scores"]["em"]) for _, row in data.read_jsonl(trajectories_path)}


def paired_differences(per_question: dict[str, dict], reference: str = "KD only") -> dict[str, dict]:
    """Every other method against `reference` on the same questions: {method: {diff, low, high, n,
    seeds} (the EM difference method − reference with its 95% bootstrap interval over questions,
    stats.paired_difference), only_reference / only_method (the questions only one of the two got
    right), mcnemar_p (stats.mcnemar_exact)}. A method scored on other questions than the reference
    is an error naming both."""
    ref = per_question[reference]
    keys = sorted(ref)
    out = {}
    for name, scores in per_question.items():
        if name == reference:
            continue
        if set(scores) != set(ref):
            raise ValueError(f"{name} and {reference} were evaluated on different questions "
                             f"({len(scores)} and {len(ref)}): a paired comparison needs the same ones")
        a, b = np.array([ref[k] for k in keys]), np.array([scores[k] for k in keys])
        only_b, only_a = stats.discordant_counts(a, b)
        out[name] = {**stats.paired_difference(a, b), "only_reference": only_a, "only_method": only_b,
                     "mcnemar_p": stats.mcnemar_exact(a, b)}
    return out


def paired_table(per_question: dict[str, dict], reference: str = "KD only") -> str:
    """paired_differences as a Markdown table, a row per method."""
    rows = [f"| method − {reference} | questions | EM difference [95% CI] | only {reference} right | "
            "only method right | McNemar p |", "|---|---:|---|---:|---:|---:|"]
    for name, d in paired_differences(per_question, reference).items():
        rows.append(f"| {name} | {d['n']} | {stats.format_difference(d)} | {d['only_reference']} | "
                    f"{d['only_method']} | {d['mcnemar_p']:.3g} |")
    return "\n".join(rows)


def results_table(reports: dict[str, dict], per_question: dict[str, dict] | None = None) -> str:
    """Methods × (EM per data source, Avg), evidence-given EM w/ think per source, and the ARC columns
    on all test questions; with `per_question` ({method: per_question_em(...)}, "KD only" among them)
    the paired comparison of every other method with the KD model (paired_table)."""
    em = arc_metric.render_comparison(reports, metric="em", title="EM on the demo test split")
    probe = arc_metric.render_comparison(reports, metric="probe_em_think",
                                         title="Evidence-given EM, w/ think, on the demo test split")
    columns = ["em", "f1", "hit_substr", "searches", "probe_em_no_think", "probe_em_think", "probe_own_turn",
               "has_answer"]
    rows = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, report in reports.items():
        rows.append(f"| {name} | " + " | ".join(f"{report['all'].get(c, float('nan')):.3f}" for c in columns) + " |")
    table = em + "\n\n" + probe + "\n\nARC (all test questions)\n" + "\n".join(rows)
    if per_question:
        table += "\n\nPaired on the same test questions (95% CI: bootstrap over questions)\n" + paired_table(per_question)
    return table


# -----------------------------------------------------------------------------
# Command line: one subcommand per stage; config fields become --options with their defaults


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block of a stage runs to ~28 lines and hides the
    message; --help shows it), and a negative number such as `--lr -1e-3` read as the option's
    value, so the range check answers it (argparse takes "-1e-3" for an option: "expected one
    argument")."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(glue_negative_numbers(sys.argv[1:] if args is None else list(args)),
                                        namespace)


def glue_negative_numbers(argv: list[str]) -> list[str]:
    """["--lr", "-1e-3"] -> ["--lr=-1e-3"]: a number that starts with "-" after a --long option is its value."""
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def field_comments(config_cls) -> dict:
    """The `# comment` after each field of a config dataclass, by field name: the one place a
    setting is explained, in the source and in --help alike."""
    comments = {}
    for line in inspect.getsource(config_cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def add_config_args(parser: argparse.ArgumentParser, config_cls) -> None:
    comments = field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, default = f"--{f.name.replace('_', '-')}", f.default
        what = (comments[f.name] + " ").replace("%", "%%") if f.name in comments else ""
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=f"{what}(default: {default})")
            continue
        # a None default (e.g. `seed: int | None = None`) takes its type from the annotation
        kind = type(default) if default is not None else (int if "int" in str(f.type) else float)
        legal = f"{range_text(f.name)}, " if f.name in RANGES else ""
        parser.add_argument(flag, dest=f.name, type=ranged(f.name, kind) if f.name in RANGES else kind,
                            default=default, choices=CHOICES.get(f.name), help=f"{what}({legal}default: {default})")


def ranged(name: str, kind):
    """An argparse type that parses `kind` and refuses values outside RANGES[name] at parse time."""
    def parse(text: str):
        value = kind(text)
        if not in_range(name, value):
            finite = "" if math.isfinite(value) else "finite and "
            raise argparse.ArgumentTypeError(f"must be {finite}{range_text(name)}, got {text}")
        return value
    parse.__name__ = kind.__name__          # argparse names the type in its messages
    return parse


def config_from_args(args, config_cls):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def add_run_args(parser) -> None:
    """Where a training stage writes, and how it resumes."""
    parser.add_argument("--out", required=True, help="the run's directory (a checkpoint of the model)")
    parser.add_argument("--resume", help="a checkpoint dir of this stage (trainer_state.pt) to continue")
    parser.add_argument("--override-config", action="store_true",
                        help="with --resume: apply settings that differ from the checkpoint's (recorded)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out run directory")
    parser.add_argument("--stop-after", type=ranged("steps", int), help="end this run after N steps, resumable")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--report-to", choices=REPORT_TO, default="none",
                        help="also send the metrics to TensorBoard or W&B (metrics.jsonl is always written)")
    parser.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="float32",
                        help="dtype of the saved model files (bfloat16 halves them; a resume is then not exact)")


def add_retriever_args(parser) -> None:
    parser.add_argument("--corpus", help="JSONL corpus {id, contents} (.jsonl or .jsonl.gz) for in-process BM25")
    parser.add_argument("--index", help="a BM25 index directory built by `python retriever.py index`")
    parser.add_argument("--retriever-url", help="a Search-R1 retrieval server, e.g. http://127.0.0.1:8000/retrieve")
    add_retriever_client_args(parser)


def retriever_from_args(args, topk: int):
    """A function that builds the retriever the arguments name: called by a stage only after its
    cheaper checks, since a corpus may take minutes to index and a server minutes to answer."""
    return lambda: make_retriever(args.corpus, args.retriever_url, topk, index=args.index,
                                  retry_seconds=args.retriever_retry_seconds, timeout=args.retriever_timeout)


def add_retriever_client_args(parser) -> None:
    """How patient the client of a retrieval server is (used only with --retriever-url)."""
    parser.add_argument("--retriever-retry-seconds", type=ranged("retriever_retry_seconds", float), default=300.0,
                        metavar="S", help="keep retrying a failing retrieval server for up to S seconds, with backoff "
                        "and a line per retry, so a run rides out a server restart (>= 0; 0: one attempt; default: 300)")
    parser.add_argument("--retriever-timeout", type=ranged("retriever_timeout", float), default=30.0, metavar="S",
                        help="seconds one retrieval request may take; a CPU-FAISS server answering a large batch "
                             "needs more (> 0, default: 30)")


def parse_args(argv):
    import rl               # the rl stage's module (it imports this one, so not at the top)
    parser = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="Errors print one line; --debug (anywhere on the line) shows the traceback.")
    sub = parser.add_subparsers(dest="stage")

    p = sub.add_parser("demo", help="the whole chain on the built-in world (default)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--out", default="runs/demo")

    for name, help_text in [("teacher", "SFT a model on trajectories (CE on loss tokens)"),
                            ("kd", "cold start: CE + λ·KL(teacher‖student) on teacher trajectories")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model" if name == "teacher" else "--student", required=True, help="HF model dir")
        if name == "kd":
            p.add_argument("--teacher", required=True, help="HF model dir of the teacher")
        p.add_argument("--data", required=True, help="trajectories JSONL (e.g. tgo.jsonl)")
        p.add_argument("--heldout", help="held-out trajectories JSONL for the held-out loss")
        add_run_args(p)
        add_config_args(p, SupervisedConfig)

    p = sub.add_parser("tgo", help="teacher rollouts over questions; keep the correct ones")
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True, help="questions JSONL")
    p.add_argument("--out", required=True, help="output trajectories JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--samples", type=ranged("steps", int), default=1, help="rollouts per question (greedy if 1)")
    p.add_argument("--batch-size", type=ranged("batch_size", int), default=64)
    add_retriever_args(p)
    add_config_args(p, RolloutConfig)

    p = sub.add_parser("rl", help="DGPO (or GRPO / the paper's reward-penalty variant)")
    p.add_argument("--student", required=True)
    p.add_argument("--teacher")
    p.add_argument("--data", required=True, help="training questions JSONL")
    p.add_argument("--val", help="validation questions JSONL (for --eval-every)")
    add_run_args(p)
    add_retriever_args(p)
    add_config_args(p, rl.RLConfig)

    sub.add_parser("eval", add_help=False,
                   help="ARC evaluation of a model dir: the options of `python arc_metric.py --help`")

    args = parser.parse_args(argv)
    if args.stage is None:               # `python train.py`: the whole demo
        args = parser.parse_args(["demo"] + list(argv))
    if args.stage == "rl":               # settings that are legal alone but not for GRPO, said at parse time
        p = sub.choices["rl"]
        if args.algo == "grpo" and args.group_size < 2:
            p.error(f"--group-size {args.group_size}: GRPO normalises each reward within its group of "
                    "rollouts of one question, so a group of 1 has advantage 0 by construction; use >= 2 "
                    "(or --algo ppo, whose critic needs no group)")
        if not args.temperature > 0:
            p.error(f"--temperature {args.temperature}: RL samples its rollouts (and scores them) at this "
                    "temperature; it must be > 0 (greedy rollouts make every group identical)")
        if args.eval_every and not args.val:
            p.error("--eval-every needs --val FILE (the validation questions)")
    if args.stage in ("teacher", "kd") and args.eval_every and not args.heldout:
        sub.choices[args.stage].error("--eval-every needs --heldout FILE (the held-out trajectories it scores)")
    if args.stage in ("teacher", "kd", "rl") and args.override_config and not args.resume:
        sub.choices[args.stage].error("--override-config only makes sense with --resume")
    return args


def main(argv=None) -> None:
    """The command line as a function (errors are raised; `run_cli` turns them into one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:             # one evaluation entry point: arc_metric's
        arc_metric.main(argv[1:])
        return
    args = parse_args(argv)
    dist = setup()
    torch.manual_seed(1234 + dist.rank)  # each rank its own seed; sampling uses explicit generators
    try:
        run_stage(args, dist, argv)
    finally:
        if dist.enabled:
            torch_dist.destroy_process_group()


# what a person can act on: bad arguments, files, models, a missing optional package, a run that
# stopped on purpose. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, Stopped)


def run_cli(entry, argv=None) -> None:
    """Runs a command-line entry point `entry(argv)`: a user error (USER_ERRORS) prints one line,
    "error: …", and exits 2; an interrupted run prints how to continue it and exits 128 + the
    signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell does. `--debug` anywhere on the
    line keeps the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        entry(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        where = f"[rank {os.environ['RANK']}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        print(f"{where}error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(128 + error.signum if isinstance(error, Interrupted) else 2) from None


def run_info(args, argv: list[str]) -> dict:
    """What train_config.json records besides the settings: every command-line value, the command
    line itself (the one a hint to continue the run repeats), and the versions that matter for
    reproducing the run."""
    import transformers
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == "train.py" else "train.py"
    return {"args": {k: v for k, v in vars(args).items()}, "argv": [script, *argv],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]}}


def run_stage(args, dist: Dist, argv: list[str] | None = None) -> None:
    """One stage from its parsed arguments. Everything cheap is checked before anything slow: the
    settings, that --out may be written (and is no input), the data files, then models, then the
    retriever (building a BM25 index of a large corpus takes minutes); nothing is deleted before
    every input is loaded."""
    import rl
    info = run_info(args, argv if argv is not None else sys.argv[1:])
    if args.stage == "demo":
        run_demo(args.preset, args.out, dist)
    elif args.stage in ("teacher", "kd"):
        cfg = config_from_args(args, SupervisedConfig)
        check_config(cfg)
        start = args.model if args.stage == "teacher" else args.student
        # what this run reads (resumed, the weights come from the checkpoint, not from --model/--student)
        paths = {"--model" if args.stage == "teacher" else "--student": None if args.resume else start,
                 "--teacher": getattr(args, "teacher", None), "--data": args.data, "--heldout": args.heldout,
                 "--resume": args.resume}
        recover_resume(args.resume, dist)                      # before anything reads it
        if dist.master:                                        # before any model is loaded
            check_output(args.out, args.resume, args.overwrite, inputs=paths)
        arg = "--resume" if args.resume else ("--model" if args.stage == "teacher" else "--student")
        init = args.resume or start
        tokenizer = load_tokenizer(init, arg)
        teacher_tok = load_tokenizer(args.teacher, "--teacher") if args.stage == "kd" else None
        if teacher_tok is not None:          # first: the trajectories were made with the teacher's tokenizer
            check_same_tokenizer(tokenizer, teacher_tok, args.student, args.teacher)
        made_with = {"vocab_size": len(tokenizer), "tokenizer_fingerprint": data.accepted_fingerprints(
            tokenizer, *([teacher_tok] if teacher_tok is not None else []))}
        records = data.load_trajectories(args.data, **made_with)
        heldout = data.load_trajectories(args.heldout, **made_with) if args.heldout else None
        for flag, rows in (("--data", records), ("--heldout", heldout)):
            if rows is not None and loss_token_count(rows) == 0:
                raise ValueError(f"{flag} {paths[flag]}: no row has a loss token (every loss_mask is 0 after the "
                                 "prompt): nothing to train on")
        teacher = None
        if args.stage == "kd":
            teacher = load_model(args.teacher, dist, trainable=False, arg="--teacher")
        model = load_model(init, dist, trainable=True, grad_checkpointing=args.grad_checkpointing, arg=arg)
        inputs = input_fingerprints({"--data": args.data, "--heldout": args.heldout,
                                     "--teacher": getattr(args, "teacher", None)},
                                    rows={"--data": len(records), "--heldout": len(heldout or [])})
        train_supervised(model, tokenizer, records, cfg, dist, args.out, teacher=teacher, heldout=heldout,
                         resume=args.resume, desc=args.stage, stop_after=args.stop_after,
                         override_config=args.override_config, overwrite=args.overwrite, report_to=args.report_to,
                         save_dtype=args.save_dtype, info=info, inputs=inputs)
    elif args.stage == "tgo":
        rcfg = config_from_args(args, RolloutConfig)
        rcfg.greedy = rcfg.greedy or args.samples == 1
        paths = {"--teacher": args.teacher, "--data": args.data, "--corpus": args.corpus, "--index": args.index}
        if dist.master:
            check_output(args.out, None, args.overwrite, kind="file", inputs=paths)
        questions = data.load_questions(args.data)
        tokenizer = load_tokenizer(args.teacher, "--teacher")
        teacher = load_model(args.teacher, dist, trainable=False, arg="--teacher")
        inputs = input_fingerprints({"--data": args.data, "--teacher": args.teacher, "--corpus": args.corpus,
                                     "--index": args.index, "--retriever-url": args.retriever_url},
                                    rows={"--data": len(questions)})
        run_tgo(teacher, tokenizer, questions,
                retriever_from_args(args, rcfg.topk), rcfg, dist,
                args.out, samples=args.samples, batch_size=args.batch_size, seed=rcfg.seed or 0, info=info,
                inputs=inputs, overwrite=args.overwrite)
    elif args.stage == "rl":
        cfg = config_from_args(args, rl.RLConfig)
        rl.check_rl_config(cfg, dist)
        # what this run reads (resumed, the weights come from the checkpoint, not from --student)
        paths = {"--student": None if args.resume else args.student, "--teacher": args.teacher, "--data": args.data,
                 "--val": args.val, "--corpus": args.corpus, "--index": args.index, "--resume": args.resume}
        recover_resume(args.resume, dist)
        if dist.master:
            check_output(args.out, args.resume, args.overwrite, inputs=paths)
        questions = data.load_questions(args.data)
        validation = data.load_questions(args.val) if args.val else None
        inputs = input_fingerprints({"--data": args.data, "--val": args.val, "--teacher": args.teacher,
                                     "--corpus": args.corpus, "--index": args.index,
                                     "--retriever-url": args.retriever_url},
                                    rows={"--data": len(questions), "--val": len(validation or [])})
        summary = rl.train_rl(args.student, args.teacher, questions,
                              retriever_from_args(args, cfg.topk),
                              cfg, dist, args.out, validation=validation, resume=args.resume,
                              grad_checkpointing=args.grad_checkpointing, stop_after=args.stop_after,
                              override_config=args.override_config, overwrite=args.overwrite,
                              report_to=args.report_to, save_dtype=args.save_dtype, info=info, inputs=inputs)
        print0(dist, json.dumps(summary))


if __name__ == "__main__":
    import train            # run as the module `train`, the one rl.py imports, not as a second copy
    train.run_cli(train.main)
