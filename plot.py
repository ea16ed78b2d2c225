"""Training curves: one or more metrics.jsonl files (as train.py writes them) → one PNG, a panel per quantity.

What it does: reads the per-step JSON lines of `train.py rl` (keys step, reward, em, teacher_kl, entropy,
the instruments — mixed_groups, nonzero_adv, grad_norm_<term>, PPO's vf_loss, explained_var, value_mean,
the time split — and val_em, pool_em, probe_reward on the steps that evaluated) or of `train.py
teacher|kd` (step, loss, ce, kl, heldout_loss), and draws each requested quantity against the step
(by default the RL ones present; probe_reward with a ±1 standard-error band for a single run). Runs can be grouped under a label: a group of
several files (seeds of one configuration) is drawn as the mean over its files with a min–max band, at
the steps every file of the group logged.

What it does not do: smooth, pick the best run, or read TensorBoard / wandb logs. matplotlib is optional
for the rest of the project: it is imported only when a figure is drawn.

    python plot.py --out curves.png runs/dgpo/metrics.jsonl
    python plot.py --out curves.png "DGPO=runs/s0/metrics.jsonl,runs/s1/metrics.jsonl" \\
        "GRPO=runs/g0/metrics.jsonl,runs/g1/metrics.jsonl"
    python plot.py --out kd.png --keys loss,ce,kl runs/kd/metrics.jsonl

    from plot import plot_metrics
    plot_metrics({"DGPO": ["runs/s0/metrics.jsonl", "runs/s1/metrics.jsonl"]}, "curves.png")
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from data import read_jsonl

# RL metrics, those present are drawn: what is learnt (training reward and EM, validation EM, the RL
# pool's own EM, the probe), where the signal comes from (mixed groups, rollouts with an advantage, each
# loss term's gradient norm, the teacher KL, entropy), PPO's critic, the refill, and the time per step
DEFAULT_KEYS = ("reward", "em", "teacher_kl", "entropy", "val_em", "pool_em", "probe_reward", "mixed_groups",
                "nonzero_adv", "grad_norm_surrogate", "grad_norm_teacher", "grad_norm_entropy", "vf_loss",
                "explained_var", "value_mean", "draws", "rollout_s", "score_s", "update_s", "critic_s")
SHARED_LEGEND = 4          # more groups than this get one legend for the figure instead of one per panel
TITLES = {"reward": "reward", "em": "EM (training rollouts)", "teacher_kl": "teacher KL", "entropy": "entropy",
          "val_em": "validation EM", "loss": "loss", "ce": "cross-entropy", "kl": "KL(teacher‖student)",
          "heldout_loss": "held-out loss", "pool_em": "EM on the RL pool (greedy)",
          "probe_reward": "probe: sampled reward on validation", "mixed_groups": "fraction of mixed groups",
          "nonzero_adv": "rollouts with an advantage", "grad_norm_surrogate": "‖∇ surrogate‖",
          "grad_norm_teacher": "‖∇ teacher term‖", "grad_norm_entropy": "‖∇ entropy bonus‖",
          "vf_loss": "value loss", "explained_var": "explained variance (critic)", "value_mean": "mean value",
          "draws": "rounds drawn per step", "rollout_s": "rollout seconds", "score_s": "scoring seconds",
          "update_s": "update seconds", "critic_s": "critic seconds"}
# a key whose rows carry its standard error: a single run is drawn with a ±1 SE band
STANDARD_ERRORS = {"probe_reward": "probe_reward_se"}


def read_metrics(path: str) -> list[dict]:
    """The rows of one metrics.jsonl, each with an int `step`; file:line named on any bad row."""
    rows = []
    for line_no, row in read_jsonl(path):
        step = row.get("step")
        if type(step) is not int or step < 0:
            raise ValueError(f"{path}:{line_no}: 'step' must be a non-negative integer, got {step!r}")
        rows.append({**row, "_line": line_no})
    return rows


def series(rows: list[dict], key: str, path: str) -> dict[int, float]:
    """step → value of `key` over the rows that have it (a step logged twice keeps its last value;
    NaN stays NaN and is drawn as a gap)."""
    out = {}
    for row in rows:
        if key in row:
            value = row[key]
            if type(value) not in (int, float):
                raise ValueError(f"{path}:{row['_line']}: {key!r} must be a number, got {value!r}")
            out[row["step"]] = float(value)
    return out


def group_curve(runs: dict[str, dict[int, float]], key: str, label: str) -> tuple[list[int], list[float],
                                                                                   list[float], list[float]]:
    """(steps, mean, min, max) over the runs of one group, at the steps every run logged.

    e.g. {"a": {1: 0.0, 2: 1.0}, "b": {1: 1.0, 2: 1.0, 3: 0.5}} → ([1, 2], [0.5, 1.0], [0.0, 1.0], [1.0, 1.0])
    """
    common = sorted(set.intersection(*(set(s) for s in runs.values())))
    if not common:
        raise ValueError(f"group {label!r}: its files log {key!r} at no common step "
                         f"({', '.join(f'{p}: {len(s)} steps' for p, s in runs.items())})")
    mean, low, high = [], [], []
    for step in common:
        values = [s[step] for s in runs.values()]
        mean.append(sum(values) / len(values))
        low.append(min(values))
        high.append(max(values))
    return common, mean, low, high


def load_groups(groups: dict[str, list[str]], keys: list[str] | None) -> tuple[list[str], dict]:
    """Reads every file once. Returns the keys to draw and {label: {key: {path: step → value}}}.
    Requested keys must each be in some file; with keys=None, the DEFAULT_KEYS found in any file."""
    if not groups or any(not paths for paths in groups.values()):
        raise ValueError("give at least one metrics.jsonl file in every group")
    for label, paths in groups.items():
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise ValueError(f"group {label!r} lists {', '.join(twice)} more than once")
    rows = {path: read_metrics(path) for paths in groups.values() for path in paths}
    present = {key for file_rows in rows.values() for row in file_rows for key in row}
    if keys is None:
        keys = [k for k in DEFAULT_KEYS if k in present]
        if not keys:
            raise ValueError(f"none of the default keys {', '.join(DEFAULT_KEYS)} is in {', '.join(rows)}; "
                             f"choose some with --keys (these files have: {', '.join(sorted(present - {'_line'}))})")
    for key in keys:
        if key not in present:
            raise ValueError(f"key {key!r} is in none of {', '.join(rows)} (they have: "
                             f"{', '.join(sorted(present - {'_line'}))})")
    loaded = keys + [STANDARD_ERRORS[k] for k in keys if STANDARD_ERRORS.get(k) in present]
    data = {label: {key: {p: series(rows[p], key, p) for p in paths} for key in loaded}
            for label, paths in groups.items()}
    return keys, data


def figure(groups: dict[str, list[str]], keys: list[str] | None = None):
    """(matplotlib Figure, keys drawn): one panel per key, a curve per group — the mean with a min–max
    band for a group of several files."""
    keys, data = load_groups(groups, keys)
    plt = _pyplot()
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    shared = len(data) > SHARED_LEGEND      # many groups: one legend under the panels, not one in each
    legend_rows = math.ceil(len(data) / 3) if shared else 0
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows + 0.3 * legend_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, by_key in data.items():
            runs = {p: s for p, s in by_key[key].items() if s}      # a file without this key adds nothing
            if not runs:
                continue
            steps, mean, low, high = group_curve(runs, key, label)
            name = label if len(runs) == 1 else f"{label} (mean of {len(runs)}, band min–max)"
            se = by_key.get(STANDARD_ERRORS.get(key), {})
            if len(runs) == 1 and se.get(next(iter(runs))):
                name += " (band ±1 SE)"
            line, = ax.plot(steps, mean, label=name, marker="o" if len(steps) <= 20 else None, markersize=3)
            if len(runs) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            elif se.get(next(iter(runs))):
                errors = se[next(iter(runs))]
                width = [errors.get(step, 0.0) for step in steps]
                ax.fill_between(steps, [m - w for m, w in zip(mean, width)], [m + w for m, w in zip(mean, width)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(TITLES.get(key, key))
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if not shared:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if shared:
        entries = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(label, handle)
        fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=3, fontsize="small")
        fig.tight_layout(rect=(0, 0.3 * legend_rows / fig.get_size_inches()[1] + 0.02, 1, 1))
    else:
        fig.tight_layout()
    return fig, keys


def plot_metrics(groups: dict[str, list[str]], out_path: str, keys: list[str] | None = None) -> list[str]:
    """Writes `figure(groups, keys)` as a PNG to out_path (temp file + rename: an existing file is only
    ever replaced by a complete one). Returns the keys drawn, in panel order."""
    fig, keys = figure(groups, keys)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)   # --out runs/figs/x.png: made
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, out_path)
    finally:
        _pyplot().close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return keys


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), or a message naming the package."""
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError("plot.py needs matplotlib, which is not installed: pip install matplotlib==3.11.2 "
                                  "(pinned in requirements-test.txt)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def parse_group(spec: str) -> tuple[str, list[str]]:
    """"LABEL=a.jsonl,b.jsonl" → ("LABEL", [a, b]); a bare path is its own group, labelled by its run
    directory ("runs/dgpo/metrics.jsonl" → "runs/dgpo")."""
    label, sep, paths = spec.partition("=")
    if not sep:
        return os.path.dirname(spec) or spec, [spec]
    files = [p for p in paths.split(",") if p]
    if not label or not files:
        raise ValueError(f"{spec!r}: expected LABEL=FILE[,FILE...]")
    return label, files


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a metrics.jsonl file, or LABEL=FILE[,FILE...] for a group (mean, min–max band)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--keys", help=f"comma-separated metrics, one panel each (default: those of "
                                       f"{','.join(DEFAULT_KEYS)} present)")
    args = parser.parse_args(argv)
    groups = {}
    for spec in args.runs:
        try:
            label, files = parse_group(spec)
        except ValueError as e:
            parser.error(str(e))
        if label in groups:
            parser.error(f"the label {label!r} is given twice")
        groups[label] = files
    keys = [k for k in args.keys.split(",") if k] if args.keys else None
    drawn = plot_metrics(groups, args.out, keys)
    print(f"wrote {args.out}: {', '.join(drawn)} for {', '.join(groups)}")
    return drawn


def run_cli(argv=None) -> None:
    """main(), with an error a person can act on (a bad file or row, a missing package) printed as one
    line and exit status 2; `--debug` shows the traceback instead. (cli.run_cli does the same for
    the training stages.)"""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main([a for a in argv if a != "--debug"])
    except (ValueError, OSError, ImportError) as error:
        if "--debug" in argv:
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    run_cli()
