"""plot.py: the PNG of a real `train.py demo --preset small` run (one panel per quantity), groups of
seeds drawn as mean and min–max band at the steps all files logged, and bad input named by file, line
or key."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason="plot.py draws with matplotlib (pip install -r requirements-test.txt)")

import matplotlib.pyplot as plt  # noqa: E402

import plot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The metrics files of one `python train.py demo --preset small` run, exactly as a user gets them."""
    out = tmp_path_factory.mktemp("small")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "train.py", "demo", "--preset", "small", "--out", str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {stage: str(out / stage / "metrics.jsonl") for stage in ("teacher", "kd", "dgpo")}


def read_png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def shifted_copy(src: str, dst, delta: float) -> str:
    """The same metrics file with every reward / em / teacher_kl / entropy / val_em raised by delta."""
    with open(src) as f, open(dst, "w") as g:
        for line in f:
            row = json.loads(line)
            for key in plot.DEFAULT_KEYS:
                if key in row:
                    row[key] += delta
            g.write(json.dumps(row) + "\n")
    return str(dst)


@pytest.mark.slow
def test_png_of_the_small_preset_rl_run_has_a_panel_per_quantity(small_run, tmp_path):
    out = tmp_path / "curves.png"
    drawn = plot.main(["--out", str(out), small_run["dgpo"]])
    # val_em: the preset evaluates; the instruments and the time split are in every RL step
    assert drawn == ["reward", "em", "teacher_kl", "entropy", "val_em", "mixed_groups", "nonzero_adv", "rollout_s",
                     "score_s", "update_s"]
    assert read_png_size(out) == (3 * 450, 4 * 320)                          # 3 × 4 panels at 100 dpi
    assert out.stat().st_size > 20_000
    assert os.listdir(tmp_path) == ["curves.png"]                            # no temporary file left


@pytest.mark.slow
def test_each_panel_draws_the_files_values_against_the_step(small_run):
    rows = [json.loads(line) for line in open(small_run["dgpo"])]
    fig, keys = plot.figure({"dgpo": [small_run["dgpo"]]})
    for ax, key in zip(fig.axes, keys):
        [line] = ax.get_lines()
        assert list(line.get_xdata()) == [r["step"] for r in rows if key in r]
        assert list(line.get_ydata()) == [r[key] for r in rows if key in r]
    plt.close(fig)


@pytest.mark.slow
def test_supervised_metrics_plot_with_chosen_keys(small_run, tmp_path):
    out = tmp_path / "kd.png"
    assert plot.main(["--out", str(out), "--keys", "loss,ce,kl", small_run["kd"], small_run["teacher"]]) == \
        ["loss", "ce", "kl"]
    assert read_png_size(out) == (3 * 450, 320)


@pytest.mark.slow
def test_a_group_of_two_files_is_their_mean_with_a_min_max_band(small_run, tmp_path):
    other = shifted_copy(small_run["dgpo"], tmp_path / "seed1.jsonl", delta=0.5)
    out = tmp_path / "grouped.png"
    spec = f"DGPO={small_run['dgpo']},{other}"
    assert plot.main(["--out", str(out), spec, f"GRPO={other}"])[0] == "reward"
    assert read_png_size(out)[0] == 3 * 450
    rows = [r for r in map(json.loads, open(small_run["dgpo"])) if "reward" in r]   # not the step-0 validation row
    fig, keys = plot.figure({"DGPO": [small_run["dgpo"], other], "GRPO": [other]})
    reward_panel = fig.axes[keys.index("reward")]
    mean_line, single_line = reward_panel.get_lines()
    assert list(mean_line.get_ydata()) == pytest.approx([r["reward"] + 0.25 for r in rows])
    assert list(single_line.get_ydata()) == pytest.approx([r["reward"] + 0.5 for r in rows])
    [band] = reward_panel.collections                                     # only the group has a band
    assert band.get_paths()[0].vertices[:, 1].min() == pytest.approx(min(r["reward"] for r in rows))
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(max(r["reward"] + 0.5 for r in rows))
    labels = [t.get_text() for t in reward_panel.get_legend().get_texts()]
    assert labels == ["DGPO (mean of 2, band min–max)", "GRPO"]
    plt.close(fig)


def test_group_curve_aligns_files_by_step_and_keeps_only_common_steps():
    runs = {"a": {0: 0.0, 1: 0.0, 2: 1.0}, "b": {1: 1.0, 2: 1.0, 3: 0.5}, "c": {1: 0.5, 2: 0.4}}
    steps, mean, low, high = plot.group_curve(runs, "em", "g")
    assert steps == [1, 2]
    assert mean == pytest.approx([0.5, 0.8]) and low == [0.0, 0.4] and high == [1.0, 1.0]
    with pytest.raises(ValueError, match="group 'g': its files log 'em' at no common step"):
        plot.group_curve({"a": {1: 0.0}, "b": {2: 0.0}}, "em", "g")


def test_validation_rows_of_their_own_and_step_zero_are_drawn(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "val_em": 0.1}\n{"step": 1, "reward": 0.2, "em": 0.2}\n'
                    '{"step": 2, "reward": 0.4, "em": 0.4, "val_em": 0.3}\n')
    fig, keys = plot.figure({"run": [str(path)]})
    assert keys == ["reward", "em", "val_em"]
    [val] = fig.axes[2].get_lines()
    assert list(val.get_xdata()) == [0, 2] and list(val.get_ydata()) == [0.1, 0.3]
    plt.close(fig)


def test_the_instruments_are_drawn_and_the_probe_with_a_band_of_one_standard_error(tmp_path):
    rows = [{"step": 0, "val_em": 0.5, "pool_em": 0.5, "probe_reward": 0.40, "probe_reward_se": 0.02},
            {"step": 1, "reward": 0.4, "mixed_groups": 0.25, "nonzero_adv": 8, "grad_norm_surrogate": 0.3,
             "grad_norm_teacher": 0.9, "grad_norm_entropy": 0.0, "vf_loss": 0.1, "explained_var": 0.2,
             "value_mean": 0.3, "draws": 2, "critic_s": 1.5},
            {"step": 2, "reward": 0.5, "val_em": 0.6, "pool_em": 0.7, "probe_reward": 0.45, "probe_reward_se": 0.03}]
    path = write(tmp_path / "m.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    fig, keys = plot.figure({"run": [path]})
    assert keys == ["reward", "val_em", "pool_em", "probe_reward", "mixed_groups", "nonzero_adv", "grad_norm_surrogate",
                    "grad_norm_teacher", "grad_norm_entropy", "vf_loss", "explained_var", "value_mean", "draws",
                    "critic_s"]                                 # probe_reward_se is the probe's band, not a panel
    probe = fig.axes[keys.index("probe_reward")]
    [line] = probe.get_lines()
    assert list(line.get_xdata()) == [0, 2] and list(line.get_ydata()) == [0.40, 0.45]
    [band] = probe.collections                                  # 0.40 ± 0.02 at step 0, 0.45 ± 0.03 at step 2
    edge = band.get_paths()[0].vertices[:, 1]
    assert edge.min() == pytest.approx(0.38) and edge.max() == pytest.approx(0.48)
    assert probe.get_legend().get_texts()[0].get_text() == "run (band ±1 SE)"
    assert not fig.axes[keys.index("pool_em")].collections     # no standard error logged: no band
    plt.close(fig)


# ----------------------------------------------------------------------------- bad input

def write(path, text):
    path.write_text(text)
    return str(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        plot.plot_metrics({"x": [str(tmp_path / "nope.jsonl")]}, str(tmp_path / "out.png"))


@pytest.mark.parametrize("text,message", [
    ('{"step": 1, "em": 0.5}\n{"step": 2, "em": \n', r"bad.jsonl:2: not valid JSON"),
    ('{"step": 1, "em": 0.5}\n{"em": 0.5}\n', r"bad.jsonl:2: 'step' must be a non-negative integer, got None"),
    ('{"step": 1.5, "em": 0.5}\n', r"bad.jsonl:1: 'step' must be a non-negative integer, got 1.5"),
    ('{"step": 1, "em": 0.5}\n{"step": 2, "em": "high"}\n', r"bad.jsonl:2: 'em' must be a number, got 'high'"),
    ('{"step": 1, "em": true}\n', r"bad.jsonl:1: 'em' must be a number, got True"),
    ('', r"bad.jsonl: the file has no rows"),
])
def test_malformed_rows_are_named_by_file_and_line(tmp_path, text, message):
    path = write(tmp_path / "bad.jsonl", text)
    with pytest.raises(ValueError, match=message):
        plot.plot_metrics({"x": [path]}, str(tmp_path / "out.png"))


@pytest.mark.slow
def test_a_requested_key_in_no_file_is_named_and_the_old_png_is_kept(small_run, tmp_path):
    out = tmp_path / "curves.png"
    out.write_bytes(b"an older figure")
    with pytest.raises(ValueError, match=r"key 'val_emm' is in none of .*dgpo/metrics.jsonl"):
        plot.main(["--out", str(out), "--keys", "em,val_emm", small_run["dgpo"]])
    assert out.read_bytes() == b"an older figure"


@pytest.mark.slow
def test_default_keys_absent_asks_for_keys(small_run, tmp_path):
    with pytest.raises(ValueError, match=r"none of the default keys .* choose some with --keys .*\bce\b"):
        plot.plot_metrics({"kd": [small_run["kd"]]}, str(tmp_path / "out.png"))


@pytest.mark.parametrize("spec,message", [("DGPO=", "'DGPO=': expected LABEL=FILE"),
                                          ("=a.jsonl", "'=a.jsonl': expected LABEL=FILE")])
def test_bad_group_spec_is_a_usage_error(spec, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot.main(["--out", str(tmp_path / "o.png"), spec])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_file_twice_in_one_group_is_an_error(small_run, tmp_path):
    with pytest.raises(ValueError, match=r"group 'A' lists .*dgpo/metrics.jsonl more than once"):
        plot.main(["--out", str(tmp_path / "o.png"), f"A={small_run['dgpo']},{small_run['dgpo']}"])


@pytest.mark.slow
def test_the_same_label_twice_is_a_usage_error(small_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot.main(["--out", str(tmp_path / "o.png"), f"A={small_run['dgpo']}", f"A={small_run['kd']}"])
    assert "the label 'A' is given twice" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_matplotlib_is_named(small_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # `import matplotlib` now fails
    with pytest.raises(ModuleNotFoundError, match="plot.py needs matplotlib.*pip install matplotlib==3.11.2"):
        plot.plot_metrics({"x": [small_run["dgpo"]]}, str(tmp_path / "out.png"))
    assert not (tmp_path / "out.png").exists()


@pytest.mark.slow
def test_many_groups_share_one_legend_under_the_panels(small_run, tmp_path):
    groups = {f"arm {k}": [small_run["dgpo"]] for k in range(plot.SHARED_LEGEND + 1)}
    fig, keys = plot.figure(groups)
    assert all(ax.get_legend() is None for ax in fig.axes)
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == list(groups)
    plt.close(fig)


def test_out_in_a_missing_directory_is_made_and_a_bad_file_is_one_line_of_error(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.7}\n')
    out = tmp_path / "figs" / "new" / "curves.png"
    assert plot.main(["--out", str(out), str(metrics)]) == ["reward"]
    assert read_png_size(out)[0] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": "one"}\n')
    with pytest.raises(SystemExit) as exit_:
        plot.run_cli(["--out", str(out), str(bad)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {bad}:1: 'step' must be a non-negative integer")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        plot.run_cli(["--out", str(out), str(bad), "--debug"])          # --debug: the exception itself
