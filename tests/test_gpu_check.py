"""bench/gpu_check.py on tiny shapes, as CI runs it so that the GPU check cannot rot: every part passes
(finite losses, parameters moved, rollouts measured against both baselines), the JSON and the Markdown
table are written; a part that raises is reported with its traceback while the others still run; the
time budget skips what it cannot fit instead of overrunning."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_check(out, *extra):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")   # the CPU, as in CI, anywhere
    cmd = [sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    with open(out / "gpu_check.json") as f:
        report = json.load(f)
    return done, report, {p["part"]: p for p in report["parts"]}, (out / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("gpu_check"))


def test_every_part_passes_on_tiny_shapes_and_the_table_is_written_and_printed(tiny_run):
    done, report, parts, table = tiny_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = [name for name, _, _ in gpu_check.part_list(gpu_check.TINY)]
    assert list(parts) == names
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("traceback"))
        assert part["checks"] and all(part["checks"].values()), name
        assert part["seconds"] > 0 and part["peak_gb"] is not None, name
        assert f"| {name} | ok |" in table
    assert "| part | status | seconds |" in done.stdout and "11/11 parts ok" in done.stdout


def test_every_training_step_has_a_finite_loss_and_moves_every_parameter(tiny_run):
    _, _, parts, _ = tiny_run
    for name in ("kd", "kd_ckpt", "grpo", "grpo_ckpt", "ppo", "ppo_ckpt"):
        part = parts[name]
        assert math.isfinite(part["loss"]) and part["loss"] != 0, name
        assert part["details"]["measured_step"], name                  # the warm-up and the measured step ran
        assert part["details"]["gradient_checkpointing"] == name.endswith("_ckpt") and part["details"]["ddp"]
        moved = re.findall(r"(\w+) (\d+)/(\d+)", part["params_changed"])
        assert [m[0] for m in moved] == (["actor", "critic"] if name.startswith("ppo") else ["actor"]), name
        assert all(int(a) == int(b) > 0 for _, a, b in moved), (name, part["params_changed"])
        assert 0.15 < part["details"]["loss_share"] < 0.25                 # ≈ 20% loss positions
    assert math.isfinite(parts["ppo"]["details"]["metrics"]["vf_loss"])


def test_head_at_positions_gives_the_full_logits_loss_and_every_decode_is_timed_prefill_and_decode_apart(tiny_run):
    _, _, parts, _ = tiny_run
    head = parts["head"]["details"]
    assert head["heads_loss"] == pytest.approx(head["full_loss"], rel=1e-5) and head["L"] < head["T"]
    for batch in gpu_check.TINY.rollout_batches:
        d = parts[f"rollout_b{batch}"]["details"]
        assert d["batch"] == batch and d["max_new_tokens"] == gpu_check.TINY.max_new_tokens
        for method in ("rollout", "generate", "ragged_loop"):
            m = d[method]
            assert m["tokens"] > 0 and m["prefill_calls"] >= 1 and m["decode_steps"] >= 1, method
            assert 0 < m["prefill_s"] + m["decode_forward_s"] <= m["seconds"], method
        assert d["ragged_loop"]["tokens"] == d["rollout"]["tokens"]        # each row decodes what it sampled
        assert d["vs_generate"] == pytest.approx(d["rollout"]["tokens_per_s"] / d["generate"]["tokens_per_s"])


@pytest.mark.slow
def test_a_part_that_raises_is_reported_with_its_traceback_and_the_next_part_still_runs(tmp_path):
    done, _, parts, table = run_check(tmp_path, "--parts", "distributed,kd", "--fail-part", "distributed")
    assert done.returncode == 1
    assert list(parts) == ["distributed", "kd"]
    assert parts["distributed"]["status"] == "error"
    assert "RuntimeError: failure injected by --fail-part distributed" in parts["distributed"]["traceback"]
    assert parts["kd"]["status"] == "ok" and parts["kd"]["details"]["measured_step"]
    assert "| distributed | error |" in table and "| kd | ok |" in table


def test_failed_checks_fail_the_part_and_a_spent_budget_skips_the_rest():
    def raises(share):
        raise ValueError("broken")

    parts = [("bad", lambda share: {"checks": {"loss finite": False}}), ("raises", raises),
             ("good", lambda share: {"checks": {"loss finite": True}, "seconds": share})]
    budget = gpu_check.Budget(100.0, {"bad": 1, "raises": 1, "good": 2})
    results = gpu_check.run_parts(parts, budget, log=lambda text: None)
    assert [r["status"] for r in results] == ["fail", "error", "ok"]
    assert results[0]["error"] == "failed: loss finite"
    assert "ValueError: broken" in results[1]["traceback"]
    assert 99 < results[2]["seconds"] <= 100          # what the earlier parts did not use passes on
    spent = gpu_check.Budget(-1.0, {"bad": 1, "good": 1})
    assert [r["status"] for r in gpu_check.run_parts(parts[::2], spent, log=lambda text: None)] == ["skipped"] * 2


def test_an_unknown_part_is_refused_by_name():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "kd,nonsense"])
