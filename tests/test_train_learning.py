"""train.py learns: KD lowers the KD loss on held-out teacher trajectories, and from a student whose every
rollout is wrong, DGPO's teacher term raises EM where plain GRPO gets no signal. Real runs on test-size
models on CPU, seeded. Floating-point results differ between machines and thread counts, so every
threshold has a margin over the values measured at 1 and 2 threads (written beside it), and the RL
claims are asserted over three seeds or as mechanisms that hold exactly."""
import dataclasses
import json

import pytest
import torch

import arc_eval
import ddp
import demo
import loop
import models
import rl
import sft
from rollout import RolloutConfig

pytestmark = pytest.mark.slow      # real training runs, minutes each

GREEDY = RolloutConfig(max_turns=2, max_new_tokens=40, greedy=True)


def _oracle_records(world, tokenizer, retriever, questions):
    trajs = demo.oracle_rollout([q["question"] for q in questions], retriever, tokenizer, GREEDY)
    return [{**q, **dataclasses.asdict(t)} for q, t in zip(questions, trajs)]


def _sft(tokenizer, records, steps, out_dir, seed=1):
    """A test-size model trained with cross-entropy on `records` (the demo teacher's recipe)."""
    torch.manual_seed(0)
    model = demo.make_tiny_model(tokenizer, "test", seed=seed)
    cfg = sft.SupervisedConfig(steps=steps, batch_size=len(records), micro_batch_size=len(records),
                               lr=1e-2, warmup_steps=10)
    sft.train_supervised(model, tokenizer, records, cfg, ddp.Dist(), loop.Run(str(out_dir)), desc="sft")
    return str(out_dir)


def _greedy_em(model_dir, tokenizer, questions, retriever):
    model = models.load_model(model_dir, ddp.Dist(), trainable=False)
    records = arc_eval.generate_records(model, tokenizer, questions, retriever, GREEDY, ddp.Dist(), 16)
    return sum(r["em"] for r in records) / len(records)


@pytest.mark.numerics
def test_kd_lowers_the_kd_loss_on_heldout_teacher_trajectories(world, tokenizer, retriever, tmp_path):
    questions = world.train[:48]
    records = _oracle_records(world, tokenizer, retriever, questions)
    teacher_dir = _sft(tokenizer, records[:16], 40, tmp_path / "teacher")
    teacher = models.load_model(teacher_dir, ddp.Dist(), trainable=False)
    fit, heldout = records[:40], records[40:]          # no held-out question is trained on
    assert not {r["question"] for r in fit} & {r["question"] for r in heldout}
    student = demo.make_tiny_model(tokenizer, "test", seed=5)
    cfg = sft.SupervisedConfig(steps=40, batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=5,
                               eval_every=10, lam=1.0)
    vocab = models.vocab_size_of(tokenizer, student, teacher)
    before = sft.heldout_loss(student, teacher, heldout, cfg, vocab, ddp.Dist())
    sft.train_supervised(student, tokenizer, fit, cfg, ddp.Dist(), loop.Run(str(tmp_path / "kd")), teacher=teacher,
                         heldout=heldout, desc="kd")
    rows = [json.loads(line) for line in open(tmp_path / "kd" / "metrics.jsonl")]
    curve = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
    assert len(curve) == 4 and all(torch.isfinite(torch.tensor(curve)))
    print(f"held-out KD loss: {before:.3f} before, {[round(c, 3) for c in curve]}")
    assert curve[-1] < 0.6 * before, (before, curve)   # measured 10.72 -> 4.34 (0.41x) at 1 and 2 threads
    assert rows[-1]["kl"] > 0                         # the KD term (not only CE) was in the loss


# Seeds of the RL runs (rollout sampling and data order); the teacher and the all-wrong student are
# shared. The margins beside the assertions were measured over these seeds on this project's 2-core
# machine at OMP_NUM_THREADS=1 and =2 (the two gave the same numbers for these test-size models; on
# another machine of the same kind one GRPO seed reached greedy EM 0.125), and every threshold is an
# aggregate over the seeds, or a mechanism that holds exactly on each run.
LEARNING_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def all_wrong_start(world, tokenizer, retriever, tmp_path_factory):
    """8 founder questions, a teacher trained on their oracle trajectories (greedy EM 1.0), and a
    student that is the same recipe stopped early, so that none of its greedy rollouts is right."""
    root = tmp_path_factory.mktemp("all_wrong_start")
    questions = [q for q in world.train if q["kind"] == "founder"][:8]
    records = _oracle_records(world, tokenizer, retriever, questions)
    teacher_dir = _sft(tokenizer, records, 110, root / "teacher")
    student_dir = _sft(tokenizer, records, 80, root / "student")   # the same recipe, stopped early
    return dict(root=root, questions=questions, teacher=teacher_dir, student=student_dir,
                teacher_em=_greedy_em(teacher_dir, tokenizer, questions, retriever),
                student_em=_greedy_em(student_dir, tokenizer, questions, retriever))


def _first_last(rows, key, n=5):
    return sum(r[key] for r in rows[:n]) / n, sum(r[key] for r in rows[-n:]) / n


@pytest.mark.numerics
def test_from_an_all_wrong_start_grpo_gets_no_signal_while_dgpos_teacher_term_raises_em(all_wrong_start, tokenizer,
                                                                                        retriever):
    """The paper's mechanism, on 8 questions, over three seeds. Plain GRPO's groups are (almost)
    all wrong, so their advantage is exactly 0 and most steps have no gradient at all; DGPO's teacher
    term on those same wrong rollouts gives a gradient on every step, its KL to the teacher falls,
    and greedy EM rises above plain GRPO's.

    Exact on every run (any machine, any thread count): a GRPO step whose rollouts are all wrong has
    a gradient of exactly 0; a DGPO step with a wrong rollout has a non-zero gradient. Everything
    else is asserted on the aggregate over LEARNING_SEEDS with margins measured at
    OMP_NUM_THREADS=1 and =2 (see the numbers beside each assertion)."""
    start = all_wrong_start
    questions = start["questions"]
    # measured teacher 1.0 / student 0.0 at 1 and 2 threads; the premise, with a margin for other machines
    assert start["teacher_em"] >= 0.875 and start["student_em"] <= 0.125, (start["teacher_em"], start["student_em"])
    config = dict(steps=60, prompts_per_step=8, group_size=4, micro_batch_size=32, rollout_batch_size=32,
                  lr=3e-4, warmup_ratio=0.0, beta=1.0, temperature=1.0, max_turns=2, max_new_tokens=40)
    runs, after = {}, {}
    for seed in LEARNING_SEEDS:
        for mode in ("selective", "none"):
            out = start["root"] / f"{mode}{seed}"
            rl.train_rl(start["student"], start["teacher"], questions, retriever,
                        rl.RLConfig(**config, seed=seed, teacher_mode=mode), ddp.Dist(), loop.Run(str(out)))
            runs[mode, seed] = [json.loads(line) for line in open(out / "metrics.jsonl")]
            after[mode, seed] = _greedy_em(str(out), tokenizer, questions, retriever)
    summary = {seed: dict(grpo_no_grad=sum(r["grad_norm"] == 0.0 for r in runs["none", seed]),
                          grpo_em=after["none", seed], dgpo_em=after["selective", seed],
                          grpo_sampled=sum(r["em"] for r in runs["none", seed]) / 60,
                          dgpo_sampled=sum(r["em"] for r in runs["selective", seed]) / 60,
                          kl=_first_last(runs["selective", seed], "teacher_kl"),
                          entropy=max(r["entropy"] for r in runs["none", seed]) / runs["none", seed][0]["entropy"])
               for seed in LEARNING_SEEDS}
    print(f"torch threads {torch.get_num_threads()}, student greedy EM {start['student_em']}:", summary)
    for seed in LEARNING_SEEDS:
        grpo, dgpo = runs["none", seed], runs["selective", seed]
        # exact: no right rollout in a step -> every group's advantage is 0 -> no gradient (entropy_coef 0)
        assert all(r["grad_norm"] == 0.0 for r in grpo if r["em"] == 0.0), seed
        # exact: a wrong rollout in a step -> the teacher KL term has a gradient
        assert all(r["grad_norm"] > 0 for r in dgpo if r["em"] < 1.0), seed
        first, last = _first_last(dgpo, "teacher_kl")
        assert last < first, (seed, first, last)                            # the KL to the teacher falls
    mean = lambda key: sum(summary[s][key] for s in LEARNING_SEEDS) / len(LEARNING_SEEDS)  # noqa: E731
    # Measured with an eos as Search-R1's invalid action (the default), identical at 1 and 2 threads:
    # sampled EM over a whole run 0.006-0.012 per seed for either method
    assert mean("grpo_sampled") < 0.03 and mean("dgpo_sampled") < 0.03
    # steps of plain GRPO with no gradient: 41, 39, 49 of 60 (mean 43; 51, 49, 57 when an eos ended the rollout)
    assert mean("grpo_no_grad") >= 36
    # greedy EM after 60 steps: GRPO 0, 0.125, 0 (mean 0.042) and DGPO 0.25, 0.125, 0.25 (mean 0.208) — DGPO
    # 4 of the 24 question × seed answers ahead; asserted: at least 2 (when an eos ended the rollout, DGPO
    # reached 0.5, 0.375, 0.375 and GRPO 0, 0.25, 0)
    assert mean("dgpo_em") >= mean("grpo_em") + 2 / 24 and mean("dgpo_em") >= start["student_em"] + 2 / 24
    # the teacher KL, last 5 steps against the first 5: 0.44x-0.46x per seed (0.46x-0.48x when an eos ended it)
    assert sum(summary[s]["kl"][1] for s in LEARNING_SEEDS) < 0.75 * sum(summary[s]["kl"][0] for s in LEARNING_SEEDS)


@pytest.fixture(scope="module")
def reachable_start(world, tokenizer, retriever, tmp_path_factory):
    """8 founder questions and a student trained on their oracle trajectories long enough that reward is
    reachable: at temperature 0.6 about a tenth to a fifth of its rollouts are right (measured 0.08-0.18 over the first
    third of the runs below), so most GRPO groups are mixed and carry a policy gradient."""
    root = tmp_path_factory.mktemp("reachable_start")
    questions = [q for q in world.train if q["kind"] == "founder"][:8]
    records = _oracle_records(world, tokenizer, retriever, questions)
    student = _sft(tokenizer, records, 88, root / "student")
    return dict(root=root, questions=questions, student=student,
                greedy=_greedy_em(student, tokenizer, questions, retriever))


def _third_means(rows, key):
    n = len(rows) // 3
    return sum(r[key] for r in rows[:n]) / n, sum(r[key] for r in rows[-n:]) / n


def test_grpo_learns_when_reward_is_reachable_and_fails_with_a_flipped_zeroed_or_unwired_advantage(
        reachable_start, tokenizer, retriever, monkeypatch):
    """Plain GRPO end to end (rollouts → EM rewards → group advantages → update) from a start whose groups
    are mostly mixed, against three broken wirings of the same run (same start, seed and settings):
    the advantage's sign flipped, the advantage zeroed, and the rewards shuffled across the step's
    rollouts before the advantages (a reward not wired to the rollout it scores). Only the correct run
    keeps its sampled EM and greedy EM; the flipped and unwired runs unlearn the task, the zeroed run
    never moves (exactly no gradient). The figures beside each assertion were measured on this project's
    machine at OMP_NUM_THREADS=1; the margins leave the gaps measured there at least half."""
    start = reachable_start
    config = rl.RLConfig(steps=40, prompts_per_step=8, group_size=4, micro_batch_size=32, rollout_batch_size=32,
                         lr=3e-4, warmup_ratio=0.0, temperature=0.6, max_turns=2, max_new_tokens=40,
                         teacher_mode="none", seed=0)
    honest = rl.dgpo.group_advantages

    def run(name, advantages=None, steps=40):
        if advantages is not None:
            monkeypatch.setattr(rl.dgpo, "group_advantages", advantages)
        out = start["root"] / name
        rl.train_rl(start["student"], None, start["questions"], retriever, dataclasses.replace(config, steps=steps),
                    ddp.Dist(), loop.Run(str(out)))
        monkeypatch.setattr(rl.dgpo, "group_advantages", honest)
        rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"reward"' in line]
        return rows, _greedy_em(str(out), tokenizer, start["questions"], retriever)

    shuffle = torch.Generator().manual_seed(0)
    correct, correct_greedy = run("correct")
    flipped, flipped_greedy = run("flipped", lambda r, g, **k: -honest(r, g, **k))
    unwired, unwired_greedy = run("unwired", lambda r, g, **k: honest(r[torch.randperm(len(r), generator=shuffle)],
                                                                        g, **k))
    zeroed, _ = run("zeroed", lambda r, g, **k: 0 * honest(r, g, **k), steps=5)
    summary = {name: (_third_means(rows, "em"), greedy) for name, rows, greedy in
               (("correct", correct, correct_greedy), ("flipped", flipped, flipped_greedy),
                ("unwired", unwired, unwired_greedy))}
    print(f"torch threads {torch.get_num_threads()}, start greedy {start['greedy']}: sampled EM first → last "
          f"third, greedy EM after:", summary)
    # the premise: reward is reachable and most groups are mixed (measured: mixed 0.52 of groups on average)
    assert sum(r["mixed_groups"] for r in correct) / len(correct) >= 0.3
    # exact: a zeroed advantage gives no gradient on any step (entropy_coef 0, no teacher)
    assert all(r["grad_norm"] == 0.0 for r in zeroed) and any(r["mixed_groups"] > 0 for r in zeroed)
    # and an honest one a gradient on every step with a mixed group
    assert all(r["grad_norm"] > 0 for r in correct if r["mixed_groups"] > 0)
    (c_first, c_last), (f_first, f_last), (u_first, u_last) = (summary[k][0] for k in ("correct", "flipped",
                                                                                         "unwired"))
    # sampled EM over the last third: correct 0.243, flipped 0.002, unwired 0.084 (first thirds 0.137 / 0.084 / 0.175)
    assert c_last >= f_last + 0.12 and c_last >= u_last + 0.08, summary
    assert c_last > c_first and f_last < f_first and u_last < u_first, summary
    # greedy EM after 40 steps (start 0.625): correct 0.5, flipped 0, unwired 0
    assert correct_greedy >= max(flipped_greedy, unwired_greedy) + 2 / 8, summary
