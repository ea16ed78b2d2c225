"""bench/experiment.py's small preset runs the whole experiment pipeline (every arm, two seeds, the
grid, selection, evaluation, table, curves) in seconds, reuses finished units, and writes the table
into a README between its markers; its design is the demo chain's (train.py) and runs through its steps."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import demo  # noqa: E402
import experiment  # noqa: E402
import rl  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.slow      # whole experiment runs in subprocesses


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="the curves need the optional package matplotlib")
    out = tmp_path_factory.mktemp("experiment")
    readme = out / "README.md"
    readme.write_text(f"# x\n\nbefore\n{experiment.BEGIN}\nold table\n{experiment.END}\nafter\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench/experiment.py", "--preset", "small", "--out", str(out / "run"), "--readme", str(readme)]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first.stdout, second.stdout


def test_small_preset_writes_a_row_for_every_method_and_the_paired_differences(small_run):
    out, stdout, _ = small_run
    table = (out / "run" / "results.md").read_text()
    for method in ["Student (base)", "Teacher", "KD", "KD continued", *experiment.ARMS]:
        assert f"| {method} |" in table, method
    assert "| DGPO (GRPO, selective KL) − KD |" in table and "seed 0" in table and "seed 1" in table
    assert "the whole table from scratch takes" in stdout
    assert "| method | reward | wrong rollouts | steps with a gradient | teacher KL, first 5 → last 5 |" in table
    for arm in experiment.ARMS:
        assert table.count(f"| {arm} |") >= 4, arm        # results, errors, training signal, selection
    png = (out / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_second_run_reuses_every_finished_unit_and_reports_the_same_from_scratch_time(small_run):
    _, first, second = small_run
    assert " 0 run now)" in second and "units reused" in second
    from_scratch = [re.search(r"from scratch takes ([0-9.]+) min", out).group(1) for out in (first, second)]
    assert from_scratch[0] == from_scratch[1]


def test_the_readme_block_is_replaced_and_the_rest_kept(small_run):
    out, _, _ = small_run
    text = (out / "README.md").read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{experiment.END}\nafter\n")
    assert "old table" not in text and "| KD continued |" in text


def test_every_rl_arm_samples_the_same_number_of_rollouts_per_step():
    design = experiment.Design()
    budgets = set()
    for arm in experiment.ARMS:
        cfg = experiment.rl_settings(design, arm, 1e-3, 0)
        budgets.add((cfg.steps, cfg.prompts_per_step * cfg.group_size))
        assert (cfg.algo == "ppo") == (cfg.group_size == 1)
    assert budgets == {(30, 32)}


def test_the_experiment_runs_the_scale1_demo_chain_and_its_dgpo_arm_at_its_lr_is_that_chains_rl_stage():
    design, chain = experiment.Design(), train.PRESETS["scale1"]()
    assert design.chain == chain
    assert experiment.rl_settings(design, "DGPO (GRPO, selective KL)", chain.rl["lr"], 0) == rl.RLConfig(**chain.rl)


def test_kd_and_rl_pools_and_validation_and_test_are_disjoint():
    world = demo.make_world(seed=0)
    design = experiment.Design()
    kd, rl, val, test = ({q["id"] for q in split} for split in train.question_pools(world, design.chain))
    assert len(kd) == 800 and len(rl) == 500
    assert not (kd & rl or kd & val or kd & test or rl & val or rl & test or val & test)
