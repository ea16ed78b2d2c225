"""rl.py: the instruments of an RL step (mixed groups, non-zero advantages, each loss term's gradient
norm, PPO's explained variance, the time split), the learning probe and the RL-pool EM at every
evaluation, and --drop-constant-groups (DAPO's dynamic sampling: which rollouts it keeps, how it
refills the step, and that the data position it saves makes a resume exact); resume is exact (GRPO and PPO
with its critic), two gloo ranks make the update one process makes, the length budget, tempered
log-probs, validation choosing the checkpoint."""
import dataclasses
import json
import math
import os
import subprocess
import sys

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
from rollout import RolloutConfig, prompt_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# this module's RL runs: conftest's rl_config with larger batches (the tests were measured with them)
BATCHES = dict(micro_batch_size=4, rollout_batch_size=8)


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


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
    # constant returns of any size are NaN; the one-pass sums leave a variance of ±1e-17 there (0.1 × 1,000
    # tokens gave +1.7e-18 and an explained variance of −10¹³ before the rule), which must not be divided by
    for value in (0.1, 0.3, 0.7, 1 / 3):
        for n in (3, 1000):
            assert math.isnan(rl.explained_variance(torch.full((1, n), value), torch.rand(1, n),
                                                    torch.ones(1, n, dtype=torch.bool), dist)), (value, n)
    # a small spread that is real is measured
    assert rl.explained_variance(torch.tensor([[0.0, 1e-3]]), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool),
                                 dist) == pytest.approx(0.0, abs=1e-6)


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
                                                                             tokenizer, rl_config, saved_weights):
    questions, validation = world.train[:6], world.validation[:3]
    on, off, other_seed = (str(tmp_path / n) for n in ("on", "off", "seed"))
    measure = dict(eval_every=2, probe_samples=2, pool_eval_limit=4)
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever,
                rl_config(**BATCHES, **measure),
                ddp.Dist(), loop.Run(on), validation=validation)
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever,
                rl_config(**BATCHES, eval_every=2),
                ddp.Dist(), loop.Run(off), validation=validation)
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever,
                rl_config(**BATCHES, seed=4, **measure),
                ddp.Dist(), loop.Run(other_seed), validation=validation)
    a, b = saved_weights(on), saved_weights(off)
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
    greedy = rl.rollout_config(rl_config(**BATCHES), greedy=True, max_total_tokens=model.config.max_position_embeddings)
    assert rows[-1]["pool_em"] == rl.validation_em(model, tokenizer, pool, retriever, greedy, 8, ddp.Dist())


def test_probe_and_pool_options_need_evaluations_and_drop_needs_grpo(capsys, rl_config):
    with pytest.raises(ValueError, match="need --eval-every"):
        rl.check_rl_config(rl_config(**BATCHES, probe_samples=4), ddp.Dist())
    with pytest.raises(ValueError, match="need --eval-every"):
        rl.check_rl_config(rl_config(**BATCHES, pool_eval_limit=4), ddp.Dist())
    with pytest.raises(ValueError, match="is for --algo grpo"):
        rl.check_rl_config(rl_config(**BATCHES, algo="ppo", drop_constant_groups=True), ddp.Dist())
    with pytest.raises(ValueError, match="must be >= 1"):
        rl.check_rl_config(rl_config(**BATCHES, max_draws=0), ddp.Dist())
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
def test_dropping_refills_logs_the_draws_saves_the_cursor_and_resumes_exactly(world, retriever, model_dirs, tmp_path,
                                                                              rl_config, saved_weights,
                                                                              straight_and_resumed):
    """From an untrained student every rollout is wrong: each step draws max_draws rounds, the wrong
    rollouts carry the teacher term, and a resume continues from the saved data position."""
    cfg = rl_config(**BATCHES, drop_constant_groups=True, max_draws=2)
    questions = world.train[:12]
    straight, split, state = straight_and_resumed(
        lambda out, **kw: rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, cfg,
                                      ddp.Dist(), loop.Run(out, **kw)), stop_after=2)
    assert state["cursor"] == 2 * 2 * 2                  # 2 steps × 2 rounds × 2 prompts
    a, b, start = saved_weights(straight), saved_weights(split), saved_weights(model_dirs["student"])
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
    rl.train_rl(model_dirs["student"], None, questions, retriever,
                rl_config(**BATCHES, drop_constant_groups=True, max_draws=2, steps=2, teacher_mode="none"),
                ddp.Dist(), loop.Run(grpo))
    assert [(r["kept_rollouts"], r["zero_grad_steps"]) for r in _rows(grpo)] == [(0, 1), (0, 2)]


def _run_worker(nproc, model_dirs, records_path, out_dir, *extra):
    script = os.path.join(ROOT, "tests", "ddp_rl_step.py")
    args = [model_dirs["student"], model_dirs["teacher"], records_path, str(out_dir), *extra]
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               script, *args]
    # one process and every rank alike at one thread: the comparison is of the DDP reduction, not of
    # how a thread count splits floating-point sums
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out_dir / f"rank{r}_of{nproc}.pt") for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.parametrize("teacher_as,mini_batches,algo,drop", [("loss", "1", "grpo", "0"), ("reward", "1", "grpo", "0"),
                                                               ("loss", "2", "grpo", "0"), ("reward", "2", "ppo", "0"),
                                                               ("loss", "2", "grpo", "1"), ("reward", "1", "grpo", "1")])
@pytest.mark.numerics
def test_ddp_two_ranks_make_the_same_update_as_one_process(model_dirs, fixed_rollouts, tmp_path, teacher_as,
                                                           mini_batches, algo, drop):
    """The same actor update (and, with PPO, the same critic update) on 1 and on 2 ranks (gloo), and the
    same instruments. With --drop-constant-groups (2 prompts a step) the update keeps groups 100 and
    103 for the policy gradient and the wrong rollouts of the others for the teacher term: rank 0
    holds 6 of the 11 kept rollouts, rank 1 5, and with 2 mini-batches one rank has 1 micro-batch
    where the other has 2 — it runs an empty one so that DDP's all-reduce meets."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    before = models.load_model(model_dirs["student"], ddp.Dist(), trainable=True).state_dict()
    [single] = _run_worker(1, model_dirs, fixed_rollouts, tmp_path / "one", teacher_as, mini_batches, algo, drop)
    rank0, rank1 = _run_worker(2, model_dirs, fixed_rollouts, tmp_path / "two", teacher_as, mini_batches, algo, drop)
    moved = max((single["params"][k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-4, "the step must actually change the parameters for the comparison to mean anything"
    for which in ("params", "critic"):
        for name, value in single[which].items():
            torch.testing.assert_close(rank0[which][name], value, rtol=0, atol=1e-5, msg=name)
            assert torch.equal(rank0[which][name], rank1[which][name]), f"ranks differ on {which} {name}"
    if algo == "ppo":
        assert single["critic"] and not torch.equal(single["critic"]["score.weight"],
                                                    torch.zeros_like(single["critic"]["score.weight"]))
    # metrics are reduced over ranks: the global token count is the same either way
    assert rank0["metrics"]["loss_tokens"] == single["metrics"]["loss_tokens"]
    assert rank0["metrics"]["teacher_kl"] == pytest.approx(single["metrics"]["teacher_kl"], rel=1e-5)
    if mini_batches == "2":    # the second mini-batch is off-policy: the ratio moved away from 1
        assert single["metrics"]["approx_kl"] > 0
    # the instruments: per-term gradient norms of the global batch, group counts, PPO's explained variance
    keys = ["grad_norm_surrogate", "grad_norm_teacher", "grad_norm_entropy", "mixed_groups", "nonzero_adv"]
    keys += {"ppo": ["explained_var"], "grpo": []}[algo] + (["pg_groups", "kept_rollouts"] if drop == "1" else [])
    for key in keys:
        assert rank0["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-7), key
        assert rank0["metrics"][key] == rank1["metrics"][key], key
    assert single["metrics"]["mixed_groups"] == 3 / 8          # groups 100, 103, 105 of the fixture
    assert all(single["metrics"][f"grad_norm_{k}"] > 0 for k in ("surrogate", "teacher", "entropy"))
    if drop == "1":
        assert single["metrics"]["pg_groups"] == 2
        assert single["metrics"]["kept_rollouts"] == 4 + 7       # groups 100 and 103, and the other wrong rollouts
        assert single["metrics"]["nonzero_adv"] == (4 if teacher_as == "loss" else 11)   # the penalty: every kept one


@pytest.mark.numerics
def test_resume_is_exact_four_steps_equal_two_plus_two(world, retriever, model_dirs, rl_config, saved_weights,
                                                       straight_and_resumed):
    cfg = rl_config()
    questions = world.train[:6]
    straight, split, state = straight_and_resumed(
        lambda out, **kw: rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, cfg,
                                      ddp.Dist(), loop.Run(out, **kw)), stop_after=2)
    assert state["step"] == 2
    a, b = saved_weights(straight), saved_weights(split)
    initial = saved_weights(model_dirs["student"])
    assert any(not torch.equal(a[k], initial[k]) for k in a), "training did not move the parameters"
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs on {k}"
    rows = [json.loads(line) for line in open(os.path.join(split, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_rl_steps_with_no_gradient_leave_the_student_as_it_was_and_the_metrics_count_them(world, retriever,
                                                                                          model_dirs, tmp_path,
                                                                                          rl_config, saved_weights):
    """Plain GRPO from an untrained student: every rollout is wrong, every group constant, so no step
    has a gradient; the run logs each as a zero-gradient step and saves the start weights."""
    out = str(tmp_path / "grpo")
    cfg = rl_config(steps=2, teacher_mode="none")
    rl.train_rl(model_dirs["student"], None, world.train[:4], retriever, cfg, ddp.Dist(), loop.Run(out))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["em"] for r in rows] == [0.0, 0.0]
    assert [r["zero_grad_steps"] for r in rows] == [1, 2] and all(r["grad_norm"] == 0.0 for r in rows)
    start, end = saved_weights(model_dirs["student"]), saved_weights(out)
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_mini_batches_are_strided_whole_groups():
    """Group k of a rank goes to mini-batch k mod parts. Ranks hold contiguous blocks of groups, so with
    2 ranks × 4 groups the global mini-batch 0 is groups {0, 2, 4, 6} either way, as in one process."""
    records = [{"group": g, "i": i} for g in (10, 11, 12, 13) for i in range(3)]
    parts = rl.split_groups(records, 2)
    assert [[r["group"] for r in p] for p in parts] == [[10] * 3 + [12] * 3, [11] * 3 + [13] * 3]
    one_process = rl.split_groups([{"group": g} for g in range(8)], 2)
    by_rank = [rl.split_groups([{"group": g} for g in block], 2) for block in (range(4), range(4, 8))]
    for k in range(2):
        assert [r["group"] for r in one_process[k]] == [r["group"] for rank in by_rank for r in rank[k]]
    with pytest.raises(ValueError, match="3 groups on this rank cannot form 2 equal mini-batches"):
        rl.split_groups([{"group": g} for g in range(3)], 2)


def test_rl_length_budget_truncates_flags_and_keeps_running(world, tokenizer, retriever, model_dirs, tmp_path,
                                                            monkeypatch, rl_config):
    """--max-total-tokens reaches the rollout: no trajectory grows past it, the step still trains, and
    the metrics say how many rollouts were cut."""
    questions = world.train[:4]
    cap = max(len(prompt_ids(tokenizer, q["question"])) for q in questions) + 3
    cfg = rl_config(steps=1, prompts_per_step=4, max_total_tokens=cap, max_new_tokens=6)
    seen = []
    real = arc_eval.generate_records
    monkeypatch.setattr(arc_eval, "generate_records", lambda *a, **k: seen.extend(real(*a, **k)) or seen)
    out = tmp_path / "rl"
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, cfg, ddp.Dist(), loop.Run(str(out)))
    assert len(seen) == 8 and all(len(r["input_ids"]) <= cap and r["truncated"] for r in seen)
    assert any(len(r["input_ids"]) == cap for r in seen)          # the cap, not something else, ended them
    [row] = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert row["truncated_frac"] == 1.0 and row["loss_tokens"] > 0


def test_rl_logprobs_are_the_tempered_sampling_distribution_and_the_first_minibatch_ratio_is_one(
        model_dirs, fixed_rollouts, tokenizer):
    """At T = 0.7, log π_old (scored before the update) and log π_θ (scored inside the first
    mini-batch) are both log softmax(z / T): the ratio is exactly 1 (approx_kl 0, nothing clipped).
    Scored at T = 1, as before, the same first mini-batch would see a ratio far from 1."""
    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=True)
    vocab = models.vocab_size_of(tokenizer, model)
    records = data.load_trajectories(fixed_rollouts)
    cfg = rl.RLConfig(micro_batch_size=4, temperature=0.7, teacher_mode="none", warmup_ratio=0.0)
    old = rl.sampled_logprobs(model, records, cfg, vocab, dist)
    batch = models.make_batch(records[:1], dist.device)
    with torch.no_grad():                                 # the textbook way: all logits, then pick
        direct = torch.log_softmax(model(input_ids=batch.inputs).logits[0, :, :vocab] / 0.7, -1)
    direct = direct[batch.positions[0]].gather(-1, batch.targets[0][:, None])[:, 0]
    torch.testing.assert_close(old[0], direct, rtol=0, atol=1e-5)
    for r, lp in zip(records, old):
        r["old_logp"], r["advantage"] = lp, 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    metrics = rl.minibatch_update(model, None, optimizer, scheduler, records, cfg, dist, vocab, {})
    assert metrics["approx_kl"] == 0.0 and metrics["clip_frac"] == 0.0
    untempered = rl.sampled_logprobs(model, records, rl.RLConfig(micro_batch_size=4, temperature=1.0),
                                     vocab, dist)
    for r, lp in zip(records, untempered):
        r["old_logp"] = lp
    stale = rl.minibatch_update(model, None, optimizer, scheduler, records, cfg, dist, vocab, {})
    assert stale["approx_kl"] > 1e-3


def test_validation_scores_the_start_model_and_it_can_be_the_best_checkpoint(world, retriever, model_dirs,
                                                                             tmp_path, rl_config, saved_weights):
    """lr = 0: no step changes the model, so no later validation beats step 0, and best/ is the start."""
    cfg = rl_config(steps=2, lr=0.0, eval_every=1, eval_limit=3)
    out = str(tmp_path / "rl")
    summary = rl.train_rl(model_dirs["student"], model_dirs["teacher"], world.train[:6], retriever, cfg,
                          ddp.Dist(), loop.Run(out), validation=world.validation)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0].keys() == {"step", "val_em", "eval_s"}
    assert rows[0]["val_em"] == rows[1]["val_em"] == rows[2]["val_em"]
    assert summary["best_step"] == 0
    assert torch.load(os.path.join(out, "best", "trainer_state.pt"), weights_only=False)["step"] == 0
    start, best = saved_weights(model_dirs["student"]), saved_weights(os.path.join(out, "best"))
    assert all(torch.equal(start[k], best[k]) for k in start)


def test_rl_refuses_a_zero_temperature(world, retriever, model_dirs, tmp_path, rl_config):
    with pytest.raises(ValueError, match="--temperature 0.0: .*must be > 0"):
        rl.train_rl(model_dirs["student"], None, world.train[:2], retriever,
                    rl_config(temperature=0.0, teacher_mode="none"), ddp.Dist(), loop.Run(str(tmp_path / "x")))


@pytest.mark.numerics
def test_ppo_resume_is_exact_with_the_critic_and_its_optimizer(world, retriever, model_dirs, tmp_path, rl_config,
                                                               saved_weights, straight_and_resumed):
    from transformers import AutoModelForTokenClassification
    cfg = rl_config(algo="ppo", group_size=1, prompts_per_step=3, teacher_as="reward", critic_lr=1e-2,
                    mini_batches=1)
    questions = world.train[:6]
    straight, split, _ = straight_and_resumed(
        lambda out, **kw: rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, cfg,
                                      ddp.Dist(), loop.Run(out, **kw)), stop_after=2)
    for sub, load in (("", saved_weights), ("critic",
                                            lambda p: AutoModelForTokenClassification.from_pretrained(p).state_dict())):
        a, b = load(os.path.join(straight, sub)), load(os.path.join(split, sub))
        for k in a:
            assert torch.equal(a[k], b[k]), f"resumed run differs on {sub or 'actor'} {k}"
    critic = AutoModelForTokenClassification.from_pretrained(os.path.join(split, "critic"))   # an ordinary HF dir
    assert critic.config.num_labels == 1 and critic.score.weight.abs().sum() > 0    # trained from zero
    rows = [json.loads(line) for line in open(os.path.join(split, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["vf_loss"]) for r in rows)
    state = torch.load(os.path.join(split, "trainer_state.pt"), weights_only=False)
    assert state["critic_optimizer"]["state"], "the critic's Adam moments are saved"
    # an overridden critic lr really reaches the critic's optimizer
    longer = {**cfg.__dict__, "steps": 5, "critic_lr": 0.5}
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, rl.RLConfig(**longer),
                ddp.Dist(), loop.Run(split, resume=split, override_config=True))
    state = torch.load(os.path.join(split, "trainer_state.pt"), weights_only=False)
    assert state["critic_optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.5)
    assert rl.load_critic(os.path.join(split, "critic"), ddp.Dist(), True, "--resume", fresh=False).training
    with pytest.raises(FileNotFoundError, match="no critic/ in it"):
        grpo_dir = str(tmp_path / "grpo")
        rl.train_rl(model_dirs["student"], None, questions, retriever, rl_config(steps=1, teacher_mode="none"),
                    ddp.Dist(), loop.Run(grpo_dir))
        rl.train_rl(model_dirs["student"], None, questions, retriever,
                    rl_config(steps=2, teacher_mode="none", algo="ppo"), ddp.Dist(),
                    loop.Run(grpo_dir, resume=grpo_dir, override_config=True))


@pytest.mark.numerics
def test_a_short_ppo_run_is_finite_and_the_critic_fits_the_returns(world, retriever, model_dirs, fixed_rollouts,
                                                                   tmp_path, tokenizer, rl_config):
    """A short PPO run with the per-token teacher penalty (so the returns are not all zero) from the
    tiny student keeps every number finite; and on a fixed batch of rollouts (the actor frozen, so
    the returns hold still) the critic, from V = 0, drives the value loss down."""
    cfg = rl_config(algo="ppo", group_size=1, steps=4, prompts_per_step=4, micro_batch_size=4, rollout_batch_size=4,
                    teacher_as="reward", beta=0.5, lr=1e-4, critic_lr=3e-3, warmup_ratio=0.0, entropy_coef=0.001)
    out = str(tmp_path / "ppo")
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], world.train[:16], retriever, cfg, ddp.Dist(),
                loop.Run(out))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 4 and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert all("vf_loss" in r and "value_mean" in r for r in rows)

    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=True)
    teacher = models.load_model(model_dirs["teacher"], dist, trainable=False)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    critic_hf = rl.load_critic(model_dirs["student"], dist, False, "--student", fresh=True)
    critic_opt = torch.optim.Adam(critic_hf.parameters(), lr=1e-2)
    critic = rl.Critic(models.wrap(critic_hf, dist), critic_opt, torch.optim.lr_scheduler.LambdaLR(critic_opt, lambda s: 1.0))
    records = data.load_trajectories(fixed_rollouts)
    fixed_cfg = rl.RLConfig(algo="ppo", teacher_as="reward", beta=0.5, micro_batch_size=16, whiten_advantages=False)
    vocab = models.vocab_size_of(tokenizer, model)
    losses = [rl.rl_update(models.wrap(model, dist), teacher, frozen, torch.optim.lr_scheduler.LambdaLR(frozen, lambda s: 1.0),
                           [dict(r) for r in records], fixed_cfg, dist, vocab, {}, critic)["vf_loss"] for _ in range(12)]
    print(f"critic value loss, last / first of 12 updates: {losses[-1] / losses[0]:.3f}")
    assert losses[-1] < 0.5 * losses[0], [round(x, 5) for x in losses]    # measured 0.38x at 1 and 2 threads


def test_questions_drawn_counts_prompts_per_step_or_the_refills_a_step_logged():
    steps = [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.2, "drawn_groups": 13}]
    assert rl.questions_drawn(steps, 8) == 8 + 13 and rl.questions_drawn([], 8) == 0


def _update_loss_and_weights(model_dirs, records, cfg, lr):
    """One minibatch_update from the student as saved: (its logged loss, the weights after SGD at lr)."""
    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=True)
    vocab = model.config.vocab_size
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    metrics = rl.minibatch_update(model, None, optimizer, scheduler, records, cfg, dist, vocab, {})
    return metrics["loss"], [p.detach().clone() for p in model.parameters()]


def test_micro_token_mean_is_search_r1s_mean_of_micro_batch_token_means(model_dirs, fixed_rollouts):
    """--agg micro-token-mean (Search-R1's veRL: each micro-batch's masked_mean / gradient_accumulation):
    the step's loss is the mean of the micro-batches' own token-means, and with micro-batches of equal
    loss-token counts it is the global token-mean, gradient and all."""
    records = data.load_trajectories(fixed_rollouts)
    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=False)
    cfg = rl.RLConfig(micro_batch_size=4, teacher_mode="none", warmup_ratio=0.0, grad_clip=1e9)
    for r, lp, a in zip(records, rl.sampled_logprobs(model, records, cfg, model.config.vocab_size, dist),
                        [1.0, -0.5, 0.3, -1.0] * 4):
        r["old_logp"], r["advantage"] = lp, a
    step = records[:7]
    first, second = models.micro_batches(step, 4)                   # micro-batches of 4 and 3 rollouts
    counts = [models.loss_token_count(part) for part in (first, second)]
    assert counts[0] != counts[1]                                   # unequal: the two means differ
    micro, token = (rl.RLConfig(**{**cfg.__dict__, "agg": agg}) for agg in ("micro-token-mean", "token-mean"))
    alone = [_update_loss_and_weights(model_dirs, part, token, 0.0)[0] for part in (first, second)]
    assert _update_loss_and_weights(model_dirs, step, micro, 0.0)[0] == pytest.approx(sum(alone) / 2)
    global_mean = (alone[0] * counts[0] + alone[1] * counts[1]) / sum(counts)
    assert _update_loss_and_weights(model_dirs, step, token, 0.0)[0] == pytest.approx(global_mean)
    assert abs(global_mean - sum(alone) / 2) > 1e-4
    # equal counts (the same micro-batch twice): the same loss and the same step
    assert len({models.loss_token_count(part) for part in models.micro_batches(first + first, 4)}) == 1
    loss_m, weights_m = _update_loss_and_weights(model_dirs, first + first, micro, 1.0)
    loss_t, weights_t = _update_loss_and_weights(model_dirs, first + first, token, 1.0)
    assert loss_m == pytest.approx(loss_t)
    for a, b in zip(weights_m, weights_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
