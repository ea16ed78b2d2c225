"""Control: does grouping batches by length change the KD student? The demo's KD stage again, from a
finished demo's base student, teacher and tgo trajectories, with --length-buckets N (1: the old order),
then its test evaluation; the records go to --records DIR/b<N>.jsonl.gz with run.json beside them.

Two such runs side by side, one thread each, differ only in the data order:

    OMP_NUM_THREADS=1 python bench/kd_bucketing.py --run runs/demo --buckets 1 --out runs/kd_b1 --records results/kd_bucketing &
    OMP_NUM_THREADS=1 python bench/kd_bucketing.py --run runs/demo --buckets 16 --out runs/kd_b16 --records results/kd_bucketing
"""
import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import ddp  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
import records  # noqa: E402
import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a finished default demo (its base, teacher, tgo.jsonl, tokenizer)")
    p.add_argument("--buckets", type=int, required=True, help="the KD stage's length_buckets")
    p.add_argument("--out", required=True, help="where the KD student and its evaluation go")
    p.add_argument("--records", required=True, help="records folder: b<N>.jsonl.gz and run.json")
    args = p.parse_args()
    for need in ("base", "teacher", "tgo.jsonl", "tokenizer"):
        if not os.path.exists(os.path.join(args.run, need)):
            raise SystemExit(f"--run {args.run}: no {need} (a finished default demo has it)")
    made = records.provenance("python bench/kd_bucketing.py " + shlex.join(sys.argv[1:]))
    t0 = time.time()
    preset = train.PRESETS["default"]()
    w = train.demo_world(preset, tempfile.mkdtemp())
    w = dataclasses.replace(w, tokenizer=models.load_tokenizer(os.path.join(args.run, "tokenizer")))
    dist = ddp.Dist()
    tgo = data.load_trajectories(os.path.join(args.run, "tgo.jsonl"), vocab_size=len(w.tokenizer),
                                 tokenizer_fingerprint=data.vocab_fingerprint(w.tokenizer))
    student = models.load_model(os.path.join(args.run, "base"), dist, trainable=True)
    teacher = models.load_model(os.path.join(args.run, "teacher"), dist, trainable=False).eval().requires_grad_(False)
    cfg = dataclasses.replace(preset.kd, length_buckets=args.buckets)
    train.cold_start(w, student, teacher, tgo, cfg, dist, loop.Run(os.path.join(args.out, "kd")))
    report = train.evaluate_on_test(w, os.path.join(args.out, "kd"), preset, dist, os.path.join(args.out, "eval"))
    name = f"b{args.buckets}"
    records.write_rows(os.path.join(args.records, f"{name}.jsonl.gz"),
                       records.question_rows(os.path.join(args.out, "eval", "trajectories.jsonl")))
    path = os.path.join(args.records, "run.json")
    run = records.read_json(path) if os.path.isfile(path) else {"kind": "kd_bucketing", "arms": {}}
    run["arms"][name] = {"made": made, "length_buckets": args.buckets, "kd": dataclasses.asdict(cfg),
                         "demo": records.read_json(os.path.join(args.run, "provenance.json")),
                         "seconds": round(time.time() - t0, 1)}
    records.write_json(path, run)
    print(f"{name}: test EM {report['all']['em']:.3f} -> {args.records}")


if __name__ == "__main__":
    main()
