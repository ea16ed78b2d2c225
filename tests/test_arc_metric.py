"""arc_metric: answer normalisation and scoring, answer extraction, per-trajectory ARC metrics on
hand-written records with hand-computed values, per-source aggregation and the Markdown tables."""
import copy
import dataclasses
import json

import pytest

import arc_metric
import rollout
from arc_metric import (arc_report, answer_em, contains_answer_substr, contains_answer_tokens,
                        exact_match, extract_answer, f1, final_answer, normalize_answer,
                        render_comparison, render_table, score_record, sub_em)

# Search-R1's template (docs/method.md §2), with its example answer.
PROMPT = ("Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
          "you get new information. After reasoning, if you find you lack some knowledge, you can call a search "
          "engine by <search> query </search> and it will return the top searched results between <information> "
          "and </information>. You can search as many times as your want. If you find no further external "
          "knowledge needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
          "illustrations. For example, <answer> Beijing </answer>. Question: What is the capital of China?\n")


# ----------------------------------------------------------------------------- normaliser

@pytest.mark.parametrize("text, expected", [
    ("The Hague", "hague"),
    ("theatre", "theatre"),                      # article letters inside a word stay
    ("another", "another"),
    ("Them and these", "them and these"),
    ("An apple a day", "apple day"),
    ("a a the an", ""),
    ("the-the", "thethe"),                       # punctuation goes first, then it is one word
    ("a-ha", "aha"),
    ("A.I.", "ai"),
    ("3.14", "314"),
    ("1,000", "1000"),
    ("rock 'n' roll", "rock n roll"),
    ("!!!", ""),                                 # punctuation-only
    ("  multiple   spaces\tand\nnewlines ", "multiple spaces and newlines"),
    ("New\u00a0York", "new york"),               # unicode whitespace collapses
    ("Café Müller", "café müller"),              # no accent folding
    ("ÉCOLE", "école"),
    ("théâtre", "théâtre"),                      # \b is unicode-aware: no article found inside
    ("¿Qué?", "¿qué"),                           # ASCII '?' removed, unicode '¿' kept (SQuAD rule)
    ("“Beijing”", "“beijing”"),                  # curly quotes are not string.punctuation
    ("東京", "東京"),
    ("L'Oréal", "loréal"),
])
def test_normalize_answer_follows_squad_rules(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="normalize_answer"):
        normalize_answer(None)


# ----------------------------------------------------------------------------- EM / F1 / sub-EM

# (prediction, golden_answers, em, f1, sub_em), all by hand.
SCORING_CASES = [
    ("Paris", ["paris"], 1, 1, 1),
    ("The Paris", ["Paris"], 1, 1, 1),
    ("the the Eiffel tower!", ["Eiffel Tower"], 1, 1, 1),
    ("theatre", ["the atre"], 0, 0, 1),                  # gold "atre" is a character substring of "theatre"
    ("another", ["other"], 0, 0, 1),
    ("Paris", ["London", "Paris"], 1, 1, 1),              # any gold
    ("Paris", "Paris", 1, 1, 1),                          # gold given as a string
    ("Paris France", ["Paris", "France"], 0, 2 / 3, 1),   # P=1/2, R=1
    ("Barack Obama Jr", ["Barack Obama"], 0, 0.8, 1),     # P=2/3, R=1
    ("Obama", ["Barack Obama"], 0, 2 / 3, 0),             # P=1, R=1/2; gold not inside prediction
    ("Paris Paris", ["Paris"], 0, 2 / 3, 1),              # repeated tokens count once against one gold token
    ("1,000", ["1000"], 1, 1, 1),
    ("New\u00a0York", ["new york"], 1, 1, 1),
    ("Café", ["cafe"], 0, 0, 0),
    ("“Beijing”", ["Beijing"], 0, 0, 1),                  # unicode quotes stay in the token
    ("東京", ["東京"], 1, 1, 1),
    ("", ["Paris"], 0, 0, 0),                             # empty prediction
    ("   ", ["Paris"], 0, 0, 0),
    (None, ["Paris"], 0, 0, 0),                           # no answer
    ("!!!", ["!!!"], 0, 0, 0),                            # punctuation-only normalises to "": no answer
    ("a", ["the"], 0, 0, 0),                              # SQuAD would say 1 ("" == ""); we do not pay for ""
    ("Paris", ["!!!"], 0, 0, 0),                          # an empty gold never matches (sub-EM included)
    ("Paris", ["!!!", "Paris"], 1, 1, 1),
]


@pytest.mark.parametrize("prediction, golds, em, f1_value, sub", SCORING_CASES)
def test_em_f1_subem_on_tricky_cases(prediction, golds, em, f1_value, sub):
    assert exact_match(prediction, golds) == em
    assert f1(prediction, golds) == pytest.approx(f1_value)
    assert sub_em(prediction, golds) == sub


def test_scores_are_floats_and_bad_golds_are_errors():
    assert isinstance(exact_match("Paris", ["Paris"]), float)
    assert exact_match("Paris", ("Paris",)) == 1.0
    with pytest.raises(ValueError, match="golden_answers is empty"):
        exact_match("Paris", [])
    with pytest.raises(TypeError, match="golden_answers"):
        f1("1987", [1987])
    with pytest.raises(TypeError, match="golden_answers"):
        sub_em("Paris", None)
    with pytest.raises(TypeError, match="prediction"):
        exact_match(["Paris"], ["Paris"])


# ----------------------------------------------------------------------------- extract_answer

@pytest.mark.parametrize("response, expected", [
    ("<think> easy </think>\n<answer> Paris </answer>", "Paris"),
    ("<answer>A</answer> later <answer> B </answer>", "B"),              # last of several
    ("<answer> Paris", None),                                            # unclosed
    ("<answer>A</answer> then <answer> B", "A"),                         # unclosed after a complete one
    ("<answer> a <answer> b </answer>", "b"),                            # nested-looking: innermost pair
    ("<answer> x </answer> </answer>", "x"),                             # stray closing tag
    ("</answer> <answer>", None),
    ("<answer>\nNew\nYork\n</answer>", "New\nYork"),                     # multi-line, stripped
    ("<answer></answer>", ""),                                           # complete but empty
    ("<ANSWER>x</ANSWER>", None),                                        # tags are case-sensitive
    ("no tags at all", None),
])
def test_extract_answer_takes_last_complete_answer(response, expected):
    assert extract_answer(response) == expected


def test_template_example_answer_is_found_only_if_the_prompt_is_passed():
    response = "<think> I should look it up </think>\n<search> capital of China </search>"
    assert extract_answer(response) is None
    assert extract_answer(PROMPT + response) == "Beijing"  # why the caller must pass the model's text only
    assert answer_em(response, ["Beijing"]) == 0.0
    assert answer_em(response + "\n<answer> beijing </answer>", ["Beijing"]) == 1.0


@pytest.mark.parametrize("turns, expected", [
    (["<search> x </search>", "<think> y </think><answer> P </answer>"], "P"),
    (["<answer> P </answer>", "<think> out of budget"], "P"),           # the last turn that has one
    (["<answer> P </answer>", "<answer> Q </answer> <answer> R"], "Q"),
    (["<answer> P", " Q </answer>"], None),                             # must open and close in one turn
    (["<search> x </search>", "<think> nothing"], None),
    ([], None),
    ("<think> one text </think><answer> S </answer>", "S"),              # a single model-written str
])
def test_final_answer_reads_the_models_turns(turns, expected):
    assert final_answer(turns) == expected
    assert answer_em(turns, [expected or "P"]) == float(expected is not None)


def test_final_answer_rejects_what_is_not_model_text():
    with pytest.raises(TypeError, match="final_answer"):
        final_answer(None)
    with pytest.raises(TypeError, match="extract_answer"):
        final_answer(["<answer> A </answer>", 3])


# ----------------------------------------------------------------------------- hand-written trajectories

def information(passages):
    """The observation block of docs/method.md §2 for passages "title\ntext"."""
    docs = ""
    for i, passage in enumerate(passages):
        title, text = passage.split("\n", 1)
        docs += f"Doc {i + 1}(Title: {title}) {text}\n"
    return f"\n\n<information>{docs}</information>\n\n"


# rollout.INVALID_ACTION; read as text it holds "<answer> and </answer>"
INVALID = ("\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
           "</search>. If I want to give the final answer, I should put the answer between <answer> and "
           "</answer>. Let me try again.\n")


def make_record(rid, source, golds, turns, observations, queries, passages, num_invalid, n_tokens, prompt_length=10):
    """A record as the stages write it; response_text interleaves turns and observations."""
    response_text = "".join(t + o for t, o in zip(turns, observations + [""] * (len(turns) - len(observations))))
    hits = [[{"id": f"{rid}-{s}-{k}", "contents": contents, "score": 1.0} for k, contents in enumerate(per_search)]
            for s, per_search in enumerate(passages)]
    return {"id": rid, "question": f"question {rid}?", "golden_answers": golds, "data_source": source,
            "input_ids": list(range(n_tokens)), "loss_mask": [0] * prompt_length + [1] * (n_tokens - prompt_length),
            "prompt_length": prompt_length, "response_text": response_text, "turns": turns, "queries": queries,
            "hits": hits, "num_searches": len(queries), "num_invalid": num_invalid, "num_turns": len(turns),
            "answered": final_answer(turns) is not None, "truncated": False, "obs_truncated": False}


def record_a():  # nq: searches once, finds Paris, answers right
    passages = [["France\nThe capital of France is Paris.", "Lyon\nLyon is a city."]]
    return make_record("a", "nq", ["Paris"],
                       ["<think> need to look up </think>\n<search> capital of France </search>",
                        "<think> found it </think>\n<answer> Paris </answer>"],
                       [information(passages[0])], ["capital of France"], passages, num_invalid=0, n_tokens=30)


def record_b():  # hotpotqa: no think, an invalid turn, wrong answer "heart" for gold "Art"
    passages = [["Heart\nThe heart is an organ."]]
    return make_record("b", "hotpotqa", ["Art"],
                       ["I will search <search> painter </search>", "<think> hmm",
                        "  <think> ok </think> <answer> heart </answer>"],
                       [information(passages[0]), INVALID], ["painter"], passages, num_invalid=1, n_tokens=50)


def record_c():  # nq: no search; names the gold in its own thinking, answers wrong
    return make_record("c", "nq", ["Tokyo", "Tokyo, Japan"],
                       ["<think> I know it is Tokyo or Kyoto </think> <answer> Kyoto </answer>"],
                       [], [], [], num_invalid=0, n_tokens=18)


def record_d():  # hotpotqa: two searches, gold found in the first, runs out of turns without answering
    passages = [["Pierre Curie\nPierre Curie married Marie Curie in 1895."], ["Radium\nRadium was discovered."]]
    return make_record("d", "hotpotqa", ["Marie Curie"],
                       ["<think> searching </think> <search> a </search>",
                        "<think> again </think> <search> b </search>", "<think> still"],
                       [information(passages[0]), information(passages[1])], ["a", "b"], passages, num_invalid=1,
                       n_tokens=60)


EXPECTED = {  # per record, by hand
    "a": dict(em=1, f1=1, sub_em=1, has_answer=1, hit_substr=1, hit_token=1, searches=1, has_search=1,
              think_turn_frac=1, invalid_rate=0, response_len_tokens=20, turns=2),
    "b": dict(em=0, f1=0, sub_em=1, has_answer=1, hit_substr=1, hit_token=0, searches=1, has_search=1,
              think_turn_frac=1 / 3, invalid_rate=1 / 3, response_len_tokens=40, turns=3),
    "c": dict(em=0, f1=0, sub_em=0, has_answer=1, hit_substr=0, hit_token=0, searches=0, has_search=0,
              think_turn_frac=1, invalid_rate=0, response_len_tokens=8, turns=1),
    "d": dict(em=0, f1=0, sub_em=0, has_answer=0, hit_substr=1, hit_token=1, searches=2, has_search=1,
              think_turn_frac=2 / 3, invalid_rate=1 / 3, response_len_tokens=50, turns=3),
}


@pytest.mark.parametrize("make", [record_a, record_b, record_c, record_d])
def test_score_record_matches_hand_computed_values(make):
    record = make()
    scores = score_record(record)
    assert list(scores) == list(arc_metric.METRICS)
    assert scores == pytest.approx(EXPECTED[record["id"]])


def test_records_survive_a_json_round_trip():
    record = json.loads(json.dumps(record_b()))
    assert score_record(record) == pytest.approx(EXPECTED["b"])


def test_hit_rules_differ_on_substrings_inside_words():
    passage = "Heart\nThe heart is an organ."
    assert contains_answer_substr(passage, ["Art"]) and not contains_answer_tokens(passage, ["Art"])
    assert contains_answer_tokens("Pierre Curie married Marie Curie.", "marie curie")
    assert not contains_answer_tokens("Marie and Pierre Curie", "marie curie")  # not consecutive tokens
    assert contains_answer_tokens("Marie, the Curie", "marie curie")        # articles are gone after normalising
    assert contains_answer_substr("THE U.S. ARMY", ["us army"])             # both rules normalise case and dots
    assert contains_answer_tokens("THE U.S. ARMY", ["us army"])
    assert not contains_answer_substr("anything at all", ["!!!"])           # an empty gold never hits


def test_hit_ratio_counts_only_the_models_own_retrieved_passages():
    record = record_c()                       # "Tokyo" is in the response text, but nothing was retrieved
    assert "Tokyo" in record["response_text"]
    assert score_record(record)["hit_substr"] == 0.0
    record = record_a()                       # the gold in the observation text is ignored too: hits decide
    record["hits"] = [[{"id": "x", "contents": "Lyon\nLyon is a city.", "score": 1.0}]]
    assert "Paris" in record["response_text"]
    assert score_record(record)["hit_substr"] == 0.0 and score_record(record)["hit_token"] == 0.0


def test_score_record_reads_answers_from_the_models_turns_only(monkeypatch):
    seen = []
    real = arc_metric.extract_answer
    monkeypatch.setattr(arc_metric, "extract_answer", lambda text: seen.append(text) or real(text))
    record = make_record("e", "nq", ["Beijing"], ["<think> no idea </think> <search> China capital </search>"],
                         [information(["Shanghai\nShanghai is a city."])], ["China capital"],
                         [["Shanghai\nShanghai is a city."]], num_invalid=0, n_tokens=25)
    scores = score_record(record)
    assert seen and all(text in record["turns"] for text in seen)
    assert not any("For example" in text or "<information>" in text for text in seen)
    assert scores["has_answer"] == 0.0 and scores["em"] == 0.0  # the template's "Beijing" is never scored


def test_the_invalid_action_nudge_is_never_scored_as_an_answer():
    # Turn 1 is invalid and gets the nudge; turn 2 (the final one) runs out of budget. The nudge text
    # says "... put the answer between <answer> and </answer> ...": parsed from response_text, the
    # trajectory would answer "and".
    record = make_record("f", "nq", ["and"], ["<think> let me see", "<think> still thinking"], [INVALID], [], [],
                         num_invalid=1, n_tokens=40)
    assert extract_answer(record["response_text"]) == "and"          # the trap
    scores = score_record(record)
    assert scores["has_answer"] == 0.0 and scores["em"] == 0.0 and scores["sub_em"] == 0.0
    assert answer_em(record["turns"], ["and"]) == 0.0                # the RL reward follows the same rule
    record["turns"][1] = "<think> ok </think> <answer> And </answer>"
    assert score_record(record)["em"] == 1.0


def test_an_answer_tag_inside_a_retrieved_passage_is_not_the_models_answer():
    passage = "Quiz\nThe solution is written as <answer> Paris </answer> in the quiz book."
    record = make_record("g", "nq", ["Paris"], ["<think> t </think> <search> quiz </search>", "<think> hmm"],
                         [information([passage])], ["quiz"], [[passage]], num_invalid=0, n_tokens=30)
    assert extract_answer(record["response_text"]) == "Paris"
    assert score_record(record)["em"] == 0.0 and score_record(record)["has_answer"] == 0.0
    assert score_record(record)["hit_token"] == 1.0                 # but the passage is a hit


@pytest.mark.parametrize("change, error, message", [
    (lambda r: r.pop("turns"), ValueError, "missing key 'turns'"),
    (lambda r: r.update(num_searches=2), ValueError, "num_searches=2"),
    (lambda r: r.update(num_turns=5), ValueError, "num_turns=5"),
    (lambda r: r.update(hits=[]), ValueError, "0 hit lists for 1 executed queries"),
    (lambda r: r.update(num_invalid=3), ValueError, "num_invalid=3"),
    (lambda r: r.update(prompt_length=31), ValueError, "prompt_length=31"),
    (lambda r: r.update(golden_answers=[]), ValueError, "golden_answers is empty"),
    (lambda r: r.update(turns=[]), ValueError, "'turns' is empty"),
    (lambda r: r.update(turns=["<answer> x </answer>", None]), TypeError, "'turns' must be a list of str"),
    (lambda r: r.update(turns="<answer> x </answer>"), TypeError, "'turns' has type str"),
    (lambda r: r.update(prompt_length=True), TypeError, "'prompt_length' has type bool"),
    (lambda r: r["hits"][0].append({"id": "z"}), TypeError, "'contents'"),
])
def test_bad_records_are_clear_errors_naming_the_record(change, error, message):
    record = record_a()
    change(record)
    with pytest.raises(error, match=message) as info:
        score_record(record)
    assert "id='a'" in str(info.value)


# ----------------------------------------------------------------------------- report per data source

def test_arc_report_on_hand_written_records():
    report = arc_report([record_a(), record_b(), record_c(), record_d()])
    assert list(report) == ["nq", "hotpotqa", "all"]
    assert report["nq"] == pytest.approx(dict(
        n=2, em=0.5, f1=0.5, sub_em=0.5, has_answer=1, hit_substr=0.5, hit_token=0.5, searches=0.5, has_search=0.5,
        think_turn_frac=1, invalid_rate=0, response_len_tokens=14, turns=1.5))
    assert report["hotpotqa"] == pytest.approx(dict(
        n=2, em=0, f1=0, sub_em=0.5, has_answer=0.5, hit_substr=1, hit_token=0.5, searches=1.5, has_search=1,
        think_turn_frac=0.5, invalid_rate=1 / 3, response_len_tokens=45, turns=3))
    assert report["all"] == pytest.approx(dict(
        n=4, em=0.25, f1=0.25, sub_em=0.5, has_answer=0.75, hit_substr=0.75, hit_token=0.5, searches=1, has_search=0.75,
        think_turn_frac=0.75, invalid_rate=1 / 6, response_len_tokens=29.5, turns=2.25))
    assert isinstance(report["all"]["n"], int)


def varied_records(source, count, seed):
    """Records with varied metric values: answer right / wrong / missing, 0–2 searches."""
    records = []
    for k in range(count):
        v = (k * 7 + seed) % 5
        searches = v % 3
        passages = [[f"Entity {k}\nEntity {k} relates to gold{v}."] for _ in range(searches)]
        answer = f"<answer> gold{v} </answer>" if v < 2 else ("<answer> nope </answer>" if v < 4 else "")
        turns = [f"<think> t </think> <search> q{s} </search>" for s in range(searches)]
        turns.append(f"<think> done </think> {answer}")
        records.append(make_record(f"{source}-{k}", source, [f"gold{v if k % 3 else v + 1}"], turns,
                                   [information(p) for p in passages], [f"q{s}" for s in range(searches)], passages,
                                   num_invalid=int(v == 4), n_tokens=20 + 3 * k + v))
    return records


def test_aggregation_per_source_is_independent_of_interleaving_and_earlier_calls():
    nq, hotpot = varied_records("nq", 7, seed=1), varied_records("hotpotqa", 5, seed=3)
    interleaved = [r for pair in zip(nq, hotpot) for r in pair] + nq[len(hotpot):]
    assert len(interleaved) == 12
    snapshot = copy.deepcopy(interleaved)

    alone_nq, alone_hotpot = arc_report(nq), arc_report(hotpot)
    first = arc_report(interleaved)
    arc_report(hotpot)                                  # an unrelated call in between
    second = arc_report(interleaved)

    assert first == second
    assert first["nq"] == alone_nq["nq"] and first["hotpotqa"] == alone_hotpot["hotpotqa"]
    assert len({first["nq"]["em"], first["hotpotqa"]["em"]}) == 2   # the sources really differ
    assert first["all"]["n"] == 12
    for metric in arc_metric.METRICS:                   # "all" is the mean over every trajectory
        expected = (alone_nq["all"][metric] * 7 + alone_hotpot["all"][metric] * 5) / 12
        assert first["all"][metric] == pytest.approx(expected)
    assert interleaved == snapshot                      # records are not modified


def test_missing_data_source_is_default_and_all_is_reserved():
    record = record_a()
    del record["data_source"]
    assert list(arc_report([record])) == ["default", "all"]
    record["data_source"] = "all"
    with pytest.raises(ValueError, match=r"records\[1\].*reserved"):
        arc_report([record_a(), record])
    with pytest.raises(ValueError, match="at least one"):
        arc_report([])


def test_errors_in_a_report_name_the_record_index():
    bad = record_b()
    bad["num_turns"] = 9
    with pytest.raises(ValueError, match=r"records\[2\]: trajectory record id='b'"):
        arc_report([record_a(), record_c(), bad])


def test_probe_results_aggregate_per_source_from_a_list_or_a_dict():
    records = [record_a(), record_b(), record_c(), record_d()]        # nq, hotpotqa, nq, hotpotqa
    as_list = [{"em_no_think": 1, "em_think": 1}, {"em_no_think": 0, "em_think": 1},
               {"em_no_think": 0, "em_think": 0}, {"em_no_think": 0, "em_think": 1, "response": "kept aside"}]
    as_dict = {r["id"]: p for r, p in zip(reversed(records), reversed(as_list))}
    for probe in (as_list, as_dict):
        report = arc_report(records, probe=probe)
        assert report["nq"]["probe_em_no_think"] == 0.5 and report["nq"]["probe_em_think"] == 0.5
        assert report["hotpotqa"]["probe_em_no_think"] == 0.0 and report["hotpotqa"]["probe_em_think"] == 1.0
        assert report["all"]["probe_em_no_think"] == 0.25 and report["all"]["probe_em_think"] == 0.75
        assert report["nq"]["em"] == 0.5                               # the trajectory metrics are unchanged
    assert "probe_em_think" not in arc_report(records)["all"]


def test_skipped_probe_questions_count_in_coverage_not_in_the_probe_means():
    records = [record_a(), record_b(), record_c(), record_d()]        # nq, hotpotqa, nq, hotpotqa
    probe = [{"em_no_think": 1, "em_think": 0}, None, None, None]      # only record a was probed
    report = arc_report(records, probe=probe)
    assert report["nq"]["probe_coverage"] == 0.5 and report["hotpotqa"]["probe_coverage"] == 0.0
    assert report["nq"]["probe_em_no_think"] == 1.0 and report["nq"]["probe_em_think"] == 0.0
    assert "probe_em_think" not in report["hotpotqa"]                  # nothing probed: no mean
    assert report["all"]["probe_coverage"] == 0.25 and report["all"]["probe_em_no_think"] == 1.0
    assert report["all"]["n"] == 4 and report["hotpotqa"]["n"] == 2
    assert arc_report(records, probe={r["id"]: p for r, p in zip(records, probe)}) == report
    table = render_table(report, columns=["n", "probe_coverage", "probe_em_think"])
    assert table.splitlines()[3] == "| hotpotqa | 2 | 0.000 | – |"


@pytest.mark.parametrize("probe, message", [
    ([{"em_no_think": 1, "em_think": 1}], "1 results for 2 records"),
    ({"a": {"em_no_think": 1, "em_think": 1}}, r"no probe result for records\[1\] id='c'"),
    ([{"em_no_think": 1, "em_think": 1}, {"em_think": 1}], "needs 'em_no_think'"),
    ([{"em_no_think": 1, "em_think": 2}, {"em_no_think": 1, "em_think": 1}], "needs 'em_think'"),
])
def test_bad_probe_results_are_clear_errors(probe, message):
    with pytest.raises(ValueError, match=message):
        arc_report([record_a(), record_c()], probe=probe)


# ----------------------------------------------------------------------------- tables

def test_render_table_lays_out_sources_by_metrics_with_three_decimals():
    report = arc_report([record_a(), record_b(), record_c(), record_d()])
    table = render_table(report, columns=["n", "em", "hit_substr", "invalid_rate"], title="Student")
    assert table == "\n".join([
        "**Student**",
        "",
        "| source | n | em | hit_substr | invalid_rate |",
        "|---|---:|---:|---:|---:|",
        "| nq | 2 | 0.500 | 0.500 | 0.000 |",
        "| hotpotqa | 2 | 0.000 | 1.000 | 0.333 |",
        "| all | 4 | 0.250 | 0.750 | 0.167 |",
    ])
    default = render_table(report)
    assert default.splitlines()[0] == "| source | n | " + " | ".join(arc_metric.METRICS) + " |"
    with_probe = render_table(arc_report([record_a()], probe=[{"em_no_think": 0, "em_think": 1}]))
    assert with_probe.splitlines()[0].endswith("| turns | probe_coverage | probe_em_no_think | probe_em_think |")
    with pytest.raises(ValueError, match="'probe_em_think'"):
        render_table(report, columns=["em", "probe_em_think"])


def test_render_comparison_uses_the_papers_unweighted_average():
    # Teacher: nq EM 1 on 1 record, hotpotqa EM 0 on 3 -> "all" 0.25 but the paper's Avg is 0.5.
    teacher = arc_report([record_a(), record_b(), record_d(), record_b()])
    student = arc_report([record_c(), record_b()])
    assert teacher["all"]["em"] == 0.25
    table = render_comparison({"Teacher": teacher, "Student": student}, metric="em")
    assert table.splitlines() == [
        "| method | nq | hotpotqa | Avg |",
        "|---|---:|---:|---:|",
        "| Teacher | 1.000 | 0.000 | 0.500 |",
        "| Student | 0.000 | 0.000 | 0.000 |",
    ]
    only_nq = arc_report([record_a()])
    partial = render_comparison({"KD": only_nq}, metric="hit_token", sources=["hotpotqa", "nq"], title="Hit")
    assert partial.splitlines()[-1] == "| KD | – | 1.000 | – |"
    assert partial.startswith("**Hit**\n")


# ----------------------------------------------------------------------------- the official DGPO code's proxies

# The decoded prompt as the official code decodes it: the chat template's special tokens kept.
CHAT_PROMPT = "<|im_start|>user\n" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n"


def with_prompt(record, prompt=CHAT_PROMPT):
    return {**record, "prompt_text": prompt}


def test_dgpo_search_count_is_every_search_tag_of_prompt_and_response_minus_one():
    assert arc_metric.dgpo_search_count(CHAT_PROMPT) == 0                    # the prompt's example is the -1
    assert arc_metric.dgpo_search_count(CHAT_PROMPT + "<search> a </search>" + INVALID) == 2   # a nudge is one
    # record b: one executed search, then an invalid turn whose nudge also says "<search>"
    scores = score_record(with_prompt(record_b()))
    assert scores["searches"] == 1 and scores["dgpo_search_count"] == 2 and scores["dgpo_search_present"] == 1
    # a search in the final turn is never executed (no observation), but it is in the text
    final = make_record("s", "nq", ["Paris"], ["<search> capital </search>", "<think> t </think> <search> again </search>"],
                        [information(["France\nParis."])], ["capital"], [["France\nParis."]], num_invalid=0, n_tokens=30)
    scores = score_record(with_prompt(final))
    assert scores["searches"] == 1 and scores["dgpo_search_count"] == 2
    # an invalid turn alone is "search present" there, and no search here
    nudged = make_record("n", "nq", ["Paris"], ["<think> hmm", "<answer> Paris </answer>"], [INVALID], [], [],
                         num_invalid=1, n_tokens=20)
    scores = score_record(with_prompt(nudged))
    assert scores["has_search"] == 0 and scores["dgpo_search_count"] == 1 and scores["dgpo_search_present"] == 1


def test_dgpo_info_contains_answer_is_a_raw_case_sensitive_substring_of_any_information_block():
    observation = information(["France\nThe capital of France is Paris."])
    text = CHAT_PROMPT + "<search> capital </search>" + observation
    assert arc_metric.dgpo_info_contains_answer(text, ["Paris"])
    assert not arc_metric.dgpo_info_contains_answer(text, ["paris"])            # case-sensitive
    assert contains_answer_substr("The capital of France is Paris.", ["paris"])   # ours normalises
    assert arc_metric.dgpo_info_contains_answer(text, ["and"])                  # the prompt's "<information> and </information>"
    assert arc_metric.dgpo_info_contains_answer(CHAT_PROMPT, ["an"])            # ... even with no search at all
    assert arc_metric.dgpo_info_contains_answer(text, ["1"])                    # the "Doc 1(Title:" header
    assert arc_metric.dgpo_info_contains_answer(text, ["Title"])
    assert not arc_metric.dgpo_info_contains_answer(text, [" ", "Lyon"])        # a blank gold is skipped
    own = CHAT_PROMPT + "<think> <information> Lyon </information> </think>"  # a block the model wrote
    assert arc_metric.dgpo_info_contains_answer(own, ["Lyon"])
    assert arc_metric.dgpo_info_contains_answer("<INFORMATION id=1>Lyon</Information>", "Lyon")   # tags: any case


def test_dgpo_proxies_and_this_projects_hit_ratio_differ_on_the_same_records():
    record = with_prompt(make_record("h", "nq", ["1"], ["<search> numbers </search>", "<answer> 2 </answer>"],
                                     [information(["Lyon\nLyon is a city."])], ["numbers"], [["Lyon\nLyon is a city."]],
                                     num_invalid=0, n_tokens=30))
    scores = score_record(record)
    assert scores["dgpo_info_contains_answer"] == 1 and scores["hit_substr"] == 0   # only the header holds "1"
    record = with_prompt(record_c())                     # no search; "Tokyo" only in the model's own thinking
    assert score_record(record)["dgpo_info_contains_answer"] == 0 and score_record(record)["hit_substr"] == 0


def test_dgpo_proxies_are_extra_columns_only_for_records_with_the_decoded_prompt():
    assert list(score_record(record_a())) == list(arc_metric.METRICS)
    scores = score_record(with_prompt(record_a()))
    assert list(scores) == list(arc_metric.METRICS) + list(arc_metric.DGPO_PROXIES)
    assert {k: scores[k] for k in arc_metric.METRICS} == score_record(record_a())   # ours are unchanged
    report = arc_report([with_prompt(r) for r in (record_a(), record_b(), record_c(), record_d())])
    # by hand: a 1 search; b 1 + a nudge; c none; d 2 (its invalid turn has no nudge in its text)
    assert report["nq"]["dgpo_search_count"] == pytest.approx(0.5) and report["hotpotqa"]["dgpo_search_count"] == 2
    assert report["all"]["dgpo_search_present"] == 0.75
    assert report["nq"]["dgpo_info_contains_answer"] == 0.5       # a: "Paris" in its block; c: only the prompt's
    header = render_table(report).splitlines()[0]
    assert header == "| source | n | " + " | ".join(arc_metric.METRICS + arc_metric.DGPO_PROXIES) + " |"
    with pytest.raises(TypeError, match="'prompt_text' has type list"):
        score_record(with_prompt(record_a(), prompt=["not", "decoded"]))


# ----------------------------------------------------------------------------- Search-R1's answer rule, a known fault

def search_r1_extract_and_em(decoded_prompt_and_response: str, golden_answers: list[str]) -> tuple[str | None, int]:
    """A RE-IMPLEMENTATION, for this test only, of Search-R1's reward rule as read in its
    verl/utils/reward_score/qa_em.py (byte-identical in the official DGPO code): extract_solution
    (lines 62-82) takes the matches of <answer>(.*?)</answer> (DOTALL) in the decoded prompt +
    response, returns None for 0 or 1 match, else the last match stripped; compute_score_em (85-110)
    scores 0 for None, else em_check (36-46): SQuAD-normalised equality with some gold."""
    import re
    matches = re.findall(r"<answer>(.*?)</answer>", decoded_prompt_and_response, re.DOTALL)
    if len(matches) <= 1:
        return None, 0
    answer = matches[-1].strip()
    return answer, int(any(normalize_answer(answer) == normalize_answer(g) for g in golden_answers))


def test_search_r1s_rule_pays_the_prompts_example_and_reads_the_nudge_where_ours_finds_no_answer():
    """The prompt itself holds two <answer> matches ("inside <answer> and </answer>" and "<answer>
    Beijing </answer>"), so "at least two matches" is always met by the prompt alone."""
    # 1. no answer at all: theirs extracts the prompt's example and pays EM 1 for the gold "Beijing"
    silent = make_record("x", "nq", ["Beijing"], ["<think> I do not know. </think>"], [], [], [], num_invalid=0,
                         n_tokens=20)
    assert search_r1_extract_and_em(CHAT_PROMPT + silent["response_text"], ["Beijing"]) == ("Beijing", 1)
    assert final_answer(silent["turns"]) is None and score_record(silent)["em"] == 0
    # 2. after an invalid turn's nudge and a final turn without an answer: theirs extracts "and"
    nudged = make_record("y", "nq", ["and"], ["<think> hmm", "<think> still thinking"], [INVALID], [], [],
                         num_invalid=1, n_tokens=40)
    assert search_r1_extract_and_em(CHAT_PROMPT + nudged["response_text"], ["and"]) == ("and", 1)
    assert search_r1_extract_and_em(CHAT_PROMPT + nudged["response_text"], ["Paris"]) == ("and", 0)
    assert final_answer(nudged["turns"]) is None and score_record(nudged)["em"] == 0
    # 3. a real answer: both rules agree
    answered = make_record("z", "nq", ["Paris"], ["<think> ok </think> <answer> Paris </answer>"], [], [], [],
                           num_invalid=0, n_tokens=20)
    assert search_r1_extract_and_em(CHAT_PROMPT + answered["response_text"], ["Paris"]) == ("Paris", 1)
    assert score_record(answered)["em"] == 1



@dataclasses.dataclass
class _Trajectory:                 # the fields of rollout.Trajectory this needs, without importing torch
    question: str
    response_text: str
    turns: list


def test_scored_records_carry_the_question_the_trajectory_and_em_on_the_models_own_turns():
    right = _Trajectory("q1", "<answer> Paris </answer>", ["<answer> Paris </answer>"])
    nudged = _Trajectory("q2", "put the answer between <answer> and </answer>", ["no answer"])
    questions = [{"id": "a", "question": "q1", "golden_answers": ["Paris"], "data_source": "nq", "extra": 1},
                 {"id": "b", "question": "q2", "golden_answers": ["and"], "data_source": "nq", "extra": 2}]
    full = arc_metric.scored_records(questions, [right, nudged])
    assert [r["em"] for r in full] == [1.0, 0.0]                      # the nudge's text is not the model's answer
    assert full[0]["extra"] == 1 and full[0]["turns"] == right.turns and list(full[0])[-1] == "em"
    picked = arc_metric.scored_records(questions, [right, nudged], keys=("id", "question"))
    assert list(picked[0])[:2] == ["id", "question"] and "extra" not in picked[0] and "data_source" not in picked[0]


def test_trajectory_fields_equal_asdict_and_share_no_list_with_the_trajectory():
    t = rollout.Trajectory(question="q", input_ids=[5, 6, 7], loss_mask=[0, 1, 1], prompt_length=1,
                           turns=["<search> a </search>"], queries=["a"], hits=[[{"id": "1", "contents": "x"}]],
                           num_searches=1)
    got = arc_metric.trajectory_fields(t)
    assert got == dataclasses.asdict(t)
    got["input_ids"].append(9)
    got["hits"][0][0]["id"] = "changed"
    assert t.input_ids == [5, 6, 7] and t.hits[0][0]["id"] == "1"
