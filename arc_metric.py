"""Answer scoring (EM / F1 / sub-EM), the ARC capability metrics per data source, and evaluation.

What this file does: scores a model's answer against its gold answers, scores one trajectory record
(what the rollout writes) on every metric below, and averages those scores per `data_source` into a
report that renders as a Markdown table laid out like the paper's. That scoring half is pure Python,
standard library only, and every function is pure (no state survives a call — the official code's
metric lists were never cleared, docs/method.md §8). The last two sections generate text: the
evidence-given probe (Source Referencing) and the evaluation entry point `evaluate` / `main`; they
import torch, transformers and rollout.py only when called, so scoring needs none of them.

What it does not do: train, sample rollouts for RL, or judge answers with an LLM (ARC is rule-based).

    import arc_metric, data
    questions = data.load_questions("test.jsonl")
    records, report = arc_metric.evaluate(model, tokenizer, questions, retriever, out_path="eval/trajectories.jsonl")
    print(arc_metric.render_table(report, title="DGPO (greedy)"))   # a row per data source, then "all"
    arc_metric.answer_em(records[0]["turns"], ["Paris"])           # 1.0 or 0.0: the RL reward
    # shell: python arc_metric.py --model runs/dgpo --data test.jsonl --corpus corpus.jsonl --out runs/eval

Answer scoring
--------------
normalize(s)   = normalize_answer(s). SQuAD rules, in this order: lower-case (str.lower); delete
               every character of string.punctuation (ASCII only: unicode punctuation such as
               “ ” ¿ – « stays, as in SQuAD and Search-R1, so "“Beijing”" does not match
               "Beijing"); replace the whole words a / an / the by a space (regex \\b, which is
               unicode-aware: "theatre", "another", "théâtre" keep their letters); split on any
               whitespace (unicode included, e.g. U+00A0) and re-join with one space. No accent
               folding: "Café" != "cafe". Punctuation goes first: "a-ha" -> "aha", "3.14" -> "314".
answer         extract_answer(text): the inner text, stripped, of the LAST complete
               `<answer>…</answer>` of one text, where "complete" means an `<answer>` followed by a
               `</answer>` with no other `<answer>` in between (so "<answer> a <answer> b
               </answer>" gives "b"). Tags are case-sensitive. An unclosed `<answer>` is no answer;
               no complete pair gives None.
final answer   final_answer(turns): the answer of a trajectory, read from the MODEL'S OWN TEXT only,
               i.e. record["turns"] (the decoded text of each generation turn): the last complete
               answer of the last turn that has one. An answer must open and close inside one turn.
               Never parse prompt + response: the template holds the example "<answer> Beijing
               </answer>" (docs/method.md §8). Never parse response_text either: it also holds the
               inserted observations and the invalid-action nudge, and the nudge says "put the answer
               between <answer> and </answer>", so a trajectory whose last turn gives no answer would
               score the prediction "and".
em             1 if normalize(answer) equals normalize(g) for some gold g, else 0.
f1             SQuAD token F1 between normalize(answer).split() and normalize(g).split() (bag of
               tokens, counts clipped), maximum over golds.
sub_em         1 if normalize(g) is a character substring of normalize(answer) for some gold g
               (Search-R1 / FlashRAG rule; note "art" is inside "heart"), else 0.
empty          A None answer, or one that normalises to "" (e.g. "!!!", "the"), scores 0 on em,
               f1 and sub_em; a gold that normalises to "" never matches. This is the one
               deliberate deviation from SQuAD/Search-R1, which would give 1 for "" vs "" (and
               sub-EM 1 for any answer against an empty gold): a reward must not pay for an
               empty answer.
golds          A string or a list of strings (FlashRAG data has both); an empty list is an error.

ARC per trajectory (score_record), each a number; the report averages them over trajectories
----------------------------------------------------------------------------------------------
em, f1, sub_em      of final_answer(record["turns"]) against record["golden_answers"].
has_answer          answer format: 1 if final_answer finds a complete answer (even an empty one).
hit_substr          Query Rewriting, the rule of Search-R1's code (is_retrieval_correct in
                    verl/utils/reward_score/qa_em_format.py:145-151, also in the official DGPO code,
                    which logs its own raw proxy instead: dgpo_info_contains_answer below):
                    1 if normalize(g) is a character substring of normalize(passage) for some gold
                    g and some passage the model's own searches retrieved (record["hits"], each
                    hit's "contents" = "title\\ntext"). Search-R1 applies it to the whole
                    <information> block, whose "Doc 1(Title: …)" headers make a gold like "1" hit
                    always; we apply it to the passages, so the headers cannot match. It is NOT a
                    raw case-sensitive substring test: both sides are normalised.
hit_token           Stricter: the token sequence normalize(g).split() occurs contiguously in
                    normalize(passage).split() ("art" does not hit "heart"; "marie curie" hits
                    "Pierre Curie married Marie Curie.").
                    For both: a trajectory without searches scores 0; only record["hits"] count
                    (never the question, the model's own text, or the gold); the full passage is
                    used even when its observation was truncated to the token budget
                    (record["obs_truncated"]), so a gold past the cut still counts as a hit.
searches            number of executed searches, len(record["queries"]).
has_search          1 if searches >= 1.
think_turn_frac     fraction of the model's generation turns (record["turns"], observations
                    excluded) whose text, after leading whitespace, starts with "<think>" and
                    contains "</think>".
invalid_rate        record["num_invalid"] / number of turns (turns that got the invalid-action
                    observation).
response_len_tokens len(record["input_ids"]) - record["prompt_length"]: every token after the
                    prompt, observations included.
turns               number of generation turns, len(record["turns"]).
probe_em_no_think,  Source Referencing (and Thinking): evidence-given EM without / with the
probe_em_think      <think> step, present only when arc_report gets `probe` results (below).

The official DGPO code's validation proxies, for comparison with its logs (extra columns, present when
the record has "prompt_text", the decoded prompt, which `evaluate` stores). The official code
(omron-sinicx/dgpo, verl/trainer/main_ppo.py, RewardManager.__call__, lines 80-108) computes them on
tokenizer.decode(prompt ids + response ids), here record["prompt_text"] + record["response_text"], and
verl/trainer/ppo/ray_trainer.py (_validate, lines 573-595) logs their means per data source as
val/search_count, val/search_present_ratio and val/info_contains_answer_ratio. Per record:
dgpo_search_count          text.count("<search>") - 1 (the -1 removes the prompt's "<search> query
                           </search>"). It counts every "<search>" in the text: searches that were
                           never executed, one per invalid-action nudge (which says "between <search>
                           and </search>"), and any inside retrieved passages. Not `searches`.
dgpo_search_present        1 if dgpo_search_count > 0 (a nudge alone makes it 1).
dgpo_info_contains_answer  1 if some gold g, raw (not normalised: case-sensitive; only an all-blank gold
                           is skipped), is a substring of the inside of some <information…>…</information>
                           block of the text (regex `<information[^>]*>(.*?)</information>`, DOTALL and
                           IGNORECASE, the latter on the tags only). The blocks include the prompt's
                           "between <information> and </information>" (so the golds "a", "an", "and",
                           "d", "n" always hit), the "Doc i(Title: …)" headers (so do "1", "Doc",
                           "Title" after any search), and any block the model writes itself. Not
                           `hit_substr`. docs/method.md §5 lists the differences.

Source Referencing: the evidence-given probe (evidence_given_probe), per question row
-------------------------------------------------------------------------------------
The probe hands the model the passages it needs, inside a context of the kind it meets in its own
rollouts, and scores what it answers: the context opens with the model's own first search, the
observation is the retriever's real top-`topk` in the real format, and a multi-hop question may
search again (each search answered with the needed passages placed in its results).
1. Needed passages E = [p_1, …, p_H], in hop order (needed_passages):
   a. If the row has `supporting_ids` (a non-empty list), the retriever can fetch by id
      (`retriever.get(id)`: BM25Retriever can, the HTTP API cannot) and evidence="auto": E = those
      passages, in the row's order (the demo's two-hop rows: the bridge passage, then the answer's).
      An id missing from the corpus is an error, found before anything is generated.
   b. Otherwise by search: for each gold g, search `question + " " + g` (top EVIDENCE_DEPTH = 10
      hits); E = [the best-ranked hit over those searches that contains a gold under the whole-token
      rule (contains_answer_tokens)], ties in rank going to the earlier gold.
   The question is probed only if some passage of E contains a gold under the whole-token rule;
   otherwise it is skipped (result None; e.g. a yes/no gold), and the report counts it in
   probe_coverage. So is a question whose probe context (step 4) leaves less than max_new_tokens
   under max_total_tokens (a cut answer would count as wrong). topk must be >= every H.
2. The search turn (probe_search_turn): if the model's own evaluation rollout of the question opened
   with an executed search (its first turn's query is its first executed query), that turn's token
   ids exactly as sampled, think and all, and its query ("own"); otherwise the bare turn
   "<search> {question} </search>" with the question as the query ("question"). Which one is
   recorded per row (search_turn, own_turn; the report's probe_own_turn is the fraction "own").
3. The first observation: the retriever's real top-`topk` hits for that query with needed passages
   placed in them (place_passages): a needed passage the hits hold stays at its own rank, the others
   take the places of the last hits that are not needed. w/ think places p_1, the first hop's
   passage; w/o think places all of E (its single answer has no second hop; topk >= H is required).
   observation_ids renders it exactly as the rollout does, cut to max_obs_tokens (a cut is flagged
   evidence_truncated).
4. Context = prompt_ids(question) + search turn + observation + primer, all forced (loss mask 0),
   each piece tokenised on its own as the rollout tokenises forced text, then greedy generation:
   w/o think  primer "<answer>", one final turn (max_turns=0: nothing more is searched). The answer
              is only the text between the forced <answer> and the first </answer> the model
              writes; no </answer> is no answer. A model that thinks instead ("<answer> X is in Y.
              </think>\n<answer> Y </answer>") answers with its thought and scores 0.
   w/ think   primer "<think>", then free continuation with the rest of the normal turn budget
              (max_turns - 1 further rounds: the search turn used one); the k-th search of the
              probe (the forced one is the first) gets the real top-`topk` for its own query with
              p_min(k, H) placed by the rule of step 3, so a two-hop question can make its second
              hop, and each hop sees the passage it needs where the model's own rollout would have
              seen it. The answer is final_answer of the model's turns with the primer prepended to
              the first ("<think>" + " … </think> <answer> Paris </answer>" -> "Paris").
              probe_searches counts the searches after the forced one.
5. em_no_think / em_think = exact_match(answer, golden_answers).

Report
------
arc_report(records, probe=None) -> {source: {"n": count, metric: mean, …}, …, "all": {…}}. Sources
in order of first appearance; "all" is the mean over all trajectories (so weighted by source size).
Every number is a mean over trajectories of the per-trajectory value (each question weighs the same,
also for the fractions). With probe results: probe_coverage = fraction of the source's questions
that were probed; probe_em_no_think / probe_em_think = mean over the probed questions only ("–" in
the table when a source has none). render_comparison's "Avg" column is instead the unweighted mean
over sources, which is how the paper's Avg column is computed (docs/method.md §6).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping

# -----------------------------------------------------------------------------
# Answer scoring

_PUNCTUATION = str.maketrans("", "", string.punctuation)  # ASCII punctuation only, as SQuAD
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# An <answer> followed by the first </answer> with no other <answer> in between.
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: "The  Eiffel-Tower!" -> "eiffeltower", "An apple" -> "apple"."""
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer expects a str, got {type(s).__name__}")
    text = s.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_answer(text: str) -> str | None:
    """Inner text of the last complete <answer>…</answer> of one model-written text, or None.

    "<think>x</think><answer> A </answer>" -> "A". Give it the model's own text only (one turn, or
    use final_answer on the turns): never the prompt (its example "<answer> Beijing </answer>") nor
    response_text (observations, and the invalid-action nudge that says "<answer> and </answer>").
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects the model's text (str), got {type(text).__name__}")
    answers = _ANSWER.findall(text)
    return answers[-1].strip() if answers else None


def final_answer(turns_or_text) -> str | None:
    """A trajectory's answer: the last complete answer of the last model turn that has one, or None.

    turns_or_text: record["turns"], the model-written text of each generation turn (observations and
    nudges are not in it), or one model-written str. An answer must open and close inside one turn.
    ["<search> x </search>", "<think> y </think><answer> A </answer>"] -> "A".
    """
    if isinstance(turns_or_text, str):
        return extract_answer(turns_or_text)
    if not isinstance(turns_or_text, (list, tuple)):
        raise TypeError(f"final_answer expects the model's turns (a list of str) or one str, "
                        f"got {type(turns_or_text).__name__}")
    for turn in reversed(turns_or_text):
        answer = extract_answer(turn)
        if answer is not None:
            return answer
    return None


def _gold_list(golden_answers) -> list[str]:
    """Accept one gold string or a list (tuple, numpy array) of strings; return a list."""
    if isinstance(golden_answers, str):
        return [golden_answers]
    if isinstance(golden_answers, (bytes, Mapping)) or not hasattr(golden_answers, "__iter__"):
        raise TypeError(f"golden_answers must be a str or a list of str, got {type(golden_answers).__name__}")
    golds = list(golden_answers)
    if not golds:
        raise ValueError("golden_answers is empty: a question needs at least one gold answer")
    for gold in golds:
        if not isinstance(gold, str):
            raise TypeError(f"golden_answers must hold strings, got {gold!r} ({type(gold).__name__})")
    return golds


def _normalized_prediction(prediction: str | None) -> str:
    """The normalised prediction; the empty string for None (no answer) or for "!!!", "the", …"""
    if prediction is None:
        return ""
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str or None, got {type(prediction).__name__}")
    return normalize_answer(prediction)


def exact_match(prediction: str | None, golden_answers) -> float:
    """1.0 if the normalised prediction equals some normalised gold: ("the Paris", ["Paris"]) -> 1.0."""
    golds = _gold_list(golden_answers)
    pred = _normalized_prediction(prediction)
    return float(bool(pred) and any(pred == normalize_answer(g) for g in golds))


def sub_em(prediction: str | None, golden_answers) -> float:
    """1.0 if some normalised gold is a substring of the normalised prediction: ("Paris, France", "Paris") -> 1.0."""
    golds = _gold_list(golden_answers)
    pred = _normalized_prediction(prediction)
    if not pred:
        return 0.0
    return float(any(gold and gold in pred for gold in map(normalize_answer, golds)))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    # F1 = 2PR / (P + R), P = common / |pred|, R = common / |gold|, tokens counted as a bag.
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str | None, golden_answers) -> float:
    """Token F1 after normalisation, max over golds: ("Obama", ["Barack Obama"]) -> 2/3."""
    golds = _gold_list(golden_answers)
    pred_tokens = _normalized_prediction(prediction).split()
    if not pred_tokens:
        return 0.0
    return max(_token_f1(pred_tokens, normalize_answer(g).split()) for g in golds)


def answer_em(turns_or_text, golden_answers) -> float:
    """The RL reward: EM of final_answer(turns_or_text), 0.0 when there is no answer.

    Pass trajectory.turns (the model's own text per turn), never response_text, which holds the
    observations and the nudge "…put the answer between <answer> and </answer>…":
    answer_em(["<search> q </search>", "<answer> Paris </answer>"], ["Paris"]) -> 1.0.
    """
    return exact_match(final_answer(turns_or_text), golden_answers)


# -----------------------------------------------------------------------------
# Does a passage contain a gold answer? (the hit ratio, and the probe's choice of passages)

def _has_substr(norm_text: str, norm_golds: list[str]) -> bool:
    return any(gold and gold in norm_text for gold in norm_golds)


def _has_tokens(norm_text: str, norm_golds: list[str]) -> bool:
    # Normalised text is single-space separated, so padding both sides with a space turns
    # "contiguous token subsequence" into a plain substring test.
    padded = f" {norm_text} "
    return any(gold and f" {gold} " in padded for gold in norm_golds)


def contains_answer_substr(text: str, golden_answers) -> bool:
    """Search-R1's rule: some normalised gold is a character substring of the normalised text."""
    return _has_substr(normalize_answer(text), [normalize_answer(g) for g in _gold_list(golden_answers)])


def contains_answer_tokens(text: str, golden_answers) -> bool:
    """Some normalised gold occurs as whole consecutive tokens of the normalised text."""
    return _has_tokens(normalize_answer(text), [normalize_answer(g) for g in _gold_list(golden_answers)])


# -----------------------------------------------------------------------------
# The official DGPO code's validation proxies (verl/trainer/main_ppo.py:98-108), for comparison only

_DGPO_INFORMATION = re.compile(r"<information[^>]*>(.*?)</information>", re.DOTALL | re.IGNORECASE)


def dgpo_search_count(sequence_text: str) -> int:
    """count("<search>") - 1 over the decoded prompt + response (main_ppo.py:98): the prompt's own
    "<search> query </search>" is the -1; unexecuted searches and nudges count too."""
    return sequence_text.count("<search>") - 1


def dgpo_info_contains_answer(sequence_text: str, golden_answers) -> bool:
    """main_ppo.py:102-108: some gold, raw and case-sensitive (a blank gold skipped), is a substring of
    the inside of some <information…>…</information> block of the decoded prompt + response,
    the prompt's own "<information> and </information>" included."""
    golds = _gold_list(golden_answers)
    return any(any(gold.strip() and gold in block for gold in golds)
               for block in _DGPO_INFORMATION.findall(sequence_text))


# -----------------------------------------------------------------------------
# One trajectory record -> its metrics

METRICS = ("em", "f1", "sub_em", "has_answer", "hit_substr", "hit_token", "searches", "has_search",
           "think_turn_frac", "invalid_rate", "response_len_tokens", "turns")
DGPO_PROXIES = ("dgpo_search_count", "dgpo_search_present", "dgpo_info_contains_answer")   # with record["prompt_text"]
PROBE_KEYS = ("em_no_think", "em_think", "own_turn")  # numbers of one probe result, each in [0, 1]
PROBE_OPTIONAL = ("own_turn",)                        # the fraction of probes that reused the model's own search
PROBE_COLUMNS = ("probe_coverage",) + tuple(f"probe_{key}" for key in PROBE_KEYS)


def _field(record: Mapping, key: str, kind: type | tuple[type, ...]):
    """record[key], checked to be of `kind`, or an error naming the record and the key."""
    if key not in record:
        raise ValueError(f"trajectory record id={record.get('id')!r}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"trajectory record id={record.get('id')!r}: {key!r} has type "
                        f"{type(value).__name__}, expected {expected}")
    return value


def _check_count(record: Mapping, key: str, expected: int) -> None:
    """Optional summary counts must agree with the lists they summarise."""
    if key in record and record[key] != expected:
        raise ValueError(f"trajectory record id={record.get('id')!r}: {key}={record[key]!r} "
                         f"disagrees with the record's lists ({expected})")


def data_source(record: Mapping) -> str:
    """The record's data source; "default" when the key is missing; "all" is the report's total row."""
    source = record.get("data_source", "default")
    if not isinstance(source, str) or not source:
        raise TypeError(f"trajectory record id={record.get('id')!r}: "
                        f"data_source must be a non-empty str, got {source!r}")
    if source == "all":
        raise ValueError(f"trajectory record id={record.get('id')!r}: "
                         "data_source 'all' is reserved for the report's total row")
    return source


def _passage_hits(hits: list, norm_golds: list[str], record: Mapping) -> tuple[bool, bool]:
    """(hit_substr, hit_token) over every passage retrieved by every executed search."""
    where = f"trajectory record id={record.get('id')!r}"
    any_substr = any_tokens = False
    for per_search in hits:
        if not isinstance(per_search, list):
            raise TypeError(f"{where}: 'hits' must hold one list of hit dicts per executed search")
        for hit in per_search:
            if not isinstance(hit, Mapping) or not isinstance(hit.get("contents"), str):
                raise TypeError(f"{where}: each hit must be a dict with a str 'contents', got {hit!r}")
            passage = normalize_answer(hit["contents"])
            any_substr = any_substr or _has_substr(passage, norm_golds)
            any_tokens = any_tokens or _has_tokens(passage, norm_golds)
    return any_substr, any_tokens


def score_record(record: Mapping) -> dict[str, float]:
    """Every per-trajectory metric of METRICS (see the module docstring) for one rollout record, and the
    DGPO_PROXIES when the record has "prompt_text" (the decoded prompt).

    Reads golden_answers, turns, queries, hits, num_invalid, input_ids and prompt_length (never
    response_text: answers come from the model's own turns; only the DGPO proxies read it, as the
    official code reads its decoded sequence); checks num_searches / num_turns against the lists when
    present.
    """
    where = f"trajectory record id={record.get('id')!r}"
    gold_field = _field(record, "golden_answers", (str, list, tuple))
    try:
        golds = _gold_list(gold_field)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from error
    turns = _field(record, "turns", list)
    queries = _field(record, "queries", list)
    hits = _field(record, "hits", list)
    num_invalid = _field(record, "num_invalid", int)
    input_ids = _field(record, "input_ids", list)
    prompt_length = _field(record, "prompt_length", int)
    if not turns:
        raise ValueError(f"{where}: 'turns' is empty (every rollout generates at least once)")
    if not all(isinstance(turn, str) for turn in turns):
        raise TypeError(f"{where}: 'turns' must be a list of str")
    if len(hits) != len(queries):
        raise ValueError(f"{where}: {len(hits)} hit lists for {len(queries)} executed queries")
    if not 0 <= num_invalid <= len(turns):
        raise ValueError(f"{where}: num_invalid={num_invalid} outside [0, {len(turns)} turns]")
    if not 0 <= prompt_length <= len(input_ids):
        raise ValueError(f"{where}: prompt_length={prompt_length} outside [0, len(input_ids)={len(input_ids)}]")
    _check_count(record, "num_searches", len(queries))
    _check_count(record, "num_turns", len(turns))

    answer = final_answer(turns)  # the model's own text: no prompt, observations or nudges
    norm_golds = [normalize_answer(g) for g in golds]
    hit_substr, hit_token = _passage_hits(hits, norm_golds, record)
    thinking_turns = sum(turn.lstrip().startswith("<think>") and "</think>" in turn for turn in turns)
    scores = {
        "em": exact_match(answer, golds),
        "f1": f1(answer, golds),
        "sub_em": sub_em(answer, golds),
        "has_answer": float(answer is not None),
        "hit_substr": float(hit_substr),
        "hit_token": float(hit_token),
        "searches": float(len(queries)),
        "has_search": float(len(queries) >= 1),
        "think_turn_frac": thinking_turns / len(turns),
        "invalid_rate": num_invalid / len(turns),
        "response_len_tokens": float(len(input_ids) - prompt_length),
        "turns": float(len(turns)),
    }
    if "prompt_text" in record:              # the official DGPO code's proxies, on its decoded sequence
        sequence = _field(record, "prompt_text", str) + _field(record, "response_text", str)
        searches = dgpo_search_count(sequence)
        scores.update(dgpo_search_count=float(searches), dgpo_search_present=float(searches > 0),
                      dgpo_info_contains_answer=float(dgpo_info_contains_answer(sequence, golds)))
    return scores


# -----------------------------------------------------------------------------
# Many records -> a report per data source

def _probe_rows(records: list, probe) -> list[dict[str, float]]:
    """Per record {"probe_coverage": 1.0, "probe_em_no_think": x, "probe_em_think": y}, or
    {"probe_coverage": 0.0} for a skipped question (result None), from a list aligned with
    `records` or a dict keyed by (data_source, id) or by record["id"]."""
    if isinstance(probe, Mapping):
        results = []
        for i, record in enumerate(records):
            if "id" not in record:
                raise ValueError(f"records[{i}] has no 'id', but probe results are keyed by id")
            key = (data_source(record), record["id"])     # a question's identity in a merged file
            if key not in probe and record["id"] not in probe:
                raise ValueError(f"no probe result for records[{i}] id={record['id']!r}")
            results.append(probe[key] if key in probe else probe[record["id"]])
    else:
        results = list(probe)
        if len(results) != len(records):
            raise ValueError(f"probe has {len(results)} results for {len(records)} records; "
                             "pass a list aligned with records or a dict keyed by id")
    rows = []
    for i, result in enumerate(results):
        if result is None:                       # skipped: no passage with a gold answer was found
            rows.append({"probe_coverage": 0.0})
            continue
        row = {"probe_coverage": 1.0}
        for key in PROBE_KEYS:
            value = result.get(key) if isinstance(result, Mapping) else None
            if key in PROBE_OPTIONAL and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"probe result for records[{i}] needs {key!r} as a number in [0, 1], got {result!r}")
            row[f"probe_{key}"] = float(value)
        rows.append(row)
    return rows


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """{"n": len(rows)} and each key's mean over the rows that have it (probe EMs: probed rows only)."""
    means = {"n": len(rows)}
    for key in dict.fromkeys(key for row in rows for key in row):
        values = [row[key] for row in rows if key in row]
        means[key] = sum(values) / len(values)
    return means


def arc_report(records, probe=None) -> dict[str, dict[str, float]]:
    """Mean of every metric per data source, plus an "all" row; each row also has "n".

    probe: None, or per-record evidence-given results {"em_no_think": float, "em_think": float, …}
    or None for a skipped question (what evidence_given_probe returns), as a list aligned with
    `records` or a dict keyed by record["id"]; adds the columns probe_coverage (fraction probed),
    probe_em_no_think and probe_em_think (means over the probed records). Nothing is kept between
    calls.
    """
    records = list(records)
    if not records:
        raise ValueError("arc_report needs at least one trajectory record")
    probe_rows = _probe_rows(records, probe) if probe is not None else None
    by_source: dict[str, list[dict[str, float]]] = {}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"records[{i}] is a {type(record).__name__}, expected a dict")
        try:
            scores = score_record(record)
            source = data_source(record)
        except (TypeError, ValueError) as error:
            raise type(error)(f"records[{i}]: {error}") from error
        if probe_rows is not None:
            scores.update(probe_rows[i])
        by_source.setdefault(source, []).append(scores)
    report = {source: _mean_rows(rows) for source, rows in by_source.items()}
    report["all"] = _mean_rows([row for rows in by_source.values() for row in rows])
    return report


# -----------------------------------------------------------------------------
# Markdown tables

def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.3f}"


def _markdown(header: list[str], rows: list[list[str]], title: str | None) -> str:
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - 1))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_table(report: Mapping[str, Mapping[str, float]], columns=None, title: str | None = None) -> str:
    """One report as Markdown: a row per source (then "all"), a column per metric, 3 decimals.

    columns: metric names to show, in order; default "n" then every metric present in the report.
    """
    if columns is None:
        present = {key for row in report.values() for key in row}
        columns = ["n"] + [key for key in METRICS + DGPO_PROXIES + PROBE_COLUMNS if key in present]
    else:
        columns = list(columns)
        for column in columns:
            if not any(column in row for row in report.values()):
                raise ValueError(f"column {column!r} is in no row of the report")
    rows = [[source] + [_cell(row.get(column)) for column in columns] for source, row in report.items()]
    return _markdown(["source"] + columns, rows, title)


def render_comparison(reports: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str = "em",
                      sources=None, title: str | None = None) -> str:
    """Several methods side by side, like the paper's tables (docs/method.md §6): a row per method, a column per source of
    `metric`, then Avg = unweighted mean over the sources (the paper's Avg, not the "all" row).

    reports: {"Teacher": arc_report(...), "DGPO": arc_report(...)}; sources: the column order
    (default: every source in order of first appearance). A missing cell shows "–" and leaves
    that method's Avg as "–".
    """
    if sources is None:
        sources = list(dict.fromkeys(s for report in reports.values() for s in report if s != "all"))
    rows = []
    for method, report in reports.items():
        values = [report.get(source, {}).get(metric) for source in sources]
        average = None if None in values or not values else sum(values) / len(values)
        rows.append([method] + [_cell(v) for v in values] + [_cell(average)])
    return _markdown(["method"] + list(sources) + ["Avg"], rows, title)



# -----------------------------------------------------------------------------
# Source Referencing: the evidence-given probe (rollout.py and torch are imported when it runs)

PROBE_QUESTION_TURN = "<search> {question} </search>"   # the search turn of a model that made none
PROBE_PRIMERS = {"no_think": "<answer>", "think": "<think>"}   # result keys em_<name>, response_<name>
EVIDENCE_DEPTH = 10   # hits read per `question + gold` search when looking for the gold passage


def _hit_key(hit: Mapping):
    """What makes two hits the same passage: the id, or the text when the server gives no id."""
    return hit["id"] if hit.get("id") is not None else hit["contents"]


def _supporting_passages(row: Mapping, retriever) -> list[dict]:
    """The row's supporting passages fetched by id, in the row's order (hop order)."""
    passages = []
    for pid in row["supporting_ids"]:
        passage = retriever.get(pid)
        passages.append({"id": passage["id"], "contents": passage["contents"]})
    return passages


def check_supporting_ids(questions: list, retriever, evidence: str = "auto") -> None:
    """Before anything is generated (and before a model is loaded, by main): every `supporting_ids`
    the probe will fetch is a list of str that the retriever's corpus holds; otherwise one error
    naming the first few rows and ids that are not. Nothing to check with evidence="search" or a
    retriever that cannot fetch by id (the HTTP API)."""
    if evidence != "auto" or not callable(getattr(retriever, "get", None)):
        return
    missing = []
    for row in questions:
        ids = row.get("supporting_ids")
        if not ids:
            continue
        if not isinstance(ids, list) or not all(isinstance(pid, str) for pid in ids):
            raise TypeError(f"question id={row.get('id')!r}: 'supporting_ids' must be a list of str, got {ids!r}")
        for pid in ids:
            try:
                retriever.get(pid)
            except KeyError:
                missing.append(f"question id={row.get('id')!r}: supporting passage {pid!r} is not in the "
                               "retriever's corpus")
    if missing:
        more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError("; ".join(missing[:3]) + more + " (use evidence='search', --probe-evidence search, to find "
                         "evidence by search instead, or --no-probe)")


SEARCH_BLOCK = 256        # queries per retriever call while finding evidence: one progress step each


def needed_passages(questions: list, retriever, evidence: str = "auto",
                    progress: bool = False) -> list[list[dict] | None]:
    """The passages each question needs, in hop order, or None when none holds a gold answer (skipped).

    evidence="auto": a row's supporting_ids when it has them and the retriever has .get(id), else
    search; evidence="search": always search. The rule is step 1 of the probe in the module
    docstring. The searches go to the retriever in blocks of SEARCH_BLOCK queries (a progress bar
    with `progress`: for tens of thousands of questions this takes a while).
    """
    from tqdm import tqdm
    if evidence not in ("auto", "search"):
        raise ValueError(f"evidence={evidence!r}: expected 'auto' or 'search'")
    check_supporting_ids(questions, retriever, evidence)
    by_id = evidence == "auto" and callable(getattr(retriever, "get", None))
    golds = [_gold_list(row["golden_answers"]) for row in questions]
    chosen: list[list[dict] | None] = [None] * len(questions)
    to_search = []
    for i, row in enumerate(questions):
        if by_id and row.get("supporting_ids"):
            chosen[i] = _supporting_passages(row, retriever)
        else:
            to_search.append(i)

    gold_queries = [(i, f"{questions[i]['question']} {gold}") for i in to_search for gold in golds[i]]
    gold_hits = []
    for start in tqdm(range(0, len(gold_queries), SEARCH_BLOCK), desc="finding evidence", unit="block",
                      disable=not progress or len(gold_queries) <= SEARCH_BLOCK):
        gold_hits += retriever.search([q for _, q in gold_queries[start:start + SEARCH_BLOCK]], topk=EVIDENCE_DEPTH)
    hits_per_gold: dict[int, list[list[dict]]] = {i: [] for i in to_search}
    for (i, _), hits in zip(gold_queries, gold_hits):
        hits_per_gold[i].append(hits)
    for i in to_search:
        ranked = (hits[rank] for rank in range(max(map(len, hits_per_gold[i]), default=0))   # rank first,
                  for hits in hits_per_gold[i] if rank < len(hits))                           # then gold order
        gold_passage = next((hit for hit in ranked if contains_answer_tokens(hit["contents"], golds[i])), None)
        if gold_passage is not None:
            chosen[i] = [{"id": gold_passage.get("id"), "contents": gold_passage["contents"]}]

    for i, passages in enumerate(chosen):      # probed only if a passage really holds a gold answer
        if passages is not None and not any(contains_answer_tokens(p["contents"], golds[i]) for p in passages):
            chosen[i] = None
    return chosen


def place_passages(hits: list[dict], needed: list[dict], topk: int) -> list[dict]:
    """The retriever's hits for a query with every needed passage placed in them (step 3 of the probe):
    a needed passage the hits already hold stays at its own rank; the others take the places of
    the last hits that are not needed, in hop order. Returns at most `topk` hits.
    Example: hits [a, b, c], needed [p1, p2] -> [a, p1, p2]; hits [p2, b, c], needed [p1, p2] -> [p2, b, p1].
    """
    if len(needed) > topk:
        raise ValueError(f"the probe places all {len(needed)} needed passages in one observation, "
                         f"but topk={topk}: use topk >= {len(needed)}")
    keys = {_hit_key(p) for p in needed}
    placed = list(hits[:topk])
    present = {_hit_key(h) for h in placed}
    missing = [p for p in needed if _hit_key(p) not in present]
    while missing and len(placed) < topk:                      # fewer hits than topk: fill the room
        placed.append(missing.pop(0))
    if missing:
        free = [rank for rank, hit in enumerate(placed) if _hit_key(hit) not in keys]
        for rank, passage in zip(free[len(free) - len(missing):], missing):
            placed[rank] = passage
    return placed


def check_probe_topk(needed: list, topk: int) -> None:
    """w/o think shows every needed passage in one top-k observation: refuse a topk too small for the
    question that needs the most, before anything is generated."""
    most = max((len(p) for p in needed if p is not None), default=0)
    if most > topk:
        raise ValueError(f"the evidence-given probe shows all needed passages at once, and some question needs "
                         f"{most}, but topk={topk}: use --topk >= {most} (or --no-probe)")


def _first_sampled_run(record: Mapping) -> list[int]:
    """The token ids of a trajectory's first generation turn, exactly as sampled: the first run of
    loss-mask-1 tokens after the prompt (turns are separated by forced observations or nudges)."""
    ids, mask, start = record["input_ids"], record["loss_mask"], record["prompt_length"]
    end = start
    while end < len(ids) and mask[end]:
        end += 1
    return list(ids[start:end])


def probe_search_turn(tokenizer, question: str, record: Mapping | None) -> tuple[list[int], str, str]:
    """The search turn before the probe's first observation (step 2 of the probe): (token ids, query,
    "own" | "question"). "own" when the model's evaluation rollout (`record`) opened with a search
    that was executed: its first turn's sampled ids and query, unchanged. Otherwise the plain
    question as the query of a bare search turn."""
    from rollout import encode_text, last_query
    if record is not None and record.get("turns") and record.get("queries"):
        query = last_query(record["turns"][0])
        if query is not None and query == record["queries"][0]:
            return _first_sampled_run(record), query, "own"
    query = question.strip()
    return encode_text(tokenizer, PROBE_QUESTION_TURN.format(question=query)), query, "question"


def _answer_without_think(text: str) -> str | None:
    """w/o think: everything the model wrote between the forced <answer> and the first </answer>
    (None if it never closed it). A model that thinks first makes this text a thought, not an answer."""
    end = text.find("</answer>")
    return text[:end].strip() if end >= 0 else None


def evidence_given_probe(model, tokenizer, questions: list, retriever, config=None, evidence: str = "auto",
                         batch_size: int = 64, progress: bool = False, records: list | None = None,
                         needed: list | None = None, done: dict | None = None,
                         on_batch=None) -> list[dict | None]:
    """The evidence-given probe (module docstring) on question rows; one result per row, in order.

    records: the rows' evaluation trajectories (aligned with questions), whose first search turn is
    reused; None probes every row with the plain-question search turn. A result is None for a
    skipped row (no needed passage holds a gold answer), else {"em_no_think": 0|1, "em_think": 0|1,
    "own_turn": 1|0, "search_turn": "own"|"question", "query", "evidence_ids", "response_no_think",
    "response_think", "probe_searches" (searches made after the first observation, w/ think),
    "evidence_truncated"} — the shape arc_report(records, probe=...) takes. config: a
    rollout.RolloutConfig for the budgets (max_turns, max_new_tokens, max_obs_tokens, topk,
    max_total_tokens); the probe is always greedy. needed: needed_passages(...) if already computed.
    done: {primer name: {row index: that primer's result fields}} computed by an earlier, interrupted
    call with the same arguments (those rows are not generated again); on_batch(name, {row index:
    fields}) is called after every generated batch (evaluate appends them to its progress file).
    """
    from dataclasses import replace

    from tqdm import tqdm

    from rollout import RolloutConfig, encode_text, observation_ids, prompt_ids, rollout
    config = replace(config or RolloutConfig(), greedy=True)
    if records is not None and len(records) != len(questions):
        raise ValueError(f"{len(records)} evaluation records for {len(questions)} questions")
    needed = needed_passages(questions, retriever, evidence) if needed is None else needed
    check_probe_topk(needed, config.topk)
    probed = [i for i, passages in enumerate(needed) if passages is not None]
    results: list[dict | None] = [None] * len(questions)
    turns = {i: probe_search_turn(tokenizer, questions[i]["question"], records[i] if records else None)
             for i in probed}
    first_hits = dict(zip(probed, retriever.search([turns[i][1] for i in probed], topk=config.topk))) \
        if probed else {}
    # the first observation: w/o think gets every needed passage at once (its one answer has no
    # second hop); w/ think gets the first hop's, and each further search k gets hop k's
    shown_first = {"no_think": lambda i: needed[i], "think": lambda i: needed[i][:1]}
    # w/o think: one final turn after "<answer>" (no search can run); w/ think: "<think>", then the
    # rest of the normal turn budget
    budgets = {"no_think": replace(config, max_turns=0),
               "think": replace(config, max_turns=max(config.max_turns - 1, 0))}
    prompt_length = {i: len(prompt_ids(tokenizer, questions[i]["question"])) for i in probed} \
        if config.max_total_tokens is not None else {}
    for i in probed:
        results[i] = {"search_turn": turns[i][2], "own_turn": float(turns[i][2] == "own"), "query": turns[i][1],
                      "evidence_ids": [p.get("id") for p in needed[i]], "evidence_truncated": False}
    for name, primer in PROBE_PRIMERS.items():
        primer_ids = encode_text(tokenizer, primer)
        context: dict[int, list[int]] = {}
        for i in probed:
            shown = place_passages(first_hits[i], shown_first[name](i), config.topk)
            observation, cut = observation_ids(tokenizer, shown, config.max_obs_tokens)
            context[i] = turns[i][0] + observation + primer_ids
            results[i]["evidence_truncated"] |= cut
        # a context that leaves less than a full turn's budget under max_total_tokens is not probed:
        # an answer cut short by the cap would count as wrong, lowering EM instead of coverage
        fits = [i for i in probed if config.max_total_tokens is None
                or prompt_length[i] + len(context[i]) + config.max_new_tokens <= config.max_total_tokens]
        finished = (done or {}).get(name, {})
        for i in fits:
            results[i].update(finished.get(i, {}))
        todo = [i for i in fits if i not in finished]
        for start in tqdm(range(0, len(todo), batch_size), desc=f"evidence-given probe ({name})", unit="batch",
                          disable=not progress):
            batch = todo[start:start + batch_size]
            searches = {i: 1 for i in batch}               # the forced search turn was search 1

            def search_fn(indices, queries, batch=batch, searches=searches):
                placed = []
                for j, hits in zip(indices, retriever.search(queries, topk=config.topk)):
                    i = batch[j]
                    searches[i] += 1
                    hop = needed[i][min(searches[i], len(needed[i])) - 1]       # hop k's passage at search k
                    placed.append(place_passages(hits, [hop], config.topk))
                return placed

            trajectories = rollout(model, tokenizer, [questions[i]["question"] for i in batch], retriever,
                                   budgets[name], prefix_ids=[context[i] for i in batch], search_fn=search_fn)
            generated = {}
            for i, trajectory in zip(batch, trajectories):
                golds = questions[i]["golden_answers"]
                if name == "no_think":
                    fields = {"em_no_think": exact_match(_answer_without_think(trajectory.turns[0]), golds)}
                else:   # the forced primer belongs to the first turn's text
                    answer = final_answer([primer + trajectory.turns[0]] + trajectory.turns[1:])
                    fields = {"em_think": exact_match(answer, golds), "probe_searches": trajectory.num_searches}
                written = trajectory.input_ids[trajectory.prompt_length + len(context[i]) - len(primer_ids):]
                fields[f"response_{name}"] = tokenizer.decode(written, skip_special_tokens=True)
                results[i].update(fields)
                generated[i] = fields
            if on_batch is not None:
                on_batch(name, generated)
    for i in probed:        # a context that fills the length budget leaves the row unprobed
        if "em_no_think" not in results[i] or "em_think" not in results[i]:
            results[i] = None
    return results


# -----------------------------------------------------------------------------
# Evaluation entry point: greedy rollouts over a question set -> trajectories JSONL + ARC report

def _check_questions(questions: list) -> None:
    """Fail before any generation if a row cannot be scored, naming the row."""
    if not questions:
        raise ValueError("evaluate needs at least one question row")
    for i, row in enumerate(questions):
        where = f"questions[{i}] (id={row.get('id') if isinstance(row, Mapping) else None!r})"
        if not isinstance(row, Mapping):
            raise TypeError(f"questions[{i}] is a {type(row).__name__}, expected a dict")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ValueError(f"{where}: 'question' must be a non-empty str")
        if "golden_answers" not in row:
            raise ValueError(f"{where}: missing 'golden_answers'")
        try:
            _gold_list(row["golden_answers"])
            data_source(row)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from error


def evaluate(model, tokenizer, questions: list, retriever, config=None, probe: bool = True, batch_size: int = 64,
             out_path: str | None = None, progress: bool = True, evidence: str = "auto",
             progress_path: str | None = None, made_with: dict | None = None):
    """Greedy rollouts over question rows, every trajectory scored, the probe, and the ARC report.

    questions: rows {"question", "golden_answers", "id", "data_source", …} as data.load_questions
    returns them. config: a rollout.RolloutConfig (default: the paper's budgets), always run
    greedy. Returns (records, report): records[i] = {**questions[i], **asdict(trajectory),
    "prompt_text": the decoded prompt ids (special tokens kept, for the DGPO proxies),
    "scores": score_record(...), "probe": probe result or None (only when probe=True)}, and
    report = arc_report(records, probe=...). out_path: write every record there as JSONL.

    progress_path: a JSONL file every finished batch (of rollouts, then of the probe) is appended to,
    its first line recording how they are made (the settings, a hash of the questions, and
    `made_with`: the caller's description of model, data and retriever). A call that finds the file
    continues after what it holds, and refuses it if it was made otherwise. The caller deletes it
    once the results are safely written.
    """
    from dataclasses import asdict, replace

    from tqdm import tqdm

    from data import write_jsonl
    from rollout import RolloutConfig, default_length_budget, first_overlong_prompt, rollout
    _check_questions(questions)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    config = replace(config or RolloutConfig(), greedy=True)
    if config.max_total_tokens is None:          # never generate past the positions the model knows
        config = replace(config, max_total_tokens=default_length_budget(model))
    needed = None
    if probe:                                    # the probe's own checks, before any rollout
        needed = needed_passages(questions, retriever, evidence, progress=progress)
        check_probe_topk(needed, config.topk)
    overlong = first_overlong_prompt(tokenizer, [row["question"] for row in questions], config.max_total_tokens)
    if overlong is not None:
        i, n = overlong
        raise ValueError(f"questions[{i}] (id={questions[i].get('id')!r}): its prompt is {n} tokens, leaving no "
                         f"room under the length budget of {config.max_total_tokens} (--max-total-tokens, default: "
                         "the model's max_position_embeddings)")
    saved = _Progress(progress_path, {"config": asdict(config), "probe": probe, "evidence": evidence,
                                      "questions": _questions_hash(questions), **(made_with or {})})
    records = [saved.records.get(i) for i in range(len(questions))]
    todo = [i for i, record in enumerate(records) if record is None]
    for start in tqdm(range(0, len(todo), batch_size), desc="rollouts", unit="batch", disable=not progress):
        batch = todo[start:start + batch_size]
        trajectories = rollout(model, tokenizer, [questions[i]["question"] for i in batch], retriever, config)
        for i, trajectory in zip(batch, trajectories):
            record = {**questions[i], **asdict(trajectory)}
            # the prompt as the official DGPO code decodes it (special tokens kept), for its proxies
            record["prompt_text"] = tokenizer.decode(trajectory.input_ids[:trajectory.prompt_length])
            record["scores"] = score_record(record)
            records[i] = record
        saved.add([{"rollout": i, "record": records[i]} for i in batch])
    probe_results = None
    if probe:
        probe_results = evidence_given_probe(
            model, tokenizer, questions, retriever, config, evidence=evidence, batch_size=batch_size,
            progress=progress, records=records, needed=needed, done=saved.probe,
            on_batch=lambda name, fields: saved.add([{"probe": name, "results": {str(i): f for i, f in fields.items()}}]))
        for record, result in zip(records, probe_results):
            record["probe"] = result
    if out_path:
        write_jsonl(out_path, records)
    return records, arc_report(records, probe=probe_results)


def _questions_hash(questions: list) -> str:
    """16 hex digits of sha256 over the question rows: a progress file holds results of these rows only."""
    import hashlib
    import json
    text = json.dumps(questions, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class _Progress:
    """evaluate's progress file (see evaluate): what an interrupted run finished, and where the next
    batches go. No path: nothing is read or written."""

    def __init__(self, path: str | None, made_with: dict):
        import json

        from data import append_jsonl, read_appended
        self.path, self.records, self.probe, self._append = path, {}, {}, append_jsonl
        if path is None:
            return
        made_with = json.loads(json.dumps(made_with, default=str))       # as it reads back from the file
        rows = read_appended(path)
        if not rows:
            append_jsonl(path, [{"made_with": made_with}])
            return
        recorded = rows[0].get("made_with") or {}
        if recorded != made_with:
            differ = sorted(k for k in set(made_with) | set(recorded) if recorded.get(k) != made_with.get(k))
            raise ValueError(f"{path}: an unfinished evaluation made with other settings or inputs (they differ in "
                             f"{', '.join(differ)}); rerun it as it was started to continue it, or pass --overwrite "
                             "to start again")
        for row in rows[1:]:
            if "rollout" in row:
                self.records[row["rollout"]] = row["record"]
            else:
                self.probe.setdefault(row["probe"], {}).update({int(i): f for i, f in row["results"].items()})

    def add(self, rows: list[dict]) -> None:
        if self.path is not None:
            self._append(self.path, rows)


def main(argv=None) -> dict:
    """`python arc_metric.py --model DIR --data questions.jsonl --corpus corpus.jsonl --out DIR`:
    prints the report as Markdown and writes DIR/report.json and DIR/trajectories.jsonl. Finished
    batches go to DIR/progress.jsonl as they complete; a rerun of the same command continues from
    them (see evaluate), and the file is deleted once the results are written."""
    import argparse
    import json
    import os
    import time
    from dataclasses import asdict

    # models, tokenizers, retrievers and errors as in every training stage: a directory or a Hub id,
    # errors naming the argument, bf16 on GPU, non-finite weights refused; a server checked once
    from train import (ArgumentParser, Dist, add_retriever_client_args, check_writable, input_fingerprints, load_model,
                       load_tokenizer, make_retriever)

    parser = ArgumentParser(prog="arc_metric.py", description="Evaluate a Hugging Face model directory as "
                            "a search agent: greedy rollouts, EM/F1/sub-EM and ARC per data source.")
    parser.add_argument("--model", required=True, help="HF model directory (AutoModelForCausalLM)")
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: --model)")
    parser.add_argument("--data", required=True, help="questions JSONL: question, golden_answers, id?, data_source?")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="corpus JSONL {id, contents} (.jsonl or .jsonl.gz): BM25 in this process")
    source.add_argument("--index", help="a BM25 index directory built by `python retriever.py index`")
    source.add_argument("--retriever-url", help="a Search-R1 retrieval server, e.g. http://127.0.0.1:8000")
    add_retriever_client_args(parser)
    def at_least(low):
        def parse(text):
            value = int(text)
            if value < low:
                raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
            return value
        parse.__name__ = "int"
        return parse

    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--limit", type=at_least(1),
                        help="evaluate N questions: a seeded sample stratified by data_source, each source keeping "
                             "its share of the file, in file order (data.sample_questions; not the first N rows: "
                             "Search-R1's test.parquet is sorted by source)")
    parser.add_argument("--limit-seed", type=int, default=0, help="the seed of --limit's sample")
    parser.add_argument("--max-turns", type=at_least(0), default=4)
    parser.add_argument("--max-new-tokens", type=at_least(1), default=500)
    parser.add_argument("--max-obs-tokens", type=at_least(0), default=500)
    parser.add_argument("--max-total-tokens", type=at_least(1),
                        help="cap on prompt + response (default: the model's max_position_embeddings)")
    parser.add_argument("--topk", type=at_least(1), default=3)
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--no-probe", action="store_true", help="skip the evidence-given probe")
    parser.add_argument("--probe-evidence", choices=["auto", "search"], default="auto",
                        help="auto: the questions' supporting_ids when present; search: always by search")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: is a file; eval writes a directory (report.json, trajectories.jsonl)")
    done = [name for name in ("report.json", "trajectories.jsonl") if os.path.exists(os.path.join(args.out, name))]
    if done and not args.overwrite:
        parser.error(f"--out {args.out} already holds {', '.join(done)}; pass --overwrite to replace them")
    check_writable(args.out)

    import torch

    from data import load_questions, sample_questions
    from rollout import RolloutConfig

    started = time.perf_counter()
    questions = load_questions(args.data)
    if args.limit is not None:
        questions = sample_questions(questions, args.limit, seed=args.limit_seed)
    progress_path = os.path.join(args.out, "progress.jsonl")
    inputs = input_fingerprints({"--model": args.model, "--tokenizer": args.tokenizer, "--data": args.data,
                                 "--corpus": args.corpus, "--index": args.index, "--retriever-url": args.retriever_url},
                                rows={"--data": len(questions)})
    # a rerun continues only with the same inputs, wherever they lie now (the paths are not compared)
    made_with = {"inputs": {arg: {k: v for k, v in fp.items() if k != "path"} for arg, fp in inputs.items()},
                 "limit": args.limit, "limit_seed": args.limit_seed}
    retriever = make_retriever(args.corpus, args.retriever_url, args.topk, index=args.index,
                               retry_seconds=args.retriever_retry_seconds, timeout=args.retriever_timeout)
    if not args.no_probe:                # the questions' supporting passages exist: before a model is loaded
        check_supporting_ids(questions, retriever, args.probe_evidence)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    model = load_model(args.model, Dist(device=device), trainable=False)
    config = RolloutConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                           max_obs_tokens=args.max_obs_tokens, topk=args.topk, greedy=True,
                           max_total_tokens=args.max_total_tokens)
    os.makedirs(args.out, exist_ok=True)
    if args.overwrite and os.path.exists(progress_path):   # only now: every input has loaded
        os.remove(progress_path)
    trajectories_path = os.path.join(args.out, "trajectories.jsonl")
    _, report = evaluate(model, tokenizer, questions, retriever, config, probe=not args.no_probe,
                         batch_size=args.batch_size, out_path=trajectories_path, progress=not args.no_progress,
                         evidence=args.probe_evidence, progress_path=progress_path, made_with=made_with)
    seconds = time.perf_counter() - started
    print(render_table(report, title=f"{args.model} on {args.data} ({len(questions)} questions, greedy)"))
    summary = {"model": args.model, "data": args.data, "retriever": args.corpus or args.index or args.retriever_url,
               "questions": len(questions), "limit": args.limit, "limit_seed": args.limit_seed,
               "config": asdict(config), "probe": not args.no_probe,
               "probe_evidence": args.probe_evidence, "device": str(device), "seconds": round(seconds, 1),
               "report": report}
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.remove(progress_path)
    print(f"\nwrote {trajectories_path} and {os.path.join(args.out, 'report.json')} in {seconds:.1f}s")
    return summary


if __name__ == "__main__":
    from train import run_cli      # errors a person can act on print one line (--debug: the traceback)
    run_cli(main)
