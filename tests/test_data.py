"""data: the question and trajectory loaders reject every kind of malformed line, naming the file and
the line (or Parquet row); FlashRAG / Search-R1 rows load as they are, from JSONL, gzip or Parquet;
a question is identified by (data_source, id); write_jsonl round-trips (plain or gzip) and is atomic;
trajectories made with another tokenizer are refused by fingerprint."""
import dataclasses
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings

import pytest

import data
import demo
import retriever
from arc_metric import exact_match
from data import load_questions, load_trajectories, read_jsonl, write_jsonl

GOOD_QUESTION = {"id": "q1", "question": "Who founded Velmor Works?", "golden_answers": ["Ana Brel"],
                 "data_source": "demo"}
# prompt = ids[:2], response = ids[2:], the model sampled the last two tokens
GOOD_TRAJECTORY = {"question": "Who founded Velmor Works?", "golden_answers": ["Ana Brel"],
                   "response_text": "<answer> Ana Brel </answer>", "input_ids": [5, 6, 7, 8],
                   "loss_mask": [0, 0, 1, 1], "prompt_length": 2}


def write_lines(path, lines) -> str:
    """Writes raw text lines (no JSON encoding: some of them are deliberately broken)."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def where(path: str, line_no: int) -> str:
    """The `file:line:` prefix every loader error starts with, as a regex."""
    return "^" + re.escape(f"{path}:{line_no}:")


# ----------------------------------------------------------------------------- questions: bad lines

BAD_QUESTION_LINES = [  # (line 3 of the file, words the error must contain)
    ('{"question": "Who founded X?", "golden_answers": ["a"]', "not valid JSON"),
    ("not json at all", "not valid JSON"),
    ('["Who founded X?", ["a"]]', "expected a JSON object, got list"),
    ('"Who founded X?"', "expected a JSON object, got str"),
    ("42", "expected a JSON object, got int"),
    ("null", "expected a JSON object, got NoneType"),
    ('{"golden_answers": ["a"]}', "'question' must be a non-empty string"),
    ('{"question": "", "golden_answers": ["a"]}', "'question' must be a non-empty string"),
    ('{"question": "  \\t ", "golden_answers": ["a"]}', "'question' must be a non-empty string"),
    ('{"question": 7, "golden_answers": ["a"]}', "'question' must be a non-empty string"),
    ('{"question": "Who founded X?"}', "'golden_answers' must be a non-empty list of strings"),
    ('{"question": "Who founded X?", "golden_answers": []}', "'golden_answers' must be a non-empty list"),
    ('{"question": "Who founded X?", "golden_answers": null}', "'golden_answers' must be a non-empty list"),
    ('{"question": "Who founded X?", "golden_answers": [1]}', "'golden_answers' must be a non-empty list"),
    ('{"question": "Who founded X?", "golden_answers": ["a", null]}', "'golden_answers' must be a non-empty"),
    ('{"question": "Who founded X?", "golden_answers": {"a": 1}}', "'golden_answers' must be a non-empty"),
    ('{"question": "Who founded X?", "golden_answers": ["a"], "data_source": ""}',
     "'data_source' must be a non-empty string"),
    ('{"question": "Who founded X?", "golden_answers": ["a"], "data_source": 3}',
     "'data_source' must be a non-empty string"),
    ('{"question": "Who founded X?", "golden_answers": ["a"], "data_source": null}',
     "'data_source' must be a non-empty string"),
    ('{"question": "Who founded X?", "golden_answers": ["a"], "id": null}',      # not the id "None"
     "'id' must be a non-empty string or an integer, got None"),
    ('{"question": "Who founded X?", "golden_answers": ["a"], "id": ""}', "'id' must be a non-empty string"),
    ('{"question": "Who founded X?", "golden_answers": ["a"], "id": true}', "'id' must be a non-empty string"),
    ('{"question": "Who founded X?", "golden_answers": ["a"], "id": ["q1"]}', "'id' must be a non-empty string"),
]


@pytest.mark.parametrize("bad_line, message", BAD_QUESTION_LINES)
def test_malformed_question_line_fails_naming_file_and_line(tmp_path, bad_line, message):
    # a good line, a blank line (skipped, but it still counts in the numbering), then the bad line
    path = write_lines(tmp_path / "nq_dev.jsonl", [json.dumps(GOOD_QUESTION), "", bad_line])
    with pytest.raises(ValueError, match=where(path, 3)) as error:
        load_questions(path)
    assert message in str(error.value)


def test_duplicate_question_id_names_both_lines(tmp_path):
    again = {**GOOD_QUESTION, "question": "Where is Velmor Works headquartered?"}
    path = write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD_QUESTION), "", "", json.dumps(again)])
    with pytest.raises(ValueError, match=where(path, 4) +
                       r" duplicate id 'q1' in data_source 'demo' \(first on line 1\)"):
        load_questions(path)


def test_filled_in_id_that_collides_with_an_explicit_id_is_a_duplicate(tmp_path):
    # line 1 has no id, so it becomes "q-1"; line 2 claims "q-1" explicitly
    no_id = {k: v for k, v in GOOD_QUESTION.items() if k != "id"}
    path = write_lines(tmp_path / "q.jsonl", [json.dumps(no_id), json.dumps({**GOOD_QUESTION, "id": "q-1"})])
    with pytest.raises(ValueError, match=where(path, 2) + " duplicate id 'q-1'"):
        load_questions(path)


def test_line_that_is_not_utf8_fails_naming_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD_QUESTION).encode() + b"\n"
                     + b'{"question": "Caf\xe9?", "golden_answers": ["a"]}\n')
    with pytest.raises(ValueError, match=where(str(path), 2) + " not valid UTF-8"):
        load_questions(str(path))


def test_missing_file_is_a_clear_error_naming_the_path(tmp_path):
    path = str(tmp_path / "no_such_dir" / "train.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        load_questions(path)
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        load_trajectories(path)


@pytest.mark.parametrize("lines", [[], ["", "   ", "\t"]])
def test_file_without_rows_is_an_error_naming_the_file(tmp_path, lines):
    path = write_lines(tmp_path / "empty.jsonl", lines)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: the file has no rows")):
        load_questions(path)


# ----------------------------------------------------------------------------- questions: good lines

def test_blank_lines_are_skipped_and_rows_keep_their_order(tmp_path):
    rows = [{**GOOD_QUESTION, "id": f"q{i}", "question": f"Question {i}?"} for i in range(3)]
    lines = ["", json.dumps(rows[0]), "   ", "", json.dumps(rows[1]), "\t", json.dumps(rows[2]), ""]
    path = write_lines(tmp_path / "q.jsonl", lines)
    assert load_questions(path) == rows


def test_crlf_line_endings_load(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(json.dumps(GOOD_QUESTION).encode() + b"\r\n\r\n")
    assert load_questions(str(path)) == [GOOD_QUESTION]


def test_flashrag_rows_load_as_they_are(tmp_path):
    # FlashRAG's converted NQ: a string id, golden_answers sometimes a bare string, extra keys
    rows = [
        {"id": "test_0", "question": "who got the first nobel prize in physics",
         "golden_answers": ["Wilhelm Conrad Röntgen"], "metadata": {"dataset": "nq", "split": "test"}},
        {"id": "test_1", "question": "when is the next deadpool movie being released",
         "golden_answers": "May 18, 2018", "metadata": {}},
        {"id": 17, "question": "where is zimbabwe located in the world map",
         "golden_answers": ["in southern Africa", "between the Zambezi and Limpopo Rivers"],
         "data_source": "nq", "supporting_ids": ["12", "40"]},
    ]
    path = write_lines(tmp_path / "nq_test.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    loaded = load_questions(path)
    assert [q["id"] for q in loaded] == ["test_0", "test_1", "17"]
    assert loaded[0]["golden_answers"] == ["Wilhelm Conrad Röntgen"]
    assert loaded[1]["golden_answers"] == ["May 18, 2018"]          # a bare string becomes a list
    assert loaded[0]["metadata"] == {"dataset": "nq", "split": "test"}  # extra keys are kept
    assert loaded[2]["supporting_ids"] == ["12", "40"]
    assert [q["data_source"] for q in loaded] == ["nq_test", "nq_test", "nq"]


def test_missing_id_and_data_source_are_filled_from_file_stem_and_line(tmp_path):
    bare = {"question": "Who founded Velmor Works?", "golden_answers": ["Ana Brel"]}
    path = write_lines(tmp_path / "hotpotqa_dev.jsonl", ["", json.dumps(bare), json.dumps({**bare, "id": "x"})])
    first, second = load_questions(path)
    assert first["id"] == "hotpotqa_dev-2"             # the physical line number, blank lines counted
    assert first["data_source"] == "hotpotqa_dev"
    assert second["id"] == "x" and second["data_source"] == "hotpotqa_dev"
    assert first["question"] == bare["question"] and first["golden_answers"] == bare["golden_answers"]


def test_loader_does_not_change_question_text(tmp_path):
    # no "?" added, no stripping: formatting the question is the prompt's job (rollout.format_question)
    row = {**GOOD_QUESTION, "question": "  who founded velmor works "}
    path = write_lines(tmp_path / "q.jsonl", [json.dumps(row)])
    assert load_questions(path)[0]["question"] == "  who founded velmor works "


# ----------------------------------------------------------------------------- trajectories

def change(**fields) -> dict:
    return {**GOOD_TRAJECTORY, **fields}


BAD_TRAJECTORIES = [  # (row on line 2, words the error must contain)
    (change(input_ids=[5, 6, 7]), "'loss_mask' must be a list of 0/1 as long as input_ids (3)"),
    (change(loss_mask=[0, 0, 1]), "'loss_mask' must be a list of 0/1 as long as input_ids (4)"),
    (change(loss_mask=[0, 0, 1, 2]), "'loss_mask' must be a list of 0/1"),
    (change(loss_mask=[0, 0, 1, -1]), "'loss_mask' must be a list of 0/1"),
    (change(loss_mask=[0, 0, 0.5, 1]), "'loss_mask' must be a list of 0/1"),
    (change(loss_mask=[0, 0, "1", 1]), "'loss_mask' must be a list of 0/1"),
    (change(loss_mask="0011"), "'loss_mask' must be a list of 0/1"),
    (change(prompt_length=0), "'prompt_length' must be an int in 1..4"),
    (change(prompt_length=5), "'prompt_length' must be an int in 1..4"),
    (change(prompt_length=-2), "'prompt_length' must be an int in 1..4"),
    (change(prompt_length=2.0), "'prompt_length' must be an int in 1..4"),
    (change(prompt_length="2"), "'prompt_length' must be an int in 1..4"),
    (change(loss_mask=[0, 1, 1, 1]), "loss_mask is 1 inside the prompt"),
    (change(loss_mask=[1, 0, 0, 0]), "loss_mask is 1 inside the prompt"),
    (change(input_ids=[]), "'input_ids' must be a non-empty list of non-negative ints"),
    (change(input_ids=[5, -6, 7, 8]), "'input_ids' must be a non-empty list of non-negative ints"),
    (change(input_ids=[5, 6.0, 7, 8]), "'input_ids' must be a non-empty list of non-negative ints"),
    (change(input_ids=[5, "6", 7, 8]), "'input_ids' must be a non-empty list of non-negative ints"),
    (change(input_ids=[5, True, 7, 8]), "'input_ids' must be a non-empty list of non-negative ints"),
    (change(loss_mask=[0, 0, True, 1]), "'loss_mask' must be a list of 0/1"),     # JSON true is not 1
    (change(prompt_length=True), "'prompt_length' must be an int in 1..4"),
    (change(golden_answers="Ana Brel"), "'golden_answers' must be a list"),
] + [({k: v for k, v in GOOD_TRAJECTORY.items() if k != key}, f"missing {key}") for key in data.TRAJECTORY_KEYS]


@pytest.mark.parametrize("bad_row, message", BAD_TRAJECTORIES)
def test_malformed_trajectory_line_fails_naming_file_and_line(tmp_path, bad_row, message):
    path = write_lines(tmp_path / "tgo.jsonl", [json.dumps(GOOD_TRAJECTORY), json.dumps(bad_row)])
    with pytest.raises(ValueError, match=where(path, 2)) as error:
        load_trajectories(path)
    assert message in str(error.value)


def test_missing_trajectory_keys_are_all_named(tmp_path):
    row = {"question": "q", "response_text": "r"}
    path = write_lines(tmp_path / "tgo.jsonl", [json.dumps(row)])
    with pytest.raises(ValueError, match=where(path, 1) +
                       " missing golden_answers, input_ids, loss_mask, prompt_length$"):
        load_trajectories(path)


@pytest.mark.parametrize("bad_line, message", [
    ('{"question": "q", ', "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object, got list"),
])
def test_trajectory_line_that_is_not_an_object_fails_naming_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "tgo.jsonl", [json.dumps(GOOD_TRAJECTORY), "", bad_line])
    with pytest.raises(ValueError, match=where(path, 3)) as error:
        load_trajectories(path)
    assert message in str(error.value)


def test_token_id_at_or_above_vocab_size_names_file_line_and_sizes(tmp_path):
    lines = [json.dumps(GOOD_TRAJECTORY)] * 2 + [json.dumps(change(input_ids=[5, 9, 8, 7]))]
    path = write_lines(tmp_path / "tgo.jsonl", lines)
    assert len(load_trajectories(path, vocab_size=10)) == 3          # largest id 9 < 10: fine
    assert len(load_trajectories(path)) == 3                          # no vocab size: not checked
    with pytest.raises(ValueError, match=where(path, 3) + " token id 9 >= vocab size 9"):
        load_trajectories(path, vocab_size=9)                         # id == vocab size is out of range


def test_prompt_only_trajectory_with_all_zero_mask_loads(tmp_path):
    # prompt_length == len(input_ids) (nothing generated) is a legal, if useless, record
    row = change(loss_mask=[0, 0, 0, 0], prompt_length=4, response_text="")
    path = write_lines(tmp_path / "tgo.jsonl", [json.dumps(row)])
    assert load_trajectories(path) == [row]


def test_oracle_trajectory_records_round_trip_through_write_and_load(tmp_path, world, tokenizer, retriever):
    """What later stages write (a rollout.Trajectory as a dict, plus the gold answers) loads back equal."""
    questions = world.test[:6]
    trajs = demo.oracle_rollout([q["question"] for q in questions], retriever, tokenizer)
    records = [{**dataclasses.asdict(t), "id": q["id"], "golden_answers": q["golden_answers"],
                "data_source": q["data_source"]} for q, t in zip(questions, trajs)]
    path = str(tmp_path / "runs" / "oracle.jsonl")
    write_jsonl(path, records)
    assert load_trajectories(path, vocab_size=len(tokenizer)) == records
    with pytest.raises(ValueError, match=where(path, 1) + " token id"):
        load_trajectories(path, vocab_size=10)


# ----------------------------------------------------------------------------- write_jsonl

ROWS = [{"id": "1", "contents": "Zürich\nZürich is a city — 東京 🙂"},
        {"n": 3, "x": 0.25, "nested": {"a": [1, None, True]}},
        {"text": "line one\nline two\t\"quoted\"\\"}]


def test_write_jsonl_round_trips_one_object_per_line(tmp_path):
    path = str(tmp_path / "deep" / "dir" / "rows.jsonl")          # parent directories are created
    write_jsonl(path, iter(ROWS))                                  # any iterable, e.g. a generator
    assert [row for _, row in read_jsonl(path)] == ROWS
    text = open(path, encoding="utf-8").read()
    assert text.endswith("\n") and text.count("\n") == len(ROWS)   # embedded newlines are escaped
    assert "Zürich" in text                                        # UTF-8, not \\u escapes
    assert [line_no for line_no, _ in read_jsonl(path)] == [1, 2, 3]


def test_write_jsonl_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    write_jsonl(path, ROWS)
    write_jsonl(path, ROWS[:1])
    assert [row for _, row in read_jsonl(path)] == ROWS[:1]
    assert os.listdir(tmp_path) == ["rows.jsonl"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    write_jsonl(path, ROWS)
    before = open(path, "rb").read()
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_jsonl(path, [{"ok": 1}, {"bad": object()}])          # fails half-way through
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["rows.jsonl"]


def test_question_rows_written_by_write_jsonl_load_back_equal(tmp_path):
    rows = [{**GOOD_QUESTION, "id": f"q{i}", "golden_answers": ["Ana Brel", "A. Brel"], "kind": "founder"}
            for i in range(4)]
    path = str(tmp_path / "q.jsonl")
    write_jsonl(path, rows)
    assert load_questions(path) == rows


def test_load_corpus_is_the_retrievers_loader():
    # the corpus format belongs to retriever.py (and is tested there); data re-exports the same function
    assert data.load_corpus is retriever.load_corpus


# ------------------------------------------------------------------ question identity: (data_source, id)

def flashrag_merged_rows() -> list[dict]:
    """nq and hotpotqa test splits concatenated: FlashRAG numbers each split from test_0."""
    return [{"id": "test_0", "question": "who wrote the declaration of independence",
             "golden_answers": ["Thomas Jefferson"], "data_source": "nq"},
            {"id": "test_1", "question": "when did the titanic sink",
             "golden_answers": ["15 April 1912"], "data_source": "nq"},
            {"id": "test_0", "question": "Which band was formed first, Muse or Keane?",
             "golden_answers": ["Keane"], "data_source": "hotpotqa"}]


def test_merged_file_with_ids_repeating_across_sources_loads(tmp_path):
    path = str(tmp_path / "test.jsonl")
    write_jsonl(path, flashrag_merged_rows())
    loaded = load_questions(path)
    assert loaded == flashrag_merged_rows()
    assert [data.question_key(q) for q in loaded] == [("nq", "test_0"), ("nq", "test_1"), ("hotpotqa", "test_0")]


def test_id_repeated_within_one_source_of_a_merged_file_names_both_lines(tmp_path):
    rows = flashrag_merged_rows() + [{**flashrag_merged_rows()[1], "question": "another question"}]
    path = str(tmp_path / "test.jsonl")
    write_jsonl(path, rows)
    with pytest.raises(ValueError, match=where(path, 4) +
                       r" duplicate id 'test_1' in data_source 'nq' \(first on line 2\)"):
        load_questions(path)


def test_filled_in_ids_are_unique_per_line_and_keyed_with_the_file_stem(tmp_path):
    bare = {"question": "Who founded Velmor Works?", "golden_answers": ["Ana Brel"]}
    path = write_lines(tmp_path / "demo_dev.jsonl", [json.dumps(bare)] * 3)
    assert [data.question_key(q) for q in load_questions(path)] == \
        [("demo_dev", "demo_dev-1"), ("demo_dev", "demo_dev-2"), ("demo_dev", "demo_dev-3")]


# ----------------------------------------------------------------------------- file types: by extension

@pytest.mark.parametrize("name", ["q.json", "q.csv", "q.jsonl.bz2", "q.parquet.gz", "q"])
def test_unsupported_question_file_extension_names_the_supported_ones(tmp_path, name):
    path = write_lines(tmp_path / name, [json.dumps(GOOD_QUESTION)])
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: unsupported question file; the extension "
                                                         "must be one of .jsonl, .jsonl.gz, .parquet")):
        load_questions(path)


def write_gzip_lines(path, lines) -> str:
    """Raw text lines, gzip-compressed by the standard library (not by the code under test)."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def test_gzip_questions_and_trajectories_written_by_another_tool_load(tmp_path):
    bare = {"question": "Who founded Velmor Works?", "golden_answers": ["Ana Brel"]}
    path = write_gzip_lines(tmp_path / "nq_dev.jsonl.gz", [json.dumps(GOOD_QUESTION), "", json.dumps(bare)])
    first, third = load_questions(path)
    assert first == GOOD_QUESTION
    assert (third["id"], third["data_source"]) == ("nq_dev-3", "nq_dev")   # the stem drops .jsonl.gz
    path = write_gzip_lines(tmp_path / "tgo.jsonl.gz", [json.dumps(GOOD_TRAJECTORY)] * 2)
    assert load_trajectories(path, vocab_size=9) == [GOOD_TRAJECTORY] * 2


@pytest.mark.parametrize("bad_line, message", BAD_QUESTION_LINES[:3] + BAD_QUESTION_LINES[10:12])
def test_malformed_line_inside_gzip_names_file_and_line(tmp_path, bad_line, message):
    path = write_gzip_lines(tmp_path / "nq_dev.jsonl.gz", [json.dumps(GOOD_QUESTION), "", bad_line])
    with pytest.raises(ValueError, match=where(path, 3)) as error:
        load_questions(path)
    assert message in str(error.value)


def test_bad_trajectory_inside_gzip_names_file_and_line(tmp_path):
    path = write_gzip_lines(tmp_path / "tgo.jsonl.gz", [json.dumps(GOOD_TRAJECTORY),
                                                        json.dumps(change(prompt_length=0))])
    with pytest.raises(ValueError, match=where(path, 2) + " 'prompt_length' must be an int in 1..4"):
        load_trajectories(path)


def gzip_of_many_rows(tmp_path) -> bytes:
    path = write_gzip_lines(tmp_path / "good.jsonl.gz", [json.dumps({**GOOD_QUESTION, "id": f"q{i}"})
                                                         for i in range(2000)])
    return open(path, "rb").read()


@pytest.mark.parametrize("damage, lines_read", [
    (lambda b: b[:len(b) // 2], None),                   # cut in the middle: some lines, then the end
    (lambda b: b[:-4], 2000),                             # trailer cut: every line, then the error
    (lambda b: b[:-8] + bytes([b[-8] ^ 1]) + b[-7:], 2000),   # one bit of the CRC flipped
    (lambda b: b[:40] + b"\x00" * 64 + b[104:], 0),       # the deflate stream overwritten near the start
    (lambda b: json.dumps(GOOD_QUESTION).encode() + b"\n", 0),   # plain text named .gz
])
def test_corrupt_gzip_stream_is_an_error_naming_the_file(tmp_path, damage, lines_read):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(damage(gzip_of_many_rows(tmp_path)))
    for load in (load_questions, load_trajectories, read_jsonl):
        with pytest.raises(ValueError, match="^" + re.escape(f"{path}: not a valid gzip stream (")) as error:
            load(str(path))
        read = int(re.search(r"; (\d+) lines were read before the error$", str(error.value)).group(1))
        assert read == lines_read if lines_read is not None else 0 < read < 2000


def test_write_jsonl_gzip_is_real_gzip_and_reproducible(tmp_path):
    plain, packed = str(tmp_path / "rows.jsonl"), str(tmp_path / "rows.jsonl.gz")
    write_jsonl(plain, ROWS)
    write_jsonl(packed, ROWS)
    with gzip.open(packed, "rb") as f:                             # the standard library reads it back
        assert f.read() == open(plain, "rb").read()                # the same bytes as the plain file
    assert read_jsonl(packed) == read_jsonl(plain)
    first = open(packed, "rb").read()
    os.utime(packed, (0, 0))
    write_jsonl(packed, ROWS)                                      # no time or name in the header
    assert open(packed, "rb").read() == first
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl", "rows.jsonl.gz"]


def test_failed_gzip_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "rows.jsonl.gz")
    write_jsonl(path, ROWS)
    before = open(path, "rb").read()
    assert gzip.decompress(before).count(b"\n") == len(ROWS)
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_jsonl(path, [{"ok": 1}] * 100 + [{"bad": object()}])
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["rows.jsonl.gz"]


# ----------------------------------------------------------------------------- questions: Search-R1 Parquet

def search_r1_prompt(question: str) -> str:
    """The user message Search-R1 writes into its Parquet files, typed out here from its
    scripts/data_process/qa_search_test_merge.py, make_prefix (lines 32-36; the same in
    qa_search_train_merge.py): independent of rollout.py, so a drift of either shows."""
    return ("Answer the given question. You must conduct reasoning inside <think> and </think> first every time you "
            "get new information. After reasoning, if you find you lack some knowledge, you can call a search engine "
            "by <search> query </search> and it will return the top searched results between <information> and "
            "</information>. You can search as many times as your want. If you find no further external knowledge "
            "needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
            f"illustrations. For example, <answer> Beijing </answer>. Question: {question}\n")


def search_r1_row(qid, question, golds, source, index, split="test") -> dict:
    """One row as Search-R1's scripts/data_process/qa_search_*_merge.py build it: FlashRAG's fields
    (id, question (stripped, ending in "?"), golden_answers) plus data_source, the chat prompt, ability,
    reward_model, extra_info."""
    return {"id": qid, "question": question, "golden_answers": golds, "data_source": source,
            "prompt": [{"content": search_r1_prompt(question), "role": "user"}], "ability": "fact-reasoning",
            "reward_model": {"ground_truth": {"target": golds}, "style": "rule"},
            "extra_info": {"index": index, "split": split}}


def search_r1_schema(pa, with_id=True):
    """The column types datasets' to_parquet writes for those rows."""
    text = pa.string()
    fields = [("id", text)] if with_id else []
    return pa.schema(fields + [
        ("question", text), ("golden_answers", pa.list_(text)), ("data_source", text),
        ("prompt", pa.list_(pa.struct([("content", text), ("role", text)]))), ("ability", text),
        ("reward_model", pa.struct([("ground_truth", pa.struct([("target", pa.list_(text))])), ("style", text)])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", text)]))])


def write_parquet(path, rows, schema=None) -> str:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or search_r1_schema(pa)), str(path))
    return str(path)


SEARCH_R1_TEST = [  # nq and hotpotqa merged: FlashRAG's per-split ids repeat across the two sources
    search_r1_row("test_0", "who wrote the declaration of independence?", ["Thomas Jefferson"], "nq", 0),
    search_r1_row("test_1", "when did the titanic sink?", ["15 April 1912", "1912"], "nq", 1),
    search_r1_row("test_0", "Which band was formed first, Muse or Keane?", ["Keane"], "hotpotqa", 0)]
QUESTION_FIELDS = ("id", "question", "golden_answers", "data_source", "prompt")


def question_fields(row: dict) -> dict:
    """What load_questions keeps of a Search-R1 row: the question fields and the prompt, as a chat."""
    return {k: ([dict(m) for m in row[k]] if k == "prompt" else row[k]) for k in QUESTION_FIELDS}


def test_search_r1_parquet_loads_without_its_reward_columns_and_its_prompt_is_the_projects(tmp_path):
    path = write_parquet(tmp_path / "test.parquet", SEARCH_R1_TEST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # Search-R1's prompts are the project's, byte for byte
        loaded = load_questions(path)
    assert loaded == [question_fields(row) for row in SEARCH_R1_TEST]   # no other keys
    assert all(type(q["golden_answers"]) is list and all(type(g) is str for g in q["golden_answers"])
               for q in loaded)
    assert json.loads(json.dumps(loaded)) == loaded                  # plain Python, writable as JSONL


def test_search_r1_rows_exported_to_jsonl_load_without_the_same_columns(tmp_path):
    path = str(tmp_path / "test.jsonl.gz")
    write_jsonl(path, SEARCH_R1_TEST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_questions(path) == [question_fields(row) for row in SEARCH_R1_TEST]


def customised(row: dict, content=None, messages=None) -> dict:
    return {**row, "prompt": messages if messages is not None else [{"content": content, "role": "user"}]}


def test_a_customised_prompt_is_kept_and_one_warning_names_the_first_differing_row_and_texts(tmp_path):
    """Issue 25, item 6: a file whose prompts were customised must not be silently replaced."""
    mine = "Reply in one word. Question: when did the titanic sink?\n"
    rows = [SEARCH_R1_TEST[0], customised(SEARCH_R1_TEST[1], mine),
            customised(SEARCH_R1_TEST[2], search_r1_prompt(SEARCH_R1_TEST[2]["question"]).replace("Beijing", "Paris"))]
    path = write_parquet(tmp_path / "test.parquet", rows)
    with pytest.warns(UserWarning) as caught:
        loaded = load_questions(path)
    built = search_r1_prompt("when did the titanic sink?")
    assert [str(w.message) for w in caught] == [
        f"{path}: row 1: the prompt in the file is not the one rollout.py builds from 'question' (docs/method.md §2): "
        f"they first differ at character 0: the file has {mine[:40]!r}, the project builds {built[:40]!r}; "
        "2 of 3 rows differ. The rollout builds its own prompt; the file's is kept in each row's 'prompt', and "
        "--prompt-from data rolls out from it instead"]
    assert [q["prompt"][0]["content"] for q in loaded] == [r["prompt"][0]["content"] for r in rows]


def test_the_first_difference_is_shown_with_twenty_characters_before_it_from_both_texts():
    built = search_r1_prompt("who?")
    theirs = built.replace("Beijing", "Paris")
    k = built.index("Beijing")                                     # "B" vs "P": the first differing character
    assert data.prompt_difference([{"role": "user", "content": theirs}], built) == (
        f"they first differ at character {k}: the file has {theirs[k - 20:k + 40]!r}, "
        f"the project builds {built[k - 20:k + 40]!r}")
    assert data.prompt_difference([{"role": "user", "content": built}], built) is None
    n = len(built)                                                 # one text is a prefix of the other
    assert data.prompt_difference([{"role": "user", "content": built + " "}], built) == (
        f"they first differ at character {n}: the file has {built[n - 20:] + ' '!r}, the project builds {built[n - 20:]!r}")


def test_a_prompt_with_a_system_message_is_a_difference_and_a_plain_string_is_the_user_message(tmp_path):
    system = [{"content": "You are terse.", "role": "system"}] + SEARCH_R1_TEST[0]["prompt"]
    path = str(tmp_path / "q.jsonl")
    write_jsonl(path, [customised(SEARCH_R1_TEST[0], messages=system),
                       {**SEARCH_R1_TEST[1], "prompt": search_r1_prompt(SEARCH_R1_TEST[1]["question"])}])
    with pytest.warns(UserWarning, match=re.escape(f"{path}:1: the prompt in the file is not the one rollout.py builds "
                                                   "from 'question' (docs/method.md §2): the file's prompt is a chat of "
                                                   "2 messages (roles: system, user), this project's is one user "
                                                   "message; 1 of 2 rows differ")):
        loaded = load_questions(path)
    assert loaded[0]["prompt"] == [dict(m) for m in system]
    assert loaded[1]["prompt"] == [{"role": "user", "content": search_r1_prompt(SEARCH_R1_TEST[1]["question"])}]


@pytest.mark.parametrize("bad", [7, [], [{"role": "user"}], [{"role": "user", "content": 3}], ["text"], {"a": 1}])
def test_a_prompt_that_is_not_a_chat_names_the_line(tmp_path, bad):
    path = write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD_QUESTION), json.dumps({**GOOD_QUESTION, "id": "q2",
                                                                                     "prompt": bad})])
    with pytest.raises(ValueError, match=where(path, 2) + re.escape(" 'prompt' must be a chat, a non-empty list of")):
        load_questions(path)


def test_parquet_extra_columns_are_kept_and_missing_ids_are_filled_from_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    schema = search_r1_schema(pa, with_id=False).append(pa.field("supporting_ids", pa.list_(pa.string())))
    rows = [{**{k: v for k, v in row.items() if k != "id"}, "supporting_ids": [str(i)]}
            for i, row in enumerate(SEARCH_R1_TEST)]
    loaded = load_questions(write_parquet(tmp_path / "nq_hotpotqa_train.parquet", rows, schema))
    # rows are counted from 0, as pyarrow and pandas count them
    assert [q["id"] for q in loaded] == ["nq_hotpotqa_train-0", "nq_hotpotqa_train-1", "nq_hotpotqa_train-2"]
    assert [q["supporting_ids"] for q in loaded] == [["0"], ["1"], ["2"]]


def test_parquet_golden_answers_as_a_plain_string_column_become_lists(tmp_path):
    pa = pytest.importorskip("pyarrow")
    schema = pa.schema([("question", pa.string()), ("golden_answers", pa.string())])
    path = write_parquet(tmp_path / "single.parquet", [{"question": "q?", "golden_answers": "Oslo"}], schema)
    assert load_questions(path) == [{"id": "single-0", "question": "q?", "golden_answers": ["Oslo"],
                                     "data_source": "single"}]


@pytest.mark.parametrize("bad, message", [
    (dict(question=None), "'question' must be a non-empty string"),
    (dict(question=""), "'question' must be a non-empty string"),
    (dict(golden_answers=[]), "'golden_answers' must be a non-empty list of strings"),
    (dict(golden_answers=None), "'golden_answers' must be a non-empty list of strings"),
    (dict(golden_answers=["a", None]), "'golden_answers' must be a non-empty list of strings"),
    (dict(data_source=None), "'data_source' must be a non-empty string"),
    (dict(id=None), "'id' must be a non-empty string or an integer, got None"),
    (dict(id="test_1", data_source="nq"), "duplicate id 'test_1' in data_source 'nq' (first on row 1)"),
])
def test_bad_parquet_row_names_file_and_row(tmp_path, bad, message):
    rows = SEARCH_R1_TEST + [{**SEARCH_R1_TEST[2], "id": "test_9", **bad}]
    path = write_parquet(tmp_path / "test.parquet", rows)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: row 3: {message}")):
        load_questions(path)


@pytest.mark.parametrize("missing, message", [
    (("question",), "no 'question' column (columns: id, "),
    (("golden_answers", "reward_model"), "no 'golden_answers' column, nor veRL's 'reward_model'")])
def test_parquet_without_a_required_column_names_the_file_and_its_columns(tmp_path, missing, message):
    pa = pytest.importorskip("pyarrow")
    schema = pa.schema([f for f in search_r1_schema(pa) if f.name not in missing])
    path = write_parquet(tmp_path / "test.parquet", SEARCH_R1_TEST, schema)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: {message}")):
        load_questions(path)


def test_empty_parquet_is_an_error_naming_the_file(tmp_path):
    path = write_parquet(tmp_path / "test.parquet", [])
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: the file has no rows")):
        load_questions(path)


@pytest.mark.parametrize("content", [b"", b"PAR1 not really parquet", json.dumps(GOOD_QUESTION).encode()])
def test_file_that_is_not_parquet_is_an_error_naming_the_file(tmp_path, content):
    pytest.importorskip("pyarrow")
    path = tmp_path / "test.parquet"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: not a readable Parquet file (")):
        load_questions(str(path))


def test_missing_parquet_file_names_the_path(tmp_path):
    path = str(tmp_path / "nowhere" / "test.parquet")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        load_questions(path)


def test_missing_pyarrow_is_an_error_naming_the_package_and_the_file(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "test.parquet", SEARCH_R1_TEST)
    monkeypatch.setitem(sys.modules, "pyarrow", None)                # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="^" + re.escape(f"{path}: reading Parquet needs the optional "
                                                          "package 'pyarrow' (pip install pyarrow)")):
        load_questions(path)
    jsonl = write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD_QUESTION)])
    assert load_questions(jsonl) == [GOOD_QUESTION]                   # JSONL does not need it


@pytest.mark.slow
def test_importing_data_and_reading_jsonl_does_not_import_pyarrow(tmp_path):
    jsonl = write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD_QUESTION)])
    code = ("import sys, data; data.load_questions(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyarrow', 'torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code, jsonl], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(data.__file__)))
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("make_array", ["numpy", "pyarrow"])
def test_golden_answers_held_in_an_array_become_a_list_of_str(make_array):
    # what pandas.read_parquet gives for Search-R1's golden_answers (numpy), or a pyarrow column's cell
    if make_array == "numpy":
        np = pytest.importorskip("numpy")
        golds = np.array(["Thomas Jefferson", "Jefferson"])           # elements are numpy.str_
    else:
        pa = pytest.importorskip("pyarrow")
        golds = pa.array(["Thomas Jefferson", "Jefferson"])
    row = data.check_question({"question": "q?", "golden_answers": golds}, "x.parquet: row 0", "x-0", "x")
    assert row["golden_answers"] == ["Thomas Jefferson", "Jefferson"]
    assert type(row["golden_answers"]) is list and all(type(g) is str for g in row["golden_answers"])


# ------------------------------------------------------------------ trajectories: tokenizer provenance

class VocabOnly:
    """A duck-typed tokenizer: just get_vocab() and the special-token ids."""
    def __init__(self, vocab, eos_token_id=None, pad_token_id=None, bos_token_id=None):
        self.vocab = vocab
        self.eos_token_id, self.pad_token_id, self.bos_token_id = eos_token_id, pad_token_id, bos_token_id

    def get_vocab(self):
        return dict(self.vocab)


def test_vocab_fingerprint_is_sha256_of_the_documented_canonical_json():
    # the canonical form, written out by hand: files record the fingerprint, so it must never drift
    canonical = '{"size":2,"vocab":[[0,"a"],[1,"b"]]}'
    expected = "vocab-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert expected == "vocab-bda7074dda5d4013"
    assert data.vocab_fingerprint(VocabOnly({"b": 1, "a": 0}, eos_token_id=1)) == expected


def test_legacy_fingerprint_is_the_one_older_files_recorded():
    # the pre-vocab_fingerprint formula, byte for byte: old trajectory files hold these values
    canonical = '{"special":{"bos":null,"eos":1,"pad":null},"vocab":[[0,"a"],[1,"b"]]}'
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert expected == "667789551f1dda0f"
    assert data.legacy_fingerprint(VocabOnly({"b": 1, "a": 0}, eos_token_id=1)) == expected


def test_vocab_fingerprint_changes_with_what_an_id_means_and_not_with_special_ids_or_dict_order():
    base = data.vocab_fingerprint(VocabOnly({"a": 0, "b": 1, "c": 2}, eos_token_id=2, pad_token_id=0))
    assert re.fullmatch(r"vocab-[0-9a-f]{16}", base)
    for same in [VocabOnly({"c": 2, "a": 0, "b": 1}, eos_token_id=2, pad_token_id=0),    # dict order
                 VocabOnly({"a": 0, "b": 1, "c": 2}, eos_token_id=1, pad_token_id=0),    # another eos
                 VocabOnly({"a": 0, "b": 1, "c": 2}, eos_token_id=2, pad_token_id=2),    # another pad
                 VocabOnly({"a": 0, "b": 1, "c": 2}, eos_token_id=2, pad_token_id=0, bos_token_id=0)]:
        assert data.vocab_fingerprint(same) == base
    for other in [VocabOnly({"a": 0, "b": 2, "c": 1}),                                   # two ids swapped
                  VocabOnly({"a": 0, "b": 1, "d": 2}),                                   # one token renamed
                  VocabOnly({"a": 0, "b": 1, "c": 2, "d": 3})]:                          # one more token
        assert data.vocab_fingerprint(other) != base
    legacy = data.legacy_fingerprint(VocabOnly({"a": 0, "b": 1, "c": 2}, eos_token_id=2, pad_token_id=0))
    assert data.legacy_fingerprint(VocabOnly({"a": 0, "b": 1, "c": 2}, eos_token_id=1, pad_token_id=0)) != legacy


def test_fingerprint_of_an_object_without_get_vocab_is_a_type_error():
    with pytest.raises(TypeError, match="vocab_fingerprint: str has no get_vocab()"):
        data.vocab_fingerprint("Qwen/Qwen2.5-0.5B")
    with pytest.raises(TypeError, match="tokenizer_differences: str has no get_vocab()"):
        data.tokenizer_differences(VocabOnly({"a": 0}), "Qwen/Qwen2.5-0.5B")


def test_tokenizers_of_the_same_size_with_different_vocabularies_differ(world, tokenizer):
    other = demo.train_tokenizer(demo.make_world(seed=1))
    assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()
    assert data.vocab_fingerprint(other) != data.vocab_fingerprint(tokenizer)
    differences = data.tokenizer_differences(tokenizer, other)
    assert len(differences) == data.SHOWN_DIFFERENCES + 1 and differences[-1].startswith("and ")
    assert re.fullmatch(r"and \d+ more ids", differences[-1])


def test_tokenizer_saved_and_reloaded_keeps_its_fingerprint(tokenizer, tmp_path):
    from transformers import AutoTokenizer
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert data.vocab_fingerprint(reloaded) == data.vocab_fingerprint(tokenizer)
    assert data.legacy_fingerprint(reloaded) == data.legacy_fingerprint(tokenizer)


def other_eos(tokenizer):
    """The demo tokenizer with eos <|endoftext|> instead of <|im_end|>: how a base-derived teacher
    (eos <|endoftext|>) and an instruct student (eos <|im_end|>) of one model family differ."""
    import copy
    other = copy.deepcopy(tokenizer)
    other.eos_token = "<|endoftext|>"
    assert other.eos_token_id != tokenizer.eos_token_id and other.get_vocab() == tokenizer.get_vocab()
    return other


def swapped_ids(tokenizer, tmp_path, first: int, second: int):
    """The demo tokenizer with the tokens of two ids swapped (same size, merges untouched): the same
    strings get other ids."""
    from transformers import PreTrainedTokenizerFast
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    with open(tmp_path / "tok" / "tokenizer.json", encoding="utf-8") as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    vocab[by_id[first]], vocab[by_id[second]] = second, first
    with open(tmp_path / "tok" / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(spec, f)
    return PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"),
                                   eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token), by_id


def write_trajectories(path, tokenizer, retriever, questions, fingerprint) -> list[dict]:
    trajs = demo.oracle_rollout([q["question"] for q in questions], retriever, tokenizer)
    records = [{**dataclasses.asdict(t), **q, data.TOKENIZER_KEY: fingerprint} for q, t in zip(questions, trajs)]
    write_jsonl(path, records)
    return records


def test_tokenizers_that_differ_only_in_eos_are_compatible_and_share_trajectories(world, tokenizer, retriever,
                                                                                  tmp_path):
    """Issue 25, item 2: a teacher whose eos is <|endoftext|> and a student whose eos is <|im_end|>."""
    teacher = other_eos(tokenizer)
    assert data.tokenizer_differences(tokenizer, teacher) == []
    assert data.vocab_fingerprint(teacher) == data.vocab_fingerprint(tokenizer)
    path = str(tmp_path / "tgo.jsonl")
    records = write_trajectories(path, teacher, retriever, world.test[:3], data.vocab_fingerprint(teacher))
    assert load_trajectories(path, vocab_size=len(tokenizer), tokenizer_fingerprint=data.vocab_fingerprint(tokenizer)) \
        == records
    assert load_trajectories(path, tokenizer_fingerprint=data.accepted_fingerprints(tokenizer, teacher)) == records


def test_tokenizers_that_differ_in_a_token_are_refused_naming_the_ids(world, tokenizer, retriever, tmp_path):
    other, by_id = swapped_ids(tokenizer, tmp_path, 300, 301)
    assert len(other) == len(tokenizer)
    assert data.tokenizer_differences(tokenizer, other) == [f"id 300: {by_id[300]!r} vs {by_id[301]!r}",
                                                            f"id 301: {by_id[301]!r} vs {by_id[300]!r}"]
    with pytest.raises(ValueError, match=re.escape(f"the tokenizers differ: id 300: {by_id[300]!r} vs")):
        data.accepted_fingerprints(tokenizer, other)
    path = str(tmp_path / "tgo.jsonl")
    write_trajectories(path, other, retriever, world.test[:2], data.vocab_fingerprint(other))
    with pytest.raises(ValueError, match=where(path, 1) + re.escape(
            f" made with tokenizer {data.vocab_fingerprint(other)}, but the tokenizer given is "
            f"{data.vocab_fingerprint(tokenizer)}: these trajectories were made with another tokenizer")):
        load_trajectories(path, vocab_size=len(tokenizer), tokenizer_fingerprint=data.vocab_fingerprint(tokenizer))
    with pytest.raises(ValueError, match=re.escape(f"given is {data.vocab_fingerprint(tokenizer)}: these")):
        load_trajectories(path, tokenizer_fingerprint=data.accepted_fingerprints(tokenizer))   # like for like


def test_a_tokenizer_with_one_more_token_differs_in_size_and_names_the_new_id(tokenizer):
    import copy
    bigger = copy.deepcopy(tokenizer)
    bigger.add_tokens(["<extra>"])
    n = len(tokenizer)
    assert data.tokenizer_differences(tokenizer, bigger) == [f"vocabulary size {n} vs {n + 1}",
                                                             f"id {n}: (no such id) vs '<extra>'"]
    assert data.vocab_fingerprint(bigger) != data.vocab_fingerprint(tokenizer)


def test_an_old_file_with_legacy_fingerprints_loads_when_the_tokenizer_that_made_it_is_named(
        world, tokenizer, retriever, tmp_path):
    """Files written before vocab_fingerprint record legacy_fingerprint (vocab + bos/eos/pad ids)."""
    teacher = other_eos(tokenizer)
    path = str(tmp_path / "old-tgo.jsonl")
    records = write_trajectories(path, teacher, retriever, world.test[:2], data.legacy_fingerprint(teacher))
    # the student's own fingerprints cannot vouch for it: its eos differs, and the message says so
    for given in (data.vocab_fingerprint(tokenizer), data.accepted_fingerprints(tokenizer)):
        with pytest.raises(ValueError, match=where(path, 1) + " made with tokenizer "
                           + data.legacy_fingerprint(teacher) + ".*older kind.*differs only in those ids"):
            load_trajectories(path, tokenizer_fingerprint=given)
    with pytest.raises(ValueError, match=re.escape(f"but the tokenizer given is {data.legacy_fingerprint(tokenizer)}:")):
        load_trajectories(path, tokenizer_fingerprint=data.accepted_fingerprints(tokenizer))   # like for like
    # naming the tokenizer that made it (kd's teacher) reads it
    assert load_trajectories(path, tokenizer_fingerprint=data.accepted_fingerprints(tokenizer, teacher)) == records
    # an old file made with the student's own tokenizer needs nothing more
    mine = str(tmp_path / "old-mine.jsonl")
    records = write_trajectories(mine, tokenizer, retriever, world.test[:2], data.legacy_fingerprint(tokenizer))
    assert load_trajectories(mine, tokenizer_fingerprint=data.accepted_fingerprints(tokenizer)) == records


def test_trajectories_of_another_tokenizer_of_the_same_size_are_refused_naming_both(
        world, tokenizer, retriever, tmp_path):
    """Issue 16, item 6: the vocab-size check passes, the fingerprint does not."""
    other = demo.train_tokenizer(demo.make_world(seed=1))
    questions = world.test[:3]
    trajs = demo.oracle_rollout([q["question"] for q in questions], retriever, tokenizer)
    mine = data.vocab_fingerprint(tokenizer)
    records = [{**dataclasses.asdict(t), **q, data.TOKENIZER_KEY: mine} for q, t in zip(questions, trajs)]
    path = str(tmp_path / "tgo.jsonl.gz")
    write_jsonl(path, records)
    assert load_trajectories(path, vocab_size=len(tokenizer), tokenizer_fingerprint=mine) == records
    assert load_trajectories(path, vocab_size=len(other)) == records        # size alone cannot tell
    theirs = data.vocab_fingerprint(other)
    with pytest.raises(ValueError, match=where(path, 1) + re.escape(
            f" made with tokenizer {mine}, but the tokenizer given is {theirs}")):
        load_trajectories(path, vocab_size=len(other), tokenizer_fingerprint=theirs)


def test_row_recording_another_fingerprint_is_refused_at_its_line(tmp_path):
    lines = [json.dumps(change(tokenizer="aaaa")), json.dumps(change(tokenizer="bbbb"))]
    path = write_lines(tmp_path / "tgo.jsonl", lines)
    with pytest.raises(ValueError, match=where(path, 2) + " made with tokenizer bbbb, but the tokenizer given "
                       "is aaaa: these trajectories were made with another tokenizer"):
        load_trajectories(path, tokenizer_fingerprint="aaaa")
    with pytest.raises(ValueError, match=where(path, 1) + " made with tokenizer aaaa, but .* is bbbb"):
        load_trajectories(path, tokenizer_fingerprint="bbbb")
    assert len(load_trajectories(path)) == 2                                  # no fingerprint given: not checked


def test_rows_without_a_fingerprint_warn_once_for_the_file_and_keep_the_vocab_check(tmp_path):
    lines = [json.dumps(GOOD_TRAJECTORY)] * 3 + [json.dumps(change(tokenizer="aaaa"))]
    path = write_lines(tmp_path / "old.jsonl", lines)
    with pytest.warns(UserWarning) as record:
        assert len(load_trajectories(path, vocab_size=9, tokenizer_fingerprint="aaaa")) == 4
    assert [str(w.message) for w in record] == [
        f"{path}: 3 of 4 rows record no 'tokenizer' fingerprint (an older file or another tool); "
        "their tokenizer is checked by vocab size 9 only"]
    with pytest.warns(UserWarning, match=re.escape(f"{path}: 3 of 4 rows") + ".*their tokenizer is not checked$"):
        load_trajectories(path, tokenizer_fingerprint="aaaa")
    with pytest.raises(ValueError, match=where(path, 1) + " token id 8 >= vocab size 8"):
        load_trajectories(path, vocab_size=8, tokenizer_fingerprint="aaaa")   # an unrecorded row, still checked
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                       # nothing asked: nothing to warn
        load_trajectories(path, vocab_size=9)
        load_trajectories(write_lines(tmp_path / "new.jsonl", lines[3:]), tokenizer_fingerprint="aaaa")


@pytest.mark.parametrize("value", [5, "", None, ["aaaa"]])
def test_tokenizer_key_that_is_not_a_fingerprint_string_names_file_and_line(tmp_path, value):
    lines = [json.dumps(GOOD_TRAJECTORY), json.dumps(change(tokenizer=value))]
    path = write_lines(tmp_path / "tgo.jsonl", lines)
    with pytest.raises(ValueError, match=where(path, 2) + " 'tokenizer' must be a non-empty string"):
        load_trajectories(path)


# ----------------------------------------------------------------------------- answers that can never score


@pytest.mark.parametrize("golds", [["The The"], ["the"], [""], ["A"], ["!!!", " an "]])
def test_a_question_whose_every_gold_normalises_to_nothing_is_kept_scored_and_named_in_one_warning(tmp_path, golds):
    """Search-R1 scores such a row (it can never match); refusing it refused a whole released file."""
    rows = [GOOD_QUESTION, {**GOOD_QUESTION, "id": "q2", "golden_answers": golds},
            {**GOOD_QUESTION, "id": "q3", "golden_answers": ["the"]}]
    path = write_lines(tmp_path / "q.jsonl", [json.dumps(r) for r in rows])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_questions(path)
    assert [q["id"] for q in loaded] == [GOOD_QUESTION.get("id", "q-1"), "q2", "q3"]
    assert loaded[1]["golden_answers"] == golds
    assert len(caught) == 1                                  # one line for the file, not one per row
    message = str(caught[0].message)
    assert message.startswith(f"{path}:2: every golden answer ({golds!r}) is empty once normalised")
    assert "2 of 3 rows" in message and "\n" not in message
    for answer in (golds[0], "the", "", "The The"):           # no answer scores, the blank one included
        assert exact_match(answer, loaded[1]["golden_answers"]) == 0.0
    write_lines(tmp_path / "ok.jsonl", [json.dumps({**GOOD_QUESTION, "golden_answers": golds + ["The Hague"]})])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # a row with one real answer is not named
        assert load_questions(str(tmp_path / "ok.jsonl"))[0]["golden_answers"] == golds + ["The Hague"]


def test_a_released_parquet_with_a_the_the_row_loads_every_row_with_one_warning(tmp_path):
    rows = SEARCH_R1_TEST + [search_r1_row("test_2", "which band sang hey ya?", ["The The"], "nq", 2)]
    path = write_parquet(tmp_path / "test.parquet", rows)
    with pytest.warns(UserWarning, match="^" + re.escape(f"{path}: row 3: every golden answer (['The The'])") +
                      ".* 1 of 4 rows"):
        loaded = load_questions(path)
    assert loaded == [question_fields(row) for row in rows]


def verl_only(pa, rows):
    """Rows and schema of a veRL-style Parquet: the answers only in reward_model.ground_truth.target."""
    schema = pa.schema([f for f in search_r1_schema(pa) if f.name != "golden_answers"])
    return [{k: v for k, v in row.items() if k != "golden_answers"} for row in rows], schema


def test_a_parquet_without_golden_answers_reads_verls_reward_model_target(tmp_path):
    pa = pytest.importorskip("pyarrow")
    rows, schema = verl_only(pa, SEARCH_R1_TEST)
    path = write_parquet(tmp_path / "test.parquet", rows, schema)
    assert load_questions(path) == [question_fields(row) for row in SEARCH_R1_TEST]   # reward_model dropped after
    # where both are given, golden_answers wins (the target is not even read)
    changed = [{**row, "reward_model": {"ground_truth": {"target": ["other"]}, "style": "rule"}} for row in SEARCH_R1_TEST]
    assert load_questions(write_parquet(tmp_path / "both.parquet", changed)) == \
        [question_fields(row) for row in SEARCH_R1_TEST]
    # a JSONL row is read the same way
    line = {"question": "q?", "reward_model": {"ground_truth": {"target": ["Oslo"]}}}
    path = write_lines(tmp_path / "verl.jsonl", [json.dumps(line)])
    assert load_questions(path)[0]["golden_answers"] == ["Oslo"]


def test_a_verl_row_without_a_target_names_both_places(tmp_path):
    pa = pytest.importorskip("pyarrow")
    rows, schema = verl_only(pa, SEARCH_R1_TEST)
    rows[1]["reward_model"] = {"ground_truth": {"target": []}, "style": "rule"}
    path = write_parquet(tmp_path / "test.parquet", rows, schema)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: row 1: 'golden_answers' must be a non-empty list "
                                                         "of strings (absent here; nor does veRL's reward_model")):
        load_questions(path)


# ----------------------------------------------------------------------------- progress files


def test_progress_rows_survive_a_torn_last_line_which_is_cut_off_so_appends_continue_cleanly(tmp_path):
    path = str(tmp_path / "progress.jsonl")
    assert data.read_appended(path) == []
    data.append_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "ab") as f:
        f.write(b'{"a": 3, "b"')                                     # a crash in the middle of an append
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        assert data.read_appended(path) == [{"a": 1}, {"a": 2}]
    data.append_jsonl(path, [{"a": 4}])
    assert data.read_appended(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    with open(path, "ab") as f:
        f.write(b'{"a": \n{"a": 5}\n')                              # a bad line that is not the last
    with pytest.raises(ValueError, match=r"progress.jsonl:4: not valid JSON"):
        data.read_appended(path)


# ----------------------------------------------------------------------------- a limit: a stratified sample

def sorted_by_source(sizes: dict) -> list[dict]:
    """Question rows grouped by source, as Search-R1's test.parquet is (every nq row, then hotpotqa, …);
    ids repeat across sources, as FlashRAG's per-split ids do."""
    return [{"id": f"test_{k}", "question": f"{source} question {k}?", "golden_answers": ["x"], "data_source": source}
            for source, n in sizes.items() for k in range(n)]


@pytest.mark.parametrize("sizes, n, expected", [
    ({"nq": 7, "hotpotqa": 2, "musique": 1}, 5, {"nq": 4, "hotpotqa": 1, "musique": 0}),  # 3.5 1.0 0.5: tie to nq
    ({"nq": 7, "hotpotqa": 2, "musique": 1}, 3, {"nq": 2, "hotpotqa": 1, "musique": 0}),  # 2.1 0.6 0.3
    ({"nq": 3610, "hotpotqa": 7405}, 100, {"nq": 33, "hotpotqa": 67}),                    # 32.77 67.23
    ({"nq": 2, "hotpotqa": 2}, 9, {"nq": 2, "hotpotqa": 2}),                              # more than there are
])
def test_source_quotas_are_each_sources_share_by_largest_remainder(sizes, n, expected):
    assert data.source_quotas(sizes, n) == expected
    assert sum(expected.values()) == min(n, sum(sizes.values()))


def test_a_limit_samples_every_source_of_a_file_sorted_by_source_not_its_first_rows():
    questions = sorted_by_source({"nq": 60, "hotpotqa": 30, "bamboogle": 10})
    assert {q["data_source"] for q in questions[:10]} == {"nq"}              # the old first-N limit: NQ only
    sample = data.sample_questions(questions, 10)
    counts = {s: sum(q["data_source"] == s for q in sample) for s in ("nq", "hotpotqa", "bamboogle")}
    assert counts == {"nq": 6, "hotpotqa": 3, "bamboogle": 1}
    positions = [questions.index(q) for q in sample]
    assert positions == sorted(positions)                                     # file order kept
    assert data.sample_questions(questions, 10) == sample                     # deterministic
    assert data.sample_questions(questions, 10, seed=1) != sample             # the seed picks other rows
    assert all(q in questions for q in sample) and len({data.question_key(q) for q in sample}) == 10


def test_a_sources_sample_is_its_rows_with_the_smallest_documented_hash():
    questions = sorted_by_source({"nq": 20, "hotpotqa": 20})
    chosen = data.sample_questions(questions, 6, seed=3)

    def digest(q):   # the rule of the docstring, written out
        return hashlib.sha256(f"3\n{q['data_source']}\n{q['id']}".encode()).digest()
    for source in ("nq", "hotpotqa"):
        rows = [q for q in questions if q["data_source"] == source]
        assert [q for q in chosen if q["data_source"] == source] == \
            [q for q in rows if q in sorted(rows, key=digest)[:3]]


def test_a_sample_does_not_depend_on_the_order_of_the_file_or_on_other_sources():
    import random
    questions = sorted_by_source({"nq": 40, "hotpotqa": 40})
    shuffled = list(questions)
    random.Random(0).shuffle(shuffled)
    key = data.question_key
    assert {key(q) for q in data.sample_questions(shuffled, 8)} == {key(q) for q in data.sample_questions(questions, 8)}
    more = questions + sorted_by_source({"musique": 80})           # the same 4 + 4, then 8 from musique
    assert [key(q) for q in data.sample_questions(more, 16) if q["data_source"] != "musique"] == \
        [key(q) for q in data.sample_questions(questions, 8)]


def test_a_limit_at_or_above_the_file_size_keeps_every_row_and_a_bad_limit_is_an_error():
    questions = sorted_by_source({"nq": 3, "hotpotqa": 1})
    assert data.sample_questions(questions, 4) == questions and data.sample_questions(questions, 99) == questions
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="sample_questions: n must be a positive integer"):
            data.sample_questions(questions, bad)
