"""The built-in demo world: everything `python train.py` needs offline, generated in seconds.

What it does:
  * `make_world(seed)` builds a fictional encyclopedia (invented countries, cities, people and
    companies), a wiki-18-style corpus of entity passages plus distractors that share their words,
    and single-hop / two-hop questions split into train / validation / test.
  * `oracle_rollout(...)` is a scripted agent that plays the Search-R1 protocol honestly: it thinks,
    issues real queries to the real retriever, reads the passages it got back, searches again for
    two-hop questions and answers from what it read. It never sees the gold answers.
  * `train_tokenizer(...)` trains a byte-level BPE tokenizer on the world's text (protocol tags are
    ordinary text, split into several pieces, as in Qwen's tokenizer) and saves it in HF format.
  * `make_tiny_model(...)` builds a small `Qwen2ForCausalLM` ("teacher" or "student" size) from a
    config, so the rest of the code only ever sees ordinary HF model directories.

What it does not do: train anything (train.py does), or know about real datasets (data.py loads those).

    world = make_world(seed=0)
    write_world(world, "runs/demo/data")             # corpus.jsonl, train/validation/test.jsonl
    tok = train_tokenizer(world, "runs/demo/tokenizer")
    retriever = BM25Retriever(world.corpus)
    trajs = oracle_rollout(world.test, retriever, tok)  # list[rollout.Trajectory]
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field

from data import write_jsonl
from rollout import (INVALID_ACTION, PROMPT_TEMPLATE, RolloutConfig, Trajectory, completes_answer, encode_text,
                     format_question, last_query, observation_ids, prompt_ids)

# -----------------------------------------------------------------------------
# The world: invented entities and the facts that tie them together

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kr", "tr", "st", "th", "sh", "vl", "qu"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ae", "io"]
CODAS = ["", "", "", "n", "r", "l", "s", "m"]
CITY_FORMS = ["{}", "{}", "{}ford", "Port {}", "{} Falls", "{}haven", "New {}"]
COUNTRY_FORMS = ["Republic of {}", "Kingdom of {}", "Federation of {}", "Grand Duchy of {}"]
PROFESSIONS = ["painter", "engineer", "merchant", "composer", "physician", "architect", "poet",
               "chemist", "sailor", "astronomer"]
SECTORS = ["shipping", "textile", "mining", "software", "brewing", "glassworks", "railway", "printing",
           "pharmaceutical", "shipbuilding"]
COMPANY_FORMS = ["{} Industries", "{} Works", "{} Trading", "{} Foundry", "{} Group", "{} Labs",
                 "{} Mills", "{} and Sons"]


@dataclass
class World:
    """A generated world. `corpus` rows are {"id", "contents": "title\\ntext"}; question rows are
    {"id", "question", "golden_answers", "data_source", "kind", "supporting_ids"}."""
    seed: int
    corpus: list[dict]
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    facts: dict = field(repr=False)   # the entity tables the passages were written from


def _name_maker(rng: random.Random):
    """Returns a function that yields fresh invented words (two syllables), never the same twice."""
    used: set[str] = set()

    def fresh(syllables: tuple[int, int] = (2, 2)) -> str:
        while True:
            n = rng.randint(*syllables)
            word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(n))
            word = word.capitalize()
            if word not in used and 4 <= len(word) <= 9:
                used.add(word)
                return word
    return fresh


def _make_facts(rng: random.Random, n_countries=15, n_cities=60, n_people=400, n_companies=300) -> dict:
    fresh = _name_maker(rng)
    countries = []
    for _ in range(n_countries):
        name = fresh()
        countries.append({"name": name, "official": rng.choice(COUNTRY_FORMS).format(name)})
    cities = []
    for i in range(n_cities):
        country = countries[i % n_countries]         # every country gets 4 cities
        cities.append({"name": rng.choice(CITY_FORMS).format(fresh()), "country": country["name"],
                       "river": fresh()})
    for country in countries:                         # the first city of each country is its capital
        country["capital"] = next(c["name"] for c in cities if c["country"] == country["name"])
    people = []
    for _ in range(n_people):
        first, last = fresh(), fresh()
        people.append({"name": f"{first} {last}", "first": first, "last": last,
                       "birthplace": rng.choice(cities)["name"], "profession": rng.choice(PROFESSIONS),
                       "born": rng.randint(1850, 1990)})
    companies = []
    founders = rng.sample(people, n_companies)        # a person founds at most one company
    for founder in founders:
        companies.append({"name": rng.choice(COMPANY_FORMS).format(fresh()), "founder": founder["name"],
                          "hq": rng.choice(cities)["name"], "sector": rng.choice(SECTORS),
                          "founded": founder["born"] + rng.randint(20, 45)})
    return {"countries": countries, "cities": cities, "people": people, "companies": companies}


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _entity_passages(facts: dict) -> list[tuple[str, str]]:
    """One (title, text) per entity; the title is the entity name the questions refer to."""
    country_of = {c["name"]: c["country"] for c in facts["cities"]}
    out = []
    for c in facts["countries"]:
        out.append((c["name"], f"{c['name']}, officially the {c['official']}, is a country. "
                    f"Its capital is {c['capital']}."))
    for c in facts["cities"]:
        out.append((c["name"], f"{c['name']} is a city in {c['country']}, on the {c['river']} river."))
    for p in facts["people"]:
        out.append((p["name"], f"{p['name']} (born {p['born']}) is {_a(p['profession'])} "
                    f"who was born in {p['birthplace']}, {country_of[p['birthplace']]}."))
    for c in facts["companies"]:
        out.append((c["name"], f"{c['name']} is {_a(c['sector'])} company founded by "
                    f"{c['founder']} in {c['founded']}. It is headquartered in {c['hq']}."))
    return out


def _distractor_passages(rng: random.Random, facts: dict, n: int) -> list[tuple[str, str]]:
    """Passages that reuse the entity names with other facts, so that a careless reader answers wrong.
    One candidate per (kind, entity); `n` of them are kept. None states a fact about the entity whose
    name it borrows."""
    people, cities, companies = facts["people"], facts["cities"], facts["companies"]
    pick = rng.choice
    candidates = []
    for c in cities:
        candidates.append((f"{c['name']} Museum", f"The {c['name']} Museum holds paintings by {pick(people)['name']} "
                           f"and was opened by {pick(people)['name']} in {rng.randint(1900, 2000)}."))
        candidates.append((f"{c['name']} River", f"The {c['name']} River is a river that flows through "
                           f"{pick(facts['countries'])['name']} and into the sea."))
        candidates.append((f"{c['name']} Station", f"{c['name']} Station is a railway station in "
                           f"{pick(cities)['name']}, built by {pick(companies)['name']}."))
    for p in people:
        candidates.append((f"{p['name']} (disambiguation)", f"{p['name']} may also refer to {p['name']} Park, "
                           f"a park in {pick(cities)['name']}, or the {p['last']} Prize."))
        candidates.append((f"{p['last']} family", f"The {p['last']} family ran a shop that supplied "
                           f"{pick(companies)['name']} for many years; {p['first']} {p['last']} Jr. was born there."))
    for co in companies:
        candidates.append((f"{co['name']} Tower", f"{co['name']} Tower is an office building in "
                           f"{pick(cities)['name']}, designed by the architect {pick(people)['name']}."))
        candidates.append((f"{co['name']} Prize", f"The {co['name']} Prize is awarded every year in "
                           f"{pick(cities)['name']}; its first winner was {pick(people)['name']}."))
    titles = [title for title, _ in candidates]
    if len(set(titles)) != len(titles) or n > len(candidates):
        raise ValueError(f"cannot draw {n} distinct distractors from {len(set(titles))} candidates")
    return rng.sample(candidates, n)


def _questions(facts: dict) -> list[dict]:
    """Six kinds of question. Two-hop ones need an entity that only the first passage reveals."""
    city = {c["name"]: c for c in facts["cities"]}
    country = {c["name"]: c for c in facts["countries"]}
    person = {p["name"]: p for p in facts["people"]}

    def person_golds(name):
        p = person[name]
        return [name, f"{p['first'][0]}. {p['last']}"]

    def city_golds(name):
        return [name, f"{name}, {city[name]['country']}"]

    def country_golds(name):
        return [name, country[name]["official"]]

    qs = []
    for co in facts["companies"]:
        ceo = co["founder"]
        hq_country = city[co["hq"]]["country"]
        qs.append(("founder", f"Who founded {co['name']}?", person_golds(ceo), [co["name"]]))
        qs.append(("headquarters", f"Where is {co['name']} headquartered?", city_golds(co["hq"]), [co["name"]]))
        qs.append(("founder_birthplace", f"Where was the founder of {co['name']} born?",
                   city_golds(person[ceo]["birthplace"]), [co["name"], ceo]))
        qs.append(("headquarters_country", f"In which country is {co['name']} headquartered?",
                   country_golds(hq_country), [co["name"], co["hq"]]))
    for p in facts["people"]:
        qs.append(("birthplace", f"Where was {p['name']} born?", city_golds(p["birthplace"]), [p["name"]]))
    for c in facts["cities"]:
        qs.append(("city_country", f"Which country is {c['name']} in?", country_golds(c["country"]), [c["name"]]))
    return [{"kind": kind, "question": q, "golden_answers": golds, "support_keys": keys}
            for kind, q, golds, keys in qs]


TWO_HOP_KINDS = ("founder_birthplace", "headquarters_country")


def make_world(seed: int = 0, n_test: int = 240, n_validation: int = 120) -> World:
    """Builds the world deterministically from `seed` (same seed → byte-identical output)."""
    rng = random.Random(seed)
    facts = _make_facts(rng)
    distractors = _distractor_passages(rng, facts, n=1400)
    rows = _entity_passages(facts) + distractors
    order = list(range(len(rows)))
    rng.shuffle(order)                                  # so passage ids say nothing about the kind
    corpus, id_of_title = [], {}
    for i, j in enumerate(order):
        title, text = rows[j]
        corpus.append({"id": str(i), "contents": f"{title}\n{text}"})
        id_of_title[title] = str(i)

    questions = _questions(facts)
    rng.shuffle(questions)
    for i, q in enumerate(questions):
        q["id"] = f"demo-{seed}-{i}"
        q["data_source"] = "demo_2hop" if q["kind"] in TWO_HOP_KINDS else "demo_1hop"
        q["supporting_ids"] = [id_of_title[key] for key in q.pop("support_keys")]
    test = questions[:n_test]
    validation = questions[n_test:n_test + n_validation]
    train = questions[n_test + n_validation:]
    field_order = ["id", "question", "golden_answers", "data_source", "kind", "supporting_ids"]
    test, validation, train = ([{k: q[k] for k in field_order} for q in split] for split in (test, validation, train))
    return World(seed=seed, corpus=corpus, train=train, validation=validation, test=test, facts=facts)


def write_world(world: World, out_dir: str) -> dict[str, str]:
    """Writes corpus.jsonl and {train,validation,test}.jsonl; returns their paths by name."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, rows in [("corpus", world.corpus), ("train", world.train),
                       ("validation", world.validation), ("test", world.test)]:
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        write_jsonl(paths[name], rows)
    return paths


# -----------------------------------------------------------------------------
# The oracle: a scripted agent that plays the protocol honestly (it never sees the gold answers)

# What each question kind asks, how the oracle words its search, and the sentence it reads the answer
# from. Two-hop kinds chain two of these: the second entity is only known after the first read.
_QUESTION_PLANS = [
    (re.compile(r"^Where was the founder of (.+) born\?$"), ["founder", "birthplace"]),
    (re.compile(r"^In which country is (.+) headquartered\?$"), ["headquarters", "city_country"]),
    (re.compile(r"^Who founded (.+)\?$"), ["founder"]),
    (re.compile(r"^Where is (.+) headquartered\?$"), ["headquarters"]),
    (re.compile(r"^Where was (.+) born\?$"), ["birthplace"]),
    (re.compile(r"^Which country is (.+) in\?$"), ["city_country"]),
]
_RELATIONS = {   # relation: (what the oracle wants to know, query wording, how the passage states it)
    "founder": ("who founded {}", "{}", re.compile(r"founded by (.+?) in \d")),
    "headquarters": ("where {} is headquartered", "{}", re.compile(r"headquartered in (.+?)\.$")),
    "birthplace": ("where {} was born", "{}", re.compile(r"was born in (.+?), ")),
    "city_country": ("which country {} is in", "{} city", re.compile(r"is a city in (.+?), on the")),
}


def _read(hits: list[dict], entity: str, relation: str) -> str | None:
    """The fact about `entity` from the passage titled `entity`, if the search returned it."""
    pattern = _RELATIONS[relation][2]
    for hit in hits:
        title, _, text = hit["contents"].partition("\n")
        match = pattern.search(text) if title == entity else None
        if match:
            return match.group(1)
    return None


def _oracle_turns(question: str):
    """A generator that yields the oracle's turn texts and receives the hits of each search."""
    plan = next(((m.group(1), steps) for regex, steps in _QUESTION_PLANS
                 if (m := regex.match(format_question(question)))), None)
    if plan is None:
        yield "<think> I do not know how to answer this question. </think>\n<answer> unknown </answer>"
        return
    entity, steps = plan
    known = ""
    for step_no, relation in enumerate(steps):
        goal, wording, _ = _RELATIONS[relation]
        thought = f"{known}I need to find {goal.format(entity)}."
        hits = yield f"<think> {thought.strip()} </think>\n<search> {wording.format(entity)} </search>"
        fact = _read(hits, entity, relation)
        if fact is None:                                  # retrieval missed: fail like a real agent
            yield (f"<think> The results do not say {goal.format(entity)}. </think>\n"
                   f"<answer> unknown </answer>")
            return
        known = f"{_fact_sentence(relation, entity, fact)} "
        entity = fact
    yield f"<think> {known.strip()} </think>\n<answer> {entity} </answer>"


def _fact_sentence(relation: str, entity: str, fact: str) -> str:
    return {"founder": f"{entity} was founded by {fact}.",
            "headquarters": f"{entity} is headquartered in {fact}.",
            "birthplace": f"{entity} was born in {fact}.",
            "city_country": f"{entity} is in {fact}."}[relation]


def oracle_rollout(questions: list[str], retriever, tokenizer,
                   config: RolloutConfig | None = None) -> list[Trajectory]:
    """Plays the oracle on question *texts* (it is never given gold answers) with the real retriever.

    Token ids are built exactly as `rollout.rollout` builds them — prompt ids, each turn's text
    tokenised on its own (loss 1), observations tokenised on their own (loss 0) — so a model trained
    on these trajectories meets the same token boundaries when it generates.
    """
    config = config or RolloutConfig()
    games = [_oracle_turns(q) for q in questions]
    trajs = []
    for q in questions:
        ids = prompt_ids(tokenizer, q)
        trajs.append(Trajectory(question=q, input_ids=list(ids), loss_mask=[0] * len(ids), prompt_length=len(ids)))
    texts = [next(g) for g in games]
    playing = list(range(len(questions)))
    for turn in range(config.max_turns + 1):
        searching, queries = [], []
        for i in playing:
            t = trajs[i]
            turn_ids = encode_text(tokenizer, texts[i])
            t.input_ids += turn_ids
            t.loss_mask += [1] * len(turn_ids)
            t.turns.append(texts[i])
            t.num_turns += 1
            query = last_query(texts[i])
            if query is not None and turn < config.max_turns:
                searching.append(i)
                queries.append(query)
            else:
                t.answered = completes_answer(texts[i])
        results = retriever.search(queries, topk=config.topk) if queries else []
        for i, query, hits in zip(searching, queries, results):
            t = trajs[i]
            obs, cut = observation_ids(tokenizer, hits, config.max_obs_tokens)
            t.input_ids += obs
            t.loss_mask += [0] * len(obs)
            t.queries.append(query)
            t.hits.append(hits)
            t.num_searches += 1
            t.obs_truncated |= cut
            texts[i] = games[i].send(hits)
        playing = searching
    for t in trajs:
        t.response_text = tokenizer.decode(t.input_ids[t.prompt_length:], skip_special_tokens=True)
    return trajs


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on the world, saved in Hugging Face format

# Qwen2-style pre-tokenisation: letters keep one leading non-letter ("/search"), punctuation runs
# swallow following newlines (">\n"), so "</search>\n" splits into "</", "search", ">\n" — the protocol
# tags are several pieces whose last one merges with what follows, as with the real Qwen tokenizer.
_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer_texts(world: World) -> list[str]:
    """What the BPE merges are learned from: passages, questions, and protocol text in use."""
    texts = [row["contents"] for row in world.corpus]
    for q in world.train + world.validation + world.test:
        texts.append(PROMPT_TEMPLATE.format(question=q["question"]))
    for relation, (goal, wording, _) in _RELATIONS.items():
        texts.append(f"<think> I need to find {goal}. </think>\n<search> {wording} </search>\n\n"
                     f"<information>Doc 1(Title: x) y</information>\n\n<answer> z </answer>")
    return texts + [INVALID_ACTION] * 10


def train_tokenizer(world: World, out_dir: str | None = None, vocab_size: int = 2048):
    """Trains the tokenizer and returns it as a `PreTrainedTokenizerFast` (saved to `out_dir` if given).
    eos = <|im_end|> (ends a chat turn), pad = <|endoftext|>; the tags stay ordinary text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_tokenizer_texts(world), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    if out_dir:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


# -----------------------------------------------------------------------------
# Tiny models: ordinary Qwen2ForCausalLM directories, built from a config (no download)

MODEL_SIZES = {   # hidden, layers, heads, kv heads, mlp. The 128/3 teacher learns the protocol and the name
    # copying from the oracle's trajectories (test EM 0.83 after 1,500 steps of the default demo, README
    # "What `python train.py` prints"); the student is about half its size, as the paper's 0.5B student
    # is a sixth of its 3B teacher.
    "teacher": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=384),
    "student": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256),
    "test": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64),
}


def make_tiny_model(tokenizer, size: str = "student", seed: int = 0, out_dir: str | None = None,
                    max_positions: int = 2048):
    """A randomly initialised `Qwen2ForCausalLM` of a named size, saved with its tokenizer if `out_dir`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in MODEL_SIZES:
        raise ValueError(f"size={size!r}: expected one of {sorted(MODEL_SIZES)}")
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **MODEL_SIZES[size])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if out_dir:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model
