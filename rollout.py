"""Batched multi-turn generation with search interception, in token space.

What it does: `rollout(model, tokenizer, questions, retriever, config)` plays the Search-R1 protocol
(docs/method.md §2) for a batch of questions at once. Each row generates until its text completes
`</search>` or `</answer>`, emits eos, or runs out of its per-turn budget; all rows' queries then go to
the retriever in one call, the observations are appended as *forced* tokens, and generation goes on
from the KV cache. A turn with neither a complete search nor a complete answer (the budget ran out, an
eos, an orphan closing tag) gets Search-R1's invalid-action text and the rollout goes on; the eos is
dropped, as Search-R1's decode drops it (RolloutConfig.eos_ends keeps the older rule: eos ends the
rollout). Every model-written token is kept exactly as sampled, and the loss mask is recorded
at the moment a token is appended (1 = sampled, 0 = prompt, observation, nudge) — never re-derived
from text or from `pad_id`.

What it does not do: compute rewards or log-probs for training (rl.py and dgpo.py do), or
decode → cut → re-tokenise model output (the public code's fault, docs/method.md §8).

How the cache works: every row keeps its own key/value tensors (only real tokens, no padding) between
turns. A turn stacks the rows that are still playing into one left-padded cache with room reserved for
the whole turn (so a decoding step writes one column in place instead of copying the cache), feeds each
row its *pending* tokens (the prompt, or the last sampled token plus the observation) in one forward,
and decodes one token per row per step. A row that ends its turn is cut out of the batch at once (its
keys/values are saved), so it stops costing compute while the others continue. Attention masks and
explicit position ids make the padding invisible: a token's position is the number of real tokens
before it in its own row.

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    retriever = BM25Retriever.from_jsonl("corpus.jsonl")
    config = RolloutConfig(max_turns=4, temperature=1.0, seed=0)
    trajs = rollout(model, tokenizer, ["Who founded Velmor Works?"], retriever, config)
    print(trajs[0].response_text, trajs[0].loss_mask)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicLayer

import settings

# -----------------------------------------------------------------------------
# The protocol text (Search-R1's, kept byte for byte, typo included: checkpoints were trained on it)

PROMPT_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every "
    "time you get new information. After reasoning, if you find you lack some knowledge, you can call a "
    "search engine by <search> query </search> and it will return the top searched results between "
    "<information> and </information>. You can search as many times as your want. If you find no "
    "further external knowledge needed, you can directly provide the answer inside <answer> and "
    "</answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: {question}\n"
)
INVALID_ACTION = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
    "</search>. If I want to give the final answer, I should put the answer between <answer> and "
    "</answer>. Let me try again.\n"
)
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
OBS_OPEN, OBS_CLOSE = "\n\n<information>", "</information>\n\n"
_TAG_WINDOW = 16   # tokens decoded to look for a stop tag; any tag (≤ 9 chars) fits in the last 16 tokens


def format_question(question: str) -> str:
    """Search-R1's normalisation: strip, and end with a question mark."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone, no BOS/EOS added (forced text is tokenised segment by segment)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(tokenizer, question: str, chat: list[dict] | None = None) -> str:
    """The prompt: the template as the single user message of the chat template, if there is one. With
    `chat` (a row's own prompt, [{"role", "content"}, …], RolloutConfig.prompt_from "data"), that chat
    instead, rendered as Search-R1's rl_dataset.py renders its `prompt` column (lines 126–131)."""
    if chat is None:
        chat = [{"role": "user", "content": PROMPT_TEMPLATE.format(question=format_question(question))}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    if len(chat) != 1:
        raise ValueError(f"a prompt chat of {len(chat)} messages needs a tokenizer with a chat template")
    return chat[0]["content"]


def prompt_ids(tokenizer, question: str, chat: list[dict] | None = None) -> list[int]:
    return encode_text(tokenizer, prompt_text(tokenizer, question, chat))


PROMPT_FROM = ("question", "data")


def row_chats(rows: list[dict], prompt_from: str) -> list[list[dict]] | None:
    """The prompt chats rollout() is given for question rows: None when prompts are built from the
    question ("question"), each row's own `prompt` ("data"; a row without one is an error naming it)."""
    if prompt_from not in PROMPT_FROM:
        raise ValueError(f"prompt_from={prompt_from!r}: must be one of {PROMPT_FROM}")
    if prompt_from == "question":
        return None
    missing = next((row for row in rows if not row.get("prompt")), None)
    if missing is not None:
        raise ValueError(f"question id={missing.get('id')!r} has no 'prompt' (a chat of messages) to use with "
                         "--prompt-from data; its file needs a prompt column, or use --prompt-from question")
    return [row["prompt"] for row in rows]


def format_passages(hits: list[dict]) -> str:
    """`Doc 1(Title: t) text\\nDoc 2(...) ...` — the retriever's formatter, repeated here (3 lines) so
    this module needs nothing from retriever.py."""
    lines = []
    for i, hit in enumerate(hits):
        title, _, text = hit["contents"].partition("\n")
        lines.append(f"Doc {i + 1}(Title: {title}) {text}\n")
    return "".join(lines)


# A passage can be megabytes (one of 18 MB took 43.5 s to tokenise), yet only its first max_obs_tokens
# tokens are shown. So only a prefix of the text is tokenised: (n + _CUT_SLACK_TOKENS) * _CHARS_PER_TOKEN
# characters, and twice as many until it yields n + _CUT_SLACK_TOKENS tokens. Cutting the text changes
# only tokens near the cut (pre-tokenizer splits and BPE merges look at neighbours), so the first n
# tokens, 64 tokens before it, are the ones the whole text gives -- unless a single unbroken word more
# than 64 tokens long straddles the cut. English averages ~4 characters a token; 8 is generous.
_CHARS_PER_TOKEN = 8
_CUT_SLACK_TOKENS = 64


def leading_ids(tokenizer, text: str, n: int) -> tuple[list[int], bool]:
    """encode_text(text)[:n] and whether text has more than n tokens, tokenising only a prefix of
    text that is long enough (see _CHARS_PER_TOKEN); the whole text when it is short."""
    chars = (n + _CUT_SLACK_TOKENS) * _CHARS_PER_TOKEN
    while chars < len(text):
        ids = encode_text(tokenizer, text[:chars])
        if len(ids) >= n + _CUT_SLACK_TOKENS:      # the cut is far past token n: more than n tokens
            return ids[:n], True
        chars *= 2                                 # long tokens (runs of spaces, ...): a longer prefix
    ids = encode_text(tokenizer, text)
    return ids[:n], len(ids) > n


def observation_ids(tokenizer, hits: list[dict], max_obs_tokens: int) -> tuple[list[int], bool]:
    """`\\n\\n<information>{passages}</information>\\n\\n` as token ids, and whether it was cut.

    The passages (stripped, as Search-R1 does) are cut to `max_obs_tokens` tokens *before* the closing
    tag is added, so `</information>` always survives (Search-R1 cuts after and loses it). Only a
    prefix of a long text is tokenised (leading_ids): the same ids as cutting the whole text's tokens.
    """
    head, truncated = leading_ids(tokenizer, OBS_OPEN + format_passages(hits).strip(), max_obs_tokens)
    return head + encode_text(tokenizer, OBS_CLOSE), truncated


def last_query(turn_text: str) -> str | None:
    """The text between the last `<search>` and the `</search>` that ended the turn, or None."""
    end = turn_text.rfind(SEARCH_CLOSE)
    start = turn_text.rfind(SEARCH_OPEN, 0, max(end, 0))
    if end < 0 or start < 0:
        return None
    return turn_text[start + len(SEARCH_OPEN):end].strip()


def completes_answer(turn_text: str) -> bool:
    """Whether the turn closes an answer it opened: an `<answer>` before its last `</answer>`."""
    end = turn_text.rfind(ANSWER_CLOSE)
    return end >= 0 and ANSWER_OPEN in turn_text[:end]


def default_length_budget(model) -> int | None:
    """The longest sequence the model was trained for (config.max_position_embeddings), or None."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def length_budget(max_total_tokens: int | None, model) -> int | None:
    """The cap on prompt + response of every rollout: --max-total-tokens, by default the model's
    max_position_embeddings (a longer sequence leaves the positions the model was trained on)."""
    return max_total_tokens if max_total_tokens is not None else default_length_budget(model)


def check_prompts(tokenizer, questions: list[dict], budget: int | None, what: str,
                  prompt_from: str = "question") -> None:
    """Refuses, before any rollout, a question whose prompt leaves no room under the length budget (and,
    with prompt_from "data", a row without a prompt of its own)."""
    chats = row_chats(questions, prompt_from)
    found = first_overlong_prompt(tokenizer, [q["question"] for q in questions], budget, chats)
    if found is not None:
        i, n = found
        q = questions[i]
        raise ValueError(f"{what} id={q.get('id')!r} ({q['question'][:60]!r}…): its prompt is {n} tokens, "
                         f"leaving no room under the length budget of {budget} tokens (--max-total-tokens, "
                         "default: the model's max_position_embeddings); shorten or drop it")


def first_overlong_prompt(tokenizer, questions: list[str], max_total_tokens: int | None,
                          chats: list[list[dict]] | None = None):
    """(index, prompt length) of the first question whose prompt leaves no room for a generated
    token under max_total_tokens, or None. A prompt has at most as many tokens as UTF-8 bytes, so
    only prompts that come near the budget are tokenised."""
    if max_total_tokens is None:
        return None
    overhead = len(prompt_text(tokenizer, "").encode("utf-8"))      # everything but the question
    for i, question in enumerate(questions):
        chat = chats[i] if chats is not None else None
        text_bytes = (len(prompt_text(tokenizer, question, chat).encode("utf-8")) if chat is not None
                      else overhead + len(question.strip().encode("utf-8")))
        if text_bytes < max_total_tokens:
            continue
        n = len(prompt_ids(tokenizer, question, chat))
        if n >= max_total_tokens:
            return i, n
    return None


# -----------------------------------------------------------------------------
# Config and results

@dataclass
class RolloutConfig:
    """How rollouts are generated. Each setting's help and legal values are declared on its field
    (settings.py), checked when a config is made, and made into --options by cli.py."""
    max_turns: int = settings.setting(4, "searches a rollout may make (generate→act rounds); then one final turn "
                                      "with no search", ge=0)
    max_new_tokens: int = settings.setting(500, "sampled tokens per turn", ge=1)
    max_obs_tokens: int = settings.setting(500, "passage tokens per observation (the closing tag is added after)",
                                           ge=0)
    topk: int = settings.setting(3, "passages per search", ge=1)
    temperature: float = settings.setting(1.0, "sampling temperature", ge=0)
    top_p: float = settings.setting(1.0, "nucleus sampling: sample from the smallest set of tokens holding this "
                                    "much probability", gt=0, le=1)
    greedy: bool = settings.setting(False, "take the most likely token instead of sampling")
    seed: int | None = settings.setting(None, "seeds the sampling when no torch.Generator is passed to rollout()",
                                        ge=0)
    max_total_tokens: int | None = settings.setting(
        None, "cap on prompt + response; None: the model's max_position_embeddings in every stage (rollout() itself "
        "then caps only each turn)", ge=1)
    prompt_from: str = settings.setting(
        "question", "where a question row's prompt comes from: 'question' builds Search-R1's prompt from its "
        "question (docs/method.md §2); 'data' uses the row's own prompt chat (a Parquet 'prompt' column), "
        "rendered with the chat template", choices=PROMPT_FROM)
    eos_ends: bool = settings.setting(
        False, "an eos, or an </answer> that closes no <answer>, ends the rollout there (the eos kept in the ids as a "
        "sampled token, loss 1); default: as Search-R1, such a turn is an invalid action — the eos is dropped "
        "(it never enters the ids or the loss), the invalid-action text is appended and the rollout goes on")

    def __post_init__(self):
        settings.check(self)


@dataclass
class Trajectory:
    question: str
    input_ids: list[int]             # prompt + response, no padding; sampled ids exactly as sampled
    loss_mask: list[int]             # 1 where the model sampled the token, 0 for forced tokens
    prompt_length: int               # input_ids[:prompt_length] is the prompt
    response_text: str = ""          # decode(input_ids[prompt_length:]), observations included
    turns: list[str] = field(default_factory=list)      # model-written text of each turn
    queries: list[str] = field(default_factory=list)    # executed searches, in order
    hits: list[list[dict]] = field(default_factory=list)  # per executed search, the hits returned
    num_searches: int = 0
    num_invalid: int = 0             # turns that ended with neither a search nor an answer
    num_turns: int = 0               # generations run
    answered: bool = False           # the last turn closed an <answer> … </answer>
    truncated: bool = False          # a turn ran out of max_new_tokens or the row hit max_total_tokens
    obs_truncated: bool = False      # an observation was cut to max_obs_tokens


@dataclass
class _Row:
    """Per-question state while generating. Between turns `ids[:n_cached]` are in `kv`; the rest are pending."""
    index: int                       # the question's position in rollout()'s input
    traj: Trajectory
    ids: list[int]
    mask: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # per layer (H, n_cached, D)
    n_cached: int = 0
    turn_ids: list[int] = field(default_factory=list)            # sampled in the current turn
    turn_end: str = ""               # "search" | "answer" | "eos" | "budget"
    done: bool = False

    def append(self, ids: list[int], sampled: bool) -> None:
        """The one place tokens join a row: the loss mask is decided here, as they are appended."""
        self.ids.extend(ids)
        self.mask.extend([int(sampled)] * len(ids))


# -----------------------------------------------------------------------------
# The rollout

@torch.no_grad()
def rollout(model, tokenizer, questions: list[str], retriever, config: RolloutConfig,
            generator: torch.Generator | None = None,
            prefix_ids: list[list[int]] | None = None, search_fn=None,
            chats: list[list[dict]] | None = None, lockstep: bool = False) -> list[Trajectory]:
    """Runs the protocol for every question; returns one Trajectory each, in order.

    `retriever` is anything with `.search(queries: list[str], topk: int) -> list[list[hit dict]]`.
    `prefix_ids` (optional, one list per question) are forced tokens placed right after the prompt,
    e.g. evidence and a primer for the evidence-given probe; they are part of the response, loss 0.
    `search_fn` (optional) replaces `retriever.search` when the answer to a query depends on whose
    query it is (the probe places each question's evidence in its own results):
    search_fn(question_indices, queries) -> one hit list per query, called once per turn.
    `chats` (optional, one per question): each question's own prompt chat, used instead of the prompt
    built from the question (row_chats: RolloutConfig.prompt_from "data").
    `lockstep`: the search is called on every turn that may search (all but the final one), with no
    queries when none of the rows search, even after every row has finished — so a search that is a
    collective across ranks (ddp.OneCallerRetriever) is entered equally often on every rank.
    """
    if prefix_ids is not None and len(prefix_ids) != len(questions):
        raise ValueError(f"prefix_ids has {len(prefix_ids)} rows for {len(questions)} questions")
    if chats is not None and len(chats) != len(questions):
        raise ValueError(f"chats has {len(chats)} rows for {len(questions)} questions")
    device = next(model.parameters()).device
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    stop_ids = _stop_token_ids(model, tokenizer)
    rows = []
    for i, question in enumerate(questions):
        ids = prompt_ids(tokenizer, question, chats[i] if chats is not None else None)
        row = _Row(i, Trajectory(question=question, input_ids=[], loss_mask=[], prompt_length=len(ids)), [], [])
        row.append(ids, sampled=False)
        if prefix_ids is not None:
            row.append(list(prefix_ids[i]), sampled=False)
        if config.max_total_tokens is not None and len(row.ids) >= config.max_total_tokens:
            raise ValueError(f"question {i} ({question[:40]!r}): its prompt is {len(row.ids)} tokens, leaving no "
                             f"room under max_total_tokens={config.max_total_tokens}")
        rows.append(row)

    if search_fn is None:
        def search_fn(indices, queries):
            return retriever.search(queries, topk=config.topk)
    was_training = model.training
    model.eval()
    try:
        for turn in range(config.max_turns + 1):
            final_turn = turn == config.max_turns
            playing = [r for r in rows if not r.done]
            if not playing and not lockstep:
                break
            if playing:
                _generate_turn(model, tokenizer, playing, config, stop_ids, generator, device)
            _act(tokenizer, playing, search_fn, config, final_turn, lockstep)
    finally:
        model.train(was_training)
    return [_finish(tokenizer, r) for r in rows]


def _stop_token_ids(model, tokenizer) -> set[int]:
    """eos ids from the generation config (Qwen-instruct lists two) and the tokenizer."""
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def _generate_turn(model, tokenizer, rows: list[_Row], config: RolloutConfig, stop_ids: set[int],
                   generator, device) -> None:
    """Prefills each row's pending tokens, then decodes until every row has ended its turn."""
    for r in rows:
        r.turn_ids, r.turn_end = [], ""
    chunk, chunk_mask, positions = _left_pad_pending(rows, device)     # (R, Lp) each
    room = chunk.shape[1] + config.max_new_tokens                      # columns this turn can add
    cache, cache_mask = _stack_kv(rows, device, room)                  # (R, Lc)
    attention = torch.cat([cache_mask, chunk_mask], dim=1)             # (R, Lc + Lp)
    running = list(rows)
    vocabulary = len(tokenizer)
    while running:
        logits = model(input_ids=chunk, attention_mask=attention, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (R, V)
        # an embedding matrix padded past the tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens) must
        # not emit ids no tokenizer can decode; rl.py scores the same sliced vocabulary
        sampled = _sample(logits[:, :vocabulary].float(), config, generator)   # (R,)
        tokens = sampled.tolist()
        pieces = tokenizer.convert_ids_to_tokens(tokens)                 # vocabulary strings, (R,)
        keep = []
        for b, (r, token, piece) in enumerate(zip(running, tokens, pieces)):
            r.append([token], sampled=True)
            r.turn_ids.append(token)
            r.turn_end = _turn_end(tokenizer, r, token, piece, config, stop_ids)
            if r.turn_end:                                              # the last token stays pending:
                r.kv, r.n_cached = _row_kv(cache, b, attention[b]), len(r.ids) - 1   # all before it are cached
            else:
                keep.append(b)
        if len(keep) < len(running):                                   # finished rows leave the batch
            index = torch.tensor(keep, device=device, dtype=torch.long)
            cache.batch_select_indices(index)
            attention, positions, sampled = attention[index], positions[index], sampled[index]
            running = [running[b] for b in keep]
        if not running:
            break
        chunk = sampled.unsqueeze(1)                                   # (R, 1) each row's last token
        attention = torch.cat([attention, torch.ones_like(chunk, dtype=torch.bool)], dim=1)
        positions = positions[:, -1:] + 1                              # (R, 1) one past the last fed


def _turn_end(tokenizer, row: _Row, token: int, piece: str | None, config: RolloutConfig,
              stop_ids: set[int]) -> str:
    """Why the row's turn ends at this token ("" = it goes on). A tag counts when the decoded text of
    this turn first contains it — i.e. at the token that completes it, whatever that token merged.

    Only the token that brings a tag's final ">" can complete it, and a token's vocabulary string
    (`piece`) shows every ">" it decodes to (byte-level BPE, SentencePiece, WordPiece alike; byte
    fallback pieces like <0x3E> all contain one), so the costly decode runs only for those tokens.
    """
    if token in stop_ids:
        return "eos"
    if piece is None or ">" in piece:                       # None: an id past the tokenizer's vocabulary
        tail = tokenizer.decode(row.turn_ids[-_TAG_WINDOW:], skip_special_tokens=False)
        if SEARCH_CLOSE in tail:
            return "search"
        if ANSWER_CLOSE in tail:
            return "answer"
    if len(row.turn_ids) >= config.max_new_tokens:
        return "budget"
    if config.max_total_tokens is not None and len(row.ids) >= config.max_total_tokens:
        return "budget"
    return ""


def _act(tokenizer, rows: list[_Row], search_fn, config: RolloutConfig, final_turn: bool,
         lockstep: bool = False) -> None:
    """After a turn: run every row's search in one batched call, then append observations or nudges
    (with `lockstep`, the call is made on every turn but the final one, even with no queries)."""
    searching, queries = [], []
    for r in rows:
        traj = r.traj
        text = tokenizer.decode(r.turn_ids, skip_special_tokens=True)
        traj.turns.append(text)
        traj.num_turns += 1
        if r.turn_end == "eos" and not config.eos_ends:        # Search-R1 decodes the turn without special
            r.ids.pop()                                         # tokens: the eos (sampled, not yet cached)
            r.mask.pop()                                        # never reaches the ids it trains on
        out_of_room = config.max_total_tokens is not None and len(r.ids) >= config.max_total_tokens
        traj.truncated |= r.turn_end == "budget"
        query = last_query(text) if r.turn_end == "search" else None
        if r.turn_end == "answer":
            traj.answered = completes_answer(text)
        # the rollout ends on a complete answer; by default an eos or an orphan </answer> is an invalid action
        ends = traj.answered or (config.eos_ends and r.turn_end in ("answer", "eos"))
        if ends or final_turn or out_of_room:
            r.done = True
        elif query is not None:
            searching.append(r)
            queries.append(query)
        else:                                  # neither a complete search nor answer (budget, eos, orphan tag)
            traj.num_invalid += 1
            _force(r, encode_text(tokenizer, INVALID_ACTION), config)
    if not searching and not (lockstep and not final_turn):
        return
    results = search_fn([r.index for r in searching], queries)
    if len(results) != len(queries):
        raise RuntimeError(f"the retriever returned {len(results)} hit lists for {len(queries)} queries")
    for r, query, hits in zip(searching, queries, results):
        ids, cut = observation_ids(tokenizer, hits, config.max_obs_tokens)
        if _force(r, ids, config):
            r.traj.queries.append(query)
            r.traj.hits.append(hits)
            r.traj.num_searches += 1
            r.traj.obs_truncated |= cut


def _force(row: _Row, ids: list[int], config: RolloutConfig) -> bool:
    """Appends forced tokens (an observation or the nudge) if they leave room under max_total_tokens
    for at least one sampled token; otherwise the row ends here, truncated, without them."""
    if config.max_total_tokens is not None and len(row.ids) + len(ids) >= config.max_total_tokens:
        row.done = row.traj.truncated = True
        return False
    row.append(ids, sampled=False)
    return True


def _finish(tokenizer, row: _Row) -> Trajectory:
    traj = row.traj
    traj.input_ids, traj.loss_mask = row.ids, row.mask
    traj.response_text = tokenizer.decode(row.ids[traj.prompt_length:], skip_special_tokens=True)
    return traj


# -----------------------------------------------------------------------------
# Sampling

def _sample(logits: torch.Tensor, config: RolloutConfig, generator) -> torch.Tensor:
    """logits (R, V) fp32 → next token ids (R,): argmax, or temperature + nucleus (top-p) sampling."""
    if config.greedy or config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)            # (R, V)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= config.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# Key/value bookkeeping: rows carry their own unpadded KV between turns

class _TurnLayer(DynamicLayer):
    """One layer of a turn's KV cache. Its first write reserves `room` more columns, so every later
    write (the pending tokens, then one token per step) is copied into place; HF's DynamicLayer
    re-allocates and copies the whole layer (torch.cat) at every step instead, which cost a quarter of
    the time of long turns (bench/bench_rollout.py). `keys`/`values` are views of the filled columns."""

    def __init__(self, room: int):
        super().__init__()
        self.room, self.length = room, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            R, H, _, D = key_states.shape
            self.key_room = key_states.new_empty(R, H, n + self.room, D)                  # (R, H, W, D)
            self.value_room = value_states.new_empty(R, H, n + self.room, value_states.shape[-1])
        if self.length + n > self.key_room.shape[-2]:
            raise RuntimeError(f"turn cache full: {self.length} + {n} columns > {self.key_room.shape[-2]} reserved")
        self.key_room[..., self.length:self.length + n, :] = key_states
        self.value_room[..., self.length:self.length + n, :] = value_states
        self.length += n
        self.keys, self.values = self.key_room[..., :self.length, :], self.value_room[..., :self.length, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps rows `indices` (ascending): their filled columns move up to the front rows of the
        same buffers, in place, from the first row that moves on. Indexing the buffers
        (key_room[indices]) copied the whole reserved room at every row that left, mostly empty
        columns: 15% of the demo KD student's rollout time (cProfile). The rows keep their order and
        the views their strides, so the model sees the same tensors and computes the same bits."""
        kept = indices.tolist()
        first = next((i for i, b in enumerate(kept) if b != i), len(kept))   # rows before it stay where they are
        moved = indices[first:]
        # the right side is a copy (advanced indexing), so the overlapping move is safe
        self.key_room[first:len(kept), :, :self.length] = self.key_room[moved, :, :self.length]
        self.value_room[first:len(kept), :, :self.length] = self.value_room[moved, :, :self.length]
        self.key_room, self.value_room = self.key_room[:len(kept)], self.value_room[:len(kept)]
        self.keys, self.values = self.key_room[..., :self.length, :], self.value_room[..., :self.length, :]


def _stack_kv(rows: list[_Row], device, room: int) -> tuple[Cache, torch.Tensor]:
    """One left-padded cache for the rows, with `room` columns reserved to grow into, and its (R, Lc)
    bool mask of real columns. Layers are created as the model first writes them (turn 0) or here."""
    cache = Cache(layer_class_to_replicate=partial(_TurnLayer, room))
    lengths = [r.n_cached for r in rows]
    width = max(lengths)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)   # (R, Lc)
    for b, n in enumerate(lengths):
        mask[b, width - n:] = True
    if width == 0:
        return cache, mask
    for layer in range(len(next(r.kv for r in rows if r.kv is not None))):
        some_k, some_v = next(r.kv for r in rows if r.kv is not None)[layer]
        keys = some_k.new_zeros(len(rows), some_k.shape[0], width, some_k.shape[-1])    # (R, H, Lc, D)
        values = some_v.new_zeros(len(rows), some_v.shape[0], width, some_v.shape[-1])
        for b, (r, n) in enumerate(zip(rows, lengths)):
            if n:
                keys[b, :, width - n:], values[b, :, width - n:] = r.kv[layer]
        cache.update(keys, values, layer)
    return cache, mask


def _row_kv(cache: Cache, b: int, real: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row b's keys/values at its real columns only: per layer ((H, n, D), (H, n, D))."""
    columns = real[: cache.layers[0].keys.shape[-2]].nonzero().squeeze(-1)   # (n,)
    return [(layer.keys[b].index_select(-2, columns), layer.values[b].index_select(-2, columns))
            for layer in cache.layers]


def _left_pad_pending(rows: list[_Row], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's not-yet-cached tokens, left-padded so every row's last real token is the last column.
    Returns ids (R, Lp), a bool mask of real tokens (R, Lp) and position ids (R, Lp)."""
    pending = [r.ids[r.n_cached:] for r in rows]
    width = max(len(p) for p in pending)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)     # pad id is irrelevant:
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)    # the mask hides it
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, (r, p) in enumerate(zip(rows, pending)):
        ids[b, width - len(p):] = torch.tensor(p, device=device)
        mask[b, width - len(p):] = True
        positions[b, width - len(p):] = torch.arange(r.n_cached, r.n_cached + len(p), device=device)
    return ids, mask, positions

