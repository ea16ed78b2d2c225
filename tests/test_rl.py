"""rl.py: the instruments of an RL step (mixed groups, non-zero advantages, each loss term's gradient
norm, PPO's explained variance, the time split), the learning probe and the RL-pool EM at every
evaluation, and --drop-constant-groups (DAPO's dynamic sampling: which rollouts it keeps, how it
refills the step, and that the data position it saves makes a resume exact). The DDP checks of the
same are in test_train.py (test_ddp_two_ranks_make_the_same_update_as_one_process)."""
import dataclasses
import json
import math
import os

import pytest
import torch

import arc_eval
import cli
import data
import ddp
import loop
import models
import rl
import train
from rollout import RolloutConfig

# 8 groups of G = 2 with hand-set EM: groups 100, 103, 105 mixed; 101, 104, 106 all wrong; 102, 107 all right
EM_PATTERN = [1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1]


@pytest.fixture(scope="module")
def rollouts(world, tokenizer, retriever, model_dirs):
    """16 sampled rollouts of the tiny student, 8 groups of 2, with EM_PATTERN."""
    model = models.load_model(model_dirs["student"], ddp.Dist(), trainable=False)
    expanded = [q for q in world.train[:8] for _ in range(2)]
    records = arc_eval.generate_records(model, tokenizer, expanded, retriever,
                                     RolloutConfig(max_turns=1, max_new_tokens=12, seed=0), ddp.Dist(), 16)
    for i, r in enumerate(records):
        r["group"], r["em"] = 100 + i // 2, float(EM_PATTERN[i])
    return records


def _copies(records, **changes):
    return [{**r, **changes} for r in records]


def _update(model_dirs, tokenizer, records, **settings):
    """One rl_update from the student's initial weights: (metrics row, weights after)."""
    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=True)
    teacher = models.load_model(model_dirs["teacher"], dist, trainable=False)
    cfg = rl.RLConfig(**{"micro_batch_size": 5, "beta": 0.5, "warmup_ratio": 0.0, **settings})
    optimizer, scheduler = loop.make_optimizer(model, 1e-2, 0.0, 10, 0, None)
    view = models.wrap(model, dist)
    row = rl.rl_update(view, models.HeadAtPositions(teacher), optimizer, scheduler, _copies(records), cfg, dist,
                       len(tokenizer), {})
    return row, {k: v.clone() for k, v in model.state_dict().items()}


def _rl_config(**kw):
    base = dict(steps=4, prompts_per_step=2, group_size=2, micro_batch_size=4, rollout_batch_size=8,
                lr=1e-2, warmup_ratio=0.5, beta=0.5, temperature=1.0, max_turns=1, max_new_tokens=6, seed=3)
    return rl.RLConfig(**{**base, **kw})


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _weights(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# -----------------------------------------------------------------------------
# The step's instruments


def test_mixed_groups_and_nonzero_advantages_count_the_groups_with_a_signal(model_dirs, tokenizer, rollouts):
    row, _ = _update(model_dirs, tokenizer, rollouts, teacher_mode="none")
    assert row["mixed_groups"] == 3 / 8                  # groups 100, 103 and 105
    assert row["nonzero_adv"] == 6                       # their 6 rollouts; constant groups have advantage 0
    assert all(row[k] >= 0 for k in ("score_s", "update_s")) and "critic_s" not in row
    assert "grad_norm_surrogate" not in row              # per-term norms only when asked for
    penalty, _ = _update(model_dirs, tokenizer, rollouts, teacher_as="reward")
    assert penalty["nonzero_adv"] == 6 + 6               # the penalty gives each wrong rollout a token advantage


def test_term_grad_norms_are_each_terms_own_gradient_and_leave_the_update_unchanged(model_dirs, tokenizer,
                                                                                   rollouts):
    # the instrument changes nothing: the same weights after the step with it as without it
    plain, weights = _update(model_dirs, tokenizer, rollouts, entropy_coef=0.01)
    measured, weights_measured = _update(model_dirs, tokenizer, rollouts, entropy_coef=0.01, term_grad_norms=True)
    assert all(torch.equal(weights[k], weights_measured[k]) for k in weights)
    assert measured["grad_norm"] == plain["grad_norm"] and measured["grad_norms_s"] > 0
    norms = [measured[f"grad_norm_{k}"] for k in ("surrogate", "teacher", "entropy")]
    assert all(n > 0 for n in norms) and measured["grad_norm"] <= sum(norms) * (1 + 1e-6)   # triangle inequality
    # one term alone: its norm is the step's gradient norm, and the absent terms are exactly 0
    alone, _ = _update(model_dirs, tokenizer, rollouts, teacher_mode="none", term_grad_norms=True)
    assert alone["grad_norm_surrogate"] == pytest.approx(alone["grad_norm"], rel=1e-5)
    assert alone["grad_norm_teacher"] == 0.0 and alone["grad_norm_entropy"] == 0.0
    constant = _copies(rollouts, em=0.0)                 # every group all wrong: no policy gradient at all
    teacher_only, _ = _update(model_dirs, tokenizer, constant, term_grad_norms=True)
    assert teacher_only["grad_norm_surrogate"] == 0.0
    assert teacher_only["grad_norm_teacher"] == pytest.approx(teacher_only["grad_norm"], rel=1e-5)
    entropy_only, _ = _update(model_dirs, tokenizer, constant, teacher_mode="none", entropy_coef=0.1,
                              term_grad_norms=True)
    assert entropy_only["grad_norm_surrogate"] == 0.0 and entropy_only["grad_norm_teacher"] == 0.0
    assert entropy_only["grad_norm_entropy"] == pytest.approx(entropy_only["grad_norm"], rel=1e-5)


def test_the_penalty_forms_teacher_norm_is_the_penaltys_share_of_the_surrogate(model_dirs, tokenizer, rollouts):
    """--teacher-as reward: the penalty lives inside the advantages, so its share is ∇L_clip(A) −
    ∇L_clip(A without the penalty); in all-wrong groups the EM advantage is 0 and it is everything."""
    constant = _copies(rollouts, em=0.0)
    row, _ = _update(model_dirs, tokenizer, constant, teacher_as="reward", term_grad_norms=True)
    assert row["grad_norm_surrogate"] == 0.0
    assert row["grad_norm_teacher"] == pytest.approx(row["grad_norm"], rel=1e-5)
    beta_zero, _ = _update(model_dirs, tokenizer, rollouts, teacher_as="reward", beta=0.0, term_grad_norms=True)
    assert beta_zero["grad_norm_teacher"] == 0.0
    assert beta_zero["grad_norm_surrogate"] == pytest.approx(beta_zero["grad_norm"], rel=1e-5)


def test_explained_variance_by_hand():
    dist = ddp.Dist()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    returns = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])        # the masked-out 99 must not count
    assert rl.explained_variance(returns, returns.clone(), mask, dist) == pytest.approx(1.0)
    assert rl.explained_variance(returns, torch.full_like(returns, 3.0), mask, dist) == pytest.approx(0.0)
    values = torch.tensor([[2.0, 2.0, 0.0], [3.0, 4.0, 4.0]])          # residuals 1 0 · 0 0 −1 ... by hand:
    res = torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0])
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = 1 - res.var(unbiased=False) / r.var(unbiased=False)
    assert rl.explained_variance(returns, values, mask, dist) == pytest.approx(expected.item())
    assert math.isnan(rl.explained_variance(torch.ones(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool),
                                            dist))


def test_a_ppo_step_logs_the_critics_instruments_and_time(model_dirs, tokenizer, rollouts):
    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=True)
    teacher = models.load_model(model_dirs["teacher"], dist, trainable=False)
    critic_hf = rl.load_critic(model_dirs["student"], dist, False, "--student", fresh=True)
    critic_opt = torch.optim.AdamW(critic_hf.parameters(), lr=1e-3)
    critic = rl.Critic(models.wrap(critic_hf, dist), critic_opt, torch.optim.lr_scheduler.LambdaLR(critic_opt, lambda s: 1))
    optimizer, scheduler = loop.make_optimizer(model, 1e-3, 0.0, 10, 0, None)
    cfg = rl.RLConfig(algo="ppo", teacher_as="reward", beta=0.5, micro_batch_size=8, term_grad_norms=True)
    row = rl.rl_update(models.wrap(model, dist), teacher, optimizer, scheduler, _copies(rollouts), cfg, dist,
                       len(tokenizer), {}, critic)
    # a fresh critic predicts V = 0 everywhere: it explains none of the returns' variance
    assert row["explained_var"] == pytest.approx(0.0, abs=1e-6)
    assert row["value_mean"] == 0.0 and row["vf_loss"] > 0
    assert row["critic_s"] > 0 and row["update_s"] > 0 and row["score_s"] > 0
    assert row["grad_norm_teacher"] > 0 and row["grad_norm_surrogate"] > 0


# -----------------------------------------------------------------------------
# Evaluations: the learning probe and the RL pool's own EM


def test_the_probe_draws_the_same_samples_at_every_call_and_its_error_is_over_questions(monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, questions, retriever, rcfg, dist, batch_size, generator=None):
        calls.append((len(questions), generator.initial_seed(), rcfg.greedy, rcfg.temperature))
        # question q gets EM 1 on its first q mod 3 of 3 samples: per-question means 0, 1/3, 2/3, 0, 1/3
        return [{"em": float(i % 3 < (i // 3) % 3)} for i in range(len(questions))]

    monkeypatch.setattr(arc_eval, "generate_records", fake_generate)
    questions = [{"id": str(i)} for i in range(5)]
    rcfg = RolloutConfig(temperature=0.7)
    first = rl.probe_reward(None, None, questions, None, rcfg, 3, 64, ddp.Dist())
    second = rl.probe_reward(None, None, questions, None, rcfg, 3, 64, ddp.Dist())
    means = torch.tensor([0.0, 1 / 3, 2 / 3, 0.0, 1 / 3], dtype=torch.float64)
    assert first == pytest.approx((means.mean().item(), (means.std() / math.sqrt(5)).item()))
    assert first == second and calls[0] == calls[1] == (15, rl.PROBE_SEED, False, 0.7)


def test_evaluations_log_the_probe_and_the_pool_em_without_changing_training(world, retriever, model_dirs, tmp_path,
                                                                           tokenizer):
    questions, validation = world.train[:6], world.validation[:3]
    on, off, other_seed = (str(tmp_path / n) for n in ("on", "off", "seed"))
    measure = dict(eval_every=2, probe_samples=2, pool_eval_limit=4)
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, _rl_config(**measure),
                ddp.Dist(), on, validation=validation)
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, _rl_config(eval_every=2),
                ddp.Dist(), off, validation=validation)
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, _rl_config(seed=4, **measure),
                ddp.Dist(), other_seed, validation=validation)
    a, b = _weights(on), _weights(off)
    assert all(torch.equal(a[k], b[k]) for k in a), "the probe and the pool EM must not change what is trained"
    rows = [r for r in _rows(on) if "val_em" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert 0 <= r["probe_reward"] <= 1 and r["probe_reward_se"] >= 0 and 0 <= r["pool_em"] <= 1
    assert all("probe_reward" not in r and "pool_em" not in r for r in _rows(off))
    # the same start model and the same probe seed in another run: the same probe at step 0 (paired)
    assert _rows(other_seed)[0]["probe_reward"] == rows[0]["probe_reward"]
    # pool_em is greedy EM on the first pool_eval_limit questions of the data order, by the model of that step
    pool = [questions[i] for i in loop.data_window(3, len(questions), 0, 4)]
    model = models.load_model(on, ddp.Dist(), trainable=False)
    greedy = rl.rollout_config(_rl_config(), greedy=True, max_total_tokens=model.config.max_position_embeddings)
    assert rows[-1]["pool_em"] == rl.validation_em(model, tokenizer, pool, retriever, greedy, 8, ddp.Dist())


def test_probe_and_pool_options_need_evaluations_and_drop_needs_grpo(capsys):
    with pytest.raises(ValueError, match="need --eval-every"):
        rl.check_rl_config(_rl_config(probe_samples=4), ddp.Dist())
    with pytest.raises(ValueError, match="need --eval-every"):
        rl.check_rl_config(_rl_config(pool_eval_limit=4), ddp.Dist())
    with pytest.raises(ValueError, match="is for --algo grpo"):
        rl.check_rl_config(_rl_config(algo="ppo", drop_constant_groups=True), ddp.Dist())
    with pytest.raises(ValueError, match="must be >= 1"):
        rl.check_rl_config(_rl_config(max_draws=0), ddp.Dist())
    args = train.parse_args(["rl", "--student", "s", "--data", "d", "--out", "o", "--drop-constant-groups",
                             "--max-draws", "3", "--term-grad-norms", "--probe-samples", "4", "--pool-eval-limit", "100",
                             "--eval-every", "5", "--val", "v"])
    cfg = cli.config_from_args(args, rl.RLConfig)
    assert (cfg.drop_constant_groups, cfg.max_draws, cfg.term_grad_norms, cfg.probe_samples,
            cfg.pool_eval_limit) == (True, 3, True, 4, 100)
    defaults = rl.RLConfig()
    assert not defaults.drop_constant_groups and not defaults.term_grad_norms
    assert defaults.probe_samples == 0 and defaults.pool_eval_limit == 0


# -----------------------------------------------------------------------------
# --drop-constant-groups


def _record(group, em, n=3):
    return {"group": group, "em": float(em), "input_ids": [1] * (n + 2), "loss_mask": [0, 0] + [1] * n,
            "prompt_length": 2}


@pytest.mark.parametrize("mode, kept", [("selective", [1, 4, 5, 6, 7, 8, 9, 10, 11]),
                                        ("uniform", list(range(14))),
                                        ("none", [4, 5, 8, 9])])
def test_informative_records_keep_the_first_mixed_groups_for_the_gradient_and_the_rest_for_the_teacher(mode, kept):
    # groups (in data order) 10 mixed, 11 all right, 12 mixed, 13 all wrong, 14 mixed, 15 all wrong,
    # listed out of order: the data order decides which mixed groups are the first ones
    groups = [(14, (1, 0)), (11, (1, 1)), (12, (0, 1)), (13, (0, 0)), (10, (1, 0)), (15, (0, 0)), (16, (1, 1))]
    records = [_record(g, em) for g, ems in groups for em in ems]
    cfg = rl.RLConfig(prompts_per_step=2, drop_constant_groups=True, teacher_mode=mode, mini_batches=2)
    out, part_of, counts = rl.informative_records(records, rl.group_outcomes(records, ddp.Dist()), cfg, ddp.Dist())
    position = {id(r): i for i, r in enumerate(records)}
    assert [position[id(r)] for r in out] == kept
    assert {r["group"] for r in records if r["pg"]} == {10, 12}           # not 14: two are enough
    assert counts == {"drawn_groups": 7, "pg_groups": 2, "kept_rollouts": len(kept)}
    groups_kept = sorted({r["group"] for r in out})
    assert [part_of[g] for g in groups_kept] == [k % 2 for k in range(len(groups_kept))]   # strided in data order


def test_dropping_without_a_teacher_is_the_update_of_the_first_mixed_groups_alone(model_dirs, tokenizer, rollouts):
    """Plain GRPO with --drop-constant-groups and 2 prompts a step takes the gradient of groups 100 and
    103 averaged over their own tokens — the update those two groups make alone."""
    _, dropped = _update(model_dirs, tokenizer, rollouts, teacher_mode="none", drop_constant_groups=True,
                         prompts_per_step=2)
    alone = [r for r in rollouts if r["group"] in (100, 103)]
    _, reference = _update(model_dirs, tokenizer, alone, teacher_mode="none")
    _, undropped = _update(model_dirs, tokenizer, rollouts, teacher_mode="none")
    assert all(torch.allclose(dropped[k], reference[k], rtol=0, atol=1e-7) for k in dropped)
    assert any(not torch.allclose(dropped[k], undropped[k], rtol=0, atol=1e-6) for k in dropped)


def test_the_refill_draws_further_questions_until_enough_groups_are_mixed(monkeypatch, world):
    """Rounds of prompts_per_step questions from the cursor on, until prompts_per_step mixed groups
    or max_draws rounds; the group id is the data position; the cursor moves past every round."""
    def fake_generate(model, tokenizer, questions, retriever, rcfg, dist, batch_size, generator=None):
        # a question is mixed (one of its two rollouts right) when its position is a multiple of 3
        return [{"id": q["id"], "em": float(q["group"] % 3 == 0 and k % 2 == 0)} for k, q in enumerate(questions)]

    monkeypatch.setattr(arc_eval, "generate_records", fake_generate)
    questions = world.train[:50]
    cfg = rl.RLConfig(prompts_per_step=4, group_size=2, drop_constant_groups=True, max_draws=5, seed=1)
    records, draws, cursor = rl.draw_rollouts(None, None, questions, None, None, cfg, ddp.Dist(), None, 10)
    # positions 10..13 hold one multiple of 3 (12), 14..17 one (15), 18..21 two (18, 21): 4 after 3 rounds
    assert (draws, cursor) == (3, 22)
    assert sorted({r["group"] for r in records}) == list(range(10, 22))
    order = loop.data_window(1, len(questions), 10, 12)
    assert [r["id"] for r in records[::2]] == [questions[i]["id"] for i in order]
    capped = rl.draw_rollouts(None, None, questions, None, None, dataclasses.replace(cfg, max_draws=2), ddp.Dist(),
                              None, 10)
    assert capped[1:] == (2, 18)
    off = rl.draw_rollouts(None, None, questions, None, None, dataclasses.replace(cfg, drop_constant_groups=False),
                           ddp.Dist(), None, 10)
    assert off[1:] == (1, 14)


@pytest.mark.numerics
def test_dropping_refills_logs_the_draws_saves_the_cursor_and_resumes_exactly(world, retriever, model_dirs, tmp_path):
    """From an untrained student every rollout is wrong: each step draws max_draws rounds, the wrong
    rollouts carry the teacher term, and a resume continues from the saved data position."""
    cfg = _rl_config(drop_constant_groups=True, max_draws=2)
    questions = world.train[:12]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, cfg, ddp.Dist(), straight)
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, cfg, ddp.Dist(), split,
                stop_after=2)
    state = torch.load(os.path.join(split, "trainer_state.pt"), weights_only=False)
    assert state["cursor"] == 2 * 2 * 2                  # 2 steps × 2 rounds × 2 prompts
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, cfg, ddp.Dist(), split,
                resume=split)
    a, b, start = _weights(straight), _weights(split), _weights(model_dirs["student"])
    assert any(not torch.equal(a[k], start[k]) for k in a), "the teacher term must move the student"
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs"
    rows = _rows(split)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and _rows(straight) != []
    for r in rows:
        assert r["em"] == 0.0 and r["draws"] == 2 and r["drawn_groups"] == 4 and r["pg_groups"] == 0
        assert r["kept_rollouts"] == 8 and r["mixed_groups"] == 0.0
    assert torch.load(os.path.join(split, "trainer_state.pt"), weights_only=False)["cursor"] == 16
    # plain GRPO from there: nothing is kept, no step has a gradient, each is counted
    grpo = str(tmp_path / "grpo")
    rl.train_rl(model_dirs["student"], None, questions, retriever, _rl_config(drop_constant_groups=True, max_draws=2,
                                                                             steps=2, teacher_mode="none"),
                ddp.Dist(), grpo)
    assert [(r["kept_rollouts"], r["zero_grad_steps"]) for r in _rows(grpo)] == [(0, 1), (0, 2)]
