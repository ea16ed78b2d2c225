"""bench/bench_speed.py runs end to end on a few steps: it writes its records with the peak, a row per
stage and arm (phases, FLOPs, padding) and a ratio to the old path, and bucketing cuts the padding."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow          # builds the default demo world (seconds) in a subprocess


def test_steps_part_writes_a_row_per_arm_with_its_ratio_and_bucketing_pads_less(tmp_path):
    out = tmp_path / "speed.json"
    run = subprocess.run([sys.executable, "bench/bench_speed.py", "--parts", "peak,steps", "--rounds", "1",
                          "--bucket-steps", "4", "--stages", "teacher", "--arms", "fp32 (old),length-bucketed",
                          "--json", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["made"]["command"].startswith("python bench/bench_speed.py --parts peak,steps")
    assert result["peak"]["fp32"] > 0 and result["peak"]["bf16"] > 0
    rows = {r["arm"]: r for r in result["steps"]}
    assert set(rows) == {"fp32 (old)", "length-bucketed"}
    assert rows["fp32 (old)"]["speedup"] == 1.0            # the first arm is the baseline, round by round
    for r in rows.values():
        assert r["s_per_step"] > 0 and r["gflops"] > 0
        assert abs(r["forward"] + r["backward"] + r["optimizer"] + r["batch"] - r["s_per_step"]) < 1e-6
    assert rows["length-bucketed"]["padded"] < rows["fp32 (old)"]["padded"]
    assert "| teacher | length-bucketed |" in run.stdout
