"""bench/experiment.py's small preset runs the whole experiment pipeline (every arm, two seeds made in
two invocations, selection, evaluation, paired table, curves) in seconds, reuses finished units only
when they were made from the same settings, and writes the table into a README between its markers;
its design is the default demo chain's (train.py) and runs through its steps."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import checkpoint  # noqa: E402
import demo  # noqa: E402
import experiment  # noqa: E402
import rl  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.slow      # whole experiment runs in subprocesses


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="the curves need the optional package matplotlib")
    out = tmp_path_factory.mktemp("experiment")
    readme, doc = out / "README.md", out / "experiment.md"
    readme.write_text(f"# x\n\nbefore\n{experiment.HEADLINE_BEGIN}\nold headline\n{experiment.HEADLINE_END}\nafter\n")
    doc.write_text(f"# y\n\nbefore\n{experiment.BEGIN}\nold table\n{experiment.END}\nafter\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench/experiment.py", "--preset", "small", "--out", str(out / "run")]
    runs = []
    render = ["--readme", str(readme), "--doc", str(doc)]
    for extra in (["--seeds", "1"], render, render):
        done = subprocess.run(cmd + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(done.stdout)
    return out, runs


def test_small_preset_writes_a_row_for_every_method_and_the_paired_differences(small_run):
    out, runs = small_run
    table = (out / "run" / "results.md").read_text()
    for method in ["Student (base)", "Teacher", "KD", "KD continued", *experiment.ARMS]:
        assert f"| {method} |" in table, method
    assert "| seed 1 | seed 2 | pooled | detectable |" in table
    for method, reference in experiment.COMPARISONS:                 # per seed and pooled, each with its interval
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} − {reference} |"))
        # an interval, or (the small preset's models rarely differ) the statement that no question differs
        cells = r"[+-]\d\.\d{3} (?:\[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]|\(no question differs\))"
        assert len(re.findall(cells, row)) == 3, row
    assert "the whole table from scratch takes" in runs[1]
    assert "| method | reward | wrong rollouts | mixed groups |" in table
    # the prompted base student never answers, so its GRPO has no gradient and stops after the window
    assert "Stopped early, with no gradient in any of their first 1 step (their model is still" in table
    assert "GRPO from base (seeds 1, 2)" in table
    for arm in experiment.ARMS:
        assert table.count(f"| {arm} |") >= 4, arm        # results, errors, training signal, selection
    png = (out / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_seed_made_apart_is_reused_and_a_second_render_reuses_every_unit(small_run):
    _, (seed_only, first, second) = small_run
    assert "made seeds [1]" in seed_only and "run without --seeds to render" in seed_only
    assert "units reused" in first and " 0 run now)" not in first         # seed 2 was made by the render
    assert " 0 run now)" in second
    from_scratch = [re.search(r"from scratch takes ([0-9.]+) min", out).group(1) for out in (first, second)]
    assert from_scratch[0] == from_scratch[1]


def test_the_doc_gets_the_whole_table_and_the_readme_its_main_table_the_rest_kept(small_run):
    out, _ = small_run
    doc, readme = (out / "experiment.md").read_text(), (out / "README.md").read_text()
    assert doc.startswith("# y\n\nbefore\n") and doc.endswith(f"{experiment.END}\nafter\n")
    assert readme.startswith("# x\n\nbefore\n") and readme.endswith(f"{experiment.HEADLINE_END}\nafter\n")
    assert "old table" not in doc and "old headline" not in readme
    assert "| KD continued |" in readme and "Paired differences" in doc and "Paired differences" not in readme
    main_table = [line for line in readme.splitlines() if line.startswith("|")]
    assert main_table and "\n".join(main_table) in doc        # the headline is the doc's main table, verbatim


def test_every_rl_arm_samples_the_same_rollouts_per_step_on_the_same_questions_at_the_same_lr():
    design = experiment.Design()
    configs = {arm: experiment.rl_settings(design, arm, 1) for arm in experiment.ARMS}
    assert {(c.steps, c.prompts_per_step, c.group_size, c.lr, c.temperature) for c in configs.values()} == \
        {(design.rl_steps, 8, 8, 3e-4, 1.0)}
    assert {c.beta for c in configs.values() if c.teacher_mode != "none"} == {0.1, 0.001}    # docs/rl_settings §4, §7
    assert configs["DGPO (PPO, reward penalty)"].beta == 0.001 and configs["DGPO (GRPO, KL on all)"].beta == 0.1
    assert [arm for arm, c in configs.items() if c.drop_constant_groups] == [
        "KD → GRPO, drop constant groups", "DGPO (GRPO, selective KL), drop constant groups"]


def test_an_arm_whose_beta_is_not_chosen_yet_refuses_to_run_and_says_how_to_choose_it():
    with pytest.raises(ValueError, match="beta_reward is not chosen yet.*--part forms"):
        experiment.rl_settings(experiment.Design(beta_reward=None), "DGPO (PPO, reward penalty)", 1)


def test_the_experiment_runs_the_default_demo_chain_with_a_quarter_of_direct_answers_and_its_rl_settings():
    design, chain = experiment.Design(), train.PRESETS["default"]()
    assert design.chain == dataclasses.replace(chain, oracle_no_think=0.25)
    assert 0 not in design.seeds and len(design.seeds) == 3             # seed 0 chose the settings
    assert design.rl_steps == 200                                       # docs/rl_settings.md §5
    expected = rl.RLConfig(**{**chain.rl, "steps": 200, "seed": 2, "save_every": 25})
    assert experiment.rl_settings(design, "DGPO (GRPO, selective KL)", 2) == expected


def test_a_finished_unit_is_reused_only_if_it_was_made_from_the_same_settings(tmp_path):
    units, calls = experiment.Units(str(tmp_path)), []

    def make(out):
        calls.append(out)
        return {"value": len(calls)}
    assert units("a", make, {"lr": 3e-4, "seeds": (1, 2)})["value"] == 1
    assert units("a", make, {"lr": 3e-4, "seeds": [1, 2]})["value"] == 1 and len(calls) == 1   # reused
    with pytest.raises(ValueError, match=f"{tmp_path}/a: this unit was made from other settings"):
        units("a", make, {"lr": 1e-3, "seeds": [1, 2]})


def test_an_unfinished_unit_is_redone_unless_it_resumes_itself(tmp_path):
    units = experiment.Units(str(tmp_path))
    for name in ("plain", "resumable"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "checkpoint").write_text("half")
    (tmp_path / "resumable.spec.json").write_text("{}")          # what the interrupted call started from
    seen = {}

    def make(out):
        seen[os.path.basename(out)] = os.path.exists(os.path.join(out, "checkpoint"))
        return {}
    units("plain", make, {})
    units("resumable", make, {}, resumable=True)
    assert seen == {"plain": False, "resumable": True}


def test_a_resumed_unit_counts_the_time_its_interrupted_calls_spent(tmp_path):
    units = experiment.Units(str(tmp_path))

    def interrupted(out):
        time.sleep(0.2)
        raise KeyboardInterrupt
    def interrupted_after_making(out):                     # after its first checkpoint
        def write(tmp):
            open(os.path.join(tmp, checkpoint.STATE_FILE), "w").close()
            with open(os.path.join(tmp, checkpoint.CONFIG_FILE), "w") as f:
                json.dump({"step": 1}, f)
        checkpoint.save(out, write)
        interrupted(out)
    with pytest.raises(KeyboardInterrupt):
        units("long", interrupted_after_making, {}, resumable=True)
    result = units("long", lambda out: {}, {}, resumable=True)
    assert result["seconds"] >= 0.2 and not os.path.exists(tmp_path / "long.seconds")


def test_an_unfinished_resumable_unit_refuses_to_resume_from_other_settings(tmp_path):
    units = experiment.Units(str(tmp_path))

    def interrupted(out):
        os.makedirs(out, exist_ok=True)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        units("rl", interrupted, {"oracle_no_think": 0.0}, resumable=True)
    with pytest.raises(ValueError, match="unfinished unit was started from other settings"):
        units("rl", lambda out: {}, {"oracle_no_think": 0.25}, resumable=True)
    assert units("rl", lambda out: {"ok": 1}, {"oracle_no_think": 0.0}, resumable=True)["ok"] == 1


def test_kd_and_rl_pools_and_validation_and_test_are_disjoint():
    design = experiment.Design()
    chain = design.chain
    world = demo.make_world(seed=chain.world_seed, n_test=chain.n_test, n_validation=chain.n_validation,
                            scale=chain.world_scale)
    kd, rl, val, test = ({q["id"] for q in split} for split in train.question_pools(world, design.chain))
    assert (len(kd), len(rl), len(val), len(test)) == (800, 1020, 500, 1000)
    assert not (kd & rl or kd & val or kd & test or rl & val or rl & test or val & test)


def test_time_is_counted_only_for_an_unfinished_unit_that_resumes_from_a_checkpoint(tmp_path):
    (tmp_path / "gone.seconds").write_text("1000.0")           # left by a unit whose directory was deleted
    result = experiment.Units(str(tmp_path))("gone", lambda out: {}, {}, resumable=True)
    assert result["seconds"] < 1000 and not os.path.exists(tmp_path / "gone.seconds")
    units = experiment.Units(str(tmp_path))

    def interrupted_before_its_first_save(out):               # redone from scratch: its time is not the unit's
        os.makedirs(out, exist_ok=True)
        time.sleep(0.2)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        units("early", interrupted_before_its_first_save, {}, resumable=True)
    assert units("early", lambda out: {}, {}, resumable=True)["seconds"] < 0.2


def test_no_gradient_steps_counts_the_window_from_the_metrics(tmp_path):
    rows = [{"step": 1, "reward": 0.0, "grad_norm": 0.0}, {"step": 1, "val_em": 0.1},
            {"step": 2, "reward": 0.5, "grad_norm": 0.3}, {"step": 3, "reward": 0.0, "grad_norm": 0.0},
            {"step": 4, "reward": 0.0, "grad_norm": 0.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert experiment.no_gradient_steps(str(path), 3) == 2 and experiment.no_gradient_steps(str(path), 4) == 3
