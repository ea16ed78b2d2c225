"""Answer scoring (EM / F1 / sub-EM), the ARC capability metrics per data source, and evaluation.

What this file does: scores a model's answer against its gold answers, scores one trajectory record
(what the rollout writes) on every metric below, and averages those scores per `data_source` into a
report that renders as a Markdown table laid out like the paper's. That scoring half is pure Python,
standard library only, and every function is pure (no state survives a call — the official code's
metric lists were never cleared, PAPER.md §7). The last two sections generate text: the
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
               </answer>" (PAPER.md §7). Never parse response_text either: it also holds the
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
                    verl/utils/reward_score/qa_em_format.py; DGPO's own ARC script is not public):
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

Source Referencing: the evidence-given probe (evidence_given_probe), per question row
-------------------------------------------------------------------------------------
1. Evidence E, a list of passages {"id", "contents": "title\ntext"} (select_evidence):
   a. If the row has `supporting_ids` (a non-empty list), the retriever can fetch by id
      (`retriever.get(id)`: BM25Retriever can, the HTTP API cannot) and evidence="auto": E = those
      passages, all of them, in the row's order. An id missing from the corpus is an error.
   b. Otherwise by search: for each gold g, search `question + " " + g` (top EVIDENCE_DEPTH = 10
      hits); the gold passage is the best-ranked hit over those searches that contains a gold
      under the whole-token rule (contains_answer_tokens), ties in rank going to the earlier gold.
      E = [gold passage] + the question's own top hits (a search for `question`) that are not the
      gold passage, until E holds `topk` passages. The gold passage is always Doc 1.
   The question is probed only if some passage of E contains a gold under the whole-token rule;
   otherwise it is skipped (result None; e.g. a yes/no gold), and the report counts it in
   probe_coverage.
2. The context imitates one completed search, so it looks like what the model meets in training:
   prompt_ids(question) followed by forced tokens (loss mask 0)
     encode_text(PROBE_SEARCH_TURN)       "<think> I need to search for the answer. </think>\n<search> {q} </search>"
     observation_ids(E, max_obs_tokens)   "\n\n<information>Doc 1(Title: …) …\nDoc 2…</information>\n\n"
     encode_text(primer)                  "<answer>" for w/o think (answer directly), "<think>" for w/ think
   with q = format_question(question), as in the prompt. Each piece is tokenised on its own, as the
   rollout tokenises forced text; the observation is cut to max_obs_tokens as in training (a cut is
   flagged evidence_truncated; in case b the gold passage is Doc 1, so it is cut last).
3. One greedy generation: rollout(..., prefix_ids=[forced tokens]) with max_turns=0 (the final turn:
   a search written now is not executed), up to max_new_tokens.
4. em_no_think / em_think = exact_match(extract_answer(primer + turns[0]), golden_answers). The
   primer is forced text, not the model's, so it is prepended to the model's turn before extraction:
   "<answer>" + " Paris </answer>" -> "Paris". A model that writes a second "<answer>" is read by
   the same rule ("<answer><answer> Paris </answer>" -> "Paris").

Report
------
arc_report(records, probe=None) -> {source: {"n": count, metric: mean, …}, …, "all": {…}}. Sources
in order of first appearance; "all" is the mean over all trajectories (so weighted by source size).
Every number is a mean over trajectories of the per-trajectory value (each question weighs the same,
also for the fractions). With probe results: probe_coverage = fraction of the source's questions
that were probed; probe_em_no_think / probe_em_think = mean over the probed questions only ("–" in
the table when a source has none). render_comparison's "Avg" column is instead the unweighted mean
over sources, which is how the paper's Avg column is computed (PAPER.md §6).
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
# One trajectory record -> its metrics

METRICS = ("em", "f1", "sub_em", "has_answer", "hit_substr", "hit_token", "searches", "has_search",
           "think_turn_frac", "invalid_rate", "response_len_tokens", "turns")
PROBE_KEYS = ("em_no_think", "em_think")  # one probe result per record: {"em_no_think": x, "em_think": y}
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
    """Every per-trajectory metric of METRICS (see the module docstring) for one rollout record.

    Reads golden_answers, turns, queries, hits, num_invalid, input_ids and prompt_length (never
    response_text: answers come from the model's own turns); checks num_searches / num_turns
    against the lists when present.
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
    return {
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


# -----------------------------------------------------------------------------
# Many records -> a report per data source

def _probe_rows(records: list, probe) -> list[dict[str, float]]:
    """Per record {"probe_coverage": 1.0, "probe_em_no_think": x, "probe_em_think": y}, or
    {"probe_coverage": 0.0} for a skipped question (result None), from a list aligned with
    `records` or a dict keyed by record["id"]."""
    if isinstance(probe, Mapping):
        results = []
        for i, record in enumerate(records):
            if "id" not in record:
                raise ValueError(f"records[{i}] has no 'id', but probe results are keyed by id")
            if record["id"] not in probe:
                raise ValueError(f"no probe result for records[{i}] id={record['id']!r}")
            results.append(probe[record["id"]])
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
        columns = ["n"] + [key for key in METRICS + PROBE_COLUMNS if key in present]
    else:
        columns = list(columns)
        for column in columns:
            if not any(column in row for row in report.values()):
                raise ValueError(f"column {column!r} is in no row of the report")
    rows = [[source] + [_cell(row.get(column)) for column in columns] for source, row in report.items()]
    return _markdown(["source"] + columns, rows, title)


def render_comparison(reports: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str = "em",
                      sources=None, title: str | None = None) -> str:
    """Several methods side by side, like PAPER.md §6: a row per method, a column per source of
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

PROBE_SEARCH_TURN = "<think> I need to search for the answer. </think>\n<search> {question} </search>"
PROBE_PRIMERS = {"no_think": "<answer>", "think": "<think>"}   # result keys em_<name>, response_<name>
EVIDENCE_DEPTH = 10   # hits read per `question + gold` search when looking for the gold passage


def _hit_key(hit: Mapping):
    """What makes two hits the same passage: the id, or the text when the server gives no id."""
    return hit["id"] if hit.get("id") is not None else hit["contents"]


def _supporting_passages(row: Mapping, retriever) -> list[dict]:
    """The row's supporting passages fetched by id, in the row's order."""
    ids = row["supporting_ids"]
    if not isinstance(ids, list) or not all(isinstance(pid, str) for pid in ids):
        raise TypeError(f"question id={row.get('id')!r}: 'supporting_ids' must be a list of str, got {ids!r}")
    passages = []
    for pid in ids:
        try:
            passage = retriever.get(pid)
        except KeyError:
            raise ValueError(f"question id={row.get('id')!r}: supporting passage {pid!r} is not in the "
                             "retriever's corpus (use evidence='search', --probe-evidence search, to find "
                             "evidence by search instead)") from None
        passages.append({"id": passage["id"], "contents": passage["contents"]})
    return passages


def select_evidence(questions: list, retriever, topk: int = 3, evidence: str = "auto") -> list[list[dict] | None]:
    """Evidence passages for each question row, or None when none holds a gold answer (skipped).

    evidence="auto": a row's supporting_ids when it has them and the retriever has .get(id), else
    search; evidence="search": always search. The rule is step 1 of the probe in the module
    docstring. All searches go to the retriever in two batched calls.
    """
    if evidence not in ("auto", "search"):
        raise ValueError(f"evidence={evidence!r}: expected 'auto' or 'search'")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
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
    gold_hits = retriever.search([q for _, q in gold_queries], topk=max(topk, EVIDENCE_DEPTH)) if gold_queries else []
    own_hits = retriever.search([questions[i]["question"] for i in to_search], topk=topk) if to_search else []
    hits_per_gold: dict[int, list[list[dict]]] = {i: [] for i in to_search}
    for (i, _), hits in zip(gold_queries, gold_hits):
        hits_per_gold[i].append(hits)
    for i, own in zip(to_search, own_hits):
        ranked = (hits[rank] for rank in range(max(map(len, hits_per_gold[i]), default=0))   # rank first,
                  for hits in hits_per_gold[i] if rank < len(hits))                           # then gold order
        gold_passage = next((hit for hit in ranked if contains_answer_tokens(hit["contents"], golds[i])), None)
        if gold_passage is not None:
            others = [hit for hit in own if _hit_key(hit) != _hit_key(gold_passage)]
            chosen[i] = [gold_passage] + others[:topk - 1]

    for i, passages in enumerate(chosen):      # probed only if a passage really holds a gold answer
        if passages is not None and not any(contains_answer_tokens(p["contents"], golds[i]) for p in passages):
            chosen[i] = None
    return chosen


def probe_prefix_ids(tokenizer, question: str, passages: list[dict], primer: str,
                     max_obs_tokens: int) -> tuple[list[int], bool]:
    """The probe's forced tokens after the prompt (step 2 of the probe): one completed search turn,
    its observation holding `passages`, then `primer`. Returns the ids and whether the observation
    was cut to max_obs_tokens."""
    from rollout import encode_text, format_question, observation_ids
    search_turn = encode_text(tokenizer, PROBE_SEARCH_TURN.format(question=format_question(question)))
    observation, cut = observation_ids(tokenizer, passages, max_obs_tokens)
    return search_turn + observation + encode_text(tokenizer, primer), cut


def evidence_given_probe(model, tokenizer, questions: list, retriever, config=None, evidence: str = "auto",
                         batch_size: int = 64, progress: bool = False) -> list[dict | None]:
    """The evidence-given probe (module docstring) on question rows; one result per row, in order.

    A result is None for a skipped row (no evidence holds a gold answer), else {"em_no_think": 0|1,
    "em_think": 0|1, "response_no_think": primer + turn, "response_think": …, "evidence_ids": [...],
    "evidence_truncated": bool} — the shape arc_report(records, probe=...) takes. config: a
    rollout.RolloutConfig for max_new_tokens, max_obs_tokens, topk and max_total_tokens; it is run
    with max_turns=0 and greedy=True whatever it says.
    """
    from dataclasses import replace

    from tqdm import tqdm

    from rollout import RolloutConfig, rollout
    config = replace(config or RolloutConfig(), max_turns=0, greedy=True)
    evidence_of = select_evidence(questions, retriever, config.topk, evidence)
    results: list[dict | None] = [
        None if passages is None else {"evidence_ids": [p.get("id") for p in passages], "evidence_truncated": False}
        for passages in evidence_of]
    jobs = [(i, name) for i, passages in enumerate(evidence_of) if passages is not None for name in PROBE_PRIMERS]
    for start in tqdm(range(0, len(jobs), batch_size), desc="evidence-given probe", unit="batch", disable=not progress):
        batch = jobs[start:start + batch_size]
        prefixes = []
        for i, name in batch:
            ids, cut = probe_prefix_ids(tokenizer, questions[i]["question"], evidence_of[i], PROBE_PRIMERS[name],
                                        config.max_obs_tokens)
            prefixes.append(ids)
            results[i]["evidence_truncated"] |= cut
        trajectories = rollout(model, tokenizer, [questions[i]["question"] for i, _ in batch], retriever, config,
                               prefix_ids=prefixes)
        for (i, name), trajectory in zip(batch, trajectories):
            response = PROBE_PRIMERS[name] + trajectory.turns[0]     # the forced primer, then the model's turn
            results[i][f"em_{name}"] = exact_match(extract_answer(response), questions[i]["golden_answers"])
            results[i][f"response_{name}"] = response
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
             out_path: str | None = None, progress: bool = True, evidence: str = "auto"):
    """Greedy rollouts over question rows, every trajectory scored, the probe, and the ARC report.

    questions: rows {"question", "golden_answers", "id", "data_source", …} as data.load_questions
    returns them. config: a rollout.RolloutConfig (default: the paper's budgets), always run
    greedy. Returns (records, report): records[i] = {**questions[i], **asdict(trajectory),
    "scores": score_record(...), "probe": probe result or None (only when probe=True)}, and
    report = arc_report(records, probe=...). out_path: write every record there as JSONL.
    """
    from dataclasses import asdict, replace

    from tqdm import tqdm

    from data import write_jsonl
    from rollout import RolloutConfig, rollout
    _check_questions(questions)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    config = replace(config or RolloutConfig(), greedy=True)
    records = []
    for start in tqdm(range(0, len(questions), batch_size), desc="rollouts", unit="batch", disable=not progress):
        batch = questions[start:start + batch_size]
        trajectories = rollout(model, tokenizer, [row["question"] for row in batch], retriever, config)
        for row, trajectory in zip(batch, trajectories):
            record = {**row, **asdict(trajectory)}
            record["scores"] = score_record(record)
            records.append(record)
    probe_results = None
    if probe:
        probe_results = evidence_given_probe(model, tokenizer, questions, retriever, config, evidence=evidence,
                                             batch_size=batch_size, progress=progress)
        for record, result in zip(records, probe_results):
            record["probe"] = result
    if out_path:
        write_jsonl(out_path, records)
    return records, arc_report(records, probe=probe_results)


def main(argv=None) -> dict:
    """`python arc_metric.py --model DIR --data questions.jsonl --corpus corpus.jsonl --out DIR`:
    prints the report as Markdown and writes DIR/report.json and DIR/trajectories.jsonl."""
    import argparse
    import json
    import os
    import time
    from dataclasses import asdict

    parser = argparse.ArgumentParser(prog="arc_metric.py", description="Evaluate a Hugging Face model directory as "
                                     "a search agent: greedy rollouts, EM/F1/sub-EM and ARC per data source.")
    parser.add_argument("--model", required=True, help="HF model directory (AutoModelForCausalLM)")
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: --model)")
    parser.add_argument("--data", required=True, help="questions JSONL: question, golden_answers, id?, data_source?")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="corpus JSONL {id, contents}: BM25 in this process")
    source.add_argument("--retriever-url", help="a Search-R1 retrieval server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--limit", type=int, help="evaluate the first N questions only")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--max-obs-tokens", type=int, default=500)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-probe", action="store_true", help="skip the evidence-given probe")
    parser.add_argument("--probe-evidence", choices=["auto", "search"], default="auto",
                        help="auto: the questions' supporting_ids when present; search: always by search")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data import load_corpus, load_questions
    from retriever import BM25Retriever, HTTPRetriever
    from rollout import RolloutConfig

    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    questions = load_questions(args.data)[:args.limit]
    retriever = BM25Retriever(load_corpus(args.corpus)) if args.corpus else HTTPRetriever(args.retriever_url)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    config = RolloutConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                           max_obs_tokens=args.max_obs_tokens, topk=args.topk, greedy=True)
    trajectories_path = os.path.join(args.out, "trajectories.jsonl")
    _, report = evaluate(model, tokenizer, questions, retriever, config, probe=not args.no_probe,
                         batch_size=args.batch_size, out_path=trajectories_path, progress=not args.no_progress,
                         evidence=args.probe_evidence)
    seconds = time.perf_counter() - started
    print(render_table(report, title=f"{args.model} on {args.data} ({len(questions)} questions, greedy)"))
    summary = {"model": args.model, "data": args.data, "retriever": args.corpus or args.retriever_url,
               "questions": len(questions), "config": asdict(config), "probe": not args.no_probe,
               "probe_evidence": args.probe_evidence, "device": str(device), "seconds": round(seconds, 1),
               "report": report}
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"\nwrote {trajectories_path} and {os.path.join(args.out, 'report.json')} in {seconds:.1f}s")
    return summary


if __name__ == "__main__":
    main()
