"""bench/rl_study.py: the β rule picks what it says on the tuning seed's records, the answer runs on the
reporting seeds only, and its pooled rows carry both intervals computed as stats defines them."""
import json
import os
import sys

import numpy as np
import pytest

import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import rl_study  # noqa: E402


def _arm(out, name, val_ems):
    """An arm's run directory holding only what the β rule reads: its metrics rows with validation EM."""
    run = out / name / "run"
    run.mkdir(parents=True)
    rows = [{"step": 25 * i, "val_em": v} for i, v in enumerate(val_ems)] + [{"step": 1, "reward": 0.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_beta_rule_takes_the_best_validation_em_of_each_arm_and_the_smaller_beta_on_a_tie(tmp_path):
    _arm(tmp_path, "dgpo-b0.01", [0.300, 0.310, 0.290])
    _arm(tmp_path, "dgpo-b0.1", [0.300, 0.290, 0.314])    # its best (0.314) wins, though it ends lower elsewhere
    _arm(tmp_path, "dgpo-b1", [0.300, 0.304, 0.302])
    assert rl_study.chosen_beta(str(tmp_path)) == 0.1
    (tmp_path / "dgpo-b1" / "run" / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_em": 0.314}) + "\n")
    assert rl_study.chosen_beta(str(tmp_path)) == 0.1     # a tie with β 1: the smaller β
    (tmp_path / "dgpo-b0.01" / "run" / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_em": 0.314}) + "\n")
    assert rl_study.chosen_beta(str(tmp_path)) == 0.01
    # the other forms by their own prefix; an arm not run yet is named with the part that runs it
    for name, v in (("dgpo-all-b0.01", 0.28), ("dgpo-all-b0.1", 0.30), ("dgpo-all-b1", 0.29)):
        _arm(tmp_path, name, [v])
    assert rl_study.chosen_beta(str(tmp_path), "dgpo-all-b") == 0.1
    with pytest.raises(FileNotFoundError, match="run --part forms first"):
        rl_study.chosen_beta(str(tmp_path), "ppo-pen-b")


def test_the_answer_runs_grpo_and_dgpo_on_the_reporting_seeds_never_the_tuning_seed():
    arms = rl_study.answer_arms(0.1)
    assert sorted(arms) == ["dgpo-s1", "dgpo-s2", "dgpo-s3", "grpo-s1", "grpo-s2", "grpo-s3"]
    assert {seed for _, seed in arms.values()} == set(rl_study.ANSWER_SEEDS) == {1, 2, 3}
    assert rl_study.TUNING_SEED not in rl_study.ANSWER_SEEDS
    for name, (settings, seed) in arms.items():
        assert name.endswith(f"-s{seed}")
        assert settings == ({"teacher_mode": "none"} if name.startswith("grpo") else {"beta": 0.1})


def test_a_pooled_row_has_the_question_level_and_the_seed_level_interval_and_a_seed_row_its_counts():
    rng = np.random.default_rng(0)
    kd = (rng.random((3, 200)) < 0.3).astype(float)
    dgpo = np.where(rng.random((3, 200)) < 0.1, 1.0, kd)                  # right on ~7% more, per seed
    row = rl_study.paired_row("3 seeds: DGPO − KD", kd, dgpo).split(" | ")
    assert row[1] == "200"
    assert row[2] == stats.format_difference(stats.paired_difference(kd, dgpo))
    seeds = stats.seed_interval(kd, dgpo)
    assert row[3] == stats.format_difference(seeds) and seeds["per_seed"] == pytest.approx((dgpo - kd).mean(axis=1))
    assert row[4:] == ["–", "– |"]
    one = rl_study.paired_row("seed 1: DGPO − KD", kd[0], dgpo[0]).split(" | ")
    gained, lost = int(((kd[0] == 0) & (dgpo[0] == 1)).sum()), int(((kd[0] == 1) & (dgpo[0] == 0)).sum())
    assert one[3] == "–" and one[4:] == [str(gained), f"{lost} |"] and gained > 0 and lost == 0
