"""arc_eval.py: evidence selection, the evidence-given probe (with a scripted model that reads its whole
context), `evaluate` with a tiny random model, the `main` entry point, and the paired comparison of
evaluations."""
import json
import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

import arc_eval
import arc_metric
import data
import ddp
import demo
import models
import retriever as retriever_lib
import rollout as rollout_lib
import stats
from arc_eval import PROBE_PRIMERS, evidence_given_probe, needed_passages, place_passages
from arc_metric import contains_answer_tokens, score_record
from rollout import OBS_CLOSE, OBS_OPEN, RolloutConfig, encode_text, format_passages, observation_ids, prompt_text


# ----------------------------------------------------------------------------- a scripted model

class Reader(torch.nn.Module):
    """A stand-in for an HF causal LM with the call signature rollout.py uses. It stores the token
    ids it is fed in the KV cache (keys of shape (B, 1, T, 1) holding the ids as floats), so at each
    step it sees its row's whole context, and plays the demo world like an honest reader:
      "Who founded X?": search X, then answer the name after "X is … founded by" in the passages.
      "Where was the founder of X born?": search X, read the founder P, search P, answer the city
      after "P (born …) … was born in" in what that second search returned.
    Without the passage it needs it searches (or, on the final turn, answers "unknown"). The text of
    a turn starts with whatever the context forced after the last observation (a probe primer):
    after "<think>" it thinks, then answers; after "<answer>" it answers at once, or, with
    think_first=True, writes a thought and then the answer (which the w/o think rule scores 0).
    copy=False: it never reads, and answers "unknown". `turn_contexts` records the decoded context
    at the start of every turn."""

    def __init__(self, tokenizer, copy: bool = True, think_first: bool = False):
        super().__init__()
        self.tokenizer, self.copy, self.think_first = tokenizer, copy, think_first
        self.anchor = torch.nn.Parameter(torch.zeros(1))   # rollout reads the device from the parameters
        self.turn_contexts = []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep):
        assert use_cache and logits_to_keep == 1
        fed = input_ids.to(torch.float32)[:, None, :, None]                     # (B, 1, T, 1)
        keys, _ = past_key_values.update(fed, fed, 0)                            # (B, 1, L, 1)
        assert keys.shape[-2] == attention_mask.shape[1]
        logits = torch.full((input_ids.shape[0], 1, len(self.tokenizer)), -1e9)  # (B, 1, V)
        for b in range(input_ids.shape[0]):
            context = keys[b, 0, attention_mask[b], 0].long().tolist()           # this row's real tokens
            logits[b, 0, self._next_token(context)] = 0.0
        return SimpleNamespace(logits=logits)

    def _next_token(self, context: list[int]) -> int:
        text = self.tokenizer.decode(context, skip_special_tokens=False)
        marker = "<|im_start|>assistant\n"
        prompt_end = text.rfind(marker) + len(marker)
        question = re.search(r"Question: (.+?)\n", text).group(1)
        observations = [m.group(1) for m in re.finditer(re.escape(OBS_OPEN) + "(.*?)" + re.escape(OBS_CLOSE),
                                                        text[prompt_end:], re.DOTALL)]
        last_forced = max(text.rfind(OBS_CLOSE) + len(OBS_CLOSE) if observations else prompt_end,
                          prompt_end)
        written = text[last_forced:]
        if written == "" or written in PROBE_PRIMERS.values():
            self.turn_contexts.append(text)
        plan = self._plan(question, observations, written)
        if not plan.startswith(written) or plan == written:
            return self.tokenizer.eos_token_id
        return encode_text(self.tokenizer, plan[len(written):])[0]

    def _plan(self, question: str, observations: list[str], written: str) -> str:
        """Hop by hop, like the demo's oracle: a hop's fact is read only from the observations that
        came after the search for it (the founder from the 1st on, the founder's birthplace from
        the one after the founder was learned)."""
        two_hop = re.match(r"Where was the founder of (.+) born\?", question)
        company = two_hop.group(1) if two_hop else re.match(r"Who founded (.+)\?", question).group(1)
        founder = city = None
        for k, observation in enumerate(observations):
            if founder is None:
                found = re.search(re.escape(company) + r" is an? \w+ company founded by (.+?) in \d", observation)
                founder, learned_at = (found.group(1), k) if found else (None, None)
            elif two_hop and city is None and k > learned_at:
                found = re.search(re.escape(founder) + r" \(born \d+\) is an? \w+ who was born in (.+?), ",
                                  observation)
                city = found.group(1) if found else None
        answer = (city if two_hop else founder) if self.copy else "unknown"
        search = None if answer or not self.copy else (company if founder is None else founder)
        if search is not None and not written.startswith("<answer>"):
            return f"<think> I need {search}. </think>\n<search> {search} </search>"
        answer = answer or "unknown"
        if written.startswith("<answer>"):
            thought = f" {answer} is what the passage says. </think>\n<answer> {answer} </answer>"
            return "<answer>" + (thought if self.think_first else f" {answer} </answer>")
        return "<think> The passage says it. </think>\n" + f"<answer> {answer} </answer>"


@pytest.fixture(scope="module")
def founder_questions(world):
    rows = [q for q in world.test if q["question"].startswith("Who founded")][:6]
    assert len(rows) == 6
    return rows


@pytest.fixture(scope="module")
def two_hop_questions(world):
    rows = [q for q in world.test if q["question"].startswith("Where was the founder of")][:4]
    assert len(rows) == 4
    return rows


CONFIG = RolloutConfig(max_turns=4, max_new_tokens=40, max_obs_tokens=200, topk=3)


# ----------------------------------------------------------------------------- needed passages

def test_supporting_ids_give_the_rows_own_passages_in_hop_order(world, retriever):
    rows = [q for q in world.test if q["data_source"] == "demo_2hop"][:5]
    for row, passages in zip(rows, needed_passages(rows, retriever)):
        assert [p["id"] for p in passages] == row["supporting_ids"]
        assert contains_answer_tokens(passages[-1]["contents"], row["golden_answers"])   # the last hop's


def test_search_evidence_is_the_best_ranked_gold_passage_of_the_question_plus_gold_searches(world, retriever):
    rows = world.test[:40]
    for row, passages in zip(rows, needed_passages(rows, retriever, evidence="search")):
        assert passages is not None and len(passages) == 1
        searches = retriever.search([f"{row['question']} {g}" for g in row["golden_answers"]], topk=10)
        best_rank = min(rank for hits_g in searches for rank, h in enumerate(hits_g)
                        if contains_answer_tokens(h["contents"], row["golden_answers"]))
        first_gold = next(hits_g[best_rank] for hits_g in searches if len(hits_g) > best_rank and
                          contains_answer_tokens(hits_g[best_rank]["contents"], row["golden_answers"]))
        assert passages[0]["id"] == first_gold["id"]


def test_a_retriever_without_get_falls_back_to_search(world, retriever):
    class SearchOnly:
        def search(self, queries, topk):
            return retriever.search(queries, topk)
    rows = world.test[:10]
    assert needed_passages(rows, SearchOnly()) == needed_passages(rows, retriever, evidence="search")


def test_questions_without_a_gold_passage_are_skipped(world, retriever):
    rows = [{"id": "x", "question": "Who founded Nowhere Works?", "golden_answers": ["Zzyqx Qwv"]},
            {**world.test[0], "golden_answers": ["Zzyqx Qwv"]},        # supporting passage without the gold
            world.test[1]]
    chosen = needed_passages(rows, retriever)
    assert chosen[0] is None and chosen[1] is None and chosen[2] is not None


def test_bad_evidence_requests_are_clear_errors(world, retriever):
    with pytest.raises(ValueError, match=r"id='demo-0-0'.*'nope' is not in the retriever's corpus"):
        needed_passages([{**world.test[0], "supporting_ids": ["nope"]}], retriever)
    with pytest.raises(TypeError, match="'supporting_ids' must be a list of str"):
        needed_passages([{**world.test[0], "supporting_ids": "1166"}], retriever)
    with pytest.raises(ValueError, match="evidence='bm25'"):
        needed_passages(world.test[:1], retriever, evidence="bm25")


def hit(name):
    return {"id": name, "contents": f"{name}\ntext of {name}"}


@pytest.mark.parametrize("hits, needed, expected", [
    ("abc", ["p"], "abp"),                       # missing: takes the last hit's place
    ("abc", ["p", "q"], "apq"),                  # two missing: the last two places, in hop order
    ("pbc", ["p"], "pbc"),                       # present: stays at its own rank
    ("bpc", ["q", "p"], "bpq"),                  # one present at rank 2, the other replaces the last other hit
    ("cpq", ["q", "p"], "cpq"),
    ("ab", ["p"], "abp"),                        # fewer hits than topk: appended
    ("", ["p", "q"], "pq"),
])
def test_place_passages_by_hand(hits, needed, expected):
    placed = place_passages([hit(c) for c in hits], [hit(c) for c in needed], topk=3)
    assert "".join(h["id"] for h in placed) == expected
    with pytest.raises(ValueError, match="topk >= 2"):
        place_passages([hit("a")], [hit("p"), hit("q")], topk=1)


# ----------------------------------------------------------------------------- the probe's context

def information_blocks(text: str) -> list[str]:
    return re.findall(re.escape(OBS_OPEN) + "(.*?)" + re.escape(OBS_CLOSE), text, re.DOTALL)


def test_probe_context_is_the_real_topk_in_the_rollouts_format_with_the_needed_passage(
        world, tokenizer, retriever, founder_questions):
    rows = founder_questions
    model = Reader(tokenizer)
    evidence_given_probe(model, tokenizer, rows, retriever, CONFIG)           # no records: "question" turns
    contexts = [c for c in model.turn_contexts if c.endswith("<answer>")]     # the w/o think probes
    assert len(contexts) == len(rows)
    for row, context, needed in zip(rows, contexts, needed_passages(rows, retriever)):
        query = row["question"].strip()
        assert context.endswith("<search> " + query + " </search>" + OBS_OPEN
                                + information_blocks(context)[-1] + OBS_CLOSE + "<answer>")
        shown = place_passages(retriever.search([query], topk=3)[0], needed, 3)
        assert len(shown) == 3 and needed[0] in [{"id": h["id"], "contents": h["contents"]} for h in shown]
        expected = tokenizer.decode(observation_ids(tokenizer, shown, CONFIG.max_obs_tokens)[0])
        assert OBS_OPEN + information_blocks(context)[-1] + OBS_CLOSE == expected
        assert format_passages(shown).strip() == information_blocks(context)[-1]
        title, _, body = needed[0]["contents"].partition("\n")
        assert f"(Title: {title}) {body}" in information_blocks(context)[-1]


def test_probe_reuses_the_models_own_first_search_turn_token_for_token(world, tokenizer, retriever,
                                                                       founder_questions):
    rows = founder_questions[:3]
    records, _ = arc_eval.evaluate(Reader(tokenizer), tokenizer, rows, retriever, CONFIG, probe=False,
                                   progress=False)
    model = Reader(tokenizer)
    results = evidence_given_probe(model, tokenizer, rows, retriever, CONFIG, records=records)
    probes = [c for c in model.turn_contexts if c.endswith("<answer>")]
    for record, result, context in zip(records, results, probes):
        own = arc_eval._first_sampled_run(record)
        assert tokenizer.decode(own) == record["turns"][0]
        assert result["search_turn"] == "own" and result["own_turn"] == 1.0
        assert result["query"] == record["queries"][0]
        n = record["prompt_length"]
        prompt = tokenizer.decode(record["input_ids"][:n], skip_special_tokens=False)
        assert context.startswith(prompt + tokenizer.decode(own, skip_special_tokens=False) + OBS_OPEN)
    # a model whose evaluation rollout did not open with a search gets the plain-question turn
    silent = [{**records[0], "queries": [], "hits": [], "num_searches": 0}]
    result = evidence_given_probe(Reader(tokenizer), tokenizer, rows[:1], retriever, CONFIG, records=silent)[0]
    assert result["search_turn"] == "question" and result["query"] == rows[0]["question"]


# ----------------------------------------------------------------------------- the probe's scores

@pytest.mark.parametrize("evidence", ["auto", "search"])
def test_a_model_that_copies_the_passage_scores_one_on_both(tokenizer, retriever, founder_questions, evidence):
    results = evidence_given_probe(Reader(tokenizer), tokenizer, founder_questions, retriever,
                                   CONFIG, evidence=evidence, batch_size=5)
    for row, result in zip(founder_questions, results):
        assert result["em_no_think"] == 1.0 and result["em_think"] == 1.0, (row, result)
        # the model wrote only " X </answer>": the forced primer is what makes the answer complete
        assert result["response_no_think"].startswith("<answer> ")
        assert result["response_no_think"].count("<answer>") == 1
        assert result["response_think"].startswith("<think> The passage says it. </think>\n<answer> ")
        assert not result["evidence_truncated"] and result["probe_searches"] == 0
        if evidence == "auto":
            assert result["evidence_ids"] == row["supporting_ids"]


def test_a_model_that_thinks_after_the_answer_primer_scores_zero_without_think(tokenizer, retriever,
                                                                               founder_questions):
    results = evidence_given_probe(Reader(tokenizer, think_first=True), tokenizer, founder_questions, retriever,
                                   CONFIG)
    for result in results:
        assert result["em_no_think"] == 0.0 and result["em_think"] == 1.0
        assert "</think>\n<answer>" in result["response_no_think"]   # its last complete answer would be right


class Blind:
    """The real BM25, except that it never returns the rows' own supporting passages: whatever the
    probe shows of them, the probe placed there."""

    def __init__(self, retriever, rows):
        self.retriever, self.hidden = retriever, {pid for row in rows for pid in row["supporting_ids"]}

    def get(self, pid):
        return self.retriever.get(pid)

    def search(self, queries, topk):
        hits = self.retriever.search(queries, topk=topk + len(self.hidden))
        return [[h for h in per_query if h["id"] not in self.hidden][:topk] for per_query in hits]


def test_a_two_hop_question_searches_again_and_each_search_gets_its_hops_passage(
        world, tokenizer, retriever, two_hop_questions):
    blind = Blind(retriever, two_hop_questions)
    model = Reader(tokenizer)
    results = evidence_given_probe(model, tokenizer, two_hop_questions, blind, CONFIG)
    needed = needed_passages(two_hop_questions, blind)
    starts = {"<answer>": [c for c in model.turn_contexts if c.endswith("<answer>")],
              "<think>": [c for c in model.turn_contexts if c.endswith("<think>")]}
    for passages, no_think, think in zip(needed, starts["<answer>"], starts["<think>"]):
        first_hop, second_hop = (p["contents"].split("\n")[0] for p in passages)
        # w/ think: the first observation holds the first hop's passage only; w/o think: both
        assert f"(Title: {first_hop})" in information_blocks(think)[-1]
        assert f"(Title: {second_hop})" not in information_blocks(think)[-1]
        assert f"(Title: {first_hop})" in information_blocks(no_think)[-1]
        assert f"(Title: {second_hop})" in information_blocks(no_think)[-1]
    for row, result, passages in zip(two_hop_questions, results, needed):
        assert result["em_think"] == 1.0 and result["probe_searches"] == 1, result
        blocks = information_blocks(result["response_think"])                # the searches after the first
        title, _, body = passages[1]["contents"].partition("\n")             # the second hop's passage
        assert len(blocks) == 1 and f"(Title: {title}) {body}" in blocks[0]
    # the same reader with the real rollout and the blind retriever cannot answer: the probe's
    # placement is what it reads
    records, _ = arc_eval.evaluate(Reader(tokenizer), tokenizer, two_hop_questions, blind, CONFIG, probe=False,
                                   progress=False)
    assert all(r["scores"]["em"] == 0.0 for r in records)


def test_a_model_that_does_not_read_the_passage_scores_zero(tokenizer, retriever, founder_questions):
    results = evidence_given_probe(Reader(tokenizer, copy=False), tokenizer, founder_questions, retriever, CONFIG)
    assert all(r["em_no_think"] == 0.0 and r["em_think"] == 0.0 for r in results)
    assert all(r["response_no_think"] == "<answer> unknown </answer>" for r in results)


def test_probe_results_feed_the_report(tmp_path, tokenizer, retriever, founder_questions):
    rows = founder_questions[:3] + [{"id": "none", "question": "Who founded Nowhere Works?",
                                     "golden_answers": ["Zzyqx Qwv"], "data_source": "made_up"}]
    records, report = arc_eval.evaluate(Reader(tokenizer, copy=False), tokenizer, rows, retriever, CONFIG,
                                        batch_size=2, progress=False)
    assert [r["probe"] is None for r in records] == [False, False, False, True]
    assert report["demo_1hop"]["probe_em_no_think"] == 0.0 and report["demo_1hop"]["probe_coverage"] == 1.0
    assert report["made_up"]["probe_coverage"] == 0.0 and "probe_em_think" not in report["made_up"]
    assert report["all"]["probe_coverage"] == 0.75
    assert report["all"]["probe_own_turn"] == 0.0         # it never searched: plain-question turns
    records, report = arc_eval.evaluate(Reader(tokenizer), tokenizer, rows[:3], retriever, CONFIG,
                                        batch_size=2, progress=False)
    assert report["all"]["em"] == 1.0 and report["all"]["probe_em_think"] == 1.0
    assert report["all"]["probe_own_turn"] == 1.0


# ----------------------------------------------------------------------------- evaluate and main

class Rambler(torch.nn.Module):
    """Writes the same token forever: every turn runs out of budget without a search or an answer."""

    def __init__(self, tokenizer):
        super().__init__()
        self.token = encode_text(tokenizer, " hmm")[0]
        self.vocab = len(tokenizer)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep):
        fed = input_ids.to(torch.float32)[:, None, :, None]                     # (B, 1, T, 1)
        past_key_values.update(fed, fed, 0)
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)                 # (B, 1, V)
        logits[:, :, self.token] = 1.0
        return SimpleNamespace(logits=logits)


def test_the_rollouts_invalid_action_nudge_is_not_scored_as_an_answer(world, tokenizer, retriever):
    rows = [{**world.test[0], "golden_answers": ["and"]}]                  # the word the nudge would give
    config = RolloutConfig(max_turns=1, max_new_tokens=3)
    model = Rambler(tokenizer)
    records, report = arc_eval.evaluate(model, tokenizer, rows, retriever, config, probe=False, progress=False)
    record = records[0]
    assert record["num_invalid"] == 1 and "My previous action is invalid" in record["response_text"]
    assert arc_metric.extract_answer(record["response_text"]) == "and"     # what parsing response_text gives
    assert record["turns"] == [tokenizer.decode([model.token]) * 3] * 2   # the model's own text: no answer
    assert record["scores"]["has_answer"] == 0.0 and record["scores"]["em"] == 0.0
    assert arc_metric.answer_em(record["turns"], ["and"]) == 0.0 and report["all"]["em"] == 0.0


def test_evaluate_with_a_tiny_random_model_writes_every_trajectory(tmp_path, world, tokenizer, retriever, tiny_model):
    rows = [q for q in world.test if q["data_source"] == "demo_1hop"][:3] + \
           [q for q in world.test if q["data_source"] == "demo_2hop"][:2]
    rows = [rows[0], rows[3], rows[1], rows[4], rows[2]]                # interleaved sources
    out = tmp_path / "eval" / "trajectories.jsonl"
    config = RolloutConfig(max_turns=1, max_new_tokens=6, max_obs_tokens=64, temperature=5.0)  # evaluate is greedy
    records, report = arc_eval.evaluate(tiny_model, tokenizer, rows, retriever, config, batch_size=2,
                                        out_path=str(out), progress=False)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == json.loads(json.dumps(records))
    assert len(data.load_trajectories(str(out), vocab_size=len(tokenizer))) == 5
    for row, record in zip(rows, records):
        assert {k: record[k] for k in row} == row
        assert record["scores"] == score_record(record)
        # the decoded prompt, for the official DGPO code's proxies: the prompt the rollout built
        assert record["prompt_text"] == prompt_text(tokenizer, row["question"]) == \
            tokenizer.decode(record["input_ids"][:record["prompt_length"]])
        assert set(arc_metric.DGPO_PROXIES) <= set(record["scores"])
        assert 1 <= record["num_turns"] == len(record["turns"]) <= 2
        assert record["probe"]["evidence_ids"] == row["supporting_ids"]
        assert set(record["probe"]) >= {"em_no_think", "em_think", "response_no_think", "response_think"}
    assert list(report) == ["demo_1hop", "demo_2hop", "all"]
    assert (report["demo_1hop"]["n"], report["demo_2hop"]["n"], report["all"]["n"]) == (3, 2, 5)
    assert report["all"]["probe_coverage"] == 1.0
    assert report["all"]["em"] == pytest.approx(sum(r["scores"]["em"] for r in records) / 5)
    for source in ("demo_1hop", "demo_2hop"):                           # per source = that source alone
        alone = arc_metric.arc_report([r for r in records if r["data_source"] == source],
                                      probe=[r["probe"] for r in records if r["data_source"] == source])
        assert report[source] == alone[source]
    again, _ = arc_eval.evaluate(tiny_model, tokenizer, rows, retriever, config, batch_size=5, probe=False,
                                 progress=False)
    assert [r["input_ids"] for r in again] == [r["input_ids"] for r in records]   # greedy: batch-independent
    assert "probe" not in again[0]


def test_evaluate_checks_question_rows_before_generating(tokenizer, retriever):
    model = Reader(tokenizer)
    with pytest.raises(ValueError, match=r"questions\[1\] \(id='b'\): golden_answers is empty"):
        arc_eval.evaluate(model, tokenizer, [{"id": "a", "question": "Q?", "golden_answers": ["x"]},
                                             {"id": "b", "question": "Q?", "golden_answers": []}], retriever)
    with pytest.raises(ValueError, match="'all' is reserved"):
        arc_eval.evaluate(model, tokenizer, [{"question": "Q?", "golden_answers": ["x"], "data_source": "all"}],
                          retriever)
    assert model.turn_contexts == []                                    # nothing was generated


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory, world, tokenizer):
    root = tmp_path_factory.mktemp("demo")
    paths = demo.write_world(world, str(root / "data"))
    demo.make_tiny_model(tokenizer, "test", out_dir=str(root / "model"))
    return root, paths


def test_main_evaluates_a_saved_model_directory(demo_files, capsys):
    root, paths = demo_files
    summary = arc_eval.main(["--model", str(root / "model"), "--data", paths["test"], "--corpus", paths["corpus"],
                             "--out", str(root / "out"), "--limit", "4", "--max-turns", "1",
                             "--max-new-tokens", "6", "--batch-size", "3", "--no-progress"])
    printed = capsys.readouterr().out
    assert "| source | n | em |" in printed and "| all | 4 |" in printed
    saved = json.loads((root / "out" / "report.json").read_text())
    assert saved["report"] == json.loads(json.dumps(summary["report"]))
    assert saved["config"]["greedy"] is True and saved["config"]["max_turns"] == 1 and saved["questions"] == 4
    lines = (root / "out" / "trajectories.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == \
        [q["id"] for q in data.sample_questions(data.load_questions(paths["test"]), 4)]
    assert not (root / "out" / "progress.jsonl").exists()          # the results are written: progress is gone


def test_main_limit_is_a_sample_of_every_source_of_a_file_sorted_by_source(demo_files, tmp_path):
    """Search-R1's test.parquet is sorted by source: --limit must not mean its first N rows (one source)."""
    root, paths = demo_files
    questions = data.load_questions(paths["test"])
    by_source = sorted(questions, key=lambda q: q["data_source"])       # demo_1hop (152) then demo_2hop (88)
    data.write_jsonl(str(tmp_path / "sorted.jsonl"), by_source)
    summary = arc_eval.main(["--model", str(root / "model"), "--data", str(tmp_path / "sorted.jsonl"),
                             "--corpus", paths["corpus"], "--out", str(tmp_path / "out"), "--limit", "4",
                             "--limit-seed", "7", "--max-turns", "0", "--max-new-tokens", "2", "--no-probe",
                             "--no-progress"])
    # shares 4·152/240 = 2.53 and 1.47: floors 2 + 1, the row left over to the larger remainder
    assert {s: row["n"] for s, row in summary["report"].items()} == {"demo_1hop": 3, "demo_2hop": 1, "all": 4}
    assert summary["limit"] == 4 and summary["limit_seed"] == 7
    records = [json.loads(line) for line in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [q["id"] for q in data.sample_questions(by_source, 4, seed=7)]


def test_main_with_a_retrieval_server_finds_evidence_by_search(demo_files, retriever):
    root, paths = demo_files
    server = retriever_lib.make_server(retriever, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        summary = arc_eval.main(["--model", str(root / "model"), "--data", paths["test"], "--retriever-url", url,
                                 "--out", str(root / "out_http"), "--limit", "2", "--max-turns", "0",
                                 "--max-new-tokens", "4", "--no-progress"])
    finally:
        server.shutdown()
        server.server_close()
    assert summary["report"]["all"]["n"] == 2 and summary["report"]["all"]["probe_coverage"] == 1.0
    records = [json.loads(line) for line in (root / "out_http" / "trajectories.jsonl").read_text().splitlines()]
    for record in records:       # the HTTP API cannot fetch by id: evidence came from search, gold first
        assert len(record["probe"]["evidence_ids"]) == 1      # the gold passage found by search
        assert contains_answer_tokens(retriever.get(record["probe"]["evidence_ids"][0])["contents"],
                                      record["golden_answers"])


class CountingRetriever:
    """A BM25 retriever behind the test's server that records how many searches run at once."""

    def __init__(self, inner):
        self.inner, self.lock, self.running, self.most, self.calls = inner, threading.Lock(), 0, 0, 0

    def search(self, queries, topk=3):
        with self.lock:
            self.running, self.calls = self.running + 1, self.calls + 1
            self.most = max(self.most, self.running)
        try:
            return self.inner.search(queries, topk)
        finally:
            with self.lock:
                self.running -= 1


def eval_command(root, paths, url, out, ranks):
    args = ["train.py", "eval", "--model", str(root / "model"), "--data", paths["test"], "--retriever-url", url,
            "--out", str(out), "--limit", "7", "--max-turns", "1", "--max-new-tokens", "6", "--batch-size", "1",
            "--no-progress"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(launch + args, cwd=root_dir, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_eval_under_torchrun_writes_the_report_of_one_process_with_one_search_in_flight(demo_files, retriever,
                                                                                         tmp_path):
    """`torchrun --nproc_per_node=2 train.py eval` (gloo): each rank a share of 7 questions (3 and 4, so
    the ranks make unequal numbers of rollout calls, padded in lockstep), rank 0 the one caller of the
    server, one trajectories.jsonl and report.json: those of one process, record for record."""
    root, paths = demo_files
    counting = CountingRetriever(retriever)
    server = retriever_lib.make_server(counting, port=0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        one = eval_command(root, paths, url, tmp_path / "one", ranks=1)
        assert one.returncode == 0, one.stderr[-3000:]
        two = eval_command(root, paths, url, tmp_path / "two", ranks=2)
        assert two.returncode == 0, two.stderr[-3000:]
    finally:
        server.shutdown()
        server.server_close()
    assert counting.most == 1
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    assert reports[0]["report"] == reports[1]["report"] and reports[1]["ranks"] == 2
    assert reports[0]["report"]["all"]["n"] == 7 and reports[0]["report"]["all"]["probe_coverage"] > 0
    lines = [(tmp_path / name / "trajectories.jsonl").read_text().splitlines() for name in ("one", "two")]
    assert lines[0] == lines[1] and len(lines[0]) == 7
    assert sorted(os.listdir(tmp_path / "two")) == ["report.json", "trajectories.jsonl"]   # no progress left
    assert two.stdout.count("| all | 7 |") == 1                                          # rank 0 prints


@pytest.mark.slow
def test_scoring_imports_without_torch_and_the_script_has_a_cli():
    check = "import sys, arc_metric; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)
    shown = subprocess.run([sys.executable, "arc_metric.py", "--help"], check=True, capture_output=True, text=True)
    assert "--retriever-url" in shown.stdout and "--probe-evidence" in shown.stdout
    with pytest.raises(SystemExit):
        arc_eval.main(["--model", "m", "--data", "d", "--out", "o"])   # a corpus or a server is required


def test_a_topk_too_small_for_the_probe_is_refused_before_any_rollout(tokenizer, retriever, two_hop_questions):
    model = Reader(tokenizer)
    with pytest.raises(ValueError, match="some question needs 2, but topk=1"):
        arc_eval.evaluate(model, tokenizer, two_hop_questions, retriever, RolloutConfig(topk=1), progress=False)
    assert model.turn_contexts == []                                    # nothing was generated


# ----------------------------------------------------------------------------- nothing finished is lost


def test_evaluate_appends_finished_batches_and_a_rerun_continues_from_them(tmp_path, world, tokenizer, retriever,
                                                                           monkeypatch):
    """Rollouts and then the probe's batches go to the progress file as they finish; two crashes (one
    among the rollouts, one inside the probe) and two reruns end with the records and report of one
    uninterrupted evaluation, and no batch is generated twice."""
    rows = [q for q in world.test if q["question"].startswith("Who founded")][:3] + \
           [q for q in world.test if q["question"].startswith("Where was the founder of")][:2]
    config = RolloutConfig(max_turns=2, max_new_tokens=40, max_obs_tokens=200, topk=3)
    model = Reader(tokenizer)
    expected, expected_report = arc_eval.evaluate(model, tokenizer, rows, retriever, config, batch_size=2,
                                                  progress=False)
    real, calls = rollout_lib.rollout, []

    def crashing(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) in (2, 6):                     # 3 batches of rollouts, then 3 + 3 of the probe
            raise RuntimeError("the machine went away")
        return real(*args, **kwargs)
    monkeypatch.setattr(rollout_lib, "rollout", crashing)
    progress = str(tmp_path / "progress.jsonl")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="went away"):
            arc_eval.evaluate(model, tokenizer, rows, retriever, config, batch_size=2, progress=False,
                              progress_path=progress, made_with={"model": "reader"})
    with pytest.raises(ValueError, match=r"progress.jsonl: an unfinished evaluation made with other settings or "
                                         r"inputs \(they differ in config\)"):
        arc_eval.evaluate(model, tokenizer, rows, retriever, RolloutConfig(max_turns=1), batch_size=2,
                          progress=False, progress_path=progress, made_with={"model": "reader"})
    with pytest.raises(ValueError, match=r"\(they differ in model\)"):
        arc_eval.evaluate(model, tokenizer, rows, retriever, config, batch_size=2, progress=False,
                          progress_path=progress, made_with={"model": "another"})
    records, report = arc_eval.evaluate(model, tokenizer, rows, retriever, config, batch_size=2, progress=False,
                                        progress_path=progress, made_with={"model": "reader"})
    # 1st run: rollout batch 1, crash; 2nd: rollout batches 2 and 3, probe w/o think batch 1, crash;
    # 3rd: the rest only, i.e. probe w/o think batches 2 and 3 (rows 2-3, 4), then the 3 of w/ think
    assert calls[:6] == [2, 2, 2, 1, 2, 2] and calls[6:] == [2, 1, 2, 2, 1]
    assert json.loads(json.dumps(records)) == json.loads(json.dumps(expected)) and report == expected_report


def test_main_finds_missing_supporting_passages_before_loading_the_model_and_refuses_a_file_as_out(
        demo_files, tmp_path, monkeypatch):
    root, paths = demo_files
    rows = data.load_questions(paths["test"])[:3]
    rows[1]["supporting_ids"], rows[2]["supporting_ids"] = ["nope-1"], ["nope-2", rows[2]["supporting_ids"][0]]
    data.write_jsonl(str(tmp_path / "q.jsonl"), rows)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"id='demo-0-1': supporting passage 'nope-1' is not in the retriever's "
                                         r"corpus; .*id='demo-0-2': supporting passage 'nope-2'"):
        arc_eval.main(["--model", str(root / "model"), "--data", str(tmp_path / "q.jsonl"), "--corpus",
                       paths["corpus"], "--out", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit):
        arc_eval.main(["--model", str(root / "model"), "--data", paths["test"], "--corpus", paths["corpus"],
                       "--out", str(tmp_path / "taken")])


def test_the_paired_table_gives_the_difference_its_interval_the_discordant_questions_and_mcnemar():
    keys = [("demo", f"q{i}") for i in range(12)]
    kd = dict(zip(keys, [1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0, 1]))
    dgpo = dict(zip(keys, [1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1]))     # right on 4 more, wrong on none more
    worse = dict(zip(keys, [0, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0, 1]))    # wrong on 1 more
    table = arc_eval.paired_table({"KD only": kd, "DGPO": dgpo, "Other": worse})
    rows = table.splitlines()
    assert rows[0].startswith("| method − KD only | questions | EM difference [95% CI] |")
    order = sorted(keys)                                             # the table pairs the questions in key order
    expected = stats.format_difference(stats.paired_difference([kd[k] for k in order], [dgpo[k] for k in order]))
    assert expected.startswith("+0.333 [")
    # McNemar by hand: 4 discordant questions, all one way: p = 2 · (1/2)^4 = 0.125
    assert rows[2] == f"| DGPO | 12 | {expected} | 0 | 4 | 0.125 |"
    assert rows[3].startswith("| Other | 12 | -0.083 [") and rows[3].endswith("| 1 | 0 | 1 |")
    with pytest.raises(ValueError, match="DGPO and KD only were evaluated on different questions"):
        arc_eval.paired_table({"KD only": kd, "DGPO": dict(list(dgpo.items())[:11])})


def test_report_is_replaced_atomically_so_a_crash_mid_write_keeps_the_old_one(tmp_path, monkeypatch):
    """write_report is the one writer of report.json (evaluate_dir and `eval` both call it): a crash
    while the new summary is written leaves the previous file whole, and a finished write leaves no
    temporary file behind."""
    first = arc_eval.write_report(str(tmp_path), {"model": "a", "report": {"em": 0.5}})
    assert json.loads(open(first).read()) == {"model": "a", "report": {"em": 0.5}}

    def torn_dump(obj, f, **kwargs):
        f.write('{"model": "b", "rep')
        raise OSError("disk full")
    monkeypatch.setattr(arc_eval.json, "dump", torn_dump)
    with pytest.raises(OSError, match="disk full"):
        arc_eval.write_report(str(tmp_path), {"model": "b", "report": {"em": 0.7}})
    monkeypatch.undo()
    assert json.loads(open(first).read()) == {"model": "a", "report": {"em": 0.5}}
    arc_eval.write_report(str(tmp_path), {"model": "c", "report": {}})
    assert json.loads(open(first).read())["model"] == "c"
    assert sorted(os.listdir(tmp_path)) == ["report.json"]             # the torn temporary file is gone too


def test_generate_records_with_prompt_from_data_rolls_out_each_rows_own_prompt(world, tokenizer, tiny_model, retriever):
    """The stages' rollouts (RL, tgo, evaluation) start from the file's prompt with --prompt-from data."""
    rows = [{**q, "prompt": [{"role": "user", "content": f"Custom {k}: {q['question']}"}]}
            for k, q in enumerate(world.test[:3])]
    config = RolloutConfig(max_new_tokens=3, max_turns=0, greedy=True, prompt_from="data")
    records = arc_eval.generate_records(tiny_model, tokenizer, rows, retriever, config, ddp.Dist(), batch_size=2)
    for row, record in zip(rows, records):
        expected = rollout_lib.prompt_ids(tokenizer, row["question"], row["prompt"])
        assert record["input_ids"][:record["prompt_length"]] == expected
        assert record["question"] == row["question"]
    built = arc_eval.generate_records(tiny_model, tokenizer, rows, retriever, RolloutConfig(
        max_new_tokens=3, max_turns=0, greedy=True), ddp.Dist(), batch_size=2)
    assert built[0]["input_ids"][:built[0]["prompt_length"]] == rollout_lib.prompt_ids(tokenizer, rows[0]["question"])


def test_seed_paired_arrays_line_up_each_seeds_questions_and_refuse_other_questions():
    reference = [{"q2": 1.0, "q1": 0.0}, {"q1": 1.0, "q2": 1.0}]
    method = [{"q1": 1.0, "q2": 0.0}, {"q2": 0.0, "q1": 0.0}]
    a, b = arc_eval.seed_paired_arrays(reference, method)
    assert a.tolist() == [[0.0, 1.0], [1.0, 1.0]] and b.tolist() == [[1.0, 0.0], [0.0, 0.0]]   # (seeds, N), q1 first
    with pytest.raises(ValueError, match=r"KD → GRPO, run 2: evaluated on other questions than KD, run 1 "
                                         r"\(2 and 2; 'q2' is in one only\)"):
        arc_eval.seed_paired_arrays(reference, [method[0], {"q1": 1.0, "q3": 0.0}], names=("KD", "KD → GRPO"),
                                    runs=["run 1", "run 2"])
    with pytest.raises(ValueError, match="KD has 2 runs and KD → GRPO 1"):
        arc_eval.seed_paired_arrays(reference, method[:1], names=("KD", "KD → GRPO"))
