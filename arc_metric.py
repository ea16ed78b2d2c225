"""Answer scoring (EM / F1 / sub-EM), the ARC capability metrics per data source, and their tables.

What this file does: scores a model's answer against its gold answers, scores one trajectory record
(what the rollout writes) on every metric below, and averages those scores per `data_source` into a
report that renders as a Markdown table laid out like the paper's. That scoring half is pure Python,
standard library only, and every function is pure (no state survives a call — the official code's
metric lists were never cleared, docs/method.md §8).

What it does not do: generate text. The evidence-given probe (Source Referencing) and the evaluation
that rolls a model out, `evaluate`, are in arc_eval.py; `python arc_metric.py` runs arc_eval's entry
point. Nor does it train, sample rollouts for RL, or judge answers with an LLM (ARC is rule-based).

    import arc_metric
    arc_metric.answer_em(record["turns"], ["Paris"])               # 1.0 or 0.0: the RL reward
    report = arc_metric.arc_report(records)                       # records as arc_eval.evaluate makes them
    print(arc_metric.render_table(report, title="DGPO (greedy)"))   # a row per data source, then "all"
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
from dataclasses import fields

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


def scored_records(questions: list, trajectories: list, keys: tuple[str, ...] | None = None) -> list[dict]:
    """Question rows and their trajectories (rollout.Trajectory, in the same order) as trajectory
    records: the question's fields (only `keys`, in that order, if given), every trajectory field,
    and `em`, the binary reward scored on the model's own turns (answer_em). The one way rollouts
    become scored records: RL's and tgo's (arc_eval.generate_records) and the oracle's alike."""
    return [{**({k: q[k] for k in keys} if keys is not None else q), **trajectory_fields(t),
             "em": answer_em(t.turns, q["golden_answers"])} for q, t in zip(questions, trajectories)]


def trajectory_fields(trajectory) -> dict:
    """The trajectory's fields as a dict — what dataclasses.asdict gives for its flat fields, a copy of
    each list (each hit a copy too), without asdict's element-by-element deep copy of every id list,
    which cost RL a twentieth of its time (docs/performance.md)."""
    out = {f.name: getattr(trajectory, f.name) for f in fields(trajectory)}
    return {k: ([[dict(hit) for hit in hits] for hits in v] if k == "hits" else list(v)) if isinstance(v, list) else v
            for k, v in out.items()}


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


if __name__ == "__main__":        # the evaluation entry point is arc_eval's (it imports this module)
    import arc_eval
    import cli
    cli.run_cli(arc_eval.main)
