"""The RL stage of DGPO: rollouts with the real retriever, binary EM reward, the teacher's guidance
on wrong rollouts, and the update — GRPO (the default) or PPO with GAE and a critic (the paper's).

What it does: `train_rl(...)` (the `python train.py rl` stage) runs RL steps; each step rolls out
`prompts_per_step` questions (`group_size` times each, every rank its own whole groups), scores
them (EM on the model's own answer), computes advantages and updates the policy in
`mini_batches` optimizer steps:
  --algo grpo  group-normalised EM advantages (dgpo.group_advantages), no critic
  --algo ppo   per-token rewards (EM on the last sampled token, plus the paper's k1 teacher penalty
               on wrong rollouts with --teacher-as reward), GAE over the sampled tokens with a
               critic initialised from the student (dgpo.gae_advantages), the critic trained on the
               clipped value loss with its own optimizer
Both use the same clipped surrogate (dgpo.dgpo_loss: asymmetric clip, entropy bonus, and with
--teacher-as loss the selective KL(π_θ‖π_T) term). Every log-prob is taken at the sampling
temperature (rl_logits), so ratios, KL estimates and penalties refer to the policy that sampled.
--drop-constant-groups (GRPO) is DAPO's dynamic sampling: the step is refilled with further questions
until it holds prompts_per_step groups whose rewards differ, and the policy gradient is taken over
those only (informative_records); the teacher term still acts on the other wrong rollouts.

Instruments, in every step's metrics row: mixed_groups, nonzero_adv, the gradient norm of each loss
term (--term-grad-norms), PPO's explained_var, and the time split rollout_s / score_s / update_s /
critic_s; at every evaluation validation EM, the RL pool's own EM (--pool-eval-limit) and a paired,
low-variance learning probe, the sampled reward on the validation questions (--probe-samples).

What it does not do: define the losses (dgpo.py), generate (rollout.py), or own the shared machinery:
DDP set-up (ddp.py), models and batches (models.py), checkpoints (checkpoint.py), the optimizer,
metrics and stopping (loop.py), the rules for settings (settings.py) and the CLI (cli.py, train.py).

Distributed: each rank rolls out its own share of whole groups; every loss is divided by the
GLOBAL token count and PPO's whitening uses global moments, so N ranks make the same actor and
critic updates as one process (tests/test_rl.py checks both with gloo). Every decision that
depends on the data (skip a step, draw another round, which groups to keep) is all-reduced, so all
ranks take it alike and run the same number of forward/backward passes.

    python train.py rl --student runs/kd --teacher runs/teacher --data train.jsonl --corpus corpus.jsonl \\
        --out runs/dgpo                                     # GRPO + selective teacher KL (DGPO)
    python train.py rl --algo ppo --group-size 1 --teacher-as reward ...   # the paper's form
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

import data
import dgpo
import arc_eval
import checkpoint
import ddp
import loop
import models
import rollout
import settings


@dataclass
class RLConfig:
    """Defaults are the paper's values where it gives one (docs/method.md §4). Each setting's help and
    legal values are declared on its field (settings.py); the rollout settings are rollout.RolloutConfig's.
    Why some bounds exist: AdamW moves every weight by about lr per step and shrinks it by
    lr·weight_decay, so above 1 either destroys the model within steps (lr 1e30: NaN logits two steps
    later, in sampling); grad_clip 0 would clip every update to nothing; a negative beta pushes the
    student away from the teacher."""
    steps: int = settings.setting(1000, "RL steps: one round of rollouts and one update each", ge=1)
    algo: str = settings.setting("grpo", "grpo (group advantages) | ppo (GAE with a critic, the paper's)",
                                 choices=("grpo", "ppo"))
    prompts_per_step: int = settings.setting(512, "questions per step over all ranks (the paper: 512)", ge=1)
    group_size: int = settings.setting(5, "rollouts per question (GRPO needs >= 2; the paper's PPO uses 1)", ge=1)
    micro_batch_size: int = settings.setting(8, "sequences per forward/backward on one rank", ge=1)
    mini_batches: int = settings.setting(1, "optimizer steps per RL step, each on a share of whole groups", ge=1)
    rollout_batch_size: int = settings.setting(256, "sequences per rollout() call on one rank", ge=1)
    lr: float = settings.setting(1e-6, "actor learning rate (the paper: 1e-6)", ge=0, le=1)
    warmup_ratio: float = settings.setting(0.285, "of `steps` (the paper: 28.5%); then constant", ge=0, le=1)
    weight_decay: float = settings.setting(0.0, "AdamW weight decay", ge=0, le=1)
    grad_clip: float = settings.setting(1.0, "max global gradient norm", gt=0)
    beta: float = settings.setting(0.001, "teacher-KL weight β", ge=0)
    teacher_mode: str = settings.setting("selective", "selective (DGPO) | uniform (KL on all rollouts) | none (no "
                                         "teacher)", choices=("selective", "uniform", "none"))
    teacher_as: str = settings.setting("loss", "loss (this project's default) | reward (the paper's k1 penalty)",
                                       choices=("loss", "reward"))
    kl: str = settings.setting("full", "full (exact KL over the vocabulary) | k2 | k3 (sampled)",
                               choices=("full", "k2", "k3"))
    clip_low: float = settings.setting(0.2, "ratio clip below: 1 − clip_low", ge=0, lt=1)
    clip_high: float = settings.setting(0.2, "ratio clip above: 1 + clip_high", ge=0)
    agg: str = settings.setting("token-mean", "how token losses are averaged (dgpo.aggregate): token-mean over "
                                "the whole step, or micro-token-mean, Search-R1's veRL: each micro-batch's own "
                                "token-mean, averaged over micro-batches and ranks",
                                choices=dgpo.AGG_MODES)
    entropy_coef: float = settings.setting(0.0, "entropy bonus c_H (the paper's PPO run: 0.001)", ge=0)
    critic_lr: float = settings.setting(1e-5, "PPO's critic (the paper: 1e-5)", ge=0, le=1)
    critic_warmup_ratio: float = settings.setting(0.015, "of the critic's steps (Search-R1's PPO script)", ge=0, le=1)
    value_clip: float = settings.setting(0.5, "ε_v of the clipped value loss (veRL's default)", gt=0)
    gamma: float = settings.setting(1.0, "GAE discount (the paper: 1)", ge=0, le=1)
    gae_lambda: float = settings.setting(1.0, "GAE λ (the paper: 1)", ge=0, le=1)
    whiten_advantages: bool = settings.setting(True, "PPO: advantages whitened over the step's tokens (veRL's "
                                               "default)")
    temperature: float = settings.same_as(rollout.RolloutConfig, "temperature", help="rollout sampling temperature; "
                                          "every RL log-prob uses it too (RL refuses 0: greedy rollouts make every "
                                          "group identical)")
    top_p: float = settings.same_as(rollout.RolloutConfig, "top_p")
    max_turns: int = settings.same_as(rollout.RolloutConfig, "max_turns")
    max_new_tokens: int = settings.same_as(rollout.RolloutConfig, "max_new_tokens")
    max_obs_tokens: int = settings.same_as(rollout.RolloutConfig, "max_obs_tokens")
    max_total_tokens: int | None = settings.same_as(rollout.RolloutConfig, "max_total_tokens")
    topk: int = settings.same_as(rollout.RolloutConfig, "topk")
    prompt_from: str = settings.same_as(rollout.RolloutConfig, "prompt_from")
    eos_ends: bool = settings.same_as(rollout.RolloutConfig, "eos_ends")
    seed: int = settings.setting(0, "data order and rollout sampling", ge=0)
    eval_every: int = settings.setting(0, "validation EM every N steps (and at step 0); the best is kept in best/",
                                       ge=0)
    eval_limit: int = settings.setting(0, "validation questions: a seeded sample stratified by data_source (0 = all)",
                                       ge=0)
    save_every: int = settings.setting(0, "a resumable checkpoint every N steps (0 = only at the end)", ge=0)
    drop_constant_groups: bool = settings.setting(
        False, "GRPO: the policy gradient over mixed groups only (rewards not all equal), the step refilled from "
        "further questions until it has prompts_per_step of them (DAPO's dynamic sampling); constant groups still "
        "carry the teacher term")
    max_draws: int = settings.setting(4, "with --drop-constant-groups: at most this many rounds of prompts_per_step "
                                      "questions per step", ge=1)
    term_grad_norms: bool = settings.setting(
        False, "log the gradient norm of each loss term on its own (surrogate, teacher, entropy) every step: a "
        "forward and a backward per term more, 1.4x the update's time on the demo student (docs/usage.md)")
    probe_samples: int = settings.setting(
        0, "at every evaluation: sampled reward on the validation questions x this many samples at the rollout "
        "temperature, the same seed every time (0 = off)", ge=0)
    pool_eval_limit: int = settings.setting(
        0, "at every evaluation: greedy EM on this many RL-pool questions, the first of the data order (0 = off)",
        ge=0)


def rollout_config(cfg: RLConfig, greedy: bool = False,
                   max_total_tokens: int | None = None) -> rollout.RolloutConfig:
    return rollout.RolloutConfig(max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens,
                                 max_obs_tokens=cfg.max_obs_tokens, topk=cfg.topk, temperature=cfg.temperature,
                                 top_p=cfg.top_p, greedy=greedy,
                                 max_total_tokens=max_total_tokens or cfg.max_total_tokens, prompt_from=cfg.prompt_from,
                                 eos_ends=cfg.eos_ends)


def check_rl_config(cfg: RLConfig, dist: ddp.Dist) -> None:
    """Settings that are legal alone but not together, or not for this algorithm or world size."""
    check_rl_settings(cfg)
    if cfg.prompts_per_step % dist.world_size:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} is not divisible by world size "
                         f"{dist.world_size}: every rank must hold whole groups")
    if (cfg.prompts_per_step // dist.world_size) % cfg.mini_batches and not cfg.drop_constant_groups:
        raise ValueError(f"each rank's {cfg.prompts_per_step // dist.world_size} groups cannot form "
                         f"{cfg.mini_batches} equal mini-batches (--mini-batches)")


def check_rl_settings(cfg: RLConfig) -> None:
    """The checks that need no world size: each setting's legal values (declared on its field,
    settings.check) and the combinations this algorithm cannot train with. The CLI runs them at parse
    time, the trainer again."""
    settings.check(cfg)
    if cfg.algo == "grpo" and cfg.group_size < 2:
        raise ValueError(f"--group-size {cfg.group_size}: GRPO normalises rewards within a group of "
                         "rollouts of one question, so a group of 1 has advantage 0 by construction; use >= 2 "
                         "(or --algo ppo, whose critic needs no group)")
    if not cfg.temperature > 0:
        raise ValueError(f"--temperature {cfg.temperature}: RL samples its rollouts and scores them at this "
                         "temperature, so it must be > 0 (greedy rollouts make every group identical)")
    if cfg.drop_constant_groups and cfg.algo != "grpo":
        raise ValueError("--drop-constant-groups is for --algo grpo: PPO's advantages come from its critic, so a "
                         "group whose rewards are all equal still has a policy gradient")
    if (cfg.probe_samples or cfg.pool_eval_limit) and not cfg.eval_every:
        raise ValueError("--probe-samples and --pool-eval-limit act at every evaluation: they need --eval-every N")


# -----------------------------------------------------------------------------
# Scoring the step's tokens: log-probs at the sampling temperature, and the critic's values


def rl_logits(model, batch, vocab_size: int, temperature: float) -> torch.Tensor:
    """The logits every RL log-prob is computed from — the student's, the old policy's and the
    teacher's alike: the model's logits over the tokenizer's vocabulary divided by the rollout's
    sampling temperature, i.e. the distribution rollout._sample drew the tokens from. Ratios, the
    sampled KL estimates and the k1 reward penalty then all refer to the policy that generated the
    tokens, and KL(π_θ‖π_T) compares the two tempered distributions. (Embedding rows past the
    tokenizer, as in Qwen2.5, are sliced off: student and teacher compare like with like.) With
    --top-p < 1 the rollout samples from the nucleus only, while these are the log-probs of the whole
    tempered distribution — the same approximation veRL makes; keep top_p = 1 (the default) for exact
    ratios."""
    return models.logits_of(model, batch)[..., :vocab_size] / temperature              # (B, L, V)


def values_of(critic, batch) -> torch.Tensor:
    """The critic's value at each loss position (the same tokens the policy is scored on): (B, L)."""
    return models.logits_of(critic, batch)[..., 0].float()                            # (B, L)


@torch.no_grad()
def per_record(score, records: list[dict], micro_batch_size: int, dist: ddp.Dist) -> list[torch.Tensor]:
    """score(batch) -> (B, L) for every micro-batch, cut back into one (n_i,) tensor per record (its
    loss positions, in order)."""
    out = {}
    for chunk in models.micro_batches(records, micro_batch_size):
        batch = models.make_batch(chunk, dist.device)
        with ddp.autocast(dist):
            values = score(batch)                                                  # (B, L)
        for r, row, n in zip(chunk, values, batch.mask.sum(1).tolist()):
            out[id(r)] = row[:n].float()                                           # (n_i,)
    return [out[id(r)] for r in records]


def sampled_logprobs(model, records: list[dict], cfg: RLConfig, vocab_size: int, dist: ddp.Dist):
    """log π(y_t) of each record's sampled tokens under `model` (tempered, rl_logits), (n_i,) each:
    log π_old before the first of several mini-batch updates, log π_old and log π_T for the paper's
    reward penalty, which is needed before the advantages exist."""
    def score(batch):
        return dgpo.token_logprobs(rl_logits(model, batch, vocab_size, cfg.temperature), batch.targets)
    return per_record(score, records, cfg.micro_batch_size, dist)


# -----------------------------------------------------------------------------
# Advantages: GRPO's group-normalised EM, or PPO's GAE with a critic


def grpo_advantages(cfg: RLConfig, records: list[dict], teacher_logp: list | None) -> None:
    """A_i = group-normalised EM (dgpo.group_advantages), 0 for a record marked r["pg"] = False
    (--drop-constant-groups: a group the policy gradient leaves out); with the paper's penalty
    (teacher_logp given), per token A_{i,t} = A_i + Σ_{s ≥ t} r_{i,s}, r_t = −β·w_i·(log π_old −
    log π_T) (dgpo.token_advantages). Sets r["advantage"] (and r["token_advantage"], (n_i,)) and
    r["reward"]."""
    em = torch.tensor([r["em"] for r in records], dtype=torch.float32)            # (N,)
    groups = torch.tensor([r["group"] for r in records], dtype=torch.long)
    advantages = dgpo.group_advantages(em, groups)                                # (N,)
    for k, (r, a) in enumerate(zip(records, advantages.tolist())):
        r["advantage"], r["reward"] = (a if r.get("pg", True) else 0.0), r["em"]
        if teacher_logp is not None:
            lp, lt = r["old_logp"][None], teacher_logp[k][None]                   # (1, n_i)
            mask = torch.ones_like(lp, dtype=torch.bool)                          # every entry was sampled
            pen = dgpo.teacher_kl_reward(lp, lt, em[k:k + 1].to(lp.device), mask, cfg.beta, cfg.teacher_mode)
            adv = torch.tensor([r["advantage"]], device=lp.device)
            r["token_advantage"] = dgpo.token_advantages(adv, pen, mask)[0]
            r["reward"] = r["em"] + pen.sum().item()


def ppo_advantages(cfg: RLConfig, records: list[dict], teacher_logp: list | None, values: list,
                   dist: ddp.Dist) -> dict:
    """Per-token rewards r_t = EM·1[last sampled token] (− the k1 teacher penalty on wrong rollouts
    when teacher_logp is given: dgpo.ppo_token_rewards), GAE over the sampled tokens with the
    critic's values (dgpo.gae_advantages), then whitening with the GLOBAL moments of the step's
    advantages (all ranks' tokens), so N ranks whiten as one process would. Sets per record
    r["token_advantage"], r["returns"], r["old_values"] (each (n_i,)) and r["reward"]; with the
    penalty and cfg.term_grad_norms also r["advantage_without_penalty"] (GAE of the EM reward alone,
    whitened alike), from which the penalty's share of the gradient is measured. Returns
    {"explained_var": 1 − Var(returns − values) / Var(returns)} over every rank's sampled tokens
    (NaN when the returns do not vary)."""
    # all records at once, each row its (n_i,) sampled tokens packed to the left: GAE's loop over
    # positions then runs once per step, not once per record
    n = [len(v) for v in values]
    shape, device = (len(records), max(n, default=0)), values[0].device
    v = models.padded(values, shape, device)                                             # (N, L)
    lp = models.padded([r.get("old_logp", torch.zeros_like(x)) for r, x in zip(records, values)], shape, device)
    lt = models.padded(teacher_logp, shape, device) if teacher_logp is not None else lp  # (N, L)
    mask = torch.arange(shape[1], device=device)[None] < torch.tensor(n, device=device)[:, None]  # (N, L)
    em = torch.tensor([r["em"] for r in records], device=device)                 # (N,)
    rewards = dgpo.ppo_token_rewards(em, lp, lt, mask, cfg.beta,
                                     cfg.teacher_mode if teacher_logp is not None else "none")   # (N, L)
    adv, ret = dgpo.gae_advantages(rewards, v, mask, cfg.gamma, cfg.gae_lambda)  # (N, L)
    for k, r in enumerate(records):
        r["token_advantage"], r["returns"], r["old_values"] = adv[k, :n[k]], ret[k, :n[k]], values[k]
        r["advantage"], r["reward"] = 0.0, rewards[k, :n[k]].sum().item()
    if cfg.whiten_advantages:
        whiten(records, "token_advantage", dist)
    if teacher_logp is not None and cfg.term_grad_norms:
        em_only = dgpo.ppo_token_rewards(em, lp, lt, mask, cfg.beta, "none")     # (N, L)
        em_adv, _ = dgpo.gae_advantages(em_only, v, mask, cfg.gamma, cfg.gae_lambda)   # (N, L)
        for k, r in enumerate(records):
            r["advantage_without_penalty"] = em_adv[k, :n[k]]
        if cfg.whiten_advantages:
            whiten(records, "advantage_without_penalty", dist)
    return {"explained_var": explained_variance(ret, v, mask, dist)}


def whiten(records: list[dict], key: str, dist: ddp.Dist) -> None:
    """r[key] ((n_i,) each) whitened with the GLOBAL moments of every rank's entries (dgpo.masked_whiten)."""
    local = [sum(r[key].sum().item() for r in records), sum((r[key] ** 2).sum().item() for r in records),
             sum(len(r[key]) for r in records)]                                   # Σ A, Σ A², count
    total, total_sq, count = ddp.all_reduce_sum(dist, local)
    mean = total / max(count, 1)
    var = (total_sq - count * mean * mean) / max(count - 1, 1)                    # unbiased, as masked_whiten
    for r in records:
        a = r[key][None]
        r[key] = dgpo.masked_whiten(a, torch.ones_like(a, dtype=torch.bool), torch.tensor(mean), torch.tensor(var))[0]


def explained_variance(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, dist: ddp.Dist) -> float:
    """1 − Var(R − V) / Var(R) over the masked tokens of every rank: 1 when the critic predicts every
    return, 0 when it does no better than the mean return, below 0 when it is worse. NaN when the returns
    are constant: their spread is below float32 rounding of their size (a step whose rollouts all got
    the same reward gives returns that differ only by the rounding of advantage + value, and dividing
    by that spread would report −10¹³)."""
    r, res = returns[mask].double(), (returns - values)[mask].double()           # (n,) each
    s = ddp.all_reduce_sum(dist, [r.sum().item(), (r * r).sum().item(), res.sum().item(), (res * res).sum().item(),
                                  float(r.numel())])
    count = max(s[4], 1.0)
    var_r = s[1] / count - (s[0] / count) ** 2
    var_res = s[3] / count - (s[2] / count) ** 2
    constant = var_r <= (1e-6 * max(1.0, abs(s[0] / count))) ** 2                # std below float32 rounding
    return float("nan") if constant else 1.0 - var_res / var_r


def split_groups(records: list[dict], parts: int) -> list[list[dict]]:
    """`parts` mini-batches of whole groups, strided: mini-batch k holds the groups whose position is
    k mod parts. Ranks hold contiguous equal blocks of groups, so with strides the global mini-batch
    k is the same set of groups whatever the number of ranks (N ranks = one process)."""
    order = list(dict.fromkeys(r["group"] for r in records))                    # first-seen order
    if len(order) % parts:
        raise ValueError(f"{len(order)} groups on this rank cannot form {parts} equal mini-batches")
    part_of = {g: k % parts for k, g in enumerate(order)}
    return [[r for r in records if part_of[r["group"]] == k] for k in range(parts)]


# -----------------------------------------------------------------------------
# Which groups carry a signal: the instruments, and DAPO's dynamic sampling


def local_outcomes(records: list[dict]) -> list[tuple[int, bool, bool]]:
    """(group id, mixed: its EM rewards are not all equal, any rollout wrong) of each group in records."""
    em = {}
    for r in records:
        em.setdefault(r["group"], []).append(r["em"])
    return [(g, max(v) != min(v), min(v) == 0) for g, v in em.items()]


def group_outcomes(records: list[dict], dist: ddp.Dist) -> list[tuple[int, bool, bool]]:
    """local_outcomes of every rank's groups, sorted by id: the same list on every rank (groups never
    span ranks)."""
    return sorted(ddp.all_gather_objects(dist, local_outcomes(records)))


def nonzero_advantages(records: list[dict], dist: ddp.Dist) -> float:
    """How many rollouts of the update (all ranks) have an advantage that is not 0 on some token."""
    def nonzero(r):
        if "token_advantage" in r:
            return bool((r["token_advantage"] != 0).any())
        return r["advantage"] != 0
    return ddp.all_reduce_sum(dist, [sum(nonzero(r) for r in records)])[0]


def informative_records(records: list[dict], outcomes: list[tuple[int, bool, bool]], cfg: RLConfig,
                        dist: ddp.Dist) -> tuple[list[dict], dict, dict]:
    """--drop-constant-groups, decided on the whole step and alike on every rank: the first
    cfg.prompts_per_step mixed groups in data order (group ids are data positions) carry the policy
    gradient (r["pg"] = True); every other rollout stays in the update only if the teacher term acts
    on it (--teacher-mode selective: the wrong ones, uniform: all), with advantage 0. A rollout that
    carries neither (every rollout of an all-right group under selective, every constant group
    without a teacher) is dropped. Returns the kept records (this rank's), {group: mini-batch} — the
    kept groups in data order, strided over cfg.mini_batches, the same on every rank whatever their
    number — and the counts for the metrics. `outcomes`: group_outcomes(records, dist)."""
    pg = [g for g, mixed, _ in outcomes if mixed][:cfg.prompts_per_step]
    pg_set = set(pg)
    teacher = cfg.teacher_mode != "none"

    def carries(group: int, any_wrong: bool) -> bool:
        return group in pg_set or (teacher and (cfg.teacher_mode == "uniform" or any_wrong))

    kept_groups = [g for g, _, any_wrong in outcomes if carries(g, any_wrong)]
    part_of = {g: k % cfg.mini_batches for k, g in enumerate(kept_groups)}
    kept = []
    for r in records:
        r["pg"] = r["group"] in pg_set
        if r["pg"] or (teacher and (cfg.teacher_mode == "uniform" or r["em"] == 0)):
            kept.append(r)
    counts = {"drawn_groups": len(outcomes), "pg_groups": len(pg),
              "kept_rollouts": ddp.all_reduce_sum(dist, [len(kept)])[0]}
    return kept, part_of, counts


def questions_drawn(step_rows: list[dict], prompts_per_step: int) -> int:
    """The pool questions a run drew, from its metrics rows of training steps: prompts_per_step a step,
    or what --drop-constant-groups' refills drew (its logged drawn_groups)."""
    return sum(row.get("drawn_groups", prompts_per_step) for row in step_rows)


def filler_record(record: dict) -> dict:
    """A copy of a record with no loss token: a micro-batch of it has loss and gradient exactly 0,
    for a rank that has fewer micro-batches than another (every rank runs the same number of
    forward/backward passes, so DDP's all-reduce meets on the same one)."""
    keep = ("input_ids", "prompt_length", "group")
    return {**{k: record[k] for k in keep}, "loss_mask": [0] * len(record["loss_mask"]), "advantage": 0.0,
            "em": 1.0, "pg": False}


# -----------------------------------------------------------------------------
# The update


def rl_normaliser(cfg: RLConfig, dist: ddp.Dist, records: list[dict]) -> float:
    """The denominator of every loss term, counted over ALL ranks and divided by the world size
    (DDP averages gradients): token count for token-mean, non-empty sequences for
    seq-mean-token-mean, sequences × max_new_tokens for token-sum-norm (a constant per step)."""
    if cfg.agg in ("token-mean", "micro-token-mean"):   # the latter's own is per micro-batch: micro_batch_settings
        return models.global_token_count(dist, records) / dist.world_size
    if cfg.agg == "seq-mean-token-mean":
        local = sum(1 for r in records if any(r["loss_mask"][1:]))
    else:
        local = len(records) * cfg.max_new_tokens
    return ddp.all_reduce_sum(dist, [local])[0] / dist.world_size


@dataclass
class Critic:
    """PPO's value model: `model` (the view the loss goes through, DDP-wrapped when distributed),
    its optimizer and learning-rate schedule."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def clock(dist: ddp.Dist) -> float:
    """Wall time for the step's time split, after the GPU's queued work (a no-op on CPU)."""
    if dist.device.type == "cuda":
        torch.cuda.synchronize(dist.device)
    return time.perf_counter()


def rl_update(model, teacher, optimizer, scheduler, records: list[dict], cfg: RLConfig, dist: ddp.Dist,
              vocab_size: int, counters: dict, critic: Critic | None = None) -> dict:
    """One RL step on this rank's records (whole groups, `group` ids set): rewards, advantages, then
    cfg.mini_batches optimizer steps of the actor (and of the critic, for PPO), each on an equal
    share of whole groups.

    GRPO advantages come from each rank's own groups (a group never spans ranks, so this is exact).
    With one mini-batch, π_old is π_θ at the moment of the update, so old_logp is log π_θ detached
    (ratio 1, nothing clipped); with several, log π_old is scored once before the first update and
    the later mini-batches are off-policy: that is where the ratio and its clipping act.
    With cfg.drop_constant_groups the update takes the records informative_records keeps; ranks may
    then hold unequal shares, and the ones with fewer micro-batches add empty ones (filler_record).

    Besides the losses, the row has the instruments: mixed_groups (the fraction of the step's groups
    whose EM rewards are not all equal), nonzero_adv (rollouts in the update with a non-zero
    advantage), for PPO explained_var, with cfg.term_grad_norms each term's gradient norm
    (term_grad_norms), and the time split score_s / update_s / critic_s (this rank's seconds).
    """
    t0 = clock(dist)
    outcomes = group_outcomes(records, dist)
    instruments = {"mixed_groups": sum(mixed for _, mixed, _ in outcomes) / max(len(outcomes), 1)}
    part_of, filler = None, None
    if cfg.drop_constant_groups:
        filler = filler_record(records[0])
        records, part_of, counts = informative_records(records, outcomes, cfg, dist)
        instruments.update(counts)
    penalty = cfg.teacher_as == "reward" and cfg.teacher_mode != "none"
    if cfg.mini_batches > 1 or penalty:
        for r, lp in zip(records, sampled_logprobs(model, records, cfg, vocab_size, dist)):
            r["old_logp"] = lp                                                    # (n_i,) at its loss positions
    teacher_logp = sampled_logprobs(teacher, records, cfg, vocab_size, dist) if penalty else None
    t_score = clock(dist)
    if cfg.algo == "grpo":
        grpo_advantages(cfg, records, teacher_logp)
    else:
        values = per_record(lambda batch: values_of(critic.model, batch), records, cfg.micro_batch_size, dist)
        instruments.update(ppo_advantages(cfg, records, teacher_logp, values, dist))
    instruments["nonzero_adv"] = nonzero_advantages(records, dist)
    # the surrogate averaged over the rollouts with a policy gradient only (the penalty form's
    # surrogate carries the teacher's share on every kept rollout, so it keeps the shared normaliser)
    pg_records = [r for r in records if r["pg"]] if cfg.drop_constant_groups and not penalty else None
    if part_of is None:
        parts = split_groups(records, cfg.mini_batches)
    else:
        parts = [[r for r in records if part_of[r["group"]] == k] for k in range(cfg.mini_batches)]
    t_advantages = clock(dist)
    steps = []
    for part in parts:
        pg_part = None if pg_records is None else [r for r in part if r["pg"]]
        steps.append(minibatch_update(model, teacher, optimizer, scheduler, part, cfg, dist, vocab_size, counters,
                                      critic, filler, pg_part))
    out = {k: sum(s[k] for s in steps) / len(steps) if k not in ("loss_tokens", "critic_s", "grad_norms_s")
           else sum(s[k] for s in steps) for k in steps[0]}
    if penalty:                 # the KL the penalty charged: k1 over the penalised rollouts' tokens
        k1 = [r["old_logp"] - lt for r, lt in zip(records, teacher_logp)
              if cfg.teacher_mode == "uniform" or r["em"] == 0]                    # (n_i,) each
        total, count = ddp.all_reduce_sum(dist, [sum(d.sum().item() for d in k1), sum(len(d) for d in k1)])
        out["teacher_kl"] = total / max(count, 1)
    # the time split: scoring π_old and the teacher; the critic (its values, losses and steps); the
    # per-term gradient norms; the rest of the update (advantages, the actor's passes and steps)
    elapsed = clock(dist) - t_advantages
    critic_s, grad_norms_s = out.pop("critic_s"), out.pop("grad_norms_s", 0.0)
    times = {"score_s": t_score - t0, "update_s": elapsed - critic_s - grad_norms_s}
    if critic is None:
        times["update_s"] += t_advantages - t_score
    else:
        times["critic_s"] = critic_s + t_advantages - t_score
    if cfg.term_grad_norms:
        times["grad_norms_s"] = grad_norms_s
    return {**out, **instruments, **times}


def policy_inputs(model, teacher, chunk: list[dict], batch, cfg: RLConfig, dist: ddp.Dist, vocab_size: int) -> dict:
    """The tensors dgpo.dgpo_loss / dgpo_terms take for one micro-batch: the student's tempered logits
    and log-probs (with their graph), π_old's log-probs, the teacher's logits (exact KL) or log-probs
    (sampled KL) without a graph, the advantages ((B,) or per token (B, L)) and EM (B,)."""
    use_teacher = cfg.teacher_as == "loss" and cfg.teacher_mode != "none"
    adv = torch.tensor([r["advantage"] for r in chunk], device=dist.device)      # (B,)
    if "token_advantage" in chunk[0]:                                             # per token: (B, L)
        adv = models.padded([r["token_advantage"] for r in chunk], batch.targets.shape, dist.device)
    em = torch.tensor([r["em"] for r in chunk], device=dist.device)              # (B,)
    logits = rl_logits(model, batch, vocab_size, cfg.temperature)                 # (B, L, V)
    logp = dgpo.token_logprobs(logits, batch.targets)                             # (B, L)
    old_logp = logp.detach()                                                      # (B, L)
    if "old_logp" in chunk[0]:
        old_logp = models.padded([r["old_logp"] for r in chunk], logp.shape, dist.device)
    teacher_logits = teacher_logp = None
    if use_teacher:
        with torch.no_grad():
            teacher_logits = rl_logits(teacher, batch, vocab_size, cfg.temperature)   # (B, L, V)
        if cfg.kl != "full":
            teacher_logp = dgpo.token_logprobs(teacher_logits, batch.targets)     # (B, L)
            teacher_logits = None
    return dict(logp=logp, old_logp=old_logp, advantages=adv, em=em, mask=batch.mask, student_logits=logits,
                teacher_logits=teacher_logits, teacher_logp=teacher_logp)


def loss_settings(cfg: RLConfig, normaliser: float, pg_normaliser: float | None, vocab_size: int) -> dict:
    """dgpo.dgpo_loss's settings from the config: the teacher term only in the KL-as-loss form."""
    use_teacher = cfg.teacher_as == "loss" and cfg.teacher_mode != "none"
    return dict(beta=cfg.beta, teacher=cfg.teacher_mode if use_teacher else "none", kl=cfg.kl,
                clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.agg, normaliser=normaliser,
                vocab_size=vocab_size, entropy_coef=cfg.entropy_coef, pg_normaliser=pg_normaliser)


def micro_batch_settings(settings: dict, cfg: RLConfig, chunk: list[dict], n_chunks: int) -> dict:
    """The loss settings of one micro-batch of a rank's n_chunks: with --agg micro-token-mean, Search-R1's
    veRL, its own loss tokens × n_chunks is every term's normaliser (dgpo.aggregate); else `settings`."""
    if cfg.agg != "micro-token-mean":
        return settings
    own = models.loss_token_count(chunk) * n_chunks
    pg = None if settings["pg_normaliser"] is None else \
        models.loss_token_count([r for r in chunk if r.get("pg", True)]) * n_chunks   # --drop-constant-groups
    return {**settings, "normaliser": own, "pg_normaliser": pg}


def minibatch_update(model, teacher, optimizer, scheduler, records: list[dict], cfg: RLConfig, dist: ddp.Dist,
                     vocab_size: int, counters: dict, critic: Critic | None = None, filler: dict | None = None,
                     pg_records: list[dict] | None = None) -> dict:
    """One optimizer step of dgpo_loss over records with their advantages set (and, for PPO, one of
    the critic's clipped value loss on the same tokens). Every micro-batch's loss is divided by the
    global normaliser, so summing over micro-batches and averaging over ranks (DDP) gives exactly
    the loss of the whole global mini-batch. `filler` (--drop-constant-groups, where ranks hold
    unequal shares): every rank runs as many micro-batches as the rank with the most, the missing
    ones made of the filler (loss 0). `pg_records`: the records whose tokens the surrogate is averaged
    over (dgpo_loss's pg_normaliser), when not all."""
    normaliser = rl_normaliser(cfg, dist, records)
    pg_normaliser = None if pg_records is None else rl_normaliser(cfg, dist, pg_records)
    use_teacher = cfg.teacher_as == "loss" and cfg.teacher_mode != "none"
    settings = loss_settings(cfg, normaliser, pg_normaliser, vocab_size)
    sums: dict[str, float] = {}
    finite = critic_finite = True
    chunks = models.micro_batches(records, cfg.micro_batch_size)
    if filler is not None:
        most = max(ddp.all_gather_objects(dist, [len(chunks)]))
        chunks += [[filler]] * (most - len(chunks))
    extra = {"critic_s": 0.0}                 # seconds, and with cfg.term_grad_norms each term's norm
    if cfg.term_grad_norms:
        t = clock(dist)
        extra.update(term_grad_norms(model, teacher, chunks, cfg, dist, vocab_size, settings))
        extra["grad_norms_s"] = clock(dist) - t
    for i, chunk in enumerate(chunks):
        batch = models.make_batch(chunk, dist.device)
        last = i == len(chunks) - 1
        with ddp.ddp_sync(model, last), ddp.autocast(dist):
            own = micro_batch_settings(settings, cfg, chunk, len(chunks))
            loss, m = dgpo.dgpo_loss(**policy_inputs(model, teacher, chunk, batch, cfg, dist, vocab_size), **own)
            loss.backward()                   # even if not finite: every rank keeps in step with DDP
        finite &= math.isfinite(m["loss"])
        if critic is not None:
            t = clock(dist)
            with ddp.ddp_sync(critic.model, last), ddp.autocast(dist):
                values = values_of(critic.model, batch)                           # (B, L)
                vloss, vm = dgpo.value_loss(
                    values, models.padded([r["old_values"] for r in chunk], values.shape, dist.device),
                    models.padded([r["returns"] for r in chunk], values.shape, dist.device), batch.mask,
                    clip=cfg.value_clip, agg=cfg.agg, normaliser=own["normaliser"])
                vloss.backward()
            critic_finite &= math.isfinite(vm["vf_loss"])
            for key in ("vf_clip_frac", "value_mean"):
                sums[key] = sums.get(key, 0.0) + vm[key] * vm["n_tokens"]
            sums["vf_loss"] = sums.get("vf_loss", 0.0) + vm["vf_loss"]
            extra["critic_s"] += clock(dist) - t
        n, nt = m["n_tokens"], m.get("n_teacher_tokens", 0)
        for key, weight in (("clip_frac", n), ("entropy", n), ("approx_kl", n), ("teacher_kl", nt)):
            if key in m:
                sums[key] = sums.get(key, 0.0) + m[key] * weight
        sums["n_tokens"] = sums.get("n_tokens", 0.0) + n
        sums["n_teacher_tokens"] = sums.get("n_teacher_tokens", 0.0) + nt
        sums["loss"] = sums.get("loss", 0.0) + m["loss"]
    grad_norm = loop.optimizer_step(model, optimizer, scheduler, cfg.grad_clip, counters, dist, finite)
    out = {}
    if critic is not None:
        t = clock(dist)
        out["critic_grad_norm"] = loop.optimizer_step(critic.model, critic.optimizer, critic.scheduler, cfg.grad_clip,
                                                      counters.setdefault("critic", {}), dist, critic_finite)
        extra["critic_s"] += clock(dist) - t
    keys = ["clip_frac", "entropy", "approx_kl", "teacher_kl", "n_tokens", "n_teacher_tokens", "loss",
            "vf_loss", "vf_clip_frac", "value_mean"]
    totals = dict(zip(keys, ddp.all_reduce_sum(dist, [sums.get(k, 0.0) for k in keys])))
    n, nt = max(totals["n_tokens"], 1), max(totals["n_teacher_tokens"], 1)
    out.update({"loss": totals["loss"] / dist.world_size, "clip_frac": totals["clip_frac"] / n,
                "entropy": totals["entropy"] / n, "approx_kl": totals["approx_kl"] / n,
                "teacher_kl": totals["teacher_kl"] / nt if use_teacher else 0.0,
                "loss_tokens": totals["n_tokens"], "grad_norm": grad_norm, **extra})
    if critic is not None:
        out.update({"vf_loss": totals["vf_loss"] / dist.world_size, "vf_clip_frac": totals["vf_clip_frac"] / n,
                    "value_mean": totals["value_mean"] / n})
    return out


TERMS = ("surrogate", "teacher", "entropy")


def term_grad_norms(model, teacher, chunks: list[list[dict]], cfg: RLConfig, dist: ddp.Dist, vocab_size: int,
                    settings: dict) -> dict:
    """grad_norm_<term>: the norm of the gradient of each loss term on its own over this mini-batch
    (all ranks: the gradient DDP would average), at the weights the update starts from, before
    clipping — comparable with grad_norm, the norm of their sum. Terms: surrogate (the clipped
    policy-gradient term of the EM reward), teacher (β·KL as a loss; with --teacher-as reward the
    penalty's share: ∇L_clip(A) − ∇L_clip(A without the penalty), since the penalty lives inside the
    advantages A), entropy (−c_H·H). A term that is not in the loss is 0. The gradients are taken
    with torch.autograd.grad on the model without DDP (one forward per micro-batch, one backward
    per term, the sum over ranks by all-reduce), so the update itself is unchanged. Cost, measured
    (docs/usage.md, "GRPO or PPO"): 1.44× the update's own time with two terms on the demo student, 1.74×
    with three; memory: one gradient-sized buffer per term."""
    view = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    params = [p for p in view.parameters() if p.requires_grad]
    sums = {name: [torch.zeros_like(p) for p in params] for name in TERMS}
    penalty = cfg.teacher_as == "reward" and cfg.teacher_mode != "none"
    for chunk in chunks:
        batch = models.make_batch(chunk, dist.device)
        own = micro_batch_settings(settings, cfg, chunk, len(chunks))
        with ddp.autocast(dist):
            inputs = policy_inputs(view, teacher, chunk, batch, cfg, dist, vocab_size)
            terms, _ = dgpo.dgpo_terms(**inputs, **own)
            if penalty and any("token_advantage" in r for r in chunk):
                without = [r.get("advantage_without_penalty", r["advantage"]) for r in chunk]
                base = (torch.tensor(without, device=dist.device) if not torch.is_tensor(without[0])
                        else models.padded(without, batch.targets.shape, dist.device))            # (B,) or (B, L)
                surrogate, _ = dgpo.policy_loss(inputs["logp"], inputs["old_logp"], base, batch.mask, cfg.clip_low,
                                                cfg.clip_high, cfg.agg, own["normaliser"])
                terms["teacher"] = terms["surrogate"] - surrogate
                terms["surrogate"] = surrogate
        names = [name for name, term in terms.items() if term.requires_grad]
        for name in names:                    # the graph is kept until the last term's backward
            grads = torch.autograd.grad(terms[name], params, retain_graph=name != names[-1], allow_unused=True)
            for total, g in zip(sums[name], grads):
                if g is not None:
                    total.add_(g)
    out = {}
    for name in TERMS:
        if dist.enabled:
            for total in sums[name]:
                torch_dist.all_reduce(total)
                total.div_(dist.world_size)
        out[f"grad_norm_{name}"] = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in sums[name]])).item() if params else 0.0
    return out


# -----------------------------------------------------------------------------
# The stage


@torch.no_grad()
def validation_em(model, tokenizer, questions: list[dict], retriever, rcfg: rollout.RolloutConfig, batch_size: int,
                  dist: ddp.Dist) -> float:
    """Greedy EM on held-out questions, each rank its shard, summed over ranks."""
    shard = questions[dist.rank::dist.world_size]
    records = arc_eval.generate_records(model, tokenizer, shard, retriever, rcfg, dist, batch_size)
    correct, total = ddp.all_reduce_sum(dist, [sum(r["em"] for r in records), len(records)])
    return correct / max(total, 1)


PROBE_SEED = 1 << 40      # the probe's sampling seed (+ rank): apart from every training generator (seed·1000 + rank)


@torch.no_grad()
def probe_reward(model, tokenizer, questions: list[dict], retriever, rcfg: rollout.RolloutConfig, samples: int,
                 batch_size: int, dist: ddp.Dist) -> tuple[float, float]:
    """The learning probe: EM of `samples` rollouts of each question, sampled at the rollout
    temperature with a generator seeded the same way at every call — whatever the run's --seed — so
    two checkpoints, of one run or of two runs, are compared on the same random draws (paired; the
    same on the same number of ranks). Returns (mean over questions of each question's mean EM, its
    standard error over questions: the samples of one question are not independent draws of the
    reward). Each rank its shard of the questions, reduced over ranks. The training generators and
    the global RNG are not touched, so a run with the probe trains exactly as one without."""
    shard = questions[dist.rank::dist.world_size]
    expanded = [q for q in shard for _ in range(samples)]
    generator = torch.Generator(device=dist.device).manual_seed(PROBE_SEED + dist.rank)
    records = arc_eval.generate_records(model, tokenizer, expanded, retriever, rcfg, dist, batch_size, generator)
    per_question = [sum(r["em"] for r in records[i:i + samples]) / samples for i in range(0, len(records), samples)]
    total, total_sq, n = ddp.all_reduce_sum(dist, [sum(per_question), sum(p * p for p in per_question),
                                                   len(per_question)])
    mean = total / max(n, 1)
    var = (total_sq - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(max(var, 0.0) / max(n, 1))


def draw_rollouts(model, tokenizer, questions: list[dict], retriever, rcfg: rollout.RolloutConfig, cfg: RLConfig,
                  dist: ddp.Dist, generator, cursor: int) -> tuple[list[dict], int, int]:
    """The step's rollouts: the next prompts_per_step questions of the data order from `cursor` (each
    rank its contiguous share), G rollouts each; with cfg.drop_constant_groups, further rounds of
    prompts_per_step questions until the step holds prompts_per_step mixed groups or cfg.max_draws
    rounds were drawn (the count is all-reduced, so every rank draws alike). The group id is the
    question's position in the data stream: unique per prompt instance (never a per-dataset index,
    docs/method.md §8) and the same whatever the number of ranks. Returns (this rank's records,
    rounds drawn, the new cursor)."""
    per_rank = cfg.prompts_per_step // dist.world_size
    records, draws, mixed = [], 0, 0
    while True:
        idx = loop.data_window(cfg.seed, len(questions), cursor, cfg.prompts_per_step)
        mine = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        expanded = [{**questions[idx[j]], "group": cursor + j} for j in mine for _ in range(cfg.group_size)]
        drawn = arc_eval.generate_records(model, tokenizer, expanded, retriever, rcfg, dist, cfg.rollout_batch_size,
                                          generator)
        for r, q in zip(drawn, expanded):
            r["group"] = q["group"]
        records += drawn
        cursor, draws = cursor + cfg.prompts_per_step, draws + 1
        if not cfg.drop_constant_groups:
            return records, draws, cursor
        mixed += ddp.all_reduce_sum(dist, [sum(m for _, m, _ in local_outcomes(drawn))])[0]
        if mixed >= cfg.prompts_per_step or draws >= cfg.max_draws:
            return records, draws, cursor


CRITIC_DIR = "critic"     # inside a PPO checkpoint: an ordinary HF directory (a one-label token classifier)


def load_critic(path: str, dist: ddp.Dist, grad_checkpointing: bool, arg: str, fresh: bool):
    """PPO's critic: an ordinary HF token-classification model with one label (no dropout before the
    head), fp32. fresh=True: the student's weights under a new value head, initialised to zero, so
    every rank and every run starts from the same critic, V = 0 (GAE then begins as the plain
    return-to-go); fresh=False: a critic saved by an earlier PPO run."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging
    config = models.pretrained(AutoConfig, path, arg, num_labels=1)
    config.classifier_dropout = 0.0            # the head sees exactly the hidden states the policy sees
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()              # "newly initialized: score.weight" is expected, not a fault
    try:
        critic = models.pretrained(AutoModelForTokenClassification, path, arg, config=config,
                                   dtype=torch.float32).to(dist.device)
    finally:
        logging.set_verbosity(verbosity)
    if fresh:
        with torch.no_grad():
            for p in critic.score.parameters():
                p.zero_()
    critic.train()          # from_pretrained returns eval mode, where gradient checkpointing does nothing
    if grad_checkpointing:
        models.enable_checkpointing(critic)
    return critic


def train_rl(student_dir: str, teacher_dir: str | None, questions: list[dict], retriever, cfg: RLConfig,
             dist: ddp.Dist, run: loop.Run, validation: list[dict] | None = None,
             grad_checkpointing: bool = False) -> dict:
    """RL from `student_dir` (or from run.resume); saves to run.out_dir (and run.out_dir/best, by
    validation EM, the start model included, when cfg.eval_every). run.stop_after ends this run after
    that many steps with a resumable checkpoint (the schedule still spans cfg.steps); the rest of `run`,
    and SIGINT / SIGTERM, as in sft.train_supervised. `retriever` may be a function of no argument that
    builds it: it is called after every cheaper check (settings, --out, models, prompts, the resumed
    state), since building a BM25 index of a large corpus takes minutes."""
    check_rl_config(cfg, dist)
    if cfg.eval_every and not validation:
        raise ValueError("--eval-every needs validation questions (--val FILE)")
    if teacher_dir is None and cfg.teacher_mode != "none":
        raise ValueError(f"teacher_mode={cfg.teacher_mode!r} needs --teacher (or use --teacher-mode none)")
    # before the weights, the critic or the state are read; resumed, the weights come from the checkpoint
    loop.check_run(run, {"--student": None if run.resume else student_dir, "--teacher": teacher_dir}, dist)
    arg = "--resume" if run.resume else "--student"
    tokenizer = models.load_tokenizer(run.resume or student_dir, arg)
    teacher = None
    if cfg.teacher_mode != "none":
        models.check_same_tokenizer(tokenizer, models.load_tokenizer(teacher_dir, "--teacher"), student_dir,
                                    teacher_dir)
    model = models.load_model(run.resume or student_dir, dist, trainable=True, grad_checkpointing=grad_checkpointing,
                              arg=arg)
    budget = rollout.length_budget(cfg.max_total_tokens, model)
    rollout.check_prompts(tokenizer, questions, budget, "training question", cfg.prompt_from)
    rollout.check_prompts(tokenizer, validation or [], budget, "validation question", cfg.prompt_from)
    if cfg.teacher_mode != "none":
        teacher = models.load_model(teacher_dir, dist, trainable=False, arg="--teacher")
    vocab_size = models.vocab_size_of(tokenizer, model, *([teacher] if teacher is not None else []))
    ddp_model = models.wrap(model, dist)
    teacher = models.HeadAtPositions(teacher).check() if teacher is not None else None
    updates = cfg.steps * cfg.mini_batches                      # optimizer steps in the whole run
    optimizer, scheduler = loop.make_optimizer(model, cfg.lr, cfg.weight_decay, updates,
                                               int(cfg.warmup_ratio * updates), min_lr_ratio=None)
    critic, critic_hf = None, None
    if cfg.algo == "ppo":
        critic_path = os.path.join(run.resume, CRITIC_DIR) if run.resume else student_dir
        if run.resume and not os.path.isdir(critic_path):
            raise FileNotFoundError(f"--resume {run.resume}: no {CRITIC_DIR}/ in it, so it is not a PPO checkpoint")
        critic_hf = load_critic(critic_path, dist, grad_checkpointing, arg, fresh=not run.resume)
        critic = Critic(models.wrap(critic_hf, dist),
                        *loop.make_optimizer(critic_hf, cfg.critic_lr, cfg.weight_decay, updates,
                                             int(cfg.critic_warmup_ratio * updates), None))
    generator = torch.Generator(device=dist.device).manual_seed(cfg.seed * 1000 + dist.rank)
    state = loop.resumed_state(run, "rl", cfg, dist)
    if not hasattr(retriever, "search"):       # built last: every check above is cheaper
        retriever = retriever()
    stage = loop.open_stage("rl", cfg, run, state, optimizer, scheduler, dist)
    best = {"em": -1.0, "step": 0}
    if state is not None:
        if critic is not None:
            loop.restore_optimizer(critic.optimizer, critic.scheduler, state["critic_optimizer"],
                                   state["critic_scheduler"], cfg.critic_lr, "critic_lr" in state["changed"])
        generator.set_state(state["generators"][dist.rank])
        best = state["best"]
    # the data position: every step reads the next prompts_per_step questions of the data order, or
    # several such rounds with --drop-constant-groups, so it is saved (older states: step × prompts)
    cursor = state.get("cursor", stage.start_step * cfg.prompts_per_step) if state is not None else 0
    rcfg = rollout_config(cfg, max_total_tokens=budget)

    def save(step: int, path: str | None = None) -> None:
        """A resumable checkpoint in run.out_dir; with `path` (best/), the actor alone, for evaluation."""
        generators = ddp.all_gather_objects(dist, [generator.get_state()])
        state = {**stage.trainer_state(step, optimizer, scheduler), "best": best, "generators": generators,
                 "cursor": cursor}
        extra = {}
        if critic is not None and path is None:
            state.update(critic_optimizer=critic.optimizer.state_dict(), critic_scheduler=critic.scheduler.state_dict())
            extra[CRITIC_DIR] = critic_hf
        checkpoint.save_checkpoint(path or run.out_dir, models.hf_model(ddp_model), tokenizer, dist, state,
                                   carry=None if path is None else (), extra=extra, save_dtype=run.save_dtype,
                                   info={**(run.info or {}), "best": best})

    # RL-pool questions evaluated greedily beside validation (cfg.pool_eval_limit): the first of the data
    # order, which RL trains on in its first steps, so pool_em − val_em shows what it memorised
    pool = [questions[i]
            for i in loop.data_window(cfg.seed, len(questions), 0, min(cfg.pool_eval_limit, len(questions)))]

    # a seeded sample stratified by data_source: a file sorted by source is not cut to its first source
    val = data.sample_questions(validation, cfg.eval_limit) if (validation and cfg.eval_limit) else validation

    def validate(step: int, row: dict) -> None:
        """Greedy validation EM into `row` (and pool_em, probe_reward, probe_reward_se when asked for);
        a new best by validation EM (the start model included) is saved to best/."""
        nonlocal best
        t = time.time()
        was_training = model.training
        model.eval()
        greedy = dataclasses.replace(rcfg, greedy=True)
        row["val_em"] = validation_em(model, tokenizer, val, retriever, greedy, cfg.rollout_batch_size, dist)
        if pool:
            row["pool_em"] = validation_em(model, tokenizer, pool, retriever, greedy, cfg.rollout_batch_size, dist)
        if cfg.probe_samples:
            row["probe_reward"], row["probe_reward_se"] = probe_reward(
                model, tokenizer, val, retriever, rcfg, cfg.probe_samples, cfg.rollout_batch_size, dist)
        model.train(was_training)
        row["eval_s"] = time.time() - t
        if row["val_em"] > best["em"]:
            best = {"em": row["val_em"], "step": step}
            save(step, os.path.join(run.out_dir, "best"))

    if validation and cfg.eval_every and stage.start_step == 0:   # step 0: the start model competes for best/
        row = {"step": 0}
        validate(0, row)
        stage.log(row)

    with stage as steps:
        for step in steps:
            t0 = time.time()
            model.eval()
            records, draws, cursor = draw_rollouts(ddp_model, tokenizer, questions, retriever, rcfg, cfg, dist,
                                                   generator, cursor)
            t_rollout = time.time() - t0
            model.train()
            row = rl_update(ddp_model, teacher, optimizer, scheduler, records, cfg, dist, vocab_size, stage.counters,
                            critic)
            # every rollout drawn; one --drop-constant-groups left out has no penalty: its reward is its EM
            sums = ddp.all_reduce_sum(dist, [len(records), sum(r.get("reward", r["em"]) for r in records),
                                             sum(r["em"] for r in records), sum(r["num_searches"] for r in records),
                                             sum(len(r["input_ids"]) - r["prompt_length"] for r in records),
                                             sum(sum(r["loss_mask"]) for r in records),
                                             sum(r["truncated"] for r in records)])
            n, elapsed = sums[0], time.time() - t0
            row = {"step": step + 1, "reward": sums[1] / n, "em": sums[2] / n, "wrong_frac": 1 - sums[2] / n,
                   "searches": sums[3] / n, "response_len": sums[4] / n, "truncated_frac": sums[6] / n, **row,
                   **({"draws": draws} if cfg.drop_constant_groups else {}),
                   "sampled_tokens_per_s": sums[5] / t_rollout, "rollout_s": t_rollout, "step_s": elapsed,
                   "lr": scheduler.get_last_lr()[0], "skipped_steps": stage.counters.get("skipped_steps", 0),
                   "zero_grad_steps": stage.counters.get("zero_grad_steps", 0)}
            if validation and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                validate(step + 1, row)
            stage.after_step(step, row, save, em=f"{row['em']:.3f}", kl=f"{row['teacher_kl']:.3f}",
                           **({"val": f"{row['val_em']:.3f}"} if "val_em" in row else {}))
    stage.finish(save)
    validated = {"best_val_em": best["em"], "best_step": best["step"]} if best["em"] >= 0 else {}
    return {**validated, **stage.counters}
