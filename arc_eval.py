"""Evaluation: rollouts scored into records, the evidence-given probe, and the eval entry point.

What it does: `generate_records` rolls a model out over question rows and scores each trajectory's
binary EM on the model's own turns (the records RL, tgo and the oracle's data are made of);
`evaluate` runs greedy rollouts over a question set, scores every trajectory on every metric
(arc_metric.score_record), runs the evidence-given probe (Source Referencing: the gold passages
placed in the first search's results, does the model then answer?) and returns the ARC report;
`evaluate_dir` does that for a model directory and writes its report.json; `paired_differences`
compares evaluations of several methods on the same questions (bootstrap interval, McNemar), and
`comparison_tables` shows them side by side (the demo's results tables); `main` is
`python arc_eval.py` / `python train.py eval`, resumable from its progress file.

What it does not do: define the metrics or render the tables (arc_metric.py, standard library only),
generate text (rollout.py), or train.

    import arc_eval, arc_metric, data
    questions = data.load_questions("test.jsonl")
    records, report = arc_eval.evaluate(model, tokenizer, questions, retriever, out_path="eval/trajectories.jsonl")
    print(arc_metric.render_table(report, title="DGPO (greedy)"))   # a row per data source, then "all"
    # shell: python arc_eval.py --model runs/dgpo --data test.jsonl --corpus corpus.jsonl --out runs/eval
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm import tqdm

import arc_metric
import checkpoint
import cli
import data
import ddp
import models
import retriever as retriever_lib
import rollout
import stats


# -----------------------------------------------------------------------------
# Rollouts as scored records: what RL, tgo and the evaluation of a model directory are made of


def generate_records(model, tokenizer, questions: list[dict], retriever, rcfg: rollout.RolloutConfig, dist: ddp.Dist,
                     batch_size: int, generator=None, desc: str | None = None) -> list[dict]:
    """Rolls out `questions` (in chunks of batch_size) and returns trajectory records: the question
    fields + every Trajectory field + `em` (the binary reward, scored on the model's own turns)."""
    raw = models.hf_model(model)
    records = []
    chunks = in_lockstep([questions[i:i + batch_size] for i in range(0, len(questions), batch_size)], retriever, dist)
    lockstep = getattr(retriever, "collective", False)
    for chunk in tqdm(chunks, desc=desc, disable=desc is None or not dist.master, leave=False):
        with ddp.autocast(dist):
            trajs = rollout.rollout(raw, tokenizer, [q["question"] for q in chunk], retriever, rcfg,
                                    generator=generator, chats=rollout.row_chats(chunk, rcfg.prompt_from),
                                    lockstep=lockstep)
        records += arc_metric.scored_records(chunk, trajs, keys=("id", "question", "golden_answers", "data_source"))
    return records


def in_lockstep(batches: list[list], retriever, dist: ddp.Dist | None) -> list[list]:
    """`batches` padded with empty ones to the most any rank has, when the retriever is one every rank
    calls together (ddp.OneCallerRetriever): every rank then makes as many rollout() calls, each
    searching in lockstep. Otherwise `batches` as they are."""
    if not getattr(retriever, "collective", False):
        return batches
    most = int(max(ddp.all_gather_objects(dist or ddp.Dist(), [len(batches)])))
    return batches + [[] for _ in range(most - len(batches))]


def evaluate_dir(model_dir: str, questions: list[dict], retriever, rcfg: rollout.RolloutConfig, dist: ddp.Dist,
                 out_dir: str | None, batch_size: int = 64, probe: bool = True) -> dict:
    """`evaluate` of one HF model directory (greedy rollouts, ARC report), its report.json in out_dir."""
    model = models.load_model(model_dir, dist, trainable=False)
    tokenizer = models.load_tokenizer(model_dir)
    with ddp.autocast(dist):
        _, report = evaluate(model, tokenizer, questions, retriever, rcfg, probe=probe,
                             batch_size=batch_size, progress=dist.master,
                             out_path=os.path.join(out_dir, "trajectories.jsonl") if out_dir else None)
    if out_dir and dist.master:
        write_report(out_dir, {"model": model_dir, "questions": len(questions), "config": asdict(rcfg),
                               "report": report})
    return report


def write_report(out_dir: str, summary: dict) -> str:
    """DIR/report.json, the one place an evaluation's summary is written: {"model", "questions",
    "config", …, "report"}, replaced atomically (a crash leaves the old file or the new, never half)."""
    path = os.path.join(out_dir, "report.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


# -----------------------------------------------------------------------------
# Source Referencing: the evidence-given probe

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
    if evidence not in ("auto", "search"):
        raise ValueError(f"evidence={evidence!r}: expected 'auto' or 'search'")
    check_supporting_ids(questions, retriever, evidence)
    by_id = evidence == "auto" and callable(getattr(retriever, "get", None))
    golds = [arc_metric._gold_list(row["golden_answers"]) for row in questions]
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
        gold_passage = next((hit for hit in ranked if arc_metric.contains_answer_tokens(hit["contents"], golds[i])),
                            None)
        if gold_passage is not None:
            chosen[i] = [{"id": gold_passage.get("id"), "contents": gold_passage["contents"]}]

    for i, passages in enumerate(chosen):      # probed only if a passage really holds a gold answer
        if passages is not None and not any(arc_metric.contains_answer_tokens(p["contents"], golds[i])
                                            for p in passages):
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
    if record is not None and record.get("turns") and record.get("queries"):
        query = rollout.last_query(record["turns"][0])
        if query is not None and query == record["queries"][0]:
            return _first_sampled_run(record), query, "own"
    query = question.strip()
    return rollout.encode_text(tokenizer, PROBE_QUESTION_TURN.format(question=query)), query, "question"


def _answer_without_think(text: str) -> str | None:
    """w/o think: everything the model wrote between the forced <answer> and the first </answer>
    (None if it never closed it). A model that thinks first makes this text a thought, not an answer."""
    end = text.find("</answer>")
    return text[:end].strip() if end >= 0 else None


def evidence_given_probe(model, tokenizer, questions: list, retriever, config=None, evidence: str = "auto",
                         batch_size: int = 64, progress: bool = False, records: list | None = None,
                         needed: list | None = None, done: dict | None = None,
                         on_batch=None, dist: ddp.Dist | None = None) -> list[dict | None]:
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
    A retriever every rank calls together (ddp.OneCallerRetriever, under torchrun) is called as often
    on every rank: each rank's batches padded to the most any rank has (in_lockstep; `dist`).
    """


    config = replace(config or rollout.RolloutConfig(), greedy=True)
    if records is not None and len(records) != len(questions):
        raise ValueError(f"{len(records)} evaluation records for {len(questions)} questions")
    needed = needed_passages(questions, retriever, evidence) if needed is None else needed
    check_probe_topk(needed, config.topk)
    probed = [i for i, passages in enumerate(needed) if passages is not None]
    results: list[dict | None] = [None] * len(questions)
    turns = {i: probe_search_turn(tokenizer, questions[i]["question"], records[i] if records else None)
             for i in probed}
    lockstep = getattr(retriever, "collective", False)
    first_hits = dict(zip(probed, retriever.search([turns[i][1] for i in probed], topk=config.topk))) \
        if probed or lockstep else {}
    # the first observation: w/o think gets every needed passage at once (its one answer has no
    # second hop); w/ think gets the first hop's, and each further search k gets hop k's
    shown_first = {"no_think": lambda i: needed[i], "think": lambda i: needed[i][:1]}
    # w/o think: one final turn after "<answer>" (no search can run); w/ think: "<think>", then the
    # rest of the normal turn budget
    budgets = {"no_think": replace(config, max_turns=0),
               "think": replace(config, max_turns=max(config.max_turns - 1, 0))}
    chats = rollout.row_chats(questions, config.prompt_from)
    prompt_length = {i: len(rollout.prompt_ids(tokenizer, questions[i]["question"], None if chats is None else chats[i]))
                     for i in probed} if config.max_total_tokens is not None else {}
    for i in probed:
        results[i] = {"search_turn": turns[i][2], "own_turn": float(turns[i][2] == "own"), "query": turns[i][1],
                      "evidence_ids": [p.get("id") for p in needed[i]], "evidence_truncated": False}
    for name, primer in PROBE_PRIMERS.items():
        primer_ids = rollout.encode_text(tokenizer, primer)
        context: dict[int, list[int]] = {}
        for i in probed:
            shown = place_passages(first_hits[i], shown_first[name](i), config.topk)
            observation, cut = rollout.observation_ids(tokenizer, shown, config.max_obs_tokens)
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
        batches = in_lockstep([todo[start:start + batch_size] for start in range(0, len(todo), batch_size)],
                              retriever, dist)
        for batch in tqdm(batches, desc=f"evidence-given probe ({name})", unit="batch", disable=not progress):
            searches = {i: 1 for i in batch}               # the forced search turn was search 1

            def search_fn(indices, queries, batch=batch, searches=searches):
                placed = []
                for j, hits in zip(indices, retriever.search(queries, topk=config.topk)):
                    i = batch[j]
                    searches[i] += 1
                    hop = needed[i][min(searches[i], len(needed[i])) - 1]       # hop k's passage at search k
                    placed.append(place_passages(hits, [hop], config.topk))
                return placed

            trajectories = rollout.rollout(model, tokenizer, [questions[i]["question"] for i in batch], retriever,
                                           budgets[name], prefix_ids=[context[i] for i in batch], search_fn=search_fn,
                                           chats=None if chats is None else [chats[i] for i in batch],
                                           lockstep=lockstep)
            generated = {}
            for i, trajectory in zip(batch, trajectories):
                golds = questions[i]["golden_answers"]
                if name == "no_think":
                    fields = {"em_no_think": arc_metric.exact_match(_answer_without_think(trajectory.turns[0]), golds)}
                else:   # the forced primer belongs to the first turn's text
                    answer = arc_metric.final_answer([primer + trajectory.turns[0]] + trajectory.turns[1:])
                    fields = {"em_think": arc_metric.exact_match(answer, golds),
                              "probe_searches": trajectory.num_searches}
                written = trajectory.input_ids[trajectory.prompt_length + len(context[i]) - len(primer_ids):]
                fields[f"response_{name}"] = tokenizer.decode(written, skip_special_tokens=True)
                results[i].update(fields)
                generated[i] = fields
            if on_batch is not None and batch:
                on_batch(name, generated)
    for i in probed:        # a context that fills the length budget leaves the row unprobed
        if "em_no_think" not in results[i] or "em_think" not in results[i]:
            results[i] = None
    return results


# -----------------------------------------------------------------------------
# Comparing evaluations: methods paired on the same questions


def per_question_em(trajectories_path: str) -> dict[tuple[str, str], float]:
    """{(data_source, id): EM} of every question of an evaluation's trajectories.jsonl (arc_metric's)."""
    return {data.question_key(row): float(row["scores"]["em"]) for _, row in data.read_jsonl(trajectories_path)}


def seed_paired_arrays(reference: list[dict], method: list[dict], names: tuple[str, str] = ("reference", "method"),
                       runs: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two methods' per-question scores over the same seeds ([per_question_em(...)] one dict a seed) as
    arrays of shape (seeds, N), every row's questions in one order: what stats.paired_difference pools
    over seeds. Every run must have scored the same questions: otherwise an error naming the method, the
    run (`runs`: a label per seed, e.g. "seed 1"; default "run 0", "run 1", …) and a question in one only."""
    if not reference or len(reference) != len(method):
        raise ValueError(f"{names[0]} has {len(reference)} runs and {names[1]} {len(method)}: a paired "
                         "difference over seeds needs the same seeds, at least one")
    runs = list(runs) if runs is not None else [f"run {i}" for i in range(len(reference))]
    keys = sorted(reference[0])
    for name, scored in zip(names, (reference, method)):
        for run, scores in zip(runs, scored):
            if sorted(scores) != keys:
                odd = sorted(set(scores) ^ set(keys))[0]
                raise ValueError(f"{name}, {run}: evaluated on other questions than {names[0]}, {runs[0]} "
                                 f"({len(scores)} and {len(keys)}; {odd!r} is in one only): a paired difference "
                                 "needs the same ones")
    return tuple(np.array([[scores[k] for k in keys] for scores in scored]) for scored in (reference, method))


def paired_differences(per_question: dict[str, dict], reference: str = "KD only") -> dict[str, dict]:
    """Every other method against `reference` on the same questions: {method: {diff, low, high, n,
    seeds} (the EM difference method − reference with its 95% bootstrap interval over questions,
    stats.paired_difference), only_reference / only_method (the questions only one of the two got
    right), mcnemar_p (stats.mcnemar_exact)}. A method scored on other questions than the reference
    is an error naming both."""
    ref = per_question[reference]
    keys = sorted(ref)
    out = {}
    for name, scores in per_question.items():
        if name == reference:
            continue
        if set(scores) != set(ref):
            raise ValueError(f"{name} and {reference} were evaluated on different questions "
                             f"({len(scores)} and {len(ref)}): a paired comparison needs the same ones")
        a, b = np.array([ref[k] for k in keys]), np.array([scores[k] for k in keys])
        only_b, only_a = stats.discordant_counts(a, b)
        out[name] = {**stats.paired_difference(a, b), "only_reference": only_a, "only_method": only_b,
                     "mcnemar_p": stats.mcnemar_exact(a, b)}
    return out


def paired_table(per_question: dict[str, dict], reference: str = "KD only") -> str:
    """paired_differences as a Markdown table, a row per method."""
    rows = [f"| method − {reference} | questions | EM difference [95% CI] | only {reference} right | "
            "only method right | McNemar p |", "|---|---:|---|---:|---:|---:|"]
    for name, d in paired_differences(per_question, reference).items():
        rows.append(f"| {name} | {d['n']} | {stats.format_difference(d)} | {d['only_reference']} | "
                    f"{d['only_method']} | {d['mcnemar_p']:.3g} |")
    return "\n".join(rows)


def comparison_tables(reports: dict[str, dict], per_question: dict[str, dict] | None = None,
                      split: str = "the test split") -> str:
    """Several models evaluated on the same test questions: methods × (EM per data source, Avg),
    evidence-given EM w/ think per source, and the ARC columns on all questions; with `per_question`
    ({method: per_question_em(...)}, "KD only" among them) the paired comparison of every other method
    with the KD model (paired_table)."""
    em = arc_metric.render_comparison(reports, metric="em", title=f"EM on {split}")
    probe = arc_metric.render_comparison(reports, metric="probe_em_think",
                                         title=f"Evidence-given EM, w/ think, on {split}")
    columns = ["em", "f1", "hit_substr", "searches", "probe_em_no_think", "probe_em_think", "probe_own_turn",
               "has_answer"]
    rows = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, report in reports.items():
        rows.append(f"| {name} | " + " | ".join(f"{report['all'].get(c, float('nan')):.3f}" for c in columns) + " |")
    table = em + "\n\n" + probe + "\n\nARC (all test questions)\n" + "\n".join(rows)
    if per_question:
        table += ("\n\nPaired on the same test questions (95% CI: bootstrap over questions)\n"
                  + paired_table(per_question))
    return table


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
            arc_metric._gold_list(row["golden_answers"])
            arc_metric.data_source(row)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from error


def evaluate(model, tokenizer, questions: list, retriever, config=None, probe: bool = True, batch_size: int = 64,
             out_path: str | None = None, progress: bool = True, evidence: str = "auto",
             progress_path: str | None = None, made_with: dict | None = None, needed: list | None = None,
             dist: ddp.Dist | None = None):
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

    needed: needed_passages(questions, ...) if already computed (main: on rank 0, for every rank's
    share). dist: under torchrun with a retriever every rank calls together (ddp.OneCallerRetriever),
    each rank evaluates its own share of the questions and pads its batches to the most any rank has,
    so every rank searches equally often (in_lockstep).
    """


    _check_questions(questions)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    config = replace(config or rollout.RolloutConfig(), greedy=True)
    if config.max_total_tokens is None:          # never generate past the positions the model knows
        config = replace(config, max_total_tokens=rollout.default_length_budget(model))
    if probe:                                    # the probe's own checks, before any rollout
        if needed is None:
            needed = needed_passages(questions, retriever, evidence, progress=progress)
        if len(needed) != len(questions):
            raise ValueError(f"needed has {len(needed)} rows for {len(questions)} questions")
        check_probe_topk(needed, config.topk)
    rollout.check_prompts(tokenizer, questions, config.max_total_tokens, "question", config.prompt_from)
    saved = _Progress(progress_path, {"config": asdict(config), "probe": probe, "evidence": evidence,
                                      "questions": _questions_hash(questions), **(made_with or {})})
    records = [saved.records.get(i) for i in range(len(questions))]
    todo = [i for i, record in enumerate(records) if record is None]
    batches = in_lockstep([todo[start:start + batch_size] for start in range(0, len(todo), batch_size)], retriever, dist)
    for batch in tqdm(batches, desc="rollouts", unit="batch", disable=not progress):
        trajectories = rollout.rollout(model, tokenizer, [questions[i]["question"] for i in batch], retriever, config,
                                       chats=rollout.row_chats([questions[i] for i in batch], config.prompt_from),
                                       lockstep=getattr(retriever, "collective", False))
        for i, trajectory in zip(batch, trajectories):
            record = {**questions[i], **asdict(trajectory)}
            # the prompt as the official DGPO code decodes it (special tokens kept), for its proxies
            record["prompt_text"] = tokenizer.decode(trajectory.input_ids[:trajectory.prompt_length])
            record["scores"] = arc_metric.score_record(record)
            records[i] = record
        if batch:
            saved.add([{"rollout": i, "record": records[i]} for i in batch])
    probe_results = None
    if probe:
        probe_results = evidence_given_probe(
            model, tokenizer, questions, retriever, config, evidence=evidence, batch_size=batch_size,
            progress=progress, records=records, needed=needed, done=saved.probe, dist=dist,
            on_batch=lambda name, fields: saved.add([{"probe": name,
                                                      "results": {str(i): f for i, f in fields.items()}}]))
        for record, result in zip(records, probe_results):
            record["probe"] = result
    if out_path:
        data.write_jsonl(out_path, records)
    return records, arc_metric.arc_report(records, probe=probe_results)


def _questions_hash(questions: list) -> str:
    """16 hex digits of sha256 over the question rows: a progress file holds results of these rows only."""
    text = json.dumps(questions, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class _Progress:
    """evaluate's progress file (see evaluate): what an interrupted run finished, and where the next
    batches go. No path: nothing is read or written."""

    def __init__(self, path: str | None, made_with: dict):

        self.path, self.records, self.probe, self._append = path, {}, {}, data.append_jsonl
        if path is None:
            return
        made_with = json.loads(json.dumps(made_with, default=str))       # as it reads back from the file
        rows = data.read_appended(path)
        if not rows:
            data.append_jsonl(path, [{"made_with": made_with}])
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
    them (see evaluate), and the file is deleted once the results are written.

    Under torchrun (`torchrun --nproc_per_node=N train.py eval …`) each rank evaluates a contiguous
    share of the questions on its own device; rank 0 alone talks to the retriever (it builds it, finds
    the probe's evidence for every question, and sends every rank's searches of a turn as one request:
    ddp.OneCallerRetriever), gathers the records and writes the one report, the one trajectories.jsonl
    in question order and prints the table. Each rank keeps its own progress file,
    DIR/progress.rank{r}-of-{N}.jsonl, so a rerun on as many ranks continues. The records are one
    process's when each rank's batches hold the rows one process's would (always at --batch-size 1);
    otherwise they may differ as a change of --batch-size can make them differ (padding in a batch)."""
    parser = cli.ArgumentParser(prog="arc_metric.py", description="Evaluate a Hugging Face model directory as "
                                "a search agent: greedy rollouts, EM/F1/sub-EM and ARC per data source.")
    parser.add_argument("--model", required=True, help="HF model directory (AutoModelForCausalLM)")
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: --model)")
    parser.add_argument("--data", required=True, help="questions JSONL: question, golden_answers, id?, data_source?")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="corpus JSONL {id, contents} (.jsonl or .jsonl.gz): BM25 in this process")
    source.add_argument("--index", help="a BM25 index directory built by `python retriever.py index`")
    source.add_argument("--retriever-url", help="a Search-R1 retrieval server, e.g. http://127.0.0.1:8000")
    cli.add_retriever_client_args(parser)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--limit", type=cli.bounded(int, ge=1),
                        help="evaluate N questions: a seeded sample stratified by data_source, each source keeping "
                             "its share of the file, in file order (data.sample_questions; not the first N rows: "
                             "Search-R1's test.parquet is sorted by source)")
    parser.add_argument("--limit-seed", type=int, default=0, help="the seed of --limit's sample")
    cli.add_config_args(parser, rollout.RolloutConfig,
                        only=("max_turns", "max_new_tokens", "max_obs_tokens", "max_total_tokens", "topk", "prompt_from",
                              "eos_ends"))
    parser.add_argument("--batch-size", type=cli.bounded(int, ge=1), default=64,
                        help="sequences per rollout() call (default: 64)")
    parser.add_argument("--no-probe", action="store_true", help="skip the evidence-given probe")
    parser.add_argument("--probe-evidence", choices=["auto", "search"], default="auto",
                        help="auto: the questions' supporting_ids when present; search: always by search")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    dist = ddp.setup()                   # under torchrun: this rank's device, gloo or NCCL
    try:
        return _run(parser, args, dist)
    finally:
        # a rank that leaves a gloo group without closing it can abort while another is in its last collective
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(parser, args, dist: ddp.Dist) -> dict:
    """main's work, on this rank (see main)."""
    if dist.enabled and args.device:
        parser.error(f"--device {args.device}: under torchrun each rank evaluates on its own device "
                     f"({dist.device} here); leave --device out")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: is a file; eval writes a directory (report.json, trajectories.jsonl)")
    done = [name for name in ("report.json", "trajectories.jsonl") if os.path.exists(os.path.join(args.out, name))]
    if done and not args.overwrite:
        parser.error(f"--out {args.out} already holds {', '.join(done)}; pass --overwrite to replace them")
    if dist.master:
        checkpoint.check_writable(args.out)
    started = time.perf_counter()
    questions = data.load_questions(args.data)
    if args.limit is not None:
        questions = data.sample_questions(questions, args.limit, seed=args.limit_seed)
    if len(questions) < dist.world_size:
        raise ValueError(f"--data {args.data}: {len(questions)} questions for {dist.world_size} ranks; run "
                         f"at most {len(questions)} (or one process: python train.py eval …)")
    progress_path = os.path.join(args.out, "progress.jsonl" if not dist.enabled else
                                 f"progress.rank{dist.rank}-of-{dist.world_size}.jsonl")
    inputs = checkpoint.input_fingerprints({"--model": args.model, "--tokenizer": args.tokenizer, "--data": args.data,
                                            "--corpus": args.corpus, "--index": args.index,
                                            "--retriever-url": args.retriever_url},
                                           rows={"--data": len(questions)})
    # a rerun continues only with the same inputs, wherever they lie now (the paths are not compared)
    made_with = {"inputs": {arg: {k: v for k, v in fp.items() if k != "path"} for arg, fp in inputs.items()},
                 "limit": args.limit, "limit_seed": args.limit_seed}
    found = []                           # rank 0's retriever (every rank's searches go through it)

    def find_evidence():                 # rank 0 alone: the retriever, and the probe's passages for every row
        found.append(retriever_lib.make_retriever(args.corpus, args.retriever_url, args.topk, index=args.index,
                                                  retry_seconds=args.retriever_retry_seconds,
                                                  timeout=args.retriever_timeout))
        if args.no_probe:
            return None
        # the questions' supporting passages exist: before a model is loaded
        check_supporting_ids(questions, found[0], args.probe_evidence)
        needed = needed_passages(questions, found[0], args.probe_evidence, progress=not args.no_progress)
        check_probe_topk(needed, args.topk)
        return needed

    needed = ddp.on_master(dist, find_evidence, user_errors=cli.USER_ERRORS)
    retriever = ddp.OneCallerRetriever(found[0] if found else None, dist) if dist.enabled else found[0]
    # this rank's share: contiguous, so each data set's rows stay together and the gather keeps file order
    lo, hi = len(questions) * dist.rank // dist.world_size, len(questions) * (dist.rank + 1) // dist.world_size
    share, needed_share = questions[lo:hi], None if needed is None else needed[lo:hi]
    device = dist.device if dist.enabled else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = models.load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    model = models.load_model(args.model, ddp.Dist(device=device), trainable=False)
    config = rollout.RolloutConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                                   max_obs_tokens=args.max_obs_tokens, topk=args.topk, greedy=True,
                                   max_total_tokens=args.max_total_tokens, prompt_from=args.prompt_from,
                                   eos_ends=args.eos_ends)
    os.makedirs(args.out, exist_ok=True)
    if args.overwrite and os.path.exists(progress_path):   # only now: every input has loaded
        os.remove(progress_path)
    trajectories_path = os.path.join(args.out, "trajectories.jsonl")
    records, report = evaluate(model, tokenizer, share, retriever, config, probe=not args.no_probe,
                               batch_size=args.batch_size, out_path=None if dist.enabled else trajectories_path,
                               progress=not args.no_progress and dist.master, evidence=args.probe_evidence,
                               progress_path=progress_path, made_with=made_with, needed=needed_share, dist=dist)
    records = ddp.gather_objects(dist, records)     # under torchrun: every rank's, in question order, on rank 0

    def write():                         # rank 0 alone; every rank learns whether it worked
        final = finish_gathered(records, trajectories_path, probe=not args.no_probe) if dist.enabled else report
        seconds = time.perf_counter() - started
        print(arc_metric.render_table(final, title=f"{args.model} on {args.data} ({len(questions)} questions, greedy)"))
        summary = {"model": args.model, "data": args.data, "retriever": args.corpus or args.index or args.retriever_url,
                   "questions": len(questions), "limit": args.limit, "limit_seed": args.limit_seed,
                   "config": asdict(config), "probe": not args.no_probe,
                   "probe_evidence": args.probe_evidence, "device": str(device), "ranks": dist.world_size,
                   "seconds": round(seconds, 1), "report": final}
        report_path = write_report(args.out, summary)
        print(f"\nwrote {trajectories_path} and {report_path} in {seconds:.1f}s")
        return summary

    summary = ddp.on_master(dist, write, user_errors=cli.USER_ERRORS)
    os.remove(progress_path)             # each rank its own, once the results are written
    return summary


def finish_gathered(records: list[dict], trajectories_path: str, probe: bool) -> dict:
    """Rank 0, under torchrun: every rank's records written as one file, and their report — the
    report evaluate returns in one process (arc_report over the same records and probe results)."""
    data.write_jsonl(trajectories_path, records)
    return arc_metric.arc_report(records, probe=[r["probe"] for r in records] if probe else None)
