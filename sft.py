"""The supervised stages: teacher SFT, the KD cold start, and tgo (the teacher's correct trajectories).

What it does: `train_supervised` trains a model on trajectory records, the loss only on the tokens the
policy wrote: cross-entropy alone (teacher SFT, no teacher) or CE + λ·KL(π_T‖π_θ) to a frozen teacher
(the KD cold start, dgpo.kd_loss), normalised by the global token count so N ranks make the update
one process would; with resumable checkpoints, a held-out loss and Ctrl-C / SIGTERM saving first.
`run_tgo` rolls the teacher out over training questions and keeps the correct trajectories
(docs/method.md §1): the data KD trains on; a rerun continues where a crash stopped it.

What it does not do: define the losses (dgpo.py), the forward (models.py), the optimizer step, the
metrics or the run around the loop (set-up, resume, save cadence: loop.py), checkpoints (checkpoint.py),
or RL (rl.py).

    import ddp, loop, models, sft
    dist = ddp.setup()
    student = models.load_model("runs/base", dist, trainable=True)
    teacher = models.load_model("runs/teacher", dist, trainable=False)
    sft.train_supervised(student, tokenizer, records, sft.SupervisedConfig(steps=100), dist, loop.Run("runs/kd"),
                         teacher=teacher, desc="kd")
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

import arc_eval
import checkpoint
import data
import dgpo
import ddp
import loop
import models
import rollout
import settings


@dataclass
class SupervisedConfig:
    """Teacher SFT (no teacher: CE only) and the KD cold start (CE + λ·forward KL to the teacher). Each
    setting's help and legal values are declared on its field (settings.py); lr and weight_decay stop at
    1 because AdamW above that destroys the model within steps."""
    steps: int = settings.setting(1000, "optimizer steps", ge=1)
    batch_size: int = settings.setting(8, "sequences per optimizer step, over all ranks", ge=1)
    micro_batch_size: int = settings.setting(8, "sequences per forward/backward on one rank", ge=1)
    lr: float = settings.setting(1e-5, "peak learning rate", ge=0, le=1)
    min_lr_ratio: float = settings.setting(0.1, "cosine decay to lr·min_lr_ratio", ge=0, le=1)
    warmup_steps: int = settings.setting(20, "linear warm-up steps", ge=0)
    weight_decay: float = settings.setting(0.0, "AdamW weight decay", ge=0, le=1)
    grad_clip: float = settings.setting(1.0, "max global gradient norm", gt=0)
    lam: float = settings.setting(1.0, "λ of the KD term (docs/method.md §4)", ge=0)
    seed: int = settings.setting(0, "data order and any sampling", ge=0)
    length_buckets: int = settings.setting(
        1, "batches of N consecutive steps are drawn together and grouped by length, so each pads little "
        "(loop.length_bucketed_window); 1 = no grouping", ge=1)
    eval_every: int = settings.setting(0, "held-out KD loss every N steps (0 = only at the end)", ge=0)
    save_every: int = settings.setting(0, "a resumable checkpoint every N steps (0 = only at the end)", ge=0)


def supervised_loss(model, teacher, records: list[dict], normaliser: float, vocab_size: int,
                    lam: float, dist: ddp.Dist) -> tuple[torch.Tensor, dict]:
    """One micro-batch of the supervised loss, Σ over loss tokens / normaliser of
    CE (no teacher: teacher SFT) or CE + λ·KL(π_T‖π_θ) (the KD cold start, dgpo.kd_loss)."""
    batch = models.make_batch(records, dist.device)
    with ddp.autocast(dist):
        logits = models.logits_of(model, batch)                                # (B, L, V)
        if teacher is None:
            logp = dgpo.token_logprobs(logits[..., :vocab_size], batch.targets)   # (B, L)
            loss = dgpo.aggregate(-logp, batch.mask, "token-mean", normaliser)
            n = int(batch.mask.sum())
            ce = (-logp.detach()[batch.mask]).sum().item() / max(n, 1)
            return loss, {"ce": ce, "kl": 0.0, "n_tokens": n}
        with torch.no_grad():
            teacher_logits = models.logits_of(teacher, batch)                  # (B, L, V_T)
        return dgpo.kd_loss(logits, teacher_logits, batch.targets, batch.mask, lam=lam,
                            normaliser=normaliser, vocab_size=vocab_size)


def train_supervised(model, tokenizer, records: list[dict], cfg: SupervisedConfig, dist: ddp.Dist, run: loop.Run,
                     teacher=None, heldout: list[dict] | None = None, desc: str = "sft") -> dict:
    """Trains `model` on trajectory records (loss on loss_mask tokens) and saves it to run.out_dir;
    `desc` names the stage (teacher, pretrain, kd: a checkpoint resumes only as its own stage). With
    run.resume the model must already hold that checkpoint's weights; run.stop_after ends this run early
    with the schedule still spanning cfg.steps; run.info goes into train_config.json beside the
    settings; run.inputs ({argument: checkpoint.fingerprint}) is recorded in the trainer state, and a
    resume with other inputs is refused unless run.override_config. SIGINT / SIGTERM: the step
    finishes, a resumable checkpoint is saved and Interrupted is raised (loop.Stage)."""
    settings.check(cfg)
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {dist.world_size}")
    if cfg.eval_every and not heldout:
        raise ValueError(f"--eval-every {cfg.eval_every}: needs held-out trajectories (--heldout FILE)")
    for what, rows in (("the training trajectories", records), ("the held-out trajectories", heldout or None)):
        if rows is not None and models.loss_token_count(rows) == 0:
            raise ValueError(f"{what}: no row has a loss token (every loss_mask is 0 after the prompt), so there "
                             "is nothing to train on or to score")
    loop.check_run(run, {}, dist)        # the caller loaded `model` from run.resume: run_stage recovers before that
    vocab_size = models.vocab_size_of(tokenizer, model, *([teacher] if teacher is not None else []))
    ddp_model = models.wrap(model, dist)
    teacher = models.HeadAtPositions(teacher).check() if teacher is not None else None
    optimizer, scheduler = loop.make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.steps, cfg.warmup_steps,
                                               cfg.min_lr_ratio)
    stage = loop.open_stage(desc, cfg, run, loop.resumed_state(run, desc, cfg, dist), optimizer, scheduler, dist)

    def save(step: int) -> None:
        checkpoint.save_checkpoint(run.out_dir, models.hf_model(ddp_model), tokenizer, dist,
                                   stage.trainer_state(step, optimizer, scheduler), save_dtype=run.save_dtype,
                                   info=run.info)

    per_rank = cfg.batch_size // dist.world_size
    lengths = [len(r["input_ids"]) for r in records]
    model.train()
    with stage as steps:
        for step in steps:
            t0 = time.time()
            # the global batch of this step: a window of a per-epoch permutation (grouped by length over
            # cfg.length_buckets steps); each rank its slice
            idx = loop.length_bucketed_window(cfg.seed, lengths, step, cfg.batch_size, cfg.length_buckets)
            local = [records[i] for i in idx[dist.rank * per_rank:(dist.rank + 1) * per_rank]]
            normaliser = models.global_token_count(dist, local) / dist.world_size   # DDP averages over ranks
            chunks = models.micro_batches(local, cfg.micro_batch_size)
            sums, finite = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "n_tokens": 0.0}, True
            for i, chunk in enumerate(chunks):
                with ddp.ddp_sync(ddp_model, last=i == len(chunks) - 1):
                    loss, m = supervised_loss(ddp_model, teacher, chunk, normaliser, vocab_size, cfg.lam, dist)
                    loss.backward()               # even if not finite: every rank keeps in step with DDP
                finite &= math.isfinite(loss.item())
                sums["loss"] += loss.item()
                for k in ("ce", "kl"):
                    sums[k] += m[k] * m["n_tokens"]
                sums["n_tokens"] += m["n_tokens"]
            norm = loop.optimizer_step(ddp_model, optimizer, scheduler, cfg.grad_clip, stage.counters, dist, finite)
            loss_sum, ce_sum, kl_sum, n_tok = ddp.all_reduce_sum(dist, [sums["loss"], sums["ce"], sums["kl"],
                                                                        sums["n_tokens"]])
            row = {"step": step + 1, "loss": loss_sum / dist.world_size, "ce": ce_sum / max(n_tok, 1),
                   "kl": kl_sum / max(n_tok, 1), "grad_norm": norm, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": n_tok / (time.time() - t0),
                   "skipped_steps": stage.counters.get("skipped_steps", 0),
                   "zero_grad_steps": stage.counters.get("zero_grad_steps", 0)}
            if heldout and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps):
                row["heldout_loss"] = heldout_loss(model, teacher, heldout, cfg, vocab_size, dist)
            stage.after_step(step, row, save, loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}")
    stage.finish(save)
    return stage.counters


@torch.no_grad()
def heldout_loss(model, teacher, records: list[dict], cfg: SupervisedConfig, vocab_size: int,
                 dist: ddp.Dist) -> float:
    """The supervised loss (KD loss when a teacher is given) on held-out trajectories, token-mean."""
    was_training = model.training
    model.eval()
    total = models.loss_token_count(records)
    loss = sum(supervised_loss(model, teacher, chunk, total, vocab_size, cfg.lam, dist)[0].item()
               for chunk in models.micro_batches(records, cfg.micro_batch_size))
    model.train(was_training)
    return loss


# -----------------------------------------------------------------------------
# Stage: tgo — the teacher's correct trajectories


def run_tgo(teacher, tokenizer, questions: list[dict], retriever, rcfg: rollout.RolloutConfig, dist: ddp.Dist,
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
    rcfg = dataclasses.replace(rcfg, max_total_tokens=rollout.length_budget(rcfg.max_total_tokens, teacher))
    rollout.check_prompts(tokenizer, questions, rcfg.max_total_tokens, "question", rcfg.prompt_from)
    fingerprint = data.vocab_fingerprint(tokenizer)       # kd refuses these ids with another tokenizer
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
        ddp.print0(dist, f"tgo: continuing after {len(done)} finished rollouts in {out_path}.progress-*")
    progress = f"{out_path}.progress-rank{dist.rank}.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if not os.path.isfile(progress) or os.path.getsize(progress) == 0:
        data.append_jsonl(progress, [{"made_with": made_with}])
    mine = todo[dist.rank::dist.world_size]
    generator = torch.Generator(device=dist.device).manual_seed(seed + dist.rank)
    bar = tqdm(total=samples * len(questions), initial=len(done), desc="tgo", disable=not dist.master,
               dynamic_ncols=True)
    # every rank runs as many chunks as rank 0 (whose share is the largest), an empty one at the end if
    # need be: a retriever the ranks call together (ddp.OneCallerRetriever) needs the same calls on each
    for start in range(0, len(todo[0::dist.world_size]), batch_size):
        chunk = mine[start:start + batch_size]
        records = arc_eval.generate_records(teacher, tokenizer, [questions[i] for _, i in chunk], retriever, rcfg,
                                            dist, batch_size, generator)
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
    ddp.print0(dist, f"tgo: kept {len(kept)} of {len(records)} teacher trajectories -> {out_path}")
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
