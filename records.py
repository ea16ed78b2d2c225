"""Records: the small text files every number the docs report is computed from, and what made them.

What it does: turns what a run leaves behind — an evaluation's trajectories.jsonl, an RL run's
metrics.jsonl and train_config.json, the demo's results.json — into records without any model text:
a row per question (its key, data source, every ARC score, invalid actions, the probe's EMs and the
error kind), a row per training step, the run's settings and command, and its provenance (code commit,
torch version, CPU model, thread count, date, input fingerprints). Records are gzip'd JSON lines or
indented JSON, written byte-stable (no time in the gzip header) under results/, whose layout is
results/README.md. `question_means` recomputes an evaluation's report (arc_metric.arc_report's
per-source means) from its rows, and `paired_scores` lines two evaluations up question by question.

What it does not: render tables (render.py does), keep trajectories' text, or keep any weights.

    python records.py demo runs/demo --out results/demo        # after `python train.py demo --out runs/demo`
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

import data

REPO = os.path.dirname(os.path.abspath(__file__))
PROBE_FIELDS = ("em_no_think", "em_think", "own_turn")     # the probe's numbers a row keeps (not its text)


# -----------------------------------------------------------------------------
# Provenance: what made a record


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fingerprint(path: str) -> str:
    """16 hex digits of the sha256 of a file: which input a record was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def provenance(command: str, threads: int | None = None, inputs: dict[str, str] | None = None,
               precision: str = "fp32", native_bf16: bool | None = None) -> dict:
    """Where and how a run was made: the command, the code commit (and whether tracked files differed from
    it), torch's version, the CPU (and whether it has native bf16, as the caller found it:
    ddp.native_bf16_cpu), the thread count (default: OMP_NUM_THREADS, else torch's own), the arithmetic
    (fp32, or bf16 autocast), the date (UTC), and a fingerprint of each input file {name: path}."""
    import torch                                   # here, so that reading records needs no torch
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
    return {"command": command, "commit": _git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "native_bf16": native_bf16, "threads": threads, "precision": precision,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": {name: fingerprint(path) for name, path in sorted((inputs or {}).items())}}


# -----------------------------------------------------------------------------
# Reading and writing records


def write_json(path: str, obj) -> None:
    """An indented JSON file (keys in insertion order), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)       # insertion order: tables keep their rows
        f.write("\n")
    os.replace(path + ".tmp", path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_rows(path: str, rows: list[dict]) -> None:
    """Rows as gzip'd JSON lines (keys sorted, mtime 0 in the header: the same rows give the same bytes),
    written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as f:
        for row in rows:
            f.write((json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n").encode())
    with open(path + ".tmp", "wb") as f:
        f.write(buffer.getvalue())
    os.replace(path + ".tmp", path)


def read_rows(path: str) -> list[dict]:
    """The rows of a records file (or any JSON-lines file, gzip'd or not); a line that is not a JSON object is
    an error naming file and line (data.read_jsonl)."""
    return [row for _, row in data.read_jsonl(path)]


# -----------------------------------------------------------------------------
# Evaluations: a row per question


def error_kind(scores: dict) -> str:
    """right; miss (wrong, and no passage the model's own searches retrieved holds a gold answer); read
    (wrong although one did: the evidence was there)."""
    if scores["em"]:
        return "right"
    return "read" if scores["hit_substr"] else "miss"


def question_rows(trajectories_path: str) -> list[dict]:
    """An evaluation's trajectories.jsonl (arc_eval.evaluate's records) as rows without text: {source, id,
    scores (every ARC score of the trajectory), num_invalid, error (error_kind), and when the evaluation ran
    the probe: probe (its EMs, or None for a question it skipped)}."""
    rows = []
    for record in read_rows(trajectories_path):
        row = {"source": record["data_source"], "id": record["id"], "scores": record["scores"],
               "num_invalid": record["num_invalid"], "error": error_kind(record["scores"])}
        if "probe" in record:
            probe = record["probe"]
            row["probe"] = None if probe is None else {k: probe[k] for k in PROBE_FIELDS if k in probe}
        rows.append(row)
    return rows


def question_means(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{source: {"n", every score's mean, probe_coverage, probe_<field> (over the probed rows)}, "all": …}: the
    per-source means arc_metric.arc_report gives for the same evaluation (columns and values)."""
    def means(group: list[dict]) -> dict[str, float]:
        out = {"n": len(group)}
        for key in group[0]["scores"]:
            out[key] = sum(r["scores"][key] for r in group) / len(group)
        if "probe" in group[0]:                    # the evaluation ran the probe (a None: a skipped question)
            probed = [r["probe"] for r in group if r["probe"] is not None]
            out["probe_coverage"] = len(probed) / len(group)
            for field in PROBE_FIELDS:
                values = [p[field] for p in probed if field in p]
                if values:
                    out[f"probe_{field}"] = sum(values) / len(values)
        return out
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    return {**{source: means(group) for source, group in by_source.items()}, "all": means(rows)}


def paired_scores(first: list[dict], second: list[dict], names: tuple[str, str] = ("first", "second"),
                  key: str = "em") -> tuple[np.ndarray, np.ndarray]:
    """Two evaluations' `key` scores over the same questions, in one order (sorted by (source, id)): arrays of
    shape (N,). Evaluations of other question sets are an error naming both and a question in one only."""
    a = {(r["source"], r["id"]): float(r["scores"][key]) for r in first}
    b = {(r["source"], r["id"]): float(r["scores"][key]) for r in second}
    if a.keys() != b.keys():
        odd = sorted(a.keys() ^ b.keys())[0]
        raise ValueError(f"{names[0]} and {names[1]} were evaluated on other questions ({len(a)} and {len(b)}; "
                         f"{odd} is in one only): a paired comparison needs the same ones")
    keys = sorted(a)
    return np.array([a[k] for k in keys]), np.array([b[k] for k in keys])


# -----------------------------------------------------------------------------
# Runs: what the demo and an RL run leave, as records


def rl_run_record(run_dir: str) -> tuple[dict, list[dict]]:
    """An RL run's settings (train_config.json's config), the checkpoint its validation chose and why, and
    its metrics.jsonl rows (one a step; evaluation rows included), from the run's directory."""
    config = read_json(os.path.join(run_dir, "train_config.json"))
    metrics = read_rows(os.path.join(run_dir, "metrics.jsonl"))
    best = config.get("best")
    summary = {"settings": config["config"], "steps_done": config["step"], "world_size": config.get("world_size"),
               "train_seconds": round(sum(m.get("step_s", 0.0) + m.get("eval_s", 0.0) for m in metrics), 1),
               "chosen": None if best is None else {
                   "step": best["step"], "val_em": best["em"],
                   "rule": "the highest validation EM over the evaluated steps, step 0 (the start) included; "
                           "a tie goes to the earlier step"}}
    return summary, metrics


DEMO_EVALS = {"Student (base)": "student", "Teacher": "teacher", "KD only": "kd", "DGPO": "dgpo"}   # eval/<dir>


def demo_records(run_dir: str, out: str, made: dict) -> None:
    """The default demo's records from its directory: out/run.json (provenance `made`, preset, seconds per
    stage, the tgo counts, the RL run's settings and chosen checkpoint), out/eval/<model>.jsonl.gz (a row per
    test question) and out/rl_metrics.jsonl.gz (the RL stage's rows)."""
    results = read_json(os.path.join(run_dir, "results.json"))
    tgo = read_json(os.path.join(run_dir, "tgo.jsonl.config.json"))
    rl_summary, metrics = rl_run_record(os.path.join(run_dir, "dgpo"))
    with open(os.path.join(run_dir, "oracle.jsonl")) as f:
        oracle = sum(1 for _ in f)
    with open(os.path.join(run_dir, "data", "corpus.jsonl")) as f:
        passages = sum(1 for _ in f)
    write_json(os.path.join(out, "run.json"), {
        "kind": "demo", "made": made, "preset": results["preset"], "seconds": results["seconds"],
        "passages": passages, "oracle_trajectories": oracle,
        "tgo": {"rollouts": tgo["rollouts"], "kept": tgo["kept"]}, "rl": rl_summary,
        "evaluations": {name: f"eval/{short}.jsonl.gz" for name, short in DEMO_EVALS.items()}})
    for short in DEMO_EVALS.values():
        write_rows(os.path.join(out, "eval", f"{short}.jsonl.gz"),
                   question_rows(os.path.join(run_dir, "eval", short, "trajectories.jsonl")))
    write_rows(os.path.join(out, "rl_metrics.jsonl.gz"), metrics)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Records of a finished run, for results/ (see results/README.md).")
    sub = p.add_subparsers(dest="kind", required=True)
    d = sub.add_parser("demo", help="a `python train.py demo` directory")
    d.add_argument("run_dir")
    d.add_argument("--out", required=True, help="the records' directory, e.g. results/demo")
    d.add_argument("--made", help="a provenance JSON written when the run started (default: the run's own "
                                  "provenance.json)")
    args = p.parse_args(argv)
    made_path = args.made or os.path.join(args.run_dir, "provenance.json")
    if not os.path.isfile(made_path):
        sys.exit(f"records.py: {made_path} not found: the run's provenance (written when it started) is needed")
    demo_records(args.run_dir, args.out, read_json(made_path))
    print(f"records of {args.run_dir} -> {args.out}")


if __name__ == "__main__":
    main()
