"""render.py: every page's rendered blocks are the render of the committed records, a changed record
changes a page, no measured figure stands outside a rendered block or a labelled one, and the
comparisons are the ones stats defines."""
import os
import shutil

import numpy as np
import pytest

import records
import render
import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")


def test_every_committed_page_is_the_render_of_the_committed_records(capsys):
    assert os.path.isfile(os.path.join(RESULTS, "demo", "run.json"))
    assert os.path.isfile(os.path.join(RESULTS, "rl_answer", "run.json"))
    assert render.main(["--check"]) == 0, capsys.readouterr().err
    rendered = render.blocks(RESULTS)
    for page in render.PAGES:              # and every block a page marks has records behind it
        text = open(os.path.join(ROOT, page)).read()
        for name in set(m.group(1) for m in render.MARKER.finditer(text)):
            assert name in rendered, (page, name)


def test_a_changed_record_makes_the_check_fail_naming_the_page(tmp_path, capsys):
    changed = tmp_path / "results"
    shutil.copytree(RESULTS, changed)
    path = changed / "rl_answer" / "kd.jsonl.gz"
    rows = records.read_rows(str(path))
    wrong = next(r for r in rows if r["scores"]["em"] == 0.0)
    wrong["scores"]["em"] = 1.0                                 # one question of the KD student flipped
    records.write_rows(str(path), rows)
    assert render.main(["--check", "--results", str(changed)]) == 1
    err = capsys.readouterr().err
    assert "README.md" in err and "docs/rl_settings.md" in err


def test_a_measured_figure_outside_a_rendered_or_labelled_block_is_named():
    page = ("Intro 0.281 typed.\n"
            "<!-- render:x begin -->\nrendered 0.300\n<!-- render:x end -->\n"
            "<!-- unrecorded begin -->\n*Records not kept: old; re-made by `cmd`.*\n\nold 0.616\n<!-- unrecorded end -->\n"
            "torch 2.13.0, arXiv 2508.20324, lr 3e-4, T 1.0 are no measurements.\n"
            "<!-- unrecorded begin -->\nno label 0.5\n<!-- unrecorded end -->\n")
    assert render.unlabelled_numbers(page, "p.md") == [
        "p.md:1: Intro 0.281 typed.", "p.md:12: an unrecorded region must open with 'Records not kept'"]


def test_render_page_replaces_each_block_and_refuses_a_block_without_records_or_end():
    text = "a\n<!-- render:one begin -->\nold\n<!-- render:one end -->\nb\n"
    assert render.render_page(text, {"one": "new"}) == "a\n<!-- render:one begin -->\nnew\n<!-- render:one end -->\nb\n"
    with pytest.raises(ValueError, match="'one' has no records"):
        render.render_page(text, {})
    with pytest.raises(ValueError, match="'two' has no end marker"):
        render.render_page("<!-- render:two begin -->\n", {"two": "x"})


def test_paired_gives_both_intervals_pooled_and_the_discordant_convention_per_run():
    rng = np.random.default_rng(1)
    y = (rng.random((3, 300)) < 0.3).astype(float)              # Y: e.g. the KD student, per seed
    x = np.where(rng.random((3, 300)) < 0.1, 1.0, y)             # X: right on ~7% more
    pooled = render.paired(x, y)
    assert pooled["questions"] == stats.paired_difference(y, x) and pooled["seeds"] == stats.seed_interval(y, x)
    assert pooled["questions"]["diff"] == pytest.approx((x - y).mean())
    one = render.paired(x[0], y[0])
    assert one["seeds"] is None
    assert (one["only_x"], one["only_y"]) == (int(((x[0] == 1) & (y[0] == 0)).sum()), 0)
    assert one["p"] == stats.mcnemar_exact(y[0], x[0])
