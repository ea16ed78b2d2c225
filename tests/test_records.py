"""records.py: a finished run's records carry what its reports say — the same per-source means as
arc_metric.arc_report, the same per-question EM, the run's settings and chosen checkpoint — in byte-stable
files without any model text."""
import gzip
import json
import os

import numpy as np
import pytest

import arc_eval
import ddp
import records
import render
import train


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The small preset's demo chain (plumbing, not learning: ~20 s) and its records."""
    root = tmp_path_factory.mktemp("demo")
    run, out = str(root / "run"), str(root / "records")
    train.run_demo("small", run, ddp.Dist())
    records.main(["demo", run, "--out", out])
    return run, out


def test_question_means_equal_the_evaluations_own_arc_report(small_demo):
    run, out = small_demo
    for name in ("student", "teacher", "kd", "dgpo"):
        report = json.load(open(os.path.join(run, "eval", name, "report.json")))["report"]
        rows = records.read_rows(os.path.join(out, "eval", f"{name}.jsonl.gz"))
        means = records.question_means(rows)
        assert list(means) == list(report)                      # the sources in the report's order
        for source in report:
            assert means[source].keys() == report[source].keys(), (name, source)
            for key, value in report[source].items():
                assert means[source][key] == pytest.approx(value, abs=1e-12), (name, source, key)


def test_rows_keep_each_questions_em_and_no_text(small_demo):
    run, out = small_demo
    em = arc_eval.per_question_em(os.path.join(run, "eval", "kd", "trajectories.jsonl"))
    rows = records.read_rows(os.path.join(out, "eval", "kd.jsonl.gz"))
    assert {(r["source"], r["id"]): r["scores"]["em"] for r in rows} == em
    assert {"turns", "response_text", "input_ids", "question", "golden_answers"}.isdisjoint(rows[0])
    assert set(rows[0]["probe"]) <= set(records.PROBE_FIELDS)
    assert all(r["error"] == records.error_kind(r["scores"]) for r in rows)


def test_the_run_record_has_provenance_settings_and_the_chosen_checkpoint(small_demo):
    run, out = small_demo
    record = records.read_json(os.path.join(out, "run.json"))
    made = record["made"]
    assert made["command"] == f"python train.py demo --preset small --out {run}"
    assert len(made["commit"]) == 40 and made["torch"] and made["cpu"] and made["threads"] >= 1
    assert record["preset"] == "small" and record["seconds"]["total"] > 0
    config = json.load(open(os.path.join(run, "dgpo", "train_config.json")))
    assert record["rl"]["settings"] == config["config"]
    assert record["rl"]["chosen"]["step"] == config["best"]["step"]
    assert list(record["evaluations"]) == ["Student (base)", "Teacher", "KD only", "DGPO"]
    metrics = [json.loads(line) for line in open(os.path.join(run, "dgpo", "metrics.jsonl"))]
    assert records.read_rows(os.path.join(out, "rl_metrics.jsonl.gz")) == metrics


def test_records_are_byte_stable_and_a_bad_line_is_named(tmp_path):
    rows = [{"b": 1, "a": [0.5, None]}, {"c": "x"}]
    first, second = str(tmp_path / "1.jsonl.gz"), str(tmp_path / "2.jsonl.gz")
    records.write_rows(first, rows)
    records.write_rows(second, rows)
    assert open(first, "rb").read() == open(second, "rb").read()
    assert records.read_rows(first) == rows
    with gzip.open(second, "wt") as f:
        f.write('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"2\.jsonl\.gz:2: not valid JSON"):
        records.read_rows(second)


def test_paired_scores_line_questions_up_and_refuse_other_question_sets():
    def row(source, qid, em):
        return {"source": source, "id": qid, "scores": {"em": em}}
    a = [row("s", "2", 1.0), row("s", "1", 0.0)]
    b = [row("s", "1", 1.0), row("s", "2", 1.0)]
    x, y = records.paired_scores(a, b)
    assert x.tolist() == [0.0, 1.0] and y.tolist() == [1.0, 1.0]      # sorted by (source, id)
    with pytest.raises(ValueError, match=r"kd and dgpo were evaluated on other questions .*'3'"):
        records.paired_scores(a, b + [row("s", "3", 0.0)], ("kd", "dgpo"))
    assert isinstance(x, np.ndarray)


def test_a_run_without_its_provenance_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit, match="provenance.json not found"):
        records.main(["demo", str(tmp_path), "--out", str(tmp_path / "out")])


def test_the_rendered_demo_tables_are_what_the_run_printed(small_demo, capsys):
    run, out = small_demo
    d = render.Demo(out)
    names = {"Student (base)": "student", "Teacher": "teacher", "KD only": "kd", "DGPO": "dgpo"}
    reports = {name: json.load(open(os.path.join(run, "eval", short, "report.json")))["report"]
               for name, short in names.items()}
    printed = arc_eval.comparison_tables(reports, split="the demo test split")
    assert render.demo_em_table(d) in printed
    probe_table = render.demo_tables(d).split("\n\nARC")[0]
    assert probe_table in printed
